"""Durations as users write them: '30s', '15 min', '1 hour', '1 hr', '2 days', '1h30m', 45.

One parser for every setting (window sizes, linger, checkpoint interval, freshness...), and one
typed config field, :class:`DurationRange`, that turns what the user wrote into seconds *when the
config is parsed* and checks its range there, so a bad value is reported by ``sluice validate``
naming its own field, never later by whatever reads it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

#: Unit names (lower case) -> seconds. Months and years are not units: their length varies.
UNITS: dict[str, float] = {
    **dict.fromkeys(("us", "µs", "usec", "microsecond", "microseconds"), 1e-6),
    **dict.fromkeys(("ms", "msec", "msecs", "millisecond", "milliseconds"), 1e-3),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), 604800.0),
}
_NUMBER = r"\d+(?:\.\d+)?|\.\d+"
_PART = re.compile(rf"\s*({_NUMBER})\s*([a-zµ]+)\s*", re.I)
_PLAIN = re.compile(rf"^\s*({_NUMBER})\s*$")
_HINT = "write e.g. '30s', '15 min', '1 hour', '1h30m', '2 days' (or a number of seconds)"
#: A pattern for the JSON Schema (editors): number+unit parts, or a bare number. Loose on the
#: unit names (JSON Schema patterns have no case-insensitive flag); the parser is exact.
PATTERN = rf"^\s*(?:(?:{_NUMBER})\s*[A-Za-zµ]+\s*)+$|^\s*(?:{_NUMBER})\s*$"


def parse_duration(text: str | int | float) -> float:
    """'1 hour', '30s', '15 min', '1 hr', '2 days', '1h 30m', 45 (seconds) -> seconds.

    Raises ``ValueError`` (with the accepted forms) for anything else, including booleans,
    negative, infinite and NaN numbers."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"cannot read duration {text!r}; {_HINT}")
    if not isinstance(text, str):
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a duration must be a finite number of seconds >= 0, got {text!r}")
        return value
    plain = _PLAIN.match(text)
    if plain:
        return float(plain.group(1))
    total, pos = 0.0, 0
    for m in _PART.finditer(text):
        unit = m.group(2).lower()
        if m.start() != pos or unit not in UNITS:
            break
        total += float(m.group(1)) * UNITS[unit]
        pos = m.end()
    else:
        if pos == len(text) and pos:
            return total
    raise ValueError(f"cannot read duration {text!r}; {_HINT}")


def format_duration(seconds: float) -> str:
    """Seconds as a short text that :func:`parse_duration` reads back: 3600 -> '1h'."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0), ("ms", 1e-3)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class DurationRange:
    """``Annotated`` metadata that makes a ``float`` config field a duration: it accepts what
    :func:`parse_duration` reads, holds seconds, and checks its range (``gt``/``ge`` lower
    bound, ``le`` upper bound, in seconds) while the config is parsed::

        linger: Annotated[float, DurationRange(gt=0, le=3600)] = Field(0.05, description=...)

    The JSON Schema accepts a number of seconds in range, or a duration text.
    """

    le: float
    gt: float | None = None
    ge: float | None = None

    def check(self, value: Any) -> float:
        seconds = parse_duration(value)
        if self.gt is not None and not seconds > self.gt:
            raise ValueError(f"must be longer than {format_duration(self.gt)}, got {value!r}")
        if self.ge is not None and not seconds >= self.ge:
            raise ValueError(f"must be at least {format_duration(self.ge)}, got {value!r}")
        if seconds > self.le:
            raise ValueError(f"must be at most {format_duration(self.le)}, got {value!r}")
        return seconds

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        number: dict[str, Any] = {"type": "number", "maximum": self.le}
        if self.gt is not None:
            number["exclusiveMinimum"] = self.gt
        else:
            number["minimum"] = self.ge if self.ge is not None else 0
        return {"anyOf": [number, {"type": "string", "pattern": PATTERN}]}


__all__ = ["PATTERN", "UNITS", "DurationRange", "format_duration", "parse_duration"]
