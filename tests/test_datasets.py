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
    with pytest.raises(FormatError, match=r"metadata.jsonl: line 1: expected non-empty 'captions'"):
        CaptionDataset.from_imagefolder(tmp_path)


def test_missing_split_says_how_to_generate(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m data\.shapeworld generate"):
        InstanceDataset.from_shapeworld(tmp_path, "val")
