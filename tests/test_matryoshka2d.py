"""2DMSE (lm.embeddings.matryoshka2d): each loss term against a hand-computed case, the sampling,
encode(layer, dim), and the train / grid scripts on a tiny random BERT."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from lm.embeddings import (
    LMEmbedder,
    Matryoshka2dConfig,
    Matryoshka2dEncoder,
    full_dim_loss,
    info_nce,
    kl_alignment,
    matryoshka_1d_loss,
    matryoshka_2d_loss,
    objective_loss,
    sample_layer_and_dim,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Plain-Python references


def ref_info_nce(q, p, scale):
    """Mean over queries of -log softmax(scale * cos(q_b, p_.))[b], with lists and math only."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    q, p = [unit(v) for v in q], [unit(v) for v in p]
    total = 0.0
    for b, qb in enumerate(q):
        logits = [scale * sum(x * y for x, y in zip(qb, pc, strict=True)) for pc in p]
        total += math.log(sum(math.exp(z) for z in logits)) - logits[b]
    return total / len(q)


def ref_kl(student, teacher, T):
    """T * mean over rows of KL(softmax(teacher / T) || softmax(student / T))."""

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    rows = []
    for s, t in zip(student, teacher, strict=True):
        ps, pt = softmax(s), softmax(t)
        rows.append(sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True)))
    return T * sum(rows) / len(rows)


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # cosines: [[1, 1/sqrt2], [0, 1/sqrt2]]; scale 2
    r2 = math.sqrt(2)
    expected = (
        -math.log(math.exp(2) / (math.exp(2) + math.exp(r2)))
        - math.log(math.exp(r2) / (1 + math.exp(r2)))
    ) / 2
    assert float(info_nce(q, p, scale=2.0)) == pytest.approx(expected, rel=1e-6)


def _layers():
    """(L + 1 = 4, B = 2, D = 4) query and passage embeddings with distinct, fixed values."""
    q = torch.tensor(
        [
            [[0.5, -1.0, 2.0, 0.1], [1.5, 0.3, -0.2, 0.7]],
            [[1.0, 0.2, -0.5, 0.3], [-0.4, 1.1, 0.6, -0.9]],
            [[0.3, 0.8, 0.1, -1.2], [0.9, -0.6, 1.4, 0.2]],
            [[1.2, -0.3, 0.4, 0.8], [-0.7, 0.5, 0.9, 1.1]],
        ]
    )
    p = torch.tensor(
        [
            [[0.1, 0.4, -0.3, 1.0], [0.6, -0.8, 0.2, 0.5]],
            [[0.9, 0.1, -0.2, 0.6], [-0.3, 1.3, 0.2, -0.4]],
            [[-0.5, 0.7, 0.3, -0.6], [1.1, -0.2, 0.8, 0.9]],
            [[1.0, -0.5, 0.6, 0.2], [-0.2, 0.9, 0.4, 1.3]],
        ]
    )
    return q, p


def test_2dmse_terms_hand_computed():
    q, p = _layers()
    layer, dim, scale, T = 2, 2, 5.0, 0.3
    out = matryoshka_2d_loss(
        q,
        p,
        layer=layer,
        dim=dim,
        scale=scale,
        kl_temperature=T,
        kl_weight=0.5,
        shallow_weight=0.25,
    )
    ql, pl = q.tolist(), p.tolist()
    last_full = ref_info_nce(ql[3], pl[3], scale)
    last_d = ref_info_nce([v[:dim] for v in ql[3]], [v[:dim] for v in pl[3]], scale)
    shallow_full = ref_info_nce(ql[2], pl[2], scale)
    shallow_d = ref_info_nce([v[:dim] for v in ql[2]], [v[:dim] for v in pl[2]], scale)
    kl = ref_kl(ql[2] + pl[2], ql[3] + pl[3], T)  # queries and passages: 2B rows
    expected = {
        "last_full": last_full,
        "last_d2": last_d,
        "shallow_full": shallow_full,
        "shallow_d2": shallow_d,
        "kl": kl,
    }
    assert set(out.terms) == set(expected)
    for name, value in expected.items():
        assert float(out.terms[name]) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    total = last_full + last_d + 0.25 * (shallow_full + shallow_d) + 0.5 * kl
    assert float(out.loss) == pytest.approx(total, rel=1e-5)
    assert (out.layer, out.dim) == (layer, dim)
    # the embedding layer (0) and layer 1 are never read
    q2, p2 = q.clone(), p.clone()
    q2[:2] += 10
    p2[:2] -= 3
    again = matryoshka_2d_loss(q2, p2, layer=layer, dim=dim, scale=scale, kl_weight=0.5)
    assert float(again.terms["kl"]) == pytest.approx(float(out.terms["kl"]), rel=1e-6)
    # no KL term when the temperature is 0
    assert "kl" not in matryoshka_2d_loss(q, p, layer=1, dim=3, kl_temperature=0).terms


