"""ADJUST on a synthetic constrained language: train a masked diffusion LM, then its one-layer
sampler, and table exact (K = 1), marginal (K = 4) and ADJUST (K = 4) sampling.

    python -m train.decoding_adjust --out out/adjust                      # the documented run
    python -m train.decoding_adjust --out out/adjust --mdlm-steps 2000 --sampler-steps 1500 \\
        --hidden 128 --layers 4 --samples 20000 --resume
    python -m train.decoding_adjust --out /tmp/adj --mdlm-steps 20 --sampler-steps 10 \\
        --hidden 32 --layers 1 --samples 200                              # seconds: smoke test

The language (lm.decoding.synthetic.WalkLanguage): --length tokens over --values symbols, each
next token the previous +1 (probability --p-up) or -1 mod V. Hard constraint: every adjacent pair
differs by +-1 mod V. Stage 1 trains a BertForMaskedLM with the masked diffusion objective
(lm.decoding.adjust) on fresh samples every step; stage 2 freezes it and trains ADJUST's sampler
to match the model's one-at-a-time conditionals with up to K - 1 tokens already revealed.

Table, --samples sequences per row, all from all-MASK with random unmasking order:
- validity: share of samples that keep every constraint;
- TV to the language: 0.5 * sum |p_hat - p| over all sequences (the support is V * 2^(L-1)
  sequences, so it is exact; invalid samples count fully), with the floor a perfect sampler
  reaches with the same number of samples (exact samples from the language);
- full passes of the diffusion LM per sequence and sampler passes.

Outputs in --out: decoding_adjust.json, decoding_adjust.md, decoding_adjust.png, and stages/
(the trained diffusion LM and sampler, core checkpoints; --resume reuses them).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.runtime import seed_everything
from lm.decoding import (
    ADJUSTSampler,
    WalkLanguage,
    build_masked_diffusion_lm,
    masked_diffusion_loss,
    sample_masked_diffusion,
    sampler_loss,
    total_variation,
)
from train.decoding_common import other_process, train_stage, write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.decoding_adjust",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--values", type=int, default=5, help="V: symbols")
    parser.add_argument("--length", type=int, default=8, help="L: tokens per sequence")
    parser.add_argument("--p-up", type=float, default=0.7)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mdlm-steps", type=int, default=2000)
    parser.add_argument("--sampler-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tokens-per-step", type=int, default=4, help="K")
    parser.add_argument("--samples", type=int, default=20000, help="sequences per table row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse finished stages in --out")
    return parser


def evaluate(
    name: str,
    lang: WalkLanguage,
    x: torch.Tensor,
    passes: int,
    sampler_passes: int,
    support: torch.Tensor,
    probs: torch.Tensor,
) -> dict[str, Any]:
    return {
        "sampler": name,
        "validity": float(lang.is_valid(x).float().mean()),
        "tv": total_variation(x, support, probs),
        "full_passes": passes,
        "sampler_passes": sampler_passes,
    }


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| sampler | constraint validity | TV to the language | full passes / sequence | "
        "sampler passes / sequence |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {100 * r['validity']:.1f}% | {r['tv']:.3f} | "
            f"{r['full_passes']} | {r['sampler_passes']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [r["sampler"] for r in rows]
    axes[0].bar(names, [100 * r["validity"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("constraint validity (%)")
    axes[1].bar(names, [r["tv"] for r in rows], color="tab:orange")
    axes[1].set_ylabel("TV distance to the language")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if other_process("python -m train.decoding_adjust"):
        return 0
    if args.tokens_per_step < 2 or args.tokens_per_step > args.length:
        parser.error(f"--tokens-per-step must be in [2, --length={args.length}]")
    if min(args.mdlm_steps, args.sampler_steps, args.samples, args.batch_size) < 1:
        parser.error("--mdlm-steps, --sampler-steps, --samples and --batch-size must be >= 1")
    seed_everything(args.seed)
    lang = WalkLanguage(args.values, args.length, args.p_up)
    mask_id = args.values  # ids 0..V-1 are symbols, V is MASK
    t0 = time.perf_counter()
    mdlm = build_masked_diffusion_lm(
        args.values + 1, args.length, args.hidden, args.layers, args.heads
    )
    data = torch.Generator().manual_seed(args.seed)
    mdlm_config = {
        k: getattr(args, k)
        for k in (
            "values",
            "length",
            "p_up",
            "hidden",
            "layers",
            "heads",
            "mdlm_steps",
            "batch_size",
            "lr",
            "seed",
        )
    }
    stats = {
        "mdlm": train_stage(
            "mdlm",
            mdlm,
            mdlm.parameters(),
            lambda step: masked_diffusion_loss(
                mdlm, lang.sample(args.batch_size, data), mask_id, data
            ),
            steps=args.mdlm_steps,
            lr=args.lr,
            out=args.out,
            config=mdlm_config,
            resume=args.resume,
        )
    }
    mdlm.requires_grad_(False)
    sampler = ADJUSTSampler.from_mdlm(mdlm, num_heads=args.heads)
    stats["sampler"] = train_stage(
        "sampler",
        sampler,
        sampler.parameters(),
        lambda step: sampler_loss(
            mdlm, sampler, lang.sample(args.batch_size, data), mask_id, args.tokens_per_step, data
        ),
        steps=args.sampler_steps,
        lr=args.lr,
        out=args.out,
        config={**mdlm_config, "sampler_steps": args.sampler_steps, "k": args.tokens_per_step},
        resume=args.resume,
    )
    support, probs = lang.support()
    K, N, L = args.tokens_per_step, args.samples, args.length
    rows = []
    settings = [("K=1 exact", 1, None), (f"K={K} marginal", K, None), (f"K={K} ADJUST", K, sampler)]
    for name, k, smp in tqdm(settings, desc=f"sampling {N} sequences", unit="sampler"):
        gen = torch.Generator().manual_seed(args.seed + 1)
        x, passes = sample_masked_diffusion(
            mdlm, N, L, mask_id, tokens_per_step=k, sampler=smp, generator=gen
        )
        sampler_passes = L - passes if smp is not None else 0
        rows.append(evaluate(name, lang, x, passes, sampler_passes, support, probs))
    exact = lang.sample(N, torch.Generator().manual_seed(args.seed + 2))
    floor = evaluate("exact samples of the language (floor)", lang, exact, 0, 0, support, probs)
    rows.append(floor)
    header = (
        f"ADJUST on the walk language (V = {args.values}, L = {args.length}, p_up = {args.p_up}; "
        f"{len(support)} valid sequences), {N} samples per row; diffusion LM "
        f"{args.layers} x {args.hidden} trained {args.mdlm_steps} steps, sampler "
        f"{args.sampler_steps} steps, batch {args.batch_size}"
    )
    text = markdown(rows, header)
    result = {
        "command": f"python -m train.decoding_adjust {shlex.join(argv)}",
        "header": header,
        "seconds": time.perf_counter() - t0,
        "training": stats,
        "rows": rows,
    }
    write_report(args.out, "decoding_adjust", result, text, lambda png: plot(rows, png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
