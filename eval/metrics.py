"""Evaluation metrics: segmentation mIoU, referring cIoU/gIoU, recall@k, macro-F1, perplexity,
caption BLEU and CIDEr-D.

Everything here is numpy in, Python floats (or numpy arrays of floats) out, except
`perplexity_from_logits`, which takes torch tensors. Shapes use the project's letters: H, W image
size, Q queries, N gallery items, B batch, T tokens, V vocabulary.

Conventions that differ between libraries, fixed here once:

- IoU of an empty prediction against an empty target is 1.0 (nothing to find, nothing found).
  pycocotools.mask.iou returns 0.0 for that pair; the tests check both.
- Per-class IoU is NaN for a class absent from both target and prediction, and NaN entries are
  left out of every mean (mmsegmentation's behaviour). A class predicted but absent from the
  target scores 0 and counts, as in mmsegmentation; detectron2's SemSegEvaluator leaves out every
  class without target pixels, so on a small split its mIoU can be higher.
- recall@k breaks score ties against the positive (pessimistic), so the number never depends on
  sort stability and a constant scorer gets no credit.

Example:
    cm = ConfusionMatrix(num_classes=19)
    for pred, target in loader:  # (H, W) int arrays
        cm.update(pred, target)
    print(cm.miou(), cm.pixel_accuracy())
"""

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

__all__ = [
    "ConfusionMatrix",
    "caption_tokens",
    "ciou",
    "ciou_from_counts",
    "coco_caption_scores",
    "giou",
    "giou_from_counts",
    "intersection_union",
    "macro_f1",
    "mask_iou",
    "perplexity",
    "perplexity_from_logits",
    "recall_at_k",
    "seen_unseen_miou",
]

# exp(x) overflows a float64 above this; perplexity reports inf instead of raising OverflowError.
_MAX_EXP_ARG = math.log(np.finfo(np.float64).max)


