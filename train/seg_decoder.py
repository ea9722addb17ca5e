"""Train the class-agnostic query mask decoder (Mask2Former-style, optional PMP) on a frozen CLIP.

    # the decoder without PMP: proposals from the image alone
    python -m train.seg_decoder --data out/shapeworld --out out/seg/decoder --no-pmp
    # with PMP: every layer cross-attends to the prompt's MiniLM tokens (see "PMP prompts")
    python -m train.seg_decoder --data out/shapeworld --out out/seg/decoder_pmp --pmp
    # share the CLIP features between runs: the first run writes the cache, later runs read it
    python -m train.seg_decoder ... --feature-cache out/seg/decoder_features.safetensors
    # data parallel: 2 processes, 4 of the 8 images each per step (--batch-size is global)
    accelerate launch --num_processes 2 -m train.seg_decoder --data out/shapeworld \\
        --out out/seg/decoder_pmp --pmp --batch-size 8
    # evaluate a trained decoder's proposals on the first 200 test images, and save them for
    # eval.seg (a PMP decoder is prompted with all the split's class names unless --eval-prompt)
    python -m train.seg_decoder --eval-only --init out/seg/decoder/final --data out/shapeworld \\
        --eval-split test --eval-limit 200 --save-proposals out/seg/decoder_test200.npz
    # the same measurement on saved proposals (e.g. SAM's, cached by eval.seg --proposals)
    python -m train.seg_decoder --eval-masks out/seg/sam_test200.npz --data out/shapeworld \\
        --eval-split test --eval-limit 200

Data: the ``train`` split of a ShapeWorld folder (seen classes only) or any COCO instances file
(categories flagged ``"unseen": true`` are left out). Every instance of a seen class is a target,
class-agnostically. The CLIP image tower is frozen: its patch tokens (``vision.clip.
dense_features`` of ``segmentation.open_vocab.whole_image_pixels``) are computed once for the first
``--limit`` images and kept in memory in fp16 (``train.seg.FeatureBank``; ``--feature-cache``
stores them on disk, checked against the CLIP checkpoint, data and image count). Targets are the
instance masks area-averaged to the mask-feature grid (64x64 for the 128 px CLIP).

PMP prompts (``--pmp``): per image and step, the prompt is the names of the seen classes present
in the image, plus k absent seen class names with k uniform in [0, number absent] (so from none to
the whole seen vocabulary), in random order; each name is encoded alone by the frozen MiniLM
(``segmentation.query_decoder.prompt_token_states``, once per name) and the names' tokens are
concatenated. Targets stay all instances of the image. ``--prompt-subset-prob p``: with
probability p (and at least two classes present) a random non-empty proper subset of the present
classes stays in the prompt, and only their instances are targets -- the variant in which
proposals must *follow* the prompt rather than only read it (default 0: off).

Data parallel (``accelerate launch``): every process draws the whole batch's prompts (one generator
per step, as one process draws them) and trains on its slice of the images. Matching is per image;
the objectness cross-entropy (divided by its class-weight sum) and the mask losses (divided by the
number of target masks) take the whole batch's divisors, as Mask2Former's all-reduced
``num_masks``, so N processes take the steps of one (``criterion_over_processes``;
tests/test_scaling_seg.py). Without ``--feature-cache`` every process computes the CLIP features;
with one to make, the main process makes it and the others then read it. The main process logs,
saves and evaluates after training; ``--eval-only`` and ``--eval-masks`` run on the main process
alone (the others return at once).

Losses, matching and the architecture: ``segmentation/query_decoder.py``. Evaluation: recall of
ground-truth instances (best proposal IoU >= 0.5 and >= 0.75; all instances, seen classes, unseen
classes), proposals per image and seconds per image (batch 1: CLIP + decoder + post-processing).

Output: ``<out>/final`` (``save_decoder``: fp16 safetensors + config, MODEL_CARD.md),
``<out>/log.jsonl`` (losses per logged step), ``<out>/eval_<split>.json`` (after training, on
``--eval-split``/``--eval-limit``), ``<out>/last`` (resumable state every ``--save-every`` steps;
``--resume`` continues it with the same batches and prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import project_path
from core.io import atomic_write_text
from core.runtime import seed_everything
from data.datasets import InstanceDataset
from segmentation.mask_adapter import mask_iou_matrix
from segmentation.open_vocab import load_mask_lists, save_mask_lists, whole_image_pixels
from segmentation.query_decoder import (
    LossWeights,
    QueryDecoder,
    QueryDecoderConfig,
    QueryDecoderOutput,
    QueryMaskProposer,
    load_decoder,
    pack_prompts,
    prompt_token_states,
    save_decoder,
    set_criterion,
)
from train.common import (
    DataParallel,
    batch_indices,
    cosine_with_warmup,
    open_log,
    remove_training_state,
    resume_or_start,
    save_training_state,
)
from train.seg import FeatureBank
from vision.clip import load_clip
from vlm.config import PolychromeConfig

__all__ = [
    "criterion_over_processes",
    "evaluate_proposals",
    "main",
    "proposal_recall",
    "sample_prompt",
    "soft_targets",
]

RESUME_KEYS = (
    "pmp",
    "images",
    "batch_size",
    "lr",
    "steps",
    "seed",
    "prompt_subset_prob",
    "decoder",
)
IOU_LEVELS = (0.5, 0.75)


def soft_targets(masks: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Instance masks (G, H, W) bool -> (G, h, w) float16 area fractions at the mask grid."""
    if len(masks) == 0:
        return torch.zeros(0, *size, dtype=torch.float16)
    m = torch.from_numpy(masks.astype(np.float32))[:, None]
    return F.interpolate(m, size, mode="area")[:, 0].half()


