"""Datasets dropped as .zip / .tar.gz: extracted safely or refused with the reason, and the archive kept."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import system_tool
from daemon.config import LimitsConfig
from daemon.unpack import ArchiveError, extract
from daemon_harness import DaemonProcess
from trainer.data.demo import make_shapes


def dataset(tmp_path: Path, name="pets") -> Path:
    return make_shapes(tmp_path / "src" / name, classes=2, per_class=3, size_range=(16, 20), job={"epochs": 2})


def zip_folder(folder: Path, archive: Path, top: str | None = None) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            zf.write(path, str(Path(top) / rel) if top else str(rel))
    return archive


def tar_folder(folder: Path, archive: Path, top: str | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=top or ".")
    return archive


def add_zip_member(archive: Path, name: str, data: bytes = b"x", mode: int | None = None) -> None:
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)


def add_tar_member(archive: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    out = archive.with_name("with-" + archive.name)
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        dst.addfile(member, io.BytesIO(data) if data else None)
    return out


def test_zip_and_tar_extract_with_a_single_top_folder_descended_into(tmp_path):
    src = dataset(tmp_path)
    for archive in (zip_folder(src, tmp_path / "a.zip", top="pets"), tar_folder(src, tmp_path / "b.tar.gz"),
                    tar_folder(src, tmp_path / "c.tgz", top="pets")):
        target = tmp_path / f"out-{archive.name}"
        extract(archive, target)
        assert sorted(p.name for p in target.iterdir()) == ["circle", "job.yaml", "square"], archive
        assert len(list(target.rglob("*.png"))) + len(list(target.rglob("*.jpg"))) == 6
        assert not list(tmp_path.glob(".out-*"))  # no partial folder left behind


@pytest.mark.parametrize("name, mode, expected", [
    ("../../evil.txt", None, "would be written outside the dataset folder"),
    ("/etc/evil.txt", None, "would be written outside the dataset folder"),
    ("pets/../../evil.txt", None, "would be written outside the dataset folder"),
    ("C:/evil.txt", None, "would be written outside the dataset folder"),
    ("pets/link", stat.S_IFLNK | 0o777, "is a symbolic link"),
])
def test_hostile_zip_members_are_refused(tmp_path, name, mode, expected):
    archive = zip_folder(dataset(tmp_path), tmp_path / "evil.zip", top="pets")
    add_zip_member(archive, name, b"/etc/passwd" if mode else b"pwned", mode)
    target = tmp_path / "out"
    with pytest.raises(ArchiveError, match=expected):
        extract(archive, target)
    assert not target.exists() and not (tmp_path / "evil.txt").exists() and not Path("/etc/evil.txt").exists()
    assert not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("kind, expected", [
    (tarfile.SYMTYPE, "is a link"), (tarfile.LNKTYPE, "is a link"), (tarfile.CHRTYPE, "not a regular file"),
    (tarfile.FIFOTYPE, "not a regular file"),
])
def test_tar_links_and_devices_are_refused(tmp_path, kind, expected):
    member = tarfile.TarInfo("pets/circle/evil")
    member.type, member.linkname = kind, "/etc/passwd"
    archive = add_tar_member(tar_folder(dataset(tmp_path), tmp_path / "t.tar.gz", top="pets"), member)
    with pytest.raises(ArchiveError, match=expected):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_limits_on_size_count_ratio_and_duplicates(tmp_path):
    src = dataset(tmp_path)
    archive = zip_folder(src, tmp_path / "a.zip")
    with pytest.raises(ArchiveError, match=r"more than 3 files \(limits.archive_max_files in the daemon's config\)"):
        extract(archive, tmp_path / "o1", LimitsConfig(archive_max_files=3))
    with pytest.raises(ArchiveError,
                       match=r"extracts to more than 1000 bytes \(limits.archive_max_bytes in the daemon's config\)"):
        extract(archive, tmp_path / "o2", LimitsConfig(archive_max_bytes=1000))
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("job.yaml", "epochs: 1\n")
        zf.writestr("a/zeros.png", b"\0" * (64 << 20))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ArchiveError, match=r"compression ratio above 200:1 \(limits.archive_max_ratio in the daemon's "
                                           r"config\).*decompression bomb"):
        extract(bomb, tmp_path / "o3")
    dup = zip_folder(src, tmp_path / "dup.zip")
    with pytest.warns(UserWarning, match="Duplicate name"):
        add_zip_member(dup, "job.yaml", b"epochs: 5\n")
    with pytest.raises(ArchiveError, match="appears twice"):
        extract(dup, tmp_path / "o4")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(ArchiveError, match="unreadable archive"):
        extract(broken, tmp_path / "o5")
    empty = tmp_path / "empty.tar.gz"
    tarfile.open(empty, "w:gz").close()
    with pytest.raises(ArchiveError, match="the archive is empty"):
        extract(empty, tmp_path / "o6")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]


def test_the_daemon_trains_from_an_archive_and_refuses_a_hostile_one_keeping_both(tmp_path):
    d = DaemonProcess(tmp_path / "d")
    try:
        d.start()
        good = zip_folder(dataset(tmp_path, "cats"), tmp_path / "cats.zip", top="cats")
        evil = zip_folder(dataset(tmp_path, "dogs"), tmp_path / "dogs.zip", top="dogs")
        add_zip_member(evil, "../../../escaped.txt")
        evil_bytes = evil.read_bytes()
        os.rename(good, d.inbox / "cats.zip")
        os.rename(evil, d.inbox / "dogs.tar.gz.zip")
        (d.inbox / "notes.txt").write_text("not a job, ignored")
        jobs = {j["name"]: j for j in d.wait_jobs(2, timeout=60)}
        cats, dogs = jobs["cats.zip"], jobs["dogs.tar.gz.zip"]
        assert cats["state"] == "succeeded", cats
        assert Path(cats["path"]) == d.archive / cats["id"] / "cats.zip" and Path(cats["path"]).is_file()
        assert dogs["state"] == "failed" and dogs["outcome"] == "rejected"
        assert "'../../../escaped.txt' would be written outside the dataset folder" in dogs["error"]
        kept = Path(dogs["path"])
        assert kept.read_bytes() == evil_bytes  # the archive as dropped, byte for byte
        assert str(kept) in (d.outbox / dogs["id"] / "error.txt").read_text()
        assert not list(tmp_path.rglob("escaped.txt"))
        assert (d.inbox / "notes.txt").exists() and len(d.jobs()) == 2
    finally:
        d.stop(signal.SIGKILL)


@pytest.mark.parametrize("policy", ["keep", "delete"])
def test_after_success_keep_or_delete_for_folders_and_archives(tmp_path, policy):
    d = DaemonProcess(tmp_path / "d", after_success=policy)
    try:
        d.start()
        os.rename(zip_folder(dataset(tmp_path, "cats"), tmp_path / "cats.zip"), d.inbox / "cats.zip")
        d.drop("dogs", {"epochs": 1})
        jobs = {j["name"]: j for j in d.wait_jobs(2, timeout=60)}
        assert all(j["state"] == "succeeded" for j in jobs.values())
        cats, dogs = jobs["cats.zip"], jobs["dogs"]
        if policy == "keep":
            assert Path(dogs["path"]).is_dir() and Path(cats["path"]).is_dir()
            assert (Path(cats["path"]).parent / "cats.zip").is_file()  # the archive stays beside its extraction
        else:
            assert dogs["path"] is None and cats["path"] is None  # absent, never a sentinel string
            assert not list((d.state / "jobs").iterdir()) and not list(d.archive.iterdir())
        assert not [p for p in (d.state / "jobs").rglob("work")]  # checkpoints are not kept after success
    finally:
        d.stop(signal.SIGKILL)


def encrypted_zip(folder: Path, archive: Path) -> Path:
    """A password-protected zip, made by Info-ZIP's ``zip -P`` as users make them."""
    zip_tool = system_tool("zip", "Debian: apt-get install zip")
    subprocess.run([zip_tool, "-q", "-r", "-P", "secret", str(archive), "."], cwd=folder, check=True)
    return archive


