"""Decoding methods that train a model: recurrence across windows, ADJUST, RUM-SUNDAE, and the
synthetic languages they train on. Tiny models, seconds each."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lm.decoding import (
    ADJUSTSampler,
    PrefixSumTask,
    RecurrentMemory,
    WalkLanguage,
    build_masked_diffusion_lm,
    masked_diffusion_loss,
    mlm_loss,
    recurrent_generate,
    refine,
    sample_masked_diffusion,
    sampler_loss,
    sundae_loss,
    total_variation,
    window_forward,
    windowed_nll,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Synthetic languages


def test_walk_language_support_probabilities_and_samples():
    lang = WalkLanguage(values=5, length=4, p_up=0.7)
    support, probs = lang.support()
    assert support.shape == (5 * 2**3, 4) and lang.is_valid(support).all()
    assert probs.sum().item() == pytest.approx(1.0)
    # 0 1 2 3 (three ups) and 0 4 3 2 (three downs), by hand
    lp = lang.log_prob(torch.tensor([[0, 1, 2, 3], [0, 4, 3, 2], [0, 2, 3, 4]])).exp()
    assert lp[0].item() == pytest.approx(0.2 * 0.7**3)
    assert lp[1].item() == pytest.approx(0.2 * 0.3**3) and lp[2].item() == 0.0
    x = lang.sample(4000, torch.Generator().manual_seed(0))
    assert lang.is_valid(x).all()
    ups = ((x[:, 1:] - x[:, :-1]).remainder(5) == 1).float().mean().item()
    assert ups == pytest.approx(0.7, abs=0.02)


def test_total_variation_hand_example():
    support = torch.tensor([[0, 1], [1, 0]])
    probs = torch.tensor([0.75, 0.25], dtype=torch.float64)
    samples = torch.tensor([[0, 1], [0, 1], [3, 3], [1, 0]])  # p_hat 0.5, 0.25, outside 0.25
    assert total_variation(samples, support, probs) == pytest.approx(0.5 * (0.25 + 0 + 0.25))
    assert total_variation(support[[0, 0, 0, 1]], support, probs) == pytest.approx(0.0)


def test_prefix_sum_task_sources_describe_their_targets():
    task = PrefixSumTask(values=8, length=6)
    src, tgt = task.sample(100, torch.Generator().manual_seed(0))
    assert torch.equal(src[:, 0], tgt[:, 0])
    steps = torch.where(src[:, 1:] == task.up_id, 1, -1)
    assert torch.equal((tgt[:, :1] + steps.cumsum(1)).remainder(8), tgt[:, 1:])
    x, segments = task.unlabelled(10, torch.Generator().manual_seed(0))
    assert x.shape == segments.shape == (10, 13) and (x[:, 6] == task.sep_id).all()
    assert segments[:, :7].eq(0).all() and segments[:, 7:].eq(1).all()
    assert task.language().is_valid(x[:, 7:]).all()


# ----------------------------------------------------------------------------------------------
# Recurrence across windows


def tiny_llama(vocab: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def key_rows(n: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Every token is the row's key with probability 1/2, else uniform: a window's own few
    tokens say little about the key, the previous window says a lot."""
    key = torch.randint(vocab, (n, 1), generator=generator)
    noise = torch.randint(vocab, (n, length), generator=generator)
    return torch.where(torch.rand(n, length, generator=generator) < 0.5, key, noise)


def test_carried_state_lowers_nll_beyond_the_window():
    model, W = tiny_llama(), 8
    memory = RecurrentMemory.for_model(model, n_memory=2, num_heads=2)
    g = torch.Generator().manual_seed(0)
    params = [*memory.parameters(), *model.parameters()]  # a fine-tuned decoder
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(100):
        nll, _ = windowed_nll(model, memory, key_rows(32, 2 * W, 64, g), W)
        loss = nll[:, 1:].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        ids = key_rows(256, 3 * W, 64, torch.Generator().manual_seed(1))
        carried, states = windowed_nll(model, memory, ids, W)
        perm = torch.roll(torch.arange(256), 1)
        shuffled, _ = windowed_nll(model, memory, ids, W, states=[s[perm] for s in states])
    later = slice(1, None)  # windows 2 and 3 (window 3 is beyond the 2 windows trained on)
    gain = shuffled[:, later].mean(0) - carried[:, later].mean(0)
    assert (gain > 0.15).all(), gain


