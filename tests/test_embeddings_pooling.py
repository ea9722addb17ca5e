"""LMEmbedder pooling and prompting (lm.embeddings.pooling) and the pooling figure script, on tiny
random models: every index is checked against a naive per-example reference under left and right
padding."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel

from lm.embeddings import (
    POOLINGS,
    LMEmbedder,
    format_prompt,
    last_token_index,
    pool,
    position_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTEOL = 'This sentence : "{text}" means in one word:"'  # the paper's template, written out
TEXTS = [
    "A red circle.",
    "Two blue squares and a green star on a plain background, next to a white ring.",
    "x",
    "The assert statement raises AssertionError.",
]


@pytest.fixture(scope="module")
def tiny_bert():
    """(model, tokenizer): a 2-layer random BERT (absolute positions) with MiniLM's tokenizer."""
    from lm.loading import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return BertModel(config).eval(), tokenizer


def naive_embedding(model, tokenizer, text, pooling, prompt=None, layer=-1):
    """One text alone (no padding, no mask, default positions), pooled by a plain loop."""
    full = text if prompt is None else PROMPTEOL.replace("{text}", text)
    ids = tokenizer(full)["input_ids"]
    if pooling == "eos":
        eos = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        )
        if ids[-1] != eos:
            ids = [*ids, eos]
    with torch.no_grad():
        out = model.base_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    h = out.hidden_states[layer][0]  # (T, D)
    T = h.shape[0]
    if pooling == "mean":
        return sum(h[i] for i in range(T)) / T
    if pooling == "weighted_mean":
        total = T * (T + 1) / 2
        return sum((i + 1) / total * h[i] for i in range(T))
    return h[T - 1]  # last, eos


def test_last_token_index_both_sides():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 3]
    with pytest.raises(ValueError, match="rows \\[1\\] have none"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_position_weights_hand_checked():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1]])
    expected = torch.tensor(
        [[1 / 6, 2 / 6, 3 / 6, 0], [0, 0, 1 / 3, 2 / 3], [0, 1 / 6, 2 / 6, 3 / 6]]
    )
    torch.testing.assert_close(position_weights(mask), expected)


def test_pool_hand_checked_and_nan_safe_on_padding():
    hidden = torch.tensor(
        [
            [[1.0, 0.0], [3.0, 2.0], [float("nan"), 9.0]],
            [[float("nan"), 7.0], [2.0, 4.0], [4.0, 8.0]],
        ]
    )  # (B=2, T=3, D=2): row 0 right-padded, row 1 left-padded
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, 1.0], [3.0, 6.0]]))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.tensor([[3.0, 2.0], [4.0, 8.0]]))
    torch.testing.assert_close(pool(hidden, mask, "eos"), torch.tensor([[3.0, 2.0], [4.0, 8.0]]))
    # weights 1/3, 2/3
    torch.testing.assert_close(
        pool(hidden, mask, "weighted_mean"),
        torch.tensor([[7 / 3, 4 / 3], [10 / 3, 20 / 3]]),
    )
    with pytest.raises(ValueError, match="valid poolings"):
        pool(hidden, mask, "max")


def _padded_batch(embedder, texts):
    return embedder.pad(embedder.token_ids(texts))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_is_padded_on_the_requested_side(tiny_lm, side):
    model, tokenizer = tiny_lm
    embedder = LMEmbedder(model, tokenizer, padding_side=side)
    _, mask = _padded_batch(embedder, TEXTS)
    short = mask.sum(1) < mask.shape[1]
    assert short.any()
    column = 0 if side == "left" else -1
    assert (mask[short, column] == 0).all() and (mask[~short, column] == 1).all()


