"""Redis Streams sink in stream mode: each epoch once (against the real Redis server)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
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
