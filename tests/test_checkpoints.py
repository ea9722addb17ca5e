"""Regression tests of the committed checkpoints: each must still reach (a floor a little under)
the figure its model card reports, on a small val split generated here."""

from __future__ import annotations

import pytest

from core.checkpoint import verify_checkpoint
from core.config import project_path
from data.shapeworld import ShapeWorldConfig, SplitSizes, generate
from vlm.config import PolychromeConfig

SHAPES = PolychromeConfig.from_preset("shapes")
VAL_IMAGES = 100


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    """The first VAL_IMAGES images of the shapes preset's val split (same seed, same layout)."""
    root = tmp_path_factory.mktemp("val") / "shapeworld"
    cfg = ShapeWorldConfig(
        seed=SHAPES.shapeworld.seed,
        layout=SHAPES.shapeworld.layout,
        splits=SplitSizes(train=0, val=VAL_IMAGES, test=0, pretrain=0),
    )
    generate(root, cfg, workers=2, progress=False)
    return root


def test_clip_checkpoint_keeps_its_figures(val_split):
    from eval.clip import evaluate_clip
    from vision.clip import load_clip

    folder = project_path(SHAPES.clip.checkpoint)
    verify_checkpoint(folder)  # sha256 of every file against the manifest
    model, preprocess, tokenizer = load_clip(folder)
    r = evaluate_clip(model, tokenizer, preprocess, val_split, "val", progress=False)
    # Model card (1,000 val images): class 91.8 / 95.7, colour 100 / 100, t2i R@1 75.0,
    # i2t R@1 72.2. On these 100 images it measured 93.4 / 90.6, 100 / 100, 87.0, 91.0.
    assert r["class_acc_seen"] >= 0.85
    assert r["class_acc_unseen"] >= 0.80
    assert r["colour_acc_seen"] >= 0.95
    assert r["colour_acc_unseen"] >= 0.95
    assert r["t2i_r1"] >= 0.75
    assert r["i2t_r1"] >= 0.75


def test_sam_checkpoint_keeps_its_figures(val_split):
    from eval.sam import evaluate_sam
    from vision.sam import load_sam

    folder = project_path(SHAPES.sam.checkpoint)
    verify_checkpoint(folder)
    model = load_sam(folder)
    r = evaluate_sam(model, val_split, "val", amg=False, progress=False)
    # Model card (1,000 val images): 1-point mIoU 80.4, box mIoU 85.3.
    # On these 100 images it measured 80.4 and 85.6.
    assert r["point_miou"] >= 0.76
    assert r["box_miou"] >= 0.81
    amg = evaluate_sam(model, val_split, "val", limit=20, progress=False)
    # AMG recall@0.5: 85.3% on the first 100 val images, 82.4% on these 20.
    assert amg["amg_recall@0.5"] >= 0.75
