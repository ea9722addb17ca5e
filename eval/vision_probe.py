"""Linear probes: what a CLIP tower's patch features say about each object of a ShapeWorld scene.

    python -m eval.vision_probe --data /work/data/sw --train-split pretrain --train-images 1500 \\
        --split val --images 400 --windows 0 5 --json out/vision_probe.json

The VLM core reads an image as CLIP's patch tokens, ``merge`` x ``merge`` of them per visual token
(vlm.model.Projector). Whatever the LLM can learn about an object it must find in those features;
this measures how much is there, with no LLM involved.

Protocol. Every object whose visible mask covers at least ``min_area`` pixels is one example. Two
readouts of its features:

- ``token``: the ``merge`` x ``merge`` block of patch tokens holding the centroid of its visible
  mask, concatenated patch by patch in row-major order (exactly what the projector reads for that
  visual token);
- ``mask mean``: the mean of the patch tokens weighted by how much of each patch the visible mask
  covers.

Three targets: the object's class, its colour, and the 3 x 3 cell of the image its centroid lies
in. One multinomial logistic regression per (readout, target) on standardised features
(scikit-learn), fitted on the objects of ``--train-split`` and scored (accuracy) on those of
``--split``; beside them, the accuracy of always answering the most common training label.
Each ``--windows`` value is one feature kind: 0 = the tower as trained (global attention),
k = every patch attending to a k x k neighbourhood in every block
(vision.clip.dense_features(window=k); the VLM's ``ProjectorConfig.features = "local"``).
ShapeWorld's train split leaves the unseen classes and colours out; draw the probe's training
objects from ``pretrain``, which has them all.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from core.io import atomic_write_text
from core.runtime import resolve_device
from data.scene import Scene
from data.shapeworld import read_split
from vision.clip import ClipModel, dense_features, load_clip

__all__ = [
    "READOUTS",
    "TARGETS",
    "majority_accuracy",
    "object_features",
    "probe_accuracy",
    "run_probes",
]

READOUTS = ("token", "mask mean")
TARGETS = ("class", "colour", "cell")


def object_features(
    model: ClipModel,
    preprocess: Any,
    scenes: Sequence[Scene],
    *,
    window: int = 0,
    merge: int = 2,
    min_area: int = 20,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, list[Any]]]:
    """({readout: (N, D) features}, {target: N labels}) over the scenes' objects (module
    docstring). Scenes must be square (ShapeWorld's are): the patch grid then covers the image."""
    feats: dict[str, list[npt.NDArray[np.float32]]] = {r: [] for r in READOUTS}
    labels: dict[str, list[Any]] = {t: [] for t in TARGETS}
    device = next(model.parameters()).device
    bar = tqdm(total=len(scenes), desc=f"features (window {window})", disable=not progress)
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        for scene in chunk:
            if scene.height != scene.width:
                raise ValueError(
                    f"expected square scenes, received one of {scene.width}x{scene.height} pixels"
                )
        pixels = torch.stack([preprocess(Image.fromarray(s.image)) for s in chunk])
        with torch.no_grad():
            dense = dense_features(model, pixels.to(device), window=window)
        h, w = dense.grid
        if h % merge or w % merge:
            raise ValueError(f"merge={merge} does not divide the patch grid {h}x{w}")
        tokens = dense.tokens.float().cpu().reshape(len(chunk), h, w, -1)
        for scene, grid in zip(chunk, tokens, strict=True):
            size = scene.height
            for obj in scene.objects:
                mask = np.asarray(obj.mask, dtype=bool)
                if mask.sum() < min_area:
                    continue
                ys, xs = np.nonzero(mask)
                cy, cx = float(ys.mean()), float(xs.mean())
                r, c = int(cy * h / size) // merge, int(cx * w / size) // merge
                block = grid[r * merge : (r + 1) * merge, c * merge : (c + 1) * merge]
                feats["token"].append(block.reshape(-1).numpy())
                cover = F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None], (h, w))[0]
                weights = cover / cover.sum()
                feats["mask mean"].append((grid * weights[..., None]).sum((0, 1)).numpy())
                labels["class"].append(obj.shape)
                labels["colour"].append(obj.colour)
                labels["cell"].append(int(cy * 3 / size) * 3 + int(cx * 3 / size))
        bar.update(len(chunk))
    bar.close()
    if not labels["class"]:
        raise ValueError(f"no object of at least {min_area} visible pixels in {len(scenes)} scenes")
    return {r: np.stack(v) for r, v in feats.items()}, labels


