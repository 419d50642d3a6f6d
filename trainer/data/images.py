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

# Larger images are refused before decoding (a 50-megapixel photo is fine, a decompression bomb is not). JPEGs are
# decoded at up to 1/8 scale straight from the DCT (`trainer.data.pipeline.decode_native`, `load_rgb`'s draft), so
# they may be `JPEG_ALLOWANCE` times larger: a 108-megapixel phone photo (12,000 x 9,000) decodes as 1.7 megapixels.
MAX_PIXELS = 64_000_000
JPEG_ALLOWANCE = 5

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

    JPEG and PNG headers (nearly every dataset) are parsed directly from the first bytes of the file, which is many
    times faster than Pillow's plugins; anything else, or anything unusual, goes to Pillow.

    Raises:
        BadImage: with a human-readable reason (empty, not an image, truncated, too large, unreadable).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BadImage("empty file (0 bytes)")
            info = _parse_header(f.read(_HEAD))
            if info is not None:
                _check_size(info.width, info.height, max_pixels, info.format)
                marker, window = (b"IEND", _PNG_TAIL) if info.format == "PNG" else (b"\xff\xd9", _JPEG_TAIL)
                f.seek(max(0, size - window))
                if marker not in f.read(window):
                    raise BadImage(f"truncated {info.format} (no end marker)")
                return info
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except IsADirectoryError:
        raise BadImage("is a folder, not a file") from None
    except OSError as exc:
        raise BadImage(f"unreadable: {exc.strerror or exc}") from None
    return _probe_pillow(path, size, max_pixels)


def _check_size(width: int, height: int, max_pixels: int, fmt: str = "?") -> None:
    if width <= 0 or height <= 0:
        raise BadImage(f"invalid dimensions {width}x{height}")
    jpeg = fmt in ("JPEG", "MPO")
    limit = max_pixels * JPEG_ALLOWANCE if jpeg else max_pixels
    if width * height > limit:
        hint = "" if jpeg else f" (a JPEG may have {max_pixels * JPEG_ALLOWANCE}: it is decoded at reduced scale)"
        raise BadImage(f"too large: {width}x{height} = {width * height} pixels exceeds the limit of {limit} for "
                       f"{'JPEG' if jpeg else 'this format'}{hint}")


_HEAD = 64 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
# Baseline, extended and progressive Huffman frames; libjpeg-turbo decodes these. Others (lossless, arithmetic,
# hierarchical) are left to Pillow.
_SOF_NATIVE = {0xC0, 0xC1, 0xC2}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _parse_header(head: bytes) -> ImageInfo | None:
    """ImageInfo from the first bytes of a JPEG or PNG, or None to let Pillow decide."""
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 29:
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        depth, colour = head[24], head[25]
        mode = _PNG_MODES.get(colour)
        if mode is None or depth not in (1, 2, 4, 8, 16):
            return None
        return ImageInfo("PNG", width, height, "I;16" if depth == 16 and mode == "L" else mode, True)
    if head[:3] != b"\xff\xd8\xff":
        return None
    return _parse_jpeg(head)


def _parse_jpeg(head: bytes) -> ImageInfo | None:
    i, orientation, n = 2, 1, len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(head[i + 2:i + 4], "big")
        segment = head[i + 4:i + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(segment[6:])
        elif marker in _SOF_NATIVE or marker in _SOF_OTHER:
            if len(segment) < 6:
                return None
            precision, height = segment[0], int.from_bytes(segment[1:3], "big")
            width, components = int.from_bytes(segment[3:5], "big"), segment[5]
            mode = {1: "L", 3: "RGB", 4: "CMYK"}.get(components)
            if mode is None or height == 0:  # height 0 means "defined later" (DNL): rare, let Pillow judge
                return None
            native = marker in _SOF_NATIVE and precision == 8 and mode != "CMYK" and orientation == 1
            return ImageInfo("JPEG", width, height, mode, native)
        elif marker == 0xDA:  # start of scan before any frame header: not a JPEG we understand
            return None
        i += 2 + length
    return None  # the frame header lies beyond the bytes read (huge metadata): let Pillow look


def _exif_orientation(tiff: bytes) -> int:
    """The EXIF orientation tag (1 = upright) from a TIFF-structured APP1 payload."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        if len(entry) < 12:
            break
        if int.from_bytes(entry[:2], order) == _EXIF_ORIENTATION:
            return int.from_bytes(entry[8:10], order) or 1
    return 1


def _probe_pillow(path, size: int, max_pixels: int) -> ImageInfo:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                fmt, (width, height), mode = im.format or "?", im.size, im.mode
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if fmt in ("JPEG", "MPO") else 1
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"unreadable: {exc}") from None
    _check_size(width, height, max_pixels, fmt)
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


def load_rgb(path: str | os.PathLike, channels: int = 3, target_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode any image Pillow reads into a ``uint8`` array of shape ``(height, width, channels)``.

    Animated images give their first frame; EXIF rotation is applied; 16-bit and float images are scaled to 8 bits;
    CMYK is converted to RGB; alpha is dropped. With ``target_size`` a large JPEG is decoded at 1/2, 1/4 or 1/8
    scale (as large as still covers ``target_size`` in either orientation), as the native decoder does: a fraction of
    the memory and time, and a proper low-pass filter.

    Raises:
        BadImage: when the file cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.seek(0)
                if target_size is not None and im.format in ("JPEG", "MPO"):
                    side = max(target_size)  # before the EXIF rotation: either way round
                    im.draft(im.mode if im.mode in ("L", "RGB", "CMYK") else None, (side, side))
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
