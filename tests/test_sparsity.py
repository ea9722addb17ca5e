"""lm.sparsity: N:M masks, magnitude / Wanda / SparseGPT against naive references, sequential
calibration, sparse checkpoints, the semi-structured CPU error path."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import lm.tnl
from core.checkpoint import CheckpointError
from lm.corpus import pydoc_corpus
from lm.sparsity import (
    NM,
    HessianStats,
    InputNormStats,
    apply_mask,
    apply_sparse_checkpoint,
    calibration_rows,
    check_nm,
    heldout_rows,
    lm_nll,
    load_sparse_checkpoint,
    load_sparse_model,
    magnitude_mask,
    mask_to_patterns,
    patterns_to_mask,
    prunable_linears,
    prune_oneshot,
    save_sparse_checkpoint,
    sequential_calibrate,
    sparsegpt_prune,
    to_semi_structured,
    wanda_mask,
    weights_digest,
)
from lm.sparsity.masks import compress_kept, decompress_kept

TWO_FOUR = NM(2, 4)


# Tiny models on a shared 2-core machine: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib(tiny_lm):
    _, tokenizer = tiny_lm
    return calibration_rows(tokenizer, pydoc_corpus().train, n_seqs=6, seq_len=32, seed=0)


def tiny_tnl() -> lm.tnl.TNLForCausalLM:
    torch.manual_seed(0)
    config = lm.tnl.TNLConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    return lm.tnl.TNLForCausalLM(config).eval()


# ----------------------------------------------------------------------------------------------
# Patterns and masks


def test_2_4_has_six_patterns_in_maskllm_order():
    expected = [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert TWO_FOUR.patterns.tolist() == [[bool(v) for v in row] for row in expected]
    assert len(NM(4, 8).patterns) == 70 and (NM(4, 8).patterns.sum(1) == 4).all()
    assert NM.parse("1:4") == NM(1, 4) and TWO_FOUR.sparsity == 0.5


@pytest.mark.parametrize("spec", ["2-4", "5:4", "0:4", "a:b", "2:4:8"])
def test_bad_nm_specs_are_rejected(spec):
    with pytest.raises(ValueError, match=r"N:M|N <= M"):
        NM.parse(spec)


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(4, 8), NM(4, 4)])
def test_magnitude_mask_equals_a_naive_per_group_loop(nm):
    w = torch.randn(6, 16)
    mask = magnitude_mask(w, nm)
    naive = torch.zeros_like(mask)
    for r, g in itertools.product(range(6), range(16 // nm.m)):
        cols = list(range(g * nm.m, (g + 1) * nm.m))
        for c in sorted(cols, key=lambda c: -abs(float(w[r, c])))[: nm.n]:
            naive[r, c] = True
    assert torch.equal(mask, naive)
    check_nm(mask, nm)


def test_check_nm_names_the_first_bad_group():
    mask = magnitude_mask(torch.randn(3, 8), TWO_FOUR)
    check_nm(mask, TWO_FOUR)
    mask[1, 5] = ~mask[1, 5]
    with pytest.raises(ValueError, match=r"1 of 6 groups.*row 1, columns 4\.\.7"):
        check_nm(mask, TWO_FOUR, name="layer")
    weight = apply_mask(torch.randn(3, 8), magnitude_mask(torch.randn(3, 8), TWO_FOUR))
    weight[0, 0] = 0.0  # a kept weight that happens to be zero: fewer than N is allowed
    check_nm(weight, TWO_FOUR, exact=False)
    with pytest.raises(ValueError, match="not a multiple"):
        check_nm(torch.ones(2, 6), TWO_FOUR)


def test_pattern_indices_and_kept_values_round_trip():
    w = torch.randn(5, 12)
    for nm in (TWO_FOUR, NM(1, 4), NM(3, 6)):
        mask = magnitude_mask(w, nm)
        idx = mask_to_patterns(mask, nm)
        assert idx.dtype == torch.uint8 and idx.shape == (5, 12 // nm.m)
        assert torch.equal(patterns_to_mask(idx, nm), mask)
        kept = compress_kept(w, mask, nm)
        assert kept.shape == (5, 12 * nm.n // nm.m)
        assert torch.equal(decompress_kept(kept, mask), apply_mask(w, mask))


def test_default_layer_selection_is_the_decoder_linears(tiny_lm):
    model, _ = tiny_lm
    layers = prunable_linears(model, TWO_FOUR)
    per_block = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sorted(layers) == sorted(
        f"model.layers.{i}.{'self_attn' if j < 4 else 'mlp'}.{p}"
        for i in range(2)
        for j, p in enumerate(per_block)
    )
    mlp = prunable_linears(model, TWO_FOUR, include=["*.mlp.*"], exclude=["*.down_proj"])
    assert sorted(mlp) == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")
    ]
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        prunable_linears(model, TWO_FOUR, include=["nothing.*"])
    with pytest.raises(ValueError, match="do not divide"):
        prunable_linears(model, NM(2, 3))
    tnl = prunable_linears(tiny_tnl(), TWO_FOUR)
    assert "lm_head" not in tnl and all(k.startswith("model.layers.") for k in tnl)


# ----------------------------------------------------------------------------------------------
# Wanda


def test_wanda_equals_a_naive_computation_on_a_hand_made_layer():
    # Column 1 has small weights but large inputs, so Wanda keeps it where magnitude does not.
    w = torch.tensor(
        [[4.0, 1.0, 3.0, 2.0, -1.0, 0.5, 2.0, -3.0], [1.0, -2.0, 0.1, 3.0, 2.0, 2.0, -2.0, 1.5]]
    )
    x1 = torch.tensor(
        [[1.0, 10.0, 1.0, 1.0, 1.0, 1.0, 0.1, 1.0], [0.0, 5.0, 2.0, 1.0, 3.0, 1.0, 0.2, 2.0]]
    )
    x2 = torch.tensor([[[2.0, 8.0, 0.0, 1.0, 1.0, 2.0, 0.1, 1.0]]])  # (B, T, I) batches work too
    stats = InputNormStats(8)
    stats.add(x1)
    stats.add(x2)
    tokens = torch.cat([x1, x2.reshape(1, 8)])
    norms = [sum(float(tokens[k, j]) ** 2 for k in range(3)) ** 0.5 for j in range(8)]
    assert torch.allclose(stats.norms, torch.tensor(norms, dtype=torch.float64))
    naive = torch.zeros(2, 8, dtype=torch.bool)
    for r in range(2):
        for g in range(2):
            cols = range(4 * g, 4 * g + 4)
            scores = {c: abs(float(w[r, c])) * norms[c] for c in cols}
            for c in sorted(cols, key=lambda c: -scores[c])[:2]:
                naive[r, c] = True
    mask = wanda_mask(w, stats.norms, TWO_FOUR)
    assert torch.equal(mask, naive)
    assert mask[0, 1] and not magnitude_mask(w, TWO_FOUR)[0, 1]


# ----------------------------------------------------------------------------------------------
# SparseGPT


def correlated_layer(out_f: int = 32, in_f: int = 64, tokens: int = 1024):
    """A random layer and inputs whose columns are strongly correlated (low-rank + noise)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    z = torch.randn(tokens, 8, generator=gen, dtype=torch.float64)
    mix = torch.randn(8, in_f, generator=gen, dtype=torch.float64)
    x = z @ mix + 0.1 * torch.randn(tokens, in_f, generator=gen, dtype=torch.float64)
    stats = HessianStats(in_f)
    for chunk in x.split(300):
        stats.add(chunk)
    return w, x, stats.hessian