def probe_accuracy(
    train_x: npt.NDArray[np.floating],
    train_y: Sequence[Any],
    test_x: npt.NDArray[np.floating],
    test_y: Sequence[Any],
    *,
    c: float = 0.5,
    max_iter: int = 500,
) -> float:
    """Accuracy on (test_x, test_y) of a logistic regression fitted on standardised train_x."""
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(train_x), train_y)
    return float(clf.score(scaler.transform(test_x), test_y))


def run_probes(
    model: ClipModel,
    preprocess: Any,
    train_scenes: Sequence[Scene],
    test_scenes: Sequence[Scene],
    windows: Sequence[int],
    *,
    merge: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Every (window, readout, target) accuracy: {"rows": one per window, "objects": counts of
    the fitted and scored objects, "merge", "majority": the floor per target}."""
    if not windows:
        raise ValueError("windows is empty; expected at least one (0 = global attention)")
    rows = []
    for window in windows:
        train_x, train_y = object_features(
            model, preprocess, train_scenes, window=window, merge=merge, progress=progress
        )
        test_x, test_y = object_features(
            model, preprocess, test_scenes, window=window, merge=merge, progress=progress
        )
        row: dict[str, Any] = {"window": window}
        for readout in READOUTS:
            for target in TARGETS:
                row[f"{readout} / {target}"] = probe_accuracy(
                    train_x[readout], train_y[target], test_x[readout], test_y[target]
                )
        rows.append(row)
    # the objects and their labels are the same for every window: the last pass's will do
    counts = {"train": len(train_y["class"]), "test": len(test_y["class"])}
    majority = {t: majority_accuracy(train_y[t], test_y[t]) for t in TARGETS}
    return {"rows": rows, "objects": counts, "merge": merge, "majority": majority}


def majority_accuracy(train_y: Sequence[Any], test_y: Sequence[Any]) -> float:
    """Accuracy of always answering the training labels' most common value (the floor)."""
    values, counts = np.unique(np.asarray(train_y), return_counts=True)
    top = values[int(np.argmax(counts))]
    return float(np.mean(np.asarray(test_y) == top))


def format_table(results: dict[str, Any]) -> str:
    cols = [f"{r} / {t}" for r in READOUTS for t in TARGETS]
    lines = [
        "| features | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for row in results["rows"]:
        name = "global (as trained)" if row["window"] == 0 else f"local, window {row['window']}"
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}" for c in cols) + " |")
    floor = [f"{100 * results['majority'][c.split(' / ')[1]]:.1f}" for c in cols]
    lines.append("| the most common label (no features) | " + " | ".join(floor) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.vision_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="a ShapeWorld folder")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("checkpoints/shapes/clip"),
        help="CLIP checkpoint folder (default: the shapes preset's)",
    )
    parser.add_argument("--train-split", default="pretrain", help="split the probes fit on")
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--split", default="val", help="split the probes are scored on")
    parser.add_argument("--images", type=int, default=400, help="first N images of --split")
    parser.add_argument(
        "--windows",
        type=int,
        nargs="+",
        default=[0, 5],
        help="feature kinds: 0 = global attention (as trained), k = a k x k attention window",
    )
    parser.add_argument("--merge", type=int, default=2, help="patches per visual token side")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.train_images < 1 or args.images < 1:
        parser.error(
            f"--train-images and --images must be >= 1, received {args.train_images} and "
            f"{args.images}"
        )
    if any(w < 0 for w in args.windows):
        parser.error(f"--windows must be >= 0 (0 = global), received {args.windows}")
    if args.merge < 1:
        parser.error(f"--merge must be >= 1, received {args.merge}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        train_scenes = read_split(args.data, args.train_split, limit=args.train_images)
        test_scenes = read_split(args.data, args.split, limit=args.images)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    model, preprocess, _ = load_clip(args.checkpoint)
    model.to(resolve_device(args.device)).eval()
    results = run_probes(
        model,
        preprocess,
        train_scenes,
        test_scenes,
        args.windows,
        merge=args.merge,
        progress=not args.no_progress,
    )
    given = sys.argv[1:] if argv is None else argv
    results["command"] = "python -m eval.vision_probe " + shlex.join(given)
    results["table"] = format_table(results)
    print(f"objects: {results['objects']['train']} to fit, {results['objects']['test']} scored")
    print(results["table"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
