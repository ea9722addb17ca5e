"""vision.clip: configs, open_clip building (ours and registry models), dense features, text heads,
image inputs of every kind, strict checkpoint loading."""

from __future__ import annotations

import dataclasses

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core.checkpoint import CheckpointError, save_checkpoint
from core.config import ConfigError
from core.images import ImageError
from vision.clip import (
    FROZEN_PREFIX,
    OPEN_CLIP_PREFIX,
    TENSOR_FILE,
    ClipConfig,
    ClipPresetConfig,
    ClipVisionConfig,
    build_clip,
    dense_features,
    encode_images,
    encode_text_pooled,
    get_clip_config,
    list_clip_configs,
    load_clip,
    pooled_from_dense,
    text_classifier,
    trained_state_dict,
    visual_head,
    weighted_pool,
    window_attention_mask,
)


@pytest.fixture(scope="module")
def tiny():
    """(model, preprocess, tokenizer) of the tiny-vit variant: random ViT, frozen MiniLM."""
    torch.manual_seed(0)
    return build_clip("tiny-vit")


def test_registry_names_and_errors():
    assert {"shapes-vit", "tiny-vit"} <= set(list_clip_configs())
    assert get_clip_config("shapes-vit").vision.grid == 16
    with pytest.raises(ValueError, match=r"unknown CLIP config 'nope'.*shapes-vit"):
        get_clip_config("nope")
    with pytest.raises(ValueError, match=r"unknown CLIP model 'nope'.*ViT-B-32"):
        build_clip("nope")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ClipVisionConfig(image_size=100, patch_size=8)
    with pytest.raises(ConfigError, match="unknown field"):
        ClipConfig.from_dict({"name": "x", "vision": {"widht": 3}})
    with pytest.raises(ValueError, match="registry models only"):
        build_clip("tiny-vit", image_size=32)


def test_preset_entry_validates_the_model_name():
    assert ClipPresetConfig.from_dict({"model": "tiny-vit"}).checkpoint is None
    assert ClipPresetConfig(model="ViT-B-32").model == "ViT-B-32"
    with pytest.raises(ConfigError, match="unknown CLIP model 'vit-xxl'"):
        ClipPresetConfig.from_dict({"model": "vit-xxl"})


def test_shapes_variant_fits_the_checkpoint_budget():
    """The trained tensors of shapes-vit in fp16 stay under 14 MB (counted without building)."""
    cfg = get_clip_config("shapes-vit")
    v, d = cfg.vision, cfg.embed_dim
    per_block = 4 * v.width**2 + 4 * v.width + 2 * int(v.width * v.mlp_ratio) * v.width
    per_block += int(v.width * v.mlp_ratio) + v.width + 4 * v.width  # mlp biases, 2 LayerNorms
    vit = v.layers * per_block + 3 * v.patch_size**2 * v.width + (v.grid**2 + 1) * v.width
    vit += v.width + 4 * v.width + v.width * d  # class token, ln_pre/ln_post, proj
    total = vit + 384 * d + 1  # MiniLM pooled (384) -> joint projection, logit scale
    assert total * 2 < 14e6, total


def test_build_registers_with_open_clip_and_freezes_minilm(tiny):
    model, _, tokenizer = tiny
    assert OPEN_CLIP_PREFIX + "tiny-vit" in open_clip.list_models()
    cfg = open_clip.get_model_config(OPEN_CLIP_PREFIX + "tiny-vit")
    assert cfg["text_cfg"]["hf_pooler_type"] == "mean_pooler"
    assert cfg["text_cfg"]["hf_model_name"].endswith("model")  # the resolved MiniLM folder
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    stored = set(trained_state_dict(model, get_clip_config("tiny-vit")))
    assert trainable == stored  # what trains is exactly what a checkpoint stores
    assert "text.proj.weight" in stored and "logit_scale" in stored
    assert not any(k.startswith(FROZEN_PREFIX) for k in stored)
    assert all(not p.requires_grad for p in model.text.transformer.parameters())
    ids = tokenizer(["a red circle.", "there are two blue stars and a white ring."])
    assert ids.shape == (2, 16)
    with torch.no_grad():
        text = model.encode_text(ids)
        image = model.encode_image(torch.randn(3, 3, 64, 64))
    assert text.shape == (2, 32) and image.shape == (3, 32)


