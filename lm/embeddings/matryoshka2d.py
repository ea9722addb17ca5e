"""2D Matryoshka Sentence Embeddings (2DMSE; Li et al. 2024, arXiv 2402.14776) and its baselines.

    cfg = Matryoshka2dConfig(objective="2dmse", dims=[32, 64, 128, 256])
    encoder = Matryoshka2dEncoder.from_source("minilm-l6", cfg)
    q, p = encoder(*q_batch), encoder(*p_batch)                  # (L + 1, B, D) each
    out = objective_loss(cfg, q, p, generator)                    # out.loss, out.terms
    encoder.encode(texts, layer=3, dim=64)                        # (N, 64): layer 3, first 64 dims

An encoder's pooled embedding e_l (mean pooling by default, lm.embeddings.pooling) exists at every
layer l = 1..n; 2DMSE trains it to be usable at any layer (depth) and any prefix of its dims
(width). L(l, d) below is InfoNCE with in-batch negatives between the queries' and passages'
first d dims of e_l (cosine similarities x ``scale``, the positive on the diagonal).

Objectives (``Matryoshka2dConfig.objective``):

- ``2dmse``: each step samples a shallow layer i ~ U{1..n-1} and a truncated dim d ~ U(dims):
      L = L(n, D) + L(n, d) + w_s [L(i, D) + L(i, d)]
          + w_kl T KL(softmax(sg(e_n) / T) || softmax(e_i / T))
  i.e. the last layer and the sampled shallow layer, each at full and truncated width, plus the
  alignment of the shallow layer's full embedding towards the last layer's (the last layer is the
  teacher: no gradient through it in the KL term; softmax over the embedding dims, as the
  paper's code (SeanLee97/AnglE) and sentence-transformers' AdaptiveLayerLoss do, with
  sentence-transformers' defaults T = 0.3 and the KL scaled by T). The KL reads the queries' and
  the passages' embeddings, 2B rows.
- ``mrl``: 1-D Matryoshka (Kusupati et al. 2022): the last layer only, every nested dim each step:
  L = L(n, D) + sum_{d in dims} L(n, d).
- ``full``: L(n, D), the plain contrastive fine-tune.

Written here rather than taken from sentence-transformers' Matryoshka2dLoss: that one works by
patching a SentenceTransformer's forward, and with its 2DMSE defaults samples one dim per step
that may or may not be the full one; the losses below are plain functions of pooled per-layer
embeddings, so any Hugging Face encoder trains in our own loop and each term can be checked by hand.

``encode(texts, layer=l, dim=d)`` pools layer l and keeps the first d dims (then L2-normalises).
It still runs every layer (hidden states come from one forward); a deployment that wants 2DMSE's
speed-up would cut the model to its first l layers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from core.config import Config
from core.runtime import resolve_dtype
from core.sources import resolve_source
from lm.embeddings.pooling import POOLINGS, LMEmbedder
from lm.loading import load_tokenizer

__all__ = [
    "CONFIG_NAME",
    "OBJECTIVES",
    "Matryoshka2dConfig",
    "Matryoshka2dEncoder",
    "MatryoshkaLossOutput",
    "full_dim_loss",
    "info_nce",
    "kl_alignment",
    "matryoshka_1d_loss",
    "matryoshka_2d_loss",
    "objective_loss",
    "sample_layer_and_dim",
]

OBJECTIVES: tuple[str, ...] = ("2dmse", "mrl", "full")
CONFIG_NAME = "matryoshka2d.json"  # saved beside the model by save_pretrained


@dataclass
class Matryoshka2dConfig(Config):
    """Training objective and pooling of a 2DMSE / 1-D Matryoshka / full-only encoder."""

    objective: str = "2dmse"  # one of OBJECTIVES
    dims: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # truncated widths
    pooling: str = "mean"  # lm.embeddings.pooling.POOLINGS
    max_length: int = 128  # tokens per text, special tokens included
    scale: float = 20.0  # InfoNCE logit scale = 1 / temperature (sentence-transformers' MNRL: 20)
    kl_temperature: float = 0.3  # T of the alignment term; 0 turns it off
    kl_weight: float = 1.0  # w_kl
    shallow_weight: float = 1.0  # w_s: weight of the shallow layer's two InfoNCE terms

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"objective must be one of {list(OBJECTIVES)}, received {self.objective!r}"
            )
        if not self.dims or any(d < 1 for d in self.dims) or len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims must be distinct positive widths, received {self.dims}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, received {self.pooling!r}")
        if self.max_length < 4:
            raise ValueError(f"max_length must be >= 4, received {self.max_length}")
        if self.scale <= 0 or self.kl_temperature < 0 or self.kl_weight < 0:
            raise ValueError(
                "scale must be > 0, kl_temperature and kl_weight >= 0; received "
                f"{self.scale}, {self.kl_temperature}, {self.kl_weight}"
            )
        if self.shallow_weight < 0:
            raise ValueError(f"shallow_weight must be >= 0, received {self.shallow_weight}")


@dataclass
class MatryoshkaLossOutput:
    """One step's loss and its named terms (detached, for logging)."""

    loss: torch.Tensor  # scalar, what to backpropagate
    terms: dict[str, torch.Tensor]  # e.g. "last_full", "last_d64", "shallow_full", "kl"
    layer: int | None = None  # the sampled shallow layer (2dmse)
    dim: int | None = None  # the sampled truncated dim (2dmse)


