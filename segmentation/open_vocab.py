"""Open-vocabulary segmentation: mask proposals + a CLIP mask classifier + any vocabulary.

    seg = OpenVocabSegmenter(clip, tokenizer, sam=sam, adapter=adapter)   # adapter=None: pooling
    result = seg.segment(image, ["circle", "star", "heart", "purple hexagon"])
    result.semantic        # (H, W) int: 0 = background, i = vocabulary[i - 1]
    result.instances       # [Segment(mask, label, score)], best first

Pieces, each usable alone:

- ``whole_image_pixels``: the CLIP input of a whole image (resized to the tower's square size,
  no crop, so the dense grid covers the image the masks live on), normalised as the tower wants.
- ``sam_proposals``: segment_anything's ``SamAutomaticMaskGenerator`` masks, with
  ``vision.sam.amg_settings``.
- ``mask_probabilities``: softmax over the vocabulary and the void class (Mask-Adapter's learned
  void embedding; for the pooling baseline, which has none, a fixed void logit).
- ``semantic_inference``: per pixel, the score of class c is the sum over masks covering it of
  p(c | mask) (Mask2Former's semantic inference, ``einsum("qc,qhw->chw")``); background wins
  where no mask covers the pixel or the void probability of its masks dominates.
- ``instance_inference``: every mask labelled with its most probable non-void class, scored by
  that probability, void-labelled masks dropped.

Vocabulary entries are free text: a class name ("circle"), a synonym ("crimson shape"), an
attribute phrase ("purple hexagon"); each becomes a zero-shot text head with the CLIP prompt
templates averaged (``vision.clip.text_classifier``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

from core.config import Config
from segmentation.mask_adapter import MaskAdapter, clip_pool, mask_pool
from vision.clip import (
    ClipModel,
    background_fill,
    dense_features,
    encode_images,
    object_crop,
    text_classifier,
)
from vision.sam import amg_settings as sam_amg

__all__ = [
    "POOLING_VOID_LOGIT",
    "EnsembleSegmenter",
    "OpenVocabPresetConfig",
    "OpenVocabSegmenter",
    "Segment",
    "SegmentationResult",
    "geometric_ensemble",
    "instance_inference",
    "load_mask_lists",
    "mask_probabilities",
    "parse_vocabulary",
    "sam_proposals",
    "save_mask_lists",
    "semantic_inference",
    "whole_image_pixels",
]

# The pooling baseline has no void embedding: its void class gets this fixed logit (in units of
# the CLIP logit scale times cosine). 0 means "void only when every class has cosine < 0".
POOLING_VOID_LOGIT = 0.0


@dataclass
class OpenVocabPresetConfig(Config):
    """The "open_vocab" entry of a preset: how the demo classifies SAM's masks.

    classifier: "crops" (each mask cut out and embedded by CLIP as a whole image: the best on
    ShapeWorld, docs/RESULTS.md), "adapter" (Mask-Adapter on CLIP's dense features, one CLIP
    pass) or "pooling" (mask pooling, the baseline). adapter: the Mask-Adapter checkpoint the
    "adapter" classifier needs."""

    classifier: Literal["crops", "adapter", "pooling"] = "crops"
    adapter: str | None = None

    def __post_init__(self) -> None:
        if self.classifier == "adapter" and not self.adapter:
            raise ValueError('classifier "adapter" needs an adapter checkpoint')


def parse_vocabulary(text: str) -> list[str]:
    """A comma-separated vocabulary ("circle, star,purple hexagon") -> its non-empty entries."""
    names = [t.strip() for t in text.split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError(
            f"the vocabulary is empty; expected comma-separated names, received {text[:80]!r}"
            + (f" ({len(text)} characters)" if len(text) > 80 else "")
        )
    seen: set[str] = set()
    for name in names:  # case-blind: "circle" and "Circle" are one class to CLIP's prompts
        if name.lower() in seen:
            raise ValueError(f"the vocabulary repeats an entry: {name[:80]!r}")
        seen.add(name.lower())
    return names


def whole_image_pixels(
    model: ClipModel, images: Sequence[np.ndarray | Image.Image]
) -> torch.Tensor:
    """(B, 3, S, S) CLIP input of whole RGB images, resized (bicubic) to the tower's size."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    side = (size, size) if isinstance(size, int) else tuple(size)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    out = []
    for image in images:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pil = pil.convert("RGB").resize((side[1], side[0]), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - mean) / std)
    device = next(model.parameters()).device
    return torch.stack(out).to(device)


