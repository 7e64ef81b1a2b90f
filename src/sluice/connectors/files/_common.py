"""Shared machinery of the file readers: glob expansion, the per-file loop, explicit schemas.

Every reader subclasses :class:`FileReader` and implements :meth:`FileReader._read_file`, a
generator of :class:`~sluice.plugins.Chunk` for one file. The base class

* expands ``config.path`` (a file or a glob) at :meth:`~FileReader.open`, sorted, and raises
  :class:`~sluice.errors.SourceError` when nothing matches (the run would be pointless);
* runs the files in order; an unexpected exception while reading one file becomes one dead letter
  (reason ``corrupt_file``, payload null, ``source`` = the file) and the run goes on with the next;
* makes ``bytes_read`` of one file's chunks add up to the file's size, so a progress bar driven by
  :meth:`~FileReader.size_hint` reaches 100 %.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from sluice.batch import (
    ROW_COL,
    SOURCE_COL,
    dead_letters,
    empty_dead_letters,
    rows_as_json,
    source_names,
)
from sluice.connectors.files._bytes import (
    ByteLimits,
    FileUnreadable,
    InputError,
    Oversize,
    open_input,
)
from sluice.errors import SourceError
from sluice.plugins import Chunk, RunContext
from sluice.types import parse_type

#: Rows per emitted batch for readers that build tables from Python objects (JSON, XML).
OBJECT_BATCH_ROWS = 65_536

#: Maximum payload kept in a dead letter for a whole-document failure.
MAX_PAYLOAD = 64 * 1024


# --------------------------------------------------------------------------------------- paths


def unreadable(exc: OSError) -> FileUnreadable:
    """An OSError met while opening or reading a file, as a ``file_unreadable`` problem."""
    if isinstance(exc, FileUnreadable):
        return exc
    where = f" {exc.filename}" if exc.filename else ""
    problem = FileUnreadable(f"cannot read{where}: {exc.strerror or exc}")
    problem.__cause__ = exc
    return problem


def expand_paths(pattern: str, *, ctx: RunContext | None, step_id: str) -> list[Path]:
    """Expand a file path or glob to a sorted list of files.

    Raises :class:`SourceError` (naming the step, the pattern and a fix) when a glob matches no
    file, or a plain path does not exist / is not a file.
    """
    resolved = ctx.resolve(pattern) if ctx is not None else Path(pattern).expanduser()
    text = str(resolved)
    where = f" (relative paths are resolved against {ctx.base_dir})" if ctx is not None else ""
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p))
        if not files:
            raise SourceError(
                step_id,
                f"no file matches the pattern {pattern!r} (looked for {text})",
                fix=f"check the path and the pattern{where}",
            )
        return files
    if not resolved.exists():
        raise SourceError(
            step_id,
            f"file {pattern!r} does not exist (looked for {text})",
            fix=f"check the path{where}",
        )
    if not resolved.is_file():
        raise SourceError(
            step_id,
            f"{pattern!r} is not a file (looked for {text})",
            fix="name a file, or use a glob such as 'folder/*.ext'",
        )
    return [resolved]


# ------------------------------------------------------------------------------------ the reader


@dataclass
class FileState:
    """What the per-file loop knows about the file being read (readers update ``rows``)."""

    path: Path
    size: int
    rows: int = 0  # data rows already emitted from this file

    @property
    def source(self) -> str:
        return str(self.path)


class FileReader:
    """Base class of the file readers: open / size_hint / close and the per-file loop."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.step_id: str = config.id
        self._ctx: RunContext | None = None
        self._files: list[Path] = []
        self._types: dict[str, pa.DataType] = {
            name: parse_type(t) for name, t in (config.columns or {}).items()
        }

    # -- Source protocol -------------------------------------------------------------------

    def open(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self._files = expand_paths(self.config.path, ctx=ctx, step_id=self.step_id)

    def size_hint(self) -> int | None:
        if not self._files:
            return None
        total = 0
        for p in self._files:
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def close(self) -> None:
        self._files = []

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def read(self) -> Iterator[Chunk]:
        if self._ctx is None:
            self.open(RunContext(pipeline="", run_id=""))
        for path in list(self._files):
            yield from self._read_one(path)

    # -- per file ----------------------------------------------------------------------------

    def _read_one(self, path: Path) -> Iterator[Chunk]:
        try:
            size = path.stat().st_size
        except OSError as exc:  # vanished between the glob and now: never "zero rows"
            yield Chunk(dead=self._input_error(FileState(path=path, size=0), unreadable(exc)))
            return
        state = FileState(path=path, size=size)
        reported = 0
        pending: Chunk | None = None  # held back one step so the last chunk can carry the rest
        try:
            for chunk in self._read_file(path, state):
                if (
                    chunk.table is None
                    and chunk.dead is None
                    and not chunk.bytes_read
                    and not chunk.skipped
                ):
                    continue
                if pending is not None:
                    reported += pending.bytes_read
                    yield pending
                pending = chunk
        except Exception as exc:  # one bad file must not stop the run
            if pending is not None:
                reported += pending.bytes_read
                yield pending
            pending = Chunk(dead=self._input_error(state, exc))
        rest = size - reported - (pending.bytes_read if pending is not None else 0)
        if pending is not None:
            pending.bytes_read = max(0, pending.bytes_read + rest)
            yield pending
        elif rest > 0:
            yield Chunk(bytes_read=rest)

    def _input_error(self, state: FileState, exc: BaseException) -> pa.Table:
        """The dead letter for a file that failed: ``file_unreadable``, ``too_large`` or
        ``corrupt_file`` (with ``on_unreadable: fail``, an unreadable file stops the run)."""
        if isinstance(exc, OSError) and exc.errno is not None:  # the OS refused, not the format
            exc = unreadable(exc)
        reason = exc.reason if isinstance(exc, InputError) else "corrupt_file"
        if reason == "file_unreadable" and getattr(self.config, "on_unreadable", "") == "fail":
            raise SourceError(
                self.step_id,
                f"{exc}",
                fix="restore the file, or set on_unreadable: dead_letter to record it and go on",
            ) from exc
        message = str(exc) or type(exc).__name__
        if state.rows:
            message += f" ({state.rows} rows of this file were emitted before the error)"
        return dead_letters(
            step_id=self.step_id, reason=reason, message=message, payload=None, source=state.source
        )

    def corrupt_file(self, state: FileState, exc: BaseException) -> pa.Table:
        message = str(exc) or type(exc).__name__
        if state.rows:
            message += f" ({state.rows} rows of this file were emitted before the error)"
        return dead_letters(
            step_id=self.step_id,
            reason="corrupt_file",
            message=message,
            payload=None,
            source=state.source,
        )

    def open_bytes(self, path: Path, *, encoding: str | None = "utf-8") -> IO[bytes]:
        """The file's content through the byte layer (:mod:`._bytes`): decompressed, within the
        configured limits, as UTF-8 without a byte-order mark (``encoding`` = the declared
        encoding of a text format; ``None`` for the raw bytes)."""
        cfg = self.config
        limits = ByteLimits(
            max_file_bytes=getattr(cfg, "max_file_bytes", None),
            max_compression_ratio=getattr(cfg, "max_compression_ratio", 1000.0),
            max_record_bytes=getattr(cfg, "max_record_bytes", ByteLimits.max_record_bytes),
        )
        return open_input(
            path, limits=limits, compression=getattr(cfg, "compression", "auto"), encoding=encoding
        )

    def oversize_dead(self, state: FileState, item: Oversize, position: int | None) -> pa.Table:
        """The ``too_large`` dead letter for a record the byte layer skipped."""
        limit = getattr(self.config, "max_record_bytes", ByteLimits.max_record_bytes)
        return self.dead(
            state,
            "too_large",
            f"the record at line {item.line} is {item.length} bytes, more than max_record_bytes="
            f"{limit}; it was skipped and reading went on with the next record (payload: its "
            f"first {len(item.head)} bytes)",
            item.head.decode("utf-8", "replace"),
            line=item.line,
            position=position,
        )

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        raise NotImplementedError

    # -- helpers for subclasses ----------------------------------------------------------------

    def dead(
        self, state: FileState, reason: object, message: object, payload: object, **kw: Any
    ) -> pa.Table:
        return dead_letters(
            step_id=self.step_id,
            reason=reason,  # type: ignore[arg-type]  # a list of reasons is accepted too
            message=message,
            payload=payload,
            source=state.source,
            **kw,
        )

    def apply_schema(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Cast the configured ``schema`` columns; see :func:`apply_schema`."""
        return apply_schema(table, self._types, step_id=self.step_id)


# -------------------------------------------------------------------------------------- casting


def _try_cast(arr: pa.Array, typ: pa.DataType) -> pa.Array | None:
    try:
        return pc.cast(arr, typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError):
        return None


def _bad_indices(arr: pa.Array, typ: pa.DataType, offset: int, out: list[int]) -> None:
    """Append the indices of the elements of ``arr`` that do not cast to ``typ`` (bisection)."""
    if _try_cast(arr, typ) is not None:
        return
    n = len(arr)
    if n <= 16:
        for i in range(n):
            if _try_cast(arr.slice(i, 1), typ) is None:
                out.append(offset + i)
        return
    half = n // 2
    _bad_indices(arr.slice(0, half), typ, offset, out)
    _bad_indices(arr.slice(half), typ, offset + half, out)


def safe_cast(arr: pa.Array | pa.ChunkedArray, typ: pa.DataType) -> tuple[pa.Array, list[int]]:
    """Cast ``arr`` to ``typ``; values that do not cast become null and their indices are returned.

    The whole column is cast in one call when it can be (the common case); otherwise the failing
    values are found by bisection, so the cost grows with the number of bad values, not rows.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type == typ:
        return arr, []
    done = _try_cast(arr, typ)
    if done is not None:
        return done, []
    bad: list[int] = []
    _bad_indices(arr, typ, 0, bad)
    mask = _index_mask(len(arr), bad)
    cleaned = pc.if_else(mask, pa.scalar(None, arr.type), arr)
    result = _try_cast(cleaned, typ)
    if result is None:  # cannot happen unless casting is not element-wise; be safe
        return pa.nulls(len(arr), typ), list(range(len(arr)))
    return result, bad


def _index_mask(n: int, indices: list[int]) -> pa.Array:
    import numpy as np

    m = np.zeros(n, dtype=bool)
    if indices:
        m[np.asarray(indices, dtype=np.int64)] = True
    return pa.array(m)


def _value_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=str).decode()


def apply_schema(
    table: pa.Table, types: Mapping[str, pa.DataType], *, step_id: str
) -> tuple[pa.Table, pa.Table]:
    """Cast the columns named in ``types``; rows with a value that does not cast are removed.

    ``table`` carries the position columns. Returns ``(table, dead_letters)``; the dead letters
    (reason ``cast_error``) carry the row as JSON of its values before the cast and a message naming
    the column, the value and the target type. A declared column missing from ``table`` is added
    as all-null so every batch has the declared columns.
    """
    if not types:
        return table, empty_dead_letters()
    messages: dict[int, str] = {}
    original = table
    for name, typ in types.items():
        if name not in table.column_names:
            idx = _before_positions(table)
            table = table.add_column(idx, pa.field(name, typ), pa.nulls(table.num_rows, typ))
            continue
        col = table.column(name)
        if col.type == typ:
            continue
        casted, bad = safe_cast(col, typ)
        for i in bad:
            if i not in messages:
                value = _value_text(col[i].as_py())
                messages[i] = f"column {name!r}: cannot cast {value!r} to {typ}"
        table = table.set_column(table.column_names.index(name), pa.field(name, typ), casted)
    if not messages:
        return table, empty_dead_letters()
    order = sorted(messages)
    mask = _index_mask(table.num_rows, order)
    bad_rows = original.filter(mask)
    dead = _rows_dead(bad_rows, step_id, "cast_error", [messages[i] for i in order])
    return table.filter(pc.invert(mask)), dead


def _before_positions(table: pa.Table) -> int:
    names = table.column_names
    return names.index(SOURCE_COL) if SOURCE_COL in names else len(names)


def _rows_dead(rows: pa.Table, step_id: str, reason: str, messages: list[str]) -> pa.Table:
    """Dead letters for the rows of ``rows`` (which carries position columns)."""
    try:
        payload: object = rows_as_json(rows)
    except Exception:  # exotic types polars cannot encode: fall back to Python
        plain = rows.drop_columns([c for c in (SOURCE_COL, ROW_COL) if c in rows.column_names])
        payload = [orjson.dumps(r, default=str).decode() for r in plain.to_pylist()]
    source = source_names(rows.column(SOURCE_COL)) if SOURCE_COL in rows.column_names else None
    position = rows.column(ROW_COL) if ROW_COL in rows.column_names else None
    return dead_letters(
        step_id=step_id,
        reason=reason,
        message=messages,
        payload=payload,
        n=rows.num_rows,
        source=source,
        position=position,
    )


# ------------------------------------------------------------------------ tables from Python data


def _column(values: list[Any]) -> pa.Array:
    """An Arrow column from Python values: scalars keep their type; nested or mixed → JSON text."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.nulls(len(values), pa.string())
    if kinds <= {str}:
        return pa.array(values, pa.string())
    if kinds == {bool}:
        return pa.array(values, pa.bool_())
    if kinds == {int}:
        try:
            return pa.array(values, pa.int64())
        except (OverflowError, pa.ArrowInvalid):
            pass
    elif kinds <= {int, float}:
        try:
            return pa.array(values, pa.float64())
        except (OverflowError, pa.ArrowInvalid):
            pass
    return pa.array([None if v is None else json_text(v) for v in values], pa.string())


def json_text(value: Any) -> str:
    """``value`` (parsed JSON) as compact JSON text. orjson refuses to write nesting deeper than
    255 levels, which a reader accepts up to 1024: those values are written iteratively."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return _deep_json_text(value)


class _Raw(str):
    """Text already rendered (a separator or a closing bracket) on the encoder's stack."""


def _deep_json_text(value: Any) -> str:
    out: list[str] = []
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, _Raw):
            out.append(item)
        elif isinstance(item, dict):
            out.append("{")
            todo.append(_Raw("}"))
            entries = list(item.items())
            for i in range(len(entries) - 1, -1, -1):
                key, inner = entries[i]
                todo.append(inner)
                todo.append(_Raw(orjson.dumps(str(key)).decode() + ":"))
                if i:
                    todo.append(_Raw(","))
        elif isinstance(item, list):
            out.append("[")
            todo.append(_Raw("]"))
            for i in range(len(item) - 1, -1, -1):
                todo.append(item[i])
                if i:
                    todo.append(_Raw(","))
        else:
            out.append(orjson.dumps(item).decode())
    return "".join(out)


