"""Real 2:4 sparse kernels on CUDA: swap pruned nn.Linear weights for semi-structured tensors.

    model, tokenizer, ckpt = load_sparse_model("runs/maskllm/sparse", dtype="fp16", device="cuda")
    to_semi_structured(model, list(ckpt.masks))         # inference only, sm80+ GPUs

`torch.sparse.to_sparse_semi_structured` stores the 2 kept values of every group of 4 plus 2-bit
indices and runs the matmul on the sparse tensor cores (cuSPARSELt, or CUTLASS with
``backend="cutlass"``). It takes 2-D contiguous fp16 / bf16 CUDA weights whose sides are
multiples of the backend's block (CUTLASS fp16: 32 rows x 64 columns). The speed-up appears for
large layers and batches (MaskLLM / the PyTorch tutorial: 1.3-1.4x; none at batch 1);
bench/sparse_speed.py measures it. On an H200 (torch 2.11, cuSPARSELt 0.8) it did not: the sparse
F.linear was slower at every size timed (docs/RESULTS.md, "2:4 kernels on a GPU"). CUTLASS runs
on compute capability 8.x only. Weights become inference-only (no backward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lm.sparsity.masks import NM, check_nm

__all__ = ["SEMI_STRUCTURED_DTYPES", "require_semi_structured_device", "to_semi_structured"]

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
TWO_FOUR = NM(2, 4)


def require_semi_structured_device(device: torch.device | str, backend: str = "auto") -> None:
    """Raise ValueError unless `device` is a CUDA GPU with compute capability >= 8.0, and 8.x
    where the kernels would be CUTLASS's (``backend="cutlass"``, or a torch built without
    cuSPARSELt): torch's CUTLASS 2:4 kernels run only there (on an H200, 9.0, they converted the
    weights and then failed at the first matmul)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"semi-structured 2:4 kernels run on CUDA GPUs (compute capability >= 8.0), received "
            f"device {device}; load the model with device='cuda' on a machine with a GPU"
        )
    if not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ValueError(
            f"semi-structured 2:4 kernels need compute capability >= 8.0 (Ampere or newer), "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}"
        )
    if major != 8 and backend == "cutlass":
        raise ValueError(
            f"torch's CUTLASS 2:4 kernels run only on compute capability 8.x (Ampere, Ada); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use backend='auto' "
            "(cuSPARSELt)"
        )
    if major != 8 and not torch.backends.cusparselt.is_available():
        raise ValueError(
            f"this torch has no cuSPARSELt, so backend='auto' would fall back to CUTLASS, whose "
            f"2:4 kernels run only on compute capability 8.x; {torch.cuda.get_device_name(device)} "
            f"has {major}.{minor}"
        )


@torch.no_grad()
def to_semi_structured(model: nn.Module, names: Sequence[str], backend: str = "auto") -> None:
    """Replace the weight of every named nn.Linear (2:4 sparse, fp16/bf16, on CUDA) with a
    SparseSemiStructuredTensor, in place. backend: auto (cuSPARSELt where built, else CUTLASS)
    or cutlass. Raises ValueError naming the first layer that does not qualify."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend not in ("auto", "cutlass"):
        raise ValueError(f"backend must be 'auto' or 'cutlass', received {backend!r}")
    modules = dict(model.named_modules())
    layers: dict[str, nn.Linear] = {}
    for name in names:
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name}: expected an nn.Linear, found {type(layer).__name__}")
        weight = layer.weight
        require_semi_structured_device(weight.device, backend)
        if weight.dtype not in SEMI_STRUCTURED_DTYPES:
            raise ValueError(
                f"{name}: semi-structured kernels take fp16 or bf16 weights, received "
                f"{weight.dtype}; cast the model first (load_sparse_model(..., dtype='fp16'))"
            )
        check_nm(weight, TWO_FOUR, exact=False, name=f"{name}.weight")
        layers[name] = layer
    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        for name, layer in layers.items():
            try:
                sparse = to_sparse_semi_structured(layer.weight.detach().contiguous())
            except RuntimeError as err:
                raise ValueError(f"{name}: cannot convert to semi-structured ({err})") from err
            layer.weight = nn.Parameter(sparse, requires_grad=False)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
