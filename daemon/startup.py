"""What the daemon checks and writes as it starts: its folders, its metrics port, and ``state/daemon.json``. Each
problem becomes a `StartupError` whose message says what to do, rather than a traceback."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from contract.atomic import write_json
from daemon.config import Config
from daemon.metrics import Metrics, MetricsServer

log = logging.getLogger(__name__)
DAEMON_FILE = "daemon.json"  # pid and metrics URL of the running daemon


class StartupError(RuntimeError):
    """The daemon cannot start (unusable folders, a locked state folder, a busy port); the message says what to do."""


def check_folders(folders: list[tuple[str, Path]]) -> None:
    """Create the (config name, folder) pairs and make sure we can write to them, with a message that says how to fix
    it."""
    for name, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"{name}: cannot create {folder}: {exc.strerror}") from None
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            raise StartupError(f"{name}: {folder} is on a read-only filesystem; mount it read-write")
        if not os.access(folder, os.W_OK | os.X_OK):
            st = folder.stat()
            raise StartupError(f"{name}: {folder} is not writable by uid {os.getuid()} (owner uid {st.st_uid}, "
                               f"mode {st.st_mode & 0o777:o}); chown it to this user or run the daemon as "
                               f"its owner (compose: DROPFIT_UID/DROPFIT_GID)")


def metrics_server(config: Config, metrics: Metrics, health: Callable[[], dict]) -> MetricsServer:
    """The /metrics and /healthz server on the configured address (not started yet)."""
    host, port = config.metrics.host, config.metrics.port
    try:
        return MetricsServer(metrics.registry, host, port, health)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"metrics.port: {host}:{port} is already in use (another dropfit daemon, or "
                               "another service?); set metrics.port in the config to a free port, or 0 for any"
                               ) from None
        raise StartupError(f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def write_daemon_file(config: Config, server: MetricsServer, host: str) -> None:
    """state/daemon.json: who runs and where its metrics are (for `dropfit health`, `dropfit demo`, tests)."""
    # Only informative: a full state disk must not stop the daemon from starting.
    path = config.path("state_dir") / DAEMON_FILE
    try:
        write_json(path, {"pid": os.getpid(), "host": host, "started_at": time.time(),
                          "metrics_url": f"http://{server.host}:{server.port}/metrics",
                          "inbox": str(config.path("inbox")), "outbox": str(config.path("outbox"))})
    except OSError as exc:
        log.error("could not write %s (%s); the daemon runs without it", path, exc.strerror or exc)
