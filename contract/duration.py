"""Durations as people write them in a job.yaml: ``90s``, ``15m``, ``1h30m``, ``2h``, or a number of seconds."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(?:(?P<h>\d+(?:\.\d+)?)\s*h)?\s*(?:(?P<m>\d+(?:\.\d+)?)\s*m(?:in)?)?\s*"
                       r"(?:(?P<s>\d+(?:\.\d+)?)\s*s)?\s*$")
MIN_SECONDS, MAX_SECONDS = 10.0, 30 * 86400.0


def parse_duration(value) -> float:
    """Seconds in ``value``.

    Raises:
        ValueError: naming what was expected, for anything else (including less than 10 s or more than 30 days).
    """
    seconds = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match and any(match.group(k) for k in "hms"):
            seconds = sum(float(match.group(k) or 0) * f for k, f in (("h", 3600), ("m", 60), ("s", 1)))
        elif re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
            seconds = float(value)
    if seconds is None or not math.isfinite(seconds):
        raise ValueError("must be a duration such as 90s, 15m or 1h30m, or a number of seconds")
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ValueError(f"must be from {MIN_SECONDS:.0f} seconds to {MAX_SECONDS / 86400:.0f} days")
    return seconds


def format_duration(seconds: float) -> str:
    """``14m05s``, ``1h30m``, ``42s``: how status and reports show a duration."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
