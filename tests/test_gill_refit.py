"""train.gill_mapper and train.gill_retrieval: heads refit on cached [IMG] states, everything else
left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.shapeworld import main as shapeworld_main
from train.gill import main as gill_main
from train.gill_mapper import draw_requests
from train.gill_mapper import main as mapper_main
from vlm.gill import GILLVLM, REQUEST_TEMPLATES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ShapeWorld and a GILL trained on it for 2 steps (the folder to refit)."""
    root = tmp_path_factory.mktemp("gill-mapper")
    data = root / "sw"
    args = ["generate", "--out", str(data), "--train", "8", "--val", "2", "--test", "2"]
    shapeworld_main([*args, "--pretrain", "0", "--image-size", "64", "--workers", "1"])
    gill = [
        "--preset", "tiny", "--data", str(data), "--out", str(root / "gill"), "--steps", "2",
        "--batch-size", "2", "--compositions", "1", "--caption-batch", "1", "--negatives", "1",
        "--mapper-width", "32", "--mapper-layers", "1", "--retrieval-dim", "16",
        "--no-progress",
    ]  # fmt: skip
    assert gill_main(gill) == 0
    return data, root / "gill" / "final"


def _args(data: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--preset", "tiny", "--checkpoint", str(checkpoint), "--data", str(data),
        "--split", "train", "--out", str(out), "--requests", "20", "--compositions", "6",
        "--val", "6", "--steps", "6", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "3",
        "--save-every", "2", "--no-progress", *extra,
    ]  # fmt: skip


def test_requests_are_a_pure_function_of_their_arguments():
    captions = [f"caption {i}" for i in range(10)] * 2  # duplicates count once
    pairs = draw_requests(captions, 6, 3, seed=1)
    assert pairs == draw_requests(captions, 6, 3, seed=1) != draw_requests(captions, 6, 3, seed=2)
    assert len(pairs) == 9
    drawn = [c for _, c in pairs if c.startswith("caption")]
    assert len(drawn) == len(set(drawn)) == 6
    for request, caption in pairs:  # each caption sits inside one of the request templates
        assert any(t.format(caption) == request for t in REQUEST_TEMPLATES)
    assert len(draw_requests(captions, 50, 0, seed=0)) == 10  # at most every distinct caption


def test_refit_changes_the_mapper_only_and_lowers_its_distance(base, tmp_path):
    data, checkpoint = base
    out = tmp_path / "run"
    assert mapper_main(_args(data, checkpoint, out)) == 0
    before = load_file(str(checkpoint / "gill.safetensors"))
    after = load_file(str(out / "final" / "gill.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("heads.mapper.") for k in changed)
    rows = load_file(str(checkpoint / "vlm.safetensors"))
    assert all(torch.equal(v, load_file(str(out / "final" / "vlm.safetensors"))[k])
               for k, v in rows.items())  # fmt: skip
    meta = json.loads((out / "final" / "manifest.json").read_text())["metadata"]
    assert meta["val_distance"] < meta["val_distance_base"]
    curve = [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == list(range(1, 7))
    assert [r["step"] for r in curve if "val_distance" in r] == [3, 6]
    # the refit mapper is what a loaded model generates from
    model = GILLVLM.from_pretrained(out / "final")
    assert torch.equal(model.heads.mapper.fc_out.weight, after["heads.mapper.fc_out.weight"])


def test_an_interrupted_refit_resumes_to_the_same_mapper_and_reuses_its_cache(base, tmp_path):
    data, checkpoint = base
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert mapper_main(_args(data, checkpoint, straight)) == 0
    assert mapper_main(_args(data, checkpoint, split, "--stop-at", "3")) == 0
    part = split / "cache" / "part-0000.safetensors"
    stamp = part.stat().st_mtime_ns
    assert mapper_main(_args(data, checkpoint, split, "--resume")) == 0
    assert part.stat().st_mtime_ns == stamp  # read back, not recomputed
    a = load_file(str(straight / "final" / "gill.safetensors"))
    b = load_file(str(split / "final" / "gill.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    rows = [json.loads(r) for r in (split / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    with pytest.raises(SystemExit):  # other settings cannot resume this run
        mapper_main(_args(data, checkpoint, split, "--resume", "--lr", "0.5"))


def test_retrieval_refit_changes_the_retrieval_heads_only_and_logs_val_recall(base, tmp_path):
    from train.gill_retrieval import main as retrieval_main

    data, checkpoint = base
    out = tmp_path / "ret"
    args = [
        "--preset", "tiny", "--checkpoint", str(checkpoint), "--data", str(data),
        "--out", str(out), "--scenes", "8", "--val", "2", "--steps", "4", "--batch-size", "4",
        "--lr", "1e-2", "--eval-every", "2", "--no-progress",
    ]  # fmt: skip
    assert retrieval_main(args) == 0
    before = load_file(str(checkpoint / "gill.safetensors"))
    after = load_file(str(out / "final" / "gill.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("heads.retrieval.") for k in changed)
    curve = [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "R@1" in r] == [2, 4]
    assert all(0.0 <= r["R@1"] <= r["R@5"] <= 1.0 for r in curve if "R@1" in r)
    # the cache depends on the [IMG] rows, not on the heads: a refit of the refit reuses it
    part = out / "cache_train" / "part-0000.safetensors"
    stamp = part.stat().st_mtime_ns
    again = [*args[:3], str(out / "final"), *args[4:]]
    assert retrieval_main(again) == 0
    assert part.stat().st_mtime_ns == stamp
