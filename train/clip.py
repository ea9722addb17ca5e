"""Contrastive training of our CLIP variant (trained ViT image tower, frozen MiniLM text tower).

    # ShapeWorld (pretrain + train splits: every class and colour); ~5 minutes on one H200
    # (156 s of steps), see docs/CLIP.md for its figures
    python -m train.clip --preset shapes --data out/shapeworld --out runs/clip --steps 2500 \\
        --batch-size 512 --object-pairs 256 --lr 1e-3 --save-every 500 --workers 16 \\
        --device cuda --eval
    # CPU fallback (~25 minutes here; about one epoch, well below the GPU figures)
    python -m train.clip --preset shapes --data out/shapeworld --out runs/clip --steps 200 \\
        --batch-size 64 --object-pairs 32 --lr 1e-3 --save-every 50 --device cpu
    # continue an interrupted run from <out>/last (data order and captions resume exactly)
    python -m train.clip --preset shapes --data out/shapeworld --out runs/clip --steps 3000 --resume
    # your own image-caption data
    python -m train.clip --preset shapes --imagefolder my_photos --out runs/clip_mine
    python -m train.clip --preset shapes --images coco/train2017 \\
        --captions-json coco/annotations/captions_train2017.json --out runs/clip_coco
    # several GPUs: each process takes its own slice of every global batch
    accelerate launch -m train.clip --preset shapes --data out/shapeworld --out runs/clip

Presets map to CLIP variants (vision.clip.CLIP_CONFIGS): ``--preset shapes`` -> ``shapes-vit``,
``--preset tiny`` -> ``tiny-vit``; ``--model NAME`` picks a variant directly.

How it is fast:

- every image is decoded once into one uint8 tensor (N, 3, S, S) (resized + centre-cropped to the
  model's input if needed) that lives on the training device; a batch is an index into it. No
  augmentation: captions name colours and left/right relations, which flips and colour jitter
  would falsify.
- captions are de-duplicated and tokenised once. The MiniLM text encoder is frozen, so its pooled
  output for every distinct caption is computed once (no grad, eval mode, batched by length) and
  cached in the Polychrome cache; training runs only the text projection on those vectors
  (vision.clip.encode_text_pooled; text.proj(pooled) == encode_text, tested).
- each step draws one caption per image; identical caption strings in a batch count as positives
  of each other (a multi-positive InfoNCE), so "The shapes are on a plain background." is not
  pushed away from itself.

Region-caption pairs (``--object-pairs N``, ShapeWorld data; RegionCLIP-style): captions alone let
the model match scenes by their colours and counts and learn shapes poorly (zero-shot class
accuracy ~63 % against 100 % for colour). With N > 0 every step adds N single objects -- masked
crops made from the instance masks exactly as eval.clip's crops (vision.clip.object_crop) --
captioned as ShapeWorld captions a one-object scene ("A red circle.", "There is a circle.",
"There is a red shape."). The prompt templates of the zero-shot eval are never trained on.

Per-patch read-outs (``--dense-weight W``, ShapeWorld data; docs/CLIP.md): each step also
trains linear read-outs of the class and colour of the object on every patch (targets from the
instance masks, ``patch_labels``) on the patch tokens the VLM's projector reads, so that each
token names its object; the read-outs are dropped at the end. ``--init-from DIR`` fine-tunes a
CLIP checkpoint instead of starting from random weights:

    python -m train.clip --preset shapes --data out/shapeworld \\
        --init-from checkpoints/shapes/clip --dense-weight 1 --out runs/clip_dense \\
        --steps 2500 --batch-size 512 --object-pairs 256 --lr 1e-3 --device cuda

State: ``<out>/last`` (train.common, every --save-every steps) and, at the end, ``<out>/final``: a
core.checkpoint folder with ``clip.safetensors`` (fp16; image tower, text projection, logit scale;
the frozen MiniLM is not stored), the ClipConfig as its config, a MODEL_CARD.md and, with --eval,
``eval.json`` from ``python -m eval.clip`` (run as a subprocess: train and eval do not import each
other). ``<out>/train_log.jsonl`` has one line per step. Load with vision.clip.load_clip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from core.io import atomic_write_bytes, atomic_write_text, cache_dir
from core.runtime import resolve_device, seed_everything
from core.sources import resolve_source
from data.datasets import (
    CaptionDataset,
    InstanceDataset,
    add_caption_arguments,
    caption_source_error,
    user_captions_from_args,
)
from data.formats import rle_to_mask
from data.scene import COLOURS, SHAPES
from data.shapeworld import read_manifest
from train.common import (
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    decode_images,
    load_training_state,
    make_accelerator,
    save_training_state,
    trainable_state,
)
from vision.clip import (
    TENSOR_FILE,
    ClipConfig,
    ClipModel,
    background_fill,
    build_clip,
    clip_checkpoint_config,
    dense_features,
    encode_text_pooled,
    get_clip_config,
    list_clip_configs,
    load_clip,
    object_crop,
    pooled_from_dense,
    trained_state_dict,
)

PRESET_MODELS = {"shapes": "shapes-vit", "tiny": "tiny-vit"}
FINAL = "final"
LOG_NAME = "train_log.jsonl"


# --------------------------------------------------------------------------------------------
# Data: decoded images, de-duplicated captions, precomputed text features
# --------------------------------------------------------------------------------------------


@dataclass
class PairData:
    """Everything training reads, in memory."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    texts: list[str]  # U distinct captions
    offsets: np.ndarray  # (N + 1,) int64: image i's captions are text_ids[offsets[i]:offsets[i+1]]
    text_ids: np.ndarray  # (sum of captions,) int64 indices into texts
    description: dict[str, Any]  # where the data came from (for the model card)
    paths: list[Path] | None = None  # the image files, in `images`' order (scene pairs only)


