"""Make any Hugging Face causal LM N:M sparse: one-shot (magnitude, Wanda, SparseGPT) or MaskLLM.

    # one-shot 2:4 SparseGPT of SmolLM2 on 32 calibration rows of 512 pydoc tokens
    python -m train.sparsify --model smollm2-135m-instruct --method sparsegpt --nm 2:4 \\
        --calib-seqs 32 --seq-len 512 --out runs/smol_sparsegpt
    python -m train.sparsify --model smollm2-135m-instruct --method wanda --out runs/smol_wanda
    python -m train.sparsify --model smollm2-135m-instruct --method magnitude --out runs/smol_mag
    # MaskLLM: learn the masks (weights frozen) from a SparseGPT prior, bf16 autocast
    python -m train.sparsify --model smollm2-135m-instruct --method maskllm --prior sparsegpt \\
        --steps 200 --batch-size 2 --lr 1e-3 --bf16 --out runs/smol_maskllm
    # continue it from <out>/last (same batches and Gumbel noise as an uninterrupted run)
    python -m train.sparsify ... --out runs/smol_maskllm --resume
    # data parallel: 2 CPU processes (gloo; on GPUs a configs/accelerate file), global batch 4
    accelerate launch --multi_gpu --num_processes 2 -m train.sparsify \\
        --model smollm2-135m-instruct --method maskllm --batch-size 4 --out runs/smol_maskllm
    # only the MLPs, your own text (every tenth file held out for the perplexity)
    python -m train.sparsify --model ./my_model --method wanda --include '*.mlp.*' \\
        --corpus 'files:notes/**/*.txt' --out runs/mine

Layers: every nn.Linear inside the decoder blocks (not embeddings, not lm_head; not MoE
routers) unless --include / --exclude globs on module names say otherwise.

Data (lm.corpus): --corpus pydoc (default; its held-out topics) or files:GLOB, tokenized with the
model's tokenizer and packed into rows of --seq-len tokens (EOS between documents). Calibration:
--calib-seqs rows drawn at random (--seed) from the training split. MaskLLM trains on all
training rows (batch order a pure function of --seed and the step). Perplexity: the first
--eval-rows held-out rows (all with 0), fp32, before and after.

MaskLLM (lm.sparsity.maskllm): gates over the C(M, N) patterns of every group, Gumbel-softmax
with tau 4 -> 0.05 and logit scale 1e2 -> 5e2 (linear over --steps), prior from a one-shot
--prior mask (saved in <out>/prior, a sparse checkpoint of the prior mask on the dense weights:
the model at step 0), AdamW on the gates (cosine to 0.1 x --lr), loss = LM loss -
weight_reg * (1 - step/steps) * sum ||W ⊙ mask||^2. The paper's script uses lr 5e-5 for 2000
steps of 256 x 4096 tokens; short CPU runs need a larger --lr (1e-3). --stop-at and
--max-minutes save <out>/last and stop; --resume continues.

Data parallel (``accelerate launch``, train.common.DataParallel): N processes give the masks of
one (tests/test_scaling_sparsify.py). MaskLLM's --batch-size is global: every process draws the
same global batch (a pure function of --seed and the step) and runs its slice; DDP averages the
gates' gradients. Each process's LM loss, a mean over its slice's tokens, is weighted by the
slice's share of the batch's tokens, so the average is the global token mean's gradient (packed
rows of --seq-len make every share 1). The Gumbel noise of a step comes from a generator seeded
with (--seed, step): one mask sample for the whole batch, in every process as in one, and the
same in a resumed run. Wanda and SparseGPT (also as the MaskLLM prior) split the --calib-seqs
rows over the processes and sum the statistics of every layer over them (Wanda's column norms,
SparseGPT's X X^T) before pruning it, so every process prunes as one process with all the rows;
magnitude needs no data, every process prunes alike. Perplexities run on the main process, which
alone writes the outputs.

Outputs in --out: ``sparse/`` (lm.sparsity.checkpoint: uint8 pattern indices, SparseGPT's kept
values; load with lm.sparsity.load_sparse_model), ``results.json`` (the run config, held-out
perplexity dense / prior / sparse, token counts, timings, the command), ``dense_eval.json`` (the
dense perplexity, reused by later runs in the same folder), and for MaskLLM ``prior/``,
``last/`` (train.common resumable state: the gates, AdamW, RNG) and ``log.json`` (per step).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from core.checkpoint import CheckpointError
from core.io import atomic_write_text
from core.runtime import resolve_device, seed_everything
from lm.corpus import Corpus, pack_documents, pydoc_corpus, text_files_corpus, tokenize_documents
from lm.loading import load_causal_lm
from lm.sparsity import (
    NM,
    MaskLLMConfig,
    apply_mask,
    calibration_rows,
    check_nm,
    heldout_rows,
    init_from_prior,
    install_masks,
    kept_weight_norm,
    lm_nll,
    load_sparse_checkpoint,
    prunable_linears,
    prune_oneshot,
    regulariser_coef,
    remove_masks,
    save_sparse_checkpoint,
    set_schedule,
    sparsity_report,
    weights_digest,
)
from lm.sparsity.masks import DEFAULT_EXCLUDE
from lm.sparsity.oneshot import Method
from train.common import (
    DataParallel,
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    load_training_state,
    resume_mismatches,
    save_training_state,
)

METHODS = ("magnitude", "wanda", "sparsegpt", "maskllm")
PRIORS = ("sparsegpt", "wanda", "magnitude", "none")
# run-config keys that must match when resuming
RESUME_KEYS = (
    "model",
    "method",
    "nm",
    "layers",
    "corpus",
    "seq_len",
    "calib_seqs",
    "prior",
    "prior_strength",
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "maskllm",
)


# --------------------------------------------------------------------------------------------
# Data and evaluation


def load_corpus(args: argparse.Namespace) -> Corpus:
    if args.corpus == "pydoc":
        return pydoc_corpus()
    return text_files_corpus(args.corpus.removeprefix("files:"), per_line=args.files_per_line)


def evaluate(model: Any, rows: torch.Tensor, args: argparse.Namespace, what: str) -> dict:
    t0 = time.time()
    nll, tokens = lm_nll(
        model, rows, args.eval_batch_size, args.device, desc=f"held-out perplexity ({what})"
    )
    return {
        "ppl": math.exp(min(nll / tokens, 700.0)),
        "nll_per_token": nll / tokens,
        "tokens": tokens,
        "seconds": round(time.time() - t0, 1),
    }


def dense_evaluation(model: Any, rows: torch.Tensor, args: argparse.Namespace) -> dict:
    """The dense model's held-out perplexity, cached in <out>/dense_eval.json for this setup."""
    key = {"model": args.model, "corpus": args.corpus, "seq_len": args.seq_len, "rows": len(rows)}
    path = args.out / "dense_eval.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return dict(saved["result"])
    result = evaluate(model, rows, args, "dense")
    atomic_write_text(path, json.dumps({"key": key, "result": result}, indent=1))
    return result


