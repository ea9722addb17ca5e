"""Train Mask-Adapter on a frozen CLIP: stage 1 on ground-truth masks, stage 2 on mixed masks.

    # stage 1: ground-truth masks of the seen classes, cross-entropy
    python -m train.seg --preset shapes --data out/shapeworld --out out/seg/stage1 --stage 1
    # stage 2: ground truth + SAM proposals matched to it (IoU > 0.7, one per object, at most 8
    # per image),
    # cross-entropy + 5 x mask-consistency loss; starts from stage 1
    python -m train.seg --preset shapes --data out/shapeworld --out out/seg/stage2 --stage 2 \\
        --init out/seg/stage1/final
    # the ablation without the consistency loss
    python -m train.seg ... --stage 2 --init out/seg/stage1/final --consistency-weight 0
    # your own COCO instances (categories flagged "unseen": true are left out of training)
    python -m train.seg --images coco/train2017 --instances-json instances.json --out out/seg/mine
    # data parallel: 4 processes, 4 of the 16 images each per step (--batch-size is global)
    accelerate launch --num_processes 4 -m train.seg --preset shapes --data out/shapeworld \\
        --out out/seg/stage1 --stage 1 --batch-size 16

Data: the ``train`` split of a ShapeWorld folder (it holds only the seen classes) or any COCO
instances file. The CLIP image tower is frozen, so its dense features (``vision.clip.
dense_features`` of the whole image, ``segmentation.open_vocab.whole_image_pixels``) are computed
once for the first ``--limit`` images (stage 2: ``--proposal-images``) and kept in memory
(fp16). The text heads are the seen class names with the CLIP prompt templates averaged.

Stage 2 needs proposals from a frozen proposal model: SAM's automatic masks (the preset's SAM
checkpoint), computed once and cached in ``<out>/proposals.npz`` (or ``--proposals``). Each
step's masks per image: all ground-truth masks; the matched proposals (label = their object's
class; ``segmentation.mask_adapter.match_proposals``); and up to ``--void-per-image`` proposals
that overlap no object (IoU < 0.3 with every object, those of classes not trained on included:
background and stray parts), labelled void. The void rows are our addition: Mask-Adapter's void
embedding needs some mask to stand for "no class" when SAM proposals, not a Mask2Former decoder
with its own no-object class, feed it.

Data parallel (``accelerate launch``): every process draws the whole batch's masks (one generator
per step, as one process draws them) and trains on its slice of the images; the cross-entropy and
the consistency loss are means over the masks and pairs of the whole batch, each process's part
weighted by its share of them, so N processes take the steps of one (tests/test_scaling_seg.py).
Every process computes the CLIP features; the main process alone makes a missing proposal cache
(the others wait, then read it: for many images make it first with one process, ``--stop-after
0``), logs and saves.

Output: ``<out>/final`` (``segmentation.mask_adapter.save_adapter``: fp16 safetensors, config,
MODEL_CARD.md), ``<out>/log.jsonl`` (loss per logged step), ``<out>/last`` (resumable state,
written every ``--save-every`` steps; ``--resume`` continues it with the same batches).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.io import atomic_write_text
from core.runtime import seed_everything
from data.datasets import InstanceDataset
from segmentation.mask_adapter import (
    MaskAdapter,
    MaskAdapterConfig,
    clip_pool,
    consistency_loss,
    load_adapter,
    mask_iou_matrix,
    match_proposals,
    save_adapter,
)
from segmentation.open_vocab import (
    load_mask_lists,
    sam_proposals,
    save_mask_lists,
    whole_image_pixels,
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
from vision.clip import DenseFeatures, dense_features, load_clip, text_classifier
from vision.sam import amg_settings, load_sam
from vlm.config import PolychromeConfig

VOID_IOU = 0.3  # a proposal with IoU below this against every object is "void"
RESUME_KEYS = ("stage", "images", "batch_size", "lr", "steps", "seed", "consistency_weight")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def mean_over_processes(
    dp: DataParallel, mean: float, count: float, empty: float = float("nan")
) -> float:
    """The mean over every process's items, from this process's `mean` over its `count` items
    (or total weight): one process's `mean` as it is; a process without items adds nothing (its
    mean may be NaN); `empty` when no process has any."""
    if dp.world == 1:
        return mean
    total = dp.total(count)
    return dp.total(mean * count if count else 0.0) / total if total else empty


class _AdapterHead(torch.nn.Module):
    """The adapter's mask embeddings and their class logits in one forward: DDP expects every
    trained parameter (``classify``'s void embedding and logit scale too) to be used there."""

    def __init__(self, adapter: MaskAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(
        self, dense: DenseFeatures, masks: torch.Tensor, pool: Any, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """masks (B, M, H, W), text (C, D) -> embeddings (B, M, D), logits (B, M, C + 1)."""
        emb = self.adapter(dense, masks, pool)
        return emb, self.adapter.classify(emb, text)


class FeatureBank:
    """Frozen CLIP dense features of N images, fp16 in memory."""

    def __init__(self, tokens: torch.Tensor, projected: torch.Tensor) -> None:
        self.tokens = tokens  # (N, h*w, D_vis)
        self.projected = projected  # (N, D, h, w)

    @classmethod
    @torch.no_grad()
    def compute(
        cls, clip: Any, images: list[np.ndarray], batch_size: int = 64, progress: bool = True
    ) -> FeatureBank:
        tokens, projected = [], []
        for start in tqdm(
            range(0, len(images), batch_size), desc="CLIP features", disable=not progress
        ):
            dense = dense_features(
                clip, whole_image_pixels(clip, images[start : start + batch_size])
            )
            tokens.append(dense.tokens.half().cpu())
            projected.append(dense.projected.half().cpu())
        return cls(torch.cat(tokens), torch.cat(projected))

    def batch(self, indices: np.ndarray, device: torch.device) -> DenseFeatures:
        idx = torch.from_numpy(indices)
        return DenseFeatures(
            tokens=self.tokens[idx].to(device).float(),
            projected=self.projected[idx].to(device).float(),
        )


def _training_masks(
    gt: np.ndarray,
    gt_labels: list[int],
    proposals: np.ndarray | None,
    rng: np.random.Generator,
    void_label: int,
    void_per_image: int,
    untrained: np.ndarray | None = None,
) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
    """One image's masks, labels and (proposal row, its ground-truth row) consistency pairs.

    ``untrained``: masks of objects of classes not trained on (a COCO file's unseen ones): no
    proposal over one of them is labelled void, which would teach the adapter to reject the
    very classes the evaluation scores."""
    masks, labels, pairs = [gt], list(gt_labels), []
    if proposals is not None and len(proposals):
        matched = match_proposals(proposals, gt, rng)
        if matched:
            rows = [p for p, _ in matched]
            base = len(labels)
            masks.append(proposals[rows])
            labels += [gt_labels[g] for _, g in matched]
            pairs += [(base + i, g) for i, (_, g) in enumerate(matched)]
        if void_per_image > 0:
            objects = gt if untrained is None else np.concatenate([gt, untrained])
            iou = (
                mask_iou_matrix(proposals, objects)
                if len(objects)
                else np.zeros((len(proposals), 1))
            )
            void = np.flatnonzero(iou.max(axis=1) < VOID_IOU)
            if len(void) > void_per_image:
                void = rng.choice(void, size=void_per_image, replace=False)
            if len(void):
                masks.append(proposals[np.sort(void)])
                labels += [void_label] * len(void)
    return np.concatenate(masks), labels, pairs


def _sized(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(M, H, W) masks at `size` (bilinear, as the adapter reads them): a COCO batch mixes image
    sizes, and each image's masks cover the whole image CLIP saw, squashed to its square."""
    if masks.shape[1:] == size or not len(masks):
        return masks.astype(np.float32).reshape(len(masks), *size)
    x = torch.from_numpy(masks.astype(np.float32))[:, None]
    return F.interpolate(x, size, mode="bilinear").squeeze(1).numpy()


def _write_card(out: Path, args: argparse.Namespace, argv: list[str], info: dict[str, Any]) -> None:
    lines = [
        f"# Mask-Adapter stage {args.stage} (CLIP `{info['clip']}`)",
        "",
        "Trained by `train/seg.py` on a frozen CLIP (segmentation.mask_adapter; REFERENCE.md).",
        "",
        "## Command",
        "",
        "    python -m train.seg " + " ".join(argv),
        "",
        "## Run",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "Evaluate with `python -m eval.seg --adapter <this folder>` (docs/RESULTS.md).",
    ]
    atomic_write_text(out / "MODEL_CARD.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.seg",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="CLIP and SAM checkpoints of a preset")
    parser.add_argument("--clip", type=Path, help="CLIP checkpoint (default: the preset's)")
    parser.add_argument("--sam", type=Path, help="SAM checkpoint (default: the preset's)")
    src = parser.add_argument_group("data (one source)")
    src.add_argument("--data", type=Path, help="ShapeWorld folder (its train split)")
    src.add_argument("--images", type=Path, help="image root of a COCO instances file")
    src.add_argument("--instances-json", type=Path, help="COCO instances JSON (with --images)")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--init", type=Path, help="stage 2: the stage-1 adapter to start from")
    parser.add_argument("--limit", type=int, default=4000, help="training images (first N)")
    parser.add_argument("--proposals", type=Path, help="stage 2: proposal cache (.npz)")
    parser.add_argument(
        "--proposal-images", type=int, default=600, help="stage 2: images with SAM proposals"
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images per step, global (over all processes)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=128, help="adapter body width")
    parser.add_argument("--consistency-weight", type=float, default=5.0, help="stage 2 (paper: 5)")
    parser.add_argument("--void-per-image", type=int, default=2, help="stage 2 void proposals")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="stop (and save) after this"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many steps of this run, saving <out>/last (continue with --resume)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if (args.data is None) == (args.images is None):
        parser.error("give exactly one data source: --data, or --images with --instances-json")
    if args.images is not None and args.instances_json is None:
        parser.error("--images needs --instances-json")
    if args.stage == 2 and args.init is None:
        parser.error("--stage 2 starts from a stage-1 adapter: pass --init <stage1>/final")
    if args.out.joinpath("final").exists():
        parser.error(f"{args.out / 'final'} exists; choose another --out or remove it")
    dp = DataParallel(_device(args.device))
    device = dp.device
    why = dp.divides(batch_size=args.batch_size)
    if why:
        parser.error(why)
    progress = not args.no_progress and dp.main
    seed_everything(args.seed)
    try:
        preset = PolychromeConfig.from_preset(args.preset)
        clip_path, sam_path = preset.vision_checkpoints(args.clip, args.sam)
    except ValueError as err:
        parser.error(f"--preset {args.preset}: {err}")

    try:
        dataset = (
            InstanceDataset.from_shapeworld(args.data, "train")
            if args.data is not None
            else InstanceDataset.from_coco(args.images, args.instances_json)
        )
    except (ValueError, OSError) as err:  # bad data: say what, no traceback
        parser.error(str(err))
    n = min(args.limit, len(dataset))
    if args.stage == 2:  # stage 2 trains on the images that have proposals
        n = min(n, args.proposal_images)
    names = sorted({c for c in dataset.category_names.values() if c not in dataset.unseen})
    label_of = {name: i for i, name in enumerate(names)}
    void_label = len(names)

    clip, _, tokenizer = load_clip(clip_path)
    clip = clip.to(device).eval().requires_grad_(False)
    pool = clip_pool(clip)
    text = text_classifier(clip, tokenizer, names)

    images, gt_masks, gt_labels, untrained = [], [], [], []
    for i in tqdm(range(n), desc="read data", disable=not progress):
        item = dataset[i]
        kept = [inst for inst in item.instances if inst.category in label_of]
        others = [inst for inst in item.instances if inst.category not in label_of]
        images.append(np.asarray(item.image))
        h, w = images[-1].shape[:2]
        gt_masks.append(
            np.stack([inst.mask for inst in kept]) if kept else np.zeros((0, h, w), dtype=bool)
        )
        gt_labels.append([label_of[inst.category] for inst in kept])
        untrained.append(np.stack([inst.mask for inst in others]) if others else None)
    bank = FeatureBank.compute(clip, images, progress=progress)

    proposals: list[np.ndarray] | None = None
    n_train = n
    if args.stage == 2:
        cache = args.proposals or args.out / "proposals.npz"
        if dp.main and not cache.is_file():  # made once, by the main process
            from segment_anything import SamAutomaticMaskGenerator

            sam = load_sam(sam_path).to(device)
            generator = SamAutomaticMaskGenerator(sam, **amg_settings(sam))
            proposals = [
                sam_proposals(generator, images[i])[0]
                for i in tqdm(range(n_train), desc="SAM proposals", disable=not progress)
            ]
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_mask_lists(cache, proposals)
        dp.accelerator.wait_for_everyone()
        if proposals is None:
            proposals = load_mask_lists(cache)[:n_train]
            if len(proposals) < n_train:
                parser.error(f"{cache} holds {len(proposals)} images' proposals, need {n_train}")
            wrong = [i for i in range(n_train) if proposals[i].shape[1:] != images[i].shape[:2]]
            if wrong:
                parser.error(
                    f"{cache}: proposals of image {wrong[0]} are {proposals[wrong[0]].shape[1:]}, "
                    f"the image is {images[wrong[0]].shape[:2]}: a cache of other data?"
                )

    if args.init is not None:
        adapter = load_adapter(args.init).train()
    else:
        adapter = MaskAdapter(
            MaskAdapterConfig(
                clip_dim=bank.projected.shape[1],
                vis_dim=bank.tokens.shape[2],
                hidden=args.hidden,
                init_logit_scale=float(clip.logit_scale.detach()),
            )
        ).train()
    adapter.to(device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = cosine_with_warmup(optimizer, warmup=min(100, args.steps // 10), total=args.steps)
    run_config = {
        "stage": args.stage,
        "images": n_train,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "steps": args.steps,
        "seed": args.seed,
        "consistency_weight": args.consistency_weight,
    }
    start = resume_or_start(
        parser, args, adapter, optimizer, scheduler, run_config, RESUME_KEYS, announce=dp.main
    )
    if dp.main:
        print(
            f"{n_train} images, {len(names)} classes; {dp.world} process(es), "
            f"{args.batch_size // dp.world} images each per step"
        )
    # Data parallel: each process takes its slice of the global batch; DDP averages gradients.
    head, optimizer = dp.accelerator.prepare(_AdapterHead(adapter), optimizer)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open_log(args.out / "log.jsonl", start) if dp.main else None
    batches = batch_indices(n_train, args.batch_size, args.seed, start)
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    t0 = time.time()
    running: list[dict[str, float]] = []
    step = start
    out_of_time = False
    bar = tqdm(total=args.steps, initial=start, desc=f"stage {args.stage}", disable=not progress)
    save = partial(save_training_state, args.out, adapter, optimizer, scheduler, config=run_config)
    while step < end:
        idx = next(batches)
        rng = np.random.default_rng([args.seed, step])
        # the whole batch's masks, drawn in order from one generator as one process draws them;
        # then this process's images
        per_image = [
            _training_masks(
                gt_masks[i],
                gt_labels[i],
                proposals[i] if proposals is not None else None,
                rng,
                void_label,
                args.void_per_image,
                untrained[i],
            )
            for i in idx
        ]
        mine = dp.part(range(len(idx)))
        idx, per_image = idx[mine], [per_image[k] for k in mine]
        m = max(len(masks) for masks, _, _ in per_image)
        h = max(images[i].shape[0] for i in idx)  # the largest: smaller masks lose nothing
        w = max(images[i].shape[1] for i in idx)
        batch_masks = np.zeros((len(idx), max(m, 1), h, w), dtype=np.float32)
        labels = torch.full((len(idx), max(m, 1)), -100, dtype=torch.long)
        for b, (masks, labs, _) in enumerate(per_image):
            batch_masks[b, : len(masks)] = _sized(masks, (h, w))
            labels[b, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        dense = bank.batch(idx, device)
        # (B, M, D) embeddings, (B, M, C + 1) logits
        emb, logits = head(dense, torch.from_numpy(batch_masks).to(device), pool, text)
        n_labels = int((labels != -100).sum())
        ce = (
            F.cross_entropy(logits.flatten(0, 1), labels.flatten().to(device), ignore_index=-100)
            if n_labels
            else 0 * logits.sum()  # no mask here (the mean would be NaN): adds nothing
        )
        cons = torch.zeros((), device=device)
        pairs = [(b, p, g) for b, (_, _, pr) in enumerate(per_image) for p, g in pr]
        if args.consistency_weight <= 0:
            pairs = []
        if pairs:
            bi = torch.tensor([b for b, _, _ in pairs])
            cons = consistency_loss(
                emb[bi, torch.tensor([p for _, p, _ in pairs])],
                emb[bi, torch.tensor([g for _, _, g in pairs])],
            )
        # Both losses are means, over the masks and over the pairs: weighted by this process's
        # share of the whole batch's, DDP's average of the gradients is the gradient of the
        # whole batch's means (one process: both shares are 1).
        ce_share = dp.world * n_labels / max(dp.total(n_labels), 1.0)
        cons_share = dp.world * len(pairs) / max(dp.total(len(pairs)), 1.0)
        loss = ce * ce_share
        if pairs:
            loss = loss + args.consistency_weight * (cons * cons_share)
        optimizer.zero_grad(set_to_none=True)
        dp.accelerator.backward(loss)
        dp.accelerator.clip_grad_norm_(adapter.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        valid = labels.flatten() != -100
        acc = (logits.flatten(0, 1).argmax(-1).cpu()[valid] == labels.flatten()[valid]).float()
        row = {  # the whole batch's (a batch without masks or pairs: 0, as in one process)
            "ce": mean_over_processes(dp, ce.item(), n_labels, empty=0.0),
            "consistency": mean_over_processes(dp, cons.item(), len(pairs), empty=0.0),
            "acc": mean_over_processes(dp, acc.mean().item(), n_labels),
        }
        whole = row["ce"] + args.consistency_weight * row["consistency"]
        running.append({"loss": loss.item() if dp.world == 1 else whole, **row})
        if step % args.log_every == 0 or step == args.steps:
            mean = {k: float(np.mean([r[k] for r in running])) for k in running[0]}
            if log is not None:
                row_json = {"step": step, **mean, "lr": scheduler.get_last_lr()[0]}
                log.write(json.dumps(row_json) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{mean['loss']:.3f}", acc=f"{mean['acc']:.2f}")
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
            save_training_state(args.out, adapter, optimizer, scheduler, step, run_config)
            print(f"stopped at step {step} of {args.steps}; continue with --resume")
        return 0
    if not dp.main:
        return 0  # the main process writes the results
    info = {
        "preset": args.preset,
        "clip": str(clip_path),
        "sam (proposals)": str(sam_path) if args.stage == 2 else None,
        "stage": args.stage,
        "init": str(args.init) if args.init else None,
        "data": str(args.data or args.instances_json),
        "classes (trained)": ", ".join(names),
        "images": n_train,
        "steps_done": step,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "consistency_weight": args.consistency_weight if args.stage == 2 else None,
        "void_per_image": args.void_per_image if args.stage == 2 else None,
        "device": str(device),
        "seed": args.seed,
        "train_seconds_this_run": round(time.time() - t0, 1),
    }
    final = save_adapter(args.out / "final", adapter, {k: str(v) for k, v in info.items()})
    _write_card(final, args, sys.argv[1:] if argv is None else list(argv), info)
    remove_training_state(args.out)
    print(f"wrote {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
