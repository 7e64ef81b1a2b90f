"""XmlReader: record paths, flattening, hostile input, syntax errors mid-file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sluice.batch import POSITION_COLS, ROW_COL
from sluice.config.models import XmlSource
from sluice.connectors.files.xml import XmlReader
from sluice.testing import drain


def run(path: Path | str, **kw: Any) -> tuple[list[dict[str, Any]], pa.Table, list[pa.Table]]:
    tables, dead_table, _ = drain(XmlReader(XmlSource(kind="xml", path=str(path), **kw)))
    rows = [
        {k: v for k, v in r.items() if k not in POSITION_COLS}
        for t in tables
        for r in t.to_pylist()
    ]
    return rows, dead_table, tables


ORDERS = """<?xml version="1.0"?>
<orders>
  <order id="1"><customer><name>Ann</name><city>Oslo</city></customer><total>9.5</total></order>
  <order id="2"><customer><name>Bo</name></customer><total>3</total><note/></order>
  <other><order id="99"/></other>
</orders>
"""


def test_records_and_flattening(tmp_path: Path) -> None:
    p = tmp_path / "a.xml"
    p.write_text(ORDERS)
    rows, dead, tables = run(p, record_path="orders/order", schema={"total": "double"})
    assert dead.num_rows == 0
    assert rows == [
        {"id": "1", "customer.name": "Ann", "customer.city": "Oslo", "total": 9.5, "note": None},
        {"id": "2", "customer.name": "Bo", "customer.city": None, "total": 3.0, "note": None},
    ]
    assert tables[0].column(ROW_COL).to_pylist() == [0, 1]
    rows, _, _ = run(p, record_path="order")
    assert [r["id"] for r in rows] == ["1", "2", "99"]


def test_many_records_batches(tmp_path: Path) -> None:
    p = tmp_path / "a.xml"
    p.write_text("<r>" + "".join(f"<i n='{k}'/>" for k in range(70000)) + "</r>")
    rows, _, tables = run(p, record_path="i")
    assert len(tables) == 2
    assert [int(r["n"]) for r in rows] == list(range(70000))
    assert [x for t in tables for x in t.column(ROW_COL).to_pylist()] == list(range(70000))


def test_syntax_error_mid_file_then_next_file(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text("<r>\n<i>1</i>\n<i>2</i>\n<i>3</oops>\n<i>4</i></r>")
    (tmp_path / "b.xml").write_text("<r><i>5</i></r>")
    rows, dead, _ = run(tmp_path / "*.xml", record_path="r/i")
    assert rows == [{"i": "1"}, {"i": "2"}, {"i": "4"}, {"i": "5"}]
    d = dead.to_pylist()
    assert [(x["reason"], x["position"], x["line"]) for x in d] == [("parse_error", 2, 4)]
    assert d[0]["source"] == str(tmp_path / "a.xml") and d[0]["payload"] == "<i>3</oops>\n"


MALFORMED = {
    # the record's own markup is broken
    "end tag mismatch": (b"<i>3</oops>", "parse_error"),
    "unclosed child": (b"<i><a>3</i>", "parse_error"),
    "attribute without quotes": (b"<i a=x>3</i>", "parse_error"),
    "bare ampersand": (b"<i>2 & 3</i>", "parse_error"),
    "bare less-than": (b"<i>2 < 3</i>", "parse_error"),
    "control character": (b"<i>2 \x01 3</i>", "parse_error"),
    "undefined entity": (b"<i>&nope;</i>", "parse_error"),
    "duplicate attribute": (b'<i a="1" a="2">3</i>', "parse_error"),
    "invalid UTF-8": (b"<i>caf\xe9</i>", "encoding"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("layout", ["lines", "one line"])
def test_i8_xml_resynchronises_after_a_malformed_record(
    tmp_path: Path, case: str, layout: str
) -> None:
    """The records after a malformed one are read (resynchronised at the next record), and the
    malformed record is one letter with its position and line."""
    bad, reason = MALFORMED[case]
    sep = b"\n" if layout == "lines" else b""
    good = [b"<i><n>%d</n></i>" % k for k in range(6)]
    body = sep.join([*good[:3], bad, *good[3:]])
    p = tmp_path / "a.xml"
    p.write_bytes(b'<?xml version="1.0"?>' + sep + b"<r>" + sep + body + sep + b"</r>" + sep)
    rows, dead, tables = run(p, record_path="r/i")
    assert [r["n"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    positions = [x for t in tables for x in t.column(ROW_COL).to_pylist()]
    assert positions == [0, 1, 2, 4, 5, 6]  # the rejected record keeps its place
    line = 6 if layout == "lines" else 1
    d = dead.to_pylist()
    assert [(x["reason"], x["position"], x["line"]) for x in d] == [(reason, 3, line)]
    assert d[0]["payload"].startswith("<i") and d[0]["source"] == str(p)


def test_i8_xml_truncated_record_is_a_dead_letter_not_a_row(tmp_path: Path) -> None:
    """libxml2 closes open elements at the end of the input: the truncated last record must not
    come out as a row."""
    p = tmp_path / "a.xml"
    p.write_bytes(b"<r>\n<i>1</i>\n<i>2</i>\n<i>3")
    rows, dead, _ = run(p, record_path="i")
    assert rows == [{"i": "1"}, {"i": "2"}]
    assert [(d["reason"], d["position"], d["line"]) for d in dead.to_pylist()] == [
        ("parse_error", 2, 4)
    ]


def test_i8_xml_damage_outside_records_loses_no_record(tmp_path: Path) -> None:
    p = tmp_path / "a.xml"
    p.write_bytes(b"<r>\n<i>1</i>\n junk & < \n<i>2</i>\n<i>3</i>\n")  # and no </r>
    rows, dead, tables = run(p, record_path="i")
    assert rows == [{"i": "1"}, {"i": "2"}, {"i": "3"}]
    assert [x for t in tables for x in t.column(ROW_COL).to_pylist()] == [0, 1, 2]
    d = dead.to_pylist()
    assert [(x["reason"], x["position"], x["line"]) for x in d] == [("parse_error", None, 3)]
    assert "no record is lost" in d[0]["message"]


def test_i8_25_xml_dead_letters_carry_position_and_line(tmp_path: Path) -> None:
    p = tmp_path / "e.xml"
    p.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE o [<!ENTITY who "Ann">]>\n<orders>\n'
        "<order><n>a</n><total>1</total></order>\n"
        "<order><n>&who;</n><total>2</total></order>\n"
        "<order><n>c</n><total>x</total></order>\n"
        "<order><n>d</n><total>4</total></order>\n</orders>\n"
    )
    rows, dead, tables = run(p, record_path="order", schema={"total": "int"})
    assert [r["n"] for r in rows] == ["a", "d"]
    assert [x for t in tables for x in t.column(ROW_COL).to_pylist()] == [0, 3]
    letters = sorted((d["reason"], d["position"], d["source"]) for d in dead.to_pylist())
    assert letters == [("cast_error", 2, str(p)), ("parse_error", 1, str(p))]
    assert {d["reason"]: d["line"] for d in dead.to_pylist()}["parse_error"] == 5


def test_i8_10_xml_invalid_utf8_is_an_encoding_letter_for_that_record(tmp_path: Path) -> None:
    p = tmp_path / "a.xml"
    p.write_bytes(b"<r><i>ok</i><i>caf\xe9</i><i>\xc3\xa9t\xc3\xa9</i></r>")
    rows, dead, _ = run(p, record_path="i")
    assert rows == [{"i": "ok"}, {"i": "été"}]
    assert [(d["reason"], d["position"]) for d in dead.to_pylist()] == [("encoding", 1)]


def test_i8_xml_utf16_document_with_a_byte_order_mark(tmp_path: Path) -> None:
    """The byte layer hands UTF-8 to the reader; the prolog's encoding="UTF-16" is then stale
    and must not be obeyed (also when resuming after an error)."""
    p = tmp_path / "a.xml"
    text = '<?xml version="1.0" encoding="UTF-16"?>\n<r><i>é</i>\n<i>3</oops>\n<i>ü</i></r>'
    p.write_bytes(text.encode("utf-16"))
    rows, dead, _ = run(p, record_path="i")
    assert rows == [{"i": "é"}, {"i": "ü"}]
    assert [(d["reason"], d["position"], d["line"]) for d in dead.to_pylist()] == [
        ("parse_error", 1, 3)
    ]


@pytest.mark.parametrize("broken", [False, True])
def test_i8_15_xml_record_over_max_record_bytes_is_too_large(tmp_path: Path, broken: bool) -> None:
    """A 60 MB record with max_record_bytes = 1 MiB: a too_large letter, the next record is read,
    memory stays flat (in a fresh process), in the first pass and after a syntax error."""
    p = tmp_path / "big.xml"
    with p.open("wb") as f:
        f.write(b"<r>\n" + (b"<i>3</oops>\n" if broken else b"") + b"<i><v>1</v></i>\n<i>")
        piece = b"<v>" + b"x" * 1000 + b"</v>\n"
        for _ in range(60_000):
            f.write(piece)
        f.write(b"</i>\n<i><v>4</v></i>\n</r>\n")
    script = f"""
