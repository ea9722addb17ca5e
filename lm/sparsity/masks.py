"""N:M sparsity: patterns, masks, checks, and which linear layers of a model get pruned.

Convention (NVIDIA's, and the one `torch.sparse.to_sparse_semi_structured` wants): an ``nn.Linear``
weight is (O, I) = (out_features, in_features); every row is cut into groups of M consecutive
input columns, and an N:M mask keeps exactly N of the M weights of every group ("2:4" keeps 2 of
4, 50% sparsity). A mask is a bool tensor of the weight's shape, True = kept.

    nm = NM.parse("2:4")
    nm.patterns                      # (6, 4) bool, the C(4, 2) candidate groups, in
                                     # itertools.combinations order (MaskLLM's mask_options order)
    mask = topn_mask(weight.abs(), nm)          # keep the 2 largest scores per group
    check_nm(mask, nm)                          # ValueError naming the first bad group
    idx = mask_to_patterns(mask, nm)            # (O, I/M) uint8 pattern indices (checkpoints)
    assert torch.equal(patterns_to_mask(idx, nm), mask)
    layers = prunable_linears(model)            # {name: nn.Linear} inside the decoder blocks
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

__all__ = [
    "DEFAULT_EXCLUDE",
    "NM",
    "apply_mask",
    "check_nm",
    "compress_kept",
    "decoder_blocks",
    "decompress_kept",
    "grouped",
    "mask_to_patterns",
    "patterns_to_mask",
    "prunable_linears",
    "topn_mask",
]

# Linear layers inside decoder blocks that are left dense by default: MoE routers (a few output
# rows that decide where every token goes; pruning them is not what N:M sparsity is for).
DEFAULT_EXCLUDE = ("*router*",)
MAX_PATTERNS = 256  # pattern indices are stored as uint8


@dataclass(frozen=True)
class NM:
    """An N:M pattern: N kept weights in every group of M consecutive input columns."""

    n: int  # kept weights per group
    m: int  # group size along the input dimension

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise ValueError(f"N:M needs integers, received {self.n!r}:{self.m!r}")
        if not 1 <= self.n <= self.m:
            raise ValueError(f"N:M needs 1 <= N <= M, received {self.n}:{self.m}")
        if math.comb(self.m, self.n) > MAX_PATTERNS:
            raise ValueError(
                f"{self.n}:{self.m} has {math.comb(self.m, self.n)} candidate patterns; at most "
                f"{MAX_PATTERNS} are supported (pattern indices are uint8)"
            )

    @classmethod
    def parse(cls, spec: str) -> NM:
        """'2:4' -> NM(2, 4)."""
        parts = spec.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"expected N:M such as '2:4', received {spec!r}")
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @cached_property
    def patterns(self) -> torch.Tensor:
        """(K, M) bool: every way to keep N of M, K = C(M, N), in combinations order."""
        rows = [
            [j in keep for j in range(self.m)]
            for keep in itertools.combinations(range(self.m), self.n)
        ]
        return torch.tensor(rows, dtype=torch.bool)


def grouped(x: torch.Tensor, m: int) -> torch.Tensor:
    """(O, I) -> (O, I/M, M) view: groups of M consecutive input columns per row."""
    if x.ndim != 2:
        raise ValueError(
            f"expected a 2-D (out, in) weight or mask, received shape {tuple(x.shape)}"
        )
    if x.shape[1] % m:
        raise ValueError(
            f"in_features {x.shape[1]} is not a multiple of the group size M={m}; N:M sparsity "
            "groups whole runs of M input columns"
        )
    return x.reshape(x.shape[0], x.shape[1] // m, m)


def topn_mask(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """scores (O, I) -> bool mask (O, I) keeping the N largest scores of every group of M.

    Ties go to the lower column index (a stable sort), so the mask is deterministic."""
    groups = grouped(scores, nm.m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., : nm.n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order, True)
    return mask.reshape(scores.shape)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weight (O, I) with the pruned entries (mask False) set to zero; a new tensor."""
    if mask.shape != weight.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}"
        )
    return weight * mask.to(device=weight.device, dtype=weight.dtype)


