"""GILL's trainable modules: the [IMG]-token mapper, the retrieval heads, the decision head.

    cfg = GILLConfig.for_decoder(576, 256, get_diffusion_config("shapes-ldm"))  # C, E_clip, (L, D)
    gill = build_gill(cfg)                          # random weights, fp32, CPU
    embeds = gill.mapper(hidden, input_embeds)      # (B, r, C) x 2 -> (B, L, D) prompt_embeds
    loss_gen = generation_loss(embeds, encode_prompts(pipe, captions))
    ret = gill.retrieval(hidden[:, 0], clip_image_embeds)        # [IMG0] state, (B, E)
    loss_ret = info_nce(ret.text_embeds, ret.image_embeds, ret.logit_scale)
    logits = gill.decision(hidden[:, 0])            # (B, 2): RETRIEVE, GENERATE

After Koh et al. 2023, "Generating Images with Multimodal Language Models" (arXiv 2305.17216;
kohjingyu/gill, gill/layers.py and gill/models.py; ../shared/REFERENCE.md):

- ``GILLMapper`` (paper Sec. 3.2, Fig. 3): the r = 8 [IMG] tokens' last hidden states plus their
  input embeddings (summed, as gill/layers.py does) -> Linear(C -> 512) -> a pre-norm
  ``nn.Transformer`` (4 encoder + 4 decoder layers, 4 heads, ff 2048, no dropout) whose decoder
  input is L learned queries -> Linear(512 -> D). (L, D) is the diffusion decoder's conditioning:
  its text encoder's padded length and width (``DiffusionConfig.text_max_length`` /
  ``text_dim``, or ``generation.diffusion.expected_embeds_shape(pipe)``), (77, 768) for SD-1.5,
  (24, 384) for our shapes-ldm. The output goes to the pipeline as ``prompt_embeds``.
- ``generation_loss``: distance per output token to the decoder's own text encoding of the
  caption, averaged over tokens and batch. Paper Eq. 4 writes the squared L2 norm; the official
  code (gill/losses.py ``l2_loss``) takes its square root. Default: the code's; ``squared=True``:
  the equation's.
- ``RetrievalHeads`` (Sec. 3.1): Linear(C -> E_ret) on the [IMG0] hidden state and
  Linear(E_clip -> E_ret) on the CLIP image embedding, both L2-normalised; a learnable logit scale
  initialised at ln(1/0.07) as CLIP's, its exponential clamped at 100 (CLIP's training code).
  ``info_nce`` is the symmetric InfoNCE over the batch (mean of text->image and image->text CE).
- ``DecisionHead`` (Sec. 3.3): Dropout(0.5) + Linear(C -> 2) on the [IMG0] hidden state; index 0
  retrieve, 1 generate.

Pure torch; the LLM, its [IMG] embedding rows and the decoder live elsewhere (vlm/, diffusion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import Config
from generation.diffusion import DiffusionConfig

__all__ = [
    "GENERATE",
    "LOGIT_SCALE_INIT",
    "LOGIT_SCALE_MAX",
    "NUM_IMG_TOKENS",
    "RETRIEVE",
    "DecisionHead",
    "GILLConfig",
    "GILLMapper",
    "GILLMapperConfig",
    "GILLModules",
    "GILLPresetConfig",
    "RetrievalHeads",
    "RetrievalOutput",
    "build_gill",
    "build_mapper",
    "generation_loss",
    "info_nce",
]

NUM_IMG_TOKENS = 8  # r: [IMG0] .. [IMG7] (paper Sec. 3.2; fewer hurt generation in its ablation)
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps exp(logit_scale) at 100
RETRIEVE, GENERATE = 0, 1  # DecisionHead classes


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass
class GILLMapperConfig(Config):
    """GILLMapper sizes. Defaults are the paper's; out_tokens/out_dim come from the decoder."""

    out_tokens: int = 77  # L: the decoder text encoder's padded length (SD-1.5: 77)
    out_dim: int = 768  # D: the decoder's cross-attention width (SD-1.5: 768)
    width: int = 512  # transformer d_model
    encoder_layers: int = 4  # over the r [IMG] tokens
    decoder_layers: int = 4  # over the L learned queries, cross-attending to the encoder
    heads: int = 4  # attention heads (width must divide)
    ffn_dim: int = 2048  # feed-forward hidden size
    dropout: float = 0.0  # GILL trains without dropout in the mapper

    def __post_init__(self) -> None:
        if self.out_tokens < 1 or self.out_dim < 1:
            raise ValueError(
                f"out_tokens and out_dim must be >= 1, received ({self.out_tokens}, {self.out_dim})"
            )
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ValueError(
                f"width must be a positive multiple of heads, received width={self.width}, "
                f"heads={self.heads}"
            )
        if self.encoder_layers < 1 or self.decoder_layers < 1 or self.ffn_dim < 1:
            raise ValueError(
                "encoder_layers, decoder_layers and ffn_dim must be >= 1, received "
                f"{self.encoder_layers}, {self.decoder_layers}, {self.ffn_dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), received {self.dropout}")


