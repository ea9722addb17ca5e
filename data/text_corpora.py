"""Offline real-text corpora for the embedding methods: Python's own pydoc topics as passages.

    from data.text_corpora import pydoc_passages
    passages = pydoc_passages()          # ~600 passages from the stdlib's 79 pydoc topics
    passages[0].title, passages[0].query, passages[0].text

The stdlib ships the text of the language reference's topics (``pydoc_data.topics``, what
``help("assert")`` prints) with every Python, so retrieval figures need no download. Each topic is
split at its section headings (a title line underlined with ``*``, ``=`` or ``-``); a section gives
one passage when its body holds at least ``min_chars`` characters. Two queries per passage:

- ``title``: the section heading ("The assert statement"), a short keyword query;
- ``query``: the body's first sentence, which is removed from ``text`` so that the query never
  appears verbatim in its passage.

The corpus is the same for a given Python minor version (the topics are regenerated per release);
figures say which Python made them.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

__all__ = ["Passage", "pydoc_passages", "python_version"]

_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+(?=[A-Z\"'(])")


@dataclass(frozen=True)
class Passage:
    """One section of a pydoc topic."""

    topic: str  # the pydoc key, e.g. "assert"
    title: str  # the section heading
    query: str  # the section's first sentence (removed from ``text``)
    text: str  # the rest of the section, whitespace collapsed


def python_version() -> str:
    """The Python version whose pydoc topics the corpus comes from (e.g. "3.11")."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _sections(doc: str) -> list[tuple[str, str]]:
    """(heading, body) pairs: a heading is a line followed by an underline of the same length."""
    lines = doc.splitlines()
    heads = [
        i
        for i in range(len(lines) - 1)
        if lines[i].strip() and _UNDERLINE.match(lines[i + 1]) and len(lines[i + 1].strip()) >= 3
    ]
    out = []
    for k, i in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        out.append((lines[i].strip(), "\n".join(lines[i + 2 : end])))
    return out


def _collapse(text: str) -> str:
    return " ".join(text.split())


def pydoc_passages(min_chars: int = 200) -> list[Passage]:
    """Every section of every pydoc topic with a body of at least ``min_chars`` characters, in
    topic order. Sections whose first sentence is also their whole body are skipped."""
    from pydoc_data.topics import topics

    passages = []
    for topic in sorted(topics):
        for title, body in _sections(topics[topic]):
            flat = _collapse(body)
            if len(flat) < min_chars:
                continue
            parts = _SENTENCE_END.split(flat, maxsplit=1)
            if len(parts) < 2 or len(parts[1]) < min_chars // 2:
                continue
            passages.append(Passage(topic, title, parts[0], parts[1]))
    return passages
