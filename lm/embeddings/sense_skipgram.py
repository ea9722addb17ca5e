"""Disambiguated Skip-gram (Grzegorczyk & Kurdziel 2018, "Disambiguated skip-gram model"):
K sense vectors per word, a differentiable sense selection from the context, and the skip-gram
negative-sampling loss.

    cfg = SenseSkipGramConfig(vocab_size=V, dim=50, senses=2)
    model = DisambiguatedSkipGram(cfg)
    centers, contexts, mask = skipgram_windows(ids, window=5)       # (M,), (M, 2w), (M, 2w)
    out = model(centers[b], contexts[b], mask[b], negatives)        # negatives (B, 2w, n)
    out.loss.backward()
    p = model.sense_probabilities(centers, contexts, mask)          # (M, K), rows sum to 1
    model.sense_vectors[word]                                       # (K, D)

Model. Word w has K sense vectors v_{w,k} and K sense keys s_{w,k}; every word c also has an
output ("context") vector u_c and a disambiguation feature d_c. For a center word w with context
words C (the window around it):

- sense selection (the disambiguation network): q = mean_{c in C} d_c,
  p(k | w, C) = softmax_k(s_{w,k} . q / temperature); in training it can be a Gumbel-softmax
  relaxed sample instead (``gumbel=True``), which keeps the choice stochastic but differentiable;
- per-sense skip-gram loss with negative sampling (Mikolov et al. 2013):
  l_k = -(1/|C|) sum_{c in C} [log sigma(v_{w,k} . u_c) + sum_{n in N_c} log sigma(-v_{w,k} . u_n)];
- loss = sum_k p(k | w, C) l_k + entropy_weight * H(p(. | w, C)), averaged over the batch: the
  expected skip-gram loss under the sense distribution, end-to-end differentiable in the
  selection and in the sense vectors (the paper's point against EM/hard-assignment models such as
  MSSG or AdaGram). A positive entropy_weight makes the choice confident.

Our reading of the paper: the expectation form, the mean-of-context disambiguation features and
the entropy term are how we understood it; the paper's pruning of rarely used senses is left out.
With K = 1 this is plain skip-gram with negative sampling (the single-sense baseline).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DisambiguatedSkipGram",
    "SenseSkipGramConfig",
    "SenseSkipGramOutput",
    "skipgram_windows",
]


@dataclass
class SenseSkipGramConfig:
    vocab_size: int  # V
    dim: int = 50  # D
    senses: int = 2  # K sense vectors per word (1: plain skip-gram)
    temperature: float = 1.0  # of the sense-selection softmax
    gumbel: bool = True  # training: Gumbel-softmax relaxed samples instead of the softmax
    entropy_weight: float = 0.0  # weight of H(p(k | w, C)) added to the loss

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "senses"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, received {self.temperature}")
        if self.entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, received {self.entropy_weight}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SenseSkipGramOutput:
    loss: torch.Tensor  # () the batch mean of the expected loss (+ entropy term)
    sense_probabilities: torch.Tensor  # (B, K) the selection used (Gumbel sample in training)
    sense_losses: torch.Tensor  # (B, K) l_k: the skip-gram loss of each sense


class DisambiguatedSkipGram(nn.Module):
    def __init__(self, cfg: SenseSkipGramConfig) -> None:
        super().__init__()
        self.cfg = cfg
        v, k, d = cfg.vocab_size, cfg.senses, cfg.dim
        # Output vectors start at zero (word2vec). Sense vectors start at unit expected norm
        # (not word2vec's +-0.5/D), and keys and features at unit scale per entry, so that the
        # first selections already depend on the context (at random) and the senses start
        # apart. With word2vec-sized vectors and small keys every selection starts uniform, both
        # senses learn the same average and one takes over everywhere: on a planted two-context
        # word (tests/test_sense_skipgram.py) that collapse happened in about half the seeds,
        # and on pydoc pseudo-words in all of them.
        self.sense_vectors = nn.Parameter(torch.randn(v, k, d) * d**-0.5)  # v_{w,k}
        self.context_vectors = nn.Parameter(torch.zeros(v, d))  # u_c
        self.sense_keys = nn.Parameter(torch.randn(v, k, d))  # s_{w,k}
        self.context_features = nn.Parameter(torch.randn(v, d))  # d_c

    def selection_logits(
        self, centers: torch.Tensor, contexts: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B,), (B, C), (B, C) bool -> (B, K) sense scores s_{w,k} . mean_c d_c / temperature."""
        m = mask.to(self.context_features.dtype)
        counts = m.sum(dim=1, keepdim=True).clamp_min(1.0)
        q = (self.context_features[contexts] * m[..., None]).sum(dim=1) / counts  # (B, D)
        keys = self.sense_keys[centers]  # (B, K, D)
        return torch.einsum("bkd,bd->bk", keys, q) / self.cfg.temperature

    def sense_probabilities(
        self, centers: torch.Tensor, contexts: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, K) p(k | w, C): the softmax (never a Gumbel sample), rows sum to 1."""
        self._check(centers, contexts, mask)
        return self.selection_logits(centers, contexts, mask).softmax(dim=-1)

    def forward(
        self,
        centers: torch.Tensor,
        contexts: torch.Tensor,
        mask: torch.Tensor,
        negatives: torch.Tensor,
    ) -> SenseSkipGramOutput:
        """centers (B,), contexts (B, C) word ids, mask (B, C) bool (False: padding past a text
        edge), negatives (B, C, n) noise word ids for each context word."""
        self._check(centers, contexts, mask)
        if negatives.shape[:2] != contexts.shape:
            raise ValueError(
                f"expected negatives (B, C, n) with (B, C) = {tuple(contexts.shape)}, received "
                f"{tuple(negatives.shape)}"
            )
        logits = self.selection_logits(centers, contexts, mask)
        if self.training and self.cfg.gumbel and self.cfg.senses > 1:
            probs = F.gumbel_softmax(logits, tau=1.0, hard=False)
        else:
            probs = logits.softmax(dim=-1)
        v = self.sense_vectors[centers]  # (B, K, D)
        pos = torch.einsum("bkd,bcd->bkc", v, self.context_vectors[contexts])  # (B, K, C)
        neg = torch.einsum("bkd,bcnd->bkcn", v, self.context_vectors[negatives])  # (B, K, C, n)
        per_context = F.logsigmoid(pos) + F.logsigmoid(-neg).sum(dim=-1)  # (B, K, C)
        m = mask.to(per_context.dtype)[:, None, :]
        sense_losses = -(per_context * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # (B, K)
        loss = (probs * sense_losses).sum(dim=-1)
        if self.cfg.entropy_weight:
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
            loss = loss + self.cfg.entropy_weight * entropy
        return SenseSkipGramOutput(loss.mean(), probs, sense_losses)

    def _check(self, centers: torch.Tensor, contexts: torch.Tensor, mask: torch.Tensor) -> None:
        if centers.dim() != 1 or contexts.shape[0] != centers.shape[0] or contexts.dim() != 2:
            raise ValueError(
                f"expected centers (B,) and contexts (B, C), received {tuple(centers.shape)} and "
                f"{tuple(contexts.shape)}"
            )
        if mask.shape != contexts.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"expected a bool mask of shape {tuple(contexts.shape)}, received "
                f"{mask.dtype} {tuple(mask.shape)}"
            )


def skipgram_windows(ids: Any, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every position of a token stream as a training example: centers (M,), contexts (M, 2w)
    (the w ids before, then the w after) and mask (M, 2w) (False past either end of the stream;
    those context slots hold id 0)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, received {window}")
    stream = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if stream.dim() != 1:
        raise ValueError(f"expected a 1-D stream of ids, received shape {tuple(stream.shape)}")
    n = stream.numel()
    offsets = torch.cat([torch.arange(-window, 0), torch.arange(1, window + 1)])  # (2w,)
    where = torch.arange(n)[:, None] + offsets[None, :]  # (M, 2w)
    mask = (where >= 0) & (where < n)
    contexts = torch.where(mask, stream[where.clamp(0, max(n - 1, 0))], 0)
    return stream, contexts, mask
