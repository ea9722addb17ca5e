"""data/formats.py: round trips, pycocotools agreement, validation messages, atomic writes."""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from data import formats
from data.formats import (
    CocoAnnotation,
    CocoCaption,
    CocoCategory,
    CocoImage,
    CocoInstances,
    FormatError,
    RefRecord,
    RefSentence,
    mask_to_rle,
    read_coco_captions,
    read_coco_instances,
    read_imagefolder,
    read_refcoco_folder,
    read_refs,
    rle_to_mask,
    write_coco_captions,
    write_coco_instances,
    write_imagefolder_metadata,
    write_refs,
)

# ----------------------------------------------------------------------------------------------
# Helpers


def naive_runs(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts by hand: runs over the column-major pixels, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    return [0, *runs] if flat[0] else runs


def blob_masks(rng: np.random.Generator, h: int, w: int) -> list[np.ndarray]:
    """Masks with the awkward cases: empty, full, touching each border, one pixel, noise, a disc."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(h, w) / 2 + 2)
    corner = np.zeros((h, w), bool)
    corner[-1, -1] = True
    left_top = np.zeros((h, w), bool)
    left_top[0, :] = True
    left_top[:, 0] = True
    bottom_right = np.zeros((h, w), bool)
    bottom_right[-3:, :] = True
    bottom_right[:, -2:] = True
    return [
        np.zeros((h, w), bool),
        np.ones((h, w), bool),
        left_top,
        bottom_right,
        corner,
        rng.random((h, w)) < 0.5,
        (yy - cy) ** 2 + (xx - cx) ** 2 < r**2,
    ]


def make_instances(seed: int = 0) -> tuple[CocoInstances, dict[int, np.ndarray]]:
    """Three images of odd sizes, every awkward mask on each; returns the records and the masks."""
    rng = np.random.default_rng(seed)
    images, annotations, masks = [], [], {}
    for image_id, (h, w) in zip((3, 7, 11), ((17, 23), (32, 32), (1, 9)), strict=True):
        images.append(
            CocoImage(image_id, f"img/{image_id:04d}.png", h, w, {"coco_url": f"u/{image_id}"})
        )
        for mask in blob_masks(rng, h, w):
            ann_id = 100 + len(annotations)
            rle = mask_to_rle(mask)
            box = mask_utils.toBbox({**rle, "counts": rle["counts"].encode()})
            annotations.append(
                CocoAnnotation(
                    id=ann_id,
                    image_id=image_id,
                    category_id=int(rng.integers(1, 4)),
                    segmentation=rle,
                    area=float(mask.sum()),
                    bbox=[float(v) for v in box],
                    iscrowd=0,
                    extra={"occlusion": round(float(rng.random()), 3)} if ann_id % 2 else {},
                )
            )
            masks[ann_id] = mask
    categories = [
        CocoCategory(1, "circle", "shape"),
        CocoCategory(2, "heart", "shape", {"unseen": True}),
        CocoCategory(3, "star", "shape"),
    ]
    info = {"description": "test", "seed": seed}
    extra = {"licenses": [{"id": 1, "name": "CC0"}]}
    return CocoInstances(images, annotations, categories, info, extra), masks


def make_refs(instances: CocoInstances) -> list[RefRecord]:
    """Two refs (train, val) to annotations 100 and 101 of image 3."""
    category = {a.id: a.category_id for a in instances.annotations}
    return [
        RefRecord(
            ref_id=1,
            ann_id=100,
            image_id=3,
            category_id=category[100],
            split="train",
            sentences=[
                RefSentence(10, "the red circle", ["the", "red", "circle"], "The red circle."),
                RefSentence(11, "left circle", ["left", "circle"], "left circle"),
            ],
            extra={"expression_type": "attribute", "has_distractor": False},
        ),
        RefRecord(
            ref_id=2,
            ann_id=101,
            image_id=3,
            category_id=category[101],
            split="val",
            sentences=[RefSentence(12, "the heart", ["the", "heart"], "the heart")],
            extra={"expression_type": "spatial", "has_distractor": True},
        ),
    ]


def instances_doc(seed: int = 0) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """A valid instances file's JSON, as a dict to break in the validation tests."""
    instances, masks = make_instances(seed)
    return json.loads(_write_and_read_text(instances)), masks


def _write_and_read_text(instances: CocoInstances) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.json"
        write_coco_instances(path, instances)
        return path.read_text()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 13), (13, 1), (17, 23), (64, 48)])
