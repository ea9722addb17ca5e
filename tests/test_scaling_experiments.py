"""The small experiment scripts under `accelerate launch`: independent models are shared out over
the processes and give the one-process results; a script of dependent stages runs on process 0
while the others stop (train/decoding_common.py says why models, not batches, are split)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import launch_two_processes

from train import binary_pv as train_binary_pv
from train import lexinvariant as train_lexinvariant

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _without_times(value: Any) -> Any:
    """The result with its wall-clock fields and the (differing) output folder left out."""
    if isinstance(value, dict):
        drop = {"seconds", "command", "resumed"}
        return {k: _without_times(v) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_binary_pv_shares_its_models_over_two_processes(tmp_path):
    argv = ["--bits", "8", "16", "--seeds", "0", "--steps", "5", "--infer-steps", "5"]
    argv += ["--max-chunks", "60"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_binary_pv.main(["--out", str(one), *argv]) == 0
    run = launch_two_processes("train.binary_pv", ["--out", str(two), *argv])
    assert "process 1 of 2: 2 of the 4 models" in run.stdout
    # 2 binarizers x 2 code lengths: each process trained two of the four models ...
    stages = sorted(p.name for p in (two / "stages").iterdir())
    assert stages == sorted(p.name for p in (one / "stages").iterdir()) and len(stages) == 4
    a = json.loads((one / "binary_pv.json").read_text())
    b = json.loads((two / "binary_pv.json").read_text())
    # ... and the table is the one-process table, figure for figure.
    assert _without_times(b) == _without_times(a)
    assert set(b["precision_at_10"]) == set(a["precision_at_10"])


def test_lexinvariant_trains_its_two_models_on_two_processes(tmp_path):
    argv = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--hidden", "16"]
    argv += ["--layers", "1", "--heads", "2", "--eval-rows", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_lexinvariant.main(["--out", str(one), *argv]) == 0
    run = launch_two_processes("train.lexinvariant", ["--out", str(two), *argv])
    assert "process 1 of 2: 1 of the 2 models" in run.stdout
    a = json.loads((one / "lexinvariant.json").read_text())
    b = json.loads((two / "lexinvariant.json").read_text())
    assert set(b["curves"]) == set(a["curves"]) and len(a["curves"]) == 3
    for name, curves in a["curves"].items():
        for text in ("plain", "cipher"):
            for key in ("nll", "accuracy"):
                assert b["curves"][name][text][key] == pytest.approx(curves[text][key], rel=1e-6)
    for name in ("lexinvariant", "standard"):
        assert b["training"][name]["loss"] == pytest.approx(a["training"][name]["loss"], rel=1e-6)


def test_a_script_of_dependent_stages_runs_on_process_zero(tmp_path):
    argv = ["--out", str(tmp_path), "--length", "4", "--mdlm-steps", "3", "--sampler-steps", "2"]
    argv += ["--hidden", "32", "--layers", "1", "--heads", "2", "--batch-size", "16"]
    argv += ["--samples", "64", "--tokens-per-step", "2"]
    run = launch_two_processes("train.decoding_adjust", argv)
    assert "process 1 of 2 stops here" in run.stdout
    result = json.loads((tmp_path / "decoding_adjust.json").read_text())
    assert result["rows"][0]["sampler"] == "K=1 exact"
    assert result["training"]["mdlm"]["steps"] == 3
