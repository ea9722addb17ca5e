"""Train a lexinvariant LM and a standard LM of the same size; compare loss by context position
on plain and on substitution-ciphered held-out text.

    python -m train.lexinvariant --out out/lexinvariant              # the documented run
    python -m train.lexinvariant --out out/lexinvariant --steps 500 --batch-size 16 \\
        --seq-len 256 --hidden 128 --layers 4 --heads 4 --eval-rows 64
    python -m train.lexinvariant --out out/lexinvariant --resume     # reuse trained models
    python -m train.lexinvariant --out /tmp/lx --steps 3 --batch-size 2 --seq-len 16 \\
        --hidden 32 --layers 1 --heads 2 --eval-rows 2                # seconds: smoke

Data: lm.corpus.pydoc_corpus (the stdlib's pydoc topics; its held-out topics are the test text),
tokenized at the character level (``--tokenizer char``: one id per character seen in the training
text, id 0 = document separator, id 1 = unknown character) or with a byte-level BPE trained on the
training text (``--tokenizer bpe:VOCAB``); documents are joined with the separator and cut into
rows of --seq-len tokens (lm.corpus.pack_documents).

Models (lm.lexinvariant): the lexinvariant LM (fresh Gaussian token embeddings per sequence, tied
output) and the standard LM (learned tied embeddings), the same LlamaModel backbone. Each trains
for --steps AdamW steps on the same batches (train.decoding_common.train_stage: a finished model
is saved in <out>/stages/<name>; --resume reuses it when its config matches).

Evaluation on --eval-rows held-out rows, each read twice:

- plain: the text as it is;
- cipher: every row enciphered by its own random permutation of the character ids (the separator
  and the unknown id stay fixed), a substitution cipher the model has to break in context.

For each model and reading: NLL and top-1 accuracy of every position's next token, averaged over
rows. The lexinvariant model reads row r with the embedding seed 10**9 + r in both readings.
A model-free reference beside them: in-context unigram counts, p(v) = (count of v so far + 0.5)
/ (t + 0.5 V), what knowing nothing but which symbols have repeated gives (it is lexinvariant
itself: identical NLL on plain and ciphered rows).

Outputs in --out: lexinvariant.json (config, per-position curves, binned table), lexinvariant.md,
lexinvariant.png (NLL by position), stages/.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.runtime import resolve_device, seed_everything
from lm.corpus import pack_documents, pydoc_corpus, tokenize_documents, train_bpe_tokenizer
from lm.lexinvariant import (
    LexinvariantConfig,
    TokenLM,
    build_lexinvariant_lm,
    build_standard_lm,
    next_token_nll,
)
from train.common import DataParallel, batch_indices
from train.decoding_common import train_stage, write_report

MODELS = {"lexinvariant": build_lexinvariant_lm, "standard": build_standard_lm}
EVAL_SEED = 10**9  # the lexinvariant model reads held-out row r with embedding seed EVAL_SEED + r
FIXED_IDS = 2  # ids 0 (separator) and 1 (unknown) are never enciphered


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.lexinvariant",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokenizer", default="char", help="char | bpe:VOCAB")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows; 0 = all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse trained models in --out")
    return parser


# ----------------------------------------------------------------------------------------------
# Tokenizers: a character vocabulary (written here: a dict of characters), or lm.corpus's BPE


def char_tokenizer(train_docs: Sequence[str]) -> tuple[Callable[[Sequence[str]], list], int, str]:
    """(encode, vocab size, description): ids 0 = separator, 1 = unknown, 2.. = the training
    text's characters by descending frequency."""
    counts = Counter(ch for doc in train_docs for ch in doc)
    chars = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    index = {c: i + FIXED_IDS for i, c in enumerate(chars)}

    def encode(docs: Sequence[str]) -> list[list[int]]:
        return [[index.get(c, 1) for c in doc] for doc in docs]

    return encode, len(chars) + FIXED_IDS, f"characters ({len(chars)} + separator + unknown)"


def bpe_tokenizer(
    train_docs: Sequence[str], vocab: int
) -> tuple[Callable[[Sequence[str]], list], int, str]:
    tok = train_bpe_tokenizer(train_docs, vocab)
    # lm.corpus's BPE puts its specials at ids 0..2: <|endoftext|> (separator), <pad>, <mask>
    if tok.eos_token_id != 0:
        raise ValueError(f"expected the BPE separator at id 0, found {tok.eos_token_id}")

    def encode(docs: Sequence[str]) -> list[list[int]]:
        return tokenize_documents(tok, docs)

    return encode, len(tok), f"byte-level BPE, {len(tok)} ids"