def deflate64_zip(folder: Path, archive: Path) -> Path:
    """A zip whose members say they are compressed with Deflate64 (method 9), as Windows' Explorer writes large
    ones. Python's zipfile cannot decompress that method; the method field is set in both headers."""
    zip_folder(folder, archive)
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
    for info in infos:
        data[info.header_offset + 8:info.header_offset + 10] = (9).to_bytes(2, "little")  # local header
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) != -1:  # central directory entries
        data[at + 10:at + 12] = (9).to_bytes(2, "little")
        at += 4
    archive.write_bytes(bytes(data))
    return archive


def test_encrypted_and_unreadable_members_are_refused_naming_the_member(tmp_path):
    src = dataset(tmp_path)
    with pytest.raises(ArchiveError, match=r"member '.*' is encrypted \(a password-protected zip\)"):
        extract(encrypted_zip(src, tmp_path / "locked.zip"), tmp_path / "o1")
    with pytest.raises(ArchiveError, match=r"member '.*' cannot be read: .*compression method.*Deflate64"):
        extract(deflate64_zip(src, tmp_path / "d64.zip"), tmp_path / "o2")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]


def test_a_password_protected_zip_is_rejected_and_the_daemon_serves_on_and_restarts(tmp_path):
    """It once raised out of the claim: the job stuck in `claiming`, and every later start hung in recovery."""
    d = DaemonProcess(tmp_path / "d")
    try:
        d.start()
        locked = encrypted_zip(dataset(tmp_path, "locked"), tmp_path / "locked.zip")
        locked_bytes = locked.read_bytes()
        os.rename(locked, d.inbox / "locked.zip")
        os.rename(deflate64_zip(dataset(tmp_path, "old"), tmp_path / "old.zip"), d.inbox / "old.zip")
        d.drop("fine", {"epochs": 1})
        jobs = {j["name"]: j for j in d.wait_jobs(3, timeout=60)}
        for name, reason in (("locked.zip", "is encrypted"), ("old.zip", "cannot be read")):
            job = jobs[name]
            assert job["state"] == "failed" and job["outcome"] == "rejected" and job["error_kind"] == "archive"
            assert reason in job["error"] and "member '" in job["error"]
        assert Path(jobs["locked.zip"]["path"]).read_bytes() == locked_bytes  # kept as dropped
        assert jobs["fine"]["state"] == "succeeded"
        d.stop()
        d.start()  # a restart finds nothing half done and serves at once
        assert d.get("/healthz")[0] == 200 and len(d.jobs()) == 3
    finally:
        d.stop(signal.SIGKILL)
