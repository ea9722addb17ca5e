"""Refit GILL's decision head (retrieve or generate) on cached [IMG0] states, then set its prior.

    python -m train.gill_decision --data /work/data/sw --gen-data out/shapeworld_diffusion \\
        --out runs/gill_decision
    python -m train.gill_decision ... --checkpoint runs/gill_mapper/final   # another GILL
    python -m train.gill_decision ... --resume        # continue (the caches are reused)

train.gill trains the head beside everything else, on the listings of ShapeWorld scenes
("retrieve") against novel compositions in phrasings the listings never use
(vlm.gill.compose_description, "generate"). eval.gill asks it what the chat's users ask: the
listing of an indexed scene (retrieve) or the decoder's own caption of a one- or two-object
picture (generate), written in the same listing style, so the number of objects named is most of
what tells them apart (docs/RESULTS.md, GILL, "How far text alone can go"). This script shows the
head both kinds of generate request. Requests, each in a random vlm.gill.REQUEST_TEMPLATES
template, as train.gill asks them:

- retrieve: ``--scenes`` scenes of ``--data`` ``--splits`` (2-7 objects in the shapes preset);
- generate: ``--captions`` pictures of the decoder's data (``--gen-data`` ``--gen-split``, one or
  two objects) by their listing, and ``--compositions`` novel compositions.

The [IMG0] state of every request is computed once (train.cached; it depends on the VLM core and
the [IMG] rows only) and the head, the paper's Dropout + Linear, is refit alone with cross-entropy,
each class weighted by the inverse of its count. Then its **prior**: the generate logit's bias is
lowered by the margin t that maximises macro-F1 on a held-out mix of ``--val-scenes`` val scenes
and ``--val-captions`` pictures of the decoder's val split from index ``--val-gen-from`` on
(eval.gill's test reads the decoder's first val pictures: these stay unseen), so the head's argmax
is the chosen operating point for that mix (10 : 1 by default, as eval.gill's 1,000 scenes and
100 prompts). ``--no-prior`` keeps the balanced head; ``--prior-only`` refits nothing and sets the
prior of the head as trained (on the shapes preset the refit head ranked the held-out mix worse
than train.gill's: docs/RESULTS.md, GILL, "Session 19"). Everything else in the checkpoint is
left as it was (tested). Under ``accelerate launch`` process 0 runs the script, the others stop.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score

from data.datasets import shapeworld_paths
from generation.gill import GENERATE, RETRIEVE
from train.cached import (
    add_fit_arguments,
    begin_refit,
    cached_tensors,
    check_fit_args,
    fit_cached,
    items_digest,
    save_refit,
    start_fit,
    tensors_digest,
)
from vlm.gill import GILLVLM, REQUEST_TEMPLATES, compose_description, load_scenes, request_prompt

Request = tuple[str, int, int]  # (description, template, label)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.gill_decision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="a ShapeWorld folder (scenes)")
    parser.add_argument(
        "--splits", nargs="+", default=["train"], help="its splits to train on (default train)"
    )
    parser.add_argument(
        "--gen-data", type=Path, required=True, help="the decoder's ShapeWorld folder (1-2 objects)"
    )
    parser.add_argument("--gen-split", default="pretrain", help="its split to train on (pretrain)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: caches last/ final/")
    parser.add_argument("--scenes", type=int, default=3000, help="retrieve requests (scenes)")
    parser.add_argument(
        "--captions", type=int, default=2000, help="generate requests: decoder pictures"
    )
    parser.add_argument(
        "--compositions", type=int, default=1000, help="generate requests: novel compositions"
    )
    parser.add_argument("--val-scenes", type=int, default=500, help="held-out val scenes")
    parser.add_argument(
        "--val-captions", type=int, default=50, help="held-out pictures of the decoder's val split"
    )
    parser.add_argument(
        "--val-gen-from",
        type=int,
        default=500,
        help="the first decoder val picture held out here (eval.gill reads the first ones)",
    )
    prior = parser.add_mutually_exclusive_group()
    prior.add_argument(
        "--no-prior", action="store_true", help="keep the class-balanced head (no margin set)"
    )
    prior.add_argument(
        "--prior-only",
        action="store_true",
        help="no refit: keep the head as trained and set only its prior on the held-out mix",
    )
    add_fit_arguments(parser, steps=600, batch_size=256, lr=1e-3, what="decision head")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if "val" in args.splits:
        parser.error("--splits: the val split is held out (its first --val-scenes scenes)")
    if args.gen_split == "val":
        parser.error("--gen-split: the decoder's val split is held out (and eval.gill's)")
    checks = [(args.data, s) for s in [*args.splits, "val"]]
    for root, split in [*checks, (args.gen_data, args.gen_split), (args.gen_data, "val")]:
        try:
            shapeworld_paths(root, split)
        except FileNotFoundError as err:
            parser.error(str(err))
    for name in ("scenes", "captions", "val_scenes", "val_captions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, received {getattr(args, name)}")
    if args.compositions < 0 or args.val_gen_from < 0:
        parser.error("--compositions and --val-gen-from must be >= 0")
    check_fit_args(parser, args)


def pictures(root: Path, split: str, n: int, start: int = 0) -> list[str]:
    """The listings of `n` pictures of one or two objects of a split, from picture `start` on."""
    items = [s.listing for s in load_scenes(root, split)[start:] if 1 <= len(s.objects) <= 2]
    if len(items) < n:
        raise ValueError(
            f"{root} split {split!r}: {len(items)} pictures of one or two objects from index "
            f"{start}, fewer than the {n} asked for"
        )
    return items[:n]


def training_requests(args: argparse.Namespace) -> list[Request]:
    """Retrieve and generate requests with their templates: a pure function of the arguments."""
    rng = np.random.default_rng(args.seed)
    scenes = [s.listing for split in args.splits for s in load_scenes(args.data, split)]
    if len(scenes) < args.scenes:
        raise ValueError(f"{args.data} {args.splits}: {len(scenes)} scenes, < --scenes")
    generate = pictures(args.gen_data, args.gen_split, args.captions)
    generate += [compose_description(rng) for _ in range(args.compositions)]
    labelled = [(d, RETRIEVE) for d in scenes[: args.scenes]] + [(d, GENERATE) for d in generate]
    templates = rng.integers(len(REQUEST_TEMPLATES), size=len(labelled))
    return [(d, int(t), y) for (d, y), t in zip(labelled, templates, strict=True)]


def held_out_requests(args: argparse.Namespace) -> list[Request]:
    """eval.gill's form (template 0): val scenes, then decoder val pictures."""
    scenes = [s.listing for s in load_scenes(args.data, "val", args.val_scenes)]
    generate = pictures(args.gen_data, "val", args.val_captions, args.val_gen_from)
    return [(d, 0, RETRIEVE) for d in scenes] + [(d, 0, GENERATE) for d in generate]