def load_pairs(args: argparse.Namespace, size: int, *, progress: bool = True) -> PairData:
    """The image-caption pairs named on the command line."""
    if args.data is not None:
        datasets = [CaptionDataset.from_shapeworld(args.data, s) for s in args.splits]
        manifest = read_manifest(args.data)
        description = {
            "kind": "shapeworld",
            "root": str(args.data),
            "splits": list(args.splits),
            "data_seed": manifest.get("config", {}).get("seed"),
            "generator_version": manifest.get("generator_version"),
        }
        pairs = CaptionDataset(
            [p for d in datasets for p in d.image_paths], [c for d in datasets for c in d.captions]
        )
        if len(pairs) == 0:
            raise ValueError(f"no image-caption pairs found in {description}")
    else:
        pairs, description = user_captions_from_args(args)
    texts: list[str] = []
    index: dict[str, int] = {}
    offsets = [0]
    ids: list[int] = []
    for caps in pairs.captions:
        for c in caps:
            ids.append(index.setdefault(c, len(index)))
            if len(index) > len(texts):
                texts.append(c)
        offsets.append(len(ids))
    images = decode_images(pairs.image_paths, size, args.workers, progress=progress)
    description.update(images=len(pairs), captions=len(ids), distinct_captions=len(texts))
    return PairData(
        images,
        texts,
        np.asarray(offsets, np.int64),
        np.asarray(ids, np.int64),
        description,
        list(pairs.image_paths),
    )


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_captions(colour: str, shape: str) -> list[str]:
    """The captions ShapeWorld writes for a one-object scene: listing, class, colour."""
    return [
        f"{_article(f'{colour} {shape}').capitalize()}.",
        f"There is {_article(shape)}.",
        f"There is {_article(f'{colour} shape')}.",
    ]


