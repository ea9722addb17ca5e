"""Evaluate a GILL checkpoint on ShapeWorld: retrieval, generation, the decision, [IMG0] emission;
on your own captioned images: retrieval.

    python -m eval.gill --checkpoint /work/runs/gill/final --data /work/data/sw --split test \\
        --limit 200 --gen-data out/shapeworld_diffusion --single 25 --two 25 --json out/gill.json
    python -m eval.gill --checkpoint runs/gill_mine/final --imagefolder my_photos_test --limit 500

Prints markdown tables; --json writes every figure. ``evaluate_gill(...)`` is what the CLI and the
test call. Protocol:

- Requests are ``vlm.gill.request_prompt(caption)`` ("Show me this: <caption>"), the reply forced
  to open with [IMG0..7] (``GILLVLM.request_states``).
- Retrieval (text -> image): the first ``--limit`` images of ``--split`` are indexed in the model's
  retrieval space (``GILLImageEmbedder``, exact FAISS index); each image's query is its listing
  caption (the shortest naming every object by colour and class). Recall@1/5/10 = the image
  itself among the top k. Reference row: the ShapeWorld CLIP's own text tower on the same
  captions against its image embeddings (what a retrieval head could at most inherit from CLIP).
- Generation: the first ``--single`` one-object and ``--two`` two-object images of ``--gen-data``
  (the decoder's held-out split, eval.generation.load_prompts: its protocol, judge and seeds). Each
  prompt is drawn from the mapper's prompt_embeds and, as the upper bound, from the decoder's own
  text encoding of the same caption; eval.generation's judge (SAM masks + CLIP crops) checks that
  every requested object is there. Also: the mean generation loss (per-token distance) of the
  mapper's output to that encoding.
- Decision: the scenes' requests are labelled retrieve (their images are in the index), the
  generation prompts' requests generate (one or two objects, not in the index); accuracy per
  class and macro-F1, and retrieve-accuracy split by the scene's object count (two-object scenes
  read like compositions); beside them, a reference with no model: the best macro-F1 of any rule
  on the object count alone (count_rule_f1). Two threshold-free diagnostics: the ROC AUC of the
  head's p(generate) (how well it ranks the two kinds, whatever the threshold), and that of each
  request's best retrieval score in the scenes' index, negated (could the index itself tell a
  request about an image it holds from a new composition?); both index AUCs again on the
  requests that name two objects (the slice no text-only rule splits), and beside them the same
  for the best cosine of the ShapeWorld CLIP (the reference row's sharper retriever).
- Emission: how often greedy decoding opens the reply with [IMG0] on the requests, and on ordinary
  prompts (held-out text-only questions and image questions about the scenes) where it should not.
- Your own images (``--imagefolder``, or ``--images`` with ``--captions-json``): retrieval only,
  as above with each image's first caption as its request (the request train.gill taught to
  retrieve it), beside the CLIP reference row; the generation and decision figures need
  ShapeWorld's compositions and are not computed.
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
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from core.io import atomic_write_text
from core.runtime import resolve_device
from data.conversations import DESCRIBE_PROMPTS
from data.datasets import add_caption_arguments, caption_source_error, user_captions_to_evaluate
from data.scene import COLOURS, SHAPES
from data.shapeworld import read_manifest
from eval.generation import GenerationJudge, PromptItem, labels_satisfy, load_prompts
from generation.diffusion import (
    encode_prompts,
    generate,
    load_pipeline,
    pipeline_from_preset,
    set_scheduler,
)
from generation.gill import GENERATE, RETRIEVE, generation_loss
from generation.index import ImageIndex, clip_embedder
from vision.clip import clip_from_preset
from vision.sam import sam_from_preset
from vlm.config import PolychromeConfig
from vlm.gill import (
    GILLVLM,
    ImgTokenStates,
    SceneItem,
    load_scenes,
    request_prompt,
    scenes_from_pairs,
)

__all__ = [
    "OTHER_PROMPTS",
    "add_generation_arguments",
    "batched_request_states",
    "clip_recall",
    "count_rule_f1",
    "evaluate_gill",
    "format_tables",
    "judge_from_args",
    "load_for_generation",
    "main",
    "recall_at",
    "retrieval_recall",
    "scene_index",
    "write_results",
]

# Held-out ordinary prompts (none is in train.gill's list): the reply should not open with [IMG0].
OTHER_PROMPTS = (
    "What is the weather usually like in spring?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Describe a blue square in words.",
    "Which shape has three sides?",
    "Give me three tips for learning to draw.",
    "What is two plus two?",
)
KS = (1, 5, 10)


def recall_at(
    ranked: Sequence[Sequence[int]], truth: Sequence[int], ks: Sequence[int] = KS
) -> dict[int, float]:
    """{k: fraction of queries whose true id is among the first k of its ranking}, for the ks
    below the number of queries, one per item here (at or above the number of items every query
    is a hit: nothing measured)."""
    n_items = len(truth)
    return {
        k: float(np.mean([t in list(r[:k]) for r, t in zip(ranked, truth, strict=True)]))
        for k in ks
        if k < n_items
    }


def batched_request_states(
    gill: GILLVLM,
    prompts: Sequence[list[dict[str, Any]]],
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, ImgTokenStates]:
    lasts, hidden, embeds = [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        with torch.inference_mode():
            last, st = gill.request_states(prompts[start : start + batch_size])
        lasts.append(last)
        hidden.append(st.hidden)
        embeds.append(st.input_embeds)
    return torch.cat(lasts), ImgTokenStates(torch.cat(hidden), torch.cat(embeds))


def _opens_with_img(gill: GILLVLM, prompts: Sequence[list[dict[str, Any]]]) -> list[bool]:
    out = []
    for p in prompts:  # one at a time: no padding, exactly the chat's prefix
        with torch.inference_mode():
            ids, attn, visual = gill._batch([p])
            last, _ = gill.prefix(ids, attn, visual)
            out.append(int(gill.decision_logits(last)[0].argmax()) == gill.vocab_size)
    return out


def _macro_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    f1s = []
    for c in (RETRIEVE, GENERATE):
        tp = float(((pred == c) & (truth == c)).sum())
        prec = tp / max(float((pred == c).sum()), 1.0)
        rec = tp / max(float((truth == c).sum()), 1.0)
        f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    return float(np.mean(f1s))


def _auc(truth: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of `score` for `truth`; None where only one class is present."""
    return float(roc_auc_score(truth, score)) if len(np.unique(truth)) == 2 else None


