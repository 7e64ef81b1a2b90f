"""Durations as users write them: '30s', '15 min', '1 hour', '2 days'."""

from __future__ import annotations

import re

_DURATION = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|second|m|min|minute|h|hour|d|day)s?\s*$", re.I
)
_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}


def parse_duration(text: str | int | float) -> float:
    """'1 hour', '30s', '15 min', '2 days' -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(
            f"cannot read duration {text!r}; write e.g. '30s', '15 min', '1 hour', '2 days'"
        )
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
