"""Broker payloads → Arrow (shared by the Redis Streams and Kafka sources)."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa

from sluice.batch import ROW_COL, SOURCE_COL, rows_as_json, source_names
from sluice.connectors._messages import MessageDecoder


def test_json_messages_become_typed_rows_with_positions() -> None:
    dec = MessageDecoder("src", "json", {"id": pa.int64(), "day": pa.date32()})
    payloads = [
        json.dumps({"id": i, "day": f"2026-12-0{i + 1}", "v": i / 2}).encode() for i in range(3)
    ]
    table, dead = dec.decode(payloads, "redis:s", [10, 11, 12])
    assert dead is None and table is not None
    assert table.column("id").to_pylist() == [0, 1, 2]
    assert table.column("day").to_pylist() == [dt.date(2026, 12, i) for i in (1, 2, 3)]
    assert table.column(ROW_COL).to_pylist() == [10, 11, 12]
    assert source_names(table.column(SOURCE_COL)).to_pylist() == ["redis:s"] * 3


def test_bad_messages_are_dead_letters_and_the_good_ones_are_kept() -> None:
    dec = MessageDecoder("src", "json", {"id": pa.int64(), "day": pa.date32()})
    payloads = [
        b'{"id": 1, "day": "2026-01-01"}',
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"id": "x", "day": "2026-01-02"}',
        b'{"id": 3, "day": "someday"}',
    ]
    table, dead = dec.decode(payloads, "kafka:t/0", list(range(6)))
    assert table is not None and table.column("id").to_pylist() == [1]
    assert dead is not None
    got = sorted(
        zip(dead.column("position").to_pylist(), dead.column("reason").to_pylist(), strict=True)
    )
    assert got == [
        (1, "parse_error"),
        (2, "encoding"),
        (3, "parse_error"),
        (4, "cast_error"),
        (5, "cast_error"),
    ]
    assert set(dead.column("source").to_pylist()) == {"kafka:t/0"}


def test_text_format_keeps_the_payload_whole() -> None:
    table, dead = MessageDecoder("src", "text").decode([b"a b", b"{x"], "p", [0, 1])
    assert dead is None and table is not None
    assert table.column("value").to_pylist() == ["a b", "{x"]


def test_rows_as_json_handles_nested_binary_and_odd_types() -> None:
    t = pa.table(
        {
            "l": [[1, 2], [3]],
            "s": [{"a": 1}, {"a": 2}],
            "b": [b"\xff\x00", b"ok"],
            "d": [dt.date(2026, 1, 1), None],
        }
    )
    rows = [json.loads(x) for x in rows_as_json(t).to_pylist()]
    assert rows == [
        {"l": [1, 2], "s": {"a": 1}, "b": "/wA=", "d": "2026-01-01"},
        {"l": [3], "s": {"a": 2}, "b": "b2s=", "d": None},
    ]
