"""RUM-SUNDAE on a small synthetic task: pretrain an MLM on unlabelled text, fine-tune it as a
non-autoregressive seq2seq model with SUNDAE, and measure accuracy vs refinement steps, against
the same seq2seq training from random weights.

    python -m train.decoding_sundae --out out/sundae                    # the documented run
    python -m train.decoding_sundae --out out/sundae --length 10 --mlm-steps 1000 \\
        --seq2seq-steps 800 --lr 1e-3 --hidden 64 --layers 3 --eval-pairs 2000 --resume
    python -m train.decoding_sundae --out /tmp/s --mlm-steps 5 --seq2seq-steps 5 --hidden 32 \\
        --layers 1 --eval-pairs 50 --refine-steps 1 2                   # seconds: smoke test

The task (lm.decoding.synthetic.PrefixSumTask): the source is a start value and --length - 1
UP / DOWN steps, the target the walk they describe, t_i = t_{i-1} +- 1 mod --values. Stage 1
pretrains a BertForMaskedLM with BERT's masked-LM objective on unlabelled text laid out like the
task input, [source-language string ; SEP ; target-language string], the two halves drawn
independently (never a translation pair). Then, --finetune-seeds times, a copy of it is
fine-tuned with SUNDAE's 2-step unrolled denoising loss on labelled pairs
(lm.decoding.nar_seq2seq), and so is a randomly initialised model of the same shape on the same
pairs and steps (the baseline). Both are decoded from uniformly
random drafts by argmax refinement; per number of steps the table has token accuracy, exact
sequence accuracy and the share of outputs that are valid walks, on --eval-pairs fresh pairs.

Outputs in --out: decoding_sundae.json, decoding_sundae.md, decoding_sundae.png, and stages/
(core checkpoints of the three models; --resume reuses finished stages).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from core.runtime import seed_everything
from lm.decoding import PrefixSumTask, build_mlm, mlm_loss, refine, sundae_loss
from train.decoding_common import other_process, train_stage, write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.decoding_sundae",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--values", type=int, default=8, help="V: target symbols")
    parser.add_argument("--length", type=int, default=10, help="L: target tokens")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlm-steps", type=int, default=1000)
    parser.add_argument("--seq2seq-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mlm-lr", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=1e-3, help="seq2seq fine-tuning lr")
    parser.add_argument("--eval-pairs", type=int, default=2000)
    parser.add_argument("--refine-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--mlm-corruption",
        choices=["bert", "mask-only"],
        default="bert",
        help="bert: selected tokens 80%% MASK / 10%% random / 10%% kept; mask-only: 100%% MASK",
    )
    parser.add_argument(
        "--finetune-seeds", type=int, default=2, help="seq2seq runs per initialisation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse finished stages in --out")
    return parser


@torch.no_grad()
def accuracy(
    model: Any,
    task: PrefixSumTask,
    src: torch.Tensor,
    tgt: torch.Tensor,
    steps: list[int],
    seed: int,
) -> list[dict[str, Any]]:
    drafts = refine(
        model,
        src,
        length=task.length,
        sep_id=task.sep_id,
        target_vocab=task.values,
        steps=max(steps),
        generator=torch.Generator().manual_seed(seed),
    )
    rows = []
    for k in sorted(steps):
        d = drafts[k - 1]
        rows.append(
            {
                "refine_steps": k,
                "token_accuracy": float((d == tgt).float().mean()),
                "sequence_accuracy": float((d == tgt).all(dim=1).float().mean()),
                "valid_walks": float(task.language().is_valid(d).float().mean()),
            }
        )
    return rows


def summarise(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per refinement step: the mean of every metric over runs, and each metric's min / max."""
    out = []
    for i, first in enumerate(runs[0]):
        row: dict[str, Any] = {"refine_steps": first["refine_steps"]}
        for key in ("token_accuracy", "sequence_accuracy", "valid_walks"):
            vals = [run[i][key] for run in runs]
            row[key] = statistics.fmean(vals)
            row[f"{key}_range"] = [min(vals), max(vals)]
        out.append(row)
    return out


def _cell(row: dict[str, Any], key: str) -> str:
    lo, hi = row[f"{key}_range"]
    spread = f" ({100 * lo:.1f}-{100 * hi:.1f})" if hi > lo else ""
    return f"{100 * row[key]:.1f}%{spread}"