def encipher(rows: torch.Tensor, vocab_size: int, seed: int) -> torch.Tensor:
    """(N, T) -> (N, T): row r mapped through its own random permutation of ids >= FIXED_IDS."""
    out = rows.clone()
    for r in range(rows.shape[0]):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
        perm = torch.cat(
            [
                torch.arange(FIXED_IDS),
                FIXED_IDS + torch.randperm(vocab_size - FIXED_IDS, generator=gen),
            ]
        )
        out[r] = perm[rows[r]]
    return out


@torch.no_grad()
def per_position(
    model: TokenLM, rows: torch.Tensor, device: torch.device, batch: int = 8
) -> tuple[list[float], list[float]]:
    """Mean NLL and top-1 accuracy of each next-token position (T-1 values each) over rows."""
    nll, acc = [], []
    for s in range(0, len(rows), batch):
        ids = rows[s : s + batch].to(device)
        seeds = EVAL_SEED + torch.arange(s, s + len(ids))
        logits = model(ids, seeds).logits
        nll.append(next_token_nll(logits, ids).cpu())
        acc.append((logits[:, :-1].argmax(-1) == ids[:, 1:]).float().cpu())
    return torch.cat(nll).mean(0).tolist(), torch.cat(acc).mean(0).tolist()


def context_unigram(rows: torch.Tensor, vocab_size: int, alpha: float = 0.5) -> list[float]:
    """A model-free reference: NLL by position of predicting each token from the counts of the
    tokens before it, (count + alpha) / (t + alpha V). It depends only on which symbols repeat,
    so it is itself lexinvariant: it gives the same numbers on plain and on ciphered rows."""
    counts = F.one_hot(rows, vocab_size).cumsum(dim=1)[:, :-1].double()  # (N, T-1, V)
    seen = counts.gather(2, rows[:, 1:, None]).squeeze(2)  # (N, T-1)
    total = torch.arange(1, rows.shape[1], dtype=torch.float64)
    nll = -torch.log((seen + alpha) / (total + alpha * vocab_size))
    return nll.mean(0).tolist()


def context_unigram_top1(rows: torch.Tensor) -> list[float]:
    """Top-1 accuracy by position of predicting the most frequent token so far (ties: the lowest
    id, so plain and ciphered rows can differ a little)."""
    vocab = int(rows.max()) + 1
    counts = F.one_hot(rows, vocab).cumsum(dim=1)[:, :-1]  # (N, T-1, V)
    return (counts.argmax(dim=2) == rows[:, 1:]).double().mean(0).tolist()


def bins_for(positions: int) -> list[tuple[int, int]]:
    """Position ranges (1-based, of the predicted token) growing by powers of two: 1-4, 5-8, ..."""
    edges = [0, 4]
    while edges[-1] < positions:
        edges.append(min(edges[-1] * 2, positions))
    return [(lo + 1, hi) for lo, hi in itertools.pairwise(edges)]


