"""STAMP's model-agnostic parts: the mask pass's attention mask, the head, the loss, SAM refinement.

STAMP (Simultaneous Textual All-Mask Prediction, arXiv 2512.00395) segments what a reply refers
to in one extra forward pass: at each ``<seg>`` of the reply, N ``<mask>`` tokens, one per patch
of a grid over the image, are appended after the cached prefix. Each mask token's input is the
``<mask>`` embedding plus that patch's visual feature; mask tokens see the whole prefix and each
other (bidirectional), the prefix stays causal; a linear head turns each mask token's last hidden
state into one foreground logit. The LLM side lives in vlm.stamp; what does not need the LLM is
here:

    mask = mask_pass_attention(prefix_mask, n_mask, dtype)          # (B, 1, N, P + N) additive
    targets = grid_targets(gt_masks, grid)                           # (B, N) area fractions
    bce, dice = stamp_losses(logits, targets)                        # paper: 0.3 BCE + 0.7 Dice
    full = upsample_logits(logits, grid, (H, W))                     # (B, H, W); > 0 = foreground
    oracle = fit_grid_logits(gt_masks, grid, resolution)             # the grid's ceiling
    refined = refine_with_sam(predictor, logits_hw)                  # optional SAM refinement
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from core.config import Config
from vision.sam import SamPresetConfig

__all__ = [
    "MASK_FEATURES",
    "METHODS",
    "MaskHead",
    "StampConfig",
    "StampPresetConfig",
    "fit_grid_logits",
    "grid_targets",
    "mask_like_clip_input",
    "mask_pass_attention",
    "refine_with_sam",
    "sample_points",
    "stamp_losses",
    "upsample_logits",
]

METHODS = ("stamp", "text4seg", "lisa")
MASK_FEATURE_NORMS = ("embedding", "none")
MASK_FEATURES = ("global", "local")


@dataclass
class StampConfig(Config):
    """STAMP's settings (REFERENCE.md: loss weights 0.3 BCE + 0.7 Dice, head Linear(hidden, 1)).

    ``method`` picks how the mask is made after ``<seg>`` on the same model, data and LoRA:
    "stamp" (N mask tokens in one pass), or the issue's two baselines, "text4seg" (the LLM writes
    one label token per cell of the same grid, autoregressively) and "lisa" (the ``<seg>`` hidden
    state prompts SAM's mask decoder, which is trained with it).
    """

    method: str = "stamp"

    # CLIP patches merged per mask token side. 0 = the VLM's own visual tokens (the paper: one
    # mask token per visual token). > 0: a small projector of its own, trained with STAMP, reads
    # CLIP's patches (see mask_features). The shapes preset uses 2, an 8x8 grid (16-pixel cells on
    # 128-pixel scenes), chosen when its core merged 4x4 patches (a 4x4 grid was too coarse for
    # masks); its core now merges 2x2 too, so 0 gives the same grid.
    mask_merge: int = 2
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    )
    lm_weight: float = 1.0  # the <seg> decision and the end of turn after it
    bce_weight: float = 0.3
    dice_weight: float = 0.7
    threshold: float = 0.0  # logit above which a pixel is foreground
    # Side of the square the mask logits are upsampled to (bilinear) before the loss, 0 = the
    # grid itself (the paper). ShapeWorld's objects cover 1-2 cells of the 8x8 grid: on the grid,
    # a cell half covered asks for probability 0.5 and no cell passes the threshold, so the loss
    # is taken on what inference thresholds, the upsampled logits, at 4x the grid.
    loss_resolution: int = 32
    # The scale of a mask token's visual feature before it is added to the <mask> row. "none": as
    # projected (the paper's plain sum). "embedding": each feature rescaled to the median norm of
    # the LLM's input embedding rows (SmolLM2-135M: ~3). Our projectors' outputs are 60-100x that
    # (the shapes VLM's visual tokens ~330, a trained mask projector ~200), so a mask token's
    # input dominates its residual stream and what it reads from the expression is a small
    # addition. Rescaling did not change what 400 steps learn on ShapeWorld (RESULTS, session 9),
    # so the default stays the paper's.
    mask_feature_norm: str = "none"
    # What the mask projector (mask_merge > 0) reads: CLIP's patch tokens as trained ("global"),
    # or the same tower with each patch attending to a mask_window x mask_window neighbourhood
    # ("local", vision.clip.dense_features; ViT towers only), from which a linear probe reads an
    # object's class better (RESULTS, "Local CLIP features"). One more CLIP pass per image.
    mask_features: str = "global"
    mask_window: int = 5  # odd; read only with mask_features "local"
    sam: SamPresetConfig = field(default_factory=SamPresetConfig)  # the "lisa" method's SAM

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, received {self.method!r}")
        if self.mask_feature_norm not in MASK_FEATURE_NORMS:
            raise ValueError(
                f"mask_feature_norm must be one of {list(MASK_FEATURE_NORMS)}, received "
                f"{self.mask_feature_norm!r}"
            )
        if self.mask_feature_norm != "none" and self.method != "stamp":
            raise ValueError(
                f"mask_feature_norm {self.mask_feature_norm!r} scales the mask tokens' features, "
                f"which only the 'stamp' method has; received method {self.method!r}"
            )
        if self.mask_features not in MASK_FEATURES:
            raise ValueError(
                f"mask_features must be one of {list(MASK_FEATURES)}, received "
                f"{self.mask_features!r}"
            )
        if self.mask_features != "global" and (self.method != "stamp" or not self.mask_merge):
            raise ValueError(
                f"mask_features {self.mask_features!r} is what the mask projector reads, which "
                f"only the 'stamp' method with mask_merge > 0 has; received method "
                f"{self.method!r}, mask_merge {self.mask_merge}"
            )
        if self.mask_window < 1 or self.mask_window % 2 == 0:
            raise ValueError(f"mask_window must be odd and >= 1, received {self.mask_window}")
        if self.loss_resolution < 0:
            raise ValueError(f"loss_resolution must be >= 0, received {self.loss_resolution}")
        if not 0 <= self.mask_merge <= 16:
            raise ValueError(f"mask_merge must be in [0, 16], received {self.mask_merge}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, received {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), received {self.lora_dropout}")
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one module")
        for name in ("lm_weight", "bce_weight", "dice_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, received {getattr(self, name)}")


@dataclass
class StampPresetConfig(Config):
    """The "stamp" entry of a preset: where its trained STAMP model is (None = no segmentation
    in the chat)."""

    checkpoint: str | None = None  # a train.stamp final/ folder (it holds its VLM core too)


class MaskHead(nn.Module):
    """Linear(hidden, 1): one foreground logit per mask token."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)  # (B, N, H) -> (B, N)


def mask_pass_attention(prefix_mask: torch.Tensor, n_mask: int, dtype: torch.dtype) -> torch.Tensor:
    """The mask pass's additive attention mask: (B, P) prefix validity -> (B, 1, N, P + N).

    Mask tokens attend to every real prefix position and to each other (bidirectional); padded
    prefix positions (``prefix_mask == 0``) are hidden. The prefix itself is not recomputed, so
    its causal mask is the cache's. 0 = attend, the dtype's minimum = blocked (transformers' own
    convention for an already prepared 4D mask, which it passes through unchanged).
    """
    if prefix_mask.ndim != 2:
        raise ValueError(
            f"prefix_mask must be (batch, prefix length), received shape {tuple(prefix_mask.shape)}"
        )
    if n_mask < 1:
        raise ValueError(f"n_mask must be >= 1, received {n_mask}")
    b, p = prefix_mask.shape
    keep = torch.cat(
        [prefix_mask.bool(), torch.ones(b, n_mask, dtype=torch.bool, device=prefix_mask.device)], 1
    )  # (B, P + N)
    mask = torch.zeros(b, 1, n_mask, p + n_mask, dtype=dtype, device=prefix_mask.device)
    return mask.masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)


