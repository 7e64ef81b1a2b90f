"""Batches and dead letters: what flows between sources, steps and sinks.

A batch is a ``pyarrow.Table``. Hidden *position columns* ride along with the user's columns
so that a row can be traced back to where it came from, whichever step rejects it later:

* ``__sluice_source`` (int32): the interned id of the file (or topic/stream) the row came from;
  :func:`source_name` turns it back into the name (ids are process-wide, see :func:`source_id`)
* ``__sluice_row`` (int64): the 0-based record number inside that source
* ``__sluice_line`` (int64, optional): the 1-based line where the record starts, for readers of
  line-oriented formats that know it (:func:`with_positions` ``lines=``). It costs 8 bytes per
  row, so a reader adds it only where it has the number anyway; when it is absent, letters of
  later steps have ``line`` null.

Steps keep them when they keep whole rows (filter, derive, select, cast, ...); a row-wise ``sql``
statement carries them through (it never sees them: ``SELECT *`` does not return them); rows made
from many rows (aggregates, window results) have none. :data:`POSITION_COLS` are the two every
source adds, :data:`HIDDEN_COLS` all three (what a step must not take for data). Sinks never write
them (:func:`strip_positions`); :func:`rows_dead_letters` turns them into the letter's ``source``,
``position`` and ``line``.

Between steps a batch is a *frame*: a ``pyarrow.Table`` or a ``polars.DataFrame``. Sources
produce Arrow tables; Polars-based steps hand DataFrames to the next step as they are, so a chain
of Polars steps converts nothing; sinks always receive Arrow (the executor converts, in the sink's
thread). Use :func:`as_polars`, :func:`as_arrow` and :func:`frame_rows` to handle either.

Dead letters are an Arrow table with :data:`DEAD_LETTER_SCHEMA`; build them with
:func:`dead_letters` (vectorized) and never as a Python loop over a big batch.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Sequence
from typing import Final, TypeAlias

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

SOURCE_COL: Final = "__sluice_source"
ROW_COL: Final = "__sluice_row"
LINE_COL: Final = "__sluice_line"
#: the position columns every source adds
POSITION_COLS: Final = (SOURCE_COL, ROW_COL)
#: every hidden column a batch may carry (the position columns and the optional line column):
#: never written by a sink, never a data column for a step
HIDDEN_COLS: Final = (SOURCE_COL, ROW_COL, LINE_COL)

#: Reason codes a dead letter may carry. Connectors may add their own; these are the common ones.
REASONS: Final = {
    "parse_error": "the record could not be parsed (malformed CSV/JSON/XML)",
    "column_count": "a CSV row has a different number of fields than the header",
    "encoding": "bytes that are not valid in the declared encoding",
    "cast_error": "a value cannot be converted to the declared type",
    "corrupt_file": "a whole file could not be read (corrupt or truncated)",
    "file_unreadable": "a file matched the path but could not be opened or read (vanished, no "
    "permission, not a regular file)",
    "too_large": "a record (or a file, or its decompressed bytes) is larger than the configured "
    "limit; the reader went on with the next record",
    "line_too_long": "a CSV line is longer than max_line_bytes",
    "unquoted_value": "a quote character inside an unquoted CSV field (strict quotes)",
    "truncated": "the input ended inside a record (an unterminated quoted field or object)",
    "missing_column": "a column the source's schema declares is not in the file's header (the "
    "message names the closest one); the file is not read",
    "expression_error": "an expression failed on this record",
    "join_unmatched": "no matching row in the reference table",
    "contract_violation": "the record failed data-contract checks (the message lists each one)",
    "sink_rejected": "the sink refused the record after retries",
    "step_error": "a step failed on this record's values (stream mode isolates the record)",
    "late": "the record's event time is behind the watermark: its window was already closed",
    "missing_file": "a watched file vanished before it could be read",
    "replay_error": "a dead letter that cannot be replayed: its payload cannot be parsed back, "
    "or its PII values were redacted when it was written",
}

DEAD_LETTER_SCHEMA: Final = pa.schema(
    [
        pa.field("pipeline", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("step_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string()),
        pa.field("source", pa.string()),
        pa.field("position", pa.int64()),
        pa.field("line", pa.int64()),
        pa.field("payload", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

_EMPTY_DL = DEAD_LETTER_SCHEMA.empty_table()

Frame: TypeAlias = "pa.Table | pl.DataFrame"


def frame_rows(frame: Frame) -> int:
    return frame.num_rows if isinstance(frame, pa.Table) else frame.height


def column_names(frame: Frame) -> list[str]:
    return list(frame.columns) if isinstance(frame, pl.DataFrame) else list(frame.column_names)


def as_arrow(frame: Frame) -> pa.Table:
    return frame if isinstance(frame, pa.Table) else frame.to_arrow()


def as_polars(frame: Frame) -> pl.DataFrame:
    if isinstance(frame, pl.DataFrame):
        return frame
    df = pl.from_arrow(frame, rechunk=False)
    assert isinstance(df, pl.DataFrame)
    return df


def empty_dead_letters() -> pa.Table:
    return _EMPTY_DL


def _as_array(value: object, n: int, typ: pa.DataType) -> pa.Array:
    if isinstance(value, pa.ChunkedArray):
        value = value.combine_chunks()
    if isinstance(value, pa.Array):
        if value.type != typ:
            value = pc.cast(value, typ)
        return value
    if isinstance(value, (list, tuple)):
        return pa.array(value, type=typ)
    return pa.array([value] * n, type=typ) if n else pa.array([], type=typ)


def dead_letters(
    *,
    step_id: str,
    reason: str,
    message: object,
    payload: object,
    n: int | None = None,
    source: object = None,
    position: object = None,
    line: object = None,
) -> pa.Table:
    """Build a dead-letter table. Each argument is a scalar (repeated) or an array of length n.

    ``pipeline`` and ``run_id`` are filled in by the executor when the letters are written.
    """
    if n is None:
        for v in (payload, message, source, position, line):
            if isinstance(v, (pa.Array, pa.ChunkedArray, list, tuple)):
                n = len(v)
                break
        else:
            n = 1
    now = dt.datetime.now(dt.UTC)
    cols = {
        "pipeline": pa.nulls(n, pa.string()),
        "run_id": pa.nulls(n, pa.string()),
        "step_id": _as_array(step_id, n, pa.string()),
        "reason": _as_array(reason, n, pa.string()),
        "message": _as_array(message, n, pa.string()),
        "source": _as_array(source, n, pa.string()),
        "position": _as_array(position, n, pa.int64()),
        "line": _as_array(line, n, pa.int64()),
        "payload": _as_array(payload, n, pa.string()),
        "created_at": _as_array(now, n, pa.timestamp("us", tz="UTC")),
    }
    return pa.Table.from_pydict(cols, schema=DEAD_LETTER_SCHEMA)


def rows_as_json(table: pa.Table) -> pa.Array:
    """Serialize each row (without position columns) to a JSON object string, vectorized.

    Numbers, strings, booleans and lists/structs of them stay JSON values; decimals, dates and
    times are rendered as text, binaries as base64. A table Polars cannot encode falls back to a
    per-row Python encoding (``str`` for anything JSON has no type for): it never raises."""
    data = strip_positions(table)
    if data.num_columns == 0:
        return pa.array(["{}"] * table.num_rows, type=pa.string())
    try:
        df = pl.from_arrow(data)
        assert isinstance(df, pl.DataFrame)
        safe = [_json_expr(c, df.schema[c]) for c in df.columns]
        out = df.select(pl.struct(safe).struct.json_encode().alias("j"))["j"]
        return out.to_arrow().cast(pa.string())
    except Exception:  # exotic or invalid values: slow, but a dead letter must never fail
        import orjson

        def text(value: object) -> object:
            if isinstance(value, bytes):
                import base64

                return base64.b64encode(value).decode()
            return str(value)

        rows = data.to_pylist()
        return pa.array(
            [orjson.dumps(r, default=text, option=orjson.OPT_NON_STR_KEYS).decode() for r in rows],
            pa.string(),
        )


def _json_expr(name: str, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(name)
    if _json_native(dtype) or _json_nested(dtype):
        return col
    if dtype == pl.Binary:
        return col.bin.encode("base64")
    return col.cast(pl.String)


def _json_native(dtype: pl.DataType) -> bool:
    return (dtype.is_numeric() and not isinstance(dtype, pl.Decimal)) or dtype in (
        pl.String,
        pl.Boolean,
    )


def _json_nested(dtype: pl.DataType) -> bool:
    if isinstance(dtype, (pl.List, pl.Array)):
        inner = dtype.inner
        return isinstance(inner, pl.DataType) and (_json_native(inner) or _json_nested(inner))
    if isinstance(dtype, pl.Struct):
        return all(
            isinstance(f.dtype, pl.DataType) and (_json_native(f.dtype) or _json_nested(f.dtype))
            for f in dtype.fields
        )
    return False


def rows_dead_letters(frame: Frame, *, step_id: str, reason: str, message: object) -> pa.Table:
    """Dead letters for rows of ``frame``: payload = the row as JSON, position from the row."""
    table = as_arrow(frame)
    n = table.num_rows
    if n == 0:
        return _EMPTY_DL
    names = table.column_names
    source = source_names(table.column(SOURCE_COL)) if SOURCE_COL in names else None
    position = table.column(ROW_COL) if ROW_COL in names else None
    line = table.column(LINE_COL) if LINE_COL in names else None
    return dead_letters(
        step_id=step_id,
        reason=reason,
        message=message,
        payload=rows_as_json(table),
        n=n,
        source=source,
        position=position,
        line=line,
    )


_SOURCE_IDS: dict[str, int] = {}
_SOURCE_NAMES: list[str] = []
_SOURCE_LOCK = threading.Lock()


def source_id(name: str) -> int:
    """Intern a source name (file path, topic...) and return its process-wide id."""
    with _SOURCE_LOCK:
        sid = _SOURCE_IDS.get(name)
        if sid is None:
            sid = _SOURCE_IDS[name] = len(_SOURCE_NAMES)
            _SOURCE_NAMES.append(name)
        return sid


def source_names(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Map interned source ids back to their names, vectorized."""
    with _SOURCE_LOCK:
        names = pa.array(list(_SOURCE_NAMES), pa.string())
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    return pc.take(names, ids)


