"""VLM training throughput and model FLOP utilisation against this machine's bf16 matmul peak.

    python -m bench.mfu --data out/shapeworld                   # shapes preset, 5 timed steps
    python -m bench.mfu --data out/shapeworld --threads 2 --steps 8 --json out/mfu.json
    python -m bench.mfu --preset tiny --data out/tiny --quick   # seconds: the smoke-test size

Both figures come from one run, with the same thread count:

1. Peak: the median time of a square bf16 matmul (``--peak-size``, default 2048) on CPU, as
   2 n^3 / t FLOP/s. This is what the machine's matmul kernels (oneDNN; AMX where the CPU has it)
   deliver on a large, well-shaped problem: the practical peak, not a datasheet figure.
2. Training: train.vlm's step (instruction conversations from a ShapeWorld split, bf16 autocast,
   forward, backward, AdamW on the projector) timed over ``--steps`` steps after one untimed
   step. Tokens/s counts every non-padding token of each batch.

Model FLOPs per step are what the step must compute, counted from the shapes (not measured):

- frozen LLM: forward 2 * N_body FLOPs per token, backward 2 * N_body (gradients flow to the
  inputs only: the LLM's weights get no gradient, so the usual 6N becomes 4N); N_body = the
  weights of the transformer blocks' linear layers;
- attention scores and values: 4 * T * d per token per layer forward (causal: half of the T x T
  products are masked but still computed by SDPA; padded length T), and twice that backward
  (dQ, dK, dV are all needed to reach the inputs);
- the LM head only at the labelled positions (train.vlm computes no other logits): 2 * V * d
  forward + 2 * V * d backward per labelled token;
- projector: 6 * N_proj per visual token (its weights do get gradients); CLIP runs under no_grad:
  2 * N_clip per image patch, forward only (approximated by its linear layers);
- the image LoRA (``--lora-rank``; train.vlm's): 6 * N_lora per token of a batch with images (it
  is off otherwise), its A and B matrices get weight gradients; they are not part of N_body.

``--merge``, ``--lora-rank`` and ``--lora-targets`` set the projector's patch merge and the image
LoRA as train.vlm's options of the same names do (default: the preset's), so the figure is for
the model trained.

MFU = model FLOPs per second / peak. Prints a markdown table; writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from core.io import atomic_write_text
from data.conversations import instruct_conversation, read_chat_records
from vlm.config import PolychromeConfig
from vlm.model import FEATURES, IGNORE_INDEX, PolychromeVLM


def matmul_peak(size: int, repeats: int) -> float:
    """Median bf16 FLOP/s of a (size x size) @ (size x size) matmul."""
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    a @ b  # warm up kernels
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - began)
    return 2 * size**3 / statistics.median(times)


def _linear_params(module: nn.Module) -> int:
    """Weights of `module`'s linear layers, a LoRA's A and B matrices not included."""
    return sum(
        m.weight.numel()
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and "lora_" not in n
    )


def _lora_params(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)


def step_flops(vlm: PolychromeVLM, batch: dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one training step on `batch` (module docstring)."""
    cfg = vlm.llm.config.get_text_config()
    d, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    vocab = int(vlm.llm.get_output_embeddings().weight.shape[0])
    body = _linear_params(vlm.llm.base_model)
    mask = batch["attention_mask"]
    tokens = float(mask.sum())
    seq = mask.shape[1]
    labelled = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    n_images = 0 if "pixel_values" not in batch else batch["pixel_values"].shape[0]
    proj = _linear_params(vlm.projector)
    clip_patches = n_images * vlm.tokens_per_image * vlm.config.projector.merge**2
    flops = 4 * body * tokens  # frozen body: forward + input-gradient backward
    if n_images:  # the image LoRA runs for batches with images (train.vlm's always have them)
        flops += 6 * _lora_params(vlm.llm) * tokens
    flops += 3 * 4 * seq * seq * d * layers * mask.shape[0]  # attention, fwd + bwd, padded
    flops += 4 * vocab * d * labelled
    flops += 6 * proj * n_images * vlm.tokens_per_image
    flops += 2 * _linear_params(vlm.clip.visual) * clip_patches * vlm.clip_passes
    return flops


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mfu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="preset (its LLM, CLIP, projector)")
    parser.add_argument("--data", type=Path, required=True, help="a ShapeWorld folder")
    parser.add_argument("--split", default="train", help="split to draw conversations from")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--merge", type=int, default=None, help="projector patch merge (default: the preset's)"
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="image LoRA rank, as train.vlm's (0 = none; default: the preset's)",
    )
    parser.add_argument(
        "--lora-targets", nargs="+", default=None, metavar="MODULE", help="as train.vlm's"
    )
    parser.add_argument(
        "--features", choices=FEATURES, default=None, help="as train.vlm's (default: the preset's)"
    )
    parser.add_argument("--window", type=int, default=None, help="as train.vlm's")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--peak-size", type=int, default=2048, help="square matmul side")
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.steps, args.peak_size, args.peak_repeats, args.batch_size = 2, 256, 3, 2
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    if not (args.data / args.split / "metadata.jsonl").is_file():
        parser.error(f"{args.data / args.split / 'metadata.jsonl'} not found")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PolychromeConfig.from_preset(args.preset)
    try:
        cfg = preset.vlm.core_config(
            preset.llm,
            preset.clip,
            merge=args.merge,
            features=args.features,
            window=args.window,
            lora_rank=args.lora_rank,
            lora_targets=args.lora_targets,
        )
        vlm = PolychromeVLM.build(cfg)
    except ValueError as err:  # a merge that does not divide the grid, a negative rank
        parser.error(str(err))
    records = read_chat_records(args.data / args.split, limit=args.batch_size * (args.steps + 1))
    if len(records) < args.batch_size * (args.steps + 1):
        parser.error(f"{args.split} has {len(records)} images; need batch-size x (steps + 1)")
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)

    peak = matmul_peak(args.peak_size, args.peak_repeats)
    times, tokens, flops = [], [], []
    for step in tqdm(range(args.steps + 1), desc="train steps", unit="step"):
        chunk = records[step * args.batch_size : (step + 1) * args.batch_size]
        batch = vlm.collate([instruct_conversation(r, rng) for r in chunk])
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = vlm(**batch)
        assert out.loss is not None
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - began
        if step == 0:
            continue  # untimed warm-up step
        times.append(elapsed)
        tokens.append(float(batch["attention_mask"].sum()))
        flops.append(step_flops(vlm, batch))
    tok_s = [t / s for t, s in zip(tokens, times, strict=True)]
    flop_s = [f / s for f, s in zip(flops, times, strict=True)]
    result: dict[str, Any] = {
        "preset": args.preset,
        "merge": cfg.projector.merge,
        "lora_rank": cfg.lora.rank,
        "lora_targets": cfg.lora.targets if cfg.lora.rank else [],
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "peak_bf16_flops": peak,
        "train_tokens_per_s_median": statistics.median(tok_s),
        "train_model_flops_per_s_median": statistics.median(flop_s),
        "mfu_median": statistics.median(flop_s) / peak,
        "step_s": times,
        "tokens_per_step": tokens,
        "command": "python -m bench.mfu " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    tok, model = result["train_tokens_per_s_median"], result["train_model_flops_per_s_median"]
    print(
        "| threads | bf16 matmul peak | training tokens/s | model FLOP/s | MFU |\n"
        "|---|---|---|---|---|\n"
        f"| {result['threads']} | {peak / 1e9:.1f} GFLOP/s | {tok:.0f} | "
        f"{model / 1e9:.1f} GFLOP/s | {100 * result['mfu_median']:.1f}% |"
    )
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
