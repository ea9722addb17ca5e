"""Train the ShapeWorld text-to-image decoder: the VAE first, then the UNet on its latents.

    # a CPU run (44 minutes, one thread; the data folder is generated from the preset's
    # diffusion.data config if missing). The committed checkpoints/shapes/diffusion was trained
    # on a GPU: its commands are in docs/RESULTS.md (issue 4).
    OMP_NUM_THREADS=1 python -m train.diffusion --preset shapes --data out/shapeworld_diffusion \\
        --out out/runs/diffusion --limit 12000 --vae-steps 1000 --unet-steps 600 --max-minutes 44
    # train a trained decoder further (its VAE as is; the UNet from its weights, a new schedule)
    python -m train.diffusion --preset shapes --data out/shapeworld_diffusion \\
        --out out/runs/diffusion_more --init-from checkpoints/shapes/diffusion \\
        --unet-steps 1000 --unet-lr 2e-4 --batch-size 64
    # continue an interrupted run (either stage; data order, noise and dropout resume exactly)
    python -m train.diffusion --preset shapes --data out/shapeworld_diffusion \\
        --out out/runs/diffusion --limit 12000 --vae-steps 1000 --unet-steps 600 --resume
    # one stage only: --stage vae, or --stage unet (a new UNet on the VAE in <out>/vae/final)
    python -m train.diffusion --preset shapes --data out/shapeworld_diffusion \\
        --out out/runs/diffusion --stage unet --unet-steps 3000
    # a trained decoder's VAE decoder fine-tuned, its encoder (so the latents and the UNet) kept
    python -m train.diffusion --preset shapes --data out/shapeworld_diffusion \\
        --out out/runs/diffusion_dec --init-from checkpoints/shapes/diffusion --stage decoder \\
        --vae-steps 3000 --vae-batch-size 16 --vae-crop 128 --vae-lr 1e-3
    # your own image-caption data (images are resized + centre-cropped to the model's size)
    python -m train.diffusion --preset shapes --imagefolder my_photos --out runs/diffusion_mine
    # several GPUs (each process takes its slice of every global batch)
    accelerate launch -m train.diffusion --preset shapes --data out/shapeworld_diffusion \\
        --out runs/diffusion --device cuda

Stages (``generation.diffusion`` builds both models from diffusers' classes):

1. VAE (``AutoencoderTiny``): L1 reconstruction, plus a chroma L1 term (``vae_loss``), of random
   ``--vae-crop`` crops (the model is
   fully convolutional; crops make a step 4x cheaper than whole 128 px images). At the end the
   latent scale (1 / std of the encoder's outputs over 1024 images) is measured and written
   into the VAE config (``scaling_factor``, SD's 0.18215). Output: ``<out>/vae/final``.
2. UNet (``UNet2DConditionModel``): every image is encoded once (deterministic latents) and every
   distinct caption once by the frozen text encoder (``StableDiffusionPipeline.encode_prompt``,
   so training and sampling see the same states). Each step draws one caption per image; with
   probability ``--cond-dropout`` it is replaced by "" (the negative prompt of classifier-free
   guidance). Noise prediction with min-SNR-5 loss weights (Hang et al. 2023; diffusers'
   ``compute_snr``), AdamW, linear warmup + cosine decay, grad clip 1, EMA of the weights
   (diffusers ``EMAModel``, warmup power 2/3). Sample grids of fixed prompts (EMA weights,
   25 DDIM steps) go to ``<out>/samples`` every ``--sample-every`` steps.

``--stage decoder`` (with ``--init-from``) trains only the VAE's decoder of a trained model, its
encoder frozen, with the VAE stage's loss and ``--vae-*`` settings; the latents, their scale and
so the UNet stay valid, and ``<out>/final`` is the UNet as it was with the new decoder. Stable
Diffusion's released VAE was improved the same way (the "ft-MSE" decoder, encoder kept so the
UNet needed no retraining). Output of the stage: ``<out>/decoder/final``.

``--max-minutes`` is a wall-clock budget for the whole run (both stages): when it runs out the
UNet stage saves its state and finishes with the steps it has (the model card says so); a VAE or
decoder stage saves its state and exits without final/ (``--resume`` continues it).

Output: ``<out>/final``: a core.checkpoint folder with ``vae.safetensors`` and ``unet.safetensors``
(EMA weights, fp16), the DiffusionConfig as its config, MODEL_CARD.md and, with --eval, the figures
of ``python -m eval.generation`` (run as a subprocess: train and eval do not import each other).
Load it with ``generation.diffusion.load_pipeline``. ``<out>/train_log.jsonl``: one line per step.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

# The defining module, not `diffusers.AutoencoderTiny`: mypy reads diffusers/__init__'s
# no-torch branch first and types that name as the method-less dummy placeholder.
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from tqdm import tqdm

from core.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from core.io import atomic_dir, atomic_write_text
from core.runtime import resolve_device, seed_everything
from data.datasets import (
    CaptionDataset,
    add_caption_arguments,
    caption_source_error,
    shapeworld_paths,
    user_captions_from_args,
)
from data.shapeworld import generate as generate_shapeworld
from data.shapeworld import read_manifest
from generation.diffusion import (
    DiffusionConfig,
    assemble_pipeline,
    build_noise_scheduler,
    build_unet,
    build_vae,
    encode_prompts,
    generate,
    get_diffusion_config,
    image_grid,
    list_diffusion_configs,
)
from train.common import batch_indices, cosine_with_warmup, decode_images, make_accelerator
from vlm.config import PolychromeConfig

PRESET_MODELS = {"shapes": "shapes-ldm", "tiny": "tiny-ldm"}
FINAL = "final"
LOG_NAME = "train_log.jsonl"
SAMPLE_PROMPTS = (
    "A red circle.",
    "A blue star.",
    "A green triangle.",
    "A yellow square.",
    "A white heart.",
    "A purple cross.",
    "A red circle and a blue square.",
    "A cyan hexagon and an orange ring.",
)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_pairs(args: argparse.Namespace) -> tuple[CaptionDataset, dict[str, Any]]:
    """The image-caption pairs named on the command line, and where they came from."""
    if args.data is not None:
        datasets = [CaptionDataset.from_shapeworld(args.data, s) for s in args.splits]
        manifest = read_manifest(args.data)
        description: dict[str, Any] = {
            "kind": "shapeworld",
            "root": str(args.data),
            "splits": list(args.splits),
            "data_seed": manifest.get("config", {}).get("seed"),
            "layout": manifest.get("config", {}).get("layout"),
            "generator_version": manifest.get("generator_version"),
        }
        pairs = CaptionDataset(
            [p for d in datasets for p in d.image_paths], [c for d in datasets for c in d.captions]
        )
        if len(pairs) == 0:
            raise ValueError(f"no image-caption pairs found in {description}")
    else:
        pairs, description = user_captions_from_args(args)
    if args.limit is not None:
        pairs = CaptionDataset(pairs.image_paths[: args.limit], pairs.captions[: args.limit])
    description.update(images=len(pairs), captions=sum(len(c) for c in pairs.captions))
    return pairs, description


def ensure_data(root: Path, preset: str) -> None:
    """Generate the preset's diffusion ShapeWorld (pretrain + val) into `root` if it is missing."""
    if (root / "shapeworld.json").is_file():
        return
    cfg = PolychromeConfig.from_preset(preset).diffusion.data
    print(f"generating ShapeWorld for diffusion into {root} ({cfg.splits.to_dict()})")
    generate_shapeworld(root, cfg)


