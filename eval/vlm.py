"""Evaluate a VLM: captions and short answers, on ShapeWorld or on your own images.

    python -m eval.vlm --checkpoint checkpoints/shapes/vlm_lora --data out/shapeworld --split test
    python -m eval.vlm --preset shapes --data out/shapeworld --split test --limit 100 \\
        --out runs/vlm/eval_test.json
    python -m eval.vlm --checkpoint runs/vlm_mine/final --imagefolder my_photos_test
    python -m eval.vlm --checkpoint runs/vlm_coco/final --images coco/val2017 \\
        --captions-json coco/annotations/captions_val2017.json --limit 500

Data: a ShapeWorld split (``--data`` and ``--split``), an imagefolder with ``metadata.jsonl``
(``--imagefolder``; rows as train.vlm reads them: captions and/or ``qa``), or COCO captions
(``--images`` and ``--captions-json``). A bad record or an image that does not open stops the
run before the model loads, named (``python -m data.validate`` lists them all); with an
imagefolder, ``--bad-records skip`` evaluates the rest instead (the first ``--limit`` images
that open), with a warning that lists what was skipped.

Captions: the model is asked "Describe the image." (greedy, up to 80 new tokens) for every image
with reference captions. Scored two ways:

- BLEU-1..4 and CIDEr-D against the references (eval.metrics.coco_caption_scores:
  pycocoevalcap's scorers; CIDEr-D weighs n-grams by how rare they are among the evaluated
  images' references, so it needs many images; on one image it is 0).
- Caption attribute F1, where the rows list their objects (ShapeWorld): the reply is parsed for
  object mentions "<count> <colour> <shape>" (count = a/an/one ... twenty, plural nouns allowed)
  and compared with the image's visible objects as a set of facts: each colour present, each class
  present, and each (colour, class, count) group. "zero red circles" states no fact; in a sentence
  that relates two objects ("A red circle is left of a blue star.", ShapeWorld's spatial
  template) "a" is not a count, so such a mention states the colour and the class but no group.
  The F1 is the micro-F1 over all facts of all images; the colour, class and group F1s are
  reported beside it.

QA: every question of the image (a row's ``qa``) is asked on its own, in a fresh conversation,
with the short-answer instruction (data.conversations.SHORT_ANSWER); the reply, lower-cased,
stripped of punctuation and articles and with number words as digits (VQA's answer processing),
must equal the answer. Accuracy by the questions' ``type`` (ShapeWorld's: count, colour, shape,
position, exists; "other" where a row gives none) and overall (micro over questions).

Time to first token: the median over ``--ttft-repeats`` one-image questions of the time from the
call to the first streamed text (image encoding, prefill and one decoding step included).

Writes JSON (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from core.config import project_path
from core.images import ImageError, load_rgb
from core.io import atomic_write_text
from data.conversations import ChatRecord, record_from_row, short_question
from data.datasets import (
    add_caption_arguments,
    caption_source_error,
    check_images,
    user_captions_to_evaluate,
)
from data.formats import METADATA_FILE, FormatError, read_imagefolder_rows
from data.language import RELATION_PHRASES, number_word, plural
from data.scene import COLOURS, SHAPES
from data.validate import check_imagefolder
from eval.metrics import coco_caption_scores
from vlm.config import PolychromeConfig
from vlm.model import PolychromeVLM

DESCRIBE = "Describe the image."
QA_TYPES = ("count", "colour", "shape", "position", "exists")
_ARTICLES = {"a", "an", "the"}


# number words as digits, as the VQA evaluation's answer processing does (its manualMap:
# "none" and zero to ten; here up to twenty, ShapeWorld's largest count word)
_NUMBERS = {"none": "0"} | {number_word(n): str(n) for n in range(21)}


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, number words as digits, single spaces:
    "The Top-left." -> "top left", "Two." -> "2"."""
    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def _count_words() -> dict[str, int]:
    words = {"a": 1, "an": 1}
    for n in range(0, 21):
        words[number_word(n)] = n
    return words


def parse_objects(
    text: str, colours: Sequence[str], shapes: Sequence[str]
) -> dict[tuple[str, str], int | None]:
    """Object mentions "<count> <colour> <shape>" in a caption -> {(colour, shape): n}, n None
    where the caption names the group without a count (module docstring).

    Counts are words (a, an, one ... twenty); shapes may be plural. A group mentioned twice counts
    once (the larger count, a count over none); a mention of zero objects is no mention.
    """
    counts = _count_words()
    nouns = {s: s for s in shapes} | {plural(s): s for s in shapes}
    relation = re.compile(r"\b(" + "|".join(map(re.escape, RELATION_PHRASES)) + r")\b")
    pattern = re.compile(
        r"\b("
        + "|".join(sorted(counts, key=len, reverse=True))
        + r")\s+("
        + "|".join(sorted(colours, key=len, reverse=True))
        + r")\s+("
        + "|".join(sorted(nouns, key=len, reverse=True))
        + r")\b"
    )
    found: dict[tuple[str, str], int | None] = {}
    for sentence in re.split(r"[.!?;\n]+", text.lower()):
        indefinite = relation.search(sentence) is not None  # "a" there is not a count
        for count, colour, noun in pattern.findall(sentence):
            n: int | None = counts[count]
            if n == 0:
                continue
            if indefinite and count in ("a", "an"):
                n = None
            key = (colour, nouns[noun])
            old = found.get(key)
            found[key] = n if old is None else old if n is None else max(old, n)
    return found


