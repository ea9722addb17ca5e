"""train.clip and eval.clip: smoke runs of main([...]) on a tiny ShapeWorld, exact resume, the eval
protocol's pieces against hand-computed cases."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.checkpoint import load_checkpoint
from data.datasets import InstanceDataset
from data.scene import COLOURS, SHAPES
from data.shapeworld import main as shapeworld_main
from data.shapeworld import read_split
from eval.clip import (
    evaluate_clip,
    format_table,
    listing_caption,
    object_crop,
    retrieval_recalls,
)
from eval.clip import main as eval_main
from train.clip import (
    LOG_NAME,
    ContrastiveHeads,
    DenseHeads,
    contrastive_loss,
    dense_loss,
    load_patch_labels,
    object_captions,
    patch_labels,
    pick_captions,
    scene_patch_labels,
)
from train.clip import main as train_main
from vision.clip import FROZEN_PREFIX, TENSOR_FILE, build_clip, get_clip_config, load_clip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A 64 px ShapeWorld: 32 pretrain + 32 train + 12 val images."""
    root = tmp_path_factory.mktemp("sw") / "world"
    argv = ["generate", "--out", str(root), "--pretrain", "32", "--train", "32", "--val", "12"]
    shapeworld_main([*argv, "--test", "0", "--image-size", "64", "--seed", "0", "--workers", "1"])
    return root


def _train(world: Path, out: Path, *extra: str) -> int:
    argv = ["--preset", "tiny", "--data", str(world), "--out", str(out), "--batch-size", "16"]
    return train_main([*argv, "--device", "cpu", "--workers", "2", *extra])


def _losses(out: Path) -> list[float]:
    lines = (out / LOG_NAME).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> Path:
    """A 12-step tiny run with --eval; returns its run folder."""
    out = tmp_path_factory.mktemp("run") / "clip"
    argv = ["--steps", "12", "--lr", "3e-3", "--save-every", "5", "--eval", "--eval-limit", "8"]
    assert _train(world, out, *argv) == 0
    return out


