"""The sql step: whole-input statements see the whole input, the sandbox, reference tables,
provenance through row-wise statements."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.batch import ROW_COL, SOURCE_COL, as_arrow, source_names, with_positions
from sluice.config import parse_pipeline
from sluice.config.models import SqlStep
from sluice.errors import ConfigErrors, StepError
from sluice.plugins import RunContext
from sluice.runtime.executor import Executor
from sluice.steps import sqlengine
from sluice.steps.sql import Sql, output_schema
from sluice.testing import MemorySink, MemorySource


def _sensor_csv(path: Path, rows: int, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    base = np.datetime64("2026-01-01T00:00:00", "s")
    table = pa.table(
        {
            "device_id": rng.integers(0, 40, rows),
            "ts": pa.array(
                (base + rng.integers(0, 6 * 3600, rows).astype("timedelta64[s]")).astype(
                    "datetime64[us]"
                )
            ),
            "v": rng.integers(0, 100, rows),
        }
    )
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(table.column_names)
        for d, ts, v in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
            w.writerow([d, ts.isoformat(), v])
    return table


def _pipeline(tmp_path: Path, steps: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    return {
        "pipeline": "t",
        "source": {
            "kind": "csv",
            "path": str(tmp_path / "in.csv"),
            "schema": {"device_id": "int", "ts": "timestamp", "v": "int"},
        },
        "steps": steps,
        "sinks": [{"id": "out", "kind": "parquet", "path": str(tmp_path / "out")}],
        "dead_letter": {"kind": "jsonl", "path": str(tmp_path / "dl")},
        "settings": {"report_dir": str(tmp_path / "runs"), **settings},
    }


def _whole(sql: str, table: pa.Table) -> list[dict[str, Any]]:
    con = duckdb.connect()
    con.register("input", table)
    rows: list[dict[str, Any]] = con.sql(sql).to_arrow_table().to_pylist()
    con.close()
    return rows


def _key(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, default=str)


# ------------------------------------------------------------------ A1: whole input


def test_i8_01_sql_group_by_sees_the_whole_input_in_a_batch_run(tmp_path: Path) -> None:
    """The issue's reproducer: per-batch GROUP BY split keys at batch cuts."""
    table = _sensor_csv(tmp_path / "in.csv", 6000)
    sql = "SELECT device_id, date_trunc('hour', ts) AS hour, count(*) AS n FROM input GROUP BY ALL"
    cfg = parse_pipeline(_pipeline(tmp_path, [{"id": "agg", "sql": sql}], batch_rows=500))
    rep = Executor(cfg, base_dir=tmp_path, progress=False).run()
    assert rep.status == "succeeded" and rep.balanced
    got = pq.read_table(tmp_path / "out").to_pylist()
    want = _whole(sql, table)
    assert len(got) == len(want) == 240  # 40 devices x 6 hours, no key split at a batch cut
    assert sorted(map(_key, got)) == sorted(map(_key, want))
    agg = rep.step("agg")
    assert (agg.rows_in, agg.aggregated, agg.filtered) == (6000, 6000, 0)
    assert agg.created == agg.rows_out == 240


@pytest.mark.parametrize(
    "sql,want",
    [
        ("SELECT count(*) AS n, sum(v) AS s FROM input", [{"n": 0, "s": None}]),
        ("SELECT count(DISTINCT device_id) AS d FROM input", [{"d": 0}]),
        ("SELECT device_id, count(*) AS n FROM input GROUP BY ALL", []),
        ("SELECT * FROM input ORDER BY v", []),
    ],
)
def test_i8_01_whole_input_statement_over_no_rows_answers_like_duckdb(
    tmp_path: Path, sql: str, want: list[dict[str, Any]]
) -> None:
    """Every row is filtered before the statement: a global aggregate still answers one row
    (count 0, sum null), as DuckDB does over an empty table; a GROUP BY answers none."""
    _sensor_csv(tmp_path / "in.csv", 100)
    steps = [{"id": "none", "filter": "v < 0"}, {"id": "agg", "sql": sql}]
    cfg = parse_pipeline(_pipeline(tmp_path, steps))
    rep = Executor(cfg, base_dir=tmp_path, progress=False).run()
    assert rep.status == "succeeded" and rep.balanced
    out = tmp_path / "out"
    got = pq.read_table(out).to_pylist() if list(out.glob("*.parquet")) else []
    assert got == want


