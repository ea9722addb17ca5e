"""Lexinvariant language models (Huang et al. 2023, "Lexinvariant Language Models").

    cfg = LexinvariantConfig(vocab_size=100, hidden_size=128, num_layers=4, num_heads=4)
    model = build_lexinvariant_lm(cfg)        # token embeddings: fresh Gaussians per sequence
    baseline = build_standard_lm(cfg)         # the same transformer, learned (tied) embeddings
    out = model(input_ids, seeds)             # out.logits (B, T, V); out.embeddings (B, V, D)
    nll = next_token_nll(out.logits, input_ids)   # (B, T-1)

A lexinvariant LM has no learned token embeddings. For every sequence b a Gaussian matrix
E_b in R^{V x D}, entries N(0, std^2), is drawn from a generator seeded with ``seeds[b]``; token
id v at any position of sequence b is embedded as E_b[v] (the same id twice in one sequence gets
the same vector; another sequence, another seed, another vector). The output layer is tied to the
same matrix: logits_b = h @ E_b^T, so the model can only predict a token by pointing at a vector
it has seen in the context (or at an unseen one). The model is thereby invariant to any
permutation of the vocabulary: a substitution-ciphered sequence has exactly the distribution of
embeddings the plain one has, and the model must infer what each symbol is from context alone
("in-context deciphering"); its loss falls with position as it does.

Everything else is a standard causal transformer: transformers' ``LlamaModel`` (RMSNorm, RoPE,
SwiGLU) fed ``inputs_embeds``. Its own embedding table is unused and has one row (a
LlamaModel always builds one); it is frozen. The standard-LM baseline (``build_standard_lm``) is
the same backbone with a learned V x D table tied to the output, i.e. a LlamaForCausalLM with
tied embeddings, written through the same TokenLM so that both models share every other line.

std: the paper draws N(0, I)-scaled vectors; we use std = hidden_size ** -0.5 (unit expected
norm) so that the tied output logits h . E_b[v] start at O(1) after the final RMSNorm. The block
inputs are RMS-normalised anyway, so the scale only sets the output temperature at init.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LearnedTokenEmbeddings",
    "LexinvariantConfig",
    "RandomTokenEmbeddings",
    "TokenLM",
    "TokenLMOutput",
    "build_lexinvariant_lm",
    "build_standard_lm",
    "next_token_nll",
]


@dataclass
class LexinvariantConfig:
    """Sizes of the transformer both the lexinvariant LM and its standard baseline use."""

    vocab_size: int = 100  # V: token ids 0..V-1
    hidden_size: int = 128  # D
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads (hidden_size must divide by it)
    intermediate_size: int = 384  # SwiGLU width
    max_positions: int = 512  # longest sequence (RoPE table size)
    rope_theta: float = 10000.0  # RoPE base
    embedding_std: float | None = None  # std of the random embeddings; None: hidden_size ** -0.5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if self.max_positions < 2:
            raise ValueError(f"max_positions must be >= 2, received {self.max_positions}")
        if self.embedding_std is not None and self.embedding_std <= 0:
            raise ValueError(f"embedding_std must be > 0, received {self.embedding_std}")

    @property
    def std(self) -> float:
        return self.embedding_std if self.embedding_std is not None else self.hidden_size**-0.5

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class TokenLMOutput:
    logits: torch.Tensor  # (B, T, V) next-token logits
    embeddings: torch.Tensor  # (B or 1, V, D) the token embedding matrix each sequence used


class RandomTokenEmbeddings(nn.Module):
    """A fresh N(0, std^2) matrix E_b (V, D) per sequence, drawn from a generator seeded by
    seeds[b]: the same seed gives the same matrix on the same device. No parameters."""

    def __init__(self, vocab_size: int, dim: int, std: float) -> None:
        super().__init__()
        self.vocab_size, self.dim, self.std = vocab_size, dim, std

    def forward(self, input_ids: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> (B, V, D). seeds (B,) int; None: drawn from torch's global RNG."""
        b = input_ids.shape[0]
        if seeds is None:
            seeds = torch.randint(0, 2**62, (b,))
        if seeds.shape != (b,):
            raise ValueError(f"expected seeds of shape ({b},), received {tuple(seeds.shape)}")
        device = input_ids.device
        out = torch.empty(b, self.vocab_size, self.dim, device=device)
        for row, seed in enumerate(seeds.tolist()):
            gen = torch.Generator(device=device).manual_seed(int(seed))
            torch.randn(self.vocab_size, self.dim, generator=gen, device=device, out=out[row])
        return out.mul_(self.std)


class LearnedTokenEmbeddings(nn.Module):
    """An ordinary learned table, shared by every sequence (the standard-LM baseline)."""

    def __init__(self, vocab_size: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, dim) * init_std)

    def forward(self, input_ids: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> (1, V, D); seeds are ignored."""
        return self.weight.unsqueeze(0)


class TokenLM(nn.Module):
    """A causal transformer whose input and output token vectors come from `token_embeddings`
    (tied): logits[b, t, v] = h[b, t] . E_b[v]."""

    def __init__(self, backbone: nn.Module, token_embeddings: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone  # a transformers decoder taking inputs_embeds (LlamaModel)
        self.token_embeddings = token_embeddings

    def forward(self, input_ids: torch.Tensor, seeds: torch.Tensor | None = None) -> TokenLMOutput:
        """input_ids (B, T) int64 in [0, V); seeds (B,) int64 (lexinvariant only)."""
        if input_ids.dim() != 2:
            raise ValueError(f"expected input_ids (B, T), received {tuple(input_ids.shape)}")
        table = self.token_embeddings(input_ids, seeds)  # (B or 1, V, D)
        vocab = table.shape[1]
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(
                f"token ids must be in [0, {vocab}), received [{int(input_ids.min())}, "
                f"{int(input_ids.max())}]"
            )
        b = input_ids.shape[0]
        rows = torch.arange(b, device=input_ids.device)[:, None] if table.shape[0] > 1 else 0
        inputs = table[rows, input_ids]  # (B, T, D)
        hidden = self.backbone(inputs_embeds=inputs, use_cache=False).last_hidden_state
        logits = hidden @ table.transpose(1, 2)  # (B, T, D) @ (B|1, D, V) -> (B, T, V)
        return TokenLMOutput(logits=logits, embeddings=table)


def _backbone(cfg: LexinvariantConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    llama = LlamaConfig(
        vocab_size=1,  # its own table is never used: TokenLM feeds inputs_embeds
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaModel(llama)
    model.embed_tokens.requires_grad_(False)
    return model


def build_lexinvariant_lm(cfg: LexinvariantConfig) -> TokenLM:
    """Random weights; token embeddings drawn per sequence (nothing learned for tokens)."""
    return TokenLM(_backbone(cfg), RandomTokenEmbeddings(cfg.vocab_size, cfg.hidden_size, cfg.std))


def build_standard_lm(cfg: LexinvariantConfig) -> TokenLM:
    """The baseline: the same transformer with a learned, tied V x D token table."""
    return TokenLM(_backbone(cfg), LearnedTokenEmbeddings(cfg.vocab_size, cfg.hidden_size))


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T-1) NLL of token t+1 given tokens <= t (nats)."""
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}"
        )
    pred = logits[:, :-1].float()
    return F.cross_entropy(pred.transpose(1, 2), input_ids[:, 1:], reduction="none")
