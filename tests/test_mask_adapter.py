"""Mask-Adapter, mask pooling, the IoU matcher and open-vocabulary inference, on the tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmentation.mask_adapter import (
    MaskAdapter,
    MaskAdapterConfig,
    clip_pool,
    consistency_loss,
    load_adapter,
    mask_iou_matrix,
    mask_pool,
    match_proposals,
    save_adapter,
)
from segmentation.open_vocab import (
    OpenVocabSegmenter,
    instance_inference,
    load_mask_lists,
    parse_vocabulary,
    save_mask_lists,
    semantic_inference,
    whole_image_pixels,
)
from vision.clip import build_clip, dense_features


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model, _, tokenizer = build_clip("tiny-vit")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def dense(tiny_clip):
    model, _ = tiny_clip
    torch.manual_seed(1)
    with torch.no_grad():
        return dense_features(model, torch.randn(2, 3, 64, 64))


def _square_masks(b: int, m: int, side: int = 64) -> torch.Tensor:
    masks = torch.zeros(b, m, side, side)
    for i in range(m):
        masks[:, i, 8 * i : 8 * i + 16, 4 : 4 + 8 * (i + 1)] = 1
    return masks


def test_mask_pool_is_the_naive_masked_mean_of_projected_tokens(tiny_clip, dense):
    model, _ = tiny_clip
    masks = _square_masks(2, 3)
    out = mask_pool(dense, masks, clip_pool(model))
    # naive reference: for each mask, the fraction of each 8x8 cell it covers weights the
    # projected tokens of that cell (the tiny ViT pools by averaging projected tokens)
    proj = dense.projected  # (B, D, 8, 8)
    for b in range(2):
        for m in range(3):
            cover = masks[b, m].reshape(8, 8, 8, 8).mean(dim=(1, 3))  # (8, 8) cell coverage
            ref = (proj[b] * cover).sum(dim=(1, 2)) / cover.sum()
            torch.testing.assert_close(out[b, m], F.normalize(ref, dim=0), rtol=1e-5, atol=1e-6)


def test_mask_pool_of_the_whole_image_is_the_image_embedding(tiny_clip):
    model, _ = tiny_clip
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        d = dense_features(model, x)
        whole = mask_pool(d, torch.ones(1, 1, 64, 64), clip_pool(model))[0, 0]
        image = F.normalize(model.encode_image(x)[0], dim=0)
    torch.testing.assert_close(whole, image, rtol=1e-5, atol=1e-6)


def test_adapter_shapes_and_the_pooling_it_implements(tiny_clip, dense):
    model, _ = tiny_clip
    torch.manual_seed(2)
    cfg = MaskAdapterConfig(clip_dim=32, vis_dim=32, hidden=16, num_maps=4)
    adapter = MaskAdapter(cfg).eval()
    masks = _square_masks(2, 3)
    with torch.no_grad():
        act = adapter.activation_maps(dense, masks)
        emb = adapter(dense, masks, clip_pool(model))
    assert act.shape == (2, 3, 4, 8, 8) and emb.shape == (2, 3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 3))
    # reference: sigmoid-normalised weights per map, pooled, averaged over the K maps
    w = torch.sigmoid(act).flatten(3)
    w = w / w.sum(-1, keepdim=True)
    proj = dense.projected.flatten(2)  # (B, D, 64)
    ref = torch.einsum("bmkp,bdp->bmkd", w, proj).mean(2)
    torch.testing.assert_close(emb, F.normalize(ref, dim=-1), rtol=1e-5, atol=1e-6)
    # the mask changes the embedding (the mask encoder feeds the body)
    with torch.no_grad():
        other = adapter(dense, masks.flip(-1), clip_pool(model))
    assert not torch.allclose(emb, other)


def test_classify_appends_void_and_clamps_the_scale():
    cfg = MaskAdapterConfig(clip_dim=4, vis_dim=4, hidden=8, num_maps=2, init_logit_scale=10.0)
    adapter = MaskAdapter(cfg)
    emb = F.normalize(torch.tensor([[1.0, 0, 0, 0]]), dim=-1)
    text = torch.eye(4)[:3] * 3  # unnormalised on purpose
    logits = adapter.classify(emb, text)
    assert logits.shape == (1, 4)
    # exp(10) > 100: the scale is clamped at 100; cosines 1, 0, 0 with the three classes
    torch.testing.assert_close(logits[0, :3], torch.tensor([100.0, 0.0, 0.0]))
    void = F.normalize(adapter.void_embedding.detach(), dim=0)
    torch.testing.assert_close(logits[0, 3], 100 * void[0])


def test_consistency_loss_hand_computed_and_stops_gradient():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = consistency_loss(a, b)  # cos = 1 and 0 -> mean(0, 1) = 0.5
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert b.grad is None and a.grad is not None


def test_iou_matrix_and_matcher():
    gt = np.zeros((2, 10, 10), dtype=bool)
    gt[0, :5, :5] = True
    gt[1, 5:, 5:] = True
    props = np.zeros((5, 10, 10), dtype=bool)
    props[0, :5, :5] = True  # = gt 0
    props[1, :5, :4] = True  # IoU 0.8 with gt 0
    props[2, :5, :2] = True  # IoU 0.4 with gt 0
    props[3, 5:, 5:] = True  # = gt 1
    # props[4] empty
    iou = mask_iou_matrix(props, gt)
    np.testing.assert_allclose(iou[:, 0], [1.0, 0.8, 0.4, 0.0, 0.0])
    np.testing.assert_allclose(iou[:, 1], [0.0, 0.0, 0.0, 1.0, 0.0])
    # one proposal per ground truth (0 or 1 for gt 0: both above 0.7; 3 for gt 1), drawn at random
    drawn = {match_proposals(props, gt, np.random.default_rng(s))[0] for s in range(40)}
    assert drawn == {(0, 0), (1, 0)}
    for seed in range(10):
        pairs = match_proposals(props, gt, np.random.default_rng(seed))
        assert len(pairs) == 2 and pairs[0][0] in (0, 1) and pairs[1] == (3, 1)
    capped = match_proposals(props, gt, np.random.default_rng(0), max_matches=1)
    assert len(capped) == 1
    assert match_proposals(props[:0], gt, np.random.default_rng(0)) == []


def test_matcher_takes_one_proposal_per_object_and_at_most_eight_per_image():
    """Mask-Adapter's match_via_iou: SAM's near-duplicates of one object give one pair, and an
    image of 12 matched objects gives 8 pairs of 8 distinct objects."""
    gt = np.zeros((12, 12, 48), dtype=bool)
    for g in range(12):
        gt[g, :, 4 * g : 4 * g + 4] = True
    # three near-duplicates of each object: itself, one row short, one row shorter still
    props = np.concatenate([gt, gt.copy(), gt.copy()])
    props[12:24, 0] = False
    props[24:, :2] = False
    for seed in range(5):
        pairs = match_proposals(props, gt, np.random.default_rng(seed))
        objects = [g for _, g in pairs]
        assert len(pairs) == 8 and len(set(objects)) == 8 and objects == sorted(objects)
        assert all(p % 12 == g for p, g in pairs)  # each proposal is a copy of its object
    assert len(match_proposals(props[:36:12], gt[:1], np.random.default_rng(0))) == 1


def test_semantic_and_instance_inference_hand_computed():
    masks = np.zeros((2, 2, 3), dtype=np.float32)
    masks[0, :, :2] = 1  # left two columns
    masks[1, :, 2] = 1  # right column
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # classes a, b, void
    sem = semantic_inference(masks, probs)
    # mask 0 -> class a (index 0 -> map value 1); mask 1: non-void mass 0.2 < background 0.8
    np.testing.assert_array_equal(sem, [[1, 1, 0], [1, 1, 0]])
    inst = instance_inference(masks, probs)
    assert [(s.label, round(s.score, 2)) for s in inst] == [(0, 0.7)]  # void mask dropped
    assert semantic_inference(np.zeros((0, 2, 3)), np.zeros((0, 3))).sum() == 0


def test_vocabulary_parsing_errors():
    assert parse_vocabulary(" circle, star ,purple hexagon,") == [
        "circle",
        "star",
        "purple hexagon",
    ]
    with pytest.raises(ValueError, match="empty"):
        parse_vocabulary(" , ")
    with pytest.raises(ValueError, match="repeats"):
        parse_vocabulary("star,star")
    with pytest.raises(ValueError, match="repeats an entry: 'Circle'"):  # case-blind
        parse_vocabulary("circle, star, Circle")
    # the messages stay short whatever the input's length (they reach the page)
    with pytest.raises(ValueError, match="repeats an entry: 'thing 5'") as err:
        parse_vocabulary(",".join(f"thing {i}" for i in range(10_000)) + ",thing 5")
    assert len(str(err.value)) < 200
    with pytest.raises(ValueError, match=r"\(1000000 characters\)") as err:
        parse_vocabulary("," * 1_000_000)
    assert len(str(err.value)) < 250


def test_mask_lists_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    lists = [rng.random((3, 7, 5)) > 0.5, np.zeros((0, 7, 5), dtype=bool)]
    save_mask_lists(tmp_path / "p.npz", lists)
    back = load_mask_lists(tmp_path / "p.npz")
    assert len(back) == 2 and back[1].shape == (0, 7, 5)
    np.testing.assert_array_equal(back[0], lists[0])


def test_adapter_checkpoint_round_trip(tmp_path, dense, tiny_clip):
    model, _ = tiny_clip
    torch.manual_seed(3)
    adapter = MaskAdapter(MaskAdapterConfig(clip_dim=32, vis_dim=32, hidden=16, num_maps=4)).eval()
    save_adapter(tmp_path / "a", adapter)
    loaded = load_adapter(tmp_path / "a")
    masks = _square_masks(2, 2)
    with torch.no_grad():
        a = adapter(dense, masks, clip_pool(model))
        b = loaded(dense, masks, clip_pool(model))
    assert loaded.cfg == adapter.cfg
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)  # fp16 on disk


def test_segmenter_on_given_masks_with_any_vocabulary(tiny_clip):
    model, tokenizer = tiny_clip
    seg = OpenVocabSegmenter(model, tokenizer)
    image = np.zeros((50, 70, 3), dtype=np.uint8)  # not the tower's size: resized whole
    image[10:30, 10:30] = (220, 30, 30)
    masks = np.zeros((1, 50, 70), dtype=bool)
    masks[0, 10:30, 10:30] = True
    result = seg.segment(image, ["circle", "crimson star"], masks=masks)
    assert result.semantic.shape == (50, 70)
    assert set(np.unique(result.semantic[~masks[0]])) == {0}  # uncovered pixels: background
    assert whole_image_pixels(model, [image]).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="no SAM"):
        seg.segment(image, ["circle"])
    with pytest.raises(ValueError, match="uint8"):
        seg.segment(image.astype(np.float32), ["circle"], masks=masks)


def test_crop_classifier_reads_each_mask_as_its_own_image(tiny_clip):
    """The two-stage reference: a mask's probabilities equal CLIP's zero-shot probabilities of
    its masked crop embedded alone; an empty mask is void."""
    from vision.clip import background_fill, encode_images, object_crop

    model, tokenizer = tiny_clip
    torch.manual_seed(0)
    _, preprocess, _ = build_clip("tiny-vit")
    seg = OpenVocabSegmenter(model, tokenizer, preprocess=preprocess, crops=True)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, 5:20, 5:30] = True
    probs = seg.classify_masks(image, masks, ["circle", "star"])
    crop = object_crop(image, masks[0], 64, background_fill(image, masks[0]))
    emb = encode_images(model, preprocess, [crop])[0]
    scale = float(model.logit_scale.exp())
    logits = torch.cat([scale * emb @ seg.text_heads(["circle", "star"]).T, torch.zeros(1)])
    np.testing.assert_allclose(probs[0], logits.softmax(0).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(probs[1], [0, 0, 1])
    with pytest.raises(ValueError, match="preprocess"):
        OpenVocabSegmenter(model, tokenizer, crops=True)
