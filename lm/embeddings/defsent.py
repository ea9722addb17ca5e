"""DefSent+: sentence embeddings trained to name the dictionary entry a definition defines, with a
frozen classifier of entry embeddings built from definitions (REFERENCE.md "DefSent+").

    model = DefSentPlus.build(embedder, {"red circle": ["a round red shape", ...], ...},
                              ica_components=64)        # entries from definitions, ICA-whitened
    logits = model(input_ids, attention_mask)           # (B, N entries)
    model.reverse_dictionary(["a round shape painted red"], k=3)   # [["red circle", ...]]

- Entry embeddings: e_k = mean of the embeddings of entry k's definitions, read by the *untrained*
  encoder (``LMEmbedder``, mean pooling by default). Entries are any strings (a multi-word phrase,
  a section title) and there is no limit on their number: nothing is looked up in the tokenizer's
  vocabulary, unlike DefSent, whose classifier was the LM's word-embedding matrix and so only knew
  single-token words.
- Optional ICA whitening (scikit-learn FastICA, ``whiten="unit-variance"``), fitted on the entry
  matrix: the frozen affine map W(x) = (x - mu) A^T to K independent, unit-variance components.
  Contextual embeddings crowd into a narrow cone (average cosine near 1); whitened, the entries
  spread over all directions (isotropic: covariance = identity).
- The frozen entry classifier: logits_k = scale * cos(W(h), W(e_k)) for a definition's embedding h;
  only the encoder trains, with cross-entropy towards the definition's entry. Without whitening,
  W is the identity.

Isotropy figures: ``average_cosine`` (mean pairwise cosine, 0 for an isotropic cloud) and
``partition_isotropy``, Mu & Viswanath's (2018) I = min_c Z(c) / max_c Z(c) with
Z(c) = sum_i exp(c . x_i) over the eigenvectors c of X^T X (1 = isotropic).

Written here: no library implements DefSent+; FastICA is scikit-learn's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lm.embeddings.pooling import LMEmbedder

__all__ = [
    "DefSentPlus",
    "EntryClassifier",
    "Whitening",
    "average_cosine",
    "entry_embeddings",
    "partition_isotropy",
]


def entry_embeddings(
    definitions: torch.Tensor, entry_index: torch.Tensor, n_entries: int
) -> torch.Tensor:
    """(N, D) mean of each entry's definition embeddings.

    definitions: (M, D); entry_index: (M,) the entry (0..N-1) each definition defines.
    """
    if definitions.ndim != 2 or entry_index.shape != definitions.shape[:1]:
        raise ValueError(
            f"expected definitions (M, D) and entry_index (M,), received "
            f"{tuple(definitions.shape)} and {tuple(entry_index.shape)}"
        )
    counts = torch.bincount(entry_index, minlength=n_entries)
    if len(counts) > n_entries or bool((counts == 0).any()):
        missing = torch.nonzero(counts[:n_entries] == 0).flatten().tolist()
        raise ValueError(
            f"every entry needs >= 1 definition and indices < {n_entries}; entries without one: "
            f"{missing[:10]}, largest index {int(entry_index.max())}"
        )
    sums = torch.zeros(n_entries, definitions.shape[1], dtype=torch.float64)
    sums.index_add_(0, entry_index, definitions.double())
    return (sums / counts[:, None]).float()


class Whitening(nn.Module):
    """A frozen affine map x -> (x - mean) @ matrix.T, from D to K dims (buffers, no gradient).

    mean: (D,); matrix: (K, D).
    """

    mean: torch.Tensor
    matrix: torch.Tensor

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor):
        super().__init__()
        if mean.ndim != 1 or matrix.ndim != 2 or matrix.shape[1] != mean.shape[0]:
            raise ValueError(
                f"expected mean (D,) and matrix (K, D), received {tuple(mean.shape)} and "
                f"{tuple(matrix.shape)}"
            )
        self.register_buffer("mean", mean.float())
        self.register_buffer("matrix", matrix.float())

    @classmethod
    def fit_ica(
        cls, x: torch.Tensor, n_components: int, seed: int = 0, max_iter: int = 1000
    ) -> Whitening:
        """FastICA with unit-variance whitening fitted on x: (N, D); K = n_components must be
        below N (the whitening needs more samples than components)."""
        from sklearn.decomposition import FastICA

        n, d = x.shape
        if not 1 <= n_components <= min(n - 1, d):
            raise ValueError(
                f"n_components must be in [1, min(N - 1, D)] = [1, {min(n - 1, d)}] for "
                f"{n} samples of {d} dims, received {n_components}"
            )
        ica = FastICA(
            n_components=n_components,
            whiten="unit-variance",
            random_state=seed,
            max_iter=max_iter,
        )
        ica.fit(x.double().numpy())
        return cls(torch.from_numpy(ica.mean_), torch.from_numpy(ica.components_))

    @property
    def out_dim(self) -> int:
        return int(self.matrix.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., K)."""
        return (x - self.mean) @ self.matrix.T


