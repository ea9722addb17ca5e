"""Next-token prediction (NTP): the plain causal-LM batch.

    collator = NTPCollator(pad_token_id=tokenizer.pad_token_id)
    batch = collator([[5, 6, 7], [8, 9]])          # input_ids, attention_mask, labels (B, T)
    loss = model(**batch).loss                      # any HF causal LM: the model shifts labels

Labels are the input ids themselves with padding positions set to -100: Hugging Face causal LMs
(and lm.tnl.TNLForCausalLM) shift them inside forward, so position t is scored on token t + 1.
Padding is found by position (right padding), not by id, so a tokenizer whose pad token is its EOS
token keeps real EOS targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "NTPCollator", "TokenRows", "pad_sequences"]

IGNORE_INDEX = -100  # what torch's cross_entropy and HF models skip
# Token sequences as collators take them: lists of ids, 1-D tensors or arrays, or a (B, T) block.
TokenRows = Sequence[Sequence[int] | torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray


def pad_sequences(sequences: TokenRows, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences -> input_ids (B, T) int64 and attention_mask (B, T) (1 = token)."""
    if len(sequences) == 0:
        raise ValueError("expected at least one sequence, received none")
    rows = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
    if any(r.numel() == 0 for r in rows):
        raise ValueError("every sequence must hold at least one token, received an empty one")
    T = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : r.numel()] = r
        attention_mask[i, : r.numel()] = 1
    return input_ids, attention_mask


class NTPCollator:
    """Token sequences -> {"input_ids", "attention_mask", "labels"}, each (B, T) int64."""

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one prediction), received {max_length}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length  # longer sequences are cut from the right

    def __call__(self, sequences: TokenRows) -> dict[str, torch.Tensor]:
        if self.max_length is not None:
            sequences = [s[: self.max_length] for s in sequences]
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