def markdown(results: dict[str, list[dict[str, Any]]], header: str) -> str:
    lines = [
        header,
        "",
        "| initialisation | refinement steps | token accuracy | sequence accuracy | valid walks |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['refine_steps']} | {_cell(r, 'token_accuracy')} | "
                f"{_cell(r, 'sequence_accuracy')} | {_cell(r, 'valid_walks')} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, rows in results.items():
        ax.plot(
            [r["refine_steps"] for r in rows],
            [100 * r["sequence_accuracy"] for r in rows],
            marker="o",
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("refinement steps")
    ax.set_ylabel("exact sequence accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if other_process("python -m train.decoding_sundae"):
        return 0
    if (
        min(
            args.mlm_steps,
            args.seq2seq_steps,
            args.eval_pairs,
            args.batch_size,
            args.finetune_seeds,
        )
        < 1
    ):
        parser.error(
            "--mlm-steps, --seq2seq-steps, --eval-pairs, --batch-size and "
            "--finetune-seeds must be >= 1"
        )
    if min(args.refine_steps) < 1:
        parser.error("--refine-steps must be >= 1")
    seed_everything(args.seed)
    task = PrefixSumTask(args.values, args.length)
    t0 = time.perf_counter()
    max_length = 2 * args.length + 1

    def fresh(seed: int) -> Any:
        torch.manual_seed(seed)
        return build_mlm(task.vocab_size, max_length, args.hidden, args.layers, args.heads)

    base = {
        k: getattr(args, k)
        for k in ("values", "length", "hidden", "layers", "heads", "batch_size", "seed")
    }
    data = torch.Generator().manual_seed(args.seed)
    mlm = fresh(args.seed)

    fractions = (0.8, 0.1) if args.mlm_corruption == "bert" else (1.0, 0.0)

    def mlm_step(step: int) -> torch.Tensor:
        x, segments = task.unlabelled(args.batch_size, data)
        return mlm_loss(
            mlm,
            x,
            task.mask_id,
            random_vocab=task.values + 2,
            mask_fraction=fractions[0],
            random_fraction=fractions[1],
            generator=data,
            token_type_ids=segments,
        )

    mlm_config = {
        **base,
        "mlm_steps": args.mlm_steps,
        "lr": args.mlm_lr,
        "mlm_corruption": args.mlm_corruption,
    }
    stats = {
        "mlm": train_stage(
            "mlm",
            mlm,
            mlm.parameters(),
            mlm_step,
            steps=args.mlm_steps,
            lr=args.mlm_lr,
            out=args.out,
            config=mlm_config,
            resume=args.resume,
        )
    }
    pretrained = copy.deepcopy(mlm.state_dict())
    src, tgt = task.sample(args.eval_pairs, torch.Generator().manual_seed(args.seed + 7))
    runs: dict[str, list[list[dict[str, Any]]]] = {"MLM-initialised": [], "random init": []}
    for run in range(args.finetune_seeds):
        for name in runs:
            model = fresh(args.seed + 1000 * (run + 1))  # random init: a new seed per run
            if name == "MLM-initialised":
                model.load_state_dict(pretrained)
            # the same labelled pairs and corruption draws for both initialisations of a run
            pairs = torch.Generator().manual_seed(args.seed + 3 + run)

            def seq2seq_step(step: int, model: Any = model, pairs: Any = pairs) -> torch.Tensor:
                s, t = task.sample(args.batch_size, pairs)
                return sundae_loss(
                    model, s, t, sep_id=task.sep_id, target_vocab=task.values, generator=pairs
                )

            init = "mlm" if name == "MLM-initialised" else "random"
            stage = f"seq2seq_{init}_init_run{run}"
            stats[stage] = train_stage(
                stage,
                model,
                model.parameters(),
                seq2seq_step,
                steps=args.seq2seq_steps,
                lr=args.lr,
                out=args.out,
                config={
                    **base,
                    "init": mlm_config if init == "mlm" else "random",
                    "run": run,
                    "seq2seq_steps": args.seq2seq_steps,
                    "lr": args.lr,
                },
                resume=args.resume,
            )
            runs[name].append(accuracy(model, task, src, tgt, args.refine_steps, args.seed + 11))
    results = {name: summarise(r) for name, r in runs.items()}
    header = (
        f"RUM-SUNDAE on the prefix-sum task (V = {args.values}, L = {args.length}), "
        f"{args.eval_pairs} test pairs; BERT {args.layers} x {args.hidden}; MLM pretraining "
        f"{args.mlm_steps} steps x {args.batch_size} unlabelled rows, SUNDAE fine-tuning "
        f"{args.seq2seq_steps} steps x {args.batch_size} pairs; mean over "
        f"{args.finetune_seeds} fine-tuning runs (min-max in brackets)"
    )
    text = markdown(results, header)
    out = {
        "command": f"python -m train.decoding_sundae {shlex.join(argv)}",
        "header": header,
        "seconds": time.perf_counter() - t0,
        "training": stats,
        "results": results,
        "runs": runs,
    }
    write_report(args.out, "decoding_sundae", out, text, lambda png: plot(results, png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
