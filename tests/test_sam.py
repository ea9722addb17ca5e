"""vision/sam.py: the registry, SamConfig, our Sam with segment_anything's predictor and AMG,
the batched decoder, strict loading, and bad image inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import Sam

import vision.sam as vsam
from core.checkpoint import CheckpointError, save_checkpoint
from core.config import ConfigError
from core.images import ImageError
from vision.sam import (
    SAM_REGISTRY,
    SAM_VARIANTS,
    SamConfig,
    build_sam,
    build_sam_model,
    list_sam_models,
    load_sam,
    load_sam_original,
    predict_masks_batched,
    prepare_image,
    sam_config,
)


@pytest.fixture(scope="module")
def tiny() -> Sam:
    torch.manual_seed(0)
    return build_sam(SAM_VARIANTS["tiny"])


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Registry and config
# ---------------------------------------------------------------------------------------------


def test_registry_lists_paper_models_and_our_variants():
    assert list_sam_models() == ["shapes", "tiny", "vit_b", "vit_h", "vit_l"]
    with pytest.raises(ValueError, match=r"unknown SAM model 'vit_x'.*'shapes'.*'vit_h'"):
        build_sam_model("vit_x")
    with pytest.raises(ValueError, match=r"valid variants: \['shapes', 'tiny'\]"):
        sam_config("vit_b")


def test_paper_entries_delegate_to_segment_anything_with_random_weights(monkeypatch):
    calls = []
    for name in ("vit_l", "vit_h"):
        monkeypatch.setitem(
            sam_model_registry, name, lambda checkpoint, name=name: calls.append((name, checkpoint))
        )
        SAM_REGISTRY[name]()
    assert calls == [("vit_l", None), ("vit_h", None)]


@pytest.mark.parametrize(("name", "depth", "millions"), [("vit_b", 12, 93.7), ("vit_l", 24, 312.3)])
def test_paper_models_build_from_our_registry(name, depth, millions):
    # Random weights, no 1024 px forward (seconds on CPU). vit_h (641 M) is only checked above.
    sam = build_sam_model(name)
    assert isinstance(sam, Sam)
    assert sam.image_encoder.img_size == 1024
    assert len(sam.image_encoder.blocks) == depth
    n = sum(p.numel() for p in sam.parameters())
    assert n / 1e6 == pytest.approx(millions, abs=0.1)
    assert not sam.training
    # a released SAM segments everything with segment_anything's own defaults, not ours
    import inspect

    from segment_anything import SamAutomaticMaskGenerator

    from vision.sam import AMG_SETTINGS, amg_settings

    defaults = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    settings = amg_settings(sam)
    assert settings == {k: defaults[k].default for k in settings}
    assert amg_settings(build_sam_model("shapes")) == AMG_SETTINGS


def test_our_variants_are_plain_sams_of_the_configured_sizes():
    sam = build_sam_model("shapes")
    cfg = SAM_VARIANTS["shapes"]
    assert isinstance(sam, Sam)
    assert sam.image_encoder.img_size == cfg.img_size == 128
    assert sam.prompt_encoder.image_embedding_size == (16, 16)
    assert sam.prompt_encoder.mask_input_size == (64, 64)
    n = sum(p.numel() for p in sam.parameters())
    assert 2 * n <= 14e6, f"{n} parameters: fp16 checkpoint over 14 MB"
    assert sam.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])


def test_config_round_trip_and_validation():
    cfg = SAM_VARIANTS["tiny"]
    assert SamConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        SamConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        SamConfig(img_size=100, patch_size=8)
    with pytest.raises(ValueError, match="encoder_num_heads must divide"):
        SamConfig(encoder_embed_dim=100, encoder_num_heads=8)
    with pytest.raises(ValueError, match="global_attn_indexes"):
        SamConfig(encoder_depth=2, encoder_global_attn_indexes=(5,))


# ---------------------------------------------------------------------------------------------
# segment_anything's predictor and AMG on our model, and the batched decoder
# ---------------------------------------------------------------------------------------------


def test_predictor_point_and_box_on_tiny(tiny):
    predictor = SamPredictor(tiny)
    predictor.set_image(_image(48, 80))
    masks, scores, low_res = predictor.predict(
        point_coords=np.array([[30, 20]]), point_labels=np.array([1]), multimask_output=True
    )
    assert masks.shape == (3, 48, 80) and masks.dtype == bool
    assert scores.shape == (3,)
    assert low_res.shape == (3, 32, 32)  # 4x the 8x8 embedding grid
    masks, scores, _ = predictor.predict(box=np.array([10, 5, 60, 40]), multimask_output=False)
    assert masks.shape == (1, 48, 80) and scores.shape == (1,)
    # The low-res logits feed back as a mask prompt, as SAM's interactive loop does.
    masks, _, _ = predictor.predict(
        point_coords=np.array([[30, 20], [5, 5]]),
        point_labels=np.array([1, 0]),
        mask_input=low_res[:1],
        multimask_output=False,
    )
    assert masks.shape == (1, 48, 80)


def test_automatic_mask_generator_on_tiny(tiny):
    amg = SamAutomaticMaskGenerator(
        tiny, points_per_side=4, pred_iou_thresh=-10.0, stability_score_thresh=0.0
    )
    records = amg.generate(_image(40, 56, seed=1))
    assert records, "thresholds are off: some mask must survive"
    for record in records:
        assert record["segmentation"].shape == (40, 56)
        assert record["segmentation"].dtype == bool


def test_batched_decoder_matches_mask_decoder_per_image(tiny):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        emb = tiny.image_encoder(images)  # (2, C, 8, 8)
        pe = tiny.prompt_encoder.get_dense_pe()
        coords = torch.rand(6, 2, 2) * 64
        labels = torch.tensor([[1, 0], [1, 1], [1, -1]] * 2)
        sparse, dense = tiny.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        for multimask in (True, False):
            masks, iou = predict_masks_batched(
                tiny.mask_decoder, emb.repeat_interleave(3, 0), pe, sparse, dense, multimask
            )
            for i in range(2):
                rows = slice(3 * i, 3 * i + 3)
                ref_masks, ref_iou = tiny.mask_decoder(
                    image_embeddings=emb[i : i + 1],
                    image_pe=pe,
                    sparse_prompt_embeddings=sparse[rows],
                    dense_prompt_embeddings=dense[rows],
                    multimask_output=multimask,
                )
                torch.testing.assert_close(masks[rows], ref_masks, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(iou[rows], ref_iou, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="one image embedding per prompt"):
            predict_masks_batched(tiny.mask_decoder, emb, pe, sparse, dense, True)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_load_sam_fp16_round_trip_is_strict(tiny, tmp_path):
    state = {k: v.half() for k, v in tiny.state_dict().items()}
    cfg = SAM_VARIANTS["tiny"].to_dict()
    save_checkpoint(tmp_path / "ok", {"model": state}, cfg)
    loaded = load_sam(tmp_path / "ok")
    assert not loaded.training
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, state[key].float(), rtol=0, atol=0)
    # A checkpoint of another size does not fit: a clear error, no partial load.
    save_checkpoint(tmp_path / "bad", {"model": state}, SAM_VARIANTS["shapes"].to_dict())
    with pytest.raises(CheckpointError, match=r"does not fit Sam|expected shape"):
        load_sam(tmp_path / "bad")
    extra = {**state, "extra.weight": torch.zeros(1)}
    save_checkpoint(tmp_path / "extra", {"model": extra}, cfg)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra.weight'\]"):
        load_sam(tmp_path / "extra")


def test_load_sam_original_reads_meta_pth_with_weights_only(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(SAM_REGISTRY, "vit_b", lambda: build_sam(SAM_VARIANTS["tiny"]))
    torch.save(tiny.state_dict(), tmp_path / "sam_vit_b.pth")
    sam = load_sam_original("vit_b", tmp_path / "sam_vit_b.pth")
    for key, value in sam.state_dict().items():
        assert torch.equal(value, tiny.state_dict()[key])
    with pytest.raises(ValueError, match="expected one of"):
        load_sam_original("tiny", tmp_path / "sam_vit_b.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_sam_original("vit_b", tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------
# Bad input: every mode and size to an RGB array, or ImageError
# ---------------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if image.mode == "CMYK" else "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_prepare_image_any_mode_feeds_the_predictor(tiny, mode):
    rgb = Image.fromarray(_image(24, 36))
    if mode == "I;16":
        image = Image.fromarray(np.arange(24 * 36, dtype=np.uint16).reshape(24, 36) * 50)
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = rgb.convert(mode)
    for source in (image, _png_bytes(image)) if mode not in ("I", "F") else (image,):
        array = prepare_image(source, tiny.image_encoder.img_size)
        assert array.shape == (24, 36, 3) and array.dtype == np.uint8
        predictor = SamPredictor(tiny)
        predictor.set_image(array)
        masks, _, _ = predictor.predict(point_coords=np.array([[3, 4]]), point_labels=np.array([1]))
        assert masks.shape == (3, 24, 36)


def test_prepare_image_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    assert (prepare_image(rgba) == 255).all()


@pytest.mark.parametrize("side", [1, 4096])
def test_prepare_image_extreme_sizes(tiny, side):
    array = prepare_image(
        np.full((side, side, 3), 200, dtype=np.uint8), tiny.image_encoder.img_size
    )
    predictor = SamPredictor(tiny)
    predictor.set_image(array)
    masks, scores, _ = predictor.predict(
        point_coords=np.array([[side // 2, side // 2]]), point_labels=np.array([1])
    )
    assert masks.shape == (3, side, side) and scores.shape == (3,)


def test_prepare_image_rejects_what_is_not_a_usable_image(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a PNG")
    with pytest.raises(ImageError, match="not an image file"):
        prepare_image(fake)
    with pytest.raises(ImageError, match="between 1x1 and 4096x4096"):
        prepare_image(np.zeros((4097, 8, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="file not found"):
        prepare_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="shape"):
        prepare_image(np.zeros((4, 4, 2), dtype=np.uint8))
    # 1 x 300 would shrink to 0 rows at img_size 64: refused here, not inside torchvision.
    with pytest.raises(ImageError, match="too elongated"):
        prepare_image(np.zeros((1, 300, 3), dtype=np.uint8), 64)
    assert prepare_image(np.zeros((1, 100, 3), dtype=np.uint8), 64).shape == (1, 100, 3)


def test_module_exports_are_defined():
    assert set(vsam.__all__) <= set(dir(vsam))
