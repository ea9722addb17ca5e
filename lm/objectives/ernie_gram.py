"""ERNIE-Gram: explicitly n-gram masked LM (Xiao et al., NAACL 2021; PaddlePaddle/ERNIE).

Read top to bottom: the n-gram lexicon (t-test), explicit n-gram masking (the collator), the
pretraining model (generator, coarse and fine heads on any HF encoder).

    lexicon = build_ngram_lexicon(token_sequences, top_k=1000, max_n=3, exclude_ids=specials)
    collator = ErnieGramCollator(lexicon, vocab_size=len(tok), mask_token_id=tok.mask_token_id,
                                 pad_token_id=tok.pad_token_id, protected_ids=specials)
    batch = collator(sequences, generator=torch.Generator().manual_seed(step))
    model = ErnieGramForPretraining(encoder, generator_encoder,
                                    ErnieGramConfig(vocab_size=len(tok), lexicon_size=len(lexicon)))
    out = model(**batch.model_inputs())     # out.loss = coarse + fine + generator losses

Lexicon. For every n-gram w = (x_1 .. x_n), n = 2 .. max_n, counted inside documents (never across
one), with N the number of tokens: p(w) = c(w) / N, p(x) = c(x) / N and the t-statistic
t(w) = (p(w) - prod_i p(x_i)) / sqrt(p(w) / N) (the collocation t-test, Manning & Schuetze 5.3.1).
The top_k n-grams of each order by t form the lexicon V_N; n-gram id j is its index.

Explicit n-gram masking. Each sequence is cut into units by greedy longest match, left to right
(a lexicon n-gram of the longest order that starts here, else one token). Units are drawn in a
random order and masked while the masked tokens stay within max(1, floor(mask_ratio x E)), E the
unprotected tokens. A masked unit of n tokens becomes ONE [MASK] position, so the sequence shrinks
by n - 1. Alignment: every kept position carries its original position id, the [MASK] of a unit
carries the position of the unit's first token (the gap after it tells the encoder n), and
``ErnieGramExample.source_index`` maps each collapsed position to its original index. Example,
lexicon {(6, 7, 8)}, unit (6, 7, 8) masked:

    original      5  6  7  8  9          positions 0 1 2 3 4
    collapsed     5  M  9                position_ids 0 1 4
    coarse label  V + id(6, 7, 8);  fine labels 6 7 8

The coarse label of a masked unit lives in one output space of V + K classes: a single token is
its own id (< V), a lexicon n-gram is V + its lexicon id.

Predictions (paper section 3.3, comprehensive n-gram prediction). At each [MASK] hidden state h:
coarse = the unit's identity over V + K classes; fine = its n tokens, one slot per token: slot s is
predicted by the shared fine head from h + e_s, e_s a learned slot embedding (s = 0 .. max_n - 1;
slots past n carry no loss). The paper instead appends n extra [MASK] queries with the tokens'
positions under a custom attention mask; position-specific slots ask nothing of the encoder but its
last hidden state, so any ``AutoModel`` works unchanged.

Generator (paper section 3.4, enhanced n-gram relation modeling). A small encoder with its own
coarse head reads the same collapsed input and is trained with the coarse loss. At every masked
slot it samples an identity y' ~ p_gen(. | context) (Gumbel-max, no gradient), and with
probability replace_prob the main encoder sees y' in place of [MASK]: a token's own input
embedding, or for an n-gram a learned explicit n-gram embedding. The main model must still
recover the ORIGINAL unit (coarse and fine), so it learns how plausible n-grams relate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn
from transformers import PreTrainedModel

from core.config import Config
from core.io import atomic_write_text
from lm.objectives.ntp import IGNORE_INDEX, TokenRows

__all__ = [
    "ErnieGramBatch",
    "ErnieGramCollator",
    "ErnieGramConfig",
    "ErnieGramExample",
    "ErnieGramForPretraining",
    "ErnieGramOutput",
    "NGramLexicon",
    "PredictionHead",
    "build_ngram_lexicon",
    "ngram_t_scores",
    "sample_from_logits",
]


# ----------------------------------------------------------------------------------------------
# The n-gram lexicon


def _token_stream(sequences: TokenRows | Iterable[Sequence[int]]) -> np.ndarray:
    """All sequences in one int64 array, documents separated by -1 (no n-gram spans a -1)."""
    parts: list[np.ndarray] = []
    for s in sequences:
        arr = np.asarray(s, dtype=np.int64).ravel()
        if arr.size and arr.min() < 0:
            raise ValueError(f"token ids must be >= 0, received {int(arr.min())}")
        parts += [arr, np.array([-1], dtype=np.int64)]
    if not parts:
        raise ValueError("expected at least one token sequence, received none")
    return np.concatenate(parts)


def ngram_t_scores(
    sequences: TokenRows | Iterable[Sequence[int]],
    n: int,
    min_count: int = 2,
    exclude_ids: Iterable[int] = (),
) -> dict[tuple[int, ...], float]:
    """t-statistic of every n-gram seen at least min_count times (see the module doc).

    N counts every token; n-grams holding an excluded id (separators, padding) are skipped."""
    if n < 2:
        raise ValueError(f"n must be >= 2, received {n}")
    stream = _token_stream(sequences)
    tokens = stream[stream >= 0]
    N = tokens.size
    if N == 0:
        return {}
    unigram_p = np.bincount(tokens) / N
    if stream.size < n:
        return {}
    windows = sliding_window_view(stream, n)  # (L - n + 1, n)
    bad = (windows < 0).any(axis=1)
    excluded = np.asarray(sorted(set(exclude_ids)), dtype=np.int64)
    if excluded.size:
        bad |= np.isin(windows, excluded).any(axis=1)
    grams, counts = np.unique(windows[~bad], axis=0, return_counts=True)
    keep = counts >= min_count
    grams, counts = grams[keep], counts[keep]
    p = counts / N
    expected = unigram_p[grams].prod(axis=1)
    t = (p - expected) / np.sqrt(p / N)
    return {tuple(int(x) for x in g): float(v) for g, v in zip(grams, t, strict=True)}


@dataclass(frozen=True)
class NGramLexicon:
    """The n-gram vocabulary V_N: ngrams[j] is n-gram id j, scores[j] its t-statistic."""

    ngrams: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.scores and len(self.scores) != len(self.ngrams):
            raise ValueError(f"{len(self.ngrams)} n-grams but {len(self.scores)} scores")
        if any(len(g) < 2 for g in self.ngrams):
            raise ValueError("lexicon n-grams must have at least 2 tokens")
        if len(set(self.ngrams)) != len(self.ngrams):
            raise ValueError("lexicon n-grams must be distinct")

    def __len__(self) -> int:
        return len(self.ngrams)

    @cached_property
    def index(self) -> dict[tuple[int, ...], int]:
        return {g: j for j, g in enumerate(self.ngrams)}

    @property
    def max_n(self) -> int:
        """The longest order in the lexicon (1 when it is empty)."""
        return max((len(g) for g in self.ngrams), default=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        data = {"ngrams": [list(g) for g in self.ngrams], "scores": list(self.scores)}
        atomic_write_text(path, json.dumps(data))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NGramLexicon:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(tuple(tuple(g) for g in data["ngrams"]), tuple(data["scores"]))


def build_ngram_lexicon(
    sequences: TokenRows,
    top_k: int,
    max_n: int = 3,
    min_count: int = 2,
    exclude_ids: Iterable[int] = (),
) -> NGramLexicon:
    """The top_k n-grams by t-statistic of each order n = 2 .. max_n (ties by token ids)."""
    if top_k < 1 or max_n < 2:
        raise ValueError(f"need top_k >= 1 and max_n >= 2, received {top_k}, {max_n}")
    exclude = list(exclude_ids)
    ngrams: list[tuple[int, ...]] = []
    scores: list[float] = []
    for n in range(2, max_n + 1):
        t = ngram_t_scores(sequences, n, min_count, exclude)
        best = sorted(t.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        ngrams += [g for g, _ in best]
        scores += [s for _, s in best]
    return NGramLexicon(tuple(ngrams), tuple(scores))


# ----------------------------------------------------------------------------------------------
# Explicit n-gram masking


@dataclass
class ErnieGramExample:
    """One masked sequence. input_ids / position_ids / source_index have the collapsed length T';
    slots[i] is the collapsed index of masked unit i, with its coarse label and n fine tokens."""

    input_ids: list[int]
    position_ids: list[int]
    source_index: list[int]  # original index of each collapsed position (a unit's first token)
    slots: list[int] = field(default_factory=list)
    coarse_labels: list[int] = field(default_factory=list)
    fine_labels: list[list[int]] = field(default_factory=list)  # each padded to max_n with -100


@dataclass
class ErnieGramBatch:
    """input_ids, attention_mask, position_ids (B, T') collapsed and right-padded; masked_index
    (M,) flat indices b * T' + t of the masked slots; coarse_labels (M,) in [0, V + K);
    fine_labels (M, max_n), -100 past each unit's length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    masked_index: torch.Tensor
    coarse_labels: torch.Tensor
    fine_labels: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of ErnieGramForPretraining.forward."""
        return dict(vars(self))

    def to(self, device: torch.device | str) -> ErnieGramBatch:
        return ErnieGramBatch(**{k: v.to(device) for k, v in vars(self).items()})


class ErnieGramCollator:
    """Token sequences -> ErnieGramBatch by explicit n-gram masking (see the module doc)."""

    def __init__(
        self,
        lexicon: NGramLexicon,
        vocab_size: int,
        mask_token_id: int,
        pad_token_id: int,
        mask_ratio: float = 0.15,
        protected_ids: Iterable[int] = (),
        max_n: int | None = None,
    ):
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), received {mask_ratio}")
        self.lexicon = lexicon
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.mask_ratio = mask_ratio
        self.protected_ids = frozenset(int(i) for i in protected_ids) | {pad_token_id}
        self.max_n = max_n if max_n is not None else lexicon.max_n
        if self.max_n < lexicon.max_n:
            raise ValueError(f"max_n {self.max_n} < the lexicon's longest n-gram {lexicon.max_n}")
        self.orders = sorted({len(g) for g in lexicon.ngrams}, reverse=True)

    def segment(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """Greedy longest-match units (start, n) covering ids; protected tokens are 1-units."""
        units, i, T = [], 0, len(ids)
        index = self.lexicon.index
        while i < T:
            n = 1
            if ids[i] not in self.protected_ids:
                for order in self.orders:
                    gram = tuple(ids[i : i + order])
                    if len(gram) == order and gram in index:
                        n = order
                        break
            units.append((i, n))
            i += n
        return units

    def mask_sequence(
        self, ids: Sequence[int], generator: torch.Generator | None = None
    ) -> ErnieGramExample:
        ids = [int(x) for x in ids]
        units = self.segment(ids)
        candidates = [u for u, (s, _) in enumerate(units) if ids[s] not in self.protected_ids]
        eligible = sum(1 for x in ids if x not in self.protected_ids)
        budget = max(1, int(self.mask_ratio * eligible)) if eligible else 0
        chosen: set[int] = set()
        used = 0
        order = torch.randperm(len(candidates), generator=generator).tolist()
        for j in order:
            n = units[candidates[j]][1]
            if used + n <= budget:
                chosen.add(candidates[j])
                used += n
            if used == budget:
                break
        if not chosen and order:  # every unit is longer than the budget: one token of the first
            u = candidates[order[0]]  # drawn unit, masked alone (a row always has a target)
            start, n = units[u]
            units[u : u + 1] = [(start + i, 1) for i in range(n)]
            chosen = {u}
        out = ErnieGramExample([], [], [])
        for u, (start, n) in enumerate(units):
            if u in chosen:
                gram = tuple(ids[start : start + n])
                out.slots.append(len(out.input_ids))
                out.coarse_labels.append(
                    gram[0] if n == 1 else self.vocab_size + self.lexicon.index[gram]
                )
                out.fine_labels.append(list(gram) + [IGNORE_INDEX] * (self.max_n - n))
                out.input_ids.append(self.mask_token_id)
                out.position_ids.append(start)
                out.source_index.append(start)
            else:
                for i in range(start, start + n):
                    out.input_ids.append(ids[i])
                    out.position_ids.append(i)
                    out.source_index.append(i)
        return out

    def __call__(
        self,
        sequences: TokenRows,
        generator: torch.Generator | None = None,
    ) -> ErnieGramBatch:
        examples = [self.mask_sequence(list(map(int, s)), generator) for s in sequences]
        B, T = len(examples), max(len(e.input_ids) for e in examples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        masked_index, coarse, fine = [], [], []
        for b, e in enumerate(examples):
            L = len(e.input_ids)
            input_ids[b, :L] = torch.tensor(e.input_ids)
            attention_mask[b, :L] = 1
            position_ids[b, :L] = torch.tensor(e.position_ids)
            masked_index += [b * T + s for s in e.slots]
            coarse += e.coarse_labels
            fine += e.fine_labels
        return ErnieGramBatch(
            input_ids,
            attention_mask,
            position_ids,
            torch.tensor(masked_index, dtype=torch.long),
            torch.tensor(coarse, dtype=torch.long),
            torch.tensor(fine, dtype=torch.long).reshape(len(fine), self.max_n),
        )


# ----------------------------------------------------------------------------------------------
# The pretraining model


@dataclass
class ErnieGramConfig(Config):
    """The heads and losses around the encoders (the encoders keep their own HF configs)."""

    vocab_size: int = 30522  # fine-grained vocabulary V (the tokenizer's length)
    lexicon_size: int = 0  # K lexicon n-grams; the coarse head has V + K classes
    max_n: int = 3  # fine slots per [MASK]: the longest n-gram
    replace_prob: float = 0.5  # chance a masked slot shows the generator's sample, not [MASK]
    fine_weight: float = 1.0  # loss = coarse + fine_weight * fine + generator_weight * generator
    generator_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.lexicon_size < 0 or self.max_n < 1:
            raise ValueError(
                f"need vocab_size >= 1, lexicon_size >= 0, max_n >= 1, received "
                f"{self.vocab_size}, {self.lexicon_size}, {self.max_n}"
            )
        if not 0 <= self.replace_prob <= 1:
            raise ValueError(f"replace_prob must be in [0, 1], received {self.replace_prob}")
        if self.fine_weight < 0 or self.generator_weight < 0:
            raise ValueError("loss weights must be >= 0")


class PredictionHead(nn.Module):
    """BERT's MLM head shape: Linear, GELU, LayerNorm, Linear -> classes. (..., C) -> (..., N)."""

    def __init__(self, hidden_size: int, num_classes: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.decoder = nn.Linear(hidden_size, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h))))


