"""Cold vs cached load of a packaged model source, side by side in one run.

    python -m bench.source_cache                       # smollm2-135m-instruct, 3 repeats
    python -m bench.source_cache --repeats 5 --json out/source_cache.json

Cold: resolve into an empty cache dir (SmolLM2: dequantise the GGUF, write safetensors) and load.
Cached: resolve again (the cache is reused) and load. Reports medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from core.io import atomic_write_text
from lm.loading import load_causal_lm


def _timed_load(source: str) -> float:
    t0 = time.perf_counter()
    load_causal_lm(source)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    cold, cached = [], []
    previous = os.environ.get("POLYCHROME_CACHE")
    try:
        for _ in tqdm(range(args.repeats), desc="repeats"):
            with tempfile.TemporaryDirectory() as cache:
                os.environ["POLYCHROME_CACHE"] = cache
                cold.append(_timed_load(args.source))
                cached.append(_timed_load(args.source))
    finally:
        if previous is None:
            os.environ.pop("POLYCHROME_CACHE", None)
        else:
            os.environ["POLYCHROME_CACHE"] = previous
    result = {
        "source": args.source,
        "repeats": args.repeats,
        "cold_s": cold,
        "cached_s": cached,
        "cold_median_s": statistics.median(cold),
        "cached_median_s": statistics.median(cached),
        "speedup_median": statistics.median(c / w for c, w in zip(cold, cached, strict=True)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
    }
    print(
        f"{args.source}: cold {result['cold_median_s']:.2f} s, "
        f"cached {result['cached_median_s']:.2f} s, cached is "
        f"{result['speedup_median']:.1f}x faster (median of {args.repeats})"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
