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
