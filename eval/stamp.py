"""Evaluate referring segmentation: STAMP, STAMP + SAM, and the baselines, side by side.

    python -m eval.stamp --data /work/data/sw --split test --limit 300 \\
        --checkpoint stamp=/work/runs/stamp/final --checkpoint text4seg=/work/runs/t4s/final \\
        --checkpoint lisa=/work/runs/lisa/final --sam-refine stamp --json out/stamp.json
    # any RefCOCO-style refs file
    python -m eval.stamp --refs refs_val.json --instances instances_val.json --images val2014/ \\
        --checkpoint stamp=checkpoints/shapes/stamp

Each ``--checkpoint NAME=PATH`` is a train.stamp ``final/`` folder (its method is in its config);
``--sam-refine NAME`` adds a row "NAME + SAM" that refines NAME's masks with the preset's SAM
prompted by the mask logits and points sampled from them (segmentation.stamp.refine_with_sam).

Every sample is the request "Segment <expression>." on its image; the reply is forced to
``<seg>`` so the mask is scored whatever the model would have said, and "seg rate" reports how
often the model opens its reply with ``<seg>`` by itself. cIoU (total intersection / total
union) and gIoU (mean per-sample IoU), overall and by expression type. Time: seconds per sample
at batch 1, every method on the same sample in turn (interleaved, so load on the machine hits
them alike), median over ``--timing-samples`` x ``--repeats``.

Under ``accelerate launch --multi_gpu --num_processes N`` the expressions are split over the N
processes and their per-sample counts gathered: the metrics are the whole set's, the same as one
process gives (tests/test_scaling.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from core.config import project_path
from core.images import load_rgb
from core.io import atomic_write_text
from core.runtime import destroy_process_group_at_exit
from data.conversations import read_chat_records
from data.datasets import ReferringDataset, add_referring_arguments, referring_dataset_from_args
from eval.metrics import ciou_from_counts, giou_from_counts, intersection_union, mask_iou
from segmentation.stamp import fit_grid_logits, mask_like_clip_input, refine_with_sam
from vision.sam import load_sam
from vlm.config import PolychromeConfig
from vlm.stamp import SEG_PROMPTS, StampVLM

__all__ = ["evaluate", "main", "markdown"]

Prompt = list[dict[str, Any]]
Segmenter = Callable[[list[Prompt]], list[npt.NDArray[np.float32]]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.stamp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="preset (its SAM refines)")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a train.stamp final/ folder; repeat for several",
    )
    parser.add_argument(
        "--sam-refine",
        action="append",
        default=[],
        metavar="NAME",
        help="also score NAME's masks refined by SAM (row 'NAME + SAM')",
    )
    parser.add_argument("--sam", type=Path, default=None, help="SAM folder (default: preset's)")
    add_referring_arguments(parser, default_split="test")
    parser.add_argument("--limit", type=int, default=None, help="first N expressions")
    parser.add_argument("--batch-size", type=int, default=8, help="expressions per forward")
    parser.add_argument(
        "--timing-samples", type=int, default=10, help="samples timed at batch 1 (default 10)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per sample")
    parser.add_argument(
        "--false-seg-questions",
        type=int,
        default=200,
        help="ShapeWorld: how many of the split's ordinary questions to check for a <seg> the "
        "model should not emit (0 = skip)",
    )
    parser.add_argument(
        "--text-dependence",
        type=int,
        default=0,
        metavar="IMAGES",
        help="also report, over this many images, the mean IoU between masks predicted for "
        "expressions naming different objects (1.0 = the words are ignored)",
    )
    parser.add_argument(
        "--grid-oracle",
        action="store_true",
        help="add a row 'grid oracle': per-sample logits on the first 'stamp' checkpoint's mask "
        "grid fitted to the ground truth on STAMP's loss, upsampled as the model's are (the "
        "ceiling of any mask head on that grid; not timed)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _parse_checkpoints(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--checkpoint must be NAME=PATH, received {spec!r}")
        if name in out:
            parser.error(f"--checkpoint name {name!r} given twice")
        if not Path(path).is_dir():
            parser.error(f"--checkpoint {name}: folder {path} not found")
        out[name] = Path(path)
    return out


def evaluate(
    data: ReferringDataset,
    segmenters: dict[str, Segmenter],
    *,
    batch_size: int = 8,
    timing_samples: int = 10,
    repeats: int = 3,
    progress: bool = True,
    seg_rate: dict[str, Callable[[list[Prompt]], list[bool]]] | None = None,
    untimed: Collection[str] = (),
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[list[Any]], list[Any]] | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Score every segmenter on every item of `data`; see the module docstring.

    thresholds: the logit above which a pixel is foreground, per segmenter (its model's
    ``config.threshold``, as its own replies use it); 0 for a segmenter not named.

    shard = (rank, world): this process scores items rank, rank + world, ...; `gather` (e.g.
    accelerate's gather_object) collects every process's per-sample counts, so the metrics are
    the whole dataset's on every process. Timing runs on the samples of shard 0 only, for every
    segmenter not named in `untimed` (references such as the grid oracle).
    """
    if len(data) == 0:
        raise ValueError("no referring expressions to evaluate")
    rank, world = shard
    mine = list(range(rank, len(data), world))
    items = [data[i] for i in mine]
    prompts: list[Prompt] = [
        [
            {
                "role": "user",
                "content": SEG_PROMPTS[0].format(it.expression),
                "images": [it.image_path],
            }
        ]
        for it in items
    ]
    # per sample: (dataset index, expression type, {method: (intersection, union)}, {method: seg})
    rows: list[tuple[int, str, dict[str, tuple[int, int]], dict[str, bool]]] = [
        (i, it.expression_type, {}, {}) for i, it in zip(mine, items, strict=True)
    ]
    for name, segment in segmenters.items():
        thr = (thresholds or {}).get(name, 0.0)
        bar = tqdm(total=len(items), desc=f"eval {name}", unit="expr", disable=not progress)
        for start in range(0, len(items), batch_size):
            chunk = prompts[start : start + batch_size]
            for k, logits in enumerate(segment(chunk)):
                row = rows[start + k]
                row[2][name] = intersection_union(logits > thr, items[start + k].mask)
            if seg_rate and name in seg_rate:
                for k, chosen in enumerate(seg_rate[name](chunk)):
                    rows[start + k][3][name] = bool(chosen)
            bar.update(len(chunk))
        bar.close()
    if gather is not None:
        rows = sorted(gather(rows), key=lambda r: r[0])
    results: dict[str, Any] = {"samples": len(rows), "methods": {}}
    types = sorted({r[1] for r in rows})
    for name in segmenters:
        counts = [r[2][name] for r in rows]
        entry: dict[str, Any] = {
            "cIoU": ciou_from_counts(counts),
            "gIoU": giou_from_counts(counts),
            "by_type": {},
        }
        for kind in types:
            sub = [r[2][name] for r in rows if r[1] == kind]
            entry["by_type"][kind or "untyped"] = {
                "n": len(sub),
                "cIoU": ciou_from_counts(sub),
                "gIoU": giou_from_counts(sub),
            }
        if seg_rate and name in seg_rate:
            entry["seg_rate"] = float(np.mean([r[3][name] for r in rows]))
        results["methods"][name] = entry
    # Timing: batch 1, the methods in turn on each sample (shard 0's samples).
    times: dict[str, list[float]] = {name: [] for name in segmenters if name not in untimed}
    if rank == 0:
        for i in range(min(timing_samples, len(items))):
            for _ in range(repeats):
                for name, segment in segmenters.items():
                    if name in untimed:
                        continue
                    began = time.perf_counter()
                    segment([prompts[i]])
                    times[name].append(time.perf_counter() - began)
    for name, ts in times.items():
        if ts:
            results["methods"][name]["seconds_per_sample"] = statistics.median(ts)
    return results


