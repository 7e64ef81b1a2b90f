"""JSON readers: JSON documents (:class:`JsonReader`) and JSON lines (:class:`JsonlReader`)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.json as pajson

from sluice.batch import concat, empty_dead_letters, strip_positions, with_positions
from sluice.config.models import JsonlSource, JsonSource
from sluice.connectors.files._common import (
    MAX_PAYLOAD,
    OBJECT_BATCH_ROWS,
    FileReader,
    FileState,
    records_to_table,
)
from sluice.plugins import Chunk

_BOM = b"\xef\xbb\xbf"
_PIECE = 1 << 20  # parallel parse piece of a JSON-lines block


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _error_reason(data: bytes, exc: Exception) -> str:
    return "parse_error" if _is_utf8(data) else "encoding"


class JsonReader(FileReader):
    """One JSON document per file (RFC 8259, parsed whole with orjson).

    * a top-level array of objects → one row per object; a top-level object → one row;
    * any other top-level value, or an array holding anything but objects → one row per element
      (or one row for a scalar) with a single string column ``value`` holding the element's JSON
      text (an empty array gives no rows);
    * objects with different keys → the union of the keys, missing values null; a column whose
      values are of mixed kinds, nested objects/arrays, or integers beyond int64 → JSON text;
    * a leading UTF-8 byte-order mark is ignored.

    On bad input: a file that does not parse (including NaN/Infinity, nesting deeper than orjson's
    limit of 1024 levels) → one ``parse_error`` dead letter with orjson's message (it names line
    and column) and the file text as payload, cut to 64 KiB (the message says so); invalid UTF-8 →
    ``encoding``; a file larger than ``max_bytes`` → ``corrupt_file`` without reading it. The
    configured ``schema`` is applied after parsing (uncastable rows → ``cast_error``).
    """

    def __init__(self, config: JsonSource) -> None:
        super().__init__(config)
        self.config: JsonSource = config

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        if state.size > self.config.max_bytes:
            yield Chunk(
                dead=self.dead(
                    state,
                    "corrupt_file",
                    f"file is {state.size} bytes, more than max_bytes={self.config.max_bytes}; "
                    "raise max_bytes or convert the file to JSON lines (kind: jsonl)",
                    None,
                )
            )
            return
        data = path.read_bytes()
        if data.startswith(_BOM):
            data = data[len(_BOM) :]
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            yield Chunk(dead=self._doc_dead(state, data, exc))
            return
        del data
        if isinstance(doc, dict):
            records: list[dict[str, Any]] = [doc]
        elif isinstance(doc, list) and all(isinstance(v, dict) for v in doc):
            records = doc
        elif isinstance(doc, list):
            records = [{"value": orjson.dumps(v).decode()} for v in doc]
        else:
            records = [{"value": orjson.dumps(doc).decode()}]
        del doc
        if not records:
            return
        whole = records_to_table(records)
        del records
        for start in range(0, whole.num_rows, OBJECT_BATCH_ROWS):
            part = with_positions(whole.slice(start, OBJECT_BATCH_ROWS), state.source, start)
            table, dead = self.apply_schema(part)
            state.rows += table.num_rows
            yield Chunk(
                table=table if table.num_rows else None, dead=dead if dead.num_rows else None
            )

    def _doc_dead(self, state: FileState, data: bytes, exc: Exception) -> pa.Table:
        reason = _error_reason(data, exc)
        message = str(exc)
        if reason == "encoding":
            message = f"the file is not valid UTF-8 ({exc})"
        if len(data) > MAX_PAYLOAD:
            message += f" [payload truncated to the first {MAX_PAYLOAD} of {len(data)} bytes]"
        payload = data[:MAX_PAYLOAD].decode("utf-8", "replace")
        line = getattr(exc, "lineno", None)
        return self.dead(state, reason, message, payload, line=line)


class JsonlReader(FileReader):
    """JSON lines: one object per line, read in blocks of ``block_size`` bytes.

    Fast path: each block (cut at a line end) is parsed by ``pyarrow.json.read_json``, with the
    schema of the file's first block pinned for the later blocks so batches keep one schema where
    the data allows. When a block fails, it is re-parsed line by line with orjson: a malformed
    line (or one that is not an object) → dead letter ``parse_error`` with its 1-based line number
    and the line as payload; invalid UTF-8 → ``encoding``; every good line of the block is still
    emitted, once. Blank lines are skipped and not counted as records. In the line-by-line path
    nested values and mixed-type columns are JSON text (see :class:`JsonReader`).

    ``__sluice_row`` is the 0-based index of the record (non-blank line) in the file.
    """

    def __init__(self, config: JsonlSource) -> None:
        super().__init__(config)
        self.config: JsonlSource = config

    def _blocks(self, path: Path) -> Iterator[bytes]:
        size = self.config.block_size
        with open(path, "rb") as f:
            rest = b""
            while True:
                data = f.read(size)
                if not data:
                    if rest:
                        yield rest
                    return
                data = rest + data
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                rest = data[cut + 1 :]
                yield data[: cut + 1]

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        pinned: pa.Schema | None = None
        line_no = 0  # lines before the current block
        record = 0  # records before the current block
        first = True
        for block in self._blocks(path):
            if first and block.startswith(_BOM):
                block = block[len(_BOM) :]
            first = False
            fast = self._fast(block, pinned)
            if fast is not None:
                table, dead, n_records = fast, empty_dead_letters(), fast.num_rows
            else:
                table, dead = self._slow(block, state, line_no, record, pinned)
                n_records = table.num_rows + dead.num_rows
            lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            if table.num_columns and pinned is None:
                pinned = pa.schema(
                    [f for f in strip_positions(table).schema if not pa.types.is_null(f.type)]
                )
            data: pa.Table | None = None
            if table.num_rows:
                # the slow path has attached the positions already
                data = table if fast is None else with_positions(table, state.source, record)
                data, cast_dead = self.apply_schema(data)
                if cast_dead.num_rows:
                    dead = concat([dead, cast_dead]) if dead.num_rows else cast_dead
                state.rows += data.num_rows
            line_no += lines
            record += n_records
            yield Chunk(
                table=data if data is not None and data.num_rows else None,
                dead=dead if dead.num_rows else None,
                bytes_read=len(block),
            )

    @staticmethod
    def _fast(block: bytes, pinned: pa.Schema | None) -> pa.Table | None:
        """Parse a block with pyarrow: in 1 MiB pieces on its thread pool when the schema is
        pinned (the pieces cannot disagree on types then), else — or when that fails — in one
        piece; ``None`` when the block has a bad line (the caller parses it line by line)."""
        opts = pajson.ParseOptions(
            explicit_schema=pinned, unexpected_field_behavior="infer", newlines_in_values=False
        )
        sizes = [len(block) + 1]
        if pinned is not None and len(block) > 2 * _PIECE:
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

    def _slow(
        self, block: bytes, state: FileState, line_no: int, record: int, pinned: pa.Schema | None
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
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except (orjson.JSONDecodeError, ValueError) as exc:
                reason = "parse_error" if _is_utf8(line) else "encoding"
                bad_reason.append(reason)
                bad_msg.append(str(exc) if reason == "parse_error" else f"invalid UTF-8 ({exc})")
                bad_payload.append(line.decode("utf-8", "replace"))
                bad_line.append(line_no + i + 1)
                bad_pos.append(record)
            else:
                good.append(obj)
                good_pos.append(record)
            record += 1
        table = records_to_table(good, pinned)
        if good:
            table = with_positions(table, state.source, 0)
            last = table.num_columns - 1
            table = table.set_column(last, table.field(last), pa.array(good_pos, pa.int64()))
        dead = empty_dead_letters()
        if bad_reason:
            dead = self.dead(
                state, bad_reason, bad_msg, bad_payload, line=bad_line, position=bad_pos
            )
        return table, dead
