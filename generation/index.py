"""Image retrieval index on FAISS: cosine top-k over the image embeddings of any folder.

    python -m generation.index build out/shapeworld/test/images --out out/index/sw-test
    python -m generation.index build ~/photos --out out/index/photos --kind ivf --preset tiny
    python -m generation.index add out/index/photos ~/photos      # embeds new/changed files only
    python -m generation.index search out/index/photos --text "a red circle" -k 5
    python -m generation.index search out/index/photos --image query.png --nprobe 32
    python -m generation.index info out/index/photos

    index = ImageIndex(embedder.name, embedder.dim, kind="ivf")
    report = index.add_folder("photos", embedder)     # AddReport: added/updated/removed/skipped
    index.save("out/index/photos")
    hits = ImageIndex.load("out/index/photos").search(queries, k=10)   # SearchResult

GILL retrieves by brute-force numpy over 3M CC3M embeddings; this replaces it. Vectors are
L2-normalised and searched by inner product, so scores are cosines. Index kinds:

- ``exact``: ``IndexFlatIP``, the same top-k as a numpy brute force (tested). The default: a folder
  of ~100K images searches in milliseconds on one core.
- ``ivf``: ``IndexIVFFlat``, the approximate kind we recommend from ~100K vectors up. k-means
  cells, ``nprobe`` of them scanned per query with exact inner products. Chosen over HNSW from
  bench.retrieval_index (docs/results_pending_9.md, one core): on clustered vectors it reached
  recall@10 0.999 at 0.55 ms/query at 100K (HNSW 0.92 at 0.33 ms, 0.97 at 0.43 ms) and 0.97 at
  2.7 ms at 1M (exact: 121 ms); it builds ~8x faster (2.8 s vs 21.5 s at 100K; 36 s at 1M,
  where HNSW's graph would take minutes); it stores the raw vectors only (no graph links) and
  can drop rows in place. Where neighbourhoods are barely clustered HNSW holds recall better
  (same document). Cells are fit on the vectors present when first trained (``nlist`` default
  round(sqrt(N)), at most N / 39 as faiss asks for >= 39 training points per cell); once the
  index has grown ``REFIT_GROWTH`` x since, the next add refits them on everything.
- ``hnsw``: ``IndexHNSWFlat`` (``hnsw_m`` links, ``ef_search`` beam), no training.

An index folder holds ``index.json`` (format, model name and width, kind, parameters, the image
entries as path + mtime + size, and the name and sha256 of the FAISS file) and
``vectors-<sha>.faiss``. Images inside the index folder are stored by their path relative to it,
so a folder that carries its images can be moved or committed (checkpoints/shapes/gill_index).
``save`` writes the FAISS file to a temporary file, renames it into
place, then replaces ``index.json`` atomically: the JSON rename is the commit, so a reader never
sees a half-written index or a JSON that names vectors it does not match. The old vectors file
is deleted after the commit; a load that read the old JSON just before starts again from the new.

Embeddings come from an :class:`ImageEmbedder` (``name``, ``dim``, and a call on a batch of PIL
images returning (B, D)); an index accepts only embeddings of its own model name and width. The CLI
embeds with the project's CLIP (a preset's checkpoint, or ``--clip``); its name is the CLIP
config's plus the checkpoint's sha256, so retraining CLIP cannot silently mix two embedding spaces.
Images are read with core.images.load_rgb (files up to MAX_FILE_SIDE a side, read downscaled to
MAX_SIDE); unreadable ones are skipped with one warning listing them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from core.config import Config, config_from_dict, load_preset_dict, preset_path, project_path
from core.images import ImageError, load_rgb
from core.io import atomic_write_text, sha256_file, temp_sibling
from vision.clip import (
    ClipBundle,
    ClipPresetConfig,
    ImageInput,
    clip_from_preset,
    encode_images,
    load_clip,
)

__all__ = [
    "FORMAT",
    "IMAGE_SUFFIXES",
    "INDEX_KINDS",
    "REFIT_GROWTH",
    "AddReport",
    "ClipEmbedder",
    "ImageEmbedder",
    "ImageIndex",
    "ImageIndexError",
    "IndexEntry",
    "IndexKind",
    "IndexMismatchError",
    "IndexParams",
    "SearchResult",
    "UnreadableImagesWarning",
    "clip_embedder",
    "main",
    "scan_images",
]

FORMAT = "polychrome-image-index"
VERSION = 1
META_FILE = "index.json"
LOAD_ATTEMPTS = 3  # loads that start again when a save replaced the vectors file under them
IndexKind = Literal["exact", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("exact", "ivf", "hnsw")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
REFIT_GROWTH = 4.0  # ivf: refit the cells once the index holds this many times its training set
MIN_POINTS_PER_CELL = 39  # faiss warns below 39 training points per k-means centroid


class ImageIndexError(ValueError):
    """An index folder is missing, corrupt, or used in a way it cannot serve."""


class IndexMismatchError(ImageIndexError):
    """Embeddings of another model or width than the index holds."""


class UnreadableImagesWarning(UserWarning):
    """Some images of a folder could not be read and were skipped."""


# --------------------------------------------------------------------------------------------
# Parameters, entries, results
# --------------------------------------------------------------------------------------------


@dataclass
class IndexParams(Config):
    """Build and search parameters of the approximate kinds (ignored by ``exact``)."""

    nlist: int | None = None  # ivf cells; None = round(sqrt(N)) at training, <= N / 39
    nprobe: int = 16  # ivf cells scanned per query (recall vs latency; see the bench)
    hnsw_m: int = 32  # hnsw links per node
    ef_construction: int = 40  # hnsw build beam (faiss default)
    ef_search: int = 64  # hnsw search beam (raised to k when smaller)

    def __post_init__(self) -> None:
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist must be >= 1 or null, received {self.nlist}")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")


@dataclass(frozen=True)
class IndexEntry:
    """One indexed image: its absolute path and the file state its embedding was made from."""

    path: str  # absolute path
    mtime_ns: int  # modification time when embedded
    size: int  # bytes when embedded

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> IndexEntry:
        # absolute, ".." folded, but a symlink stays its own entry: resolving it would give two
        # names one entry (and a link to a file outside the folder an entry never removed)
        p = os.path.abspath(os.path.expanduser(path))
        st = os.stat(p)
        return cls(p, st.st_mtime_ns, st.st_size)


@dataclass
class SearchResult:
    """Top-k per query, best first; where the index holds fewer than k, the missing places
    have id -1, path None and FAISS's filler score (-3.4e38, below any cosine)."""

    scores: np.ndarray  # (Q, k) float32 cosine similarities (the filler where id is -1)
    ids: np.ndarray  # (Q, k) int64 positions in ImageIndex.entries, -1 where missing
    paths: list[list[str | None]]  # (Q, k) image paths


