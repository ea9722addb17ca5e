"""DSE: train a cross-encoder teacher, distil it into a bi-encoder student, train a label-only
student on the same data, and measure accuracy and pair-scoring speed side by side.

    # the figure, in three parts of ~5 min (each stage is saved; --resume skips finished ones)
    python -m train.dse --out out/dse --teacher-steps 300 --teacher-lr 1e-4 --stop-after teacher
    python -m train.dse --out out/dse --teacher-steps 300 --teacher-lr 1e-4 --resume \\
        --stop-after student_kl
    python -m train.dse --out out/dse --teacher-steps 300 --teacher-lr 1e-4 --resume
    # seconds, a tiny local BERT folder (the smoke test)
    python -m train.dse --model /tmp/tiny_bert --train-scenes 40 --eval-scenes 20 \\
        --teacher-steps 3 --student-steps 3 --out /tmp/dse

Task (ShapeWorld, synthetic text with planted structure; data.shapeworld): match a short query to
the description of its scene among --candidates descriptions. A scene's description lists its
objects by colour and class in a random order ("two green diamonds, a red ring and a blue arrow").
Queries are the scene's captions and referring expressions that name at least one object by
colour and class but not the whole scene ("A green diamond is below a purple star.", "the largest
orange crescent"). The negatives are descriptions of other scenes that lack at least one object the
query names, so exactly one candidate fits; half of them (--hard) are the scenes that share the most
colours, classes and objects with the query (a scene with a green star and a purple diamond for
"a green diamond ... a purple star": telling them apart needs attribute binding, which a
cross-encoder reads and mean pooling blurs), the rest are random. Training queries come from the
``pretrain`` split (all classes and colours), evaluation queries from ``test`` scenes.

Stages (train.decoding_common.train_stage: AdamW, warmup + cosine, saved when finished):

1. ``teacher``: lm.embeddings.dse.CrossEncoder (--model, first --layers layers, a fresh one-output
   head), cross-entropy of the positive among each query's candidates.
2. ``student_kl``: lm.embeddings.dse.BiEncoder (same init, mean pooling, scale x cosine) trained
   on the teacher's scores of the same candidate lists: distillation_kl (no labels).
3. ``student_label``: the same student init trained on the labels: label_loss.

Both students see the same queries, candidates and batches, for the same steps. Evaluation:
accuracy (the positive scores strictly highest) on the test lists for the teacher, both students
and the untrained student (zero-shot mean pooling); pair-scoring speed: the time the teacher takes
to score every (query, candidate) pair of the test lists against the time the bi-encoder takes
(embedding every distinct text once; and with the candidate embeddings cached, as a retrieval
index holds them), medians over --speed-repeats interleaved repeats in one process.

Outputs in --out: stages/ (checkpoints), dse.json, dse.md, dse.png (accuracy and speed).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from core.io import atomic_write_text
from core.runtime import seed_everything
from data.language import number_word, plural, with_article
from data.render import LayoutConfig
from data.scene import COLOURS, SHAPES, Scene
from data.shapeworld import generate_scene
from lm.embeddings.dse import (
    BiEncoder,
    CrossEncoder,
    candidate_accuracy,
    describe,
    distillation_kl,
    label_loss,
)
from train.common import batch_indices
from train.decoding_common import other_process, train_stage, write_report

STAGES = ("teacher", "student_kl", "student_label")
Pair = tuple[str, str]  # (colour, class)

_MENTION = re.compile(
    r"\b(" + "|".join(COLOURS) + r") (" + "|".join(sorted(SHAPES, key=len, reverse=True)) + r")"
    r"(?:e?s)?\b"
)


def mentions(text: str) -> frozenset[Pair]:
    """The (colour, class) pairs a text names ("two orange crescents" -> {("orange",
    "crescent")})."""
    return frozenset((m.group(1), m.group(2)) for m in _MENTION.finditer(text.lower()))


def scene_pairs(scene: Scene) -> frozenset[Pair]:
    return frozenset((o.colour, o.shape) for o in scene.objects)


def describe_scene(scene: Scene, rng: np.random.Generator) -> str:
    """Every object by colour and class, counted, in a random order: the candidate text."""
    counts = Counter(f"{o.colour} {o.shape}" for o in scene.objects)
    phrases = []
    for phrase, n in counts.items():
        colour, _, shape = phrase.rpartition(" ")
        phrases.append(
            with_article(phrase) if n == 1 else f"{number_word(n)} {colour} {plural(shape)}"
        )
    order = rng.permutation(len(phrases))
    items = [phrases[i] for i in order]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class Item:
    """One query, its candidate descriptions and which one is its scene's."""

    query: str
    candidates: tuple[str, ...]
    positive: int