def test_mask_rle_round_trip_agrees_with_pycocotools(h: int, w: int) -> None:
    rng = np.random.default_rng(h * 100 + w)
    for mask in blob_masks(rng, h, w):
        rle = mask_to_rle(mask)
        assert rle["size"] == [h, w]
        assert isinstance(rle["counts"], str)
        json.dumps(rle)  # JSON-safe
        reference = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle["counts"].encode() == reference["counts"]
        decoded = rle_to_mask(rle, h, w)
        assert decoded.dtype == bool
        assert decoded.shape == (h, w)
        np.testing.assert_array_equal(decoded, mask)
        np.testing.assert_array_equal(decoded, mask_utils.decode(reference).astype(bool))
        # bytes counts (what pycocotools returns) are accepted too
        np.testing.assert_array_equal(rle_to_mask(reference, h, w), mask)


def test_batched_counts_decoder_matches_naive_run_lengths() -> None:
    rng = np.random.default_rng(1)
    masks = []
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        masks.extend(blob_masks(rng, h, w)[i] for i in rng.choice(7, 2, replace=False))
    masks.append(np.tile([True, False], (600, 500)))  # runs of 1 over 300k pixels
    strings = [mask_to_rle(m)["counts"] for m in masks]
    runs, owner = formats._decode_counts(strings)
    for i, mask in enumerate(masks):
        assert runs[owner == i].tolist() == naive_runs(mask)


def test_rle_to_mask_accepts_uncompressed_rle() -> None:
    rng = np.random.default_rng(2)
    for mask in blob_masks(rng, 19, 12):
        rle = {"size": [19, 12], "counts": naive_runs(mask)}
        np.testing.assert_array_equal(rle_to_mask(rle, 19, 12), mask)


def test_rle_to_mask_accepts_polygons() -> None:
    h, w = 20, 30
    square = [2.0, 3.0, 12.0, 3.0, 12.0, 9.0, 2.0, 9.0]
    triangle = [20, 2, 28, 2, 24, 15]
    got = rle_to_mask([square, triangle], h, w)
    reference = mask_utils.decode(
        mask_utils.merge(mask_utils.frPyObjects([square, triangle], h, w))
    )
    np.testing.assert_array_equal(got, reference.astype(bool))
    assert got[5:8, 4:11].all()  # inside the square
    assert got[5, 24]  # inside the triangle
    assert not got[15:, :].any()


def test_rle_to_mask_rejects_bad_segmentations() -> None:
    rle = mask_to_rle(np.eye(6, 8, dtype=bool))
    with pytest.raises(
        FormatError, match=r"field 'segmentation.size': expected \[6, 9\].*\[6, 8\]"
    ):
        rle_to_mask(rle, 6, 9)
    with pytest.raises(
        FormatError,
        match=r"segmentation.counts': expected run lengths summing to 6 \* 8 = 48 "
        r".*\(they sum to 36\)",
    ):
        rle_to_mask({"size": [6, 8], "counts": naive_runs(np.eye(6, 8, dtype=bool))[:-1]}, 6, 8)
    # a truncated string: pycocotools would read past the mask buffer, we refuse before decoding
    with pytest.raises(FormatError, match=r"segmentation.counts.*expected"):
        rle_to_mask({"size": [6, 8], "counts": rle["counts"][:-2]}, 6, 8)
    with pytest.raises(FormatError, match=r"field 'segmentation.counts'.*\(characters outside"):
        rle_to_mask({"size": [6, 8], "counts": "~~"}, 6, 8)
    # two points would be read as a box by pycocotools
    with pytest.raises(FormatError, match=r"field 'segmentation\[0\]': expected a polygon"):
        rle_to_mask([[1, 1, 4, 4]], 6, 8)
    with pytest.raises(ValueError, match=r"expected a non-empty \(H, W\) bool array"):
        mask_to_rle(np.zeros((3, 3), np.uint8))


# ----------------------------------------------------------------------------------------------
# COCO instances


