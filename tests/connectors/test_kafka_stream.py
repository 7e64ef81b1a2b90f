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
