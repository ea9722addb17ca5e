"""ShapeWorld: a deterministic benchmark world of shapes, with every annotation a VLM needs.

    python -m data.shapeworld generate --out out/shapeworld --train 10000 --val 1000 --test 1000
    python -m data.shapeworld generate --out /work/data/sw --preset shapes     # the preset's scenes
    python -m data.shapeworld generate --out out/shapeworld_diffusion --preset shapes \\
        --entry diffusion                                   # the diffusion decoder's pictures
    python -m data.shapeworld stats out/shapeworld
    python -m data.shapeworld preview out/shapeworld --split val --count 32 --out preview.png

Every image is a pure function of (generator version, seed, split, index), whatever the number of
worker processes. Splits:

- ``train``: the seen classes and colours only — segmentation training never sees the unseen ones.
- ``val`` / ``test``: every class and colour; unseen ones are flagged in the COCO categories and in
  ``shapeworld.json``, so metrics can be split into seen and unseen.
- ``pretrain``: every class and colour, for CLIP / diffusion / VLM pretraining on captions (as real
  CLIP has seen the ADE classes that COCO-trained segmenters have not).

Exported layout (standard formats, so a user's COCO / RefCOCO / imagefolder data plugs in)::

    OUT/shapeworld.json                   generator version, config, vocabulary, split sizes
    OUT/<split>/000000.png ...            RGB images (an HF imagefolder)
    OUT/<split>/metadata.jsonl            per image: captions, QA, dialogues, background
    OUT/semantic/<split>/000000.png       uint8 class-id maps, 0 = background
    OUT/annotations/instances_<split>.json   COCO instances (RLE masks of the visible parts)
    OUT/annotations/captions_<split>.json    COCO captions
    OUT/annotations/refs_<split>.json        RefCOCO-style referring expressions (JSON, not pickle)

The whole folder is written under a temporary name and renamed at the end: an interrupted run
leaves no partial dataset behind.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.config import Config, load_preset_dict
from core.io import atomic_dir, atomic_write_text
from data.formats import (
    CocoAnnotation,
    CocoCaption,
    CocoCategory,
    CocoImage,
    CocoInstances,
    RefRecord,
    RefSentence,
    mask_to_rle,
    read_coco_instances,
    read_imagefolder,
    read_refs,
    rle_to_mask,
    write_coco_captions,
    write_coco_instances,
    write_imagefolder_metadata,
    write_refs,
)
from data.language import annotate
from data.render import LayoutConfig, render_scene
from data.scene import (
    COLOUR_RGB,
    COLOURS,
    SHAPES,
    UNSEEN_COLOURS,
    UNSEEN_SHAPES,
    Dialogue,
    QAPair,
    ReferringExpression,
    Scene,
    ShapeObject,
    class_id,
)

__all__ = [
    "GENERATOR_VERSION",
    "SPLITS",
    "ShapeWorldConfig",
    "SplitSizes",
    "generate_scene",
    "split_vocabulary",
]

# Bump when a change alters any generated image or annotation for the same seed.
GENERATOR_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test", "pretrain")


@dataclass
class SplitSizes(Config):
    """Images per split."""

    train: int = 10000  # seen classes and colours only
    val: int = 1000
    test: int = 1000
    pretrain: int = 0  # all classes and colours, for caption pretraining (CLIP, diffusion, VLM)

    def __post_init__(self) -> None:
        for name in SPLITS:
            n = getattr(self, name)
            if not 0 <= n <= 10_000_000:
                raise ValueError(f"split size {name} must be in [0, 10000000], received {n}")


@dataclass
class ShapeWorldConfig(Config):
    """A ShapeWorld dataset: generator seed, scene layout and split sizes."""

    seed: int = 0  # with GENERATOR_VERSION, fixes every image
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    splits: SplitSizes = field(default_factory=SplitSizes)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, received {self.seed}")


def split_vocabulary(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(shapes, colours) a split draws from: train excludes the unseen ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    if split == "train":
        return (
            tuple(s for s in SHAPES if s not in UNSEEN_SHAPES),
            tuple(c for c in COLOURS if c not in UNSEEN_COLOURS),
        )
    return SHAPES, COLOURS


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of worker count and of the other images."""
    return np.random.default_rng(
        np.random.SeedSequence([GENERATOR_VERSION, seed, SPLITS.index(split), index])
    )


