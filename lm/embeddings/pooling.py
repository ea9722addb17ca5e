"""Sentence embeddings from any Hugging Face causal LM or encoder: pooling and prompting.

    from lm.embeddings import LMEmbedder
    embedder = LMEmbedder.from_source("smollm2-135m-instruct", pooling="last", prompt="prompteol")
    embedder.encode(["A red circle.", "Two blue squares."])        # (2, 576), unit rows

    embedder = LMEmbedder(model, tokenizer, pooling="mean")        # a model you already hold

Poolings (the LLM-embedding survey's menu, REFERENCE.md "LLM embeddings"), over the hidden states
h_1..h_L of one text's L real tokens at ``layer``:

- ``mean``: (1/L) sum_i h_i.
- ``last``: h_L, the last real token (a causal LM's only token that has read the whole text).
- ``weighted_mean``: sum_i w_i h_i with w_i = i / sum_j j (SGPT's position weights: later tokens,
  which have read more of the text, weigh more).
- ``eos``: h of an end-of-sequence token appended to the text (the tokenizer's EOS, else its SEP;
  not appended again when the tokenizer already ends every sequence with it, as BERT's [SEP]), so
  for a BERT-style encoder ``eos`` and ``last`` read the same token.

Prompts (``prompt=``): ``None`` embeds the text as is; ``"prompteol"`` wraps it in PromptEOL's
template ``This sentence : "<text>" means in one word:"`` (pair it with ``pooling="last"``: the
next-token state after the template is the one-word summary); any other string containing
``{text}`` is used as a template.

Padding: a batch may be padded on either side (``padding_side``, default the tokenizer's). Every
index is derived from the attention mask, never from the side: the last real token is the last
1 of the mask, token i's position is the running count of 1s, and ``position_ids`` (cumsum of the
mask - 1) are passed to models that take them, so absolute-position models (BERT, OPT, GPT-2) see
the same positions left-padded as unpadded. Padded states are zeroed before pooling (a
fully-masked attention row may hold NaN).

Long texts are truncated inside the template: the text is cut to fit ``max_length`` tokens and the
template (and appended EOS) is kept whole, so the pooled token is still the template's last.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.runtime import resolve_dtype
from core.sources import resolve_source
from lm.loading import load_tokenizer

__all__ = [
    "POOLINGS",
    "PROMPTS",
    "LMEmbedder",
    "format_prompt",
    "last_token_index",
    "pool",
    "position_weights",
]

POOLINGS: tuple[str, ...] = ("mean", "last", "weighted_mean", "eos")
PROMPTS: dict[str, str] = {
    # PromptEOL (Jiang et al. 2023), as REFERENCE.md quotes it; {text} is the sentence.
    "prompteol": 'This sentence : "{text}" means in one word:"',
}


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; valid poolings: {list(POOLINGS)}")


def _check_mask(attention_mask: torch.Tensor) -> None:
    if attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be (B, T), received shape {tuple(attention_mask.shape)}"
        )
    empty = torch.nonzero(attention_mask.sum(-1) == 0).flatten()
    if empty.numel():
        raise ValueError(
            f"every row needs at least one real token; rows {empty.tolist()} have none"
        )


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token, whichever side the padding is on.

    attention_mask: (B, T), 1 = real token.
    """
    _check_mask(attention_mask)
    T = attention_mask.shape[1]
    # argmax returns the first maximum: on the flipped mask that is the last 1.
    return T - 1 - (attention_mask.flip(-1) > 0).int().argmax(-1)


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1-based position of every real token among its row's real tokens; 0 on padding."""
    mask = (attention_mask > 0).long()
    return mask.cumsum(-1) * mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) model position ids: 0 at each row's first real token; padding gets 0."""
    return (token_positions(attention_mask) - 1).clamp(min=0)


