"""Recurrence across fixed windows: train a memory module on a (frozen) causal LM so it carries a
state from window to window, and measure held-out NLL beyond the first window.

    python -m train.decoding_recurrence --out out/recurrence             # SmolLM2, documented run
    python -m train.decoding_recurrence --out out/recurrence --model smollm2-135m-instruct \\
        --window 64 --memory 8 --train-windows 2 --steps 120 --batch-size 4 --eval-windows 4 \\
        --eval-rows 20
    python -m train.decoding_recurrence --out /tmp/r --model tiny-random-llama --window 8 \\
        --memory 2 --steps 3 --batch-size 2 --eval-windows 2 --eval-rows 2   # seconds: smoke

Training rows are --train-windows x --window consecutive tokens of the corpus' train split
(lm.corpus packing); each step reads a row window by window (lm.decoding.recurrence), the state
of window k computed from window k-1's hidden states, and back-propagates the NLL of windows
2.. through the states (window 1 has no state; with --finetune-model the model learns too and
window 1 is in the loss). Evaluation reads held-out rows of --eval-windows windows four ways,
scoring tokens 1..W-1 of every window:

- fixed window: every window alone (the unmodified model with a context of W tokens);
- recurrent: the trained state carried from window to window;
- shuffled state: window k gets the state another row carried (a control: a learned prefix that
  carries nothing about this text);
- previous window in context: window k is run after the raw tokens of window k-1 (2W tokens of
  attention, a reference for what one window of context is worth).

Outputs in --out: decoding_recurrence.json, .md, .png and stages/memory (the trained module,
a core checkpoint; lm.decoding.load_recurrent_memory reads it; --resume reuses it).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.runtime import resolve_device, seed_everything
from lm.corpus import pack_documents, pydoc_corpus, text_files_corpus, tokenize_documents
from lm.decoding import RecurrentMemory, windowed_nll
from lm.loading import load_causal_lm
from train.common import batch_indices
from train.decoding_common import other_process, train_stage, write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.decoding_recurrence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="causal LM source")
    parser.add_argument("--corpus", default="pydoc", help="pydoc | files:GLOB")
    parser.add_argument("--window", type=int, default=64, help="W: tokens per window")
    parser.add_argument("--memory", type=int, default=8, help="M: state vectors")
    parser.add_argument("--memory-heads", type=int, default=4)
    parser.add_argument("--source-layer", type=int, default=-1, help="hidden_states index")
    parser.add_argument("--train-windows", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--finetune-model", action="store_true", help="train the LM too")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--eval-rows", type=int, default=20, help="held-out rows; 0 = all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse a finished stage in --out")
    return parser


def rows_of(tokenizer: Any, docs: list[str], length: int, n: int = 0) -> torch.Tensor:
    rows = pack_documents(tokenize_documents(tokenizer, docs), length, tokenizer.eos_token_id)
    rows = rows[:n] if n else rows
    if not len(rows):
        raise ValueError(f"the text is shorter than one row of {length} tokens")
    return torch.from_numpy(rows)


@torch.no_grad()
def previous_window_nll(model: Any, ids: torch.Tensor, window: int) -> torch.Tensor:
    """(B, n) NLL of tokens 1..W-1 of every window with the previous window's tokens before it
    (window 1: alone)."""
    out = []
    for k in range(ids.shape[1] // window):
        lo = max(0, (k - 1) * window)
        chunk = ids[:, lo : (k + 1) * window]
        logits = model(input_ids=chunk, use_cache=False).logits[:, -window:-1].float()
        target = ids[:, k * window + 1 : (k + 1) * window]
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        out.append(nll.mean(dim=1))
    return torch.stack(out, dim=1)


@torch.no_grad()
def evaluate(
    model: Any, memory: RecurrentMemory, rows: torch.Tensor, args: argparse.Namespace
) -> dict[str, list[float]]:
    per: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("fixed", "recurrent", "shuffled", "previous")
    }
    batch = 4
    starts = range(0, len(rows), batch)
    carried_all: list[list[torch.Tensor]] = []
    for s in tqdm(starts, desc="evaluate", unit="batch"):
        ids = rows[s : s + batch].to(args.device)
        per["fixed"].append(windowed_nll(model, None, ids, args.window)[0])
        nll, carried = windowed_nll(model, memory, ids, args.window)
        per["recurrent"].append(nll)
        carried_all.append(carried)
        per["previous"].append(previous_window_nll(model, ids, args.window))
    # shuffled: every row gets the states the next row (cyclically) carried
    states = [torch.cat([c[k] for c in carried_all]) for k in range(len(carried_all[0]))]
    shift = [torch.roll(s, 1, dims=0) for s in states]
    for s in starts:
        ids = rows[s : s + batch].to(args.device)
        sub = [st[s : s + batch] for st in shift]
        per["shuffled"].append(windowed_nll(model, memory, ids, args.window, states=sub)[0])
    return {k: torch.cat(v).mean(dim=0).tolist() for k, v in per.items()}


NAMES = {
    "fixed": "fixed window (no state)",
    "recurrent": "recurrent state",
    "shuffled": "shuffled state (control)",
    "previous": "previous window in context (2W)",
}


def markdown(nll: dict[str, list[float]], header: str) -> str:
    n = len(nll["fixed"])
    cols = " | ".join(f"window {k + 1}" for k in range(n))
    lines = [
        header,
        "",
        f"| reading | {cols} | mean of windows 2..{n} | ppl, windows 2..{n} |",
        "|---|" + "---:|" * (n + 2),
    ]
    for key, name in NAMES.items():
        later = statistics.fmean(nll[key][1:]) if n > 1 else nll[key][0]
        vals = " | ".join(f"{v:.4f}" for v in nll[key])
        lines.append(f"| {name} | {vals} | {later:.4f} | {torch.tensor(later).exp():.2f} |")
    return "\n".join(lines) + "\n"


def plot(nll: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, name in NAMES.items():
        ax.plot(range(1, len(nll[key]) + 1), nll[key], marker="o", label=name)
    ax.set_xlabel("window")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if other_process("python -m train.decoding_recurrence"):
        return 0
    if args.window < 3 or args.memory < 1 or args.train_windows < 2 or args.eval_windows < 2:
        parser.error("--window >= 3, --memory >= 1, --train-windows and --eval-windows >= 2")
    if min(args.steps, args.batch_size) < 1 or args.eval_rows < 0:
        parser.error("--steps and --batch-size must be >= 1, --eval-rows >= 0")
    args.device = resolve_device(args.device)
    seed_everything(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model, device=args.device)
    model.requires_grad_(args.finetune_model)
    model.eval()  # no dropout; training mode only matters for the module's own layers
    memory = RecurrentMemory.for_model(model, args.memory, args.memory_heads, args.source_layer)
    if args.corpus == "pydoc":
        corpus = pydoc_corpus()
    elif args.corpus.startswith("files:"):
        corpus = text_files_corpus(args.corpus.removeprefix("files:"))
    else:
        parser.error(f"--corpus must be pydoc or files:GLOB, received {args.corpus!r}")
    train_rows = rows_of(tokenizer, corpus.train, args.train_windows * args.window)
    eval_rows = rows_of(tokenizer, corpus.heldout, args.eval_windows * args.window, args.eval_rows)
    order = batch_indices(len(train_rows), args.batch_size, args.seed)
    first = 0 if args.finetune_model else 1  # window 1 has no state to learn from

    def step_loss(step: int) -> torch.Tensor:
        ids = train_rows[next(order)].to(args.device)
        nll, _ = windowed_nll(model, memory, ids, args.window)
        return nll[:, first:].mean()

    # what lm.decoding.load_recurrent_memory rebuilds: the module, or module + model
    trained: torch.nn.Module = (
        torch.nn.ModuleDict({"memory": memory, "model": model}) if args.finetune_model else memory
    )
    config = {
        k: getattr(args, k)
        for k in (
            "model",
            "corpus",
            "window",
            "memory",
            "memory_heads",
            "source_layer",
            "train_windows",
            "steps",
            "batch_size",
            "lr",
            "finetune_model",
            "seed",
        )
    }
    stats = train_stage(
        "memory",
        trained,
        trained.parameters(),
        step_loss,
        steps=args.steps,
        lr=args.lr,
        out=args.out,
        config=config,
        resume=args.resume,
        warmup=20,
    )
    model.eval()
    memory.eval()
    nll = evaluate(model, memory, eval_rows, args)
    header = (
        f"Recurrence across windows of {args.window} tokens on {args.model} "
        f"({'fine-tuned' if args.finetune_model else 'frozen'}; memory of {args.memory} "
        f"vectors trained {args.steps} steps x {args.batch_size} rows x {args.train_windows} "
        f"windows of {args.corpus} train text); held-out NLL (nats/token) of tokens 1..W-1 per "
        f"window, {len(eval_rows)} rows x {args.eval_windows} windows"
    )
    text = markdown(nll, header)
    result = {
        "command": f"python -m train.decoding_recurrence {shlex.join(argv)}",
        "header": header,
        "seconds": time.perf_counter() - t0,
        "training": stats,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "nll": nll,
    }
    write_report(args.out, "decoding_recurrence", result, text, lambda png: plot(nll, png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