def sample_prompt(
    present: Sequence[str],
    seen: Sequence[str],
    rng: np.random.Generator,
    subset_prob: float = 0.0,
) -> tuple[list[str], set[str]]:
    """A training prompt (see the module docstring): (class names in prompt order, the present
    classes whose instances are targets)."""
    classes = sorted(set(present))
    if subset_prob > 0 and len(classes) >= 2 and rng.random() < subset_prob:
        k = int(rng.integers(1, len(classes)))  # 1 .. len - 1
        classes = sorted(rng.choice(classes, size=k, replace=False).tolist())
    absent = [c for c in seen if c not in set(present)]
    k = int(rng.integers(0, len(absent) + 1))
    extra = rng.choice(absent, size=k, replace=False).tolist() if k else []
    names = list(classes) + extra
    rng.shuffle(names)
    return names, set(classes)


def proposal_recall(
    proposals: Sequence[np.ndarray],
    gt_masks: Sequence[np.ndarray],
    gt_unseen: Sequence[Sequence[bool]],
    gt_classes: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Recall of ground-truth instances: an instance is found at IoU t if some proposal of its
    image has IoU >= t with it. Per image: proposals (M, H, W), gt (G, H, W), unseen flags (G,),
    optionally class names (G,) for a per-class recall@0.5."""
    best: list[float] = []
    unseen: list[bool] = []
    names: list[str] = []
    for i, (props, gt, flags) in enumerate(zip(proposals, gt_masks, gt_unseen, strict=True)):
        if len(gt) == 0:
            continue
        iou = mask_iou_matrix(props, gt) if len(props) else np.zeros((1, len(gt)))
        best += iou.max(axis=0).tolist()
        unseen += list(flags)
        names += list(gt_classes[i]) if gt_classes is not None else []
    b, u = np.array(best), np.array(unseen, dtype=bool)
    out: dict[str, Any] = {
        "images": len(proposals),
        "instances": {"all": len(b), "seen": int((~u).sum()), "unseen": int(u.sum())},
        "masks_per_image": float(np.mean([len(p) for p in proposals])) if proposals else 0.0,
        "mean_best_iou": float(b.mean()) if len(b) else float("nan"),
    }
    for t in IOU_LEVELS:
        for name, sel in (("all", np.ones_like(u)), ("seen", ~u), ("unseen", u)):
            out[f"recall@{t}_{name}"] = float((b[sel] >= t).mean()) if sel.any() else float("nan")
    if gt_classes is not None:
        c = np.array(names)
        out["recall@0.5_per_class"] = {
            n: float((b[c == n] >= 0.5).mean()) for n in sorted(set(names))
        }
    return out


def _ground_truth(
    dataset: InstanceDataset, n: int, progress: bool
) -> tuple[list[np.ndarray], list[np.ndarray], list[list[bool]], list[list[str]]]:
    images, masks, unseen, classes = [], [], [], []
    for i in tqdm(range(n), desc="read ground truth", disable=not progress):
        item = dataset[i]
        images.append(np.asarray(item.image))
        h, w = images[-1].shape[:2]
        inst = item.instances
        masks.append(np.stack([x.mask for x in inst]) if inst else np.zeros((0, h, w), bool))
        unseen.append([x.category in dataset.unseen for x in inst])
        classes.append([x.category for x in inst])
    return images, masks, unseen, classes


def evaluate_proposals(
    proposer: QueryMaskProposer | None,
    dataset: InstanceDataset,
    limit: int,
    prompt: list[str] | None,
    masks: list[np.ndarray] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Recall (``proposal_recall``) of the proposer's masks, or of given ``masks``, on the first
    ``limit`` images; returns (report, the proposals)."""
    n = min(limit, len(dataset))
    images, gt, unseen, classes = _ground_truth(dataset, n, progress)
    seconds: list[float] = []
    if masks is None:
        if proposer is None:
            raise ValueError("give a proposer or saved masks")
        masks = []
        for image in tqdm(images, desc="proposals", disable=not progress):
            t0 = time.perf_counter()
            masks.append(proposer.propose(image, prompt)[0])
            seconds.append(time.perf_counter() - t0)
    elif len(masks) < n:
        raise ValueError(f"the saved proposals cover {len(masks)} images, need {n}")
    report = proposal_recall(masks[:n], gt, unseen, classes)
    report["seconds_per_image_median"] = float(np.median(seconds)) if seconds else None
    return report, masks[:n]


def _markdown(name: str, r: dict[str, Any]) -> str:
    return (
        "| proposals | recall@0.5 all / seen / unseen | recall@0.75 all / seen / unseen "
        "| masks / image | s / image |\n|---|---|---|---:|---:|\n"
        f"| {name} | {100 * r['recall@0.5_all']:.1f} / {100 * r['recall@0.5_seen']:.1f} / "
        f"{100 * r['recall@0.5_unseen']:.1f} | {100 * r['recall@0.75_all']:.1f} / "
        f"{100 * r['recall@0.75_seen']:.1f} / {100 * r['recall@0.75_unseen']:.1f} "
        f"| {r['masks_per_image']:.1f} | "
        + (
            f"{r['seconds_per_image_median']:.3f}"
            if r.get("seconds_per_image_median") is not None
            else "-"
        )
        + " |\n"
    )


def _load_bank(
    cache: Path | None,
    clip: Any,
    images: list[np.ndarray],
    key: dict[str, Any],
    progress: bool,
    dp: DataParallel,
) -> torch.Tensor:
    """The CLIP patch tokens (N, h*w, D_vis) fp16: from the cache if it matches `key`, else
    computed (and cached). Without a cache every process computes them; a cache to make is made
    by the main process, which the others wait for and then read."""
    if cache is None:
        return FeatureBank.compute(clip, images, progress=progress).tokens
    made = None
    if dp.main and not cache.exists():
        made = FeatureBank.compute(clip, images, progress=progress).tokens
        save_checkpoint(cache, {"tokens": {"tokens": made}}, key)
    dp.accelerator.wait_for_everyone()
    if made is not None:
        return made
    ckpt = load_checkpoint(cache)
    if ckpt.config != key:
        raise ValueError(
            f"{cache} holds features of {ckpt.config}, this run needs {key}; pass another "
            "--feature-cache"
        )
    return ckpt.tensors["tokens"]["tokens"]


def criterion_over_processes(
    out: QueryDecoderOutput, targets: Sequence[torch.Tensor], dp: DataParallel
) -> tuple[torch.Tensor, dict[str, float]]:
    """``set_criterion`` of the whole batch from this process's part of it: (the loss to
    backpropagate here, the whole batch's loss terms to log).

    set_criterion divides its objectness cross-entropy by its class-weight sum (1 per matched
    query, ``LossWeights.no_object`` per other query; one image matches min(G, N) queries in
    every layer) and its mask BCE and Dice by the number of target masks. Across processes both
    divisors become the whole batch's (Mask2Former all-reduces ``num_masks`` so): the gradients
    reaching the objectness logits and the mask logits are scaled by this process's share of
    each, so DDP's average is the one-process gradient of the whole batch. Hooks, because the
    loss set_criterion returns mixes the two divisors: the value backpropagated here stays this
    part's own. One process: exactly ``set_criterion``. targets: per image, (G_i, Hm, Wm) in
    [0, 1]."""
    if dp.world == 1:
        losses = set_criterion(out, targets)
        return losses["loss"], {k: v.item() for k, v in losses.items()}
    w = LossWeights()
    n = out.objectness.shape[2]  # queries
    matched = sum(min(len(t), n) for t in targets)
    class_weight = w.no_object * (len(targets) * n - matched) + matched
    masks = sum(len(t) for t in targets)  # (no mask: the mask terms are 0)
    class_weight_all, masks_all = dp.total(class_weight), dp.total(masks)
    obj_share = dp.world * class_weight / class_weight_all
    mask_share = dp.world * masks / max(masks_all, 1.0)
    out.objectness.register_hook(lambda g: g * obj_share)
    out.mask_logits.register_hook(lambda g: g * mask_share)

    def over_queries(value: float) -> float:  # a mean over this part's weighted queries
        return dp.total(value * class_weight) / class_weight_all

    def over_masks(value: float) -> float:  # a mean over this part's target masks
        return dp.total(value * masks) / masks_all if masks_all else 0.0

    # layer by layer (set_criterion's terms are the last layer's): the objectness and the mask
    # parts of the loss are logged with their own divisors
    layers = [
        set_criterion(QueryDecoderOutput(m[None], o[None]), targets)
        for m, o in zip(out.mask_logits.unbind(0), out.objectness.unbind(0), strict=True)
    ]
    loss = layers[0]["loss"]
    for layer in layers[1:]:
        loss = loss + layer["loss"]
    obj = sum(float(layer["objectness"]) for layer in layers)
    mask = sum(w.bce * float(layer["bce"]) + w.dice * float(layer["dice"]) for layer in layers)
    last = layers[-1]
    logged = {
        "loss": w.objectness * over_queries(obj) + over_masks(mask),
        "objectness": over_queries(float(last["objectness"])),
        "bce": over_masks(float(last["bce"])),
        "dice": over_masks(float(last["dice"])),
    }
    return loss, logged


def _write_card(out: Path, argv: list[str], info: dict[str, Any]) -> None:
    kind = "with PMP" if info["pmp"] else "without PMP"
    lines = [
        f"# Query mask decoder {kind} (CLIP `{info['clip']}`)",
        "",
        "Trained by `train/seg_decoder.py` on a frozen CLIP (segmentation/query_decoder.py:",
        "Mask2Former-style masked attention, class-agnostic; PMP text cross-attention when on).",
        "",
        "## Command",
        "",
        "    python -m train.seg_decoder " + " ".join(argv),
        "",
        "## Run",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "Proposals: `segmentation.query_decoder.QueryMaskProposer(clip, tokenizer, "
        "load_decoder(<this folder>))`.",
    ]
    atomic_write_text(out / "MODEL_CARD.md", "\n".join(lines) + "\n")


def _clip_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    if args.clip is not None:
        return Path(args.clip)
    cfg = PolychromeConfig.from_preset(args.preset)
    if not cfg.clip.checkpoint:
        parser.error(f"preset {args.preset!r} has no CLIP checkpoint: pass --clip")
    return project_path(cfg.clip.checkpoint)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _evaluate(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    proposer: QueryMaskProposer | None,
    label: str,
) -> dict[str, Any]:
    dataset = InstanceDataset.from_shapeworld(args.data, args.eval_split)
    prompt = None
    if proposer is not None and proposer.decoder.cfg.pmp:
        prompt = (
            [t.strip() for t in args.eval_prompt.split(",") if t.strip()]
            if args.eval_prompt
            else [dataset.category_names[k] for k in sorted(dataset.category_names)]
        )
    saved = load_mask_lists(args.eval_masks) if args.eval_masks is not None else None
    if saved is not None and len(saved) < min(args.eval_limit, len(dataset)):
        parser.error(f"{args.eval_masks} holds {len(saved)} images' masks, need {args.eval_limit}")
    report, masks = evaluate_proposals(
        proposer, dataset, args.eval_limit, prompt, saved, not args.no_progress
    )
    report.update(
        split=args.eval_split,
        proposals=label,
        prompt=", ".join(prompt) if prompt else None,
        score_threshold=proposer.score_threshold if proposer is not None else None,
    )
    print(_markdown(label, report), end="")
    if args.save_proposals is not None:
        args.save_proposals.parent.mkdir(parents=True, exist_ok=True)
        save_mask_lists(args.save_proposals, masks)
        print(f"wrote {args.save_proposals}")
    if args.eval_json is not None:
        atomic_write_text(args.eval_json, json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.seg_decoder",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="the CLIP checkpoint of a preset")
    parser.add_argument("--clip", type=Path, help="CLIP checkpoint (default: the preset's)")
    src = parser.add_argument_group("data")
    src.add_argument("--data", type=Path, help="ShapeWorld folder (train split; eval splits)")
    src.add_argument("--images", type=Path, help="image root of a COCO instances file")
    src.add_argument("--instances-json", type=Path, help="COCO instances JSON (with --images)")
    parser.add_argument("--out", type=Path, help="run folder (training)")
    parser.add_argument(
        "--pmp", action=argparse.BooleanOptionalAction, default=False, help="PMP text branch"
    )
    parser.add_argument("--limit", type=int, default=3000, help="training images (first N)")
    parser.add_argument("--feature-cache", type=Path, help="CLIP token cache (made if missing)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument(
        "--batch-size", type=int, default=4, help="images per step, global (over all processes)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=128, help="decoder width d")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--stem-channels", type=int, default=32, help="image stem (0 = none)")
    parser.add_argument(
        "--prompt-subset-prob", type=float, default=0.0, help="PMP: prompt a subset of classes"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--max-minutes", type=float, help="stop (and save <out>/last) after this")
    parser.add_argument(
        "--stop-after", type=int, help="stop after this many steps of this run (then --resume)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    ev = parser.add_argument_group("evaluation (class-agnostic proposal recall)")
    ev.add_argument("--eval-only", action="store_true", help="evaluate --init, no training")
    ev.add_argument("--init", type=Path, help="a trained decoder (with --eval-only)")
    ev.add_argument("--eval-masks", type=Path, help="evaluate saved proposals (.npz) instead")
    ev.add_argument("--eval-split", default="val")
    ev.add_argument("--eval-limit", type=int, default=200, help="first N images; 0 = no eval")
    ev.add_argument("--eval-prompt", help="PMP: comma-separated prompt (default: all classes)")
    ev.add_argument("--score-threshold", type=float, default=0.3, help="proposal score cut")
    ev.add_argument("--nms-iou", type=float, default=0.7)
    ev.add_argument("--save-proposals", type=Path, help="write the proposals (.npz) here")
    ev.add_argument("--eval-json", type=Path, help="write the report here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    dp = DataParallel(_device(args.device))
    device = dp.device
    progress = not args.no_progress and dp.main

    if args.eval_masks is not None or args.eval_only:
        if not dp.main:
            return 0  # evaluation runs on the main process alone
        if args.data is None:
            parser.error("evaluation reads a ShapeWorld folder: pass --data")
        if args.eval_masks is not None:
            _evaluate(parser, args, None, str(args.eval_masks))
            return 0
        if args.init is None:
            parser.error("--eval-only evaluates a trained decoder: pass --init <run>/final")
        clip, _, tokenizer = load_clip(_clip_path(parser, args))
        decoder = load_decoder(args.init).to(device)
        proposer = QueryMaskProposer(
            clip.to(device), tokenizer, decoder, args.score_threshold, args.nms_iou
        )
        _evaluate(parser, args, proposer, str(args.init))
        return 0

    if args.out is None:
        parser.error("training needs --out (or use --eval-only / --eval-masks)")
    if (args.data is None) == (args.images is None):
        parser.error("give exactly one data source: --data, or --images with --instances-json")
    if args.images is not None and args.instances_json is None:
        parser.error("--images needs --instances-json")
    if args.out.joinpath("final").exists():
        parser.error(f"{args.out / 'final'} exists; choose another --out or remove it")
    if not 0.0 <= args.prompt_subset_prob <= 1.0:
        parser.error(f"--prompt-subset-prob must be in [0, 1], received {args.prompt_subset_prob}")
    why = dp.divides(batch_size=args.batch_size)
    if why:
        parser.error(why)
    levels = len(QueryDecoderConfig.attn_factors)
    if dp.world > 1 and args.layers < levels:
        parser.error(
            f"--layers {args.layers} leaves pyramid levels unattended, whose weights DDP cannot "
            f"train (it needs a gradient for each): use >= {levels} layers, or one process"
        )
    seed_everything(args.seed)
    clip_path = _clip_path(parser, args)
    dataset = (
        InstanceDataset.from_shapeworld(args.data, "train")
        if args.data is not None
        else InstanceDataset.from_coco(args.images, args.instances_json)
    )
    n = min(args.limit, len(dataset))
    seen = sorted({c for c in dataset.category_names.values() if c not in dataset.unseen})

    clip, _, tokenizer = load_clip(clip_path)
    clip = clip.to(device).eval().requires_grad_(False)
    side = int(whole_image_pixels(clip, [np.zeros((8, 8, 3), np.uint8)]).shape[-1])
    patch = getattr(clip.visual, "patch_size", None)
    if patch is None:
        parser.error("the query decoder needs a ViT CLIP image tower (patch tokens)")
    grid = side // int(patch[0])
    mask_side = grid * QueryDecoderConfig.mask_factor

    images, targets, classes = [], [], []
    for i in tqdm(range(n), desc="read data", disable=not progress):
        item = dataset[i]
        kept = [inst for inst in item.instances if inst.category in seen]
        image = np.asarray(item.image)
        h, w = image.shape[:2]
        masks = np.stack([x.mask for x in kept]) if kept else np.zeros((0, h, w), dtype=bool)
        images.append(image)
        targets.append(soft_targets(masks, (mask_side, mask_side)))
        classes.append([x.category for x in kept])
    key = {"clip": str(clip_path), "data": str(args.data or args.instances_json), "images": n}
    tokens = _load_bank(args.feature_cache, clip, images, key, progress, dp)
    if tokens.shape[0] != n or tokens.shape[1] != grid * grid:
        parser.error(f"CLIP tokens {tuple(tokens.shape)}, expected ({n}, {grid * grid}, D_vis)")
    cfg = QueryDecoderConfig(
        vis_dim=int(tokens.shape[2]),
        grid=grid,
        hidden=args.hidden,
        queries=args.queries,
        layers=args.layers,
        stem_channels=args.stem_channels,
        pmp=args.pmp,
        text_dim=int(clip.text.config.hidden_size) if args.pmp else 384,
    )
    name_states = (
        dict(zip(seen, prompt_token_states(clip, tokenizer, seen), strict=True)) if args.pmp else {}
    )

    decoder = QueryDecoder(cfg).to(device).train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = cosine_with_warmup(optimizer, warmup=min(50, args.steps // 10), total=args.steps)
    run_config = {
        "pmp": args.pmp,
        "images": n,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "steps": args.steps,
        "seed": args.seed,
        "prompt_subset_prob": args.prompt_subset_prob,
        "decoder": cfg.to_dict(),
    }
    start = resume_or_start(
        parser,
        args,
        decoder,
        optimizer,
        scheduler,
        json.loads(json.dumps(run_config)),
        RESUME_KEYS,
        announce=dp.main,
    )
    if dp.main:
        print(
            f"{n} images, {len(seen)} seen classes; {dp.world} process(es), "
            f"{args.batch_size // dp.world} images each per step"
        )
    # Data parallel: each process takes its slice of the global batch; DDP averages gradients.
    ddp, optimizer = dp.accelerator.prepare(decoder, optimizer)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open_log(args.out / "log.jsonl", start) if dp.main else None
    batches = batch_indices(n, args.batch_size, args.seed, start)
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    t0 = time.time()
    running: list[dict[str, float]] = []
    step = start
    out_of_time = False
    bar = tqdm(total=args.steps, initial=start, desc="decoder", disable=not progress)
    save = partial(save_training_state, args.out, decoder, optimizer, scheduler, config=run_config)
    while step < end:
        idx = next(batches)
        rng = np.random.default_rng([args.seed, step])
        # the whole batch's prompts, drawn in order from one generator as one process draws
        # them; then this process's images
        prompts, wanted_rows = [], []
        if args.pmp:
            for i in idx:
                names, wanted = sample_prompt(classes[i], seen, rng, args.prompt_subset_prob)
                prompts.append([name_states[c] for c in names])
                wanted_rows.append([j for j, c in enumerate(classes[i]) if c in wanted])
        mine = dp.part(range(len(idx)))
        prompt = pack_prompts([prompts[k] for k in mine]) if args.pmp else None
        batch_targets = [
            (targets[idx[k]][wanted_rows[k]] if args.pmp else targets[idx[k]]).float().to(device)
            for k in mine
        ]
        idx = idx[mine]
        pixels = whole_image_pixels(clip, [images[i] for i in idx]).to(device)
        out = ddp(tokens[torch.from_numpy(idx)].to(device).float(), pixels, prompt)
        loss, row = criterion_over_processes(out, batch_targets, dp)
        optimizer.zero_grad(set_to_none=True)
        dp.accelerator.backward(loss)
        dp.accelerator.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        running.append(row)
        if step % args.log_every == 0 or step == args.steps:
            mean = {k: float(np.mean([r[k] for r in running])) for k in running[0]}
            if log is not None:
                row_json = {"step": step, **mean, "lr": scheduler.get_last_lr()[0]}
                log.write(json.dumps(row_json) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{mean['loss']:.2f}", dice=f"{mean['dice']:.3f}")
            running = []
        out_of_time = dp.end_step(step, save, time.time() - t0, args)
        if out_of_time:
            break
    bar.close()
    if log is not None:
        log.close()
    if step < args.steps and not out_of_time:
        dp.accelerator.wait_for_everyone()
        if dp.main:
            save_training_state(args.out, decoder, optimizer, scheduler, step, run_config)
            print(f"stopped at step {step} of {args.steps}; continue with --resume")
        return 0
    if not dp.main:
        return 0  # the main process writes the results and evaluates
    decoder.eval()
    info: dict[str, Any] = {
        "preset": args.preset,
        "clip": str(clip_path),
        "pmp": args.pmp,
        "pmp prompt": (
            "present seen classes + k ~ U[0, #absent] absent seen classes, shuffled; "
            f"subset prob {args.prompt_subset_prob}"
            if args.pmp
            else None
        ),
        "data": str(args.data or args.instances_json),
        "classes (trained, class-agnostic)": ", ".join(seen),
        "images": n,
        "steps_done": step,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": str(device),
        "seed": args.seed,
        "train_seconds_this_run": round(time.time() - t0, 1),
    }
    if args.eval_limit > 0 and args.data is not None:
        proposer = QueryMaskProposer(clip, tokenizer, decoder, args.score_threshold, args.nms_iou)
        if args.eval_json is None:
            args.eval_json = args.out / f"eval_{args.eval_split}.json"
        report = _evaluate(parser, args, proposer, str(args.out / "final"))
        info[f"{args.eval_split} recall@0.5 / @0.75 (first {report['images']} images)"] = (
            f"{report['recall@0.5_all']:.3f} / {report['recall@0.75_all']:.3f}, "
            f"{report['masks_per_image']:.1f} masks per image"
        )
    final = save_decoder(args.out / "final", decoder, {k: str(v) for k, v in info.items()})
    _write_card(final, sys.argv[1:] if argv is None else list(argv), info)
    remove_training_state(args.out)
    print(f"wrote {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