@dataclass
class AddReport:
    """What add_folder did."""

    added: list[str] = field(default_factory=list)  # new files embedded
    updated: list[str] = field(default_factory=list)  # changed files re-embedded
    removed: list[str] = field(default_factory=list)  # entries dropped (file gone or unreadable)
    unchanged: int = 0  # files already indexed as they are
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) unreadable

    @property
    def embedded(self) -> int:
        return len(self.added) + len(self.updated)


class ImageEmbedder(Protocol):
    """Images -> embeddings. ``name`` must identify the model and its weights."""

    name: str
    dim: int

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """B RGB images -> (B, dim) float array."""
        ...


# --------------------------------------------------------------------------------------------
# FAISS index kinds
# --------------------------------------------------------------------------------------------


def _normalized(vectors: np.ndarray | torch.Tensor, dim: int, what: str) -> np.ndarray:
    """(N, dim) float32 C-contiguous unit-norm rows; ValueError on shape, NaN or zero rows."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().float().cpu().numpy()
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what}: expected shape (N, {dim}), received {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what}: rows {np.flatnonzero(norms[:, 0] == 0)[:10].tolist()} are zero")
    return np.ascontiguousarray(x / norms)


def auto_nlist(n: int) -> int:
    """ivf cells for n training vectors: round(sqrt(n)), at most n / 39, at least 1."""
    return max(1, min(round(n**0.5), n // MIN_POINTS_PER_CELL))


class _VectorsGone(Exception):
    """The vectors file an index.json names is not there (a save may have replaced it)."""


def _new_faiss_index(kind: str, dim: int, params: IndexParams, n_train: int) -> Any:
    if kind == "exact":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        return index
    if kind == "ivf":
        nlist = params.nlist if params.nlist is not None else auto_nlist(n_train)
        if nlist > n_train:
            raise ValueError(
                f"ivf with nlist={nlist} needs at least {nlist} vectors to train its cells, "
                f"received {n_train}; add more images first or lower --nlist"
            )
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = params.nprobe
        return index
    raise ValueError(f"unknown index kind {kind!r}; expected one of {list(INDEX_KINDS)}")


def _search_params(kind: str, params: IndexParams, k: int) -> Any:
    if kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=params.nprobe)
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(params.ef_search, k))
    return None


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------


class ImageIndex:
    """Unit-norm image embeddings of one model in a FAISS index, with their image entries.

    Row i of the FAISS index is ``entries[i]`` (ids are positions, kept so on every rebuild).
    """

    def __init__(
        self,
        model: str,
        dim: int,
        kind: IndexKind = "exact",
        params: IndexParams | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {list(INDEX_KINDS)}")
        if not model:
            raise ValueError("model must name the embedding model (and its weights)")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, received {dim}")
        self.model = model
        self.dim = dim
        self.kind: IndexKind = kind
        self.params = params or IndexParams()
        self.metadata: dict[str, Any] = dict(metadata or {})  # free-form, saved in index.json
        self.entries: list[IndexEntry] = []
        self.trained_on = 0  # ivf: vectors the cells were fit on (0: untrained)
        self._index: Any = None  # built on the first add (ivf needs vectors to train)
        self._positions: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    # ---- adding -----------------------------------------------------------------------------

    def check_model(self, model: str, dim: int) -> None:
        """IndexMismatchError unless (model, dim) is what this index holds."""
        if model != self.model or dim != self.dim:
            raise IndexMismatchError(
                f"this index holds embeddings of model {self.model!r} (width {self.dim}); "
                f"received model {model!r} (width {dim}). Embeddings of different models are "
                "not comparable: use the index's model, or build a new index for this one"
            )

    def add(
        self,
        vectors: np.ndarray | torch.Tensor,
        entries: Sequence[IndexEntry | str],
        *,
        model: str,
    ) -> None:
        """Append (N, D) embeddings of `model` for `entries` (IndexEntry, or paths to stat).

        Paths already indexed raise ValueError (use ``add_folder`` to update changed files).
        """
        vectors = np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors
        width = int(vectors.shape[-1]) if vectors.ndim == 2 else -1
        self.check_model(model, width)
        x = _normalized(vectors, self.dim, "vectors")
        items = [e if isinstance(e, IndexEntry) else IndexEntry.of(e) for e in entries]
        if len(items) != len(x):
            raise ValueError(f"received {len(x)} vectors for {len(items)} entries")
        paths = [e.path for e in items]
        dup = sorted({p for p in paths if p in self._positions} | _duplicates(paths))
        if dup:
            raise ValueError(f"already indexed or given twice: {dup[:5]}")
        self._append(x, items)

    def _append(self, x: np.ndarray, items: list[IndexEntry]) -> None:
        if not items:
            return
        total = len(self.entries) + len(items)
        refit = (
            self.kind == "ivf"
            and self.params.nlist is None
            and total > REFIT_GROWTH * max(self.trained_on, 1)
        )
        if self._index is None or refit:
            old = self.vectors() if self._index is not None else np.zeros((0, self.dim), "f4")
            self._rebuild(np.concatenate([old, x]), [*self.entries, *items])
            return
        self._index.add(x)
        for e in items:
            self._positions[e.path] = len(self.entries)
            self.entries.append(e)

    def _rebuild(self, x: np.ndarray, items: list[IndexEntry]) -> None:
        """A fresh FAISS index of this kind over x (ivf: cells fit on x). Built before anything
        is replaced: if FAISS refuses (too few vectors for the cells asked), nothing changed."""
        index = None
        if items:
            index = _new_faiss_index(self.kind, self.dim, self.params, len(x))
            if self.kind == "ivf":
                index.train(x)
            index.add(x)
        self._index = index
        self.trained_on = len(x) if index is not None and self.kind == "ivf" else 0
        self.entries = list(items)
        self._positions = {e.path: i for i, e in enumerate(self.entries)}

    def remove(self, paths: Sequence[str]) -> list[str]:
        """Drop the entries of `paths` (absolute, as stored); returns those that were indexed.

        The FAISS index is rebuilt from the kept vectors (HNSW cannot delete in place); ivf keeps
        its cells.
        """
        gone = {p for p in paths if p in self._positions}
        if not gone:
            return []
        keep = [i for i, e in enumerate(self.entries) if e.path not in gone]
        x = self.vectors()[keep]
        items = [self.entries[i] for i in keep]
        if self.kind == "ivf" and self._index is not None and keep:
            # Refill the trained cells rather than refitting them on fewer vectors (in a copy:
            # the index in use stays whole until the new one is ready).
            index = faiss.clone_index(self._index)
            index.reset()
            index.add(x)
            self._index = index
            self.entries = items
            self._positions = {e.path: i for i, e in enumerate(items)}
        else:
            self._rebuild(x, items)
        return sorted(gone)

    def add_folder(
        self,
        folder: str | os.PathLike[str],
        embedder: ImageEmbedder,
        *,
        batch_size: int = 64,
        progress: bool = True,
    ) -> AddReport:
        """Index the images under `folder` (recursively): embed new and changed files only.

        A file is unchanged when its absolute path, mtime and size match its entry. Entries
        under `folder` whose file is gone, or now unreadable, are removed. Unreadable images are
        skipped with one UnreadableImagesWarning listing them (and in the report).
        """
        self.check_model(embedder.name, embedder.dim)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, received {batch_size}")
        root = Path(folder).expanduser().resolve()
        report = AddReport()
        todo: list[IndexEntry] = []
        changed: set[str] = set()  # indexed paths whose file changed since
        present: set[str] = set()
        for path in scan_images(root):
            entry = IndexEntry.of(path)
            present.add(entry.path)
            pos = self._positions.get(entry.path)
            if pos is not None and self.entries[pos] == entry:
                report.unchanged += 1
                continue
            todo.append(entry)
            if pos is not None:
                changed.add(entry.path)
        prefix = str(root) + os.sep
        # gone: the file no longer exists (an entry of a hidden folder, added on its own, stays)
        gone = [
            e.path
            for e in self.entries
            if e.path.startswith(prefix) and e.path not in present and not os.path.lexists(e.path)
        ]
        # Embed first: if the embedder fails, the index is left as it was.
        vectors, done, report.skipped = _embed_files(todo, embedder, batch_size, progress)
        x = _normalized(vectors, self.dim, f"{embedder.name} embeddings")
        embedded = {e.path for e in done}
        report.added = [e.path for e in done if e.path not in changed]
        report.updated = [e.path for e in done if e.path in changed]
        # Stale rows go: files gone, and changed files (re-embedded, or now unreadable). Neither
        # step changes the FAISS index in use in place, so a failure restores the state before.
        before = (self._index, list(self.entries), dict(self._positions), self.trained_on)
        try:
            self.remove([*gone, *changed])
            self._append(x, done)
        except BaseException:
            self._index, self.entries, self._positions, self.trained_on = before
            raise
        report.removed = sorted([*gone, *(changed - embedded)])
        if report.skipped:
            listing = "; ".join(f"{p} ({why})" for p, why in report.skipped[:20])
            more = f" and {len(report.skipped) - 20} more" if len(report.skipped) > 20 else ""
            warnings.warn(
                f"skipped {len(report.skipped)} unreadable image(s): {listing}{more}",
                UnreadableImagesWarning,
                stacklevel=2,
            )
        return report

    # ---- reading ----------------------------------------------------------------------------

    def vectors(self) -> np.ndarray:
        """(N, D) float32: every stored (unit-norm) vector, in entry order."""
        if self._index is None:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.kind == "ivf":
            self._index.make_direct_map()  # lets IndexIVF reconstruct by id
        return self._index.reconstruct_n(0, self._index.ntotal)

    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int = 10,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchResult:
        """Top-k cosine matches of (Q, D) queries (normalised here). nprobe / ef_search override
        the index's parameters for this call (ivf / hnsw)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, received {k}")
        if self._index is None:
            raise ImageIndexError("the index is empty; add images first")
        q = _normalized(queries, self.dim, "queries")
        params = self.params
        if nprobe is not None or ef_search is not None:
            params = params.replace(
                nprobe=nprobe if nprobe is not None else params.nprobe,
                ef_search=ef_search if ef_search is not None else params.ef_search,
            )
        scores, ids = self._index.search(q, k, params=_search_params(self.kind, params, k))
        paths = [[self.entries[i].path if i >= 0 else None for i in row] for row in ids]
        return SearchResult(scores, ids.astype(np.int64), paths)

    def info(self) -> dict[str, Any]:
        """A summary for people: model, width, kind, size, parameters."""
        out: dict[str, Any] = {
            "model": self.model,
            "dim": self.dim,
            "kind": self.kind,
            "size": len(self),
            "params": self.params.to_dict(),
        }
        if self.kind == "ivf":
            out["nlist"] = int(self._index.nlist) if self._index is not None else None
            out["trained_on"] = self.trained_on
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    # ---- persistence ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index to `directory` (created); see the module docstring for the layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss_name = None
        sha = None
        if self._index is not None:
            fd, tmp = temp_sibling(directory / "vectors")
            assert fd is not None
            os.close(fd)
            try:
                # write_index streams to the file: no second in-memory copy of the vectors.
                faiss.write_index(self._index, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                sha = sha256_file(tmp)
                faiss_name = f"vectors-{sha[:16]}.faiss"
                os.replace(tmp, directory / faiss_name)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "dim": self.dim,
            "kind": self.kind,
            "params": self.params.to_dict(),
            "trained_on": self.trained_on,
            "faiss_file": faiss_name,
            "faiss_sha256": sha,
            "metadata": self.metadata,
            "entries": [_portable(asdict(e), directory) for e in self.entries],
        }
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1) + "\n")  # the commit
        for stale in directory.glob("vectors-*.faiss"):
            if stale.name != faiss_name:
                stale.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, verify: bool = True) -> ImageIndex:
        """Read an index folder written by ``save``; ImageIndexError saying what is wrong if it is
        missing or does not match (``verify`` checks the FAISS file's sha256).

        A ``save`` into the folder while it is read deletes the vectors file the JSON read a
        moment before named: the load then starts again from the new JSON (a few times at most).
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise ImageIndexError(
                f"{directory}: no image index here ({META_FILE} not found); build one with "
                "`python -m generation.index build IMAGE_DIR --out INDEX_DIR`"
            )
        for attempt in range(LOAD_ATTEMPTS):
            text = meta_path.read_text(encoding="utf-8")
            try:
                return cls._load_from(directory, text, verify)
            except _VectorsGone as gone:
                saved_since = meta_path.read_text(encoding="utf-8") != text
                if not saved_since or attempt == LOAD_ATTEMPTS - 1:
                    raise ImageIndexError(f"{meta_path} names {gone}, which is missing") from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    @classmethod
    def _load_from(cls, directory: Path, text: str, verify: bool) -> ImageIndex:
        """`load` of the JSON `text`; _VectorsGone if its vectors file is not there (anymore)."""
        meta_path = directory / META_FILE
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as err:
            raise ImageIndexError(f"{meta_path}: not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ImageIndexError(f"{meta_path}: not a {FORMAT} file")
        if meta.get("version") != VERSION:
            raise ImageIndexError(
                f"{meta_path}: format version {meta.get('version')}, this code reads {VERSION}"
            )
        try:
            params = config_from_dict(IndexParams, meta["params"], source=f"{meta_path} params")
            index = cls(meta["model"], int(meta["dim"]), meta["kind"], params, meta.get("metadata"))
        except (KeyError, TypeError, ValueError) as err:  # ConfigError is a ValueError
            raise ImageIndexError(
                f"{meta_path}: {err!s} (a damaged or foreign index file)"
            ) from None
        root = directory.resolve()
        entries = [
            IndexEntry(**{**e, "path": str(root / e["path"])})
            if not os.path.isabs(e["path"])
            else IndexEntry(**e)
            for e in meta["entries"]
        ]
        if meta["faiss_file"] is None:
            if entries:
                raise ImageIndexError(f"{meta_path}: {len(entries)} entries but no vectors file")
            return index
        faiss_path = directory / meta["faiss_file"]
        try:
            digest = sha256_file(faiss_path) if verify else None
        except FileNotFoundError:
            raise _VectorsGone(faiss_path.name) from None
        if digest is not None and digest != meta["faiss_sha256"]:
            raise ImageIndexError(
                f"{faiss_path}: sha256 differs from {META_FILE}'s {meta['faiss_sha256'][:16]}... "
                "(corrupt or replaced); rebuild the index"
            )
        try:
            faiss_index = faiss.read_index(str(faiss_path))
        except RuntimeError as err:  # truncated or not a FAISS file (unverified loads see it)
            if not faiss_path.is_file():
                raise _VectorsGone(faiss_path.name) from None
            first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
            raise ImageIndexError(
                f"{faiss_path}: FAISS cannot read it ({first}); rebuild the index"
            ) from None
        if faiss_index.ntotal != len(entries) or faiss_index.d != index.dim:
            raise ImageIndexError(
                f"{faiss_path}: holds {faiss_index.ntotal} vectors of width {faiss_index.d}, "
                f"{META_FILE} lists {len(entries)} of width {index.dim}"
            )
        index._index = faiss_index
        index.entries = entries
        index._positions = {e.path: i for i, e in enumerate(entries)}
        index.trained_on = int(meta.get("trained_on", 0))
        return index


def _portable(entry: dict[str, Any], directory: Path) -> dict[str, Any]:
    """An entry as saved: images inside the index folder by their path relative to it (so the
    folder can be moved or committed with its images), others by their absolute path."""
    path = Path(entry["path"])
    root = directory.resolve()
    if path.is_relative_to(root):
        return {**entry, "path": path.relative_to(root).as_posix()}
    return entry


def _duplicates(items: Sequence[str]) -> set[str]:
    return {x for x, n in Counter(items).items() if n > 1}


def scan_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files (by suffix, IMAGE_SUFFIXES) under `folder`, recursively, sorted; hidden files
    and folders skipped."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ImageIndexError(f"{root}: not a folder of images")
    out = []
    for dirpath, dirnames, filenames in os.walk(root.resolve()):  # links to folders not followed
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                out.append(Path(dirpath, name))
    return sorted(out)


def _batches(items: Sequence[IndexEntry], size: int) -> Iterator[Sequence[IndexEntry]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _embed_files(
    entries: Sequence[IndexEntry], embedder: ImageEmbedder, batch_size: int, progress: bool
) -> tuple[np.ndarray, list[IndexEntry], list[tuple[str, str]]]:
    """(vectors (M, D), the M entries embedded, (path, reason) of the unreadable ones)."""
    vectors = [np.zeros((0, embedder.dim), dtype=np.float32)]
    done: list[IndexEntry] = []
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(entries), desc="embedding images", unit="img", disable=not progress)
    with bar:
        for batch in _batches(entries, batch_size):
            images, ok = [], []
            for entry in batch:
                try:
                    images.append(load_rgb(entry.path))
                    ok.append(entry)
                except (ImageError, OSError) as err:
                    reason = str(err).removeprefix(f"{entry.path}: ")
                    skipped.append((entry.path, reason))
            if images:
                out = np.asarray(embedder(images), dtype=np.float32)
                if out.shape != (len(images), embedder.dim):
                    raise ValueError(
                        f"embedder {embedder.name!r}: expected ({len(images)}, {embedder.dim}) "
                        f"for {len(images)} images, received {out.shape}"
                    )
                vectors.append(out)
                done.extend(ok)
            bar.update(len(batch))
    return np.concatenate(vectors), done, skipped


# --------------------------------------------------------------------------------------------
# CLIP embedder
# --------------------------------------------------------------------------------------------


class ClipEmbedder:
    """The project's CLIP as an ImageEmbedder, plus its text tower for text queries."""

    def __init__(self, bundle: ClipBundle, name: str, batch_size: int = 64) -> None:
        self.model, self.preprocess, self.tokenizer = bundle
        self.name = name
        self.batch_size = batch_size
        self.dim = int(self.embed_text([""]).shape[1])

    def __call__(self, images: Sequence[ImageInput]) -> np.ndarray:
        feats = encode_images(self.model, self.preprocess, images, batch_size=self.batch_size)
        return feats.cpu().numpy()  # (B, D) unit-norm

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit-norm CLIP text embeddings (the query side of text -> image search)."""
        device = next(self.model.parameters()).device
        ids = self.tokenizer(list(texts)).to(device)
        return self.model.encode_text(ids, normalize=True).float().cpu().numpy()


def clip_embedder(
    preset: str = "shapes", clip: str | os.PathLike[str] | None = None
) -> tuple[ClipEmbedder, dict[str, Any]]:
    """The CLIP of `preset` (configs/<preset>.json), or the checkpoint folder `clip`.

    Returns the embedder and how to rebuild it (saved in index.json, read by ``add``/``search``).
    Its name is ``<config name>@<sha256[:12] of clip.safetensors>``; a preset without a
    checkpoint builds random weights from seed 0 (as vlm does), named ``<model>@random-seed0``.
    """
    if clip is None:
        entry = load_preset_dict(preset).get("clip", {})
        cfg = config_from_dict(ClipPresetConfig, entry, source=f"{preset_path(preset)} clip")
        if cfg.checkpoint is not None:
            clip = project_path(cfg.checkpoint)
    if clip is not None:
        path = Path(clip).expanduser().resolve()
        bundle = load_clip(path)  # verifies every file's sha256 against the manifest
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        sha = manifest["files"]["clip.safetensors"]["sha256"]
        name = f"{manifest['config']['name']}@{sha[:12]}"
        source: dict[str, Any] = {"preset": preset, "clip": str(path)}
    else:
        bundle = clip_from_preset(cfg.replace(checkpoint=None))
        name = f"{cfg.model}@random-seed0"
        source = {"preset": preset, "clip": None}
    return ClipEmbedder(bundle, name), source


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _embedder_for(args: argparse.Namespace, saved: dict[str, Any] | None) -> tuple[Any, Any]:
    """--preset/--clip if given, else what the index was built with."""
    saved = (saved or {}).get("embedder") or {}
    preset = args.preset or saved.get("preset") or "shapes"
    clip = args.clip if args.clip is not None else (None if args.preset else saved.get("clip"))
    return clip_embedder(preset, clip)


def _print_report(report: AddReport, index: ImageIndex, out: Path) -> None:
    print(
        f"{out}: {len(index)} images ({len(report.added)} added, {len(report.updated)} updated, "
        f"{len(report.removed)} removed, {report.unchanged} unchanged, "
        f"{len(report.skipped)} unreadable skipped); model {index.model}, kind {index.kind}"
    )


def _cmd_build(args: argparse.Namespace) -> int:
    if (args.out / META_FILE).exists() and not args.overwrite:
        raise ImageIndexError(
            f"{args.out} already holds an index; `add` updates it, --overwrite replaces it"
        )
    embedder, source = _embedder_for(args, None)
    params = IndexParams(
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
    )
    index = ImageIndex(embedder.name, embedder.dim, args.kind, params, {"embedder": source})
    report = index.add_folder(
        args.images, embedder, batch_size=args.batch_size, progress=not args.no_progress
    )
    index.save(args.out)
    _print_report(report, index, args.out)
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    index = ImageIndex.load(args.index)
    embedder, _ = _embedder_for(args, index.metadata)
    report = index.add_folder(
        args.images, embedder, batch_size=args.batch_size, progress=not args.no_progress
    )
    index.save(args.index)
    _print_report(report, index, args.index)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    index = ImageIndex.load(args.index)
    embedder, _ = _embedder_for(args, index.metadata)
    index.check_model(embedder.name, embedder.dim)
    if args.text is not None:
        query = embedder.embed_text([args.text])
    else:
        query = embedder([load_rgb(args.image)])
    result = index.search(query, args.k, nprobe=args.nprobe, ef_search=args.ef_search)
    hits = [
        {"rank": r + 1, "score": float(s), "path": p}
        for r, (s, p) in enumerate(zip(result.scores[0], result.paths[0], strict=True))
        if p is not None
    ]
    if args.json:
        print(json.dumps(hits, indent=1))
    else:
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['path']}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(ImageIndex.load(args.index, verify=False).info(), indent=1))
    return 0


def _add_embedder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="the CLIP of this preset (configs/<name>.json; build: shapes)")
    p.add_argument("--clip", type=Path, help="a CLIP checkpoint folder (overrides the preset's)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m generation.index",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1].split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="index every image under a folder")
    build.add_argument("images", type=Path, help="folder of images (searched recursively)")
    build.add_argument("--out", type=Path, required=True, help="index folder to write")
    build.add_argument("--kind", choices=INDEX_KINDS, default="exact", help="FAISS index kind")
    build.add_argument("--nlist", type=int, help="ivf cells (default round(sqrt(N)))")
    build.add_argument("--nprobe", type=int, default=16, help="ivf cells scanned per query")
    build.add_argument("--hnsw-m", type=int, default=32, help="hnsw links per node")
    build.add_argument("--ef-construction", type=int, default=40, help="hnsw build beam")
    build.add_argument("--ef-search", type=int, default=64, help="hnsw search beam")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index")
    add = sub.add_parser("add", help="index new and changed images of a folder")
    add.add_argument("index", type=Path, help="index folder")
    add.add_argument("images", type=Path, help="folder of images (searched recursively)")
    for p in (build, add):
        _add_embedder_args(p)
        p.add_argument("--batch-size", type=int, default=64, help="images per CLIP batch")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    search = sub.add_parser("search", help="top-k images for a text or an image query")
    search.add_argument("index", type=Path, help="index folder")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption, embedded with CLIP's text tower")
    query.add_argument("--image", type=Path, help="an image, embedded with CLIP's image tower")
    search.add_argument("-k", type=int, default=5, help="results to show")
    search.add_argument("--nprobe", type=int, help="ivf: cells scanned (default: the index's)")
    search.add_argument("--ef-search", type=int, help="hnsw: search beam (default: the index's)")
    search.add_argument("--json", action="store_true", help="print JSON")
    _add_embedder_args(search)

    info = sub.add_parser("info", help="what an index holds")
    info.add_argument("index", type=Path, help="index folder")

    args = parser.parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "build": _cmd_build,
        "add": _cmd_add,
        "search": _cmd_search,
        "info": _cmd_info,
    }
    try:
        return commands[args.command](args)
    except (ImageIndexError, ImageError, ValueError) as err:  # ValueError: a bad -k, --nlist,
        print(f"error: {err}", file=sys.stderr)  # preset or checkpoint (CheckpointError)
        return 2


if __name__ == "__main__":
    sys.exit(main())
