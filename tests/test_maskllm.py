"""lm.sparsity.maskllm: Gumbel-softmax masks, schedules, prior init, the regulariser, training on
a tiny model, export to hard masks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lm.sparsity import (
    NM,
    DifferentiableMask,
    MaskedLinear,
    MaskLLMConfig,
    apply_mask,
    check_nm,
    hard_masks,
    init_from_prior,
    install_masks,
    kept_weight_norm,
    linear_schedule,
    magnitude_mask,
    prunable_linears,
    regulariser_coef,
    remove_masks,
    set_schedule,
)
from lm.sparsity.masks import grouped
from train.common import trainable_state

TWO_FOUR = NM(2, 4)


# Tiny models on a shared 2-core machine: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def random_prior(shape=(8, 16), nm=TWO_FOUR) -> torch.Tensor:
    return magnitude_mask(torch.randn(shape), nm)


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(4, 8)])
@pytest.mark.parametrize("hard", [False, True])
def test_every_sampled_mask_keeps_exactly_n_per_group(nm, hard):
    mask = DifferentiableMask((8, 16), nm)
    mask.gate.data.normal_(0, 0.01)
    for tau, kappa in [(4.0, 100.0), (1.0, 300.0), (0.05, 500.0)]:
        sample = mask.sample(tau, kappa, hard)
        assert sample.shape == (8, 16) and sample.min() >= 0 and sample.max() <= 1 + 1e-6
        assert torch.allclose(
            grouped(sample, nm.m).sum(-1), torch.full((8, 16 // nm.m), float(nm.n))
        )
        if hard:
            check_nm(sample.detach(), nm)  # a hard sample is one pattern per group
    expected = mask.expected_mask(scale=100.0)
    assert torch.allclose(grouped(expected, nm.m).sum(-1), torch.full((8, 16 // nm.m), float(nm.n)))


def test_soft_samples_average_to_the_gumbel_softmax_expectation_at_low_temperature():
    # With tau -> 0, Gumbel-softmax samples are one-hot draws from softmax(logits): their mean
    # is the expected mask sum_k softmax(kappa * gates)_k * pattern_k.
    torch.manual_seed(0)
    mask = DifferentiableMask((2, 8), TWO_FOUR)
    mask.gate.data = torch.randn(6, 2, 2) * 0.01
    mean = torch.stack([mask.sample(0.01, 100.0) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, mask.expected_mask(100.0), atol=0.04)


def test_straight_through_hard_samples_carry_gradients_to_the_gates():
    mask = DifferentiableMask((4, 8), TWO_FOUR)
    (mask.sample(1.0, 100.0, hard=True) * torch.randn(4, 8)).sum().backward()
    assert mask.gate.grad is not None and mask.gate.grad.abs().sum() > 0


def test_schedules_hit_their_endpoints():
    cfg = MaskLLMConfig()
    layer = {"l": MaskedLinear(nn.Linear(8, 4), TWO_FOUR)}
    assert set_schedule(layer, cfg, 0, 10) == (4.0, 100.0)
    assert (layer["l"].temperature, layer["l"].scale) == (4.0, 100.0)
    assert set_schedule(layer, cfg, 10, 10) == pytest.approx((0.05, 500.0))
    assert set_schedule(layer, cfg, 5, 10) == pytest.approx((2.025, 300.0))
    assert regulariser_coef(cfg, 0, 10) == 1e-5 and regulariser_coef(cfg, 10, 10) == 0.0
    assert linear_schedule(1.0, 3.0, 1, 4) == 1.5
    with pytest.raises(ValueError, match="step <= total"):
        linear_schedule(1.0, 3.0, 5, 4)


def test_prior_init_makes_the_prior_pattern_the_argmax_of_every_group():
    prior = random_prior((64, 64))
    mask = DifferentiableMask((64, 64), TWO_FOUR)
    mask.init_from_prior(prior, strength=3.0)
    assert torch.equal(mask.hard_mask(), prior)
    # 2:4: identical to MaskLLM's `gate += (priors - 1) * gate.std() * strength` at gate.std()=sigma
    fresh = DifferentiableMask((64, 64), TWO_FOUR)
    start = fresh.gate.detach().clone()
    fresh.init_from_prior(prior, strength=3.0)
    # their priors: (O*G, 6) overlaps; ours are pattern-major (6, O, G)
    priors = (TWO_FOUR.patterns.float() * grouped(prior.float(), 4)[..., None, :]).sum(-1)
    priors = priors.permute(2, 0, 1)
    assert torch.allclose(fresh.gate.detach(), start + (priors - 1) * 0.01 * 3.0)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        mask.init_from_prior(torch.ones(64, 64, dtype=torch.bool), 3.0)


def test_masked_linear_uses_hard_masks_in_eval_and_trains_only_gates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    keys = set(model.state_dict())
    masked = install_masks(model, {"0": model[0], "2": model[2]}, MaskLLMConfig())
    assert set(model.state_dict()) == keys | {"0.diff_mask.gate", "2.diff_mask.gate"}
    assert set(trainable_state(model)) == {"0.diff_mask.gate", "2.diff_mask.gate"}
    x = torch.randn(5, 16)
    model.eval()
    hard = hard_masks(masked)
    w0, w2 = (apply_mask(m.weight, hard[k]) for k, m in masked.items())
    ref = F.linear(F.relu(F.linear(x, w0, model[0].bias)), w2, model[2].bias)
    assert torch.allclose(model(x), ref)
    model.train()
    model(x).sum().backward()
    assert masked["0"].weight.grad is None and masked["0"].diff_mask.gate.grad is not None
    norm = (masked["0"].weight.detach() ** 2).sum()
    assert 0 < float(masked["0"].kept_sq_norm.detach()) < float(norm)


def test_the_weight_regulariser_alone_moves_masks_toward_large_weights():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    masked = install_masks(nn.Sequential(linear), {"0": linear}, MaskLLMConfig())
    layer = masked["0"]
    opt = torch.optim.Adam([layer.diff_mask.gate], lr=0.05)
    layer.train()
    for step in range(100):
        set_schedule(masked, MaskLLMConfig(), step, 100)
        layer(torch.zeros(1, 32))
        (-kept_weight_norm(masked)).backward()  # the reward only: keep large weights
        opt.step()
        opt.zero_grad()
    w2 = linear.weight.detach() ** 2
    best = magnitude_mask(linear.weight, TWO_FOUR)  # the mask that maximises the reward
    learned = (w2 * layer.diff_mask.hard_mask()).sum() / (w2 * best).sum()
    start = (w2 * random_prior((16, 32))).sum() / (w2 * best).sum()
    assert learned > 0.98 and start < 0.8, (learned, start)
    agree = (layer.diff_mask.hard_mask() == best).reshape(16, 8, 4).all(-1).float().mean()
    assert agree > 0.8  # the rest are near-ties frozen early by the annealing


def test_a_few_steps_lower_the_loss_below_the_prior_mask_and_export_is_exact(tiny_lm):
    model = copy.deepcopy(tiny_lm[0]).train()
    ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    model.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # fit the batch densely so pruning has something to destroy
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    linears = prunable_linears(model, TWO_FOUR)
    prior = {name: magnitude_mask(layer.weight, TWO_FOUR) for name, layer in linears.items()}

    def loss_with(masks):
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            for name, mask in masks.items():
                pruned.get_submodule(name).weight.mul_(mask)
            return float(pruned(input_ids=ids, labels=ids).loss)

    prior_loss = loss_with(prior)
    cfg = MaskLLMConfig()
    masked = install_masks(model, linears, cfg)
    init_from_prior(masked, prior, cfg.prior_strength)
    assert all(torch.equal(m, prior[n]) for n, m in hard_masks(masked).items())
    gates = [layer.diff_mask.gate for layer in masked.values()]
    opt = torch.optim.AdamW(gates, lr=5e-3, weight_decay=0.0)
    model.train()
    steps = 30
    for step in range(steps):
        set_schedule(masked, cfg, step, steps)
        loss = model(input_ids=ids, labels=ids).loss
        (loss - regulariser_coef(cfg, step, steps) * kept_weight_norm(masked)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        masked_loss = float(model(input_ids=ids, labels=ids).loss)
        before = model(input_ids=ids).logits
    assert masked_loss < 0.7 * prior_loss, (masked_loss, prior_loss)
    masks = remove_masks(model, masked)
    assert loss_with({}) == pytest.approx(masked_loss, rel=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
    for name in linears:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear
        check_nm(masks[name], TWO_FOUR, name=name)
        check_nm(layer.weight, TWO_FOUR, exact=False, name=name)
    assert any(not torch.equal(masks[n], prior[n]) for n in linears)  # it learned something


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="temperatures"):
        MaskLLMConfig(temperature_end=0.0)
    with pytest.raises(ValueError, match="N <= M"):
        MaskLLMConfig(n=5, m=4)
