"""Evaluate a text-to-image decoder on ShapeWorld: does the image hold every requested object?

    python -m eval.generation --checkpoint checkpoints/shapes/diffusion \\
        --data out/shapeworld_diffusion --json out/generation.json --grid out/generation.png
    python -m eval.generation --preset shapes --data out/shapeworld_diffusion --single 50 --two 0
    python -m eval.generation --checkpoint runs/diffusion/final --data out/shapeworld_diffusion \\
        --scheduler dpm++ --steps 25 --guidance 4

Prints a markdown table; --json writes every figure and per-prompt record, --grid a PNG of samples
(one row per prompt: the held-out real image, then generated images for --grid-seeds seeds).
``evaluate_generation(pipe, judge, data_root, ...)`` is what the CLI and the regression test call.

Protocol:

- Prompts are held-out captions: the ``--split`` (default val) images of a ShapeWorld folder, the
  shortest caption that names every object by colour and class (eval.clip.listing_caption,
  e.g. "A picture of a red circle.", "A blue star and a white ring."). Images with one object give
  the single-object prompts, images with two the two-object prompts; the first ``--single`` /
  ``--two`` of each, in split order. Image i is generated with seed ``--seed + i``.
- The judge: SAM automatic masks (``--sam`` checkpoint, ``GEN_AMG_SETTINGS``) propose objects;
  masks covering more than half the image (background) or under ``MIN_MASK_PIXELS`` are dropped,
  as is any mask overlapping an already kept one (IoU > 0.5, larger masks first); each kept mask
  is cut out as a masked crop on the mean colour of the uncovered pixels (vision.clip.object_crop,
  eval.clip's protocol) and classified zero-shot by the ShapeWorld CLIP (``--clip``): class =
  argmax over the text heads of every class name, colour = argmax over "<colour> shape" heads
  (vision.clip templates averaged), over the vocabulary of the data folder. An image is correct
  when the labels found contain every requested (colour, class) as often as requested. This is
  the accuracy of both the single-object and the two-object prompts.
- Also reported for single-object prompts: whole-image zero-shot (the whole image classified
  once; correct when class and colour are the requested ones), and which attribute it missed.
- Ceiling and control: the same judge on the real held-out images with their own prompts (how
  often the judge finds objects that are there), and on every image against another prompt of
  its group (``shuffled_control``: how often it finds objects that are not). With
  ``--reconstructed``, also on the real images after a round trip through the decoder's own VAE
  (``vae_round_trip``): what the autoencoder alone loses, a practical ceiling for its UNet.
- CLIP image-text score: mean cosine similarity between the CLIP embeddings of each image and of
  its prompt (generated, real and, with ``--reconstructed``, round-tripped).
- Sampling time: median wall time to generate one image (batch 1, guidance on, so the UNet runs
  on 2 latents per step) over ``--time-repeats`` runs, in this process's torch thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from segment_anything import SamAutomaticMaskGenerator
from tqdm import tqdm

from core.images import square_crop
from core.io import atomic_write_text
from core.runtime import resolve_device
from data.datasets import InstanceDataset, shapeworld_paths
from data.formats import read_coco_captions
from data.scene import COLOURS, SHAPES
from data.shapeworld import read_manifest
from eval.clip import listing_caption
from eval.sam import AMG_SETTINGS
from generation.diffusion import (
    SCHEDULERS,
    generate,
    image_grid,
    load_pipeline,
    pipeline_from_preset,
    set_scheduler,
)
from vision.clip import (
    ClipModel,
    background_fill,
    encode_images,
    load_clip,
    object_crop,
    text_classifier,
)
from vision.sam import load_sam

__all__ = [
    "GEN_AMG_SETTINGS",
    "MIN_MASK_PIXELS",
    "GenerationJudge",
    "PromptItem",
    "evaluate_generation",
    "format_table",
    "labels_satisfy",
    "load_prompts",
    "main",
    "sample_grid",
    "shuffled_control",
    "time_sampling",
    "vae_round_trip",
]

MIN_MASK_PIXELS = 30  # SAM masks smaller than this are noise, not objects (ShapeWorld: >= ~300)
# eval.sam's settings with an 8x8 point grid (a click every 16 px; objects of the diffusion data
# are >= 20 px across) and the lower thresholds eval.sam reports the higher recall for: 4x fewer
# prompts than 16x16, ~0.8 s per image here. Fixed before any generated image was judged.
GEN_AMG_SETTINGS: dict[str, Any] = {
    **AMG_SETTINGS,
    "points_per_side": 8,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.5,
    "stability_score_thresh": 0.7,
}
MAX_MASK_FRACTION = 0.5  # masks covering more of the image are background
DEDUP_IOU = 0.5  # a mask overlapping a kept one this much is the same object


@dataclass
class PromptItem:
    """One held-out prompt: the caption, the objects it names, the real image it describes."""

    prompt: str
    objects: list[tuple[str, str]]  # (colour, class) per object, as many as the image holds
    image_path: Path
    image_id: int


def load_prompts(
    data_root: str | os.PathLike[str], split: str, n_single: int, n_two: int
) -> tuple[list[PromptItem], list[PromptItem]]:
    """The first n_single one-object and n_two two-object prompts of a split (module docstring)."""
    paths = shapeworld_paths(data_root, split)
    inst = InstanceDataset.from_shapeworld(data_root, split)
    coco = read_coco_captions(paths["captions"])
    by_image: dict[int, list[str]] = {}
    for cap in coco.captions:
        by_image.setdefault(cap.image_id, []).append(cap.caption)
    single: list[PromptItem] = []
    two: list[PromptItem] = []
    for i in range(len(inst)):
        if len(single) >= n_single and len(two) >= n_two:
            break
        anns = inst.annotations[i]
        objects = [(str(a.extra.get("colour")), inst.category_names[a.category_id]) for a in anns]
        target = single if len(objects) == 1 else two if len(objects) == 2 else None
        limit = n_single if len(objects) == 1 else n_two
        if target is None or len(target) >= limit:
            continue
        image_id = inst.image_ids[i]
        captions = by_image.get(image_id, [])
        if not captions:
            raise ValueError(f"{paths['captions']}: image id {image_id} has no caption")
        prompt = listing_caption(captions, objects)
        named = prompt.lower()
        if not all(f"{c} {s}" in named for c, s in objects):
            continue  # no caption names every object (does not happen in ShapeWorld)
        target.append(PromptItem(prompt, objects, inst.images_root / inst.file_names[i], image_id))
    if len(single) < n_single or len(two) < n_two:
        raise ValueError(
            f"{data_root} split {split!r}: expected {n_single} one-object and {n_two} two-object "
            f"images, found {len(single)} and {len(two)}; generate a larger split or ask for fewer"
        )
    return single, two


def labels_satisfy(found: Sequence[tuple[str, str]], requested: Sequence[tuple[str, str]]) -> bool:
    """True when `found` holds every requested (colour, class) at least as often as requested."""
    have = Counter(found)
    return all(have[k] >= n for k, n in Counter(requested).items())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


class GenerationJudge:
    """The ShapeWorld CLIP (zero-shot heads) on SAM's masks (or on whole images)."""

    def __init__(
        self,
        clip: ClipModel,
        preprocess: Any,
        tokenizer: Any,
        sam: Any | None,
        classes: Sequence[str] = SHAPES,
        colours: Sequence[str] = COLOURS,
        amg_settings: dict[str, Any] | None = None,
    ) -> None:
        self.clip, self.preprocess, self.tokenizer = clip.eval(), preprocess, tokenizer
        self.classes, self.colours = list(classes), list(colours)
        self.class_head = text_classifier(clip, tokenizer, self.classes)  # (C, D)
        self.colour_head = text_classifier(clip, tokenizer, [f"{c} shape" for c in self.colours])
        self.amg = (
            None
            if sam is None
            else SamAutomaticMaskGenerator(
                sam.eval(), **{**GEN_AMG_SETTINGS, **(amg_settings or {})}
            )
        )
        size = clip.visual.image_size
        self.input_size = int(size[0] if isinstance(size, tuple | list) else size)

    def _labels(self, emb: torch.Tensor) -> list[tuple[str, str]]:
        cls = (emb @ self.class_head.T).argmax(1).tolist()
        col = (emb @ self.colour_head.T).argmax(1).tolist()
        return [(self.colours[c], self.classes[k]) for c, k in zip(col, cls, strict=True)]

    @torch.no_grad()
    def whole_image(self, images: Sequence[Image.Image]) -> list[tuple[str, str]]:
        """(colour, class) of each image as a whole."""
        return self._labels(encode_images(self.clip, self.preprocess, list(images)))

    @torch.no_grad()
    def objects(self, image: Image.Image) -> list[tuple[str, str]]:
        """(colour, class) of every object SAM finds in `image`."""
        if self.amg is None:
            raise ValueError("judging objects needs a SAM model (pass sam=...)")
        pixels = np.asarray(image.convert("RGB"))
        h, w = pixels.shape[:2]
        masks = [r["segmentation"] for r in self.amg.generate(pixels)]
        masks = [m for m in masks if MIN_MASK_PIXELS <= m.sum() <= MAX_MASK_FRACTION * h * w]
        kept: list[np.ndarray] = []
        for m in sorted(masks, key=lambda m: -int(m.sum())):
            if all(_iou(m, k) <= DEDUP_IOU for k in kept):
                kept.append(m)
        if not kept:
            return []
        union = np.logical_or.reduce(kept)
        fill = background_fill(pixels, union)
        crops = [object_crop(pixels, m, self.input_size, fill) for m in kept]
        return self._labels(encode_images(self.clip, self.preprocess, crops))

    @torch.no_grad()
    def clip_score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """(N,) cosine similarity of each image with its prompt."""
        image_emb = encode_images(self.clip, self.preprocess, list(images))
        device = self.class_head.device
        text_emb = self.clip.encode_text(self.tokenizer(list(prompts)).to(device), normalize=True)
        return (image_emb * text_emb.float()).sum(-1).cpu().numpy()


