"""CSV reader: records cut by a vectorized scanner, parsed by pyarrow, one verdict per record.

How a file is read:

1. **Bytes** come only from the byte layer (:meth:`FileReader.open_bytes`): decompressed,
   size-limited, UTF-8 without a byte-order mark (bytes invalid in the declared encoding arrive as
   invalid UTF-8, so the record holding them is found below).
2. **Records.** The stream is cut into blocks of whole records by :mod:`._csv_scan` (quote-aware,
   NumPy): every record gets its byte range, its 0-based position (over all records of the file,
   rejected ones included; the header, blank lines, comment lines and ``skip_rows`` lines are not
   records, they are counted as *skipped*) and the 1-based line it starts on. A record longer than
   ``max_record_bytes`` is skipped without being held in memory (``too_large``); the next one is
   read normally. pyarrow only ever sees whole records, in one block larger than any of them.
3. **Verdicts, one per record, from that record alone:** ``too_large``; ``truncated`` (the file
   ends inside a quoted field); ``unquoted_value`` (``strict_quotes``: a quote inside an unquoted
   field or text after a closing quote); ``column_count`` (another number of fields than the
   header); ``encoding`` (bytes not valid in the encoding); ``cast_error`` (a value that does not
   convert to its column's declared type). The conversion is pyarrow's CSV converter, applied to
   the value alone: the fast path converts whole blocks; when a block fails, the failing values
   are found value by value with the same converter, so a value gets the same verdict whichever
   path reads it.
4. **Types.** Declared ``schema`` types are used as given. Other columns are inferred over the
   *whole file* (with ``infer_types``): a type is kept only if every value of the file fits it,
   so inference never rejects a row. When the first block already settles every undeclared column
   as a string, or the file is a single block, this costs nothing; otherwise the file is read a
   first time for the types of the still open columns (stopping as soon as they are all strings)
   and a second time for the rows. Declare the types (or ``infer_types: false``) for one pass.
"""

from __future__ import annotations

import codecs
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from sluice.batch import ROW_COL, SOURCE_COL, rows_as_json, source_id
from sluice.config.models import CsvSource, did_you_mean
from sluice.connectors.files._bytes import OVERSIZE_HEAD, InputError, Oversize
from sluice.connectors.files._common import FileReader, FileState, safe_cast
from sluice.connectors.files._csv_scan import (
    BLANK,
    COMMENT,
    DATA,
    RECORD_START,
    STRAY,
    TRUNCATED,
    Bytes,
    Dialect,
    Scan,
    Text,
    field_counts,
    line_breaks,
    scan,
)
from sluice.plugins import Chunk

#: pyarrow's spellings of booleans (passed explicitly so the value-by-value check knows them).
TRUE_VALUES: Final = ["1", "True", "TRUE", "true"]
FALSE_VALUES: Final = ["0", "False", "FALSE", "false"]

#: Bytes read at a time for the header.
HEAD_READ: Final = 1 << 16
#: pyarrow parses a block in chunks of this size on all cores (when its records are shorter).
PARSE_CHUNK: Final = 1 << 20

_TRIM: Final = " \t"  # what pyarrow's converter trims around numbers and dates, and trim_spaces


class _FileProblem(InputError):
    """A problem of the whole file (its header or its columns): one dead letter, nothing read."""

    def __init__(
        self, reason: str, message: str, *, line: int | None = None, payload: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.line = line
        self.payload = payload


# ------------------------------------------------------------------------------- UTF-8 check

_found = threading.local()


def _collect_invalid(exc: UnicodeError) -> tuple[str, int]:
    if isinstance(exc, UnicodeDecodeError):
        _found.positions.append(exc.start)
        return "", exc.end
    raise exc


codecs.register_error("sluice.csv.collect", _collect_invalid)


def invalid_utf8(data: Bytes | memoryview) -> list[int]:
    """Offsets of the invalid UTF-8 sequences in ``data`` (one pass at C speed)."""
    _found.positions = []
    codecs.utf_8_decode(data, "sluice.csv.collect", True)
    out: list[int] = _found.positions
    _found.positions = []
    return out


def _invalid_rows(col: pa.Array) -> np.ndarray:
    """Indices of the values of a binary column that are not valid UTF-8: the values are
    checked together in one pass, and the bytes at each value's edges so that a sequence cut
    between two values is not taken for a whole one."""
    if col.null_count == len(col):
        return np.zeros(0, dtype=np.int64)
    offs = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset : col.offset + len(col) + 1]
    lo, hi = int(offs[0]), int(offs[-1])
    buf = col.buffers()[2]
    if buf is None or hi == lo:
        return np.zeros(0, dtype=np.int64)
    bad = np.asarray(invalid_utf8(memoryview(buf)[lo:hi]), dtype=np.int64) + lo
    rows = np.searchsorted(offs, bad, side="right") - 1
    a = np.frombuffer(buf, dtype=np.uint8)
    starts, ends = offs[:-1].astype(np.int64), offs[1:].astype(np.int64)
    filled = ends > starts
    edge = filled & ((a[np.minimum(starts, len(a) - 1)] & 0xC0) == 0x80)  # starts mid-sequence
    for back in (1, 2, 3):  # a lead byte whose sequence would run past the value's end
        p = ends - back
        ok = filled & (p >= starts)
        c = a[np.clip(p, 0, len(a) - 1)]
        size = 2 + (c >= 0xE0).astype(np.int64) + (c >= 0xF0).astype(np.int64)
        edge |= ok & (c >= 0xC0) & (p + size > ends)
    return np.unique(np.concatenate((rows, np.flatnonzero(edge))))


# ----------------------------------------------------------------------------- the input


@dataclass
class _Block:
    """Whole records of the input."""

    data: Bytes
    offset: int  # stream offset of data[0]
    line: int  # 1-based line of data[0]
    final: bool  # the input ends with this block
    plain: bool  # no quote and no escape byte: every line end ends a record
    text: Text | None = None  # over a buffer that starts with data (may go on past it)
    scan: Scan | None = None  # the records of data, when they were scanned


def _count_lf(data: Bytes, k: int) -> int:
    return int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8, count=k) == 10))