def test_hessian_stats_is_2_xxt_over_tokens():
    _, x, h = correlated_layer()
    assert torch.allclose(h, 2 * x.T @ x / len(x), rtol=1e-5, atol=1e-6)


def naive_sparsegpt(w, h, nm, percdamp=0.01):
    """SparseGPT without blocks or Cholesky: column by column, the OBS update from the explicit
    inverse of H restricted to the columns not yet processed (the paper's H_F^-1)."""
    w = w.clone().double()
    h = h.double() + percdamp * torch.diag(h).mean() * torch.eye(len(h), dtype=torch.float64)
    cols = w.shape[1]
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for q in range(cols):
        if q % nm.m == 0:
            diag = torch.tensor([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(q, q + nm.m)])
            saliency = w[:, q : q + nm.m] ** 2 / diag  # w^2 / [H_F^-1]_jj
            for r in range(w.shape[0]):
                for c in torch.argsort(saliency[r])[: nm.m - nm.n]:
                    pruned[r, q + int(c)] = True
        hinv = torch.linalg.inv(h[q:, q:])
        target = torch.where(pruned[:, q], torch.zeros_like(w[:, q]), w[:, q])
        err = (w[:, q] - target) / hinv[0, 0]
        w[:, q:] -= err[:, None] * hinv[0][None, :]
    return w, ~pruned


