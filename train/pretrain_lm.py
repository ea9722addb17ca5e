"""Pretrain a language model with NTP, MEAP or ERNIE-Gram on pydoc, ShapeWorld or your own text.

    # a fresh TransNormerLLM (lightning attention) with next-token prediction on pydoc topics
    python -m train.pretrain_lm --objective ntp --arch tnl --hidden 256 --layers 4 --heads 4 \\
        --tokenizer bpe:8192 --corpus pydoc --seq-len 256 --batch-size 16 --steps 2000 \\
        --lr 1e-3 --out runs/tnl_ntp
    # the same model with softmax attention (the comparison baseline), and with MEAP
    python -m train.pretrain_lm --objective ntp --arch softmax ... --out runs/softmax_ntp
    python -m train.pretrain_lm --objective meap --arch tnl ... --out runs/tnl_meap
    # ERNIE-Gram on a small BERT, with ShapeWorld captions generated on the fly as extra text
    python -m train.pretrain_lm --objective ernie-gram --arch bert --hidden 256 --layers 4 \\
        --heads 4 --corpus pydoc --corpus shapeworld --shapeworld-images 2000 --out runs/ernie
    # continue any run from <out>/last (same batches and masks as an uninterrupted run)
    python -m train.pretrain_lm ... --out runs/tnl_ntp --resume
    # any HF causal LM (MEAP adds a [MASK] token and resizes its embeddings), your own files
    python -m train.pretrain_lm --objective meap --model smollm2-135m-instruct \\
        --corpus 'files:notes/**/*.txt' --files-per-line --seq-len 512 --out runs/smol_meap
    # several GPUs: each process takes its own slice of every global batch
    accelerate launch -m train.pretrain_lm ... --device cuda

Model: ``--model SOURCE`` (a core.sources spec: packaged name, hf-hub:org/name, local folder; a
causal LM for ntp/meap, an encoder loaded with AutoModel for ernie-gram) or a fresh ``--arch``:
``tnl`` (lm.tnl, lightning attention), ``softmax`` (the same TNL with attention_type="softmax"),
``bert`` (a BertModel encoder for ernie-gram; its generator is a BERT with half the width and a
third of the layers). Tokenizer: ``smollm2`` (SmolLM2's, from the packaged model), ``bpe:VOCAB``
(byte-level BPE trained on the training text) or a tokenizer folder / model source; default: the
--model's own, else bpe:8192. MEAP and ERNIE-Gram add a mask token when it has none.

Data: documents of every ``--corpus`` (lm.corpus: ``pydoc`` with its held-out topics,
``files:GLOB`` with every tenth document held out, ``shapeworld``: captions of an exported
``--shapeworld-dir`` (pretrain + train splits; val held out) or of ``--shapeworld-images`` scenes
generated on the fly (pretrain split; val scenes held out), one document per image) are tokenized,
joined with EOS after each document and packed into rows of --seq-len tokens.

Loop: AdamW, linear warmup + cosine, grad clip 1.0, accelerate (bf16 autocast on CUDA). The batch
order is a pure function of (seed, step) and every mask and generator sample comes from a
torch.Generator seeded by (seed, step), so --resume continues exactly. Held-out evaluation every
--eval-every steps and at the end: next-token loss and perplexity on clean held-out rows (ntp,
meap), the ERNIE-Gram losses with fixed masks (ernie-gram).

Outputs in --out: ``tokenizer/``; ``last/`` (train.common resumable state); ``log.json`` (run
config, per-step training losses, held-out evaluations); ``loss_curve.png``; at the end
``final/``: save_pretrained (safetensors) of the model (ernie-gram: the encoder, plus
``generator/``, ``ernie_gram_heads.safetensors``, ``ernie_gram_config.json``,
``ngram_lexicon.json``), the tokenizer and a MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm import tqdm

from core.io import atomic_dir, atomic_write_text
from core.runtime import resolve_device, seed_everything
from core.sources import resolve_source
from lm.corpus import (
    Corpus,
    documents_digest,
    pack_documents,
    pydoc_corpus,
    text_files_corpus,
    tokenize_documents,
    train_bpe_tokenizer,
)
from lm.loading import load_tokenizer
from lm.objectives import (
    ErnieGramCollator,
    ErnieGramConfig,
    ErnieGramForPretraining,
    MEAPCollator,
    NGramLexicon,
    NTPCollator,
    build_ngram_lexicon,
    ensure_mask_token,
)
from train.common import (
    adamw_matrices_decay,
    batch_indices,
    check_run_args,
    cosine_with_warmup,
    load_training_state,
    make_accelerator,
    resume_mismatches,
    save_training_state,
)

OBJECTIVES = ("ntp", "meap", "ernie-gram")
ARCHS = ("tnl", "softmax", "bert")
FINAL = "final"
LOG_NAME = "log.json"
PLOT_NAME = "loss_curve.png"
TOKENIZER_DIR = "tokenizer"
LEXICON_NAME = "ngram_lexicon.json"
EVAL_STREAM = 2**31 - 1  # step_generator key of the held-out masks (no training step has it)
# run-config keys that must match when resuming (the rest may change between runs)
RESUME_KEYS = (
    "objective",
    "model",
    "arch",
    "hidden",
    "layers",
    "heads",
    "seq_len",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup",
    "steps",
    "seed",
    "mask_ratio",
    "corpora",
    "processes",  # --batch-size is per process: another count is another global batch
    "gate_act",  # TNL's output gate: its default changed in session 23, a resume must not
)


# --------------------------------------------------------------------------------------------
# Data


def shapeworld_corpus(args: argparse.Namespace) -> Corpus:
    """ShapeWorld captions, one document per image (see the module doc)."""
    if args.shapeworld_dir is not None:
        from data.datasets import CaptionDataset, shapeworld_paths

        def split_docs(split: str) -> list[str]:
            try:
                shapeworld_paths(args.shapeworld_dir, split)
            except FileNotFoundError:
                return []
            return [
                " ".join(c)
                for c in CaptionDataset.from_shapeworld(args.shapeworld_dir, split).captions
            ]

        train = split_docs("pretrain") + split_docs("train")
        return Corpus.from_documents(
            "shapeworld", train, split_docs("val"), root=str(args.shapeworld_dir)
        )
    from data.render import LayoutConfig
    from data.shapeworld import generate_scene

    layout = LayoutConfig()
    n_train, n_val = args.shapeworld_images, max(1, args.shapeworld_images // 10)

    def generated(split: str, n: int) -> list[str]:
        scenes = (generate_scene(layout, args.seed, split, i) for i in range(n))
        desc = f"shapeworld {split} captions"
        return [" ".join(s.captions) for s in tqdm(scenes, total=n, desc=desc, unit="img")]

    return Corpus.from_documents(
        "shapeworld",
        generated("pretrain", n_train),
        generated("val", n_val),
        generated_images=n_train,
        heldout_images=n_val,
        data_seed=args.seed,
    )


def load_corpora(args: argparse.Namespace) -> list[Corpus]:
    corpora = []
    for spec in args.corpus:
        if spec == "pydoc":
            corpus = pydoc_corpus()
        elif spec == "shapeworld":
            corpus = shapeworld_corpus(args)
        else:
            corpus = text_files_corpus(spec.removeprefix("files:"), per_line=args.files_per_line)
        corpora.append(corpus.truncated(args.max_chars) if args.max_chars else corpus)
    return corpora


def packed_rows(tokenizer: Any, docs: list[str], seq_len: int) -> np.ndarray:
    return pack_documents(tokenize_documents(tokenizer, docs), seq_len, tokenizer.eos_token_id)


# --------------------------------------------------------------------------------------------
# Tokenizer and models


def build_tokenizer(args: argparse.Namespace, train_docs: list[str]) -> Any:
    """The tokenizer named by --tokenizer (see the module doc), with pad, EOS and, for MEAP and
    ERNIE-Gram, a mask token."""
    spec = args.tokenizer or (args.model if args.model else "bpe:8192")
    if spec.startswith("bpe:"):
        tokenizer = train_bpe_tokenizer(train_docs, int(spec.removeprefix("bpe:")))
    elif spec == "smollm2":
        tokenizer = load_tokenizer("smollm2-135m-instruct")
    else:
        tokenizer = load_tokenizer(spec)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} has no EOS token (the document separator)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.objective != "ntp":
        ensure_mask_token(tokenizer)
    return tokenizer


def special_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids.add(tokenizer.mask_token_id)
    return sorted(i for i in ids if i is not None)


def build_causal_lm(args: argparse.Namespace, tokenizer: Any) -> Any:
    """--model loaded with AutoModelForCausalLM, or a fresh TNL (lightning or softmax)."""
    import lm.tnl  # registers TNL with the Auto classes (for TNL checkpoints too)

    if args.model is not None:
        from transformers import AutoModelForCausalLM

        name, kwargs = resolve_source(args.model).pretrained_args()
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        if args.objective == "meap":
            ensure_mask_token(tokenizer, model)
        return model
    config = lm.tnl.TNLConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 8 * ((8 * args.hidden // 3 + 7) // 8),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        attention_type="lightning" if args.arch == "tnl" else "softmax",
        **({"gate_act": args.gate_act} if args.gate_act else {}),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return lm.tnl.TNLForCausalLM(config)


def build_ernie_gram(
    args: argparse.Namespace, tokenizer: Any, lexicon: NGramLexicon
) -> ErnieGramForPretraining:
    """The encoder (--model via AutoModel, or a fresh BERT), a generator of the same class with
    --generator-layers layers and half the width, and the ERNIE-Gram heads."""
    from transformers import AutoConfig, AutoModel, BertConfig

    if args.model is not None:
        name, kwargs = resolve_source(args.model).pretrained_args()
        encoder = AutoModel.from_pretrained(name, **kwargs)
        if encoder.get_input_embeddings().num_embeddings < len(tokenizer):
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        gen_config = AutoConfig.from_pretrained(name, **kwargs)
    else:
        encoder = AutoModel.from_config(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=args.hidden,
                num_hidden_layers=args.layers,
                num_attention_heads=args.heads,
                intermediate_size=args.intermediate or 4 * args.hidden,
                max_position_embeddings=max(512, args.seq_len),
                hidden_dropout_prob=args.dropout,
                attention_probs_dropout_prob=args.dropout,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        gen_config = encoder.config.__class__.from_dict(encoder.config.to_dict())
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [f for f in fields if not hasattr(gen_config, f)]
    if missing:
        raise ValueError(
            f"cannot size a generator for {type(gen_config).__name__}: it has no {missing}"
        )
    heads = max(1, gen_config.num_attention_heads // 2)
    gen_config.hidden_size = heads * (gen_config.hidden_size // gen_config.num_attention_heads)
    gen_config.num_attention_heads = heads
    gen_config.intermediate_size = max(1, gen_config.intermediate_size // 2)
    gen_config.num_hidden_layers = args.generator_layers or max(
        1, gen_config.num_hidden_layers // 3
    )
    gen_config.vocab_size = encoder.get_input_embeddings().num_embeddings
    generator = AutoModel.from_config(gen_config)
    config = ErnieGramConfig(
        vocab_size=encoder.get_input_embeddings().num_embeddings,
        lexicon_size=len(lexicon),
        max_n=max(lexicon.max_n, 1),
        replace_prob=args.replace_prob,
    )
    return ErnieGramForPretraining(encoder, generator, config)


# --------------------------------------------------------------------------------------------
# One objective's batches and losses


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The torch.Generator of one step's masks and samples: a pure function of (seed, step) and,
    for process rank > 0 of a data-parallel run, of its rank (its own stream; rank 0 draws what
    one process draws)."""
    key = [seed, step] if rank == 0 else [seed, step, rank]
    state = int(np.random.SeedSequence(key).generate_state(1)[0])
    return torch.Generator().manual_seed(state)


