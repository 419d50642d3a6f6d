"""What becomes of a succeeded job's dataset (config ``after_success``): archived, kept where it is, or deleted.

Failed jobs always keep theirs in ``state/jobs/<job-id>/``. For a dataset dropped as an archive, the archive file is
what is kept: its extracted copy can always be made again. Whatever the ledger says, nothing outside the job's own
state folder is ever moved or deleted here.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from contract.files import SPEC_FILE
from daemon.intake import move_tree
from daemon.unpack import archive_kind

log = logging.getLogger(__name__)
SCRATCH = ("work", "slurm")  # what a job's state folder holds besides its dataset and spec
# Written first and removed last: a clean-up a crash cut short is finished with the policy it started with, and a
# dataset kept on purpose (after_success: keep) is never mistaken for one (whatever the config says later).
MARKER = ".after-success"


def unfinished(job_state: Path) -> str | None:
    """The policy of a clean-up that did not finish in ``job_state``, if one did not: ``None`` when there is none to
    finish, ``""`` when it never started (the job's spec is still there: use the current policy)."""
    try:
        return (job_state / MARKER).read_text().strip()
    except FileNotFoundError:
        return "" if (job_state / SPEC_FILE).exists() else None
    except OSError:
        return None


@dataclass(frozen=True)
class Retained:
    """Where a succeeded job's dataset is now (None: deleted); ``changed`` if it moved or went."""

    path: Path | None
    changed: bool


def owned_by(job_state: Path, path: Path | None) -> bool:
    """Whether ``path`` lies strictly inside ``job_state`` (links resolved): the only places we may delete."""
    if path is None:
        return False
    root, target = job_state.resolve(), path.resolve()
    return target != root and target.is_relative_to(root)


def put_away(job_state: Path, dataset: Path | None, name: str, archive: Path, policy: str) -> Retained:
    """Apply ``policy`` to a finished job's dataset.

    ``job_state`` is ``state/jobs/<job-id>``, ``archive`` is ``<archive_dir>/<job-id>``, ``name`` the inbox name.
    Safe to call again after a crash part way. Raises OSError if the dataset cannot be moved or deleted. The marker
    stays until `finish` is called, after the ledger has the result: a crash before that redoes this with the same
    policy.
    """
    if job_state.is_dir():
        (job_state / MARKER).write_text(policy + "\n")
    for scratch in SCRATCH:  # checkpoints, events, batch scripts: nothing anyone needs after a success
        shutil.rmtree(job_state / scratch, ignore_errors=True)
    (job_state / SPEC_FILE).unlink(missing_ok=True)  # its copy for users is outbox/<id>/job.resolved.yaml
    result = Retained(dataset, False)
    if not owned_by(job_state, dataset):
        if dataset is not None and policy != "keep":
            log.warning("not touching %s: it is not inside %s", dataset, job_state)
        return result
    dropped_archive = job_state / name
    if policy != "keep" and archive_kind(name) and dropped_archive.is_file():
        shutil.rmtree(dataset, ignore_errors=True)
        dataset, archive = dropped_archive, archive / name
    if policy == "archive":
        if dataset.is_file():
            archive.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(dataset, archive)
        elif dataset.exists():
            move_tree(dataset, archive)
        if archive.exists():  # also when a crash came after the move, before the ledger heard of it
            result = Retained(archive, True)
    elif policy == "delete":
        if dataset.is_dir() and not dataset.is_symlink():
            shutil.rmtree(dataset)
        elif dataset.exists() or dataset.is_symlink():
            dataset.unlink()
        result = Retained(None, True)
    return result


def finish(folder: Path) -> None:
    """End a clean-up `put_away` did, once the ledger knows where the dataset is: the marker goes, and the job's state
    folder too if nothing is left in it."""
    (folder / MARKER).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()