class EntryClassifier(nn.Module):
    """The frozen entry matrix as a classifier over entries.

    entries: the N entry strings (any text; row k is entries[k]).
    matrix: (N, D) entry embeddings in the encoder's space (whitened here when ``whitening``).
    whitening: None (identity) or the map fitted on the entries. scale: logit scale.
    """

    entry_matrix: torch.Tensor  # (N, D)
    weight: torch.Tensor  # (N, K) unit rows

    def __init__(
        self,
        entries: Sequence[str],
        matrix: torch.Tensor,
        whitening: Whitening | None = None,
        scale: float = 20.0,
    ):
        super().__init__()
        if matrix.ndim != 2 or matrix.shape[0] != len(entries):
            raise ValueError(
                f"matrix must be (N, D) with N = {len(entries)} entries, received "
                f"{tuple(matrix.shape)}"
            )
        if len(set(entries)) != len(entries):
            raise ValueError("entries must be distinct")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, received {scale}")
        self.entries = list(entries)
        self.whitening = whitening
        self.scale = scale
        self.register_buffer("entry_matrix", matrix.float())  # (N, D), frozen
        self.register_buffer("weight", F.normalize(self.entry_space(), dim=-1))  # (N, K)

    def entry_space(self) -> torch.Tensor:
        """(N, K) the entry embeddings in the classifier's space (whitened when whitening)."""
        m = self.entry_matrix
        return self.whitening(m) if self.whitening is not None else m

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) encoder embeddings -> (B, K) unit vectors in the classifier's space."""
        space = self.whitening(h.float()) if self.whitening is not None else h.float()
        return F.normalize(space, dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, N) logits = scale * cos(W(h), W(e_k))."""
        return self.scale * self.embed(h) @ self.weight.T

    def top_k(self, h: torch.Tensor, k: int = 1) -> list[list[str]]:
        """The k best entries of each row of h: (B, D)."""
        k = min(k, len(self.entries))
        idx = self(h).topk(k, dim=-1).indices.tolist()
        return [[self.entries[i] for i in row] for row in idx]


class DefSentPlus(nn.Module):
    """A trainable sentence encoder and the frozen entry classifier built from definitions.

    embedder: the encoder (its ``normalize`` is ignored: the classifier takes cosines).
    classifier: frozen; build it with ``DefSentPlus.build``.
    """

    def __init__(self, embedder: LMEmbedder, classifier: EntryClassifier):
        super().__init__()
        self.embedder = embedder
        self.classifier = classifier

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        embedder: LMEmbedder,
        definitions: Mapping[str, Sequence[str]],
        *,
        ica_components: int | None = None,
        scale: float = 20.0,
        seed: int = 0,
        batch_size: int = 32,
        progress: bool = False,
    ) -> DefSentPlus:
        """Entry embeddings = mean of each entry's definition embeddings under ``embedder`` as
        it is now; ICA-whitened to ``ica_components`` dims when given."""
        entries = list(definitions)
        texts = [d for e in entries for d in definitions[e]]
        index = torch.tensor([k for k, e in enumerate(entries) for _ in definitions[e]])
        if not entries or not texts:
            raise ValueError("expected at least one entry with at least one definition")
        was_training = embedder.training
        embedder.eval()
        emb = embedder.encode_layers(texts, batch_size, progress)[embedder.layer]  # (M, D)
        embedder.train(was_training)
        matrix = entry_embeddings(emb, index, len(entries))
        whitening = None
        if ica_components is not None:
            whitening = Whitening.fit_ica(matrix, ica_components, seed=seed)
        return cls(embedder, EntryClassifier(entries, matrix, whitening, scale))

    @property
    def entries(self) -> list[str]:
        return self.classifier.entries

    def sentence_embedding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, D) pooled encoder embedding (differentiable). input_ids, attention_mask: (B, T)."""
        return cast(torch.Tensor, self.embedder(input_ids, attention_mask)[self.embedder.layer])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) entry logits of definitions given as (B, T) tokens."""
        return cast(
            torch.Tensor, self.classifier(self.sentence_embedding(input_ids, attention_mask))
        )

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embedder
        input_ids, mask = e.pad(e.token_ids(texts))
        return input_ids.to(e.device), mask.to(e.device)

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> torch.Tensor:
        """(N, K) unit embeddings in the classifier's (whitened) space."""
        was_training = self.training
        self.eval()
        parts = []
        starts = range(0, len(texts), batch_size)
        for s in tqdm(starts, desc="encode", unit="batch", disable=not progress, leave=False):
            h = self.sentence_embedding(*self.tokenize(texts[s : s + batch_size]))
            parts.append(self.classifier.embed(h).cpu())
        self.train(was_training)
        return torch.cat(parts)

    @torch.no_grad()
    def reverse_dictionary(self, texts: Sequence[str], k: int = 1) -> list[list[str]]:
        """The k entries each text most likely defines."""
        emb = self.encode(texts).to(self.classifier.weight.device)
        idx = (emb @ self.classifier.weight.T).topk(min(k, len(self.entries)), dim=-1).indices
        return [[self.entries[i] for i in row] for row in idx.tolist()]