class Objective:
    """Builds a batch from packed rows and runs the model to named losses ("loss" is trained)."""

    def __init__(
        self,
        name: str,
        tokenizer: Any,
        mask_ratio: float,
        lexicon: NGramLexicon | None = None,
        vocab_size: int | None = None,
    ):
        self.name = name
        self.ntp = NTPCollator(tokenizer.pad_token_id)
        self.meap = MEAPCollator.from_tokenizer(tokenizer, mask_ratio) if name == "meap" else None
        self.ernie = (
            ErnieGramCollator(
                lexicon,
                vocab_size or len(tokenizer),
                tokenizer.mask_token_id,
                tokenizer.pad_token_id,
                mask_ratio,
                special_ids(tokenizer),
            )
            if name == "ernie-gram" and lexicon is not None
            else None
        )

    def losses(
        self,
        model: Any,
        rows: np.ndarray,
        gen: torch.Generator,
        device: torch.device,
        clean: bool = False,
        part: slice = slice(None),
    ) -> dict[str, torch.Tensor]:
        """rows (B, T) packed token ids -> losses of rows[part] (a process's slice of the global
        batch `rows`); clean = plain next-token batch (held-out). MEAP draws the masks of all the
        rows and keeps the slice's, so each process masks its rows as one process would;
        ERNIE-Gram masks the slice alone (`gen` is the process's own)."""
        seqs = torch.from_numpy(rows)
        if self.ernie is not None:
            batch = self.ernie(seqs[part], generator=gen).to(device)
            out = model(**batch.model_inputs(), sample_generator=gen)
            return {
                "loss": out.loss,
                "coarse_loss": out.coarse_loss,
                "fine_loss": out.fine_loss,
                "generator_loss": out.generator_loss,
            }
        if self.meap is not None and not clean:
            inputs = self.meap(seqs, generator=gen).model_inputs()
        else:
            inputs = self.ntp(seqs)
        out = model(**{k: v[part].to(device) for k, v in inputs.items()})
        lm_loss = getattr(out, "lm_loss", None)  # TNL: the LM term without MoE auxiliaries
        losses = {"loss": out.loss}
        if lm_loss is not None and lm_loss is not out.loss:
            losses["lm_loss"] = lm_loss
        return losses