def test_help_shows_example_commands(capsys):
    for main, example in (
        (train_main, "python -m train.clip --preset shapes"),
        (eval_main, "python -m eval.clip --checkpoint"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["--help"])
        assert exc.value.code == 0
        assert example in capsys.readouterr().out


def test_bad_arguments_are_clear(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(["--out", str(tmp_path / "x")])
    assert "exactly one data source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(world, tmp_path / "x", "--splits", "pretrain,nosuch")
    assert "generate the data first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(world, tmp_path / "x", "--resume")
    assert "start without --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(world, tmp_path / "x", "--batch-size", "1000")
    assert "need at least one batch" in capsys.readouterr().err


def test_training_lowers_the_loss_and_writes_a_final_checkpoint(trained):
    losses = _losses(trained)
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3, losses

    final = trained / "final"
    ckpt = load_checkpoint(final)
    assert ckpt.config == get_clip_config("tiny-vit").to_dict()
    tensors = ckpt.tensors[TENSOR_FILE]
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert not any(k.startswith(FROZEN_PREFIX) for k in tensors)  # MiniLM is not stored
    assert {"visual.proj", "text.proj.weight", "logit_scale"} <= set(tensors)
    assert ckpt.metadata["data"]["data_seed"] == 0
    assert ckpt.metadata["data"]["images"] == 64
    card = (final / "MODEL_CARD.md").read_text()
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["files"]["clip.safetensors"]["sha256"] in card
    assert "python -m train.clip --preset tiny" in card
    assert "| zero-shot class, seen classes |" in card  # the --eval table

    # the final weights are the last training state, rounded to fp16
    last = load_file(str(trained / "last" / "weights" / "trained.safetensors"))
    for key, value in last.items():
        torch.testing.assert_close(tensors[key].float(), value, rtol=1e-3, atol=1e-3)
    model, _, _ = load_clip(final)
    torch.testing.assert_close(
        model.visual.proj.detach(), tensors["visual.proj"].float(), rtol=0, atol=0
    )


def test_eval_json_and_library_agree_on_the_tiny_checkpoint(trained, world, tmp_path, capsys):
    from_train = json.loads((trained / "final" / "eval.json").read_text())
    model, preprocess, tokenizer = load_clip(trained / "final")
    results = evaluate_clip(model, tokenizer, preprocess, world, "val", limit=8, progress=False)
    for key in ("class_acc_seen", "colour_acc_seen", "t2i_r1", "i2t_r5", "objects"):
        assert results[key] == pytest.approx(from_train[key], abs=1e-6)
    assert results["images"] == 8
    counted = results["objects"] + results["objects_skipped_occluded"]
    assert counted >= 2 * 8  # ShapeWorld draws at least two objects per image
    assert results["objects_seen_class"] + results["objects_unseen_class"] == results["objects"]
    assert results["objects_seen_colour"] + results["objects_unseen_colour"] == results["objects"]
    for key in ("class_acc_seen", "colour_acc_seen", "t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5"):
        assert 0.0 <= results[key] <= 1.0
    assert results["t2i_r1"] <= results["t2i_r5"]
    assert results["class_chance"] == pytest.approx(1 / 14)
    assert results["colour_chance"] == pytest.approx(1 / 10)

    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(trained / "final"), "--data", str(world), "--limit", "8"]
    assert eval_main([*argv, "--json", str(out), "--crop", "box", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| text->image R@1 |" in printed
    saved = json.loads(out.read_text())
    assert saved["protocol"]["crop"] == "box" and saved["table"] in printed


def test_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    common = ("--steps", "4", "--save-every", "2", "--lr", "2e-3", "--seed", "3")
    common += ("--object-pairs", "8")  # region pairs come from a second stream: also exact
    assert _train(world, tmp_path / "a", *common) == 0
    assert _train(world, tmp_path / "b", *common, "--stop-at", "2") == 0
    assert not (tmp_path / "b" / "final").exists()  # stopped early: no final checkpoint
    assert _train(world, tmp_path / "b", *common, "--resume") == 0

    a = load_file(str(tmp_path / "a" / "last" / "weights" / "trained.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "weights" / "trained.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), abs=1e-6)
    assert len(_losses(tmp_path / "b")) == 4
    meta = load_checkpoint(tmp_path / "a" / "final").metadata
    assert meta["data"]["objects"] > 2 * 64 * 0.5 and meta["data"]["object_pairs_per_step"] == 8
    final_a = load_checkpoint(tmp_path / "a" / "final").tensors[TENSOR_FILE]
    final_b = load_checkpoint(tmp_path / "b" / "final").tensors[TENSOR_FILE]
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key


def test_dense_heads_train_resume_exactly_and_are_not_stored(world, tmp_path, capsys):
    """--dense-weight: the per-patch loss is logged and falls, the read-outs resume with the
    tower (exactly), and the final checkpoint holds the CLIP alone, as a plain run's does."""
    common = ("--steps", "10", "--save-every", "5", "--lr", "3e-3", "--dense-weight", "1")
    assert _train(world, tmp_path / "a", *common) == 0
    assert _train(world, tmp_path / "b", *common, "--stop-at", "5") == 0
    assert _train(world, tmp_path / "b", *common, "--resume") == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / LOG_NAME).read_text().splitlines()]
    dense = [r["dense"] for r in rows]
    assert all(r["loss"] == pytest.approx(r["contrastive"] + r["dense"], rel=1e-5) for r in rows)
    assert np.mean(dense[-3:]) < 0.8 * np.mean(dense[:3])  # starts near (ln 14 + ln 11) / 2
    a = load_file(str(tmp_path / "a" / "last" / "weights" / "trained.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "weights" / "trained.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("dense.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert _train(world, tmp_path / "plain", "--steps", "1") == 0
    final = load_checkpoint(tmp_path / "a" / "final").tensors[TENSOR_FILE]
    plain = load_checkpoint(tmp_path / "plain" / "final").tensors[TENSOR_FILE]
    assert final.keys() == plain.keys()
    load_clip(tmp_path / "a" / "final")
    # a resume must keep the read-outs' settings: their state is in <out>/last or it is not
    for changed in (("--dense-weight", "0"), ("--dense-min-cover", "0.5")):
        with pytest.raises(SystemExit):  # the later flag overrides common's
            _train(world, tmp_path / "b", *common, *changed, "--resume")
        assert "pass the same" in capsys.readouterr().err
    # region crops ride after the scenes and have no targets: the run still trains both terms
    assert _train(world, tmp_path / "objects", *common, "--object-pairs", "4") == 0
    assert "dense" in json.loads((tmp_path / "objects" / LOG_NAME).read_text().splitlines()[-1])
    imagefolder = ["--preset", "tiny", "--imagefolder", str(world / "train"), "--steps", "1"]
    imagefolder += ["--batch-size", "16", "--device", "cpu"]
    with pytest.raises(SystemExit):  # the per-patch targets come from ShapeWorld's masks
        train_main([*imagefolder, "--out", str(tmp_path / "x"), "--dense-weight", "1"])
    assert "--dense-weight needs a ShapeWorld --data" in capsys.readouterr().err
    assert train_main([*imagefolder, "--out", str(tmp_path / "x"), "--workers", "1"]) == 0


def test_contrastive_heads_send_the_dense_loss_into_the_tower_for_the_scenes_only():
    """The read-outs see the first `scenes` images (the region crops come after them), and
    their loss reaches the tower's weights, not the read-outs alone."""
    torch.manual_seed(0)
    cfg = get_clip_config("tiny-vit")
    clip = build_clip(cfg).model.train()
    heads = ContrastiveHeads(clip, DenseHeads(cfg.vision.width))
    pixels = torch.randn(5, 3, cfg.vision.image_size, cfg.vision.image_size)
    text = torch.randn(5, clip.text.proj.in_features)
    *_, mixed = heads(pixels, text, scenes=3)
    *_, alone = heads(pixels[:3], text[:3])
    assert mixed is not None and alone is not None and mixed[0].shape[0] == 3
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-4, atol=1e-5)
    grid = cfg.vision.grid
    classes = torch.randint(0, len(SHAPES) + 1, (3, grid * grid))
    colours = torch.randint(0, len(COLOURS) + 1, (3, grid * grid))
    dense_loss(alone, classes, colours).backward()
    grads = {n: p.grad for n, p in clip.named_parameters() if n.startswith("visual.")}
    body = [g for n, g in grads.items() if n.startswith(("visual.conv1", "visual.transformer."))]
    assert body and all(g is not None and g.abs().sum() > 0 for g in body)
    # the read-outs sit on the tokens before ln_post (what the VLM's projector reads)
    assert grads["visual.proj"] is None and grads["visual.ln_post.weight"] is None


def test_scene_patch_labels_take_class_and_colour_from_one_object():
    """One vote per object: a patch 40 % red cross, 30 % green circle and 30 % blue circle is
    the red cross (separate votes on class and colour would say circle and red)."""
    size, grid = (10, 10), 1
    cross, left, right = (np.zeros(size, bool) for _ in range(3))
    cross[:4] = True
    left[4:, :5] = True
    right[4:, 5:] = True
    circle, red, green, blue = SHAPES.index("circle") + 1, 1, 4, 6
    objects = [(cross, SHAPES.index("cross") + 1, red), (left, circle, green)]
    objects.append((right, circle, blue))
    classes, colours = scene_patch_labels(objects, size, grid, 0.25)
    assert (classes.tolist(), colours.tolist()) == ([[SHAPES.index("cross") + 1]], [[red]])
    classes, colours = scene_patch_labels(objects, size, grid, 0.5)  # no object covers half
    assert (classes.tolist(), colours.tolist()) == ([[0]], [[0]])


def test_init_from_starts_at_the_checkpoint(trained, world, tmp_path, capsys):
    """--init-from: a run starts from the given tower (a near-zero lr keeps it); one of another
    CLIP variant is refused before any data is read."""
    start = ("--init-from", str(trained / "final"), "--steps", "1", "--lr", "1e-12")
    assert _train(world, tmp_path / "ft", *start) == 0
    before = load_checkpoint(trained / "final").tensors[TENSOR_FILE]
    after = load_checkpoint(tmp_path / "ft" / "final").tensors[TENSOR_FILE]
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert _train(world, tmp_path / "fresh", "--steps", "1", "--lr", "1e-12") == 0
    fresh = load_checkpoint(tmp_path / "fresh" / "final").tensors[TENSOR_FILE]
    assert not torch.equal(fresh["visual.conv1.weight"], before["visual.conv1.weight"])
    for extra, says in (
        (("--model", "shapes-vit"), "is CLIP 'tiny-vit', whose"),
        (("--init-from", str(tmp_path / "nowhere")), "checkpoint folder not found"),
    ):
        with pytest.raises(SystemExit):
            _train(world, tmp_path / "bad", *start, *extra)
        assert says in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_dense_loss_hand_computed():
    """The class over object patches only, the colour over every patch, then their mean."""
    class_logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    colour_logits = torch.tensor([[[0.0, 3.0], [1.0, 0.0], [2.0, 2.0]]])
    classes = torch.tensor([[1, 2, 0]])  # the third patch is background: no class term
    colours = torch.tensor([[1, 1, 0]])
    shape = -(math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(math.e / (math.e + 2))) / 2
    colour = (
        -(math.log(math.exp(3) / (1 + math.exp(3))) + math.log(1 / (math.e + 1)) + math.log(0.5))
        / 3
    )
    got = dense_loss((class_logits, colour_logits), classes, colours)
    assert got.item() == pytest.approx((shape + colour) / 2, rel=1e-6)
    empty = dense_loss((class_logits, colour_logits), torch.zeros_like(classes), colours * 0)
    assert torch.isfinite(empty)


def test_patch_labels_match_a_per_patch_count():
    """Against a naive loop: the most common object label of each patch when it covers enough."""
    hand = np.zeros((4, 4), dtype=np.int64)
    hand[0, 0:2] = 3  # half of the top-left 2x2 patch
    hand[2:4, 2] = 1
    hand[3, 3] = 2  # bottom-right patch: two of label 1, one of label 2
    assert patch_labels(hand, 2, 0.5).tolist() == [[3, 0], [0, 1]]
    assert patch_labels(hand, 2, 0.6).tolist() == [[0, 0], [0, 0]]
    rng = np.random.default_rng(0)
    for _ in range(30):
        grid, side = int(rng.choice([1, 2, 4])), int(rng.integers(1, 6))
        size = grid * side
        noisy = rng.choice(5, size=(size, size), p=[0.4, 0.3, 0.1, 0.1, 0.1])
        # each patch four uniform quarters: covers of 1/4, 1/2, 3/4 and ties
        quarters = np.kron(rng.integers(0, 4, (2 * grid, 2 * grid)), np.ones((side, side), int))
        for label_map in (noisy, quarters):
            cover = float(rng.uniform(0.1, 0.7))
            got = patch_labels(label_map, grid, cover)
            p = label_map.shape[0] // grid
            for r in range(grid):
                for c in range(grid):
                    block = label_map[r * p : (r + 1) * p, c * p : (c + 1) * p].ravel()
                    best, count = 0, 0
                    for k in sorted(set(block.tolist()) - {0}):
                        if (block == k).sum() > count:
                            best, count = k, int((block == k).sum())
                    assert got[r, c] == (best if count / block.size >= cover else 0)
    with pytest.raises(ValueError, match="does not divide"):
        patch_labels(np.zeros((5, 5), np.int64), 2, 0.5)


def test_patch_labels_name_the_objects_of_the_scenes(world):
    """load_patch_labels against the scenes as data.shapeworld reads them: a patch covered
    (90 %) by one object's visible mask carries its class and colour; an empty patch is 0."""
    scenes = read_split(world, "train", limit=6)
    coco = InstanceDataset.from_shapeworld(world, "train")  # read_split's image order
    paths = [coco.images_root / name for name in coco.file_names[:6]]
    grid = get_clip_config("tiny-vit").vision.grid
    labels = load_patch_labels(world, ["train"], paths, grid, 0.25)
    assert labels.classes.shape == (6, grid, grid)
    checked = 0
    for i, scene in enumerate(scenes):
        p = scene.height // grid
        for r in range(grid):
            for c in range(grid):
                cell = (slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))
                covers = [np.asarray(o.mask, bool)[cell].mean() for o in scene.objects]
                if max(covers) == 0:
                    assert labels.classes[i, r, c] == 0 and labels.colours[i, r, c] == 0
                elif max(covers) >= 0.9:
                    obj = scene.objects[int(np.argmax(covers))]
                    assert labels.classes[i, r, c] == SHAPES.index(obj.shape) + 1
                    assert labels.colours[i, r, c] == COLOURS.index(obj.colour) + 1
                    checked += 1
    assert checked >= 6
    with pytest.raises(ValueError, match="no instance masks"):
        load_patch_labels(world, ["val"], paths, grid, 0.25)


def test_user_data_sources(world, tmp_path, capsys):
    """A COCO captions file (here ShapeWorld's own) and an imagefolder with metadata.jsonl;
    --no-progress silences every bar (image decoding, caption encoding, training)."""
    coco = ["--images", str(world / "train"), "--captions-json"]
    coco.append(str(world / "annotations" / "captions_train.json"))
    assert (
        train_main(
            [
                "--preset",
                "tiny",
                *coco,
                "--out",
                str(tmp_path / "c"),
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    shown = capsys.readouterr().err
    assert "decode images" in shown and "train clip" in shown  # (captions may be cached)
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i in range(8):  # odd sizes and modes are resized / converted on load
        Image.new("L", (50 + i, 70), 30 * i).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "caption": f"a grey picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    assert (
        train_main(
            [
                "--preset",
                "tiny",
                "--imagefolder",
                str(folder),
                "--out",
                str(tmp_path / "f"),
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    quiet = capsys.readouterr().err
    assert "decode images" not in quiet and "train clip" not in quiet
    assert "check metadata.jsonl" not in quiet  # the records' check (data.validate) too
    for run in ("c", "f"):
        meta = load_checkpoint(tmp_path / run / "final").metadata
        assert meta["data"]["images"] == (32 if run == "c" else 8)


def test_retrieval_on_your_own_captions_against_a_one_by_one_reference(trained, world, tmp_path):
    """eval.clip --imagefolder: every caption is a text->image query whose one positive is its
    own image (a string two images share included: COCO's protocol), every image an image->text
    query with all its captions positive; recalls recomputed here from one-at-a-time encodings
    and a plain rank count. Two rows naming one file are one image with both rows' captions."""
    model, preprocess, tokenizer = load_clip(trained / "final")
    folder = tmp_path / "mine"
    folder.mkdir()
    captions = [["a red thing", "red"], ["a blue thing"], ["shapes", "a green thing"], ["shapes"],
                ["a white thing", "white", "pale"], ["a black thing", "dark"]]  # fmt: skip
    for i, image in enumerate(sorted((world / "train").glob("*.png"))[:6]):
        shutil.copy(image, folder / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "captions": c} for i, c in enumerate(captions)]
    rows[-1]["captions"] = ["a black thing"]
    rows.append({"file_name": "5.png", "caption": "dark"})  # the same file again: merged
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    args = ["--checkpoint", str(trained / "final"), "--imagefolder", str(folder)]
    assert eval_main([*args, "--batch-size", "4", "--no-progress", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert (got["images"], got["captions"]) == (6, 11)

    with torch.no_grad():
        images = [
            model.encode_image(preprocess(Image.open(folder / f"{i}.png").convert("RGB"))[None],
                               normalize=True)[0] for i in range(6)
        ]  # fmt: skip
        texts = [
            (i, model.encode_text(tokenizer([c]), normalize=True)[0])
            for i, caps in enumerate(captions)
            for c in caps
        ]

    def hit(scores, positive, k):  # best positive ranked among the first k, ties pessimistic
        best = max(scores[j] for j in positive)
        rank = sum(s > best or (s == best and j not in positive) for j, s in enumerate(scores))
        return rank < k

    for k in (1, 5, 10):
        if k < 6:
            t2i = [hit([float(t @ im) for im in images], {i}, k) for i, t in texts]
            assert got[f"t2i_r{k}"] == pytest.approx(sum(t2i) / len(t2i), abs=1e-9)
        i2t = []
        for i, im in enumerate(images):
            positive = {j for j, (owner, _) in enumerate(texts) if owner == i}
            i2t.append(hit([float(t @ im) for _, t in texts], positive, k))
        assert got[f"i2t_r{k}"] == pytest.approx(sum(i2t) / len(i2t), abs=1e-9)
    assert "t2i_r10" not in got  # 6 images: no recall@10 over them
    # COCO captions, first 5 images of ShapeWorld's own file; a bad source is said first
    coco = ["--images", str(world / "train"), "--captions-json"]
    coco.append(str(world / "annotations" / "captions_train.json"))
    assert eval_main([*args[:2], *coco, "--limit", "5", "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 5
    with pytest.raises(SystemExit):
        eval_main([*args, *coco])


def test_pick_captions_is_a_function_of_seed_and_step():
    from train.clip import PairData

    data = PairData(
        images=torch.zeros(3, 3, 8, 8, dtype=torch.uint8),
        texts=["a", "b", "c", "d"],
        offsets=np.array([0, 2, 3, 4]),
        text_ids=np.array([0, 1, 2, 3]),
        description={},
    )
    idx = np.array([0, 1, 2, 0])
    first = pick_captions(data, idx, seed=0, step=5)
    assert np.array_equal(first, pick_captions(data, idx, seed=0, step=5))
    assert first[0] in (0, 1) and first[1] == 2 and first[2] == 3
    seen = {int(pick_captions(data, idx[:1], 0, s)[0]) for s in range(50)}
    assert seen == {0, 1}  # both captions of image 0 get drawn


def test_object_captions_read_like_shapeworld():
    assert object_captions("orange", "ellipse") == [
        "An orange ellipse.",
        "There is an ellipse.",
        "There is an orange shape.",
    ]
    assert object_captions("red", "star")[0] == "A red star."


def test_contrastive_loss_hand_computed():
    image = torch.eye(2)
    text = torch.eye(2)
    scale = torch.tensor(1.0)
    # logits = I; distinct captions: CE of [1, 0] towards class 0 = log(1 + e^-1)
    expected = float(np.log(1 + np.exp(-1)))
    loss = contrastive_loss(image, text, scale, torch.tensor([0, 1]))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # the same caption twice: both columns are positives -> target [0.5, 0.5]
    same = contrastive_loss(image, text, scale, torch.tensor([7, 7]))
    assert float(same) == pytest.approx(-np.log(np.e / (np.e + 1)) / 2 - np.log(1 / (np.e + 1)) / 2)


def test_retrieval_recalls_hand_computed():
    emb = torch.eye(4)
    perfect = retrieval_recalls(emb, emb, ["a", "b", "c", "d"])
    assert perfect == {"t2i_r1": 1.0, "i2t_r1": 1.0}  # k=5 > N is left out
    # caption i is closest to image (i + 1) % 4 (and next-closest to its own image)
    text = torch.roll(emb, 1, dims=1) * 0.9 + emb * 0.1
    shifted = retrieval_recalls(emb, text, ["a", "b", "c", "d"])
    assert shifted["t2i_r1"] == 0.0 and shifted["i2t_r1"] == 0.0
    # images 0 and 1 share a caption string: each counts as a positive for the other
    dup = retrieval_recalls(emb, torch.roll(emb, 1, dims=0), ["x", "x", "c", "d"])
    assert dup["t2i_r1"] == pytest.approx(0.25)  # only text 1 (-> image 0, also "x") hits
    many = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    full = retrieval_recalls(many, many, list("abcdef"))
    assert full["t2i_r5"] == 1.0 and full["t2i_r1"] == 1.0


def test_listing_caption_picks_the_full_listing():
    captions = [
        "The shapes are on a plain background.",
        "There is a circle and two stars.",
        "The image shows three shapes: a red circle and two blue stars.",
        "A red circle and two blue stars.",
        "A red circle is left of a blue star.",
    ]
    objects = [("red", "circle"), ("blue", "star"), ("blue", "star")]
    assert listing_caption(captions, objects) == "A red circle and two blue stars."
    assert listing_caption(captions[:2], objects) == "There is a circle and two stars."
    with pytest.raises(ValueError, match="no captions"):
        listing_caption([], objects)


def test_object_crop_masked_and_box():
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    image[10:16, 40:50] = (255, 0, 0)  # a 10 x 6 red object
    image[30:40, 0:10] = (0, 0, 255)  # a neighbour
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:16, 40:50] = True
    crop = np.asarray(object_crop(image, mask, 64, (1, 2, 3)))
    assert crop.shape == (64, 64, 3)
    red = np.all(crop == (255, 0, 0), axis=-1)
    ys, xs = np.nonzero(red)
    assert red.sum() == 60 and (ys.min(), xs.min()) == (29, 27)  # centred, native scale
    assert np.all(crop[~red] == (1, 2, 3))  # everything else is the fill colour
    twice = np.asarray(object_crop(image, mask, 128, (1, 2, 3)))  # the model sees 2x
    assert np.all(twice == (255, 0, 0), axis=-1).sum() == 240
    box = np.asarray(object_crop(image, mask, 32, (1, 2, 3), crop="box"))
    assert box.shape == (32, 32, 3) and (box == (255, 0, 0)).all(-1).any()
    with pytest.raises(ValueError, match="empty"):
        object_crop(image, np.zeros_like(mask), 64, (0, 0, 0))
    with pytest.raises(ValueError, match="crop must be"):
        object_crop(image, mask, 64, (0, 0, 0), crop="zoom")  # type: ignore[arg-type]


def test_format_table_marks_empty_groups():
    results = {
        "split": "val",
        "images": 2,
        "class_acc_seen": 0.5,
        "class_acc_unseen": None,
        "colour_acc_seen": 1.0,
        "colour_acc_unseen": 0.25,
        "objects_seen_class": 4,
        "objects_unseen_class": 0,
        "objects_seen_colour": 3,
        "objects_unseen_colour": 1,
        "t2i_r1": 0.5,
        "i2t_r1": 1.0,
    }
    table = format_table(results)
    assert "| zero-shot class, unseen classes | n/a | 0 |" in table
    assert "| zero-shot class, seen classes | 50.0 | 4 |" in table
    assert "| image->text R@1 | 100.0 | 2 |" in table