def test_kl_term_does_not_train_the_teacher_layer():
    q, _ = _layers()
    q.requires_grad_(True)
    kl = kl_alignment(q[1], q[3], temperature=0.3)
    kl.backward()
    assert q.grad[1].abs().sum() > 0
    assert q.grad[3].abs().sum() == 0 and q.grad[0].abs().sum() == 0
    assert float(kl_alignment(q[3], q[3], 0.3).detach()) == pytest.approx(0.0, abs=1e-7)


def test_1d_matryoshka_and_full_only_read_the_last_layer():
    q, p = _layers()
    out = matryoshka_1d_loss(q, p, dims=[1, 3], scale=5.0)
    ql, pl = q[3].tolist(), p[3].tolist()
    expected = {
        "last_full": ref_info_nce(ql, pl, 5.0),
        "last_d3": ref_info_nce([v[:3] for v in ql], [v[:3] for v in pl], 5.0),
        "last_d1": ref_info_nce([v[:1] for v in ql], [v[:1] for v in pl], 5.0),
    }
    assert set(out.terms) == set(expected)
    assert float(out.loss) == pytest.approx(sum(expected.values()), rel=1e-5)
    full = full_dim_loss(q, p, scale=5.0)
    assert float(full.loss) == pytest.approx(expected["last_full"], rel=1e-5)
    q2 = q.clone()
    q2[:3] = torch.randn(3, 2, 4)
    assert float(matryoshka_1d_loss(q2, p, dims=[1, 3], scale=5.0).loss) == pytest.approx(
        float(out.loss), rel=1e-6
    )


def test_sampling_covers_shallow_layers_and_truncated_dims():
    gen = torch.Generator().manual_seed(0)
    draws = [sample_layer_and_dim(6, [32, 64, 128, 384], 384, gen) for _ in range(400)]
    assert {layer for layer, _ in draws} == {1, 2, 3, 4, 5}
    assert {dim for _, dim in draws} == {32, 64, 128}  # the full width is not a truncated one
    again = [
        sample_layer_and_dim(6, [32, 64, 128, 384], 384, torch.Generator().manual_seed(0))
        for _ in range(3)
    ]
    assert again == [draws[0]] * 3
    with pytest.raises(ValueError, match=">= 2 layers"):
        sample_layer_and_dim(1, [8], 16)
    with pytest.raises(ValueError, match="no truncated dim"):
        sample_layer_and_dim(4, [16, 32], 16)


def test_objective_loss_dispatches_with_the_drawn_layer_and_dim():
    q, p = _layers()
    cfg = Matryoshka2dConfig(objective="2dmse", dims=[1, 2, 3], scale=5.0)
    out = objective_loss(cfg, q, p, torch.Generator().manual_seed(3))
    layer, dim = sample_layer_and_dim(3, [1, 2, 3], 4, torch.Generator().manual_seed(3))
    direct = matryoshka_2d_loss(q, p, layer=layer, dim=dim, scale=5.0)
    assert (out.layer, out.dim) == (layer, dim)
    assert float(out.loss) == pytest.approx(float(direct.loss), rel=1e-6)
    mrl = objective_loss(cfg.replace(objective="mrl"), q, p)
    assert set(mrl.terms) == {"last_full", "last_d3", "last_d2", "last_d1"}
    assert set(objective_loss(cfg.replace(objective="full"), q, p).terms) == {"last_full"}
    with pytest.raises(ValueError, match="objective must be one of"):
        Matryoshka2dConfig(objective="3dmse")


