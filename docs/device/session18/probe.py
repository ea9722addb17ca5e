"""Steps per second of ``python -m train.vlm ARGS`` on instruct steps (session 18, docs/GPU.md).

    python probe.py WINDOW_SECONDS LOG ARGS...

Starts the run into /tmp/probe, waits for its third loss row, counts the rows written over the
next WINDOW_SECONDS, stops it and prints the rate (0.0 if the run never got going).
"""

import subprocess
import sys
import time
from pathlib import Path

CURVE = Path("/tmp/probe/loss.jsonl")


def rows() -> int:
    return len(CURVE.read_text().splitlines()) if CURVE.exists() else 0


def main() -> None:
    window, log, args = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    command = [sys.executable, "-m", "train.vlm", *args, "--out", "/tmp/probe"]
    command += ["--steps", "100000", "--align-steps", "0", "--save-every", "100000"]
    with open(log, "w") as out:
        run = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        start = time.time()
        while rows() < 3:
            if run.poll() is not None or time.time() - start > 240:
                run.kill()
                print(0.0)
                return
            time.sleep(0.2)
        t1, n1 = time.time(), rows()
        time.sleep(window)
        t2, n2 = time.time(), rows()
        run.kill()
        run.wait()
    print(f"{(n2 - n1) / (t2 - t1):.3f}")


if __name__ == "__main__":
    main()
