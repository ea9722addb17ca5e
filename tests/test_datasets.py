from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data.datasets import CaptionDataset, InstanceDataset
from data.formats import FormatError
from data.render import LayoutConfig
from data.shapeworld import ShapeWorldConfig, SplitSizes, generate, generate_scene


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "sw"
    cfg = ShapeWorldConfig(
        seed=1, layout=LayoutConfig(image_size=48), splits=SplitSizes(train=4, val=3, test=0)
    )
    generate(root, cfg, workers=1, progress=False)
    return root, cfg


def test_instance_dataset_gives_back_the_generated_objects(world):
    root, cfg = world
    ds = InstanceDataset.from_shapeworld(root, "val")
    assert len(ds) == 3
    assert ds.unseen == {"heart", "crescent", "trapezoid"}
    for i in range(3):
        scene = generate_scene(cfg.layout, cfg.seed, "val", i)
        item = ds[i]
        assert np.array_equal(np.asarray(item.image), scene.image)
        assert [x.category for x in item.instances] == [o.shape for o in scene.objects]
        assert [x.attributes["colour"] for x in item.instances] == [o.colour for o in scene.objects]
        for x, o in zip(item.instances, scene.objects, strict=True):
            assert np.array_equal(x.mask, o.mask)


def test_caption_dataset_from_coco_and_imagefolder(world, tmp_path):
    root, cfg = world
    ds = CaptionDataset.from_shapeworld(root, "train")
    assert len(ds) == 4
    image, captions = ds[2]
    assert captions == generate_scene(cfg.layout, cfg.seed, "train", 2).captions
    assert image.size == (48, 48)
    # A user's imagefolder with "caption" strings.
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (8, 6)).save(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "caption": "a red square"})
        + "\n"
        + json.dumps({"file_name": "b.png", "captions": ["black", "dark"]})
        + "\n"
    )
    user = CaptionDataset.from_imagefolder(tmp_path)
    assert user.captions == [["a red square"], ["black", "dark"]]
    assert user[1][0].mode == "RGB"
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "caption": ""}) + "\n"
    )
    with pytest.raises(FormatError, match=r"metadata.jsonl: line 1: 'caption' must be a non-empty"):
        CaptionDataset.from_imagefolder(tmp_path)


def test_every_imagefolder_reader_takes_the_same_caption_keys(tmp_path):
    """ "captions", "caption" and Hugging Face's "text" mean the same to the caption datasets,
    the chat records (train.vlm, eval.vlm) and data.validate: a folder train.clip accepts is one
    train.vlm accepts (train.vlm used to refuse "text" rows as having no text)."""
    from data.conversations import read_chat_records
    from data.validate import check_imagefolder

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    rows = [
        {"file_name": "a.png", "text": "a red square"},
        {"file_name": "b.png", "caption": "a blue star"},
        {"file_name": "c.png", "captions": ["two hearts", "hearts"]},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = [["a red square"], ["a blue star"], ["two hearts", "hearts"]]
    assert CaptionDataset.from_imagefolder(tmp_path).captions == expected
    assert [r.captions for r in read_chat_records(tmp_path)] == expected
    for kind in ("captions", "chat"):
        assert check_imagefolder(tmp_path, kind, progress=False).bad == []
    # a row with only a question has no caption: fine for chat, a bad record for captions
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "qa": [{"question": "q?", "answer": "a"}]}) + "\n"
    )
    assert read_chat_records(tmp_path)[0].captions == []
    assert check_imagefolder(tmp_path, "chat", progress=False).bad == []
    bad = check_imagefolder(tmp_path, "captions", progress=False).bad
    assert len(bad) == 1 and "expected 'captions' or 'caption' or 'text'" in bad[0].problem


def test_annotation_files_name_every_image_they_cannot_use_up_front(world, tmp_path):
    """COCO instances, refs and captions files are checked before a run reaches an image: a
    missing file, one that does not open, and one of another size than the file says (masks
    would be decoded at the wrong size: STAMP trained on them silently) are all listed."""
    from data.datasets import ReferringDataset, check_images

    root, _ = world
    images = root / "val"
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    names = [im["file_name"] for im in coco["images"]]
    mine = tmp_path / "images"
    mine.mkdir()
    for name in names:
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_bytes((images / name).read_bytes())
    (mine / names[0]).unlink()  # missing
    (mine / names[1]).write_text("not an image")  # does not open
    Image.new("RGB", (50, 48)).save(mine / names[2])  # 2 px wider than the file says
    with pytest.raises(FormatError) as err:
        InstanceDataset.from_coco(mine, root / "annotations" / "instances_val.json")
    text = str(err.value)
    assert "3 of 3 images cannot be used" in text
    assert "file not found" in text and "not an image file" in text
    assert "50x48 pixels, the file says 48x48" in text
    refs = root / "annotations" / "refs_val.json"
    instances = root / "annotations" / "instances_val.json"
    assert len(ReferringDataset.from_refcoco(images, refs, instances))  # the generated data passes
    with pytest.raises(FormatError, match="3 of 3 images"):
        ReferringDataset.from_refcoco(mine, refs, root / "annotations" / "instances_val.json")
    captions = root / "annotations" / "captions_val.json"
    with pytest.raises(FormatError, match="2 of 3 images"):  # sizes are not a captions matter
        CaptionDataset.from_coco(mine, captions)
    # the list stops at ten, with the count of the rest
    many = [(tmp_path / f"gone{i}.png", None) for i in range(13)]
    with pytest.raises(FormatError, match=r"13 of 13 images[\s\S]*and 3 more") as err:
        check_images(many, "x.json")
    assert str(err.value).count("file not found") == 10


def test_missing_split_says_how_to_generate(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m data\.shapeworld generate"):
        InstanceDataset.from_shapeworld(tmp_path, "val")


def test_referring_dataset_reads_one_split_and_checks_refs_against_their_annotations(
    world, tmp_path
):
    """A RefCOCO refs file holds every split: --split picks its refs (it read them all), and a
    ref whose image_id or category_id is not its annotation's is refused by field, not read."""
    from data.datasets import ReferringDataset
    from data.formats import read_coco_instances

    root, _ = world
    refs = json.loads((root / "annotations" / "refs_val.json").read_text())
    for k, ref in enumerate(refs):
        ref["split"] = "val" if k % 2 == 0 else "testA"
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    instances = root / "annotations" / "instances_val.json"
    args = (root / "val", tmp_path / "refs.json", instances)
    anns = {a.id: a for a in read_coco_instances(instances).annotations}
    for split in ("val", "testA", None):
        mine = [r for r in refs if split is None or r["split"] == split]
        data = ReferringDataset.from_refcoco(*args, split)
        assert [(it[1], it[2].id) for it in data.items] == [
            (s["raw"], r["ann_id"]) for r in mine for s in r["sentences"]
        ]
        assert all(it[2] == anns[it[2].id] for it in data.items)
    with pytest.raises(ValueError, match=r"no refs of split 'test'; splits: \['testA', 'val'\]"):
        ReferringDataset.from_refcoco(*args, "test")
    other = next(a.image_id for a in anns.values() if a.image_id != refs[0]["image_id"])
    refs[0]["image_id"] = other  # points at another image than its annotation's
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    with pytest.raises(FormatError, match=r"refs\[0\] \(ref_id=\d+\): field 'image_id'"):
        ReferringDataset.from_refcoco(*args, "val")
