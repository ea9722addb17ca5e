"""Train SAM on instance masks with the SAM recipe: point and box prompts, correction clicks.

    python -m train.sam --preset tiny --data out/shapeworld-tiny --out out/sam-tiny --steps 50
    # the committed checkpoint (checkpoints/shapes/sam): one H200, 270 s, stopped by --max-minutes
    # at step 1065 of 2000 (elsewhere: --stop-after 1065 instead of --max-minutes 4.5)
    python -m train.sam --preset shapes --data out/shapeworld --out out/sam --device cuda \\
        --steps 2000 --batch-size 256 --max-minutes 4.5 --workers 6 --save-every 500 --eval
    OMP_NUM_THREADS=1 python -m train.sam --preset shapes --data out/shapeworld --out out/sam \\
        --device cpu --steps 1400 --batch-size 8 --correction-rounds 1 --max-minutes 26
    python -m train.sam --preset shapes --images coco/train2017 \\
        --instances-json coco/annotations/instances_train2017.json --out out/sam-coco
    # fine-tune the shapes SAM on your masks (its config comes from the checkpoint)
    python -m train.sam --init-from checkpoints/shapes/sam --images my_photos \\
        --instances-json instances.json --out runs/sam_mine --steps 300 --lr 1e-4
    python -m train.sam ... --resume                   # continue from <out>/last, same data order
    accelerate launch -m train.sam ...                 # several GPUs (the global batch is split)

Recipe (SAM paper, section 3 and appendix A "Training algorithm"), per step:

- A batch of images goes through the image encoder once; `--prompts-per-image` instances are drawn
  per image (with replacement), so the encoder cost is shared by several prompts.
- The first `prompts - boxes` prompts of each image start from one foreground point drawn uniformly
  from the instance mask; the rest start from its bounding box, jittered by noise with std 10% of
  the box side (at most 20 px at SAM's 1024 px, scaled to our input size).
- `--correction-rounds` more rounds follow: a new point is drawn uniformly from the error region
  of the previous prediction (positive if it falls on a false negative, negative on a false
  positive), and the previous low-res mask logits are fed back as the mask prompt.
- A single point is ambiguous: its first round predicts 3 masks and only the lowest-loss one is
  back-propagated. Every other prompt uses the single-mask output token.
- Mask loss: 20 x focal (alpha --focal-alpha, default 0.5, see docs/SAM.md) + 1 x dice on the
  masks upsampled to the input size; the IoU head is trained with MSE towards each predicted
  mask's actual IoU with the ground truth. The mask passed to the next round, and whose errors
  are sampled, is the one with the highest predicted IoU.

Data are decoded once at start into memory: images resized (longest side) and padded to
img_size as uint8, instance masks bit-packed (10k ShapeWorld images: ~0.5 GB + ~0.1 GB).
The batch order is a pure function of (--seed, step) and every random draw of a step comes from a
generator seeded by (seed, step, rank), so --resume gives the weights of an uninterrupted run.

Outputs: ``<out>/last`` (resumable state, train/common.py), ``<out>/log.jsonl`` (losses),
``<out>/final`` (core.checkpoint folder: model.safetensors in fp16 with the SamConfig in the
manifest, MODEL_CARD.md, eval.json with --eval). Load it with ``vision.sam.load_sam``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from tqdm import tqdm

from core.checkpoint import save_checkpoint, verify_checkpoint
from core.io import atomic_write_text
from core.runtime import resolve_device
from data.datasets import InstanceDataset
from train.common import (
    adamw_matrices_decay,
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    load_training_state,
    make_accelerator,
    save_training_state,
)
from vision.sam import SAM_VARIANTS, SamConfig, build_sam, load_sam, predict_masks_batched

__all__ = ["MaskData", "SamPromptLoss", "load_mask_data", "main"]

# --preset -> our SAM variant in vision.sam (configs/*.json do not configure SAM yet).
PRESET_VARIANTS = {"tiny": "tiny", "shapes": "shapes"}
FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT = 20.0, 1.0, 1.0  # SAM: focal:dice = 20:1, IoU MSE x1


# --------------------------------------------------------------------------------------------
# Data: everything decoded once, kept as tensors (on the training device)
# --------------------------------------------------------------------------------------------


@dataclass
class MaskData:
    """A whole instance dataset in memory, in SAM's input frame (S = img_size)."""

    images: torch.Tensor  # (I, 3, S, S) uint8, longest side resized to S, zero-padded
    sizes: torch.Tensor  # (I, 2) int64 (h, w) of the resized image inside the padding
    masks: torch.Tensor  # (N, S, ceil(S / 8)) uint8, bit-packed (N, S, S) instance masks
    boxes: torch.Tensor  # (N, 4) float32 XYXY (COCO convention: x1 = x0 + w)
    first: torch.Tensor  # (I,) int64 index of each image's first instance
    count: torch.Tensor  # (I,) int64 instances of each image, >= 1
    side: int  # S

    def to(self, device: torch.device | str) -> MaskData:
        return MaskData(
            images=self.images.to(device),
            sizes=self.sizes.to(device),
            masks=self.masks.to(device),
            boxes=self.boxes.to(device),
            first=self.first.to(device),
            count=self.count.to(device),
            side=self.side,
        )

    def unpack_masks(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) instance ids -> (n, S, S) bool masks."""
        packed = self.masks[ids]  # (n, S, S/8)
        shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
        bits = (packed.unsqueeze(-1) >> shifts) & 1  # (n, S, S/8, 8), np.packbits bit order
        return bits.flatten(-2)[..., : self.side].bool()


def _prepare_item(
    dataset: InstanceDataset, index: int, side: int
) -> tuple[np.ndarray, tuple[int, int], list[np.ndarray], list[np.ndarray]]:
    item = dataset[index]
    image = np.asarray(item.image, dtype=np.uint8)  # (H, W, 3)
    h, w = image.shape[:2]
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, side)
    if (new_h, new_w) != (h, w):
        image = ResizeLongestSide(side).apply_image(image)
    padded = np.zeros((3, side, side), dtype=np.uint8)
    padded[:, :new_h, :new_w] = image.transpose(2, 0, 1)
    masks, boxes = [], []
    for inst in item.instances:
        mask = inst.mask
        if mask.shape != (new_h, new_w):
            resized = F.interpolate(
                torch.from_numpy(mask)[None, None].float(), (new_h, new_w), mode="bilinear"
            )
            mask = resized[0, 0].numpy() > 0.5
        if not mask.any():
            continue  # vanished (empty or a few pixels lost in the resize)
        full = np.zeros((side, side), dtype=bool)
        full[:new_h, :new_w] = mask
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        boxes.append(np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=np.float32))
        masks.append(np.packbits(full, axis=-1))
    return padded, (new_h, new_w), masks, boxes


def load_mask_data(
    dataset: InstanceDataset, side: int, *, workers: int | None = None, progress: bool = True
) -> MaskData:
    """Decode every image and instance mask of `dataset` into a MaskData (images without
    instances are left out)."""
    workers = workers or min(16, os.cpu_count() or 1)
    images, sizes, masks, boxes, counts = [], [], [], [], []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda i: _prepare_item(dataset, i, side), range(len(dataset)))
        for image, size, inst_masks, inst_boxes in tqdm(
            results, total=len(dataset), desc="decoding data", unit="img", disable=not progress
        ):
            if not inst_masks:
                continue
            images.append(image)
            sizes.append(size)
            masks.extend(inst_masks)
            boxes.extend(inst_boxes)
            counts.append(len(inst_masks))
    if not images:
        raise ValueError(f"{dataset.images_root}: no image has an instance mask to train on")
    count = torch.tensor(counts, dtype=torch.int64)
    return MaskData(
        images=torch.from_numpy(np.stack(images)),
        sizes=torch.tensor(sizes, dtype=torch.int64),
        masks=torch.from_numpy(np.stack(masks)),
        boxes=torch.from_numpy(np.stack(boxes)),
        first=torch.cumsum(count, 0) - count,
        count=count,
        side=side,
    )


# --------------------------------------------------------------------------------------------
# The training forward: prompts, correction rounds, losses
# --------------------------------------------------------------------------------------------


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """Sigmoid focal loss (gamma 2), mean over pixels. logits (N, M, S, S), target (N, 1, S, S).

    alpha weighs positive pixels, 1 - alpha negative ones (MaskFormer / torchvision: 0.25).
    """
    prob = logits.sigmoid()
    target = target.expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** 2).mean(dim=(-2, -1))  # (N, M)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft dice. logits (N, M, S, S), target (N, 1, S, S) -> (N, M)."""
    prob = logits.sigmoid()
    inter = (prob * target).sum(dim=(-2, -1))
    return 1 - (2 * inter + 1) / (prob.sum(dim=(-2, -1)) + target.sum(dim=(-2, -1)) + 1)


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks pred (N, M, S, S) and target (N, 1, S, S) -> (N, M); empty/empty = 1."""
    inter = (pred & target).sum(dim=(-2, -1)).float()
    union = (pred | target).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def sample_pixels(
    region: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel drawn uniformly from each (N, S, S) bool region -> (N, 2) xy float, (N,) found."""
    n, h, w = region.shape
    scores = torch.rand((n, h * w), generator=generator, device=region.device)
    scores = torch.where(region.reshape(n, -1), scores, -1.0)
    flat = scores.argmax(dim=1)
    xy = torch.stack([flat % w, flat // w], dim=1).float()
    return xy, region.reshape(n, -1).any(dim=1)


@dataclass
class SamLossOutput:
    loss: torch.Tensor  # () total loss, averaged over rounds
    stats: dict[str, torch.Tensor]  # () detached figures for the log


class SamPromptLoss(nn.Module):
    """Wraps a Sam for training: forward(batch) -> loss, so accelerate/DDP see one module."""

    def __init__(
        self,
        sam: Sam,
        prompts_per_image: int,
        boxes_per_image: int,
        correction_rounds: int,
        focal_alpha: float = 0.25,
    ) -> None:
        super().__init__()
        if not 0 <= boxes_per_image <= prompts_per_image:
            raise ValueError(
                f"boxes_per_image must be in [0, prompts_per_image={prompts_per_image}], "
                f"received {boxes_per_image}"
            )
        self.sam = sam
        self.prompts_per_image = prompts_per_image
        self.boxes_per_image = boxes_per_image
        self.correction_rounds = correction_rounds
        self.focal_alpha = focal_alpha

    def _prompt(
        self,
        coords: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor | None,
        mask_logits: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The prompt encoder runs in fp32: its random-Fourier point encoding loses ~1 px of
        # position under bf16 autocast, and its cost is negligible.
        device_type = coords.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            points = (coords, labels) if coords.shape[1] else None
            return self.sam.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)

    def forward(
        self,
        images: torch.Tensor,
        sizes: torch.Tensor,
        gt: torch.Tensor,
        boxes: torch.Tensor,
        generator: torch.Generator,
    ) -> SamLossOutput:
        """images (B, 3, S, S) uint8 padded; sizes (B, 2) (h, w); gt (B*K, S, S) bool instance
        masks, K prompts per image in order; boxes (B*K, 4) XYXY of those instances."""
        sam, k, side = self.sam, self.prompts_per_image, images.shape[-1]
        device = images.device
        b = images.shape[0]
        # SAM's preprocess: normalise, then zero the padding (it pads after normalising).
        rows = torch.arange(side, device=device)
        valid = (rows.view(1, -1, 1) < sizes[:, 0].view(-1, 1, 1)) & (
            rows.view(1, 1, -1) < sizes[:, 1].view(-1, 1, 1)
        )  # (B, S, S)
        x = (images.float() - sam.pixel_mean) / sam.pixel_std * valid.unsqueeze(1)
        embeddings = sam.image_encoder(x)  # (B, C, h, w)
        with torch.autocast(device_type=device.type, enabled=False):
            image_pe = sam.prompt_encoder.get_dense_pe()  # (1, C, h, w)
        slot = torch.arange(b * k, device=device) % k
        is_box = slot >= k - self.boxes_per_image
        groups = {"point": (~is_box).nonzero()[:, 0], "box": is_box.nonzero()[:, 0]}
        target = gt.unsqueeze(1)  # (B*K, 1, S, S)
        valid_rows = valid.repeat_interleave(k, dim=0)

        # Round 0 prompts: a uniform foreground point, or the jittered box.
        state: dict[str, dict[str, Any]] = {}
        for name, idx in groups.items():
            n = idx.numel()
            if n == 0:
                continue
            st: dict[str, Any] = {
                "idx": idx,
                "coords": torch.zeros((n, 0, 2), device=device),
                "labels": torch.zeros((n, 0), device=device, dtype=torch.int64),
                "boxes": None,
                "mask": None,
            }
            if name == "point":
                xy, _ = sample_pixels(gt[idx], generator)
                st["coords"], st["labels"] = xy[:, None], torch.ones((n, 1), device=device).long()
            else:
                box = boxes[idx]
                wh = (box[:, 2:] - box[:, :2]).repeat(1, 2)
                max_noise = 20.0 * side / 1024
                noise = torch.randn((n, 4), generator=generator, device=device) * 0.1 * wh
                st["boxes"] = (box + noise.clamp(-max_noise, max_noise)).clamp(0, side)
            state[name] = st

        total = torch.zeros((), device=device)
        stats: dict[str, torch.Tensor] = {}
        for rnd in range(1 + self.correction_rounds):
            for name, st in state.items():
                idx = st["idx"]
                multimask = name == "point" and rnd == 0
                sparse, dense = self._prompt(st["coords"], st["labels"], st["boxes"], st["mask"])
                low_res, iou_pred = predict_masks_batched(
                    sam.mask_decoder,
                    embeddings[idx // k],
                    image_pe,
                    sparse,
                    dense,
                    multimask_output=multimask,
                )  # (n, M, 4h, 4w), (n, M)
                with torch.autocast(device_type=device.type, enabled=False):
                    logits = F.interpolate(
                        low_res.float(), (side, side), mode="bilinear", align_corners=False
                    )
                    tgt = target[idx]
                    focal = focal_loss(logits, tgt.float(), self.focal_alpha)  # (n, M)
                    mask_loss = FOCAL_WEIGHT * focal + DICE_WEIGHT * dice_loss(logits, tgt.float())
                    pred = logits > 0
                    actual_iou = binary_iou(pred, tgt)  # (n, M)
                    iou_loss = F.mse_loss(iou_pred.float(), actual_iou)
                    # Only the best of an ambiguous prompt's masks learns (SAM, appendix A).
                    total = total + mask_loss.min(dim=1).values.mean() + IOU_WEIGHT * iou_loss
                # The next round sees the mask with the highest *predicted* IoU.
                best = iou_pred.detach().float().argmax(dim=1)
                arange = torch.arange(idx.numel(), device=device)
                chosen = pred[arange, best]  # (n, S, S)
                if rnd == 0:
                    stats[f"iou_{name}"] = actual_iou[arange, best].mean().detach()
                if rnd == self.correction_rounds:
                    stats[f"iou_{name}_last"] = actual_iou[arange, best].mean().detach()
                if rnd < self.correction_rounds:
                    gt_rows = gt[idx]
                    false_neg = gt_rows & ~chosen
                    error = (false_neg | (chosen & ~gt_rows)) & valid_rows[idx]
                    xy, found = sample_pixels(error, generator)
                    label = false_neg.flatten(1).gather(
                        1, (xy[:, 1] * side + xy[:, 0]).long()[:, None]
                    )
                    # No error left: a "not a point" token (label -1) keeps shapes fixed.
                    label = torch.where(found[:, None], label.long(), -1)
                    xy = torch.where(found[:, None], xy, 0.0)
                    st["coords"] = torch.cat([st["coords"], xy[:, None]], dim=1)
                    st["labels"] = torch.cat([st["labels"], label], dim=1)
                    st["mask"] = low_res[arange, best].detach().float().unsqueeze(1)
        loss = total / (1 + self.correction_rounds)
        stats["loss"] = loss.detach()
        return SamLossOutput(loss, stats)


def _any(accelerator: Any, flag: bool) -> bool:
    """True on every process when `flag` is True on any of them."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max"))


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator for every random draw of one step: a pure function of (seed, step, rank)."""
    state = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state % (2**63))


def sample_instances(
    data: MaskData, image_ids: torch.Tensor, k: int, generator: torch.Generator
) -> torch.Tensor:
    """(B,) image indices -> (B*K,) instance ids, K per image drawn with replacement."""
    count = data.count[image_ids]  # (B,)
    draw = torch.rand((image_ids.numel(), k), generator=generator, device=count.device)
    pick = (draw * count[:, None]).long().clamp(max=count[:, None] - 1)
    return (data.first[image_ids][:, None] + pick).flatten()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m train.sam",
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1] if "\n\n" in doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESET_VARIANTS),
        default="shapes",
        help="model size: our SAM variant of that preset (vision.sam)",
    )
    data = parser.add_argument_group("data (either --data or --instances-json with --images)")
    data.add_argument("--data", type=Path, help="a ShapeWorld folder (its train split is used)")
    data.add_argument("--instances-json", type=Path, help="a COCO instances file (your data)")
    data.add_argument("--images", type=Path, help="the image folder of --instances-json")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this trained SAM (a train.sam final/ folder, e.g. checkpoints/shapes/"
        "sam); its size replaces --preset's",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps in all")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (global)")
    parser.add_argument(
        "--prompts-per-image",
        type=int,
        default=4,
        help="instances prompted per image per step (encoder cost shared)",
    )
    parser.add_argument(
        "--boxes-per-image",
        type=int,
        default=None,
        help="how many of those start from a box (default: half)",
    )
    parser.add_argument(
        "--correction-rounds",
        type=int,
        default=2,
        help="rounds of error-region clicks after the first prompt",
    )
    parser.add_argument(
        "--focal-alpha",
        type=float,
        default=0.5,
        help="focal-loss weight of positive pixels (negatives: 1 - alpha). MaskFormer's 0.25 "
        "makes 'predict nothing' a deep early minimum when the encoder starts from scratch",
    )
    parser.add_argument("--lr", type=float, default=8e-4, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument(
        "--warmup", type=int, default=None, help="warmup steps (default: min(250, steps / 10))"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (bf16 autocast)")
    parser.add_argument("--seed", type=int, default=0, help="model init, data order, prompts")
    parser.add_argument(
        "--save-every", type=int, default=200, help="write <out>/last every this many steps"
    )
    parser.add_argument(
        "--log-every", type=int, default=10, help="log the mean loss every this many steps"
    )
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (saving <out>/last) after this many steps in this run; "
        "for time-sliced jobs, continue later with --resume",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="safety net for a lent machine: past this many minutes of training, stop early "
        "and write <out>/final anyway (the card records the step reached)",
    )
    parser.add_argument("--workers", type=int, default=None, help="data decoding threads")
    parser.add_argument(
        "--eval",
        action="store_true",
        help="evaluate the final checkpoint on the val split (needs --data)",
    )
    parser.add_argument("--eval-limit", type=int, default=None, help="val images for --eval")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# Arguments that must match between a run and its --resume (they fix the trajectory).
_TRAJECTORY_ARGS = (
    "preset", "steps", "batch_size", "prompts_per_image", "boxes_per_image",
    "correction_rounds", "focal_alpha", "lr", "weight_decay", "warmup", "seed", "init_from",
)  # fmt: skip


def _variant(cfg: SamConfig) -> str:
    """The name of `cfg` in vision.sam.SAM_VARIANTS ("custom" if it is none of them)."""
    return next((name for name, v in SAM_VARIANTS.items() if v == cfg), "custom")


def _saved_config(folder: str | Path) -> SamConfig:
    """The SamConfig of a train.sam final/ folder, its files checked; OSError / ValueError
    (CheckpointError) saying why it is not one."""
    manifest = verify_checkpoint(folder)
    if "model.safetensors" not in manifest["files"]:
        raise ValueError(f"{folder} holds no model.safetensors: not a train.sam checkpoint")
    return SamConfig.from_dict(manifest["config"], source=f"{folder}/manifest.json config")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.data is None) == (args.instances_json is None):
        parser.error("give either --data (ShapeWorld) or --instances-json with --images")
    if args.instances_json is not None and args.images is None:
        parser.error("--instances-json needs --images (the folder its file_names refer to)")
    if args.eval and args.data is None:
        parser.error("--eval reads the ShapeWorld val split: it needs --data")
    if args.init_from is not None:  # before any data is read or model built
        try:
            _saved_config(args.init_from)
        except (OSError, ValueError) as err:  # not there, corrupted, or not a SAM
            parser.error(f"--init-from: {err}")
        args.init_from = str(args.init_from.resolve())  # as recorded (resume key, metadata)
    check_run_args(
        parser, args, ("steps", "batch_size", "prompts_per_image", "save_every", "log_every")
    )
    if args.correction_rounds < 0:
        parser.error(f"--correction-rounds must be >= 0, received {args.correction_rounds}")
    if args.boxes_per_image is None:
        args.boxes_per_image = args.prompts_per_image // 2
    if not 0 <= args.boxes_per_image <= args.prompts_per_image:
        parser.error(
            f"--boxes-per-image must be in [0, {args.prompts_per_image}], received "
            f"{args.boxes_per_image}"
        )
    if args.warmup is None:
        args.warmup = min(250, args.steps // 10)
    if not 0 < args.focal_alpha < 1:
        parser.error(f"--focal-alpha must be in (0, 1), received {args.focal_alpha}")


def _dataset(args: argparse.Namespace) -> tuple[InstanceDataset, dict[str, Any]]:
    if args.data is not None:
        dataset = InstanceDataset.from_shapeworld(args.data, "train")
        info: dict[str, Any] = {"data": str(args.data), "split": "train"}
        manifest = args.data / "shapeworld.json"
        if manifest.is_file():
            sw = json.loads(manifest.read_text(encoding="utf-8"))
            info["data_seed"] = sw.get("config", {}).get("seed")
            info["generator_version"] = sw.get("generator_version")
        return dataset, info
    dataset = InstanceDataset.from_coco(args.images, args.instances_json)
    return dataset, {"data": str(args.instances_json), "images": str(args.images)}


def _fp16_state(sam: Sam) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to(torch.float16) if v.is_floating_point() else v.detach()
        for k, v in sam.state_dict().items()
    }


