"""The stream executor: epochs, checkpoints, failures, poison records, graceful stop.

Logic tests use the in-memory stream of the test kit; the Redis tests use the real server."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_helpers import produce

from sluice.config.loader import parse_pipeline
from sluice.errors import ConfigError
from sluice.runtime.stream import StreamExecutor
from sluice.state.checkpoints import Checkpoint, CheckpointStore, decode, encode
from sluice.testing import FlakySink, MemorySink, MemoryStream


def _cfg(tmp: Path, **extra: Any) -> Any:
    raw: dict[str, Any] = {
        "pipeline": "stream_test",
        "source": {"kind": "redis_stream", "stream": "unused"},
        "sinks": [{"id": "out", "kind": "jsonl", "path": "out/"}],
        "checkpoint": {"path": str(tmp / "state" / "cp.db"), "every": "10ms"},
        "dead_letter": {"path": str(tmp / "dead")},
        "settings": {"retry_backoff": 0.0, "linger": "1ms"},
    }
    raw.update(extra)
    return parse_pipeline(raw)


def _tables(n_tables: int, rows: int) -> list[pa.Table]:
    return [
        pa.table({"id": list(range(i * rows, (i + 1) * rows)), "v": [float(i)] * rows})
        for i in range(n_tables)
    ]


def _dead(tmp: Path) -> pl.DataFrame:
    files = sorted((tmp / "dead").glob("part-*.jsonl"))
    return pl.concat([pl.read_ndjson(f) for f in files]) if files else pl.DataFrame()


def test_transient_sink_failures_deliver_every_record_once(tmp_path: Path) -> None:
    sink = FlakySink("out", transient_rate=0.1, seed=3)
    ex = StreamExecutor(
        _cfg(tmp_path, settings={"retry_backoff": 0.0, "retry_attempts": 30, "batch_rows": 50}),
        base_dir=tmp_path,
        source=MemoryStream(_tables(40, 50)),
        sinks={"out": sink},
        handle_signals=False,
    )
    rep = ex.run()
    assert sink.transient_failures > 0
    got = pa.concat_tables(sink.committed).column("id").to_pylist()
    assert sorted(got) == list(range(2000))  # each once
    assert rep.dead_letters == 0 and rep.status == "succeeded"


def test_permanent_failures_dead_letter_exactly_the_refused_records(tmp_path: Path) -> None:
    poison = {17, 555, 1999}
    sink = FlakySink("out", column="id", poison=poison)
    ex = StreamExecutor(
        _cfg(tmp_path, settings={"retry_backoff": 0.0, "batch_rows": 100}),
        base_dir=tmp_path,
        source=MemoryStream(_tables(20, 100)),
        sinks={"out": sink},
        handle_signals=False,
    )
    rep = ex.run()
    got = set(pa.concat_tables(sink.committed).column("id").to_pylist())
    assert got == set(range(2000)) - poison  # the stream kept flowing past each failure
    dead = _dead(tmp_path)
    assert sorted(json.loads(p)["id"] for p in dead["payload"]) == sorted(poison)
    assert set(dead["reason"]) == {"sink_rejected"} and set(dead["step_id"]) == {"out"}
    assert rep.dead_letters == 3


def test_poison_record_in_a_step_is_a_dead_letter_not_a_restart_loop(tmp_path: Path) -> None:
    tables = [
        pa.table({"id": [1, 2, 3, 4], "s": ["1", "2", "x", "4"]}),
        pa.table({"id": [5, 6], "s": ["5", "6"]}),
    ]
    sink = MemorySink("out")
    cfg = _cfg(tmp_path, steps=[{"id": "num", "derive": {"n": "CAST(s AS INTEGER)"}}])
    rep = StreamExecutor(
        cfg,
        base_dir=tmp_path,
        source=MemoryStream(tables),
        sinks={"out": sink},
        handle_signals=False,
    ).run()
    out = pa.concat_tables(sink.committed)
    assert sorted(out.column("id").to_pylist()) == [1, 2, 4, 5, 6]
    dead = _dead(tmp_path)
    assert dead["reason"].to_list() == ["step_error"] and dead["step_id"].to_list() == ["num"]
    assert json.loads(dead["payload"][0])["s"] == "x"
    assert rep.status == "succeeded" and rep.balanced


def test_restart_resumes_after_the_checkpointed_position(tmp_path: Path) -> None:
    tables = _tables(10, 10)
    first = MemoryStream(tables[:6])
    StreamExecutor(_cfg(tmp_path), base_dir=tmp_path, source=first, handle_signals=False).run()
    assert first.committed[-1] == 6  # acknowledged after the checkpoint
    rest = MemoryStream(tables)
    rep = StreamExecutor(_cfg(tmp_path), base_dir=tmp_path, source=rest, handle_signals=False).run()
    assert rep.stream is not None and rep.stream["restored_from"] is not None
    out = pl.concat([pl.read_ndjson(f) for f in sorted((tmp_path / "out").glob("*.jsonl"))])
    assert sorted(out["id"].to_list()) == list(range(100))


def test_single_file_sink_path_is_a_config_error_in_stream_mode(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, sinks=[{"id": "out", "kind": "parquet", "path": "out.parquet"}])
    with pytest.raises(ConfigError) as err:
        StreamExecutor(cfg, base_dir=tmp_path, source=MemoryStream([]), handle_signals=False)
    assert "out" in str(err.value) and "directory" in str(err.value)


# ------------------------------------------------------------------------- checkpoint store

tables_st = st.lists(
    st.lists(st.one_of(st.none(), st.integers(-(2**62), 2**62)), min_size=0, max_size=20),
    max_size=3,
)


@settings(max_examples=50, deadline=None)
@given(
    epoch=st.integers(0, 2**40),
    position=st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3),
    columns=tables_st,
)
def test_checkpoint_encoding_round_trips(
    epoch: int, position: dict[str, str], columns: list[list[int | None]]
) -> None:
    state = {
        "w": {f"t{i}": pa.table({"x": pa.array(c, pa.int64())}) for i, c in enumerate(columns)}
    }
    cp = Checkpoint(epoch, position, state, {"out": [["a", "b"]]}, "now")
    back = decode(encode(cp))
    assert (back.epoch, back.position, back.sinks) == (epoch, position, {"out": [["a", "b"]]})
    assert set(back.state.get("w", {})) == set(state["w"])
    for name, table in state["w"].items():
        assert back.state["w"][name].equals(table)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "cp.db", keep=3)
    for e in range(1, 6):
        store.save(Checkpoint(e, {"p": e}, {"w": {"s": pa.table({"x": [e] * 100})}}))
    assert store.epochs() == [3, 4, 5]
    store.close()
    with sqlite3.connect(tmp_path / "cp.db") as db:
        db.execute("UPDATE checkpoints SET body = substr(body, 1, 40) WHERE epoch = 5")
    store = CheckpointStore(tmp_path / "cp.db")
    cp, warnings = store.load()
    store.close()
    assert cp is not None and cp.epoch == 4 and cp.position == {"p": 4}
    assert cp.state["w"]["s"].column("x").to_pylist() == [4] * 100
    assert len(warnings) == 1 and "checkpoint 5" in warnings[0] and "corrupt" in warnings[0]


# ------------------------------------------------------------------------- with Redis


def _redis_pipeline(tmp: Path, stream: str, url: str) -> Path:
    path = tmp / "p.yaml"
    path.write_text(
        json.dumps(
            {
                "pipeline": "stream_redis",
                "source": {
                    "kind": "redis_stream",
                    "url": url,
                    "stream": stream,
                    "schema": {"id": "int64"},
                },
                "sinks": [{"id": "out", "kind": "parquet", "path": "out/"}],
                "checkpoint": {"path": "state/cp.db", "every": "50ms"},
            }
        )
    )
    return path


def _run(pipeline: Path) -> Any:
    from sluice.config.loader import load_pipeline

    return StreamExecutor(
        load_pipeline(pipeline), base_dir=pipeline.parent, until_idle=0.5, handle_signals=False
    ).run()


def test_corrupt_newest_checkpoint_restart_is_still_exact(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    stream = f"{redis_prefix}:s"
    pipeline = _redis_pipeline(tmp_path, stream, redis_url)
    produce(redis_url, stream, [{"id": i} for i in range(5000)])
    _run(pipeline)
    with sqlite3.connect(tmp_path / "state" / "cp.db") as db:
        newest = db.execute("SELECT max(epoch) FROM checkpoints").fetchone()[0]
        db.execute("UPDATE checkpoints SET body = substr(body, 1, 20) WHERE epoch = ?", [newest])
    produce(redis_url, stream, [{"id": i} for i in range(5000, 8000)])
    rep = _run(pipeline)
    assert rep.stream["restored_from"] == newest - 1
    assert any("corrupt" in w for w in rep.stream["warnings"])
    ids = pl.read_parquet(tmp_path / "out" / "*.parquet")["id"]
    assert ids.len() == 8000 and ids.n_unique() == 8000


def test_dead_consumers_pending_messages_are_reclaimed_and_acked_after_checkpoint(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    import redis

    stream = f"{redis_prefix}:s"
    produce(redis_url, stream, [{"id": i} for i in range(300)])
    client = redis.Redis.from_url(redis_url)
    try:
        client.xgroup_create(stream, "sluice", id="0")
        # a consumer that died holding 100 messages it never acknowledged
        client.xreadgroup("sluice", "dead-worker", {stream: ">"}, count=100)
        assert client.xpending(stream, "sluice")["pending"] == 100
        _run(_redis_pipeline(tmp_path, stream, redis_url))
        assert client.xpending(stream, "sluice")["pending"] == 0  # all acked after checkpoints
    finally:
        client.close()
    ids = pl.read_parquet(tmp_path / "out" / "*.parquet")["id"]
    assert sorted(ids.to_list()) == list(range(300))


def test_sigterm_stops_gracefully_with_a_final_checkpoint(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    stream = f"{redis_prefix}:s"
    pipeline = _redis_pipeline(tmp_path, stream, redis_url)
    produce(redis_url, stream, [{"id": i} for i in range(1000)])
    with open(tmp_path / "err.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice.cli", "run", str(pipeline), "--no-progress", "--json"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=log,
            env=dict(os.environ),
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        parts = list((tmp_path / "out").glob("part-*.parquet"))
        if parts and pl.read_parquet(tmp_path / "out" / "*.parquet").height == 1000:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, (tmp_path / "err.log").read_text()
    report = json.loads(out)
    assert report["status"] == "stopped" and report["stream"]["checkpoints"] >= 1
    produce(redis_url, stream, [{"id": i} for i in range(1000, 1500)])
    _run(pipeline)
    ids = pl.read_parquet(tmp_path / "out" / "*.parquet")["id"]
    assert sorted(ids.to_list()) == list(range(1500))


def test_lost_newest_checkpoint_after_a_database_publish_is_a_clear_error(
    tmp_path: Path, redis_url: str, redis_prefix: str, pg_dsn: str, pg_schema: str
) -> None:
    """A database cannot take back an epoch it committed: if the checkpoint that covered it is
    damaged afterwards, restarting from the one before would write its records twice. The run
    refuses with an error naming the sink instead of silently duplicating."""
    from sluice.errors import SinkError

    stream = f"{redis_prefix}:s"
    path = tmp_path / "p.yaml"
    path.write_text(
        json.dumps(
            {
                "pipeline": "stream_guard",
                "source": {"kind": "redis_stream", "url": redis_url, "stream": stream},
                "sinks": [
                    {"id": "db", "kind": "postgres", "dsn": pg_dsn, "table": f"{pg_schema}.t"}
                ],
                "checkpoint": {"path": "state/cp.db", "every": "50ms"},
            }
        )
    )
    import psycopg

    produce(redis_url, stream, [{"id": i} for i in range(100)])
    _run(path)
    with psycopg.connect(pg_dsn) as conn:
        (published,) = conn.execute(f'SELECT epoch FROM "{pg_schema}".sluice_epochs').fetchone()
    with sqlite3.connect(tmp_path / "state" / "cp.db") as db:
        # the checkpoint of the published epoch is damaged, later (empty) ones are gone
        db.execute("DELETE FROM checkpoints WHERE epoch > ?", [published])
        db.execute("UPDATE checkpoints SET body = x'00' WHERE epoch = ?", [published])
    with pytest.raises(SinkError) as err:
        _run(path)
    assert "'db'" in str(err.value) and f"epoch {published}" in str(err.value)


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
def test_deduplicate_state_survives_a_restart(tmp_path: Path, backend: str) -> None:
    """Keys seen before a restart are still known after it (the step's state is checkpointed:
    copied into the SQLite checkpoint, or as a RocksDB checkpoint of the on-disk key store)."""
    tables = [pa.table({"id": [1, 2, 3]}), pa.table({"id": [3, 4]}), pa.table({"id": [1, 5]})]
    cfg = _cfg(
        tmp_path,
        steps=[{"id": "once", "deduplicate": {"key": ["id"]}}],
        checkpoint={"path": str(tmp_path / "state" / "cp.db"), "every": "10ms", "backend": backend},
    )
    StreamExecutor(
        cfg, base_dir=tmp_path, source=MemoryStream(tables[:2]), handle_signals=False
    ).run()
    rep = StreamExecutor(
        cfg, base_dir=tmp_path, source=MemoryStream(tables), handle_signals=False
    ).run()
    out = pl.concat([pl.read_ndjson(f) for f in sorted((tmp_path / "out").glob("*.jsonl"))])
    assert sorted(out["id"].to_list()) == [1, 2, 3, 4, 5]
    assert rep.step("once").filtered == 1  # the second 1, seen before the restart


def test_a_slow_sink_pauses_the_reader(tmp_path: Path) -> None:
    """Backpressure: the reader never runs more than the bounded queue ahead of the sink."""
    source = MemoryStream(_tables(60, 10))
    leads: list[int] = []

    class SlowSink(MemorySink):
        written = 0

        def write(self, table: pa.Table) -> pa.Table:
            time.sleep(0.01)
            self.written += table.num_rows // 10
            leads.append(source.next - self.written)  # tables read but not yet written
            return super().write(table)

    cfg = _cfg(tmp_path, settings={"queue_size": 2, "batch_rows": 10, "linger": "1ms"})
    StreamExecutor(
        cfg,
        base_dir=tmp_path,
        source=source,
        sinks={"out": SlowSink("out")},
        handle_signals=False,
    ).run()
    assert len(leads) >= 50
    # queue (2) + one chunk the reader holds while waiting + one being cut into a batch
    assert max(leads) <= 2 + 2


def test_idle_partition_does_not_stall_windows_while_input_is_quiet(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Partition b goes quiet at t=0; a reaches t=60 s. Once b has been idle for idle_timeout,
    the windows a's watermark closed are emitted even though no record arrives any more
    (the runtime ticks the window step), and without the end of input."""
    import threading

    a, b = f"{redis_prefix}:a", f"{redis_prefix}:b"
    produce(redis_url, b, [{"k": "b", "t": 0}])
    produce(redis_url, a, [{"k": "a", "t": s * 1000} for s in range(61)])
    path = tmp_path / "p.yaml"
    path.write_text(
        json.dumps(
            {
                "pipeline": "stream_idle",
                "source": {
                    "kind": "redis_stream",
                    "url": redis_url,
                    "stream": [a, b],
                    "schema": {"k": "string", "t": "int64"},
                },
                "steps": [
                    {
                        "id": "w",
                        "window": {"size": "10s", "time": "t", "key": "k", "idle_timeout": "300ms"},
                        "aggregate": {"n": "count()"},
                    }
                ],
                "sinks": [{"id": "out", "kind": "jsonl", "path": "out/"}],
                "checkpoint": {"path": "state/cp.db", "every": "100ms"},
            }
        )
    )
    from sluice.config.loader import load_pipeline

    ex = StreamExecutor(load_pipeline(path), base_dir=tmp_path, handle_signals=False)
    runner = threading.Thread(target=ex.run)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(rows) < 7:
            time.sleep(0.2)
            rows = [
                json.loads(x)
                for f in (tmp_path / "out").glob("*.jsonl")
                for x in f.read_text().splitlines()
            ]
    finally:
        ex.request_stop()
        runner.join(timeout=30)
    assert ex.report.status == "stopped"  # not the end of input: nothing was flushed by finish
    got = sorted((r["k"], r["window_start"][:19].replace(" ", "T"), r["n"]) for r in rows)
    # b is idle, so the watermark is a's (60 s): a's windows [0,10) ... [50,60) and b's [0,10)
    # are closed; a's [60,70) stays open
    expected = [("a", f"1970-01-01T00:00:{10 * m:02d}", 10) for m in range(6)]
    assert got == [*expected, ("b", "1970-01-01T00:00:00", 1)]


