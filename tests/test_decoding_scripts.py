"""Smoke tests of the decoding scripts at tiny settings: they run, write JSON + markdown + plot,
and what they report has the right shape and direction."""

from __future__ import annotations

import json

import pytest
import torch

from eval import decoding as eval_decoding
from lm.decoding import generate_with, load_recurrent_memory
from train import decoding_adjust, decoding_recurrence, decoding_sundae

pytestmark = pytest.mark.usefixtures("one_thread")


def outputs(out, name: str) -> dict:
    for ext in ("json", "md", "png"):
        assert (out / f"{name}.{ext}").is_file(), f"{name}.{ext} missing"
    return json.loads((out / f"{name}.json").read_text())


def test_eval_hso_smoke(tmp_path):
    argv = [
        "hso",
        "--model",
        "tiny-random-llama",
        "--passages",
        "2",
        "--tune-passages",
        "1",
        "--past",
        "16",
        "--recent",
        "8",
        "--continuation",
        "8",
        "--lrs",
        "1e-2",
        "3e-2",
        "--steps",
        "1",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert eval_decoding.main(argv) == 0
    result = outputs(tmp_path, "decoding_hso")
    assert result["passages"] == 2 and len(result["rows"]) == 4
    assert sum(r["picked_on_train"] for r in result["rows"]) == 2  # one lr, both step counts
    for row in result["rows"]:  # HSO lowers the NLL of the text it optimises on
        assert row["context_nll"] < result["baseline"]["context_nll"]
    assert result["command"].startswith("python -m eval.decoding hso")


def test_eval_beam_smoke(tmp_path):
    argv = [
        "beam",
        "--model",
        "tiny-random-llama",
        "--widths",
        "1",
        "2",
        "--max-new-tokens",
        "10",
        "--chat-prompts",
        "2",
        "--raw-prompts",
        "1",
        "--raw-prompt-tokens",
        "16",
        "--out",
        str(tmp_path),
    ]
    assert eval_decoding.main(argv) == 0
    result = outputs(tmp_path, "decoding_beam")
    rows = {(r["prompts"], r["width"], r["method"]): r for r in result["rows"]}
    for width in (1, 2):
        assert rows["all", width, "conditional"]["repeat_3gram"] == 0.0
        assert rows["all", width, "conditional"]["empty"] == 0.0
        assert rows["all", width, "plain"]["repeat_3gram"] > 0.5  # the random model loops
    assert len(result["outputs"]) == 2 * 2 * 3


def test_train_adjust_smoke_and_resume(tmp_path):
    argv = [
        "--out",
        str(tmp_path),
        "--length",
        "4",
        "--mdlm-steps",
        "3",
        "--sampler-steps",
        "2",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--batch-size",
        "16",
        "--samples",
        "64",
        "--tokens-per-step",
        "2",
    ]
    assert decoding_adjust.main(argv) == 0
    result = outputs(tmp_path, "decoding_adjust")
    names = [r["sampler"] for r in result["rows"]]
    assert names[:3] == ["K=1 exact", "K=2 marginal", "K=2 ADJUST"]
    assert [r["full_passes"] for r in result["rows"][:3]] == [4, 2, 2]
    assert result["rows"][2]["sampler_passes"] == 2
    assert result["rows"][3]["validity"] == 1.0  # exact samples of the language
    assert decoding_adjust.main([*argv, "--resume"]) == 0
    again = outputs(tmp_path, "decoding_adjust")
    assert again["training"]["mdlm"]["resumed"] and again["training"]["sampler"]["resumed"]
    assert again["rows"] == result["rows"]


def test_train_sundae_smoke(tmp_path):
    argv = [
        "--out",
        str(tmp_path),
        "--length",
        "5",
        "--mlm-steps",
        "3",
        "--seq2seq-steps",
        "2",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--batch-size",
        "8",
        "--eval-pairs",
        "20",
        "--refine-steps",
        "1",
        "2",
        "--finetune-seeds",
        "1",
    ]
    assert decoding_sundae.main(argv) == 0
    result = outputs(tmp_path, "decoding_sundae")
    assert set(result["results"]) == {"MLM-initialised", "random init"}
    for rows in result["results"].values():
        assert [r["refine_steps"] for r in rows] == [1, 2]
        assert all(0.0 <= r["token_accuracy"] <= 1.0 for r in rows)


def test_train_recurrence_smoke_and_generation(tmp_path, tiny_lm):
    argv = [
        "--out",
        str(tmp_path),
        "--model",
        "tiny-random-llama",
        "--window",
        "8",
        "--memory",
        "2",
        "--memory-heads",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-windows",
        "2",
        "--eval-rows",
        "2",
    ]
    assert decoding_recurrence.main(argv) == 0
    result = outputs(tmp_path, "decoding_recurrence")
    assert set(result["nll"]) == {"fixed", "recurrent", "shuffled", "previous"}
    nll = result["nll"]
    assert nll["fixed"][0] == pytest.approx(nll["recurrent"][0], abs=1e-5)  # window 1: no state
    assert nll["fixed"][0] == pytest.approx(nll["previous"][0], abs=1e-5)
    model, tok = tiny_lm
    memory = load_recurrent_memory(tmp_path / "stages" / "memory", model)
    ids = torch.randint(10, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    out = generate_with(
        "recurrent",
        model,
        ids,
        memory=memory,
        window=8,
        max_new_tokens=10,
        pad_token_id=tok.pad_token_id,
    )
    assert 1 <= out.new_tokens.shape[1] <= 10
