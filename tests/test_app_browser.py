"""The demo as a person uses it: a real server, driven in headless Chromium with Playwright.

Needs a Chromium binary: Debian's ``chromium`` (installed by .ci/run), or set
POLYCHROME_CHROMIUM to another Chromium/Chrome executable. Screenshots of each step are kept in
artifacts/screenshots/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import chromium_page
from PIL import Image

import app
from vlm.assistant import SamplingSettings

pytestmark = pytest.mark.usefixtures("one_thread")
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
SETTINGS = SamplingSettings(max_new_tokens=8)  # greedy


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def page(server):
    yield from chromium_page(server[1])


def _bot_messages(page) -> list[str]:
    return page.locator("[data-testid='bot']").all_inner_texts()


def _send(page, text: str, files: list[Path] = ()) -> None:
    if files:
        page.locator("input[type=file]").first.set_input_files([str(f) for f in files])
        page.wait_for_timeout(500)  # the upload finishes before the message is sent
    box = page.locator("textarea").first
    box.fill(text)
    box.press("Enter")


def _visible(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum())


def _wait_for_reply(page, count: int, expected: str) -> str:
    """Wait until the count-th bot message shows `expected` (streamed in); return its text."""
    want = _visible(expected)
    for _ in range(240):
        shown = _bot_messages(page)
        if len(shown) >= count and want and want in _visible(shown[count - 1]):
            return shown[count - 1]
        page.wait_for_timeout(250)
    raise AssertionError(f"no bot message {count} showing {expected!r}; shown: {shown}")


def test_upload_an_image_ask_and_see_the_answer(server, page, tmp_path):
    assistant, _ = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    image = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    expected = list(assistant.chat([], "What is this?", images=[image], settings=SETTINGS))[-1]
    page.screenshot(path=str(SHOTS / "01-start.png"), full_page=True)
    _send(page, "What is this?", [image])
    assert expected != list(assistant.chat([], "What is this?", settings=SETTINGS))[-1]
    _wait_for_reply(page, 1, expected)
    assert page.locator("[data-testid='user'] img").count() >= 1
    page.screenshot(path=str(SHOTS / "02-image-answer.png"), full_page=True)


def test_a_bad_upload_is_answered_with_a_message(server, page, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all")
    before = len(_bot_messages(page))
    _send(page, "and this one?", [fake])
    shown = _wait_for_reply(page, before + 1, "fake.png")
    assert shown.startswith(app.WARNING.strip()) and "not an image" in shown
    page.screenshot(path=str(SHOTS / "03-bad-upload.png"), full_page=True)
