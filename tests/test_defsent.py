"""DefSent+ (lm.embeddings.defsent): entry embeddings from definitions, the frozen entry classifier
on hand-made vectors, ICA whitening, the isotropy measures, multi-word entries on a tiny random
BERT, and train.defsent end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel

from lm.embeddings.defsent import (
    DefSentPlus,
    EntryClassifier,
    Whitening,
    average_cosine,
    entry_embeddings,
    partition_isotropy,
)
from lm.embeddings.pooling import LMEmbedder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_entry_embeddings_are_the_mean_of_their_definitions():
    defs = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0], [-1.0, 1.0]])
    index = torch.tensor([0, 0, 1, 0])
    out = entry_embeddings(defs, index, 2)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [0.0, 5.0]]))
    with pytest.raises(ValueError, match="entries without one: \\[2\\]"):
        entry_embeddings(defs, index, 3)


ENTRIES = ["red circle", "blue square", 'The "assert" statement']


def test_entry_classifier_on_hand_made_vectors():
    matrix = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    clf = EntryClassifier(ENTRIES, matrix, scale=10.0)
    h = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 3.0], [1.0, 1.0, 0.0]])
    logits = clf(h)
    # cos(h_0, e_0) = 0.9 / sqrt(0.82); cos(h_2, e_1) = 1 / sqrt(2)
    assert float(logits[0, 0]) == pytest.approx(10 * 0.9 / math.sqrt(0.82), rel=1e-6)
    assert float(logits[2, 1]) == pytest.approx(10 / math.sqrt(2), rel=1e-6)
    assert float(logits[0, 2]) == pytest.approx(0.0, abs=1e-6)
    assert clf.top_k(h[:2], k=2) == [
        ["red circle", "blue square"],
        ['The "assert" statement', "blue square"],
    ]
    # frozen: buffers, no parameters
    assert list(clf.parameters()) == []
    # with a whitening map the cosines are taken after it
    w = Whitening(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    white = EntryClassifier(ENTRIES, matrix, whitening=w, scale=1.0)
    # W(e) = [[1, 0], [-1, 0], [-1, 6]]; W(h_1) = [-1, 6]
    assert float(white(h)[1, 2]) == pytest.approx(1.0, rel=1e-6)
    assert float(white(h)[1, 0]) == pytest.approx(-1 / math.sqrt(37), rel=1e-6)
    with pytest.raises(ValueError, match="distinct"):
        EntryClassifier(["a", "a", "b"], matrix)


def _anisotropic(n=600, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    sources = torch.rand(n, d, generator=g) * 2 - 1  # non-Gaussian, independent
    mixing = torch.randn(d, d, generator=g) * torch.linspace(3.0, 0.1, d)
    return sources @ mixing.T + 4.0  # a common offset: every vector in one cone


def test_ica_whitening_makes_the_covariance_identity_like():
    from sklearn.decomposition import FastICA

    x = _anisotropic()
    w = Whitening.fit_ica(x, 6, seed=0)
    y = w(x)
    assert y.shape == (600, 6)
    cov = torch.cov(y.T)
    torch.testing.assert_close(cov, torch.eye(6), atol=0.02, rtol=0)
    torch.testing.assert_close(y.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    # the same map as scikit-learn's own transform
    ica = FastICA(n_components=6, whiten="unit-variance", random_state=0, max_iter=1000).fit(
        x.double().numpy()
    )
    torch.testing.assert_close(y, torch.from_numpy(ica.transform(x.double().numpy())).float())
    # isotropy: the raw cone vs the whitened cloud
    assert average_cosine(x) > 0.5
    assert abs(average_cosine(y)) < 0.05
    assert partition_isotropy(y) > 0.5 > 0.01 > partition_isotropy(x)
    with pytest.raises(ValueError, match="n_components"):
        Whitening.fit_ica(x[:5], 6)


def test_isotropy_measures_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # cosines: (0,1) = 0, (0,2) = 1/sqrt2, (1,2) = 1/sqrt2
    assert average_cosine(x) == pytest.approx((2 / math.sqrt(2)) / 3, rel=1e-9)
    cross = torch.cat([torch.eye(3), -torch.eye(3)])  # the most isotropic set there is
    assert partition_isotropy(cross) == pytest.approx(1.0, rel=1e-9)
    # a dominant direction: Z(c) along it dwarfs the others
    assert partition_isotropy(torch.tensor([[5.0, 0.1], [5.0, -0.1], [4.0, 0.0]])) < 1e-3


# --------------------------------------------------------------------------------------------
# On a tiny random BERT


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from lm.loading import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_bert_defsent")
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


DEFINITIONS = {
    "red circle": ["a round shape painted red", "the red round one"],
    "blue square": ["a shape with four equal sides, coloured blue"],
    'The "assert" statement': ["a convenient way to insert debugging assertions", "assert x"],
    "augmented assignment statement": ["combines a binary operation and an assignment"],
}


def _embedder(tiny_bert_dir):
    from lm.loading import load_tokenizer

    model = BertModel.from_pretrained(str(tiny_bert_dir))
    return LMEmbedder(model, load_tokenizer(str(tiny_bert_dir)), max_length=32)


def test_multi_word_entries_are_built_from_their_definitions(tiny_bert_dir):
    embedder = _embedder(tiny_bert_dir).train()
    model = DefSentPlus.build(embedder, DEFINITIONS, scale=5.0)
    assert model.entries == list(DEFINITIONS)
    assert embedder.training  # build reads the definitions in eval mode and restores the mode
    embedder.eval()
    with torch.no_grad():
        for k, (_, defs) in enumerate(DEFINITIONS.items()):
            expected = embedder.encode_layers(defs)[-1].mean(0)
            torch.testing.assert_close(
                model.classifier.entry_matrix[k], expected, atol=1e-5, rtol=1e-4
            )
    # train the encoder a few steps on the definitions: the frozen classifier stays put
    embedder.train()
    frozen = model.classifier.weight.clone()
    texts = [d for defs in DEFINITIONS.values() for d in defs]
    target = torch.tensor([k for k, defs in enumerate(DEFINITIONS.values()) for _ in defs])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(*model.tokenize(texts)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    torch.testing.assert_close(model.classifier.weight, frozen)
    top = model.reverse_dictionary(texts, k=2)
    assert [row[0] for row in top] == [list(DEFINITIONS)[int(k)] for k in target]
    assert all(len(row) == 2 for row in top)


def test_build_with_ica_whitening(tiny_bert_dir):
    many = {f"entry number {i}": [f"definition {i} of a thing", f"thing {i}"] for i in range(20)}
    model = DefSentPlus.build(_embedder(tiny_bert_dir), many, ica_components=5)
    assert model.classifier.weight.shape == (20, 5)
    assert model.encode(["definition 3 of a thing"]).shape == (1, 5)
    white = model.classifier.entry_space()
    torch.testing.assert_close(torch.cov(white.T), torch.eye(5), atol=0.08, rtol=0)


# --------------------------------------------------------------------------------------------
# train.defsent


# the tiny random encoder's 157 entry embeddings are nearly one point: FastICA may not converge
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_script_runs_in_parts_and_reports(tiny_bert_dir, tmp_path):
    from train.defsent import main, pydoc_definitions, split_definitions

    defs = pydoc_definitions(4, 4)
    assert len(defs) > 50 and sum(len(e.split()) > 1 for e in defs) > 30
    train, held = split_definitions(defs, seed=0)
    assert len(held) == len(defs) and all(d not in train[e] for e, d in held)

    argv = [
        "--model", str(tiny_bert_dir), "--max-length", "32", "--steps", "3",
        "--batch-size", "16", "--ica-components", "8", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main([*argv, "--stop-after", "ica"]) == 0
    assert not (tmp_path / "defsent.json").exists()
    assert main([*argv, "--resume"]) == 0
    result = json.loads((tmp_path / "defsent.json").read_text())
    assert result["stages"]["ica"]["resumed"] is True
    assert result["stages"]["raw"]["resumed"] is False
    assert len(result["commands"]) == 2
    assert result["data"]["entries"] == len(defs)
    iso = result["isotropy"]
    assert iso["entry matrix / ICA-whitened"]["average_cosine"] < 0.1
    assert iso["entry matrix / raw"]["average_cosine"] > 0.5
    assert set(result["reverse_dictionary"]) == {
        "untrained / ICA-whitened",
        "DefSent+ trained / ICA-whitened",
        "untrained / raw",
        "DefSent+ trained / raw",
    }
    for r in result["reverse_dictionary"].values():
        assert 0 <= r["accuracy@1"] <= r["accuracy@10"] <= 1
    assert (tmp_path / "defsent.md").is_file() and (tmp_path / "defsent.png").is_file()


def test_script_prints_help(capsys):
    from train.defsent import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--ica-components" in capsys.readouterr().out