_STATEMENTS = [
    ("SELECT device_id, count(*) AS n, sum(v) AS s FROM input GROUP BY ALL", False),
    ("SELECT count(DISTINCT device_id) AS d, max(ts) AS last FROM input", False),
    ("SELECT DISTINCT device_id FROM input", False),
    ("SELECT id, v, sum(v) OVER (PARTITION BY device_id ORDER BY id) AS run FROM input", False),
    ("SELECT id, v FROM input ORDER BY v DESC, id LIMIT 7", True),
    ("SELECT id FROM input WHERE v > (SELECT avg(v) FROM input)", False),
    (
        "SELECT device_id FROM input WHERE v < 10 UNION SELECT device_id FROM input WHERE v > 90",
        False,
    ),
    ("SELECT * FROM input ORDER BY id OFFSET 3", True),
]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 100)), min_size=1, max_size=200),
    cuts=st.lists(st.integers(1, 60), min_size=1, max_size=8),
    batch_rows=st.integers(1, 300),
    statement=st.sampled_from(_STATEMENTS),
)
def test_i8_01_any_batch_size_gives_duckdbs_answer_on_the_whole_input(
    tmp_path: Path,
    rows: list[tuple[int, int]],
    cuts: list[int],
    batch_rows: int,
    statement: tuple[str, bool],
) -> None:
    sql, ordered = statement
    base = dt.datetime(2026, 1, 1)
    whole = pa.table(
        {
            "id": list(range(len(rows))),
            "device_id": [d for d, _ in rows],
            "v": [v for _, v in rows],
            "ts": [base + dt.timedelta(minutes=i) for i in range(len(rows))],
        }
    )
    tables, i, k = [], 0, 0
    while i < len(rows):
        n = cuts[k % len(cuts)]
        tables.append(whole.slice(i, n))
        i, k = i + n, k + 1
    cfg = parse_pipeline(
        {
            "pipeline": "t",
            "source": {"kind": "csv", "path": "unused.csv"},
            "steps": [{"id": "q", "sql": sql}],
            "sinks": [{"id": "out", "kind": "jsonl", "path": "unused"}],
            "dead_letter": {"kind": "jsonl", "path": str(tmp_path / "dl")},
            "settings": {"report_dir": str(tmp_path / "runs"), "batch_rows": batch_rows},
        }
    )
    sink = MemorySink("out")
    rep = Executor(
        cfg, base_dir=tmp_path, progress=False, source=MemorySource(tables), sinks={"out": sink}
    ).run()
    assert rep.status == "succeeded" and rep.balanced
    got = sink.table().to_pylist()
    want = _whole(sql, whole)
    if ordered:
        assert got == want
    else:
        assert sorted(map(_key, got)) == sorted(map(_key, want))
    q = rep.step("q")
    assert q.aggregated == q.rows_in == len(rows) and q.filtered == 0
    assert q.created == q.rows_out == len(want)


def test_i8_01_row_wise_statements_stream_per_batch_and_count_filtered(tmp_path: Path) -> None:
    step = Sql(SqlStep(id="q", sql="SELECT id, v * 2 AS w FROM input WHERE v > 1"))
    assert step.plan.whole_input is None and not step.whole
    step.open(RunContext("p", "r"))
    try:
        res = step.process(with_positions(pa.table({"id": [1, 2, 3], "v": [1, 2, 3]}), "m", 0))
    finally:
        step.close()
    assert as_arrow(res.table)["w"].to_pylist() == [4, 6]
    assert res.filtered == 1 and res.aggregated == 0


def test_i8_01_per_batch_true_runs_each_batch_on_its_own(tmp_path: Path) -> None:
    step = Sql(SqlStep(id="q", sql="SELECT count(*) AS n FROM input", per_batch=True))
    step.open(RunContext("p", "r"))
    try:
        outs = [
            step.process(with_positions(pa.table({"a": list(range(n))}), "m", 0)) for n in (3, 5)
        ]
        assert step.finish() is None
    finally:
        step.close()
    assert [as_arrow(r.table)["n"].to_pylist() for r in outs] == [[3], [5]]
    assert [r.aggregated for r in outs] == [3, 5]


