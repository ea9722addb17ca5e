"""STAMP on the tiny preset: one-pass masks, cache reuse, frozen chat, training."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from data.shapeworld import main as shapeworld_main
from segmentation.stamp import (
    StampConfig,
    fit_grid_logits,
    grid_targets,
    mask_like_clip_input,
    mask_pass_attention,
    refine_with_sam,
    sample_points,
    stamp_losses,
    upsample_logits,
)
from vision.clip import dense_features
from vlm.config import PolychromeConfig
from vlm.model import ImageLoraConfig, PolychromeVLM, ProjectorConfig, VLMConfig
from vlm.stamp import StampVLM

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = StampConfig(mask_merge=2, lora_rank=4, lora_targets=["q_proj", "v_proj", "down_proj"])


def _vlm() -> PolychromeVLM:
    cfg = PolychromeConfig.from_preset("tiny")
    torch.manual_seed(0)
    return PolychromeVLM.build(VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=cfg.vlm.projector))


def _stamp(lora_scale: float = 0.5) -> StampVLM:
    """Tiny STAMP with non-zero LoRA B matrices (peft starts them at zero: a no-op adapter)."""
    model = StampVLM(_vlm(), CFG)
    with torch.no_grad():
        for name, p in model.vlm.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, lora_scale)
    return model.eval()


@pytest.fixture(scope="module")
def stamp() -> StampVLM:
    return _stamp()


def _image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _prompt(text: str = "Segment the red circle.", seed: int = 0) -> list[dict]:
    return [{"role": "user", "content": text, "images": [_image(seed)]}]


# -- the model-agnostic parts ---------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [0, 32])
def test_grid_oracle_recovers_a_grid_aligned_mask(resolution):
    """A mask made of whole cells of the 8x8 grid is what the fitted grid logits trace once
    upsampled and thresholded, whether the loss is taken on the grid or upsampled to 32."""
    mask = torch.zeros(2, 64, 64)
    mask[0, 16:40, 24:48] = 1  # cells rows 2-4, cols 3-5
    mask[1, 48:64, 0:8] = 1  # one corner cell
    logits = fit_grid_logits(mask, (8, 8), resolution)
    assert logits.shape == (2, 64)
    cells = grid_targets(mask, (8, 8))
    assert ((logits > 0) == (cells > 0.5)).all()  # the cells' signs, computed independently
    pixels = upsample_logits(logits, (8, 8), (64, 64)) > 0
    for p, m in zip(pixels, mask.bool(), strict=True):
        iou = (p & m).sum() / (p | m).sum()
        assert iou > 0.8
    bce0, dice0 = stamp_losses(torch.zeros(2, 64), cells)
    bce1, dice1 = stamp_losses(logits, cells)
    assert 0.3 * bce1 + 0.7 * dice1 < 0.3 * (0.3 * bce0 + 0.7 * dice0)
    with pytest.raises(ValueError, match="batch, H, W"):
        fit_grid_logits(mask[0], (8, 8))


def test_mask_pass_attention_sees_real_prefix_and_all_mask_tokens():
    mask = mask_pass_attention(torch.tensor([[0, 1, 1], [1, 1, 1]]), 2, torch.float32)
    low = torch.finfo(torch.float32).min
    assert mask.shape == (2, 1, 2, 5)
    assert mask[0, 0].tolist() == [[low, 0, 0, 0, 0], [low, 0, 0, 0, 0]]
    assert (mask[1] == 0).all()
    with pytest.raises(ValueError, match="n_mask"):
        mask_pass_attention(torch.ones(1, 3), 0, torch.float32)


def test_grid_targets_are_cell_area_fractions():
    m = torch.zeros(1, 4, 4)
    m[0, :2, :2] = 1  # the whole top-left cell of a 2x2 grid
    m[0, 2, 2] = 1  # a quarter of the bottom-right cell
    assert grid_targets(m, (2, 2)).tolist() == [[1.0, 0.0, 0.0, 0.25]]


def test_stamp_losses_match_hand_computation():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0]])
    p = [0.5, 1 / (1 + np.exp(-2)), 1 / (1 + np.exp(1))]
    bce = -(np.log(p[0]) + np.log(p[1]) + np.log(1 - p[2])) / 3
    dice = 1 - (2 * (p[0] + p[1]) + 1) / (sum(p) + 2 + 1)
    got_bce, got_dice = stamp_losses(logits, targets, smooth=1.0)
    assert float(got_bce) == pytest.approx(bce, rel=1e-5)
    assert float(got_dice) == pytest.approx(dice, rel=1e-5)


def test_mask_follows_the_images_padding_to_a_square():
    """A non-square image is padded, not cropped (PolychromeVLM.pixel_values): an object at its
    right edge stays in the mask, where a centre crop dropped it."""
    mask = np.zeros((4, 8), bool)
    mask[:, 6:] = True  # the two right-most columns
    out = mask_like_clip_input(mask, 8)  # padded to 8x8: rows 2..5 hold the image
    assert out.shape == (8, 8)
    assert out[2:6, 6:].min() == 1.0 and out.sum() == 8
    assert out[:2].max() == 0.0 and out[6:].max() == 0.0  # the padding


@pytest.mark.parametrize("shape", [(63, 100), (100, 63), (50, 77), (64, 64), (67, 64)])
def test_mask_geometry_is_the_images(shape):
    """mask_like_clip_input against torchvision applied to the mask as the VLM applies it to the
    image: pad to a square (LLaVA's expand2square offsets), resize (bilinear with antialiasing, as
    PIL filters the image); and the model's pixel logits map the grid back onto the same pixels: a
    mask through the grid and back is the mask again (up to the grid's resolution)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import pad, resize

    from core.images import pad_to_square

    h, w = shape
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.5
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    want = pad(torch.from_numpy(mask.astype(np.float32))[None], [left, top, side - w - left,
                                                                  side - h - top])  # fmt: skip
    want = resize(want, [64, 64], interpolation=InterpolationMode.BILINEAR, antialias=True)[0]
    torch.testing.assert_close(mask_like_clip_input(mask, 64), want)
    # the image itself lands where the mask does: pad_to_square of a white-on-black picture
    picture = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    squared = np.asarray(pad_to_square(picture, (0, 0, 0)))[..., 0] > 127
    assert np.array_equal(squared, mask_like_clip_input(mask, side).numpy() > 0.5)
    # back from the grid: a block of the image comes back where it was
    model = StampVLM(_vlm(), CFG).eval()
    block = np.zeros(shape, bool)
    block[h // 4 : 3 * h // 4, w // 2 :] = True  # touching the right edge
    cover = F.adaptive_avg_pool2d(mask_like_clip_input(block, side)[None, None], model.mask_grid)
    grid = torch.logit(cover[0, 0].clamp(0.01, 0.99)).numpy()  # > 0 where a cell is half covered
    back = model.pixel_logits(grid, (w, h)) > 0
    assert back.shape == (h, w)
    inter, union = (back & block).sum(), (back | block).sum()
    assert inter / union > 0.6, inter / union


def test_stamp_lora_dropout_is_on_in_training_only():
    """StampConfig.lora_dropout acts while training (the frozen LLM's own modules stay in eval
    mode) and not at inference."""
    model = StampVLM(_vlm(), CFG.replace(lora_dropout=0.5))
    drops = [m for n, m in model.vlm.llm.named_modules() if n.endswith("lora_dropout.default")]
    assert drops and all(m.p == 0.5 for m in drops)
    model.train()
    assert all(m.training for m in drops) and not model.vlm.llm.training
    model.eval()
    assert not any(m.training for m in drops)


def test_sample_points_spread_over_foreground_and_one_negative():
    logits = np.full((32, 32), -5.0)
    logits[4:12, 4:12] = 3.0
    logits[20:28, 20:28] = 2.0
    logits[31, 0] = -9.0
    coords, labels = sample_points(logits, n_pos=2, n_neg=1)
    assert labels.tolist() == [1, 1, 0]
    pos = coords[:2].astype(int)
    assert all(logits[y, x] > 0 for x, y in pos)
    assert np.hypot(*(pos[0] - pos[1])) >= 4  # spread, not two neighbours of the same blob
    assert coords[2].tolist() == [0.0, 31.0]
    assert sample_points(np.full((8, 8), -1.0))[0].shape == (0, 2)


def test_sam_refinement_keeps_shape_and_empty_stays_empty():
    from segment_anything import SamPredictor

    from vision.sam import SAM_VARIANTS, build_sam

    torch.manual_seed(0)
    predictor = SamPredictor(build_sam(SAM_VARIANTS["tiny"]).eval())
    image = np.asarray(_image(1, 48))
    predictor.set_image(image)
    logits = np.full((48, 48), -4.0, np.float32)
    logits[10:30, 12:36] = 4.0
    out = refine_with_sam(predictor, logits)
    assert out.shape == (48, 48) and out.dtype == bool
    coarse = logits > 0
    # A random SAM's mask rarely overlaps the coarse one: then the coarse mask is kept.
    inter, union = (out & coarse).sum(), (out | coarse).sum()
    assert np.array_equal(out, coarse) or inter / union >= 0.5
    assert not refine_with_sam(predictor, np.full((48, 48), -1.0, np.float32)).any()


# -- the mask pass on the LLM ---------------------------------------------------------------------


def test_cached_mask_pass_equals_one_uncached_forward(stamp, monkeypatch):
    """The mask pass over a cache == one forward over [prefix, <seg>, masks] with STAMP's mask
    (prefix causal, mask tokens seeing everything), computed from scratch. LoRA is kept off in
    both, because the reference cannot switch it between positions."""
    monkeypatch.setattr(StampVLM, "lora", lambda self: contextlib.nullcontext())
    prompts = [_prompt("Segment it.", 0), _prompt("Please segment the blue square now.", 1)]
    ids, attn, pixels, last, _ = stamp._batch(prompts)
    visual, feats = stamp.image_features(pixels)
    with torch.no_grad():
        _, cache = stamp.prefix(ids, attn, visual)
        stamp.step(torch.full((2,), stamp.seg_id), attn, cache)
        kv = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        got = stamp.mask_pass(feats[last], kv, cache)
        # reference: everything in one pass
        seq = torch.cat([ids, torch.full((2, 1), stamp.seg_id)], 1)
        embeds = stamp.vlm.embed(seq, visual)
        row = stamp.vlm.added_embeddings[stamp.vlm.added_ids.index(stamp.mask_id)]
        embeds = torch.cat([embeds, row + feats[last]], 1)
        t, n = seq.shape[1], feats.shape[1]
        allowed = torch.zeros(2, t + n, t + n, dtype=torch.bool)
        allowed[:, :t, :t] = torch.tril(torch.ones(t, t, dtype=torch.bool))
        allowed[:, t:, :] = True
        allowed &= torch.cat([kv, torch.ones(2, n, dtype=kv.dtype)], 1).bool()[:, None, :]
        allowed |= torch.eye(t + n, dtype=torch.bool)  # padded rows attend to themselves
        full = torch.zeros(2, 1, t + n, t + n).masked_fill(~allowed[:, None], -1e30)
        positions = torch.cat(
            [(kv.cumsum(-1) - 1).clamp(min=0), kv.sum(-1, keepdim=True) + torch.arange(n)], 1
        )
        hidden = stamp.vlm.llm.base_model(
            inputs_embeds=embeds, attention_mask=full, position_ids=positions
        ).last_hidden_state
        want = stamp.head(hidden[:, t:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_chat_logits_stay_bitwise_the_vlm_cores_and_lora_serves_the_mask_pass():
    core = _vlm()
    text = core.prepare([{"role": "user", "content": "Hello there"}])
    image = core.prepare(_prompt("What is this?"))
    with torch.no_grad():
        before = [core(**text).logits, core(**image).logits]
    model = _stamp()  # a second VLM from the same seed, with STAMP attached
    assert model.vlm.llm is not core.llm
    with torch.no_grad():
        model.segment([_prompt()])  # a mask pass in between must leave LoRA off again
        after = [model.vlm(**text).logits, model.vlm(**image).logits]
        on = model.segment([_prompt()])[0]
        with torch.no_grad():
            for name, p in model.vlm.llm.named_parameters():
                if "lora_B" in name:
                    p.zero_()
        off = model.segment([_prompt()])[0]
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert not np.allclose(on, off)  # the adapters are active in the mask pass


def _lora_core(seed: int = 0) -> PolychromeVLM:
    """The tiny core with a rank-4 image LoRA, its B matrices random (peft starts them at 0)."""
    cfg = PolychromeConfig.from_preset("tiny")
    torch.manual_seed(seed)
    lora = ImageLoraConfig(rank=4)
    vlm_cfg = VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=cfg.vlm.projector, lora=lora)
    core = PolychromeVLM.build(vlm_cfg)
    with torch.no_grad():
        for name, p in core.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return core


def test_stamp_on_a_core_with_an_image_lora(tmp_path):
    """The core's image LoRA stays the core's: on for every pass over a prompt with an image
    (STAMP's prefix, steps and mask pass), beside STAMP's own adapter in the mask pass only;
    frozen in training; saved with the core, not in STAMP's tensors."""
    from conftest import image_lora_last_hidden

    reference = _lora_core()
    model = StampVLM(_lora_core(), CFG)  # the same core from the same seed, STAMP attached
    with torch.no_grad():
        for name, p in model.vlm.llm.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.normal_(0, 0.5)
    model.eval()
    text = reference.prepare([{"role": "user", "content": "Hello there"}])
    image = reference.prepare(_prompt("What is this?"))
    with torch.no_grad():
        for batch in (text, image):  # chat logits: bitwise the core's, image LoRA and all
            assert torch.equal(model.vlm(**batch).logits, reference(**batch).logits)
        # STAMP's own prefix reads the image prompt with the image LoRA, as the core does
        ids, attn, pixels, _, _ = model._batch([_prompt("What is this?")])
        visual, _ = model.image_features(pixels)
        hidden, cache = model.prefix(ids, attn, visual)
        want = image_lora_last_hidden(reference, ids, attn, visual)
        torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
        _, text_cache = model.prefix(text["input_ids"], text["attention_mask"], None)
        assert cache in model.vlm.image_caches and text_cache not in model.vlm.image_caches
        # the mask pass reads both adapters: zeroing either one's B changes the mask
        both = model.segment([_prompt()])[0]
        for adapter in ("image", "default"):
            saved = {
                n: p.clone()
                for n, p in model.vlm.llm.named_parameters()
                if "lora_B" in n and f".{adapter}." in n
            }
            params = dict(model.vlm.llm.named_parameters())
            for n in saved:
                params[n].zero_()
            assert not np.allclose(model.segment([_prompt()])[0], both)
            for n, v in saved.items():
                params[n].copy_(v)
        np.testing.assert_array_equal(model.segment([_prompt()])[0], both)
    # training: gradient reaches STAMP's adapter only; the image LoRA is frozen with the core
    model.train()
    gt = np.zeros((64, 64), bool)
    gt[:32, :32] = True
    model.training_losses([_prompt()], [gt], [_prompt("Describe the image.")])["loss"].backward()
    for name, p in model.vlm.llm.named_parameters():
        if "lora_B" in name:
            own = ".default." in name
            assert p.requires_grad == own and (p.grad is not None) == own, name
    model.eval()
    # saving: STAMP's tensors hold its adapter only, the core's its own; both load back
    folder = model.save_pretrained(tmp_path / "stamp")
    mine = load_file(str(folder / "stamp.safetensors"))
    core_tensors = load_file(str(folder / "vlm.safetensors"))
    assert any(".default." in k for k in mine) and not any(".image." in k for k in mine)
    assert any(".image." in k for k in core_tensors) and not any(
        ".default." in k for k in core_tensors
    )
    again = StampVLM.from_pretrained(folder)
    np.testing.assert_allclose(again.segment([_prompt()])[0], both, rtol=1e-5, atol=1e-5)


def test_prefix_is_read_once_and_each_seg_gives_a_mask(stamp):
    prompt = _prompt()
    n_prompt = int(stamp.vlm.prepare(prompt)["input_ids"].shape[1])
    n_mask = stamp.mask_grid[0] * stamp.mask_grid[1]
    with torch.no_grad():
        stamp.seg_bias.fill_(1e4)  # the model now answers <seg> at every step
    try:
        stamp.tokens_processed = 0
        reply = stamp.reply(prompt, max_new_tokens=3)
    finally:
        with torch.no_grad():
            stamp.seg_bias.zero_()
    assert len(reply.masks) == 3 and reply.masks[0].shape == (64, 64)
    # prompt once, then per <seg>: the <seg> token and N mask tokens; nothing recomputed
    assert stamp.tokens_processed == n_prompt + 3 * (1 + n_mask)


def test_decoding_continues_unchanged_after_a_mask_pass(stamp):
    ids, attn, pixels, last, _ = stamp._batch([_prompt()])
    visual, feats = stamp.image_features(pixels)
    with torch.no_grad():
        _, cache_a = stamp.prefix(ids, attn, visual)
        _, cache_b = stamp.prefix(ids, attn, visual)
        stamp.step(torch.tensor([stamp.seg_id]), attn, cache_a)
        stamp.step(torch.tensor([stamp.seg_id]), attn, cache_b)
        kv = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        stamp.mask_pass(feats[last], kv, cache_a)
        assert cache_a.get_seq_length() == cache_b.get_seq_length() == kv.shape[1]
        a = stamp.step(torch.tensor([42]), kv, cache_a)
        b = stamp.step(torch.tensor([42]), kv, cache_b)
    assert torch.equal(a, b)


def test_text_only_prompts_never_segment(stamp):
    with torch.no_grad():
        stamp.seg_bias.fill_(1e4)
    try:
        reply = stamp.reply([{"role": "user", "content": "hi"}], max_new_tokens=2)
    finally:
        with torch.no_grad():
            stamp.seg_bias.zero_()
    assert reply.masks == []


def test_training_fits_a_mask_and_learns_when_to_segment():
    from conftest import sharpened_tiny_vlm

    # The plain random tiny LLM's last hidden state hardly depends on the prompt's words; the
    # sharpened one's does, so a <seg> row can tell a segmentation request from a question.
    model = StampVLM(sharpened_tiny_vlm(), CFG).train()
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in model.trainable_parameters()}
    assert not any(p.requires_grad for p in model.vlm.projector.parameters())
    gt = np.zeros((64, 64), bool)
    gt[:32, :32] = True  # the top-left quarter of the 64-pixel image
    seg, other = [_prompt()], [_prompt("Describe the image.")]
    with pytest.raises(
        ValueError, match=r"its mask is \(32, 64\) \(H, W\) but its image reads as 64x64"
    ):
        model.training_losses(seg, [gt[:32]], other)  # a mask of another size: refused
    opt = torch.optim.AdamW(params, lr=1e-2)
    first = None
    for _ in range(40):
        losses = model.training_losses(seg, [gt], other)
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        losses["loss"].backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    last = {k: float(v) for k, v in losses.items()}
    # lm cannot fall far: half of it is the near-uniform random LLM's own next-token entropy
    assert last["dice"] < first["dice"] / 2 and last["lm"] < first["lm"]
    pred = model.segment(seg)[0] > 0
    assert pred.shape == gt.shape and (pred == gt).mean() > 0.9
    assert len(model.reply(seg[0], max_new_tokens=2).masks) == 1  # it now chooses <seg> itself
    assert model.reply(other[0], max_new_tokens=1).masks == []  # and answers this one in text
    lora_b = [p for n, p in model.vlm.llm.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # peft starts B at zero: the adapters trained


def test_save_and_load_round_trip(stamp, tmp_path):
    folder = stamp.save_pretrained(tmp_path / "stamp")
    tensors = load_file(str(folder / "stamp.safetensors"))
    assert any("lora_A" in k for k in tensors) and "seg_out" in tensors
    assert not any(k.endswith("q_proj.base_layer.weight") for k in tensors)  # no frozen weights
    again = StampVLM.from_pretrained(folder)
    a = stamp.segment([_prompt()])[0]
    b = again.segment([_prompt()])[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_mask_features_are_scaled_to_the_embedding_norm(stamp):
    """mask_feature_norm "embedding": every mask feature's norm is the median norm of the LLM's
    input embedding rows, its direction the projector's; "none" (the default, and what a config
    saved before the field existed gets) leaves the projection as it is."""
    pixels = stamp.vlm.pixel_values([_image(0), _image(1)])
    _, projected = stamp.image_features(pixels)
    scaling = StampVLM(_vlm(), CFG.replace(mask_feature_norm="embedding"))
    scaling.load_state_dict(stamp.state_dict())  # the same projector, rescaled
    _, scaled = scaling.image_features(pixels)
    rows = stamp.vlm.llm.get_input_embeddings().weight.detach().float()
    want = float(rows.norm(dim=-1).median())  # computed here, not read from the model
    norms = scaled.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, want), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(projected.norm(dim=-1), norms, rtol=1e-2)
    torch.testing.assert_close(F.normalize(projected, dim=-1) * want, scaled)
    old = {k: v for k, v in CFG.to_dict().items() if k != "mask_feature_norm"}
    assert StampConfig.from_dict(old).mask_feature_norm == "none"
    with pytest.raises(ValueError, match="mask_feature_norm"):
        CFG.replace(mask_feature_norm="rms")
    with pytest.raises(ValueError, match="only the 'stamp' method"):
        CFG.replace(method="lisa", mask_feature_norm="embedding")


def test_local_mask_features_read_the_windowed_tower(stamp):
    """mask_features "local": the mask projector reads CLIP with k x k windowed attention
    (dense_features(window=k), called here), while the prompt's visual tokens stay the core's
    global ones; a config saved before the field existed reads "global"."""
    pixels = stamp.vlm.pixel_values([_image(0), _image(1)])
    visual, projected = stamp.image_features(pixels)
    local = StampVLM(_vlm(), CFG.replace(mask_features="local", mask_window=3))
    local.load_state_dict(stamp.state_dict())  # the same projector, other features
    visual_l, feats = local.image_features(pixels)
    torch.testing.assert_close(visual_l, visual)
    with torch.no_grad():
        windowed = dense_features(stamp.vlm.clip, pixels, window=3)
        want = stamp.mask_projector(windowed.tokens.float(), windowed.grid)
    assert stamp.vlm.patch_grid[0] > 3  # a 3 x 3 window is narrower than the grid
    torch.testing.assert_close(feats, want)
    assert not torch.allclose(feats, projected, atol=1e-3)
    old = {k: v for k, v in CFG.to_dict().items() if k not in ("mask_features", "mask_window")}
    assert StampConfig.from_dict(old).mask_features == "global"
    with pytest.raises(ValueError, match="mask_window"):
        CFG.replace(mask_features="local", mask_window=4)
    with pytest.raises(ValueError, match="mask_merge > 0"):
        CFG.replace(mask_features="local", mask_merge=0)
    with pytest.raises(ValueError, match="mask_features"):
        CFG.replace(mask_features="both")


# -- the scripts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stamp-data") / "sw"
    args = ["generate", "--out", str(root), "--train", "6", "--val", "2", "--test", "3"]
    shapeworld_main([*args, "--pretrain", "0", "--image-size", "64", "--workers", "1"])
    return root


def test_train_on_some_expression_types_only(shapeworld, tmp_path, capsys):
    import argparse

    from data.datasets import ReferringDataset
    from train.stamp import main as train_main
    from train.stamp import only_types

    data = ReferringDataset.from_shapeworld(shapeworld, "train")
    kinds = [data[i].expression_type for i in range(len(data))]
    parser = argparse.ArgumentParser()
    kept, desc = only_types(parser, data, "sw", ["attribute", "ordinal"])
    assert len(kept) == sum(k in ("attribute", "ordinal") for k in kinds) > 0
    assert {kept[i].expression_type for i in range(len(kept))} <= {"attribute", "ordinal"}
    assert desc == "sw, types ['attribute', 'ordinal']"
    with pytest.raises(SystemExit):
        only_types(parser, data, "sw", ["colour"])
    assert "types: ['attribute', 'ordinal', 'spatial']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a misspelt type is named, not silently dropped
        only_types(parser, data, "sw", ["atribute", "spatial"])
    assert "['atribute']" in capsys.readouterr().err
    argv = ["--preset", "tiny", "--data", str(shapeworld), "--steps", "1", "--batch-size", "2"]
    argv += ["--negatives", "0", "--no-progress", "--lora-rank", "4", "--out", str(tmp_path / "a")]
    assert train_main([*argv, "--expression-types", "attribute"]) == 0
    n_attr = kinds.count("attribute")
    capsys.readouterr()
    b = ["--out", str(tmp_path / "b"), "--mask-features", "local", "--mask-window", "3"]
    assert train_main([*argv[:-2], *b, "--expression-types", "attribute", "--limit", "2"]) == 0
    assert "2 referring expressions from " in capsys.readouterr().out and n_attr > 2
    saved = StampVLM.from_pretrained(tmp_path / "b" / "final").config
    assert (saved.mask_features, saved.mask_window) == ("local", 3)
    with pytest.raises(SystemExit):
        train_main([*argv, "--limit", "0"])
    assert "--limit must be >= 1, received 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main([*argv, "--limit", "1"])  # fewer than one batch of 2
    assert "1 expressions (after --limit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main([*argv, "--mask-window", "3"])  # with the default global features
    assert "--mask-window is read only with --mask-features local" in capsys.readouterr().err


def test_same_image_batches_pair_different_objects_of_one_scene(shapeworld, tmp_path, capsys):
    from itertools import islice

    from data.datasets import ReferringDataset
    from train.stamp import main as train_main
    from train.stamp import same_image_batches

    data = ReferringDataset.from_shapeworld(shapeworld, "train")
    run = list(islice(same_image_batches(data, 4, 2, seed=0), 6))
    for batch in run:
        assert len(batch) == 4
        for a, b in (batch[:2], batch[2:]):  # one scene, two different objects
            assert data.items[a][0] == data.items[b][0]
            assert data.items[a][2].id != data.items[b][2].id
            assert not np.array_equal(data[int(a)].mask, data[int(b)].mask)
        assert data.items[batch[0]][0] != data.items[batch[2]][0]
    resumed = list(islice(same_image_batches(data, 4, 2, seed=0, start_step=4), 2))
    for x, y in zip(run[4:], resumed, strict=True):  # a resumed run draws the same batches
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="different objects; a batch of 50 needs 1"):
        next(same_image_batches(data, 50, 50, seed=0))
    argv = ["--preset", "tiny", "--data", str(shapeworld), "--steps", "1", "--batch-size", "4"]
    argv += ["--negatives", "0", "--no-progress", "--lora-rank", "4", "--out", str(tmp_path)]
    assert train_main([*argv, "--same-image", "2"]) == 0
    assert ", 2 objects per image per batch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_main([*argv, "--same-image", "3"])
    assert "must be >= 1 and divide --batch-size 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main([*argv, "--same-image", "4", "--limit", "8"])
    assert "a batch of 4 needs 1" in capsys.readouterr().err


def test_train_resumes_exactly_and_continues_from_a_trained_folder(shapeworld, tmp_path):
    from train.stamp import main as train_main

    common = ["--preset", "tiny", "--data", str(shapeworld), "--steps", "3", "--batch-size", "2"]
    common += ["--negatives", "1", "--save-every", "1", "--lr", "1e-2", "--no-progress"]
    common += ["--mask-merge", "2", "--lora-rank", "4"]
    assert train_main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert train_main([*common, "--out", str(tmp_path / "cut"), "--stop-at", "2"]) == 0
    assert train_main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a = load_file(str(tmp_path / "straight" / "final" / "stamp.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "stamp.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for method in ("text4seg", "lisa"):  # the baselines train through the same script
        out = tmp_path / method
        assert train_main([*common, "--out", str(out), "--steps", "1", "--method", method]) == 0
        assert StampVLM.from_pretrained(out / "final").config.method == method
    with pytest.raises(SystemExit):
        train_main([*common, "--out", str(tmp_path / "x"), "--negatives", "-1"])
    with pytest.raises(SystemExit):
        train_main(["--preset", "tiny", "--refs", "r.json", "--out", str(tmp_path / "y")])
    # --init-from continues a trained folder; --lm-weight 0 leaves the <seg> output row alone
    cont = [*common, "--init-from", str(tmp_path / "straight" / "final"), "--steps", "1"]
    assert train_main([*cont, "--out", str(tmp_path / "more"), "--lm-weight", "0"]) == 0
    c = load_file(str(tmp_path / "more" / "final" / "stamp.safetensors"))
    assert c.keys() == a.keys()
    for k in ("seg_out", "seg_bias"):
        assert torch.equal(c[k], a[k]), k
    heads = [k for k in a if k.startswith(("head.", "mask_projector."))]
    moved = [k for k in heads if not torch.equal(a[k], c[k])]
    assert moved, "the mask head and projector did not train"
    # the folder's config is kept without repeating its options (LoRA rank 4, not the default)
    bare = ["--preset", "tiny", "--data", str(shapeworld), "--steps", "1", "--batch-size", "2"]
    bare += ["--negatives", "0", "--no-progress", "--out", str(tmp_path / "kept")]
    assert train_main([*bare, "--init-from", str(tmp_path / "straight" / "final")]) == 0
    assert StampVLM.from_pretrained(tmp_path / "kept" / "final").config.lora_rank == 4
    for bad in (["--lora-rank", "8"], ["--method", "lisa"], ["--vlm", str(tmp_path)]):
        with pytest.raises(SystemExit):
            train_main([*cont, *bad, "--out", str(tmp_path / "bad")])


def test_init_from_with_vlm_moves_stamp_onto_another_core(shapeworld, tmp_path):
    """--init-from X --vlm CORE: STAMP's own tensors as trained in X (a learning rate of ~0
    leaves them), the core's tensors CORE's; the result attaches to CORE, not to X's core."""
    from core.checkpoint import CheckpointError
    from train.stamp import main as train_main

    common = ["--preset", "tiny", "--data", str(shapeworld), "--batch-size", "2"]
    common += ["--negatives", "0", "--no-progress", "--mask-merge", "2", "--lora-rank", "4"]
    assert train_main([*common, "--steps", "2", "--lr", "1e-2", "--out", str(tmp_path / "a")]) == 0
    core_dir = _lora_core(seed=3).save_pretrained(tmp_path / "core")
    moved = tmp_path / "moved"
    args = ["--init-from", str(tmp_path / "a" / "final"), "--vlm", str(core_dir)]
    assert train_main([*common, *args, "--steps", "1", "--lr", "1e-12", "--out", str(moved)]) == 0
    before = load_file(str(tmp_path / "a" / "final" / "stamp.safetensors"))
    after = load_file(str(moved / "final" / "stamp.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)
    core_tensors = load_file(str(core_dir / "vlm.safetensors"))
    saved_core = load_file(str(moved / "final" / "vlm.safetensors"))
    for k, v in core_tensors.items():
        if k.startswith(("projector.", "llm.")):
            assert torch.equal(saved_core[k], v), k
    # STAMP's <seg>/<mask> input rows travel with it (matched by name: two cores may order
    # them differently)
    old_core = load_file(str(tmp_path / "a" / "final" / "vlm.safetensors"))["added_embeddings"]
    tokens = {
        name: json.loads((tmp_path / name / "final" / "manifest.json").read_text())["config"][
            "vlm"
        ]["added_tokens"]
        for name in ("a", "moved")
    }
    for token in ("<seg>", "<mask>"):
        row_a = old_core[tokens["a"].index(token)]
        row_b = saved_core["added_embeddings"][tokens["moved"].index(token)]
        torch.testing.assert_close(row_b, row_a, rtol=0, atol=1e-6)
    core = PolychromeVLM.from_pretrained(core_dir)
    attached = StampVLM.from_pretrained(moved / "final", vlm=core).eval()
    assert attached.segment([_prompt()])[0].shape == (64, 64)
    with pytest.raises(CheckpointError, match="another VLM core"):
        StampVLM.from_pretrained(moved / "final", vlm=_vlm())
    # and STAMP's parts still train there (the move freezes the core, not STAMP)
    trained = tmp_path / "trained"
    assert train_main([*common, *args, "--steps", "1", "--lr", "1e-2", "--out", str(trained)]) == 0
    moved_on = load_file(str(trained / "final" / "stamp.safetensors"))
    assert any(k.startswith("head.") and not torch.equal(moved_on[k], after[k]) for k in after)
    for bad in (args, []):  # a --vlm that is no core: a parser error, with or without --init-from
        with pytest.raises(SystemExit):
            train_main([*common, *bad[:2], "--vlm", str(tmp_path), "--out", str(tmp_path / "x")])


# -- the baselines on the same model ---------------------------------------------------------


def test_text4seg_greedy_labels_match_teacher_forcing_and_cost_one_step_per_cell():
    model = StampVLM(_vlm(), StampConfig(method="text4seg", mask_merge=2, lora_rank=4)).eval()
    with torch.no_grad():
        for name, p in model.vlm.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, attn, pixels, _, _ = model._batch([_prompt()])
    visual, _ = model.image_features(pixels)
    n = model.mask_grid[0] * model.mask_grid[1]
    with torch.no_grad():
        _, cache = model.prefix(ids, attn, visual)
        _, kv = model._seg_step(attn, cache)
        length = cache.get_seq_length()
        model.tokens_processed = 0
        greedy = model._label_pass(kv, cache)  # (1, N, 2), one token at a time
        assert model.tokens_processed == n and cache.get_seq_length() == length
        forced = model._label_pass(kv, cache, greedy.argmax(-1))  # one teacher-forced pass
    torch.testing.assert_close(greedy, forced, rtol=1e-4, atol=1e-4)
    assert model.head is None and model.mask_projector is None


def test_lisa_prompts_sam_with_the_seg_state_and_trains_its_decoder():
    torch.manual_seed(0)
    model = StampVLM(_vlm(), StampConfig(method="lisa", lora_rank=4)).train()
    assert model.sam is not None
    decoder = {k: v.clone() for k, v in model.sam.mask_decoder.state_dict().items()}
    encoder = {k: v.clone() for k, v in model.sam.image_encoder.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in model.trainable_parameters()}
    gt = np.zeros((48, 64), bool)
    gt[10:30, 5:25] = True
    seg = [
        [{"role": "user", "content": "Segment it.", "images": [_image(0, 64).crop((0, 0, 64, 48))]}]
    ]
    opt = torch.optim.AdamW(params, lr=1e-3)
    first = None
    for _ in range(15):
        losses = model.training_losses(seg, [gt])
        first = first or float(losses["dice"])
        losses["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert float(losses["dice"]) < first
    changed = model.sam.mask_decoder.state_dict()
    assert any(not torch.equal(decoder[k], changed[k]) for k in decoder)
    assert all(torch.equal(encoder[k], v) for k, v in model.sam.image_encoder.state_dict().items())
    out = model.eval().segment(seg)[0]
    assert out.shape == (48, 64)  # SAM's postprocessing back to the image's own size


def test_evaluate_scores_an_oracle_and_an_empty_segmenter(shapeworld):
    from data.datasets import ReferringDataset
    from eval.stamp import evaluate, markdown

    data = ReferringDataset.from_shapeworld(shapeworld, "test")
    by_text = {}
    for i in range(len(data)):
        item = data[i]
        by_text[f"Segment {item.expression}."] = item.mask

    def oracle(prompts):
        return [np.where(by_text[p[-1]["content"]], 1.0, -1.0) for p in prompts]

    def empty(prompts):
        return [np.full(by_text[p[-1]["content"]].shape, -1.0) for p in prompts]

    result = evaluate(
        data,
        {"oracle": oracle, "empty": empty},
        batch_size=2,
        timing_samples=2,
        repeats=1,
        progress=False,
    )
    assert result["samples"] == len(data)
    assert result["methods"]["oracle"]["cIoU"] == 1.0 and result["methods"]["oracle"]["gIoU"] == 1.0
    assert result["methods"]["empty"]["cIoU"] == 0.0
    kinds = {data[i].expression_type for i in range(len(data))}
    assert set(result["methods"]["oracle"]["by_type"]) == kinds
    assert sum(v["n"] for v in result["methods"]["empty"]["by_type"].values()) == len(data)
    assert result["methods"]["empty"]["seconds_per_sample"] >= 0
    assert "| oracle | 100.0 | 100.0 |" in markdown(result)
    from eval.stamp import text_dependence

    def blob(prompts):  # the same mask whatever the words
        return [np.where(np.arange(64 * 64).reshape(64, 64) < 300, 1.0, -1.0) for _ in prompts]

    oracle_dep = text_dependence(data, oracle, images=3)
    assert oracle_dep["pairs"] > 0 and oracle_dep["mean_iou"] == 0.0  # visible masks are disjoint
    assert oracle_dep["logit_change"] > 0
    blob_dep = text_dependence(data, blob, images=3)
    assert blob_dep["mean_iou"] == 1.0 and blob_dep["logit_change"] == 0.0

    def loud(prompts):  # the oracle's logits x 10: the same masks, the same relative change
        return [10 * x for x in oracle(prompts)]

    assert text_dependence(data, loud, images=3)["logit_change"] == pytest.approx(
        oracle_dep["logit_change"]
    )


def test_evaluate_against_a_naive_count_with_thresholds_and_interleaved_images(shapeworld):
    """cIoU / gIoU overall and by type against numpy counts made here, on a segmenter that is
    right on some samples and off by a band of rows on others; each method's own threshold is
    applied; text_dependence reads every expression of its images wherever they stand."""
    from data.datasets import ReferringDataset
    from eval.stamp import evaluate, text_dependence

    data = ReferringDataset.from_shapeworld(shapeworld, "test")
    items = [data[i] for i in range(len(data))]
    truth = {f"Segment {it.expression}.": it.mask for it in items}
    index = {f"Segment {it.expression}.": i for i, it in enumerate(items)}

    def predicted(i):  # every third sample exact, the others moved down by 5 rows
        return items[i].mask if i % 3 == 0 else np.roll(items[i].mask, 5, axis=0)

    def mixed(prompts):  # logits 0.3 on the predicted mask: above 0, below 0.5
        return [np.where(predicted(index[p[-1]["content"]]), 0.3, -1.0) for p in prompts]

    result = evaluate(
        data, {"a": mixed, "b": mixed}, timing_samples=0, progress=False, thresholds={"b": 0.5}
    )
    inter = np.array([(predicted(i) & it.mask).sum() for i, it in enumerate(items)])
    union = np.array([(predicted(i) | it.mask).sum() for i, it in enumerate(items)])
    kinds = np.array([it.expression_type for it in items])
    a = result["methods"]["a"]
    assert a["cIoU"] == pytest.approx(inter.sum() / union.sum())
    assert a["gIoU"] == pytest.approx(np.mean(inter / union))
    assert 0.05 < a["cIoU"] < 0.95  # a mix, not an all-or-nothing case
    for kind, row in a["by_type"].items():
        sel = kinds == kind
        assert row["n"] == int(sel.sum())
        assert row["cIoU"] == pytest.approx(inter[sel].sum() / union[sel].sum())
        assert row["gIoU"] == pytest.approx(np.mean(inter[sel] / union[sel]))
    assert result["methods"]["b"]["cIoU"] == 0.0  # its threshold 0.5: nothing is foreground
    assert set(truth) == set(index)

    # the first two images' expressions interleaved, a third image's first one among them
    # (a, b, c, a, b, ...): the same pairs are found as in the grouped order
    grouped = text_dependence(data, mixed, images=2)
    paths = list(dict.fromkeys(it.image_path for it in items))[:3]
    per_image = [[k for k, it in enumerate(items) if it.image_path == path] for path in paths]
    woven = [k for pair in zip(*per_image[:2], strict=False) for k in pair]
    woven += [k for k in per_image[0] + per_image[1] if k not in woven]
    woven.insert(2, per_image[2][0])
    rest = [k for k in range(len(items)) if k not in woven]
    shuffled = ReferringDataset(data.images_root, [data.items[k] for k in woven + rest])
    assert text_dependence(shuffled, mixed, images=2)["pairs"] == grouped["pairs"] > 0
    assert text_dependence(data, mixed, images=2, threshold=0.5)["pairs"] == 0  # all empty


def test_grid_oracle_segments_the_object_each_prompt_names(shapeworld):
    """The oracle row reads the mask of the prompt's own object: on every image, its mask
    overlaps the named object more than any other object that image's expressions name."""
    from data.datasets import ReferringDataset
    from eval.metrics import mask_iou
    from eval.stamp import grid_oracle

    data = ReferringDataset.from_shapeworld(shapeworld, "test")
    model = StampVLM(_vlm(), CFG.replace(mask_merge=1)).eval()  # a finer grid: 8x8 on 64 pixels
    segment = grid_oracle(model, data)
    items = [data[i] for i in range(min(len(data), 16))]
    ids = [data.items[i][2].id for i in range(len(items))]
    preds = segment(
        [
            [{"role": "user", "content": f"Segment {it.expression}.", "images": [it.image_path]}]
            for it in items
        ]
    )
    compared = 0
    for a, (it, pred) in enumerate(zip(items, preds, strict=True)):
        own = mask_iou(pred > 0, it.mask)
        assert own > 0.5
        for b, other in enumerate(items):
            if other.image_path == it.image_path and ids[b] != ids[a]:
                assert own > mask_iou(pred > 0, other.mask)
                compared += 1
    assert compared > 0
    # an expression that names two different objects of one image is refused, not guessed
    first = data.items[0]
    twin = next(x for x in data.items if x[0] == first[0] and x[2].id != first[2].id)
    clash = ReferringDataset(data.images_root, [first, (twin[0], first[1], *twin[2:])])
    with pytest.raises(ValueError, match="names two different objects"):
        grid_oracle(model, clash)


def test_eval_script_scores_the_trained_methods_side_by_side(shapeworld, tmp_path):
    import json

    from core.checkpoint import save_checkpoint
    from eval.stamp import main as eval_main
    from train.stamp import main as train_main
    from vision.sam import SAM_VARIANTS, build_sam

    common = ["--preset", "tiny", "--data", str(shapeworld), "--steps", "1", "--batch-size", "2"]
    common += ["--no-progress", "--lora-rank", "4"]
    for method in ("stamp", "text4seg"):
        assert train_main([*common, "--out", str(tmp_path / method), "--method", method]) == 0
    sam = tmp_path / "sam"
    save_checkpoint(
        sam, {"model": build_sam(SAM_VARIANTS["tiny"]).state_dict()}, SAM_VARIANTS["tiny"].to_dict()
    )
    out = tmp_path / "eval.json"
    args = ["--data", str(shapeworld), "--split", "test", "--limit", "3", "--no-progress"]
    args += ["--checkpoint", f"stamp={tmp_path / 'stamp' / 'final'}"]
    args += ["--checkpoint", f"text4seg={tmp_path / 'text4seg' / 'final'}"]
    args += ["--sam-refine", "stamp", "--sam", str(sam), "--timing-samples", "1", "--repeats", "1"]
    assert eval_main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"stamp", "text4seg", "stamp + SAM"}
    for row in result["methods"].values():
        assert 0.0 <= row["cIoU"] <= 1.0 and row["seconds_per_sample"] > 0
    assert result["false_seg_questions"] > 0
    assert 0.0 <= result["methods"]["stamp"]["false_seg_rate"] <= 1.0
    # the grid oracle: a reference row, untimed, left out of the text dependence, far above a
    # one-step model on the same samples
    args = [*args[: args.index("--sam-refine")], "--timing-samples", "1", "--repeats", "1"]
    args += ["--false-seg-questions", "0", "--text-dependence", "2"]
    assert eval_main([*args, "--grid-oracle", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["methods"]
    (oracle,) = [name for name in rows if name.startswith("grid oracle")]
    assert "seconds_per_sample" not in rows[oracle] and rows["stamp"]["seconds_per_sample"] > 0
    assert "text_dependence" not in rows[oracle] and "text_dependence" in rows["stamp"]
    assert rows[oracle]["cIoU"] > rows["stamp"]["cIoU"] + 0.2  # tiny: a 4x4 grid on 64 pixels
    with pytest.raises(SystemExit):
        eval_main([*args, "--sam-refine", "nope"])


def test_stamp_on_a_core_that_reads_local_features_too():
    """A core whose projector reads global and local CLIP features (ProjectorConfig.features
    "both"): the prompt's visual tokens are the core's own, the mask projector reads CLIP's
    global patch tokens at their own width."""
    cfg = PolychromeConfig.from_preset("tiny")
    projector = ProjectorConfig(merge=cfg.vlm.projector.merge, features="both", window=3)
    torch.manual_seed(0)
    core = PolychromeVLM.build(VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=projector))
    model = StampVLM(core, CFG).eval()
    pixels = core.pixel_values([_image(1)])
    with torch.no_grad():
        visual, feats = model.image_features(pixels)
        dense = dense_features(core.clip, pixels)
        torch.testing.assert_close(visual, core.encode_images(pixels), rtol=0, atol=0)
        assert model.mask_projector is not None
        expected = model.mask_projector(dense.tokens.float(), dense.grid)
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    assert feats.shape[1] == model.mask_grid[0] * model.mask_grid[1]
    masks = model.segment([_prompt()])
    assert masks[0].shape == (64, 64)


def test_the_mask_pass_runs_on_an_llm_that_takes_past_key_values():
    """transformers before 5.24 (a GPU machine's 5.17) named the KV cache ``past_key_values`` and
    took ``cache=`` into its **kwargs unused: STAMP's passes ran without their prefix. The same
    LLM behind the old name must give the same masks."""
    stamp = _stamp()
    base = stamp.vlm.llm.base_model
    new_api = type(base)

    class OldAPI(new_api):  # type: ignore[misc, valid-type]
        def forward(self, *args, past_key_values=None, **kwargs):  # type: ignore[no-untyped-def]
            kwargs.pop("cache", None)  # what the old forward did with a name it did not know
            return super().forward(*args, cache=past_key_values, **kwargs)

    with torch.inference_mode():
        expected = stamp.segment([_prompt()])[0]
        base.__class__ = OldAPI
        try:
            old = stamp.segment([_prompt()])[0]
        finally:
            base.__class__ = new_api
    np.testing.assert_array_equal(old, expected)
