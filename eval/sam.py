"""Evaluate a SAM checkpoint on instance masks: one-point mIoU, box mIoU, automatic-mask recall.

    python -m eval.sam --checkpoint out/sam/final --data out/shapeworld --split val
    python -m eval.sam --checkpoint out/sam/final --data out/shapeworld --limit 200 --json r.json

Protocol (per ground-truth instance of the split; masks are the visible parts):

- point: one positive click at the instance's "centre": the pixel of the visible mask farthest
  from its boundary (Euclidean distance transform; the image border counts as boundary; ties go
  to the first pixel in row-major order). The bbox centre or centroid can fall outside a ring, a
  crescent or an occluded shape; this point never does. SamPredictor with multimask_output=True;
  the mask with the highest predicted IoU is scored (what SAM's users do), and the best of the 3
  ("oracle") is reported for information.
- box: the ground-truth bbox (COCO [x, y, w, h] -> XYXY [x, y, x + w, y + h]),
  multimask_output=False. For reference, the trivial baseline "the filled box is the mask" is
  reported too (baseline_box_fill_miou).
- amg: SamAutomaticMaskGenerator with AMG_SETTINGS (a 16 x 16 point grid for 128 px images, all
  points in one batch, thresholds lowered from ViT-H's 0.88 / 0.95 for a small model); recall@t =
  fraction of ground-truth instances whose best-matching generated mask has IoU >= t.

mIoU is the mean over instances of eval.metrics.mask_iou. JSON values are fractions in [0, 1];
the markdown table shows percentages.
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
from scipy import ndimage
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from tqdm import tqdm

from core.io import atomic_write_text
from core.runtime import resolve_device
from data.datasets import InstanceDataset
from eval.metrics import mask_iou
from vision.sam import AMG_SETTINGS, load_sam

__all__ = [
    "AMG_SETTINGS",
    "ImageScores",
    "amg_best_ious",
    "evaluate_sam",
    "format_table",
    "main",
    "object_point",
    "score_image",
]

RECALL_THRESHOLDS = (0.5, 0.75)


def object_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of a (H, W) bool mask farthest from its boundary (see the module doc)."""
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"expected a non-empty (H, W) mask, received shape {mask.shape}")
    # Pad with background so the image border counts as boundary.
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), mask.shape)
    return int(x), int(y)


def amg_best_ious(generated: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray]) -> np.ndarray:
    """(G,) best IoU of each ground-truth mask over the generated masks (0 if none)."""
    best = np.zeros(len(gt_masks))
    for g, gt in enumerate(gt_masks):
        # Only masks that overlap the object can have IoU > 0; skip the rest cheaply.
        for mask in generated:
            if (mask & gt).any():
                best[g] = max(best[g], mask_iou(mask, gt))
    return best


class ImageScores:
    """Per-instance IoUs of one image: point (chosen by predicted IoU), oracle, box, amg."""

    def __init__(
        self, point: np.ndarray, oracle: np.ndarray, box: np.ndarray, amg: np.ndarray | None
    ) -> None:
        self.point, self.oracle, self.box, self.amg = point, oracle, box, amg


def score_image(
    gt_masks: Sequence[np.ndarray],
    point_masks: np.ndarray,
    point_iou_pred: np.ndarray,
    box_masks: np.ndarray,
    amg_masks: Sequence[np.ndarray] | None,
) -> ImageScores:
    """Score one image's predictions against its G ground-truth (H, W) bool masks.

    point_masks: (G, M, H, W) bool, M masks per single-point prompt; point_iou_pred: (G, M) the
    model's predicted IoUs (the argmax is scored); box_masks: (G, H, W) bool; amg_masks: the
    automatic masks, each (H, W) bool, or None to skip.
    """
    g = len(gt_masks)
    if point_masks.shape[0] != g or point_iou_pred.shape[0] != g or box_masks.shape[0] != g:
        raise ValueError(
            f"expected predictions for {g} instances, received {point_masks.shape[0]} point, "
            f"{point_iou_pred.shape[0]} IoU and {box_masks.shape[0]} box predictions"
        )
    chosen = point_iou_pred.argmax(axis=1)
    point = np.array([mask_iou(point_masks[i, chosen[i]], gt_masks[i]) for i in range(g)])
    oracle = np.array([max(mask_iou(m, gt_masks[i]) for m in point_masks[i]) for i in range(g)])
    box = np.array([mask_iou(box_masks[i], gt_masks[i]) for i in range(g)])
    amg = None if amg_masks is None else amg_best_ious(amg_masks, gt_masks)
    return ImageScores(point, oracle, box, amg)