def test_i8_01_whole_input_statement_in_a_stream_is_refused_by_validate() -> None:
    def stream(step: dict[str, Any]) -> dict[str, Any]:
        return {
            "pipeline": "s",
            "source": {"kind": "kafka", "brokers": "127.0.0.1:9092", "topic": "t"},
            "steps": [{"id": "agg", **step}],
        }

    sql = "SELECT device_id, count(*) AS n FROM input GROUP BY ALL"
    with pytest.raises(ConfigErrors) as err:
        parse_pipeline(stream({"sql": sql}))
    text = str(err.value)
    assert "step 'agg', field 'sql'" in text and "GROUP BY ALL" in text
    assert "window step" in text and "per_batch: true" in text and sql in text
    assert parse_pipeline(stream({"sql": sql, "per_batch": True}))
    assert parse_pipeline(stream({"sql": "SELECT device_id, v * 2 AS w FROM input"}))


def test_i8_01_whole_input_spills_to_disk_under_the_sandbox() -> None:
    """A memory limit far below the aggregate's size: DuckDB writes its own temp files (the
    sandbox allows them), the answer is exact, and the temp folder is removed afterwards."""
    step = Sql(
        SqlStep(
            id="agg",
            sql="SELECT k, count(*) AS n, min(s) AS s FROM input GROUP BY k",
            memory_limit="64MB",
        )
    )
    step.open(RunContext("p", "r"))
    rng = np.random.default_rng(3)
    keys = []
    for i in range(4):
        k = rng.integers(0, 2_000_000, 500_000)
        keys.append(k)
        batch = pa.table({"k": k, "s": pa.array(k.astype(str))})
        assert step.process(with_positions(batch, "m", i)).aggregated == 500_000
    tmp = step._tmp
    assert tmp is not None
    results = iter(step.finish() or [])
    first = next(results)
    spilled = [f for f in os.listdir(tmp / "duckdb") if f.endswith(".tmp")]
    total = first.table.num_rows + sum(r.table.num_rows for r in results)
    step.close()
    assert spilled, "DuckDB did not spill"
    assert total == len(np.unique(np.concatenate(keys)))
    assert not tmp.exists()


def test_i8_01_spilled_input_survives_a_schema_change_between_batches() -> None:
    step = Sql(SqlStep(id="q", sql="SELECT sum(a) AS s, count(b) AS nb FROM input"))
    step.open(RunContext("p", "r"))
    try:
        step.process(with_positions(pa.table({"a": pa.array([1, 2], pa.int32())}), "m", 0))
        step.process(with_positions(pa.table({"a": [3], "b": ["x"]}), "m", 2))
        out = [as_arrow(r.table).to_pylist() for r in step.finish() or []]
    finally:
        step.close()
    assert out == [[{"s": 6, "nb": 1}]]


def test_sql_output_schema_binds_against_a_known_input() -> None:
    schema = pa.schema([("device_id", pa.int64()), ("ts", pa.timestamp("us"))])
    cfg = SqlStep(id="q", sql="SELECT device_id, date_trunc('hour', ts) AS h FROM input")
    out = output_schema(cfg, schema)
    assert out is not None and out.names == ["device_id", "h"]
    bad = SqlStep(id="q", sql="SELECT devise_id FROM input")
    with pytest.raises(Exception, match=r"'devise_id' \(did you mean 'device_id'\?\)"):
        output_schema(bad, schema)
    assert output_schema(cfg, None) is None


# ------------------------------------------------------------------ D20: the sandbox


ESCAPES = {
    "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
    "read_text": "SELECT * FROM read_text('/etc/passwd')",
    "glob": "SELECT * FROM glob('/etc/*')",
    "copy_to": "COPY (SELECT * FROM input) TO '/tmp/sluice-escape.csv'",
    "attach": "ATTACH '/tmp/sluice-escape.duckdb' AS x",
    "several_statements": "SELECT * FROM input; SELECT 42",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "file_as_table": "SELECT * FROM '/etc/passwd'",
    "set": "SET enable_external_access = true",
    "pragma": "PRAGMA version",
    "catalog": "SELECT * FROM duckdb_settings()",
    "catalog_view": "SELECT * FROM information_schema.tables",
    "query_function": "SELECT * FROM query('SELECT 1')",
    "settings": "SELECT current_setting('home_directory') AS h FROM input",
}


