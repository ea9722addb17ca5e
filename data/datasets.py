"""Datasets over the standard formats: image-caption pairs and instance masks.

Training and eval scripts read these, so a ShapeWorld split, a user's COCO folder or an imagefolder
with captions all go through the same code:

    pairs = CaptionDataset.from_coco("coco/train2017", "coco/annotations/captions_train2017.json")
    pairs = CaptionDataset.from_imagefolder("my_photos")        # metadata.jsonl with "caption(s)"
    pairs = CaptionDataset.from_shapeworld("out/shapeworld", "pretrain")
    inst = InstanceDataset.from_coco(images_root, instances_json)
    inst = InstanceDataset.from_shapeworld("out/shapeworld", "train")

Items are plain Python/numpy (PIL image, captions, masks); the scripts add their transforms.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from core.images import ImageError, image_size, load_rgb
from data.formats import (
    CocoAnnotation,
    FormatError,
    mask_to_rle,
    read_coco_captions,
    read_coco_instances,
    read_imagefolder_rows,
    read_refs,
    ref_annotation,
    rle_to_mask,
    row_captions,
)

if TYPE_CHECKING:
    from data.validate import OnBad

__all__ = [
    "CaptionDataset",
    "Instance",
    "InstanceDataset",
    "InstanceItem",
    "ReferringDataset",
    "ReferringItem",
    "add_caption_arguments",
    "add_referring_arguments",
    "caption_source_error",
    "check_images",
    "referring_dataset_from_args",
    "shapeworld_paths",
    "user_captions_from_args",
    "user_captions_to_evaluate",
]


def shapeworld_paths(root: str | os.PathLike[str], split: str) -> dict[str, Path]:
    """The files of one exported ShapeWorld split (see data.shapeworld)."""
    root = Path(root)
    paths = {
        "images": root / split,
        "instances": root / "annotations" / f"instances_{split}.json",
        "captions": root / "annotations" / f"captions_{split}.json",
        "refs": root / "annotations" / f"refs_{split}.json",
        "semantic": root / "semantic" / split,
    }
    if not paths["instances"].is_file():
        raise FileNotFoundError(
            f"{paths['instances']}: not found; generate the data first with "
            f"`python -m data.shapeworld generate --out {root} ...` (split {split!r})"
        )
    return paths


MAX_LISTED = 10  # bad images named in check_images' message


def check_images(
    files: Sequence[tuple[Path, tuple[int, int] | None]], source: str | os.PathLike[str]
) -> None:
    """FormatError listing the images of `files` (path, the (H, W) the annotation file gives or
    None) that are missing, unreadable or of another size, before a run reaches them. Reads
    each file's header only (core.images.image_size), each path once."""
    bad: list[str] = []
    seen: set[Path] = set()
    for path, size in files:
        if path in seen:
            continue
        seen.add(path)
        try:  # where the file gives a size, masks are drawn at it: no downscaled reading
            width, height = image_size(path, downscale=size is None)
        except ImageError as err:
            bad.append(str(err))
            continue
        if size is not None and (height, width) != tuple(size):
            bad.append(
                f"{path}: {width}x{height} pixels, the file says {size[1]}x{size[0]} (width x "
                "height; masks are decoded at the file's size)"
            )
    if bad:
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise FormatError(
            f"{source}: {len(bad)} of {len(seen)} images cannot be used:\n  "
            + "\n  ".join(bad[:MAX_LISTED])
            + more
        )


