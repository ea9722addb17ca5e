"""Polychrome web demo: a Gradio chat in front of the Assistant (text plus image upload).

    python app.py                       # shapes preset (real SmolLM2-135M-Instruct + our VLM)
    python app.py --preset tiny         # random tiny weights, starts in seconds (for UI work)
    python app.py --host 0.0.0.0 --port 8080   # reachable from other machines: only if you mean it

Uploads: images only (PNG, JPEG, GIF, BMP, WebP, TIFF), at most 10 MB each and 4096 px a side;
anything else is answered with a message in the chat while the server keeps serving.
UI only: parse arguments, build the Assistant, wire callbacks. No tensor code here.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr

from core.config import list_presets
from core.runtime import resolve_device
from vlm.assistant import DECODING_METHODS, Assistant, ChatMessage, Reply, SamplingSettings
from vlm.config import PolychromeConfig
from vlm.examples import example_images

logger = logging.getLogger("polychrome.app")

TEXT_EXAMPLES = [
    "Name three shapes that have straight edges.",
    "What colour do you get when you mix blue and yellow?",
]
IMAGE_EXAMPLES = [  # (example image name, question)
    ("shapes-0", "Describe the image."),
    ("shapes-1", "How many shapes are there? Answer with a single word or phrase."),
    ("shapes-2", "What colour is the leftmost shape?"),
    ("astronaut", "What do you see in this picture?"),
]
SEG_EXAMPLES = [("shapes-1", "Segment the largest red shape.")]  # shown when STAMP is loaded
GILL_EXAMPLES = [  # shown when GILL is loaded: it retrieves or generates an image
    "Show me this: A red circle next to a blue star.",
    "Show me this: The image shows three green squares, a blue star and a red circle.",
    "generate: A white arrow.",
]
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"]
MAX_UPLOAD = "10mb"


def _file_path(part: Any) -> str | None:
    """The local path of a file part in any of Gradio's message forms, else None."""
    if isinstance(part, dict):
        if isinstance(part.get("path"), str):
            return str(part["path"])
        inner = part.get("file")
        if isinstance(inner, dict) and isinstance(inner.get("path"), str):
            return str(inner["path"])
    return None


def _parts(content: Any) -> tuple[str, list[str]]:
    """Gradio content (a string, a typed part, a list of parts, a tuple of paths) -> text, files."""
    if isinstance(content, str):
        return content, []
    if isinstance(content, tuple):  # Gradio's tuple form: (path, alt text)
        return "", [str(content[0])] if content else []
    items = content if isinstance(content, list) else [content]
    texts, files = [], []
    for part in items:
        path = _file_path(part)
        if path is not None:
            files.append(path)
        elif isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
    return " ".join(texts), files


def _text_of(content: Any) -> str:
    return _parts(content)[0]


WARNING = "⚠️ "


def history_for_model(history: Sequence[dict[str, Any]]) -> list[ChatMessage]:
    """Gradio's chat history -> the Assistant's turns, without refused exchanges.

    A refused message (too long, say) and the warning that answered it are dropped, so that one bad
    message does not make every later turn fail too.
    """
    turns: list[ChatMessage] = []
    for t in history:
        role = t.get("role")
        text, files = _parts(t.get("content"))
        if role == "assistant" and text.startswith(WARNING):
            while turns and turns[-1]["role"] == "user":
                turns.pop()
            continue
        if role not in ("user", "assistant"):
            continue
        if role == "user" and turns and turns[-1]["role"] == "user":
            # Gradio may split one message into a file turn and a text turn: merge them.
            prev = turns[-1]
            prev["content"] = " ".join(x for x in (prev["content"], text) if x)
            if files:
                prev["images"] = [*prev.get("images", []), *files]
            continue
        turn: ChatMessage = {"role": str(role), "content": text}
        if files and role == "user":
            turn["images"] = files
        turns.append(turn)
    return turns


def reply_messages(reply: Reply) -> str | list[Any]:
    """A Reply as ChatInterface output: its text, then its masks painted over their image, then
    the images it showed (GILL), each labelled with its source as the text's ``[image k: ...]``."""
    painted = reply.painted()
    if painted is None and not reply.images:
        return reply.text
    out: list[Any] = [reply.text]
    if painted is not None:
        # PNG: Gradio's default WebP would blur the mask edges.
        out.append(gr.Image(value=painted, format="png", show_label=False))
    for k, shown in enumerate(reply.images, start=1):
        where = f" ({os.path.basename(shown.path)})" if shown.path else ""
        label = f"image {k}: {shown.source}{where}"
        out.append(gr.Image(value=shown.image, format="png", label=label, show_label=True))
    return out


