"""Issue 5's language-side experiments: TNL vs softmax, MEAP vs NTP, MoE balancing, ERNIE-Gram.

    # 1. TNL (lightning) vs its softmax twin, equal size and steps: held-out loss (runs
    #    train/pretrain_lm.py twice on ShapeWorld captions + pydoc topics)
    python -m bench.lm_experiments tnl-vs-softmax --json out/lm_exp/tnl.json
    # 2. MEAP vs NTP on a synthetic key-value needle task, 3 seeds each
    python -m bench.lm_experiments meap-needle --json out/lm_exp/needle.json
    # 3. MoE with and without the load-balancing loss: coefficient of variation of expert load
    python -m bench.lm_experiments moe-balance --json out/lm_exp/moe.json
    # 4. ERNIE-Gram vs span vs token masking on a corpus with planted n-grams
    python -m bench.lm_experiments ernie-masking --json out/lm_exp/ernie.json
    # any of them at smoke-test size (seconds)
    python -m bench.lm_experiments meap-needle --quick

Every subcommand prints a markdown table and, with --json, writes its numbers and settings.
Run with OMP_NUM_THREADS=1 on a shared machine (the models are tiny; threads only add contention).

1. tnl-vs-softmax: ``python -m train.pretrain_lm --objective ntp --arch {tnl,softmax}`` with the
   same sizes, steps, data order and seed (a subprocess each; bench does not import train), then
   the final held-out next-token loss from each run's log.json. Same size means the same hidden
   width, layers, heads and FFN: TNL has one extra C x C projection per layer (the output gate
   u), so its parameter count is a little larger; both counts are reported.
2. meap-needle: tokens are [pad, bos, mask, K keys, V values]. Training rows are BOS k1 v1 ...
   kn vn with keys drawn (with repeats) from a per-row random set of s keys, each bound to one
   random value: every repeated key's value is recallable from its earlier occurrence
   (multi-query associative recall). A needle example holds n pairs with distinct keys, the
   needle at pair index round(depth x (n - 1)), then the needle's key as the query; the model
   must put its value after it (argmax over the whole vocabulary). Each seed trains one model
   per objective (same init, same rows); MEAP masks 15% of the input positions with [MASK] and
   keeps plain next-token targets (lm.objectives.MEAPCollator). Clean held-out loss: next-token
   loss on fresh unmasked training-distribution rows, all positions and recallable values only.
3. moe-balance: a TNL (lightning) with an MoE FFN in every layer (8 experts, top-2) trained on
   pydoc topics (BPE tokenizer) with aux_loss_coef 0 and the given coefficients, same seed and
   steps. Expert load = routing slots per expert on the held-out rows; CV = population std /
   mean of the E loads, per layer and their mean (0 = perfectly balanced; sqrt(E / k - 1) =
   2.65 when every token picks the same k = 2 of E = 8 experts).
4. ernie-masking: a synthetic corpus of documents with a topic each; each topic owns a few
   planted phrases (bigrams, trigrams of ordinary words) that appear in its documents among
   Zipf-distributed filler words. The t-test lexicon (lm.objectives.build_ngram_lexicon) is
   scored against the planted n-grams (precision, recall per order at several sizes). Three
   BERT encoders of the same size and steps are pretrained: ERNIE-Gram (explicit n-gram
   masking with that lexicon, coarse + fine heads, generator), SpanBERT span masking and BERT
   token masking (lm.objectives.SpanMaskingCollator). Whole-n-gram recovery: on held-out
   documents each planted-phrase occurrence is masked on its own (ERNIE-Gram: one collapsed
   [MASK]; the others: n [MASK]s) and counts as recovered when every token is predicted right
   (ERNIE-Gram: by its fine head, slot by slot; also by its coarse head's n-gram identity).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.io import atomic_write_text
from lm.corpus import pack_documents, pydoc_corpus, tokenize_documents, train_bpe_tokenizer
from lm.moe import MoEConfig
from lm.objectives import (
    ErnieGramCollator,
    ErnieGramConfig,
    ErnieGramForPretraining,
    MEAPCollator,
    NGramLexicon,
    SpanMaskingCollator,
    build_ngram_lexicon,
    ngram_t_scores,
)
from lm.tnl import TNLConfig, TNLForCausalLM

EXPERIMENTS = ("tnl-vs-softmax", "meap-needle", "moe-balance", "ernie-masking")

# --------------------------------------------------------------------------------------------
# Shared helpers


def coefficient_of_variation(load: Sequence[float] | torch.Tensor | np.ndarray) -> float:
    """Population std / mean of per-expert loads (E,) -> float (0 = balanced)."""
    x = np.asarray(torch.as_tensor(load).double().cpu(), dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a 1-D load vector, received shape {x.shape}")
    mean = x.mean()
    if mean <= 0:
        raise ValueError("the loads sum to zero: no token was routed")
    return float(x.std() / mean)


def mean_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (0 for one value), min and max."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
    }


def adamw_with_cosine(
    model: torch.nn.Module, lr: float, steps: int, warmup: int, weight_decay: float = 0.1
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on vectors) with linear warmup then cosine to 0, as train.pretrain_lm."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_loop(
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    desc: str,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Plain loop: loss_fn(step) -> scalar; grad clip 1.0. Returns the per-step losses."""
    opt, sched = adamw_with_cosine(model, lr, steps, max(1, steps // 20))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for step in bar:
        loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _torch_gen(seed: int, *stream: int) -> torch.Generator:
    state = int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])
    return torch.Generator().manual_seed(state)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# 1. TNL vs softmax attention LM (through train/pretrain_lm.py)


