"""The vision-language model: CLIP patch features -> projector -> visual tokens in a frozen LLM.

    vlm = PolychromeVLM.build(VLMConfig(...))                 # random projector
    vlm = PolychromeVLM.from_pretrained("checkpoints/shapes/vlm_lora")
    batch = vlm.prepare([{"role": "user", "content": "What is this?", "images": [img]}])
    out = vlm(**batch)                                        # VLMOutput(logits=(B, T, V))

How an image becomes tokens (LLaVA-1.5's recipe, with a patch merge so a CPU can afford it):

1. The frozen CLIP image tower gives its final-layer patch tokens (B, h*w, D_vis)
   (vision.clip.dense_features; a ConvNeXt tower's feature map goes the same way).
2. Each s x s block of neighbouring patches is concatenated into one vector
   (B, h/s * w/s, s*s*D_vis), as InternVL / Qwen2-VL do: the 16x16 patches of the ShapeWorld CLIP
   become 8x8 = 64 tokens with the shapes preset's s = 2, keeping every patch's features
   (avg-pooling would blur positions and counts).
3. A 2-layer MLP (LayerNorm, Linear, GELU, Linear) maps them to the LLM's embedding width;
   with ``ProjectorConfig.output_norm = "rms"`` an RMSNorm follows, its gain started at the scale
   of the LLM's token embeddings.
4. They replace the ``<image>`` placeholder tokens of the prompt, one placeholder per visual token;
   a count mismatch raises ValueError naming both counts (as transformers' LLaVA does).

The LLM is frozen and never resized: added special tokens get their own trainable embedding rows
(``added_embeddings``) looked up beside the frozen matrix, so every text token's embedding, and
therefore every text-only logit, is bitwise the bare LLM's. Only the projector, the added rows
and the image LoRA (if any: on only for prompts with an image) are trained and saved; the LLM and
CLIP are named by their sources in the saved config.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from core.config import Config
from core.images import load_rgb, pad_to_square
from lm.loading import LLMConfig, load_causal_lm
from lm.streaming import stream_generate
from vision.clip import (
    ClipBundle,
    ClipPresetConfig,
    DenseFeatures,
    clip_from_preset,
    dense_features,
    supports_window,
)

__all__ = [
    "FEATURES",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "ImageLoraConfig",
    "PolychromeVLM",
    "Projector",
    "ProjectorConfig",
    "VLMConfig",
    "VLMOutput",
    "VLMPresetConfig",
    "load_extension",
    "save_extension",
]

IMAGE_TOKEN = "<image>"  # one placeholder per visual token in the tokenized prompt
IGNORE_INDEX = -100  # label of positions without a loss (prompt, images, padding)
TENSOR_FILE = "vlm"  # <checkpoint>/vlm.safetensors
OUTPUT_NORMS = ("none", "rms")  # ProjectorConfig.output_norm
POSITIONS = ("none", "learned")  # ProjectorConfig.position
FEATURES = ("global", "local", "both")  # ProjectorConfig.features
IMAGE_ADAPTER = "image"  # the peft adapter name of ImageLoraConfig's LoRA


@dataclass
class ProjectorConfig(Config):
    """Visual tokens: patch merge and the MLP into the LLM's embedding space."""

    merge: int = 4  # s: each s x s block of CLIP patches becomes one visual token
    hidden: int = 0  # MLP hidden width; 0 = the LLM's hidden size
    # "none": the MLP's output as is (LLaVA's projector). "rms": an RMSNorm on each visual token
    # whose learned gain starts at the RMS of the LLM's token embeddings, so visual tokens enter
    # the residual stream at the scale of text (unnormalised, ours grew to ~100x the embeddings'
    # norm: docs/RESULTS.md, VLM core).
    output_norm: str = "none"
    # "none": the visual tokens carry position only through CLIP's features and their order in
    # the prompt (LLaVA). "learned": a learned embedding of each token's row plus one of its
    # column is added to the projector's output (ViT-style factorised 2D position embeddings),
    # so each visual token states its grid cell in the LLM's residual stream.
    position: str = "none"
    # What the projector reads from CLIP at each patch. "global": the final-layer patch tokens of
    # the tower as trained (LLaVA). "local": the same tower with every patch attending only to a
    # `window` x `window` neighbourhood in every block (vision.clip.dense_features(window=...)),
    # so a token says what is around it rather than what is in the scene. "both": the two
    # concatenated per patch (two CLIP passes). A linear probe reads a ShapeWorld object's class
    # far better from local features; the VLM did not gain from them at 300 steps
    # (docs/RESULTS.md, VLM core, session 14).
    features: str = "global"
    window: int = 5  # odd: patches per side of the local attention window ("local" and "both")

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, received {self.position!r}")
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, received {self.features!r}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(
                f"window must be an odd number >= 1 (patches per side), received {self.window}"
            )
        if not 1 <= self.merge <= 16:
            raise ValueError(f"merge must be in [1, 16], received {self.merge}")
        if self.hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0 = LLM width), received {self.hidden}")
        if self.output_norm not in OUTPUT_NORMS:
            raise ValueError(
                f"output_norm must be one of {OUTPUT_NORMS}, received {self.output_norm!r}"
            )