def pick_captions(offsets: np.ndarray, indices: np.ndarray, seed: int, step: int) -> np.ndarray:
    """One caption (a flat index) per image in `indices`: a function of (seed, step)."""
    rng = np.random.default_rng([seed, step, 7])
    counts = offsets[indices + 1] - offsets[indices]
    return offsets[indices] + (rng.random(len(indices)) * counts).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Training state (train.common's layout, plus EMA tensors and a stage name)
# --------------------------------------------------------------------------------------------


def save_state(
    folder: Path,
    tensors: dict[str, dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Atomically replace ``folder/last`` (weights: safetensors; optimizer state: torch.save)."""
    with atomic_dir(folder / "last", overwrite=True) as tmp:
        save_checkpoint(tmp / "weights", tensors, config, {"step": step})
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "torch_rng": torch.random.get_rng_state(),
            **(extra or {}),
        }
        torch.save(state, tmp / "optimizer.pt")


class ResumeMismatchError(ValueError):
    """A saved training state whose settings differ from this run's."""


def load_state(
    folder: Path, config: dict[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(tensors, optimizer state) of ``folder/last``; ValueError if trained with other settings."""
    ckpt = load_checkpoint(folder / "last" / "weights")
    config = json.loads(json.dumps(config))  # as saved: tuples become lists
    if ckpt.config != config:
        changed = sorted(
            k for k in set(ckpt.config) | set(config) if ckpt.config.get(k) != config.get(k)
        )
        raise ResumeMismatchError(
            f"{folder / 'last'} was trained with other settings ({changed}); resume with the "
            "same arguments (--init-from included) or start a new --out"
        )
    state = torch.load(folder / "last" / "optimizer.pt", map_location="cpu", weights_only=True)
    return ckpt.tensors, state


# --------------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------------


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1  # uint8 -> [-1, 1]


def _out_of_time(accelerator: Accelerator, deadline: float) -> bool:
    """Past the deadline on any process (every process must stop at the same step, or the others
    would wait for it forever)."""
    late = time.time() > deadline
    if accelerator.num_processes == 1:
        return late
    return bool(accelerator.reduce(torch.tensor(float(late), device=accelerator.device), "max"))


class _Reconstruct(torch.nn.Module):
    """The VAE's encode-decode round trip as one forward: what DDP wraps (a DDP module has no
    ``encode``)."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae  # an AutoencoderTiny (generation.diffusion.build_vae)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> its reconstruction (B, 3, H, W)."""
        return self.vae.decode(self.vae.encode(x).latents).sample


def train_vae(
    cfg: DiffusionConfig,
    images: torch.Tensor,
    args: argparse.Namespace,
    accelerator: Accelerator,
    log: Any,
    deadline: float,
    decoder_from: dict[str, torch.Tensor] | None = None,
) -> DiffusionConfig:
    """Train the VAE (resumable); write ``<out>/vae/final``; return cfg with the latent scale.

    With ``decoder_from`` (a trained VAE's tensors: ``--stage decoder``) only its decoder trains,
    the encoder frozen, the latent scale kept; output ``<out>/decoder/final``."""
    stage = "vae" if decoder_from is None else "decoder"
    folder = args.out / stage
    final = folder / FINAL
    run_config = {
        "stage": stage,
        "diffusion": cfg.to_dict(),
        "seed": args.seed,
        "batch_size": args.vae_batch_size,
        "crop": args.vae_crop,
        "chroma_weight": args.vae_chroma_weight,
        "lr": args.vae_lr,
        "steps": args.vae_steps,
    }
    if decoder_from is not None:
        run_config["init_from"] = str(args.init_from)
    if final.is_dir():
        ckpt = load_checkpoint(final)
        # a finished decoder stage is reused only with its own settings (a VAE stage is also
        # reused by a later `--stage unet` run, which need not repeat the --vae-* arguments)
        done_with = ckpt.metadata.get("run_config") or {}
        wanted = json.loads(json.dumps(run_config))  # as saved: tuples become lists
        if decoder_from is not None and done_with != wanted:
            differ = sorted(
                k for k in set(done_with) | set(wanted) if done_with.get(k) != wanted.get(k)
            )
            raise ResumeMismatchError(
                f"{final} was trained with other settings ({differ}): use a new --out"
            )
        print(f"{stage} stage done already: {final}")
        return DiffusionConfig.from_dict(ckpt.config)
    device = accelerator.device
    torch.manual_seed(args.seed)  # the init does not depend on what ran before
    vae = build_vae(cfg.vae)
    if decoder_from is not None:
        load_state_strict(vae, {k: v.float() for k, v in decoder_from.items()}, what="the VAE")
        vae.encoder.requires_grad_(False)
    vae = vae.to(device).train()
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.vae_lr, weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, max(1, args.vae_steps // 20), args.vae_steps)
    start = 0
    if args.resume and (folder / "last").is_dir():
        tensors, state = load_state(folder, run_config)
        load_state_strict(vae, tensors["vae"], what=str(folder / "last"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
    model, prepared = accelerator.prepare(_Reconstruct(vae), optimizer)
    n, size = images.shape[0], images.shape[-1]
    crop = min(args.vae_crop, size)
    world, rank, main_process = (
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.is_main_process,
    )
    batches = batch_indices(n, args.vae_batch_size * world, args.seed, start)
    local = slice(rank * args.vae_batch_size, (rank + 1) * args.vae_batch_size)
    bar = tqdm(
        range(start, args.vae_steps),
        initial=start,
        total=args.vae_steps,
        desc=f"train {stage}",
        disable=not main_process,
    )
    for step in bar:
        idx = torch.from_numpy(next(batches)[local])
        rng = np.random.default_rng([args.seed, step, 1])
        top, left = (int(v) for v in rng.integers(0, size - crop + 1, size=2))
        x = _to_unit(images[idx, :, top : top + crop, left : left + crop]).to(device)
        with accelerator.autocast():
            recon = model(x)
        loss = vae_loss(recon.float(), x, args.vae_chroma_weight)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        prepared.step()
        scheduler.step()
        prepared.zero_grad(set_to_none=True)
        done = step + 1
        value = accelerator.reduce(loss.detach(), "mean").item()  # the global batch's
        bar.set_postfix(loss=f"{value:.4f}")
        if main_process:
            log.write(json.dumps({"stage": stage, "step": done, "loss": value}) + "\n")
            log.flush()
        out_of_time = args.max_minutes is not None and _out_of_time(accelerator, deadline)
        if done % args.save_every == 0 or done == args.vae_steps or out_of_time:
            accelerator.wait_for_everyone()
            if main_process:
                state = {"vae": vae.state_dict()}
                save_state(folder, state, optimizer, scheduler, done, run_config)
        if main_process and (done % args.sample_every == 0 or done == args.vae_steps):
            _save_reconstructions(vae, images, args.out / "samples" / f"{stage}_{done:06d}.png")
        if out_of_time:
            raise SystemExit(
                f"--max-minutes {args.max_minutes} ran out during the {stage} stage (step {done} "
                f"of {args.vae_steps}); state saved in {folder / 'last'}: rerun with --resume"
            )
    bar.close()
    vae.eval()
    if decoder_from is None:
        scale = latent_scale(vae, images, device)
        cfg = cfg.replace(vae=cfg.vae.replace(scaling_factor=scale))
        info: dict[str, Any] = {"steps": args.vae_steps, "latent_std": 1 / scale}
    else:  # the encoder did not move: its latents keep their scale
        info = {"steps": args.vae_steps, "decoder_only": True, "run_config": run_config}
    if main_process:
        save_checkpoint(final, {"vae": vae.state_dict()}, cfg.to_dict(), info, overwrite=True)
        print(f"{stage} done: scaling_factor {cfg.vae.scaling_factor:.4f}")
    accelerator.wait_for_everyone()  # the UNet stage reads vae/final in every process
    return cfg


def vae_loss(recon: torch.Tensor, target: torch.Tensor, chroma_weight: float) -> torch.Tensor:
    """L1 on RGB plus chroma_weight x L1 on chroma (each pixel minus its channel mean).

    recon, target: (B, 3, H, W) in [-1, 1]. With plain L1 the VAE learned luminance long before
    colour (after 400 steps its reconstructions kept ~30 % of the images' chroma) -- and colour
    is half of every ShapeWorld prompt. The chroma term makes colour errors count from the start.
    """
    loss = F.l1_loss(recon, target)
    if chroma_weight > 0:
        chroma_r = recon - recon.mean(dim=1, keepdim=True)
        chroma_t = target - target.mean(dim=1, keepdim=True)
        loss = loss + chroma_weight * F.l1_loss(chroma_r, chroma_t)
    return loss


@torch.no_grad()
def latent_scale(vae: AutoencoderTiny, images: torch.Tensor, device: torch.device) -> float:
    """1 / std of the encoder's latents over (up to) the first 1024 images."""
    parts = []
    for start in range(0, min(1024, images.shape[0]), 64):
        x = _to_unit(images[start : start + 64]).to(device)
        parts.append(vae.encode(x).latents.float().cpu())
    return float(1.0 / torch.cat(parts).std().clamp_min(1e-6))


@torch.no_grad()
def _save_reconstructions(vae: AutoencoderTiny, images: torch.Tensor, path: Path) -> None:
    """Top row: 8 images; bottom row: their reconstructions."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    x = _to_unit(images[:8]).to(device)
    recon = vae.decode(vae.encode(x).latents).sample.clamp(-1, 1)
    pixels = ((torch.cat([x, recon]) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()
    grid = image_grid([Image.fromarray(p.numpy()) for p in pixels], columns=len(x))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    vae.train(was_training)


# --------------------------------------------------------------------------------------------
# Stage 2: UNet
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(
    vae: AutoencoderTiny,
    images: torch.Tensor,
    scale: float,
    device: torch.device,
    batch: int = 64,
) -> torch.Tensor:
    """(N, C_lat, s, s) float32 scaled latents of every image (the VAE is deterministic)."""
    out = []
    for start in tqdm(range(0, images.shape[0], batch), desc="encode latents", unit="batch"):
        x = _to_unit(images[start : start + batch]).to(device)
        out.append((vae.encode(x).latents.float() * scale).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_captions(pipe: Any, texts: list[str], batch: int = 256) -> torch.Tensor:
    """(U, T, D) float16 text states of every distinct caption, via the pipeline's encode_prompt.

    Captions longer than the encoder's padded length are truncated (as at sampling time); their
    count is printed once instead of the pipeline's per-batch warning.
    """
    limit = pipe.tokenizer.model_max_length
    lengths = [len(ids) for ids in pipe.tokenizer(texts, verbose=False).input_ids]
    too_long = sum(n > limit for n in lengths)
    if too_long:
        print(f"{too_long} of {len(texts)} distinct captions exceed {limit} tokens: truncated")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        out = []
        for start in tqdm(range(0, len(texts), batch), desc="encode captions", unit="batch"):
            out.append(encode_prompts(pipe, texts[start : start + batch]).to(torch.float16).cpu())
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return torch.cat(out)


def unet_loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    text: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None,
) -> torch.Tensor:
    """Denoising loss of one batch (latents (B, C, s, s), text (B, T, D), timesteps (B,))."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, text).sample
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    # min-SNR-gamma weights (Hang et al. 2023), as in diffusers' train_text_to_image.py
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = (
        weights / snr
        if noise_scheduler.config.prediction_type == "epsilon"
        else weights / (snr + 1)
    )
    per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_item * weights).mean()


def train_unet(
    cfg: DiffusionConfig,
    images: torch.Tensor,
    pairs: CaptionDataset,
    args: argparse.Namespace,
    accelerator: Accelerator,
    log: Any,
    deadline: float,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module, int, bool]:
    """Train the UNet (resumable), from `init` weights when given. Returns (vae, EMA unet, steps
    done, stopped by the clock)."""
    device = accelerator.device
    vae_ckpt = load_checkpoint(args.out / "vae" / FINAL)
    vae = build_vae(cfg.vae)
    load_state_strict(vae, vae_ckpt.tensors["vae"], what="vae/final")
    vae.to(device).eval().requires_grad_(False)
    torch.manual_seed(args.seed + 1)  # the same init whether or not the VAE stage ran here
    unet = build_unet(cfg)
    if init is not None:  # --init-from: the EMA below starts from these weights too
        load_state_strict(unet, {k: v.float() for k, v in init.items()}, what="--init-from unet")
    unet = unet.to(device).train()
    pipe = assemble_pipeline(cfg, vae, unet)
    pipe.text_encoder.to(device)

    texts: list[str] = []
    index: dict[str, int] = {}
    offsets, ids = [0], []
    for caps in pairs.captions:
        for c in caps:
            ids.append(index.setdefault(c, len(index)))
            if len(index) > len(texts):
                texts.append(c)
        offsets.append(len(ids))
    offsets_np, ids_np = np.asarray(offsets, np.int64), np.asarray(ids, np.int64)
    states = encode_captions(pipe, texts)  # (U, T, D) float16
    empty = encode_prompts(pipe, [""]).to(device)  # (1, T, D): the dropped condition
    latents = encode_latents(vae, images, cfg.vae.scaling_factor, device)  # (N, C, s, s)

    noise_scheduler = build_noise_scheduler(cfg)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    scheduler = cosine_with_warmup(optimizer, max(1, args.unet_steps // 20), args.unet_steps)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3)
    names = [k for k, _ in unet.named_parameters()]
    run_config = {
        "stage": "unet",
        "diffusion": cfg.to_dict(),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.unet_lr,
        "steps": args.unet_steps,
        "cond_dropout": args.cond_dropout,
        "snr_gamma": args.snr_gamma,
        "ema_decay": args.ema_decay,
        "images": len(pairs),
    }
    if init is not None:  # runs started from scratch keep the keys they were saved with
        run_config["init_from"] = str(args.init_from)
    folder = args.out / "unet"
    start = 0
    if args.resume and (folder / "last").is_dir():
        tensors, state = load_state(folder, run_config)
        load_state_strict(unet, tensors["unet"], what=str(folder / "last"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema_state = ema.state_dict()
        ema_state["shadow_params"] = [tensors["ema"][k].to(device) for k in names]
        ema_state["optimization_step"] = int(state["ema_step"])
        ema.load_state_dict(ema_state)
        start = int(state["step"])
    model, prepared = accelerator.prepare(unet, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = args.batch_size * world
    batches = batch_indices(latents.shape[0], global_batch, args.seed, start)
    bar = tqdm(
        range(start, args.unet_steps),
        initial=start,
        total=args.unet_steps,
        desc="train unet",
        disable=not accelerator.is_main_process,
    )
    done, stopped = start, False
    for step in bar:
        indices = next(batches)
        caption_ids = ids_np[pick_captions(offsets_np, indices, args.seed, step)]
        local = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
        idx = torch.from_numpy(indices[local])
        text = states[torch.from_numpy(caption_ids[local])].to(device, torch.float32)
        # Drawn for the global batch, each process keeping its slice: the draws one process makes
        # for the whole batch (drawn for the slice alone, every process had the same noise).
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        n = len(indices)
        drop = (torch.rand(n, generator=gen) < args.cond_dropout)[local]
        text[drop.to(device)] = empty[0]
        x0 = latents[idx].to(device)
        noise = torch.randn((n, *latents.shape[1:]), generator=gen)[local].to(device)
        timesteps = torch.randint(0, cfg.num_train_timesteps, (n,), generator=gen)[local]
        timesteps = timesteps.to(device)
        with accelerator.autocast():
            loss = unet_loss(model, noise_scheduler, x0, text, noise, timesteps, args.snr_gamma)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        prepared.step()
        scheduler.step()
        prepared.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        done = step + 1
        value = accelerator.reduce(loss.detach(), "mean").item()  # the global batch's
        if accelerator.is_main_process:
            log.write(json.dumps({"stage": "unet", "step": done, "loss": value}) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{value:.4f}")
        out_of_time = args.max_minutes is not None and _out_of_time(accelerator, deadline)
        stopped = done < args.unet_steps and (out_of_time or done == args.unet_stop_at)
        if done % args.save_every == 0 or done == args.unet_steps or stopped:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shadow = dict(zip(names, ema.shadow_params, strict=True))
                save_state(
                    folder,
                    {"unet": unet.state_dict(), "ema": shadow},
                    optimizer,
                    scheduler,
                    done,
                    run_config,
                    {"ema_step": ema.optimization_step},
                )
        if accelerator.is_main_process and (
            done % args.sample_every == 0 or done == args.unet_steps or stopped
        ):
            _save_samples(pipe, ema, unet, args.out / "samples" / f"unet_{done:06d}.png")
        if stopped:
            why = (
                "--unet-stop-at"
                if done == args.unet_stop_at
                else f"--max-minutes {args.max_minutes}"
            )
            print(f"{why}: stopping the UNet stage at step {done}")
            break
    bar.close()
    ema.copy_to(unet.parameters())  # the final weights are the EMA weights
    unet.eval()
    return vae, unet, done, stopped


@torch.no_grad()
def _save_samples(pipe: Any, ema: EMAModel, unet: torch.nn.Module, path: Path) -> None:
    """One row of SAMPLE_PROMPTS (seed 0) with the EMA weights, 25 DDIM steps."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    try:
        prompts = list(SAMPLE_PROMPTS)
        images = generate(pipe, prompts, seed=0, guidance_scale=4.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, columns=len(prompts)).save(path)
    finally:
        ema.restore(unet.parameters())
        unet.train()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.diffusion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESET_MODELS), default="shapes")
    parser.add_argument(
        "--model", choices=list_diffusion_configs(), help="diffusion variant (default: preset's)"
    )
    src = parser.add_argument_group("data (exactly one source)")
    src.add_argument(
        "--data",
        type=Path,
        help="ShapeWorld folder; generated from the preset's diffusion.data config if missing",
    )
    src.add_argument(
        "--splits",
        type=lambda s: [x for x in s.split(",") if x],
        default=["pretrain"],
        help="ShapeWorld splits to train on, comma-separated (default pretrain)",
    )
    add_caption_arguments(src)
    src.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument(
        "--out", type=Path, required=True, help="run folder (vae/, unet/ or decoder/, final/)"
    )
    parser.add_argument(
        "--stage",
        choices=["all", "vae", "unet", "decoder"],
        default="all",
        help="all (VAE then UNet), vae, unet, or decoder: fine-tune only the VAE decoder of "
        "--init-from's model, its encoder and UNet kept (module docstring)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue training a trained decoder (a final/ folder, e.g. "
        "checkpoints/shapes/diffusion): its VAE as is, its UNet weights as the start, with a "
        "fresh optimizer, schedule and EMA (UNet stage only); with --stage decoder, the model "
        "whose VAE decoder is fine-tuned",
    )
    parser.add_argument(
        "--vae-steps",
        type=int,
        default=1000,
        help="VAE optimizer steps (with --stage decoder: the decoder's)",
    )
    parser.add_argument(
        "--vae-batch-size", type=int, default=16, help="crops per VAE step per process"
    )
    parser.add_argument("--vae-crop", type=int, default=64, help="VAE training crop side (px)")
    parser.add_argument("--vae-lr", type=float, default=3e-3, help="peak VAE learning rate")
    parser.add_argument(
        "--vae-chroma-weight",
        type=float,
        default=3.0,
        help="weight of the chroma L1 term of the VAE loss (0: plain L1)",
    )
    parser.add_argument("--unet-steps", type=int, default=600, help="UNet optimizer steps")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="UNet images per step per process"
    )
    parser.add_argument(
        "--unet-stop-at",
        type=int,
        default=None,
        help="end the UNet stage after this step of the --unet-steps schedule and write final/ "
        "(reproduces a run that --max-minutes stopped: the committed one stopped at 4957 of 6000)",
    )
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="peak UNet learning rate")
    parser.add_argument(
        "--cond-dropout", type=float, default=0.1, help="captions replaced by '' (for guidance)"
    )
    parser.add_argument(
        "--snr-gamma", type=float, default=5.0, help="min-SNR loss weight cap (0: plain MSE)"
    )
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (max)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="wall-clock budget for the whole run; the UNet stage stops early when it is spent "
        "and writes final/; a VAE or decoder stage saves its state and exits (--resume goes on)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="data order, noise, init")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/*/last")
    parser.add_argument("--save-every", type=int, default=100, help="steps between states")
    parser.add_argument("--sample-every", type=int, default=300, help="steps between samples")
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads")
    parser.add_argument(
        "--eval", action="store_true", help="run eval.generation on <out>/final (--data val split)"
    )
    parser.add_argument(
        "--eval-args",
        default="",
        help='extra arguments for eval.generation, quoted (e.g. "--limit 50")',
    )
    return parser


def start_from(
    folder: Path, cfg: DiffusionConfig, out: Path, accelerator: Accelerator
) -> tuple[DiffusionConfig, dict[str, torch.Tensor]]:
    """--init-from: the trained decoder's config (its latent scale included) and UNet tensors;
    its VAE is written to ``<out>/vae/final`` (once), so the UNet stage reads it as its own. A
    ``vae/final`` that came from elsewhere is refused (the UNet would learn another latent
    space)."""
    ckpt = load_checkpoint(folder)
    if set(ckpt.tensors) != {"vae", "unet"}:
        raise CheckpointError(
            f"{folder}: expected vae.safetensors and unet.safetensors, found {sorted(ckpt.tensors)}"
        )
    saved = DiffusionConfig.from_dict(ckpt.config, source=f"{folder} config")
    # the same architecture: equal but for the VAE's measured latent scale
    if saved.replace(vae=saved.vae.replace(scaling_factor=cfg.vae.scaling_factor)) != cfg:
        raise ValueError(
            f"{folder} holds a {saved.name!r} decoder, this run builds {cfg.name!r} "
            f"(--model / --preset); pass --model {saved.name}"
            if saved.name != cfg.name
            else f"{folder} holds a {saved.name!r} decoder whose config differs from the "
            "registered one; train it from scratch instead"
        )
    vae_final = out / "vae" / FINAL
    if vae_final.is_dir():
        came_from = load_checkpoint(vae_final).metadata.get("copied_from")
        if came_from != str(folder):
            raise ValueError(
                f"{out} already holds a VAE ({vae_final}, from {came_from or 'its own VAE stage'}),"
                f" not {folder}'s: use a new --out"
            )
    elif accelerator.is_main_process:
        save_checkpoint(
            vae_final,
            {"vae": {k: v.float() for k, v in ckpt.tensors["vae"].items()}},
            saved.to_dict(),
            {"copied_from": str(folder)},
        )
    accelerator.wait_for_everyone()
    return saved, ckpt.tensors["unet"]


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    why = caption_source_error(args)
    if why:
        parser.error(why)
    for name in (
        "vae_steps",
        "vae_batch_size",
        "vae_crop",
        "unet_steps",
        "batch_size",
        "save_every",
        "sample_every",
        "workers",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, received {getattr(args, name)}")
    for name in ("vae_lr", "unet_lr"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, received {getattr(args, name)}")
    if not 0 <= args.cond_dropout < 1:
        parser.error(f"--cond-dropout must be in [0, 1), received {args.cond_dropout}")
    if not 0 < args.ema_decay < 1:
        parser.error(f"--ema-decay must be in (0, 1), received {args.ema_decay}")
    if args.unet_stop_at is not None and not 1 <= args.unet_stop_at <= args.unet_steps:
        parser.error(
            f"--unet-stop-at must be in [1, --unet-steps={args.unet_steps}], received "
            f"{args.unet_stop_at}"
        )
    if args.max_minutes is not None and args.max_minutes <= 0:
        parser.error(f"--max-minutes must be > 0, received {args.max_minutes}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, received {args.limit}")
    if args.eval and args.data is None:
        parser.error("--eval needs a ShapeWorld --data folder (its val split gives the prompts)")
    if args.stage == "decoder" and args.init_from is None:
        parser.error("--stage decoder fine-tunes a trained model's VAE decoder: give --init-from")
    if args.init_from is not None:
        if args.stage == "vae":
            parser.error("--init-from continues the UNet: it cannot go with --stage vae")
        if not (args.init_from / "manifest.json").is_file():
            parser.error(f"--init-from: {args.init_from} is not a checkpoint folder (no manifest)")
    elif args.stage == "unet" and not (args.out / "vae" / FINAL).is_dir():
        parser.error(f"--stage unet needs a trained VAE in {args.out / 'vae' / FINAL}")
    # a decoder run and a UNet run never share an --out: final/ would keep one and drop the other
    if args.stage == "decoder" and (args.out / "unet").is_dir():
        parser.error(f"--stage decoder: {args.out} holds a UNet run; use a new --out")
    if args.stage in ("all", "unet") and (args.out / "decoder").is_dir():
        parser.error(
            f"{args.out} holds a --stage decoder run: resume it with --stage decoder, or use a "
            "new --out"
        )
    has_state = any((args.out / s / "last").is_dir() for s in ("vae", "unet", "decoder"))
    if args.resume and not has_state and not (args.out / "vae" / FINAL).is_dir():
        parser.error(f"--resume: no training state in {args.out}; start without --resume")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    t_start = time.time()
    deadline = t_start + 60 * args.max_minutes if args.max_minutes is not None else float("inf")
    cfg = get_diffusion_config(args.model or PRESET_MODELS[args.preset])
    command = "python -m train.diffusion " + shlex.join(argv)

    device = resolve_device(args.device)
    accelerator = make_accelerator(
        cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no"
    )
    seed_everything(args.seed)
    if args.data is not None:
        if accelerator.is_main_process:  # one process writes the data, the others read it
            ensure_data(args.data, args.preset)
        accelerator.wait_for_everyone()
        for split in args.splits + (["val"] if args.eval else []):
            try:
                shapeworld_paths(args.data, split)
            except FileNotFoundError as err:
                parser.error(str(err))
    try:
        pairs, description = load_pairs(args)
    except (ValueError, OSError) as err:  # bad data: say what, no traceback
        parser.error(str(err))
    unet_batch = 0 if args.stage == "decoder" else args.batch_size * accelerator.num_processes
    if len(pairs) < max(unet_batch, args.vae_batch_size):
        unet_part = (
            f"{args.batch_size} (UNet, x {accelerator.num_processes} processes) and "
            if unet_batch
            else ""
        )
        parser.error(
            f"need at least one batch: {len(pairs)} images for batches of {unet_part}"
            f"{args.vae_batch_size} (VAE)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    init_unet: dict[str, torch.Tensor] | None = None
    if args.init_from is not None:  # before the images are decoded: a bad folder fails fast
        args.init_from = args.init_from.resolve()  # as recorded (resume key, metadata)
        try:
            cfg, init_unet = start_from(args.init_from, cfg, args.out, accelerator)
        except (CheckpointError, ValueError) as err:
            parser.error(f"--init-from: {err}")
    images = decode_images(pairs.image_paths, cfg.image_size, args.workers)
    log_path = args.out / LOG_NAME
    with log_path.open("a", encoding="utf-8") as log:
        try:
            if args.stage == "decoder":
                assert init_unet is not None  # _check_args: --stage decoder needs --init-from
                copied = load_checkpoint(args.out / "vae" / FINAL).tensors["vae"]
                cfg = train_vae(cfg, images, args, accelerator, log, deadline, copied)
                vae_state = load_checkpoint(args.out / "decoder" / FINAL).tensors["vae"]
                unet_state, steps, stopped = init_unet, 0, False  # the UNet as it was
            else:
                cfg = train_vae(cfg, images, args, accelerator, log, deadline)
                if args.stage == "vae":
                    return 0
                vae, unet, steps, stopped = train_unet(
                    cfg, images, pairs, args, accelerator, log, deadline, init_unet
                )
                vae_state, unet_state = vae.state_dict(), unet.state_dict()
        except ResumeMismatchError as err:  # --resume with other settings: a usage error
            parser.error(str(err))
    seconds = time.time() - t_start
    if not accelerator.is_main_process:
        return 0
    final = args.out / FINAL
    metadata = {
        "vae_steps": args.vae_steps if args.init_from is None else 0,
        "decoder_steps": args.vae_steps if args.stage == "decoder" else 0,
        "init_from": None if args.init_from is None else str(args.init_from),
        "unet_steps": steps,
        "unet_steps_planned": 0 if args.stage == "decoder" else args.unet_steps,
        "stopped_early": stopped,
        "command": command,
        "data": description,
        "train_seconds_this_run": round(seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
    }
    tensors = {
        "vae": {k: v.to(torch.float16) for k, v in vae_state.items()},
        "unet": {k: v.to(torch.float16) for k, v in unet_state.items()},
    }
    save_checkpoint(final, tensors, cfg.to_dict(), metadata, overwrite=True)
    results = _run_eval(final, args) if args.eval else None
    write_model_card(final, cfg, args, metadata, results)
    print(f"wrote {final} ({seconds / 60:.1f} minutes)")
    return 0


def _run_eval(final: Path, args: argparse.Namespace) -> dict[str, Any]:
    """python -m eval.generation on the --data val split, in a subprocess."""
    out = final / "eval.json"
    cmd = [sys.executable, "-m", "eval.generation", "--checkpoint", str(final)]
    cmd += ["--data", str(args.data), "--json", str(out), "--grid", str(final / "samples.png")]
    cmd += ["--device", args.device, *shlex.split(args.eval_args)]
    subprocess.run(cmd, check=True)
    results: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return results


def _vae_line(cfg: DiffusionConfig, args: argparse.Namespace, metadata: dict[str, Any]) -> str:
    scale = f"latent scaling factor {cfg.vae.scaling_factor:.4f}"
    crops = f"batch {args.vae_batch_size} crops of {args.vae_crop} px, lr {args.vae_lr}"
    if metadata["init_from"] is None:
        return f"- VAE: {metadata['vae_steps']} steps, {crops}; {scale}"
    if metadata["decoder_steps"]:
        return (
            f"- VAE: `{metadata['init_from']}`'s, its decoder fine-tuned for "
            f"{metadata['decoder_steps']} steps ({crops}, chroma weight {args.vae_chroma_weight}), "
            f"its encoder frozen ({scale}, unchanged)"
        )
    return (
        f"- VAE: copied from `{metadata['init_from']}` ({scale}); the UNet below started from "
        "its weights"
    )


def write_model_card(
    final: Path,
    cfg: DiffusionConfig,
    args: argparse.Namespace,
    metadata: dict[str, Any],
    results: dict[str, Any] | None,
) -> None:
    manifest = json.loads((final / "manifest.json").read_text(encoding="utf-8"))
    files = manifest["files"]
    lines = [
        f"# Text-to-image decoder `{cfg.name}` (Polychrome)",
        "",
        "A latent diffusion model built from diffusers' classes (`AutoencoderTiny` VAE, "
        "`UNet2DConditionModel`), conditioned on the token states of the frozen sentence encoder "
        f"`{cfg.text_source}` (padded to {cfg.text_max_length} tokens), run through a stock "
        "`StableDiffusionPipeline`. The frozen encoder is not stored; "
        "`generation.diffusion.load_pipeline` rebuilds it from its source.",
        "",
        "## Command",
        "",
        f"    {metadata['command']}",
        "",
        "## Data",
        "",
        *[f"- {k}: {v}" for k, v in metadata["data"].items()],
        "",
        "## Training",
        "",
        _vae_line(cfg, args, metadata),
        (
            f"- UNet: `{metadata['init_from']}`'s, unchanged (its latents did not move)"
            if metadata["decoder_steps"]
            else f"- UNet: {metadata['unet_steps']} of {metadata['unet_steps_planned']} planned "
            f"steps{' (stopped early)' if metadata['stopped_early'] else ''}, batch "
            f"{args.batch_size}, lr {args.unet_lr}, condition dropout {args.cond_dropout}, min-SNR "
            f"gamma {args.snr_gamma}, EMA decay {args.ema_decay}; seed {args.seed}"
        ),
        f"- device: {metadata['device']} ({metadata['threads']} threads); wall seconds "
        f"(this run): {metadata['train_seconds_this_run']}",
        f"- diffusers {metadata['diffusers_version']}, torch {metadata['torch_version']}",
        "",
        "## Weights (fp16 safetensors; the UNet holds the EMA weights)",
        "",
        *[
            f"- `{name}` ({info['bytes']} bytes): sha256 `{info['sha256']}`"
            for name, info in files.items()
        ],
        "",
        "## Config",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=2),
        "```",
        "",
    ]
    if results is not None:
        lines += ["## Evaluation (`python -m eval.generation`)", "", results["table"], ""]
    atomic_write_text(final / "MODEL_CARD.md", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