def sam_proposals(
    generator: SamAutomaticMaskGenerator, image: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """SAM automatic masks of an (H, W, 3) uint8 image: (M, H, W) bool and (M,) predicted IoU,
    sorted by area, largest first (so that small masks paint over large ones where it matters)."""
    records = generator.generate(image)
    h, w = image.shape[:2]
    if not records:
        return np.zeros((0, h, w), dtype=bool), np.zeros((0,), dtype=np.float32)
    records.sort(key=lambda r: -int(r["area"]))
    masks = np.stack([r["segmentation"] for r in records]).astype(bool)
    scores = np.array([r["predicted_iou"] for r in records], dtype=np.float32)
    return masks, scores


def mask_probabilities(
    embeddings: torch.Tensor, text: torch.Tensor, adapter: MaskAdapter | None, logit_scale: float
) -> torch.Tensor:
    """(M, C + 1) class probabilities of mask embeddings (M, D); the last column is void."""
    if adapter is not None:
        return adapter.classify(embeddings, text).float().softmax(dim=-1)
    logits = logit_scale * embeddings.float() @ F.normalize(text.float(), dim=-1).T
    void = torch.full_like(logits[:, :1], POOLING_VOID_LOGIT * logit_scale)
    return torch.cat([logits, void], dim=-1).softmax(dim=-1)


def semantic_inference(masks: np.ndarray, probs: np.ndarray, background: bool = True) -> np.ndarray:
    """(H, W) int map from masks (M, H, W) in [0, 1] and probs (M, C + 1) (last = void):
    0 = background, c + 1 = class c. Background score = 1 - sum of non-void mass, at least 0.
    ``background=False`` (data whose label 0 is "unlabelled", ADE's protocol): the classes alone
    compete, as Mask2Former's semantic inference; 0 only where no mask holds any class mass."""
    if masks.ndim != 3 or probs.ndim != 2 or len(masks) != len(probs):
        raise ValueError(
            f"expected masks (M, H, W) and probs (M, C + 1) with the same M, received "
            f"{masks.shape} and {probs.shape}"
        )
    h, w = masks.shape[1:]
    if len(masks) == 0:
        return np.zeros((h, w), dtype=np.int64)
    m = masks.reshape(len(masks), -1).astype(np.float64)
    scores = probs[:, :-1].astype(np.float64).T @ m  # (C, HW)
    # without a background, row 0 loses to any class mass and is the argmax where there is none
    rest = np.zeros(scores.shape[1])
    if background:
        rest = np.clip(1.0 - scores.sum(axis=0), 0.0, None)
    full = np.concatenate([rest[None], scores])  # (C + 1, HW), row 0 = background
    return full.argmax(axis=0).reshape(h, w).astype(np.int64)


@dataclass
class Segment:
    mask: np.ndarray  # (H, W) bool
    label: int  # index into the vocabulary
    score: float  # p(label | mask)


def instance_inference(
    masks: np.ndarray, probs: np.ndarray, min_score: float = 0.0
) -> list[Segment]:
    """Each mask with its most probable non-void class; void-labelled masks and those scoring
    under ``min_score`` dropped; best first."""
    out = []
    for mask, p in zip(masks, probs, strict=True):
        label = int(np.argmax(p))
        if label == len(p) - 1 or p[label] < min_score:
            continue
        out.append(Segment(mask.astype(bool), label, float(p[label])))
    out.sort(key=lambda s: -s.score)
    return out


@dataclass
class SegmentationResult:
    vocabulary: list[str]
    semantic: np.ndarray  # (H, W) int, 0 = background, i = vocabulary[i - 1]
    instances: list[Segment]
    seconds: dict[str, float] = field(default_factory=dict)  # proposals / classify


class OpenVocabSegmenter:
    """SAM proposals (or masks you pass) classified by Mask-Adapter, mask pooling, or (with
    ``preprocess`` and ``crops=True``) the two-stage reference: each mask cut out as a masked
    crop on the mean background colour and embedded by CLIP as a whole image (eval.clip's
    protocol, one CLIP forward per mask)."""

    def __init__(
        self,
        clip: ClipModel,
        tokenizer: Any,
        sam: Sam | None = None,
        adapter: MaskAdapter | None = None,
        amg_settings: dict[str, Any] | None = None,
        preprocess: Any = None,
        crops: bool = False,
    ) -> None:
        if crops and (preprocess is None or adapter is not None):
            raise ValueError("crops=True needs the CLIP preprocess and no adapter")
        self.clip = clip.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.crops = crops
        self.pool = clip_pool(clip)
        self.adapter = adapter.eval() if adapter is not None else None
        self.generator = (
            SamAutomaticMaskGenerator(sam.eval(), **{**sam_amg(sam), **(amg_settings or {})})
            if sam is not None
            else None
        )
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def text_heads(self, vocabulary: Sequence[str]) -> torch.Tensor:
        key = tuple(vocabulary)
        if key not in self._text_cache:
            self._text_cache[key] = text_classifier(self.clip, self.tokenizer, list(vocabulary))
        return self._text_cache[key]

    @torch.no_grad()
    def classify_masks(
        self, image: np.ndarray, masks: np.ndarray, vocabulary: Sequence[str]
    ) -> np.ndarray:
        """(M, C + 1) probabilities of masks (M, H, W) of one image; last column = void."""
        if len(masks) == 0:
            return np.zeros((0, len(vocabulary) + 1), dtype=np.float32)
        scale = float(self.clip.logit_scale.exp().clamp(max=100.0))
        if self.crops:
            return self._classify_crops(image, masks, vocabulary, scale)
        dense = dense_features(self.clip, whole_image_pixels(self.clip, [image]))
        m = torch.from_numpy(masks.astype(np.float32))[None].to(dense.projected.device)
        if self.adapter is not None:
            emb = self.adapter(dense, m, self.pool)[0]
        else:
            emb = mask_pool(dense, m, self.pool)[0]
        probs = mask_probabilities(emb, self.text_heads(vocabulary), self.adapter, scale)
        return probs.cpu().numpy()

    def _classify_crops(
        self, image: np.ndarray, masks: np.ndarray, vocabulary: Sequence[str], scale: float
    ) -> np.ndarray:
        fill = background_fill(image, np.asarray(masks.any(axis=0)))
        size = self.clip.visual.preprocess_cfg["size"]
        side = size if isinstance(size, int) else size[0]
        keep = [i for i, m in enumerate(masks) if m.any()]
        probs = np.zeros((len(masks), len(vocabulary) + 1), dtype=np.float32)
        probs[:, -1] = 1.0  # empty masks: void
        if keep:
            crops = [object_crop(image, masks[i].astype(bool), side, fill) for i in keep]
            emb = encode_images(self.clip, self.preprocess, crops)
            p = mask_probabilities(emb, self.text_heads(vocabulary), None, scale)
            probs[keep] = p.cpu().numpy()
        return probs

    def segment(
        self,
        image: np.ndarray | Image.Image,
        vocabulary: Sequence[str],
        masks: np.ndarray | None = None,
        min_score: float = 0.0,
    ) -> SegmentationResult:
        """Segment one RGB image with a vocabulary; ``masks`` (M, H, W) replaces SAM's proposals."""
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB image, received {rgb.shape} {rgb.dtype}"
            )
        t0 = time.perf_counter()
        if masks is None:
            if self.generator is None:
                raise ValueError("no SAM given for proposals: pass sam= or masks=")
            masks, _ = sam_proposals(self.generator, rgb)
        t1 = time.perf_counter()
        probs = self.classify_masks(rgb, masks, vocabulary)
        t2 = time.perf_counter()
        return SegmentationResult(
            vocabulary=list(vocabulary),
            semantic=semantic_inference(masks, probs),
            instances=instance_inference(masks, probs, min_score),
            seconds={"proposals": t1 - t0, "classify": t2 - t1},
        )


