"""DSE (Distilled Sentence Embedding; Barkan et al. 2020, microsoft/Distilled-Sentence-Embedding):
a bi-encoder student distilled from a cross-encoder teacher's scores.

    teacher = CrossEncoder.from_source("minilm-l6", max_length=96)     # reads query and candidate
    student = BiEncoder.from_source("minilm-l6", max_length=64)        # one embedding per text
    t = teacher.score(queries, candidates)                              # (Q, C)
    s = student.score(queries, candidates)                              # (Q, C)
    loss = distillation_kl(s, t.detach(), temperature=1.0)              # the DSE student
    loss = label_loss(s, positives)                                     # the label-only student

Each query q has C candidates c_1..c_C (one of them the positive). The teacher scores a pair by
reading both texts in one sequence ([CLS] q [SEP] c [SEP] -> mean-pooled states -> a linear head;
``CrossEncoder`` says why not the [CLS] state); the student embeds q and every c on their own
(mean pooling, lm.embeddings.pooling) and scores s(q, c) = scale * cos(e_q, e_c). Scoring Q
queries against N texts costs the teacher Q x N forward passes and the student Q + N (the N once,
offline, in a retrieval index); that is the speed DSE buys.

Losses over each query's candidate list, averaged over queries:

- ``distillation_kl``: T^2 KL(softmax(t / T) || softmax(s / T)), the student matching the
  teacher's whole score distribution over the candidates (Hinton et al.'s T^2 keeps the gradient
  scale independent of T). DSE's paper fits the teacher's logits; the KL over a candidate list is
  the form listwise retrieval distillation uses.
- ``label_loss``: cross-entropy of the positive among the candidates (InfoNCE with the list's
  negatives): the student trained on the labels alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.sources import resolve_source
from lm.embeddings.pooling import LMEmbedder, pool
from lm.loading import load_tokenizer

__all__ = [
    "CROSS_POOLINGS",
    "BiEncoder",
    "CrossEncoder",
    "candidate_accuracy",
    "distillation_kl",
    "label_loss",
]


CROSS_POOLINGS: tuple[str, ...] = ("mean", "cls")


def _check_scores(scores: torch.Tensor, name: str) -> None:
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"{name} must be (Q, C) scores with C >= 2 candidates, received {tuple(scores.shape)}"
        )


def distillation_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * mean over queries of KL(softmax(teacher / T) || softmax(student / T)).

    student, teacher: (Q, C) scores of each query's C candidates; no gradient reaches the teacher.
    """
    _check_scores(student, "student")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher scores must have one shape, received {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, received {temperature}")
    log_target = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_target, reduction="batchmean", log_target=True)
    return kl * temperature**2