def sample_from_logits(
    logits: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One exact sample per row of softmax(logits) by Gumbel-max: (M, N) -> (M,) int64.

    The uniform noise is drawn on the CPU (so a CPU generator fixes samples on any device)."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20))).to(logits.device)
    return (logits.detach().float() + gumbel).argmax(dim=-1)


@dataclass
class ErnieGramOutput:
    """loss () total; coarse_loss, fine_loss, generator_loss (); coarse_logits (M, V + K);
    fine_logits (M, max_n, V); generator_logits (M, V + K); sampled_ids (M,) the generator's
    samples; replaced (M,) bool, where the main encoder saw the sample instead of [MASK]."""

    loss: torch.Tensor
    coarse_loss: torch.Tensor
    fine_loss: torch.Tensor
    generator_loss: torch.Tensor
    coarse_logits: torch.Tensor
    fine_logits: torch.Tensor
    generator_logits: torch.Tensor
    sampled_ids: torch.Tensor
    replaced: torch.Tensor


class ErnieGramForPretraining(nn.Module):
    """Any HF encoder (``AutoModel``, returns last_hidden_state) with ERNIE-Gram's heads, plus a
    small generator encoder with its own coarse head."""

    def __init__(
        self, encoder: PreTrainedModel, generator: PreTrainedModel, config: ErnieGramConfig
    ):
        super().__init__()
        C = encoder.config.hidden_size
        Cg = generator.config.hidden_size
        classes = config.vocab_size + config.lexicon_size
        self.config = config
        self.encoder = encoder
        self.generator = generator
        # explicit n-gram identities as inputs: what a sampled lexicon n-gram looks like
        self.ngram_embeddings = nn.Embedding(max(config.lexicon_size, 1), C)
        self.coarse_head = PredictionHead(C, classes)
        self.slot_embeddings = nn.Embedding(config.max_n, C)  # e_s of the fine slots
        self.fine_head = PredictionHead(C, config.vocab_size)
        self.generator_head = PredictionHead(Cg, classes)
        nn.init.normal_(self.ngram_embeddings.weight, std=0.02)
        nn.init.normal_(self.slot_embeddings.weight, std=0.02)

    def identity_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of coarse identities (M,) -> (M, C): tokens use the encoder's own
        embedding table, lexicon n-grams the explicit n-gram table."""
        V = self.config.vocab_size
        words = self.encoder.get_input_embeddings()
        is_gram = ids >= V
        token_emb = words(ids.clamp(max=V - 1))
        gram_emb = self.ngram_embeddings((ids - V).clamp(min=0))
        return torch.where(is_gram[:, None], gram_emb, token_emb)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        masked_index: torch.Tensor,
        coarse_labels: torch.Tensor,
        fine_labels: torch.Tensor,
        sample_generator: torch.Generator | None = None,
    ) -> ErnieGramOutput:
        """Tensors of an ErnieGramBatch (shapes there); sample_generator fixes the generator's
        samples and the replace draws (CPU generator)."""
        M = masked_index.numel()
        if M == 0:  # every loss would be a mean over nothing: NaN
            raise ValueError("the batch has no masked slot (were all its tokens protected?)")
        if coarse_labels.shape != (M,) or fine_labels.shape != (M, self.config.max_n):
            raise ValueError(
                f"expected coarse_labels ({M},) and fine_labels ({M}, {self.config.max_n}), "
                f"received {tuple(coarse_labels.shape)} and {tuple(fine_labels.shape)}"
            )
        # 1. the generator: coarse prediction on the [MASK] input, then a sample per slot
        g = self.generator(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, T, Cg)
        generator_logits = self.generator_head(g.flatten(0, 1)[masked_index])  # (M, V + K)
        generator_loss = F.cross_entropy(generator_logits.float(), coarse_labels)
        sampled = sample_from_logits(generator_logits, sample_generator)  # (M,), no gradient
        draws = torch.rand(M, generator=sample_generator).to(input_ids.device)
        replaced = draws < self.config.replace_prob
        # 2. the main encoder sees the samples in place of [MASK] where replaced
        embeds = self.encoder.get_input_embeddings()(input_ids)  # (B, T, C)
        flat = embeds.flatten(0, 1)
        slot_in = torch.where(
            replaced[:, None], self.identity_embeddings(sampled).to(flat.dtype), flat[masked_index]
        )
        embeds = flat.index_put((masked_index,), slot_in).view_as(embeds)
        h = self.encoder(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, T, C)
        hm = h.flatten(0, 1)[masked_index]  # (M, C)
        # 3. coarse: the unit's identity; fine: its tokens, one slot each
        coarse_logits = self.coarse_head(hm)  # (M, V + K)
        coarse_loss = F.cross_entropy(coarse_logits.float(), coarse_labels)
        fine_logits = self.fine_head(hm[:, None, :] + self.slot_embeddings.weight)  # (M, n, V)
        fine_loss = F.cross_entropy(
            fine_logits.flatten(0, 1).float(), fine_labels.flatten(), ignore_index=IGNORE_INDEX
        )
        cfg = self.config
        loss = coarse_loss + cfg.fine_weight * fine_loss + cfg.generator_weight * generator_loss
        return ErnieGramOutput(
            loss=loss,
            coarse_loss=coarse_loss,
            fine_loss=fine_loss,
            generator_loss=generator_loss,
            coarse_logits=coarse_logits,
            fine_logits=fine_logits,
            generator_logits=generator_logits,
            sampled_ids=sampled,
            replaced=replaced,
        )

    def head_state_dict(self) -> dict[str, Any]:
        """Everything but the two encoders (which save themselves with save_pretrained)."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith(("encoder.", "generator."))
        }