def text_dependence(
    data: ReferringDataset, segment: Segmenter, images: int = 40, threshold: float = 0.0
) -> dict[str, float | int]:
    """Does the mask follow the words? Over the first `images` images of `data` (every
    expression of each, wherever it stands in `data`), for two expressions of one image that name
    different objects (their ground-truth masks overlap < 0.5; masks are logits > `threshold`):

    - ``mean_iou``: the mean IoU of their predicted masks. 1.0: the text is ignored; a perfect
      model scores ~0.
    - ``logit_change``: the mean absolute difference of their pixel logits over the mean of the
      two logit maps' standard deviations (scale-free; a thresholded IoU cannot tell a model that
      nearly moves its mask from one that cannot). 0: the words change nothing."""
    chosen: dict[str, list[int]] = {}  # file name -> its expressions' indices
    for i, (file_name, *_) in enumerate(data.items):  # a refs file may interleave images
        if file_name in chosen or len(chosen) < images:
            chosen.setdefault(file_name, []).append(i)
    by_image: dict[Path, list[Any]] = {
        data.images_root / name: [data[i] for i in indices] for name, indices in chosen.items()
    }
    ious, changes = [], []
    for path, items in by_image.items():
        if len(items) < 2:
            continue
        prompts: list[Prompt] = [
            [{"role": "user", "content": SEG_PROMPTS[0].format(it.expression), "images": [path]}]
            for it in items
        ]
        logits = [np.asarray(x, dtype=np.float64) for x in segment(prompts)]
        preds = [x > threshold for x in logits]
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                if mask_iou(items[a].mask, items[b].mask) >= 0.5:
                    continue
                spread = (logits[a].std() + logits[b].std()) / 2
                if spread > 0:
                    changes.append(float(np.abs(logits[a] - logits[b]).mean() / spread))
                if (preds[a] | preds[b]).any():
                    ious.append(mask_iou(preds[a], preds[b]))
    return {
        "pairs": len(ious),  # pairs where either predicted mask is non-empty
        "mean_iou": float(np.mean(ious)) if ious else float("nan"),
        "logit_pairs": len(changes),  # pairs whose logits vary at all
        "logit_change": float(np.mean(changes)) if changes else float("nan"),
    }


