"""Steps per second of `python -m train.stamp ARGS`, measured over WINDOW seconds (session 19).

    python probe_stamp.py WINDOW LOG OUTDIR ARGS...
"""
import subprocess, sys, time
from pathlib import Path
window, log, out, args = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
curve = Path(out) / "loss.jsonl"
p = subprocess.Popen([sys.executable, "-m", "train.stamp", *args, "--out", out, "--steps", "100000",
                      "--save-every", "100000"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
lines = lambda: len(curve.read_text().splitlines()) if curve.exists() else 0
t_start = time.time()
while lines() < 3:
    if p.poll() is not None or time.time() - t_start > 240:
        p.kill(); print(0.0); sys.exit(0)
    time.sleep(0.2)
t1, n1 = time.time(), lines()
time.sleep(window)
t2, n2 = time.time(), lines()
p.kill(); p.wait()
print(f"{(n2 - n1) / (t2 - t1):.3f}")