# --------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Confusion matrix accumulated over a dataset, for per-class IoU, mIoU and pixel accuracy.

    `matrix[t, p]` counts pixels whose target is class t and prediction is class p
    (rows = target, cols = pred), shape (num_classes, num_classes), int64.

    Pixels whose target equals `ignore_index` are skipped. Every other target value, and every
    prediction at a labelled pixel, must be a class in [0, num_classes); anything else raises
    ValueError rather than being dropped silently (a prediction equal to `ignore_index` at a
    labelled pixel is therefore an error: the model must commit to a class).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise ValueError(f"num_classes must be an int, received {type(num_classes).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, received {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index must lie outside the class range [0, {num_classes}), "
                f"received {ignore_index}"
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix: npt.NDArray[np.int64] = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: npt.ArrayLike, target: npt.ArrayLike) -> None:
        """Add one prediction/target pair to the matrix.

        pred: (...) int class indices, e.g. (H, W) or (B, H, W).
        target: (...) int, same shape as pred; `ignore_index` marks unlabelled pixels.
        """
        pred_arr = np.asarray(pred)
        target_arr = np.asarray(target)
        for name, arr in (("pred", pred_arr), ("target", target_arr)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must be an integer array, received dtype {arr.dtype}")
        if pred_arr.shape != target_arr.shape:
            raise ValueError(
                f"pred and target must have the same shape, received pred {pred_arr.shape} "
                f"and target {target_arr.shape}"
            )
        n = self.num_classes
        # int64 before any arithmetic: t * n + p overflows uint8/int16 inputs.
        pred_flat = pred_arr.reshape(-1).astype(np.int64)
        target_flat = target_arr.reshape(-1).astype(np.int64)

        self._check_range("target", target_flat, allow_ignore=True)
        self._check_range("pred", pred_flat, allow_ignore=True)
        keep = target_flat != self.ignore_index
        pred_kept = pred_flat[keep]
        if np.any(pred_kept == self.ignore_index):
            raise ValueError(
                f"pred contains ignore_index={self.ignore_index} at a pixel whose target is "
                f"labelled; predictions at labelled pixels must be in [0, {n})"
            )
        counts = np.bincount(target_flat[keep] * n + pred_kept, minlength=n * n)
        self.matrix += counts.reshape(n, n)

    def _check_range(self, name: str, values: npt.NDArray[np.int64], allow_ignore: bool) -> None:
        bad = (values < 0) | (values >= self.num_classes)
        if allow_ignore:
            bad &= values != self.ignore_index
        if np.any(bad):
            first = int(values[np.argmax(bad)])
            raise ValueError(
                f"{name} values must be in [0, {self.num_classes}) or ignore_index="
                f"{self.ignore_index}; received {first} ({int(bad.sum())} such values)"
            )

    def iou(self) -> npt.NDArray[np.float64]:
        """Per-class IoU = TP / (TP + FP + FN), shape (num_classes,).

        NaN for a class absent from both target and prediction (union 0); 0.0 for a class that
        was predicted but never present (or present but never predicted).
        """
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - np.diag(self.matrix)
        out = np.full(self.num_classes, np.nan, dtype=np.float64)
        np.divide(tp, union, out=out, where=union > 0)
        return out

    def miou(self, classes: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None) -> float:
        """Mean of the per-class IoU over `classes` (default all), skipping NaN (absent) classes.

        classes: (K,) int class indices. Returns NaN if every selected class is absent.
        """
        ious = self.iou()
        if classes is not None:
            ious = ious[_check_class_indices(classes, self.num_classes, "classes")]
        return _nanmean(ious)

    def pixel_accuracy(self) -> float:
        """Correct labelled pixels / labelled pixels; NaN if no labelled pixel was seen."""
        total = int(self.matrix.sum())
        if total == 0:
            return math.nan
        return float(np.trace(self.matrix) / total)


def seen_unseen_miou(
    per_class_iou: npt.ArrayLike, seen: Sequence[int], unseen: Sequence[int]
) -> dict[str, float]:
    """mIoU over seen and unseen classes and their harmonic mean (zero-shot segmentation).

    per_class_iou: (C,) float, NaN for absent classes (as from `ConfusionMatrix.iou`).
    seen, unseen: class indices into per_class_iou; must be non-empty and disjoint.

    The caller decides which indices count: in particular whether a background class belongs
    to `seen`, or to neither, differs between zero-shot protocols (ZS3Net/SPNet count it as
    seen; others drop it), so it is not special-cased here.

    Returns {"seen": s, "unseen": u, "harmonic": 2su / (s + u)}; each mean skips NaN classes
    and is NaN if all its classes are absent. harmonic is NaN if s or u is NaN and 0.0 if
    either is 0.
    """
    ious = np.asarray(per_class_iou, dtype=np.float64)
    if ious.ndim != 1:
        raise ValueError(f"per_class_iou must be 1-D (C,), received shape {ious.shape}")
    seen_idx = _check_class_indices(seen, ious.shape[0], "seen")
    unseen_idx = _check_class_indices(unseen, ious.shape[0], "unseen")
    if seen_idx.size == 0 or unseen_idx.size == 0:
        raise ValueError(
            f"seen and unseen must be non-empty, received {seen_idx.size} seen and "
            f"{unseen_idx.size} unseen classes"
        )
    overlap = np.intersect1d(seen_idx, unseen_idx)
    if overlap.size:
        raise ValueError(f"seen and unseen must be disjoint, both contain {overlap.tolist()}")
    s = _nanmean(ious[seen_idx])
    u = _nanmean(ious[unseen_idx])
    if math.isnan(s) or math.isnan(u):
        harmonic = math.nan
    elif s == 0.0 or u == 0.0:
        harmonic = 0.0
    else:
        harmonic = 2.0 * s * u / (s + u)
    return {"seen": s, "unseen": u, "harmonic": harmonic}


def _check_class_indices(
    indices: Iterable[int] | npt.NDArray[np.integer[Any]], num_classes: int, name: str
) -> npt.NDArray[np.int64]:
    arr = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
    if arr.size == 0:
        return arr.astype(np.int64).reshape(0)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D sequence of int class indices, received dtype {arr.dtype} "
            f"shape {arr.shape}"
        )
    bad = (arr < 0) | (arr >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"{name} must be class indices in [0, {num_classes}), received {arr[bad].tolist()}"
        )
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{name} must not repeat a class, received {arr.tolist()}")
    return arr.astype(np.int64)


