"""Datasets dropped as archives (``inbox/<name>.zip``, ``.tar.gz``, ``.tgz``, ``.tar``): safe extraction.

An archive is untrusted input, so nothing in it is taken on faith:

- member names must stay inside the target (no absolute paths, no ``..``, no drive letters): no zip-slip;
- only regular files and folders are extracted: symlinks, hard links, devices and FIFOs are refused;
- total size, file count and compression ratio are limited, counting the bytes actually written rather than
  trusting the sizes the archive declares (a zip bomb can lie in its headers);
- extraction goes to a hidden sibling folder and is renamed into place only when complete, so a crash or a refusal
  never leaves a half-extracted dataset behind.

If the archive holds a single folder (the usual result of zipping a dataset folder), that folder is the dataset.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from daemon.config import LimitsConfig

SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
_CHUNK = 1 << 20
_SKIPPED = ("__MACOSX",)


class ArchiveError(ValueError):
    """The archive is unreadable or breaks a rule; the message says which member and why."""


# What a member that cannot be read raises, besides the archive modules' own errors: an unsupported compression
# method (NotImplementedError), a corrupt stream (zlib, lzma). (A password is found before reading: flag bit 0.)
_UNREADABLE = (zipfile.BadZipFile, tarfile.TarError, EOFError, NotImplementedError, zlib.error, lzma.LZMAError)


def archive_kind(name: str) -> str | None:
    """``zip``, ``tar`` or None, from the file name."""
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    return None


def _member_path(name: str) -> PurePosixPath | None:
    """The member's relative path, None for entries we skip; ArchiveError for names that would escape."""
    clean = name.replace("\\", "/")
    path = PurePosixPath(clean)
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":") or ".." in path.parts:
        raise ArchiveError(f"member {name!r} would be written outside the dataset folder (absolute path or '..')")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts or parts[0] in _SKIPPED or any(p.startswith("._") for p in parts):
        return None
    if any("\x00" in p for p in parts):
        raise ArchiveError(f"member {name!r} has a NUL byte in its name")
    return PurePosixPath(*parts)


class _Budget:
    def __init__(self, archive: Path, limits: LimitsConfig):
        self.limits, self.files, self.bytes = limits, 0, 0
        self.archive_size = max(archive.stat().st_size, 1)

    def add_file(self, name: str) -> None:
        self.files += 1
        if self.files > self.limits.archive_max_files:
            raise ArchiveError(f"more than {self.limits.archive_max_files} files (limits.archive_max_files in the "
                               f"daemon's config); at {name!r}")

    def add_bytes(self, n: int, name: str) -> None:
        self.bytes += n
        if self.bytes > self.limits.archive_max_bytes:
            raise ArchiveError(f"extracts to more than {self.limits.archive_max_bytes} bytes "
                               f"(limits.archive_max_bytes in the daemon's config); at {name!r}")
        if self.bytes > 1 << 20 and self.bytes / self.archive_size > self.limits.archive_max_ratio:
            raise ArchiveError(f"compression ratio above {self.limits.archive_max_ratio:g}:1 "
                               f"(limits.archive_max_ratio in the daemon's config): "
                               f"{self.archive_size} bytes expand to more than {self.bytes}; at {name!r} "
                               "(a decompression bomb?)")


def _write(open_stream, target: Path, name: str, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: a name that repeats in the archive (or a path that is a folder) is refused, never overwritten.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out:
        try:
            with open_stream() as stream:
                while chunk := stream.read(_CHUNK):
                    budget.add_bytes(len(chunk), name)
                    out.write(chunk)
        except ArchiveError:
            raise
        except _UNREADABLE as exc:
            raise ArchiveError(f"member {name!r} cannot be read: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, NotImplementedError):
        return f"{text} (a compression method Python's zipfile cannot read, e.g. Deflate64; re-zip it with Deflate)"
    return text


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _member_path(info.filename)
            if rel is None:
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"member {info.filename!r} is a symbolic link; links are not extracted")
            if info.is_dir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if info.flag_bits & 0x1:
                raise ArchiveError(f"member {info.filename!r} is encrypted (a password-protected zip); dropfit "
                                   "cannot read it: zip the dataset without a password")
            budget.add_file(info.filename)
            _write(lambda info=info: zf.open(info), dest / rel, info.filename, budget)


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            rel = _member_path(member.name)
            if rel is None:
                continue
            if member.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg():
                what = "a link" if member.issym() or member.islnk() else "not a regular file"
                raise ArchiveError(f"member {member.name!r} is {what}; only files and folders are extracted")
            budget.add_file(member.name)
            _write(lambda member=member: tf.extractfile(member), dest / rel, member.name, budget)


def extract(archive: Path, dataset: Path, limits: LimitsConfig | None = None) -> None:
    """Extract ``archive`` so that ``dataset`` becomes the dataset folder; ArchiveError says what is wrong."""
    kind = archive_kind(archive.name)
    if kind is None:
        raise ArchiveError(f"{archive.name}: not an archive dropfit reads; expected one of {', '.join(SUFFIXES)}")
    partial = dataset.with_name(f".{dataset.name}.extracting")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        budget = _Budget(archive, limits or LimitsConfig())
        if kind == "zip":
            _extract_zip(archive, partial, budget)
        else:
            _extract_tar(archive, partial, budget)
        root = _dataset_root(partial)
        if root is None:
            raise ArchiveError("the archive is empty")
        os.rename(root, dataset)
    except ArchiveError:
        raise
    except _UNREADABLE as exc:
        raise ArchiveError(f"unreadable archive: {_reason(exc)}") from None
    except FileExistsError as exc:
        raise ArchiveError(f"member {exc.filename!r} appears twice in the archive") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _dataset_root(folder: Path) -> Path | None:
    """The folder itself, or its only subfolder when it holds nothing else (a zipped dataset folder)."""
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    if not entries:
        return None
    if len(entries) == 1 and entries[0].is_dir() and not (folder / "job.yaml").exists():
        return Path(entries[0].path)
    return folder