def generate_scene(layout: LayoutConfig, seed: int, split: str, index: int) -> Scene:
    """Render and annotate image `index` of `split`."""
    shapes, colours = split_vocabulary(split)
    rng = scene_rng(seed, split, index)
    scene = render_scene(layout, rng, shapes, colours)
    annotate(scene, rng, shapes=shapes, colours=colours)
    return scene


# ----------------------------------------------------------------------------------------------
# Export


def _image_name(index: int) -> str:
    return f"{index:06d}.png"


def _render_chunk(job: tuple[str, dict[str, Any], int, str, list[int]]) -> list[dict[str, Any]]:
    """Worker: render images `indices` of one split, write their PNGs, return their records."""
    root, layout_dict, seed, split, indices = job
    layout = LayoutConfig.from_dict(layout_dict)
    out = []
    for index in indices:
        scene = generate_scene(layout, seed, split, index)
        name = _image_name(index)
        Image.fromarray(scene.image).save(os.path.join(root, split, name), compress_level=1)
        Image.fromarray(scene.semantic_map()).save(
            os.path.join(root, "semantic", split, name), compress_level=1
        )
        out.append(_scene_record(scene, index))
    return out


def _scene_record(scene: Scene, index: int) -> dict[str, Any]:
    """What the exporter needs of a scene; masks as RLE (cheap to send between processes)."""
    return {
        "index": index,
        "height": scene.height,
        "width": scene.width,
        "background": scene.background,
        "objects": [
            {
                "shape": o.shape,
                "colour": o.colour,
                "rgb": list(o.rgb),
                "rle": mask_to_rle(o.mask),
                "area": o.area,
                "bbox": list(o.bbox),
                "full_area": o.full_area,
                "center": list(o.center),
                "size": o.size,
                "rotation": o.rotation,
            }
            for o in scene.objects
        ],
        "captions": list(scene.captions),
        "refs": [
            {"text": r.text, "target": r.target, "type": r.type, "has_distractor": r.has_distractor}
            for r in scene.refs
        ],
        "qa": [{"question": q.question, "answer": q.answer, "type": q.type} for q in scene.qa],
        "dialogues": [[list(turn) for turn in d.turns] for d in scene.dialogues],
    }


def _categories() -> list[CocoCategory]:
    return [CocoCategory(class_id(s), s, "shape", {"unseen": s in UNSEEN_SHAPES}) for s in SHAPES]


def _normalise(text: str) -> str:
    """RefCOCO's `sent`: lower case, punctuation stripped."""
    return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace()).split())


def _write_split(
    root: Path, split: str, records: list[dict[str, Any]], info: dict[str, Any]
) -> None:
    """The COCO instances / captions / refs files and the imagefolder metadata of one split."""
    images, annotations, captions, refs, rows = [], [], [], [], []
    ann_id = caption_id = ref_id = sent_id = 0
    for rec in records:
        image_id = rec["index"] + 1
        name = _image_name(rec["index"])
        images.append(CocoImage(image_id, name, rec["height"], rec["width"]))
        first_ann = ann_id + 1
        for k, obj in enumerate(rec["objects"]):
            ann_id += 1
            annotations.append(
                CocoAnnotation(
                    id=ann_id,
                    image_id=image_id,
                    category_id=class_id(obj["shape"]),
                    segmentation=obj["rle"],
                    area=float(obj["area"]),
                    bbox=[float(v) for v in obj["bbox"]],
                    iscrowd=0,
                    extra={
                        "colour": obj["colour"],
                        "rgb": obj["rgb"],
                        "paint_order": k,
                        "full_area": obj["full_area"],
                        "occlusion": round(1.0 - obj["area"] / max(obj["full_area"], 1), 6),
                        "center": obj["center"],
                        "size": obj["size"],
                        "rotation": obj["rotation"],
                    },
                )
            )
        for text in rec["captions"]:
            caption_id += 1
            captions.append(CocoCaption(caption_id, image_id, text))
        for ref in rec["refs"]:
            ref_id += 1
            sent_id += 1
            target = rec["objects"][ref["target"]]
            refs.append(
                RefRecord(
                    ref_id=ref_id,
                    ann_id=first_ann + ref["target"],
                    image_id=image_id,
                    category_id=class_id(target["shape"]),
                    split=split,
                    sentences=[
                        RefSentence(
                            sent_id,
                            _normalise(ref["text"]),
                            _normalise(ref["text"]).split(),
                            ref["text"],
                        )
                    ],
                    extra={"expression_type": ref["type"], "has_distractor": ref["has_distractor"]},
                )
            )
        rows.append(
            {
                "file_name": name,
                "image_id": image_id,
                "background": rec["background"],
                "objects": [{"shape": o["shape"], "colour": o["colour"]} for o in rec["objects"]],
                "captions": rec["captions"],
                "qa": rec["qa"],
                "dialogues": rec["dialogues"],
            }
        )
    ann_dir = root / "annotations"
    write_coco_instances(
        ann_dir / f"instances_{split}.json", CocoInstances(images, annotations, _categories(), info)
    )
    write_coco_captions(ann_dir / f"captions_{split}.json", images, captions, info)
    write_refs(ann_dir / f"refs_{split}.json", refs)
    write_imagefolder_metadata(root / split, rows)


