"""Evaluate open-vocabulary segmentation, or segment one image with any vocabulary.

    # the ablation on ShapeWorld test: mask pooling and each adapter, on SAM proposals
    python -m eval.seg --data out/shapeworld --split test --limit 200 \\
        --adapter stage1=out/seg/stage1/final --adapter stage2=out/seg/stage2/final \\
        --json out/seg.json --markdown out/seg.md
    # your data: COCO instances (semantic targets painted from them, or --semantic maps), or
    # ADE-style label maps with a class list (value k = line k)
    python -m eval.seg --images val2017/ --instances instances_val2017.json --limit 100
    python -m eval.seg --images ade/images --semantic ade/labels --classes ade/classes.txt \\
        --unseen "lamp,vase" --adapter out/seg/stage2/final
    # one image, any vocabulary (synonyms and attribute phrases too); writes an overlay PNG.
    # Masks are classified by the --adapter if given, else as masked crops (--classifier).
    # A photo over 1024 px a side is segmented at 1024 (the app's size, vlm.tools); the areas
    # and boxes printed are in the file's own pixels, the overlay at the segmented size
    python -m eval.seg --image photo.png --vocab "circle,star,heart,purple hexagon" \\
        --overlay out/seg.png

Two measurements per classifier (masked crops, mask pooling, then every ``--adapter NAME=PATH``),
on the same images:

- ground-truth mask classification (the Mask-Adapter paper's ADE experiment, 51 % with pooling vs
  69 % with the adapter): every ground-truth instance mask of the split, classified among all the
  dataset's classes; accuracy over seen and over unseen classes (unseen = never in segmentation
  training: ShapeWorld's ``UNSEEN_SHAPES``, or COCO categories flagged ``"unseen": true``).
- semantic segmentation from SAM's automatic masks (``segmentation.open_vocab``): masks covering
  more than half the image are dropped first (background regions; the same for every
  classifier), the rest are classified and merged per pixel (``semantic_inference``); mIoU over
  seen classes, over unseen classes, their harmonic mean (background scored as a class but in
  neither mean), from one confusion matrix over the split (``eval.metrics``). SAM proposals are
  computed once and cached (``--proposals``).
- ``--zero ignore`` (the default for ADE-style label maps, ADE-150's protocol: label 0 is
  "other", unlabelled): label-0 pixels are not scored, no proposal is dropped (a wall or the sky
  is a class there), and the classes alone compete per pixel (Mask2Former's semantic inference).
  ``--zero background`` (ShapeWorld's and COCO's default): label 0 is a plain background, scored.

Time per image: proposals once (SAM), then the classification of each configuration, medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from core.images import fit_within, image_size, load_rgb, paint_labels
from core.io import atomic_write_text
from data.datasets import InstanceDataset, shapeworld_paths
from eval.metrics import ConfusionMatrix, seen_unseen_miou
from segmentation.mask_adapter import load_adapter
from segmentation.open_vocab import (
    EnsembleSegmenter,
    OpenVocabSegmenter,
    load_mask_lists,
    parse_vocabulary,
    sam_proposals,
    save_mask_lists,
    semantic_inference,
)
from vision.clip import load_clip
from vision.sam import load_sam
from vlm.config import PolychromeConfig
from vlm.tools import POINTS_PER_BATCH, TOOL_MAX_SIDE, scaled_extent

__all__ = ["drop_background_masks", "evaluate_classifier", "main", "overlay"]

MAX_MASK_FRACTION = 0.5  # proposals covering more of the image are background regions
ZERO_LABELS = ("background", "ignore")  # what label 0 of a semantic map is (--zero)


def drop_background_masks(masks: np.ndarray, max_fraction: float = MAX_MASK_FRACTION) -> np.ndarray:
    """The masks (M, H, W) that cover at most ``max_fraction`` of the image."""
    if len(masks) == 0:
        return masks
    area = masks.reshape(len(masks), -1).mean(axis=1)
    return masks[area <= max_fraction]


def evaluate_classifier(
    segmenter: OpenVocabSegmenter | EnsembleSegmenter,
    dataset: InstanceDataset,
    semantic: Callable[[int], np.ndarray] | None,
    proposals: list[np.ndarray] | None,
    limit: int,
    progress: bool = True,
    desc: str = "eval",
    zero: str = "background",
) -> dict[str, Any]:
    """Ground-truth mask accuracy and (with proposals and ``semantic``, image index -> its (H, W)
    category-id map, 0 = background) semantic mIoU. ``zero``: "background" (label 0 is a class,
    scored; large proposals dropped as background) or "ignore" (label 0 unscored, see above)."""
    if zero not in ZERO_LABELS:
        raise ValueError(f"zero must be one of {ZERO_LABELS}, received {zero!r}")
    names = [dataset.category_names[k] for k in sorted(dataset.category_names)]
    ids = sorted(dataset.category_names)
    index_of = {cid: i for i, cid in enumerate(ids)}
    unseen = {i for i, n in enumerate(names) if n in dataset.unseen}
    correct = {"seen": [0, 0], "unseen": [0, 0]}
    ignore = max(255, len(names) + 1)  # outside the classes
    matrix = ConfusionMatrix(len(names) + 1, ignore)  # 0 = background, i + 1 = names[i]
    # semantic maps hold category ids (0 background) -> 1 + index; any other value (255, COCO-
    # stuff's ignore label, or an id that is no category) is ignored, not scored
    lut = np.full(max(ids) + 1, ignore, dtype=np.int64)
    lut[0] = 0 if zero == "background" else ignore
    for cid in ids:
        lut[cid] = index_of[cid] + 1
    seconds = []
    for i in tqdm(range(limit), desc=desc, disable=not progress):
        item = dataset[i]
        image = np.asarray(item.image)
        if item.instances:
            gt = np.stack([inst.mask for inst in item.instances])
            probs = segmenter.classify_masks(image, gt, names)[:, :-1]  # GT: void not allowed
            for inst, p in zip(item.instances, probs, strict=True):
                which = "unseen" if index_of[inst.category_id] in unseen else "seen"
                correct[which][0] += int(int(np.argmax(p)) == index_of[inst.category_id])
                correct[which][1] += 1
        if proposals is not None and semantic is not None:
            masks = proposals[i] if zero == "ignore" else drop_background_masks(proposals[i])
            t0 = time.perf_counter()
            probs = segmenter.classify_masks(image, masks, names)
            pred = semantic_inference(masks, probs, background=zero == "background")
            seconds.append(time.perf_counter() - t0)
            target = semantic(i)
            known = (target >= 0) & (target < len(lut))
            matrix.update(pred, np.where(known, lut[np.where(known, target, 0)], ignore))
    result: dict[str, Any] = {  # NaN where there was nothing of the kind to classify
        f"gt_mask_acc_{k}": v[0] / v[1] if v[1] else float("nan") for k, v in correct.items()
    }
    result["gt_masks"] = {k: v[1] for k, v in correct.items()}
    if seconds:
        iou = matrix.iou()
        classes = [i + 1 for i in range(len(names))]
        seen_classes = [c for c in classes if c - 1 not in unseen]
        unseen_classes = [c for c in classes if c - 1 in unseen]
        if seen_classes and unseen_classes:
            su = seen_unseen_miou(iou, seen_classes, unseen_classes)
        else:  # no split (ADE-style data, --unseen ""): one mIoU, the split's NaN
            whole = matrix.miou(classes)
            su = {
                "seen": whole if seen_classes else float("nan"),
                "unseen": whole if unseen_classes else float("nan"),
                "harmonic": float("nan"),
            }
        result.update(
            miou_seen=su["seen"],
            miou_unseen=su["unseen"],
            miou_harmonic=su["harmonic"],
            background_iou=float(iou[0]) if zero == "background" else float("nan"),
            per_class_iou={n: float(iou[i + 1]) for i, n in enumerate(names)},
            classify_seconds_median=float(np.median(seconds)),
        )
    return result


def _benchmark_data(
    args: argparse.Namespace,
) -> tuple[InstanceDataset, Callable[[int], np.ndarray]]:
    """The benchmark's instances and semantic targets: ShapeWorld (--data), COCO (--images +
    --instances [+ --semantic]) or ADE-style (--images + --semantic + --classes)."""
    if (args.data is None) == (args.images is None):
        raise ValueError("give --data (ShapeWorld) or --images with --instances or --semantic")
    if args.data is not None:
        dataset = InstanceDataset.from_shapeworld(args.data, args.split)
        folder = shapeworld_paths(args.data, args.split)["semantic"]
    elif args.instances is not None:
        dataset = InstanceDataset.from_coco(args.images, args.instances)
        if args.semantic is None:
            return dataset, dataset.semantic_map
        folder = args.semantic
    else:
        if args.semantic is None or args.classes is None:
            raise ValueError("ADE-style data needs --semantic and --classes (or give --instances)")
        names = [n.strip() for n in args.classes.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n]
        unseen = {n.strip() for n in args.unseen.split(",") if n.strip()}
        if unknown := unseen - set(names):
            raise ValueError(f"--unseen names classes not in {args.classes}: {sorted(unknown)}")
        dataset = InstanceDataset.from_semantic(args.images, args.semantic, names, unseen)
        folder = args.semantic

    def target(i: int) -> np.ndarray:
        path = folder / f"{Path(dataset.file_names[i]).stem}.png"
        return np.asarray(Image.open(path), dtype=np.int64)

    return dataset, target


def overlay(image: np.ndarray, semantic: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The image with each predicted class painted in a fixed colour (background untouched)."""
    return paint_labels(image, semantic, alpha)


