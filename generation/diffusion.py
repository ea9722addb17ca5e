"""Text-to-image decoder: a stock diffusers ``StableDiffusionPipeline`` driven by prompt_embeds.

    pipe = build_pipeline("shapes-ldm")                      # random weights, our small model
    pipe = load_pipeline("checkpoints/shapes/diffusion")    # our trained ShapeWorld weights
    pipe = pipeline_from_pretrained("hf-hub:stable-diffusion-v1-5/stable-diffusion-v1-5")  # paper
    pipe = pipeline_from_preset(PolychromeConfig.from_preset("shapes").diffusion)

    embeds = encode_prompts(pipe, ["A red circle."])         # (B, T, D) what the UNet attends to
    images = generate(pipe, prompt_embeds=embeds, seed=0)   # list of PIL images
    images = generate(pipe, ["A red circle."], scheduler="dpm++", num_inference_steps=25)

One pipeline class for every preset, so the code that drives SD-1.5 (GILL's decoder) is the code
we test on ShapeWorld:

- ``shapes`` / ``tiny``: a latent diffusion model built from diffusers' own classes: an
  ``AutoencoderTiny`` (TAESD's architecture; 128x128x3 <-> 32x32x4 for ``shapes-ldm``) and a
  ``UNet2DConditionModel`` that cross-attends to the frozen sentence encoder's token states
  (``minilm-l6``, all-MiniLM-L6-v2: last hidden states of the caption padded to
  ``text_max_length`` tokens, 384-d). The encoder and its
  tokenizer sit in the pipeline's ``text_encoder`` / ``tokenizer`` slots; its config carries
  ``use_attention_mask = True``, so ``StableDiffusionPipeline.encode_prompt`` computes exactly the
  states training used (padding positions are kept, as SD keeps CLIP's 77). Checkpoints hold the
  VAE and the UNet only (``vae.safetensors``, ``unet.safetensors``, fp16); the encoder is rebuilt
  from its source.
- ``paper``: ``StableDiffusionPipeline.from_pretrained`` on a hub id or a local folder (SD-1.5:
  CLIP ViT-L/14 text states, (B, 77, 768) prompt_embeds).

Guidance is classifier-free (the UNet is trained with the caption dropped to "" 10 % of the time,
train.diffusion); ``negative_prompt_embeds`` default to the encoding of "". Samplers: ``"ddim"``
(``DDIMScheduler``) or ``"dpm++"`` (``DPMSolverMultistepScheduler``, algorithm ``dpmsolver++``),
both built from the training noise schedule's config.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import AutoModel, AutoTokenizer

from core.checkpoint import CheckpointError, load_checkpoint, load_state_strict
from core.config import Config, project_path
from core.sources import resolve_source
from data.render import LayoutConfig
from data.shapeworld import ShapeWorldConfig, SplitSizes

__all__ = [
    "DIFFUSION_CONFIGS",
    "PAPER_MODEL",
    "SCHEDULERS",
    "DiffusionConfig",
    "DiffusionPresetConfig",
    "Pipeline",
    "SchedulerName",
    "UNetConfig",
    "VaeConfig",
    "assemble_pipeline",
    "build_noise_scheduler",
    "build_pipeline",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "checkpoint_path",
    "encode_prompts",
    "expected_embeds_shape",
    "generate",
    "get_diffusion_config",
    "image_grid",
    "list_diffusion_configs",
    "load_pipeline",
    "pipeline_from_preset",
    "pipeline_from_pretrained",
    "set_scheduler",
]

# A diffusers StableDiffusionPipeline. Its parts (unet, vae, scheduler, ...) are registered at run
# time and diffusers' model classes are not visible to mypy as torch modules: typed as Any.
Pipeline: TypeAlias = Any
SchedulerName = Literal["ddim", "dpm++"]
SCHEDULERS: tuple[str, ...] = ("ddim", "dpm++")
PAPER_MODEL = "stable-diffusion"  # the preset model name that loads a full pipeline from `source`
TENSOR_FILES = ("vae", "unet")  # a checkpoint's tensor files: vae.safetensors, unet.safetensors


# --------------------------------------------------------------------------------------------
# Configs and the variant registry
# --------------------------------------------------------------------------------------------


def _check_channels(what: str, channels: tuple[int, ...], groups: int) -> None:
    if not channels or any(c < 1 or c % groups for c in channels):
        raise ValueError(
            f"{what}: expected a non-empty list of channel counts divisible by "
            f"norm_num_groups={groups}, received {list(channels)}"
        )


@dataclass
class VaeConfig(Config):
    """The ``AutoencoderTiny`` (TAESD architecture: plain ReLU conv blocks, no KL term).

    One entry of encoder_blocks / decoder_blocks per resolution level; n levels = 2^(n-1) x down.
    Chosen over ``AutoencoderKL`` for this CPU (docs/DIFFUSION.md): at equal wall time it
    reconstructed ShapeWorld better, and its encoder is ~3x cheaper (the UNet stage encodes the
    whole training set once).
    """

    channels: int = 32  # conv channels at every level (AutoencoderTiny keeps them equal)
    encoder_blocks: tuple[int, ...] = (0, 1, 2)  # conv blocks per encoder level, finest first
    decoder_blocks: tuple[int, ...] = (2, 2, 1)  # conv blocks per decoder level, coarsest first
    latent_channels: int = 4  # channels of the latent the UNet denoises
    # Latents are multiplied by this before diffusion (SD's 0.18215): 1 / std of the trained
    # encoder's latents, measured by train.diffusion after the VAE stage.
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if len(self.encoder_blocks) != len(self.decoder_blocks) or not self.encoder_blocks:
            raise ValueError(
                "encoder_blocks and decoder_blocks must have one entry per level (same length), "
                f"received {list(self.encoder_blocks)} and {list(self.decoder_blocks)}"
            )
        if any(b < 0 for b in (*self.encoder_blocks, *self.decoder_blocks)):
            raise ValueError("block counts must be >= 0")
        if self.channels < 1 or self.latent_channels < 1 or self.scaling_factor <= 0:
            raise ValueError(
                "channels and latent_channels must be >= 1 and scaling_factor > 0, received "
                f"{self.channels}, {self.latent_channels}, {self.scaling_factor}"
            )

    @property
    def downsample(self) -> int:
        """Image side / latent side."""
        return int(2 ** (len(self.encoder_blocks) - 1))


@dataclass
class UNetConfig(Config):
    """The ``UNet2DConditionModel``: one resolution level per entry of block_out_channels."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)  # channels per level, finest first
    # Per level: cross-attention to the text states (CrossAttn*Block2D) or plain ResNets. The
    # finest level has none: attention over 32x32 = 1024 tokens costs more than it gives here.
    cross_attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1  # ResNet (+ transformer) blocks per down level (up levels: +1)
    attention_head_dim: int = 32  # channels per attention head
    norm_num_groups: int = 32  # GroupNorm groups (divides every channel count)

    def __post_init__(self) -> None:
        _check_channels("unet.block_out_channels", self.block_out_channels, self.norm_num_groups)
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError(
                f"unet.cross_attention: expected one flag per level "
                f"({len(self.block_out_channels)}), received {len(self.cross_attention)}"
            )
        if not any(self.cross_attention):
            raise ValueError("unet.cross_attention: at least one level must attend to the text")
        if self.layers_per_block < 1 or self.attention_head_dim < 1:
            raise ValueError(
                "layers_per_block and attention_head_dim must be >= 1, received "
                f"{self.layers_per_block}, {self.attention_head_dim}"
            )