def test_coco_instances_round_trip_is_exact(tmp_path: Path) -> None:
    instances, masks = make_instances()
    path = tmp_path / "annotations" / "instances_train.json"
    write_coco_instances(path, instances)
    back = read_coco_instances(path)
    assert back == instances
    for ann in back.annotations:
        image = next(im for im in back.images if im.id == ann.image_id)
        np.testing.assert_array_equal(
            rle_to_mask(ann.segmentation, image.height, image.width), masks[ann.id]
        )
    assert leftovers(path.parent) == []
    # the non-standard keys sit where COCO tools expect them
    doc = json.loads(path.read_text())
    assert doc["licenses"] == [{"id": 1, "name": "CC0"}]
    assert doc["categories"][1] == {
        "id": 2,
        "name": "heart",
        "supercategory": "shape",
        "unseen": True,
    }


def test_coco_instances_load_in_pycocotools(tmp_path: Path) -> None:
    instances, masks = make_instances(seed=3)
    path = tmp_path / "instances.json"
    write_coco_instances(path, instances)
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [3, 7, 11]
    for ann in coco.loadAnns(coco.getAnnIds()):
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), masks[ann["id"]])
        assert ann["area"] == masks[ann["id"]].sum()


def test_writer_normalises_numpy_scalars(tmp_path: Path) -> None:
    mask = np.zeros((5, 6), bool)
    mask[1:4, 2:5] = True
    raw = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))  # bytes counts
    ann = CocoAnnotation(
        id=np.int64(1),
        image_id=np.int32(1),
        category_id=np.uint8(1),
        segmentation=raw,
        area=mask_utils.area(raw),  # numpy uint32
        bbox=mask_utils.toBbox(raw),  # numpy float64 array
    )
    instances = CocoInstances(
        [CocoImage(1, "a.png", np.int64(5), 6)], [ann], [CocoCategory(1, "c", "s")]
    )
    write_coco_instances(tmp_path / "i.json", instances)
    back = read_coco_instances(tmp_path / "i.json").annotations[0]
    assert back == CocoAnnotation(1, 1, 1, mask_to_rle(mask), 9.0, [2.0, 1.0, 3.0, 3.0], 0, {})


def test_reader_converts_polygons_and_uncompressed_rle(tmp_path: Path) -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:7, 3:11] = True
    polygon = [[3, 2, 10, 2, 10, 6, 3, 6]]
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 12}],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygon, "area": 28.0,
             "bbox": [3, 2, 7, 4], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "area": 40,
             "segmentation": {"size": [10, 12], "counts": naive_runs(mask)},
             "bbox": [3, 2, 8, 5], "iscrowd": 1},
        ],
    }  # fmt: skip
    path = tmp_path / "user.json"
    path.write_text(json.dumps(doc))
    back = read_coco_instances(path)
    assert back.info == {}
    coco = COCO(str(path))
    for ann in back.annotations:
        assert isinstance(ann.segmentation["counts"], str)
        reference = coco.annToMask(coco.anns[ann.id]).astype(bool)
        np.testing.assert_array_equal(rle_to_mask(ann.segmentation, 10, 12), reference)
    np.testing.assert_array_equal(rle_to_mask(back.annotations[1].segmentation, 10, 12), mask)
    assert back.annotations[0].bbox == [3.0, 2.0, 7.0, 4.0]
    # what we read writes back and reads back unchanged (now as compressed RLE)
    write_coco_instances(tmp_path / "again.json", back)
    assert read_coco_instances(tmp_path / "again.json") == back


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


def _duplicate(section: str, i: int, j: int) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc[section][j]["id"] = doc[section][i]["id"]

    return edit


