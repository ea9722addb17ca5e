"""Sparse checkpoints: N:M masks (+ kept values where pruning changed them) over a dense source.

    save_sparse_checkpoint("runs/sgpt/sparse", model, masks, NM(2, 4), method="sparsegpt",
                           source="smollm2-135m-instruct", kept_values=True, source_digest=digest)
    model, tokenizer, ckpt = load_sparse_model("runs/sgpt/sparse")     # the pruned model

Format (a core.checkpoint folder, sha256-checked on load):

- ``masks.safetensors``: per pruned layer (by module name) its mask as uint8 pattern indices
  (O, I / M) into NM(n, m).patterns (combinations order). A 2:4 index is 1 byte per 4 weights:
  an eighth of a bool mask, a sixteenth of fp32 weights.
- ``values.safetensors`` (only when the method changed the kept weights, i.e. SparseGPT): the kept
  weights of every pruned layer, row-major, (O, I * N / M), in the dtype they were pruned in.
- the manifest's config: ``{"format": "polychrome-sparse", "source", "n", "m", "method",
  "layers": {name: [O, I]}, "weights": "source" | "kept-values", "source_weights_sha256"}``.

Everything else (embeddings, norms, lm_head, unpruned layers, and for magnitude / Wanda / MaskLLM
the kept weights too) comes from the dense ``source``, loaded again at load time. So that a
different source cannot be combined silently with the masks, the sha256 of the source's dense
pruned-layer weights (fp32 bytes, in layer order) is stored and checked on load.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from core.runtime import resolve_dtype
from lm.sparsity.masks import (
    NM,
    apply_mask,
    check_nm,
    compress_kept,
    decompress_kept,
    mask_to_patterns,
    patterns_to_mask,
)

__all__ = [
    "SPARSE_FORMAT",
    "SparseCheckpoint",
    "apply_sparse_checkpoint",
    "load_sparse_checkpoint",
    "load_sparse_model",
    "save_sparse_checkpoint",
    "weights_digest",
]

SPARSE_FORMAT = "polychrome-sparse"


def weights_digest(model: nn.Module, names: Sequence[str]) -> str:
    """sha256 of the named layers' weights as fp32 bytes, in the given order."""
    modules = dict(model.named_modules())
    return digest_of((name, modules[name].weight) for name in names)


