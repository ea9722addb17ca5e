"""Train a sentence encoder with 2DMSE, 1-D Matryoshka or the plain full-width objective.

    # MiniLM (all-MiniLM-L6-v2) on pydoc query/passage pairs + ShapeWorld caption pairs;
    # the three objectives of the 2DMSE figure, same data, same batches, same steps
    python -m train.embeddings --objective 2dmse --out out/emb/2dmse
    python -m train.embeddings --objective mrl --out out/emb/mrl
    python -m train.embeddings --objective full --out out/emb/full
    # then the (layer x dim) grid:
    python -m eval.embeddings grid --checkpoint 2dmse=out/emb/2dmse/final ... --out out/embeddings
    # continue an interrupted run from <out>/last
    python -m train.embeddings --objective 2dmse --out out/emb/2dmse --resume
    # any Hugging Face encoder source, your own hyperparameters
    python -m train.embeddings --model hf-hub:BAAI/bge-small-en-v1.5 --dims 48 96 192 \\
        --steps 2000 --out runs/bge_2dmse

Objectives (lm.embeddings.matryoshka2d): ``2dmse`` = InfoNCE on the last layer and one sampled
shallower layer, each at full width and one sampled truncated width, plus the KL alignment of the
shallow layer to the last; ``mrl`` = the last layer at full width and every --dims width; ``full`` =
the last layer at full width. All use in-batch negatives (every other passage of the batch).

Data (real text and synthetic captions, both offline):

- pydoc: data.text_corpora.pydoc_passages(); the query of a passage is its section title or its
  first sentence (drawn per step), the positive its text. Topics are split: sorted topic i is
  held out when i %% --heldout-every == 0 (whole topics, so no held-out passage shares a topic
  with a training one), and a training passage that shares a run of 12 words with a held-out
  one is dropped (pydoc repeats sections across topics; lm.corpus.drop_overlapping). The
  held-out topics are written to ``final/training.json`` for eval.embeddings.
- ShapeWorld (--shapeworld-scenes N, 0 = none): the first N scenes of the generator's ``pretrain``
  split (eval.embeddings scores STS on ``val`` scenes); two different captions of one scene are
  a positive pair (every caption of the scene is a candidate, also the ones that name no object).

Each item (passage or scene) appears once per epoch, so a batch never holds two positives of one
item. The batch order and every draw (query, caption pair, 2DMSE's layer and dim) are functions
of (seed, step): --resume continues exactly.

Loop: AdamW, linear warmup + cosine decay, grad clip 1.0, accelerate (bf16 autocast on CUDA);
with several processes each takes its own slice of the global batch, and its negatives are its
slice. At the end: held-out recall@1 of every (layer, dim) on the held-out pydoc passages.

Outputs in --out: ``last/`` (resumable state, train.common), ``report.json`` (command, config,
per-step losses and their terms, held-out grid), ``report.md``, ``loss_curve.png``, and
``final/``: the encoder (safetensors), its tokenizer, ``matryoshka2d.json`` (objective, dims,
pooling) and ``training.json`` (data, held-out topics).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import DistributedDataParallelKwargs
from tqdm import tqdm

from core.io import atomic_dir, atomic_write_text
from core.runtime import resolve_device, seed_everything
from data.render import LayoutConfig
from data.shapeworld import generate_scene
from data.text_corpora import pydoc_passages, python_version
from lm.corpus import drop_overlapping
from lm.embeddings import (
    OBJECTIVES,
    POOLINGS,
    Matryoshka2dConfig,
    Matryoshka2dEncoder,
    objective_loss,
)
from train.common import (
    adamw_matrices_decay,
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    load_training_state,
    make_accelerator,
    resume_mismatches,
    save_training_state,
)

FINAL = "final"
TRAINING_NAME = "training.json"
# Settings a resumed run must share with the run it continues.
RESUME_KEYS = (
    "model",
    "objective",
    "dims",
    "pooling",
    "max_length",
    "batch_size",
    "processes",
    "steps",
    "lr",
    "warmup",
    "seed",
    "heldout_every",
    "shapeworld_scenes",
    "train_items",  # the data: a run saved before the leak fix had more pydoc passages
    "pydoc_items",
    "scale",
    "kl_temperature",
    "kl_weight",
    "shallow_weight",
)


@dataclass(frozen=True)
class PairItem:
    """One training item: a query is drawn from `queries`, its positive from `positives`.

    When both are the same tuple (caption pairs), the two draws are different entries."""

    source: str  # "pydoc" | "shapeworld"
    queries: tuple[str, ...]
    positives: tuple[str, ...]

    def draw(self, rng: np.random.Generator) -> tuple[str, str]:
        if self.queries is self.positives:
            i, j = rng.choice(len(self.queries), size=2, replace=False)
            return self.queries[int(i)], self.positives[int(j)]
        return (
            self.queries[int(rng.integers(len(self.queries)))],
            self.positives[int(rng.integers(len(self.positives)))],
        )


def heldout_topics(topics: list[str], every: int) -> list[str]:
    """Sorted topic i is held out when i % every == 0."""
    return [t for i, t in enumerate(sorted(set(topics))) if i % every == 0]


def pydoc_items(every: int) -> tuple[list[PairItem], list[tuple[str, str, str]], list[str]]:
    """Training items, held-out (query kind, query, passage) triples and the held-out topics."""
    passages = pydoc_passages()
    held = set(heldout_topics([p.topic for p in passages], every))
    kept = [p for p in passages if p.topic not in held]
    # pydoc repeats sections across topics ("customization" is a section of "specialnames"):
    # a training passage (query sentence and text) sharing a 12-word run with a held-out one is
    # dropped (lm.corpus).
    heldout_texts = [f"{p.query} {p.text}" for p in passages if p.topic in held]
    leaked = set(drop_overlapping([f"{p.query} {p.text}" for p in kept], heldout_texts))
    train = [
        PairItem("pydoc", (p.title, p.query), (p.text,))
        for i, p in enumerate(kept)
        if i not in leaked
    ]
    heldout = [
        (kind, q, p.text)
        for p in passages
        if p.topic in held
        for kind, q in (("title", p.title), ("sentence", p.query))
    ]
    return train, heldout, sorted(held)


def shapeworld_items(n: int, seed: int) -> list[PairItem]:
    """Caption-pair items of the first n ``pretrain`` scenes (scenes with < 2 captions skipped)."""
    layout = LayoutConfig(image_size=64)
    items = []
    for i in tqdm(range(n), desc="shapeworld scenes", unit="scene", disable=n < 200):
        captions = tuple(dict.fromkeys(generate_scene(layout, seed, "pretrain", i).captions))
        if len(captions) >= 2:
            items.append(PairItem("shapeworld", captions, captions))
    return items


def step_rng(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The step's draws: a pure function of (seed, step)."""
    state = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    return np.random.default_rng(state), torch.Generator().manual_seed(state)


