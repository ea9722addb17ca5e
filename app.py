"""Polychrome web demo: a Gradio chat in front of the Assistant, and the tools beside it.

    python app.py                       # shapes preset (real SmolLM2-135M-Instruct + our VLM)
    python app.py --preset tiny         # random tiny weights, starts in seconds (for UI work)
    python app.py --host 0.0.0.0 --port 8080   # reachable from other machines: only if you mean it

Tabs: Chat (answers, and with STAMP / GILL loaded masks and images; ``segment:``, ``generate:``,
``retrieve:`` ask explicitly), Segment everything (SAM's automatic masks), Open-vocabulary
segmentation (your vocabulary), Sketch (draw, then send the drawing to the chat). Every picture
has a download button; the tools also offer their masks as COCO-style JSON.

Uploads: images only (PNG, JPEG, GIF, BMP, WebP, TIFF), at most 10 MB each and 8192 px a side
(read downscaled to 4096 px); anything else is answered with a message in the chat while the
server keeps serving.
UI only: parse arguments, build the Assistant, wire callbacks. No tensor code here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from core.config import list_presets
from core.images import MAX_SIDE
from core.runtime import resolve_device
from vlm.assistant import DECODING_METHODS, Assistant, ChatMessage, Reply, SamplingSettings
from vlm.config import PolychromeConfig
from vlm.examples import example_images
from vlm.tools import ToolResult, VisionTools

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
SEG_EXAMPLES = [  # shown when STAMP is loaded
    ("shapes-1", "Segment the largest red shape."),
    ("shapes-2", "segment: the leftmost shape"),
]
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
OUTSIDE = "files must be uploaded through the page; this one is not an upload the server received: "


def uploaded(path: str) -> bool:
    """Whether `path` is in Gradio's upload folder, where every file the page sends (uploads,
    examples, the sketch) lands. A client can name any path in its request; anything else it
    names (an image elsewhere on the server, which STAMP would paint and send back) is refused."""
    root = Path(gr.utils.get_upload_folder()).resolve()
    return Path(path).resolve().is_relative_to(root)


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
    the images it showed (GILL; a gallery when there are several), each labelled with its source
    as the text's ``[image k: ...]``."""
    painted = reply.painted()
    if painted is None and not reply.images:
        return reply.text
    out: list[Any] = [reply.text]
    if painted is not None:
        # PNG: Gradio's default WebP would blur the mask edges.
        out.append(gr.Image(value=painted, format="png", show_label=False))
    labelled = []
    for k, shown in enumerate(reply.images, start=1):
        where = f" ({os.path.basename(shown.path)})" if shown.path else ""
        labelled.append((shown.image, f"image {k}: {shown.source}{where}"))
    if len(labelled) == 1:
        image, label = labelled[0]
        out.append(gr.Image(value=image, format="png", label=label, show_label=True, width=256))
    elif labelled:  # several: one gallery, each captioned as the text names it
        out.append(gr.Gallery(value=labelled, format="png", label="images", columns=4))
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
        image_steps: float | None = None,
        index: str | None = None,
        weights: str | None = None,
    ) -> Iterator[str | list[Any]]:
        turns = history_for_model(history)
        if isinstance(message, dict):  # the multimodal textbox: {"text": ..., "files": [...]}
            text = str(message.get("text") or "")
            files = [p for p in map(_file_path_or_str, message.get("files") or []) if p]
        else:
            text, files = str(message or ""), []
        named = [*files, *(im for t in turns for im in t.get("images", ()))]
        outside = [p for p in named if not uploaded(str(p))]
        if outside:
            yield f"{WARNING}{OUTSIDE}{os.path.basename(str(outside[0]))}"
            return
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
                image_steps=int(image_steps) if image_steps else None,
                index=index or None,
                weights="sparse" if weights and weights != "dense" else "dense",
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


def image_file(**kwargs: Any) -> gr.Image:
    """A gr.Image upload handed on as its file path, unopened. The tools read it with
    core.images.load_rgb, which bounds size and type and says what is wrong; gr.Image's own
    preprocessing would open it first and fail on a bad file with a generic error. (An instance
    override: a gr.Image subclass would make Gradio write an app.pyi stub beside this file.)"""
    image = gr.Image(type="filepath", **kwargs)

    def unopened(payload: Any) -> str | None:
        return None if payload is None else str(payload.path)

    setattr(image, "preprocess", unopened)  # noqa: B010
    return image


def _safe(err: Exception, files: Sequence[str] = ()) -> str:
    """An error as a chat/tool message, naming the user's file, not where the server keeps it."""
    text = str(err)
    for path in files:
        text = text.replace(path, os.path.basename(path))
    return f"{WARNING}{text}"