def grid_targets(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) ground-truth masks -> (B, gh * gw) foreground fraction of each grid cell.

    The ground truth "downsampled to the grid" of the paper, by area so that a cell half covered
    asks for probability 0.5 (soft targets for both BCE and Dice).
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (batch, H, W), received shape {tuple(masks.shape)}")
    pooled = F.adaptive_avg_pool2d(masks.float()[:, None], grid)  # (B, 1, gh, gw)
    return pooled.flatten(1)


def stamp_losses(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) logits and (B, N) targets in [0, 1] -> (BCE, Dice), each a mean over the batch.

    Dice is LISA's soft form per sample: 1 - (2 sum(p t) + s) / (sum p + sum t + s); LISA's
    code divides the sums by 1000 and adds 1e-6, which is s = 1e-3 in these units. (A smoothing
    of 1 would swamp objects that cover one or two cells: predicting nothing would then cost
    little.)
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, received {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    p = logits.sigmoid()
    dice = 1 - (2 * (p * targets).sum(-1) + smooth) / (p.sum(-1) + targets.sum(-1) + smooth)
    return bce, dice.mean()


def upsample_logits(
    logits: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """(B, gh * gw) patch logits -> (B, H, W) pixel logits, bilinear (corners not aligned)."""
    b = logits.shape[0]
    if logits.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"expected {grid[0]}x{grid[1]}={grid[0] * grid[1]} logits per sample, received "
            f"{logits.shape[1]}"
        )
    x = logits.float().reshape(b, 1, *grid)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0]


