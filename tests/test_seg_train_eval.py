"""train.seg and eval.seg end to end on a tiny ShapeWorld, with a tiny CLIP and SAM trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.images import fit_within, load_rgb
from data.shapeworld import main as shapeworld_main
from eval.seg import drop_background_masks
from eval.seg import main as eval_main
from segmentation.mask_adapter import load_adapter
from train.clip import main as clip_main
from train.sam import main as sam_main
from train.seg import main as train_main
from vlm.tools import TOOL_MAX_SIDE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """64 px ShapeWorld (24 train, 6 test) and a 2-step tiny CLIP and SAM trained on it."""
    tmp = tmp_path_factory.mktemp("seg")
    root = tmp / "sw"
    argv = ["generate", "--out", str(root), "--pretrain", "16", "--train", "24", "--val", "4"]
    shapeworld_main([*argv, "--test", "6", "--image-size", "64", "--seed", "0", "--workers", "1"])
    common = ["--preset", "tiny", "--data", str(root), "--device", "cpu", "--batch-size", "8"]
    assert clip_main([*common, "--out", str(tmp / "clip"), "--steps", "2", "--workers", "1"]) == 0
    assert sam_main([*common, "--out", str(tmp / "sam"), "--steps", "2", "--no-progress"]) == 0
    return {"data": root, "clip": tmp / "clip" / "final", "sam": tmp / "sam" / "final", "tmp": tmp}


def _models(world: dict[str, Path]) -> list[str]:
    return ["--clip", str(world["clip"]), "--sam", str(world["sam"])]


@pytest.fixture(scope="module")
def stage1(world) -> Path:
    out = world["tmp"] / "stage1"
    argv = ["--data", str(world["data"]), "--out", str(out), "--steps", "12", "--batch-size", "4"]
    # one batch of 4 images seen every step: the adapter must fit it (random tiny CLIP below)
    argv += [*_models(world), "--hidden", "16", "--log-every", "2", "--no-progress"]
    assert train_main([*argv, "--limit", "4", "--lr", "1e-2"]) == 0
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_stage1_learns_and_writes_a_checkpoint_with_a_card(stage1):
    log = _log(stage1)
    assert len(log) == 6 and all(r["consistency"] == 0 for r in log)
    assert log[-1]["ce"] < log[0]["ce"] - 0.2  # measured: 3.62 -> 3.08
    adapter = load_adapter(stage1 / "final")
    assert adapter.cfg.hidden == 16
    card = (stage1 / "final" / "MODEL_CARD.md").read_text()
    assert "stage 1" in card and "--steps 12" in card
    assert not (stage1 / "last").exists()  # the resumable state is removed when done


def test_stage2_uses_matched_proposals_and_the_consistency_loss(world, stage1):
    out = world["tmp"] / "stage2"
    argv = ["--data", str(world["data"]), "--out", str(out), "--stage", "2", "--steps", "4"]
    extra = ["--init", str(stage1 / "final"), "--batch-size", "4", "--log-every", "1"]
    assert train_main([*argv, *extra, *_models(world), "--no-progress"]) == 0
    assert (out / "proposals.npz").is_file()
    log = _log(out)
    assert len(log) == 4 and np.isfinite([r["loss"] for r in log]).all()
    # loss = ce + 5 * consistency, logged separately
    for r in log:
        assert r["loss"] == pytest.approx(r["ce"] + 5 * r["consistency"], rel=1e-5)


def test_resume_gives_the_weights_of_an_uninterrupted_run(world, tmp_path):
    base = ["--data", str(world["data"]), "--steps", "6", "--batch-size", "4", "--hidden", "8"]
    base += [*_models(world), "--no-progress", "--save-every", "2"]
    assert train_main([*base, "--out", str(tmp_path / "a")]) == 0
    assert train_main([*base, "--out", str(tmp_path / "b"), "--stop-after", "3"]) == 0
    assert (tmp_path / "b" / "last").is_dir() and not (tmp_path / "b" / "final").exists()
    with pytest.raises(SystemExit):  # other settings cannot resume this state
        train_main([*base, "--out", str(tmp_path / "b"), "--resume", "--lr", "5e-3"])
    assert train_main([*base, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_adapter(tmp_path / "a" / "final").state_dict()
    b = load_adapter(tmp_path / "b" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_eval_benchmark_and_one_image_with_any_vocabulary(world, stage1, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--data", str(world["data"]), "--limit", "3", *_models(world), "--no-progress"]
    argv += ["--adapter", f"s1={stage1 / 'final'}", "--json", str(out)]
    argv += ["--proposals", str(tmp_path / "p.npz"), "--ensemble", "s1"]
    assert eval_main(argv) == 0
    report = json.loads(out.read_text())
    ensemble = "s1 x masked crops (geometric ensemble)"
    assert set(report["results"]) == {
        "masked crops (two-stage reference)",
        "mask pooling",
        "s1",
        ensemble,
    }
    for r in report["results"].values():
        assert 0 <= r["gt_mask_acc_seen"] <= 1 and "miou_harmonic" in r
    assert (tmp_path / "p.npz").is_file()
    image = next((world["data"] / "test").glob("*.png"))
    argv = ["--image", str(image), "--vocab", "circle, crimson star,purple hexagon"]
    argv += [*_models(world), "--overlay", str(tmp_path / "o.png"), "--min-score", "0"]
    assert eval_main(argv) == 0
    assert "segments" in capsys.readouterr().out
    assert (tmp_path / "o.png").is_file()


def test_one_image_is_reported_in_the_files_pixels(world, tmp_path, capsys, monkeypatch):
    """A photo segmented at the app's working size (an 8192 x 4096 file: read at 4096 x 2048,
    segmented at 1024 x 512) is reported in its own pixels: the working image saved as a file
    gives the same segments, their areas 64 times and their boxes 8 times smaller. (The 2-step
    SAM proposes nothing that passes its thresholds: the proposals here are the pixels unlike
    the background, in the image's left and right halves, so that there are segments to report.)"""

    def objects(_generator, image):
        shapes = np.abs(image.astype(int) - image[0, 0]).sum(-1) > 60
        left, right = shapes.copy(), shapes.copy()
        left[:, image.shape[1] // 2 :] = right[:, : image.shape[1] // 2] = False
        masks = np.stack([m for m in (left, right) if m.any()])
        return masks, np.ones(len(masks), dtype=np.float32)

    monkeypatch.setattr("eval.seg.sam_proposals", objects)
    scene = Image.open(next((world["data"] / "test").glob("*.png"))).convert("RGB")
    big, work = tmp_path / "big.png", tmp_path / "work.png"
    scene.resize((8192, 4096), Image.Resampling.NEAREST).save(big)
    fit_within(load_rgb(big), TOOL_MAX_SIDE).save(work)
    argv = ["--vocab", "circle, crimson star,purple hexagon", *_models(world), "--min-score", "0"]

    def report(path: Path) -> list[str]:
        assert eval_main(["--image", str(path), *argv]) == 0
        return capsys.readouterr().out.splitlines()

    lines_work, lines_big = report(work), report(big)
    assert "segmented at 1024x512, the file is 8192x4096" in lines_big[1]
    rows_work, rows_big = lines_work[1:], lines_big[2:]
    assert len(rows_work) == len(rows_big) == 2
    for a, b in zip(rows_work, rows_big, strict=True):
        # "  <label> p=<score>  area=<n> px  box=(x0,y0)-(x1,y1)"
        fields_a, fields_b = a.split(), b.split()
        assert fields_a[:-3] == fields_b[:-3]  # label and score: the same working image
        assert int(fields_b[-3].split("=")[1]) == 64 * int(fields_a[-3].split("=")[1])
        (ax0, ay0), (ax1, ay1) = _corners(fields_a[-1])
        (bx0, by0), (bx1, by1) = _corners(fields_b[-1])
        assert (bx0, by0, bx1, by1) == (8 * ax0, 8 * ay0, 8 * ax1 + 7, 8 * ay1 + 7)


def _corners(box: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """'box=(x0,y0)-(x1,y1)' -> ((x0, y0), (x1, y1))."""
    a, b = box.removeprefix("box=").split("-")
    x0, y0 = a.strip("()").split(",")
    x1, y1 = b.strip("()").split(",")
    return (int(x0), int(y0)), (int(x1), int(y1))


def test_bad_arguments_are_clear(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(["--out", str(tmp_path / "x"), *_models(world)])
    assert "exactly one data source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--data", str(world["data"]), "--out", str(tmp_path / "x"), "--stage", "2"])
    assert "--init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--image", "x.png", "--vocab", " , ", *_models(world)])
    assert "vocabulary is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    assert "--vocab" in capsys.readouterr().out