def generate(
    out: str | os.PathLike[str],
    cfg: ShapeWorldConfig,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate every non-empty split of `cfg` into `out` (atomically). Returns `out`."""
    out = Path(out)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    sizes = {s: getattr(cfg.splits, s) for s in SPLITS}
    total = sum(sizes.values())
    if total == 0:
        raise ValueError("every split size is 0; nothing to generate")
    info = {
        "description": "ShapeWorld (Polychrome)",
        "version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "year": 2026,
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        chunk = 64
        jobs = []
        for split, n in sizes.items():
            if n == 0:
                continue
            (tmp / split).mkdir()
            (tmp / "semantic" / split).mkdir(parents=True)
            layout = cfg.layout.to_dict()
            jobs += [
                (str(tmp), layout, cfg.seed, split, list(range(i, min(i + chunk, n))))
                for i in range(0, n, chunk)
            ]
        records: dict[str, list[dict[str, Any]]] = {s: [] for s, n in sizes.items() if n}
        bar = tqdm(total=total, desc="ShapeWorld", unit="img", disable=not progress)
        if workers == 1:
            results: Iterator[list[dict[str, Any]]] = map(_render_chunk, jobs)
            for job, recs in zip(jobs, results, strict=True):
                records[job[3]] += recs
                bar.update(len(recs))
        else:
            # fork: workers need no re-import of the caller's __main__ (spawn would re-run an
            # unguarded script); they only use numpy and PIL.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(workers) as pool:
                for job, recs in zip(jobs, pool.imap(_render_chunk, jobs), strict=True):
                    records[job[3]] += recs
                    bar.update(len(recs))
        bar.close()
        for split, recs in records.items():
            _write_split(tmp, split, recs, info)
        manifest = {
            "name": "ShapeWorld",
            "generator_version": GENERATOR_VERSION,
            "config": cfg.to_dict(),
            "splits": {s: n for s, n in sizes.items() if n},
            "shapes": [
                {"id": class_id(s), "name": s, "unseen": s in UNSEEN_SHAPES} for s in SHAPES
            ],
            "colours": [
                {"name": c, "rgb": list(COLOUR_RGB[c]), "unseen": c in UNSEEN_COLOURS}
                for c in COLOURS
            ],
        }
        atomic_write_text(tmp / "shapeworld.json", json.dumps(manifest, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------------------------
# Reading back


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The `shapeworld.json` of a generated folder."""
    path = Path(root) / "shapeworld.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; is {root} a ShapeWorld folder (made by `generate`)?"
        )
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def read_split(root: str | os.PathLike[str], split: str, limit: int | None = None) -> list[Scene]:
    """Rebuild the Scenes of one exported split (images, masks and every annotation)."""
    root = Path(root)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise ValueError(f"{root} has no split {split!r}; it has {list(manifest['splits'])}")
    ann_dir = root / "annotations"
    instances = read_coco_instances(ann_dir / f"instances_{split}.json")
    refs = read_refs(ann_dir / f"refs_{split}.json")
    rows = {row["image_id"]: row for row in read_imagefolder(root / split)}
    names = {c.id: c.name for c in instances.categories}
    by_image: dict[int, list[CocoAnnotation]] = {}
    for ann in instances.annotations:
        by_image.setdefault(ann.image_id, []).append(ann)
    refs_by_image: dict[int, list[RefRecord]] = {}
    for ref in refs:
        refs_by_image.setdefault(ref.image_id, []).append(ref)
    scenes = []
    for image in instances.images[:limit]:
        pixels = np.asarray(Image.open(root / split / image.file_name).convert("RGB"))
        anns = sorted(by_image.get(image.id, []), key=lambda a: a.extra["paint_order"])
        objects = [
            ShapeObject(
                shape=names[a.category_id],
                colour=a.extra["colour"],
                rgb=tuple(a.extra["rgb"]),
                mask=rle_to_mask(a.segmentation, image.height, image.width),
                full_area=int(a.extra["full_area"]),
                center=tuple(a.extra["center"]),
                size=float(a.extra["size"]),
                rotation=float(a.extra["rotation"]),
            )
            for a in anns
        ]
        first_ann = anns[0].id if anns else 0
        row = rows[image.id]
        scenes.append(
            Scene(
                image=pixels,
                objects=objects,
                background=row["background"],
                captions=list(row["captions"]),
                refs=[
                    ReferringExpression(
                        text=r.sentences[0].raw,
                        target=r.ann_id - first_ann,
                        type=r.extra["expression_type"],
                        has_distractor=bool(r.extra["has_distractor"]),
                    )
                    for r in refs_by_image.get(image.id, [])
                ],
                dialogues=[Dialogue([tuple(t) for t in d]) for d in row["dialogues"]],
                qa=[QAPair(q["question"], q["answer"], q["type"]) for q in row["qa"]],
            )
        )
    return scenes


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Target:
    """A difficulty target the generator promises (checked by `stats`)."""

    name: str
    value: float
    op: str  # ">=" or "<="
    bound: float

    @property
    def ok(self) -> bool:
        return self.value >= self.bound if self.op == ">=" else self.value <= self.bound


