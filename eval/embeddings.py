"""Sentence-embedding figures: pooling methods on a frozen LM, and the 2DMSE (layer x dim) grid.

    # every pooling method (mean, last, weighted_mean, eos, PromptEOL) on SmolLM2 and on MiniLM
    python -m eval.embeddings pooling --model smollm2-135m-instruct --out out/embeddings
    python -m eval.embeddings pooling --model minilm-l6 --out out/embeddings
    # the (layer x dim) grid of encoders trained by train.embeddings, against untrained MiniLM
    python -m eval.embeddings grid --checkpoint 2dmse=out/emb/2dmse/final \\
        --checkpoint mrl=out/emb/mrl/final --checkpoint full=out/emb/full/final \\
        --baseline minilm-l6 --out out/embeddings
    # seconds, on the tiny random model (the smoke test)
    python -m eval.embeddings pooling --model tiny-random-llama --passages 12 --sts-scenes 20 \\
        --sts-pairs 5 --out /tmp/emb

Data (offline):

- Retrieval, real text: data.text_corpora.pydoc_passages() (the stdlib's pydoc topics, split at
  section headings). Two queries per passage, scored separately: its title ("The assert
  statement") and its first sentence (removed from the passage). Each query ranks every passage of
  the set by cosine similarity; one positive. recall@1, recall@10 (eval.metrics.recall_at_k) and
  MRR, ties broken pessimistically (a tie with a negative ranks the positive below it). ``pooling``
  uses every passage (the model was never trained on them); ``grid`` uses the topics the trained
  checkpoints held out (read from their ``training.json``; they must agree).
- STS-style, synthetic text: caption pairs of ShapeWorld scenes (data.shapeworld, ``val`` split,
  --sts-scenes scenes, seed --seed; train.embeddings trains on ``pretrain`` scenes). The gold
  similarity of two captions is the overlap of their scenes' object sets, each object reduced to
  its (colour, class): |A ∩ B| / |A ∪ B| (Jaccard), so 1.0 for two captions of the same scene,
  graded for scenes sharing some objects, 0 for none. Only captions that name at least one of
  their scene's objects by colour and class ("a red circle ...") are used; captions that say only
  "three shapes on a plain background" carry no object to compare. Pairs come in three equal
  strata of --sts-pairs each: two different captions of one scene (gold 1), captions of two
  scenes that share objects (0 < gold < 1, or 1 when the sets are equal), and of two scenes that
  share none (gold 0). Score: Spearman's rho between cosine similarity and gold.

Methods (``pooling``): lm.embeddings.LMEmbedder on the model's last layer: ``mean``, ``last``,
``weighted_mean`` (SGPT), ``eos`` (an EOS / SEP appended) and ``prompteol`` (PromptEOL's template,
last token). The three poolings of the plain text share one forward pass per batch.

``grid``: every layer 1..L x every width (--dims, default the checkpoints' dims plus the full
width) of each checkpoint (lm.embeddings.Matryoshka2dEncoder) and of each --baseline source
(mean pooling, no training): retrieval on the held-out passages (title and sentence queries
together) and STS.

Outputs in --out: embeddings_grid.{json,md,png} (a heatmap) or
embeddings_pooling_<model>[_<methods>].{json,md} (methods named when --methods is a subset): the
JSON holds every figure, the markdown the tables.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from tqdm import tqdm

from core.io import atomic_write_text
from core.runtime import resolve_device, seed_everything
from data.render import LayoutConfig
from data.scene import Scene
from data.shapeworld import generate_scene
from data.text_corpora import Passage, pydoc_passages, python_version
from eval.metrics import recall_at_k
from lm.embeddings import LMEmbedder, Matryoshka2dConfig, Matryoshka2dEncoder, pool

# method -> (pooling, prompt)
METHODS: dict[str, tuple[str, str | None]] = {
    "mean": ("mean", None),
    "last": ("last", None),
    "weighted_mean": ("weighted_mean", None),
    "eos": ("eos", None),
    "prompteol": ("last", "prompteol"),
}
QUERY_KINDS = ("title", "sentence")


# --------------------------------------------------------------------------------------------
# Metrics


def mean_reciprocal_rank(scores: npt.ArrayLike, positives: npt.ArrayLike) -> float:
    """Mean of 1 / (1 + rank) of each query's one positive, ties broken pessimistically.

    scores: (Q, N), higher = more similar. positives: (Q,) index of each query's positive.
    rank = #items scoring above the positive + #other items tying with it (0 = first).
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives)
    if s.ndim != 2 or pos.shape != (s.shape[0],):
        raise ValueError(
            f"expected scores (Q, N) and positives (Q,), received {s.shape}, {pos.shape}"
        )
    if not ((pos >= 0) & (pos < s.shape[1])).all():
        raise ValueError(f"positive indices must be in [0, {s.shape[1]})")
    best = s[np.arange(len(pos)), pos][:, None]  # (Q, 1)
    rank = (s > best).sum(1) + (s == best).sum(1) - 1
    return float(np.mean(1.0 / (1.0 + rank)))