def test_background_masks_are_dropped():
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0] = True  # the whole image
    masks[1, :5] = True  # exactly half: kept
    masks[2, :2, :2] = True
    assert len(drop_background_masks(masks)) == 2
    assert drop_background_masks(masks[:0]).shape == (0, 10, 10)


def test_stage_two_never_calls_an_untrained_class_void():
    """A proposal over an object of a class left out of training (a COCO file's unseen one) is
    not a void row: labelled void, it would teach the adapter to reject that very class."""
    from train.seg import _training_masks

    seen = np.zeros((1, 12, 12), dtype=bool)
    seen[0, :6, :6] = True
    unseen = np.zeros((1, 12, 12), dtype=bool)
    unseen[0, 6:, 6:] = True
    stray = np.zeros((1, 12, 12), dtype=bool)
    stray[0, :3, 8:] = True  # overlaps neither
    proposals = np.concatenate([seen, unseen, stray])
    void = 9
    masks, labels, pairs = _training_masks(
        seen, [4], proposals, np.random.default_rng(0), void, 5, untrained=unseen
    )
    assert labels == [4, 4, void] and pairs == [(1, 0)]
    np.testing.assert_array_equal(masks[2], stray[0])  # the one void row: the stray proposal
    _, old_labels, _ = _training_masks(seen, [4], proposals, np.random.default_rng(0), void, 5)
    assert old_labels == [4, 4, void, void]  # without the unseen objects both were void


