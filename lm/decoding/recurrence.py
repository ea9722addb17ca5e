"""Recurrence across fixed windows: a learned memory carries a state from one window to the next.

    memory = RecurrentMemory.for_model(model, n_memory=8)
    logits, state = window_forward(model, memory, window_ids, state=None)    # first window
    logits, state = window_forward(model, memory, next_ids, state=state)     # carries the state
    nll = windowed_nll(model, memory, ids, window=64)                         # (B, n_windows)
    new_ids = recurrent_generate(model, memory, input_ids, window=64, max_new_tokens=32, ...)

The thesis (Yoshida, arXiv 2408.16241; Yoshida, Ettinger & Gimpel, "Adding Recurrence to
Pretrained Transformers for Improved Efficiency and Context Size", 2020) fine-tunes a pretrained
decoder with a small recurrence module so that it reads text in fixed windows and passes a state
from each window to the next, which removes the fixed context size and lowers memory. Our
module, written by hand (no library carries a state across windows of an HF model), is the
smallest form of that idea:

    s_k = A + W_o MHA(Q, LN(H_{k-1}), LN(H_{k-1}))     (s_k: n_memory vectors, (M, D))
    window k is run on [s_k ; x_{kW+1..(k+1)W}] (inputs_embeds), s_1 = none

H_{k-1} is the hidden states (layer `source_layer`, memory positions included) of window k-1; Q
are M learned queries, MHA is torch's MultiheadAttention, A (M, D) starts as M copies of a real
token's embedding (EOS by default) and W_o starts at zero: an untrained memory reads to the model
like a document boundary before the window, not like M random vectors. Because H_{k-1} includes
s_{k-1}, the state can carry information further than one window back. Training
(train/decoding_recurrence.py) back-propagates through the windows of a training row (the first
window's forward needs no gradient); the base model can stay frozen (only the module learns) or
be fine-tuned with it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import load_checkpoint, load_state_strict

__all__ = [
    "RecurrentMemory",
    "load_recurrent_memory",
    "recurrent_generate",
    "window_forward",
    "windowed_nll",
]


class RecurrentMemory(nn.Module):
    """Pools a window's hidden states (B, T, D) into the next window's memory (B, M, D)."""

    def __init__(
        self,
        anchor: torch.Tensor,  # (D,) the embedding every memory vector starts from
        n_memory: int = 8,
        num_heads: int = 4,
        source_layer: int = -1,
    ):
        super().__init__()
        if n_memory < 1:
            raise ValueError(f"n_memory must be >= 1, received {n_memory}")
        if anchor.dim() != 1:
            raise ValueError(f"anchor must be one (D,) embedding, received {tuple(anchor.shape)}")
        D = anchor.shape[0]
        self.n_memory = n_memory
        self.source_layer = source_layer  # index into the model's output hidden_states
        self.anchor = nn.Parameter(anchor.detach().float().clone().expand(n_memory, D).clone())
        self.queries = nn.Parameter(torch.randn(n_memory, D) * D**-0.5)
        self.norm = nn.LayerNorm(D)
        self.attention = nn.MultiheadAttention(D, num_heads, batch_first=True)
        self.out = nn.Linear(D, D)
        nn.init.zeros_(self.out.weight)  # an untrained memory is M copies of the anchor token
        nn.init.zeros_(self.out.bias)

    @classmethod
    def for_model(
        cls,
        model: Any,
        n_memory: int = 8,
        num_heads: int = 4,
        source_layer: int = -1,
        anchor_token_id: int | None = None,
    ) -> RecurrentMemory:
        """A module sized for `model`, anchored at the embedding of anchor_token_id (default the
        model's EOS: our packed text separates documents with it, so a window after an untrained
        memory reads like a window after a document boundary)."""
        weight = model.get_input_embeddings().weight
        if anchor_token_id is None:
            anchor_token_id = getattr(model.config, "eos_token_id", None)
            if isinstance(anchor_token_id, list):
                anchor_token_id = anchor_token_id[0]
        anchor = weight[anchor_token_id] if anchor_token_id is not None else weight.mean(0)
        memory = cls(anchor, n_memory, num_heads, source_layer)
        return memory.to(weight.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, M, D)
        kv = self.norm(hidden.float())
        q = self.queries.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        pooled, _ = self.attention(q, kv, kv, need_weights=False)
        return self.anchor + self.out(pooled)


def load_recurrent_memory(path: str | os.PathLike[str], model: Any) -> RecurrentMemory:
    """The memory module train/decoding_recurrence.py saved in `path` (its stages/memory folder)
    for `model`; a checkpoint trained with --finetune-model also loads the model's weights."""
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    memory = RecurrentMemory.for_model(
        model, cfg["memory"], cfg["memory_heads"], cfg["source_layer"]
    )
    target: nn.Module = (
        nn.ModuleDict({"memory": memory, "model": model}) if cfg.get("finetune_model") else memory
    )
    load_state_strict(target, ckpt.tensors["model"], what=str(path))
    return memory.eval()


