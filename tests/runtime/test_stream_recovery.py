"""Exact recovery: kill -9 the stream pipeline at random moments and at every crash point.

The pipeline reads from a real Redis stream and writes Parquet files and a PostgreSQL table;
a producer thread keeps adding records while the pipeline is killed again and again. After a
final clean run, both outputs must equal an uninterrupted run: nothing lost, nothing
duplicated, every key's sequence numbers stepping by exactly 1. The same is checked for window
aggregates, compared with a batch run over the same records (batch = stream).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl

ROOT = Path(__file__).resolve().parents[2]
N = 200_000
KEYS = 100
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms
CRASH_POINTS = [
    "before_checkpoint",
    "in_checkpoint_write",
    "after_checkpoint",
    "mid_publish",
    "before_ack",
]


def _record(i: int, rng: random.Random, jitter_ms: int) -> dict[str, Any]:
    return {
        "key": i % KEYS,
        "seq": i // KEYS,
        "ts": T0 + i * 2 + (rng.randint(0, jitter_ms) if jitter_ms else 0),
        "value": round((i % 1000) / 10, 1),
    }


class Producer(threading.Thread):
    """Adds the N records to the stream at about ``rate`` records per second."""

    def __init__(self, url: str, stream: str, rate: int, jitter_ms: int = 0) -> None:
        super().__init__(daemon=True)
        self.url, self.stream, self.rate, self.jitter = url, stream, rate, jitter_ms
        self.records: list[dict[str, Any]] = []
        rng = random.Random(42)
        self.records = [_record(i, rng, jitter_ms) for i in range(N)]
        self.error: BaseException | None = None

    def run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            step = 1000
            for start in range(0, N, step):
                t = time.monotonic()
                pipe = client.pipeline(transaction=False)
                for r in self.records[start : start + step]:
                    pipe.xadd(self.stream, {"data": json.dumps(r)})
                pipe.execute()
                time.sleep(max(0.0, step / self.rate - (time.monotonic() - t)))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            client.close()


def _write_pipeline(
    path: Path, stream: str, sinks: list[dict[str, Any]], steps: list[dict[str, Any]]
) -> None:
    cfg = {
        "pipeline": f"recovery_{path.parent.name[-8:].replace('-', '_')}",
        "source": {
            "kind": "redis_stream",
            "stream": stream,
            "count": 2000,
            "schema": {"key": "int64", "seq": "int64", "ts": "int64", "value": "float64"},
        },
        "steps": steps,
        "sinks": sinks,
        "checkpoint": {"path": "state/cp.db", "every": "150ms"},
        "settings": {"batch_rows": 4000, "linger": "20ms", "retry_backoff": 0.05},
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML


def _start(pipeline: Path, crash: str | None, until_idle: str = "60s") -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("SLUICE_TEST_CRASH", None)
    if crash:
        env["SLUICE_TEST_CRASH"] = crash
    with open(pipeline.parent / "stderr.log", "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sluice.cli",
                "run",
                str(pipeline),
                "--no-progress",
                "--until-idle",
                until_idle,
            ],
            cwd=pipeline.parent,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _log(pipeline: Path) -> str:
    return (pipeline.parent / "stderr.log").read_text(errors="replace")


def _crash_loop(pipeline: Path, producer: Producer, *, kills: int = 12) -> dict[str, int]:
    """Kill the pipeline at each crash point, then at random moments; return what happened."""
    rng = random.Random(7)
    seen = {"crash_points": 0, "random_kills": 0}
    producer.start()
    for point in CRASH_POINTS:
        proc = _start(pipeline, f"{point}:3")
        try:
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == -signal.SIGKILL, f"{point}: exit {code}\n{_log(pipeline)}"
        seen["crash_points"] += 1
    while seen["random_kills"] < kills:
        proc = _start(pipeline, None)
        time.sleep(rng.uniform(0.8, 2.0))
        if proc.poll() is not None:
            raise AssertionError(f"pipeline exited ({proc.returncode}):\n{_log(pipeline)}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen["random_kills"] += 1
    producer.join()
    assert producer.error is None, producer.error
    final = _start(pipeline, None, until_idle="3s")
    final.wait(timeout=120)
    assert final.returncode == 0, _log(pipeline)
    return seen


def test_kill_9_redis_to_parquet_and_postgres_is_exact(
    tmp_path: Path, redis_url: str, redis_prefix: str, pg_dsn: str, pg_schema: str
) -> None:
    import psycopg

    stream = f"{redis_prefix}:events"
    pipeline = tmp_path / "pipeline.yaml"
    _write_pipeline(
        pipeline,
        stream,
        sinks=[
            {"id": "files", "kind": "parquet", "path": "out/"},
            {"id": "db", "kind": "postgres", "dsn": pg_dsn, "table": f"{pg_schema}.events"},
        ],
        steps=[{"id": "double", "derive": {"value2": "value * 2"}}],
    )
    seen = _crash_loop(pipeline, Producer(redis_url, stream, rate=12_000))
    assert seen == {"crash_points": 5, "random_kills": 12}

    files = pl.read_parquet(tmp_path / "out" / "*.parquet")
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(f'SELECT key, seq, value2 FROM "{pg_schema}".events').fetchall()
    db = pl.DataFrame(rows, schema=["key", "seq", "value2"], orient="row")
    for out in (files, db):
        assert out.height == N  # 0 lost, 0 duplicated
        assert out.select(pl.struct("key", "seq").n_unique()).item() == N
        steps = (
            out.sort("key", "seq")
            .group_by("key")
            .agg((pl.col("seq").diff().drop_nulls() == 1).all().alias("ok"), pl.len())
        )
        assert steps["ok"].all() and (steps["len"] == N // KEYS).all()
        # the derive step ran on every record, exactly once
        expect = out.select(((pl.col("seq") * KEYS + pl.col("key")) % 1000 / 10 * 2).alias("e"))
        assert (out["value2"] - expect["e"]).abs().max() < 1e-9
