"""Turning whatever a user hands us into an RGB image, or a clear error.

Accepted: a path or raw bytes of a PNG, JPEG, GIF, BMP, WebP or TIFF file (READ_FORMATS; the
first frame of an animation; EXIF orientation applied, as a browser shows the photo), a PIL
image, or a numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8, uint16, bool or
float in [0, 1]. Documented conversions:

- L, LA, 1, P (palette, with or without transparency), RGBA, CMYK, YCbCr, LAB, HSV -> RGB;
  transparent pixels (an alpha channel or a transparent colour key) are composited over white
  (what a person sees in a browser).
- 16-bit images (I;16, uint16 arrays, 32-bit I holding 0..65535) -> 0..255 by the type's range
  (65535 -> 255), as a browser shows them; other integer arrays in 0..255 as they are; F (float)
  images in [0, 1] x 255, other float or integer ranges scaled by the image's own range.
- Size: 1x1 up to MAX_SIDE on each side. A file (path or bytes) up to MAX_FILE_SIDE a side is
  read downscaled so that its longer side is MAX_SIDE (a 24-megapixel phone photo, 5712x4284,
  becomes 4096x3072); pass ``downscale=False`` where pixels must keep the file's size (masks
  drawn on it).
  Larger files, and PIL images or arrays over MAX_SIDE, raise ImageError (a model resizes; it
  should not be asked to read a 100-megapixel file).

Anything else raises :class:`ImageError` saying what was expected and what was received.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "MAX_FILE_SIDE",
    "MAX_SIDE",
    "READ_FORMATS",
    "ImageError",
    "fit_within",
    "image_size",
    "load_rgb",
    "pad_to_square",
    "paint_labels",
    "square_crop",
    "to_rgb",
]

MAX_SIDE = 4096  # pixels, per side: the largest image handed on
MAX_FILE_SIDE = 8192  # pixels, per side: the largest file read (downscaled to MAX_SIDE)
# The file formats read (PIL's names). PIL would open dozens more, some through outside programs
# (EPS through Ghostscript): uploads are held to the common image formats.
READ_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5-8 turn the image a quarter
# PIL refuses files above ~179 MP as decompression bombs; we stop far earlier (MAX_FILE_SIDE^2).
Image.MAX_IMAGE_PIXELS = MAX_FILE_SIDE * MAX_FILE_SIDE


class ImageError(ValueError):
    """An input is not an image we can use."""


def _check_size(width: int, height: int, what: str, largest: int = MAX_SIDE) -> None:
    if width < 1 or height < 1 or width > largest or height > largest:
        raise ImageError(
            f"{what}: expected an image between 1x1 and {largest}x{largest} pixels, "
            f"received {width}x{height}"
        )


# modes Image.reduce takes: a file of twice MAX_SIDE or more is halved before it is converted
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBa", "La", "I", "F", "CMYK", "YCbCr", "LAB", "HSV")


def _fitted(width: int, height: int, side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most `side` (aspect kept)."""
    longer = max(width, height)
    if longer <= side:
        return width, height
    return max(1, round(width * side / longer)), max(1, round(height * side / longer))


def fit_within(image: Image.Image, side: int) -> Image.Image:
    """`image` scaled down (Lanczos, aspect kept) so that its longer side is at most `side`;
    `image` itself when it fits already."""
    size = _fitted(image.width, image.height, side)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


_SCALE_CHUNK = 1 << 22  # values scaled at a time: float64 copies of a whole 8192 px image are GBs


def _scale_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """Integer or float pixels -> uint8 (the module docstring's rules), in float64 (exact for
    every 16-bit value) a chunk at a time, so that memory stays near the image's own size."""
    if not np.isfinite(arr).all():
        raise ImageError(f"{what}: the image holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())  # min and max commute with the conversion
    if np.issubdtype(arr.dtype, np.floating):
        full = 1.0 if lo >= 0 and hi <= 1 else None
    elif arr.dtype == np.uint16:
        full = 65535.0
    else:
        full = 255.0 if lo >= 0 and hi <= 255 else 65535.0 if lo >= 0 and hi <= 65535 else None
    if full is None and hi <= lo:  # one value outside every known range: mid grey
        return np.full(arr.shape, 128, dtype=np.uint8)
    flat = arr.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint8)
    for start in range(0, flat.size, _SCALE_CHUNK):
        x = flat[start : start + _SCALE_CHUNK].astype(np.float64)
        scaled = x / full * 255 if full is not None else (x - lo) / (hi - lo) * 255
        out[start : start + _SCALE_CHUNK] = np.round(scaled)
    return out.reshape(arr.shape)


def to_rgb(image: Image.Image | np.ndarray, what: str = "image") -> Image.Image:
    """Convert a PIL image or an array to an RGB PIL image (see the module docstring)."""
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, what)
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"{what}: expected a PIL image, a numpy array, a path or bytes, received "
            f"{type(image).__name__}"
        )
    return _to_rgb(image, what, MAX_SIDE)


