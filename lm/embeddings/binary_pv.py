"""Binary Paragraph Vector (Grzegorczyk & Kurdziel 2017, "Binary Paragraph Vectors"): short
binary document codes for Hamming-distance retrieval, and the random-projection baseline.

    model = BinaryParagraphVector(BinaryPVConfig(num_documents=N, vocab_size=V, bits=32))
    out = model(doc_ids)                          # out.logits (B, V), out.codes (B, 32) in {0, 1}
    loss = pv_dbow_loss(out.logits, counts)       # counts (B, V): each document's word counts
    codes = model.codes(doc_ids)                  # (B, 32) bool, the training documents' codes
    new = model.infer(new_counts, steps=200)      # (M, 32) bool, codes of unseen documents
    d = hamming_distances(new, codes)             # (M, N) int64
    p10 = precision_at_k(d, query_labels, db_labels, k=10)        # (M,) tie-aware

    encoder = BinaryPVEncoder(vocabulary, model); encoder.encode(texts)   # (N, bits) bool
    baseline = TfidfHasher(bits=32, seed=0).fit(texts); baseline.encode(texts)

Model (Binary PV-DBOW, the paper's Sec. 3): every document d has a free pre-activation vector
a_d in R^bits; its code is b_d = round(sigmoid(a_d)) in {0, 1}^bits, and a softmax layer
predicts the document's words from the code: p(w | d) = softmax(W b_d + c)_w. The rounding is
trained one of two ways (``BinaryPVConfig.binarizer``):

- ``straight_through``: the forward pass rounds, the backward pass takes sigmoid's gradient
  (Bengio et al. 2013's straight-through estimator; what the paper found to work best);
- ``noise``: the forward pass uses sigmoid(a_d + eps), eps ~ N(0, noise_std^2), unrounded;
  the noise drives the pre-activations away from 0 so that rounding at test time loses little
  (Salakhutdinov & Hinton's semantic hashing trick, which the paper compares against).

The loss is the PV-DBOW objective summed over every word occurrence of the document,
-sum_w count(d, w) log p(w | d) / sum_w count(d, w). The paper samples words and uses
hierarchical softmax for large vocabularies; with a vocabulary of thousands of words the exact
softmax against the whole count vector is cheap and gives the expected gradient of that sampling.

Unseen documents get codes as in PV: their pre-activations are fitted by gradient descent with the
softmax layer frozen (``infer``).

The baseline: sign random projections (SimHash, Charikar 2002) of TF-IDF vectors: scikit-learn's
TfidfVectorizer then GaussianRandomProjection, bit i = [r_i . x > 0].

Hamming distances and tie-aware precision@k are written here: numpy has the popcount
(``np.bitwise_count``) but no library offers retrieval precision with expected tie-breaking.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BINARIZERS",
    "BinaryPVConfig",
    "BinaryPVEncoder",
    "BinaryPVOutput",
    "BinaryParagraphVector",
    "TfidfHasher",
    "hamming_distances",
    "load_binary_pv",
    "precision_at_k",
    "pv_dbow_loss",
]

BINARIZERS = ("straight_through", "noise")


@dataclass
class BinaryPVConfig:
    num_documents: int  # N: training documents, one free code each
    vocab_size: int  # V: words the softmax layer predicts
    bits: int = 32  # code length
    binarizer: str = "straight_through"  # "straight_through" or "noise" (module docstring)
    noise_std: float = 2.0  # std of the pre-sigmoid noise (binarizer "noise" only)
    init_std: float = 0.1  # std of the initial pre-activations

    def __post_init__(self) -> None:
        for name in ("num_documents", "vocab_size", "bits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")
        if self.binarizer not in BINARIZERS:
            raise ValueError(f"binarizer must be one of {BINARIZERS}, received {self.binarizer!r}")
        if self.noise_std < 0 or self.init_std <= 0:
            raise ValueError(
                f"noise_std must be >= 0 and init_std > 0, received {self.noise_std}, "
                f"{self.init_std}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BinaryPVOutput:
    logits: torch.Tensor  # (B, V) word logits predicted from the codes
    codes: torch.Tensor  # (B, bits) what the softmax layer read: {0, 1} (noise: (0, 1) in training)
    probabilities: torch.Tensor  # (B, bits) sigmoid of the pre-activations


class BinaryParagraphVector(nn.Module):
    """Binary PV-DBOW: a free pre-activation per document, a binary code, a word softmax."""

    def __init__(self, cfg: BinaryPVConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.documents = nn.Parameter(torch.randn(cfg.num_documents, cfg.bits) * cfg.init_std)
        self.decoder = nn.Linear(cfg.bits, cfg.vocab_size)

    def binarize(
        self, pre: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, bits) pre-activations -> (codes the decoder reads, sigmoid probabilities). The
        noise binarizer draws from `generator` (the global RNG when None)."""
        prob = torch.sigmoid(pre)
        if not self.training:
            return (pre > 0).to(pre.dtype), prob
        if self.cfg.binarizer == "noise":
            device = generator.device if generator is not None else pre.device
            noise = torch.randn(pre.shape, generator=generator, dtype=pre.dtype, device=device)
            return torch.sigmoid(pre + self.cfg.noise_std * noise.to(pre.device)), prob
        hard = (pre > 0).to(pre.dtype)  # round(sigmoid(pre)); ties at 0.5 go to 0
        return prob + (hard - prob).detach(), prob  # straight-through: forward hard, grad sigmoid

    def decode(
        self, pre: torch.Tensor, frozen: bool = False, generator: torch.Generator | None = None
    ) -> BinaryPVOutput:
        """Word logits from pre-activations (B, bits); frozen: no gradient to the decoder."""
        codes, prob = self.binarize(pre, generator)
        weight: torch.Tensor = self.decoder.weight
        bias: torch.Tensor = self.decoder.bias
        if frozen:
            weight, bias = weight.detach(), bias.detach()
        return BinaryPVOutput(F.linear(codes, weight, bias), codes, prob)

    def forward(self, doc_ids: torch.Tensor) -> BinaryPVOutput:
        """doc_ids (B,) int64 in [0, N)."""
        if doc_ids.dim() != 1:
            raise ValueError(f"expected doc_ids (B,), received {tuple(doc_ids.shape)}")
        return self.decode(self.documents[doc_ids])

    @torch.no_grad()
    def codes(self, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, bits) bool codes of training documents (all of them when doc_ids is None)."""
        pre = self.documents if doc_ids is None else self.documents[doc_ids]
        return pre > 0

    def infer(
        self,
        counts: torch.Tensor,
        steps: int = 200,
        lr: float = 0.05,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(M, V) word counts of new documents -> (M, bits) bool codes: their pre-activations
        are fitted to the PV-DBOW loss with the decoder frozen (training-mode binarizer). The
        start and the noise binarizer's draws come from `generator`: a seeded one gives the same
        codes whatever the global RNG holds."""
        if counts.dim() != 2 or counts.shape[1] != self.cfg.vocab_size:
            raise ValueError(
                f"expected counts (M, {self.cfg.vocab_size}), received {tuple(counts.shape)}"
            )
        device = self.documents.device
        counts = counts.to(device=device, dtype=torch.float32)
        pre = torch.randn(counts.shape[0], self.cfg.bits, generator=generator)
        pre = (pre * self.cfg.init_std).to(device).requires_grad_()
        optimizer = torch.optim.Adam([pre], lr=lr)
        was_training = self.training
        self.train()
        try:
            for _ in range(steps):
                logits = self.decode(pre, frozen=True, generator=generator).logits
                loss = pv_dbow_loss(logits, counts)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            self.train(was_training)
        return pre.detach() > 0


