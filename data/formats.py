"""Readers and writers for the standard dataset formats every training and eval script reads.

A user's COCO, RefCOCO or Hugging Face imagefolder data plugs in unchanged; ShapeWorld's exporter
builds these records and calls the writers. On disk:

- COCO instances: one JSON object ``{"info", "images", "annotations", "categories", ...}`` as in
  ``instances_val2017.json``. Masks are written as compressed RLE
  ``{"size": [H, W], "counts": str}``; the reader also accepts polygons and uncompressed RLE
  (list counts) and turns them into compressed RLE. Keys we do not model ("licenses", an
  image's "coco_url", a category's "unseen") are kept in ``extra`` and written back as they were.
- COCO captions: ``{"info", "images", "annotations": [{"id", "image_id", "caption"}]}`` as in
  ``captions_val2017.json``.
- RefCOCO-style refs: a JSON list of refs with the fields of the refer API's ``refs(unc).p``
  (``ref_id, ann_id, image_id, category_id, split, sentences, sent_ids``). Never pickle. A refs
  folder holds ``refs.json`` + ``instances.json`` (all splits, refs carry their split) or
  ``refs_{split}.json`` + ``instances_{split}.json`` (see :func:`read_refcoco_folder`).
- Hugging Face imagefolder: images anywhere under a folder plus ``metadata.jsonl`` at its root,
  one JSON object per line with ``file_name`` relative to the folder.

Every reader validates what it reads and raises :class:`FormatError` naming the file, the record
(``annotations[3] (id=17)``), the field, what was expected and what was received. Writers run the
same checks before writing and write through :func:`core.io.atomic_write`, so a failed export
leaves no broken file. Reading what a writer wrote gives records equal to the originals.

Example::

    rle = mask_to_rle(mask)  # (H, W) bool -> {"size": [H, W], "counts": "..."}
    write_coco_instances("out/instances_train.json", CocoInstances(images, annotations, categories))
    coco = read_coco_instances("out/instances_train.json")
    mask = rle_to_mask(coco.annotations[0].segmentation, h, w)
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NoReturn, TextIO, cast

import numpy as np
from pycocotools import mask as mask_utils

from core.io import atomic_write

__all__ = [
    "METADATA_FILE",
    "CocoAnnotation",
    "CocoCaption",
    "CocoCaptions",
    "CocoCategory",
    "CocoImage",
    "CocoInstances",
    "FormatError",
    "RefRecord",
    "RefSentence",
    "RefcocoSplit",
    "mask_to_rle",
    "read_coco_captions",
    "read_coco_instances",
    "read_imagefolder",
    "read_imagefolder_rows",
    "read_refcoco_folder",
    "read_refs",
    "ref_annotation",
    "rle_to_mask",
    "row_captions",
    "write_coco_captions",
    "write_coco_instances",
    "write_imagefolder_metadata",
    "write_refs",
]

PathLike = str | os.PathLike[str]

# The Hugging Face imagefolder metadata file, at the root of the folder.
METADATA_FILE = "metadata.jsonl"


class FormatError(ValueError):
    """A file (or a record about to be written) does not follow its format."""


# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class CocoImage:
    id: int  # unique among the file's images
    file_name: str  # path relative to the image root
    height: int  # H, pixels
    width: int  # W, pixels
    extra: dict[str, Any] = field(default_factory=dict)  # other keys (license, coco_url, ...)


@dataclass
class CocoCategory:
    id: int  # unique among the file's categories (COCO ids are 1-based)
    name: str
    supercategory: str
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, e.g. {"unseen": True}


@dataclass
class CocoAnnotation:
    id: int  # unique among the file's annotations
    image_id: int  # a CocoImage.id
    category_id: int  # a CocoCategory.id
    segmentation: dict[str, Any]  # compressed RLE {"size": [H, W], "counts": str} (mask_to_rle)
    area: float  # mask area in pixels
    bbox: list[float]  # [x, y, w, h]
    iscrowd: int = 0  # 0 or 1
    extra: dict[str, Any] = field(default_factory=dict)  # other keys (score, attributes, ...)


@dataclass
class CocoInstances:
    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    categories: list[CocoCategory]
    info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys ("licenses", ...)


@dataclass
class CocoCaption:
    id: int  # unique among the file's captions
    image_id: int  # a CocoImage.id
    caption: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CocoCaptions:
    images: list[CocoImage]
    captions: list[CocoCaption]
    info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys


@dataclass
class RefSentence:
    sent_id: int  # unique across the refs file
    sent: str  # normalised expression (RefCOCO: lower case, punctuation stripped)
    tokens: list[str]
    raw: str  # the expression as written
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefRecord:
    ref_id: int  # unique across the refs file
    ann_id: int  # the referred CocoAnnotation.id
    image_id: int
    category_id: int
    split: str  # "train", "val", "testA", ...
    sentences: list[RefSentence]  # at least one
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"expression_type": "spatial"}


@dataclass
class RefcocoSplit:
    refs: list[RefRecord]  # the refs of one split
    instances: CocoInstances  # the annotations they refer to (all of the instances file)


# Keys each record models; everything else goes to `extra`. "sent_ids" is derived from sentences.
_TOP_INSTANCES = ("info", "images", "annotations", "categories")
_TOP_CAPTIONS = ("info", "images", "annotations")
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_CATEGORY_KEYS = ("id", "name", "supercategory")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd")
_CAPTION_KEYS = ("id", "image_id", "caption")
_REF_KEYS = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences", "sent_ids")
_SENTENCE_KEYS = ("sent_id", "sent", "tokens", "raw")


# ----------------------------------------------------------------------------------------------
# Masks


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool mask -> compressed COCO RLE ``{"size": [H, W], "counts": str}`` (JSON-safe)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.bool_ or mask.size == 0:
        raise ValueError(
            f"mask_to_rle: expected a non-empty (H, W) bool array, got {mask.dtype} array of "
            f"shape {mask.shape}"
        )
    # pycocotools runs over columns: it needs Fortran order.
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def rle_to_mask(rle: dict[str, Any] | list[list[float]], h: int, w: int) -> np.ndarray:
    """A COCO segmentation of an (h, w) image -> (H, W) bool mask.

    Accepts compressed RLE (str or bytes counts), uncompressed RLE (list counts) and polygons
    (a list of [x1, y1, x2, y2, ...]). An RLE whose size is not [h, w], or whose run lengths do not
    cover exactly h * w pixels, raises FormatError.
    """
    if type(h) is not int or type(w) is not int or h <= 0 or w <= 0:
        raise ValueError(f"rle_to_mask: expected positive int h, w, got h={h!r}, w={w!r}")
    if isinstance(rle, dict) and isinstance(rle.get("counts"), bytes):
        rle = {**rle, "counts": rle["counts"].decode("ascii", errors="replace")}
    rec = _Rec(rle, src=None, label="rle_to_mask")
    compressed, pending = _segmentation_to_rle(rec, "segmentation", rle, h, w, strict=False)
    if pending is not None:
        _check_counts(
            [(rec, "segmentation.counts", pending)], np.array([h * w], np.int64), f"{h} * {w}"
        )
    mask = mask_utils.decode({"size": [h, w], "counts": compressed["counts"].encode("ascii")})
    return np.ascontiguousarray(mask, dtype=bool)  # (H, W)


# ----------------------------------------------------------------------------------------------
# COCO instances


def write_coco_instances(path: PathLike, instances: CocoInstances) -> None:
    """Write a COCO instances JSON file (atomically; checked like the reader checks)."""
    path = Path(path)
    top = _top_to_json(path, instances.info, instances.extra, _TOP_INSTANCES)
    top["images"] = [_image_to_json(path, i, im) for i, im in enumerate(instances.images)]
    top["annotations"] = [
        _annotation_to_json(path, i, a) for i, a in enumerate(instances.annotations)
    ]
    top["categories"] = [
        _record_to_json(
            path,
            f"categories[{i}] (id={c.id!r})",
            {"id": _as_int(c.id), "name": c.name, "supercategory": c.supercategory},
            c.extra,
        )
        for i, c in enumerate(instances.categories)
    ]
    _parse_instances(top, str(path), strict=True)
    _write_json(path, top)


def read_coco_instances(path: PathLike) -> CocoInstances:
    """Read and validate a COCO instances JSON file; every segmentation becomes compressed RLE."""
    path = Path(path)
    return _parse_instances(_load_json(path), str(path), strict=False)


def _parse_instances(doc: Any, src: str, *, strict: bool) -> CocoInstances:
    top = _Rec.top(doc, src, "an object with 'images', 'annotations' and 'categories'")
    info = top.mapping("info", optional=True)
    images, image_index = _parse_images(top)
    categories: list[CocoCategory] = []
    category_index: dict[int, int] = {}
    for i, obj in enumerate(top.array("categories")):
        r = top.child("categories", i, obj, "id")
        cat = CocoCategory(
            id=r.integer("id"),
            name=r.string("name"),
            supercategory=r.string("supercategory"),
            extra=r.extra(_CATEGORY_KEYS),
        )
        _check_unique(r, "id", cat.id, category_index, "categories", i)
        categories.append(cat)

    annotations: list[CocoAnnotation] = []
    annotation_index: dict[int, int] = {}
    pending: list[tuple[_Rec, str, str]] = []  # compressed counts, checked in one batch below
    pixels: list[int] = []
    for i, obj in enumerate(top.array("annotations")):
        r = top.child("annotations", i, obj, "id")
        ann_id = r.integer("id")
        _check_unique(r, "id", ann_id, annotation_index, "annotations", i)
        image = images[_lookup(r, "image_id", image_index, "an image id listed in 'images'")]
        category_id = r.integer("category_id")
        if category_id not in category_index:
            r.fail("category_id", "a category id listed in 'categories'", category_id)
        seg = r.get("segmentation", "a COCO RLE object or a list of polygons")
        rle, counts = _segmentation_to_rle(
            r, "segmentation", seg, image.height, image.width, strict=strict, image_id=image.id
        )
        if counts is not None:
            pending.append((r, "segmentation.counts", counts))
            pixels.append(image.height * image.width)
        iscrowd = r.integer("iscrowd")
        if iscrowd not in (0, 1):
            r.fail("iscrowd", "0 or 1", iscrowd)
        annotations.append(
            CocoAnnotation(
                id=ann_id,
                image_id=image.id,
                category_id=category_id,
                segmentation=rle,
                area=r.num("area", nonnegative=True),
                bbox=r.bbox("bbox"),
                iscrowd=iscrowd,
                extra=r.extra(_ANNOTATION_KEYS),
            )
        )
    _check_counts(pending, np.array(pixels, np.int64), "height * width of its image")
    return CocoInstances(images, annotations, categories, info, top.extra(_TOP_INSTANCES))


# ----------------------------------------------------------------------------------------------
# COCO captions


def write_coco_captions(
    path: PathLike,
    images: Sequence[CocoImage],
    captions: Sequence[CocoCaption],
    info: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a COCO captions JSON file (atomically); `extra` holds other top-level keys."""
    path = Path(path)
    top = _top_to_json(path, dict(info or {}), dict(extra or {}), _TOP_CAPTIONS)
    top["images"] = [_image_to_json(path, i, im) for i, im in enumerate(images)]
    top["annotations"] = [
        _record_to_json(
            path,
            f"annotations[{i}] (id={c.id!r})",
            {"id": _as_int(c.id), "image_id": _as_int(c.image_id), "caption": c.caption},
            c.extra,
        )
        for i, c in enumerate(captions)
    ]
    _parse_captions(top, str(path))
    _write_json(path, top)


