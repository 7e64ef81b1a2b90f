"""JSON readers: JSON documents (:class:`JsonReader`) and JSON lines (:class:`JsonlReader`).

Both read their bytes through the byte layer (:meth:`FileReader.open_bytes`): compressed files,
byte-order marks and UTF-16/32 are handled there, and the text reaches the parsers as UTF-8 in
which invalid bytes stay invalid (so they become ``encoding`` dead letters here).

JSON lines have a fast path (``pyarrow.json``, parallel, vectorized) and a slow path (``orjson``
line by line, for blocks with a bad line). pyarrow's reader (pyarrow 26) is more lenient than
JSON: it takes a top-level ``null`` as a row of nulls, ``NaN``/``Infinity``, two objects on one
line and invalid UTF-8; it builds invalid arrays (list offsets past their values) from lists that
start with nulls; and it kills the process with a segmentation fault on a block whose only line is
``null`` and on nesting some 7,000 levels deep. So a block reaches pyarrow only after a
vectorized scan (:func:`scan_lines`) has proved that every non-blank line starts with ``{``, the
block is valid UTF-8 and no line nests deeper than :data:`MAX_DEPTH`; after parsing, the row
count must equal the number of non-blank lines, no float may be NaN or infinite, and columns
holding lists must pass Arrow's full validation. Any doubt sends the block to the slow path,
which is the reference: the fast path accepts exactly the lines the slow path accepts (it may give
nested values Arrow types where the slow path gives JSON text).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from sluice.batch import (
    ROW_COL,
    concat,
    empty_dead_letters,
    strip_positions,
    with_positions,
)
from sluice.config.models import JsonlSource, JsonSource
from sluice.connectors.files._bytes import OVERSIZE_HEAD, Block, Oversize, line_blocks
from sluice.connectors.files._common import (
    MAX_PAYLOAD,
    OBJECT_BATCH_ROWS,
    FileReader,
    FileState,
    json_text,
    records_to_table,
)
from sluice.plugins import Chunk

_PIECE = 1 << 20  # parallel parse piece of a JSON-lines block

#: Deepest nesting of arrays/objects accepted (orjson's limit; the fast path keeps to it too).
MAX_DEPTH = 1024

#: JSON whitespace inside a line (a line of only these is blank).
_WS = b" \t\r"
_WS_CODES = np.array([0x20, 0x09, 0x0D], dtype=np.uint8)
_LBRACE = 0x7B

#: A line shorter than this cannot nest deeper than MAX_DEPTH (it needs an opener and a closer per
#: level), so only longer lines are examined.
_LONG_LINE = 2 * (MAX_DEPTH + 1)
#: ``bytes.translate`` deletes every byte but ``[`` and ``{``: what is left counts the openers.
_NOT_OPENERS = bytes(b for b in range(256) if b not in (0x5B, _LBRACE))

#: Leading whitespace bytes skipped vectorized before the per-line fallback.
_WS_STEPS = 16


def _utf8_problem(data: bytes) -> str | None:
    """What is wrong with ``data`` as UTF-8 (``None``: nothing)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : min(exc.end, exc.start + 4)]
        return (
            f"not valid UTF-8: byte(s) {bad.hex(' ').upper()} at byte {exc.start + 1} of the "
            f"record ({exc.reason})"
        )
    return None


def _valid_utf8(block: bytes) -> bool:
    """Whether ``block`` is valid UTF-8 (vectorized: ASCII test, else Arrow's validator)."""
    if block.isascii():
        return True
    offsets = pa.array([0, len(block)], pa.int64()).buffers()[1]
    arr = pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(block)])
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


# ----------------------------------------------------------------------------------- JSON lines


@dataclass(frozen=True)
class LineScan:
    """What a vectorized scan of a block of lines found."""

    lines: int  # physical lines (the last one may lack its newline)
    records: int  # non-blank lines
    safe: bool  # pyarrow may parse the block (see the module docstring)


