"""Steps per second of several ``python -m train.vlm`` configurations running side by side.

    python probe2.py WINDOW_SECONDS OUTDIR "ARGS A" "ARGS B" ...

Starts every configuration at once (each into OUTDIR/probe_<i>, its log beside it), waits until
every one has written three loss rows (so no window overlaps another's model load), counts the
rows each writes over the same WINDOW_SECONDS, stops them all and prints one rate per line
(0.0 for a run that never got going within 300 s). (Lint-tidied after the run: the log files
in an ExitStack, the last loop without its unused variable; the same logic.)
"""

import contextlib
import shlex
import subprocess
import sys
import time
from pathlib import Path


def rows(curve: Path) -> int:
    return len(curve.read_text().splitlines()) if curve.exists() else 0


def main() -> None:
    window, outdir, configs = float(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    runs, curves = [], []
    logs = contextlib.ExitStack()
    for i, config in enumerate(configs):
        out = outdir / f"probe_{i}"
        command = [sys.executable, "-m", "train.vlm", *shlex.split(config), "--out", str(out)]
        command += ["--steps", "100000", "--align-steps", "0", "--save-every", "100000"]
        log = logs.enter_context(open(outdir / f"probe_{i}.log", "w"))  # noqa: SIM115 (closed by logs)
        runs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        curves.append(out / "loss.jsonl")
    start = time.time()
    while min(rows(c) for c in curves) < 3:
        dead = [r.poll() is not None for r in runs]
        if any(dead) or time.time() - start > 300:
            break
        time.sleep(0.2)
    t1, n1 = time.time(), [rows(c) for c in curves]
    time.sleep(window)
    t2, n2 = time.time(), [rows(c) for c in curves]
    for r in runs:
        r.kill()
        r.wait()
    logs.close()
    for a, b in zip(n1, n2, strict=True):
        print(f"{(b - a) / (t2 - t1):.3f}" if a >= 3 else "0.0")


if __name__ == "__main__":
    main()