def label_loss(student: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each query's positive among its candidates. student: (Q, C);
    positives: (Q,) index of the positive."""
    _check_scores(student, "student")
    if positives.shape != student.shape[:1]:
        raise ValueError(
            f"positives must be (Q,) = ({student.shape[0]},), received {tuple(positives.shape)}"
        )
    return F.cross_entropy(student.float(), positives.to(student.device))


def candidate_accuracy(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Share of queries whose positive scores strictly above every other candidate (a tie
    counts as a miss). scores: (Q, C); positives: (Q,)."""
    _check_scores(scores, "scores")
    rows = torch.arange(scores.shape[0])
    best = scores[rows, positives]
    others = scores.clone()
    others[rows, positives] = float("-inf")
    return float((best > others.max(-1).values).float().mean())


def _flatten(candidates: Sequence[Sequence[str]], q: int) -> list[str]:
    if len(candidates) != q or len({len(c) for c in candidates}) != 1:
        raise ValueError(
            f"expected {q} candidate lists of one length, received lengths "
            f"{sorted({len(c) for c in candidates})} for {len(candidates)} lists"
        )
    return [c for row in candidates for c in row]


class CrossEncoder(nn.Module):
    """The teacher: an encoder reads query and candidate as one sequence; a linear head on its
    pooled state gives the pair's score.

    encoder: an HF encoder (``AutoModel``, no task head). head: ``nn.Linear(D, 1)``.
    pooling: "mean" (over the pair's tokens; lm.embeddings.pooling) or "cls" (the first token).
    max_length: tokens per pair, special tokens included (the longer text is cut first).

    Not transformers' ``*ForSequenceClassification``: it reads the [CLS] state through the
    pooler, and in all-MiniLM-L6-v2 (trained with mean pooling only) that state barely depends on
    the input (std across pairs ~4e-4 after three layers), so a teacher built on it stayed at
    chance; mean pooling is the default.
    """

    def __init__(
        self,
        encoder: PreTrainedModel,
        head: nn.Linear,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 128,
        pooling: str = "mean",
    ):
        super().__init__()
        if head.in_features != encoder.config.hidden_size or head.out_features != 1:
            raise ValueError(
                f"head must be Linear({encoder.config.hidden_size}, 1), received "
                f"Linear({head.in_features}, {head.out_features})"
            )
        if pooling not in CROSS_POOLINGS:
            raise ValueError(f"pooling must be one of {list(CROSS_POOLINGS)}, received {pooling!r}")
        self.encoder = encoder
        self.head = head
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pooling = pooling

    @classmethod
    def from_source(
        cls,
        source: str,
        *,
        max_length: int = 128,
        num_layers: int | None = None,
        pooling: str = "mean",
    ) -> CrossEncoder:
        """An encoder source (core.sources) with a fresh head (BERT's init: normal(0, 0.02),
        zero bias), in train mode; ``num_layers`` keeps only the first layers."""
        name, kwargs = resolve_source(source).pretrained_args()
        if num_layers is not None:
            kwargs["num_hidden_layers"] = num_layers
        encoder = AutoModel.from_pretrained(name, **kwargs)
        head = nn.Linear(encoder.config.hidden_size, 1)
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return cls(encoder, head, load_tokenizer(source), max_length, pooling).train()

    @property
    def model(self) -> PreTrainedModel:
        return self.encoder

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tokenize(
        self, queries: Sequence[str], candidates: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Pairs (queries[i], candidates[i]) as one batch: input_ids, attention_mask,
        token_type_ids (B, T), on the model's device."""
        enc = self.tokenizer(
            list(queries),
            list(candidates),
            padding=True,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, **pairs: torch.Tensor) -> torch.Tensor:
        """(B,) scores of tokenised pairs (``tokenize``'s output)."""
        hidden = self.encoder(**pairs).last_hidden_state  # (B, T, D)
        if self.pooling == "cls":
            pooled = hidden[:, 0].float()
        else:
            pooled = pool(hidden, pairs["attention_mask"], "mean")  # (B, D)
        return cast(torch.Tensor, self.head(pooled)[:, 0])

    def score(
        self, queries: Sequence[str], candidates: Sequence[Sequence[str]], batch_size: int = 64
    ) -> torch.Tensor:
        """(Q, C) scores of each query against each of its C candidates; differentiable when
        gradients are on (one pass per ``batch_size`` pairs)."""
        flat = _flatten(candidates, len(queries))
        C = len(candidates[0])
        repeated = [q for q in queries for _ in range(C)]
        parts = [
            self(**self.tokenize(repeated[s : s + batch_size], flat[s : s + batch_size]))
            for s in range(0, len(flat), batch_size)
        ]
        return torch.cat(parts).view(len(queries), C)


class BiEncoder(nn.Module):
    """The student: one unit embedding per text, s(q, c) = scale * cos(e_q, e_c).

    embedder: an LMEmbedder (mean pooling by default; ``normalize`` is applied here anyway).
    scale: multiplies the cosine so that softmax over candidates can be sharp (20, as
    sentence-transformers' MultipleNegativesRankingLoss).
    """

    def __init__(self, embedder: LMEmbedder, scale: float = 20.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, received {scale}")
        self.embedder = embedder
        self.scale = scale

    @classmethod
    def from_source(
        cls,
        source: str,
        *,
        max_length: int = 64,
        num_layers: int | None = None,
        pooling: str = "mean",
        scale: float = 20.0,
    ) -> BiEncoder:
        """An encoder source (core.sources), in train mode; ``num_layers`` keeps the first."""
        name, kwargs = resolve_source(source).pretrained_args()
        if num_layers is not None:
            kwargs["num_hidden_layers"] = num_layers
        model = AutoModel.from_pretrained(name, **kwargs)
        embedder = LMEmbedder(model, load_tokenizer(source), pooling=pooling, max_length=max_length)
        return cls(embedder, scale).train()

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], *, max_length: int, scale: float = 20.0
    ) -> BiEncoder:
        model = AutoModel.from_pretrained(str(directory))
        embedder = LMEmbedder(model, load_tokenizer(str(directory)), max_length=max_length)
        return cls(embedder, scale).eval()

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.embedder.model.save_pretrained(str(directory), safe_serialization=True)
        self.embedder.tokenizer.save_pretrained(str(directory))

    @property
    def model(self) -> PreTrainedModel:
        return self.embedder.model

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, D) unit embeddings, differentiable when gradients are on."""
        e = self.embedder
        parts = []
        for s in range(0, len(texts), batch_size):
            input_ids, mask = e.pad(e.token_ids(texts[s : s + batch_size]))
            pooled = e(input_ids.to(e.device), mask.to(e.device))[e.layer]  # (b, D)
            parts.append(F.normalize(pooled, dim=-1))
        return torch.cat(parts)

    def score(
        self, queries: Sequence[str], candidates: Sequence[Sequence[str]], batch_size: int = 64
    ) -> torch.Tensor:
        """(Q, C) scale * cosine of each query and each of its candidates; every distinct text
        is embedded once."""
        flat = _flatten(candidates, len(queries))
        texts = list(dict.fromkeys([*queries, *flat]))
        index = {t: i for i, t in enumerate(texts)}
        emb = self.embed(texts, batch_size)  # (N, D)
        q = emb[[index[t] for t in queries]]  # (Q, D)
        c = emb[[index[t] for t in flat]].view(len(queries), len(candidates[0]), -1)  # (Q, C, D)
        return self.scale * torch.einsum("qd,qcd->qc", q, c)


def describe(model: CrossEncoder | BiEncoder) -> dict[str, Any]:
    """Sizes for reports."""
    hf = model.model
    return {
        "layers": int(hf.config.num_hidden_layers),
        "hidden_size": int(hf.config.hidden_size),
        "parameters": sum(p.numel() for p in hf.parameters()),
    }
