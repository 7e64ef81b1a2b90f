"""Crash points for the recovery tests: ``SLUICE_TEST_CRASH=<point>:<n>`` makes the process
kill itself with SIGKILL (no cleanup, like ``kill -9``) the n-th time it reaches ``<point>``.

Points: ``before_checkpoint`` (sinks prepared, checkpoint not written), ``in_checkpoint_write``
(inside the checkpoint's SQLite transaction, before COMMIT), ``after_checkpoint`` (saved, nothing
published), ``mid_publish`` (after the first sink published), ``before_ack`` (published, source
not acknowledged), ``before_journal`` (a plain publisher committed, its letters not journaled
yet), ``publish_before_commit`` (PostgreSQL: rows written and letters journaled, transaction
not committed), ``kafka_before_marker``. Unset (always, outside tests) it costs one dictionary
lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("SLUICE_TEST_CRASH")
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
