"""Tests for eval/metrics.py against pycocotools, sklearn, torch and hand-computed values."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from sklearn.metrics import f1_score

from eval.metrics import (
    ConfusionMatrix,
    ciou,
    giou,
    macro_f1,
    mask_iou,
    perplexity,
    perplexity_from_logits,
    recall_at_k,
    seen_unseen_miou,
)

# --------------------------------------------------------------------------------------------
# Helpers: independent references
# --------------------------------------------------------------------------------------------


def _rle(m: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def _random_masks(rng: np.random.Generator, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs of masks of varied size and density, including empty and full ones."""
    pairs = []
    densities = [0.0, 0.01, 0.1, 0.5, 0.9, 1.0]
    for i in range(count):
        h, w = rng.integers(1, 40, size=2)
        dp, dt = densities[i % 6], densities[(i // 6) % 6]
        pairs.append((rng.random((h, w)) < dp, rng.random((h, w)) < dt))
    return pairs


def _naive_iou(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """Per-class IoU by boolean ops, one class at a time."""
    valid = target != ignore
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        p = (pred == c) & valid
        t = (target == c) & valid
        union = np.count_nonzero(p | t)
        if union:
            out[c] = np.count_nonzero(p & t) / union
    return out


# --------------------------------------------------------------------------------------------
# Referring segmentation: mask_iou, cIoU, gIoU
# --------------------------------------------------------------------------------------------


def test_mask_iou_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for pred, target in _random_masks(rng, 200):
        if not pred.any() and not target.any():
            continue  # conventions differ there; see test_empty_vs_empty_differs_from_pycocotools
        expected = mask_utils.iou([_rle(pred)], [_rle(target)], [0])[0, 0]
        assert mask_iou(pred, target) == pytest.approx(expected, abs=1e-6)
        checked += 1
    assert checked > 150


def test_empty_vs_empty_differs_from_pycocotools() -> None:
    # Our convention: nothing to find and nothing found is a perfect score. pycocotools says 0.
    empty = np.zeros((5, 7), dtype=bool)
    assert mask_utils.iou([_rle(empty)], [_rle(empty)], [0])[0, 0] == 0.0
    assert mask_iou(empty, empty) == 1.0
    assert giou([empty], [empty]) == 1.0
    assert ciou([empty, empty], [empty, empty]) == 1.0


def test_ciou_matches_pycocotools_areas() -> None:
    rng = np.random.default_rng(1)
    pairs = _random_masks(rng, 120)
    inter = union = 0
    for pred, target in pairs:
        d, g = _rle(pred), _rle(target)
        inter += int(mask_utils.area(mask_utils.merge([d, g], intersect=True)))
        union += int(mask_utils.area(mask_utils.merge([d, g], intersect=False)))
    preds, targets = zip(*pairs, strict=True)
    assert ciou(list(preds), list(targets)) == pytest.approx(inter / union, abs=1e-6)


def test_giou_matches_mean_of_pycocotools_iou() -> None:
    rng = np.random.default_rng(2)
    pairs = _random_masks(rng, 100)
    per_sample = []
    for pred, target in pairs:
        if not pred.any() and not target.any():
            per_sample.append(1.0)
        else:
            per_sample.append(mask_utils.iou([_rle(pred)], [_rle(target)], [0])[0, 0])
    preds, targets = zip(*pairs, strict=True)
    assert giou(list(preds), list(targets)) == pytest.approx(np.mean(per_sample), abs=1e-6)


def test_giou_and_ciou_hand_computed() -> None:
    full = np.ones((2, 2), dtype=bool)
    empty = np.zeros((2, 2), dtype=bool)
    left = np.array([[1, 0], [1, 0]], dtype=bool)
    # Per-sample IoU: full/full 1, empty/empty 1, empty pred vs full target 0, left/full 2/4.
    preds = [full, empty, empty, left]
    targets = [full, empty, full, full]
    assert giou(preds, targets) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    # cIoU: intersections 4 + 0 + 0 + 2 = 6, unions 4 + 0 + 4 + 4 = 12.
    assert ciou(preds, targets) == pytest.approx(0.5)
    assert giou([empty], [full]) == 0.0
    assert mask_iou(np.array([[1, 0, 0]]), np.array([[1, 1, 0]])) == 0.5  # 0/1 ints accepted


def test_ciou_weighs_large_objects_more_than_giou() -> None:
    big_t = np.ones((10, 10), dtype=bool)
    big_p = big_t.copy()
    big_p[0] = False  # IoU 0.9, area 100
    small_t = np.zeros((10, 10), dtype=bool)
    small_t[0, 0] = True
    small_p = np.zeros((10, 10), dtype=bool)  # IoU 0, area 1
    assert giou([big_p, small_p], [big_t, small_t]) == pytest.approx(0.45)
    assert ciou([big_p, small_p], [big_t, small_t]) == pytest.approx(90 / 101)


def test_referring_shape_mismatch_names_sample() -> None:
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"sample 1: .*\(4, 4\).*\(4, 5\)"):
        ciou([a, a], [a, b])
    with pytest.raises(ValueError, match=r"sample 1: .*\(4, 4\).*\(4, 5\)"):
        giou([a, a], [a, b])
    with pytest.raises(ValueError, match=r"pred \(4, 4\) and target \(4, 5\)"):
        mask_iou(a, b)


@pytest.mark.parametrize(
    ("preds", "targets", "match"),
    [
        ([np.zeros((2, 2), bool)], [], r"1 preds and 0 targets"),
        ([], [], "empty"),
        ([np.zeros((2, 2, 1), bool)], [np.zeros((2, 2, 1), bool)], r"2-D \(H, W\)"),
        ([np.full((2, 2), 2)], [np.zeros((2, 2), bool)], r"binary .*\[2\]"),
    ],
)
def test_referring_bad_inputs(preds: list, targets: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ciou(preds, targets)


# --------------------------------------------------------------------------------------------
# Semantic segmentation: ConfusionMatrix, seen/unseen
# --------------------------------------------------------------------------------------------


def test_miou_hand_computed_2x3() -> None:
    target = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    # class 0: target {(0,0),(0,1)}, pred {(0,0),(1,2)}        -> I 1, U 3 -> 1/3
    # class 1: target {(0,2),(1,0)}, pred {(0,1),(0,2),(1,0)}  -> I 2, U 3 -> 2/3
    # class 2: target {(1,1),(1,2)}, pred {(1,1)}              -> I 1, U 2 -> 1/2
    # mIoU = (1/3 + 2/3 + 1/2) / 3 = 0.5; correct pixels (0,0),(0,2),(1,0),(1,1) -> 4/6
    cm = ConfusionMatrix(num_classes=3)
    cm.update(pred, target)
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 1 / 2])
    assert cm.miou() == pytest.approx(0.5)
    assert cm.miou(classes=[1, 2]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)
    # rows = target, cols = pred
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert cm.matrix.dtype == np.int64


def test_confusion_matrix_matches_naive_loop() -> None:
    rng = np.random.default_rng(3)
    n, ignore = 6, 255
    target = rng.integers(0, n, size=(3, 17, 23))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, n, target.shape))
    target[rng.random(target.shape) < 0.1] = ignore
    target[target == 4] = 0  # class 4 present only in prediction -> IoU 0
    pred[pred == 5] = 1
    target[target == 5] = 2  # class 5 absent from both -> NaN
    cm = ConfusionMatrix(n, ignore_index=ignore)
    cm.update(pred.astype(np.uint8), target.astype(np.uint8))  # uint8 must not overflow
    expected = _naive_iou(pred, target, n, ignore)
    np.testing.assert_allclose(cm.iou(), expected)
    assert cm.iou()[4] == 0.0
    assert math.isnan(cm.iou()[5])
    assert cm.miou() == pytest.approx(np.mean(expected[:5]))
    valid = target != ignore
    assert cm.pixel_accuracy() == pytest.approx(np.mean(pred[valid] == target[valid]))
    assert cm.matrix.sum() == valid.sum()


