"""One-shot N:M pruning: magnitude, Wanda and SparseGPT, for single layers and whole models.

    masks = prune_oneshot(model, "sparsegpt", NM(2, 4), calib_rows)   # {name: bool (O, I)}

Per layer, with W (O, I) and calibration inputs X (I, K) (K tokens):

- magnitude: in every group of M input columns of a row keep the N largest |W_ij|.
- Wanda (Sun et al. 2023, eq. 1): score S_ij = |W_ij| * ||X_j||_2, the norm over all K calibration
  tokens; comparison groups are per output row, and for N:M per group of M columns of that row
  (their `prune_n, prune_m` branch). Weights are not updated.
- SparseGPT (Frantar & Alistarh 2023, Alg. 1; reference IST-DASLab/sparsegpt `sparsegpt.py`):
  H = 2 X X^T / K + damp I with damp = percdamp * mean(diag H); U = the upper Cholesky factor of
  H^-1, so that row i of U restricted to columns >= i, divided by U_ii, is the OBS update of the
  columns not yet processed. Columns are processed left to right in blocks of 128; at the first
  column of every group of M the N:M mask of the group is chosen by the OBS saliency
  w^2 / [U_jj]^2 (the M - N smallest are pruned); each column's pruning error
  (w - q) / U_ii is spread over the later columns of the block at once and over the columns after
  the block in one matrix product (lazy batch updates). Columns with diag(H) = 0 (inputs that
  never fire) are pruned first: their weights are zeroed and their H entry set to 1.

Wanda and SparseGPT calibrate sequentially, block by block (lm.sparsity.calibration).

Data parallel: both statistics are sums over calibration tokens, so processes that each run a
share of the rows and sum the statistics of a layer before pruning it (prune_oneshot's
`sum_over_processes`, e.g. an all-reduce) prune every layer as one process with all the rows
would, and alike; the pruned block then gives each process the next inputs of its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from lm.sparsity.calibration import sequential_calibrate
from lm.sparsity.masks import DEFAULT_EXCLUDE, NM, apply_mask, check_nm, prunable_linears, topn_mask

__all__ = [
    "METHODS",
    "HessianStats",
    "InputNormStats",
    "SparseGPTResult",
    "SumOverProcesses",
    "magnitude_mask",
    "prune_oneshot",
    "sparsegpt_prune",
    "sparsity_report",
    "wanda_mask",
    "wanda_scores",
]

Method = Literal["magnitude", "wanda", "sparsegpt"]
METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
# a tensor -> its elementwise sum over the data-parallel processes (the same shape, every process)
SumOverProcesses = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Calibration statistics


class InputNormStats:
    """Sum over calibration tokens of x_j^2 per input column j (Wanda's ||X_j||_2^2)."""

    def __init__(self, in_features: int, device: str | torch.device = "cpu"):
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """x (..., I) inputs of the layer."""
        x = x.reshape(-1, x.shape[-1]).double()
        self.sq_sum += x.pow(2).sum(0)
        self.tokens += x.shape[0]

    def reduce(self, sum_over_processes: SumOverProcesses) -> None:
        """Sum the statistics of every process's calibration rows (see the module doc)."""
        self.sq_sum = sum_over_processes(self.sq_sum)
        self.tokens = _sum_count(self.tokens, self.sq_sum.device, sum_over_processes)

    @property
    def norms(self) -> torch.Tensor:
        """(I,) ||X_j||_2 over all tokens seen."""
        return self.sq_sum.sqrt()


class HessianStats:
    """H = 2 X X^T / K over all K calibration tokens (I, I), float64 (SparseGPT `add_batch`)."""

    def __init__(self, in_features: int, device: str | torch.device = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """x (..., I) inputs of the layer; the running mean keeps H on one scale."""
        x = x.reshape(-1, x.shape[-1]).float()
        k = x.shape[0]
        total = self.tokens + k
        self.hessian *= self.tokens / total
        self.hessian += (2.0 / total) * (x.T @ x).double()
        self.tokens = total

    def reduce(self, sum_over_processes: SumOverProcesses) -> None:
        """The H of every process's calibration rows together: their token-weighted mean."""
        summed = sum_over_processes(self.hessian * self.tokens)  # 2 X X^T over all rows
        self.tokens = _sum_count(self.tokens, self.hessian.device, sum_over_processes)
        self.hessian = summed / max(self.tokens, 1)


def _sum_count(count: int, device: torch.device, sum_over_processes: SumOverProcesses) -> int:
    return round(float(sum_over_processes(torch.tensor(float(count), device=device))))


# ----------------------------------------------------------------------------------------------
# Single layers


def magnitude_mask(weight: torch.Tensor, nm: NM) -> torch.Tensor:
    """weight (O, I) -> bool mask keeping the N largest |W| of every group of M."""
    return topn_mask(weight.detach().abs(), nm)


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """S = |W| * ||X_j||_2: weight (O, I), input_norms (I,) -> (O, I)."""
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"input_norms must be (in_features,) = ({weight.shape[1]},), received "
            f"{tuple(input_norms.shape)}"
        )
    return weight.detach().abs().double() * input_norms.to(weight.device).double()


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, nm: NM) -> torch.Tensor:
    """weight (O, I), input_norms (I,) -> bool mask keeping the N best Wanda scores per group."""
    return topn_mask(wanda_scores(weight, input_norms), nm)


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # (O, I) the updated weight, zero where pruned, in the input's dtype
    mask: torch.Tensor  # (O, I) bool, True = kept; exact N:M
    loss: float  # sum over rows of the OBS error estimate sum_j (w_j - q_j)^2 / U_jj^2 / 2


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    nm: NM,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> SparseGPTResult:
    """SparseGPT N:M pruning of one layer (see the module doc).

    weight (O, I); hessian (I, I) = 2 X X^T / K from the layer's calibration inputs X (I, K).
    Computed in float64; blocksize must be a multiple of M so no group straddles two blocks."""
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be (in_features, in_features) = ({cols}, {cols}), received "
            f"{tuple(hessian.shape)}"
        )
    if blocksize < 1 or blocksize % nm.m:
        raise ValueError(f"blocksize must be a positive multiple of M={nm.m}, received {blocksize}")
    if cols % nm.m:
        raise ValueError(f"in_features {cols} is not a multiple of M={nm.m}")
    W = weight.detach().double().clone()
    H = hessian.detach().double().to(W.device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, dtype=H.dtype, device=H.device)
    # U: upper Cholesky factor of H^-1 (H = L L^T -> H^-1 -> its Cholesky, transposed).
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    loss = torch.zeros(rows, dtype=W.dtype, device=W.device)
    prune_count = nm.m - nm.n
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        pruned1 = torch.zeros_like(W1, dtype=torch.bool)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if i % nm.m == 0 and prune_count:
                # OBS saliency of the group's still-updated weights; prune the M - N smallest.
                saliency = W1[:, i : i + nm.m] ** 2 / d[i : i + nm.m].reshape(1, -1) ** 2
                drop = torch.topk(saliency, prune_count, dim=1, largest=False).indices
                pruned1.scatter_(1, i + drop, True)
            w = W1[:, i]
            q = torch.where(pruned1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / d[i]
            loss += (w - q) ** 2 / d[i] ** 2 / 2
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = ~pruned1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return SparseGPTResult(W.to(weight.dtype), mask, float(loss.sum()))


# ----------------------------------------------------------------------------------------------
# Whole models


def prune_oneshot(
    model: nn.Module,
    method: Method,
    nm: NM,
    rows: torch.Tensor | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    blocksize: int = 128,
    percdamp: float = 0.01,
    device: str | torch.device = "cpu",
    progress: bool = True,
    sum_over_processes: SumOverProcesses | None = None,
) -> dict[str, torch.Tensor]:
    """Prune the selected linear layers of `model` in place (pruned weights set to zero; SparseGPT
    also updates the kept ones) and return their masks {name: bool (O, I)} on CPU.

    rows (N, T): calibration token ids, required by wanda and sparsegpt. include / exclude: see
    masks.prunable_linears (default: every nn.Linear inside the decoder blocks).
    sum_over_processes: set when data-parallel processes each pass their own share (N >= 1) of
    the calibration rows: every layer's statistics are summed with it before the layer is
    pruned, so all processes return the masks one process with all the rows would (module doc).
    Every process must call this with the same model and layers."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, received {method!r}")
    linears = prunable_linears(model, nm, include, exclude)
    masks: dict[str, torch.Tensor] = {}

    def finish(name: str, layer: nn.Linear, mask: torch.Tensor, weight: torch.Tensor) -> None:
        check_nm(mask, nm, name=name)
        layer.weight.data.copy_(apply_mask(weight, mask))
        masks[name] = mask.cpu()

    if method == "magnitude":
        for name, layer in tqdm(linears.items(), desc="magnitude", disable=not progress):
            finish(name, layer, magnitude_mask(layer.weight, nm), layer.weight.data)
        return masks
    if rows is None:
        raise ValueError(f"{method} needs calibration rows (N, T) of token ids")

    def prune_wanda(name: str, layer: nn.Linear, stats: object) -> None:
        assert isinstance(stats, InputNormStats)
        if sum_over_processes is not None:
            stats.reduce(sum_over_processes)
        finish(name, layer, wanda_mask(layer.weight, stats.norms, nm), layer.weight.data)

    def prune_sparsegpt(name: str, layer: nn.Linear, stats: object) -> None:
        assert isinstance(stats, HessianStats)
        if sum_over_processes is not None:
            stats.reduce(sum_over_processes)
        result = sparsegpt_prune(layer.weight, stats.hessian, nm, blocksize, percdamp)
        finish(name, layer, result.mask, result.weight)

    if method == "wanda":
        sequential_calibrate(
            model,
            rows,
            linears,
            lambda layer: InputNormStats(layer.in_features, layer.weight.device),
            prune_wanda,
            device,
            progress,
        )
    else:
        sequential_calibrate(
            model,
            rows,
            linears,
            lambda layer: HessianStats(layer.in_features, layer.weight.device),
            prune_sparsegpt,
            device,
            progress,
        )
    return {name: masks[name] for name in linears}


def sparsity_report(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of zero weights over the pruned layers and over all parameters."""
    modules = dict(model.named_modules())
    pruned = sum(int((modules[n].weight == 0).sum()) for n in masks)
    size = sum(modules[n].weight.numel() for n in masks)
    total = sum(p.numel() for p in model.parameters())
    return {"pruned_layers_sparsity": pruned / max(size, 1), "model_sparsity": pruned / total}