@dataclass
class GILLConfig(Config):
    """All of GILL's trainable heads. Saved beside every GILL checkpoint."""

    llm_dim: int  # C: the LLM's hidden size (OPT-6.7B 4096, SmolLM2-135M 576)
    clip_dim: int  # E_clip: the CLIP image embedding width the retrieval head projects
    num_img_tokens: int = NUM_IMG_TOKENS  # r [IMG] tokens fed to the mapper
    retrieval_dim: int = 256  # E_ret: the shared text-image retrieval space (paper: 256)
    decision_dropout: float = 0.5  # dropout before the decision head's linear layer (paper)
    mapper: GILLMapperConfig = field(default_factory=GILLMapperConfig)

    def __post_init__(self) -> None:
        if self.llm_dim < 1 or self.clip_dim < 1 or self.retrieval_dim < 1:
            raise ValueError(
                "llm_dim, clip_dim and retrieval_dim must be >= 1, received "
                f"{self.llm_dim}, {self.clip_dim}, {self.retrieval_dim}"
            )
        if self.num_img_tokens < 1:
            raise ValueError(f"num_img_tokens must be >= 1, received {self.num_img_tokens}")
        if not 0.0 <= self.decision_dropout < 1.0:
            raise ValueError(
                f"decision_dropout must be in [0, 1), received {self.decision_dropout}"
            )

    @classmethod
    def for_decoder(
        cls,
        llm_dim: int,
        clip_dim: int,
        decoder: DiffusionConfig | tuple[int | None, int],
        mapper: GILLMapperConfig | None = None,
        **changes: Any,
    ) -> GILLConfig:
        """A config whose mapper writes the conditioning `decoder` takes.

        decoder: one of our DiffusionConfig (its text_max_length x text_dim), or the (L, D) of a
            loaded pipeline (``expected_embeds_shape(pipe)``: (77, 768) for SD-1.5).
        mapper: the other mapper sizes (default: the paper's); its out_tokens/out_dim are set.
        changes: other GILLConfig fields.
        """
        tokens: int | None
        if isinstance(decoder, DiffusionConfig):
            tokens, dim = decoder.text_max_length, decoder.text_dim
        else:
            tokens, dim = decoder
        if tokens is None:
            raise ValueError(
                "the decoder accepts prompt_embeds of any length; pass (L, D) with the L the "
                "mapper should write"
            )
        mapper = (mapper or GILLMapperConfig()).replace(out_tokens=int(tokens), out_dim=int(dim))
        return cls(llm_dim=llm_dim, clip_dim=clip_dim, mapper=mapper, **changes)