def _to_rgb(image: Image.Image, what: str, largest: int) -> Image.Image:
    _check_size(image.width, image.height, what, largest)
    mode = image.mode
    if mode in ("P", "RGB", "L") and "transparency" in image.info:  # a transparent colour key
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image).astype(np.uint16), what)).convert(
            "RGB"
        )
    if mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), what)).convert("RGB")
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
        arr = _scale_to_uint8(arr, what)
    elif arr.dtype != np.uint8:
        raise ImageError(f"{what}: unsupported array dtype {arr.dtype}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)), what)


def load_rgb(
    source: str | os.PathLike[str] | bytes | Image.Image | np.ndarray, *, downscale: bool = True
) -> Image.Image:
    """Open `source` (path, bytes, PIL image or array) as an RGB PIL image, or raise ImageError.
    A file over MAX_SIDE (up to MAX_FILE_SIDE) a side comes back downscaled to MAX_SIDE, unless
    ``downscale=False``, which refuses it (module docstring)."""
    if isinstance(source, Image.Image | np.ndarray):
        return to_rgb(source)
    if isinstance(source, bytes):
        what, stream = f"<{len(source)} bytes>", io.BytesIO(source)
        if not source:
            raise ImageError(f"{what}: empty data, expected an image file")
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        what = str(path)
        _check_file(path)
        stream = io.BytesIO(path.read_bytes())
    else:
        raise ImageError(
            "expected a path, bytes, a PIL image or a numpy array, received "
            f"{type(source).__name__}"
        )
    largest = MAX_FILE_SIDE if downscale else MAX_SIDE
    with _reading(what), Image.open(stream, formats=READ_FORMATS) as img:
        _check_size(img.width, img.height, what, largest)  # before decoding the pixels
        size = _fitted(img.width, img.height)
        big = size != img.size
        orientation = _orientation(img)  # from the header, as image_size reads it
        if big and max(img.size) >= 2 * MAX_SIDE and img.format == "JPEG":
            img.draft(img.mode, (img.width // 2, img.height // 2))  # decoded at half scale
        img.load()
        decoded: Image.Image = img
        if big and max(img.size) >= 2 * MAX_SIDE and img.mode in _REDUCIBLE:
            decoded = img.reduce(2)  # halve before the copies conversion makes
        upright = _UPRIGHT.get(orientation)
        image = decoded.transpose(upright) if upright is not None else decoded
        if not big:
            return to_rgb(image, what)
        # RGB first (every mode resamples the same way), then to the size image_size reports
        turned = image.size != decoded.size
        rgb = _to_rgb(image, what, MAX_FILE_SIDE)
        return rgb.resize(size[::-1] if turned else size, Image.Resampling.LANCZOS)


def _check_file(path: Path) -> None:
    """ImageError unless `path` is a file with something in it."""
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes), expected an image")


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """PIL's errors while opening or decoding `what`, as ImageErrors saying what is wrong."""
    try:
        yield
    except UnidentifiedImageError:
        raise ImageError(
            f"{what}: not an image file we read (expected {', '.join(READ_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what}: {err}") from None
    except (OSError, SyntaxError) as err:
        raise ImageError(f"{what}: corrupt or truncated image ({err})") from None


def image_size(
    path: str | os.PathLike[str], *, downscale: bool = True, as_read: bool = True
) -> tuple[int, int]:
    """(width, height) of the image file at `path` as load_rgb (with the same `downscale`)
    returns it (EXIF rotation applied), from its header alone: ImageError when it is missing,
    empty, not an image we read or too large. A file cut short after its header passes here;
    load_rgb finds it. ``as_read=False``: the file's own size, upright, before load_rgb's
    downscaling (to map what was found on the read image back to the file's pixels)."""
    what = str(path)
    _check_file(Path(path))
    with _reading(what), Image.open(path, formats=READ_FORMATS) as img:
        _check_size(img.width, img.height, what, MAX_FILE_SIDE if downscale else MAX_SIDE)
        width, height = _fitted(img.width, img.height) if as_read else (img.width, img.height)
        return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)


# EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_XMP_ORIENTATION = r'tiff:Orientation(?:="|>)([1-8])'


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when none) an opened image's header gives, read where
    Pillow's getexif reads it: the EXIF block (TIFF tags, a JPEG's APP1, a PNG's eXIf chunk ahead
    of the pixels, ImageMagick's "Raw profile type exif" text), else XMP's tiff:Orientation.
    load_rgb and image_size both call this before any pixel is decoded, so they cannot disagree
    (a PNG eXIf chunk after the pixels, which getexif finds only by decoding them, is not read)."""
    if img.format == "TIFF":  # its tags are read with the header
        value = img.getexif().get(EXIF_ORIENTATION)
    else:  # getexif() would decode a PNG's pixels to look for a late eXIf chunk
        raw = img.info.get("exif")
        profile = img.info.get("Raw profile type exif")
        if not raw and isinstance(profile, str):
            with contextlib.suppress(ValueError):
                raw = bytes.fromhex("".join(profile.split("\n")[3:]))
        exif = Image.Exif()
        if raw:
            with contextlib.suppress(Exception):  # a broken block: no orientation
                exif.load(raw)
        value = exif.get(EXIF_ORIENTATION)
    if value is None:
        xmp = img.info.get("XML:com.adobe.xmp") or img.info.get("xmp")
        if isinstance(xmp, bytes):
            xmp = xmp.decode("utf-8", "replace")
        if isinstance(xmp, str) and (match := re.search(_XMP_ORIENTATION, xmp)):
            value = int(match[1])
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """`image` centred on a square of colour `fill` as wide as its longer side (LLaVA-1.5's
    ``expand2square``: the offset is floored, so an odd margin leaves the extra row or column
    after the image); a square image comes back as it is."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


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
