"""generation.gill: the mapper's output fits the decoder, the losses equal hand-computed values,
gradients reach what trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.config import ConfigError
from generation.diffusion import (
    build_pipeline,
    encode_prompts,
    expected_embeds_shape,
    generate,
    get_diffusion_config,
)
from generation.gill import (
    GENERATE,
    LOGIT_SCALE_INIT,
    RETRIEVE,
    DecisionHead,
    GILLConfig,
    GILLMapper,
    GILLMapperConfig,
    RetrievalHeads,
    build_gill,
    build_mapper,
    generation_loss,
    info_nce,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = GILLMapperConfig(width=32, encoder_layers=1, decoder_layers=1, heads=4, ffn_dim=64)
C = 24  # a toy LLM width


def _img_tokens(batch: int = 2, r: int = 8, width: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, r, width), torch.randn(batch, r, width)


@pytest.mark.parametrize(
    ("decoder", "expected"),
    [
        (get_diffusion_config("shapes-ldm"), (24, 384)),  # our ShapeWorld decoder
        ((77, 768), (77, 768)),  # SD-1.5's CLIP ViT-L/14 text states
    ],
)
def test_mapper_writes_the_decoders_conditioning_shape(decoder, expected):
    cfg = GILLConfig.for_decoder(C, 16, decoder, mapper=SMALL)
    assert (cfg.mapper.out_tokens, cfg.mapper.out_dim) == expected
    assert cfg.mapper.width == SMALL.width  # the other sizes are kept
    gill = build_gill(cfg)
    out = gill.mapper(*_img_tokens(batch=3))
    assert out.shape == (3, *expected)


def test_mapper_output_is_accepted_as_prompt_embeds_by_the_tiny_pipeline():
    torch.manual_seed(0)
    pipe = build_pipeline("tiny-ldm")
    shape = expected_embeds_shape(pipe)
    assert shape == (16, 384)  # tiny-ldm: text_max_length x MiniLM width
    mapper = build_mapper(C, GILLMapperConfig(out_tokens=16, out_dim=384, **_small_sizes()))
    with torch.no_grad():
        embeds = mapper(*_img_tokens(batch=1))
    assert embeds.shape == encode_prompts(pipe, ["a red circle."]).shape
    images = generate(pipe, prompt_embeds=embeds, num_inference_steps=2, seed=0, output_type="pt")
    assert images.shape == (1, 3, 64, 64)


def _small_sizes() -> dict[str, int]:
    return {"width": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 4, "ffn_dim": 64}


def test_mapper_rejects_inputs_that_are_not_r_img_tokens_of_the_llm_width():
    mapper = build_mapper(C, SMALL.replace(out_tokens=4, out_dim=8))
    h, e = _img_tokens()
    with pytest.raises(ValueError, match=r"expected \(B, 8, 24\).*received \(2, 7, 24\)"):
        mapper(h[:, :7], e[:, :7])
    with pytest.raises(ValueError, match=r"input_embeds: expected \(B, 8, 24\)"):
        mapper(h, torch.randn(2, 8, 25))
    with pytest.raises(ValueError, match="same shape"):
        mapper(h, e[:1])


def test_mapper_sums_hidden_states_and_input_embeddings():
    """GILL feeds hidden + input embedding: swapping the two gives the same output."""
    mapper = build_mapper(C, SMALL.replace(out_tokens=4, out_dim=8)).eval()
    h, e = _img_tokens()
    torch.testing.assert_close(mapper(h, e), mapper(e, h))
    assert not torch.allclose(mapper(h, e), mapper(h, torch.zeros_like(e)))


def test_configs_validate_and_paper_defaults():
    paper = GILLMapperConfig()
    assert (paper.out_tokens, paper.out_dim, paper.width, paper.ffn_dim) == (77, 768, 512, 2048)
    assert (paper.encoder_layers, paper.decoder_layers, paper.heads) == (4, 4, 4)
    with pytest.raises(ValueError, match="multiple of heads"):
        GILLMapperConfig(width=30, heads=4)
    with pytest.raises(ConfigError, match="unknown field"):
        GILLConfig.from_dict({"llm_dim": 8, "clip_dim": 8, "mapper": {"widht": 3}})
    with pytest.raises(ValueError, match="any length"):
        GILLConfig.for_decoder(C, 16, (None, 768))
    cfg = GILLConfig.for_decoder(C, 16, (77, 768))
    assert GILLConfig.from_dict(cfg.to_dict()) == cfg


def test_generation_loss_equals_hand_computed_distances():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])
    # Per-token Euclidean distances 5 and 0, mean 2.5 (gill/losses.py l2_loss).
    assert generation_loss(pred, target).item() == pytest.approx(2.5)
    # Paper Eq. 4, squared: 25 and 0, mean 12.5.
    assert generation_loss(pred, target, squared=True).item() == pytest.approx(12.5)
    # Over a batch: the mean of per-token distances of both samples.
    pred2 = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]]])
    target2 = torch.tensor([[[3.0, 4.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert generation_loss(pred2, target2).item() == pytest.approx((5 + 0 + 1 + 2) / 4)
    with pytest.raises(ValueError, match=r"same \(B, L, D\) shape"):
        generation_loss(pred, target[:, :1])


def test_generation_loss_gradient_is_finite_at_a_perfect_prediction():
    pred = torch.ones(1, 3, 4, requires_grad=True)
    generation_loss(pred, torch.ones(1, 3, 4)).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_info_nce_equals_a_naive_per_row_cross_entropy():
    torch.manual_seed(0)
    t = F.normalize(torch.randn(5, 8), dim=-1)
    v = F.normalize(torch.randn(5, 8), dim=-1)
    scale = 7.0
    sim = [[scale * float(t[i] @ v[j]) for j in range(5)] for i in range(5)]

    def ce(row: list[float], target: int) -> float:
        return -row[target] + math.log(sum(math.exp(s) for s in row))

    text_to_image = sum(ce(sim[i], i) for i in range(5)) / 5
    image_to_text = sum(ce([sim[i][j] for i in range(5)], j) for j in range(5)) / 5
    expected = (text_to_image + image_to_text) / 2
    assert info_nce(t, v, scale).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(t, v, torch.tensor(scale)).item() == pytest.approx(expected, rel=1e-5)
    # Perfectly matched pairs at a high temperature give a near-zero loss.
    assert info_nce(t, t, 100.0).item() < info_nce(t, v, 100.0).item()
    with pytest.raises(ValueError, match=r"same \(B, E\) shape"):
        info_nce(t, v[:4], scale)


def test_retrieval_heads_project_to_unit_vectors_with_a_clamped_clip_temperature():
    heads = RetrievalHeads(C, 16, embed_dim=12)
    out = heads(torch.randn(3, C), torch.randn(4, 16))
    assert out.text_embeds.shape == (3, 12) and out.image_embeds.shape == (4, 12)
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert heads.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)
    with torch.no_grad():
        heads.logit_scale.fill_(10.0)  # exp(10) ~ 22026
    assert heads.scale().item() == pytest.approx(100.0, rel=1e-5)
    with pytest.raises(ValueError, match=r"img0_hidden: expected \(B, 24\)"):
        heads.embed_text(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"image_embeds: expected \(N, 16\)"):
        heads.embed_images(torch.randn(3, 8))


def test_decision_head_gives_two_logits_and_drops_out_only_in_training():
    head = DecisionHead(C)
    x = torch.randn(6, C)
    assert (RETRIEVE, GENERATE) == (0, 1)
    head.eval()
    torch.testing.assert_close(head(x), head(x))
    assert head(x).shape == (6, 2)
    head.train()
    assert not torch.allclose(head(x), head(x))  # dropout 0.5 (paper)
    with pytest.raises(ValueError, match=r"expected \(B, 24\)"):
        head(torch.randn(6, 5))


def test_gradients_reach_the_mapper_queries_and_every_head():
    torch.manual_seed(0)
    gill = build_gill(GILLConfig.for_decoder(C, 16, (6, 10), mapper=SMALL))
    h, e = _img_tokens(batch=4)
    target = torch.randn(4, 6, 10)
    ret = gill.retrieval(h[:, 0], torch.randn(4, 16))
    loss = (
        generation_loss(gill.mapper(h, e), target)
        + info_nce(ret.text_embeds, ret.image_embeds, ret.logit_scale)
        + F.cross_entropy(gill.decision(h[:, 0]), torch.tensor([0, 1, 0, 1]))
    )
    loss.backward()
    for name, p in gill.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert gill.mapper.queries.grad is not None
    assert gill.mapper.queries.grad.abs().sum() > 0
    assert gill.retrieval.logit_scale.grad is not None and gill.retrieval.logit_scale.grad != 0


def test_mapper_fits_a_fixed_target():
    """A few AdamW steps on one batch lower the generation loss well below its start."""
    torch.manual_seed(0)
    mapper = build_mapper(C, SMALL.replace(out_tokens=5, out_dim=6))
    h, e = _img_tokens(batch=4)
    target = torch.randn(4, 5, 6)
    opt = torch.optim.AdamW(mapper.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = generation_loss(mapper(h, e), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_mapper_class_is_the_one_build_returns():
    assert isinstance(build_mapper(C, SMALL), GILLMapper)