def geometric_ensemble(
    p_in: np.ndarray,
    p_out: np.ndarray,
    seen: np.ndarray,
    alpha: float = 0.4,
    beta: float = 0.8,
) -> np.ndarray:
    """FC-CLIP's geometric ensemble of two (M, C + 1) class probabilities, void last: an
    in-vocabulary classifier trained on the seen classes and the frozen CLIP's out-of-vocabulary
    one. Here the adapter is the in-vocabulary side and CLIP on mask crops the other (this
    project's pairing: in FC-CLIP + Mask-Adapter the adapter serves the out-of-vocabulary side,
    beside FC-CLIP's trained head, which this project does not have). As FC-CLIP's code does:
    both sides' probabilities are taken over the classes alone (void dropped and renormalised),
    class c gets p_in^(1 - a) * p_out^a with a = alpha for seen classes, beta for unseen ones
    (FC-CLIP's 0.4 and 0.8: trust CLIP more where the trained head never saw the class), the
    classes are renormalised, and void is the in-vocabulary classifier's, the classes sharing
    1 - void.
    """
    if p_in.shape != p_out.shape or p_in.shape[1] != len(seen) + 1:
        raise ValueError(
            f"expected two (M, C + 1) arrays and C = {len(seen)} seen flags, received "
            f"{p_in.shape} and {p_out.shape}"
        )
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], received {v}")
    a = np.where(seen, alpha, beta)  # (C,)
    eps = 1e-12
    void = p_in[:, -1:].astype(np.float64)
    inner, outer = (p[:, :-1].astype(np.float64) for p in (p_in, p_out))
    inner = inner / np.maximum(inner.sum(axis=1, keepdims=True), eps)
    outer = outer / np.maximum(outer.sum(axis=1, keepdims=True), eps)
    p = np.exp((1 - a) * np.log(inner + eps) + a * np.log(outer + eps))
    classes = p / p.sum(axis=1, keepdims=True) * (1.0 - void)
    return np.concatenate([classes, void], axis=1).astype(np.float32)