# --------------------------------------------------------------------------------------------
# Isotropy


def average_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs i != j of the rows of x: (N, D)."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected (N >= 2, D) vectors, received {tuple(x.shape)}")
    u = F.normalize(x.double(), dim=-1)
    n = u.shape[0]
    total = u.sum(0)
    # sum over i != j of u_i . u_j = |sum u|^2 - sum |u_i|^2
    return float((total @ total - (u * u).sum()) / (n * (n - 1)))


def partition_isotropy(x: torch.Tensor) -> float:
    """Mu & Viswanath's I(X) = min_c Z(c) / max_c Z(c), Z(c) = sum_i exp(c . x_i), c over the
    unit eigenvectors of X^T X; in [0, 1], 1 = isotropic. x: (N, D)."""
    if x.ndim != 2:
        raise ValueError(f"expected (N, D) vectors, received {tuple(x.shape)}")
    xd = x.double()
    _, vecs = torch.linalg.eigh(xd.T @ xd)  # columns: unit eigenvectors
    proj = xd @ vecs  # (N, D): c . x_i for every eigenvector c
    log_z = torch.logsumexp(torch.cat([proj, -proj], dim=1), dim=0)  # both signs of each c
    return float(torch.exp(log_z.min() - log_z.max()))


def describe(model: DefSentPlus) -> dict[str, Any]:
    """Sizes for reports."""
    w = model.classifier.whitening
    return {
        "entries": len(model.entries),
        "encoder_dim": model.embedder.hidden_size,
        "classifier_dim": int(model.classifier.weight.shape[1]),
        "ica": w is not None,
        "entry_matrix": np.asarray(model.classifier.weight.shape).tolist(),
    }
