"""Masked-LM baselines for a bidirectional encoder: token masking (BERT) and contiguous span
masking (SpanBERT), the two things ERNIE-Gram's explicit n-gram masking is compared against.

    collator = SpanMaskingCollator(mask_token_id, pad_token_id, mask_ratio=0.15)   # SpanBERT
    collator = SpanMaskingCollator(mask_token_id, pad_token_id, max_span=1)        # BERT tokens
    batch = collator(sequences, generator=torch.Generator().manual_seed(step))
    loss = BertForMaskedLM(config)(**batch.model_inputs()).loss

Per sequence the budget is k = max(1, floor(mask_ratio x E)) tokens, E the eligible (real,
unprotected) tokens. Spans are drawn until the budget is spent (SpanBERT, Joshi et al. 2020,
section 3.1): a length l ~ Geometric(p) clipped to [1, max_span] (p = 0.2, max_span = 10: mean
3.8) and cut to the budget left, a start drawn uniformly among eligible unmasked positions; the
span runs right from the start over eligible unmasked tokens and stops early at the first token
that is not. With max_span = 1 every span is one token: BERT's token masking. Every masked
position shows [MASK] (no 80/10/10 replacement) and is scored on its original token; the rest
carry -100.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lm.objectives.meap import MEAPBatch
from lm.objectives.ntp import IGNORE_INDEX, TokenRows, pad_sequences

__all__ = ["MLMBatch", "SpanMaskingCollator", "span_mask_positions"]


def span_mask_positions(
    eligible: torch.Tensor,
    mask_ratio: float,
    p: float = 0.2,
    max_span: int = 10,
    generator: torch.Generator | None = None,
) -> list[tuple[int, int]]:
    """Spans (start, length) to mask in one sequence: eligible (T,) bool -> spans in draw order,
    disjoint, lengths summing to max(1, floor(mask_ratio x eligible.sum())) (0 if none)."""
    free = eligible.clone().bool()
    E = int(free.sum())
    if E == 0 or mask_ratio <= 0:
        return []
    budget = max(1, int(mask_ratio * E))
    spans: list[tuple[int, int]] = []
    used = 0
    while used < budget:
        u = float(torch.rand((), generator=generator).clamp_min(1e-12))
        length = 1 if p >= 1 else 1 + int(math.log(u) / math.log(1 - p))
        length = min(length, max_span, budget - used)
        starts = free.nonzero().flatten()
        start = int(starts[torch.randint(len(starts), (), generator=generator)])
        n = 0
        while n < length and start + n < free.numel() and free[start + n]:
            n += 1
        free[start : start + n] = False
        spans.append((start, n))
        used += n
    return spans


@dataclass
class MLMBatch(MEAPBatch):
    """MEAPBatch's fields for a masked LM: input_ids (B, T) with [MASK] on masked tokens;
    attention_mask (B, T); labels (B, T) the original token where masked, -100 elsewhere;
    masked (B, T) bool. ``model_inputs()`` feeds BertForMaskedLM and the like."""


class SpanMaskingCollator:
    """Token sequences -> MLMBatch by span masking (see the module doc; max_span=1: tokens)."""

    def __init__(
        self,
        mask_token_id: int,
        pad_token_id: int,
        mask_ratio: float = 0.15,
        protected_ids: Iterable[int] = (),
        p: float = 0.2,
        max_span: int = 10,
    ):
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), received {mask_ratio}")
        if not 0 < p <= 1 or max_span < 1:
            raise ValueError(f"need 0 < p <= 1 and max_span >= 1, received {p}, {max_span}")
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.mask_ratio = mask_ratio
        self.protected_ids = sorted({int(i) for i in protected_ids} | {pad_token_id})
        self.p = p
        self.max_span = max_span

    def __call__(self, sequences: TokenRows, generator: torch.Generator | None = None) -> MLMBatch:
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id)
        protected = torch.isin(input_ids, torch.tensor(self.protected_ids))
        eligible = (attention_mask == 1) & ~protected  # (B, T)
        masked = torch.zeros_like(eligible)
        for b in range(input_ids.shape[0]):
            spans = span_mask_positions(
                eligible[b], self.mask_ratio, self.p, self.max_span, generator
            )
            for start, n in spans:
                masked[b, start : start + n] = True
        labels = input_ids.masked_fill(~masked, IGNORE_INDEX)
        return MLMBatch(
            input_ids.masked_fill(masked, self.mask_token_id), attention_mask, labels, masked
        )
