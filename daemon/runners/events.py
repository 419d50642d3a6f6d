"""The trainer's event lines (JSON lines, defined in `contract.protocol`) turned into the loop's messages: one reader
for every runner, whether the lines come from a child's stdout (local) or from an events file (Slurm, Kubernetes)."""

from __future__ import annotations

import logging

from contract.protocol import ProtocolError, parse_event
from daemon.messages import TrainerEvent, TrainerProtocolMismatch

log = logging.getLogger(__name__)


def read_event_line(line: str, job_id: str, source: str,
                    offset: int | None = None) -> TrainerEvent | TrainerProtocolMismatch | None:
    """The message for one line ``source`` (e.g. "trainer output") gave for ``job_id``.

    A `TrainerEvent` (carrying ``offset``, the events file offset after the line, for runners that follow a file);
    a `TrainerProtocolMismatch` when the trainer speaks another protocol version (the daemon stops it); None for a
    blank line, or for one that is not an event, which is logged and ignored: a trainer may print other things.
    """
    line = line.strip()
    if not line:
        return None
    try:
        return TrainerEvent(job_id, parse_event(line), offset)
    except ProtocolError as exc:
        if exc.version is not None:
            return TrainerProtocolMismatch(job_id, str(exc))
        logging.LoggerAdapter(log, {"job_id": job_id}).warning("ignoring %s that is not an event: %.200s (%s)",
                                                               source, line, exc)
        return None
