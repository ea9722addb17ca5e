"""ShapeWorld generation, export and read-back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data import shapeworld
from data.formats import read_coco_captions, read_coco_instances, rle_to_mask
from data.render import LayoutConfig, shape_mask
from data.scene import SHAPES, UNSEEN_COLOURS, UNSEEN_SHAPES, class_id
from data.shapeworld import (
    ShapeWorldConfig,
    SplitSizes,
    generate,
    generate_scene,
    read_manifest,
    read_split,
    split_stats,
)

LAYOUT = LayoutConfig(image_size=64)
SMALL = ShapeWorldConfig(seed=3, layout=LAYOUT, splits=SplitSizes(train=6, val=5, test=3))


def _assert_same_scene(a, b):
    assert np.array_equal(a.image, b.image)
    assert a.background == b.background
    assert len(a.objects) == len(b.objects)
    for x, y in zip(a.objects, b.objects, strict=True):
        assert (x.shape, x.colour, x.rgb, x.full_area) == (y.shape, y.colour, y.rgb, y.full_area)
        assert np.array_equal(x.mask, y.mask)
        assert x.center == pytest.approx(y.center)
        assert (x.size, x.rotation) == pytest.approx((y.size, y.rotation))
    assert a.captions == b.captions
    assert a.refs == b.refs
    assert a.qa == b.qa
    assert a.dialogues == b.dialogues


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw") / "shapeworld"
    generate(root, SMALL, workers=1, progress=False)
    return root


def test_scenes_are_deterministic_and_distinct():
    a = generate_scene(LAYOUT, 0, "val", 7)
    _assert_same_scene(a, generate_scene(LAYOUT, 0, "val", 7))
    assert not np.array_equal(a.image, generate_scene(LAYOUT, 0, "val", 8).image)
    assert not np.array_equal(a.image, generate_scene(LAYOUT, 1, "val", 7).image)
    assert not np.array_equal(a.image, generate_scene(LAYOUT, 0, "test", 7).image)


def test_masks_agree_with_pixels_and_geometry():
    """Independent checks of the renderer: visible masks are disjoint, painted with the object's
    colour, cover the semantic map, and full areas match the shape redrawn on its own."""
    for index in range(40):
        scene = generate_scene(LayoutConfig(), 0, "val", index)
        h, w = scene.height, scene.width
        assert 2 <= len(scene.objects) <= 7
        cover = np.zeros((h, w), dtype=int)
        for obj in scene.objects:
            assert obj.area > 0
            cover += obj.mask
            assert (scene.image[obj.mask] == np.array(obj.rgb, dtype=np.uint8)).all()
            full = shape_mask(obj.shape, obj.center, obj.size, obj.rotation, h, w)
            assert int(full.sum()) == obj.full_area
            assert not (obj.mask & ~full).any()  # visible part lies inside the full shape
            assert 0.0 <= obj.occlusion <= 0.6 + 1e-9
        assert cover.max() <= 1
        sem = scene.semantic_map()
        assert np.array_equal(sem > 0, cover > 0)
        for obj in scene.objects:
            assert (sem[obj.mask] == class_id(obj.shape)).all()


def test_train_never_sees_unseen_classes_or_colours():
    train = [generate_scene(LAYOUT, 0, "train", i) for i in range(80)]
    val = [generate_scene(LAYOUT, 0, "val", i) for i in range(80)]
    train_vocab = {(o.shape, o.colour) for s in train for o in s.objects}
    assert not {s for s, _ in train_vocab} & set(UNSEEN_SHAPES)
    assert not {c for _, c in train_vocab} & set(UNSEEN_COLOURS)
    for s in train:
        text = " ".join(s.captions + [r.text for r in s.refs] + [q.question for q in s.qa])
        assert not any(u in text.split() for u in UNSEEN_SHAPES + UNSEEN_COLOURS), text
    val_vocab = {(o.shape, o.colour) for s in val for o in s.objects}
    assert {s for s, _ in val_vocab} & set(UNSEEN_SHAPES)
    assert {c for _, c in val_vocab} & set(UNSEEN_COLOURS)


@pytest.mark.parametrize("size", [16, 33, 300, 512])
def test_any_image_size_up_to_512(size):
    scene = generate_scene(LayoutConfig(image_size=size), 0, "val", 1)
    assert scene.image.shape == (size, size, 3)
    assert all(o.mask.shape == (size, size) for o in scene.objects)


def test_bad_layout_values_are_rejected():
    with pytest.raises(ValueError, match=r"image_size must be in \[16, 512\], received 513"):
        LayoutConfig(image_size=513)
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        LayoutConfig(min_objects=5, max_objects=3)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        generate_scene(LAYOUT, 0, "dev", 0)


def test_export_round_trip_is_exact(exported):
    manifest = shapeworld.read_manifest(exported)
    assert manifest["splits"] == {"train": 6, "val": 5, "test": 3}
    assert [s["name"] for s in manifest["shapes"]] == list(SHAPES)
    for split, n in manifest["splits"].items():
        scenes = read_split(exported, split)
        assert len(scenes) == n
        for index, scene in enumerate(scenes):
            _assert_same_scene(generate_scene(LAYOUT, SMALL.seed, split, index), scene)


def test_exported_files_follow_the_standard_formats(exported):
    """What a COCO / imagefolder user reads: instance masks decode to the semantic map, categories
    flag the unseen classes, captions and metadata rows line up with the images."""
    from PIL import Image

    coco = read_coco_instances(exported / "annotations" / "instances_val.json")
    unseen = {c.name for c in coco.categories if c.extra["unseen"]}
    assert unseen == set(UNSEEN_SHAPES)
    for image in coco.images:
        sem = np.asarray(Image.open(exported / "semantic" / "val" / image.file_name))
        rebuilt = np.zeros_like(sem)
        for ann in coco.annotations:
            if ann.image_id == image.id:
                rebuilt[rle_to_mask(ann.segmentation, image.height, image.width)] = ann.category_id
        assert np.array_equal(sem, rebuilt)
    caps = read_coco_captions(exported / "annotations" / "captions_val.json")
    assert {c.image_id for c in caps.captions} == {im.id for im in coco.images}
    rows = [
        json.loads(line) for line in (exported / "val" / "metadata.jsonl").read_text().splitlines()
    ]
    assert [r["file_name"] for r in rows] == [im.file_name for im in coco.images]
    assert all(len(r["captions"]) >= 3 for r in rows)


def test_worker_count_does_not_change_the_output(tmp_path, exported):
    other = tmp_path / "two_workers"
    generate(other, SMALL, workers=2, progress=False)
    for path in sorted(p for p in exported.rglob("*") if p.is_file()):
        assert (other / path.relative_to(exported)).read_bytes() == path.read_bytes(), path


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapeworld, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "out", SMALL, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_stats_match_a_direct_count(exported):
    stats = split_stats(exported, "val")
    scenes = read_split(exported, "val")
    occluded = np.mean([any(o.occlusion >= 0.3 for o in s.objects) for s in scenes])
    assert stats["images_with_object_occluded_30pct"] == pytest.approx(occluded)
    counts = [len(s.objects) for s in scenes]
    assert stats["objects_per_image"]["mean"] == pytest.approx(np.mean(counts))
    refs = [r for s in scenes for r in s.refs]
    assert stats["refs_with_distractor"] == pytest.approx(np.mean([r.has_distractor for r in refs]))
    assert {t["name"] for t in stats["targets"]} >= {"images with an object >= 30% occluded"}


def test_cli_generate_stats_preview(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["generate", "--out", str(out), "--train", "3", "--val", "2", "--test", "0"]
    assert shapeworld.main([*argv, "--image-size", "48", "--workers", "1"]) == 0
    with pytest.raises(SystemExit):
        shapeworld.main(argv)  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    code = shapeworld.main(["stats", str(out), "--json", str(tmp_path / "s.json")])
    report = capsys.readouterr().out
    assert "| images with an object >= 30% occluded |" in report
    stats = json.loads((tmp_path / "s.json").read_text())
    assert [s["split"] for s in stats] == ["train", "val"]
    assert code == (0 if all(t["ok"] for s in stats for t in s["targets"]) else 1)
    assert (
        shapeworld.main(["preview", str(out), "--split", "val", "--out", str(tmp_path / "p.png")])
        == 0
    )
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(SystemExit) as err:
        shapeworld.main(["--help"])
    assert err.value.code == 0


def test_cli_generate_like_adds_splits_with_the_folders_layout(tmp_path, capsys):
    """--like: the seed and layout of a folder (here one- or two-object scenes, as the diffusion
    data), other split sizes; where the splits overlap the images are the folder's own."""
    cfg = ShapeWorldConfig(
        seed=3,
        layout=LayoutConfig(image_size=48, min_objects=1, max_objects=2),
        splits=SplitSizes(train=0, val=2, test=0, pretrain=0),
    )
    src = tmp_path / "src"
    generate(src, cfg, workers=1, progress=False)
    out = tmp_path / "like"
    argv = ["generate", "--out", str(out), "--like", str(src), "--train", "0", "--val", "2"]
    assert shapeworld.main([*argv, "--test", "6", "--workers", "1"]) == 0
    made = read_manifest(out)["config"]
    assert made["seed"] == 3 and made["layout"] == cfg.layout.to_dict()
    assert made["splits"]["test"] == 6
    for a, b in zip(read_split(src, "val"), read_split(out, "val"), strict=True):
        _assert_same_scene(a, b)
    assert all(1 <= len(sc.objects) <= 2 for sc in read_split(out, "test"))
    with pytest.raises(SystemExit):
        shapeworld.main([*argv, "--out", str(tmp_path / "x"), "--seed", "1"])
    assert "--like takes the seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shapeworld.main([*argv, "--out", str(tmp_path / "y"), "--like", str(tmp_path / "none")])
    assert "not found" in capsys.readouterr().err


