"""MLM-initialised non-autoregressive seq2seq (the thesis' RUM-SUNDAE idea) with SUNDAE training.

    mlm = build_mlm(task.vocab_size, max_length=2 * task.length + 1)
    loss = mlm_loss(mlm, task.unlabelled(256), mask_id=task.mask_id)       # 1. pretrain an MLM
    loss = sundae_loss(mlm, src, tgt, sep_id=task.sep_id, target_vocab=task.values)   # 2. NAR
    drafts = refine(mlm, src, length=task.length, sep_id=task.sep_id,
                    target_vocab=task.values, steps=8)                       # one (B, L) per step

Yoshida's thesis (arXiv 2408.16241) turns a pretrained masked LM into a non-autoregressive
encoder-decoder trained with SUNDAE, so models only ever used for understanding become generators.
SUNDAE (Savinov et al., "Step-unrolled Denoising Autoencoders for Text Generation", ICLR 2022):
the target is corrupted by replacing a proportion r ~ U(0, 1) of its tokens with uniformly random
tokens, x^(1) = corrupt(y); the model f maps (source, draft) to a distribution over every target
token in parallel; the draft is unrolled by sampling from the model, x^(t+1) ~ f(. | src, x^(t))
(no gradient through the sample), and the loss averages the reconstruction losses of the
unrolled steps:

    L = (1/T) * sum_{t=1}^{T} CE(f(src, x^(t)), y),  T = 2                (SUNDAE unrolled loss)

Decoding starts from uniformly random tokens and applies x <- argmax f(src, x) for a number of
refinement steps (SUNDAE's argmax-unrolled decoding, used for translation).

Our reading, on a small scale: one bidirectional transformer (transformers' BertForMaskedLM)
reads [source ; SEP ; draft target] with segment ids 0 / 1, so the encoder and the decoder are
the same MLM-initialised stack (the thesis initialises a separate encoder and decoder from the
MLM; one stack is the smallest model that keeps "both initialised from the MLM"). The target
length is given (the synthetic task has fixed length; SUNDAE predicts it). MLM pretraining is BERT's
(15% of tokens selected: 80% [MASK], 10% random, 10% kept) on unlabelled text.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

__all__ = ["build_mlm", "mlm_loss", "nar_logits", "refine", "sundae_loss"]


def build_mlm(
    vocab_size: int,
    max_length: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
) -> BertForMaskedLM:
    """A BertForMaskedLM (random weights, no dropout, two segment types)."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_length,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


def mlm_loss(
    mlm: Any,
    x: torch.Tensor,
    mask_id: int,
    *,
    random_vocab: int,
    ratio: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    generator: torch.Generator | None = None,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """BERT's masked-LM loss on x (B, T): `ratio` of the positions (at least one per row) are
    selected; of those mask_fraction become MASK, random_fraction a random id in
    [0, random_vocab), the rest stay; the cross-entropy is on every selected position.
    token_type_ids (B, T): segment ids, if any.

    The random replacements matter here: without them (mask_fraction 1, random_fraction 0) an
    MLM learns that every visible token is right, and SUNDAE's random drafts then start from a
    model that copies them (docs/DECODING.md has the run)."""
    if not (mask_fraction >= 0 and random_fraction >= 0 and mask_fraction + random_fraction <= 1):
        raise ValueError(
            f"mask_fraction and random_fraction must be >= 0 with a sum <= 1, received "
            f"{mask_fraction}, {random_fraction}"
        )
    B, T = x.shape
    # drawn on the CPU (a seeded CPU generator), used where x lives
    selected = torch.rand(B, T, generator=generator) < ratio
    selected[torch.arange(B), torch.randint(T, (B,), generator=generator)] = True
    action = torch.rand(B, T, generator=generator)
    noise = torch.randint(random_vocab, (B, T), generator=generator)
    selected, action, noise = selected.to(x.device), action.to(x.device), noise.to(x.device)
    to_mask = selected & (action < mask_fraction)
    to_noise = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    inputs = torch.where(to_mask, mask_id, x)
    inputs = torch.where(to_noise, noise, inputs)
    logits = mlm(input_ids=inputs, token_type_ids=token_type_ids).logits
    return F.cross_entropy(logits[selected], x[selected])


def nar_logits(
    mlm: Any, src: torch.Tensor, draft: torch.Tensor, sep_id: int, target_vocab: int
) -> torch.Tensor:
    """(B, L, target_vocab) logits for every target position of draft (B, L) given src (B, S);
    only the target ids 0..target_vocab-1 can be predicted."""
    B, S = src.shape
    sep = torch.full((B, 1), sep_id, dtype=src.dtype, device=src.device)
    ids = torch.cat([src, sep, draft], dim=1)
    segments = torch.cat([torch.zeros_like(src), torch.zeros_like(sep), torch.ones_like(draft)], 1)
    logits = mlm(input_ids=ids, token_type_ids=segments).logits
    return logits[:, S + 1 :, :target_vocab].float()


def sundae_loss(
    mlm: Any,
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    sep_id: int,
    target_vocab: int,
    unroll_steps: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The SUNDAE unrolled loss above; src (B, S), tgt (B, L) with ids < target_vocab."""
    if unroll_steps < 1:
        raise ValueError(f"unroll_steps must be >= 1, received {unroll_steps}")
    B, L = tgt.shape
    rate = torch.rand(B, 1, generator=generator)
    corrupt = (torch.rand(B, L, generator=generator) < rate).to(tgt.device)
    noise = torch.randint(target_vocab, (B, L), generator=generator).to(tgt.device)
    draft = torch.where(corrupt, noise, tgt)
    losses = []
    for step in range(unroll_steps):
        logits = nar_logits(mlm, src, draft, sep_id, target_vocab)
        losses.append(F.cross_entropy(logits.transpose(1, 2), tgt))
        if step + 1 < unroll_steps:
            with torch.no_grad():
                probs = F.softmax(logits, dim=-1).flatten(0, 1).cpu()
                draft = torch.multinomial(probs, 1, generator=generator).view(B, L)
                draft = draft.to(tgt.device)
    return torch.stack(losses).mean()


@torch.no_grad()
def refine(
    mlm: Any,
    src: torch.Tensor,
    *,
    length: int,
    sep_id: int,
    target_vocab: int,
    steps: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Argmax-unrolled decoding from uniformly random drafts: the draft (B, length) after each
    of `steps` refinement steps (a list of steps tensors)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, received {steps}")
    draft = torch.randint(target_vocab, (src.shape[0], length), generator=generator)
    draft = draft.to(src.device)
    drafts = []
    for _ in range(steps):
        draft = nar_logits(mlm, src, draft, sep_id, target_vocab).argmax(dim=-1)
        drafts.append(draft)
    return drafts
