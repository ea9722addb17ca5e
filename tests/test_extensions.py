"""STAMP and GILL on one VLM core, and the decoding loop they share (vlm.specials)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sharpened_tiny_vlm
from PIL import Image

from core.checkpoint import CheckpointError
from generation.diffusion import build_pipeline, get_diffusion_config
from generation.gill import GILLMapperConfig
from segmentation.stamp import StampConfig
from vlm.assistant import Assistant, SamplingSettings
from vlm.config import PolychromeConfig
from vlm.gill import GILLVLM, IMG_TOKENS, ImageMaker, gill_config_for
from vlm.model import PolychromeVLM
from vlm.specials import Special, cache_kwarg, decode_with_specials
from vlm.stamp import MASK_TOKEN, SEG_TOKEN, StampVLM

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = GILLMapperConfig(width=32, encoder_layers=1, decoder_layers=1, heads=4, ffn_dim=64)
STAMP = StampConfig(mask_merge=2, lora_rank=4)


def _image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A VLM core, and a STAMP and a GILL each trained (here: randomised) on a copy of it."""
    root = tmp_path_factory.mktemp("extensions")
    core = sharpened_tiny_vlm()
    _randomise(core.projector, 1)
    core_dir = core.save_pretrained(root / "core")
    stamp = StampVLM(PolychromeVLM.from_pretrained(core_dir), STAMP)
    _randomise(stamp, 2)
    gill_core = PolychromeVLM.from_pretrained(core_dir)
    cfg = gill_config_for(gill_core, get_diffusion_config("tiny-ldm"), mapper=SMALL)
    gill = GILLVLM(gill_core, cfg)
    _randomise(gill, 3)
    return {
        "core": core_dir,
        "stamp": stamp.save_pretrained(root / "stamp"),
        "gill": gill.save_pretrained(root / "gill"),
    }


def _rows(vlm: PolychromeVLM, tokens) -> torch.Tensor:
    return torch.stack([vlm.added_embeddings[vlm.config.added_tokens.index(t)] for t in tokens])


def test_stamp_and_gill_attach_to_one_core_and_behave_as_alone(saved):
    core = PolychromeVLM.from_pretrained(saved["core"])
    stamp = StampVLM.from_pretrained(saved["stamp"], vlm=core)
    gill = GILLVLM.from_pretrained(saved["gill"], vlm=core)
    assert stamp.vlm is core and gill.vlm is core
    assert core.config.added_tokens == ["<image>", SEG_TOKEN, MASK_TOKEN, *IMG_TOKENS]
    alone_stamp = StampVLM.from_pretrained(saved["stamp"])
    alone_gill = GILLVLM.from_pretrained(saved["gill"])
    # each extension's rows come from its own checkpoint, found by name
    torch.testing.assert_close(
        _rows(core, [SEG_TOKEN, MASK_TOKEN]), _rows(alone_stamp.vlm, [SEG_TOKEN, MASK_TOKEN])
    )
    torch.testing.assert_close(_rows(core, IMG_TOKENS), _rows(alone_gill.vlm, IMG_TOKENS))
    prompt = [{"role": "user", "content": "Segment the red circle.", "images": [_image()]}]
    with torch.no_grad():
        np.testing.assert_allclose(
            stamp.segment([prompt])[0], alone_stamp.segment([prompt])[0], rtol=1e-4, atol=1e-4
        )
        request = [[{"role": "user", "content": "Show me this: a red circle."}]]
        a = gill.prompt_embeds(gill.request_states(request)[1])
        b = alone_gill.prompt_embeds(alone_gill.request_states(request)[1])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_an_extension_saved_from_a_shared_core_loads_alone(saved, tmp_path):
    core = PolychromeVLM.from_pretrained(saved["core"])
    stamp = StampVLM.from_pretrained(saved["stamp"], vlm=core)
    GILLVLM.from_pretrained(saved["gill"], vlm=core)  # its rows come after STAMP's
    again = StampVLM.from_pretrained(stamp.save_pretrained(tmp_path / "stamp"))
    # a differently ordered core: the rows are matched by name, not by position
    assert again.vlm.config.added_tokens != core.config.added_tokens
    for token in core.config.added_tokens:
        torch.testing.assert_close(_rows(again.vlm, [token]), _rows(core, [token]))
    prompt = [{"role": "user", "content": "Segment it.", "images": [_image(4)]}]
    with torch.no_grad():
        np.testing.assert_allclose(
            again.segment([prompt])[0], stamp.segment([prompt])[0], rtol=1e-4, atol=1e-4
        )


def test_an_extension_trained_on_another_core_is_refused(saved):
    other = PolychromeVLM.from_pretrained(saved["core"])
    with torch.no_grad():
        other.projector.fc1.weight.add_(0.05)
    with pytest.raises(CheckpointError, match="another VLM core"):
        StampVLM.from_pretrained(saved["stamp"], vlm=other)


