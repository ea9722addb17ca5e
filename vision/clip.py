"""CLIP: open_clip models, our ShapeWorld variants, dense features and zero-shot text heads.

    model, preprocess, tokenizer = build_clip("shapes-vit")   # our variant: random image tower,
                                                              # frozen MiniLM text tower
    model, preprocess, tokenizer = build_clip("ViT-B-32")     # any open_clip registry model
    model, preprocess, tokenizer = load_clip("checkpoints/shapes/clip")   # a trained checkpoint

    feats = encode_images(model, preprocess, ["a.png", pil_image, array])  # (B, D), unit norm
    heads = text_classifier(model, tokenizer, ["circle", "star"])          # (N, D), unit norm
    dense = dense_features(model, pixels)   # tokens (B, h*w, D_vis), projected (B, D, h, w)

Our variants (``CLIP_CONFIGS``) are :class:`ClipConfig` dataclasses. ``build_clip`` turns one into
an open_clip model config (``open_clip_model_config``), registers it with open_clip's public
``open_clip.add_model_config`` under ``polychrome-<name>`` (a JSON file in the Polychrome cache:
the text tower's ``hf_model_name`` is the resolved local MiniLM folder, which differs per
machine, so the file is written at run time) and builds it with
``open_clip.create_model_and_transforms`` -- the same call that builds ``ViT-B-32`` or
``convnext_large_d_320`` from open_clip's own registry.

The text tower is sentence-transformers all-MiniLM-L6-v2 (source ``minilm-l6``) through open_clip's
``HFTextEncoder`` with mean pooling, frozen (its weights stay as the source ships them; only the
linear projection into the joint space trains). Checkpoints therefore hold the image tower, the
text projection and the logit scale only (``trained_state_dict``); ``load_clip`` rebuilds MiniLM
from its source and loads the rest strictly.

Dense features (``dense_features``), for segmentation heads (Mask-Adapter, PMP):

- ViT towers: the visual transformer's final-block patch tokens (``forward_intermediates``, class
  token dropped) are the ``tokens``; ``projected`` applies the tower's head to every token:
  ``ln_post`` then ``proj`` (MaskCLIP's observation that the head is per-token).
- ConvNeXt / timm towers: ``trunk.forward_features`` gives the (B, C, h, w) map (``tokens`` is it
  flattened); ``projected`` runs the trunk's head (global pool over a 1x1 map is the identity, then
  the head LayerNorm) and open_clip's projection at every location, as FC-CLIP and Mask-Adapter
  do with a "fake 2-D input".

``pooled_from_dense`` recomputes the image embedding from those dense features exactly as the
tower pools; it equals ``model.encode_image`` (tested), which pins down that the dense head is the
global head.

Local features (``dense_features(..., window=k)``, odd k, ViT towers): the same tower and
weights, but every patch token attends only to the patches at most ``k // 2`` rows and columns
away in every block (the class token still attends to all, and no patch reads it). Under global
attention a CLIP's patch tokens carry much of the scene besides what lies on them; windowing the
attention is a training-free way to get features of what is around each patch (the observation
behind SCLIP / NACLIP-style dense CLIP inference; the windows are written here, no library has
them). On ShapeWorld a linear probe reads an object's class much better from windowed patches
(docs/RESULTS.md, ``eval.vision_probe``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeAlias

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from PIL import Image

from core.checkpoint import CheckpointError, checkpoint_config, load_checkpoint, load_state_strict
from core.config import Config, project_path
from core.images import load_rgb
from core.io import atomic_write_text, cache_dir
from core.sources import resolve_source

__all__ = [
    "CLIP_CONFIGS",
    "FROZEN_PREFIX",
    "OPEN_CLIP_PREFIX",
    "TEMPLATES",
    "TENSOR_FILE",
    "ClipBundle",
    "ClipConfig",
    "ClipModel",
    "ClipPresetConfig",
    "ClipTextConfig",
    "ClipVisionConfig",
    "CropKind",
    "DenseFeatures",
    "background_fill",
    "build_clip",
    "clip_checkpoint_config",
    "clip_from_preset",
    "dense_features",
    "encode_images",
    "encode_text_pooled",
    "get_clip_config",
    "list_clip_configs",
    "load_clip",
    "object_crop",
    "open_clip_model_config",
    "pooled_from_dense",
    "register_open_clip_config",
    "supports_window",
    "text_classifier",
    "trained_state_dict",
    "visual_head",
    "weighted_pool",
    "window_attention_mask",
]

OPEN_CLIP_PREFIX = "polychrome-"  # our variants' names in open_clip's registry
FROZEN_PREFIX = "text.transformer."  # state-dict keys of the frozen MiniLM (never checkpointed)
TENSOR_FILE = "clip"  # a CLIP checkpoint's tensors live in clip.safetensors

# What open_clip builds: CLIP (its own text transformer) or CustomTextCLIP (an HF text tower).
ClipModel: TypeAlias = CLIP | CustomTextCLIP


# --------------------------------------------------------------------------------------------
# Configs and the variant registry
# --------------------------------------------------------------------------------------------


@dataclass
class ClipVisionConfig(Config):
    """The ViT image tower we train (open_clip ``VisionTransformer``)."""

    image_size: int = 128  # input side in pixels (square); ShapeWorld renders 128x128
    patch_size: int = 8  # pixels per patch side; the dense grid is image_size // patch_size
    width: int = 256  # transformer width D_vis
    layers: int = 6  # transformer blocks
    head_width: int = 64  # channels per attention head (heads = width // head_width)
    mlp_ratio: float = 4.0  # MLP hidden size / width
    # "avg": the image embedding is the mean of the per-patch projected tokens, so every patch
    # token is trained to live in the joint space (what dense segmentation features need);
    # "tok": the class token's projection (OpenAI CLIP), patch tokens only indirectly trained.
    pool: Literal["avg", "tok"] = "avg"

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(
                f"image_size must be >= 8 and a multiple of patch_size, received image_size="
                f"{self.image_size}, patch_size={self.patch_size}"
            )
        if self.width < 8 or self.head_width < 1 or self.width % self.head_width:
            raise ValueError(
                f"width must be a multiple of head_width, received width={self.width}, "
                f"head_width={self.head_width}"
            )
        if self.layers < 1 or self.mlp_ratio <= 0:
            raise ValueError(
                f"layers must be >= 1 and mlp_ratio > 0, received {self.layers}, {self.mlp_ratio}"
            )

    @property
    def grid(self) -> int:
        """Patches per side of the dense feature map."""
        return self.image_size // self.patch_size


@dataclass
class ClipTextConfig(Config):
    """The text tower: a Hugging Face encoder from a model source, pooled and projected."""

    source: str = "minilm-l6"  # model source spec (core.sources); resolved to a local folder
    context_length: int = 32  # tokens per caption (ShapeWorld captions fit in 32)
    pooler: Literal["mean_pooler", "cls_pooler", "max_pooler"] = "mean_pooler"  # as trained
    proj: Literal["linear", "mlp"] = "linear"  # pooled -> joint space projection (trained)
    frozen: bool = True  # keep the encoder's weights as the source ships them (not checkpointed)

    def __post_init__(self) -> None:
        if not 4 <= self.context_length <= 512:
            raise ValueError(f"context_length must be in [4, 512], received {self.context_length}")
        if not self.source:
            raise ValueError("text source must be a non-empty model source spec")


@dataclass
class ClipConfig(Config):
    """One CLIP variant: joint space size and the two towers. Saved in every CLIP checkpoint."""

    name: str  # registry name; open_clip sees it as "polychrome-<name>"
    embed_dim: int = 256  # joint image-text space D
    vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name must be letters, digits, '_', '.', '-', received {self.name!r}")
        if self.embed_dim < 2:
            raise ValueError(f"embed_dim must be >= 2, received {self.embed_dim}")


# shapes-vit: patch 8 at 128 px -> a 16x16 dense grid. ShapeWorld objects have radii of 6-28 px,
# so with patch 16 (8x8 grid) the smallest objects would cover a single token; 16x16 keeps >= 2x2
# tokens on them for segmentation. Width 256 x 6 layers (~5 M parameters, ~10 MB in fp16) is the
# most that trains to convergence within minutes on one GPU (~257 tokens per image); the joint
# space (256) matches the width so the head is square.
CLIP_CONFIGS: dict[str, ClipConfig] = {
    "shapes-vit": ClipConfig(
        name="shapes-vit",
        embed_dim=256,
        vision=ClipVisionConfig(
            image_size=128, patch_size=8, width=256, layers=6, head_width=64, pool="avg"
        ),
        text=ClipTextConfig(source="minilm-l6", context_length=32),
    ),
    # Tests: the same code at toy sizes (64 px ShapeWorld of the tiny preset).
    "tiny-vit": ClipConfig(
        name="tiny-vit",
        embed_dim=32,
        vision=ClipVisionConfig(
            image_size=64, patch_size=8, width=32, layers=2, head_width=16, pool="avg"
        ),
        text=ClipTextConfig(source="minilm-l6", context_length=16),
    ),
}


@dataclass
class ClipPresetConfig(Config):
    """The "clip" entry of a preset (configs/*.json): which CLIP, and its trained weights."""

    model: str = "shapes-vit"  # one of CLIP_CONFIGS, or an open_clip registry name (paper preset)
    checkpoint: str | None = None  # a CLIP checkpoint folder for load_clip; None = random weights

    def __post_init__(self) -> None:
        if self.model not in CLIP_CONFIGS and self.model not in open_clip.list_models():
            raise ValueError(
                f"unknown CLIP model {self.model!r}; expected one of {list_clip_configs()} or an "
                "open_clip model name (open_clip.list_models())"
            )


def list_clip_configs() -> list[str]:
    """Names of our CLIP variants."""
    return sorted(CLIP_CONFIGS)


def get_clip_config(name: str) -> ClipConfig:
    """The variant `name`; ValueError listing the valid names if unknown."""
    try:
        return CLIP_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown CLIP config {name!r}; valid names: {list_clip_configs()}"
        ) from None


# --------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------


class ClipBundle(NamedTuple):
    """What build_clip and load_clip return."""

    model: ClipModel  # open_clip CLIP / CustomTextCLIP, fp32 on CPU, eval mode
    preprocess: Any  # PIL image -> (3, S, S) normalised tensor (open_clip's val transform)
    tokenizer: Any  # list[str] -> (N, context_length) int64 token ids


def open_clip_model_config(cfg: ClipConfig) -> dict[str, Any]:
    """The open_clip model config (the JSON of open_clip's model_configs/) for `cfg`."""
    source = resolve_source(cfg.text.source)
    if source.path is None:
        raise ValueError(
            f"text source {cfg.text.source!r} is a hub id; CLIP text towers need a local folder "
            "(a packaged source or a path)"
        )
    v = cfg.vision
    return {
        "embed_dim": cfg.embed_dim,
        "init_logit_scale": cfg.init_logit_scale,
        "vision_cfg": {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "width": v.width,
            "layers": v.layers,
            "head_width": v.head_width,
            "mlp_ratio": v.mlp_ratio,
            "pool_type": v.pool,
        },
        "text_cfg": {
            "hf_model_name": str(source.path),
            "hf_tokenizer_name": str(source.path),
            "hf_proj_type": cfg.text.proj,
            "hf_pooler_type": cfg.text.pooler,
            "context_length": cfg.text.context_length,
        },
    }


_REGISTERED: dict[str, str] = {}  # open_clip name -> JSON text we registered under it


def register_open_clip_config(cfg: ClipConfig) -> str:
    """Register `cfg` with ``open_clip.add_model_config``; return its open_clip model name.

    The JSON goes to ``<cache>/open_clip_configs/polychrome-<name>.json``; registering the same
    config again is a no-op, a changed config under the same name replaces the entry.
    """
    name = OPEN_CLIP_PREFIX + cfg.name
    text = json.dumps(open_clip_model_config(cfg), indent=2, sort_keys=True) + "\n"
    if _REGISTERED.get(name) == text and name in open_clip.list_models():
        return name
    path = cache_dir("open_clip_configs") / f"{name}.json"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    open_clip.add_model_config(path)
    _REGISTERED[name] = text
    return name


def build_clip(
    spec: str | ClipConfig,
    *,
    pretrained: str | None = None,
    image_size: int | None = None,
) -> ClipBundle:
    """Build a CLIP model with random (or `pretrained`) weights: fp32, CPU, eval mode.

    spec: one of our variants (``list_clip_configs()``), a :class:`ClipConfig`, or a model name
        from open_clip's registry (``open_clip.list_models()``, e.g. "ViT-B-32",
        "convnext_large_d_320"). Our variants load the text encoder from its source and freeze
        it when ``cfg.text.frozen``.
    pretrained: an open_clip pretrained tag or weights file, for registry models only
        (our variants load trained weights with load_clip).
    image_size: override the input size of a registry model (open_clip's force_image_size).
    """
    if isinstance(spec, str) and spec in CLIP_CONFIGS:
        spec = CLIP_CONFIGS[spec]
    if isinstance(spec, ClipConfig):
        if pretrained is not None or image_size is not None:
            raise ValueError(
                f"pretrained/image_size apply to open_clip registry models only; {spec.name!r} is "
                "our variant: change its ClipConfig, or load trained weights with load_clip()"
            )
        name = register_open_clip_config(spec)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        if spec.text.frozen:
            model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    elif isinstance(spec, str) and spec in open_clip.list_models():
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec, pretrained=pretrained, force_image_size=image_size
        )
        name = spec
    else:
        known = [m for m in open_clip.list_models() if not m.startswith(OPEN_CLIP_PREFIX)]
        raise ValueError(
            f"unknown CLIP model {spec!r}; expected one of our variants {list_clip_configs()}, "
            f"a ClipConfig, or an open_clip model name ({len(known)} known, e.g. "
            f"{[*known[:3], 'ViT-B-32', 'convnext_base']})"
        )
    tokenizer = open_clip.get_tokenizer(name)
    model.float().eval()  # fp32 whatever dtype the text source was stored in
    return ClipBundle(model, preprocess, tokenizer)


def trained_state_dict(model: ClipModel, cfg: ClipConfig) -> dict[str, torch.Tensor]:
    """The tensors a CLIP checkpoint stores: everything but the frozen text encoder."""
    state = model.state_dict()
    if not cfg.text.frozen:
        return dict(state)
    return {k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIX)}


def clip_checkpoint_config(checkpoint_dir: str | os.PathLike[str]) -> ClipConfig:
    """The ClipConfig a CLIP checkpoint was saved with, from its manifest alone (nothing is
    hashed or loaded). CheckpointError for a folder that is no checkpoint, ConfigError for a
    config that is no CLIP's."""
    return ClipConfig.from_dict(
        checkpoint_config(checkpoint_dir), source=f"{checkpoint_dir}/manifest.json config"
    )


def load_clip(checkpoint_dir: str | os.PathLike[str]) -> ClipBundle:
    """Build the model of a CLIP checkpoint from its stored config and load it strictly.

    The checkpoint (core.checkpoint format, sha256-verified) holds ``clip.safetensors`` with
    every tensor of ``trained_state_dict`` (fp16 or fp32; cast to the model's fp32) and the
    ClipConfig as its config. Every non-frozen key must be present and nothing else; the frozen
    text encoder comes from its source. Raises CheckpointError otherwise.
    """
    ckpt = load_checkpoint(checkpoint_dir)
    cfg = ClipConfig.from_dict(ckpt.config, source=f"{checkpoint_dir}/manifest.json config")
    if TENSOR_FILE not in ckpt.tensors:
        raise CheckpointError(
            f"{checkpoint_dir}: expected {TENSOR_FILE}.safetensors, found "
            f"{sorted(f + '.safetensors' for f in ckpt.tensors)}"
        )
    stored = ckpt.tensors[TENSOR_FILE]
    model, preprocess, tokenizer = build_clip(cfg)
    full = model.state_dict()
    expected = trained_state_dict(model, cfg)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint_dir}: {TENSOR_FILE}.safetensors does not fit CLIP {cfg.name!r}: missing "
            f"keys {missing[:10]}, unexpected keys {unexpected[:10]} (frozen keys under "
            f"{FROZEN_PREFIX!r} come from the text source and must not be stored)"
        )
    full.update({k: v.to(full[k].dtype) for k, v in stored.items()})
    load_state_strict(model, full, what=str(checkpoint_dir))
    model.eval()
    return ClipBundle(model, preprocess, tokenizer)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _model_device_dtype(model: ClipModel) -> tuple[torch.device, torch.dtype]:
    p = next(model.visual.parameters())
    return p.device, p.dtype


ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray


@torch.no_grad()
def encode_images(
    model: ClipModel,
    preprocess: Any,
    images: Sequence[ImageInput],
    *,
    batch_size: int = 64,
    normalize: bool = True,
) -> torch.Tensor:
    """Embed images of any kind: paths, bytes, PIL images (any mode) or arrays.

    Each goes through core.images.load_rgb (modes converted to RGB as documented there; sizes
    1x1 to 4096x4096, files up to 8192 a side read downscaled; anything else raises ImageError
    before the model sees it), then
    `preprocess` (resize + centre crop + normalise). Returns (B, D) float32 on the model's
    device, unit-norm rows if `normalize`.
    """
    if isinstance(images, str | bytes | os.PathLike | Image.Image | np.ndarray):
        raise TypeError(
            f"images must be a sequence of images, received a single {type(images).__name__}; "
            "wrap it in a list"
        )
    if len(images) == 0:
        raise ValueError("images is empty; expected at least one image")
    device, dtype = _model_device_dtype(model)
    pixels = [preprocess(load_rgb(image)) for image in images]  # each (3, S, S)
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.stack(pixels[start : start + batch_size]).to(device, dtype)
        out.append(model.encode_image(batch, normalize=normalize).float())
    return torch.cat(out)  # (B, D)


@torch.no_grad()
def encode_text_pooled(model: ClipModel, token_ids: torch.Tensor) -> torch.Tensor:
    """The HF text tower's pooled output before its projection: (N, D_text).

    token_ids: (N, T) from the model's tokenizer. ``model.text.proj(pooled)`` equals
    ``model.encode_text(token_ids)`` (tested). Training with a frozen encoder precomputes this
    once per caption. Runs the encoder in eval mode (no dropout).
    """
    text = model.text
    if not hasattr(text, "pooler") or not hasattr(text, "transformer"):
        raise ValueError(
            f"encode_text_pooled needs an open_clip HFTextEncoder text tower, received "
            f"{type(text).__name__}"
        )
    was_training = text.training
    text.eval()
    try:
        mask = (token_ids != text.config.pad_token_id).long()  # as HFTextEncoder.forward
        out = text.transformer(input_ids=token_ids, attention_mask=mask)
        return text.pooler(out, mask)
    finally:
        text.train(was_training)


# Prompt templates for zero-shot heads, in the register of ShapeWorld's captions. "a {}" becomes
# "an {}" before a vowel (as the captions write it).
TEMPLATES: tuple[str, ...] = (
    "a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "the image shows a {}.",
    "there is a {}.",
    "a {} shape.",
    "a {} on a plain background.",
    "an image with a {} in it.",
)

_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _fill(template: str, name: str) -> str:
    return _ARTICLE.sub(r"\1n ", template.format(name))


@torch.no_grad()
def text_classifier(
    model: ClipModel,
    tokenizer: Any,
    names: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
) -> torch.Tensor:
    """Zero-shot class embeddings: (N, D) on the model's device, float32, unit-norm rows.

    Each name is put in every template, the normalised text embeddings are averaged over the
    templates and normalised again (CLIP's prompt ensembling).
    """
    if not names:
        raise ValueError("names is empty; expected at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be non-empty strings with a '{{}}', received {templates}")
    device, _ = _model_device_dtype(model)
    texts = [_fill(t, n) for n in names for t in templates]
    ids = tokenizer(texts).to(device)  # (N * T, L)
    emb = model.encode_text(ids, normalize=True).float()  # (N * T, D)
    emb = emb.reshape(len(names), len(templates), -1).mean(dim=1)  # (N, D)
    return F.normalize(emb, dim=-1)


# --------------------------------------------------------------------------------------------
# Object crops (zero-shot region classification; region-caption training pairs)
# --------------------------------------------------------------------------------------------

CropKind = Literal["masked", "box"]
BOX_MARGIN = 0.25  # box crops: fraction of the box side added on every side


def object_crop(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    fill: Sequence[int] | np.ndarray,
    crop: CropKind = "masked",
) -> Image.Image:
    """One object as a size x size RGB image (see the module docstring for the two protocols).

    image: (H, W, 3) uint8 scene; mask: (H, W) bool visible pixels of the object (non-empty);
    fill: RGB background colour for everything that is not the object (masked crops).
    """
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(
            f"expected image (H, W, 3) and mask (H, W), received {image.shape} and {mask.shape}"
        )
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("the object's mask is empty")
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    h, w = image.shape[:2]
    if crop == "box":
        side = max(y1 - y0, x1 - x0) * (1 + 2 * BOX_MARGIN)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        # PIL pads outside the image with black; clamp the box to the image instead.
        left, top = max(0.0, box[0]), max(0.0, box[1])
        right, bottom = min(float(w), box[2]), min(float(h), box[3])
        region = Image.fromarray(image).crop((round(left), round(top), round(right), round(bottom)))
        return region.resize((size, size), Image.Resampling.BICUBIC)
    if crop != "masked":
        raise ValueError(f"crop must be 'masked' or 'box', received {crop!r}")
    colour = np.asarray(fill, dtype=np.uint8).reshape(1, 1, 3)
    cut = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], colour)  # (h', w', 3)
    piece = Image.fromarray(np.ascontiguousarray(cut))
    scale = size / min(h, w)  # what the model's resize does to the whole scene
    pw, ph = max(1, round(piece.width * scale)), max(1, round(piece.height * scale))
    if max(pw, ph) > size:  # never larger than the canvas
        shrink = size / max(pw, ph)
        pw, ph = max(1, int(pw * shrink)), max(1, int(ph * shrink))
    if (pw, ph) != piece.size:
        piece = piece.resize((pw, ph), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in colour.ravel()))
    canvas.paste(piece, ((size - pw) // 2, (size - ph) // 2))
    return canvas


def background_fill(image: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """(3,) uint8 mean colour of the pixels no object covers (all pixels if objects cover all).

    image: (H, W, 3) uint8; objects: (H, W) bool union of the objects' masks.
    """
    free = ~objects
    pixels = image[free] if free.any() else image.reshape(-1, 3)
    return np.round(pixels.mean(axis=0)).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Dense features
# --------------------------------------------------------------------------------------------


@dataclass
class DenseFeatures:
    """Per-location image features of a CLIP image tower."""

    tokens: torch.Tensor  # (B, h*w, D_vis) final-layer features, row-major over the grid
    projected: torch.Tensor  # (B, D, h, w) each location through the tower's head (not normed)
    cls_token: torch.Tensor | None = None  # (B, D_vis) ViT class token before the head, else None

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the dense map."""
        return int(self.projected.shape[2]), int(self.projected.shape[3])


def visual_head(model: ClipModel, features: torch.Tensor) -> torch.Tensor:
    """The image tower's head applied to feature vectors: (N, D_vis) -> (N, D).

    ViT: ``ln_post`` then ``proj``. timm (ConvNeXt): the trunk's head on a 1x1 map (global pool
    is the identity there; then its norm), then open_clip's projection head.
    """
    visual = model.visual
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D_vis), received shape {tuple(features.shape)}")
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise ValueError("dense features are not defined for ViTs with an attentional pooler")
        x = visual.ln_post(features)
        return x @ visual.proj if visual.proj is not None else x
    if isinstance(visual, TimmModel):
        if "pool" in visual.head._modules:
            raise ValueError(
                "dense features are not defined for timm towers with attention pooling "
                f"({type(visual.head.pool).__name__})"
            )
        x = visual.trunk.forward_head(features[:, :, None, None])  # (N, C) via 1x1 map
        return visual.head(x)
    raise _unsupported_tower(visual)


def _unsupported_tower(visual: Any) -> ValueError:
    return ValueError(
        "dense features need an open_clip VisionTransformer or TimmModel (ConvNeXt) image tower, "
        f"received {type(visual).__name__}"
    )


def window_attention_mask(
    grid: tuple[int, int], window: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive (1 + h*w, 1 + h*w) attention mask over [class token, patches in row-major order]:
    a patch attends to the patches at most ``window // 2`` rows and columns away, the class token
    to everything, no patch to the class token. 0 where allowed, -inf elsewhere."""
    if window < 1 or window % 2 == 0:
        raise ValueError(
            f"window must be an odd number >= 1 (patches per side, centred on each patch), "
            f"received {window}"
        )
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    r = window // 2
    near = ((rows[:, None] - rows[None]).abs() <= r) & ((cols[:, None] - cols[None]).abs() <= r)
    allowed = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.bool)
    allowed[0] = True
    allowed[1:, 1:] = near
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, float("-inf"))


def supports_window(model: ClipModel) -> bool:
    """Whether ``dense_features(model, ..., window=k)`` can run: a ViT image tower."""
    return isinstance(model.visual, VisionTransformer)


def dense_features(model: ClipModel, images: torch.Tensor, window: int = 0) -> DenseFeatures:
    """Patch / location features of preprocessed images (B, 3, H, W); see the module docstring.

    window: 0 = the tower as trained (global attention); an odd k >= 1 = local features, each
    patch attending to the k x k neighbourhood centred on it in every block
    (``window_attention_mask``; ViT towers only).
    Runs under the caller's grad mode (segmentation training may backpropagate into it). Call
    the model in eval mode: patch dropout would remove tokens.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), received shape {tuple(images.shape)}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 = global attention), received {window}")
    visual = model.visual
    b, _, height, width = images.shape
    if window and not supports_window(model):
        raise ValueError(
            f"window={window} (local attention) needs a ViT image tower, received "
            f"{type(visual).__name__}; use window=0"
        )
    if isinstance(visual, VisionTransformer):
        ph, pw = visual.patch_size
        h, w = height // ph, width // pw
        if window:
            x = visual._embeds(images)  # class token + patches, position embedded, ln_pre
            if x.shape[1] != 1 + h * w:
                raise ValueError(
                    f"expected 1 + {h}x{w} tokens for {height}x{width} input, received "
                    f"{x.shape[1]} (patch dropout active? call model.eval())"
                )
            attn = window_attention_mask((h, w), window, x.dtype).to(x.device)
            x = visual.transformer(x, attn_mask=attn)
            tokens, cls = x[:, 1:], x[:, 0]  # before ln_post, as below
        else:
            out = visual.forward_intermediates(
                images,
                indices=1,
                output_fmt="NLC",
                output_extra_tokens=True,
                intermediates_only=True,
            )
            tokens = out["image_intermediates"][-1]  # (B, h*w, D_vis), before ln_post
            cls = out["image_intermediates_prefix"][-1][:, 0]  # (B, D_vis)
        if tokens.shape[1] != h * w:
            raise ValueError(
                f"expected {h}x{w}={h * w} patch tokens for {height}x{width} input, received "
                f"{tokens.shape[1]} (patch dropout active? call model.eval())"
            )
    elif isinstance(visual, TimmModel):
        fmap = visual.trunk.forward_features(images)
        if fmap.ndim != 4:
            raise ValueError(
                f"expected a (B, C, h, w) feature map from {type(visual.trunk).__name__}."
                f"forward_features, received shape {tuple(fmap.shape)}"
            )
        h, w = fmap.shape[2], fmap.shape[3]
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = None
    else:
        raise _unsupported_tower(visual)
    proj = visual_head(model, tokens.reshape(b * h * w, -1))  # (B*h*w, D)
    projected = proj.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, D, h, w)
    return DenseFeatures(tokens=tokens, projected=projected, cls_token=cls)


def pooled_from_dense(model: ClipModel, dense: DenseFeatures) -> torch.Tensor:
    """The image embedding (B, D) recomputed from dense features as the tower pools.

    ViT "tok": head(class token); ViT "avg": mean of the projected tokens (ln_post is per token
    and proj is linear); timm: head(mean of the feature map). Equals model.encode_image.
    """
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        if visual.pool_type == "tok":
            if dense.cls_token is None:
                raise ValueError("a ViT with pool_type 'tok' needs dense.cls_token")
            return visual_head(model, dense.cls_token)
        if visual.pool_type == "avg" and not visual.final_ln_after_pool:
            return dense.projected.mean(dim=(2, 3))
        raise ValueError(
            f"pooled_from_dense supports ViT pool_type 'tok' and 'avg', received "
            f"{visual.pool_type!r} (final_ln_after_pool={visual.final_ln_after_pool})"
        )
    return visual_head(model, dense.tokens.mean(dim=1))


def weighted_pool(model: ClipModel, dense: DenseFeatures, weights: torch.Tensor) -> torch.Tensor:
    """Embeddings (B, ..., D) of the dense map averaged under `weights` (B, ..., h*w), each
    weighting summing to 1 over locations, pooled the way the tower pools its image:

    - ViT ("avg" or "tok"): the weighted mean of the projected tokens (the head is per token and
      its projection linear; for "avg" towers uniform weights give ``encode_image`` exactly);
    - timm (ConvNeXt): the head applied to the weighted mean of the raw feature map (FC-CLIP's
      and Mask-Adapter's mask pooling; uniform weights give ``encode_image``).
    """
    b, p = dense.tokens.shape[:2]
    if weights.shape[0] != b or weights.shape[-1] != p:
        raise ValueError(
            f"weights must be (B, ..., h*w) = ({b}, ..., {p}), received {tuple(weights.shape)}"
        )
    flat = weights.reshape(b, -1, p)
    if isinstance(model.visual, VisionTransformer):
        projected = dense.projected.flatten(2).transpose(1, 2).to(flat.dtype)  # (B, P, D)
        out = torch.bmm(flat, projected)
    else:
        pooled = torch.bmm(flat, dense.tokens.to(flat.dtype))  # (B, N, D_vis)
        out = visual_head(model, pooled.reshape(-1, pooled.shape[-1])).reshape(b, flat.shape[1], -1)
    return out.reshape(*weights.shape[:-1], out.shape[-1])


def clip_from_preset(preset: ClipPresetConfig) -> ClipBundle:
    """A preset's CLIP: its checkpoint, else the random tower of ``preset.model`` from seed 0
    (frozen and never saved, so whoever builds it again gets the same tower)."""
    if preset.checkpoint:
        return load_clip(project_path(preset.checkpoint))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_clip(preset.model)