def scan_lines(block: bytes) -> LineScan:
    """Count the lines and records of ``block`` and decide whether pyarrow may parse it.

    Vectorized with NumPy: newline positions, the first byte of each line (lines that do not
    start with ``{`` have their leading whitespace skipped in a few vector steps), the UTF-8
    check, and the nesting bound (only lines long enough to nest too deep are examined).
    """
    n = len(block)
    if n == 0:
        return LineScan(0, 0, True)
    arr = np.frombuffer(block, dtype=np.uint8)
    nl = np.flatnonzero(arr == 10)
    terminated = block[-1] == 10
    lines = len(nl) + (0 if terminated else 1)
    nxt = nl[:-1] + 1 if terminated else nl + 1  # where each line but the first starts
    blank = 0
    if block[0] != _LBRACE or not np.all(arr[nxt] == _LBRACE):
        # some line does not start with "{": blank, indented, or not an object
        starts = np.concatenate(([0], nxt))
        ends = nl if terminated else np.append(nl, n)
        head = _first_non_blank(block, arr, starts, ends)
        blank = int(np.count_nonzero(head == 10))
        if blank + int(np.count_nonzero(head == _LBRACE)) != lines:
            return LineScan(lines, lines - blank, False)
    records = lines - blank
    if not _valid_utf8(block):
        return LineScan(lines, records, False)
    if n >= _LONG_LINE and _longest(nl, n) >= _LONG_LINE:
        starts = np.concatenate(([0], nxt))
        ends = nl if terminated else np.append(nl, n)
        for i in np.flatnonzero(ends - starts >= _LONG_LINE):  # only long lines nest deep
            line = block[starts[i] : ends[i]]
            if len(line.translate(None, _NOT_OPENERS)) > MAX_DEPTH:
                try:  # orjson enforces MAX_DEPTH; a line it refuses goes to the slow path
                    orjson.loads(line)
                except orjson.JSONDecodeError:
                    return LineScan(lines, records, False)
    return LineScan(lines, records, True)


def _longest(nl: np.ndarray, n: int) -> int:
    """Length of the longest line, given the newline positions of an ``n``-byte block."""
    if len(nl) == 0:
        return n
    inner = int(np.max(np.diff(nl))) - 1 if len(nl) > 1 else 0
    return max(int(nl[0]), inner, n - 1 - int(nl[-1]))


