"""Pretrain a BERT-class encoder with DupMAE, RetroMAE or plain MLM on pydoc text, then score its
zero-shot retrieval on held-out pydoc topics.

    # the figure: all-MiniLM-L6-v2 pretrained further with DupMAE vs MLM only (same init, data,
    # batches, encoder masks and steps); DupMAE in two parts of ~4 min (--stop-at, --resume)
    python -m train.dupmae --objective dupmae --max-length 64 --batch-size 8 --steps 200 \\
        --lr 1e-4 --out out/dupmae/minilm_dupmae --stop-at 100
    python -m train.dupmae --objective dupmae --max-length 64 --batch-size 8 --steps 200 \\
        --lr 1e-4 --out out/dupmae/minilm_dupmae --resume
    python -m train.dupmae --objective mlm --max-length 64 --batch-size 8 --steps 200 \\
        --lr 1e-4 --out out/dupmae/minilm_mlm
    # from scratch: a random 2 x 128 BERT with MiniLM's vocabulary
    python -m train.dupmae --init random --objective dupmae --max-length 64 --batch-size 16 \\
        --steps 200 --lr 5e-4 --out out/dupmae/scratch_dupmae
    # RetroMAE (no bag-of-words loss), for an ablation
    python -m train.dupmae --objective retromae --out out/dupmae/retromae
    # seconds, a tiny local BERT folder (the smoke test)
    python -m train.dupmae --model /tmp/tiny_bert --max-length 32 --steps 5 --out /tmp/dupmae

Model: --model is a BERT-class source (core.sources), loaded as BertForMaskedLM; the default,
all-MiniLM-L6-v2, ships without an MLM head, so every objective starts from the same freshly
initialised head (transformers lists the tensors it initialised). Objectives and losses:
lm.embeddings.dupmae.

Data (real text, offline): the stdlib's pydoc topics (``pydoc_data.topics``). Topics are split as
train.embeddings splits them: sorted topic i of data.text_corpora.pydoc_passages() is held out when
i is a multiple of --heldout-every. Pretraining reads the raw text of every other topic, less the
paragraphs that share a run of 12 words with a held-out passage (pydoc repeats sections across
topics), tokenised and cut into windows of --max-length tokens; no query ever is a training
signal. Each window appears once per epoch; the batch order and every mask are functions of
(seed, step), so --resume continues exactly.

Zero-shot retrieval (no fine-tuning), before and after pretraining: the held-out topics' passages
(data.text_corpora: query = section title or first sentence, passage = the rest, cut to
--eval-max-length tokens) ranked by cosine similarity under each view of lm.embeddings.dupmae (cls,
mean, ot, cls+ot); recall@1, recall@10 and MRR, ties broken pessimistically (the set and the
metrics of eval.embeddings, which train may not import: tests/test_dupmae.py checks they agree).

Loop: AdamW, linear warmup + cosine decay, grad clip 1.0, accelerate (bf16 autocast on CUDA).
Outputs in --out: ``last/`` (resumable state, train.common), ``report.json`` (command(s), config,
per-step losses and terms, retrieval before / after), ``report.md``, ``loss_curve.png`` and
``final/`` (DupMAEModel.save_pretrained: encoder + MLM head, tokenizer, dupmae.json, decoder/).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import BertConfig, BertForMaskedLM

from core.io import atomic_dir, atomic_write_text
from core.runtime import resolve_device, seed_everything
from core.sources import resolve_source
from data.text_corpora import pydoc_passages, python_version
from lm.corpus import drop_overlapping_parts
from lm.embeddings.dupmae import (
    DUPMAE_OBJECTIVES,
    VIEWS,
    DupMAEConfig,
    DupMAEModel,
    describe,
    mask_batch,
)
from lm.loading import load_tokenizer
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
from train.embeddings import heldout_topics, plot_losses, step_rng

FINAL = "final"
RESUME_KEYS = (
    "model",
    "init",
    "layers",
    "hidden_size",
    "objective",
    "encoder_mask_ratio",
    "decoder_mask_ratio",
    "decoder_weight",
    "bow_weight",
    "max_length",
    "batch_size",
    "processes",
    "steps",
    "lr",
    "warmup",
    "seed",
    "heldout_every",
    "windows",  # the data: a run saved before the leak fix had more windows
    "dropped_paragraphs",
)


def pretraining_texts(held: set[str]) -> tuple[dict[str, str], int]:
    """Topic -> whitespace-collapsed text of every non-held-out pydoc topic, less the paragraphs
    that share a run of 12 words with a held-out passage or its query, also across paragraphs
    (pydoc repeats sections across topics; lm.corpus.drop_overlapping_parts), and how many were
    dropped."""
    from pydoc_data.topics import topics

    heldout = [f"{p.query} {p.text}" for p in pydoc_passages() if p.topic in held]
    texts, dropped = {}, 0
    for topic in sorted(topics):
        if topic in held:
            continue
        paragraphs = [q for q in topics[topic].split("\n\n") if q.strip()]
        leaked = set(drop_overlapping_parts(paragraphs, heldout))
        dropped += len(leaked)
        texts[topic] = " ".join(
            " ".join(q.split()) for i, q in enumerate(paragraphs) if i not in leaked
        )
    return texts, dropped


def pretraining_windows(
    tokenizer: Any, held: set[str], max_length: int, min_tokens: int = 8
) -> tuple[list[list[int]], list[str], int]:
    """[CLS] window [SEP] token ids of `pretraining_texts`, the topics they come from, and the
    number of paragraphs dropped."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise ValueError("a BERT-class tokenizer with [CLS] and [SEP] tokens is expected")
    texts, dropped = pretraining_texts(held)
    body = max_length - 2
    windows = []
    for text in texts.values():
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for s in range(0, len(ids), body):
            chunk = ids[s : s + body]
            if len(chunk) >= min_tokens:
                windows.append([cls, *chunk, sep])
    return windows, list(texts), dropped


