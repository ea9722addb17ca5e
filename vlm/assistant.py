"""The Assistant: one chat turn in, a streamed reply out.

It chats with the frozen LLM and, when built on a :class:`vlm.model.PolychromeVLM`, reads images
attached to any user turn. With STAMP (:class:`vlm.stamp.StampVLM`) the model may answer a turn
that has an image with ``<seg>``: the reply then carries a mask of the conversation's last image
(``respond``; ``chat`` yields the text only). GILL's image outputs join ``Reply`` the same way.

    assistant = Assistant.from_config(PolychromeConfig.from_preset("shapes"))
    for partial in assistant.chat(history=[], message="What shapes are there?", images=[img]):
        print(partial)  # the reply so far, growing token by token
    for reply in assistant.respond([], "Segment the red circle.", images=[img]):
        reply.text, reply.masks  # masks: (H, W) bool arrays on reply.mask_image

History turns are ``{"role": ..., "content": str, "images"?: [image, ...]}``; images are paths,
bytes, PIL images or arrays (core.images.load_rgb converts them; bad ones raise ImageError, a
ValueError). When the prompt is too long, the oldest exchanges are dropped with their images.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.config import project_path
from core.images import load_rgb, paint_labels
from lm.decoding import generate_with
from lm.loading import LLMConfig, load_causal_lm
from lm.streaming import stream_generate
from vlm.config import PolychromeConfig
from vlm.model import PolychromeVLM, VLMConfig
from vlm.stamp import StampVLM

__all__ = [
    "DECODING_METHODS",
    "MAX_MESSAGE_CHARS",
    "Assistant",
    "ChatMessage",
    "Reply",
    "SamplingSettings",
]

# A message longer than this is refused with a clear error instead of being fed to the LLM.
MAX_MESSAGE_CHARS = 8000
_ROLES = ("user", "assistant", "system")

# {"role": "user" | "assistant" | "system", "content": str, "images"?: [image, ...]}
ChatMessage = dict[str, Any]
MAX_IMAGES = 8  # images in one prompt (history included) at most


# Decoding methods beside the streamed greedy / sampling default (lm.decoding); they run on
# text-only prompts and return the whole reply at once.
DECODING_METHODS = ("beam", "conditional_beam", "hidden_state_optimisation")


@dataclass
class SamplingSettings:
    """Decoding settings of one reply; temperature 0 is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int | None = None
    method: str = "default"  # "default" (streamed greedy / sampling) or one of DECODING_METHODS
    num_beams: int = 4  # beam width of the beam methods

    def __post_init__(self) -> None:
        if self.method != "default" and self.method not in DECODING_METHODS:
            raise ValueError(
                f"method must be 'default' or one of {list(DECODING_METHODS)}, received "
                f"{self.method!r}"
            )
        if not 1 <= self.num_beams <= 64:
            raise ValueError(f"num_beams must be in [1, 64], received {self.num_beams}")
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError(f"max_new_tokens must be in [1, 8192], received {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, received {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], received {self.top_p}")


@dataclass
class Reply:
    """A reply so far: its text, and the masks it made (``<seg>``), each on ``mask_image``."""

    text: str
    masks: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    mask_image: Any = None  # the conversation's last image, as the user gave it

    def painted(self) -> Image.Image | None:
        """The masks painted over their image, with a legend naming each "mask k" as the text
        does; None without masks."""
        if not self.masks:
            return None
        image = np.asarray(load_rgb(self.mask_image))
        labels = np.zeros(image.shape[:2], dtype=np.int64)
        for k, mask in enumerate(self.masks, start=1):
            labels[mask] = k
        legend = [f"mask {k}" for k in range(1, len(self.masks) + 1)]
        return paint_labels(image, labels, legend=legend)


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, received {type(text).__name__}")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValueError(
            f"{what} is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}. "
            "Shorten it or split it over several messages."
        )
    # Drop control characters other than newline and tab: they only confuse the tokenizer.
    return "".join(ch for ch in text if ch in "\n\t" or ch.isprintable())


