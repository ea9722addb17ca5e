"""Refit GILL's mapper on cached [IMG] states: thousands of steps where train.gill affords hundreds.

    python -m train.gill_mapper --data out/shapeworld_diffusion --split pretrain \\
        --out runs/gill_mapper --requests 8000 --steps 6000
    python -m train.gill_mapper ... --resume            # continue (the cache is reused)
    python -m train.gill_mapper --imagefolder my_photos --out runs/gill_mapper_mine  # your captions
    python -m train.gill_mapper --data out/shapeworld_diffusion --out runs/gill_mapper_stories \\
        --requests 4000 --compositions 1000 --stories 4000     # + contextual requests (below)

Why: every train.gill step runs the frozen 135M LLM over ~36 prompts (7-9 s per step on one CPU
thread), and the 174 steps it had left the mapper far from the decoder's conditioning (no
generated image held the requested objects; docs/RESULTS.md, issue 9). Once train.gill is done
the [IMG] rows are fixed, and with them the [IMG] states of any request: this script computes them
once for ``--requests`` captions (one LLM pass each, ~0.1 s), together with the decoder's own
encoding of each caption (the target), and then trains only the mapper on them with GILL's
generation loss (per-token distance, generation.gill.generation_loss), hundreds of steps a
minute. The paper trains the mapper jointly with the rows; here the rows, the retrieval and the
decision heads are left exactly as they were (the final folder differs from ``--checkpoint`` in
the mapper's tensors only; tested).

Requests are vlm.gill.REQUEST_TEMPLATES ("Show me this: <caption>", ...) around captions drawn
from the data (by default the decoder's own training captions: what it renders well) plus
``--compositions`` novel compositions (vlm.gill.compose_description), as train.gill asks for
images, plus ``--stories`` contextual requests (ShapeWorld data only): a story of the same split
(data/stories.py: four captioned panels, then a fifth caption naming the objects by class only,
vlm.gill.story_prompt), whose target is the decoder's encoding of the fifth scene's own caption,
colours named, so the mapper learns to take from the [IMG] states what only the context says.
GILL trains its mapper on captions alone and reports that context helps
(VIST, Sec. 4.1); ours, trained so, drew no measurable gain from the context (docs/RESULTS.md,
issue 9). The stories are our departure: a fine-tune on the training split's stories, as one on
VIST's train split would be; the evaluation's stories come from a held-out split
(eval.gill_stories). The last ``--val`` requests are held out: their mean distance is logged every
``--eval-every`` steps beside two references, the mapper as loaded and the best constant (the
mean training target), and with stories, the held-out stories' distance alone.

Cache: ``<out>/cache/part-NNNN.safetensors``, written atomically chunk by chunk; an interrupted
run keeps the chunks it finished, and ``--resume`` (or a new run into the same folder with the same
checkpoint, data and requests) reuses them. The mapper is small: under ``accelerate launch``
process 0 runs the script and the others stop (train/decoding_common.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

from data.datasets import (
    CaptionDataset,
    add_caption_arguments,
    caption_source_error,
    user_captions_from_args,
)
from data.stories import Story, make_stories
from generation.diffusion import encode_prompts, pipeline_from_preset
from generation.gill import build_mapper, generation_loss
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
from vlm.gill import GILLVLM, REQUEST_TEMPLATES, compose_description, story_prompt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.gill_mapper",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_argument_group("captions (one of --data, --imagefolder, --images)")
    src.add_argument("--data", type=Path, help="a ShapeWorld folder (e.g. the decoder's data)")
    src.add_argument("--split", default="pretrain", help="its split (default pretrain)")
    add_caption_arguments(src)
    parser.add_argument("--out", type=Path, required=True, help="run folder: cache/ last/ final/")
    parser.add_argument(
        "--requests", type=int, default=8000, help="captions to cache (at most all of them)"
    )
    parser.add_argument(
        "--compositions", type=int, default=2000, help="novel-composition requests to cache"
    )
    parser.add_argument(
        "--stories",
        type=int,
        default=0,
        help="contextual story requests from --data's split (default 0; module docstring)",
    )
    parser.add_argument("--val", type=int, default=256, help="requests held out (default 256)")
    parser.add_argument(
        "--fresh-mapper", action="store_true", help="start from new weights, not the checkpoint's"
    )
    add_fit_arguments(parser, steps=6000, batch_size=64, lr=3e-4, what="mapper")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    why = caption_source_error(args, [args.split])
    if why:
        parser.error(why)
    for name in ("requests", "val"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, received {getattr(args, name)}")
    for name in ("compositions", "stories"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, received {getattr(args, name)}")
    if args.stories and args.data is None:
        parser.error("--stories needs a ShapeWorld --data folder (stories are made from scenes)")
    check_fit_args(parser, args)


def _captions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], str]:
    """Every caption of the data (each image's, in order) and a one-line description."""
    if args.data is not None:
        pairs = CaptionDataset.from_shapeworld(args.data, args.split)
        where = f"ShapeWorld {args.data} split {args.split}"
    else:
        try:
            pairs, description = user_captions_from_args(args)
        except (ValueError, OSError) as err:  # bad data: say what, no traceback
            parser.error(str(err))
        where = f"{description['kind']} {description.get('root') or description.get('captions')}"
    return [c for caps in pairs.captions for c in caps], where


def draw_requests(
    captions: list[str], n: int, compositions: int, seed: int
) -> list[tuple[str, str]]:
    """(request, caption) pairs, shuffled: `n` distinct captions (at most all) and `compositions`
    novel ones, each inside a random request template. A pure function of its arguments."""
    rng = np.random.default_rng(seed)
    unique = list(dict.fromkeys(captions))
    picked = [unique[int(i)] for i in rng.choice(len(unique), min(n, len(unique)), replace=False)]
    picked += [compose_description(rng) for _ in range(compositions)]
    pairs = [
        (REQUEST_TEMPLATES[int(rng.integers(len(REQUEST_TEMPLATES)))].format(c), c) for c in picked
    ]
    return [pairs[int(i)] for i in rng.permutation(len(pairs))]


# A cached item: (the request's turns, the caption whose decoder encoding is its target).
Item = tuple[list[dict[str, Any]], str]


def request_items(
    pairs: Sequence[tuple[str, str]], stories: Sequence[Story], seed: int
) -> list[Item]:
    """The cached items: each (request, caption) pair as one user turn, in the pairs' order when
    there are no stories; with stories, each story's contextual request (a random template) with
    the fifth scene's own caption joins them and the whole list is shuffled again (so the held-out
    tail holds both kinds). A pure function of its arguments."""
    items: list[Item] = [([{"role": "user", "content": request}], cap) for request, cap in pairs]
    if not stories:
        return items
    rng = np.random.default_rng([seed, len(stories)])
    items += [
        (story_prompt(s, int(rng.integers(len(REQUEST_TEMPLATES)))), s.target_caption)
        for s in stories
    ]
    return [items[int(i)] for i in rng.permutation(len(items))]


def is_story(turns: list[dict[str, Any]]) -> bool:
    """Whether a cached request is a story (it holds the panels' images; a plain one holds none)."""
    return any(turn.get("images") for turn in turns)


def build_cache(
    model: GILLVLM,
    pipe: Any,
    items: list[Item],
    folder: Path,
    key: dict[str, Any],
    progress: bool = True,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (N, r, H), targets (N, L, D)) of every request: the [IMG] states from the frozen
    model, `batch_size` requests per pass (a story holds four images), and the decoder's encoding
    of the caption (`cached_tensors`)."""

    def compute(chunk: Sequence[Item]) -> dict[str, torch.Tensor]:
        hidden: list[torch.Tensor | None] = [None] * len(chunk)
        # a core with an image LoRA runs a batch with images or one without: stories apart,
        # `batch_size` at a time (four images each); the short text requests in one pass
        for kind in (True, False):
            rows = [i for i, (turns, _) in enumerate(chunk) if is_story(turns) == kind]
            step = batch_size if kind else max(1, len(rows))
            for start in range(0, len(rows), step):
                part = rows[start : start + step]
                _, states = model.request_states([chunk[i][0] for i in part])
                for i, h in zip(part, states.hidden, strict=True):
                    hidden[i] = h
        target = encode_prompts(pipe, [caption for _, caption in chunk])
        return {"hidden": torch.stack(cast(list[torch.Tensor], hidden)), "targets": target}

    cache = cached_tensors(folder, key, items, compute, "cache [IMG] states", progress)
    return cache["hidden"], cache["targets"]


@torch.no_grad()
def val_distance(
    model: GILLVLM, hidden: torch.Tensor, embeds: torch.Tensor, targets: torch.Tensor
) -> float:
    """Mean per-token distance of the mapper's output to the targets (eval mode, batches of 256)."""
    mapper = model.heads.mapper
    was = mapper.training
    mapper.eval()
    try:
        total = 0.0
        for s in range(0, hidden.shape[0], 256):
            h = hidden[s : s + 256]
            pred = mapper(h, embeds.expand(h.shape[0], -1, -1))
            total += float(generation_loss(pred, targets[s : s + 256])) * h.shape[0]
        return total / hidden.shape[0]
    finally:
        mapper.train(was)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    run = begin_refit(parser, argv, _check_args)
    if run is None:
        return 0
    args, preset, base, device = run.args, run.preset, run.base, run.device
    diffusers_logging.set_verbosity_error()  # long captions are cut by the decoder's tokenizer
    model = GILLVLM.from_pretrained(base, device=device)
    model.eval()  # the LLM side only reads; the mapper is switched to train below
    pipe = pipeline_from_preset(preset.diffusion).to(device)  # frozen: only its text encoder
    captions, data_desc = _captions(parser, args)
    pairs = draw_requests(captions, args.requests, args.compositions, args.seed)
    stories: list[Story] = []
    if args.stories:
        try:
            stories = make_stories(args.data, args.split, args.stories, args.seed)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
        if len(stories) < args.stories:
            parser.error(
                f"--stories {args.stories}: only {len(stories)} stories can be made from "
                f"{data_desc} (ask for at most that many)"
            )
    items = request_items(pairs, stories, args.seed)
    if len(items) <= args.val + args.batch_size:
        parser.error(
            f"{len(items)} requests from {data_desc}: need more than --val {args.val} + "
            f"--batch-size {args.batch_size}"
        )
    cache_key = {
        # the [IMG] states depend on the VLM core and the [IMG] rows (vlm.safetensors), not on
        # the heads: a cache serves any refit of the same train.gill run, in any dtype
        "vlm_tensors": tensors_digest(base / "vlm.safetensors"),
        "decoder": str(preset.diffusion.checkpoint or preset.diffusion.model),
        "data": data_desc,
        "requests": args.requests,
        "compositions": args.compositions,
        "seed": args.seed,
        # the requests and captions themselves; without stories, the key of the runs before
        # --stories existed (a digest of the pairs), so that their caches stay valid
        "items": items_digest(items if stories else pairs),
        **({"stories": len(stories)} if stories else {}),
    }
    n_caps = len(pairs) - args.compositions
    print(
        f"{len(items)} requests ({n_caps} captions from {data_desc}, {args.compositions} "
        f"compositions, {len(stories)} stories; {args.val} held out); base {base}"
    )
    hidden, targets = build_cache(
        model, pipe, items, args.out / "cache", cache_key, progress=not args.no_progress
    )
    with torch.no_grad():  # the [IMG] rows: the same input embeddings for every request
        ids = torch.tensor(model.img_ids, device=device)
        embeds = model.vlm.embed(ids[None]).float().cpu()  # (1, r, H)
    model.requires_grad_(False)
    if args.fresh_mapper:
        cfg = model.config
        model.heads.mapper = build_mapper(cfg.llm_dim, cfg.mapper, cfg.num_img_tokens)
    mapper = model.heads.mapper.cpu().float().requires_grad_(True)
    n_train = len(items) - args.val
    train_h, train_t = hidden[:n_train], targets[:n_train]
    val_h, val_t = hidden[n_train:], targets[n_train:]
    val_story = torch.tensor([is_story(turns) for turns, _ in items[n_train:]])
    constant = train_t.mean(0, keepdim=True).expand_as(val_t)

    def evaluate() -> dict[str, float]:
        """The held-out distance, and that of the held-out stories alone (when there are any: a
        training diagnostic, as their scenes come from the training split; eval.gill_stories
        measures stories of a held-out split)."""
        out = {"val_distance": val_distance(model, val_h, embeds, val_t)}
        if val_story.any():
            out["val_distance_stories"] = val_distance(
                model, val_h[val_story], embeds, val_t[val_story]
            )
        return out

    references = {
        "val_distance_constant": round(float(generation_loss(constant, val_t)), 4),
        **{f"{k}_base": round(v, 4) for k, v in evaluate().items()},
    }
    print(
        f"val distance: the base mapper {references['val_distance_base']:.3f}, the best constant "
        f"(mean training target) {references['val_distance_constant']:.3f}"
        + (
            f"; held-out stories, base {references['val_distance_stories_base']:.3f}"
            if "val_distance_stories_base" in references
            else ""
        )
    )
    optimizer, scheduler, run_config, start = start_fit(
        parser, args, mapper, mapper.parameters(), base, cache_key, fresh_mapper=args.fresh_mapper
    )

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        h = train_h[idx]
        return generation_loss(mapper(h, embeds.expand(h.shape[0], -1, -1)), train_t[idx])

    done, minutes = fit_cached(
        mapper, optimizer, scheduler, loss_on, evaluate, n_train, start, run_config, args,
        "train mapper",
    )  # fmt: skip
    last = evaluate()
    last_val = last["val_distance"]
    metadata = {
        "command": run.command,
        "steps_run": done,
        "steps_planned": args.steps,
        "train_minutes_this_run": round(minutes, 2),
        "data": data_desc,
        "requests": len(items),
        "stories": len(stories),
        **{k: round(v, 4) for k, v in last.items()},
        **references,
    }
    model.heads.mapper.to(device)
    final = save_refit(model, base, args, metadata)
    print(
        f"wrote {final} ({done} of {args.steps} steps, {minutes:.1f} min this run); val distance "
        f"{last_val:.3f} (base {references['val_distance_base']:.3f}, constant "
        f"{references['val_distance_constant']:.3f})"
        + (
            f"; held-out stories {last['val_distance_stories']:.3f} (base "
            f"{references['val_distance_stories_base']:.3f})"
            if "val_distance_stories" in last
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
