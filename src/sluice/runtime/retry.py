"""Retries with exponential backoff and full jitter, for transient failures only."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from sluice.errors import TransientError

T = TypeVar("T")


def retry(
    fn: Callable[[], T],
    *,
    attempts: int,
    backoff: float,
    cap: float = 10.0,
    on_retry: Callable[[int, TransientError], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; on :class:`TransientError` wait ``uniform(0, min(cap, backoff * 2**k))`` and
    try again, up to ``attempts`` calls in all. Other exceptions propagate at once; the last
    TransientError propagates when the attempts run out."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except TransientError as exc:
            if attempt == attempts:
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            sleep(random.uniform(0, min(cap, backoff * 2 ** (attempt - 1))))
    raise AssertionError("unreachable")
