"""bench.all: the commands RESULTS.md quotes, running them resumably, and the plots."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from bench import all as bench_all
from core.config import project_path

MARKDOWN = """\
## First section

Prose with an inline command: `OMP_NUM_THREADS=1 .venv/bin/python -m bench.mfu --quick` here.

```bash
# a comment, not a command
python -m train.clip --data DIR \\
    --out runs/clip --steps 5
pip install something
```

## Second section

    python -m eval.clip --checkpoint c --data /d   # a trailing comment
    python -m bench.all --quick
    make test
"""


def test_commands_are_read_from_code_blocks_indented_blocks_and_inline_spans(tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text(MARKDOWN)
    found = bench_all.quoted_commands(doc)
    assert [c.text for c in found] == [
        "OMP_NUM_THREADS=1 .venv/bin/python -m bench.mfu --quick",
        "python -m train.clip --data DIR --out runs/clip --steps 5",
        "python -m eval.clip --checkpoint c --data /d",
    ]
    assert [c.section for c in found] == ["First section", "First section", "Second section"]
    assert [c.line for c in found] == [3, 7, 14]
    first, second, _ = found
    assert first.env == {"OMP_NUM_THREADS": "1"}
    assert first.argv == [sys.executable, "-m", "bench.mfu", "--quick"]
    assert not second.runnable and second.filled({"DIR": "/data/sw"}).runnable
    assert second.filled({"DIR": "/data/sw"}).argv[3:5] == ["--data", "/data/sw"]


def test_every_command_results_quotes_names_a_module_of_ours():
    commands = bench_all.quoted_commands(project_path(bench_all.RESULTS))
    assert len(commands) > 50
    missing = [c.text for c in commands if importlib.util.find_spec(c.argv[2]) is None]
    assert not missing, missing


def test_runs_keep_going_record_status_and_resume(tmp_path):
    jobs = [
        ("ok", [sys.executable, "-c", "print('fine')"], {}),
        ("bad", [sys.executable, "-c", "import os; raise SystemExit(int(os.environ['CODE']))"],
         {"CODE": "3"}),
    ]  # fmt: skip
    status = bench_all.run_commands(jobs, tmp_path, resume=False)
    assert status["ok"]["returncode"] == 0 and status["bad"]["returncode"] == 3
    assert json.loads((tmp_path / "status.json").read_text()) == status
    assert "fine" in (tmp_path / "logs" / "ok.log").read_text()
    # resumed: what succeeded is skipped, what failed runs again
    jobs[1] = ("bad", [sys.executable, "-c", "print('fixed')"], {})
    again = bench_all.run_commands(jobs, tmp_path, resume=True)
    assert again["ok"]["returncode"] == 0 and again["bad"]["returncode"] == 0
    # a key whose command changed (the document gained a command above it) runs again
    jobs[0] = ("ok", [sys.executable, "-c", "raise SystemExit(9)"], {})
    assert bench_all.run_commands(jobs, tmp_path, resume=True)["ok"]["returncode"] == 9


def test_curves_drop_counters_and_keep_the_latest_row_of_a_step():
    rows = [{"step": s, "loss": 1.0 / s, "tokens": 100 * s, "lr": 0.1, "elapsed_s": s}
            for s in range(1, 6)]  # fmt: skip
    rows.append({"step": 3, "loss": 9.0, "tokens": 300})  # a resumed run's second step 3
    curves = bench_all.series(rows)
    assert list(curves) == ["loss"]
    assert curves["loss"][2] == (3, 9.0) and [s for s, _ in curves["loss"]] == [1, 2, 3, 4, 5]


def test_stages_that_restart_their_steps_make_their_own_curves():
    rows = [{"stage": "vae", "step": s, "loss": 5.0} for s in (1, 2)]
    rows += [{"stage": "unet", "step": s, "loss": 1.0} for s in (1, 2, 3)]
    curves = bench_all.series(rows)
    assert curves == {"unet loss": [(1, 1.0), (2, 1.0), (3, 1.0)], "vae loss": [(1, 5.0), (2, 5.0)]}


def test_training_logs_become_plots(tmp_path):
    run = tmp_path / "runs" / "stamp"
    run.mkdir(parents=True)
    rows = [{"step": s, "loss": 1.0 / s, "dice": 0.5, "note": "x"} for s in range(1, 20)]
    (run / "loss.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    (tmp_path / "runs" / "empty").mkdir()
    (tmp_path / "runs" / "empty" / "log.jsonl").write_text('{"step": 1, "note": "x"}\n')
    found = bench_all.training_logs([tmp_path / "runs"])
    assert [name for _, name in found] == ["stamp", "empty"]
    assert bench_all.plot_curves(found[0][0], tmp_path / "plots" / "stamp.png")
    assert (tmp_path / "plots" / "stamp.png").stat().st_size > 1000
    assert not bench_all.plot_curves(found[1][0], tmp_path / "plots" / "empty.png")
    assert bench_all.main(["--plots-only", "--runs", str(tmp_path / "runs"), "--out",
                           str(tmp_path / "out")]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out" / "plots").iterdir()) == ["stamp.png"]


@pytest.mark.slow
def test_quick_mode_reproduces_the_benchmark_tables(tmp_path):
    assert bench_all.main(["--quick", "--out", str(tmp_path)]) == 0
    for key, _ in bench_all.QUICK:
        assert (tmp_path / "quick" / f"{key}.json").is_file(), key
    assert (tmp_path / "plots" / "app_load.png").is_file()
