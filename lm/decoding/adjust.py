"""ADJUST: approximate joint sampling of K tokens per forward pass of a masked diffusion LM.

    mdlm = build_masked_diffusion_lm(vocab_size=6, length=8)          # BertForMaskedLM, mask = 5
    loss = masked_diffusion_loss(mdlm, x0, mask_id=5)                 # train the diffusion LM
    sampler = ADJUSTSampler.from_mdlm(mdlm)                           # one transformer layer
    loss = sampler_loss(mdlm, sampler, x0, mask_id=5, tokens_per_step=4)   # mdlm frozen
    x, passes = sample_masked_diffusion(mdlm, 1000, 8, mask_id=5, tokens_per_step=4,
                                        sampler=sampler)

"Enabling approximate joint sampling in diffusion LMs" (arXiv 2509.22738). A masked diffusion LM
gives, in one forward pass, the marginal p(x_i | x_t) of every masked position i. Unmasking one
token per pass (K = 1, any order) samples the model's exact joint distribution; unmasking K > 1
tokens from their marginals in the same pass samples the product of marginals, which breaks the
dependencies between them. ADJUST keeps one full pass per K tokens and adds a single-layer
sampler: after the full pass gives hidden states h = f(x_t), token j of the step is drawn from

    q_phi(x_{i_j} | h, x_{i_1..i_{j-1}})  ~=  p(x_{i_j} | x_t, x_{i_1..i_{j-1}})   (the full model)

so the K tokens of a step are sampled one after another, each conditioned on the ones before it,
at the cost of one sampler layer each. The sampler is trained to mimic exact one-at-a-time
sampling from the frozen model: the loss is KL(p_full(. | x_t, revealed) || q_phi(. | h, revealed))
on every still-masked position, with r in {0..K-1} positions revealed.

Our choices where the summary leaves them open (written by hand, no library has them): the
sampler input is h plus a linear map of the revealed tokens' embeddings at their positions; the
layer is torch's TransformerEncoderLayer (pre-norm) with its residual branches zero-initialised
and the output head a copy of the diffusion LM's MLM head, so an untrained sampler returns the
marginals exactly (ADJUST then equals marginal sampling). The revealed tokens during training are
the data tokens, not the model's own samples (the KL target is the full model's conditional
given them, which is exact for whatever tokens are revealed).

The diffusion LM is transformers' BertForMaskedLM trained with the masked diffusion objective
(MDLM / LLaDA, linear schedule):

    L = E_{t ~ U(0,1), x_t ~ q(. | x_0)} [ (1/t) * sum_{i: x_t^i = MASK} -log p(x_0^i | x_t) ] / L

where q masks every token independently with probability t.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM

__all__ = [
    "ADJUSTSampler",
    "build_masked_diffusion_lm",
    "masked_diffusion_loss",
    "mdlm_forward",
    "sample_masked_diffusion",
    "sampler_loss",
]


def build_masked_diffusion_lm(
    vocab_size: int,
    length: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
) -> BertForMaskedLM:
    """A bidirectional transformer (BertForMaskedLM, random weights, no dropout); the caller
    reserves one id of vocab_size as MASK."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=length,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


def mdlm_forward(model: Any, x: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, L, D), logits (B, L, V)) of x (B, L); MASK is never a prediction."""
    hidden = model.bert(input_ids=x).last_hidden_state
    logits = model.cls(hidden).float()
    logits[..., mask_id] = -torch.inf
    return hidden, logits


def _mask_at_random_rate(
    x0: torch.Tensor, mask_id: int, generator: torch.Generator | None, eps: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t, masked (B, L) and t (B, 1): each row masked with its own t ~ U(eps, 1)."""
    B, L = x0.shape
    # drawn on the CPU (a seeded CPU generator), used where x0 lives
    t = (torch.rand(B, 1, generator=generator) * (1 - eps) + eps).to(x0.device)
    masked = torch.rand(B, L, generator=generator).to(x0.device) < t
    return x0.masked_fill(masked, mask_id), masked, t


