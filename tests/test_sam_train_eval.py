"""train/sam.py and eval/sam.py: smoke runs on a tiny ShapeWorld with the tiny SAM, exact resume,
the final checkpoint and model card, and the eval protocol on hand-checkable cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import eval.sam as esam
from data.datasets import InstanceDataset
from data.shapeworld import main as shapeworld_main
from eval.sam import amg_best_ious, evaluate_sam, object_point, score_image
from train.sam import (
    SamPromptLoss,
    load_mask_data,
    sample_instances,
    sample_pixels,
    step_generator,
)
from train.sam import main as train_main
from vision.sam import SAM_VARIANTS, build_sam, load_sam

# Tiny models on a shared 2-core machine: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


FAST = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--batch-size", "8"]


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sam-data") / "sw"
    args = ["generate", "--out", str(root), "--train", "32", "--val", "8", "--test", "0"]
    shapeworld_main(
        [*args, "--pretrain", "0", "--image-size", "64", "--seed", "0", "--workers", "1"]
    )
    return root


@pytest.fixture(scope="module")
def trained(shapeworld, tmp_path_factory) -> Path:
    """A tiny SAM trained for 30 steps, evaluated on 2 val images (through the eval CLI)."""
    out = tmp_path_factory.mktemp("sam-train") / "run"
    args = [*FAST, "--data", str(shapeworld), "--out", str(out), "--steps", "30", "--lr", "2e-3"]
    assert train_main([*args, "--log-every", "1", "--eval", "--eval-limit", "2"]) == 0
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_training_loss_goes_down(trained):
    log = _log(trained)
    assert [r["step"] for r in log] == list(range(1, 31))
    losses = [r["loss"] for r in log]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses


def test_final_checkpoint_is_fp16_with_config_and_model_card(trained, shapeworld):
    final = trained / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["config"] == json.loads(json.dumps(SAM_VARIANTS["tiny"].to_dict()))
    assert manifest["metadata"]["data"]["data_seed"] == 0
    tensors = load_file(final / "model.safetensors")
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    reference = build_sam(SAM_VARIANTS["tiny"]).state_dict()
    assert set(tensors) == set(reference)  # the whole model (it is all trained) + PE buffer
    sam = load_sam(final)
    for key, value in sam.state_dict().items():
        assert torch.equal(value, tensors[key].float())
    card = (final / "MODEL_CARD.md").read_text()
    assert "python -m train.sam --preset tiny" in card
    assert manifest["files"]["model.safetensors"]["sha256"] in card
    assert "data_seed: 0" in card
    # --eval ran the eval CLI on the shipped checkpoint; its table is in the card.
    result = json.loads((final / "eval.json").read_text())
    assert result["images"] == 2 and result["split"] == "val"
    assert "| box mIoU |" in card


def test_resume_gives_the_weights_of_an_uninterrupted_run(shapeworld, tmp_path):
    base = [*FAST, "--data", str(shapeworld), "--steps", "4", "--save-every", "1"]
    assert train_main([*base, "--out", str(tmp_path / "a")]) == 0
    assert train_main([*base, "--out", str(tmp_path / "b"), "--stop-after", "2"]) == 0
    assert not (tmp_path / "b" / "final").exists()
    assert train_main([*base, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_file(tmp_path / "a" / "last" / "weights" / "trained.safetensors")
    b = load_file(tmp_path / "b" / "last" / "weights" / "trained.safetensors")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert a and any(not torch.equal(a[k], build_sam(SAM_VARIANTS["tiny"]).state_dict()[k])
                     for k in a)  # fmt: skip
    # A resume must continue the same trajectory; a changed --lr is refused.
    with pytest.raises(SystemExit):
        train_main([*base, "--out", str(tmp_path / "b"), "--resume", "--lr", "1e-2"])
    with pytest.raises(SystemExit):  # without --resume, an existing run is not overwritten
        train_main([*base, "--out", str(tmp_path / "b")])


def test_train_on_user_coco_instances(shapeworld, tmp_path):
    args = [
        *FAST,
        "--instances-json", str(shapeworld / "annotations" / "instances_train.json"),
        "--images", str(shapeworld / "train"),
        "--out", str(tmp_path / "coco"), "--steps", "2",
    ]  # fmt: skip
    assert train_main(args) == 0
    assert load_sam(tmp_path / "coco" / "final").image_encoder.img_size == 64


def test_init_from_fine_tunes_a_trained_sam(trained, shapeworld, tmp_path, capsys):
    """--init-from: the run starts at that SAM's weights (a 1e-12 learning rate keeps them, to
    fp16 rounding), takes its size whatever --preset says, and records where it started; a
    folder that is not a SAM is refused before any data is read."""
    start = trained / "final"
    args = [*FAST, "--preset", "shapes", "--data", str(shapeworld), "--steps", "1", "--lr", "1e-12"]
    assert train_main([*args, "--init-from", str(start), "--out", str(tmp_path / "ft")]) == 0
    before, after = load_sam(start).state_dict(), load_sam(tmp_path / "ft" / "final").state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6, msg=key)
    meta = json.loads((tmp_path / "ft" / "final" / "manifest.json").read_text())["metadata"]
    assert meta["variant"] == "tiny" and meta["run"]["init_from"] == str(start.resolve())
    card = (tmp_path / "ft" / "final" / "MODEL_CARD.md").read_text()
    assert f"Fine-tuned from `{start.resolve()}`" in card
    for bad in (tmp_path / "nope", shapeworld):  # missing; a folder without a manifest
        with pytest.raises(SystemExit):
            train_main([*args, "--init-from", str(bad), "--out", str(tmp_path / "bad")])
        assert "--init-from:" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_training_forward_under_bf16_autocast(shapeworld):
    """The CUDA path (bf16 autocast) on CPU: the prompt encoder and losses stay fp32."""
    dataset = InstanceDataset.from_shapeworld(shapeworld, "train")
    data = load_mask_data(dataset, 64, workers=1, progress=False)
    torch.manual_seed(0)
    sam = build_sam(SAM_VARIANTS["tiny"]).train()
    dtypes = []
    sam.prompt_encoder.register_forward_hook(lambda m, i, out: dtypes.append(out[0].dtype))
    trainer = SamPromptLoss(sam, prompts_per_image=4, boxes_per_image=2, correction_rounds=2)
    ids = torch.arange(4)
    gen = step_generator(0, 0, 0, torch.device("cpu"))
    inst = sample_instances(data, ids, 4, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trainer(data.images[ids], data.sizes[ids], data.unpack_masks(inst), data.boxes[inst],
                      gen)  # fmt: skip
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert dtypes and set(dtypes) == {torch.float32}
    assert len(dtypes) == 2 * 3  # (point, box) x (1 + 2 correction rounds)
    grads = [p.grad for p in sam.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_prompt_sampling_is_uniform_on_the_mask_and_reproducible():
    region = torch.zeros(2, 8, 8, dtype=torch.bool)
    region[0, 2:4, 5:7] = True  # 4 pixels; region[1] is empty
    gen = torch.Generator().manual_seed(0)
    draws = [sample_pixels(region, gen) for _ in range(400)]
    xy = torch.stack([d[0][0] for d in draws])
    assert all(bool(d[1][0]) and not bool(d[1][1]) for d in draws)
    cells = {(int(x), int(y)) for x, y in xy}
    assert cells == {(5, 2), (6, 2), (5, 3), (6, 3)}
    again = sample_pixels(region, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, draws[0][0])
    # A step's generator is a pure function of (seed, step, rank).
    a = torch.rand(3, generator=step_generator(1, 5, 0, torch.device("cpu")))
    b = torch.rand(3, generator=step_generator(1, 5, 0, torch.device("cpu")))
    c = torch.rand(3, generator=step_generator(1, 6, 0, torch.device("cpu")))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_help_and_argument_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_main(["--help"])
    assert exc.value.code == 0
    assert "--resume" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        esam.main(["--help"])
    assert exc.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # no data given
        train_main(["--preset", "tiny", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "--data" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Eval protocol
# ---------------------------------------------------------------------------------------------


def test_object_point_hand_cases():
    square = np.zeros((10, 12), dtype=bool)
    square[2:7, 3:8] = True  # rows 2..6, cols 3..7
    assert object_point(square) == (5, 4)
    full = np.ones((5, 5), dtype=bool)  # the image border counts as boundary
    assert object_point(full) == (2, 2)
    yy, xx = np.mgrid[:41, :41]
    r = np.hypot(yy - 20, xx - 20)
    ring = (r <= 18) & (r >= 10)  # centre and centroid are in the hole
    x, y = object_point(ring)
    assert ring[y, x] and 12 <= np.hypot(y - 20, x - 20) <= 16
    with pytest.raises(ValueError, match="non-empty"):
        object_point(np.zeros((4, 4), dtype=bool))


def test_score_image_hand_case():
    gt0 = np.zeros((4, 4), dtype=bool)
    gt0[:2] = True  # 8 px
    gt1 = np.zeros((4, 4), dtype=bool)
    gt1[3, :] = True  # 4 px
    half = np.zeros((4, 4), dtype=bool)
    half[0] = True  # IoU 0.5 with gt0
    empty = np.zeros((4, 4), dtype=bool)
    point_masks = np.stack([np.stack([gt0, empty, half]), np.stack([empty, gt1, empty])])
    iou_pred = np.array([[0.1, 0.2, 0.9], [0.0, 0.5, 0.1]])  # picks half, then gt1
    box_masks = np.stack([gt0, gt1 | gt0])  # IoU 1 and 4/12
    wide = np.zeros((4, 4), dtype=bool)
    wide[2:] = True  # IoU 4/8 with gt1; no overlap with gt0
    scores = score_image([gt0, gt1], point_masks, iou_pred, box_masks, [half, wide])
    np.testing.assert_allclose(scores.point, [0.5, 1.0])
    np.testing.assert_allclose(scores.oracle, [1.0, 1.0])
    np.testing.assert_allclose(scores.box, [1.0, 4 / 12])
    np.testing.assert_allclose(scores.amg, [0.5, 0.5])
    np.testing.assert_allclose(amg_best_ious([], [gt0]), [0.0])
    with pytest.raises(ValueError, match="predictions for 2 instances"):
        score_image([gt0, gt1], point_masks[:1], iou_pred, box_masks, None)


def test_evaluate_sam_aggregates_per_instance_scores(shapeworld, monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        scores = score_image(*args, **kwargs)
        seen.append(scores)
        return scores

    monkeypatch.setattr(esam, "score_image", recording)
    torch.manual_seed(0)
    sam = build_sam(SAM_VARIANTS["tiny"])
    result = evaluate_sam(sam, shapeworld, "val", limit=3, amg_settings={"points_per_side": 4},
                          progress=False)  # fmt: skip
    dataset = InstanceDataset.from_shapeworld(shapeworld, "val")
    assert result["images"] == 3
    assert result["instances"] == sum(len(dataset[i].instances) for i in range(3))
    point = np.concatenate([s.point for s in seen])
    amg = np.concatenate([s.amg for s in seen])
    assert result["point_miou"] == pytest.approx(point.mean())
    assert result["box_miou"] == pytest.approx(np.concatenate([s.box for s in seen]).mean())
    assert result["amg_recall@0.5"] == pytest.approx((amg >= 0.5).mean())
    assert result["point_oracle_miou"] >= result["point_miou"]
    for key in ("point_miou", "point_oracle_miou", "box_miou", "amg_recall@0.5", "amg_recall@0.75"):
        assert 0.0 <= result[key] <= 1.0
    assert result["amg_recall@0.75"] <= result["amg_recall@0.5"]


def test_eval_cli_writes_json_and_prints_the_table(trained, shapeworld, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--checkpoint", str(trained / "final"), "--data", str(shapeworld), "--limit", "2"]
    assert esam.main([*args, "--json", str(out), "--device", "cpu", "--no-progress"]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert f"| box mIoU | {100 * result['box_miou']:.1f} |" in printed
    assert result["images"] == 2 and result["checkpoint"] == str(trained / "final")