def read_coco_captions(path: PathLike) -> CocoCaptions:
    """Read and validate a COCO captions JSON file."""
    path = Path(path)
    return _parse_captions(_load_json(path), str(path))


def _parse_captions(doc: Any, src: str) -> CocoCaptions:
    top = _Rec.top(doc, src, "an object with 'images' and 'annotations'")
    info = top.mapping("info", optional=True)
    images, image_index = _parse_images(top)
    captions: list[CocoCaption] = []
    caption_index: dict[int, int] = {}
    for i, obj in enumerate(top.array("annotations")):
        r = top.child("annotations", i, obj, "id")
        caption_id = r.integer("id")
        _check_unique(r, "id", caption_id, caption_index, "annotations", i)
        image = images[_lookup(r, "image_id", image_index, "an image id listed in 'images'")]
        captions.append(
            CocoCaption(caption_id, image.id, r.string("caption"), r.extra(_CAPTION_KEYS))
        )
    return CocoCaptions(images, captions, info, top.extra(_TOP_CAPTIONS))


# ----------------------------------------------------------------------------------------------
# RefCOCO-style refs


def write_refs(path: PathLike, refs: Sequence[RefRecord]) -> None:
    """Write refs as a JSON list with the refer API's fields (plus each ref's `extra`)."""
    path = Path(path)
    doc = [_ref_to_json(path, i, ref) for i, ref in enumerate(refs)]
    _parse_refs(doc, str(path))
    _write_json(path, doc, root="refs")


