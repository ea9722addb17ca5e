"""DupMAE / RetroMAE (lm.embeddings.dupmae): decoder visibility masks, the bag-of-words loss against
a hand-computed case, what the decoder can read, the objectives' terms, and train.dupmae on a tiny
random BERT (loss goes down, resume equals an uninterrupted run)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from lm.embeddings.dupmae import (
    DupMAEConfig,
    DupMAEModel,
    bag_of_words_loss,
    bag_of_words_target,
    decoder_visibility,
    mask_batch,
    ordinary_token_mask,
    ot_embedding,
)
from lm.loading import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm-l6")


def tiny_mlm(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_bert_mlm")
    tiny_mlm(tokenizer).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


TEXTS = ["A red circle left of a blue star.", "The assert statement inserts debugging checks."]


# --------------------------------------------------------------------------------------------
# Masks and targets


def test_visibility_hides_each_rows_own_token_and_always_shows_cls():
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0  # padding
    vis = decoder_visibility(mask, 0.5, torch.Generator().manual_seed(0))
    assert vis.shape == (3, 40, 40) and vis.dtype == torch.bool
    rows = torch.arange(1, 40)
    assert not vis[:, rows, rows].any()  # never its own token
    assert vis[:, :, 0].all()  # the [CLS] slot, for every row
    assert not vis[1, :, 25:].any()  # padding is never context
    # the rest is a fresh draw per row at the requested ratio
    free = vis[0, 1:, 1:][~torch.eye(39, dtype=torch.bool)].float()
    assert 0.4 < float(free.mean()) < 0.6
    assert not torch.equal(vis[0, 5], vis[0, 6])
    again = decoder_visibility(mask, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(vis, again)
    sparse = decoder_visibility(mask, 0.9, torch.Generator().manual_seed(0))
    assert float(sparse[0, 1:, 1:].float().mean()) < 0.15
    with pytest.raises(ValueError, match="real \\[CLS\\]"):
        decoder_visibility(torch.tensor([[0, 1, 1]]), 0.5)


def test_bag_of_words_loss_hand_computed():
    # vocabulary of 5; id 0 = [PAD], 1 = [CLS], 2 = [SEP]; one text "[CLS] 3 4 3 [SEP] [PAD]"
    ids = torch.tensor([[1, 3, 4, 3, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    ordinary = ordinary_token_mask(ids, mask, [0, 1, 2])
    assert ordinary.tolist() == [[False, True, True, True, False, False]]
    target = bag_of_words_target(ids, ordinary, 5)
    assert target.tolist() == [[0.0, 0.0, 0.0, 0.5, 0.5]]  # distinct tokens, uniform
    logits = torch.tensor(
        [
            [
                [9.0, 9.0, 9.0, 9.0, 9.0],  # [CLS]: not pooled
                [0.0, 1.0, 0.0, 2.0, -1.0],
                [0.5, -2.0, 1.0, 0.0, 3.0],
                [-1.0, 0.0, 0.0, 1.0, 0.0],
                [9.0, 9.0, 9.0, 9.0, 9.0],  # [SEP]
                [9.0, 9.0, 9.0, 9.0, 9.0],  # padding
            ]
        ]
    )
    ot = ot_embedding(logits, ordinary)
    assert ot.tolist() == [[0.5, 1.0, 1.0, 2.0, 3.0]]  # max over the three ordinary tokens
    log_z = math.log(sum(math.exp(v) for v in (0.5, 1.0, 1.0, 2.0, 3.0)))
    expected = -(0.5 * (2.0 - log_z) + 0.5 * (3.0 - log_z))
    assert float(bag_of_words_loss(ot, target)) == pytest.approx(expected, rel=1e-6)
    # a perfect OT (all mass on the bag) beats a wrong one
    good = torch.tensor([[-9.0, -9.0, -9.0, 5.0, 5.0]])
    bad = torch.tensor([[5.0, 5.0, 5.0, -9.0, -9.0]])
    assert float(bag_of_words_loss(good, target)) < math.log(2) + 1e-3
    assert float(bag_of_words_loss(bad, target)) > 10
    with pytest.raises(ValueError, match="at least one ordinary token"):
        bag_of_words_target(ids, torch.zeros_like(ordinary), 5)


def test_mask_batch_masks_only_ordinary_tokens(tokenizer):
    cfg = DupMAEConfig(encoder_mask_ratio=0.5, max_length=32)
    model = DupMAEModel.build(tiny_mlm(tokenizer), tokenizer, cfg)
    ids, mask = model.tokenize(TEXTS)
    batch = mask_batch(ids, mask, tokenizer, cfg, torch.Generator().manual_seed(0))
    ordinary = ordinary_token_mask(ids, mask, tokenizer.all_special_ids)
    masked = batch.encoder_labels != -100
    assert masked.any() and not (masked & ~ordinary).any()
    assert torch.equal(batch.encoder_labels[masked], ids[masked])
    assert torch.equal(batch.encoder_input_ids[~masked], ids[~masked])
    assert (batch.encoder_input_ids[masked] == tokenizer.mask_token_id).float().mean() > 0.5
    assert torch.equal(batch.decoder_labels[ordinary], ids[ordinary])
    assert (batch.decoder_labels[~ordinary] == -100).all()
    torch.testing.assert_close(batch.bow_target.sum(-1), torch.ones(2))
    again = mask_batch(ids, mask, tokenizer, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(batch.encoder_input_ids, again.encoder_input_ids)


# --------------------------------------------------------------------------------------------
# The decoder and the objectives


def test_decoder_row_reads_cls_and_its_visible_context_only(tokenizer):
    cfg = DupMAEConfig(max_length=32)
    model = DupMAEModel.build(tiny_mlm(tokenizer), tokenizer, cfg).eval()
    ids, mask = model.tokenize(TEXTS[:1])
    T = ids.shape[1]
    vis = decoder_visibility(mask, 0.5, torch.Generator().manual_seed(1))
    emb = model.mlm.bert.embeddings

    def decode(input_ids, cls_state):
        query = emb(inputs_embeds=cls_state[:, None, :].expand(1, T, -1))
        context = torch.cat([cls_state[:, None, :], emb(input_ids=input_ids)[:, 1:]], dim=1)
        return model.decoder(query, context, vis)

    cls_state = torch.randn(1, 32)
    with torch.no_grad():
        base = decode(ids, cls_state)
        i = 4
        changed = ids.clone()
        changed[0, i] = 2000  # row i's own token
        out = decode(changed, cls_state)
        torch.testing.assert_close(out[0, i], base[0, i])  # row i cannot read it
        readers = vis[0, :, i].nonzero().flatten()
        assert len(readers) and not torch.allclose(out[0, readers], base[0, readers])
        other = decode(ids, cls_state + 1.0)
        assert not torch.isclose(other[0, 1:], base[0, 1:]).all(-1).any()  # [CLS] reaches all


def test_objectives_sum_their_terms(tokenizer):
    ids_mask = None
    totals = {}
    for objective in ("dupmae", "retromae", "mlm"):
        cfg = DupMAEConfig(objective=objective, decoder_weight=0.7, bow_weight=0.3, max_length=32)
        model = DupMAEModel.build(tiny_mlm(tokenizer), tokenizer, cfg).eval()
        ids_mask = ids_mask or model.tokenize(TEXTS)
        batch = mask_batch(*ids_mask, tokenizer, cfg, torch.Generator().manual_seed(0))
        out = model(batch)
        terms = {k: float(v) for k, v in out.terms.items()}
        expected = {"dupmae": {"mlm", "decoder", "bow"}, "retromae": {"mlm", "decoder"}}
        assert set(terms) == expected.get(objective, {"mlm"})
        total = terms["mlm"] + 0.7 * terms.get("decoder", 0) + 0.3 * terms.get("bow", 0)
        assert float(out.loss.detach()) == pytest.approx(total, rel=1e-5)
        totals[objective] = terms
        out.loss.backward()
        word = model.mlm.bert.embeddings.word_embeddings.weight
        assert word.grad is not None and word.grad.abs().sum() > 0
        if model.decoder is not None:
            assert model.decoder.attention.in_proj_weight.grad.abs().sum() > 0
    # same init, same masks: the shared MLM term agrees
    assert totals["dupmae"]["mlm"] == pytest.approx(totals["mlm"]["mlm"], rel=1e-5)
    assert model.decoder is None
    with pytest.raises(ValueError, match="needs decoder"):
        DupMAEModel(tiny_mlm(tokenizer), None, tokenizer, DupMAEConfig())
    with pytest.raises(ValueError, match="objective must be one of"):
        DupMAEConfig(objective="bert")


def test_encode_views(tokenizer):
    model = DupMAEModel.build(tiny_mlm(tokenizer), tokenizer, DupMAEConfig(max_length=32))
    views = model.encode_views([*TEXTS, "x"], batch_size=2)
    assert views["cls"].shape == (3, 32) and views["ot"].shape == (3, tokenizer.vocab_size)
    for v in views.values():
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    assert (views["ot"] >= 0).all()
    # one text alone gives the same [CLS] embedding as in a padded batch
    torch.testing.assert_close(model.encode(TEXTS[:1], "cls")[0], views["cls"][0])
    assert model.training  # the mode is restored


# --------------------------------------------------------------------------------------------
# train.dupmae


def _train(tiny_bert_dir, out, objective, steps, *extra):
    from train.dupmae import main

    argv = [
        "--model", str(tiny_bert_dir), "--objective", objective, "--max-length", "32",
        "--batch-size", "8", "--steps", str(steps), "--lr", "2e-3", "--save-every", "5",
        "--eval-batch-size", "64", "--eval-max-length", "48", "--out", str(out),
    ]  # fmt: skip
    assert main([*argv, *extra]) == 0


def test_pretraining_lowers_the_loss_and_resumes_exactly(tiny_bert_dir, tmp_path):
    _train(tiny_bert_dir, tmp_path / "a", "dupmae", 10)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    first, last = report["train"][0], report["train"][-1]
    assert {"mlm", "decoder", "bow"} <= set(first)
    for term in ("mlm", "decoder", "bow"):
        assert last[term] < first[term] - 0.05, term
    assert set(report["after"]["views"]) == {"cls", "mean", "ot", "cls+ot"}
    assert report["after"]["passages"] == report["before"]["passages"] > 10
    r = report["after"]["views"]["cls"]["all"]
    assert 0 <= r["recall@1"] <= r["recall@10"] <= 1
    assert (tmp_path / "a" / "report.md").is_file() and (
        tmp_path / "a" / "loss_curve.png"
    ).is_file()

    _train(tiny_bert_dir, tmp_path / "b", "dupmae", 10, "--stop-at", "5")
    assert not (tmp_path / "b" / "final").exists()
    _train(tiny_bert_dir, tmp_path / "b", "dupmae", 10, "--resume")
    a = DupMAEModel.from_pretrained(tmp_path / "a" / "final")
    b = DupMAEModel.from_pretrained(tmp_path / "b" / "final")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)
    rb = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [x["loss"] for x in rb["train"]] == pytest.approx([x["loss"] for x in report["train"]])
    assert len(rb["commands"]) == 2
    # the saved model encodes as the trained one did
    torch.testing.assert_close(a.encode(TEXTS, "cls+ot"), b.encode(TEXTS, "cls+ot"))


def test_mlm_baseline_has_no_decoder(tiny_bert_dir, tmp_path):
    _train(tiny_bert_dir, tmp_path / "mlm", "mlm", 2)
    model = DupMAEModel.from_pretrained(tmp_path / "mlm" / "final")
    assert model.decoder is None and model.config.objective == "mlm"
    assert not (tmp_path / "mlm" / "final" / "decoder").exists()


def test_heldout_set_and_metrics_agree_with_eval_embeddings():
    """train.dupmae keeps its own copy (train may not import eval); it must not drift."""
    import numpy as np

    from data.text_corpora import pydoc_passages
    from eval.embeddings import mean_reciprocal_rank, retrieval_set
    from eval.metrics import recall_at_k
    from train.dupmae import heldout_retrieval_set, ranking_metrics
    from train.embeddings import heldout_topics

    held = set(heldout_topics([p.topic for p in pydoc_passages()], 2))
    ref = retrieval_set(pydoc_passages(), held)
    assert heldout_retrieval_set(held) == (ref.passages, ref.queries, ref.kinds, ref.positives)
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 30)).astype(float)  # many ties
    positives = rng.integers(0, 30, size=50)
    ours = ranking_metrics(scores, positives)
    recall = recall_at_k(scores, positives, ks=(1, 10))
    assert ours["recall@1"] == pytest.approx(recall[1])
    assert ours["recall@10"] == pytest.approx(recall[10])
    assert ours["mrr"] == pytest.approx(mean_reciprocal_rank(scores, positives))
    # by hand: the positive ties with one item and sits below another -> rank 2
    hand = ranking_metrics(np.array([[3.0, 2.0, 2.0, 1.0]]), np.array([1]), prefix="acc")
    assert hand == {"acc@1": 0.0, "acc@10": 1.0, "mrr": pytest.approx(1 / 3)}


def test_positions_beyond_the_model_are_refused(tokenizer):
    model = DupMAEModel.build(tiny_mlm(tokenizer), tokenizer, DupMAEConfig(max_length=32))
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        model.encode(TEXTS, max_length=128)


def test_script_prints_help(capsys):
    from train.dupmae import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--objective" in capsys.readouterr().out
