"""Load on the demo: N concurrent clients, each sending a mix of requests, against one server.

    python -m bench.app_load                                  # shapes preset, 8 clients x 5
    python -m bench.app_load --preset tiny --clients 2 --requests 2   # seconds: the smoke size
    python -m bench.app_load --concurrency 2 --json out/app_load.json

The server is ``python app.py --preset ... --concurrency ...`` in its own process on a free local
port (bench.serve), as a user starts it; the clients are gradio_client sessions in threads, as
separate browsers would be.
Client c sends its requests in the order KINDS[(c + i) % len(KINDS)], so every kind is in flight
beside the others. Each request is timed from submit to its final output (queue wait included);
a request fails when the client raises or the reply is one of the app's warnings. Reports, per
kind: requests, failures, p50 / p95 latency; and the wall time of the whole run. The kinds a
preset cannot serve (segment without STAMP, retrieve without GILL) are left out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from bench.serve import serve_app
from core.io import atomic_write_text
from vlm.config import PolychromeConfig
from vlm.examples import example_images

WARNING = "⚠️ "  # how app.py opens a refusal or an error shown in the chat

KINDS = ("chat", "image question", "segment", "retrieve", "segment everything", "vocabulary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.app_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="preset the server loads")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--concurrency", type=int, default=1, help="the app's --concurrency")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="reply length cap")
    parser.add_argument(
        "--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: all)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    return parser


def requests_for(
    cfg: PolychromeConfig, scene: str, max_new_tokens: int
) -> dict[str, Callable[[Any], Any]]:
    """kind -> a function of a gradio_client Client that sends one request and returns its
    output; only the kinds the preset's demo serves."""
    from gradio_client import handle_file

    def chat(text: str, files: tuple[str, ...] = ()) -> Callable[[Any], Any]:
        message = {"text": text, "files": [handle_file(f) for f in files]}
        return lambda c: c.predict(message, max_new_tokens, api_name="/chat")

    out: dict[str, Callable[[Any], Any]] = {
        "chat": chat("Name three shapes that have straight edges."),
        "image question": chat("How many shapes are there?", (scene,)),
    }
    if cfg.stamp.checkpoint:
        out["segment"] = chat("Segment the largest red shape.", (scene,))
    if cfg.gill.checkpoint and cfg.gill.index:
        out["retrieve"] = chat("retrieve: A red circle next to a blue star.")
    image = handle_file(scene)
    out["segment everything"] = lambda c: c.predict(image, api_name="/segment_everything")
    out["vocabulary"] = lambda c: c.predict(
        image, "circle, square, star, triangle", "crops", api_name="/segment_vocabulary"
    )
    return out


def _failed(output: Any) -> bool:
    texts = [output] if isinstance(output, str) else []
    if isinstance(output, (list, tuple)):
        texts = [x for x in output if isinstance(x, str)]
    if isinstance(output, dict):
        texts = [str(output.get("text", ""))]
    return any(t.startswith(WARNING) for t in texts)


def run_load(
    url: str, kinds: dict[str, Callable[[Any], Any]], clients: int, per_client: int
) -> tuple[list[dict[str, Any]], float]:
    """Every client's requests, concurrently: ([{kind, seconds, ok, error}], wall seconds)."""
    from gradio_client import Client

    names = list(kinds)
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()
    bar = tqdm(total=clients * per_client, desc="requests", unit="req")

    def record(row: dict[str, Any]) -> None:
        with lock:
            rows.append(row)
            bar.update(1)

    def client(c: int) -> None:
        try:
            session = Client(url, verbose=False)
        except Exception as err:  # noqa: BLE001 (its requests count as failed, not lost)
            for i in range(per_client):
                kind = names[(c + i) % len(names)]
                record({"kind": kind, "seconds": 0.0, "ok": False, "error": f"connect: {err}"})
            return
        for i in range(per_client):
            kind = names[(c + i) % len(names)]
            began = time.perf_counter()
            error = None
            try:
                output = kinds[kind](session)
                if _failed(output):
                    error = f"warning reply: {str(output)[:200]}"
            except Exception as err:  # noqa: BLE001 (a failed request is a figure, not a crash)
                error = f"{type(err).__name__}: {err}"
            row = {"kind": kind, "seconds": time.perf_counter() - began, "ok": error is None}
            if error:
                row["error"] = error
            record(row)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    return rows, time.perf_counter() - began


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kind: requests, failures, and p50 / p95 latency of the requests that succeeded."""
    out = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        times = [r["seconds"] for r in mine if r["ok"]]
        out[kind] = {
            "requests": len(mine),
            "failed": sum(1 for r in mine if not r["ok"]),
            "p50_s": float(np.percentile(times, 50)) if times else float("nan"),
            "p95_s": float(np.percentile(times, 95)) if times else float("nan"),
        }
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| kind | requests | failed | p50 s | p95 s |", "|---|---:|---:|---:|---:|"]
    for kind, s in summary.items():
        lines.append(
            f"| {kind} | {s['requests']} | {s['failed']} | {s['p50_s']:.2f} | {s['p95_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    for name in ("clients", "requests", "concurrency", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, received {getattr(args, name)}")
    cfg = PolychromeConfig.from_preset(args.preset)
    scene = str(example_images(cfg.shapeworld)["shapes-1"])
    server = ["--preset", args.preset, "--concurrency", str(args.concurrency)]
    server += ["--queue-size", str(4 * args.clients * args.requests)]
    env_threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    with serve_app(server, env=env_threads) as url:
        kinds = requests_for(cfg, scene, args.max_new_tokens)
        rows, wall = run_load(url, kinds, args.clients, args.requests)
    summary = summarise(rows)
    result = {
        "command": "python -m bench.app_load " + " ".join(argv),
        "preset": args.preset,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.python_version()}",
        "wall_s": wall,
        "failed": sum(1 for r in rows if not r["ok"]),
        "by_kind": summary,
        "requests": rows,
    }
    print(table(summary))
    print(f"\n{len(rows)} requests from {args.clients} clients in {wall:.1f} s, "
          f"{result['failed']} failed")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