def _nanmean(values: npt.NDArray[np.float64]) -> float:
    """Mean of the non-NaN entries; NaN (without numpy's empty-slice warning) if there are none."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return math.nan
    return float(finite.mean())


# --------------------------------------------------------------------------------------------
# Referring segmentation
# --------------------------------------------------------------------------------------------


def _as_mask(mask: npt.ArrayLike, name: str) -> npt.NDArray[np.bool_]:
    """A (H, W) bool mask from a bool array or a 0/1 numeric array; anything else raises."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, received shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be a bool or 0/1 numeric mask, received dtype {arr.dtype}")
    if not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5].tolist()
        raise ValueError(f"{name} must be binary (0/1), received values such as {bad}")
    return arr.astype(np.bool_)


def _intersection_union(
    pred: npt.ArrayLike, target: npt.ArrayLike, index: int | None = None
) -> tuple[int, int]:
    where = "" if index is None else f"[{index}]"
    p = _as_mask(pred, f"preds{where}" if index is not None else "pred")
    t = _as_mask(target, f"targets{where}" if index is not None else "target")
    if p.shape != t.shape:
        sample = "" if index is None else f"sample {index}: "
        raise ValueError(
            f"{sample}pred and target masks must have the same shape, received pred "
            f"{p.shape} and target {t.shape}"
        )
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p | t))


def mask_iou(pred: npt.ArrayLike, target: npt.ArrayLike) -> float:
    """IoU of one binary mask pair.

    pred, target: (H, W) bool (or 0/1) masks of the same shape.
    Returns |pred ∩ target| / |pred ∪ target|, and 1.0 when both are empty (pycocotools returns
    0.0 there).
    """
    inter, union = _intersection_union(pred, target)
    return 1.0 if union == 0 else inter / union


def _check_pairs(preds: Sequence[npt.ArrayLike], targets: Sequence[npt.ArrayLike]) -> None:
    if len(preds) != len(targets):
        raise ValueError(
            f"preds and targets must have the same length, received {len(preds)} preds "
            f"and {len(targets)} targets"
        )
    if len(preds) == 0:
        raise ValueError("preds and targets are empty; need at least one sample")


def ciou(preds: Sequence[npt.ArrayLike], targets: Sequence[npt.ArrayLike]) -> float:
    """Cumulative IoU: total intersection / total union over a dataset (RefCOCO "overall IoU").

    preds, targets: length-S sequences of (H_i, W_i) bool masks; H_i, W_i may vary between
    samples but pred i and target i must match. Large objects weigh more than in `giou`.
    Returns 1.0 if the total union is 0 (every mask empty).
    """
    return ciou_from_counts(_pair_counts(preds, targets))


def giou(preds: Sequence[npt.ArrayLike], targets: Sequence[npt.ArrayLike]) -> float:
    """Generalised (mean) IoU: the mean over samples of the per-sample IoU (see `mask_iou`).

    preds, targets: length-S sequences of (H_i, W_i) bool masks, pred i and target i of equal
    shape. Empty prediction vs empty target scores 1.0, so no-target expressions (gRefCOCO)
    reward predicting nothing; empty prediction vs non-empty target scores 0.0.
    """
    return giou_from_counts(_pair_counts(preds, targets))


def intersection_union(pred: npt.ArrayLike, target: npt.ArrayLike) -> tuple[int, int]:
    """(|pred ∩ target|, |pred ∪ target|) of one mask pair: what cIoU and gIoU are made of, so
    that shards of a dataset can be scored apart and merged (`ciou_from_counts`)."""
    return _intersection_union(pred, target)


def ciou_from_counts(counts: Sequence[tuple[int, int]]) -> float:
    """`ciou` from per-sample (intersection, union) pairs."""
    if len(counts) == 0:
        raise ValueError("no samples; need at least one (intersection, union) pair")
    total_union = sum(u for _, u in counts)
    return 1.0 if total_union == 0 else sum(i for i, _ in counts) / total_union


def giou_from_counts(counts: Sequence[tuple[int, int]]) -> float:
    """`giou` from per-sample (intersection, union) pairs."""
    if len(counts) == 0:
        raise ValueError("no samples; need at least one (intersection, union) pair")
    return float(np.mean([1.0 if u == 0 else i / u for i, u in counts]))