@dataclass
class GILLPresetConfig(Config):
    """The "gill" entry of a preset: the trained GILL model and the index it retrieves from
    (None = no image outputs in the chat)."""

    checkpoint: str | None = None  # a train.gill final/ folder (it holds its VLM core too)
    index: str | None = None  # an index folder built by `python -m vlm.gill index`; None: generate
    # False: a reply ends at its image (for a model whose text after [IMG] tokens is not yet
    # worth reading; GILL itself goes on writing)
    text_after_image: bool = True


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class GILLMapper(nn.Module):
    """[IMG] token states -> the diffusion decoder's conditioning (paper Fig. 3)."""

    def __init__(
        self,
        llm_dim: int,
        out_tokens: int,
        out_dim: int,
        *,
        num_img_tokens: int = NUM_IMG_TOKENS,
        width: int = 512,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        heads: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.llm_dim = llm_dim
        self.num_img_tokens = num_img_tokens
        self.out_tokens = out_tokens
        self.out_dim = out_dim
        self.fc_in = nn.Linear(llm_dim, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, ffn_dim, dropout, batch_first=True, norm_first=True
        )
        # nn.Transformer's own encoder, built here only to turn off the nested-tensor fast path
        # (unavailable with pre-norm; nn.Transformer would warn on every construction).
        encoder = nn.TransformerEncoder(
            layer, encoder_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        self.transformer = nn.Transformer(
            d_model=width,
            nhead=heads,
            num_decoder_layers=decoder_layers,
            dim_feedforward=ffn_dim,
            dropout=dropout,
            custom_encoder=encoder,
            batch_first=True,
            norm_first=True,  # pre-norm, as gill/layers.py
        )
        # The L learned queries double as output positions; randn like gill/layers.py.
        self.queries = nn.Parameter(torch.randn(1, out_tokens, width))  # (1, L, width)
        self.fc_out = nn.Linear(width, out_dim)

    def forward(self, hidden_states: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, r, C) last-layer states of [IMG0..r-1]; input_embeds: (B, r, C)
        their input embeddings. Returns (B, L, D) prompt_embeds for the decoder."""
        want = (self.num_img_tokens, self.llm_dim)
        for name, t in (("hidden_states", hidden_states), ("input_embeds", input_embeds)):
            if t.ndim != 3 or tuple(t.shape[1:]) != want:
                raise ValueError(
                    f"{name}: expected (B, {want[0]}, {want[1]}) for {want[0]} [IMG] tokens of "
                    f"width {want[1]}, received {tuple(t.shape)}"
                )
        if hidden_states.shape != input_embeds.shape:
            raise ValueError(
                f"hidden_states {tuple(hidden_states.shape)} and input_embeds "
                f"{tuple(input_embeds.shape)} must have the same shape"
            )
        x = self.fc_in(hidden_states + input_embeds)  # (B, r, width)
        queries = self.queries.expand(x.shape[0], -1, -1)  # (B, L, width)
        y = self.transformer(x, queries)  # (B, L, width)
        return self.fc_out(y)  # (B, L, D)


@dataclass
class RetrievalOutput:
    """RetrievalHeads output: both sides in the shared space, and the temperature."""

    text_embeds: torch.Tensor  # (B, E_ret) unit-norm, from the [IMG0] hidden state
    image_embeds: torch.Tensor  # (N, E_ret) unit-norm, from the CLIP image embeddings
    logit_scale: torch.Tensor  # () exp(logit_scale), clamped at 100


class RetrievalHeads(nn.Module):
    """Projections of the [IMG0] hidden state and of CLIP image embeddings into one space."""

    def __init__(self, llm_dim: int, clip_dim: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.text_proj = nn.Linear(llm_dim, embed_dim)
        self.image_proj = nn.Linear(clip_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))  # () log-temperature

    def scale(self) -> torch.Tensor:
        """() exp(logit_scale) clamped at 100; the clamp stops the gradient beyond it, as CLIP."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def embed_text(self, img0_hidden: torch.Tensor) -> torch.Tensor:
        """img0_hidden: (B, C) -> (B, E_ret) unit-norm."""
        if img0_hidden.ndim != 2 or img0_hidden.shape[1] != self.text_proj.in_features:
            raise ValueError(
                f"img0_hidden: expected (B, {self.text_proj.in_features}), received "
                f"{tuple(img0_hidden.shape)}"
            )
        return F.normalize(self.text_proj(img0_hidden), dim=-1)

    def embed_images(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds: (N, E_clip) CLIP image embeddings -> (N, E_ret) unit-norm. This is what a
        retrieval index over the shared space stores."""
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.image_proj.in_features:
            raise ValueError(
                f"image_embeds: expected (N, {self.image_proj.in_features}) CLIP embeddings, "
                f"received {tuple(image_embeds.shape)}"
            )
        return F.normalize(self.image_proj(image_embeds), dim=-1)

    def forward(self, img0_hidden: torch.Tensor, image_embeds: torch.Tensor) -> RetrievalOutput:
        """img0_hidden: (B, C) hidden state of [IMG0]; image_embeds: (N, E_clip)."""
        return RetrievalOutput(
            self.embed_text(img0_hidden), self.embed_images(image_embeds), self.scale()
        )


class DecisionHead(nn.Module):
    """Retrieve (0) or generate (1), from the [IMG0] hidden state (paper Sec. 3.3)."""

    def __init__(self, llm_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(llm_dim, 2)

    def forward(self, img0_hidden: torch.Tensor) -> torch.Tensor:
        """img0_hidden: (B, C) -> (B, 2) logits over (RETRIEVE, GENERATE)."""
        if img0_hidden.ndim != 2 or img0_hidden.shape[1] != self.fc.in_features:
            raise ValueError(
                f"img0_hidden: expected (B, {self.fc.in_features}), received "
                f"{tuple(img0_hidden.shape)}"
            )
        return self.fc(self.dropout(img0_hidden))


class GILLModules(nn.Module):
    """The three heads together (what a GILL checkpoint holds besides the [IMG] embedding rows)."""

    def __init__(self, mapper: GILLMapper, retrieval: RetrievalHeads, decision: DecisionHead):
        super().__init__()
        self.mapper = mapper
        self.retrieval = retrieval
        self.decision = decision


def build_mapper(
    llm_dim: int, cfg: GILLMapperConfig, num_img_tokens: int = NUM_IMG_TOKENS
) -> GILLMapper:
    """A GILLMapper with random weights (fp32, CPU)."""
    return GILLMapper(
        llm_dim,
        cfg.out_tokens,
        cfg.out_dim,
        num_img_tokens=num_img_tokens,
        width=cfg.width,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        heads=cfg.heads,
        ffn_dim=cfg.ffn_dim,
        dropout=cfg.dropout,
    )


def build_gill(cfg: GILLConfig) -> GILLModules:
    """GILL's heads with random weights (fp32, CPU); loading is a separate step."""
    return GILLModules(
        build_mapper(cfg.llm_dim, cfg.mapper, cfg.num_img_tokens),
        RetrievalHeads(cfg.llm_dim, cfg.clip_dim, cfg.retrieval_dim),
        DecisionHead(cfg.llm_dim, cfg.decision_dropout),
    )


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def generation_loss(
    pred: torch.Tensor, target: torch.Tensor, *, squared: bool = False
) -> torch.Tensor:
    """Distance of the mapper's output to the decoder's text encoding of the caption.

    pred, target: (B, L, D); target is the frozen decoder's own encoding (``encode_prompts``),
    padding positions included (the decoder attends to them too). Per token the Euclidean
    distance ||u - v||_2 over D (gill/losses.py), or its square with ``squared`` (paper Eq. 4);
    averaged over the L tokens and the batch. Returns a scalar.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target: expected the same (B, L, D) shape, received {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    diff = pred - target.to(pred.dtype)  # (B, L, D)
    if squared:
        return diff.pow(2).sum(dim=-1).mean()
    # vector_norm's gradient at a zero difference is 0 (a plain .sqrt() would give NaN there).
    return torch.linalg.vector_norm(diff, dim=-1).mean()


def info_nce(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (row i of each side is a pair).

    text_embeds, image_embeds: (B, E) (unit-norm: cosine logits); logit_scale: the multiplier
    exp(t), e.g. ``RetrievalOutput.logit_scale``. Mean of the text->image and image->text
    cross-entropies, as GILL's and CLIP's training code. Returns a scalar.
    """
    if text_embeds.ndim != 2 or text_embeds.shape != image_embeds.shape:
        raise ValueError(
            f"text_embeds and image_embeds: expected the same (B, E) shape, received "
            f"{tuple(text_embeds.shape)} and {tuple(image_embeds.shape)}"
        )
    logits = logit_scale * text_embeds @ image_embeds.T  # (B, B) text rows, image columns
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
