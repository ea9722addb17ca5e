"""generation.diffusion: configs, the tiny pipeline's behaviour (shapes, guidance, seeds, samplers,
clear errors), prompt states against a hand-run encoder, and the paper path on tiny SD components
saved to a folder and reloaded offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_autoencoder_kl
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from core.config import ConfigError
from generation.diffusion import (
    PAPER_MODEL,
    DiffusionConfig,
    DiffusionPresetConfig,
    UNetConfig,
    VaeConfig,
    build_pipeline,
    encode_prompts,
    expected_embeds_shape,
    generate,
    get_diffusion_config,
    pipeline_from_preset,
    set_scheduler,
)
from vlm.config import PolychromeConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return build_pipeline("tiny-ldm")


def _np(pipe, prompts, **kw):
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("seed", 0)
    return generate(pipe, prompts, output_type="np", **kw)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def test_presets_have_a_valid_diffusion_entry():
    tiny, shapes, paper = (
        PolychromeConfig.from_preset(n).diffusion for n in ("tiny", "shapes", "paper")
    )
    assert tiny.model == "tiny-ldm" and tiny.checkpoint is None
    assert shapes.model == "shapes-ldm" and shapes.checkpoint == "checkpoints/shapes/diffusion"
    assert paper.model == PAPER_MODEL and paper.source.startswith("hf-hub:")
    assert shapes.data.layout.min_objects == 1 and shapes.data.layout.max_objects == 2
    assert get_diffusion_config("shapes-ldm").latent_size == 32  # 128 px -> 32x32x4


def test_config_errors_say_what_was_expected():
    with pytest.raises(ValueError, match="unknown diffusion model 'sd9'; expected one of"):
        DiffusionPresetConfig(model="sd9")
    with pytest.raises(ValueError, match="needs `source`"):
        DiffusionPresetConfig(model=PAPER_MODEL)
    with pytest.raises(ValueError, match="`source` is for model"):
        DiffusionPresetConfig(model="tiny-ldm", source="hf-hub:a/b")
    with pytest.raises(ValueError, match="checkpoint must be null"):
        DiffusionPresetConfig(model=PAPER_MODEL, source="x", checkpoint="y")
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\], received 0"):
        DiffusionPresetConfig(num_inference_steps=0)
    with pytest.raises(
        ConfigError, match="expected one of \\['ddim', 'dpm\\+\\+'\\], received 'euler'"
    ):
        DiffusionPresetConfig.from_dict({"scheduler": "euler"})
    with pytest.raises(ValueError, match="one flag per level \\(3\\), received 2"):
        UNetConfig(cross_attention=(True, True))
    with pytest.raises(ValueError, match="divisible by norm_num_groups=32, received \\[32, 48\\]"):
        UNetConfig(block_out_channels=(32, 48), cross_attention=(False, True))
    with pytest.raises(ValueError, match="same length"):
        VaeConfig(encoder_blocks=(0, 1), decoder_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="divisible by the VAE's and UNet's total downsampling"):
        DiffusionConfig(name="x", image_size=136)
    with pytest.raises(ValueError, match="unknown diffusion config 'nope'; valid names"):
        get_diffusion_config("nope")


def test_config_round_trips_through_json():
    cfg = get_diffusion_config("shapes-ldm")
    again = DiffusionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def test_pipeline_is_stock_stable_diffusion_with_our_parts(pipe):
    assert type(pipe) is StableDiffusionPipeline
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert expected_embeds_shape(pipe) == (16, 384)  # MiniLM states padded to 16 tokens
    assert pipe.vae_scale_factor == 4


def test_output_shapes_for_every_output_type(pipe):
    images = generate(pipe, ["A red circle.", "A blue star."], seed=0, num_inference_steps=2)
    assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"
    arr = _np(pipe, ["A red circle."])
    assert arr.shape == (1, 64, 64, 3) and arr.min() >= 0 and arr.max() <= 1
    pt = generate(pipe, ["A red circle."], seed=0, num_inference_steps=2, output_type="pt")
    assert pt.shape == (1, 3, 64, 64) and pt.dtype == torch.float32


def test_prompt_states_equal_a_hand_run_encoder(pipe):
    """encode_prompts == the MiniLM last hidden states of the padded, masked caption."""
    prompts = ["A red circle.", "There is a star."]
    embeds = encode_prompts(pipe, prompts)
    batch = pipe.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = pipe.text_encoder(**batch).last_hidden_state  # (B, 16, 384)
    assert embeds.shape == (2, 16, 384)
    torch.testing.assert_close(embeds, ref)
    # the same image from strings and from their states
    a = _np(pipe, prompts)
    b = generate(pipe, prompt_embeds=embeds, seed=0, num_inference_steps=3, output_type="np")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_same_seed_same_image_other_seed_other_image(pipe):
    a = _np(pipe, ["A red circle."], seed=5)
    b = _np(pipe, ["A red circle."], seed=5)
    c = _np(pipe, ["A red circle."], seed=6)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3
    # an int seed gives image i seed + i; a list names each image's seed (batched against
    # alone: matmul paths differ in the last bits, up to 5e-7 seen on AVX2)
    pair = _np(pipe, ["A red circle.", "A red circle."], seed=5)
    np.testing.assert_allclose(pair[0], a[0], atol=1e-5)
    np.testing.assert_allclose(pair[1], c[0], atol=1e-5)
    gen = [torch.Generator().manual_seed(5)]
    np.testing.assert_allclose(
        generate(pipe, ["A red circle."], generator=gen, num_inference_steps=3, output_type="np"),
        a,
        atol=1e-5,
    )
    # two different prompts in one batch: each image is its own prompt's with its own seed
    star = _np(pipe, ["A blue star."], seed=9)
    mixed = _np(pipe, ["A red circle.", "A blue star."], seed=[5, 9])
    np.testing.assert_allclose(mixed[0], a[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], star[0], atol=1e-5)
    np.testing.assert_array_equal(_np(pipe, ["A red circle."], seed=np.int64(5)), a)  # numpy int
    with pytest.raises(ValueError, match="finite number >= 0, received nan"):
        generate(pipe, ["A red circle."], guidance_scale=float("nan"), num_inference_steps=2)


def test_guidance_and_negative_embeds_change_the_image(pipe):
    embeds = encode_prompts(pipe, ["A red circle."])
    base = generate(
        pipe,
        prompt_embeds=embeds,
        seed=0,
        num_inference_steps=3,
        output_type="np",
        guidance_scale=1.0,
    )
    guided = generate(
        pipe,
        prompt_embeds=embeds,
        seed=0,
        num_inference_steps=3,
        output_type="np",
        guidance_scale=6.0,
    )
    assert np.abs(base - guided).mean() > 1e-4
    empty = encode_prompts(pipe, [""])
    default_neg = generate(
        pipe,
        prompt_embeds=embeds,
        seed=0,
        num_inference_steps=3,
        output_type="np",
        guidance_scale=6.0,
    )
    explicit_neg = generate(
        pipe,
        prompt_embeds=embeds,
        negative_prompt_embeds=empty,
        seed=0,
        num_inference_steps=3,
        output_type="np",
        guidance_scale=6.0,
    )
    np.testing.assert_allclose(default_neg, explicit_neg, atol=1e-6)  # default negative is ""
    other_neg = encode_prompts(pipe, ["A blue square."])
    changed = generate(
        pipe,
        prompt_embeds=embeds,
        negative_prompt_embeds=other_neg,
        seed=0,
        num_inference_steps=3,
        output_type="np",
        guidance_scale=6.0,
    )
    assert np.abs(changed - explicit_neg).mean() > 1e-4


def test_both_samplers_run_and_differ(pipe):
    ddim = _np(pipe, ["A red circle."], scheduler="ddim")
    dpm = _np(pipe, ["A red circle."], scheduler="dpm++")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert ddim.shape == dpm.shape and np.abs(ddim - dpm).mean() > 1e-5
    set_scheduler(pipe, "ddim")
    with pytest.raises(
        ValueError, match="scheduler must be one of \\['ddim', 'dpm\\+\\+'\\], received 'pndm'"
    ):
        set_scheduler(pipe, "pndm")


def test_bad_inputs_raise_clear_value_errors(pipe):
    with pytest.raises(
        ValueError, match=r"prompt_embeds: expected shape \(B, 16, 384\), received \(1, 16, 768\)"
    ):
        generate(pipe, prompt_embeds=torch.zeros(1, 16, 768))
    with pytest.raises(ValueError, match=r"expected shape \(B, 16, 384\), received \(16, 384\)"):
        generate(pipe, prompt_embeds=torch.zeros(16, 384))
    good = torch.zeros(2, 16, 384)
    with pytest.raises(
        ValueError,
        match=r"expected the shape of prompt_embeds \(2, 16, 384\), received \(1, 16, 384\)",
    ):
        generate(pipe, prompt_embeds=good, negative_prompt_embeds=torch.zeros(1, 16, 384))
    with pytest.raises(ValueError, match="NaN"):
        generate(pipe, prompt_embeds=torch.full((1, 16, 384), float("nan")))
    with pytest.raises(ValueError, match="exactly one of `prompts`"):
        generate(pipe, ["a"], prompt_embeds=good)
    with pytest.raises(ValueError, match="exactly one of `prompts`"):
        generate(pipe)
    with pytest.raises(ValueError, match="expected 2 seeds \\(one per image\\), received 3"):
        generate(pipe, prompt_embeds=good, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, received 0"):
        generate(pipe, ["a"], num_inference_steps=0)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        encode_prompts(pipe, [])


# --------------------------------------------------------------------------------------------
# The paper path: StableDiffusionPipeline.from_pretrained on a folder (SD-1.5's format)
# --------------------------------------------------------------------------------------------


def _tiny_clip_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a letters-only vocabulary (no download)."""
    letters = "abcdefghijklmnopqrstuvwxyz."
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def test_paper_preset_loads_a_stable_diffusion_folder_offline(tmp_path, monkeypatch):
    """diffusers' get_dummy_components recipe, saved with save_pretrained and reloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = tiny_autoencoder_kl()
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(_tiny_clip_tokenizer(tmp_path)),
            max_position_embeddings=77,
        )
    )
    folder = tmp_path / "sd"
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=_tiny_clip_tokenizer(tmp_path),
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)

    preset = DiffusionPresetConfig(model=PAPER_MODEL, source=str(folder), scheduler="dpm++")
    pipe = pipeline_from_preset(preset)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert expected_embeds_shape(pipe) == (77, 32)  # SD's (B, 77, D) prompt_embeds
    embeds = encode_prompts(pipe, ["a red circle."])
    assert embeds.shape == (1, 77, 32)
    images = generate(pipe, prompt_embeds=embeds, seed=0, num_inference_steps=2, output_type="np")
    assert images.shape == (1, 16, 16, 3)  # sample_size 8 x VAE factor 2
    again = generate(pipe, ["a red circle."], seed=0, num_inference_steps=2, output_type="np")
    np.testing.assert_allclose(images, again, atol=1e-5)
    # weights survived the round trip
    torch.testing.assert_close(pipe.unet.conv_in.weight, unet.conv_in.weight)
    with pytest.raises(ValueError, match=r"expected shape \(B, 77, 32\), received \(1, 16, 32\)"):
        generate(pipe, prompt_embeds=torch.zeros(1, 16, 32))
    with pytest.raises(ValueError, match="no such folder"):
        pipeline_from_preset(DiffusionPresetConfig(model=PAPER_MODEL, source=str(tmp_path / "x")))