@dataclass
class CaptionDataset:
    """(image, captions) pairs. `dataset[i]` -> (PIL RGB image, list of captions)."""

    image_paths: list[Path]
    captions: list[list[str]]

    def __post_init__(self) -> None:
        if len(self.image_paths) != len(self.captions):
            raise ValueError(
                f"{len(self.image_paths)} images but {len(self.captions)} caption lists"
            )

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, list[str]]:
        return load_rgb(self.image_paths[index]), self.captions[index]

    @classmethod
    def from_coco(
        cls,
        images_root: str | os.PathLike[str],
        captions_json: str | os.PathLike[str],
        check: bool = True,
    ) -> CaptionDataset:
        """``check``: every image listed is looked at first (check_images)."""
        coco = read_coco_captions(captions_json)
        by_image: dict[int, list[str]] = {im.id: [] for im in coco.images}
        for cap in coco.captions:
            by_image[cap.image_id].append(cap.caption)
        root = Path(images_root)
        keep = [im for im in coco.images if by_image[im.id]]
        if check:
            check_images([(root / im.file_name, None) for im in keep], captions_json)
        return cls([root / im.file_name for im in keep], [by_image[im.id] for im in keep])

    @classmethod
    def from_imagefolder(
        cls, folder: str | os.PathLike[str], on_bad: OnBad | None = None, *, progress: bool = True
    ) -> CaptionDataset:
        """Rows of metadata.jsonl with "captions" (a list) or "caption" / "text" (a string).
        ``on_bad`` ("stop" / "skip"): check every record first, images included (a progress bar
        unless ``progress=False``), and stop listing all the bad ones or skip them
        (data.validate); None: the first bad row raises."""
        folder = Path(folder)
        paths, captions = [], []
        rows: list[tuple[int, dict[str, Any]]]
        if on_bad is not None:
            from data.validate import usable_rows

            rows = list(enumerate(usable_rows(folder, "captions", on_bad, progress=progress), 1))
        else:
            rows = read_imagefolder_rows(folder)
        for n, row in rows:
            caps = row_captions(row, f"{folder / 'metadata.jsonl'}: line {n}")
            paths.append(folder / row["file_name"])
            captions.append(caps)
        return cls(paths, captions)

    def merged_by_image(self) -> CaptionDataset:
        """One entry per image file, its captions gathered from every entry that names it (a
        folder with one row per caption, or a file listed twice), in order of first appearance.
        An evaluation needs this: two entries of one image would tie in retrieval."""
        by_path: dict[Path, list[str]] = {}
        for path, caps in zip(self.image_paths, self.captions, strict=True):
            by_path.setdefault(path.resolve(), []).extend(caps)
        return CaptionDataset(list(by_path), list(by_path.values()))

    @classmethod
    def from_shapeworld(cls, root: str | os.PathLike[str], split: str) -> CaptionDataset:
        paths = shapeworld_paths(root, split)
        return cls.from_coco(paths["images"], paths["captions"], check=False)  # generated here


@dataclass
class Instance:
    """One annotated object of an image."""

    mask: np.ndarray  # (H, W) bool
    category: str  # class name
    category_id: int
    bbox: tuple[float, float, float, float]  # COCO [x, y, w, h]
    attributes: dict[str, Any] = field(default_factory=dict)  # e.g. {"colour": "red"}


@dataclass
class InstanceItem:
    image: Image.Image  # RGB
    instances: list[Instance]
    image_id: int