def position_weights(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) SGPT weights w_i = i / sum_j j over each row's real tokens (i = 1..L); 0 on padding.

    attention_mask: (B, T), 1 = real token. Each row sums to 1.
    """
    _check_mask(attention_mask)
    pos = token_positions(attention_mask).float()
    return pos / pos.sum(-1, keepdim=True)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states into one vector per row.

    hidden: (B, T, D) token states; attention_mask: (B, T), 1 = real token.
    pooling: one of POOLINGS (``eos`` reads the last real token: its input ends with EOS).
    Returns (B, D) float32.
    """
    _check_pooling(pooling)
    _check_mask(attention_mask)
    if hidden.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"hidden (B, T, D) = {tuple(hidden.shape)} and attention_mask (B, T) = "
            f"{tuple(attention_mask.shape)} do not match"
        )
    real = (attention_mask > 0).unsqueeze(-1)  # (B, T, 1)
    h = torch.where(real, hidden.float(), 0.0)  # (B, T, D), NaN-safe unlike h * mask
    if pooling == "mean":
        return h.sum(1) / real.sum(1)
    if pooling == "weighted_mean":
        return (position_weights(attention_mask).unsqueeze(-1) * h).sum(1)
    rows = torch.arange(h.shape[0], device=h.device)
    return h[rows, last_token_index(attention_mask)]  # last, eos


def format_prompt(text: str, prompt: str | None) -> str:
    """The text the model reads: `text` itself, or a template of PROMPTS / one with ``{text}``."""
    if prompt is None:
        return text
    template = PROMPTS.get(prompt, prompt)
    if "{text}" not in template:
        raise ValueError(
            f"prompt must be one of {sorted(PROMPTS)} or a template containing '{{text}}', "
            f"received {prompt!r}"
        )
    return template.replace("{text}", text)


