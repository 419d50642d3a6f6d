"""Hostile and odd data through the real trainer (`python -m trainer run`, as the daemon runs it): bad files are
skipped with a reason, odd-but-valid images train, unusable datasets stop with a clear error, nothing is altered.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import events, run_trainer, write_corrupt_files
from trainer.demo import make_shapes


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_odd_and_hostile_images_in_one_job(tmp_path):
    job = make_shapes(tmp_path / "job", classes=2, per_class=8, size_range=(24, 40),
                      job={"target_size": 24, "epochs": 1, "batch_size": 4, "model": {"architecture": "recipe"}})
    circle, square = job / "circle", job / "square"
    bad = write_corrupt_files(circle)
    # A decompression bomb: a small file that decodes to 81 megapixels.
    Image.new("L", (9000, 9000)).save(circle / "bomb.png", optimize=True)
    assert (circle / "bomb.png").stat().st_size < 200_000
    rgb = np.random.default_rng(0).integers(0, 255, (30, 30, 3), np.uint8)
    # Odd but valid: must train, not be skipped.
    Image.new("I;16", (30, 30), 40000).save(square / "sixteen-bit.tif")
    Image.fromarray(rgb).convert("CMYK").save(square / "cmyk.jpg", "JPEG")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(square / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(rgb).save(square / "really-a-png.jpg", "PNG")  # wrong extension
    for name in ("with space.png", "ünïcödé.png", "-leading-dash.png", "new\nline.png"):
        Image.fromarray(rgb).save(square / name, "PNG")
    (circle / "empty-subfolder").mkdir()
    before = digest(job)

    proc = run_trainer("run", job, "--out", tmp_path / "out", "--work", tmp_path / "work", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stream = events(proc.stdout)
    assert stream[-1]["event"] == "finished"
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    skipped = {Path(s["file"]).name: s["reason"] for s in info["skipped"]}
    assert set(skipped) == {*bad, "bomb.png"}, skipped
    assert "exceeds the limit" in skipped["bomb.png"]
    assert info["counts"]["square"]["total"] == 8 + 8  # every odd-but-valid image was used
    assert digest(job) == before  # the trainer never writes into the dataset


def test_unusable_datasets_stop_with_a_clear_error(tmp_path):
    one = make_shapes(tmp_path / "one", classes=1, per_class=4, size_range=(16, 20), job={"epochs": 1})
    empty_class = make_shapes(tmp_path / "empty", classes=2, per_class=4, size_range=(16, 20),
                              job={"epochs": 1, "data": {"classes": ["circle", "square", "nothing"]}})
    (empty_class / "nothing").mkdir()
    for job, expected in ((one, "at least 2 classes"), (empty_class, "'nothing'")):
        proc = run_trainer("run", job, "--out", tmp_path / f"out-{job.name}", timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        [error] = [e for e in events(proc.stdout) if e["event"] == "error"]
        assert error["kind"] == "data" and expected in error["message"], error


def test_names_that_are_not_utf8_are_read_like_any_other(tmp_path):
    """Datasets copied from old archives or Samba shares hold such names; one of them once failed the whole job."""
    job = make_shapes(tmp_path / "job", classes=2, per_class=6, size_range=(16, 24),
                      job={"target_size": 16, "epochs": 1, "batch_size": 4, "model": {"architecture": "recipe"}})
    root = bytes(job)
    # A file in a class folder, and a whole class folder, with Latin-1 bytes in their names.
    os.rename(root + b"/square/" + os.listdir(root + b"/square")[0], root + b"/square/bad\xff\xfe.png")
    os.rename(root + b"/circle", root + b"/caf\xe9")
    proc = run_trainer("run", job, "--out", tmp_path / "out", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stream = events(proc.stdout)
    assert stream[-1]["event"] == "finished" and stream[0]["classes"] == ["caf\\xe9", "square"]
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["skipped"] == [] and info["counts"]["square"]["total"] == 6  # used, not skipped
    assert json.loads((tmp_path / "out" / "labels.json").read_text())["classes"] == ["caf\\xe9", "square"]
