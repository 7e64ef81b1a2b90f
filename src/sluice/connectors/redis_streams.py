"""Redis Streams: a stream source read through a consumer group, and a stream sink.

Source guarantees (:class:`RedisStreamReader`, verified against the Redis server on this machine):

* Messages are read with ``XREADGROUP`` and **acknowledged (XACK) only after the checkpoint that
  covers them is durable** (``commit(position)``), so a crash leaves them pending, never lost.
* The position saved in a checkpoint is, per stream key, the id of the last message processed.
  On restart the reader first re-reads, with ``XRANGE``, every message after that id up to the
  group's last delivered id (messages the crashed process had received but not checkpointed,
  whichever consumer of the group they were delivered to), then continues with new messages.
  Pending messages of the group are first claimed (``XAUTOCLAIM``) by this consumer, so a dead
  consumer's pending list is reclaimed and then acknowledged at the next checkpoint.
* One Sluice process per consumer group gives exactly-once results. Several processes sharing a
  group would each replay the others' unacknowledged messages after a restart (at-least-once);
  scale out with one stream key per process instead.
* Each stream key is one partition (``__sluice_source`` = ``redis:<key>``; ``__sluice_row`` =
  the message id as ``ms << 20 | seq``).

Sink (:class:`RedisStreamWriter`): every row becomes one message ``{field: <row as JSON>}``. In
stream mode each checkpoint epoch is added in one ``MULTI``/``EXEC`` transaction together with
the epoch marker key ``<stream>:sluice-epoch:<pipeline>:<sink id>:<run id>`` (the run id names
the checkpoint history); an epoch at or below the marker is skipped, so a replayed epoch never
duplicates. In batch mode rows are spooled to a
temporary Arrow file and added at ``commit()`` (``abort()`` adds nothing).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import pyarrow as pa

from sluice.batch import concat, dead_letters, rows_as_json, strip_positions
from sluice.config.models import RedisStreamSink, RedisStreamSource
from sluice.connectors._messages import MessageDecoder, Spool
from sluice.connectors.files.writers import SchemaAligner
from sluice.errors import SinkError, SourceError, TransientError, require
from sluice.plugins import Chunk, RunContext
from sluice.types import parse_type

_ADD_CHUNK = 2_000
log = logging.getLogger(__name__)


def _id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _offset(raw: bytes | str) -> int:
    """The message id as one int64 for ``__sluice_row``: milliseconds << 20 | sequence
    (both clamped, so explicit huge ids cannot overflow)."""
    ms, seq = _id(raw)
    return (min(ms, (1 << 43) - 1) << 20) | min(seq, (1 << 20) - 1)


def _text(i: tuple[int, int]) -> str:
    return f"{i[0]}-{i[1]}"


class RedisStreamReader:
    """The ``redis_stream`` source (see the module docstring for its guarantees)."""

    def __init__(self, config: RedisStreamSource) -> None:
        self.config = config
        self.step_id = config.id
        self.keys = [config.stream] if isinstance(config.stream, str) else list(config.stream)
        types = {k: parse_type(v) for k, v in (config.columns or {}).items()}
        self._decoder = MessageDecoder(config.id, config.format, types)
        self._client: Any = None
        self._acker: Any = None
        self._replay: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        self._position: dict[str, str] = {}
        self._delivered: deque[tuple[str, tuple[int, int], list[bytes]]] = deque()
        self._lock = threading.Lock()
        self._needs_resync = False

    # ------------------------------------------------------------------ StreamSource protocol

    def open(self, ctx: RunContext, position: Any) -> None:
        require("redis", "redis", "Redis Streams source")
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        cfg = self.config
        try:
            # no silent retries inside redis-py: a re-sent XREADGROUP would skip the messages
            # whose reply was lost; the reader re-reads from its position instead (poll)
            self._client = redis.Redis.from_url(cfg.url, retry=Retry(NoBackoff(), 0))
            self._acker = redis.Redis.from_url(cfg.url)
            self._client.ping()
        except redis.RedisError as exc:
            raise SourceError(
                self.step_id,
                f"cannot connect to Redis at {cfg.url}: {exc}",
                fix="check that Redis runs and the url (host, port, db)",
            ) from exc
        saved = dict(position or {})
        for key in self.keys:
            try:
                self._client.xgroup_create(key, cfg.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise SourceError(self.step_id, f"cannot create group on {key}: {exc}") from exc
            if key in saved:
                self._position[key] = saved[key]
            # reclaim everything pending in the group (a dead consumer's messages) for us;
            # what the checkpoint already covers is acknowledged now
            covered: list[bytes] = []
            upto = _id(saved[key]) if key in saved else None
            start = "0-0"
            while True:
                res = self._client.xautoclaim(
                    key, cfg.group, cfg.consumer, min_idle_time=0, start_id=start, count=1000
                )
                start = res[0].decode() if isinstance(res[0], bytes) else res[0]
                if upto is not None:
                    covered += [e[0] for e in res[1] if e and _id(e[0]) <= upto]
                if start == "0-0":
                    break
            for i in range(0, len(covered), 10_000):
                self._acker.xack(key, cfg.group, *covered[i : i + 10_000])
        self._resync()

    def poll(self, timeout: float) -> Chunk | None:
        import redis

        try:
            if self._needs_resync:
                self._resync()
            if self._replay:
                return self._poll_replay()
            return self._poll_live(timeout)
        except redis.ConnectionError as exc:
            # a reply may have been lost after Redis delivered messages: they are pending for
            # us, so read again from our position before taking new ones
            self._needs_resync = True
            raise TransientError(self.step_id, f"lost the connection to Redis: {exc}") from exc

    def commit(self, position: Any) -> None:
        """Acknowledge every delivered message up to ``position`` (a checkpoint covers them).
        A failed acknowledgement is retried at the next checkpoint: the messages stay pending,
        and the checkpoint (already durable) decides what is re-read after a restart."""
        import redis

        todo: list[tuple[str, tuple[int, int], list[bytes]]] = []
        with self._lock:
            for item in self._delivered:
                key, last, _ = item
                upto = position.get(key) if position else None
                if upto is not None and last <= _id(upto):
                    todo.append(item)
        for item in todo:
            key, _, ids = item
            try:
                for i in range(0, len(ids), 10_000):
                    self._acker.xack(key, self.config.group, *ids[i : i + 10_000])
            except redis.RedisError as exc:
                log.warning(
                    "%s: acknowledging on %s failed (retried later): %s", self.step_id, key, exc
                )
                return
            with self._lock:
                self._delivered.remove(item)

    def close(self) -> None:
        for c in (self._client, self._acker):
            if c is not None:
                c.close()
        self._client = self._acker = None

    # --------------------------------------------------------------------------- monitoring

    def lag(self) -> int | None:
        """Messages in the streams not yet delivered to the group (Redis >= 7)."""
        total = 0
        for key in self.keys:
            for g in self._acker.xinfo_groups(key):
                name = g.get("name")
                if (name.decode() if isinstance(name, bytes) else name) == self.config.group:
                    lag = g.get("lag")
                    if lag is None:
                        return None
                    total += int(lag)
        return total

    # ---------------------------------------------------------------------------- internals

    def _resync(self) -> None:
        """Plan the re-read: per key, every message after our position (or, without one,
        from the oldest pending message) up to the group's last delivered id."""
        self._needs_resync = False
        self._replay = {}
        for key in self.keys:
            last = self._last_delivered(key)
            if key in self._position:
                begin = _id(self._position[key])
                if last < begin:  # the group fell behind (e.g. Redis restored): move it on
                    self._client.xgroup_setid(key, self.config.group, id=self._position[key])
                    continue
            else:
                pending = self._client.xpending(key, self.config.group)
                lo = pending.get("min") if pending and pending.get("pending") else None
                if lo is None:
                    continue
                first = _id(lo)
                begin = (first[0], first[1] - 1) if first[1] else (first[0] - 1, 2**63 - 1)
            if last > begin:
                self._replay[key] = (begin, last)

    def _last_delivered(self, key: str) -> tuple[int, int]:
        for g in self._client.xinfo_groups(key):
            name = g.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == self.config.group:
                return _id(g["last-delivered-id"])
        return (0, 0)

    def _poll_replay(self) -> Chunk | None:
        key = next(iter(self._replay))
        begin, last = self._replay[key]
        entries = self._client.xrange(
            key, min=f"({_text(begin)}", max=_text(last), count=self.config.count
        )
        if not entries or _id(entries[-1][0]) >= last:
            del self._replay[key]
        elif entries:
            self._replay[key] = (_id(entries[-1][0]), last)
        return self._chunk([(key, entries)])

    def _poll_live(self, timeout: float) -> Chunk | None:
        streams = {k: ">" for k in self.keys}
        res = self._client.xreadgroup(
            self.config.group,
            self.config.consumer,
            streams,
            count=self.config.count,
            block=max(1, int(timeout * 1000)),
        )
        if not res:
            return None
        return self._chunk([(k.decode() if isinstance(k, bytes) else k, e) for k, e in res])

    def _chunk(self, batches: list[tuple[str, list[Any]]]) -> Chunk | None:
        tables: list[pa.Table] = []
        deads: list[pa.Table] = []
        field = self.config.field.encode()
        for key, entries in batches:
            if not entries:
                continue
            pos = self._position.get(key)
            if pos is not None:  # never hand out what the position already covers
                upto = _id(pos)
                stale = [e[0] for e in entries if _id(e[0]) <= upto]
                if stale:
                    self._acker.xack(key, self.config.group, *stale)
                    entries = [e for e in entries if _id(e[0]) > upto]
                    if not entries:
                        continue
            ids = [e[0] for e in entries]
            offsets: list[int] = []
            payloads: list[bytes] = []
            missing: list[int] = []
            for eid, fields in entries:
                offset = _offset(eid)
                value = fields.get(field) if fields else None
                if value is None:
                    missing.append(offset)
                    continue
                offsets.append(offset)
                payloads.append(value)
            partition = f"redis:{key}"
            table, dead = self._decoder.decode(payloads, partition, offsets)
            if table is not None:
                tables.append(table)
            if dead is not None:
                deads.append(dead)
            if missing:
                deads.append(
                    dead_letters(
                        step_id=self.step_id,
                        reason="parse_error",
                        message=f"message has no field {self.config.field!r}",
                        payload=None,
                        source=partition,
                        position=pa.array(missing, pa.int64()),
                        n=len(missing),
                    )
                )
            last = _id(ids[-1])
            self._position[key] = _text(last)
            with self._lock:
                self._delivered.append((key, last, ids))
        if not tables and not deads:
            return Chunk(position=dict(self._position))
        table = None
        if tables:
            merged = tables[0] if len(tables) == 1 else concat(tables)
            assert isinstance(merged, pa.Table)
            table = merged
        dead = None
        if deads:
            dl = deads[0] if len(deads) == 1 else concat(deads)
            assert isinstance(dl, pa.Table)
            dead = dl
        return Chunk(table=table, dead=dead, position=dict(self._position))