_ANN = r"annotations\[3\] \(id=103\)"
_SEG = _ANN + r": field 'segmentation"
INSTANCE_ERRORS = [
    (
        _delete(("annotations", 3, "bbox")),
        _ANN + r": missing field 'bbox' \(expected \[x, y, w, h\]",
    ),
    (
        _set(("images", 0, "height"), "17"),
        r"images\[0\] \(id=3\): field 'height': expected a positive int, got str '17'",
    ),
    (
        _set(("images", 1, "width"), 0),
        r"images\[1\] \(id=7\): field 'width': expected a positive int, got int 0",
    ),
    (
        _set(("annotations", 3, "bbox"), [1, 2, 3]),
        _ANN + r": field 'bbox': expected \[x, y, w, h\].*got list \[1, 2, 3\]",
    ),
    (
        _set(("annotations", 3, "area"), -1),
        _ANN + r": field 'area': expected a finite number >= 0, got int -1",
    ),
    (
        _set(("annotations", 3, "iscrowd"), True),
        _ANN + r": field 'iscrowd': expected an int, got bool True",
    ),
    (
        _set(("annotations", 3, "iscrowd"), 2),
        _ANN + r": field 'iscrowd': expected 0 or 1, got int 2",
    ),
    (
        _set(("annotations", 3, "image_id"), 99),
        _ANN + r": field 'image_id': expected an image id listed in 'images', got int 99",
    ),
    (
        _set(("annotations", 3, "category_id"), 42),
        _ANN + r": field 'category_id': expected a category id listed in 'categories', got int 42",
    ),
    (
        _set(("annotations", 3, "segmentation", "size"), [17, 24]),
        _SEG + r".size': expected \[17, 23\] \(height, width of image 3\), got list \[17, 24\]",
    ),
    (
        _set(("annotations", 3, "segmentation", "size"), "17x23"),
        _SEG + r".size': expected \[height, width\], two ints, got str",
    ),
    (
        _set(("annotations", 3, "segmentation", "counts"), "0"),
        _SEG + r".counts': expected run lengths summing to height \* width of its image = 391 "
        r"pixels, got str '0' \(they sum to 0\)",
    ),
    (
        _set(("annotations", 3, "segmentation", "counts"), "0a"),
        _SEG + r".counts': expected a compressed COCO RLE string, got str '0a' "
        r"\(the string ends inside a run length",
    ),
    (
        _set(("annotations", 3, "segmentation", "counts"), "0a@"),
        _SEG + r".counts': expected a compressed COCO RLE string, got str '0a@' "
        r"\(a run length out of range\)",
    ),
    (
        _set(("annotations", 3, "segmentation"), "rle"),
        _SEG + r"': expected a compressed RLE",
    ),
    (
        _set(("annotations", 3, "segmentation", "extra"), 1),
        _SEG + r"': expected .*keys 'size' and 'counts' only",
    ),
    (
        _duplicate("annotations", 0, 3),
        r"annotations\[3\] \(id=100\): field 'id': expected a value unique among the "
        r"annotations' ids, got int 100 \(also used by annotations\[0\]\)",
    ),
    (
        _duplicate("images", 0, 2),
        r"images\[2\] \(id=3\): field 'id': expected a value unique among the images' ids, "
        r"got int 3 \(also used by images\[0\]\)",
    ),
    (
        _duplicate("categories", 1, 2),
        r"categories\[2\] \(id=2\): field 'id': expected a value unique",
    ),
    (
        _delete(("categories", 0, "supercategory")),
        r"categories\[0\] \(id=1\): missing field 'supercategory'",
    ),
    (
        _set(("annotations", 3), [1, 2]),
        r"annotations\[3\]: expected a JSON object, got list \[1, 2\]",
    ),
    (_set(("images",), {"id": 1}), r"field 'images': expected a list, got object"),
    (_set(("info",), "v1"), r"field 'info': expected an object, got str 'v1'"),
    (_delete(("categories",)), r"missing field 'categories'"),
]