def markdown(result: dict[str, Any], header: str) -> str:
    bins = [tuple(b) for b in result["bins"]]
    cols = " | ".join(f"{lo}-{hi}" for lo, hi in bins)
    out = [header, ""]
    for metric, label in (("nll", "NLL (nats/token)"), ("accuracy", "top-1 accuracy")):
        out += [
            f"{label} by position of the predicted token:",
            "",
            f"| model | text | {cols} | all |",
            "|---|---|" + "---:|" * (len(bins) + 1),
        ]
        for name, curves in result["curves"].items():
            for text in ("plain", "cipher"):
                c = curves[text][metric]
                vals = " | ".join(f"{statistics.fmean(c[lo - 1 : hi]):.3f}" for lo, hi in bins)
                out.append(f"| {name} | {text} | {vals} | {statistics.fmean(c):.3f} |")
        out.append("")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    for name, curves in result["curves"].items():
        reference = name not in MODELS  # the same on both readings: draw it once
        for text, style in (("plain", ":" if reference else "-"), ("cipher", "--")):
            if reference and text == "cipher":
                continue
            c = np.asarray(curves[text]["nll"])
            # a trailing mean over up to 8 positions (single positions are noisy)
            csum = np.concatenate([[0.0], np.cumsum(c)])
            lo = np.maximum(np.arange(len(c)) - 7, 0)
            smooth = (csum[1:] - csum[lo]) / (np.arange(len(c)) + 1 - lo)
            ax.plot(np.arange(1, len(c) + 1), smooth, style, label=f"{name}, {text}")
    ax.axhline(math.log(result["vocab_size"]), color="grey", lw=0.8, label="uniform (log V)")
    ax.set_xscale("log")
    ax.set_xlabel("position of the predicted token")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.seq_len < 4 or min(args.steps, args.batch_size, args.hidden, args.layers) < 1:
        parser.error("--seq-len must be >= 4; --steps, --batch-size, --hidden, --layers >= 1")
    if args.eval_rows < 0:
        parser.error(f"--eval-rows must be >= 0, received {args.eval_rows}")
    args.device = resolve_device(args.device)
    seed_everything(args.seed)
    t0 = time.perf_counter()

    corpus = pydoc_corpus()
    if args.tokenizer == "char":
        encode, vocab, tok_desc = char_tokenizer(corpus.train)
    elif args.tokenizer.startswith("bpe:"):
        encode, vocab, tok_desc = bpe_tokenizer(corpus.train, int(args.tokenizer[4:]))
    else:
        parser.error(f"--tokenizer must be char or bpe:VOCAB, received {args.tokenizer!r}")
    train_rows = torch.from_numpy(pack_documents(encode(corpus.train), args.seq_len, 0))
    eval_rows = torch.from_numpy(pack_documents(encode(corpus.heldout), args.seq_len, 0))
    eval_rows = eval_rows[: args.eval_rows] if args.eval_rows else eval_rows
    if not len(eval_rows):
        raise ValueError(f"the held-out text is shorter than one row of {args.seq_len} tokens")
    cipher_rows = encipher(eval_rows, vocab, args.seed)
    cfg = LexinvariantConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=3 * args.hidden,
        max_positions=args.seq_len,
    )
    print(f"{len(train_rows)} training rows, {len(eval_rows)} held-out rows; tokens: {tok_desc}")

    def train_and_evaluate(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        torch.manual_seed(args.seed)
        model = MODELS[name](cfg).to(args.device)
        order = batch_indices(len(train_rows), args.batch_size, args.seed)

        def step_loss(step: int, model: TokenLM = model, order: Any = order) -> torch.Tensor:
            idx = next(order)
            ids = train_rows[idx].to(args.device)
            seeds = torch.as_tensor(args.seed * 10**7 + step * args.batch_size) + torch.arange(
                len(idx)
            )
            return next_token_nll(model(ids, seeds).logits, ids).mean()

        config = {
            "model": name,
            "lm": cfg.to_dict(),
            "tokenizer": args.tokenizer,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
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
        )
        curve: dict[str, Any] = {}
        for text, rows in tqdm(
            (("plain", eval_rows), ("cipher", cipher_rows)), desc=f"evaluate {name}", total=2
        ):
            nll, acc = per_position(model, rows, args.device)
            curve[text] = {"nll": nll, "accuracy": acc}
        return stats, curve

    # Under accelerate launch the models are shared out over the processes (decoding_common).
    dp = DataParallel(args.device)
    done = [(i, train_and_evaluate(name)) for i, name in dp.mine(args.models, "models")]
    runs = dp.collect(done)
    stages = {name: stats for name, (stats, _) in zip(args.models, runs, strict=True)}
    curves: dict[str, Any] = {name: c for name, (_, c) in zip(args.models, runs, strict=True)}
    reference = "in-context unigram counts (add-0.5)"
    curves[reference] = {
        text: {"nll": context_unigram(rows, vocab), "accuracy": context_unigram_top1(rows)}
        for text, rows in (("plain", eval_rows), ("cipher", cipher_rows))
    }
    result = {
        "command": "python -m train.lexinvariant " + shlex.join(argv),
        "data": {
            "corpus": "pydoc topics (lm.corpus.pydoc_corpus), held-out topics for evaluation",
            "tokens": tok_desc,
            "train_rows": len(train_rows),
            "eval_rows": len(eval_rows),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        },
        "vocab_size": vocab,
        "config": cfg.to_dict(),
        "training": stages,
        "bins": bins_for(args.seq_len - 1),
        "curves": curves,
        "seconds": time.perf_counter() - t0,
    }
    header = (
        f"Lexinvariant vs standard LM: `{result['command']}` ({tok_desc}; {len(eval_rows)} "
        f"held-out rows of {args.seq_len} tokens; {result['seconds']:.0f} s)"
    )
    write_report(
        args.out, "lexinvariant", result, markdown(result, header), lambda p: plot(result, p)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