def caption_facts(groups: Mapping[tuple[str, str], int | None]) -> set[tuple[str, ...]]:
    """Facts a caption states: colours present, classes present, (colour, class, count) groups
    (a group named without a count states its colour and class only)."""
    facts: set[tuple[str, ...]] = set()
    for (colour, shape), n in groups.items():
        facts |= {("colour", colour), ("class", shape)}
        if n is not None:
            facts.add(("group", colour, shape, str(n)))
    return facts


def _f1(tp: int, n_pred: int, n_gold: int) -> float:
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 1.0


def caption_scores(
    predicted: Sequence[Mapping[tuple[str, str], int | None]],
    gold: Sequence[Mapping[tuple[str, str], int | None]],
) -> dict[str, float]:
    """Micro-F1 over the facts of all images: overall and per fact kind."""
    totals: dict[str, list[int]] = {k: [0, 0, 0] for k in ("all", "colour", "class", "group")}
    for p, g in zip(predicted, gold, strict=True):
        pf, gf = caption_facts(p), caption_facts(g)
        for kind in ("colour", "class", "group"):
            pk = {f for f in pf if f[0] == kind}
            gk = {f for f in gf if f[0] == kind}
            for key in (kind, "all"):
                totals[key][0] += len(pk & gk)
                totals[key][1] += len(pk)
                totals[key][2] += len(gk)
    return {k: _f1(*v) for k, v in totals.items()}


Objects = Counter[tuple[str, str]]  # an image's visible objects: {(colour, shape): n}


def gold_objects(folder: Path, limit: int | None = None) -> list[Objects]:
    """Visible objects per image of a ShapeWorld split folder: Counter{(colour, shape): n}."""
    return _shapeworld_objects(read_imagefolder_rows(folder)[:limit], folder / METADATA_FILE)


def _shapeworld_objects(
    rows: Sequence[tuple[int, Mapping[str, Any]]], where: Path
) -> list[Objects]:
    """The objects of every numbered row; FormatError naming the first row without them."""
    bad = next((n for n, row in rows if _objects(row) is None), None)
    if bad is not None:
        raise FormatError(
            f"{where}: line {bad}: expected 'objects', a list of {{'colour', 'shape'}} objects "
            "(ShapeWorld's metadata)"
        )
    return [cast(Objects, _objects(row)) for _, row in rows]


def _objects(row: Mapping[str, Any]) -> Objects | None:
    """A row's visible objects when it lists them as ShapeWorld does, else None."""
    objects = row.get("objects")
    if not isinstance(objects, list) or not all(
        isinstance(o, dict) and isinstance(o.get("colour"), str) and isinstance(o.get("shape"), str)
        for o in objects
    ):
        return None
    return Counter((o["colour"], o["shape"]) for o in objects)


def merge_records(records: Sequence[ChatRecord]) -> list[ChatRecord]:
    """One record per image file: rows that name the same file (one row per caption or per
    question) are merged, their captions, dialogues and questions kept in order."""
    merged: dict[Path, ChatRecord] = {}
    for r in records:
        key = r.image.resolve()
        if key not in merged:
            merged[key] = ChatRecord(r.image, [], [], [])
        merged[key].captions += r.captions
        merged[key].dialogues += r.dialogues
        merged[key].qa += r.qa
    return list(merged.values())