SCRATCH_HOURS = 1.0  # how long the files the app writes for Gradio to pick up are kept


def scratch_folder() -> Path:
    """A fresh folder for a file the app hands to Gradio (which copies it into its own cache).
    They all live under one root in the system temp folder; those older than SCRATCH_HOURS are
    deleted here, so a busy server does not fill the disk."""
    root = Path(tempfile.gettempdir()) / "polychrome-scratch"
    root.mkdir(exist_ok=True)
    cutoff = time.time() - 3600 * SCRATCH_HOURS
    for old in root.iterdir():
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))


def _result_files(result: ToolResult, stem: str) -> str:
    """Write the tool's masks as COCO-style JSON for download; its path."""
    path = scratch_folder() / f"{stem}.json"
    path.write_text(json.dumps(result.coco_json()), encoding="utf-8")
    return str(path)


def make_tool(
    run: Callable[..., ToolResult], stem: str
) -> Callable[..., tuple[Any, str, str | None]]:
    """A tool callback: (painted image, summary, JSON path); failures become the summary."""

    def tool(image: str | None, *args: Any) -> tuple[Any, str, str | None]:
        if not image:
            return None, f"{WARNING}Upload an image first.", None
        if not uploaded(image):
            return None, f"{WARNING}{OUTSIDE}{os.path.basename(image)}", None
        try:
            result = run(image, *args)
            files = _result_files(result, stem)  # the masks scaled to the upload: work too
        except ValueError as err:
            return None, _safe(err, [image]), None
        except Exception:  # the server must keep serving whatever one request does
            logger.exception("tool %s failed", stem)
            return None, f"{WARNING}Something went wrong; the server logged the error.", None
        return result.painted, result.summary, files

    return tool


def sketch_to_chat(sketch: Any, question: str) -> tuple[Any, Any]:
    """The drawing (flattened onto white) as a PNG attached to the chat's textbox, and the Chat
    tab selected."""
    composite = sketch.get("composite") if isinstance(sketch, dict) else None
    if composite is not None and max(composite.size) > MAX_SIDE:  # the page never sends one
        gr.Warning(
            f"The drawing is {composite.width}x{composite.height} pixels; at most "
            f"{MAX_SIDE} a side."
        )
        return gr.update(), gr.update()
    if composite is None or (composite.mode == "RGBA" and composite.getextrema()[3][1] == 0):
        gr.Warning("Draw something first.")
        return gr.update(), gr.update()
    flat = Image.new("RGBA", composite.size, (255, 255, 255, 255))
    flat.alpha_composite(composite.convert("RGBA"))
    path = scratch_folder() / "sketch.png"
    flat.convert("RGB").save(path)
    text = question.strip() or "What did I draw?"
    return {"text": text, "files": [str(path)]}, gr.Tabs(selected="chat")