def make_respond(assistant: Assistant) -> Any:
    """The ChatInterface callback: stream the reply; failures become a message in the chat."""

    def respond(
        message: str | dict[str, Any],
        history: Sequence[dict[str, Any]],
        max_new_tokens: float,
        temperature: float,
        seed: float,
        method: str = "default",
    ) -> Iterator[str | list[Any]]:
        turns = history_for_model(history)
        if isinstance(message, dict):  # the multimodal textbox: {"text": ..., "files": [...]}
            text = str(message.get("text") or "")
            files = [p for p in map(_file_path_or_str, message.get("files") or []) if p]
        else:
            text, files = str(message or ""), []
        if files and not text.strip():
            text = "Describe the image."
        if not text.strip():
            yield f"{WARNING}Please type a message."  # a refusal: dropped from history
            return
        try:
            settings = SamplingSettings(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                seed=int(seed) if seed is not None and seed >= 0 else None,
                method=str(method or "default"),
            )
            for reply in assistant.respond(turns, text, images=files or None, settings=settings):
                yield reply_messages(reply)
        except ValueError as err:
            text = str(err)
            for path in files:  # name the user's file, not where the server keeps it
                text = text.replace(path, os.path.basename(path))
            yield f"{WARNING}{text}"
        except Exception:  # the server must keep serving whatever one request does
            logger.exception("chat request failed")
            yield f"{WARNING}Something went wrong while answering; the server logged the error."

    return respond


def _file_path_or_str(item: Any) -> str | None:
    return item if isinstance(item, str) else _file_path(item)


def build_demo(
    assistant: Assistant, cfg: PolychromeConfig, concurrency_limit: int = 1
) -> gr.Blocks:
    """The Gradio app over an Assistant."""
    defaults = assistant.default_settings
    default_tokens = defaults.max_new_tokens
    with gr.Blocks(title="Polychrome") as demo:
        gr.Markdown(
            f"# Polychrome\nPreset **{cfg.name}**: {cfg.description}  \n"
            "A frozen LLM that reads images through a trained projector. Upload an image "
            "(or pick an example) and ask about it"
            + (", or ask it to segment something in it (STAMP)." if assistant.stamp else ".")
            + (
                "  \nGILL: ask it to show you something; it retrieves a picture from its index "
                "or draws one (`generate:` / `retrieve:` at the start of a message pick the "
                "source)."
                if assistant.gill
                else ""
            )
        )
        with gr.Accordion("Decoding", open=False):
            max_new_tokens = gr.Slider(
                1, 1024, value=default_tokens, step=1, label="Max new tokens"
            )
            temperature = gr.Slider(
                0.0, 1.5, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"
            )
            seed = gr.Number(
                value=-1 if defaults.seed is None else defaults.seed,
                precision=0,
                label="Seed (-1 = random)",
            )
            method = gr.Dropdown(
                ["default", *DECODING_METHODS],
                value=defaults.method,
                label="Decoding method (beam methods: text-only turns, whole reply at once)",
            )
        knobs = [
            default_tokens,
            defaults.temperature,
            -1 if defaults.seed is None else defaults.seed,
        ]
        examples: list[list[Any]] = []
        if assistant.vlm is not None:
            paths = example_images(cfg.shapeworld)
            examples += [
                [{"text": q, "files": [str(paths[name])]}, *knobs]
                for name, q in (*IMAGE_EXAMPLES, *(SEG_EXAMPLES if assistant.stamp else ()))
            ]
        gill_examples = GILL_EXAMPLES if assistant.gill else []
        examples += [[{"text": e, "files": []}, *knobs] for e in [*TEXT_EXAMPLES, *gill_examples]]
        gr.ChatInterface(
            make_respond(assistant),
            multimodal=True,
            textbox=gr.MultimodalTextbox(
                file_types=IMAGE_TYPES,
                file_count="multiple",
                placeholder="Ask about an image, or just chat",
                sources=["upload"],
            ),
            additional_inputs=[max_new_tokens, temperature, seed, method],
            examples=examples,
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
        "--llm",
        default=None,
        help="another LLM source (name, hf-hub:ORG/NAME, or folder); chat is then text only",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--gill", default=None, help="a GILL checkpoint (overrides the preset's)")
    parser.add_argument(
        "--gill-index", default=None, help="its image index (python -m vlm.gill index)"
    )
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
    if args.gill or args.gill_index:
        cfg = cfg.replace(
            gill=cfg.gill.replace(
                checkpoint=args.gill or cfg.gill.checkpoint,
                index=args.gill_index or cfg.gill.index,
            )
        )
    device = str(resolve_device(args.device))
    if args.llm:  # another LLM: the preset's VLM projector does not fit it, so chat in text
        logger.info("loading LLM %s (text only)", cfg.llm.source)
        assistant = Assistant.from_llm_config(cfg.llm, device=device)
    else:
        logger.info("loading VLM: LLM %s, CLIP %s", cfg.llm.source, cfg.clip.model)
        assistant = Assistant.from_config(cfg, device=device)
    demo = build_demo(assistant, cfg, concurrency_limit=args.concurrency)
    demo.queue(max_size=args.queue_size)
    demo.launch(
        server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, show_error=False
    )


if __name__ == "__main__":
    main()
