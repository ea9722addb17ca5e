"""One loaded model with both its dense and its N:M sparse weights, switched in place.

    switch = SparsitySwitch(model, load_sparse_checkpoint("runs/smol_maskllm/sparse"))
    with switch.holding(lock, "sparse"):      # the lock that serialises calls on the model
        model.generate(...)                    # runs on the pruned weights

The demo's "LLM weights" setting: each request names its weights, and the holder of the model's
lock sets them before it generates (and puts the dense ones back when it is done). Both versions
of every pruned layer stay in memory (the dense one and the pruned copy: one extra copy of the
decoder's linear weights), so switching is a pointer swap, not a copy. Layers are found by the
checkpoint's names, or under ``<name>.base_layer`` where an adapter (peft LoRA, as STAMP's)
wraps them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from core.checkpoint import CheckpointError
from lm.sparsity.checkpoint import SparseCheckpoint, digest_of
from lm.sparsity.masks import apply_mask, check_nm, decompress_kept

__all__ = ["WEIGHTS", "SparsitySwitch"]

WEIGHTS = ("dense", "sparse")
Weights = Literal["dense", "sparse"]


def _linear(modules: dict[str, nn.Module], name: str) -> nn.Linear | None:
    for candidate in (name, f"{name}.base_layer"):
        layer = modules.get(candidate)
        if isinstance(layer, nn.Linear):
            return layer
    return None


class SparsitySwitch:
    """Dense or sparse weights of `model` (the checkpoint's dense source), chosen per call."""

    def __init__(
        self, model: nn.Module, ckpt: SparseCheckpoint, *, verify_source: bool = True
    ) -> None:
        modules = dict(model.named_modules())
        self.layers: dict[str, nn.Linear] = {}
        for name, mask in ckpt.masks.items():
            layer = _linear(modules, name)
            if layer is None or tuple(layer.weight.shape) != tuple(mask.shape):
                raise CheckpointError(
                    f"sparse checkpoint layer {name} {tuple(mask.shape)} does not fit "
                    f"{type(model).__name__}"
                )
            self.layers[name] = layer
        if verify_source and ckpt.source_digest is not None:
            digest = digest_of((n, layer.weight) for n, layer in self.layers.items())
            if digest != ckpt.source_digest:
                raise CheckpointError(
                    f"the dense weights are not those the masks of {ckpt.source!r} were made for "
                    f"(sha256 {digest[:16]}..., expected {ckpt.source_digest[:16]}...)"
                )
        self.method = ckpt.method
        self.nm = ckpt.nm
        self._dense = {n: layer.weight.data for n, layer in self.layers.items()}
        self._sparse = {}
        with torch.no_grad():
            for name, mask in ckpt.masks.items():
                dense = self._dense[name]
                mask = mask.to(dense.device)
                check_nm(mask, ckpt.nm, name=name)
                if ckpt.values is not None:
                    kept = decompress_kept(ckpt.values[name].to(dense.device), mask)
                    self._sparse[name] = kept.to(dense.dtype)
                else:
                    self._sparse[name] = apply_mask(dense, mask)
        self.current: Weights = "dense"

    @property
    def label(self) -> str:
        """E.g. "2:4 sparse (maskllm)"."""
        return f"{self.nm.n}:{self.nm.m} sparse ({self.method})"

    def use(self, weights: Weights) -> None:
        """Point every pruned layer at its dense or its sparse weight."""
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, received {weights!r}")
        table = self._sparse if weights == "sparse" else self._dense
        for name, layer in self.layers.items():
            layer.weight.data = table[name]
        self.current = weights

    @contextmanager
    def holding(self, lock: threading.Lock, weights: Weights) -> Iterator[None]:
        """Hold `lock` with `weights` in place; the dense weights are back on release, so
        whoever uses the model outside a request sees it as it was loaded."""
        with lock:
            self.use(weights)
            try:
                yield
            finally:
                self.use("dense")