class EnsembleSegmenter:
    """Two mask classifiers in a geometric ensemble (`geometric_ensemble`): ``inner`` is the
    in-vocabulary one, trained on the classes named in ``seen``; ``outer`` the frozen CLIP one."""

    def __init__(
        self,
        inner: OpenVocabSegmenter,
        outer: OpenVocabSegmenter,
        seen: Sequence[str],
        alpha: float = 0.4,
        beta: float = 0.8,
    ) -> None:
        self.inner, self.outer = inner, outer
        self.seen = set(seen)
        self.alpha, self.beta = alpha, beta

    def classify_masks(
        self, image: np.ndarray, masks: np.ndarray, vocabulary: Sequence[str]
    ) -> np.ndarray:
        """(M, C + 1) probabilities of masks (M, H, W); last column = void."""
        p_in = self.inner.classify_masks(image, masks, vocabulary)
        if len(masks) == 0:
            return p_in
        p_out = self.outer.classify_masks(image, masks, vocabulary)
        seen = np.array([v in self.seen for v in vocabulary], dtype=bool)
        return geometric_ensemble(p_in, p_out, seen, self.alpha, self.beta)


def save_mask_lists(path: str | os.PathLike[str], masks: Sequence[np.ndarray]) -> None:
    """Per-image boolean mask stacks (M_i, H, W) -> one .npz (bit-packed), written atomically."""
    arrays: dict[str, Any] = {"count": np.array(len(masks))}
    for i, m in enumerate(masks):
        arrays[f"shape_{i}"] = np.array(m.shape, dtype=np.int64)
        arrays[f"bits_{i}"] = np.packbits(m.astype(bool).reshape(-1))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_mask_lists(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """What ``save_mask_lists`` wrote (no pickle: plain arrays only)."""
    with np.load(path, allow_pickle=False) as z:
        out = []
        for i in range(int(z["count"])):
            shape = tuple(int(s) for s in z[f"shape_{i}"])
            bits = np.unpackbits(z[f"bits_{i}"], count=int(np.prod(shape)))
            out.append(bits.reshape(shape).astype(bool))
        return out
