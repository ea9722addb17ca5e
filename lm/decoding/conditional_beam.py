"""Conditional beam search: MAP decoding conditioned on the output not being degenerate.

    out = conditional_beam_search(model, input_ids, num_beams=8, max_new_tokens=48,
                                  min_new_tokens=1, no_repeat_ngram_size=3, eos_token_id=eos)
    out.sequences, out.log_likelihood, degeneracy(out.sequences[0], out.lengths[0])

Yoshida, Goyal & Gimpel, "MAP's not dead yet: Uncovering true language model modes by
conditioning away degeneracy" (ACL 2024; chapter of the thesis arXiv 2408.16241). Exact or
near-exact MAP decoding of p(y | x) returns degenerate outputs (empty, repetitive). The paper
decodes the mode of the model's *conditional* distribution given the event A that the output is
not degenerate:

    y* = argmax_y p(y | x, A) = argmax_{y in A} p(y | x),   p(y | x, A) = p(y|x) 1[y in A] / p(A|x)

since p(A | x) does not depend on y. We define A by two constraints that can be checked on every
prefix: at least ``min_new_tokens`` tokens before EOS (not empty), and no n-gram of size
``no_repeat_ngram_size`` occurring twice among the generated tokens (not repetitive). Beam
search over A with the model's own log-probabilities is Hugging Face beam search with two logits
processors: transformers applies processors *after* log_softmax in beam search, so a banned token
gets -inf and the allowed ones keep log p(y_t | y_<t, x) without renormalisation; the beam
scores are then exactly log p(y | x) restricted to A. Both searches here are the canonical
MAP beam search (length_penalty = 0, early_stopping = "never", transformers' own note on how to
get it), so the only difference between plain and conditional is the conditioning.

What the paper adds for attributes that are not prefix-checkable (a classifier estimating
p(A | prefix), "ACBS") is not implemented: for these two constraints A is decided on prefixes
and the conditional mode needs no classifier, only the pruning order ignores p(A | prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor
from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

__all__ = [
    "BeamResult",
    "GeneratedNoRepeatNGramLogitsProcessor",
    "beam_search",
    "conditional_beam_search",
    "degeneracy",
    "repetition_rate",
    "sequence_log_likelihood",
]


class GeneratedNoRepeatNGramLogitsProcessor(LogitsProcessor):
    """transformers' NoRepeatNGramLogitsProcessor on the generated tokens only.

    The library's processor looks at the whole sequence, prompt included, so it would also ban
    copying a phrase from the prompt; the degeneracy we condition away is repetition *within the
    output*. It runs the library processor on input_ids[:, prompt_length:].
    """

    def __init__(self, ngram_size: int, prompt_length: int):
        self.inner = NoRepeatNGramLogitsProcessor(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] < self.inner.ngram_size - 1:
            return scores
        return self.inner(generated, scores)


@dataclass
class BeamResult:
    """The best hypothesis per prompt."""

    sequences: torch.Tensor  # (B, N) generated ids; after EOS (included) padded with pad id
    lengths: torch.Tensor  # (B,) generated tokens before EOS (EOS not counted)
    finished: torch.Tensor  # (B,) bool: the hypothesis ended with EOS
    log_likelihood: torch.Tensor  # (B,) sum log p(y_t | y_<t, x) of the generated tokens + EOS

    @property
    def scored_tokens(self) -> torch.Tensor:
        """(B,) tokens in log_likelihood: the length plus the EOS when finished."""
        return self.lengths + self.finished.long()


def repetition_rate(tokens: list[int], n: int) -> float:
    """Fraction of the n-grams of `tokens` that already occurred earlier in it (0 if none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def degeneracy(tokens: list[int], ngram_sizes: tuple[int, ...] = (2, 3)) -> dict[str, float]:
    """Degeneracy statistics of one output (token ids before EOS): empty, length, repetition."""
    stats: dict[str, float] = {"length": float(len(tokens)), "empty": float(len(tokens) == 0)}
    for n in ngram_sizes:
        stats[f"repeat_{n}gram"] = repetition_rate(tokens, n)
    return stats


@torch.no_grad()
def sequence_log_likelihood(
    model: Any, input_ids: torch.Tensor, generated: torch.Tensor, scored: torch.Tensor
) -> torch.Tensor:
    """(B,) sum log p of generated[:, :scored] given the prompt (B, T), by one forward pass."""
    ids = torch.cat([input_ids, generated], dim=1)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    T = input_ids.shape[1]
    logp = F.log_softmax(logits[:, T - 1 : -1].float(), dim=-1)  # (B, N, V)
    token_logp = logp.gather(-1, generated.unsqueeze(-1)).squeeze(-1)  # (B, N)
    keep = torch.arange(generated.shape[1], device=generated.device)[None] < scored[:, None]
    return (token_logp * keep).sum(dim=1)


def _search(
    model: Any,
    input_ids: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    processors: list[LogitsProcessor],
) -> BeamResult:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), received shape {tuple(input_ids.shape)}")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(
            f"num_beams and max_new_tokens must be >= 1, received {num_beams}, {max_new_tokens}"
        )
    T = input_ids.shape[1]
    # Canonical MAP beam search: rank by log p(y | x) alone (greedy has no such flags).
    beam_flags: dict[str, Any] = (
        {"length_penalty": 0.0, "early_stopping": "never"} if num_beams > 1 else {}
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        **beam_flags,
        logits_processor=LogitsProcessorList(processors),
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    generated = out[:, T:]
    is_eos = generated == eos_token_id
    finished = is_eos.any(dim=1)
    first_eos = torch.where(finished, is_eos.float().argmax(dim=1), generated.shape[1])
    lengths = first_eos.clone()
    scored = lengths + finished.long()
    positions = torch.arange(generated.shape[1], device=generated.device)[None]
    generated = generated.masked_fill(positions >= scored[:, None], pad_token_id)
    loglik = sequence_log_likelihood(model, input_ids, generated, scored)
    return BeamResult(generated, lengths, finished, loglik)


def beam_search(
    model: Any,
    input_ids: torch.Tensor,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 48,
    eos_token_id: int,
    pad_token_id: int | None = None,
) -> BeamResult:
    """Plain MAP beam search over p(y | x) (num_beams = 1 is greedy). input_ids (B, T), unpadded."""
    pad = eos_token_id if pad_token_id is None else pad_token_id
    return _search(model, input_ids, num_beams, max_new_tokens, eos_token_id, pad, [])


def conditional_beam_search(
    model: Any,
    input_ids: torch.Tensor,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 48,
    eos_token_id: int,
    pad_token_id: int | None = None,
    min_new_tokens: int = 1,
    no_repeat_ngram_size: int = 3,
) -> BeamResult:
    """MAP beam search over p(y | x, A), A = {at least min_new_tokens tokens before EOS, no
    repeated no_repeat_ngram_size-gram in the output}. input_ids (B, T), unpadded.

    The returned log_likelihood is log p(y | x) (the model's, unconditioned); log p(y | x, A)
    differs from it by the constant -log p(A | x).
    """
    if not 1 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"min_new_tokens must be in [1, max_new_tokens={max_new_tokens}], "
            f"received {min_new_tokens}"
        )
    if no_repeat_ngram_size < 1:
        raise ValueError(f"no_repeat_ngram_size must be >= 1, received {no_repeat_ngram_size}")
    T = input_ids.shape[1]
    processors: list[LogitsProcessor] = [
        MinNewTokensLengthLogitsProcessor(T, min_new_tokens, eos_token_id),
        GeneratedNoRepeatNGramLogitsProcessor(no_repeat_ngram_size, T),
    ]
    pad = eos_token_id if pad_token_id is None else pad_token_id
    return _search(model, input_ids, num_beams, max_new_tokens, eos_token_id, pad, processors)