def read_refs(path: PathLike) -> list[RefRecord]:
    """Read and validate a refs JSON list (ref_ids and sent_ids unique across the file)."""
    path = Path(path)
    return _parse_refs(_load_json(path), str(path))


def read_refcoco_folder(folder: PathLike, split: str) -> RefcocoSplit:
    """Read one split of a RefCOCO-style folder and check its refs against the instances.

    The folder holds either ``refs_{split}.json`` + ``instances_{split}.json`` (one pair per split;
    every ref must carry that split) or ``refs.json`` + ``instances.json`` (all splits in one pair;
    the refs of `split` are returned). The per-split pair wins when both are present. Every ref's
    ann_id must be an annotation of the instances file with the ref's image_id and category_id.
    """
    folder = Path(folder)
    per_split = folder / f"refs_{split}.json"
    if per_split.exists():
        refs_path, instances_path = per_split, folder / f"instances_{split}.json"
    elif (folder / "refs.json").exists():
        refs_path, instances_path = folder / "refs.json", folder / "instances.json"
    else:
        raise FileNotFoundError(
            f"{folder}: expected refs_{split}.json + instances_{split}.json, or refs.json + "
            f"instances.json; found neither refs file"
        )
    if not instances_path.exists():
        raise FileNotFoundError(f"{instances_path}: missing (it pairs with {refs_path.name})")
    all_refs = read_refs(refs_path)
    instances = read_coco_instances(instances_path)
    if refs_path == per_split:
        for i, ref in enumerate(all_refs):
            if ref.split != split:
                raise FormatError(
                    f"{refs_path}: refs[{i}] (ref_id={ref.ref_id}): field 'split': expected "
                    f"{split!r} (the file is refs_{split}.json), got str {ref.split!r}"
                )
        refs = all_refs
    else:
        refs = [ref for ref in all_refs if ref.split == split]
        if not refs:
            found = sorted({ref.split for ref in all_refs})
            raise ValueError(f"{refs_path}: no refs with split {split!r}; splits present: {found}")
    annotations = {a.id: a for a in instances.annotations}
    for i, ref in enumerate(all_refs):
        if ref.split == split:
            ref_annotation(ref, annotations, f"{refs_path}: refs[{i}]", instances_path)
    return RefcocoSplit(refs, instances)


