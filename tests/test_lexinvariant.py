"""Lexinvariant LM (lm.lexinvariant) and its training script: per-sequence random embeddings,
logits over the sequence's own vectors, cipher equivariance, the standard baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lm.lexinvariant import (
    LexinvariantConfig,
    TokenLM,
    build_lexinvariant_lm,
    build_standard_lm,
    next_token_nll,
)
from train import lexinvariant as train_lexinvariant

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = LexinvariantConfig(
    vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=16
)


def captured_inputs(model: TokenLM, ids: torch.Tensor, seeds: torch.Tensor | None):
    """What the backbone receives (inputs_embeds), its last hidden state, and the output."""
    seen = {}

    def pre(module, args, kwargs):
        seen["inputs"] = kwargs["inputs_embeds"].detach().clone()

    def post(module, args, kwargs, output):
        seen["hidden"] = output.last_hidden_state.detach().clone()

    h1 = model.backbone.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = model.backbone.register_forward_hook(post, with_kwargs=True)
    try:
        out = model(ids, seeds)
    finally:
        h1.remove()
        h2.remove()
    return seen["inputs"], seen["hidden"], out


def test_embeddings_agree_within_a_sequence_and_differ_across_sequences():
    model = build_lexinvariant_lm(CFG).eval()
    ids = torch.tensor([[3, 5, 3, 7, 5, 3], [3, 5, 3, 7, 5, 3]])
    inputs, _, _ = captured_inputs(model, ids, torch.tensor([1, 2]))
    # the same id twice in one sequence: the identical vector
    assert torch.equal(inputs[0, 0], inputs[0, 2]) and torch.equal(inputs[0, 0], inputs[0, 5])
    assert torch.equal(inputs[1, 1], inputs[1, 4])
    # different ids in one sequence: different vectors
    assert not torch.allclose(inputs[0, 0], inputs[0, 1])
    # the same ids in another sequence (another seed): other vectors everywhere
    assert not torch.isclose(inputs[0], inputs[1]).all(dim=-1).any()
    # a seed reproduces its vectors; no seeds: every row draws its own
    again, _, _ = captured_inputs(model, ids[:1], torch.tensor([1]))
    assert torch.equal(again[0], inputs[0])
    free, _, _ = captured_inputs(model, ids, None)
    assert not torch.allclose(free[0], free[1])
    # the vectors are N(0, std^2) with std = hidden ** -0.5
    table = model.token_embeddings(torch.zeros(64, 1, dtype=torch.long), torch.arange(64))
    assert table.std().item() == pytest.approx(CFG.hidden_size**-0.5, rel=0.05)
    unused = dict(model.named_parameters())["backbone.embed_tokens.weight"]  # its 1-row table
    assert unused.shape == (1, CFG.hidden_size) and not unused.requires_grad


def test_logits_are_scores_against_the_sequences_own_vectors():
    model = build_lexinvariant_lm(CFG).eval()
    ids = torch.randint(CFG.vocab_size, (3, 9))
    seeds = torch.tensor([4, 5, 6])
    inputs, hidden, out = captured_inputs(model, ids, seeds)
    assert out.logits.shape == (3, 9, CFG.vocab_size)
    assert out.embeddings.shape == (3, CFG.vocab_size, CFG.hidden_size)
    for b in range(3):  # row b is scored against row b's table, and fed from it
        assert torch.allclose(out.logits[b], hidden[b] @ out.embeddings[b].T, atol=1e-5)
        assert torch.equal(inputs[b], out.embeddings[b][ids[b]])
        other = hidden[b] @ out.embeddings[(b + 1) % 3].T
        assert not torch.allclose(out.logits[b], other, atol=1e-3)


class FixedTable(nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids, seeds=None):
        return self.table.unsqueeze(0)


def test_cipher_with_the_matching_table_permutes_the_logits_exactly():
    """Enciphering ids by pi while moving each vector to its new id changes nothing but the
    names: logits'[..., pi[v]] == logits[..., v]. (Why a lexinvariant LM cannot tell a cipher.)"""
    torch.manual_seed(0)
    backbone = build_lexinvariant_lm(CFG).backbone.eval()
    table = torch.randn(CFG.vocab_size, CFG.hidden_size)
    pi = torch.randperm(CFG.vocab_size)
    moved = torch.empty_like(table)
    moved[pi] = table
    ids = torch.randint(CFG.vocab_size, (2, 8))
    plain = TokenLM(backbone, FixedTable(table))(ids).logits
    cipher = TokenLM(backbone, FixedTable(moved))(pi[ids]).logits
    assert torch.allclose(cipher[..., pi], plain, atol=1e-5)


