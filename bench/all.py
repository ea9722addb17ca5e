"""Reproduce the tables of docs/RESULTS.md: every command it quotes, or a quick subset.

    python -m bench.all --list                  # the commands RESULTS.md quotes, numbered
    python -m bench.all --quick                 # smoke-sized benchmarks, minutes; + plots
    python -m bench.all                         # every quoted command, in order (hours, GPU
                                                #   for some; needs the data they name)
    python -m bench.all --only 12 13 --resume   # some of them; --resume skips those done
    python -m bench.all --plots-only --runs /work/runs   # training-curve plots of earlier runs

Full mode reads docs/RESULTS.md, so it runs exactly what the document says: each line (or
backslash-continued group of lines) in a code block or indented block, or inline code span, that
starts with ``python -m`` (optionally after environment assignments and ``.venv/bin/``) is one
command, without its trailing ``# comment``; comment lines, commands of other programs and this
script's own are left out. Each runs in its own process from the repository
root with its log in ``<out>/logs/NN.log``; ``<out>/status.json`` records each one's exit status
and time as soon as it ends, so a failure does not stop the rest and ``--resume`` continues
after an interruption. Quick mode runs the benchmark scripts at their smoke-test sizes (the
QUICK list below) and writes each table's JSON in ``<out>/quick/``.

Plots (matplotlib, PNG): every training log found under ``--runs`` folders (``loss.jsonl``,
``log.jsonl``, ``train_log.jsonl``: one JSON object per step with a ``step`` and numeric
losses) becomes ``<out>/plots/<run>.png``, one curve per loss; the quick tables that have a
natural picture (latency per request kind, speed against sequence length) get one too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from core.config import project_path
from core.io import atomic_write_text

RESULTS = "docs/RESULTS.md"
LOG_NAMES = ("loss.jsonl", "log.jsonl", "train_log.jsonl")
ENV = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*")
PYTHON = re.compile(r"^(?:\.venv/bin/)?python3?\s+-m\s+")
SELF = re.compile(r"-m\s+bench\.all\b")  # this script's own commands are not rerun
PLACEHOLDER = re.compile(r"(?<![\w/-])(DIR|FILE|NAME)(?![\w/-])|<[^>]*>|\.\.\.")


@dataclass
class Command:
    number: int
    section: str
    line: int  # where RESULTS.md quotes it
    text: str  # as quoted (continuations joined)

    @property
    def argv(self) -> list[str]:
        """[sys.executable, "-m", module, *args], the environment assignments left out."""
        body = PYTHON.sub("", ENV.sub("", self.text).strip())
        return [sys.executable, "-m", *shlex.split(body)]

    @property
    def runnable(self) -> bool:
        """False when the quote holds a placeholder (DIR, FILE, <...>, ...) instead of a value."""
        return not re.search(PLACEHOLDER, self.text)

    def filled(self, values: dict[str, str]) -> Command:
        """The command with placeholders replaced (``--set DIR=/data/sw``)."""
        text = self.text
        for name, value in values.items():
            pattern = re.compile(rf"(?<![\w/-]){re.escape(name)}(?![\w/-])")
            text = pattern.sub(value.replace("\\", "\\\\"), text)  # the value taken literally
        return Command(self.number, self.section, self.line, text)

    @property
    def env(self) -> dict[str, str]:
        prefix = ENV.match(self.text)
        return dict(a.split("=", 1) for a in (prefix.group(0).split() if prefix else []))


def quoted_commands(results: Path) -> list[Command]:
    """Every ``python -m`` command quoted in RESULTS.md, in order, with its "## " section."""
    lines = results.read_text(encoding="utf-8").splitlines()
    out: list[Command] = []
    section, fenced, i = "", False, 0
    while i < len(lines):
        raw = lines[i]
        if raw.startswith("```"):
            fenced = not fenced
            i += 1
            continue
        if not fenced and raw.startswith("## "):
            section = raw[3:].strip()
        start = i
        text = raw.strip()
        code = fenced or raw.startswith("    ")
        while code and text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        text = re.sub(r"\s+#.*$", "", text)  # a trailing shell comment
        if code and PYTHON.match(ENV.sub("", text)) and not SELF.search(text):
            out.append(Command(len(out) + 1, section, start + 1, text))
        elif not code:  # `python -m ...` quoted inline in the prose
            for span in re.findall(r"`([^`]+)`", raw):
                if PYTHON.match(ENV.sub("", span.strip())) and not SELF.search(span):
                    out.append(Command(len(out) + 1, section, start + 1, span.strip()))
    return out


# The quick subset: the benchmark scripts at smoke-test sizes (tables of the same shape as
# RESULTS.md's, on toy sizes; the figures are not the document's).
QUICK: tuple[tuple[str, list[str]], ...] = (
    ("lightning_attention", ["bench.lightning_attention", "--quick"]),
    ("retrieval_index", ["bench.retrieval_index", "--quick"]),
    ("source_cache", ["bench.source_cache", "--source", "tiny-random-llama", "--repeats", "2"]),
    ("tnl_vs_softmax", ["bench.lm_experiments", "tnl-vs-softmax", "--quick"]),
    ("meap_needle", ["bench.lm_experiments", "meap-needle", "--quick"]),
    ("moe_balance", ["bench.lm_experiments", "moe-balance", "--quick"]),
    ("ernie_masking", ["bench.lm_experiments", "ernie-masking", "--quick"]),
    ("app_load", ["bench.app_load", "--preset", "tiny", "--clients", "2", "--requests", "3",
                  "--max-new-tokens", "4"]),
)  # fmt: skip


def _load_status(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def run_commands(
    jobs: Iterable[tuple[str, list[str], dict[str, str]]], out: Path, resume: bool
) -> dict[str, Any]:
    """Run each (key, argv, env) in its own process, logs in <out>/logs/, status as it goes."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    status_path = out / "status.json"
    status = _load_status(status_path) if resume else {}
    jobs = list(jobs)
    for key, argv, env in tqdm(jobs, desc="commands", unit="cmd"):
        done = status.get(key, {})
        if resume and done.get("returncode") == 0 and done.get("command") == shlex.join(argv[1:]):
            continue  # the same command succeeded before
        began = time.monotonic()
        with (logs / f"{key}.log").open("w", encoding="utf-8") as log:
            log.write("$ " + shlex.join(argv) + "\n")
            log.flush()
            code = subprocess.call(
                argv,
                cwd=project_path("."),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )
        status[key] = {
            "command": shlex.join(argv[1:]),
            "returncode": code,
            "seconds": round(time.monotonic() - began, 1),
        }
        atomic_write_text(status_path, json.dumps(status, indent=2) + "\n")
    return status