def test_precomputed_pooled_text_equals_encode_text(tiny):
    model, _, tokenizer = tiny
    ids = tokenizer(["a red circle.", "an orange hexagon is left of a pink heart."])
    with torch.no_grad():
        via_pooled = model.text.proj(encode_text_pooled(model, ids))
        direct = model.encode_text(ids)
        # trimming the padding to the longest caption (what training does) changes nothing
        width = int((ids != 0).sum(1).max())
        trimmed = model.text.proj(encode_text_pooled(model, ids[:, :width]))
    torch.testing.assert_close(via_pooled, direct, rtol=0, atol=1e-6)
    torch.testing.assert_close(trimmed, direct, rtol=0, atol=1e-5)


def test_dense_features_of_our_vit_decompose_the_image_embedding(tiny):
    model, _, _ = tiny
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = dense_features(model, x)
        pooled = model.encode_image(x)
    assert dense.tokens.shape == (2, 64, 32)  # 8x8 grid of width-32 tokens
    assert dense.projected.shape == (2, 32, 8, 8) and dense.grid == (8, 8)
    # pool="avg": the image embedding is the mean of the projected patch tokens
    torch.testing.assert_close(dense.projected.mean(dim=(2, 3)), pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled_from_dense(model, dense), pooled)
    # uniform weights pool to the image embedding; a one-hot weighting picks one location
    uniform = torch.full((2, 3, 64), 1 / 64)
    torch.testing.assert_close(weighted_pool(model, dense, uniform)[:, 1], pooled)
    onehot = torch.zeros(2, 64)
    onehot[:, 8 * 3 + 5] = 1
    torch.testing.assert_close(weighted_pool(model, dense, onehot), dense.projected[:, :, 3, 5])
    # the projection of one location is the head applied to that token (row-major grid)
    torch.testing.assert_close(
        visual_head(model, dense.tokens[:, 8 * 3 + 5]), dense.projected[:, :, 3, 5]
    )


