"""bench/lm_experiments.py: the synthetic tasks are right by construction, the metrics match hand
computations, the span-masking collator masks what it says, and each subcommand's --quick run
writes sane JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench import lm_experiments as bench
from lm.objectives import IGNORE_INDEX, SpanMaskingCollator, span_mask_positions

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- metrics


def test_coefficient_of_variation_hand_computed():
    # mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    assert bench.coefficient_of_variation([1, 2, 3, 6]) == pytest.approx(math.sqrt(3.5) / 3)
    assert bench.coefficient_of_variation(torch.tensor([5, 5, 5, 5])) == 0.0
    # every token on the same k = 2 of E = 8 experts: sqrt(E / k - 1)
    assert bench.coefficient_of_variation([9, 9, 0, 0, 0, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    with pytest.raises(ValueError, match="zero"):
        bench.coefficient_of_variation([0, 0])


def test_mean_and_spread():
    out = bench.mean_and_spread([0.5, 0.7, 0.9])
    assert out["mean"] == pytest.approx(0.7)
    assert out["std"] == pytest.approx(0.2)
    assert (out["min"], out["max"]) == (0.5, 0.9)
    assert bench.mean_and_spread([0.3])["std"] == 0.0


# ---------------------------------------------------------------------------------- needle task


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_answers_are_right_by_construction(depth):
    task = bench.NeedleTask(num_keys=20, num_values=7)
    rows, answers, at = task.needle_rows(np.random.default_rng(0), 50, 9, depth)
    assert rows.shape == (50, 2 * 9 + 2)
    assert at == round(depth * 8)
    assert (rows[:, 0] == task.bos_id).all()
    for row, answer in zip(rows, answers, strict=True):
        keys, values, query = row[1:-1:2], row[2:-1:2], row[-1]
        assert len(set(keys.tolist())) == 9  # distinct keys: the query matches exactly one pair
        assert ((keys >= task.key_offset) & (keys < task.value_offset)).all()
        assert ((values >= task.value_offset) & (values < task.vocab_size)).all()
        assert (keys == query).sum() == 1 and keys[at] == query
        assert values[at] == answer


def test_training_rows_bind_each_key_to_one_value_and_mark_recallable_values():
    task = bench.NeedleTask(num_keys=30, num_values=5)
    rows = task.training_rows(np.random.default_rng(1), 20, 16)
    recall = task.recallable(rows)
    for row, rec in zip(rows, recall, strict=True):
        binding: dict[int, int] = {}
        for t in range(1, len(row), 2):
            k, v = int(row[t]), int(row[t + 1])
            assert binding.setdefault(k, v) == v  # a repeated key keeps its value
            assert rec[t + 1] == (row[1:t:2] == k).any()
        assert not rec[0::2][:1].any() and not rec[1::2].any()  # only value positions
    assert recall.any()


def test_needle_rows_reject_bad_arguments():
    task = bench.NeedleTask(num_keys=4)
    with pytest.raises(ValueError, match="depth"):
        task.needle_rows(np.random.default_rng(0), 1, 3, 1.5)
    with pytest.raises(ValueError, match="num_keys"):
        task.needle_rows(np.random.default_rng(0), 1, 5, 0.5)


# ---------------------------------------------------------------------------------- span masking


def test_span_masking_spans_are_contiguous_disjoint_and_spend_the_budget():
    eligible = torch.ones(200, dtype=torch.bool)
    eligible[50:60] = False
    gen = torch.Generator().manual_seed(0)
    spans = span_mask_positions(eligible, 0.15, p=0.2, max_span=10, generator=gen)
    assert sum(n for _, n in spans) == int(0.15 * 190)
    covered = torch.zeros(200, dtype=torch.bool)
    for start, n in spans:
        assert 1 <= n <= 10
        assert eligible[start : start + n].all()  # one contiguous run of eligible tokens
        assert not covered[start : start + n].any()  # disjoint
        covered[start : start + n] = True
    assert max(n for _, n in spans) > 1  # spans, not single tokens


def test_span_masking_collator_ratio_labels_and_token_mode():
    rows = torch.randint(4, 50, (64, 100), generator=torch.Generator().manual_seed(1))
    rows[:, :5] = 1  # protected
    span = SpanMaskingCollator(mask_token_id=3, pad_token_id=0, mask_ratio=0.15, protected_ids=[1])
    batch = span(rows, generator=torch.Generator().manual_seed(2))
    assert (batch.masked.sum(1) == int(0.15 * 95)).all()
    assert not batch.masked[:, :5].any()
    assert (batch.input_ids[batch.masked] == 3).all()
    assert torch.equal(batch.labels[batch.masked], rows[batch.masked])
    assert (batch.labels[~batch.masked] == IGNORE_INDEX).all()
    assert torch.equal(batch.input_ids[~batch.masked], rows[~batch.masked])

    # mean run length of masked tokens: spans (geometric, mean ~3.8 before the budget cut) vs
    # BERT token masking (runs only where independent picks happen to touch)
    def mean_run(masked: torch.Tensor) -> float:
        starts = masked[:, 1:] & ~masked[:, :-1]
        return float(masked.sum() / (starts.sum() + masked[:, 0].sum()))

    token = SpanMaskingCollator(3, 0, 0.15, [1], max_span=1)
    tok_batch = token(rows, generator=torch.Generator().manual_seed(2))
    assert (tok_batch.masked.sum(1) == int(0.15 * 95)).all()
    assert mean_run(batch.masked) > 2.5 > 1.5 > mean_run(tok_batch.masked)


# ---------------------------------------------------------------------------------- planted corpus


def test_planted_corpus_occurrences_point_at_planted_phrases():
    corpus = bench.PlantedCorpus(num_words=40, num_topics=3, doc_len=40, phrase_prob=0.2)
    phrases = corpus.phrases()
    assert [len(t) for t in phrases] == [6, 6, 6]
    planted = corpus.planted()
    assert len(planted[2]) == 9 and len(planted[3]) == 9
    docs, occurrences = corpus.documents(np.random.default_rng(0), 30)
    assert docs.shape == (30, 40)
    assert docs.min() >= corpus.word_offset and docs.max() < corpus.vocab_size
    assert sum(map(len, occurrences)) > 30
    for doc, occ in zip(docs, occurrences, strict=True):
        topics = {i for i, t in enumerate(phrases) for s, n in occ if tuple(doc[s : s + n]) in t}
        assert len(topics) <= 1 or not occ  # one topic per document
        for s, n in occ:
            assert tuple(doc[s : s + n].tolist()) in planted[n]


def test_lexicon_scores_find_strongly_planted_ngrams():
    corpus = bench.PlantedCorpus(num_words=60, num_topics=2, doc_len=64, phrase_prob=0.15)
    docs, _ = corpus.documents(np.random.default_rng(0), 300)
    scores = {(r["n"], r["size"]): r for r in bench.lexicon_scores(corpus, docs, [6, 18])}
    # 6 planted trigrams stand out among trigrams
    assert scores[3, 6]["precision"] == scores[3, 6]["recall"] == 1.0
    # among bigrams the 6 planted ones compete with the 12 halves of the planted trigrams,
    # which score as high: top 6 are all planted-or-halves, top 18 are exactly those
    assert scores[2, 6]["precision_with_sub_ngrams"] == 1.0
    assert scores[2, 18]["precision_with_sub_ngrams"] == scores[2, 18]["recall"] == 1.0
    assert scores[2, 18]["precision"] == pytest.approx(6 / 18)


# ---------------------------------------------------------------------------------- smoke runs


def _run(tmp_path, name, *extra):
    path = tmp_path / f"{name}.json"
    result = bench.main([name, "--quick", "--json", str(path), *extra])
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["experiment"] == name and saved["quick"] is True
    return saved


def test_meap_needle_quick(tmp_path):
    out = _run(tmp_path, "meap-needle", "--seeds", "0", "1")
    assert [(r["objective"], r["seed"]) for r in out["runs"]] == [
        ("ntp", 0), ("meap", 0), ("ntp", 1), ("meap", 1)
    ]  # fmt: skip
    cells = {"n=4,d=0", "n=4,d=1", "n=8,d=0", "n=8,d=1"}
    vocab = 3 + out["task"]["num_keys"] + out["task"]["num_values"]
    for r in out["runs"]:
        assert set(r["accuracy"]) == cells
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
        # untrained: the loss sits near log(vocab)
        assert abs(r["loss_all"] - math.log(vocab)) < 0.5
    acc = out["summary"]["ntp"]["accuracy"]["n=8,d=1"]
    vals = [r["accuracy"]["n=8,d=1"] for r in out["runs"] if r["objective"] == "ntp"]
    assert acc["mean"] == pytest.approx(np.mean(vals))


def test_moe_balance_quick(tmp_path):
    out = _run(tmp_path, "moe-balance", "--coefs", "0", "0.1")
    assert [r["aux_loss_coef"] for r in out["runs"]] == [0.0, 0.1]
    for r in out["runs"]:
        assert len(r["heldout_load"]) == len(r["heldout_cv_per_layer"]) == 2
        for load, cv in zip(r["heldout_load"], r["heldout_cv_per_layer"], strict=True):
            # k = 2 slots per held-out token, 4 rows x 32 tokens
            assert sum(load) == 2 * 4 * 32
            assert cv == pytest.approx(bench.coefficient_of_variation(load))
            assert 0 <= cv <= math.sqrt(4 / 2 - 1) + 1e-9
        assert r["heldout_cv_mean"] == pytest.approx(np.mean(r["heldout_cv_per_layer"]))
        assert r["heldout_aux_loss"] > 0.9  # E sum_e f_e P_e is ~1 or more (1 when uniform)


def test_ernie_masking_quick(tmp_path):
    out = _run(tmp_path, "ernie-masking")
    assert [r["method"] for r in out["runs"]] == ["ernie-gram", "span", "token"]
    for r in out["runs"]:
        assert r["examples"] > 0
        for key in ("whole_ngram", "token_accuracy", "whole_ngram_n2", "whole_ngram_n3"):
            assert 0 <= r[key] <= 1
        lo, hi = sorted([r["whole_ngram_n2"], r["whole_ngram_n3"]])
        assert lo - 1e-9 <= r["whole_ngram"] <= hi + 1e-9  # a mix of the two orders
    assert "whole_ngram_coarse" in out["runs"][0]
    for row in out["lexicon"]:
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1


def test_tnl_vs_softmax_quick(tmp_path, monkeypatch):
    # the bench runs `python -m train.pretrain_lm ARGS` in a subprocess (bench may not import
    # train); here the same argv goes to its main() in-process, which skips two interpreter starts
    from train import pretrain_lm

    def run_in_process(cmd, check, stdout):
        assert cmd[1:3] == ["-m", "train.pretrain_lm"] and check
        assert pretrain_lm.main(cmd[3:]) == 0

    monkeypatch.setattr(bench.subprocess, "run", run_in_process)
    out = _run(tmp_path, "tnl-vs-softmax", "--workdir", str(tmp_path / "runs"), "--gate-act",
               "identity")  # fmt: skip
    tnl, soft = out["runs"]
    # --gate-act reaches the TNL run (the paper's plain u) and only it
    saved = json.loads((tmp_path / "runs" / "tnl_seed0" / "final" / "config.json").read_text())
    assert saved["gate_act"] == "identity" and "--gate-act identity" in tnl["command"]
    assert "--gate-act" not in soft["command"]
    assert (tnl["arch"], soft["arch"]) == ("tnl", "softmax")
    assert tnl["parameters"] > soft["parameters"]  # the output gate u
    gap = out["comparison"][0]["relative_gap"]
    assert gap == pytest.approx((tnl["heldout_loss"] - soft["heldout_loss"]) / soft["heldout_loss"])
    assert (tmp_path / "runs" / "tnl_seed0" / "final").is_dir()


def test_help_lists_the_experiments(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in bench.EXPERIMENTS)