def load_object_pairs(
    root: Path,
    splits: list[str],
    size: int,
    workers: int,
    texts: list[str],
    max_occlusion: float,
    *,
    progress: bool = True,
) -> PairData:
    """Region-caption pairs from ShapeWorld's instance masks (RegionCLIP-style).

    Every object hidden by at most `max_occlusion` becomes a masked crop (vision.clip.object_crop:
    its visible pixels at scene scale, centred on the scene's background colour) with the
    captions of a one-object scene (object_captions). New caption strings are appended to
    `texts` (shared with the scene pairs).
    """
    datasets = [InstanceDataset.from_shapeworld(root, s) for s in splits]
    jobs = [(d, i) for d in datasets for i in range(len(d))]

    def crops(job: tuple[InstanceDataset, int]) -> list[tuple[np.ndarray, str, str]]:
        dataset, i = job
        item = dataset[i]
        image = np.asarray(item.image)
        union = np.zeros(image.shape[:2], dtype=bool)
        for obj in item.instances:
            union |= obj.mask
        fill = background_fill(image, union)
        out = []
        for obj in item.instances:
            colour = obj.attributes.get("colour")
            occluded = float(obj.attributes.get("occlusion", 0.0)) > max_occlusion
            if colour is None or occluded or not obj.mask.any():
                continue
            crop = object_crop(image, obj.mask, size, fill)
            out.append((np.asarray(crop, np.uint8).transpose(2, 0, 1), str(colour), obj.category))
        return out

    index = {t: i for i, t in enumerate(texts)}
    arrays: list[np.ndarray] = []
    offsets, ids = [0], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(crops, jobs)
        bar = tqdm(results, total=len(jobs), desc="object crops", unit="img", disable=not progress)
        for objs in bar:
            for arr, colour, shape in objs:
                arrays.append(arr)
                for caption in object_captions(colour, shape):
                    ids.append(index.setdefault(caption, len(index)))
                    if len(index) > len(texts):
                        texts.append(caption)
                offsets.append(len(ids))
    if not arrays:
        raise ValueError(f"{root}: no objects with masks in splits {splits}")
    images = torch.from_numpy(np.stack(arrays))
    description = {"objects": len(arrays), "max_occlusion": max_occlusion}
    return PairData(
        images, texts, np.asarray(offsets, np.int64), np.asarray(ids, np.int64), description
    )


def patch_labels(label_map: np.ndarray, grid: int, min_cover: float) -> np.ndarray:
    """(H, W) integer labels (0 = background) -> (grid, grid): for each patch the most common
    non-zero label if it covers at least `min_cover` of the patch's pixels, else 0 (ties go to
    the smaller label). H and W must divide by `grid`."""
    h, w = label_map.shape
    if h % grid or w % grid:
        raise ValueError(f"a {h}x{w} label map does not divide into a {grid}x{grid} patch grid")
    ph, pw = h // grid, w // grid
    blocks = label_map.reshape(grid, ph, grid, pw).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    top = int(label_map.max())
    if top == 0:
        return np.zeros((grid, grid), dtype=np.int64)
    counts = (blocks[..., None] == np.arange(1, top + 1)).sum(axis=2)  # (grid, grid, top)
    best = counts.argmax(axis=2)
    cover = np.take_along_axis(counts, best[..., None], axis=2)[..., 0] / (ph * pw)
    return np.where(cover >= min_cover, best + 1, 0).astype(np.int64)


@dataclass
class PatchLabelData:
    """Per-patch targets of the scene images, in PairData.images' order (0 = background)."""

    classes: torch.Tensor  # (N, g, g) int64: 1 + index into SHAPES
    colours: torch.Tensor  # (N, g, g) int64: 1 + index into COLOURS