def training_logs(roots: Iterable[Path]) -> list[tuple[Path, str]]:
    """(log, plot name) of every training log under `roots`; the name is the run folder's path
    below its root, joined with "_"."""
    found = []
    for root in roots:
        for name in LOG_NAMES:
            for log in sorted(root.rglob(name)):
                parts = log.parent.relative_to(root).parts or (root.name,)
                found.append((log, "_".join(parts)))
    return found


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int | float):
            rows.append(row)
    return rows


COUNTERS = ("tokens", "lr", "seconds", "time", "elapsed", "epoch", "images")


def series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """The curves of a training log: {name: [(step, value)]}, the latest row of each step (a
    resumed run logs again from its last save), without counters (tokens, learning rate, time,
    or any series of integers that only increases). Rows with a "stage" (train.diffusion's vae
    then unet, each from step 1) make their own curves, named "<stage> <key>"."""
    by_step = {(str(r.get("stage", "")), r["step"]): r for r in rows}
    ordered = [by_step[k] for k in sorted(by_step, key=lambda k: (k[0] != "", k))]
    out: dict[str, list[tuple[float, float]]] = {}
    for row in ordered:
        stage = f"{row['stage']} " if row.get("stage") else ""
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                out.setdefault(stage + k, []).append((row["step"], v))
    for k in list(out):
        values = [v for _, v in out[k]]
        rising_ints = all(float(v).is_integer() for v in values) and all(
            a < b for a, b in itertools.pairwise(values)
        )
        name = k.split(" ")[-1]
        counter = name in COUNTERS or name.endswith(("_s", "_seconds"))
        if counter or (rising_ints and len(values) > 2):
            del out[k]
    return out