def check_nm(x: torch.Tensor, nm: NM, *, exact: bool = True, name: str = "tensor") -> None:
    """Raise ValueError unless every group of M along the input dimension of `x` (O, I) holds
    exactly N nonzeros (True entries for a bool mask). exact=False accepts at most N, which is
    what the hardware needs of a weight whose kept entries may happen to be zero."""
    counts = (grouped(x, nm.m) != 0).sum(-1)
    bad = counts != nm.n if exact else counts > nm.n
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} is not {nm} sparse: {int(bad.sum())} of {bad.numel()} groups have "
            f"{'a count other than' if exact else 'more than'} {nm.n} nonzeros; first: row {row}, "
            f"columns {group * nm.m}..{group * nm.m + nm.m - 1} have {int(counts[row, group])}"
        )


def _code_table(nm: NM) -> torch.Tensor:
    """(2^M,) int64: the pattern index of each M-bit group code, -1 where not N:M."""
    table = torch.full((2**nm.m,), -1, dtype=torch.int64)
    weights = 2 ** torch.arange(nm.m)
    codes = (nm.patterns.long() * weights).sum(-1)
    table[codes] = torch.arange(len(codes))
    return table


def mask_to_patterns(mask: torch.Tensor, nm: NM) -> torch.Tensor:
    """bool mask (O, I) -> (O, I/M) uint8 pattern indices into `nm.patterns`."""
    check_nm(mask, nm, name="mask")
    weights = 2 ** torch.arange(nm.m, device=mask.device)
    codes = (grouped(mask, nm.m).long() * weights).sum(-1)
    return _code_table(nm).to(mask.device)[codes].to(torch.uint8)


def patterns_to_mask(indices: torch.Tensor, nm: NM) -> torch.Tensor:
    """(O, G) pattern indices -> bool mask (O, G * M)."""
    if indices.ndim != 2:
        raise ValueError(f"expected (out, groups) pattern indices, received {tuple(indices.shape)}")
    k = len(nm.patterns)
    idx = indices.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise ValueError(f"pattern indices must lie in [0, {k}) for {nm}, found {int(idx.max())}")
    return nm.patterns.to(indices.device)[idx].reshape(indices.shape[0], -1)


def compress_kept(weight: torch.Tensor, mask: torch.Tensor, nm: NM) -> torch.Tensor:
    """The kept entries of weight (O, I) under an exact N:M mask, row-major: (O, I * N / M)."""
    check_nm(mask, nm, name="mask")
    return weight[mask.to(weight.device)].reshape(weight.shape[0], -1)


def decompress_kept(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of compress_kept: a dense (O, I) tensor with zeros where mask is False."""
    if values.numel() != int(mask.sum()):
        raise ValueError(
            f"{values.numel()} kept values do not fill the {int(mask.sum())} kept mask entries"
        )
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask.to(values.device)] = values.flatten()
    return out


# ----------------------------------------------------------------------------------------------
# Which layers


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's decoder blocks: the longest nn.ModuleList whose items hold an
    nn.Linear (``model.layers`` in Llama/TNL, ``transformer.h`` in GPT-2 style models)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if not all(any(isinstance(s, nn.Linear) for s in b.modules()) for b in module):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of blocks with nn.Linear layers; "
            "name the layers to prune with include patterns"
        )
    return best


def prunable_linears(
    model: nn.Module,
    nm: NM,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[str, nn.Linear]:
    """The nn.Linear layers to prune, by module name, in model order.

    include: fnmatch globs on module names (e.g. ``"*.mlp.*"``); None = every nn.Linear inside
    the decoder blocks (so never embeddings or lm_head). exclude: globs removed afterwards.
    Raises ValueError if nothing is selected or a selected layer's in_features is not a
    multiple of M.
    """
    if include is None:
        prefix, _ = decoder_blocks(model)
        patterns: Sequence[str] = [f"{prefix}.*"]
    else:
        patterns = include
    selected = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }
    if not selected:
        raise ValueError(
            f"no nn.Linear of {type(model).__name__} matches include {list(patterns)} minus "
            f"exclude {list(exclude)}"
        )
    misfit = [
        f"{k} (in_features {v.in_features})" for k, v in selected.items() if v.in_features % nm.m
    ]
    if misfit:
        raise ValueError(
            f"{nm} groups {nm.m} input columns, but these layers do not divide: {misfit[:5]}; "
            "leave them out with an exclude pattern"
        )
    return selected
