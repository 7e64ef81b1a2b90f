"""DuckDB sink: read back, one transaction per run, replace mode."""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from sluice.batch import with_positions
from sluice.config.models import DuckdbSink
from sluice.connectors.duckdb import DuckdbWriter
from sluice.errors import SinkError
from sluice.plugins import RunContext, Sink


def rows(start: int, n: int) -> pa.Table:
    t = pa.table(
        {
            "id": pa.array(range(start, start + n), pa.int64()),
            "amount": pa.array([decimal.Decimal(i) / 8 for i in range(n)], pa.decimal128(10, 3)),
            "day": pa.array([dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(n)]),
            "name": [None if i % 4 == 0 else f'q"{i},\n' for i in range(start, start + n)],
        }
    )
    return with_positions(t, "src", start)


def sink(**kw: object) -> DuckdbWriter:
    cfg = {"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "main.orders", **kw}
    return DuckdbWriter(DuckdbSink.model_validate(cfg))


def query(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def run(w: DuckdbWriter, tmp_path: Path, *batches: pa.Table) -> None:
    w.open(RunContext("p", "r1", tmp_path))
    for b in batches:
        assert w.write(b).num_rows == 0
    w.commit()


def test_write_and_read_back(tmp_path: Path) -> None:
    w = sink()
    assert isinstance(w, Sink)
    run(w, tmp_path, rows(0, 10), rows(10, 10))
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        back = con.sql("SELECT * FROM orders").to_arrow_table()
    expected = pa.concat_tables([rows(0, 10), rows(10, 10)]).drop_columns(
        ["__sluice_source", "__sluice_row"]
    )
    assert back.column_names == expected.column_names
    for name in expected.column_names:
        assert back[name].to_pylist() == expected[name].to_pylist(), name  # order kept


def test_append_and_alignment(tmp_path: Path) -> None:
    run(sink(), tmp_path, rows(0, 3))
    w = sink(table="orders")
    w.open(RunContext("p", "r2", tmp_path))
    assert w.write(rows(3, 2).select(["name", "id", "day", "amount"])).num_rows == 0
    dead = w.write(rows(5, 1).set_column(0, "id", pa.array(["x"])))
    assert dead.num_rows == 1 and "'id'" in dead["message"][0].as_py()
    w.commit()
    assert query(tmp_path, "SELECT id FROM orders") == [(i,) for i in range(5)]


def test_abort_rolls_back(tmp_path: Path) -> None:
    run(sink(), tmp_path, rows(0, 3))
    w = sink()
    w.open(RunContext("p", "r2", tmp_path))
    w.write(rows(3, 3))
    w.abort()
    assert query(tmp_path, "SELECT count(*) FROM orders") == [(3,)]


def test_replace_is_transactional(tmp_path: Path) -> None:
    run(sink(), tmp_path, rows(0, 3))
    w = sink(mode="replace")
    w.open(RunContext("p", "r2", tmp_path))
    w.write(pa.table({"other": ["a"]}))
    w.abort()
    assert query(tmp_path, "SELECT count(*) FROM orders") == [(3,)]  # old table kept
    run(sink(mode="replace"), tmp_path, pa.table({"other": ["a", "b"]}))
    assert query(tmp_path, "SELECT * FROM orders") == [("a",), ("b",)]


def test_new_schema_and_empty_run(tmp_path: Path) -> None:
    w = sink(table="stage.empty")
    run(w, tmp_path, rows(0, 0))
    assert query(tmp_path, "SELECT count(*) FROM stage.empty") == [(0,)]


def test_constraint_violation_fails_the_run(tmp_path: Path) -> None:
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("CREATE TABLE orders (id BIGINT PRIMARY KEY, v VARCHAR)")
    w = sink()
    w.open(RunContext("p", "r1", tmp_path))
    w.write(pa.table({"id": [1, 2], "v": ["a", "b"]}))
    with pytest.raises(SinkError, match="orders"):
        w.write(pa.table({"id": [2], "v": ["dup"]}))
    w.abort()
    assert query(tmp_path, "SELECT count(*) FROM orders") == [(0,)]
