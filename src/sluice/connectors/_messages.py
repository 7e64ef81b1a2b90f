"""Turn broker message payloads (Redis Streams, Kafka) into Arrow tables, vectorized.

Shared by every message source so that all of them parse, type and dead-letter the same way:

* ``format: json`` — each payload is one JSON object. Fast path: the batch's payloads are joined
  with newlines, checked in one pass (valid UTF-8, each payload starts with ``{``, no newline
  inside a payload, none nested deeper than 200 levels: numpy and Arrow over the joined buffer,
  no per-message Python) and parsed by ``pyarrow.json`` in one call; the first batch's inferred
  schema is pinned for later batches. If the batch does not pass, it is parsed message by
  message with orjson: a malformed payload, an empty one, one nested deeper than 200 levels, or
  one that is not an object (``null``, a number, an array) becomes a dead letter
  ``parse_error``, invalid UTF-8 ``encoding``; every good message is still emitted.
* ``format: text`` — the payload is kept whole in a string column ``value``; a payload that is
  not valid UTF-8 is an ``encoding`` dead letter (never a string with replacement characters).
* A payload longer than ``max_bytes`` (the source's ``max_record_bytes``) is a ``too_large``
  dead letter carrying the first :data:`PREFIX_BYTES` bytes; the others are read normally.

Every dead letter carries the message's partition (``source``) and position (``position``).
Declared ``schema`` columns are cast with :func:`~sluice.connectors.files._common.apply_schema`
(uncastable values → ``cast_error`` dead letters). Position columns: ``__sluice_source`` is the
interned partition name, ``__sluice_row`` the message's position in it.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pajson

from sluice.batch import ROW_COL, SOURCE_COL, concat, dead_letters, source_id
from sluice.connectors.files._common import apply_schema, records_to_table

#: Default ``max_record_bytes`` of the broker sources: a longer message is a ``too_large`` letter.
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
#: Bytes of a too-large message kept as the dead letter's payload (the message stays in the
#: broker at the letter's position).
PREFIX_BYTES = 4096
#: A payload nested deeper than this (objects and arrays) is a ``parse_error`` letter: pyarrow's
#: JSON parser crashes the process some ten thousand levels down, orjson serializes 255 at most.
MAX_NESTING = 200
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)

_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number"}
_JSON_TYPES.update({str: "a string", list: "an array"})

Partitions = str | Sequence[str]


def _parseable(t: pa.DataType) -> pa.DataType:
    return pa.string() if pa.types.is_date(t) or pa.types.is_time(t) else t


def _take(values: Sequence[Any], idx: np.ndarray) -> list[Any]:
    return [values[i] for i in idx.tolist()]


def _text(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


class MessageDecoder:
    """Decode batches of payloads of one source; keeps the pinned schema between batches."""

    def __init__(
        self,
        step_id: str,
        fmt: str,
        types: Mapping[str, pa.DataType] | None = None,
        max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.step_id = step_id
        self.fmt = fmt
        self.types = dict(types or {})
        self.max_bytes = max_bytes
        # pyarrow's JSON reader cannot parse dates or times itself: read them as text, and let
        # apply_schema cast them (a bad value is then a cast_error letter, not a slow batch)
        self.pinned: pa.Schema | None = (
            pa.schema([pa.field(k, _parseable(v)) for k, v in self.types.items()])
            if self.types
            else None
        )

    def decode(
        self, payloads: Sequence[bytes], partition: Partitions, offsets: Sequence[int]
    ) -> tuple[pa.Table | None, pa.Table | None]:
        """Return ``(rows with position columns or None, dead letters or None)``.

        ``partition`` names the partition of every payload (one name), or of each payload (a
        sequence as long as ``payloads``); ``offsets`` are the positions in it."""
        n = len(payloads)
        if not n:
            return None, None
        letters = _Letters(self.step_id)
        lengths = np.fromiter(map(len, payloads), np.int64, n)
        big = lengths > self.max_bytes
        if big.any():  # rare: split them off, Python per large message is fine
            for i in np.flatnonzero(big).tolist():
                letters.add(
                    "too_large",
                    f"message of {int(lengths[i]):,} bytes is larger than max_record_bytes "
                    f"({self.max_bytes:,}); the letter's payload holds at most its first "
                    f"{PREFIX_BYTES:,} bytes",
                    _text(payloads[i][:PREFIX_BYTES]),
                    _part(partition, i),
                    offsets[i],
                )
            keep = np.flatnonzero(~big)
            payloads, offsets = _take(payloads, keep), _take(offsets, keep)
            lengths = lengths[keep]
            if not isinstance(partition, str):
                partition = _take(partition, keep)
            if not payloads:
                return None, letters.table()
        if self.fmt == "text":
            return self._text(payloads, partition, offsets, letters)
        table = self._fast(payloads, lengths)
        if table is not None:
            return self._finish(table, partition, offsets, letters)
        good: list[dict[str, Any]] = []
        good_idx: list[int] = []
        for i, payload in enumerate(payloads):
            obj, problem = _parse(payload)
            if obj is not None:
                good.append(obj)
                good_idx.append(i)
            elif problem is not None:
                letters.add(*problem, _text(payload), _part(partition, i), offsets[i])
        if not good:
            return None, letters.table()
        idx = np.asarray(good_idx, np.int64)
        table = records_to_table(good, self.pinned)
        if not isinstance(partition, str):
            partition = _take(partition, idx)
        return self._finish(table, partition, _take(offsets, idx), letters)

    def _text(
        self,
        payloads: Sequence[bytes],
        partition: Partitions,
        offsets: Sequence[int],
        letters: _Letters,
    ) -> tuple[pa.Table | None, pa.Table | None]:
        try:
            values = pa.array(payloads, pa.string())  # validates UTF-8 in C
        except pa.ArrowInvalid:
            keep: list[int] = []
            for i, payload in enumerate(payloads):
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError as exc:
                    letters.add(
                        "encoding",
                        f"invalid UTF-8 ({exc})",
                        _text(payload),
                        _part(partition, i),
                        offsets[i],
                    )
                else:
                    keep.append(i)
            if not keep:
                return None, letters.table()
            idx = np.asarray(keep, np.int64)
            payloads, offsets = _take(payloads, idx), _take(offsets, idx)
            if not isinstance(partition, str):
                partition = _take(partition, idx)
            values = pa.array(payloads, pa.string())
        return self._finish(pa.table({"value": values}), partition, offsets, letters)

    def _fast(self, payloads: Sequence[bytes], lengths: np.ndarray) -> pa.Table | None:
        """Parse the whole batch in one pyarrow call, or None when a payload needs a closer
        look (not starting with ``{``, holding a newline, invalid UTF-8, not parseable)."""
        n = len(payloads)
        block = b"\n".join(payloads) + b"\n"
        if block.count(b"\n") != n:
            return None  # a payload holds a newline (pretty-printed JSON): one by one
        if not self._shallow(payloads, lengths):
            return None
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(lengths + 1, out=starts[1:])
        raw = np.frombuffer(block, np.uint8)
        if not bool((raw[starts[:-1]] == ord("{")).all()):
            return None  # empty, null, an array, leading blanks...: one by one
        text = pa.Array.from_buffers(
            pa.large_string(), n, [None, pa.py_buffer(starts), pa.py_buffer(block)]
        )
        try:
            text.validate(full=True)  # UTF-8, checked in C over the joined buffer
            table = pajson.read_json(
                io.BytesIO(block),
                read_options=pajson.ReadOptions(block_size=len(block) + 1, use_threads=False),
                parse_options=pajson.ParseOptions(
                    explicit_schema=self.pinned, unexpected_field_behavior="infer"
                ),
            )
        except (pa.ArrowException, ValueError):
            return None
        if table.num_rows != n:
            return None  # a payload held several objects: keep the offsets aligned
        return table

    @staticmethod
    def _shallow(payloads: Sequence[bytes], lengths: np.ndarray) -> bool:
        """True when no payload is nested deeper than :data:`MAX_NESTING` levels (pyarrow's
        recursive JSON parser crashes the process on some ten thousand levels). A level takes
        at least two bytes: only longer payloads are looked at, see :func:`_too_deep`."""
        for i in np.flatnonzero(lengths > 2 * MAX_NESTING).tolist():
            if _too_deep(payloads[i]):
                return False  # the slow path makes it a parse_error letter
        return True

    def _finish(
        self, table: pa.Table, partition: Partitions, offsets: Sequence[int], letters: _Letters
    ) -> tuple[pa.Table | None, pa.Table | None]:
        if self.pinned is None and table.num_columns:
            self.pinned = pa.schema([f for f in table.schema if not pa.types.is_null(f.type)])
        n = table.num_rows
        if isinstance(partition, str):
            sources = pa.array(np.full(n, source_id(partition), dtype=np.int32))
        else:
            sources = pa.array([source_id(p) for p in partition], pa.int32())
        table = table.append_column(SOURCE_COL, sources).append_column(
            ROW_COL, pa.array(np.asarray(offsets, np.int64))
        )
        table, cast_dead = apply_schema(table, self.types, step_id=self.step_id)
        dead = letters.table()
        if cast_dead.num_rows:
            merged = cast_dead if dead is None else concat([dead, cast_dead])
            assert isinstance(merged, pa.Table)
            dead = merged
        return (table if table.num_rows else None), dead


def _part(partition: Partitions, i: int) -> str:
    return partition if isinstance(partition, str) else partition[i]


def _too_deep(payload: bytes) -> bool:
    """Whether ``payload`` nests objects/arrays deeper than :data:`MAX_NESTING` (cheap unless
    it holds more than that many opening brackets; brackets inside strings do not count)."""
    if len(payload) <= 2 * MAX_NESTING or (
        payload.count(b"{") + payload.count(b"[") <= MAX_NESTING
    ):
        return False
    raw = np.frombuffer(_STRING.sub(b'""', payload), np.uint8)
    step = (raw == ord("{")).astype(np.int32) + (raw == ord("["))
    step -= (raw == ord("}")).astype(np.int32) + (raw == ord("]"))
    return int(np.cumsum(step).max()) > MAX_NESTING


def _parse(payload: bytes) -> tuple[dict[str, Any], None] | tuple[None, tuple[str, str]]:
    """The payload's JSON object, or why it is none: ``(reason, message)``."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, ("encoding", f"invalid UTF-8 ({exc})")
    if not payload.strip():
        return None, ("parse_error", "empty message (no payload)")
    if _too_deep(payload):
        return None, ("parse_error", f"JSON nested deeper than {MAX_NESTING} levels")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return None, ("parse_error", f"not JSON: {exc}")
    if not isinstance(obj, dict):
        kind = _JSON_TYPES.get(type(obj), type(obj).__name__)
        return None, ("parse_error", f"expected a JSON object, got {kind}")
    return obj, None


class _Letters:
    """Dead letters of one decoded batch, collected on the (rare) error path."""

    def __init__(self, step_id: str) -> None:
        self.step_id = step_id
        self.rows: list[tuple[str, str, str, str, int]] = []

    def add(self, reason: str, message: str, payload: str, source: str, position: int) -> None:
        self.rows.append((reason, message, payload, source, position))

    def table(self) -> pa.Table | None:
        if not self.rows:
            return None
        reason, message, payload, source, position = zip(*self.rows, strict=True)
        return dead_letters(
            step_id=self.step_id,
            reason=list(reason),  # type: ignore[arg-type]  # a list per message is accepted
            message=list(message),
            payload=list(payload),
            source=list(source),
            position=pa.array(position, pa.int64()),
            n=len(self.rows),
        )


class Spool:
    """A batch run's rows for a sink, kept until ``commit`` in a temporary Arrow IPC file
    (LZ4-compressed, in the system's temporary folder, ``TMPDIR``), so memory stays bounded
    and an aborted run writes nothing. Tables must share a schema (align them with
    :class:`~sluice.connectors.files.writers.SchemaAligner` first)."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._fh: Any = None
        self._writer: Any = None
        self.schema: pa.Schema | None = None
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None:
            fd, name = tempfile.mkstemp(prefix="sluice-spool-", suffix=".arrow")
            self._path = Path(name)
            self._fh = os.fdopen(fd, "wb")
            self.schema = table.schema
            self._writer = ipc.new_stream(
                self._fh, table.schema, options=ipc.IpcWriteOptions(compression="lz4")
            )
        self._writer.write_table(table)
        self.rows += table.num_rows

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The spooled record batches in order; afterwards the spool is empty."""
        if self._writer is None:
            return
        self._writer.close()
        self._fh.close()
        self._writer = None
        assert self._path is not None
        try:
            with pa.memory_map(str(self._path)) as source:
                yield from ipc.open_stream(source)
        finally:
            self.discard()

    def reader(self) -> pa.RecordBatchReader:
        """The spooled rows as one stream (for writers that take a reader)."""
        assert self.schema is not None, "nothing spooled"
        return pa.RecordBatchReader.from_batches(self.schema, self.batches())

    def tables(self, rows: int = 50_000) -> Iterator[pa.Table]:
        """The spooled rows in order, in tables of about ``rows`` rows; then the spool is empty."""
        batches: list[pa.RecordBatch] = []
        n = 0
        for b in self.batches():
            batches.append(b)
            n += b.num_rows
            if n >= rows:
                yield pa.Table.from_batches(batches)
                batches, n = [], 0
        if batches:
            yield pa.Table.from_batches(batches)

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._fh.close()
            self._writer = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
        self.rows = 0


__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "MessageDecoder", "Spool"]
