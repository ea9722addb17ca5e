"""Device check: dense vs 2:4 semi-structured sparse linear layers on a CUDA GPU (sm80+).

    # the linear-layer shapes of SmolLM2-135M (random 2:4 weights; speed does not depend on them)
    python -m bench.sparse_speed --model smollm2-135m-instruct --out runs/bench_sparse
    # the same shapes without loading the model (its 30 blocks: q, o; k, v; gate, up; down)
    python -m bench.sparse_speed --shapes 576x576*60,192x576*60,1536x576*60,576x1536*30 \\
        --out runs/bench_sparse
    # LLaMA-2-7B's shapes, bf16, CUTLASS kernels (compute capability 8.x only)
    python -m bench.sparse_speed --shapes 4096x4096,11008x4096,4096x11008 --dtype bf16 \\
        --backend cutlass --tokens 1,16,256,2048,8192 --out runs/bench_sparse_7b

For every weight shape (out x in) and every number of input tokens B: the median time of
F.linear(x (B, in), W (out, in)) with the dense fp16/bf16 W and with W converted by
torch.sparse.to_sparse_semi_structured after magnitude 2:4 pruning (CUDA events, --warmup then
--repeats calls each, interleaved). The "model" rows weigh each shape by how often it occurs in
the decoder blocks (one forward of all pruned linear layers). Ratio = dense / sparse time (> 1:
sparse is faster). Expect ~1.3x only for large layers and many tokens, none at B = 1.

Outputs in --out: ``sparse_speed.json`` and ``sparse_speed.md``. Needs a CUDA GPU with compute
capability >= 8.0 (8.x for ``--backend cutlass``); anywhere else it exits with an error saying so.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.io import atomic_write_text
from lm.sparsity.masks import NM, apply_mask, topn_mask
from lm.sparsity.semi_structured import require_semi_structured_device

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """'576x1536,192x576*2' -> [(576, 1536), (192, 576), (192, 576)] as (out, in); ``*K``
    repeats a shape K times (how many such layers the model has)."""
    shapes = []
    for part in spec.split(","):
        shape, star, times = (x.strip() for x in part.strip().lower().partition("*"))
        dims = shape.split("x")
        if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"expected shapes like 4096x11008 (out x in), received {part!r}")
        if star and not (times.isdigit() and int(times) > 0):
            raise ValueError(f"expected a positive repeat like 4096x11008*32, received {part!r}")
        shapes += [(int(dims[0]), int(dims[1]))] * int(times or 1)
    return shapes


def parse_ints(spec: str) -> list[int]:
    values = [int(v) for v in spec.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers like 1,16,256, received {spec!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sparse_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model source whose prunable linear shapes are timed")
    what.add_argument("--shapes", help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--tokens", default="1,16,64,256,1024,4096", help="input rows B")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--backend", choices=("auto", "cutlass"), default="auto")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda", help="a CUDA device (cuda, cuda:N)")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def model_shapes(source: str) -> Counter[tuple[int, int]]:
    """How many prunable linear layers of each (out, in) shape the model has."""
    import lm.tnl  # noqa: F401  (registers TNL with the Auto classes)
    from lm.loading import load_causal_lm
    from lm.sparsity.masks import prunable_linears

    model, _ = load_causal_lm(source, frozen=True)
    layers = prunable_linears(model, NM(2, 4))
    return Counter(tuple(layer.weight.shape) for layer in layers.values())  # type: ignore[misc]


def time_pair(
    weight: torch.Tensor, sparse: torch.Tensor, x: torch.Tensor, warmup: int, repeats: int
) -> tuple[float, float]:
    """Median milliseconds of F.linear with the dense and the sparse weight (interleaved)."""
    for _ in range(warmup):
        F.linear(x, weight)
        F.linear(x, sparse)
    dense_ms: list[float] = []
    sparse_ms: list[float] = []
    for _ in range(repeats):
        for w, times in ((weight, dense_ms), (sparse, sparse_ms)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            F.linear(x, w)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(dense_ms), statistics.median(sparse_ms)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        tokens = parse_ints(args.tokens)
        counts = Counter(parse_shapes(args.shapes)) if args.shapes else None
        require_semi_structured_device(args.device, args.backend)
    except ValueError as err:
        parser.error(str(err))
    if counts is None:
        counts = model_shapes(args.model)
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = args.backend == "cutlass"
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for (out_f, in_f), count in counts.items():
            dense = torch.randn(out_f, in_f, device=device, dtype=dtype)
            dense = apply_mask(dense, topn_mask(dense.abs(), NM(2, 4)))
            sparse = to_sparse_semi_structured(dense)
            for b in tokens:
                x = torch.randn(b, in_f, device=device, dtype=dtype)
                d_ms, s_ms = time_pair(dense, sparse, x, args.warmup, args.repeats)
                rows.append(
                    {"shape": f"{out_f}x{in_f}", "count": count, "tokens": b,
                     "dense_ms": d_ms, "sparse_ms": s_ms, "ratio": d_ms / s_ms}
                )  # fmt: skip
    for b in tokens:
        at_b = [r for r in rows if r["tokens"] == b]
        d = sum(r["dense_ms"] * r["count"] for r in at_b)
        s = sum(r["sparse_ms"] * r["count"] for r in at_b)
        rows.append({"shape": "model", "count": sum(counts.values()), "tokens": b,
                     "dense_ms": d, "sparse_ms": s, "ratio": d / s})  # fmt: skip
    lines = [
        f"Dense vs 2:4 semi-structured F.linear, {args.dtype}, {torch.cuda.get_device_name(device)}"
        f", torch {torch.__version__}, median of {args.repeats}",
        "",
        "| shape (out x in) | layers | tokens | dense ms | sparse ms | speed-up |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['shape']} | {r['count']} | {r['tokens']} | {r['dense_ms']:.4f} | "
            f"{r['sparse_ms']:.4f} | {r['ratio']:.2f}x |"
            for r in rows
        ],
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python -m bench.sparse_speed " + shlex.join(argv), "rows": rows}
    atomic_write_text(args.out / "sparse_speed.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "sparse_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
