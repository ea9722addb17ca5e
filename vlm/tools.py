"""The tools beside the chat: segment everything, and open-vocabulary segmentation.

    tools = VisionTools.from_config(PolychromeConfig.from_preset("shapes"))
    everything = tools.segment_everything(image)        # SAM's automatic masks
    named = tools.segment_vocabulary(image, "circle, star, purple hexagon")
    named.painted, named.segments, named.coco_json()    # a picture, the masks, a JSON to download

Segment everything is segment_anything's ``SamAutomaticMaskGenerator`` with the preset's SAM
(``vision.sam.amg_settings``). Open-vocabulary segmentation is
``segmentation.open_vocab.OpenVocabSegmenter``: SAM's masks classified against the user's
vocabulary by the preset's CLIP, with the preset's classifier (``open_vocab``: CLIP crops,
Mask-Adapter or mask pooling). Both take any image core.images.load_rgb reads (bounded in size);
bad input raises ValueError saying what was expected. An image larger than ``TOOL_MAX_SIDE`` a
side is segmented, painted and returned at that size: SAM's automatic mask generator upsamples
every candidate mask of a prompt batch to the image, so its memory grows with the pixels times
the batch (tens of gigabytes for the largest upload the app takes), while the shapes SAM's masks
come from a 64x64 logit grid at any size. The JSON for download (``ToolResult.coco_json``) is
at the size of the image given, its masks scaled up, so that it lies on the user's own file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

from core.config import project_path
from core.images import fit_within, image_size, load_rgb, paint_labels
from segmentation.mask_adapter import MaskAdapter, load_adapter
from segmentation.open_vocab import OpenVocabSegmenter, parse_vocabulary, sam_proposals
from vision.clip import ClipBundle, clip_from_preset
from vision.sam import amg_settings, sam_from_preset
from vlm.config import PolychromeConfig

__all__ = [
    "CLASSIFIERS",
    "MAX_VOCABULARY",
    "POINTS_PER_BATCH",
    "TOOL_MAX_SIDE",
    "ToolResult",
    "VisionTools",
    "scaled_extent",
    "scaled_rle",
]

MAX_VOCABULARY = 64  # entries in one vocabulary at most
TOOL_MAX_SIDE = 1024  # pixels: larger images are segmented at this size (module docstring)
POINTS_PER_BATCH = 64  # the generator's prompt batch (its masks do not depend on it; memory does)
CLASSIFIERS = ("crops", "adapter", "pooling")


@dataclass
class ToolResult:
    """A tool's answer: the masks painted over the image, each segment, a one-line summary.

    `painted` and the segments' masks are at the size the image was segmented at (at most
    TOOL_MAX_SIDE a side); `image_size` is the (width, height) of the image given: the file's
    own for a path (a photo over 4096 px too), else the picture's as load_rgb reads it (bytes
    of a file over 4096 px: the downscaled size). The JSON for download is at `image_size`, so
    that its masks and boxes lie on the user's own image."""

    painted: Image.Image
    segments: list[dict[str, Any]]  # {"label", "score", "area", "bbox", "mask": (H, W) bool}
    summary: str
    image_size: tuple[int, int] | None = None  # None: painted's

    def coco_json(self) -> dict[str, Any]:
        """The segments as COCO-style results (RLE masks, xywh boxes) on the image given, for
        download: masks segmented at a smaller size are scaled up (nearest) to it first."""
        width, height = self.image_size or self.painted.size
        out = []
        for seg in self.segments:
            rle, area, bbox = scaled_extent(seg["mask"], width, height)
            rle["counts"] = rle["counts"].decode("ascii")
            out.append(
                {"label": seg["label"], "score": seg["score"], "area": area, "bbox": bbox,
                 "segmentation": rle}
            )  # fmt: skip
        return {"width": width, "height": height, "segments": out}


def scaled_extent(
    mask: np.ndarray, width: int, height: int
) -> tuple[dict[str, Any], int, list[int]]:
    """(`scaled_rle`, area, [x, y, w, h] box) of `mask` scaled to `width` x `height`: where a
    mask found on a downscaled picture lies on the image itself."""
    rle = scaled_rle(mask, width, height)
    return rle, int(mask_utils.area(rle)), [int(v) for v in mask_utils.toBbox(rle)]


