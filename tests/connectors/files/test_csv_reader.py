"""CsvReader: pyarrow streaming, safe mode for type/encoding trouble, dead letters, positions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.batch import POSITION_COLS, ROW_COL, SOURCE_COL, source_names
from sluice.config.models import CsvSource
from sluice.connectors.files.csv import CsvReader
from sluice.errors import SourceError
from sluice.plugins import RunContext, Source
from sluice.testing import drain


@dataclass
class Out:
    tables: list[pa.Table]
    dead: pa.Table
    nbytes: int

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in r.items() if k not in POSITION_COLS}
            for t in self.tables
            for r in t.to_pylist()
        ]

    @property
    def positions(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for t in self.tables:
            names = source_names(t.column(SOURCE_COL)).to_pylist()
            out += zip(names, t.column(ROW_COL).to_pylist(), strict=True)
        return out


def run(path: Path | str, base: Path | None = None, **kw: Any) -> Out:
    reader = CsvReader(CsvSource(kind="csv", path=str(path), **kw))
    assert isinstance(reader, Source)
    return Out(*drain(reader, base or Path("/")))


SPECTRUM = [
    "comma_in_quotes",
    "empty",
    "empty_crlf",
    "escaped_quotes",
    "json",
    "newlines",
    "newlines_crlf",
    "quotes_and_newlines",
    "simple",
    "simple_crlf",
    "utf8",
]


@pytest.mark.parametrize("name", SPECTRUM)
def test_csv_spectrum(shared_data: Path, name: str) -> None:
    path = shared_data / "csv-spectrum" / "csvs" / f"{name}.csv"
    expected = json.loads((shared_data / "csv-spectrum" / "json" / f"{name}.json").read_text())
    out = run(path, infer_types=False, null_values=[])
    assert out.rows == expected
    assert out.dead.num_rows == 0
    assert out.nbytes == path.stat().st_size


def test_spectrum_is_all_files(shared_data: Path) -> None:
    assert sorted(p.stem for p in (shared_data / "csv-spectrum" / "csvs").glob("*.csv")) == SPECTRUM


def test_positions_across_batches_and_bytes(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("id,name\n" + "".join(f"{i},name-{i}\n" for i in range(5000)))
    out = run(p, block_size=4096)
    assert len(out.tables) > 3
    assert out.positions == [(str(p), i) for i in range(5000)]
    assert [r["id"] for r in out.rows] == list(range(5000))
    assert out.tables[0].schema.field("id").type == pa.int64()
    assert {t.schema for t in out.tables} == {out.tables[0].schema}
    assert out.nbytes == p.stat().st_size


def test_glob_sorted_and_relative(tmp_path: Path) -> None:
    for name in ["b.csv", "a.csv", "c.csv"]:
        (tmp_path / name).write_text(f"x\n{name}\n")
    out = run("*.csv", base=tmp_path)
    assert [r["x"] for r in out.rows] == ["a.csv", "b.csv", "c.csv"]
    assert [s for s, _ in out.positions] == [str(tmp_path / n) for n in ["a.csv", "b.csv", "c.csv"]]


def test_glob_matching_nothing(tmp_path: Path) -> None:
    reader = CsvReader(CsvSource(kind="csv", id="orders_in", path="nothing/*.csv"))
    with pytest.raises(SourceError) as err:
        reader.open(RunContext(pipeline="p", run_id="r", base_dir=tmp_path))
    assert "orders_in" in str(err.value) and "nothing/*.csv" in str(err.value)
    assert "Fix:" in str(err.value)


def test_missing_plain_file(tmp_path: Path) -> None:
    reader = CsvReader(CsvSource(kind="csv", id="s1", path="missing.csv"))
    with pytest.raises(SourceError, match=r"s1.*missing\.csv"):
        reader.open(RunContext(pipeline="p", run_id="r", base_dir=tmp_path))


def test_column_count_dead_letters(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("a,b\n1,2\n3,4,5\n6\n7,8\n")
    out = run(p)
    assert out.rows == [{"a": 1, "b": 2}, {"a": 7, "b": 8}]
    d = out.dead.to_pylist()
    assert [x["reason"] for x in d] == ["column_count", "column_count"]
    assert [x["payload"] for x in d] == ["3,4,5", "6"]
    assert d[0]["message"] == "expected 2 columns, got 3"
    assert all(x["source"] == str(p) for x in d)


def test_type_change_mid_stream_no_loss_no_dup(tmp_path: Path) -> None:
    # a declared type: values that do not fit it are letters, wherever they are in the file
    # (without the declaration, the column is inferred over the whole file and holds strings:
    # see test_i8_04_inferred_types_never_reject_a_row)
    p = tmp_path / "a.csv"
    lines = [f"{i},v{i}" for i in range(3000)] + ["oops,bad", "3001,ok", "2.5,also-bad", "3003,ok"]
    p.write_text("n,s\n" + "\n".join(lines) + "\n")
    out = run(p, block_size=4096, schema={"n": "int64"})
    ns = [r["n"] for r in out.rows]
    assert ns == [*range(3000), 3001, 3003]
    assert out.tables[-1].schema.field("n").type == pa.int64()
    d = out.dead.to_pylist()
    assert [x["reason"] for x in d] == ["cast_error", "cast_error"]
    assert [x["position"] for x in d] == [3000, 3002]
    assert json.loads(d[0]["payload"]) == {"n": "oops", "s": "bad"}
    assert "'n'" in d[0]["message"] and "oops" in d[0]["message"] and "int64" in d[0]["message"]
    positions = [pos for _, pos in out.positions]
    assert positions == [*range(3000), 3001, 3003]


def test_explicit_schema(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("id,price,when\n1,1.50,2024-01-02\n2,x,2024-01-03\n3,2.25,2024-01-04\n")
    out = run(p, schema={"id": "int32", "price": "decimal(10,2)", "when": "date"})
    t = out.tables[0]
    assert t.schema.field("id").type == pa.int32()
    assert t.schema.field("price").type == pa.decimal128(10, 2)
    assert t.schema.field("when").type == pa.date32()
    assert [r["id"] for r in out.rows] == [1, 3]
    assert out.dead.column("reason").to_pylist() == ["cast_error"]
    assert out.dead.column("position").to_pylist() == [1]


def test_infer_false_all_strings(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("a,b\n1,true\n,x\n")
    out = run(p, infer_types=False)
    assert out.rows == [{"a": "1", "b": "true"}, {"a": None, "b": "x"}]


def test_latin1(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_bytes("name,city\nJosé,Zürich\nÅsa,Malmö\n".encode("latin-1"))
    out = run(p, encoding="latin-1")
    assert out.rows == [{"name": "José", "city": "Zürich"}, {"name": "Åsa", "city": "Malmö"}]


def test_utf16_with_bom(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_bytes("name,n\r\nJosé,1\r\n日本,2\r\n".encode("utf-16"))
    assert p.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    out = run(p, encoding="utf-16")
    assert out.rows == [{"name": "José", "n": 1}, {"name": "日本", "n": 2}]


def test_crlf_and_quoted_newlines(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_bytes(b'a,b\r\n"line1\r\nline2",2\r\n"say ""hi""",3\r\n')
    out = run(p)
    assert out.rows == [{"a": "line1\r\nline2", "b": 2}, {"a": 'say "hi"', "b": 3}]


