"""Image reading: every supported input becomes 8-bit RGB with the right values."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from lit_restore.data.images import ImageReadError, decode_image, encode_png, read_image, write_png

RNG = np.random.default_rng(0)


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot save 16-bit colour PNGs)."""
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def rounded(x16: np.ndarray) -> np.ndarray:
    return np.round(x16.astype(np.float64) / 257).astype(np.uint8)


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tif"), ("WEBP", "webp")])
def test_lossless_8bit_rgb_formats_are_exact(tmp_path, fmt, suffix):
    rgb = RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    path = tmp_path / f"x.{suffix}"
    path.write_bytes(save(Image.fromarray(rgb), fmt, **kw))
    out, info = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (13, 17, 3)
    np.testing.assert_array_equal(out, rgb)
    assert info == {"mode": "RGB", "bit_depth": 8, "size": (13, 17), "has_alpha": False}


def test_jpeg_reads_as_rgb():
    rgb = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    out, info = decode_image(save(Image.fromarray(rgb), "JPEG", quality=95))
    assert info["mode"] == "RGB" and out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - rgb).max() <= 3


@pytest.mark.parametrize("channels", [3, 4, 1, 2])
def test_16bit_png_rounds_full_depth(channels):
    x = RNG.integers(0, 65536, (5, 7, channels), dtype=np.uint16)
    x[0, 0] = 65535
    x[0, 1] = 0
    if channels in (2, 4):
        x[..., -1] = 65535  # opaque, so the colour must come through unchanged
    out, info = decode_image(png16(x))
    color = x[..., : 3 if channels >= 3 else 1]
    np.testing.assert_array_equal(out, np.broadcast_to(rounded(color), (5, 7, 3)))
    assert info["bit_depth"] == 16
    assert info["has_alpha"] == (channels in (2, 4))


def test_16bit_rgb_tiff_rounds_full_depth():
    x = RNG.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, x, photometric="rgb")
    out, info = decode_image(buf.getvalue())
    np.testing.assert_array_equal(out, rounded(x))
    assert info["bit_depth"] == 16


def test_16bit_lzw_tiff_as_opencv_writes_it(tmp_path):
    import cv2

    x = RNG.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "cv.tif"), x[..., ::-1])  # OpenCV takes BGR
    with tifffile.TiffFile(tmp_path / "cv.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW  # OpenCV's default for TIFF
    out, info = read_image(tmp_path / "cv.tif")
    np.testing.assert_array_equal(out, rounded(x))
    assert info["bit_depth"] == 16


def test_16bit_gray_tiff():
    x = RNG.integers(0, 65536, (6, 5), dtype=np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, x)
    out, info = decode_image(buf.getvalue())
    np.testing.assert_array_equal(out, np.repeat(rounded(x)[..., None], 3, axis=2))
    assert info["bit_depth"] == 16 and info["mode"].startswith("I")


def test_gray_becomes_three_equal_channels():
    g = RNG.integers(0, 256, (9, 8), dtype=np.uint8)
    out, info = decode_image(save(Image.fromarray(g), "PNG"))
    np.testing.assert_array_equal(out, np.repeat(g[..., None], 3, axis=2))
    assert info["mode"] == "L"


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[0, :, 3] = 255  # opaque row: colour kept
    rgba[1, 0, 3] = 0  # transparent: white
    rgba[1, 1, 3] = 128  # half: blend
    rgba[1, 2, 3] = 255
    out, info = decode_image(save(Image.fromarray(rgba), "PNG"))
    assert info["has_alpha"] and info["mode"] == "RGBA"
    np.testing.assert_array_equal(out[0], [[200, 100, 0]] * 3)
    np.testing.assert_array_equal(out[1, 0], [255, 255, 255])
    a = 128 / 255
    np.testing.assert_array_equal(out[1, 1], np.rint(np.array([200, 100, 0]) * a + 255 * (1 - a)))


def test_palette_with_and_without_transparency():
    rgb = RNG.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(colors=16)
    out, info = decode_image(save(pal, "PNG"))
    assert info["mode"] == "P" and not info["has_alpha"]
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))

    pal.info["transparency"] = 0
    out, info = decode_image(save(pal, "PNG", transparency=0))
    assert info["has_alpha"]
    hole = np.asarray(pal) == 0
    assert hole.any()
    assert (out[hole] == 255).all()
    np.testing.assert_array_equal(out[~hole], np.asarray(pal.convert("RGB"))[~hole])


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out, info = decode_image(save(cmyk, "JPEG", quality=100))
    assert info["mode"] == "CMYK" and out.shape == (8, 8, 3)
    assert out[..., 0].min() > 240 and out[..., 1:].max() < 15


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    rgb = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(Image.fromarray(rgb), "PNG", exif=exif)
    out, info = decode_image(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(out, expected)
    assert info["size"] == expected.shape[:2]


def test_corrupt_inputs_raise_one_line_errors(tmp_path):
    rgb = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    cases = {
        "zero.png": b"",
        "noise.png": RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "cut.jpg": save(Image.fromarray(rgb), "JPEG")[:600],
        "cut.png": save(Image.fromarray(rgb), "PNG")[:2000],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError) as e:
            read_image(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value) and " object at 0x" not in str(e.value)
    with pytest.raises(ImageReadError, match="cannot read"):
        read_image(tmp_path / "missing.png")


def test_write_png_round_trip_and_atomic(tmp_path):
    rgb = RNG.integers(0, 256, (11, 12, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "y.png"
    write_png(path, rgb)
    np.testing.assert_array_equal(read_image(path)[0], rgb)
    assert [p.name for p in path.parent.iterdir()] == ["y.png"]  # no temp file left behind
    np.testing.assert_array_equal(decode_image(encode_png(rgb))[0], rgb)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(rgb.astype(np.float32))


def test_gray_alpha_is_composited_on_white():
    la = np.zeros((1, 3, 2), np.uint8)
    la[..., 0] = 40
    la[0, :, 1] = (255, 0, 51)
    out, info = decode_image(save(Image.fromarray(la), "PNG"))
    assert info["mode"] == "LA" and info["has_alpha"]
    np.testing.assert_array_equal(out[0, :, 0], [40, 255, np.rint(40 * 0.2 + 255 * 0.8)])
    assert (out == out[..., :1]).all()