def with_positions(
    table: pa.Table,
    source: str,
    first_row: int,
    lines: pa.Array | pa.ChunkedArray | np.ndarray | None = None,
) -> pa.Table:
    """Append the position columns to a freshly read table; ``lines`` (1-based line of each
    record, optional) adds the line column."""
    n = table.num_rows
    src = pa.array(np.full(n, source_id(source), dtype=np.int32))
    rows = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    out = table.append_column(SOURCE_COL, src).append_column(ROW_COL, rows)
    if lines is not None:
        line_col = lines if isinstance(lines, (pa.Array, pa.ChunkedArray)) else pa.array(lines)
        out = out.append_column(LINE_COL, pc.cast(line_col, pa.int64()))
    return out


def strip_positions(table: pa.Table) -> pa.Table:
    """Drop the hidden columns (sinks call this before writing)."""
    drop = [c for c in HIDDEN_COLS if c in table.column_names]
    return table.drop_columns(drop) if drop else table


def concat(frames: Sequence[Frame]) -> Frame:
    """Concatenate frames, in order, whose schemas may differ in column order or missing columns.

    Arrow tables stay Arrow (no copy); as soon as one is a Polars DataFrame the result is Polars.
    """
    kept = [f for f in frames if (f.width if isinstance(f, pl.DataFrame) else f.num_columns)]
    if not kept:
        return pa.table({})
    if len(kept) == 1:
        return kept[0]
    if all(isinstance(f, pa.Table) for f in kept):
        table: pa.Table = pa.concat_tables(kept, promote_options="permissive")
        return table
    return pl.concat([as_polars(f) for f in kept], how="diagonal_relaxed")