def scene_patch_labels(
    objects: Sequence[tuple[np.ndarray, int, int]],
    size: tuple[int, int],
    grid: int,
    min_cover: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(classes, colours), each (grid, grid), of one scene: `objects` = (mask (H, W) bool,
    class label, colour label) with labels >= 1, painted in the given order onto an instance map
    of `size` (H, W); each patch takes the class and the colour of one object, the one
    `patch_labels` picks on that map (0 for both where none covers enough)."""
    instances = np.zeros(size, dtype=np.int64)
    class_of, colour_of = [0], [0]
    for k, (mask, shape, colour) in enumerate(objects, start=1):
        instances[mask] = k
        class_of.append(shape)
        colour_of.append(colour)
    winner = patch_labels(instances, grid, min_cover)
    return np.asarray(class_of)[winner], np.asarray(colour_of)[winner]


def load_patch_labels(
    root: Path,
    splits: list[str],
    image_paths: list[Path],
    grid: int,
    min_cover: float,
    *,
    progress: bool = True,
) -> PatchLabelData:
    """The class and colour of the object on each patch of every image of `image_paths` (the
    scene pairs' images, from the instance masks of `splits`): `scene_patch_labels` with the
    objects painted largest first as InstanceDataset.semantic_map does (ShapeWorld's masks are
    the visible parts, so the order matters only where masks touch)."""
    by_path: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    for split in splits:
        dataset = InstanceDataset.from_shapeworld(root, split)
        bar = tqdm(range(len(dataset)), desc=f"patch labels ({split})", disable=not progress)
        for i in bar:
            h, w = dataset.sizes[i]
            anns = sorted(
                (a for a in dataset.annotations[i] if not a.iscrowd), key=lambda a: -a.area
            )
            objects = []
            for a in anns:
                name = dataset.category_names[a.category_id]
                colour = a.extra.get("colour")
                if name not in SHAPES or colour not in COLOURS:
                    raise ValueError(
                        f"{root} ({split}): expected ShapeWorld classes and colours, received "
                        f"{name!r} / {colour!r}"
                    )
                mask = rle_to_mask(a.segmentation, h, w)
                objects.append((mask, SHAPES.index(name) + 1, COLOURS.index(colour) + 1))
            key = (dataset.images_root / dataset.file_names[i]).resolve()
            by_path[key] = scene_patch_labels(objects, (h, w), grid, min_cover)
    missing = [p for p in image_paths if p.resolve() not in by_path]
    if missing:
        raise ValueError(
            f"{len(missing)} images have no instance masks in splits {splits}, e.g. {missing[0]}"
        )
    pairs = [by_path[p.resolve()] for p in image_paths]
    return PatchLabelData(
        torch.from_numpy(np.stack([c for c, _ in pairs])),
        torch.from_numpy(np.stack([c for _, c in pairs])),
    )


class DenseHeads(torch.nn.Module):
    """Linear read-outs of the class and the colour of the object on each patch, from the patch
    tokens the VLM's projector reads (vision.clip.dense_features: before ln_post). Trained with
    the tower under ``--dense-weight``, and not kept: the checkpoint is the CLIP alone."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.classes = torch.nn.Linear(width, len(SHAPES))
        self.colours = torch.nn.Linear(width, len(COLOURS) + 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, P, D_vis) -> class logits (B, P, 14), colour logits (B, P, 1 + 10)."""
        x = self.norm(tokens)
        return self.classes(x), self.colours(x)


def dense_loss(
    logits: tuple[torch.Tensor, torch.Tensor], classes: torch.Tensor, colours: torch.Tensor
) -> torch.Tensor:
    """The mean of two per-patch cross-entropies: the class over the patches that hold an object
    (background patches have no class; ~85 % of ShapeWorld's patches, they would swamp it), the
    colour over every patch (its background label teaches where the objects are). classes,
    colours (B, P): PatchLabelData's targets, flattened row-major as the tokens are."""
    class_logits, colour_logits = logits
    on_object = classes > 0
    colour = F.cross_entropy(colour_logits.flatten(0, 1).float(), colours.flatten())
    if not on_object.any():  # empty scenes: no class to read (the head stays in the graph for DDP)
        return (colour + 0 * class_logits.sum()) / 2
    shape = F.cross_entropy(class_logits[on_object].float(), classes[on_object] - 1)
    return (shape + colour) / 2


def _text_cache_key(cfg: ClipConfig, texts: list[str]) -> str:
    source = resolve_source(cfg.text.source)
    h = hashlib.sha256()
    h.update(json.dumps([cfg.text.source, str(source.path), cfg.text.context_length]).encode())
    for f in sorted(Path(str(source.path)).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    h.update(open_clip.__version__.encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:32]


def precompute_text(
    model: ClipModel,
    tokenizer: Any,
    cfg: ClipConfig,
    texts: list[str],
    device: torch.device,
    batch_size: int = 512,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled frozen-encoder outputs of every distinct caption: (U, D_text) float32 on CPU.

    Cached in <cache>/clip_text/<key>.safetensors (key: source, its weights' size and mtime,
    context length, the captions), so a resumed or repeated run skips the encoder.
    """
    path = cache_dir("clip_text") / f"{_text_cache_key(cfg, texts)}.safetensors"
    if path.is_file():
        pooled = load_file(str(path))["pooled"]
        if pooled.shape[0] == len(texts):
            return pooled
    ids = tokenizer(texts)  # (U, L)
    lengths = (ids != model.text.config.pad_token_id).sum(dim=1)
    order = torch.argsort(lengths, descending=True)
    out: torch.Tensor | None = None
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc="encode captions", unit="batch", disable=not progress):
        sel = order[start : start + batch_size]
        width = int(lengths[sel].max())  # pad only to this batch's longest caption
        with torch.inference_mode():
            pooled = encode_text_pooled(model, ids[sel, :width].to(device)).float().cpu()
        if out is None:
            out = torch.empty(len(texts), pooled.shape[1])
        out[sel] = pooled
    assert out is not None
    # atomic: the processes of a data-parallel run all write it, and a reader never sees half
    atomic_write_bytes(path, save({"pooled": out.contiguous()}))
    return out


def pick_captions(
    data: PairData, indices: np.ndarray, seed: int, step: int, stream: int = 0
) -> np.ndarray:
    """One caption (a distinct-text id) per image, a pure function of (seed, step, stream)."""
    rng = np.random.default_rng([seed, step, stream])
    start, count = data.offsets[indices], np.diff(data.offsets)[indices]
    choice = start + np.floor(rng.random(len(indices)) * count).astype(np.int64)
    return data.text_ids[choice]


# --------------------------------------------------------------------------------------------
# Model pieces the loop runs
# --------------------------------------------------------------------------------------------


class ContrastiveHeads(torch.nn.Module):
    """What one training step runs: the image tower, the text projection and, under
    ``--dense-weight``, the per-patch read-outs (DDP wraps this)."""

    def __init__(self, clip: ClipModel, dense: DenseHeads | None = None) -> None:
        super().__init__()
        self.clip = clip
        self.dense = dense

    def forward(
        self, pixels: torch.Tensor, text_pooled: torch.Tensor, scenes: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """pixels (B, 3, S, S) normalised, text_pooled (B, D_text) -> unit (B, D), (B, D), scale,
        and with dense heads the per-patch logits of the first `scenes` images (None: all; the
        region crops appended after the scenes have no targets), else None."""
        dense_logits = None
        if self.dense is None:
            image = self.clip.encode_image(pixels)
        else:  # one pass for both: the pooled embedding recomputed from the patch tokens
            feats = dense_features(self.clip, pixels)
            image = pooled_from_dense(self.clip, feats)
            dense_logits = self.dense(feats.tokens[:scenes])
        image = F.normalize(image.float(), dim=-1)
        text = F.normalize(self.clip.text.proj(text_pooled).float(), dim=-1)
        return image, text, self.clip.logit_scale.exp().float(), dense_logits


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, text_ids: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP eq. in Radford et al. 2021, Fig. 3) with multi-positive targets.

    image, text: (B, D) unit rows, pair i = (image i, caption i); text_ids: (B,) distinct-caption
    ids. Caption j is a positive for image i iff it is the same string as caption i.
    """
    logits = scale * image @ text.T  # (B, B)
    same = (text_ids[:, None] == text_ids[None, :]).float()  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def param_groups(model: ClipModel, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on gains, biases, embeddings' tokens, logit scale."""
    no_decay_names = {"visual.positional_embedding", "visual.class_embedding", "logit_scale"}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in no_decay_names else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.clip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESET_MODELS),
        default="shapes",
        help="preset -> CLIP variant: shapes -> shapes-vit, tiny -> tiny-vit (default shapes)",
    )
    parser.add_argument(
        "--model", choices=list_clip_configs(), help="CLIP variant (overrides --preset's)"
    )
    src = parser.add_argument_group("data (one of --data, --imagefolder, --images)")
    src.add_argument("--data", type=Path, help="a ShapeWorld folder (python -m data.shapeworld)")
    src.add_argument(
        "--splits",
        type=lambda s: [x for x in s.split(",") if x],
        default=["pretrain", "train"],
        help="ShapeWorld splits to train on, comma-separated (default pretrain,train)",
    )
    add_caption_arguments(src)
    src.add_argument(
        "--object-pairs",
        type=int,
        default=0,
        help="per step, this many region-caption pairs (masked object crops from the --data "
        "instance masks, captioned as one-object scenes) besides the --batch-size scenes",
    )
    src.add_argument(
        "--object-max-occlusion",
        type=float,
        default=0.5,
        help="objects hidden more than this are not used as region pairs (default 0.5)",
    )
    src.add_argument(
        "--dense-weight",
        type=float,
        default=0.0,
        help="add this weight x a per-patch loss: linear read-outs of the class and colour of "
        "the object on each patch (from the --data instance masks) trained with the tower, so "
        "that each patch token names its object (what the VLM's projector reads); 0 = off",
    )
    src.add_argument(
        "--dense-min-cover",
        type=float,
        default=0.25,
        help="a patch is labelled with an object when the object covers at least this share "
        "of its pixels, else background (default 0.25)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this CLIP checkpoint folder (same --model) instead of random weights: "
        "a fine-tune",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder (last/, final/)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps in all")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="pairs per step per process (default 256)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%%)")
    parser.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (bf16 autocast on cuda)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data order, captions, init")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument("--save-every", type=int, default=500, help="steps between <out>/last")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="save state and stop after this many steps (a time-sliced job; resume later)",
    )
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--eval", action="store_true", help="evaluate <out>/final on the --data val split"
    )
    parser.add_argument(
        "--eval-limit", type=int, default=1000, help="val images for --eval (default 1000)"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    why = caption_source_error(args, args.splits + (["val"] if args.eval else []))
    if why:
        parser.error(why)
    check_run_args(parser, args, ("steps", "batch_size", "save_every", "workers"))
    if args.data is None and (args.eval or args.object_pairs):
        parser.error(
            "--eval and --object-pairs need a ShapeWorld --data folder (val split; instance masks)"
        )
    if args.object_pairs < 0:
        parser.error(f"--object-pairs must be >= 0, received {args.object_pairs}")
    if args.dense_weight < 0:
        parser.error(f"--dense-weight must be >= 0, received {args.dense_weight}")
    if args.dense_weight and args.data is None:
        parser.error("--dense-weight needs a ShapeWorld --data folder (instance masks)")
    if not 0 < args.dense_min_cover <= 1:
        parser.error(f"--dense-min-cover must be in (0, 1], received {args.dense_min_cover}")


def _run_config(cfg: ClipConfig, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "clip": cfg.to_dict(),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "object_pairs": args.object_pairs,
        "dense_weight": args.dense_weight,
        "dense_min_cover": args.dense_min_cover,
        "init_from": None if args.init_from is None else str(args.init_from),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    cfg = get_clip_config(args.model or PRESET_MODELS[args.preset])
    command = "python -m train.clip " + shlex.join(argv)
    if args.init_from is not None:  # before anything is built or read
        try:
            saved_cfg = clip_checkpoint_config(args.init_from)
        except ValueError as err:  # CheckpointError, ConfigError
            parser.error(f"--init-from: {err}")
        if saved_cfg != cfg:
            differ = [k for k, v in cfg.to_dict().items() if saved_cfg.to_dict().get(k) != v]
            parser.error(
                f"--init-from: {args.init_from} is CLIP {saved_cfg.name!r}, whose {differ} differ "
                f"from {cfg.name!r}'s; pick its --model / --preset"
            )

    device = resolve_device(args.device)
    accelerator = make_accelerator(
        cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no"
    )
    device = accelerator.device
    progress = not args.no_progress and accelerator.is_local_main_process
    seed_everything(args.seed)
    clip, _, tokenizer = build_clip(cfg)
    clip.to(device).train()
    clip.text.eval()  # frozen encoder (not run in the loop, but keep dropout off if called)
    trained = trainable_state(clip)
    stored = trained_state_dict(clip, cfg)
    if set(trained) != set(stored):  # what trains is exactly what the checkpoint stores
        raise AssertionError(f"trainable {sorted(set(trained) ^ set(stored))[:5]} mismatch")
    if args.init_from is not None:  # its config was checked above
        clip.load_state_dict(load_clip(args.init_from).model.state_dict())
    dense = DenseHeads(cfg.vision.width).to(device) if args.dense_weight else None

    try:
        data = load_pairs(args, cfg.vision.image_size, progress=progress)
    except (ValueError, OSError) as err:  # bad data: say what, no traceback
        parser.error(str(err))
    objects = None
    if args.object_pairs:
        objects = load_object_pairs(
            args.data,
            args.splits,
            cfg.vision.image_size,
            args.workers,
            data.texts,
            args.object_max_occlusion,
            progress=progress,
        )
        data.description.update(objects.description, object_pairs_per_step=args.object_pairs)
    labels = None
    if dense is not None:
        try:
            labels = load_patch_labels(
                args.data,
                args.splits,
                data.paths or [],
                cfg.vision.grid,
                args.dense_min_cover,
                progress=progress,
            )
        except (ValueError, OSError) as err:
            parser.error(str(err))
    pooled_text = precompute_text(
        clip, tokenizer, cfg, data.texts, device, progress=progress
    )  # (U, D_text)
    on_gpu = device.type == "cuda"
    images = data.images.to(device) if on_gpu else data.images  # the whole set lives there
    object_images = None
    if objects is not None:
        object_images = objects.images.to(device) if on_gpu else objects.images
    pooled_text = pooled_text.to(device)
    pre = open_clip.get_model_preprocess_cfg(clip)
    mean = torch.tensor(pre["mean"], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre["std"], device=device).view(1, 3, 1, 1) * 255

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = args.batch_size * world
    if len(data.texts) < 2 or data.images.shape[0] < global_batch:
        parser.error(
            f"need at least one batch: {data.images.shape[0]} images for a global batch of "
            f"{global_batch} (--batch-size {args.batch_size} x {world} processes)"
        )
    if objects is not None and objects.images.shape[0] < args.object_pairs * world:
        parser.error(
            f"--object-pairs {args.object_pairs} x {world} processes is more than the "
            f"{objects.images.shape[0]} objects found"
        )
    groups = param_groups(clip, args.weight_decay)
    if dense is not None:  # the read-outs: no decay, they are dropped at the end
        groups.append({"params": list(dense.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    # what <out>/last holds: the tower and, when trained, the read-outs beside it
    wrapped = ContrastiveHeads(clip, dense)
    state_module: torch.nn.Module = clip if dense is None else wrapped
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    scheduler = cosine_with_warmup(optimizer, warmup, args.steps)
    run_config = _run_config(cfg, args)
    start = 0
    if args.resume:
        saved = json.loads((args.out / "last" / "weights" / "manifest.json").read_text())
        if saved["config"].get("clip") != run_config["clip"]:
            parser.error(
                f"--resume: {args.out / 'last'} was trained with another CLIP config "
                f"({saved['config'].get('clip', {}).get('name')!r}); use the same --preset/--model"
            )
        for key, before in (("dense_weight", 0.0), ("dense_min_cover", args.dense_min_cover)):
            was = saved["config"].get(key, before)  # runs before these options had neither
            if was != run_config[key]:
                parser.error(
                    f"--resume: {args.out / 'last'} was trained with "
                    f"--{key.replace('_', '-')} {was}; pass the same"
                )
        start = load_training_state(args.out, state_module, optimizer, scheduler)
        if start > args.steps:
            parser.error(f"--resume: {args.out / 'last'} is at step {start} > --steps")
    heads = accelerator.prepare(wrapped)
    prepared_optimizer = accelerator.prepare(optimizer)
    params = [p for p in clip.parameters() if p.requires_grad]
    readouts = [] if dense is None else list(dense.parameters())

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / LOG_NAME
    kept = []
    if args.resume and log_path.is_file():  # drop lines logged after the state we resume from
        lines = log_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= start]
    if accelerator.is_main_process:  # the others must not replace the file main appends to
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))
    stop = args.stop_at if args.stop_at is not None else args.steps
    batches = batch_indices(data.images.shape[0], global_batch, args.seed, start)
    object_batches = None
    if objects is not None:  # a second deterministic stream, so resuming stays exact
        n_obj = objects.images.shape[0]
        object_batches = batch_indices(n_obj, args.object_pairs * world, args.seed + 1, start)
    bar = tqdm(
        range(start, stop),
        initial=start,
        total=args.steps,
        desc="train clip",
        unit="step",
        disable=not progress,
    )
    t0 = time.time()
    loss_value = float("nan")
    with log_path.open("a", encoding="utf-8") as log:
        for step in bar:
            indices = next(batches)
            caption_ids = pick_captions(data, indices, args.seed, step)
            local = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
            idx = torch.from_numpy(indices[local])
            tid = torch.from_numpy(caption_ids[local]).to(device)
            pixels = images[idx.to(images.device)].to(device, non_blocking=True)
            if objects is not None and object_batches is not None and object_images is not None:
                obj_indices = next(object_batches)
                obj_caps = pick_captions(objects, obj_indices, args.seed, step, stream=1)
                part = slice(rank * args.object_pairs, (rank + 1) * args.object_pairs)
                obj_idx = torch.from_numpy(obj_indices[part]).to(object_images.device)
                pixels = torch.cat([pixels, object_images[obj_idx].to(device, non_blocking=True)])
                tid = torch.cat([tid, torch.from_numpy(obj_caps[part]).to(device)])
            pixels = (pixels.float() - mean) / std  # (B [+ objects], 3, S, S)
            with accelerator.autocast():
                image_emb, text_emb, scale, dense_logits = heads(
                    pixels, pooled_text[tid], scenes=len(idx)
                )
            loss = contrastive_loss(image_emb, text_emb, scale, tid)
            parts = {"contrastive": loss.detach()}
            if dense_logits is not None and labels is not None:
                patch = dense_loss(
                    dense_logits,
                    labels.classes[idx].flatten(1).to(device),
                    labels.colours[idx].flatten(1).to(device),
                )
                parts["dense"] = patch.detach()
                loss = loss + args.dense_weight * patch
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            if readouts:  # apart: the read-outs' gradients must not shrink the tower's step
                # (torch's own: the call above has unscaled every gradient where a scaler runs)
                torch.nn.utils.clip_grad_norm_(readouts, 1.0)
            prepared_optimizer.step()
            scheduler.step()
            prepared_optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))  # CLIP caps the temperature at 100
            # the mean over the processes, each contrasting its own pairs
            loss_value = accelerator.reduce(loss.detach(), "mean").item()
            done = step + 1
            if accelerator.is_main_process:
                lr = scheduler.get_last_lr()[0]
                row = {"step": done, "loss": loss_value, "lr": lr, "time": time.time() - t0}
                if dense is not None:  # the two terms apart (this process's batch)
                    row.update({k: float(v) for k, v in parts.items()})
                log.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{loss_value:.3f}", scale=f"{scale.item():.1f}")
            if done % args.save_every == 0 or done == stop:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_training_state(
                        args.out,
                        state_module,
                        optimizer,
                        scheduler,
                        done,
                        run_config,
                        {"loss": loss_value},
                    )
    bar.close()
    seconds = time.time() - t0
    if stop < args.steps or not accelerator.is_main_process:
        return 0

    final = args.out / FINAL
    metadata = {
        "step": args.steps,
        "command": command,
        "data": data.description,
        "final_loss": loss_value,
        "train_seconds_this_run": round(seconds, 1),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }
    tensors = {k: v.to(torch.float16) for k, v in trained_state_dict(clip, cfg).items()}
    save_checkpoint(final, {TENSOR_FILE: tensors}, cfg.to_dict(), metadata, overwrite=True)
    results = None
    if args.eval:
        results = _run_eval(final, args)
    _write_model_card(final, cfg, args, metadata, results)
    print(f"wrote {final}" + (f" (eval: {final / 'eval.json'})" if results else ""))
    return 0


def _run_eval(final: Path, args: argparse.Namespace) -> dict[str, Any]:
    """python -m eval.clip on the val split, in a subprocess (train does not import eval)."""
    out = final / "eval.json"
    cmd = [sys.executable, "-m", "eval.clip", "--checkpoint", str(final), "--data", str(args.data)]
    cmd += ["--split", "val", "--limit", str(args.eval_limit), "--json", str(out)]
    cmd += ["--device", args.device] + (["--no-progress"] if args.no_progress else [])
    subprocess.run(cmd, check=True)
    results: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return results


def _write_model_card(
    final: Path,
    cfg: ClipConfig,
    args: argparse.Namespace,
    metadata: dict[str, Any],
    results: dict[str, Any] | None,
) -> None:
    manifest = json.loads((final / "manifest.json").read_text(encoding="utf-8"))
    info = manifest["files"][f"{TENSOR_FILE}.safetensors"]
    data = metadata["data"]
    lines = [
        f"# CLIP `{cfg.name}` (Polychrome)",
        "",
        "A ViT image tower trained contrastively against the frozen sentence encoder "
        f"`{cfg.text.source}` (mean pooled, linear projection) with open_clip. "
        "The frozen text encoder is not stored; `vision.clip.load_clip` rebuilds it from its "
        "source.",
        "",
        "## Command",
        "",
        f"    {metadata['command']}",
        "",
        "## Data",
        "",
        *[f"- {k}: {v}" for k, v in data.items()],
        "",
        "## Training",
        "",
        f"- steps: {metadata['step']}, batch size: {args.batch_size}, lr: {args.lr}, "
        f"seed: {args.seed}",
        f"- final loss: {metadata['final_loss']:.4f}",
        f"- device: {metadata['device']}; seconds (this run): {metadata['train_seconds_this_run']}",
        f"- open_clip {metadata['open_clip_version']}, torch {metadata['torch_version']}",
        "",
        "## Weights",
        "",
        f"- `{TENSOR_FILE}.safetensors` (fp16, {info['bytes']} bytes): image tower, text "
        "projection, logit scale",
        f"- sha256: `{info['sha256']}`",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=2),
        "```",
        "",
    ]
    if results is not None:
        lines += ["## Evaluation (`python -m eval.clip`)", "", results["table"], ""]
    atomic_write_text(final / "MODEL_CARD.md", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
