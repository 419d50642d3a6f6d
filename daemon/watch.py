"""Filesystem watching with watchdog: which inbox entries are active, and CANCEL files in the outbox.

Handlers run on watchdog's observer thread and only hand names to a callback (which enqueues them); deciding when a
dropped folder has settled, and everything slow, happens on the daemon's own loop.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

log = logging.getLogger(__name__)
# watchdog's inotify backend warns when a new subfolder's watch is re-registered; the watch still works.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)

CANCEL_FILE = "CANCEL"
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".filepart", "~")
# Reading a file is not activity: the daemon's own reads must not keep a folder from settling.
_PASSIVE_EVENTS = {"opened", "closed_no_write"}


def ignored_name(name: str) -> bool:
    """Hidden and temporary names in the inbox are never jobs (copies in progress, editor files, our own temp)."""
    return not name or name.startswith(".") or name.endswith(_TEMP_SUFFIXES) or name == "__MACOSX"


def _top_level(root: str, path: str | bytes) -> str | None:
    path = os.fsdecode(path)
    rel = os.path.relpath(path, root)
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        return None
    return rel.split(os.sep, 1)[0]


class _InboxHandler(FileSystemEventHandler):
    def __init__(self, root: str, on_activity: Callable[[str], None]):
        super().__init__()
        self.root, self.on_activity = root, on_activity

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _PASSIVE_EVENTS:
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            name = _top_level(self.root, path) if path else None
            if name and not ignored_name(name):
                self.on_activity(name)


class _OutboxHandler(FileSystemEventHandler):
    def __init__(self, root: str, on_cancel: Callable[[str], None]):
        super().__init__()
        self.root, self.on_cancel = root, on_cancel

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("created", "moved", "closed"):
            return
        path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
        if os.path.basename(path) == CANCEL_FILE and not event.is_directory:
            job_id = _top_level(self.root, os.path.dirname(path))
            if job_id:
                self.on_cancel(job_id)


class Watcher:
    """Watches the inbox (recursively: a folder settles only when nothing inside it changes) and the outbox."""

    def __init__(self, inbox: Path, outbox: Path, on_activity: Callable[[str], None],
                 on_cancel: Callable[[str], None], kind: str = "inotify", interval: float = 2.0):
        self.observer = PollingObserver(timeout=interval) if kind == "polling" else Observer()
        self.inbox, self.outbox = str(inbox), str(outbox)
        self.observer.schedule(_InboxHandler(self.inbox, on_activity), self.inbox, recursive=True)
        self.observer.schedule(_OutboxHandler(self.outbox, on_cancel), self.outbox, recursive=True)
        self.kind = kind

    def start(self) -> None:
        self.observer.start()
        log.info("watching %s (%s)", self.inbox, self.kind)

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=10)


def inbox_entries(inbox: Path) -> list[str]:
    """Names directly under the inbox that could be jobs (for the start-up scan)."""
    try:
        return sorted(e.name for e in os.scandir(inbox) if not ignored_name(e.name))
    except FileNotFoundError:
        return []