def test_sparsegpt_equals_the_naive_obs_reference_across_blocks():
    w, _, h = correlated_layer(out_f=6, in_f=32)
    result = sparsegpt_prune(w, h, TWO_FOUR, blocksize=8)  # 4 blocks: lazy updates between them
    ref_w, ref_mask = naive_sparsegpt(w, h, TWO_FOUR)
    assert torch.equal(result.mask, ref_mask)
    assert torch.allclose(result.weight, ref_w, atol=1e-9)
    check_nm(result.mask, TWO_FOUR)
    assert torch.equal(result.weight == 0, ~result.mask)


def test_sparsegpt_reduces_reconstruction_error_vs_magnitude_and_wanda():
    w, x, h = correlated_layer()

    def err(w2):
        return float(torch.linalg.norm(x @ w.T - x @ w2.T))

    sgpt = sparsegpt_prune(w, h, TWO_FOUR)
    check_nm(sgpt.mask, TWO_FOUR)
    e_mag = err(apply_mask(w, magnitude_mask(w, TWO_FOUR)))
    e_wanda = err(apply_mask(w, wanda_mask(w, x.pow(2).sum(0).sqrt(), TWO_FOUR)))
    e_sgpt = err(sgpt.weight)
    assert e_sgpt < 0.5 * e_mag and e_sgpt < 0.5 * e_wanda, (e_sgpt, e_mag, e_wanda)


def test_sparsegpt_at_zero_sparsity_returns_the_dense_weights():
    w, _, h = correlated_layer()
    result = sparsegpt_prune(w.float(), h, NM(4, 4))
    assert result.mask.all() and result.loss == 0.0
    assert torch.allclose(result.weight, w.float(), atol=1e-6)


def test_sparsegpt_prunes_dead_inputs_first():
    w, _, h = correlated_layer(out_f=4, in_f=8)
    h[2, :] = 0.0
    h[:, 2] = 0.0
    result = sparsegpt_prune(w, h, TWO_FOUR)
    assert not result.mask[:, 2].any()


# ----------------------------------------------------------------------------------------------
# Whole models


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ["llama", "tnl"])
def test_every_pruned_layer_is_exactly_2_4(tiny_lm, calib, method, arch):
    model = copy.deepcopy(tiny_lm[0]) if arch == "llama" else tiny_tnl()
    rows = calib if arch == "llama" else calib.clamp(max=299)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = prune_oneshot(model, method, TWO_FOUR, rows, progress=False)
    modules = dict(model.named_modules())
    assert sorted(masks) == sorted(prunable_linears(model, TWO_FOUR))
    for name, mask in masks.items():
        check_nm(mask, TWO_FOUR, name=name)
        check_nm(modules[name].weight, TWO_FOUR, exact=False, name=name)
        assert not modules[name].weight[~mask].any()
        if method != "sparsegpt":  # only SparseGPT updates the kept weights
            assert torch.equal(modules[name].weight[mask], before[f"{name}.weight"][mask])
    pruned = {f"{n}.weight" for n in masks}
    for key, value in model.state_dict().items():
        if key not in pruned:
            assert torch.equal(value, before[key]), key


