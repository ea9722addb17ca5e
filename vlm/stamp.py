"""STAMP on the Polychrome VLM: ``<seg>`` in a reply -> one mask pass over the cached prefix.

    stamp = StampVLM.from_pretrained("checkpoints/shapes/stamp")
    reply = stamp.reply([{"role": "user", "content": "Segment the red circle.", "images": [img]}])
    reply.text, reply.masks                       # masks: one (H, W) bool array per <seg>

How it follows the paper (segmentation/stamp.py has the mechanism and the loss):

- ``<seg>`` and ``<mask>`` get trainable input rows (PolychromeVLM.add_tokens); ``<seg>`` also gets
  an output row beside the frozen LM head, so the model itself decides to segment: its logit is
  appended to the vocabulary's, and the decoding loop here emits it like any token.
- Decoding keeps one KV cache. At each ``<seg>`` the cache (prefix + ``<seg>``) gets N mask
  tokens in one forward pass, read by the head, then cropped back, so the reply continues from the
  same cache; the prefix is never recomputed (`tokens_processed` counts what the LLM reads).
- LoRA adapters (peft) on the LLM are switched on only for the mask pass. Every other token,
  text-only or with images, goes through the VLM core as it is (the frozen LLM, with the core's
  image LoRA where the prompt holds an image, beside STAMP's in the mask pass): chat logits are
  bitwise the VLM core's (tests check it, on a core with and without an image LoRA).
- Trained: the LoRA weights, the mask head, the ``<seg>``/``<mask>`` rows, the ``<seg>`` output row
  and, when ``mask_merge > 0``, the projector of the finer mask grid. The VLM core (projector,
  image LoRA, CLIP, LLM) stays frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from peft import LoraConfig
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from transformers import DynamicCache

from core.checkpoint import CheckpointError, load_state_strict
from core.images import load_rgb
from segmentation.stamp import (
    MaskHead,
    StampConfig,
    grid_targets,
    mask_like_clip_input,
    mask_pass_attention,
    stamp_losses,
    upsample_logits,
)
from vision.clip import dense_features, supports_window
from vision.sam import predict_masks_batched, prepare_image, sam_from_preset
from vlm.model import PolychromeVLM, Projector
from vlm.specials import Special, VLMExtension, decode_with_specials

__all__ = [
    "MASK_TOKEN",
    "SEG_PROMPTS",
    "SEG_TOKEN",
    "StampReply",
    "StampVLM",
]

SEG_TOKEN = "<seg>"
MASK_TOKEN = "<mask>"
TENSOR_FILE = "stamp"  # <checkpoint>/stamp.safetensors beside vlm.safetensors
STAMP_ADAPTER = "default"  # the peft adapter name of STAMP's LoRA (peft's default; in saved keys)
# Instructions a segmentation request is phrased with in training ({} = the expression).
SEG_PROMPTS = (
    "Segment {}.",
    "Please segment {}.",
    "Where is {}? Show me its mask.",
    "Can you segment {} in this image?",
    "Highlight {}.",
    "Give me a mask of {}.",
)


@dataclass
class StampReply:
    """A reply: its text, and one mask per ``<seg>`` it emitted (on the last image)."""

    text: str
    masks: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    logits: list[npt.NDArray[np.float32]] = field(default_factory=list)  # (H, W) each


class StampVLM(VLMExtension):
    """A PolychromeVLM with STAMP's mask pass (module docstring)."""

    TENSOR_FILE = TENSOR_FILE
    OWN_TOKENS = (SEG_TOKEN, MASK_TOKEN)
    CONFIG = StampConfig
    config: StampConfig

    def __init__(self, vlm: PolychromeVLM, config: StampConfig, sam: Sam | None = None) -> None:
        super().__init__()
        self.vlm = vlm
        self.config = config
        self.seg_id, self.mask_id = vlm.add_tokens([SEG_TOKEN, MASK_TOKEN])
        self.own_tokens = (SEG_TOKEN, MASK_TOKEN)
        llm = vlm.llm
        hidden = int(llm.config.get_text_config().hidden_size)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
        )
        try:
            self._lora_params = vlm.add_adapter(lora, STAMP_ADAPTER)
        except ValueError as err:
            raise ValueError(f"lora_targets: {err}") from None
        # only STAMP's adapter trains in the LLM: the core's image LoRA, if any, stays frozen
        vlm.freeze_core()
        for p in self._lora_params:
            p.requires_grad_(True)
        self.seg_out = nn.Parameter(torch.zeros(hidden))  # the <seg> row beside the LM head
        self.seg_bias = nn.Parameter(torch.zeros(()))
        self.head: MaskHead | None = None
        self.mask_projector: Projector | None = None
        self.seg_proj: nn.Sequential | None = None
        self.sam: Sam | None = None
        if config.method == "stamp":
            self.head = MaskHead(hidden)
            if config.mask_merge:
                gh, gw = vlm.patch_grid
                if gh % config.mask_merge or gw % config.mask_merge:
                    raise ValueError(
                        f"mask_merge={config.mask_merge} does not divide the CLIP patch grid "
                        f"{gh}x{gw}"
                    )
                pm = vlm.config.projector.merge
                # CLIP's patch width: the core's projector reads pm x pm patches, of both
                # feature kinds when ProjectorConfig.features is "both"
                width = int(vlm.projector.norm.normalized_shape[0]) // (pm * pm * vlm.clip_passes)
                self.mask_projector = Projector(width, hidden, config.mask_merge)
                if config.mask_features == "local" and not supports_window(vlm.clip):
                    raise ValueError(
                        f"mask_features 'local' needs a ViT image tower, received "
                        f"{type(vlm.clip.visual).__name__}; use mask_features 'global'"
                    )
        elif config.method == "text4seg":
            labels = [vlm.tokenizer.encode(t, add_special_tokens=False) for t in ("0", "1")]
            if any(len(ids) != 1 for ids in labels):
                raise ValueError(f"text4seg needs '0' and '1' to be single tokens, got {labels}")
            self.label_ids = [ids[0] for ids in labels]
        else:  # lisa: the <seg> hidden state -> SAM prompt token (LISA's text_hidden_fcs)
            self.sam = sam if sam is not None else _load_sam(config)
            self.sam.image_encoder.requires_grad_(False)
            self.sam.prompt_encoder.requires_grad_(False)
            dim = int(self.sam.prompt_encoder.embed_dim)
            self.seg_proj = nn.Sequential(
                nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )
        # segmentation.stamp.StampConfig.mask_feature_norm: the norm mask features are rescaled
        # to, the median of the frozen LLM's input embedding rows (None: left as projected).
        self.feature_norm: float | None = None
        if config.mask_feature_norm == "embedding":  # only "stamp" may set it (StampConfig)
            rows = cast(torch.Tensor, llm.get_input_embeddings().weight).detach().float()
            self.feature_norm = float(rows.norm(dim=-1).median())
        self.to(vlm.device)
        self.tokens_processed = 0  # tokens the LLM has read (inputs of every forward)

    # -- LoRA switch ----------------------------------------------------------------------------

    def lora(self) -> AbstractContextManager[None]:
        """STAMP's LoRA on inside the block (the mask pass), beside the core's image LoRA where
        the pass reads an image; off again afterwards whatever happens."""
        return self.vlm.adapter(STAMP_ADAPTER)

    def train(self, mode: bool = True) -> StampVLM:
        super().train(mode)
        self.vlm.train(mode)  # keeps the frozen LLM in eval mode, STAMP's LoRA with it
        for name, module in self.vlm.llm.named_modules():
            if name.endswith(f"lora_dropout.{STAMP_ADAPTER}"):  # its dropout trains (config)
                module.train(mode)
        self.vlm.projector.eval()  # the VLM core's projector is frozen here
        if self.sam is not None:
            self.sam.image_encoder.eval()
            self.sam.prompt_encoder.eval()
        return self

    def _trained_modules(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module | None] = {
            "head": self.head,
            "mask_projector": self.mask_projector,
            "seg_proj": self.seg_proj,
            "sam_mask_decoder": None if self.sam is None else self.sam.mask_decoder,
        }
        return {k: v for k, v in parts.items() if v is not None}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What is trained (module docstring); the VLM core and SAM's encoders are left out."""
        params = list(self._lora_params)
        params += [self.vlm.added_embeddings, self.seg_out, self.seg_bias]
        for module in self._trained_modules().values():
            params += list(module.parameters())
        return params

    # -- saving ---------------------------------------------------------------------------------

    def stamp_state_dict(self) -> dict[str, torch.Tensor]:
        own = self.vlm.adapter_parameters(STAMP_ADAPTER)
        state = {f"llm.{n}": p.data for n, p in own.items()}
        for name, module in self._trained_modules().items():
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        state["seg_out"] = self.seg_out.data
        state["seg_bias"] = self.seg_bias.data
        return state

    def load_stamp_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        own = self.stamp_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{what} does not fit this STAMP model: missing keys {missing[:10]}, unexpected "
                f"keys {unexpected[:10]}"
            )
        params = dict(self.vlm.llm.named_parameters())
        for key, value in state.items():
            if key.startswith("llm."):
                target = params[key.removeprefix("llm.")]
                if target.shape != value.shape:
                    raise CheckpointError(
                        f"{what}: {key} expected shape {tuple(target.shape)}, received "
                        f"{tuple(value.shape)}"
                    )
                target.data.copy_(value)
        for name, module in self._trained_modules().items():
            sub = {
                k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")
            }
            own_sub = module.state_dict()
            sub = {k: v.to(own_sub[k].dtype) if k in own_sub else v for k, v in sub.items()}
            load_state_strict(module, sub, what=what)
        self.seg_out.data.copy_(state["seg_out"])
        self.seg_bias.data.copy_(state["seg_bias"])

    extension_state_dict = stamp_state_dict
    load_extension_state = load_stamp_state

    # -- the passes -----------------------------------------------------------------------------

    @property
    def mask_grid(self) -> tuple[int, int]:
        """(rows, cols) of the mask tokens."""
        grid = self.vlm.patch_grid
        s = self.config.mask_merge or self.vlm.config.projector.merge
        return grid[0] // s, grid[1] // s

    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> (visual tokens for the prompt, mask-token features). One CLIP pass,
        one more for a core whose projector reads local features, and one more for a mask
        projector that does (StampConfig.mask_features "local"); otherwise the mask projector
        reads the global patch tokens the core's projector reads."""
        if self.mask_projector is None:  # the mask tokens read the core's own visual tokens
            with torch.no_grad():
                feats = visual = self.vlm.encode_images(pixel_values)
        else:
            pixels = pixel_values.to(self.vlm.device)
            with torch.no_grad():
                dense = dense_features(self.vlm.clip, pixels)
                visual = self.vlm.encode_images(pixel_values, dense)
                if self.config.mask_features == "local":
                    dense = dense_features(self.vlm.clip, pixels, window=self.config.mask_window)
            feats = self.mask_projector(dense.tokens.float(), dense.grid)
        if self.feature_norm is not None:
            feats = F.normalize(feats, dim=-1) * self.feature_norm
        return visual, feats

    def decision_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (..., V + 1) logits: the LM head's, then ``<seg>``'s."""
        vocab = self.vlm.llm.get_output_embeddings()(hidden).float()
        return torch.cat([vocab, self.seg_logit(hidden)[..., None]], -1)

    def seg_logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (...) logits of the ``<seg>`` output row."""
        return hidden.float() @ self.seg_out + self.seg_bias

    def mask_pass(
        self, mask_features: torch.Tensor, kv_mask: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """N mask tokens after the cache (which ends at ``<seg>``), LoRA on: (B, N) logits.

        The cache is cropped back to its length before the pass, so decoding continues from it.
        """
        b, n, _ = mask_features.shape
        length = cache.get_seq_length()
        if kv_mask.shape != (b, length):
            raise ValueError(
                f"kv_mask must be (batch, cached length) = ({b}, {length}), received "
                f"{tuple(kv_mask.shape)}"
            )
        row = self.vlm.added_embeddings[self.vlm.added_ids.index(self.mask_id)]
        embeds = row.to(mask_features.dtype) + mask_features  # (B, N, H)
        first = kv_mask.sum(-1, keepdim=True)  # the next position of each row
        positions = first + torch.arange(n, device=kv_mask.device)
        dtype = cast(torch.Tensor, self.vlm.llm.get_input_embeddings().weight).dtype
        attn = mask_pass_attention(kv_mask, n, dtype)
        try:
            with self.lora():
                out = self._forward(
                    embeds.to(dtype),
                    attention_mask=attn,
                    position_ids=positions,
                    cache=cache,
                )
        finally:
            cache.crop(length - cache.get_seq_length())  # a negative count removes
        assert self.head is not None, "the mask pass is the 'stamp' method's"
        return self.head(out.last_hidden_state.float())

    def _seg_step(self, kv: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``<seg>`` to every row: (its last hidden (B, H), the extended kv mask). LoRA is on
        for it only in the "lisa" baseline, whose mask prompt is this hidden state."""
        ids = torch.full((kv.shape[0],), self.seg_id)
        with self.lora() if self.config.method == "lisa" else contextlib.nullcontext():
            hidden = self.step(ids, kv, cache)
        return hidden, torch.cat([kv, torch.ones_like(kv[:, :1])], 1)

    def _label_pass(
        self, kv: torch.Tensor, cache: DynamicCache, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text4Seg-style: the LLM (LoRA on) writes one label token, "0" or "1", per grid cell
        after the cache, starting from the ``<mask>`` token. With `labels` (B, N) the pass is
        teacher-forced in one forward; without, it decodes greedily one token at a time (what
        the baseline costs). Returns (B, N, 2) logits of the two label tokens. The cache is
        cropped back afterwards."""
        b = kv.shape[0]
        n = self.mask_grid[0] * self.mask_grid[1]
        length = cache.get_seq_length()
        head = self.vlm.llm.get_output_embeddings()
        ids = torch.tensor(self.label_ids, device=kv.device)
        start = torch.full((b, 1), self.mask_id, device=kv.device)
        try:
            with self.lora():
                if labels is not None:
                    seq = torch.cat([start, ids[labels[:, :-1]]], 1)  # (B, N)
                    mask = torch.cat([kv, torch.ones_like(seq)], 1)
                    positions = kv.sum(-1, keepdim=True) + torch.arange(n, device=kv.device)
                    out = self._forward(
                        self.vlm.embed(seq),
                        attention_mask=mask,
                        position_ids=positions,
                        cache=cache,
                    )
                    return head(out.last_hidden_state)[..., ids].float()
                steps, token = [], start[:, 0]
                for _ in range(n):
                    hidden = self.step(token, kv, cache)
                    kv = torch.cat([kv, torch.ones_like(kv[:, :1])], 1)
                    logits = head(hidden)[..., ids].float()  # (B, 2)
                    steps.append(logits)
                    token = ids[logits.argmax(-1)]
                return torch.stack(steps, 1)
        finally:
            cache.crop(length - cache.get_seq_length())

    def _sam_inputs(
        self, images: Sequence[Any]
    ) -> tuple[torch.Tensor, list[tuple[tuple[int, int], tuple[int, int]]]]:
        """SAM's image embeddings (B, C, h, w) (frozen encoder) and each image's (input size,
        original size) for SAM's postprocessing."""
        assert self.sam is not None
        side = int(self.sam.image_encoder.img_size)
        transform = ResizeLongestSide(side)
        batch: list[torch.Tensor] = []
        frames: list[tuple[tuple[int, int], tuple[int, int]]] = []
        for image in images:
            rgb = prepare_image(image, side)
            resized = transform.apply_image(rgb)
            t = torch.as_tensor(resized, device=self.vlm.device).permute(2, 0, 1).float()
            batch.append(self.sam.preprocess(t[None]))
            frames.append(((resized.shape[0], resized.shape[1]), (rgb.shape[0], rgb.shape[1])))
        with torch.no_grad():
            return self.sam.image_encoder(torch.cat(batch)), frames

    def _sam_decode(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """LISA-style: the ``<seg>`` hidden states (B, H) as SAM prompt tokens -> (B, 4h, 4w)."""
        assert self.sam is not None and self.seg_proj is not None
        sparse = self.seg_proj(hidden.float())[:, None]  # (B, 1, C)
        b, _, h, w = embeddings.shape
        pe = self.sam.prompt_encoder
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        low, _ = predict_masks_batched(
            self.sam.mask_decoder, embeddings, pe.get_dense_pe(), sparse, dense, False
        )
        return low[:, 0]

    def _sam_targets(self, masks: Sequence[npt.ArrayLike]) -> torch.Tensor:
        """Ground-truth masks in SAM's low-resolution frame (resized, padded, area-pooled)."""
        assert self.sam is not None
        side = int(self.sam.image_encoder.img_size)
        low = tuple(self.sam.prompt_encoder.mask_input_size)
        out = []
        for mask in masks:
            m = np.asarray(mask, dtype=np.float32)
            nh, nw = ResizeLongestSide.get_preprocess_shape(m.shape[0], m.shape[1], side)
            t = F.interpolate(torch.from_numpy(m)[None, None], size=(nh, nw), mode="bilinear")
            t = F.pad(t, (0, side - nw, 0, side - nh))
            out.append(F.adaptive_avg_pool2d(t, low)[0, 0])
        return torch.stack(out).flatten(1)

    # -- training -------------------------------------------------------------------------------

    def training_losses(
        self,
        seg_prompts: Sequence[Sequence[dict[str, Any]]],
        masks: Sequence[npt.ArrayLike],
        other_prompts: Sequence[Sequence[dict[str, Any]]] = (),
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch. seg_prompts: conversations ending with a user turn asking to segment
        (its last image is the one segmented); masks: the referred objects, (H, W) on those
        images. The reply target is ``<seg>`` then the end of turn. other_prompts: prompts the LLM
        answers in text: their target is the VLM core's own first token, so ``<seg>`` learns not
        to fire on them.

        Returns {"loss", "lm", "bce", "dice"}; "loss" = lm_weight * lm + 0.3 bce + 0.7 dice
        ("text4seg": the label tokens' cross-entropy takes the place of bce, and dice is 0).
        """
        cfg = self.config
        b = len(seg_prompts)
        if len(masks) != b:
            raise ValueError(f"expected {b} masks (one per seg prompt), received {len(masks)}")
        prompts = [*seg_prompts, *other_prompts]
        ids, attn, pixels, last_image, images = self._batch(prompts)
        for i, (mask, image) in enumerate(zip(masks, images[:b], strict=True)):
            if np.shape(mask) != image.size[::-1]:  # a turned or rescaled image: wrong targets
                raise ValueError(
                    f"seg prompt {i}: its mask is {np.shape(mask)} (H, W) but its image reads as "
                    f"{image.size[1]}x{image.size[0]}"
                )
        visual, mask_feats = self.image_features(pixels)
        with torch.no_grad():
            last, cache = self.prefix(ids, attn, visual)
        attn = attn.to(self.vlm.device)
        logits = self.decision_logits(last)  # (B + B', V + 1)
        vocab = logits.shape[-1] - 1
        targets = torch.full((len(prompts),), vocab, dtype=torch.long, device=logits.device)
        if other_prompts:
            targets[b:] = logits[b:, :vocab].argmax(-1)
        lm = F.cross_entropy(logits, targets)
        # The rows that segment: <seg> (its input row trains through this step), then the mask.
        cache.batch_select_indices(torch.arange(b, device=attn.device))
        seg_hidden, kv = self._seg_step(attn[:b], cache)
        eos = int(cast(int, self.vlm.tokenizer.eos_token_id))
        lm_eos = F.cross_entropy(
            self.decision_logits(seg_hidden),
            torch.full((b,), eos, dtype=torch.long, device=logits.device),
        )
        lm_total = (lm + lm_eos) / 2
        zero = lm_total.new_zeros(())
        size = int(pixels.shape[-1])
        if cfg.method == "lisa":
            embeddings, _ = self._sam_inputs(images[:b])
            mask_logits = self._sam_decode(seg_hidden, embeddings).flatten(1)
            bce, dice = stamp_losses(mask_logits, self._sam_targets(masks).to(mask_logits.device))
        else:
            clip_masks = torch.stack([mask_like_clip_input(m, size) for m in masks])
            grid = grid_targets(clip_masks, self.mask_grid).to(kv.device)
            if cfg.method == "stamp":
                patch_logits = self.mask_pass(mask_feats[last_image[:b]], kv, cache)
                if cfg.loss_resolution:
                    side = (cfg.loss_resolution, cfg.loss_resolution)
                    up = upsample_logits(patch_logits, self.mask_grid, side).flatten(1)
                    fine = grid_targets(clip_masks, side).to(up.device)
                    bce, dice = stamp_losses(up, fine)
                else:
                    bce, dice = stamp_losses(patch_logits, grid)
            else:
                label_logits = self._label_pass(kv, cache, (grid > 0.5).long())
                bce = F.cross_entropy(label_logits.flatten(0, 1), (grid > 0.5).long().flatten())
                dice = zero
        loss = cfg.lm_weight * lm_total + cfg.bce_weight * bce + cfg.dice_weight * dice
        return {"loss": loss, "lm": lm_total.detach(), "bce": bce.detach(), "dice": dice.detach()}

    def forward(
        self,
        seg_prompts: Sequence[Sequence[dict[str, Any]]],
        masks: Sequence[npt.ArrayLike],
        other_prompts: Sequence[Sequence[dict[str, Any]]] = (),
    ) -> dict[str, torch.Tensor]:
        """`training_losses`, as the module's forward (what DistributedDataParallel wraps)."""
        return self.training_losses(seg_prompts, masks, other_prompts)

    def _batch(
        self, prompts: Sequence[Sequence[dict[str, Any]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[Any]]:
        """Left-padded prompts with the generation prompt; pixels of every image; for each prompt
        the index (into the pixels) of its last image, and that image. Every prompt needs one."""
        enc = self.vlm.left_padded(prompts)
        images: list[Any] = []
        last: list[int] = []
        for i, p in enumerate(prompts):
            ims = [load_rgb(im) for m in p for im in (m.get("images") or ())]
            if not ims:
                raise ValueError(f"prompt {i} has no image; STAMP segments the last image")
            images += ims
            last.append(len(images) - 1)
        pixels = self.vlm.pixel_values(images)
        lasts = [images[i] for i in last]
        return enc["input_ids"], enc["attention_mask"], pixels, torch.tensor(last), lasts

    # -- inference ------------------------------------------------------------------------------

    def _masks_after_seg(
        self,
        seg_hidden: torch.Tensor,
        kv: torch.Tensor,
        cache: DynamicCache,
        mask_feats: torch.Tensor | None,
        images: Sequence[Any],
    ) -> list[npt.NDArray[np.float32]]:
        """The method's mask for each row once ``<seg>`` is in the cache: (H, W) pixel logits of
        each row's image."""
        if self.config.method == "lisa":
            assert self.sam is not None
            embeddings, frames = self._sam_inputs(images)
            low = self._sam_decode(seg_hidden, embeddings)
            return [
                self.sam.postprocess_masks(row[None, None], frame[0], frame[1])[0, 0]
                .float()
                .cpu()
                .numpy()
                for row, frame in zip(low, frames, strict=True)
            ]
        if self.config.method == "stamp":
            assert mask_feats is not None
            grid = self.mask_pass(mask_feats, kv, cache)
        else:
            labels = self._label_pass(kv, cache)
            grid = labels[..., 1] - labels[..., 0]
        h, w = self.mask_grid
        return [
            self.pixel_logits(row.reshape(h, w).float().cpu().numpy(), load_rgb(im).size)
            for row, im in zip(grid, images, strict=True)
        ]

    @torch.inference_mode()
    def chooses_seg(self, prompts: Sequence[Sequence[dict[str, Any]]]) -> list[bool]:
        """Whether greedy decoding would open each prompt's reply with ``<seg>``."""
        ids, attn, pixels, _, _ = self._batch(prompts)
        visual, _ = self.image_features(pixels)
        last, _ = self.prefix(ids, attn, visual)
        logits = self.decision_logits(last)
        return (logits.argmax(-1) == logits.shape[-1] - 1).tolist()

    @torch.inference_mode()
    def segment(self, prompts: Sequence[Sequence[dict[str, Any]]]) -> list[npt.NDArray[np.float32]]:
        """Forced segmentation: each prompt's reply is ``<seg>``; (H, W) pixel logits of each
        prompt's last image. One prefix pass for the batch, one ``<seg>`` step, then the method's
        mask (STAMP: one mask pass)."""
        ids, attn, pixels, last_image, images = self._batch(prompts)
        visual, mask_feats = self.image_features(pixels)
        _, cache = self.prefix(ids, attn, visual)
        seg_hidden, kv = self._seg_step(attn.to(self.vlm.device), cache)
        return self._masks_after_seg(seg_hidden, kv, cache, mask_feats[last_image], images)

    def pixel_logits(
        self, grid_logits: npt.NDArray[np.float32], size: tuple[int, int]
    ) -> npt.NDArray[np.float32]:
        """(h, w) mask-grid logits -> (H, W) logits of an image of `size` = (W, H) pixels.

        The grid covers CLIP's input, which is the image padded to a square and resized
        (PolychromeVLM.pixel_values): upsampled to the square, the image's part is cut out."""
        width, height = size
        t = torch.from_numpy(grid_logits).reshape(1, -1)
        side = max(width, height)
        sq = upsample_logits(t, self.mask_grid, (side, side))[0].numpy()
        top, left = (side - height) // 2, (side - width) // 2  # pad_to_square's offsets
        return np.ascontiguousarray(sq[top : top + height, left : left + width])

    @torch.inference_mode()
    def reply(
        self,
        messages: Sequence[dict[str, Any]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> StampReply:
        """Decode a reply; each ``<seg>`` it emits gives a mask of the conversation's last image."""
        text, logits = "", []
        for chunk, mask in self.stream(messages, max_new_tokens, temperature, seed):
            text += chunk
            if mask is not None:
                logits.append(mask)
        thr = self.config.threshold
        return StampReply(text.strip(), [m > thr for m in logits], logits)

    @torch.inference_mode()  # per resumption, in the resuming thread (torch wraps generators)
    def stream(
        self,
        messages: Sequence[dict[str, Any]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
        force: bool = False,
    ) -> Iterator[tuple[str, npt.NDArray[np.float32] | None]]:
        """Yield (text chunk, None) as tokens come and ("", (H, W) pixel logits) at each ``<seg>``.

        Greedy at temperature 0, else sampling. One KV cache for the whole reply; the mask pass
        reuses it. A prompt without an image cannot segment: ``<seg>`` is then never emitted.
        ``force``: the reply opens with ``<seg>`` (the user asked for a mask).
        """
        last, kv, cache, seg = self.start_reply(messages)
        if force and not seg.available:
            raise ValueError("there is no image in the conversation to segment")
        events = decode_with_specials(
            self.vlm.tokenizer,
            last,
            kv,
            cache,
            self.step,
            [seg],
            max_new_tokens,
            vocab_logits=self.vlm.llm.get_output_embeddings(),
            temperature=temperature,
            seed=seed,
            force=SEG_TOKEN if force else None,
        )
        for event in events:
            yield event.text, event.payload

    def start_reply(
        self, messages: Sequence[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache, Special]:
        """The prompt read once (one CLIP pass for the visual and the mask tokens): (its last
        hidden (1, H), the kv mask, the cache, the ``<seg>`` Special whose payload is the (H, W)
        pixel logits of the conversation's last image). Call under inference_mode."""
        images = [im for m in messages for im in (m.get("images") or ())]
        tok = self.vlm.tokenizer
        rendered = self.vlm.render(messages, add_generation_prompt=True)
        ids = tok(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
        attn = torch.ones_like(ids)
        visual = mask_feats = None
        if images:
            visual, mask_feats = self.image_features(self.vlm.pixel_values(images))
        last, cache = self.prefix(ids, attn, visual)

        def act(
            kv: torch.Tensor, cache: DynamicCache, forced: bool, fired: int
        ) -> tuple[torch.Tensor, torch.Tensor, npt.NDArray[np.float32]]:
            hidden, kv = self._seg_step(kv, cache)
            assert mask_feats is not None
            masks = self._masks_after_seg(hidden, kv, cache, mask_feats[-1:], images[-1:])
            return hidden, kv, masks[0]

        seg = Special(
            SEG_TOKEN,
            self.seg_logit,
            act,
            available=mask_feats is not None,
        )
        return last, attn.to(self.vlm.device), cache, seg


def _load_sam(config: StampConfig) -> Sam:
    """The "lisa" baseline's SAM: the configured checkpoint, else random weights from seed 0."""
    return sam_from_preset(config.sam).eval()
