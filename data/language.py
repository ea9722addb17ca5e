"""ShapeWorld language: captions, referring expressions, QA pairs and a dialogue for a Scene.

Everything is generated from the scene's objects (visible masks, colour and shape names) and a
numpy Generator, so the same scene and seed always give the same annotations. Pure: no I/O.

Referring expressions are built from structured specs and checked by a small semantic evaluator
before they are rendered as text:

- :class:`Descriptor` (optional colour + optional class): "the red circle", "the star";
- :class:`RelationalSpec` (descriptor, relation, uniquely described anchor):
  "the circle above the green square";
- :class:`OrdinalSpec` (ordinal among the objects a descriptor matches):
  "the leftmost red shape", "the largest triangle".

:func:`denote` returns every object a listener could reasonably take a spec to mean (borderline
cases included); :func:`refers_uniquely` accepts a spec for a target only when that set is exactly
the target *and* the target satisfies the spec by a clear margin. The margins (constants below)
are chosen so that a person looking at the image would agree:

- relations use visible-mask centroids; "A left of B" holds clearly when B's centroid is more
  than ``RELATION_MIN_OFFSET`` (10%) of the image width to the right of A's and that offset is
  larger than the vertical one (both as fractions of the image size: a 45° cone). It holds
  possibly (for ambiguity) whenever the offset is positive and at least ``RELATION_CONE_RATIO``
  times the other axis's offset (a ~63° cone), so a second candidate anywhere near the relation
  makes the expression ambiguous;
- position ordinals need the runner-up ``ORDINAL_MIN_GAP`` (8%) of the image size behind;
  size ordinals need a visible-area ratio above ``ORDINAL_MIN_AREA_RATIO`` (1.3);
- 3x3-grid positions ("top left") are only asked about when the centroid is at least
  ``GRID_MARGIN`` (4%) of the image size away from the grid lines.

Objects with an empty visible mask are not in the picture and are never mentioned. Counts are
written as number words ("two", "zero"), not digits, in captions and answers alike.

Example::

    from data.language import annotate
    annotate(scene, np.random.default_rng(0))  # fills scene.captions, refs, qa, dialogues
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import numpy as np

from data.scene import (
    COLOURS,
    SHAPES,
    Dialogue,
    ExpressionType,
    QAPair,
    QuestionType,
    ReferringExpression,
    Scene,
    ShapeObject,
)

__all__ = [
    "GRID_MARGIN",
    "ORDINALS",
    "ORDINAL_MIN_AREA_RATIO",
    "ORDINAL_MIN_GAP",
    "RELATIONS",
    "RELATION_CONE_RATIO",
    "RELATION_MIN_OFFSET",
    "RELATION_PHRASES",
    "RENDER_VARIANTS",
    "Descriptor",
    "Ordinal",
    "OrdinalSpec",
    "QAItem",
    "Relation",
    "RelationalSpec",
    "SceneFacts",
    "Spec",
    "annotate",
    "denote",
    "describe_object",
    "describe_object_at",
    "grid_position",
    "join_list",
    "listing_caption",
    "make_captions",
    "make_dialogue",
    "make_qa",
    "make_refs",
    "number_word",
    "plural",
    "refers_uniquely",
    "relation_holds",
    "render_spec",
    "with_article",
]

Relation = Literal["left of", "right of", "above", "below"]
Ordinal = Literal["leftmost", "rightmost", "topmost", "bottommost", "largest", "smallest"]
RELATIONS: tuple[Relation, ...] = get_args(Relation)
ORDINALS: tuple[Ordinal, ...] = get_args(Ordinal)

RELATION_MIN_OFFSET = 0.10  # clear relation: along-axis centroid offset > 10% of the image size
RELATION_CONE_RATIO = 0.5  # possible relation: along-axis offset >= 0.5 x the other axis's offset
ORDINAL_MIN_GAP = 0.08  # position ordinal: runner-up at least 8% of the image size behind
ORDINAL_MIN_AREA_RATIO = 1.3  # size ordinal: extreme visible area / runner-up's > 1.3
GRID_MARGIN = 0.04  # position answers: centroid this far (fraction of size) from the grid lines

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------
# English helpers
# ---------------------------------------------------------------------------------------------

_NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
# Vowel-letter words that take "a" (a unicorn, a one-eyed ...); none is in today's vocabulary.
_A_BEFORE_VOWEL = ("uni", "use", "usu", "one", "eu")


def number_word(n: int) -> str:
    """English word for a count: 2 -> "two". Digits above twenty (no scene has that many)."""
    if n < 0:
        raise ValueError(f"expected a count >= 0, got {n}")
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def plural(noun: str) -> str:
    """Plural of a (last) noun: "cross" -> "crosses", "ellipse" -> "ellipses", "star" -> "stars"."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if len(noun) > 1 and noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def with_article(phrase: str) -> str:
    """Article by sound: "orange star" -> "an orange star", "red arrow" -> "a red arrow"."""
    word = phrase.lower()
    vowel_sound = word[:1] in "aeiou" and not word.startswith(_A_BEFORE_VOWEL)
    return ("an " if vowel_sound else "a ") + phrase


