"""TNL: the three lightning-attention forms, LRPE, the layers, decoding with the state cache,
generate, save/load and the Auto classes, on tiny seeded models (hidden 32, 2 layers, vocab 99)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import lm.tnl  # noqa: F401  (registers the Auto classes)
from core.config import ConfigError
from lm.tnl import (
    TNLCache,
    TNLConfig,
    TNLForCausalLM,
    lightning_attention,
    naive_decay_attention,
    recurrent_decay_attention,
    tnl_decay_rates,
)
from lm.tnl.modeling_tnl import GatedLinearAttention, Lrpe, SimpleRMSNorm

# Fast (layer 0 of a deep model), medium, almost none (last layer), none.
DECAY = torch.tensor([1.0, 0.25, 1e-5, 0.0])


def tiny_config(**overrides) -> TNLConfig:
    kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        block_size=8,
    )
    kwargs.update(overrides)
    return TNLConfig(**kwargs)


def tiny_model(**overrides) -> TNLForCausalLM:
    torch.manual_seed(0)
    model = TNLForCausalLM(tiny_config(**overrides)).eval()
    # Random LRPE angles and larger weights than the 0.02 init, so every part matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def qkv(T: int, dk: int = 16, dv: int = 12, B: int = 2, nh: int = 4):
    q, k = torch.randn(B, nh, T, dk) * 0.3, torch.randn(B, nh, T, dk) * 0.3
    return q, k, torch.randn(B, nh, T, dv) * 0.3


# ----------------------------------------------------------------------------- decay rates


def test_decay_rates_follow_the_reference_formula():
    H, L = 4, 4  # s_h = 2^(-8h/H) = 2^(-2h), times 1 - l/(L-1) + 1e-5
    for layer, factor in [(0, 1 + 1e-5), (1, 2 / 3 + 1e-5), (3, 1e-5)]:
        expected = [2 ** (-2 * h) * factor for h in range(1, H + 1)]
        assert tnl_decay_rates(H, layer, L) == pytest.approx(expected, rel=1e-12)
    # One layer: no division by zero; it decays like a first layer.
    assert tnl_decay_rates(H, 0, 1) == tnl_decay_rates(H, 0, L)
    with pytest.raises(ValueError, match="layer_idx"):
        tnl_decay_rates(H, 4, L)


# ----------------------------------------------------------------------------- three forms


@pytest.mark.parametrize("T", [1, 7, 63, 130])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_blocked_recurrent_and_naive_forms_agree(T, block_size, with_state):
    q, k, v = qkv(T)
    state = torch.randn(2, 4, 16, 12) * 0.3 if with_state else None
    ref = naive_decay_attention(q, k, v, DECAY, initial_state=state)
    blocked, s_blocked = lightning_attention(q, k, v, DECAY, block_size, initial_state=state)
    recurrent, s_recurrent = recurrent_decay_attention(q, k, v, DECAY, initial_state=state)
    torch.testing.assert_close(blocked, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recurrent, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_blocked, s_recurrent, atol=1e-5, rtol=1e-5)


def test_naive_form_equals_the_definition_elementwise():
    # o_t = sum_{j<=t} lambda^{t-j} (q_t . k_j) v_j, written as loops.
    q, k, v = qkv(5, dk=3, dv=2, B=1, nh=4)
    out = naive_decay_attention(q, k, v, DECAY)
    for h in range(4):
        lam = math.exp(-DECAY[h].item())
        for t in range(5):
            expected = sum(
                lam ** (t - j) * (q[0, h, t] @ k[0, h, j]) * v[0, h, j] for j in range(t + 1)
            )
            torch.testing.assert_close(out[0, h, t], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_decode_as_the_float64_definition(dtype):
    """In bfloat16 a decay exp(-0.001) rounds to 1 and positions past 256 are not exact: the
    three forms compute in float32 for half inputs and return the input's dtype, the state
    float32. Against a float64 token loop over 400 tokens (slow decays, as TNL's deep layers):
    each form within bfloat16's own rounding of the answer, and decoding (the recurrent form)
    as close as the blocked prefill (it was 14-37 % off in bfloat16)."""
    torch.manual_seed(0)
    T, decay = 400, torch.tensor([0.001, 0.002, 0.01, 0.05])
    q, k, v = (torch.randn(1, 4, T, 8) * 0.3 for _ in range(3))
    lam = torch.exp(-decay.double())[None, :, None, None]
    state, ref = torch.zeros(1, 4, 8, 8, dtype=torch.float64), []
    for t in range(T):
        state = lam * state + k.double()[:, :, t, :, None] * v.double()[:, :, t, None, :]
        ref.append((q.double()[:, :, t, None, :] @ state).squeeze(-2))
    ref_out = torch.stack(ref, dim=2)
    half = [x.to(dtype) for x in (q, k, v)]
    for out in (
        naive_decay_attention(*half, decay),
        lightning_attention(*half, decay, 64)[0],
        recurrent_decay_attention(*half, decay)[0],
    ):
        assert out.dtype == dtype
        err = (out.double() - ref_out).norm() / ref_out.norm()
        assert err < 0.02, float(err)
    _, s = recurrent_decay_attention(*half, decay)
    assert s.dtype == torch.float32


def test_chunked_prefill_through_the_state_equals_one_pass():
    q, k, v = qkv(77)
    ref = naive_decay_attention(q, k, v, DECAY)
    first, state = lightning_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], DECAY, 16)
    second, _ = lightning_attention(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], DECAY, 16, state)
    torch.testing.assert_close(torch.cat([first, second], dim=2), ref, atol=1e-5, rtol=1e-5)


def test_blocked_gradients_equal_naive_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(45))
    weight = torch.randn(2, 4, 45, 12)
    (naive_decay_attention(q, k, v, DECAY) * weight).sum().backward()
    ref = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (lightning_attention(q, k, v, DECAY, 16)[0] * weight).sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shape_errors_are_specific():
    q, k, v = qkv(4)
    with pytest.raises(ValueError, match=r"decay of shape \(nh,\)"):
        lightning_attention(q, k, v, torch.ones(3))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, DECAY, 4, torch.zeros(2, 4, 16, 16))


# ----------------------------------------------------------------------------- LRPE and layers


def test_lrpe_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    lrpe = Lrpe(num_heads=2, head_dim=3)
    with torch.no_grad():
        lrpe.theta.add_(torch.rand_like(lrpe.theta))  # learned-looking angles
    q, k = torch.randn(1, 2, 6, 3), torch.randn(1, 2, 6, 3)
    pos = torch.arange(6)[None]
    scores = lrpe(q, pos) @ lrpe(k, pos).transpose(-1, -2)
    shifted = lrpe(q, pos + 1000) @ lrpe(k, pos + 1000).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted, atol=1e-4, rtol=1e-4)
    # Hand formula: sum_i q_i k_i cos(theta_i (t - s)).
    theta = lrpe.theta.detach()[:, 0]  # (nh, hd)
    for h, t, s in [(0, 5, 2), (1, 3, 3), (1, 1, 4)]:
        expected = (q[0, h, t] * k[0, h, s] * torch.cos(theta[h] * (t - s))).sum()
        torch.testing.assert_close(scores[0, h, t, s], expected, atol=1e-5, rtol=1e-5)


def test_lrpe_initial_angles_and_fixed_variant():
    lrpe = Lrpe(num_heads=2, head_dim=4)
    d = 8
    expected = torch.tensor([10000 ** (-2 * i / d) for i in range(d)]).reshape(2, 1, 4)
    torch.testing.assert_close(lrpe.theta.detach(), expected)
    fixed = Lrpe(num_heads=2, head_dim=4, learnable=False)
    assert list(fixed.parameters()) == []
    x, pos = torch.randn(1, 2, 3, 4), torch.arange(3)[None]
    torch.testing.assert_close(fixed(x, pos), lrpe(x, pos))


def test_simple_rms_norm_has_no_gain_and_unit_rms():
    norm = SimpleRMSNorm(eps=0.0)
    x = torch.randn(3, 5, 16) * 7
    y = norm(x)
    assert list(norm.parameters()) == []
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, 5))
    torch.testing.assert_close(y, x / x.norm(dim=-1, keepdim=True) * 4)


@pytest.mark.parametrize("gate", ["identity", "sigmoid"])
def test_gated_linear_attention_layer_matches_a_hand_written_reference(gate):
    """The paper's SRMSNorm(o) * u (identity, the default) and the bounded sigmoid(u) gate."""
    torch.manual_seed(0)
    C, nh, hd, T = 16, 2, 8, 11
    rates = tnl_decay_rates(nh, 0, 3)
    layer = GatedLinearAttention(C, nh, rates, Lrpe(nh, hd), gate, block_size=4, eps=1e-6)
    x = torch.randn(1, T, C)
    pos = torch.arange(T)[None]
    W = layer.qkvu_proj.weight.detach()
    q, k, v, u = (x @ W.T).chunk(4, dim=-1)
    theta = layer.lrpe.theta.detach()[:, 0]  # (nh, hd)
    out = torch.zeros(1, T, C)
    for h in range(nh):
        sl = slice(h * hd, (h + 1) * hd)
        qh, kh = F.silu(q[0, :, sl]), F.silu(k[0, :, sl])
        for t in range(T):
            acc = torch.zeros(hd)
            for j in range(t + 1):
                score = (qh[t] * kh[j] * torch.cos(theta[h] * (t - j))).sum()
                acc += math.exp(-rates[h] * (t - j)) * score * v[0, j, sl]
            out[0, t, sl] = acc
    normed = out / out.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    gated = u if gate == "identity" else torch.sigmoid(u)
    expected = (normed * gated) @ layer.out_proj.weight.detach().T
    torch.testing.assert_close(layer(x, pos), expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("attention_type", ["lightning", "softmax"])
def test_token_by_token_decoding_with_cache_equals_full_forward(attention_type):
    model = tiny_model(attention_type=attention_type)
    ids = torch.randint(0, 99, (2, 13))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, steps = None, []
        for t in range(13):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention_type", ["lightning", "softmax"])
def test_chunked_prefill_equals_full_forward(attention_type):
    model = tiny_model(attention_type=attention_type)
    ids = torch.randint(0, 99, (2, 21))  # 21 = 8 + 8 + 5 blocks; chunks cut inside blocks
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        a = model(ids[:, :10], use_cache=True)
        b = model(ids[:, 10:], cache=a.cache)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention_type", ["lightning", "softmax"])
def test_greedy_generate_equals_full_recompute_argmax_loop(attention_type):
    model = tiny_model(attention_type=attention_type)
    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=8, do_sample=False)
        seq = ids
        for _ in range(8):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_generate_decodes_one_token_per_step_with_the_state_cache():
    model = tiny_model()
    seen: list[tuple[int, str]] = []
    inner = model.model.forward

    def spy(**kwargs):
        seen.append((kwargs["input_ids"].shape[1], type(kwargs["cache"]).__name__))
        return inner(**kwargs)

    model.model.forward = spy
    with torch.no_grad():
        model.generate(torch.randint(0, 99, (1, 12)), max_new_tokens=4, do_sample=False)
    assert seen == [(12, "NoneType")] + [(1, "TNLCache")] * 3


def _cache_numel(model, context: int) -> tuple[list[tuple[int, ...]], int]:
    with torch.no_grad():
        out = model(torch.randint(0, 99, (1, context)), use_cache=True)
        out = model(torch.randint(0, 99, (1, 1)), cache=out.cache)
    assert isinstance(out.cache, TNLCache)
    tensors = out.cache.tensors()
    return [tuple(t.shape) for t in tensors], sum(t.numel() for t in tensors)


def test_state_cache_size_does_not_grow_with_context():
    model = tiny_model()
    shapes_short, numel_short = _cache_numel(model, 8)
    shapes_long, numel_long = _cache_numel(model, 200)
    assert shapes_short == shapes_long
    assert numel_short == numel_long
    # Layer 0 has LRPE (dk = 2 hd), layer 1 does not: (B, nh, dk, hd).
    assert shapes_long == [(1, 4, 16, 8), (1, 4, 8, 8)]
    # The softmax variant's KV cache grows with the context: 2 layers x (K, V) x (S + 1) tokens.
    soft = tiny_model(attention_type="softmax")
    _, soft_short = _cache_numel(soft, 8)
    _, soft_long = _cache_numel(soft, 200)
    assert (soft_short, soft_long) == (2 * 2 * 9 * 32, 2 * 2 * 201 * 32)


@pytest.mark.parametrize("attention_type", ["lightning", "softmax"])
def test_left_padded_batch_generates_what_each_row_generates_alone(attention_type):
    model = tiny_model(attention_type=attention_type, pad_token_id=0)
    short, long = torch.randint(1, 99, (1, 5)), torch.randint(1, 99, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
        alone_short = model.generate(short, max_new_tokens=5, do_sample=False)
        alone_long = model.generate(long, max_new_tokens=5, do_sample=False)
    assert torch.equal(both[0, 9:], alone_short[0, 5:])
    assert torch.equal(both[1, 9:], alone_long[0, 9:])


def test_other_cache_types_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="TNLCache"):
        model(torch.randint(0, 99, (1, 3)), cache=DynamicCache())


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model(moe={"num_experts": 3, "top_k": 2, "every": 2})
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "polychrome_tnl"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TNLForCausalLM)
    ids = torch.randint(0, 99, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # The perturbed LRPE angles were loaded, not re-initialised.
    assert torch.equal(
        loaded.model.layers[0].token_mixer.lrpe.theta, model.model.layers[0].token_mixer.lrpe.theta
    )
    # the gate is the paper's by default, and a model saved with another gate keeps it
    assert TNLConfig().gate_act == "identity" and loaded.config.gate_act == "identity"
    sigmoid = TNLForCausalLM(TNLConfig(**{**model.config.to_dict(), "gate_act": "sigmoid"}))
    sigmoid.save_pretrained(tmp_path / "sigmoid")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sigmoid").config.gate_act == "sigmoid"


def test_auto_model_from_config_builds_both_variants():
    for attention_type in ("lightning", "softmax"):
        model = AutoModelForCausalLM.from_config(tiny_config(attention_type=attention_type))
        assert isinstance(model, TNLForCausalLM)
        assert model.config.attention_type == attention_type
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied by default
    assert isinstance(AutoConfig.for_model("polychrome_tnl"), TNLConfig)


def test_lrpe_placement_follows_the_config():
    def lrpe_layers(model):
        return [layer.token_mixer.lrpe is not None for layer in model.model.layers]

    assert lrpe_layers(TNLForCausalLM(tiny_config(num_hidden_layers=3))) == [True, False, False]
    assert lrpe_layers(TNLForCausalLM(tiny_config(num_hidden_layers=3, lrpe="all"))) == [True] * 3
    assert lrpe_layers(TNLForCausalLM(tiny_config(lrpe="none"))) == [False, False]


def test_one_layer_model_uses_first_layer_decay():
    model = tiny_model(num_hidden_layers=1)
    assert model.model.layers[0].token_mixer.decay_rates == tuple(tnl_decay_rates(4, 0, 1))
    assert torch.isfinite(model(torch.randint(0, 99, (1, 5))).logits).all()


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        tiny_config(hidden_size=30)
    with pytest.raises(ValueError, match=r"attention_type must be one of \['lightning', 'soft"):
        tiny_config(attention_type="linear")
    with pytest.raises(ConfigError, match="top_k"):
        tiny_config(moe={"num_experts": 2, "top_k": 3})
    with pytest.raises(ConfigError, match="unknown field"):
        tiny_config(moe={"experts": 2})


def test_moe_losses_are_returned_and_added_with_their_coefficients():
    moe = {"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.5, "z_loss_coef": 0.25, "every": 2}
    model = tiny_model(moe=moe, num_hidden_layers=4)
    ids = torch.randint(0, 99, (2, 7))
    out = model(ids, labels=ids)
    assert len(out.expert_load) == 2  # layers 1 and 3
    assert all(int(load.sum()) == 2 * 7 * 2 for load in out.expert_load)
    torch.testing.assert_close(
        out.loss, out.lm_loss + 0.5 * out.aux_loss + 0.25 * out.router_z_loss
    )
    logits = model(ids).logits
    lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, 99), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, lm_loss)
    dense = tiny_model()(ids, labels=ids)
    assert dense.aux_loss is None and dense.expert_load is None
    assert torch.equal(dense.loss, dense.lm_loss)


@pytest.mark.parametrize("attention_type", ["lightning", "softmax"])
def test_training_lowers_the_loss_on_a_repeated_sequence(attention_type):
    torch.manual_seed(0)
    model = TNLForCausalLM(tiny_config(attention_type=attention_type)).train()
    ids = torch.randint(0, 99, (4, 24))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