@dataclass
class DiffusionConfig(Config):
    """One latent diffusion variant. Saved in every diffusion checkpoint."""

    name: str  # registry name
    image_size: int = 128  # generated image side in pixels (square)
    vae: VaeConfig = field(default_factory=VaeConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_source: str = "minilm-l6"  # frozen text encoder (core.sources spec)
    text_max_length: int = 32  # caption tokens; states are padded to this length (T)
    text_dim: int = 384  # hidden size of the text encoder (D of prompt_embeds)
    num_train_timesteps: int = 1000  # DDPM steps of the noise schedule
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085  # SD-1.5's schedule
    beta_end: float = 0.012
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the UNet predicts

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"name must be letters, digits, '-', '_', received {self.name!r}")
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, received {self.image_size}")
        if self.image_size % (self.vae.downsample * 2 ** (len(self.unet.block_out_channels) - 1)):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by the VAE's and UNet's total "
                f"downsampling ({self.vae.downsample} x "
                f"{2 ** (len(self.unet.block_out_channels) - 1)})"
            )
        if not 4 <= self.text_max_length <= 512 or self.text_dim < 1:
            raise ValueError(
                f"text_max_length must be in [4, 512] and text_dim >= 1, received "
                f"{self.text_max_length}, {self.text_dim}"
            )
        if self.num_train_timesteps < 2 or not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                "need num_train_timesteps >= 2 and 0 < beta_start < beta_end < 1, received "
                f"{self.num_train_timesteps}, {self.beta_start}, {self.beta_end}"
            )

    @property
    def latent_size(self) -> int:
        """Latent side (image_size / VAE downsampling)."""
        return self.image_size // self.vae.downsample