REDACTED: Final = "<redacted>"

# A quoted literal: '...', "..." or `...`, opened and closed at a word boundary (so that the
# apostrophe of "can't" opens nothing).
_QUOTED = re.compile(r"""(?<![\w'"`])(['"`])([^\n]*?)\1(?![\w])""")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# the raw row that pyarrow's CSV parser appends after "got N:", DuckDB after "Original Line:"
_RAW_TAIL = re.compile(r"((?:columns?, got \d+|Original Line)\s*:)[ \t]*\S.*")
# type names inside quotes stay readable: `str`, `i64`, 'INT32', "timestamp[us]"...
_TYPE_WORD = re.compile(
    r"(?i)^(u?int\d*|[iuf]\d+|float\d*|double|real|str|string|utf-?8|varchar|text|large_string"
    r"|bool(ean)?|date\d*|time\w*|timestamp.*|decimal.*|binary|blob|null|list.*|struct.*|json"
    r"|bigint|smallint|tinyint|hugeint|integer|number|object|array|categorical|enum)$"
)
_SEPARATORS = re.compile(r"[,;\t|\r\n]")


def redact_text(
    message: str, *, keep: frozenset[str] | set[str] = frozenset(), values: Sequence[str] = ()
) -> str:
    """Remove record values from an error or dead-letter message: the one function every
    message of a pipeline that declares PII goes through (see
    :class:`sluice.runtime.redact.Redactor`).

    * ``values`` (the record's own values, e.g. the fields of the dead letter's payload) are
      replaced wherever they occur, longest first (values shorter than 3 characters are left:
      they would tear words apart and cannot identify anyone alone);
    * every quoted literal (``'...'``, ``"..."``, ```...```) becomes ``'<redacted>'`` unless it
      is a name in ``keep`` (column names, step ids) or a type name;
    * the raw row that parsers append to their messages (pyarrow after ``got N:``, DuckDB
      after ``Original Line:``) and e-mail addresses are removed.
    """
    for v in sorted({v for v in values if len(v) >= 3}, key=len, reverse=True):
        message = message.replace(v, REDACTED)

    def quoted(m: re.Match[str]) -> str:
        inner = m.group(2)
        if inner in keep or inner == REDACTED or _TYPE_WORD.match(inner):
            return m.group(0)
        return f"{m.group(1)}{REDACTED}{m.group(1)}"

    message = _QUOTED.sub(quoted, message)
    message = _RAW_TAIL.sub(lambda m: f"{m.group(1)} {REDACTED}", message)
    return _EMAIL.sub(REDACTED, message)


