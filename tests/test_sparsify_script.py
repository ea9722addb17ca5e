"""train.sparsify, eval.sparsity and bench.sparse_speed smoke runs on the tiny random Llama."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import lm.tnl
from bench.sparse_speed import main as bench_main
from bench.sparse_speed import parse_shapes
from eval.sparsity import main as eval_main
from lm.corpus import pydoc_corpus
from lm.sparsity import NM, check_nm, heldout_rows, lm_nll, load_sparse_model
from train.sparsify import main

# 32-token rows, 4 calibration rows, 4 held-out rows: each run takes about a second.
TINY = ["--model", "tiny-random-llama", "--seq-len", "32", "--calib-seqs", "4", "--eval-rows", "4"]
MASKLLM = ["--method", "maskllm", "--steps", "6", "--batch-size", "2", "--lr", "1e-2",
           "--save-every", "2"]  # fmt: skip


# Tiny models on a shared 2-core machine: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def results(out):
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "maskllm"])
def test_each_method_writes_an_exact_2_4_checkpoint_and_its_perplexity(tmp_path, method):
    out = tmp_path / method
    extra = MASKLLM if method == "maskllm" else ["--method", method]
    assert main([*TINY, *extra, "--out", str(out)]) == 0
    res = results(out)
    assert res["config"]["nm"] == "2:4" and res["config"]["layers"] == 14
    assert math.isfinite(res["dense"]["ppl"]) and math.isfinite(res["sparse"]["ppl"])
    assert res["sparsity"]["pruned_layers_sparsity"] == pytest.approx(0.5, abs=1e-3)
    model, tokenizer, ckpt = load_sparse_model(out / "sparse")
    assert ckpt.method == method
    for name, mask in ckpt.masks.items():
        check_nm(mask, NM(2, 4), name=name)
        check_nm(model.get_submodule(name).weight, NM(2, 4), exact=False, name=name)
    rows = heldout_rows(tokenizer, pydoc_corpus().heldout, 32, 4)
    nll, count = lm_nll(model, rows, desc="")
    assert count == res["sparse"]["tokens"]
    assert math.exp(nll / count) == pytest.approx(res["sparse"]["ppl"], rel=1e-5)
    if method == "maskllm":
        assert res["prior"]["ppl"] > 0 and (out / "prior" / "manifest.json").is_file()
        log = json.loads((out / "log.json").read_text())["train"]
        assert [r["step"] for r in log] == list(range(1, 7))
        assert log[0]["temperature"] == 4.0 and log[0]["scale"] == 100.0


def test_maskllm_resume_equals_an_uninterrupted_run(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main([*TINY, *MASKLLM, "--out", str(full)]) == 0
    assert main([*TINY, *MASKLLM, "--stop-at", "3", "--out", str(split)]) == 0
    assert not (split / "results.json").exists()
    assert main([*TINY, *MASKLLM, "--resume", "--out", str(split)]) == 0
    a = load_file(str(full / "sparse" / "masks.safetensors"))
    b = load_file(str(split / "sparse" / "masks.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((full / "log.json").read_text())["train"]
    lb = json.loads((split / "log.json").read_text())["train"]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-6)
    with pytest.raises(SystemExit):  # other settings cannot resume this run
        main([*TINY, *MASKLLM, "--lr", "1e-3", "--resume", "--out", str(split)])


def test_a_tnl_folder_model_is_pruned_and_reloaded(tmp_path):
    torch.manual_seed(0)
    config = lm.tnl.TNLConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    folder = tmp_path / "tnl"
    lm.tnl.TNLForCausalLM(config).save_pretrained(folder)
    from lm.loading import load_tokenizer

    load_tokenizer("tiny-random-llama").save_pretrained(folder)  # a 512-token BPE fits vocab 1000
    out = tmp_path / "run"
    args = ["--model", str(folder), "--method", "sparsegpt", "--seq-len", "32", "--calib-seqs", "4"]
    assert main([*args, "--eval-rows", "4", "--out", str(out)]) == 0
    model, _, ckpt = load_sparse_model(out / "sparse")
    per_layer = ["token_mixer.qkvu_proj", "token_mixer.out_proj"] + [
        f"channel_mixer.w{i}" for i in (1, 2, 3)
    ]
    assert sorted(ckpt.masks) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in per_layer
    )
    assert isinstance(model, lm.tnl.TNLForCausalLM)


def test_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "python -m train.sparsify --model smollm2-135m-instruct" in capsys.readouterr().out
    for bad in (["--nm", "5:4"], ["--steps", "0"], ["--resume"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*TINY, "--method", "magnitude", *bad, "--out", "/nonexistent/x"])
        assert exit_info.value.code == 2


def test_eval_table_scores_dense_and_each_checkpoint(tmp_path):
    for method in ("magnitude", "wanda"):
        assert main([*TINY, "--method", method, "--out", str(tmp_path / method)]) == 0
    out = tmp_path / "eval"
    args = [
        "--sparse",
        str(tmp_path / "magnitude" / "sparse"),
        "--sparse",
        str(tmp_path / "wanda" / "sparse"),
    ]
    assert eval_main([*args, "--seq-len", "32", "--eval-rows", "4", "--out", str(out)]) == 0
    table = json.loads((out / "sparsity_eval.json").read_text())["rows"]
    assert [r["method"] for r in table] == ["dense", "magnitude", "wanda"]
    for row in table[1:]:
        assert row["ppl"] == pytest.approx(
            results(tmp_path / row["method"])["sparse"]["ppl"], rel=1e-6
        )
    assert table[0]["ppl"] == pytest.approx(results(tmp_path / "wanda")["dense"]["ppl"], rel=1e-6)
    md = (out / "sparsity_eval.md").read_text()
    assert "| wanda | wanda | 2:4 |" in md and (out / "sparsity_eval.png").stat().st_size > 0


def test_bench_parses_its_arguments_and_refuses_cpu(tmp_path, capsys):
    assert parse_shapes("576x1536, 192x576") == [(576, 1536), (192, 576)]
    assert parse_shapes("576x576*2,192x576") == [(576, 576), (576, 576), (192, 576)]
    with pytest.raises(ValueError, match="out x in"):
        parse_shapes("576x")
    assert parse_shapes(" 576x576 * 2 ") == [(576, 576), (576, 576)]
    # the spelling RESULTS quotes counts the same layers as the written-out list that ran
    blocks = ",".join(["576x576", "192x576", "192x576", "576x576", "1536x576", "1536x576",
                       "576x1536"] * 30)  # fmt: skip
    short = "576x576*60,192x576*60,1536x576*60,576x1536*30"
    assert Counter(parse_shapes(short)) == Counter(parse_shapes(blocks))
    for bad in ("576x576*0", "576x576*", "576x576*two"):
        with pytest.raises(ValueError, match="positive repeat"):
            parse_shapes(bad)
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--shapes", "64x64", "--device", "cpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "CUDA GPUs (compute capability >= 8.0)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(
            ["--shapes", "64x64", "--tokens", "0", "--device", "cpu", "--out", str(tmp_path)]
        )