def shuffled_control(
    found: Sequence[Sequence[tuple[str, str]]], items: Sequence[PromptItem]
) -> float | None:
    """How often the labels found in image i satisfy prompt i+1 (cyclically) instead of prompt i.

    Pairs whose two prompts request the same objects are skipped. A judge that says yes to
    anything scores high here; ours should score near 0.
    """
    hits = []
    for i, labels in enumerate(found):
        other = items[(i + 1) % len(items)]
        if Counter(other.objects) == Counter(items[i].objects):
            continue
        hits.append(labels_satisfy(labels, other.objects))
    return float(np.mean(hits)) if hits else None


def _generate_all(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int,
    steps: int,
    guidance: float,
    progress: bool,
    desc: str,
) -> list[Image.Image]:
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        part = list(prompts[start : start + batch_size])
        images += generate(
            pipe,
            part,
            seed=list(seeds[start : start + batch_size]),
            guidance_scale=guidance,
            num_inference_steps=steps,
        )
    return images


def evaluate_generation(
    pipe: Any,
    judge: GenerationJudge,
    data_root: str | os.PathLike[str],
    split: str = "val",
    n_single: int = 100,
    n_two: int = 100,
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    scheduler: str = "ddim",
    seed: int = 0,
    batch_size: int = 8,
    real: bool = True,
    reconstructed: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Generation accuracy (single / two objects), CLIP scores, and the same judge on real images
    (``real``) and on the real images round-tripped through the pipeline's VAE (``reconstructed``:
    a practical ceiling for any denoiser on this VAE; not a strict bound, as the encoder's latents
    need not be the decoder's best input).

    Returns a JSON-ready dict (accuracies in [0, 1], None for an empty group) with a "records"
    list (prompt, requested objects, labels found, correct) and the images under the private key
    "_images" (prompt order: single then two) for sample grids.
    """
    if n_single < 0 or n_two < 0 or n_single + n_two == 0:
        raise ValueError(f"expected n_single, n_two >= 0, not both 0; received {n_single}, {n_two}")
    set_scheduler(pipe, scheduler)
    single, two = load_prompts(data_root, split, n_single, n_two)
    items = single + two
    prompts = [it.prompt for it in items]
    seeds = [seed + i for i in range(len(items))]
    t0 = time.perf_counter()
    images = _generate_all(
        pipe, prompts, seeds, batch_size, num_inference_steps, guidance_scale, progress, "generate"
    )
    gen_seconds = time.perf_counter() - t0
    results: dict[str, Any] = {
        "split": split,
        "single_prompts": len(single),
        "two_prompts": len(two),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "scheduler": scheduler,
        "seed": seed,
        "generation_seconds_per_image_batched": gen_seconds / len(items),
    }
    records: list[dict[str, Any]] = []
    sources = [("generated", images)]
    if real or reconstructed:
        photos = [Image.open(it.image_path).convert("RGB") for it in items]
        if real:
            sources.append(("real", photos))
        if reconstructed:
            sources.append(("reconstructed", vae_round_trip(pipe, photos, batch_size)))
    for name, imgs in sources:
        found = [  # SAM masks + CLIP crops
            judge.objects(image)
            for image in tqdm(imgs, desc=f"judge {name}", disable=not progress, unit="img")
        ]
        ok = [labels_satisfy(f, it.objects) for f, it in zip(found, items, strict=True)]
        k = len(single)
        results[f"{name}_single_acc"] = float(np.mean(ok[:k])) if single else None
        results[f"{name}_two_acc"] = float(np.mean(ok[k:])) if two else None
        # the judge's false-positive rate: image i against another prompt of its group
        results[f"{name}_single_control"] = shuffled_control(found[:k], single)
        results[f"{name}_two_control"] = shuffled_control(found[k:], two)
        whole = judge.whole_image(imgs[:k]) if single else []
        whole_ok = [label == it.objects[0] for label, it in zip(whole, single, strict=True)]
        results[f"{name}_single_whole_acc"] = float(np.mean(whole_ok)) if single else None
        scores = judge.clip_score(imgs, prompts)
        results[f"{name}_clip_score"] = float(np.mean(scores))
        if name != "generated":
            continue
        if single:  # which attribute the whole-image judge got wrong
            results["generated_single_whole_colour_acc"] = float(
                np.mean([lab[0] == it.objects[0][0] for lab, it in zip(whole, single, strict=True)])
            )
            results["generated_single_whole_class_acc"] = float(
                np.mean([lab[1] == it.objects[0][1] for lab, it in zip(whole, single, strict=True)])
            )
        for i, item in enumerate(items):
            records.append(
                {
                    "prompt": item.prompt,
                    "requested": [list(o) for o in item.objects],
                    "found": [list(f) for f in found[i]],
                    "correct": bool(ok[i]),
                    "whole_image": list(whole[i]) if i < k else None,
                    "seed": seeds[i],
                    "clip_score": float(scores[i]),
                    "image_id": item.image_id,
                }
            )
    results["records"] = records
    results["_images"] = images
    results["_items"] = items
    return results


@torch.no_grad()
def vae_round_trip(
    pipe: Any, images: Sequence[Image.Image], batch_size: int = 8
) -> list[Image.Image]:
    """Each image encoded and decoded by ``pipe.vae`` at the pipeline's resolution (resized and
    centre-cropped as train.diffusion reads images; pixels to and from the VAE's range by the
    pipeline's own ``image_processor``; an AutoencoderKL through its posterior's mode, in the
    VAE's own dtype)."""
    vae, proc = pipe.vae, pipe.image_processor
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    param = next(vae.parameters())
    out: list[Image.Image] = []
    for start in range(0, len(images), batch_size):
        part = [square_crop(im.convert("RGB"), size) for im in images[start : start + batch_size]]
        x = proc.preprocess(part).to(param.device, param.dtype)
        encoded = vae.encode(x)  # AutoencoderTiny: .latents; AutoencoderKL: .latent_dist
        latents = getattr(encoded, "latents", None)
        if latents is None:
            latents = encoded.latent_dist.mode()
        out += proc.postprocess(vae.decode(latents).sample.float(), output_type="pil")
    return out


def time_sampling(
    pipe: Any, prompt: str, repeats: int, steps: int, guidance: float, seed: int = 0
) -> dict[str, float]:
    """Median / min seconds to generate one image (batch 1), after one warm-up run."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, received {repeats}")
    generate(pipe, [prompt], seed=seed, num_inference_steps=steps, guidance_scale=guidance)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, [prompt], seed=seed + r, num_inference_steps=steps, guidance_scale=guidance)
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def sample_grid(
    pipe: Any,
    items: Sequence[PromptItem],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    label_width: int = 260,
) -> Image.Image:
    """One row per prompt: the prompt text, the real held-out image, one image per seed."""
    rows = []
    for item in items:
        real = Image.open(item.image_path).convert("RGB")
        images = generate(
            pipe, [item.prompt] * len(seeds), seed=list(seeds), num_inference_steps=steps,
            guidance_scale=guidance,
        )  # fmt: skip
        real = real.resize(images[0].size) if images and real.size != images[0].size else real
        row = image_grid([real, *images], columns=1 + len(images))  # cells of the samples' size
        canvas = Image.new("RGB", (label_width + row.width, row.height), (255, 255, 255))
        canvas.paste(row, (label_width, 0))
        ImageDraw.Draw(canvas).text((6, row.height // 2 - 6), item.prompt, fill=(0, 0, 0))
        rows.append(canvas)
    header = Image.new("RGB", (rows[0].width, 18), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    size = real.width
    draw.text((6, 3), "prompt", fill=(0, 0, 0))
    draw.text((label_width + 6, 3), "real", fill=(0, 0, 0))
    for k, s in enumerate(seeds):
        draw.text((label_width + (k + 1) * size + 6, 3), f"seed {s}", fill=(0, 0, 0))
    return image_grid([header], 1) if not rows else _stack([header, *rows])


def _stack(parts: Sequence[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (parts[0].width, sum(p.height for p in parts)), (255, 255, 255))
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """A markdown table of the figures (percentages; CLIP scores as cosines)."""
    steps, guide = results["num_inference_steps"], results["guidance_scale"]
    n1, n2 = results["single_prompts"], results["two_prompts"]
    rows = [
        ("single-object accuracy (SAM masks + CLIP crops)", "single_acc", n1),
        ("two-object accuracy (SAM masks + CLIP crops)", "two_acc", n2),
        ("single-object accuracy (whole-image CLIP)", "single_whole_acc", n1),
        ("control: single-object, another prompt's objects", "single_control", n1),
        ("control: two-object, another prompt's objects", "two_control", n2),
    ]
    lines = [
        f"| ShapeWorld {results['split']} prompts ({results['scheduler']}, {steps} steps, "
        f"guidance {guide}) | generated | real images | n |",
        "| --- | ---: | ---: | ---: |",
    ]
    recon = "reconstructed_single_acc" in results
    if recon:  # a column for the VAE's round trip of the real images
        lines[0] = lines[0].replace("| real images |", "| real images | real, VAE round trip |")
        lines[1] += " ---: |"
    for name, key, n in rows:
        cells = [_fmt(results.get("generated_" + key)), _fmt(results.get("real_" + key))]
        if recon:
            cells.append(_fmt(results.get("reconstructed_" + key)))
        lines.append(f"| {name} | {' | '.join(cells)} | {n} |")
    blank = "| | " if recon else "| "  # the real-image column(s) of generated-only rows
    if "generated_single_whole_colour_acc" in results:
        lines += [
            f"| whole-image: colour right | {_fmt(results['generated_single_whole_colour_acc'])} "
            f"{blank}| {n1} |",
            f"| whole-image: class right | {_fmt(results['generated_single_whole_class_acc'])} "
            f"{blank}| {n1} |",
        ]
    scores = [results["generated_clip_score"], results.get("real_clip_score")]
    if recon:
        scores.append(results.get("reconstructed_clip_score"))
    score_cells = " | ".join("n/a" if v is None else f"{v:.3f}" for v in scores)
    lines.append(f"| CLIP image-text cosine | {score_cells} | {n1 + n2} |")
    if "sampling" in results:
        t = results["sampling"]
        lines.append(
            f"| seconds per 128 px image, batch 1, median of {t['repeats']} "
            f"({t['threads']} thread(s)) | {t['median_s']:.2f} {blank}| |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.generation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="a diffusion checkpoint folder")
    which.add_argument("--preset", help="the decoder of a preset (configs/<name>.json)")
    parser.add_argument("--data", type=Path, required=True, help="a ShapeWorld folder")
    parser.add_argument("--split", default="val", help="split the prompts come from (default val)")
    parser.add_argument("--single", type=int, default=100, help="one-object prompts")
    parser.add_argument("--two", type=int, default=100, help="two-object prompts")
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the preset's, else 25)"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance (default: the preset's with --preset, else 4.0)",
    )
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default=None,
        help="sampler (default: the preset's with --preset, else ddim)",
    )
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    parser.add_argument("--clip", type=Path, default=Path("checkpoints/shapes/clip"))
    parser.add_argument("--sam", type=Path, default=Path("checkpoints/shapes/sam"))
    parser.add_argument("--no-real", action="store_true", help="skip judging the real images")
    parser.add_argument(
        "--reconstructed",
        action="store_true",
        help="also judge the real images after a round trip through the decoder's VAE (the "
        "ceiling its autoencoder sets)",
    )
    parser.add_argument(
        "--time-repeats", type=int, default=5, help="timed single-image runs (0: skip timing)"
    )
    parser.add_argument("--grid", type=Path, help="write a sample grid PNG here")
    parser.add_argument("--grid-prompts", type=int, default=6, help="prompts per group in --grid")
    parser.add_argument("--grid-seeds", type=int, default=4, help="seeds per prompt in --grid")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("single", "two", "grid_prompts", "time_repeats"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, received {getattr(args, name)}")
    if args.single + args.two == 0:
        parser.error("--single and --two are both 0: nothing to evaluate")
    if args.preset is not None:
        from vlm.config import PolychromeConfig

        preset = PolychromeConfig.from_preset(args.preset).diffusion
        defaults = (preset.num_inference_steps, preset.guidance_scale, preset.scheduler)
    else:
        defaults = (25, 4.0, "ddim")
    for name, value in zip(("steps", "guidance", "scheduler"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.guidance < 0:
        parser.error(f"--guidance must be >= 0, received {args.guidance}")
    for name in ("steps", "batch_size", "grid_seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, received {getattr(args, name)}")
    try:
        shapeworld_paths(args.data, args.split)
    except FileNotFoundError as err:
        parser.error(str(err))
    device = resolve_device(args.device)
    if args.checkpoint is not None:
        pipe = load_pipeline(args.checkpoint)
        source = str(args.checkpoint)
    else:
        pipe = pipeline_from_preset(preset)
        source = f"preset {args.preset}"
    pipe.to(device)
    clip, preprocess, tokenizer = load_clip(args.clip)
    sam = load_sam(args.sam)
    clip.to(device)
    sam.to(device)
    try:
        manifest = read_manifest(args.data)
        classes = [s["name"] for s in manifest["shapes"]]
        colours = [c["name"] for c in manifest["colours"]]
    except (FileNotFoundError, KeyError):
        classes, colours = list(SHAPES), list(COLOURS)
    judge = GenerationJudge(clip, preprocess, tokenizer, sam, classes, colours)
    results = evaluate_generation(
        pipe,
        judge,
        args.data,
        args.split,
        args.single,
        args.two,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        batch_size=args.batch_size,
        real=not args.no_real,
        reconstructed=args.reconstructed,
        progress=not args.no_progress,
    )
    items = results.pop("_items")
    results.pop("_images")
    if args.time_repeats:
        results["sampling"] = time_sampling(
            pipe, items[0].prompt, args.time_repeats, args.steps, args.guidance, args.seed
        )
    results["model"] = source
    results["judge"] = {"clip": str(args.clip), "sam": str(args.sam), "amg": GEN_AMG_SETTINGS}
    results["table"] = format_table(results)
    print(results["table"])
    if args.grid is not None:
        n_single = min(args.grid_prompts, results["single_prompts"])
        n_two = min(args.grid_prompts, results["two_prompts"])
        chosen = (
            items[:n_single] + items[results["single_prompts"] : results["single_prompts"] + n_two]
        )
        grid = sample_grid(pipe, chosen, [args.seed + k for k in range(args.grid_seeds)],
                           args.steps, args.guidance)  # fmt: skip
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        print(f"wrote {args.grid}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
