"""The tools beside the chat (vlm.tools) and their tabs: library, API (gradio_client), browser.

The tools run on the shapes preset's committed CLIP and SAM (small; their own regression tests
are in test_checkpoints.py), so that there are masks to check; the chat beside them is the
sharpened tiny VLM.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import chromium_page, serve_demo, sharpened_tiny_vlm
from PIL import Image
from playwright.sync_api import expect
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

import app
from segmentation.open_vocab import OpenVocabSegmenter
from vision.sam import AMG_SETTINGS
from vlm.assistant import Assistant, SamplingSettings
from vlm.config import PolychromeConfig
from vlm.examples import example_images
from vlm.tools import MAX_VOCABULARY, VisionTools, scaled_rle

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPES = PolychromeConfig.from_preset("shapes")
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
VOCABULARY = "circle, square, triangle, star, hexagon, diamond"


@pytest.fixture(scope="module")
def tools() -> VisionTools:
    return VisionTools.from_config(SHAPES)


@pytest.fixture(scope="module")
def scene() -> Path:
    return example_images(SHAPES.shapeworld)["shapes-1"]


def test_segment_everything_is_sams_automatic_masks_and_the_json_decodes_to_them(tools, scene):
    result = tools.segment_everything(scene)
    rgb = np.asarray(Image.open(scene).convert("RGB"))
    direct = SamAutomaticMaskGenerator(tools.generator.predictor.model, **AMG_SETTINGS)
    expected = sorted((r["segmentation"] for r in direct.generate(rgb)), key=lambda m: -m.sum())
    assert len(result.segments) == len(expected) >= 3
    for seg, mask in zip(result.segments, expected, strict=True):
        assert np.array_equal(seg["mask"], mask)
    coco = result.coco_json()
    assert (coco["width"], coco["height"]) == (rgb.shape[1], rgb.shape[0])
    for seg, out in zip(result.segments, json.loads(json.dumps(coco))["segments"], strict=True):
        rle = {"size": out["segmentation"]["size"], "counts": out["segmentation"]["counts"]}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), seg["mask"])
        assert out["area"] == int(seg["mask"].sum()) == int(mask_utils.area(rle))
        x, y, w, h = out["bbox"]
        assert seg["mask"][y : y + h, x : x + w].sum() == out["area"]
    assert result.summary == f"{len(expected)} masks found"
    assert result.painted.size == (rgb.shape[1], rgb.shape[0])


def test_a_large_image_is_segmented_at_the_tools_size(tools, scene, tmp_path, monkeypatch):
    """An image larger than TOOL_MAX_SIDE (1024) is segmented as the same picture at that size:
    SAM's automatic generator upsamples each candidate mask to the image, so its memory grows
    with the pixels; its masks come from a 64 x 64 logit grid at any size. (Checked here at a
    limit of 256, on a 512 x 384 upload, to take seconds.)"""
    import vlm.tools

    assert vlm.tools.TOOL_MAX_SIDE == 1024
    monkeypatch.setattr(vlm.tools, "TOOL_MAX_SIDE", 256)
    big = Image.open(scene).convert("RGB").resize((512, 384), Image.Resampling.NEAREST)
    big.save(tmp_path / "big.png")
    result = tools.segment_everything(tmp_path / "big.png")
    assert result.painted.size == (256, 192)
    small = np.asarray(big.resize((256, 192), Image.Resampling.LANCZOS))
    direct = SamAutomaticMaskGenerator(tools.generator.predictor.model, **AMG_SETTINGS)
    expected = sorted((r["segmentation"] for r in direct.generate(small)), key=lambda m: -m.sum())
    assert len(result.segments) == len(expected) >= 3
    assert all(np.array_equal(a["mask"], b) for a, b in zip(result.segments, expected, strict=True))
    # the JSON lies on the upload (512 x 384): each mask scaled up 2x, its box and area with it
    coco = result.coco_json()
    assert (coco["width"], coco["height"]) == (512, 384)
    for seg, out in zip(result.segments, coco["segments"], strict=True):
        mask = mask_utils.decode(out["segmentation"]).astype(bool)
        assert np.array_equal(mask, seg["mask"].repeat(2, axis=0).repeat(2, axis=1))
        assert out["area"] == 4 * seg["area"]
        x, y, w, h = seg["bbox"]
        assert out["bbox"] == [2 * x, 2 * y, 2 * w, 2 * h]


def test_scaled_rle_is_the_scaled_mask_encoded():
    """scaled_rle (runs scaled, no large mask) decodes to the mask scaled by nearest neighbour,
    read off a plain index map, at integer and uneven factors, shrinking and unchanged."""
    rng = np.random.default_rng(0)
    for h, w, height, width in [(7, 5, 7, 5), (7, 5, 14, 10), (7, 5, 23, 11), (9, 13, 5, 6),
                                (40, 30, 101, 77)]:  # fmt: skip
        rows = ((np.arange(height) + 0.5) * h / height).astype(int)
        cols = ((np.arange(width) + 0.5) * w / width).astype(int)
        for density in (0.0, 0.3, 0.7, 1.0):
            mask = rng.random((h, w)) < density
            rle = scaled_rle(mask, width, height)
            assert rle["size"] == [height, width]
            assert np.array_equal(mask_utils.decode(rle).astype(bool), mask[rows][:, cols])


def test_segment_vocabulary_is_the_open_vocabulary_segmenter(tools, scene):
    words = [w.strip() for w in VOCABULARY.split(",")]
    rgb = np.asarray(Image.open(scene).convert("RGB"))
    masks = np.stack(
        sorted(
            (r["segmentation"] for r in tools.generator.generate(rgb)), key=lambda m: -int(m.sum())
        )
    )
    for classifier in tools.classifiers:
        result = tools.segment_vocabulary(scene, VOCABULARY, classifier)
        direct = tools._segmenters[classifier].segment(rgb, words, masks=masks)
        assert isinstance(tools._segmenters[classifier], OpenVocabSegmenter)
        found = [words[c - 1] for c in sorted(set(np.unique(direct.semantic).tolist()) - {0})]
        assert result.summary == "found: " + ", ".join(found), classifier
        assert [s["label"] for s in result.segments] == [words[i.label] for i in direct.instances]
    assert tools.classifiers == ["crops", "adapter", "pooling"]


def test_tools_refuse_bad_input_clearly(tools, scene, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        tools.segment_vocabulary(scene, " , ,")
    with pytest.raises(ValueError, match=f"at most {MAX_VOCABULARY}"):
        tools.segment_vocabulary(scene, ",".join(f"thing {i}" for i in range(MAX_VOCABULARY + 1)))
    with pytest.raises(ValueError, match="classifier must be one of"):
        tools.segment_vocabulary(scene, "circle", "nope")
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match=r"fake\.png"):
        tools.segment_everything(fake)


@pytest.fixture(scope="module")
def server(tools):
    vlm = sharpened_tiny_vlm()
    assistant = Assistant(
        vlm.llm, vlm.tokenizer, vlm=vlm, default_settings=SamplingSettings(max_new_tokens=4)
    )
    for url in serve_demo(assistant, tools):
        yield assistant, url


def test_tools_through_the_api(server, tools, scene, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server[1], verbose=False)
    image, summary, masks = client.predict(handle_file(str(scene)), api_name="/segment_everything")
    expected = tools.segment_everything(scene)
    assert summary == expected.summary
    saved = json.loads(Path(masks).read_text())
    assert [s["area"] for s in saved["segments"]] == [s["area"] for s in expected.segments]
    assert Image.open(image).size == expected.painted.size
    image, summary, masks = client.predict(
        handle_file(str(scene)), VOCABULARY, "crops", api_name="/segment_vocabulary"
    )
    assert summary == tools.segment_vocabulary(scene, VOCABULARY, "crops").summary
    # bad input: a message in the summary, no picture, and the server goes on serving
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    image, summary, masks = client.predict(handle_file(str(fake)), api_name="/segment_everything")
    assert image is None and masks is None and summary.startswith(app.WARNING)
    assert "fake.png" in summary and "/tmp/gradio" not in summary
    _, summary, _ = client.predict(
        handle_file(str(scene)), "", "crops", api_name="/segment_vocabulary"
    )
    assert summary.startswith(app.WARNING) and "empty" in summary
    assert client.predict(handle_file(str(scene)), api_name="/segment_everything")[1] == (
        expected.summary
    )


def _draw(page, canvas) -> None:
    """A stroke through the middle of the drawing area (centred in the canvas element)."""
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2 - 60, box["y"] + box["height"] / 2 - 30
    page.mouse.move(x, y)
    page.mouse.down()
    for k in range(1, 20):
        page.mouse.move(x + 6 * k, y + 3 * k)
    page.mouse.up()


def test_every_tab_in_the_browser(server, tools, scene, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    for page in chromium_page(server[1]):
        page.get_by_role("tab", name="Segment everything").click()
        page.locator("input[type=file]").nth(1).set_input_files([str(scene)])
        page.get_by_role("button", name="Segment everything").click()
        expected = tools.segment_everything(scene).summary
        page.get_by_text(expected).wait_for(timeout=60_000)
        page.locator("a[download]").first.wait_for(timeout=30_000)  # the JSON to download
        page.screenshot(path=str(SHOTS / "20-segment-everything.png"))

        page.get_by_role("tab", name="Open-vocabulary segmentation").click()
        page.locator("input[type=file]").nth(2).set_input_files([str(scene)])
        page.get_by_label("Vocabulary").fill(VOCABULARY)
        page.get_by_role("button", name="Segment", exact=True).click()
        found = tools.segment_vocabulary(scene, VOCABULARY).summary
        page.get_by_text(found).wait_for(timeout=60_000)
        page.screenshot(path=str(SHOTS / "21-open-vocabulary.png"))

        page.get_by_role("tab", name="Sketch").click()
        page.get_by_role("button", name="Brush").click()
        canvas = page.locator("canvas").first
        canvas.wait_for(timeout=30_000)
        _draw(page, canvas)
        page.get_by_label("Question about the sketch").fill("What did I draw?")
        page.screenshot(path=str(SHOTS / "22-sketch.png"))
        page.get_by_role("button", name="Send to chat").click()
        # the Chat tab opens with the drawing attached and the question typed
        box = page.locator("textarea").first
        box.wait_for(state="visible", timeout=30_000)
        # the chat box itself holds the question (any textarea did: the sketch's own box too)
        expect(box).to_have_value(re.compile("draw"), timeout=30_000)
        box.press("Enter")
        page.locator("[data-testid='bot']").first.wait_for(timeout=60_000)
        page.locator("[data-testid='user'] img").first.wait_for(timeout=30_000)
        page.screenshot(path=str(SHOTS / "23-sketch-in-chat.png"))