def test_invalid_utf8_rows(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    good = [f"{i},ok{i}" for i in range(50)]
    p.write_bytes(("a,b\n" + "\n".join(good) + "\n").encode() + b"50,bad\xff\xfe\n51,fine\n")
    out = run(p)
    assert [r["a"] for r in out.rows] == [*range(50), 51]
    assert out.dead.column("reason").to_pylist() == ["encoding"]
    assert out.dead.column("position").to_pylist() == [50]


def test_invalid_utf8_later_block(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    body = "".join(f"{i},text{i}\n" for i in range(2000)).encode()
    p.write_bytes(b"a,b\n" + body + b"2000,\xc3\x28\n2001,z\n")
    out = run(p, block_size=4096)
    assert [r["a"] for r in out.rows] == [*range(2000), 2001]
    assert out.dead.column("reason").to_pylist() == ["encoding"]


def test_bad_bytes_in_declared_latin2_like_codec(tmp_path: Path) -> None:
    # 0x81 is undefined in cp1252: the row becomes an encoding dead letter, the rest is read.
    p = tmp_path / "a.csv"
    p.write_bytes(b"a,b\n1,caf\xe9\n2,x\x81y\n3,z\n")
    out = run(p, encoding="cp1252")
    assert out.rows == [{"a": 1, "b": "café"}, {"a": 3, "b": "z"}]
    assert out.dead.column("reason").to_pylist() == ["encoding"]


def test_header_only_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("a,b\n")
    (tmp_path / "e.csv").write_bytes(b"")
    for name in ["h.csv", "e.csv"]:
        out = run(tmp_path / name)
        assert out.rows == [] and out.dead.num_rows == 0


def test_corrupt_file_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / "b.csv").write_text("x\n2\n")
    real = CsvReader._read_file

    def boom(self: CsvReader, path: Path, state: Any) -> Any:
        if path.name == "a.csv":
            raise RuntimeError("disk on fire")
        return real(self, path, state)

    monkeypatch.setattr(CsvReader, "_read_file", boom)
    out = run(tmp_path / "*.csv")
    assert out.rows == [{"x": 2}]
    d = out.dead.to_pylist()
    assert len(d) == 1 and d[0]["reason"] == "corrupt_file" and d[0]["message"] == "disk on fire"
    assert d[0]["source"] == str(tmp_path / "a.csv") and d[0]["payload"] is None


def test_no_header_column_names(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("1;x\n2;y\n")
    out = run(p, header=False, column_names=["n", "s"], delimiter=";")
    assert out.rows == [{"n": 1, "s": "x"}, {"n": 2, "s": "y"}]


GOOD = st.tuples(st.integers(-(10**9), 10**9), st.text("abcxyz ", max_size=8))
ROW = st.one_of(
    GOOD.map(lambda g: ("good", g)),
    st.just(("fields", None)),
    st.just(("uncastable", None)),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(ROW, min_size=1, max_size=300), block=st.sampled_from([4096, 1 << 20]))
def test_conservation(
    tmp_path_factory: pytest.TempPathFactory, rows: list[Any], block: int
) -> None:
    p = tmp_path_factory.mktemp("h") / "a.csv"
    lines = ["n,s"]
    for kind, g in rows:
        if kind == "good":
            lines.append(f'{g[0]},"{g[1]}"')
        elif kind == "fields":
            lines.append("1,2,3")
        else:
            lines.append("notanint,zz")
    p.write_text("\n".join(lines) + "\n")
    out = run(p, block_size=block, schema={"n": "int64", "s": "string"})
    expected = [{"n": g[0], "s": g[1] if g[1] else None} for k, g in rows if k == "good"]
    assert out.rows == expected
    assert len(out.rows) + out.dead.num_rows == len(rows)
    reasons = out.dead.column("reason").to_pylist()
    assert reasons.count("column_count") == sum(k == "fields" for k, _ in rows)
    assert reasons.count("cast_error") == sum(k == "uncastable" for k, _ in rows)
