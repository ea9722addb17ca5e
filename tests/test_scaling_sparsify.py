"""train.sparsify beyond one process: real 2-process CPU runs (gloo) against one process.

MaskLLM with the same global batch takes the same steps (loss, gradient norm, gates, masks);
SparseGPT and Wanda with the calibration rows split over the processes prune as one process
with all the rows. All on the tiny random Llama, each run a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import launch_two_processes
from safetensors.torch import load_file

from lm.sparsity import HessianStats, InputNormStats
from train.sparsify import main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-random-llama", "--seq-len", "32", "--eval-rows", "4"]


def _two_processes(args: list[str]) -> str:
    """A successful 2-process run's stdout."""
    return launch_two_processes("train.sparsify", args).stdout


def _assert_same_tensors(a: Path, b: Path, rtol: float = 0.0, atol: float = 0.0) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and x
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=rtol, atol=atol, msg=k)


def test_maskllm_on_two_processes_takes_the_steps_of_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*TINY, "--calib-seqs", "4", "--method", "maskllm", "--prior", "sparsegpt"]
    args += ["--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--save-every", "3"]
    assert main([*args, "--out", str(one)]) == 0
    stdout = _two_processes([*args, "--out", str(two)])
    assert "2 process(es), 2 rows each per step; 2 sparsegpt calibration rows each" in stdout
    # The same prior (calibration split), then the same 3 steps: each process ran 2 of the 4
    # rows with the same Gumbel sample, DDP averaged the gates' gradients. The gradient norm
    # (before clipping, which it stays under) would show a wrongly weighted loss, which AdamW's
    # scale-free steps could hide.
    _assert_same_tensors(one / "prior" / "masks.safetensors", two / "prior" / "masks.safetensors")
    logs = [json.loads((run / "log.json").read_text())["train"] for run in (one, two)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3]
    for key in ("loss", "lm_loss", "grad_norm", "kept_weight_norm"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=1e-3)
    assert all(r["grad_norm"] < 1.0 for r in logs[0])  # unclipped: its scale is compared
    gates = Path("last") / "weights" / "trained.safetensors"
    _assert_same_tensors(one / gates, two / gates, rtol=1e-3, atol=1e-5)
    masks = Path("sparse") / "masks.safetensors"
    _assert_same_tensors(one / masks, two / masks)
    results = json.loads((two / "results.json").read_text())
    assert results["config"]["processes"] == 2 and results["train_final"]["step"] == 3


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_calibration_split_over_two_processes_prunes_as_one(tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*TINY, "--calib-seqs", "5", "--method", method]  # 3 rows on one process, 2 on the other
    assert main([*args, "--out", str(one)]) == 0
    stdout = _two_processes([*args, "--out", str(two)])
    assert f"2 process(es), 2-3 {method} calibration rows each" in stdout
    sparse = Path("sparse")
    _assert_same_tensors(one / sparse / "masks.safetensors", two / sparse / "masks.safetensors")
    if method == "sparsegpt":  # the kept weights, updated from the summed Hessians
        values = sparse / "values.safetensors"
        _assert_same_tensors(one / values, two / values, rtol=1e-4, atol=1e-6)
    ppl = [json.loads((run / "results.json").read_text())["sparse"]["ppl"] for run in (one, two)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)


def test_batch_size_must_divide_over_the_processes(tmp_path):
    args = [*TINY, "--calib-seqs", "4", "--method", "maskllm", "--batch-size", "3"]
    run = launch_two_processes("train.sparsify", [*args, "--out", str(tmp_path / "x")], check=False)
    assert run.returncode != 0
    assert "--batch-size 3 is global: each must divide over the 2 processes" in run.stderr


@pytest.mark.parametrize("make", [HessianStats, InputNormStats])
def test_statistics_of_uneven_row_shards_summed_equal_those_of_all_rows(make):
    rows = torch.randn(3, 7, 16)  # (rows, tokens, I): rows 0-1 on one process, row 2 on another
    whole, first, second = make(16), make(16), make(16)
    for i, row in enumerate(rows):
        whole.add(row)
        (first if i < 2 else second).add(row)
    sent: list[torch.Tensor] = []  # what the second process contributes to each all-reduce
    second.reduce(lambda t: sent.append(t.clone()) or t)
    contributions = iter(sent)
    first.reduce(lambda t: t + next(contributions))
    assert first.tokens == whole.tokens == 21
    name = "hessian" if make is HessianStats else "sq_sum"
    torch.testing.assert_close(getattr(first, name), getattr(whole, name))
