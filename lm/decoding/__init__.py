"""Decoding methods over Hugging Face causal LMs, and the models some of them train.

    from lm.decoding import generate_with, list_methods
    out = generate_with("conditional_beam", model, input_ids, num_beams=4, max_new_tokens=48,
                        eos_token_id=tokenizer.eos_token_id)
    out.new_tokens        # (1, N) generated ids, EOS included when generation stopped on it

Files, one method each (the docstring of each names the paper and the equation it follows):

- hidden_state_optimisation.py: HSO, gradient steps on the cached key/value states to lower the
  context's NLL before predicting (Yoshida & Gimpel 2021).
- conditional_beam.py: MAP beam search conditioned on a non-degenerate output (not empty, no
  repeated n-gram) (Yoshida, Goyal & Gimpel 2024), and plain MAP beam search.
- recurrence.py: a learned state carried across fixed windows of a decoder (Yoshida et al. 2020).
- adjust.py: a masked diffusion LM and ADJUST's one-layer sampler for K tokens per forward pass
  (arXiv 2509.22738).
- nar_seq2seq.py: an MLM-initialised non-autoregressive seq2seq model trained with SUNDAE's
  unrolled denoising (the thesis' RUM-SUNDAE idea).
- synthetic.py: the synthetic languages the last two train on (exact distributions known).

The registry (generate_with) holds the methods that apply to any causal LM; ADJUST and the NAR
model decode their own model types and are called directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lm.decoding.adjust import (
    ADJUSTSampler,
    build_masked_diffusion_lm,
    masked_diffusion_loss,
    mdlm_forward,
    sample_masked_diffusion,
    sampler_loss,
)
from lm.decoding.conditional_beam import (
    BeamResult,
    GeneratedNoRepeatNGramLogitsProcessor,
    beam_search,
    conditional_beam_search,
    degeneracy,
    repetition_rate,
    sequence_log_likelihood,
)
from lm.decoding.hidden_state_optimisation import (
    HSOResult,
    cache_nll,
    hso_generate,
    optimise_hidden_states,
)
from lm.decoding.nar_seq2seq import build_mlm, mlm_loss, nar_logits, refine, sundae_loss
from lm.decoding.recurrence import (
    RecurrentMemory,
    load_recurrent_memory,
    recurrent_generate,
    window_forward,
    windowed_nll,
)
from lm.decoding.synthetic import PrefixSumTask, WalkLanguage, total_variation

__all__ = [
    "ADJUSTSampler",
    "BeamResult",
    "DecodingOutput",
    "GeneratedNoRepeatNGramLogitsProcessor",
    "HSOResult",
    "PrefixSumTask",
    "RecurrentMemory",
    "WalkLanguage",
    "beam_search",
    "build_masked_diffusion_lm",
    "build_mlm",
    "cache_nll",
    "conditional_beam_search",
    "degeneracy",
    "generate_with",
    "hso_generate",
    "list_methods",
    "load_recurrent_memory",
    "masked_diffusion_loss",
    "mdlm_forward",
    "mlm_loss",
    "nar_logits",
    "optimise_hidden_states",
    "recurrent_generate",
    "refine",
    "repetition_rate",
    "sample_masked_diffusion",
    "sampler_loss",
    "sequence_log_likelihood",
    "sundae_loss",
    "total_variation",
    "window_forward",
    "windowed_nll",
]


@dataclass
class DecodingOutput:
    """What every registered method returns."""

    new_tokens: torch.Tensor  # (1, N) generated ids (EOS included if generation stopped on it)
    info: dict[str, Any] = field(default_factory=dict)  # method-specific numbers (JSON-able)


def _strip(ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Cut a (1, N) generation after its first EOS."""
    row = ids[0].tolist()
    if eos_token_id is not None and eos_token_id in row:
        row = row[: row.index(eos_token_id) + 1]
    return torch.tensor([row], dtype=torch.long, device=ids.device)


def _greedy(model: Any, input_ids: torch.Tensor, **settings: Any) -> DecodingOutput:
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        **settings,
    )
    return DecodingOutput(_strip(out[:, input_ids.shape[1] :], settings.get("eos_token_id")))


def _beam(search: Callable[..., BeamResult]) -> Callable[..., DecodingOutput]:
    def run(model: Any, input_ids: torch.Tensor, **settings: Any) -> DecodingOutput:
        result = search(model, input_ids, **settings)
        n = int(result.scored_tokens[0])
        info = {"log_likelihood": float(result.log_likelihood[0]), "scored_tokens": n}
        return DecodingOutput(result.sequences[:, :n], info)

    return run


def _hso(
    model: Any,
    input_ids: torch.Tensor,
    *,
    recent_tokens: int = 64,
    steps: int = 4,
    lr: float = 3e-3,
    **settings: Any,
) -> DecodingOutput:
    out, result = hso_generate(
        model,
        input_ids,
        recent_tokens=recent_tokens,
        steps=steps,
        lr=lr,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        **settings,
    )
    info = {"context_nll": result.context_nll if result is not None else []}
    return DecodingOutput(_strip(out[:, input_ids.shape[1] :], settings.get("eos_token_id")), info)


def _recurrent(
    model: Any,
    input_ids: torch.Tensor,
    *,
    memory: RecurrentMemory | None = None,
    window: int = 64,
    **settings: Any,
) -> DecodingOutput:
    if memory is None:
        raise ValueError(
            "method 'recurrent' needs memory=RecurrentMemory trained for this model "
            "(train/decoding_recurrence.py writes one)"
        )
    new = recurrent_generate(
        model,
        memory,
        input_ids,
        window=window,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        **settings,
    )
    return DecodingOutput(new, {"window": window})


_METHODS: dict[str, Callable[..., DecodingOutput]] = {
    "greedy": _greedy,
    "beam": _beam(beam_search),
    "conditional_beam": _beam(conditional_beam_search),
    "hidden_state_optimisation": _hso,
    "recurrent": _recurrent,
}


def list_methods() -> list[str]:
    """Names generate_with accepts."""
    return sorted(_METHODS)


def generate_with(
    method: str, model: Any, input_ids: torch.Tensor, **settings: Any
) -> DecodingOutput:
    """Decode after input_ids (1, T) with a named method; settings go to the method (all take
    max_new_tokens, eos_token_id and pad_token_id; see each function for the rest)."""
    if method not in _METHODS:
        raise ValueError(f"unknown decoding method {method!r}; valid: {list_methods()}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"generate_with decodes one prompt: input_ids must be (1, T), received "
            f"{tuple(input_ids.shape)}"
        )
    return _METHODS[method](model, input_ids, **settings)