def test_a_store_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "cp.db").write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(ConfigError) as err:
        StreamExecutor(
            _cfg(tmp_path), base_dir=tmp_path, source=MemoryStream([]), handle_signals=False
        ).run()
    assert "cp.db" in str(err.value) and "checkpoint.path" in str(err.value)


def test_i8_F_publish_dead_letters_stay_in_their_epoch_across_a_crash(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Rows a database refuses while an epoch is published are dead letters *of that epoch*:
    killed right after the publish (before the next epoch could carry them, which is where they
    went before), the restart writes them from the epoch's journal, exactly once."""
    import duckdb
    from redis_helpers import run_until_crash

    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("CREATE TABLE t (id BIGINT, v BIGINT)")  # v is text in the messages
    stream = f"{redis_prefix}:s"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        json.dumps(
            {
                "pipeline": "stream_late",
                "source": {
                    "kind": "redis_stream",
                    "url": redis_url,
                    "stream": stream,
                    "schema": {"id": "int64", "v": "string"},
                },
                "sinks": [{"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t"}],
                "checkpoint": {"path": "state/cp.db", "every": "300ms"},
            }
        )
    )
    produce(redis_url, stream, [{"id": i, "v": f"x{i}"} for i in range(30)])
    assert run_until_crash(pipeline, "mid_publish:1") == -signal.SIGKILL
    _run(pipeline)
    letters = pl.concat(
        [pl.read_ndjson(f) for f in sorted((tmp_path / "dead_letters").rglob("*.jsonl"))]
    )
    ids = sorted(json.loads(x)["id"] for x in letters["payload"].to_list())
    assert ids == list(range(30)) and letters["position"].n_unique() == 30
    assert set(letters["reason"].to_list()) == {"sink_rejected"}
    refused = [p.name for p in (tmp_path / "dead_letters" / "stream_late").glob("*refused*")]
    assert refused == ["part-e000000001-refused-db.jsonl"]  # the epoch they come from
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM t").fetchone() == (0,)