@dataclass
class InstanceDataset:
    """Images with instance masks from a COCO instances file. `dataset[i]` -> InstanceItem."""

    images_root: Path
    file_names: list[str]
    image_ids: list[int]
    sizes: list[tuple[int, int]]  # (H, W)
    annotations: list[list[CocoAnnotation]]
    category_names: dict[int, str]
    unseen: set[str] = field(default_factory=set)  # categories flagged {"unseen": true}

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, index: int) -> InstanceItem:
        h, w = self.sizes[index]
        image = load_rgb(self.images_root / self.file_names[index], downscale=False)  # as masks
        if image.size != (w, h):
            raise FormatError(
                f"{self.images_root / self.file_names[index]}: expected {w}x{h} as in the "
                f"instances file, received {image.size[0]}x{image.size[1]}"
            )
        instances = [
            Instance(
                mask=rle_to_mask(a.segmentation, h, w),
                category=self.category_names[a.category_id],
                category_id=a.category_id,
                bbox=(a.bbox[0], a.bbox[1], a.bbox[2], a.bbox[3]),
                attributes=dict(a.extra),
            )
            for a in self.annotations[index]
            if not a.iscrowd
        ]
        return InstanceItem(image, instances, self.image_ids[index])

    @classmethod
    def from_coco(
        cls,
        images_root: str | os.PathLike[str],
        instances_json: str | os.PathLike[str],
        check: bool = True,
    ) -> InstanceDataset:
        """``check``: every image listed is looked at first (check_images)."""
        coco = read_coco_instances(instances_json)
        by_image: dict[int, list[CocoAnnotation]] = {im.id: [] for im in coco.images}
        for ann in coco.annotations:
            by_image[ann.image_id].append(ann)
        root = Path(images_root)
        if check:
            check_images(
                [(root / im.file_name, (im.height, im.width)) for im in coco.images], instances_json
            )
        return cls(
            images_root=root,
            file_names=[im.file_name for im in coco.images],
            image_ids=[im.id for im in coco.images],
            sizes=[(im.height, im.width) for im in coco.images],
            annotations=[by_image[im.id] for im in coco.images],
            category_names={c.id: c.name for c in coco.categories},
            unseen={c.name for c in coco.categories if c.extra.get("unseen")},
        )

    @classmethod
    def from_shapeworld(cls, root: str | os.PathLike[str], split: str) -> InstanceDataset:
        paths = shapeworld_paths(root, split)
        return cls.from_coco(paths["images"], paths["instances"], check=False)  # generated here

    def semantic_map(self, index: int) -> np.ndarray:
        """(H, W) int64 category-id map of image `index` (0 = background) painted from its
        instances, largest first so that a small object on a large one stays visible."""
        h, w = self.sizes[index]
        out = np.zeros((h, w), dtype=np.int64)
        anns = sorted((a for a in self.annotations[index] if not a.iscrowd), key=lambda a: -a.area)
        for a in anns:
            out[rle_to_mask(a.segmentation, h, w)] = a.category_id
        return out

    @classmethod
    def from_semantic(
        cls,
        images_root: str | os.PathLike[str],
        semantic_root: str | os.PathLike[str],
        class_names: list[str],
        unseen: set[str] | None = None,
    ) -> InstanceDataset:
        """ADE-style semantic data: every image of `images_root` with a label map
        ``semantic_root/<stem>.png`` whose pixel value k >= 1 is class_names[k - 1] (0 = no
        class). Each class present becomes one instance (its whole region). FormatError listing
        the images that do not open or differ in size from their label maps (headers only)."""
        images_root, semantic_root = Path(images_root), Path(semantic_root)
        suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
        files = sorted(p for p in images_root.iterdir() if p.suffix.lower() in suffixes)
        if not files:
            raise FileNotFoundError(f"{images_root}: no images ({sorted(suffixes)})")
        sizes, annotations = [], []
        next_id = 1
        for image_id, path in enumerate(files, start=1):
            label_path = semantic_root / f"{path.stem}.png"
            if not label_path.is_file():
                raise FileNotFoundError(f"{label_path}: missing label map for {path.name}")
            labels = np.asarray(Image.open(label_path))
            if labels.ndim != 2:
                raise FormatError(
                    f"{label_path}: expected a single-channel label map, got shape {labels.shape}"
                )
            top = int(labels.max())
            if top > len(class_names):
                raise FormatError(
                    f"{label_path}: label {top} but only {len(class_names)} class names given"
                )
            anns = []
            for k in (int(v) for v in np.unique(labels) if v > 0):
                mask = labels == k
                ys, xs = np.nonzero(mask)
                x0, y0 = float(xs.min()), float(ys.min())
                bbox = [x0, y0, float(xs.max()) - x0 + 1, float(ys.max()) - y0 + 1]
                anns.append(
                    CocoAnnotation(next_id, image_id, k, mask_to_rle(mask), float(mask.sum()), bbox)
                )
                next_id += 1
            sizes.append((labels.shape[0], labels.shape[1]))
            annotations.append(anns)
        # each image opens and has its label map's size, before a run reaches it
        check_images(list(zip(files, sizes, strict=True)), images_root)
        return cls(
            images_root=images_root,
            file_names=[p.name for p in files],
            image_ids=list(range(1, len(files) + 1)),
            sizes=sizes,
            annotations=annotations,
            category_names={k: n for k, n in enumerate(class_names, start=1)},
            unseen=set(unseen or ()),
        )


