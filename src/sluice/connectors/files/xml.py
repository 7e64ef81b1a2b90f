"""XML reader: ``lxml.etree.iterparse`` over the file, one row per ``record_path`` element."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from lxml import etree

from sluice.batch import with_positions
from sluice.config.models import XmlSource
from sluice.connectors.files._common import (
    OBJECT_BATCH_ROWS,
    FileReader,
    FileState,
    records_to_table,
)
from sluice.plugins import Chunk


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if tag.startswith("{") else tag


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
    (billion-laughs and XXE references stay unexpanded and are dropped), ``huge_tree`` is off.
    Processed records are cleared so memory stays flat. A syntax error mid-file: the records
    before it are emitted, then one ``parse_error`` dead letter with the line number (``encoding``
    when the message is about the byte encoding), and the run goes on with the next file.
    """

    def __init__(self, config: XmlSource) -> None:
        super().__init__(config)
        self.config: XmlSource = config
        path = config.record_path.strip()
        self._anchored = path.startswith("/")
        self._parts = [p for p in path.strip("/").split("/") if p]

    def _matches(self, stack: list[str]) -> bool:
        n = len(self._parts)
        if len(stack) < n or (self._anchored and len(stack) != n):
            return False
        return stack[-n:] == self._parts

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        rows: list[dict[str, Any]] = []
        entity_dead: list[tuple[str, list[str], int | None]] = []
        stack: list[str] = []
        depth_in_record = 0
        last = 0
        with open(path, "rb") as f:
            # a pull parser fed block by block: records before a syntax error are still read
            # (lxml's iterparse may parse a whole small file before yielding anything)
            parser = etree.XMLPullParser(
                events=("start", "end"),
                resolve_entities=False,
                no_network=True,
                load_dtd=False,
                huge_tree=False,
                remove_comments=True,
                remove_pis=True,
            )
            events = _pull_events(parser, f)
            try:
                for event, elem in events:
                    if not isinstance(elem.tag, str):
                        continue
                    if event == "start":
                        stack.append(_local(elem.tag))
                        if depth_in_record:
                            depth_in_record += 1
                        elif self._matches(stack):
                            depth_in_record = 1
                        continue
                    stack.pop()
                    if depth_in_record == 1:
                        entities = [n.text for n in elem.iter() if isinstance(n, etree._Entity)]
                        if entities:  # not expanded (safety): the record cannot be read whole
                            text = etree.tostring(elem, encoding="unicode")[: 64 * 1024]
                            entity_dead.append(
                                (text, sorted(set(map(str, entities))), elem.sourceline)
                            )
                            elem.clear(keep_tail=False)
                            if depth_in_record:
                                depth_in_record -= 1
                            continue
                        row: dict[str, Any] = {}
                        _flatten(elem, "", row)
                        text = elem.text
                        if text and text.strip() and not any(isinstance(c.tag, str) for c in elem):
                            _put(row, _local(elem.tag), text)
                        rows.append(row)
                        elem.clear(keep_tail=False)
                        parent = elem.getparent()
                        if parent is not None:
                            while elem.getprevious() is not None:
                                del parent[0]
                        if len(rows) >= OBJECT_BATCH_ROWS:
                            pos = f.tell()
                            yield self._emit(rows, state, pos - last)
                            last = pos
                            rows = []
                    if len(entity_dead) >= OBJECT_BATCH_ROWS:
                        yield Chunk(dead=self._entity_letters(state, entity_dead))
                        entity_dead = []
                    if depth_in_record:
                        depth_in_record -= 1
            except etree.XMLSyntaxError as exc:
                if rows:
                    yield self._emit(rows, state, 0)
                    rows = []
                if entity_dead:
                    yield Chunk(dead=self._entity_letters(state, entity_dead))
                    entity_dead = []
                message = str(exc)
                low = message.lower()
                reason = "encoding" if "encoding" in low or "utf-8" in low else "parse_error"
                line = exc.lineno if getattr(exc, "lineno", None) else None
                yield Chunk(dead=self.dead(state, reason, message, None, line=line))
                return
        if rows:
            yield self._emit(rows, state, 0)
        if entity_dead:
            yield Chunk(dead=self._entity_letters(state, entity_dead))

    def _entity_letters(
        self, state: FileState, items: list[tuple[str, list[str], int | None]]
    ) -> pa.Table:
        return self.dead(
            state,
            "parse_error",
            [
                f"the record uses entity reference(s) {', '.join(f'&{e};' for e in ents)}, which "
                "are not expanded (a safety rule against entity attacks)"
                for _, ents, _ in items
            ],
            [t for t, _, _ in items],
            line=[ln for _, _, ln in items],
        )

    def _emit(self, rows: list[dict[str, Any]], state: FileState, nbytes: int) -> Chunk:
        table = records_to_table(rows)
        table = with_positions(table, state.source, state.rows)
        table, dead = self.apply_schema(table)
        state.rows += table.num_rows + dead.num_rows
        return Chunk(
            table=table if table.num_rows else None,
            dead=dead if dead.num_rows else None,
            bytes_read=nbytes,
        )


def _pull_events(parser: Any, f: Any, block: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """Events of ``parser`` fed from ``f``; a syntax error is raised after the events parsed
    before it were yielded."""
    while True:
        data = f.read(block)
        error: etree.XMLSyntaxError | None = None
        try:
            if data:
                parser.feed(data)
            else:
                parser.close()
        except etree.XMLSyntaxError as exc:
            error = exc
        yield from parser.read_events()
        if error is not None:
            raise error
        if not data:
            return
