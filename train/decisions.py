"""Refit the decision rows of STAMP's ``<seg>`` and GILL's ``[IMG0]`` together, for one Assistant.

    python -m train.decisions --data /work/data/sw --stamp checkpoints/shapes/stamp \
        --gill runs/gill/final --out runs/decisions --per-class 600

Each was trained on its own: STAMP never saw an image request, GILL never a segmentation request,
and both saw few ordinary questions (STAMP's ``<seg>`` fired on 40 % of them, docs/RESULTS.md).
On one shared core (vlm.specials offers both tokens in one loop) the rows compete. This refits
only the two output rows (``seg_out``/``seg_bias``, ``img_out``/``img_bias``: 2 x (H + 1)
numbers) with the training objective of both methods, cross-entropy over [vocabulary, <seg>,
[IMG0]]: a segmentation request's target is ``<seg>``, an image request's ``[IMG0]``, an
ordinary turn's the VLM core's own first token. The prompt is read by the VLM core as it is
(the frozen LLM, with the core's image LoRA where the prompt holds an image; no extension's
LoRA), so its last hidden state does not depend on the rows: it is computed once per prompt, and
the fit is a small convex problem over the cached states (full-batch Adam, classes weighted
equally).

Fitted on the train split's prompts, measured on the ``--eval-split`` (other images, other
expressions, and ordinary text prompts never fitted on): how often greedy decoding opens the
reply with ``<seg>`` / ``[IMG0]`` / text, per kind of prompt, before and after. Writes
``<out>/stamp`` and ``<out>/gill`` (the input checkpoints with the new rows, everything else
unchanged) and ``<out>/decisions.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import project_path
from core.io import atomic_write_text
from core.runtime import seed_everything
from data.conversations import DESCRIBE_PROMPTS, read_chat_records
from data.datasets import ReferringDataset, shapeworld_paths
from train.common import check_run_args
from train.decoding_common import other_process
from train.gill import OTHER_PROMPTS
from train.stamp import OTHER_QUESTIONS
from vlm.config import PolychromeConfig
from vlm.gill import GILLVLM, REQUEST_TEMPLATES, compose_description, load_scenes
from vlm.model import PolychromeVLM
from vlm.stamp import SEG_PROMPTS, StampVLM

Prompt = list[dict[str, Any]]
KINDS = ("seg request", "image request", "question about an image", "text-only message")
# text-only messages: ordinary ones, and as many segmentation requests without an image
TEXT, SEG, IMG = 0, 1, 2  # decision classes
# Ordinary text-only messages held out of the fit: the evaluation's text-only kind.
EVAL_TEXT_PROMPTS = (
    "Good morning! What should I cook tonight?",
    "Translate 'thank you' into Spanish.",
    "What is the square root of 81?",
    "Give me three tips for learning to draw.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Which is bigger, a triangle or a square?",
    "What does a rhombus look like?",
    "Tell me a joke about circles.",
    "How do I make my shapes look more colourful in a drawing?",
    "What day comes after Monday?",
    "Can you recommend a good book?",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.decisions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="a ShapeWorld folder")
    parser.add_argument("--stamp", type=Path, required=True, help="a StampVLM checkpoint")
    parser.add_argument("--gill", type=Path, required=True, help="a GILLVLM checkpoint")
    parser.add_argument("--preset", default="shapes", help="preset whose VLM core they share")
    parser.add_argument(
        "--vlm", type=Path, default=None, help="the shared VLM core (default: the preset's)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for stamp/ gill/ json")
    parser.add_argument("--split", default="train", help="split the prompts are fitted on")
    parser.add_argument("--eval-split", default="val", help="split the rates are measured on")
    parser.add_argument("--per-class", type=int, default=600, help="fitted prompts per kind")
    parser.add_argument("--eval-per-class", type=int, default=200, help="measured per kind")
    parser.add_argument(
        "--reply-tokens",
        type=int,
        default=16,
        help="states of the bare LLM's own reply taken per ordinary prompt (default 16): the "
        "rows must stay off mid-reply too",
    )
    parser.add_argument("--steps", type=int, default=500, help="full-batch Adam steps")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per LLM pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--overwrite", action="store_true", help="replace <out>/stamp, gill")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def prompts_for(
    data: Path, split: str, n: int, seed: int, held_out_text: bool
) -> dict[str, list[Prompt]]:
    """`n` prompts of each kind from one split (a pure function of its arguments)."""
    rng = np.random.default_rng(seed)
    refs = ReferringDataset.from_shapeworld(data, split)
    seg: list[Prompt] = []
    for i in rng.permutation(len(refs))[:n]:
        item = refs[int(i)]
        ask = SEG_PROMPTS[int(rng.integers(len(SEG_PROMPTS)))].format(item.expression)
        seg.append([{"role": "user", "content": ask, "images": [item.image_path]}])
    scenes = load_scenes(data, split, limit=n)
    descriptions = [s.listing for s in scenes[: n // 2]]
    descriptions += [compose_description(rng) for _ in range(n - len(descriptions))]
    templates = [REQUEST_TEMPLATES[int(rng.integers(len(REQUEST_TEMPLATES)))] for _ in descriptions]
    image: list[Prompt] = [
        [{"role": "user", "content": t.format(d)}]
        for t, d in zip(templates, descriptions, strict=True)
    ]
    questions: list[Prompt] = []
    for record in read_chat_records(shapeworld_paths(data, split)["images"]):
        asks = [qa["question"] for qa in record.qa]
        asks.append(DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))])
        asks.append(OTHER_QUESTIONS[int(rng.integers(len(OTHER_QUESTIONS)))])
        for q in asks:
            questions.append([{"role": "user", "content": q, "images": [record.image]}])
        if len(questions) >= n:
            break
    pool = EVAL_TEXT_PROMPTS if held_out_text else (*OTHER_PROMPTS, *OTHER_QUESTIONS)
    k = min(n, len(pool))
    # and as many segmentation requests with no image to segment: text, not [IMG0]
    asks = [m["content"] for p in seg[:k] for m in p]
    text: list[Prompt] = [[{"role": "user", "content": t}] for t in (*pool[:k], *asks)]
    return dict(zip(KINDS, (seg, image, questions[:n], text), strict=True))


@torch.inference_mode()
def prompt_states(
    gill: GILLVLM,
    prompts: Sequence[Prompt],
    batch_size: int,
    progress: bool,
    desc: str,
    reply_tokens: int = 0,
) -> dict[str, torch.Tensor]:
    """The states the decision is made from (the VLM core, no extension's LoRA), with the
    vocabulary logits' logsumexp and max: all the fit needs, since the rows do not change what
    the LLM reads. Position 0 is the prompt's last state; with ``reply_tokens`` also the states of
    the core's own greedy reply, up to its end of turn (where an image or a mask could fire
    mid-reply)."""
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("hidden", "lse", "top", "has_image", "prompt", "position")
    }
    head = gill.vlm.llm.get_output_embeddings()
    eos = int(gill.vlm.tokenizer.eos_token_id)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        batch = prompts[start : start + batch_size]
        ids, attn, visual = gill._batch(batch)
        last, cache = gill.prefix(ids, attn, visual)
        kv = attn.to(gill.vlm.device)
        image = torch.tensor([any(m.get("images") for m in p) for p in batch])
        owner = torch.arange(start, start + len(batch))
        alive = torch.ones(len(batch), dtype=torch.bool)
        for position in range(reply_tokens + 1):
            logits = head(last).float().cpu()
            out["hidden"].append(last.float().cpu()[alive])
            out["lse"].append(torch.logsumexp(logits, -1)[alive])
            out["top"].append(logits.max(-1).values[alive])
            out["has_image"].append(image[alive])
            out["prompt"].append(owner[alive])
            out["position"].append(torch.full((int(alive.sum()),), position))
            token = logits.argmax(-1)
            alive = alive & (token != eos)
            if position == reply_tokens or not alive.any():
                break
            last = gill.step(token, kv, cache)
            kv = torch.cat([kv, torch.ones_like(kv[:, :1])], 1)
    return {k: torch.cat(v) for k, v in out.items()}


def decision_logits(states: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, 3): [the vocabulary's aggregate (logsumexp), <seg>, [IMG0]] logits; <seg> is -inf
    without an image (the decoding loop does not offer it there)."""
    h = states["hidden"]
    seg = h @ rows["seg_out"] + rows["seg_bias"]
    seg = torch.where(states["has_image"], seg, torch.full_like(seg, float("-inf")))
    img = h @ rows["img_out"] + rows["img_bias"]
    return torch.stack([states["lse"], seg, img], -1)


