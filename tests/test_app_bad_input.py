"""Odd and hostile input through the API: every one gets a clear answer and the server serves on.

(test_app.py covers corrupt, empty and huge images and over-long messages; these are the rest of
the list: image modes, a 100 KB message, control characters, and file paths the client makes up.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from vlm.assistant import SamplingSettings
from vlm.config import PolychromeConfig
from vlm.examples import example_images

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = SamplingSettings(max_new_tokens=8)


class _Fresh:
    """A new gradio_client session per question: a session keeps its conversation, and each
    question here is compared with a reply to it alone."""

    def __init__(self, url: str) -> None:
        self.url = url

    def predict(self, *args, **kwargs):
        from gradio_client import Client

        return Client(self.url, verbose=False).predict(*args, **kwargs)


@pytest.fixture(scope="module")
def client(demo_server):
    return demo_server[0], _Fresh(demo_server[1])


def _ask(client, text, files=()):
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    return client.predict(message, 8, 0.0, -1, "default", api_name="/chat")


def test_every_image_mode_is_read_as_the_same_rgb_picture(client, tmp_path):
    assistant, api = client
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    reference = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(reference)
    expected = list(assistant.chat([], "What is it?", images=[reference], settings=SETTINGS))[-1]
    rgba = Image.fromarray(np.dstack([rgb, np.full((40, 48), 255, np.uint8)]), "RGBA")
    rgba.save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    grey16 = (rng.integers(0, 65535, (40, 48))).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    # an opaque RGBA image is its RGB picture: the same answer
    assert _ask(api, "What is it?", [tmp_path / "rgba.png"]) == expected
    for name in ("cmyk.jpg", "grey16.png"):  # other modes: an answer, not an error
        reply = _ask(api, "What is it?", [tmp_path / name])
        own = list(assistant.chat([], "What is it?", images=[tmp_path / name], settings=SETTINGS))
        assert reply == own[-1] and not reply.startswith(app.WARNING), name


def test_a_100_kb_message_and_control_characters(client):
    assistant, api = client
    reply = _ask(api, "a" * 100_000)
    assert reply.startswith(app.WARNING) and "100000 characters" in reply
    noisy = "hel\x00lo\x1b[31m\x07"
    clean = list(assistant.chat([], "hello[31m", settings=SETTINGS))[-1]
    assert _ask(api, noisy) == clean
    assert _ask(api, "hello") == list(assistant.chat([], "hello", settings=SETTINGS))[-1]


def _raw_chat(url: str, files: list[str]) -> str:
    """The chat endpoint called over plain HTTP, the files named by path as a hostile client
    would (gradio_client would upload a local file instead); the event stream's text."""
    import httpx

    message = {"text": "read this", "files": [{"path": p, "meta": {"_type": "gradio.FileData"}}
                                              for p in files]}  # fmt: skip
    data = [message, 8, 0.0, -1, "default", 25, ""]
    event = httpx.post(url + "gradio_api/call/chat", json={"data": data}).json()["event_id"]
    return httpx.get(url + f"gradio_api/call/chat/{event}", timeout=60).text


def test_made_up_file_paths_are_refused_and_the_server_serves_on(client, demo_server):
    """A request can name any path on the server; only files it received as uploads are read
    (else an image anywhere on the server could come back, painted with a mask)."""
    assistant, api = client
    image = str(example_images(PolychromeConfig.from_preset("tiny").shapeworld)["shapes-0"])
    assert Path(image).is_file()
    for path in ("../../etc/passwd", "/etc/passwd", image, f"../../..{image}"):
        out = _raw_chat(demo_server[1], [path])
        assert "event: error" in out and "root:" not in out, (path, out)
    assert _ask(api, "hello") == list(assistant.chat([], "hello", settings=SETTINGS))[-1]


def test_the_app_reads_only_files_in_the_upload_folder(tmp_path):
    """The app's own check (behind Gradio's): a path outside the upload folder, or one that
    climbs out of it, is not an upload."""
    import gradio as gr

    root = Path(gr.utils.get_upload_folder())
    assert app.uploaded(str(root / "abc" / "scene.png"))
    assert not app.uploaded(str(root / ".." / "scene.png"))
    assert not app.uploaded(str(tmp_path / "scene.png"))
    assert not app.uploaded("/etc/passwd")


def test_a_sketch_is_flattened_onto_white_and_an_oversized_one_refused(monkeypatch, tmp_path):
    """The Sketch tab's handler: the drawing goes to the chat as a PNG on white; a composite
    larger than the app reads anywhere else (a client can send one) is refused, not processed."""
    import warnings

    from core.images import MAX_SIDE

    monkeypatch.setattr(app, "scratch_folder", lambda: tmp_path)
    drawing = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    drawing.putpixel((2, 3), (255, 0, 0, 255))
    message, tab = app.sketch_to_chat({"composite": drawing}, "  ")
    assert message["text"] == "What did I draw?"
    saved = np.asarray(Image.open(message["files"][0]))
    assert saved.shape == (6, 8, 3) and saved[3, 2].tolist() == [255, 0, 0]
    assert saved[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    huge = Image.new("RGBA", (MAX_SIDE + 1, 1), (0, 0, 0, 255))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gr.Warning outside a request
        message, tab = app.sketch_to_chat({"composite": huge}, "x")
    assert message == tab == {"__type__": "update"}  # nothing attached, no tab change
