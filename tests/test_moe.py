"""MoE FFN: vectorised dispatch vs a per-token loop, hand-computed losses, router gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.config import ConfigError
from lm.moe import (
    MoEConfig,
    MoEFeedForward,
    TopKRouter,
    build_moe,
    load_balancing_loss,
    router_z_loss,
)

C = 8


def mlp_expert(width: int) -> nn.Module:
    """Any (C -> C) module works as an expert: here a GELU MLP, as in a plain transformer."""
    return nn.Sequential(nn.Linear(C, width), nn.GELU(), nn.Linear(width, C))


def make_moe(**cfg) -> MoEFeedForward:
    torch.manual_seed(0)
    moe = build_moe(MoEConfig(**cfg), C, mlp_expert, ffn_intermediate_size=12)
    with torch.no_grad():
        moe.router.proj.weight.mul_(10)  # spread the router probabilities: no near-ties
    return moe


def per_token_reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: softmax, the k best experts by sorting, (renormalised) weighted sum."""
    B, T, _ = x.shape
    out = torch.zeros_like(x)
    k = moe.router.top_k
    for b in range(B):
        for t in range(T):
            token = x[b, t]
            probs = torch.softmax(moe.router.proj.weight @ token, dim=0).tolist()
            chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[:k]
            total = sum(probs[e] for e in chosen) if moe.router.renormalize else 1.0
            for e in chosen:
                out[b, t] += probs[e] / total * moe.experts[e](token)
            if moe.shared_expert is not None:
                shared = moe.shared_expert(token)
                if moe.shared_gate is not None:
                    shared = torch.sigmoid(moe.shared_gate(token)) * shared
                out[b, t] += shared
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        {"num_experts": 4, "top_k": 1},
        {"num_experts": 4, "top_k": 2},
        {"num_experts": 5, "top_k": 3, "renormalize": False},
        {"num_experts": 4, "top_k": 2, "shared_expert_intermediate_size": 6},
        {
            "num_experts": 4,
            "top_k": 2,
            "shared_expert_intermediate_size": 6,
            "shared_expert_gated": False,
        },
    ],
)
def test_vectorised_dispatch_equals_per_token_loop(cfg):
    moe = make_moe(**cfg)
    x = torch.randn(2, 9, C)
    with torch.no_grad():
        out = moe(x)
        ref = per_token_reference(moe, x)
    torch.testing.assert_close(out.hidden_states, ref, atol=1e-5, rtol=1e-5)
    assert int(out.expert_load.sum()) == 2 * 9 * cfg["top_k"]


def test_balancing_loss_is_k_for_uniform_routing():
    E, N = 4, 8
    probs = torch.full((N, E), 1 / E)
    experts = torch.tensor([[n % E, (n + 1) % E] for n in range(N)])  # every expert 4 of 16 slots
    assert load_balancing_loss(probs, experts).item() == pytest.approx(2.0)
    assert load_balancing_loss(probs, experts[:, :1]).item() == pytest.approx(1.0)  # k = 1


def test_balancing_loss_hand_computed_cases():
    # E = 2, k = 1, all 4 tokens to expert 0 with p = (0.75, 0.25): f = (1, 0), P = (0.75, 0.25)
    # -> 2 * (1 * 0.75 + 0 * 0.25) = 1.5.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    experts = torch.zeros(4, 1, dtype=torch.long)
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.5)
    # E = 3, k = 2, 2 tokens: slots (0, 1), (0, 2) -> f = (2/2, 1/2, 1/2) (tokens per expert);
    # P = mean of (0.5, 0.3, 0.2) and (0.4, 0.2, 0.4) = (0.45, 0.25, 0.3)
    # -> 3 * (1 * 0.45 + 0.5 * 0.25 + 0.5 * 0.3) = 3 * 0.725 = 2.175.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.2, 0.4]])
    experts = torch.tensor([[0, 1], [0, 2]])
    assert load_balancing_loss(probs, experts).item() == pytest.approx(2.175)


