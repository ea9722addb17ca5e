"""train.seg and train.seg_decoder over two CPU processes (gloo) against one process with the same
global batch: the same loss curve and the same trained weights.

Both losses are means over a count that differs from image to image (train.seg: masks and
matched-proposal pairs; train.seg_decoder: target masks and matched queries), so a process's
half of the batch only gives the one-process step when its loss is weighted by its share of the
whole batch's count (tests/test_scaling.py checks the same for train.stamp)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import launch_two_processes
from safetensors.torch import load_file

from core.checkpoint import save_checkpoint
from data.datasets import InstanceDataset
from data.shapeworld import main as shapeworld_main
from segmentation.mask_adapter import MaskAdapter, MaskAdapterConfig, save_adapter
from segmentation.open_vocab import save_mask_lists, whole_image_pixels
from train.seg import main as seg_main
from train.seg_decoder import main as decoder_main
from vision.clip import build_clip, dense_features, get_clip_config, trained_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """64 px ShapeWorld (8 train images, 2 test), a random tiny CLIP checkpoint, a random
    Mask-Adapter to start stage 2 from, and stage-2 proposals made from the ground truth."""
    tmp = tmp_path_factory.mktemp("scaling-seg")
    root = tmp / "sw"
    argv = ["generate", "--out", str(root), "--pretrain", "0", "--train", str(IMAGES)]
    argv += ["--val", "2", "--test", "2", "--image-size", "64", "--seed", "0", "--workers", "1"]
    shapeworld_main(argv)
    torch.manual_seed(0)
    clip, _, _ = build_clip("tiny-vit")
    cfg = get_clip_config("tiny-vit")
    save_checkpoint(tmp / "clip", {"clip": trained_state_dict(clip, cfg)}, cfg.to_dict())
    data = InstanceDataset.from_shapeworld(root, "train")
    image = np.asarray(data[0].image)
    with torch.no_grad():
        dense = dense_features(clip.eval(), whole_image_pixels(clip, [image]))
    adapter_cfg = MaskAdapterConfig(
        clip_dim=dense.projected.shape[1], vis_dim=dense.tokens.shape[2], hidden=16
    )
    adapter = MaskAdapter(adapter_cfg)
    with torch.no_grad():  # sharper activation maps: at random init every mask pools the whole
        adapter.body[-1].weight.mul_(30)  # image alike (1 - cos ~ 1e-7 between objects), and
        adapter.mask_encoder[-1].weight.mul_(30)  # the consistency loss would be moot
    save_adapter(tmp / "adapter", adapter)
    save_mask_lists(tmp / "proposals.npz", [_proposals(data[i]) for i in range(IMAGES)])
    return {"data": root, "clip": tmp / "clip", "adapter": tmp / "adapter", "tmp": tmp}


def _proposals(item) -> np.ndarray:
    """Every instance mask's 1 px shifts (IoU > 0.7 for all but the smallest shapes: a varying
    number of matched pairs per image; never the mask itself, whose pair would have no
    consistency loss to speak of) and two corner boxes (void proposals)."""
    h, w = np.asarray(item.image).shape[:2]
    masks = []
    for inst in item.instances:
        masks += [np.roll(inst.mask, 1, axis=0), np.roll(inst.mask, 1, axis=1)]
    for box in ((slice(0, 6), slice(0, 6)), (slice(h - 6, h), slice(w - 6, w))):
        corner = np.zeros((h, w), dtype=bool)
        corner[box] = True
        masks.append(corner)
    return np.stack(masks)


def _two_processes(module: str, argv: list[str]) -> str:
    return launch_two_processes(module, argv).stdout


def _log(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return rows


def _assert_same_run(one: Path, two: Path, weights: str, keys: tuple[str, ...]) -> None:
    a, b = _log(one), _log(two)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    x = load_file(str(one / "final" / weights))
    y = load_file(str(two / "final" / weights))
    assert x.keys() == y.keys()
    for k in x:  # fp16 checkpoints: a few float16 steps apart at most
        torch.testing.assert_close(x[k], y[k], rtol=2e-3, atol=2e-4, msg=k)


def test_mask_adapter_stage2_on_two_processes_takes_the_steps_of_one(world, tmp_path):
    argv = ["--data", str(world["data"]), "--clip", str(world["clip"]), "--sam", "unused"]
    argv += ["--stage", "2", "--init", str(world["adapter"]), "--proposals"]
    argv += [str(world["tmp"] / "proposals.npz"), "--limit", str(IMAGES)]
    argv += ["--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--log-every", "1"]
    argv += ["--save-every", "2", "--device", "cpu", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert seg_main([*argv, "--out", str(one)]) == 0
    stdout = _two_processes("train.seg", [*argv, "--out", str(two)])
    assert "2 process(es), 2 images each per step" in stdout
    rows = _log(one)
    # the counts differ between the two halves: pairs exist, the loss has both terms
    assert all(r["consistency"] > 1e-4 for r in rows)
    assert all(r["loss"] == pytest.approx(r["ce"] + 5 * r["consistency"]) for r in _log(two))
    _assert_same_run(one, two, "adapter.safetensors", ("loss", "ce", "consistency", "acc"))
    assert not (two / "last").exists()


def test_query_decoder_with_pmp_on_two_processes_takes_the_steps_of_one(world, tmp_path):
    argv = ["--data", str(world["data"]), "--clip", str(world["clip"]), "--pmp"]
    argv += ["--limit", str(IMAGES), "--batch-size", "4", "--steps", "3", "--hidden", "32"]
    argv += ["--queries", "4", "--layers", "2", "--lr", "3e-3", "--log-every", "1"]
    argv += ["--prompt-subset-prob", "0.5", "--eval-split", "test", "--eval-limit", "2"]
    argv += ["--save-every", "2", "--device", "cpu", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert decoder_main([*argv, "--out", str(one)]) == 0
    # the second run's features: made by its main process, read by the other
    cache = ["--feature-cache", str(tmp_path / "features")]
    stdout = _two_processes("train.seg_decoder", [*argv, *cache, "--out", str(two)])
    assert "2 process(es), 2 images each per step" in stdout
    assert (tmp_path / "features" / "manifest.json").is_file()
    _assert_same_run(one, two, "decoder.safetensors", ("loss", "objectness", "bce", "dice"))
    assert all(math.isfinite(r["loss"]) for r in _log(two))
    assert (two / "eval_test.json").is_file() and not (two / "last").exists()
