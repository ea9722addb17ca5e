"""eval.vision_probe: the per-object readouts against a hand-written loop, the probe, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.shapeworld import main as shapeworld_main
from data.shapeworld import read_split
from eval.vision_probe import (
    main,
    majority_accuracy,
    object_features,
    probe_accuracy,
    run_probes,
)
from vision.clip import build_clip, dense_features


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_clip("tiny-vit")


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe-data") / "sw"
    args = ["generate", "--out", str(root), "--train", "0", "--val", "6", "--test", "0"]
    shapeworld_main([*args, "--pretrain", "10", "--image-size", "64", "--workers", "1"])
    return root


def test_readouts_match_a_loop_over_patches(tiny, shapeworld):
    model, preprocess, _ = tiny
    scenes = read_split(shapeworld, "val", limit=3)
    feats, labels = object_features(model, preprocess, scenes, window=3, merge=2, min_area=20)
    k = 0
    for scene in scenes:
        pixels = preprocess(Image.fromarray(scene.image))[None]
        with torch.no_grad():
            tokens = dense_features(model, pixels, window=3).tokens[0].numpy()  # (64, D), 8x8
        for obj in scene.objects:
            mask = np.asarray(obj.mask)
            if mask.sum() < 20:
                continue
            ys, xs = np.nonzero(mask)
            row, col = int(ys.mean() / 8) // 2, int(xs.mean() / 8) // 2  # 8-pixel patches
            block = [tokens[(2 * row + i) * 8 + 2 * col + j] for i in range(2) for j in range(2)]
            # a batch of 3 against one scene: matmul paths (MKL's AVX2 one) differ in last bits
            np.testing.assert_allclose(
                feats["token"][k], np.concatenate(block), rtol=1e-5, atol=1e-6
            )
            cover = [
                mask[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].mean()
                for r in range(8)
                for c in range(8)
            ]
            weights = np.array(cover) / sum(cover)
            np.testing.assert_allclose(
                feats["mask mean"][k], (tokens * weights[:, None]).sum(0), rtol=1e-5, atol=1e-6
            )
            assert labels["class"][k] == obj.shape and labels["colour"][k] == obj.colour
            assert labels["cell"][k] == int(ys.mean() * 3 / 64) * 3 + int(xs.mean() * 3 / 64)
            k += 1
    assert k == len(labels["class"]) > 0


def test_probe_reads_a_separable_label_and_not_a_shuffled_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    x = rng.normal(size=(400, 8))
    x[:, 0] += 12.0 * y  # the label is in one coordinate, 6 standard deviations apart
    assert probe_accuracy(x[:300], y[:300], x[300:], y[300:]) == 1.0
    # the floor: always the most common training label
    assert majority_accuracy(["a", "b", "b"], ["b", "a", "b", "b"]) == 0.75
    shuffled = rng.permutation(y)
    assert probe_accuracy(x[:300], shuffled[:300], x[300:], shuffled[300:]) < 0.6


def test_cli_writes_a_row_per_window(tiny, shapeworld, tmp_path, monkeypatch):
    model, preprocess, tokenizer = tiny
    monkeypatch.setattr("eval.vision_probe.load_clip", lambda path: (model, preprocess, tokenizer))
    out = tmp_path / "probe.json"
    args = ["--data", str(shapeworld), "--train-images", "10", "--images", "6", "--no-progress"]
    assert main([*args, "--windows", "0", "3", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [row["window"] for row in results["rows"]] == [0, 3]
    for row in results["rows"]:
        assert all(
            0.0 <= row[f"{r} / {t}"] <= 1.0
            for r in ("token", "mask mean")
            for t in ("class", "colour", "cell")
        )
    assert "| local, window 3 |" in results["table"]
    assert set(results["majority"]) == {"class", "colour", "cell"}
    with pytest.raises(SystemExit):
        main([*args, "--windows", "-1"])
    with pytest.raises(ValueError, match="windows is empty"):
        run_probes(model, preprocess, [], [], [])
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "missing"), "--no-progress"])
