"""Figures of the decoding methods on a causal LM: hidden-state optimisation and conditional beam.

    # HSO: continuation NLL with and without, on held-out pydoc passages (SmolLM2-135M-Instruct)
    python -m eval.decoding hso --out out/decoding --passages 12 --tune-passages 4 \\
        --past 192 --recent 64 --continuation 64 --lrs 3e-3 1e-2 --steps 1 2 4
    # conditional vs plain MAP beam search as the beam widens
    python -m eval.decoding beam --out out/decoding --widths 1 2 4 8 --max-new-tokens 40 \\
        --chat-prompts 6 --raw-prompts 3
    # seconds, on the tiny random model (the smoke test)
    python -m eval.decoding hso --model tiny-random-llama --passages 2 --tune-passages 1 \\
        --past 16 --recent 8 --continuation 8 --lrs 1e-2 --steps 1 --out /tmp/d

hso: every passage is `past + recent + continuation` consecutive tokens of the corpus' packed
held-out split (lm.corpus packing; pydoc's held-out topics by default). The past is cached; HSO
(lm.decoding.hidden_state_optimisation) takes Adam steps on its key/value states to lower the
NLL of the recent tokens; the figure is the mean NLL of the continuation (never seen by HSO),
predicted after the recent part is re-run on the optimised states, against the same prediction
from the unoptimised states (= the plain model with the whole context). Every (lr, steps) pair is
measured; the headline lr is the one with the lowest continuation NLL at the largest step count
on --tune-passages passages of the *train* split, so the held-out figure is not tuned on itself.
Differences are paired per passage: mean, standard error, and the share of passages improved.

beam: for every prompt and beam width, plain MAP beam search (length_penalty 0) and conditional
beam search (lm.decoding.conditional_beam: at least --min-new-tokens tokens, no repeated
--no-repeat-ngram n-gram in the output). Reported per width: mean length, share of empty
outputs, repeated 2-/3-gram rates, log-likelihood per token and per output. Prompts: a fixed
list of chat instructions (in the model's chat template) and --raw-prompts passages of the
held-out text (plain continuation, no template).

Outputs in --out: decoding_<what>.json, decoding_<what>.md (the table), decoding_<what>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.io import atomic_write_text
from core.runtime import resolve_device, seed_everything
from lm.corpus import Corpus, pack_documents, pydoc_corpus, text_files_corpus, tokenize_documents
from lm.decoding import (
    beam_search,
    cache_nll,
    conditional_beam_search,
    degeneracy,
    optimise_hidden_states,
)
from lm.loading import load_causal_lm

CHAT_PROMPTS = [
    "What is a Python decorator?",
    "Give me three tips for writing clear emails.",
    "Explain what a hash table is in two sentences.",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.decoding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2-135m-instruct", help="causal LM source")
    common.add_argument("--corpus", default="pydoc", help="pydoc | files:GLOB (default pydoc)")
    common.add_argument("--device", default="cpu")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", type=Path, required=True)
    hso = sub.add_parser("hso", parents=[common], help="hidden-state optimisation figure")
    hso.add_argument("--passages", type=int, default=12, help="held-out passages (0 = all)")
    hso.add_argument("--tune-passages", type=int, default=4, help="train passages to pick lr")
    hso.add_argument("--past", type=int, default=192, help="cached tokens HSO optimises")
    hso.add_argument("--recent", type=int, default=64, help="tokens whose NLL HSO lowers")
    hso.add_argument("--continuation", type=int, default=64, help="scored tokens after them")
    hso.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    hso.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    beam = sub.add_parser("beam", parents=[common], help="conditional beam search figure")
    beam.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    beam.add_argument("--max-new-tokens", type=int, default=40)
    beam.add_argument("--chat-prompts", type=int, default=6)
    beam.add_argument("--raw-prompts", type=int, default=3, help="held-out text passages")
    beam.add_argument("--raw-prompt-tokens", type=int, default=32)
    beam.add_argument("--min-new-tokens", type=int, default=1)
    beam.add_argument("--no-repeat-ngram", type=int, default=3)
    return parser


def load_corpus(spec: str) -> Corpus:
    if spec == "pydoc":
        return pydoc_corpus()
    if spec.startswith("files:"):
        return text_files_corpus(spec.removeprefix("files:"))
    raise ValueError(f"--corpus must be pydoc or files:GLOB, received {spec!r}")


def passages(tokenizer: Any, docs: list[str], length: int, n: int) -> torch.Tensor:
    """(N, length) consecutive-token passages of the packed documents; n = 0: all."""
    rows = pack_documents(tokenize_documents(tokenizer, docs), length, tokenizer.eos_token_id)
    if n:
        rows = rows[:n]
    if not len(rows):
        raise ValueError(f"the text is shorter than one passage of {length} tokens")
    return torch.from_numpy(rows)


def paired(deltas: list[float]) -> dict[str, float]:
    """Mean, standard error (0 for one passage) and share > 0 of paired differences
    (baseline - method)."""
    n = len(deltas)
    se = statistics.stdev(deltas) / math.sqrt(n) if n > 1 else 0.0
    return {"mean": statistics.fmean(deltas), "se": se, "improved": sum(d > 0 for d in deltas) / n}


def hso_passage(model: Any, row: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Continuation NLL without HSO and after each requested step count, for every lr."""
    ids = row.unsqueeze(0).to(args.device)
    context = ids[:, : args.past + args.recent]
    tail = ids[:, args.past :]  # recent + continuation, run on the (optimised) past states
    scored_from = args.recent
    out: dict[str, Any] = {"lrs": {}}
    record = set(args.steps)
    for lr in args.lrs:
        cont: dict[int, float] = {}

        def on_step(step: int, kv: Any, cont: dict[int, float] = cont) -> None:
            if step in record:
                cont[step] = float(cache_nll(model, kv, tail, scored_from))

        result = optimise_hidden_states(
            model,
            context,
            recent_tokens=args.recent,
            steps=max(args.steps),
            lr=lr,
            on_step=on_step,
        )
        out["lrs"][lr] = {"continuation": cont, "context": result.context_nll}
    with torch.no_grad():
        initial = model(input_ids=ids[:, : args.past], use_cache=True)
        kv = [(layer.keys, layer.values) for layer in initial.cache.layers]
        out["baseline_continuation"] = float(cache_nll(model, kv, tail, scored_from))
    return out