def records_to_table(records: list[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """Build a table from dicts: union of keys (first-seen order), missing keys are null.

    Column types: strings, booleans, int64, float64 (ints mixed with floats) when a column holds
    only that kind of scalar; nested values (objects, arrays), integers beyond int64 and mixed kinds
    are kept as JSON text (strings keep their JSON quotes then, so the text round-trips). With
    ``schema`` the columns it names are built with that type when every value fits it exactly:
    the values' own kind matches (a boolean never becomes 1, a number never becomes text), and the
    conversion is Arrow's safe cast (``1.5`` never becomes ``1``, an object with a field the type
    lacks is not cut down); otherwise the column is built as without ``schema``.

    ``records`` of empty objects give a table with no columns and one row per record (its row
    count is exact, but pyarrow's ``slice`` of a table without columns is not: attach the position
    columns before slicing).
    """
    names: dict[str, None] = {}
    for r in records:
        for k in r:
            if k not in names:
                names[k] = None
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    for name in names:
        values = [r.get(name) for r in records]
        arr = None
        if schema is not None and name in schema.names:
            arr = _pinned_column(values, schema.field(name).type)
        if arr is None:
            arr = _column(values)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    if not fields:  # only empty objects: rows without columns
        return pa.table({"_": pa.nulls(len(records))}).drop_columns(["_"])
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _pinned_column(values: list[Any], typ: pa.DataType) -> pa.Array | None:
    """``values`` as an array of ``typ`` when they fit it exactly (see :func:`records_to_table`),
    else ``None``."""
    try:
        natural = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        return None
    if not _fits(natural.type, typ):
        return None
    try:
        return pc.cast(natural, typ, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError):
        return None


def _fits(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether values of type ``have`` (inferred from JSON-like data) may be cast to ``want``
    without changing their kind or dropping anything (the cast itself then checks each value)."""
    t = pa.types
    if t.is_null(have) or have == want:
        return True
    if t.is_boolean(have) or t.is_boolean(want):
        return False
    if t.is_integer(have) or t.is_floating(have):
        return bool(t.is_integer(want) or t.is_floating(want))
    if t.is_string(have) or t.is_large_string(have):
        return bool(
            t.is_string(want)
            or t.is_large_string(want)
            or t.is_timestamp(want)
            or t.is_date(want)
            or t.is_time(want)
        )
    if t.is_struct(have) and t.is_struct(want):
        wanted = {want.field(i).name: want.field(i).type for i in range(want.num_fields)}
        return all(
            have.field(i).name in wanted and _fits(have.field(i).type, wanted[have.field(i).name])
            for i in range(have.num_fields)
        )
    nested = (t.is_list, t.is_large_list)
    if any(f(have) for f in nested) and any(f(want) for f in nested):
        return _fits(have.value_type, want.value_type)
    return False
