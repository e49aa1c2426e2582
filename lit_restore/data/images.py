"""Image file I/O shared by data preparation and `restore`: anything in → 8-bit RGB out.

Every reader returns a uint8 (H, W, 3) RGB array plus what the file originally was, so a
16-bit TIFF, a palette PNG and a CMYK JPEG all enter training and inference the same way.

- 16-bit channels become 8-bit by rounding x/257 (the exact 65535 → 255 map). Pillow truncates
  16-bit colour PNGs/TIFFs to their high byte on load, so those are decoded at full depth with
  torchvision's libpng binding (PNG) or tifffile (TIFF; imagecodecs gives it the LZW and deflate
  codecs, and LZW is what OpenCV writes) instead.
- Transparent pixels are composited on white rather than dropped: the colour under alpha 0 is
  arbitrary (often black or leftover paint), and white is what viewers and documents show, so
  the restored image matches what the user sees.
- EXIF orientation is applied, so pixels are stored upright as viewers display them.
- Truncated or corrupt files raise `ImageReadError`; Pillow's LOAD_TRUNCATED_IMAGES stays off
  so a half-decoded file never becomes a grey-bottomed training target.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# Modes whose pixels Pillow's own conversion turns into RGB without losing anything we keep.
_CONVERT_TO_RGB = ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGB")
_WITH_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageReadError(ValueError):
    """A file that is not a decodable image; the message is one line naming the file."""


def is_image_file(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Union[str, Path]) -> tuple[np.ndarray, dict[str, Any]]:
    """Read any supported image file as uint8 (H, W, 3) RGB.

    Returns the array and `{"mode", "bit_depth", "size", "has_alpha"}`: the PIL mode as opened,
    8 or 16, the (H, W) of the returned array, and whether an alpha channel was composited.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_image(data, name=str(path))


def decode_image(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, dict[str, Any]]:
    """`read_image` for encoded bytes (a file's contents or a shard's `gt.png`/`lq.png`)."""
    if len(data) == 0:
        raise ImageReadError(f"{name}: empty file")
    try:
        im = Image.open(io.BytesIO(data))
        # The tile's raw mode is the only place Pillow admits a colour image had 16-bit samples,
        # and load() clears it.
        raw_modes = [str(t.args[0] if isinstance(t.args, tuple) else t.args) for t in im.tile]
        orientation = im.getexif().get(0x0112, 1)
        im.load()
    except UnidentifiedImageError:  # its message holds the repr of our BytesIO, not a reason
        raise ImageReadError(f"{name}: cannot decode (not an image format Pillow recognises)") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageReadError(f"{name}: cannot decode ({type(e).__name__}: {e})") from None
    mode = im.mode
    sixteen_colour = mode not in _SIXTEEN_BIT_GRAY and any(";16" in r for r in raw_modes)
    try:
        if sixteen_colour:
            rgb, has_alpha = _decode_16bit_colour(data, im.format)
        else:
            rgb, has_alpha = _pil_to_rgb(im)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(f"{name}: cannot decode ({type(e).__name__}: {e})") from None
    rgb = np.ascontiguousarray(_apply_orientation(rgb, orientation))
    bit_depth = 16 if (sixteen_colour or mode in _SIXTEEN_BIT_GRAY) else 8
    info = {"mode": mode, "bit_depth": bit_depth, "size": (rgb.shape[0], rgb.shape[1]), "has_alpha": has_alpha}
    return rgb, info


def _to_uint8(x: np.ndarray, max_value: int) -> np.ndarray:
    """Round values in [0, max_value] to [0, 255]; for 16 bit this is round(x / 257)."""
    if max_value == 255 and x.dtype == np.uint8:
        return x
    return np.clip(np.rint(x.astype(np.float64) * (255.0 / max_value)), 0, 255).astype(np.uint8)


def _flatten(channels: np.ndarray, max_value: int) -> tuple[np.ndarray, bool]:
    """(H, W, C) gray/gray+alpha/RGB/RGBA samples in [0, max_value] → uint8 RGB on white."""
    c = channels.shape[2]
    has_alpha = c in (2, 4)
    color = channels[..., : c - 1] if has_alpha else channels
    if has_alpha:
        alpha = channels[..., c - 1 :].astype(np.float64) / max_value
        color = color.astype(np.float64) * alpha + max_value * (1.0 - alpha)
    rgb = _to_uint8(color, max_value)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return rgb, has_alpha


def _pil_to_rgb(im: Image.Image) -> tuple[np.ndarray, bool]:
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _SIXTEEN_BIT_GRAY:
        gray = np.asarray(im).astype(np.int64)
        return _flatten(np.clip(gray, 0, 65535)[..., None], 65535)
    if mode in _WITH_ALPHA:
        # Premultiplied modes and PA are normalised by Pillow first; LA stays two channels.
        target = "LA" if mode == "LA" else "RGBA"
        return _flatten(np.asarray(im.convert(target) if mode != target else im), 255)
    if mode in _CONVERT_TO_RGB:
        return np.asarray(im.convert("RGB") if mode != "RGB" else im), False
    raise ImageReadError(f"unsupported image mode {mode!r}")


def _decode_16bit_colour(data: bytes, fmt: str | None) -> tuple[np.ndarray, bool]:
    if fmt == "PNG":
        import torch
        from torchvision.io import ImageReadMode, decode_png

        # torchvision (pinned) flags its image codecs as deprecated in favour of torchcodec, which
        # needs FFmpeg; libpng through torchvision is still the one installed full-depth decoder.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            chw = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        return _flatten(chw.permute(1, 2, 0).numpy().astype(np.uint16), 65535)
    if fmt == "TIFF":
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            arr = page.asarray()
            if arr.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
                arr = np.moveaxis(arr, 0, -1)
        if arr.dtype != np.uint16 or arr.ndim != 3:
            raise ImageReadError(f"unsupported 16-bit TIFF layout {arr.dtype} {arr.shape}")
        return _flatten(arr, 65535)
    raise ImageReadError(f"unsupported 16-bit {fmt} image")


def _apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF orientation tag's transform (same as PIL.ImageOps.exif_transpose)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(a, -1)
    if orientation == 7:
        return a.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(a, 1)
    return a


def encode_png(rgb: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 (H, W, 3) RGB → lossless PNG bytes."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png expects uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_bytes_atomic(path: Union[str, Path], data: bytes) -> None:
    """Write a file so readers see either the old or the complete new contents, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_files_atomic([(path, data)])


def write_files_atomic(files: Sequence[tuple[Union[str, Path], bytes]]) -> None:
    """Write several files as one: every temporary is written first, then each is renamed over
    its target; a failure while writing (a full disk) removes the temporaries and leaves every
    target as it was. The temporaries are siblings of their targets (same filesystem, so the
    rename is atomic) created with the usual permissions, unlike mkstemp's owner-only ones."""
    temps = []
    try:
        for path, data in files:
            path = Path(path)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temps.append((tmp, path))
            with open(tmp, "wb") as f:
                f.write(data)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)


def write_png(path: Union[str, Path], rgb: np.ndarray) -> None:
    """Save uint8 (H, W, 3) RGB as a PNG, atomically."""
    write_bytes_atomic(path, encode_png(rgb))
