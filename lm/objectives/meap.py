"""MEAP: Mask-Enhanced Autoregressive Prediction (Zhuang et al., ICML 2025; scitix/MEAP).

Pretraining (``MEAPCollator``): a fraction of the input positions (15% by default) is replaced by
a [MASK] token while the targets stay plain next-token targets over the ORIGINAL tokens; the model
is an ordinary causal LM with its ordinary loss (no bidirectional attention, no extra compute):

    mask_id = ensure_mask_token(tokenizer, model)        # adds [MASK] and resizes if needed
    collator = MEAPCollator.from_tokenizer(tokenizer, mask_ratio=0.15)
    batch = collator(sequences, generator=torch.Generator().manual_seed(step))
    loss = model(**batch.model_inputs()).loss

Per sequence, k = max(1, floor(mask_ratio x E)) positions are drawn uniformly without replacement
from the E eligible positions: real tokens (padding is found by position, from the attention
mask, so a pad id that is also the EOS id leaves document separators eligible) whose id is not
protected (``from_tokenizer``: the BOS id, unless it is the EOS id, which separates documents).
The reference code (MEAP-Pretain/pretrained/meap_1b.py) draws max(1, int(block_size x 0.15))
positions per batch, separators included; we draw per sequence so padded rows and protected
tokens are handled.

Fine-tuning (``MEAPSFTCollator``, ``meap_sft_examples``), as the reference code MEAP-SFT/MEAP-SFT.py
does it (``preprocess_function``), for each (prompt, answer) pair:

1. the clean example: prompt + answer + EOS, labels -100 on the prompt, the answer and EOS after
   it (ordinary SFT);
2. the masked copy, only when the answer has more than ``min_answer_tokens`` tokens (50 in the
   reference code): the same prompt + answer (cut to max_length - 1) with
   k = max(1, int(mask_ratio x answer length)) answer positions (10% by default; never prompt
   positions) replaced by [MASK], then EOS. Its labels are -100 everywhere except the masked
   positions, which hold the original token: after the model's shift, the copy trains the
   prediction of each masked answer token from the tokens before it, with the earlier masks in
   its context. The copy is a separate row of the batch, appended after the clean rows (the
   reference code appends it as a separate training example after the dialogue's clean ones;
   it is not concatenated into the clean row).

The [MASK] token: ``ensure_mask_token`` adds "[MASK]" as the tokenizer's mask token when it has
none (as the reference code adds it as a special token) and, given a model whose input embedding
has fewer rows than the tokenizer now has tokens, calls ``model.resize_token_embeddings(len(tok),
mean_resizing=True)``: the new row is drawn from a normal with the old rows' mean and covariance
(Hewitt 2021), a tied LM head grows with it, and every old row is kept unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lm.objectives.ntp import IGNORE_INDEX, TokenRows, pad_sequences

__all__ = [
    "MASK_TOKEN",
    "MEAPBatch",
    "MEAPCollator",
    "MEAPSFTCollator",
    "SFTExample",
    "collate_sft",
    "ensure_mask_token",
    "meap_mask_positions",
    "meap_sft_examples",
]

MASK_TOKEN = "[MASK]"  # the token string MEAP's code adds


def ensure_mask_token(
    tokenizer: Any, model: Any | None = None, mask_token: str = MASK_TOKEN
) -> int:
    """The tokenizer's mask token id, adding `mask_token` first if it has none; a `model` whose
    input embedding is too small for the tokenizer is resized (mean_resizing, see module doc)."""
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    mask_id = int(tokenizer.mask_token_id)
    if model is not None:
        rows = model.get_input_embeddings().num_embeddings
        if rows < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return mask_id


def meap_mask_positions(
    eligible: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Positions to mask in one sequence: eligible (T,) bool -> sorted int64 indices, k of them with
    k = max(1, floor(mask_ratio x eligible.sum())) (0 when nothing is eligible or ratio is 0)."""
    candidates = eligible.nonzero().flatten()
    E = candidates.numel()
    if E == 0 or mask_ratio <= 0:
        return candidates[:0]
    k = max(1, int(mask_ratio * E))
    pick = torch.randperm(E, generator=generator)[:k]
    return candidates[pick].sort().values


