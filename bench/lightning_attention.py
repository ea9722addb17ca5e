"""Lightning (blocked linear) attention vs softmax attention (SDPA) on CPU, side by side in one run.

    python -m bench.lightning_attention                          # n = 512 ... 16384, 3 repeats
    python -m bench.lightning_attention --lengths 1024 4096 --repeats 5 --json out/la.json
    python -m bench.lightning_attention --quick                  # seconds: the smoke-test size

Part 1, attention alone: forward + backward of lm.tnl.lightning_attention (decayed linear
attention, plain torch, autograd through the block loop) vs F.scaled_dot_product_attention
(causal) on the same (B, nh, n, hd) inputs. Time: median wall clock over --repeats after
--warmup untimed runs. Memory: the bytes autograd keeps for backward (inputs included), counted
with torch.autograd.graph.saved_tensors_hooks and deduplicated by storage: the activation memory
that grows with n. It does not count transient buffers freed within the forward pass; CPU has no
allocator peak counter comparable to torch.cuda.max_memory_allocated.

Part 2, decoding: tiny TNL models, lightning (recurrent state cache) and softmax (KV cache), same
sizes and random weights. After a prefill of `context` tokens, the median ms per new token over
--decode-tokens greedy steps, and the bytes the cache holds.

Prints markdown tables of the ratios (lightning / softmax) and where the time and memory curves
cross (log-log interpolation between measured lengths); writes JSON with --json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.io import atomic_write_text
from lm.tnl import TNLCache, TNLConfig, TNLForCausalLM, lightning_attention, tnl_decay_rates

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run fn() and return (its output, bytes of the storages autograd saved for backward)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def crossover(lengths: list[int], ratios: list[float]) -> float | None:
    """The n where ratio(n) crosses 1, interpolating log ratio linearly in log n between the
    first pair of neighbouring lengths on opposite sides; None if it never crosses."""
    pairs = list(zip(lengths, ratios, strict=True))
    for (n1, r1), (n2, r2) in itertools.pairwise(pairs):
        if r1 == 1.0:
            return float(n1)
        if (r1 - 1.0) * (r2 - 1.0) < 0:
            a, b = math.log(r1), math.log(r2)
            return math.exp(math.log(n1) + a / (a - b) * (math.log(n2) - math.log(n1)))
    if pairs and pairs[-1][1] == 1.0:
        return float(pairs[-1][0])
    return None


def _fwd_bwd(
    fn: AttentionFn, shape: tuple[int, ...], generator: torch.Generator
) -> tuple[float, int]:
    """(seconds, saved bytes) of one forward + backward on fresh random inputs."""
    q, k, v = ((torch.randn(shape, generator=generator) * 0.5).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=generator)
    t0 = time.perf_counter()
    out, saved = saved_tensor_bytes(lambda: fn(q, k, v))
    out.backward(grad)
    return time.perf_counter() - t0, saved


def bench_attention(args: argparse.Namespace) -> list[dict[str, float]]:
    decay = torch.tensor(tnl_decay_rates(args.heads, 0, 2))  # the fastest-decaying layer

    def lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return lightning_attention(q, k, v, decay, args.block_size)[0]

    def softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in tqdm(args.lengths, desc="attention fwd+bwd"):
        shape = (args.batch, args.heads, n, args.head_dim)
        result: dict[str, float] = {"n": n}
        for name, fn in (("lightning", lightning), ("softmax", softmax)):
            for _ in range(args.warmup):
                _fwd_bwd(fn, shape, generator)
            runs = [_fwd_bwd(fn, shape, generator) for _ in range(args.repeats)]
            result[f"{name}_ms"] = 1000 * statistics.median(r[0] for r in runs)
            result[f"{name}_saved_mb"] = runs[0][1] / 2**20
        result["time_ratio"] = result["lightning_ms"] / result["softmax_ms"]
        result["memory_ratio"] = result["lightning_saved_mb"] / result["softmax_saved_mb"]
        rows.append(result)
    return rows


def _decode_model(
    attention_type: Literal["lightning", "softmax"], args: argparse.Namespace
) -> TNLForCausalLM:
    torch.manual_seed(0)
    config = TNLConfig(
        vocab_size=args.decode_vocab,
        hidden_size=args.decode_hidden,
        intermediate_size=2 * args.decode_hidden,
        num_hidden_layers=args.decode_layers,
        num_attention_heads=args.heads,
        attention_type=attention_type,
        block_size=args.block_size,
    )
    return TNLForCausalLM(config).eval()


@torch.no_grad()
def bench_decode(args: argparse.Namespace) -> list[dict[str, float]]:
    models = {
        "lightning": _decode_model("lightning", args),
        "softmax": _decode_model("softmax", args),
    }
    generator = torch.Generator().manual_seed(0)
    rows = []
    for context in tqdm(args.decode_contexts, desc="decode"):
        prompt = torch.randint(0, args.decode_vocab, (1, context), generator=generator)
        result: dict[str, float] = {"context": context}
        for name, model in models.items():
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            result[f"{name}_prefill_s"] = time.perf_counter() - t0
            step_s = []
            for _ in range(args.decode_tokens):
                token = out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                out = model(token, cache=out.cache)
                step_s.append(time.perf_counter() - t0)
            cache = out.cache
            assert isinstance(cache, TNLCache)
            result[f"{name}_ms_per_token"] = 1000 * statistics.median(step_s)
            result[f"{name}_cache_mb"] = (
                sum(t.numel() * t.element_size() for t in cache.tensors()) / 2**20
            )
        result["ms_per_token_ratio"] = (
            result["lightning_ms_per_token"] / result["softmax_ms_per_token"]
        )
        rows.append(result)
    return rows


def _describe_crossing(what: str, at: float | None, rows: list[dict[str, float]], key: str) -> str:
    if at is not None:
        return f"{what}: the lines cross at n ≈ {at:.0f} (lightning/softmax = 1)."
    side = "below" if all(r[key] < 1 for r in rows) else "above"
    return f"{what}: no crossing in the measured range (ratio {side} 1 everywhere)."


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"Attention forward+backward, B={cfg['batch']} nh={cfg['heads']} hd={cfg['head_dim']}, "
        f"lightning block {cfg['block_size']}, median of {cfg['repeats']}, "
        f"{result['threads']} threads ({result['machine']})",
        "",
        "| n | lightning ms | softmax ms | time ratio L/S | lightning MB | softmax MB "
        "| memory ratio L/S |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["attention"]:
        lines.append(
            f"| {r['n']} | {r['lightning_ms']:.1f} | {r['softmax_ms']:.1f} | "
            f"{r['time_ratio']:.2f} | {r['lightning_saved_mb']:.1f} | "
            f"{r['softmax_saved_mb']:.1f} | {r['memory_ratio']:.2f} |"
        )
    lines += [
        "",
        _describe_crossing("Time", result["time_crossover_n"], result["attention"], "time_ratio"),
        _describe_crossing(
            "Memory (saved for backward)",
            result["memory_crossover_n"],
            result["attention"],
            "memory_ratio",
        ),
        "",
        f"Decoding, tiny models (hidden {cfg['decode_hidden']}, {cfg['decode_layers']} layers), "
        f"median of {cfg['decode_tokens']} tokens",
        "",
        "| context | TNL ms/token | softmax ms/token | ratio | TNL cache MB | softmax cache MB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["decode"]:
        lines.append(
            f"| {r['context']} | {r['lightning_ms_per_token']:.2f} | "
            f"{r['softmax_ms_per_token']:.2f} | {r['ms_per_token_ratio']:.2f} | "
            f"{r['lightning_cache_mb']:.3f} | {r['softmax_cache_mb']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384]
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128, help="lightning block length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[256, 8192])
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--decode-hidden", type=int, default=64)
    parser.add_argument("--decode-layers", type=int, default=2)
    parser.add_argument("--decode-vocab", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine more threads than free cores make "
        "OpenMP wait and the timings meaningless; 0 keeps torch's default)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats, args.warmup, args.block_size = [64, 128, 256], 1, 0, 32
        args.head_dim, args.decode_contexts, args.decode_tokens = 16, [16, 64], 3
        args.decode_hidden = 32
    for name in ("batch", "heads", "head_dim", "block_size", "repeats", "decode_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, received {getattr(args, name)}")
    if args.decode_hidden % args.heads:
        parser.error(f"--decode-hidden must be a multiple of --heads ({args.heads})")
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        attention = bench_attention(args)
        decode = bench_decode(args)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    lengths = [int(r["n"]) for r in attention]
    result: dict[str, Any] = {
        "config": {
            k: getattr(args, k)
            for k in (
                "lengths",
                "batch",
                "heads",
                "head_dim",
                "block_size",
                "repeats",
                "warmup",
                "decode_contexts",
                "decode_tokens",
                "decode_hidden",
                "decode_layers",
                "decode_vocab",
            )
        },
        "memory_method": "bytes of storages saved for backward (saved_tensors_hooks), inputs "
        "included, deduplicated by storage",
        "attention": attention,
        "time_crossover_n": crossover(lengths, [r["time_ratio"] for r in attention]),
        "memory_crossover_n": crossover(lengths, [r["memory_ratio"] for r in attention]),
        "decode": decode,
        "threads": threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    print(markdown(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