def count_rule_f1(counts: np.ndarray, truth: np.ndarray) -> tuple[float, dict[int, int]]:
    """The best macro-F1 of any rule that decides from the number of objects a request names and
    nothing else, and that rule (count -> class). A reference for the decision head: on
    ShapeWorld a scene's listing and a composition of as many objects read alike ("A blue heart
    and a pink heart."), so where the two kinds share a count no text-only rule can tell them
    apart; this is what reading the count perfectly is worth.

    A count seen in one class only goes to that class in the best rule (moving it can only lose
    true positives of one class and add false positives to the other), so only the counts both
    classes share are searched, every assignment of them tried."""
    rule = {int(c): int(truth[counts == c][0]) for c in np.unique(counts)}
    shared = [int(c) for c in np.unique(counts) if len(np.unique(truth[counts == c])) > 1]
    if len(shared) > 16:
        raise ValueError(f"count_rule_f1: at most 16 shared counts, received {len(shared)}")
    best, best_rule = -1.0, dict(rule)
    for bits in range(2 ** len(shared)):
        rule.update({v: (GENERATE if bits >> i & 1 else RETRIEVE) for i, v in enumerate(shared)})
        f1 = _macro_f1(np.array([rule[int(c)] for c in counts]), truth)
        if f1 > best:
            best, best_rule = f1, dict(rule)
    return best, best_rule