import json, resource
from sluice.config.models import XmlSource
from sluice.connectors.files.xml import XmlReader
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = XmlSource(kind="xml", path={str(p)!r}, record_path="i", max_record_bytes=1 << 20)
reader = XmlReader(cfg)
rows, dead = [], []
for c in reader.read():
    if c.table is not None:
        rows += c.table.column("v").to_pylist()
    if c.dead is not None:
        dead += [(d["reason"], d["position"], d["line"]) for d in c.dead.to_pylist()]
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
print(json.dumps({{"rows": rows, "dead": dead, "grown_mb": grown}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rows"] == ["1", "4"]
    letters = [["too_large", 2, 4] if broken else ["too_large", 1, 3]]
    if broken:
        letters.insert(0, ["parse_error", 0, 2])
    assert sorted(result["dead"]) == sorted(letters)
    assert result["grown_mb"] < 40, result  # the record is 60 MB


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<r><i><v>&lol9;</v></i></r>
"""


def test_billion_laughs_not_expanded(tmp_path: Path) -> None:
    p = tmp_path / "a.xml"
    p.write_text(BILLION_LAUGHS)
    rows, dead, _ = run(p, record_path="i")
    # libxml2 refuses the amplification before any expansion (a letter for the DTD, which is
    # outside every record); the record that uses the entity is a letter of its own. No crash.
    assert rows == []
    assert [(d["reason"], d["position"]) for d in dead.to_pylist()] == [
        ("parse_error", None),
        ("parse_error", 0),
    ]


def test_xxe_not_resolved(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    p = tmp_path / "a.xml"
    p.write_text(
        f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]>'
        "<r><i><v>&x;</v></i></r>"
    )
    rows, dead, _ = run(p, record_path="i")
    assert "TOP-SECRET" not in repr(rows) + repr(dead.to_pylist())


def test_records_using_entities_are_dead_letters_not_silently_changed(tmp_path: Path) -> None:
    p = tmp_path / "e.xml"
    p.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE o [<!ENTITY who "Ann">]>\n'
        "<orders><order><name>&who;</name><total>1</total></order>\n"
        "<order><name>Bo</name><total>2</total></order></orders>\n"
    )
    rows, dead, _ = run(p, record_path="order")
    assert rows == [{"name": "Bo", "total": "2"}]
    letters = dead.to_pylist()
    assert [(d["reason"], d["line"]) for d in letters] == [("parse_error", 3)]
    assert "&who;" in letters[0]["message"] and "<name>" in letters[0]["payload"]