def img0_cache(
    model: GILLVLM, requests: list[Request], folder: Path, key: dict[str, Any], progress: bool
) -> torch.Tensor:
    """(N, H) [IMG0] states of the requests."""

    def compute(chunk: Any) -> dict[str, torch.Tensor]:
        _, states = model.request_states([request_prompt(d, t) for d, t, _ in chunk])
        return {"img0": states.img0}

    return cached_tensors(folder, key, requests, compute, f"cache {folder.name}", progress)["img0"]


def best_margin(margins: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(t, macro-F1) with t the threshold on margin = logit(generate) - logit(retrieve) whose
    decision `margin > t` scores the highest macro-F1 on `truth`; ties go to the t nearest 0.
    Candidates: 0 and the midpoints between consecutive distinct margins."""
    values = np.unique(margins)
    ends = [values[0] - 1.0, values[-1] + 1.0]  # everything generate / everything retrieve
    candidates = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, ends])
    best = (0.0, -1.0)
    for t in sorted(candidates, key=abs):
        f1 = float(f1_score(truth, (margins > t).astype(int), average="macro", labels=[0, 1]))
        if f1 > best[1]:
            best = (float(t), f1)
    return best


@torch.no_grad()
def scores(head: torch.nn.Module, img0: torch.Tensor, truth: np.ndarray) -> dict[str, float]:
    """Macro-F1 of the head's argmax, its ROC AUC, on held-out states."""
    was = head.training
    head.eval()
    try:
        logits = head(img0)
    finally:
        head.train(was)
    margin = (logits[:, GENERATE] - logits[:, RETRIEVE]).numpy()
    return {
        "val_macro_f1": float(f1_score(truth, (margin > 0).astype(int), average="macro")),
        "val_auc": float(roc_auc_score(truth, margin)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    run = begin_refit(parser, argv, _check_args)
    if run is None:
        return 0
    args, base, device = run.args, run.base, run.device
    try:
        val_items = held_out_requests(args)
        train_items = [] if args.prior_only else training_requests(args)
    except ValueError as err:
        parser.error(str(err))
    model = GILLVLM.from_pretrained(base, device=device)
    model.eval()
    # the [IMG0] states depend on the VLM core and the [IMG] rows (vlm.safetensors) only
    key = {"vlm_tensors": tensors_digest(base / "vlm.safetensors")}
    n_gen = sum(y == GENERATE for _, _, y in train_items)
    fit = (
        "no refit (--prior-only)"
        if args.prior_only
        else (f"{len(train_items) - n_gen} retrieve and {n_gen} generate requests to refit on")
    )
    print(f"{fit}; held out {args.val_scenes} + {args.val_captions}; base {base}")
    progress = not args.no_progress
    val_key = {**key, "items": items_digest(val_items), "n": len(val_items)}
    val_img0 = img0_cache(model, val_items, args.out / "cache_val", val_key, progress)
    val_truth = np.array([y for _, _, y in val_items])
    model.requires_grad_(False)
    head = model.heads.decision.cpu().float().requires_grad_(True)
    as_loaded = scores(head, val_img0, val_truth)
    print(f"held out, the head as loaded: {as_loaded}")
    done, minutes = 0, 0.0
    if not args.prior_only:
        train_key = {**key, "items": items_digest(train_items), "n": len(train_items)}
        img0 = img0_cache(model, train_items, args.out / "cache_train", train_key, progress)
        labels = torch.tensor([y for _, _, y in train_items])
        counts = torch.bincount(labels, minlength=2).float()
        weight = counts.sum() / (2 * counts)  # each class weighs as much in the loss
        optimizer, scheduler, run_config, start = start_fit(
            parser,
            args,
            head,
            [{"params": [head.fc.weight]}, {"params": [head.fc.bias], "weight_decay": 0.0}],
            base,
            train_key,
        )

        def loss_on(idx: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head(img0[idx]), labels[idx], weight=weight)

        done, minutes = fit_cached(
            head, optimizer, scheduler, loss_on, lambda: scores(head, val_img0, val_truth),
            len(train_items), start, run_config, args, "train decision",
        )  # fmt: skip
    balanced = scores(head, val_img0, val_truth)
    head.eval()
    with torch.no_grad():
        logits = head(val_img0)
    margin, _ = best_margin((logits[:, GENERATE] - logits[:, RETRIEVE]).numpy(), val_truth)
    if not args.no_prior:
        with torch.no_grad():  # argmax now decides `margin > t`
            head.fc.bias[GENERATE] -= margin
    final_scores = scores(head, val_img0, val_truth)
    metadata = {
        "command": run.command,
        "steps_run": done,
        "steps_planned": 0 if args.prior_only else args.steps,
        "train_minutes_this_run": round(minutes, 2),
        "data": "none: the head as trained, its prior set"
        if args.prior_only
        else (
            f"retrieve: {args.data} {args.splits} first {args.scenes} scenes; generate: "
            f"{args.gen_data} {args.gen_split} first {args.captions} pictures of 1-2 objects "
            f"and {args.compositions} compositions"
        ),
        "held_out": (
            f"{args.data} val first {args.val_scenes} scenes; {args.gen_data} val "
            f"{args.val_captions} pictures of 1-2 objects from index {args.val_gen_from}"
        ),
        "val_as_loaded": as_loaded,
        "val_balanced": None if args.prior_only else balanced,
        "prior_margin": 0.0 if args.no_prior else margin,
        "val_final": final_scores,
    }
    model.heads.decision.to(device)
    final = save_refit(model, base, args, metadata)
    print(
        f"wrote {final} ({done} of {args.steps} steps, {minutes:.1f} min); held out: as loaded "
        f"{as_loaded}, balanced {balanced}, margin {metadata['prior_margin']:.3f} -> "
        f"{final_scores}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
