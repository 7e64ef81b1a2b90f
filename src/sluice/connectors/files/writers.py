"""Atomic file writers: Parquet, CSV and JSON lines.

``path`` is a directory of part files (``part-{run_id}-{seq:05d}.{ext}``), unless it ends with the
format's extension, then it is a single file. Every file is written under a hidden temporary name
in its final directory (``.{name}.{pipeline}.{run_id}.tmp``: :func:`temporary_name`; the owner in
the name keeps one pipeline's clean-up away from another's files), fsync'ed, and renamed into
place with :func:`os.replace` only in :meth:`commit` (or by the runtime's publish). So:

* a crash (even ``kill -9``) never leaves a file under a final name that looks complete: at worst
  hidden ``*.tmp`` leftovers, which readers (pyarrow datasets, Spark, DuckDB globs on
  ``part-*``) ignore;
* each file appears atomically; the files of one run appear together at commit (one rename
  after the other, after all of them were fsync'ed), so a reader may briefly see some parts of a
  run before the rest -- the run is complete once :meth:`commit` returns;
* :meth:`abort` deletes the temporary files (and the directories the run created, when empty).

Which output a run replaces (``mode: overwrite``), keeps (``append``) or refuses
(``error_if_exists``) is decided by the runtime's epoch protocol (:mod:`sluice.runtime.epochs`):
the writers only write part files under temporary names and hand them over with
:meth:`_FileWriter.prepare`. :func:`existing_output`, :func:`remove_temporaries` and
:func:`replace_output` are the file-level helpers it uses; they only look at the output's own
files: part files directly in the folder and in its partition folders (:func:`output_dirs`),
never in other subfolders.

This module also holds :class:`SchemaAligner`, shared by every sink (the last line of defence
before anything is written):

* no string is ever written that is not valid UTF-8: every string column (also inside lists and
  structs) is validated, vectorized (all-ASCII data in one SIMD pass, about 1 ms per million
  short strings; other text by Arrow's UTF-8 validation, about 8 ms); rows holding invalid
  bytes become ``encoding`` dead letters whose payload shows the bytes escaped (``\\xff``), and
  the other rows of the batch are written (:meth:`SchemaAligner.split` returns the input rows
  that match the written data);
* the first batch with rows fixes the schema; later batches that differ by column order, by
  null-typed (all-null) columns, by missing nullable columns or by a lossless widening (int32 ->
  int64, string -> large_string) are aligned to it; a batch that cannot be aligned becomes dead
  letters (``sink_rejected``) whose message names the column.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from sluice.batch import empty_dead_letters, rows_dead_letters, strip_positions
from sluice.config.models import CsvSink, FileSinkBase, JsonlSink, ParquetSink
from sluice.errors import SinkError
from sluice.plugins import RunContext

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
#: At most this many partition files are open at once; the least recently used one is finished
#: (it becomes a complete part, renamed at commit) and a later row for it starts a new part.
MAX_OPEN_PARTITIONS = 1024

# ------------------------------------------------------------------------------ schema alignment


def normalize(table: pa.Table) -> pa.Table:
    """Decode dictionary columns and string/binary *views* to plain Arrow types every sink knows."""
    for i, f in enumerate(table.schema):
        t = f.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_string_view(t):
            t = pa.large_string()
        elif pa.types.is_binary_view(t):
            t = pa.large_binary()
        if t != f.type:
            table = table.set_column(
                i, pa.field(f.name, t, f.nullable), pc.cast(table.column(i), t)
            )
    return table


def _has_text(t: pa.DataType) -> bool:
    """Whether values of type ``t`` hold UTF-8 strings (directly or nested)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return True
    if pa.types.is_dictionary(t):
        return _has_text(t.value_type)
    return any(_has_text(t.field(i).type) for i in range(t.num_fields))