QUERY_KINDS = ("title", "sentence")


def heldout_retrieval_set(held: set[str]) -> tuple[list[str], list[str], list[str], list[int]]:
    """(passages, queries, query kinds, index of each query's passage): both queries of every
    pydoc passage of the `held` topics, duplicate passage texts merged. The set
    eval.embeddings.retrieval_set builds (train may not import eval: the layer contract)."""
    chosen = [p for p in pydoc_passages() if p.topic in held]
    if not chosen:
        raise ValueError(f"no pydoc passage in topics {sorted(held)[:5]}")
    texts = list(dict.fromkeys(p.text for p in chosen))
    index = {t: i for i, t in enumerate(texts)}
    queries, kinds, positives = [], [], []
    for p in chosen:
        for kind, q in zip(QUERY_KINDS, (p.title, p.query), strict=True):
            queries.append(q)
            kinds.append(kind)
            positives.append(index[p.text])
    return texts, queries, kinds, positives


def positive_ranks(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """(Q,) 0-based rank of each query's one positive among (Q, N) scores, ties broken
    pessimistically (#items above + #others tying), as eval.metrics.recall_at_k ranks."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives)
    if s.ndim != 2 or pos.shape != (s.shape[0],) or not ((pos >= 0) & (pos < s.shape[1])).all():
        raise ValueError(
            f"expected scores (Q, N) and positives (Q,) in [0, N), received {s.shape}, {pos.shape}"
        )
    best = s[np.arange(len(pos)), pos][:, None]
    return np.asarray((s > best).sum(1) + (s == best).sum(1) - 1)


def ranking_metrics(
    scores: np.ndarray, positives: np.ndarray, prefix: str = "recall"
) -> dict[str, float]:
    """{prefix@1, prefix@10 (k capped at N), mrr} of (Q, N) scores with one positive each."""
    rank = positive_ranks(scores, positives)
    k = min(10, np.asarray(scores).shape[1])
    return {
        f"{prefix}@1": float((rank < 1).mean()),
        f"{prefix}@10": float((rank < k).mean()),
        "mrr": float((1.0 / (1.0 + rank)).mean()),
    }


@torch.no_grad()
def heldout_retrieval(
    model: DupMAEModel, held: set[str], batch_size: int, max_length: int
) -> dict[str, Any]:
    """Zero-shot retrieval on the held-out topics under every view; per query kind and all."""
    passages, queries, kinds, positives = heldout_retrieval_set(held)
    kw: dict[str, Any] = {"batch_size": batch_size, "max_length": max_length, "progress": True}
    p_views = model.encode_views(passages, VIEWS, **kw)
    q_views = model.encode_views(queries, VIEWS, **kw)
    target = np.asarray(positives)
    views: dict[str, dict[str, dict[str, float]]] = {}
    for view in VIEWS:
        scores = (q_views[view] @ p_views[view].T).numpy()
        row = {"all": ranking_metrics(scores, target)}
        for kind in QUERY_KINDS:
            sel = np.asarray([i for i, k in enumerate(kinds) if k == kind])
            row[kind] = ranking_metrics(scores[sel], target[sel])
        views[view] = row
    return {"passages": len(passages), "queries": len(queries), "views": views}


def report_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"# {cfg['objective']} pretraining of {cfg['model']} ({cfg['init']} init, "
        f"{cfg['layers']} x {cfg['hidden_size']}): {cfg['steps']} steps",
        "",
        "Command(s): " + "; then ".join(f"`{c}`" for c in report["commands"]),
        "",
        f"Pretraining data: {cfg['windows']} windows of <= {cfg['max_length']} tokens from "
        f"{cfg['train_topics']} pydoc topics (Python {cfg['python']}, real text"
        + (
            f"; {cfg['dropped_paragraphs']} paragraphs that repeat held-out text dropped). "
            if "dropped_paragraphs" in cfg
            else "). "
        )
        + "Held out: "
        f"{len(cfg['heldout_topics'])} topics, {report['after']['passages']} passages, "
        f"{report['after']['queries']} queries (title and first sentence).",
        f"Final training loss (mean of the last 10 steps): {report['final_loss']:.4f}; "
        f"{report['seconds']:.0f} s of training in the last part.",
        "",
        "Zero-shot retrieval on the held-out passages (cosine; no fine-tuning):",
        "",
        "| model | view | R@1 | R@10 | MRR | title R@10 | sentence R@10 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for state in ("before", "after"):
        name = "init (no pretraining)" if state == "before" else cfg["objective"]
        for view, row in report[state]["views"].items():
            a = row["all"]
            lines.append(
                f"| {name} | {view} | {a['recall@1']:.3f} | {a['recall@10']:.3f} | "
                f"{a['mrr']:.3f} | {row['title']['recall@10']:.3f} | "
                f"{row['sentence']['recall@10']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def build_model(args: argparse.Namespace, cfg: DupMAEConfig) -> DupMAEModel:
    """--model's pretrained weights, or (--init random) a fresh BERT of --layers x --hidden-size
    (heads of 32 dims, FFN 4x) sharing --model's tokenizer and vocabulary."""
    if args.init == "pretrained":
        return DupMAEModel.from_source(args.model, cfg)
    name, kwargs = resolve_source(args.model).pretrained_args()
    base = BertConfig.from_pretrained(name, **kwargs)
    config = BertConfig(
        vocab_size=base.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden_size // 32),
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=base.max_position_embeddings,
    )
    model = DupMAEModel.build(BertForMaskedLM(config), load_tokenizer(args.model), cfg)
    return model.train()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.dupmae",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="minilm-l6", help="BERT-class source (core.sources)")
    parser.add_argument(
        "--init",
        choices=("pretrained", "random"),
        default="pretrained",
        help="pretrained: --model's weights; random: a fresh BERT of --layers x --hidden-size "
        "with --model's tokenizer and vocabulary",
    )
    parser.add_argument("--layers", type=int, default=2, help="--init random: encoder layers")
    parser.add_argument("--hidden-size", type=int, default=128, help="--init random: width")
    parser.add_argument("--objective", choices=DUPMAE_OBJECTIVES, default="dupmae")
    parser.add_argument("--encoder-mask-ratio", type=float, default=0.3)
    parser.add_argument("--decoder-mask-ratio", type=float, default=0.5)
    parser.add_argument("--decoder-weight", type=float, default=1.0)
    parser.add_argument("--bow-weight", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per window / text")
    parser.add_argument("--heldout-every", type=int, default=2, help="hold out every k-th topic")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step per process")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in all")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%%)")
    parser.add_argument("--seed", type=int, default=0, help="data order and every mask")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument(
        "--eval-max-length", type=int, default=128, help="tokens per query / passage at eval"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument("--save-every", type=int, default=25, help="steps between <out>/last")
    parser.add_argument(
        "--stop-at", type=int, default=None, help="save and stop after this step (resume later)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (bf16 autocast on cuda)"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_run_args(
        parser,
        args,
        ("batch_size", "steps", "save_every", "eval_batch_size", "layers", "hidden_size"),
    )
    if args.heldout_every < 2:
        parser.error("--heldout-every must be >= 2 (1 would hold out every topic)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    command = "python -m train.dupmae " + shlex.join(argv)
    try:
        cfg = DupMAEConfig(
            objective=args.objective,
            encoder_mask_ratio=args.encoder_mask_ratio,
            decoder_mask_ratio=args.decoder_mask_ratio,
            decoder_weight=args.decoder_weight,
            bow_weight=args.bow_weight,
            max_length=args.max_length,
        )
    except ValueError as err:
        parser.error(str(err))

    device = resolve_device(args.device)
    accelerator = make_accelerator(
        cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no"
    )
    device = accelerator.device
    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    model = build_model(args, cfg)
    model.to(device)
    held = set(heldout_topics([p.topic for p in pydoc_passages()], args.heldout_every))
    windows, train_topics, dropped = pretraining_windows(model.tokenizer, held, cfg.max_length)
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(windows) < args.batch_size * world:
        parser.error(f"{len(windows)} windows < one global batch ({args.batch_size} x {world})")

    optimizer = adamw_matrices_decay(model, args.lr, args.weight_decay)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    scheduler = cosine_with_warmup(optimizer, warmup, args.steps)
    run_config: dict[str, Any] = {
        **cfg.to_dict(),
        "model": args.model,
        "init": args.init,
        "batch_size": args.batch_size,
        "processes": world,
        "steps": args.steps,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup": warmup,
        "seed": args.seed,
        "heldout_every": args.heldout_every,
        "python": python_version(),
        "windows": len(windows),
        "train_topics": len(train_topics),
        "dropped_paragraphs": dropped,
        "heldout_topics": sorted(held),
        **describe(model),
        "device": str(device),
    }
    start, log, commands, before = 0, [], [command], None
    if args.resume:
        mismatch = resume_mismatches(args.out, run_config, RESUME_KEYS)
        if mismatch:
            parser.error(f"--resume: {mismatch}")
        start = load_training_state(args.out, model, optimizer, scheduler)
        log_path = args.out / "report.json"
        if log_path.is_file():
            old = json.loads(log_path.read_text(encoding="utf-8"))
            log = [r for r in old["train"] if r["step"] <= start]
            commands = [*old.get("commands", []), command]
            before = old.get("before")
    if before is None and accelerator.is_main_process:
        before = heldout_retrieval(model, held, args.eval_batch_size, args.eval_max_length)
    prepared = accelerator.prepare(model)
    prepared_optimizer = accelerator.prepare(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    stop = args.stop_at if args.stop_at is not None else args.steps
    batches = batch_indices(len(windows), args.batch_size * world, args.seed, start)
    local = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
    bar = tqdm(
        range(start, stop),
        initial=start,
        total=args.steps,
        desc=f"pretrain {args.objective}",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    model.train()
    t0 = time.time()
    for step in bar:
        _, gen = step_rng(args.seed, step)
        chosen = [windows[i] for i in next(batches)]  # the same draws on every process
        input_ids, mask = model.pad(chosen)
        batch = mask_batch(input_ids, mask, model.tokenizer, cfg, gen)  # global batch: same masks
        local_batch = type(batch)(**{k: v[local] for k, v in vars(batch).items()}).to(device)
        with accelerator.autocast():
            out = prepared(local_batch)
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(params, 1.0)
        prepared_optimizer.step()
        scheduler.step()
        prepared_optimizer.zero_grad(set_to_none=True)
        done = step + 1
        # the mean over the processes (each a token mean over its own slice)
        mean = accelerator.reduce({"loss": out.loss.detach(), **out.terms}, "mean")
        row: dict[str, Any] = {"step": done, **{k: float(v) for k, v in mean.items()}}
        row.update(lr=scheduler.get_last_lr()[0], time=round(time.time() - t0, 3))
        log.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if done % args.save_every == 0 or done == stop:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_training_state(
                    args.out, model, optimizer, scheduler, done, run_config, {"loss": row["loss"]}
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
        "before": before,
    }
    if stop < args.steps:
        atomic_write_text(args.out / "report.json", json.dumps(report, indent=1) + "\n")
        print(f"stopped at step {stop}; continue with --resume")
        return 0
    report["after"] = heldout_retrieval(model, held, args.eval_batch_size, args.eval_max_length)
    atomic_write_text(args.out / "report.json", json.dumps(report, indent=1) + "\n")
    text = report_markdown(report)
    atomic_write_text(args.out / "report.md", text)
    if log:
        plot_losses(args.out, log, f"{args.objective} ({args.model})")
    with atomic_dir(args.out / FINAL, overwrite=True) as tmp:
        model.save_pretrained(tmp)
    print(text)
    print(f"wrote {args.out / FINAL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
