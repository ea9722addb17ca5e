from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import Config
from train.common import (
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    load_training_state,
    resume_mismatches,
    resume_or_start,
    save_training_state,
    trainable_state,
)


def test_batch_order_resumes_exactly():
    full = [b.tolist() for _, b in zip(range(12), batch_indices(10, 3, seed=5), strict=False)]
    resumed = [
        b.tolist()
        for _, b in zip(range(7), batch_indices(10, 3, seed=5, start_step=5), strict=False)
    ]
    assert resumed == full[5:]
    # Each epoch (3 batches of 3 from 10 items) draws distinct indices.
    for e in range(4):
        epoch = np.concatenate(full[3 * e : 3 * e + 3])
        assert len(set(epoch.tolist())) == 9
    with pytest.raises(ValueError, match="smaller than one batch"):
        next(batch_indices(2, 3, seed=0))


def test_cosine_schedule_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup=4, total=20, min_ratio=0.1)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))  # non-increasing after warmup
    assert lrs[-1] == pytest.approx(0.1)


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    m[0].requires_grad_(False)  # a frozen part: not stored, not restored
    return m


def _run(model, opt, sched, steps, start=0):
    g = torch.Generator().manual_seed(1)
    data = torch.randn(20, 4, generator=g)
    for step in range(start, start + steps):
        x = data[step % 20 : step % 20 + 4]
        loss = model(x).pow(2).mean() + 0.01 * torch.randn(()).abs()  # uses the global RNG
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_resume_equals_uninterrupted(tmp_path):
    ref = _model()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    sched = cosine_with_warmup(opt, 2, 8)
    torch.manual_seed(3)
    _run(ref, opt, sched, 8)

    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = cosine_with_warmup(opt, 2, 8)
    torch.manual_seed(3)
    _run(model, opt, sched, 4)
    save_training_state(tmp_path, model, opt, sched, step=4, config={"kind": "toy"})
    assert set(trainable_state(model)) == {"2.weight", "2.bias"}

    fresh = _model()
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    sched2 = cosine_with_warmup(opt2, 2, 8)
    step = load_training_state(tmp_path, fresh, opt2, sched2)
    assert step == 4
    _run(fresh, opt2, sched2, 4, start=4)
    for (k, a), b in zip(ref.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


@dataclass
class _Toy(Config):
    width: int = 4
    added_later: str = "off"  # a field a newer version of the code added, at its default


def test_resume_compares_config_keys_as_configs(tmp_path):
    old = {"width": 4}  # saved before `added_later` existed
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = cosine_with_warmup(opt, 1, 4)
    save_training_state(tmp_path, model, opt, sched, step=1, config={"toy": old, "lr": 0.1})
    now = {"toy": _Toy().to_dict(), "lr": 0.1}
    # As raw dicts they differ; as the Config they are the same run.
    assert "toy" in (resume_mismatches(tmp_path, now, ["toy", "lr"]) or "")
    assert resume_mismatches(tmp_path, now, ["toy", "lr"], {"toy": _Toy}) is None
    # A field changed from its default, or another key, is still a difference, named.
    changed = {"toy": _Toy(added_later="on").to_dict(), "lr": 0.2}
    why = resume_mismatches(tmp_path, changed, ["toy", "lr"], {"toy": _Toy})
    assert why is not None and "toy" in why and "lr 0.1 -> 0.2" in why
    assert "no training state" in (resume_mismatches(tmp_path / "x", now, ["lr"]) or "")
    # A saved config this code cannot read (a field since removed) is a difference, not a crash.
    gone = {"toy": {"width": 4, "removed_field": 1}, "lr": 0.1}
    save_training_state(tmp_path, model, opt, sched, step=1, config=gone)
    assert "toy" in (resume_mismatches(tmp_path, now, ["toy", "lr"], {"toy": _Toy}) or "")


def test_a_fresh_start_refuses_an_out_that_holds_a_run(tmp_path, capsys):
    """Rerunning a finished or interrupted run's command without --resume trimmed its log at
    once and replaced its model at the end: refused, naming what is there; the cached refits,
    which rerun in their folder to reuse its cache, may."""
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = cosine_with_warmup(opt, 1, 4)
    parser = argparse.ArgumentParser(prog="train.x")
    fresh = argparse.Namespace(out=tmp_path / "run", resume=False)
    assert resume_or_start(parser, fresh, model, opt, sched, {}, []) == 0  # nothing there yet
    (tmp_path / "run" / "final").mkdir(parents=True)
    with pytest.raises(SystemExit):
        resume_or_start(parser, fresh, model, opt, sched, {}, [])
    assert "holds a run (final/): pass --resume" in capsys.readouterr().err
    save_training_state(tmp_path / "run", model, opt, sched, step=2, config={"lr": 0.1})
    with pytest.raises(SystemExit):
        resume_or_start(parser, fresh, model, opt, sched, {"lr": 0.1}, ["lr"])
    assert "(last/ and final/)" in capsys.readouterr().err
    assert resume_or_start(parser, fresh, model, opt, sched, {}, [], rerun=True) == 0
    resumed = argparse.Namespace(out=tmp_path / "run", resume=True)
    assert resume_or_start(parser, resumed, model, opt, sched, {"lr": 0.1}, ["lr"]) == 2


def test_process_group_is_destroyed_at_exit(tmp_path):
    """A one-process gloo group; a handler registered before ours runs after it (atexit is
    last-in, first-out) and sees whether the group is still up."""
    script = f"""
import atexit, torch.distributed as dist
from core.runtime import destroy_process_group_at_exit
atexit.register(lambda: print("up at exit:", dist.is_initialized()))
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
if {{with_hook}}:
    destroy_process_group_at_exit()
    destroy_process_group_at_exit()  # a second call is harmless
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for with_hook, expected in ((True, "up at exit: False"), (False, "up at exit: True")):
        run = subprocess.run(
            [sys.executable, "-c", script.format(with_hook=with_hook)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip().splitlines() == [expected]


def test_check_run_args_names_the_bad_option_and_skips_absent_ones(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="t")
    good = dict(steps=10, batch_size=4, lr=1e-3, max_minutes=None, stop_at=None, resume=False)

    def error(**change):
        args = argparse.Namespace(out=tmp_path, **{**good, **change})
        with pytest.raises(SystemExit):
            check_run_args(parser, args, ("steps", "batch_size"))
        return capsys.readouterr().err.strip().splitlines()[-1]

    check_run_args(parser, argparse.Namespace(out=tmp_path, **good), ("steps", "batch_size"))
    assert error(batch_size=0) == "t: error: --batch-size must be >= 1, received 0"
    assert error(lr=0.0) == "t: error: --lr must be > 0, received 0.0"
    assert error(max_minutes=-1.0) == "t: error: --max-minutes must be > 0, received -1.0"
    assert error(stop_at=11) == "t: error: --stop-at must be in [1, --steps=10], received 11"
    assert error(stop_at=0) == "t: error: --stop-at must be in [1, --steps=10], received 0"
    missing = f"t: error: --resume: {tmp_path / 'last'} not found; start without --resume"
    assert error(resume=True) == missing
    (tmp_path / "last").mkdir()
    check_run_args(parser, argparse.Namespace(out=tmp_path, **{**good, "resume": True}))
    check_run_args(parser, argparse.Namespace(out=tmp_path, **{**good, "stop_at": 10}))
    # a script without --lr, --max-minutes, --stop-at or --resume: only `positive` is checked
    check_run_args(parser, argparse.Namespace(steps=1, out=tmp_path / "nowhere"), ("steps",))


def test_end_step_saves_when_due_and_stops_on_the_clock(capsys):
    from train.common import DataParallel

    dp = DataParallel(torch.device("cpu"))
    saved: list[int] = []

    def end(done, elapsed=0.0, max_minutes=None, last=None):
        args = argparse.Namespace(save_every=3, max_minutes=max_minutes)
        return dp.end_step(done, saved.append, elapsed, args, last=last)

    # steps 1..7 of a run that stops at 7: saves at 3 and 6 (every 3) and 7 (the last)
    assert [end(d, last=7) for d in range(1, 8)] == [False] * 7
    assert saved == [3, 6, 7]
    saved.clear()
    assert end(4, elapsed=59.0, max_minutes=1.0) is False and saved == []  # within the minute
    assert end(4, elapsed=61.0, max_minutes=1.0) is True and saved == [4]  # saved, then stop
    assert "--max-minutes 1.0 reached after step 4" in capsys.readouterr().out


def test_adamw_decays_the_trainable_matrices_only():
    from train.common import adamw_matrices_decay

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    net[2].requires_grad_(False)  # frozen: in no group
    opt = adamw_matrices_decay(net, lr=0.1, weight_decay=0.5, betas=(0.8, 0.9))
    decayed, plain = opt.param_groups
    assert [p is net[0].weight for p in decayed["params"]] == [True]
    assert {id(p) for p in plain["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias)}
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.5, 0.0)
    assert decayed["lr"] == 0.1 and decayed["betas"] == (0.8, 0.9)
    # one step with zero gradients: only the decayed matrix shrinks, by lr x weight decay
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    after = list(net.parameters())
    assert torch.allclose(after[0], before[0] * (1 - 0.1 * 0.5))
    assert all(torch.equal(a, b) for a, b in zip(after[1:], before[1:], strict=True))


def test_prefetched_builds_ahead_in_order_and_raises_at_the_step():
    """prefetched: the same items as a plain loop, in order, built in one other thread up to
    `ahead` items ahead; an error surfaces at its own item; closing early stops the building."""
    import threading

    from train.common import prefetched

    calls: list[tuple[int, str]] = []

    def make(step: int) -> int:
        calls.append((step, threading.current_thread().name))
        if step == 5:
            raise ValueError("bad batch 5")
        return step * step

    assert list(prefetched(make, range(5), 2)) == [0, 1, 4, 9, 16]
    assert [s for s, _ in calls] == list(range(5))
    assert all(name.startswith("prefetch") for _, name in calls)
    calls.clear()
    assert list(prefetched(make, range(3), 0)) == [0, 1, 4]
    assert {name for _, name in calls} == {threading.current_thread().name}  # no thread
    failing = prefetched(make, range(3, 8), 3)
    assert [next(failing), next(failing)] == [9, 16]  # items 3 and 4, then the error at 5
    with pytest.raises(ValueError, match="bad batch 5"):
        next(failing)
    calls.clear()
    early = prefetched(make, range(100), 2)
    assert [next(early), next(early)] == [0, 1]
    early.close()
    assert len(calls) <= 2 + 2  # the two used and at most two built ahead
