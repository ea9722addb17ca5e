"""ShapeWorld rendering: shape masks, backgrounds and scene layout with controlled occlusion.

Written by hand: no library draws this benchmark. Shapes are polygons (or differences of ellipses
for ring and crescent) drawn with PIL at the scene's resolution with hard edges, so the painted
pixels and the masks agree exactly. Objects are painted in order; each mask is the visible part
(the full shape minus every shape painted after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from core.config import Config
from data.scene import COLOUR_RGB, COLOURS, SHAPES, BackgroundKind, Scene, ShapeObject

__all__ = ["LayoutConfig", "render_background", "render_scene", "shape_mask"]

# Muted background tones; object colours must differ from them (see _contrast_ok).
BACKGROUND_RGB: tuple[tuple[int, int, int], ...] = (
    (28, 28, 38),
    (62, 62, 66),
    (120, 120, 128),
    (196, 196, 186),
    (232, 224, 204),
    (34, 52, 44),
    (88, 74, 70),
    (60, 80, 110),
)
BACKGROUND_KINDS: tuple[BackgroundKind, ...] = ("plain", "gradient", "textured")

# Rotation range (degrees, +-) per shape: small where a large turn would make one class look like
# another (a square turned 45 degrees is a diamond), full turn where the class is unchanged by it.
_ROTATION = {
    "circle": 0.0,
    "square": 12.0,
    "triangle": 20.0,
    "star": 36.0,
    "hexagon": 30.0,
    "pentagon": 36.0,
    "cross": 12.0,
    "ellipse": 180.0,
    "diamond": 12.0,
    "ring": 0.0,
    "arrow": 180.0,
    "heart": 20.0,
    "crescent": 180.0,
    "trapezoid": 12.0,
}


def _regular(n: int, phase: float = -90.0) -> np.ndarray:
    a = np.deg2rad(phase + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    a = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


# Unit polygons (radius ~1 around the origin, y down). Ring and crescent are drawn from ellipses.
_POLYGONS: dict[str, np.ndarray] = {
    "circle": _regular(64),
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float) * 0.72,
    "triangle": _regular(3) * np.array([1.0, 1.0]) + np.array([0.0, 0.2]),
    "star": _star(),
    "hexagon": _regular(6, phase=0.0),
    "pentagon": _regular(5),
    "cross": np.array(
        [
            [-0.3, -1],
            [0.3, -1],
            [0.3, -0.3],
            [1, -0.3],
            [1, 0.3],
            [0.3, 0.3],
            [0.3, 1],
            [-0.3, 1],
            [-0.3, 0.3],
            [-1, 0.3],
            [-1, -0.3],
            [-0.3, -0.3],
        ],
        dtype=float,
    )
    * 0.85,
    "ellipse": _regular(64) * np.array([1.0, 0.55]),
    "diamond": np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], dtype=float),
    "arrow": np.array(
        [[-1, -0.22], [0.2, -0.22], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.22], [-1, 0.22]],
        dtype=float,
    ),
    "heart": _heart(),
    "trapezoid": np.array([[-0.5, -0.6], [0.5, -0.6], [1.0, 0.6], [-1.0, 0.6]], dtype=float),
}


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ rot.T


def shape_mask(
    shape: str, center: tuple[float, float], size: float, rotation: float, height: int, width: int
) -> np.ndarray:
    """(H, W) bool mask of one full shape. `size` is the circumscribed radius in pixels."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {list(SHAPES)}")
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center
    if shape in ("ring", "crescent"):
        inner = 0.55 if shape == "ring" else 0.82
        offset = (
            (0.0, 0.0) if shape == "ring" else tuple(_rotate(np.array([[0.42, 0.0]]), rotation)[0])
        )
        outer = _regular(64) * size + np.array([cx, cy])
        hole = _regular(64) * size * inner + np.array(
            [cx + offset[0] * size, cy + offset[1] * size]
        )
        draw.polygon([tuple(p) for p in outer], fill=1)
        draw.polygon([tuple(p) for p in hole], fill=0)
    else:
        pts = _rotate(_POLYGONS[shape], rotation) * size + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=1)
    return np.asarray(canvas, dtype=bool)


