"""Turn broker message payloads (Redis Streams, Kafka) into Arrow tables, vectorized.

Shared by every message source so that all of them parse, type and dead-letter the same way:

* ``format: json`` — each payload is one JSON object. Fast path: the batch's payloads are joined
  with newlines and parsed by ``pyarrow.json`` in one call (no per-message Python); the first
  batch's inferred schema is pinned for later batches. If the batch does not parse, it is parsed
  message by message with orjson: a malformed payload (or one that is not an object) becomes a
  dead letter ``parse_error`` (invalid UTF-8: ``encoding``) carrying the payload and the message's
  partition and offset; every good message is still emitted.
* ``format: text`` — the payload is kept whole in a string column ``value``.

Declared ``schema`` columns are cast with :func:`~sluice.connectors.files._common.apply_schema`
(uncastable values → ``cast_error`` dead letters). Position columns: ``__sluice_source`` is the
interned partition name, ``__sluice_row`` the message's offset in it.
"""

from __future__ import annotations

import io
import os
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


def _parseable(t: pa.DataType) -> pa.DataType:
    return pa.string() if pa.types.is_date(t) or pa.types.is_time(t) else t


class MessageDecoder:
    """Decode batches of payloads of one source; keeps the pinned schema between batches."""

    def __init__(
        self, step_id: str, fmt: str, types: Mapping[str, pa.DataType] | None = None
    ) -> None:
        self.step_id = step_id
        self.fmt = fmt
        self.types = dict(types or {})
        # pyarrow's JSON reader cannot parse dates or times itself: read them as text, and let
        # apply_schema cast them (a bad value is then a cast_error letter, not a slow batch)
        self.pinned: pa.Schema | None = (
            pa.schema([pa.field(k, _parseable(v)) for k, v in self.types.items()])
            if self.types
            else None
        )

    def decode(
        self, payloads: Sequence[bytes], partition: str, offsets: Sequence[int]
    ) -> tuple[pa.Table | None, pa.Table | None]:
        """Return ``(rows with position columns or None, dead letters or None)``."""
        if not payloads:
            return None, None
        if self.fmt == "text":
            table = pa.table({"value": pa.array([p.decode("utf-8", "replace") for p in payloads])})
            return self._finish(table, partition, np.asarray(offsets, np.int64), None)
        table = self._fast(payloads)
        if table is not None:
            return self._finish(table, partition, np.asarray(offsets, np.int64), None)
        good: list[dict[str, Any]] = []
        good_pos: list[int] = []
        reasons: list[str] = []
        messages: list[str] = []
        bad_payload: list[str] = []
        bad_pos: list[int] = []
        for payload, offset in zip(payloads, offsets, strict=True):
            try:
                obj = orjson.loads(payload)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except (orjson.JSONDecodeError, ValueError) as exc:
                try:
                    payload.decode("utf-8")
                    reasons.append("parse_error")
                    messages.append(str(exc))
                except UnicodeDecodeError as uexc:
                    reasons.append("encoding")
                    messages.append(f"invalid UTF-8 ({uexc})")
                bad_payload.append(payload.decode("utf-8", "replace"))
                bad_pos.append(offset)
            else:
                good.append(obj)
                good_pos.append(offset)
        dead = None
        if reasons:
            dead = dead_letters(
                step_id=self.step_id,
                reason=reasons,  # type: ignore[arg-type]  # a list per message is accepted
                message=messages,
                payload=bad_payload,
                source=partition,
                position=pa.array(bad_pos, pa.int64()),
                n=len(reasons),
            )
        if not good:
            return None, dead
        table = records_to_table(good, self.pinned)
        return self._finish(table, partition, np.asarray(good_pos, np.int64), dead)

    def _fast(self, payloads: Sequence[bytes]) -> pa.Table | None:
        if any(b"\n" in p for p in payloads):
            return None  # pretty-printed JSON: parse one by one
        block = b"\n".join(payloads) + b"\n"
        try:
            table = pajson.read_json(
                io.BytesIO(block),
                read_options=pajson.ReadOptions(block_size=len(block) + 1, use_threads=False),
                parse_options=pajson.ParseOptions(
                    explicit_schema=self.pinned, unexpected_field_behavior="infer"
                ),
            )
        except (pa.ArrowException, ValueError):
            return None
        if table.num_rows != len(payloads):
            return None  # blank payloads were skipped: keep the offsets aligned
        return table

    def _finish(
        self, table: pa.Table, partition: str, offsets: np.ndarray, dead: pa.Table | None
    ) -> tuple[pa.Table | None, pa.Table | None]:
        if self.pinned is None and table.num_columns:
            self.pinned = pa.schema([f for f in table.schema if not pa.types.is_null(f.type)])
        n = table.num_rows
        table = table.append_column(
            SOURCE_COL, pa.array(np.full(n, source_id(partition), dtype=np.int32))
        ).append_column(ROW_COL, pa.array(offsets))
        table, cast_dead = apply_schema(table, self.types, step_id=self.step_id)
        if cast_dead.num_rows:
            merged = cast_dead if dead is None else concat([dead, cast_dead])
            assert isinstance(merged, pa.Table)
            dead = merged
        return (table if table.num_rows else None), dead




class Spool:
    """A batch run's rows for a message sink, kept until ``commit`` in a temporary Arrow IPC
    file (memory stays bounded), so an aborted run sends nothing. Tables must share a schema
    (align them with :class:`~sluice.connectors.files.writers.SchemaAligner` first)."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._fh: Any = None
        self._writer: Any = None
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None:
            fd, name = tempfile.mkstemp(prefix="sluice-spool-", suffix=".arrow")
            self._path = Path(name)
            self._fh = os.fdopen(fd, "wb")
            self._writer = ipc.new_stream(self._fh, table.schema)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def tables(self, rows: int = 50_000) -> Iterator[pa.Table]:
        """The spooled rows in order, in tables of about ``rows`` rows; then the spool is empty."""
        if self._writer is None:
            return
        self._writer.close()
        self._fh.close()
        self._writer = None
        assert self._path is not None
        try:
            with pa.memory_map(str(self._path)) as source:
                reader = ipc.open_stream(source)
                batches: list[pa.RecordBatch] = []
                n = 0
                for b in reader:
                    batches.append(b)
                    n += b.num_rows
                    if n >= rows:
                        yield pa.Table.from_batches(batches)
                        batches, n = [], 0
                if batches:
                    yield pa.Table.from_batches(batches)
        finally:
            self.discard()

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._fh.close()
            self._writer = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
        self.rows = 0


__all__ = ["MessageDecoder", "Spool"]