def test_confusion_matrix_accumulates_like_concatenation() -> None:
    rng = np.random.default_rng(4)
    n = 5
    chunks = [
        (
            rng.integers(0, n, (h, 9)),
            np.where(rng.random((h, 9)) < 0.2, 255, rng.integers(0, n, (h, 9))),
        )
        for h in (4, 7, 1)
    ]
    many = ConfusionMatrix(n)
    for pred, target in chunks:
        many.update(pred, target)
    one = ConfusionMatrix(n)
    one.update(np.concatenate([p for p, _ in chunks]), np.concatenate([t for _, t in chunks]))
    np.testing.assert_array_equal(many.matrix, one.matrix)
    np.testing.assert_array_equal(many.iou(), one.iou())


def test_all_ignore_gives_nan() -> None:
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(np.zeros((4, 4), dtype=np.int64), np.full((4, 4), 255))
    assert np.isnan(cm.iou()).all()
    assert math.isnan(cm.miou())
    assert math.isnan(cm.pixel_accuracy())
    assert cm.matrix.sum() == 0


def test_miou_subset_all_absent_is_nan() -> None:
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 1]), np.array([0, 1]))
    assert math.isnan(cm.miou(classes=[2, 3]))
    assert cm.miou(classes=[0, 2]) == 1.0


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        ([0, 7], [0, 1], r"pred values must be in \[0, 3\) or ignore_index=255; received 7"),
        ([0, 1], [0, -1], r"target values must be in \[0, 3\) or ignore_index=255; received -1"),
        ([0, 255], [0, 1], r"pred contains ignore_index=255 at a pixel whose target is labelled"),
        ([0, 1, 2], [0, 1], r"same shape, received pred \(3,\) and target \(2,\)"),
        ([0.0, 1.0], [0, 1], r"pred must be an integer array, received dtype float64"),
    ],
)
def test_confusion_matrix_bad_inputs(pred: list, target: list, match: str) -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=match):
        cm.update(np.array(pred), np.array(target))
    assert cm.matrix.sum() == 0  # a rejected update leaves the matrix untouched