def ref_annotation(
    ref: RefRecord, annotations: dict[int, CocoAnnotation], where: str, instances_path: PathLike
) -> CocoAnnotation:
    """The annotation `ref` points to; FormatError naming `where` (the refs file and record) and
    the field when its ann_id is not in `annotations` (by id, from `instances_path`) or its
    image_id or category_id differ from the annotation's."""
    where = f"{where} (ref_id={ref.ref_id})"
    ann = annotations.get(ref.ann_id)
    if ann is None:
        raise FormatError(
            f"{where}: field 'ann_id': expected an annotation id of {instances_path}, "
            f"got int {ref.ann_id}"
        )
    for name, got, want in (
        ("image_id", ref.image_id, ann.image_id),
        ("category_id", ref.category_id, ann.category_id),
    ):
        if got != want:
            raise FormatError(
                f"{where}: field {name!r}: expected {want} (the {name} of annotation "
                f"{ann.id} in {instances_path}), got int {got}"
            )
    return ann


def _ref_to_json(path: Path, i: int, ref: RefRecord) -> dict[str, Any]:
    where = f"refs[{i}] (ref_id={ref.ref_id!r})"
    sentences = [
        _record_to_json(
            path,
            f"{where}.sentences[{j}] (sent_id={s.sent_id!r})",
            {
                "sent_id": _as_int(s.sent_id),
                "sent": s.sent,
                "tokens": list(s.tokens) if isinstance(s.tokens, list | tuple) else s.tokens,
                "raw": s.raw,
            },
            s.extra,
        )
        for j, s in enumerate(ref.sentences)
    ]
    standard = {
        "ref_id": _as_int(ref.ref_id),
        "ann_id": _as_int(ref.ann_id),
        "image_id": _as_int(ref.image_id),
        "category_id": _as_int(ref.category_id),
        "split": ref.split,
        "sentences": sentences,
        "sent_ids": [s["sent_id"] for s in sentences],
    }
    return _record_to_json(path, where, standard, ref.extra)


def _parse_refs(doc: Any, src: str) -> list[RefRecord]:
    if not isinstance(doc, list):
        raise FormatError(f"{src}: expected a JSON list of refs, got {_show(doc)}")
    refs: list[RefRecord] = []
    ref_index: dict[int, int] = {}
    sent_index: dict[int, str] = {}
    for i, obj in enumerate(doc):
        r = _Rec.item(obj, src, "refs", i, "ref_id")
        ref_id = r.integer("ref_id")
        _check_unique(r, "ref_id", ref_id, ref_index, "refs", i)
        sentences: list[RefSentence] = []
        items = r.array("sentences")
        if not items:
            r.fail("sentences", "at least one sentence", items)
        for j, sobj in enumerate(items):
            s = _Rec.item(sobj, src, f"{r.label}.sentences", j, "sent_id")
            sent_id = s.integer("sent_id")
            if sent_id in sent_index:
                s.fail(
                    "sent_id",
                    "a value unique among the file's sent_ids",
                    sent_id,
                    sent_index[sent_id],
                )
            sent_index[sent_id] = f"(also used by {s.label})"
            sentences.append(
                RefSentence(
                    sent_id,
                    s.string("sent"),
                    s.strings("tokens"),
                    s.string("raw"),
                    s.extra(_SENTENCE_KEYS),
                )
            )
        if "sent_ids" in r.data:
            expected = [s.sent_id for s in sentences]
            if r.data["sent_ids"] != expected:
                r.fail("sent_ids", f"the sentences' sent_ids {expected}", r.data["sent_ids"])
        refs.append(
            RefRecord(
                ref_id=ref_id,
                ann_id=r.integer("ann_id"),
                image_id=r.integer("image_id"),
                category_id=r.integer("category_id"),
                split=r.string("split"),
                sentences=sentences,
                extra=r.extra(_REF_KEYS),
            )
        )
    return refs


# ----------------------------------------------------------------------------------------------
# Hugging Face imagefolder


