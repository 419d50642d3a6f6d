"""Reading image files with Pillow: a cheap header probe for the scan, and a full decode for the slow path.

No TensorFlow here. JPEG and PNG files that TensorFlow decodes correctly are marked ``native`` by the probe and never
touch Pillow again; everything else (BMP, GIF, WebP, TIFF, CMYK or EXIF-rotated JPEGs, ...) is decoded by `load_rgb`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Larger images are refused before decoding (a 50-megapixel photo is fine, a decompression bomb is not).
MAX_PIXELS = 64_000_000

_EXIF_ORIENTATION = 0x0112
# Trailers after a JPEG's end-of-image marker (some phones append metadata) are tolerated up to this size.
_JPEG_TAIL = 64 * 1024
_PNG_TAIL = 1024


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str
    native: bool


def probe(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Identify an image from its header (no full decode) and check it is not obviously broken.

    Raises:
        BadImage: with a human-readable reason (empty, not an image, truncated, too large, unreadable).
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                fmt, (width, height), mode = im.format or "?", im.size, im.mode
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if fmt in ("JPEG", "MPO") else 1
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"unreadable: {exc}") from None
    if width <= 0 or height <= 0:
        raise BadImage(f"invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise BadImage(f"too large: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    if fmt in ("JPEG", "MPO"):
        _check_tail(path, size, b"\xff\xd9", _JPEG_TAIL, "JPEG")
    elif fmt == "PNG":
        _check_tail(path, size, b"IEND", _PNG_TAIL, "PNG")
    # TensorFlow's PNG decoder handles palette, alpha, grey and 16-bit PNGs; its JPEG decoder neither converts
    # CMYK/YCCK correctly nor applies EXIF rotation, so those go through Pillow.
    native = fmt == "PNG" or (fmt in ("JPEG", "MPO") and mode in ("L", "RGB") and orientation in (1, None))
    return ImageInfo(fmt, width, height, mode, native)


def _check_tail(path, size: int, marker: bytes, window: int, name: str) -> None:
    with open(path, "rb") as f:
        f.seek(max(0, size - window))
        tail = f.read()
    if marker not in tail:
        raise BadImage(f"truncated {name} (no end marker)")


def load_rgb(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """Fully decode any image Pillow reads into a ``uint8`` array of shape ``(height, width, channels)``.

    Animated images give their first frame; EXIF rotation is applied; 16-bit and float images are scaled to 8 bits;
    CMYK is converted to RGB; alpha is dropped.

    Raises:
        BadImage: when the file cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.seek(0)
                im = ImageOps.exif_transpose(im) if im.format in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") else im
                im.load()
                return to_uint8(im, channels)
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise BadImage(f"cannot decode: {exc}") from None


def to_uint8(im: Image.Image, channels: int = 3) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to ``uint8`` with 3 (RGB) or 1 (grey) channels."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's own convert() clips 16-bit values at 255 instead of scaling them.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255) else 255.0
        if im.mode == "F":
            lo, hi = float(a.min(initial=0)), float(a.max(initial=1))
            a, top = (a - lo), (hi - lo) or 1.0
        a = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        gray = a
        if channels == 1:
            return gray[..., None]
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA").convert("RGB")
    target = "L" if channels == 1 else "RGB"
    arr = np.asarray(im.convert(target), dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr
