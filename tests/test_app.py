"""The demo app: arguments, and the chat flow through a real server and gradio_client."""

from __future__ import annotations

import socket

import pytest

import app
from vlm.assistant import MAX_MESSAGE_CHARS, Assistant, SamplingSettings
from vlm.config import PolychromeConfig


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


@pytest.fixture(scope="module")
def server(tiny_lm):
    model, tok = tiny_lm
    assistant = Assistant(model, tok, default_settings=SamplingSettings(max_new_tokens=8))
    demo = app.build_demo(assistant, PolychromeConfig.from_preset("tiny"))
    demo.queue(max_size=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield assistant, f"http://127.0.0.1:{port}/"
    demo.close()


def test_chat_through_the_api(server):
    from gradio_client import Client

    assistant, url = server
    client = Client(url, verbose=False)
    reply = client.predict("hello", 8, 0.0, -1, api_name="/chat")
    expected = list(assistant.chat([], "hello", settings=SamplingSettings(max_new_tokens=8)))[-1]
    assert reply == expected


def test_bad_messages_become_chat_messages_and_server_keeps_serving(server):
    from gradio_client import Client

    assistant, url = server
    client = Client(url, verbose=False)
    too_long = client.predict("x" * (MAX_MESSAGE_CHARS + 5), 8, 0.0, -1, api_name="/chat")
    assert "limit is" in too_long
    assert client.predict("   ", 8, 0.0, -1, api_name="/chat") == "Please type a message."
    again = client.predict("hello", 8, 0.0, -1, api_name="/chat")
    assert (
        again == list(assistant.chat([], "hello", settings=SamplingSettings(max_new_tokens=8)))[-1]
    )


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