@dataclass
class ImageLoraConfig(Config):
    """LoRA on the LLM, switched on only for a forward whose prompt holds an image, so text-only
    prompts stay bitwise the bare LLM's. Issue 8 allows it where the figures show a frozen LLM
    is not enough. rank 0 = none (the default: LLaVA's stage-1 setting, only the projector and
    the added rows train)."""

    rank: int = 0
    alpha: int = 32
    dropout: float = 0.0  # peft's; inert while the LLM stays in eval mode (PolychromeVLM.train)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = no LoRA), received {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), received {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError("lora.targets must name at least one module")


@dataclass
class VLMConfig(Config):
    """A VLM: the frozen parts by source, the trained projector, the added tokens."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: ClipPresetConfig = field(default_factory=ClipPresetConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lora: ImageLoraConfig = field(default_factory=ImageLoraConfig)
    # Special tokens with trainable embedding rows; later stages (GILL, STAMP) append theirs.
    added_tokens: list[str] = field(default_factory=lambda: [IMAGE_TOKEN])

    def __post_init__(self) -> None:
        if IMAGE_TOKEN not in self.added_tokens:
            raise ValueError(
                f"added_tokens must include {IMAGE_TOKEN!r}, received {self.added_tokens}"
            )
        if len(set(self.added_tokens)) != len(self.added_tokens):
            raise ValueError(f"added_tokens has duplicates: {self.added_tokens}")


@dataclass
class VLMPresetConfig(Config):
    """The preset's VLM: the core's settings (projector, image LoRA) and where its trained
    weights are."""

    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lora: ImageLoraConfig = field(default_factory=ImageLoraConfig)
    checkpoint: str | None = (
        None  # folder of PolychromeVLM.save_pretrained; None = random projector
    )

    def core_config(
        self,
        llm: LLMConfig,
        vision: ClipPresetConfig,
        *,
        merge: int | None = None,
        output_norm: str | None = None,
        position: str | None = None,
        features: str | None = None,
        window: int | None = None,
        lora_rank: int | None = None,
        lora_targets: Sequence[str] | None = None,
    ) -> VLMConfig:
        """The core a training run builds: this projector and image LoRA with the run's
        overrides (train.vlm's and bench.mfu's --merge, --projector-norm, --position,
        --features, --window, --lora-rank, --lora-targets; None keeps the preset's). ValueError
        naming the setting on a bad value."""
        projector = self.projector
        overrides = (
            ("merge", merge),
            ("output_norm", output_norm),
            ("position", position),
            ("features", features),
            ("window", window),
        )
        if window is not None and (features or projector.features) == "global":
            raise ValueError(
                "window: the attention window applies to local features (features 'local' or "
                "'both'); the projector reads 'global' ones"
            )
        for name, value in overrides:
            if value is not None:
                try:
                    projector = projector.replace(**{name: value})
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
        rank = self.lora.rank if lora_rank is None else lora_rank
        if lora_targets is not None and rank == 0:
            raise ValueError("lora targets need a LoRA: a rank > 0")
        try:
            lora = self.lora.replace(rank=rank)
            if lora_targets is not None:
                lora = lora.replace(targets=list(lora_targets))
        except ValueError as err:
            raise ValueError(f"lora: {err}") from None
        return VLMConfig(llm=llm, vision=vision, projector=projector, lora=lora)


@dataclass
class VLMOutput:
    """What PolychromeVLM.forward returns."""

    logits: torch.Tensor | None  # (B, T, V) over the LLM's vocabulary; None when labels are given
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labelled positions
    n_labels: int = 0  # positions that carried a label


class Projector(nn.Module):
    """(B, h*w, D_vis) patch features on an h x w grid -> (B, h/s * w/s, H) visual tokens."""

    def __init__(
        self,
        vision_width: int,
        llm_width: int,
        merge: int,
        hidden: int = 0,
        output_norm: str = "none",
        output_rms: float = 1.0,
        position_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if output_norm not in OUTPUT_NORMS:
            raise ValueError(f"output_norm must be one of {OUTPUT_NORMS}, received {output_norm!r}")
        self.merge = merge
        hidden = hidden or llm_width
        self.norm = nn.LayerNorm(vision_width * merge * merge)
        self.fc1 = nn.Linear(vision_width * merge * merge, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, llm_width)
        # ProjectorConfig.output_norm; the gain starts at output_rms (per-coordinate RMS)
        self.out_norm: nn.RMSNorm | None = None
        if output_norm == "rms":
            self.out_norm = nn.RMSNorm(llm_width, eps=1e-6)
            nn.init.constant_(self.out_norm.weight, output_rms)
        # ProjectorConfig.position "learned": (rows, cols) of the token grid; the embeddings
        # start at N(0, 1) per coordinate (a random, distinct vector per row and per column)
        self.row_embed: nn.Parameter | None = None
        self.col_embed: nn.Parameter | None = None
        if position_grid is not None:
            rows, cols = position_grid
            self.row_embed = nn.Parameter(torch.randn(rows, llm_width))
            self.col_embed = nn.Parameter(torch.randn(cols, llm_width))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, d = tokens.shape  # (B, h*w, D_vis)
        h, w = grid
        s = self.merge
        if n != h * w or h % s or w % s:
            raise ValueError(
                f"expected {h}x{w}={h * w} patch tokens on a grid divisible by merge={s}, "
                f"received {n} tokens"
            )
        x = tokens.reshape(b, h // s, s, w // s, s, d).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // s) * (w // s), s * s * d)  # (B, N_vis, s*s*D_vis)
        out = self.fc2(self.act(self.fc1(self.norm(x))))  # (B, N_vis, H)
        if self.row_embed is not None and self.col_embed is not None:
            rows, cols = self.row_embed.shape[0], self.col_embed.shape[0]
            if (h // s, w // s) != (rows, cols):
                raise ValueError(
                    f"the position embeddings are for a {rows}x{cols} token grid, received "
                    f"{h // s}x{w // s}"
                )
            pos = self.row_embed[:, None, :] + self.col_embed[None, :, :]  # (rows, cols, H)
            out = out + pos.reshape(rows * cols, -1).to(out.dtype)
        # in fp32 under autocast too (CPU autocast leaves rms_norm out, CUDA's runs it in fp32)
        return out if self.out_norm is None else self.out_norm(out.float())


class PolychromeVLM(nn.Module):
    """A frozen causal LM that reads images through a trained projector (module docstring)."""

    def __init__(
        self,
        config: VLMConfig,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        clip: ClipBundle,
        projector: Projector,
    ) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.clip = clip.model
        self.preprocess = clip.preprocess
        self.projector = projector
        self.llm.requires_grad_(False).eval()
        self.clip.requires_grad_(False).eval()
        # peft LoRA adapters on the LLM, by name (the image LoRA here; STAMP adds its own), each
        # on only inside an `adapter(name)` block; `_active` counts the open blocks per adapter.
        self._tuner_layers: list[BaseTunerLayer] = []
        self._lora_params: list[nn.Parameter] = []
        self._adapters: set[str] = set()
        self._active: Counter[str] = Counter()
        # KV caches whose sequence holds an image (vlm.specials.cached_prefix marks them): every
        # later pass over such a cache runs with the image LoRA, as generate_texts does
        self.image_caches: weakref.WeakSet[DynamicCache] = weakref.WeakSet()
        if config.lora.rank:
            # peft refuses only targets that match nothing at all; a typo beside a good name
            # would train without it while the config names it. The LM head is not a target.
            body = llm.base_model.named_modules()
            linear = {n.rsplit(".", 1)[-1] for n, m in body if isinstance(m, nn.Linear)}
            unknown = [t for t in config.lora.targets if t not in linear]
            if unknown:
                raise ValueError(
                    f"lora.targets {unknown} name no linear layer of the LLM's decoder "
                    f"({type(llm).__name__}); its linear layers are {sorted(linear)}"
                )
            lora = LoraConfig(
                r=config.lora.rank,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=list(config.lora.targets),
            )
            for p in self.add_adapter(lora, IMAGE_ADAPTER):
                p.requires_grad_(True)  # trained with the projector (train.vlm --lora-rank)
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(config.added_tokens)},
            replace_extra_special_tokens=False,
        )
        self.added_ids = [
            int(cast(int, tokenizer.convert_tokens_to_ids(t))) for t in config.added_tokens
        ]
        self.image_token_id = self.added_ids[config.added_tokens.index(IMAGE_TOKEN)]
        emb = cast(torch.Tensor, self.llm.get_input_embeddings().weight)
        # New rows start at the mean text embedding (a neutral point in the LLM's input space).
        self.added_embeddings = nn.Parameter(
            emb.detach().float().mean(0, keepdim=True).repeat(len(self.added_ids), 1)
        )
        size = _image_size(self.preprocess)
        grid = _grid(self.clip, size)
        s = config.projector.merge
        if grid[0] % s or grid[1] % s:
            raise ValueError(
                f"the CLIP grid {grid[0]}x{grid[1]} is not divisible by projector.merge={s}"
            )
        self.patch_grid = grid  # CLIP's patch grid (rows, cols) of one image
        self._tokens_per_image = (grid[0] // s) * (grid[1] // s)
        self._lock = threading.Lock()

    def train(self, mode: bool = True) -> PolychromeVLM:
        """Train mode for the projector only: the frozen LLM and CLIP stay in eval mode."""
        super().train(mode)
        self.llm.eval()
        self.clip.eval()
        return self

    # -- the image LoRA (ImageLoraConfig) -------------------------------------------------------

    @property
    def has_image_lora(self) -> bool:
        return IMAGE_ADAPTER in self._adapters

    def add_adapter(self, lora: LoraConfig, name: str) -> list[nn.Parameter]:
        """Inject a peft LoRA adapter called `name` into the LLM, switched off (on inside
        `adapter(name)` blocks); returns its parameters. ValueError if the name is taken or its
        targets match no module. The caller sets what trains (requires_grad), and the switch
        keeps it."""
        if name in self._adapters:
            raise ValueError(f"the LLM already has an adapter called {name!r}")
        with warnings.catch_warnings():  # peft warns at a second adapter: ours are by design
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(lora, self.llm, adapter_name=name)
        layers: list[BaseTunerLayer] = [
            m for m in self.llm.modules() if isinstance(m, BaseTunerLayer)
        ]
        if not any(name in cast(Any, m).lora_A for m in layers):
            raise ValueError(
                f"LoRA targets {sorted(lora.target_modules or [])} match no module of the LLM "
                f"{type(self.llm).__name__}"
            )
        self._adapters.add(name)
        self._tuner_layers = layers
        self._lora_params = [p for n, p in self.llm.named_parameters() if "lora_" in n]
        self._apply_adapters()
        return list(self.adapter_parameters(name).values())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The LoRA weights of adapter `name`, by their names in the LLM."""
        return {n: p for n, p in self.llm.named_parameters() if "lora_" in n and f".{name}." in n}

    def _apply_adapters(self) -> None:
        """Set every LoRA layer to the adapters of the open `adapter` blocks (none: all off),
        keeping each LoRA weight's requires_grad: peft's switch flips it, and a weight switched
        off between the forward and the backward would get no gradient."""
        names = sorted(self._active)
        stale = [m for m in self._tuner_layers if names and list(m.active_adapters) != names]
        if stale:  # a new set of adapters: peft's set_adapter, which flips requires_grad
            grads = [p.requires_grad for p in self._lora_params]
            for layer in stale:
                layer.set_adapter(names)
            for p, grad in zip(self._lora_params, grads, strict=True):
                p.requires_grad_(grad)
        for layer in self._tuner_layers:
            # peft's enable_adapters() sets this flag and also resets every adapter's
            # requires_grad, most of a switch's cost, and the extensions switch per decoded
            # token: set the flag alone. LoRA layers run their base layer alone while it is set
            # (tests/test_vlm.py checks text-only logits stay bitwise the bare LLM's).
            layer._disable_adapters = not names

    @contextlib.contextmanager
    def adapter(self, name: str, on: bool = True) -> Iterator[None]:
        """The LoRA adapter `name` on inside the block when `on`, beside any adapter already on
        (their deltas add up), off again afterwards whatever happens; blocks nest. The switch is
        the module's state, not the call's: callers that may overlap hold ``self._lock``
        (generate_texts, stream do; training runs one forward at a time)."""
        if not on:
            yield
            return
        if name not in self._adapters:
            raise ValueError(f"the LLM has no adapter {name!r}; it has {sorted(self._adapters)}")
        self._active[name] += 1
        try:
            if self._active[name] == 1:
                self._apply_adapters()
            yield
        finally:
            self._active[name] -= 1
            if not self._active[name]:
                del self._active[name]
                self._apply_adapters()

    def freeze_core(self) -> None:
        """Freeze what the core trained (the projector, the image LoRA), as an extension built
        on it does; the added token rows stay trainable (extensions mask their gradient)."""
        self.projector.requires_grad_(False)
        for p in self.adapter_parameters(IMAGE_ADAPTER).values():
            p.requires_grad_(False)

    def holds_images(self, input_ids: torch.Tensor) -> bool:
        """Whether the rows of a batch (B, T) hold images: the image LoRA's switch. On a core
        with an image LoRA, a batch that mixes rows with and without images raises ValueError:
        the switch is per forward, and would run the text-only rows with the LoRA."""
        rows = (input_ids == self.image_token_id).reshape(-1, input_ids.shape[-1]).any(-1)
        n = int(rows.sum())
        if self.has_image_lora and 0 < n < rows.numel():
            raise ValueError(
                f"a core with an image LoRA needs batches whose rows all hold images or none do; "
                f"{n} of {rows.numel()} rows hold images (batch them apart)"
            )
        return n > 0

    def image_lora(self, on: bool = True) -> AbstractContextManager[None]:
        """The image LoRA on inside the block when `on` (a prompt holds an image); nothing
        without one (`adapter`)."""
        return self.adapter(IMAGE_ADAPTER, on and self.has_image_lora)

    # -- building and loading -------------------------------------------------------------------

    @classmethod
    def build(cls, config: VLMConfig, device: str | torch.device = "cpu") -> PolychromeVLM:
        """The frozen LLM and CLIP from their sources, a randomly initialised projector."""
        llm, tokenizer = load_causal_lm(
            config.llm.source, dtype=config.llm.dtype, device=device, frozen=True
        )
        # a random tower (no checkpoint) comes from a fixed seed, so that from_pretrained
        # rebuilds exactly the tower the projector was trained on
        clip = clip_from_preset(config.vision)
        clip.model.to(device)
        if config.projector.features != "global" and not supports_window(clip.model):
            raise ValueError(
                f"projector.features {config.projector.features!r} needs a ViT image tower (local "
                f"attention windows), received {type(clip.model.visual).__name__}; use 'global'"
            )
        vision_width = _vision_width(clip) * (2 if config.projector.features == "both" else 1)
        output_rms = 1.0
        if config.projector.output_norm == "rms":
            emb = cast(torch.Tensor, llm.get_input_embeddings().weight).detach()
            output_rms = (
                float(torch.linalg.vector_norm(emb, dtype=torch.float32)) / emb.numel() ** 0.5
            )
        position_grid = None
        if config.projector.position == "learned":
            gh, gw = _grid(clip.model, _image_size(clip.preprocess))
            s = config.projector.merge
            position_grid = (gh // s, gw // s)
        projector = Projector(
            vision_width,
            int(llm.config.get_text_config().hidden_size),
            config.projector.merge,
            config.projector.hidden,
            config.projector.output_norm,
            output_rms=output_rms,
            position_grid=position_grid,
        ).to(device)
        vlm = cls(config, llm, tokenizer, clip, projector)
        vlm.added_embeddings.data = vlm.added_embeddings.data.to(device)
        return vlm

    def add_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add special tokens with their own trainable input rows (STAMP's ``<seg>``, GILL's
        ``[IMG0]``...); returns their ids. Tokens already added are left as they are.

        New rows start at the mean text embedding, like the first ones. The frozen matrix is not
        resized, so text-only logits stay bitwise the bare LLM's.
        """
        new = [t for t in tokens if t not in self.config.added_tokens]
        if len(set(new)) != len(new):
            raise ValueError(f"tokens has duplicates: {list(tokens)}")
        if new:
            self.tokenizer.add_special_tokens(
                {"additional_special_tokens": new}, replace_extra_special_tokens=False
            )
            self.config.added_tokens = [*self.config.added_tokens, *new]
            self.added_ids += [int(cast(int, self.tokenizer.convert_tokens_to_ids(t))) for t in new]
            emb = cast(torch.Tensor, self.llm.get_input_embeddings().weight)
            rows = emb.detach().float().mean(0, keepdim=True).repeat(len(new), 1)
            self.added_embeddings = nn.Parameter(
                torch.cat([self.added_embeddings.data, rows.to(self.added_embeddings.device)])
            )
        return [self.token_id(t) for t in tokens]

    def token_id(self, token: str) -> int:
        """The id of an added token; ValueError naming the added tokens when it is not one."""
        if token not in self.config.added_tokens:
            raise ValueError(
                f"{token!r} is not an added token of this VLM; added: {self.config.added_tokens}"
            )
        return self.added_ids[self.config.added_tokens.index(token)]

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what we train: the projector, the added token rows and the image LoRA."""
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state["added_embeddings"] = self.added_embeddings.data
        for name, p in self.adapter_parameters(IMAGE_ADAPTER).items():
            state[f"llm.{name}"] = p.data
        return state

    def load_trained_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        """Strictly load `trained_state_dict` tensors (any float dtype; cast to ours)."""
        expected = self.trained_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{what} does not fit this VLM: missing keys {missing[:10]}, unexpected keys "
                f"{unexpected[:10]}"
            )
        if state["added_embeddings"].shape != self.added_embeddings.shape:
            raise CheckpointError(
                f"{what}: added_embeddings expected shape {tuple(self.added_embeddings.shape)} "
                f"({len(self.added_ids)} added tokens), received "
                f"{tuple(state['added_embeddings'].shape)}"
            )
        own = self.projector.state_dict()
        proj = {
            k.removeprefix("projector."): v.to(own[k.removeprefix("projector.")].dtype)
            for k, v in state.items()
            if k.startswith("projector.")
        }
        load_state_strict(self.projector, proj, what=what)
        self.added_embeddings.data.copy_(state["added_embeddings"])
        for key, value in state.items():
            if key.startswith("llm."):
                target = expected[key]
                if target.shape != value.shape:
                    raise CheckpointError(
                        f"{what}: {key} expected shape {tuple(target.shape)}, received "
                        f"{tuple(value.shape)}"
                    )
                target.copy_(value.to(target.dtype))

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Save the trained tensors and the config (the frozen parts by source)."""
        tensors = {k: v.to(dtype) for k, v in self.trained_state_dict().items()}
        return save_checkpoint(
            directory, {TENSOR_FILE: tensors}, self.config.to_dict(), metadata, overwrite=overwrite
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu"
    ) -> PolychromeVLM:
        """Build from a saved config and load its trained tensors strictly (sha256-checked)."""
        ckpt = load_checkpoint(directory)
        config = VLMConfig.from_dict(ckpt.config, source=f"{directory}/manifest.json config")
        if TENSOR_FILE not in ckpt.tensors:
            raise CheckpointError(
                f"{directory}: expected {TENSOR_FILE}.safetensors, found "
                f"{sorted(f + '.safetensors' for f in ckpt.tensors)}"
            )
        vlm = cls.build(config, device=device)
        vlm.load_trained_state(ckpt.tensors[TENSOR_FILE], what=str(directory))
        return vlm

    # -- images -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens each image becomes."""
        return self._tokens_per_image

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """Images of any kind (paths, bytes, PIL of any mode, arrays) -> (N, 3, S, S).

        Conversion and size limits are core.images.load_rgb's (ImageError on bad input); a
        non-square image is padded to a square with CLIP's mean colour (LLaVA-1.5's "pad" image
        aspect ratio: nothing at its edges is cropped away, which STAMP's masks need), then CLIP's
        own preprocessing (resize, centre crop: a no-op on the square, normalise).
        """
        if len(images) == 0:
            return torch.empty(0, 3, 1, 1)
        fill = _mean_colour(self.preprocess)
        return torch.stack(
            [self.preprocess(pad_to_square(load_rgb(image), fill)) for image in images]
        )

    def encode_images(
        self, pixel_values: torch.Tensor, dense: DenseFeatures | None = None
    ) -> torch.Tensor:
        """(N, 3, S, S) -> (N, tokens_per_image, H) visual tokens; CLIP is frozen (no grad).

        dense: CLIP's global features of the same pixels, when the caller already has them
        (STAMP's mask features read them too); computed here otherwise.
        """
        tokens, grid = self.patch_features(pixel_values, dense)
        return self.projector(tokens, grid)

    @property
    def clip_passes(self) -> int:
        """CLIP forward passes per image (ProjectorConfig.features "both": two)."""
        return 2 if self.config.projector.features == "both" else 1

    def patch_features(
        self, pixel_values: torch.Tensor, dense: DenseFeatures | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """What the projector reads, (N, h*w, D_in) in float32, and the grid (h, w): CLIP's
        patch tokens as ``ProjectorConfig.features`` says (global, local or both)."""
        features, window = self.config.projector.features, self.config.projector.window
        pixels = pixel_values.to(self.device)
        with torch.no_grad():
            parts: list[DenseFeatures] = []
            if features in ("global", "both"):
                parts.append(dense if dense is not None else dense_features(self.clip, pixels))
            if features in ("local", "both"):
                parts.append(dense_features(self.clip, pixels, window=window))
        tokens = torch.cat([p.tokens.float() for p in parts], -1)
        return tokens, parts[0].grid

    # -- text + images --------------------------------------------------------------------------

    def embed(
        self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) input embeddings with visual tokens at the placeholders.

        image_features: (N, tokens_per_image, H), images in reading order across the batch.
        Text ids go through the frozen embedding matrix untouched.
        """
        emb_layer = self.llm.get_input_embeddings()
        vocab = int(cast(torch.Tensor, emb_layer.weight).shape[0])
        added = torch.zeros_like(input_ids, dtype=torch.bool)
        for row in self.added_ids:
            added |= input_ids == row
        outside = (input_ids >= vocab) & ~added
        if outside.any():
            raise ValueError(
                f"token ids must be < {vocab} or one of the added tokens {self.added_ids}, "
                f"received {input_ids[outside].unique().tolist()[:10]}"
            )
        embeds = emb_layer(torch.where(added, torch.zeros_like(input_ids), input_ids))
        if added.any():
            lookup = {tid: i for i, tid in enumerate(self.added_ids)}
            rows = torch.tensor(
                [lookup[int(t)] for t in input_ids[added].tolist()], device=input_ids.device
            )
            embeds = embeds.clone()
            embeds[added] = self.added_embeddings[rows].to(embeds.dtype)
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            shape = None if image_features is None else tuple(image_features.shape)
            raise ValueError(
                f"Image features and image tokens do not match: the prompt has {n_slots} "
                f"{IMAGE_TOKEN} tokens, the images give {n_feats} features (shape {shape}; "
                f"{self.tokens_per_image} per image)"
            )
        if image_features is not None and n_slots:
            embeds[is_image] = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds  # (B, T, H)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> VLMOutput:
        """input_ids (B, T), attention_mask (B, T), pixel_values (N, 3, S, S), labels (B, T).

        With labels, the LM head runs only where a next-token label exists (the vocabulary
        projection is a fifth of SmolLM2's compute) and logits are not returned.
        """
        feats = self.encode_images(pixel_values) if pixel_values is not None else None
        embeds = self.embed(input_ids, feats)
        with self.image_lora(self.holds_images(input_ids)):
            hidden = self.llm.base_model(
                inputs_embeds=embeds, attention_mask=attention_mask
            ).last_hidden_state  # (B, T, H)
        head = self.llm.get_output_embeddings()
        if labels is None:
            return VLMOutput(logits=head(hidden))
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have input_ids' shape {tuple(input_ids.shape)}, received "
                f"{tuple(labels.shape)}"
            )
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        n = int(keep.sum())
        if n == 0:
            return VLMOutput(logits=None, loss=hidden.sum() * 0.0, n_labels=0)
        logits = head(hidden[:, :-1][keep]).float()  # (n, V)
        loss = nn.functional.cross_entropy(logits, targets[keep])
        return VLMOutput(logits=None, loss=loss, n_labels=n)

    # -- prompts ----------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        """Chat messages with optional "images" lists -> the LLM's chat template text.

        Each image of a message becomes ``tokens_per_image`` placeholders and a newline before the
        message's text (LLaVA's layout). The messages' "images" values are not read here.
        """
        block = IMAGE_TOKEN * self.tokens_per_image + "\n"
        plain = [
            {"role": m["role"], "content": block * len(m.get("images") or ()) + m["content"]}
            for m in messages
        ]
        text = self.tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return cast(str, text)

    def prepare(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> dict[str, torch.Tensor]:
        """One prompt: {"input_ids": (1, T), "attention_mask": (1, T), "pixel_values"?}."""
        text = self.render(messages, add_generation_prompt)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        images = [im for m in messages for im in (m.get("images") or ())]
        if images:
            batch["pixel_values"] = self.pixel_values(images)
        return batch

    def tokenize_chat(
        self, messages: Sequence[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole conversation -> input_ids (T,) and labels (T,) for training.

        Labels are the ids on each assistant reply and the template's end-of-turn token after it
        (so the model learns to stop), IGNORE_INDEX elsewhere. Reply spans are found by rendering
        each prefix of the conversation: the template must render a prefix as a prefix.
        """
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("a training conversation must end with an assistant turn")
        text = self.render(messages, add_generation_prompt=False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self.render(messages[:k], add_generation_prompt=True)
            end = self.render(messages[: k + 1], add_generation_prompt=False)
            if not (text.startswith(start) and text.startswith(end)):
                raise ValueError(
                    "the chat template does not render a conversation's prefixes as prefixes; "
                    "cannot locate the assistant replies"
                )
            spans.append((len(start), len(end.rstrip())))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"])
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (a, _) in enumerate(enc["offset_mapping"]):
            if any(s <= a < e for s, e in spans):
                labels[i] = ids[i]
        # an image on an assistant turn puts its placeholders in the reply: they are not text
        # to predict (their ids are past the frozen LM head's rows)
        labels[ids == self.image_token_id] = IGNORE_INDEX
        return ids, labels

    def collate(
        self,
        conversations: Sequence[Sequence[dict[str, Any]]],
        max_length: int | None = None,
        pad_to_multiple_of: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Training batch of conversations: right-padded ids, attention mask, labels, pixels.

        A conversation longer than ``max_length`` tokens raises ValueError (cutting it could cut
        through an image's placeholders). ``pad_to_multiple_of`` rounds the padded length up: on
        CPU every new sequence length makes oneDNN build and cache new kernels, so a training run
        over free lengths grows in memory step after step.
        """
        pairs = [self.tokenize_chat(c) for c in conversations]
        longest = max(len(ids) for ids, _ in pairs)
        if max_length is not None and longest > max_length:
            raise ValueError(f"a conversation is {longest} tokens; max_length is {max_length}")
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        pad = int(cast(int, self.tokenizer.pad_token_id))
        input_ids = torch.full((len(pairs), longest), pad, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention = torch.zeros_like(input_ids)
        for row, (ids, lab) in enumerate(pairs):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = lab
            attention[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        images = [im for c in conversations for m in c for im in (m.get("images") or ())]
        if images:
            batch["pixel_values"] = self.pixel_values(images)
        return batch

    @torch.inference_mode()
    def left_padded(self, prompts: Sequence[Sequence[dict[str, Any]]]) -> Any:
        """The prompts rendered with the generation prompt and tokenized as one left-padded
        batch (input_ids, attention_mask). The side is given to this call only: the shared
        tokenizer's own setting is never changed, so concurrent requests cannot race on it."""
        rendered = [self.render(p, add_generation_prompt=True) for p in prompts]
        return self.tokenizer(
            rendered,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        )

    def generate_texts(
        self, prompts: Sequence[Sequence[dict[str, Any]]], max_new_tokens: int = 32
    ) -> list[str]:
        """Greedy replies to several prompts at once (left-padded batch); for evaluation."""
        enc = self.left_padded(prompts)
        images = [im for p in prompts for m in p for im in (m.get("images") or ())]
        feats = self.encode_images(self.pixel_values(images)) if images else None
        embeds = self.embed(enc["input_ids"].to(self.device), feats)
        with self._lock, self.image_lora(self.holds_images(enc["input_ids"])):
            out = cast(Any, self.llm).generate(
                inputs_embeds=embeds,
                attention_mask=enc["attention_mask"].to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def stream(
        self,
        batch: dict[str, torch.Tensor],
        generation: dict[str, Any],
        *,
        seed: int | None = None,
        timeout: float = 300.0,
        lock: AbstractContextManager[Any] | None = None,
    ) -> Iterator[str]:
        """Generate from a prepared prompt, yielding decoded text chunks as they come.

        ``generation`` holds transformers ``generate`` keyword arguments (max_new_tokens,
        do_sample, temperature, ...). The prompt goes in as embeddings; the LLM's own KV cache
        serves the decoding. One generation at a time per model (a lock; ``lock`` replaces it
        with a context manager that holds it, e.g. SparsitySwitch.holding).
        """
        with torch.inference_mode():
            ids = batch["input_ids"].to(self.device)
            pixels = batch.get("pixel_values")
            feats = self.encode_images(pixels) if pixels is not None else None
            embeds = self.embed(ids, feats)
        kwargs = {
            **generation,
            "inputs_embeds": embeds,
            "attention_mask": batch["attention_mask"].to(self.device),
        }
        guard = _both(lock or self._lock, self.image_lora(self.holds_images(ids)))
        yield from stream_generate(
            self.llm, self.tokenizer, kwargs, lock=guard, seed=seed, timeout=timeout
        )


@contextlib.contextmanager
def _both(
    first: AbstractContextManager[Any], second: AbstractContextManager[Any]
) -> Iterator[None]:
    """`first`, then `second` (the generation lock, then the image LoRA switch, so that the
    switch happens only under the lock, in the generating thread)."""
    with first, second:
        yield


def _vision_width(clip: ClipBundle) -> int:
    size = _image_size(clip.preprocess)
    with torch.no_grad():
        probe = torch.zeros(1, 3, size, size, device=next(clip.model.parameters()).device)
        return int(dense_features(clip.model, probe).tokens.shape[-1])


def _mean_colour(preprocess: Any) -> tuple[int, int, int]:
    """The RGB colour (0-255) of CLIP's Normalize mean: what normalises to zero."""
    for t in getattr(preprocess, "transforms", ()):
        mean = getattr(t, "mean", None)
        if mean is not None and len(mean) == 3:
            # truncated, as LLaVA-1.5's expand2square does: tuple(int(x * 255) for x in mean)
            return (int(255 * mean[0]), int(255 * mean[1]), int(255 * mean[2]))
    raise ValueError(f"cannot read the normalising mean from the CLIP preprocess {preprocess!r}")


def _image_size(preprocess: Any) -> int:
    for t in getattr(preprocess, "transforms", ()):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, list | tuple) and size:
            return int(size[0])
    raise ValueError(f"cannot read the input size from the CLIP preprocess {preprocess!r}")


def _grid(model: Any, size: int) -> tuple[int, int]:
    patch = getattr(model.visual, "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        return size // ph, size // pw
    with torch.no_grad():
        probe = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
        return dense_features(model, probe).grid


def save_extension(
    vlm: PolychromeVLM,
    directory: str | os.PathLike[str],
    name: str,
    state: dict[str, torch.Tensor],
    config: Config,
    *,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a model built on a PolychromeVLM (STAMP, GILL): ``vlm.safetensors`` with the core's
    trained tensors (its added rows included), ``<name>.safetensors`` with the extension's, and a
    config {"vlm": ..., name: ...}; the frozen LLM and CLIP by their sources."""
    tensors = {
        TENSOR_FILE: {k: v.to(dtype) for k, v in vlm.trained_state_dict().items()},
        name: {k: v.to(dtype) for k, v in state.items()},
    }
    cfg = {"vlm": vlm.config.to_dict(), name: config.to_dict()}
    return save_checkpoint(directory, tensors, cfg, metadata, overwrite=overwrite)


def load_extension(
    directory: str | os.PathLike[str],
    name: str,
    own_tokens: Sequence[str],
    device: str | torch.device = "cpu",
    vlm: PolychromeVLM | None = None,
) -> tuple[PolychromeVLM, dict[str, Any], Any]:
    """Read a `save_extension` folder: (the VLM core, the extension's config dict, the checkpoint).

    Without ``vlm``, the core is built from the checkpoint without the extension's own added
    tokens. With ``vlm`` (a core shared by several extensions: STAMP and GILL in one Assistant),
    the extension attaches to it; it must be the core the extension was trained on (same LLM,
    CLIP, projector and image LoRA config, their tensors equal), else CheckpointError. The caller
    then builds the extension (which adds its tokens) and calls `load_extension_core`.
    """
    ckpt = load_checkpoint(directory)
    if set(ckpt.tensors) != {TENSOR_FILE, name} or name not in ckpt.config:
        raise CheckpointError(
            f"{directory}: expected vlm.safetensors + {name}.safetensors and a config with 'vlm' "
            f"and {name!r}, found tensor files {sorted(ckpt.tensors)}"
        )
    vlm_cfg = VLMConfig.from_dict(ckpt.config["vlm"], source=f"{directory} config.vlm")
    if vlm is None:
        base = [t for t in vlm_cfg.added_tokens if t not in own_tokens]
        return (
            PolychromeVLM.build(vlm_cfg.replace(added_tokens=base), device=device),
            (ckpt.config[name]),
            ckpt,
        )
    mine, theirs = vlm.config.to_dict(), vlm_cfg.to_dict()
    differ = [k for k in ("llm", "vision", "projector", "lora") if mine[k] != theirs[k]]
    saved = ckpt.tensors[TENSOR_FILE]
    for key, value in vlm.trained_state_dict().items():
        if key.startswith(("projector.", "llm.")) and not (
            key in saved
            and saved[key].shape == value.shape
            and torch.allclose(saved[key].float().cpu(), value.float().cpu(), atol=1e-3)
        ):
            differ.append(key)
    if differ:
        raise CheckpointError(
            f"{directory} was trained on another VLM core than the one it should attach to "
            f"(differs in: {', '.join(differ[:5])}); load it on its own (no vlm=) or retrain it "
            "on this core"
        )
    return vlm, ckpt.config[name], ckpt


def load_extension_core(
    vlm: PolychromeVLM, ckpt: Any, own_tokens: Sequence[str], attached: bool, what: str
) -> None:
    """Once the extension has added its tokens: load the checkpoint's core tensors into a core
    built for it, or, into a shared core (``attached``), only the rows of the extension's own
    tokens. Rows are matched by token name: their order differs from core to core."""
    saved = ckpt.tensors[TENSOR_FILE]
    saved_tokens = list(ckpt.config["vlm"]["added_tokens"])
    rows = saved["added_embeddings"]
    if rows.shape[0] != len(saved_tokens):
        raise CheckpointError(
            f"{what}: added_embeddings has {rows.shape[0]} rows for {len(saved_tokens)} tokens"
        )
    wanted = own_tokens if attached else vlm.config.added_tokens
    missing = [t for t in wanted if t not in saved_tokens]
    if missing or (not attached and len(saved_tokens) != len(wanted)):
        raise CheckpointError(
            f"{what}: saved rows for {saved_tokens}, this model has {list(vlm.config.added_tokens)}"
        )
    if not attached:
        order = [saved_tokens.index(t) for t in vlm.config.added_tokens]
        vlm.load_trained_state({**saved, "added_embeddings": rows[order]}, what=what)
        return
    for token in own_tokens:
        target = vlm.config.added_tokens.index(token)
        vlm.added_embeddings.data[target] = rows[saved_tokens.index(token)].to(
            vlm.added_embeddings.dtype
        )