def retrieval_metrics(q: torch.Tensor, p: torch.Tensor, positives: list[int]) -> dict[str, float]:
    """recall@1, recall@10 and MRR of (Q, D) query and (N, D) passage embeddings (unit rows)."""
    scores = (q @ p.T).numpy()
    k = min(10, p.shape[0])
    recall = recall_at_k(scores, np.asarray(positives), ks=(1, k))
    return {
        "recall@1": recall[1],
        "recall@10": recall[k],
        "mrr": mean_reciprocal_rank(scores, positives),
    }


def spearman(pred: npt.ArrayLike, gold: npt.ArrayLike) -> float:
    rho = spearmanr(np.asarray(pred), np.asarray(gold)).statistic
    return float(rho)


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class RetrievalSet:
    """Queries with the index of their passage in `passages`."""

    passages: list[str]
    queries: list[str]
    kinds: list[str]  # "title" | "sentence", per query
    positives: list[int]


def retrieval_set(passages: list[Passage], topics: set[str] | None = None) -> RetrievalSet:
    """Both queries of every passage (of `topics`, when given); duplicate passage texts merged."""
    chosen = [p for p in passages if topics is None or p.topic in topics]
    if not chosen:
        raise ValueError(f"no pydoc passage in topics {sorted(topics or [])[:5]}")
    texts = list(dict.fromkeys(p.text for p in chosen))
    index = {t: i for i, t in enumerate(texts)}
    queries, kinds, positives = [], [], []
    for p in chosen:
        for kind, q in zip(QUERY_KINDS, (p.title, p.query), strict=True):
            queries.append(q)
            kinds.append(kind)
            positives.append(index[p.text])
    return RetrievalSet(texts, queries, kinds, positives)


def scene_objects(scene: Scene) -> frozenset[tuple[str, str]]:
    """The scene's objects as a set of (colour, class)."""
    return frozenset((o.colour, o.shape) for o in scene.objects)


def object_overlap(a: frozenset[tuple[str, str]], b: frozenset[tuple[str, str]]) -> float:
    """Jaccard overlap |a ∩ b| / |a ∪ b| of two (colour, class) sets: the STS gold."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def names_an_object(caption: str, objects: frozenset[tuple[str, str]]) -> bool:
    """Whether the caption names one of the objects by colour and class ("red circle(s)")."""
    text = caption.lower()
    return any(re.search(rf"\b{colour} {shape}", text) for colour, shape in objects)


@dataclass(frozen=True)
class StsPair:
    a: str
    b: str
    gold: float
    stratum: str  # "same" | "overlap" | "disjoint"


def sts_pairs(n_scenes: int, per_stratum: int, seed: int) -> list[StsPair]:
    """Caption pairs of ShapeWorld ``val`` scenes in three strata (see the module docstring)."""
    layout = LayoutConfig(image_size=64)
    scenes = [generate_scene(layout, seed, "val", i) for i in range(n_scenes)]
    objects = [scene_objects(s) for s in scenes]
    captions = [
        [c for c in dict.fromkeys(s.captions) if names_an_object(c, objects[i])]
        for i, s in enumerate(scenes)
    ]
    rng = np.random.default_rng(seed)
    pairs = []
    two = [i for i in range(n_scenes) if len(captions[i]) >= 2]
    for i in rng.permutation(two)[:per_stratum]:
        a, b = rng.choice(len(captions[i]), size=2, replace=False)
        pairs.append(StsPair(captions[i][a], captions[i][b], 1.0, "same"))
    usable = [i for i in range(n_scenes) if captions[i]]
    cross: dict[str, list[tuple[int, int]]] = {"overlap": [], "disjoint": []}
    for x, i in enumerate(usable):
        for j in usable[x + 1 :]:
            cross["overlap" if objects[i] & objects[j] else "disjoint"].append((i, j))
    for stratum, candidates in cross.items():
        for k in rng.permutation(len(candidates))[:per_stratum]:
            i, j = candidates[k]
            a = captions[i][rng.integers(len(captions[i]))]
            b = captions[j][rng.integers(len(captions[j]))]
            pairs.append(StsPair(a, b, object_overlap(objects[i], objects[j]), stratum))
    if len({p.gold for p in pairs}) < 2:
        raise ValueError(
            f"{n_scenes} scenes gave no spread of gold similarities; raise --sts-scenes"
        )
    return pairs


def sts_score(pairs: list[StsPair], emb: dict[str, torch.Tensor]) -> float:
    """Spearman's rho of cosine(a, b) against gold; `emb` maps caption -> unit embedding."""
    cos = [float(emb[p.a] @ emb[p.b]) for p in pairs]
    return spearman(cos, [p.gold for p in pairs])


