"""XmlReader: record paths, flattening, hostile input, syntax errors mid-file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

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
    assert rows == [{"i": "1"}, {"i": "2"}, {"i": "5"}]
    d = dead.to_pylist()
    assert len(d) == 1 and d[0]["reason"] == "parse_error" and d[0]["line"] == 4
    assert d[0]["source"] == str(tmp_path / "a.xml")


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
    # libxml2 refuses the amplification before any expansion: one parse_error, no crash.
    assert all(len(str(v)) < 1000 for r in rows for v in r.values() if v)
    assert dead.column("reason").to_pylist() == ["parse_error"]


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
