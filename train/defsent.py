"""DefSent+ on pydoc: entries from definitions, ICA whitening, the frozen entry classifier, and
its figures (isotropy before / after whitening, reverse-dictionary accuracy on held-out
definitions).

    # the figure (each variant is a saved stage; --resume skips finished ones)
    python -m train.defsent --out out/defsent --stop-after ica
    python -m train.defsent --out out/defsent --resume
    # seconds, a tiny local BERT folder (the smoke test)
    python -m train.defsent --model /tmp/tiny_bert --steps 3 --ica-components 8 --out /tmp/defsent

Data (real text, offline): the stdlib's pydoc topics (data.text_corpora.pydoc_passages). An entry
is a section title ("The "assert" statement", "Augmented assignment statements": multi-word, and
as many as there are sections); its definitions are the section's opening sentences (the first
sentence, then the next ones, up to --defs-per-entry with >= --min-words words each; a title that
heads sections in two topics pools both). Entries with fewer than two such sentences are dropped.
One definition per entry, drawn at random (--seed), is held out; the entry embeddings and the
training read only the others. These "definitions" are real sentences from the documentation, not
lexicographic glosses: the later ones describe the entry more loosely than the first.

Variants (lm.embeddings.defsent; the same encoder init and training):

- ``ica``: entry matrix from the untrained encoder's definition embeddings, FastICA-whitened to
  --ica-components dims; the encoder trained for --steps steps with the frozen classifier.
- ``raw``: the same without whitening (the classifier reads the raw entry matrix).
- and both untrained (the encoder as loaded, the classifier as built).

Figures: isotropy (average pairwise cosine; Mu & Viswanath's partition isotropy of the unit
vectors) of the entry matrix and of the held-out definitions' embeddings in each classifier's
space, before and after whitening and training; reverse dictionary: for every held-out
definition, the rank of its entry among all entries (accuracy@1, @10 and MRR, ties broken
pessimistically; train.dupmae.ranking_metrics).

Outputs in --out: stages/ (trained encoders, train.decoding_common), defsent.json, defsent.md,
defsent.png (isotropy and accuracy bars).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel

from core.io import atomic_write_text
from core.runtime import seed_everything
from core.sources import resolve_source
from data.text_corpora import pydoc_passages, python_version
from lm.embeddings.defsent import DefSentPlus, average_cosine, partition_isotropy
from lm.embeddings.pooling import POOLINGS, LMEmbedder
from lm.loading import load_tokenizer
from train.common import batch_indices
from train.decoding_common import other_process, train_stage, write_report
from train.dupmae import ranking_metrics

VARIANTS = ("ica", "raw")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(*])")


def pydoc_definitions(defs_per_entry: int, min_words: int) -> dict[str, list[str]]:
    """Section title -> its opening sentences (see the module docstring), in title order."""
    pooled: dict[str, list[str]] = {}
    for p in pydoc_passages():
        sentences = [p.query, *_SENTENCE_END.split(p.text)]
        kept = pooled.setdefault(p.title, [])
        for s in sentences:
            s = s.strip()
            if len(s.split()) >= min_words and s not in kept:
                kept.append(s)
    out = {}
    for title in sorted(pooled):
        kept = pooled[title][:defs_per_entry]
        if len(kept) >= 2:
            out[title] = kept
    return out


def split_definitions(
    definitions: dict[str, list[str]], seed: int
) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """One definition per entry held out at random: (training definitions, [(entry, held)])."""
    rng = np.random.default_rng(seed)
    train, held = {}, []
    for entry, defs in definitions.items():
        k = int(rng.integers(len(defs)))
        held.append((entry, defs[k]))
        train[entry] = [d for i, d in enumerate(defs) if i != k]
    return train, held


def build_embedder(args: argparse.Namespace) -> LMEmbedder:
    """The encoder as loaded from --model, trainable."""
    name, kwargs = resolve_source(args.model).pretrained_args()
    model = AutoModel.from_pretrained(name, **kwargs)
    embedder = LMEmbedder(
        model, load_tokenizer(args.model), pooling=args.pooling, max_length=args.max_length
    )
    return embedder.train()


def isotropy(x: torch.Tensor) -> dict[str, float]:
    """Average cosine, and partition isotropy of the unit rows: the classifier reads directions
    only, and Z(c) is not scale-invariant (short vectors look isotropic whatever their
    directions, so raw and whitened spaces could not be compared as they are)."""
    unit = F.normalize(x.double(), dim=-1)
    return {"average_cosine": average_cosine(x), "partition_isotropy": partition_isotropy(unit)}


@torch.no_grad()
def evaluate(
    model: DefSentPlus, held: list[tuple[str, str]], index: dict[str, int]
) -> dict[str, Any]:
    """Reverse-dictionary accuracy and MRR of the held-out definitions, and isotropy of their
    embeddings in the classifier's space (before the unit normalisation)."""
    texts = [d for _, d in held]
    target = np.array([index[e] for e, _ in held])
    model.eval()
    parts, raw = [], []
    for s in range(0, len(texts), 32):
        h = model.sentence_embedding(*model.tokenize(texts[s : s + 32]))
        space = model.classifier.whitening(h) if model.classifier.whitening is not None else h
        raw.append(space.cpu())
        parts.append(model.classifier(h).cpu())
    logits = torch.cat(parts).numpy()
    return {
        **ranking_metrics(logits, target, prefix="accuracy"),
        "definitions_isotropy": isotropy(torch.cat(raw)),
    }