def _count_breaks(data: Bytes, k: int) -> tuple[int, int]:
    """(line breaks, b"\\n") in data[:k] (k at a line or record boundary)."""
    lf = _count_lf(data, k)
    if data.find(b"\r", 0, k) < 0:
        return lf, lf
    a = np.frombuffer(data, dtype=np.uint8, count=k)
    cr = int(np.count_nonzero(a == 13))
    crlf = int(np.count_nonzero((a[:-1] == 13) & (a[1:] == 10)))
    return lf + cr - crlf, lf


def _last_end(buf: Bytes, hi: int, final: bool) -> int:
    """Offset after the last line end in ``buf[:hi]`` (0: none) — a buffer without quotes."""
    nl = buf.rfind(b"\n", 0, hi)
    cr = buf.rfind(b"\r", nl + 1, hi)
    if cr == hi - 1 >= 0 and (buf[hi : hi + 1] == b"\n" or (hi == len(buf) and not final)):
        cr = buf.rfind(b"\r", nl + 1, hi - 1)  # half of \r\n, or maybe so
    return max(nl, cr) + 1


def _first_end(buf: Bytes, final: bool) -> int:
    """Offset after the first line end of ``buf`` (0: none) — a buffer without quotes."""
    nl = buf.find(b"\n")
    cr = buf.find(b"\r", 0, nl if nl >= 0 else len(buf))
    if cr >= 0 and cr + 1 == len(buf) and not final:
        cr = -1
    if cr >= 0 and cr + 1 != nl:
        return cr + 1
    return nl + 1


def _plain_cut(buf: Bytes, final: bool, target: int) -> int:
    """Where to cut a buffer without quotes: after the last line end within ``target`` bytes,
    or after the first line end when the first line is longer; 0 when no line is complete."""
    if len(buf) <= target and final:
        return len(buf)
    cut = _last_end(buf, min(target, len(buf)), final)
    if cut == 0:
        cut = _first_end(buf, final)
    if cut == 0 and final:
        return len(buf)
    return cut


def _held_back(data: Bytes, d: Dialect) -> int:
    """How many trailing bytes of a non-final buffer depend on what follows (quote, \\r,
    escape): the oversize skipper keeps them for the next read."""
    special = {13} | {c for c in (d.quote, d.escape) if c is not None}
    i = len(data)
    stop = max(0, len(data) - (1 << 16))
    while i > stop and data[i - 1] in special:
        i -= 1
    return len(data) - i


class _Input:
    """A UTF-8 stream cut into records: the header, then blocks of whole records."""

    def __init__(self, stream: IO[bytes], d: Dialect, *, block_size: int, limit: int) -> None:
        self.stream = stream
        self._readinto: Callable[[memoryview], int | None] = stream.readinto  # type: ignore[attr-defined]
        self.d = d
        self.block_size = block_size
        self.limit = limit
        self.buf: bytes | bytearray = b""
        self.offset = 0  # stream offset of buf[0]
        self.line = 1  # line number of buf[0]
        self.eof = False

    def _read(self, n: int) -> None:
        """Append up to ``n`` bytes to ``buf`` (read straight into a new buffer: one copy)."""
        if self.eof:
            return
        have = len(self.buf)
        buf = bytearray(have + n)
        buf[:have] = self.buf
        got = self._readinto(memoryview(buf)[have:])
        if not got:
            self.eof = True
            return
        if got < n:
            del buf[have + got :]
        self.buf = buf

    def consume(self, k: int) -> None:
        """Drop ``buf[:k]`` (k at a line or record boundary)."""
        if k <= 0:
            return
        breaks, _ = _count_breaks(self.buf, k)
        self.line += breaks
        self.offset += k
        self.buf = self.buf[k:]

    def skip_lines(self, k: int) -> int:
        """Skip ``k`` physical lines (``skip_rows``); returns how many there were."""
        done = 0
        while done < k:
            if not self.eof and len(self.buf) < HEAD_READ:
                self._read(HEAD_READ)
            if not self.buf:
                break
            breaks = line_breaks(self.buf, final=self.eof)
            need = k - done
            if len(breaks) >= need:
                self.consume(int(breaks[need - 1]) + 1)
                return k
            if self.eof:
                self.consume(len(self.buf))
                return done + len(breaks) + 1
            if len(breaks):
                self.consume(int(breaks[-1]) + 1)
                done += len(breaks)
            keep = 1 if self.buf.endswith(b"\r") else 0  # may be half of \r\n
            drop = len(self.buf) - keep
            self.offset += drop
            self.buf = self.buf[drop:]
        return done

    def first_record(self) -> tuple[tuple[bytes, int, int] | None, int]:
        """Skip the blank and comment lines at the start of ``buf``; return the next record
        (content, kind, length with its terminator — not consumed; None at the end) and how many
        lines were skipped."""
        size = HEAD_READ
        skipped = 0
        while True:
            if len(self.buf) < size and not self.eof:
                self._read(size - len(self.buf))
            if not self.buf:
                return None, skipped
            sc = scan(self.buf, self.d, final=self.eof)
            lead = (sc.kinds == BLANK) | (sc.kinds == COMMENT)
            first = int(np.argmin(lead)) if len(sc) else 0
            if len(sc) and not lead[first]:
                skipped += first
                start = int(sc.starts[first])
                self.consume(start)
                end, nxt = int(sc.ends[first]) - start, int(sc.nexts[first]) - start
                return (bytes(self.buf[:end]), int(sc.kinds[first]), nxt), skipped
            if len(sc):  # only blank and comment lines so far
                skipped += len(sc)
                self.consume(sc.tail)
                continue
            if len(self.buf) > self.limit:
                raise _FileProblem(
                    "too_large",
                    f"the first record of the file (line {self.line}) is longer than "
                    f"max_record_bytes={self.limit}; the file was not read",
                    line=self.line,
                    payload=self.buf[:OVERSIZE_HEAD].decode("utf-8", "replace"),
                )
            size = 2 * max(size, len(self.buf))

    def blocks(self) -> Iterator[_Block | Oversize]:
        """Blocks of whole records, about ``block_size`` bytes each, in order; a record longer
        than the limit is an :class:`Oversize` item in its place (never held in memory)."""
        d = self.d
        target = self.block_size
        more = False
        while True:
            if not self.eof and (more or len(self.buf) < target):
                size = max(target, len(self.buf)) if more else target
                self._read(min(size, max(target, self.limit + 1 - len(self.buf))))
            more = False
            buf = self.buf
            if not buf:
                return
            final = self.eof
            text: Text | None = None
            sc: Scan | None = None
            plain = d.plain(buf)
            if plain:
                cut = _plain_cut(buf, final, target)
            else:
                text = Text(buf, d, final=final)
                sc = scan(text, final=final)
                within = int(np.searchsorted(sc.nexts, target, side="right"))
                cut = int(sc.nexts[within - 1]) if within else int(sc.nexts[0]) if len(sc) else 0
                if cut < sc.tail:
                    sc = sc.head(within or 1)
            if not cut:
                if len(buf) > self.limit:
                    yield self._skip_oversize()
                else:
                    more = True
                continue
            rest = len(buf) - cut
            offset = self.offset
            self.offset += cut
            self.buf = buf[cut:] if rest else b""
            if not rest:
                block = buf
            elif text is None and isinstance(buf, bytearray):
                del buf[cut:]  # the block is the buffer, cut in place (no copy of the block)
                block = buf
            else:
                block = buf[:cut]
            # the consumer counts the block's lines (often for free) and adds them to self.line
            # before it asks for the next block
            yield _Block(block, offset, self.line, final and not rest, plain, text, sc)
            if final and not rest:
                return

    def _skip_oversize(self) -> Oversize:
        """Skip the record that starts at ``buf[0]`` and is longer than the limit: follow the
        machine's state through the input, keeping only its first bytes."""
        d = self.d
        start_line, start_offset = self.line, self.offset
        head = bytes(self.buf[:OVERSIZE_HEAD])
        length = 0
        state = RECORD_START
        pending, self.buf = self.buf, b""
        while True:
            final = self.eof
            keep = 0 if final else _held_back(pending, d)
            part = pending[: len(pending) - keep]
            rest = pending[len(pending) - keep :]
            if part:
                sc = scan(part, d, final=final, state=state)
                if len(sc):
                    nxt = int(sc.nexts[0])
                    length += int(sc.ends[0])
                    breaks, _ = _count_breaks(part, nxt)
                    self.line += breaks
                    self.offset += nxt
                    self.buf = part[nxt:] + rest
                    return Oversize(start_line, start_offset, length, head)
                state = sc.tail_state
                length += len(part)
                breaks, _ = _count_breaks(part, len(part))
                self.line += breaks
                self.offset += len(part)
            if final:
                self.buf = b""
                return Oversize(start_line, start_offset, length, head)
            data = self.stream.read(max(self.block_size, 1 << 20))
            if not data:
                self.eof = True
            pending = rest + data


