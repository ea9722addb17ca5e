"""What every training script shares: resumable state, deterministic batch order, the loop's tools.

Training state lives in ``<out>/last/`` (written atomically, replaced every ``--save-every``
steps) and holds:

- ``trained.safetensors`` + ``manifest.json``: only the tensors being trained, with the run config
  (core.checkpoint format, sha256-checked on load);
- ``optimizer.pt``: optimizer and scheduler state dicts, step, RNG states. Written with torch.save
  and read back with ``weights_only=True`` (only tensors and plain containers inside).

The batch order is a pure function of (seed, step): epoch e is a permutation drawn from
``seed + e``, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from core.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from core.config import Config, ConfigError
from core.images import load_rgb, square_crop
from core.io import atomic_dir, atomic_write_text
from core.runtime import destroy_process_group_at_exit

__all__ = [
    "DataParallel",
    "adamw_matrices_decay",
    "batch_indices",
    "check_run_args",
    "cosine_with_warmup",
    "decode_images",
    "load_training_state",
    "make_accelerator",
    "open_log",
    "prefetched",
    "refuse_held_out",
    "resume_mismatches",
    "resume_or_start",
    "save_training_state",
    "trainable_state",
    "trim_log",
    "write_model_card",
]


T = TypeVar("T")


def make_accelerator(**kwargs: Any) -> Accelerator:
    """``Accelerator(**kwargs)`` whose process group (under ``accelerate launch``) is destroyed
    when the process exits (core.runtime.destroy_process_group_at_exit). Every training script
    makes its Accelerator here."""
    accelerator = Accelerator(**kwargs)
    destroy_process_group_at_exit()
    return accelerator


class DataParallel:
    """The processes of ``accelerate launch`` (one process without it), as the training scripts
    use them: every process builds the same global batch (a pure function of seed and step) and
    takes its own slice of it (`part`); DDP (``prepare``) averages the gradients; the main process
    logs and saves; a decision to stop is taken by all processes together (`any`), or they would
    wait for each other forever. N processes thus take the steps one process takes with the
    whole batch (tests/test_scaling.py)."""

    def __init__(self, device: torch.device) -> None:
        # Precision is each script's own flag (--bf16 and the like), not the launcher's: a
        # launcher config with mixed_precision bf16 would otherwise autocast what one process
        # runs in fp32, and N processes would no longer take one process's steps.
        self.accelerator = make_accelerator(cpu=device.type == "cpu", mixed_precision="no")
        self.device = self.accelerator.device
        self.world = int(self.accelerator.num_processes)
        self.rank = int(self.accelerator.process_index)
        self.main = bool(self.accelerator.is_main_process)

    def divides(self, **sizes: int) -> str | None:
        """Why the global sizes cannot be split over the processes, or None."""
        bad = {k: v for k, v in sizes.items() if v % self.world}
        if not bad:
            return None
        named = " and ".join(f"--{k.replace('_', '-')} {v}" for k, v in bad.items())
        verb = "is" if len(bad) == 1 else "are"
        return f"{named} {verb} global: each must divide over the {self.world} processes"

    def part(self, items: Sequence[T]) -> list[T]:
        """This process's slice of a global batch (its size divides over the processes)."""
        per = len(items) // self.world
        return list(items[self.rank * per : (self.rank + 1) * per])

    def total(self, value: float) -> float:
        """The sum of `value` over the processes (float64 there: gloo and NCCL have it; one
        process, on any device such as MPS which has not, adds nothing)."""
        if self.world == 1:
            return float(value)
        t = torch.tensor(float(value), device=self.device, dtype=torch.float64)
        return float(self.accelerator.reduce(t, "sum"))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` (same shape on each) concatenated along dim 0 in rank order,
        gradient included: a loss over the gathered rows that every process computes alike (an
        in-batch InfoNCE) sends each process the gradient of its own rows from all N copies,
        which DDP's average turns back into the one-process gradient (tests/test_scaling.py)."""
        if self.world == 1:
            return tensor
        import torch.distributed.nn.functional as dist_fn  # needs an initialised process group

        return torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0)

    def mine(self, jobs: Sequence[T], what: str = "jobs") -> list[tuple[int, T]]:
        """This process's share of independent jobs (an experiment's seeds or variants), round
        robin, each with its index in `jobs`: for scripts that train several small models, where
        splitting the models over the processes beats splitting each model's batch."""
        share = [(i, job) for i, job in enumerate(jobs) if i % self.world == self.rank]
        if self.world > 1:
            print(f"process {self.rank} of {self.world}: {len(share)} of the {len(jobs)} {what}")
        return share

    def collect(self, done: Sequence[tuple[int, Any]]) -> list[Any]:
        """The results of every process's `mine` jobs, back in job order, on every process.
        Results must pickle (they travel between our own processes, never from users)."""
        if self.world == 1:
            pairs = list(done)
        else:
            import torch.distributed as dist

            parts: list[Any] = [None] * self.world
            dist.all_gather_object(parts, list(done))
            pairs = [pair for part in parts for pair in part]
        return [result for _, result in sorted(pairs, key=lambda pair: pair[0])]

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is True on any of them."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor(float(flag), device=self.device)
        return bool(self.accelerator.reduce(t, "max"))

    def end_step(
        self,
        done: int,
        save: Callable[[int], object],
        elapsed: float,
        args: argparse.Namespace,
        last: int | None = None,
    ) -> bool:
        """The end of a training step, on every process: whether ``args.max_minutes`` has run
        out (`elapsed` seconds against it, on any process: all stop together). When it has, every
        ``args.save_every`` steps and at step `last`, all processes meet and the main one calls
        `save(done)` (the training state: a run stopped by the clock resumes where it stopped)."""
        save_every, max_minutes = args.save_every, args.max_minutes
        out_of_time = self.any(max_minutes is not None and elapsed > 60 * max_minutes)
        if done % save_every == 0 or done == last or out_of_time:
            self.accelerator.wait_for_everyone()
            if self.main:
                save(done)
        if out_of_time and self.main:
            print(f"--max-minutes {max_minutes} reached after step {done}")
        return out_of_time


def batch_indices(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
    """Endless batches of dataset indices from step `start_step` on (drop_last within an epoch)."""
    if n < batch_size:
        raise ValueError(f"dataset of {n} items is smaller than one batch ({batch_size})")
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(n)
        for b in range(offset, per_epoch):
            yield order[b * batch_size : (b + 1) * batch_size]
            step += 1


def prefetched(
    make: Callable[[int], T], steps: Iterable[int], ahead: int
) -> Generator[T, None, None]:
    """``make(step)`` for each of `steps`, in order, computed up to `ahead` steps ahead in one
    background thread, so that building a batch (tokenising, reading images: Python that
    releases nothing) overlaps the step before it, whose torch and CUDA calls release the GIL.
    The results are the same as without it (one thread, in order); an exception in `make`
    is raised here, at its step. ``ahead <= 0``: no thread. A consumer that stops early leaves
    at most `ahead` batches built and unused."""
    if ahead <= 0:
        for step in steps:
            yield make(step)
        return
    pending: deque[Future[T]] = deque()
    upcoming = iter(steps)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    try:
        for step in itertools.islice(upcoming, ahead):
            pending.append(pool.submit(make, step))
        while pending:
            result = pending.popleft().result()
            for step in itertools.islice(upcoming, 1):
                pending.append(pool.submit(make, step))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def adamw_matrices_decay(
    module: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters, weight decay on the matrices (ndim >= 2) only:
    biases, norm gains and other vectors take none (BERT's and GPT-2's recipe). Two groups, the
    decayed first (a saved optimizer state follows that order)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=betas,
    )


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.05
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to min_ratio x the base learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by their state-dict names (what a checkpoint stores)."""
    return {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}


def save_training_state(
    out: str | os.PathLike[str],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    config: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Atomically replace ``<out>/last`` with the current training state."""
    target = Path(out) / "last"
    with atomic_dir(target, overwrite=True) as tmp:
        save_checkpoint(
            tmp / "weights",
            {"trained": trainable_state(module)},
            config,
            {"step": step, **(metadata or {})},
        )
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "step": step,
            "torch_rng": torch.random.get_rng_state(),
        }
        torch.save(state, tmp / "optimizer.pt")
    return target


def load_training_state(
    out: str | os.PathLike[str],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> int:
    """Restore ``<out>/last`` into module/optimizer/scheduler; return the step to continue from."""
    target = Path(out) / "last"
    ckpt = load_checkpoint(target / "weights")
    trained = ckpt.tensors["trained"]
    expected = trainable_state(module)
    if set(trained) != set(expected):
        missing, extra = sorted(set(expected) - set(trained)), sorted(set(trained) - set(expected))
        raise ValueError(
            f"{target}: the saved trained tensors do not match this model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    full = module.state_dict()
    full.update(trained)
    load_state_strict(module, full, what=str(target))
    state = torch.load(target / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.random.set_rng_state(state["torch_rng"])
    return int(state["step"])


def resume_or_start(
    parser: Any,
    args: Any,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run_config: dict[str, Any],
    keys: Iterable[str],
    announce: bool = True,
    configs: Mapping[str, type[Config]] | None = None,
    rerun: bool = False,
) -> int:
    """The step to start from: 0, or with ``args.resume`` the state of ``<args.out>/last``
    loaded into module/optimizer/scheduler, after checking that it was trained with the same
    `keys` of `run_config` (a parser error naming those that differ; `configs`: as in
    `resume_mismatches`). Without ``--resume`` an --out that holds a run (last/ or final/) is
    refused: starting afresh there would trim its log at once and replace its model at the end
    (``rerun``: allowed, for the cached refits that rerun in their folder to reuse its cache)."""
    if not args.resume:
        if not rerun:
            refuse_held_out(parser, args)
        return 0
    why = resume_mismatches(args.out, run_config, keys, configs)
    if why:
        parser.error(f"--resume: {why}")
    start = load_training_state(args.out, module, optimizer, scheduler)
    if announce:
        print(f"resumed from {args.out / 'last'} at step {start}")
    return start


def refuse_held_out(parser: Any, args: Any) -> None:
    """A parser error when ``args.out`` holds a run (last/ or final/) and ``args.resume`` is not
    set: call it right after parsing, before anything slow (resume_or_start checks it again)."""
    if getattr(args, "resume", False):
        return
    held = [n for n in ("last", "final") if (Path(args.out) / n).exists()]
    if held:
        parser.error(
            f"--out {args.out} holds a run ({' and '.join(n + '/' for n in held)}): pass "
            "--resume to continue it, or choose another --out"
        )


def trim_log(path: Path, start: int) -> None:
    """Drop the rows of a jsonl log (one row per logged step) after `start`: those of a run that
    stopped after its last saved state, which a resumed run logs again (all of them when
    starting afresh, start 0)."""
    rows = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    kept = [r for r in rows if json.loads(r)["step"] <= start]
    if len(kept) < len(rows) or not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(r + "\n" for r in kept))


def open_log(path: Path, start: int) -> TextIO:
    """`path` trimmed to `start` (`trim_log`) and opened to append."""
    trim_log(path, start)
    return path.open("a", encoding="utf-8")


def check_run_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, positive: Sequence[str] = ()
) -> None:
    """The option checks the training scripts share, each failure a parser error naming the
    option, what it must be and what was received: every option in `positive` (dest names) >= 1;
    then, where the script has the option, ``--lr`` > 0, ``--max-minutes`` > 0, ``--stop-at`` in
    [1, ``--steps``], and ``--resume`` only with ``<out>/last`` present."""
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, received {getattr(args, name)}")
    if getattr(args, "lr", None) is not None and args.lr <= 0:
        parser.error(f"--lr must be > 0, received {args.lr}")
    if getattr(args, "max_minutes", None) is not None and args.max_minutes <= 0:
        parser.error(f"--max-minutes must be > 0, received {args.max_minutes}")
    if getattr(args, "stop_at", None) is not None and not 1 <= args.stop_at <= args.steps:
        parser.error(f"--stop-at must be in [1, --steps={args.steps}], received {args.stop_at}")
    if getattr(args, "resume", False) and not (args.out / "last").is_dir():
        parser.error(f"--resume: {args.out / 'last'} not found; start without --resume")


def resume_mismatches(
    out: str | os.PathLike[str],
    run_config: dict[str, Any],
    keys: Iterable[str],
    configs: Mapping[str, type[Config]] | None = None,
) -> str | None:
    """Why ``<out>/last`` cannot be resumed with `run_config` (the `keys` that differ), or None.

    A key named in `configs` holds a Config's dict and is compared as that Config, so a field
    added since the run was saved, at its default, is no difference."""
    manifest = Path(out) / "last" / "weights" / "manifest.json"
    if not manifest.is_file():
        return f"{Path(out) / 'last'}: no training state to resume from"
    saved = json.loads(manifest.read_text(encoding="utf-8"))["config"]
    configs = configs or {}

    def same(key: str) -> bool:
        mine, theirs = run_config.get(key), saved.get(key)
        if key in configs and isinstance(mine, dict) and isinstance(theirs, dict):
            try:  # a saved config this code cannot read (a field since removed) is a difference
                return configs[key].from_dict(theirs) == configs[key].from_dict(mine)
            except ConfigError:
                return False
        return bool(mine == theirs)

    changed = [k for k in keys if not same(k)]
    if not changed:
        return None
    return f"{Path(out) / 'last'} was trained with other settings: " + ", ".join(
        f"{k} {saved.get(k)!r} -> {run_config.get(k)!r}" for k in changed
    )


def write_model_card(
    folder: Path,
    title: str,
    intro: str,
    run_config: dict[str, Any],
    metadata: dict[str, Any],
    skip: tuple[str, ...] = (),
) -> None:
    """<folder>/MODEL_CARD.md: title, what was trained, the command, the run's settings and the
    files' sha256 (from manifest.json). Evaluation figures are added by hand."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    lines = [
        f"# {title}",
        "",
        intro,
        "",
        "## Command",
        "",
        f"    {metadata['command']}",
        "",
        "## Run",
        "",
        *(f"- {k}: {v}" for k, v in run_config.items() if k not in skip),
        *(f"- {k}: {v}" for k, v in metadata.items() if k not in run_config and k != "command"),
        "",
        "## Files (sha256, also in manifest.json)",
        "",
        *(
            f"- {name}: {info['sha256']} ({info['bytes']} bytes)"
            for name, info in manifest["files"].items()
        ),
        "",
    ]
    (folder / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")


def remove_training_state(out: str | os.PathLike[str]) -> None:
    shutil.rmtree(Path(out) / "last", ignore_errors=True)


def _load_image(path: Path, size: int) -> np.ndarray:
    """(3, size, size) uint8: shorter side resized to `size` (bicubic), centre crop."""
    return np.asarray(square_crop(load_rgb(path), size), dtype=np.uint8).transpose(2, 0, 1)


def decode_images(
    paths: list[Path], size: int, workers: int, *, progress: bool = True
) -> torch.Tensor:
    """Decode every image once into (N, 3, size, size) uint8."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda p: _load_image(p, size), paths, chunksize=64)
        bar = tqdm(jobs, total=len(paths), desc="decode images", unit="img", disable=not progress)
        for i, arr in enumerate(bar):
            out[i] = arr
    return torch.from_numpy(out)