def _valid(arr: pa.Array) -> bool:
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _text_valid(arr: pa.Array) -> bool:
    """Whether every string of ``arr`` is valid UTF-8, as cheaply as possible: plain string
    arrays whose bytes are all ASCII (the common case) are valid after one SIMD pass over their
    data (about 1 ms per 25 MB); other string arrays are checked by Arrow's UTF-8 validation
    (a cast from binary), nested ones by a full validation."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        _, offsets_buf, data_buf = arr.buffers()
        if data_buf is None or len(arr) == 0:
            return True
        offsets = np.frombuffer(
            offsets_buf, np.int64 if pa.types.is_large_string(t) else np.int32
        )
        start, end = int(offsets[arr.offset]), int(offsets[arr.offset + len(arr)])
        data = np.frombuffer(data_buf, np.uint8)[start:end]
        if data.size == 0 or int(data.max()) < 0x80:
            return True
        binary = pa.large_binary() if pa.types.is_large_string(t) else pa.binary()
        try:
            pc.cast(arr.view(binary), t)
        except pa.ArrowInvalid:
            return False
        return True
    return _valid(arr)


def _invalid_rows(arr: pa.Array, offset: int, out: np.ndarray) -> None:
    """Mark in ``out`` (at ``offset``) the rows of ``arr`` holding invalid UTF-8. Only called
    for an array that failed validation (the error path). Strings: bisect down to small slices
    (a few invalid rows among millions cost a few validations), then test row by row; nested
    values: find the invalid child values and mark their parent rows."""
    t = arr.type
    n = len(arr)
    if pa.types.is_dictionary(t):
        bad = np.zeros(len(arr.dictionary), dtype=bool)
        _invalid_rows(arr.dictionary, 0, bad)
        idx = arr.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        out[offset : offset + n] |= bad[idx] & arr.is_valid().to_numpy(zero_copy_only=False)
        return
    if pa.types.is_struct(t):
        for child in arr.flatten():
            if _has_text(child.type) and not _valid(child):
                _invalid_rows(child, offset, out)
        return
    if t.num_fields:  # list, large list, fixed-size list, map
        values = arr.flatten()
        bad = np.zeros(len(values), dtype=bool)
        _invalid_rows(values, 0, bad)
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        out[offset + parents[bad]] = True
        return
    if n > 64:
        half = n // 2
        for start, length in ((0, half), (half, n - half)):
            part = arr.slice(start, length)
            if not _valid(part):
                _invalid_rows(part, offset + start, out)
        return
    for i in range(n):
        if not _valid(arr.slice(i, 1)):
            out[offset + i] = True


def invalid_utf8(table: pa.Table) -> np.ndarray | None:
    """A boolean mask of the rows holding a string that is not valid UTF-8 (in any column, at
    any nesting depth), or None when every string is valid (the common case: one vectorized
    validation per string column chunk)."""
    mask: np.ndarray | None = None
    for col in table.columns:
        if not _has_text(col.type):
            continue
        start = 0
        for chunk in col.chunks:
            if not _text_valid(chunk):
                if mask is None:
                    mask = np.zeros(table.num_rows, dtype=bool)
                _invalid_rows(chunk, start, mask)
            start += len(chunk)
    return mask


def _escape_invalid(table: pa.Table) -> pa.Table:
    """The rows of ``table`` with every string made valid (invalid bytes escaped as ``\\xff``),
    so that they can be shown in a dead letter. Nested columns that hold invalid strings are
    replaced by their escaped text. Error path: a Python loop over few rows."""
    for i, f in enumerate(table.schema):
        if not _has_text(f.type):
            continue
        col = table.column(i)
        if all(_valid(c) for c in col.chunks):
            continue
        if pa.types.is_dictionary(f.type):
            col = pc.cast(col, f.type.value_type)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            raw = pc.cast(col, pa.large_binary()).to_pylist()
        else:  # nested: show the value's text form
            raw = [None if v is None else str(v).encode("utf-8", "replace") for v in _rows(col)]
        fixed = pa.array(
            [None if b is None else b.decode("utf-8", "backslashreplace") for b in raw],
            pa.string(),
        )
        table = table.set_column(i, pa.field(f.name, pa.string()), fixed)
    return table


def drop_invalid_utf8(table: pa.Table, step_id: str) -> tuple[pa.Table, pa.Table]:
    """Split off the rows of ``table`` that hold a string that is not valid UTF-8: ``(the other
    rows, their encoding dead letters)``. One vectorized validation per string column when every
    string is valid (the table is then returned as it is)."""
    bad = invalid_utf8(table)
    if bad is None:
        return table, empty_dead_letters()
    rejected = table.filter(pa.array(bad))
    names = [
        f.name
        for f in table.schema
        if _has_text(f.type) and not all(_valid(x) for x in table.column(f.name).chunks)
    ]
    dead = rows_dead_letters(
        _escape_invalid(rejected),
        step_id=step_id,
        reason="encoding",
        message=f"column(s) {', '.join(map(repr, names))} hold bytes that are not valid "
        "UTF-8; no sink writes invalid strings",
    )
    return table.filter(pa.array(~bad)), dead


def _rows(col: pa.ChunkedArray) -> list[object]:
    out: list[object] = []
    for chunk in col.chunks:
        for j in range(len(chunk)):
            try:
                out.append(chunk[j].as_py())
            except (UnicodeDecodeError, pa.ArrowException):
                out.append("<value with invalid UTF-8>")
    return out


def _family(t: pa.DataType) -> str:
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "binary"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz is not None else "timestamp"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list"
    return str(t)


class SchemaAligner:
    """Fix a sink's schema from its first batch with rows and align later batches to it."""

    def __init__(
        self, step_id: str, schema: pa.Schema | None = None, *, null_as: pa.DataType | None = None
    ) -> None:
        self.step_id = step_id
        self.schema: pa.Schema | None = schema
        #: Type given to all-null (null-typed) columns of the first batch, for sinks whose storage
        #: has no null type (databases, Delta). None keeps the null type.
        self.null_as = null_as
        #: Schema of a 0-row batch seen before any row (used to create empty outputs).
        self.fallback: pa.Schema | None = None

    def prepare(self, table: pa.Table) -> tuple[pa.Table | None, pa.Table]:
        """Strip positions and align ``table``: ``(data, dead_letters)``.

        ``data`` is None when the batch was rejected (then every row is in ``dead_letters``) or
        when it is a 0-row batch that arrived before the schema was known. Otherwise **both**
        may hold rows: rows with invalid UTF-8 are dead letters and not in ``data``; a sink that
        needs the input rows matching ``data`` (positions for its own dead letters) calls
        :meth:`split`.
        """
        _, data, dead = self.split(table)
        return data, dead

    def split(self, table: pa.Table) -> tuple[pa.Table, pa.Table | None, pa.Table]:
        """:meth:`prepare`, also returning the rows of ``table`` (with positions) that ``data``
        holds, row for row: ``(kept, data, dead_letters)``."""
        table, dead = drop_invalid_utf8(table, self.step_id)
        data = normalize(strip_positions(table))
        if self.schema is None:
            if data.num_rows == 0:
                if not dead.num_rows:
                    self.fallback = self._fix_nulls(data.schema)
                return table, None, dead
            self.schema = self._fix_nulls(data.schema)
            if self.schema.equals(data.schema):
                return table, data, dead
        try:
            return table, self.align(data), dead
        except _Incompatible as exc:
            message = f"batch does not match the sink's schema: {exc}"
            refused = rows_dead_letters(
                table, step_id=self.step_id, reason="sink_rejected", message=message
            )
            return table, None, pa.concat_tables([dead, refused]) if dead.num_rows else refused

    def _fix_nulls(self, schema: pa.Schema) -> pa.Schema:
        if self.null_as is None:
            return schema
        for i, f in enumerate(schema):
            if pa.types.is_null(f.type):
                schema = schema.set(i, pa.field(f.name, self.null_as))
        return schema

    def align(self, data: pa.Table) -> pa.Table:
        schema = self.schema
        assert schema is not None
        if data.schema.equals(schema):
            return data
        target_names = set(schema.names)
        for name in data.column_names:
            if name not in target_names and not pa.types.is_null(data.schema.field(name).type):
                raise _Incompatible(
                    f"column {name!r} is not in the sink's schema ({', '.join(schema.names)})"
                )
        n = data.num_rows
        columns: list[pa.ChunkedArray | pa.Array] = []
        for f in schema:
            if f.name not in data.column_names:
                if not f.nullable:
                    raise _Incompatible(f"required column {f.name!r} is missing")
                columns.append(pa.nulls(n, f.type))
                continue
            col = data.column(f.name)
            if col.type == f.type:
                columns.append(col)
            elif pa.types.is_null(col.type):
                columns.append(pa.nulls(n, f.type))
            elif _family(col.type) == _family(f.type):
                try:
                    columns.append(pc.cast(col, f.type, safe=True))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise _Incompatible(
                        f"column {f.name!r}: cannot convert {col.type} to {f.type}: {exc}"
                    ) from None
            else:
                raise _Incompatible(
                    f"column {f.name!r} has type {col.type}, the sink expects {f.type}"
                )
        return pa.Table.from_arrays(columns, schema=schema)