@torch.no_grad()
def heldout_grid(
    encoder: Matryoshka2dEncoder, heldout: list[tuple[str, str, str]], dims: list[int]
) -> dict[str, Any]:
    """Recall@1 over all held-out passages for every (layer, dim): each query's passage must
    score highest among the distinct held-out passages."""
    passages = sorted({p for _, _, p in heldout})
    index = {p: i for i, p in enumerate(passages)}
    target = torch.tensor([index[p] for _, _, p in heldout])
    was_training = encoder.training
    encoder.eval()
    q_all = encoder.embedder.encode_layers([q for _, q, _ in heldout])  # (L + 1, Q, D)
    p_all = encoder.embedder.encode_layers(passages)  # (L + 1, P, D)
    encoder.train(was_training)
    widths = sorted({*dims, encoder.hidden_size})
    grid: dict[str, dict[str, float]] = {}
    for layer in range(1, encoder.num_layers + 1):
        grid[str(layer)] = {}
        for d in widths:
            q = torch.nn.functional.normalize(q_all[layer, :, :d], dim=-1)
            p = torch.nn.functional.normalize(p_all[layer, :, :d], dim=-1)
            hit = (q @ p.T).argmax(-1) == target
            grid[str(layer)][str(d)] = float(hit.float().mean())
    return {"queries": len(heldout), "passages": len(passages), "recall@1": grid}


