"""Dense or 2:4 sparse LLM weights per request (lm.sparsity.switch, the demo's "LLM weights")."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import serve_demo, sharpened_tiny_vlm

from core.checkpoint import CheckpointError
from lm.sparsity import apply_sparse_checkpoint, load_sparse_checkpoint, save_sparse_checkpoint
from lm.sparsity.checkpoint import weights_digest
from lm.sparsity.masks import NM, check_nm, prunable_linears
from lm.sparsity.oneshot import magnitude_mask
from lm.sparsity.switch import SparsitySwitch
from segmentation.stamp import StampConfig
from vlm.assistant import Assistant, SamplingSettings
from vlm.stamp import StampVLM

pytestmark = pytest.mark.usefixtures("one_thread")
NM24 = NM(2, 4)
DENSE = SamplingSettings(max_new_tokens=8)
SPARSE = SamplingSettings(max_new_tokens=8, weights="sparse")


def _magnitude_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    layers = prunable_linears(model, NM24)
    masks = {name: magnitude_mask(layer.weight, NM24) for name, layer in layers.items()}
    return save_sparse_checkpoint(
        folder,
        model,
        masks,
        NM24,
        source="tiny",
        method="magnitude",
        kept_values=False,
        source_digest=weights_digest(model, list(layers)),
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vlm = sharpened_tiny_vlm()
    folder = _magnitude_checkpoint(vlm.llm, tmp_path_factory.mktemp("sparse") / "sparse")
    assistant = Assistant(vlm.llm, vlm.tokenizer, vlm=vlm, default_settings=DENSE)
    assert assistant.set_sparsity(folder) == "2:4 sparse (magnitude)"
    return assistant, folder


def _reply(assistant: Assistant, settings: SamplingSettings, text: str = "hello there") -> str:
    return list(assistant.chat([], text, settings=settings))[-1]


def test_sparse_requests_run_on_the_pruned_model_and_dense_ones_on_the_original(setup):
    assistant, folder = setup
    dense_before = _reply(assistant, DENSE)
    sparse = _reply(assistant, SPARSE)
    # reference: a copy of the model pruned by apply_sparse_checkpoint, greedy generate
    pruned = copy.deepcopy(assistant.model)
    apply_sparse_checkpoint(pruned, load_sparse_checkpoint(folder))
    ids = assistant.encode([], "hello there")["input_ids"]
    with torch.no_grad():
        out = pruned.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = assistant.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert sparse == expected
    assert sparse != dense_before  # pruning half the weights changes the reply
    assert _reply(assistant, DENSE) == dense_before  # and the dense weights are back, intact


def test_weights_swap_without_copies_and_keep_2_4(setup):
    assistant, _ = setup
    switch = assistant.sparsity
    originals = {n: layer.weight.data_ptr() for n, layer in switch.layers.items()}
    switch.use("sparse")
    for name, layer in switch.layers.items():
        check_nm(layer.weight.data != 0, NM24, exact=False, name=name)
        assert (layer.weight.data == 0).float().mean() >= 0.5
    switch.use("dense")
    assert all(layer.weight.data_ptr() == originals[n] for n, layer in switch.layers.items())
    with pytest.raises(ValueError, match="weights must be one of"):
        switch.use("half")


def test_lora_wrapped_layers_are_found_and_other_weights_refused(tmp_path):
    vlm = sharpened_tiny_vlm()
    folder = _magnitude_checkpoint(vlm.llm, tmp_path / "sparse")
    StampVLM(vlm, StampConfig(lora_rank=4))  # wraps the attention and MLP linears (peft)
    switch = SparsitySwitch(vlm.llm, load_sparse_checkpoint(folder))
    wrapped = [n for n in switch.layers if n.endswith("q_proj")]
    assert wrapped and all(
        switch.layers[n] is dict(vlm.llm.named_modules())[f"{n}.base_layer"] for n in wrapped
    )
    other = sharpened_tiny_vlm()
    with torch.no_grad():
        next(iter(prunable_linears(other.llm, NM24).values())).weight.mul_(1.01)
    with pytest.raises(CheckpointError, match="not those the masks"):
        SparsitySwitch(other.llm, load_sparse_checkpoint(folder))
    plain = Assistant(other.llm, other.tokenizer, vlm=other)
    with pytest.raises(ValueError, match="no sparse weights are loaded"):
        _reply(plain, SPARSE)


def test_the_advanced_panel_picks_the_weights(setup):
    from gradio_client import Client

    assistant, _ = setup
    for url in serve_demo(assistant):
        message = {"text": "hello there", "files": []}
        sparse = Client(url, verbose=False).predict(
            message, 8, 0.0, -1, "default", 25, "", "2:4 sparse (magnitude)", api_name="/chat"
        )
        dense = Client(url, verbose=False).predict(message, 8, api_name="/chat")
    assert sparse == _reply(assistant, SPARSE) and dense == _reply(assistant, DENSE)
