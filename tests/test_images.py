"""Image probing and decoding for every mode and format users drop: the fast path and the Pillow path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer.data.images import BadImage, load_rgb, probe


def save(tmp_path, name, im, fmt, **kw):
    path = tmp_path / name
    im.save(path, fmt, **kw)
    return path


def test_jpeg_and_png_take_the_native_path(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8))
    for name, im, fmt in [("a.jpg", rgb, "JPEG"), ("g.jpg", rgb.convert("L"), "JPEG"), ("a.png", rgb, "PNG"),
                          ("p.png", rgb.convert("P"), "PNG"), ("a16.png", Image.new("I;16", (8, 8), 4000), "PNG")]:
        info = probe(save(tmp_path, name, im, fmt))
        assert info.native, name
    assert (probe(tmp_path / "a.jpg").width, probe(tmp_path / "a.jpg").height) == (40, 30)


def test_other_formats_and_modes_take_the_pillow_path(tmp_path):
    rgb = Image.new("RGB", (20, 10), (200, 30, 40))
    cmyk = save(tmp_path, "c.jpg", rgb.convert("CMYK"), "JPEG")
    assert not probe(cmyk).native
    for name, fmt in [("b.bmp", "BMP"), ("w.webp", "WEBP"), ("t.tif", "TIFF"), ("g.gif", "GIF")]:
        assert not probe(save(tmp_path, name, rgb, fmt)).native, name
    rotated = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb.save(rotated, "JPEG", exif=exif)
    assert not probe(rotated).native
    assert load_rgb(rotated).shape == (20, 10, 3)  # EXIF rotation applied: width and height swap


def test_decoding_odd_modes_gives_sensible_uint8_rgb(tmp_path):
    cmyk = save(tmp_path, "c.jpg", Image.new("RGB", (16, 16), (220, 20, 20)).convert("CMYK"), "JPEG", quality=95)
    px = load_rgb(cmyk)[8, 8]
    assert px.dtype == np.uint8 and px[0] > 180 and px[1] < 60 and px[2] < 60  # still red
    grad = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    sixteen = save(tmp_path, "g16.tif", Image.fromarray(grad), "TIFF")
    out = load_rgb(sixteen)
    assert out.shape == (8, 8, 3) and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # scaled, not clipped
    assert load_rgb(sixteen, channels=1).shape == (8, 8, 1)
    frames = [Image.new("RGB", (12, 12), c) for c in [(0, 0, 255), (255, 0, 0)]]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50)
    assert load_rgb(gif)[6, 6, 2] > 200  # the first (blue) frame
    rgba = save(tmp_path, "a.png", Image.new("RGBA", (5, 5), (10, 200, 10, 0)), "PNG")
    assert load_rgb(rgba).shape == (5, 5, 3)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file (0 bytes)"),
    (b"hello world", "not an image Pillow can read"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 10, "not an image Pillow can read"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image Pillow can read|unreadable"),
])
def test_bad_files_have_reasons(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImage) as info:
        probe(path)
    assert any(str(info.value).startswith(r) for r in reason.split("|")), str(info.value)


def test_pixel_limit_stops_decompression_bombs_before_decoding(tmp_path):
    path = save(tmp_path, "big.png", Image.new("L", (4000, 3000)), "PNG")  # compresses to a few KB
    assert path.stat().st_size < 100_000
    with pytest.raises(BadImage, match=r"too large: 4000x3000 = 12000000 pixels exceeds the limit of 1000000"):
        probe(path, max_pixels=1_000_000)
    assert probe(path).native


def test_truncated_files_are_detected(tmp_path):
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8))
    jpg = save(tmp_path, "x.jpg", im, "JPEG")
    jpg.write_bytes(jpg.read_bytes()[:-600])
    with pytest.raises(BadImage, match="truncated JPEG"):
        probe(jpg)
    png = save(tmp_path, "x.png", im, "PNG")
    png.write_bytes(png.read_bytes()[:-20])
    with pytest.raises(BadImage, match="truncated PNG"):
        probe(png)
    with pytest.raises(BadImage, match="cannot decode"):
        load_rgb(jpg)


def test_fast_header_parsing_agrees_with_pillow(tmp_path):
    from trainer.data.images import _parse_header, _probe_pillow

    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 53, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 8
    cases = [("a.jpg", rgb, "JPEG", {}), ("p.jpg", rgb, "JPEG", {"progressive": True}),
             ("g.jpg", rgb.convert("L"), "JPEG", {}), ("c.jpg", rgb.convert("CMYK"), "JPEG", {}),
             ("r.jpg", rgb, "JPEG", {"exif": exif}), ("big-exif.jpg", rgb, "JPEG", {"icc_profile": b"x" * 30000}),
             ("l.png", rgb.convert("L"), "PNG", {}), ("rgb.png", rgb, "PNG", {}),
             ("p.png", rgb.convert("P"), "PNG", {}),
             ("rgba.png", rgb.convert("RGBA"), "PNG", {}), ("la.png", rgb.convert("LA"), "PNG", {}),
             ("i16.png", Image.new("I;16", (9, 7), 3000), "PNG", {})]
    for name, im, fmt, kw in cases:
        path = tmp_path / name
        im.save(path, fmt, **kw)
        fast = _parse_header(path.read_bytes()[:65536])
        slow = _probe_pillow(path, path.stat().st_size, 10**8)
        assert fast is not None, name
        assert (fast.format, fast.width, fast.height, fast.native) == (slow.format, slow.width, slow.height,
                                                                      slow.native), name
