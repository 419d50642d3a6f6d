"""Writing files atomically (a temporary file in the same folder, fsync'd, then ``os.replace``) and strict JSON.

Standard library only: the daemon writes its files with these too, and must never pay for the trainer's imports.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "clean_json", "display_path", "write_bytes", "write_json", "write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; results should get the permissions any other new file would.
_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same suffix) and move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the whole name as the suffix: Keras checks endings such as `.keras` and `.weights.h5`.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _FILE_MODE)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.filename:
            raise
        # Libraries writing for us (Keras' zip writer, h5py) raise without a file name, sometimes without an errno:
        # say which file could not be written, so "no space left on device" names the full filesystem.
        code = exc.errno or (errno.ENOSPC if "no space left" in str(exc).lower() else None)
        raise OSError(code, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (fsync'd, so a power cut leaves the old file or the new one)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, display_path(text).encode("utf-8"))


def display_path(text: str) -> str:
    """``text`` as valid UTF-8: bytes a file name held that are not UTF-8 (kept by Python as surrogates) are shown
    as ``\\xff`` escapes, so one odd name from an old archive or a Samba share cannot break a report or an event."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def clean_json(value):
    """Make a value strict-JSON safe: NaN/inf become null, tuples lists, numpy scalars Python numbers, paths and
    non-UTF-8 names strings."""
    if isinstance(value, dict):
        return {display_path(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return display_path(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(clean_json(obj), indent=2, ensure_ascii=False) + "\n")
