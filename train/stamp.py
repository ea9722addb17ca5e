"""Train STAMP on referring expressions: LoRA (mask pass only), mask head, <seg>/<mask> rows.

    # ShapeWorld (python -m data.shapeworld generate --out /work/data/sw)
    python -m train.stamp --data /work/data/sw --out /work/runs/stamp --steps 600
    # any RefCOCO-style refs file with its instances file and image folder
    python -m train.stamp --refs refs_train.json --instances instances_train.json \
        --images train2014/ --out runs/stamp_refcoco
    # continue the committed STAMP on a new schedule, the mask alone (<seg> row kept)
    python -m train.stamp --init-from checkpoints/shapes/stamp --lm-weight 0 --negatives 0 \
        --data /work/data/sw --out /work/runs/stamp_more --steps 900
    # the same, moved onto another VLM core first (a retrained core: STAMP's masks read it)
    python -m train.stamp --init-from checkpoints/shapes/stamp --vlm runs/vlm/final --lm-weight 0 \
        --negatives 0 --data /work/data/sw --out /work/runs/stamp_moved --steps 600

Starts from the preset's trained VLM core (``--vlm`` to choose another), which stays frozen. Each
step: B segmentation requests ("Segment the red circle.", the reply target ``<seg>`` + end of
turn, the mask on the patch grid) and ``--negatives`` ordinary questions about the same images,
whose target is the VLM core's own first token (so ``<seg>`` does not fire on them). Loss =
LM + 0.3 BCE + 0.7 Dice (segmentation.stamp). Resumable (``--resume``), ``--max-minutes`` stops
cleanly with everything saved; ``<out>/final`` is a StampVLM.save_pretrained folder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from core.config import project_path
from core.runtime import resolve_device, seed_everything
from data.conversations import DESCRIBE_PROMPTS, SHORT_ANSWER
from data.datasets import (
    ReferringDataset,
    add_referring_arguments,
    referring_dataset_from_args,
)
from segmentation.stamp import MASK_FEATURE_NORMS, MASK_FEATURES, METHODS, StampConfig
from train import common
from train.common import (
    DataParallel,
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    refuse_held_out,
    resume_or_start,
    save_training_state,
    trim_log,
)
from vlm.config import PolychromeConfig
from vlm.model import PolychromeVLM
from vlm.stamp import SEG_PROMPTS, StampVLM

RESUME_KEYS = (
    "stamp",
    "vlm",
    "init_from",
    "seed",
    "batch_size",
    "negatives",
    "lr",
    "steps",
    "data",
)
# Questions the model must answer in text, never with <seg>.
OTHER_QUESTIONS = (
    *DESCRIBE_PROMPTS,
    f"How many shapes are there? {SHORT_ANSWER}",
    f"What colour is the largest shape? {SHORT_ANSWER}",
    "Is there a circle in the image?",
    "What is the leftmost shape?",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.stamp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="preset name (configs/*.json)")
    parser.add_argument(
        "--vlm",
        type=Path,
        default=None,
        help="VLM core checkpoint (default: the preset's; with --init-from, that folder's core)",
    )
    add_referring_arguments(parser, default_split="train")
    parser.add_argument("--out", type=Path, required=True, help="run folder (last/, final/)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps in all")
    parser.add_argument("--batch-size", type=int, default=8, help="segmentation requests per step")
    parser.add_argument(
        "--negatives", type=int, default=2, help="ordinary questions per step (default 2)"
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="stamp (default), or a baseline on the same model: text4seg (one label token per "
        "grid cell, written autoregressively) or lisa (the <seg> state prompts SAM's mask "
        "decoder)",
    )
    parser.add_argument("--mask-merge", type=int, default=None, help="override StampConfig")
    parser.add_argument("--lora-rank", type=int, default=None, help="override StampConfig")
    parser.add_argument(
        "--mask-feature-norm",
        choices=MASK_FEATURE_NORMS,
        default=None,
        help="override StampConfig: 'embedding' rescales each mask feature to the LLM's "
        "embedding norm, 'none' (default) adds it as projected (the paper)",
    )
    parser.add_argument(
        "--mask-features",
        choices=MASK_FEATURES,
        default=None,
        help="override StampConfig: what the mask projector reads, CLIP's patch tokens as "
        "trained ('global', default) or with windowed attention ('local', see --mask-window)",
    )
    parser.add_argument(
        "--mask-window",
        type=int,
        default=None,
        help="override StampConfig: odd window side for --mask-features local (default 5)",
    )
    parser.add_argument(
        "--lm-weight",
        type=float,
        default=None,
        help="override StampConfig's weight of the <seg> decision's LM loss; 0 trains the mask "
        "alone and leaves the <seg> output row as it was (e.g. one train.decisions refit)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this trained STAMP folder (its VLM core, config, LoRA and head; a new "
        "schedule of --steps), e.g. checkpoints/shapes/stamp; its config is kept: --method, "
        "--mask-merge, --lora-rank and --mask-feature-norm, when given, must agree with it, "
        "--lm-weight may change. With --vlm: its STAMP parts moved onto that core first "
        "(StampVLM.rebase; same LLM and CLIP), to retrain STAMP for a new core",
    )
    parser.add_argument(
        "--expression-types",
        nargs="+",
        default=None,
        metavar="TYPE",
        help="train only on expressions of these types (ShapeWorld: attribute, spatial, "
        "ordinal; RefCOCO-style refs carry one in an 'expression_type' field), e.g. attribute "
        "first as a curriculum",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="train on the first N expressions only (after --expression-types), e.g. to check "
        "that a small set can be fitted",
    )
    parser.add_argument(
        "--same-image",
        type=int,
        default=1,
        metavar="K",
        help="fill each batch with K expressions about K different objects of each of "
        "batch-size / K images, so every step shows the same scene asked for different objects "
        "(default 1: expressions drawn independently, as the paper)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default 3%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument("--save-every", type=int, default=50, help="steps between <out>/last")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this time")
    parser.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_run_args(parser, args, ("steps", "batch_size", "save_every"))
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, received {args.limit}")
    if args.same_image < 1 or args.batch_size % args.same_image:
        parser.error(
            f"--same-image must be >= 1 and divide --batch-size {args.batch_size}, received "
            f"{args.same_image}"
        )
    if args.mask_window is not None and args.mask_features != "local":
        parser.error(
            f"--mask-window is read only with --mask-features local, received --mask-features "
            f"{args.mask_features or 'global (the default)'}"
        )
    if args.negatives < 0:
        parser.error(f"--negatives must be >= 0, received {args.negatives}")
    if args.lm_weight is not None and args.lm_weight < 0:
        parser.error(f"--lm-weight must be >= 0, received {args.lm_weight}")
    if args.init_from is not None and not (args.init_from / "stamp.safetensors").is_file():
        parser.error(
            f"--init-from: {args.init_from} is not a saved STAMP folder (no stamp.safetensors)"
        )


def only_types(
    parser: argparse.ArgumentParser, data: ReferringDataset, desc: str, types: list[str]
) -> tuple[ReferringDataset, str]:
    """The expressions of `types` only (a parser error naming the types present when none is)."""
    present = sorted({item[4] for item in data.items})
    missing = sorted(set(types) - set(present))
    if missing:
        parser.error(
            f"--expression-types {missing}: no such expression in {desc} (types: {present})"
        )
    kept = [item for item in data.items if item[4] in types]
    return ReferringDataset(data.images_root, kept), f"{desc}, types {sorted(set(types))}"


def init_from(
    folder: Path, given: dict[str, Any], device: torch.device, vlm_dir: Path | None = None
) -> StampVLM:
    """A trained STAMP folder to continue from, on its own VLM core or, with `vlm_dir`, moved onto
    that one (StampVLM.rebase: STAMP's LoRA, head and rows as trained; its masks then read the
    new core's visual tokens, which is what the continued training is for). Its config is kept;
    `given` (the options set on the command line) may change the loss weights, and ValueError
    names any other field it would change (the trained weights are of that config)."""
    if vlm_dir is None:
        model = StampVLM.from_pretrained(folder, device=device)
    else:
        model = StampVLM.rebase(folder, PolychromeVLM.from_pretrained(vlm_dir, device=device))
    saved = model.config.to_dict()
    weights = ("lm_weight", "bce_weight", "dice_weight")
    differ = sorted(k for k, v in given.items() if k not in weights and saved.get(k) != v)
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {given[k]!r} asked" for k in differ)
        raise ValueError(f"--init-from {folder}: its STAMP config differs ({detail})")
    model.config = model.config.replace(**{k: v for k, v in given.items() if k in weights})
    return model


def build_model(
    preset: PolychromeConfig, vlm_dir: Path | None, cfg: StampConfig, device: torch.device
) -> StampVLM:
    """The frozen VLM core (trained projector) with fresh STAMP parts."""
    if vlm_dir is None and preset.vlm.checkpoint:
        vlm_dir = project_path(preset.vlm.checkpoint)
    if vlm_dir is None:
        vlm = PolychromeVLM.build(
            preset.vlm.core_config(preset.llm, preset.clip),
            device=device,
        )
    else:
        vlm = PolychromeVLM.from_pretrained(vlm_dir, device=device)
    return StampVLM(vlm, cfg)


def same_image_batches(
    data: ReferringDataset, batch_size: int, per_image: int, seed: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Endless batches of expression indices (as train.common.batch_indices, from `start_step`
    on): batch_size / per_image images a step, and for each, expressions about per_image different
    objects (different annotations), one expression drawn per object. Images whose expressions
    name fewer objects are left out. A pure function of (seed, step), so a resumed run draws what
    the uninterrupted one would."""
    by_image: dict[str, dict[int, list[int]]] = {}
    for i, (file_name, _, ann, _, _, _) in enumerate(data.items):
        by_image.setdefault(file_name, {}).setdefault(ann.id, []).append(i)
    scenes = [list(objs.values()) for objs in by_image.values() if len(objs) >= per_image]
    if len(scenes) < batch_size // per_image:
        raise ValueError(
            f"{len(scenes)} of {len(by_image)} images have expressions about {per_image} "
            f"different objects; a batch of {batch_size} needs {batch_size // per_image}"
        )
    images = batch_indices(len(scenes), batch_size // per_image, seed, start_step)
    for step, chosen in enumerate(images, start_step):
        rng = np.random.default_rng([seed, step, per_image])
        picked = []
        for g in chosen:
            objects = scenes[int(g)]
            for o in rng.choice(len(objects), per_image, replace=False):
                picked.append(objects[int(o)][int(rng.integers(len(objects[int(o)])))])
        yield np.asarray(picked)


def batch_for(
    data: ReferringDataset, indices: np.ndarray, step: int, seed: int, negatives: int
) -> tuple[list[list[dict[str, Any]]], list[np.ndarray], list[list[dict[str, Any]]]]:
    """(segmentation prompts, their (H, W) masks, ordinary prompts): a pure function of
    (indices, step, seed)."""
    rng = np.random.default_rng([seed, step])
    prompts, masks = [], []
    for i in indices:
        item = data[int(i)]
        text = SEG_PROMPTS[int(rng.integers(len(SEG_PROMPTS)))].format(item.expression)
        prompts.append([{"role": "user", "content": text, "images": [item.image_path]}])
        masks.append(item.mask)
    others = []
    for k in range(negatives):
        item = data[int(indices[k % len(indices)])]
        q = OTHER_QUESTIONS[int(rng.integers(len(OTHER_QUESTIONS)))]
        others.append([{"role": "user", "content": q, "images": [item.image_path]}])
    return prompts, masks, others


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        data, data_desc = referring_dataset_from_args(args)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.expression_types:
        data, data_desc = only_types(parser, data, data_desc, args.expression_types)
    if args.limit is not None and args.limit < len(data):
        data = ReferringDataset(data.images_root, data.items[: args.limit])
        data_desc = f"{data_desc}, first {args.limit}"
    if args.same_image > 1:
        try:  # fails here, before the model is built, when too few images qualify
            next(same_image_batches(data, args.batch_size, args.same_image, args.seed))
        except ValueError as err:
            parser.error(f"--same-image {args.same_image}: {err}")
        data_desc = f"{data_desc}, {args.same_image} objects per image per batch"
    elif len(data) < args.batch_size:
        parser.error(
            f"{len(data)} expressions (after --limit / --expression-types) is fewer than one "
            f"batch, --batch-size {args.batch_size}"
        )
    command = "python -m train.stamp " + shlex.join(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PolychromeConfig.from_preset(args.preset)
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("mask_merge", args.mask_merge),
            ("lora_rank", args.lora_rank),
            ("lm_weight", args.lm_weight),
            ("mask_feature_norm", args.mask_feature_norm),
            ("mask_features", args.mask_features),
            ("mask_window", args.mask_window),
        )
        if v is not None
    }
    if args.method is not None:
        overrides["method"] = args.method
    dp = DataParallel(resolve_device(args.device))
    device, world = dp.device, dp.world
    why = dp.divides(batch_size=args.batch_size, negatives=args.negatives)
    if why:
        parser.error(why)
    if (args.batch_size // world) % args.same_image:
        parser.error(
            f"--same-image {args.same_image} must divide each process's share of the batch "
            f"({args.batch_size} over {world} processes), so a scene's expressions stay together"
        )
    refuse_held_out(parser, args)  # after the data's checks, before the models load
    seed_everything(args.seed)
    if args.init_from is not None:
        try:
            model = init_from(args.init_from, overrides, device, args.vlm)
        except (ValueError, OSError) as err:
            parser.error(str(err))
        cfg = model.config
    else:
        overrides["sam"] = preset.sam.to_dict()  # the lisa baseline's SAM: the preset's
        try:
            cfg = StampConfig.from_dict(
                {**StampConfig().to_dict(), **overrides}, source="arguments"
            )
        except ValueError as err:
            parser.error(str(err))
        try:
            model = build_model(preset, args.vlm, cfg, device)
        except (ValueError, OSError) as err:  # CheckpointError is a ValueError
            parser.error(str(err))
    if dp.main:
        print(
            f"{len(data)} referring expressions from {data_desc}; mask grid {model.mask_grid}, "
            f"{model.vlm.tokens_per_image} visual tokens; {world} process(es), "
            f"{args.batch_size // world} requests each per step"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps * 3 // 100)
    scheduler = cosine_with_warmup(optimizer, warmup, args.steps)
    run_config = {
        "stamp": cfg.to_dict(),
        "vlm": (
            f"the core saved in {args.init_from}"
            if args.init_from and args.vlm is None
            else str(args.vlm or preset.vlm.checkpoint)
        ),
        "init_from": str(args.init_from) if args.init_from else None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "negatives": args.negatives,
        "lr": args.lr,
        "steps": args.steps,
        "data": data_desc,
    }
    start = resume_or_start(
        parser,
        args,
        model,
        optimizer,
        scheduler,
        run_config,
        RESUME_KEYS,
        announce=dp.main,
        configs={"stamp": StampConfig},  # a run saved before a field existed resumes
    )
    model.train()
    # Data parallel: each process takes its slice of the global batch; DDP averages gradients,
    # so N processes take the steps one process takes with the whole batch.
    ddp, optimizer = dp.accelerator.prepare(model, optimizer)
    main_process = dp.main
    args.out.mkdir(parents=True, exist_ok=True)
    curve = args.out / "loss.jsonl"
    if main_process:  # rows logged after the state we resume from are dropped
        trim_log(curve, start)
    if args.same_image > 1:
        batches = same_image_batches(data, args.batch_size, args.same_image, args.seed, start)
    else:
        batches = batch_indices(len(data), args.batch_size, args.seed, start)
    stop = args.stop_at or args.steps
    bar = tqdm(
        total=stop,
        initial=start,
        desc="train stamp",
        unit="step",
        disable=args.no_progress or not main_process,
    )
    began = time.monotonic()
    done = start
    save = partial(save_training_state, args.out, model, optimizer, scheduler, config=run_config)
    for step in range(start, stop):
        prompts, masks, others = batch_for(data, next(batches), step, args.seed, args.negatives)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            losses = ddp(dp.part(prompts), dp.part(masks), dp.part(others))
        dp.accelerator.backward(losses["loss"])
        dp.accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean = {k: dp.accelerator.reduce(v.detach(), "mean") for k, v in losses.items()}
        row = {k: round(float(v), 5) for k, v in mean.items()}
        if main_process:
            with curve.open("a", encoding="utf-8") as log:
                log.write(json.dumps({"step": step + 1, **row}) + "\n")
        bar.set_postfix(row)
        bar.update(1)
        done = step + 1
        elapsed = time.monotonic() - began
        if dp.end_step(done, save, elapsed, args, last=stop):
            break
    bar.close()
    if not main_process:
        return 0
    minutes = (time.monotonic() - began) / 60
    metadata = {
        "command": command,
        "steps_run": done,
        "steps_planned": args.steps,
        "train_minutes_this_run": round(minutes, 2),
        "data": data_desc,
    }
    final = model.save_pretrained(args.out / "final", metadata=metadata, overwrite=True)
    write_model_card(final, run_config, metadata)
    print(f"wrote {final} ({done} of {args.steps} steps, {minutes:.1f} min this run)")
    return 0


def write_model_card(folder: Path, run_config: dict[str, Any], metadata: dict[str, Any]) -> None:
    """<folder>/MODEL_CARD.md: what was trained, how, on what; eval figures are added by hand."""
    cfg = run_config["stamp"]
    title = f"Referring segmentation, method `{cfg['method']}` (`StampVLM`, train/stamp.py)"
    intro = (
        f"On the frozen VLM core `{run_config['vlm']}` (its LLM, CLIP, projector and image LoRA, "
        "if it has one, unchanged). "
        f"Trained: LoRA r={cfg['lora_rank']} on {cfg['lora_targets']} (active only while the "
        "mask is made), the <seg>/<mask> rows, the <seg> output row, and the method's head."
    )
    common.write_model_card(folder, title, intro, run_config, metadata)


if __name__ == "__main__":
    raise SystemExit(main())