# --------------------------------------------------------------------------------------------
# pooling: every method on one frozen model


def encode_methods(
    base: LMEmbedder, methods: list[str], texts: list[str], batch_size: int, desc: str
) -> dict[str, torch.Tensor]:
    """(N, D) unit embeddings of `texts` for every method; the methods that read the same input
    (mean, last, weighted_mean on the plain text) share one forward pass per batch. Each equals
    ``LMEmbedder(model, tokenizer, pooling, prompt).encode(texts)``."""
    groups: dict[tuple[str | None, bool], list[str]] = {}
    for m in methods:
        pooling, prompt = METHODS[m]
        groups.setdefault((prompt, pooling == "eos"), []).append(m)
    out: dict[str, torch.Tensor] = {}
    for (prompt, _), names in groups.items():
        emb = LMEmbedder(
            base.model,
            base.tokenizer,
            pooling=METHODS[names[0]][0],
            prompt=prompt,
            max_length=base.max_length,
            padding_side=base.padding_side,
        )
        ids = emb.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        result = {n: torch.empty(len(texts), emb.hidden_size) for n in names}
        starts = range(0, len(order), batch_size)
        with torch.no_grad():
            for s in tqdm(starts, desc=f"{desc} {'/'.join(names)}", unit="batch", leave=False):
                idx = order[s : s + batch_size]
                input_ids, mask = emb.pad([ids[i] for i in idx])
                mask = mask.to(emb.device)
                hidden = emb.hidden_states(input_ids.to(emb.device), mask)[-1]
                for n in names:
                    result[n][idx] = F.normalize(pool(hidden, mask, METHODS[n][0]).cpu(), dim=-1)
        out.update(result)
    return out


def run_pooling(args: argparse.Namespace) -> dict[str, Any]:
    base = LMEmbedder.from_source(args.model, device=str(args.device), max_length=args.max_length)
    passages = pydoc_passages()[: args.passages]
    rset = retrieval_set(passages)
    pairs = sts_pairs(args.sts_scenes, args.sts_pairs, args.seed)
    captions = sorted({p.a for p in pairs} | {p.b for p in pairs})
    texts = rset.passages + rset.queries + captions
    t0 = time.perf_counter()
    emb = encode_methods(base, args.methods, texts, args.batch_size, args.model)
    seconds = time.perf_counter() - t0
    n_p, n_q = len(rset.passages), len(rset.queries)
    rows = []
    for m in args.methods:
        p, q, c = emb[m][:n_p], emb[m][n_p : n_p + n_q], emb[m][n_p + n_q :]
        row: dict[str, Any] = {"method": m}
        for kind in QUERY_KINDS:
            sel = [i for i, k in enumerate(rset.kinds) if k == kind]
            metrics = retrieval_metrics(q[sel], p, [rset.positives[i] for i in sel])
            row.update({f"{kind}_{k}": v for k, v in metrics.items()})
        row["sts_spearman"] = sts_score(pairs, dict(zip(captions, c, strict=True)))
        rows.append(row)
    return {
        "model": args.model,
        "layers": base.num_layers,
        "hidden_size": base.hidden_size,
        "padding_side": base.padding_side,
        "max_length": args.max_length,
        "passages": n_p,
        "queries": n_q,
        "sts_pairs": len(pairs),
        "sts_strata": {
            s: sum(p.stratum == s for p in pairs) for s in ("same", "overlap", "disjoint")
        },
        "python": python_version(),
        "encode_seconds": seconds,
        "rows": rows,
    }