# --------------------------------------------------------------------------------------------
# One-shot pruning, the calibration rows split over the processes


def prune_shared(
    model: Any,
    method: Method,
    nm: NM,
    calib: torch.Tensor,
    args: argparse.Namespace,
    dp: DataParallel,
) -> dict[str, torch.Tensor]:
    """prune_oneshot on this process's share of the calibration rows (round robin), every layer's
    statistics summed over the processes: each process returns the masks (and SparseGPT's
    weights) of one process with all the rows."""

    def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, dp.accelerator.reduce(t, "sum"))

    return prune_oneshot(
        model,
        method,
        nm,
        calib[dp.rank :: dp.world],
        include=args.include,
        exclude=args.exclude,
        blocksize=args.blocksize,
        percdamp=args.percdamp,
        device=args.device,
        progress=dp.main,
        sum_over_processes=sum_over_processes if dp.world > 1 else None,
    )


# --------------------------------------------------------------------------------------------
# MaskLLM


def prior_masks(
    model: Any,
    linears: dict[str, torch.nn.Linear],
    nm: NM,
    calib: torch.Tensor,
    heldout: torch.Tensor,
    args: argparse.Namespace,
    digest: str,
    dp: DataParallel,
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The --prior one-shot masks (dense weights left unchanged) and the held-out perplexity of
    the prior mask on the dense weights; both saved in / reused from <out>/prior. Every process
    computes the masks (prune_shared); the main one evaluates (None elsewhere) and saves."""
    path = args.out / "prior"
    found = path.is_dir()
    dp.accelerator.wait_for_everyone()  # all have looked before the main process may write it
    if found:
        try:
            ckpt = load_sparse_checkpoint(path)
        except CheckpointError as err:
            raise SystemExit(f"{path}: unreadable prior ({err}); delete it to recompute") from None
        if (ckpt.method, ckpt.nm, ckpt.source_digest, sorted(ckpt.masks)) == (
            args.prior,
            nm,
            digest,
            sorted(linears),
        ):
            return ckpt.masks, ckpt.metadata.get("heldout")
        raise SystemExit(f"{path} holds another prior (method, N:M, layers or weights); delete it")
    dense = {name: layer.weight.detach().clone() for name, layer in linears.items()}
    masks = prune_shared(model, args.prior, nm, calib, args, dp)
    result = None
    if dp.main:
        with torch.no_grad():  # MaskLLM masks the frozen dense weights: the prior's mask only
            for name, layer in linears.items():
                layer.weight.copy_(apply_mask(dense[name], masks[name]))
        result = evaluate(model, heldout, args, f"{args.prior} prior mask")
        save_sparse_checkpoint(
            path,
            model,
            masks,
            nm,
            source=args.model,
            method=args.prior,
            kept_values=False,
            source_digest=digest,
            metadata={"heldout": result, "role": "MaskLLM prior: the mask on the dense weights"},
        )
    with torch.no_grad():
        for name, layer in linears.items():
            layer.weight.copy_(dense[name])
    return masks, result


def gumbel_seed(seed: int, step: int) -> int:
    """The seed of the Gumbel noise of `step`: a pure function of (--seed, step)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def train_maskllm(
    model: Any,
    linears: dict[str, torch.nn.Linear],
    priors: dict[str, torch.Tensor] | None,
    train_rows: torch.Tensor,
    args: argparse.Namespace,
    run_config: dict[str, Any],
    dp: DataParallel,
) -> tuple[dict[str, torch.Tensor] | None, list[dict[str, float]]]:
    """Learn the masks; returns (hard masks, or None when stopped early by --stop-at or
    --max-minutes, the log). Every process runs it; the main one logs and saves."""
    cfg = MaskLLMConfig.from_dict(run_config["maskllm"])
    masked = install_masks(model, linears, cfg)
    if priors is not None:
        init_from_prior(masked, priors, cfg.prior_strength)
    gates = [layer.diff_mask.gate for layer in masked.values()]
    optimizer = torch.optim.AdamW(
        gates, lr=args.lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=args.weight_decay
    )
    scheduler = cosine_with_warmup(optimizer, 0, args.steps, min_ratio=0.1)
    log_path = args.out / "log.json"
    log: list[dict[str, float]] = []
    start = 0
    if args.resume:
        start = load_training_state(args.out, model, optimizer, scheduler)
        if dp.main and log_path.is_file():
            log = [r for r in json.loads(log_path.read_text())["train"] if r["step"] <= start]
    model.train()
    # Each process runs its slice of the global batch; DDP averages the gates' gradients (the
    # only trained tensors), so N processes take the steps one process takes.
    ddp, optimizer = dp.accelerator.prepare(model, optimizer)
    stop = args.stop_at if args.stop_at is not None else args.steps
    batches = batch_indices(len(train_rows), args.batch_size, args.seed, start)
    autocast = torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)
    bar = tqdm(
        range(start, stop),
        initial=start,
        total=args.steps,
        desc="maskllm",
        unit="step",
        disable=not dp.main,
    )

    def save(done: int) -> None:  # the main process: the state and the log so far
        save_training_state(args.out, model, optimizer, scheduler, done, run_config)
        atomic_write_text(log_path, json.dumps({"config": run_config, "train": log}, indent=1))

    t0 = time.time()
    done = start
    for step in bar:
        # one mask sample per layer for the whole global batch: the same noise in every process
        tau, kappa = set_schedule(masked, cfg, step, args.steps, gumbel_seed(args.seed, step))
        mine = dp.part(next(batches).tolist())  # this process's slice of the global batch
        ids = train_rows[mine].to(args.device)
        with autocast:
            lm_loss = ddp(input_ids=ids, labels=ids, use_cache=False).loss
        # lm_loss is the mean over this slice's predicted tokens: weighted by the slice's share
        # of the batch's, DDP's average is the gradient of the global token mean. The
        # regulariser depends only on the mask sample, the same in every process: unweighted.
        n_tokens = ids[:, 1:].numel()
        n_all = dp.total(n_tokens)
        reg = kept_weight_norm(masked)
        coef = regulariser_coef(cfg, step, args.steps)
        dp.accelerator.backward(lm_loss * (n_tokens * dp.world / n_all) - coef * reg)
        grad_norm = dp.accelerator.clip_grad_norm_(gates, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        lm_mean = dp.total(float(lm_loss.detach()) * n_tokens) / n_all
        row = {
            "step": done,
            "loss": lm_mean - coef * float(reg.detach()),
            "lm_loss": lm_mean,
            "kept_weight_norm": float(reg.detach()),
            "grad_norm": float(grad_norm),  # before clipping to 1
            "reg_coef": coef,
            "temperature": tau,
            "scale": kappa,
            "lr": scheduler.get_last_lr()[0],
            "time": round(time.time() - t0, 2),
        }
        log.append(row)
        bar.set_postfix(lm_loss=f"{row['lm_loss']:.3f}", tau=f"{tau:.2f}")
        elapsed = time.time() - t0
        if dp.end_step(done, save, elapsed, args, last=stop):
            break
    bar.close()
    model.eval()
    if done < args.steps:
        if dp.main:
            print(f"stopped at step {done} of {args.steps}; continue with --resume")
        return None, log
    return remove_masks(model, masked), log


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.sparsify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model source: packaged name, folder, hub")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--nm", default="2:4", help="N:M pattern, N kept of M (default 2:4)")
    parser.add_argument(
        "--include", action="append", help="glob on module names of layers to prune (repeat)"
    )
    parser.add_argument(
        "--exclude",
        action="append",
        help=f"glob of layers to leave dense (repeat; default {list(DEFAULT_EXCLUDE)})",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--corpus", default="pydoc", help="pydoc | files:GLOB (default pydoc)")
    data.add_argument("--files-per-line", action="store_true", help="files: one document a line")
    data.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    data.add_argument("--calib-seqs", type=int, default=32, help="calibration rows (default 32)")
    data.add_argument(
        "--eval-rows", type=int, default=32, help="held-out rows for perplexity; 0 = all"
    )
    data.add_argument("--eval-batch-size", type=int, default=4)
    data.add_argument("--seed", type=int, default=0, help="calibration draw, batches, Gumbel")
    sgpt = parser.add_argument_group("SparseGPT")
    sgpt.add_argument("--blocksize", type=int, default=128, help="columns per lazy-update block")
    sgpt.add_argument("--percdamp", type=float, default=0.01, help="damping, x mean diag(H)")
    mask = parser.add_argument_group("MaskLLM")
    mask.add_argument("--prior", choices=PRIORS, default="sparsegpt", help="prior mask method")
    mask.add_argument("--prior-strength", type=float, default=3.0)
    mask.add_argument("--steps", type=int, default=100, help="optimizer steps")
    mask.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="rows per step, global (split over the processes of accelerate launch)",
    )
    mask.add_argument("--lr", type=float, default=5e-5, help="peak AdamW lr of the gates")
    mask.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of the gates")
    mask.add_argument("--temperature", type=float, nargs=2, default=(4.0, 0.05), metavar="T")
    mask.add_argument("--scale", type=float, nargs=2, default=(1e2, 5e2), metavar="S")
    mask.add_argument("--weight-reg", type=float, default=1e-5, help="kept-weight reward lambda")
    mask.add_argument("--hard", action="store_true", help="straight-through hard samples")
    mask.add_argument("--bf16", action="store_true", help="bf16 autocast for the mask training")
    mask.add_argument("--save-every", type=int, default=50, help="steps between <out>/last")
    mask.add_argument("--stop-at", type=int, default=None, help="save and stop after this step")
    mask.add_argument(
        "--max-minutes", type=float, default=None, help="save and stop after this training time"
    )
    mask.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> NM:
    try:
        nm = NM.parse(args.nm)
    except ValueError as err:
        parser.error(f"--nm: {err}")
    if args.corpus != "pydoc" and not args.corpus.startswith("files:"):
        parser.error(f"--corpus must be pydoc or files:GLOB, received {args.corpus!r}")
    if args.method != "maskllm" and (
        args.resume or args.stop_at is not None or args.max_minutes is not None
    ):
        parser.error(
            "--resume, --stop-at and --max-minutes apply to --method maskllm (one-shot runs take "
            "seconds)"
        )
    check_run_args(
        parser,
        args,
        ("seq_len", "calib_seqs", "eval_batch_size", "steps", "batch_size", "save_every"),
    )
    if args.eval_rows < 0:
        parser.error(f"--eval-rows must be >= 0, received {args.eval_rows}")
    if args.blocksize % nm.m:
        parser.error(f"--blocksize must be a multiple of M={nm.m}, received {args.blocksize}")
    args.exclude = args.exclude if args.exclude is not None else list(DEFAULT_EXCLUDE)
    return nm