def _model_card(
    command: str,
    cfg: SamConfig,
    info: dict[str, Any],
    run: dict[str, Any],
    manifest: dict[str, Any],
    table: str | None,
    n_params: int,
) -> str:
    files = "\n".join(
        f"| {name} | {meta['bytes']:,} | `{meta['sha256']}` |"
        for name, meta in manifest["files"].items()
    )
    init = run.get("init_from")
    origin = "Trained from scratch" if init is None else f"Fine-tuned from `{init}`"
    lines = [
        f"# SAM `{_variant(cfg)}` (segment_anything `Sam`, {n_params / 1e6:.2f} M parameters)",
        "",
        f"{origin} by `train/sam.py` with the SAM recipe (point and box prompts, "
        f"correction-click rounds: {run['correction_rounds']}; focal:dice 20:1; IoU head MSE).",
        "",
        "## Command",
        "",
        f"    {command}",
        "",
        "## Data",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
        "## Run",
        "",
        *(f"- {k}: {v}" for k, v in run.items()),
        "",
        "## Model (SamConfig, also in manifest.json)",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=2),
        "```",
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "|---|---|---|",
        files,
        "",
        "## Evaluation",
        "",
        table or "Not evaluated (run with --eval, or eval/sam.py).",
        "",
        "## Use",
        "",
        "    from segment_anything import SamPredictor",
        "    from vision.sam import load_sam, prepare_image",
        "    sam = load_sam('<this folder>')",
        "",
    ]
    return "\n".join(lines)


