"""DuckDB sink: read back, one transaction per run, replace mode.

Runs go through the runtime's epoch adapter (:class:`run_path.RunPath`: rows staged, then
published with the run's marker), as ``sluice run`` drives the sink. The plain batch-sink calls
(``write``/``commit``/``abort`` on the writer) are no longer used by runs; the tests of their
own guarantees are at the end, until that path is removed (issue 9)."""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from run_path import RunPath

from sluice.batch import with_positions
from sluice.config.models import DuckdbSink
from sluice.connectors.duckdb import DuckdbWriter
from sluice.errors import SinkError
from sluice.plugins import EpochPublisher, RunContext, Sink


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


def run(w: DuckdbWriter, tmp_path: Path, *batches: pa.Table, run_id: str = "r1") -> RunPath:
    """One batch run of ``w`` as the runtime drives it."""
    rp = RunPath(w, w.config)
    rp.open(RunContext("p", run_id, tmp_path))
    for b in batches:
        assert rp.write(b).num_rows == 0
    assert rp.commit().num_rows == 0
    return rp


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
    rp = RunPath(w := sink(table="orders"), w.config)
    rp.open(RunContext("p", "r2", tmp_path))
    assert rp.write(rows(3, 2).select(["name", "id", "day", "amount"])).num_rows == 0
    rp.write(rows(5, 1).set_column(0, "id", pa.array(["x"])))
    dead = rp.commit()  # refused at publish, where the table's schema is known
    assert dead.num_rows == 1 and "'id'" in dead["message"][0].as_py()
    assert dead["position"].to_pylist() == [5]
    assert query(tmp_path, "SELECT id FROM orders") == [(i,) for i in range(5)]


def test_abort_rolls_back(tmp_path: Path) -> None:
    run(sink(), tmp_path, rows(0, 3))
    rp = RunPath(w := sink(), w.config)
    rp.open(RunContext("p", "r2", tmp_path))
    rp.write(rows(3, 3))
    rp.abort()
    assert query(tmp_path, "SELECT count(*) FROM orders") == [(3,)]


def test_replace_is_transactional(tmp_path: Path) -> None:
    run(sink(), tmp_path, rows(0, 3))
    rp = RunPath(w := sink(mode="replace"), w.config)
    rp.open(RunContext("p", "r2", tmp_path))
    rp.write(pa.table({"other": ["a"]}))
    rp.abort()
    assert query(tmp_path, "SELECT count(*) FROM orders") == [(3,)]  # old table kept
    run(sink(mode="replace"), tmp_path, pa.table({"other": ["a", "b"]}), run_id="r3")
    assert query(tmp_path, "SELECT * FROM orders") == [("a",), ("b",)]
    run(sink(mode="replace"), tmp_path, pa.table({"other": ["c"]}), run_id="r4")
    assert query(tmp_path, "SELECT * FROM orders") == [("c",)]  # every run replaces it


def test_new_schema_and_empty_run(tmp_path: Path) -> None:
    w = sink(table="stage.empty")
    run(w, tmp_path, rows(0, 0))
    assert query(tmp_path, "SELECT count(*) FROM stage.empty") == [(0,)]
    # a replace run without rows replaces the table by an empty one
    run(sink(table="stage.full"), tmp_path, rows(0, 3), run_id="r2")
    run(sink(table="stage.full", mode="replace"), tmp_path, rows(0, 3).slice(0, 0), run_id="r3")
    assert query(tmp_path, "SELECT count(*) FROM stage.full") == [(0,)]


def test_constraint_violation_fails_the_run(tmp_path: Path) -> None:
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("CREATE TABLE orders (id BIGINT PRIMARY KEY, v VARCHAR)")
    rp = RunPath(w := sink(), w.config)
    rp.open(RunContext("p", "r1", tmp_path))
    rp.write(pa.table({"id": [1, 2], "v": ["a", "b"]}))
    rp.write(pa.table({"id": [2], "v": ["dup"]}))
    with pytest.raises(SinkError, match="orders"):  # the publish's transaction rolls back
        rp.commit(attempts=1)
    assert query(tmp_path, "SELECT count(*) FROM orders") == [(0,)]


# ------------------------------------------------------------------------------- stream mode


