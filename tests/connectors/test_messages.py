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


# ------------------------------------------------------------------------------ issue 8 items


def test_i8_10_invalid_utf8_inside_a_json_string_is_an_encoding_letter() -> None:
    """Before, a batch whose payloads were all objects went through pyarrow unchecked: invalid
    UTF-8 inside a string value reached the table (and every sink after it)."""
    payloads = [b'{"id": 1, "s": "ok"}', b'{"id": 2, "s": "\xff\xfe"}', b'{"id": 3, "s": "\xc3"}']
    table, dead = MessageDecoder("src", "json").decode(payloads, "kafka:t/0", [0, 1, 2])
    assert table is not None and table.column("s").to_pylist() == ["ok"]
    table.validate(full=True)
    assert dead is not None
    assert dead.column("reason").to_pylist() == ["encoding", "encoding"]
    assert dead.column("position").to_pylist() == [1, 2]
    dead.validate(full=True)  # the letters' payloads are valid text too


def test_i8_10_text_format_refuses_invalid_utf8() -> None:
    table, dead = MessageDecoder("src", "text").decode([b"ok", b"\xffbad", b"fine"], "p", [4, 5, 6])
    assert table is not None and table.column("value").to_pylist() == ["ok", "fine"]
    assert table.column(ROW_COL).to_pylist() == [4, 6]
    assert dead is not None and dead.column("reason").to_pylist() == ["encoding"]
    assert dead.column("position").to_pylist() == [5]


def test_i8_broker_null_empty_and_non_objects_are_letters_never_rows() -> None:
    """JSON null used to become an all-null row (pyarrow's reader accepted it)."""
    payloads = [b'{"id": 1}', b"null", b"", b"   ", b"[1]", b"7", b'"x"', b"{}"]
    table, dead = MessageDecoder("src", "json").decode(payloads, "p", list(range(8)))
    assert table is not None and table.column(ROW_COL).to_pylist() == [0, 7]
    assert table.column("id").to_pylist() == [1, None]  # {} is one row without values
    assert dead is not None
    assert dead.column("position").to_pylist() == [1, 2, 3, 4, 5, 6]
    assert set(dead.column("reason").to_pylist()) == {"parse_error"}
    messages = dead.column("message").to_pylist()
    assert "got null" in messages[0] and "empty message" in messages[1]
    assert "got an array" in messages[3] and "got a number" in messages[4]


def test_i8_broker_message_over_max_record_bytes_is_too_large() -> None:
    big = b'{"id": 2, "pad": "' + b"x" * 5000 + b'"}'
    dec = MessageDecoder("src", "json", max_bytes=1000)
    table, dead = dec.decode([b'{"id": 1}', big, b'{"id": 3}'], ["p", "q", "p"], [0, 1, 2])
    assert table is not None and table.column("id").to_pylist() == [1, 3]
    assert source_names(table.column(SOURCE_COL)).to_pylist() == ["p", "p"]
    assert dead is not None and dead.column("reason").to_pylist() == ["too_large"]
    assert dead.column("source").to_pylist() == ["q"] and dead.column("position")[0].as_py() == 1
    assert len(dead.column("payload")[0].as_py()) == 4096
    assert "5,020 bytes" in dead.column("message")[0].as_py()


def test_i8_broker_deeply_nested_message_is_a_letter_not_a_crash() -> None:
    """pyarrow's JSON parser crashed the process (segmentation fault) on a message nested some
    ten thousand levels deep. Run in a child process so the old behaviour fails the test
    instead of killing the test run."""
    import subprocess
    import sys

    code = (
        "from sluice.connectors._messages import MessageDecoder\n"
        "n = 100000\n"
        "hostile = [b'{\"a\":' * n + b'1' + b'}' * n, b'{\"a\":' + b'[' * n + b']' * n + b'}']\n"
        "ok = b'{\"a\":' * 200 + b'1' + b'}' * 200\n"
        "for msg in [*hostile, ok]:\n"
        "    t, d = MessageDecoder('s', 'json').decode([b'{\"a\": 1}', msg], 'p', [0, 1])\n"
        "    print(t.num_rows, None if d is None else d.column('message')[0].as_py())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = done.stdout.decode().splitlines()
    assert lines[:2] == ["1 JSON nested deeper than 200 levels"] * 2
    assert lines[2] == "2 None"  # 200 levels are still fine