def _first_non_blank(
    block: bytes, arr: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> np.ndarray:
    """The first byte of each line after its leading whitespace (10 for a blank line)."""
    n = len(block)
    pos = starts.copy()
    for _ in range(_WS_STEPS):  # skip leading whitespace, all lines at once
        step = (pos < ends) & np.isin(arr[np.minimum(pos, n - 1)], _WS_CODES)
        if not step.any():
            break
        pos += step
    live = pos < ends
    head = np.where(live, arr[np.minimum(pos, n - 1)], 10)
    for i in np.flatnonzero(live & np.isin(head, _WS_CODES)):  # longer indentation: rare
        rest = block[pos[i] : ends[i]].lstrip(_WS)
        head[i] = rest[0] if rest else 10
    return head


def _non_finite(column: pa.ChunkedArray) -> bool:
    """Whether a float anywhere in ``column`` (nested too) is NaN or infinite (iterative: types
    may nest a thousand levels deep)."""
    if not _has_float(column.type):
        return False
    todo: list[pa.Array] = list(column.chunks)
    while todo:
        arr = todo.pop()
        typ = arr.type
        if pa.types.is_floating(typ):
            if pc.any(pc.invert(pc.is_finite(arr))).as_py():
                return True
        elif pa.types.is_struct(typ):
            todo.extend(c for c in arr.flatten() if _has_float(c.type))
        elif pa.types.is_map(typ):
            todo.extend(c for c in (arr.keys, arr.items) if _has_float(c.type))
        elif typ.num_fields:  # list types
            values = arr.flatten()
            if _has_float(values.type):
                todo.append(values)
    return False


def _read_json(block: bytes, schema: pa.Schema | None) -> pa.Table | None:
    """``pyarrow.json.read_json`` of a vetted block: in 1 MiB pieces on its thread pool when the
    schema is given (the pieces cannot disagree on types then), else — or when that fails — in
    one piece; ``None`` when pyarrow refuses the block."""
    opts = pajson.ParseOptions(
        explicit_schema=schema, unexpected_field_behavior="infer", newlines_in_values=False
    )
    sizes = [len(block) + 1]
    if schema is not None and len(block) > 2 * _PIECE:
        sizes.insert(0, _PIECE)
    for size in sizes:
        try:
            return pajson.read_json(
                io.BytesIO(block),
                read_options=pajson.ReadOptions(block_size=size, use_threads=True),
                parse_options=opts,
            )
        except (pa.ArrowException, ValueError):
            continue
    return None


def _lists_valid(table: pa.Table) -> bool:
    """Whether every column holding lists is a valid Arrow array (full validation; columns
    without lists are not looked at)."""
    for col in table.columns:
        if _has(col.type, _is_list):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid:
                return False
    return True


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def _has(typ: pa.DataType, test: Callable[[pa.DataType], bool]) -> bool:
    """Whether ``typ`` or a type nested in it passes ``test`` (iterative: types may nest a
    thousand levels deep)."""
    todo = [typ]
    while todo:
        t = todo.pop()
        if test(t):
            return True
        todo.extend(t.field(i).type for i in range(t.num_fields))
    return False


def _has_float(typ: pa.DataType) -> bool:
    return _has(typ, pa.types.is_floating)


class JsonlReader(FileReader):
    """JSON lines: one object per line, read in blocks of ``block_size`` bytes of whole lines.

    Fast path: each block is parsed by ``pyarrow.json.read_json``, with the schema of the file's
    first block pinned for the later blocks so batches keep one schema where the data allows; a
    vectorized check before and after keeps it to what JSON allows (see the module docstring).
    When a block fails, it is parsed line by line with orjson: a malformed line, or one that is
    not an object (``null``, a number, an array...) → dead letter ``parse_error``; invalid UTF-8
    → ``encoding``; every good line of the block is still emitted, once. A line longer than
    ``max_record_bytes`` is a ``too_large`` dead letter (its first bytes as payload) and is never
    held in memory; the next line is read normally. Blank lines (spaces, tabs, CR only) are
    skipped and counted as ``skipped`` in the run report. Nesting deeper than 1024 levels is a
    ``parse_error``. In the line-by-line path nested values and mixed-type columns are JSON text
    (see :class:`JsonReader`); a value is only put in a pinned column when it fits exactly.

    Dead letters carry the file, ``position`` = the 0-based index of the record (non-blank line,
    rejected ones included; rows carry it as ``__sluice_row``) and ``line`` = the 1-based physical
    line.
    """

    def __init__(self, config: JsonlSource) -> None:
        super().__init__(config)
        self.config: JsonlSource = config

    def _blocks(self, stream: IO[bytes]) -> Iterator[Block | Oversize]:
        return line_blocks(
            stream,
            block_size=self.config.block_size,
            max_record_bytes=self.config.max_record_bytes,
        )

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        pinned: pa.Schema | None = None
        record = 0  # records before the current item
        done = 0  # bytes reported so far
        with self.open_bytes(path) as stream:
            for item in self._blocks(stream):
                if isinstance(item, Oversize):
                    dead = self.oversize_dead(state, item, record)
                    record += 1
                    consumed = min(item.offset + item.length + 1, state.size)
                    yield Chunk(dead=dead, bytes_read=max(0, consumed - done))
                    done = max(done, consumed)
                    continue
                block = item.data
                scan = scan_lines(block)
                fast = self._fast(block, pinned, scan)
                if fast is not None:
                    table, dead, n_records = fast, empty_dead_letters(), fast.num_rows
                else:
                    table, dead = self._slow(block, state, item.first_line, record, pinned)
                    n_records = table.num_rows + dead.num_rows
                if table.num_columns and pinned is None:
                    # a type holding null says nothing yet: such a field is inferred per block
                    pinned = pa.schema(
                        [
                            f
                            for f in strip_positions(table).schema
                            if not _has(f.type, pa.types.is_null)
                        ]
                    )
                data: pa.Table | None = None
                if table.num_rows:
                    # the slow path has attached the positions already
                    data = table if fast is None else with_positions(table, state.source, record)
                    data, cast_dead = self.apply_schema(data)
                    if cast_dead.num_rows:
                        dead = concat([dead, cast_dead]) if dead.num_rows else cast_dead
                    state.rows += data.num_rows
                record += n_records
                consumed = min(item.offset + len(block), state.size)
                yield Chunk(
                    table=data if data is not None and data.num_rows else None,
                    dead=dead if dead.num_rows else None,
                    bytes_read=max(0, consumed - done),
                    skipped=scan.lines - n_records,
                )
                done = max(done, consumed)

    @staticmethod
    def _fast(
        block: bytes, pinned: pa.Schema | None, scan: LineScan | None = None
    ) -> pa.Table | None:
        """Parse a block with pyarrow: in 1 MiB pieces on its thread pool when the schema is
        pinned (the pieces cannot disagree on types then), else — or when that fails — in one
        piece. ``None`` when the block must be parsed line by line: the scan found a line
        pyarrow must not see, pyarrow refused the block, or its answer is not the slow path's
        (row count, NaN/infinity)."""
        if scan is None:
            scan = scan_lines(block)
        if not scan.safe:
            return None
        if scan.records == 0:
            return pa.table({})
        table = _read_json(block, pinned)
        if table is not None and not _lists_valid(table):
            # pyarrow infers list types from a list that starts with nulls into arrays whose
            # offsets run past their values (invalid memory); given the types, it builds them
            # right: parse again with the schema it inferred
            table = _read_json(block, table.schema)
            if table is not None and not _lists_valid(table):
                return None
        if table is None or table.num_rows != scan.records:  # e.g. two objects on one line
            return None
        if any(_non_finite(col) for col in table.columns):  # NaN / Infinity tokens
            return None
        return table

    def _slow(
        self, block: bytes, state: FileState, first_line: int, record: int, pinned: pa.Schema | None
    ) -> tuple[pa.Table, pa.Table]:
        """Parse a block line by line; returns (table with positions, dead letters)."""
        good: list[dict[str, Any]] = []
        good_pos: list[int] = []
        bad_reason: list[str] = []
        bad_msg: list[str] = []
        bad_payload: list[str] = []
        bad_line: list[int] = []
        bad_pos: list[int] = []
        for i, line in enumerate(block.split(b"\n")):
            if not line.strip(_WS):
                continue
            obj: Any = None
            problem: str | None = None
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                problem = str(exc)
            else:
                if not isinstance(obj, dict):
                    problem = (
                        "a JSON-lines record must be an object, got "
                        f"{_json_kind(obj)} (the line holds {_head(line)})"
                    )
            if problem is None:
                good.append(obj)
                good_pos.append(record)
            else:
                invalid = _utf8_problem(line)
                bad_reason.append("parse_error" if invalid is None else "encoding")
                bad_msg.append(problem if invalid is None else invalid)
                bad_payload.append(line[:MAX_PAYLOAD].decode("utf-8", "replace"))
                bad_line.append(first_line + i)
                bad_pos.append(record)
            record += 1
        table = records_to_table(good, pinned)
        if good:
            table = with_positions(table, state.source, 0)
            table = table.set_column(
                table.column_names.index(ROW_COL), ROW_COL, pa.array(good_pos, pa.int64())
            )
        dead = empty_dead_letters()
        if bad_reason:
            dead = self.dead(
                state, bad_reason, bad_msg, bad_payload, line=bad_line, position=bad_pos
            )
        return table, dead


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _head(line: bytes, n: int = 40) -> str:
    text = line.strip(_WS)[:n].decode("utf-8", "replace")
    return repr(text) + ("..." if len(line.strip(_WS)) > n else "")


# ------------------------------------------------------------------------------- JSON documents


#: orjson's messages for text after a complete document (older versions: "trailing characters").
_TRAILING = ("unexpected content after document", "trailing characters")


class JsonReader(FileReader):
    """One JSON document per file (RFC 8259, parsed whole with orjson): the file is one record.

    * a top-level array of objects → one row per object; a top-level object → one row (an empty
      object is one row without columns);
    * any other top-level value, or an array holding anything but objects → one row per element
      (or one row for a scalar) with a single string column ``value`` holding the element's JSON
      text (an empty array gives no rows);
    * objects with different keys → the union of the keys, missing values null; a column whose
      values are of mixed kinds, nested objects/arrays, or integers beyond int64 → JSON text;
    * the byte layer removes a byte-order mark and decompresses (see :mod:`._bytes`).

    On bad input: a document that does not parse (including NaN/Infinity, nesting deeper than
    orjson's limit of 1024 levels) → one ``parse_error`` dead letter with orjson's message (it
    names line and column; ``line`` is that line) and the file text as payload, cut to 64 KiB
    (the message says so); a file that holds JSON lines gets a message saying to use
    ``kind: jsonl``; invalid UTF-8 → ``encoding``; a document larger than ``max_record_bytes``
    (default 1 GiB; ``max_bytes`` is its old name) → ``too_large``, read no further than the
    limit. These letters stand for the whole document: ``position`` 0. The configured ``schema``
    is applied after parsing (uncastable rows → ``cast_error`` with ``position`` = the element's
    index; ``line`` is null, as orjson does not report where an element starts).
    """

    def __init__(self, config: JsonSource) -> None:
        super().__init__(config)
        self.config: JsonSource = config

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        limit = self.config.max_record_bytes
        data = bytearray()
        with self.open_bytes(path) as stream:
            while len(data) <= limit:
                piece = stream.read(min(16 << 20, limit + 1 - len(data)))
                if not piece:
                    break
                data += piece
        if len(data) > limit:
            yield Chunk(dead=self._too_large(state, bytes(data[:OVERSIZE_HEAD]), limit))
            return
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            yield Chunk(dead=self._doc_dead(state, bytes(data), exc))
            return
        del data
        if isinstance(doc, dict):
            records: list[dict[str, Any]] = [doc]
        elif isinstance(doc, list) and all(isinstance(v, dict) for v in doc):
            records = doc
        elif isinstance(doc, list):
            records = [{"value": json_text(v)} for v in doc]
        else:
            records = [{"value": json_text(doc)}]
        del doc
        if not records:
            return
        # positions first: a table without columns must never be sliced (pyarrow then reports
        # the slice length as its row count)
        whole = with_positions(records_to_table(records), state.source, 0)
        del records
        for start in range(0, whole.num_rows, OBJECT_BATCH_ROWS):
            table, dead = self.apply_schema(whole.slice(start, OBJECT_BATCH_ROWS))
            state.rows += table.num_rows
            yield Chunk(
                table=table if table.num_rows else None, dead=dead if dead.num_rows else None
            )

    def _too_large(self, state: FileState, head: bytes, limit: int) -> pa.Table:
        return self.dead(
            state,
            "too_large",
            f"the JSON document is larger than max_record_bytes={limit} bytes (a JSON file is "
            "one record); it was not parsed. Raise max_record_bytes, or convert the file to JSON "
            f"lines (kind: jsonl). Payload: its first {len(head)} bytes",
            head.decode("utf-8", "replace"),
            position=0,
            line=1,
        )

    def _doc_dead(self, state: FileState, data: bytes, exc: orjson.JSONDecodeError) -> pa.Table:
        invalid = _utf8_problem(data)
        reason = "parse_error" if invalid is None else "encoding"
        message = str(exc)
        if invalid is not None:
            message = invalid.replace("of the record", "of the file")
        elif message.startswith(_TRAILING) and _first_line_is_object(data):
            message += (
                "; this looks like JSON lines (one object per line): use kind: jsonl for this file"
            )
        if len(data) > MAX_PAYLOAD:
            message += f" [payload truncated to the first {MAX_PAYLOAD} of {len(data)} bytes]"
        payload = data[:MAX_PAYLOAD].decode("utf-8", "replace")
        line = getattr(exc, "lineno", None)
        return self.dead(state, reason, message, payload, line=line, position=0)


def _first_line_is_object(data: bytes) -> bool:
    """Whether the first non-blank line of ``data`` is a JSON object on its own."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        line = data[start:end]
        if line.strip(_WS):
            try:
                return isinstance(orjson.loads(line), dict)
            except orjson.JSONDecodeError:
                return False
        start = end + 1
    return False