# --------------------------------------------------------------------------------------------
# The encoder on a tiny random BERT


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A saved 3-layer random BERT (hidden 32) with MiniLM's tokenizer: a model source folder."""
    from lm.loading import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


TEXTS = ["A red circle.", "Two blue stars and a white ring.", "The assert statement."]


def test_encode_returns_the_prefix_of_that_layers_embedding(tiny_bert_dir, tmp_path):
    cfg = Matryoshka2dConfig(dims=[8, 16], max_length=32)
    encoder = Matryoshka2dEncoder.from_source(str(tiny_bert_dir), cfg).eval()
    full = encoder.encode(TEXTS, layer=2, normalize=False)  # (N, 32)
    assert full.shape == (3, 32)
    # reference: layer 2's hidden states, mean-pooled by hand, one text at a time
    model, tok = encoder.embedder.model, encoder.embedder.tokenizer
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            h = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
        torch.testing.assert_close(full[i], h[2][0].mean(0), atol=1e-5, rtol=1e-4)
    cut = encoder.encode(TEXTS, layer=2, dim=8, normalize=False)
    torch.testing.assert_close(cut, full[:, :8])
    torch.testing.assert_close(
        encoder.encode(TEXTS, layer=2, dim=8), F.normalize(full[:, :8], dim=-1)
    )
    assert not torch.allclose(encoder.encode(TEXTS, layer=1, normalize=False), full)
    torch.testing.assert_close(
        encoder.encode(TEXTS, layer=-1, normalize=False),
        encoder.encode(TEXTS, layer=3, normalize=False),
    )
    for bad in ({"layer": 0}, {"layer": 4}, {"dim": 33}, {"dim": 0}):
        with pytest.raises(ValueError, match="must be in"):
            encoder.encode(TEXTS, **bad)
    # save / load round trip
    encoder.save_pretrained(tmp_path / "saved")
    loaded = Matryoshka2dEncoder.from_pretrained(tmp_path / "saved")
    assert loaded.config == cfg
    torch.testing.assert_close(
        loaded.encode(TEXTS, layer=2, dim=16), encoder.encode(TEXTS, layer=2, dim=16)
    )


def test_forward_is_differentiable_per_layer(tiny_bert_dir):
    cfg = Matryoshka2dConfig(dims=[8], max_length=32)
    encoder = Matryoshka2dEncoder.from_source(str(tiny_bert_dir), cfg)
    q = encoder(*encoder.tokenize(TEXTS[:2]))
    p = encoder(*encoder.tokenize(TEXTS[1:]))
    assert q.shape == (4, 2, 32)
    out = matryoshka_2d_loss(q, p, layer=1, dim=8)
    out.loss.backward()
    grads = encoder.embedder.model.encoder.layer
    assert grads[0].attention.self.query.weight.grad.abs().sum() > 0
    assert grads[2].attention.self.query.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embedder pools"):
        Matryoshka2dEncoder(LMEmbedder(encoder.embedder.model, encoder.embedder.tokenizer), cfg)


# --------------------------------------------------------------------------------------------
# train.embeddings and eval.embeddings grid


def _train(tiny_bert_dir, out, objective, steps, *extra):
    from train.embeddings import main

    argv = [
        "--model", str(tiny_bert_dir), "--objective", objective, "--dims", "8", "16",
        "--max-length", "32", "--batch-size", "8", "--shapeworld-scenes", "16",
        "--steps", str(steps), "--lr", "1e-3", "--save-every", "5", "--out", str(out),
    ]  # fmt: skip
    assert main([*argv, *extra]) == 0


def _fixed_loss(folder, pairs):
    enc = (
        Matryoshka2dEncoder.from_pretrained(folder)
        if (folder / "matryoshka2d.json").is_file()
        else None
    )
    if enc is None:
        enc = Matryoshka2dEncoder.from_source(
            str(folder), Matryoshka2dConfig(dims=[8], max_length=32)
        ).eval()
    with torch.no_grad():
        q = enc(*enc.tokenize([a for a, _ in pairs]))
        p = enc(*enc.tokenize([b for _, b in pairs]))
    return float(full_dim_loss(q, p).loss)


