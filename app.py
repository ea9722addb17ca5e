"""Polychrome web demo: a Gradio chat in front of the Assistant.

    python app.py                       # shapes preset (real SmolLM2-135M-Instruct), 127.0.0.1:7860
    python app.py --preset tiny         # random tiny weights, starts in seconds (for UI work)
    python app.py --host 0.0.0.0 --port 8080   # reachable from other machines: only if you mean it

UI only: parse arguments, build the Assistant, wire callbacks. No tensor code here.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr

from core.config import list_presets
from core.runtime import resolve_device
from vlm.assistant import Assistant, ChatMessage, SamplingSettings
from vlm.config import PolychromeConfig

logger = logging.getLogger("polychrome.app")

TEXT_EXAMPLES = [
    "Name three shapes that have straight edges.",
    "What colour do you get when you mix blue and yellow?",
    "Write a one-sentence story about a red circle.",
]


def _text_of(content: Any) -> str:
    """Gradio history content (a string, or a list of typed parts) -> plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return ""


WARNING = "⚠️ "


def history_for_model(history: Sequence[dict[str, Any]]) -> list[ChatMessage]:
    """Gradio's chat history -> the Assistant's turns, without refused exchanges.

    A refused message (too long, say) and the warning that answered it are dropped, so that one bad
    message does not make every later turn fail too.
    """
    turns: list[ChatMessage] = []
    for t in history:
        role, text = t.get("role"), _text_of(t.get("content"))
        if role == "assistant" and text.startswith(WARNING):
            if turns and turns[-1]["role"] == "user":
                turns.pop()
            continue
        if role in ("user", "assistant"):
            turns.append({"role": str(role), "content": text})
    return turns


def make_respond(assistant: Assistant) -> Any:
    """The ChatInterface callback: stream the reply; failures become a message in the chat."""

    def respond(
        message: str,
        history: Sequence[dict[str, Any]],
        max_new_tokens: float,
        temperature: float,
        seed: float,
    ) -> Iterator[str]:
        turns = history_for_model(history)
        if not message or not message.strip():
            yield "Please type a message."
            return
        try:
            settings = SamplingSettings(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                seed=int(seed) if seed is not None and seed >= 0 else None,
            )
            yield from assistant.chat(turns, message, settings=settings)
        except ValueError as err:
            yield f"{WARNING}{err}"
        except Exception:  # the server must keep serving whatever one request does
            logger.exception("chat request failed")
            yield f"{WARNING}Something went wrong while answering; the server logged the error."

    return respond


def build_demo(
    assistant: Assistant, cfg: PolychromeConfig, concurrency_limit: int = 1
) -> gr.Blocks:
    """The Gradio app over an Assistant."""
    default_tokens = assistant.default_settings.max_new_tokens
    with gr.Blocks(title="Polychrome") as demo:
        gr.Markdown(
            f"# Polychrome\nPreset **{cfg.name}**: {cfg.description}  \n"
            "A frozen LLM that will understand, generate, retrieve and segment images. "
            "This first version chats in text."
        )
        with gr.Accordion("Decoding", open=False):
            max_new_tokens = gr.Slider(
                1, 1024, value=default_tokens, step=1, label="Max new tokens"
            )
            temperature = gr.Slider(
                0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)"
            )
            seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
        gr.ChatInterface(
            make_respond(assistant),
            additional_inputs=[max_new_tokens, temperature, seed],
            examples=[[e, default_tokens, 0.0, -1] for e in TEXT_EXAMPLES],
            concurrency_limit=concurrency_limit,
            api_name="chat",
        )
    return demo


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Polychrome web demo (Gradio chat).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", choices=list_presets(), help="config preset")
    parser.add_argument(
        "--llm", default=None, help="override the LLM source (name, hf-hub:ORG/NAME, or folder)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind; 0.0.0.0 exposes the demo on your network",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--concurrency", type=int, default=1, help="requests served at once")
    parser.add_argument("--queue-size", type=int, default=32, help="requests waiting at most")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = PolychromeConfig.from_preset(args.preset)
    if args.llm:
        cfg = cfg.replace(llm=cfg.llm.replace(source=args.llm))
    logger.info("loading LLM %s", cfg.llm.source)
    assistant = Assistant.from_llm_config(cfg.llm, device=str(resolve_device(args.device)))
    demo = build_demo(assistant, cfg, concurrency_limit=args.concurrency)
    demo.queue(max_size=args.queue_size)
    demo.launch(
        server_name=args.host, server_port=args.port, max_file_size="10mb", show_error=False
    )


if __name__ == "__main__":
    main()
