"""Seeding, device/dtype and process-group helpers. The caller decides device and dtype; models
never do."""

from __future__ import annotations

import atexit
import os
import random

import numpy as np
import torch

__all__ = [
    "DTYPES",
    "destroy_process_group_at_exit",
    "resolve_device",
    "resolve_dtype",
    "seed_everything",
]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, received {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; anything else is checked and returned."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', received {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' (or their long names, or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(set(DTYPES))}, received {dtype}")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, received {dtype!r}") from None


def destroy_process_group_at_exit() -> None:
    """Destroy torch.distributed's process group (if one is still up) when the process exits.
    Every script that runs under ``accelerate launch`` calls this once it has its processes. A
    gloo group left to the interpreter's own teardown is the suspected cause of one CI failure:
    a two-process run whose rank 1 aborted at exit after finishing its work ("terminate called
    without an active exception"; not reproduced in 36 local launches). Without a process group
    at exit it does nothing; calling it again registers nothing new."""
    atexit.unregister(_destroy_process_group)
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