def test_confusion_matrix_bad_construction() -> None:
    with pytest.raises(ValueError, match="num_classes must be >= 1, received 0"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match=r"ignore_index must lie outside .*\[0, 5\), received 2"):
        ConfusionMatrix(5, ignore_index=2)
    with pytest.raises(ValueError, match=r"classes must be class indices in \[0, 5\)"):
        ConfusionMatrix(5).miou(classes=[5])


def test_seen_unseen_hand_computed() -> None:
    ious = np.array([0.8, 0.6, np.nan, 0.3, 0.1])
    out = seen_unseen_miou(ious, seen=[0, 1, 2], unseen=[3, 4])
    # seen skips the absent class 2: (0.8 + 0.6) / 2 = 0.7; unseen (0.3 + 0.1) / 2 = 0.2
    assert out["seen"] == pytest.approx(0.7)
    assert out["unseen"] == pytest.approx(0.2)
    assert out["harmonic"] == pytest.approx(2 * 0.7 * 0.2 / 0.9)  # = 0.3111...
    zero = seen_unseen_miou(np.array([0.5, 0.0]), seen=[0], unseen=[1])
    assert zero == {"seen": 0.5, "unseen": 0.0, "harmonic": 0.0}
    both_zero = seen_unseen_miou(np.array([0.0, 0.0]), seen=[0], unseen=[1])
    assert both_zero["harmonic"] == 0.0  # not 0/0 = NaN
    absent = seen_unseen_miou(np.array([0.5, np.nan]), seen=[0], unseen=[1])
    assert math.isnan(absent["unseen"])
    assert math.isnan(absent["harmonic"])


