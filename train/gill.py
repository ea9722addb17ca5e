"""Train GILL on ShapeWorld: the [IMG] rows, the [IMG0] output row, mapper, retrieval, decision.

    python -m train.gill --data /work/data/sw --out /work/runs/gill --steps 600 --max-minutes 25
    python -m train.gill --data /work/data/sw --out /work/runs/gill --resume   # continue
    accelerate launch -m train.gill --data /work/data/sw --out /work/runs/gill   # data parallel
    python -m train.gill --imagefolder my_photos --out runs/gill_mine --steps 200  # your images
    python -m train.gill --images coco/train2017 --captions-json captions_train2017.json \\
        --out runs/gill_coco

Your own images (``--imagefolder`` with captions in metadata.jsonl, or COCO captions): each
image's first caption is its retrieval request; the generation requests stay the novel shape
compositions, so the decision head learns "your kind of picture -> retrieve, a composition ->
generate".

Starts from the preset's trained VLM core (``--vlm`` for another) and its diffusion decoder; both
stay frozen (the decoder only encodes captions here). Each step (Koh et al. 2023's three losses,
generation/gill.py, vlm/gill.py):

- captioning: ``--caption-batch`` images with a question -> one of their captions; CE over the
  vocabulary plus [IMG0]. The VLM core is frozen, so this pass trains only the [IMG0] output row
  (not to fire inside ordinary text); GILL's captioning pass trained its visual prefix, which is
  our frozen VLM projector.
- requests: ``--batch-size`` ShapeWorld scenes and ``--compositions`` novel compositions, asked
  for with one of vlm.gill.REQUEST_TEMPLATES ("Show me this: <caption>"); the reply is [IMG0]
  then the 7 appended tokens. Losses: CE of emitting [IMG0]; InfoNCE between the [IMG0] state
  and the CLIP embeddings of the scenes' images (in-batch negatives); generation = per-token
  distance of the mapper's output to the decoder's own encoding of the caption.
- decision (our labels, as GILL's PartiPrompts votes are not ours to have): a scene caption
  describes an image of the kind the index holds (a ShapeWorld picture of 2-7 objects, its own
  listing caption) -> retrieve; a novel composition of one or two objects in phrasings the
  scenes' captions never use (vlm.gill.compose_description, "A red circle next to a blue star.")
  -> generate. CE on the detached [IMG0] state.
- negatives: ``--negatives`` text-only ordinary prompts whose emission target is the bare LLM's
  own first token (STAMP's negatives), so [IMG0] does not fire wherever no image is in view.

Data parallel (``accelerate launch``): the batch sizes are global; each process takes its slice of
the scenes, compositions, captioning conversations and negatives, the InfoNCE runs over the [IMG0]
and image embeddings gathered from every process (the global batch's in-batch negatives), and the
caption CE is weighted by the slice's share of reply tokens, so N processes take the steps one
process takes with the same batch (tests/test_scaling.py).

Loss = caption + emit + retrieval + generation + decision, all weights 1 (the paper's 0.5 x CE of
its retrieval and its generation passes is one CE here: both read the same tokens, one pass).
AdamW (betas 0.9/0.95, weight decay 0.01 on the heads only; the token rows get none), cosine
schedule with warmup, grad clip 1.0 (GILL's); the [IMG0] output row at ``--row-lr-scale`` x the
rate (its logit starts at 0 against a frozen head whose top logits are ~30). Resumable
(``--resume``); ``--max-minutes`` stops cleanly with everything saved; ``<out>/final`` is a
GILLVLM.save_pretrained folder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from core.config import project_path
from core.runtime import resolve_device, seed_everything
from data.conversations import DESCRIBE_PROMPTS
from data.datasets import (
    add_caption_arguments,
    caption_source_error,
    user_captions_from_args,
)
from generation.diffusion import encode_prompts, expected_embeds_shape, pipeline_from_preset
from generation.gill import GENERATE, RETRIEVE, GILLMapperConfig
from train.common import (
    DataParallel,
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    refuse_held_out,
    resume_or_start,
    save_training_state,
    trim_log,
    write_model_card,
)
from vlm.config import PolychromeConfig
from vlm.gill import (
    GILLVLM,
    REQUEST_TEMPLATES,
    SceneItem,
    compose_description,
    gill_config_for,
    load_scenes,
    scenes_from_pairs,
)
from vlm.model import PolychromeVLM

# Text-only prompts the model must answer in text, never with [IMG0]: some about shapes, so that
# the request phrasing, not the topic, is what makes it fire.
OTHER_PROMPTS = (
    "Hello! How are you today?",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Describe a red circle in words.",
    "What is a hexagon?",
    "How many sides does a pentagon have?",
    "Tell me a fun fact about stars.",
    "What colour do you get by mixing blue and yellow?",
    "Explain what a diamond shape is.",
    "Can you help me plan my day?",
)
RESUME_KEYS = (
    "gill",
    "negatives",
    "row_lr_scale",
    "renorm",
    "vlm",
    "seed",
    "batch_size",
    "compositions",
    "caption_batch",
    "lr",
    "steps",
    "data",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.gill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="preset name (configs/*.json)")
    parser.add_argument("--vlm", type=Path, default=None, help="VLM core (default: the preset's)")
    src = parser.add_argument_group("data (one of --data, --imagefolder, --images)")
    src.add_argument("--data", type=Path, help="a ShapeWorld folder")
    src.add_argument("--split", default="train", help="ShapeWorld split (default train)")
    add_caption_arguments(src)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--out", type=Path, required=True, help="run folder (last/, final/)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps in all")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="scene requests per step, global (split over the processes of accelerate launch, "
        "like the three sizes below)",
    )
    parser.add_argument(
        "--compositions", type=int, default=8, help="novel-composition requests per step"
    )
    parser.add_argument(
        "--caption-batch",
        type=int,
        default=None,
        help="captioning conversations per step, about the step's first scenes (default: 8, or "
        "--batch-size if smaller)",
    )
    parser.add_argument(
        "--negatives", type=int, default=4, help="text-only ordinary prompts per step (default 4)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (GILL)")
    parser.add_argument(
        "--row-lr-scale",
        type=float,
        default=10.0,
        help="learning-rate multiplier of the [IMG0] output row (it must climb to the frozen "
        "head's logits, ~30 for SmolLM2)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%%)")
    parser.add_argument(
        "--no-renorm",
        action="store_true",
        help="leave the [IMG] input rows' norm as the optimizer leaves it (GILL rescales them to "
        "the frozen rows' mean norm after every step; runs before session 23 did not)",
    )
    parser.add_argument(
        "--mapper-width",
        type=int,
        default=256,
        help="mapper transformer width (paper 512; smaller for a CPU budget)",
    )
    parser.add_argument(
        "--mapper-layers", type=int, default=2, help="mapper encoder and decoder layers (paper 4)"
    )
    parser.add_argument("--retrieval-dim", type=int, default=256, help="shared retrieval space")
    parser.add_argument(
        "--decision-dropout",
        type=float,
        default=0.5,
        help="dropout before the decision head's linear layer (paper 0.5). Its masks are the "
        "one thing that differs between N processes and one (every process draws its rows' "
        "masks from the same seed)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument("--save-every", type=int, default=50, help="steps between <out>/last")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this time")
    parser.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    why = caption_source_error(args, [args.split])
    if why:
        parser.error(why)
    if args.limit is not None and args.limit < 2:
        parser.error(f"--limit must be >= 2, received {args.limit}")
    if args.caption_batch is None:
        args.caption_batch = min(8, args.batch_size)
    check_run_args(
        parser, args, ("steps", "batch_size", "caption_batch", "save_every", "mapper_width")
    )
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (InfoNCE needs in-batch negatives)")
    if args.compositions < 0 or args.negatives < 0:
        parser.error("--compositions and --negatives must be >= 0")
    if args.caption_batch > args.batch_size:
        parser.error(
            f"--caption-batch {args.caption_batch} must be <= --batch-size {args.batch_size}: "
            "the captioning conversations are about the step's scenes"
        )
    if not 0.0 <= args.decision_dropout < 1.0:
        parser.error(f"--decision-dropout must be in [0, 1), received {args.decision_dropout}")


def build_model(
    preset: PolychromeConfig, vlm_dir: Path | None, args: argparse.Namespace, decoder: Any
) -> GILLVLM:
    """The frozen VLM core (trained projector) with fresh GILL parts sized to the decoder."""
    if vlm_dir is None and preset.vlm.checkpoint:
        vlm_dir = project_path(preset.vlm.checkpoint)
    if vlm_dir is None:
        vlm = PolychromeVLM.build(preset.vlm.core_config(preset.llm, preset.clip))
    else:
        vlm = PolychromeVLM.from_pretrained(vlm_dir)
    width = args.mapper_width
    mapper = GILLMapperConfig(
        width=width,
        encoder_layers=args.mapper_layers,
        decoder_layers=args.mapper_layers,
        heads=4,
        ffn_dim=4 * width,
    )
    cfg = gill_config_for(
        vlm,
        decoder,
        mapper=mapper,
        retrieval_dim=args.retrieval_dim,
        decision_dropout=args.decision_dropout,
    )
    return GILLVLM(vlm, cfg)


def batch_for(
    scenes: list[SceneItem],
    indices: np.ndarray,
    step: int,
    seed: int,
    n_compositions: int,
    n_captions: int,
    n_negatives: int = 0,
) -> dict[str, Any]:
    """A pure function of (indices, step, seed): the step's conversations and labels."""
    rng = np.random.default_rng([seed, step])
    items = [scenes[int(i)] for i in indices]
    captions = []
    for item in items[:n_captions]:
        question = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
        answer = item.captions[int(rng.integers(len(item.captions)))]
        captions.append(
            [
                {"role": "user", "content": question, "images": [item.image_path]},
                {"role": "assistant", "content": answer},
            ]
        )
    descriptions = [it.listing for it in items]
    descriptions += [compose_description(rng) for _ in range(n_compositions)]
    requests = [
        [
            {
                "role": "user",
                "content": REQUEST_TEMPLATES[int(rng.integers(len(REQUEST_TEMPLATES)))].format(d),
            }
        ]
        for d in descriptions
    ]
    labels = [RETRIEVE] * len(items) + [GENERATE] * n_compositions
    others = [
        [{"role": "user", "content": OTHER_PROMPTS[int(rng.integers(len(OTHER_PROMPTS)))]}]
        for _ in range(n_negatives)
    ]
    return {
        "captions": captions,
        "requests": requests,
        "descriptions": descriptions,
        "images": [it.image_path for it in items],
        "labels": torch.tensor(labels),
        "others": others,
    }


