"""CSV reader: pyarrow's streaming CSV reader, with a safe mode for files it cannot convert."""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from sluice.batch import (
    POSITION_COLS,
    ROW_COL,
    concat,
    dead_letters,
    empty_dead_letters,
    with_positions,
)
from sluice.config.models import CsvSource
from sluice.connectors.files._common import FileReader, FileState, apply_schema, safe_cast
from sluice.errors import ConfigError
from sluice.plugins import Chunk

_BAD_BYTES = "sluice.bad_bytes"
PARALLEL_PIECE = 16 << 20  # bytes per piece parsed in parallel (quote-free UTF-8 files)


def _mark_bad_bytes(exc: UnicodeError) -> tuple[str, int]:
    """Decode error handler: each undecodable byte becomes a lone surrogate U+DC00+byte.

    Encoded back with ``surrogatepass`` these are invalid UTF-8, so the row holding them is found
    by the UTF-8 check of the safe mode and dead-lettered with reason ``encoding``.
    """
    if isinstance(exc, UnicodeDecodeError):
        bad = exc.object[exc.start : exc.end]
        return "".join(chr(0xDC00 + b) for b in bad), exc.end
    raise exc


codecs.register_error(_BAD_BYTES, _mark_bad_bytes)


class _Transcoder(io.RawIOBase):
    """A readable byte stream: the file decoded from ``codec`` and re-encoded as UTF-8."""

    def __init__(self, raw: io.BufferedReader, codec: str) -> None:
        super().__init__()
        self._raw = raw
        self._decoder = codecs.getincrementaldecoder(codec)(errors=_BAD_BYTES)
        self._buf = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf and not self._eof:
            data = self._raw.read(1 << 20)
            if not data:
                self._eof = True
                text = self._decoder.decode(b"", final=True)
            else:
                text = self._decoder.decode(data)
            self._buf = text.encode("utf-8", "surrogatepass")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class _Restart(Exception):
    """Internal: the fast path cannot continue; re-read the file in safe mode."""