def test_seen_unseen_bad_inputs() -> None:
    ious = np.array([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"disjoint, both contain \[1\]"):
        seen_unseen_miou(ious, seen=[0, 1], unseen=[1, 2])
    with pytest.raises(
        ValueError, match=r"unseen must be class indices in \[0, 3\), received \[3\]"
    ):
        seen_unseen_miou(ious, seen=[0], unseen=[3])
    with pytest.raises(ValueError, match="non-empty"):
        seen_unseen_miou(ious, seen=[0], unseen=[])


# --------------------------------------------------------------------------------------------
# Retrieval: recall@k
# --------------------------------------------------------------------------------------------


def _naive_recall(scores: np.ndarray, pos_mask: np.ndarray, k: int) -> float:
    """Sort each row worst case for the query: by score descending, negatives before positives."""
    hits = []
    for row, pos in zip(scores, pos_mask, strict=True):
        order = np.lexsort((pos.astype(int), -row))  # last key is primary
        hits.append(pos[order[:k]].any())
    return float(np.mean(hits))


def test_recall_hand_computed_with_ties() -> None:
    scores = np.array(
        [
            [0.9, 0.5, 0.5, 0.1],  # positive 1 ties negative 2: pessimistic rank 2
            [0.2, 0.3, 0.4, 0.8],  # positive 3 is top: rank 0
            [0.5, 0.5, 0.5, 0.5],  # constant scorer: positive 0 ranked last, rank 3
        ]
    )
    out = recall_at_k(scores, np.array([1, 3, 0]), ks=(1, 2, 3, 4))
    assert out == {
        1: pytest.approx(1 / 3),
        2: pytest.approx(1 / 3),
        3: pytest.approx(2 / 3),
        4: 1.0,
    }
    # Two positives tied with each other do not push each other down: rank 1, hit at k=2.
    pos = np.array([[False, True, True, False]])
    assert recall_at_k(scores[:1], pos, ks=(1, 2)) == {1: 0.0, 2: 1.0}


@pytest.mark.parametrize("multi", [False, True])
def test_recall_matches_naive_sort(multi: bool) -> None:
    rng = np.random.default_rng(5)
    q, n = 50, 30
    scores = rng.integers(0, 6, size=(q, n)).astype(float)  # few distinct values -> many ties
    if multi:
        pos_mask = rng.random((q, n)) < 0.08
        pos_mask[np.arange(q), rng.integers(0, n, q)] = True
        positives: np.ndarray = pos_mask
    else:
        positives = rng.integers(0, n, q)
        pos_mask = np.zeros((q, n), dtype=bool)
        pos_mask[np.arange(q), positives] = True
    ks = (1, 3, 5, 10, 30)
    out = recall_at_k(scores, positives, ks=ks)
    for k in ks:
        assert out[k] == pytest.approx(_naive_recall(scores, pos_mask, k)), k
    assert out[30] == 1.0


def test_recall_without_ties_matches_argsort() -> None:
    rng = np.random.default_rng(6)
    scores = rng.standard_normal((40, 25))
    positives = rng.integers(0, 25, 40)
    top = np.argsort(-scores, axis=1)
    out = recall_at_k(scores, positives)
    for k in (1, 5, 10):
        assert out[k] == pytest.approx(np.mean((top[:, :k] == positives[:, None]).any(axis=1)))


@pytest.mark.parametrize(
    ("positives", "ks", "match"),
    [
        (np.array([0, 1]), (1, 5), r"each k must be in \[1, N=4\], received \[5\]"),
        (np.array([0, 1]), (0,), r"each k must be in \[1, N=4\], received \[0\]"),
        (np.array([0, 4]), (1,), r"positive indices must be in \[0, 4\), received \[4\]"),
        (np.array([0, 1, 2]), (1,), r"shape \(Q,\) = \(2,\), received \(3,\)"),
        (np.zeros((2, 4), dtype=bool), (1,), r"at least one positive; queries \[0, 1\]"),
        (np.array([0.0, 1.0]), (1,), r"\(Q,\) int array or a \(Q, N\) bool array"),
    ],
)
def test_recall_bad_inputs(positives: np.ndarray, ks: tuple[int, ...], match: str) -> None:
    scores = np.zeros((2, 4))
    with pytest.raises(ValueError, match=match):
        recall_at_k(scores, positives, ks=ks)


# --------------------------------------------------------------------------------------------
# Classification: macro-F1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_f1_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 7, 300)
    y_pred = np.where(rng.random(300) < 0.5, y_true, rng.integers(0, 9, 300))  # 7, 8 only predicted
    expected = f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred) == pytest.approx(expected)
    labels = [0, 2, 5, 11]  # 11 never occurs: F1 0, still averaged because it was asked for
    expected = f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred, labels=labels) == pytest.approx(expected)


def test_macro_f1_hand_computed() -> None:
    y_true = ["cat", "cat", "dog", "dog"]
    y_pred = ["cat", "dog", "dog", "bird"]
    # cat: P 1, R 1/2 -> 2/3; dog: P 1/2, R 1/2 -> 1/2; bird: TP 0 -> 0; mean (2/3 + 1/2) / 3
    assert macro_f1(y_true, y_pred) == pytest.approx((2 / 3 + 1 / 2) / 3)
    assert macro_f1([1, 2, 3], [1, 2, 3]) == 1.0


