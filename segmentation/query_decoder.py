"""A Mask2Former-style class-agnostic mask decoder on a frozen CLIP, with PMP text cross-attention.

    decoder = QueryDecoder(QueryDecoderConfig(vis_dim=256, grid=16, pmp=True))
    dense = dense_features(clip, pixels)                         # vision.clip, frozen
    prompt = encode_prompts(clip, tokenizer, [["circle", "star"]])   # PMP only
    out = decoder(dense.tokens, pixels, prompt)   # mask_logits (L+1, B, N, 4h, 4w), objectness
    losses = set_criterion(out, targets)          # Hungarian matching + BCE/dice/objectness
    proposer = QueryMaskProposer(clip, tokenizer, decoder)
    masks, scores = proposer.propose(image, prompt=["circle", "star"])   # (M, H, W) bool, (M,)

The proposals plug in wherever SAM's automatic masks go (``segmentation.open_vocab``:
``OpenVocabSegmenter.segment(image, vocabulary, masks=masks)``, ``save_mask_lists``).

Architecture (Mask2Former, Cheng et al. 2022, ``mask2former/modeling/transformer_decoder/
mask2former_transformer_decoder.py``; PMP, REFERENCE.md):

1. Pixel decoder: a simple feature pyramid (ViTDet, Li et al. 2022) on the final-block CLIP ViT
   patch tokens (B, h*w, D_vis): transposed convs upsample the h x w grid by the factors in
   ``attn_factors`` (default 1, 2: 16x16 and 32x32 for our 128 px CLIP) to the levels the
   queries attend to, and by ``mask_factor`` (4: 64x64) to the per-pixel *mask features*. A ViT
   has a single 1/8 scale; the pyramid is how Mask2Former-on-ViT decoders get several. Optional
   (``stem_channels`` > 0): a two-conv stem on the CLIP input pixels, added at the mask level --
   ViT-Adapter's "spatial prior" module, because 8x8 patch tokens alone blur object boundaries
   at 64x64 (the shapes are 6-28 px in radius). A learned projection of the 2-D sine encoding
   is added to the mask features (CondInst's / SOLO's coordinate features): without it the
   dot-product head lit up every pixel that looked like its object and merged neighbours
   (recall@0.5 on 100 val images after the same 500 steps: 54 % without, 68 % with).
2. N learned queries (content + positional embeddings, as Mask2Former) and L layers; layer i
   attends to level i mod len(levels) (round-robin, low resolution first) through **masked
   cross-attention**: a query sees only the pixels where the previous prediction's mask is
   > 0.5 (``attention_mask``), and a query whose mask is empty at that level sees every pixel
   (Mask2Former's fallback, without which the softmax has no keys). Then, with PMP, a
   **cross-attention to the prompt's text tokens** (keys/values = the frozen MiniLM token states
   of the prompt strings, projected; no attention mask), then self-attention among the queries,
   then an FFN. Post-norm residual blocks with dropout 0, as Mask2Former.
3. A prediction head after the initial queries and after every layer (deep supervision): mask
   logits = MLP(norm(q)) . mask features (64x64), objectness logits (object, no-object).

``cfg.pmp`` switches the text branch: with ``pmp=False`` the text modules are not built (every
other parameter is the same, so the ablation compares the same architecture with and without the
text cross-attention) and any prompt passed in is ignored, so a pipeline can call both decoders
the same way. With ``pmp=True`` a prompt is required.

Built from torch.nn.MultiheadAttention, nn.LayerNorm, convs and timm's LayerNorm2d. Written by
hand here, as glue: the sine positional encoding (DETR's), the attention-mask rule, the layer
order, the Hungarian matcher's cost (Mask2Former's ``HungarianMatcher``: objectness, sigmoid BCE
and dice costs; ``scipy.optimize.linear_sum_assignment``) and the losses. Why not reuse
transformers' ``Mask2FormerMaskedAttentionDecoder``: its layer has no slot for a text
cross-attention (PMP would mean subclassing its internals), it expects a ``Mask2FormerConfig`` and
its own pixel-level module, and its matcher/loss are point-sampled and class-based; a ~300-line
decoder written from standard blocks is easier to read than a patched one.

Losses (``set_criterion``): per prediction (initial + every layer), per image, Hungarian matching
with cost 2 x (-p(object)) + 5 x BCE + 5 x dice (Mask2Former's weights), computed at the mask
feature resolution on area-averaged (soft) targets -- the full 64x64 grid instead of Mask2Former's
12544 sampled points, which is cheaper at this size. Then sigmoid BCE + dice on the matched masks
(normalised by the number of target masks in the batch) and the objectness cross-entropy over all
queries (matched = object, the rest = no-object, weighted 0.1 as Mask2Former's ``eos_coef``);
weights 2 / 5 / 5, summed over the L + 1 predictions.

Proposals (``QueryMaskProposer.propose``): the last prediction's mask logits upsampled (bilinear)
to the image, > 0; score = p(object) x mean sigmoid inside the mask (Mask2Former's instance
score); masks scoring under ``score_threshold`` or smaller than ``min_area`` pixels dropped;
greedy mask NMS (IoU > ``nms_iou``) in score order; returned largest first, as
``segmentation.open_vocab.sam_proposals`` returns SAM's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from timm.layers import LayerNorm2d
from torch import nn

from core.checkpoint import load_module, save_module
from core.config import Config
from segmentation.mask_adapter import mask_iou_matrix
from segmentation.open_vocab import whole_image_pixels
from vision.clip import ClipModel, dense_features

__all__ = [
    "LossWeights",
    "PromptTokens",
    "QueryDecoder",
    "QueryDecoderConfig",
    "QueryDecoderOutput",
    "QueryMaskProposer",
    "attention_mask",
    "dice_loss",
    "encode_prompts",
    "hungarian_match",
    "load_decoder",
    "mask_nms",
    "match_costs",
    "pack_prompts",
    "prompt_token_states",
    "save_decoder",
    "set_criterion",
]


@dataclass
class QueryDecoderConfig(Config):
    """Sizes of one query decoder; stored in its checkpoint manifest."""

    vis_dim: int = 256  # D_vis: channels of the CLIP ViT patch tokens (the decoder's input)
    grid: int = 16  # h = w of the CLIP patch grid (128 px / patch 8)
    hidden: int = 128  # d: query, attention and pyramid-level width
    mask_dim: int = 64  # channels of the per-pixel mask features (and of the mask embeddings)
    queries: int = 16  # N learned queries (ShapeWorld images hold at most 7 objects)
    layers: int = 6  # L decoder layers (Mask2Former: 9)
    heads: int = 4  # attention heads (d must be a multiple)
    ffn: int = 512  # FFN hidden size
    attn_factors: tuple[int, ...] = (1, 2)  # upsampling of the grid for the attended levels
    mask_factor: int = 4  # upsampling of the grid for the mask features (16 -> 64)
    stem_channels: int = 32  # image stem width added at the mask level; 0 = tokens only
    pmp: bool = False  # PMP: cross-attention from the queries to the prompt's text tokens
    text_dim: int = 384  # D_text: width of the frozen text encoder's token states (MiniLM)

    def __post_init__(self) -> None:
        for name in ("vis_dim", "grid", "hidden", "mask_dim", "queries", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(
                f"hidden must be a multiple of heads, received hidden={self.hidden}, "
                f"heads={self.heads}"
            )
        factors = (*self.attn_factors, self.mask_factor)
        if not self.attn_factors or any(f not in (1, 2, 4, 8) for f in factors):
            raise ValueError(
                f"attn_factors (non-empty) and mask_factor must be in 1, 2, 4, 8, received "
                f"{self.attn_factors} and {self.mask_factor}"
            )
        if self.stem_channels < 0 or self.text_dim < 1 or self.ffn < 1:
            raise ValueError(
                f"stem_channels must be >= 0, text_dim and ffn >= 1, received "
                f"{self.stem_channels}, {self.text_dim}, {self.ffn}"
            )


# --------------------------------------------------------------------------------------------
# Prompts: frozen MiniLM token states
# --------------------------------------------------------------------------------------------


@dataclass
class PromptTokens:
    """The text tokens of one prompt per image, padded to a common length."""

    states: torch.Tensor  # (B, T, D_text) frozen text-encoder token states
    padding: torch.Tensor  # (B, T) bool, True = padding (no key there)


@torch.no_grad()
def prompt_token_states(
    clip: ClipModel, tokenizer: Any, texts: Sequence[str]
) -> list[torch.Tensor]:
    """Each text's token states from the CLIP's frozen HF text encoder (MiniLM): (T_i, D_text)
    per text, every non-padding token ([CLS] and [SEP] included), float32 on CPU.

    Each string is encoded on its own, so a class name's states do not depend on the other names
    of a vocabulary (and are computed once per name in training).
    """
    text = clip.text
    if not hasattr(text, "transformer") or not hasattr(text, "config"):
        raise ValueError(
            "PMP prompts need an open_clip HFTextEncoder text tower (model.text.transformer), "
            f"received {type(text).__name__}"
        )
    if not texts:
        return []
    device = next(text.parameters()).device
    ids = tokenizer(list(texts)).to(device)  # (S, L)
    keep = ids != text.config.pad_token_id
    was_training = text.training
    text.eval()
    try:
        states = text.transformer(input_ids=ids, attention_mask=keep.long()).last_hidden_state
    finally:
        text.train(was_training)
    return [s[k].float().cpu() for s, k in zip(states, keep, strict=True)]


def pack_prompts(per_image: Sequence[Sequence[torch.Tensor]]) -> PromptTokens:
    """Per image, the token states (T_i, D_text) of its prompt strings -> one padded batch; an
    image's strings are concatenated (a vocabulary = its names' tokens one after another)."""
    if not per_image:
        raise ValueError("no prompts: expected one list of token states per image")
    seqs = [torch.cat(list(states)) if len(states) else None for states in per_image]
    for i, s in enumerate(seqs):
        if s is None or len(s) == 0:
            raise ValueError(f"image {i} has an empty prompt; PMP needs at least one token")
    assert all(s is not None for s in seqs)
    tokens = [s for s in seqs if s is not None]
    t = max(len(s) for s in tokens)
    states = torch.zeros(len(tokens), t, tokens[0].shape[-1])
    padding = torch.ones(len(tokens), t, dtype=torch.bool)
    for i, s in enumerate(tokens):
        states[i, : len(s)] = s
        padding[i, : len(s)] = False
    return PromptTokens(states, padding)


def encode_prompts(
    clip: ClipModel, tokenizer: Any, prompts: Sequence[str | Sequence[str]]
) -> PromptTokens:
    """One prompt per image: a referring phrase (str) or a vocabulary (list of names)."""
    lists = [[p] if isinstance(p, str) else list(p) for p in prompts]
    flat = [t for texts in lists for t in texts]
    states = prompt_token_states(clip, tokenizer, flat)
    out, i = [], 0
    for texts in lists:
        out.append(states[i : i + len(texts)])
        i += len(texts)
    return pack_prompts(out)


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------


def sine_position_encoding(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """DETR's normalised 2-D sine encoding: (h*w, dim), y features then x features."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, received {dim}")
    scale = 2 * math.pi
    eps = 1e-6
    y = (torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + eps) * scale)[:, None]
    x = (torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + eps) * scale)[None]
    npf = dim // 2
    t = 10000 ** (2 * (torch.arange(npf, device=device) // 2) / npf)  # (npf,)
    py = y.expand(h, w)[..., None] / t  # (h, w, npf)
    px = x.expand(h, w)[..., None] / t
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=-1).flatten(2)
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=-1).flatten(2)
    return torch.cat((py, px), dim=-1).reshape(h * w, dim)


