"""train.decisions: the refit of the <seg> and [IMG0] rows on cached prompt states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import sharpened_tiny_vlm

from core.checkpoint import load_checkpoint
from data.shapeworld import main as shapeworld_main
from generation.diffusion import get_diffusion_config
from generation.gill import GILLMapperConfig
from segmentation.stamp import StampConfig
from train.decisions import IMG, SEG, TEXT, decision_logits, fit_rows, greedy_choice
from train.decisions import main as decisions_main
from vlm.gill import GILLVLM, gill_config_for
from vlm.model import PolychromeVLM
from vlm.stamp import StampVLM

pytestmark = pytest.mark.usefixtures("one_thread")


def _states(n: int, dim: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Three separable classes of hidden states, with a random vocabulary of 7 tokens."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    centres = torch.randn(3, dim, generator=gen) * 3
    hidden = centres[targets] + torch.randn(n, dim, generator=gen) * 0.3
    vocab = torch.randn(n, 7, generator=gen)
    states = {
        "hidden": hidden,
        "lse": torch.logsumexp(vocab, -1),
        "top": vocab.max(-1).values,
        "has_image": torch.ones(n, dtype=torch.bool),
    }
    return states | {"vocab": vocab}, targets


def _zero_rows(dim: int) -> dict[str, torch.Tensor]:
    return {
        "seg_out": torch.zeros(dim),
        "seg_bias": torch.tensor(-5.0),
        "img_out": torch.zeros(dim),
        "img_bias": torch.tensor(-5.0),
    }


def test_the_fit_loss_is_cross_entropy_over_the_whole_vocabulary():
    states, targets = _states(30, 8, 0)
    rows = _zero_rows(8)
    rows["seg_out"] = torch.randn(8)
    _, curve = fit_rows(states, targets, rows, steps=1, lr=1e-9)
    # naive: the full (V + 2) logits, the text target = the vocabulary's argmax token
    h = states["hidden"]
    full = torch.cat(
        [
            states["vocab"],
            (h @ rows["seg_out"] + rows["seg_bias"])[:, None],
            (h @ rows["img_out"] + rows["img_bias"])[:, None],
        ],
        -1,
    )
    v = states["vocab"].shape[1]
    label = torch.where(targets == TEXT, states["vocab"].argmax(-1), v + targets - 1)
    per = F.cross_entropy(full, label, reduction="none")
    counts = torch.bincount(targets, minlength=3).float()
    naive = sum(per[targets == c].mean() * (1 / 3) for c in range(3)) if all(counts) else None
    assert curve[0] == pytest.approx(float(naive), rel=1e-5)


def test_the_fit_separates_what_the_rows_could_not():
    states, targets = _states(60, 8, 1)
    init = _zero_rows(8)
    before = greedy_choice(states, init)
    assert (before == TEXT).all()  # biased off: nothing fires
    rows, curve = fit_rows(states, targets, init, steps=300, lr=0.05)
    assert curve[-1] < curve[0] / 4
    after = greedy_choice(states, rows)
    assert (after == targets).float().mean() == 1.0
    # <seg> is never chosen where there is no image to segment
    states["has_image"] = torch.zeros(60, dtype=torch.bool)
    assert not (greedy_choice(states, rows) == SEG).any()
    assert torch.isinf(decision_logits(states, rows)[:, SEG]).all()
    assert (greedy_choice(states, rows)[targets == IMG] == IMG).all()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decisions")
    data = root / "sw"
    args = ["generate", "--out", str(data), "--train", "6", "--val", "3", "--test", "0"]
    shapeworld_main([*args, "--pretrain", "0", "--image-size", "64", "--workers", "1"])
    core = sharpened_tiny_vlm()
    core_dir = core.save_pretrained(root / "core")
    stamp = StampVLM(PolychromeVLM.from_pretrained(core_dir), StampConfig(lora_rank=4))
    gill_core = PolychromeVLM.from_pretrained(core_dir)
    mapper = GILLMapperConfig(width=32, encoder_layers=1, decoder_layers=1, heads=4, ffn_dim=64)
    gill = GILLVLM(gill_core, gill_config_for(gill_core, get_diffusion_config("tiny-ldm"), mapper))
    return {
        "data": data,
        "core": core_dir,
        "stamp": stamp.save_pretrained(root / "stamp"),
        "gill": gill.save_pretrained(root / "gill"),
    }


def test_the_script_changes_only_the_rows_and_reports_rates(checkpoints, tmp_path):
    out = tmp_path / "out"
    argv = ["--data", str(checkpoints["data"]), "--vlm", str(checkpoints["core"])]
    argv += ["--stamp", str(checkpoints["stamp"]), "--gill", str(checkpoints["gill"])]
    argv += ["--out", str(out), "--per-class", "6", "--eval-per-class", "3", "--steps", "50"]
    assert decisions_main([*argv, "--no-progress"]) == 0
    result = json.loads((out / "decisions.json").read_text())
    assert result["fit_prompts"]["seg request"] == 6
    for kind in result["eval_after"].values():
        assert kind["text"] + kind["<seg>"] + kind["[IMG0]"] == pytest.approx(1.0)
        for token in ("<seg>", "[IMG0]"):  # the reply's states include its first one
            assert kind.get(f"{token} anywhere", kind[token]) >= kind[token]
    assert "[IMG0] anywhere" in result["eval_after"]["text-only message"]
    assert "[IMG0] anywhere" not in result["eval_after"]["image request"]
    assert result["loss_first_last"][1] < result["loss_first_last"][0]
    for name, stem, changed in (("stamp", "stamp", {"seg_out", "seg_bias"}),
                                ("gill", "gill", {"img_out", "img_bias"})):  # fmt: skip
        old, new = load_checkpoint(checkpoints[name]), load_checkpoint(out / name)
        assert new.config == old.config
        for file in old.tensors:
            for key, value in old.tensors[file].items():
                same = torch.equal(value, new.tensors[file][key])
                assert same != (file == stem and key in changed), (file, key)
    StampVLM.from_pretrained(out / "stamp")  # loads as any checkpoint
    with pytest.raises(SystemExit):  # refuses to overwrite without --overwrite
        decisions_main([*argv, "--no-progress"])


def test_reply_states_match_one_forward_over_the_greedy_reply():
    from train.decisions import prompt_states

    core = sharpened_tiny_vlm()
    mapper = GILLMapperConfig(width=32, encoder_layers=1, decoder_layers=1, heads=4, ffn_dim=64)
    gill = GILLVLM(core, gill_config_for(core, get_diffusion_config("tiny-ldm"), mapper)).eval()
    prompt = [{"role": "user", "content": "Tell me about shapes."}]
    st = prompt_states(gill, [prompt], 1, False, "", reply_tokens=3)
    n = len(st["position"])
    assert st["position"].tolist() == list(range(n)) and 1 <= n <= 4
    # reference: the prompt plus the greedy tokens, read in one uncached forward
    ids = gill._batch([prompt])[0]
    head = core.llm.get_output_embeddings()
    with torch.no_grad():
        for _ in range(n - 1):
            hidden = core.llm.base_model(inputs_embeds=core.embed(ids)).last_hidden_state
            ids = torch.cat([ids, head(hidden[:, -1]).argmax(-1, keepdim=True)], 1)
        hidden = core.llm.base_model(inputs_embeds=core.embed(ids)).last_hidden_state[0]
    expected = hidden[-n:]
    torch.testing.assert_close(st["hidden"], expected.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        st["top"], head(expected).float().max(-1).values, rtol=1e-4, atol=1e-4
    )
