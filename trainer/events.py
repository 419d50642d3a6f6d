"""The trainer's JSON-lines event stream: how ``python -m trainer run`` talks to the daemon.

One JSON object per line on stdout, each with ``event`` (its kind), ``time`` (Unix seconds) and ``job``:

- ``started``: dataset summary (classes, counts, train/val sizes, skipped files, epochs, ``resumed_from``)
- ``epoch_end``: ``epoch``, ``epochs`` and every metrics.csv column (loss, accuracy, val_loss, ...)
- ``finished``: ``artifacts`` (name -> path), final metrics, evaluation
- ``interrupted``: ``completed_epochs`` (stopped on SIGTERM at a safe point; rerun to resume)
- ``error``: ``kind`` (spec, data, oom, io, internal) and ``message``

Human-readable logs go to stderr. Anything else that writes to file descriptor 1 (a library's print, a C++
warning) is sent to stderr too, so stdout carries events only.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from trainer.artifacts import clean_json

EVENT_KINDS = ("started", "epoch_end", "finished", "interrupted", "error")
PROTOCOL_VERSION = 1


class EventStream:
    """Writes events as single JSON lines, flushed at once, safe to call from any thread."""

    def __init__(self, stream: TextIO, job_id: str | None = None, on_closed: Callable[[], None] | None = None):
        self.stream = stream
        self.job_id = job_id
        self.on_closed = on_closed
        self.closed = False
        self._lock = threading.Lock()

    @classmethod
    def claim_stdout(cls, job_id: str | None = None) -> EventStream:
        """Keep the real stdout for events and point file descriptor 1 (and ``sys.stdout``) at stderr."""
        sys.stdout.flush()
        events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(events, job_id)

    def emit(self, event: str, payload: dict | None = None, **fields) -> None:
        record = {"event": event, "time": round(time.time(), 3), "v": PROTOCOL_VERSION}
        if self.job_id is not None:
            record["job"] = self.job_id
        record.update(payload or {})
        record.update(fields)
        line = json.dumps(clean_json(record), ensure_ascii=False, allow_nan=False)
        with self._lock:
            if self.closed:
                return
            try:
                self.stream.write(line + "\n")
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