def test_calibration_sees_the_outputs_of_the_pruned_blocks(tiny_lm, calib):
    model = copy.deepcopy(tiny_lm[0])
    layers = prunable_linears(model, TWO_FOUR)
    watched = "model.layers.1.self_attn.q_proj"
    seen = {}

    def make_stats(layer):
        stats = InputNormStats(layer.in_features)
        return stats

    def prune(name, layer, stats):
        seen[name] = stats.norms.clone()
        with torch.no_grad():
            layer.weight.copy_(apply_mask(layer.weight, magnitude_mask(layer.weight, TWO_FOUR)))

    dense_inputs = InputNormStats(32)
    hook = model.get_submodule(watched).register_forward_hook(
        lambda m, i, o: dense_inputs.add(i[0])
    )
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    hook.remove()
    sequential_calibrate(model, calib, layers, make_stats, prune, progress=False)
    pruned_inputs = InputNormStats(32)
    hook = model.get_submodule(watched).register_forward_hook(
        lambda m, i, o: pruned_inputs.add(i[0])
    )
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    hook.remove()
    # q_proj of block 1 reads block 0's output only: calibration saw block 0 pruned
    assert torch.allclose(seen[watched], pruned_inputs.norms, rtol=1e-5)
    assert not torch.allclose(seen[watched], dense_inputs.norms, rtol=1e-3)


def test_calibration_rows_are_seeded_and_bounded(tiny_lm):
    _, tokenizer = tiny_lm
    docs = pydoc_corpus().train
    a = calibration_rows(tokenizer, docs, 4, 32, seed=1)
    assert torch.equal(a, calibration_rows(tokenizer, docs, 4, 32, seed=1))
    assert not torch.equal(a, calibration_rows(tokenizer, docs, 4, 32, seed=2))
    with pytest.raises(ValueError, match="packs into"):
        calibration_rows(tokenizer, docs[:1], 10_000, 32)
    held = heldout_rows(tokenizer, pydoc_corpus().heldout, 32, max_rows=3)
    assert held.shape == (3, 32)


