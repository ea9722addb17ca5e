"""RetroMAE v2 / DupMAE: retrieval-oriented pretraining of a BERT-class encoder; the MLM baseline.

    cfg = DupMAEConfig(objective="dupmae")
    model = DupMAEModel.from_source("minilm-l6", cfg)             # BertForMaskedLM + decoder
    input_ids, attention_mask = model.pad(windows)                  # (B, T), right-padded
    batch = mask_batch(input_ids, attention_mask, model.tokenizer, cfg, generator)
    out = model(batch)                                              # out.loss, out.terms
    model.encode(texts, view="cls")                                 # (N, D) unit rows

One training step on a batch of texts (REFERENCE.md "RetroMAE v2 / DupMAE"; staoxiao/RetroMAE,
src/pretrain/modeling_duplex.py and data.py):

- Encoder MLM: BERT masking (80 % [MASK], 10 % random, 10 % kept) of ``encoder_mask_ratio`` of the
  ordinary tokens (transformers' DataCollatorForLanguageModeling does the masking), cross-entropy
  on the masked positions: ``L_mlm``.
- [CLS] decoding (RetroMAE's enhanced decoding): a one-layer transformer whose query at position i
  is the encoder's final [CLS] state plus position i's embedding (the "query stream"), and whose
  keys / values are the [CLS] state at slot 0 and the *unmasked* token embeddings (word + position)
  at slots 1..T-1. Row i attends to its own visibility set: the [CLS] slot always, each other real
  token independently with probability 1 - ``decoder_mask_ratio``, never its own token. Every
  ordinary token is reconstructed (through the encoder's MLM head): ``L_dec``. With so little
  context per row, the [CLS] state must carry the text.
- DupMAE's bag-of-words loss on the ordinary token embeddings (OT): the encoder's MLM logits
  (B, T, V) of the masked input, max-pooled over the ordinary tokens -> one (B, V) vector per text,
  trained to predict the text's bag of words: ``L_bow = -sum_v q_v log softmax(ot)_v`` with ``q``
  uniform over the distinct ordinary tokens of the text.
- ``dupmae``: L = L_mlm + w_dec L_dec + w_bow L_bow (REFERENCE.md: w_bow = 0.1); ``retromae``:
  L_mlm + w_dec L_dec; ``mlm``: L_mlm alone (the baseline).

Differences from the reference code, on purpose: each decoder row's visibility is drawn
token-wise (RetroMAE draws whole-word masks from a pool of 256 per text); the bag-of-words target
sums to one (the reference gives each distinct token 1 / length, so repeats lower the total);
special tokens ([CLS], [SEP], [PAD]) are never ordinary tokens.

Retrieval views (``encode(texts, view=)``), all on the unmasked text: ``cls`` the last [CLS]
state; ``mean`` mean pooling (lm.embeddings.pooling); ``ot`` ReLU of the max-pooled MLM logits over
the ordinary tokens (|V| dims, sparse); ``cls+ot`` the two unit vectors concatenated (cosine =
(cos_cls + cos_ot) / 2). The paper compresses the OT vector before concatenating; we keep it whole.

Written here rather than taken from a library: no maintained package implements RetroMAE's
decoder or DupMAE's loss; the reference repository is a training script, not a library.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from core.config import Config
from core.runtime import resolve_dtype
from core.sources import resolve_source
from lm.embeddings.pooling import pool
from lm.loading import load_tokenizer

__all__ = [
    "CONFIG_NAME",
    "DUPMAE_OBJECTIVES",
    "VIEWS",
    "DupMAEBatch",
    "DupMAEConfig",
    "DupMAEModel",
    "DupMAEOutput",
    "EnhancedDecoder",
    "bag_of_words_loss",
    "bag_of_words_target",
    "decoder_visibility",
    "mask_batch",
    "ordinary_token_mask",
    "ot_embedding",
]

DUPMAE_OBJECTIVES: tuple[str, ...] = ("dupmae", "retromae", "mlm")
VIEWS: tuple[str, ...] = ("cls", "mean", "ot", "cls+ot")
CONFIG_NAME = "dupmae.json"
DECODER_DIR = "decoder"


@dataclass
class DupMAEConfig(Config):
    """Objective and masking of a DupMAE / RetroMAE / MLM-only pretraining run."""

    objective: str = "dupmae"  # one of DUPMAE_OBJECTIVES
    encoder_mask_ratio: float = 0.3  # share of ordinary tokens the encoder MLM masks (DupMAE: 0.3)
    decoder_mask_ratio: float = 0.5  # share of context each decoder row does not see (DupMAE: 0.5)
    decoder_weight: float = 1.0  # w_dec
    bow_weight: float = 0.1  # w_bow (REFERENCE.md: 0.1)
    max_length: int = 128  # tokens per text, [CLS] and [SEP] included

    def __post_init__(self) -> None:
        if self.objective not in DUPMAE_OBJECTIVES:
            raise ValueError(
                f"objective must be one of {list(DUPMAE_OBJECTIVES)}, received {self.objective!r}"
            )
        for name in ("encoder_mask_ratio", "decoder_mask_ratio"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), received {value}")
        if self.decoder_weight < 0 or self.bow_weight < 0:
            raise ValueError(
                f"decoder_weight and bow_weight must be >= 0, received {self.decoder_weight}, "
                f"{self.bow_weight}"
            )
        if self.max_length < 4:
            raise ValueError(f"max_length must be >= 4, received {self.max_length}")

    @property
    def uses_decoder(self) -> bool:
        return self.objective in ("dupmae", "retromae")

    @property
    def uses_bow(self) -> bool:
        return self.objective == "dupmae"


# --------------------------------------------------------------------------------------------
# Masks and targets


def ordinary_token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int]
) -> torch.Tensor:
    """(B, T) bool: real tokens that are not special ([CLS], [SEP], [PAD], ...)."""
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    return (attention_mask > 0) & ~torch.isin(input_ids, special)


def decoder_visibility(
    attention_mask: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, T, T) bool, [b, i, j] = decoder row i may attend to slot j.

    Slot 0 (the [CLS] state) is visible to every row; row i never sees slot i (its own token,
    which it reconstructs); every other real slot is visible with probability 1 - ratio, drawn
    independently per row. Padding slots are never visible. Row 0 is not a prediction target.
    attention_mask: (B, T), 1 = real token, [CLS] at index 0 (right padding).
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (B, T), received {tuple(attention_mask.shape)}")
    if not bool((attention_mask[:, 0] > 0).all()):
        raise ValueError("every row must start with a real [CLS] token (right padding expected)")
    B, T = attention_mask.shape
    draw = torch.rand((B, T, T), generator=generator).to(attention_mask.device)
    visible = (draw >= ratio) & (attention_mask > 0)[:, None, :]  # (B, rows, slots)
    visible &= ~torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    visible[:, :, 0] = True
    return visible


def bag_of_words_target(
    input_ids: torch.Tensor, ordinary: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """(B, V) float: uniform over each text's distinct ordinary token ids (rows sum to 1).

    input_ids: (B, T); ordinary: (B, T) bool, as ``ordinary_token_mask`` gives it.
    """
    if not bool(ordinary.any(-1).all()):
        raise ValueError("every text needs at least one ordinary token for its bag of words")
    target = torch.zeros(input_ids.shape[0], vocab_size, device=input_ids.device)
    # amax, not assignment: a special id written with 0 never overwrites an ordinary 1
    target.scatter_reduce_(1, input_ids, ordinary.float(), reduce="amax")
    return target / target.sum(-1, keepdim=True)


def ot_embedding(logits: torch.Tensor, ordinary: torch.Tensor) -> torch.Tensor:
    """(B, V) max over the ordinary tokens of (B, T, V) logits (DupMAE's OT embedding)."""
    if logits.shape[:2] != ordinary.shape:
        raise ValueError(
            f"logits (B, T, V) = {tuple(logits.shape)} and ordinary (B, T) = "
            f"{tuple(ordinary.shape)} do not match"
        )
    return logits.masked_fill(~ordinary.unsqueeze(-1), float("-inf")).amax(1)


def bag_of_words_loss(ot: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over texts of -sum_v target_v log softmax(ot)_v. ot, target: (B, V)."""
    if ot.shape != target.shape:
        raise ValueError(
            f"ot and target must both be (B, V), received {tuple(ot.shape)}, {tuple(target.shape)}"
        )
    return -(target * F.log_softmax(ot.float(), dim=-1)).sum(-1).mean()


@dataclass
class DupMAEBatch:
    """One masked batch; every tensor is (B, T) unless noted."""

    input_ids: torch.Tensor  # the original tokens (what the decoder's context embeds)
    attention_mask: torch.Tensor  # 1 = real token
    encoder_input_ids: torch.Tensor  # input_ids after BERT masking
    encoder_labels: torch.Tensor  # original id at masked positions, -100 elsewhere
    decoder_visible: torch.Tensor  # (B, T, T) bool, see decoder_visibility
    decoder_labels: torch.Tensor  # original id at every ordinary token, -100 elsewhere
    bow_target: torch.Tensor  # (B, V) bag-of-words distribution

    def to(self, device: torch.device | str) -> DupMAEBatch:
        return DupMAEBatch(**{k: v.to(device) for k, v in vars(self).items()})


def mask_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    config: DupMAEConfig,
    generator: torch.Generator | None = None,
) -> DupMAEBatch:
    """Every mask and target of one step, drawn from ``generator`` (CPU tensors)."""
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no [MASK] token; DupMAE needs an MLM tokenizer")
    ordinary = ordinary_token_mask(input_ids, attention_mask, tokenizer.all_special_ids)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=config.encoder_mask_ratio)
    collator.generator = generator  # the collator draws every mask from this generator
    enc_ids, enc_labels = collator.torch_mask_tokens(
        input_ids.clone(), special_tokens_mask=~ordinary
    )
    return DupMAEBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_input_ids=enc_ids,
        encoder_labels=enc_labels,
        decoder_visible=decoder_visibility(attention_mask, config.decoder_mask_ratio, generator),
        decoder_labels=input_ids.masked_fill(~ordinary, -100),
        bow_target=bag_of_words_target(input_ids, ordinary, len(tokenizer)),
    )


# --------------------------------------------------------------------------------------------
# Model


class EnhancedDecoder(nn.Module):
    """RetroMAE's one-layer decoder: a post-LN transformer layer (BERT's) whose queries and
    keys / values are different streams, with a visibility mask per row.

    Written by hand: transformers' BertLayer is self-attention only (queries = keys), and
    torch's TransformerDecoderLayer adds a self-attention over the query stream.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        self.attention = nn.MultiheadAttention(
            hidden_size, num_heads, dropout=dropout, batch_first=True
        )
        self.attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, intermediate_size),
            nn.GELU(),
            nn.Linear(intermediate_size, hidden_size),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_bert_config(cls, config: BertConfig) -> EnhancedDecoder:
        return cls(
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            config.hidden_dropout_prob,
            config.layer_norm_eps,
        )

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """query, context: (B, T, D); visible: (B, T, T) bool, True = row may attend to slot.
        Returns (B, T, D)."""
        if query.shape != context.shape or visible.shape != (*query.shape[:2], query.shape[1]):
            raise ValueError(
                f"expected query and context (B, T, D) and visible (B, T, T), received "
                f"{tuple(query.shape)}, {tuple(context.shape)}, {tuple(visible.shape)}"
            )
        # nn.MultiheadAttention takes (B * heads, T, T) with True = masked out
        blocked = ~visible.repeat_interleave(self.attention.num_heads, dim=0)
        attended, _ = self.attention(query, context, context, attn_mask=blocked, need_weights=False)
        h = self.attention_norm(query + self.dropout(attended))
        return cast(torch.Tensor, self.ffn_norm(h + self.ffn(h)))


