"""Train Disambiguated Skip-gram (K senses) and a single-sense skip-gram on pydoc text with
pseudo-words, and measure how well the senses recover which word each pseudo-word occurrence was.

    python -m train.sense_skipgram --out out/sense_skipgram          # the documented run
    python -m train.sense_skipgram --out out/sense_skipgram_random --pairing random \
        --min-pair-count 60                                          # random pairs: harder
    python -m train.sense_skipgram --out out/sense_skipgram --pairs 8 --senses 2 --dim 50 \
        --window 5 --epochs 12 --seeds 0 1 2 --pairing topical --min-pair-count 30
    python -m train.sense_skipgram --out /tmp/ssg --pairs 2 --epochs 1 --seeds 0 --dim 8 \
        --max-words 4000 --min-pair-count 10 --pairing random       # seconds: smoke

Data: the stdlib's pydoc topics (``pydoc_data.topics``), lowercased, split into words of letters
(``[a-z]+``), topics concatenated in sorted order; English stop words (scikit-learn's list) are
removed (--keep-stop-words keeps them) and so are words seen fewer than --min-count times
(word2vec practice). Pseudo-words (Schütze 1998; Gale, Church & Yarowsky 1992): --pairs pairs of
words (a, b), from the words that are not stop words, have >= 3 letters and occur between
--min-pair-count and --max-pair-count times; every occurrence of a or of b is replaced by one new
token "a_b". The truth for evaluation is which of the two each occurrence was. Pairing
(--pairing, --pair-seed):

- ``topical`` (default): only words with at least half their occurrences in one pydoc topic, and
  the two words of a pair from two different topics (like Schütze's banana/door: two meanings
  far apart);
- ``random``: any two candidate words. In pydoc most frequent words are used alike
  ("expression", "module", "value"), so the two halves of a random pair are often not
  distinguishable from their contexts at all.

Models (lm.embeddings.sense_skipgram), trained on the same windows and negatives:

- Disambiguated Skip-gram with --senses senses per word;
- skip-gram (the same model with one sense).

Evaluation, per pseudo-word, over all its occurrences (the model sees the same windows it trained
on; nothing tells it which word an occurrence was):

- Disambiguated Skip-gram: each occurrence goes to its most probable sense;
- single-sense skip-gram: one sense, so every occurrence falls in one cluster;
- skip-gram + k-means: Schütze's context clustering, k-means (k = --senses) on the mean of the
  single-sense model's vectors of the context words; a stronger baseline than one sense.

Scores: adjusted Rand index between the clusters and the truth (0 = chance, 1 = perfect) and
accuracy under the best one-to-one sense-to-word mapping (a single cluster scores the majority
word's share). Means over pairs, then mean and range over --seeds.

Outputs in --out: sense_skipgram.json, .md, .png, stages/ (the trained models; --resume reuses).
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
from sklearn.metrics import adjusted_rand_score
from tqdm import tqdm

from core.runtime import seed_everything
from lm.embeddings.sense_skipgram import (
    DisambiguatedSkipGram,
    SenseSkipGramConfig,
    skipgram_windows,
)
from train.common import DataParallel, batch_indices
from train.decoding_common import train_stage, write_report

WORD = re.compile(r"[a-z]+")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.sense_skipgram",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=8, help="pseudo-words")
    parser.add_argument("--pair-seed", type=int, default=0)
    parser.add_argument("--pairing", choices=("random", "topical"), default="topical")
    parser.add_argument("--min-pair-count", type=int, default=30)
    parser.add_argument("--max-pair-count", type=int, default=400)
    parser.add_argument("--min-count", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=0, help="first N words only; 0 = all")
    parser.add_argument(
        "--keep-stop-words", action="store_true", help="keep English stop words in the text"
    )
    parser.add_argument("--senses", type=int, default=2)
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--negatives", type=int, default=5)
    parser.add_argument("--entropy-weight", type=float, default=0.0)
    parser.add_argument(
        "--gumbel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="training: Gumbel-softmax sense selection (--no-gumbel: the plain softmax)",
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resume", action="store_true", help="reuse trained models in --out")
    return parser


def pydoc_words(max_words: int = 0) -> tuple[list[str], list[str]]:
    """The words of every pydoc topic (sorted topic order) and the topic each word came from."""
    from pydoc_data.topics import topics

    pairs = [(w, key) for key in sorted(topics) for w in WORD.findall(topics[key].lower())]
    pairs = pairs[:max_words] if max_words else pairs
    return [w for w, _ in pairs], [t for _, t in pairs]


def pick_pairs(
    words: list[str], topics: list[str], args: argparse.Namespace
) -> list[tuple[str, str]]:
    """--pairs pseudo-word pairs (module docstring, --pairing)."""
    counts = Counter(words)
    candidates = sorted(
        w
        for w, c in counts.items()
        if args.min_pair_count <= c <= args.max_pair_count
        and len(w) >= 3
        and w not in ENGLISH_STOP_WORDS
    )
    rng = np.random.default_rng(args.pair_seed)
    if args.pairing == "random":
        if len(candidates) < 2 * args.pairs:
            raise ValueError(
                f"{len(candidates)} candidate words; {args.pairs} pairs need {2 * args.pairs}"
            )
        picked = rng.choice(candidates, size=2 * args.pairs, replace=False).tolist()
        return list(zip(picked[0::2], picked[1::2], strict=True))
    by_topic: dict[str, Counter[str]] = {}
    for w, t in zip(words, topics, strict=True):
        by_topic.setdefault(w, Counter())[t] += 1
    home = {}  # word -> its dominant topic, for words with >= half their uses there
    for w in candidates:
        topic, n = by_topic[w].most_common(1)[0]
        if n >= counts[w] / 2:
            home[w] = topic
    order = rng.permutation(sorted(home)).tolist()
    pairs: list[tuple[str, str]] = []
    used: set[str] = set()
    for w in order:  # greedily: each word's partner is the next unused word of another topic
        if w in used:
            continue
        partner = next((u for u in order if u not in used and home[u] != home[w]), None)
        if partner is None:
            break
        pairs.append((w, partner))
        used |= {w, partner}
        if len(pairs) == args.pairs:
            return pairs
    raise ValueError(
        f"only {len(pairs)} pairs of topical words (>= half their uses in one pydoc topic) "
        f"from two topics; asked for {args.pairs}"
    )


def best_mapping_accuracy(clusters: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Accuracy of the best one-to-one map from k clusters to the 2 true words (brute force)."""
    best = 0.0
    for perm in itertools.permutations(range(max(k, 2))):
        mapped = np.asarray(perm)[clusters]
        best = max(best, float((mapped == truth).mean()))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if min(args.pairs, args.senses, args.dim, args.window, args.epochs, args.negatives) < 1:
        parser.error("--pairs, --senses, --dim, --window, --epochs, --negatives must be >= 1")
    t0 = time.perf_counter()
    words, topics = pydoc_words(args.max_words)
    counts = Counter(words)
    pairs = pick_pairs(words, topics, args)
    merged = {w: f"{a}_{b}" for a, b in pairs for w in (a, b)}
    origin = {w: int(w == b) for a, b in pairs for w in (a, b)}  # 0: a, 1: b
    kept = [
        w
        for w in words
        if counts[w] >= args.min_count and (args.keep_stop_words or w not in ENGLISH_STOP_WORDS)
    ]
    stream_words = [merged.get(w, w) for w in kept]
    truth_at = np.array([origin.get(w, -1) for w in kept])
    vocab = sorted(set(stream_words))
    index = {w: i for i, w in enumerate(vocab)}
    stream = np.array([index[w] for w in stream_words])
    centers, contexts, mask = skipgram_windows(stream, args.window)
    freq = torch.from_numpy(np.bincount(stream, minlength=len(vocab)).astype(np.float64))
    noise = freq**0.75  # word2vec's noise distribution
    steps = args.epochs * (len(stream) // args.batch_size)
    print(
        f"{len(stream)} words, vocabulary {len(vocab)}; pseudo-words: "
        + ", ".join(f"{a}_{b} ({counts[a]}+{counts[b]})" for a, b in pairs)
    )

    def train_and_score(seed: int) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
        """The K-sense and the one-sense model of one seed, and their scores per method."""
        stats: dict[str, Any] = {}
        models = {}
        for senses in (args.senses, 1):
            seed_everything(seed)
            cfg = SenseSkipGramConfig(
                vocab_size=len(vocab),
                dim=args.dim,
                senses=senses,
                gumbel=args.gumbel,
                entropy_weight=args.entropy_weight,
            )
            model = DisambiguatedSkipGram(cfg)
            order = batch_indices(len(stream), args.batch_size, seed)
            gen = torch.Generator().manual_seed(seed)

            def step_loss(
                step: int,
                model: DisambiguatedSkipGram = model,
                order: Any = order,
                gen: torch.Generator = gen,
            ) -> torch.Tensor:
                idx = torch.from_numpy(next(order))
                c, ctx, m = centers[idx], contexts[idx], mask[idx]
                neg = torch.multinomial(noise, ctx.numel() * args.negatives, True, generator=gen)
                return model(c, ctx, m, neg.view(*ctx.shape, args.negatives)).loss

            name = f"senses{senses}_seed{seed}"
            config = {
                "sense_skipgram": cfg.to_dict(),
                "vocabulary": vocab,
                "pairs": pairs,
                "steps": steps,
                "lr": args.lr,
                "window": args.window,
                "negatives": args.negatives,
                "seed": seed,
                "max_words": args.max_words,
                "min_count": args.min_count,
            }
            stats[name] = train_stage(
                name,
                model,
                model.parameters(),
                step_loss,
                steps=steps,
                lr=args.lr,
                out=args.out,
                config=config,
                resume=args.resume,
            )
            models[senses] = model

        scores = evaluate(
            models, args, pairs, index, stream, truth_at, centers, contexts, mask, seed
        )
        return stats, scores

    # Under accelerate launch the seeds are shared out over the processes (decoding_common).
    dp = DataParallel(torch.device("cpu"))
    runs = dp.collect([(i, train_and_score(seed)) for i, seed in dp.mine(args.seeds, "seeds")])
    results: dict[str, dict[str, list[float]]] = {}
    per_pair: dict[str, dict[str, list[float]]] = {}
    training: dict[str, Any] = {}
    for stats, scores in runs:
        training.update(stats)
        for method, per in scores.items():
            results.setdefault(method, {}).setdefault("ari", []).append(
                statistics.fmean(per["ari"])
            )
            results[method].setdefault("accuracy", []).append(statistics.fmean(per["accuracy"]))
            for key in ("ari", "accuracy"):  # seed-major: pair i of every seed at i::pairs
                per_pair.setdefault(method, {}).setdefault(key, []).extend(per[key])

    summary = {
        method: {
            key: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}
            for key, v in metrics.items()
        }
        for method, metrics in results.items()
    }
    by_pair = {
        method: {
            key: [statistics.fmean(v[i :: len(pairs)]) for i in range(len(pairs))]
            for key, v in metrics.items()
        }
        for method, metrics in per_pair.items()
    }
    result = {
        "command": "python -m train.sense_skipgram " + shlex.join(argv),
        "data": {
            "corpus": "pydoc_data.topics, lowercased [a-z]+ words",
            "words": len(stream),
            "vocabulary": len(vocab),
            "pairs": [
                {"pseudo_word": f"{a}_{b}", "counts": [counts[a], counts[b]]} for a, b in pairs
            ],
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        },
        "summary": summary,
        "by_pair": by_pair,
        "training": training,
        "seconds": time.perf_counter() - t0,
    }
    write_report(args.out, "sense_skipgram", result, markdown(result), lambda p: plot(result, p))
    return 0


