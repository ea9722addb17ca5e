"""core.images: every kind of user image becomes RGB, or a clear ImageError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.images import (
    MAX_FILE_SIDE,
    MAX_SIDE,
    ImageError,
    image_size,
    load_rgb,
    square_crop,
    to_rgb,
)


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda: Image.new("L", (5, 4), 128)),
        ("RGBA", lambda: Image.new("RGBA", (5, 4), (255, 0, 0, 255))),
        ("P", lambda: Image.new("RGB", (5, 4), (0, 0, 255)).convert("P")),
        ("CMYK", lambda: Image.new("CMYK", (5, 4), (0, 255, 255, 0))),
        ("I;16", lambda: Image.fromarray(np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000)),
        ("1", lambda: Image.new("1", (5, 4), 1)),
    ],
)
def test_modes_convert_to_rgb(mode, make):
    img = make()
    assert img.mode == mode
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 4)
    again = load_rgb(_png_bytes(img) if mode != "CMYK" else _png_bytes(img, "JPEG"))
    assert again.mode == "RGB" and again.size == (5, 4)


def test_documented_conversions_give_the_expected_pixels():
    # Opaque red RGBA stays red; fully transparent pixels become white.
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    # 16-bit images are scaled by the type's range (x 255 / 65535), as a browser shows them: a
    # uniform one keeps its grey (scaled by its own range it was black)
    deep = np.array([[0, 1000], [2000, 65535]], dtype=np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(deep)))
    assert out[..., 0].tolist() == [[0, 4], [8, 255]]
    for value, grey in ((65535, 255), (30000, 117), (0, 0)):
        flat = Image.fromarray(np.full((3, 3), value, dtype=np.uint16))
        assert np.asarray(load_rgb(_png_bytes(flat)))[1, 1].tolist() == [grey] * 3
    # other integer arrays in 0..255 are taken as they are; floats in [0, 1] x 255
    assert np.asarray(load_rgb(np.full((2, 2), 200, dtype=np.int64)))[0, 0].tolist() == [200] * 3
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32))))[0, 0, 0] == 128
    with pytest.raises(ImageError, match="NaN or infinite"):
        to_rgb(Image.fromarray(np.array([[0.0, np.inf]], np.float32)))
    # an RGB PNG with a transparent colour key: the key colour shows white
    keyed = Image.new("RGB", (2, 1), (0, 0, 0))
    keyed.putpixel((1, 0), (9, 9, 9))
    buf = io.BytesIO()
    keyed.save(buf, format="PNG", transparency=(0, 0, 0))
    assert np.asarray(load_rgb(buf.getvalue()))[0].tolist() == [[255, 255, 255], [9, 9, 9]]
    # CMYK pure cyan -> RGB (0, 255, 255).
    cmyk = Image.new("CMYK", (1, 1), (255, 0, 0, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [0, 255, 255]


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((3, 2), 7, dtype=np.uint8), [7, 7, 7]),
        (np.ones((3, 2), dtype=bool), [255, 255, 255]),
        (np.full((3, 2, 3), 0.5), [128, 128, 128]),
        (np.full((3, 2, 1), 9, dtype=np.uint8), [9, 9, 9]),
    ],
)
def test_arrays(array, expected):
    out = load_rgb(array)
    assert out.size == (2, 3)
    assert np.asarray(out)[0, 0].tolist() == expected


def test_extreme_sizes():
    assert load_rgb(_png_bytes(Image.new("RGB", (1, 1)))).size == (1, 1)
    big = Image.new("L", (MAX_SIDE, MAX_SIDE))
    assert load_rgb(big).size == (MAX_SIDE, MAX_SIDE)
    wide = _png_bytes(Image.new("L", (MAX_SIDE + 1, 2)))
    assert load_rgb(wide).size == (MAX_SIDE, 2)  # a file: read downscaled
    with pytest.raises(
        ImageError, match=rf"between 1x1 and {MAX_SIDE}x{MAX_SIDE} pixels, received 4097x2"
    ):
        load_rgb(wide, downscale=False)
    with pytest.raises(ImageError, match=rf"between 1x1 and {MAX_SIDE}x{MAX_SIDE} pixels"):
        load_rgb(Image.new("L", (MAX_SIDE + 1, 2)))  # an image in memory is not resized
    with pytest.raises(
        ImageError, match=rf"{MAX_FILE_SIDE}x{MAX_FILE_SIDE} pixels, received 8193x3"
    ):
        load_rgb(_png_bytes(Image.new("L", (MAX_FILE_SIDE + 1, 3))))


def test_large_photos_are_read_downscaled_as_a_full_decode_would_give(tmp_path):
    """A 14.5-megapixel photo (4400x3300) comes back 4096x3072, the full decode resized, turned
    by its EXIF tag as image_size says from the header alone; refused with downscale=False
    (where masks keep the file's size)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((4400, 3300), Image.Resampling.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated a quarter turn: shown 3300 wide, 4400 tall
    photo.save(tmp_path / "phone.jpg", quality=90, exif=exif)
    out = load_rgb(tmp_path / "phone.jpg")
    assert out.size == image_size(tmp_path / "phone.jpg") == (3072, 4096)
    full = Image.open(tmp_path / "phone.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    expected = full.resize((3072, 4096), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    # twice MAX_SIDE or more: halved before it is converted (Image.reduce), then resized; the
    # same picture as the full resize, to a grey level or two
    ramp = np.tile(np.linspace(0, 255, MAX_FILE_SIDE), (4, 1)).astype(np.uint8)
    (tmp_path / "wide.png").write_bytes(_png_bytes(Image.fromarray(ramp)))
    wide = np.asarray(load_rgb(tmp_path / "wide.png"), dtype=np.float64)[..., 0]
    direct = np.asarray(Image.fromarray(ramp).resize((MAX_SIDE, 2), Image.Resampling.LANCZOS))
    assert wide.shape == (2, MAX_SIDE) and np.abs(wide - direct).max() <= 2
    with pytest.raises(ImageError, match="received 4400x3300"):
        image_size(tmp_path / "phone.jpg", downscale=False)
    with pytest.raises(ImageError, match="received 4400x3300"):
        load_rgb(tmp_path / "phone.jpg", downscale=False)


def test_orientation_from_xmp_or_a_raw_exif_profile_turns_the_image_as_image_size_says(tmp_path):
    """Pillow reads a rotation from XMP and from ImageMagick's "Raw profile type exif" PNG text
    too; load_rgb and image_size read it in the same place, so a referring dataset's size check
    cannot pass an image that the model then reads turned (its masks would be transposed)."""
    from PIL import ImageOps, PngImagePlugin

    picture = Image.new("RGB", (60, 20))
    picture.paste((255, 0, 0), (0, 0, 10, 20))  # a red band on the left
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
        '22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    picture.save(tmp_path / "xmp.jpg", xmp=xmp.encode())
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    picture.save(tmp_path / "xmp.png", pnginfo=info)
    exif = Image.Exif()
    exif[0x0112] = 6
    block = exif.tobytes()
    profile = PngImagePlugin.PngInfo()
    profile.add_text("Raw profile type exif", f"\nexif\n{len(block):8d}\n{block.hex()}\n")
    picture.save(tmp_path / "profile.png", pnginfo=profile)
    for name in ("xmp.jpg", "xmp.png", "profile.png"):
        path = tmp_path / name
        want = ImageOps.exif_transpose(Image.open(path)).size  # Pillow's own reading
        out = load_rgb(path)
        assert want == out.size == image_size(path) == (20, 60), name
        assert np.asarray(out)[2, 10, 0] > 200 and np.asarray(out)[-3, 10, 0] < 60, (
            name
        )  # band on top


def test_not_images(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("hello, I am text")
    with pytest.raises(ImageError, match=r"notes\.png: not an image file"):
        load_rgb(fake)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png: empty file \(0 bytes\)"):
        load_rgb(empty)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    with pytest.raises(ImageError, match=r"cut\.png"):
        load_rgb(truncated)
    with pytest.raises(ImageError, match="file not found"):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="received int"):
        load_rgb(42)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match=r"received \(2, 2, 5\)"):
        load_rgb(np.zeros((2, 2, 5), dtype=np.uint8))
    with pytest.raises(ImageError, match=r"values in \[0, 1\]"):
        load_rgb(np.full((2, 2), 3.0))


def test_square_crop_keeps_the_centre():
    """A 300 x 100 image of three 100 px bands (red, green, blue): the 50 px square crop is the
    green middle band, shrunk; a square image of the right size comes back as is."""
    bands = np.zeros((100, 300, 3), dtype=np.uint8)
    bands[:, :100, 0] = bands[:, 100:200, 1] = bands[:, 200:, 2] = 255
    out = np.asarray(square_crop(Image.fromarray(bands), 50)).astype(int)
    assert out.shape == (50, 50, 3)
    inner = out[:, 2:-2]  # bicubic blurs the band edges by a pixel or two
    assert (inner[..., 1] >= 250).all() and (inner[..., [0, 2]] <= 5).all()
    tall = np.asarray(square_crop(Image.fromarray(bands.transpose(1, 0, 2).copy()), 50))
    assert tall.shape == (50, 50, 3) and tall[2:-2, :, 1].min() >= 250
    same = Image.new("RGB", (50, 50), (1, 2, 3))
    assert square_crop(same, 50) is same
    # smaller than the target: scaled up (30 x 10 -> 150 x 50), then the centre cut out
    small = np.asarray(square_crop(Image.fromarray(bands[::10, ::10].copy()), 50)).astype(int)
    assert small.shape == (50, 50, 3)
    assert (small[:, 5:-5, 1] >= 240).all() and (small[:, 5:-5, [0, 2]] <= 15).all()


def test_exif_orientation_is_applied_as_a_browser_shows_the_photo():
    """A 40 x 20 JPEG tagged "rotate 90 degrees clockwise to view" (orientation 6), its left half
    red: seen upright it is 20 x 40 with the red half on top."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = np.asarray(load_rgb(buf.getvalue())).astype(int)
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # top: red
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60  # bottom: blue


def test_image_size_from_the_header_is_load_rgbs(tmp_path):
    """image_size reads the header only and gives the size load_rgb's image has, EXIF
    rotation included, or the error load_rgb gives for a missing, empty or foreign file."""
    from core.images import image_size

    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: 40 x 20 stored, 20 x 40 seen
    Image.new("RGB", (40, 20)).save(tmp_path / "turned.jpg", exif=exif)
    Image.new("L", (30, 12)).save(tmp_path / "plain.png")
    for name in ("turned.jpg", "plain.png"):
        assert image_size(tmp_path / name) == load_rgb(tmp_path / name).size
    assert image_size(tmp_path / "turned.jpg") == (20, 40)
    # the header alone: a PNG cut short after it still has its size (load_rgb finds the cut)
    noise = np.random.default_rng(0).integers(0, 256, (120, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    data = (tmp_path / "noise.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path / "cut.png") == (300, 120)
    with pytest.raises(ImageError, match="truncated"):
        load_rgb(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, message in (
        ("text.png", "not an image file"),
        ("gone.png", "file not found"),
        ("empty.png", "empty file"),
    ):
        with pytest.raises(ImageError, match=message):
            image_size(tmp_path / name)


def test_a_files_own_size_and_fit_within(tmp_path):
    """image_size(as_read=False) is the file's upright size before load_rgb's downscaling;
    fit_within scales down to a longer side (aspect kept) and leaves a fitting image alone."""
    from core.images import fit_within, image_size

    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: 5000 x 10 stored, 10 x 5000 seen
    Image.new("RGB", (5000, 10)).save(tmp_path / "wide.jpg", exif=exif)
    assert image_size(tmp_path / "wide.jpg", as_read=False) == (10, 5000)
    assert image_size(tmp_path / "wide.jpg") == load_rgb(tmp_path / "wide.jpg").size == (8, 4096)
    picture = Image.new("RGB", (300, 100))
    assert fit_within(picture, 150).size == (150, 50)
    assert fit_within(picture, 300) is picture


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "TGA", "ICO"])
def test_only_the_common_formats_are_read(fmt):
    """PIL opens dozens of formats (EPS through Ghostscript); uploads are held to six."""
    data = _png_bytes(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
    assert Image.open(io.BytesIO(data)).size == (16, 16)  # PIL itself would read it
    with pytest.raises(ImageError, match="expected PNG, JPEG, GIF, BMP, WEBP, TIFF"):
        load_rgb(data)


def test_pixels_are_scaled_a_chunk_at_a_time(monkeypatch):
    """16-bit, 32-bit and float pixels scale to uint8 in chunks exactly as in one pass over the
    whole array (the rules themselves: the tests above), and the float64 copies of a 2048 x 2048
    image (~100 MiB in one pass) stay a chunk's size."""
    import tracemalloc

    import core.images
    from core.images import _scale_to_uint8

    rng = np.random.default_rng(0)
    for arr in (
        rng.integers(0, 65536, (61, 47, 3), dtype=np.uint16),
        rng.integers(-70000, 90000, (61, 47), dtype=np.int32),  # outside every range: min-max
        rng.integers(0, 256, (61, 47), dtype=np.int32),
        rng.random((61, 47, 3)).astype(np.float32),
        rng.normal(size=(61, 47)),
    ):
        monkeypatch.setattr(core.images, "_SCALE_CHUNK", arr.size)  # one pass
        whole = _scale_to_uint8(arr, "x")
        monkeypatch.setattr(core.images, "_SCALE_CHUNK", 1000)  # 9 or 3 chunks, the last short
        assert np.array_equal(_scale_to_uint8(arr, "x"), whole), arr.dtype
    monkeypatch.setattr(core.images, "_SCALE_CHUNK", 1 << 16)
    big = rng.integers(0, 65536, (2048, 2048), dtype=np.uint16)
    tracemalloc.start()
    try:
        _scale_to_uint8(big, "big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * 2**20  # the 4 MiB result and a few 0.5 MiB chunks