def _scripted(name: str, logits: list[float], log: list[str], **kw) -> Special:
    """A special whose row logit follows a script (one value per call) and that logs its acts."""
    it = iter(logits)

    def act(kv, cache, forced, fired):
        log.append(f"{name}:{int(forced)}:{fired}")
        return hidden, kv, name

    hidden = torch.zeros(1, 1)
    return Special(name, lambda h: torch.tensor([next(it)]), act, **kw)


class _ToyLM:
    """A 'vocabulary' of 5 tokens (4 = end): the text row logits are a script too."""

    eos_token_id = 4

    def __init__(self, script: list[int]) -> None:
        self.script = iter(script)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        row = torch.zeros(1, 5)
        row[0, next(self.script)] = 10.0
        return row

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join("ab c"[i] for i in ids)


def _run(specials, text_script, **kw):
    lm = _ToyLM(text_script)
    events = decode_with_specials(
        lm,  # only eos_token_id and decode are used
        torch.zeros(1, 1),
        torch.ones(1, 3),
        None,
        lambda ids, kv, cache: torch.zeros(1, 1),
        specials,
        kw.pop("max_new_tokens", 10),
        vocab_logits=lm.logits,
        **kw,
    )
    return [(e.text, e.special) for e in events]


def test_the_loop_picks_the_highest_row_and_runs_each_action_in_place():
    log: list[str] = []
    # step: 1 'b' (text 10 beats 0/0), 2 seg (20), 3 'a', 4 img (30), 5 'c' via token 3, 6 end
    seg = _scripted("seg", [0, 20, 0, 0, 0, 0], log)
    img = _scripted("img", [0, 0, 0, 30, 0, 0], log)
    out = _run([seg, img], [1, 0, 0, 0, 3, 4])
    assert out == [("b", None), ("", "seg"), ("a", None), ("", "img"), ("c", None)]
    assert log == ["seg:0:0", "img:0:0"]


def test_force_blocking_and_unavailable_rows():
    log: list[str] = []
    # forced first: img without consulting logits; then img's row (99) is blocked until
    # non-blank text: the text " " (token 2) is blank, so the block holds; "a" lifts it.
    img = _scripted("img", [99, 99, 99, 99], log, once_per_text=True, restart_text=True)
    seg = _scripted("seg", [50, 50, 50, 50], log, available=False)  # no image: never fires
    out = _run([seg, img], [2, 2, 0, 0, 4], force="img", max_new_tokens=4)
    assert out == [("", "img"), (" ", None), (" ", None), ("a", None)]
    assert log == ["img:1:0"]
    log.clear()
    img = _scripted("img", [99, 99, 99, 99, 99], log, once_per_text=True, restart_text=True)
    out = _run([img], [0, 0, 0, 0, 0], force="img", max_new_tokens=4)
    # blocked after the forced image: text "a" lifts the block, the next step fires again
    assert out == [("", "img"), ("a", None), ("", "img"), ("a", None)]
    with pytest.raises(ValueError, match="force must name"):
        _run([img], [0], force="seg")


def test_an_action_can_end_the_reply():
    log: list[str] = []
    img = _scripted("img", [0, 99, 99], log, ends_reply=True)
    assert _run([img], [1, 0, 0, 0]) == [("b", None), ("", "img")]
    assert log == ["img:0:0"]


def test_with_no_special_firing_the_loop_is_greedy_generate():
    vlm = sharpened_tiny_vlm()
    stamp = StampVLM(vlm, STAMP).eval()
    with torch.no_grad():
        stamp.seg_bias.fill_(-1e4)
    prompt = [{"role": "user", "content": "Describe this.", "images": [_image(5)]}]
    text = "".join(chunk for chunk, mask in stamp.stream(prompt, max_new_tokens=6))
    expected = vlm.generate_texts([prompt], max_new_tokens=6)[0]  # HF generate, greedy
    assert expected and text.strip() == expected


@pytest.fixture(scope="module")
def both(saved) -> Assistant:
    core = PolychromeVLM.from_pretrained(saved["core"])
    stamp = StampVLM.from_pretrained(saved["stamp"], vlm=core).eval()
    gill = GILLVLM.from_pretrained(saved["gill"], vlm=core).eval()
    torch.manual_seed(0)
    maker = ImageMaker(gill, pipe=build_pipeline("tiny-ldm"), num_inference_steps=2)
    return Assistant(
        core.llm,
        core.tokenizer,
        vlm=core,
        stamp=stamp,
        gill=gill,
        image_maker=maker,
        default_settings=SamplingSettings(max_new_tokens=3),
    )


