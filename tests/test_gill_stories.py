"""ShapeWorld stories (data/stories.py) and GILL's contextual-generation evaluation on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.datasets import InstanceDataset
from data.scene import COLOURS
from data.stories import CONTEXT_PANELS, last_caption, make_stories
from eval.gill_stories import bootstrap_interval
from vlm.gill import story_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(stories_world) -> Path:
    return stories_world


def test_each_panel_shows_an_object_of_the_target_and_the_last_caption_names_no_colour(world):
    stories = make_stories(world, "val", n=10, seed=0)
    assert stories and stories == make_stories(world, "val", n=10, seed=0)
    inst = InstanceDataset.from_shapeworld(world, "val")
    by_path = {
        inst.images_root / name: {
            (str(a.extra.get("colour")), inst.category_names[a.category_id]) for a in anns
        }
        for name, anns in zip(inst.file_names, inst.annotations, strict=True)
    }
    for story in stories:
        assert set(story.objects) == by_path[story.target] and 1 <= len(story.objects) <= 2
        assert len(story.context) == CONTEXT_PANELS
        for k, (image, caption) in enumerate(story.context):
            assert image != story.target
            wanted = story.objects[k % len(story.objects)]  # two objects: alternating panels
            assert wanted in by_path[image]
            assert f"{wanted[0]} {wanted[1]}" in caption.lower()
        words = set(story.last.lower().rstrip(".").split())
        assert not words & set(COLOURS)  # the colours are in the context only
        assert all(shape in story.last for _, shape in story.objects)
    assert last_caption((("red", "circle"), ("blue", "star"))) == "The circle and the star again."


def test_the_contextual_request_holds_every_panel_then_the_fifth_caption(world):
    story = make_stories(world, "val", n=1)[0]
    turns = story_prompt(story)
    assert [t["role"] for t in turns] == ["user", "assistant"] * CONTEXT_PANELS + ["user"]
    assert [t["images"][0] for t in turns[:-1:2]] == [p for p, _ in story.context]
    assert [t["content"] for t in turns[1::2]] == [c for _, c in story.context]
    assert story.last in turns[-1]["content"] and "images" not in turns[-1]


def test_bootstrap_interval_of_paired_differences():
    assert bootstrap_interval([0.2] * 10) == pytest.approx((0.2, 0.2))
    low, high = bootstrap_interval(list(np.linspace(-1, 1, 41)))
    assert low < 0 < high  # centred on zero: the interval holds it
    values = [0.5 + 0.01 * i for i in range(30)]  # mean 0.645, standard error ~0.016
    low, high = bootstrap_interval(values)
    assert low < 0.645 < high and 0.04 < high - low < 0.08  # ~ mean +- 1.96 standard errors
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_interval([1.0])


def test_evaluation_runs_end_to_end_on_a_tiny_gill(world, tmp_path):
    from eval.gill_stories import main as stories_main
    from train.gill import main as gill_main

    gill = [
        "--preset", "tiny", "--data", str(world), "--split", "val", "--out", str(tmp_path / "g"),
        "--steps", "1", "--batch-size", "2", "--compositions", "1", "--caption-batch", "1",
        "--negatives", "1", "--mapper-width", "32", "--mapper-layers", "1",
        "--retrieval-dim", "16", "--no-progress",
    ]  # fmt: skip
    assert gill_main(gill) == 0
    out = tmp_path / "stories.json"
    args = [
        "--checkpoint", str(tmp_path / "g" / "final"), "--preset", "tiny", "--data", str(world),
        "--stories", "3", "--steps", "1", "--json", str(out), "--grid", str(tmp_path / "g.png"),
        "--no-progress",
    ]  # fmt: skip
    assert stories_main(args) == 0
    r = json.loads(out.read_text())
    assert r["stories"] == 3 and set(r["methods"]) == {
        "gill_context", "gill_caption", "decoder_caption", "decoder_full"
    }  # fmt: skip
    for m in r["methods"].values():
        assert -1.0 <= m["clip_image_similarity"] <= 1.0 and 0.0 <= m["judge_accuracy"] <= 1.0
    d = r["gill_context_minus_decoder_caption"]
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert (tmp_path / "g.png").is_file()