class RedisStreamWriter:
    """The ``redis_stream`` sink (see the module docstring for its guarantees)."""

    def __init__(self, config: RedisStreamSink) -> None:
        self.config = config
        self.step_id = config.id
        self._client: Any = None
        self._spool = Spool()
        self._aligner = SchemaAligner(config.id)
        self._marker = ""

    def open(self, ctx: RunContext) -> None:
        require("redis", "redis", "Redis Streams sink")
        import redis

        self._marker = (
            f"{self.config.stream}:sluice-epoch:{ctx.pipeline}:{self.step_id}:{ctx.run_id}"
        )
        try:
            self._client = redis.Redis.from_url(self.config.url)
            self._client.ping()
        except redis.RedisError as exc:
            raise TransientError(
                self.step_id, f"cannot connect to Redis at {self.config.url}: {exc}"
            ) from exc
        self._spool.discard()
        self._aligner = SchemaAligner(self.step_id)

    # batch Sink protocol: spooled until commit, so abort leaves nothing behind
    def write(self, table: pa.Table) -> pa.Table:
        data, dead = self._aligner.prepare(table)
        if data is not None:
            self._spool.add(data)
        return dead

    def commit(self) -> None:
        try:
            for t in self._spool.tables():
                self._add(t)
        finally:
            self.close()

    def abort(self) -> None:
        self._spool.discard()
        self.close()

    # EpochPublisher protocol
    def published_epoch(self) -> int | None:
        raw = self._client.get(self._marker)
        return None if raw is None else int(raw)

    def publish(self, epoch: int, table: pa.Table) -> pa.Table:
        import redis

        data, dead = self._aligner.prepare(table)
        if data is None:
            data = table.slice(0, 0)

        def txn(pipe: Any) -> None:
            raw = pipe.get(self._marker)
            if raw is not None and int(raw) >= epoch:
                return
            pipe.multi()
            self._queue(pipe, data)
            pipe.set(self._marker, epoch)

        try:
            self._client.transaction(txn, self._marker)
        except redis.ConnectionError as exc:
            raise TransientError(self.step_id, f"lost the connection to Redis: {exc}") from exc
        except redis.RedisError as exc:
            raise SinkError(self.step_id, f"adding epoch {epoch} failed: {exc}") from exc
        return dead

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _queue(self, pipe: Any, table: pa.Table) -> None:
        data = strip_positions(table)
        if data.num_rows == 0:
            return
        values = rows_as_json(data).to_pylist()
        field = self.config.field
        maxlen = self.config.maxlen
        for v in values:
            pipe.xadd(self.config.stream, {field: v}, maxlen=maxlen, approximate=True)

    def _add(self, table: pa.Table) -> None:
        import redis

        try:
            for i in range(0, table.num_rows, _ADD_CHUNK):
                pipe = self._client.pipeline(transaction=False)
                self._queue(pipe, table.slice(i, _ADD_CHUNK))
                pipe.execute()
        except redis.RedisError as exc:
            raise SinkError(self.step_id, f"adding to {self.config.stream} failed: {exc}") from exc


__all__ = ["RedisStreamReader", "RedisStreamWriter"]
