"""XML reader: a pull parser over the file, one row per ``record_path`` element.

Two passes at most. The first is lxml's strict pull parser over the whole file (C speed, memory
flat: processed records are cleared). When it meets a syntax error it cannot go on, so a second
pass reads the file again with a small tokenizer that finds the record elements' boundaries
(start and end tags, comments, CDATA, processing instructions), skips the records the first pass
already emitted, and from there parses each record on its own, strictly: a malformed record is one
dead letter and reading resumes at the next record.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import pyarrow as pa
from lxml import etree

from sluice.batch import ROW_COL, concat, empty_dead_letters, with_positions
from sluice.config.models import XmlSource
from sluice.connectors.files._bytes import OVERSIZE_HEAD
from sluice.connectors.files._common import (
    MAX_PAYLOAD,
    OBJECT_BATCH_ROWS,
    FileReader,
    FileState,
    records_to_table,
)
from sluice.plugins import Chunk

_PARSER_OPTIONS: Final[dict[str, Any]] = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "huge_tree": False,
    "remove_comments": True,
    "remove_pis": True,
}

_DECL = re.compile(rb"""^<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_NOT_ASCII_BASED = ("utf-16", "utf-32", "ucs-2", "ucs-4", "ucs2", "ucs4", "utf16", "utf32")

#: Markup the second pass recognises (group 1: an end tag's name; 2-4: a start tag's name,
#: attributes and the ``/`` of an empty element).
_TOKEN = re.compile(
    rb"""<!--.*?-->
    |<!\[CDATA\[.*?\]\]>
    |<\?.*?\?>
    |<!DOCTYPE(?:[^\[>"']|"[^"]*"|'[^']*'|\[(?:[^\]"']|"[^"]*"|'[^']*')*\])*>
    |</([^\s<>/!?"'=]+)\s*>
    |<([^\s<>/!?"'=]+)((?:[^<>"'/]|/(?!>)|"[^"]*"|'[^']*')*)(/?)>""",
    re.S | re.X,
)
_ENDS: Final = {b"<!--": b"-->", b"<![CDATA[": b"]]>", b"<?": b"?>", b"<!DOCTYPE": b"]>"}
_PREFIX = re.compile(rb"""(?:</?|\s)([A-Za-z_][\w.-]*):[A-Za-z_][\w.-]*""")
_LINE_REF = re.compile(r"\bline (\d+)")
_LOCATION = re.compile(r", line \d+, column \d+$")

#: Bytes the second pass looks ahead for a tag to be complete.
_LOOKAHEAD = 1 << 20


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if tag.startswith("{") else tag


def _blocal(name: bytes) -> str:
    return name.rsplit(b":", 1)[-1].decode("utf-8", "replace")


def _flatten(elem: Any, prefix: str, row: dict[str, Any]) -> None:
    """Add the attributes and child elements of ``elem`` to ``row`` (dotted names)."""
    for name, value in elem.attrib.items():
        _put(row, prefix + _local(name), value)
    for child in elem:
        if not isinstance(child.tag, str):  # comments, processing instructions, entity refs
            continue
        name = prefix + _local(child.tag)
        if len(child) or child.attrib:
            _flatten(child, name + ".", row)
            text = (child.text or "").strip()
            if text and not len(child):
                _put(row, name, child.text)
        else:
            _put(row, name, child.text)


def _put(row: dict[str, Any], key: str, value: Any) -> None:
    if key not in row:
        row[key] = value
    elif isinstance(row[key], list):
        row[key].append(value)
    else:
        row[key] = [row[key], value]


def _row(elem: Any) -> dict[str, Any]:
    row: dict[str, Any] = {}
    _flatten(elem, "", row)
    text = elem.text
    if text and text.strip() and not any(isinstance(c.tag, str) for c in elem):
        _put(row, _local(elem.tag), text)
    return row


def _entities(elem: Any) -> list[str]:
    return sorted({str(n.text) for n in elem.iter() if isinstance(n, etree._Entity)})