def report_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    grid = report["heldout"]["recall@1"]
    widths = list(next(iter(grid.values())))
    lines = [
        f"# {cfg['objective']} on {cfg['model']}: {cfg['steps']} steps",
        "",
        "Command(s): " + "; then ".join(f"`{c}`" for c in report["commands"]),
        "",
        f"Data: {cfg['train_items']} training items ({cfg['pydoc_items']} pydoc passages of "
        f"Python {cfg['python']}, {cfg['shapeworld_items']} ShapeWorld scenes); held out: "
        f"{len(cfg['heldout_topics'])} pydoc topics, {report['heldout']['passages']} passages, "
        f"{report['heldout']['queries']} queries (title and first sentence).",
        f"Final training loss (mean of the last 10 steps): {report['final_loss']:.4f}; "
        f"{report['seconds']:.0f} s of training in the last part.",
        "",
        "Held-out recall@1 (rows: layer, columns: dims):",
        "",
        "| layer | " + " | ".join(widths) + " |",
        "|---|" + "---:|" * len(widths),
    ]
    for layer, row in grid.items():
        lines.append(f"| {layer} | " + " | ".join(f"{row[w]:.3f}" for w in widths) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(out: Path, log: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in log]
    for key in [k for k in log[0] if k not in ("step", "lr", "time", "layer", "dim")]:
        values = [r.get(key, np.nan) for r in log]
        ema, smooth = values[0], []
        for v in values:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, lw=2 if key == "loss" else 1, label=f"{key} (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.embeddings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="minilm-l6", help="encoder source (core.sources)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="2dmse")
    parser.add_argument(
        "--dims", type=int, nargs="+", default=[32, 64, 128, 256], help="truncated widths"
    )
    parser.add_argument("--pooling", choices=POOLINGS, default="mean")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text")
    parser.add_argument("--scale", type=float, default=20.0, help="InfoNCE logit scale")
    parser.add_argument("--kl-temperature", type=float, default=0.3, help="2dmse; 0 = no KL")
    parser.add_argument("--kl-weight", type=float, default=1.0, help="2dmse")
    parser.add_argument("--shallow-weight", type=float, default=1.0, help="2dmse")
    parser.add_argument("--heldout-every", type=int, default=2, help="hold out every k-th topic")
    parser.add_argument(
        "--shapeworld-scenes", type=int, default=256, help="caption-pair scenes (0 = none)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step per process")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps in all")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%%)")
    parser.add_argument("--seed", type=int, default=0, help="data order and every draw")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument("--save-every", type=int, default=50, help="steps between <out>/last")
    parser.add_argument(
        "--stop-at", type=int, default=None, help="save and stop after this step (resume later)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (bf16 autocast on cuda)"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_run_args(
        parser, args, ("batch_size", "steps", "save_every", "heldout_every", "max_length")
    )
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2: in-batch negatives need another pair")
    if args.heldout_every < 2:
        parser.error("--heldout-every must be >= 2 (1 would hold out every topic)")
    if args.shapeworld_scenes < 0:
        parser.error("--shapeworld-scenes must be >= 0")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    command = "python -m train.embeddings " + shlex.join(argv)
    try:
        cfg = Matryoshka2dConfig(
            objective=args.objective,
            dims=args.dims,
            pooling=args.pooling,
            max_length=args.max_length,
            scale=args.scale,
            kl_temperature=args.kl_temperature,
            kl_weight=args.kl_weight,
            shallow_weight=args.shallow_weight,
        )
    except ValueError as err:
        parser.error(str(err))

    device = resolve_device(args.device)
    # An encoder's pooler (BERT's) takes no part in the loss: DDP must expect unused parameters.
    accelerator = make_accelerator(
        cpu=device.type == "cpu",
        mixed_precision="bf16" if device.type == "cuda" else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    device = accelerator.device
    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    # data
    items, heldout, held_topics = pydoc_items(args.heldout_every)
    n_pydoc = len(items)
    items += shapeworld_items(args.shapeworld_scenes, args.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(items) < args.batch_size * world:
        parser.error(
            f"{len(items)} training items < one global batch ({args.batch_size} x {world})"
        )

    # model
    encoder = Matryoshka2dEncoder.from_source(args.model, cfg)
    encoder.to(device).train()
    if any(d >= encoder.hidden_size for d in cfg.dims):
        parser.error(f"--dims must be below the embedding width {encoder.hidden_size}: {cfg.dims}")
    optimizer = adamw_matrices_decay(encoder, args.lr, args.weight_decay)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    scheduler = cosine_with_warmup(optimizer, warmup, args.steps)
    run_config: dict[str, Any] = {
        **cfg.to_dict(),
        "model": args.model,
        "batch_size": args.batch_size,
        "processes": world,
        "steps": args.steps,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup": warmup,
        "seed": args.seed,
        "heldout_every": args.heldout_every,
        "shapeworld_scenes": args.shapeworld_scenes,
        "python": python_version(),
        "pydoc_items": n_pydoc,
        "shapeworld_items": len(items) - n_pydoc,
        "train_items": len(items),
        "heldout_topics": held_topics,
        "layers": encoder.num_layers,
        "hidden_size": encoder.hidden_size,
        "device": str(device),
    }
    start, log, commands = 0, [], [command]
    if args.resume:
        mismatch = resume_mismatches(args.out, run_config, RESUME_KEYS)
        if mismatch:
            parser.error(f"--resume: {mismatch}")
        start = load_training_state(args.out, encoder, optimizer, scheduler)
        log_path = args.out / "report.json"
        if log_path.is_file():
            old = json.loads(log_path.read_text(encoding="utf-8"))
            log = [r for r in old["train"] if r["step"] <= start]
            commands = [*old.get("commands", []), command]
    prepared = accelerator.prepare(encoder)
    prepared_optimizer = accelerator.prepare(optimizer)
    params = [p for p in encoder.parameters() if p.requires_grad]

    stop = args.stop_at if args.stop_at is not None else args.steps
    batches = batch_indices(len(items), args.batch_size * world, args.seed, start)
    local = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
    bar = tqdm(
        range(start, stop),
        initial=start,
        total=args.steps,
        desc=f"train {args.objective}",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    t0 = time.time()
    for step in bar:
        rng, gen = step_rng(args.seed, step)
        pairs = [items[i].draw(rng) for i in next(batches)]  # same draws on every process
        queries, positives = zip(*pairs[local], strict=True)
        with accelerator.autocast():
            q = prepared(*encoder.tokenize(queries))  # (L + 1, B, D)
            p = prepared(*encoder.tokenize(positives))
            out = objective_loss(cfg, q, p, gen)
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(params, 1.0)
        prepared_optimizer.step()
        scheduler.step()
        prepared_optimizer.zero_grad(set_to_none=True)
        done = step + 1
        # the mean over the processes (each contrasts its own slice); the sampled width varies
        # per step: log its terms under one name
        mean = accelerator.reduce({"loss": out.loss.detach(), **out.terms}, "mean")
        row: dict[str, Any] = {"step": done, "loss": float(mean.pop("loss"))}
        row.update({k.replace(f"_d{out.dim}", "_d"): float(v) for k, v in mean.items()})
        row.update(layer=out.layer, dim=out.dim, lr=scheduler.get_last_lr()[0])
        row["time"] = round(time.time() - t0, 3)
        log.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if done % args.save_every == 0 or done == stop:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_training_state(
                    args.out, encoder, optimizer, scheduler, done, run_config, {"loss": row["loss"]}
                )
    bar.close()
    if not accelerator.is_main_process:
        return 0
    report: dict[str, Any] = {
        "command": command,
        "commands": commands,  # with --stop-at / --resume: every part, in order
        "config": run_config,
        "seconds": time.time() - t0,
        "train": log,
        "final_loss": float(np.mean([r["loss"] for r in log[-10:]])) if log else float("nan"),
    }
    if stop < args.steps:
        atomic_write_text(args.out / "report.json", json.dumps(report, indent=1) + "\n")
        print(f"stopped at step {stop}; continue with --resume")
        return 0
    report["heldout"] = heldout_grid(encoder, heldout, cfg.dims)
    atomic_write_text(args.out / "report.json", json.dumps(report, indent=1) + "\n")
    text = report_markdown(report)
    atomic_write_text(args.out / "report.md", text)
    if log:
        plot_losses(args.out, log, f"{args.objective} ({args.model})")
    with atomic_dir(args.out / FINAL, overwrite=True) as tmp:
        encoder.save_pretrained(tmp)
        training = {"commands": commands, **{k: run_config[k] for k in RESUME_KEYS}}
        training.update(heldout_topics=held_topics, python=python_version())
        atomic_write_text(tmp / TRAINING_NAME, json.dumps(training, indent=1) + "\n")
    print(text)
    print(f"wrote {args.out / FINAL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
