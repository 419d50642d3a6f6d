"""Hostile drops into a real daemon: every case ends in one terminal state with a specific reason, the daemon keeps
running, nothing dropped is altered or lost, and nothing outside the daemon's folders is touched.

These use the stand-in trainer (tests/fake_trainer.py): what is checked here is the daemon's side. The trainer's
side of hostile data (bad images, one class, ...) is in test_hostile_data.py.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, tree_digest, wait_for
from trainer.data.demo import make_shapes

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess(tmp_path / "d", limits={"max_classes": 50})
    yield d
    d.stop(signal.SIGKILL) if d.proc and d.proc.poll() is None else None


def _stage(d: DaemonProcess, name: str, job_text: str | None = "epochs: 2\n", classes: int = 2) -> Path:
    staging = d.root / "staging" / name
    make_shapes(staging, classes=classes, per_class=2, size_range=(16, 20), job=None)
    if job_text is not None:
        (staging / "job.yaml").write_text(job_text)
    return staging


def test_hostile_specs_are_rejected_one_by_one_and_nothing_is_lost_or_touched(daemon, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.yaml").write_text("epochs: 1\n")
    make_shapes(outside / "photos", classes=2, per_class=2, size_range=(16, 20))
    outside_before = tree_digest(outside)
    cases = {
        "malformed": ("epochs: [1, 2\n", "invalid YAML"),
        "not-a-mapping": ("- just\n- a list\n", "the top level must be a mapping"),
        "alias-bomb": (BILLION_LAUGHS, "YAML anchors and aliases"),
        "huge-yaml": ("# " + "x" * 400_000 + "\n", "file is too large"),
        "wrong-type": ("epochs: many\n", "epochs: must be an integer, got 'many'"),
        "out-of-range": ("data: {validation_split: 3}\n", "data.validation_split: must be < 1.0, got 3"),
        "unknown-key": ("epochs: 2\nmodle: {}\n", "modle: unknown key (did you mean 'model'?)"),
        "dotdot": ("data: {train: ../../outside/photos}\n", "data.train: must stay inside the job folder"),
        "absolute": (f"data: {{train: {outside / 'photos'}}}\n", "data.train: must be a path relative"),
        "python-tag": ("epochs: !!python/object/apply:os.system ['touch /tmp/pwned']\n", "invalid YAML"),
    }
    staged = {name: _stage(daemon, name, text) for name, (text, _) in cases.items()}
    # Links out of the job folder: a job.yaml, the training folder.
    staged["yaml-link"] = _stage(daemon, "yaml-link", None)
    os.symlink(outside / "secret.yaml", staged["yaml-link"] / "job.yaml")
    cases["yaml-link"] = (None, "is a symbolic link to")
    staged["train-link"] = _stage(daemon, "train-link", "data: {train: photos}\n")
    os.symlink(outside / "photos", staged["train-link"] / "photos")
    cases["train-link"] = (None, "data.train: resolves to")
    staged["many-classes"] = _stage(daemon, "many-classes", "epochs: 1\n")
    for i in range(60):
        (staged["many-classes"] / f"class {i:03d}").mkdir()
    cases["many-classes"] = (None, "holds 62 class folders; the limit is 50 (limits.max_classes")
    before = {name: tree_digest(path) for name, path in staged.items()}

    daemon.start()
    for name, path in staged.items():
        os.rename(path, daemon.inbox / name)
    jobs = {j["name"]: j for j in daemon.wait_jobs(len(cases), timeout=90)}
    assert set(jobs) == set(cases)
    for name, (_, expected) in cases.items():
        job = jobs[name]
        assert job["state"] == "failed" and job["outcome"] == "rejected", (name, job)
        assert expected in job["error"], (name, job["error"])
        error_txt = (daemon.outbox / job["id"] / "error.txt").read_text()
        assert expected in error_txt and "The dataset was kept in" in error_txt
        # Nothing the user dropped was changed: it is all in the kept folder, byte for byte.
        assert tree_digest(Path(job["path"])) == before[name], name
        assert not daemon.runs(job["id"]), f"{name}: a trainer was started for a rejected job"
    assert tree_digest(outside) == outside_before
    assert not Path("/tmp/pwned").exists()
    assert daemon.proc.poll() is None
    # ... and it still takes good work.
    daemon.drop("good", {"epochs": 2})
    good = wait_for(lambda: [j for j in daemon.jobs() if j["name"] == "good" and j["state"] == "succeeded"], 60)
    assert good


def test_odd_names_and_vanishing_folders(daemon):
    daemon.start()
    for name in ("with spaces", "ünïcödé-数据", "-rf", "--help", "new\nline", "a-folder.zip"):
        daemon.drop(name, {"epochs": 1})
    # A folder that disappears while settling, and one renamed while settling.
    daemon.drop("vanishing", {"epochs": 1})
    shutil.rmtree(daemon.inbox / "vanishing")
    daemon.drop("renamed-before", {"epochs": 1})
    os.rename(daemon.inbox / "renamed-before", daemon.inbox / "renamed-after")
    daemon.wait_jobs(7, timeout=60)
    # No late job for the vanished or renamed-away names: their events came before those of "renamed-after", which
    # is a job now, so the daemon has seen them all; once nothing waits to settle any more (the gauge is refreshed
    # after each pass of its loop), nothing can still become a job.
    wait_for(lambda: daemon.scrape()[("dropfit_inbox_pending", ())] == 0, 10, what="nothing left settling",
             show=daemon.describe)
    assert not os.listdir(daemon.inbox)
    jobs = daemon.jobs()
    assert sorted(j["name"] for j in jobs) == sorted(["with spaces", "ünïcödé-数据", "-rf", "--help", "new\nline",
                                                      "a-folder.zip", "renamed-after"])
    assert all(j["state"] == "succeeded" for j in jobs), jobs
    for job in jobs:  # ids are safe file names whatever the folder was called
        assert "\n" not in job["id"] and not job["id"].startswith("-") and " " not in job["id"]
    assert daemon.proc.poll() is None


def test_drop_names_that_are_not_utf8_become_jobs_like_any_other(daemon):
    """Folder and archive names from old archives or Samba shares hold bytes that are not UTF-8: they are claimed and
    run (ids sanitised, the original bytes shown as \\xNN), also after a restart in the middle of their claim."""
    import zipfile

    daemon.start()
    folder = os.fsdecode(b"caf\xe9-photos")
    daemon.drop("staged", {"epochs": 2})
    os.rename(daemon.inbox / "staged", daemon.inbox / folder)
    archive = daemon.root / "staging" / os.fsdecode(b"\xc4rchiv.zip")
    source = _stage(daemon, "zipped")
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(source.rglob("*")):
            z.write(path, path.relative_to(source.parent))
    os.rename(archive, daemon.inbox / archive.name)
    jobs = daemon.wait_jobs(2, timeout=60)
    assert sorted(j["name"] for j in jobs) == ["\\xc4rchiv.zip", "caf\\xe9-photos"], jobs
    assert all(j["state"] == "succeeded" for j in jobs), jobs
    for job in jobs:
        assert job["id"].isascii() and len(daemon.runs(job["id"])) == 1
        assert daemon.status(job["id"])["dataset"] == job["name"]
    assert sorted(os.listdir(daemon.inbox)) == []
    daemon.stop()
    daemon.start()  # the ledger reads back what it wrote
    assert sorted(j["name"] for j in daemon.jobs()) == ["\\xc4rchiv.zip", "caf\\xe9-photos"]


def test_the_same_dataset_dropped_twice_at_once_runs_twice_once_each(daemon):
    daemon.start()
    first = _stage(daemon, "twin-a", "epochs: 2\n")
    shutil.copytree(first, daemon.root / "staging" / "twin-b")
    os.rename(first, daemon.inbox / "twin")
    os.rename(daemon.root / "staging" / "twin-b", daemon.inbox / "twin copy")
    jobs = daemon.wait_jobs(2, timeout=60)
    assert sorted(j["name"] for j in jobs) == ["twin", "twin copy"]
    for job in jobs:
        assert job["state"] == "succeeded"
        assert len(daemon.runs(job["id"])) == 1
