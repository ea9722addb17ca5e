"""Mixture-of-experts feed-forward: a drop-in replacement for the FFN of any transformer block.

    moe = build_moe(MoEConfig(num_experts=8, top_k=2), hidden_size=512,
                    make_expert=lambda: MyFFN(512, 1024))
    out = moe(x)                                   # x (B, T, C)
    y = out.hidden_states                          # (B, T, C)
    loss = lm_loss + cfg.aux_loss_coef * out.aux_loss + cfg.z_loss_coef * out.z_loss

Routing (Mixtral / Switch Transformer): router logits z = W_r x (N, E); p = softmax(z); each
token goes to its top-k experts with weights p_topk / sum(p_topk) (renormalised over the chosen
k; `renormalize=False` keeps the raw probabilities, as Switch does for k = 1). Losses:

* load balancing (Switch eq. 4, Mixtral): aux = E * sum_e f_e P_e, with f_e the fraction of
  tokens routed to expert e (among their k; so sum_e f_e = k) and P_e the mean router
  probability of e. aux = k when routing is uniform, its minimum: Switch's loss for k = 1, and
  Mixtral's convention for k > 1 (transformers' load_balancing_loss_func; the tests compare).
  Until session 23 f_e was divided by k as well (minimum 1), which gave a top-2 router half of
  Mixtral's pressure at the same coefficient. A model with several MoE layers (lm.tnl) averages
  the layers' losses, where transformers pools every layer's routing into one loss: the same for
  one layer; the mean also sees an imbalance that pooling lets cancel across layers.
* router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(z)^2, keeps logits small.

An optional shared expert (Qwen1.5-MoE) sees every token; its output is added, optionally scaled
by a sigmoid gate sigmoid(w_g . x) per token.

With renormalize=True and top_k = 1 each token's weight is exactly 1, so the LM loss sends no
gradient to the router; only the auxiliary losses train it. Use renormalize=False for top-1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.config import Config

__all__ = [
    "MoEConfig",
    "MoEFeedForward",
    "MoEOutput",
    "RouterOutput",
    "TopKRouter",
    "build_moe",
    "load_balancing_loss",
    "router_z_loss",
]


@dataclass
class MoEConfig(Config):
    """A mixture-of-experts FFN; in a TNL model it replaces the SGLU of every `every`-th layer."""

    num_experts: int = 8  # E routed experts (Mixtral: 8)
    top_k: int = 2  # experts per token (Mixtral: 2)
    expert_intermediate_size: int | None = None  # hidden width of each expert; None: the FFN's
    shared_expert_intermediate_size: int = 0  # width of the always-on shared expert; 0: none
    shared_expert_gated: bool = True  # scale the shared expert by sigmoid(w_g . x) (Qwen-MoE)
    renormalize: bool = True  # weights p_topk / sum(p_topk) (Mixtral); False: raw p (Switch)
    every: int = 1  # MoE in layers l with (l + 1) % every == 0; 1: every layer
    aux_loss_coef: float = 0.001  # load-balancing loss coefficient (Mixtral default)
    z_loss_coef: float = 0.0  # router z-loss coefficient (ST-MoE uses 1e-3)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, received {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], received {self.top_k}"
            )
        if self.expert_intermediate_size is not None and self.expert_intermediate_size < 1:
            raise ValueError(
                "expert_intermediate_size must be None or >= 1, received "
                f"{self.expert_intermediate_size}"
            )
        if self.shared_expert_intermediate_size < 0:
            raise ValueError(
                "shared_expert_intermediate_size must be >= 0, received "
                f"{self.shared_expert_intermediate_size}"
            )
        if self.every < 1:
            raise ValueError(f"every must be >= 1, received {self.every}")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError(
                "aux_loss_coef and z_loss_coef must be >= 0, received "
                f"{self.aux_loss_coef} and {self.z_loss_coef}"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` (0-based) gets the MoE FFN."""
        return (layer_idx + 1) % self.every == 0


@dataclass
class RouterOutput:
    logits: torch.Tensor  # (N, E) raw router logits, fp32
    probs: torch.Tensor  # (N, E) softmax(logits)
    weights: torch.Tensor  # (N, k) combine weights of the chosen experts
    experts: torch.Tensor  # (N, k) indices of the chosen experts, long


@dataclass
class MoEOutput:
    hidden_states: torch.Tensor  # (B, T, C)
    aux_loss: torch.Tensor  # () E * sum_e f_e P_e, k at uniform routing
    z_loss: torch.Tensor  # () mean logsumexp(logits)^2
    expert_load: torch.Tensor  # (E,) routing slots per expert (counts all k choices), long
    router_logits: torch.Tensor  # (N, E)


