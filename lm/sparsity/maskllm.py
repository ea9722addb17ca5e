"""MaskLLM: learnable N:M masks (Fang et al. 2024; reference NVlabs/MaskLLM
``learnable_sparsity/differentiable_mask.py`` and ``pretrain_maskllm.py``).

    cfg = MaskLLMConfig()                                   # 2:4, the paper's schedules
    masked = install_masks(model, prunable_linears(model, cfg.nm), cfg)   # weights frozen
    init_from_prior(masked, prior_masks, cfg.prior_strength)             # e.g. SparseGPT masks
    for step in range(total):
        set_schedule(masked, cfg, step, total)
        loss = model(**batch).loss - regulariser_coef(cfg, step, total) * kept_weight_norm(masked)
        ...
    masks = remove_masks(model, masked)     # nn.Linear back, weights * argmax-pattern masks

Mechanism. Every group of M consecutive input weights of a row has K = C(M, N) candidate
patterns (6 for 2:4) and a row of logits ("gates") over them. In training each forward samples
    p = softmax((gates * kappa + g) / tau),  g ~ Gumbel(0, 1) i.i.d.,
and uses the soft mask  sum_k p_k * pattern_k  (N in every group exactly, since every pattern
keeps N). tau is annealed linearly from 4 to 0.05 and the logit scale kappa from 1e2 to 5e2 over
training (their script's --gumbel-temperature-range 4 0.05 --gumbel-scale-range 1e2 5e2), so
the samples harden into one pattern per group. In eval mode (and at export) the mask is the
argmax pattern. The LLM's weights are frozen (--mask-only); only the gates train.

Initialisation. Gates start at U(-sigma, sigma), sigma = 0.01 (MaskLLM: N(0, 0.01^2)). A prior
mask (a one-shot SparseGPT / Wanda / magnitude mask) adds strength * sigma * (overlap - N + 1)
to the gate of every pattern, overlap being how many of the prior's kept positions the pattern
keeps: for 2:4 this is MaskLLM's ``gate += (priors - 1) * gate.std() * strength`` (their
gate.std() is sigma at initialisation). Bounded noise means any strength > 2 makes the prior
pattern the argmax of every group, so the hard mask at step 0 is the prior mask.

Regulariser. MaskLLM's loss is  lm_loss - lambda_t * sum_layers ||W.detach() ⊙ mask||^2  with
lambda_t = weight_reg * (1 - step / total) (their --weight-reg 1e-5, removed linearly): it
rewards masks that keep large weights (the gradient reaches the gates only; the weights are
detached), so that the pruned weights' magnitude is not lost while the masks are uncertain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.config import Config
from lm.sparsity.masks import NM, check_nm, grouped

__all__ = [
    "DifferentiableMask",
    "MaskLLMConfig",
    "MaskedLinear",
    "hard_masks",
    "init_from_prior",
    "install_masks",
    "kept_weight_norm",
    "linear_schedule",
    "regulariser_coef",
    "remove_masks",
    "set_schedule",
]


@dataclass
class MaskLLMConfig(Config):
    """Learnable N:M masks; defaults are MaskLLM's LLaMA-2 mask-only script."""

    n: int = 2  # kept weights per group
    m: int = 4  # group size along the input dimension
    temperature_start: float = 4.0  # Gumbel-softmax tau at step 0
    temperature_end: float = 0.05  # tau at the last step (linear in between)
    scale_start: float = 1e2  # logit scale kappa at step 0
    scale_end: float = 5e2  # kappa at the last step
    prior_strength: float = 3.0  # prior boost in units of init_std; > 2 pins argmax to the prior
    init_std: float = 0.01  # gates start U(-init_std, init_std)
    weight_reg: float = 1e-5  # lambda of the kept-weight-magnitude reward, decayed linearly to 0
    hard: bool = False  # straight-through hard samples instead of soft masks (paper: soft)

    def __post_init__(self) -> None:
        NM(self.n, self.m)  # validates
        if not (self.temperature_start > 0 and self.temperature_end > 0):
            raise ValueError(
                f"temperatures must be > 0, received {self.temperature_start}, "
                f"{self.temperature_end}"
            )
        if not (self.scale_start > 0 and self.scale_end > 0):
            raise ValueError(
                f"logit scales must be > 0, received {self.scale_start}, {self.scale_end}"
            )
        if self.prior_strength < 0 or self.weight_reg < 0 or self.init_std <= 0:
            raise ValueError(
                "prior_strength and weight_reg must be >= 0 and init_std > 0, received "
                f"{self.prior_strength}, {self.weight_reg}, {self.init_std}"
            )

    @property
    def nm(self) -> NM:
        return NM(self.n, self.m)