def build_demo(
    assistant: Assistant,
    cfg: PolychromeConfig,
    concurrency_limit: int = 1,
    tools: VisionTools | None = None,
) -> gr.Blocks:
    """The Gradio app over an Assistant (and the segmentation tools, when given)."""
    defaults = assistant.default_settings
    default_tokens = defaults.max_new_tokens
    has_gill = assistant.gill is not None
    # Gradio keeps every upload and every output it serves in its cache: an hour, then they go.
    with gr.Blocks(title="Polychrome", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"# Polychrome\nPreset **{cfg.name}**: {cfg.description}  \n"
            "A frozen LLM that reads images through a trained projector. Upload an image "
            "(or pick an example) and ask about it"
            + (
                ", or ask it to segment something in it (STAMP; `segment:` at the start of a "
                "message asks for a mask explicitly)."
                if assistant.stamp
                else "."
            )
            + (
                "  \nGILL: ask it to show you something; it retrieves a picture from its index "
                "or draws one (`generate:` / `retrieve:` at the start of a message pick the "
                "source)."
                if has_gill
                else ""
            )
        )
        with gr.Tabs(selected="chat") as tabs:
            with gr.Tab("Chat", id="chat"):
                with gr.Accordion("Advanced", open=False):
                    max_new_tokens = gr.Slider(
                        1, 1024, value=default_tokens, step=1, label="Max new tokens"
                    )
                    temperature = gr.Slider(
                        0.0,
                        1.5,
                        value=defaults.temperature,
                        step=0.05,
                        label="Temperature (0 = greedy)",
                    )
                    seed = gr.Number(
                        value=-1 if defaults.seed is None else defaults.seed,
                        precision=0,
                        label="Seed (-1 = random)",
                    )
                    method = gr.Dropdown(
                        ["default", *DECODING_METHODS],
                        value=defaults.method,
                        label="Decoding method (beam methods: text-only, whole reply at once)",
                    )
                    steps = (
                        assistant.image_maker.num_inference_steps if assistant.image_maker else 25
                    )
                    image_steps = gr.Slider(
                        1,
                        100,
                        value=steps,
                        step=1,
                        label="Diffusion steps of a generated image",
                        visible=has_gill,
                    )
                    sparse = assistant.sparsity.label if assistant.sparsity else None
                    weights = gr.Dropdown(
                        ["dense", *([sparse] if sparse else [])],
                        value="dense",
                        label="LLM weights (dense, or the N:M sparse checkpoint given by --sparse)",
                        visible=sparse is not None,
                    )
                    names = list(assistant.indexes)
                    index = gr.Dropdown(
                        names or [""],
                        value=names[0] if names else "",
                        label="Retrieval index",
                        visible=bool(names),
                    )
                knobs = [
                    default_tokens,
                    defaults.temperature,
                    -1 if defaults.seed is None else defaults.seed,
                ]
                examples: list[list[Any]] = []
                if assistant.vlm is not None:
                    paths = example_images(cfg.shapeworld)
                    seg_examples = SEG_EXAMPLES if assistant.stamp else []
                    examples += [
                        [{"text": q, "files": [str(paths[name])]}, *knobs]
                        for name, q in (*IMAGE_EXAMPLES, *seg_examples)
                    ]
                gill_examples = GILL_EXAMPLES if has_gill else []
                examples += [
                    [{"text": e, "files": []}, *knobs] for e in [*TEXT_EXAMPLES, *gill_examples]
                ]
                chat_box = gr.MultimodalTextbox(
                    file_types=IMAGE_TYPES,
                    file_count="multiple",
                    placeholder="Ask about an image, or just chat",
                    sources=["upload"],
                )
                gr.ChatInterface(
                    make_respond(assistant),
                    multimodal=True,
                    textbox=chat_box,
                    additional_inputs=[
                        max_new_tokens,
                        temperature,
                        seed,
                        method,
                        image_steps,
                        index,
                        weights,
                    ],
                    examples=examples,
                    concurrency_limit=concurrency_limit,
                    api_name="chat",
                )
            if tools is not None:
                _tool_tabs(tools, cfg, concurrency_limit)
            if assistant.vlm is not None:
                with gr.Tab("Sketch", id="sketch"):
                    gr.Markdown("Draw a scene, then send it to the chat with a question.")
                    pad = gr.Sketchpad(
                        type="pil", canvas_size=(384, 384), label="Sketch", image_mode="RGBA"
                    )
                    question = gr.Textbox(
                        label="Question about the sketch", placeholder="What did I draw?"
                    )
                    send = gr.Button("Send to chat", variant="primary")
                    send.click(sketch_to_chat, [pad, question], [chat_box, tabs], api_name=False)
    return demo


