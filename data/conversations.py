"""Image-grounded chat examples from an image folder's metadata.jsonl (ShapeWorld or your own).

    records = read_chat_records("out/shapeworld/train")     # one ChatRecord per image
    caption_conversation(records[0], rng)   # [{"role": "user", "content": ..., "images": [path]},
                                            #  {"role": "assistant", "content": "<a caption>"}]
    instruct_conversation(records[0], rng)  # a dialogue plus short-answer questions, one image

A metadata.jsonl row needs "file_name" and at least one of:

- "captions": a list of strings (or "caption" / "text": one string);
- "dialogues": a list of dialogues, each a list of [question, answer] pairs;
- "qa": a list of {"question": str, "answer": str, "type": str} objects (type optional).

ShapeWorld splits are written in exactly this form (data.shapeworld). Short-answer questions get
LLaVA-1.5's instruction (SHORT_ANSWER) so the model learns when to answer in one word and when in
sentences, and the evaluation (eval.vlm) asks them the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data.formats import FormatError, read_imagefolder_rows, row_captions

if TYPE_CHECKING:
    from data.validate import OnBad

__all__ = [
    "DESCRIBE_PROMPTS",
    "SHORT_ANSWER",
    "ChatRecord",
    "caption_conversation",
    "instruct_conversation",
    "read_chat_records",
    "record_from_row",
    "short_question",
]

SHORT_ANSWER = "Answer with a single word or phrase."
DESCRIBE_PROMPTS = (
    "Describe the image.",
    "What do you see in this picture?",
    "Can you describe this image?",
    "What is in the image?",
)

Message = dict[str, Any]  # {"role": ..., "content": str, "images"?: [path, ...]}


@dataclass
class ChatRecord:
    """One image with the texts about it."""

    image: Path
    captions: list[str] = field(default_factory=list)
    dialogues: list[list[tuple[str, str]]] = field(default_factory=list)
    qa: list[dict[str, str]] = field(default_factory=list)  # question, answer, type


def short_question(question: str) -> str:
    """A question with the one-word-answer instruction appended."""
    return f"{question} {SHORT_ANSWER}"


def record_from_row(row: dict[str, Any], folder: Path, where: str) -> ChatRecord:
    """One metadata.jsonl row as a ChatRecord; FormatError (prefixed with `where`) without text."""
    captions = row_captions(row, where, required=False)
    for key in ("dialogues", "qa"):
        if not isinstance(row.get(key, []), list):
            raise FormatError(f"{where}: {key!r} must be a list, got {row[key]!r:.80}")
    dialogues: list[list[tuple[str, str]]] = []
    for d, dialogue in enumerate(row.get("dialogues", [])):
        if not isinstance(dialogue, list) or not dialogue:
            raise FormatError(f"{where}: dialogues[{d}] must be a non-empty list of turns")
        turns = []
        for t, turn in enumerate(dialogue):
            if (
                not isinstance(turn, list | tuple)
                or len(turn) != 2
                or not all(isinstance(x, str) and x.strip() for x in turn)
            ):
                raise FormatError(
                    f"{where}: dialogues[{d}][{t}] must be [question, answer] (two non-empty "
                    f"strings), got {turn!r:.80}"
                )
            turns.append((turn[0], turn[1]))
        dialogues.append(turns)
    qa: list[dict[str, str]] = []
    for i, item in enumerate(row.get("qa", [])):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("question"), str)
            or not isinstance(item.get("answer"), str)
            or not item["question"].strip()
            or not item["answer"].strip()
        ):
            raise FormatError(
                f"{where}: qa[{i}] must be an object with non-empty 'question' and 'answer' "
                f"strings, got {item!r:.80}"
            )
        kind = item.get("type", "")
        if not isinstance(kind, str) or kind == "overall":
            raise FormatError(
                f"{where}: qa[{i}]'s 'type' must be a string other than 'overall' (the name of "
                f"the evaluation's total), got {kind!r:.80}"
            )
        qa.append({"question": item["question"], "answer": item["answer"], "type": kind})
    if not (captions or dialogues or qa):
        raise FormatError(
            f"{where}: no text for this image; expected 'captions', 'dialogues' or 'qa'"
        )
    return ChatRecord(folder / row["file_name"], captions, dialogues, qa)


def read_chat_records(
    folder: str | os.PathLike[str],
    limit: int | None = None,
    on_bad: OnBad | None = None,
    *,
    progress: bool = True,
) -> list[ChatRecord]:
    """Every row of ``folder/metadata.jsonl`` as a ChatRecord; FormatError names the first bad
    line. ``on_bad`` ("stop" / "skip"): check every record first, images included (a progress bar
    unless ``progress=False``), and stop listing all the bad ones or skip them (data.validate)."""
    folder = Path(folder)
    if on_bad is not None:
        from data.validate import usable_rows

        good = usable_rows(folder, "chat", on_bad, progress=progress)
        return [record_from_row(row, folder, "") for row in good[:limit]]
    rows = read_imagefolder_rows(folder)[:limit]
    return [
        record_from_row(row, folder, f"{folder / 'metadata.jsonl'}: line {n}") for n, row in rows
    ]


def caption_conversation(record: ChatRecord, rng: np.random.Generator) -> list[Message]:
    """Alignment example: a describe request and one of the captions."""
    if not record.captions:
        raise ValueError(f"{record.image}: no captions for an alignment example")
    prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
    caption = record.captions[int(rng.integers(len(record.captions)))]
    return [
        {"role": "user", "content": prompt, "images": [record.image]},
        {"role": "assistant", "content": caption},
    ]


def instruct_conversation(record: ChatRecord, rng: np.random.Generator) -> list[Message]:
    """Instruction example: one dialogue and the short-answer questions, in random order.

    The dialogue (or, without one, a caption turn) stays one block in its own order; it and each
    question are shuffled, so any kind of turn may open the conversation and carry the image
    (evaluation asks every question as the first turn).
    """
    blocks: list[list[tuple[str, str]]] = []
    if record.dialogues:
        blocks.append(list(record.dialogues[int(rng.integers(len(record.dialogues)))]))
    elif record.captions:
        prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
        blocks.append([(prompt, record.captions[int(rng.integers(len(record.captions)))])])
    blocks += [[(short_question(q["question"]), q["answer"])] for q in record.qa]
    turns = [turn for i in rng.permutation(len(blocks)) for turn in blocks[i]]
    messages: list[Message] = []
    for k, (question, answer) in enumerate(turns):
        user: Message = {"role": "user", "content": question}
        if k == 0:
            user["images"] = [record.image]
        messages += [user, {"role": "assistant", "content": answer}]
    return messages
