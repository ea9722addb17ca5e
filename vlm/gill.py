"""GILL on the Polychrome VLM: the model emits ``[IMG0]``, then retrieves or generates an image.

    gill = GILLVLM.from_pretrained("runs/gill/final")
    maker = ImageMaker(gill, index=ImageIndex.load("runs/gill/index-test"), pipe=load_pipeline(...))
    for chunk, image in gill.stream([{"role": "user", "content": "Show me this: ..."}], maker):
        ...                                   # text chunks, and a GILLImage at each [IMG0]
    images = gill.images_for(prompts, maker)  # batch: every prompt answered with one image

    python -m vlm.gill index --checkpoint runs/gill/final --images /work/data/sw/test \\
        --out runs/gill/index-test             # an ImageIndex in GILL's retrieval space

How it follows Koh et al. 2023 (generation/gill.py has the heads and the losses; REFERENCE.md):

- r = 8 tokens ``[IMG0]``..``[IMG7]`` get trainable input rows (PolychromeVLM.add_tokens; a
  gradient hook zeroes every other added row, as GILL masks the gradient of all rows but its own).
  ``[IMG0]`` also gets an output row (``img_out``, ``img_bias``) beside the frozen LM head, as
  STAMP's ``<seg>``: its logit is appended to the vocabulary's and the decoding loop emits it like
  any token. (GILL's OPT ties input and output rows; our LM head is frozen and not resized.)
- Once ``[IMG0]`` is chosen, ``[IMG1..7]`` are appended, not sampled: one forward pass of the 8
  tokens over the reply's KV cache. Their last hidden states and input embeddings feed the
  GILLMapper (-> the decoder's ``prompt_embeds``), the ``[IMG0]`` state feeds the retrieval head
  and the decision head. The tokens stay in the cache and the reply continues after them (GILL's
  users complain that its replies stop at the image).
- The decision head picks retrieve (cosine top-1 of the ImageIndex) or generate (the diffusion
  pipeline on the mapper's output). An index for GILL stores ``RetrievalHeads.embed_images`` of
  the CLIP image embeddings, not raw CLIP vectors (the image side's projection is learned), so
  its model name carries a hash of the trained projection and the image preprocessing
  (``GILLImageEmbedder``): an index built with other weights, or before the name said how
  images are read (session 24; until session 23 they were centre-cropped), is refused.
- Every text token, text-only or with images, goes through the bare frozen LLM and the VLM core:
  chat logits are bitwise the VLM core's (a test checks it). Trained and saved: the ``[IMG]``
  rows, ``img_out``/``img_bias`` and GILL's heads; the VLM core is named by its saved tensors.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn
from transformers import DynamicCache

from core.checkpoint import CheckpointError, checkpoint_metadata, load_state_strict
from core.images import load_rgb
from data.conversations import DESCRIBE_PROMPTS
from data.datasets import InstanceDataset, shapeworld_paths
from data.formats import read_coco_captions
from data.language import listing_caption
from data.scene import COLOURS, SHAPES, UNSEEN_COLOURS, UNSEEN_SHAPES
from data.stories import Story
from generation.diffusion import DiffusionConfig, Pipeline, expected_embeds_shape, generate
from generation.gill import (
    GENERATE,
    NUM_IMG_TOKENS,
    GILLConfig,
    GILLMapperConfig,
    build_gill,
    generation_loss,
    info_nce,
)
from generation.index import ImageIndex
from vlm.model import PolychromeVLM
from vlm.specials import Special, VLMExtension, decode_with_specials

__all__ = [
    "GILLVLM",
    "IMG_TOKENS",
    "REQUEST_TEMPLATES",
    "GILLImage",
    "GILLImageEmbedder",
    "ImageMaker",
    "ImgTokenStates",
    "SceneItem",
    "compose_description",
    "gill_config_for",
    "load_scenes",
    "main",
    "request_prompt",
    "saved_dtype",
    "story_prompt",
]

IMG_TOKENS = tuple(f"[IMG{i}]" for i in range(NUM_IMG_TOKENS))
TENSOR_FILE = "gill"  # <checkpoint>/gill.safetensors beside vlm.safetensors
# How an image request is phrased in training and by the Assistant's "generate:" / "retrieve:"
# prefixes ({} = the description, a ShapeWorld caption).
REQUEST_TEMPLATES = (
    "Show me this: {}",
    "Can you show me a picture of this? {}",
    "I would like to see this: {}",
    "Picture this: {}",
)
Source = Literal["retrieved", "generated"]


@dataclass
class GILLImage:
    """One image of a reply: where it came from and why."""

    image: Image.Image
    source: Source  # "retrieved" (from the index) or "generated" (by the decoder)
    p_generate: float  # the decision head's probability of "generate" (also when forced)
    path: str | None = None  # the retrieved file
    score: float | None = None  # cosine of the retrieved image in the retrieval space


@dataclass
class ImgTokenStates:
    """The r [IMG] tokens of B prompts after the LLM."""

    hidden: torch.Tensor  # (B, r, H) last-layer hidden states
    input_embeds: torch.Tensor  # (B, r, H) their input embeddings (the trained rows)

    @property
    def img0(self) -> torch.Tensor:
        """(B, H) the [IMG0] hidden state (retrieval and decision heads)."""
        return self.hidden[:, 0]


def gill_config_for(
    vlm: PolychromeVLM,
    decoder: DiffusionConfig | tuple[int | None, int],
    mapper: GILLMapperConfig | None = None,
    **changes: Any,
) -> GILLConfig:
    """A GILLConfig whose widths fit `vlm` (LLM hidden size, CLIP embedding width) and `decoder`
    (a DiffusionConfig, or a loaded pipeline's ``expected_embeds_shape``)."""
    hidden = int(vlm.llm.config.get_text_config().hidden_size)
    with torch.no_grad():
        size = int(vlm.pixel_values([Image.new("RGB", (8, 8))]).shape[-1])
        probe = torch.zeros(1, 3, size, size, device=vlm.device)
        clip_dim = int(vlm.clip.encode_image(probe).shape[-1])
    return GILLConfig.for_decoder(hidden, clip_dim, decoder, mapper=mapper, **changes)


class GILLImageEmbedder:
    """Images -> GILL's retrieval space (a generation.index.ImageEmbedder).

    The name holds a hash of the trained image projection and, after a slash, how images are
    read (``PREPROCESSING``), so an index is tied to the weights and the pixels it was built
    with."""

    # Images are padded to a square before CLIP (PolychromeVLM.pixel_values, session 23);
    # indexes built until then centre-cropped them. Names without "/pad" (before session 24,
    # session 23's padded ones included) are refused: the name did not say which.
    PREPROCESSING = "pad"

    def __init__(self, gill: GILLVLM, batch_size: int = 64) -> None:
        self.gill = gill
        self.batch_size = batch_size
        proj = gill.heads.retrieval.image_proj
        digest = hashlib.sha256()
        for t in (proj.weight, proj.bias):
            digest.update(t.detach().float().cpu().numpy().tobytes())
        self.name = f"gill-retrieval@{digest.hexdigest()[:12]}/{self.PREPROCESSING}"
        self.dim = int(proj.out_features)

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            clip = self.gill.clip_image_embeds(images[start : start + self.batch_size])
            out.append(self.gill.heads.retrieval.embed_images(clip).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


class GILLVLM(VLMExtension):
    """A PolychromeVLM with GILL's [IMG] tokens and heads (module docstring)."""

    TENSOR_FILE = TENSOR_FILE
    OWN_TOKENS = IMG_TOKENS
    CONFIG = GILLConfig
    config: GILLConfig

    def __init__(self, vlm: PolychromeVLM, config: GILLConfig) -> None:
        super().__init__()
        hidden = int(vlm.llm.config.get_text_config().hidden_size)
        if config.llm_dim != hidden:
            raise ValueError(
                f"config.llm_dim is {config.llm_dim}; the VLM's LLM has hidden size {hidden}"
            )
        if not 1 <= config.num_img_tokens <= len(IMG_TOKENS):
            raise ValueError(
                f"num_img_tokens must be in [1, {len(IMG_TOKENS)}], received "
                f"{config.num_img_tokens}"
            )
        self.vlm = vlm
        self.config = config
        self.img_tokens = list(IMG_TOKENS[: config.num_img_tokens])
        # Tokens added to `vlm` after this point would replace added_embeddings and drop the
        # gradient hook below: GILL's tokens are the last ones a GILLVLM's core gets.
        self.img_ids = vlm.add_tokens(self.img_tokens)
        self.own_tokens = self.img_tokens
        # the VLM core stays as it was trained (an image LoRA left trainable would get no
        # gradient here and stall DDP's reduction)
        vlm.freeze_core()
        rows = [vlm.config.added_tokens.index(t) for t in self.img_tokens]
        keep = torch.zeros(len(vlm.added_ids), 1)
        keep[rows] = 1.0
        self.register_buffer("_row_mask", keep, persistent=False)  # (n_added, 1)
        vlm.added_embeddings.register_hook(lambda g: g * self._row_mask.to(g.dtype))
        self.heads = build_gill(config)
        self.img_out = nn.Parameter(torch.zeros(hidden))  # the [IMG0] row beside the LM head
        self.img_bias = nn.Parameter(torch.zeros(()))
        self.to(vlm.device)
        self.tokens_processed = 0  # tokens the LLM has read (inputs of every forward)

    def train(self, mode: bool = True) -> GILLVLM:
        super().train(mode)
        self.vlm.train(mode)
        self.vlm.projector.eval()  # frozen here
        return self

    @torch.no_grad()
    def renormalise_img_rows(self) -> None:
        """GILL's step after every optimizer step (its main.py, "Normalize trainable
        embeddings"): the [IMG] input rows scaled by one factor so that their mean norm is the
        mean norm of the LLM's frozen vocabulary rows; their directions are left as trained."""
        rows = cast(torch.Tensor, self._row_mask)[:, 0].bool()
        emb = self.vlm.added_embeddings
        frozen = cast(torch.Tensor, self.vlm.llm.get_input_embeddings().weight)
        target = frozen.detach().float().norm(dim=-1).mean()
        current = emb[rows].float().norm(dim=-1).mean().clamp_min(1e-12)
        emb[rows] = (emb[rows].float() * (target / current)).to(emb.dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The added rows (only the [IMG] rows get a gradient), the [IMG0] output row, the heads."""
        params = [self.vlm.added_embeddings, self.img_out, self.img_bias]
        return params + list(self.heads.parameters())

    # -- saving ---------------------------------------------------------------------------------

    def gill_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        state["img_out"] = self.img_out.data
        state["img_bias"] = self.img_bias.data
        return state

    def load_gill_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        own = self.gill_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{what} does not fit this GILL model: missing keys {missing[:10]}, unexpected "
                f"keys {unexpected[:10]}"
            )
        heads = {k.removeprefix("heads."): v for k, v in state.items() if k.startswith("heads.")}
        load_state_strict(self.heads, heads, what=what)
        for name in ("img_out", "img_bias"):
            target = getattr(self, name)
            if target.shape != state[name].shape:
                raise CheckpointError(
                    f"{what}: {name} expected shape {tuple(target.shape)}, received "
                    f"{tuple(state[name].shape)}"
                )
            target.data.copy_(state[name])

    extension_state_dict = gill_state_dict
    load_extension_state = load_gill_state

    # -- the passes -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """V: rows of the frozen LM head; index V of `decision_logits` is [IMG0]."""
        return int(cast(torch.Tensor, self.vlm.llm.get_output_embeddings().weight).shape[0])

    def decision_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (..., V + 1) logits: the LM head's, then [IMG0]'s."""
        vocab = self.vlm.llm.get_output_embeddings()(hidden).float()
        return torch.cat([vocab, self.img_logit(hidden)[..., None]], -1)

    def img_logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (...) logits of the [IMG0] output row."""
        return hidden.float() @ self.img_out + self.img_bias

    def img_pass(
        self, kv_mask: torch.Tensor, cache: DynamicCache
    ) -> tuple[ImgTokenStates, torch.Tensor]:
        """[IMG0..r-1] appended to every row of the cache in one forward pass (they stay in it).

        kv_mask: (B, T) the cache's attention mask. Returns the tokens' states and the new
        (B, T + r) mask."""
        b, r = kv_mask.shape[0], len(self.img_ids)
        ids = torch.tensor(self.img_ids, device=self.vlm.device).expand(b, r)
        embeds = self.vlm.embed(ids)  # (B, r, H), the trained rows
        mask = torch.cat([kv_mask, torch.ones_like(kv_mask[:, :1]).expand(b, r)], 1)
        positions = kv_mask.sum(-1, keepdim=True) + torch.arange(r, device=kv_mask.device)
        out = self._forward(embeds, attention_mask=mask, position_ids=positions, cache=cache)
        return ImgTokenStates(out.last_hidden_state, embeds), mask

    def clip_image_embeds(self, images: Sequence[Any]) -> torch.Tensor:
        """Images of any kind -> (N, E_clip) unit-norm CLIP image embeddings (frozen CLIP)."""
        pixels = self.vlm.pixel_values(images).to(self.vlm.device)
        with torch.no_grad():
            return self.vlm.clip.encode_image(pixels, normalize=True).float()

    def prompt_embeds(self, states: ImgTokenStates) -> torch.Tensor:
        """(B, L, D): the mapper's conditioning for the diffusion decoder."""
        return cast(torch.Tensor, self.heads.mapper(states.hidden.float(), states.input_embeds))

    def retrieval_queries(self, states: ImgTokenStates) -> torch.Tensor:
        """(B, E_ret) unit-norm queries in the retrieval space."""
        return self.heads.retrieval.embed_text(states.img0.float())

    def p_generate(self, states: ImgTokenStates) -> torch.Tensor:
        """(B,) the decision head's probability of "generate" (its dropout off)."""
        was = self.heads.decision.training
        self.heads.decision.eval()
        try:
            return torch.softmax(self.heads.decision(states.img0.float()), -1)[:, GENERATE]
        finally:
            self.heads.decision.train(was)

    def _batch(
        self, prompts: Sequence[Sequence[dict[str, Any]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Left-padded prompts with the generation prompt, and their visual tokens (or None)."""
        enc = self.vlm.left_padded(prompts)
        images = [im for p in prompts for m in p for im in (m.get("images") or ())]
        visual = None
        if images:
            with torch.no_grad():
                visual = self.vlm.encode_images(self.vlm.pixel_values(images))
        return enc["input_ids"], enc["attention_mask"], visual

    def request_states(
        self, prompts: Sequence[Sequence[dict[str, Any]]]
    ) -> tuple[torch.Tensor, ImgTokenStates]:
        """Each prompt's reply forced to open with [IMG0..r-1]: (the last prompt hidden (B, H),
        the [IMG] states). The prompt is read without gradient (nothing in it trains); the [IMG]
        tokens with it, when grad is enabled."""
        ids, attn, visual = self._batch(prompts)
        with torch.no_grad():
            last, cache = self.prefix(ids, attn, visual)
        states, _ = self.img_pass(attn.to(self.vlm.device), cache)
        return last, states

    # -- training -------------------------------------------------------------------------------

    def caption_loss(
        self, captions: Sequence[Sequence[dict[str, Any]]]
    ) -> tuple[torch.Tensor, int]:
        """The captioning pass: conversations [image + question -> caption]; CE over V + [IMG0]
        on the reply tokens, and how many tokens that mean is over. The VLM core is frozen, so
        the gradient reaches only the [IMG0] output row: [IMG0] must not fire inside ordinary
        text."""
        device = self.vlm.device
        batch = self.vlm.collate(captions)
        with torch.no_grad():
            pixels = batch.get("pixel_values")
            feats = self.vlm.encode_images(pixels) if pixels is not None else None
            embeds = self.vlm.embed(batch["input_ids"].to(device), feats)
            with self.vlm.image_lora(self.vlm.holds_images(batch["input_ids"])):
                hidden = self.vlm.llm.base_model(
                    inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device)
                ).last_hidden_state
        targets = batch["labels"][:, 1:].to(device)
        keep = targets != -100
        loss = F.cross_entropy(self.decision_logits(hidden[:, :-1][keep]), targets[keep])
        return loss, int(keep.sum())

    def training_losses(
        self,
        captions: Sequence[Sequence[dict[str, Any]]],
        requests: Sequence[Sequence[dict[str, Any]]],
        decoder_targets: torch.Tensor,
        image_embeds: torch.Tensor,
        decision_labels: torch.Tensor,
        others: Sequence[Sequence[dict[str, Any]]] = (),
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The paper's three losses, and the decision head's, on one batch.

        captions: conversations [image + question -> caption] (the captioning pass).
        requests: B prompts asking for an image; each reply is [IMG0..r-1].
        decoder_targets: (B, L, D) the frozen decoder's own encoding of each request's caption.
        image_embeds: (N, E_clip) CLIP embeddings of the images the first N requests describe
            (N <= B; requests without an image in the batch, N..B-1, get no retrieval loss).
        decision_labels: (B,) RETRIEVE / GENERATE for each request.
        others: prompts the LLM answers in text (no image request); their emission target is the
            bare LLM's own first token, so [IMG0] learns not to fire on them (STAMP's negatives).

        gather: data parallel (train.common.DataParallel.gather): concatenates every process's
            rows of a tensor, gradient included. Each process then passes its slice of the global
            batch (the same number of requests, images and others on each), the InfoNCE runs over
            the gathered embeddings (the global batch's negatives), and the caption CE is weighted
            by this slice's share of the batch's reply tokens, so that the average of the
            processes' gradients (DDP's) is the gradient of one process on the whole batch.

        Returns {"loss", "caption", "emit", "retrieval", "generation", "decision"} (each with its
        graph): loss = caption + emit + retrieval + generation + decision (train.gill's docstring
        says why these weights). With `gather`, the mean of each over the processes is the
        one-process figure.
        """
        b = len(requests)
        n_img = int(image_embeds.shape[0])
        least = 1 if gather is not None else 2  # InfoNCE's negatives: gathered, or in this batch
        shapes_ok = decoder_targets.shape[0] == b and decision_labels.shape == (b,)
        if not shapes_ok or not least <= n_img <= b:
            raise ValueError(
                f"expected {b} decoder targets and decision labels and {least}..{b} image "
                f"embeddings for {b} requests, received {tuple(decoder_targets.shape)}, "
                f"{tuple(decision_labels.shape)}, {tuple(image_embeds.shape)}"
            )
        device = self.vlm.device
        caption, n_tokens = self.caption_loss(captions)
        if gather is not None:  # weight by this slice's share of the global batch's tokens
            counts = gather(torch.tensor([float(n_tokens)], device=device))
            caption = caption * (n_tokens * counts.numel() / max(float(counts.sum()), 1.0))
        # 2. requests -> [IMG0]: emitting it (CE, the paper's 0.5 x CE of its retrieval and its
        # generation passes, which read the same tokens here: one pass serves both) ...
        last, states = self.request_states(requests)
        emit_target = torch.full((b,), self.vocab_size, dtype=torch.long, device=device)
        emit_logits = self.decision_logits(last)  # (B, V + 1)
        if others:
            ids, attn, visual = self._batch(others)
            with torch.no_grad():
                other_last, _ = self.prefix(ids, attn, visual)
            other_logits = self.decision_logits(other_last)
            own = other_logits[:, : self.vocab_size].argmax(-1).detach()
            emit_logits = torch.cat([emit_logits, other_logits])
            emit_target = torch.cat([emit_target, own])
        emit = F.cross_entropy(emit_logits, emit_target)
        # ... retrieval InfoNCE on the [IMG0] state against the described images ...
        ret = self.heads.retrieval(states.img0[:n_img].float(), image_embeds.to(device))
        text_embeds, image_embeds = ret.text_embeds, ret.image_embeds
        if gather is not None:  # in-batch negatives from every process
            text_embeds, image_embeds = gather(text_embeds), gather(image_embeds)
        retrieval = info_nce(text_embeds, image_embeds, ret.logit_scale)
        # ... generation: distance to the decoder's own encoding of the caption ...
        generation = generation_loss(self.prompt_embeds(states), decoder_targets.to(device))
        # ... and the decision head on the detached [IMG0] state (GILL trains it apart, on a
        # frozen model: it must not pull the [IMG] rows).
        decision = F.cross_entropy(
            self.heads.decision(states.img0.detach().float()), decision_labels.to(device)
        )
        loss = caption + emit + retrieval + generation + decision
        return {
            "loss": loss,
            "caption": caption,
            "emit": emit,
            "retrieval": retrieval,
            "generation": generation,
            "decision": decision,
        }

    def forward(
        self,
        captions: Sequence[Sequence[dict[str, Any]]],
        requests: Sequence[Sequence[dict[str, Any]]],
        decoder_targets: torch.Tensor,
        image_embeds: torch.Tensor,
        decision_labels: torch.Tensor,
        others: Sequence[Sequence[dict[str, Any]]] = (),
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`training_losses`, as the module's forward (what DistributedDataParallel wraps)."""
        return self.training_losses(
            captions, requests, decoder_targets, image_embeds, decision_labels, others, gather
        )

    # -- inference ------------------------------------------------------------------------------

    def image_embedder(self, batch_size: int = 64) -> GILLImageEmbedder:
        return GILLImageEmbedder(self, batch_size)

    def build_index(
        self, folder: str | os.PathLike[str], kind: Literal["exact", "ivf", "hnsw"] = "exact"
    ) -> ImageIndex:
        """An ImageIndex of every image under `folder` in this model's retrieval space."""
        embedder = self.image_embedder()
        index = ImageIndex(embedder.name, embedder.dim, kind, metadata={"gill": True})
        index.add_folder(folder, embedder, progress=False)
        return index

    @torch.inference_mode()
    def images_for(
        self,
        prompts: Sequence[Sequence[dict[str, Any]]],
        maker: ImageMaker,
        force: Source | None = None,
        seed: int = 0,
    ) -> list[GILLImage]:
        """One image per prompt, each reply forced to open with [IMG0] (a batch: one LLM pass,
        one decoder call for all the prompts that generate)."""
        _, states = self.request_states(prompts)
        return maker.make(states, force=force, seed=seed)

    @torch.inference_mode()  # per resumption, in the resuming thread (torch wraps generators)
    def stream(
        self,
        messages: Sequence[dict[str, Any]],
        maker: ImageMaker,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
        force: Source | Literal["image"] | None = None,
        back_to_back: bool = False,
    ) -> Iterator[tuple[str, GILLImage | None]]:
        """Yield (text chunk, None) as tokens come and ("", GILLImage) at each [IMG0].

        Greedy at temperature 0, else sampling. One KV cache for the whole reply; an [IMG0] and
        its 7 appended tokens count as one of the max_new_tokens steps. ``force``: the reply
        opens with [IMG0] ("image": the decision head chooses; "retrieved" / "generated": that
        source, the head not consulted). Unless ``back_to_back``, [IMG0] is masked after an image
        until the reply has written some non-blank text: the frozen LLM, reading the [IMG] tokens,
        otherwise tends to open a second image at once (docs/RESULTS.md, GILL second part)."""
        ids, attn, visual = self._batch([messages])
        last, cache = self.prefix(ids, attn, visual)
        source = None if force == "image" else force
        img = self.special(maker, seed, back_to_back, source)
        events = decode_with_specials(
            self.vlm.tokenizer,
            last,
            attn.to(self.vlm.device),
            cache,
            self.step,
            [img],
            max_new_tokens,
            vocab_logits=self.vlm.llm.get_output_embeddings(),
            temperature=temperature,
            seed=seed,
            force=None if force is None else IMG_TOKENS[0],
        )
        for event in events:
            yield event.text, event.payload

    def special(
        self,
        maker: ImageMaker,
        seed: int | None = None,
        back_to_back: bool = False,
        source: Source | None = None,
        num_inference_steps: int | None = None,
        index: ImageIndex | None = None,
        text_after: bool = True,
    ) -> Special:
        """The [IMG0] Special of decode_with_specials: its payload is a GILLImage. ``source``:
        where the image comes from when the reply was forced to open with it (None: the decision
        head chooses); ``num_inference_steps`` / ``index``: ImageMaker.make's; ``text_after``:
        False ends the reply at the image. The k-th image of the reply is drawn with seed
        ``seed + k``; without a seed, from a fresh random one per Special (per reply)."""
        base = secrets.randbelow(2**31) if seed is None else seed

        def act(
            kv: torch.Tensor, cache: DynamicCache, forced: bool, fired: int
        ) -> tuple[torch.Tensor, torch.Tensor, GILLImage]:
            states, kv = self.img_pass(kv, cache)
            image = maker.make(
                states,
                force=source if forced else None,
                seed=base + fired,
                num_inference_steps=num_inference_steps,
                index=index,
            )
            return states.hidden[:, -1], kv, image[0]

        return Special(
            IMG_TOKENS[0],
            self.img_logit,
            act,
            once_per_text=not back_to_back,
            restart_text=True,
            ends_reply=not text_after,
        )


class ImageMaker:
    """Turns [IMG] states into images: the decision head, the index, the decoder.

    index: an ImageIndex built with this model's ``image_embedder`` (None: nothing to retrieve
    from, every image is generated and the decision head is not consulted). pipe: the diffusion
    pipeline whose conditioning the mapper writes (None: every image is retrieved). At least one
    of the two."""

    def __init__(
        self,
        gill: GILLVLM,
        index: ImageIndex | None = None,
        pipe: Pipeline | None = None,
        *,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
    ) -> None:
        if index is None and pipe is None:
            raise ValueError("an ImageMaker needs an image index, a diffusion pipeline, or both")
        self.gill = gill
        self._checked: list[ImageIndex] = []  # indexes check_index accepted
        if index is not None:
            self.check_index(index)
        if pipe is not None:
            want = (gill.config.mapper.out_tokens, gill.config.mapper.out_dim)
            tokens, dim = expected_embeds_shape(pipe)
            if dim != want[1] or tokens not in (None, want[0]):
                raise ValueError(
                    f"the mapper writes prompt_embeds of shape (B, {want[0]}, {want[1]}); the "
                    f"pipeline expects (B, {tokens}, {dim})"
                )
        self.index = index
        self.pipe = pipe
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.calls = {"retrieved": 0, "generated": 0}  # batches sent to each side

    def check_index(self, index: ImageIndex) -> None:
        """IndexMismatchError unless `index` was built with this model's retrieval weights;
        ValueError when it is empty."""
        embedder = self.gill.image_embedder()
        index.check_model(embedder.name, embedder.dim)
        if len(index) == 0:
            raise ValueError("the image index is empty")
        self._checked.append(index)  # hashing the weights again per request would be waste

    @torch.inference_mode()
    def make(
        self,
        states: ImgTokenStates,
        force: Source | None = None,
        seed: int = 0,
        num_inference_steps: int | None = None,
        index: ImageIndex | None = None,
    ) -> list[GILLImage]:
        """One image per row of `states`; retrievals in one search, generations in one batch.
        ``num_inference_steps`` / ``index`` replace this maker's for this call (an index must
        have been built with this model's ``image_embedder``: ``check_index``, once per index)."""
        if index is not None and not any(index is seen for seen in self._checked):
            self.check_index(index)
        index = index if index is not None else self.index
        steps = num_inference_steps or self.num_inference_steps
        b = int(states.hidden.shape[0])
        p_gen = self.gill.p_generate(states).float().cpu()
        if force is not None:
            choice = [force] * b
        elif index is None:
            choice = ["generated"] * b
        elif self.pipe is None:
            choice = ["retrieved"] * b
        else:
            choice = ["generated" if p > 0.5 else "retrieved" for p in p_gen.tolist()]
        if "retrieved" in choice and index is None:
            raise ValueError("retrieval asked for, but this model has no image index")
        if "generated" in choice and self.pipe is None:
            raise ValueError("generation asked for, but this model has no diffusion pipeline")
        out: list[GILLImage | None] = [None] * b
        rows = [i for i, c in enumerate(choice) if c == "retrieved"]
        if rows:
            assert index is not None
            self.calls["retrieved"] += 1
            queries = self.gill.retrieval_queries(
                ImgTokenStates(states.hidden[rows], states.input_embeds[rows])
            )
            hits = index.search(queries.cpu().numpy(), 1)
            for k, i in enumerate(rows):
                path = hits.paths[k][0]
                assert path is not None
                out[i] = GILLImage(
                    load_rgb(path), "retrieved", float(p_gen[i]), path, float(hits.scores[k][0])
                )
        rows = [i for i, c in enumerate(choice) if c == "generated"]
        if rows:
            self.calls["generated"] += 1
            embeds = self.gill.prompt_embeds(
                ImgTokenStates(states.hidden[rows], states.input_embeds[rows])
            )
            images = generate(
                self.pipe,
                prompt_embeds=embeds.float(),
                seed=[seed + i for i in rows],
                num_inference_steps=steps,
                guidance_scale=self.guidance_scale,
            )
            for i, image in zip(rows, images, strict=True):
                out[i] = GILLImage(image, "generated", float(p_gen[i]))
        return [o for o in out if o is not None]


def saved_dtype(folder: str | os.PathLike[str]) -> torch.dtype:
    """The dtype a GILL checkpoint's own tensors were saved in (one tensor of its
    gill.safetensors is read)."""
    with safe_open(str(Path(folder) / f"{TENSOR_FILE}.safetensors"), "pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def request_prompt(description: str, template: int = 0) -> list[dict[str, Any]]:
    """The user turn asking for an image of `description` (REQUEST_TEMPLATES[template])."""
    return [{"role": "user", "content": REQUEST_TEMPLATES[template].format(description)}]


def story_prompt(story: Story, template: int = 0) -> list[dict[str, Any]]:
    """GILL's contextual request (data/stories.py): the four panels as described images (the user
    shows each, asking for a description; the assistant answers with its caption), then the
    request for the fifth caption (REQUEST_TEMPLATES[template])."""
    turns: list[dict[str, Any]] = []
    for image, caption in story.context:
        turns.append({"role": "user", "content": DESCRIBE_PROMPTS[0], "images": [image]})
        turns.append({"role": "assistant", "content": caption})
    return turns + request_prompt(story.last, template)


# --------------------------------------------------------------------------------------------
# ShapeWorld requests: scenes (in the index: retrieve) and novel compositions (generate)
# --------------------------------------------------------------------------------------------

# A novel composition names one or two objects in the phrasings of the decoder's training captions
# (data.shapeworld with 1-2 objects) and in relations ShapeWorld's captions do not use.
COMPOSITIONS_1 = ("A picture of a {0}.", "A {0}.", "There is one shape: a {0}.")
COMPOSITIONS_2 = (
    "A {0} and a {1}.",
    "A {0} next to a {1}.",
    "A {0} beside a {1}.",
    "A {0} together with a {1}.",
)
# Objects of compositions: the classes and colours the decoder was trained on (no unseen ones).
COMPOSE_SHAPES = tuple(s for s in SHAPES if s not in UNSEEN_SHAPES)
COMPOSE_COLOURS = tuple(c for c in COLOURS if c not in UNSEEN_COLOURS)


@dataclass
class SceneItem:
    """One ShapeWorld image: its file, its captions, the caption naming every object."""

    image_path: Path
    captions: list[str]  # all its captions
    listing: str  # the shortest caption naming every (colour, class), as eval.clip's
    objects: list[tuple[str, str]]  # (colour, class) per object


def load_scenes(
    root: str | os.PathLike[str], split: str, limit: int | None = None
) -> list[SceneItem]:
    """The images of a ShapeWorld split (the first `limit`), each with its captions."""
    paths = shapeworld_paths(root, split)
    inst = InstanceDataset.from_shapeworld(root, split)
    by_image: dict[int, list[str]] = {}
    for cap in read_coco_captions(paths["captions"]).captions:
        by_image.setdefault(cap.image_id, []).append(cap.caption)
    n = len(inst) if limit is None else min(limit, len(inst))
    items = []
    for i in range(n):
        objects = [
            (str(a.extra.get("colour")), inst.category_names[a.category_id])
            for a in inst.annotations[i]
        ]
        captions = by_image.get(inst.image_ids[i])
        if not captions:
            raise ValueError(f"{paths['captions']}: image id {inst.image_ids[i]} has no caption")
        items.append(
            SceneItem(
                inst.images_root / inst.file_names[i],
                captions,
                listing_caption(captions, objects),
                objects,
            )
        )
    return items


def scenes_from_pairs(
    image_paths: Sequence[Path], captions: Sequence[Sequence[str]]
) -> list[SceneItem]:
    """A user's captioned images (data.datasets.CaptionDataset) as training scenes: the request
    for each is its first caption (no object list: that is ShapeWorld's)."""
    return [
        SceneItem(Path(path), list(caps), caps[0], [])
        for path, caps in zip(image_paths, captions, strict=True)
    ]


def compose_description(rng: np.random.Generator) -> str:
    """A novel composition of one or two objects (half each), e.g. "A red circle next to a blue
    star." """
    n = int(rng.integers(1, 3))
    names = [
        f"{COMPOSE_COLOURS[int(rng.integers(len(COMPOSE_COLOURS)))]} "
        f"{COMPOSE_SHAPES[int(rng.integers(len(COMPOSE_SHAPES)))]}"
        for _ in range(n)
    ]
    templates = COMPOSITIONS_1 if n == 1 else COMPOSITIONS_2
    return templates[int(rng.integers(len(templates)))].format(*names)


# --------------------------------------------------------------------------------------------
# CLI: build an index in a GILL checkpoint's retrieval space
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlm.gill",
        description="Build an image index in a GILL checkpoint's retrieval space, or move a "
        "checkpoint onto another VLM core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("index", help="index every image under a folder")
    build.add_argument("--checkpoint", type=Path, required=True, help="a train.gill final/ folder")
    build.add_argument("--images", type=Path, required=True, help="folder of images (recursive)")
    build.add_argument("--out", type=Path, required=True, help="index folder to write")
    build.add_argument("--kind", choices=("exact", "ivf", "hnsw"), default="exact")
    move = sub.add_parser(
        "rebase",
        help="re-save a checkpoint on another VLM core (GILLVLM.rebase)",
        description="Re-save a GILL checkpoint on another VLM core (same LLM and CLIP): GILL's "
        "heads and [IMG] rows as trained, the new core's projector and image LoRA. What GILL "
        "computes from a text-only request is unchanged (it reads only the frozen LLM); replies "
        "to prompts with images go through the new core. An index built on the checkpoint "
        "stays valid as long as its tensors keep their dtype (--dtype auto); a cast rounds the "
        "retrieval projection, and the index must be rebuilt (vlm.gill index).",
    )
    move.add_argument("--checkpoint", type=Path, required=True, help="a GILL checkpoint folder")
    move.add_argument("--vlm", type=Path, required=True, help="the VLM core to move it onto")
    move.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    move.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16"),
        default="auto",
        help="tensors as saved (auto: the dtype of --checkpoint's own tensors)",
    )
    move.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.command == "rebase":
        if args.out.exists() and not args.overwrite:
            parser.error(f"{args.out} exists; pass --overwrite to replace it")
        try:
            core = PolychromeVLM.from_pretrained(args.vlm)
            moved = GILLVLM.rebase(args.checkpoint, core)
        except (ValueError, OSError) as err:  # CheckpointError is a ValueError
            parser.error(str(err))
        # the source's own metadata (its training history) goes with it
        meta = {
            **checkpoint_metadata(args.checkpoint),
            "rebase": {"from": str(args.checkpoint), "vlm": str(args.vlm)},
        }
        dtype = saved_dtype(args.checkpoint) if args.dtype == "auto" else getattr(torch, args.dtype)
        moved.save_pretrained(args.out, dtype=dtype, metadata=meta, overwrite=args.overwrite)
        print(f"{args.out}: {args.checkpoint} on the core {args.vlm}")
        return 0
    gill = GILLVLM.from_pretrained(args.checkpoint).eval()
    index = gill.build_index(args.images, args.kind)
    index.metadata["checkpoint"] = str(args.checkpoint.resolve())
    index.save(args.out)
    print(f"{args.out}: {len(index)} images, model {index.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