def digest_of(weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """weights_digest of (name, weight) pairs, in their order."""
    h = hashlib.sha256()
    for name, weight in weights:
        w = weight.detach().float().cpu().contiguous()
        h.update(name.encode() + b"\0" + str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


@dataclass
class SparseCheckpoint:
    """A loaded sparse checkpoint: the masks, the kept values if stored, and where it came from."""

    nm: NM
    source: str  # model source spec of the dense weights
    method: str  # magnitude | wanda | sparsegpt | maskllm
    masks: dict[str, torch.Tensor]  # name -> bool (O, I)
    values: dict[str, torch.Tensor] | None  # name -> (O, I * N / M) kept weights, or None
    source_digest: str | None
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def save_sparse_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    nm: NM,
    *,
    source: str,
    method: str,
    kept_values: bool,
    source_digest: str | None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the masks of a pruned `model` (and, with kept_values, its kept weights)."""
    modules = dict(model.named_modules())
    packed, values, layers = {}, {}, {}
    for name, mask in masks.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise CheckpointError(f"{name}: not an nn.Linear of {type(model).__name__}")
        mask = mask.to(layer.weight.device)
        check_nm(mask, nm, name=f"mask of {name}")
        packed[name] = mask_to_patterns(mask, nm)
        layers[name] = list(layer.weight.shape)
        if kept_values:
            values[name] = compress_kept(layer.weight.detach(), mask, nm)
    config = {
        "format": SPARSE_FORMAT,
        "source": source,
        "n": nm.n,
        "m": nm.m,
        "method": method,
        "layers": layers,
        "weights": "kept-values" if kept_values else "source",
        "source_weights_sha256": source_digest,
    }
    tensors = {"masks": packed, **({"values": values} if kept_values else {})}
    return save_checkpoint(directory, tensors, config, metadata, overwrite=overwrite)


def load_sparse_checkpoint(directory: str | os.PathLike[str]) -> SparseCheckpoint:
    """Read and verify a sparse checkpoint folder."""
    ckpt = load_checkpoint(directory)
    cfg = ckpt.config
    if cfg.get("format") != SPARSE_FORMAT:
        raise CheckpointError(
            f"{directory}: expected a {SPARSE_FORMAT!r} checkpoint, received config format "
            f"{cfg.get('format')!r}"
        )
    nm = NM(int(cfg["n"]), int(cfg["m"]))
    packed = ckpt.tensors.get("masks", {})
    if set(packed) != set(cfg["layers"]):
        raise CheckpointError(f"{directory}: masks.safetensors does not hold the listed layers")
    masks = {}
    for name, shape in cfg["layers"].items():
        mask = patterns_to_mask(packed[name], nm)
        if list(mask.shape) != shape:
            raise CheckpointError(
                f"{directory}: mask of {name} is {tuple(mask.shape)}, not {shape}"
            )
        masks[name] = mask
    values = ckpt.tensors.get("values") if cfg["weights"] == "kept-values" else None
    return SparseCheckpoint(
        nm,
        cfg["source"],
        cfg["method"],
        masks,
        values,
        cfg.get("source_weights_sha256"),
        cfg,
        ckpt.metadata,
    )


@torch.no_grad()
def apply_sparse_checkpoint(
    model: nn.Module, ckpt: SparseCheckpoint, *, verify_source: bool = True
) -> None:
    """Prune `model` (the dense source) in place with the checkpoint's masks and values.

    verify_source compares the dense weights with the stored sha256 first; a mismatch raises
    CheckpointError (the masks were made for other weights)."""
    modules = dict(model.named_modules())
    for name, mask in ckpt.masks.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != tuple(mask.shape):
            raise CheckpointError(
                f"checkpoint layer {name} {tuple(mask.shape)} does not fit "
                f"{type(model).__name__} ({type(layer).__name__ if layer else 'missing'})"
            )
    if verify_source and ckpt.source_digest is not None:
        digest = weights_digest(model, list(ckpt.masks))
        if digest != ckpt.source_digest:
            raise CheckpointError(
                f"the dense weights of {ckpt.source!r} are not those the masks were made for "
                f"(sha256 {digest[:16]}..., expected {ckpt.source_digest[:16]}...)"
            )
    for name, mask in ckpt.masks.items():
        layer = modules[name]
        assert isinstance(layer, nn.Linear)
        mask = mask.to(layer.weight.device)
        if ckpt.values is not None:
            dense = decompress_kept(ckpt.values[name].to(layer.weight.device), mask)
            layer.weight.copy_(dense.to(layer.weight.dtype))
        else:
            layer.weight.copy_(apply_mask(layer.weight, mask))
        check_nm(mask, ckpt.nm, name=name)


def load_sparse_model(
    directory: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    source: str | None = None,
) -> tuple[Any, Any, SparseCheckpoint]:
    """(model, tokenizer, checkpoint): the dense source (or `source`, e.g. where the original
    folder moved) loaded in fp32, verified, pruned, then cast to `dtype` and moved to `device`."""
    import lm.tnl  # noqa: F401  (registers TNL with the Auto classes)
    from lm.loading import load_causal_lm

    ckpt = load_sparse_checkpoint(directory)
    model, tokenizer = load_causal_lm(source or ckpt.source, dtype="fp32", frozen=True)
    apply_sparse_checkpoint(model, ckpt)
    cast(Any, model).to(device=torch.device(device), dtype=resolve_dtype(dtype))
    return model, tokenizer, ckpt
