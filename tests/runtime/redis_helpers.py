"""Helpers of the stream tests (imported by the test modules of this folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def produce(url: str, stream: str, rows: list[dict[str, Any]]) -> None:
    """Add each row as one JSON message (field ``data``) to a Redis stream."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for r in rows:
            pipe.xadd(stream, {"data": json.dumps(r)})
        pipe.execute()
    finally:
        client.close()


def run_until_crash(pipeline: Path, point: str) -> int:
    """Run ``sluice run`` in a child process that kills itself at crash point ``point``;
    return its exit code (-9 when it got there)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sluice.cli",
            "run",
            str(pipeline),
            "--no-progress",
            "--until-idle",
            "5s",
        ],
        cwd=pipeline.parent,
        env={**os.environ, "SLUICE_TEST_CRASH": point},
        capture_output=True,
        check=False,
    )
    return proc.returncode