def test_geometric_ensemble_matches_hand_computation():
    """FC-CLIP's ensemble as its code computes it: both sides' class probabilities over the
    classes alone, p_in^(1-a) p_out^a per class, renormalised, scaled by 1 - the in-vocabulary
    void, which is kept (CLIP's void, a fixed logit far below its class logits, used to wipe it
    out)."""
    from segmentation.open_vocab import geometric_ensemble

    p_in = np.array([[0.5, 0.3, 0.2]])  # seen class, unseen class, void: classes 0.625, 0.375
    p_out = np.array([[0.15, 0.45, 0.4]])  # over the classes alone: 0.25, 0.75
    raw = np.array([0.625**0.6 * 0.25**0.4, 0.375**0.2 * 0.75**0.8])
    want = np.append(raw / raw.sum() * 0.8, 0.2)
    seen = np.array([True, False])
    np.testing.assert_allclose(geometric_ensemble(p_in, p_out, seen, 0.4, 0.8)[0], want, rtol=1e-5)
    # a = 0: the in-vocabulary classifier alone; a = 1: CLIP's classes under p_in's void
    np.testing.assert_allclose(geometric_ensemble(p_in, p_out, seen, 0, 0), p_in, rtol=1e-5)
    np.testing.assert_allclose(
        geometric_ensemble(p_in, p_out, seen, 1, 1), [[0.2, 0.6, 0.2]], rtol=1e-5
    )
    # an adapter that calls a mask void keeps it void, whatever CLIP's (near-zero) void says
    got = geometric_ensemble(np.array([[0.05, 0.05, 0.9]]), np.array([[0.5, 0.5, 1e-13]]), seen)
    assert got[0, -1] == pytest.approx(0.9)
    # the in-vocabulary void must not tilt the mix: with it dropped first the seen class wins
    # (0.7^0.6 0.5^0.4 = 0.61 > 0.3^0.2 0.5^0.8 = 0.45); mixed in, the unseen would (0.23 < 0.33)
    got = geometric_ensemble(np.array([[0.14, 0.06, 0.8]]), np.array([[0.45, 0.45, 0.1]]), seen)
    assert got[0, :-1].argmax() == 0
    with pytest.raises(ValueError, match="seen flags"):
        geometric_ensemble(p_in, p_out, np.array([True]))


