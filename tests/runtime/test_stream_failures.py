"""Failure paths of stream mode found in review, each against the real Redis / PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import redis
from redis_helpers import produce, run_until_crash

from sluice.config.loader import load_pipeline, parse_pipeline
from sluice.connectors.redis_streams import RedisStreamReader
from sluice.errors import ConfigError, StepError
from sluice.runtime.stream import StreamExecutor
from sluice.testing import MemorySink, MemoryStream


def _pipeline(tmp: Path, url: str, stream: str, **extra: Any) -> Path:
    raw: dict[str, Any] = {
        "pipeline": "failures",
        "source": {
            "kind": "redis_stream",
            "url": url,
            "stream": stream,
            "count": 100,
            "schema": {"id": "int64"},
        },
        "sinks": [{"id": "out", "kind": "parquet", "path": "out/"}],
        "checkpoint": {"path": "state/cp.db", "every": "50ms"},
        "settings": {"retry_backoff": 0.01},
    }
    raw.update(extra)
    path = tmp / "p.yaml"
    path.write_text(json.dumps(raw))
    return path


def _ids(tmp: Path) -> list[int]:
    return sorted(pl.read_parquet(tmp / "out" / "*.parquet")["id"].to_list())


def _run(path: Path, **kw: Any) -> Any:
    return StreamExecutor(
        load_pipeline(path), base_dir=path.parent, until_idle=0.5, handle_signals=False, **kw
    ).run()


def test_a_lost_read_reply_loses_nothing(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    """Redis delivered messages but the reply never arrived (connection dropped): the reader
    re-reads from its position instead of skipping what is now pending."""
    stream = f"{redis_prefix}:s"
    produce(redis_url, stream, [{"id": i} for i in range(1000)])
    path = _pipeline(tmp_path, redis_url, stream)
    cfg = load_pipeline(path)
    reader = RedisStreamReader(cfg.source)  # type: ignore[arg-type]
    real_open = reader.open
    calls = {"n": 0}

    def open_with_fault(ctx: Any, position: Any) -> None:
        real_open(ctx, position)
        real = reader._client.xreadgroup

        def flaky(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            res = real(*args, **kwargs)
            if calls["n"] == 3:
                raise redis.ConnectionError("reply lost")  # delivered, but we never saw it
            return res

        reader._client.xreadgroup = flaky

    reader.open = open_with_fault  # type: ignore[method-assign]
    rep = StreamExecutor(
        cfg, base_dir=tmp_path, source=reader, until_idle=0.5, handle_signals=False
    ).run()
    assert calls["n"] >= 3 and rep.status == "succeeded"
    assert _ids(tmp_path) == list(range(1000))


def test_group_behind_the_checkpoint_gives_no_duplicates(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Redis restored from an older snapshot: the group's cursor is behind the checkpoint."""
    stream = f"{redis_prefix}:s"
    produce(redis_url, stream, [{"id": i} for i in range(1000)])
    path = _pipeline(tmp_path, redis_url, stream)
    _run(path)
    client = redis.Redis.from_url(redis_url)
    try:
        middle = client.xrange(stream, count=500)[-1][0]
        client.xgroup_setid(stream, "sluice", id=middle)
    finally:
        client.close()
    produce(redis_url, stream, [{"id": i} for i in range(1000, 1200)])
    _run(path)
    assert _ids(tmp_path) == list(range(1200))


