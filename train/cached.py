"""Train small heads on tensors computed once: the cache, and the loop over it.

The GILL refits (train.gill_mapper, train.gill_retrieval) run the frozen LLM once per request,
keep what it produced (`cached_tensors`: chunk files written atomically, reused while their key
holds), and then take many cheap steps on those tensors (`fit_cached`: resumable through
``<out>/last`` like every training script, a loss log of one row per step with the held-out
figures every ``eval_every`` steps, ``--max-minutes`` and ``--stop-at``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from core.config import project_path
from core.io import atomic_write_bytes, atomic_write_text
from core.runtime import resolve_device, seed_everything
from train.common import (
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    resume_or_start,
    save_training_state,
    trim_log,
)
from train.decoding_common import other_process
from vlm.config import PolychromeConfig
from vlm.gill import saved_dtype

__all__ = [
    "CHUNK",
    "FIT_RESUME_KEYS",
    "RefitRun",
    "add_fit_arguments",
    "begin_refit",
    "cached_tensors",
    "check_fit_args",
    "fit_cached",
    "gill_base",
    "items_digest",
    "save_refit",
    "start_fit",
    "tensors_digest",
]

T = TypeVar("T")
CHUNK = 256  # items per cache file


def tensors_digest(path: Path) -> str:
    """The first 16 hex digits of a sha256 over a safetensors file's tensors as float32, by name:
    what a cache key records of the weights its tensors came from (the same for an fp16 file and
    its fp32 copy)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(name.encode())
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def items_digest(items: Sequence[Any]) -> str:
    """The first 16 hex digits of a sha256 over the items' reprs: a cache key that changes when
    any item does (a caption edited, an image added, another request template)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def cached_tensors(
    folder: Path,
    key: dict[str, Any],
    items: Sequence[T],
    compute: Callable[[Sequence[T]], dict[str, torch.Tensor]],
    desc: str,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """compute(chunk) over `items` in chunks of CHUNK, concatenated (float32, CPU). Chunks already
    in `folder` under the same `key` are read back; the others are computed and written one by
    one (atomically), so an interrupted run keeps what it finished. Another key clears them."""
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "key.json"
    if key_file.is_file() and json.loads(key_file.read_text(encoding="utf-8")) != key:
        for old in folder.glob("part-*.safetensors"):  # another checkpoint, data or request set
            old.unlink()
    atomic_write_text(key_file, json.dumps(key, indent=1) + "\n")
    parts: list[dict[str, torch.Tensor]] = []
    starts = range(0, len(items), CHUNK)
    for k, start in enumerate(tqdm(starts, desc=desc, disable=not progress)):
        path = folder / f"part-{k:04d}.safetensors"
        chunk = items[start : start + CHUNK]
        if path.is_file():
            try:
                part = load_file(str(path))
            except Exception:  # noqa: BLE001 - an unreadable chunk is computed again
                part = {}
            if part and all(v.shape[0] == len(chunk) for v in part.values()):
                parts.append(part)
                continue
        with torch.no_grad():
            part = {name: t.float().cpu().contiguous() for name, t in compute(chunk).items()}
        atomic_write_bytes(path, save(part))
        parts.append(part)
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


# a refit resumes only with these settings unchanged (`--resume`)
FIT_RESUME_KEYS = (
    "base", "cache", "lr", "steps", "warmup", "batch_size", "seed", "weight_decay"
)  # fmt: skip


def start_fit(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    module: torch.nn.Module,
    param_groups: Any,
    base: Path,
    cache_key: dict[str, Any],
    **extra: Any,
) -> tuple[torch.optim.Optimizer, Any, dict[str, Any], int]:
    """AdamW over `param_groups` (betas 0.9/0.95, `args.weight_decay` unless a group sets its
    own), cosine schedule with `args.warmup` steps (default 3 %), the run's config (`extra`
    added) and the step to start from: 0, or `<out>/last`'s with `--resume` (a parser error when
    a setting of FIT_RESUME_KEYS differs). Returns (optimizer, scheduler, run_config, start)."""
    optimizer = torch.optim.AdamW(
        param_groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95)
    )
    warmup = args.warmup if args.warmup is not None else max(1, args.steps * 3 // 100)
    scheduler = cosine_with_warmup(optimizer, warmup, args.steps)
    run_config = {
        "base": str(base),
        "cache": cache_key,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "steps": args.steps,
        "warmup": warmup,
        "batch_size": args.batch_size,
        "seed": args.seed,
        **extra,
    }
    # a refit may rerun in its folder: the cached states there are what it reuses
    start = resume_or_start(
        parser, args, module, optimizer, scheduler, run_config, FIT_RESUME_KEYS, rerun=True
    )
    return optimizer, scheduler, run_config, start


def fit_cached(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_on: Callable[[torch.Tensor], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    n: int,
    start: int,
    run_config: dict[str, Any],
    args: argparse.Namespace,
    desc: str,
) -> tuple[int, float]:
    """`args.steps` AdamW steps (from `start`) of loss_on(batch indices into the n cached items),
    in the order train.common.batch_indices gives (seed, step); clip 1.0. Reads from `args`: out,
    steps, stop_at, batch_size, seed, save_every, eval_every, max_minutes, resume, no_progress.
    Every eval_every steps and at the end the row of loss.jsonl also holds evaluate(). Returns
    (the last step done, minutes)."""
    curve = args.out / "loss.jsonl"
    trim_log(curve, start)  # rows after the resumed state go
    batches = batch_indices(n, args.batch_size, args.seed, start)
    params = [p for p in module.parameters() if p.requires_grad]
    module.train()
    began = time.monotonic()
    done = start
    bar = tqdm(total=args.steps, initial=start, desc=desc, unit="step", disable=args.no_progress)
    with curve.open("a", encoding="utf-8") as log:
        for step in range(start, args.stop_at or args.steps):
            loss = loss_on(torch.from_numpy(next(batches)))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            row: dict[str, Any] = {"step": done, "loss": round(float(loss.detach()), 5)}
            if done % args.eval_every == 0 or done == args.steps:
                row.update({k: round(v, 5) for k, v in evaluate().items()})
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix({k: v for k, v in row.items() if k != "step"})
            bar.update(1)
            out_of_time = (
                args.max_minutes is not None and time.monotonic() - began > 60 * args.max_minutes
            )
            stopping = out_of_time or done == args.stop_at
            if done % args.save_every == 0 or done == args.steps or stopping:
                save_training_state(args.out, module, optimizer, scheduler, done, run_config)
            if out_of_time:
                print(f"--max-minutes {args.max_minutes} reached after step {done}")
                break
    bar.close()
    return done, (time.monotonic() - began) / 60


# -- what the GILL refits share around the loop ---------------------------------------------------


def add_fit_arguments(
    parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float, what: str
) -> None:
    """The options `fit_cached` reads, and the base checkpoint's, device and output dtype."""
    parser.add_argument("--preset", default="shapes", help="preset name (configs/*.json)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=f"the trained GILL folder whose {what} is refit (default: the preset's gill)",
    )
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps in all")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="items per step")
    parser.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default 3%%)")
    parser.add_argument("--seed", type=int, default=0, help="item drawing and batch order")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument("--save-every", type=int, default=500, help="steps between <out>/last")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between val checks")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this time")
    parser.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--dtype",
        choices=("auto", "float16", "float32"),
        default="auto",
        help="of final/ (default auto: the --checkpoint's)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_fit_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`add_fit_arguments`' values: a parser error naming the first bad one."""
    check_run_args(parser, args, ("steps", "batch_size", "save_every", "eval_every"))