@pytest.mark.parametrize("sql", ESCAPES.values(), ids=ESCAPES.keys())
def test_i8_20_sql_step_escape_routes_are_refused_at_validation(sql: str) -> None:
    with pytest.raises(ConfigErrors) as err:
        parse_pipeline(
            {
                "pipeline": "p",
                "source": {"kind": "csv", "path": "x.csv"},
                "steps": [{"id": "sneaky", "sql": sql}],
            }
        )
    text = str(err.value)
    assert "step 'sneaky', field 'sql'" in text
    assert any(
        word in text
        for word in ("not allowed", "unknown table", "exactly one SELECT", "SELECT statement")
    ), text


def test_i8_20_the_engine_itself_refuses_files_settings_and_extensions(tmp_path: Path) -> None:
    """Defence in depth: even SQL that skipped the checks cannot reach out of the engine."""
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    con = sqlengine.connect()
    try:
        for sql in (
            f"SELECT * FROM read_csv('{secret}')",
            f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'",
            f"ATTACH '{tmp_path / 'x.duckdb'}'",
            "SET enable_external_access = true",
            "LOAD httpfs",
            "INSTALL httpfs",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(sql).fetchall()
        not_a_table = pa.table({"a": [1]})  # noqa: F841 - Python variables are not tables
        with pytest.raises(duckdb.Error):
            con.execute("SELECT * FROM not_a_table").fetchall()
        assert con.execute("SELECT current_setting('TimeZone')").fetchall() == [("UTC",)]
    finally:
        con.close()
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.duckdb").exists()


def test_i8_20_reference_tables_are_declared_on_the_step(tmp_path: Path) -> None:
    _sensor_csv(tmp_path / "in.csv", 50)
    (tmp_path / "devices.csv").write_text(
        "device_id,site\n" + "".join(f"{i},site-{i % 3}\n" for i in range(40)) + "41,x,extra\n"
    )
    steps = [
        {
            "id": "enrich",
            "sql": "SELECT i.*, d.site FROM input AS i LEFT JOIN devices AS d USING (device_id)",
            "tables": {"devices": {"kind": "csv", "path": "devices.csv"}},
        },
        {"id": "per_site", "sql": "SELECT site, count(*) AS n FROM input GROUP BY ALL"},
    ]
    rep = Executor(
        parse_pipeline(_pipeline(tmp_path, steps)), base_dir=tmp_path, progress=False
    ).run()
    assert rep.status == "succeeded" and rep.balanced
    got = {r["site"]: r["n"] for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert got and sum(got.values()) == 50 and set(got) <= {"site-0", "site-1", "site-2"}
    letters = [json.loads(x) for x in Path(str(rep.dead_letter_path)).read_text().splitlines()]
    assert [(d["step_id"], d["reason"]) for d in letters] == [("enrich", "column_count")]
    assert rep.step("enrich").filtered == 0 and rep.step("enrich").rows_out == 50


def test_i8_20_an_undeclared_table_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigErrors, match=r"step 'q', field 'sql': unknown table 'rates'"):
        parse_pipeline(
            {
                "pipeline": "p",
                "source": {"kind": "csv", "path": "x.csv"},
                "steps": [{"id": "q", "sql": "SELECT * FROM input JOIN rates USING (k)"}],
            }
        )


# ------------------------------------------------------------------ 25: provenance


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT ts, v FROM input",
        "SELECT * FROM input WHERE device_id <> ''",
        "SELECT i.* EXCLUDE (device_id) FROM input AS i",
        "SELECT *, v || '!' AS loud FROM input",
    ],
)
def test_i8_25_dead_letters_after_a_sql_step_carry_source_and_position(
    tmp_path: Path, sql: str
) -> None:
    path = tmp_path / "in.csv"
    path.write_text(
        "device_id,ts,v\n1,2026-01-01T00:00:00,1\n1,2026-01-01T00:01:00,x\n"
        "2,2026-01-01T00:02:00,3\n2,2026-01-01T00:03:00,oops\n"
    )
    cfg = parse_pipeline(
        {
            "pipeline": "t",
            "source": {"kind": "csv", "path": str(path), "infer_types": False},
            "steps": [{"id": "q", "sql": sql}, {"id": "types", "cast": {"v": "int"}}],
            "sinks": [{"id": "out", "kind": "parquet", "path": str(tmp_path / "out")}],
            "dead_letter": {"kind": "jsonl", "path": str(tmp_path / "dl")},
            "settings": {"report_dir": str(tmp_path / "runs")},
        }
    )
    rep = Executor(cfg, base_dir=tmp_path, progress=False).run()
    letters = [json.loads(x) for x in Path(str(rep.dead_letter_path)).read_text().splitlines()]
    assert [(d["reason"], d["source"], d["position"]) for d in letters] == [
        ("cast_error", str(path), 1),
        ("cast_error", str(path), 3),
    ]


