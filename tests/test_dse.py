"""DSE (lm.embeddings.dse): the KL distillation loss against a hand-computed case, the scorers on a
tiny random BERT, the ShapeWorld candidate lists, and train.dse end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel

from lm.embeddings.dse import (
    BiEncoder,
    CrossEncoder,
    candidate_accuracy,
    distillation_kl,
    label_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distillation_kl_hand_computed():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    T = 2.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    rows = []
    for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
        ps, pt = softmax(s), softmax(t)
        rows.append(sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True)))
    expected = T**2 * sum(rows) / len(rows)
    assert float(distillation_kl(student, teacher, T)) == pytest.approx(expected, rel=1e-6)


def test_distillation_kl_is_zero_when_the_student_equals_the_teacher():
    teacher = torch.randn(4, 6)
    assert float(distillation_kl(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-6)
    # softmax ignores a per-query shift: the student only has to match the distribution
    shifted = teacher + torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    assert float(distillation_kl(shifted, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_kl(torch.randn(4, 6), teacher)) > 0.01
    # the gradient reaches the student only
    s, t = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    distillation_kl(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="one shape"):
        distillation_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="C >= 2"):
        distillation_kl(torch.zeros(2, 1), torch.zeros(2, 1))


def test_label_loss_and_accuracy_hand_computed():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    positives = torch.tensor([0, 2])
    z0 = math.log(math.exp(2) + 1 + math.exp(1))
    z1 = math.log(1 + 2 * math.exp(1))
    expected = ((z0 - 2) + (z1 - 1)) / 2
    assert float(label_loss(scores, positives)) == pytest.approx(expected, rel=1e-6)
    # query 1's positive ties with a negative: a miss
    assert candidate_accuracy(scores, positives) == 0.5
    assert candidate_accuracy(scores, torch.tensor([0, 1])) == 0.5
    assert candidate_accuracy(torch.tensor([[0.0, 3.0]]), torch.tensor([1])) == 1.0


# --------------------------------------------------------------------------------------------
# The scorers on a tiny random BERT


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from lm.loading import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("tiny_bert_dse")
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


QUERIES = ["the red circle", "a blue star is left of a green square"]
LISTS = [
    ("a red circle and a blue star", "a green circle", "two red squares"),
    ("a blue star and a green square", "a green star and a blue square", "a red ring"),
]


def test_scorers_score_each_pair_as_if_alone(tiny_bert_dir):
    teacher = CrossEncoder.from_source(str(tiny_bert_dir), max_length=48, num_layers=2).eval()
    student = BiEncoder.from_source(str(tiny_bert_dir), max_length=48, num_layers=2).eval()
    assert teacher.model.config.num_hidden_layers == 2
    with torch.no_grad():
        t = teacher.score(QUERIES, LISTS, batch_size=4)  # batches cut across queries
        s = student.score(QUERIES, LISTS)
    assert t.shape == s.shape == (2, 3)
    with torch.no_grad():
        alone = teacher(**teacher.tokenize([QUERIES[1]], [LISTS[1][2]]))
        q = student.embed([QUERIES[1]])
        c = student.embed([LISTS[1][2]])
    torch.testing.assert_close(t[1, 2], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s[1, 2], 20.0 * (q @ c.T)[0, 0], atol=1e-5, rtol=1e-4)
    assert float(s.abs().max()) <= 20.0 + 1e-4
    with pytest.raises(ValueError, match="candidate lists of one length"):
        student.score(QUERIES, [LISTS[0], LISTS[1][:2]])


def test_distillation_moves_the_student_towards_the_teacher(tiny_bert_dir):
    torch.manual_seed(0)
    student = BiEncoder.from_source(str(tiny_bert_dir), max_length=48, num_layers=2, scale=5.0)
    teacher = torch.tensor([[4.0, 0.0, -1.0], [-2.0, 0.0, 3.0]])  # any fixed scores
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = distillation_kl(student.score(QUERIES, LISTS), teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        assert student.eval().score(QUERIES, LISTS).argmax(-1).tolist() == [0, 2]


# --------------------------------------------------------------------------------------------
# Data and the script


def test_candidate_lists_have_exactly_one_fitting_description():
    from train.dse import build_items, mentions

    assert mentions("Two orange crescents and a red circle.") == {
        ("orange", "crescent"),
        ("red", "circle"),
    }
    assert mentions("the red shape") == frozenset()
    items, stats = build_items("test", 40, 6, 3, seed=0)
    assert stats["queries"] == len(items) > 20
    for it in items:
        assert len(it.candidates) == 6 and len(set(it.candidates)) == 6
        named = mentions(it.query)
        assert named
        fits = [i for i, c in enumerate(it.candidates) if named <= mentions(c)]
        assert fits == [it.positive], (it.query, it.candidates)
    assert len({it.positive for it in items}) > 3  # the positive's slot is drawn


def _dse(tiny_bert_dir, out, *extra):
    from train.dse import main

    argv = [
        "--model", str(tiny_bert_dir), "--layers", "2", "--train-scenes", "30",
        "--eval-scenes", "12", "--candidates", "4", "--hard", "2", "--teacher-steps", "3",
        "--student-steps", "3", "--teacher-batch", "4", "--student-batch", "4",
        "--max-length", "48", "--speed-repeats", "2", "--speed-queries", "5", "--out", str(out),
    ]  # fmt: skip
    assert main([*argv, *extra]) == 0


def test_script_runs_in_parts_and_reports(tiny_bert_dir, tmp_path):
    _dse(tiny_bert_dir, tmp_path, "--stop-after", "teacher")
    assert (tmp_path / "stages" / "teacher" / "manifest.json").is_file()
    assert not (tmp_path / "dse.json").exists()
    _dse(tiny_bert_dir, tmp_path, "--resume")
    result = json.loads((tmp_path / "dse.json").read_text())
    assert result["stages"]["teacher"]["resumed"] is True
    assert result["stages"]["student_kl"]["resumed"] is False
    assert len(result["commands"]) == 2
    assert set(result["accuracy"]) == {"teacher", "student_kl", "student_label", "student_init"}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
    sp = result["speed"]
    assert sp["pairs"] == min(5, result["data"]["test"]["queries"]) * 4
    assert sp["speedup_bi"] == pytest.approx(
        sp["median_seconds"]["cross"] / sp["median_seconds"]["bi"]
    )
    assert len(sp["seconds"]["cross"]) == 2
    assert (tmp_path / "dse.md").is_file() and (tmp_path / "dse.png").is_file()


def test_script_prints_help(capsys):
    from train.dse import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--teacher-steps" in capsys.readouterr().out
