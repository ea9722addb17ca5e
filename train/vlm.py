"""Train the VLM's projector (and added token rows) with the LLM and CLIP frozen.

    # ShapeWorld: align on captions, then instruction-tune on dialogues + short-answer QA
    python -m train.vlm --preset shapes --data out/shapeworld --out runs/vlm \\
        --align-steps 300 --steps 1500 --batch-size 8 --max-minutes 45 --eval
    # continue an interrupted run from <out>/last (same data order)
    python -m train.vlm --preset shapes --data out/shapeworld --out runs/vlm --steps 1500 --resume
    # your own images: a folder with metadata.jsonl (captions, dialogues, qa; data.conversations)
    python -m train.vlm --preset shapes --imagefolder my_photos --out runs/vlm_mine --steps 200 \\
        --align-steps 50
    python -m train.vlm --preset shapes --images coco/train2017 \\
        --captions-json coco/annotations/captions_train2017.json --out runs/vlm_coco

Two stages in one run (LLaVA-1.5's recipe, both with the LLM frozen): steps below
``--align-steps`` train on (image, caption) pairs, later steps on instruction conversations (a
ShapeWorld dialogue plus the image's short-answer questions, one image per conversation). The loss
is next-token cross-entropy on the assistant replies only. On CPU the forward and backward run under
bf16 autocast (``--no-bf16`` to turn it off); the trained tensors stay fp32.

``--max-minutes`` ends the run early at a step boundary (the cosine schedule is not stretched: the
learning rate stays where it was) and still writes ``<out>/final``; the model card records how
many steps ran. ``--eval`` then runs ``python -m eval.vlm`` on the val split.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from core.checkpoint import load_checkpoint
from core.config import project_path
from core.runtime import resolve_device, seed_everything
from data.conversations import (
    ChatRecord,
    caption_conversation,
    instruct_conversation,
    read_chat_records,
)
from data.datasets import (
    add_caption_arguments,
    caption_source_error,
    user_captions_from_args,
)
from train import common
from train.common import (
    DataParallel,
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    open_log,
    prefetched,
    refuse_held_out,
    resume_or_start,
    save_training_state,
)
from vision.clip import clip_checkpoint_config
from vlm.config import PolychromeConfig
from vlm.model import FEATURES, OUTPUT_NORMS, POSITIONS, PolychromeVLM, VLMConfig

RESUME_KEYS = ("vlm", "seed", "batch_size", "lr", "align_steps", "steps", "data", "init_from")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.vlm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="preset name (configs/*.json)")
    src = parser.add_argument_group("data (one of --data, --imagefolder, --images)")
    src.add_argument("--data", type=Path, help="a ShapeWorld folder (python -m data.shapeworld)")
    src.add_argument(
        "--splits",
        nargs="+",
        default=["train"],
        help="ShapeWorld splits to train on (default train)",
    )
    add_caption_arguments(src, "captions, dialogues, qa")
    parser.add_argument("--out", type=Path, required=True, help="run folder (last/, final/)")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps in all")
    parser.add_argument(
        "--align-steps", type=int, default=300, help="first steps on captions only (default 300)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per step")
    parser.add_argument(
        "--projector-norm",
        choices=OUTPUT_NORMS,
        default=None,
        help="normalise the visual tokens: rms = an RMSNorm with a gain started at the LLM "
        "embeddings' scale (default: the preset's projector.output_norm)",
    )
    parser.add_argument(
        "--position",
        choices=POSITIONS,
        default=None,
        help="learned = add learned row and column embeddings to the visual tokens (default: "
        "the preset's projector.position)",
    )
    parser.add_argument(
        "--merge",
        type=int,
        default=None,
        help="merge each MxM block of CLIP patches into one visual token (the grid side must "
        "divide by M; default: the preset's projector.merge)",
    )
    parser.add_argument(
        "--features",
        choices=FEATURES,
        default=None,
        help="what the projector reads from CLIP: global = the tower's patch tokens as trained, "
        "local = the same tower with windowed attention (see --window), both = the two "
        "concatenated (default: the preset's projector.features)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="patches per side (odd) of CLIP's attention window for local features (default: the "
        "preset's projector.window)",
    )
    parser.add_argument(
        "--clip",
        type=Path,
        default=None,
        help="the CLIP checkpoint folder whose image tower the core reads, frozen: one of the "
        "preset's CLIP model (e.g. fine-tuned by train.clip --dense-weight); the core's config "
        "records it, so eval.vlm and the Assistant load the same tower (default: the preset's "
        "clip.checkpoint)",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="LoRA of this rank on the LLM (attention by default, see --lora-targets), on only "
        "for prompts with an image (text-only prompts stay the bare LLM's); 0 = none, the LLM "
        "frozen (default: the preset's vlm.lora.rank)",
    )
    parser.add_argument(
        "--lora-targets",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="the LLM's modules the LoRA adapts (default: q_proj k_proj v_proj o_proj; "
        "add gate_proj up_proj down_proj for SmolLM2's MLPs as well)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default 3%%)")
    parser.add_argument("--seed", type=int, default=0, help="data order, conversation sampling")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from a saved VLM's projector (a save_pretrained folder, e.g. an earlier run's "
        "final/), with a fresh optimizer and schedule",
    )
    parser.add_argument("--save-every", type=int, default=100, help="steps between <out>/last")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="stop early after this wall time"
    )
    parser.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument(
        "--no-bf16", action="store_true", help="fp32 compute (default: bf16 autocast)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--pad-multiple",
        type=int,
        default=32,
        help="pad each batch to a multiple of this many tokens (fewer distinct shapes: less "
        "kernel-cache memory on CPU)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=2,
        help="batches built ahead in a background thread while a step runs (0 = none; the "
        "steps are the same either way)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--eval", action="store_true", help="run eval.vlm on the val split at the end"
    )
    parser.add_argument("--eval-limit", type=int, default=200, help="val images for --eval")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    why = caption_source_error(args, args.splits + (["val"] if args.eval else []))
    if why:
        parser.error(why)
    check_run_args(parser, args, ("steps", "batch_size", "save_every", "pad_multiple"))
    if not 0 <= args.align_steps <= args.steps:
        parser.error(
            f"--align-steps must be in [0, --steps={args.steps}], received {args.align_steps}"
        )
    if args.data is None and args.eval:
        parser.error("--eval needs a ShapeWorld --data folder (its val split)")
    if args.init_from is not None and not (args.init_from / "manifest.json").is_file():
        parser.error(
            f"--init-from {args.init_from}: no checkpoint there (no manifest.json; relative "
            "paths are from the current directory)"
        )


def conversations_for(
    records: list[Any], indices: np.ndarray, step: int, align_steps: int, seed: int
) -> list[list[dict[str, Any]]]:
    """The batch's conversations: a pure function of (records, indices, step, seed). An
    alignment step gives a record without captions (only qa or dialogues) its instruction one."""
    rng = np.random.default_rng([seed, step])
    out = []
    for i in indices:
        record = records[int(i)]
        align = step < align_steps and bool(record.captions)
        out.append((caption_conversation if align else instruct_conversation)(record, rng))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    refuse_held_out(parser, args)  # before the models load
    command = "python -m train.vlm " + shlex.join(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    preset = PolychromeConfig.from_preset(args.preset)
    vision = preset.clip
    if args.clip is not None:
        clip_dir = args.clip.resolve()  # the command line's path is the working directory's
        try:
            name = clip_checkpoint_config(clip_dir).name
        except ValueError as err:  # CheckpointError, ConfigError
            parser.error(f"--clip: {err}")
        if name != vision.model:
            parser.error(
                f"--clip: {args.clip} is CLIP {name!r}; the {args.preset} preset's core reads "
                f"{vision.model!r}"
            )
        # the saved config's path: relative to the repository (as presets' are) when inside it
        root = project_path(".").resolve()
        stored = clip_dir.relative_to(root) if clip_dir.is_relative_to(root) else clip_dir
        vision = vision.replace(checkpoint=str(stored))
    try:
        vlm_cfg = preset.vlm.core_config(
            preset.llm,
            vision,
            merge=args.merge,
            output_norm=args.projector_norm,
            position=args.position,
            features=args.features,
            window=args.window,
            lora_rank=args.lora_rank,
            lora_targets=args.lora_targets,
        )
    except ValueError as err:
        parser.error(str(err))
    dp = DataParallel(resolve_device(args.device))
    device = dp.device
    why = dp.divides(batch_size=args.batch_size)
    if why:
        parser.error(why)
    seed_everything(args.seed)
    try:
        model = PolychromeVLM.build(vlm_cfg, device=device)
    except ValueError as err:  # a --merge that does not divide the grid, unknown --lora-targets
        parser.error(str(err))

    if args.data is not None:
        records = [r for s in args.splits for r in read_chat_records(args.data / s)]
        data_desc = f"ShapeWorld {args.data} splits {args.splits}"
    elif args.imagefolder is not None:
        try:
            records = read_chat_records(
                args.imagefolder, on_bad=args.bad_records, progress=not args.no_progress
            )
        except (ValueError, OSError) as err:  # bad data: say what, no traceback
            parser.error(str(err))
        data_desc = f"imagefolder {args.imagefolder}"
    else:  # COCO captions: caption turns only
        try:
            pairs, _ = user_captions_from_args(args)
        except (ValueError, OSError) as err:
            parser.error(str(err))
        records = [ChatRecord(p, c) for p, c in zip(pairs.image_paths, pairs.captions, strict=True)]
        data_desc = f"COCO captions {args.captions_json} (images {args.images})"
    if args.align_steps and not any(r.captions for r in records):
        parser.error(
            f"--align-steps {args.align_steps}: alignment steps train on captions and no record "
            f"of {data_desc} has one; pass --align-steps 0"
        )
    if dp.main:
        print(
            f"{len(records)} images from {data_desc}; {model.tokens_per_image} visual tokens "
            f"each; {dp.world} process(es), {args.batch_size // dp.world} conversations each "
            "per step"
        )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps * 3 // 100)
    scheduler = cosine_with_warmup(optimizer, warmup, args.steps)
    run_config = {
        "vlm": vlm_cfg.to_dict(),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "align_steps": args.align_steps,
        "steps": args.steps,
        "data": data_desc,
        "init_from": None if args.init_from is None else str(args.init_from),
    }
    if args.init_from is not None:
        ckpt = load_checkpoint(args.init_from)
        saved = VLMConfig.from_dict(ckpt.config, source=f"{args.init_from}/manifest.json config")
        # A core without LoRA may start a run that adds one (the LoRA starts at zero).
        adds_lora = saved.lora.rank == 0 and saved == vlm_cfg.replace(lora=saved.lora)
        if saved != vlm_cfg and not adds_lora:
            parser.error(
                f"--init-from {args.init_from}: its VLM config differs from this run's "
                "(the preset's, with --merge, --projector-norm, --position, --lora-rank and "
                "--lora-targets if given)"
            )
        state = ckpt.tensors["vlm"]
        if adds_lora:  # the fresh LoRA's tensors, and nothing else, from this run's model
            fresh = {k: v for k, v in model.trained_state_dict().items() if k.startswith("llm.")}
            state = {**fresh, **state}
        model.load_trained_state(state, what=str(args.init_from))
        print(f"initialised the trained tensors from {args.init_from}")
    start = resume_or_start(
        parser,
        args,
        model,
        optimizer,
        scheduler,
        run_config,
        RESUME_KEYS,
        announce=dp.main,
        configs={"vlm": VLMConfig},  # a run saved before a field existed resumes
    )
    # Data parallel: each process takes its slice of the global batch; DDP averages gradients.
    model, optimizer = dp.accelerator.prepare(model, optimizer)
    vlm: PolychromeVLM = dp.accelerator.unwrap_model(model)
    vlm.llm.eval()
    vlm.clip.eval()

    autocast = not args.no_bf16
    stop = args.stop_at or args.steps
    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    curve = args.out / "loss.jsonl"  # one row per step, appended as it runs
    # rows after the state resumed from (or all, starting afresh) are dropped, not doubled
    log = open_log(curve, start) if dp.main else None
    tokens = 0
    batches = batch_indices(len(records), args.batch_size, args.seed, start)
    bar = tqdm(
        total=stop,
        initial=start,
        desc="train vlm",
        unit="step",
        disable=args.no_progress or not dp.main,
    )
    step = start
    save = partial(save_training_state, args.out, vlm, optimizer, scheduler, config=run_config)

    def make_batch(step: int) -> dict[str, torch.Tensor]:
        # the global batch's conversations (sampled as one process would), then this slice
        convs = dp.part(
            conversations_for(records, next(batches), step, args.align_steps, args.seed)
        )
        return vlm.collate(convs, pad_to_multiple_of=args.pad_multiple)

    # the next batches are built while this step runs (0.11 s of Python per batch of 32)
    built = prefetched(make_batch, range(start, stop), args.prefetch)
    for step, batch in zip(range(start, stop), built, strict=True):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch)
        assert out.loss is not None
        # the loss is a mean over this slice's reply tokens: weighted by the slice's share of
        # the batch's tokens, DDP's average of the gradients is the global token mean's
        n_all = dp.total(out.n_labels)
        share = out.n_labels * dp.world / max(n_all, 1.0)
        dp.accelerator.backward(out.loss * share if dp.world > 1 else out.loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(dp.total(int(batch["attention_mask"].sum())))
        loss = dp.total(float(out.loss.detach()) * out.n_labels) / max(n_all, 1.0)
        if log is not None:
            log.write(json.dumps({"step": step + 1, "loss": loss, "tokens": tokens}) + "\n")
            log.flush()
        elapsed = time.monotonic() - began
        bar.set_postfix(
            loss=f"{loss:.3f}",
            stage="align" if step < args.align_steps else "instruct",
            tok_s=f"{tokens / max(elapsed, 1e-9):.0f}",
        )
        bar.update(1)
        done = step + 1
        if dp.end_step(done, save, elapsed, args, last=stop):
            break
    built.close()  # stops building batches ahead
    bar.close()
    if log is None:
        return 0  # the main process writes the results
    log.close()
    done = step + 1 if stop > start else start
    minutes = (time.monotonic() - began) / 60
    metadata = {
        "command": command,
        "steps_run": done,
        "steps_planned": args.steps,
        "train_minutes_this_run": round(minutes, 2),
        "tokens_this_run": tokens,
        "data": data_desc,
    }
    if done < args.steps and args.stop_at is None:
        print(f"stopped at step {done} of {args.steps}")
    final = vlm.save_pretrained(args.out / "final", metadata=metadata, overwrite=True)
    write_model_card(final, run_config, metadata)
    _plot_curve(curve, args.out / "loss.png", args.align_steps)
    print(f"wrote {final} ({done} steps, {minutes:.1f} min, {tokens} tokens this run)")
    if args.eval:
        cmd = [
            sys.executable,
            "-m",
            "eval.vlm",
            "--checkpoint",
            str(final),
            "--data",
            str(args.data),
            "--split",
            "val",
            "--limit",
            str(args.eval_limit),
            "--out",
            str(args.out / "eval_val.json"),
        ]
        print("+", shlex.join(cmd))
        return subprocess.call(cmd)
    return 0


def write_model_card(folder: Path, run_config: dict[str, Any], metadata: dict[str, Any]) -> None:
    """<folder>/MODEL_CARD.md: what was trained, how, on what; eval figures are added by hand."""
    vlm = run_config["vlm"]
    merge = vlm["projector"]["merge"]
    norm = ", output RMSNorm" if vlm["projector"].get("output_norm") == "rms" else ""
    if vlm["projector"].get("position") == "learned":
        norm += ", learned row and column embeddings"
    features = vlm["projector"].get("features", "global")
    if features != "global":
        window = vlm["projector"].get("window")
        what = "local" if features == "local" else "global and local"
        norm += f", reading CLIP's {what} patch features (attention window {window}x{window})"
    rank = vlm.get("lora", {}).get("rank", 0)
    targets = "/".join(vlm.get("lora", {}).get("targets", []))
    lora = (
        f", a rank-{rank} LoRA on the LLM's {targets}, on only for prompts with an image,"
        if rank
        else ""
    )
    intro = (
        f"Frozen LLM `{vlm['llm']['source']}`, frozen CLIP `{vlm['vision']['model']}` "
        f"(`{vlm['vision']['checkpoint']}`); trained: the projector (patch merge "
        f"{merge}x{merge}, 2-layer MLP{norm}){lora} and the added token rows "
        f"{vlm['added_tokens']}."
    )
    common.write_model_card(
        folder, "VLM projector (`PolychromeVLM`)", intro, run_config, metadata, skip=("vlm",)
    )


def _plot_curve(curve: Path, png: Path, align_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one row per step, in order: the log is trimmed to the state a run starts from (open_log)
    rows = [json.loads(line) for line in curve.read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    losses = np.array([r["loss"] for r in rows])
    k = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.3, label="loss")
    ax.plot(steps[k - 1 :], smooth, label=f"mean of {k}")
    if 0 < align_steps < steps[-1]:
        ax.axvline(align_steps, color="grey", linestyle=":", label="align -> instruct")
    ax.set_xlabel("step")
    ax.set_ylabel("reply cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
