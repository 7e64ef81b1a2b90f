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
from redis_helpers import produce

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


WINDOW = {
    "id": "per_second",
    "window": {
        "kind": "tumbling",
        "size": "1s",
        "time": "ts",
        "time_unit": "ms",
        "key": "key",
        "lateness": "400ms",
    },
    "aggregate": {"n": "count()", "total": "sum(value)", "hi": "max(value)", "last": "last(seq)"},
}


def _batch_windows(tmp: Path, records: list[dict[str, Any]]) -> pl.DataFrame:
    """The same window step over the same records read from a file, as a batch job."""
    from sluice.config.loader import load_pipeline
    from sluice.runtime.executor import Executor

    folder = tmp / "batch"
    folder.mkdir()
    (folder / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "p.yaml").write_text(
        json.dumps(
            {
                "pipeline": "batch_windows",
                "source": {"kind": "jsonl", "path": "events.jsonl"},
                "steps": [WINDOW],
                "sinks": [{"id": "out", "kind": "parquet", "path": "out/"}],
            }
        )
    )
    rep = Executor(load_pipeline(folder / "p.yaml"), base_dir=folder, progress=False).run()
    assert rep.status == "succeeded" and rep.balanced
    return pl.read_parquet(folder / "out" / "*.parquet")


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    return df.select("key", "window_start", "window_end", "n", "total", "hi", "last").sort(
        "key", "window_start"
    )


def test_window_results_after_kill_9_equal_the_batch_run(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Events out of order by up to 300 ms (< 400 ms lateness) through Redis with crashes give
    exactly the windows of one batch run over the same records in a file (batch = stream)."""
    stream = f"{redis_prefix}:events"
    pipeline = tmp_path / "pipeline.yaml"
    _write_pipeline(
        pipeline, stream, sinks=[{"id": "files", "kind": "parquet", "path": "out/"}], steps=[WINDOW]
    )
    producer = Producer(redis_url, stream, rate=15_000, jitter_ms=300)
    seen = _crash_loop(pipeline, producer, kills=10)
    assert seen == {"crash_points": 5, "random_kills": 10}
    stream_out = _sorted(pl.read_parquet(tmp_path / "out" / "*.parquet"))
    batch_out = _sorted(_batch_windows(tmp_path, producer.records))
    windows = {(r["key"], r["ts"] // 1000) for r in producer.records}
    assert stream_out.height == len(windows)  # every (key, second) window, once
    assert stream_out["n"].sum() == N  # no record late, lost or counted twice
    assert stream_out.equals(batch_out)


def _late_reference(records: list[dict[str, Any]], lateness_ms: int, size_ms: int) -> int:
    """Late iff the record's window ended at or before the watermark of the records before it."""
    late, newest = 0, None
    for r in records:
        end = (r["ts"] // size_ms) * size_ms + size_ms
        if newest is not None and end <= newest - lateness_ms:
            late += 1
        newest = r["ts"] if newest is None else max(newest, r["ts"])
    return late


def test_late_records_are_counted_exactly_and_nothing_is_lost(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Disorder (up to 1.5 s) beyond the allowed lateness (400 ms): the late count equals a
    plain-Python reference, and main + late + dead letters = input."""
    from sluice.config.loader import load_pipeline
    from sluice.runtime.stream import StreamExecutor

    rng = random.Random(11)
    records = [_record(i, rng, 1500) for i in range(20_000)]
    records.append({"key": 1, "seq": -1, "ts": "not a time", "value": 1.0})  # a dead letter
    stream = f"{redis_prefix}:late"
    pipeline = tmp_path / "pipeline.yaml"
    _write_pipeline(
        pipeline, stream, sinks=[{"id": "files", "kind": "parquet", "path": "out/"}], steps=[WINDOW]
    )
    produce(redis_url, stream, records)
    rep = StreamExecutor(
        load_pipeline(pipeline), base_dir=tmp_path, until_idle=0.5, handle_signals=False
    ).run()
    expected_late = _late_reference(records[:-1], 400, 1000)
    assert expected_late > 100  # the test data really has late records
    assert rep.dead_letters_by_reason.get("late") == expected_late
    assert rep.dead_letters == expected_late + 1  # + the record whose ts cannot be read
    counted = pl.read_parquet(tmp_path / "out" / "*.parquet")["n"].sum()
    assert counted + rep.dead_letters == len(records)