def greedy_choice(states: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) what greedy decoding opens with: TEXT (the best vocabulary token), SEG or IMG."""
    z = decision_logits(states, rows)
    z = torch.stack([states["top"], z[:, 1], z[:, 2]], -1)
    return z.argmax(-1)


def fit_rows(
    states: dict[str, torch.Tensor],
    targets: torch.Tensor,
    init: dict[str, torch.Tensor],
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Minimise the class-balanced cross-entropy over [vocabulary, <seg>, [IMG0]] (a text
    target is the core's own token, whose logit is the vocabulary's max)."""
    rows = {k: v.detach().float().clone().requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.Adam(rows.values(), lr=lr)
    counts = torch.bincount(targets, minlength=3).clamp(min=1).float()
    weights = (1.0 / counts)[targets]
    weights = weights / weights.sum()
    curve = []
    for _ in range(steps):
        z = decision_logits(states, rows)
        norm = torch.logsumexp(z, -1)
        own = torch.where(targets == TEXT, states["top"], z.gather(1, targets[:, None]).squeeze(1))
        loss = (weights * (norm - own)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return {k: v.detach() for k, v in rows.items()}, curve


def rates(
    states: dict[str, dict[str, torch.Tensor]], rows: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per kind of prompt: the share of replies greedy decoding opens with text, <seg>, [IMG0];
    where reply states were taken, also the share of replies in which <seg> / [IMG0] would win
    at any of them ("... anywhere")."""
    out = {}
    for kind, st in states.items():
        choice = greedy_choice(st, rows)
        first = st["position"] == 0
        row = {
            name: float((choice[first] == c).float().mean())
            for name, c in (("text", TEXT), ("<seg>", SEG), ("[IMG0]", IMG))
        }
        if bool((st["position"] > 0).any()):
            prompts = st["prompt"].unique()
            for name, c in (("<seg>", SEG), ("[IMG0]", IMG)):
                fired = st["prompt"][choice == c].unique()
                row[f"{name} anywhere"] = len(fired) / len(prompts)
        out[kind] = row
    return out


def table(before: dict[str, Any], after: dict[str, Any], counts: dict[str, int]) -> str:
    lines = [
        "| prompt kind | n | <seg> before | <seg> after | [IMG0] before | [IMG0] after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        b, a = before[kind], after[kind]
        for where in ("", " anywhere"):
            if f"<seg>{where}" not in b:
                continue
            label = kind if not where else "... at any token of the core's own reply"
            lines.append(
                f"| {label} | {counts[kind]} | {100 * b['<seg>' + where]:.1f}% | "
                f"{100 * a['<seg>' + where]:.1f}% | {100 * b['[IMG0]' + where]:.1f}% | "
                f"{100 * a['[IMG0]' + where]:.1f}% |"
            )
    return "\n".join(lines)


def _write(source: Path, dest: Path, stem: str, rows: dict[str, torch.Tensor], meta: Any) -> None:
    ckpt = load_checkpoint(source)
    tensors = {k: dict(v) for k, v in ckpt.tensors.items()}
    for name, value in rows.items():
        old = tensors[stem][name]
        tensors[stem][name] = value.to(old.dtype).reshape(old.shape)
    metadata = {**ckpt.metadata, "decision_rows": meta}
    save_checkpoint(dest, tensors, ckpt.config, metadata, overwrite=True)
    card = source / "MODEL_CARD.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        manifest = json.loads((dest / "manifest.json").read_text(encoding="utf-8"))
        for name, info in manifest["files"].items():  # the card's sha256 lines: the new files'
            text = re.sub(
                rf"- {re.escape(name)}: [0-9a-f]{{64}} \(\d+ bytes\)",
                f"- {name}: {info['sha256']} ({info['bytes']} bytes)",
                text,
            )
        text += (
            "\n## Decision row refit\n\n"
            f"The {stem} output row was refit by `train.decisions` (the other tensors are the "
            "ones above; the sha256 in manifest.json are this folder's):\n\n"
            f"    {meta['command']}\n"
        )
        atomic_write_text(dest / "MODEL_CARD.md", text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if other_process("python -m train.decisions"):
        return 0
    if args.reply_tokens < 0:
        parser.error(f"--reply-tokens must be >= 0, received {args.reply_tokens}")
    check_run_args(parser, args, ("per_class", "eval_per_class", "steps", "batch_size"))
    for what in ("stamp", "gill"):
        if (args.out / what).exists() and not args.overwrite:
            parser.error(f"{args.out / what} exists; pass --overwrite to replace it")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    core_dir = args.vlm
    if core_dir is None:
        preset = PolychromeConfig.from_preset(args.preset)
        if not preset.vlm.checkpoint:
            parser.error(f"preset {args.preset!r} names no VLM core (vlm.checkpoint); use --vlm")
        core_dir = project_path(preset.vlm.checkpoint)
    try:
        core = PolychromeVLM.from_pretrained(core_dir)
        stamp = StampVLM.from_pretrained(args.stamp, vlm=core).eval()
        gill = GILLVLM.from_pretrained(args.gill, vlm=core).eval()
        fit_prompts = prompts_for(args.data, args.split, args.per_class, args.seed, False)
        eval_prompts = prompts_for(
            args.data, args.eval_split, args.eval_per_class, args.seed + 1, True
        )
    except (ValueError, OSError) as err:
        parser.error(str(err))
    progress = not args.no_progress

    def states(prompts: dict[str, list[Prompt]], what: str) -> dict[str, dict[str, torch.Tensor]]:
        return {
            k: prompt_states(
                gill,
                v,
                args.batch_size,
                progress,
                f"{what}: {k}",
                args.reply_tokens if label[k] == TEXT else 0,
            )
            for k, v in prompts.items()
        }

    label = {KINDS[0]: SEG, KINDS[1]: IMG, KINDS[2]: TEXT, KINDS[3]: TEXT}
    fit_states = states(fit_prompts, "fit")
    eval_states = states(eval_prompts, "eval")
    init = {
        "seg_out": stamp.seg_out.detach(),
        "seg_bias": stamp.seg_bias.detach(),
        "img_out": gill.img_out.detach(),
        "img_bias": gill.img_bias.detach(),
    }
    joined = {
        key: torch.cat([fit_states[k][key] for k in KINDS])
        for key in ("hidden", "lse", "top", "has_image")
    }
    targets = torch.cat(
        [torch.full((len(fit_states[k]["lse"]),), label[k], dtype=torch.long) for k in KINDS]
    )
    rows, curve = fit_rows(joined, targets, init, args.steps, args.lr)
    counts = {k: len(v) for k, v in eval_prompts.items()}
    result = {
        "command": "python -m train.decisions " + shlex.join(argv),
        "fit_split": args.split,
        "eval_split": args.eval_split,
        "fit_prompts": {k: len(v) for k, v in fit_prompts.items()},
        "eval_prompts": counts,
        "loss_first_last": [curve[0], curve[-1]],
        "fit_before": rates(fit_states, init),
        "fit_after": rates(fit_states, rows),
        "eval_before": rates(eval_states, init),
        "eval_after": rates(eval_states, rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": result["command"], "eval_after": result["eval_after"]}
    _write(args.stamp, args.out / "stamp", "stamp", {k: rows[k] for k in init if "seg" in k}, meta)
    _write(args.gill, args.out / "gill", "gill", {k: rows[k] for k in init if "img" in k}, meta)
    atomic_write_text(args.out / "decisions.json", json.dumps(result, indent=2) + "\n")
    print(f"{args.eval_split}: share of replies opening with each token, before -> after\n")
    print(table(result["eval_before"], result["eval_after"], counts))
    print(f"\nwrote {args.out / 'stamp'}, {args.out / 'gill'}, {args.out / 'decisions.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