def _fill(box: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W) bool mask of an XYXY box (the trivial baseline: the box itself as the mask)."""
    x0, y0, x1, y1 = np.round(box).astype(int)
    mask = np.zeros((h, w), dtype=bool)
    mask[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] = True
    return mask


@torch.no_grad()
def evaluate_sam(
    model: Sam,
    data: str | os.PathLike[str] | InstanceDataset,
    split: str = "val",
    limit: int | None = None,
    *,
    amg: bool = True,
    amg_settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Point / box mIoU and AMG recall of `model` (on its own device) over a split.

    data: a ShapeWorld folder (its `split` is read) or an InstanceDataset (a user's COCO data;
    `split` is then only a label). limit: the first N images only.
    """
    dataset = (
        data if isinstance(data, InstanceDataset) else InstanceDataset.from_shapeworld(data, split)
    )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, received {limit}")
    n_images = len(dataset) if limit is None else min(limit, len(dataset))
    model.eval()
    predictor = SamPredictor(model)
    settings = {**AMG_SETTINGS, **(amg_settings or {})}
    generator = SamAutomaticMaskGenerator(model, **settings) if amg else None
    device = model.device
    parts: dict[str, list[np.ndarray]] = {
        "point": [], "oracle": [], "box": [], "amg": [], "box_fill": []
    }  # fmt: skip
    unseen: list[np.ndarray] = []
    amg_counts = []
    for index in tqdm(range(n_images), desc=f"eval SAM ({split})", disable=not progress):
        item = dataset[index]
        if not item.instances:
            continue
        image = np.asarray(item.image)
        h, w = image.shape[:2]
        predictor.set_image(image)
        gt = [inst.mask for inst in item.instances]
        points = np.array([object_point(m) for m in gt], dtype=np.float64)  # (G, 2)
        coords = predictor.transform.apply_coords(points, (h, w))
        point_masks, point_iou, _ = predictor.predict_torch(
            torch.as_tensor(coords, dtype=torch.float, device=device)[:, None, :],
            torch.ones((len(gt), 1), dtype=torch.int, device=device),
            multimask_output=True,
        )  # (G, 3, H, W), (G, 3)
        boxes = np.array(
            [[x, y, x + bw, y + bh] for x, y, bw, bh in (i.bbox for i in item.instances)]
        )
        box_masks, _, _ = predictor.predict_torch(
            None,
            None,
            boxes=torch.as_tensor(
                predictor.transform.apply_boxes(boxes, (h, w)), dtype=torch.float, device=device
            ),
            multimask_output=False,
        )  # (G, 1, H, W)
        amg_masks = None
        if generator is not None:
            amg_masks = [r["segmentation"] for r in generator.generate(image)]
            amg_counts.append(len(amg_masks))
        scores = score_image(
            gt,
            point_masks.cpu().numpy(),
            point_iou.float().cpu().numpy(),
            box_masks[:, 0].cpu().numpy(),
            amg_masks,
        )
        for name in ("point", "oracle", "box", "amg"):
            value = getattr(scores, name)
            if value is not None:
                parts[name].append(value)
        fill = [mask_iou(_fill(b, h, w), m) for b, m in zip(boxes, gt, strict=True)]
        parts["box_fill"].append(np.array(fill))
        unseen.append(np.array([inst.category in dataset.unseen for inst in item.instances]))
    if not parts["point"]:
        raise ValueError(f"{split}: no instances in the first {n_images} images")
    ious = {k: np.concatenate(v) for k, v in parts.items() if v}
    is_unseen = np.concatenate(unseen)
    result: dict[str, Any] = {
        "split": split,
        "images": n_images,
        "instances": int(ious["point"].size),
        "point_miou": float(ious["point"].mean()),
        "point_oracle_miou": float(ious["oracle"].mean()),
        "box_miou": float(ious["box"].mean()),
        "baseline_box_fill_miou": float(ious["box_fill"].mean()),
    }
    if is_unseen.any() and not is_unseen.all():
        result["point_miou_seen_classes"] = float(ious["point"][~is_unseen].mean())
        result["point_miou_unseen_classes"] = float(ious["point"][is_unseen].mean())
        result["box_miou_unseen_classes"] = float(ious["box"][is_unseen].mean())
    if "amg" in ious:
        for t in RECALL_THRESHOLDS:
            result[f"amg_recall@{t}"] = float((ious["amg"] >= t).mean())
        result["amg_masks_per_image"] = float(np.mean(amg_counts))
        result["amg_settings"] = settings
    result["point_prompt"] = "visible-mask pixel farthest from the boundary (distance transform)"
    return result


_LABELS = {
    "point_miou": "1-point mIoU (highest predicted IoU of 3)",
    "point_oracle_miou": "1-point mIoU, oracle (best of 3)",
    "box_miou": "box mIoU",
    "point_miou_seen_classes": "1-point mIoU, seen classes",
    "point_miou_unseen_classes": "1-point mIoU, unseen classes",
    "box_miou_unseen_classes": "box mIoU, unseen classes",
    "baseline_box_fill_miou": "baseline: the GT box itself as the mask, mIoU",
    "amg_recall@0.5": "AMG recall @ IoU 0.5",
    "amg_recall@0.75": "AMG recall @ IoU 0.75",
}


def format_table(result: dict[str, Any]) -> str:
    """The markdown table of an evaluate_sam result (percentages)."""
    rows = [
        f"SAM on {result['split']}: {result['images']} images, {result['instances']} instances",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    rows += [f"| {label} | {100 * result[k]:.1f} |" for k, label in _LABELS.items() if k in result]
    if "amg_masks_per_image" in result:
        rows.append(f"| AMG masks per image | {result['amg_masks_per_image']:.1f} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m eval.sam",
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1] if "\n\n" in doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a train/sam.py final dir")
    parser.add_argument("--data", type=Path, required=True, help="a ShapeWorld folder")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-amg", action="store_true", help="skip automatic mask generation")
    parser.add_argument("--amg-points-per-side", type=int, default=AMG_SETTINGS["points_per_side"])
    parser.add_argument(
        "--amg-pred-iou-thresh", type=float, default=AMG_SETTINGS["pred_iou_thresh"]
    )
    parser.add_argument(
        "--amg-stability-thresh", type=float, default=AMG_SETTINGS["stability_score_thresh"]
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, received {args.limit}")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    model = load_sam(args.checkpoint).to(device)
    result = evaluate_sam(
        model,
        args.data,
        args.split,
        args.limit,
        amg=not args.no_amg,
        amg_settings={
            "points_per_side": args.amg_points_per_side,
            "pred_iou_thresh": args.amg_pred_iou_thresh,
            "stability_score_thresh": args.amg_stability_thresh,
        },
        progress=not args.no_progress,
    )
    result["checkpoint"] = str(args.checkpoint)
    table = format_table(result)
    print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
