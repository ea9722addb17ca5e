"""Synthetic languages with known distributions, for the decoding methods that train a model.

    lang = WalkLanguage(values=5, length=8, p_up=0.7)
    x = lang.sample(1000, generator)            # (1000, 8) int64 in [0, 5)
    lang.is_valid(x)                            # (1000,) bool: every hard constraint holds
    support, probs = lang.support()             # all valid sequences and their exact probabilities

    task = PrefixSumTask(values=8, length=12)
    src, tgt = task.sample(64, generator)       # (64, 12) each; ids in task.vocab

WalkLanguage: a random walk on Z_V. x_1 is uniform on {0..V-1}; each next token is the previous
one +1 (probability p_up) or -1 (1 - p_up), mod V. The hard constraint between tokens: every
adjacent pair differs by exactly +-1 mod V, so tokens i and j are tied at every distance where
the reachable differences do not cover Z_V (V = 5: 2 of 5 values allowed at distance 1, 3 at
distance 2, 4 at distance 3). Sampling several positions independently from their marginals
breaks these ties; sampling them jointly does not. The support has V * 2^(L-1) sequences, small
enough to measure a sampler's total variation distance to the exact distribution.

PrefixSumTask: a sequence-to-sequence task whose target is a WalkLanguage sequence. The source is
the walk's start value followed by its L-1 steps (UP / DOWN tokens); the target is the walk
itself, t_i = t_{i-1} +- 1 mod V. Each target token depends on every source token before it
(a count mod V), but only on its left neighbour and one source token once a draft target exists:
a task on which iterative refinement can fix what one parallel pass gets wrong.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

__all__ = ["PrefixSumTask", "WalkLanguage", "total_variation"]


@dataclass(frozen=True)
class WalkLanguage:
    values: int = 5  # V: tokens 0..V-1
    length: int = 8  # L: tokens per sequence
    p_up: float = 0.7  # probability of a +1 step (else -1)

    def __post_init__(self) -> None:
        if self.values < 3:
            raise ValueError(f"values must be >= 3 (+1 and -1 must differ), received {self.values}")
        if self.length < 2:
            raise ValueError(f"length must be >= 2, received {self.length}")
        if not 0.0 < self.p_up < 1.0:
            raise ValueError(f"p_up must be in (0, 1), received {self.p_up}")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, L) int64 sequences drawn from the language."""
        start = torch.randint(self.values, (n, 1), generator=generator)
        up = torch.rand(n, self.length - 1, generator=generator) < self.p_up
        steps = torch.where(up, 1, -1)
        walk = torch.cat([start, start + steps.cumsum(dim=1)], dim=1)
        return walk.remainder(self.values)

    def is_valid(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) bool: x (N, L) keeps every constraint (tokens in range, adjacent steps +-1)."""
        if x.dim() != 2 or x.shape[1] != self.length:
            raise ValueError(f"expected (N, {self.length}) sequences, received {tuple(x.shape)}")
        in_range = ((x >= 0) & (x < self.values)).all(dim=1)
        step = (x[:, 1:] - x[:, :-1]).remainder(self.values)
        return in_range & ((step == 1) | (step == self.values - 1)).all(dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) exact log-probability; -inf for sequences outside the language."""
        step = (x[:, 1:] - x[:, :-1]).remainder(self.values)
        ups = (step == 1).sum(dim=1).double()
        downs = (self.length - 1) - ups
        lp = -torch.log(torch.tensor(float(self.values), dtype=torch.float64))
        lp = lp + ups * torch.log(torch.tensor(self.p_up, dtype=torch.float64))
        lp = lp + downs * torch.log(torch.tensor(1.0 - self.p_up, dtype=torch.float64))
        return torch.where(self.is_valid(x), lp, torch.tensor(-torch.inf, dtype=torch.float64))

    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, L) every valid sequence and (S,) float64 its probability (they sum to 1)."""
        rows = []
        for start in range(self.values):
            for steps in itertools.product((1, -1), repeat=self.length - 1):
                walk = [start]
                for s in steps:
                    walk.append((walk[-1] + s) % self.values)
                rows.append(walk)
        seqs = torch.tensor(rows, dtype=torch.long)
        return seqs, self.log_prob(seqs).exp()


def total_variation(samples: torch.Tensor, support: torch.Tensor, probs: torch.Tensor) -> float:
    """0.5 * sum_s |p_hat(s) - p(s)| between the empirical distribution of samples (N, L) and
    the exact distribution (support (S, L), probs (S,)); samples outside the support count with
    p = 0 (their whole mass is distance)."""
    n = samples.shape[0]
    index = {tuple(row): i for i, row in enumerate(support.tolist())}
    counts = torch.zeros(len(index), dtype=torch.float64)
    outside = 0
    for row in samples.tolist():
        i = index.get(tuple(row))
        if i is None:
            outside += 1
        else:
            counts[i] += 1
    inside = (counts / n - probs).abs().sum().item()
    return 0.5 * (inside + outside / n)


@dataclass(frozen=True)
class PrefixSumTask:
    values: int = 8  # V: target tokens 0..V-1
    length: int = 12  # L: target tokens (source: the start value + L-1 steps)
    p_up: float = 0.5

    def __post_init__(self) -> None:
        WalkLanguage(self.values, self.length, self.p_up)  # same validation

    # Token ids: values 0..V-1, then UP, DOWN, SEP, MASK (MASK only for MLM pretraining).
    @property
    def up_id(self) -> int:
        return self.values

    @property
    def down_id(self) -> int:
        return self.values + 1

    @property
    def sep_id(self) -> int:
        return self.values + 2

    @property
    def mask_id(self) -> int:
        return self.values + 3

    @property
    def vocab_size(self) -> int:
        return self.values + 4

    def language(self) -> WalkLanguage:
        return WalkLanguage(self.values, self.length, self.p_up)

    def source_of(self, walk: torch.Tensor) -> torch.Tensor:
        """(N, L) walks -> (N, L) sources: start value, then UP / DOWN per step."""
        step = (walk[:, 1:] - walk[:, :-1]).remainder(self.values)
        moves = torch.where(step == 1, self.up_id, self.down_id)
        return torch.cat([walk[:, :1], moves], dim=1)

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(src, tgt), each (n, L) int64."""
        tgt = self.language().sample(n, generator)
        return self.source_of(tgt), tgt

    def unlabelled(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Monolingual text for MLM pretraining, laid out like the task's input: (n, 2L+1) ids
        [source-language string ; SEP ; target-language string] with the two halves drawn
        independently (never an aligned pair), and (n, 2L+1) segment ids 0 / 1."""
        src = self.source_of(self.language().sample(n, generator))
        tgt = self.language().sample(n, generator)
        sep = torch.full((n, 1), self.sep_id, dtype=torch.long)
        segments = torch.cat([torch.zeros(n, self.length + 1), torch.ones(n, self.length)], 1)
        return torch.cat([src, sep, tgt], dim=1), segments.long()