def write_imagefolder_metadata(folder: PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``folder/metadata.jsonl`` (atomically): one JSON object per row, in order.

    Each row has "file_name", a relative path (forward slashes) of an existing file inside
    `folder`, plus any JSON fields. Returns the metadata path.
    """
    folder = Path(folder)
    path = folder / METADATA_FILE
    root = folder.resolve()
    rows = [dict(row) if isinstance(row, Mapping) else row for row in rows]
    for i, row in enumerate(rows):
        _check_file_name(row, root, f"{path}: rows[{i}]")
    with atomic_write(path, "w") as fh:
        f = cast(TextIO, fh)
        for i, row in enumerate(rows):
            f.write(_dumps(row, f"{path}: rows[{i}]") + "\n")
    return path


def read_imagefolder(folder: PathLike) -> list[dict[str, Any]]:
    """Read and validate ``folder/metadata.jsonl``; rows come back as written.

    Every line but blank ones (skipped) must be a JSON object whose "file_name" is a relative
    path of an existing file inside `folder` (absolute paths, '..' and symlinks leading outside
    are rejected). The first bad line raises FormatError; data.validate reports every bad line
    instead, and can skip them.
    """
    path, lines = imagefolder_lines(folder)
    root = Path(folder).resolve()
    return [parse_imagefolder_line(line, root, f"{path}: line {n}") for n, line in lines]


# the keys a metadata.jsonl row may hold its captions under, in order: a list, or one string
# ("text" is what Hugging Face's captioning imagefolders use)
CAPTION_KEYS = ("captions", "caption", "text")


def row_captions(row: Mapping[str, Any], where: str, *, required: bool = True) -> list[str]:
    """The captions of one metadata.jsonl row: its first key of CAPTION_KEYS, as a list of
    strings; FormatError naming `where` if that value is not one non-empty string or a list of
    them, or (with `required`) if the row has none. Without `required`, no key gives []."""
    key = next((k for k in CAPTION_KEYS if k in row), None)
    if key is None:
        if not required:
            return []
        raise FormatError(
            f"{where}: no caption: expected {' or '.join(map(repr, CAPTION_KEYS))} (a non-empty "
            f"string or a list of them); fields present: {sorted(row)}"
        )
    value = row[key]
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or (required and not value)
        or not all(isinstance(c, str) and c.strip() for c in value)
    ):
        raise FormatError(
            f"{where}: {key!r} must be a non-empty string or a list of them, received "
            f"{_show(row[key])}"
        )
    return list(value)


def read_imagefolder_rows(folder: PathLike) -> list[tuple[int, dict[str, Any]]]:
    """`read_imagefolder`'s rows with their line numbers in metadata.jsonl (blank lines count),
    for messages that name the line a person sees in an editor."""
    path, lines = imagefolder_lines(folder)
    root = Path(folder).resolve()
    return [(n, parse_imagefolder_line(line, root, f"{path}: line {n}")) for n, line in lines]


def imagefolder_lines(folder: PathLike) -> tuple[Path, list[tuple[int, str]]]:
    """(the metadata.jsonl path, its (line number, text) rows, blank lines left out);
    FileNotFoundError without it."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (an imagefolder needs {METADATA_FILE})")
    lines = _read_text(path).split("\n")
    return path, [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]