def test_publish_epochs_exactly_once(tmp_path: Path) -> None:
    w = sink()
    assert isinstance(w, EpochPublisher) and isinstance(w, Sink)
    w.open(RunContext("p", "r1", tmp_path))
    assert w.published_epoch() is None
    for epoch, start in ((1, 0), (2, 5), (3, 10)):
        assert w.publish(epoch, rows(start, 5)).num_rows == 0
    assert w.published_epoch() == 3
    assert w.publish(2, rows(5, 5)).num_rows == 0  # a replayed epoch: skipped
    assert w.publish(3, rows(10, 5)).num_rows == 0
    w.close()
    assert query(tmp_path, "SELECT id FROM orders ORDER BY id") == [(i,) for i in range(15)]
    assert query(tmp_path, "SELECT * FROM sluice_epochs") == [("p", "db@r1", 3)]
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        back = con.sql("SELECT * FROM orders").to_arrow_table()
    assert back.column_names == ["id", "amount", "day", "name"]  # positions stripped

    fresh = sink()  # a new checkpoint history (state deleted): old markers are not its own
    fresh.open(RunContext("p", "r2", tmp_path))
    assert fresh.published_epoch() is None
    fresh.close()
    again = sink()  # after a restart: the stream runtime passes the same run id
    again.open(RunContext("p", "r1", tmp_path))
    assert again.published_epoch() == 3
    assert again.publish(3, rows(10, 5)).num_rows == 0
    assert again.publish(4, rows(15, 1)).num_rows == 0
    assert again.published_epoch() == 4
    again.close()
    assert query(tmp_path, "SELECT count(*), count(DISTINCT id) FROM orders") == [(16, 16)]


def test_marker_is_per_pipeline_and_sink_next_to_the_table(tmp_path: Path) -> None:
    w = sink(table="stage.orders")
    w.open(RunContext("p", "r1", tmp_path))
    w.publish(5, rows(0, 2))
    w.close()
    other = sink(table="stage.orders", id="db2")
    other.open(RunContext("p", "r1", tmp_path))
    assert other.published_epoch() is None
    other.publish(1, rows(2, 1))
    other.close()
    third = sink(table="stage.orders")
    third.open(RunContext("q", "r1", tmp_path))
    assert third.published_epoch() is None
    third.close()
    assert query(tmp_path, "SELECT * FROM stage.sluice_epochs ORDER BY sink") == [
        ("p", "db2@r1", 1),
        ("p", "db@r1", 5),
    ]
    assert query(tmp_path, "SELECT count(*) FROM stage.orders") == [(3,)]


def test_publish_failure_rolls_back_rows_and_marker(tmp_path: Path) -> None:
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("CREATE TABLE orders (id BIGINT PRIMARY KEY, v VARCHAR)")
    w = sink()
    w.open(RunContext("p", "r1", tmp_path))
    w.publish(1, pa.table({"id": [1, 2], "v": ["a", "b"]}))
    with pytest.raises(SinkError, match="epoch 2"):
        w.publish(2, pa.table({"id": [3, 2], "v": ["c", "dup"]}))
    assert w.published_epoch() == 1
    assert w.publish(2, pa.table({"id": [3], "v": ["c"]})).num_rows == 0
    refused = w.publish(3, pa.table({"id": ["x"], "v": ["y"]}))  # wrong type: dead letter
    assert refused.num_rows == 1 and refused["reason"][0].as_py() == "sink_rejected"
    assert w.published_epoch() == 3
    w.close()
    assert query(tmp_path, "SELECT id, v FROM orders ORDER BY id") == [(1, "a"), (2, "b"), (3, "c")]


def test_publish_replace_only_at_the_first_epoch_and_empty_epochs(tmp_path: Path) -> None:
    run(sink(), tmp_path, rows(100, 3))
    w = sink(mode="replace")
    w.open(RunContext("p", "r1", tmp_path))
    assert w.publish(1, pa.table({"other": ["a"]})).num_rows == 0  # the old table is replaced
    assert w.publish(2, pa.table({"other": ["b"]}).slice(0, 0)).num_rows == 0
    assert w.published_epoch() == 2
    w.close()
    again = sink(mode="replace")
    again.open(RunContext("p", "r1", tmp_path))
    again.publish(3, pa.table({"other": ["c"]}))  # after a restart: appends
    again.close()
    assert query(tmp_path, "SELECT other FROM orders") == [("a",), ("c",)]

    fresh = sink(table="empty_first", id="db9")
    fresh.open(RunContext("p", "r1", tmp_path))
    assert fresh.publish(1, pa.table({})).num_rows == 0  # no rows, no columns: marker only
    assert fresh.published_epoch() == 1
    fresh.close()
    assert query(
        tmp_path, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'empty_first'"
    ) == [(0,)]


def test_batch_and_stream_mode_are_not_mixed(tmp_path: Path) -> None:
    w = sink()
    w.open(RunContext("p", "r1", tmp_path))
    w.write(rows(0, 1))
    with pytest.raises(SinkError, match="batch transaction"):
        w.publish(1, rows(1, 1))
    w.abort()