def fit_grid_logits(
    masks: torch.Tensor,
    grid: tuple[int, int],
    resolution: int = 0,
    steps: int = 300,
    lr: float = 0.5,
    bce_weight: float = 0.3,
    dice_weight: float = 0.7,
) -> torch.Tensor:
    """The grid's oracle: (B, H, W) ground-truth masks -> (B, gh * gw) logits fitted to them.

    Each sample's grid logits are optimised (Adam, from zero) on STAMP's own loss, taken where
    training takes it (``resolution``: the side the logits are upsampled to before the loss, as
    StampConfig.loss_resolution; 0 = on the grid). No model and no words: what the best possible
    mask head could score on this grid, the ceiling of a method's cIoU before its features are
    blamed. Hand-written: a few hundred Adam steps on B x N free parameters.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (batch, H, W), received shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        raise ValueError("masks is an empty batch: nothing to fit")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, received {steps}")
    if resolution < 0:
        raise ValueError(f"resolution must be >= 0 (0 = the grid), received {resolution}")
    side = (resolution, resolution) if resolution else grid
    # callers may be under inference mode (eval.stamp): autograd is needed here, on copies
    with torch.inference_mode(False), torch.enable_grad():
        targets = grid_targets(masks.detach().clone().float(), side)
        logits = torch.zeros(
            masks.shape[0], grid[0] * grid[1], device=masks.device, requires_grad=True
        )
        opt = torch.optim.Adam([logits], lr=lr)
        for _ in range(steps):
            up = upsample_logits(logits, grid, side).flatten(1) if resolution else logits
            bce, dice = stamp_losses(up, targets)
            loss = bce_weight * bce + dice_weight * dice
            opt.zero_grad()
            loss.backward()
            opt.step()
    return logits.detach()


def sample_points(
    logits: npt.NDArray[np.floating[Any]], n_pos: int = 3, n_neg: int = 1, threshold: float = 0.0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Point prompts from (H, W) pixel logits: (K, 2) xy coordinates and (K,) labels (1 / 0).

    Positive points are the highest-logit pixels of the predicted foreground, taken greedily at
    least an eighth of the image apart so they spread over the object; negative points the
    lowest-logit pixels. No positive point when nothing is above the threshold.
    """
    h, w = logits.shape
    flat = logits.reshape(-1)
    order = np.argsort(-flat, kind="stable")
    gap = max(h, w) / 8
    coords: list[tuple[float, float]] = []
    labels: list[int] = []
    for idx in order:
        if len(coords) >= n_pos or flat[idx] <= threshold:
            break
        y, x = divmod(int(idx), w)
        if all((x - cx) ** 2 + (y - cy) ** 2 >= gap**2 for cx, cy in coords):
            coords.append((float(x), float(y)))
            labels.append(1)
    for idx in order[::-1][:n_neg] if coords else ():
        y, x = divmod(int(idx), w)
        coords.append((float(x), float(y)))
        labels.append(0)
    return np.asarray(coords, dtype=np.float64).reshape(-1, 2), np.asarray(labels, dtype=np.int64)