@dataclass
class ReferringItem:
    image_path: Path
    expression: str  # the sentence as written (RefSentence.raw)
    mask: np.ndarray  # (H, W) bool, the referred object
    expression_type: str  # "attribute" / "spatial" / "ordinal" (ShapeWorld); "" when not given
    ref_id: int


@dataclass
class ReferringDataset:
    """Referring expressions with the mask they pick: one item per sentence of a RefCOCO-style refs
    file (every sentence of a ref is its own sample, as RefCOCO evaluation counts them)."""

    images_root: Path
    items: list[tuple[str, str, CocoAnnotation, tuple[int, int], str, int]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ReferringItem:
        file_name, sentence, ann, (h, w), kind, ref_id = self.items[index]
        return ReferringItem(
            self.images_root / file_name,
            sentence,
            rle_to_mask(ann.segmentation, h, w),
            kind,
            ref_id,
        )

    @classmethod
    def from_refcoco(
        cls,
        images_root: str | os.PathLike[str],
        refs_json: str | os.PathLike[str],
        instances_json: str | os.PathLike[str],
        split: str | None = None,
        check: bool = True,
    ) -> ReferringDataset:
        """The refs of `split` (every ref when None: a file of one split) with the instances they
        refer to. A RefCOCO refs file holds every split, each ref naming its own; ValueError when
        none names `split` (the splits present listed), FormatError naming the record and field
        when a ref's ann_id is missing or its image_id / category_id are not its annotation's."""
        coco = read_coco_instances(instances_json)
        images = {im.id: im for im in coco.images}
        anns = {a.id: a for a in coco.annotations}
        refs = list(enumerate(read_refs(refs_json)))
        if split is not None:
            present = sorted({ref.split for _, ref in refs})
            refs = [(i, ref) for i, ref in refs if ref.split == split]
            if not refs:
                raise ValueError(f"{refs_json}: no refs of split {split!r}; splits: {present}")
        items = []
        for i, ref in refs:
            ann = ref_annotation(ref, anns, f"{refs_json}: refs[{i}]", instances_json)
            im = images[ann.image_id]  # read_coco_instances checked it is an image of the file
            kind = str(ref.extra.get("expression_type", ""))
            for sent in ref.sentences:
                items.append((im.file_name, sent.raw, ann, (im.height, im.width), kind, ref.ref_id))
        root = Path(images_root)
        if check:  # every image the refs use, first (check_images)
            check_images([(root / it[0], it[3]) for it in items], instances_json)
        return cls(root, items)

    @classmethod
    def from_shapeworld(cls, root: str | os.PathLike[str], split: str) -> ReferringDataset:
        paths = shapeworld_paths(root, split)
        return cls.from_refcoco(  # generated here: not checked
            paths["images"], paths["refs"], paths["instances"], check=False
        )


def add_caption_arguments(group: Any, imagefolder_text: str = "captions") -> None:
    """A user's captioned images, beside a script's own ``--data`` (ShapeWorld): ``--imagefolder``
    (with ``--bad-records``) or ``--images`` with ``--captions-json`` (COCO captions)."""
    from data.validate import add_bad_records_argument

    group.add_argument(
        "--imagefolder", type=Path, help=f"folder with metadata.jsonl ({imagefolder_text})"
    )
    add_bad_records_argument(group)
    group.add_argument("--images", type=Path, help="image root of a COCO captions file")
    group.add_argument("--captions-json", type=Path, help="COCO captions JSON (with --images)")


def caption_source_error(args: argparse.Namespace, splits: Sequence[str] = ()) -> str | None:
    """Why ``--data`` and `add_caption_arguments`' options do not name exactly one source, or,
    with ``--data``, which of the ShapeWorld `splits` the folder lacks."""
    given = [n for n in ("data", "imagefolder", "images") if getattr(args, n) is not None]
    if len(given) != 1:
        return (
            f"give exactly one data source: --data, --imagefolder or --images (with "
            f"--captions-json); received {['--' + n for n in given] or 'none'}"
        )
    if (args.images is None) != (args.captions_json is None):
        return "--images and --captions-json go together"
    for split in splits if args.data is not None else ():
        try:
            shapeworld_paths(args.data, split)
        except FileNotFoundError as err:
            return str(err)
    return None


def user_captions_from_args(
    args: argparse.Namespace, *, check: bool = True
) -> tuple[CaptionDataset, dict[str, Any]]:
    """The pairs of ``--imagefolder`` or ``--images``/``--captions-json`` and where they came from
    (for a model card); ValueError (FormatError, OSError) saying what is wrong, or that there is
    no pair. ``check=False``: a COCO captions file's images are not looked at (a caller that uses
    only some checks those; an imagefolder's are checked only with ``--bad-records``). The
    records' check shows a progress bar unless the script's ``--no-progress`` is set."""
    description: dict[str, Any]
    if args.imagefolder is not None:
        progress = not getattr(args, "no_progress", False)
        pairs = CaptionDataset.from_imagefolder(
            args.imagefolder, args.bad_records, progress=progress
        )
        description = {"kind": "imagefolder", "root": str(args.imagefolder)}
    else:
        pairs = CaptionDataset.from_coco(args.images, args.captions_json, check=check)
        description = {
            "kind": "coco-captions",
            "images": str(args.images),
            "captions": str(args.captions_json),
        }
    if len(pairs) == 0:
        raise ValueError(f"no image-caption pairs found in {description}")
    return pairs, description


def user_captions_to_evaluate(args: argparse.Namespace, limit: int | None) -> CaptionDataset:
    """`user_captions_from_args`' pairs for an evaluation: one entry per image file (rows
    naming one file merged), the first `limit` images, their files checked (headers) before any
    model loads; ValueError (FormatError, OSError) saying what is wrong."""
    pairs = user_captions_from_args(args, check=False)[0].merged_by_image()
    pairs = CaptionDataset(pairs.image_paths[:limit], pairs.captions[:limit])
    check_images(
        [(path, None) for path in pairs.image_paths], args.imagefolder or args.captions_json
    )
    return pairs


def add_referring_arguments(parser: argparse.ArgumentParser, default_split: str) -> None:
    """The data options of a script over referring expressions: a ShapeWorld folder and split,
    or a RefCOCO-style refs file with its instances file and image folder."""
    src = parser.add_argument_group("data (--data, or --refs with --instances and --images)")
    src.add_argument("--data", type=Path, help="a ShapeWorld folder")
    src.add_argument(
        "--split",
        default=default_split,
        help=f"the split: ShapeWorld's, or the refs' own 'split' field ({default_split})",
    )
    src.add_argument("--refs", type=Path, help="RefCOCO-style refs JSON")
    src.add_argument("--instances", type=Path, help="COCO instances JSON the refs point into")
    src.add_argument("--images", type=Path, help="folder of the instances file's images")


def referring_dataset_from_args(args: argparse.Namespace) -> tuple[ReferringDataset, str]:
    """(dataset, one-line description) from `add_referring_arguments`' options; ValueError
    (FileNotFoundError, FormatError) saying what is missing or wrong."""
    refcoco = (args.refs, args.instances, args.images)
    if args.data is not None and any(x is not None for x in refcoco):
        raise ValueError("give --data or --refs/--instances/--images, not both")
    if args.data is None and not all(x is not None for x in refcoco):
        raise ValueError("give --data (ShapeWorld) or all three of --refs, --instances, --images")
    if args.data is not None:
        data = ReferringDataset.from_shapeworld(args.data, args.split)
        return data, f"ShapeWorld {args.data} split {args.split}"
    data = ReferringDataset.from_refcoco(args.images, args.refs, args.instances, args.split)
    return data, f"refs {args.refs} split {args.split}"
