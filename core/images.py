"""Turning whatever a user hands us into an RGB image, or a clear error.

Accepted: a path, raw bytes, a PIL image, or a numpy array (H, W), (H, W, 1), (H, W, 3) or
(H, W, 4) of uint8, uint16, bool or float in [0, 1]. Documented conversions:

- L, LA, 1, P (palette, with or without transparency), RGBA, CMYK, YCbCr, LAB, HSV -> RGB;
  transparent pixels are composited over white (what a person sees in a browser).
- I;16 / I (16- or 32-bit integer) and F (float) -> scaled to 0..255 by the image's own range.
- Size: 1x1 up to MAX_SIDE on each side; larger images raise ImageError (a model resizes; it
  should not be asked to read a 100-megapixel file).

Anything else raises :class:`ImageError` saying what was expected and what was received.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["MAX_SIDE", "ImageError", "load_rgb", "paint_labels", "square_crop", "to_rgb"]

MAX_SIDE = 4096  # pixels, per side
# PIL refuses files above ~179 MP as decompression bombs; we stop far earlier (MAX_SIDE^2).
Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE * 4


class ImageError(ValueError):
    """An input is not an image we can use."""


def _check_size(width: int, height: int, what: str) -> None:
    if width < 1 or height < 1 or width > MAX_SIDE or height > MAX_SIDE:
        raise ImageError(
            f"{what}: expected an image between 1x1 and {MAX_SIDE}x{MAX_SIDE} pixels, "
            f"received {width}x{height}"
        )


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) / (hi - lo) * 255).astype(np.uint8)


def to_rgb(image: Image.Image | np.ndarray, what: str = "image") -> Image.Image:
    """Convert a PIL image or an array to an RGB PIL image (see the module docstring)."""
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, what)
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"{what}: expected a PIL image, a numpy array, a path or bytes, received "
            f"{type(image).__name__}"
        )
    _check_size(image.width, image.height, what)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"{what}: cannot convert mode {mode!r} to RGB ({err})") from None


def _array_to_rgb(arr: np.ndarray, what: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(
            f"{what}: expected an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"received {arr.shape}"
        )
    _check_size(arr.shape[1], arr.shape[0], what)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{what}: float array contains NaN or infinity")
        if arr.min() < 0 or arr.max() > 1:
            raise ImageError(
                f"{what}: float arrays must hold values in [0, 1], received "
                f"[{arr.min():.3g}, {arr.max():.3g}]"
            )
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype == np.uint16 or (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8):
        arr = _scale_to_uint8(arr)
    elif arr.dtype != np.uint8:
        raise ImageError(f"{what}: unsupported array dtype {arr.dtype}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)), what)


def load_rgb(source: str | os.PathLike[str] | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Open `source` (path, bytes, PIL image or array) as an RGB PIL image, or raise ImageError."""
    if isinstance(source, Image.Image | np.ndarray):
        return to_rgb(source)
    if isinstance(source, bytes):
        what, stream = f"<{len(source)} bytes>", io.BytesIO(source)
        if not source:
            raise ImageError(f"{what}: empty data, expected an image file")
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        what = str(path)
        if not path.is_file():
            raise ImageError(f"{what}: file not found")
        if path.stat().st_size == 0:
            raise ImageError(f"{what}: empty file (0 bytes), expected an image")
        stream = io.BytesIO(path.read_bytes())
    else:
        raise ImageError(
            "expected a path, bytes, a PIL image or a numpy array, received "
            f"{type(source).__name__}"
        )
    try:
        with Image.open(stream) as img:
            _check_size(img.width, img.height, what)  # before decoding the pixels
            img.load()
            return to_rgb(img, what)
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not an image file PIL can read") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what}: {err}") from None
    except (OSError, SyntaxError) as err:
        raise ImageError(f"{what}: corrupt or truncated image ({err})") from None


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """`image` at `size` x `size`: its shorter side resized to `size` (bicubic), then the centre
    cropped (how the training scripts read user images)."""
    if image.size == (size, size):
        return image
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def paint_labels(
    image: np.ndarray | Image.Image,
    labels: np.ndarray,
    alpha: float = 0.55,
    legend: list[str] | None = None,
) -> Image.Image:
    """The image with each label > 0 painted in a fixed colour (0 untouched); for people to look at.

    labels: (H, W) ints on the image's grid. Colours come from a seeded palette, so label k is the
    same colour in every picture. legend: names of labels 1, 2, ... written in their colours in
    the top-left corner.
    """
    rgb = np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(
            f"labels must be the image's (H, W) = {rgb.shape[:2]}, received {labels.shape}"
        )
    top = max(int(labels.max()), len(legend or ())) + 1
    palette = np.random.default_rng(0).integers(40, 256, size=(top, 3))
    out = rgb.astype(np.float32).copy()
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * palette[labels[fg]]
    painted = Image.fromarray(out.round().astype(np.uint8))
    if legend:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(painted)
        for k, name in enumerate(legend, start=1):
            y = 2 + 12 * (k - 1)
            draw.rectangle((2, y, 10, y + 8), fill=tuple(int(c) for c in palette[k]))
            draw.text((13, y - 1), name, fill=(0, 0, 0))
    return painted
