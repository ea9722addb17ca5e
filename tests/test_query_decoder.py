"""The query mask decoder (masked attention, PMP, matching, losses, proposals) and its script."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import save_checkpoint
from data.shapeworld import main as shapeworld_main
from segmentation.query_decoder import (
    LossWeights,
    QueryDecoder,
    QueryDecoderConfig,
    QueryDecoderOutput,
    QueryMaskProposer,
    attention_mask,
    dice_loss,
    encode_prompts,
    hungarian_match,
    load_decoder,
    match_costs,
    pack_prompts,
    save_decoder,
    set_criterion,
)
from train.seg_decoder import main as train_main
from train.seg_decoder import proposal_recall, sample_prompt
from vision.clip import build_clip, get_clip_config, trained_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"vis_dim": 32, "grid": 8, "hidden": 32, "mask_dim": 16, "queries": 6, "layers": 3}
TINY_FFN = 64


def _decoder(pmp: bool, seed: int = 0, **kw) -> QueryDecoder:
    torch.manual_seed(seed)
    cfg = QueryDecoderConfig(**{**TINY, "ffn": TINY_FFN, "pmp": pmp, **kw})
    return QueryDecoder(cfg).eval()


def _inputs(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 64, 32, generator=g), torch.randn(b, 3, 64, 64, generator=g)


def _prompt(seed: int, b: int = 2, t: int = 5) -> object:
    g = torch.Generator().manual_seed(seed)
    return pack_prompts([[torch.randn(t, 384, generator=g)] for _ in range(b)])


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model, _, tokenizer = build_clip("tiny-vit")
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------
# Masked attention
# --------------------------------------------------------------------------------------------


def test_attention_mask_blocks_outside_the_previous_mask_and_falls_back_when_empty():
    logits = -torch.ones(1, 3, 8, 8)
    logits[0, 0, :4, :4] = 5.0  # query 0: top-left quadrant
    logits[0, 2] = 5.0  # query 2: everywhere; query 1: nowhere (empty)
    blocked = attention_mask(logits, (8, 8), heads=2)
    assert blocked.shape == (2, 3, 64) and blocked.dtype == torch.bool
    quadrant = torch.zeros(8, 8, dtype=torch.bool)
    quadrant[:4, :4] = True
    for h in range(2):  # the same mask for every head
        assert torch.equal(blocked[h, 0], ~quadrant.flatten())
        assert not blocked[h, 1].any()  # empty mask -> attend everywhere (fallback)
        assert not blocked[h, 2].any()
    # resized to a coarser level: the quadrant becomes the 2x2 top-left cells of 4x4
    coarse = attention_mask(logits, (4, 4), heads=1)[0, 0].reshape(4, 4)
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[:2, :2] = False
    assert torch.equal(coarse, expected)


def test_each_layer_attends_under_the_previous_layers_prediction_round_robin():
    decoder = _decoder(pmp=False, attn_factors=(1, 2))
    seen: list[torch.Tensor] = []
    for layer in decoder.layers:
        layer.register_forward_pre_hook(lambda _, args: seen.append(args[4].clone()))
    tokens, pixels = _inputs()
    with torch.no_grad():
        out = decoder(tokens, pixels)
    assert out.mask_logits.shape == (4, 2, 6, 32, 32)  # L + 1 predictions, masks at 4x grid
    assert out.objectness.shape == (4, 2, 6, 2)
    sizes = [(8, 8), (16, 16), (8, 8)]  # levels 16x16 / 32x32 at full scale, low res first
    for i, blocked in enumerate(seen):
        expected = attention_mask(out.mask_logits[i], sizes[i], decoder.cfg.heads)
        assert torch.equal(blocked, expected)
    assert any(b.any() for b in seen)  # something was actually masked


# --------------------------------------------------------------------------------------------
# PMP
# --------------------------------------------------------------------------------------------


def test_pmp_off_ignores_the_prompt_and_has_the_same_weights_but_the_text_branch():
    off, on = _decoder(pmp=False), _decoder(pmp=True)
    tokens, pixels = _inputs()
    with torch.no_grad():
        a = off(tokens, pixels, _prompt(1))
        b = off(tokens, pixels, _prompt(2))
        c = off(tokens, pixels, None)
    for x in (b, c):
        torch.testing.assert_close(a.mask_logits, x.mask_logits, rtol=0, atol=0)
        torch.testing.assert_close(a.objectness, x.objectness, rtol=0, atol=0)
    text_keys = {k for k in on.state_dict() if k.startswith("text_proj.") or ".text_" in k}
    assert text_keys and set(off.state_dict()) == set(on.state_dict()) - text_keys


def test_pmp_on_proposals_change_with_the_prompt():
    on = _decoder(pmp=True)
    tokens, pixels = _inputs()
    with torch.no_grad():
        a = on(tokens, pixels, _prompt(1))
        b = on(tokens, pixels, _prompt(2))
        a2 = on(tokens, pixels, _prompt(1))
    assert (a.mask_logits[1:] - b.mask_logits[1:]).abs().max() > 1e-3  # every layer sees text
    assert (a.objectness[-1] - b.objectness[-1]).abs().max() > 1e-4
    torch.testing.assert_close(a.mask_logits, a2.mask_logits)
    # the initial prediction (before any layer) cannot depend on the prompt
    torch.testing.assert_close(a.mask_logits[0], b.mask_logits[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pmp=True"):
        on(tokens, pixels, None)


def test_padding_tokens_do_not_change_the_output():
    on = _decoder(pmp=True)
    tokens, pixels = _inputs(b=1)
    g = torch.Generator().manual_seed(3)
    short = torch.randn(3, 384, generator=g)
    with torch.no_grad():
        alone = on(tokens, pixels, pack_prompts([[short]]))
        # the same image padded next to a longer prompt in a batch of two
        padded = on(
            tokens.repeat(2, 1, 1),
            pixels.repeat(2, 1, 1, 1),
            pack_prompts([[short], [torch.randn(9, 384, generator=g)]]),
        )
    torch.testing.assert_close(alone.mask_logits[:, 0], padded.mask_logits[:, 0])


def test_encode_prompts_uses_the_frozen_minilm_tokens(tiny_clip):
    model, tokenizer = tiny_clip
    p = encode_prompts(model, tokenizer, [["circle", "star"], "the red star left of it"])
    assert p.states.shape[0] == 2 and p.states.shape[2] == 384
    # "circle" and "star" are one word piece each: [CLS] w [SEP] twice = 6 tokens
    assert (~p.padding[0]).sum() == 6 and (~p.padding[1]).sum() > 6
    single = encode_prompts(model, tokenizer, [["circle"]])
    torch.testing.assert_close(single.states[0, :3], p.states[0, :3])  # names encoded alone


# --------------------------------------------------------------------------------------------
# Matching and losses
# --------------------------------------------------------------------------------------------


def test_hungarian_matching_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for n, m in [(4, 3), (5, 5), (6, 2)]:
        logits = torch.randn(n, 20, generator=g) * 3
        obj = torch.randn(n, 2, generator=g)
        targets = (torch.rand(m, 20, generator=g) > 0.5).float()
        rows, cols = hungarian_match(logits, obj, targets)
        cost = match_costs(logits, obj, targets, LossWeights()).numpy()
        best = min(
            sum(cost[p, j] for j, p in enumerate(perm))
            for perm in itertools.permutations(range(n), m)
        )
        assert len(rows) == m and sorted(cols.tolist()) == list(range(m))
        assert cost[rows, cols].sum() == pytest.approx(best, rel=1e-6)


def test_match_cost_terms_by_hand():
    logits = torch.tensor([[0.0, 0.0]])  # sigmoid 0.5 everywhere
    obj = torch.tensor([[0.0, 0.0]])  # p(object) = 0.5
    target = torch.tensor([[1.0, 0.0]])
    bce = float(np.log(2))  # -log 0.5 at every pixel
    dice = 1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1)
    cost = match_costs(logits, obj, target, LossWeights(objectness=2, bce=5, dice=5))
    assert float(cost) == pytest.approx(2 * -0.5 + 5 * bce + 5 * dice, rel=1e-6)


def test_dice_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [np.log(3), np.log(3), -np.log(3), 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # mask 0: s = 0.5 each; sum(s t) = 1.5, sum s = 2, sum t = 3 -> 1 - (3 + 1) / (5 + 1) = 1/3
    # mask 1: s = .75, .75, .25, .5; sum(s t) = .75, sum s = 2.25, sum t = 1
    #         -> 1 - (1.5 + 1) / (3.25 + 1) = 1 - 2.5 / 4.25
    expected = (1 / 3 + (1 - 2.5 / 4.25)) / 2
    assert float(dice_loss(logits, targets, num_masks=2)) == pytest.approx(expected, rel=1e-6)


def test_set_criterion_deep_supervision_and_no_targets():
    decoder = _decoder(pmp=False)
    tokens, pixels = _inputs()
    out = decoder(tokens, pixels)
    targets = [(torch.rand(2, 32, 32) > 0.5).float(), torch.zeros(0, 32, 32)]
    losses = set_criterion(out, targets)
    assert torch.isfinite(losses["loss"]) and set(losses) == {"loss", "objectness", "bce", "dice"}
    losses["loss"].backward()
    # every prediction is supervised: the first layer's FFN gets a gradient
    assert decoder.layers[0].ffn[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask-feature size"):
        set_criterion(out, [torch.zeros(1, 16, 16), torch.zeros(0, 16, 16)])


# --------------------------------------------------------------------------------------------
# Proposals
# --------------------------------------------------------------------------------------------


class _FixedDecoder(QueryDecoder):
    """Returns prescribed last-layer predictions on a 16x16 mask grid (post-processing tests)."""

    def forward(self, tokens, pixels=None, prompt=None):  # type: ignore[override]
        b = tokens.shape[0]
        masks = -torch.ones(b, 4, 16, 16)
        masks[:, 0, :, :8] = 1.0  # left half
        masks[:, 1, :, :8] = 1.0  # a duplicate: removed by NMS
        masks[:, 3, :4, 12:] = 1.0  # a small square with low objectness: under the threshold
        obj = torch.tensor([[4.0, 0.0], [3.0, 0.0], [4.0, 0.0], [-4.0, 0.0]]).expand(b, 4, 2)
        return QueryDecoderOutput(masks[None], obj[None])


def test_propose_returns_boolean_masks_at_the_image_resolution(tiny_clip):
    model, tokenizer = tiny_clip
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    fixed = _FixedDecoder(QueryDecoderConfig(**{**TINY, "ffn": TINY_FFN}))
    masks, scores = QueryMaskProposer(model, tokenizer, fixed, score_threshold=0.3).propose(image)
    assert masks.dtype == bool and masks.shape == (1, 50, 70) and scores.shape == (1,)
    # bilinear upsampling of a step at grid column 8 of 16 crosses zero at x = 34.5
    assert masks[0, :, :35].all() and not masks[0, :, 35:].any()
    # score = p(object) of the best of the two duplicates x mean sigmoid inside its mask
    grid = -torch.ones(1, 1, 16, 16)
    grid[..., :8] = 1.0
    up = torch.nn.functional.interpolate(grid, (50, 70), mode="bilinear")[0, 0]
    inside = up.sigmoid()[torch.from_numpy(masks[0])].mean().item()
    p_obj = torch.tensor([4.0, 0.0]).softmax(0)[0].item()
    assert scores[0] == pytest.approx(p_obj * inside, rel=1e-5)

    decoder = _decoder(pmp=True)
    proposer = QueryMaskProposer(model, tokenizer, decoder, score_threshold=0.0, min_area=0)
    out = proposer.propose_batch([image, image[:40]], [["circle", "star"], "a red heart"])
    for (m, s), h in zip(out, (50, 40), strict=True):
        assert m.dtype == bool and m.shape[1:] == (h, 70) and s.shape == (len(m),)
    with pytest.raises(ValueError, match="one prompt per image"):
        proposer.propose(image)


def test_save_and_load_round_trip(tmp_path):
    decoder = _decoder(pmp=True)
    save_decoder(tmp_path / "d", decoder)
    loaded = load_decoder(tmp_path / "d")
    assert loaded.cfg == decoder.cfg
    for k, v in decoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float())


# --------------------------------------------------------------------------------------------
# The training script
# --------------------------------------------------------------------------------------------


def test_sample_prompt_keeps_present_classes_and_draws_absent_ones():
    seen = ["a", "b", "c", "d", "e"]
    sizes = set()
    for s in range(50):
        names, kept = sample_prompt(["b", "d", "b"], seen, np.random.default_rng(s))
        assert kept == {"b", "d"} and {"b", "d"} <= set(names) and set(names) <= set(seen)
        assert len(names) == len(set(names))
        sizes.add(len(names))
    assert sizes == {2, 3, 4, 5}  # from no absent class to all of them
    for s in range(50):
        names, kept = sample_prompt(["b", "d"], seen, np.random.default_rng(s), subset_prob=1.0)
        assert len(kept) == 1 and kept <= set(names)


def test_proposal_recall_by_hand():
    gt = np.zeros((2, 4, 4), dtype=bool)
    gt[0, :2, :2] = True  # 4 px
    gt[1, 2:, :] = True  # 8 px
    prop = np.zeros((1, 4, 4), dtype=bool)
    prop[0, 2:, :3] = True  # IoU 6/8 = 0.75 with gt 1, 0 with gt 0
    r = proposal_recall([prop], [gt], [[False, True]], [["star", "heart"]])
    assert r["recall@0.5_all"] == 0.5 and r["recall@0.75_unseen"] == 1.0
    assert r["recall@0.5_seen"] == 0.0 and r["masks_per_image"] == 1.0
    assert r["recall@0.5_per_class"] == {"heart": 1.0, "star": 0.0}
    # an image without proposals finds nothing
    r = proposal_recall([prop[:0]], [gt], [[False, True]])
    assert r["recall@0.5_all"] == 0.0 and r["masks_per_image"] == 0.0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """64 px ShapeWorld (8 train, 2 test) and a random tiny CLIP checkpoint."""
    tmp = tmp_path_factory.mktemp("qd")
    root = tmp / "sw"
    argv = ["generate", "--out", str(root), "--pretrain", "2", "--train", "8", "--val", "2"]
    shapeworld_main([*argv, "--test", "2", "--image-size", "64", "--seed", "0", "--workers", "1"])
    torch.manual_seed(0)
    model, _, _ = build_clip("tiny-vit")
    cfg = get_clip_config("tiny-vit")
    save_checkpoint(tmp / "clip", {"clip": trained_state_dict(model, cfg)}, cfg.to_dict())
    return {"data": root, "clip": tmp / "clip", "tmp": tmp}


def _argv(world, out: Path, steps: int) -> list[str]:
    argv = ["--data", str(world["data"]), "--clip", str(world["clip"]), "--out", str(out)]
    argv += ["--limit", "4", "--batch-size", "4", "--steps", str(steps), "--hidden", "32"]
    argv += ["--queries", "8", "--layers", "2", "--lr", "3e-3", "--log-every", "1"]
    return [*argv, "--device", "cpu", "--no-progress", "--save-every", "2"]


def test_a_tiny_pmp_run_lowers_the_loss_and_writes_a_checkpoint(world):
    out = world["tmp"] / "run"
    argv = [*_argv(world, out, 16), "--pmp", "--eval-split", "test", "--eval-limit", "2"]
    assert train_main([*argv, "--score-threshold", "0"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 16
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert last < 0.8 * first  # one batch of 4 images seen every step must be fitted
    decoder = load_decoder(out / "final")
    assert decoder.cfg.pmp and decoder.cfg.grid == 8 and decoder.cfg.hidden == 32
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "with PMP" in card and "--steps 16" in card
    report = json.loads((out / "eval_test.json").read_text())
    assert report["images"] == 2 and "recall@0.75_unseen" in report
    assert not (out / "last").exists()


def test_resume_gives_the_weights_of_an_uninterrupted_run(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_main([*_argv(world, a, 4), "--pmp", "--eval-limit", "0"]) == 0
    assert train_main([*_argv(world, b, 4), "--pmp", "--eval-limit", "0", "--stop-after", "2"]) == 0
    assert (b / "last").is_dir() and not (b / "final").exists()
    with pytest.raises(SystemExit):  # another setting cannot resume this state
        train_main([*_argv(world, b, 4), "--no-pmp", "--eval-limit", "0", "--resume"])
    assert train_main([*_argv(world, b, 4), "--pmp", "--eval-limit", "0", "--resume"]) == 0
    sa, sb = load_decoder(a / "final").state_dict(), load_decoder(b / "final").state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_eval_only_saves_proposals_and_evaluates_saved_masks(world, tmp_path, capsys):
    decoder = _decoder(pmp=False, **{"vis_dim": 32, "grid": 8})
    save_decoder(tmp_path / "d", decoder)
    common = ["--data", str(world["data"]), "--clip", str(world["clip"]), "--no-progress"]
    common += ["--eval-split", "test", "--eval-limit", "2"]
    npz = tmp_path / "p.npz"
    argv = [*common, "--eval-only", "--init", str(tmp_path / "d"), "--save-proposals", str(npz)]
    argv += ["--score-threshold", "0", "--eval-json", str(tmp_path / "r.json")]
    assert train_main(argv) == 0
    assert npz.is_file() and json.loads((tmp_path / "r.json").read_text())["images"] == 2
    assert train_main([*common, "--eval-masks", str(npz)]) == 0
    assert "recall@0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_main(["--data", str(world["data"]), "--eval-only"])  # no --init