@torch.inference_mode()
def scene_index(gill: GILLVLM, scenes: Sequence[SceneItem]) -> ImageIndex:
    """An exact index of the scenes' images in GILL's retrieval space, in scene order."""
    embedder = gill.image_embedder()
    paths = [str(s.image_path.resolve()) for s in scenes]
    index = ImageIndex(embedder.name, embedder.dim, "exact")
    index.add(embedder([s.image_path for s in scenes]), paths, model=embedder.name)
    return index


@torch.inference_mode()
def retrieval_recall(
    gill: GILLVLM,
    scenes: Sequence[SceneItem],
    batch_size: int = 16,
    progress: bool = False,
    index: ImageIndex | None = None,
) -> tuple[dict[int, float], torch.Tensor, ImgTokenStates]:
    """Text -> image recall@{1, 5, 10} of each scene's listing ("Show me this: ...") among the
    scenes' images, in an exact index of GILL's retrieval space (``scene_index``, built here
    unless given); with the requests' last prompt states and [IMG] states."""
    index = scene_index(gill, scenes) if index is None else index
    requests = [request_prompt(s.listing) for s in scenes]
    last, states = batched_request_states(gill, requests, batch_size, progress, "scene requests")
    hits = index.search(gill.retrieval_queries(states).cpu().numpy(), min(max(KS), len(scenes)))
    return recall_at(hits.ids.tolist(), list(range(len(scenes)))), last, states


def clip_recall(reference: Any, scenes: Sequence[SceneItem]) -> tuple[dict[int, float], Any]:
    """The reference row: text -> image recall of each scene's request text ("listing") among
    the scenes' images by a CLIP's own cosine, and those (N, D) image embeddings."""
    images = reference([s.image_path for s in scenes])
    scores = reference.embed_text([s.listing for s in scenes]) @ images.T
    order = np.argsort(-scores, axis=1)[:, : min(max(KS), len(scenes))]
    return recall_at(order.tolist(), list(range(len(scenes)))), images