def test_pending_messages_covered_by_the_checkpoint_are_acknowledged_on_restart(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    stream = f"{redis_prefix}:s"
    produce(redis_url, stream, [{"id": i} for i in range(500)])
    path = _pipeline(tmp_path, redis_url, stream)
    assert run_until_crash(path, "before_ack:1") == -9
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.xpending(stream, "sluice")["pending"] > 0
        _run(path)
        assert client.xpending(stream, "sluice")["pending"] == 0
    finally:
        client.close()
    assert _ids(tmp_path) == list(range(500))


def test_rows_refused_while_rolling_an_epoch_forward_are_dead_letters(
    tmp_path: Path, redis_url: str, redis_prefix: str, pg_dsn: str, pg_schema: str
) -> None:
    """Crash after the checkpoint, before PostgreSQL got the epoch: the restart publishes the
    staged epoch; the row the table refuses (CHECK) becomes a dead letter, the rest commits."""
    import psycopg

    with psycopg.connect(pg_dsn) as conn:
        conn.execute(f'CREATE TABLE "{pg_schema}".t (id bigint CHECK (id <> 5))')
    stream = f"{redis_prefix}:s"
    produce(redis_url, stream, [{"id": i} for i in range(20)])
    path = _pipeline(
        tmp_path,
        redis_url,
        stream,
        sinks=[{"id": "db", "kind": "postgres", "dsn": pg_dsn, "table": f"{pg_schema}.t"}],
    )
    assert run_until_crash(path, "after_checkpoint:1") == -9
    rep = _run(path)
    assert rep.status == "succeeded"
    with psycopg.connect(pg_dsn) as conn:
        got = sorted(r[0] for r in conn.execute(f'SELECT id FROM "{pg_schema}".t'))
    assert got == [i for i in range(20) if i != 5]
    letters = [
        json.loads(x)
        for f in (tmp_path / "dead_letters").rglob("*.jsonl")
        for x in f.read_text().splitlines()
    ]
    assert [(d["reason"], json.loads(d["payload"])["id"]) for d in letters] == [
        ("sink_rejected", 5)
    ]
    assert letters[0]["source"] == f"redis:{stream}"


def test_every_checkpoint_damaged_is_an_error_not_a_new_history(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    stream = f"{redis_prefix}:s"
    produce(redis_url, stream, [{"id": i} for i in range(300)])
    path = _pipeline(tmp_path, redis_url, stream)
    _run(path)
    with sqlite3.connect(tmp_path / "state" / "cp.db") as db:
        db.execute("UPDATE checkpoints SET body = x'00'")
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        _run(path)
    assert _ids(tmp_path) == list(range(300))  # outputs untouched


def _cfg(tmp: Path, steps: list[dict[str, Any]]) -> Any:
    return parse_pipeline(
        {
            "pipeline": "poison",
            "source": {"kind": "redis_stream", "stream": "unused"},
            "steps": steps,
            "sinks": [{"id": "out", "kind": "jsonl", "path": "out/"}],
            "checkpoint": {"path": str(tmp / "cp.db"), "every": "10ms"},
            "dead_letter": {"path": str(tmp / "dead")},
        }
    )


def test_two_poison_records_in_a_big_batch_cost_only_themselves(tmp_path: Path) -> None:
    values = [str(i) for i in range(1000)]
    values[0], values[999] = "x", "y"
    sink = MemorySink("out")
    rep = StreamExecutor(
        _cfg(tmp_path, [{"id": "num", "derive": {"n": "CAST(s AS INTEGER)"}}]),
        base_dir=tmp_path,
        source=MemoryStream([pa.table({"s": values})]),
        sinks={"out": sink},
        handle_signals=False,
    ).run()
    assert pa.concat_tables(sink.committed).num_rows == 998
    assert rep.dead_letters_by_reason == {"step_error": 2}


def test_a_systematic_step_error_dead_letters_the_batch_at_once(tmp_path: Path) -> None:
    sink = MemorySink("out")
    rep = StreamExecutor(
        _cfg(tmp_path, [{"id": "num", "derive": {"n": "CAST(s AS INTEGER)"}}]),
        base_dir=tmp_path,
        source=MemoryStream([pa.table({"s": [f"x{i}" for i in range(5000)]})]),
        sinks={"out": sink},
        handle_signals=False,
    ).run()
    assert rep.dead_letters_by_reason == {"step_error": 5000}
    assert not sink.committed or pa.concat_tables(sink.committed).num_rows == 0


def test_contract_fail_action_stops_the_stream(tmp_path: Path) -> None:
    contract = {
        "name": "c",
        "fields": [{"name": "v", "type": "int64", "max": 10, "action": "fail"}],
    }
    (tmp_path / "c.yaml").write_text(json.dumps(contract))
    cfg = _cfg(tmp_path, [{"id": "check", "contract": str(tmp_path / "c.yaml")}])
    with pytest.raises(StepError):
        StreamExecutor(
            cfg,
            base_dir=tmp_path,
            source=MemoryStream([pa.table({"v": [1, 2, 99, 3]})]),
            sinks={"out": MemorySink("out")},
            handle_signals=False,
        ).run()


def test_a_bug_in_a_step_stops_the_run_instead_of_dead_lettering_everything(
    tmp_path: Path,
) -> None:
    ex = StreamExecutor(
        _cfg(tmp_path, [{"id": "num", "derive": {"n": "CAST(s AS INTEGER)"}}]),
        base_dir=tmp_path,
        source=MemoryStream([pa.table({"s": ["1", "2"]})]),
        sinks={"out": MemorySink("out")},
        handle_signals=False,
    )
    step = ex.steps[0][0]

    def broken(table: Any) -> Any:
        raise AttributeError("'Derive' object has no attribute 'oops'")

    step.process = broken  # type: ignore[method-assign]
    with pytest.raises(AttributeError):
        ex.run()
    assert ex.report.status == "failed" and ex.report.dead_letters == 0