def join_list(items: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c" (no serial comma)."""
    if not items:
        raise ValueError("expected at least one item to join")
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _counted(n: int, phrase: str) -> str:
    """ "a red circle" for one, "two red circles" for more (pluralising the last word)."""
    if n == 1:
        return with_article(phrase)
    head, _, last = phrase.rpartition(" ")
    return f"{number_word(n)} {head + ' ' if head else ''}{plural(last)}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def describe_object(obj: ShapeObject) -> str:
    """Colour and class of an object: "red circle"."""
    return f"{obj.colour} {obj.shape}"


def grid_position(x: float, y: float, width: int, height: int, margin: float = 0.0) -> str | None:
    """Cell of the 3x3 grid holding point (x, y): "top left", "top", ..., "center", ...

    Returns None when the point lies within ``margin`` (a fraction of the image size) of a grid
    line, where a person could name either cell.
    """
    fx, fy = x / width, y / height
    for f in (fx, fy):
        if min(abs(f - 1 / 3), abs(f - 2 / 3)) < margin:
            return None
    row = "top" if fy < 1 / 3 else ("bottom" if fy >= 2 / 3 else "")
    col = "left" if fx < 1 / 3 else ("right" if fx >= 2 / 3 else "")
    return " ".join(p for p in (row, col) if p) or "center"


_PLACE_PHRASE = {"center": "in the center", "top": "at the top", "bottom": "at the bottom"}


def _place_phrase(cell: str) -> str:
    """ "top left" -> "in the top left", "top" -> "at the top", "left" -> "on the left"."""
    if cell in _PLACE_PHRASE:
        return _PLACE_PHRASE[cell]
    return f"on the {cell}" if cell in ("left", "right") else f"in the {cell}"


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """Objects by attributes: any object whose colour and class match the given ones."""

    colour: str | None = None  # one of COLOURS, or None for any colour
    shape: str | None = None  # one of SHAPES, or None for any class

    def matches(self, colour: str, shape: str) -> bool:
        """Whether an object of this colour and class fits the descriptor."""
        return (self.colour is None or self.colour == colour) and (
            self.shape is None or self.shape == shape
        )

    def text(self, noun: str = "shape") -> str:
        """ "red circle", "red shape" (``noun`` stands in for a missing class), "circle"."""
        return " ".join(w for w in (self.colour, self.shape or noun) if w)


@dataclass(frozen=True)
class RelationalSpec:
    """The object matching ``descriptor`` that lies ``relation`` the object ``anchor`` picks."""

    descriptor: Descriptor
    relation: Relation
    anchor: Descriptor  # must pick exactly one object for the spec to refer


@dataclass(frozen=True)
class OrdinalSpec:
    """The extreme (leftmost, largest, ...) object among those matching ``descriptor``."""

    ordinal: Ordinal
    descriptor: Descriptor


Spec = Descriptor | RelationalSpec | OrdinalSpec


def _target_descriptor(spec: Spec) -> Descriptor:
    return spec if isinstance(spec, Descriptor) else spec.descriptor


def _spec_type(spec: Spec) -> ExpressionType:
    if isinstance(spec, Descriptor):
        return "attribute"
    return "spatial" if isinstance(spec, RelationalSpec) else "ordinal"


# ---------------------------------------------------------------------------------------------
# Scene facts and the evaluator
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneFacts:
    """What the language sees of a scene, computed once (one pass over each mask).

    Per-object tuples are indexed like ``Scene.objects``; ``visible`` lists the objects with a
    non-empty visible mask, in paint order. Centroids and areas are those of the visible masks
    (equal to ``ShapeObject.centroid`` and ``ShapeObject.area``).
    """

    width: int
    height: int
    background: str
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    xs: tuple[float, ...]  # visible-mask centroid x, pixels
    ys: tuple[float, ...]  # visible-mask centroid y, pixels (down)
    areas: tuple[int, ...]  # visible pixels
    visible: tuple[int, ...]

    @classmethod
    def from_scene(cls, scene: Scene) -> SceneFacts:
        """Centroids and areas from row/column sums of every (H, W) visible mask."""
        h, w = scene.height, scene.width
        cols_idx, rows_idx = np.arange(w), np.arange(h)
        xs, ys, areas = [], [], []
        for i, obj in enumerate(scene.objects):
            mask = np.asarray(obj.mask)
            if mask.shape != (h, w) or mask.dtype != np.bool_:
                raise ValueError(
                    f"object {i}: expected a ({h}, {w}) bool mask like the image, "
                    f"got {mask.shape} {mask.dtype}"
                )
            u8 = mask.view(np.uint8)
            col = u8.sum(axis=0, dtype=np.int64)  # (W,)
            area = int(col.sum())
            if area:
                xs.append(float(col @ cols_idx) / area)
                ys.append(float(u8.sum(axis=1, dtype=np.int64) @ rows_idx) / area)
            else:
                xs.append(float(obj.center[0]))
                ys.append(float(obj.center[1]))
            areas.append(area)
        return cls(
            width=w,
            height=h,
            background=scene.background,
            colours=tuple(o.colour for o in scene.objects),
            shapes=tuple(o.shape for o in scene.objects),
            xs=tuple(xs),
            ys=tuple(ys),
            areas=tuple(areas),
            visible=tuple(i for i, a in enumerate(areas) if a > 0),
        )


def relation_holds(facts: SceneFacts, a: int, b: int, relation: Relation, *, clear: bool) -> bool:
    """Whether object ``a`` lies ``relation`` object ``b`` (visible centroids, x right, y down).

    ``clear=True``: the along-axis offset exceeds ``RELATION_MIN_OFFSET`` of the image size and
    the offset along the other axis (45° cone). ``clear=False``: it is merely plausible (positive
    and at least ``RELATION_CONE_RATIO`` times the other offset), used to detect ambiguity.
    """
    dx = (facts.xs[b] - facts.xs[a]) / facts.width  # > 0: a is left of b
    dy = (facts.ys[b] - facts.ys[a]) / facts.height  # > 0: a is above b
    if relation == "left of":
        along, across = dx, abs(dy)
    elif relation == "right of":
        along, across = -dx, abs(dy)
    elif relation == "above":
        along, across = dy, abs(dx)
    elif relation == "below":
        along, across = -dy, abs(dx)
    else:
        raise ValueError(f"unknown relation {relation!r}; valid: {list(RELATIONS)}")
    if clear:
        return along > RELATION_MIN_OFFSET and along > across
    return along > 0 and along >= RELATION_CONE_RATIO * across


def _ordinal_key(facts: SceneFacts, ordinal: Ordinal) -> Callable[[int], float]:
    """Smaller is more extreme; position keys are fractions of the image size."""
    if ordinal == "leftmost":
        return lambda i: facts.xs[i] / facts.width
    if ordinal == "rightmost":
        return lambda i: -facts.xs[i] / facts.width
    if ordinal == "topmost":
        return lambda i: facts.ys[i] / facts.height
    if ordinal == "bottommost":
        return lambda i: -facts.ys[i] / facts.height
    if ordinal == "largest":
        return lambda i: -facts.areas[i]
    if ordinal == "smallest":
        return lambda i: facts.areas[i]
    raise ValueError(f"unknown ordinal {ordinal!r}; valid: {list(ORDINALS)}")


def _near_extreme(facts: SceneFacts, ordinal: Ordinal, key: float, best: float) -> bool:
    """Whether an object with ``key`` is too close to the extreme ``best`` to tell apart."""
    if ordinal == "largest":  # keys are -area
        return -key * ORDINAL_MIN_AREA_RATIO >= -best
    if ordinal == "smallest":
        return key <= best * ORDINAL_MIN_AREA_RATIO
    return key - best <= ORDINAL_MIN_GAP


def denote(spec: Spec, facts: SceneFacts) -> frozenset[int]:
    """Indices of every visible object a listener could reasonably take ``spec`` to mean.

    Generous on purpose: an anchor that is not unique stands for each object it matches, a
    relation counts when merely plausible, and an ordinal denotes every object within the margin
    of the extreme. A spec refers unambiguously only when this set has one element.
    """
    if isinstance(spec, Descriptor):
        return frozenset(
            i for i in facts.visible if spec.matches(facts.colours[i], facts.shapes[i])
        )
    members = denote(spec.descriptor, facts)
    if isinstance(spec, RelationalSpec):
        anchors = denote(spec.anchor, facts)
        return frozenset(
            i
            for i in members
            if any(
                a != i and relation_holds(facts, i, a, spec.relation, clear=False) for a in anchors
            )
        )
    if not members:
        return frozenset()
    key = _ordinal_key(facts, spec.ordinal)
    best = min(key(i) for i in members)
    return frozenset(i for i in members if _near_extreme(facts, spec.ordinal, key(i), best))


def refers_uniquely(spec: Spec, facts: SceneFacts, target: int) -> bool:
    """Whether ``spec`` picks exactly ``target``: it denotes only the target, and (relations) its
    anchor is unique and the relation holds by the clear margin."""
    if denote(spec, facts) != {target}:
        return False
    if isinstance(spec, RelationalSpec):
        anchors = denote(spec.anchor, facts)
        if len(anchors) != 1:
            return False
        (anchor,) = anchors
        return relation_holds(facts, target, anchor, spec.relation, clear=True)
    return True


# ---------------------------------------------------------------------------------------------
# Rendering specs as text
# ---------------------------------------------------------------------------------------------

_RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
# every phrase the captions and expressions use for a relation (a scorer reading them, eval.vlm)
RELATION_PHRASES: tuple[str, ...] = tuple(w for ws in _RELATION_WORDS.values() for w in ws)
# "{}" is the descriptor text.
_ORDINAL_FORMS: dict[str, tuple[str, ...]] = {
    "leftmost": ("the leftmost {}", "the {} furthest to the left", "the {} on the far left"),
    "rightmost": ("the rightmost {}", "the {} furthest to the right", "the {} on the far right"),
    "topmost": ("the topmost {}", "the highest {}", "the {} nearest the top"),
    "bottommost": ("the bottommost {}", "the lowest {}", "the {} nearest the bottom"),
    "largest": ("the largest {}", "the biggest {}"),
    "smallest": ("the smallest {}",),
}
RENDER_VARIANTS = 12  # pass variant in range(RENDER_VARIANTS) to cover every phrasing


def render_spec(spec: Spec, variant: int = 0, noun: str = "shape") -> str:
    """Text of a spec; ``variant`` picks one of the equivalent phrasings (wrapping around).

    Variant 0 is the plain form: "the blue star", "the circle above the green square",
    "the leftmost red shape", "the largest triangle". ``noun`` names a class-less descriptor
    ("the blue object" with noun="object").
    """
    if isinstance(spec, Descriptor):
        text = spec.text(noun)
        forms: tuple[str, ...] = ("the " + text, "the only " + text)
        if spec.colour is not None and spec.shape is not None:
            forms += (f"the {spec.shape} that is {spec.colour}",)
        return forms[variant % len(forms)]
    if isinstance(spec, RelationalSpec):
        words = _RELATION_WORDS[spec.relation]
        rel = words[variant % len(words)]
        that = "that is " if (variant // len(words)) % 2 else ""
        return f"the {spec.descriptor.text(noun)} {that}{rel} the {spec.anchor.text(noun)}"
    forms = _ORDINAL_FORMS[spec.ordinal]
    return forms[variant % len(forms)].format(spec.descriptor.text(noun))


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: Sequence[_T]) -> _T:
    return items[int(rng.integers(len(items)))]


def _shuffled(rng: np.random.Generator, items: Sequence[_T]) -> list[_T]:
    return [items[int(k)] for k in rng.permutation(len(items))]


class _Candidates:
    """Valid specs per (target, expression type), computed on demand and cached."""

    def __init__(self, facts: SceneFacts) -> None:
        self.facts = facts
        self._cache: dict[tuple[int, str], list[Spec]] = {}
        self._unique: dict[int, list[Descriptor]] = {}

    def descriptors(self, i: int) -> list[Descriptor]:
        c, s = self.facts.colours[i], self.facts.shapes[i]
        return [Descriptor(c, s), Descriptor(c, None), Descriptor(None, s)]

    def unique_descriptors(self, i: int) -> list[Descriptor]:
        if i not in self._unique:
            self._unique[i] = [
                d for d in self.descriptors(i) if denote(d, self.facts) == frozenset((i,))
            ]
        return self._unique[i]

    def get(self, i: int, kind: ExpressionType) -> list[Spec]:
        key = (i, kind)
        if key not in self._cache:
            self._cache[key] = self._compute(i, kind)
        return self._cache[key]

    def _compute(self, i: int, kind: ExpressionType) -> list[Spec]:
        facts = self.facts
        if kind == "attribute":
            return list(self.unique_descriptors(i))
        out: list[Spec] = []
        descs = [*self.descriptors(i), Descriptor()]
        if kind == "spatial":
            for j in facts.visible:
                anchors = self.unique_descriptors(j) if j != i else []
                if not anchors:
                    continue
                for rel in RELATIONS:
                    if not relation_holds(facts, i, j, rel, clear=True):
                        continue
                    for d in descs:
                        # Every unique anchor description denotes the same object: test one.
                        if refers_uniquely(RelationalSpec(d, rel, anchors[0]), facts, i):
                            out.extend(RelationalSpec(d, rel, a) for a in anchors)
            return out
        for d in descs:
            if len(denote(d, facts)) < 2:  # "the leftmost circle" needs another circle
                continue
            for ordinal in ORDINALS:
                spec = OrdinalSpec(ordinal, d)
                if refers_uniquely(spec, facts, i):
                    out.append(spec)
        return out


def _has_distractor(facts: SceneFacts, i: int) -> bool:
    return any(
        j != i and (facts.colours[j] == facts.colours[i] or facts.shapes[j] == facts.shapes[i])
        for j in facts.visible
    )


def _choose_spec(rng: np.random.Generator, specs: list[Spec], facts: SceneFacts) -> Spec:
    """Random valid spec, preferring relations whose descriptor alone would be ambiguous."""
    needed = [
        s for s in specs if isinstance(s, RelationalSpec) and len(denote(s.descriptor, facts)) > 1
    ]
    return _pick(rng, needed or specs)


_REF_TYPES: tuple[ExpressionType, ...] = ("attribute", "spatial", "ordinal")


def make_refs(facts: SceneFacts, rng: np.random.Generator) -> list[ReferringExpression]:
    """2-4 referring expressions (fewer only when the scene cannot support them).

    Types rotate through a shuffled cycle so that all three are common; targets sharing a class
    or colour with another object (a distractor) are preferred, and targets without one are used
    only to reach two expressions. Relations prefer descriptors that alone would be ambiguous.
    """
    return _make_refs(facts, rng, _Candidates(facts))


def _make_refs(
    facts: SceneFacts, rng: np.random.Generator, cands: _Candidates
) -> list[ReferringExpression]:
    n_refs = int(rng.integers(2, 5))
    cycle = _shuffled(rng, _REF_TYPES)
    distracted = {i: _has_distractor(facts, i) for i in facts.visible}
    order = _shuffled(rng, facts.visible)
    refs: list[ReferringExpression] = []
    used: set[tuple[int, str]] = set()
    used_targets: set[int] = set()
    for slot in range(n_refs):
        kinds = [cycle[(slot + k) % 3] for k in range(3)]
        found: tuple[int, Spec] | None = None
        for allow_plain in (False, True):
            if allow_plain and len(refs) >= 2:
                break
            for kind in kinds:
                targets = [i for i in order if (distracted[i] or allow_plain)]
                targets.sort(key=lambda i: i in used_targets)  # stable: fresh targets first
                for i in targets:
                    if (i, kind) in used:
                        continue
                    specs = cands.get(i, kind)
                    if specs:
                        found = (i, _choose_spec(rng, specs, facts))
                        break
                if found:
                    break
            if found:
                break
        if found is None:
            break
        i, spec = found
        kind = _spec_type(spec)
        used.add((i, kind))
        used_targets.add(i)
        text = render_spec(spec, int(rng.integers(RENDER_VARIANTS)))
        refs.append(ReferringExpression(text, i, kind, distracted[i]))
    return refs


def _groups(facts: SceneFacts, key: Callable[[int], str]) -> list[tuple[str, int]]:
    """(key, count) over visible objects, in order of first appearance."""
    counts: dict[str, int] = {}
    for i in facts.visible:
        counts[key(i)] = counts.get(key(i), 0) + 1
    return list(counts.items())


def _listing(facts: SceneFacts, rng: np.random.Generator) -> str:
    """ "a red circle, two blue stars and a white ring" (groups in random order)."""
    groups = _groups(facts, lambda i: f"{facts.colours[i]} {facts.shapes[i]}")
    return join_list([_counted(n, g) for g, n in _shuffled(rng, groups)])


def _there_is(items: list[tuple[str, int]]) -> str:
    """ "There are two circles and a star": the verb agrees with the first item."""
    verb = "is" if items[0][1] == 1 else "are"
    return f"there {verb} " + join_list([_counted(n, g) for g, n in items])


def make_captions(facts: SceneFacts, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` (default 5, at most 6) true captions from distinct templates.

    Templates: total count with listing, the colour-and-class listing, per-class counts,
    per-colour counts, a spatial relation (when one holds clearly) and the background kind.
    """
    bg = f"{facts.background} background"
    total = len(facts.visible)
    if total == 0:
        return [f"An empty {bg}.", "There are no shapes in the image."][:n]
    shapes_word = f"{number_word(total)} {'shape' if total == 1 else 'shapes'}"

    def count() -> str:
        lead = "there is" if total == 1 else "there are"
        form = _pick(rng, (f"{lead} {shapes_word}", f"the image shows {shapes_word}"))
        return _sentence(f"{form}: {_listing(facts, rng)}")

    def listing() -> str:
        form = _pick(rng, ("{}", "the image shows {}", "a picture of {}"))
        return _sentence(form.format(_listing(facts, rng)))

    def classes() -> str:
        items = _shuffled(rng, _groups(facts, lambda i: facts.shapes[i]))
        form = _pick(rng, ("{}", "in the image {}"))
        return _sentence(form.format(_there_is(items)))

    def colours() -> str:
        items = _groups(facts, lambda i: facts.colours[i] + " shape")
        return _sentence(_there_is(_shuffled(rng, items)))

    pairs = [
        (a, b, rel)
        for a in facts.visible
        for b in facts.visible
        if a != b
        for rel in RELATIONS
        if relation_holds(facts, a, b, rel, clear=True)
    ]

    def spatial() -> str:
        a, b, rel = _pick(rng, pairs)
        pa = with_article(f"{facts.colours[a]} {facts.shapes[a]}")
        pb = with_article(f"{facts.colours[b]} {facts.shapes[b]}")
        words = _pick(rng, _RELATION_WORDS[rel])
        form = _pick(rng, ("{} is {} {}", "there is {} {} {}"))
        return _sentence(form.format(pa, words, pb))

    def background() -> str:
        subject = "the shape is" if total == 1 else "the shapes are"
        forms = (f"{subject} on a {bg}", f"{shapes_word} on a {bg}", "{} on a " + bg)
        form = _pick(rng, forms)
        return _sentence(form.format(_listing(facts, rng)) if "{}" in form else form)

    makers = [count, listing, classes, colours, background]
    if pairs:
        makers.append(spatial)
    return [make() for make in _shuffled(rng, makers)[:n]]


@dataclass(frozen=True)
class QAItem:
    """A question-answer pair with its answer as a full sentence (for dialogues)."""

    pair: QAPair
    reply: str  # "There are two circles."


def _specs_for(
    cands: _Candidates, i: int, keep: Callable[[Spec], bool], kinds: Sequence[ExpressionType]
) -> list[Spec]:
    for kind in kinds:  # earliest kind with a spec wins: simple descriptions first
        specs = [s for s in cands.get(i, kind) if keep(s)]
        if specs:
            return specs
    return []


def _make_qa_item(
    kind: QuestionType,
    facts: SceneFacts,
    cands: _Candidates,
    rng: np.random.Generator,
    shapes: Sequence[str],
    colours: Sequence[str],
) -> QAItem | None:
    vis = facts.visible
    if kind == "count":
        what = _pick(rng, ("all", "shape", "colour", "both"))
        i = _pick(rng, vis)
        desc = Descriptor(
            facts.colours[i] if what in ("colour", "both") else None,
            facts.shapes[i] if what in ("shape", "both") else None,
        )
        n = len(denote(desc, facts))
        phrase = desc.text()
        head, _, last = phrase.rpartition(" ")
        many = f"{head} {plural(last)}" if head else plural(last)  # "red circles", "shapes"
        q = f"How many {many} are there?"
        reply = f"there is one {phrase}" if n == 1 else f"there are {number_word(n)} {many}"
        return QAItem(QAPair(q, number_word(n), "count"), _sentence(reply))
    if kind == "exists":
        present = {(facts.colours[i], facts.shapes[i]) for i in vis}
        if rng.random() < 0.5:
            c, s = _pick(rng, sorted(present))
        else:
            absent = [(c, s) for c in colours for s in shapes if (c, s) not in present]
            if not absent:
                return None
            c, s = _pick(rng, absent)
        phrase = f"{c} {s}"
        if (c, s) in present:
            return QAItem(
                QAPair(f"Is there {with_article(phrase)}?", "yes", "exists"),
                f"Yes, there is {with_article(phrase)}.",
            )
        return QAItem(
            QAPair(f"Is there {with_article(phrase)}?", "no", "exists"),
            f"No, there is no {phrase}.",
        )
    kinds: tuple[ExpressionType, ...] = ("attribute", "ordinal", "spatial")
    for i in _shuffled(rng, vis):
        if kind == "colour":
            specs = _specs_for(cands, i, lambda s: _target_descriptor(s).colour is None, kinds)
            if specs:
                ref = render_spec(_pick(rng, specs))
                answer = facts.colours[i]
                return QAItem(
                    QAPair(f"What colour is {ref}?", answer, "colour"), f"It is {answer}."
                )
        elif kind == "shape":
            specs = _specs_for(cands, i, lambda s: _target_descriptor(s).shape is None, kinds)
            if specs:
                ref = render_spec(_pick(rng, specs), noun="object")
                answer = facts.shapes[i]
                return QAItem(
                    QAPair(f"What shape is {ref}?", answer, "shape"),
                    f"It is {with_article(answer)}.",
                )
        else:
            cell = grid_position(facts.xs[i], facts.ys[i], facts.width, facts.height, GRID_MARGIN)
            specs = _specs_for(cands, i, lambda s: True, kinds) if cell else []
            if cell and specs:
                ref = render_spec(_pick(rng, specs))
                return QAItem(
                    QAPair(f"Where is {ref}?", cell, "position"),
                    _sentence(f"it is {_place_phrase(cell)}"),
                )
    return None


_QA_TYPES: tuple[QuestionType, ...] = ("count", "colour", "shape", "position", "exists")


def _make_qa(
    facts: SceneFacts,
    rng: np.random.Generator,
    cands: _Candidates,
    shapes: Sequence[str],
    colours: Sequence[str],
) -> list[QAItem]:
    if not facts.visible:
        q = QAPair("How many shapes are there?", "zero", "count")
        return [QAItem(q, "There are no shapes.")]
    n_qa = int(rng.integers(4, 7))
    cycle = _shuffled(rng, _QA_TYPES)
    items: list[QAItem] = []
    seen: set[str] = set()
    for attempt in range(3 * n_qa):
        if len(items) == n_qa:
            break
        item = _make_qa_item(cycle[attempt % 5], facts, cands, rng, shapes, colours)
        if item is not None and item.pair.question not in seen:
            seen.add(item.pair.question)
            items.append(item)
    return items


def make_qa(
    facts: SceneFacts,
    rng: np.random.Generator,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
) -> list[QAItem]:
    """4-6 question-answer pairs with unambiguous, lower-case answers, types in a shuffled cycle.

    count ("How many circles are there?" -> "two"), colour / shape of a uniquely described object
    (the description never names the asked attribute), position (3x3 grid cell of the centroid,
    only away from the grid lines) and exists (yes, or no for a colour-class combination that is
    absent, drawn from ``shapes`` x ``colours``: pass a split's vocabulary to keep held-out names
    out).
    """
    return _make_qa(facts, rng, _Candidates(facts), shapes, colours)


_DESCRIBE_PROMPTS = (
    "Describe the image.",
    "What do you see in this picture?",
    "Can you describe this image?",
    "What is in the image?",
)


def make_dialogue(
    facts: SceneFacts,
    rng: np.random.Generator,
    qa: Sequence[QAItem] = (),
    refs: Sequence[ReferringExpression] = (),
) -> Dialogue:
    """2-3 turns: a description request, then follow-ups taken from ``qa`` and ``refs``."""
    bg = f"{facts.background} background"
    if facts.visible:
        listing = _listing(facts, rng)
        description = _sentence(f"the image shows {listing} on a {bg}")
    else:
        description = f"The image shows an empty {bg}."
    turns = [(_pick(rng, _DESCRIBE_PROMPTS), description)]
    follow_ups: list[tuple[str, str]] = [(q.pair.question, q.reply) for q in qa]
    for ref in refs:
        what = describe_object_at(facts, ref.target)
        follow_ups.append((f"Tell me about {ref.text}.", _sentence(f"it is {what}")))
    n_follow = int(rng.integers(1, 3))
    turns += _shuffled(rng, follow_ups)[:n_follow]
    return Dialogue(turns)


def describe_object_at(facts: SceneFacts, i: int) -> str:
    """ "a red circle in the top left" (the place only when clear of the grid lines)."""
    what = with_article(f"{facts.colours[i]} {facts.shapes[i]}")
    cell = grid_position(facts.xs[i], facts.ys[i], facts.width, facts.height, GRID_MARGIN)
    return f"{what} {_place_phrase(cell)}" if cell else what


def annotate(
    scene: Scene,
    rng: np.random.Generator,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
) -> None:
    """Fill ``scene.captions``, ``refs``, ``qa`` and ``dialogues`` in place (replacing them).

    Deterministic in ``rng``'s state. ``shapes`` and ``colours`` are only the vocabulary for
    absent objects in "Is there ...?" questions (present objects always use their own names).
    """
    facts = SceneFacts.from_scene(scene)
    cands = _Candidates(facts)
    scene.captions = make_captions(facts, rng)
    scene.refs = _make_refs(facts, rng, cands)
    qa = _make_qa(facts, rng, cands, shapes, colours)
    scene.qa = [q.pair for q in qa]
    scene.dialogues = [make_dialogue(facts, rng, qa, scene.refs)]


def listing_caption(captions: Sequence[str], objects: Sequence[tuple[str, str]]) -> str:
    """The caption naming every (colour, class) of `objects`; the shortest such.

    A caption names a pair if it contains "<colour> <class>" (plurals contain the singular).
    If none names every pair, the one naming most (then the shortest) is returned.
    """
    if not captions:
        raise ValueError("no captions to choose from")
    pairs = {f"{colour} {shape}".lower() for colour, shape in objects}

    def score(caption: str) -> tuple[int, int]:
        text = caption.lower()
        return (-sum(p in text for p in pairs), len(caption))

    return min(captions, key=score)