def refine_with_sam(
    predictor: Any,
    logits: npt.NDArray[np.floating[Any]],
    threshold: float = 0.0,
    n_pos: int = 3,
    n_neg: int = 1,
) -> npt.NDArray[np.bool_]:
    """SAM refinement of STAMP's (H, W) pixel logits, H x W the image size ``predictor`` holds.

    The prompt's kinds are the paper's (SAM's dense mask input, the logits resized to SAM's
    4x-embedding low-resolution grid, plus points sampled from them, `sample_points`), not its
    evaluation code's protocol (10 random positive and 10 negative points, the binarised mask as
    +-6.9 logits, three rounds): docs/STAMP.md says where they differ. SAM's single-mask
    output is used when there are several points, its best-scored multimask output otherwise.
    The refined mask replaces the coarse one only when it overlaps it (IoU >= 0.5); an empty coarse
    mask stays empty.
    """
    coarse = logits > threshold
    if not coarse.any():
        return coarse
    coords, labels = sample_points(logits, n_pos, n_neg, threshold)
    model = predictor.model
    low = model.prompt_encoder.mask_input_size  # (4h, 4w) of the image embedding
    # SAM's mask input lives on the padded, resized image: resize the logits as the image was.
    h, w = logits.shape
    new_h, new_w = predictor.transform.get_preprocess_shape(h, w, model.image_encoder.img_size)
    side = model.image_encoder.img_size
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
    t = F.pad(t, (0, side - new_w, 0, side - new_h), value=float(logits.min()))
    mask_input = F.interpolate(t, size=low, mode="bilinear", align_corners=False)[0].numpy()
    multimask = int(labels.sum()) < 2
    masks, scores, _ = predictor.predict(
        point_coords=coords,
        point_labels=labels,
        mask_input=mask_input,
        multimask_output=multimask,
    )
    refined = masks[int(np.argmax(scores))].astype(bool)
    inter = np.logical_and(refined, coarse).sum()
    union = np.logical_or(refined, coarse).sum()
    return refined if union and inter / union >= 0.5 else coarse


def mask_like_clip_input(mask: npt.ArrayLike, size: int) -> torch.Tensor:
    """(H, W) mask -> (size, size) float mask aligned with the VLM's CLIP input for the image.

    The VLM pads a non-square image to a square (PolychromeVLM.pixel_values, core.images.
    pad_to_square: centred, offsets floored) and CLIP's eval transform resizes the square to
    `size`; the mask goes the same way (zeros in the padding, then bilinear with antialiasing on
    the 0/1 mask, as PIL's resize of the image filters, so boundary pixels get fractions and a
    small object in a large image keeps its area's share instead of aliasing to 0 or 1).
    """
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), received shape {tuple(m.shape)}")
    h, w = m.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    m = F.pad(m, (left, side - w - left, top, side - h - top))
    if side != size:
        m = F.interpolate(
            m[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0, 0]
    return m