def test_balancing_loss_is_mixtrals():
    """Against transformers' Mixtral load_balancing_loss_func (one layer, top-2 of 8), with and
    without padding: the same loss at the same coefficient, so Mixtral's 0.001 means the same
    pressure here."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    logits = torch.randn(2 * 12, 8)  # batch 2 x 12 tokens
    probs = torch.softmax(logits, dim=-1)
    experts = probs.topk(2, dim=-1).indices
    ours = load_balancing_loss(probs, experts)
    torch.testing.assert_close(ours, load_balancing_loss_func((logits,), 8, 2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    torch.testing.assert_close(
        load_balancing_loss(probs, experts, mask.reshape(-1).bool()),
        load_balancing_loss_func((logits,), 8, 2, attention_mask=mask),
    )


def test_padding_is_left_out_of_the_router_statistics():
    probs = torch.softmax(torch.randn(6, 3), dim=-1)
    experts = probs.topk(2, dim=-1).indices
    logits = torch.randn(6, 3)
    keep = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(
        load_balancing_loss(probs, experts, keep), load_balancing_loss(probs[keep], experts[keep])
    )
    torch.testing.assert_close(router_z_loss(logits, keep), router_z_loss(logits[keep]))


def test_z_loss_hand_computed():
    # Equal logits c: logsumexp = c + log E.
    assert router_z_loss(torch.zeros(5, 4)).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])  # lse = log 4 and 2 + log 2
    expected = (math.log(4) ** 2 + (2 + math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_top1_uses_the_best_expert_alone_and_top2_mixes_two():
    x = torch.randn(1, 5, C)
    top1 = make_moe(num_experts=4, top_k=1)
    with torch.no_grad():
        probs = torch.softmax(top1.router.proj(x[0]), dim=-1)
        out = top1(x).hidden_states[0]
        for t in range(5):
            best = int(probs[t].argmax())
            torch.testing.assert_close(out[t], top1.experts[best](x[0, t]))  # weight exactly 1
    top2 = make_moe(num_experts=4, top_k=2)  # same seed: same router and experts
    with torch.no_grad():
        out = top2(x).hidden_states[0]
        for t in range(5):
            p, (i, j) = probs[t], probs[t].topk(2).indices.tolist()
            mix = (p[i] * top2.experts[i](x[0, t]) + p[j] * top2.experts[j](x[0, t])) / (
                p[i] + p[j]
            )
            torch.testing.assert_close(out[t], mix, atol=1e-6, rtol=1e-5)


def test_gradients_reach_the_router():
    x = torch.randn(2, 6, C)
    for cfg, from_output in [
        ({"top_k": 2}, True),
        ({"top_k": 1, "renormalize": False}, True),
        # Renormalised top-1: weight p / p = 1, so the output's gradient is zero up to rounding.
        ({"top_k": 1}, False),
    ]:
        moe = make_moe(num_experts=4, **cfg)
        moe(x).hidden_states.pow(2).sum().backward()
        grad = moe.router.proj.weight.grad.abs().max().item()
        assert (grad > 1e-3) if from_output else (grad < 1e-5), (cfg, grad)
        moe.zero_grad()
        out = moe(x)
        (out.aux_loss + out.z_loss).backward()
        assert moe.router.proj.weight.grad.abs().sum() > 0, cfg


def test_expert_load_counts_match_the_argmax_for_top1():
    moe = make_moe(num_experts=4, top_k=1)
    x = torch.randn(3, 7, C)
    with torch.no_grad():
        load = moe(x).expert_load
        argmax = moe.router.proj(x.reshape(-1, C)).argmax(-1)
    assert torch.equal(load, torch.bincount(argmax, minlength=4))


def test_drop_in_block_with_moe_trains():
    """A pre-norm transformer block whose MLP is replaced by the MoE: the loss goes down."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(C, 2, batch_first=True)
    moe = build_moe(MoEConfig(num_experts=4, top_k=2), C, mlp_expert, ffn_intermediate_size=16)
    norm1, norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
    params = [*attn.parameters(), *moe.parameters(), *norm1.parameters(), *norm2.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    x, target = torch.randn(4, 6, C), torch.randn(4, 6, C)
    losses = []
    for _ in range(30):
        h = norm1(x)
        h = x + attn(h, h, h, need_weights=False)[0]
        out = moe(norm2(h))
        loss = (h + out.hidden_states - target).pow(2).mean() + 0.001 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_config_validation_and_layer_placement():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="unknown field"):
        MoEConfig.from_dict({"n_experts": 4})
    every2 = MoEConfig(every=2)
    assert [every2.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert all(MoEConfig().is_moe_layer(i) for i in range(3))
    with pytest.raises(ValueError, match="expert width"):
        build_moe(MoEConfig(), C, mlp_expert)
    with pytest.raises(ValueError, match="3 expert modules"):
        MoEFeedForward(TopKRouter(C, 4, 2), nn.ModuleList(mlp_expert(4) for _ in range(3)))
