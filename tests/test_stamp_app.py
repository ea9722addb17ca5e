"""STAMP in the demo: "segment ..." with an uploaded scene shows the mask over the image.

The tiny STAMP's <seg> row is biased so that it answers every image turn with <seg>: the test is
about the plumbing from the model's <seg> to a picture in the chat, in a real browser.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import chromium_page, drain_across_threads, serve_demo, sharpened_tiny_vlm
from PIL import Image

import app
from segmentation.stamp import StampConfig
from vlm.assistant import Assistant, Reply, SamplingSettings
from vlm.stamp import StampVLM

pytestmark = pytest.mark.usefixtures("one_thread")
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"


@pytest.fixture(scope="module")
def assistant() -> Assistant:
    vlm = sharpened_tiny_vlm()
    stamp = StampVLM(vlm, StampConfig(mask_merge=2, lora_rank=4)).eval()
    with torch.no_grad():
        stamp.seg_bias.fill_(1e4)
    settings = SamplingSettings(max_new_tokens=2)
    return Assistant(vlm.llm, vlm.tokenizer, vlm=vlm, stamp=stamp, default_settings=settings)


def _scene(path: Path) -> Path:
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
    return path


def test_respond_returns_masks_on_the_last_image_and_chat_stays_text(assistant, tmp_path):
    image = _scene(tmp_path / "scene.png")
    replies = list(assistant.respond([], "Segment the largest red shape.", images=[image]))
    last = replies[-1]
    assert last.text == "[mask 1][mask 2]"  # two <seg> in two tokens, each marked in the text
    assert len(last.masks) == 2 and last.masks[0].shape == (64, 80)
    assert last.mask_image == image
    text_only = list(assistant.respond([], "hello"))[-1]
    assert text_only.masks == [] and text_only.mask_image is None
    assert list(assistant.chat([], "Segment it.", images=[image]))[-1] == last.text


def test_a_reply_resumed_on_other_threads_is_the_same(assistant, tmp_path):
    """Gradio resumes the streamed reply on any free worker thread; the reply must not depend
    on the thread (inference mode held across its yields broke the mask pass there)."""
    image = _scene(tmp_path / "scene.png")
    one = list(assistant.respond([], "Segment the largest red shape.", images=[image]))
    moved = drain_across_threads(
        assistant.respond([], "Segment the largest red shape.", images=[image])
    )
    assert [r.text for r in moved] == [r.text for r in one]
    for a, b in zip(moved[-1].masks, one[-1].masks, strict=True):
        np.testing.assert_array_equal(a, b)
    stream = drain_across_threads(
        assistant.stamp.stream(
            [{"role": "user", "content": "Segment it.", "images": [Image.open(image)]}],
            max_new_tokens=2,
        )
    )
    assert any(mask is not None for _, mask in stream)
    assert not torch.is_inference_mode_enabled()


def test_masks_are_painted_over_the_image_with_a_legend(tmp_path):
    image = _scene(tmp_path / "scene.png")
    mask = np.zeros((64, 80), bool)
    mask[30:50, 40:70] = True
    out = app.reply_messages(Reply("[mask 1]", [mask], image))
    assert out[0] == "[mask 1]"
    painted = np.asarray(
        out[1].value if not isinstance(out[1].value, dict) else Image.open(out[1].value["path"])
    )
    original = np.asarray(Image.open(image))
    assert painted.shape == original.shape
    assert (painted[mask] != original[mask]).any(axis=-1).all()  # every mask pixel recoloured
    below_legend = np.zeros_like(mask)
    below_legend[20:] = True
    untouched = ~mask & below_legend
    assert (painted[untouched] == original[untouched]).all()
    assert app.reply_messages(Reply("plain")) == "plain"


def test_segment_request_in_the_browser_shows_the_mask(assistant, tmp_path):
    image = _scene(tmp_path / "scene.png")
    SHOTS.mkdir(parents=True, exist_ok=True)
    for url in serve_demo(assistant):
        for page in chromium_page(url):
            page.locator("input[type=file]").first.set_input_files([str(image)])
            page.wait_for_timeout(500)
            box = page.locator("textarea").first
            box.fill("Segment the largest red shape.")
            box.press("Enter")
            bot = page.locator("[data-testid='bot']")
            for _ in range(240):
                if (
                    bot.count()
                    and "[mask 1]" in " ".join(bot.all_inner_texts())
                    and (page.locator("[data-testid='bot'] img").count() >= 1)
                ):
                    break
                page.wait_for_timeout(250)
            page.screenshot(path=str(SHOTS / "10-stamp-mask.png"), full_page=True)
            assert "[mask 1]" in " ".join(bot.all_inner_texts())
            assert page.locator("[data-testid='bot'] img").count() >= 1