def info_nce(queries: torch.Tensor, passages: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """InfoNCE with in-batch negatives: cross-entropy of query b over all passages, target b.

    queries, passages: (B, D); rows are L2-normalised here (cosine similarity) and the (B, B)
    similarities multiplied by ``scale``. Returns the mean over queries.
    """
    if queries.shape != passages.shape or queries.ndim != 2:
        raise ValueError(
            f"queries and passages must both be (B, D), received {tuple(queries.shape)} and "
            f"{tuple(passages.shape)}"
        )
    q = F.normalize(queries.float(), dim=-1)
    p = F.normalize(passages.float(), dim=-1)
    logits = scale * q @ p.T  # (B, B)
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def kl_alignment(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T * KL(softmax(sg(teacher) / T) || softmax(student / T)), softmax over the D dims, averaged
    over the N rows. student, teacher: (N, D)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must have one shape, received {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    target = F.softmax(teacher.detach().float() / temperature, dim=-1)
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature


def _check_layers(queries: torch.Tensor, passages: torch.Tensor) -> None:
    if queries.ndim != 3 or queries.shape != passages.shape:
        raise ValueError(
            "queries and passages must both be (L + 1, B, D) per-layer embeddings, received "
            f"{tuple(queries.shape)} and {tuple(passages.shape)}"
        )


def _check_dim(dim: int, full: int) -> None:
    if not 1 <= dim <= full:
        raise ValueError(f"dim must be in [1, {full}] (the embedding width), received {dim}")


def matryoshka_2d_loss(
    queries: torch.Tensor,
    passages: torch.Tensor,
    *,
    layer: int,
    dim: int,
    scale: float = 20.0,
    kl_temperature: float = 0.3,
    kl_weight: float = 1.0,
    shallow_weight: float = 1.0,
) -> MatryoshkaLossOutput:
    """The 2DMSE loss for one sampled (shallow layer, truncated dim); see the module docstring.

    queries, passages: (L + 1, B, D) pooled embeddings of every layer (index 0 = embeddings,
    -1 = the last layer), as ``LMEmbedder.forward`` returns them.
    layer: the shallow layer, in [1, L - 1]. dim: the truncated width, in [1, D].
    """
    _check_layers(queries, passages)
    n, full = queries.shape[0] - 1, queries.shape[-1]
    if not 1 <= layer < n:
        raise ValueError(f"layer must be a shallow layer in [1, {n - 1}], received {layer}")
    _check_dim(dim, full)
    q_last, p_last, q_i, p_i = queries[-1], passages[-1], queries[layer], passages[layer]
    terms = {
        "last_full": info_nce(q_last, p_last, scale),
        f"last_d{dim}": info_nce(q_last[:, :dim], p_last[:, :dim], scale),
        "shallow_full": info_nce(q_i, p_i, scale),
        f"shallow_d{dim}": info_nce(q_i[:, :dim], p_i[:, :dim], scale),
    }
    loss = terms["last_full"] + terms[f"last_d{dim}"]
    loss = loss + shallow_weight * (terms["shallow_full"] + terms[f"shallow_d{dim}"])
    if kl_temperature > 0:
        terms["kl"] = kl_alignment(
            torch.cat([q_i, p_i]), torch.cat([q_last, p_last]), kl_temperature
        )
        loss = loss + kl_weight * terms["kl"]
    return MatryoshkaLossOutput(
        loss, {k: v.detach() for k, v in terms.items()}, layer=layer, dim=dim
    )


def matryoshka_1d_loss(
    queries: torch.Tensor, passages: torch.Tensor, *, dims: Sequence[int], scale: float = 20.0
) -> MatryoshkaLossOutput:
    """1-D Matryoshka: the last layer at full width and at every one of ``dims``, summed.

    queries, passages: (L + 1, B, D) per-layer embeddings (only the last layer is read).
    """
    _check_layers(queries, passages)
    full = queries.shape[-1]
    q, p = queries[-1], passages[-1]
    terms = {"last_full": info_nce(q, p, scale)}
    for d in sorted(set(dims) - {full}, reverse=True):
        _check_dim(d, full)
        terms[f"last_d{d}"] = info_nce(q[:, :d], p[:, :d], scale)
    loss = torch.stack(list(terms.values())).sum()
    return MatryoshkaLossOutput(loss, {k: v.detach() for k, v in terms.items()})


def full_dim_loss(
    queries: torch.Tensor, passages: torch.Tensor, *, scale: float = 20.0
) -> MatryoshkaLossOutput:
    """The full-only baseline: InfoNCE on the last layer at full width. (L + 1, B, D) inputs."""
    _check_layers(queries, passages)
    loss = info_nce(queries[-1], passages[-1], scale)
    return MatryoshkaLossOutput(loss, {"last_full": loss.detach()})


def sample_layer_and_dim(
    num_layers: int, dims: Sequence[int], full_dim: int, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """2DMSE's draw: a shallow layer uniform in [1, num_layers - 1] and a truncated dim uniform
    over the ``dims`` below ``full_dim``."""
    if num_layers < 2:
        raise ValueError(f"2DMSE needs a model with >= 2 layers, received {num_layers}")
    widths = sorted(d for d in dims if d < full_dim)
    if not widths:
        raise ValueError(f"no truncated dim below the embedding width {full_dim} in {list(dims)}")
    layer = 1 + int(torch.randint(num_layers - 1, (1,), generator=generator))
    dim = widths[int(torch.randint(len(widths), (1,), generator=generator))]
    return layer, dim


def objective_loss(
    cfg: Matryoshka2dConfig,
    queries: torch.Tensor,
    passages: torch.Tensor,
    generator: torch.Generator | None = None,
) -> MatryoshkaLossOutput:
    """The loss of ``cfg.objective`` on (L + 1, B, D) per-layer query / passage embeddings;
    2dmse draws its (layer, dim) from ``generator``."""
    if cfg.objective == "full":
        return full_dim_loss(queries, passages, scale=cfg.scale)
    if cfg.objective == "mrl":
        return matryoshka_1d_loss(queries, passages, dims=cfg.dims, scale=cfg.scale)
    layer, dim = sample_layer_and_dim(queries.shape[0] - 1, cfg.dims, queries.shape[-1], generator)
    return matryoshka_2d_loss(
        queries,
        passages,
        layer=layer,
        dim=dim,
        scale=cfg.scale,
        kl_temperature=cfg.kl_temperature,
        kl_weight=cfg.kl_weight,
        shallow_weight=cfg.shallow_weight,
    )


class Matryoshka2dEncoder(nn.Module):
    """An encoder whose embedding is read at any (layer, dim): an LMEmbedder plus its config.

    embedder: the model, tokenizer and pooling (``cfg.pooling`` and ``cfg.max_length`` must match).
    """

    def __init__(self, embedder: LMEmbedder, config: Matryoshka2dConfig):
        super().__init__()
        if embedder.pooling != config.pooling or embedder.max_length != config.max_length:
            raise ValueError(
                f"embedder pools {embedder.pooling!r} over {embedder.max_length} tokens, config "
                f"says {config.pooling!r} over {config.max_length}"
            )
        self.embedder = embedder
        self.config = config

    @classmethod
    def _from(cls, name: str, tokenizer_source: str, config: Matryoshka2dConfig, **kw: Any):
        model = AutoModel.from_pretrained(name, **kw)
        embedder = LMEmbedder(
            model,
            load_tokenizer(tokenizer_source),
            pooling=config.pooling,
            max_length=config.max_length,
            normalize=False,
        )
        return cls(embedder, config)

    @classmethod
    def from_source(
        cls, source: str, config: Matryoshka2dConfig, *, dtype: str | torch.dtype = "fp32"
    ) -> Matryoshka2dEncoder:
        """The pretrained encoder of a model source (core.sources spec), in train mode."""
        name, kwargs = resolve_source(source).pretrained_args()
        out = cls._from(name, source, config, dtype=resolve_dtype(dtype), **kwargs)
        return cast(Matryoshka2dEncoder, out.train())

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], *, device: str | torch.device = "cpu"
    ) -> Matryoshka2dEncoder:
        """Load what ``save_pretrained`` wrote, in eval mode."""
        directory = Path(directory)
        config = Matryoshka2dConfig.load(directory / CONFIG_NAME)
        out = cls._from(str(directory), str(directory), config)
        out.to(device)
        return cast(Matryoshka2dEncoder, out.eval())

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Model (safetensors), tokenizer and ``matryoshka2d.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.embedder.model.save_pretrained(str(directory), safe_serialization=True)
        self.embedder.tokenizer.save_pretrained(str(directory))
        self.config.save(directory / CONFIG_NAME)

    @property
    def num_layers(self) -> int:
        return self.embedder.num_layers

    @property
    def hidden_size(self) -> int:
        return self.embedder.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(L + 1, B, D) pooled embeddings of every layer. input_ids, attention_mask: (B, T)."""
        return cast(torch.Tensor, self.embedder(input_ids, attention_mask))

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, T) of ``texts``, on the model's device."""
        input_ids, mask = self.embedder.pad(self.embedder.token_ids(texts))
        return input_ids.to(self.embedder.device), mask.to(self.embedder.device)

    def encode(
        self,
        texts: Sequence[str],
        layer: int = -1,
        dim: int | None = None,
        *,
        batch_size: int = 32,
        normalize: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """(N, dim) embeddings: layer ``layer`` (1..L, -1 = last), its first ``dim`` dims
        (None = all), L2-normalised after truncation when ``normalize``."""
        L = self.num_layers
        if not (1 <= layer <= L or -L <= layer <= -1):
            raise ValueError(f"layer must be in [1, {L}] or [-{L}, -1], received {layer}")
        dim = self.hidden_size if dim is None else dim
        _check_dim(dim, self.hidden_size)
        emb = self.embedder.encode_layers(texts, batch_size, progress)[layer, :, :dim]
        return F.normalize(emb, dim=-1) if normalize else emb
