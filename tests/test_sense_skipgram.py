"""Disambiguated Skip-gram (lm.embeddings.sense_skipgram) and its script: sense probabilities,
the loss against a hand-computed case, windows, sense recovery on a planted corpus."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from lm.embeddings.sense_skipgram import (
    DisambiguatedSkipGram,
    SenseSkipGramConfig,
    skipgram_windows,
)
from train import sense_skipgram as train_sense_skipgram

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(b: int = 4, c: int = 6, n: int = 3, v: int = 10):
    centers = torch.randint(v, (b,))
    contexts = torch.randint(v, (b, c))
    mask = torch.rand(b, c) > 0.3
    mask[:, 0] = True
    return centers, contexts, mask, torch.randint(v, (b, c, n))


@pytest.mark.parametrize("gumbel", [False, True])
def test_sense_probabilities_sum_to_one(gumbel):
    model = DisambiguatedSkipGram(
        SenseSkipGramConfig(vocab_size=10, dim=8, senses=3, gumbel=gumbel)
    )
    centers, contexts, mask, negatives = batch()
    p = model.sense_probabilities(centers, contexts, mask)
    assert p.shape == (4, 3) and (p > 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(4))
    out = model.train()(centers, contexts, mask, negatives)
    assert torch.allclose(out.sense_probabilities.sum(-1), torch.ones(4), atol=1e-6)
    if gumbel:  # a relaxed sample, not the softmax itself
        assert not torch.allclose(out.sense_probabilities, p)
    # padded context slots do not change the selection
    changed = contexts.clone()
    changed[~mask] = (changed[~mask] + 1) % 10
    assert torch.allclose(model.sense_probabilities(centers, changed, mask), p)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_loss_matches_a_hand_computed_case():
    cfg = SenseSkipGramConfig(vocab_size=3, dim=2, senses=2, entropy_weight=0.5)
    model = DisambiguatedSkipGram(cfg)
    with torch.no_grad():
        model.sense_vectors.copy_(
            torch.tensor(
                [[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.2, -0.1]], [[0.0, 0.0], [1.0, 1.0]]]
            )
        )
        model.context_vectors.copy_(torch.tensor([[0.3, 0.1], [1.0, -1.0], [0.5, 2.0]]))
        model.sense_keys.copy_(
            torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0]] * 2])
        )
        model.context_features.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.5], [3.0, -2.0]]))
    # center word 0; context (1, 2) with the second slot padding; negatives 2 for context 1
    centers, contexts = torch.tensor([0]), torch.tensor([[1, 2]])
    mask, negatives = torch.tensor([[True, False]]), torch.tensor([[[2], [1]]])
    # selection: q = d_1 = (1, 0.5); scores s_{0,k}.q = (2, 0.5)
    e0, e1 = math.exp(2.0), math.exp(0.5)
    p = [e0 / (e0 + e1), e1 / (e0 + e1)]
    # sense k: -[log sig(v_{0,k}.u_1) + log sig(-v_{0,k}.u_2)]
    v = [(1.0, 0.0), (0.0, 1.0)]
    u1, u2 = (1.0, -1.0), (0.5, 2.0)

    def dot(a, b):
        return a[0] * b[0] + a[1] * b[1]

    losses = [-(math.log(sigmoid(dot(vk, u1))) + math.log(sigmoid(-dot(vk, u2)))) for vk in v]
    entropy = -sum(pk * math.log(pk) for pk in p)
    expected = p[0] * losses[0] + p[1] * losses[1] + 0.5 * entropy
    out = model.eval()(centers, contexts, mask, negatives)
    assert out.sense_probabilities[0].tolist() == pytest.approx(p, rel=1e-6)
    assert out.sense_losses[0].tolist() == pytest.approx(losses, rel=1e-6)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_one_sense_is_plain_skipgram_negative_sampling():
    model = DisambiguatedSkipGram(SenseSkipGramConfig(vocab_size=10, dim=4, senses=1))
    with torch.no_grad():
        model.context_vectors.normal_()
    centers, contexts, mask, negatives = batch()
    out = model(centers, contexts, mask, negatives)
    assert torch.equal(out.sense_probabilities, torch.ones(4, 1))
    v = model.sense_vectors[centers, 0]  # (B, D)
    u = model.context_vectors
    pos = torch.nn.functional.logsigmoid((v[:, None] * u[contexts]).sum(-1))
    neg = torch.nn.functional.logsigmoid(-(v[:, None, None] * u[negatives]).sum(-1)).sum(-1)
    per = -((pos + neg) * mask).sum(1) / mask.sum(1)
    assert out.loss.item() == pytest.approx(per.mean().item(), rel=1e-5)


def test_windows_mask_the_edges():
    centers, contexts, mask = skipgram_windows([5, 6, 7, 8], window=2)
    assert centers.tolist() == [5, 6, 7, 8]
    assert contexts[0].tolist() == [0, 0, 6, 7] and mask[0].tolist() == [False, False, True, True]
    assert contexts[2].tolist() == [5, 6, 8, 0] and mask[2].tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="window must be >= 1"):
        skipgram_windows([1, 2], window=0)
    with pytest.raises(ValueError, match="bool mask"):
        DisambiguatedSkipGram(SenseSkipGramConfig(vocab_size=9))(
            centers, contexts, mask.long(), torch.zeros(4, 4, 1, dtype=torch.long)
        )


def test_senses_separate_a_planted_ambiguous_word():
    """Word 0 appears among words 1-5 (sense A) or among words 6-10 (sense B); after training,
    the sense selection should tell the two kinds of occurrence apart."""
    rng = np.random.default_rng(0)
    stream, truth = [], []
    for _ in range(400):
        topic = int(rng.integers(2))
        words = list(rng.integers(1, 6, 6) if topic == 0 else rng.integers(6, 11, 6))
        words.insert(3, 0)
        stream += words
        truth.append(topic)
    centers, contexts, mask = skipgram_windows(stream, window=3)
    torch.manual_seed(0)
    model = DisambiguatedSkipGram(SenseSkipGramConfig(vocab_size=11, dim=8, senses=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(len(centers), (128,), generator=gen)
        neg = torch.randint(11, (128, 6, 3), generator=gen)
        loss = model(centers[idx], contexts[idx], mask[idx], neg).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    where = torch.nonzero(centers == 0).squeeze(1)
    chosen = model.sense_probabilities(centers[where], contexts[where], mask[where]).argmax(-1)
    assert adjusted_rand_score(truth, chosen.numpy()) > 0.8


def test_script_smoke(tmp_path):
    argv = ["--out", str(tmp_path), "--pairs", "2", "--epochs", "1", "--seeds", "0", "--dim", "8"]
    argv += ["--max-words", "4000", "--min-pair-count", "10", "--pairing", "random"]
    assert train_sense_skipgram.main(argv) == 0
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"sense_skipgram.{ext}").is_file()
    result = json.loads((tmp_path / "sense_skipgram.json").read_text())
    assert set(result["summary"]) == {
        "Disambiguated Skip-gram (K=2)",
        "skip-gram, one sense",
        "skip-gram + k-means of contexts",
    }
    assert result["summary"]["skip-gram, one sense"]["ari"]["mean"] == 0.0
    assert len(result["data"]["pairs"]) == 2
    assert all(len(v["ari"]) == 2 for v in result["by_pair"].values())
