"""Kafka through the stream runtime, against a Tansu broker started here: a pipeline reads a
topic with 3 partitions into Parquet and another topic, stops, and resumes after a restart from
the offsets its checkpoint committed, with nothing lost or repeated."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from confluent_kafka import Consumer, Producer
from kafka_broker import FAST_GROUP, create_topic, tansu_broker

from sluice.config.loader import parse_pipeline
from sluice.runtime.stream import StreamExecutor


@pytest.fixture(scope="module")
def brokers() -> Iterator[str]:
    with tansu_broker() as address:
        yield address


def _produce(brokers: str, topic: str, ids: range) -> None:
    producer = Producer({"bootstrap.servers": brokers})
    for i in ids:
        producer.produce(topic, json.dumps({"id": i, "odd": i % 2 == 1}).encode(), key=str(i))
    assert producer.flush(10) == 0


def _read_topic(brokers: str, topic: str, n: int) -> list[dict[str, Any]]:
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"check-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            **FAST_GROUP,
        }
    )
    consumer.subscribe([topic])
    out: list[dict[str, Any]] = []
    try:
        for _ in range(100):
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                if msg.error() is None and msg.value() is not None:
                    out.append(json.loads(msg.value()))
            if len(out) >= n:
                break
    finally:
        consumer.close()
    return out


def test_stream_pipeline_resumes_from_committed_offsets(tmp_path: Path, brokers: str) -> None:
    src, dst = f"in-{uuid.uuid4().hex[:8]}", f"out-{uuid.uuid4().hex[:8]}"
    create_topic(brokers, src, partitions=3)
    create_topic(brokers, dst)
    cfg = parse_pipeline(
        {
            "pipeline": "kafka_stream",
            "source": {
                "kind": "kafka",
                "brokers": brokers,
                "topic": src,
                "group": f"g-{src}",
                "options": FAST_GROUP,
                "schema": {"id": "int64", "odd": "bool"},
            },
            "steps": [{"id": "even", "filter": "NOT odd"}],
            "sinks": [
                {"id": "files", "kind": "parquet", "path": "out/"},
                {"id": "topic", "kind": "kafka", "brokers": brokers, "topic": dst},
            ],
            "checkpoint": {"path": "state/cp.db", "every": "200ms"},
        }
    )

    def run() -> Any:
        return StreamExecutor(cfg, base_dir=tmp_path, until_idle=4.0, handle_signals=False).run()

    _produce(brokers, src, range(0, 600))
    first = run()
    assert first.rows_read == 600
    _produce(brokers, src, range(600, 1000))
    second = run()
    assert second.rows_read == 400  # resumed after the committed offsets: nothing read twice
    files = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert sorted(files["id"].to_list()) == list(range(0, 1000, 2))
    assert first.dead_letters == 0 and second.dead_letters == 0
    topic_rows = _read_topic(brokers, dst, 500)
    assert sorted(r["id"] for r in topic_rows) == list(range(0, 1000, 2))


def _drain_topic(brokers: str, topic: str, quiet: float = 3.0) -> list[dict[str, Any]]:
    """Every message of ``topic`` (read until nothing new came for ``quiet`` seconds)."""
    import time

    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"drain-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            **FAST_GROUP,
        }
    )
    consumer.subscribe([topic])
    out: list[dict[str, Any]] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < quiet:
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                if msg.error() is None and msg.value() is not None:
                    out.append(json.loads(msg.value()))
                    last = time.monotonic()
    finally:
        consumer.close()
    return out


def test_i8_kafka_sink_graceful_stop_and_restart_never_duplicates(
    tmp_path: Path, brokers: str
) -> None:
    """Kafka → Kafka stream stopped gracefully (what SIGTERM does: ``request_stop``) while its
    last epoch holds records, then restarted, twice: the output topic holds every record
    exactly once. Before, each restart published the last epoch again (its 1,500 records
    twice); the sink now records each published epoch in its marker."""
    import threading
    import time

    src, dst = f"in-{uuid.uuid4().hex[:8]}", f"out-{uuid.uuid4().hex[:8]}"
    create_topic(brokers, src, partitions=2)
    create_topic(brokers, dst)
    cfg = parse_pipeline(
        {
            "pipeline": "kafka_i8_sink",
            "source": {
                "kind": "kafka",
                "brokers": brokers,
                "topic": src,
                "group": f"g-{src}",
                "options": FAST_GROUP,
                "schema": {"id": "int64", "odd": "bool"},
            },
            "sinks": [{"id": "topic", "kind": "kafka", "brokers": brokers, "topic": dst}],
            # no checkpoint before the stop: the final one holds every record read
            "checkpoint": {"path": "state/cp.db", "every": "1h"},
        }
    )

    def run_then_stop(rows: int) -> None:
        ex = StreamExecutor(cfg, base_dir=tmp_path, handle_signals=False)
        reports: list[Any] = []
        thread = threading.Thread(target=lambda: reports.append(ex.run()))
        thread.start()
        deadline = time.monotonic() + 60
        while ex.report.rows_read < rows and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        ex.request_stop()
        thread.join(60)
        assert reports and reports[0].status == "stopped", reports
        assert reports[0].rows_read == rows

    _produce(brokers, src, range(0, 1500))
    run_then_stop(1500)
    _produce(brokers, src, range(1500, 2000))
    run_then_stop(500)
    last = StreamExecutor(cfg, base_dir=tmp_path, until_idle=2.0, handle_signals=False).run()
    assert last.rows_read == 0 and last.status == "succeeded"
    ids = sorted(r["id"] for r in _drain_topic(brokers, dst))
    assert ids == list(range(2000))  # nothing duplicated, nothing lost


def test_i8_25_kafka_letters_name_partition_and_offset(tmp_path: Path, brokers: str) -> None:
    """Hostile messages (not UTF-8, not JSON, JSON null, empty, a tombstone, 20 MB) and a value
    a later `cast` step refuses each become a dead letter naming the exact partition and
    offset; the good messages around them go through and the stream keeps going."""
    src = f"in-{uuid.uuid4().hex[:8]}"
    create_topic(brokers, src, partitions=2)
    producer = Producer({"bootstrap.servers": brokers, "message.max.bytes": 30_000_000})
    sent: list[tuple[int, bytes | None, str | None]] = [  # partition, payload, reason
        (0, json.dumps({"id": 1, "n": "1"}).encode(), None),
        (0, b"\xff\xfe{", "encoding"),
        (0, b"{not json", "parse_error"),
        (1, json.dumps({"id": 2, "n": "2"}).encode(), None),
        (1, b"null", "parse_error"),
        (1, b"", "parse_error"),
        (1, None, "parse_error"),  # tombstone
        (0, b'{"id": 3, "pad": "' + b"x" * (20 << 20) + b'"}', "too_large"),
        (0, json.dumps({"id": 4, "n": "x"}).encode(), "cast_error"),
        (1, json.dumps({"id": 5, "n": "5"}).encode(), None),
    ]
    expect: dict[tuple[str, int], str] = {}
    offsets = {0: 0, 1: 0}
    for partition, payload, reason in sent:
        producer.produce(src, payload, partition=partition)
        if reason is not None:
            expect[(f"kafka:{src}/{partition}", offsets[partition])] = reason
        offsets[partition] += 1
    assert producer.flush(30) == 0
    cfg = parse_pipeline(
        {
            "pipeline": "kafka_i8_25",
            "source": {
                "kind": "kafka",
                "brokers": brokers,
                "topic": src,
                "group": f"g-{src}",
                "options": FAST_GROUP,
            },
            "steps": [{"id": "typed", "cast": {"n": "int64"}}],
            "sinks": [{"id": "files", "kind": "jsonl", "path": "out/"}],
            "checkpoint": {"path": "state/cp.db", "every": "200ms"},
            "dead_letter": {"path": "dead"},
        }
    )
    rep = StreamExecutor(cfg, base_dir=tmp_path, until_idle=3.0, handle_signals=False).run()
    assert rep.status == "succeeded" and rep.balanced
    letters = [
        json.loads(line)
        for f in sorted((tmp_path / "dead").glob("part-*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    got = {(d["source"], d["position"]): d["reason"] for d in letters}
    assert got == expect
    assert {d["step_id"] for d in letters if d["reason"] == "cast_error"} == {"typed"}
    rows = [
        json.loads(line)
        for f in (tmp_path / "out").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert sorted(r["id"] for r in rows) == [1, 2, 5]


def test_i8_kafka_sink_crash_duplicates_at_most_the_epoch_in_flight(
    tmp_path: Path, brokers: str
) -> None:
    """kill -9 in the one window the marker cannot cover: the first epoch with records was
    produced and acknowledged, its marker not yet committed. After the restart exactly that
    epoch's records are in the output topic twice (the guarantee docs/streaming.md states);
    nothing is lost, nothing else is repeated."""
    import os
    import subprocess
    import sys

    import pyarrow.ipc as ipc

    src, dst = f"in-{uuid.uuid4().hex[:8]}", f"out-{uuid.uuid4().hex[:8]}"
    create_topic(brokers, src)
    create_topic(brokers, dst)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        json.dumps(
            {
                "pipeline": "kafka_i8_crash",
                "source": {
                    "kind": "kafka",
                    "brokers": brokers,
                    "topic": src,
                    "group": f"g-{src}",
                    "options": FAST_GROUP,
                    "schema": {"id": "int64", "odd": "bool"},
                },
                "sinks": [{"id": "topic", "kind": "kafka", "brokers": brokers, "topic": dst}],
                "checkpoint": {"path": "state/cp.db", "every": "100ms"},
                "settings": {"batch_rows": 100},
            }
        )
    )
    command = [sys.executable, "-m", "sluice.cli", "run", str(pipeline), "--no-progress"]
    _produce(brokers, src, range(0, 3000))
    crashed = subprocess.run(
        [*command, "--until-idle", "3s"],
        cwd=tmp_path,
        env={**os.environ, "SLUICE_TEST_CRASH": "kafka_before_marker:1"},
        capture_output=True,
        check=False,
    )
    assert crashed.returncode == -9, crashed.stderr.decode()
    staged = sorted((tmp_path / "state" / "cp.db.staging" / "topic").glob("epoch-*.arrow"))
    with ipc.open_file(str(staged[-1])) as f:  # the epoch being published at the crash
        in_flight = f.read_all().column("id").to_pylist()
    assert in_flight
    done = subprocess.run(
        [*command, "--until-idle", "3s"], cwd=tmp_path, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    ids = [r["id"] for r in _drain_topic(brokers, dst)]
    assert sorted(set(ids)) == list(range(3000))  # nothing lost
    twice = sorted(i for i in set(ids) if ids.count(i) == 2)
    assert len(ids) == 3000 + len(twice) and twice == sorted(in_flight)
