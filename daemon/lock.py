"""One daemon per state folder: an exclusive ``flock`` on ``<state_dir>/daemon.lock``, held for the daemon's life.

Two daemons on one state folder (``make run`` twice, a container restarted while the old one lingers, two hosts
mounting one share) would each take the other's trainers for orphans and share one ledger. The lock makes the second
one stop at once, naming the holder. The kernel drops the lock when the holder dies, ``kill -9`` included, so a
stale lock file never blocks a restart. ``dropfit status`` and ``dropfit cancel`` do not take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "daemon.lock"


class StateLocked(RuntimeError):
    """Another daemon holds the state folder; the message names it."""


class StateLock:
    """``acquire()`` or raise `StateLocked`; ``release()`` when the daemon stops."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        # O_CLOEXEC (Python's default): trainers must never inherit the descriptor, or a trainer outliving its
        # daemon would keep the lock and block the restart that is meant to resume it.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self.holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started_at']))}"
                   if holder.get("started_at") else "a process that has not written its name yet")
            raise StateLocked(f"state_dir {self.state_dir} is in use by another dropfit daemon ({who}); stop it "
                              f"first, or give this daemon its own state_dir (lock: {self.path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started_at": time.time()}).encode() + b"\n", 0)
        with contextlib.suppress(OSError):
            os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def holder(fd: int) -> dict:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None