def split_stats(root: str | os.PathLike[str], split: str) -> dict[str, Any]:
    """Difficulty statistics of one exported split, read from its annotation files only."""
    root = Path(root)
    ann_dir = root / "annotations"
    instances = read_coco_instances(ann_dir / f"instances_{split}.json")
    refs = read_refs(ann_dir / f"refs_{split}.json")
    rows = read_imagefolder(root / split)
    names = {c.id: c.name for c in instances.categories}
    n_images = len(instances.images)
    per_image: dict[int, list[CocoAnnotation]] = {im.id: [] for im in instances.images}
    for ann in instances.annotations:
        per_image[ann.image_id].append(ann)
    counts = np.array([len(v) for v in per_image.values()])
    side = {im.id: im.width for im in instances.images}
    occluded = np.mean(
        [any(a.extra["occlusion"] >= 0.3 for a in anns) for anns in per_image.values()]
    )
    area_frac = np.array(
        [a.area / (side[a.image_id] ** 2) for a in instances.annotations], dtype=float
    )
    classes = Counter(names[a.category_id] for a in instances.annotations)
    colours = Counter(a.extra["colour"] for a in instances.annotations)
    ref_types = Counter(r.extra["expression_type"] for r in refs)
    distractor = np.mean([bool(r.extra["has_distractor"]) for r in refs]) if refs else 0.0
    qa_types = Counter(q["type"] for row in rows for q in row["qa"])
    n_captions = np.array([len(row["captions"]) for row in rows])
    distinct_caption_starts = len({c.split()[0] for row in rows for c in row["captions"]})
    stats: dict[str, Any] = {
        "split": split,
        "images": n_images,
        "image_size": sorted({(im.height, im.width) for im in instances.images}),
        "objects_per_image": {
            "min": int(counts.min()),
            "mean": float(counts.mean()),
            "max": int(counts.max()),
            "histogram": {int(k): int(v) for k, v in sorted(Counter(counts.tolist()).items())},
        },
        "classes": dict(sorted(classes.items())),
        "colours": dict(sorted(colours.items())),
        "unseen_classes_present": sorted(s for s in UNSEEN_SHAPES if classes.get(s)),
        "unseen_colours_present": sorted(c for c in UNSEEN_COLOURS if colours.get(c)),
        "object_area_fraction": {
            f"p{q}": float(np.percentile(area_frac, q)) for q in (1, 5, 50, 95, 99)
        },
        "images_with_object_occluded_30pct": float(occluded),
        "backgrounds": dict(Counter(row["background"] for row in rows)),
        "captions_per_image": {"min": int(n_captions.min()), "mean": float(n_captions.mean())},
        "caption_openings": distinct_caption_starts,
        "refs_per_image": len(refs) / max(n_images, 1),
        "ref_types": dict(ref_types),
        "refs_with_distractor": float(distractor),
        "qa_types": dict(qa_types),
        "dialogue_turns_mean": float(
            np.mean([len(d) for row in rows for d in row["dialogues"]]) if rows else 0.0
        ),
    }
    ratio = area_frac.max() / max(area_frac.min(), 1e-9) if len(area_frac) else 0.0
    targets = [
        Target("objects per image >= 2", float(counts.min()), ">=", 2),
        Target("objects per image <= 7", float(counts.max()), "<=", 7),
        Target("shape classes present", len(classes), ">=", 12 if split != "train" else 12 - 3),
        Target("colours present", len(colours), ">=", 10 if split != "train" else 10 - 2),
        Target("images with an object >= 30% occluded", float(occluded), ">=", 0.2),
        Target("largest / smallest object area", float(ratio), ">=", 20),
        Target("background kinds", len(stats["backgrounds"]), ">=", 3),
        Target("captions per image (min)", float(n_captions.min()), ">=", 3),
        Target("refs with a same-class or same-colour distractor", float(distractor), ">=", 0.7),
        Target("referring expression types", len(ref_types), ">=", 3),
    ]
    if split == "train":
        leaked = len(stats["unseen_classes_present"]) + len(stats["unseen_colours_present"])
        targets.append(Target("unseen classes/colours in train", leaked, "<=", 0))
    stats["targets"] = [
        {"name": t.name, "value": t.value, "target": f"{t.op} {t.bound:g}", "ok": t.ok}
        for t in targets
    ]
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """A person-readable report of split_stats."""
    lines = [f"## {stats['split']}: {stats['images']} images, sizes {stats['image_size']}"]
    o = stats["objects_per_image"]
    lines.append(
        f"objects/image: min {o['min']}, mean {o['mean']:.2f}, max {o['max']}  {o['histogram']}"
    )
    lines.append(f"classes ({len(stats['classes'])}): {stats['classes']}")
    lines.append(f"colours ({len(stats['colours'])}): {stats['colours']}")
    lines.append(
        f"unseen present: classes {stats['unseen_classes_present']}, "
        f"colours {stats['unseen_colours_present']}"
    )
    af = stats["object_area_fraction"]
    lines.append("object area / image area: " + ", ".join(f"{k} {v:.4f}" for k, v in af.items()))
    lines.append(f"backgrounds: {stats['backgrounds']}")
    lines.append(
        f"captions/image: min {stats['captions_per_image']['min']}, mean "
        f"{stats['captions_per_image']['mean']:.2f}; refs/image {stats['refs_per_image']:.2f} "
        f"{stats['ref_types']}; QA {stats['qa_types']}; dialogue turns "
        f"{stats['dialogue_turns_mean']:.2f}"
    )
    lines.append("")
    lines.append("| target | value | wanted | ok |")
    lines.append("|---|---|---|---|")
    for t in stats["targets"]:
        value = (
            f"{t['value']:.3f}"
            if isinstance(t["value"], float) and t["value"] < 1
            else f"{t['value']:g}"
        )
        lines.append(f"| {t['name']} | {value} | {t['target']} | {'yes' if t['ok'] else 'NO'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def _preview(root: Path, split: str, count: int, out: Path) -> None:
    """A grid PNG of the first `count` images with their instance outlines."""
    scenes = read_split(root, split, limit=count)
    tiles = []
    for scene in scenes:
        tile = scene.image.copy()
        for obj in scene.objects:
            edge = obj.mask & ~_erode(obj.mask)
            tile[edge] = (255, 255, 255) if obj.colour != "white" else (0, 0, 0)
        tiles.append(tile)
    cols = min(8, len(tiles))
    rows = -(-len(tiles) // cols)
    h, w = tiles[0].shape[:2]
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = tile
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


PRESET_ENTRIES = ("shapeworld", "diffusion")


def preset_data_config(preset: str, entry: str = "shapeworld") -> ShapeWorldConfig:
    """The ShapeWorld data a preset names: its "shapeworld" entry (the scenes), or with entry
    "diffusion" its decoder's data ("diffusion" -> "data"). ValueError for an unknown preset or
    entry, or a preset without that entry; ConfigError for a malformed one."""
    if entry not in PRESET_ENTRIES:
        raise ValueError(f"entry must be one of {PRESET_ENTRIES}, received {entry!r}")
    raw = load_preset_dict(preset)
    where = "shapeworld" if entry == "shapeworld" else "diffusion.data"
    data = raw.get("shapeworld") if entry == "shapeworld" else raw.get("diffusion", {}).get("data")
    if not isinstance(data, dict):
        raise ValueError(f"preset {preset!r} has no {where!r} entry of ShapeWorld data")
    return ShapeWorldConfig.from_dict(data, source=f"preset {preset} {where}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.shapeworld",
        description="Generate ShapeWorld, print its difficulty statistics, or preview it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="render splits and export them in standard formats")
    gen.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    defaults = SplitSizes()
    for split in SPLITS:
        gen.add_argument(
            f"--{split}",
            type=int,
            default=None,
            help=f"images in the {split} split (default {getattr(defaults, split)}, or the "
            "preset's with --preset)",
        )
    gen.add_argument("--seed", type=int, default=None, help="generator seed (default 0)")
    gen.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"square image side in pixels, 16..512 (default {LayoutConfig().image_size})",
    )
    gen.add_argument(
        "--like",
        type=Path,
        default=None,
        help="take the seed and scene layout of this generated folder (its shapeworld.json; "
        "--seed and --image-size are then not allowed; split sizes are still this command's, "
        "so pass 0 for the splits you do not want): e.g. --train 0 --val 0 --test 1000 for a "
        "test split of a folder made without one. Images are a pure function of (seed, split, "
        "index), so its splits and the new folder's agree where they overlap",
    )
    gen.add_argument(
        "--preset",
        default=None,
        help="take seed, layout and split sizes from this preset (configs/NAME.json): its "
        "'shapeworld' entry, the scenes the shapes models train and are scored on (--split "
        "sizes given here replace its own; --seed and --image-size are then not allowed)",
    )
    gen.add_argument(
        "--entry",
        choices=PRESET_ENTRIES,
        default="shapeworld",
        help="with --preset: 'diffusion' takes its diffusion decoder's data instead (one or two "
        "objects a picture; eval.generation and eval.gill read its val split)",
    )
    gen.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    st = sub.add_parser("stats", help="difficulty statistics of a generated folder")
    st.add_argument("root", type=Path)
    st.add_argument("--split", action="append", help="split(s) to report (default: all)")
    st.add_argument("--json", type=Path, help="also write the statistics as JSON here")
    pv = sub.add_parser("preview", help="write a PNG grid of images with instance outlines")
    pv.add_argument("root", type=Path)
    pv.add_argument("--split", default="val")
    pv.add_argument("--count", type=int, default=32)
    pv.add_argument("--out", type=Path, default=Path("shapeworld_preview.png"))
    args = parser.parse_args(argv)

    if args.command == "generate":
        given = {s: getattr(args, s) for s in SPLITS if getattr(args, s) is not None}
        sizes = {**SplitSizes().to_dict(), **given}
        if args.entry != "shapeworld" and args.preset is None:
            parser.error(f"--entry {args.entry} needs --preset")
        try:
            if args.preset is not None:
                if args.like is not None:
                    parser.error("give one of --preset and --like")
                if args.seed is not None or args.image_size is not None:
                    parser.error("--preset takes the seed and image size of its data: drop them")
                cfg = preset_data_config(args.preset, args.entry)
                cfg = cfg.replace(splits=SplitSizes(**{**cfg.splits.to_dict(), **given}))
            elif args.like is not None:
                if args.seed is not None or args.image_size is not None:
                    parser.error("--like takes the seed and image size of its folder: drop them")
                manifest = read_manifest(args.like)
                if manifest["generator_version"] != GENERATOR_VERSION:
                    parser.error(
                        f"--like: {args.like} was made by generator version "
                        f"{manifest['generator_version']}, this is version {GENERATOR_VERSION}: "
                        "its images would not be reproduced"
                    )
                like = ShapeWorldConfig.from_dict(manifest["config"], source=str(args.like))
                cfg = like.replace(splits=SplitSizes(**sizes))
            else:
                cfg = ShapeWorldConfig(
                    seed=0 if args.seed is None else args.seed,
                    layout=LayoutConfig(image_size=args.image_size or LayoutConfig().image_size),
                    splits=SplitSizes(**sizes),
                )
        except FileNotFoundError as err:
            parser.error(f"--like: {err}")
        except KeyError as err:
            parser.error(f"--like: {args.like}/shapeworld.json has no {err} entry")
        except ValueError as err:
            parser.error(str(err))
        if args.out.exists() and not args.overwrite:
            parser.error(f"{args.out} already exists; pass --overwrite to replace it")
        generate(args.out, cfg, workers=args.workers, overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return 0
    if args.command == "stats":
        manifest = read_manifest(args.root)
        splits = args.split or list(manifest["splits"])
        all_stats = [split_stats(args.root, s) for s in splits]
        print("\n\n".join(format_stats(s) for s in all_stats))
        if args.json:
            atomic_write_text(args.json, json.dumps(all_stats, indent=2) + "\n")
        return 0 if all(t["ok"] for s in all_stats for t in s["targets"]) else 1
    _preview(args.root, args.split, args.count, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
