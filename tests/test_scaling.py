"""Beyond one process: a real 2-process CPU run (gloo) against one process with the same global
batch, and a run killed with SIGKILL mid-training that resumes to the uninterrupted result.

Both on train.stamp with the tiny preset (a STAMP step exercises the LLM, CLIP, LoRA and the
mask head, so every kind of trained tensor is compared)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import launch_two_processes
from safetensors.torch import load_file

from data.shapeworld import main as shapeworld_main
from train.stamp import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scaling-data") / "sw"
    args = ["generate", "--out", str(root), "--train", "8", "--val", "2", "--test", "2"]
    shapeworld_main([*args, "--pretrain", "0", "--image-size", "64", "--workers", "1"])
    return root


def _args(data: Path, out: Path, steps: int, save_every: int) -> list[str]:
    return [
        "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", str(steps),
        "--batch-size", "4", "--negatives", "2", "--lr", "1e-2", "--lora-rank", "4",
        "--save-every", str(save_every), "--no-progress",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _assert_same_weights(a: Path, b: Path, rtol: float, atol: float) -> None:
    x = load_file(str(a / "final" / "stamp.safetensors"))
    y = load_file(str(b / "final" / "stamp.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=rtol, atol=atol, msg=k)


def _curve(run: Path) -> list[float]:
    rows = [json.loads(r) for r in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def test_two_cpu_processes_take_the_steps_of_one_with_the_same_global_batch(shapeworld, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_main(_args(shapeworld, one, 3, 3)) == 0
    run = launch_two_processes("train.stamp", [*_args(shapeworld, two, 3, 3)])
    assert "2 process(es), 2 requests each per step" in run.stdout
    # Each process took 2 of the 4 requests and 1 of the 2 negatives; DDP averaged the gradients.
    assert len(_curve(two)) == 3
    for a, b in zip(_curve(one), _curve(two), strict=True):
        assert a == pytest.approx(b, rel=1e-3)
    _assert_same_weights(one, two, rtol=1e-3, atol=1e-4)


def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(shapeworld, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    steps = 8
    assert train_main(_args(shapeworld, straight, steps, 2)) == 0
    child = subprocess.Popen(
        [sys.executable, "-m", "train.stamp", *_args(shapeworld, killed, steps, 2)],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    manifest = killed / "last" / "weights" / "manifest.json"
    deadline = time.monotonic() + 300
    try:
        while not manifest.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = json.loads(manifest.read_text())["metadata"]["step"]
    assert 2 <= int(saved) < steps  # killed mid-run, its last state intact (atomic writes)
    assert not (killed / "final").exists()
    assert train_main([*_args(shapeworld, killed, steps, 2), "--resume"]) == 0
    _assert_same_weights(straight, killed, rtol=1e-4, atol=1e-5)
    assert _curve(killed) == pytest.approx(_curve(straight), rel=1e-4)


def test_evaluation_sharded_over_two_processes_gives_the_metrics_of_one(shapeworld, tmp_path):
    from eval.stamp import main as eval_main

    assert train_main(_args(shapeworld, tmp_path / "m", 1, 1)) == 0
    args = ["--data", str(shapeworld), "--split", "test", "--no-progress", "--batch-size", "3"]
    args += ["--checkpoint", f"stamp={tmp_path / 'm' / 'final'}", "--timing-samples", "0"]
    assert eval_main([*args, "--json", str(tmp_path / "one.json")]) == 0
    run = launch_two_processes("eval.stamp", [*args, "--json", str(tmp_path / "two.json")])
    assert "over 2 process(es)" in run.stdout
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["samples"] == two["samples"] > 3
    assert one["methods"] == two["methods"]


@pytest.mark.parametrize(
    ("name", "kind", "processes"),
    [
        ("single_gpu", "NO", 1),
        ("multi_gpu_8", "MULTI_GPU", 8),
        ("two_nodes", "MULTI_GPU", 16),
        ("fsdp", "FSDP", 8),
        ("deepspeed_zero2", "DEEPSPEED", 8),
    ],
)
def test_accelerate_configs_load(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == kind and cfg.num_processes == processes


def _vlm_args(data: Path, out: Path) -> list[str]:
    return [
        "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "3",
        "--align-steps", "1", "--batch-size", "4", "--lr", "1e-2", "--save-every", "3",
        "--no-bf16", "--no-progress",
    ]  # fmt: skip


def test_train_vlm_on_two_processes_takes_the_steps_of_one(shapeworld, tmp_path):
    """The same check on train.vlm, whose loss is a mean over reply tokens: each process's loss
    is weighted by its share of the batch's tokens, so the average is the global mean's."""
    from train.vlm import main as vlm_main

    one, two = tmp_path / "one", tmp_path / "two"
    assert vlm_main(_vlm_args(shapeworld, one)) == 0
    run = launch_two_processes("train.vlm", [*_vlm_args(shapeworld, two)])
    assert "2 process(es), 2 conversations each per step" in run.stdout
    assert _curve(two) == pytest.approx(_curve(one), rel=1e-4)
    x = load_file(str(one / "final" / "vlm.safetensors"))
    y = load_file(str(two / "final" / "vlm.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5, msg=k)


def _gill_args(data: Path, out: Path) -> list[str]:
    return [
        "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "3",
        "--batch-size", "4", "--compositions", "2", "--caption-batch", "2", "--negatives", "2",
        "--mapper-width", "32", "--mapper-layers", "1", "--retrieval-dim", "16",
        "--decision-dropout", "0", "--lr", "1e-2", "--save-every", "3", "--no-progress",
    ]  # fmt: skip


def test_train_gill_on_two_processes_takes_the_steps_of_one(shapeworld, tmp_path):
    """GILL's InfoNCE needs the whole batch's negatives: the two processes gather each other's
    [IMG0] and image embeddings (with their gradients), and weight the caption CE by their share
    of its tokens. Without the gather each process would contrast 2 images instead of 4 and the
    retrieval loss would differ from the first step on."""
    from train.gill import main as gill_main

    one, two = tmp_path / "one", tmp_path / "two"
    assert gill_main(_gill_args(shapeworld, one)) == 0
    run = launch_two_processes("train.gill", [*_gill_args(shapeworld, two)])
    assert "2 process(es), 2 scene requests each per step" in run.stdout
    logs = [(d / "loss.jsonl").read_text().splitlines() for d in (one, two)]
    rows = [[json.loads(r) for r in log] for log in logs]
    assert [r["step"] for r in rows[1]] == [1, 2, 3]
    for a, b in zip(*rows, strict=True):
        for key in ("loss", "caption", "emit", "retrieval", "generation", "decision"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (a["step"], key)
    for name in ("gill.safetensors", "vlm.safetensors"):
        x = load_file(str(one / "final" / name))
        y = load_file(str(two / "final" / name))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-3, atol=1e-4, msg=k)