@dataclass
class MEAPBatch:
    """input_ids (B, T) with [MASK] at masked positions; attention_mask (B, T); labels (B, T) the
    original tokens (-100 on padding); masked (B, T) bool, where [MASK] was put."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    masked: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of a HF causal LM's forward."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
        }


class MEAPCollator:
    """MEAP pretraining: token sequences -> MEAPBatch (see the module doc for what is masked)."""

    def __init__(
        self,
        mask_token_id: int,
        pad_token_id: int,
        mask_ratio: float = 0.15,
        protected_ids: Iterable[int] = (),
    ):
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), received {mask_ratio}")
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.mask_ratio = mask_ratio
        self.protected_ids = sorted({int(i) for i in protected_ids})

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, mask_ratio: float = 0.15) -> MEAPCollator:
        """Mask id from the tokenizer (call ensure_mask_token first); BOS protected unless it
        is also the EOS (then it separates documents and may be masked, as in the reference)."""
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; call ensure_mask_token(tokenizer)")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        protected = [bos] if bos is not None and bos != eos else []
        return cls(tokenizer.mask_token_id, tokenizer.pad_token_id, mask_ratio, protected)

    def __call__(
        self,
        sequences: TokenRows,
        generator: torch.Generator | None = None,
    ) -> MEAPBatch:
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        protected = torch.isin(input_ids, torch.tensor(self.protected_ids, dtype=input_ids.dtype))
        eligible = (attention_mask == 1) & ~protected  # (B, T)
        masked = torch.zeros_like(eligible)
        for b in range(input_ids.shape[0]):
            masked[b, meap_mask_positions(eligible[b], self.mask_ratio, generator)] = True
        return MEAPBatch(
            input_ids.masked_fill(masked, self.mask_token_id), attention_mask, labels, masked
        )


@dataclass
class SFTExample:
    """One row of an SFT batch: input_ids and labels of equal length (-100 = no loss)."""

    input_ids: list[int]
    labels: list[int]


def meap_sft_examples(
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    eos_token_id: int,
    mask_token_id: int,
    mask_ratio: float = 0.1,
    max_length: int = 4096,
    min_answer_tokens: int = 50,
    generator: torch.Generator | None = None,
) -> tuple[SFTExample, SFTExample | None]:
    """(clean example, masked copy or None) of one prompt/answer pair (see the module doc).

    Sequences longer than max_length are cut so that EOS stays last."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, received {max_length}")
    prompt, answer = list(prompt_ids), list(answer_ids)
    full = prompt + answer
    clean_ids = [*full, eos_token_id][:max_length]
    clean_labels = ([IGNORE_INDEX] * len(prompt) + answer + [eos_token_id])[:max_length]
    clean_ids[-1] = clean_labels[-1] = eos_token_id
    clean = SFTExample(clean_ids, clean_labels)
    if len(answer) <= min_answer_tokens:
        return clean, None
    start, end = len(prompt), min(len(full), max_length - 1)
    if end <= start:  # the prompt alone fills max_length: no answer position left to mask
        return clean, None
    span = torch.zeros(end, dtype=torch.bool)
    span[start:end] = True
    positions = meap_mask_positions(span, mask_ratio, generator).tolist()
    masked_ids = full[:end]
    masked_labels = [IGNORE_INDEX] * end
    for p in positions:
        masked_ids[p] = mask_token_id
        masked_labels[p] = full[p]
    return clean, SFTExample([*masked_ids, eos_token_id], [*masked_labels, IGNORE_INDEX])


class MEAPSFTCollator:
    """MEAP fine-tuning: (prompt, answer) pairs -> {"input_ids", "attention_mask", "labels"}.

    Rows: the clean example of every pair, then the masked copies of the pairs whose answer is long
    enough, in pair order. Prompts are tokenized with the tokenizer's own special tokens (BOS
    where it adds one), answers without."""

    def __init__(
        self,
        tokenizer: Any,
        mask_ratio: float = 0.1,
        max_length: int = 4096,
        min_answer_tokens: int = 50,
    ):
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(
                    f"the tokenizer needs a {name.removesuffix('_id')} (call ensure_mask_token "
                    "for the mask token)"
                )
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), received {mask_ratio}")
        self.tokenizer = tokenizer
        self.mask_ratio = mask_ratio
        self.max_length = max_length
        self.min_answer_tokens = min_answer_tokens

    def __call__(
        self,
        pairs: Sequence[tuple[str, str] | Mapping[str, str]],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        clean_rows: list[SFTExample] = []
        masked_rows: list[SFTExample] = []
        for pair in pairs:
            prompt, answer = (pair["prompt"], pair["answer"]) if isinstance(pair, Mapping) else pair
            clean, masked = meap_sft_examples(
                tok(prompt)["input_ids"],
                tok(answer, add_special_tokens=False)["input_ids"],
                tok.eos_token_id,
                tok.mask_token_id,
                self.mask_ratio,
                self.max_length,
                self.min_answer_tokens,
                generator,
            )
            clean_rows.append(clean)
            if masked is not None:
                masked_rows.append(masked)
        rows = clean_rows + masked_rows
        return collate_sft(rows, tok.pad_token_id)


def collate_sft(rows: Sequence[SFTExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad SFT rows: input_ids, attention_mask, labels (B, T); padding labels are -100."""
    input_ids, attention_mask = pad_sequences([r.input_ids for r in rows], pad_token_id)
    labels, _ = pad_sequences([r.labels for r in rows], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
