"""What becomes of a succeeded job's dataset (config ``after_success``): archived, kept where it is, or deleted.

Failed jobs always keep theirs in ``state/jobs/<job-id>/``. For a dataset dropped as an archive, the archive file is
what is kept: its extracted copy can always be made again.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from daemon.intake import move_tree
from daemon.unpack import archive_kind


def put_away(job_state: Path, dataset: Path, name: str, archive: Path, policy: str) -> Path | str | None:
    """Apply ``policy`` to a finished job's dataset; returns its new path, ``""`` if deleted, None if unchanged.

    ``job_state`` is ``state/jobs/<job-id>``, ``archive`` is ``<archive_dir>/<job-id>``, ``name`` the inbox name.
    Safe to call again after a crash part way. Raises OSError if the dataset cannot be moved or deleted.
    """
    shutil.rmtree(job_state / "work", ignore_errors=True)
    owned = dataset.is_relative_to(job_state)
    dropped_archive = job_state / name
    if owned and policy != "keep" and archive_kind(name) and dropped_archive.is_file():
        shutil.rmtree(dataset, ignore_errors=True)
        dataset, archive = dropped_archive, archive / name
    result: Path | str | None = None
    if policy == "archive" and owned:
        if dataset.is_file():
            archive.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(dataset, archive)
        elif dataset.exists():
            move_tree(dataset, archive)
        if archive.exists():  # also when a crash came after the move, before the ledger heard of it
            result = archive
    elif policy == "delete" and dataset.exists():
        shutil.rmtree(dataset) if dataset.is_dir() else dataset.unlink()
        result = ""
    with contextlib.suppress(OSError):
        job_state.rmdir()
    return result