@torch.inference_mode()
def evaluate_gill(
    gill: GILLVLM,
    pipe: Any,
    judge: GenerationJudge,
    clip_reference: Any | None,
    data_root: str | Path,
    split: str,
    n: int,
    gen_root: str | Path,
    gen_split: str = "val",
    n_single: int = 25,
    n_two: int = 25,
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """All figures of the module docstring as a JSON-ready dict (fractions in [0, 1])."""
    gill.eval()
    scenes: list[SceneItem] = load_scenes(data_root, split, n)
    if len(scenes) < 2:
        raise ValueError(
            f"{data_root} split {split!r}: need at least 2 images, found {len(scenes)}"
        )
    results: dict[str, Any] = {"split": split, "n_images": len(scenes)}
    # -- retrieval --------------------------------------------------------------------------
    index = scene_index(gill, scenes)
    results["recall"], last, states = retrieval_recall(gill, scenes, batch_size, progress, index)
    clip_img = None
    if clip_reference is not None:
        results["clip_recall"], clip_img = clip_recall(clip_reference, scenes)
    # -- generation ---------------------------------------------------------------------------
    single, two = load_prompts(gen_root, gen_split, n_single, n_two)
    items: list[PromptItem] = single + two
    # the decision's count-only reference needs no model: computed before the long part
    counts = np.array([len(s.objects) for s in scenes] + [len(it.objects) for it in items])
    truth_d = np.array([RETRIEVE] * len(scenes) + [GENERATE] * len(items))
    ceiling, rule = count_rule_f1(counts, truth_d)
    prompts = [it.prompt for it in items]
    requests = [request_prompt(p) for p in prompts]
    _, gen_states = batched_request_states(gill, requests, batch_size, progress, "gen")
    with torch.inference_mode():
        mapped = gill.prompt_embeds(gen_states).float()
        own = encode_prompts(pipe, prompts).float()
        results["generation_distance"] = float(generation_loss(mapped, own))
    seeds = [seed + i for i in range(len(items))]
    for name, embeds in (("mapper", mapped), ("decoder_text", own)):
        images = []
        for start in tqdm(range(0, len(items), batch_size), desc=name, disable=not progress):
            images += generate(
                pipe,
                prompt_embeds=embeds[start : start + batch_size],
                seed=seeds[start : start + batch_size],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
        found = [judge.objects(im) for im in images]
        ok = [labels_satisfy(f, it.objects) for f, it in zip(found, items, strict=True)]
        m = len(single)
        results[f"{name}_single_acc"] = float(np.mean(ok[:m])) if single else None
        results[f"{name}_two_acc"] = float(np.mean(ok[m:])) if two else None
        results[f"{name}_clip_score"] = float(np.mean(judge.clip_score(images, prompts)))
        results[f"_{name}_images"] = images
    results["gen_prompts"] = {"single": len(single), "two": len(two), "split": gen_split}
    results["num_inference_steps"], results["guidance_scale"] = num_inference_steps, guidance_scale
    # -- decision -------------------------------------------------------------------------------
    with torch.inference_mode():
        p_scene = gill.p_generate(states).cpu().numpy()
        p_gen = gill.p_generate(gen_states).cpu().numpy()
        # the best retrieval score of each request in the scenes' index: would the index itself
        # tell a request about an indexed image from a new composition? (a diagnostic)
        top = [
            index.search(gill.retrieval_queries(st).cpu().numpy(), 1).scores[:, 0]
            for st in (states, gen_states)
        ]
    pred = np.concatenate([p_scene > 0.5, p_gen > 0.5]).astype(int)
    is_gen = truth_d == GENERATE
    two_obj = np.array([len(s.objects) == 2 for s in scenes])
    index_score = -np.concatenate(top)
    # The slice no text-only rule can split: requests naming two objects, of either kind. Does the
    # best match in the index, in GILL's space or in the (sharper) CLIP's, tell the listing of an
    # indexed two-object scene from a new two-object picture?
    pair = counts == 2
    index_evidence: dict[str, Any] = {
        "index_score_auc_two_objects": _auc(is_gen[pair], index_score[pair]),
        "n_two_object_requests": int(pair.sum()),
    }
    if clip_reference is not None and clip_img is not None:
        clip_txt = clip_reference.embed_text([s.listing for s in scenes] + prompts)
        clip_score = -(clip_txt @ clip_img.T).max(axis=1)
        index_evidence.update(
            clip_score_auc=_auc(is_gen, clip_score),
            clip_score_auc_two_objects=_auc(is_gen[pair], clip_score[pair]),
            clip_top_score=(-clip_score).tolist(),
        )
    results["decision"] = {
        "accuracy": float((pred == truth_d).mean()),
        "macro_f1": _macro_f1(pred, truth_d),
        "retrieve_acc": float((p_scene <= 0.5).mean()),
        "generate_acc": float((p_gen > 0.5).mean()),
        "retrieve_acc_two_objects": float((p_scene[two_obj] <= 0.5).mean())
        if two_obj.any()
        else None,
        "retrieve_acc_3plus_objects": (
            float((p_scene[~two_obj] <= 0.5).mean()) if (~two_obj).any() else None
        ),
        "n_two_object_scenes": int(two_obj.sum()),
        # threshold-free: how well each score ranks "generate" above "retrieve" (0.5: chance)
        "head_auc": float(roc_auc_score(is_gen, np.concatenate([p_scene, p_gen]))),
        "index_score_auc": float(roc_auc_score(is_gen, index_score)),
        **index_evidence,
        # per request (scenes, then compositions), for other thresholds and rules
        "p_generate": np.concatenate([p_scene, p_gen]).tolist(),
        "index_top_score": np.concatenate(top).tolist(),
        "count_rule_macro_f1": ceiling,
        "count_rule": {
            str(k): ("generate" if v == GENERATE else "retrieve") for k, v in rule.items()
        },
        "n_retrieve": len(scenes),
        "n_generate": len(items),
    }
    # -- emission -------------------------------------------------------------------------------
    with torch.inference_mode():
        req_emit = (gill.decision_logits(last).argmax(-1) == gill.vocab_size).float().mean()
    n_img_q = min(len(scenes), 20)
    ordinary = [[{"role": "user", "content": q}] for q in OTHER_PROMPTS] + [
        [
            {
                "role": "user",
                "content": DESCRIBE_PROMPTS[i % len(DESCRIBE_PROMPTS)],
                "images": [scenes[i].image_path],
            }
        ]
        for i in range(n_img_q)
    ]
    fires = _opens_with_img(gill, ordinary)
    results["emission"] = {
        "requests": float(req_emit),
        "text_prompts": float(np.mean(fires[: len(OTHER_PROMPTS)])),
        "image_prompts": float(np.mean(fires[len(OTHER_PROMPTS) :])),
        "n_text_prompts": len(OTHER_PROMPTS),
        "n_image_prompts": n_img_q,
    }
    return results


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _auc_str(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def retrieval_table(r: dict[str, Any], images: str) -> list[str]:
    """The retrieval rows (percentages) of `r`'s "recall" and "clip_recall", over `images`."""
    rec = r["recall"]
    lines = [
        f"| text -> image, {r['n_images']} {images} | R@1 | R@5 | R@10 |",
        "| --- | ---: | ---: | ---: |",
        f"| GILL ([IMG0] state -> retrieval head) | {_pct(rec.get(1))} | {_pct(rec.get(5))} | "
        f"{_pct(rec.get(10))} |",
    ]
    if "clip_recall" in r:
        c = r["clip_recall"]
        lines.append(
            f"| reference: the preset's CLIP text tower | {_pct(c.get(1))} | {_pct(c.get(5))} | "
            f"{_pct(c.get(10))} |"
        )
    return lines


def format_tables(r: dict[str, Any]) -> str:
    """Markdown tables of `evaluate_gill`'s figures (percentages)."""
    lines = retrieval_table(r, f"ShapeWorld {r['split']} images")
    g = r["gen_prompts"]
    lines += [
        "",
        f"| generation, decoder's {g['split']} prompts ({r['num_inference_steps']} steps, "
        f"guidance {r['guidance_scale']}) | mapper prompt_embeds | decoder's own text "
        "encoding (upper bound) | n |",
        "| --- | ---: | ---: | ---: |",
        f"| single-object accuracy (judge) | {_pct(r['mapper_single_acc'])} | "
        f"{_pct(r['decoder_text_single_acc'])} | {g['single']} |",
        f"| two-object accuracy (judge) | {_pct(r['mapper_two_acc'])} | "
        f"{_pct(r['decoder_text_two_acc'])} | {g['two']} |",
        f"| CLIP image-text cosine | {r['mapper_clip_score']:.3f} | "
        f"{r['decoder_text_clip_score']:.3f} | {g['single'] + g['two']} |",
        f"| mean per-token distance to the decoder's encoding | "
        f"{r['generation_distance']:.2f} | 0 | {g['single'] + g['two']} |",
    ]
    d, e = r["decision"], r["emission"]
    lines += [
        "",
        "| decision (retrieve vs generate) | value | n |",
        "| --- | ---: | ---: |",
        f"| accuracy | {_pct(d['accuracy'])} | {d['n_retrieve'] + d['n_generate']} |",
        f"| macro-F1 | {_pct(d['macro_f1'])} | {d['n_retrieve'] + d['n_generate']} |",
        f"| scene requests -> retrieve | {_pct(d['retrieve_acc'])} | {d['n_retrieve']} |",
        f"| ... scenes of two objects | {_pct(d['retrieve_acc_two_objects'])} | "
        f"{d['n_two_object_scenes']} |",
        f"| ... scenes of three or more | {_pct(d['retrieve_acc_3plus_objects'])} | "
        f"{d['n_retrieve'] - d['n_two_object_scenes']} |",
        f"| composition requests -> generate | {_pct(d['generate_acc'])} | {d['n_generate']} |",
        f"| reference: the best rule on the object count alone, macro-F1 | "
        f"{_pct(d['count_rule_macro_f1'])} | {d['n_retrieve'] + d['n_generate']} |",
        f"| ROC AUC of the head's p(generate) (threshold-free) | {d['head_auc']:.3f} | "
        f"{d['n_retrieve'] + d['n_generate']} |",
        f"| ROC AUC of minus the best retrieval score in the index | "
        f"{d['index_score_auc']:.3f} | {d['n_retrieve'] + d['n_generate']} |",
        f"| ... on the requests naming two objects | "
        f"{_auc_str(d['index_score_auc_two_objects'])} | {d['n_two_object_requests']} |",
    ]
    if "clip_score_auc" in d:
        lines += [
            f"| ROC AUC of minus the best CLIP text-image cosine (reference) | "
            f"{_auc_str(d['clip_score_auc'])} | {d['n_retrieve'] + d['n_generate']} |",
            f"| ... on the requests naming two objects | "
            f"{_auc_str(d['clip_score_auc_two_objects'])} | {d['n_two_object_requests']} |",
        ]
    lines += [
        "",
        "| greedy reply opens with [IMG0] | rate | n |",
        "| --- | ---: | ---: |",
        f"| image requests (should) | {_pct(e['requests'])} | {d['n_retrieve']} |",
        f"| ordinary text-only prompts (should not) | {_pct(e['text_prompts'])} | "
        f"{e['n_text_prompts']} |",
        f"| ordinary image questions (should not) | {_pct(e['image_prompts'])} | "
        f"{e['n_image_prompts']} |",
    ]
    return "\n".join(lines)


def judge_from_args(
    preset: PolychromeConfig, args: argparse.Namespace, gen_root: Path
) -> GenerationJudge:
    """eval.generation's judge: the preset's CLIP and SAM (random weights from seed 0 where the
    preset has none, as the tiny preset)."""
    clip_cfg = preset.clip.replace(checkpoint=str(args.clip)) if args.clip else preset.clip
    sam_cfg = preset.sam.replace(checkpoint=str(args.sam)) if args.sam else preset.sam
    clip, preprocess, tokenizer = clip_from_preset(clip_cfg)
    sam = sam_from_preset(sam_cfg)
    try:
        manifest = read_manifest(gen_root)
        classes = [s["name"] for s in manifest["shapes"]]
        colours = [c["name"] for c in manifest["colours"]]
    except (FileNotFoundError, KeyError):
        classes, colours = list(SHAPES), list(COLOURS)
    return GenerationJudge(clip, preprocess, tokenizer, sam, classes, colours)


def add_generation_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """The options of a GILL evaluation that draws images: the model, the decoder, the sampler,
    the judge, and where the figures go (eval.gill, eval.gill_stories)."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="a GILL folder")
    parser.add_argument("--preset", default="shapes", help="preset: decoder, judge CLIP and SAM")
    parser.add_argument("--diffusion", type=Path, help="decoder checkpoint (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (preset's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance (preset's)")
    parser.add_argument("--clip", type=Path, help="judge CLIP checkpoint (default: the preset's)")
    parser.add_argument("--sam", type=Path, help="judge SAM checkpoint (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seeds (and drawing)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")


def load_for_generation(
    args: argparse.Namespace, judge_root: Path
) -> tuple[PolychromeConfig, GILLVLM, Any, GenerationJudge]:
    """(preset, GILL, the decoder pipeline with the preset's scheduler, the judge) from
    `add_generation_arguments`' options; the judge reads its vocabulary from `judge_root`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PolychromeConfig.from_preset(args.preset)
    gill = GILLVLM.from_pretrained(args.checkpoint, device=resolve_device(args.device)).eval()
    pipe = (
        load_pipeline(args.diffusion) if args.diffusion else pipeline_from_preset(preset.diffusion)
    )
    set_scheduler(pipe, preset.diffusion.scheduler)
    return preset, gill, pipe, judge_from_args(preset, args, judge_root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.gill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generation_arguments(parser, batch_size=16)
    src = parser.add_argument_group(
        "data (one of --data with --gen-data, --imagefolder, --images with --captions-json)"
    )
    src.add_argument("--data", type=Path, help="ShapeWorld folder (retrieval)")
    src.add_argument("--split", default="test", help="its split (default test)")
    add_caption_arguments(src, "captions: retrieval only")
    parser.add_argument(
        "--limit",
        "--n",
        dest="n",
        type=int,
        default=200,
        help="first N images, indexed and queried (--n: its earlier name, kept)",
    )
    parser.add_argument("--gen-data", type=Path, help="the decoder's data folder (with --data)")
    parser.add_argument("--gen-split", default="val", help="its held-out split (default val)")
    parser.add_argument("--single", type=int, default=25, help="one-object prompts")
    parser.add_argument("--two", type=int, default=25, help="two-object prompts")
    parser.add_argument("--no-clip-reference", action="store_true", help="skip the CLIP row")
    parser.add_argument("--grid", type=Path, help="PNG: mapper images above decoder-text ones")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error(f"--limit must be >= 2, received {args.n}")
    why = caption_source_error(args)
    if why:
        parser.error(why)
    if args.data is None:
        return own_retrieval(parser, args, argv)
    if args.single < 0 or args.two < 0 or args.single + args.two < 1:
        parser.error(
            f"--single and --two must be >= 0 and give at least one generation prompt (the "
            f"decision is scored on them too), received {args.single} and {args.two}"
        )
    if args.gen_data is None:
        parser.error("--data needs --gen-data (the decoder's data folder, for the generations)")
    preset, gill, pipe, judge = load_for_generation(args, args.gen_data)
    reference = None
    if not args.no_clip_reference:
        reference, _ = clip_embedder(args.preset, args.clip)
    results = evaluate_gill(
        gill,
        pipe,
        judge,
        reference,
        args.data,
        args.split,
        args.n,
        args.gen_data,
        args.gen_split,
        args.single,
        args.two,
        num_inference_steps=args.steps or preset.diffusion.num_inference_steps,
        guidance_scale=args.guidance or preset.diffusion.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(format_tables(results))
    if args.grid is not None:
        from generation.diffusion import image_grid

        mapped, own = results["_mapper_images"], results["_decoder_text_images"]
        cols = min(len(mapped), 10)
        image_grid([*mapped[:cols], *own[:cols]], columns=cols).save(args.grid)
    write_results(args, results, "eval.gill", argv)
    return 0


def own_retrieval(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None
) -> int:
    """eval.gill on a user's captioned images: retrieval only (module docstring)."""
    try:
        pairs = user_captions_to_evaluate(args, args.n)  # one index entry per file
    except (ValueError, OSError) as err:  # bad data: said before the model loads
        parser.error(str(err))
    if len(pairs) < 2:
        parser.error(f"need at least 2 captioned images to retrieve among, found {len(pairs)}")
    paths, captions = pairs.image_paths, pairs.captions
    if args.threads:
        torch.set_num_threads(args.threads)
    gill = GILLVLM.from_pretrained(args.checkpoint, device=resolve_device(args.device)).eval()
    scenes = scenes_from_pairs(paths, captions)  # each requested by its first caption
    results: dict[str, Any] = {"n_images": len(scenes)}
    results["recall"], _, _ = retrieval_recall(gill, scenes, args.batch_size, not args.no_progress)
    if not args.no_clip_reference:
        results["clip_recall"], _ = clip_recall(clip_embedder(args.preset, args.clip)[0], scenes)
    where = args.imagefolder or args.captions_json
    print("\n".join(retrieval_table(results, f"images of {where} (first caption each)")))
    write_results(args, results, "eval.gill", argv, data=str(where))
    return 0


def write_results(
    args: argparse.Namespace,
    results: dict[str, Any],
    module: str,
    argv: list[str] | None,
    **extra: Any,
) -> None:
    """``--json``, when given: the figures (keys starting with "_" left out), the checkpoint,
    `extra`, and the command that made them."""
    if args.json is None:
        return
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    public.update(checkpoint=str(args.checkpoint), **extra)
    public["command"] = f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)
    atomic_write_text(args.json, json.dumps(public, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