# ----------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_sparse_checkpoint_round_trip(tiny_lm, calib, tmp_path, method):
    dense = tiny_lm[0]
    model = copy.deepcopy(dense)
    names = list(prunable_linears(model, TWO_FOUR))
    digest = weights_digest(model, names)
    masks = prune_oneshot(model, method, TWO_FOUR, calib, progress=False)
    path = save_sparse_checkpoint(
        tmp_path / "ckpt",
        model,
        masks,
        TWO_FOUR,
        source="tiny-random-llama",
        method=method,
        kept_values=method == "sparsegpt",
        source_digest=digest,
    )
    ckpt = load_sparse_checkpoint(path)
    assert (
        ckpt.method == method
        and ckpt.nm == TWO_FOUR
        and (ckpt.values is not None) == (method == "sparsegpt")
    )
    assert all(torch.equal(ckpt.masks[n], masks[n]) for n in names)
    loaded, _, _ = load_sparse_model(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    other = copy.deepcopy(dense)
    with torch.no_grad():
        other.get_submodule(names[0]).weight.add_(1e-3)
    with pytest.raises(CheckpointError, match="not those the masks were made for"):
        apply_sparse_checkpoint(other, ckpt)


def test_masks_are_stored_as_one_byte_per_group(tiny_lm, tmp_path):
    model = copy.deepcopy(tiny_lm[0])
    masks = prune_oneshot(model, "magnitude", TWO_FOUR, progress=False)
    path = save_sparse_checkpoint(
        tmp_path / "c", model, masks, TWO_FOUR, source="x", method="magnitude",
        kept_values=False, source_digest=None,
    )  # fmt: skip
    weights = sum(m.numel() for m in masks.values())
    assert (path / "masks.safetensors").stat().st_size < weights // 4 + 4096


def test_lm_nll_counts_every_predicted_token(tiny_lm, calib):
    model, _ = tiny_lm
    nll, count = lm_nll(model, calib[:3], batch_size=2, desc="")
    assert count == 3 * 31
    with torch.no_grad():
        logits = model(input_ids=calib[:3]).logits[:, :-1]
    ref = nn.functional.cross_entropy(
        logits.flatten(0, 1), calib[:3, 1:].flatten(), reduction="sum"
    )
    assert nll == pytest.approx(float(ref), rel=1e-5)


def test_semi_structured_conversion_refuses_cpu_with_a_clear_error(tiny_lm):
    model = copy.deepcopy(tiny_lm[0])
    masks = prune_oneshot(model, "magnitude", TWO_FOUR, progress=False)
    with pytest.raises(ValueError, match="CUDA GPUs"):
        to_semi_structured(model, list(masks))


def _semi_structured_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.skipif(not _semi_structured_gpu(), reason="needs a CUDA GPU with compute cap. >= 8")
@pytest.mark.parametrize("backend", ["auto", "cutlass"])
def test_semi_structured_model_matches_its_dense_pruned_copy_on_cuda(backend):
    """The device check of the real kernels: a random Llama pruned 2:4, its linear weights
    swapped for SparseSemiStructuredTensor, gives the logits of the same pruned model run dense.
    (Runs only on a CUDA machine; the CPU suite checks the refusal above.)"""
    from torch.sparse import SparseSemiStructuredTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    masks = prune_oneshot(model, "magnitude", TWO_FOUR, progress=False)
    model = model.to("cuda", torch.float16)
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.no_grad():
        dense = model(input_ids=ids).logits.float()
    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        # torch's CUTLASS kernels: 8.x only (on an H200 the matmul itself raised); refused first
        with pytest.raises(ValueError, match=r"8\.x \(Ampere, Ada\)"):
            to_semi_structured(model, list(masks), backend=backend)
        return
    to_semi_structured(model, list(masks), backend=backend)
    swapped = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None),
               SparseSemiStructuredTensor)]  # fmt: skip
    assert sorted(swapped) == sorted(masks)
    with torch.no_grad():
        sparse = model(input_ids=ids).logits.float()
    scale = dense.abs().max()
    assert (sparse - dense).abs().max() <= 2e-2 * scale
    assert not torch.equal(dense, torch.zeros_like(dense))


@pytest.mark.parametrize(
    ("capability", "backend", "cusparselt", "error"),
    [
        ((9, 0), "cutlass", True, r"8\.x \(Ampere, Ada\).*has 9\.0"),
        ((9, 0), "auto", True, None),
        ((8, 6), "cutlass", True, None),
        ((7, 5), "auto", True, r"compute capability >= 8\.0.*has 7\.5"),
        ((9, 0), "auto", False, r"no cuSPARSELt.*has 9\.0"),
        ((8, 0), "auto", False, None),
    ],
)
def test_semi_structured_device_check_by_compute_capability(
    monkeypatch, capability, backend, cusparselt, error
):
    """Which GPUs the refusal lets through, with the CUDA queries stubbed: cuSPARSELt from 8.0
    up, torch's CUTLASS kernels (asked for, or auto's fallback without cuSPARSELt) on 8.x only
    (an H200 raised at the first matmul)."""
    from lm.sparsity.semi_structured import require_semi_structured_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    if error is None:
        require_semi_structured_device("cuda", backend)
    else:
        with pytest.raises(ValueError, match=error):
            require_semi_structured_device("cuda", backend)
