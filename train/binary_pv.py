"""Train Binary Paragraph Vectors on pydoc text and compare their Hamming-retrieval precision@10
with random-projection hashing of TF-IDF vectors at the same code lengths.

    python -m train.binary_pv --out out/binary_pv                    # the documented run
    python -m train.binary_pv --out out/binary_pv --bits 16 32 64 --seeds 0 1 2 --steps 600 \\
        --binarizers straight_through noise
    python -m train.binary_pv --out /tmp/bpv --bits 8 --seeds 0 --steps 5 --infer-steps 5 \\
        --max-chunks 60                                              # seconds: smoke

Data: the stdlib's pydoc topics (``pydoc_data.topics``, what ``help("for")`` prints), each topic
cut into chunks of whole paragraphs holding at least --chunk-words words (a shorter tail joins
the chunk before it). Every fifth chunk (index % 5 == 0) is a query, held out of training; the
rest is the database. Relevance: a database chunk is relevant to a query when both come from the
same pydoc topic. (data.text_corpora.pydoc_passages' sections do not serve: 59 of its 75 topics
have a single section, so most queries would have nothing relevant.) Queries whose topic has no
database chunk are dropped.

Methods, each giving --bits-bit codes:

- Binary PV-DBOW (lm.embeddings.binary_pv) per --binarizers: trained full-batch on the database
  chunks (word counts over a CountVectorizer vocabulary of words in >= 2 database chunks), then
  query codes inferred with the softmax layer frozen (--infer-steps Adam steps);
- random-projection hashing: sign of Gaussian random projections of TF-IDF vectors (TfidfVectorizer
  with the same vocabulary rule, fitted on the database, sublinear tf);
- references (not binary): TF-IDF cosine similarity, and a random ranking (chance) and a perfect
  one (ceiling: min(10, relevant items) / 10).

Each method runs once per --seeds value (model init / projection draw); the table gives the mean
and the spread (min-max) over seeds. Ties in Hamming distance are broken uniformly at random, in
expectation (lm.embeddings.binary_pv.precision_at_k).

Outputs in --out: binary_pv.json, binary_pv.md, binary_pv.png (precision@10 vs code length),
stages/ (every trained model; lm.embeddings.binary_pv.load_binary_pv reads them; --resume
reuses them).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from tqdm import tqdm

from core.runtime import seed_everything
from lm.embeddings.binary_pv import (
    BINARIZERS,
    BinaryParagraphVector,
    BinaryPVConfig,
    TfidfHasher,
    hamming_distances,
    precision_at_k,
    pv_dbow_loss,
)
from train.common import DataParallel
from train.decoding_common import train_stage, write_report

K = 10


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.binary_pv",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--binarizers", nargs="+", default=list(BINARIZERS), choices=BINARIZERS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600, help="full-batch training steps")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--infer-steps", type=int, default=300)
    parser.add_argument("--infer-lr", type=float, default=0.05)
    parser.add_argument("--chunk-words", type=int, default=80)
    parser.add_argument("--max-chunks", type=int, default=0, help="first N chunks only; 0 = all")
    parser.add_argument("--resume", action="store_true", help="reuse trained models in --out")
    return parser


def topic_chunks(min_words: int) -> list[tuple[str, str]]:
    """(topic, text) chunks of whole paragraphs of the pydoc topics, in sorted topic order."""
    from pydoc_data.topics import topics

    chunks: list[tuple[str, str]] = []
    for topic in sorted(topics):
        paragraphs = [" ".join(p.split()) for p in topics[topic].split("\n\n")]
        current: list[str] = []
        mine: list[str] = []
        for para in filter(None, paragraphs):
            current.append(para)
            if sum(len(p.split()) for p in current) >= min_words:
                mine.append(" ".join(current))
                current = []
        if current:  # the tail: its own chunk if long enough, else joined to the last one
            tail = " ".join(current)
            if mine and len(tail.split()) < min_words // 2:
                mine[-1] += " " + tail
            else:
                mine.append(tail)
        chunks += [(topic, text) for text in mine]
    return chunks


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if min(args.bits) < 1 or min(args.steps, args.infer_steps, args.chunk_words) < 1:
        parser.error("--bits, --steps, --infer-steps and --chunk-words must be >= 1")
    t0 = time.perf_counter()
    chunks = topic_chunks(args.chunk_words)
    chunks = chunks[: args.max_chunks] if args.max_chunks else chunks
    db = [c for i, c in enumerate(chunks) if i % 5]
    db_topics = Counter(t for t, _ in db)
    queries = [c for i, c in enumerate(chunks) if i % 5 == 0 and c[0] in db_topics]
    db_texts, db_labels = [t for _, t in db], [lab for lab, _ in db]
    q_texts, q_labels = [t for _, t in queries], [lab for lab, _ in queries]
    if len(db) < K or not queries:
        raise ValueError(f"need >= {K} database chunks and a query; got {len(db)}, {len(queries)}")
    counter = CountVectorizer(min_df=2)
    db_counts = torch.from_numpy(counter.fit_transform(db_texts).toarray().astype(np.float32))
    q_counts = torch.from_numpy(counter.transform(q_texts).toarray().astype(np.float32))
    vocabulary = counter.get_feature_names_out().tolist()
    print(
        f"{len(chunks)} chunks from {len(set(t for t, _ in chunks))} topics: {len(db)} database, "
        f"{len(queries)} queries; vocabulary {len(vocabulary)} words"
    )

    references: dict[str, float] = {}
    tfidf = TfidfVectorizer(min_df=2, sublinear_tf=True).fit(db_texts)
    cosine = (tfidf.transform(q_texts) @ tfidf.transform(db_texts).T).toarray()
    references["tf-idf cosine (real-valued)"] = float(
        precision_at_k(-cosine, q_labels, db_labels, K).mean()
    )
    references["random ranking (chance)"] = statistics.fmean(
        db_topics[q] / len(db) for q in q_labels
    )
    references["perfect ranking (ceiling)"] = statistics.fmean(
        min(K, db_topics[q]) / K for q in q_labels
    )

    precision: dict[str, dict[int, list[float]]] = {}
    jobs = [(b, s) for b in args.bits for s in args.seeds]
    for bits, seed in tqdm(jobs, desc="random projection", unit="run"):
        hasher = TfidfHasher(bits, seed, min_df=2, sublinear_tf=True).fit(db_texts)
        d = hamming_distances(hasher.encode(q_texts), hasher.encode(db_texts))
        p = float(precision_at_k(d, q_labels, db_labels, K).mean())
        precision.setdefault("random projection of TF-IDF", {}).setdefault(bits, []).append(p)

    def train_and_score(job: tuple[str, int, int]) -> tuple[str, dict[str, Any], float]:
        binarizer, bits, seed = job
        seed_everything(seed)
        cfg = BinaryPVConfig(len(db), len(vocabulary), bits=bits, binarizer=binarizer)
        model = BinaryParagraphVector(cfg)

        def step_loss(step: int, model: BinaryParagraphVector = model) -> torch.Tensor:
            return pv_dbow_loss(model(torch.arange(len(db))).logits, db_counts)

        name = f"binary_pv_{binarizer}_{bits}bit_seed{seed}"
        config = {
            "binary_pv": cfg.to_dict(),
            "vocabulary": vocabulary,
            "steps": args.steps,
            "lr": args.lr,
            "seed": seed,
            "chunk_words": args.chunk_words,
            "max_chunks": args.max_chunks,
        }
        stats = train_stage(
            name,
            model,
            model.parameters(),
            step_loss,
            steps=args.steps,
            lr=args.lr,
            out=args.out,
            config=config,
            resume=args.resume,
            warmup=10,
        )
        gen = torch.Generator().manual_seed(seed)
        q_codes = model.infer(q_counts, args.infer_steps, args.infer_lr, generator=gen)
        d = hamming_distances(q_codes, model.codes())
        return name, stats, float(precision_at_k(d, q_labels, db_labels, K).mean())

    # Under accelerate launch the models are shared out over the processes (decoding_common).
    pv_jobs = [(binarizer, bits, seed) for binarizer in args.binarizers for bits, seed in jobs]
    dp = DataParallel(torch.device("cpu"))
    runs = dp.collect([(i, train_and_score(job)) for i, job in dp.mine(pv_jobs, "models")])
    training: dict[str, Any] = {}
    for (binarizer, bits, _), (name, stats, p) in zip(pv_jobs, runs, strict=True):
        training[name] = stats
        precision.setdefault(f"Binary PV-DBOW ({binarizer})", {}).setdefault(bits, []).append(p)

    result = {
        "command": "python -m train.binary_pv " + shlex.join(argv),
        "data": {
            "corpus": "pydoc_data.topics, paragraph chunks; relevance = same topic",
            "chunks": len(chunks),
            "topics": len(set(t for t, _ in chunks)),
            "database": len(db),
            "queries": len(queries),
            "vocabulary": len(vocabulary),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        },
        "k": K,
        "precision_at_10": {
            m: {b: spread(v) for b, v in per.items()} for m, per in precision.items()
        },
        "references": references,
        "training": training,
        "seconds": time.perf_counter() - t0,
    }
    write_report(
        args.out, "binary_pv", result, markdown(result, args.bits), lambda p: plot(result, p)
    )
    return 0


def markdown(result: dict[str, Any], bits: list[int]) -> str:
    d = result["data"]
    out = [
        f"Hamming-retrieval precision@{K}: `{result['command']}` ({d['database']} database chunks, "
        f"{d['queries']} held-out queries, {d['topics']} pydoc topics; relevance = same topic; "
        f"{result['seconds']:.0f} s)",
        "",
        "| method | " + " | ".join(f"{b} bits" for b in bits) + " |",
        "|---|" + "---:|" * len(bits),
    ]
    for method, per in result["precision_at_10"].items():
        cells = [f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})" for s in (per[b] for b in bits)]
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    out += ["", "References (not binary codes):", ""]
    out += [f"- {name}: {value:.3f}" for name, value in result["references"].items()]
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, per in result["precision_at_10"].items():
        bits = sorted(per)
        mean = [per[b]["mean"] for b in bits]
        err = [
            [per[b]["mean"] - per[b]["min"] for b in bits],
            [per[b]["max"] - per[b]["mean"] for b in bits],
        ]
        ax.errorbar(bits, mean, yerr=err, marker="o", capsize=3, label=method)
    for name, value in result["references"].items():
        ax.axhline(value, lw=0.8, ls=":", color="grey")
        ax.text(
            min(min(p) for p in result["precision_at_10"].values()),
            value,
            name,
            fontsize=6,
            va="bottom",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("code length (bits)")
    ax.set_ylabel(f"precision@{K}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
