"""What the extensions of the VLM core share: a base class, and one decoding loop for the tokens
that act (STAMP's ``<seg>``, GILL's ``[IMG0]``, or both at once).

``VLMExtension`` is STAMP's and GILL's base: the bare-LLM passes over one KV cache (``prefix``,
``step``, counting ``tokens_processed``) and the checkpoint layout of vlm.model.save_extension
(``save_pretrained``; ``from_pretrained``, alone or attached to a shared core).

Each extension of the VLM core gives the frozen LM head one more output row (its decision row).
The loop appends every such row's logit to the vocabulary's and picks the next token as usual
(greedy at temperature 0, else sampling). A text token is written; a special token runs its
action over the reply's KV cache (a mask pass, an image) and the reply goes on from the state the
action leaves:

    specials = [stamp_special, gill_special]         # Special objects, in logit order
    for event in decode_with_specials(tokenizer, last, kv, cache, step, specials, 64,
                                      vocab_logits=lm_head):
        event.text, event.special, event.payload     # a text chunk, or an action's result

The prompt pass (``cached_prefix``) and the one-token steps (``cached_step``) run through the bare
LLM (``llm.base_model``, no LM head) with one DynamicCache for the whole reply, so a reply that
segments and shows an image reads its prompt once. A core with an image LoRA has it on for every
pass over a cache whose prompt holds an image, as the core's own generation does; an extension's
own adapter (STAMP's) is switched on beside it only for its pass. As in the core, the switch is
per forward: on such a core, rows with and without images are batched apart.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import nn
from transformers import DynamicCache
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.checkpoint import CheckpointError
from core.config import Config
from vlm.model import PolychromeVLM, load_extension, load_extension_core, save_extension

__all__ = [
    "Special",
    "SpecialEvent",
    "VLMExtension",
    "cached_prefix",
    "cached_step",
    "decode_with_specials",
]
E = TypeVar("E", bound="VLMExtension")

# (inputs_embeds, **kwargs) -> the bare LLM's output (last_hidden_state), counting what it reads
Forward = Callable[..., Any]


def cached_prefix(
    vlm: PolychromeVLM,
    forward: Forward,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: torch.Tensor | None,
) -> tuple[torch.Tensor, DynamicCache]:
    """Left-padded prompts through the bare LLM: (last hidden (B, H), the KV cache). A cache
    whose prompts hold images is marked (``vlm.image_caches``): the forwards over it run with the
    core's image LoRA, if it has one, as the core's own generation does (and, as there, rows with
    and without images cannot share a batch on such a core: ValueError)."""
    embeds = vlm.embed(input_ids.to(vlm.device), visual)
    mask = attention_mask.to(vlm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    if vlm.holds_images(input_ids):
        vlm.image_caches.add(cache)
    out = forward(embeds, attention_mask=mask, position_ids=positions, cache=cache)
    return out.last_hidden_state[:, -1], cache


def cached_step(
    vlm: PolychromeVLM,
    forward: Forward,
    token_ids: torch.Tensor,
    kv_mask: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """One token per row (B,) after the cache, bare LLM; returns its last hidden (B, H)."""
    ids = token_ids.to(vlm.device)[:, None]
    mask = torch.cat([kv_mask, torch.ones_like(kv_mask[:, :1])], 1)
    positions = mask.sum(-1, keepdim=True) - 1
    out = forward(vlm.embed(ids), attention_mask=mask, position_ids=positions, cache=cache)
    return cast(torch.Tensor, out.last_hidden_state[:, -1])


class VLMExtension(nn.Module):
    """A model built on one PolychromeVLM that adds tokens, an output row and its own tensors.

    Subclasses set TENSOR_FILE (the checkpoint's ``<name>.safetensors`` and config key),
    OWN_TOKENS (every token the extension may add), CONFIG (its Config class) and, in __init__,
    ``vlm``, ``config``, ``own_tokens`` (the tokens this instance added) and
    ``tokens_processed = 0``; they implement extension_state_dict / load_extension_state."""

    TENSOR_FILE: ClassVar[str]
    OWN_TOKENS: ClassVar[tuple[str, ...]]
    CONFIG: ClassVar[type[Config]]
    vlm: PolychromeVLM
    config: Config
    own_tokens: Sequence[str]
    tokens_processed: int

    def extension_state_dict(self) -> dict[str, torch.Tensor]:
        """The extension's own trained tensors (what ``<TENSOR_FILE>.safetensors`` holds)."""
        raise NotImplementedError

    def load_extension_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        raise NotImplementedError

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """The VLM core's trained tensors (the extension's rows included) and the extension's;
        the frozen LLM and CLIP by their sources in the config."""
        return save_extension(
            self.vlm,
            directory,
            self.TENSOR_FILE,
            self.extension_state_dict(),
            self.config,
            dtype=dtype,
            metadata=metadata,
            overwrite=overwrite,
        )

    @classmethod
    def from_pretrained(
        cls: type[E],
        directory: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        vlm: PolychromeVLM | None = None,
    ) -> E:
        """Load a saved extension; with ``vlm``, attach it to that VLM core (the one it was
        trained on; vlm.model.load_extension) instead of building its own."""
        name = cls.TENSOR_FILE
        core, cfg, ckpt = load_extension(directory, name, cls.OWN_TOKENS, device, vlm)
        model = cls(core, cls.CONFIG.from_dict(cfg, source=f"{directory} config.{name}"))
        load_extension_core(core, ckpt, model.own_tokens, vlm is not None, what=str(directory))
        model.load_extension_state(ckpt.tensors[name], what=str(directory))
        return model

    @classmethod
    def rebase(
        cls: type[E],
        directory: str | os.PathLike[str],
        vlm: PolychromeVLM,
    ) -> E:
        """The extension saved in `directory`, moved onto another VLM core `vlm` (same LLM and
        CLIP; any projector and image LoRA): its own tensors and token rows as trained, the rest
        of the core `vlm`'s. Sound for what the extension computes from text-only prompts, which
        read no part of the core but the frozen LLM (GILL's requests); whatever reads an image
        goes through the new core untrained (STAMP's masks do: retrain STAMP instead).
        CheckpointError if the LLM or CLIP differ. `vlm` gets the extension's tokens and its
        trained parts are frozen before the saved tensors load: after an error, start again
        from a fresh core."""
        old = cls.from_pretrained(directory, device=vlm.device)
        mine, theirs = vlm.config.to_dict(), old.vlm.config.to_dict()
        differ = [k for k in ("llm", "vision") if mine[k] != theirs[k]]
        if differ:
            raise CheckpointError(
                f"{directory} was trained on another LLM or CLIP than this core's (differs in: "
                f"{', '.join(differ)}); rebasing moves an extension between projectors only"
            )
        new = cls(vlm, old.config)
        for token in new.own_tokens:
            row = old.vlm.added_embeddings[old.vlm.config.added_tokens.index(token)]
            vlm.added_embeddings.data[vlm.config.added_tokens.index(token)] = row.detach()
        new.load_extension_state(old.extension_state_dict(), what=str(directory))
        return new

    def _forward(self, embeds: torch.Tensor, cache: DynamicCache, **kwargs: Any) -> Any:
        """The bare LLM over `embeds` after `cache`; the core's image LoRA on where the cache
        holds an image (`cached_prefix`)."""
        self.tokens_processed += int(embeds.shape[0] * embeds.shape[1])
        base = self.vlm.llm.base_model
        with self.vlm.image_lora(cache in self.vlm.image_caches):
            return base(
                inputs_embeds=embeds, use_cache=True, **{cache_kwarg(type(base)): cache}, **kwargs
            )

    def prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor | None
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Left-padded prompts through the bare LLM: (last hidden (B, H), the KV cache)."""
        return cached_prefix(self.vlm, self._forward, input_ids, attention_mask, visual)

    def step(
        self, token_ids: torch.Tensor, kv_mask: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """One token per row (B,) after the cache, bare LLM; returns its last hidden (B, H)."""
        return cached_step(self.vlm, self._forward, token_ids, kv_mask, cache)


def cache_kwarg(model_class: type[nn.Module]) -> str:
    """The name a transformers model's forward takes its KV cache by: ``cache`` in recent
    transformers 5.x, ``past_key_values`` in earlier 5.x releases. The old forward would take
    ``cache=`` into its ``**kwargs`` and ignore it: the prefix would silently be left out."""
    params = inspect.signature(model_class.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(
        f"{model_class.__name__}.forward takes neither `cache` nor `past_key_values`; expected a "
        "transformers decoder"
    )


@dataclass
class Special:
    """A decision row beside the LM head and what happens when decoding picks it.

    logit: (1, H) last hidden -> (1,) logit of the row. act: (kv mask, cache, forced, fired so
    far) -> (the hidden state to decode the next token from, the new kv mask, the payload the
    loop yields); ``forced`` is True when ``force`` made it the reply's first token.
    available: False leaves the row out (its logit is -inf), e.g. ``<seg>`` without an image.
    once_per_text: after it fires, it stays masked until the reply has written non-blank text.
    restart_text: text after it is decoded as a new span (the tokens it appended are not text).
    ends_reply: the reply stops once it has acted.
    """

    name: str
    logit: Callable[[torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor, DynamicCache, bool, int], tuple[torch.Tensor, torch.Tensor, Any]]
    available: bool = True
    once_per_text: bool = False
    restart_text: bool = False
    ends_reply: bool = False


@dataclass
class SpecialEvent:
    """One yield of the loop: a text chunk (special None), or a special's payload (text "")."""

    text: str
    special: str | None = None
    payload: Any = None


def decode_with_specials(
    tokenizer: PreTrainedTokenizerBase,
    last: torch.Tensor,
    kv: torch.Tensor,
    cache: DynamicCache,
    step: Callable[[torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor],
    specials: Sequence[Special],
    max_new_tokens: int,
    *,
    vocab_logits: Callable[[torch.Tensor], torch.Tensor],
    temperature: float = 0.0,
    seed: int | None = None,
    force: str | None = None,
) -> Iterator[SpecialEvent]:
    """Decode one reply (batch of 1) from the prompt's last hidden state and its cache.

    The logits are the vocabulary's followed by one per special, in order. An action and the
    tokens it appends count as one of the max_new_tokens steps. ``force``: the name of a special
    the reply opens with, whatever the logits say. Stops at end of sequence or max_new_tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, received {max_new_tokens}")
    names = [s.name for s in specials]
    if force is not None and force not in names:
        raise ValueError(f"force must name one of the specials {names}, received {force!r}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = int(cast(int, tokenizer.eos_token_id))
    fired = dict.fromkeys(names, 0)
    blocked: set[str] = set()
    generated: list[int] = []
    emitted = ""
    vocab = -1
    for index in range(max_new_tokens):
        if index == 0 and force is not None:
            choice: int | str = force
        else:
            text_logits = vocab_logits(last)[0].float()
            vocab = text_logits.shape[-1]
            rows = [
                s.logit(last)[0].float().reshape(1)
                if s.available and s.name not in blocked
                else torch.full((1,), float("-inf"), device=text_logits.device)
                for s in specials
            ]
            logits = torch.cat([text_logits, *rows])
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1)
                token = int(torch.multinomial(probs.cpu(), 1, generator=gen))
            else:
                token = int(logits.argmax())
            choice = names[token - vocab] if token >= vocab else token
        if choice == eos:
            break
        if isinstance(choice, str):
            special = specials[names.index(choice)]
            last, kv, payload = special.act(
                kv, cache, index == 0 and force == choice, fired[choice]
            )
            fired[choice] += 1
            if special.once_per_text:
                blocked.add(choice)
            if special.restart_text:
                generated, emitted = [], ""
            yield SpecialEvent("", choice, payload)
            if special.ends_reply:
                break
            continue
        generated.append(choice)
        text = str(tokenizer.decode(generated, skip_special_tokens=True))
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            chunk = text[len(emitted) :]
            emitted = text
            if chunk.strip():
                blocked.clear()
            yield SpecialEvent(chunk)
        last = step(torch.tensor([choice]), kv, cache)
        kv = torch.cat([kv, torch.ones_like(kv[:, :1])], 1)
