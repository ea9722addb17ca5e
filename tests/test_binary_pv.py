"""Binary Paragraph Vector (lm.embeddings.binary_pv) and its script: binary codes, the
straight-through gradient, Hamming distances against a naive count, tie-aware precision@k,
retrieval on a planted two-topic corpus."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lm.embeddings.binary_pv import (
    BinaryParagraphVector,
    BinaryPVConfig,
    TfidfHasher,
    hamming_distances,
    load_binary_pv,
    precision_at_k,
    pv_dbow_loss,
)
from train import binary_pv as train_binary_pv

pytestmark = pytest.mark.usefixtures("one_thread")


def is_binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def test_codes_are_exactly_binary_in_training_and_at_test_time():
    model = BinaryParagraphVector(BinaryPVConfig(num_documents=5, vocab_size=7, bits=12))
    ids = torch.arange(5)
    train_out = model.train()(ids)
    assert train_out.codes.shape == (5, 12) and is_binary(train_out.codes)
    assert is_binary(model.eval()(ids).codes)
    codes = model.codes()
    assert codes.dtype == torch.bool and codes.shape == (5, 12)
    assert torch.equal(codes, model.documents > 0)
    inferred = model.infer(torch.ones(3, 7), steps=3)
    assert inferred.dtype == torch.bool and inferred.shape == (3, 12)
    # the noise binarizer trains on soft codes but still hands out binary ones
    noisy = BinaryParagraphVector(BinaryPVConfig(5, 7, bits=12, binarizer="noise"))
    assert not is_binary(noisy.train()(ids).codes)
    assert is_binary(noisy.eval()(ids).codes)
    with pytest.raises(ValueError, match="binarizer must be one of"):
        BinaryPVConfig(5, 7, binarizer="sign")


def test_inferred_noise_codes_follow_the_generator_not_the_global_rng():
    """infer(generator=) promises the same codes for the same seed: the noise binarizer drew
    from the global RNG, so they changed with whatever ran before."""
    model = BinaryParagraphVector(BinaryPVConfig(5, 7, bits=64, binarizer="noise"))
    counts = torch.rand(4, 7)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(model.infer(counts, steps=5, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(runs[0], runs[1])
    other = model.infer(counts, steps=5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other, runs[0])


def test_straight_through_gradient_is_the_sigmoid_derivative():
    model = BinaryParagraphVector(BinaryPVConfig(num_documents=2, vocab_size=3, bits=4)).train()
    out = model(torch.tensor([0, 1]))
    weights = torch.randn(2, 4)
    (out.codes * weights).sum().backward()
    s = torch.sigmoid(model.documents.detach())
    grad = model.documents.grad
    assert grad is not None and torch.allclose(grad, weights * s * (1 - s), atol=1e-6)


def test_pv_dbow_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    counts = torch.tensor([[2.0, 1.0]])
    expected = -(2 * math.log(0.25) + math.log(0.75)) / 3
    assert pv_dbow_loss(logits, counts).item() == pytest.approx(expected, rel=1e-6)


def naive_hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)), dtype=np.int64)
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = sum(int(x) != int(y) for x, y in zip(a[i], b[j], strict=True))
    return out


@pytest.mark.parametrize("bits", [1, 8, 13, 64])
def test_hamming_distances_match_a_naive_count(bits):
    rng = np.random.default_rng(bits)
    a, b = rng.random((6, bits)) > 0.5, rng.random((9, bits)) > 0.5
    expected = naive_hamming(a, b)
    assert np.array_equal(hamming_distances(a, b), expected)
    # torch and 0/1 inputs, and chunking, give the same
    assert np.array_equal(
        hamming_distances(torch.from_numpy(a), b.astype(np.int64), chunk=4), expected
    )
    with pytest.raises(ValueError, match="code lengths differ"):
        hamming_distances(a, b[:, :-1] if bits > 1 else np.zeros((9, 2), bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        hamming_distances(a.astype(np.int64) * 2, b)


def test_precision_at_k_breaks_ties_in_expectation():
    # query label 1; items by distance: 0 (relevant), 1 (not), 1 (relevant), 2 (relevant)
    d = np.array([[0, 1, 1, 2]])
    labels = [1, 0, 1, 1]
    # k = 2: the first item, then one of the two tied at distance 1 (relevant with p = 1/2)
    assert precision_at_k(d, [1], labels, k=2)[0] == pytest.approx(0.75)
    assert precision_at_k(d, [1], labels, k=1)[0] == pytest.approx(1.0)
    assert precision_at_k(d, [1], labels, k=3)[0] == pytest.approx(2 / 3)
    assert precision_at_k(d, [1], labels, k=4)[0] == pytest.approx(0.75)
    all_tied = np.zeros((1, 4))  # every order equally likely: the base rate
    assert precision_at_k(all_tied, [1], labels, k=2)[0] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="k must be in"):
        precision_at_k(d, [1], labels, k=5)


def planted_corpus(n_per_topic: int, seed: int) -> tuple[list[str], list[int]]:
    """Two topics with disjoint vocabularies, plus shared filler words."""
    rng = np.random.default_rng(seed)
    topics = [[f"alpha{i}" for i in range(12)], [f"beta{i}" for i in range(12)]]
    filler = [f"the{i}" for i in range(6)]
    texts, labels = [], []
    for t in range(2):
        for _ in range(n_per_topic):
            words = list(rng.choice(topics[t], 15)) + list(rng.choice(filler, 10))
            texts.append(" ".join(words))
            labels.append(t)
    return texts, labels


def test_trained_codes_retrieve_the_planted_topic():
    texts, labels = planted_corpus(20, seed=0)
    queries, q_labels = planted_corpus(5, seed=1)
    from sklearn.feature_extraction.text import CountVectorizer

    counter = CountVectorizer().fit(texts)
    counts = torch.from_numpy(counter.transform(texts).toarray().astype(np.float32))
    model = BinaryParagraphVector(BinaryPVConfig(len(texts), counts.shape[1], bits=8))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(150):
        loss = pv_dbow_loss(model.train()(torch.arange(len(texts))).logits, counts)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.3
    q_counts = torch.from_numpy(counter.transform(queries).toarray().astype(np.float32))
    q_codes = model.infer(q_counts, steps=100, generator=torch.Generator().manual_seed(0))
    p = precision_at_k(hamming_distances(q_codes, model.codes()), q_labels, labels, k=10)
    assert p.mean() > 0.9  # chance is 0.5
    hasher = TfidfHasher(bits=8, seed=0).fit(texts)
    codes = hasher.encode(queries)
    assert codes.dtype == np.bool_ and codes.shape == (10, 8)
    assert np.array_equal(codes, TfidfHasher(bits=8, seed=0).fit(texts).encode(queries))


def test_script_smoke_and_saved_model_encodes(tmp_path):
    argv = ["--out", str(tmp_path), "--bits", "8", "--seeds", "0", "--steps", "5"]
    argv += ["--infer-steps", "5", "--max-chunks", "60"]
    assert train_binary_pv.main(argv) == 0
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"binary_pv.{ext}").is_file()
    result = json.loads((tmp_path / "binary_pv.json").read_text())
    methods = result["precision_at_10"]
    assert set(methods) == {
        "random projection of TF-IDF",
        "Binary PV-DBOW (straight_through)",
        "Binary PV-DBOW (noise)",
    }
    for per in methods.values():
        assert 0.0 <= per["8"]["mean"] <= result["references"]["perfect ranking (ceiling)"]
    encoder = load_binary_pv(tmp_path / "stages" / "binary_pv_noise_8bit_seed0")
    codes = encoder.encode(["the for statement loops over a sequence", "integer literals"], steps=3)
    assert codes.dtype == torch.bool and codes.shape == (2, 8)