@torch.no_grad()
def evaluate(
    models: dict[int, DisambiguatedSkipGram],
    args: argparse.Namespace,
    pairs: list[tuple[str, str]],
    index: dict[str, int],
    stream: np.ndarray,
    truth_at: np.ndarray,
    centers: torch.Tensor,
    contexts: torch.Tensor,
    mask: torch.Tensor,
    seed: int,
) -> dict[str, dict[str, list[float]]]:
    """Per method, per pair: ARI and best-mapping accuracy of the occurrences' clusters."""
    multi, single = models[args.senses].eval(), models[1].eval()
    out: dict[str, dict[str, list[float]]] = {}

    def add(method: str, clusters: np.ndarray, truth: np.ndarray) -> None:
        out.setdefault(method, {"ari": [], "accuracy": []})
        out[method]["ari"].append(float(adjusted_rand_score(truth, clusters)))
        out[method]["accuracy"].append(best_mapping_accuracy(clusters, truth, args.senses))

    for a, b in tqdm(pairs, desc="evaluate", unit="pair", leave=False):
        where = torch.from_numpy(np.flatnonzero(stream == index[f"{a}_{b}"]))
        truth = truth_at[where.numpy()]
        c, ctx, m = centers[where], contexts[where], mask[where]
        probs = multi.sense_probabilities(c, ctx, m)
        add(f"Disambiguated Skip-gram (K={args.senses})", probs.argmax(-1).numpy(), truth)
        add("skip-gram, one sense", np.zeros(len(where), dtype=np.int64), truth)
        vec = single.sense_vectors[:, 0]  # (V, D) the single-sense word vectors
        w = m.float()[..., None]
        ctx_mean = ((vec[ctx] * w).sum(1) / w.sum(1).clamp_min(1.0)).numpy()
        km = KMeans(n_clusters=args.senses, n_init=10, random_state=seed).fit(ctx_mean)
        add("skip-gram + k-means of contexts", km.labels_, truth)
    return out