def pooling_markdown(r: dict[str, Any], header: str) -> str:
    lines = [
        f"### {header}",
        "",
        "| method | title R@1 | title R@10 | title MRR | sentence R@1 | sentence R@10 | "
        "sentence MRR | STS ρ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        cells = [
            f"{row[f'{kind}_{k}']:.3f}"
            for kind in QUERY_KINDS
            for k in ("recall@1", "recall@10", "mrr")
        ]
        lines.append(
            f"| {row['method']} | " + " | ".join(cells) + f" | {row['sts_spearman']:.3f} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# grid: (layer x dim) of Matryoshka encoders


def _heldout_topics(checkpoints: dict[str, Path]) -> set[str]:
    topics: set[str] | None = None
    for name, path in checkpoints.items():
        file = path / "training.json"
        if not file.is_file():
            raise ValueError(f"checkpoint {name}: {file} not found (written by train.embeddings)")
        held = set(json.loads(file.read_text(encoding="utf-8"))["heldout_topics"])
        if topics is not None and held != topics:
            raise ValueError(
                f"checkpoint {name} held out other pydoc topics than the ones before it; "
                "train every compared checkpoint with the same --heldout-every"
            )
        topics = held
    if topics is None:
        raise ValueError("grid needs at least one --checkpoint (its held-out topics)")
    return topics


def _parse_checkpoints(specs: list[str]) -> dict[str, Path]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--checkpoint must be NAME=FOLDER, received {spec!r}")
        if name in out:
            raise ValueError(f"--checkpoint name {name!r} given twice")
        out[name] = Path(path)
    return out


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    checkpoints = _parse_checkpoints(args.checkpoint)
    topics = _heldout_topics(checkpoints)
    rset = retrieval_set(pydoc_passages(), topics)
    pairs = sts_pairs(args.sts_scenes, args.sts_pairs, args.seed)
    captions = sorted({p.a for p in pairs} | {p.b for p in pairs})
    encoders: dict[str, Matryoshka2dEncoder] = {}
    for name, path in checkpoints.items():
        encoders[name] = Matryoshka2dEncoder.from_pretrained(path, device=args.device)
    dims = set(args.dims or [])
    for enc in encoders.values():
        dims |= set(args.dims or enc.config.dims) | {enc.hidden_size}
    for source in args.baseline:
        # dims are a training setting: an untrained encoder is read at the grid's widths
        cfg = Matryoshka2dConfig(max_length=next(iter(encoders.values())).config.max_length)
        enc = Matryoshka2dEncoder.from_source(source, cfg).eval()
        enc.to(args.device)
        encoders[f"{source} (no training)"] = enc
    models: dict[str, Any] = {}
    for name, enc in encoders.items():
        n_p, n_q = len(rset.passages), len(rset.queries)
        texts = rset.passages + rset.queries + captions
        all_layers = enc.embedder.encode_layers(texts, args.batch_size, progress=True)
        widths = sorted(d for d in dims if d <= enc.hidden_size)
        cells = []
        for layer in range(1, enc.num_layers + 1):
            for d in widths:
                e = F.normalize(all_layers[layer, :, :d], dim=-1)
                p, q, c = e[:n_p], e[n_p : n_p + n_q], e[n_p + n_q :]
                cell = {"layer": layer, "dim": d, **retrieval_metrics(q, p, rset.positives)}
                cell["sts_spearman"] = sts_score(pairs, dict(zip(captions, c, strict=True)))
                cells.append(cell)
        models[name] = {
            "objective": enc.config.objective if name in checkpoints else "none (pretrained)",
            "path": str(checkpoints.get(name, "")),
            "layers": enc.num_layers,
            "hidden_size": enc.hidden_size,
            "widths": widths,
            "cells": cells,
        }
    return {
        "heldout_topics": sorted(topics),
        "passages": len(rset.passages),
        "queries": len(rset.queries),
        "sts_pairs": len(pairs),
        "python": python_version(),
        "models": models,
    }


GRID_METRICS = (("mrr", "retrieval MRR"), ("recall@1", "retrieval R@1"), ("sts_spearman", "STS ρ"))


def grid_markdown(r: dict[str, Any], header: str) -> str:
    lines = [f"### {header}", ""]
    widths = sorted({w for m in r["models"].values() for w in m["widths"]})
    # summary: full model, and the mean over the grid
    lines += [
        "| model | MRR at (last layer, full dim) | mean MRR over the grid | STS ρ at (last, full) "
        "| mean STS ρ over the grid |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in r["models"].items():
        full = [c for c in m["cells"] if c["layer"] == m["layers"] and c["dim"] == m["hidden_size"]]
        mean = {k: float(np.mean([c[k] for c in m["cells"]])) for k in ("mrr", "sts_spearman")}
        lines.append(
            f"| {name} | {full[0]['mrr']:.3f} | {mean['mrr']:.3f} | "
            f"{full[0]['sts_spearman']:.3f} | {mean['sts_spearman']:.3f} |"
        )
    for key, label in GRID_METRICS:
        lines += [
            "",
            f"{label} (rows: model and layer, columns: dims):",
            "",
            "| model | layer | " + " | ".join(str(w) for w in widths) + " |",
            "|---|---:|" + "---:|" * len(widths),
        ]
        for name, m in r["models"].items():
            for layer in range(1, m["layers"] + 1):
                by_dim = {c["dim"]: c[key] for c in m["cells"] if c["layer"] == layer}
                vals = [f"{by_dim[w]:.3f}" if w in by_dim else "" for w in widths]
                lines.append(f"| {name} | {layer} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def grid_plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["models"])
    fig, axes = plt.subplots(
        2, len(names), figsize=(3.2 * len(names), 5.6), squeeze=False, constrained_layout=True
    )
    for col, name in enumerate(names):
        m = r["models"][name]
        for row, (key, label) in enumerate((GRID_METRICS[0], GRID_METRICS[2])):
            grid = np.full((m["layers"], len(m["widths"])), np.nan)
            for c in m["cells"]:
                grid[c["layer"] - 1, m["widths"].index(c["dim"])] = c[key]
            ax = axes[row, col]
            im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(m["widths"])), [str(w) for w in m["widths"]], fontsize=7)
            ax.set_yticks(range(m["layers"]), [str(i + 1) for i in range(m["layers"])])
            ax.set_title(f"{name}\n{label}", fontsize=8)
            ax.set_xlabel("dim")
            ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.embeddings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="output folder")
    common.add_argument("--max-length", type=int, default=128, help="tokens per text (pooling)")
    common.add_argument("--batch-size", type=int, default=16)
    common.add_argument("--sts-scenes", type=int, default=300, help="ShapeWorld val scenes")
    common.add_argument("--sts-pairs", type=int, default=150, help="caption pairs per stratum")
    common.add_argument("--seed", type=int, default=0, help="ShapeWorld seed and pair draws")
    common.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p = sub.add_parser("pooling", parents=[common], help="every pooling method on one model")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model source (core.sources)")
    p.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods"
    )
    p.add_argument("--passages", type=int, default=None, help="first N pydoc passages (all)")
    g = sub.add_parser("grid", parents=[common], help="(layer x dim) grid of trained encoders")
    g.add_argument(
        "--checkpoint", action="append", default=[], help="NAME=FOLDER (train.embeddings final/)"
    )
    g.add_argument(
        "--baseline", action="append", default=[], help="untrained encoder source, mean pooling"
    )
    g.add_argument("--dims", type=int, nargs="+", default=None, help="widths (default: trained)")
    return parser


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_length < 8:
        parser.error("--batch-size must be >= 1 and --max-length >= 8")
    if args.sts_scenes < 3 or args.sts_pairs < 1:
        parser.error("--sts-scenes must be >= 3 and --sts-pairs >= 1")
    if args.what == "grid" and not args.checkpoint:
        parser.error("grid needs at least one --checkpoint NAME=FOLDER")
    if args.what == "pooling" and args.passages is not None and args.passages < 2:
        parser.error("--passages must be >= 2")
    args.device = resolve_device(args.device)
    seed_everything(args.seed)
    t0 = time.perf_counter()
    try:
        if args.what == "pooling":
            result = run_pooling(args)
            header = (
                f"Pooling methods on {args.model} (frozen, last layer): retrieval over "
                f"{result['passages']} pydoc passages (Python {result['python']}), STS over "
                f"{result['sts_pairs']} ShapeWorld caption pairs"
            )
            text = pooling_markdown(result, header)
            name = f"embeddings_pooling_{_slug(args.model)}"
            if args.methods != list(METHODS):  # a subset: its own files
                name += "_" + "-".join(args.methods)
        else:
            result = run_grid(args)
            header = (
                f"(layer x dim) grid: retrieval over {result['passages']} held-out pydoc passages "
                f"({result['queries']} queries), STS over {result['sts_pairs']} ShapeWorld "
                "caption pairs"
            )
            text = grid_markdown(result, header)
            name = "embeddings_grid"
    except ValueError as err:
        parser.error(str(err))
    result = {
        "command": f"python -m eval.embeddings {shlex.join(argv)}",
        "header": header,
        "seconds": time.perf_counter() - t0,
        **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / f"{name}.md", text)
    if args.what == "grid":
        grid_plot(result, args.out / f"{name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
