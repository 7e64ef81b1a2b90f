"""Kafka stream source and sink (confluent-kafka / librdkafka, imported lazily: extra ``kafka``).

Guarantees, and what verified them (``tests/connectors/test_kafka.py`` runs against a real
Kafka-protocol broker, Tansu 0.6, started by the test fixture; no Apache Kafka on the test machine):

**Source** (:class:`KafkaReader`) — *exactly-once input* for a pipeline that checkpoints, in the
sense of the stream runtime: every record is read into the pipeline, and after a restart
reading resumes exactly after the checkpointed position (``{"topic/partition": next_offset}``),
whatever the consumer group's committed offsets say. Offsets are committed to the group only
when a checkpoint covering them is durable (``enable.auto.commit=false``), so the group's
committed offsets are never ahead of a checkpoint. Verified against Tansu: committed offsets
resume with nothing lost or duplicated; an explicit checkpoint position older than the committed
offsets wins; malformed payloads become dead letters while good ones are read.

*At-least-once across a group rebalance*: when partitions are revoked (another member joins the
group), records of those partitions already polled into the pipeline but not yet covered by a
checkpoint are re-read by the new owner from the group's last committed offsets. Several
pipeline instances sharing one group therefore see duplicates around a rebalance; one instance
per group (the supported deployment) sees none.

**Sink** (:class:`KafkaWriter`). The producer is idempotent (``enable.idempotence=true``,
``acks=all``): librdkafka's internal retries never duplicate or reorder a message. In stream
mode each published epoch is recorded in an **epoch marker**: the committed offset of partition
0 of the output topic in the consumer group ``sluice-epoch.<pipeline>.<sink id>.<run id>`` (the
run id names the checkpoint history), committed once every message of the epoch is
acknowledged. A restart re-publishes a staged epoch only when the marker is older, so a clean
stop (SIGINT/SIGTERM, ``--until-idle``) and restart never duplicates. Exact crash guarantee:
the marker and the messages are not one transaction, so a crash (``kill -9``, power loss) or a
failed publish (brokers unreachable past ``message.timeout.ms``) *while an epoch is being
published*, i.e. after its checkpoint and before its marker, publishes that one epoch again at
the restart: the messages of it the broker had acknowledged before appear twice (at most one
epoch per crash; nothing is lost). The test crash point ``kafka_before_marker`` (see
:mod:`sluice.runtime.faults`) kills the process in that window. The marker lives as
long as the broker keeps the group's offsets (``offsets.retention.minutes``, 7 days by
default): a pipeline stopped for longer re-publishes its last epoch once. Kafka transactions
are not used: the broker available here (Tansu 0.6) shows the messages of an aborted
transaction to ``read_committed`` consumers (checked by hand), so they could not be verified.
A batch run is one epoch of the same protocol (its rows staged on disk, published after the
run's commit record, with the marker of the pipeline's batch runs): a run that fails before its
commit sends nothing; a crash while it is published re-publishes it once at the next start
(the window above). The plain batch-sink calls (``write``/``commit``: at-least-once, an
``abort()`` leaves the messages already delivered visible) are no longer used by runs.
Dead letters of a publish are handed to the runtime's journal before the marker is recorded
(:meth:`KafkaWriter.publish_journaled`); an epoch is produced in slices of
:data:`PUBLISH_SLICE_ROWS` rows, each acknowledged before the next, so memory stays bounded
whatever the size of a batch run.
Verified against Tansu: rows written through the batch-sink and the epoch-publisher protocols
are read back complete with their types; rows the producer refuses become dead letters; a
stream pipeline stopped with SIGTERM and restarted leaves no duplicate in its output topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from sluice.batch import concat, empty_dead_letters, rows_dead_letters, strip_positions
from sluice.config.models import KafkaSink, KafkaSource
from sluice.connectors._messages import MessageDecoder
from sluice.errors import (
    ConfigError,
    SinkError,
    SourceError,
    StepError,
    TransientError,
    require,
)
from sluice.plugins import Chunk, RunContext
from sluice.runtime.faults import crash_point
from sluice.types import parse_type

if TYPE_CHECKING:
    from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

log = logging.getLogger("sluice.connectors.kafka")

#: Messages fetched per ``consume`` call.
CONSUME_BATCH = 10_000
#: ``poll`` holds the consumer lock at most this long per ``consume`` call, so that a concurrent
#: ``commit`` (main thread) never waits longer than this.
_CONSUME_SLICE = 0.1

# librdkafka settings the connectors set themselves (from the config fields or for their
# guarantees); ``options`` may not override them.
_SOURCE_OWNED = ("bootstrap.servers", "group.id", "enable.auto.commit", "enable.auto.offset.store")
# librdkafka settings about reaching and authenticating to the brokers: the sink's marker
# consumer uses them too
#: Clients created only to have librdkafka check the options log nothing (they may try to
#: connect in the background before they are closed).
_QUIET = logging.getLogger("sluice.connectors.kafka.check")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False

_CONNECTION_OPTIONS = (
    "security.",
    "sasl.",
    "ssl.",
    "socket.",
    "client.",
    "broker.",
    "reconnect.",
    "api.version",
    "metadata.",
)
_SINK_OWNED = (
    "bootstrap.servers",
    "enable.idempotence",
    "transactional.id",
    "delivery.report.only.error",
    "on_delivery",
)


def _check_options(
    options: Mapping[str, object], owned: tuple[str, ...], step_id: str, what: str
) -> None:
    for key in owned:
        if key in options:
            raise ConfigError(
                f"option {key!r} is set by the {what} itself and cannot be overridden",
                step_id=step_id,
                field="options",
                value=key,
                fix="remove it from options (brokers/group are their own settings)",
            )


def _kafka_error(exc: BaseException) -> KafkaError | None:
    from confluent_kafka import KafkaError

    arg = exc.args[0] if exc.args else None
    return arg if isinstance(arg, KafkaError) else None


_TRANSIENT_NAMES = (
    "_TIMED_OUT",
    "_TIMED_OUT_QUEUE",
    "_TRANSPORT",
    "_ALL_BROKERS_DOWN",
    "_RESOLVE",
    "_WAIT_COORD",
    "_MAX_POLL_EXCEEDED",
    "REQUEST_TIMED_OUT",
    "NETWORK_EXCEPTION",
    "NOT_COORDINATOR",
    "COORDINATOR_NOT_AVAILABLE",
    "COORDINATOR_LOAD_IN_PROGRESS",
    "LEADER_NOT_AVAILABLE",
    "NOT_LEADER_FOR_PARTITION",
    "REBALANCE_IN_PROGRESS",
)


def _transient(err: KafkaError) -> bool:
    """Consumer errors librdkafka recovers from by itself (it retries / rejoins): log only.

    Not all of them carry the ``retriable`` flag, e.g. a timed-out committed-offset fetch on a
    busy machine, which the assignment state machine retries.
    """
    from confluent_kafka import KafkaError

    if err.fatal():
        return False
    codes = {getattr(KafkaError, name, None) for name in _TRANSIENT_NAMES}
    return err.retriable() or err.code() in codes


def _partition_key(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


def _split_key(key: str) -> tuple[str, int]:
    topic, _, partition = key.rpartition("/")  # topic names cannot contain '/'
    return topic, int(partition)


# ---------------------------------------------------------------------------------------- source


class KafkaReader:
    """Read Kafka topics through a consumer group (implements ``StreamSource``).

    * Position: ``{"topic/partition": next_offset}`` (JSON). ``poll`` returns the rows of up to
      :data:`CONSUME_BATCH` messages: one :class:`MessageDecoder` parses the payloads partition by
      partition (partition name ``kafka:<topic>/<partition>``, ``__sluice_row`` = the message's
      offset; a dead letter's ``source`` / ``position`` are the same partition name and
      offset); malformed payloads (not JSON, not an object, invalid UTF-8, empty/tombstone,
      longer than ``max_record_bytes``) become dead letters, the rest is still read.
    * ``open(ctx, position)``: the consumer subscribes with auto-commit and auto offset store
      off and ``auto.offset.reset=earliest``. When a checkpoint ``position`` is given, each
      partition it names is positioned at its checkpointed offset when it is first assigned
      (this overrides the group's committed offsets); other partitions start at the committed
      offset (or the earliest one).
    * ``commit(position)``: commits the position's offsets of the partitions this consumer owns,
      synchronously, under a lock shared with ``poll`` (it is called from another thread).
      Commit failures caused by a rebalance are logged and skipped (the next checkpoint commits
      newer offsets, and a restart resumes from the checkpoint anyway); other retriable
      failures raise :class:`TransientError`, the rest :class:`SourceError`.
    * Revocation (rebalance): revoked partitions are dropped from the position, and their
      offsets are no longer committed by this consumer. Records of those partitions already
      polled but not yet checkpointed are read again by the new owner from the group's last
      committed offsets: **at-least-once across a rebalance** (unless a checkpoint is taken
      before it). A partition handed straight back to this consumer by the same rebalance (the
      eager protocol revokes everything first) continues from this consumer's own position, so
      a single-member group sees no duplicates; one lost (session timeout) or assigned back
      later resumes from the group's committed offset.
    * Errors: partition EOF is ignored; retriable and transient errors that librdkafka recovers
      from by itself (timeouts, broker/coordinator unavailable, rebalance in progress) are
      logged; a missing topic, a fatal client error or any other error (authorization...)
      raises :class:`SourceError`.

    With Tansu the first assignment of a group waits about ``session.timeout.ms / 2``; tests set
    ``session.timeout.ms`` low in ``options``.
    """

    def __init__(self, config: KafkaSource) -> None:
        self.config = config
        self.step_id = config.id
        self.topics = [config.topic] if isinstance(config.topic, str) else list(config.topic)
        if not self.topics or not all(self.topics):
            raise ConfigError(
                "topic must name at least one topic", step_id=config.id, field="topic"
            )
        _check_options(config.options, _SOURCE_OWNED, config.id, "Kafka source")
        self._types = {k: parse_type(v) for k, v in (config.columns or {}).items()}
        self._decoder = MessageDecoder(
            self.step_id, config.format, self._types, max_bytes=config.max_record_bytes
        )
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()
        self._position: dict[str, int] = {}
        self._restore: dict[str, int] = {}  # checkpointed offsets not applied yet
        self._revoked: dict[str, int] = {}  # positions of partitions revoked in this rebalance
        self._assigned: set[str] = set()
        self._fatal: KafkaError | None = None
        self._incremental = False
        self._closed = False

    # ------------------------------------------------------------------------ stream protocol

    def _conf(self) -> dict[str, Any]:
        return {
            "auto.offset.reset": "earliest",
            **self.config.options,
            "bootstrap.servers": self.config.brokers,
            "group.id": self.config.group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "error_cb": self._on_error,
            "logger": log,
        }

    def check_config(self, ctx: RunContext) -> None:
        """librdkafka checks the options when a client is created: create one (it connects in
        the background only) and close it at once, so ``sluice validate`` finds bad options."""
        require("confluent_kafka", "kafka", "Kafka source")
        from confluent_kafka import Consumer, KafkaException

        try:
            Consumer({**self._conf(), "logger": _QUIET}).close()
        except KafkaException as exc:
            raise ConfigError(
                f"invalid Kafka consumer settings: {exc}", step_id=self.step_id, field="options"
            ) from exc

    def open(self, ctx: RunContext, position: Any) -> None:
        require("confluent_kafka", "kafka", "Kafka source")
        from confluent_kafka import Consumer, KafkaException

        restored = self._parse_position(position)
        self._position = dict(restored)
        self._restore = dict(restored)
        self._revoked = {}
        self._assigned = set()
        self._fatal = None
        self._closed = False
        conf = self._conf()
        strategy = str(conf.get("partition.assignment.strategy", ""))
        protocol = str(conf.get("group.protocol", "classic"))
        self._incremental = "cooperative" in strategy or protocol == "consumer"
        try:
            consumer = Consumer(conf)
        except KafkaException as exc:
            raise ConfigError(
                f"invalid Kafka consumer settings: {exc}", step_id=self.step_id, field="options"
            ) from exc
        try:
            consumer.subscribe(
                self.topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except KafkaException as exc:
            consumer.close()
            raise SourceError(
                self.step_id, f"cannot subscribe to {', '.join(self.topics)}: {exc}"
            ) from exc
        self._consumer = consumer

    def poll(self, timeout: float) -> Chunk | None:
        from confluent_kafka import KafkaException

        if self._consumer is None:
            if self._closed:  # a reader thread racing the shutdown: nothing more to read
                return None
            raise SourceError(self.step_id, "poll() called before open()")
        deadline = time.monotonic() + max(timeout, 0.0)
        messages: list[Message] = []
        while True:
            remaining = deadline - time.monotonic()
            with self._lock:
                consumer = self._consumer
                if consumer is None:
                    return None
                try:
                    messages = consumer.consume(
                        num_messages=CONSUME_BATCH,
                        timeout=min(max(remaining, 0.0), _CONSUME_SLICE),
                    )
                except KafkaException as exc:
                    raise SourceError(self.step_id, f"reading from Kafka failed: {exc}") from exc
            if self._fatal is not None:
                raise SourceError(self.step_id, f"fatal Kafka consumer error: {self._fatal}")
            if messages or time.monotonic() >= deadline:
                break
        return self._chunk(messages) if messages else None

    def commit(self, position: Any) -> None:
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        offsets = self._parse_position(position)
        with self._lock:
            consumer = self._consumer
            if consumer is None or not offsets:
                return
            owned = [
                TopicPartition(*_split_key(key), offset)
                for key, offset in sorted(offsets.items())
                if key in self._assigned
            ]
            if not owned:
                return
            try:
                result = consumer.commit(offsets=owned, asynchronous=False)
            except KafkaException as exc:
                err = _kafka_error(exc)
                code = err.code() if err is not None else None
                if code == KafkaError._NO_OFFSET:
                    return
                self._commit_failed(err, str(exc), exc)
                return
        failed = [tp for tp in result if tp.error is not None]
        if failed:
            first = failed[0].error
            detail = ", ".join(f"{tp.topic}/{tp.partition}: {tp.error}" for tp in failed)
            self._commit_failed(first, detail, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                consumer.close()

    # -------------------------------------------------------------------------------- internals

    def _parse_position(self, position: Any) -> dict[str, int]:
        if position is None:
            return {}
        ok = isinstance(position, Mapping) and all(
            isinstance(k, str)
            and "/" in k
            and k.rpartition("/")[2].isdigit()
            and isinstance(v, int)
            and not isinstance(v, bool)
            and v >= 0
            for k, v in position.items()
        )
        if not ok:
            raise SourceError(
                self.step_id,
                f"not a Kafka position (expected {{'topic/partition': offset}}): {position!r}",
            )
        return {str(k): int(v) for k, v in position.items()}

    def _commit_failed(self, err: KafkaError | None, detail: str, cause: Exception | None) -> None:
        from confluent_kafka import KafkaError

        rebalance = {
            KafkaError.REBALANCE_IN_PROGRESS,
            KafkaError.ILLEGAL_GENERATION,
            KafkaError.UNKNOWN_MEMBER_ID,
            KafkaError.FENCED_INSTANCE_ID,
            KafkaError._ASSIGNMENT_LOST,
        }
        if err is not None and err.code() in rebalance:
            log.warning(
                "%s: offset commit skipped during a group rebalance (%s); the next checkpoint "
                "commits newer offsets",
                self.step_id,
                detail,
            )
            return
        message = f"committing Kafka offsets failed: {detail}"
        if err is not None and err.retriable():
            raise TransientError(self.step_id, message) from cause
        raise SourceError(self.step_id, message) from cause

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        else:
            log.warning("%s: Kafka consumer: %s", self.step_id, err)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked, self._revoked = self._revoked, {}
        for tp in partitions:
            key = _partition_key(tp.topic, tp.partition)
            self._assigned.add(key)
            if key in self._restore:  # the checkpoint wins over the group's committed offsets
                offset = self._restore.pop(key)
            elif key in revoked:  # back right away: nobody else read it in between
                offset = revoked[key]
            else:  # the group's committed offset (or auto.offset.reset)
                continue
            tp.offset = offset
            self._position[key] = offset
        if self._incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, keep=True)
        if self._incremental:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, keep=False)  # another member may own them already
        if self._incremental:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _drop(self, partitions: list[TopicPartition], *, keep: bool) -> None:
        """Forget revoked partitions: no longer in the position, no longer committed.

        Records of them polled but not checkpointed are re-read by the next owner from the
        group's committed offsets. With ``keep`` their positions are remembered until the next
        assignment, so a partition assigned straight back continues where it was.
        """
        for tp in partitions:
            key = _partition_key(tp.topic, tp.partition)
            self._assigned.discard(key)
            offset = self._position.pop(key, None)
            if keep and offset is not None:
                self._revoked[key] = offset

    def _chunk(self, messages: list[Message]) -> Chunk | None:
        from confluent_kafka import KafkaError

        groups: dict[tuple[str, int], tuple[list[bytes], list[int]]] = {}
        nbytes = 0
        for msg in messages:
            err = msg.error()
            if err is not None:
                code = err.code()
                if code == KafkaError._PARTITION_EOF:
                    continue
                if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                    raise SourceError(
                        self.step_id,
                        f"Kafka topic {msg.topic()!r} does not exist: {err}",
                        fix="create the topic, or check the topic name",
                    )
                if _transient(err):
                    log.warning("%s: Kafka consumer: %s", self.step_id, err)
                    continue
                raise SourceError(self.step_id, f"reading from Kafka failed: {err}")
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            if topic is None or partition is None or offset is None:
                continue
            payload = msg.value() or b""  # a tombstone becomes a parse_error dead letter
            nbytes += len(payload)
            payloads, offsets = groups.setdefault((topic, partition), ([], []))
            payloads.append(payload)
            offsets.append(offset)
        if not groups:
            return None
        tables: list[pa.Table] = []
        dead: list[pa.Table] = []
        for (topic, partition), (payloads, offsets) in groups.items():
            table, letters = self._decoder.decode(payloads, f"kafka:{topic}/{partition}", offsets)
            if table is not None:
                tables.append(table)
            if letters is not None and letters.num_rows:
                dead.append(letters)
            self._position[_partition_key(topic, partition)] = offsets[-1] + 1
        out = concat(tables) if tables else None
        assert out is None or isinstance(out, pa.Table)
        return Chunk(
            table=out,
            dead=(pa.concat_tables(dead) if len(dead) > 1 else dead[0]) if dead else None,
            bytes_read=nbytes,
            position=dict(self._position),
        )


# ------------------------------------------------------------------------------------------ sink


def _row_error_codes() -> frozenset[int]:
    """Delivery errors that concern one message (it becomes a dead letter), not the broker."""
    from confluent_kafka import KafkaError

    return frozenset(
        {
            KafkaError.MSG_SIZE_TOO_LARGE,
            KafkaError.INVALID_MSG,
            KafkaError.INVALID_MSG_SIZE,
            KafkaError.INVALID_RECORD,
        }
    )


def json_messages(table: pa.Table) -> list[str]:
    """Each row (position columns dropped) as a JSON object, serialized in one Polars call.

    Nested lists, structs and maps stay JSON arrays/objects; decimals, dates, times and
    timestamps become strings (ISO-like text); binary becomes base64 text; NaN and infinities
    become null.
    """
    data = strip_positions(table)
    if data.num_columns == 0:
        return ["{}"] * table.num_rows
    df = pl.from_arrow(data)
    assert isinstance(df, pl.DataFrame)
    columns = [
        pl.col(c).bin.encode("base64") if df.schema[c] == pl.Binary else pl.col(c)
        for c in df.columns
    ]
    out: list[str] = df.select(pl.struct(columns).struct.json_encode()).to_series().to_list()
    return out


#: Rows produced (and acknowledged) per slice when an epoch (a whole batch run) is published.
PUBLISH_SLICE_ROWS = 20_000


class KafkaWriter:
    """Produce each row as one JSON message (batch ``Sink`` and stream ``EpochPublisher``).

    * Rows are serialized to JSON objects in one vectorized call (:func:`json_messages`:
      position columns dropped; nested values stay JSON; decimals, dates and timestamps as
      strings; binary as base64). The message key is the ``key`` column's value as UTF-8 text
      (binary keys as they are; no key when the value is null).
    * Producer: ``enable.idempotence=true`` and ``acks=all`` (plus ``options``): retries inside
      librdkafka never duplicate or reorder messages.
    * ``write(table)`` / ``publish(epoch, table)`` produce the rows and ``flush()`` until each
      message is acknowledged, so they can return the rows the producer refused (message too
      large, invalid record) as ``sink_rejected`` dead letters. A failure that is not about one
      message (broker unreachable until ``message.timeout.ms``, missing topic, authorization,
      fatal idempotence error) raises :class:`SinkError`; messages of the batch delivered
      before that stay visible.
    * ``commit()`` flushes and releases the producer. ``abort()`` drops messages still queued
      locally but **cannot unsend** delivered ones: the Kafka output of a failed batch run may
      already be visible (at-least-once).
    * ``publish(epoch, table)`` produces the epoch's rows, waits for every acknowledgement,
      then records ``epoch`` in the marker (see the module docstring);
      ``published_epoch()`` reads the marker back. A ``publish`` retried after only the
      marker failed does not produce the rows again. The guarantee after a crash during a
      publish is at-least-once for that epoch (module docstring).
    """

    def __init__(self, config: KafkaSink) -> None:
        self.config = config
        self.step_id = config.id
        _check_options(config.options, _SINK_OWNED, config.id, "Kafka sink")
        self._producer: Producer | None = None
        self._fatal: KafkaError | None = None
        self._failed: list[tuple[KafkaError, bytes]] = []  # (error, payload) of this batch
        self._marker_group = ""
        self._marker: Consumer | None = None  # commits / reads the epoch marker
        self._sent: tuple[int, pa.Table] | None = None  # epoch delivered, marker not yet set

    # ------------------------------------------------------------------ sink / publisher protocol

    def _conf(self) -> dict[str, Any]:
        return {
            "acks": "all",
            **self.config.options,
            "bootstrap.servers": self.config.brokers,
            "enable.idempotence": True,
            # Only failed messages are reported back: no Python call per delivered message.
            "delivery.report.only.error": True,
            "on_delivery": self._on_delivery,
            "error_cb": self._on_error,
            "logger": log,
        }

    def _marker_conf(self, group: str) -> dict[str, Any]:
        shared = {k: v for k, v in self.config.options.items() if k.startswith(_CONNECTION_OPTIONS)}
        return {
            **shared,
            "bootstrap.servers": self.config.brokers,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "logger": log,
        }

    def check_config(self, ctx: RunContext) -> None:
        """Create the producer and the epoch-marker consumer once and drop them, so that
        librdkafka's check of the options runs in ``sluice validate`` (nothing is sent)."""
        require("confluent_kafka", "kafka", "Kafka sink")
        from confluent_kafka import Consumer, KafkaException, Producer

        try:
            Producer({**self._conf(), "logger": _QUIET}).flush(0)
        except KafkaException as exc:
            raise ConfigError(
                f"invalid Kafka producer settings: {exc}", step_id=self.step_id, field="options"
            ) from exc
        try:
            Consumer({**self._marker_conf("sluice-validate"), "logger": _QUIET}).close()
        except KafkaException as exc:
            raise ConfigError(
                f"invalid Kafka settings for the epoch marker: {exc}",
                step_id=self.step_id,
                field="options",
            ) from exc

    def open(self, ctx: RunContext) -> None:
        require("confluent_kafka", "kafka", "Kafka sink")
        from confluent_kafka import KafkaException, Producer

        conf = self._conf()
        self._fatal = None
        self._failed = []
        self._marker_group = f"sluice-epoch.{ctx.pipeline}.{self.step_id}.{ctx.run_id}"
        self._sent = None
        try:
            self._producer = Producer(conf)
        except KafkaException as exc:
            raise ConfigError(
                f"invalid Kafka producer settings: {exc}", step_id=self.step_id, field="options"
            ) from exc

    def write(self, table: pa.Table) -> pa.Table:
        return self._send(table)

    def commit(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            self._flush(producer)

    def abort(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.purge(in_queue=True, in_flight=False)
            producer.flush(0)
        except Exception:  # nothing to save: the run failed already
            log.debug("%s: purging the Kafka producer failed", self.step_id, exc_info=True)

    def published_epoch(self) -> int | None:
        """The newest epoch whose messages were all acknowledged (the epoch marker)."""
        from confluent_kafka import KafkaException, TopicPartition

        consumer = self._marker_consumer()
        try:
            (tp,) = consumer.committed([TopicPartition(self.config.topic, 0)], timeout=30)
        except KafkaException as exc:
            raise self._marker_error("reading", exc) from exc
        if tp.error is not None:
            raise self._marker_error("reading", tp.error)
        return None if tp.offset < 0 else int(tp.offset)

    def publish(self, epoch: int, table: pa.Table) -> pa.Table:
        """Produce the epoch's rows, wait for their acknowledgements, record the marker;
        returns the dead letters of the refused rows."""
        letters: list[pa.Table] = []
        self.publish_journaled(epoch, table, letters.append)
        return letters[0] if letters else empty_dead_letters()

    def publish_journaled(
        self, epoch: int, table: pa.Table, journal: Callable[[pa.Table], None]
    ) -> None:
        """:meth:`publish` for the runtime (:class:`~sluice.plugins.JournalingPublisher`).
        The rows are produced in slices of :data:`PUBLISH_SLICE_ROWS` (memory stays bounded by
        a slice whatever the epoch's size: a batch run publishes the whole run), each slice
        acknowledged before the next; the dead letters of the refused rows go to ``journal``
        before the marker is recorded."""
        from confluent_kafka import KafkaException, TopicPartition

        if self._sent is None or self._sent[0] != epoch:  # a retry after the marker failed
            letters = [
                self._send(table.slice(start, PUBLISH_SLICE_ROWS))
                for start in range(0, table.num_rows, PUBLISH_SLICE_ROWS)
            ]
            letters = [t for t in letters if t.num_rows]
            dead = pa.concat_tables(letters) if letters else empty_dead_letters()
            self._sent = (epoch, dead)  # a retry does not produce the rows again
        crash_point("kafka_before_marker")  # recovery tests: the window of the guarantee
        journal(self._sent[1])
        consumer = self._marker_consumer()
        marker = TopicPartition(self.config.topic, 0, epoch)
        try:
            (tp,) = consumer.commit(offsets=[marker], asynchronous=False)
        except KafkaException as exc:
            raise self._marker_error("recording", exc) from exc
        if tp.error is not None:
            raise self._marker_error("recording", tp.error)
        self._sent = None

    def close(self) -> None:
        producer, self._producer = self._producer, None
        marker, self._marker = self._marker, None
        try:
            if producer is not None:
                self._flush(producer)
        finally:
            if marker is not None:
                marker.close()

    # -------------------------------------------------------------------------------- internals

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        else:
            log.warning("%s: Kafka producer: %s", self.step_id, err)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failed.append((err, msg.value() or b""))

    def _marker_consumer(self) -> Consumer:
        """A consumer that never joins its group: it only commits and reads the marker."""
        from confluent_kafka import Consumer, KafkaException

        if self._marker is None:
            if not self._marker_group:
                raise SinkError(self.step_id, "published_epoch()/publish() called before open()")
            try:
                self._marker = Consumer(self._marker_conf(self._marker_group))
            except KafkaException as exc:
                raise ConfigError(
                    f"invalid Kafka settings for the epoch marker: {exc}",
                    step_id=self.step_id,
                    field="options",
                ) from exc
        return self._marker

    def _marker_error(self, doing: str, exc: BaseException | KafkaError) -> StepError:
        err = exc if not isinstance(exc, BaseException) else _kafka_error(exc)
        message = (
            f"{doing} the epoch marker (group {self._marker_group!r}, topic "
            f"{self.config.topic!r} partition 0) failed: {exc}"
        )
        if err is not None and (err.retriable() or _transient(err)):
            return TransientError(self.step_id, message)
        return SinkError(
            self.step_id,
            message,
            fix="check that the brokers are up and allow this client to commit offsets of "
            "that group (ACL: Read on the group)",
        )

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise SinkError(self.step_id, f"fatal Kafka producer error: {self._fatal}")

    def _flush(self, producer: Producer) -> None:
        while producer.flush(0.5) > 0:  # short slices: stays interruptible
            self._check_fatal()
        self._check_fatal()

    def _send(self, table: pa.Table) -> pa.Table:
        from confluent_kafka import KafkaException

        producer = self._producer
        if producer is None:
            raise SinkError(self.step_id, "write() called before open() or after commit()/abort()")
        n = table.num_rows
        if n == 0:
            return empty_dead_letters()
        keys: list[str | bytes | None]
        if self.config.key is not None:
            if self.config.key not in table.column_names:
                return rows_dead_letters(
                    table,
                    step_id=self.step_id,
                    reason="sink_rejected",
                    message=f"key column {self.config.key!r} is not in the batch",
                )
            keys = self._keys(table.column(self.config.key))
        else:
            keys = [None] * n
        values = json_messages(table)
        row_codes = _row_error_codes()
        refused: dict[int, str] = {}
        topic = self.config.topic
        self._failed = []
        for i, (value, key) in enumerate(zip(values, keys, strict=True)):
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:  # local queue full: serve delivery reports, then retry
                    producer.poll(0.1)
                    self._check_fatal()
                except KafkaException as exc:
                    err = _kafka_error(exc)
                    if err is not None and err.code() in row_codes:
                        refused[i] = f"the Kafka producer refused the message: {err.str()}"
                        break
                    raise SinkError(
                        self.step_id, f"producing to Kafka topic {topic!r} failed: {exc}"
                    ) from exc
        self._flush(producer)
        failed, self._failed = self._failed, []
        if failed:
            broker_wide = [err for err, _ in failed if err.code() not in row_codes]
            if broker_wide:
                raise SinkError(
                    self.step_id,
                    f"{len(failed)} of {n} messages to Kafka topic {topic!r} were not "
                    f"delivered ({broker_wide[0]}); messages delivered before stay visible",
                    fix="check that the brokers are up and the topic exists; "
                    "re-running may duplicate rows (at-least-once)",
                )
            # Delivery reports carry the payload, not the row: find the row by its payload
            # (rows with identical payloads are interchangeable).
            rows_of: dict[bytes, list[int]] = {}
            for i, value in enumerate(values):
                rows_of.setdefault(value.encode(), []).append(i)
            for err, payload in failed:
                candidates = rows_of.get(payload)
                if candidates:
                    refused[candidates.pop()] = f"the Kafka broker refused the message: {err.str()}"
        if not refused:
            return empty_dead_letters()
        rows = sorted(refused)
        return rows_dead_letters(
            table.take(pa.array(rows, pa.int64())),
            step_id=self.step_id,
            reason="sink_rejected",
            message=[refused[i] for i in rows],
        )

    @staticmethod
    def _keys(column: pa.ChunkedArray) -> list[str | bytes | None]:
        """Message keys: text as UTF-8, binary as is, anything else as its text form."""
        t = column.type
        if not (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
        ):
            column = pc.cast(column, pa.string())
        out: list[str | bytes | None] = column.to_pylist()
        return out


__all__ = ["KafkaReader", "KafkaWriter"]
