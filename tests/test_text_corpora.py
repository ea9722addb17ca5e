"""The pydoc passage corpus: sections split at their headings, the query cut from the text."""

from __future__ import annotations

from data.text_corpora import _sections, pydoc_passages


def test_sections_split_at_underlined_headings():
    doc = "The thing\n*********\n\nIntro text.\n\nPart two\n========\n\nMore.\n"
    assert _sections(doc) == [("The thing", "\nIntro text.\n"), ("Part two", "\nMore.")]


def test_passages_hold_no_copy_of_their_query():
    passages = pydoc_passages()
    assert len(passages) > 100
    assert all(p.query not in p.text for p in passages)
    assert all(len(p.text) >= 100 for p in passages)
    assert pydoc_passages() == passages  # deterministic
    topics = {p.topic for p in passages}
    assert {"assert", "exceptions"} <= topics
