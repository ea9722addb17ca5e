"""Tests for data/language.py on hand-made scenes with rectangle masks.

Generated text is read back by a small parser written here and checked against the scene with
independent semantics (``ShapeObject.centroid`` / ``.area``, plain comparisons), not with the
module's own evaluator.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from data.language import (
    GRID_MARGIN,
    RENDER_VARIANTS,
    Descriptor,
    OrdinalSpec,
    RelationalSpec,
    SceneFacts,
    Spec,
    annotate,
    denote,
    describe_object,
    join_list,
    number_word,
    plural,
    refers_uniquely,
    render_spec,
    with_article,
)
from data.scene import COLOUR_RGB, COLOURS, SHAPES, Scene, ShapeObject

H = W = 128
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PLURALS = {(s + "es" if s.endswith("s") else s + "s"): s for s in SHAPES}  # crosses, circles
_C = "|".join(COLOURS)
_S = "|".join(sorted(SHAPES, key=len, reverse=True))
DESC = rf"(?:({_C}) )?({_S}|shape|object)"
RELATION_WORDS = {
    "to the left of": "left of",
    "left of": "left of",
    "to the right of": "right of",
    "right of": "right of",
    "above": "above",
    "below": "below",
    "under": "below",
}
ORDINAL_PREFIX = {
    "leftmost": "leftmost",
    "rightmost": "rightmost",
    "topmost": "topmost",
    "bottommost": "bottommost",
    "highest": "topmost",
    "lowest": "bottommost",
    "largest": "largest",
    "biggest": "largest",
    "smallest": "smallest",
}
ORDINAL_SUFFIX = {
    "furthest to the left": "leftmost",
    "on the far left": "leftmost",
    "furthest to the right": "rightmost",
    "on the far right": "rightmost",
    "nearest the top": "topmost",
    "nearest the bottom": "bottommost",
}
_REL = "|".join(sorted(RELATION_WORDS, key=len, reverse=True))
REL_RE = re.compile(rf"^the {DESC} (?:that is )?({_REL}) the {DESC}$")
ORD_PRE_RE = re.compile(rf"^the ({'|'.join(ORDINAL_PREFIX)}) {DESC}$")
ORD_SUF_RE = re.compile(rf"^the {DESC} ({'|'.join(ORDINAL_SUFFIX)})$")
ATTR_RE = re.compile(rf"^the (?:only )?{DESC}$")
ATTR_THAT_RE = re.compile(rf"^the ({_S}) that is ({_C})$")


# ---------------------------------------------------------------------------------------------
# Scene helpers
# ---------------------------------------------------------------------------------------------


def obj(shape: str, colour: str, x0: int, y0: int, x1: int, y1: int) -> ShapeObject:
    """An object whose full shape is the rectangle [x0, x1) x [y0, y1)."""
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return ShapeObject(
        shape=shape,
        colour=colour,
        rgb=COLOUR_RGB[colour],
        mask=mask,
        full_area=int(mask.sum()),
        center=((x0 + x1) / 2, (y0 + y1) / 2),
        size=float(np.hypot(x1 - x0, y1 - y0) / 2),
        rotation=0.0,
    )


def scene_of(objects: list[ShapeObject], background: str = "plain") -> Scene:
    """A scene in paint order: each mask loses what later objects cover."""
    cover = np.zeros((H, W), dtype=bool)
    for o in reversed(objects):
        full = o.mask
        o.mask = full & ~cover
        cover |= full
    return Scene(
        image=np.zeros((H, W, 3), np.uint8),
        objects=objects,
        background=background,  # type: ignore[arg-type]
    )


def random_scene(rng: np.random.Generator) -> Scene:
    """2-7 rectangles drawing from 3 colours and 3 classes, so repeats are frequent."""
    colours = list(rng.choice(COLOURS, 3, replace=False))
    shapes = list(rng.choice(SHAPES, 3, replace=False))
    objects = []
    for _ in range(int(rng.integers(2, 8))):
        s = int(rng.integers(10, 36))
        x0, y0 = int(rng.integers(0, W - s)), int(rng.integers(0, H - s))
        objects.append(
            obj(str(rng.choice(shapes)), str(rng.choice(colours)), x0, y0, x0 + s, y0 + s)
        )
    bg = str(rng.choice(["plain", "gradient", "textured"]))
    return scene_of(objects, bg)


def annotated(scene: Scene, seed: int) -> Scene:
    annotate(scene, np.random.default_rng(seed))
    return scene


# ---------------------------------------------------------------------------------------------
# Independent reading of referring expressions
# ---------------------------------------------------------------------------------------------


def matching(scene: Scene, colour: str | None, shape: str) -> list[int]:
    any_shape = shape in ("shape", "object")
    return [
        i
        for i, o in enumerate(scene.objects)
        if o.area > 0 and (colour is None or o.colour == colour) and (any_shape or o.shape == shape)
    ]


def offsets(scene: Scene, a: int, b: int, relation: str) -> tuple[float, float]:
    """(along, across) offsets, fractions of the image size; along > 0 when a is `relation` b."""
    (xa, ya), (xb, yb) = scene.objects[a].centroid, scene.objects[b].centroid
    dx, dy = (xb - xa) / scene.width, (yb - ya) / scene.height
    return {
        "left of": (dx, abs(dy)),
        "right of": (-dx, abs(dy)),
        "above": (dy, abs(dx)),
        "below": (-dy, abs(dx)),
    }[relation]


def referent(scene: Scene, text: str) -> tuple[int, str, str | None, str]:
    """The one object `text` picks, its expression type and the target's descriptor (colour or
    None, class or "shape"/"object"); fails the test if the text is ambiguous."""
    if m := REL_RE.match(text):
        c, s, rel, ac, as_ = m.groups()
        anchors = matching(scene, ac, as_)
        assert len(anchors) == 1, f"{text!r}: anchor matches {anchors}"
        (a,) = anchors
        relation = RELATION_WORDS[rel]
        # A person's reading: any matching object roughly in that direction (45° cone) counts.
        hits = [
            k
            for k in matching(scene, c, s)
            if k != a and offsets(scene, k, a, relation)[0] > offsets(scene, k, a, relation)[1]
        ]
        assert len(hits) == 1, f"{text!r}: {hits} lie {relation} object {a}"
        along, across = offsets(scene, hits[0], a, relation)
        assert along > 0.1, f"{text!r}: relation not clear ({along}, {across})"
        assert along > across, f"{text!r}: relation not clear ({along}, {across})"
        return hits[0], "spatial", c, s
    m_pre, m_suf = ORD_PRE_RE.match(text), ORD_SUF_RE.match(text)
    if m_pre or m_suf:
        if m_pre:
            word, c, s = m_pre.groups()
            ordinal = ORDINAL_PREFIX[word]
        else:
            assert m_suf is not None
            c, s, word = m_suf.groups()
            ordinal = ORDINAL_SUFFIX[word]
        members = matching(scene, c, s)
        assert len(members) >= 2, f"{text!r}: an ordinal among {members}"
        objs = scene.objects
        if ordinal in ("largest", "smallest"):
            ranked = sorted(members, key=lambda i: objs[i].area, reverse=ordinal == "largest")
            a0, a1 = objs[ranked[0]].area, objs[ranked[1]].area
            assert max(a0, a1) / min(a0, a1) > 1.3, f"{text!r}: areas {a0} vs {a1}"
        else:
            axis, sign = {
                "leftmost": (0, 1),
                "rightmost": (0, -1),
                "topmost": (1, 1),
                "bottommost": (1, -1),
            }[ordinal]
            size = scene.width if axis == 0 else scene.height
            ranked = sorted(members, key=lambda i: sign * objs[i].centroid[axis])
            gap = abs(objs[ranked[1]].centroid[axis] - objs[ranked[0]].centroid[axis]) / size
            assert gap > 0.08, f"{text!r}: runner-up only {gap:.3f} behind"
        return ranked[0], "ordinal", c, s
    if m := ATTR_THAT_RE.match(text):
        s, c = m.groups()
    else:
        m = ATTR_RE.match(text)
        assert m is not None, f"cannot read {text!r}"
        c, s = m.groups()
    hits = matching(scene, c, s)
    assert len(hits) == 1, f"{text!r} matches {hits}"
    return hits[0], "attribute", c, s


def has_distractor(scene: Scene, i: int) -> bool:
    o = scene.objects[i]
    return any(
        j != i and p.area > 0 and (p.colour == o.colour or p.shape == o.shape)
        for j, p in enumerate(scene.objects)
    )


def check_refs(scene: Scene) -> None:
    for ref in scene.refs:
        target, kind, _, _ = referent(scene, ref.text)
        assert target == ref.target, ref
        assert kind == ref.type, ref
        assert ref.has_distractor == has_distractor(scene, ref.target), ref


# ---------------------------------------------------------------------------------------------
# Independent checks of captions, QA and grammar
# ---------------------------------------------------------------------------------------------

_NOUN = rf"({'|'.join(PLURALS)}|{_S}|shapes|shape)"
COUNT_PHRASE = re.compile(rf"\b(a|an|{'|'.join(NUMBERS[1:])}) (?:({_C}) )?{_NOUN}\b")
RELATION_CAPTION = re.compile(
    rf"\b(?:a|an) ({_C}) ({_S}) (?:is )?({_REL}) (?:a|an) ({_C}) ({_S})\b", re.IGNORECASE
)


def count_of(scene: Scene, colour: str | None, noun: str) -> int:
    shape = PLURALS.get(noun, noun)
    return len(matching(scene, colour, "shape" if shape == "shapes" else shape))


def check_caption(scene: Scene, caption: str) -> None:
    """Number words state exact counts; "a X" states exactly one, except in relation sentences
    (existential: "a red circle is left of a blue star"), which must hold for some pair."""
    relational = RELATION_CAPTION.search(caption)
    if relational:
        c1, s1, rel, c2, s2 = relational.groups()
        relation = RELATION_WORDS[rel.lower()]
        assert any(
            offsets(scene, a, b, relation)[0] > 0.1
            and offsets(scene, a, b, relation)[0] > offsets(scene, a, b, relation)[1]
            for a in matching(scene, c1, s1)
            for b in matching(scene, c2, s2)
        ), caption
    for word, colour, noun in COUNT_PHRASE.findall(caption.lower()):
        n = count_of(scene, colour or None, noun)
        singular = noun in SHAPES or noun == "shape"
        if word in ("a", "an"):
            assert singular, caption
            assert n >= 1 if relational else n == 1, f"{caption!r}: {n} {colour} {noun}"
        else:
            assert NUMBERS.index(word) == n, f"{caption!r}: {n} {colour} {noun}"
            assert singular == (n == 1), f"{caption!r}: number agreement"
    if "background" in caption:
        assert f"{scene.background} background" in caption, caption


def grid_cell(scene: Scene, i: int) -> str:
    x, y = scene.objects[i].centroid
    fx, fy = x / scene.width, y / scene.height
    for f in (fx, fy):  # a person could name either cell this close to a grid line
        assert min(abs(f - 1 / 3), abs(f - 2 / 3)) >= GRID_MARGIN
    row = ["top", "", "bottom"][min(int(fy * 3), 2)]
    col = ["left", "", "right"][min(int(fx * 3), 2)]
    return f"{row} {col}".strip() or "center"


def expected_answer(scene: Scene, question: str, kind: str) -> str:
    """The answer computed here from the scene for a generated question."""
    if kind == "count":
        m = re.fullmatch(rf"How many (?:({_C}) )?(\w+) are there\?", question)
        assert m is not None, question
        return NUMBERS[count_of(scene, m.group(1), m.group(2))]
    if kind == "exists":
        m = re.fullmatch(rf"Is there (a|an) ({_C}) ({_S})\?", question)
        assert m is not None, question
        return "yes" if matching(scene, m.group(2), m.group(3)) else "no"
    m = re.fullmatch(r"(What colour is|What shape is|Where is) (.+)\?", question)
    assert m is not None, question
    target, _, colour, shape = referent(scene, m.group(2))
    o = scene.objects[target]
    if kind == "colour":
        assert colour is None, question  # the question must not give the answer away
        return o.colour
    if kind == "shape":
        assert shape == "object", question
        return o.shape
    assert kind == "position"
    return grid_cell(scene, target)


def all_text(scene: Scene) -> list[str]:
    texts = [*scene.captions, *(r.text for r in scene.refs)]
    texts += [t for q in scene.qa for t in (q.question, q.answer)]
    texts += [t for d in scene.dialogues for turn in d.turns for t in turn]
    return texts


# ---------------------------------------------------------------------------------------------
# Fixtures: hand-made scenes
# ---------------------------------------------------------------------------------------------


def two_red_circles_scene() -> Scene:
    """Red circles far left and far right on one row; a blue star between them, a bit lower."""
    return scene_of(
        [
            obj("circle", "red", 6, 40, 26, 60),
            obj("circle", "red", 100, 40, 120, 60),
            obj("star", "blue", 54, 70, 74, 90),
        ]
    )


def listing_scene() -> Scene:
    """A red circle, two blue stars, a white ring and an orange ellipse, well apart."""
    return scene_of(
        [
            obj("circle", "red", 4, 4, 30, 30),
            obj("star", "blue", 90, 6, 114, 30),
            obj("star", "blue", 50, 50, 66, 66),
            obj("ring", "white", 8, 90, 30, 112),
            obj("ellipse", "orange", 92, 96, 122, 120),
        ],
        background="gradient",
    )


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_grammar_helpers() -> None:
    assert plural("cross") == "crosses"
    assert plural("ellipse") == "ellipses"
    assert plural("circle") == "circles"
    assert plural("star") == "stars"
    assert with_article("orange star") == "an orange star"
    assert with_article("ellipse") == "an ellipse"
    assert with_article("arrow") == "an arrow"
    assert with_article("red arrow") == "a red arrow"
    assert with_article("hexagon") == "a hexagon"
    assert [number_word(n) for n in (0, 1, 2, 3, 7)] == ["zero", "one", "two", "three", "seven"]
    assert join_list(["a red circle"]) == "a red circle"
    assert join_list(["a", "b", "c"]) == "a, b and c"
    with pytest.raises(ValueError, match="count"):
        number_word(-1)


def test_describe_object() -> None:
    assert describe_object(obj("circle", "red", 0, 0, 4, 4)) == "red circle"
    assert describe_object(obj("cross", "orange", 0, 0, 4, 4)) == "orange cross"


def test_scene_facts_match_shape_object_properties() -> None:
    scene = random_scene(np.random.default_rng(3))
    facts = SceneFacts.from_scene(scene)
    for i, o in enumerate(scene.objects):
        assert facts.areas[i] == o.area
        if o.area:
            assert facts.xs[i] == pytest.approx(o.centroid[0])
            assert facts.ys[i] == pytest.approx(o.centroid[1])
    assert facts.visible == tuple(i for i, o in enumerate(scene.objects) if o.area > 0)


def test_render_spec_plain_forms() -> None:
    red, star = Descriptor("red", None), Descriptor(None, "star")
    assert render_spec(Descriptor("blue", "star")) == "the blue star"
    above = RelationalSpec(Descriptor(None, "circle"), "above", Descriptor("green", "square"))
    assert render_spec(above) == "the circle above the green square"
    assert render_spec(OrdinalSpec("leftmost", red)) == "the leftmost red shape"
    assert render_spec(OrdinalSpec("largest", Descriptor(None, "triangle"))) == (
        "the largest triangle"
    )
    assert render_spec(Descriptor("blue", None), noun="object") == "the blue object"
    assert render_spec(OrdinalSpec("smallest", star)) == "the smallest star"


@pytest.mark.parametrize(
    "spec",
    [
        Descriptor("red", "circle"),
        Descriptor(None, "cross"),
        RelationalSpec(Descriptor("red", None), "left of", Descriptor("blue", "star")),
        RelationalSpec(Descriptor(), "below", Descriptor(None, "star")),
        OrdinalSpec("topmost", Descriptor("red", "circle")),
        OrdinalSpec("bottommost", Descriptor()),
        OrdinalSpec("largest", Descriptor(None, "ellipse")),
    ],
)
def test_every_phrasing_reads_back_as_the_spec(spec: Spec) -> None:
    """Every variant of the renderer means the same thing to the parser in this file."""
    texts = {render_spec(spec, v) for v in range(RENDER_VARIANTS)}
    for text in texts:
        if isinstance(spec, RelationalSpec):
            m = REL_RE.match(text)
            assert m is not None, text
            c, s, rel, ac, as_ = m.groups()
            assert RELATION_WORDS[rel] == spec.relation
            assert (ac, as_) == (spec.anchor.colour, spec.anchor.shape or "shape")
        elif isinstance(spec, OrdinalSpec):
            m_pre, m_suf = ORD_PRE_RE.match(text), ORD_SUF_RE.match(text)
            if m_pre:
                word, c, s = m_pre.groups()
                assert ORDINAL_PREFIX[word] == spec.ordinal
            else:
                assert m_suf is not None, text
                c, s, word = m_suf.groups()
                assert ORDINAL_SUFFIX[word] == spec.ordinal
        else:
            assert not REL_RE.match(text)
            m_that = ATTR_THAT_RE.match(text)
            m = m_that or ATTR_RE.match(text)
            assert m is not None, text
            c, s = (m.group(2), m.group(1)) if m_that else m.groups()
        d = spec if isinstance(spec, Descriptor) else spec.descriptor
        assert (c, s) == (d.colour, d.shape or "shape"), text
    assert len(texts) >= 2 or isinstance(spec, OrdinalSpec)


def test_denote_hand_scene() -> None:
    scene = two_red_circles_scene()
    facts = SceneFacts.from_scene(scene)
    red_circle = Descriptor("red", "circle")
    assert denote(red_circle, facts) == {0, 1}
    assert not refers_uniquely(red_circle, facts, 0)
    assert denote(Descriptor("blue", None), facts) == {2}
    assert denote(OrdinalSpec("leftmost", red_circle), facts) == {0}
    assert denote(OrdinalSpec("rightmost", red_circle), facts) == {1}
    # Both red circles lie roughly (not clearly) above the star: ambiguous.
    above_star = RelationalSpec(Descriptor(None, "circle"), "above", Descriptor(None, "star"))
    assert denote(above_star, facts) == {0, 1}
    left_of_star = RelationalSpec(Descriptor(None, "circle"), "left of", Descriptor(None, "star"))
    assert denote(left_of_star, facts) == {0}
    assert refers_uniquely(left_of_star, facts, 0)
    assert not refers_uniquely(left_of_star, facts, 1)


def test_ordinal_margins() -> None:
    def leftmost(x1: int) -> frozenset[int]:
        scene = scene_of(
            [obj("circle", "red", 10, 10, 30, 30), obj("circle", "red", x1, 80, x1 + 20, 100)]
        )
        return denote(
            OrdinalSpec("leftmost", Descriptor("red", "circle")), SceneFacts.from_scene(scene)
        )

    assert leftmost(10 + 6) == {0, 1}  # 6 px = 4.7% of the width: too close to call
    assert leftmost(10 + 20) == {0}  # 15.6%

    def largest(side: int) -> frozenset[int]:
        scene = scene_of(
            [obj("star", "red", 10, 10, 30, 30), obj("star", "blue", 60, 60, 60 + side, 80)]
        )
        return denote(
            OrdinalSpec("largest", Descriptor(None, "star")), SceneFacts.from_scene(scene)
        )

    assert largest(24) == {0, 1}  # area ratio 1.2
    assert largest(30) == {1}  # 1.5


def test_relation_margins_and_anchor_uniqueness() -> None:
    star = obj("star", "blue", 80, 54, 100, 74)  # centroid (90, 64)
    target = obj("circle", "red", 30, 54, 50, 74)  # clearly left of the star
    diagonal = obj("circle", "green", 60, 20, 80, 40)  # dx = 20, dy = 34: plausibly left
    spec = RelationalSpec(Descriptor(None, "circle"), "left of", Descriptor(None, "star"))
    facts = SceneFacts.from_scene(scene_of([star, target, diagonal]))
    assert denote(spec, facts) == {1, 2}
    assert not refers_uniquely(spec, facts, 1)

    near = obj("circle", "red", 76, 54, 84, 74)  # centroid x 80: 9.4% of the width left
    star2 = obj("star", "blue", 84, 54, 100, 74)  # centroid x 92 (no overlap)
    facts = SceneFacts.from_scene(scene_of([near, star2]))
    assert denote(RelationalSpec(Descriptor(None, "circle"), "left of", Descriptor()), facts) == {0}
    assert not refers_uniquely(
        RelationalSpec(Descriptor(None, "circle"), "left of", Descriptor(None, "star")), facts, 0
    )

    two_stars = [
        obj("circle", "red", 10, 54, 30, 74),
        obj("star", "blue", 60, 54, 80, 74),
        obj("star", "blue", 100, 54, 120, 74),
    ]
    facts = SceneFacts.from_scene(scene_of(two_stars))
    assert not refers_uniquely(
        RelationalSpec(Descriptor(None, "circle"), "left of", Descriptor(None, "star")), facts, 0
    )


def test_refs_on_two_red_circles_scene() -> None:
    seen: set[tuple[int, str]] = set()
    for seed in range(60):
        scene = annotated(two_red_circles_scene(), seed)
        assert 2 <= len(scene.refs) <= 4
        texts = [r.text for r in scene.refs]
        assert len(set(texts)) == len(texts)
        for ref in scene.refs:
            assert ref.text not in ("the red circle", "the only red circle", "the circle")
            assert ref.text not in ("the red shape", "the circle that is red")
            seen.add((ref.target, ref.type))
        check_refs(scene)
    # Both circles get picked out, by ordinals and by relations to the star.
    assert {(0, "ordinal"), (1, "ordinal"), (0, "spatial"), (1, "spatial")} <= seen
    scene = annotated(two_red_circles_scene(), 0)
    assert any(r.target in (0, 1) and r.has_distractor for r in scene.refs)


def test_refs_pick_their_target_on_random_scenes_with_enough_distractors() -> None:
    rng = np.random.default_rng(123)
    refs, n_scenes_with_two = [], 0
    for seed in range(300):
        scene = annotated(random_scene(rng), seed)
        check_refs(scene)
        assert len(scene.refs) <= 4
        n_scenes_with_two += len(scene.refs) >= 2
        refs += scene.refs
    assert n_scenes_with_two >= 0.95 * 300
    distracted = np.mean([r.has_distractor for r in refs])
    assert distracted >= 0.7, distracted
    for kind in ("attribute", "spatial", "ordinal"):
        share = np.mean([r.type == kind for r in refs])
        assert share >= 0.2, (kind, share)
    assert len({r.text.split()[1] for r in refs}) > 10  # not a single template


def test_targets_without_distractor_only_fill_the_minimum_of_two() -> None:
    unique = [
        obj("circle", "red", 6, 6, 26, 26),
        obj("star", "blue", 90, 10, 110, 30),
        obj("square", "green", 50, 90, 70, 110),
    ]
    scene = scene_of(unique)
    for seed in range(20):
        annotated(scene, seed)
        assert len(scene.refs) == 2
        assert not any(r.has_distractor for r in scene.refs)
        check_refs(scene)
    rng = np.random.default_rng(4)
    for seed in range(100):
        scene = annotated(random_scene(rng), seed)
        if not all(r.has_distractor for r in scene.refs):
            assert len(scene.refs) <= 2, scene.refs


def test_captions_state_true_counts_on_known_scene() -> None:
    all_captions: set[str] = set()
    for seed in range(40):
        scene = annotated(listing_scene(), seed)
        assert len(scene.captions) == 5
        assert len(set(scene.captions)) == 5
        for caption in scene.captions:
            check_caption(scene, caption)
        all_captions.update(scene.captions)
    joined = " ".join(all_captions).lower()
    assert "five shapes" in joined
    assert "two blue stars" in joined
    assert "two stars" in joined
    assert "an orange ellipse" in joined
    assert "two blue shapes" in joined
    assert "gradient background" in joined
    assert RELATION_CAPTION.search(joined)
    assert "a blue star," not in joined  # the listing groups the two blue stars


def test_captions_true_on_random_scenes() -> None:
    rng = np.random.default_rng(7)
    for seed in range(100):
        scene = annotated(random_scene(rng), seed)
        assert len(scene.captions) >= 3
        for caption in scene.captions:
            check_caption(scene, caption)


def test_qa_answers_are_correct() -> None:
    rng = np.random.default_rng(11)
    scenes = [two_red_circles_scene, listing_scene] * 30
    pairs: dict[tuple[str, str], set[str]] = {}
    types, answers = set(), set()
    for seed, make in enumerate(scenes):
        scene = annotated(make(), seed)
        assert 4 <= len(scene.qa) <= 6
        for q in scene.qa:
            assert q.answer == expected_answer(scene, q.question, q.type), q
            assert q.answer == q.answer.lower()
            pairs.setdefault((make.__name__, q.question), set()).add(q.answer)
            types.add(q.type)
            answers.add(q.answer)
    for seed in range(100):
        scene = annotated(random_scene(rng), seed)
        for q in scene.qa:
            assert q.answer == expected_answer(scene, q.question, q.type), q
            types.add(q.type)
    assert types == {"count", "colour", "shape", "position", "exists"}
    assert {"yes", "no"} <= answers
    two_red = "two_red_circles_scene"
    assert pairs[two_red, "How many circles are there?"] == {"two"}
    assert pairs[two_red, "How many shapes are there?"] == {"three"}
    assert pairs[two_red, "What colour is the star?"] == {"blue"}
    assert pairs[two_red, "What shape is the blue object?"] == {"star"}
    assert pairs["listing_scene", "How many circles are there?"] == {"one"}
    assert pairs["listing_scene", "Is there an orange ellipse?"] == {"yes"}
    ring = {
        q: a
        for (name, q), a in pairs.items()
        if name == "listing_scene" and q.startswith("Where") and ("ring" in q or "white" in q)
    }
    assert ring
    assert all(a == {"bottom left"} for a in ring.values()), ring
    assert (two_red, "What colour is the circle?") not in pairs  # two circles: ambiguous
    assert (two_red, "What colour is the red circle?") not in pairs


def test_dialogue_is_consistent_with_the_scene() -> None:
    rng = np.random.default_rng(5)
    n_ref_turns = 0
    for seed in range(60):
        scene = annotated(random_scene(rng), seed)
        assert len(scene.dialogues) == 1
        turns = scene.dialogues[0].turns
        assert 2 <= len(turns) <= 3
        human, first = turns[0]
        assert re.search(r"describe|see|in the image", human, re.IGNORECASE)
        check_caption(scene, first)
        qa = {q.question: q for q in scene.qa}
        refs = {f"Tell me about {r.text}.": r for r in scene.refs}
        for human, reply in turns[1:]:
            if human in qa:
                assert qa[human].answer in reply.lower(), (human, reply)
            else:
                ref = refs[human]
                n_ref_turns += 1
                assert describe_object(scene.objects[ref.target]) in reply, (human, reply)
                m = re.search(r"(?:in|at|on) the ([a-z ]+)\.$", reply)
                if m:
                    assert m.group(1) == grid_cell(scene, ref.target), (human, reply)
    assert n_ref_turns > 0


def test_grammar_in_all_generated_text() -> None:
    rng = np.random.default_rng(9)
    for seed in range(100):
        scene = annotated(random_scene(rng), seed)
        for text in all_text(scene):
            assert not re.search(r"\d", text), text  # counts are number words
            for article, word in re.findall(r"\b(a|an|A|An) (\w+)", text):
                assert (article.lower() == "an") == (word[0] in "aeiou"), text
            for _word, noun in re.findall(
                rf"\b({'|'.join(NUMBERS[2:])}) (?:(?:{_C}) )?(\w+)", text
            ):
                assert noun in PLURALS or noun == "shapes", text
            assert "crosss" not in text


def test_determinism() -> None:
    rng = np.random.default_rng(21)
    base = [random_scene(rng) for _ in range(20)]

    def run(seed: int) -> list[tuple[object, ...]]:
        out = []
        for k, scene in enumerate(base):
            annotate(scene, np.random.default_rng(seed * 1000 + k))
            out.append(
                (list(scene.captions), list(scene.refs), list(scene.qa), list(scene.dialogues))
            )
        return out

    first = run(1)
    assert run(1) == first  # also: annotate replaces, never appends
    assert run(2) != first


def test_invisible_objects_are_never_mentioned() -> None:
    hidden = obj("hexagon", "purple", 40, 40, 50, 50)
    scene = scene_of(
        [hidden, obj("square", "green", 30, 30, 60, 60), obj("star", "red", 90, 90, 110, 110)]
    )
    assert scene.objects[0].area == 0
    for seed in range(30):
        annotated(scene, seed)
        assert all(r.target != 0 for r in scene.refs)
        assert not any("hexagon" in c or "three" in c for c in scene.captions)
        for q in scene.qa:
            assert q.answer == expected_answer(scene, q.question, q.type)


def test_annotate_is_fast() -> None:
    """Well under the 2 ms/scene budget in practice; the bound here only catches per-pixel work.
    This process's CPU time, the best of three passes: wall time on a loaded 2-core CI machine
    went past the bound (10.09 ms) with nothing slower in the code."""
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(100)]
    times = []
    for _ in range(3):
        start = time.process_time()
        for k, scene in enumerate(scenes):
            annotate(scene, np.random.default_rng(k))
        times.append((time.process_time() - start) / len(scenes))
    per_scene = min(times)
    assert per_scene < 0.010, f"{per_scene * 1e3:.2f} ms per scene"