def _tool_tabs(tools: VisionTools, cfg: PolychromeConfig, concurrency_limit: int) -> None:
    """The Segment everything and Open-vocabulary segmentation tabs."""
    example = str(example_images(cfg.shapeworld)["shapes-1"])
    with gr.Tab("Segment everything", id="everything"):
        gr.Markdown("Every mask SAM finds in the image (its automatic mask generator).")
        with gr.Row():
            image = image_file(label="Image", sources=["upload"])
            painted = gr.Image(format="png", label="Masks", buttons=["download", "fullscreen"])
        run = gr.Button("Segment everything", variant="primary")
        summary = gr.Markdown()
        masks = gr.File(label="Masks (COCO-style JSON)")
        gr.Examples([[example]], [image])
        run.click(
            make_tool(tools.segment_everything, "masks"),
            [image],
            [painted, summary, masks],
            api_name="segment_everything",
            concurrency_limit=concurrency_limit,
        )
    with gr.Tab("Open-vocabulary segmentation", id="vocabulary"):
        gr.Markdown(
            "Name what to look for, separated by commas: class names, synonyms or phrases "
            '("circle, star, purple hexagon"). SAM proposes masks, CLIP names them.'
        )
        with gr.Row():
            image = image_file(label="Image", sources=["upload"])
            painted = gr.Image(
                format="png", label="Segmentation", buttons=["download", "fullscreen"]
            )
        vocabulary = gr.Textbox(label="Vocabulary", value="circle, square, triangle, star")
        classifier = gr.Dropdown(
            tools.classifiers,
            value=tools.classifier,
            label="Mask classifier (crops: the best on ShapeWorld; adapter: Mask-Adapter)",
        )
        run = gr.Button("Segment", variant="primary")
        summary = gr.Markdown()
        masks = gr.File(label="Segments (COCO-style JSON)")
        gr.Examples([[example, "circle, square, triangle, star, hexagon"]], [image, vocabulary])
        run.click(
            make_tool(tools.segment_vocabulary, "segments"),
            [image, vocabulary, classifier],
            [painted, summary, masks],
            api_name="segment_vocabulary",
            concurrency_limit=concurrency_limit,
        )


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
    parser.add_argument(
        "--vlm",
        default=None,
        help="a VLM core checkpoint (train.vlm's <out>/final) instead of the preset's; STAMP and "
        "GILL then come only from --stamp / --gill, which must have been trained on this core",
    )
    parser.add_argument("--stamp", default=None, help="a STAMP checkpoint (overrides the preset's)")
    parser.add_argument("--gill", default=None, help="a GILL checkpoint (overrides the preset's)")
    parser.add_argument(
        "--gill-index",
        action="append",
        default=None,
        help="an image index for GILL (python -m vlm.gill index); repeat to offer several in "
        "the Advanced panel, the first is the default",
    )
    parser.add_argument(
        "--no-tools", action="store_true", help="no Segment everything / vocabulary tabs"
    )
    parser.add_argument(
        "--sparse",
        default=None,
        help="an N:M sparse checkpoint of the LLM (train.sparsify's <out>/sparse: MaskLLM or "
        "one-shot); the Advanced panel then offers dense or sparse weights per request",
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


def demo_config(args: argparse.Namespace) -> PolychromeConfig:
    """The preset with the command line's checkpoints in place (paths from the current
    directory; a preset's own are relative to the repository). With --vlm the preset's STAMP and
    GILL are dropped: they were trained on the preset's core and would not attach to another."""
    cfg = PolychromeConfig.from_preset(args.preset)
    if args.llm:
        cfg = cfg.replace(llm=cfg.llm.replace(source=args.llm))

    def given(path: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(path)) if path else None

    indexes = _index_paths(args)
    if args.vlm and indexes and not args.gill:
        raise ValueError(
            "--gill-index with --vlm needs --gill: the preset's GILL is left out with another "
            "core, and an index serves the GILL it was built with"
        )

    if args.vlm:
        cfg = cfg.replace(
            vlm=cfg.vlm.replace(checkpoint=given(args.vlm)),
            stamp=cfg.stamp.replace(checkpoint=None),
            gill=cfg.gill.replace(checkpoint=None, index=None),
        )
    if args.stamp:
        cfg = cfg.replace(stamp=cfg.stamp.replace(checkpoint=given(args.stamp)))
    if args.gill or indexes:
        cfg = cfg.replace(
            gill=cfg.gill.replace(
                checkpoint=given(args.gill) or cfg.gill.checkpoint,
                index=indexes[0] if indexes else cfg.gill.index,
            )
        )
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        _serve(args, demo_config(args))
    except (ValueError, OSError) as err:  # CheckpointError, ImageIndexError, a missing folder
        raise SystemExit(f"app.py: error: {err}") from None


def _index_paths(args: argparse.Namespace) -> list[str]:
    """--gill-index's folders, from the current directory."""
    return [os.path.abspath(os.path.expanduser(p)) for p in args.gill_index or []]


def _serve(args: argparse.Namespace, cfg: PolychromeConfig) -> None:
    indexes = _index_paths(args)
    device = str(resolve_device(args.device))
    if args.llm:  # another LLM: the preset's VLM projector does not fit it, so chat in text
        logger.info("loading LLM %s (text only)", cfg.llm.source)
        assistant = Assistant.from_llm_config(cfg.llm, device=device)
    else:
        logger.info("loading VLM: LLM %s, CLIP %s", cfg.llm.source, cfg.clip.model)
        assistant = Assistant.from_config(cfg, device=device)
        names = ["default", *(os.path.basename(os.path.normpath(f)) for f in indexes[1:])]
        if len(set(names)) != len(names):
            raise SystemExit(
                f"--gill-index: the Advanced panel names indexes by folder, and these repeat a "
                f"name: {indexes} (the first is 'default'); rename the folders"
            )
        for name, folder in zip(names[1:], indexes[1:], strict=True):
            assistant.add_index(name, folder)
    if args.sparse:
        logger.info("LLM weights: dense, or %s", assistant.set_sparsity(args.sparse))
    tools = None if args.no_tools else VisionTools.from_config(cfg, device=device)
    demo = build_demo(assistant, cfg, concurrency_limit=args.concurrency, tools=tools)
    demo.queue(max_size=args.queue_size)
    demo.launch(
        server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, show_error=False
    )


if __name__ == "__main__":
    main()
