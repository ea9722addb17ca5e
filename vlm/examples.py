"""Example images for the demo: ShapeWorld test scenes and real photos, written once to the cache.

    paths = example_images(PolychromeConfig.from_preset("shapes").shapeworld)
    paths["shapes-0"]      # a ShapeWorld test-split scene (deterministic in the preset's seed)
    paths["astronaut"]     # skimage.data's photo, as PNG

The photos come from packages that ship them (scikit-image, scikit-learn): nothing is downloaded.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from core.io import atomic_write_bytes, cache_dir
from data.shapeworld import ShapeWorldConfig, generate_scene

__all__ = ["PHOTOS", "example_images"]

PHOTOS = ("astronaut", "coffee", "chelsea")  # skimage.data functions


def _photo(name: str) -> np.ndarray:
    from skimage import data as skdata

    return np.asarray(getattr(skdata, name)())


def _save(path: Path, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def example_images(shapeworld: ShapeWorldConfig, n_scenes: int = 3) -> dict[str, Path]:
    """{name: PNG path}: ``n_scenes`` ShapeWorld test scenes, then the photos."""
    folder = cache_dir("examples")
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for i in range(n_scenes):
        path = folder / f"shapes-{shapeworld.seed}-{shapeworld.layout.image_size}-{i}.png"
        if not path.is_file():
            scene = generate_scene(shapeworld.layout, shapeworld.seed, "test", i)
            _save(path, scene.image)
        out[f"shapes-{i}"] = path
    for name in PHOTOS:
        path = folder / f"{name}.png"
        if not path.is_file():
            _save(path, _photo(name))
        out[name] = path
    return out