def build_items(
    split: str, n_scenes: int, n_candidates: int, hard: int, seed: int
) -> tuple[list[Item], dict[str, Any]]:
    """Query / candidate lists of the first n_scenes scenes of ``split`` (see the docstring)."""
    layout = LayoutConfig(image_size=64)
    rng = np.random.default_rng([seed, n_scenes, {"pretrain": 0, "test": 1}.get(split, 2)])
    scenes = [
        generate_scene(layout, seed, split, i)
        for i in tqdm(range(n_scenes), desc=f"{split} scenes", unit="scene", leave=False)
    ]
    pairs = [scene_pairs(s) for s in scenes]
    texts = [describe_scene(s, rng) for s in scenes]
    colours = [{c for c, _ in p} for p in pairs]
    classes = [{s for _, s in p} for p in pairs]
    items, skipped = [], 0
    for i, scene in enumerate(scenes):
        queries = dict.fromkeys([*scene.captions, *(r.text for r in scene.refs)])
        for q in queries:
            named = mentions(q)
            if not named or not named <= pairs[i] or named == pairs[i]:
                continue  # names no object, or the whole scene (a copy of the description)
            qc, qs = {c for c, _ in named}, {s for _, s in named}
            ok = [j for j in range(n_scenes) if j != i and not named <= pairs[j]]
            ok = list({texts[j]: j for j in ok if texts[j] != texts[i]}.values())  # distinct
            if len(ok) < n_candidates - 1:
                skipped += 1
                continue
            hardness = np.array(
                [len(qc & colours[j]) + len(qs & classes[j]) + len(named & pairs[j]) for j in ok]
            )
            order = np.lexsort((rng.random(len(ok)), -hardness))  # hardest first, ties random
            chosen = [ok[k] for k in order[:hard]]
            rest = [ok[k] for k in order[hard:]]
            chosen += [rest[k] for k in rng.permutation(len(rest))[: n_candidates - 1 - hard]]
            cands = [texts[j] for j in chosen]
            pos = int(rng.integers(n_candidates))
            cands.insert(pos, texts[i])
            items.append(Item(q, tuple(cands), pos))
    stats = {"split": split, "scenes": n_scenes, "queries": len(items), "skipped": skipped}
    return items, stats


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def scores_of(model: CrossEncoder | BiEncoder, items: list[Item], batch: int) -> torch.Tensor:
    """(Q, C) scores of every item's candidates, in chunks of `batch` queries."""
    model.eval()
    parts = []
    for s in tqdm(range(0, len(items), batch), desc="score", unit="batch", leave=False):
        chunk = items[s : s + batch]
        parts.append(model.score([it.query for it in chunk], [it.candidates for it in chunk]))
    return torch.cat(parts).float()


@torch.no_grad()
def pair_scoring_speed(
    teacher: CrossEncoder, student: BiEncoder, items: list[Item], repeats: int
) -> dict[str, Any]:
    """Seconds to score every (query, candidate) pair of `items`: the cross-encoder, the
    bi-encoder embedding every distinct text, and the bi-encoder with the candidates' embeddings
    cached (only the queries embedded). Interleaved repeats; medians and their ratios."""
    teacher.eval()
    student.eval()
    queries = [it.query for it in items]
    lists = [it.candidates for it in items]
    flat = [c for row in lists for c in row]
    distinct = list(dict.fromkeys(flat))
    cached = student.embed(distinct)
    index = {t: i for i, t in enumerate(distinct)}
    cand_rows = torch.tensor([[index[c] for c in row] for row in lists])  # (Q, C)

    def cross() -> None:
        teacher.score(queries, lists)

    def bi() -> None:
        student.score(queries, lists)

    def bi_cached() -> None:
        q = student.embed(queries)
        torch.einsum("qd,qcd->qc", q, cached[cand_rows])

    times: dict[str, list[float]] = {"cross": [], "bi": [], "bi_cached": []}
    fns = {"cross": cross, "bi": bi, "bi_cached": bi_cached}
    for _ in tqdm(range(repeats), desc="pair-scoring speed", unit="repeat"):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = len(flat)
    return {
        "pairs": pairs,
        "queries": len(queries),
        "distinct_candidates": len(distinct),
        "repeats": repeats,
        "seconds": times,
        "median_seconds": med,
        "pairs_per_second": {k: pairs / v for k, v in med.items()},
        "speedup_bi": med["cross"] / med["bi"],
        "speedup_bi_cached": med["cross"] / med["bi_cached"],
        "threads": torch.get_num_threads(),
    }