def test_window_forward_without_state_is_the_plain_model():
    model = tiny_llama()
    memory = RecurrentMemory.for_model(model, n_memory=3, num_heads=2)
    ids = torch.randint(64, (2, 8))
    with torch.no_grad():
        logits, state = window_forward(model, memory, ids, None)
        torch.testing.assert_close(logits, model(input_ids=ids).logits)
        assert state.shape == (2, 3, 32)
        with_state, _ = window_forward(model, memory, ids, state)
    assert with_state.shape == (2, 9, 64)  # the last state position predicts token 0


def test_recurrent_generate_matches_greedy_inside_one_window_and_rolls_over():
    model = tiny_llama()
    memory = RecurrentMemory.for_model(model, n_memory=2, num_heads=2).eval()
    ids = torch.randint(64, (1, 5), generator=torch.Generator().manual_seed(0))
    kw = {"do_sample": False, "pad_token_id": 0}
    new = recurrent_generate(model, memory, ids, window=16, max_new_tokens=6, **kw)
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, **kw)
    assert torch.equal(new, ref[:, 5:])  # nothing folded yet: plain greedy decoding
    long = recurrent_generate(model, memory, ids, window=4, max_new_tokens=11, **kw)
    assert long.shape == (1, 11)  # 5 prompt + 11 new tokens cross three window boundaries


# ----------------------------------------------------------------------------------------------
# ADJUST


def test_untrained_sampler_is_exactly_marginal_sampling():
    torch.manual_seed(0)
    mdlm = build_masked_diffusion_lm(6, 5, hidden_size=32, num_layers=1, num_heads=2).eval()
    sampler = ADJUSTSampler.from_mdlm(mdlm, num_heads=2).eval()
    kw = {"tokens_per_step": 3}
    a, passes = sample_masked_diffusion(
        mdlm, 64, 5, 5, generator=torch.Generator().manual_seed(1), **kw
    )
    b, _ = sample_masked_diffusion(
        mdlm, 64, 5, 5, sampler=sampler, generator=torch.Generator().manual_seed(1), **kw
    )
    assert torch.equal(a, b) and passes == 2 and (a != 5).all()
    _, exact_passes = sample_masked_diffusion(mdlm, 4, 5, 5, tokens_per_step=1)
    assert exact_passes == 5


