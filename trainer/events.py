"""The trainer's side of the event stream (`contract.protocol` defines the events): one JSON line per event on
stdout, flushed at once, and optionally appended to an events file.

Human-readable logs go to stderr. Anything else that writes to file descriptor 1 (a library's print, a C++
warning) is sent to stderr too, so stdout carries events only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from contract.protocol import EVENT_TYPES, event_line


class EventStream:
    """Writes events as single JSON lines, flushed at once, safe to call from any thread."""

    def __init__(self, stream: TextIO, job_id: str | None = None, on_closed: Callable[[], None] | None = None,
                 events_file: str | os.PathLike | None = None):
        self.stream = stream
        self.job_id = job_id
        self.on_closed = on_closed
        self.closed = False
        self._lock = threading.Lock()
        # Appended to, never truncated: a resumed attempt continues the file a remote runner follows by offset.
        self._file = open(events_file, "a", encoding="utf-8") if events_file is not None else None  # noqa: SIM115

    @classmethod
    def claim_stdout(cls, job_id: str | None = None, events_file: str | os.PathLike | None = None) -> EventStream:
        """Keep the real stdout for events and point file descriptor 1 (and ``sys.stdout``) at stderr."""
        sys.stdout.flush()
        events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(events, job_id, events_file=events_file)

    def emit(self, event: str, payload: dict | None = None, **fields) -> None:
        """Send event ``event`` (a `contract.protocol` event name) with its fields, checked against the protocol."""
        record = EVENT_TYPES[event](**{"job": self.job_id, **(payload or {}), **fields})
        line = event_line(record) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())  # followed from other hosts over a shared filesystem
            if self.closed:
                return
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, ConnectionResetError):
                # The reader (the daemon) is gone. Training on would waste the GPU, and crashing here would lose the
                # epoch in progress: drop later events and let the trainer stop at its next safe point instead.
                self.closed = True
                self._silence()
        if self.closed and self.on_closed is not None:
            self.on_closed()

    def _silence(self) -> None:
        # Point the dead stream at /dev/null so the interpreter's final flush does not raise BrokenPipeError again.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