class LMEmbedder(nn.Module):
    """Sentence embeddings from a Hugging Face model's hidden states (see the module docstring).

    model: any HF causal LM or encoder; its base model (no LM head) is run. The caller decides its
        dtype, device, mode and freezing (call ``eval()`` for inference: dropout stays as set).
    pooling: one of POOLINGS. prompt: None, a PROMPTS name or a ``{text}`` template.
    layer: which hidden state to pool: 0 = the embedding output, -1 = the last layer.
    normalize: L2-normalise what ``encode`` returns.
    max_length: tokens per text, template and special tokens included.
    padding_side: "left" | "right"; None = the tokenizer's.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pooling: str = "mean",
        prompt: str | None = None,
        layer: int = -1,
        normalize: bool = True,
        max_length: int = 512,
        padding_side: str | None = None,
    ):
        super().__init__()
        _check_pooling(pooling)
        format_prompt("", prompt)  # validates the template
        side = padding_side or tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', received {side!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.prompt = prompt
        self.normalize = normalize
        self.max_length = max_length
        self.padding_side = side
        self.num_layers = int(model.config.num_hidden_layers)
        if not -(self.num_layers + 1) <= layer <= self.num_layers:
            raise ValueError(
                f"layer must be in [-{self.num_layers + 1}, {self.num_layers}] for a model with "
                f"{self.num_layers} layers, received {layer}"
            )
        self.layer = layer
        self.eos_token_id: int | None = None
        if pooling == "eos":
            eos = tokenizer.eos_token_id
            eos = tokenizer.sep_token_id if eos is None else eos
            if eos is None:
                raise ValueError("eos pooling needs a tokenizer with an EOS (or SEP) token")
            self.eos_token_id = int(eos)
        pad = tokenizer.pad_token_id
        pad = tokenizer.eos_token_id if pad is None else pad
        self.pad_token_id = int(pad) if pad is not None else 0  # masked out: any id would do
        backbone = cast(nn.Module, getattr(model, "base_model", model))
        self.backbone = backbone
        params = inspect.signature(backbone.forward).parameters
        self._extra_kwargs: dict[str, Any] = {}
        self._takes_position_ids = "position_ids" in params
        if "use_cache" in params:
            self._extra_kwargs["use_cache"] = False
        overhead = len(self._finish_ids(self.tokenizer(format_prompt("", prompt))["input_ids"]))
        if overhead >= max_length:
            raise ValueError(
                f"max_length {max_length} leaves no room for text: the template and special "
                f"tokens alone take {overhead} tokens"
            )
        self._text_budget = max_length - overhead

    @classmethod
    def from_source(
        cls, source: str, *, dtype: str | torch.dtype = "fp32", device: str = "cpu", **kwargs: Any
    ) -> LMEmbedder:
        """Load a model source (core.sources spec) with ``AutoModel`` (no LM head), in eval mode
        with gradients off, and its tokenizer; ``kwargs`` go to ``LMEmbedder``."""
        name, load_kwargs = resolve_source(source).pretrained_args()
        model = AutoModel.from_pretrained(name, dtype=resolve_dtype(dtype), **load_kwargs)
        cast(Any, model).to(device)
        model.requires_grad_(False)
        model.eval()
        return cls(model, load_tokenizer(source), **kwargs)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------------------------------
    # Tokens

    def _finish_ids(self, ids: list[int]) -> list[int]:
        if self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
            ids = [*ids, self.eos_token_id]
        return ids

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text as the model reads it: prompted, truncated, EOS appended."""
        texts = list(texts)
        budget = self._text_budget
        out: list[list[int]] = []
        for text in texts:
            b = budget
            while True:
                # budget + 1 tokens tell whether the text is longer than the budget
                cut = self.tokenizer(
                    text, add_special_tokens=False, truncation=True, max_length=b + 1
                )["input_ids"]
                short = text if len(cut) <= b else str(self.tokenizer.decode(cut[:b]))
                ids = self._finish_ids(
                    self.tokenizer(format_prompt(short, self.prompt))["input_ids"]
                )
                if len(ids) <= self.max_length:
                    break
                # re-tokenising the cut text inside the template merged differently: cut more
                b -= len(ids) - self.max_length
                if b < 1:
                    raise ValueError(f"cannot fit {text[:40]!r}... into {self.max_length} tokens")
            out.append(ids)
        return out

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, T) padded on ``padding_side``.

        Padded here rather than by tokenizer.pad so that the side is this embedder's choice.
        """
        if not ids or any(len(row) == 0 for row in ids):
            raise ValueError("expected non-empty token sequences")
        T = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, row in enumerate(ids):
            span = slice(T - len(row), T) if self.padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.as_tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return input_ids, mask

    # ---------------------------------------------------------------------------------------
    # Forward

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Every layer's token states, (B, T, D) each: index 0 = embeddings, -1 = last layer."""
        _check_mask(attention_mask)
        kwargs = dict(self._extra_kwargs)
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            return_dict=True,
            **kwargs,
        )
        states = tuple(out.hidden_states)
        if len(states) != self.num_layers + 1:
            raise ValueError(
                f"expected {self.num_layers + 1} hidden states (embeddings + each layer), "
                f"received {len(states)}"
            )
        return states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(L + 1, B, D) the pooled, unnormalised embedding at every layer (0 = embeddings).

        input_ids, attention_mask: (B, T), as ``pad(token_ids(texts))`` gives them.
        Differentiable: training code (lm.embeddings.matryoshka2d) calls this.
        """
        states = self.hidden_states(input_ids, attention_mask)
        return torch.stack([pool(h, attention_mask, self.pooling) for h in states])

    def _batches(
        self, texts: Sequence[str], batch_size: int, progress: bool
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Run ``forward`` over length-sorted batches (little padding); returns the order and
        each batch's (L + 1, b, D) output."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, received {batch_size}")
        if len(texts) == 0:
            raise ValueError("expected at least one text, received none")
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        outs = []
        starts = range(0, len(order), batch_size)
        with torch.no_grad():
            for s in tqdm(starts, desc="encode", disable=not progress, leave=False):
                chunk = [ids[i] for i in order[s : s + batch_size]]
                input_ids, mask = self.pad(chunk)
                outs.append(self(input_ids.to(self.device), mask.to(self.device)).cpu())
        return order, outs

    def encode_layers(
        self, texts: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> torch.Tensor:
        """(L + 1, N, D) float32 pooled embeddings of every layer, unnormalised, in text order."""
        order, outs = self._batches(texts, batch_size, progress)
        stacked = torch.cat(outs, dim=1)  # (L + 1, N, D) in sorted order
        result = torch.empty_like(stacked)
        result[:, torch.as_tensor(order)] = stacked
        return result

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> torch.Tensor:
        """(N, D) float32 embeddings at ``layer``, L2-normalised when ``normalize``."""
        emb = self.encode_layers(texts, batch_size, progress)[self.layer]
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb
