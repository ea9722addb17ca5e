"""Mask-Adapter (Li et al., CVPR 2025) and the mask-pooling baseline: one CLIP embedding per mask.

    adapter = MaskAdapter(MaskAdapterConfig(clip_dim=256, vis_dim=256))
    dense = dense_features(clip, pixels)                     # vision.clip: tokens + projected map
    pool = clip_pool(clip)                                   # the tower's pooling, frozen
    emb = adapter(dense, masks, pool)          # masks (B, M, H, W) -> (B, M, D) unit-norm
    logits = adapter.classify(emb, text_heads)               # (B, M, C + 1), last column = void
    emb0 = mask_pool(dense, masks, pool)                     # the baseline on the same masks

What the adapter does (REFERENCE.md, hustvl/MaskAdapter ``mask_adapter_head.py``):

1. Mask encoder: each mask, resized to 4x the dense grid, goes through conv3x3 s2 (1 -> 4), LN,
   GELU, conv3x3 s2 (4 -> 16), LN, GELU, conv1x1 (16 -> D) and is *added* to the CLIP feature map
   after the CLIP head, F' (B, D, h, w) (``DenseFeatures.projected``).
2. Body: conv1x1 (D -> hidden), 3 ConvNeXt blocks (timm's ``ConvNeXtBlock``), LN, conv1x1
   (hidden -> K = 16): K *semantic activation maps* A per mask.
3. Pooling: weights sigmoid(A) / sum over pixels of sigmoid(A); each of the K weightings pools
   the dense map the way the tower pools its image (``vision.clip.weighted_pool``): for ConvNeXt
   (the paper's CLIP) the raw feature F is pooled and the CLIP head (norm + projection) applied,
   as in the paper; for a ViT, whose head is per token, the projected tokens are pooled (for our
   "avg" ViT, uniform weights give exactly the image embedding). The mean of the K embeddings is
   the mask's embedding.
4. Classification: cosine similarity to the text embeddings of the vocabulary (templates averaged,
   ``vision.clip.text_classifier``) and to one learned *void* embedding, times a learned logit
   scale clamped at 100.

The mask-pooling baseline (FC-CLIP's "mask pooling", MaskCLIP): the mask, area-downsampled to the
grid, is one weighting, pooled the same way. Both functions run under the caller's
grad mode; CLIP stays frozen (its parameters are never the adapter's).

Losses (``train/seg.py``): stage 1, cross-entropy on ground-truth masks; stage 2, cross-entropy on
ground-truth masks and on proposals matched to them (``match_proposals``: one proposal with
IoU > 0.7 per ground truth, at most 8 per image, chosen at random), plus the mask-consistency
loss ``consistency_loss`` 1 - cos(e_proposal, stopgrad(e_gt)) with weight 5.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from core.checkpoint import load_module, save_module
from core.config import Config
from vision.clip import ClipModel, DenseFeatures, weighted_pool

__all__ = [
    "ClipPool",
    "MaskAdapter",
    "MaskAdapterConfig",
    "clip_pool",
    "consistency_loss",
    "load_adapter",
    "mask_iou_matrix",
    "mask_pool",
    "match_proposals",
    "save_adapter",
]

# (dense features, weights (B, M, K, h*w)) -> (B, M, K, D): vision.clip.weighted_pool of a model
ClipPool = Callable[[DenseFeatures, torch.Tensor], torch.Tensor]
LOGIT_SCALE_MAX = 100.0  # CLIP's clamp


def clip_pool(model: ClipModel) -> ClipPool:
    """The tower's own pooling under weights (vision.clip.weighted_pool), as a function."""
    return lambda dense, weights: weighted_pool(model, dense, weights)


@dataclass
class MaskAdapterConfig(Config):
    """Sizes of one Mask-Adapter; stored in its checkpoint manifest."""

    clip_dim: int  # D: channels of the CLIP map after the head (the joint space)
    vis_dim: int  # D_vis: channels of the raw dense feature (what is pooled)
    hidden: int = 256  # body width
    num_maps: int = 16  # K semantic activation maps per mask
    mask_channels: tuple[int, int] = (4, 16)  # the two strided mask-encoder convs
    blocks: int = 3  # ConvNeXt blocks in the body
    init_logit_scale: float = math.log(1 / 0.07)

    def __post_init__(self) -> None:
        for name in ("clip_dim", "vis_dim", "hidden", "num_maps", "blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")
        if len(self.mask_channels) != 2 or min(self.mask_channels) < 1:
            raise ValueError(
                f"mask_channels must be two positive ints, received {self.mask_channels}"
            )


def _check_inputs(dense: DenseFeatures, masks: torch.Tensor) -> tuple[int, int, int, int]:
    b, _, h, w = dense.projected.shape
    if masks.ndim != 4 or masks.shape[0] != b:
        raise ValueError(
            f"masks must be (B, M, H, W) with B = {b} (the images'), received shape "
            f"{tuple(masks.shape)}"
        )
    return b, masks.shape[1], h, w


def mask_pool(dense: DenseFeatures, masks: torch.Tensor, pool: ClipPool) -> torch.Tensor:
    """The mask-pooling baseline: (B, M, D) unit-norm embeddings of masks (B, M, H, W).

    A mask is area-averaged onto the h x w grid (the fraction of each cell it covers), normalised
    to sum to 1 and pooled as the tower pools (``vision.clip.weighted_pool``).
    An empty mask gives uniform weights (the whole image).
    """
    b, m, h, w = _check_inputs(dense, masks)
    cover = F.adaptive_avg_pool2d(masks.float().flatten(0, 1)[:, None], (h, w))  # (BM, 1, h, w)
    cover = cover.reshape(b, m, 1, h * w)
    total = cover.sum(dim=-1, keepdim=True)
    weights = torch.where(total > 0, cover / total.clamp_min(1e-12), 1.0 / (h * w))
    return F.normalize(pool(dense, weights)[:, :, 0], dim=-1)


class MaskAdapter(nn.Module):
    """Mask-Adapter: masks + frozen CLIP dense features -> one embedding per mask (see module)."""

    def __init__(self, cfg: MaskAdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c1, c2 = cfg.mask_channels
        self.mask_encoder = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1),
            LayerNorm2d(c1),
            nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            LayerNorm2d(c2),
            nn.GELU(),
            nn.Conv2d(c2, cfg.clip_dim, 1),
        )
        self.body = nn.Sequential(
            nn.Conv2d(cfg.clip_dim, cfg.hidden, 1),
            *[ConvNeXtBlock(cfg.hidden) for _ in range(cfg.blocks)],
            LayerNorm2d(cfg.hidden),
            nn.Conv2d(cfg.hidden, cfg.num_maps, 1),
        )
        self.void_embedding = nn.Parameter(torch.randn(cfg.clip_dim) / math.sqrt(cfg.clip_dim))
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))

    def activation_maps(self, dense: DenseFeatures, masks: torch.Tensor) -> torch.Tensor:
        """The K semantic activation maps (logits) per mask: (B, M, K, h, w)."""
        b, m, h, w = _check_inputs(dense, masks)
        x = F.interpolate(masks.float().flatten(0, 1)[:, None], (4 * h, 4 * w), mode="bilinear")
        encoded = self.mask_encoder(x)  # (BM, D, h, w)
        feats = dense.projected.to(encoded.dtype).repeat_interleave(m, dim=0)  # (BM, D, h, w)
        return self.body(feats + encoded).reshape(b, m, self.cfg.num_maps, h, w)

    def forward(self, dense: DenseFeatures, masks: torch.Tensor, pool: ClipPool) -> torch.Tensor:
        """(B, M, D) unit-norm mask embeddings of masks (B, M, H, W) (bool or float in [0, 1])."""
        _check_inputs(dense, masks)
        act = torch.sigmoid(self.activation_maps(dense, masks)).flatten(3)  # (B, M, K, h*w)
        weights = act / act.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return F.normalize(pool(dense, weights).mean(dim=2), dim=-1)

    def classify(self, embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits (..., C + 1) of embeddings (..., D) against text heads (C, D); column C = void."""
        void = F.normalize(self.void_embedding, dim=0)[None]
        heads = torch.cat([F.normalize(text, dim=-1), void])
        scale = self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)
        return scale * embeddings @ heads.to(embeddings.dtype).T


def consistency_loss(proposal: torch.Tensor, ground_truth: torch.Tensor) -> torch.Tensor:
    """Mask-consistency loss: mean of 1 - cos(e_proposal, stopgrad(e_gt)) over pairs (N, D)."""
    cos = F.cosine_similarity(proposal, ground_truth.detach(), dim=-1)
    return (1.0 - cos).mean()


def mask_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair of boolean masks: a (P, H, W), b (G, H, W) -> (P, G); empty-empty = 0."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def match_proposals(
    proposals: np.ndarray,
    ground_truth: np.ndarray,
    rng: np.random.Generator,
    iou_threshold: float = 0.7,
    max_matches: int = 8,
) -> list[tuple[int, int]]:
    """Mask-Adapter's IoU matcher (its ``match_via_iou``): for each ground-truth mask, one
    proposal drawn at random among those with IoU > ``iou_threshold``; of these pairs at most
    ``max_matches`` per image, drawn at random. Returns (proposal, gt) index pairs, ground truths
    in order. A proposal may match one ground truth only (its best; above 0.7 IoU two disjoint
    ground truths cannot both claim it anyway; the reference has no such rule, which differs
    only where ground truths overlap)."""
    if len(proposals) == 0 or len(ground_truth) == 0:
        return []
    iou = mask_iou_matrix(proposals, ground_truth)  # (P, G)
    best = iou.argmax(axis=1)
    pairs = []
    for g in range(len(ground_truth)):
        candidates = np.flatnonzero((iou[:, g] > iou_threshold) & (best == g))
        if len(candidates):
            pairs.append((int(rng.choice(candidates)), g))
    if len(pairs) > max_matches:
        keep = np.sort(rng.choice(len(pairs), size=max_matches, replace=False))
        pairs = [pairs[k] for k in keep]
    return pairs


def save_adapter(
    directory: str | os.PathLike[str],
    adapter: MaskAdapter,
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """A core.checkpoint folder: ``adapter.safetensors`` (fp16) + the config in the manifest."""
    return save_module(
        directory, "adapter", adapter, adapter.cfg.to_dict(), metadata, overwrite=overwrite
    )


def load_adapter(directory: str | os.PathLike[str]) -> MaskAdapter:
    """The Mask-Adapter saved by ``save_adapter`` (sha256-checked, strict), fp32, eval mode."""
    source = f"{directory}/manifest.json config"
    return load_module(
        directory, "adapter", lambda c: MaskAdapter(MaskAdapterConfig.from_dict(c, source=source))
    )
