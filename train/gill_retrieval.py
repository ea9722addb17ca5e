"""Refit GILL's retrieval heads on cached [IMG0] states: large in-batch InfoNCE, many steps.

    python -m train.gill_retrieval --data /work/data/sw --out runs/gill_retrieval \\
        --scenes 6000 --steps 3000
    python -m train.gill_retrieval ... --resume            # continue (the caches are reused)
    python -m train.gill_retrieval --checkpoint runs/gill_mapper/final ...   # after the mapper

The same reasoning as train.gill_mapper (its docstring): once train.gill is done the [IMG] rows
are fixed, and so is the [IMG0] state of every request. This script computes it once for
``--scenes`` ShapeWorld scenes of ``--splits`` (a request "Show me this: <listing caption>" in a
random template, as train.gill asks) together with the frozen CLIP's embedding of each scene's
image, then trains only the retrieval heads (the two projections into the shared space and the
logit scale) with GILL's symmetric InfoNCE, at ``--batch-size`` in-batch negatives (train.gill:
16). Everything else in the checkpoint is left as it was (tested). An index built with the old
heads is refused by the new ones (its embedder name hashes the image projection): rebuild it
with ``python -m vlm.gill index``.

Held out: the first ``--val`` scenes of the ``val`` split, queried as eval.gill queries them
(template 0); their text -> image R@1/R@5 among themselves is logged every ``--eval-every`` steps
beside the heads as loaded. Caches: ``<out>/cache_train`` and ``<out>/cache_val``, chunk by chunk
(train.gill_mapper.cached_tensors). Under ``accelerate launch`` process 0 runs the script and the
others stop (train/decoding_common.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.datasets import shapeworld_paths
from generation.gill import info_nce
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
from vlm.gill import GILLVLM, REQUEST_TEMPLATES, SceneItem, load_scenes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.gill_retrieval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="a ShapeWorld folder")
    parser.add_argument(
        "--splits", nargs="+", default=["train"], help="its splits to train on (default train)"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder: caches last/ final/")
    parser.add_argument("--scenes", type=int, default=6000, help="training scenes (the first N)")
    parser.add_argument("--val", type=int, default=500, help="held-out val scenes (default 500)")
    add_fit_arguments(parser, steps=3000, batch_size=256, lr=1e-3, what="retrieval heads")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if "val" in args.splits:
        parser.error("--splits: the val split is held out (its first --val scenes measure recall)")
    for split in [*args.splits, "val"]:
        try:
            shapeworld_paths(args.data, split)
        except FileNotFoundError as err:
            parser.error(str(err))
    if args.scenes < 1:
        parser.error(f"--scenes must be >= 1, received {args.scenes}")
    if args.batch_size < 2 or args.val < 2:
        parser.error("--batch-size and --val must be >= 2 (InfoNCE and recall need negatives)")
    check_fit_args(parser, args)


def scene_cache(
    model: GILLVLM,
    scenes: list[SceneItem],
    templates: list[int],
    folder: Path,
    key: dict[str, Any],
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(img0 (N, H), CLIP image embeddings (N, E)) of the scenes' requests and images."""
    jobs = list(zip(scenes, templates, strict=True))

    def compute(chunk: Any) -> dict[str, torch.Tensor]:
        prompts = [
            [{"role": "user", "content": REQUEST_TEMPLATES[t].format(s.listing)}] for s, t in chunk
        ]
        _, states = model.request_states(prompts)
        return {
            "img0": states.img0,
            "image": model.clip_image_embeds([s.image_path for s, _ in chunk]),
        }

    cache = cached_tensors(folder, key, jobs, compute, f"cache {folder.name}", progress)
    return cache["img0"], cache["image"]


@torch.no_grad()
def recall(model: GILLVLM, img0: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """Text -> image R@1/R@5 of each request among the images (row i is request i's image)."""
    heads = model.heads.retrieval
    was = heads.training
    heads.eval()
    try:
        out = heads(img0, images)
        sims = out.text_embeds @ out.image_embeds.T  # (N, N)
        rank = (sims > sims.diagonal()[:, None]).sum(1)  # images scored above the right one
        return {f"R@{k}": float((rank < k).float().mean()) for k in (1, 5)}
    finally:
        heads.train(was)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    run = begin_refit(parser, argv, _check_args)
    if run is None:
        return 0
    args, base, device = run.args, run.base, run.device
    model = GILLVLM.from_pretrained(base, device=device)
    model.eval()
    scenes = [s for split in args.splits for s in load_scenes(args.data, split)][: args.scenes]
    val = load_scenes(args.data, "val", args.val)
    if len(scenes) < args.batch_size:
        parser.error(f"{len(scenes)} scenes in {args.splits}, fewer than --batch-size")
    rng = np.random.default_rng(args.seed)
    templates = [int(t) for t in rng.integers(len(REQUEST_TEMPLATES), size=len(scenes))]
    key = {
        # the [IMG] states depend on the VLM core and the [IMG] rows (vlm.safetensors), not on
        # the heads: a cache serves any refit of the same train.gill run, in any dtype
        "vlm_tensors": tensors_digest(base / "vlm.safetensors"),
        "data": str(args.data),
        "seed": args.seed,
    }
    jobs = [(str(sc.image_path), sc.listing, t) for sc, t in zip(scenes, templates, strict=True)]
    train_key = {**key, "splits": args.splits, "scenes": len(scenes), "items": items_digest(jobs)}
    print(
        f"{len(scenes)} training scenes of {args.data} {args.splits}; {len(val)} val; base {base}"
    )
    progress = not args.no_progress
    text, image = scene_cache(
        model, scenes, templates, args.out / "cache_train", train_key, progress
    )
    held = [(str(sc.image_path), sc.listing, 0) for sc in val]
    val_key = {**key, "splits": ["val"], "scenes": len(val), "items": items_digest(held)}
    val_text, val_image = scene_cache(
        model, val, [0] * len(val), args.out / "cache_val", val_key, progress
    )
    model.requires_grad_(False)
    heads = model.heads.retrieval.cpu().float().requires_grad_(True)
    base_recall = recall(model, val_text, val_image)
    print(f"val recall, the heads as loaded: {base_recall}")
    optimizer, scheduler, run_config, start = start_fit(
        parser,
        args,
        heads,
        [
            {"params": [heads.text_proj.weight, heads.image_proj.weight]},
            {
                "params": [heads.text_proj.bias, heads.image_proj.bias, heads.logit_scale],
                "weight_decay": 0.0,
            },
        ],
        base,
        train_key,
    )

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        out = heads(text[idx], image[idx])
        return info_nce(out.text_embeds, out.image_embeds, out.logit_scale)

    done, minutes = fit_cached(
        heads, optimizer, scheduler, loss_on, lambda: recall(model, val_text, val_image),
        len(scenes), start, run_config, args, "train retrieval",
    )  # fmt: skip
    last = recall(model, val_text, val_image)
    metadata = {
        "command": run.command,
        "steps_run": done,
        "steps_planned": args.steps,
        "train_minutes_this_run": round(minutes, 2),
        "data": f"{args.data} {args.splits} first {len(scenes)}",
        "val_recall": last,
        "val_recall_base": base_recall,
    }
    model.heads.retrieval.to(device)
    final = save_refit(model, base, args, metadata)
    print(f"wrote {final} ({done} of {args.steps} steps, {minutes:.1f} min); val {last} "
          f"(as loaded {base_recall})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