def _upsampler(channels: int, factor: int) -> tuple[nn.Module, int]:
    """ViTDet's simple-feature-pyramid upsampling by `factor`: 2x2 stride-2 transposed convs
    halving the channels each time (LN + GELU between). Returns the module and its output width."""
    layers: list[nn.Module] = []
    c = channels
    for i in range(int(math.log2(factor))):
        if i:
            layers += [LayerNorm2d(c), nn.GELU()]
        layers.append(nn.ConvTranspose2d(c, c // 2, 2, stride=2))
        c //= 2
    return (nn.Sequential(*layers) if layers else nn.Identity()), c


class PixelDecoder(nn.Module):
    """CLIP ViT tokens (+ optional pixels) -> attended levels and per-pixel mask features."""

    def __init__(self, cfg: QueryDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.vis_dim)
        self.levels = nn.ModuleList()
        for factor in cfg.attn_factors:
            up, c = _upsampler(cfg.vis_dim, factor)
            self.levels.append(
                nn.Sequential(
                    up,
                    nn.Conv2d(c, cfg.hidden, 1),
                    LayerNorm2d(cfg.hidden),
                    nn.Conv2d(cfg.hidden, cfg.hidden, 3, padding=1),
                    LayerNorm2d(cfg.hidden),
                )
            )
        up, c = _upsampler(cfg.vis_dim, cfg.mask_factor)
        self.mask_up = nn.Sequential(up, nn.Conv2d(c, cfg.mask_dim, 1), LayerNorm2d(cfg.mask_dim))
        self.stem: nn.Module | None = None
        if cfg.stem_channels:
            s = cfg.stem_channels
            self.stem = nn.Sequential(
                nn.Conv2d(3, s, 3, stride=2, padding=1),
                LayerNorm2d(s),
                nn.GELU(),
                nn.Conv2d(s, s, 3, padding=1),
                LayerNorm2d(s),
                nn.GELU(),
                nn.Conv2d(s, cfg.mask_dim, 1),
            )
        # coordinates at the mask level (CondInst / SOLO's CoordConv): lets the dot-product head
        # localise a mask instead of lighting up every pixel that looks like its object
        self.mask_pos = nn.Conv2d(cfg.mask_dim, cfg.mask_dim, 1)
        self.mask_out = nn.Sequential(
            nn.Conv2d(cfg.mask_dim, cfg.mask_dim, 3, padding=1),
            LayerNorm2d(cfg.mask_dim),
            nn.GELU(),
            nn.Conv2d(cfg.mask_dim, cfg.mask_dim, 1),
        )

    def forward(
        self, tokens: torch.Tensor, pixels: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """tokens (B, h*w, D_vis), pixels (B, 3, S, S) or None (required with a stem) ->
        levels [(B, d, f*h, f*w) per attn factor] and mask features (B, mask_dim, 4h, 4w)."""
        b, p, c = tokens.shape
        g = self.cfg.grid
        if p != g * g or c != self.cfg.vis_dim:
            raise ValueError(
                f"tokens must be (B, {g * g}, {self.cfg.vis_dim}) (a {g}x{g} grid of D_vis "
                f"features), received {tuple(tokens.shape)}"
            )
        x = self.norm(tokens).transpose(1, 2).reshape(b, c, g, g)  # (B, D_vis, h, w)
        levels = [level(x) for level in self.levels]
        mask = self.mask_up(x)  # (B, mask_dim, 4h, 4w)
        if self.stem is not None:
            if pixels is None:
                raise ValueError("this decoder has an image stem: pass the CLIP input pixels")
            if pixels.ndim != 4 or pixels.shape[:2] != (b, 3):
                raise ValueError(f"pixels must be (B={b}, 3, S, S), received {tuple(pixels.shape)}")
            prior = self.stem(pixels.to(mask.dtype))
            if prior.shape[-2:] != mask.shape[-2:]:
                prior = F.interpolate(prior, mask.shape[-2:], mode="bilinear", antialias=True)
            mask = mask + prior
        h, w = mask.shape[-2:]
        pos = sine_position_encoding(h, w, self.cfg.mask_dim, mask.device)  # (h*w, mask_dim)
        mask = mask + self.mask_pos(pos.T.reshape(1, -1, h, w).to(mask.dtype))
        return levels, self.mask_out(mask)


def attention_mask(mask_logits: torch.Tensor, size: tuple[int, int], heads: int) -> torch.Tensor:
    """Mask2Former's masked-attention mask from the previous prediction.

    mask_logits (B, N, H, W) -> bool (B * heads, N, h*w) at the attended level's size, True =
    *not* attended: pixels where sigmoid(resized logits) < 0.5. A query whose mask is empty at
    that level attends everywhere (its row is all False), as in Mask2Former.
    """
    resized = F.interpolate(mask_logits.detach().float(), size, mode="bilinear")
    blocked = resized.sigmoid().flatten(2) < 0.5  # (B, N, h*w)
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)  # empty-mask fallback
    return blocked.repeat_interleave(heads, dim=0)


class DecoderLayer(nn.Module):
    """Masked cross-attention to pixels, [PMP: cross-attention to text], self-attention, FFN."""

    def __init__(self, d: int, heads: int, ffn: int, pmp: bool) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(d)
        self.text_attn = nn.MultiheadAttention(d, heads, batch_first=True) if pmp else None
        self.text_norm = nn.LayerNorm(d) if pmp else None
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Linear(ffn, d))
        self.ffn_norm = nn.LayerNorm(d)

    def forward(
        self,
        q: torch.Tensor,  # (B, N, d) queries
        q_pos: torch.Tensor,  # (B, N, d) query positional embeddings
        memory: torch.Tensor,  # (B, h*w, d) pixel features of this level (+ level embedding)
        memory_pos: torch.Tensor,  # (h*w, d) sine position encoding
        attn_mask: torch.Tensor,  # (B * heads, N, h*w) bool, True = blocked
        text: torch.Tensor | None = None,  # (B, T, d) projected prompt tokens (PMP)
        text_padding: torch.Tensor | None = None,  # (B, T) bool, True = padding
    ) -> torch.Tensor:
        x, _ = self.cross_attn(
            q + q_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False
        )
        q = self.cross_norm(q + x)
        if self.text_attn is not None and self.text_norm is not None:
            if text is None:
                raise ValueError("a PMP layer needs the prompt's text tokens")
            x, _ = self.text_attn(
                q + q_pos, text, text, key_padding_mask=text_padding, need_weights=False
            )
            q = self.text_norm(q + x)
        x, _ = self.self_attn(q + q_pos, q + q_pos, q, need_weights=False)
        q = self.self_norm(q + x)
        return self.ffn_norm(q + self.ffn(q))


@dataclass
class QueryDecoderOutput:
    mask_logits: torch.Tensor  # (L + 1, B, N, Hm, Wm): initial queries, then every layer
    objectness: torch.Tensor  # (L + 1, B, N, 2) logits: [object, no-object]

    @property
    def last(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final prediction: mask logits (B, N, Hm, Wm), objectness logits (B, N, 2)."""
        return self.mask_logits[-1], self.objectness[-1]


class QueryDecoder(nn.Module):
    """Class-agnostic Mask2Former decoder on frozen CLIP ViT tokens; PMP when ``cfg.pmp``."""

    def __init__(self, cfg: QueryDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.pixel_decoder = PixelDecoder(cfg)
        self.level_embed = nn.Parameter(torch.zeros(len(cfg.attn_factors), d))
        # N(0, 1) as Mask2Former's nn.Embedding: distinct queries from the start (at 0.02 the
        # positional part vanished next to the unit-scale normed content and training crawled)
        self.query_feat = nn.Parameter(torch.randn(cfg.queries, d))
        self.query_pos = nn.Parameter(torch.randn(cfg.queries, d))
        self.text_proj = (
            nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
            if cfg.pmp
            else None
        )
        self.layers = nn.ModuleList(
            [DecoderLayer(d, cfg.heads, cfg.ffn, cfg.pmp) for _ in range(cfg.layers)]
        )
        self.out_norm = nn.LayerNorm(d)
        self.mask_embed = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, cfg.mask_dim)
        )
        self.objectness = nn.Linear(d, 2)

    def _predict(
        self, q: torch.Tensor, mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out_norm(q)
        masks = torch.einsum("bnc,bchw->bnhw", self.mask_embed(x), mask_features)
        return masks, self.objectness(x)

    def forward(
        self,
        tokens: torch.Tensor,
        pixels: torch.Tensor | None = None,
        prompt: PromptTokens | None = None,
    ) -> QueryDecoderOutput:
        """tokens (B, h*w, D_vis): CLIP ViT patch tokens (``DenseFeatures.tokens``); pixels
        (B, 3, S, S): the CLIP input (needed with an image stem); prompt: PMP text tokens, one
        prompt per image (required when ``cfg.pmp``, ignored otherwise)."""
        levels, mask_features = self.pixel_decoder(tokens, pixels)
        b = tokens.shape[0]
        memories, positions = [], []
        for i, level in enumerate(levels):
            h, w = level.shape[-2:]
            memories.append(level.flatten(2).transpose(1, 2) + self.level_embed[i])  # (B, hw, d)
            positions.append(sine_position_encoding(h, w, self.cfg.hidden, level.device))
        text = text_padding = None
        if self.text_proj is not None:
            if prompt is None:
                raise ValueError("this decoder was built with pmp=True: pass a prompt per image")
            if prompt.states.shape[0] != b or prompt.states.shape[-1] != self.cfg.text_dim:
                raise ValueError(
                    f"prompt states must be (B={b}, T, {self.cfg.text_dim}), received "
                    f"{tuple(prompt.states.shape)}"
                )
            text = self.text_proj(prompt.states.to(tokens.device, mask_features.dtype))
            text_padding = prompt.padding.to(tokens.device)
        q = self.query_feat[None].expand(b, -1, -1)
        q_pos = self.query_pos[None].expand(b, -1, -1)
        masks, obj = self._predict(q, mask_features)
        all_masks, all_obj = [masks], [obj]
        for i, layer in enumerate(self.layers):
            level = i % len(levels)  # round-robin over the levels, low resolution first
            size = (levels[level].shape[-2], levels[level].shape[-1])
            blocked = attention_mask(masks, size, self.cfg.heads)
            q = layer(q, q_pos, memories[level], positions[level], blocked, text, text_padding)
            masks, obj = self._predict(q, mask_features)
            all_masks.append(masks)
            all_obj.append(obj)
        return QueryDecoderOutput(torch.stack(all_masks), torch.stack(all_obj))


# --------------------------------------------------------------------------------------------
# Matching and losses
# --------------------------------------------------------------------------------------------


@dataclass
class LossWeights:
    """Mask2Former's loss and matching-cost weights."""

    objectness: float = 2.0
    bce: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1  # eos_coef: weight of the no-object class in the objectness CE


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sum over masks of 1 - (2 sum(s t) + 1) / (sum s + sum t + 1), s = sigmoid(logits), divided
    by ``num_masks``. logits, targets (M, P) (targets in [0, 1])."""
    s = logits.sigmoid()
    numerator = 2 * (s * targets).sum(-1)
    denominator = s.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def match_costs(
    mask_logits: torch.Tensor,
    obj_logits: torch.Tensor,
    targets: torch.Tensor,
    weights: LossWeights,
) -> torch.Tensor:
    """Mask2Former's matching cost (N, G) of predictions against targets of one image.

    mask_logits (N, P), obj_logits (N, 2), targets (G, P) in [0, 1]:
    objectness x (-p(object)) + bce x mean-pixel BCE + dice x (1 - dice coefficient).
    """
    x, t = mask_logits.float(), targets.float()
    p = x.shape[-1]
    pos = F.softplus(-x)  # BCE(x, 1) per pixel
    neg = F.softplus(x)  # BCE(x, 0)
    bce = (pos @ t.T + neg @ (1 - t).T) / p  # (N, G)
    s = x.sigmoid()
    dice = 1 - (2 * s @ t.T + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None] + 1)
    obj = -obj_logits.float().softmax(-1)[:, :1]  # (N, 1)
    return weights.objectness * obj + weights.bce * bce + weights.dice * dice


@torch.no_grad()
def hungarian_match(
    mask_logits: torch.Tensor,
    obj_logits: torch.Tensor,
    targets: torch.Tensor,
    weights: LossWeights | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The minimum-cost one-to-one assignment of N predictions to G <= N targets:
    (prediction rows, target columns), columns sorted."""
    if len(targets) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cost = match_costs(mask_logits, obj_logits, targets, weights or LossWeights())
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return rows.astype(np.int64), cols.astype(np.int64)


def set_criterion(
    out: QueryDecoderOutput,
    targets: Sequence[torch.Tensor],
    weights: LossWeights | None = None,
) -> dict[str, torch.Tensor]:
    """Hungarian-matched losses summed over every prediction (deep supervision).

    targets: per image, (G_i, Hm, Wm) masks in [0, 1] at the mask-feature resolution.
    Returns {"loss": total, and per term for the last prediction: "objectness", "bce", "dice"}.
    """
    w = weights or LossWeights()
    n_pred, b, n, hm, wm = out.mask_logits.shape
    if len(targets) != b:
        raise ValueError(f"expected {b} target stacks (one per image), received {len(targets)}")
    for t in targets:
        if t.ndim != 3 or t.shape[1:] != (hm, wm):
            raise ValueError(
                f"targets must be (G, {hm}, {wm}) (the mask-feature size), received "
                f"{tuple(t.shape)}"
            )
    num_masks = max(float(sum(len(t) for t in targets)), 1.0)
    class_weight = torch.tensor([1.0, w.no_object], device=out.objectness.device)
    total = out.mask_logits.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    # unbind, not indexing: the backward of x[k, i] writes into a zero tensor of x's full size
    all_masks = [m.unbind(0) for m in out.mask_logits.flatten(3).unbind(0)]
    for k in range(n_pred):
        obj_target = torch.ones(b, n, dtype=torch.long, device=out.objectness.device)  # no-object
        pred_masks, tgt_masks = [], []
        for i, t in enumerate(targets):
            logits = all_masks[k][i]  # (N, P)
            flat = t.flatten(1).to(logits)
            rows, cols = hungarian_match(logits, out.objectness[k, i], flat, w)
            obj_target[i, torch.from_numpy(rows)] = 0
            pred_masks.append(logits[torch.from_numpy(rows)])
            tgt_masks.append(flat[torch.from_numpy(cols)])
        obj = F.cross_entropy(out.objectness[k].flatten(0, 1), obj_target.flatten(), class_weight)
        x = torch.cat(pred_masks)
        y = torch.cat(tgt_masks)
        if len(x):
            bce = F.binary_cross_entropy_with_logits(x, y, reduction="none").mean(-1).sum()
            bce = bce / num_masks
            dice = dice_loss(x, y, num_masks)
        else:
            bce = dice = 0 * x.sum()
        total = total + w.objectness * obj + w.bce * bce + w.dice * dice
        if k == n_pred - 1:
            terms = {"objectness": obj.detach(), "bce": bce.detach(), "dice": dice.detach()}
    return {"loss": total, **terms}


# --------------------------------------------------------------------------------------------
# Proposals
# --------------------------------------------------------------------------------------------


def mask_nms(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on boolean masks (M, H, W): indices kept, best score first."""
    order = np.argsort(-scores, kind="stable")
    if len(order) == 0:
        return order
    iou = mask_iou_matrix(masks[order], masks[order])
    keep: list[int] = []
    for i in range(len(order)):
        if all(iou[i, j] <= iou_threshold for j in keep):
            keep.append(i)
    return order[keep]


@dataclass
class QueryMaskProposer:
    """Images -> class-agnostic mask proposals from a trained ``QueryDecoder`` on a frozen CLIP.

    A predictor, as ``SamAutomaticMaskGenerator`` is for SAM: it turns images (H, W, 3 uint8 or
    PIL) into the CLIP input, runs CLIP and the decoder, and post-processes (see module).
    """

    clip: ClipModel
    tokenizer: Any
    decoder: QueryDecoder
    score_threshold: float = 0.3  # p(object) x mean mask probability
    nms_iou: float = 0.7  # masks overlapping a better one more than this are dropped
    min_area: int = 4  # pixels, at the image's resolution
    _prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.clip.eval()
        self.decoder.eval()

    def _prompt_tokens(self, prompts: Sequence[str | Sequence[str]]) -> PromptTokens:
        lists = [[p] if isinstance(p, str) else list(p) for p in prompts]
        missing = sorted({t for texts in lists for t in texts} - set(self._prompt_cache))
        for t, s in zip(
            missing, prompt_token_states(self.clip, self.tokenizer, missing), strict=True
        ):
            self._prompt_cache[t] = s
        return pack_prompts([[self._prompt_cache[t] for t in texts] for texts in lists])

    @torch.no_grad()
    def propose_batch(
        self,
        images: Sequence[np.ndarray | Image.Image],
        prompts: Sequence[str | Sequence[str]] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: masks (M, H, W) bool at the image's size and scores (M,), largest first.

        prompts: one per image (a phrase, or a list of class names) -- required by a PMP
        decoder, ignored by one without PMP.
        """
        if not images:
            return []
        rgb = [
            np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else im for im in images
        ]
        for im in rgb:
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise ValueError(
                    f"expected (H, W, 3) uint8 RGB images, received {im.shape} {im.dtype}"
                )
        prompt = None
        if self.decoder.cfg.pmp:
            if prompts is None or len(prompts) != len(rgb):
                raise ValueError(
                    f"a PMP decoder needs one prompt per image: {len(rgb)} images, received "
                    f"{'no prompts' if prompts is None else f'{len(prompts)} prompts'}"
                )
            prompt = self._prompt_tokens(prompts)
        pixels = whole_image_pixels(self.clip, rgb)
        tokens = dense_features(self.clip, pixels).tokens
        device = next(self.decoder.parameters()).device
        out = self.decoder(tokens.to(device), pixels.to(device), prompt)
        mask_logits, obj = out.last
        p_obj = obj.float().softmax(-1)[..., 0].cpu()  # (B, N)
        results = []
        for i, im in enumerate(rgb):
            h, w = im.shape[:2]
            logits = F.interpolate(mask_logits[i : i + 1].float(), (h, w), mode="bilinear")[0]
            binary = logits > 0  # (N, H, W)
            area = binary.flatten(1).sum(-1)
            inside = (logits.sigmoid() * binary).flatten(1).sum(-1) / area.clamp_min(1)
            scores = (p_obj[i] * inside.cpu()).numpy()
            masks = binary.cpu().numpy()
            ok = (scores >= self.score_threshold) & (area.cpu().numpy() >= self.min_area)
            masks, scores = masks[ok], scores[ok]
            keep = mask_nms(masks, scores, self.nms_iou)
            masks, scores = masks[keep], scores[keep]
            by_area = np.argsort(-masks.sum(axis=(1, 2)), kind="stable")
            results.append((masks[by_area], scores[by_area].astype(np.float32)))
        return results

    def propose(
        self, image: np.ndarray | Image.Image, prompt: str | Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One image: masks (M, H, W) bool and scores (M,), largest first (as sam_proposals)."""
        return self.propose_batch([image], None if prompt is None else [prompt])[0]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_decoder(
    directory: str | os.PathLike[str],
    decoder: QueryDecoder,
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """A core.checkpoint folder: ``decoder.safetensors`` (fp16) + the config in the manifest."""
    return save_module(
        directory, "decoder", decoder, decoder.cfg.to_dict(), metadata, overwrite=overwrite
    )


def load_decoder(directory: str | os.PathLike[str]) -> QueryDecoder:
    """The query-decoder saved by ``save_decoder`` (sha256-checked, strict), fp32, eval mode."""
    source = f"{directory}/manifest.json config"
    return load_module(
        directory, "decoder", lambda c: QueryDecoder(QueryDecoderConfig.from_dict(c, source=source))
    )