class Assistant:
    """A chat assistant over a frozen causal LM and its chat template."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        system_prompt: str | None = None,
        max_context_tokens: int = 2048,
        default_settings: SamplingSettings | None = None,
        vlm: PolychromeVLM | None = None,
        stamp: StampVLM | None = None,
    ) -> None:
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; the Assistant needs one")
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_context_tokens = max_context_tokens
        self.default_settings = default_settings or SamplingSettings()
        if vlm is not None and (vlm.llm is not model or vlm.tokenizer is not tokenizer):
            raise ValueError("vlm must wrap the same model and tokenizer as the Assistant")
        self.vlm = vlm  # None: text only
        if stamp is not None and stamp.vlm is not vlm:
            raise ValueError("stamp must wrap the Assistant's vlm")
        self.stamp = stamp  # None: no segmentation
        if vlm is not None:
            self._lock = vlm._lock  # one generation at a time on the shared LLM
        # One generate() at a time per model: the app's queue bounds concurrency, this guards
        # direct library users who call chat from several threads.
        self._lock = threading.Lock()

    @classmethod
    def from_llm_config(cls, cfg: LLMConfig, device: str = "cpu") -> Assistant:
        model, tokenizer = load_causal_lm(cfg.source, dtype=cfg.dtype, device=device, frozen=True)
        return cls(
            model,
            tokenizer,
            system_prompt=cfg.system_prompt,
            max_context_tokens=cfg.max_context_tokens,
            default_settings=SamplingSettings(max_new_tokens=cfg.max_new_tokens),
        )

    @classmethod
    def from_config(cls, cfg: PolychromeConfig, device: str = "cpu") -> Assistant:
        """The preset's VLM (its trained checkpoint, else a random projector) as an Assistant,
        with STAMP when the preset names a STAMP checkpoint (its VLM core is then the one
        saved with it)."""
        stamp = None
        if cfg.stamp.checkpoint:
            stamp = StampVLM.from_pretrained(project_path(cfg.stamp.checkpoint), device=device)
            vlm = stamp.vlm
        elif cfg.vlm.checkpoint:
            vlm = PolychromeVLM.from_pretrained(project_path(cfg.vlm.checkpoint), device=device)
            if vlm.config.llm.source != cfg.llm.source:  # --llm override: same projector width?
                raise ValueError(
                    f"the VLM checkpoint {cfg.vlm.checkpoint} was trained on LLM "
                    f"{vlm.config.llm.source!r}, the preset asks for {cfg.llm.source!r}"
                )
        else:
            vlm_cfg = VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=cfg.vlm.projector)
            vlm = PolychromeVLM.build(vlm_cfg, device=device)
        return cls(
            vlm.llm,
            vlm.tokenizer,
            system_prompt=cfg.llm.system_prompt,
            max_context_tokens=cfg.llm.max_context_tokens,
            default_settings=SamplingSettings(max_new_tokens=cfg.llm.max_new_tokens),
            vlm=vlm,
            stamp=stamp,
        )

    def build_messages(
        self,
        history: Sequence[ChatMessage],
        message: str,
        images: Sequence[Any] | None = None,
    ) -> list[ChatMessage]:
        """The chat messages for the template: system prompt, history, then the new message."""
        messages: list[ChatMessage] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        for i, turn in enumerate(history):
            if not isinstance(turn, dict) or turn.get("role") not in _ROLES:
                raise ValueError(
                    f"history[{i}] must be a dict with role in {list(_ROLES)} and a string "
                    f"content, received {turn!r:.120}"
                )
            item: ChatMessage = {
                "role": turn["role"],
                "content": _clean(turn["content"], "history"),
            }
            if turn.get("images"):
                item["images"] = list(turn["images"])
            messages.append(item)
        last: ChatMessage = {"role": "user", "content": _clean(message, "message")}
        if images:
            last["images"] = list(images)
        messages.append(last)
        n_images = sum(len(m.get("images") or ()) for m in messages)
        if n_images and self.vlm is None:
            raise ValueError("this Assistant is text-only (no VLM): it cannot read images")
        if n_images > MAX_IMAGES:
            raise ValueError(
                f"the conversation holds {n_images} images; at most {MAX_IMAGES} are read at once"
            )
        return messages

    def _prompt(self, messages: list[ChatMessage]) -> dict[str, torch.Tensor]:
        if self.vlm is not None:
            return self.vlm.prepare(messages)
        encoded: Any = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = cast(torch.Tensor, encoded["input_ids"])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode(
        self,
        history: Sequence[ChatMessage],
        message: str,
        images: Sequence[Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The prompt batch ({"input_ids": (1, T), "attention_mask", "pixel_values"?}).

        The oldest exchanges (with their images) are dropped until the prompt fits the context.
        """
        return self._fit(history, message, images)[1]

    def _fit(
        self,
        history: Sequence[ChatMessage],
        message: str,
        images: Sequence[Any] | None = None,
    ) -> tuple[list[ChatMessage], dict[str, torch.Tensor]]:
        """(the messages that fit the context, their prompt batch); see `encode`."""
        messages = self.build_messages(history, message, images)
        first = 1 if messages[0]["role"] == "system" else 0
        while True:
            batch = self._prompt(messages)
            ids = batch["input_ids"]
            if ids.shape[1] <= self.max_context_tokens or len(messages) - first <= 1:
                break
            # Drop the oldest exchange: a user turn with the assistant turns that answer it.
            del messages[first]
            while len(messages) - first > 1 and messages[first]["role"] == "assistant":
                del messages[first]
        if ids.shape[1] > self.max_context_tokens:
            raise ValueError(
                f"the message alone is {ids.shape[1]} tokens; the context limit is "
                f"{self.max_context_tokens}"
            )
        return messages, batch

    def _decode_with(self, batch: dict[str, torch.Tensor], settings: SamplingSettings) -> str:
        """The whole reply from one of lm.decoding's methods (text-only prompts)."""
        if "pixel_values" in batch:
            raise ValueError(
                f"decoding method {settings.method!r} works on text-only conversations; with "
                "images, use the default (greedy or sampling)"
            )
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings.method in ("beam", "conditional_beam"):
            kwargs["num_beams"] = settings.num_beams
        with self._lock:
            out = generate_with(
                settings.method, self.model, batch["input_ids"].to(self.model.device), **kwargs
            )
        return cast(str, self.tokenizer.decode(out.new_tokens[0], skip_special_tokens=True))

    def chat(
        self,
        history: Sequence[ChatMessage],
        message: str,
        images: Sequence[Any] | None = None,
        settings: SamplingSettings | None = None,
    ) -> Iterator[str]:
        """Yield the reply's text so far after each decoded chunk; the last value is the whole
        reply. ``images`` belong to the new message (shown before its text, LLaVA's layout)."""
        for reply in self.respond(history, message, images, settings):
            yield reply.text

    def respond(
        self,
        history: Sequence[ChatMessage],
        message: str,
        images: Sequence[Any] | None = None,
        settings: SamplingSettings | None = None,
    ) -> Iterator[Reply]:
        """Like `chat`, with the masks: yields the Reply so far; the last one is the whole reply.

        With STAMP and an image in the conversation, the model may emit ``<seg>``: its mask (of
        the conversation's last image) is added to the reply, and ``[mask k]`` marks the place in
        the text. STAMP decodes with its own loop (greedy, or sampling at the temperature; top-p
        is not applied there).
        """
        settings = settings or self.default_settings
        messages, batch = self._fit(history, message, images)
        if settings.method != "default":
            yield Reply(self._decode_with(batch, settings))
            return
        all_images = [im for m in messages for im in (m.get("images") or ())]
        if self.stamp is not None and all_images:
            yield from self._respond_stamp(messages, all_images[-1], settings)
            return
        gen_kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens}
        if settings.temperature > 0:
            gen_kwargs.update(
                do_sample=True, temperature=settings.temperature, top_p=settings.top_p
            )
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.vlm is not None:
            chunks = self.vlm.stream(batch, gen_kwargs, seed=settings.seed)
        else:
            ids = batch["input_ids"].to(self.model.device)
            gen_kwargs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
            chunks = stream_generate(
                self.model, self.tokenizer, gen_kwargs, lock=self._lock, seed=settings.seed
            )
        reply = ""
        for chunk in chunks:
            reply += chunk
            yield Reply(reply)
        if not reply:
            yield Reply(reply)

    def _respond_stamp(
        self, messages: list[ChatMessage], image: Any, settings: SamplingSettings
    ) -> Iterator[Reply]:
        assert self.stamp is not None
        text, masks = "", []
        thr = self.stamp.config.threshold
        with self._lock:
            stream = self.stamp.stream(
                messages, settings.max_new_tokens, settings.temperature, settings.seed
            )
            for chunk, logits in stream:
                if logits is not None:
                    masks.append(logits > thr)
                    chunk = f"[mask {len(masks)}]"
                text += chunk
                yield Reply(text, list(masks), image if masks else None)
        yield Reply(text.strip(), list(masks), image if masks else None)