@pytest.mark.parametrize(("edit", "message"), INSTANCE_ERRORS)
def test_read_coco_instances_names_file_record_and_field(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc, _ = instances_doc()
    edit(doc)
    path = tmp_path / "broken_instances.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=rf"broken_instances\.json: {message}"):
        read_coco_instances(path)


def test_read_rejects_truncated_and_invalid_json(tmp_path: Path) -> None:
    doc, _ = instances_doc()
    text = json.dumps(doc)
    path = tmp_path / "instances.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(FormatError, match=r"instances\.json: invalid JSON at line 1 .*truncated"):
        read_coco_instances(path)
    path.write_text("")
    with pytest.raises(FormatError, match=r"instances\.json: invalid JSON.*truncated"):
        read_coco_instances(path)
    path.write_text('{"images": [], "annotations": [] "categories": []}')
    with pytest.raises(
        FormatError, match=r"instances\.json: invalid JSON at line 1 column 34: Expecting ','"
    ):
        read_coco_instances(path)
    path.write_text(text.replace('"area": 0.0', '"area": NaN', 1))
    with pytest.raises(FormatError, match=r"instances\.json: NaN is not JSON"):
        read_coco_instances(path)
    path.write_bytes(b'{"images": "\xff"}')
    with pytest.raises(FormatError, match=r"instances\.json: expected UTF-8"):
        read_coco_instances(path)
    path.write_text("[]")
    with pytest.raises(FormatError, match=r"instances\.json: expected an object with 'images'"):
        read_coco_instances(path)


def test_writer_checks_records_and_writes_nothing(tmp_path: Path) -> None:
    instances, _ = make_instances()
    path = tmp_path / "instances.json"
    bad = copy.deepcopy(instances)
    bad.annotations[2].image_id = 99
    with pytest.raises(
        FormatError, match=r"instances\.json: annotations\[2\] \(id=102\): field 'image_id'"
    ):
        write_coco_instances(path, bad)
    bad = copy.deepcopy(instances)
    bad.images[1].extra = {"height": 5}
    with pytest.raises(
        FormatError,
        match=r"images\[1\] \(id=7\): field 'extra': expected keys other than the standard "
        r"fields, got \['height'\]",
    ):
        write_coco_instances(path, bad)
    bad = copy.deepcopy(instances)
    bad.annotations[0].segmentation = [[0, 0, 5, 0, 5, 5]]  # writers take compressed RLE only
    with pytest.raises(
        FormatError,
        match=r"annotations\[0\] \(id=100\): field 'segmentation': expected a compressed RLE",
    ):
        write_coco_instances(path, bad)
    assert list(tmp_path.iterdir()) == []
    # and a write that passes is readable
    write_coco_instances(path, instances)
    assert read_coco_instances(path) == instances


# ----------------------------------------------------------------------------------------------
# Atomic writes


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    instances, _ = make_instances()
    path = tmp_path / "instances.json"
    write_coco_instances(path, instances)
    old = path.read_bytes()
    bad = copy.deepcopy(instances)
    bad.annotations[4].extra = {"note": object()}  # fails inside json encoding, file already open
    with pytest.raises(
        FormatError,
        match=r"instances\.json: annotations\[4\] \(id=104\)\.note: expected a JSON value"
        r".*got object",
    ):
        write_coco_instances(path, bad)
    assert path.read_bytes() == old
    assert leftovers(tmp_path) == []
    bad.annotations[4].extra = {"score": float("nan")}
    with pytest.raises(
        FormatError,
        match=r"annotations\[4\] \(id=104\)\.score: expected a JSON value.*got float nan",
    ):
        write_coco_instances(path, bad)
    assert path.read_bytes() == old
    assert leftovers(tmp_path) == []
    # what json.dumps would write without a word but not as given: an int key (it becomes "1"),
    # a lone surrogate (half an emoji: it fails only when the text is encoded)
    for extra, got in (
        ({"scores": {1: 0.5}}, r"\.scores key: .*got int 1"),
        ({"n": "a\ud83d"}, r"\.n: "),
    ):
        bad.annotations[4].extra = extra
        with pytest.raises(FormatError, match=r"annotations\[4\] \(id=104\)" + got):
            write_coco_instances(path, bad)
        assert path.read_bytes() == old
        assert leftovers(tmp_path) == []


def test_interrupted_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instances, _ = make_instances()
    opened: list[str] = []
    real_dumps = json.dumps

    def dumps_then_crash(doc: Any, **kwargs: Any) -> str:
        opened.extend(p.name for p in tmp_path.iterdir())  # the temporary file exists by now
        real_dumps(doc, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", dumps_then_crash)
    path = tmp_path / "instances.json"
    with pytest.raises(OSError, match="disk full"):
        write_coco_instances(path, instances)
    assert len(opened) == 1
    assert opened[0].startswith(".instances.json.")
    assert list(tmp_path.iterdir()) == []


def test_jsonl_writer_failing_mid_file_leaves_no_file(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"png")
    rows = [
        {"file_name": "a.png", "text": "one"},
        {"file_name": "b.png", "text": "two"},
        {"file_name": "c.png", "text": {1, 2}},  # a set: rows 0-1 are already written
    ]
    with pytest.raises(
        FormatError, match=r"metadata\.jsonl: rows\[2\]: text: expected a JSON value"
    ):
        write_imagefolder_metadata(tmp_path, rows)
    assert not (tmp_path / "metadata.jsonl").exists()
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# COCO captions


def test_coco_captions_round_trip_and_errors(tmp_path: Path) -> None:
    images = [CocoImage(1, "a.png", 4, 5), CocoImage(2, "b.png", 6, 7, {"split": "val"})]
    captions = [
        CocoCaption(10, 1, "a red circle left of a blue square"),
        CocoCaption(11, 1, "ein roter Kreis — ünïcode"),
        CocoCaption(12, 2, "a star", {"tokens": ["a", "star"]}),
    ]
    path = tmp_path / "captions_val.json"
    write_coco_captions(path, images, captions, {"version": 1})
    back = formats.read_coco_captions(path)
    assert back.images == images
    assert back.captions == captions
    assert back.info == {"version": 1}
    assert "ünïcode" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    coco = COCO(str(path))
    assert coco.anns[11]["caption"] == captions[1].caption

    doc = json.loads(path.read_text())
    doc["annotations"][2]["image_id"] = 3
    path.write_text(json.dumps(doc))
    with pytest.raises(
        FormatError,
        match=r"captions_val\.json: annotations\[2\] \(id=12\): field 'image_id': expected an "
        r"image id listed in 'images', got int 3",
    ):
        read_coco_captions(path)
    del doc["annotations"][0]["caption"]
    path.write_text(json.dumps(doc))
    with pytest.raises(
        FormatError,
        match=r"annotations\[0\] \(id=10\): missing field 'caption' \(expected a string\)",
    ):
        read_coco_captions(path)
    with pytest.raises(
        FormatError, match=r"annotations\[1\] \(id=10\): field 'id': expected a value unique"
    ):
        write_coco_captions(path, images, [captions[0], captions[0]])


# ----------------------------------------------------------------------------------------------
# RefCOCO-style refs


def test_refs_round_trip_as_json(tmp_path: Path) -> None:
    refs = make_refs(make_instances()[0])
    path = tmp_path / "refs.json"
    write_refs(path, refs)
    doc = json.loads(path.read_text())  # JSON, never pickle
    assert isinstance(doc, list)
    assert doc[0]["sent_ids"] == [10, 11]  # the refer API's derived field
    assert doc[1]["expression_type"] == "spatial"
    assert read_refs(path) == refs


_REF0 = r"refs\[0\] \(ref_id=1\)"
_REF1 = r"refs\[1\] \(ref_id=2\)"
REF_ERRORS = [
    (
        lambda d: d[1]["sentences"][0].update(sent_id=10),
        _REF1 + r"\.sentences\[0\] \(sent_id=10\): field 'sent_id': expected a value unique "
        r"among the file's sent_ids, got int 10 \(also used by " + _REF0 + r"\.sentences\[0\]",
    ),
    (
        lambda d: d[0].update(sent_ids=[10]),
        _REF0 + r": field 'sent_ids': expected the sentences' sent_ids \[10, 11\], got list \[10\]",
    ),
    (
        lambda d: d[0]["sentences"][1].update(tokens="left circle"),
        _REF0 + r"\.sentences\[1\] \(sent_id=11\): field 'tokens': expected a list of strings, "
        r"got str",
    ),
    (
        lambda d: d[1].update(sentences=[]),
        _REF1 + r": field 'sentences': expected at least one sentence, got list \[\]",
    ),
    (
        lambda d: d[1].update(ref_id=1),
        r"refs\[1\] \(ref_id=1\): field 'ref_id': expected a value unique among the refs' ref_ids",
    ),
    (lambda d: d[1].pop("ann_id"), _REF1 + r": missing field 'ann_id' \(expected an int\)"),
    (lambda d: d[0].update(split=None), _REF0 + r": field 'split': expected a string, got null"),
]


@pytest.mark.parametrize(("edit", "message"), REF_ERRORS)
def test_read_refs_names_file_record_and_field(
    tmp_path: Path, edit: Callable[[list[dict[str, Any]]], None], message: str
) -> None:
    path = tmp_path / "refs.json"
    write_refs(path, make_refs(make_instances()[0]))
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=rf"refs\.json: {message}"):
        read_refs(path)


def test_read_refs_rejects_non_list(tmp_path: Path) -> None:
    path = tmp_path / "refs.json"
    path.write_text('{"refs": []}')
    with pytest.raises(FormatError, match=r"refs\.json: expected a JSON list of refs, got object"):
        read_refs(path)


def test_read_refcoco_folder_both_layouts(tmp_path: Path) -> None:
    instances, _ = make_instances()
    refs = make_refs(instances)
    shared = tmp_path / "shared"
    write_refs(shared / "refs.json", refs)
    write_coco_instances(shared / "instances.json", instances)
    train = read_refcoco_folder(shared, "train")
    assert train.refs == [refs[0]]
    assert train.instances == instances
    assert read_refcoco_folder(shared, "val").refs == [refs[1]]
    with pytest.raises(
        ValueError, match=r"no refs with split 'testA'; splits present: \['train', 'val'\]"
    ):
        read_refcoco_folder(shared, "testA")

    per_split = tmp_path / "per_split"
    write_refs(per_split / "refs_val.json", [refs[1]])
    write_coco_instances(per_split / "instances_val.json", instances)
    assert read_refcoco_folder(per_split, "val").refs == [refs[1]]
    with pytest.raises(
        FileNotFoundError,
        match=r"expected refs_train\.json \+ instances_train\.json, or refs\.json \+ "
        r"instances\.json",
    ):
        read_refcoco_folder(per_split, "train")
    write_refs(per_split / "refs_train.json", refs)
    with pytest.raises(FileNotFoundError, match=r"instances_train\.json: missing"):
        read_refcoco_folder(per_split, "train")
    write_coco_instances(per_split / "instances_train.json", instances)
    with pytest.raises(
        FormatError,
        match=r"refs_train\.json: refs\[1\] \(ref_id=2\): field 'split': expected 'train'",
    ):
        read_refcoco_folder(per_split, "train")


def test_read_refcoco_folder_checks_refs_against_instances(tmp_path: Path) -> None:
    instances, _ = make_instances()
    write_coco_instances(tmp_path / "instances.json", instances)
    refs = make_refs(make_instances()[0])
    refs[1].ann_id = 999
    write_refs(tmp_path / "refs.json", refs)
    with pytest.raises(
        FormatError,
        match=r"refs\.json: refs\[1\] \(ref_id=2\): field 'ann_id': expected an annotation id "
        r"of .*instances\.json, got int 999",
    ):
        read_refcoco_folder(tmp_path, "val")
    refs[1].ann_id, refs[1].image_id = 101, 7
    write_refs(tmp_path / "refs.json", refs)
    with pytest.raises(
        FormatError,
        match=r"refs\[1\] \(ref_id=2\): field 'image_id': expected 3 \(the image_id of "
        r"annotation 101",
    ):
        read_refcoco_folder(tmp_path, "val")
    refs[1].image_id = 3
    refs[1].category_id = next(a.category_id for a in instances.annotations if a.id == 101) % 3 + 1
    write_refs(tmp_path / "refs.json", refs)
    with pytest.raises(FormatError, match=r"refs\[1\] \(ref_id=2\): field 'category_id'"):
        read_refcoco_folder(tmp_path, "val")


# ----------------------------------------------------------------------------------------------
# Hugging Face imagefolder


def _imagefolder(tmp_path: Path) -> Path:
    folder = tmp_path / "shapes"
    (folder / "train").mkdir(parents=True)
    for name in ("train/0001.png", "train/0002.png", "0003.png"):
        (folder / name).write_bytes(b"\x89PNG")
    return folder


def test_imagefolder_round_trip(tmp_path: Path) -> None:
    folder = _imagefolder(tmp_path)
    rows = [
        {
            "file_name": "train/0001.png",
            "text": "a red circle",
            "objects": {"bbox": [[1, 2, 3, 4]]},
        },
        {"file_name": "train/0002.png", "text": "un cœur rose", "unseen": True},
        {"file_name": "0003.png", "text": None},
    ]
    path = write_imagefolder_metadata(folder, rows)
    assert path == folder / "metadata.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert "cœur" in lines[1]  # ensure_ascii=False
    assert read_imagefolder(folder) == rows
    assert leftovers(folder) == []


@pytest.mark.parametrize(
    ("file_name", "message"),
    [
        ("../outside.png", r"without '\.\.', got '\.\./outside\.png'"),
        ("train/../../outside.png", r"without '\.\.'"),
        ("/etc/passwd", r"got absolute or backslash path '/etc/passwd'"),
        ("C:/images/a.png", r"got absolute or backslash path"),
        ("train\\0001.png", r"got absolute or backslash path"),
        ("link/secret.png", r"which resolves to .*outside.* \(a link out of the folder\)"),
        ("train/missing.png", r"got 'train/missing\.png' \(no such file\)"),
        ("train", r"got 'train' \(no such file\)"),
        ("", r"field 'file_name': expected a relative path.*got str ''"),
        (7, r"field 'file_name': expected a relative path.*got int 7"),
    ],
)
def test_imagefolder_rejects_bad_file_names(tmp_path: Path, file_name: Any, message: str) -> None:
    folder = _imagefolder(tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"x")
    os.symlink(tmp_path / "outside", folder / "link")
    good = {"file_name": "0003.png"}
    lines = [json.dumps(good), json.dumps({"file_name": file_name, "text": "x"})]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match=rf"shapes/metadata\.jsonl: line 2: .*{message}"):
        read_imagefolder(folder)
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(FormatError, match=rf"shapes/metadata\.jsonl: rows\[1\]: .*{message}"):
        write_imagefolder_metadata(folder, [good, {"file_name": file_name}])
    assert not (folder / "metadata.jsonl").exists()