# ---------------------------------------------------------------------------- per block


@dataclass
class _Prepared:
    """A block's records sorted out: what pyarrow gets, and the letters found so far."""

    block: _Block
    clean: Bytes  # the records for pyarrow
    n_records: int  # records of the block that get a position
    skipped: int = 0
    simple: bool = False  # not scanned: records = lines (to be confirmed by pyarrow's row count)
    checked: bool = False  # the field counts of the clean records were checked
    index: np.ndarray | None = None  # record index (in the block) of each clean record
    starts: np.ndarray | None = None  # block offset of each clean record
    ends: np.ndarray | None = None  # block offset of the end of each clean record's content
    rec_ids: np.ndarray | None = None  # scan ids of the clean records
    stray: bool = False  # clean holds records with stray quotes (lenient mode)
    multiline: bool = False  # a clean record spans lines (a line end inside quotes, escaped)
    sc: Scan | None = None
    text: Text | None = None
    letters: list[tuple[np.ndarray, np.ndarray, list[str], list[str], list[str | None]]] = field(
        default_factory=list
    )  # (record index, block offset, reasons, messages, payloads)

    def materialize(self) -> None:
        """Fill the per-record arrays of a scanned block whose records are all data."""
        if self.index is None and self.sc is not None:
            n = len(self.sc)
            self.rec_ids = np.arange(n, dtype=np.int64)
            self.index = self.rec_ids
            self.starts = self.sc.starts
            self.ends = self.sc.ends

    def drop(self, rows: np.ndarray) -> _Prepared:
        """Without the clean records ``rows`` (their letters must already be recorded)."""
        self.materialize()
        assert self.index is not None and self.starts is not None and self.rec_ids is not None
        assert self.ends is not None and self.sc is not None
        keep = np.ones(len(self.index), dtype=bool)
        keep[rows] = False
        rec = self.rec_ids[keep]
        return _Prepared(
            block=self.block,
            clean=_gather(self.block.data, self.sc, rec),
            n_records=self.n_records,
            skipped=self.skipped,
            index=self.index[keep],
            starts=self.starts[keep],
            ends=self.ends[keep],
            rec_ids=rec,
            stray=self.stray,
            multiline=self.multiline,
            sc=self.sc,
            text=self.text,
            letters=self.letters,
        )

    def record_text(self, rows: np.ndarray) -> list[str | None]:
        self.materialize()
        assert self.starts is not None and self.ends is not None
        data = self.block.data
        return [
            data[int(self.starts[i]) : int(self.ends[i])].decode("utf-8", "replace") for i in rows
        ]


def _gather(data: Bytes, sc: Scan, rec: np.ndarray) -> Bytes:
    """The bytes of records ``rec`` (sorted ids of ``sc``), each with its terminator."""
    if not len(rec):
        return b""
    if len(rec) == len(sc) and rec[0] == 0 and sc.starts[0] == 0 and sc.nexts[-1] == len(data):
        return data
    # runs of consecutive records are copied in one slice
    brk = np.flatnonzero(np.diff(rec) != 1) + 1
    firsts = rec[np.concatenate(([0], brk))]
    lasts = rec[np.concatenate((brk - 1, [len(rec) - 1]))]
    parts = [data[int(sc.starts[a]) : int(sc.nexts[b])] for a, b in zip(firsts, lasts, strict=True)]
    if not parts[-1].endswith((b"\n", b"\r")):
        parts[-1] += b"\n"
    return b"".join(parts)


@dataclass
class _Head:
    """What the start of a file says: its column names (None: no record at all), the lines
    skipped before them, and the header record (text and line) when there is one."""

    names: list[str] | None
    skipped: int
    text: str | None = None
    line: int | None = None


@dataclass
class _Out:
    """What a block gives: rows (with their record index in the block) and counts (its
    letters are in the prepared block)."""

    table: pa.Table | None
    index: np.ndarray | None
    p: _Prepared  # as finally sorted out (its letters are the block's)
    breaks: int  # physical line breaks in the block


