"""Decoding methods over a causal LM (tiny random Llama): hidden-state optimisation, conditional
beam search, and the generate_with registry."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import NoRepeatNGramLogitsProcessor

from lm.decoding import (
    GeneratedNoRepeatNGramLogitsProcessor,
    beam_search,
    cache_nll,
    conditional_beam_search,
    degeneracy,
    generate_with,
    hso_generate,
    list_methods,
    optimise_hidden_states,
    repetition_rate,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(tokenizer, n: int = 24, seed: int = 0) -> torch.Tensor:
    """(1, n) ids of ordinary tokens (no special token)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, len(tokenizer) - 10, (1, n), generator=g)


def plain_nll(model, ids: torch.Tensor, score_from: int) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, score_from - 1 : -1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, score_from:], reduction="none").mean(1)


# ----------------------------------------------------------------------------------------------
# Hidden-state optimisation


def test_hso_lowers_the_context_nll_and_leaves_the_weights_alone(tiny_lm):
    model, tok = tiny_lm
    ids = torch.cat([prompt(tok, 30, 0), prompt(tok, 30, 1)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = optimise_hidden_states(model, ids, recent_tokens=12, steps=6, lr=2e-2)
    nll = result.context_nll
    assert len(nll) == 7 and result.past_length == 18
    assert nll[-1] < nll[0] - 0.05  # the direction the paper claims, on the text it optimises
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(nll))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    k0, _ = result.key_values[0]
    assert k0.shape[0] == 2 and k0.shape[2] == 18 and not k0.requires_grad


def test_hso_with_zero_steps_is_the_plain_model(tiny_lm):
    model, tok = tiny_lm
    ids = prompt(tok, 20)
    result = optimise_hidden_states(model, ids, recent_tokens=8, steps=0)
    with torch.no_grad():
        ref = plain_nll(model, ids, score_from=13)  # tokens 13..19 given all before them
        torch.testing.assert_close(torch.tensor(result.context_nll[0]), ref[0], atol=1e-5, rtol=0)
        # the cache reproduces the full-context NLL of any continuation
        got = cache_nll(model, result.key_values, ids[:, 12:], score_from=1)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_hso_steps_change_the_prediction_of_unseen_text(tiny_lm):
    model, tok = tiny_lm
    ids = prompt(tok, 40)
    seen, tail = ids[:, :30], ids[:, 20:]
    result = optimise_hidden_states(model, seen, recent_tokens=10, steps=3, lr=2e-2)
    with torch.no_grad():
        base = plain_nll(model, ids, score_from=30)
        after = cache_nll(model, result.key_values, tail, score_from=10)
    assert not torch.allclose(base, after)


def test_hso_generate_runs_inside_inference_mode(tiny_lm):
    model, tok = tiny_lm
    ids = prompt(tok, 16)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.inference_mode():  # the app's generate thread
        out, result = hso_generate(model, ids, recent_tokens=6, steps=2, lr=1e-2, **kw)
        plain, none = hso_generate(model, ids, steps=0, **kw)
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert out.shape == (1, 22) and result is not None and len(result.context_nll) == 3
    assert none is None and torch.equal(plain, ref)


def test_hso_rejects_bad_settings(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ValueError, match="recent_tokens must be in"):
        optimise_hidden_states(model, prompt(tok, 10), recent_tokens=10)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        optimise_hidden_states(model, prompt(tok, 10)[0])


# ----------------------------------------------------------------------------------------------
# Conditional beam search


def test_repetition_and_degeneracy_hand_examples():
    assert repetition_rate([1, 2, 1, 2, 1], 2) == 0.5  # 12 21 12 21: two of four repeat
    assert repetition_rate([1, 2, 3], 3) == 0.0 and repetition_rate([1], 2) == 0.0
    assert degeneracy([]) == {"length": 0.0, "empty": 1.0, "repeat_2gram": 0.0, "repeat_3gram": 0.0}


def test_generated_no_repeat_ngram_ignores_the_prompt():
    ids = torch.tensor([[5, 6, 7, 9, 5, 6]])  # prompt 5 6 7 9, generated 5 6
    scores = torch.zeros(1, 10)
    library = NoRepeatNGramLogitsProcessor(3)(ids, scores.clone())
    ours = GeneratedNoRepeatNGramLogitsProcessor(3, prompt_length=4)(ids, scores.clone())
    assert library[0, 7] == -torch.inf  # the library bans copying "5 6 7" from the prompt
    assert torch.isfinite(ours).all()
    ids = torch.tensor([[9, 5, 6, 7, 5, 6]])  # prompt 9, generated 5 6 7 5 6
    ours = GeneratedNoRepeatNGramLogitsProcessor(3, prompt_length=1)(ids, scores.clone())
    assert ours[0, 7] == -torch.inf and torch.isfinite(ours[0, :7]).all()


def eos_first_model(model, ids: torch.Tensor, eos: int, margin: float = 30.0):
    """A copy of `model` whose most likely first token after `ids` is EOS: the (tied) EOS
    embedding row is set along the last hidden state so its logit beats every other by
    `margin` there."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[0, -1]
        logits = model.lm_head(h)
        weight = model.lm_head.weight
        weight[eos] = h / h.pow(2).sum() * (logits.max() + margin)
        assert model(input_ids=ids).logits[0, -1].argmax() == eos
    return model


@pytest.mark.parametrize("width", [1, 4])
def test_plain_beam_returns_the_empty_output_conditional_never_does(tiny_lm, width):
    base, tok = tiny_lm
    ids = prompt(tok, 12)
    eos = tok.eos_token_id
    model = eos_first_model(base, ids, eos)
    kw = {"num_beams": width, "max_new_tokens": 6, "eos_token_id": eos}
    plain = beam_search(model, ids, **kw)
    cond = conditional_beam_search(model, ids, min_new_tokens=2, **kw)
    assert plain.lengths.tolist() == [0] and plain.finished.tolist() == [True]
    assert cond.lengths[0] >= 2
    # the empty output is the mode: its probability beats the conditional mode's
    assert plain.log_likelihood[0] > cond.log_likelihood[0]


@pytest.mark.parametrize("width", [1, 2, 4])
def test_plain_beam_repeats_conditional_does_not(tiny_lm, width):
    model, tok = tiny_lm
    ids = prompt(tok, 12)
    kw = {"num_beams": width, "max_new_tokens": 16, "eos_token_id": tok.eos_token_id}
    plain = beam_search(model, ids, **kw)
    cond = conditional_beam_search(model, ids, no_repeat_ngram_size=3, **kw)
    plain_tokens = plain.sequences[0, : plain.lengths[0]].tolist()
    cond_tokens = cond.sequences[0, : cond.lengths[0]].tolist()
    assert repetition_rate(plain_tokens, 3) > 0.5  # the random model loops
    assert repetition_rate(cond_tokens, 3) == 0.0 and len(cond_tokens) > 0
    assert plain.log_likelihood[0] >= cond.log_likelihood[0]  # the loop is more likely


def test_beam_scores_are_the_models_log_likelihood(tiny_lm):
    model, tok = tiny_lm
    ids = prompt(tok, 10)
    out = conditional_beam_search(
        model, ids, num_beams=3, max_new_tokens=8, eos_token_id=tok.eos_token_id
    )
    n = int(out.scored_tokens[0])
    seq, total = ids, 0.0
    with torch.no_grad():
        for t in range(n):  # naive step-by-step reference
            logp = F.log_softmax(model(input_ids=seq).logits[0, -1], dim=-1)
            token = out.sequences[0, t]
            total += float(logp[token])
            seq = torch.cat([seq, token.view(1, 1)], dim=1)
    assert out.log_likelihood[0].item() == pytest.approx(total, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_methods_and_rejects_unknown_names(tiny_lm):
    model, tok = tiny_lm
    assert list_methods() == [
        "beam",
        "conditional_beam",
        "greedy",
        "hidden_state_optimisation",
        "recurrent",
    ]
    with pytest.raises(ValueError, match=r"valid:.*conditional_beam"):
        generate_with("nucleus", model, prompt(tok))
    with pytest.raises(ValueError, match="needs memory="):
        generate_with("recurrent", model, prompt(tok), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        generate_with("greedy", model, torch.cat([prompt(tok), prompt(tok)]))


def test_registry_methods_decode_one_prompt(tiny_lm):
    model, tok = tiny_lm
    ids = prompt(tok, 16)
    kw = {"max_new_tokens": 5, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    greedy = generate_with("greedy", model, ids, **kw)
    ref = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=5,
        pad_token_id=tok.pad_token_id,
    )
    assert torch.equal(greedy.new_tokens, ref[:, 16:])
    assert torch.equal(
        generate_with("beam", model, ids, num_beams=1, **kw).new_tokens, greedy.new_tokens
    )
    cond = generate_with("conditional_beam", model, ids, num_beams=2, **kw)
    assert cond.new_tokens.shape[1] >= 1 and cond.info["log_likelihood"] < 0
    with torch.inference_mode():
        hso = generate_with(
            "hidden_state_optimisation", model, ids, recent_tokens=8, steps=2, lr=1e-2, **kw
        )
    assert hso.new_tokens.shape == (1, 5) and len(hso.info["context_nll"]) == 3
