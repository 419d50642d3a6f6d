"""Scanning datasets: class folders, CSV labels, bad files skipped with reasons, the stratified split."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from conftest import write_corrupt_files
from trainer.data.demo import make_shapes
from trainer.data.scan import DatasetError, scan_csv, scan_directory, split


@pytest.fixture
def small(tmp_path):
    return make_shapes(tmp_path / "ds", classes=3, per_class=6, size_range=(20, 40), seed=2)


def test_classes_are_sorted_folders_and_hidden_things_ignored(small):
    (small / ".hidden_class").mkdir()
    (small / ".hidden_class" / "x.png").write_bytes((small / "circle" / "circle_0000.png").read_bytes())
    (small / "__MACOSX").mkdir()
    (small / "circle" / ".DS_Store").write_bytes(b"\x00junk")
    (small / "job.yaml").write_text("epochs: 1")  # top-level files are not classes
    scan = scan_directory(small)
    assert scan.class_names == ["circle", "square", "triangle"]
    assert scan.counts() == {"circle": 6, "square": 6, "triangle": 6}
    assert scan.skipped == []


def test_bad_files_are_skipped_with_reasons_and_good_ones_kept(small):
    bad = write_corrupt_files(small / "square")
    scan = scan_directory(small)
    reasons = {s.path: s.reason for s in scan.skipped}
    assert set(reasons) == {os.path.join("square", name) for name in bad}
    assert reasons[os.path.join("square", "zero.jpg")] == "empty file (0 bytes)"
    assert reasons[os.path.join("square", "notes.txt")] == "not an image Pillow can read"
    assert "truncated PNG" in reasons[os.path.join("square", "truncated.png")]
    assert scan.counts()["square"] == 6


def test_class_subset_and_missing_or_empty_class_errors(small):
    scan = scan_directory(small, classes=["triangle", "circle"])
    assert scan.class_names == ["triangle", "circle"]
    assert {s.label for s in scan.samples} == {0, 1}
    with pytest.raises(DatasetError, match=r"classes: no folder named 'dogs' in .*found folders: \['circle'"):
        scan_directory(small, classes=["circle", "dogs"])
    (small / "empty").mkdir()
    (small / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"folder 'empty' .* holds no usable image"):
        scan_directory(small, classes=["circle", "empty"])
    # Without an explicit list, an empty class folder is left out with a warning rather than failing the job.
    scan = scan_directory(small)
    assert scan.class_names == ["circle", "square", "triangle"]
    assert any("'empty'" in w for w in scan.warnings)


def test_fewer_than_two_classes_is_an_error(tmp_path):
    one = make_shapes(tmp_path / "one", classes=1, per_class=3)
    with pytest.raises(DatasetError, match="needs at least 2 classes with usable images, found 1"):
        scan_directory(one)
    with pytest.raises(DatasetError, match="must be an existing directory"):
        scan_directory(tmp_path / "nope")


def test_symlinks_leaving_the_dataset_are_not_followed(small, tmp_path):
    outside = make_shapes(tmp_path / "outside", classes=2, per_class=2, seed=9)
    os.symlink(outside / "circle", small / "stolen_class")
    os.symlink(outside / "circle" / "circle_0000.png", small / "square" / "stolen.png")
    os.symlink(small / "circle" / "circle_0001.jpg", small / "square" / "inside_link.jpg")
    scan = scan_directory(small)
    assert "stolen_class" not in scan.class_names
    reasons = {s.path: s.reason for s in scan.skipped}
    assert reasons["stolen_class"] == "symlink pointing outside the dataset folder"
    assert reasons[os.path.join("square", "stolen.png")] == "symlink pointing outside the dataset folder"
    assert scan.counts()["square"] == 7  # the link that stays inside is a normal file


def test_nested_folders_inside_a_class_are_searched(small):
    (small / "circle" / "more" / "deeper").mkdir(parents=True)
    os.replace(small / "circle" / "circle_0000.png", small / "circle" / "more" / "deeper" / "x.png")
    assert scan_directory(small).counts()["circle"] == 6


def test_csv_labels(small, tmp_path):
    files = sorted(p.relative_to(small) for p in small.rglob("*") if p.is_file())
    lines = ["filename,label"]
    for f in files:
        lines.append(f"{f},{'round' if f.parts[0] == 'circle' else 'angular'}")
    lines += ["missing.png,round", "../escape.png,round", f"{files[0]},round"]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    scan = scan_csv(small, csv_path)
    assert scan.class_names == ["angular", "round"]
    assert scan.counts() == {"angular": 12, "round": 6}
    reasons = sorted(s.reason.split(": ", 1)[1] for s in scan.skipped)
    assert reasons == ["file not found", "listed more than once", "path leaves the dataset folder"]
    assert scan_csv(small, csv_path, classes=["round", "angular"]).class_names == ["round", "angular"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,x\n")
    with pytest.raises(DatasetError, match="must have a header with columns 'filename' and 'label'"):
        scan_csv(small, bad)
    # A label becomes a folder name (a prediction job's sorted/<label>/): a path is refused, naming the line.
    traversal = tmp_path / "traversal.csv"
    traversal.write_text(f"filename,label\n{files[0]},cat\n{files[1]},../../victim\n")
    with pytest.raises(DatasetError, match=r"traversal.csv' line 3: label '../../victim' cannot be a class name"):
        scan_csv(small, traversal)


def test_split_is_stratified_deterministic_and_keeps_every_class_in_training(small):
    scan = scan_directory(small)
    train, val = split(scan.samples, 0.34, seed=7)
    assert len(train) + len(val) == len(scan.samples)
    assert not {s.path for s in train} & {s.path for s in val}
    assert Counter(s.label for s in val) == {0: 2, 1: 2, 2: 2}
    _, again_val = split(list(reversed(scan.samples)), 0.34, seed=7)
    assert [s.path for s in again_val] == [s.path for s in val]
    _, other_val = split(scan.samples, 0.34, seed=8)
    assert {s.path for s in other_val} != {s.path for s in val}
    # Tiny classes: one image stays in training, two give one to validation.
    tiny = [s for s in scan.samples if s.label == 0][:1] + [s for s in scan.samples if s.label == 1][:2]
    t, v = split(tiny, 0.2, seed=1)
    assert Counter(s.label for s in t) == {0: 1, 1: 1} and Counter(s.label for s in v) == {1: 1}
    assert split(scan.samples, 0.0, seed=1)[1] == []