def markdown(result: dict[str, Any]) -> str:
    d = result["data"]
    names = [p["pseudo_word"] for p in d["pairs"]]
    out = [
        f"Sense recovery on pseudo-words: `{result['command']}` ({d['words']} pydoc words, "
        f"{len(names)} pseudo-words; {result['seconds']:.0f} s)",
        "",
        "| method | ARI (mean over pairs; range over seeds) | best-mapping accuracy |",
        "|---|---:|---:|",
    ]
    for method, s in result["summary"].items():
        a, acc = s["ari"], s["accuracy"]
        out.append(
            f"| {method} | {a['mean']:.3f} ({a['min']:.3f}-{a['max']:.3f}) | "
            f"{acc['mean']:.3f} ({acc['min']:.3f}-{acc['max']:.3f}) |"
        )
    out += [
        "",
        "ARI per pseudo-word (mean over seeds; occurrences of each word in brackets):",
        "",
        "| method | "
        + " | ".join(f"{p['pseudo_word']} ({p['counts'][0]}+{p['counts'][1]})" for p in d["pairs"])
        + " |",
        "|---|" + "---:|" * len(names),
    ]
    for method, per in result["by_pair"].items():
        out.append(f"| {method} | " + " | ".join(f"{v:.2f}" for v in per["ari"]) + " |")
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p["pseudo_word"] for p in result["data"]["pairs"]]
    methods = list(result["by_pair"])
    fig, ax = plt.subplots(figsize=(max(5.5, 0.8 * len(names) + 2), 3.6))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        x = np.arange(len(names)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(x, result["by_pair"][method]["ari"], width, label=method)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("adjusted Rand index")
    ax.axhline(0, color="grey", lw=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
