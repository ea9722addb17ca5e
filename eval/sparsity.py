"""Held-out perplexity of a dense causal LM and of its sparse checkpoints, as one table.

    python -m eval.sparsity --sparse runs/smol_magnitude/sparse --sparse runs/smol_wanda/sparse \\
        --sparse runs/smol_sparsegpt/sparse --sparse runs/smol_maskllm/sparse \\
        --seq-len 512 --eval-rows 32 --out runs/sparsity_eval
    # another text, every row of its held-out split, an explicit dense model
    python -m eval.sparsity --dense ./my_model --sparse runs/mine/sparse \\
        --corpus 'files:notes/**/*.txt' --eval-rows 0 --out runs/mine_eval

Every model is scored on the same rows: the first --eval-rows rows of --seq-len tokens of the
corpus' held-out split (lm.corpus: pydoc's held-out topics, or every tenth file), packed with
the model's tokenizer, fp32, next-token NLL over all predicted tokens. The dense model is
--dense, else the checkpoints' common source (train/sparsify.py writes it in each checkpoint).

"gap closed" (MaskLLM rows): (ppl_best_one_shot - ppl) / (ppl_best_one_shot - ppl_dense), the
fraction of the gap between the best one-shot checkpoint in the table and dense that is closed.

Outputs in --out: ``sparsity_eval.json``, ``sparsity_eval.md`` (the table) and
``sparsity_eval.png`` (perplexity per model).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from core.io import atomic_write_text
from core.runtime import resolve_device
from eval.metrics import perplexity
from lm.corpus import pydoc_corpus, text_files_corpus
from lm.loading import load_causal_lm
from lm.sparsity import heldout_rows, lm_nll, load_sparse_checkpoint, load_sparse_model

ONE_SHOT = ("magnitude", "wanda", "sparsegpt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.sparsity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sparse", action="append", type=Path, required=True, help="a sparse checkpoint (repeat)"
    )
    parser.add_argument("--dense", help="dense model source (default: the checkpoints' source)")
    parser.add_argument("--corpus", default="pydoc", help="pydoc | files:GLOB (default pydoc)")
    parser.add_argument("--files-per-line", action="store_true")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-rows", type=int, default=32, help="held-out rows; 0 = all")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def score(model: Any, rows: Any, args: argparse.Namespace, what: str) -> dict[str, float]:
    nll, tokens = lm_nll(model, rows, args.batch_size, args.device, desc=f"perplexity ({what})")
    return {"ppl": perplexity(nll, tokens), "nll_per_token": nll / tokens, "tokens": tokens}


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| model | method | N:M | held-out perplexity | vs dense | gap closed |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = f"{100 * r['gap_closed']:.0f}%" if r.get("gap_closed") is not None else ""
        rel = f"{r['ppl'] / rows[0]['ppl']:.2f}x" if r is not rows[0] else ""
        lines.append(
            f"| {r['name']} | {r['method']} | {r['nm']} | {r['ppl']:.3f} | {rel} | {gap} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.5))
    ax.bar([r["name"] for r in rows], [r["ppl"] for r in rows], color="tab:blue")
    ax.axhline(rows[0]["ppl"], color="tab:gray", ls="--", lw=1, label="dense")
    ax.set_ylabel("held-out perplexity")
    ax.legend()
    fig.autofmt_xdate(rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.eval_rows < 0 or args.seq_len < 2 or args.batch_size < 1:
        parser.error("--eval-rows must be >= 0, --seq-len >= 2 and --batch-size >= 1")
    args.device = resolve_device(args.device)
    checkpoints = {path: load_sparse_checkpoint(path) for path in args.sparse}
    sources = sorted({c.source for c in checkpoints.values()})
    if args.dense is None and len(sources) > 1:
        parser.error(f"the checkpoints prune different sources {sources}; name one with --dense")
    dense_source = args.dense or sources[0]
    import lm.tnl  # noqa: F401  (registers TNL with the Auto classes)

    if args.corpus == "pydoc":
        corpus = pydoc_corpus()
    elif args.corpus.startswith("files:"):
        corpus = text_files_corpus(args.corpus.removeprefix("files:"), args.files_per_line)
    else:
        parser.error(f"--corpus must be pydoc or files:GLOB, received {args.corpus!r}")
    model, tokenizer = load_causal_lm(dense_source, frozen=True, device=args.device)
    rows = heldout_rows(tokenizer, corpus.heldout, args.seq_len, args.eval_rows or None)
    table: list[dict[str, Any]] = [
        {"name": "dense", "method": "dense", "nm": "", **score(model, rows, args, "dense")}
    ]
    del model
    for path, ckpt in checkpoints.items():
        model, _, _ = load_sparse_model(path, device=args.device)
        name = path.parent.name if path.name == "sparse" else path.name
        table.append(
            {
                "name": name,
                "method": ckpt.method,
                "nm": str(ckpt.nm),
                "path": str(path),
                **score(model, rows, args, name),
            }
        )
        del model
    one_shot = [r["ppl"] for r in table[1:] if r["method"] in ONE_SHOT]
    if one_shot:
        best, dense = min(one_shot), table[0]["ppl"]
        for r in table[1:]:
            if r["method"] == "maskllm" and best > dense:
                r["gap_closed"] = (best - r["ppl"]) / (best - dense)
    header = (
        f"Held-out perplexity of {dense_source} on {args.corpus} ({len(rows)} rows x "
        f"{args.seq_len} tokens, {table[0]['tokens']} predicted tokens)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": "python -m eval.sparsity " + shlex.join(argv)}
    result["header"] = header
    result["rows"] = [
        {k: v for k, v in r.items() if not isinstance(v, float) or math.isfinite(v)} for r in table
    ]
    atomic_write_text(args.out / "sparsity_eval.json", json.dumps(result, indent=1) + "\n")
    text = markdown(table, header)
    atomic_write_text(args.out / "sparsity_eval.md", text)
    plot(table, args.out / "sparsity_eval.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