def plot_curves(log: Path, dest: Path) -> bool:
    """One PNG of the curves (`series`) of a per-step training log; False when it has none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = series(_rows(log))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, pts in sorted(curves.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, linewidth=1)
    ax.set_xlabel("step")
    ax.set_title(str(log.parent), fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return True


def plot_quick(quick: Path, plots: Path) -> list[Path]:
    """Pictures of the quick tables that have one: latency per kind, speed per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    load = quick / "app_load.json"
    if load.is_file():
        by_kind = json.loads(load.read_text())["by_kind"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        kinds = list(by_kind)
        ax.bar([k + " p50" for k in kinds], [by_kind[k]["p50_s"] for k in kinds])
        ax.bar([k + " p95" for k in kinds], [by_kind[k]["p95_s"] for k in kinds])
        ax.set_ylabel("seconds")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        fig.tight_layout()
        fig.savefig(plots / "app_load.png", dpi=110)
        plt.close(fig)
        made.append(plots / "app_load.png")
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="the smoke-sized subset (minutes)")
    parser.add_argument("--list", action="store_true", help="list the quoted commands, run none")
    parser.add_argument("--only", type=int, nargs="+", help="run these numbers (see --list)")
    parser.add_argument("--resume", action="store_true", help="skip commands that succeeded")
    parser.add_argument("--out", type=Path, default=project_path("out/bench_all"))
    parser.add_argument(
        "--runs", type=Path, nargs="*", default=None, help="folders searched for training logs"
    )
    parser.add_argument("--plots-only", action="store_true", help="only draw the plots")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="fill a placeholder of the quoted commands, e.g. DIR=/work/data/sw",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    values = dict(v.split("=", 1) for v in args.set if "=" in v)
    if len(values) != len(args.set):
        parser.error(f"--set takes NAME=VALUE pairs, received {args.set}")
    commands = [c.filled(values) for c in quoted_commands(project_path(RESULTS))]
    if args.list:
        for c in commands:
            mark = " " if c.runnable else "*"
            print(f"{c.number:3d}{mark} [{c.section[:40]}]  {c.text[:150]}")
        print("* a placeholder (DIR, <...>, ...) stands for a value: not run by the full mode")
        return 0
    if args.only and args.quick:
        parser.error("--only picks quoted commands; it does not go with --quick")
    known = {c.number for c in commands}
    if args.only and not set(args.only) <= known:
        parser.error(f"--only: no command numbered {sorted(set(args.only) - known)}; see --list")
    failed = 0
    if not args.plots_only:
        jobs: list[tuple[str, list[str], dict[str, str]]]
        if args.quick:
            quick = args.out / "quick"
            quick.mkdir(parents=True, exist_ok=True)
            jobs = [
                (key, [sys.executable, "-m", *cmd, "--json", str(quick / f"{key}.json")], {})
                for key, cmd in QUICK
            ]
        else:
            chosen = [
                c for c in commands if c.runnable and (not args.only or c.number in args.only)
            ]
            jobs = [(f"{c.number:03d}", c.argv, c.env) for c in chosen]
        status = run_commands(jobs, args.out, args.resume)
        failed = sum(1 for k, _, _ in jobs if status.get(k, {}).get("returncode") != 0)
        print(
            f"{len(jobs) - failed} of {len(jobs)} commands succeeded; logs in {args.out / 'logs'}"
        )
        for key, s in status.items():
            if s["returncode"] != 0:
                print(f"  failed ({s['returncode']}): {key}: {s['command'][:120]}")
    plots = args.out / "plots"
    roots = args.runs if args.runs is not None else [args.out]
    drawn = [log for log, name in training_logs(roots) if plot_curves(log, plots / f"{name}.png")]
    if (args.out / "quick").is_dir():
        plots.mkdir(parents=True, exist_ok=True)
        drawn += plot_quick(args.out / "quick", plots)
    print(f"{len(drawn)} plots in {plots}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