def _scenes(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[SceneItem], str]:
    """The training scenes and a one-line description: a ShapeWorld split, or the user's captioned
    images (their first caption is each scene's request)."""
    first = f" first {args.limit}" if args.limit else ""
    if args.data is not None:
        scenes = load_scenes(args.data, args.split, args.limit)
        return scenes, f"ShapeWorld {args.data} split {args.split}{first}"
    try:
        pairs, description = user_captions_from_args(args)
    except (ValueError, OSError) as err:  # bad data: say what, no traceback
        parser.error(str(err))
    scenes = scenes_from_pairs(pairs.image_paths, pairs.captions)[: args.limit]
    where = description.get("root") or description.get("captions")
    return scenes, f"{description['kind']} {where}{first}"


def _slice(batch: dict[str, Any], n_scenes: int, part: Any) -> dict[str, Any]:
    """This process's part of a global batch_for batch: its share of the scene requests and of
    the composition requests (scenes first, as training_losses expects), of the images, the
    captioning conversations and the negatives."""

    def both(items: Any) -> Any:
        return part(items[:n_scenes]) + part(items[n_scenes:])

    labels = both(batch["labels"].tolist())
    return {
        "captions": part(batch["captions"]),
        "requests": both(batch["requests"]),
        "descriptions": both(batch["descriptions"]),
        "images": part(batch["images"]),
        "labels": torch.tensor(labels, dtype=batch["labels"].dtype),
        "others": part(batch["others"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    refuse_held_out(parser, args)  # before the models load
    command = "python -m train.gill " + shlex.join(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Scene captions longer than the decoder's text length are cut by its tokenizer, as in its own
    # training; diffusers would warn about it at every step.
    diffusers_logging.set_verbosity_error()
    preset = PolychromeConfig.from_preset(args.preset)
    dp = DataParallel(resolve_device(args.device))
    device, world = dp.device, dp.world
    why = dp.divides(
        batch_size=args.batch_size,
        compositions=args.compositions,
        caption_batch=args.caption_batch,
        negatives=args.negatives,
    )
    if why:
        parser.error(why)
    seed_everything(args.seed)
    pipe = pipeline_from_preset(preset.diffusion).to(device)  # frozen; only its text encoder used
    pipe.text_encoder.requires_grad_(False)
    model = build_model(preset, args.vlm, args, expected_embeds_shape(pipe)).to(device)
    scenes, data_desc = _scenes(parser, args)
    if len(scenes) < args.batch_size:
        parser.error(f"{data_desc}: {len(scenes)} images, below --batch-size {args.batch_size}")
    if dp.main:
        print(
            f"{len(scenes)} scenes from {data_desc}; mapper -> {model.config.mapper.out_tokens} "
            f"x {model.config.mapper.out_dim} prompt_embeds; {world} process(es), "
            f"{args.batch_size // world} scene requests each per step"
        )
    heads = list(model.heads.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [model.vlm.added_embeddings], "weight_decay": 0.0},
            {
                "params": [model.img_out, model.img_bias],
                "weight_decay": 0.0,
                "lr": args.lr * args.row_lr_scale,
            },
            {"params": heads, "weight_decay": 0.01},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    scheduler = cosine_with_warmup(optimizer, warmup, args.steps)
    run_config = {
        "gill": model.config.to_dict(),
        "vlm": str(args.vlm or preset.vlm.checkpoint),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "compositions": args.compositions,
        "caption_batch": args.caption_batch,
        "negatives": args.negatives,
        "row_lr_scale": args.row_lr_scale,
        "renorm": not args.no_renorm,
        "lr": args.lr,
        "steps": args.steps,
        "data": data_desc,
    }
    start = resume_or_start(
        parser, args, model, optimizer, scheduler, run_config, RESUME_KEYS, announce=dp.main
    )
    model.train()
    params = model.trainable_parameters()
    # Data parallel: each process takes its slice of the global batch (_slice); DDP averages
    # the gradients, and training_losses gathers the InfoNCE embeddings and weights the caption
    # CE (its docstring), so N processes take the steps one process takes with the whole batch.
    ddp, optimizer = dp.accelerator.prepare(model, optimizer)
    gather = dp.gather if world > 1 else None
    args.out.mkdir(parents=True, exist_ok=True)
    curve = args.out / "loss.jsonl"
    if dp.main:  # rows logged after the state we resume from are dropped
        trim_log(curve, start)
    batches = batch_indices(len(scenes), args.batch_size, args.seed, start)
    stop = args.stop_at or args.steps
    bar = tqdm(
        total=stop,
        initial=start,
        desc="train gill",
        unit="step",
        disable=args.no_progress or not dp.main,
    )
    began = time.monotonic()
    done = start
    save = partial(save_training_state, args.out, model, optimizer, scheduler, config=run_config)
    for step in range(start, stop):
        batch = batch_for(
            scenes,
            next(batches),
            step,
            args.seed,
            args.compositions,
            args.caption_batch,
            args.negatives,
        )
        batch = _slice(batch, args.batch_size, dp.part)
        with torch.no_grad():
            targets = encode_prompts(pipe, batch["descriptions"]).float()
            image_embeds = model.clip_image_embeds(batch["images"])
        losses = ddp(
            batch["captions"],
            batch["requests"],
            targets,
            image_embeds,
            batch["labels"],
            batch["others"],
            gather,
        )
        dp.accelerator.backward(losses["loss"])
        dp.accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if not args.no_renorm:  # GILL's: the [IMG] rows back to the frozen rows' mean norm
            model.renormalise_img_rows()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean = {k: dp.accelerator.reduce(v.detach(), "mean") for k, v in losses.items()}
        row = {k: round(float(v), 5) for k, v in mean.items()}
        if dp.main:
            with curve.open("a", encoding="utf-8") as log:
                log.write(json.dumps({"step": step + 1, **row}) + "\n")
        bar.set_postfix(row)
        bar.update(1)
        done = step + 1
        elapsed = time.monotonic() - began
        if dp.end_step(done, save, elapsed, args, last=stop):
            break
    bar.close()
    if not dp.main:
        return 0
    minutes = (time.monotonic() - began) / 60
    metadata = {
        "command": command,
        "steps_run": done,
        "steps_planned": args.steps,
        "train_minutes_this_run": round(minutes, 2),
        "data": data_desc,
        "decoder": str(preset.diffusion.checkpoint or preset.diffusion.model),
    }
    final = model.save_pretrained(args.out / "final", metadata=metadata, overwrite=True)
    vlm = run_config["vlm"]
    core = "(a fresh, untrained one of the preset)" if vlm == "None" else f"`{vlm}`"
    intro = (
        f"On the frozen VLM core {core} and the decoder `{metadata['decoder']}`. "
        "Trained (Koh et al. 2023): the [IMG0..r] rows, the retrieval projections, the GILLMapper "
        "to the decoder's text space and the retrieve-or-generate decision head."
    )
    write_model_card(
        final, "GILL (`GILLVLM`, train/gill.py)", intro, run_config, metadata, skip=("gill",)
    )
    print(f"wrote {final} ({done} of {args.steps} steps, {minutes:.1f} min this run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
