"""Opening the ledger safely: a corrupt ledger is moved aside and rebuilt from what the outbox and state folders
still say, loudly — never silently reset, which would forget queued jobs or run finished ones again.

The outbox holds a ``status.json`` for every job that got past its claim (the ledger's record at its last change);
``state/jobs/<id>/`` holds every claimed dataset. Together they give back every job: finished ones as they ended,
unfinished ones queued again (they resume from their checkpoints), claimed ones that never reached the queue
validated again.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path

from contract.files import STATUS_FILE
from daemon.ledger import Job, JobState, Ledger

log = logging.getLogger(__name__)

# Filesystems whose locking SQLite's WAL mode cannot rely on (it needs shared memory between the processes that open
# the file, which a network filesystem cannot give): a ledger there can be corrupted silently.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "fuse.sshfs", "sshfs",
                                 "ceph", "fuse.ceph", "glusterfs", "fuse.glusterfs", "beegfs", "afs", "9p",
                                 "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone"})


class LedgerLocationError(RuntimeError):
    """The ledger would be on a filesystem where SQLite is unsafe; the message says where to put it."""


def filesystem_of(path: Path, mounts: str | None = None) -> tuple[str, str]:
    """(filesystem type, mount point) of the mount that holds ``path`` (or would, once created), from
    ``/proc/mounts`` (or the text of one, ``mounts``)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown", "/"
    target = os.path.realpath(path)
    best = ("unknown", "/")
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces, tabs, newlines and backslashes in octal (\040).
        point = fields[1].encode().decode("unicode_escape")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[1]):
            best = (fields[2], point)
    return best


def check_local_disk(path: Path, mounts: str | None = None) -> None:
    """Raise `LedgerLocationError` if ``path`` is on a network filesystem."""
    fstype, point = filesystem_of(path, mounts)
    if fstype in NETWORK_FILESYSTEMS:
        raise LedgerLocationError(
            f"ledger: {path} is on a {fstype} filesystem (mounted at {point}), where SQLite's locking is not safe; "
            "put the ledger on a local disk with `ledger:` in the config (e.g. /var/lib/dropfit/ledger.sqlite3), "
            "while inbox, outbox and state_dir stay on the shared storage")


def open_ledger(path: Path, outbox: Path, jobs_dir: Path) -> Ledger:
    """The ledger at ``path``; if it is unreadable, moved aside and rebuilt (logged as an error).

    Raises:
        LedgerLocationError: if ``path`` is on a network filesystem.
    """
    check_local_disk(path)
    try:
        ledger = Ledger(path)
        ledger.check()
        return ledger
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(path) + suffix)
            if source.exists():
                os.replace(source, Path(str(aside) + suffix))
        log.error("the ledger %s is unreadable (%s); moved it to %s and rebuilding it from %s/*/status.json and %s",
                  path, exc, aside, outbox, jobs_dir)
    ledger = Ledger(path)
    restored = rebuild(ledger, outbox, jobs_dir)
    log.error("ledger rebuilt: %d job(s) restored; check `dropfit status`", restored)
    return ledger


def rebuild(ledger: Ledger, outbox: Path, jobs_dir: Path) -> int:
    records = []
    for status in outbox.glob("*/status.json"):
        try:
            record = json.loads(status.read_text())
            records.append({**record, "name": record["dataset"], "path": record.get("dataset_path") or None,
                            "source": None, "state": JobState(record["state"]).value})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot read %s (%s); that job is rebuilt from its dataset folder if it has one", status, exc)
    known = set()
    for record in sorted(records, key=lambda r: (r.get("created_at") or 0, r["id"])):
        state = JobState(record["state"])
        if state in (JobState.RUNNING, JobState.INTERRUPTED, JobState.CLAIMING):
            record["state"], record["pid"] = JobState.QUEUED.value, None  # recover() takes it from here
        ledger.restore(record)
        known.add(record["id"])
    # Claimed datasets whose job never wrote a status (the crash came between claim and queue): validate again.
    for folder in sorted(jobs_dir.glob("*/dataset")):
        job_id = folder.parent.name
        if job_id not in known:
            name = job_id.rsplit("-", 2)[0]
            ledger.restore({"id": job_id, "name": name, "state": JobState.CLAIMING.value, "attempt": 0,
                            "source": None, "path": str(folder), "created_at": folder.stat().st_mtime})
            known.add(job_id)
    return len(known)


def status_problem(outbox: Path, job: Job) -> str | None:
    """What is wrong with the job's status.json, if anything: missing or unreadable, or behind the ledger (a kill -9
    between the ledger's change and the rewrite of status.json leaves e.g. "running" for a job that succeeded)."""
    try:
        data = json.loads((outbox / job.id / STATUS_FILE).read_text())
        if data["id"] != job.id:
            return "missing or unreadable"
    except (OSError, ValueError, KeyError, TypeError):
        return "missing or unreadable"
    return None if data.get("state") == job.state.value else f"behind the ledger (it said {data.get('state')!r})"