def read_eval_set(args: argparse.Namespace) -> tuple[list[ChatRecord], list[Objects] | None, str]:
    """(records, their objects or None, a one-line description) of the data options, the first
    ``--limit`` images only (rows naming one file merged), their image files checked (headers)
    before any model loads; ValueError (FormatError) or FileNotFoundError saying what is wrong.

    Objects (for the caption attribute F1) are ShapeWorld's; a user's folder gets them only when
    every row lists them in ShapeWorld's form (another "objects", such as Hugging Face's
    detection boxes, is not read)."""
    if args.images is not None:
        pairs = user_captions_to_evaluate(args, args.limit)
        records = [ChatRecord(p, c) for p, c in zip(pairs.image_paths, pairs.captions, strict=True)]
        return records, None, f"COCO captions {args.captions_json} (images {args.images})"
    if args.data is not None:  # generated: one row per image, files not checked
        folder = args.data / args.split
        rows = read_imagefolder_rows(folder)[: args.limit]
        where = folder / METADATA_FILE
        records = [record_from_row(row, folder, f"{where}: line {n}") for n, row in rows]
        return records, _shapeworld_objects(rows, where), f"ShapeWorld {folder}"
    folder, where = args.imagefolder, args.imagefolder / METADATA_FILE
    # every row's text first (cheap); then the images of the first --limit only
    report = check_imagefolder(folder, "chat", check_images=False, progress=not args.no_progress)
    if report.bad and args.bad_records == "stop":
        raise FormatError(report.describe() + "\nfix them, or pass --bad-records skip")
    numbered = report.good
    merged = merge_records(
        [record_from_row(row, folder, f"{where}: line {n}") for n, row in numbered]
    )
    if args.bad_records == "stop":
        records = merged[: args.limit]
        check_images([(r.image, None) for r in records], where)
    else:  # the first --limit images that open, read in full (as training checks them)
        records, unreadable = [], []
        for r in merged:
            if args.limit is not None and len(records) == args.limit:
                break
            try:
                load_rgb(r.image)
            except ImageError as err:
                unreadable.append(str(err))
                continue
            records.append(r)
        skipped = len(report.bad) + len(unreadable)
        if skipped:
            text = [report.describe()] if report.bad else []
            text += [f"  {p}" for p in unreadable]
            warnings.warn(f"skipping {skipped} bad records:\n" + "\n".join(text), stacklevel=2)
        if not records:
            raise FormatError(f"{where}: no good record left to evaluate")
    objects: dict[Path, Objects | None] = {}
    for _, row in numbered:
        objects.setdefault((folder / row["file_name"]).resolve(), _objects(row))
    listed = [objects[r.image.resolve()] for r in records]
    own_gold = None if any(o is None for o in listed) else cast(list[Objects], listed)
    return records, own_gold, f"imagefolder {folder}"


def load_vlm(args: argparse.Namespace) -> PolychromeVLM:
    """--checkpoint, else the preset's VLM checkpoint, else a random projector."""
    if args.checkpoint is not None:
        return PolychromeVLM.from_pretrained(args.checkpoint)
    preset = PolychromeConfig.from_preset(args.preset)
    if preset.vlm.checkpoint:
        return PolychromeVLM.from_pretrained(project_path(preset.vlm.checkpoint))
    return PolychromeVLM.build(preset.vlm.core_config(preset.llm, preset.clip))