def test_training_lowers_the_loss_and_the_grid_reads_the_checkpoints(tiny_bert_dir, tmp_path):
    from eval.embeddings import main as eval_main
    from train.embeddings import pydoc_items

    items, _, _ = pydoc_items(2)
    pairs = [(it.queries[0], it.positives[0]) for it in items[:16]]
    _train(tiny_bert_dir, tmp_path / "2dmse", "2dmse", 40)
    _train(tiny_bert_dir, tmp_path / "full", "full", 5)
    before = _fixed_loss(tiny_bert_dir, pairs)
    after = _fixed_loss(tmp_path / "2dmse" / "final", pairs)
    assert after < before - 0.1, (before, after)

    report = json.loads((tmp_path / "2dmse" / "report.json").read_text())
    assert len(report["train"]) == 40
    assert {r["layer"] for r in report["train"]} <= {1, 2} and {
        r["dim"] for r in report["train"]
    } == {8, 16}
    assert {"last_full", "last_d", "shallow_full", "shallow_d", "kl"} <= set(report["train"][0])
    assert set(report["heldout"]["recall@1"]) == {"1", "2", "3"}
    assert (tmp_path / "2dmse" / "report.md").is_file() and (
        tmp_path / "2dmse" / "loss_curve.png"
    ).is_file()
    training = json.loads((tmp_path / "2dmse" / "final" / "training.json").read_text())
    assert training["objective"] == "2dmse" and training["heldout_topics"]

    argv = [
        "grid", "--checkpoint", f"2dmse={tmp_path / '2dmse' / 'final'}",
        "--checkpoint", f"full={tmp_path / 'full' / 'final'}", "--baseline", str(tiny_bert_dir),
        "--sts-scenes", "20", "--sts-pairs", "4", "--out", str(tmp_path / "eval"),
    ]  # fmt: skip
    assert eval_main(argv) == 0
    grid = json.loads((tmp_path / "eval" / "embeddings_grid.json").read_text())
    assert list(grid["models"]) == ["2dmse", "full", f"{tiny_bert_dir} (no training)"]
    assert grid["heldout_topics"] == training["heldout_topics"]
    for m in grid["models"].values():
        assert m["widths"] == [8, 16, 32]
        assert [(c["layer"], c["dim"]) for c in m["cells"]] == [
            (layer, d) for layer in (1, 2, 3) for d in (8, 16, 32)
        ]
        assert all(0 <= c["recall@1"] <= c["recall@10"] <= 1 for c in m["cells"])
    # the grid's R@1 at the trained model's cells is the training report's held-out R@1
    cell = next(c for c in grid["models"]["2dmse"]["cells"] if (c["layer"], c["dim"]) == (3, 32))
    assert cell["recall@1"] == pytest.approx(report["heldout"]["recall@1"]["3"]["32"])
    assert (tmp_path / "eval" / "embeddings_grid.png").is_file()


def test_resumed_training_equals_an_uninterrupted_run(tiny_bert_dir, tmp_path):
    _train(tiny_bert_dir, tmp_path / "a", "2dmse", 10)
    _train(tiny_bert_dir, tmp_path / "b", "2dmse", 10, "--stop-at", "5")
    assert not (tmp_path / "b" / "final").exists()
    _train(tiny_bert_dir, tmp_path / "b", "2dmse", 10, "--resume")
    a = Matryoshka2dEncoder.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = Matryoshka2dEncoder.from_pretrained(tmp_path / "b" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    ra = json.loads((tmp_path / "a" / "report.json").read_text())["train"]
    rb = json.loads((tmp_path / "b" / "report.json").read_text())["train"]
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb])


def test_scripts_print_help(capsys):
    from eval.embeddings import main as eval_main
    from train.embeddings import main as train_main

    for main, argv, word in (
        (train_main, ["--help"], "--objective"),
        (eval_main, ["grid", "--help"], "--checkpoint"),
        (eval_main, ["pooling", "--help"], "--methods"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        assert word in capsys.readouterr().out