class _Incompatible(Exception):
    pass


# ---------------------------------------------------------------------------------- file writers


@dataclass(eq=False)
class _Part:
    """One output file being written under its temporary name."""

    tmp: Path
    final: Path
    fh: IO[bytes]
    writer: Any = None
    rows: int = 0
    buffer: list[pa.Table] = field(default_factory=list)
    buffered_rows: int = 0
    buffered_bytes: int = 0


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` durable (renames, new files); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(final: Path, pipeline: str, run_id: str) -> Path:
    """The hidden temporary name a file is written under before it is renamed to ``final``:
    ``.<final name>.<pipeline>.<run id>.tmp``. It names its owner, so that the clean-up of a
    pipeline never deletes the temporary files of another pipeline writing the same folder
    (:func:`remove_temporaries`)."""
    return final.with_name(f".{final.name}.{pipeline}.{run_id}.tmp")


def temporary_owner(name: str) -> str | None:
    """The pipeline that owns the temporary file ``name`` (see :func:`temporary_name`), or
    None when ``name`` is not such a file."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[1:-4].rsplit(".", 2)
    return parts[1] if len(parts) == 3 else None


@dataclass(eq=False)
class _State:
    ctx: RunContext
    root: Path
    single: bool
    directory: Path
    aligner: SchemaAligner
    created_dirs: list[Path] = field(default_factory=list)
    open_parts: OrderedDict[tuple[str, ...], _Part] = field(default_factory=OrderedDict)
    finished: list[_Part] = field(default_factory=list)
    seq: int = 0


class _FileWriter:
    """Shared machinery of the atomic file writers (see the module docstring)."""

    ext: ClassVar[str]
    config: FileSinkBase

    def __init__(self, config: FileSinkBase) -> None:
        self.config = config
        self.step_id = config.id
        self._state: _State | None = None

    # --------------------------------------------------------------------------- sink protocol

    def open(self, ctx: RunContext) -> None:
        root = ctx.resolve(self.config.path)
        single = root.name.lower().endswith("." + self.ext)
        directory = root.parent if single else root
        state = _State(ctx, root, single, directory, SchemaAligner(self.step_id))
        try:
            self._mkdirs(state, directory)
        except OSError as exc:
            raise SinkError(
                self.step_id,
                f"cannot create output directory {directory}: {exc}",
                fix="check the path and its permissions",
            ) from exc
        self._check(state)
        self._state = state

    def write(self, table: pa.Table) -> pa.Table:
        state = self._require_open()
        data, dead = state.aligner.prepare(table)
        if data is None or data.num_rows == 0:
            return dead
        try:
            self._write(state, data)
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(
                self.step_id, f"writing {self.ext} under {state.root} failed: {exc}"
            ) from exc
        return dead

    def commit(self) -> None:
        state = self._state
        if state is None:
            return
        try:
            self._empty_single_file(state)
            for key in list(state.open_parts):
                self._finish(state, key)
            dirs = set()
            for part in state.finished:
                os.replace(part.tmp, part.final)
                dirs.add(part.final.parent)
            for d in dirs:
                fsync_dir(d)
        except (OSError, pa.ArrowException) as exc:
            self.abort()
            raise SinkError(
                self.step_id, f"committing {self.ext} output under {state.root} failed: {exc}"
            ) from exc
        self._state = None

    def prepare(self) -> list[tuple[Path, Path]]:
        """Finish every part file (closed and fsynced under its temporary name) and return
        ``(temporary, final)`` pairs; renaming them is the caller's publish step (the runtime's
        epoch protocol). A single-file output always gets its file, empty when no row came: the
        file a run publishes replaces the previous one, also when the run had nothing to write."""
        state = self._state
        if state is None:
            return []
        try:
            self._empty_single_file(state)
            for key in list(state.open_parts):
                self._finish(state, key)
        except (OSError, pa.ArrowException) as exc:
            self.abort()
            raise SinkError(
                self.step_id, f"finishing {self.ext} parts under {state.root} failed: {exc}"
            ) from exc
        pairs = [(part.tmp, part.final) for part in state.finished]
        self._state = None
        return pairs

    def _empty_single_file(self, state: _State) -> None:
        """A single-file output without any row still gets its (valid, empty) file: with the
        columns of the batches it saw (all refused, or without rows), else without columns."""
        if state.single and not state.open_parts and not state.finished:
            schema = state.aligner.schema or state.aligner.fallback
            self._new_part(state, (), schema if schema is not None else pa.schema([]))

    def abort(self) -> None:
        state = self._state
        if state is None:
            return
        self._state = None
        for part in [*state.open_parts.values(), *state.finished]:
            try:
                if part.writer is not None:
                    part.writer.close()
            except Exception:  # best effort: the file is deleted anyway
                pass
            part.fh.close()
            part.tmp.unlink(missing_ok=True)
        for d in reversed(state.created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds when empty

    # ------------------------------------------------------------------------------- internals

    def _require_open(self) -> _State:
        if self._state is None:
            raise SinkError(self.step_id, "write() called before open() or after commit()/abort()")
        return self._state

    def _check(self, state: _State) -> None:
        """Validate options against the resolved path (subclasses)."""

    @staticmethod
    def _mkdirs(state: _State, directory: Path) -> None:
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            if d.parent == d:
                break
            d = d.parent
        directory.mkdir(parents=True, exist_ok=True)
        state.created_dirs.extend(reversed(missing))

    def _write(self, state: _State, data: pa.Table) -> None:
        part = self._part(state, (), data.schema)
        self._write_part(part, data)
        part.rows += data.num_rows

    def _part(self, state: _State, key: tuple[str, ...], schema: pa.Schema) -> _Part:
        part = state.open_parts.get(key)
        if part is not None:
            state.open_parts.move_to_end(key)
            return part
        if len(state.open_parts) >= MAX_OPEN_PARTITIONS:
            self._finish(state, next(iter(state.open_parts)))
        return self._new_part(state, key, schema)

    def _new_part(self, state: _State, key: tuple[str, ...], schema: pa.Schema) -> _Part:
        run_id = state.ctx.run_id
        if state.single:
            final = state.root
        else:
            directory = state.directory.joinpath(*key)
            self._mkdirs(state, directory)
            final = directory / f"part-{run_id}-{state.seq:05d}.{self.ext}"
            state.seq += 1
        tmp = temporary_name(final, state.ctx.pipeline, run_id)
        part = _Part(tmp, final, open(tmp, "wb"))  # noqa: SIM115 - closed in _finish/abort
        state.open_parts[key] = part
        part.writer = self._start_part(part, schema)
        return part

    def _finish(self, state: _State, key: tuple[str, ...]) -> None:
        part = state.open_parts.pop(key)
        self._flush(part)
        if part.writer is not None:
            part.writer.close()
            part.writer = None
        part.fh.flush()
        os.fsync(part.fh.fileno())
        part.fh.close()
        state.finished.append(part)

    def _start_part(self, part: _Part, schema: pa.Schema) -> Any:
        return None

    def _write_part(self, part: _Part, data: pa.Table) -> None:
        raise NotImplementedError

    def _flush(self, part: _Part) -> None:
        """Write what a part has buffered (writers that buffer override :meth:`_append_part`)."""
        if part.buffer:
            data = pa.concat_tables(part.buffer) if len(part.buffer) > 1 else part.buffer[0]
            part.buffer, part.buffered_rows, part.buffered_bytes = [], 0, 0
            self._write_part(part, data)


ROW_GROUP_ROWS = 1 << 20
ROW_GROUP_BYTES = 64 << 20
BUFFER_BYTES = 256 << 20


class ParquetWriter(_FileWriter):
    """Parquet output: compression as configured, optional hive partitioning, ``rows_per_file``.

    Batches are gathered into row groups of up to ~1M rows or 64 MiB (at most 256 MiB buffered
    over all open files), which makes smaller files that read faster than one row group per batch.

    With ``partition_by`` the layout is ``col=value/.../part-{run_id}-{seq}.parquet``: the
    partition columns are not stored in the files, values are percent-encoded (what pyarrow's
    ``partitioning="hive"`` decodes) and null or empty values become ``__HIVE_DEFAULT_PARTITION__``.
    In single-file mode (``path`` ends in ``.parquet``) ``rows_per_file`` does not apply.
    """

    ext = "parquet"
    config: ParquetSink

    def __init__(self, config: ParquetSink) -> None:
        super().__init__(config)

    def _check(self, state: _State) -> None:
        if state.single and self.config.partition_by:
            raise SinkError(
                self.step_id,
                f"partition_by needs a directory path, got the single file {self.config.path!r}",
                fix="remove the .parquet extension from path, or remove partition_by",
            )

    def _start_part(self, part: _Part, schema: pa.Schema) -> Any:
        compression = None if self.config.compression == "none" else self.config.compression
        level = self.config.compression_level
        if level is None and compression == "zstd":
            level = 1
        return pq.ParquetWriter(part.fh, schema, compression=compression, compression_level=level)

    def _write_part(self, part: _Part, data: pa.Table) -> None:
        part.writer.write_table(data, row_group_size=max(1, data.num_rows))  # one group per flush

    def _write(self, state: _State, data: pa.Table) -> None:
        by = self.config.partition_by
        if not by:
            self._append(state, (), data)
            return
        missing = [c for c in by if c not in data.column_names]
        if missing or len(by) >= data.num_columns:
            raise SinkError(
                self.step_id,
                f"partition columns {missing or by} cannot be used with {data.column_names}",
                fix="partition_by must name existing columns and leave at least one data column",
            )
        for key, sub in _split_partitions(data, by):
            self._append(state, key, sub)

    def _append(self, state: _State, key: tuple[str, ...], data: pa.Table) -> None:
        limit = None if state.single else self.config.rows_per_file
        offset = 0
        while offset < data.num_rows:
            part = self._part(state, key, data.schema)
            take = data.num_rows - offset
            if limit is not None:
                take = min(take, limit - part.rows)
            self._buffer(state, part, data.slice(offset, take))
            part.rows += take
            offset += take
            if limit is not None and part.rows >= limit:
                self._finish(state, key)

    def _buffer(self, state: _State, part: _Part, data: pa.Table) -> None:
        """Collect batches into row groups of up to ROW_GROUP_ROWS rows / ROW_GROUP_BYTES bytes:
        one row group per small batch would make bigger, slower files. All parts together
        buffer at most BUFFER_BYTES; past that the fullest buffers are written first."""
        part.buffer.append(data)
        part.buffered_rows += data.num_rows
        part.buffered_bytes += data.nbytes
        if part.buffered_rows >= ROW_GROUP_ROWS or part.buffered_bytes >= ROW_GROUP_BYTES:
            self._flush(part)
        total = sum(p.buffered_bytes for p in state.open_parts.values())
        if total > BUFFER_BYTES:
            for p in sorted(state.open_parts.values(), key=lambda p: -p.buffered_bytes):
                total -= p.buffered_bytes
                self._flush(p)
                if total <= BUFFER_BYTES // 2:
                    break


def _hive_values(column: pa.ChunkedArray | pa.Array, name: str) -> list[str]:
    strings = pc.cast(column, pa.string()).to_pylist()
    return [
        f"{name}={HIVE_NULL if s is None or s == '' else urllib.parse.quote(s, safe='')}"
        for s in strings
    ]


def _split_partitions(data: pa.Table, by: list[str]) -> list[tuple[tuple[str, ...], pa.Table]]:
    """Split ``data`` by the values of ``by`` (vectorized group-by; one loop step per partition)."""
    idx = pa.array(np.arange(data.num_rows, dtype=np.int64))
    grouped = (
        data.select(by)
        .append_column("__sluice_idx", idx)
        .group_by(by, use_threads=False)
        .aggregate([("__sluice_idx", "list")])
    )
    names = [_hive_values(grouped.column(c), urllib.parse.quote(c, safe="")) for c in by]
    rest = data.drop_columns(by)
    lists = grouped.column("__sluice_idx_list")
    out = []
    for i in range(grouped.num_rows):
        rows = lists[i].values
        out.append((tuple(n[i] for n in names), rest.take(rows)))
    return out


class CsvWriter(_FileWriter):
    """CSV output (pyarrow's CSV writer): configured delimiter, header once per file."""

    ext = "csv"
    config: CsvSink

    def __init__(self, config: CsvSink) -> None:
        super().__init__(config)

    def _start_part(self, part: _Part, schema: pa.Schema) -> Any:
        options = pa_csv.WriteOptions(
            include_header=self.config.header, delimiter=self.config.delimiter
        )
        return pa_csv.CSVWriter(part.fh, schema, write_options=options)

    def _write_part(self, part: _Part, data: pa.Table) -> None:
        part.writer.write_table(data)


class JsonlWriter(_FileWriter):
    """JSON lines output, one object per row, written with polars (vectorized).

    Dates, timestamps and decimals are written as strings (ISO 8601 / exact decimal text),
    binary values as hex strings.
    """

    ext = "jsonl"
    config: JsonlSink

    def __init__(self, config: JsonlSink) -> None:
        super().__init__(config)

    def _write_part(self, part: _Part, data: pa.Table) -> None:
        if data.num_columns == 0:
            part.fh.write(b"{}\n" * data.num_rows)
            return
        df = pl.from_arrow(data)
        assert isinstance(df, pl.DataFrame)
        fix = []
        for name, dtype in df.schema.items():
            if isinstance(dtype, pl.Decimal):
                fix.append(pl.col(name).cast(pl.String))
            elif isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
                fix.append(pl.col(name).dt.to_string("%Y-%m-%dT%H:%M:%S%.f"))
            elif dtype == pl.Binary:
                fix.append(pl.col(name).bin.encode("hex"))
        if fix:
            df = df.with_columns(fix)
        df.write_ndjson(part.fh)


# --------------------------------------------------------------------- output-level file helpers

#: temporary files of stream epochs (``.part-e<epoch>-...tmp``): a batch run never touches them
STREAM_TMP = re.compile(r"^\.part-e\d{9}-.*\.tmp$")


def output_dirs(directory: Path, partition_by: Sequence[str] = ()) -> list[Path]:
    """The folders of a folder output that hold its part files: the folder itself and, with
    ``partition_by``, its hive partition folders (``<col>=<value>/...``, one level per partition
    column, in that order). Any other subfolder (another output nested inside, a user's folder)
    is not part of the output."""
    if not directory.is_dir():
        return []
    dirs = [directory]
    level = [directory]
    for col in partition_by:
        prefix = urllib.parse.quote(col, safe="") + "="
        level = [
            d
            for parent in level
            for d in parent.iterdir()
            if d.name.startswith(prefix) and d.is_dir() and not d.is_symlink()
        ]
        if not level:
            break
    else:
        if partition_by:
            dirs.extend(level)
    return sorted(dirs)


def output_parts(directory: Path, ext: str, partition_by: Sequence[str] = ()) -> list[Path]:
    """The part files (``part-*.<ext>``, any run) of a folder output: in the folder itself and
    in its partition folders (see :func:`output_dirs`)."""
    return sorted(
        p
        for d in output_dirs(directory, partition_by)
        for p in d.glob(f"part-*.{ext}")
        if p.is_file()
    )


def existing_output(
    root: Path, ext: str, *, single: bool, partition_by: Sequence[str] = ()
) -> list[Path]:
    """What ``mode: error_if_exists`` refuses: the file, or the folder's part files."""
    if single:
        return [root] if root.exists() else []
    return output_parts(root, ext, partition_by)


def remove_temporaries(dirs: Iterable[Path], pattern: str, pipeline: str) -> list[Path]:
    """Delete the hidden temporary files that killed batch runs of ``pipeline`` left in
    ``dirs``: those of a final name matching ``pattern`` (a glob) that name ``pipeline`` as
    their owner (:func:`temporary_name`). Another pipeline's temporary files (it may be
    writing right now) and those of a stream's epochs are never touched. The caller holds
    the pipeline's lock (its state store), so no run of ``pipeline`` is writing them. Returns
    what was deleted."""
    removed: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            continue
        for path in d.glob(f".{pattern}.{pipeline}.*.tmp"):
            if STREAM_TMP.match(path.name) or temporary_owner(path.name) != pipeline:
                continue
            if not path.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def replace_output(
    directory: Path,
    ext: str,
    keep: set[Path],
    *,
    partitions: bool = False,
    partition_by: Sequence[str] = (),
) -> set[Path]:
    """``mode: overwrite`` at publish: delete every part file of the folder output (see
    :func:`output_parts`) that is not in ``keep`` (the run's own parts, already renamed into
    place) — with ``partitions`` only in the partition folders that hold a part of ``keep`` —
    and the partition folders left empty. Idempotent. Returns the folders that changed (to
    fsync)."""
    changed: set[Path] = set()
    if partitions:
        scopes = {p.parent for p in keep}
        old = [p for d in scopes if d.is_dir() for p in d.glob(f"part-*.{ext}") if p.is_file()]
    else:
        old = output_parts(directory, ext, partition_by)
    for path in old:
        if path not in keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            changed.add(path.parent)
    if not partitions:
        for d in sorted(changed, key=lambda p: len(p.parts), reverse=True):
            while d != directory and d.is_relative_to(directory):
                try:
                    d.rmdir()  # only when empty
                except OSError:
                    break
                changed.add(d.parent)
                d = d.parent
    return {d for d in changed if d.exists()}