def pv_dbow_loss(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean NLL per word occurrence: -sum(counts * log_softmax(logits)) / sum(counts).
    logits, counts: (B, V)."""
    if logits.shape != counts.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and counts {tuple(counts.shape)} differ")
    total = counts.sum()
    if total <= 0:
        raise ValueError("the documents hold no in-vocabulary word")
    return -(counts * F.log_softmax(logits.float(), dim=-1)).sum() / total


# ----------------------------------------------------------------------------------------------
# Retrieval


def _as_bool(codes: Any) -> np.ndarray:
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"expected codes (N, bits), received shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("codes must hold only 0 and 1")
        arr = arr.astype(np.bool_)
    return arr


def hamming_distances(queries: Any, database: Any, chunk: int = 1024) -> np.ndarray:
    """(Nq, bits) and (Nd, bits) binary codes (bool or 0/1; numpy or torch) -> (Nq, Nd) int64
    Hamming distances, computed on bit-packed codes with a popcount."""
    q, db = _as_bool(queries), _as_bool(database)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"code lengths differ: queries {q.shape[1]}, database {db.shape[1]} bits")
    qp, dbp = np.packbits(q, axis=1), np.packbits(db, axis=1)  # (N, ceil(bits / 8)) uint8
    out = np.empty((len(qp), len(dbp)), dtype=np.int64)
    for s in range(0, len(qp), chunk):
        xor = qp[s : s + chunk, None, :] ^ dbp[None, :, :]
        out[s : s + chunk] = np.bitwise_count(xor).sum(axis=-1)
    return out


def precision_at_k(
    distances: np.ndarray,
    query_labels: Sequence[Any],
    db_labels: Sequence[Any],
    k: int = 10,
) -> np.ndarray:
    """(Nq,) precision@k of each query: the expected fraction of relevant items (same label)
    among its k nearest database items when ties at the k-th distance are broken uniformly at
    random (exact, no sampling). distances: (Nq, Nd), smaller = nearer."""
    distances = np.asarray(distances)
    qlab, dlab = np.asarray(query_labels), np.asarray(db_labels)
    if distances.shape != (len(qlab), len(dlab)):
        raise ValueError(
            f"distances {distances.shape} do not match {len(qlab)} queries x {len(dlab)} items"
        )
    if not 1 <= k <= len(dlab):
        raise ValueError(f"k must be in [1, {len(dlab)}], received {k}")
    out = np.empty(len(qlab))
    for i, d in enumerate(distances):
        rel = dlab == qlab[i]
        kth = np.partition(d, k - 1)[k - 1]
        closer, tied = d < kth, d == kth
        expected = rel[closer].sum() + (k - closer.sum()) * rel[tied].sum() / tied.sum()
        out[i] = expected / k
    return out


class TfidfHasher:
    """The baseline: SimHash of TF-IDF vectors. fit(texts) learns the vocabulary and idf and
    draws the projection; encode(texts) -> (N, bits) bool."""

    def __init__(self, bits: int = 32, seed: int = 0, **tfidf_kwargs: Any) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.random_projection import GaussianRandomProjection

        if bits < 1:
            raise ValueError(f"bits must be >= 1, received {bits}")
        self.bits = bits
        self.vectorizer = TfidfVectorizer(**tfidf_kwargs)
        self.projection = GaussianRandomProjection(n_components=bits, random_state=seed)

    def fit(self, texts: Sequence[str]) -> TfidfHasher:
        self.projection.fit(self.vectorizer.fit_transform(texts))
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.projection.transform(self.vectorizer.transform(texts)) > 0)


class BinaryPVEncoder:
    """Texts -> binary codes with a trained model and its vocabulary (the word order of the
    decoder's rows). Tokenization: scikit-learn's CountVectorizer defaults (lowercase, words of
    2+ word characters), restricted to the vocabulary."""

    def __init__(self, vocabulary: Sequence[str], model: BinaryParagraphVector) -> None:
        from sklearn.feature_extraction.text import CountVectorizer

        if len(vocabulary) != model.cfg.vocab_size:
            raise ValueError(
                f"vocabulary has {len(vocabulary)} words, the model predicts {model.cfg.vocab_size}"
            )
        self.vocabulary = list(vocabulary)
        self.model = model
        self.vectorizer = CountVectorizer(vocabulary=self.vocabulary)

    def counts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, V) float32 word counts."""
        return torch.from_numpy(self.vectorizer.transform(texts).toarray().astype(np.float32))

    def encode(self, texts: Sequence[str], steps: int = 200, seed: int = 0) -> torch.Tensor:
        """(N, bits) bool codes of new texts (fitted with the decoder frozen)."""
        return self.model.infer(
            self.counts(texts), steps=steps, generator=torch.Generator().manual_seed(seed)
        )


def load_binary_pv(path: str | os.PathLike[str]) -> BinaryPVEncoder:
    """A BinaryPVEncoder from a core checkpoint whose config holds ``binary_pv`` (the
    BinaryPVConfig fields) and ``vocabulary`` and whose ``model`` tensors are the state dict
    (what train.binary_pv saves in <out>/stages/binary_pv)."""
    from core.checkpoint import load_checkpoint, load_state_strict

    ckpt = load_checkpoint(path)
    for key in ("binary_pv", "vocabulary"):
        if key not in ckpt.config:
            raise ValueError(f"{path}: the checkpoint config has no {key!r}")
    model = BinaryParagraphVector(BinaryPVConfig(**ckpt.config["binary_pv"]))
    load_state_strict(model, ckpt.tensors["model"], what=str(path))
    return BinaryPVEncoder(ckpt.config["vocabulary"], model.eval())