@pytest.mark.parametrize("prompt", [None, "prompteol"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_causal_lm_left_and_right_padding_equal_the_unpadded_reference(tiny_lm, pooling, prompt):
    model, tokenizer = tiny_lm
    reference = torch.stack([naive_embedding(model, tokenizer, t, pooling, prompt) for t in TEXTS])
    for side in ("left", "right"):
        embedder = LMEmbedder(
            model, tokenizer, pooling=pooling, prompt=prompt, normalize=False, padding_side=side
        )
        got = embedder.encode(TEXTS, batch_size=len(TEXTS))
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-4, msg=f"{side} padding")
    # normalize=True: the same directions, unit length
    unit = LMEmbedder(model, tokenizer, pooling=pooling, prompt=prompt).encode(TEXTS)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(
        unit, torch.nn.functional.normalize(reference, dim=-1), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("pooling", POOLINGS)
def test_encoder_with_absolute_positions_left_padding_matches(tiny_bert, pooling):
    """BERT's learned absolute positions: left padding is only right when position_ids are
    derived from the mask."""
    model, tokenizer = tiny_bert
    reference = torch.stack([naive_embedding(model, tokenizer, t, pooling) for t in TEXTS])
    for side in ("left", "right"):
        embedder = LMEmbedder(model, tokenizer, pooling=pooling, normalize=False, padding_side=side)
        got = embedder.encode(TEXTS, batch_size=len(TEXTS))
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-4, msg=f"{side} padding")


def test_eos_is_appended_to_a_causal_lm_but_not_doubled_on_bert(tiny_lm, tiny_bert):
    model, tokenizer = tiny_lm
    ids = LMEmbedder(model, tokenizer, pooling="eos").token_ids(["A red circle."])[0]
    assert ids == [*tokenizer("A red circle.")["input_ids"], tokenizer.eos_token_id]
    bert, bert_tok = tiny_bert
    ids = LMEmbedder(bert, bert_tok, pooling="eos").token_ids(["A red circle."])[0]
    assert ids == bert_tok("A red circle.")["input_ids"] and ids[-1] == bert_tok.sep_token_id


def test_prompteol_reads_the_last_token_of_the_template(tiny_lm):
    model, tokenizer = tiny_lm
    assert format_prompt("A cat.", "prompteol") == 'This sentence : "A cat." means in one word:"'
    embedder = LMEmbedder(model, tokenizer, pooling="last", prompt="prompteol", normalize=False)
    ids = embedder.token_ids(["A cat."])[0]
    assert ids == tokenizer(PROMPTEOL.replace("{text}", "A cat."))["input_ids"]
    assert tokenizer.decode(ids).endswith('means in one word:"')
    with torch.no_grad():
        h = model.base_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    torch.testing.assert_close(embedder.encode(["A cat."])[0], h.hidden_states[-1][0, -1])
    # not the state of the text's own last token
    text_ids = tokenizer("A cat.")["input_ids"]
    plain = LMEmbedder(model, tokenizer, pooling="last", normalize=False).encode(["A cat."])[0]
    assert len(text_ids) < len(ids) and not torch.allclose(plain, h.hidden_states[-1][0, -1])


def test_truncation_cuts_the_text_and_keeps_the_template_end(tiny_lm):
    model, tokenizer = tiny_lm
    overhead = len(tokenizer(PROMPTEOL.replace("{text}", ""))["input_ids"])
    embedder = LMEmbedder(
        model, tokenizer, pooling="last", prompt="prompteol", max_length=overhead + 5
    )
    long_text = " ".join(["the circle is red and the square is blue"] * 20)
    ids = embedder.token_ids([long_text])[0]
    assert len(ids) <= overhead + 5
    assert tokenizer.decode(ids).endswith('" means in one word:"')
    assert tokenizer.decode(ids).startswith('This sentence : "the c')
    with pytest.raises(ValueError, match="leaves no room for text"):
        LMEmbedder(model, tokenizer, prompt="prompteol", max_length=overhead)


def test_layer_selects_that_hidden_state(tiny_lm):
    model, tokenizer = tiny_lm
    got = LMEmbedder(model, tokenizer, layer=1, normalize=False).encode(TEXTS)
    ref = torch.stack([naive_embedding(model, tokenizer, t, "mean", layer=1) for t in TEXTS])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    last = LMEmbedder(model, tokenizer, normalize=False).encode(TEXTS)
    assert not torch.allclose(got, last)
    layers = LMEmbedder(model, tokenizer).encode_layers(TEXTS)  # (L + 1, N, D)
    assert layers.shape == (
        model.config.num_hidden_layers + 1,
        len(TEXTS),
        model.config.hidden_size,
    )
    torch.testing.assert_close(layers[1], got)


def test_invalid_settings_raise_with_the_valid_choices(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="valid poolings"):
        LMEmbedder(model, tokenizer, pooling="cls")
    with pytest.raises(ValueError, match="containing '\\{text\\}'"):
        LMEmbedder(model, tokenizer, prompt="summarise this")
    with pytest.raises(ValueError, match="layer must be in"):
        LMEmbedder(model, tokenizer, layer=7)
    with pytest.raises(ValueError, match="padding_side"):
        LMEmbedder(model, tokenizer, padding_side="middle")


# --------------------------------------------------------------------------------------------
# eval.embeddings pooling: metrics, STS pairs, the script


def test_mrr_hand_checked_with_pessimistic_ties():
    from eval.embeddings import mean_reciprocal_rank

    scores = [[0.9, 0.5, 0.1], [0.2, 0.8, 0.8], [0.3, 0.2, 0.1]]
    # ranks: 0; tie with a negative -> 1; 2
    assert mean_reciprocal_rank(scores, [0, 1, 2]) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_sts_gold_is_the_object_overlap():
    from eval.embeddings import names_an_object, object_overlap, sts_pairs

    a = frozenset({("red", "circle"), ("blue", "star"), ("white", "ring")})
    b = frozenset({("red", "circle"), ("blue", "square")})
    assert object_overlap(a, a) == 1.0
    assert object_overlap(a, b) == pytest.approx(1 / 4)
    assert object_overlap(a, frozenset({("red", "star")})) == 0.0
    assert names_an_object("There are two red circles.", a)
    assert not names_an_object("There is a circle and a star.", a)
    assert not names_an_object("A blue circle.", a)
    pairs = sts_pairs(n_scenes=40, per_stratum=6, seed=0)
    by = {s: [p for p in pairs if p.stratum == s] for s in ("same", "overlap", "disjoint")}
    assert all(len(v) == 6 for v in by.values())
    assert all(p.gold == 1.0 and p.a != p.b for p in by["same"])
    assert all(0 < p.gold <= 1 for p in by["overlap"]) and all(p.gold == 0 for p in by["disjoint"])


def test_pooling_script_matches_the_embedder(tiny_lm, tmp_path):
    from eval.embeddings import encode_methods, main

    model, tokenizer = tiny_lm
    base = LMEmbedder(model, tokenizer, max_length=64)
    shared = encode_methods(
        base, ["mean", "last", "weighted_mean", "eos", "prompteol"], TEXTS, 2, "t"
    )
    for method, (pooling, prompt) in {
        "weighted_mean": ("weighted_mean", None),
        "eos": ("eos", None),
        "prompteol": ("last", "prompteol"),
    }.items():
        alone = LMEmbedder(model, tokenizer, pooling=pooling, prompt=prompt, max_length=64)
        torch.testing.assert_close(shared[method], alone.encode(TEXTS), atol=1e-5, rtol=1e-4)

    argv = ["pooling", "--model", "tiny-random-llama", "--passages", "8", "--sts-scenes", "20"]
    assert main([*argv, "--sts-pairs", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "embeddings_pooling_tiny-random-llama.json").read_text())
    assert [r["method"] for r in result["rows"]] == [
        "mean",
        "last",
        "weighted_mean",
        "eos",
        "prompteol",
    ]
    assert result["passages"] == 8 and result["queries"] == 16 and result["sts_pairs"] == 12
    for row in result["rows"]:
        assert 0 <= row["title_recall@1"] <= row["title_recall@10"] <= 1
        assert 0 < row["sentence_mrr"] <= 1 and -1 <= row["sts_spearman"] <= 1
    assert "| prompteol |" in (tmp_path / "embeddings_pooling_tiny-random-llama.md").read_text()