def test_macro_f1_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same length, received 3 and 2"):
        macro_f1([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        macro_f1([], [])
    with pytest.raises(ValueError, match=r"labels must not repeat, received \[1, 1\]"):
        macro_f1([0, 1], [0, 1], labels=[1, 1])


# --------------------------------------------------------------------------------------------
# Language modelling: perplexity
# --------------------------------------------------------------------------------------------


def test_perplexity_from_logits_matches_cross_entropy() -> None:
    torch.manual_seed(0)
    b, t, v = 3, 11, 17
    logits = torch.randn(b, t, v) * 3
    labels = torch.randint(0, v, (b, t))
    labels[0, :4] = -100  # e.g. prompt tokens
    labels[2, -3:] = -100  # padding
    # By hand: negative log-softmax at the label, summed over counted tokens.
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
    assert perplexity_from_logits(logits, labels) == pytest.approx(
        math.exp(nll.sum().item() / keep.sum().item()), rel=1e-5
    )
    mean_nll = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    assert perplexity_from_logits(logits, labels) == pytest.approx(
        math.exp(mean_nll.item()), rel=1e-5
    )
    assert perplexity_from_logits(logits.bfloat16(), labels) == pytest.approx(
        math.exp(mean_nll.item()), rel=5e-2
    )


def test_perplexity_uniform_logits_equals_vocab_size() -> None:
    v = 50
    logits = torch.zeros(2, 7, v)
    labels = torch.randint(0, v, (2, 7), generator=torch.Generator().manual_seed(0))
    assert perplexity_from_logits(logits, labels) == pytest.approx(v, rel=1e-5)


def test_perplexity_from_sum() -> None:
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="num_tokens must be > 0, received 0"):
        perplexity(1.0, 0)
    with pytest.raises(ValueError, match=r"non-negative number, received -1\.0"):
        perplexity(-1.0, 3)


def test_perplexity_from_logits_bad_inputs() -> None:
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"\(B, T, V\), received shape \(6, 5\)"):
        perplexity_from_logits(logits.reshape(6, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\) = \(2, 3\) to match logits, received \(2, 4\)"):
        perplexity_from_logits(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\) or ignore_index=-100"):
        perplexity_from_logits(logits, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="no token to score"):
        perplexity_from_logits(logits, torch.full((2, 3), -100))
    with pytest.raises(ValueError, match=r"integer tensor, received dtype torch\.float32"):
        perplexity_from_logits(logits, torch.zeros(2, 3))


def test_caption_scores_against_hand_computed_values():
    """BLEU: a 3-word candidate whose words all appear in order in a 7-word reference has every
    n-gram precision 1 up to n = 3, so BLEU-1..3 are the brevity penalty exp(1 - 7/3). CIDEr-D:
    a candidate equal to its image's only reference, sharing no n-gram with the other image's,
    scores 10 (cosine 1 at every n, no length penalty, x10); the other image left empty makes the
    corpus mean 5. Case and punctuation do not count."""
    from eval.metrics import caption_tokens, coco_caption_scores

    assert caption_tokens("A red Circle, left of the STAR!") == "a red circle left of the star"
    s = coco_caption_scores([["A red circle and a blue star."]], ["a red Circle"])
    for n in (1, 2, 3):
        assert s[f"bleu{n}"] == pytest.approx(math.exp(1 - 7 / 3), rel=1e-6)
    assert s["bleu4"] < 0.01  # no 4-gram in a 3-word candidate (pycocoevalcap smooths the 0)
    refs = [["red circle left of a star"], ["three green squares above the hexagon"]]
    same = coco_caption_scores(refs, ["Red circle left of a star.", refs[1][0]])
    assert same["cider"] == pytest.approx(10.0) and same["bleu4"] == pytest.approx(1.0)
    # an empty candidate adds no words: 3 candidate words, all right, against 6 reference words
    empty = coco_caption_scores([["a red circle"], ["a blue star"]], ["", "a blue star"])
    assert empty["bleu1"] == pytest.approx(math.exp(1 - 6 / 3), rel=1e-6)
    # words of any script count; a reference without one is refused, naming the image
    assert caption_tokens("Café crème, don\u2019t!") == "café crème don't"
    assert coco_caption_scores([["Привет, мир."]], ["привет мир"])["bleu2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 candidates for 1 images"):
        coco_caption_scores(refs[:1], ["a", "b"])
    with pytest.raises(ValueError, match=r"images \[1\] \(1 in all\) have none, e.g. \['\.\.\.'\]"):
        coco_caption_scores([["a cat"], ["..."]], ["a", "b"])