def scaled_rle(mask: np.ndarray, width: int, height: int) -> dict[str, Any]:
    """pycocotools' compressed RLE of the (H, W) bool `mask` scaled to `height` x `width` by
    nearest neighbour (target row i reads source row floor((i + 0.5) * H / height), columns
    alike: PIL's NEAREST but at exact ties), built from the mask's runs: the scaled mask is
    never materialised.

    Written by hand because neither pycocotools nor PIL scales an RLE, and a 24-megapixel mask
    per segment (PIL's resize, then the encoder) took 12x longer (docs/RESULTS.md, "The tools'
    JSON on a large photo")."""
    h, w = mask.shape
    if (h, w) == (height, width):
        return cast(dict[str, Any], mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
    rows = ((np.arange(height) + 0.5) * h / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * w / width).astype(np.int64)
    repeats = np.bincount(rows, minlength=h)  # target rows per source row (0 when shrinking)
    kept = repeats > 0
    column_runs: dict[int, list[tuple[int, int]]] = {}
    counts: list[int] = []  # COCO's column-major runs, zeros first
    value, length = 0, 0
    for j in cols.tolist():
        runs = column_runs.get(j)
        if runs is None:  # source column j down a target column: (value, length) runs
            v = mask[kept, j].astype(np.int64)
            starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
            lengths = np.add.reduceat(repeats[kept], starts)
            runs = column_runs[j] = list(zip(v[starts].tolist(), lengths.tolist(), strict=True))
        for v_run, n in runs:
            if v_run == value:
                length += n
            else:
                counts.append(length)
                value, length = v_run, n
    counts.append(length)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return cast(dict[str, Any], rle)


def _segment(mask: np.ndarray, label: str, score: float) -> dict[str, Any]:
    ys, xs = np.nonzero(mask)
    bbox = [
        int(xs.min()),
        int(ys.min()),
        int(xs.max() - xs.min() + 1),
        int(ys.max() - ys.min() + 1),
    ]
    return {"label": label, "score": round(float(score), 4), "area": int(mask.sum()), "bbox": bbox,
            "mask": mask}  # fmt: skip


class VisionTools:
    """SAM's automatic masks and the open-vocabulary segmenter over one CLIP and one SAM."""

    def __init__(
        self,
        clip: ClipBundle,
        sam: Sam,
        adapter: MaskAdapter | None = None,
        classifier: str = "crops",
    ) -> None:
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, received {classifier!r}")
        if classifier == "adapter" and adapter is None:
            raise ValueError('classifier "adapter" needs a Mask-Adapter')
        self.classifier = classifier
        settings = {**amg_settings(sam), "points_per_batch": POINTS_PER_BATCH}
        self.generator = SamAutomaticMaskGenerator(sam.eval(), **settings)
        self._segmenters = {
            "crops": OpenVocabSegmenter(clip.model, clip.tokenizer, preprocess=clip.preprocess,
                                        crops=True),
            "pooling": OpenVocabSegmenter(clip.model, clip.tokenizer),
        }  # fmt: skip
        if adapter is not None:
            self._segmenters["adapter"] = OpenVocabSegmenter(
                clip.model, clip.tokenizer, adapter=adapter
            )
        # SAM's predictor keeps the image it was set to: one request at a time.
        self._lock = threading.Lock()

    @property
    def classifiers(self) -> list[str]:
        """The classifiers this instance can use (the adapter only when one was loaded)."""
        return [c for c in CLASSIFIERS if c in self._segmenters]

    @classmethod
    def from_config(cls, cfg: PolychromeConfig, device: str = "cpu") -> VisionTools:
        """The preset's CLIP, SAM and open_vocab classifier (random CLIP / SAM from seed 0 where
        the preset names no checkpoint, as the tiny preset for tests)."""
        clip = clip_from_preset(cfg.clip)
        sam = sam_from_preset(cfg.sam)
        adapter = (
            load_adapter(project_path(cfg.open_vocab.adapter)) if cfg.open_vocab.adapter else None
        )
        clip.model.to(device)
        sam.to(device)
        if adapter is not None:
            adapter.to(device)
        return cls(clip, sam, adapter, cfg.open_vocab.classifier)

    def _proposals(self, image: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """(the picture segmented, SAM's masks, their scores, the (width, height) of `image`)."""
        picture = load_rgb(image)
        given = image_size(image, as_read=False) if isinstance(image, str | os.PathLike) else None
        rgb = np.asarray(fit_within(picture, TOOL_MAX_SIDE))
        with self._lock, torch.inference_mode():
            masks, scores = sam_proposals(self.generator, rgb)
        return rgb, masks, scores, given or picture.size

    def segment_everything(self, image: Any) -> ToolResult:
        """Every mask SAM finds (largest first; smaller ones painted over larger ones)."""
        rgb, masks, scores, size = self._proposals(image)
        labels = np.zeros(rgb.shape[:2], dtype=np.int64)
        for k, mask in enumerate(masks, start=1):
            labels[mask] = k
        pairs = enumerate(zip(masks, scores, strict=True), start=1)
        segments = [_segment(m, f"mask {k}", s) for k, (m, s) in pairs]
        painted = paint_labels(rgb, labels)
        n = len(segments)
        return ToolResult(painted, segments, f"{n} mask{'s' if n != 1 else ''} found", size)

    def segment_vocabulary(
        self, image: Any, vocabulary: str | Sequence[str], classifier: str | None = None
    ) -> ToolResult:
        """Each pixel labelled with a vocabulary entry or background (Mask2Former's semantic
        inference over SAM's masks); the segments are the masks with their best label."""
        words = parse_vocabulary(vocabulary) if isinstance(vocabulary, str) else list(vocabulary)
        words = [w.strip() for w in words if w.strip()]
        if not words:
            raise ValueError("the vocabulary is empty: give class names separated by commas")
        if len(words) > MAX_VOCABULARY:
            raise ValueError(f"the vocabulary has {len(words)} entries; at most {MAX_VOCABULARY}")
        name = classifier or self.classifier
        if name not in self._segmenters:
            raise ValueError(f"classifier must be one of {self.classifiers}, received {name!r}")
        rgb, masks, _, size = self._proposals(image)
        with self._lock, torch.inference_mode():
            result = self._segmenters[name].segment(rgb, words, masks=masks)
        present = sorted(set(np.unique(result.semantic).tolist()) - {0})
        # the legend names only the classes found: label k = the k-th of them
        remap = np.zeros(len(words) + 1, dtype=np.int64)
        remap[present] = np.arange(1, len(present) + 1)
        legend = [words[c - 1] for c in present]
        painted = paint_labels(rgb, remap[result.semantic], legend=legend)
        segments = [_segment(s.mask, words[s.label], s.score) for s in result.instances]
        found = ", ".join(words[c - 1] for c in present) or "nothing from the vocabulary"
        return ToolResult(painted, segments, f"found: {found}", size)