def render_background(
    kind: BackgroundKind, height: int, width: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A background image (H, W, 3) uint8 and its mean colour (3,) float."""
    base = np.array(BACKGROUND_RGB[rng.integers(len(BACKGROUND_RGB))], dtype=np.float32)
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if kind == "gradient" or (kind == "textured" and rng.random() < 0.5):
        # A linear blend toward a second tone at a random angle.
        other = np.array(BACKGROUND_RGB[rng.integers(len(BACKGROUND_RGB))], dtype=np.float32)
        if np.abs(other - base).sum() < 60:
            other = np.clip(base + rng.choice([-70.0, 70.0]), 0, 255)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xs / max(width - 1, 1) - 0.5) * np.cos(angle) + (
            ys / max(height - 1, 1) - 0.5
        ) * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base + t[..., None] * (other - base)
    if kind == "textured":
        texture = rng.integers(3)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        if texture == 0:  # fine noise
            img = img + rng.normal(0, 9, size=(height, width, 1)).astype(np.float32)
        elif texture == 1:  # stripes
            period = rng.uniform(6, 16) * max(height, width) / 128
            theta = rng.uniform(0, np.pi)
            phase = (xs * np.cos(theta) + ys * np.sin(theta)) * 2 * np.pi / period
            img = img + (14 * np.sin(phase))[..., None]
        else:  # checker
            cell = int(rng.integers(6, 14) * max(height, width) / 128) or 1
            checker = ((xs // cell + ys // cell) % 2) * 2 - 1
            img = img + (11 * checker)[..., None]
    img = np.clip(img, 0, 255)
    return img.astype(np.uint8), img.reshape(-1, 3).mean(0)


@dataclass
class LayoutConfig(Config):
    """How scenes are laid out. Sizes are fractions of the image side."""

    image_size: int = 128  # square images, 16..512 pixels
    min_objects: int = 2  # objects per image, inclusive range
    max_objects: int = 7
    min_size: float = 0.05  # circumscribed radius, as a fraction of the image side
    max_size: float = 0.22
    occlusion_prob: float = 0.4  # chance that an image gets one deliberately occluded object
    min_occlusion: float = 0.3  # occluded fraction of that object, sampled in this range
    max_occlusion: float = 0.6
    repeat_prob: float = 0.35  # chance a new object copies an earlier one's class (and colour)
    min_contrast: float = 110.0  # RGB distance an object colour keeps from the background mean
    colour_jitter: int = 10  # +- per channel around the colour's base RGB

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [16, 512], received {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 12:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 12, received "
                f"{self.min_objects}..{self.max_objects}"
            )
        if not 0 < self.min_size <= self.max_size <= 0.45:
            raise ValueError(
                f"need 0 < min_size <= max_size <= 0.45, received {self.min_size}, {self.max_size}"
            )
        for name in ("occlusion_prob", "repeat_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], received {getattr(self, name)}")
        if not 0 < self.min_occlusion <= self.max_occlusion < 1:
            raise ValueError("need 0 < min_occlusion <= max_occlusion < 1")


def _contrast_ok(colour: str, bg_mean: np.ndarray, min_contrast: float) -> bool:
    return (
        float(np.linalg.norm(np.array(COLOUR_RGB[colour], dtype=np.float32) - bg_mean))
        >= min_contrast
    )


def render_scene(
    cfg: LayoutConfig,
    rng: np.random.Generator,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = COLOURS,
) -> Scene:
    """Lay out and paint one scene drawn from `shapes` x `colours` (no annotations yet)."""
    s = cfg.image_size
    kind: BackgroundKind = BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))]
    image, bg_mean = render_background(kind, s, s, rng)
    usable = [c for c in colours if _contrast_ok(c, bg_mean, cfg.min_contrast)]
    if len(usable) < 2:  # only on a user-restricted palette; keep going with what there is
        usable = list(colours)
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    occlude_at = (
        int(rng.integers(1, n_target)) if n_target > 1 and rng.random() < cfg.occlusion_prob else -1
    )
    min_pixels = max(12, int(0.0012 * s * s))

    placed: list[tuple[str, str, np.ndarray, tuple[float, float], float, float]] = []
    union = np.zeros((s, s), dtype=bool)
    for i in range(n_target):
        if placed and rng.random() < cfg.repeat_prob:
            shape = placed[rng.integers(len(placed))][0]
        else:
            shape = shapes[rng.integers(len(shapes))]
        if placed and rng.random() < cfg.repeat_prob:
            colour = placed[rng.integers(len(placed))][1]
            if colour not in usable:
                colour = usable[rng.integers(len(usable))]
        else:
            colour = usable[rng.integers(len(usable))]
        rot_range = _ROTATION[shape]
        rotation = float(rng.uniform(-rot_range, rot_range)) if rot_range else 0.0
        accepted = None
        for attempt in range(60):
            # After 30 failed tries to occlude, place this object in the open instead.
            occluding = i == occlude_at and attempt < 30
            scale = 0.85 ** (attempt // 10 % 3)
            # Log-uniform radius: as many small objects as large ones.
            size = (
                float(np.exp(rng.uniform(np.log(cfg.min_size), np.log(cfg.max_size)))) * s * scale
            )
            size = max(size, cfg.min_size * s)
            if occluding:
                # Place over an earlier object so that it loses a controlled fraction.
                j = int(rng.integers(len(placed)))
                under = placed[j]
                angle = rng.uniform(0, 2 * np.pi)
                dist = (under[4] + size) * rng.uniform(0.35, 0.95)
                cx = under[3][0] + dist * np.cos(angle)
                cy = under[3][1] + dist * np.sin(angle)
            else:
                cx, cy = rng.uniform(size, s - size, size=2)
            if not (0 <= cx < s and 0 <= cy < s):
                continue
            mask = shape_mask(shape, (float(cx), float(cy)), size, rotation, s, s)
            full_area = int(mask.sum())
            if full_area < min_pixels:
                continue
            if occluding:
                # Every earlier object must stay visible enough, and `under` lose the target share.
                ok = True
                lost_target = 0.0
                for k, (_, _, m_k, _, _, _) in enumerate(placed):
                    visible_k = m_k & ~mask
                    for later in placed[k + 1 :]:
                        visible_k &= ~later[2]
                    lost = 1.0 - visible_k.sum() / max(int(m_k.sum()), 1)
                    if lost > cfg.max_occlusion or visible_k.sum() < min_pixels:
                        ok = False
                        break
                    if k == j:
                        lost_target = lost
                if not ok or lost_target < cfg.min_occlusion:
                    continue
            elif (mask & union).any():
                continue  # other objects do not touch
            accepted = (shape, colour, mask, (float(cx), float(cy)), size, rotation)
            break
        if accepted is None:
            if len(placed) >= max(cfg.min_objects, 1):
                continue
            raise RuntimeError("could not place the minimum number of objects")  # pragma: no cover
        placed.append(accepted)
        union |= accepted[2]

    objects: list[ShapeObject] = []
    covered = np.zeros((s, s), dtype=bool)
    # Paint in order, then take visible parts back to front.
    for shape, colour, mask, _, _, _ in placed:
        jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOUR_RGB[colour]) + jitter, 0, 255))
        image[mask] = rgb
        objects.append(
            ShapeObject(shape, colour, rgb, mask, int(mask.sum()), (0.0, 0.0), 0.0, 0.0)  # type: ignore[arg-type]
        )
    for obj, (_, _, _, center, size, rotation) in zip(
        reversed(objects), reversed(placed), strict=True
    ):
        full = obj.mask
        obj.mask = full & ~covered
        covered |= full
        obj.center, obj.size, obj.rotation = center, size, rotation
    return Scene(image=image, objects=objects, background=kind)