def linear_schedule(start: float, end: float, step: int, total: int) -> float:
    """start + (end - start) * step / total: start at step 0, end at step == total."""
    if total < 1 or not 0 <= step <= total:
        raise ValueError(f"need 0 <= step <= total and total >= 1, received {step}, {total}")
    return start + (end - start) * step / total


def regulariser_coef(cfg: MaskLLMConfig, step: int, total: int) -> float:
    """lambda_t = weight_reg * (1 - step / total) (pretrain_maskllm.py loss_func)."""
    return linear_schedule(cfg.weight_reg, 0.0, step, total)


class DifferentiableMask(nn.Module):
    """Logits over the K candidate patterns of every group of an (O, I) weight."""

    patterns: torch.Tensor  # (K, M) float buffer, nm.patterns

    def __init__(
        self,
        shape: tuple[int, int],
        nm: NM,
        init_std: float = 0.01,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        out_features, in_features = shape
        if in_features % nm.m:
            raise ValueError(f"in_features {in_features} is not a multiple of M={nm.m}")
        self.nm = nm
        self.shape = (out_features, in_features)
        self.init_std = init_std
        k = len(nm.patterns)
        # Pattern-major (K, O, G): the softmax over K then runs over K contiguous planes, several
        # times faster on CPU than a softmax over a trailing dimension of 6.
        gate = torch.empty(k, out_features, in_features // nm.m, device=device)
        self.gate = nn.Parameter(gate.uniform_(-init_std, init_std))  # (K, O, G)
        self.register_buffer("patterns", nm.patterns.float().to(device), persistent=False)

    def _to_mask(self, probs: torch.Tensor) -> torch.Tensor:
        """(K, O, G) pattern weights -> (O, I) mask: sum_k probs_k * pattern_k."""
        return torch.einsum("kog,km->ogm", probs, self.patterns).reshape(self.shape)

    def sample(
        self,
        temperature: float,
        scale: float,
        hard: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A Gumbel-softmax soft mask (O, I) in [0, 1], N per group; differentiable in the gates.

        hard: the one-hot sample in the forward, the soft one's gradient (straight-through).
        generator: draws the Gumbel noise (on the gates' device); None: the global RNG."""
        logits = self.gate * scale
        # Gumbel(0, 1) = -log(-log U); U = 0 gives -inf, a pattern with probability 0.
        if generator is None:
            uniform = torch.rand_like(logits)
        else:
            uniform = torch.rand(
                logits.shape, generator=generator, device=logits.device, dtype=logits.dtype
            )
        gumbel = -torch.log(-torch.log(uniform))
        probs = F.softmax((logits + gumbel) / temperature, dim=0)  # (K, O, G)
        if hard:
            one_hot = F.one_hot(probs.argmax(0), probs.shape[0]).permute(2, 0, 1)
            probs = one_hot.to(probs.dtype) - probs.detach() + probs
        return self._to_mask(probs)

    def probabilities(self, scale: float, temperature: float = 1.0) -> torch.Tensor:
        """(K, O, G) pattern probabilities without Gumbel noise."""
        return F.softmax(self.gate * scale / temperature, dim=0)

    def expected_mask(self, scale: float, temperature: float = 1.0) -> torch.Tensor:
        """(O, I): E[soft mask] over pattern choices at this scale (the noise-free mean)."""
        return self._to_mask(self.probabilities(scale, temperature))

    @torch.no_grad()
    def hard_mask(self) -> torch.Tensor:
        """(O, I) bool: the argmax pattern of every group."""
        return self.nm.patterns.to(self.gate.device)[self.gate.argmax(0)].reshape(self.shape)

    @torch.no_grad()
    def init_from_prior(self, prior: torch.Tensor, strength: float) -> None:
        """Boost the gates of patterns that agree with an N:M prior mask (O, I) (module doc)."""
        if prior.shape != self.shape:
            raise ValueError(
                f"prior mask shape {tuple(prior.shape)} does not match weight {self.shape}"
            )
        check_nm(prior, self.nm, name="prior mask")
        groups = grouped(prior.to(self.gate.device).float(), self.nm.m)  # (O, G, M)
        # (K, O, G): how many of the prior's kept positions each pattern keeps
        overlap = torch.einsum("ogm,km->kog", groups, self.patterns)
        self.gate.add_((overlap - self.nm.n + 1) * self.init_std * strength)


class MaskedLinear(nn.Module):
    """An nn.Linear whose weight is multiplied by a learnable N:M mask: y = x (W ⊙ mask)^T + b.

    Holds the linear's own weight and bias Parameters under the same names (state-dict keys of
    the model do not change, only ``<name>.diff_mask.gate`` is added). Training mode samples a
    soft mask at the current `temperature` / `scale` (set_schedule), its Gumbel noise drawn from
    `generator` (set_schedule's noise_seed; None: the global RNG); eval mode uses the argmax
    pattern."""

    def __init__(self, linear: nn.Linear, nm: NM, init_std: float = 0.01):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.diff_mask = DifferentiableMask(
            (linear.out_features, linear.in_features), nm, init_std, linear.weight.device
        )
        self.temperature = 4.0
        self.scale = 1e2
        self.hard = False
        self.generator: torch.Generator | None = None
        # ||W ⊙ mask||^2 of the last training forward (MaskLLM's sparse_weight_norm)
        self.kept_sq_norm: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., I) -> (..., O)."""
        if self.training:
            mask = self.diff_mask.sample(self.temperature, self.scale, self.hard, self.generator)
            self.kept_sq_norm = (self.weight.detach().float() * mask).pow(2).sum()
        else:
            mask = self.diff_mask.hard_mask()
        return F.linear(x, self.weight * mask.to(self.weight.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nm={self.diff_mask.nm}, temperature={self.temperature:.3g}, scale={self.scale:.3g}"
        )


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def install_masks(
    model: nn.Module, linears: Mapping[str, nn.Linear], cfg: MaskLLMConfig
) -> dict[str, MaskedLinear]:
    """Freeze every parameter of `model` and replace each of `linears` (name -> layer) by a
    MaskedLinear in place; only the gates require grad. Returns {name: MaskedLinear}."""
    model.requires_grad_(False)
    masked: dict[str, MaskedLinear] = {}
    for name, linear in linears.items():
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name}: expected an nn.Linear, received {type(linear).__name__}")
        masked[name] = MaskedLinear(linear, cfg.nm, cfg.init_std)
        _set_module(model, name, masked[name])
    set_schedule(masked, cfg, 0, 1)
    return masked


def init_from_prior(
    masked: Mapping[str, MaskedLinear], priors: Mapping[str, torch.Tensor], strength: float
) -> None:
    """Boost every layer's gates toward its prior mask (bool (O, I)); all layers need one."""
    missing = sorted(set(masked) - set(priors))
    if missing:
        raise ValueError(f"no prior mask for {missing[:5]}")
    for name, layer in masked.items():
        layer.diff_mask.init_from_prior(priors[name], strength)


def set_schedule(
    masked: Mapping[str, MaskedLinear],
    cfg: MaskLLMConfig,
    step: int,
    total: int,
    noise_seed: int | None = None,
) -> tuple[float, float]:
    """Set tau and kappa of every layer for `step` of `total` (linear); returns (tau, kappa).

    noise_seed: the layers draw their Gumbel noise, in forward order, from one generator (per
    device) seeded with it, so the noise of a step is a pure function of the seed: the same in
    every data-parallel process and in a resumed run. None: from the global RNG."""
    tau = linear_schedule(cfg.temperature_start, cfg.temperature_end, step, total)
    kappa = linear_schedule(cfg.scale_start, cfg.scale_end, step, total)
    generators: dict[torch.device, torch.Generator] = {}
    for layer in masked.values():
        layer.temperature, layer.scale, layer.hard = tau, kappa, cfg.hard
        device = layer.diff_mask.gate.device
        if noise_seed is not None and device not in generators:
            generators[device] = torch.Generator(device).manual_seed(noise_seed)
        layer.generator = generators.get(device)
    return tau, kappa


def kept_weight_norm(masked: Mapping[str, MaskedLinear]) -> torch.Tensor:
    """sum over layers of ||W ⊙ mask||^2 from their last training forward (the regulariser)."""
    norms = [layer.kept_sq_norm for layer in masked.values() if layer.kept_sq_norm is not None]
    if not norms:
        raise RuntimeError("no MaskedLinear has run a training-mode forward yet")
    return torch.stack(norms).sum()


def hard_masks(masked: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]:
    """{name: bool (O, I)} argmax-pattern masks, on CPU."""
    return {name: layer.diff_mask.hard_mask().cpu() for name, layer in masked.items()}


@torch.no_grad()
def remove_masks(model: nn.Module, masked: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]:
    """Put plain nn.Linear layers back, their weights multiplied by the hard masks; returns the
    masks {name: bool (O, I)} (check_nm-exact)."""
    masks = hard_masks(masked)
    for name, layer in masked.items():
        linear = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device="meta",
        )
        layer.weight.mul_(masks[name].to(layer.weight.device, layer.weight.dtype))
        linear.weight = layer.weight
        linear.bias = layer.bias
        _set_module(model, name, linear)
    return masks
