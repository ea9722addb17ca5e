"""Steps per second of ``python -m train.stamp ARGS`` (session 19, docs/GPU.md).

    python probe_stamp.py WINDOW_SECONDS LOG OUT_DIR ARGS...

Starts the run into OUT_DIR, waits for its third loss row, counts the rows written over the next
WINDOW_SECONDS, stops it and prints the rate (0.0 if the run never got going). Two probes started
together each count while the other still loads the model: session 19's read half the rate the
runs then had. (The copy that ran on the device wrote the same logic on fewer lines.)
"""

import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    window, log, out, args = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    curve = Path(out) / "loss.jsonl"

    def rows() -> int:
        return len(curve.read_text().splitlines()) if curve.exists() else 0

    command = [sys.executable, "-m", "train.stamp", *args, "--out", out]
    command += ["--steps", "100000", "--save-every", "100000"]
    with open(log, "w") as sink:
        run = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
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
