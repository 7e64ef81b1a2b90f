"""Redis Streams sink in stream mode: each epoch once (against the real Redis server)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import redis

from sluice.batch import with_positions
from sluice.config.models import RedisStreamSink
from sluice.connectors.redis_streams import RedisStreamWriter
from sluice.plugins import EpochPublisher, RunContext


def _rows(start: int, n: int) -> pa.Table:
    return with_positions(pa.table({"id": list(range(start, start + n))}), "src", start)


def _ids(url: str, key: str) -> list[int]:
    client = redis.Redis.from_url(url)
    try:
        return [json.loads(f[b"data"])["id"] for _, f in client.xrange(key)]
    finally:
        client.close()


def test_epochs_are_added_once(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    key = f"{redis_prefix}:out"
    cfg = RedisStreamSink(id="out", kind="redis_stream", url=redis_url, stream=key)
    w = RedisStreamWriter(cfg)
    assert isinstance(w, EpochPublisher)
    w.open(RunContext("p", "stream-a", tmp_path))
    assert w.published_epoch() is None
    for epoch, start in ((1, 0), (2, 3), (3, 6)):
        assert w.publish(epoch, _rows(start, 3)).num_rows == 0
    assert w.publish(2, _rows(3, 3)).num_rows == 0  # replayed: skipped
    assert w.published_epoch() == 3
    w.close()
    again = RedisStreamWriter(cfg)  # after a restart, same checkpoint history
    again.open(RunContext("p", "stream-a", tmp_path))
    assert again.published_epoch() == 3
    again.publish(3, _rows(6, 3))
    again.publish(4, _rows(9, 1))
    again.close()
    other = RedisStreamWriter(cfg)  # a new checkpoint history does not inherit the marker
    other.open(RunContext("p", "stream-b", tmp_path))
    assert other.published_epoch() is None
    other.close()
    assert _ids(redis_url, key) == list(range(10))


# ------------------------------------------------------------------------------ issue 8 items


def _produce(url: str, stream: str, rows: list[dict[str, object]]) -> None:
    client = redis.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for r in rows:
            pipe.xadd(stream, {"data": json.dumps(r)})
        pipe.execute()
    finally:
        client.close()


def _pipeline_file(tmp: Path, stream: str, url: str, **extra: object) -> Path:
    path = tmp / "p.yaml"
    cfg: dict[str, object] = {
        "pipeline": "redis_i8",
        "source": {"kind": "redis_stream", "url": url, "stream": stream, "schema": {"id": "int64"}},
        "sinks": [{"id": "out", "kind": "parquet", "path": "out/"}],
        "checkpoint": {"path": "state/cp.db", "every": "50ms"},
        **extra,
    }
    path.write_text(json.dumps(cfg))
    return path


def _out_ids(tmp: Path) -> list[int]:
    import polars as pl

    if not list((tmp / "out").glob("part-*.parquet")):
        return []
    return sorted(pl.read_parquet(tmp / "out" / "*.parquet")["id"].to_list())


def test_i8_18_deleting_the_stream_while_running_is_a_clear_error(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Deleting the stream key under a running pipeline stops it with an error that names the
    stream, the group and the fix (not "unexpected error ... please report it"); the restart
    recreates the group and reads what was added since, nothing twice."""
    import subprocess
    import sys
    import time

    stream = f"{redis_prefix}:s"
    pipeline = _pipeline_file(tmp_path, stream, redis_url)
    _produce(redis_url, stream, [{"id": i} for i in range(200)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "run", str(pipeline), "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while _out_ids(tmp_path) != list(range(200)) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        assert _out_ids(tmp_path) == list(range(200))
        client = redis.Redis.from_url(redis_url)
        try:
            assert client.delete(stream) == 1
        finally:
            client.close()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.decode()
    assert proc.returncode == 1, text
    assert "please report" not in text and "Traceback" not in text, text
    assert stream in text and "'sluice'" in text and "deleted" in text, text
    assert "Fix:" in text or "fix" in text.lower(), text
    # the restart recreates the stream's group and reads what was added since the deletion
    _produce(redis_url, stream, [{"id": i} for i in range(200, 300)])
    command = [sys.executable, "-m", "sluice.cli", "run", str(pipeline), "--no-progress"]
    done = subprocess.run(
        [*command, "--until-idle", "2s"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert _out_ids(tmp_path) == list(range(300))


def test_i8_18_destroyed_group_is_a_source_error_naming_stream_and_group(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    from sluice.config.models import RedisStreamSource
    from sluice.connectors.redis_streams import RedisStreamReader
    from sluice.errors import SourceError

    key = f"{redis_prefix}:s"
    _produce(redis_url, key, [{"id": 1}])
    reader = RedisStreamReader(
        RedisStreamSource(kind="redis_stream", url=redis_url, stream=key, group="g1")
    )
    reader.open(RunContext("p", "r", tmp_path), None)
    try:
        chunk = reader.poll(1.0)
        assert chunk is not None and chunk.table is not None and chunk.table.num_rows == 1
        client = redis.Redis.from_url(redis_url)
        try:
            client.xgroup_destroy(key, "g1")
        finally:
            client.close()
        with pytest.raises(SourceError) as err:
            reader.poll(0.2)
    finally:
        reader.close()
    text = str(err.value)
    assert repr(key) in text and "'g1'" in text and "no longer exists" in text
    assert "Fix: restart the pipeline" in text


def _letters(tmp: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for f in sorted((tmp / "dead").glob("part-*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


def test_i8_25_redis_letters_name_the_exact_message_id(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Hostile messages (not UTF-8, not JSON, JSON null, empty, 20 MB, no payload field) and a
    value a later `cast` step refuses each become a dead letter whose source/position turn
    back into the message's id; good messages go on. A second stream with explicit ids beyond
    the packed range (seq >= 10**6) is traced exactly too."""
    from sluice.config.loader import parse_pipeline
    from sluice.connectors.redis_streams import message_id
    from sluice.runtime.stream import StreamExecutor

    key, odd = f"{redis_prefix}:s", f"{redis_prefix}:odd"
    client = redis.Redis.from_url(redis_url)
    try:
        add = lambda data, k=key, **kw: client.xadd(k, {"data": data}, **kw).decode()  # noqa: E731
        expect: dict[str, str] = {}  # message id -> reason
        add(json.dumps({"id": 1, "n": "1"}))
        expect[add(b"\xff\xfe{")] = "encoding"
        expect[add(b"{not json")] = "parse_error"
        expect[add(b"null")] = "parse_error"
        expect[add(b"")] = "parse_error"
        expect[add(b'{"id": 2, "pad": "' + b"x" * (20 << 20) + b'"}')] = "too_large"
        expect[client.xadd(key, {"other": "1"}).decode()] = "parse_error"  # no 'data' field
        expect[add(json.dumps({"id": 3, "n": "x"}))] = "cast_error"  # refused by the cast step
        add(json.dumps({"id": 4, "n": "4"}))
        add(json.dumps({"id": 5, "n": "5"}), k=odd, id="7-1")
        expect[add(json.dumps({"id": 6, "n": "y"}), k=odd, id="7-5000000")] = "cast_error"
        expect[add(b"[1]", k=odd, id="99999999999999-1")] = "parse_error"
    finally:
        client.close()
    cfg = parse_pipeline(
        {
            "pipeline": "redis_i8_25",
            "source": {"kind": "redis_stream", "url": redis_url, "stream": [key, odd]},
            "steps": [{"id": "typed", "cast": {"n": "int64"}}],
            "sinks": [{"id": "out", "kind": "jsonl", "path": "out/"}],
            "checkpoint": {"path": "state/cp.db", "every": "50ms"},
            "dead_letter": {"path": "dead"},
        }
    )
    rep = StreamExecutor(cfg, base_dir=tmp_path, until_idle=1.0, handle_signals=False).run()
    assert rep.status == "succeeded" and rep.balanced
    got = {}
    for d in _letters(tmp_path):
        source, position = str(d["source"]), int(str(d["position"]))
        stream = key if source.startswith(f"redis:{key}") else odd
        assert source.startswith(f"redis:{stream}")
        got[message_id(source, position)] = d["reason"]
        if d["reason"] == "cast_error":
            assert d["step_id"] == "typed"
    assert got == expect
    rows = [
        json.loads(line)
        for f in (tmp_path / "out").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert sorted(r["id"] for r in rows) == [1, 4, 5]


def test_i8_25_message_position_round_trips() -> None:
    from sluice.connectors.redis_streams import message_id, message_position

    for raw in (
        "1700000000000-0",
        "1700000000000-999999",
        "0-0",
        "0-1000000",
        "7-5000000",
        "9223372036853-1",
        "18446744073709551615-18446744073709551615",
        "5-9223372036854775808",
    ):
        source, position = message_position("redis:k@1", raw)
        assert 0 <= position < 2**63
        assert message_id(source, position) == raw
    assert message_position("redis:k", "1700000000000-5") == ("redis:k", 1700000000000000005)