def parse_imagefolder_line(line: str, root: Path, where: str) -> dict[str, Any]:
    """One metadata.jsonl row (see read_imagefolder); FormatError naming `where` if it is bad."""
    try:
        row = json.loads(line, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
    except _BadConstant as e:
        raise FormatError(f"{where}: {e}") from None
    if not isinstance(row, dict):
        raise FormatError(f"{where}: expected a JSON object, got {_show(row)}")
    _check_file_name(row, root, where)
    return row


def _check_file_name(row: Any, root: Path, where: str) -> None:
    if not isinstance(row, dict):
        raise FormatError(f"{where}: expected an object with 'file_name', got {_show(row)}")
    if "file_name" not in row:
        raise FormatError(
            f"{where}: missing field 'file_name' (expected a relative path inside {root}); "
            f"fields present: {sorted(row)}"
        )
    name = row["file_name"]
    expected = f"a relative path (forward slashes) of a file inside {root}"
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: field 'file_name': expected {expected}, got {_show(name)}")
    windows = PureWindowsPath(name)
    if "\\" in name or PurePosixPath(name).is_absolute() or windows.drive or windows.root:
        raise FormatError(
            f"{where}: field 'file_name': expected {expected}, got absolute or backslash path "
            f"{name!r}"
        )
    if ".." in PurePosixPath(name).parts:
        raise FormatError(
            f"{where}: field 'file_name': expected {expected} without '..', got {name!r}"
        )
    full = (root / name).resolve()
    if not full.is_relative_to(root):
        raise FormatError(
            f"{where}: field 'file_name': expected {expected}, got {name!r} which resolves to "
            f"{full} (a link out of the folder)"
        )
    if not full.is_file():
        raise FormatError(
            f"{where}: field 'file_name': expected {expected}, got {name!r} (no such file)"
        )


# ----------------------------------------------------------------------------------------------
# Record checking. A _Rec is one JSON object being read, with where it sits for error messages.


class _Rec:
    __slots__ = ("data", "label", "src")

    def __init__(self, data: Any, src: str | None, label: str) -> None:
        self.data = data
        self.src = src
        self.label = label

    @classmethod
    def top(cls, doc: Any, src: str, expected: str) -> _Rec:
        if not isinstance(doc, dict):
            raise FormatError(f"{src}: expected {expected}, got {_show(doc)}")
        return cls(doc, src, "")

    @classmethod
    def item(cls, data: Any, src: str | None, section: str, index: int, id_key: str) -> _Rec:
        label = f"{section}[{index}]"
        if isinstance(data, dict) and id_key in data:
            label += f" ({id_key}={_short(data[id_key])})"
        rec = cls(data, src, label)
        if not isinstance(data, dict):
            raise FormatError(f"{rec.where()}: expected a JSON object, got {_show(data)}")
        return rec

    def child(self, section: str, index: int, data: Any, id_key: str) -> _Rec:
        return _Rec.item(data, self.src, section, index, id_key)

    def where(self) -> str:
        return ": ".join(part for part in (self.src, self.label) if part)

    def fail(self, name: str, expected: str, got: Any, note: str = "") -> NoReturn:
        msg = f"{self.where()}: field {name!r}: expected {expected}, got {_show(got)}"
        raise FormatError(f"{msg} {note}" if note else msg)

    def get(self, name: str, expected: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise FormatError(
                f"{self.where()}: missing field {name!r} (expected {expected}); "
                f"fields present: {sorted(self.data)}"
            ) from None

    def integer(self, name: str) -> int:
        v = self.get(name, "an int")
        if type(v) is not int:
            self.fail(name, "an int", v)
        return v

    def positive_int(self, name: str) -> int:
        v = self.get(name, "a positive int")
        if type(v) is not int or v <= 0:
            self.fail(name, "a positive int", v)
        return v

    def num(self, name: str, *, nonnegative: bool = False) -> float:
        expected = "a finite number" + (" >= 0" if nonnegative else "")
        v = self.get(name, expected)
        if not _is_number(v) or (nonnegative and v < 0):
            self.fail(name, expected, v)
        return float(v)

    def string(self, name: str) -> str:
        v = self.get(name, "a string")
        if not isinstance(v, str):
            self.fail(name, "a string", v)
        return v

    def strings(self, name: str) -> list[str]:
        v = self.get(name, "a list of strings")
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            self.fail(name, "a list of strings", v)
        return list(v)

    def array(self, name: str) -> list[Any]:
        v = self.get(name, "a list")
        if not isinstance(v, list):
            self.fail(name, "a list", v)
        return v

    def mapping(self, name: str, *, optional: bool = False) -> dict[str, Any]:
        if optional and name not in self.data:
            return {}
        v = self.get(name, "an object")
        if not isinstance(v, dict):
            self.fail(name, "an object", v)
        return dict(v)

    def bbox(self, name: str) -> list[float]:
        expected = "[x, y, w, h]: 4 finite numbers with w, h >= 0"
        v = self.get(name, expected)
        if (
            not isinstance(v, list)
            or len(v) != 4
            or not (_is_number(v[0]) and _is_number(v[1]) and _is_number(v[2]) and _is_number(v[3]))
            or v[2] < 0
            or v[3] < 0
        ):
            self.fail(name, expected, v)
        return [float(x) for x in v]

    def extra(self, known: Sequence[str]) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in known}


def _is_number(v: Any) -> bool:
    return (type(v) is int) or (type(v) is float and math.isfinite(v))


def _check_unique(
    rec: _Rec, name: str, value: int, seen: dict[int, int], section: str, index: int
) -> None:
    if value in seen:
        rec.fail(
            name,
            f"a value unique among the {section}' {name}s",
            value,
            f"(also used by {section}[{seen[value]}])",
        )
    seen[value] = index


def _lookup(rec: _Rec, name: str, index: dict[int, int], expected: str) -> int:
    value = rec.integer(name)
    if value not in index:
        rec.fail(name, expected, value)
    return index[value]


def _parse_images(top: _Rec) -> tuple[list[CocoImage], dict[int, int]]:
    images: list[CocoImage] = []
    index: dict[int, int] = {}
    for i, obj in enumerate(top.array("images")):
        r = top.child("images", i, obj, "id")
        image = CocoImage(
            id=r.integer("id"),
            file_name=r.string("file_name"),
            height=r.positive_int("height"),
            width=r.positive_int("width"),
            extra=r.extra(_IMAGE_KEYS),
        )
        _check_unique(r, "id", image.id, index, "images", i)
        images.append(image)
    return images, index


def _segmentation_to_rle(
    rec: _Rec,
    name: str,
    seg: Any,
    h: int,
    w: int,
    *,
    strict: bool,
    image_id: int | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Check a segmentation of an (h, w) image; return (compressed RLE, counts still to check).

    Compressed counts are returned for a batched check (_check_counts); polygons and uncompressed
    RLE (accepted unless `strict`) are checked here and converted with pycocotools.
    """
    expected = "a compressed RLE {'size': [H, W], 'counts': str}"
    if not strict:
        expected += ", an uncompressed RLE (list counts) or a list of polygons"
    if isinstance(seg, dict):
        if set(seg) != {"size", "counts"}:
            rec.fail(name, f"{expected} (keys 'size' and 'counts' only)", seg)
        size = seg["size"]
        if not (
            isinstance(size, list)
            and len(size) == 2
            and type(size[0]) is int
            and type(size[1]) is int
        ):
            rec.fail(f"{name}.size", "[height, width], two ints", size)
        if size != [h, w]:
            whose = "the image" if image_id is None else f"image {image_id}"
            rec.fail(f"{name}.size", f"[{h}, {w}] (height, width of {whose})", size)
        counts = seg["counts"]
        if isinstance(counts, str):
            return {"size": [h, w], "counts": counts}, counts
        if isinstance(counts, list) and not strict:
            if not all(type(c) is int and c >= 0 for c in counts):
                rec.fail(f"{name}.counts", "a list of non-negative int run lengths", counts)
            if sum(counts) != h * w:
                rec.fail(
                    f"{name}.counts",
                    f"run lengths summing to {h} * {w} = {h * w} pixels",
                    counts,
                    f"(they sum to {sum(counts)})",
                )
            return _compressed(mask_utils.frPyObjects(seg, h, w)), None
        rec.fail(
            f"{name}.counts", "a compressed RLE string" + ("" if strict else " or a list"), counts
        )
    if isinstance(seg, list) and not strict:
        if not seg:
            rec.fail(name, "at least one polygon", seg)
        for k, poly in enumerate(seg):
            if (
                not isinstance(poly, list)
                or len(poly) < 6
                or len(poly) % 2
                or not all(_is_number(x) for x in poly)
            ):
                rec.fail(f"{name}[{k}]", "a polygon [x1, y1, x2, y2, ...] of >= 3 points", poly)
        # frPyObjects reads a 4-number list as a box, hence the >= 3 points rule above.
        return _compressed(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))), None
    rec.fail(name, expected, seg)


def _compressed(rle: dict[str, Any]) -> dict[str, Any]:
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


class _BadCounts(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


def _decode_counts(counts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode compressed RLE strings, all at once, without Python loops over characters.

    Returns (runs, owner): the run lengths of every string, concatenated, and the index of the
    string each run belongs to. Follows rleFrString in pycocotools' maskApi.c: each run is 5-bit
    groups (bit 0x20 = more groups follow, bit 0x10 of the last group = sign), and from the 4th
    run on the value is a delta to the run two before. Raises _BadCounts on a malformed string.
    """
    n = len(counts)
    lengths = np.fromiter((len(s) for s in counts), np.int64, n)
    joined = "".join(counts)
    if not joined.isascii():
        raise _BadCounts(next(j for j, s in enumerate(counts) if not s.isascii()), "non-ASCII")
    c = np.frombuffer(joined.encode("ascii"), np.uint8).astype(np.int64) - 48
    owner_of_char = np.repeat(np.arange(n), lengths)
    bad = (c < 0) | (c > 63)
    if bad.any():
        raise _BadCounts(int(owner_of_char[np.argmax(bad)]), "characters outside '0'..'o'")
    more = (c & 0x20) != 0
    last_char = np.cumsum(lengths)[lengths > 0] - 1
    if more[last_char].any():
        index = int(np.flatnonzero(lengths > 0)[np.argmax(more[last_char])])
        raise _BadCounts(index, "the string ends inside a run length (truncated)")
    ends = np.flatnonzero(~more)
    if len(ends) == 0:  # only empty strings
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    width = ends - starts + 1
    if (width > 7).any():  # 7 groups = 35 bits, enough for any uint32 delta
        raise _BadCounts(int(owner_of_char[starts[np.argmax(width > 7)]]), "a run length too long")
    k = np.arange(len(c)) - np.repeat(starts, width)
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    x -= ((c[ends] & 0x10) != 0).astype(np.int64) << (5 * width)  # x |= -1 << 5 * width
    owner = owner_of_char[starts]
    nruns = np.bincount(owner, minlength=n)
    first_run = np.repeat(np.cumsum(nruns) - nruns, nruns)  # index of its string's run 0
    m = np.arange(len(x)) - first_run  # run index within its string
    # cnts[m] = x[m] + cnts[m - 2] for m > 2: running sums along the odd runs from m = 1 and the
    # even runs from m = 2 of each string; run 0 adds nothing to either sum, so a global cumsum
    # minus its value at the string's run 0 restarts the sums per string.
    odd = (m & 1) == 1
    even = ~odd & (m > 0)
    odd_sum = np.cumsum(np.where(odd, x, 0))
    even_sum = np.cumsum(np.where(even, x, 0))
    runs = np.where(
        odd, odd_sum - odd_sum[first_run], np.where(even, even_sum - even_sum[first_run], x)
    )
    out_of_range = (runs < 0) | (runs >= 1 << 32)  # maskApi stores runs as uint32
    if out_of_range.any():
        raise _BadCounts(int(owner[np.argmax(out_of_range)]), "a run length out of range")
    return runs, owner


# Characters decoded per batch: bounds the numpy temporaries (a few int64 arrays of this length).
_COUNTS_BATCH_CHARS = 1 << 22


def _check_counts(pending: Sequence[tuple[_Rec, str, str]], pixels: np.ndarray, what: str) -> None:
    """Check that each compressed counts string decodes to runs covering exactly its pixels.

    pycocotools' decoder trusts the runs to fit the mask buffer, so this must pass before decode.
    """
    start = 0
    while start < len(pending):
        stop, chars = start, 0
        while stop < len(pending) and (stop == start or chars < _COUNTS_BATCH_CHARS):
            chars += len(pending[stop][2])
            stop += 1
        _check_counts_batch(pending[start:stop], pixels[start:stop], what)
        start = stop


def _check_counts_batch(
    pending: Sequence[tuple[_Rec, str, str]], pixels: np.ndarray, what: str
) -> None:
    try:
        runs, owner = _decode_counts([counts for _, _, counts in pending])
    except _BadCounts as e:
        rec, name, counts = pending[e.index]
        rec.fail(name, "a compressed COCO RLE string", counts, f"({e.reason})")
    cum = np.concatenate(([0], np.cumsum(runs)))
    nruns = np.bincount(owner, minlength=len(pending))
    first = np.cumsum(nruns) - nruns
    sums = cum[first + nruns] - cum[first]
    wrong = sums != pixels
    if wrong.any():
        i = int(np.argmax(wrong))
        rec, name, counts = pending[i]
        rec.fail(
            name,
            f"run lengths summing to {what} = {pixels[i]} pixels",
            counts,
            f"(they sum to {sums[i]})",
        )


# ----------------------------------------------------------------------------------------------
# Records -> JSON (writers). Numbers are normalised (numpy scalars -> int/float) so an exporter
# can pass what numpy and pycocotools return; everything else must already be right.


def _as_int(v: Any) -> Any:
    if type(v) is int:  # the common case; the ABC check below is slow
        return v
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


def _as_float(v: Any) -> Any:
    if type(v) is float:
        return v
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v


def _record_to_json(
    path: Path, label: str, standard: dict[str, Any], extra: Mapping[str, Any]
) -> dict[str, Any]:
    if not isinstance(extra, Mapping):
        raise FormatError(f"{path}: {label}: field 'extra': expected a dict, got {_show(extra)}")
    clash = sorted(set(extra) & set(standard))
    if clash:
        raise FormatError(
            f"{path}: {label}: field 'extra': expected keys other than the standard fields, "
            f"got {clash}"
        )
    return {**standard, **extra}


def _top_to_json(
    path: Path, info: Any, extra: Mapping[str, Any], known: Sequence[str]
) -> dict[str, Any]:
    return _record_to_json(path, "top level", {k: None for k in known} | {"info": info}, extra)


def _image_to_json(path: Path, i: int, im: CocoImage) -> dict[str, Any]:
    standard = {
        "id": _as_int(im.id),
        "file_name": im.file_name,
        "height": _as_int(im.height),
        "width": _as_int(im.width),
    }
    return _record_to_json(path, f"images[{i}] (id={im.id!r})", standard, im.extra)


def _annotation_to_json(path: Path, i: int, a: CocoAnnotation) -> dict[str, Any]:
    seg: Any = a.segmentation
    if isinstance(seg, dict):
        seg = dict(seg)
        if isinstance(seg.get("counts"), bytes):  # pycocotools.mask.encode returns bytes
            seg["counts"] = seg["counts"].decode("ascii", errors="replace")
        if isinstance(seg.get("size"), list | tuple | np.ndarray):
            seg["size"] = [_as_int(x) for x in seg["size"]]
    bbox: Any = a.bbox
    if isinstance(bbox, list | tuple | np.ndarray):
        bbox = [_as_float(x) for x in bbox]
    standard = {
        "id": _as_int(a.id),
        "image_id": _as_int(a.image_id),
        "category_id": _as_int(a.category_id),
        "segmentation": seg,
        "area": _as_float(a.area),
        "bbox": bbox,
        "iscrowd": _as_int(a.iscrowd),
    }
    return _record_to_json(path, f"annotations[{i}] (id={a.id!r})", standard, a.extra)


# ----------------------------------------------------------------------------------------------
# JSON files


class _BadConstant(ValueError):
    pass


def _reject_constant(name: str) -> NoReturn:
    raise _BadConstant(f"{name} is not JSON (expected finite numbers only)")


def _read_text(path: Path) -> str:
    try:  # -sig: a byte-order mark (Windows editors write one) is dropped, not a JSON error
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: expected UTF-8 text, got invalid bytes ({e})") from None


def _load_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        ends_early = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        hint = " (the file ends early: truncated?)" if ends_early else ""
        raise FormatError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}"
        ) from None
    except _BadConstant as e:
        raise FormatError(f"{path}: {e}") from None


