"""eval.generation: prompts from held-out captions, the judge's decisions against hand-computed
cases, the full evaluation and the CLI on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_autoencoder_kl
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from core.checkpoint import save_checkpoint
from data.render import LayoutConfig
from data.shapeworld import ShapeWorldConfig, SplitSizes, generate
from eval.generation import (
    GenerationJudge,
    PromptItem,
    evaluate_generation,
    format_table,
    labels_satisfy,
    load_prompts,
    shuffled_control,
    vae_round_trip,
)
from eval.generation import main as eval_main
from generation.diffusion import build_pipeline, get_diffusion_config
from vision.clip import build_clip, get_clip_config, trained_state_dict
from vision.sam import build_sam_model, sam_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """64 px scenes of one or two objects: 16 val images."""
    root = tmp_path_factory.mktemp("sw") / "world"
    cfg = ShapeWorldConfig(
        seed=0,
        layout=LayoutConfig(image_size=64, min_objects=1, max_objects=2, min_size=0.08),
        splits=SplitSizes(train=0, val=16, test=0, pretrain=0),
    )
    generate(root, cfg, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def judge() -> GenerationJudge:
    torch.manual_seed(0)
    clip, preprocess, tokenizer = build_clip("tiny-vit")
    return GenerationJudge(clip, preprocess, tokenizer, build_sam_model("tiny"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random tiny decoder, CLIP and SAM checkpoints in their load formats."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    pipe = build_pipeline("tiny-ldm")
    save_checkpoint(
        root / "diffusion",
        {"vae": pipe.vae.state_dict(), "unet": pipe.unet.state_dict()},
        get_diffusion_config("tiny-ldm").to_dict(),
    )
    clip, _, _ = build_clip("tiny-vit")
    cfg = get_clip_config("tiny-vit")
    save_checkpoint(root / "clip", {"clip": trained_state_dict(clip, cfg)}, cfg.to_dict())
    save_checkpoint(
        root / "sam", {"model": build_sam_model("tiny").state_dict()}, sam_config("tiny").to_dict()
    )
    return {"diffusion": root / "diffusion", "clip": root / "clip", "sam": root / "sam"}


def test_labels_satisfy_hand_computed():
    red_circle, blue_star = ("red", "circle"), ("blue", "star")
    assert labels_satisfy([red_circle], [red_circle])
    assert labels_satisfy([blue_star, red_circle, ("x", "y")], [red_circle, blue_star])
    assert not labels_satisfy([red_circle], [red_circle, blue_star])
    assert not labels_satisfy([("red", "star")], [red_circle])  # colour and class must both match
    assert not labels_satisfy([red_circle], [red_circle, red_circle])  # "two red circles"
    assert labels_satisfy([red_circle, red_circle], [red_circle, red_circle])
    assert not labels_satisfy([], [red_circle])


def test_prompts_are_held_out_captions_naming_every_object(world):
    single, two = load_prompts(world, "val", 3, 2)
    assert len(single) == 3 and len(two) == 2
    for item in single + two:
        text = item.prompt.lower()
        assert all(f"{c} {s}" in text for c, s in item.objects), item
        assert item.image_path.is_file()
    assert all(len(i.objects) == 1 for i in single) and all(len(i.objects) == 2 for i in two)
    with pytest.raises(ValueError, match="expected 100 one-object and 0 two-object images, found"):
        load_prompts(world, "val", 100, 0)


def test_accuracy_and_control_hand_computed(world):
    """evaluate_generation with a stub judge: the figures a person would compute by hand."""
    single, two = load_prompts(world, "val", 3, 2)
    s0, s1, s2 = (it.objects[0] for it in single)
    answers = [
        [s0],  # right
        [("no", "thing")],  # wrong
        [("no", "thing"), s2],  # right: a spurious mask does not hurt
        list(two[0].objects),  # right
        two[1].objects[:1],  # one of two objects: wrong
    ]

    class Stub:
        def objects(self, image):
            return answers.pop(0)

        def whole_image(self, images):
            return [s0, (s1[0], "nothing"), ("nothing", s2[1])]

        def clip_score(self, images, prompts):
            return np.zeros(len(images))

    pipe = build_pipeline("tiny-ldm")
    r = evaluate_generation(
        pipe, Stub(), world, "val", 3, 2, num_inference_steps=1, real=False, progress=False
    )
    assert r["generated_single_acc"] == pytest.approx(2 / 3)
    assert r["generated_two_acc"] == pytest.approx(1 / 2)
    assert r["generated_single_whole_acc"] == pytest.approx(1 / 3)
    assert r["generated_single_whole_colour_acc"] == pytest.approx(2 / 3)
    assert r["generated_single_whole_class_acc"] == pytest.approx(2 / 3)
    assert [rec["correct"] for rec in r["records"]] == [True, False, True, True, False]


def _kl_pipe() -> SimpleNamespace:
    """The parts of an SD-1.5-style pipeline the round trip reads, with a tiny AutoencoderKL
    (diffusers' get_dummy_components sizes) making 64 px images from 32 px latents."""
    vae = tiny_autoencoder_kl().eval()
    return SimpleNamespace(
        vae=vae,
        unet=SimpleNamespace(config=SimpleNamespace(sample_size=32)),
        vae_scale_factor=2,
        image_processor=VaeImageProcessor(vae_scale_factor=2),
    )


@pytest.mark.parametrize("kind", ["tiny-ldm", "autoencoder-kl"])
def test_vae_round_trip_against_hand_written_pixel_arithmetic(world, kind):
    """The round trip against the pixel arithmetic written out here (uint8 -> [-1, 1] -> the
    same VAE -> clamp -> round to uint8): equal to within one grey level; an AutoencoderKL
    through its posterior's mode."""
    torch.manual_seed(0)
    pipe = build_pipeline("tiny-ldm") if kind == "tiny-ldm" else _kl_pipe()
    single, two = load_prompts(world, "val", 2, 1)
    images = [Image.open(it.image_path).convert("RGB") for it in single + two]
    ours = vae_round_trip(pipe, images, batch_size=2)
    pixels = np.stack([np.asarray(im) for im in images]).astype(np.float32)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        enc = pipe.vae.encode(x)
        latents = enc.latents if kind == "tiny-ldm" else enc.latent_dist.mode()
        recon = pipe.vae.decode(latents).sample.clamp(-1, 1)
    ref = ((recon + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(int)
    assert len(ours) == 3 and ours[0].size == images[0].size
    for a, b in zip(ours, ref, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - b).max() <= 1
    # a VAE that is not the identity changes the image: the test can fail
    assert np.abs(np.asarray(ours[0], dtype=int) - np.asarray(images[0], dtype=int)).mean() > 1


def test_reconstructed_images_are_judged_separately(world):
    """With reconstructed=True the judge sees the real images after the VAE round trip, and
    their figures land under reconstructed_* and in the table's own column."""
    seen = []

    class Stub:
        def objects(self, image):
            seen.append(np.asarray(image).copy())
            return []

        def whole_image(self, images):
            return [("none", "none")] * len(images)

        def clip_score(self, images, prompts):
            return np.zeros(len(images))

    torch.manual_seed(0)
    pipe = build_pipeline("tiny-ldm")
    r = evaluate_generation(
        pipe, Stub(), world, "val", 2, 1, num_inference_steps=1, real=True,
        reconstructed=True, progress=False,
    )  # fmt: skip
    assert r["reconstructed_single_acc"] == 0.0 and r["reconstructed_two_acc"] == 0.0
    assert len(seen) == 9  # generated, real, reconstructed: 3 images each
    single, two = load_prompts(world, "val", 2, 1)
    real = [Image.open(it.image_path).convert("RGB") for it in single + two]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(seen[3:6], real, strict=True))
    expected = vae_round_trip(pipe, real)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(seen[6:], expected, strict=True))
    table = format_table(r)
    assert "| real images | real, VAE round trip | n |" in table
    assert "| single-object accuracy (SAM masks + CLIP crops) | 0.0 | 0.0 | 0.0 | 2 |" in table


def test_shuffled_control_hand_computed():
    red, blue, green = ("red", "circle"), ("blue", "star"), ("green", "cross")
    items = [PromptItem(f"p{i}", [o], Path("x"), i) for i, o in enumerate([red, blue, green])]
    # image 0 shows red and blue: satisfies prompt 1 (blue); image 1 shows blue only: not green;
    # image 2 shows green: not red
    assert shuffled_control([[red, blue], [blue], [green]], items) == pytest.approx(1 / 3)
    same = [PromptItem("a", [red], Path("x"), 0), PromptItem("b", [red], Path("x"), 1)]
    assert shuffled_control([[red], [red]], same) is None  # identical requests are skipped


def test_judge_on_synthetic_images(judge):
    image = Image.new("RGB", (64, 64), (30, 30, 40))
    labels = judge.whole_image([image, image])
    assert len(labels) == 2 and labels[0] == labels[1]
    assert labels[0][0] in judge.colours and labels[0][1] in judge.classes
    found = judge.objects(image)
    assert all(c in judge.colours and s in judge.classes for c, s in found)
    scores = judge.clip_score([image], ["A red circle."])
    assert scores.shape == (1,) and -1 <= scores[0] <= 1


def test_evaluate_generation_end_to_end(world, judge):
    pipe = build_pipeline("tiny-ldm")
    r = evaluate_generation(
        pipe, judge, world, "val", 2, 2, num_inference_steps=2, batch_size=3, progress=False
    )
    assert r["single_prompts"] == 2 and r["two_prompts"] == 2
    for key in ("generated_single_acc", "generated_two_acc", "real_single_acc", "real_two_acc"):
        assert 0.0 <= r[key] <= 1.0
    assert len(r["records"]) == 4 and [rec["seed"] for rec in r["records"]] == [0, 1, 2, 3]
    assert len(r["_images"]) == 4 and r["_images"][0].size == (64, 64)
    assert r["generated_single_acc"] == np.mean([rec["correct"] for rec in r["records"][:2]])
    again = evaluate_generation(
        pipe, judge, world, "val", 2, 0, num_inference_steps=2, real=False, progress=False
    )
    assert np.array_equal(np.asarray(again["_images"][0]), np.asarray(r["_images"][0]))  # seeds
    assert "real_single_acc" not in again and again["generated_two_acc"] is None
    table = format_table(again)
    assert "| two-object accuracy (SAM masks + CLIP crops) | n/a | n/a | 0 |" in table
    assert "| single-object accuracy (whole-image CLIP) |" in table


def test_cli_writes_json_table_and_grid(world, checkpoints, tmp_path, capsys):
    out, grid = tmp_path / "r.json", tmp_path / "grid.png"
    argv = ["--checkpoint", str(checkpoints["diffusion"]), "--data", str(world)]
    argv += ["--clip", str(checkpoints["clip"]), "--sam", str(checkpoints["sam"])]
    argv += ["--single", "2", "--two", "1", "--steps", "2", "--time-repeats", "2"]
    argv += ["--json", str(out), "--grid", str(grid), "--grid-prompts", "1", "--grid-seeds", "2"]
    assert eval_main([*argv, "--reconstructed"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["table"] in printed and "| single-object accuracy" in printed
    assert saved["sampling"]["repeats"] == 2 and saved["sampling"]["median_s"] > 0
    assert len(saved["records"]) == 3
    assert 0 <= saved["reconstructed_single_acc"] <= 1  # --reconstructed: the VAE's round trip
    assert "| real, VAE round trip |" in printed
    assert (saved["num_inference_steps"], saved["guidance_scale"]) == (2, 4.0)  # 4.0: no preset
    image = Image.open(grid)
    assert image.height == 18 + 2 * 64  # header + one row per prompt (1 single, 1 two-object)
    assert image.width == 260 + 3 * 64  # label + real + 2 seeds


def test_cli_samples_with_the_presets_settings(world, checkpoints, tmp_path, monkeypatch):
    """--preset: steps, guidance and sampler default to the preset's (the tiny preset with
    settings that differ from the no-preset fallbacks 25 / 4.0 / ddim); an explicit option wins."""
    from vlm.config import PolychromeConfig

    tiny = PolychromeConfig.from_preset("tiny")
    diffusion = tiny.diffusion.replace(guidance_scale=5.5, scheduler="dpm++")
    monkeypatch.setattr(
        PolychromeConfig,
        "from_preset",
        classmethod(lambda cls, name: tiny.replace(diffusion=diffusion)),
    )
    out = tmp_path / "r.json"
    argv = ["--preset", "tiny", "--data", str(world), "--no-real", "--time-repeats", "0"]
    argv += ["--clip", str(checkpoints["clip"]), "--sam", str(checkpoints["sam"])]
    argv += ["--single", "1", "--two", "0", "--json", str(out)]
    assert eval_main(argv) == 0
    saved = json.loads(out.read_text())
    assert (saved["num_inference_steps"], saved["guidance_scale"]) == (4, 5.5)
    assert saved["scheduler"] == "dpm++"
    assert eval_main([*argv, "--guidance", "6", "--steps", "3", "--scheduler", "ddim"]) == 0
    saved = json.loads(out.read_text())
    assert (saved["num_inference_steps"], saved["guidance_scale"]) == (3, 6.0)
    assert saved["scheduler"] == "ddim"


def test_cli_errors(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_main(["--checkpoint", "x", "--data", str(world), "--single", "0", "--two", "0"])
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--checkpoint", "x", "--data", str(tmp_path / "none")])
    assert "generate the data first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        eval_main(["--help"])
    assert exc.value.code == 0
    assert "python -m eval.generation --checkpoint" in capsys.readouterr().out