class CsvReader(FileReader):
    """Read CSV files (see the module docstring); registered as the ``csv`` source."""

    def __init__(self, config: CsvSource) -> None:
        super().__init__(config)
        self.config: CsvSource = config
        cfg = config

        def byte(c: str | None) -> int | None:
            return None if c is None else ord(c)

        self.dialect = Dialect(
            delimiter=ord(cfg.delimiter),
            quote=byte(cfg.quote),
            escape=byte(cfg.escape),
            comment=byte(cfg.comment),
        )
        self._limit = cfg.max_record_bytes
        self._nulls = list(cfg.null_values)

    # ------------------------------------------------------------------------ probes

    def columns(self, path: Path) -> list[str]:
        """The column names of one file, reading only its first record (for ``validate``).

        Raises an :class:`~sluice.connectors.files._bytes.InputError` (``reason`` =
        the dead-letter reason code) when the file or its header cannot be read."""
        stream = self.open_bytes(path, encoding=self.config.encoding)
        try:
            inp = self._input(stream, HEAD_READ)
            return self._head(inp).names or []
        finally:
            stream.close()

    def schema_problems(self, names: list[str]) -> list[str]:
        """Messages for the columns the ``schema`` declares that ``names`` lacks."""
        return [
            f"the schema declares column {k!r}, which the file does not have "
            f"({did_you_mean(k, names)})"
            for k in self._types
            if k not in names
        ]

    def header_text(self, path: Path) -> str | None:
        """The header record of a file as text (with its line terminator), or None."""
        if not self.config.header:
            return None
        stream = self.open_bytes(path, encoding=self.config.encoding)
        try:
            inp = self._input(stream, HEAD_READ)
            return self._head(inp).text
        finally:
            stream.close()

    # ------------------------------------------------------------------------ reading

    def _input(self, stream: IO[bytes], block_size: int | None = None) -> _Input:
        return _Input(
            stream,
            self.dialect,
            block_size=block_size or self.config.block_size,
            limit=self._limit,
        )

    def _head(self, inp: _Input) -> _Head:
        """Skip the leading lines; read the column names (from the header, or ``column_names``,
        or the first record's field count)."""
        cfg = self.config
        skipped = inp.skip_lines(cfg.skip_rows)
        got, blank = inp.first_record()
        skipped += blank
        if got is None:
            return _Head(None, skipped)
        rec, kind, length = got
        line = inp.line
        if not cfg.header:
            sc = scan(rec, self.dialect, final=True)
            n = int(field_counts(Text(rec, self.dialect, final=True), sc, np.array([0]))[0])
            names = list(cfg.column_names) if cfg.column_names else [f"f{i}" for i in range(n)]
            return _Head(names, skipped)
        raw = inp.buf[:length].decode("utf-8", "replace")
        inp.consume(length)
        payload = rec.decode("utf-8", "replace")
        if kind == TRUNCATED:
            raise _FileProblem(
                "truncated",
                f"the header (line {line}) opens a quoted field that is never closed: the file "
                "has no readable header",
                line=line,
                payload=payload[:OVERSIZE_HEAD],
            )
        if kind == STRAY and cfg.strict_quotes:
            raise _FileProblem(
                "unquoted_value",
                f"the header (line {line}) has a quote inside an unquoted name or text after a "
                "closing quote; fix the header or set strict_quotes: false",
                line=line,
                payload=payload,
            )
        return _Head(self._header_names(rec, line), skipped, raw, line)

    def _header_names(self, rec: bytes, line: int) -> list[str]:
        d = self.dialect
        sc = scan(rec, d, final=True)
        n = int(field_counts(Text(rec, d, final=True), sc, np.array([0]))[0])
        cols = [f"c{i}" for i in range(n)]
        table = pacsv.read_csv(
            pa.py_buffer(rec + b"\n"),
            read_options=pacsv.ReadOptions(column_names=cols, block_size=len(rec) + 2),
            parse_options=self._parse_options(None, newlines=True),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(cols, pa.binary()),
                null_values=[],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        raw = [table.column(c)[0].as_py() for c in cols]
        bad = [i for i, b in enumerate(raw) if invalid_utf8(b)]
        if bad:
            raise _FileProblem(
                "encoding",
                f"the header (line {line}) holds bytes that are not valid in the encoding "
                f"{self.config.encoding!r} (column {bad[0] + 1}): the column names cannot be "
                "read; declare the file's encoding (e.g. encoding: latin-1 or cp1252)",
                line=line,
                payload=rec.decode("utf-8", "replace"),
            )
        names = [b.decode("utf-8") for b in raw]
        if any("\x00" in nm for nm in names):
            raise _FileProblem(
                "encoding",
                f"the header (line {line}) holds NUL characters: the file is probably UTF-16 or "
                "UTF-32 without a byte-order mark; declare it (encoding: utf-16-le, utf-16-be...)",
                line=line,
                payload=rec.decode("utf-8", "replace").replace("\x00", ""),
            )
        if self.config.trim_spaces:
            names = [nm.strip(_TRIM) for nm in names]
        out: list[str] = []
        seen: set[str] = set()
        for i, nm in enumerate(names):
            base = nm or f"f{i}"
            name, k = base, 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            seen.add(name)
            out.append(name)
        return out

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        try:
            yield from self._read(path, state)
        except _FileProblem as exc:
            yield Chunk(
                dead=self.dead(state, exc.reason, str(exc), exc.payload, line=exc.line),
            )

    def _read(self, path: Path, state: FileState) -> Iterator[Chunk]:
        cfg = self.config
        stream = self.open_bytes(path, encoding=cfg.encoding)
        try:
            inp = self._input(stream)
            head = self._head(inp)
            names, skipped = head.names, head.skipped
            if names is None:
                if skipped:
                    yield Chunk(skipped=skipped)
                return
            problems = self.schema_problems(names)
            if problems:
                raise _FileProblem(
                    "missing_column",
                    "; ".join(problems)
                    + " — the file was not read (a declared column is never filled with nulls)",
                    line=head.line,
                )
            targets: dict[str, pa.DataType] = {
                n: self._types[n] if n in self._types else pa.string()
                for n in names
                if n in self._types or not cfg.infer_types
            }
            open_cols = [n for n in names if n not in targets]
            blocks: Iterator[_Block | Oversize] = inp.blocks()
            ahead: list[_Block | Oversize | _Prepared] = []  # items read for inference
            if open_cols:
                item = next(blocks, None)
                while isinstance(item, Oversize):
                    ahead.append(item)
                    item = next(blocks, None)
                inferred: dict[str, pa.DataType | None] = {}
                if item is not None:
                    inferred, first = self._infer(self._prepare(item, names), names, open_cols)
                    ahead.append(first)
                    still = [c for c in open_cols if not _settled(inferred.get(c))]
                    if still and not item.final:
                        inferred = self._infer_rest(blocks, names, inferred, still, first)
                        # pass 2 from the start of the file
                        ahead = []
                        stream.close()
                        stream = self.open_bytes(path, encoding=cfg.encoding)
                        inp = self._input(stream)
                        self._head(inp)
                        blocks = inp.blocks()
                targets.update({c: _final_type(inferred.get(c)) for c in open_cols})
            targets = {n: targets[n] for n in names}
            items = itertools.chain(ahead, blocks)
            yield from self._emit(state, inp, names, targets, items, skipped)
        finally:
            stream.close()

    def _emit(
        self,
        state: FileState,
        inp: _Input,
        names: list[str],
        targets: dict[str, pa.DataType],
        items: Iterator[_Block | Oversize | _Prepared],
        skipped: int,
    ) -> Iterator[Chunk]:
        index = 0  # position of the next record
        reported = 0  # bytes reported so far (capped at the file's size: compressed input)
        for item in items:
            if isinstance(item, Oversize):
                dead = self.oversize_dead(state, item, index)
                index += 1
                pos = min(item.offset + item.length, state.size)
                yield Chunk(dead=dead, bytes_read=max(0, pos - reported), skipped=skipped)
                reported = max(reported, pos)
                skipped = 0
                continue
            prepared = item if isinstance(item, _Prepared) else self._prepare(item, names)
            out = self._rows(prepared, names, targets)
            table = None
            if out.table is not None and out.table.num_rows:
                assert out.index is not None
                table = _with_positions(out.table, state.source, index + out.index)
                state.rows += table.num_rows
            dead = self._letters(state, out.p, index)
            index += out.p.n_records
            inp.line += out.breaks
            block = prepared.block
            pos = min(block.offset + len(block.data), state.size)
            yield Chunk(
                table=table,
                dead=dead,
                bytes_read=max(0, pos - reported),
                skipped=skipped + out.p.skipped,
            )
            reported = max(reported, pos)
            skipped = 0
        if skipped:
            yield Chunk(skipped=skipped)

    def _letters(self, state: FileState, p: _Prepared, first: int) -> pa.Table | None:
        """The block's dead letters, in record order, with their positions and lines."""
        if not p.letters:
            return None
        rel = np.concatenate([x[0] for x in p.letters]).astype(np.int64)
        starts = np.concatenate([x[1] for x in p.letters]).astype(np.int64)
        reasons = [r for x in p.letters for r in x[2]]
        messages = [m for x in p.letters for m in x[3]]
        payloads = [q for x in p.letters for q in x[4]]
        order = np.argsort(rel, kind="stable")
        lines = p.block.line + np.searchsorted(line_breaks(p.block.data, final=True), starts)
        return self.dead(
            state,
            [reasons[i] for i in order],
            [messages[i] for i in order],
            [payloads[i] for i in order],
            position=pa.array(rel[order] + first),
            line=pa.array(lines[order].astype(np.int64)),
        )

    # ---------------------------------------------------------------- inference

    def _infer(
        self, p: _Prepared, names: list[str], cols: list[str]
    ) -> tuple[dict[str, pa.DataType | None], _Prepared]:
        """pyarrow's type inference over the block's good records, for ``cols`` (and the block,
        checked record by record if that was needed)."""
        try:
            table = self._parse(p, names, None, include=cols) if p.clean else None
        except pa.ArrowInvalid:
            p = self._checked(p, names)
            try:
                table = self._parse(p, names, None, include=cols) if p.clean else None
            except pa.ArrowInvalid:
                p = self._isolate(p, names)
                table = self._parse(p, names, None, include=cols) if p.clean else None
        if table is None:
            return dict.fromkeys(cols), p
        types: dict[str, pa.DataType | None] = {c: table.schema.field(c).type for c in cols}
        if any(pa.types.is_binary(t) for t in types.values()):
            # bytes that are not UTF-8 make pyarrow fall back to binary; those records become
            # encoding letters: infer from the others
            p = self._checked(p, names)
            assert p.starts is not None and p.ends is not None
            pos = np.asarray(invalid_utf8(p.block.data), dtype=np.int64)
            rec = np.searchsorted(p.starts, pos, side="right") - 1
            rec = np.unique(rec[(rec >= 0) & (pos < p.ends[np.maximum(rec, 0)])])
            rest = p.drop(rec) if len(rec) else p
            if rest.clean:
                table = self._parse(rest, names, None, include=cols)
                types = {c: table.schema.field(c).type for c in cols}
            else:
                types = dict.fromkeys(cols)
        return types, p

    def _infer_rest(
        self,
        blocks: Iterator[_Block | Oversize],
        names: list[str],
        types: dict[str, pa.DataType | None],
        cols: list[str],
        first: _Prepared,
    ) -> dict[str, pa.DataType | None]:
        """Pass 1: the types of ``cols`` over the rest of the file (until all are strings)."""
        types = dict(types)
        first_hexy = any(types[c] == pa.int64() for c in cols) and _hexy(first.clean)
        hexy = {c: types[c] == pa.int64() and first_hexy for c in cols}
        try:
            for item in blocks:
                if isinstance(item, Oversize):
                    continue
                p = self._prepare(item, names)
                got, p = self._infer(p, names, cols)
                block_hexy = any(got[c] == pa.int64() for c in cols) and _hexy(p.clean)
                for c in cols:
                    g = got[c]
                    hexy[c] = hexy[c] or (g == pa.int64() and block_hexy)
                    types[c] = _unify(types[c], g, hexy[c])
                cols = [c for c in cols if not _settled(types[c])]
                if not cols:
                    break
        except InputError:
            pass  # pass 2 meets the same problem at the same place, after the rows before it
        return types

    # ---------------------------------------------------------------- structure

    def _prepare(self, b: _Block, names: list[str], *, full: bool = False) -> _Prepared:
        """Sort out a block's records: blank and comment lines (skipped), too long, truncated and
        stray-quoted records (letters), the rest for pyarrow."""
        d = self.dialect
        data = b.data
        if not full and b.scan is None and b.plain and self._simple(data):
            # records = lines; pyarrow's row count confirms it (it skips blank lines)
            n = _count_lf(data, len(data)) + (0 if data.endswith(b"\n") else 1)
            return _Prepared(block=b, clean=data, n_records=n, simple=True)
        text = b.text if b.text is not None else Text(data, d, final=True)
        sc = b.scan if b.scan is not None else scan(text, final=True)
        kinds = sc.kinds
        # every record with a terminator ends at one line end: any other one is inside a record
        line_ends = int(np.searchsorted(text.line_ends, len(data)))
        terminated = int(np.count_nonzero(sc.nexts > sc.ends))
        multiline = text.escaped is not None or line_ends > terminated
        if not kinds.any() and (
            self._limit >= len(data) or not np.any(sc.ends - sc.starts > self._limit)
        ):  # all data records (the common case): the arrays of positions only if needed
            return _Prepared(
                block=b, clean=data, n_records=len(sc), sc=sc, text=text, multiline=multiline
            )
        counted = (kinds != BLANK) & (kinds != COMMENT)
        rel = np.cumsum(counted) - 1
        lengths = sc.ends - sc.starts
        too_long = counted & (lengths > self._limit)
        truncated = (kinds == TRUNCATED) & ~too_long
        strict = self.config.strict_quotes
        stray = (kinds == STRAY) & ~too_long
        keep = ((kinds == DATA) | (stray & ~np.bool_(strict))) & ~too_long
        p = _Prepared(
            block=b,
            clean=b"",
            n_records=int(np.count_nonzero(counted)),
            skipped=int(len(kinds) - np.count_nonzero(counted)),
            sc=sc,
            text=text,
        )
        for mask, reason, what in (
            (too_long, "too_large", None),
            (truncated, "truncated", None),
            (stray & np.bool_(strict), "unquoted_value", None),
        ):
            ids = np.flatnonzero(mask)
            if not len(ids):
                continue
            del what
            starts = sc.starts[ids]
            if reason == "too_large":
                messages = [
                    f"the record is {int(n)} bytes, more than max_record_bytes={self._limit}; it "
                    "was skipped and reading went on with the next record (payload: its first "
                    f"{OVERSIZE_HEAD} bytes)"
                    for n in lengths[ids]
                ]
                payloads: list[str | None] = [
                    data[int(s) : int(s) + OVERSIZE_HEAD].decode("utf-8", "replace") for s in starts
                ]
            else:
                payloads = [
                    data[int(s) : int(e)].decode("utf-8", "replace")
                    for s, e in zip(starts, sc.ends[ids], strict=True)
                ]
                if reason == "truncated":
                    messages = [
                        "the file ends inside a quoted field that was opened in this record: "
                        "the file is truncated (or a quote is missing)"
                    ] * len(ids)
                else:
                    messages = [
                        "a quote inside an unquoted field, or text after a closing quote "
                        "(strict_quotes); quote the field and double its quotes, or set "
                        "strict_quotes: false to keep such quotes as text"
                    ] * len(ids)
            p.letters.append((rel[ids], starts, [reason] * len(ids), messages, payloads))
        rec = np.flatnonzero(keep)
        p.rec_ids = rec
        p.index = rel[rec]
        p.starts = sc.starts[rec]
        p.ends = sc.ends[rec]
        p.stray = bool(np.any(stray & keep))
        p.multiline = multiline
        p.clean = _gather(data, sc, rec)
        return p

    def _simple(self, data: Bytes) -> bool:
        """A block whose records are exactly its lines, with no check needed on them."""
        d = self.dialect
        if len(data) > self._limit and self._longest_line(data) > self._limit:
            return False
        if d.comment is not None:
            c = bytes((d.comment,))
            if data.startswith(c) or b"\n" + c in data or b"\r" + c in data:
                return False
        if b"\r" in data:
            a = np.frombuffer(data, dtype=np.uint8)
            cr = int(np.count_nonzero(a == 13))
            crlf = int(np.count_nonzero((a[:-1] == 13) & (a[1:] == 10)))
            if cr != crlf:
                return False
        return True

    @staticmethod
    def _longest_line(data: Bytes) -> int:
        nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        edges = np.concatenate(([-1], nl, [len(data)]))
        return int(np.max(np.diff(edges))) - 1

    # ---------------------------------------------------------------- rows

    def _parse_options(self, handler: Callable[[Any], str] | None, *, newlines: bool) -> Any:
        cfg = self.config
        return pacsv.ParseOptions(
            delimiter=cfg.delimiter,
            quote_char=cfg.quote if cfg.quote is not None else False,
            escape_char=cfg.escape if cfg.escape is not None else False,
            newlines_in_values=newlines,
            invalid_row_handler=handler,
        )

    def _parse(
        self,
        p: _Prepared,
        names: list[str],
        types: dict[str, pa.DataType] | None,
        *,
        include: list[str] | None = None,
        nulls: bool = True,
    ) -> pa.Table:
        """pyarrow over the prepared records. Raises ``pa.ArrowInvalid`` when a record has
        another number of fields (pyarrow's invalid-row handler is not used: it decodes the row
        as UTF-8 first and fails on bad bytes) or a value does not convert."""
        data = p.clean
        # without a line end inside a record, pyarrow may cut the block at any line end
        newlines = p.multiline or p.stray
        one_chunk = p.stray or len(data) < 2 * PARSE_CHUNK
        convert = pacsv.ConvertOptions(
            column_types=types or {},
            include_columns=include or [],
            null_values=self._nulls if nulls else [],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
            true_values=TRUE_VALUES,
            false_values=FALSE_VALUES,
        )
        for attempt in (0, 1):
            size = len(data) + 1 if one_chunk or attempt else PARSE_CHUNK
            try:
                table = pacsv.read_csv(
                    pa.py_buffer(data),
                    read_options=pacsv.ReadOptions(
                        column_names=names, block_size=size, use_threads=True
                    ),
                    parse_options=self._parse_options(None, newlines=newlines),
                    convert_options=convert,
                )
            except pa.ArrowInvalid as exc:
                if attempt or "straddl" not in str(exc):
                    raise
                continue  # one record is longer than a chunk: parse in one chunk
            if p.simple and table.num_rows != p.n_records:  # blank lines pyarrow skipped
                raise pa.ArrowInvalid("the block holds blank lines")
            return table
        raise AssertionError("unreachable")

    def _rows(self, p: _Prepared, names: list[str], targets: dict[str, pa.DataType]) -> _Out:
        """The block's rows: one typed parse when every record is good (the common case);
        otherwise the records are checked one by one (structure, then values)."""
        trim = self.config.trim_spaces
        if not trim and p.clean:
            try:
                return self._out(p, self._parse(p, names, targets))
            except pa.ArrowInvalid:
                pass
        p = self._checked(p, names)
        if not p.clean:
            return self._out(p, None)
        if not trim:
            try:
                return self._out(p, self._parse(p, names, targets))
            except pa.ArrowInvalid:
                pass
        binary = dict.fromkeys(names, pa.binary())
        try:
            raw = self._parse(p, names, binary, nulls=not trim)
        except pa.ArrowInvalid:  # the scanner and pyarrow disagree on a record: isolate it
            p = self._isolate(p, names)
            raw = self._parse(p, names, binary, nulls=not trim)
        return self._values(p, raw, names, targets)

    def _checked(self, p: _Prepared, names: list[str]) -> _Prepared:
        """``p`` scanned, without the records whose number of fields is wrong (letters)."""
        if p.checked:
            return p
        if p.simple:
            p = self._prepare(p.block, names, full=True)
        p.materialize()
        p = self._drop_bad_counts(p, len(names))
        p.checked = True
        return p

    def _drop_bad_counts(self, p: _Prepared, n: int) -> _Prepared:
        assert p.sc is not None and p.text is not None and p.rec_ids is not None
        assert p.index is not None and p.starts is not None
        counts = field_counts(p.text, p.sc, p.rec_ids)
        bad = np.flatnonzero(counts != n)
        if not len(bad):
            return p
        p.letters.append(
            (
                p.index[bad],
                p.starts[bad],
                ["column_count"] * len(bad),
                [f"expected {n} columns, got {int(c)}" for c in counts[bad]],
                p.record_text(bad),
            )
        )
        return p.drop(bad)

    def _isolate(self, p: _Prepared, names: list[str]) -> _Prepared:
        """Last resort: parse each record alone to find the ones pyarrow rejects."""
        p.materialize()
        assert p.sc is not None and p.rec_ids is not None and p.index is not None
        assert p.starts is not None
        binary = dict.fromkeys(names, pa.binary())
        bad: list[int] = []
        for i, r in enumerate(p.rec_ids):
            clean = _gather(p.block.data, p.sc, np.array([r]))
            one = _Prepared(block=p.block, clean=clean, n_records=1, stray=True)
            try:
                if self._parse(one, names, binary).num_rows != 1:
                    bad.append(i)
            except pa.ArrowInvalid:
                bad.append(i)
        rows = np.asarray(bad, dtype=np.int64)
        if not len(rows):
            raise RuntimeError("pyarrow rejects a block of records but none of them alone")
        p.letters.append(
            (
                p.index[rows],
                p.starts[rows],
                ["column_count"] * len(rows),
                [f"pyarrow cannot split this record into {len(names)} fields"] * len(rows),
                p.record_text(rows),
            )
        )
        return p.drop(rows)

    def _values(
        self, p: _Prepared, raw: pa.Table, names: list[str], targets: dict[str, pa.DataType]
    ) -> _Out:
        """Rows from the binary parse: UTF-8 check, (trim, nulls,) conversion — value by value
        where a column fails as a whole."""
        p.materialize()
        n = raw.num_rows
        problems: dict[int, list[str]] = {}
        encoding: set[int] = set()
        cols: dict[str, pa.Array] = {}
        for name in names:
            col = raw.column(name).combine_chunks()
            cols[name] = col
            if targets[name] == pa.binary():
                continue
            for i in _invalid_rows(col).tolist():
                if i not in encoding:
                    encoding.add(i)
                    problems[i] = [
                        f"column {name!r}: bytes not valid in the encoding {self.config.encoding!r}"
                    ]
        enc_mask = _mask(n, sorted(encoding))
        strings: dict[str, pa.Array] = {}
        for name in names:
            col = cols[name]
            if targets[name] == pa.binary():
                strings[name] = col
                continue
            if encoding:
                col = pc.if_else(enc_mask, pa.scalar(None, pa.binary()), col)
            text = col.cast(pa.string())
            if self.config.trim_spaces:
                text = pc.utf8_trim(text, _TRIM)
                if self._nulls:
                    text = pc.if_else(
                        pc.is_in(text, pa.array(self._nulls, pa.string())),
                        pa.scalar(None, pa.string()),
                        text,
                    )
            strings[name] = text
        converted: dict[str, pa.Array] = {}
        cast_bad: set[int] = set()
        for name in names:
            typ = targets[name]
            if typ in (pa.string(), pa.binary()):
                converted[name] = strings[name]
                continue
            arr, bad = _convert_values(strings[name], typ)
            converted[name] = arr
            for i in bad:
                if i in encoding:
                    continue
                value = strings[name][i].as_py()
                problems.setdefault(i, []).append(
                    f"column {name!r}: cannot convert {value!r} to {typ}"
                )
                cast_bad.add(i)
        table = pa.table([converted[nm] for nm in names], names=names)
        letters: list[tuple[list[int], str]] = []
        if encoding:
            letters.append((sorted(encoding), "encoding"))
        if cast_bad:
            letters.append((sorted(cast_bad), "cast_error"))
        for rows, reason in letters:
            idx = np.asarray(rows, dtype=np.int64)
            assert p.index is not None and p.starts is not None
            if reason == "encoding":
                payloads = p.record_text(idx)
            else:
                shown = pa.table([strings[nm] for nm in names], names=names).take(idx)
                payloads = rows_as_json(shown).to_pylist()
            p.letters.append(
                (
                    p.index[idx],
                    p.starts[idx],
                    [reason] * len(idx),
                    ["; ".join(problems[i]) for i in rows],
                    payloads,
                )
            )
        bad_all = sorted(encoding | cast_bad)
        if bad_all:
            keep = pc.invert(_mask(n, bad_all))
            return self._out(p, table.filter(keep), np.asarray(keep))
        return self._out(p, table)

    @staticmethod
    def _out(p: _Prepared, table: pa.Table | None, keep: np.ndarray | None = None) -> _Out:
        index: np.ndarray | None = None
        if table is not None:
            if p.index is None:
                index = np.arange(table.num_rows, dtype=np.int64)
            else:
                index = p.index if keep is None else p.index[keep]
        data = p.block.data
        t = p.text
        if p.simple:  # records are the lines (confirmed by pyarrow's count)
            breaks = p.n_records - (0 if data.endswith(b"\n") else 1)
        elif t is not None and t.escaped is None and (t.final or t.n > len(data)):
            breaks = int(np.searchsorted(t.line_ends, len(data)))  # every line end, unescaped
        else:
            breaks = _count_breaks(data, len(data))[0]
        return _Out(table, index, p, breaks)


# ------------------------------------------------------------------------- conversions


def _with_positions(table: pa.Table, source: str, index: np.ndarray) -> pa.Table:
    n = table.num_rows
    src = pa.array(np.full(n, source_id(source), dtype=np.int32))
    return table.append_column(SOURCE_COL, src).append_column(
        ROW_COL, pa.array(index.astype(np.int64, copy=False))
    )


def _mask(n: int, rows: list[int]) -> pa.Array:
    m = np.zeros(n, dtype=bool)
    if rows:
        m[np.asarray(rows, dtype=np.int64)] = True
    return pa.array(m)


def _csv_convert(values: pa.Array, typ: pa.DataType) -> pa.Array:
    """Convert strings with pyarrow's CSV converter (the one the fast path uses): each non-null
    value is written as a quoted CSV field of a one-column file and read back as ``typ``."""
    if len(values) == 0:
        return pa.array([], typ)
    esc = pc.replace_substring(values, '"', '""')
    line = pc.binary_join_element_wise('"', esc, '"\n', "")
    line = pc.fill_null(line, "\n")
    offs = np.frombuffer(line.buffers()[1], dtype=np.int32)[
        line.offset : line.offset + len(line) + 1
    ]
    buf = line.buffers()[2]
    data = buf.slice(int(offs[0]), int(offs[-1]) - int(offs[0]))
    table = pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(
            column_names=["v"], block_size=max(len(data) + 1, 1 << 16), use_threads=False
        ),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={"v": typ},
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=TRUE_VALUES,
            false_values=FALSE_VALUES,
        ),
    )
    return table.column(0).combine_chunks()