@dataclass
class DupMAEOutput:
    """One step's loss and its named terms (detached)."""

    loss: torch.Tensor  # scalar
    terms: dict[str, torch.Tensor]  # "mlm", and "decoder", "bow" where the objective has them


class DupMAEModel(nn.Module):
    """A BertForMaskedLM (encoder + MLM head) and RetroMAE's decoder, with the objective's loss.

    mlm: the encoder and its MLM head; the decoder shares its embeddings and head.
    decoder: None for the ``mlm`` objective. tokenizer: the encoder's (a [MASK] token).
    """

    def __init__(
        self,
        mlm: BertForMaskedLM,
        decoder: EnhancedDecoder | None,
        tokenizer: PreTrainedTokenizerBase,
        config: DupMAEConfig,
    ):
        super().__init__()
        if not isinstance(mlm, BertForMaskedLM):
            raise ValueError(f"expected a BertForMaskedLM, received {type(mlm).__name__}")
        if (decoder is None) == config.uses_decoder:
            raise ValueError(
                f"objective {config.objective!r} {'needs' if config.uses_decoder else 'has no'} "
                "decoder"
            )
        if len(tokenizer) > mlm.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary "
                f"{mlm.config.vocab_size}"
            )
        self.mlm = mlm
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.config = config
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0  # masked out: any id would do

    @classmethod
    def build(
        cls, mlm: BertForMaskedLM, tokenizer: PreTrainedTokenizerBase, config: DupMAEConfig
    ) -> DupMAEModel:
        """Add a freshly initialised decoder (BERT's init) where the objective needs one."""
        decoder = None
        if config.uses_decoder:
            decoder = EnhancedDecoder.from_bert_config(mlm.config)
            decoder.apply(mlm._init_weights)
        return cls(mlm, decoder, tokenizer, config)

    @classmethod
    def from_source(
        cls, source: str, config: DupMAEConfig, *, dtype: str | torch.dtype = "fp32"
    ) -> DupMAEModel:
        """A BERT-class model source (core.sources spec) as BertForMaskedLM, in train mode. A
        checkpoint without an MLM head (all-MiniLM-L6-v2) gets a fresh one (transformers says
        which tensors it initialised)."""
        name, kwargs = resolve_source(source).pretrained_args()
        mlm = BertForMaskedLM.from_pretrained(name, dtype=resolve_dtype(dtype), **kwargs)
        out = cls.build(mlm, load_tokenizer(source), config)
        return out.train()

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Encoder + MLM head (safetensors), tokenizer, ``dupmae.json`` and ``decoder/`` (core
        checkpoint) into ``directory``. The encoder alone loads with ``AutoModel``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.mlm.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        self.config.save(directory / CONFIG_NAME)
        if self.decoder is not None:
            save_checkpoint(
                directory / DECODER_DIR,
                {"decoder": self.decoder.state_dict()},
                self.config.to_dict(),
                overwrite=True,
            )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], *, device: str | torch.device = "cpu"
    ) -> DupMAEModel:
        """Load what ``save_pretrained`` wrote, in eval mode."""
        directory = Path(directory)
        config = DupMAEConfig.load(directory / CONFIG_NAME)
        mlm = BertForMaskedLM.from_pretrained(str(directory))
        out = cls.build(mlm, load_tokenizer(str(directory)), config)
        if out.decoder is not None:
            ckpt = load_checkpoint(directory / DECODER_DIR)
            load_state_strict(out.decoder, ckpt.tensors["decoder"], what=str(directory))
        out.to(device)
        return out.eval()

    @property
    def device(self) -> torch.device:
        return next(self.mlm.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.mlm.config.hidden_size)

    def token_ids(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """[CLS] text [SEP] ids of each text, cut to ``max_length`` (default the config's)."""
        length = max_length or self.config.max_length
        positions = self.mlm.config.max_position_embeddings
        if length > positions:
            raise ValueError(f"max_length {length} exceeds the model's {positions} positions")
        out = self.tokenizer(list(texts), truncation=True, max_length=length)
        return [list(row) for row in out["input_ids"]]

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, T), padded on the right so that [CLS] sits at index 0.
        ids: token ids with their special tokens."""
        if not ids or any(len(row) == 0 for row in ids):
            raise ValueError("expected non-empty token sequences")
        T = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, : len(row)] = 1
        return input_ids, mask

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, T) of texts, right-padded."""
        return self.pad(self.token_ids(texts))

    # ---------------------------------------------------------------------------------------
    # Training

    def forward(self, batch: DupMAEBatch) -> DupMAEOutput:
        """The objective's loss on one masked batch (see the module docstring)."""
        cfg = self.config
        hidden = self.mlm.bert(
            input_ids=batch.encoder_input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state  # (B, T, D)
        masked = batch.encoder_labels != -100  # (B, T)
        terms: dict[str, torch.Tensor] = {}
        if cfg.uses_bow:
            logits = self.mlm.cls(hidden)  # (B, T, V): the BoW loss reads every token
            terms["mlm"] = F.cross_entropy(logits[masked].float(), batch.encoder_labels[masked])
            ordinary = batch.decoder_labels != -100
            ot = ot_embedding(logits, ordinary)
            terms["bow"] = bag_of_words_loss(ot, batch.bow_target)
        else:  # the vocabulary projection on the masked positions only
            logits = self.mlm.cls(hidden[masked])  # (M, V)
            terms["mlm"] = F.cross_entropy(logits.float(), batch.encoder_labels[masked])
        if self.decoder is not None:
            terms["decoder"] = self.decoder_loss(hidden[:, 0], batch)
        loss = terms["mlm"]
        if "decoder" in terms:
            loss = loss + cfg.decoder_weight * terms["decoder"]
        if "bow" in terms:
            loss = loss + cfg.bow_weight * terms["bow"]
        return DupMAEOutput(loss, {k: v.detach() for k, v in terms.items()})

    def decoder_loss(self, cls_state: torch.Tensor, batch: DupMAEBatch) -> torch.Tensor:
        """Reconstruct every ordinary token from the [CLS] state under per-row visibility.

        cls_state: (B, D) the encoder's last [CLS] state.
        """
        assert self.decoder is not None
        B, T = batch.input_ids.shape
        embeddings = self.mlm.bert.embeddings
        # query stream: [CLS] + position i (the embeddings module adds positions and LayerNorm)
        query = embeddings(inputs_embeds=cls_state[:, None, :].expand(B, T, -1))  # (B, T, D)
        context = embeddings(input_ids=batch.input_ids)  # (B, T, D) the unmasked tokens
        context = torch.cat([cls_state[:, None, :], context[:, 1:]], dim=1)
        decoded = self.decoder(query, context, batch.decoder_visible)  # (B, T, D)
        targets = batch.decoder_labels != -100
        logits = self.mlm.cls(decoded[targets])  # (M, V)
        return F.cross_entropy(logits.float(), batch.decoder_labels[targets])

    # ---------------------------------------------------------------------------------------
    # Retrieval

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        view: str = "cls",
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """(N, D) unit embeddings of ``texts`` under ``view`` (VIEWS; ``ot`` is (N, V) and
        ``cls+ot`` (N, D + V)), texts cut to ``max_length`` tokens (default the config's). Runs in
        eval mode and restores the mode."""
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; valid views: {list(VIEWS)}")
        views = self.encode_views(
            texts, (view,), batch_size=batch_size, max_length=max_length, progress=progress
        )
        return views[view]

    @torch.no_grad()
    def encode_views(
        self,
        texts: Sequence[str],
        views: Sequence[str] = VIEWS,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        progress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Every view in ``views`` from one forward pass per batch: view -> (N, dim) unit rows."""
        unknown = [v for v in views if v not in VIEWS]
        if unknown or not texts:
            raise ValueError(f"expected texts and views from {list(VIEWS)}; received {unknown}")
        was_training = self.training
        self.eval()
        ids = self.token_ids(texts, max_length)
        special = self.tokenizer.all_special_ids
        parts: dict[str, list[torch.Tensor]] = {v: [] for v in views}
        starts = range(0, len(ids), batch_size)
        for s in tqdm(starts, desc="encode", unit="batch", disable=not progress, leave=False):
            input_ids, mask = self.pad(ids[s : s + batch_size])
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            h = self.mlm.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
            got: dict[str, torch.Tensor] = {
                "cls": F.normalize(h[:, 0].float(), dim=-1),
                "mean": F.normalize(pool(h, mask, "mean"), dim=-1),
            }
            if "ot" in views or "cls+ot" in views:
                ordinary = ordinary_token_mask(input_ids, mask, special)
                ot = ot_embedding(self.mlm.cls(h).float(), ordinary).relu()
                got["ot"] = F.normalize(ot, dim=-1)
                got["cls+ot"] = torch.cat([got["cls"], got["ot"]], dim=-1) / 2**0.5
            for v in views:
                parts[v].append(got[v].cpu())
        self.train(was_training)
        return {v: torch.cat(p) for v, p in parts.items()}


def describe(model: DupMAEModel) -> dict[str, Any]:
    """Sizes for reports."""
    return {
        "layers": int(model.mlm.config.num_hidden_layers),
        "hidden_size": model.hidden_size,
        "vocab_size": int(model.mlm.config.vocab_size),
        "decoder_parameters": sum(p.numel() for p in model.decoder.parameters())
        if model.decoder is not None
        else 0,
    }