def window_forward(
    model: Any,
    memory: RecurrentMemory,
    ids: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one window ids (B, W) after the carried state (B, M, D) or none.

    Returns (logits (B, W, V) where logits[:, t] predicts token t + 1 and, with a state,
    position -1 of the state predicts token 0: logits (B, W + 1, V) then), the next state).
    """
    embeds = model.get_input_embeddings()(ids)  # (B, W, D)
    if state is not None:
        embeds = torch.cat([state.to(embeds.dtype), embeds], dim=1)
    out = model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
    start = memory.n_memory - 1 if state is not None else 0
    return out.logits[:, start:], memory(out.hidden_states[memory.source_layer])


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, with_state: bool) -> torch.Tensor:
    """(B, W - 1) NLL of tokens 1..W-1 of the window (token 0 is not scored, so that windows
    with and without a state score the same tokens)."""
    lg = logits[:, 1:-1] if with_state else logits[:, :-1]
    return F.cross_entropy(lg.float().transpose(1, 2), ids[:, 1:], reduction="none")


def windowed_nll(
    model: Any,
    memory: RecurrentMemory | None,
    ids: torch.Tensor,
    window: int,
    *,
    states: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean NLL per window (B, n_windows) of ids (B, n_windows * window), tokens 1..W-1 of every
    window scored. memory None: every window alone (the fixed-window model). With a memory the
    state is carried from window to window, unless `states` is given: then window k + 1 uses
    states[k] (e.g. the states of other rows, a control). Returns (nll, the carried states)."""
    T = ids.shape[1]
    if T % window or T // window < 1:
        raise ValueError(f"ids length {T} must be a positive multiple of window {window}")
    nll, carried = [], []
    state = None
    for k in range(T // window):
        chunk = ids[:, k * window : (k + 1) * window]
        if memory is None:
            logits = model(input_ids=chunk, use_cache=False).logits
            nll.append(_window_nll(logits, chunk, False).mean(dim=1))
            continue
        if states is not None and k > 0:
            state = states[k - 1]
        logits, next_state = window_forward(model, memory, chunk, state)
        nll.append(_window_nll(logits, chunk, state is not None).mean(dim=1))
        carried.append(next_state)
        state = next_state
    return torch.stack(nll, dim=1), carried


@torch.no_grad()
def recurrent_generate(
    model: Any,
    memory: RecurrentMemory,
    input_ids: torch.Tensor,
    *,
    window: int,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Generate after the prompt input_ids (1, T) reading and writing in windows of `window`
    tokens: full windows are folded into the state, the current window is generated into with
    model.generate(inputs_embeds=[state ; window so far]); when it fills, it is folded too.
    Returns the new tokens (1, N), N <= max_new_tokens (stops after EOS)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (1, T >= 1), received {tuple(input_ids.shape)}")
    if window < 2 or max_new_tokens < 1:
        raise ValueError(
            f"window must be >= 2 and max_new_tokens >= 1, received {window}, {max_new_tokens}"
        )
    tokens = input_ids[0].tolist()
    state = None
    while len(tokens) >= window:  # fold every full window of the prompt
        chunk, tokens = tokens[:window], tokens[window:]
        _, state = window_forward(
            model, memory, torch.tensor([chunk], device=input_ids.device), state
        )
    new: list[int] = []
    embedding = model.get_input_embeddings()
    while len(new) < max_new_tokens:
        parts = [] if state is None else [state.to(embedding.weight.dtype)]
        if tokens:
            parts.append(embedding(torch.tensor([tokens], device=input_ids.device)))
        embeds = torch.cat(parts, dim=1)
        room = min(window - len(tokens), max_new_tokens - len(new))
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            max_new_tokens=room,
            eos_token_id=eos_token_id,
            **generate_kwargs,
        )
        step = out[0, -room:].tolist() if out.shape[1] > room else out[0].tolist()
        if eos_token_id is not None and eos_token_id in step:
            new += step[: step.index(eos_token_id) + 1]
            break
        new += step
        tokens += step
        if len(tokens) >= window:
            chunk, tokens = tokens[:window], tokens[window:]
            ids = torch.tensor([chunk], device=input_ids.device)
            _, state = window_forward(model, memory, ids, state)
    return torch.tensor([new], dtype=torch.long, device=input_ids.device)
