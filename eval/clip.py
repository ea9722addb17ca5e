"""Evaluate a CLIP checkpoint: zero-shot object classification and retrieval on ShapeWorld;
image-text retrieval on your own captioned images.

    python -m eval.clip --checkpoint runs/clip/final --data out/shapeworld --split val
    python -m eval.clip --checkpoint checkpoints/shapes/clip --data out/shapeworld --limit 200 \\
        --json results/clip_val.json
    python -m eval.clip --checkpoint runs/clip_mine/final --imagefolder my_photos_test
    python -m eval.clip --checkpoint runs/clip_coco/final --images coco/val2017 \\
        --captions-json coco/annotations/captions_val2017.json --limit 1000

Prints a markdown table; --json also writes every figure. The library functions
``evaluate_clip(model, tokenizer, preprocess, data_root, split, limit)`` (ShapeWorld) and
``evaluate_retrieval(model, tokenizer, preprocess, pairs)`` (any captioned images) are what the
CLI and the regression tests call.

Protocol:

- Zero-shot classification of single objects. Each annotated object with at most
  ``max_occlusion`` (default 0.5) of its area hidden is cut out by its visible mask, at the scale
  the model sees the whole image at, and pasted centred on a canvas of the scene's background
  colour (the mean of the pixels no object covers): a masked crop (``crop="masked"``). The model
  never saw objects larger than ShapeWorld draws them, so crops are not zoomed; masking removes
  the neighbours that a box would include. ``crop="box"`` is the plain alternative: the bounding
  box grown by 25 % per side, squared, resized to the input (objects zoomed, neighbours visible).
  Class: argmax over the text embeddings of every class name (seen and unseen together, prompt
  templates of vision.clip.TEMPLATES averaged); accuracy reported separately over objects of seen
  and of unseen classes. Colour: argmax over "<colour> shape" for every colour, accuracy over
  objects of seen and of unseen colours. Unseen classes and colours are those the dataset flags.
- Retrieval on the first ``limit`` images: one caption per image, the one that names every object
  by colour and class (ShapeWorld's listing captions; the shortest such, e.g. "A red circle, two
  blue stars and a white ring."; if none names all, the one that names most). Text->image and
  image->text recall@1/5 (eval.metrics.recall_at_k); images whose chosen captions are the same
  string count as positives of each other.
- Your own images (``--imagefolder`` with captions in metadata.jsonl, or ``--images`` with
  ``--captions-json``): the COCO / Flickr30k retrieval protocol. Every caption is a text->image
  query whose one positive is its image (a string two images share is credited to each only as
  its own caption); every image is an image->text query whose positives are all of its
  captions; recall@1/5/10 (a k at or above the number of items is left out). Entries that name
  the same file (a folder with one row per caption) are one image with all their captions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from core.io import atomic_write_text
from core.runtime import resolve_device
from data.datasets import (
    CaptionDataset,
    InstanceDataset,
    add_caption_arguments,
    caption_source_error,
    shapeworld_paths,
    user_captions_to_evaluate,
)
from data.formats import read_coco_captions
from data.language import listing_caption
from data.scene import COLOURS, UNSEEN_COLOURS
from data.shapeworld import read_manifest
from eval.metrics import recall_at_k
from vision.clip import (
    ClipModel,
    CropKind,
    background_fill,
    load_clip,
    object_crop,
    text_classifier,
)

__all__ = [
    "evaluate_clip",
    "evaluate_retrieval",
    "format_table",
    "listing_caption",
    "main",
    "object_crop",
    "retrieval_recalls",
]


def retrieval_recalls(
    image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str]
) -> dict[str, float]:
    """Text->image and image->text recall@1/5 of paired embeddings.

    image_emb, text_emb: (N, D) unit rows, pair i = (image i, caption i); captions: the N
    caption strings (identical strings are positives of each other).
    """
    if image_emb.shape != text_emb.shape or image_emb.shape[0] != len(captions):
        raise ValueError(
            f"expected (N, D) image and text embeddings and N captions, received "
            f"{tuple(image_emb.shape)}, {tuple(text_emb.shape)} and {len(captions)}"
        )
    names = np.asarray(captions, dtype=object)
    positives = names[:, None] == names[None, :]  # (N, N) bool, symmetric
    scores = (text_emb @ image_emb.T).float().cpu().numpy()  # (N texts, N images)
    ks = [k for k in (1, 5) if k <= len(captions)]
    t2i = recall_at_k(scores, positives, ks)
    i2t = recall_at_k(scores.T, positives.T, ks)
    out = {f"t2i_r{k}": v for k, v in t2i.items()}
    out.update({f"i2t_r{k}": v for k, v in i2t.items()})
    return out


@torch.no_grad()
def _encode(model: ClipModel, pixels: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    p = next(model.visual.parameters())
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.stack(pixels[start : start + batch_size]).to(p.device, p.dtype)
        out.append(model.encode_image(batch, normalize=True).float())
    return torch.cat(out)  # (N, D)


def _accuracy(pred: np.ndarray, true: np.ndarray, keep: np.ndarray) -> float | None:
    return float(np.mean(pred[keep] == true[keep])) if keep.any() else None


@torch.no_grad()
def evaluate_clip(
    model: ClipModel,
    tokenizer: Any,
    preprocess: Any,
    data_root: str | os.PathLike[str],
    split: str = "val",
    limit: int | None = None,
    *,
    crop: CropKind = "masked",
    max_occlusion: float = 0.5,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot class / colour accuracy (seen, unseen) and retrieval recall on a ShapeWorld split.

    Returns a JSON-ready dict: accuracies and recalls in [0, 1] (None where a group is empty),
    counts, chance levels and the protocol's settings. See the module docstring.
    """
    model.eval()
    paths = shapeworld_paths(data_root, split)
    inst = InstanceDataset.from_shapeworld(data_root, split)
    n = len(inst) if limit is None else min(limit, len(inst))
    if n < 1:
        raise ValueError(f"{data_root} split {split!r} has no images to evaluate (limit={limit})")
    coco = read_coco_captions(paths["captions"])
    by_image: dict[int, list[str]] = {}
    for cap in coco.captions:
        by_image.setdefault(cap.image_id, []).append(cap.caption)
    try:
        manifest = read_manifest(data_root)
        colours = [c["name"] for c in manifest["colours"]]
        unseen_colours = {c["name"] for c in manifest["colours"] if c.get("unseen")}
    except (FileNotFoundError, KeyError):  # a COCO-format copy without shapeworld.json
        colours, unseen_colours = list(COLOURS), set(UNSEEN_COLOURS)
    class_names = [inst.category_names[k] for k in sorted(inst.category_names)]
    size = _input_size(model)

    crops, obj_class, obj_colour = [], [], []
    scenes, chosen = [], []
    skipped = 0
    for i in tqdm(range(n), desc=f"read {split}", disable=not progress, unit="img"):
        item = inst[i]
        image = np.asarray(item.image)
        union = np.zeros(image.shape[:2], dtype=bool)
        for obj in item.instances:
            union |= obj.mask
        fill_rgb = background_fill(image, union)
        visible = []
        for obj in item.instances:
            colour = obj.attributes.get("colour")
            if not obj.mask.any():
                continue
            visible.append((str(colour), obj.category))
            if colour is None or float(obj.attributes.get("occlusion", 0.0)) > max_occlusion:
                skipped += 1
                continue
            crops.append(preprocess(object_crop(image, obj.mask, size, fill_rgb, crop)))
            obj_class.append(obj.category)
            obj_colour.append(colour)
        scenes.append(preprocess(item.image))
        captions = by_image.get(item.image_id, [])
        if not captions:
            raise ValueError(f"{paths['captions']}: image id {item.image_id} has no caption")
        chosen.append(listing_caption(captions, visible))

    if not crops:
        raise ValueError(f"no objects to classify in the first {n} images of {split!r}")
    crop_emb = _encode(model, crops, batch_size)  # (M, D)
    class_head = text_classifier(model, tokenizer, class_names)  # (C, D)
    colour_head = text_classifier(model, tokenizer, [f"{c} shape" for c in colours])  # (K, D)
    pred_class = np.asarray(class_names)[(crop_emb @ class_head.T).argmax(1).cpu().numpy()]
    pred_colour = np.asarray(colours)[(crop_emb @ colour_head.T).argmax(1).cpu().numpy()]
    true_class, true_colour = np.asarray(obj_class), np.asarray(obj_colour)
    unseen_cls = np.isin(true_class, sorted(inst.unseen))
    unseen_col = np.isin(true_colour, sorted(unseen_colours))

    image_emb = _encode(model, scenes, batch_size)  # (N, D)
    p = next(model.visual.parameters())
    text_emb = []
    for start in range(0, n, batch_size):
        ids = tokenizer(chosen[start : start + batch_size]).to(p.device)
        text_emb.append(model.encode_text(ids, normalize=True).float())
    recalls = retrieval_recalls(image_emb, torch.cat(text_emb), chosen)

    return {
        "split": split,
        "images": n,
        "objects": len(crops),
        "objects_skipped_occluded": skipped,
        "objects_seen_class": int((~unseen_cls).sum()),
        "objects_unseen_class": int(unseen_cls.sum()),
        "objects_seen_colour": int((~unseen_col).sum()),
        "objects_unseen_colour": int(unseen_col.sum()),
        "class_acc_seen": _accuracy(pred_class, true_class, ~unseen_cls),
        "class_acc_unseen": _accuracy(pred_class, true_class, unseen_cls),
        "colour_acc_seen": _accuracy(pred_colour, true_colour, ~unseen_col),
        "colour_acc_unseen": _accuracy(pred_colour, true_colour, unseen_col),
        "class_chance": 1 / len(class_names),
        "colour_chance": 1 / len(colours),
        **recalls,
        "protocol": {"crop": crop, "max_occlusion": max_occlusion, "input_size": size},
    }