def test_one_assistant_segments_and_generates(both, tmp_path):
    image = tmp_path / "scene.png"
    _image(7, 72).save(image)
    seg = list(both.respond([], "segment: the red circle", images=[image]))[-1]
    assert seg.text.startswith("[mask 1]") and seg.masks[0].shape == (72, 72)
    assert seg.mask_image == image
    shown = list(both.respond([], "generate: a red circle", images=[image]))[-1]
    assert shown.text.startswith("[image 1: generated]") and len(shown.images) == 1
    assert shown.images[0].image.size[0] > 0
    # both in one reply: the image turn forces the image, then <seg> wins every later step
    bias = both.stamp.seg_bias.detach().clone()
    with torch.no_grad():
        both.stamp.seg_bias.fill_(1e4)
    try:
        mixed = list(both.respond([], "generate: a blue star", images=[image]))[-1]
    finally:
        with torch.no_grad():
            both.stamp.seg_bias.copy_(bias)
    assert len(mixed.images) == 1 and len(mixed.masks) == 2
    assert mixed.text == "[image 1: generated] [mask 1][mask 2]"
    with pytest.raises(ValueError, match="attach an image"):
        list(both.respond([], "segment: the red circle"))


def test_explicit_prefixes_are_ordinary_text_without_their_extension(sharp_vlm):
    text_only = Assistant(sharp_vlm.llm, sharp_vlm.tokenizer, vlm=sharp_vlm)
    settings = SamplingSettings(max_new_tokens=4)
    for message in ("segment: the circle", "Generate: three names for a cat"):
        reply = list(text_only.respond([], message, settings=settings))[-1]
        plain = list(text_only.vlm.stream(text_only.encode([], message), {"max_new_tokens": 4,
                                          "do_sample": False}))  # fmt: skip
        assert reply.text == "".join(plain) and not reply.masks and not reply.images


def test_from_config_loads_both_on_the_presets_core(saved):
    cfg = PolychromeConfig.from_preset("tiny")
    cfg = cfg.replace(
        vlm=cfg.vlm.replace(checkpoint=str(saved["core"])),
        stamp=cfg.stamp.replace(checkpoint=str(saved["stamp"])),
        gill=cfg.gill.replace(checkpoint=str(saved["gill"])),
        diffusion=cfg.diffusion.replace(num_inference_steps=2),
    )
    assistant = Assistant.from_config(cfg)
    assert assistant.stamp is not None and assistant.gill is not None
    assert assistant.stamp.vlm is assistant.vlm is assistant.gill.vlm


def test_segment_and_generate_in_one_chat_in_the_browser(both, tmp_path):
    from conftest import chromium_page, serve_demo

    shots = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    image = tmp_path / "scene.png"
    _image(7, 72).save(image)
    pictures = "() => document.querySelectorAll(\"[data-testid='bot'] img\").length"
    defaults = both.default_settings
    both.default_settings = SamplingSettings(max_new_tokens=1)  # each reply: the asked action
    try:
        for url in serve_demo(both):
            for page in chromium_page(url):
                page.locator("input[type=file]").first.set_input_files([str(image)])
                page.wait_for_timeout(800)
                box = page.locator("textarea").first
                box.fill("segment: the red circle")
                box.press("Enter")
                page.get_by_text("[mask 1]").first.wait_for(timeout=60_000)
                page.wait_for_function(f"{pictures} >= 1", timeout=60_000)  # the painted scene
                page.wait_for_function(
                    "() => !document.querySelector('textarea').disabled", timeout=60_000
                )
                box.fill("generate: a blue star")
                box.press("Enter")
                page.get_by_text("[image 1: generated]").first.wait_for(timeout=60_000)
                page.wait_for_function(f"{pictures} >= 2", timeout=60_000)  # and the image
                page.screenshot(path=str(shots / "11-segment-and-generate.png"), full_page=True)
    finally:
        both.default_settings = defaults


def test_the_kv_cache_goes_by_the_name_the_llms_forward_takes():
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; an older forward would take
    ``cache=`` into its **kwargs and run without the prefix (as on a GPU machine's 5.17)."""

    class New(torch.nn.Module):
        def forward(
            self, inputs_embeds: object = None, cache: object = None, **kw: object
        ) -> object:
            return cache

    class Old(torch.nn.Module):
        def forward(
            self, inputs_embeds: object = None, past_key_values: object = None, **kw: object
        ) -> object:
            return past_key_values

    class Neither(torch.nn.Module):
        def forward(self, inputs_embeds: object = None, **kw: object) -> object:
            return None

    assert cache_kwarg(New) == "cache" and cache_kwarg(Old) == "past_key_values"
    with pytest.raises(TypeError, match="neither"):
        cache_kwarg(Neither)
    marker = object()
    for cls in (New, Old):
        assert cls()(torch.zeros(1), **{cache_kwarg(cls): marker}) is marker