def _convert_values(values: pa.Array, typ: pa.DataType) -> tuple[pa.Array, list[int]]:
    """Convert; the values the CSV converter refuses become null and their indices are returned."""
    try:
        return _csv_convert(values, typ), []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    present = pc.is_valid(values)
    if pa.types.is_boolean(typ):
        known = pc.or_(
            pc.is_in(values, pa.array(TRUE_VALUES)), pc.is_in(values, pa.array(FALSE_VALUES))
        )
        bad_mask = pc.and_(present, pc.invert(pc.fill_null(known, False)))
    else:
        # the converter parses like pyarrow's cast, after trimming spaces and tabs around numbers
        # and dates (not timestamps); find the values it refuses among the distinct ones
        trims = not (pa.types.is_timestamp(typ) or pa.types.is_time(typ))
        trimmed = pc.utf8_trim(values, _TRIM) if trims else values
        uniq = pc.unique(trimmed.drop_null())
        _, bad_u = safe_cast(uniq, typ)
        bad_vals = uniq.take(pa.array(bad_u, pa.int64()))
        bad_mask = pc.fill_null(pc.is_in(trimmed, bad_vals), False)
    bad = np.flatnonzero(np.asarray(bad_mask)).tolist()
    cleaned = pc.if_else(bad_mask, pa.scalar(None, values.type), values)
    try:
        return _csv_convert(cleaned, typ), bad
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # the shortcut above disagreed with the converter: find the refused values by bisection
    # with the converter itself (exact, slower)
    found: list[int] = []
    _bisect(values, typ, 0, found)
    mask = _mask(len(values), found)
    return _csv_convert(pc.if_else(mask, pa.scalar(None, values.type), values), typ), found


