"""Calibration data, the sequential block-by-block calibration loop, and held-out perplexity.

    rows = calibration_rows(tokenizer, pydoc_corpus().train, n_seqs=32, seq_len=512, seed=0)
    sequential_calibrate(model, rows, linears, make_stats=HessianStats, prune=prune_one)

Sequential calibration (SparseGPT sec. 3, Wanda sec. 3): the inputs of decoder block l are the
outputs of the already pruned blocks < l. The embeddings' output for every calibration row is
captured at block 0; then for each block in turn a forward hook on each selected linear layer
feeds its input activations (B, T, I) to a statistics object (Hessian, column norms), the layers
of the block are pruned from those statistics, and the pruned block is run again to give the
next block its inputs. Every layer of a block sees the block's dense inputs (as in the reference
`opt.py` / Wanda code); only the blocks before it are pruned.

The extra arguments a block receives besides its hidden states (positions, rotary embeddings,
masks, which may differ per block, e.g. sliding-window layers) are recorded once per block from a
full forward of the first row and reused for every row: all rows have the same length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lm.corpus import pack_documents, tokenize_documents
from lm.sparsity.masks import decoder_blocks

__all__ = [
    "LayerStats",
    "calibration_rows",
    "heldout_rows",
    "lm_nll",
    "sequential_calibrate",
]


class LayerStats(Protocol):
    """What sequential_calibrate feeds: one linear layer's input activations."""

    def add(self, x: torch.Tensor) -> None:
        """x (..., I): the layer's inputs for one batch."""


def _rows(tokenizer: Any, docs: Sequence[str], seq_len: int) -> np.ndarray:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token (the document separator)")
    return pack_documents(tokenize_documents(tokenizer, docs), seq_len, eos)


def calibration_rows(
    tokenizer: Any, docs: Sequence[str], n_seqs: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """(n_seqs, seq_len) int64: packed rows of `docs` (lm.corpus packing), drawn at random
    without replacement with `seed` (SparseGPT draws random windows of its calibration text)."""
    rows = _rows(tokenizer, docs, seq_len)
    if n_seqs < 1 or n_seqs > len(rows):
        raise ValueError(
            f"asked for {n_seqs} calibration rows of {seq_len} tokens; the text packs into "
            f"{len(rows)} rows"
        )
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), n_seqs, replace=False))
    return torch.from_numpy(rows[pick])


def heldout_rows(
    tokenizer: Any, docs: Sequence[str], seq_len: int, max_rows: int | None = None
) -> torch.Tensor:
    """(N, seq_len) int64: the first packed rows of held-out `docs` (deterministic)."""
    rows = _rows(tokenizer, docs, seq_len)[:max_rows]
    if not len(rows):
        raise ValueError(f"the held-out text is shorter than one row of {seq_len} tokens")
    return torch.from_numpy(rows)


@torch.no_grad()
def lm_nll(
    model: nn.Module,
    rows: torch.Tensor,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    desc: str | None = None,
) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of predicted tokens) of a causal LM over rows
    (N, T); every row predicts its tokens 1..T-1. exp(sum / count) is the perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(rows), batch_size)
    for s in tqdm(starts, desc=desc or "perplexity", unit="batch", disable=desc == ""):
        ids = rows[s : s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
            )
        )
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total, count


class _Stop(Exception):
    """Raised by the block-0 hook to end a forward pass once the block's input is captured."""


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def sequential_calibrate(
    model: nn.Module,
    rows: torch.Tensor,
    linears: Mapping[str, nn.Linear],
    make_stats: Callable[[nn.Linear], LayerStats],
    prune: Callable[[str, nn.Linear, LayerStats], None],
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> None:
    """Prune `linears` (all inside the decoder blocks) block by block, see the module doc.

    rows (N, T) calibration token ids, run one row at a time. make_stats(layer) makes the
    statistics object of a layer; prune(name, layer, stats) changes the layer in place once
    its block's statistics are complete."""
    prefix, blocks = decoder_blocks(model)
    by_block: list[dict[str, nn.Linear]] = [{} for _ in blocks]
    for name, layer in linears.items():
        head = f"{prefix}."
        index = name[len(head) :].split(".", 1)[0] if name.startswith(head) else ""
        if not index.isdigit():
            raise ValueError(
                f"{name} is not inside the decoder blocks {prefix}.*; calibrated pruning runs "
                "block by block (use the magnitude method for other layers)"
            )
        by_block[int(index)][name] = layer
    was_training = model.training
    model.eval()
    rows = rows.to(device)

    # The extra arguments of every block, from one full forward of the first row.
    extras: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * len(blocks)

    def recorder(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            extras[i] = (args[1:], dict(kwargs))

        return hook

    handles = [
        b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)
    ]
    try:
        model(input_ids=rows[:1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    # The block-0 inputs of every row.
    hidden: list[torch.Tensor] = []

    def catch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    catcher = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(len(rows)):
            with contextlib.suppress(_Stop):
                model(input_ids=rows[i : i + 1], use_cache=False)
    finally:
        catcher.remove()

    bar = tqdm(range(len(blocks)), desc="calibrate blocks", unit="block", disable=not progress)
    for i in bar:
        block, extra = blocks[i], extras[i]
        if extra is None:
            raise RuntimeError(f"block {prefix}.{i} was not called by the model's forward")
        args, kwargs = extra
        if "hidden_states" in kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        layers = by_block[i]
        if layers:
            stats = {name: make_stats(layer) for name, layer in layers.items()}
            hooks = [
                layer.register_forward_hook(
                    lambda mod, inp, out, s=stats[name]: s.add(inp[0].detach())
                )
                for name, layer in layers.items()
            ]
            try:
                for h in hidden:
                    block(h, *args, **kwargs)
            finally:
                for hk in hooks:
                    hk.remove()
            for name, layer in layers.items():
                prune(name, layer, stats[name])
            del stats
        hidden = [_first(block(h, *args, **kwargs)) for h in hidden]
    model.train(was_training)