@torch.no_grad()
def evaluate(
    objective: Objective,
    model: Any,
    rows: np.ndarray,
    batch_size: int,
    seed: int,
    device: torch.device,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Mean held-out losses over rows (fixed masks); ppl = exp(next-token loss) for causal LMs."""
    was_training = model.training
    model.eval()
    gen = step_generator(seed, EVAL_STREAM)  # the same masks at every evaluation
    sums: dict[str, float] = {}
    batches = 0
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        with accelerator.autocast():
            losses = objective.losses(
                model, rows[start : start + batch_size], gen, device, clean=True
            )
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        batches += 1
    model.train(was_training)
    result = {k: v / max(batches, 1) for k, v in sums.items()}
    if objective.ernie is None and "loss" in result:
        nll = result.get("lm_loss", result["loss"])
        result["ppl"] = math.exp(min(nll, 50.0))
    result["rows"] = float(batches * batch_size)
    return result


# --------------------------------------------------------------------------------------------
# Logs, plot, model card


def write_log(out: Path, log: dict[str, Any]) -> None:
    atomic_write_text(out / LOG_NAME, json.dumps(log, indent=1))


def plot_losses(out: Path, log: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log["train"]]
    losses = [r["loss"] for r in log["train"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train (per step)")
    if losses:
        ema, smooth = losses[0], []
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", lw=2, label="train (EMA 0.9)")
    if log["eval"]:
        ax.plot(
            [r["step"] for r in log["eval"]],
            [r["loss"] for r in log["eval"]],
            "o-",
            color="tab:orange",
            label="held-out",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{log['config']['objective']} ({log['config']['model_name']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOT_NAME, dpi=120)
    plt.close(fig)


def model_card(log: dict[str, Any], command: str, files: list[str]) -> str:
    cfg = log["config"]
    last_eval = log["eval"][-1] if log["eval"] else None
    train_tail = [r["loss"] for r in log["train"][-20:]]
    lines = [
        f"# {cfg['model_name']} pretrained with {cfg['objective']} (Polychrome)",
        "",
        "## Command",
        "",
        f"    {command}",
        "",
        "## Data",
        "",
        *[f"- {json.dumps(c)}" for c in cfg["corpora"]],
        f"- tokenizer: {cfg['tokenizer']} ({cfg['vocab_size']} tokens); sequence length "
        f"{cfg['seq_len']}; {cfg['train_rows']} training rows, {cfg['heldout_rows']} held-out rows",
        "",
        "## Training",
        "",
        f"- steps {cfg['steps']}, batch size {cfg['batch_size']} x {cfg['processes']} processes, "
        f"lr {cfg['lr']}, weight decay {cfg['weight_decay']}, seed {cfg['seed']}",
        f"- final training loss (mean of the last {len(train_tail)} steps): "
        f"{sum(train_tail) / max(len(train_tail), 1):.4f}",
    ]
    if last_eval is not None:
        lines.append(
            "- held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k != "step")
        )
    lines += [
        f"- device: {cfg['device']}; torch {torch.__version__}",
        "",
        "## Files",
        "",
        *[f"- `{f}`" for f in files],
        "",
        "## Load",
        "",
    ]
    if cfg["objective"] == "ernie-gram":
        lines += [
            "    from transformers import AutoModel, AutoTokenizer",
            "    encoder = AutoModel.from_pretrained(PATH)        # the ERNIE-Gram encoder",
            "    tokenizer = AutoTokenizer.from_pretrained(PATH)",
        ]
    else:
        lines += [
            "    import lm.tnl  # noqa: F401  (registers TNL with the Auto classes)",
            "    from transformers import AutoModelForCausalLM, AutoTokenizer",
            "    model = AutoModelForCausalLM.from_pretrained(PATH)",
            "    tokenizer = AutoTokenizer.from_pretrained(PATH)",
        ]
    lines += ["", "## Run config", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    return "\n".join(lines)


def save_final(
    out: Path,
    model: Any,
    tokenizer: Any,
    lexicon: NGramLexicon | None,
    log: dict[str, Any],
    command: str,
) -> Path:
    from safetensors.torch import save_file

    final = out / FINAL
    with atomic_dir(final, overwrite=True) as tmp:
        if isinstance(model, ErnieGramForPretraining):
            model.encoder.save_pretrained(tmp)
            model.generator.save_pretrained(tmp / "generator")
            heads = {k: v.contiguous() for k, v in model.head_state_dict().items()}
            save_file(heads, str(tmp / "ernie_gram_heads.safetensors"))
            model.config.save(tmp / "ernie_gram_config.json")
            assert lexicon is not None
            lexicon.save(tmp / LEXICON_NAME)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        atomic_write_text(tmp / "MODEL_CARD.md", model_card(log, command, files))
    return final


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.pretrain_lm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--objective", choices=OBJECTIVES, default="ntp")
    model = parser.add_argument_group("model (one of --model, --arch)")
    model.add_argument("--model", help="model source: packaged name, hf-hub:org/name, folder")
    model.add_argument("--arch", choices=ARCHS, help="a fresh model: tnl | softmax | bert")
    model.add_argument("--hidden", type=int, default=256, help="--arch width (default 256)")
    model.add_argument("--layers", type=int, default=4, help="--arch layers (default 4)")
    model.add_argument("--heads", type=int, default=4, help="--arch attention heads (default 4)")
    model.add_argument(
        "--intermediate", type=int, default=None, help="FFN width (default TNL 8/3, BERT 4 x)"
    )
    model.add_argument("--dropout", type=float, default=0.0, help="--arch bert dropout")
    model.add_argument(
        "--gate-act",
        choices=("sigmoid", "silu", "identity"),
        default=None,
        help="--arch tnl: activation of the attention output gate u (default: TNLConfig's "
        "identity, the TNL paper's SRMSNorm(o) * u; sigmoid was the default until session 23)",
    )
    parser.add_argument(
        "--tokenizer",
        help="smollm2 | bpe:VOCAB | a tokenizer folder or model source (default: the --model's, "
        "else bpe:8192)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--corpus",
        action="append",
        default=None,
        help="shapeworld | pydoc | files:GLOB; repeat to mix (default pydoc)",
    )
    data.add_argument("--files-per-line", action="store_true", help="files: one document a line")
    data.add_argument("--shapeworld-dir", type=Path, help="an exported ShapeWorld folder")
    data.add_argument(
        "--shapeworld-images",
        type=int,
        default=2000,
        help="scenes to generate when no --shapeworld-dir is given (default 2000)",
    )
    data.add_argument("--max-chars", type=int, default=None, help="cap each corpus split")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed row")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step per process")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps in all")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%%)")
    parser.add_argument("--seed", type=int, default=0, help="init, data order, masks")
    obj = parser.add_argument_group("objectives")
    obj.add_argument(
        "--mask-ratio",
        type=float,
        default=0.15,
        help="MEAP: masked input fraction; ERNIE-Gram: masked token budget (default 0.15)",
    )
    obj.add_argument(
        "--lexicon-size", type=int, default=1000, help="ERNIE-Gram n-grams kept per order n=2..3"
    )
    obj.add_argument(
        "--generator-layers", type=int, default=None, help="default: the encoder's layers // 3"
    )
    obj.add_argument(
        "--replace-prob", type=float, default=0.5, help="ERNIE-Gram: slots given generator samples"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last")
    parser.add_argument("--save-every", type=int, default=200, help="steps between <out>/last")
    parser.add_argument(
        "--stop-at", type=int, default=None, help="save and stop after this step (resume later)"
    )
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches per eval")
    parser.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (bf16 autocast on cuda)"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.corpus = args.corpus or ["pydoc"]
    for spec in args.corpus:
        if spec not in ("pydoc", "shapeworld") and not spec.startswith("files:"):
            parser.error(f"--corpus must be shapeworld, pydoc or files:GLOB, received {spec!r}")
    if (args.model is None) == (args.arch is None):
        parser.error("give exactly one of --model SOURCE and --arch {tnl,softmax,bert}")
    if args.arch is not None:
        if (args.arch == "bert") != (args.objective == "ernie-gram"):
            parser.error(
                f"--arch {args.arch} does not fit --objective {args.objective}: ernie-gram trains "
                "a bidirectional encoder (--arch bert), ntp and meap a causal LM (tnl, softmax)"
            )
        if args.hidden % args.heads:
            parser.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    check_run_args(
        parser, args, ("seq_len", "batch_size", "steps", "save_every", "eval_every", "eval_batches")
    )
    if args.seq_len < 2:
        parser.error("--seq-len must be >= 2")
    if not 0 < args.mask_ratio < 1:
        parser.error(f"--mask-ratio must be in (0, 1), received {args.mask_ratio}")
    bpe = args.tokenizer and args.tokenizer.startswith("bpe:")
    if bpe and not args.tokenizer.removeprefix("bpe:").isdigit():
        parser.error(f"--tokenizer bpe:VOCAB needs an integer VOCAB, received {args.tokenizer}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    command = "python -m train.pretrain_lm " + shlex.join(argv)

    device = resolve_device(args.device)
    # ERNIE-Gram's BERTs have poolers the losses never read: DDP must expect unused parameters.
    unused = DistributedDataParallelKwargs(find_unused_parameters=args.objective == "ernie-gram")
    accelerator = make_accelerator(
        cpu=device.type == "cpu",
        mixed_precision="bf16" if device.type == "cuda" else "no",
        kwargs_handlers=[unused],
    )
    device = accelerator.device
    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    # data and tokenizer (a resumed run reads the tokenizer it saved: same ids, same rows)
    corpora = load_corpora(args)
    train_docs = [d for c in corpora for d in c.train]
    heldout_docs = [d for c in corpora for d in c.heldout]
    tok_dir = args.out / TOKENIZER_DIR
    if args.resume and tok_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = build_tokenizer(args, train_docs)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(tok_dir)
    train_rows = packed_rows(tokenizer, train_docs, args.seq_len)
    heldout_rows = packed_rows(tokenizer, heldout_docs, args.seq_len)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = args.batch_size * world
    if len(train_rows) < global_batch:
        parser.error(
            f"{len(train_rows)} packed rows of {args.seq_len} tokens < one global batch "
            f"({args.batch_size} x {world}); add text or lower --seq-len / --batch-size"
        )
    heldout_rows = heldout_rows[: args.eval_batches * args.batch_size]

    # model
    torch.manual_seed(args.seed)
    lexicon: NGramLexicon | None = None
    model: Any
    if args.objective == "ernie-gram":
        lexicon = build_ngram_lexicon(
            train_rows, args.lexicon_size, max_n=3, exclude_ids=special_ids(tokenizer)
        )
        if accelerator.is_main_process:
            lexicon.save(args.out / LEXICON_NAME)
        model = build_ernie_gram(args, tokenizer, lexicon)
        vocab_size = model.config.vocab_size
    else:
        model = build_causal_lm(args, tokenizer)
        vocab_size = model.get_input_embeddings().num_embeddings
    model.to(device).train()
    objective = Objective(args.objective, tokenizer, args.mask_ratio, lexicon, vocab_size)

    optimizer = adamw_matrices_decay(model, args.lr, args.weight_decay, betas=(0.9, 0.95))
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    scheduler = cosine_with_warmup(optimizer, warmup, args.steps)
    run_config = {
        "objective": args.objective,
        "model": args.model,
        "arch": args.arch,
        # the gate the model was built with (None for other architectures): a resume rebuilds the
        # model from these arguments, so a run started under another default must say so
        "gate_act": model.config.gate_act if args.arch == "tnl" else None,
        "model_name": args.model or args.arch,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "tokenizer": args.tokenizer or args.model or "bpe:8192",
        "vocab_size": vocab_size,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "processes": world,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup": warmup,
        "steps": args.steps,
        "seed": args.seed,
        "mask_ratio": args.mask_ratio,
        "lexicon_size": len(lexicon) if lexicon is not None else None,
        "corpora": [
            {**c.description, **c.stats(), "train_sha256": documents_digest(c.train)}
            for c in corpora
        ],
        "train_rows": len(train_rows),
        "heldout_rows": len(heldout_rows),
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    start = 0
    log: dict[str, Any] = {"command": command, "config": run_config, "train": [], "eval": []}
    if args.resume:
        mismatch = resume_mismatches(args.out, run_config, RESUME_KEYS)
        if mismatch:
            parser.error(f"--resume: {mismatch}")
        start = load_training_state(args.out, model, optimizer, scheduler)
        if (args.out / LOG_NAME).is_file():
            old = json.loads((args.out / LOG_NAME).read_text(encoding="utf-8"))
            log["train"] = [r for r in old["train"] if r["step"] <= start]
            log["eval"] = [r for r in old["eval"] if r["step"] <= start]
    prepared = accelerator.prepare(model)
    prepared_optimizer = accelerator.prepare(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    stop = args.stop_at if args.stop_at is not None else args.steps
    batches = batch_indices(len(train_rows), global_batch, args.seed, start)
    bar = tqdm(
        range(start, stop),
        initial=start,
        total=args.steps,
        desc=f"pretrain {args.objective}",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    t0 = time.time()
    local = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
    # MEAP draws the global batch's masks on every process; ERNIE-Gram each process's own
    stream = rank if objective.ernie is not None else 0
    for step in bar:
        indices = next(batches)
        with accelerator.autocast():
            losses = objective.losses(
                prepared,
                train_rows[indices],
                step_generator(args.seed, step, stream),
                device,
                part=local,
            )
        accelerator.backward(losses["loss"])
        accelerator.clip_grad_norm_(params, 1.0)
        prepared_optimizer.step()
        scheduler.step()
        prepared_optimizer.zero_grad(set_to_none=True)
        done = step + 1
        mean = accelerator.reduce({k: v.detach() for k, v in losses.items()}, "mean")
        row = {"step": done, **{k: float(v) for k, v in mean.items()}}  # the global batch's
        row["lr"] = scheduler.get_last_lr()[0]
        row["time"] = round(time.time() - t0, 3)
        log["train"].append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        evaluate_now = done % args.eval_every == 0 or done == args.steps
        if evaluate_now and len(heldout_rows) >= args.batch_size:
            result = evaluate(
                objective, prepared, heldout_rows, args.batch_size, args.seed, device, accelerator
            )
            log["eval"].append({"step": done, **result})
            if accelerator.is_main_process:
                bar.write(
                    f"step {done}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
                )
        if done % args.save_every == 0 or done == stop:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_training_state(
                    args.out, model, optimizer, scheduler, done, run_config, {"loss": row["loss"]}
                )
                write_log(args.out, log)
    bar.close()
    if not accelerator.is_main_process:
        return 0
    write_log(args.out, log)
    plot_losses(args.out, log)
    if stop < args.steps:
        print(f"stopped at step {stop}; continue with --resume")
        return 0
    final = save_final(args.out, model, tokenizer, lexicon, log, command)
    print(f"wrote {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
