"""Delta Lake sink (``deltalake``, imported lazily)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from sluice.config.models import DeltaSink
from sluice.connectors.files.writers import SchemaAligner, normalize
from sluice.errors import SinkError, require
from sluice.plugins import RunContext


class DeltaWriter:
    """Write a run into a Delta table as **one Delta transaction** (one new table version).

    Batches are buffered in memory and written by :meth:`commit` with
    ``deltalake.write_deltalake``, so a failed or aborted run leaves no new version. To bound
    memory, once the buffer exceeds :attr:`max_buffer_bytes` (about 256 MB) it is written as an
    extra commit: **a run larger than that is split into several Delta commits**, each atomic on
    its own. If such a run is then aborted, the table is restored (``DeltaTable.restore``, itself a
    new version) to the version it had before the run; a table that the run created is emptied
    (``DeltaTable.delete()``) since Delta cannot remove its version 0.

    ``mode: overwrite`` replaces the table's content (and schema) with the first commit of the
    run; further commits of the same run append. In append mode the existing table's schema is
    the target: batches are aligned to it and incompatible ones become dead letters.
    """

    max_buffer_bytes: int = 256 << 20

    def __init__(self, config: DeltaSink) -> None:
        self.config = config
        self.step_id = config.id
        self._dl: Any = None
        self._uri = ""
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._commits = 0
        self._start_version: int | None = None
        self._opened = False

    def open(self, ctx: RunContext) -> None:
        require("deltalake", "delta", "Delta sink")
        import deltalake

        self._dl = deltalake
        path = self.config.path
        self._uri = path if "://" in path else str(ctx.resolve(path))
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        self._buffer, self._buffered, self._commits = [], 0, 0
        self._start_version = None
        try:
            if deltalake.DeltaTable.is_deltatable(self._uri):
                table = deltalake.DeltaTable(self._uri)
                self._start_version = table.version()
                if self.config.mode == "append":
                    schema = pa.schema(table.schema().to_arrow())
                    self._aligner.schema = normalize(schema.empty_table()).schema
        except Exception as exc:
            raise SinkError(
                self.step_id,
                f"cannot open Delta table {self._uri}: {exc}",
                fix="check the path and that it holds a Delta table",
            ) from exc
        self._opened = True

    def write(self, table: pa.Table) -> pa.Table:
        if not self._opened:
            raise SinkError(self.step_id, "write() called before open() or after commit()/abort()")
        data, dead = self._aligner.prepare(table)
        if data is None or data.num_rows == 0:
            return dead
        if self.config.partition_by and not self._buffer and self._commits == 0:
            missing = [c for c in self.config.partition_by if c not in data.column_names]
            if missing:
                raise SinkError(
                    self.step_id,
                    f"partition columns {missing} are not in the data ({data.column_names})",
                    fix="partition_by must name columns of the data",
                )
        self._buffer.append(data)
        self._buffered += data.nbytes
        if self._buffered >= self.max_buffer_bytes:
            self._flush()
        return dead

    def commit(self) -> None:
        if not self._opened:
            return
        try:
            if self._buffer:
                self._flush()
            elif self._commits == 0 and self.config.mode == "overwrite":
                # An overwrite run without rows still replaces the table (with an empty one).
                schema = self._aligner.schema or self._aligner.fallback
                if schema is not None:
                    self._buffer = [schema.empty_table()]
                    self._flush()
        except SinkError:
            self.abort()  # undo the extra commits of a split run
            raise
        self._opened = False

    def abort(self) -> None:
        if not self._opened:
            return
        self._opened = False
        self._buffer, self._buffered = [], 0
        if not self._commits:
            return
        try:
            table = self._dl.DeltaTable(self._uri)
            if self._start_version is None:
                table.delete()
            else:
                table.restore(self._start_version)
        except Exception as exc:
            raise SinkError(
                self.step_id,
                f"could not undo the commits of an aborted run in Delta table {self._uri}: {exc}",
                fix=f"restore it by hand: DeltaTable(path).restore({self._start_version})",
            ) from exc

    def _flush(self) -> None:
        tables = self._buffer
        schema = tables[0].schema

        def batches() -> Iterator[pa.RecordBatch]:
            for t in tables:
                yield from t.to_batches()

        reader = pa.RecordBatchReader.from_batches(schema, batches())
        first = self._commits == 0
        overwrite = first and self.config.mode == "overwrite"
        try:
            self._dl.write_deltalake(
                self._uri,
                reader,
                mode="overwrite" if overwrite else "append",
                schema_mode="overwrite" if overwrite else None,
                partition_by=self.config.partition_by or None,
            )
        except Exception as exc:
            raise SinkError(
                self.step_id,
                f"writing to Delta table {self._uri} failed: {exc}",
                fix="check that the data's schema and partition_by match the existing table",
            ) from exc
        self._commits += 1
        self._buffer, self._buffered = [], 0