def _bisect(values: pa.Array, typ: pa.DataType, offset: int, out: list[int]) -> None:
    try:
        _csv_convert(values, typ)
        return
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if len(values) == 1:
        out.append(offset)
        return
    half = len(values) // 2
    _bisect(values.slice(0, half), typ, offset, out)
    _bisect(values.slice(half), typ, offset + half, out)


# ------------------------------------------------------------------------- inferred types


def _hexy(data: Bytes) -> bool:
    """Whether integers of this block may be hexadecimal (``0x1f``: int64 but not float64)."""
    if b"x" not in data and b"X" not in data:  # one-byte searches are fast; "0x" is not
        return False
    a = np.frombuffer(data, dtype=np.uint8)
    x = np.flatnonzero((a[1:] == 120) | (a[1:] == 88))
    return bool(np.any(a[x] == 48))


def _settled(t: pa.DataType | None) -> bool:
    """A type no later value can change: text (binary = text with invalid bytes)."""
    return t is not None and (pa.types.is_string(t) or pa.types.is_binary(t))


def _unify(a: pa.DataType | None, b: pa.DataType | None, hexy: bool) -> pa.DataType | None:
    """A type every value of two blocks fits, given the types pyarrow inferred for each."""
    if a is None or (b is not None and pa.types.is_null(a)):
        return b
    if b is None or pa.types.is_null(b) or a == b:
        return a
    if {a, b} == {pa.int64(), pa.float64()}:
        return pa.string() if hexy else pa.float64()
    temporal = (pa.types.is_date32(a) or pa.types.is_timestamp(a)) and (
        pa.types.is_date32(b) or pa.types.is_timestamp(b)
    )
    if temporal:
        tz_a = a.tz if pa.types.is_timestamp(a) else None
        tz_b = b.tz if pa.types.is_timestamp(b) else None
        if tz_a == tz_b and (tz_a is None or not (pa.types.is_date32(a) or pa.types.is_date32(b))):
            units = ["s", "ms", "us", "ns"]
            ua = a.unit if pa.types.is_timestamp(a) else "s"
            ub = b.unit if pa.types.is_timestamp(b) else "s"
            return pa.timestamp(max(ua, ub, key=units.index), tz_a)
    return pa.string()


def _final_type(t: pa.DataType | None) -> pa.DataType:
    if t is None or pa.types.is_null(t) or pa.types.is_binary(t):
        return pa.string()
    return t


__all__ = ["CsvReader", "invalid_utf8"]
