"""Text corpora for language-model pretraining, tokenizers for them, and packing.

    corpus = pydoc_corpus()                                  # real English, stdlib, offline
    corpus = text_files_corpus("notes/*.txt", per_line=True) # your own text
    corpus = Corpus.from_documents("captions", train_docs, heldout_docs)   # e.g. ShapeWorld
    tokenizer = train_bpe_tokenizer(corpus.train, vocab_size=8192)
    rows = pack_documents(tokenize_documents(tokenizer, corpus.train), seq_len=256,
                          eos_token_id=tokenizer.eos_token_id)                  # (N, 256)

A corpus is two lists of strings, train and held-out, split deterministically:

- ``pydoc_corpus``: the stdlib's ``pydoc_data.topics.topics`` (the Python reference manual's help
  topics, ~465 K characters, one document per topic). Held out: the topics whose index in the
  sorted key list is 5 mod 10. On Python 3.11 (79 topics) these are the 8 topics
  attribute-access, booleans, customization, for, integers, power, subscriptions, unary
  (~8% of the characters).
- ``text_files_corpus``: files matching a glob (sorted), one document per file or per non-empty
  line; held out: documents whose index is 9 mod 10 (every tenth).
- ShapeWorld captions: built where both ``data`` and ``lm`` are visible (train/pretrain_lm.py reads
  an exported folder or generates scenes) and handed to ``Corpus.from_documents``: ``lm`` does
  not import ``data`` (DESIGN.md layer contract).

``pydoc_corpus`` and ``text_files_corpus`` drop from the training side every document that
shares a run of ``LEAK_WORDS`` (12) words with a held-out one (``drop_overlapping``). Pydoc's
topics repeat each other: "customization" and "attribute-access" are sections of
"specialnames", "for" of "compound"; before session 9 78% of the held-out 12-word runs were also
in the training topics, and a model trained on them (MaskLLM, docs/RESULTS.md) scored a held-out
perplexity a third of the dense model's. On Python 3.11 the dropped training topics are
compound, floating, specialnames and while (16 K of 60 K words).

Packing: every document's tokens are followed by EOS (the document separator), all documents are
concatenated in order and cut into rows of seq_len tokens; the tail shorter than a row is dropped.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BPE_SPECIAL_TOKENS",
    "Corpus",
    "documents_digest",
    "drop_overlapping",
    "drop_overlapping_parts",
    "pack_documents",
    "pydoc_corpus",
    "text_files_corpus",
    "tokenize_documents",
    "train_bpe_tokenizer",
]

PYDOC_HELDOUT_MOD = (10, 5)  # sorted topic index i is held out when i % 10 == 5
LEAK_WORDS = 12  # a training document sharing this many consecutive words with a held-out one
FILES_HELDOUT_MOD = (10, 9)
# The BPE tokenizer's special tokens: one token is BOS, EOS and document separator (GPT-2 style).
BPE_SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "mask_token": "<mask>"}


@dataclass
class Corpus:
    """Documents for training and for held-out evaluation."""

    name: str
    train: list[str]
    heldout: list[str]
    description: dict[str, Any] = field(default_factory=dict)  # where it came from (model card)

    @classmethod
    def from_documents(
        cls, name: str, train: Sequence[str], heldout: Sequence[str], **description: Any
    ) -> Corpus:
        train, heldout = [d for d in train if d.strip()], [d for d in heldout if d.strip()]
        if not train:
            raise ValueError(f"corpus {name!r}: no non-empty training document")
        return cls(name, train, heldout, {"name": name, **description})

    def truncated(self, max_chars: int) -> Corpus:
        """The first documents up to max_chars characters per split (the last one cut)."""
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, received {max_chars}")
        return Corpus(
            self.name,
            _first_chars(self.train, max_chars),
            _first_chars(self.heldout, max_chars),
            {**self.description, "max_chars": max_chars},
        )

    def stats(self) -> dict[str, int]:
        return {
            "train_documents": len(self.train),
            "train_chars": sum(map(len, self.train)),
            "heldout_documents": len(self.heldout),
            "heldout_chars": sum(map(len, self.heldout)),
        }


def _first_chars(docs: list[str], max_chars: int) -> list[str]:
    out, used = [], 0
    for d in docs:
        if used >= max_chars:
            break
        out.append(d[: max_chars - used])
        used += len(out[-1])
    return out


def _split(keys: Sequence[Any], mod: tuple[int, int]) -> tuple[list[Any], list[Any]]:
    every, at = mod
    train = [k for i, k in enumerate(keys) if i % every != at]
    heldout = [k for i, k in enumerate(keys) if i % every == at]
    return train, heldout


def _word_runs(text: str, n: int) -> Iterator[tuple[str, ...]]:
    words = text.split()
    return (tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _heldout_runs(heldout: Sequence[str], n: int) -> set[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, received {n}")
    return {run for doc in heldout for run in _word_runs(doc, n)}


def drop_overlapping(
    train: Sequence[str], heldout: Sequence[str], n: int = LEAK_WORDS
) -> list[int]:
    """Indices of the training documents that share a run of `n` whitespace-separated words with
    any held-out document (to be dropped, so that held-out text is never trained on)."""
    held = _heldout_runs(heldout, n)
    return [i for i, doc in enumerate(train) if any(r in held for r in _word_runs(doc, n))]


def drop_overlapping_parts(
    parts: Sequence[str], heldout: Sequence[str], n: int = LEAK_WORDS
) -> list[int]:
    """Indices of the `parts` of one text (its paragraphs, in order) to drop so that the rest,
    joined by spaces, shares no run of `n` words with any held-out document. Unlike
    `drop_overlapping` on each part, it catches runs across the joins (a code example split by
    blank lines): every part a shared run touches is dropped, until none is left."""
    held = _heldout_runs(heldout, n)
    split = [part.split() for part in parts]
    dropped: set[int] = set()
    while True:
        words: list[str] = []
        owner: list[int] = []  # the part each word of the joined text comes from
        for i, part_words in enumerate(split):
            if i not in dropped:
                words += part_words
                owner += [i] * len(part_words)
        hit = {
            j
            for s in range(len(words) - n + 1)
            if tuple(words[s : s + n]) in held
            for j in owner[s : s + n]
        }
        if not hit:
            return sorted(dropped)
        dropped |= hit


def pydoc_corpus() -> Corpus:
    """The stdlib's pydoc help topics; held-out topics as the module doc lists, training topics
    that repeat held-out text dropped."""
    from pydoc_data.topics import topics

    train_keys, heldout_keys = _split(sorted(topics), PYDOC_HELDOUT_MOD)
    heldout = [topics[k] for k in heldout_keys]
    dropped = set(drop_overlapping([topics[k] for k in train_keys], heldout))
    return Corpus.from_documents(
        "pydoc",
        [topics[k] for i, k in enumerate(train_keys) if i not in dropped],
        heldout,
        source="pydoc_data.topics.topics",
        heldout_topics=heldout_keys,
        dropped_train_topics=[k for i, k in enumerate(train_keys) if i in dropped],
    )


def text_files_corpus(pattern: str, per_line: bool = False) -> Corpus:
    """UTF-8 files matching the glob `pattern` (recursive ``**`` allowed), sorted by path."""
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise FileNotFoundError(f"no file matches {pattern!r}")
    docs: list[str] = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        docs += [line for line in text.splitlines() if line.strip()] if per_line else [text]
    train, heldout = _split(docs, FILES_HELDOUT_MOD)
    dropped = set(drop_overlapping(train, heldout))
    return Corpus.from_documents(
        f"files:{pattern}",
        [d for i, d in enumerate(train) if i not in dropped],
        heldout,
        source=pattern,
        files=len(paths),
        per_line=per_line,
        dropped_train_documents=len(dropped),
    )


# ----------------------------------------------------------------------------------------------
# Tokenizers and packing


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style, no unknown tokens) trained with `tokenizers` on `texts`,
    as a transformers PreTrainedTokenizerFast with BPE_SPECIAL_TOKENS; save it with
    save_pretrained. The vocabulary holds the 256 bytes, the 3 specials, then the merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(BPE_SPECIAL_TOKENS.values())
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be >= {minimum} (bytes + specials), received {vocab_size}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    eos = BPE_SPECIAL_TOKENS["eos_token"]
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, **BPE_SPECIAL_TOKENS)


def tokenize_documents(tokenizer: Any, docs: Sequence[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens."""
    if not docs:
        return []
    ids: list[list[int]] = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return ids


def pack_documents(
    token_docs: Sequence[Sequence[int]], seq_len: int, eos_token_id: int
) -> np.ndarray:
    """Documents + EOS after each, concatenated and cut into (N, seq_len) int64 rows."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, received {seq_len}")
    stream = np.fromiter((t for doc in token_docs for t in (*doc, eos_token_id)), dtype=np.int64)
    n = stream.size // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def documents_digest(docs: Sequence[str]) -> str:
    """A short sha256 of a document list (to tell corpora apart in logs and model cards)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]
