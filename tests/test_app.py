"""The demo app: arguments, and the chat flow through a real server and gradio_client."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import app
from vlm.assistant import MAX_MESSAGE_CHARS, SamplingSettings

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = SamplingSettings(max_new_tokens=8)  # greedy


def test_defaults_bind_to_localhost():
    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.preset == "shapes"
    with pytest.raises(SystemExit):
        app.parse_args(["--preset", "nope"])


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as err:
        app.parse_args(["--help"])
    assert err.value.code == 0
    assert "--preset" in capsys.readouterr().out


def test_your_checkpoints_on_the_command_line(tmp_path, monkeypatch):
    """--vlm/--stamp/--gill/--gill-index are read from the current directory (a preset's own
    paths from the repository); --vlm drops the preset's STAMP and GILL, trained on its core;
    a checkpoint that cannot load ends the command with its message, no traceback."""
    import os

    from vlm.config import PolychromeConfig

    monkeypatch.chdir(tmp_path)
    preset = PolychromeConfig.from_preset("shapes")
    assert preset.stamp.checkpoint and preset.gill.checkpoint  # what --vlm must drop
    mine = app.demo_config(app.parse_args(["--vlm", "runs/vlm/final"]))
    assert mine.vlm.checkpoint == os.path.join(tmp_path, "runs/vlm/final")
    assert mine.stamp.checkpoint is None and mine.gill.checkpoint is None
    assert mine.gill.index is None
    argv = ["--vlm", "v", "--stamp", "s", "--gill", "g", "--gill-index", "i"]
    both = app.demo_config(app.parse_args(argv))
    assert (both.stamp.checkpoint, both.gill.checkpoint, both.gill.index) == tuple(
        os.path.join(tmp_path, p) for p in "sgi"
    )
    with pytest.raises(ValueError, match="needs --gill"):  # it would serve nothing
        app.demo_config(app.parse_args(["--vlm", "v", "--gill-index", "i"]))
    kept = app.demo_config(app.parse_args(["--gill", "g"]))
    assert kept.stamp.checkpoint == preset.stamp.checkpoint and kept.vlm == preset.vlm
    with pytest.raises(SystemExit) as err:
        app.main(["--vlm", "no/such/run", "--no-tools"])
    assert "app.py: error:" in str(err.value) and "no/such/run" in str(err.value)


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


def _ask(client, text, files=()):
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    return client.predict(message, 8, 0.0, -1, "default", api_name="/chat")


def test_chat_through_the_api(server):
    from gradio_client import Client

    assistant, url = server
    client = Client(url, verbose=False)
    expected = list(assistant.chat([], "hello", settings=SETTINGS))[-1]
    assert _ask(client, "hello") == expected


def test_image_question_through_the_api(server, tmp_path):
    from gradio_client import Client

    assistant, url = server
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    client = Client(url, verbose=False)
    expected = list(assistant.chat([], "What is this?", images=[path], settings=SETTINGS))[-1]
    assert expected != list(assistant.chat([], "What is this?", settings=SETTINGS))[-1]
    assert _ask(client, "What is this?", [path]) == expected
    # The client's session keeps the conversation: the next turn sees the first one, image
    # included. No text with an image: the app asks for a description.
    history = [
        {"role": "user", "content": "What is this?", "images": [path]},
        {"role": "assistant", "content": expected},
    ]
    described = list(
        assistant.chat(history, "Describe the image.", images=[path], settings=SETTINGS)
    )
    assert _ask(client, "", [path]) == described[-1]


def test_bad_messages_become_chat_messages_and_server_keeps_serving(server, tmp_path):
    from gradio_client import Client

    assistant, url = server
    client = Client(url, verbose=False)
    too_long = _ask(client, "x" * (MAX_MESSAGE_CHARS + 5))
    assert "limit is" in too_long
    assert _ask(client, "   ") == app.WARNING + "Please type a message."
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 10_000)).save(huge)
    for bad in (fake, empty, huge):
        reply = _ask(client, "what is it?", [bad])
        assert reply.startswith(app.WARNING) and bad.name in reply, (bad.name, reply)
        assert "/tmp/gradio" not in reply  # the server's upload folder is not shown
    assert "8192x8192 pixels, received 10000x10000" in _ask(client, "and this?", [huge])
    assert _ask(client, "hello") == list(assistant.chat([], "hello", settings=SETTINGS))[-1]


def test_decoding_method_through_the_api(server, tmp_path):
    from gradio_client import Client, handle_file

    assistant, url = server
    client = Client(url, verbose=False)
    beam = SamplingSettings(max_new_tokens=8, method="beam", num_beams=4)
    expected = list(assistant.chat([], "hello", settings=beam))[-1]
    assert (
        client.predict({"text": "hello", "files": []}, 8, 0.0, -1, "beam", api_name="/chat")
        == expected
    )
    path = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(path)
    message = {"text": "what?", "files": [handle_file(str(path))]}
    reply = client.predict(message, 8, 0.0, -1, "beam", api_name="/chat")
    assert reply.startswith(app.WARNING) and "text-only" in reply


def test_gradio_history_with_files_becomes_turns_with_images():
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/a.png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": [{"path": "/tmp/b.png"}, "and this?"]},
        {"role": "assistant", "content": "a star"},
    ]
    assert app.history_for_model(history) == [
        {"role": "user", "content": "what is it?", "images": ["/tmp/a.png"]},
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": "and this?", "images": ["/tmp/b.png"]},
        {"role": "assistant", "content": "a star"},
    ]


def test_refused_exchanges_are_dropped_from_history():
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "x" * 9000},
        {"role": "assistant", "content": app.WARNING + "message is 9000 characters"},
        {"role": "user", "content": [{"type": "text", "text": "next"}]},
        {"role": "assistant", "content": "sure"},
    ]
    assert app.history_for_model(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "next"},
        {"role": "assistant", "content": "sure"},
    ]
