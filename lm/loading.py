"""Load any Hugging Face causal LM (and its tokenizer) from a model source.

    model, tokenizer = load_causal_lm("smollm2-135m-instruct")        # packaged, offline
    model, tokenizer = load_causal_lm("hf-hub:facebook/opt-6.7b")     # the paper preset's LLM
    model, tokenizer = load_causal_lm("/path/to/save_pretrained_dir")

The caller decides dtype, device and freezing (STYLE.md 6); nothing here calls `.cuda()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.config import Config
from core.runtime import DTYPES, resolve_dtype
from core.sources import resolve_source

__all__ = ["LLMConfig", "load_causal_lm", "load_tokenizer"]


@dataclass
class LLMConfig(Config):
    """The frozen chat LLM."""

    source: str = "smollm2-135m-instruct"  # a model source spec (core.sources)
    dtype: str = "fp32"  # weights dtype: fp32 | bf16 | fp16
    max_new_tokens: int = 256  # default reply length cap
    max_context_tokens: int = 2048  # older turns are dropped to keep the prompt under this
    system_prompt: str | None = None  # None keeps the chat template's own default

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source must be a non-empty model source spec")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, received {self.dtype!r}")
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError(f"max_new_tokens must be in [1, 8192], received {self.max_new_tokens}")
        if self.max_context_tokens < 64:
            raise ValueError(
                f"max_context_tokens must be >= 64, received {self.max_context_tokens}"
            )


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model source; a pad token is set to EOS where the model has none."""
    name, kwargs = resolve_source(source).pretrained_args()
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    source: str,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    frozen: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a causal LM source; `frozen` turns off grads and sets eval mode."""
    name, kwargs = resolve_source(source).pretrained_args()
    model = AutoModelForCausalLM.from_pretrained(name, dtype=resolve_dtype(dtype), **kwargs)
    cast(Any, model).to(device)
    if frozen:
        model.requires_grad_(False)
        model.eval()
    return model, load_tokenizer(source)
