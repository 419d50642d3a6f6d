"""One trainer child process: its own session, JSON-lines events from stdout, stderr appended to ``train.log``.

Like watchdog's ``AutoRestartTrick``: the child leads its own process group, so stopping it means signalling the
whole group (SIGTERM, a grace period, then SIGKILL), and nothing it started is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_INVALID, EXIT_INTERRUPTED = 2, 75
_MAX_LINE = 1 << 20


class TrainerProcess:
    """Start with `start`; events and the exit code arrive through ``post`` (from a reader thread)."""

    def __init__(self, job_id: str, argv: list[str], env: dict, log_path: Path, post: Callable[[tuple], None]):
        self.job_id, self.argv, self.env, self.log_path, self.post = job_id, argv, env, log_path, post
        self.proc: subprocess.Popen | None = None
        self.log = logging.LoggerAdapter(log, {"job_id": job_id})

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, attempt: int) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            log_file.write(f"===== attempt {attempt}, {stamp}: {' '.join(self.argv)}\n".encode())
            log_file.flush()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=log_file, env=self.env, start_new_session=True, close_fds=True)
        threading.Thread(target=self._read, name=f"events-{self.job_id[:24]}", daemon=True).start()
        self.log.info("trainer started, pid %d", self.proc.pid)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.proc.stdout:
            while raw := self.proc.stdout.readline(_MAX_LINE):
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                        raise ValueError("not an event object")
                except ValueError:
                    self.log.warning("ignoring trainer output that is not an event: %.200s", line)
                    continue
                self.post(("event", self.job_id, event))
        self.post(("exit", self.job_id, self.proc.wait()))

    def signal(self, sig: int) -> None:
        """Signal the trainer's whole process group (no error if it is already gone)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.log.info("sent %s to the trainer", signal.Signals(sig).name)
        except (ProcessLookupError, PermissionError):
            pass


def describe_exit(rc: int) -> str:
    """A readable reason for a trainer's exit status."""
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else f"signal {-rc}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -rc == signal.SIGKILL else ""
        return f"the trainer was killed by {name}{hint}"
    return f"the trainer exited with code {rc}"


def stop_orphan(pid: int, job_id: str, grace: float) -> bool:
    """Stop a trainer left running by an earlier daemon (found by pid, confirmed by its command line).

    Returns True if one was found (and is now gone).
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if job_id.encode() not in cmdline:
        return False  # the pid now belongs to something else
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
    return True
