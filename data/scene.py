"""ShapeWorld scene records: the vocabulary and the dataclasses every ShapeWorld module shares.

A :class:`Scene` is one rendered image with its objects (in paint order: later objects lie on top
of earlier ones) and the language annotations made from it. Masks are the *visible* parts.
Class ids are 1-based (COCO category ids); 0 is background in semantic maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = [
    "COLOURS",
    "COLOUR_RGB",
    "SHAPES",
    "UNSEEN_COLOURS",
    "UNSEEN_SHAPES",
    "Dialogue",
    "QAPair",
    "ReferringExpression",
    "Scene",
    "ShapeObject",
    "class_id",
]

# Shape classes, in category-id order (id = index + 1). Never reorder: ids are part of the format.
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "pentagon",
    "cross",
    "ellipse",
    "diamond",
    "ring",
    "arrow",
    "heart",
    "crescent",
    "trapezoid",
)
# Held out of segmentation training (the train split never contains them); CLIP pretraining data
# (the pretrain split) does, as real CLIP has seen ADE classes that COCO training has not.
UNSEEN_SHAPES: tuple[str, ...] = ("heart", "crescent", "trapezoid")

# Colour names and their base RGB; objects get a small per-object jitter around it.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 210, 220),
    "blue": (35, 70, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
    "brown": (130, 80, 35),
    "white": (245, 245, 245),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
UNSEEN_COLOURS: tuple[str, ...] = ("pink", "cyan")

BackgroundKind = Literal["plain", "gradient", "textured"]
ExpressionType = Literal["attribute", "spatial", "ordinal"]
QuestionType = Literal["count", "colour", "shape", "position", "exists"]


def class_id(shape: str) -> int:
    """COCO category id of a shape class (1-based)."""
    try:
        return SHAPES.index(shape) + 1
    except ValueError:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {list(SHAPES)}") from None


@dataclass
class ShapeObject:
    """One object of a scene. Geometry is in pixels of the scene image (x right, y down)."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    rgb: tuple[int, int, int]  # the jittered colour actually painted
    mask: np.ndarray  # (H, W) bool, the visible part
    full_area: int  # pixels the object would cover if nothing lay on top of it
    center: tuple[float, float]  # (x, y) centre of the full (unoccluded) shape
    size: float  # radius of the shape's circumscribed circle, in pixels
    rotation: float  # degrees

    @property
    def area(self) -> int:
        """Visible pixels."""
        return int(self.mask.sum())

    @property
    def occlusion(self) -> float:
        """Fraction of the object hidden by objects painted after it (0 = fully visible)."""
        return 1.0 - self.area / max(self.full_area, 1)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """COCO box [x, y, w, h] of the visible mask."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return (0.0, 0.0, 0.0, 0.0)
        x0, y0 = float(xs.min()), float(ys.min())
        return (x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0)

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) centroid of the visible mask (what a person sees; used for relations)."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return self.center
        return (float(xs.mean()), float(ys.mean()))


@dataclass
class ReferringExpression:
    """A phrase that picks exactly one object of its scene."""

    text: str  # "the red circle left of the blue star"
    target: int  # index into Scene.objects
    type: ExpressionType
    has_distractor: bool  # another object shares the target's class or colour


@dataclass
class QAPair:
    question: str
    answer: str
    type: QuestionType


@dataclass
class Dialogue:
    """A short multi-turn conversation about the image (LLaVA-style turns, human first)."""

    turns: list[tuple[str, str]]  # [(human, assistant), ...]


@dataclass
class Scene:
    """A rendered ShapeWorld image with its objects and annotations."""

    image: np.ndarray  # (H, W, 3) uint8
    objects: list[ShapeObject]  # in paint order
    background: BackgroundKind
    captions: list[str] = field(default_factory=list)
    refs: list[ReferringExpression] = field(default_factory=list)
    dialogues: list[Dialogue] = field(default_factory=list)
    qa: list[QAPair] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def semantic_map(self) -> np.ndarray:
        """(H, W) uint8 map of class ids, 0 = background."""
        sem = np.zeros((self.height, self.width), dtype=np.uint8)
        for obj in self.objects:
            sem[obj.mask] = class_id(obj.shape)
        return sem
