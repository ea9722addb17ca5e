"""Stream a Hugging Face ``generate`` call as text chunks, from a background thread.

    for chunk in stream_generate(model, tokenizer, {"input_ids": ids, "max_new_tokens": 64}):
        print(chunk, end="")

transformers' TextIteratorStreamer needs ``generate`` to run in another thread; this wraps that
thread so a failure inside ``generate`` is re-raised in the caller (not lost in the thread), and
so one lock serialises calls on a shared model, with the seed set under the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
from transformers import PreTrainedModel, TextIteratorStreamer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

__all__ = ["stream_generate"]


def stream_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    generate_kwargs: dict[str, Any],
    *,
    lock: AbstractContextManager[Any] | None = None,
    seed: int | None = None,
    timeout: float = 300.0,
) -> Iterator[str]:
    """Yield decoded text chunks (prompt and special tokens skipped) as ``generate`` makes them.

    generate_kwargs: ``input_ids`` or ``inputs_embeds`` plus any generate() settings; a streamer
    and ``pad_token_id`` (the tokenizer's) are added here. lock: held while generate runs (a
    threading.Lock, or any context manager that holds one, such as SparsitySwitch.holding).
    """
    streamer = TextIteratorStreamer(
        cast(Any, tokenizer), skip_prompt=True, skip_special_tokens=True, timeout=timeout
    )
    kwargs = {"pad_token_id": tokenizer.pad_token_id, **generate_kwargs, "streamer": streamer}
    errors: list[BaseException] = []
    guard = lock or threading.Lock()

    def run() -> None:
        try:
            with guard, torch.inference_mode():
                if seed is not None:
                    torch.manual_seed(seed)
                cast(Any, model).generate(**kwargs)
        except BaseException as err:  # noqa: BLE001 -- re-raised in the caller thread below
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