@torch.no_grad()
def evaluate_retrieval(
    model: ClipModel,
    tokenizer: Any,
    preprocess: Any,
    pairs: CaptionDataset,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Text->image and image->text recall@1/5/10 over every caption of `pairs` (module
    docstring); JSON-ready, recalls in [0, 1]."""
    model.eval()
    pairs = pairs.merged_by_image()
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 images to retrieve among, received {len(pairs)}")
    p = next(model.visual.parameters())
    image_emb = []
    for start in tqdm(
        range(0, len(pairs), batch_size), desc="images", unit="batch", disable=not progress
    ):
        chunk = range(start, min(start + batch_size, len(pairs)))
        image_emb.append(_encode(model, [preprocess(pairs[i][0]) for i in chunk], batch_size))
    captions = [c for caps in pairs.captions for c in caps]
    owner = np.repeat(np.arange(len(pairs)), [len(caps) for caps in pairs.captions])  # (T,)
    text_emb = []
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(captions[start : start + batch_size]).to(p.device)
        text_emb.append(model.encode_text(ids, normalize=True).float())
    scores = (torch.cat(text_emb) @ torch.cat(image_emb).T).cpu().numpy()  # (T, N)
    positives = owner[:, None] == np.arange(len(pairs))[None, :]  # (T, N) bool: its own image
    t2i = recall_at_k(scores, owner, [k for k in (1, 5, 10) if k < len(pairs)])
    i2t = recall_at_k(scores.T, positives.T, [k for k in (1, 5, 10) if k < len(captions)])
    return {
        "images": len(pairs),
        "captions": len(captions),
        **{f"t2i_r{k}": v for k, v in t2i.items()},
        **{f"i2t_r{k}": v for k, v in i2t.items()},
    }


def retrieval_table(results: dict[str, Any], data: str) -> str:
    """A markdown table of `evaluate_retrieval`'s recalls (percentages)."""
    lines = [
        f"| CLIP retrieval on {data} ({results['images']} images, {results['captions']} "
        "captions) | R@1 | R@5 | R@10 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, name in (("t2i", "text->image"), ("i2t", "image->text")):
        cells = [_fmt(results.get(f"{key}_r{k}")) for k in (1, 5, 10)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _input_size(model: ClipModel) -> int:
    """The image tower's input side (open_clip towers store image_size as an int or a pair)."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """A markdown table of the figures (percentages)."""
    rows = [
        ("zero-shot class, seen classes", "class_acc_seen", "objects_seen_class"),
        ("zero-shot class, unseen classes", "class_acc_unseen", "objects_unseen_class"),
        ("zero-shot colour, seen colours", "colour_acc_seen", "objects_seen_colour"),
        ("zero-shot colour, unseen colours", "colour_acc_unseen", "objects_unseen_colour"),
    ]
    lines = [
        f"| CLIP on ShapeWorld {results['split']} ({results['images']} images) | % | n |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {_fmt(results[key])} | {results[count]} |" for name, key, count in rows]
    for key, name in (("t2i", "text->image"), ("i2t", "image->text")):
        for k in (1, 5):
            if f"{key}_r{k}" in results:
                lines.append(
                    f"| {name} R@{k} | {_fmt(results[f'{key}_r{k}'])} | {results['images']} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.clip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a CLIP checkpoint folder")
    src = parser.add_argument_group(
        "data (one of --data, --imagefolder, --images with --captions-json)"
    )
    src.add_argument("--data", type=Path, help="a ShapeWorld folder")
    src.add_argument("--split", default="val", help="its split to evaluate (default val)")
    add_caption_arguments(src)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--crop", choices=["masked", "box"], default="masked")
    parser.add_argument("--max-occlusion", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, received {args.limit}")
    why = caption_source_error(args, [args.split])
    if why:
        parser.error(why)
    pairs = None
    if args.data is None:
        try:
            pairs = user_captions_to_evaluate(args, args.limit)  # --limit counts images
        except (ValueError, OSError) as err:  # bad data: said before the model loads
            parser.error(str(err))
        if len(pairs) < 2:
            parser.error(f"need at least 2 captioned images to retrieve among, found {len(pairs)}")
    device = resolve_device(args.device)
    model, preprocess, tokenizer = load_clip(args.checkpoint)
    model.to(device)
    if pairs is not None:
        results = evaluate_retrieval(
            model,
            tokenizer,
            preprocess,
            pairs,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        results["data"] = str(args.imagefolder or args.captions_json)
        table = retrieval_table(results, str(args.imagefolder or args.captions_json))
    else:
        results = evaluate_clip(
            model,
            tokenizer,
            preprocess,
            args.data,
            args.split,
            args.limit,
            crop=args.crop,
            max_occlusion=args.max_occlusion,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        table = format_table(results)
    results["checkpoint"] = str(args.checkpoint)
    results["table"] = table
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