def markdown(result: dict[str, Any]) -> str:
    a, sp, cfg = result["accuracy"], result["speed"], result["config"]
    chance = 1 / cfg["candidates"]
    lines = [
        "### DSE: bi-encoder students vs their cross-encoder teacher (ShapeWorld, synthetic)",
        "",
        "Command(s): " + "; then ".join(f"`{c}`" for c in result["commands"]),
        "",
        f"{result['data']['test']['queries']} test queries, {cfg['candidates']} candidates each "
        f"({cfg['hard']} hard negatives; chance {chance:.3f}); training: "
        f"{result['data']['train']['queries']} queries. Model: {cfg['model']}, first "
        f"{cfg['layers']} layers, for teacher and students.",
        "",
        "| model | accuracy | training |",
        "|---|---:|---|",
        f"| cross-encoder teacher | {a['teacher']:.3f} | {cfg['teacher_steps']} steps, labels |",
        f"| bi-encoder, DSE (KL to the teacher) | {a['student_kl']:.3f} | "
        f"{cfg['student_steps']} steps, teacher scores only |",
        f"| bi-encoder, label-only | {a['student_label']:.3f} | "
        f"{cfg['student_steps']} steps, labels |",
        f"| bi-encoder, untrained (zero-shot) | {a['student_init']:.3f} | none |",
        "",
        f"Pair scoring ({sp['pairs']} pairs = {sp['queries']} queries x {cfg['candidates']} "
        f"candidates, {sp['threads']} thread(s), median of {sp['repeats']}):",
        "",
        "| scorer | median s | pairs / s | speed-up vs cross-encoder |",
        "|---|---:|---:|---:|",
    ]
    names = {
        "cross": "cross-encoder (teacher)",
        "bi": "bi-encoder, every text embedded",
        "bi_cached": "bi-encoder, candidates cached",
    }
    for k, name in names.items():
        ratio = 1.0 if k == "cross" else sp["speedup_bi" if k == "bi" else "speedup_bi_cached"]
        lines.append(
            f"| {name} | {sp['median_seconds'][k]:.3f} | {sp['pairs_per_second'][k]:.0f} | "
            f"{ratio:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, sp = result["accuracy"], result["speed"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = ["teacher", "student_kl", "student_label", "student_init"]
    labels = ["teacher\n(cross)", "DSE\n(KL)", "label-\nonly", "untrained"]
    ax1.bar(labels, [a[n] for n in names], color=["#555", "#1f77b4", "#ff7f0e", "#bbb"])
    ax1.axhline(1 / result["config"]["candidates"], ls="--", c="k", lw=0.8, label="chance")
    ax1.set_ylabel("accuracy")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=7)
    keys = ["cross", "bi", "bi_cached"]
    ax2.bar(["cross", "bi", "bi (cached)"], [sp["pairs_per_second"][k] for k in keys])
    ax2.set_yscale("log")
    ax2.set_ylabel("pairs / s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.dse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="minilm-l6", help="encoder source (core.sources)")
    parser.add_argument("--layers", type=int, default=3, help="keep the first N layers")
    parser.add_argument("--train-scenes", type=int, default=1000, help="pretrain-split scenes")
    parser.add_argument("--eval-scenes", type=int, default=150, help="test-split scenes")
    parser.add_argument("--candidates", type=int, default=8, help="per query, positive included")
    parser.add_argument("--hard", type=int, default=4, help="hard negatives per query")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--teacher-batch", type=int, default=4, help="queries per teacher step")
    parser.add_argument("--student-batch", type=int, default=8, help="queries per student step")
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--student-lr", type=float, default=5e-5)
    parser.add_argument("--temperature", type=float, default=1.0, help="KL temperature")
    parser.add_argument("--scale", type=float, default=20.0, help="student cosine scale")
    parser.add_argument("--max-length", type=int, default=96, help="tokens per pair / text")
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument(
        "--speed-queries", type=int, default=64, help="test queries timed (all their pairs)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse finished stages")
    parser.add_argument(
        "--stop-after", choices=STAGES, default=None, help="stop after this stage (resume later)"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("layers", "train_scenes", "eval_scenes", "teacher_batch", "student_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.candidates < 2 or not 0 <= args.hard <= args.candidates - 1:
        parser.error("--candidates must be >= 2 and --hard in [0, --candidates - 1]")
    if min(args.speed_repeats, args.speed_queries, args.teacher_steps, args.student_steps) < 1:
        parser.error(
            "--speed-repeats, --speed-queries, --teacher-steps and --student-steps must be >= 1"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if other_process("python -m train.dse"):
        return 0
    _check_args(parser, args)
    command = "python -m train.dse " + shlex.join(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.json"
    previous = json.loads(log.read_text(encoding="utf-8")) if args.resume and log.is_file() else []
    commands = [*previous, command]
    atomic_write_text(log, json.dumps(commands, indent=1) + "\n")
    seed_everything(args.seed)
    t_start = time.perf_counter()

    train_items, train_stats = build_items(
        "pretrain", args.train_scenes, args.candidates, args.hard, args.seed
    )
    test_items, test_stats = build_items(
        "test", args.eval_scenes, args.candidates, args.hard, args.seed
    )
    if len(train_items) < max(args.teacher_batch, args.student_batch) or not test_items:
        parser.error(
            f"{len(train_items)} training / {len(test_items)} test queries: raise --train-scenes "
            "or --eval-scenes"
        )
    data_key = {
        "model": args.model,
        "layers": args.layers,
        "train_scenes": args.train_scenes,
        "candidates": args.candidates,
        "hard": args.hard,
        "max_length": args.max_length,
        "seed": args.seed,
    }

    def batches(batch: int, steps: int) -> list[list[Item]]:
        order = batch_indices(len(train_items), batch, args.seed)
        return [[train_items[i] for i in idx] for idx in islice(order, steps)]

    # 1. teacher
    teacher = CrossEncoder.from_source(
        args.model, max_length=args.max_length, num_layers=args.layers
    )
    t_batches = batches(args.teacher_batch, args.teacher_steps)

    def teacher_loss(step: int) -> torch.Tensor:
        chunk = t_batches[step]
        scores = teacher.score([it.query for it in chunk], [it.candidates for it in chunk])
        return label_loss(scores, torch.tensor([it.positive for it in chunk]))

    t_cfg = {**data_key, "steps": args.teacher_steps, "batch": args.teacher_batch}
    t_cfg["lr"] = args.teacher_lr
    stages = {
        "teacher": train_stage(
            "teacher",
            teacher,
            teacher.parameters(),
            teacher_loss,
            steps=args.teacher_steps,
            lr=args.teacher_lr,
            out=args.out,
            config=t_cfg,
            resume=args.resume,
        )
    }
    if args.stop_after == "teacher":
        print("stopped after the teacher; continue with --resume")
        return 0
    teacher.eval()

    # 2-3. students: same init, batches and steps
    s_batches = batches(args.student_batch, args.student_steps)
    s_cfg = {**data_key, "steps": args.student_steps, "batch": args.student_batch}
    s_cfg.update(lr=args.student_lr, scale=args.scale)
    students: dict[str, BiEncoder] = {}
    for name in ("student_kl", "student_label"):
        student = BiEncoder.from_source(
            args.model, max_length=args.max_length, num_layers=args.layers, scale=args.scale
        )

        def student_loss(step: int, student: BiEncoder = student, name: str = name) -> torch.Tensor:
            chunk = s_batches[step]
            queries, lists = [it.query for it in chunk], [it.candidates for it in chunk]
            scores = student.score(queries, lists)
            if name == "student_label":
                return label_loss(scores, torch.tensor([it.positive for it in chunk]))
            with torch.no_grad():
                target = teacher.score(queries, lists)
            return distillation_kl(scores, target, args.temperature)

        cfg = {**s_cfg, "teacher": t_cfg}
        if name == "student_kl":
            cfg["temperature"] = args.temperature
        stages[name] = train_stage(
            name,
            student.model,
            student.parameters(),
            student_loss,
            steps=args.student_steps,
            lr=args.student_lr,
            out=args.out,
            config=cfg,
            resume=args.resume,
        )
        students[name] = student
        if args.stop_after == name:
            print(f"stopped after {name}; continue with --resume")
            return 0

    # evaluation
    positives = torch.tensor([it.positive for it in test_items])
    init = BiEncoder.from_source(
        args.model, max_length=args.max_length, num_layers=args.layers, scale=args.scale
    )
    scores = {
        "teacher": scores_of(teacher, test_items, 16),
        **{k: scores_of(v, test_items, 64) for k, v in students.items()},
        "student_init": scores_of(init, test_items, 64),
    }
    accuracy = {k: candidate_accuracy(v, positives) for k, v in scores.items()}
    teacher_top = scores["teacher"].argmax(-1)
    agreement = {
        k: float((v.argmax(-1) == teacher_top).float().mean())
        for k, v in scores.items()
        if k != "teacher"
    }
    timed = test_items[: args.speed_queries]
    speed = pair_scoring_speed(teacher, students["student_kl"], timed, args.speed_repeats)
    result = {
        "command": command,
        "commands": commands,  # with --stop-after / --resume: every part, in order
        "config": {**vars(args), "out": str(args.out), **describe(teacher)},
        "data": {"train": train_stats, "test": test_stats, "kind": "synthetic (ShapeWorld)"},
        "stages": stages,
        "accuracy": accuracy,
        "agreement_with_teacher_top1": agreement,
        "speed": speed,
        "seconds": time.perf_counter() - t_start,
    }
    text = markdown(result)
    write_report(args.out, "dse", result, text, lambda p: plot(result, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