def test_dense_features_vit_b32_registry_model():
    """An open_clip registry ViT (class-token pooling) through the same code, at 64 px."""
    model, _, _ = build_clip("ViT-B-32", image_size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        dense = dense_features(model, x)
        pooled = model.encode_image(x)
    assert dense.tokens.shape == (1, 4, 768) and dense.projected.shape == (1, 512, 2, 2)
    assert dense.cls_token is not None and dense.cls_token.shape == (1, 768)
    # head(class token) == encode_image: the per-token head is the global head
    torch.testing.assert_close(visual_head(model, dense.cls_token), pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled_from_dense(model, dense), pooled, rtol=1e-5, atol=1e-5)


def test_dense_features_convnext_registry_model():
    """convnext_large_d_320 (timm trunk + MLP head) at 64 px: trunk.forward_features -> per-location
    head norm + projection (FC-CLIP); head(mean of the map) == encode_image."""
    model, _, _ = build_clip("convnext_large_d_320", image_size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        dense = dense_features(model, x)
        pooled = model.encode_image(x)
    assert dense.tokens.shape == (1, 4, 1536)  # stride 32 -> 2x2
    assert dense.projected.shape == (1, 768, 2, 2) and dense.cls_token is None
    torch.testing.assert_close(pooled_from_dense(model, dense), pooled, rtol=1e-4, atol=1e-5)
    # mask pooling of a timm tower: head(weighted mean of the raw map); uniform = encode_image
    uniform = torch.full((1, 1, 4), 0.25)
    torch.testing.assert_close(
        weighted_pool(model, dense, uniform)[:, 0], pooled, rtol=1e-4, atol=1e-5
    )
    onehot = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(
        weighted_pool(model, dense, onehot),
        visual_head(model, dense.tokens[:, 2]),
        rtol=1e-4,
        atol=1e-5,
    )


def test_window_attention_mask_against_a_loop():
    h, w, k = 3, 4, 3
    mask = window_attention_mask((h, w), k)
    assert mask.shape == (1 + h * w, 1 + h * w)
    cells = [(r, c) for r in range(h) for c in range(w)]
    for i in range(1 + h * w):
        for j in range(1 + h * w):
            if i == 0:
                allowed = True  # the class token reads everything
            elif j == 0:
                allowed = False  # no patch reads the class token
            else:
                (ri, ci), (rj, cj) = cells[i - 1], cells[j - 1]
                allowed = abs(ri - rj) <= k // 2 and abs(ci - cj) <= k // 2
            assert mask[i, j] == (0.0 if allowed else float("-inf")), (i, j)
    for bad in (0, 2):
        with pytest.raises(ValueError, match="window must be an odd number >= 1"):
            window_attention_mask((2, 2), bad)


def test_local_features_depend_only_on_their_receptive_field(tiny):
    """tiny-vit: 8x8 patches, 2 blocks. With a 3x3 window a patch sees 1 patch away per block, so
    after 2 blocks its features depend on the patches at most 2 rows and columns away: a change in
    the top-left patch reaches (2, 2) and not (3, 3) or (0, 3). Global attention reaches all."""
    model, _, _ = tiny
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[:, :, :8, :8] += 1.0  # the pixels of patch (0, 0)
    with torch.no_grad():
        a, b = (dense_features(model, t, window=3).tokens[0].reshape(8, 8, -1) for t in (x, y))
        ga, gb = (dense_features(model, t).tokens[0].reshape(8, 8, -1) for t in (x, y))
    changed = (a - b).abs().amax(-1) > 1e-6
    for r in range(8):
        for c in range(8):
            assert bool(changed[r, c]) == (max(r, c) <= 2), (r, c)
    assert bool(((ga - gb).abs().amax(-1) > 1e-6).all())
    assert not torch.allclose(a, ga)  # local features are not the global ones
    with pytest.raises(ValueError, match="window must be >= 0"):
        dense_features(model, x, window=-1)
    with pytest.raises(ValueError, match="window must be an odd number"):
        dense_features(model, x, window=4)


def test_windowed_path_with_an_open_mask_is_the_tower_as_trained(tiny, monkeypatch):
    """The hand-written windowed forward (embeddings, then the transformer with a mask) is the
    tower's own forward when the mask allows everything."""
    model, _, _ = tiny
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = dense_features(model, x)  # open_clip's forward_intermediates
        monkeypatch.setattr(
            "vision.clip.window_attention_mask", lambda grid, window, dtype: torch.zeros(65, 65)
        )
        open_mask = dense_features(model, x, window=3)
    torch.testing.assert_close(open_mask.tokens, ref.tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(open_mask.cls_token, ref.cls_token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(open_mask.projected, ref.projected, rtol=1e-5, atol=1e-5)


def test_local_features_need_a_vit_tower():
    class NotAViT:  # any other tower (open_clip's TimmModel, a ConvNeXt) is refused up front
        visual = torch.nn.Identity()

    with pytest.raises(ValueError, match=r"needs a ViT image tower.*Identity"):
        dense_features(NotAViT(), torch.randn(1, 3, 64, 64), window=3)


def test_dense_features_rejects_bad_input(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dense_features(model, torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(N, D_vis\)"):
        visual_head(model, torch.randn(2, 3, 32))


def test_text_classifier_averages_normalised_templates(tiny):
    model, _, tokenizer = tiny
    templates = ("a {}.", "a photo of a {}.")
    heads = text_classifier(model, tokenizer, ["orange shape", "circle"], templates)
    assert heads.shape == (2, 32)
    torch.testing.assert_close(heads.norm(dim=-1), torch.ones(2))
    # by hand, with the article fixed before a vowel
    texts = ["an orange shape.", "a photo of an orange shape."]
    with torch.no_grad():
        emb = model.encode_text(tokenizer(texts), normalize=True)
    torch.testing.assert_close(heads[0], F.normalize(emb.mean(0), dim=-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="names is empty"):
        text_classifier(model, tokenizer, [])
    with pytest.raises(ValueError, match="templates"):
        text_classifier(model, tokenizer, ["circle"], ["no placeholder"])


def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return {
        "L": rgb.convert("L"),
        "RGBA": rgb.convert("RGBA"),
        "P": rgb.convert("P"),
        "CMYK": rgb.convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)),
        "1x1": Image.new("RGB", (1, 1), (255, 0, 0)),
    }


def test_encode_images_accepts_every_mode_size_and_kind(tiny, tmp_path):
    model, preprocess, _ = tiny
    images = _mode_images()
    assert images["I;16"].mode == "I;16"
    path = tmp_path / "pic.png"
    images["RGBA"].save(path)
    array = np.asarray(images["L"].convert("RGB"))
    inputs = [*images.values(), path, str(path), path.read_bytes(), array]
    feats = encode_images(model, preprocess, inputs)
    assert feats.shape == (len(inputs), 32)
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(len(inputs)))
    # the same picture as a path, bytes or PIL image gives the same embedding
    torch.testing.assert_close(feats[6], feats[7])
    torch.testing.assert_close(feats[6], feats[8])
    torch.testing.assert_close(feats[1], feats[6])


def test_encode_images_largest_allowed_image(tiny):
    model, preprocess, _ = tiny
    big = Image.new("RGB", (4096, 4096), (0, 128, 255))  # 48 MB, made here
    feats = encode_images(model, preprocess, [big])
    small = encode_images(model, preprocess, [Image.new("RGB", (64, 64), (0, 128, 255))])
    torch.testing.assert_close(feats, small, rtol=1e-4, atol=1e-4)  # a flat colour is a colour


def test_encode_images_rejects_what_is_not_an_image(tiny, tmp_path):
    model, preprocess, _ = tiny
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a PNG\n")
    with pytest.raises(ImageError, match="not an image file"):
        encode_images(model, preprocess, [fake])
    with pytest.raises(ImageError, match="file not found"):
        encode_images(model, preprocess, [tmp_path / "missing.png"])
    with pytest.raises(ImageError, match="between 1x1 and 4096x4096"):
        encode_images(model, preprocess, [np.zeros((4097, 2), dtype=np.uint8)])
    with pytest.raises(ImageError, match="received int"):
        encode_images(model, preprocess, [3])
    with pytest.raises(TypeError, match="wrap it in a list"):
        encode_images(model, preprocess, Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="empty"):
        encode_images(model, preprocess, [])


def _save_tiny(model, path, drop=None, extra=None):
    cfg = get_clip_config("tiny-vit")
    tensors = {k: v.half() for k, v in trained_state_dict(model, cfg).items()}
    if drop:
        del tensors[drop]
    if extra:
        tensors.update(extra)
    return save_checkpoint(path, {TENSOR_FILE: tensors}, cfg.to_dict())


def test_load_clip_round_trip_and_strictness(tiny, tmp_path):
    model, _, _ = tiny
    torch.manual_seed(1)
    trained, _, _ = build_clip("tiny-vit")  # other random weights than `tiny`
    with torch.no_grad():
        trained.logit_scale.fill_(3.0)
    _save_tiny(trained, tmp_path / "ok")
    loaded, _, tokenizer = load_clip(tmp_path / "ok")
    x = torch.randn(2, 3, 64, 64)
    ids = tokenizer(["a red circle."])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(x), trained.encode_image(x), rtol=0.02, atol=0.02
        )
        torch.testing.assert_close(
            loaded.encode_text(ids), trained.encode_text(ids), rtol=0.02, atol=0.02
        )
        assert not torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=0.05)
    assert float(loaded.logit_scale.detach()) == 3.0
    # frozen MiniLM came from its source, bit for bit
    for (k, a), b in zip(
        loaded.text.transformer.state_dict().items(),
        model.text.transformer.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), k

    _save_tiny(trained, tmp_path / "missing", drop="visual.proj")
    with pytest.raises(CheckpointError, match=r"missing keys \['visual.proj'\]"):
        load_clip(tmp_path / "missing")
    frozen_key = FROZEN_PREFIX + "embeddings.word_embeddings.weight"
    extra = {frozen_key: model.state_dict()[frozen_key].half()}
    _save_tiny(trained, tmp_path / "frozen", extra=extra)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*must not be stored"):
        load_clip(tmp_path / "frozen")


def test_load_clip_rejects_a_foreign_config(tiny, tmp_path):
    model, _, _ = tiny
    cfg = dataclasses.replace(get_clip_config("tiny-vit"), embed_dim=48)
    tensors = {k: v.half() for k, v in trained_state_dict(model, cfg).items()}
    save_checkpoint(tmp_path / "c", {TENSOR_FILE: tensors}, cfg.to_dict())
    with pytest.raises(CheckpointError, match="expected shape"):
        load_clip(tmp_path / "c")
    bad = get_clip_config("tiny-vit").to_dict() | {"colour": "red"}
    save_checkpoint(tmp_path / "d", {TENSOR_FILE: tensors}, bad)
    with pytest.raises(ConfigError, match="unknown field"):
        load_clip(tmp_path / "d")