def _split_over_processes(
    parser: argparse.ArgumentParser, args: argparse.Namespace, dp: DataParallel
) -> str:
    """Check that the global sizes split over the processes; returns how they are split."""
    calibrated = args.method if args.method != "maskllm" else args.prior
    parts = []
    if args.method == "maskllm":
        why = dp.divides(batch_size=args.batch_size)
        if why:
            parser.error(why)
        parts.append(f"{args.batch_size // dp.world} rows each per step")
    if calibrated in ("wanda", "sparsegpt"):
        if args.calib_seqs < dp.world:
            parser.error(
                f"--calib-seqs {args.calib_seqs} is split over the {dp.world} processes: "
                "each needs at least one row"
            )
        low, high = args.calib_seqs // dp.world, -(-args.calib_seqs // dp.world)
        share = str(low) if low == high else f"{low}-{high}"
        parts.append(f"{share} {calibrated} calibration rows each")
    elif calibrated == "magnitude":
        parts.append("magnitude needs no data, each prunes alike")
    return f"{dp.world} process(es), " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    nm = _check_args(parser, args)
    command = "python -m train.sparsify " + shlex.join(argv)
    dp = DataParallel(resolve_device(args.device))
    args.device = dp.device
    split = _split_over_processes(parser, args, dp)
    seed_everything(args.seed)
    if dp.main:
        args.out.mkdir(parents=True, exist_ok=True)
        print(split)
    t_start = time.time()

    import lm.tnl  # noqa: F401  (registers TNL with the Auto classes)

    model, tokenizer = load_causal_lm(args.model, frozen=True, device=args.device)
    corpus = load_corpus(args)
    heldout = heldout_rows(tokenizer, corpus.heldout, args.seq_len, args.eval_rows or None)
    calib = calibration_rows(tokenizer, corpus.train, args.calib_seqs, args.seq_len, args.seed)
    linears = prunable_linears(model, nm, args.include, args.exclude)
    digest = weights_digest(model, list(linears))
    maskllm_cfg = MaskLLMConfig(
        n=nm.n,
        m=nm.m,
        temperature_start=args.temperature[0],
        temperature_end=args.temperature[1],
        scale_start=args.scale[0],
        scale_end=args.scale[1],
        prior_strength=args.prior_strength if args.prior != "none" else 0.0,
        weight_reg=args.weight_reg,
        hard=args.hard,
    )
    run_config: dict[str, Any] = {
        "model": args.model,
        "method": args.method,
        "nm": str(nm),
        "layers": len(linears),
        "pruned_parameters": sum(layer.weight.numel() for layer in linears.values()),
        "include": args.include,
        "exclude": args.exclude,
        "corpus": args.corpus,
        "seq_len": args.seq_len,
        "calib_seqs": args.calib_seqs,
        "calib_tokens": calib.numel(),
        "heldout_rows": len(heldout),
        "seed": args.seed,
        "device": str(args.device),
        "processes": dp.world,
        "torch": torch.__version__,
    }
    if args.method in ("sparsegpt", "maskllm"):
        run_config.update(blocksize=args.blocksize, percdamp=args.percdamp)
    if args.method == "maskllm":
        run_config.update(
            prior=args.prior,
            prior_strength=args.prior_strength,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            bf16=args.bf16,
            maskllm=maskllm_cfg.to_dict(),
        )
        run_config["train_tokens"] = args.steps * args.batch_size * args.seq_len
    if args.resume:
        mismatch = resume_mismatches(args.out, run_config, RESUME_KEYS)
        if mismatch:
            parser.error(f"--resume: {mismatch}")
    results: dict[str, Any] = {"command": command, "config": run_config}
    if dp.main:  # the others go on, to wait for it at their next collective
        results["dense"] = dense_evaluation(model, heldout, args)

    t_prune = time.time()
    if args.method == "maskllm":
        priors, prior_eval = None, None
        if args.prior != "none":
            priors, prior_eval = prior_masks(model, linears, nm, calib, heldout, args, digest, dp)
            results["prior"] = prior_eval
        ids = pack_documents(
            tokenize_documents(tokenizer, corpus.train), args.seq_len, tokenizer.eos_token_id
        )
        train_rows = torch.from_numpy(ids)
        if len(train_rows) < args.batch_size:
            parser.error(f"{len(train_rows)} training rows < --batch-size {args.batch_size}")
        run_config["train_rows"] = len(train_rows)
        masks, log = train_maskllm(model, linears, priors, train_rows, args, run_config, dp)
        if masks is None:
            return 0
        results["train_final"] = log[-1] if log else None
    else:
        masks = prune_shared(model, args.method, nm, calib, args, dp)
    if not dp.main:
        return 0  # the main process evaluates and writes
    results["prune_seconds"] = round(time.time() - t_prune, 1)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        check_nm(mask, nm, name=name)
        check_nm(modules[name].weight, nm, exact=False, name=f"{name}.weight")
    results["sparsity"] = sparsity_report(model, masks)
    results["sparse"] = evaluate(model, heldout, args, args.method)
    save_sparse_checkpoint(
        args.out / "sparse",
        model,
        masks,
        nm,
        source=args.model,
        method=args.method,
        kept_values=args.method == "sparsegpt",
        source_digest=digest,
        metadata={"heldout": results["sparse"], "dense_heldout": results["dense"]},
        overwrite=True,
    )
    results["seconds"] = round(time.time() - t_start, 1)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    d, s = results["dense"]["ppl"], results["sparse"]["ppl"]
    tokens = results["dense"]["tokens"]
    print(f"held-out perplexity ({tokens} tokens): dense {d:.3f} -> {nm} {args.method} {s:.3f}")
    print(f"wrote {args.out / 'sparse'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