# shapes-ldm: 128x128 -> 32x32x4 latents (4x down: ShapeWorld objects have radii down to 10 px in
# the diffusion data, 2.5 latent cells). Sized to the CPU budget of issue 4: training VAE + UNet in
# <= 45 minutes on one core, and 25 guided DDIM steps (batch 2 through the UNet) in <= 3 s.
DIFFUSION_CONFIGS: dict[str, DiffusionConfig] = {
    "shapes-ldm": DiffusionConfig(
        name="shapes-ldm",
        image_size=128,
        vae=VaeConfig(channels=32, encoder_blocks=(0, 1, 2), decoder_blocks=(2, 2, 1)),
        unet=UNetConfig(
            block_out_channels=(32, 64, 128),
            cross_attention=(False, True, True),
            attention_head_dim=32,
            norm_num_groups=32,
        ),
        text_source="minilm-l6",
        text_max_length=24,  # ShapeWorld captions of 1-2 objects have <= 22 MiniLM tokens
    ),
    # Tests: the same code at toy sizes (64 px, 16x16x4 latents).
    "tiny-ldm": DiffusionConfig(
        name="tiny-ldm",
        image_size=64,
        vae=VaeConfig(channels=8, encoder_blocks=(0, 1, 1), decoder_blocks=(1, 1, 1)),
        unet=UNetConfig(
            block_out_channels=(16, 32),
            cross_attention=(False, True),
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        text_source="minilm-l6",
        text_max_length=16,
    ),
}


def list_diffusion_configs() -> list[str]:
    """Names of our diffusion variants."""
    return sorted(DIFFUSION_CONFIGS)


def get_diffusion_config(name: str) -> DiffusionConfig:
    """The variant `name`; ValueError listing the valid names if unknown."""
    try:
        return DIFFUSION_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown diffusion config {name!r}; valid names: {list_diffusion_configs()}"
        ) from None


def _default_data() -> ShapeWorldConfig:
    # One or two objects per image, radii >= 10 px: prompts name every object, and a 32x32 latent
    # keeps >= 2.5 cells across the smallest one.
    return ShapeWorldConfig(
        seed=0,
        layout=LayoutConfig(image_size=128, min_objects=1, max_objects=2, min_size=0.08),
        splits=SplitSizes(train=0, val=1000, test=0, pretrain=20000),
    )


