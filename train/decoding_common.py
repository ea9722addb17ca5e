"""What the small experiment scripts share (the decoding methods, the language-side studies): one
plain training stage, saved when it ends; the report; how they use the processes of ``accelerate
launch``.

Each script trains in short stages (minutes each: a diffusion LM, then its sampler; an MLM, then
a seq2seq model). A finished stage is written atomically to ``<out>/stages/<name>/`` (core
checkpoint: the module's tensors + the stage config + its loss and time); ``--resume`` loads
finished stages whose config matches instead of training them again. An interrupted stage
starts over (none is longer than a few minutes at the sizes the scripts document).

Several processes: the models are small (a DDP step would cost more in communication than it
saves), so the scripts split *models*, not batches. Where an experiment trains independent
models (seeds, code lengths, an LM and its baseline) they are shared out over the processes
(``train.common.DataParallel.mine`` / ``collect``) and the results are the one-process results;
where each stage needs the one before, process 0 runs the script and the others stop at once
(`other_process`). Only process 0 writes the report.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm import tqdm

from core.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from core.io import atomic_write_text
from core.runtime import destroy_process_group_at_exit
from train.common import cosine_with_warmup

__all__ = ["other_process", "train_stage", "write_report"]


def train_stage(
    name: str,
    module: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    out: Path,
    config: dict[str, Any],
    resume: bool,
    warmup: int = 50,
) -> dict[str, Any]:
    """Train `params` (inside `module`) for `steps` AdamW steps on loss_fn(step), cosine lr with
    warmup; save the module's state. Returns {"loss": mean of the last 10% of steps, "seconds",
    "steps", "resumed"}."""
    path = out / "stages" / name
    if resume and (path / "manifest.json").is_file():
        ckpt = load_checkpoint(path)
        if ckpt.config == config:
            load_state_strict(module, ckpt.tensors["model"], what=str(path))
            return {**ckpt.metadata, "resumed": True}
        print(f"{path}: saved with another config; training stage {name!r} again")
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, min(warmup, steps // 10 + 1), steps)
    module.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=name, unit="step")
    for step in bar:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    module.eval()
    tail = losses[-max(1, steps // 10) :] if losses else [float("nan")]
    stats = {"loss": statistics.fmean(tail), "seconds": time.perf_counter() - t0, "steps": steps}
    state = {k: v for k, v in module.state_dict().items()}
    save_checkpoint(path, {"model": state}, config, stats, overwrite=True)
    return {**stats, "resumed": False}


def write_report(
    out: Path, stem: str, result: dict[str, Any], text: str, plot: Callable[[Path], None]
) -> None:
    """<out>/<stem>.json (result), .md (text) and .png (plot(path)), then print the text; on
    process 0 only, under ``accelerate launch``."""
    if not _processes().is_main_process:
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / f"{stem}.md", text)
    plot(out / f"{stem}.png")
    print(text)


def other_process(script: str) -> bool:
    """True, after saying so, on every process of ``accelerate launch`` but the first, for a
    script whose stages each need the one before: process 0 runs it as one process would and
    the others have nothing to do (the module docstring says why not DDP)."""
    state = _processes()
    if state.num_processes > 1 and not state.is_main_process:
        print(
            f"{script} trains one small model after another: process 0 runs it, process "
            f"{state.process_index} of {state.num_processes} stops here"
        )
        return True
    return False


def _processes() -> PartialState:
    """The processes of ``accelerate launch`` (one without it). ``cpu=True`` reads them from the
    launcher's environment on a machine without GPUs too; it only sets the device where no
    Accelerator has yet (these scripts choose theirs)."""
    state = PartialState(cpu=True)
    destroy_process_group_at_exit()
    return state
