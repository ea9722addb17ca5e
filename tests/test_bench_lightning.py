"""Smoke test of bench/lightning_attention.py and hand checks of its measuring helpers."""

from __future__ import annotations

import json

import pytest
import torch

from bench import lightning_attention as bench


def test_quick_run_writes_a_consistent_result(tmp_path):
    result = bench.main(["--quick", "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["n"] for r in saved["attention"]] == saved["config"]["lengths"] == [64, 128, 256]
    for row in saved["attention"]:
        for key in ("lightning_ms", "softmax_ms", "lightning_saved_mb", "softmax_saved_mb"):
            assert row[key] > 0, key
        assert row["time_ratio"] == pytest.approx(row["lightning_ms"] / row["softmax_ms"])
        assert row["memory_ratio"] == pytest.approx(
            row["lightning_saved_mb"] / row["softmax_saved_mb"]
        )
    assert [r["context"] for r in saved["decode"]] == [16, 64]
    for row in saved["decode"]:
        assert row["lightning_ms_per_token"] > 0 and row["softmax_ms_per_token"] > 0
    # Cache sizes, by hand: the TNL state is the same at any context; the KV cache holds
    # layers (2) x (K, V) x (context + 3 decoded) tokens x hidden 32 x 4 bytes.
    short, long = saved["decode"]
    assert short["lightning_cache_mb"] == long["lightning_cache_mb"] > 0
    for row in saved["decode"]:
        kv_bytes = 2 * 2 * (row["context"] + 3) * 32 * 4
        assert row["softmax_cache_mb"] == pytest.approx(kv_bytes / 2**20)


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_crossover_interpolates_in_log_log():
    # log ratio goes from log 2 to -log 2 between 512 and 2048: crossing at sqrt(512 * 2048).
    assert bench.crossover([512, 2048], [2.0, 0.5]) == pytest.approx(1024)
    assert bench.crossover([512, 1024, 4096], [3.0, 2.0, 0.5]) == pytest.approx(2048)
    assert bench.crossover([512, 1024], [1.0, 0.5]) == 512
    assert bench.crossover([512, 1024], [3.0, 1.5]) is None


def test_saved_tensor_bytes_counts_what_autograd_keeps_once():
    x = torch.randn(10, 10, requires_grad=True)  # 400 bytes
    w = torch.randn(10, 10, requires_grad=True)
    assert bench.saved_tensor_bytes(lambda: x @ w)[1] == 800  # matmul keeps both operands
    assert bench.saved_tensor_bytes(lambda: x @ x)[1] == 400  # same storage counted once
    assert bench.saved_tensor_bytes(lambda: x * 2.0)[1] == 0  # scaling by a constant keeps none
    assert bench.saved_tensor_bytes(lambda: x.exp())[1] == 400  # exp keeps its output
