"""GILL's contextual generation on ShapeWorld stories (data/stories.py), against the caption alone.

    python -m eval.gill_stories --checkpoint checkpoints/shapes/gill \\
        --data out/shapeworld_diffusion --split val --stories 100 \\
        --json out/gill_stories.json --grid out/gill_stories.png

GILL's VIST experiment (Koh et al. 2023, Table 2) on stories whose fifth caption names the objects
by class only, so that their colours are in the context alone. Four ways to draw the fifth panel,
one seed per story shared by all four:

- ``gill_context``: GILL's setting (four images, five captions). For each context panel the user
  shows its image asking for a description (data.conversations.DESCRIBE_PROMPTS[0]) and the
  assistant answers with the panel's caption; then "Show me this: <fifth caption>", the reply
  forced to open with [IMG0..7]; the mapper's prompt_embeds drive the decoder.
- ``gill_caption``: the same request without the dialogue (GILL on the fifth caption alone).
- ``decoder_caption``: the decoder on its own encoding of the fifth caption: the issue's
  baseline, "the decoder prompted with only the last caption".
- ``decoder_full``: the decoder on the target's own caption, colours named (a reference: what the
  context could at best recover).

Scores per image: the CLIP image-image cosine to the target scene (the preset's ShapeWorld CLIP,
GILL's metric with its CLIP), and whether eval.generation's judge (SAM masks + CLIP crops) finds
every (colour, class) of the target. The issue's target: mean(gill_context - decoder_caption)
> 0 with a 95 % bootstrap interval (paired, over stories) that excludes zero; the interval of
gill_context - gill_caption (does the context help GILL itself?) is reported beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.stories import Story, make_stories
from eval.generation import GenerationJudge, labels_satisfy
from eval.gill import (
    add_generation_arguments,
    batched_request_states,
    load_for_generation,
    write_results,
)
from generation.diffusion import (
    encode_prompts,
    generate,
)
from generation.index import clip_embedder
from vlm.gill import GILLVLM, request_prompt, story_prompt

__all__ = ["METHODS", "bootstrap_interval", "evaluate_stories", "main"]

METHODS = ("gill_context", "gill_caption", "decoder_caption", "decoder_full")


def bootstrap_interval(
    diff: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (resampling stories)."""
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need at least 2 paired differences, received shape {d.shape}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def evaluate_stories(
    gill: GILLVLM,
    pipe: Any,
    judge: GenerationJudge,
    clip: Any,
    stories: Sequence[Story],
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """The module docstring's figures as a JSON-ready dict; the images under "_images"."""
    if len(stories) < 2:
        raise ValueError(f"need at least 2 stories, received {len(stories)}")
    gill.eval()
    with torch.inference_mode():
        _, context_states = batched_request_states(
            gill, [story_prompt(s) for s in stories], batch_size, progress, "context"
        )
        _, caption_states = batched_request_states(
            gill, [request_prompt(s.last) for s in stories], batch_size, progress, "caption"
        )
        embeds = {
            "gill_context": gill.prompt_embeds(context_states).float(),
            "gill_caption": gill.prompt_embeds(caption_states).float(),
            "decoder_caption": encode_prompts(pipe, [s.last for s in stories]).float(),
            "decoder_full": encode_prompts(pipe, [s.target_caption for s in stories]).float(),
        }
    seeds = [seed + i for i in range(len(stories))]
    targets = clip([Image.open(s.target).convert("RGB") for s in stories])  # (N, D) unit-norm
    results: dict[str, Any] = {"stories": len(stories), "methods": {}, "_images": {}}
    similarity: dict[str, np.ndarray] = {}
    for name in METHODS:
        images: list[Image.Image] = []
        for start in tqdm(range(0, len(stories), batch_size), desc=name, disable=not progress):
            images += generate(
                pipe,
                prompt_embeds=embeds[name][start : start + batch_size],
                seed=seeds[start : start + batch_size],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
        similarity[name] = np.sum(clip(images) * targets, axis=1)
        found = [judge.objects(im) for im in images]
        ok = [labels_satisfy(f, list(s.objects)) for f, s in zip(found, stories, strict=True)]
        results["methods"][name] = {
            "clip_image_similarity": float(similarity[name].mean()),
            "judge_accuracy": float(np.mean(ok)),
        }
        results["_images"][name] = images
    for a, b in (("gill_context", "decoder_caption"), ("gill_context", "gill_caption")):
        diff = similarity[a] - similarity[b]
        low, high = bootstrap_interval(diff.tolist(), seed=seed)
        results[f"{a}_minus_{b}"] = {
            "mean": float(diff.mean()),
            "ci95": [low, high],
            "excludes_zero": bool(low > 0 or high < 0),
        }
    results["num_inference_steps"], results["guidance_scale"] = num_inference_steps, guidance_scale
    return results


def format_tables(r: dict[str, Any]) -> str:
    lines = [
        f"| fifth panel, {r['stories']} ShapeWorld stories | CLIP image similarity to the target "
        "| judge: every object there |",
        "| --- | ---: | ---: |",
    ]
    for name, m in r["methods"].items():
        lines.append(
            f"| {name} | {m['clip_image_similarity']:.3f} | {100 * m['judge_accuracy']:.1f} % |"
        )
    lines += ["", "| paired difference | mean | 95 % bootstrap interval | excludes 0 |"]
    lines.append("| --- | ---: | --- | --- |")
    for key in ("gill_context_minus_decoder_caption", "gill_context_minus_gill_caption"):
        d = r[key]
        lines.append(
            f"| {key.replace('_minus_', ' - ')} | {d['mean']:+.4f} | "
            f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | "
            f"{'yes' if d['excludes_zero'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.gill_stories",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generation_arguments(parser, batch_size=8)
    parser.add_argument(
        "--data", type=Path, required=True, help="ShapeWorld folder of the decoder's kind"
    )
    parser.add_argument("--split", default="val", help="its held-out split (default val)")
    parser.add_argument("--stories", type=int, default=100, help="stories (default 100)")
    parser.add_argument("--grid", type=Path, help="PNG: target, then the four methods, per story")
    args = parser.parse_args(argv)
    if args.stories < 2:
        parser.error(f"--stories must be >= 2, received {args.stories}")
    try:
        stories = make_stories(args.data, args.split, args.stories, args.seed)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if len(stories) < 2:
        parser.error(f"{args.data} split {args.split}: only {len(stories)} story can be made")
    preset, gill, pipe, judge = load_for_generation(args, args.data)
    clip, _ = clip_embedder(args.preset, args.clip)
    results = evaluate_stories(
        gill,
        pipe,
        judge,
        clip,
        stories,
        num_inference_steps=args.steps or preset.diffusion.num_inference_steps,
        guidance_scale=args.guidance or preset.diffusion.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(format_tables(results))
    if args.grid is not None:
        from generation.diffusion import image_grid

        rows = min(len(stories), 8)
        cells: list[Image.Image] = []
        for i in range(rows):
            cells += [Image.open(stories[i].context[j][0]).convert("RGB") for j in range(4)]
            cells.append(Image.open(stories[i].target).convert("RGB"))
            cells += [results["_images"][m][i] for m in METHODS]
        image_grid(cells, columns=9).save(args.grid)
    examples = [
        {"context": [c for _, c in s.context], "last": s.last, "target": s.target_caption}
        for s in stories[:5]
    ]
    write_results(args, results, "eval.gill_stories", argv, examples=examples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
