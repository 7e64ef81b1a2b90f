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
* Each stream key is one partition. A row's position (``__sluice_source`` / ``__sluice_row``,
  and so every dead letter's ``source`` / ``position``) names its message exactly:
  ``redis:<key>`` and ``ms * 1_000_000 + seq`` for the message id ``ms-seq`` (the decimal digits
  read as the id: ``1700000000000000005`` is ``1700000000000-5``). That covers every id Redis
  generates (until the year 2262, up to a million messages per millisecond); an explicit id
  beyond it gets the source ``redis:<key> ms=<ms>`` and the position ``seq``.
  :func:`message_id` turns a letter's source and position back into the id.
* Errors are converted here: a lost connection is a :class:`TransientError` (retried; the reader
  re-reads from its position), a stream key deleted (or its group destroyed) while the pipeline
  runs is a :class:`SourceError` naming the stream, the group and the fix. The restart recreates
  the group and moves it to the checkpointed id: messages added to the stream since (their
  generated ids are newer) are read, nothing is read twice. The messages the deletion removed
  and no checkpoint covered are gone with the key.

Sink (:class:`RedisStreamWriter`): every row becomes one message ``{field: <row as JSON>}``.
Runs publish through the epoch protocol (:meth:`RedisStreamWriter.publish_journaled`): an epoch
is added in ``MULTI``/``EXEC`` transactions of up to :data:`PUBLISH_SLICE_ROWS` rows, the last
one together with the epoch marker key ``<stream>:sluice-epoch:<pipeline>:<sink id>:<history>``
(the history is the stream's checkpoint history, or the batch runs of the pipeline's state
store: one key per sink, not one per run), the others with the epoch's progress; an epoch at or
below the marker is skipped and a restarted publish skips the slices already in, so a replayed
epoch never duplicates. The plain batch-sink protocol (``write``/``commit``, rows spooled to a
temporary Arrow file and added at ``commit()``, ``abort()`` adds nothing) is kept for callers
outside the runtime.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sluice.batch import concat, dead_letters, empty_dead_letters, rows_as_json, strip_positions
from sluice.config.models import RedisStreamSink, RedisStreamSource
from sluice.connectors._messages import MessageDecoder, Spool
from sluice.connectors.files.writers import SchemaAligner
from sluice.errors import SinkError, SluiceError, SourceError, TransientError, require
from sluice.plugins import Chunk, RunContext
from sluice.types import parse_type