class TopKRouter(nn.Module):
    """Linear router with top-k softmax gating."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], received {top_k}")
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x (N, C) -> RouterOutput. Softmax and top-k run in fp32 (router precision, ST-MoE)."""
        logits = self.proj(x).float()
        probs = logits.softmax(dim=-1)
        top_p, experts = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if self.renormalize else top_p
        return RouterOutput(logits=logits, probs=probs, weights=weights, experts=experts)


def load_balancing_loss(
    probs: torch.Tensor, experts: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """E * sum_e f_e P_e (module docstring; k at uniform routing). probs (N, E); experts (N, k);
    token_mask (N,) bool or None -> ()."""
    N, E = probs.shape
    if token_mask is None:
        token_mask = torch.ones(N, dtype=torch.bool, device=probs.device)
    weight = token_mask.to(probs.dtype)  # (N,)
    count = weight.sum().clamp(min=1.0)
    one_hot = F.one_hot(experts, E).to(probs.dtype)  # (N, k, E)
    # f_e: share of the N tokens routed to e (non-differentiable, as in Switch); sums to k.
    f = (one_hot.sum(dim=1) * weight[:, None]).sum(dim=0) / count
    P = (probs * weight[:, None]).sum(dim=0) / count
    return E * (f * P).sum()


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2. logits (N, E); token_mask (N,) or None -> ()."""
    z = torch.logsumexp(logits, dim=-1) ** 2
    if token_mask is None:
        return z.mean()
    weight = token_mask.to(z.dtype)
    return (z * weight).sum() / weight.sum().clamp(min=1.0)


class MoEFeedForward(nn.Module):
    """Routed experts plus an optional shared expert; tensors in, MoEOutput out."""

    def __init__(
        self,
        router: TopKRouter,
        experts: nn.ModuleList,
        shared_expert: nn.Module | None = None,
        shared_gate: nn.Linear | None = None,
    ):
        super().__init__()
        if len(experts) != router.num_experts:
            raise ValueError(
                f"router has {router.num_experts} experts but {len(experts)} expert modules "
                "were given"
            )
        if shared_gate is not None and shared_expert is None:
            raise ValueError("shared_gate given without a shared_expert")
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_gate = shared_gate

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> MoEOutput:
        """x (B, T, C); token_mask (B, T) with 1 for real tokens (padding is left out of the
        balancing statistics, not of the computation) -> MoEOutput."""
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        mask = None if token_mask is None else token_mask.reshape(B * T).bool()
        route = self.router(flat)
        out = torch.zeros_like(flat)
        # Dispatch per expert: gather the tokens that chose e (in any of their k slots), run the
        # expert once on them, scatter-add the weighted outputs back.
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.nonzero(route.experts == e, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            w = route.weights[token_idx, slot].to(x.dtype)[:, None]
            out.index_add_(0, token_idx, expert(flat[token_idx]) * w)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        load = torch.bincount(route.experts.flatten(), minlength=self.router.num_experts)
        return MoEOutput(
            hidden_states=out.reshape(B, T, C),
            aux_loss=load_balancing_loss(route.probs, route.experts, mask),
            z_loss=router_z_loss(route.logits, mask),
            expert_load=load,
            router_logits=route.logits,
        )


def build_moe(
    cfg: MoEConfig,
    hidden_size: int,
    make_expert: Callable[[int], nn.Module],
    ffn_intermediate_size: int | None = None,
) -> MoEFeedForward:
    """A MoEFeedForward from `cfg`. make_expert(intermediate_size) builds one (C -> C) expert;
    expert width is cfg.expert_intermediate_size, or ffn_intermediate_size when that is None."""
    width = cfg.expert_intermediate_size or ffn_intermediate_size
    if width is None:
        raise ValueError(
            "expert width unknown: set MoEConfig.expert_intermediate_size or pass "
            "ffn_intermediate_size"
        )
    router = TopKRouter(hidden_size, cfg.num_experts, cfg.top_k, cfg.renormalize)
    experts = nn.ModuleList(make_expert(width) for _ in range(cfg.num_experts))
    shared = None
    gate = None
    if cfg.shared_expert_intermediate_size > 0:
        shared = make_expert(cfg.shared_expert_intermediate_size)
        if cfg.shared_expert_gated:
            gate = nn.Linear(hidden_size, 1, bias=False)
    return MoEFeedForward(router, experts, shared, gate)