def test_adjust_sampler_beats_marginal_sampling_on_the_constraints():
    lang, mask, K = WalkLanguage(values=5, length=5, p_up=0.7), 5, 3
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mdlm = build_masked_diffusion_lm(6, 5, hidden_size=64, num_layers=2, num_heads=2)
    opt = torch.optim.Adam(mdlm.parameters(), lr=3e-3)
    for _ in range(100):
        loss = masked_diffusion_loss(mdlm, lang.sample(128, g), mask, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mdlm.requires_grad_(False).eval()
    sampler = ADJUSTSampler.from_mdlm(mdlm, num_heads=2)
    opt = torch.optim.Adam(sampler.parameters(), lr=3e-3)
    first = None
    for _ in range(50):
        loss = sampler_loss(mdlm, sampler, lang.sample(128, g), mask, K, g)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    sampler.eval()
    valid = {}
    for name, smp in (("marginal", None), ("adjust", sampler)):
        x, _ = sample_masked_diffusion(
            mdlm,
            1000,
            5,
            mask,
            tokens_per_step=K,
            sampler=smp,
            generator=torch.Generator().manual_seed(1),
        )
        valid[name] = lang.is_valid(x).float().mean().item()
    assert valid["adjust"] > valid["marginal"] + 0.1, valid


# ----------------------------------------------------------------------------------------------
# RUM-SUNDAE


class Recorder(torch.nn.Module):
    """Stands in for an MLM: records the inputs, returns zero logits."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.seen = vocab, []

    def forward(self, input_ids, token_type_ids=None):
        self.seen.append((input_ids.clone(), token_type_ids))
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_mlm_loss_follows_berts_80_10_10():
    x = torch.full((400, 50), 3)
    rec = Recorder(12)
    mlm_loss(rec, x, mask_id=11, random_vocab=3, generator=torch.Generator().manual_seed(0))
    inputs = rec.seen[0][0]
    masked = (inputs == 11).float().mean().item()
    noised = (inputs < 3).float().mean().item()  # random ids are 0..2, the true token is 3
    selected = 0.15 + 0.85 / 50  # 15% of positions, plus one forced per row of 50
    assert masked == pytest.approx(0.8 * selected, abs=0.01)
    assert noised == pytest.approx(0.1 * selected, abs=0.004)


def test_sundae_loss_with_one_step_is_the_denoising_cross_entropy():
    task = PrefixSumTask(values=8, length=6)
    src, tgt = task.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    from lm.decoding import build_mlm, nar_logits

    model = build_mlm(task.vocab_size, 13, hidden_size=32, num_layers=1, num_heads=2)
    loss = sundae_loss(
        model,
        src,
        tgt,
        sep_id=task.sep_id,
        target_vocab=8,
        unroll_steps=1,
        generator=torch.Generator().manual_seed(5),
    )
    g = torch.Generator().manual_seed(5)  # the same draws, by hand
    rate = torch.rand(4, 1, generator=g)
    corrupt = torch.rand(4, 6, generator=g) < rate
    draft = torch.where(corrupt, torch.randint(8, (4, 6), generator=g), tgt)
    ref = F.cross_entropy(nar_logits(model, src, draft, task.sep_id, 8).transpose(1, 2), tgt)
    torch.testing.assert_close(loss, ref)
    two = sundae_loss(
        model,
        src,
        tgt,
        sep_id=task.sep_id,
        target_vocab=8,
        generator=torch.Generator().manual_seed(5),
    )
    assert two.ndim == 0 and torch.isfinite(two)


class LocalRule(torch.nn.Module):
    """An oracle NAR model that knows only the local rule t_i = t_{i-1} +- 1 (and t_0 = start):
    each refinement step makes at least one more leading position right."""

    def __init__(self, task: PrefixSumTask):
        super().__init__()
        self.task = task

    def forward(self, input_ids, token_type_ids=None):
        task, L = self.task, self.task.length
        src, draft = input_ids[:, :L], input_ids[:, L + 1 :]
        step = torch.where(src[:, 1:] == task.up_id, 1, -1)
        pred = torch.cat([src[:, :1], (draft[:, :-1] + step).remainder(task.values)], dim=1)
        logits = torch.full((*input_ids.shape, task.vocab_size), -10.0)
        logits[:, L + 1 :].scatter_(-1, pred.unsqueeze(-1), 10.0)
        return SimpleNamespace(logits=logits)


def test_refinement_steps_fix_a_draft_position_by_position():
    task = PrefixSumTask(values=8, length=6)
    src, tgt = task.sample(200, torch.Generator().manual_seed(0))
    drafts = refine(
        LocalRule(task),
        src,
        length=6,
        sep_id=task.sep_id,
        target_vocab=8,
        steps=6,
        generator=torch.Generator().manual_seed(1),
    )
    acc = [(d == tgt).float().mean().item() for d in drafts]
    for k, d in enumerate(drafts, start=1):
        assert (d[:, :k] == tgt[:, :k]).all()  # after k steps the first k tokens are right
    assert acc == sorted(acc) and acc[0] < 0.5 and acc[-1] == 1.0