@dataclass
class DiffusionPresetConfig(Config):
    """The "diffusion" entry of a preset (configs/*.json): which decoder, its weights, sampling."""

    # One of DIFFUSION_CONFIGS (our latent model), or "stable-diffusion": a full
    # StableDiffusionPipeline read from `source` (the paper preset's SD-1.5).
    model: str = "shapes-ldm"
    source: str | None = None  # "stable-diffusion" only: hub id ("hf-hub:org/name") or folder
    checkpoint: str | None = None  # our variants: trained weights folder; None = random weights
    scheduler: SchedulerName = "ddim"  # sampler: DDIM or DPM-Solver++ (multistep, 2nd order)
    num_inference_steps: int = 25  # denoising steps per image
    guidance_scale: float = 4.0  # classifier-free guidance weight (1 = no guidance)
    # The ShapeWorld data the decoder trains on (pretrain split) and draws eval prompts from (val).
    data: ShapeWorldConfig = field(default_factory=_default_data)

    def __post_init__(self) -> None:
        if self.model == PAPER_MODEL:
            if not self.source:
                raise ValueError(
                    f"model {PAPER_MODEL!r} needs `source`: a hub id ('hf-hub:ORG/NAME') or a "
                    "folder holding a StableDiffusionPipeline"
                )
            if self.checkpoint is not None:
                raise ValueError(
                    f"model {PAPER_MODEL!r} reads its weights from `source`; checkpoint must be "
                    f"null, received {self.checkpoint!r}"
                )
        elif self.model not in DIFFUSION_CONFIGS:
            raise ValueError(
                f"unknown diffusion model {self.model!r}; expected one of "
                f"{[*list_diffusion_configs(), PAPER_MODEL]}"
            )
        elif self.source is not None:
            raise ValueError(
                f"`source` is for model {PAPER_MODEL!r}; our variant {self.model!r} builds from "
                f"its config (received source={self.source!r})"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"scheduler must be one of {list(SCHEDULERS)}, received {self.scheduler!r}"
            )
        if not 1 <= self.num_inference_steps <= 1000:
            raise ValueError(
                f"num_inference_steps must be in [1, 1000], received {self.num_inference_steps}"
            )
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, received {self.guidance_scale}")


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_vae(cfg: VaeConfig) -> Any:
    """A random-weight ``AutoencoderTiny``: (B, 3, H, W) in [-1, 1] <-> (B, C_lat, H/f, W/f)."""
    levels = len(cfg.encoder_blocks)
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(cfg.channels,) * levels,
        decoder_block_out_channels=(cfg.channels,) * levels,
        num_encoder_blocks=tuple(cfg.encoder_blocks),
        num_decoder_blocks=tuple(cfg.decoder_blocks),
        latent_channels=cfg.latent_channels,
        scaling_factor=cfg.scaling_factor,
    )


def build_unet(cfg: DiffusionConfig) -> Any:
    """A random-weight ``UNet2DConditionModel`` denoising (B, latent_channels, s, s) latents."""
    u = cfg.unet
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.cross_attention))
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )


def build_noise_scheduler(cfg: DiffusionConfig) -> Any:
    """The training noise schedule (samplers are built from its config by set_scheduler)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def build_text_encoder(source: str, max_length: int) -> tuple[torch.nn.Module, Any]:
    """The frozen text encoder and its tokenizer, as the pipeline's text_encoder / tokenizer.

    Any ``AutoModel`` encoder whose first output is the last hidden states works (BERT-style
    sentence encoders). ``use_attention_mask`` makes ``encode_prompt`` pass the padding mask;
    ``model_max_length`` fixes the padded length T.
    """
    name, kwargs = resolve_source(source).pretrained_args()
    tokenizer = AutoTokenizer.from_pretrained(name, model_max_length=max_length, **kwargs)
    encoder = AutoModel.from_pretrained(name, dtype=torch.float32, **kwargs)
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False).eval()
    return encoder, tokenizer


def assemble_pipeline(cfg: DiffusionConfig, vae: Any, unet: Any) -> Pipeline:
    encoder, tokenizer = build_text_encoder(cfg.text_source, cfg.text_max_length)
    hidden = int(getattr(encoder.config, "hidden_size", -1))
    if hidden != cfg.text_dim:
        raise ValueError(
            f"text encoder {cfg.text_source!r} has hidden size {hidden}, but {cfg.name!r} expects "
            f"text_dim={cfg.text_dim}"
        )
    scheduler = DDIMScheduler.from_config(build_noise_scheduler(cfg).config)
    pipe: Pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(spec: str | DiffusionConfig) -> Pipeline:
    """Our latent model, random VAE and UNet weights (fp32, CPU), in a StableDiffusionPipeline."""
    cfg = get_diffusion_config(spec) if isinstance(spec, str) else spec
    return assemble_pipeline(cfg, build_vae(cfg.vae).eval(), build_unet(cfg).eval())


def load_pipeline(checkpoint_dir: str | os.PathLike[str]) -> Pipeline:
    """Our trained model from a checkpoint folder (train.diffusion's final/), sha256-verified."""
    ckpt = load_checkpoint(checkpoint_dir)
    try:
        cfg = DiffusionConfig.from_dict(ckpt.config, source=f"{checkpoint_dir}/manifest.json")
    except ValueError as err:
        raise CheckpointError(f"{checkpoint_dir}: not a diffusion checkpoint ({err})") from None
    missing = [f for f in TENSOR_FILES if f not in ckpt.tensors]
    if missing:
        raise CheckpointError(
            f"{checkpoint_dir}: expected tensor files "
            f"{[f + '.safetensors' for f in TENSOR_FILES]}, missing {missing}"
        )
    vae, unet = build_vae(cfg.vae), build_unet(cfg)
    for module, stem in ((vae, "vae"), (unet, "unet")):
        state = {k: v.float() for k, v in ckpt.tensors[stem].items()}
        load_state_strict(module, state, what=f"{checkpoint_dir}/{stem}.safetensors")
    return assemble_pipeline(cfg, vae.eval(), unet.eval())


def pipeline_from_pretrained(source: str, *, dtype: torch.dtype = torch.float32) -> Pipeline:
    """A full StableDiffusionPipeline (SD-1.5 or any of its format) from a hub id or folder."""
    name, kwargs = resolve_source(source).pretrained_args()
    pipe = StableDiffusionPipeline.from_pretrained(
        name, dtype=dtype, safety_checker=None, requires_safety_checker=False, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_from_preset(preset: DiffusionPresetConfig) -> Pipeline:
    """The preset's decoder, with its sampler selected."""
    if preset.model == PAPER_MODEL:
        assert preset.source is not None  # checked in __post_init__
        pipe = pipeline_from_pretrained(preset.source)
    elif preset.checkpoint is not None:
        pipe = load_pipeline(project_path(preset.checkpoint))
        loaded = pipe.unet.config.sample_size * pipe.vae_scale_factor
        expected = get_diffusion_config(preset.model).image_size
        if loaded != expected:
            raise ValueError(
                f"checkpoint {preset.checkpoint!r} makes {loaded}px images, preset model "
                f"{preset.model!r} expects {expected}px"
            )
    else:
        pipe = build_pipeline(preset.model)
    return set_scheduler(pipe, preset.scheduler)


def set_scheduler(pipe: Pipeline, name: str) -> Pipeline:
    """Select the sampler ("ddim" or "dpm++"), built from the pipeline's noise schedule."""
    if name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif name == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
    else:
        raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, received {name!r}")
    return pipe


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: Sequence[str]) -> torch.Tensor:
    """(B, T, D) text states for `prompts`, exactly as the pipeline computes them."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise ValueError(
            f"prompts must be a non-empty list of strings, received {type(prompts).__name__}"
        )
    embeds, _ = pipe.encode_prompt(list(prompts), pipe.device, 1, do_classifier_free_guidance=False)
    return embeds


def expected_embeds_shape(pipe: Pipeline) -> tuple[int | None, int]:
    """(T, D) of prompt_embeds this pipeline takes; T is None where the UNet accepts any length."""
    d = int(pipe.unet.config.cross_attention_dim)
    t = getattr(pipe.tokenizer, "model_max_length", None) if pipe.tokenizer is not None else None
    return (int(t) if t is not None and t < 100_000 else None), d


def _check_embeds(name: str, embeds: torch.Tensor, pipe: Pipeline) -> None:
    t, d = expected_embeds_shape(pipe)
    ok = embeds.ndim == 3 and embeds.shape[2] == d and (t is None or embeds.shape[1] == t)
    if not ok:
        want = f"(B, {t if t is not None else 'T'}, {d})"
        raise ValueError(f"{name}: expected shape {want}, received {tuple(embeds.shape)}")
    if not torch.isfinite(embeds).all():
        raise ValueError(f"{name}: contains NaN or infinity")


def generate(
    pipe: Pipeline,
    prompts: Sequence[str] | None = None,
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 4.0,
    num_inference_steps: int = 25,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    scheduler: str | None = None,
    output_type: Literal["pil", "np", "pt"] = "pil",
) -> Any:
    """Images for `prompts` or for `prompt_embeds` (B, T, D); one image per prompt.

    negative_prompt_embeds: (B, T, D), default the encoding of "" (classifier-free guidance with
    guidance_scale > 1). seed: one int (image i uses seed + i) or one per image; or pass
    `generator` (a diffusers-style generator or list). scheduler: switch the sampler first.
    Returns a list of PIL images, an (B, H, W, 3) float array in [0, 1] ("np") or a (B, 3, H, W)
    tensor in [0, 1] ("pt").
    """
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of `prompts` (strings) or `prompt_embeds` (B, T, D)")
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_embeds = encode_prompts(pipe, prompts)
    assert prompt_embeds is not None
    _check_embeds("prompt_embeds", prompt_embeds, pipe)
    batch = int(prompt_embeds.shape[0])
    if negative_prompt_embeds is not None:
        _check_embeds("negative_prompt_embeds", negative_prompt_embeds, pipe)
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds: expected the shape of prompt_embeds "
                f"{tuple(prompt_embeds.shape)}, received {tuple(negative_prompt_embeds.shape)}"
            )
    elif guidance_scale > 1:
        empty = encode_prompts(pipe, [""])
        if empty.shape[1] != prompt_embeds.shape[1]:
            raise ValueError(
                f"prompt_embeds have {prompt_embeds.shape[1]} tokens but the text encoder pads to "
                f"{empty.shape[1]}; pass negative_prompt_embeds of shape "
                f"{tuple(prompt_embeds.shape)}"
            )
        negative_prompt_embeds = empty.expand(batch, -1, -1)
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(
            f"num_inference_steps must be an int >= 1, received {num_inference_steps!r}"
        )
    if not math.isfinite(guidance_scale) or guidance_scale < 0:  # NaN sampled unguided
        raise ValueError(f"guidance_scale must be a finite number >= 0, received {guidance_scale}")
    if seed is not None:
        if generator is not None:
            raise ValueError("pass `seed` or `generator`, not both")
        one = isinstance(seed, numbers.Integral)  # numpy's integers too
        seeds = [int(seed) + i for i in range(batch)] if one else list(seed)  # type: ignore[arg-type]
        if len(seeds) != batch:
            raise ValueError(f"expected {batch} seeds (one per image), received {len(seeds)}")
        generator = [torch.Generator(pipe.device).manual_seed(int(s)) for s in seeds]
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    out = pipe(
        prompt_embeds=prompt_embeds.to(pipe.device, pipe.unet.dtype),
        negative_prompt_embeds=(
            None
            if negative_prompt_embeds is None
            else negative_prompt_embeds.to(pipe.device, pipe.unet.dtype)
        ),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=generator,
        output_type=output_type,
    )
    images = out.images
    if output_type == "pt":
        return images.float()  # (B, 3, H, W) in [0, 1]
    return images


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images into one grid image, row-major."""
    if not images or columns < 1:
        raise ValueError(f"expected images and columns >= 1, received {len(images)}, {columns}")
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def checkpoint_path(preset: DiffusionPresetConfig) -> Path | None:
    """The preset's checkpoint folder, resolved against the repository root."""
    return None if preset.checkpoint is None else project_path(preset.checkpoint)
