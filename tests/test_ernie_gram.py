"""ERNIE-Gram: t-test lexicon, explicit n-gram masking, generator samples, losses on a tiny BERT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from lm.objectives import (
    IGNORE_INDEX,
    ErnieGramCollator,
    ErnieGramConfig,
    ErnieGramForPretraining,
    NGramLexicon,
    build_ngram_lexicon,
    ngram_t_scores,
    sample_from_logits,
)

PAD, MASK, EOS = 0, 1, 2
V = 40  # fine vocabulary of the tiny models


# Tiny models on a shared 2-core machine: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Lexicon


def test_t_scores_on_a_hand_computed_corpus():
    # "a b a b c": N = 5; p(a) = p(b) = 0.4, p(c) = 0.2
    corpus = [[1, 2, 1, 2, 3]]
    t2 = ngram_t_scores(corpus, 2, min_count=1)
    # t(a b) = (2/5 - 0.4 * 0.4) / sqrt((2/5) / 5) = 0.24 / 0.28284
    assert t2 == pytest.approx({(1, 2): 0.24 / math.sqrt(0.08), (2, 1): 0.2, (2, 3): 0.6})
    t3 = ngram_t_scores(corpus, 3, min_count=1)
    # t(a b a) = (0.2 - 0.4^3) / sqrt(0.2 / 5) = 0.136 / 0.2; t(a b c) = (0.2 - 0.032) / 0.2
    assert t3 == pytest.approx({(1, 2, 1): 0.68, (2, 1, 2): 0.68, (1, 2, 3): 0.84})
    assert ngram_t_scores(corpus, 2, min_count=2) == pytest.approx({(1, 2): 0.848528137})


def test_t_scores_never_cross_documents_and_skip_excluded_ids():
    t = ngram_t_scores([[1, 2], [1, 2, 3]], 2, min_count=1)
    assert set(t) == {(1, 2), (2, 3)}  # no (2, 1) across the document boundary
    # N = 5 tokens: t(1 2) = (2/5 - 0.4 * 0.4) / sqrt(0.4 / 5)
    assert t[(1, 2)] == pytest.approx(0.24 / math.sqrt(0.08))
    assert set(ngram_t_scores([[3, 4, EOS, 3, 4]], 2, 1, exclude_ids=[EOS])) == {(3, 4)}


def test_lexicon_recovers_planted_ngrams():
    rng = np.random.default_rng(0)
    vocab = 100
    bigrams = [tuple(rng.choice(vocab, 2, replace=False).tolist()) for _ in range(6)]
    trigrams = [tuple(rng.choice(vocab, 3, replace=False).tolist()) for _ in range(6)]
    docs = []
    for _ in range(200):  # 200 documents of uniform noise with planted phrases
        doc = rng.integers(0, vocab, 100).tolist()
        for phrase in [bigrams[rng.integers(6)], trigrams[rng.integers(6)]]:
            at = int(rng.integers(0, len(doc)))
            doc[at:at] = list(phrase)
        docs.append(doc)
    truth2 = set(bigrams) | {g[i : i + 2] for g in trigrams for i in (0, 1)}
    k2 = len(truth2)
    lex2 = build_ngram_lexicon(docs, top_k=k2, max_n=2)
    precision2 = len(set(lex2.ngrams) & truth2) / k2
    lex3 = build_ngram_lexicon(docs, top_k=6, max_n=3)
    found3 = {g for g in lex3.ngrams if len(g) == 3}
    precision3 = len(found3 & set(trigrams)) / 6
    assert precision2 >= 0.9, (precision2, lex2.ngrams)
    assert precision3 == 1.0, found3
    assert list(lex3.scores[:6]) == sorted(lex3.scores[:6], reverse=True)
    assert lex3.max_n == 3 and len(lex3) == 12


def test_lexicon_save_and_load(tmp_path):
    lex = NGramLexicon(((3, 4), (5, 6, 7)), (2.5, 1.0))
    lex.save(tmp_path / "lex.json")
    again = NGramLexicon.load(tmp_path / "lex.json")
    assert again == lex and again.index[(5, 6, 7)] == 1


# ----------------------------------------------------------------------------------------------
# Explicit n-gram masking


def collator(mask_ratio: float = 0.5) -> ErnieGramCollator:
    lex = NGramLexicon(((6, 7, 8), (9, 10)))
    return ErnieGramCollator(
        lex, vocab_size=20, mask_token_id=MASK, pad_token_id=PAD, mask_ratio=mask_ratio
    )


def test_segmentation_is_greedy_longest_match():
    c = collator()
    # 5 | 6 7 8 | 9 10 | 11  (units (start, n))
    assert c.segment([5, 6, 7, 8, 9, 10, 11]) == [(0, 1), (1, 3), (4, 2), (6, 1)]
    assert c.segment([6, 7, 9, 10, 6, 7, 8]) == [(0, 1), (1, 1), (2, 2), (4, 3)]
    assert c.segment([6, 7, PAD, 8]) == [(0, 1), (1, 1), (2, 1), (3, 1)]


def test_ngram_masking_collapse_and_alignment_hand_example():
    c = collator(mask_ratio=0.5)  # 7 tokens: a budget of int(3.5) = 3 masked tokens
    ids = [5, 6, 7, 8, 9, 10, 11]
    # seed 1 draws the trigram first (3 tokens: the budget is full)
    e = c.mask_sequence(ids, torch.Generator().manual_seed(1))
    assert e.input_ids == [5, MASK, 9, 10, 11]  # 7 -> 5 positions: one [MASK] per n-gram
    assert e.position_ids == [0, 1, 4, 5, 6]  # the [MASK] takes the n-gram's first position
    assert e.source_index == [0, 1, 4, 5, 6]
    assert e.slots == [1]
    assert e.coarse_labels == [20 + 0]  # V + lexicon id of (6, 7, 8)
    assert e.fine_labels == [[6, 7, 8]]
    # seed 3 draws the bigram (9, 10), then the single token 11
    e = c.mask_sequence(ids, torch.Generator().manual_seed(3))
    assert e.input_ids == [5, 6, 7, 8, MASK, MASK]
    assert e.position_ids == [0, 1, 2, 3, 4, 6]
    assert e.slots == [4, 5]
    assert e.coarse_labels == [20 + 1, 11]  # a bigram in V + K; a single token is its own id
    assert e.fine_labels == [[9, 10, IGNORE_INDEX], [11, IGNORE_INDEX, IGNORE_INDEX]]


def test_masking_expands_back_to_the_original_and_respects_the_budget():
    rng = np.random.default_rng(0)
    lex = NGramLexicon(((6, 7, 8), (9, 10), (11, 12), (4, 5, 6)))
    c = ErnieGramCollator(lex, 20, MASK, PAD, mask_ratio=0.15, protected_ids=[EOS])
    for seed in range(40):
        ids = rng.choice([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, EOS], size=40).tolist()
        e = c.mask_sequence(ids, torch.Generator().manual_seed(seed))
        rebuilt = list(e.input_ids)
        for slot, fine in sorted(zip(e.slots, e.fine_labels, strict=True), reverse=True):
            rebuilt[slot : slot + 1] = [t for t in fine if t != IGNORE_INDEX]
        assert rebuilt == ids  # the alignment: each [MASK] re-expands to its n tokens
        expanded_positions = []
        for k, p in enumerate(e.position_ids):
            n = (
                len([t for t in e.fine_labels[e.slots.index(k)] if t != -100])
                if k in e.slots
                else 1
            )
            expanded_positions += range(p, p + n)
        assert expanded_positions == list(range(40))
        masked_tokens = sum(sum(t != IGNORE_INDEX for t in f) for f in e.fine_labels)
        eligible = sum(t != EOS for t in ids)
        assert 1 <= masked_tokens <= max(1, int(0.15 * eligible))
        assert EOS not in [t for f in e.fine_labels for t in f]


def test_a_row_of_n_grams_longer_than_its_budget_still_masks_one_token():
    """6 tokens, two trigram units, budget max(1, int(0.15 x 6)) = 1: no unit fits, so one
    token of one trigram is masked alone (nothing was masked, and the losses were NaN)."""
    c = collator(mask_ratio=0.15)
    ids = [6, 7, 8, 6, 7, 8]
    for seed in range(5):
        e = c.mask_sequence(ids, torch.Generator().manual_seed(seed))
        assert len(e.slots) == 1 and e.input_ids.count(MASK) == 1
        token = e.fine_labels[0][0]
        assert e.coarse_labels == [token] and e.fine_labels[0][1:] == [IGNORE_INDEX] * 2
        rebuilt = list(e.input_ids)
        rebuilt[e.slots[0]] = token
        assert rebuilt == ids and e.position_ids == list(range(6))


def test_batch_flat_indices_point_at_the_masks():
    c = collator(mask_ratio=0.3)
    batch = c([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]], torch.Generator().manual_seed(0))
    T = batch.input_ids.shape[1]
    assert (batch.input_ids.flatten()[batch.masked_index] == MASK).all()
    assert int((batch.input_ids == MASK).sum()) == batch.masked_index.numel()
    assert batch.fine_labels.shape == (batch.masked_index.numel(), 3)
    assert batch.coarse_labels.shape == (batch.masked_index.numel(),)
    row1 = batch.attention_mask[1]
    L = int(row1.sum())  # right padding: tokens first, then zeros
    assert L < T and row1[:L].all() and not row1[L:].any()
    assert (batch.input_ids[batch.attention_mask == 0] == PAD).all()


# ----------------------------------------------------------------------------------------------
# The model: generator sampling, what the main encoder sees, losses


def tiny_bert(hidden: int = 32, layers: int = 2) -> BertModel:
    config = BertConfig(
        vocab_size=V,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    return BertModel(config)


def tiny_ernie(replace_prob: float = 0.5) -> tuple[ErnieGramForPretraining, ErnieGramCollator]:
    torch.manual_seed(0)
    lex = NGramLexicon(((6, 7, 8), (9, 10), (11, 12)))
    config = ErnieGramConfig(vocab_size=V, lexicon_size=len(lex), replace_prob=replace_prob)
    model = ErnieGramForPretraining(tiny_bert(), tiny_bert(hidden=16, layers=1), config)
    return model, ErnieGramCollator(lex, V, MASK, PAD, mask_ratio=0.3, protected_ids=[EOS])


def sequences(n: int = 8, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    phrases = [[6, 7, 8], [9, 10], [11, 12]]
    out = []
    for _ in range(n):
        seq: list[int] = []
        while len(seq) < 24:
            seq += phrases[rng.integers(3)] if rng.random() < 0.5 else [int(rng.integers(13, V))]
        out.append(seq[:24])
    return out


def test_sample_from_logits_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(20000, 5)
    samples = sample_from_logits(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(samples, minlength=5).float() / 20000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.012, rtol=0)
    again = sample_from_logits(logits, torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)  # a seeded generator fixes the samples


def test_generator_samples_are_what_the_main_encoder_sees():
    model, col = tiny_ernie(replace_prob=1.0)
    batch = col(sequences(4), torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = model.encoder.register_forward_pre_hook(grab, with_kwargs=True)
    # make the generator sure of one n-gram identity: every sample must be it
    target = V + 1  # the lexicon bigram (9, 10)
    with torch.no_grad():
        model.generator_head.decoder.bias[target] += 100.0
    out = model(**batch.model_inputs(), sample_generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert out.replaced.all()
    assert (out.sampled_ids == target).all()
    slots = seen["embeds"].flatten(0, 1)[batch.masked_index]
    torch.testing.assert_close(slots, model.ngram_embeddings.weight[1].expand_as(slots))
    # unmasked positions are the encoder's own token embeddings
    words = model.encoder.get_input_embeddings()(batch.input_ids).detach().flatten(0, 1)
    keep = torch.ones(words.shape[0], dtype=torch.bool)
    keep[batch.masked_index] = False
    torch.testing.assert_close(seen["embeds"].flatten(0, 1)[keep], words[keep])


def test_replace_prob_mixes_mask_and_samples_and_tokens_use_word_embeddings():
    model, col = tiny_ernie(replace_prob=0.5)
    batch = col(sequences(8), torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}
    handle = model.encoder.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"].detach()), with_kwargs=True
    )
    with torch.no_grad():
        model.generator_head.decoder.bias[20] += 100.0  # a plain token this time
    out = model(**batch.model_inputs(), sample_generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert out.replaced.any() and not out.replaced.all()
    slots = seen["embeds"].flatten(0, 1)[batch.masked_index]
    words = model.encoder.get_input_embeddings().weight.detach()
    torch.testing.assert_close(slots[out.replaced], words[20].expand_as(slots[out.replaced]))
    torch.testing.assert_close(slots[~out.replaced], words[MASK].expand_as(slots[~out.replaced]))


def test_main_losses_do_not_train_the_generator():
    model, col = tiny_ernie()
    batch = col(sequences(4), torch.Generator().manual_seed(0))
    out = model(**batch.model_inputs(), sample_generator=torch.Generator().manual_seed(0))
    (out.coarse_loss + out.fine_loss).backward()
    assert all(p.grad is None for p in model.generator.parameters())
    assert all(p.grad is None for p in model.generator_head.parameters())
    assert model.coarse_head.decoder.weight.grad is not None
    assert out.fine_logits.shape == (batch.masked_index.numel(), 3, V)
    assert out.coarse_logits.shape == (batch.masked_index.numel(), V + 3)


def test_coarse_and_fine_losses_finite_and_decreasing():
    model, col = tiny_ernie()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(30):
        gen = torch.Generator().manual_seed(step)
        batch = col(sequences(8, seed=step % 4), gen)
        out = model(**batch.model_inputs(), sample_generator=gen)
        assert all(torch.isfinite(x) for x in (out.coarse_loss, out.fine_loss, out.generator_loss))
        history.append([out.coarse_loss.item(), out.fine_loss.item(), out.generator_loss.item()])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    first, last = np.mean(history[:5], axis=0), np.mean(history[-5:], axis=0)
    assert (last < first - 0.3).all(), (first, last)


def test_config_validation():
    with pytest.raises(ValueError, match="replace_prob"):
        ErnieGramConfig(vocab_size=10, lexicon_size=2, replace_prob=1.5)
    model, col = tiny_ernie()
    batch = col(sequences(2), torch.Generator().manual_seed(0))
    inputs = batch.model_inputs()
    inputs["fine_labels"] = inputs["fine_labels"][:, :2]
    with pytest.raises(ValueError, match="fine_labels"):
        model(**inputs)
