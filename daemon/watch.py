"""Watching the inbox: which top-level entries changed (watchdog), and when a dropped folder has settled.

Only the inbox's top level is watched, never recursively: a recursive inotify watch follows a folder the daemon
claims out of the inbox and keeps reporting every read the trainer makes of it (a 60,000-image dataset overflowed
the kernel's event queue and lost events), and a recursive poll re-lists every file of every dataset each interval.
Whether a dropped folder is still being written is judged instead by `fingerprint` — file and folder counts, total
size, newest modification time — taken again while it is pending, at a pace that keeps the cost of large folders small.

Events can still be lost: the kernel's queue overflows (a flood of changes while the daemon is busy or stopped), the
watch ends (an inotify error, the inbox folder removed and made again). The watcher reports an overflow
(``on_lost``) and says when it no longer sees the inbox (`Watcher.trouble`); the daemon then looks at the whole top
level again, and also every ``observer.rescan_seconds`` anyway (one ``scandir``).

Handlers run on watchdog's observer thread and only hand names to a callback (which enqueues them); all decisions
happen on the daemon's own loop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import EVENT_TYPE_EVENTS_LOST, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

log = logging.getLogger(__name__)

_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".filepart", "~")
# Reading a file is not activity: the daemon's own reads must not keep a folder from settling.
_PASSIVE_EVENTS = {"opened", "closed_no_write"}
# A pending folder is looked at again at least this often (seconds), and never so often that rescanning it takes
# more than 1/_SCAN_DUTY of the time.
_MIN_RECHECK, _SCAN_DUTY = 0.25, 5.0


def ignored_name(name: str) -> bool:
    """Hidden and temporary names in the inbox are never jobs (copies in progress, editor files, our own temp)."""
    return not name or name.startswith(".") or name.endswith(_TEMP_SUFFIXES) or name == "__MACOSX"


class _InboxHandler(FileSystemEventHandler):
    def __init__(self, root: str, on_activity: Callable[[str], None], on_lost: Callable[[], None]):
        super().__init__()
        self.root, self.on_activity, self.on_lost = root, on_activity, on_lost

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == EVENT_TYPE_EVENTS_LOST:  # the kernel's queue overflowed: names were lost
            self.on_lost()
            return
        if event.event_type in _PASSIVE_EVENTS:
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if not path:
                continue
            path = os.fsdecode(path)
            if os.path.dirname(path) == self.root:
                name = os.path.basename(path)
                if not ignored_name(name):
                    self.on_activity(name)


class Watcher:
    """Watches the inbox's top level (not its subfolders: see the module's doc). ``on_lost()`` is called when events
    were lost (the kernel's queue overflowed): the caller looks at the whole top level again."""

    def __init__(self, inbox: Path, on_activity: Callable[[str], None], kind: str = "inotify",
                 interval: float = 2.0, on_lost: Callable[[], None] = lambda: None):
        self.observer = PollingObserver(timeout=interval) if kind == "polling" else Observer()
        self.inbox = os.path.normpath(str(inbox))
        self.observer.schedule(_InboxHandler(self.inbox, on_activity, on_lost), self.inbox, recursive=False)
        self.kind = kind
        self.identity = _identity(self.inbox)

    def start(self) -> None:
        self.observer.start()
        log.info("watching %s (%s, top level only)", self.inbox, self.kind)

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=10)

    def trouble(self) -> str | None:
        """Why this watcher no longer sees the inbox, or None while it does: its threads died (an inotify error), or
        the inbox folder was replaced (removed and made again, remounted), so the watch is on a folder that is gone."""
        if not self.observer.is_alive():
            return "the watcher's thread stopped"
        if any(not emitter.is_alive() for emitter in self.observer.emitters):
            return "the watch on the inbox ended"
        if _identity(self.inbox) != self.identity:
            return "the inbox folder was replaced"
        return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def inbox_entries(inbox: Path) -> list[str]:
    """Names directly under the inbox that could be jobs (for the start-up scan)."""
    try:
        return sorted(e.name for e in os.scandir(inbox) if not ignored_name(e.name))
    except FileNotFoundError:
        return []


def fingerprint(path: Path) -> tuple[int, int, int, int] | None:
    """(files, folders, total bytes, newest mtime in ns) of a folder's whole tree, or of a file; None if gone.

    Links are not followed. A copy in progress changes at least one of the four between two looks.
    """
    try:
        st = path.lstat()
    except OSError:
        return None
    if not path.is_dir() or path.is_symlink():
        return (1, 0, st.st_size, st.st_mtime_ns)
    files, folders, size, newest = 0, 1, 0, st.st_mtime_ns
    stack = [os.fspath(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        est = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    newest = max(newest, est.st_mtime_ns)
                    if entry.is_dir(follow_symlinks=False):
                        folders += 1
                        stack.append(entry.path)
                    else:
                        files += 1
                        size += est.st_size
        except OSError:
            continue
    return (files, folders, size, newest)


@dataclass
class _Pending:
    changed: float  # monotonic time the drop was last seen to change
    next_check: float
    print: tuple | None = None
    scan_seconds: float = 0.0


class Settler:
    """Dropped entries waiting to settle: quiet (same `fingerprint`) for ``settle_seconds``.

    ``touch(name)`` on activity; ``due(now)`` returns the names that have settled (and forgets them);
    ``next_deadline()`` says when the loop should look again.
    """

    def __init__(self, inbox: Path, settle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.inbox, self.settle, self.clock = inbox, settle_seconds, clock
        self.pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def touch(self, name: str) -> None:
        now = self.clock()
        entry = self.pending.get(name)
        if entry is None:
            self.pending[name] = _Pending(changed=now, next_check=now + min(self.settle, _MIN_RECHECK))
        else:
            entry.changed, entry.print = now, None

    def clear(self) -> None:
        self.pending.clear()

    def next_deadline(self) -> float | None:
        return min((p.next_check for p in self.pending.values()), default=None)

    def due(self) -> list[str]:
        """Look again at the pending entries whose time has come; return those that settled."""
        settled = []
        for name, entry in list(self.pending.items()):
            now = self.clock()
            if now < entry.next_check:
                continue
            started = time.perf_counter()
            current = fingerprint(self.inbox / name)
            entry.scan_seconds = time.perf_counter() - started
            if current is None:  # removed or renamed away (a rename brings the new name as activity)
                del self.pending[name]
                continue
            if current != entry.print:
                if entry.print is not None:
                    entry.changed = now
                entry.print = current
            elif now - entry.changed >= self.settle:
                del self.pending[name]
                settled.append(name)
                continue
            quiet_at = entry.changed + self.settle
            pace = max(_MIN_RECHECK, _SCAN_DUTY * entry.scan_seconds)
            entry.next_check = max(now + pace, min(quiet_at, now + max(pace, self.settle / 4)))
        return settled
