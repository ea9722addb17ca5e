"""Hidden-state optimisation (HSO): gradient steps on the cached past key/value states.

    result = optimise_hidden_states(model, input_ids, recent_tokens=64, steps=4, lr=3e-3)
    result.context_nll                      # recent-part NLL before each step, then after the last
    out = model.generate(input_ids=input_ids, cache=result.cache(), max_new_tokens=32)

Yoshida & Gimpel, "Reconsidering the Past: Optimizing Hidden States in Language Models"
(Findings of EMNLP 2021; chapter of the thesis arXiv 2408.16241). Like dynamic evaluation, HSO
takes the gradient of the log-probability the LM assigns to text it has already seen, but applies
it to the cached hidden states instead of the weights. With the context split into a cached past
x_1..x_p (key/value states H = {K_l, V_l} for every layer l) and a recent part x_{p+1}..x_n, we
follow the paper's objective and update

    L(H) = - (1 / (n - p - 1)) * sum_{t=p+2}^{n} log p(x_t | x_{p+1..t-1}; H)       (HSO loss)
    H <- Adam(H, grad_H L(H))                                                       (HSO update)

for `steps` steps; the weights never change. The paper adapts Adam with separate moment
estimates for every hidden state: torch.optim.Adam over the cached tensors keeps exactly that
(element-wise moments). The prediction that follows runs the recent part again on the updated
H, so its states are recomputed from the optimised past.

The first recent token is not in the loss: its prediction comes from the last past position's
own forward pass, which the cache does not determine. Works on any Hugging Face causal LM that
returns a transformers ``Cache`` (DynamicCache layers with ``keys`` / ``values``); the caller
decides dtype and device. Gradients are taken with ``torch.autograd.grad`` on the cache tensors
only, so the model's parameters get no ``.grad``; inside ``torch.inference_mode`` (the app's
generate thread) HSO switches inference mode off locally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

__all__ = ["HSOResult", "cache_nll", "hso_generate", "optimise_hidden_states"]

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, nkv, T, hd)


@dataclass
class HSOResult:
    """Optimised past states of input_ids[:, :past_length]."""

    key_values: KeyValues  # detached, per layer (keys, values), each (B, n_kv_heads, p, head_dim)
    past_length: int  # p: tokens the states cover
    context_nll: list[float] = field(default_factory=list)  # mean recent-part NLL per step + final
    config: Any = None  # the model config (DynamicCache needs it for sliding-window layers)

    def cache(self) -> DynamicCache:
        """A fresh DynamicCache holding copies of the states (a forward pass appends to a cache,
        so every use needs its own)."""
        return _make_cache([(k.clone(), v.clone()) for k, v in self.key_values], self.config)


def _make_cache(key_values: KeyValues, config: Any) -> DynamicCache:
    return DynamicCache(key_values, config=config)


def _key_values(cache: Any) -> KeyValues:
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") for layer in layers):
        raise ValueError(
            "HSO needs a transformers Cache with per-layer keys/values (DynamicCache); "
            f"the model returned {type(cache).__name__}"
        )
    return [(layer.keys, layer.values) for layer in layers]


def _pairs(leaves: list[torch.Tensor]) -> KeyValues:
    return list(zip(leaves[0::2], leaves[1::2], strict=True))


def _model_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_nll(
    model: Any, key_values: KeyValues, ids: torch.Tensor, score_from: int = 1
) -> torch.Tensor:
    """Per-row mean next-token NLL (B,) of ids (B, T) run on top of the cached states, scoring
    the tokens ids[:, score_from:] (each predicted from the position before it)."""
    if not 1 <= score_from < ids.shape[1]:
        raise ValueError(f"score_from must be in [1, {ids.shape[1] - 1}], received {score_from}")
    out = model(input_ids=ids, cache=_make_cache(key_values, model.config), use_cache=True)
    logits = out.logits[:, score_from - 1 : -1].float()  # (B, T - score_from, V)
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, score_from:], reduction="none")
    return nll.mean(dim=1)


def optimise_hidden_states(
    model: Any,
    input_ids: torch.Tensor,
    *,
    recent_tokens: int = 64,
    steps: int = 4,
    lr: float = 3e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    on_step: Callable[[int, KeyValues], None] | None = None,
) -> HSOResult:
    """Cache input_ids[:, :-recent_tokens] and take `steps` Adam steps on its key/value states to
    lower the NLL of the last `recent_tokens` tokens (the HSO loss above).

    input_ids: (B, T) with T > recent_tokens >= 2. Returns the optimised states and the recent
    part's mean NLL before each step and after the last one (steps + 1 values). on_step(s, kv)
    is called after step s = 1..steps with the current states (detached; do not modify them).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), received shape {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if not 2 <= recent_tokens < T:
        raise ValueError(
            f"recent_tokens must be in [2, T - 1] = [2, {T - 1}] (a past to optimise and at "
            f"least one scored token), received {recent_tokens}"
        )
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, received steps={steps}, lr={lr}")
    past_length = T - recent_tokens
    # Inference mode (the app's generate thread) forbids autograd; HSO needs it, locally.
    with torch.inference_mode(False), torch.enable_grad():
        ids = input_ids.clone()
        past, recent = ids[:, :past_length], ids[:, past_length:]
        with torch.no_grad():
            initial = _key_values(_model_cache(model(input_ids=past, use_cache=True)))
        leaves = [
            t.detach().clone().requires_grad_(True) for pair in initial for t in pair
        ]  # [K_0, V_0, K_1, V_1, ...]
        optimiser = torch.optim.Adam(leaves, lr=lr, betas=betas)
        history: list[float] = []
        for _ in range(steps):
            loss = cache_nll(model, _pairs(leaves), recent).mean()
            history.append(float(loss.detach()))
            grads = torch.autograd.grad(loss, leaves)
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.grad = grad
            optimiser.step()
            if on_step is not None:
                with torch.no_grad():
                    on_step(len(history), [(k.detach(), v.detach()) for k, v in _pairs(leaves)])
        final = [(k.detach(), v.detach()) for k, v in _pairs(leaves)]
        with torch.no_grad():
            history.append(float(cache_nll(model, final, recent).mean()))
    return HSOResult(final, past_length, history, model.config)


def hso_generate(
    model: Any,
    input_ids: torch.Tensor,
    *,
    recent_tokens: int = 64,
    steps: int = 4,
    lr: float = 3e-3,
    **generate_kwargs: Any,
) -> tuple[torch.Tensor, HSOResult | None]:
    """HSO on the prompt, then `model.generate` from the optimised cache.

    input_ids: (B, T). recent_tokens is capped to T - 1 for short prompts; a prompt of fewer
    than 3 tokens has nothing to optimise and is generated from plainly. Returns (the generate
    output (B, T + N) as model.generate returns it, the HSO result or None).
    """
    T = input_ids.shape[1]
    attention_mask = generate_kwargs.pop("attention_mask", None)
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("hso_generate needs unpadded prompts (an all-ones attention_mask)")
    attention_mask = torch.ones_like(input_ids)
    if T < 3 or steps == 0:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        return out, None
    recent = min(recent_tokens, T - 1)
    result = optimise_hidden_states(model, input_ids, recent_tokens=recent, steps=steps, lr=lr)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, cache=result.cache(), **generate_kwargs
    )
    return out, result