def test_standard_lm_shares_learned_embeddings_and_rejects_bad_ids():
    model = build_standard_lm(CFG).eval()
    ids = torch.tensor([[1, 2, 1], [1, 2, 1]])
    inputs, _, out = captured_inputs(model, ids, torch.tensor([1, 2]))
    assert torch.equal(inputs[0], inputs[1])  # seeds do not matter: one learned table
    assert out.embeddings.requires_grad and out.embeddings.shape == (1, 11, 16)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 11\)"):
        model(torch.tensor([[0, 11]]))
    with pytest.raises(ValueError, match="seeds of shape"):
        build_lexinvariant_lm(CFG)(ids, torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible"):
        LexinvariantConfig(hidden_size=10, num_heads=4)


def test_next_token_nll_matches_cross_entropy():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(7, (2, 5))
    nll = next_token_nll(logits, ids)
    assert nll.shape == (2, 4)
    expected = F.cross_entropy(logits[0, 1], ids[0, 2])
    assert nll[0, 1].item() == pytest.approx(expected.item(), rel=1e-6)


def test_encipher_is_a_per_row_permutation_fixing_specials():
    rows = torch.tensor([[0, 1, 2, 3, 4, 2], [0, 1, 2, 3, 4, 2]])
    out = train_lexinvariant.encipher(rows, vocab_size=5, seed=0)
    assert torch.equal(out[:, :2], rows[:, :2])  # separator and unknown stay
    for r in range(2):  # a bijection on 2..4: equal ids stay equal, distinct stay distinct
        assert out[r, 2] == out[r, 5] and len(set(out[r, 2:5].tolist())) == 3
        assert set(out[r, 2:].tolist()) <= {2, 3, 4}
    many = train_lexinvariant.encipher(rows.repeat(8, 1), vocab_size=5, seed=0)
    assert len({tuple(r) for r in many.tolist()}) > 1  # each row its own permutation


def test_context_unigram_reference_hand_computed():
    rows = torch.tensor([[2, 2, 3]])
    # token 2 after [2]: (1 + 0.5) / (1 + 0.5 * 4); token 3 after [2, 2]: 0.5 / (2 + 2)
    nll = train_lexinvariant.context_unigram(rows, vocab_size=4)
    assert nll == pytest.approx([-math.log(1.5 / 3), -math.log(0.5 / 4)])
    assert train_lexinvariant.context_unigram_top1(rows) == [1.0, 0.0]


def test_script_smoke(tmp_path):
    argv = ["--out", str(tmp_path), "--steps", "3", "--batch-size", "2", "--seq-len", "16"]
    argv += ["--hidden", "16", "--layers", "1", "--heads", "2", "--eval-rows", "2"]
    assert train_lexinvariant.main(argv) == 0
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"lexinvariant.{ext}").is_file()
    result = json.loads((tmp_path / "lexinvariant.json").read_text())
    reference = "in-context unigram counts (add-0.5)"
    assert set(result["curves"]) == {"lexinvariant", "standard", reference}
    ref = result["curves"][reference]
    assert ref["plain"]["nll"] == pytest.approx(ref["cipher"]["nll"])  # lexinvariant itself
    for curves in result["curves"].values():
        for text in ("plain", "cipher"):
            assert len(curves[text]["nll"]) == len(curves[text]["accuracy"]) == 15
    assert result["bins"][0] == [1, 4] and result["bins"][-1][1] == 15
    assert result["command"].startswith("python -m train.lexinvariant")
    # --resume reuses the trained models
    assert train_lexinvariant.main([*argv, "--resume"]) == 0
    again = json.loads((tmp_path / "lexinvariant.json").read_text())
    assert all(stage["resumed"] for stage in again["training"].values())
    assert again["curves"] == result["curves"]