@dataclass
class RefitRun:
    """What a GILL refit script's main() works from (begin_refit)."""

    args: argparse.Namespace
    command: str  # the command line as run, for the model card
    preset: PolychromeConfig  # --preset's
    base: Path  # the GILL folder refit (gill_base)
    device: torch.device


def begin_refit(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    check_args: Callable[[argparse.ArgumentParser, argparse.Namespace], None],
) -> RefitRun | None:
    """The start every GILL refit's main() shares: parse `argv` (None: the command line); None
    on a second process of ``accelerate launch`` (the refits run as one process: the caller
    returns 0); then `check_args`, --threads, the preset, the base GILL folder (a parser error if
    none), --device and --seed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if other_process(parser.prog):
        return None
    check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PolychromeConfig.from_preset(args.preset)
    base = gill_base(parser, args, preset)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    return RefitRun(args, f"{parser.prog} {shlex.join(argv)}", preset, base, device)


def gill_base(parser: argparse.ArgumentParser, args: argparse.Namespace, preset: Any) -> Path:
    """The GILL folder to refit: --checkpoint, else the preset's; a parser error if neither is
    one."""
    base = args.checkpoint
    if base is None:
        if not preset.gill.checkpoint:
            parser.error(f"--checkpoint: the {args.preset!r} preset names no GILL checkpoint")
        base = project_path(preset.gill.checkpoint)
    if not (Path(base) / "gill.safetensors").is_file():
        parser.error(f"--checkpoint {base}: not a GILL folder (no gill.safetensors)")
    return Path(base)


def save_refit(model: Any, base: Path, args: argparse.Namespace, metadata: dict[str, Any]) -> Path:
    """<out>/final: the refit model in --dtype (auto: the base's), its metadata nesting the
    base's (so the final folder's manifest records every run it came from)."""
    manifest = json.loads((base / "manifest.json").read_text(encoding="utf-8"))
    meta = {**metadata, "base": str(base), "base_metadata": manifest.get("metadata", {})}
    dtype = saved_dtype(base) if args.dtype == "auto" else getattr(torch, args.dtype)
    final: Path = model.save_pretrained(
        args.out / "final", dtype=dtype, metadata=meta, overwrite=True
    )
    return final