def _write_json(path: Path, doc: Any, root: str = "") -> None:
    # json.dumps (not json.dump) so the C encoder runs: 50k annotations serialise in well
    # under a second. Serialising inside atomic_write means a failure leaves no file behind.
    with atomic_write(path, "w") as fh:
        f = cast(TextIO, fh)
        f.write(_dumps(doc, str(path), root))
        f.write("\n")


def _dumps(doc: Any, where: str, root: str = "") -> str:
    # Checked before dumping too: json.dumps writes an int key as a string (the round trip
    # would change it) and a lone surrogate only fails when the text is encoded.
    found = _first_non_json(doc, root)
    if found is None:
        return json.dumps(doc, ensure_ascii=False, allow_nan=False)
    at, value = found
    raise FormatError(
        f"{where}: {at or 'value'}: expected a JSON value (dict with str keys, list, str of "
        f"unicode text, int, finite float, bool, None), got {_show(value)}"
    )


_ID_KEYS = ("id", "ref_id", "sent_id")


def _encodes(text: str) -> bool:
    """False for a str UTF-8 cannot encode (a lone surrogate: half of an emoji cut in two)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_non_json(value: Any, at: str) -> tuple[str, Any] | None:
    """The first value a JSON file cannot hold as it is, and where: "annotations[3] (id=7).x"
    (what json.dumps(allow_nan=False) rejects, a non-str key, a str UTF-8 cannot encode)."""
    if isinstance(value, str):
        return None if _encodes(value) else (at, value)
    if value is None or isinstance(value, int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (at, value)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or not _encodes(k):
                return (f"{at} key" if at else "key", k)
            found = _first_non_json(v, f"{at}.{k}" if at else k)
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            label = f"{at}[{i}]"
            if isinstance(v, dict):
                key = next((k for k in _ID_KEYS if k in v), None)
                if key is not None:
                    label += f" ({key}={_short(v[key])})"
            found = _first_non_json(v, label)
            if found is not None:
                return found
        return None
    return (at, value)


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _show(v: Any) -> str:
    """What was received, for error messages: its JSON type and a short repr."""
    if v is None:
        return "null"
    kind = "object" if type(v) is dict else type(v).__name__
    return f"{kind} {_short(v)}"
