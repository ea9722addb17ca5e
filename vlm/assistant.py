"""The Assistant: one chat turn in, a streamed reply out.

At this stage it chats with the frozen LLM alone (text in, text out); the VLM core adds images,
GILL adds image outputs and STAMP adds masks through the same ``chat`` call.

    assistant = Assistant.from_config(PolychromeConfig.from_preset("shapes"))
    for partial in assistant.chat(history=[], message="Name three shapes."):
        print(partial)  # the reply so far, growing token by token
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import PreTrainedModel, TextIteratorStreamer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lm.loading import LLMConfig, load_causal_lm

__all__ = ["MAX_MESSAGE_CHARS", "Assistant", "ChatMessage", "SamplingSettings"]

# A message longer than this is refused with a clear error instead of being fed to the LLM.
MAX_MESSAGE_CHARS = 8000
_ROLES = ("user", "assistant", "system")

ChatMessage = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}


@dataclass
class SamplingSettings:
    """Decoding settings of one reply; temperature 0 is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError(f"max_new_tokens must be in [1, 8192], received {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, received {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], received {self.top_p}")


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, received {type(text).__name__}")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValueError(
            f"{what} is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}. "
            "Shorten it or split it over several messages."
        )
    # Drop control characters other than newline and tab: they only confuse the tokenizer.
    return "".join(ch for ch in text if ch in "\n\t" or ch.isprintable())


class Assistant:
    """A chat assistant over a frozen causal LM and its chat template."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        system_prompt: str | None = None,
        max_context_tokens: int = 2048,
        default_settings: SamplingSettings | None = None,
    ) -> None:
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; the Assistant needs one")
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_context_tokens = max_context_tokens
        self.default_settings = default_settings or SamplingSettings()
        # One generate() at a time per model: the app's queue bounds concurrency, this guards
        # direct library users who call chat from several threads.
        self._lock = threading.Lock()

    @classmethod
    def from_llm_config(cls, cfg: LLMConfig, device: str = "cpu") -> Assistant:
        model, tokenizer = load_causal_lm(cfg.source, dtype=cfg.dtype, device=device, frozen=True)
        return cls(
            model,
            tokenizer,
            system_prompt=cfg.system_prompt,
            max_context_tokens=cfg.max_context_tokens,
            default_settings=SamplingSettings(max_new_tokens=cfg.max_new_tokens),
        )

    def build_messages(self, history: Sequence[ChatMessage], message: str) -> list[ChatMessage]:
        """The chat messages for the template: system prompt, history, then the new message."""
        messages: list[ChatMessage] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        for i, turn in enumerate(history):
            if not isinstance(turn, dict) or turn.get("role") not in _ROLES:
                raise ValueError(
                    f"history[{i}] must be a dict with role in {list(_ROLES)} and a string "
                    f"content, received {turn!r:.120}"
                )
            messages.append({"role": turn["role"], "content": _clean(turn["content"], "history")})
        messages.append({"role": "user", "content": _clean(message, "message")})
        return messages

    def encode(self, history: Sequence[ChatMessage], message: str) -> torch.Tensor:
        """(1, T) prompt ids; the oldest turns are dropped until the prompt fits the context."""
        messages = self.build_messages(history, message)
        first = 1 if messages[0]["role"] == "system" else 0
        while True:
            encoded: Any = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            ids = cast(torch.Tensor, encoded["input_ids"])
            if ids.shape[1] <= self.max_context_tokens or len(messages) - first <= 1:
                break
            # Drop the oldest exchange: a user turn with the assistant turns that answer it.
            del messages[first]
            while len(messages) - first > 1 and messages[first]["role"] == "assistant":
                del messages[first]
        if ids.shape[1] > self.max_context_tokens:
            raise ValueError(
                f"the message alone is {ids.shape[1]} tokens; the context limit is "
                f"{self.max_context_tokens}"
            )
        return ids

    def chat(
        self,
        history: Sequence[ChatMessage],
        message: str,
        images: Sequence[Any] | None = None,
        settings: SamplingSettings | None = None,
    ) -> Iterator[str]:
        """Yield the reply so far after each decoded chunk; the last value is the whole reply."""
        if images:
            raise ValueError(
                "this Assistant is text-only: image input arrives with the VLM core (issue 8)"
            )
        settings = settings or self.default_settings
        input_ids = self.encode(history, message).to(self.model.device)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300.0
        )
        gen_kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": settings.max_new_tokens,
            "streamer": streamer,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings.temperature > 0:
            gen_kwargs.update(
                do_sample=True, temperature=settings.temperature, top_p=settings.top_p
            )
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    cast(Any, self.model).generate(**gen_kwargs)
            except BaseException as err:  # noqa: BLE001 -- re-raised in the caller thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        reply = ""
        for chunk in streamer:
            reply += chunk
            yield reply
        thread.join()
        if errors:
            raise errors[0]
        if not reply:
            yield reply
