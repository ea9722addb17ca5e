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
  text-only or with images, goes through the bare frozen LLM: chat logits are bitwise the VLM
  core's (a test checks it).
- Trained: the LoRA weights, the mask head, the ``<seg>``/``<mask>`` rows, the ``<seg>`` output row
  and, when ``mask_merge > 0``, the projector of the finer mask grid. The VLM core (projector,
  CLIP, LLM) stays frozen.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import DynamicCache

from core.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from core.images import load_rgb
from segmentation.stamp import (
    MaskHead,
    StampConfig,
    grid_targets,
    mask_pass_attention,
    stamp_losses,
    upsample_logits,
)
from vision.clip import dense_features
from vlm.model import PolychromeVLM, Projector, VLMConfig

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


class StampVLM(nn.Module):
    """A PolychromeVLM with STAMP's mask pass (module docstring)."""

    def __init__(self, vlm: PolychromeVLM, config: StampConfig) -> None:
        super().__init__()
        self.vlm = vlm
        self.config = config
        self.seg_id, self.mask_id = vlm.add_tokens([SEG_TOKEN, MASK_TOKEN])
        llm = vlm.llm
        hidden = int(llm.config.get_text_config().hidden_size)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
        )
        inject_adapter_in_model(lora, llm)
        self._lora_layers = [m for m in llm.modules() if isinstance(m, BaseTunerLayer)]
        if not self._lora_layers:
            raise ValueError(
                f"lora_targets {config.lora_targets} match no module of the LLM "
                f"{type(llm).__name__}"
            )
        for name, p in llm.named_parameters():
            p.requires_grad_("lora_" in name)
        self._lora_params = [p for name, p in llm.named_parameters() if "lora_" in name]
        self._set_lora(False)
        vlm.projector.requires_grad_(False)  # the VLM core stays as it was trained
        self.head = MaskHead(hidden)
        self.seg_out = nn.Parameter(torch.zeros(hidden))  # the <seg> row beside the LM head
        self.seg_bias = nn.Parameter(torch.zeros(()))
        if config.mask_merge:
            gh, gw = vlm.patch_grid
            if gh % config.mask_merge or gw % config.mask_merge:
                raise ValueError(
                    f"mask_merge={config.mask_merge} does not divide the CLIP patch grid {gh}x{gw}"
                )
            pm = vlm.config.projector.merge
            width = int(vlm.projector.norm.normalized_shape[0]) // (pm * pm)
            self.mask_projector: Projector | None = Projector(width, hidden, config.mask_merge)
        else:
            self.mask_projector = None
        self.to(vlm.device)
        self.tokens_processed = 0  # tokens the LLM has read (inputs of every forward)

    # -- LoRA switch ----------------------------------------------------------------------------

    def _set_lora(self, on: bool) -> None:
        for layer in self._lora_layers:
            layer.enable_adapters(on)
        # peft's switch also flips requires_grad of the adapters: an adapter switched off between
        # the forward and the backward would get no gradient. They stay trainable throughout.
        for p in self._lora_params:
            p.requires_grad_(True)

    @contextlib.contextmanager
    def lora(self) -> Iterator[None]:
        """LoRA on inside the block (the mask pass), off again afterwards whatever happens."""
        self._set_lora(True)
        try:
            yield
        finally:
            self._set_lora(False)

    def train(self, mode: bool = True) -> StampVLM:
        super().train(mode)
        self.vlm.train(mode)
        self.vlm.projector.eval()  # the VLM core's projector is frozen here
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What STAMP trains (module docstring); the VLM core's projector is left out."""
        params = [p for n, p in self.vlm.llm.named_parameters() if "lora_" in n]
        params += [self.vlm.added_embeddings, self.seg_out, self.seg_bias]
        params += list(self.head.parameters())
        if self.mask_projector is not None:
            params += list(self.mask_projector.parameters())
        return params

    # -- saving ---------------------------------------------------------------------------------

    def stamp_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"llm.{n}": p.data for n, p in self.vlm.llm.named_parameters() if "lora_" in n}
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        state["seg_out"] = self.seg_out.data
        state["seg_bias"] = self.seg_bias.data
        if self.mask_projector is not None:
            mp = self.mask_projector.state_dict()
            state.update({f"mask_projector.{k}": v for k, v in mp.items()})
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
        head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        load_state_strict(self.head, head, what=what)
        self.seg_out.data.copy_(state["seg_out"])
        self.seg_bias.data.copy_(state["seg_bias"])
        if self.mask_projector is not None:
            mp = {
                k.removeprefix("mask_projector."): v
                for k, v in state.items()
                if k.startswith("mask_projector.")
            }
            load_state_strict(self.mask_projector, mp, what=what)

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path:
        tensors = {
            "vlm": {k: v.to(dtype) for k, v in self.vlm.trained_state_dict().items()},
            TENSOR_FILE: {k: v.to(dtype) for k, v in self.stamp_state_dict().items()},
        }
        config = {"vlm": self.vlm.config.to_dict(), "stamp": self.config.to_dict()}
        return save_checkpoint(directory, tensors, config, metadata, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu"
    ) -> StampVLM:
        ckpt = load_checkpoint(directory)
        if set(ckpt.tensors) != {"vlm", TENSOR_FILE} or "stamp" not in ckpt.config:
            raise CheckpointError(
                f"{directory}: expected a STAMP checkpoint (vlm.safetensors + stamp.safetensors, "
                f"config with 'vlm' and 'stamp'), found tensor files {sorted(ckpt.tensors)}"
            )
        vlm_cfg = VLMConfig.from_dict(ckpt.config["vlm"], source=f"{directory} config.vlm")
        stamp_cfg = StampConfig.from_dict(ckpt.config["stamp"], source=f"{directory} config.stamp")
        base = [t for t in vlm_cfg.added_tokens if t not in (SEG_TOKEN, MASK_TOKEN)]
        vlm = PolychromeVLM.build(
            VLMConfig(
                llm=vlm_cfg.llm,
                vision=vlm_cfg.vision,
                projector=vlm_cfg.projector,
                added_tokens=base,
            ),
            device=device,
        )
        model = cls(vlm, stamp_cfg)
        vlm.load_trained_state(ckpt.tensors["vlm"], what=str(directory))
        model.load_stamp_state(ckpt.tensors[TENSOR_FILE], what=str(directory))
        return model

    # -- the passes -----------------------------------------------------------------------------

    @property
    def mask_grid(self) -> tuple[int, int]:
        """(rows, cols) of the mask tokens."""
        grid = self.vlm.patch_grid
        s = self.config.mask_merge or self.vlm.config.projector.merge
        return grid[0] // s, grid[1] // s

    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> (visual tokens for the prompt, mask-token features), one CLIP pass."""
        with torch.no_grad():
            dense = dense_features(self.vlm.clip, pixel_values.to(self.vlm.device))
        tokens = dense.tokens.float()
        with torch.no_grad():
            visual = self.vlm.projector(tokens, dense.grid)
        if self.mask_projector is None:
            return visual, visual
        return visual, self.mask_projector(tokens, dense.grid)

    def _forward(self, embeds: torch.Tensor, **kwargs: Any) -> Any:
        self.tokens_processed += int(embeds.shape[0] * embeds.shape[1])
        return self.vlm.llm.base_model(inputs_embeds=embeds, use_cache=True, **kwargs)

    def decision_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (..., V + 1) logits: the LM head's, then ``<seg>``'s."""
        vocab = self.vlm.llm.get_output_embeddings()(hidden).float()
        seg = hidden.float() @ self.seg_out + self.seg_bias
        return torch.cat([vocab, seg[..., None]], -1)

    def prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor | None
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Left-padded prompts through the bare LLM: (last hidden (B, H), the KV cache)."""
        embeds = self.vlm.embed(input_ids.to(self.vlm.device), visual)
        mask = attention_mask.to(self.vlm.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self._forward(embeds, attention_mask=mask, position_ids=positions, cache=cache)
        return out.last_hidden_state[:, -1], cache

    def step(
        self, token_ids: torch.Tensor, kv_mask: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """One token per row (B,) after the cache, bare LLM; returns its last hidden (B, H)."""
        ids = token_ids.to(self.vlm.device)[:, None]
        embeds = self.vlm.embed(ids)
        mask = torch.cat([kv_mask, torch.ones_like(kv_mask[:, :1])], 1)
        positions = mask.sum(-1, keepdim=True) - 1
        out = self._forward(embeds, attention_mask=mask, position_ids=positions, cache=cache)
        return cast(torch.Tensor, out.last_hidden_state[:, -1])

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
        return self.head(out.last_hidden_state.float())

    # -- training -------------------------------------------------------------------------------

    def training_losses(
        self,
        seg_prompts: Sequence[Sequence[dict[str, Any]]],
        gt_masks: torch.Tensor,
        other_prompts: Sequence[Sequence[dict[str, Any]]] = (),
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch. seg_prompts: conversations ending with a user turn asking to segment
        (its last image is the one segmented); gt_masks: (B, H, W) at CLIP's input size. The
        reply target is ``<seg>`` then the end of turn. other_prompts: prompts the LLM answers in
        text: their target is the bare LLM's own first token, so ``<seg>`` learns not to fire.

        Returns {"loss", "lm", "bce", "dice"}; "loss" = lm_weight * lm + 0.3 bce + 0.7 dice.
        """
        cfg = self.config
        b = len(seg_prompts)
        prompts = [*seg_prompts, *other_prompts]
        ids, attn, pixels, last_image = self._batch(prompts)
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
        # The rows that segment: <seg> (its input row trains through this step), then the mask pass.
        cache.batch_select_indices(torch.arange(b, device=attn.device))
        kv = attn[:b]
        seg_hidden = self.step(torch.full((b,), self.seg_id), kv, cache)
        eos = int(cast(int, self.vlm.tokenizer.eos_token_id))
        lm_eos = F.cross_entropy(
            self.decision_logits(seg_hidden),
            torch.full((b,), eos, dtype=torch.long, device=logits.device),
        )
        kv = torch.cat([kv, torch.ones_like(kv[:, :1])], 1)
        patch_logits = self.mask_pass(mask_feats[last_image[:b]], kv, cache)
        targets_grid = grid_targets(gt_masks.to(patch_logits.device), self.mask_grid)
        bce, dice = stamp_losses(patch_logits, targets_grid)
        lm_total = (lm + lm_eos) / 2
        loss = cfg.lm_weight * lm_total + cfg.bce_weight * bce + cfg.dice_weight * dice
        return {"loss": loss, "lm": lm_total.detach(), "bce": bce.detach(), "dice": dice.detach()}

    def _batch(
        self, prompts: Sequence[Sequence[dict[str, Any]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prompts with the generation prompt; pixels of every image; for each prompt
        the index (into the pixels) of its last image. Every prompt needs an image."""
        tok = self.vlm.tokenizer
        rendered = [self.vlm.render(p, add_generation_prompt=True) for p in prompts]
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        images: list[Any] = []
        last: list[int] = []
        for i, p in enumerate(prompts):
            ims = [im for m in p for im in (m.get("images") or ())]
            if not ims:
                raise ValueError(f"prompt {i} has no image; STAMP segments the last image")
            images += ims
            last.append(len(images) - 1)
        pixels = torch.stack([self.vlm.preprocess(load_rgb(im)) for im in images])
        return enc["input_ids"], enc["attention_mask"], pixels, torch.tensor(last)

    # -- inference ------------------------------------------------------------------------------

    @torch.inference_mode()
    def segment(self, prompts: Sequence[Sequence[dict[str, Any]]]) -> list[npt.NDArray[np.float32]]:
        """Forced segmentation: each prompt's reply is ``<seg>``; (h, w) logits on the mask grid
        for each. One prefix pass, one ``<seg>`` step and one mask pass for the whole batch."""
        ids, attn, pixels, last_image = self._batch(prompts)
        visual, mask_feats = self.image_features(pixels)
        _, cache = self.prefix(ids, attn, visual)
        kv = attn.to(self.vlm.device)
        self.step(torch.full((len(prompts),), self.seg_id), kv, cache)
        kv = torch.cat([kv, torch.ones_like(kv[:, :1])], 1)
        logits = self.mask_pass(mask_feats[last_image], kv, cache)
        h, w = self.mask_grid
        return [row.reshape(h, w).cpu().numpy() for row in logits]

    def pixel_logits(
        self, grid_logits: npt.NDArray[np.float32], size: tuple[int, int]
    ) -> npt.NDArray[np.float32]:
        """(h, w) mask-grid logits -> (H, W) logits of an image of `size` = (W, H) pixels.

        The grid covers CLIP's input, which is the image resized (and centre-cropped when not
        square: the crop's outside is left at the logits' minimum)."""
        width, height = size
        t = torch.from_numpy(grid_logits).reshape(1, -1)
        side = min(width, height)
        sq = upsample_logits(t, self.mask_grid, (side, side))[0].numpy()
        out = np.full((height, width), float(sq.min()), dtype=np.float32)
        top, left = (height - side) // 2, (width - side) // 2
        out[top : top + side, left : left + side] = sq
        return out

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

    def stream(
        self,
        messages: Sequence[dict[str, Any]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Iterator[tuple[str, npt.NDArray[np.float32] | None]]:
        """Yield (text chunk, None) as tokens come and ("", (H, W) pixel logits) at each ``<seg>``.

        Greedy at temperature 0, else sampling. One KV cache for the whole reply; the mask pass
        reuses it. A prompt without an image cannot segment: ``<seg>`` is then never emitted.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, received {max_new_tokens}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        images = [im for m in messages for im in (m.get("images") or ())]
        tok = self.vlm.tokenizer
        eos = int(cast(int, tok.eos_token_id))
        with torch.inference_mode():
            rendered = self.vlm.render(messages, add_generation_prompt=True)
            ids = tok(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
            attn = torch.ones_like(ids)
            visual = mask_feats = None
            size = (0, 0)
            if images:
                pixels = self.vlm.pixel_values(images)
                visual, mask_feats = self.image_features(pixels)
                size = load_rgb(images[-1]).size
            last, cache = self.prefix(ids, attn, visual)
            kv = attn.to(self.vlm.device)
            vocab = int(cast(torch.Tensor, self.vlm.llm.get_output_embeddings().weight).shape[0])
            generated: list[int] = []
            emitted = ""
            for _ in range(max_new_tokens):
                logits = self.decision_logits(last)[0]
                if mask_feats is None:
                    logits[vocab] = float("-inf")
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, -1)
                    token = int(torch.multinomial(probs.cpu(), 1, generator=gen))
                else:
                    token = int(logits.argmax())
                if token == eos:
                    break
                if token == vocab:  # <seg>
                    last = self.step(torch.tensor([self.seg_id]), kv, cache)
                    kv = torch.cat([kv, torch.ones_like(kv[:, :1])], 1)
                    assert mask_feats is not None
                    grid = self.mask_pass(mask_feats[-1:], kv, cache)
                    h, w = self.mask_grid
                    yield "", self.pixel_logits(grid[0].reshape(h, w).cpu().numpy(), size)
                    continue
                generated.append(token)
                text = str(tok.decode(generated, skip_special_tokens=True))
                if len(text) > len(emitted) and not text.endswith("\ufffd"):
                    yield text[len(emitted) :], None
                    emitted = text
                last = self.step(torch.tensor([token]), kv, cache)
                kv = torch.cat([kv, torch.ones_like(kv[:, :1])], 1)