def test_i8_25_late_letters_after_a_sql_step_carry_source_and_position(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text(
        "device_id,ts,v\n1,2026-01-01T10:00:00,1\n1,2026-01-01T12:00:00,2\n"
        "1,2026-01-01T09:00:00,3\n"
    )
    cfg = parse_pipeline(
        {
            "pipeline": "t",
            "source": {"kind": "csv", "path": str(path)},
            "steps": [
                {"id": "q", "sql": "SELECT ts, v FROM input"},
                {
                    "id": "w",
                    "window": {"kind": "tumbling", "size": "1h", "time": "ts"},
                    "aggregate": {"n": "count()"},
                },
            ],
            "sinks": [{"id": "out", "kind": "parquet", "path": str(tmp_path / "out")}],
            "dead_letter": {"kind": "jsonl", "path": str(tmp_path / "dl")},
            "settings": {"report_dir": str(tmp_path / "runs")},
        }
    )
    rep = Executor(cfg, base_dir=tmp_path, progress=False).run()
    letters = [json.loads(x) for x in Path(str(rep.dead_letter_path)).read_text().splitlines()]
    assert [(d["reason"], d["source"], d["position"]) for d in letters] == [("late", str(path), 2)]


def test_i8_25_hidden_columns_do_not_leak_into_star_or_distinct() -> None:
    batch = with_positions(pa.table({"a": [1, 1, 2]}), "f.csv", 0)
    step = Sql(SqlStep(id="q", sql="SELECT DISTINCT * FROM input"))
    step.open(RunContext("p", "r"))
    try:
        step.process(batch)
        out = [as_arrow(r.table) for r in step.finish() or []]
    finally:
        step.close()
    assert sorted(out[0]["a"].to_pylist()) == [1, 2] and out[0].column_names == ["a"]
    star = Sql(SqlStep(id="q", sql="SELECT * FROM input WHERE a > 1"))
    star.open(RunContext("p", "r"))
    try:
        got = as_arrow(star.process(batch).table)
    finally:
        star.close()
    assert got.column_names == ["a", SOURCE_COL, ROW_COL]
    assert got[ROW_COL].to_pylist() == [2]
    assert source_names(got[SOURCE_COL]).to_pylist() == ["f.csv"]


def test_sql_errors_name_the_step_and_the_column() -> None:
    step = Sql(SqlStep(id="q", sql="SELECT devise FROM input"))
    step.open(RunContext("p", "r"))
    try:
        with pytest.raises(StepError, match=r"step 'q'.*'devise' \(did you mean 'device'\?\)"):
            step.process(with_positions(pa.table({"device": [1]}), "m", 0))
    finally:
        step.close()


def test_output_schema_dispatches_on_the_step_kind() -> None:
    from sluice.config.models import DeriveStep, FilterStep, SelectStep

    schema = pa.schema([("a", pa.int64())])
    assert sqlengine.output_schema(FilterStep(id="f", filter="a > 1"), schema) == schema
    derived = sqlengine.output_schema(DeriveStep(id="d", derive={"b": "a / 2"}), schema)
    assert derived is not None and derived.field("b").type == pa.float64()
    sql = sqlengine.output_schema(SqlStep(id="q", sql="SELECT count(*) AS n FROM input"), schema)
    assert sql is not None and sql.names == ["n"]
    assert sqlengine.output_schema(SelectStep(id="s", select=["a"]), schema) is None
    joined = SqlStep(
        id="q",
        sql="SELECT * FROM input JOIN r USING (a)",
        tables={"r": {"kind": "csv", "path": "r.csv"}},
    )
    assert sqlengine.output_schema(joined, schema) is None  # the table's schema is not known
    got = sqlengine.output_schema(
        joined, schema, {"r": pa.schema([("a", pa.int64()), ("x", pa.string())])}
    )
    assert got is not None and got.names == ["a", "x"]


def test_i8_01_spill_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys
    import tempfile

    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(child.stdout)
    stale = Path(tempfile.gettempdir()) / f"sluice-sql-{dead_pid}-run-q-x"
    stale.mkdir(exist_ok=True)
    (stale / "input-0.arrows").write_bytes(b"left by a killed run")
    step = Sql(SqlStep(id="q", sql="SELECT count(*) AS n FROM input"))
    step.open(RunContext("p", "r"))
    step.close()
    assert not stale.exists()


def test_i8_01_sluice_validate_refuses_a_group_by_in_a_stream(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sluice.cli import app

    path = tmp_path / "stream.yaml"
    path.write_text(
        "pipeline: s\n"
        "source: {kind: redis_stream, stream: readings}\n"
        "steps:\n"
        "  - id: per_device\n"
        "    sql: SELECT device_id, count(*) AS n FROM input GROUP BY device_id\n"
        "sinks:\n"
        "  - {id: out, kind: jsonl, path: out.jsonl}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "step 'per_device', field 'sql'" in text and "GROUP BY" in text
    assert "window step" in text and "per_batch: true" in text


ROW_WISE = [
    "SELECT * FROM input",
    "SELECT a, s FROM input WHERE a % 2 = 0",
    "SELECT * EXCLUDE (s), upper(s) AS u FROM input",
    "SELECT * REPLACE (a * 10 AS a) FROM input",
    "SELECT i.* FROM input AS i WHERE i.a > 1",
    "SELECT COLUMNS(*) FROM input",
    "SELECT a, list_transform(l, lambda x: x + a) AS m FROM input",
    "SELECT a, [x * 2 FOR x IN l] AS d, {'k': a, 'v': s} AS st FROM input",
    "SELECT a, unnest(l) AS item FROM input",
    "SELECT a, CASE WHEN s LIKE 'b%' THEN 'b' END AS c, a::VARCHAR || '!' AS t FROM input",
    "FROM input SELECT s WHERE a BETWEEN 1 AND 3",
    "SELECT COLUMNS('^[as]$') FROM input",
]


@pytest.mark.parametrize("sql", ROW_WISE)
def test_i8_25_row_wise_statements_give_their_rows_plus_provenance(sql: str) -> None:
    table = pa.table({"a": [1, 2, 3, 4], "s": ["a", "b", None, "bb"], "l": [[1, 2], [], None, [3]]})
    want = _whole(sql, table)
    step = Sql(SqlStep(id="q", sql=sql))
    assert step.plan.whole_input is None
    step.open(RunContext("p", "r"))
    try:
        got = as_arrow(step.process(with_positions(table, "f.csv", 100)).table)
    finally:
        step.close()
    data = got.drop_columns([c for c in (SOURCE_COL, ROW_COL) if c in got.column_names])
    assert data.to_pylist() == want
    if "COLUMNS('" in sql:  # a regex could pick the hidden columns: provenance is dropped
        assert ROW_COL not in got.column_names
    else:
        assert got.column_names[-2:] == [SOURCE_COL, ROW_COL]
        assert set(source_names(got[SOURCE_COL]).to_pylist()) <= {"f.csv"}
        if "a" in data.column_names and "REPLACE" not in sql:  # each row: its own position
            assert got[ROW_COL].to_pylist() == [99 + a for a in got["a"].to_pylist()]