def test_eval_reads_coco_and_ade_style_data_like_shapeworld(world, stage1, tmp_path):
    """The same test split given three ways: ShapeWorld, COCO (+ its semantic maps, or painted
    from the instances) and ADE-style label maps; the semantic figures must agree."""
    from PIL import Image

    from data.formats import read_coco_instances

    data = world["data"]
    cache = ["--proposals", str(tmp_path / "p.npz"), "--limit", "3", "--no-progress"]
    common = [*_models(world), "--adapter", f"s1={stage1 / 'final'}", *cache]

    def run(*argv: str) -> dict:
        out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
        assert eval_main([*argv, *common, "--json", str(out)]) == 0
        results = json.loads(out.read_text())["results"]
        for r in results.values():
            del r["classify_seconds_median"]  # a time, not a figure
        return results

    ref = run("--data", str(data), "--split", "test")
    coco = ["--images", str(data / "test"), "--instances"]
    coco.append(str(data / "annotations" / "instances_test.json"))
    with_maps = run(*coco, "--semantic", str(data / "semantic" / "test"))
    painted = run(*coco)
    assert with_maps == ref
    assert painted == ref  # ShapeWorld's visible masks do not overlap: painting order is moot
    # ADE-style: label k = line k of the classes file
    cats = read_coco_instances(data / "annotations" / "instances_test.json").categories
    names = [c.name for c in cats]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    lut = np.zeros(max(c.id for c in cats) + 1, dtype=np.uint8)
    for k, c in enumerate(cats, start=1):
        lut[c.id] = k
    ade = tmp_path / "ade"
    ade.mkdir()
    for png in sorted((data / "semantic" / "test").glob("*.png")):
        Image.fromarray(lut[np.asarray(Image.open(png))]).save(ade / png.name)
    unseen = ",".join(c.name for c in cats if c.extra.get("unseen"))
    ade_args = ["--images", str(data / "test"), "--semantic", str(ade)]
    ade_args += ["--classes", str(tmp_path / "classes.txt"), "--unseen", unseen]
    ade_run = run(*ade_args, "--zero", "background")  # ShapeWorld's 0 is a real background
    for name, r in ref.items():
        for key in ("miou_seen", "miou_unseen", "per_class_iou"):
            assert ade_run[name][key] == pytest.approx(r[key], nan_ok=True)
    # by default ADE-style maps follow ADE-150's protocol: 0 is unlabelled, not scored
    out = tmp_path / "ade_default.json"
    assert eval_main([*ade_args, *common, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["zero"] == "ignore"
    assert all(np.isnan(r["background_iou"]) for r in report["results"].values())
    ade_args = ade_args[:4]
    with pytest.raises(SystemExit):
        eval_main([*ade_args, *_models(world)])  # ADE-style without --classes


def test_ade_protocol_scores_a_large_region_and_leaves_label_zero_unscored(tmp_path):
    """ADE-150's protocol (--zero ignore): a wall over 60 % of the image, the rest label 0
    ("other"). An oracle naming the wall's proposal right scores wall IoU 1 there; with label 0 a
    scored background the wall's proposal would be dropped as background (IoU 0)."""
    from PIL import Image

    from data.datasets import InstanceDataset
    from data.formats import FormatError
    from eval.seg import evaluate_classifier

    labels = np.zeros((20, 20), dtype=np.uint8)
    labels[:12] = 1  # wall: 60 %
    labels[15:18, 2:5] = 2  # a lamp
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(labels).save(tmp_path / "labels" / "a.png")
    dataset = InstanceDataset.from_semantic(
        tmp_path / "images", tmp_path / "labels", ["wall", "lamp"]
    )

    # an image of another size than its label map, and one that does not open: both named
    # before any image is read in full
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    Image.fromarray(labels).save(tmp_path / "labels" / "b.png")
    (tmp_path / "images" / "c.png").write_text("not an image")
    Image.fromarray(labels).save(tmp_path / "labels" / "c.png")
    with pytest.raises(FormatError, match=r"2 of 3 images(.|\n)*b\.png: 24x20 pixels(.|\n)*c\.png"):
        InstanceDataset.from_semantic(tmp_path / "images", tmp_path / "labels", ["wall", "lamp"])
    for name in ("b.png", "c.png"):
        (tmp_path / "images" / name).unlink()

    class Oracle:  # the class a mask covers most, read off the label map
        def classify_masks(self, image, masks, vocabulary):
            probs = np.zeros((len(masks), len(vocabulary) + 1))
            for k, mask in enumerate(masks):
                probs[k, np.bincount(labels[mask], minlength=3)[1:].argmax()] = 1.0
            return probs

    proposals = [np.stack([labels == 1, labels == 2])]
    semantic = lambda i: labels.astype(np.int64)  # noqa: E731
    ade = evaluate_classifier(Oracle(), dataset, semantic, proposals, 1, False, zero="ignore")
    assert ade["per_class_iou"] == {"wall": 1.0, "lamp": 1.0}
    assert np.isnan(ade["background_iou"])
    old = evaluate_classifier(Oracle(), dataset, semantic, proposals, 1, False)
    assert old["per_class_iou"]["wall"] == 0.0 and old["per_class_iou"]["lamp"] == 1.0
    # a pixel no mask covers is predicted "background": a miss for its class, not a hit
    half = [np.stack([labels == 1, np.zeros_like(labels, bool)])]
    missed = evaluate_classifier(Oracle(), dataset, semantic, half, 1, False, zero="ignore")
    assert missed["per_class_iou"] == {"wall": 1.0, "lamp": 0.0}
    with pytest.raises(ValueError, match="zero must be one of"):
        evaluate_classifier(Oracle(), dataset, semantic, proposals, 1, False, zero="skip")


def test_evaluate_classifier_with_an_oracle_no_unseen_split_and_ignore_pixels(world):
    """evaluate_classifier against what an oracle must score: a classifier that names every
    ground-truth mask right, on the ground-truth masks as proposals, gets accuracy and mIoU 1;
    with no unseen class the unseen figures are NaN (it raised after the whole pass, and said
    0.0 for an accuracy over nothing); pixels labelled 255 (COCO-stuff's ignore) are not scored
    (they raised IndexError), whatever is predicted there."""
    from data.datasets import InstanceDataset
    from eval.seg import evaluate_classifier

    dataset = InstanceDataset.from_shapeworld(world["data"], "test")
    dataset.unseen = set()
    ids = sorted(dataset.category_names)
    items = [dataset[i] for i in range(len(dataset))]

    class Oracle:  # reads the class of each mask off the ground truth of its image
        def classify_masks(self, image, masks, vocabulary):
            item = next(it for it in items if np.array_equal(np.asarray(it.image), image))
            probs = np.zeros((len(masks), len(vocabulary) + 1))
            for k, mask in enumerate(masks):
                inst = next(x for x in item.instances if np.array_equal(x.mask, mask))
                probs[k, ids.index(inst.category_id)] = 1.0
            return probs

    def semantic(i):
        out = dataset.semantic_map(i).copy()
        out[:4, :4] = 255  # a corner left unlabelled
        return out

    proposals = [np.stack([x.mask for x in it.instances]) for it in items]
    r = evaluate_classifier(Oracle(), dataset, semantic, proposals, len(items), progress=False)
    assert r["gt_mask_acc_seen"] == 1.0 and np.isnan(r["gt_mask_acc_unseen"])
    assert r["gt_masks"] == {"seen": sum(len(it.instances) for it in items), "unseen": 0}
    assert r["miou_seen"] == pytest.approx(1.0) and np.isnan(r["miou_unseen"])
    assert np.isnan(r["miou_harmonic"]) and r["background_iou"] == pytest.approx(1.0)