def _payload_values(obj: object) -> list[str]:
    """Every scalar value in a parsed JSON payload, as text."""
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _payload_values(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _payload_values(x)]
    if obj is None or isinstance(obj, bool):
        return []
    return [str(obj)]


def mask_pii(
    dead: pa.Table,
    fields: set[str],
    *,
    trusted_steps: frozenset[str] | set[str] = frozenset(),
    keep: frozenset[str] | set[str] = frozenset(),
) -> pa.Table:
    """Remove PII from dead letters before they are written (the pipeline declares ``fields``).

    * a payload holding a JSON object: the PII keys get the value ``<redacted>``;
    * any other payload (a raw CSV line, a JSON line that did not parse): it cannot be taken
      apart safely, so the whole payload is redacted (such letters cannot be replayed);
    * the message of a letter from any step but a contract step (``trusted_steps``: they never
      put PII values in their messages) goes through :func:`redact_text` with the values of
      its own record, so third-party messages ("Could not convert string 'x@y.z'", "Failing
      row contains (...)", a parser quoting the raw line) keep their words and column names
      (``keep``) but lose every value.
    """
    import orjson

    payloads = dead.column("payload").to_pylist()
    messages = dead.column("message").to_pylist()
    steps = dead.column("step_id").to_pylist()
    keep = set(keep) | fields
    out_p: list[str | None] = []
    out_m: list[str | None] = []
    for payload, message, step in zip(payloads, messages, steps, strict=True):
        values: list[str] = []
        if payload is not None:
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                values = _payload_values(obj)
                for key in fields & obj.keys():
                    obj[key] = REDACTED
                payload = orjson.dumps(obj).decode()
            else:
                values = [payload, *(p.strip() for p in _SEPARATORS.split(payload))]
                payload = f"{REDACTED} (raw record; the pipeline declares PII fields)"
        if message and step not in trusted_steps:
            message = redact_text(message, keep=keep, values=values)
        out_p.append(payload)
        out_m.append(message)
    dead = dead.set_column(
        dead.schema.get_field_index("payload"), "payload", pa.array(out_p, pa.string())
    )
    return dead.set_column(
        dead.schema.get_field_index("message"), "message", pa.array(out_m, pa.string())
    )