def evaluate_vlm(
    vlm: PolychromeVLM,
    records: Sequence[ChatRecord],
    gold_objects: Sequence[Objects] | None = None,
    *,
    batch_size: int = 8,
    caption_tokens: int = 80,
    ttft_repeats: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Caption scores, QA accuracy by type and time to first token (module docstring).
    `gold_objects`: each record's visible objects, for the caption attribute F1 (ShapeWorld);
    None leaves it out. Images with neither captions nor objects are not captioned."""
    if gold_objects is not None and len(gold_objects) != len(records):
        raise ValueError(
            f"one objects entry per record: received {len(gold_objects)} for {len(records)}"
        )
    described = [i for i, r in enumerate(records) if r.captions or gold_objects is not None]
    captions: dict[int, str] = {}
    for start in tqdm(
        range(0, len(described), batch_size), desc="captions", unit="batch", disable=not progress
    ):
        chunk = described[start : start + batch_size]
        prompts = [
            [{"role": "user", "content": DESCRIBE, "images": [records[i].image]}] for i in chunk
        ]
        captions |= dict(
            zip(chunk, vlm.generate_texts(prompts, max_new_tokens=caption_tokens), strict=True)
        )
    attribute_f1 = None
    if gold_objects is not None:
        colours, shapes = list(COLOURS), list(SHAPES)
        predicted = [parse_objects(captions[i], colours, shapes) for i in range(len(records))]
        attribute_f1 = caption_scores(predicted, gold_objects)
    referenced = [i for i in described if records[i].captions]
    reference_scores = (
        coco_caption_scores(
            [records[i].captions for i in referenced], [captions[i] for i in referenced]
        )
        if referenced
        else None
    )

    questions = [(r, q) for r in records for q in r.qa]
    replies: list[str] = []
    for start in tqdm(
        range(0, len(questions), batch_size), desc="questions", unit="batch", disable=not progress
    ):
        pairs = questions[start : start + batch_size]
        prompts = [
            [{"role": "user", "content": short_question(q["question"]), "images": [r.image]}]
            for r, q in pairs
        ]
        replies += vlm.generate_texts(prompts, max_new_tokens=8)
    right: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    for (_, q), reply in zip(questions, replies, strict=True):
        kind = q.get("type") or "other"
        asked[kind] += 1
        right[kind] += normalise_answer(reply) == normalise_answer(q["answer"])
    qa = {k: right[k] / asked[k] for k in asked}
    if questions:
        qa["overall"] = sum(right.values()) / sum(asked.values())

    ttft = []
    for r in records[:ttft_repeats]:
        question = short_question(r.qa[0]["question"]) if r.qa else DESCRIBE
        msgs = [{"role": "user", "content": question, "images": [r.image]}]
        began = time.perf_counter()
        batch = vlm.prepare(msgs)
        stream = vlm.stream(batch, {"max_new_tokens": 2, "do_sample": False})
        for chunk_text in stream:
            if chunk_text:
                break
        ttft.append(time.perf_counter() - began)
        for _ in stream:  # let the generation thread finish before the next measurement
            pass
    examples = [
        {
            "image": str(records[i].image),
            "caption": captions[i],
            "references": records[i].captions,
        }
        | (
            {"gold": sorted(f"{n} {a} {b}" for (a, b), n in gold_objects[i].items())}
            if gold_objects is not None
            else {}
        )
        for i in described[:5]
    ]
    return {
        "images": len(records),
        "captioned": len(described),
        "questions": sum(asked.values()),
        "questions_by_type": dict(asked),
        "caption_f1": attribute_f1,
        "caption_references": reference_scores,
        "qa_accuracy": qa,
        "ttft_s_median": statistics.median(ttft) if ttft else None,
        "examples": examples,
        "qa_examples": [
            {"q": q["question"], "answer": q["answer"], "reply": rep}
            for (_, q), rep in list(zip(questions, replies, strict=True))[:10]
        ],
        # every question's reply, for error analysis (e.g. what position questions get)
        "qa_replies": [
            {
                "image": str(r.image),
                "type": q.get("type") or "other",
                "q": q["question"],
                "answer": q["answer"],
                "reply": rep,
                "right": normalise_answer(rep) == normalise_answer(q["answer"]),
            }
            for (r, q), rep in zip(questions, replies, strict=True)
        ],
        "captions": [{"image": str(records[i].image), "caption": captions[i]} for i in described],
    }


def markdown(result: dict[str, Any]) -> str:
    cap, refs, qa = result["caption_f1"], result["caption_references"], result["qa_accuracy"]
    lines = ["| metric | value |", "|---|---|"]
    if cap is not None:
        lines.append(
            f"| caption attribute F1 (colour / class / group) | {cap['all']:.3f} "
            f"({cap['colour']:.3f} / {cap['class']:.3f} / {cap['group']:.3f}) |"
        )
    if refs is not None:
        lines.append(
            f"| captions against references, BLEU-4 / CIDEr-D | {100 * refs['bleu4']:.1f} / "
            f"{100 * refs['cider']:.1f} |"
        )
    kinds = [k for k in QA_TYPES if k in qa] + sorted(set(qa) - {*QA_TYPES, "overall"})
    for kind in (*kinds, "overall"):
        if kind in qa:
            n = result["questions_by_type"].get(kind, result["questions"])
            lines.append(f"| QA accuracy: {kind} (n={n}) | {100 * qa[kind]:.1f}% |")
    if result["ttft_s_median"] is not None:
        lines.append(
            f"| time to first token, one-image question | {result['ttft_s_median']:.2f} s |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.vlm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, help="a PolychromeVLM.save_pretrained folder")
    which.add_argument(
        "--preset", default="shapes", help="use the preset's VLM checkpoint (default shapes)"
    )
    src = parser.add_argument_group(
        "data (one of --data, --imagefolder, --images with --captions-json)"
    )
    src.add_argument("--data", type=Path, help="a ShapeWorld folder")
    src.add_argument("--split", default="test", help="its split to evaluate (default test)")
    add_caption_arguments(src, "captions and/or qa")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--ttft-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, received {args.limit}")
    why = caption_source_error(args)
    if why:
        parser.error(why)
    if args.data is not None and not (args.data / args.split / METADATA_FILE).is_file():
        parser.error(
            f"{args.data / args.split / METADATA_FILE} not found; generate ShapeWorld with "
            "data.shapeworld"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        records, gold, described = read_eval_set(args)
    except (ValueError, OSError) as err:  # bad data: say what, before the model loads
        parser.error(str(err))
    if not records:
        parser.error(f"no images to evaluate in {described}")
    if not any(r.captions or r.qa for r in records) and gold is None:
        parser.error(f"{described}: no image has captions or questions to evaluate")
    vlm = load_vlm(args)
    result = evaluate_vlm(
        vlm,
        records,
        gold,
        batch_size=args.batch_size,
        ttft_repeats=args.ttft_repeats,
        progress=not args.no_progress,
    )
    result["data"] = described
    result["command"] = "python -m eval.vlm " + shlex.join(argv)
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