def test_imagefolder_rejects_malformed_lines(tmp_path: Path) -> None:
    folder = _imagefolder(tmp_path)
    path = folder / "metadata.jsonl"
    good = json.dumps({"file_name": "0003.png"})
    cases = [
        (f'{good}\n{good}\n{{"file_name": "0003.png", "te', r"line 3: invalid JSON at column \d+"),
        (f"{good}\n\n{good}\n  \nnot json\n", r"line 5: invalid JSON at column 1"),
        (f'{good}\n["0003.png"]\n', r"line 2: expected a JSON object, got list"),
        (f'{good}\n{{"text": "no name"}}\n', r"line 2: missing field 'file_name'"),
        ('{"file_name": "0003.png", "score": NaN}\n', r"line 1: NaN is not JSON"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(FormatError, match=rf"metadata\.jsonl: {message}"):
            read_imagefolder(folder)
    # blank lines are skipped (the numbers above count them), a byte-order mark is dropped
    path.write_bytes(b"\xef\xbb\xbf" + f"{good}\r\n\r\n{good}\r\n\n".encode())
    assert read_imagefolder(folder) == [{"file_name": "0003.png"}] * 2
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl: missing"):
        read_imagefolder(folder)


# ----------------------------------------------------------------------------------------------
# Scale


def test_ten_thousand_images_export_in_seconds(tmp_path: Path) -> None:
    """10k images x 5 instances: no per-pixel or per-character Python loops anywhere."""
    rng = np.random.default_rng(4)
    h = w = 96
    # everything but the noise mask: counts strings of realistic length (noise is ~100x longer)
    pool = [mask_to_rle(m) for _ in range(5) for i, m in enumerate(blob_masks(rng, h, w)) if i != 5]
    images = [CocoImage(i, f"{i:06d}.png", h, w) for i in range(10_000)]
    annotations = [
        CocoAnnotation(5 * i + k, i, k + 1, pool[(i + k) % len(pool)], 10.0, [0.0, 0.0, 5.0, 5.0])
        for i in range(10_000)
        for k in range(5)
    ]
    categories = [CocoCategory(k + 1, f"c{k}", "shape") for k in range(5)]
    instances = CocoInstances(images, annotations, categories)
    path = tmp_path / "instances.json"
    start = time.process_time()  # CPU time: wall time on a loaded 2-core machine went past 20 s
    write_coco_instances(path, instances)
    back = read_coco_instances(path)
    elapsed = time.process_time() - start
    assert back == instances
    assert elapsed < 20, f"write + read of 50k annotations took {elapsed:.1f} s of CPU"