def _pair_counts(
    preds: Sequence[npt.ArrayLike], targets: Sequence[npt.ArrayLike]
) -> list[tuple[int, int]]:
    _check_pairs(preds, targets)
    return [
        _intersection_union(p, t, index=i)
        for i, (p, t) in enumerate(zip(preds, targets, strict=True))
    ]


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def recall_at_k(
    scores: npt.ArrayLike, positives: npt.ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Fraction of queries with a positive among their k highest-scoring items.

    scores: (Q, N) float similarity, higher = more similar.
    positives: (Q,) int index of the one correct item per query, or (Q, N) bool with at least
        one True per row (a query is a hit if any positive is in its top k).
    ks: cut-offs, each in [1, N].

    Ties are broken pessimistically: a positive is ranked after every negative with an equal
    score. The (0-based) rank of a query is (#items scoring strictly above its best positive) +
    (#negatives tying with it), and the query is a hit at k iff rank < k. Positives tying with
    each other do not push each other down.

    Returns {k: recall} with recall in [0, 1].
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (Q, N) matrix, received shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN values")
    q, n = s.shape
    pos = np.asarray(positives)
    if pos.dtype == np.bool_:
        if pos.shape != s.shape:
            raise ValueError(
                f"bool positives must have the scores' shape (Q, N) = {s.shape}, "
                f"received {pos.shape}"
            )
        no_pos = np.flatnonzero(~pos.any(axis=1))
        if no_pos.size:
            raise ValueError(
                f"every query needs at least one positive; queries {no_pos[:10].tolist()} "
                f"({no_pos.size} in all) have none"
            )
        pos_mask = pos
    elif np.issubdtype(pos.dtype, np.integer):
        if pos.shape != (q,):
            raise ValueError(f"int positives must have shape (Q,) = ({q},), received {pos.shape}")
        bad = (pos < 0) | (pos >= n)
        if bad.any():
            raise ValueError(
                f"positive indices must be in [0, {n}), received {pos[bad][:10].tolist()}"
            )
        pos_mask = np.zeros((q, n), dtype=np.bool_)
        pos_mask[np.arange(q), pos] = True
    else:
        raise ValueError(
            f"positives must be a (Q,) int array or a (Q, N) bool array, received dtype "
            f"{pos.dtype} shape {pos.shape}"
        )
    ks_list = [int(k) for k in ks]
    if not ks_list:
        raise ValueError("ks is empty; give at least one cut-off")
    bad_ks = [k for k in ks_list if not 1 <= k <= n]
    if bad_ks:
        raise ValueError(f"each k must be in [1, N={n}], received {bad_ks}")

    best_pos = np.where(pos_mask, s, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    rank = (s > best_pos).sum(axis=1) + ((s == best_pos) & ~pos_mask).sum(axis=1)  # (Q,)
    return {k: float(np.mean(rank < k)) for k in ks_list}


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def macro_f1(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, labels: npt.ArrayLike | None = None
) -> float:
    """Unweighted mean of per-class F1 (sklearn's f1_score(average="macro", zero_division=0)).

    y_true, y_pred: (S,) class labels (ints or strings) of equal length.
    labels: (L,) classes to average over. Default: the union of labels in y_true and y_pred,
        so a class with no true and no predicted sample never enters the mean. A class in an
        explicit `labels` that never occurs scores 0, as does any class with
        precision + recall = 0. Samples of classes outside `labels` still count as false
        positives/negatives for the listed classes.
    """
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise ValueError(
            f"y_true and y_pred must be 1-D (S,), received shapes {t.shape} and {p.shape}"
        )
    if t.shape != p.shape:
        raise ValueError(
            f"y_true and y_pred must have the same length, received {t.size} and {p.size}"
        )
    if t.size == 0:
        raise ValueError("y_true and y_pred are empty; need at least one sample")
    # Encode both against their joint vocabulary so counting is three bincounts.
    vocab, codes = np.unique(np.concatenate([t, p]), return_inverse=True)
    t_codes, p_codes = codes[: t.size], codes[t.size :]
    m = vocab.size
    true_count = np.bincount(t_codes, minlength=m)
    pred_count = np.bincount(p_codes, minlength=m)
    tp = np.bincount(t_codes[t_codes == p_codes], minlength=m)

    if labels is None:
        sel_tp, sel_true, sel_pred = tp, true_count, pred_count
    else:
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D array, received shape {lab.shape}")
        if np.unique(lab).size != lab.size:
            raise ValueError(f"labels must not repeat, received {lab.tolist()}")
        pos = np.clip(np.searchsorted(vocab, lab), 0, m - 1)
        found = vocab[pos] == lab
        sel_tp = np.where(found, tp[pos], 0)
        sel_true = np.where(found, true_count[pos], 0)
        sel_pred = np.where(found, pred_count[pos], 0)
    # F1 = 2PR / (P + R) = 2TP / (2TP + FP + FN) = 2TP / (#true + #pred); 0 when TP = 0.
    denom = sel_true + sel_pred
    f1 = np.zeros(denom.shape, dtype=np.float64)
    np.divide(2.0 * sel_tp, denom, out=f1, where=denom > 0)
    return float(f1.mean())


# --------------------------------------------------------------------------------------------
# Captioning
# --------------------------------------------------------------------------------------------


def caption_tokens(text: str) -> str:
    """A caption as the COCO caption scorers take it: lower case, punctuation dropped, words
    (letters and digits of any script) joined by single spaces ("A red Circle." -> "a red circle",
    "Café crème" -> "café crème").

    The official pipeline tokenises with Stanford's PTBTokenizer (Java) and then drops
    punctuation tokens; this regex does the same for plain words but keeps clitics joined
    ("don't" stays one word where PTB gives "do n't") and splits hyphenated words and decimals
    ("t-shirt" -> "t shirt"), so figures compare across our runs, not to the decimal with
    published tables.
    """
    return " ".join(re.findall(r"[^\W_]+(?:'[^\W_]+)*", text.lower().replace("\u2019", "'")))


def coco_caption_scores(
    references: Sequence[Sequence[str]], candidates: Sequence[str]
) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D of one candidate caption per image against that image's
    reference captions, by pycocoevalcap's own scorers (the COCO caption evaluation's code) on
    `caption_tokens`. CIDEr-D is on COCO's scale (x10; a candidate equal to its only reference,
    whose n-grams no other image's references share, scores 10). Its n-gram weights are document
    frequencies over the evaluated images' references: on one image every weight is 0 and so is
    the score; it means something over many images.

    references: (S,) lists of reference captions, each with at least one word; candidates: (S,)
    strings (an empty one scores nothing).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(candidates):
        raise ValueError(
            f"one candidate per image: received {len(candidates)} candidates for "
            f"{len(references)} images"
        )
    if not candidates:
        raise ValueError("no captions to score; need at least one image")
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    wordless = [i for i, refs in gts.items() if not any(refs)]
    if wordless:
        raise ValueError(
            f"every image needs a reference caption with a word in it; images {wordless[:5]} "
            f"({len(wordless)} in all) have none, e.g. {list(references[wordless[0]])[:3]!r:.80}"
        )
    res = {i: [caption_tokens(c)] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{n}": float(b) for n, b in enumerate(bleu, start=1)}, "cider": float(cider)}


# --------------------------------------------------------------------------------------------
# Language modelling
# --------------------------------------------------------------------------------------------


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp(nll_sum / num_tokens): perplexity from a summed natural-log NLL over num_tokens.

    Returns inf instead of raising if the mean NLL is too large for a float64 exp.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, received {num_tokens}")
    if math.isnan(nll_sum) or nll_sum < 0:
        raise ValueError(f"nll_sum must be a non-negative number, received {nll_sum}")
    mean = nll_sum / num_tokens
    return math.inf if mean > _MAX_EXP_ARG else math.exp(mean)


@torch.no_grad()
def perplexity_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> float:
    """Token-level perplexity of a causal LM over a batch.

    logits: (B, T, V) float, the scores for the token at each position.
    labels: (B, T) int, already aligned with logits: labels[b, t] is the token that
        logits[b, t] should predict. For a causal LM whose labels are the input ids the caller
        shifts: `logits[:, :-1]` with `input_ids[:, 1:]`. Positions equal to ignore_index
        (padding, prompt) are excluded.

    Computes exp(sum NLL / #counted tokens) in float32, i.e. every token weighs equally (not a
    mean of per-sequence perplexities). Raises ValueError if no token is counted.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), received shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be (B, T) = {tuple(logits.shape[:2])} to match logits, received "
            f"{tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, received dtype {labels.dtype}")
    vocab = logits.shape[-1]
    counted = labels != ignore_index
    num_tokens = int(counted.sum())
    if num_tokens == 0:
        raise ValueError(f"every label equals ignore_index={ignore_index}; no token to score")
    bad = counted & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, received "
            f"{labels[bad][:10].tolist()}"
        )
    nll_sum = F.cross_entropy(
        logits.reshape(-1, vocab).float(),
        labels.reshape(-1).long(),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return perplexity(float(nll_sum), num_tokens)