def _entity_message(entities: list[str]) -> str:
    return (
        f"the record uses entity reference(s) {', '.join(f'&{e};' for e in entities)}, which are "
        "not expanded (a safety rule against entity attacks)"
    )


def _reason(message: str, fragment: bytes | None, utf8: bool) -> str:
    if fragment is not None and utf8:
        try:
            fragment.decode("utf-8")
        except UnicodeDecodeError:
            return "encoding"
        return "parse_error"
    low = message.lower()
    return "encoding" if "encoding" in low or "utf-8" in low else "parse_error"


@dataclass
class _Out:
    """Rows and dead letters of one file, gathered until a batch is full."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    row_pos: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    payloads: list[str | None] = field(default_factory=list)
    lines: list[int | None] = field(default_factory=list)
    positions: list[int | None] = field(default_factory=list)

    def letter(
        self, reason: str, message: str, payload: str | None, line: int | None, pos: int | None
    ) -> None:
        self.reasons.append(reason)
        self.messages.append(message)
        self.payloads.append(payload)
        self.lines.append(line)
        self.positions.append(pos)

    def __len__(self) -> int:
        return len(self.rows) + len(self.reasons)

    def clear(self) -> None:
        for value in vars(self).values():
            value.clear()


@dataclass
class _Failure:
    """The syntax error that stopped the first pass."""

    message: str
    line: int | None
    record: int  # records emitted before it (the second pass resumes at this one)


class XmlReader(FileReader):
    """Read XML files; each element matching ``record_path`` is a row.

    ``record_path`` is a ``/``-separated list of element names matched against the end of an
    element's path (``order`` matches every ``order`` element, ``orders/order`` only those directly
    inside ``orders``; a leading ``/`` anchors it at the document root). Namespaces are ignored
    (local names are compared).

    Columns: the record element's attributes under their plain names (no ``@``); each leaf child's
    text under its name; nested children flattened with dots (``customer.name``; a child's
    attributes as ``customer.id``). A name that occurs several times in one record holds a JSON
    array (the column is then JSON text). An empty element gives null. A record element without
    child elements puts its own text in a column named after it (``<i>1</i>`` → ``i``);
    otherwise its own text is ignored. All values are strings; declare ``schema`` to type them
    (uncastable rows → ``cast_error``).

    Hostile input is not expanded: entities are not resolved, no DTD or network access
    (billion-laughs and XXE references stay unexpanded: a record using one is a ``parse_error``
    dead letter), ``huge_tree`` is off (a text node over 10 MB or nesting over 256 levels is a
    syntax error). Processed records are cleared so memory stays flat; a record of more than
    ``max_record_bytes`` (measured to within 1/32 of it) is a ``too_large`` dead letter, its
    content dropped as it is parsed, and the next record is read.

    A syntax error: the records before it are emitted; the malformed record is one
    ``parse_error`` dead letter (``encoding`` for bytes that are not valid in the document's
    encoding), and reading resumes at the next record element (a start tag that matches
    ``record_path`` where the broken record stood, or after the end tag that closes it). Damage
    outside every record loses no record: it is one ``parse_error`` letter with ``position``
    null. Every letter carries the file, ``position`` (the 0-based index of the record among all
    record elements of the file, rejected ones included; rows carry it as ``__sluice_row``) and
    ``line`` (the 1-based line of the record's start tag, or of the damage).
    """

    def __init__(self, config: XmlSource) -> None:
        super().__init__(config)
        self.config: XmlSource = config
        path = config.record_path.strip()
        self._anchored = path.startswith("/")
        self._parts = [p for p in path.strip("/").split("/") if p]
        limit = config.max_record_bytes
        self._feed = max(64, min(1 << 20, limit // 64))

    def _matches(self, stack: list[str]) -> bool:
        n = len(self._parts)
        if len(stack) < n or (self._anchored and len(stack) != n):
            return False
        return stack[-n:] == self._parts

    # -- output ---------------------------------------------------------------------------------

    def _flush(self, out: _Out, state: FileState, nbytes: int) -> Chunk:
        table: pa.Table | None = None
        dead = empty_dead_letters()
        if out.rows:
            t = with_positions(records_to_table(out.rows), state.source, 0)
            t = t.set_column(
                t.column_names.index(ROW_COL), ROW_COL, pa.array(out.row_pos, pa.int64())
            )
            table, dead = self.apply_schema(t)
        if out.reasons:
            letters = self.dead(
                state,
                out.reasons,
                out.messages,
                out.payloads,
                line=out.lines,
                position=out.positions,
            )
            dead = concat([letters, dead]) if dead.num_rows else letters
        if table is not None:
            state.rows += table.num_rows
        out.clear()
        return Chunk(
            table=table if table is not None and table.num_rows else None,
            dead=dead if dead.num_rows else None,
            bytes_read=nbytes,
        )

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        out = _Out()
        progress = _Progress(state.size)
        failure: _Failure | None = None
        with self.open_bytes(path) as stream:
            head = stream.peek(256)[:256] if hasattr(stream, "peek") else b""
            encoding = _parser_encoding(head)
            try:
                yield from self._strict(stream, state, out, progress, encoding)
            except _Stop as stop:
                failure = stop.failure
        if failure is None:
            if len(out):
                yield self._flush(out, state, progress.rest())
            return
        if len(out):
            yield self._flush(out, state, 0)
        if b"\x00" in head[:4]:
            # a text encoding the second pass cannot tokenize: the rest of the file is lost
            yield Chunk(
                dead=self.dead(
                    state,
                    _reason(failure.message, None, False),
                    f"{failure.message}; the records after it in this file are not read (the "
                    "file's encoding does not allow resuming)",
                    None,
                    line=failure.line,
                    position=None,
                ),
                bytes_read=progress.rest(),
            )
            return
        with self.open_bytes(path) as stream:
            yield from self._resume(
                stream, state, out, progress, failure, encoding or _declared(head) or "utf-8"
            )
        yield self._flush(out, state, progress.rest())

    # -- first pass: lxml's strict pull parser ----------------------------------------------------

    def _strict(
        self,
        stream: IO[bytes],
        state: FileState,
        out: _Out,
        progress: _Progress,
        encoding: str | None,
    ) -> Iterator[Chunk]:
        limit = self.config.max_record_bytes
        parser = etree.XMLPullParser(events=("start", "end"), encoding=encoding, **_PARSER_OPTIONS)
        stack: list[str] = []
        depth = 0  # depth inside the current record (0: outside)
        record = 0  # records completed
        fed_before = 0  # bytes fed before the current feed
        fed = 0
        start_fed = 0  # bytes fed before the feed in which the current record started
        start_line: int | None = None
        oversize: str | None = None  # the oversize record's start tag
        record_elem: Any = None
        while True:
            data = stream.read(self._feed)
            fed_before, fed = fed, fed + len(data)
            try:
                if data:
                    parser.feed(data)
                else:
                    parser.close()
            except etree.XMLSyntaxError as exc:
                # libxml2 may have gone on past the error and auto-closed open elements (a
                # truncated record would look whole): no event of this feed is trusted, the
                # second pass reads its records again, one by one
                raise _Stop(
                    _Failure(
                        message=str(exc.msg) if exc.msg else str(exc),
                        line=exc.lineno if getattr(exc, "lineno", None) else None,
                        record=record,
                    )
                ) from None
            for event, elem in parser.read_events():
                if not isinstance(elem.tag, str):
                    continue
                if event == "start":
                    stack.append(_local(elem.tag))
                    if depth:
                        depth += 1
                    elif self._matches(stack):
                        depth = 1
                        start_fed = fed_before
                        start_line = elem.sourceline
                        record_elem = elem
                    continue
                stack.pop()
                if depth > 1:
                    depth -= 1
                    if oversize is not None:  # drop the content of a record too large to keep
                        _release(elem)
                    continue
                if depth == 0:
                    _release(elem)  # an element outside every record: not needed any more
                    continue
                depth = 0
                if oversize is not None:
                    out.letter(
                        "too_large",
                        f"the record is more than max_record_bytes={limit} bytes; it was "
                        "skipped and reading went on with the next record (payload: its first "
                        f"{OVERSIZE_HEAD} characters)",
                        oversize,
                        start_line,
                        record,
                    )
                    oversize = None
                else:
                    entities = _entities(elem)
                    if entities:  # not expanded (safety): the record cannot be read whole
                        text = etree.tostring(elem, encoding="unicode")[:MAX_PAYLOAD]
                        out.letter(
                            "parse_error", _entity_message(entities), text, start_line, record
                        )
                    else:
                        out.rows.append(_row(elem))
                        out.row_pos.append(record)
                record += 1
                record_elem = None
                _release(elem)
                if len(out) >= OBJECT_BATCH_ROWS:
                    yield self._flush(out, state, progress.at(fed))
            if depth and oversize is None and fed - start_fed > limit:
                oversize = etree.tostring(record_elem, encoding="unicode")[:OVERSIZE_HEAD]
                _release_children(record_elem)
            if not data:
                return

    # -- second pass: record by record, after a syntax error --------------------------------------

    def _resume(
        self,
        stream: IO[bytes],
        state: FileState,
        out: _Out,
        progress: _Progress,
        failure: _Failure,
        encoding: str,
    ) -> Iterator[Chunk]:
        limit = self.config.max_record_bytes
        utf8 = encoding.lower().replace("_", "-") in ("utf-8", "utf8")
        decl = f'<?xml version="1.0" encoding="{encoding}"?>'.encode()
        parser = etree.XMLParser(**_PARSER_OPTIONS)
        # the error is in the record that spans its line (which then fails on its own too), or
        # outside every record: then one letter without a position says so
        attributed = False
        for item in _split(stream, self._matches, limit, self._feed):
            if item.index < failure.record:
                continue  # emitted by the first pass
            if not attributed and failure.line is not None and item.line > failure.line:
                self._outside(out, failure)
                attributed = True
            if item.oversize:
                out.letter(
                    "too_large",
                    f"the record is more than max_record_bytes={limit} bytes; it was skipped "
                    "and reading went on with the next record (payload: its first "
                    f"{len(item.data)} bytes)",
                    item.data.decode("utf-8", "replace"),
                    item.line,
                    item.index,
                )
                rejected = True
            else:
                rejected = self._record(item, out, parser, decl, utf8)
            if rejected and (failure.line is None or item.line <= failure.line <= item.end_line):
                attributed = True
            if len(out) >= OBJECT_BATCH_ROWS:
                yield self._flush(out, state, progress.at(item.end))
        if not attributed:
            self._outside(out, failure)

    @staticmethod
    def _outside(out: _Out, failure: _Failure) -> None:
        out.letter(
            _reason(failure.message, None, False),
            f"{failure.message} (outside every record: no record is lost, reading resumed at "
            "the next record)",
            None,
            failure.line,
            None,
        )

    def _record(self, item: _Fragment, out: _Out, parser: Any, decl: bytes, utf8: bool) -> bool:
        """Parse one record on its own: a row, or a dead letter (then ``True``)."""
        frag = item.data
        payload = frag[:MAX_PAYLOAD].decode("utf-8", "replace")
        problem = item.problem
        elem: Any = None
        if problem is None:
            prefixes = {p for p in _PREFIX.findall(frag) if p not in (b"xml", b"xmlns")}
            ns = b"".join(b' xmlns:%s="urn:sluice:%s"' % (p, p) for p in sorted(prefixes))
            wrapped = decl + b"<sluice-record" + ns + b">" + frag + b"</sluice-record>"
            try:
                root = etree.fromstring(wrapped, parser)
                elem = next(c for c in root if isinstance(c.tag, str))
            except etree.XMLSyntaxError as exc:
                problem = _relocate(str(exc.msg or exc), item.line)
            except StopIteration:
                problem = "the record element is empty"
        if problem is not None:
            out.letter(_reason(problem, frag, utf8), problem, payload, item.line, item.index)
            return True
        entities = _entities(elem)
        if entities:
            out.letter("parse_error", _entity_message(entities), payload, item.line, item.index)
            return True
        out.rows.append(_row(elem))
        out.row_pos.append(item.index)
        return False


class _Stop(Exception):
    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class _Progress:
    """``bytes_read`` of the chunks: the decompressed bytes consumed, never past the file size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.done = 0

    def at(self, consumed: int) -> int:
        consumed = min(consumed, self.size)
        step = max(0, consumed - self.done)
        self.done += step
        return step

    def rest(self) -> int:
        return self.at(self.size)


def _release(elem: Any) -> None:
    """Free a completed element and the siblings before it (memory stays flat)."""
    elem.clear(keep_tail=False)
    parent = elem.getparent()
    if parent is not None:
        while elem.getprevious() is not None:
            del parent[0]


def _release_children(elem: Any) -> None:
    """Free the completed children of an element still being parsed (all but the last child,
    which may still be open)."""
    children = list(elem)
    for child in children[:-1]:
        elem.remove(child)


def _declared(head: bytes) -> str:
    m = _DECL.match(head)
    return m.group(1).decode().lower() if m else ""


def _parser_encoding(head: bytes) -> str | None:
    """The encoding to force on the parser: UTF-8 when the prolog names a UTF-16/32 encoding
    that the byte layer has already transcoded (the text is ASCII-based, so the name is stale)."""
    declared = _declared(head)
    if declared.startswith(_NOT_ASCII_BASED):
        return "utf-8"
    return None


def _relocate(message: str, first_line: int) -> str:
    """lxml's message about a record parsed on its own, with line numbers of the file."""
    message = _LOCATION.sub("", message)
    message = _LINE_REF.sub(lambda m: f"line {first_line + int(m.group(1)) - 1}", message)
    return f"{message} (record starting at line {first_line})"


# ------------------------------------------------------------------------- the record splitter


@dataclass
class _Fragment:
    """One record element's bytes (or the head of a record too large to keep)."""

    index: int  # 0-based among the record elements of the file
    line: int  # line of its start tag
    end_line: int  # line of its last byte
    data: bytes
    end: int  # stream offset just after it
    problem: str | None = None  # structural damage the splitter saw
    oversize: bool = False


def _split(
    stream: IO[bytes], matches: Callable[[list[str]], bool], limit: int, read_size: int
) -> Iterator[_Fragment]:
    """The record elements of ``stream`` in order, found by a tolerant tokenizer.

    Outside records the tokenizer keeps the stack of open element names (the context). A start
    tag whose path matches starts a record; the record ends at its matching end tag. Damage
    inside a record (an end tag that does not match, a ``<`` that starts no markup, the end of
    the file) marks it broken; a broken record ends at the next start tag that matches the record
    path at the broken record's level, at an end tag that closes the context, or at its own end
    tag. Memory: a record's bytes are held up to ``limit``, then only its head is kept.
    """
    buf = bytearray()
    base = 0  # stream offset of buf[0]
    eof = False
    line = 1  # the line of buf[line_at]
    line_at = 0
    context: list[str] = []
    index = 0
    rec_start = -1  # buffer index of the current record's start tag (-1: outside a record)
    rec_line = 0
    rec_stack: list[str] = []
    rec_problem: str | None = None
    rec_head = b""  # of an oversize record: its first bytes only
    rec_over = False
    pos = 0

    def fill() -> bool:
        nonlocal eof
        if eof:
            return False
        data = stream.read(max(read_size, 1 << 20))
        if not data:
            eof = True
            return False
        buf.extend(data)
        return True

    def line_of(i: int) -> int:
        nonlocal line, line_at
        if i >= line_at:
            line += buf.count(b"\n", line_at, i)
        else:
            line -= buf.count(b"\n", i, line_at)
        line_at = i
        return line

    def finish(end: int, problem: str | None) -> _Fragment:
        nonlocal rec_start, rec_stack, rec_problem, rec_head, rec_over, index
        last = line_of(max(end - 1, 0))
        if rec_over:
            frag = _Fragment(index, rec_line, last, rec_head, base + end, problem, oversize=True)
        else:
            data = bytes(buf[rec_start:end])
            frag = _Fragment(index, rec_line, last, data, base + end, problem)
        index += 1
        rec_start, rec_stack, rec_problem, rec_head, rec_over = -1, [], None, b"", False
        return frag

    def damage(at: int, what: str) -> None:
        nonlocal rec_problem
        if rec_start >= 0 and rec_problem is None:
            rec_problem = f"{what} (line {line_of(at)})"

    fill()
    while True:
        holding = rec_start >= 0 and not rec_over
        if holding and pos - rec_start > limit:  # too large to keep: only its head stays
            rec_head = bytes(buf[rec_start : rec_start + OVERSIZE_HEAD])
            rec_over, holding = True, False
        keep = rec_start if holding else pos
        if keep > 1 << 20:  # drop what is no longer needed
            line_of(keep)
            del buf[:keep]
            base += keep
            pos -= keep
            line_at -= keep
            if holding:
                rec_start -= keep
        lt = buf.find(b"<", pos)
        if lt < 0:
            pos = len(buf)
            if fill():
                continue
            break
        if len(buf) - lt < _LOOKAHEAD and fill():
            continue
        m = _TOKEN.match(buf, lt)
        while m is None and len(buf) - lt <= limit and _incomplete(buf, lt) and fill():
            m = _TOKEN.match(buf, lt)
        if m is None:  # a '<' that starts no markup
            pos = lt + 1
            damage(lt, "'<' that starts no markup")
            continue
        pos = m.end()
        end_name, start_name, empty = m.group(1), m.group(2), m.group(4)
        if start_name is not None:
            name = _blocal(start_name)
            if rec_start >= 0:
                if rec_problem is None or not matches([*context, name]):
                    if not empty:
                        rec_stack.append(name)
                    continue
                yield finish(lt, rec_problem)  # resynchronised: a new record starts here
            if matches([*context, name]):
                rec_start, rec_line, rec_stack = lt, line_of(lt), [name]
                if empty:
                    yield finish(pos, None)
            elif not empty:
                context.append(name)
            continue
        if end_name is None:
            continue  # comment, CDATA, processing instruction, DOCTYPE
        name = _blocal(end_name)
        if rec_start >= 0:
            if name in rec_stack:
                while rec_stack[-1] != name:
                    damage(lt, f"element <{rec_stack.pop()}> is not closed before </{name}>")
                rec_stack.pop()
                if not rec_stack:
                    yield finish(pos, rec_problem)
                continue
            damage(lt, f"end tag </{name}> does not match <{rec_stack[-1]}>")
            if name not in context:
                continue
            yield finish(lt, rec_problem)  # the broken record ends where its parent closes
        if name in context:
            while context.pop() != name:
                pass
    if rec_start >= 0:
        damage(len(buf), "the file ends inside this record")
        yield finish(len(buf), rec_problem)


def _incomplete(buf: bytes | bytearray, lt: int) -> bool:
    """Whether the markup at ``buf[lt]`` may be complete once more bytes are read."""
    for opener, closer in _ENDS.items():
        if buf.startswith(opener, lt) or opener.startswith(buf[lt : lt + len(opener)]):
            return buf.find(closer, lt) < 0
    return buf.find(b">", lt) < 0