_ADD_CHUNK = 2_000
#: Rows added per MULTI/EXEC transaction when an epoch (a whole batch run) is published.
PUBLISH_SLICE_ROWS = 10_000
# error replies after which the same command succeeds later (Redis loading, a busy script...)
_TRANSIENT_REPLIES = ("LOADING", "BUSY ", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")
log = logging.getLogger(__name__)


def _id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


#: A message id ``ms-seq`` is the position ``ms * SEQ_SPAN + seq`` (see the module docstring).
SEQ_SPAN = 1_000_000
_MAX_MS = (2**63 - 1) // SEQ_SPAN - 1
_MS_TAG = " ms="
_ID_TAG = " id="


def message_position(partition: str, raw: bytes | str) -> tuple[str, int]:
    """``(source, position)`` of the message with id ``raw`` in ``partition`` (``redis:<key>``):
    exact for every id, see the module docstring; :func:`message_id` is the inverse."""
    ms, seq = _id(raw)
    if seq < SEQ_SPAN and ms <= _MAX_MS:
        return partition, ms * SEQ_SPAN + seq
    if seq < 2**63:
        return f"{partition}{_MS_TAG}{ms}", seq
    return f"{partition}{_ID_TAG}{ms}-{seq}", 0


def message_id(source: str, position: int) -> str:
    """The Redis message id (``"1700000000000-5"``) of a dead letter's ``source`` and
    ``position`` (the inverse of :func:`message_position`)."""
    head, tag, rest = source.rpartition(_ID_TAG)
    if tag and head.startswith("redis:"):
        return rest
    head, tag, rest = source.rpartition(_MS_TAG)
    if tag and head.startswith("redis:") and rest.isdigit():
        return f"{rest}-{position}"
    ms, seq = divmod(position, SEQ_SPAN)
    return f"{ms}-{seq}"


def _text(i: tuple[int, int]) -> str:
    return f"{i[0]}-{i[1]}"


class RedisStreamReader:
    """The ``redis_stream`` source (see the module docstring for its guarantees)."""

    def __init__(self, config: RedisStreamSource) -> None:
        self.config = config
        self.step_id = config.id
        self.keys = [config.stream] if isinstance(config.stream, str) else list(config.stream)
        types = {k: parse_type(v) for k, v in (config.columns or {}).items()}
        self._decoder = MessageDecoder(
            config.id, config.format, types, max_bytes=config.max_record_bytes
        )
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
        try:
            self._open_groups(dict(position or {}))
        except redis.RedisError as exc:
            raise self._error(exc, "opening the consumer group") from exc

    def _open_groups(self, saved: dict[str, str]) -> None:
        import redis

        cfg = self.config
        for key in self.keys:
            try:
                self._client.xgroup_create(key, cfg.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
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
        except redis.RedisError as exc:
            raise self._error(exc, "reading") from exc

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
        import redis

        try:
            return self._lag()
        except redis.RedisError:
            return None  # monitoring only: a missing stream is reported by poll()

    def _lag(self) -> int | None:
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

    def _error(self, exc: Exception, doing: str) -> SluiceError:
        """Convert a redis-py error (the connector boundary): transient or terminal, naming
        the stream(s), the group and the fix."""
        import redis

        group = self.config.group
        names = ", ".join(repr(k) for k in self.keys)
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            # a reply may have been lost after Redis delivered messages: they are pending for
            # us, so read again from our position before taking new ones
            self._needs_resync = True
            return TransientError(
                self.step_id, f"lost the connection to Redis while {doing} {names}: {exc}"
            )
        text = str(exc)
        if text.startswith(_TRANSIENT_REPLIES):
            self._needs_resync = True
            return TransientError(self.step_id, f"Redis is not ready ({text}) while {doing}")
        if "NOGROUP" in text or "UNBLOCKED" in text or "no such key" in text.lower():
            gone = self._gone() or self.keys
            which = ", ".join(repr(k) for k in gone)
            at = ", ".join(f"{k} {self._position[k]}" for k in gone if k in self._position)
            return SourceError(
                self.step_id,
                f"Redis stream {which} or its consumer group {group!r} no longer exists: the "
                "key was deleted (or the group destroyed) while the pipeline was reading it; "
                "its messages not yet covered by a checkpoint were deleted with it "
                f"(Redis said: {text})",
                fix="restart the pipeline: it recreates the group on the stream and reads the "
                "messages added after the last checkpointed id"
                + (f" (the last id read was {at})" if at else "")
                + "; to drop old messages trim the stream (XTRIM, or maxlen on the producer) "
                "instead of deleting the key",
            )
        if "WRONGTYPE" in text:
            return SourceError(
                self.step_id,
                f"Redis key {names} does not hold a stream ({text})",
                fix="point 'stream' at a Redis Streams key (one that XADD writes to)",
            )
        return SourceError(
            self.step_id, f"Redis refused {doing} stream {names} (group {group!r}): {text}"
        )

    def _gone(self) -> list[str]:
        """The keys whose stream or consumer group no longer exists (best effort)."""
        import redis

        gone: list[str] = []
        for key in self.keys:
            try:
                names = {
                    (g["name"].decode() if isinstance(g["name"], bytes) else g["name"])
                    for g in self._acker.xinfo_groups(key)
                }
            except redis.RedisError:
                gone.append(key)
                continue
            if self.config.group not in names:
                gone.append(key)
        return gone

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
            partition = f"redis:{key}"
            sources: list[str] = []
            offsets: list[int] = []
            payloads: list[bytes] = []
            missing: list[tuple[str, int]] = []
            same = True  # every id in the common range: one partition name for the batch
            for eid, fields in entries:
                src, offset = message_position(partition, eid)
                same = same and src is partition
                value = fields.get(field) if fields else None
                if value is None:
                    missing.append((src, offset))
                    continue
                sources.append(src)
                offsets.append(offset)
                payloads.append(value)
            table, dead = self._decoder.decode(payloads, partition if same else sources, offsets)
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
                        source=[m[0] for m in missing],
                        position=pa.array([m[1] for m in missing], pa.int64()),
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
        import redis

        try:
            raw = self._client.get(self._marker)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransientError(self.step_id, f"lost the connection to Redis: {exc}") from exc
        except redis.RedisError as exc:
            raise SinkError(
                self.step_id, f"cannot read the epoch marker {self._marker!r}: {exc}"
            ) from exc
        try:
            return None if raw is None else int(raw)
        except ValueError as exc:
            raise SinkError(
                self.step_id,
                f"the epoch marker {self._marker!r} holds {raw!r}, not an epoch number",
                fix="delete that key if nothing else uses it (the next epoch recreates it)",
            ) from exc

    def publish(self, epoch: int, table: pa.Table) -> pa.Table:
        """Add the epoch's rows and set the marker (see :meth:`publish_journaled`); returns
        the dead letters of the rows refused."""
        letters: list[pa.Table] = []
        self.publish_journaled(epoch, table, letters.append)
        return letters[0] if letters else empty_dead_letters()

    def publish_journaled(
        self, epoch: int, table: pa.Table, journal: Callable[[pa.Table], None]
    ) -> None:
        """Add one epoch's rows **in slices** of :data:`PUBLISH_SLICE_ROWS` rows, each slice
        one ``MULTI``/``EXEC`` transaction that also records how many rows of the epoch are in
        (the key ``<marker>:partial``, ``<epoch>:<rows>``); the last one sets the epoch marker
        instead. Memory stays bounded by a slice, on the client and on the server, whatever
        the epoch's size (a batch run publishes the whole run as one epoch). A publish that
        starts again after a crash skips the slices already in: nothing is added twice. An
        epoch of up to one slice (any usual stream epoch) is added in one transaction, atomic
        with its marker; a longer one becomes visible slice by slice. The dead letters of the
        refused rows go to ``journal`` before the last transaction."""
        import redis

        progress_key = f"{self._marker}:partial"
        try:
            done = self.published_epoch()
            if done is not None and done >= epoch:
                return
            raw = self._client.get(progress_key)
            skip = 0
            if raw is not None:
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                at, _, rows = text.partition(":")
                if at == str(epoch) and rows.isdigit():
                    skip = int(rows)
            letters: list[pa.Table] = []
            n = table.num_rows
            starts = list(range(0, n, PUBLISH_SLICE_ROWS)) or [0]
            for start in starts:
                part = table.slice(start, PUBLISH_SLICE_ROWS)
                data, dead = self._aligner.prepare(part)
                if dead.num_rows:
                    letters.append(dead)
                end = start + part.num_rows
                last = start == starts[-1]
                if end <= skip and not last:
                    continue  # this slice is in already (an earlier attempt)
                if last:
                    journal(pa.concat_tables(letters) if letters else empty_dead_letters())
                self._add_slice(epoch, data, progress_key, end, last)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransientError(self.step_id, f"lost the connection to Redis: {exc}") from exc
        except redis.RedisError as exc:
            raise SinkError(self.step_id, f"adding epoch {epoch} failed: {exc}") from exc

    def _add_slice(
        self, epoch: int, data: pa.Table | None, progress_key: str, end: int, last: bool
    ) -> None:
        """One transaction: the slice's messages and the progress (or, for the last slice,
        the epoch marker); skipped when the marker already holds the epoch."""
        values = (
            rows_as_json(strip_positions(data)).to_pylist()
            if data is not None and data.num_rows
            else []
        )

        def txn(pipe: Any) -> None:
            raw = pipe.get(self._marker)
            if raw is not None and int(raw) >= epoch:
                return
            pipe.multi()
            for v in values:
                pipe.xadd(
                    self.config.stream,
                    {self.config.field: v},
                    maxlen=self.config.maxlen,
                    approximate=True,
                )
            if last:
                pipe.set(self._marker, epoch)
                pipe.delete(progress_key)
            else:
                pipe.set(progress_key, f"{epoch}:{end}")

        self._client.transaction(txn, self._marker, progress_key)

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


__all__ = ["RedisStreamReader", "RedisStreamWriter", "message_id", "message_position"]