class CsvReader(FileReader):
    """Read CSV files with ``pyarrow.csv.open_csv`` (streaming, ``block_size`` bytes per batch).

    On bad input:

    * a row with the wrong number of fields → dead letter ``column_count`` (payload = the row text,
      message = expected vs actual count; pyarrow's streaming reader does not report line numbers,
      so ``line`` is null and ``position`` is null: such a row has no record index);
    * a value that does not fit the inferred type (inference looks at the first block only) or the
      declared ``schema`` type, or bytes that are invalid in ``encoding``: the file is re-read in
      *safe mode* — every column read as raw bytes, checked for valid text (bad → ``encoding``
      dead letter), then cast column by column to the type already decided (bad →
      ``cast_error`` dead letter, payload = the row as JSON of its raw strings). Rows already
      emitted before the switch are skipped, so nothing is lost or duplicated. A column inferred
      as all-null or as binary in the first block is read as string in safe mode;
    * anything else pyarrow cannot read → one ``corrupt_file`` dead letter for the rest of the file.

    Positions: ``__sluice_row`` is the 0-based index of the record among the rows that have the
    right number of fields (the header is not counted). An empty (0-byte) file yields nothing and is
    not an error; a file with only a header yields zero rows. With ``infer_types: false`` every
    column not declared in ``schema`` is a string.
    """

    def __init__(self, config: CsvSource) -> None:
        super().__init__(config)
        self.config: CsvSource = config
        try:
            self._codec = codecs.lookup(config.encoding).name
        except LookupError:
            raise ConfigError(
                f"unknown encoding {config.encoding!r}",
                step_id=config.id,
                field="encoding",
                fix="use a Python codec name such as utf-8, latin-1, cp1252 or utf-16",
            ) from None
        self._utf8 = self._codec in ("utf-8", "utf-8-sig")
        self._parse = dict(
            delimiter=config.delimiter,
            quote_char=config.quote if config.quote is not None else False,
            escape_char=config.escape if config.escape is not None else False,
            newlines_in_values=True,
        )

    # ---------------------------------------------------------------------------- options

    def _read_options(self, names: list[str] | None = None) -> pacsv.ReadOptions:
        cfg = self.config
        if names is not None:
            return pacsv.ReadOptions(block_size=cfg.block_size, column_names=names)
        return pacsv.ReadOptions(
            block_size=cfg.block_size,
            encoding="utf8" if self._utf8 else cfg.encoding,
            column_names=None if cfg.header else cfg.column_names,
            autogenerate_column_names=not cfg.header and not cfg.column_names,
        )

    def _parse_options(self, handler: Any) -> pacsv.ParseOptions:
        return pacsv.ParseOptions(**self._parse, invalid_row_handler=handler)

    def _convert_options(self, types: dict[str, pa.DataType]) -> pacsv.ConvertOptions:
        return pacsv.ConvertOptions(
            column_types=types, null_values=list(self.config.null_values), strings_can_be_null=True
        )

    def _first_record(self, path: Path) -> list[str] | None:
        """The first record of the file (the header), parsed by Python's csv module."""
        cfg = self.config
        with open(path, "rb") as raw:
            text = io.TextIOWrapper(raw, encoding=self._codec, errors=_BAD_BYTES, newline="")
            reader = csv.reader(
                text,
                delimiter=cfg.delimiter,
                quotechar=cfg.quote,
                escapechar=cfg.escape,
                quoting=csv.QUOTE_MINIMAL if cfg.quote is not None else csv.QUOTE_NONE,
                doublequote=True,
            )
            for rec in reader:
                if rec:
                    names = [n.encode("utf-8", "replace").decode("utf-8") for n in rec]
                    if names[0].startswith("\ufeff"):
                        names[0] = names[0][1:]
                    return names
        return None

    def _names(self, path: Path) -> list[str] | None:
        first = self._first_record(path)
        if first is None:
            return None
        cfg = self.config
        if cfg.header:
            return first
        if cfg.column_names:
            return list(cfg.column_names)
        return [f"f{i}" for i in range(len(first))]

    def _column_count_dead(self, state: FileState, rows: list[Any]) -> pa.Table:
        if not rows:
            return empty_dead_letters()
        return dead_letters(
            step_id=self.step_id,
            reason="column_count",
            message=[
                f"expected {r.expected_columns} columns, got {r.actual_columns}" for r in rows
            ],
            payload=[r.text for r in rows],
            source=state.source,
            line=[r.number for r in rows],
        )

    # ------------------------------------------------------------------------- reading

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        if state.size == 0:
            return
        cfg = self.config
        invalid: list[Any] = []
        reported_invalid = 0

        def handler(row: Any) -> str:
            invalid.append(row)
            return "skip"

        schema: pa.Schema | None = None
        types = dict(self._types)
        names: list[str] | None = None
        if not cfg.infer_types:
            names = self._names(path)
            if names is None:
                return
            types = {n: pa.string() for n in names} | types
        last = 0
        raw = pa.OSFile(str(path))
        try:
            for table, pos in self._fast_batches(path, raw, types, handler):
                if schema is None:
                    schema = table.schema
                    if any(
                        pa.types.is_binary(f.type) and f.name not in self._types for f in schema
                    ):
                        raise _Restart("invalid text in the first block")
                table = self._add_missing(table)
                table = with_positions(table, state.source, state.rows)
                dead = self._column_count_dead(state, invalid)
                reported_invalid += len(invalid)
                invalid.clear()
                state.rows += table.num_rows
                yield Chunk(
                    table=table, dead=dead if dead.num_rows else None, bytes_read=pos - last
                )
                last = pos
            dead = self._column_count_dead(state, invalid)
            if dead.num_rows:
                reported_invalid += len(invalid)
                yield Chunk(dead=dead)
            return
        except (_Restart, pa.ArrowException, UnicodeError) as exc:
            empty = isinstance(exc, pa.ArrowInvalid) and "Empty CSV file" in str(exc)
            if empty and self._first_record(path) is None:
                return
            reason = exc
        finally:
            raw.close()
        yield from self._safe_mode(path, state, schema, reported_invalid, last, reason)

    def _fast_batches(
        self, path: Path, raw: Any, types: dict[str, pa.DataType], handler: Any
    ) -> Iterator[tuple[pa.Table, int]]:
        """Tables of the file in order, with the byte offset reached after each.

        UTF-8 files are cut at newlines into pieces of ``PARALLEL_PIECE`` bytes. While a piece
        holds no quote (nor escape) character, each of its newlines ends a record, so pyarrow's
        multi-threaded ``read_csv`` parses it on all cores, with the types the first piece fixed.
        From the first piece with a quote on (a quoted field may hold a newline, so a cut there
        could split a record), the streaming reader takes over at that piece's start. A
        conversion error propagates: the caller re-reads the file in safe mode.
        """
        cfg = self.config
        special = [c.encode() for c in (cfg.quote, cfg.escape) if c is not None]
        if not self._utf8 or raw.size() < 2 * PARALLEL_PIECE:
            yield from self._stream_batches(raw, None, types, handler, 0)
            return
        names: list[str] | None = None
        offset = 0
        carry = b""
        while True:
            data = carry + raw.read(PARALLEL_PIECE)
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if len(data) > len(carry) else len(data)
            if cut == 0 or any(ch in data[:cut] for ch in special):
                raw.seek(offset)
                yield from self._stream_batches(raw, names, types, handler, offset)
                return
            piece, carry = data[:cut], data[cut:]
            read = pacsv.ReadOptions(
                use_threads=True,
                block_size=1 << 20,
                column_names=names or (None if cfg.header else cfg.column_names),
                autogenerate_column_names=names is None and not cfg.header and not cfg.column_names,
            )
            parse = pacsv.ParseOptions(
                **{**self._parse, "newlines_in_values": False}, invalid_row_handler=handler
            )
            table = pacsv.read_csv(
                pa.py_buffer(piece),
                read_options=read,
                parse_options=parse,
                convert_options=self._convert_options(types),
            )
            if names is None:
                names = table.column_names
                types = {f.name: f.type for f in table.schema}
            offset += cut
            yield table, offset

    def _stream_batches(
        self,
        raw: Any,
        names: list[str] | None,
        types: dict[str, pa.DataType],
        handler: Any,
        start: int,
    ) -> Iterator[tuple[pa.Table, int]]:
        """pyarrow's streaming reader from the current position (``names`` when not at the
        start of the file, where the header was already read)."""
        read = (
            self._read_options()
            if names is None
            else pacsv.ReadOptions(block_size=self.config.block_size, column_names=names)
        )
        reader = pacsv.open_csv(
            raw,
            read_options=read,
            parse_options=self._parse_options(handler),
            convert_options=self._convert_options(types),
        )
        for batch in reader:
            yield pa.Table.from_batches([batch]), raw.tell()

    def _add_missing(self, table: pa.Table) -> pa.Table:
        for name, typ in self._types.items():
            if name not in table.column_names:
                table = table.append_column(pa.field(name, typ), pa.nulls(table.num_rows, typ))
        return table

    def _probe_schema(self, path: Path) -> pa.Schema | None:
        cfg = self.config
        read = pacsv.ReadOptions(
            block_size=cfg.block_size,
            column_names=None if cfg.header else cfg.column_names,
            autogenerate_column_names=not cfg.header and not cfg.column_names,
        )
        try:
            with open(path, "rb") as raw:
                stream: Any = raw
                if not self._utf8:
                    stream = io.BufferedReader(_Transcoder(raw, self._codec))
                return pacsv.open_csv(
                    stream,
                    read_options=read,
                    parse_options=self._parse_options(lambda row: "skip"),
                    convert_options=self._convert_options({}),
                ).schema
        except (pa.ArrowException, UnicodeError):
            return None

    def _targets(
        self, path: Path, names: list[str], schema: pa.Schema | None
    ) -> dict[str, pa.DataType]:
        cfg = self.config
        if schema is None and cfg.infer_types:
            schema = self._probe_schema(path)
        targets: dict[str, pa.DataType] = {}
        for n in names:
            if n in self._types:
                targets[n] = self._types[n]
            elif not cfg.infer_types or schema is None or n not in schema.names:
                targets[n] = pa.string()
            else:
                t = schema.field(n).type
                targets[n] = pa.string() if pa.types.is_null(t) or pa.types.is_binary(t) else t
        return targets

    def _safe_mode(
        self,
        path: Path,
        state: FileState,
        schema: pa.Schema | None,
        skip_invalid: int,
        bytes_done: int,
        reason: BaseException,
    ) -> Iterator[Chunk]:
        names = self._names(path)
        if names is None:
            return
        targets = self._targets(path, names, schema)
        invalid: list[Any] = []
        skipped = 0

        def handler(row: Any) -> str:
            nonlocal skipped
            if skipped < skip_invalid:
                skipped += 1
            else:
                invalid.append(row)
            return "skip"

        skip_rows = state.rows
        index = 0  # record index of the first row of the next batch
        header_pending = self.config.header
        last = bytes_done
        with open(path, "rb") as raw:
            stream: Any = raw if self._utf8 else io.BufferedReader(_Transcoder(raw, self._codec))
            reader = pacsv.open_csv(
                stream,
                read_options=self._read_options(names),
                parse_options=self._parse_options(handler),
                convert_options=self._convert_options({n: pa.binary() for n in names}),
            )
            for batch in reader:
                table = pa.Table.from_batches([batch])
                if header_pending:
                    table = table.slice(1)
                    header_pending = False
                n = table.num_rows
                if index + n <= skip_rows:
                    index += n
                    table = table.slice(0, 0)
                elif index < skip_rows:
                    table = table.slice(skip_rows - index)
                    index = skip_rows
                dead = self._column_count_dead(state, invalid)
                invalid.clear()
                data = None
                if table.num_rows:
                    data, bad = self._convert(table, targets, state, index)
                    index += table.num_rows
                    state.rows += data.num_rows
                    dead = concat([dead, bad]) if bad.num_rows else dead
                pos = max(last, raw.tell())
                yield Chunk(
                    table=data if data is not None and data.num_rows else None,
                    dead=dead if dead.num_rows else None,
                    bytes_read=pos - last,
                )
                last = pos
            dead = self._column_count_dead(state, invalid)
            if dead.num_rows:
                yield Chunk(dead=dead)

    def _convert(
        self, table: pa.Table, targets: dict[str, pa.DataType], state: FileState, first_row: int
    ) -> tuple[pa.Table, pa.Table]:
        """Binary columns → checked text → target types; bad rows become dead letters."""
        table = with_positions(table, state.source, first_row)
        original = table
        bad_rows: dict[int, str] = {}
        for name in table.column_names[:-2]:
            text, bad = safe_cast(table.column(name), pa.string())
            for i in bad:
                bad_rows.setdefault(
                    i, f"column {name!r}: bytes not valid in encoding {self.config.encoding!r}"
                )
            table = table.set_column(table.column_names.index(name), name, text)
        dead = empty_dead_letters()
        if bad_rows:
            idx = sorted(bad_rows)
            mask = pc.is_in(pa.array(range(table.num_rows)), pa.array(idx))
            bad_table = original.filter(mask)
            payload = [
                orjson.dumps(
                    {
                        k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                        for k, v in row.items()
                        if k not in POSITION_COLS
                    }
                ).decode()
                for row in bad_table.to_pylist()
            ]
            dead = dead_letters(
                step_id=self.step_id,
                reason="encoding",
                message=[bad_rows[i] for i in idx],
                payload=payload,
                source=state.source,
                position=bad_table.column(ROW_COL),
            )
            table = table.filter(pc.invert(mask))
        out, cast_dead = apply_schema(table, targets, step_id=self.step_id)
        if cast_dead.num_rows:
            dead = concat([dead, cast_dead]) if dead.num_rows else cast_dead
        return out, dead