def _parse_adapters(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).parent.name or "adapter", item
        out.append((name, Path(path)))
    return out


def _markdown(results: dict[str, dict[str, Any]], n: int, split: str, proposals: str) -> str:
    rows = [
        f"| classifier ({proposals} proposals, {split}, {n} images) | GT-mask acc seen "
        "| GT-mask acc unseen | mIoU seen | mIoU unseen | harmonic | classify s / image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | {100 * r['gt_mask_acc_seen']:.1f} | {100 * r['gt_mask_acc_unseen']:.1f} "
            f"| {100 * r.get('miou_seen', float('nan')):.1f} "
            f"| {100 * r.get('miou_unseen', float('nan')):.1f} "
            f"| {100 * r.get('miou_harmonic', float('nan')):.1f} "
            f"| {r.get('classify_seconds_median', float('nan')):.3f} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.seg",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="CLIP and SAM checkpoints of a preset")
    parser.add_argument("--clip", type=Path, help="CLIP checkpoint (default: the preset's)")
    parser.add_argument("--sam", type=Path, help="SAM checkpoint (default: the preset's)")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a Mask-Adapter checkpoint (repeatable); mask pooling is always evaluated too",
    )
    one = parser.add_argument_group("one image")
    one.add_argument("--image", type=Path, help="segment this image")
    one.add_argument("--vocab", help='comma-separated vocabulary, e.g. "circle,star,heart"')
    one.add_argument("--overlay", type=Path, help="write the coloured segmentation here (PNG)")
    one.add_argument("--min-score", type=float, default=0.3, help="instances printed above this")
    one.add_argument(
        "--classifier",
        choices=["adapter", "pooling", "crops"],
        help="how masks are classified (default: the --adapter if given, else masked crops)",
    )
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--data", type=Path, help="ShapeWorld folder (with --split)")
    bench.add_argument("--split", default="test")
    bench.add_argument("--images", type=Path, help="your image folder (instead of --data)")
    bench.add_argument(
        "--instances",
        type=Path,
        help='COCO instances JSON of --images (categories flagged "unseen": true are unseen); '
        "the semantic targets are painted from the instances unless --semantic is given",
    )
    bench.add_argument(
        "--semantic",
        type=Path,
        help="folder of <image stem>.png label maps. With --instances: values are category ids. "
        "Without (ADE-style): value k is line k of --classes, 0 = no class",
    )
    bench.add_argument("--classes", type=Path, help="ADE-style: class names, one per line")
    bench.add_argument("--unseen", default="", help="ADE-style: comma-separated unseen classes")
    bench.add_argument(
        "--zero",
        choices=ZERO_LABELS,
        help="label 0 of the semantic maps: 'background', a class that is scored (default for "
        "ShapeWorld and COCO), or 'ignore', unlabelled and unscored, no proposal dropped as "
        "background (ADE-150's protocol; default for ADE-style maps)",
    )
    bench.add_argument("--limit", type=int, default=200, help="first N images")
    bench.add_argument("--proposals", type=Path, help="SAM proposal cache (.npz; made if missing)")
    bench.add_argument(
        "--no-baselines", action="store_true", help="evaluate the --adapter rows only"
    )
    bench.add_argument(
        "--ensemble",
        action="append",
        default=[],
        metavar="NAME",
        help="also evaluate adapter NAME in FC-CLIP's geometric ensemble with the masked-crop "
        "CLIP classifier (seen classes = the split's classes not flagged unseen)",
    )
    bench.add_argument("--ensemble-alpha", type=float, default=0.4, help="CLIP weight, seen")
    bench.add_argument("--ensemble-beta", type=float, default=0.8, help="CLIP weight, unseen")
    bench.add_argument("--json", type=Path)
    bench.add_argument("--markdown", type=Path)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    benchmark = args.data is not None or args.images is not None
    if (args.image is None) == (not benchmark):
        parser.error(
            "give --image (with --vocab) to segment one image, or --data / --images to benchmark"
        )
    if args.image is not None and args.vocab is None:
        parser.error("--image needs --vocab")
    try:
        preset = PolychromeConfig.from_preset(args.preset)
        clip_path, sam_path = preset.vision_checkpoints(args.clip, args.sam)
    except ValueError as err:
        parser.error(f"--preset {args.preset}: {err}")
    clip, preprocess, tokenizer = load_clip(clip_path)
    sam = load_sam(sam_path)
    adapters = _parse_adapters(args.adapter)
    progress = not args.no_progress

    if args.image is not None:
        try:
            vocab = parse_vocabulary(args.vocab)
            # segmented at the app's working size, for the same reason (vlm.tools' docstring)
            image = np.asarray(fit_within(load_rgb(args.image), TOOL_MAX_SIDE))
            file_w, file_h = image_size(args.image, as_read=False)
        except ValueError as e:  # a bad vocabulary, an ImageError
            parser.error(str(e))
        which = args.classifier or ("adapter" if adapters else "crops")
        if which == "adapter" and not adapters:
            parser.error("--classifier adapter needs --adapter PATH")
        adapter = load_adapter(adapters[-1][1]) if which == "adapter" else None
        seg = OpenVocabSegmenter(
            clip, tokenizer, sam=sam, adapter=adapter, preprocess=preprocess,
            crops=which == "crops", amg_settings={"points_per_batch": POINTS_PER_BATCH},
        )  # fmt: skip
        masks, _ = sam_proposals(seg.generator, image)
        result = seg.segment(image, vocab, masks=drop_background_masks(masks), min_score=0.0)
        print(f"{args.image.name}: {len(result.instances)} segments ({which})")
        work_h, work_w = image.shape[:2]
        if (file_w, file_h) != (work_w, work_h):
            print(
                f"  (segmented at {work_w}x{work_h}, the file is {file_w}x{file_h}: areas and "
                "boxes below are in the file's pixels, the overlay at the segmented size)"
            )
        for s in result.instances:
            if s.score >= args.min_score:
                # the mask scaled to the file as the tools' JSON scales it (one convention)
                _, area, (x0, y0, w, h) = scaled_extent(s.mask, file_w, file_h)
                print(
                    f"  {vocab[s.label]:<20} p={s.score:.2f}  area={area} px  "
                    f"box=({x0},{y0})-({x0 + w - 1},{y0 + h - 1})"
                )
        if args.overlay is not None:
            args.overlay.parent.mkdir(parents=True, exist_ok=True)
            overlay(image, result.semantic).save(args.overlay)
            print(f"wrote {args.overlay}")
        return 0

    try:
        dataset, semantic = _benchmark_data(args)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    n = min(args.limit, len(dataset))
    ade_style = args.data is None and args.instances is None
    zero = args.zero or ("ignore" if ade_style else "background")
    cache = args.proposals
    proposals: list[np.ndarray] | None = None
    t_sam: list[float] = []
    if cache is not None and cache.is_file():
        proposals = load_mask_lists(cache)
        if len(proposals) < n:
            parser.error(f"{cache} holds proposals for {len(proposals)} images, need {n}")
    else:
        seg = OpenVocabSegmenter(clip, tokenizer, sam=sam)
        proposals = []
        for i in tqdm(range(n), desc="SAM proposals", disable=not progress):
            t0 = time.perf_counter()
            proposals.append(sam_proposals(seg.generator, np.asarray(dataset[i].image))[0])
            t_sam.append(time.perf_counter() - t0)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_mask_lists(cache, proposals)
    results: dict[str, dict[str, Any]] = {}
    configs: list[tuple[str, OpenVocabSegmenter | EnsembleSegmenter]] = []
    if not args.no_baselines:
        configs += [
            (
                "masked crops (two-stage reference)",
                OpenVocabSegmenter(clip, tokenizer, preprocess=preprocess, crops=True),
            ),
            ("mask pooling", OpenVocabSegmenter(clip, tokenizer)),
        ]
    configs += [
        (name, OpenVocabSegmenter(clip, tokenizer, adapter=load_adapter(path)))
        for name, path in adapters
    ]
    for name in args.ensemble:
        path = dict(adapters).get(name)
        if path is None:
            parser.error(f"--ensemble {name}: no --adapter named {name!r}")
        seen = [n for n in dataset.category_names.values() if n not in dataset.unseen]
        inner = OpenVocabSegmenter(clip, tokenizer, adapter=load_adapter(path))
        outer = OpenVocabSegmenter(clip, tokenizer, preprocess=preprocess, crops=True)
        configs.append(
            (
                f"{name} x masked crops (geometric ensemble)",
                EnsembleSegmenter(inner, outer, seen, args.ensemble_alpha, args.ensemble_beta),
            )
        )
    for name, classifier in configs:
        results[name] = evaluate_classifier(
            classifier, dataset, semantic, proposals, n, progress, desc=name, zero=zero
        )
    source = "SAM" if cache is None else f"{cache.name}"
    table = _markdown(results, n, args.split if args.data is not None else "yours", source)
    print(table)
    report = {
        "data": str(args.data or args.images),
        "split": args.split if args.data is not None else None,
        "images": n,
        "zero": zero,
        "adapters": {name: str(path) for name, path in adapters},
        "sam_seconds_median": float(np.median(t_sam)) if t_sam else None,
        "results": results,
    }
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    if args.markdown is not None:
        atomic_write_text(args.markdown, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