@dataclass
class LMRunSettings:
    """Sizes of the tnl-vs-softmax runs (passed to train.pretrain_lm)."""

    hidden: int = 128  # width C
    layers: int = 2  # decoder layers
    heads: int = 4  # attention heads
    tokenizer: str = "bpe:2048"  # byte-level BPE trained on the training text
    seq_len: int = 128  # tokens per packed row
    batch_size: int = 16  # rows per step
    steps: int = 800  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    shapeworld_images: int = 2000  # ShapeWorld scenes whose captions join pydoc
    max_chars: int | None = None  # cap each corpus split (quick runs)
    eval_batches: int = 16  # held-out batches of batch_size rows
    gate_act: str | None = None  # TNL's output gate activation (None: TNLConfig's default)


def pretrain_command(arch: str, s: LMRunSettings, seed: int, out: Path) -> list[str]:
    """The train.pretrain_lm argv of one run."""
    argv = [
        "--objective", "ntp", "--arch", arch, "--hidden", str(s.hidden),
        "--layers", str(s.layers), "--heads", str(s.heads), "--tokenizer", s.tokenizer,
        "--corpus", "shapeworld", "--corpus", "pydoc",
        "--shapeworld-images", str(s.shapeworld_images), "--seq-len", str(s.seq_len),
        "--batch-size", str(s.batch_size), "--steps", str(s.steps), "--lr", str(s.lr),
        "--seed", str(seed), "--eval-every", str(s.steps), "--eval-batches", str(s.eval_batches),
        "--save-every", str(s.steps), "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    if s.max_chars is not None:
        argv += ["--max-chars", str(s.max_chars)]
    if s.gate_act is not None and arch == "tnl":
        argv += ["--gate-act", s.gate_act]
    return argv


def run_tnl_vs_softmax(s: LMRunSettings, seeds: Sequence[int], workdir: Path) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        for arch in ("tnl", "softmax"):
            out = workdir / f"{arch}_seed{seed}"
            argv = pretrain_command(arch, s, seed, out)
            t0 = time.time()
            subprocess.run(
                [sys.executable, "-m", "train.pretrain_lm", *argv],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            log = json.loads((out / "log.json").read_text(encoding="utf-8"))
            final = log["eval"][-1]
            runs.append(
                {
                    "arch": arch,
                    "seed": seed,
                    "heldout_loss": final["loss"],
                    "heldout_ppl": final["ppl"],
                    "heldout_rows": final["rows"],
                    "train_loss_last50": statistics.fmean(r["loss"] for r in log["train"][-50:]),
                    "parameters": log["config"]["parameters"],
                    "train_seconds": log["train"][-1]["time"],
                    "wall_seconds": round(time.time() - t0, 1),
                    "command": "python -m train.pretrain_lm " + " ".join(argv),
                }
            )
    by_seed = []
    for seed in seeds:
        tnl, soft = (
            next(r for r in runs if r["seed"] == seed and r["arch"] == a)
            for a in ("tnl", "softmax")
        )
        rel = (tnl["heldout_loss"] - soft["heldout_loss"]) / soft["heldout_loss"]
        by_seed.append({"seed": seed, "relative_gap": rel, "within_5pct": abs(rel) <= 0.05})
    return {"settings": asdict(s), "runs": runs, "comparison": by_seed}


def tnl_table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["runs"]:
        gap = next(c for c in result["comparison"] if c["seed"] == r["seed"])
        rows.append(
            [
                r["arch"],
                r["seed"],
                f"{r['parameters'] / 1e6:.3f} M",
                f"{r['train_loss_last50']:.3f}",
                f"{r['heldout_loss']:.3f}",
                f"{r['heldout_ppl']:.1f}",
                f"{gap['relative_gap'] * 100:+.1f}%" if r["arch"] == "tnl" else "",
                f"{r['train_seconds']:.0f}",
            ]
        )
    header = ["arch", "seed", "params", "train loss (last 50)", "held-out loss", "held-out ppl",
              "TNL vs softmax", "train s"]  # fmt: skip
    return _md_table(header, rows)


# --------------------------------------------------------------------------------------------
# 2. MEAP vs NTP on key-value needle retrieval


@dataclass
class NeedleTask:
    """Token layout and sampling of the key-value needle task (see the module doc)."""

    num_keys: int = 32  # K key tokens
    num_values: int = 32  # V value tokens
    pad_id: int = 0
    bos_id: int = 1
    mask_id: int = 2

    @property
    def key_offset(self) -> int:
        return 3

    @property
    def value_offset(self) -> int:
        return 3 + self.num_keys

    @property
    def vocab_size(self) -> int:
        return 3 + self.num_keys + self.num_values

    def training_rows(self, rng: np.random.Generator, batch: int, n_pairs: int) -> np.ndarray:
        """(B, 1 + 2 n) rows BOS k v k v ...; per row s ~ U[8, n] keys, each with one value."""
        if n_pairs > self.num_keys:
            raise ValueError(f"n_pairs {n_pairs} > num_keys {self.num_keys}")
        rows = np.empty((batch, 1 + 2 * n_pairs), dtype=np.int64)
        rows[:, 0] = self.bos_id
        for b in range(batch):
            s = int(rng.integers(min(8, n_pairs), n_pairs + 1))
            keys = rng.choice(self.num_keys, s, replace=False)
            values = rng.integers(self.num_values, size=s)
            pick = rng.integers(s, size=n_pairs)
            rows[b, 1::2] = keys[pick] + self.key_offset
            rows[b, 2::2] = values[pick] + self.value_offset
        return rows

    def needle_rows(
        self, rng: np.random.Generator, batch: int, n_pairs: int, depth: float
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(rows (B, 2 n + 2): BOS, n pairs with distinct keys, the query key; answers (B,) the
        needle's value token; the needle's pair index round(depth x (n - 1)))."""
        if not 0 <= depth <= 1:
            raise ValueError(f"depth must be in [0, 1], received {depth}")
        if n_pairs > self.num_keys:
            raise ValueError(f"n_pairs {n_pairs} > num_keys {self.num_keys}")
        keys = np.argsort(rng.random((batch, self.num_keys)), axis=1)[:, :n_pairs]  # distinct
        values = rng.integers(self.num_values, size=(batch, n_pairs))
        at = round(depth * (n_pairs - 1))
        rows = np.empty((batch, 2 * n_pairs + 2), dtype=np.int64)
        rows[:, 0] = self.bos_id
        rows[:, 1:-1:2] = keys + self.key_offset
        rows[:, 2:-1:2] = values + self.value_offset
        rows[:, -1] = keys[:, at] + self.key_offset
        return rows, values[:, at] + self.value_offset, at

    def recallable(self, rows: np.ndarray) -> np.ndarray:
        """(B, T) bool: value positions whose key occurred earlier in the row."""
        out = np.zeros(rows.shape, dtype=bool)
        for b in range(rows.shape[0]):
            seen: set[int] = set()
            for t in range(1, rows.shape[1] - 1, 2):
                key = int(rows[b, t])
                out[b, t + 1] = key in seen
                seen.add(key)
        return out


@dataclass
class NeedleSettings:
    """Model and schedule of the meap-needle runs."""

    arch: Literal["softmax", "lightning"] = "softmax"  # TNL attention: softmax (SDPA) or lightning
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    train_pairs: int = 16  # pairs per training row (row length 33)
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-3
    mask_ratio: float = 0.15  # MEAP's masked input fraction
    lengths: tuple[int, ...] = (4, 8, 16)  # context lengths in pairs
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_examples: int = 200  # per (length, depth) cell
    heldout_rows: int = 256  # clean held-out rows for the loss


def needle_model(task: NeedleTask, s: NeedleSettings, seed: int) -> TNLForCausalLM:
    torch.manual_seed(seed)
    config = TNLConfig(
        vocab_size=task.vocab_size,
        hidden_size=s.hidden,
        intermediate_size=8 * ((8 * s.hidden // 3 + 7) // 8),
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        attention_type=s.arch,
        pad_token_id=task.pad_id,
        bos_token_id=task.bos_id,
    )
    return TNLForCausalLM(config)


@torch.no_grad()
def needle_accuracy(
    model: TNLForCausalLM, task: NeedleTask, s: NeedleSettings, seed: int
) -> dict[str, float]:
    """Accuracy of the query's next token per (length, depth): keys 'n=L,d=D'."""
    out = {}
    for n in s.lengths:
        for depth in s.depths:
            rows, answers, _ = task.needle_rows(
                _rng(seed, 1, n, int(depth * 100)), s.eval_examples, n, depth
            )
            logits = model(input_ids=torch.from_numpy(rows), use_cache=False).logits[:, -1]
            pred = logits.argmax(-1).numpy()
            out[f"n={n},d={depth:g}"] = float((pred == answers).mean())
    return out


@torch.no_grad()
def needle_heldout_loss(
    model: TNLForCausalLM, task: NeedleTask, s: NeedleSettings, seed: int
) -> dict[str, float]:
    """Clean next-token loss on fresh training-distribution rows: all positions, and the
    recallable value positions only."""
    rows = task.training_rows(_rng(seed, 2), s.heldout_rows, s.train_pairs)
    ids = torch.from_numpy(rows)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    nll = nll.view(ids.shape[0], -1)
    recall = torch.from_numpy(task.recallable(rows)[:, 1:])
    return {"loss_all": float(nll.mean()), "loss_recallable": float(nll[recall].mean())}


def run_meap_needle(s: NeedleSettings, seeds: Sequence[int]) -> dict[str, Any]:
    task = NeedleTask()
    meap = MEAPCollator(task.mask_id, task.pad_id, s.mask_ratio, protected_ids=[task.bos_id])
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for objective in ("ntp", "meap"):
            model = needle_model(task, s, seed)  # same init for both objectives

            def loss_fn(
                step: int,
                model: TNLForCausalLM = model,
                objective: str = objective,
                seed: int = seed,
            ) -> torch.Tensor:
                rows = task.training_rows(_rng(seed, 0, step), s.batch_size, s.train_pairs)
                ids = torch.from_numpy(rows)
                if objective == "meap":
                    ids = meap(ids, generator=_torch_gen(seed, 3, step)).input_ids
                # targets: the original tokens either way (MEAP keeps next-token targets)
                return model(input_ids=ids, labels=torch.from_numpy(rows), use_cache=False).loss

            t0 = time.time()
            losses = train_loop(model, loss_fn, s.steps, s.lr, f"{objective} seed {seed}")
            runs.append(
                {
                    "objective": objective,
                    "seed": seed,
                    "accuracy": needle_accuracy(model, task, s, seed),
                    **needle_heldout_loss(model, task, s, seed),
                    "train_loss_last50": statistics.fmean(losses[-50:]),
                    "train_seconds": round(time.time() - t0, 1),
                }
            )
    summary: dict[str, Any] = {}
    for objective in ("ntp", "meap"):
        mine = [r for r in runs if r["objective"] == objective]
        cells = {k: mean_and_spread([r["accuracy"][k] for r in mine]) for k in mine[0]["accuracy"]}
        summary[objective] = {
            "accuracy": cells,
            "mean_accuracy": mean_and_spread(
                [statistics.fmean(r["accuracy"].values()) for r in mine]
            ),
            "loss_all": mean_and_spread([r["loss_all"] for r in mine]),
            "loss_recallable": mean_and_spread([r["loss_recallable"] for r in mine]),
        }
    return {
        "settings": asdict(s),
        "task": asdict(task),
        "chance": 1.0 / task.num_values,
        "runs": runs,
        "summary": summary,
    }


def needle_tables(result: dict[str, Any]) -> str:
    s, summ = result["settings"], result["summary"]
    header = ["context (pairs)", "depth", "NTP acc", "MEAP acc", "MEAP - NTP"]
    rows = []
    for n in s["lengths"]:
        for d in s["depths"]:
            k = f"n={n},d={d:g}"
            a, b = summ["ntp"]["accuracy"][k], summ["meap"]["accuracy"][k]
            rows.append(
                [
                    n,
                    f"{d:g}",
                    f"{a['mean']:.3f} ± {a['std']:.3f}",
                    f"{b['mean']:.3f} ± {b['std']:.3f}",
                    f"{b['mean'] - a['mean']:+.3f}",
                ]
            )
    acc = _md_table(header, rows)
    rows = []
    for obj in ("ntp", "meap"):
        m = summ[obj]
        rows.append(
            [
                obj.upper(),
                f"{m['mean_accuracy']['mean']:.3f} ± {m['mean_accuracy']['std']:.3f}",
                f"{m['loss_all']['mean']:.3f} ± {m['loss_all']['std']:.3f}",
                f"{m['loss_recallable']['mean']:.3f} ± {m['loss_recallable']['std']:.3f}",
            ]
        )
    header = ["objective", "mean accuracy (all cells)", "clean held-out loss (all)",
              "clean held-out loss (recallable values)"]  # fmt: skip
    return acc + "\n\n" + _md_table(header, rows)


# --------------------------------------------------------------------------------------------
# 3. MoE with vs without the load-balancing loss


@dataclass
class MoESettings:
    """Model and schedule of the moe-balance runs."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    vocab: int = 2048  # BPE vocabulary trained on the pydoc training topics
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 400
    lr: float = 2e-3
    coefs: tuple[float, ...] = (0.0, 0.001, 0.01)  # aux_loss_coef of each run
    max_chars: int | None = None  # cap the corpus (quick runs)
    heldout_rows: int = 64


def moe_data(s: MoESettings) -> tuple[Any, np.ndarray, np.ndarray]:
    corpus = pydoc_corpus()
    if s.max_chars is not None:
        corpus = corpus.truncated(s.max_chars)
    tok = train_bpe_tokenizer(corpus.train, s.vocab)

    def rows(docs: list[str]) -> np.ndarray:
        return pack_documents(tokenize_documents(tok, docs), s.seq_len, tok.eos_token_id)

    return tok, rows(corpus.train), rows(corpus.heldout)[: s.heldout_rows]


def run_moe_balance(s: MoESettings, seed: int) -> dict[str, Any]:
    tok, train_rows, heldout_rows = moe_data(s)
    runs = []
    for coef in s.coefs:
        torch.manual_seed(seed)
        moe = MoEConfig(num_experts=s.num_experts, top_k=s.top_k, aux_loss_coef=coef)
        config = TNLConfig(
            vocab_size=len(tok),
            hidden_size=s.hidden,
            intermediate_size=8 * ((8 * s.hidden // 3 + 7) // 8),
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            moe=moe.to_dict(),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = TNLForCausalLM(config)
        train_loads: list[list[float]] = []

        def loss_fn(
            step: int, model: TNLForCausalLM = model, train_loads: list = train_loads
        ) -> torch.Tensor:
            idx = _rng(seed, 0, step).integers(len(train_rows), size=s.batch_size)
            ids = torch.from_numpy(train_rows[idx])
            out = model(input_ids=ids, labels=ids, use_cache=False)
            train_loads.append([coefficient_of_variation(lo) for lo in out.expert_load])
            return out.loss

        t0 = time.time()
        train_loop(model, loss_fn, s.steps, s.lr, f"moe aux {coef:g}")
        with torch.no_grad():
            ids = torch.from_numpy(heldout_rows)
            out = model(input_ids=ids, labels=ids, use_cache=False)
        loads = [lo.tolist() for lo in out.expert_load]
        cvs = [coefficient_of_variation(lo) for lo in out.expert_load]
        tail = train_loads[-max(1, s.steps // 10) :]
        runs.append(
            {
                "aux_loss_coef": coef,
                "heldout_lm_loss": float(out.lm_loss),
                "heldout_aux_loss": float(out.aux_loss),
                "heldout_load": loads,
                "heldout_cv_per_layer": cvs,
                "heldout_cv_mean": statistics.fmean(cvs),
                "heldout_max_share": [max(lo) / sum(lo) for lo in loads],
                "train_cv_last10pct_per_layer": np.mean(tail, axis=0).tolist(),
                "train_seconds": round(time.time() - t0, 1),
            }
        )
    return {
        "settings": asdict(s),
        "seed": seed,
        "train_rows": len(train_rows),
        "heldout_rows": len(heldout_rows),
        "collapsed_cv": math.sqrt(s.num_experts / s.top_k - 1),
        "runs": runs,
    }


def moe_table(result: dict[str, Any]) -> str:
    layers = result["settings"]["layers"]
    header = ["aux_loss_coef"]
    header += [f"CV layer {i}" for i in range(layers)]
    header += ["CV mean", "max expert share", "train CV (last 10%)", "aux loss", "held-out LM loss"]
    rows = []
    for r in result["runs"]:
        rows.append(
            [
                f"{r['aux_loss_coef']:g}",
                *[f"{v:.3f}" for v in r["heldout_cv_per_layer"]],
                f"**{r['heldout_cv_mean']:.3f}**",
                " / ".join(f"{v:.2f}" for v in r["heldout_max_share"]),
                f"{statistics.fmean(r['train_cv_last10pct_per_layer']):.3f}",
                f"{r['heldout_aux_loss']:.3f}",
                f"{r['heldout_lm_loss']:.3f}",
            ]
        )
    return _md_table(header, rows)


# --------------------------------------------------------------------------------------------
# 4. ERNIE-Gram vs span masking vs token masking


@dataclass
class PlantedCorpus:
    """Synthetic documents with planted phrases (see the module doc). Tokens: pad, bos/eos,
    unused, [MASK], then num_words words."""

    num_words: int = 400
    zipf: float = 1.0  # filler word p(rank r) ~ r^-zipf
    num_topics: int = 8
    bigrams_per_topic: int = 3
    trigrams_per_topic: int = 3
    phrase_prob: float = 0.08  # chance that the next item is a phrase of the document's topic
    doc_len: int = 128
    seed: int = 0  # which words form the phrases
    pad_id: int = 0
    mask_id: int = 3

    @property
    def word_offset(self) -> int:
        return 4

    @property
    def vocab_size(self) -> int:
        return 4 + self.num_words

    def phrases(self) -> list[list[tuple[int, ...]]]:
        """phrases[t]: the distinct n-grams (token ids) of topic t, bigrams first."""
        rng = _rng(self.seed, 10)
        seen: set[tuple[int, ...]] = set()
        out = []
        for _ in range(self.num_topics):
            mine: list[tuple[int, ...]] = []
            for n, count in ((2, self.bigrams_per_topic), (3, self.trigrams_per_topic)):
                while sum(len(g) == n for g in mine) < count:
                    # distinct words from the whole vocabulary (not only rare ones)
                    g = tuple(
                        int(w) + self.word_offset
                        for w in rng.choice(self.num_words, n, replace=False)
                    )
                    if g not in seen:
                        seen.add(g)
                        mine.append(g)
            out.append(mine)
        return out

    def planted(self) -> dict[int, set[tuple[int, ...]]]:
        """The planted n-grams by order."""
        out: dict[int, set[tuple[int, ...]]] = {}
        for topic in self.phrases():
            for g in topic:
                out.setdefault(len(g), set()).add(g)
        return out

    def documents(
        self, rng: np.random.Generator, count: int
    ) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
        """(docs (count, doc_len), occurrences[i]: (start, n) of every whole planted phrase)."""
        phrases = self.phrases()
        ranks = np.arange(1, self.num_words + 1, dtype=np.float64)
        p = ranks**-self.zipf
        p /= p.sum()
        docs = np.empty((count, self.doc_len), dtype=np.int64)
        occurrences = []
        for i in range(count):
            topic = phrases[int(rng.integers(self.num_topics))]
            toks: list[int] = []
            occ = []
            while len(toks) < self.doc_len:
                if rng.random() < self.phrase_prob:
                    g = topic[int(rng.integers(len(topic)))]
                    if len(toks) + len(g) <= self.doc_len:
                        occ.append((len(toks), len(g)))
                    toks += g
                else:
                    toks.append(int(rng.choice(self.num_words, p=p)) + self.word_offset)
            docs[i] = toks[: self.doc_len]
            occurrences.append(occ)
        return docs, occurrences


def lexicon_scores(
    corpus: PlantedCorpus, rows: np.ndarray, sizes: Sequence[int]
) -> list[dict[str, Any]]:
    """Precision and recall of the top-`size` t-test n-grams of each order against the planted
    ones; bigram precision also counting sub-bigrams of planted trigrams as right."""
    planted = corpus.planted()
    sub_bigrams = {g[i : i + 2] for g in planted.get(3, set()) for i in range(2)}
    out = []
    for n in sorted(planted):
        t = ngram_t_scores(rows, n, exclude_ids=[corpus.pad_id])
        ranked = [g for g, _ in sorted(t.items(), key=lambda kv: (-kv[1], kv[0]))]
        for size in sizes:
            top = ranked[:size]
            hits = sum(g in planted[n] for g in top)
            row = {
                "n": n,
                "size": size,
                "planted": len(planted[n]),
                "precision": hits / max(len(top), 1),
                "recall": hits / len(planted[n]),
            }
            if n == 2:
                loose = sum(g in planted[2] or g in sub_bigrams for g in top)
                row["precision_with_sub_ngrams"] = loose / max(len(top), 1)
            out.append(row)
    return out


@dataclass
class ErnieSettings:
    """Encoders and schedule of the ernie-masking runs."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    train_docs: int = 4000
    heldout_docs: int = 300
    batch_size: int = 32
    steps: int = 800
    lr: float = 1e-3
    mask_ratio: float = 0.15
    lexicon_size: int = 72  # n-grams kept per order (ERNIE-Gram's lexicon)
    span_p: float = 0.2  # SpanBERT geometric p
    max_span: int = 10  # SpanBERT clip


def _bert_config(vocab: int, s: ErnieSettings, seq_len: int) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=4 * s.hidden,
        max_position_embeddings=seq_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )


def build_ernie(vocab: int, lexicon: NGramLexicon, s: ErnieSettings, seq_len: int) -> Any:
    """A BERT encoder, its generator (half width, one layer) and the ERNIE-Gram heads, as
    train.pretrain_lm builds them."""
    from transformers import BertModel

    cfg = _bert_config(vocab, s, seq_len)
    gen_cfg = _bert_config(vocab, s, seq_len)
    gen_cfg.num_attention_heads = max(1, s.heads // 2)
    gen_cfg.hidden_size = gen_cfg.num_attention_heads * (s.hidden // s.heads)
    gen_cfg.intermediate_size = cfg.intermediate_size // 2
    gen_cfg.num_hidden_layers = 1
    config = ErnieGramConfig(vocab_size=vocab, lexicon_size=len(lexicon), max_n=lexicon.max_n)
    return ErnieGramForPretraining(BertModel(cfg), BertModel(gen_cfg), config)


@torch.no_grad()
def ngram_recovery(
    model: Any,
    kind: str,
    docs: np.ndarray,
    occurrences: list[list[tuple[int, int]]],
    corpus: PlantedCorpus,
    lexicon: NGramLexicon | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Whole-n-gram recovery of every planted occurrence, each masked on its own.

    kind "mlm": n [MASK] tokens, a BertForMaskedLM; kind "ernie": one collapsed [MASK] (with the
    unit's first position, as the collator does), predicted by the fine head slot by slot and by
    the coarse head's identity."""
    examples = [(i, s, n) for i, occ in enumerate(occurrences) for s, n in occ]
    hits: dict[str, list[bool]] = {"whole": [], "coarse": [], "token": []}
    orders: list[int] = []
    V = corpus.vocab_size
    for b0 in range(0, len(examples), batch_size):
        chunk = examples[b0 : b0 + batch_size]
        ids_list, pos_list = [], []
        for i, s, n in chunk:
            row = docs[i].tolist()
            if kind == "mlm":
                ids_list.append(row[:s] + [corpus.mask_id] * n + row[s + n :])
                pos_list.append(list(range(len(row))))
            else:
                ids_list.append([*row[:s], corpus.mask_id, *row[s + n :]])
                pos_list.append(list(range(s + 1)) + list(range(s + n, len(row))))
        T = max(map(len, ids_list))
        ids = torch.full((len(chunk), T), corpus.pad_id, dtype=torch.long)
        pos = torch.zeros((len(chunk), T), dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, (x, p) in enumerate(zip(ids_list, pos_list, strict=True)):
            ids[b, : len(x)] = torch.tensor(x)
            pos[b, : len(p)] = torch.tensor(p)
            att[b, : len(x)] = 1
        if kind == "mlm":
            logits = model(input_ids=ids, attention_mask=att).logits  # (B, T, V)
            for b, (i, s, n) in enumerate(chunk):
                pred = logits[b, s : s + n].argmax(-1).tolist()
                truth = docs[i, s : s + n].tolist()
                hits["whole"].append(pred == truth)
                hits["token"] += [a == t for a, t in zip(pred, truth, strict=True)]
                orders.append(n)
        else:
            h = model.encoder(input_ids=ids, attention_mask=att, position_ids=pos)
            h = h.last_hidden_state
            hm = h[torch.arange(len(chunk)), torch.tensor([s for _, s, _ in chunk])]  # (B, C)
            fine = model.fine_head(hm[:, None, :] + model.slot_embeddings.weight).argmax(-1)
            coarse = model.coarse_head(hm).argmax(-1)
            assert lexicon is not None
            for b, (i, s, n) in enumerate(chunk):
                truth = tuple(docs[i, s : s + n].tolist())
                pred = fine[b, :n].tolist()
                hits["whole"].append(pred == list(truth))
                hits["token"] += [a == t for a, t in zip(pred, truth, strict=True)]
                j = lexicon.index.get(truth)
                hits["coarse"].append(j is not None and int(coarse[b]) == V + j)
                orders.append(n)
    whole = np.array(hits["whole"])
    order = np.array(orders)
    out = {
        "examples": float(len(whole)),
        "whole_ngram": float(whole.mean()),
        "token_accuracy": float(np.mean(hits["token"])),
    }
    for n in sorted(set(orders)):
        out[f"whole_ngram_n{n}"] = float(whole[order == n].mean())
    if hits["coarse"]:
        out["whole_ngram_coarse"] = float(np.mean(hits["coarse"]))
    return out


def run_ernie_masking(s: ErnieSettings, corpus: PlantedCorpus, seed: int) -> dict[str, Any]:
    from transformers import BertForMaskedLM

    train_docs, _ = corpus.documents(_rng(seed, 20), s.train_docs)
    held_docs, held_occ = corpus.documents(_rng(seed, 21), s.heldout_docs)
    planted = corpus.planted()
    per_order = max(len(v) for v in planted.values())
    lex_table = lexicon_scores(corpus, train_docs, [per_order, 2 * per_order, s.lexicon_size])
    lexicon = build_ngram_lexicon(train_docs, s.lexicon_size, max_n=3, exclude_ids=[0])
    V, T = corpus.vocab_size, corpus.doc_len
    runs = []
    for method in ("ernie-gram", "span", "token"):
        torch.manual_seed(seed)
        model: Any
        loss_fn: Callable[[int], torch.Tensor]
        if method == "ernie-gram":
            model = build_ernie(V, lexicon, s, T)
            ernie = ErnieGramCollator(
                lexicon, V, corpus.mask_id, corpus.pad_id, s.mask_ratio, [corpus.pad_id]
            )

            def ernie_loss(
                step: int, model: Any = model, ernie: ErnieGramCollator = ernie
            ) -> torch.Tensor:
                idx = _rng(seed, 22, step).integers(len(train_docs), size=s.batch_size)
                gen = _torch_gen(seed, 23, step)
                batch = ernie(train_docs[idx], generator=gen)
                return model(**batch.model_inputs(), sample_generator=gen).loss

            loss_fn = ernie_loss
        else:
            model = BertForMaskedLM(_bert_config(V, s, T))
            span = SpanMaskingCollator(
                corpus.mask_id,
                corpus.pad_id,
                s.mask_ratio,
                p=s.span_p,
                max_span=s.max_span if method == "span" else 1,
            )

            def span_loss(
                step: int, model: Any = model, span: SpanMaskingCollator = span
            ) -> torch.Tensor:
                idx = _rng(seed, 22, step).integers(len(train_docs), size=s.batch_size)
                batch = span(train_docs[idx], generator=_torch_gen(seed, 23, step))
                return model(**batch.model_inputs()).loss

            loss_fn = span_loss

        t0 = time.time()
        losses = train_loop(model, loss_fn, s.steps, s.lr, method)
        kind = "ernie" if method == "ernie-gram" else "mlm"
        rec = ngram_recovery(model, kind, held_docs, held_occ, corpus, lexicon)
        runs.append(
            {
                "method": method,
                **rec,
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_loss_last50": statistics.fmean(losses[-50:]),
                "train_seconds": round(time.time() - t0, 1),
            }
        )
    lex_planted = {n: sum(g in planted[n] for g in lexicon.ngrams if len(g) == n) for n in planted}
    return {
        "settings": asdict(s),
        "corpus": asdict(corpus),
        "seed": seed,
        "lexicon": lex_table,
        "training_lexicon": {
            "size": len(lexicon),
            "planted_in_lexicon": lex_planted,
        },
        "runs": runs,
    }


def ernie_tables(result: dict[str, Any]) -> str:
    header = ["order n", "lexicon size", "planted", "precision", "recall"]
    rows = []
    for r in result["lexicon"]:
        prec = f"{r['precision']:.3f}"
        if "precision_with_sub_ngrams" in r:
            prec += f" ({r['precision_with_sub_ngrams']:.3f})"
        rows.append([r["n"], r["size"], r["planted"], prec, f"{r['recall']:.3f}"])
    lex = _md_table(header, rows)
    header = ["masking", "whole n-gram recovery", "bigrams", "trigrams", "token accuracy",
              "coarse (n-gram id)", "train s"]  # fmt: skip
    rows = []
    for r in result["runs"]:
        rows.append(
            [
                r["method"],
                f"**{r['whole_ngram']:.3f}**",
                f"{r.get('whole_ngram_n2', float('nan')):.3f}",
                f"{r.get('whole_ngram_n3', float('nan')):.3f}",
                f"{r['token_accuracy']:.3f}",
                f"{r['whole_ngram_coarse']:.3f}" if "whole_ngram_coarse" in r else "",
                f"{r['train_seconds']:.0f}",
            ]
        )
    return lex + "\n\n" + _md_table(header, rows)


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lm_experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    helps = {
        "tnl-vs-softmax": "TNL vs softmax attention LM: held-out loss",
        "meap-needle": "MEAP vs NTP: key-value needle retrieval by depth and length",
        "moe-balance": "MoE with vs without the load-balancing loss: CV of expert load",
        "ernie-masking": "ERNIE-Gram vs span vs token masking; t-test lexicon precision",
    }
    for name in EXPERIMENTS:
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("--quick", action="store_true", help="smoke-test sizes (seconds)")
        p.add_argument("--json", type=Path, help="write the result here")
        p.add_argument("--steps", type=int, help="optimizer steps (default: the experiment's)")
        if name in ("tnl-vs-softmax", "meap-needle"):
            p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 / 0 1 2)")
        else:
            p.add_argument("--seed", type=int, default=0)
        if name == "tnl-vs-softmax":
            p.add_argument("--workdir", type=Path, help="run folders (default: a temp dir)")
            p.add_argument(
                "--gate-act",
                choices=("sigmoid", "silu", "identity"),
                help="TNL's output gate activation (default: TNLConfig's, identity)",
            )
        if name == "meap-needle":
            p.add_argument("--arch", choices=("softmax", "lightning"), default="softmax")
        if name == "moe-balance":
            p.add_argument(
                "--coefs", type=float, nargs="+", help="aux_loss_coef values (default 0 1e-3 1e-2)"
            )
    return parser


def _environment() -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, received {args.steps}")
    t0 = time.time()
    result: dict[str, Any]
    if args.experiment == "tnl-vs-softmax":
        s = LMRunSettings()
        if args.quick:
            s = LMRunSettings(hidden=32, layers=1, heads=2, tokenizer="bpe:300", seq_len=32,
                              batch_size=4, steps=3, shapeworld_images=20, max_chars=6000,
                              eval_batches=2)  # fmt: skip
        if args.steps is not None:
            s.steps = args.steps
        s.gate_act = args.gate_act
        seeds = args.seeds or [0]
        if args.workdir is not None:
            result = run_tnl_vs_softmax(s, seeds, args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="tnl_vs_softmax_") as tmp:
                result = run_tnl_vs_softmax(s, seeds, Path(tmp))
        table = tnl_table(result)
    elif args.experiment == "meap-needle":
        ns = NeedleSettings(arch=args.arch)
        if args.quick:
            ns = NeedleSettings(arch=args.arch, hidden=16, layers=1, heads=2, train_pairs=8,
                                batch_size=4, steps=3, lengths=(4, 8), depths=(0.0, 1.0),
                                eval_examples=8, heldout_rows=8)  # fmt: skip
        if args.steps is not None:
            ns.steps = args.steps
        result = run_meap_needle(ns, args.seeds or ([0] if args.quick else [0, 1, 2]))
        table = needle_tables(result)
    elif args.experiment == "moe-balance":
        ms = MoESettings()
        if args.quick:
            ms = MoESettings(hidden=16, layers=2, heads=2, num_experts=4, vocab=300, seq_len=32,
                             batch_size=4, steps=3, max_chars=6000, heldout_rows=4)  # fmt: skip
        if args.steps is not None:
            ms.steps = args.steps
        if args.coefs is not None:
            ms.coefs = tuple(args.coefs)
        result = run_moe_balance(ms, args.seed)
        table = moe_table(result)
    else:
        es, corpus = ErnieSettings(), PlantedCorpus()
        if args.quick:
            es = ErnieSettings(hidden=16, layers=1, heads=2, train_docs=60, heldout_docs=6,
                               batch_size=4, steps=3, lexicon_size=8)  # fmt: skip
            corpus = PlantedCorpus(num_words=50, num_topics=2, bigrams_per_topic=2,
                                   trigrams_per_topic=2, doc_len=32, phrase_prob=0.15)  # fmt: skip
        if args.steps is not None:
            es.steps = args.steps
        result = run_ernie_masking(es, corpus, args.seed)
        table = ernie_tables(result)
    result = {
        "experiment": args.experiment,
        "quick": args.quick,
        **result,
        "environment": _environment(),
        "seconds": round(time.time() - t0, 1),
    }
    print(table)
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