def markdown(result: dict[str, Any]) -> str:
    cfg, d = result["config"], result["data"]
    lines = [
        "### DefSent+ on pydoc section titles (real text)",
        "",
        "Command(s): " + "; then ".join(f"`{c}`" for c in result["commands"]),
        "",
        f"{d['entries']} entries (section titles of Python {d['python']}'s pydoc topics), "
        f"{d['train_definitions']} training definitions, {d['heldout_definitions']} held-out "
        f"(one per entry; chance accuracy@1 = {1 / d['entries']:.4f}). Encoder: {cfg['model']} "
        f"({cfg['pooling']} pooling), {cfg['steps']} steps per trained variant.",
        "",
        "Isotropy (average pairwise cosine: 0 = isotropic; partition isotropy of the unit "
        "vectors: 1 = isotropic):",
        "",
        "| vectors | space | avg cosine | partition isotropy |",
        "|---|---|---:|---:|",
    ]
    for name, iso in result["isotropy"].items():
        vectors, _, space = name.partition(" / ")
        lines.append(
            f"| {vectors} | {space} | {iso['average_cosine']:.3f} | "
            f"{iso['partition_isotropy']:.3g} |"
        )
    lines += [
        "",
        "Reverse dictionary on the held-out definitions (which entry does it define?):",
        "",
        "| encoder | classifier space | accuracy@1 | accuracy@10 | MRR |",
        "|---|---|---:|---:|---:|",
    ]
    for name, r in result["reverse_dictionary"].items():
        encoder, _, space = name.partition(" / ")
        lines.append(
            f"| {encoder} | {space} | {r['accuracy@1']:.3f} | {r['accuracy@10']:.3f} | "
            f"{r['mrr']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    iso = result["isotropy"]
    ax1.barh(list(iso), [v["average_cosine"] for v in iso.values()])
    ax1.set_xlabel("average pairwise cosine (0 = isotropic)")
    ax1.tick_params(axis="y", labelsize=7)
    rd = result["reverse_dictionary"]
    x = np.arange(len(rd))
    ax2.bar(x - 0.2, [v["accuracy@1"] for v in rd.values()], 0.4, label="accuracy@1")
    ax2.bar(x + 0.2, [v["accuracy@10"] for v in rd.values()], 0.4, label="accuracy@10")
    ax2.set_xticks(x, [k.replace(" / ", "\n") for k in rd], fontsize=7)
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.defsent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="minilm-l6", help="encoder source (core.sources)")
    parser.add_argument("--pooling", choices=POOLINGS, default="mean")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per definition")
    parser.add_argument("--defs-per-entry", type=int, default=4)
    parser.add_argument("--min-words", type=int, default=4, help="shortest definition kept")
    parser.add_argument("--ica-components", type=int, default=64, help="whitened dims")
    parser.add_argument("--scale", type=float, default=20.0, help="classifier logit scale")
    parser.add_argument("--steps", type=int, default=60, help="training steps per variant")
    parser.add_argument("--batch-size", type=int, default=32, help="definitions per step")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0, help="held-out draw, ICA, batch order")
    parser.add_argument("--resume", action="store_true", help="reuse finished stages")
    parser.add_argument(
        "--stop-after", choices=VARIANTS, default=None, help="stop after training this variant"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if other_process("python -m train.defsent"):
        return 0
    for name in ("steps", "batch_size", "defs_per_entry", "ica_components", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.defs_per_entry < 2:
        parser.error("--defs-per-entry must be >= 2 (one is held out)")
    command = "python -m train.defsent " + shlex.join(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.json"
    previous = json.loads(log.read_text(encoding="utf-8")) if args.resume and log.is_file() else []
    commands = [*previous, command]
    atomic_write_text(log, json.dumps(commands, indent=1) + "\n")
    seed_everything(args.seed)
    t_start = time.perf_counter()

    definitions = pydoc_definitions(args.defs_per_entry, args.min_words)
    train_defs, held = split_definitions(definitions, args.seed)
    entries = list(train_defs)
    index = {e: i for i, e in enumerate(entries)}
    pairs = [(d, index[e]) for e, defs in train_defs.items() for d in defs]
    if len(pairs) < args.batch_size:
        parser.error(f"{len(pairs)} training definitions < one batch ({args.batch_size})")
    if args.ica_components >= len(entries):
        parser.error(f"--ica-components must be below the {len(entries)} entries")

    key = {k: getattr(args, k) for k in ("model", "pooling", "max_length", "defs_per_entry")}
    key.update(min_words=args.min_words, seed=args.seed, scale=args.scale)
    order = list(islice(batch_indices(len(pairs), args.batch_size, args.seed), args.steps))
    isotropy_rows: dict[str, dict[str, float]] = {}
    reverse: dict[str, dict[str, Any]] = {}
    stages: dict[str, Any] = {}
    for variant in VARIANTS:
        embedder = build_embedder(args)
        model = DefSentPlus.build(
            embedder,
            train_defs,
            ica_components=args.ica_components if variant == "ica" else None,
            scale=args.scale,
            seed=args.seed,
            progress=True,
        )
        space = "ICA-whitened" if variant == "ica" else "raw"
        isotropy_rows[f"entry matrix / {space}"] = isotropy(model.classifier.entry_space())
        reverse[f"untrained / {space}"] = before = evaluate(model, held, index)
        isotropy_rows[f"held-out definitions, untrained encoder / {space}"] = before.pop(
            "definitions_isotropy"
        )

        def loss_fn(step: int, model: DefSentPlus = model) -> torch.Tensor:
            chunk = [pairs[i] for i in order[step]]
            logits = model(*model.tokenize([d for d, _ in chunk]))
            return F.cross_entropy(logits, torch.tensor([k for _, k in chunk]))

        cfg = {**key, "variant": variant, "steps": args.steps, "batch": args.batch_size}
        cfg.update(lr=args.lr, ica_components=args.ica_components if variant == "ica" else None)
        stages[variant] = train_stage(
            f"defsent_{variant}",
            embedder.model,
            embedder.parameters(),
            loss_fn,
            steps=args.steps,
            lr=args.lr,
            out=args.out,
            config=cfg,
            resume=args.resume,
        )
        reverse[f"DefSent+ trained / {space}"] = after = evaluate(model, held, index)
        isotropy_rows[f"held-out definitions, DefSent+ trained / {space}"] = after.pop(
            "definitions_isotropy"
        )
        if args.stop_after == variant:
            print(f"stopped after {variant}; continue with --resume")
            return 0
    result = {
        "command": command,
        "commands": commands,
        "config": {**vars(args), "out": str(args.out)},
        "data": {
            "kind": "real text (pydoc)",
            "python": python_version(),
            "entries": len(entries),
            "multi_word_entries": sum(len(e.split()) > 1 for e in entries),
            "train_definitions": len(pairs),
            "heldout_definitions": len(held),
            "examples": [{"entry": e, "heldout": d} for e, d in held[:5]],
        },
        "isotropy": isotropy_rows,
        "reverse_dictionary": reverse,
        "stages": stages,
        "seconds": time.perf_counter() - t_start,
    }
    write_report(args.out, "defsent", result, markdown(result), lambda p: plot(result, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
