"""Smoke tests of the bench scripts on the tiny preset's assets."""

from __future__ import annotations

import json

from bench import source_cache


def test_source_cache_bench_reports_cold_and_cached(tmp_path):
    result = source_cache.main(
        ["--source", "tiny-random-llama", "--repeats", "2", "--json", str(tmp_path / "r.json")]
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["repeats"] == 2
    assert len(saved["cold_s"]) == len(saved["cached_s"]) == 2
    assert result["speedup_median"] == saved["speedup_median"] > 0


def test_app_load_bench_serves_every_request(tmp_path, one_thread):
    from bench import app_load

    result = app_load.main(
        ["--preset", "tiny", "--clients", "2", "--requests", "3", "--max-new-tokens", "4",
         "--json", str(tmp_path / "load.json")]
    )  # fmt: skip
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved["failed"] == 0 and len(saved["requests"]) == 6
    by_kind = saved["by_kind"]
    assert sum(k["requests"] for k in by_kind.values()) == 6
    # client c starts at kind c: with 2 clients x 3 requests the first four kinds are all sent
    assert {"chat", "image question", "segment everything"} <= set(by_kind)
    assert all(0 < k["p50_s"] <= k["p95_s"] for k in by_kind.values())
    assert result["wall_s"] >= max(r["seconds"] for r in saved["requests"])