def _run_eval(final: Path, args: argparse.Namespace, device: torch.device) -> str:
    """eval/sam.py on the shipped (fp16) checkpoint, in a subprocess: train/ and eval/ are
    independent layers (pyproject's import-linter contract). Returns its markdown table."""
    cmd = [
        sys.executable, "-m", "eval.sam", "--checkpoint", str(final), "--data", str(args.data),
        "--split", "val", "--device", str(device), "--json", str(final / "eval.json"),
        "--markdown", str(final / "eval.md"),
    ]  # fmt: skip
    if args.eval_limit is not None:
        cmd += ["--limit", str(args.eval_limit)]
    if args.no_progress:
        cmd.append("--no-progress")
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        # As many intra-op threads as training uses (OMP_NUM_THREADS=1 on a shared CPU).
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())),
    }
    subprocess.run(cmd, check=True, env=env)
    return (final / "eval.md").read_text(encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    command = "python -m train.sam " + shlex.join(list(argv) if argv is not None else sys.argv[1:])

    device = resolve_device(args.device)
    accelerator = make_accelerator(
        cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no"
    )
    device = accelerator.device
    progress = not args.no_progress and accelerator.is_local_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} must be divisible by {world} processes")

    torch.manual_seed(args.seed)
    if args.init_from is not None:
        cfg = _saved_config(args.init_from)
        sam = load_sam(args.init_from).train()
    else:
        cfg = SAM_VARIANTS[PRESET_VARIANTS[args.preset]]
        sam = build_sam(cfg).train()
    n_params = sum(p.numel() for p in sam.parameters())
    trainer = SamPromptLoss(
        sam, args.prompts_per_image, args.boxes_per_image, args.correction_rounds, args.focal_alpha
    )
    optimizer = adamw_matrices_decay(sam, args.lr, args.weight_decay)
    scheduler = cosine_with_warmup(optimizer, args.warmup, args.steps)
    run = {k: getattr(args, k) for k in _TRAJECTORY_ARGS}
    if args.init_from is not None:  # the checkpoint's size, not --preset's, is the model
        run["preset"] = _variant(cfg)
    run["data"] = str(args.data if args.data is not None else args.instances_json)
    trainer, optimizer = accelerator.prepare(trainer, optimizer)

    start = 0
    if args.resume:
        last = args.out / "last"  # its presence checked with the other options
        saved = verify_checkpoint(last / "weights")
        as_saved = json.loads(json.dumps({"config": cfg.to_dict(), "run": run}))
        if saved["config"] != as_saved["config"] or saved["metadata"].get("run") != as_saved["run"]:
            parser.error(
                f"--resume: {last} was written by a different run; saved "
                f"{saved['metadata'].get('run')} / {saved['config']}, now {run} / {cfg.to_dict()}"
            )
        start = load_training_state(args.out, sam, optimizer, scheduler)
    elif (args.out / "last").exists():
        parser.error(f"{args.out / 'last'} exists: pass --resume to continue, or another --out")
    args.out.mkdir(parents=True, exist_ok=True)

    try:
        dataset, info = _dataset(args)
    except (ValueError, OSError) as err:  # bad data: say what, no traceback
        parser.error(str(err))
    t0 = time.time()
    data = load_mask_data(dataset, cfg.img_size, workers=args.workers, progress=progress)
    info.update(images=int(data.images.shape[0]), instances=int(data.masks.shape[0]))
    data = data.to(device)
    if progress:
        print(
            f"SAM {_variant(cfg)}: {n_params / 1e6:.2f} M parameters; {info['images']} images, "
            f"{info['instances']} instances decoded in {time.time() - t0:.0f} s; device {device}",
            file=sys.stderr,
        )

    def save_state(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_training_state(
                args.out, sam, optimizer, scheduler, step, cfg.to_dict(), {"run": run}
            )

    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    order = batch_indices(info["images"], args.batch_size, args.seed, start)
    per_rank = args.batch_size // world
    log_path = args.out / "log.jsonl"
    running: dict[str, torch.Tensor] = {}
    n_running = 0
    bar = tqdm(range(start, end), initial=start, total=args.steps, desc="train SAM",
               disable=not progress, unit="step")  # fmt: skip
    t_train = time.time()
    timed_out = False
    for step in bar:
        batch = next(order)[rank * per_rank : (rank + 1) * per_rank]
        gen = step_generator(args.seed, step, rank, device)
        image_ids = torch.from_numpy(batch).to(device)
        inst = sample_instances(data, image_ids, args.prompts_per_image, gen)
        out = trainer(
            data.images[image_ids], data.sizes[image_ids], data.unpack_masks(inst),
            data.boxes[inst], gen,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(trainer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        for key, value in out.stats.items():
            running[key] = running.get(key, torch.zeros((), device=device)) + value
        n_running += 1
        done = step + 1
        if done % args.log_every == 0 or done == end:
            # the mean over the processes: each averaged over an equal slice of the batch
            reduced = accelerator.reduce(running, "mean")
            means = {k: float(v) / n_running for k, v in reduced.items()}
            running, n_running = {}, 0
            if not math.isfinite(means["loss"]):
                raise FloatingPointError(f"step {done}: loss is {means['loss']}; lower --lr")
            bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
            if accelerator.is_main_process:
                with log_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": done, "lr": scheduler.get_last_lr()[0], **means})
                            + "\n")  # fmt: skip
        if done % args.save_every == 0 and done != end:
            save_state(done)
        late = args.max_minutes is not None and time.time() - t_train > 60 * args.max_minutes
        if args.max_minutes is not None and _any(accelerator, late):  # all stop, or none
            timed_out = done < end
            end = done
            break
    bar.close()
    save_state(end)
    train_seconds = time.time() - t_train
    if progress:
        print(
            f"trained steps {start}..{end} in {train_seconds:.0f} s "
            f"({(end - start) / max(train_seconds, 1e-9):.2f} steps/s)",
            file=sys.stderr,
        )
    if end < args.steps and not timed_out:
        print(f"stopped after step {end} of {args.steps}; continue with --resume", file=sys.stderr)
        return 0
    if timed_out:
        print(f"--max-minutes reached at step {end} of {args.steps}", file=sys.stderr)

    if accelerator.is_main_process:
        final = args.out / "final"
        run_meta = {**run, "steps_done": end, "device": str(device), "processes": world,
                    "train_seconds_this_run": round(train_seconds, 1)}  # fmt: skip
        save_checkpoint(
            final,
            {"model": _fp16_state(sam)},
            cfg.to_dict(),
            {"command": command, "variant": _variant(cfg), "data": info,
             "run": run_meta},
            overwrite=True,
        )  # fmt: skip
        table = None
        if args.eval:
            table = _run_eval(final, args, device)
        manifest = verify_checkpoint(final)
        card = _model_card(command, cfg, info, run_meta, manifest, table, n_params)
        atomic_write_text(final / "MODEL_CARD.md", card)
        print(f"wrote {final}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
