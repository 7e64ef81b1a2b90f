"""Spilling a whole input to disk so that one statement can run over all of it with bounded
memory: the ``sql`` step's whole-input statements and a contract's SQL rules.

:func:`spill_dir` gives a fresh folder in the system temp folder (``TMPDIR``) and removes the
folders of processes that no longer run; :class:`Spill` writes Arrow IPC stream files (LZ4) as
batches come; :meth:`Spill.finish` returns a :class:`Spilled` that DuckDB scans (and may scan
again) through the Arrow C stream interface, one batch at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from sluice.errors import StepError

SPILL_PREFIX = "sluice-sql-"


def spill_dir(run_id: str, step_id: str) -> Path:
    """A new folder for one step's spill, in the system temp folder (``TMPDIR``). Folders left
    by a process that no longer runs (killed mid-run) are removed first."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{SPILL_PREFIX}*"):
        pid = old.name[len(SPILL_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-{run_id}-{step_id}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spill:
    """Rows that a statement over the whole input needs (a ``sql`` step's input, a contract's
    SQL rules), written to Arrow IPC stream files as they come.

    A batch whose schema cannot be cast to the current file's starts a new file; reading
    unifies the files' schemas (missing columns are null). Reads stream one batch at a time,
    and every scan opens the files anew, so DuckDB may scan the input more than once
    (self-joins, set operations, subqueries) without it ever being held in memory."""

    def __init__(self, folder: Path, step_id: str) -> None:
        self.folder = folder
        self.step_id = step_id
        self.parts: list[tuple[Path, pa.Schema]] = []
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._sink: pa.NativeFile | None = None
        self._options = pa.ipc.IpcWriteOptions(
            compression="lz4" if pa.Codec.is_available("lz4") else None
        )

    def append(self, table: pa.Table) -> None:
        if self._writer is not None:
            schema = self.parts[-1][1]
            if table.schema != schema:
                conformed = None
                if table.column_names == schema.names:
                    try:
                        conformed = table.cast(schema)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                        conformed = None
                if conformed is None:
                    self._close_writer()  # the next file gets this batch's schema
                else:
                    table = conformed
        if self._writer is None:
            path = self.folder / f"input-{len(self.parts)}.arrows"
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, table.schema, options=self._options)
            self.parts.append((path, table.schema))
        self._writer.write_table(table)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def finish(self) -> Spilled | None:
        self._close_writer()
        if not self.parts:
            return None
        try:
            schema = pa.unify_schemas([s for _, s in self.parts], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise StepError(
                self.step_id,
                f"the input's columns change type between batches and cannot be combined: {exc}",
                fix="cast the columns to one type before this step",
            ) from exc
        return Spilled(self.parts, schema)

    def close(self) -> None:
        self._close_writer()


class Spilled:
    """A re-scannable Arrow stream over the spilled files (the Arrow PyCapsule protocol)."""

    def __init__(self, parts: list[tuple[Path, pa.Schema]], schema: pa.Schema) -> None:
        self.parts = parts
        self.schema = schema

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        if len(self.parts) == 1 and self.parts[0][1] == self.schema:
            reader = pa.ipc.open_stream(pa.OSFile(str(self.parts[0][0])))
        else:
            reader = pa.RecordBatchReader.from_batches(self.schema, self._conformed())
        return reader.__arrow_c_stream__(requested_schema)

    def _conformed(self) -> Iterator[pa.RecordBatch]:
        for path, schema in self.parts:
            with pa.OSFile(str(path)) as f:
                for batch in pa.ipc.open_stream(f):
                    cols = []
                    for field in self.schema:
                        idx = schema.get_field_index(field.name)
                        col = (
                            batch.column(idx) if idx >= 0 else pa.nulls(batch.num_rows, field.type)
                        )
                        cols.append(col.cast(field.type) if col.type != field.type else col)
                    yield pa.RecordBatch.from_arrays(cols, schema=self.schema)