def test_stats_targets_hold_on_a_realistic_split(tmp_path):
    """The difficulty targets of the issue, on 300 default-size images per split."""
    cfg = ShapeWorldConfig(seed=0, splits=SplitSizes(train=300, val=300, test=0))
    generate(tmp_path / "sw", cfg, workers=2, progress=False)
    for split in ("train", "val"):
        failed = [t for t in split_stats(tmp_path / "sw", split)["targets"] if not t["ok"]]
        assert not failed, failed


def test_cli_generate_from_a_preset_takes_its_data_entry(tmp_path, capsys):
    """--preset: the preset's scenes (or with --entry diffusion its decoder's pictures), as the
    models built from that preset read them; split sizes given on the command replace its own."""
    from vlm.config import PolychromeConfig

    for name in ("tiny", "shapes"):
        built = PolychromeConfig.from_preset(name)
        assert shapeworld.preset_data_config(name) == built.shapeworld
        assert shapeworld.preset_data_config(name, "diffusion") == built.diffusion.data
    out = tmp_path / "pictures"
    argv = ["generate", "--out", str(out), "--preset", "tiny", "--entry", "diffusion"]
    assert shapeworld.main([*argv, "--pretrain", "2", "--workers", "1"]) == 0
    made = read_manifest(out)["config"]
    want = PolychromeConfig.from_preset("tiny").diffusion.data
    assert made["seed"] == want.seed and made["layout"] == want.layout.to_dict()
    assert made["splits"] == {**want.splits.to_dict(), "pretrain": 2}  # val 8 from the preset
    assert all(1 <= len(sc.objects) <= 2 for sc in read_split(out, "val"))
    for bad, says in (
        (["--seed", "1"], "--preset takes the seed"),
        (["--like", str(out)], "give one of --preset and --like"),
    ):
        with pytest.raises(SystemExit):
            shapeworld.main([*argv, "--out", str(tmp_path / "x"), *bad])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shapeworld.main(["generate", "--out", str(tmp_path / "y"), "--entry", "diffusion"])
    assert "--entry diffusion needs --preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shapeworld.main(["generate", "--out", str(tmp_path / "z"), "--preset", "nope"])
    assert "unknown preset 'nope'" in capsys.readouterr().err