def run_hso(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    corpus = load_corpus(args.corpus)
    length = args.past + args.recent + args.continuation
    tune = passages(tokenizer, corpus.train, length, args.tune_passages)
    test = passages(tokenizer, corpus.heldout, length, args.passages)
    per: dict[str, list[dict[str, Any]]] = {"tune": [], "test": []}
    for split, rows in (("tune", tune), ("test", test)):
        for row in tqdm(rows, desc=f"HSO ({split} passages)", unit="passage"):
            per[split].append(hso_passage(model, row, args))
    top = max(args.steps)
    tune_nll = {
        lr: statistics.fmean(p["lrs"][lr]["continuation"][top] for p in per["tune"])
        for lr in args.lrs
    }
    best_lr = min(tune_nll, key=lambda lr: tune_nll[lr])
    table = []
    base = [p["baseline_continuation"] for p in per["test"]]
    for lr in args.lrs:
        for step in sorted(args.steps):
            cont = [p["lrs"][lr]["continuation"][step] for p in per["test"]]
            ctx = [p["lrs"][lr]["context"][step] for p in per["test"]]
            table.append(
                {
                    "lr": lr,
                    "steps": step,
                    "context_nll": statistics.fmean(ctx),
                    "continuation_nll": statistics.fmean(cont),
                    "delta": paired([b - c for b, c in zip(base, cont, strict=True)]),
                    "picked_on_train": lr == best_lr,
                }
            )
    context0 = statistics.fmean(p["lrs"][args.lrs[0]]["context"][0] for p in per["test"])
    return {
        "passages": len(test),
        "tune_passages": len(tune),
        "tokens": {"past": args.past, "recent": args.recent, "continuation": args.continuation},
        "baseline": {"context_nll": context0, "continuation_nll": statistics.fmean(base)},
        "tune_continuation_nll": {str(k): v for k, v in tune_nll.items()},
        "best_lr": best_lr,
        "rows": table,
        "per_passage": per,
    }


def hso_markdown(r: dict[str, Any], header: str) -> str:
    b = r["baseline"]
    lines = [
        header,
        "",
        "| method | lr | steps | recent-part NLL (HSO lowers it) | continuation NLL | "
        "continuation Δ, HSO − none (± s.e.) | passages improved |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| none | | 0 | {b['context_nll']:.4f} | {b['continuation_nll']:.4f} | | |",
    ]
    for row in r["rows"]:
        d = row["delta"]
        mark = " (picked on train)" if row["picked_on_train"] else ""
        lines.append(
            f"| HSO | {row['lr']:g}{mark} | {row['steps']} | {row['context_nll']:.4f} | "
            f"{row['continuation_nll']:.4f} | {-d['mean']:+.4f} ± {d['se']:.4f} | "
            f"{100 * d['improved']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def hso_plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    base = r["baseline"]["continuation_nll"]
    for lr in sorted({row["lr"] for row in r["rows"]}):
        rows = [row for row in r["rows"] if row["lr"] == lr]
        ax.plot(
            [0] + [row["steps"] for row in rows],
            [base] + [row["continuation_nll"] for row in rows],
            marker="o",
            label=f"HSO lr {lr:g}",
        )
    ax.axhline(base, color="tab:gray", ls="--", lw=1, label="no HSO")
    ax.set_xlabel("HSO steps")
    ax.set_ylabel("held-out continuation NLL (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def beam_prompts(args: argparse.Namespace, tokenizer: Any) -> list[tuple[str, torch.Tensor]]:
    prompts: list[tuple[str, torch.Tensor]] = []
    for text in CHAT_PROMPTS[: args.chat_prompts]:
        if tokenizer.chat_template is None:
            raise ValueError(f"{args.model}: no chat template; use --chat-prompts 0")
        enc: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        prompts.append(("chat", enc["input_ids"]))
    if args.raw_prompts:
        corpus = load_corpus(args.corpus)
        rows = passages(tokenizer, corpus.heldout, args.raw_prompt_tokens, 0)
        step = max(1, len(rows) // args.raw_prompts)  # spread over the held-out text
        for row in rows[::step][: args.raw_prompts]:
            prompts.append(("raw", row.unsqueeze(0)))
    return prompts


def run_beam(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    prompts = beam_prompts(args, tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    searches = {
        "plain": lambda ids, w: beam_search(
            model,
            ids,
            num_beams=w,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
        ),
        "conditional": lambda ids, w: conditional_beam_search(
            model,
            ids,
            num_beams=w,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            min_new_tokens=args.min_new_tokens,
            no_repeat_ngram_size=args.no_repeat_ngram,
        ),
    }
    outputs = []
    jobs = [(k, i, w) for w in args.widths for k in searches for i in range(len(prompts))]
    for method, i, width in tqdm(jobs, desc="beam search", unit="search"):
        kind, ids = prompts[i]
        t0 = time.perf_counter()
        result = searches[method](ids.to(args.device), width)
        n, scored = int(result.lengths[0]), int(result.scored_tokens[0])
        tokens = result.sequences[0, :n].tolist()
        outputs.append(
            {
                "method": method,
                "width": width,
                "prompt": i,
                "kind": kind,
                "text": tokenizer.decode(tokens),
                "finished": bool(result.finished[0]),
                "log_likelihood": float(result.log_likelihood[0]),
                "scored_tokens": scored,
                "seconds": time.perf_counter() - t0,
                **degeneracy(tokens),
            }
        )
    table = []
    for kind in ("all", "chat", "raw"):
        for width in args.widths:
            for method in searches:
                rows = [
                    o
                    for o in outputs
                    if o["method"] == method
                    and o["width"] == width
                    and (kind == "all" or o["kind"] == kind)
                ]
                if not rows:
                    continue
                table.append(
                    {
                        "prompts": kind,
                        "width": width,
                        "method": method,
                        "n": len(rows),
                        "length": statistics.fmean(o["length"] for o in rows),
                        "empty": statistics.fmean(o["empty"] for o in rows),
                        "repeat_2gram": statistics.fmean(o["repeat_2gram"] for o in rows),
                        "repeat_3gram": statistics.fmean(o["repeat_3gram"] for o in rows),
                        "loglik_per_token": statistics.fmean(
                            o["log_likelihood"] / max(o["scored_tokens"], 1) for o in rows
                        ),
                        "loglik": statistics.fmean(o["log_likelihood"] for o in rows),
                    }
                )
    return {"prompts": len(prompts), "rows": table, "outputs": outputs}


def beam_markdown(r: dict[str, Any], header: str) -> str:
    lines = [
        header,
        "",
        "| prompts | width | search | length (tokens) | empty | repeated 2-grams | "
        "repeated 3-grams | log-lik / token | log-lik / output |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['prompts']} ({row['n']}) | {row['width']} | {row['method']} | "
            f"{row['length']:.1f} | {100 * row['empty']:.0f}% | "
            f"{100 * row['repeat_2gram']:.0f}% | {100 * row['repeat_3gram']:.0f}% | "
            f"{row['loglik_per_token']:.3f} | {row['loglik']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def beam_plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in r["rows"] if row["prompts"] == "all"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, label in zip(
        axes,
        ("length", "repeat_3gram", "loglik_per_token"),
        ("output length (tokens)", "repeated 3-gram rate", "log-likelihood per token"),
        strict=True,
    ):
        for method in ("plain", "conditional"):
            pts = [row for row in rows if row["method"] == method]
            ax.plot([p["width"] for p in pts], [p[key] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("beam width")
        ax.set_ylabel(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.what == "hso":
        if min(args.past, args.recent, args.continuation) < 2:
            parser.error("--past, --recent and --continuation must be >= 2")
        if min(args.steps) < 1 or min(args.lrs) <= 0 or args.tune_passages < 1:
            parser.error("--steps must be >= 1, --lrs > 0 and --tune-passages >= 1")
    elif min(args.widths) < 1 or args.max_new_tokens < 1:
        parser.error("--widths and --max-new-tokens must be >= 1")
    args.device = resolve_device(args.device)
    seed_everything(args.seed)
    model, tokenizer = load_causal_lm(args.model, frozen=True, device=args.device)
    t0 = time.perf_counter()
    if args.what == "hso":
        result = run_hso(args, model, tokenizer)
        header = (
            f"Hidden-state optimisation on {args.model}, {result['passages']} held-out "
            f"{args.corpus} passages of {args.past} cached + {args.recent} recent + "
            f"{args.continuation} continuation tokens (NLL in nats/token)"
        )
        text = hso_markdown(result, header)
    else:
        result = run_beam(args, model, tokenizer)
        header = (
            f"Plain vs conditional MAP beam search on {args.model}, {result['prompts']} prompts, "
            f"up to {args.max_new_tokens} new tokens (conditional: >= {args.min_new_tokens} "
            f"tokens, no repeated {args.no_repeat_ngram}-gram)"
        )
        text = beam_markdown(result, header)
    result = {
        "command": f"python -m eval.decoding {shlex.join(argv)}",
        "header": header,
        "seconds": time.perf_counter() - t0,
        **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"decoding_{args.what}"
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / f"{name}.md", text)
    (hso_plot if args.what == "hso" else beam_plot)(result, args.out / f"{name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