def masked_diffusion_loss(
    model: Any, x0: torch.Tensor, mask_id: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The masked diffusion objective above on clean sequences x0 (B, L)."""
    xt, masked, t = _mask_at_random_rate(x0, mask_id, generator)
    _, logits = mdlm_forward(model, xt, mask_id)
    nll = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # (B, L)
    return (nll * masked / t).sum() / x0.numel()


class ADJUSTSampler(nn.Module):
    """One transformer layer over the full model's hidden states plus the tokens revealed so far
    in the current step."""

    def __init__(self, token_embedding: nn.Embedding, head: nn.Module, num_heads: int = 4):
        super().__init__()
        D = token_embedding.embedding_dim
        self.token_embedding = token_embedding  # (V, D), a copy of the diffusion LM's
        self.reveal = nn.Linear(D, D)
        self.layer = nn.TransformerEncoderLayer(
            D, num_heads, dim_feedforward=4 * D, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = head  # hidden (.., D) -> logits (.., V), a copy of the diffusion LM's
        # Zero residual branches: an untrained sampler returns the full model's marginals.
        for linear in (self.reveal, self.layer.self_attn.out_proj, self.layer.linear2):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @classmethod
    def from_mdlm(cls, mdlm: Any, num_heads: int = 4) -> ADJUSTSampler:
        embedding = copy.deepcopy(mdlm.get_input_embeddings())
        head = copy.deepcopy(mdlm.cls)
        sampler = cls(embedding, head, num_heads)
        return sampler.to(next(mdlm.parameters()).device)

    def forward(
        self,
        hidden: torch.Tensor,  # (B, L, D) the full model's last hidden states on x_t
        tokens: torch.Tensor,  # (B, L) ids of tokens revealed in this step (any id elsewhere)
        revealed: torch.Tensor,  # (B, L) bool: revealed in this step
    ) -> torch.Tensor:  # (B, L, V) logits
        z = hidden + self.reveal(self.token_embedding(tokens)) * revealed.unsqueeze(-1)
        return self.head(self.layer(z)).float()


def sampler_loss(
    mdlm: Any,
    sampler: ADJUSTSampler,
    x0: torch.Tensor,
    mask_id: int,
    tokens_per_step: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean KL(p_full || q_sampler) over the still-masked positions of a random x_t with
    r ~ U{0..K-1} of its masked positions revealed (their data tokens). mdlm is not trained."""
    if tokens_per_step < 2:
        raise ValueError(
            f"tokens_per_step must be >= 2 to train a sampler, received {tokens_per_step}"
        )
    B, L = x0.shape
    xt, masked, _ = _mask_at_random_rate(x0, mask_id, generator)
    # masked positions first, in a random order per row
    u = torch.rand(B, L, generator=generator).to(x0.device)
    order = u.masked_fill(~masked, 2.0).argsort(dim=1)
    r = torch.randint(tokens_per_step, (B, 1), generator=generator).to(x0.device)
    positions = torch.arange(L, device=x0.device).expand(B, L)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    revealed = masked & (rank < r)
    still = masked & ~revealed
    with torch.no_grad():
        hidden, _ = mdlm_forward(mdlm, xt, mask_id)
        _, teacher = mdlm_forward(mdlm, torch.where(revealed, x0, xt), mask_id)
    student = sampler(hidden, x0, revealed)
    student = student.masked_fill(torch.isinf(teacher), -torch.inf)  # MASK: never a token
    log_q = F.log_softmax(student, dim=-1).masked_fill(torch.isinf(teacher), 0.0)
    log_p = F.log_softmax(teacher, dim=-1)
    p = log_p.exp()
    kl = (p * (log_p.masked_fill(p == 0, 0.0) - log_q)).sum(dim=-1)  # (B, L)
    return (kl * still).sum() / still.sum().clamp(min=1)


@torch.no_grad()
def sample_masked_diffusion(
    mdlm: Any,
    n: int,
    length: int,
    mask_id: int,
    *,
    tokens_per_step: int = 1,
    sampler: ADJUSTSampler | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Sample n sequences of `length` tokens from all-MASK; returns ((n, length), full passes).

    Each full pass unmasks `tokens_per_step` (K) positions chosen uniformly among the masked
    ones. K = 1: exact sampling of the model's joint. K > 1 without a sampler: all K from the
    pass's marginals (the baseline). K > 1 with a sampler (ADJUST): the first from the full
    model's marginal, each next one from the sampler given the tokens already drawn this step.
    """
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, received {tokens_per_step}")
    device = next(mdlm.parameters()).device
    x = torch.full((n, length), mask_id, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)
    passes = 0
    while bool((x == mask_id).any()):
        masked = x == mask_id
        hidden, logits = mdlm_forward(mdlm, x, mask_id)
        passes += 1
        u = torch.rand(n, length, generator=generator).to(device)
        order = u.masked_fill(~masked, 2.0).argsort(dim=1)
        k = min(tokens_per_step, int(masked.sum(dim=1).min()))
        revealed = torch.zeros_like(masked)
        for j in range(k):
            pos = order[:, j]  # (n,)
            if j > 0 and sampler is not None:
                step_logits = sampler(hidden, x, revealed)[rows, pos]
                step_logits[:, mask_id] = -torch.inf
            else:
                step_logits = logits[rows, pos]
            probs = F.softmax(step_logits, dim=-1)
            token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
            x[rows, pos] = token
            revealed[rows, pos] = True
    return x, passes