def markdown(result: dict[str, Any]) -> str:
    methods = result["methods"]
    types = sorted({t for row in methods.values() for t in row["by_type"]})
    head = ["method", "cIoU", "gIoU", *[f"{t} cIoU" for t in types], "s / sample", "seg rate"]
    head.append("false seg rate")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    lines[1] = "|---|" + "---:|" * (len(head) - 1)
    for name, row in methods.items():
        cells = [name, f"{100 * row['cIoU']:.1f}", f"{100 * row['gIoU']:.1f}"]
        cells += [f"{100 * row['by_type'][t]['cIoU']:.1f}" for t in types]
        sec = row.get("seconds_per_sample")
        cells.append("" if sec is None else f"{sec:.3f}")
        for key in ("seg_rate", "false_seg_rate"):
            rate = row.get(key)
            cells.append("" if rate is None else f"{100 * rate:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _split_questions(folder: Path, limit: int) -> list[Prompt]:
    """The split's own questions about its images (data.conversations QA), the first `limit`:
    ordinary turns on which a model should answer in text, never with ``<seg>``."""
    out: list[Prompt] = []
    for record in read_chat_records(folder):
        for qa in record.qa:
            out.append([{"role": "user", "content": qa["question"], "images": [record.image]}])
            if len(out) >= limit:
                return out
    return out


def _sam_refined(model: StampVLM, sam_dir: Path) -> Segmenter:
    from segment_anything import SamPredictor

    predictor = SamPredictor(load_sam(sam_dir))
    thr = model.config.threshold

    def segment(prompts: list[Prompt]) -> list[npt.NDArray[np.float32]]:
        coarse = model.segment(prompts)
        out = []
        for prompt, logits in zip(prompts, coarse, strict=True):
            image = load_rgb(prompt[-1]["images"][-1])
            predictor.set_image(np.asarray(image))
            refined = refine_with_sam(predictor, logits, threshold=thr)
            out.append(np.where(refined, 1.0, -1.0).astype(np.float32))
        return out

    return segment


def grid_oracle(model: StampVLM, data: ReferringDataset) -> Segmenter:
    """A segmenter that reads the answer: for each prompt of `data` (as `evaluate` writes them),
    logits on `model`'s mask grid fitted to the ground truth with its loss and loss weights
    (segmentation.stamp.fit_grid_logits), turned into pixel logits as the model's are. Its cIoU is
    the ceiling of any mask head on that grid. Masks are decoded when asked for."""
    where: dict[tuple[str, str], tuple[int, int]] = {}  # prompt -> (dataset index, object id)
    for i, (file_name, sentence, ann, _, _, _) in enumerate(data.items):
        key = (SEG_PROMPTS[0].format(sentence), str(data.images_root / file_name))
        if key in where and where[key][1] != ann.id:
            raise ValueError(
                f"grid oracle: the expression {sentence!r} names two different objects of "
                f"{file_name}; the oracle cannot tell which mask a prompt asks for"
            )
        where[key] = (i, ann.id)
    cfg = model.config
    side = int(model.vlm.pixel_values([np.zeros((8, 8, 3), np.uint8)]).shape[-1])  # CLIP's input

    def segment(prompts: list[Prompt]) -> list[npt.NDArray[np.float32]]:
        masks, sizes = [], []
        for prompt in prompts:
            turn = prompt[-1]
            key = (str(turn["content"]), str(turn["images"][-1]))
            if key not in where:
                raise KeyError(f"grid oracle: no ground truth for {key}")
            mask = data[where[key][0]].mask
            masks.append(mask_like_clip_input(mask, side))
            sizes.append((mask.shape[1], mask.shape[0]))
        fitted = (
            fit_grid_logits(
                torch.stack(masks),
                model.mask_grid,
                cfg.loss_resolution,
                bce_weight=cfg.bce_weight,
                dice_weight=cfg.dice_weight,
            )
            .cpu()
            .numpy()
        )
        return [model.pixel_logits(z, size) for z, size in zip(fitted, sizes, strict=True)]

    return segment


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    checkpoints = _parse_checkpoints(parser, args.checkpoint)
    if not checkpoints:
        parser.error("give at least one --checkpoint NAME=PATH")
    for name in args.sam_refine:
        if name not in checkpoints:
            parser.error(f"--sam-refine {name}: no --checkpoint named {name!r}")
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, received {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, received {args.limit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data, _ = referring_dataset_from_args(args)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.limit is not None:
        data.items = data.items[: args.limit]
    segmenters: dict[str, Segmenter] = {}
    thresholds: dict[str, float] = {}  # the SAM rows give +-1 logits: 0 is theirs
    rates: dict[str, Callable[[list[Prompt]], list[bool]]] = {}
    models: dict[str, StampVLM] = {}
    for name, path in checkpoints.items():
        model = models[name] = StampVLM.from_pretrained(path).eval()
        segmenters[name] = model.segment
        thresholds[name] = model.config.threshold
        rates[name] = model.chooses_seg
        if name in args.sam_refine:
            sam_dir = args.sam
            if sam_dir is None:
                preset = PolychromeConfig.from_preset(args.preset)
                if not preset.sam.checkpoint:
                    parser.error(f"--sam-refine: preset {args.preset!r} has no SAM; pass --sam")
                sam_dir = project_path(preset.sam.checkpoint)
            segmenters[f"{name} + SAM"] = _sam_refined(model, sam_dir)
    oracle = ""
    if args.grid_oracle:
        first = next((m for m in models.values() if m.config.method == "stamp"), None)
        if first is None:
            parser.error("--grid-oracle needs a 'stamp' checkpoint (its mask grid and loss)")
        gh, gw = first.mask_grid
        oracle = f"grid oracle {gh}x{gw}"
        segmenters[oracle] = grid_oracle(first, data)
        thresholds[oracle] = first.config.threshold
    state = PartialState(cpu=True)
    destroy_process_group_at_exit()
    gather = gather_object if state.num_processes > 1 else None
    with torch.inference_mode():
        result = evaluate(
            data,
            segmenters,
            batch_size=args.batch_size,
            timing_samples=args.timing_samples,
            repeats=args.repeats,
            progress=not args.no_progress,
            seg_rate=rates,
            untimed=(oracle,) if oracle else (),
            shard=(state.process_index, state.num_processes),
            gather=gather,
            thresholds=thresholds,
        )
    if not state.is_main_process:
        return 0
    print(f"{result['samples']} expressions scored over {state.num_processes} process(es)")
    if args.data is not None and args.false_seg_questions:
        with torch.inference_mode():
            questions = _split_questions(args.data / args.split, args.false_seg_questions)
            for name in checkpoints:
                fired = [
                    c
                    for start in range(0, len(questions), args.batch_size)
                    for c in rates[name](questions[start : start + args.batch_size])
                ]
                result["methods"][name]["false_seg_rate"] = float(np.mean(fired))
        result["false_seg_questions"] = len(questions)
    if args.text_dependence:
        with torch.inference_mode():
            for name, segment in segmenters.items():
                if name == oracle:  # it reads the answer: nothing to learn about the words
                    continue
                dep = text_dependence(
                    data, segment, args.text_dependence, thresholds.get(name, 0.0)
                )
                result["methods"][name]["text_dependence"] = dep
                print(
                    f"{name}: masks for different objects overlap at IoU {dep['mean_iou']:.3f} "
                    f"({dep['pairs']} pairs); their logits differ by {dep['logit_change']:.3f} "
                    f"of the logits' spread ({dep['logit_pairs']} pairs)"
                )
    result["command"] = "python -m eval.stamp " + shlex.join(argv)
    result["checkpoints"] = {k: str(v) for k, v in checkpoints.items()}
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
