"""Retrieval index: query latency and recall@10 of the approximate kinds vs exact, side by side.

    python -m bench.retrieval_index                          # 100K and 1M, D = 256 (shapes-vit)
    python -m bench.retrieval_index --sizes 100000 --dims 768 --json out/retrieval_768.json
    python -m bench.retrieval_index --quick                  # 20K vectors, seconds

For each (N, D): N unit vectors drawn from a mixture of Gaussian clusters (random unit centres
plus isotropic noise of norm ~``--spread``, then normalised: clustered like image embeddings, not
uniform on the sphere), ``--points-per-cluster`` vectors per cluster on average (so 100K and 1M
have the same local density; ``--clusters`` fixes the count instead), and ``--queries`` fresh
draws from the same mixture. Each
index kind is built through generation.index.ImageIndex exactly as the CLI builds it, then timed
on the same queries: median milliseconds per query at batch 1 and at batch ``--batch`` (the
batch's time / its size), and recall@10 = |approximate top-10 ∩ exact top-10| / 10, averaged over
the queries. ``exact`` (IndexFlatIP) is the reference (recall 1 by definition); ``ivf`` runs at
each ``--nprobe``, ``hnsw`` at each ``--ef-search`` (built only up to ``--hnsw-max-size``
vectors: its graph construction at 1M takes tens of minutes on one core). FAISS runs with
``--threads`` OpenMP threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from core.io import atomic_write_text
from generation.index import ImageIndex, IndexEntry, IndexParams


def clustered_vectors(
    n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """(n, dim) float32 unit vectors from `clusters` Gaussian clusters (generated in chunks)."""
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(clusters, size=m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _latency_ms(index: ImageIndex, queries: np.ndarray, batch: int, repeats: int, **kw) -> float:
    """Median ms per query over `repeats` searches of `batch` queries each (after one warm-up)."""
    index.search(queries[:batch], 10, **kw)
    times = []
    for r in range(repeats):
        start = (r * batch) % (len(queries) - batch + 1)
        q = queries[start : start + batch]
        t0 = time.perf_counter()
        index.search(q, 10, **kw)
        times.append((time.perf_counter() - t0) * 1000 / batch)
    return statistics.median(times)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist(), strict=True)]
    return float(np.mean(hits) / truth.shape[1])


def _measure(
    index: ImageIndex,
    queries: np.ndarray,
    truth: np.ndarray | None,
    args: argparse.Namespace,
    **kw: Any,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "ms_per_query_b1": _latency_ms(index, queries, 1, args.repeats, **kw),
        f"ms_per_query_b{args.batch}": _latency_ms(
            index, queries, args.batch, max(3, args.repeats // 4), **kw
        ),
    }
    if truth is not None:
        found = np.concatenate(
            [index.search(queries[s : s + 256], 10, **kw).ids for s in range(0, len(queries), 256)]
        )
        row["recall_at_10"] = _recall(found, truth)
    return row


def _build(kind: str, x: np.ndarray, params: IndexParams, entries: list[IndexEntry]):
    index = ImageIndex("bench", x.shape[1], kind, params)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    index.add(x, entries, model="bench")
    return index, time.perf_counter() - t0


def run_size(n: int, dim: int, args: argparse.Namespace, bar: tqdm) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    clusters = args.clusters or max(1, n // args.points_per_cluster)
    x = clustered_vectors(n + args.queries, dim, clusters, args.spread, rng)
    x, queries = x[:n], np.ascontiguousarray(x[n:])
    entries = [IndexEntry(f"/bench/{i}", 0, 0) for i in range(n)]
    rows: list[dict[str, Any]] = []
    base = {"n": n, "dim": dim, "clusters": clusters}

    bar.set_postfix_str(f"N={n} D={dim} exact")
    index, build_s = _build("exact", x, IndexParams(), entries)
    truth = np.concatenate(
        [index.search(queries[s : s + 256], 10).ids for s in range(0, len(queries), 256)]
    )
    rows.append(
        {**base, "kind": "exact", "param": "-", "build_s": build_s}
        | _measure(index, queries, truth, args)
    )
    del index

    bar.set_postfix_str(f"N={n} D={dim} ivf")
    index, build_s = _build("ivf", x, IndexParams(), entries)
    nlist = int(index.info()["nlist"])
    for nprobe in args.nprobe:
        row = {**base, "kind": "ivf", "param": f"nlist={nlist} nprobe={nprobe}"}
        rows.append(
            row | {"build_s": build_s} | _measure(index, queries, truth, args, nprobe=nprobe)
        )
    del index

    if n <= args.hnsw_max_size:
        bar.set_postfix_str(f"N={n} D={dim} hnsw")
        index, build_s = _build("hnsw", x, IndexParams(), entries)
        for ef in args.ef_search:
            row = {**base, "kind": "hnsw", "param": f"M=32 efSearch={ef}"}
            rows.append(
                row | {"build_s": build_s} | _measure(index, queries, truth, args, ef_search=ef)
            )
        del index
    return rows


def markdown(rows: Sequence[dict[str, Any]], batch: int) -> str:
    lines = [
        f"| N | D | index | parameters | build s | ms/query (batch 1) | ms/query (batch {batch}) "
        "| recall@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['dim']} | {r['kind']} | {r['param']} | {r['build_s']:.1f} | "
            f"{r['ms_per_query_b1']:.3f} | {r[f'ms_per_query_b{batch}']:.3f} | "
            f"{r['recall_at_10']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.retrieval_index",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--dims", type=int, nargs="+", default=[256], help="256 = shapes-vit's joint space"
    )
    parser.add_argument("--quick", action="store_true", help="20K vectors, fewer repeats")
    parser.add_argument("--points-per-cluster", type=int, default=1000, help="N / clusters")
    parser.add_argument("--clusters", type=int, help="a fixed cluster count for every N")
    parser.add_argument("--spread", type=float, default=2.0, help="noise norm around a centre")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall@10")
    parser.add_argument("--repeats", type=int, default=50, help="batch-1 searches timed")
    parser.add_argument("--batch", type=int, default=32, help="the larger query batch")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--hnsw-max-size", type=int, default=100_000, help="largest N for hnsw")
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result here too")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.queries = [20_000], 10, 200
    if args.batch > args.queries:
        parser.error(f"--batch {args.batch} exceeds --queries {args.queries}")
    faiss.omp_set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    cases = [(n, d) for d in args.dims for n in args.sizes]
    with tqdm(cases, desc="sizes", disable=args.no_progress) as bar:
        for n, d in bar:
            rows.extend(run_size(n, d, args, bar))
    result = {
        "command": "python -m bench.retrieval_index "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, faiss {faiss.__version__}, {args.threads} thread(s)",
        "points_per_cluster": None if args.clusters else args.points_per_cluster,
        "spread": args.spread,
        "queries": args.queries,
        "repeats": args.repeats,
        "batch": args.batch,
        "rows": rows,
    }
    print(markdown(rows, args.batch), end="")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
