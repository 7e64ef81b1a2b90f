"""Regression tests for the review of the sql step after issue 8 (REVIEW_SQL sections 1-4):
subqueries with aggregates, hidden columns, empty input, and the property that a statement
classified row-wise gives DuckDB's whole-input answer whatever the batch cuts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.batch import ROW_COL, SOURCE_COL, as_arrow, source_names, with_positions
from sluice.config import parse_pipeline
from sluice.config.models import SqlStep
from sluice.errors import ConfigErrors
from sluice.plugins import RunContext
from sluice.runtime.executor import Executor
from sluice.steps import sqlengine
from sluice.steps.sql import Sql
from sluice.testing import MemorySink, MemorySource

REF_CSV = "k,x\na,10\nb,20\nb,25\nz,99\n"


def _duckdb(sql: str, table: pa.Table, ref: pa.Table | None = None) -> list[dict[str, Any]]:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("input", table)
    if ref is not None:
        con.register("ref", ref)
    rows: list[dict[str, Any]] = con.sql(sql).to_arrow_table().to_pylist()
    con.close()
    return rows


def _key(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def _config(tmp_path: Path, steps: list[dict[str, Any]], **settings: Any) -> Any:
    return parse_pipeline(
        {
            "pipeline": "t",
            "source": {"kind": "csv", "path": "unused.csv"},
            "steps": steps,
            "sinks": [{"id": "out", "kind": "jsonl", "path": "unused"}],
            "dead_letter": {"kind": "jsonl", "path": str(tmp_path / "dl")},
            "settings": {"report_dir": str(tmp_path / "runs"), **settings},
        }
    )


# ------------------------------------------------------------------ 1. subquery aggregates


def test_i8_review_scalar_subquery_aggregate_sees_the_whole_input(tmp_path: Path) -> None:
    """The review's pipeline: ORDER BY, then ``(SELECT count(v))``: DuckDB answers one row
    with the count of the whole input; per batch it gave one row per batch."""
    rows = 3000
    table = pa.table({"v": list(range(rows))})
    steps = [
        {"id": "sorted", "sql": "SELECT v FROM input ORDER BY v"},
        {"id": "total", "sql": "SELECT (SELECT count(v)) AS n FROM input"},
    ]
    sink = MemorySink("out")
    rep = Executor(
        _config(tmp_path, steps, batch_rows=700),
        base_dir=tmp_path,
        progress=False,
        source=MemorySource([table.slice(i, 500) for i in range(0, rows, 500)]),
        sinks={"out": sink},
    ).run()
    assert rep.status == "succeeded" and rep.balanced
    assert sink.table().to_pylist() == [{"n": rows}]
    total = rep.step("total")
    assert (total.rows_in, total.aggregated, total.filtered, total.rows_out) == (rows, rows, 0, 1)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT (SELECT sum(v)) AS s FROM input",
        "SELECT (SELECT sum(input.v)) AS s FROM input",
        "SELECT (SELECT list(v)) AS l FROM input",
        "SELECT (SELECT count(*) FILTER (WHERE input.v > 0)) AS n FROM input",
        "SELECT (SELECT max(input.v) FROM ref) AS m FROM input",
        "SELECT * FROM input WHERE v IN (SELECT max(input.v) FROM ref)",
        "SELECT * FROM input LEFT JOIN ref ON input.k = ref.k AND ref.x > (SELECT min(input.v))",
        "SELECT (SELECT max(x) FROM ref WHERE ref.k = input.k) AS m FROM input",
        "SELECT (SELECT (SELECT sum(input.v)) FROM ref LIMIT 1) AS s FROM input",
        "SELECT (SELECT row_number() OVER () FROM ref WHERE ref.x = v LIMIT 1) AS r FROM input",
    ],
)
def test_i8_review_subquery_with_an_aggregate_over_input_columns_is_whole_input(sql: str) -> None:
    """Any aggregate or window function in a subquery that may read input's columns (correlated
    ones included) makes the statement whole-input: DuckDB aggregates the outer query."""
    assert sqlengine.plan_statement(sql, frozenset({"ref"})).whole_input is not None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT v, (SELECT max(ref.x) FROM ref) AS m FROM input",
        "SELECT v, (SELECT count(*) FROM ref) AS n FROM input",
        "SELECT * FROM input WHERE EXISTS (SELECT 1 FROM ref WHERE ref.k = input.k)",
        "SELECT v, (SELECT x FROM ref ORDER BY x LIMIT 1) AS first FROM input",
        "SELECT * FROM input WHERE k IN "
        "(SELECT r.k FROM ref AS r GROUP BY r.k HAVING count(*) > 1)",
    ],
)
def test_i8_review_subquery_that_only_reads_a_declared_table_stays_row_wise(sql: str) -> None:
    assert sqlengine.plan_statement(sql, frozenset({"ref"})).whole_input is None


def test_i8_review_scalar_subquery_aggregate_is_refused_in_a_stream() -> None:
    raw = {
        "pipeline": "s",
        "source": {"kind": "redis_stream", "stream": "s", "schema": {"v": "int"}},
        "steps": [{"id": "q", "sql": "SELECT (SELECT count(v)) AS n FROM input"}],
        "sinks": [{"id": "out", "kind": "jsonl", "path": "out/"}],
    }
    with pytest.raises(ConfigErrors, match="needs the whole input"):
        parse_pipeline(raw)


# ------------------------------------------------------------------ 1. hidden columns


@pytest.mark.parametrize(
    "sql,want,positions",
    [
        ("SELECT to_json(input) AS j FROM input", [{"j": '{"v":1}'}, {"j": '{"v":2}'}], [7, 8]),
        ("SELECT input AS s FROM input", [{"s": {"v": 1}}, {"s": {"v": 2}}], [7, 8]),
        ("SELECT len(to_json(input)) AS n FROM input", [{"n": 7}, {"n": 7}], [7, 8]),
        ("SELECT * FROM input WHERE COLUMNS(*) > 1", [{"v": 2}], [8]),
        (
            "SELECT struct_pack(COLUMNS(*)) AS s FROM input",
            [{"s": {"v": 1}}, {"s": {"v": 2}}],
            [7, 8],
        ),
        ("SELECT i.* FROM input AS i", [{"v": 1}, {"v": 2}], [7, 8]),
        ("SELECT COLUMNS('.*') FROM input", [{"v": 1}, {"v": 2}], None),  # runs without them
        ("SELECT #1 AS first FROM input", [{"first": 1}, {"first": 2}], None),
    ],
)
def test_i8_review_hidden_columns_are_invisible_to_user_sql(
    sql: str, want: list[dict[str, Any]], positions: list[int] | None
) -> None:
    """A row used as a value, a star, COLUMNS(...): the statement sees only the user's columns,
    exactly as DuckDB over the same data without Sluice; the positions still ride along
    (except where the statement could pick them up itself: then it runs without them)."""
    step = Sql(SqlStep(id="q", sql=sql))
    step.open(RunContext("p", "r"))
    try:
        out = as_arrow(step.process(with_positions(pa.table({"v": [1, 2]}), "in.csv", 7)).table)
    finally:
        step.close()
    hidden = [c for c in (SOURCE_COL, ROW_COL) if c in out.column_names]
    assert out.drop_columns(hidden).to_pylist() == want == _duckdb(sql, pa.table({"v": [1, 2]}))
    if positions is None:
        assert not hidden
    else:
        assert out[ROW_COL].to_pylist() == positions
        assert set(source_names(out[SOURCE_COL]).to_pylist()) == {"in.csv"}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT __sluice_row FROM input",
        "SELECT input.__sluice_source FROM input",
        "SELECT __sluice_pos.__sluice_row FROM input",
        "SELECT __sluice_pos.* FROM input",
        "SELECT * FROM input AS __sluice_pos",
    ],
)
def test_i8_review_user_sql_cannot_name_the_hidden_columns(sql: str) -> None:
    with pytest.raises(sqlengine.SqlRefused, match="__sluice"):
        sqlengine.plan_statement(sql)


# ------------------------------------------------------------------ 1. empty input


def test_i8_review_whole_input_statement_over_no_rows_knows_the_input_types(
    tmp_path: Path,
) -> None:
    """The review's pipeline: declared {d: date, v: int}, every row filtered, then a count
    with a DATE comparison: DuckDB answers n = 0 (no column type had to be guessed)."""
    (tmp_path / "dd.csv").write_text("d,v\n2024-02-01,5\n2023-01-01,7\n")
    raw = {
        "pipeline": "z",
        "source": {"kind": "csv", "path": "dd.csv", "schema": {"d": "date", "v": "int"}},
        "steps": [
            {"id": "f", "filter": "v > 100"},
            {
                "id": "q",
                "sql": "SELECT count(*) AS n, max(d) AS last FROM input "
                "WHERE d >= DATE '2024-01-01'",
            },
        ],
        "sinks": [{"id": "out", "kind": "jsonl", "path": "out"}],
        "dead_letter": {"kind": "jsonl", "path": "dl"},
        "settings": {"report_dir": "runs"},
    }
    sink = MemorySink("out")
    rep = Executor(
        parse_pipeline(raw), base_dir=tmp_path, progress=False, sinks={"out": sink}
    ).run()
    assert rep.status == "succeeded" and rep.balanced
    got = sink.table()
    assert got.to_pylist() == [{"n": 0, "last": None}]
    assert got.schema.field("last").type == pa.date32()  # the declared type, not a guess


def test_i8_review_sql_step_is_given_its_input_schema_when_the_plan_knows_it(
    tmp_path: Path,
) -> None:
    from sluice.config.validate import build_components

    (tmp_path / "x.csv").write_text("d,v\n")
    raw = {
        "pipeline": "z",
        "source": {"kind": "csv", "path": "x.csv", "schema": {"d": "date", "v": "int"}},
        "steps": [
            {"id": "plus", "derive": {"w": "v + 1"}},
            {"id": "q", "sql": "SELECT count(*) AS n FROM input"},
        ],
        "sinks": [{"id": "out", "kind": "jsonl", "path": "out"}],
    }
    built = build_components(parse_pipeline(raw), base_dir=tmp_path)
    step = next(s for s, _ in built.steps if s.step_id == "q")
    assert step.input_schema == pa.schema(
        [("d", pa.date32()), ("v", pa.int64()), ("w", pa.int64())]
    )


# ------------------------------------------------------------------ the property


_INPUT = pa.table(
    {
        "id": list(range(24)),
        "k": ["a", "b", "c", None, "b", "a"] * 4,
        "v": [3, None, 7, 1, 12, 5, 0, 9, 4, 4, 11, 2, 8, 6, None, 10, 1, 3, 13, 2, 5, 7, 9, 0],
    }
)
_REF = pa.table({"k": ["a", "b", "b", "z"], "x": [10, 20, 25, 99]})

_SCALARS = [
    "v",
    "input.v",
    "k",
    "v + 1",
    "abs(v - 5)",
    "upper(k)",
    "coalesce(v, -1)",
    "CASE WHEN v > 5 THEN 'big' WHEN v IS NULL THEN 'none' ELSE k END",
    "CASE k WHEN 'a' THEN v * 2 ELSE 0 END",
]
_MANY = [
    "sum(v)",
    "count(*)",
    "max(k)",
    "rank() OVER (ORDER BY id)",  # deterministic under ties (a join may repeat an id)
    "sum(v) OVER (PARTITION BY k)",
    "count(*) OVER (PARTITION BY k ORDER BY id)",
    "(SELECT sum(v))",
    "(SELECT count(v) FILTER (WHERE input.v > 3))",
    "(SELECT max(input.v) FROM ref)",
    "(SELECT max(x) FROM ref WHERE ref.k = input.k)",
    "(SELECT list(v ORDER BY id))",
    "(SELECT avg(v) FROM input)",
]
_ROW_SUBQUERIES = [
    "(SELECT max(ref.x) FROM ref)",
    "(SELECT count(*) FROM ref)",
    "(SELECT min(r.x) FROM ref AS r WHERE r.k = 'b')",
    "EXISTS (SELECT 1 FROM ref WHERE ref.k = input.k)",
    "(SELECT x FROM ref WHERE ref.k = input.k ORDER BY x LIMIT 1)",
]
_CONDITIONS = [
    "v > 4",
    "k = 'b' OR v IS NULL",
    "v IN (SELECT x - 10 FROM ref)",
    "k IN (SELECT r.k FROM ref AS r GROUP BY r.k HAVING count(*) > 1)",
    "v > (SELECT avg(v) FROM input)",
    "v < (SELECT max(input.v) FROM ref)",
    "EXISTS (SELECT 1 FROM ref WHERE ref.k = input.k)",
    "NOT EXISTS (SELECT 1 FROM ref WHERE ref.x = input.v)",
    "coalesce(v, 0) * 2 < (SELECT count(*) FROM ref) * 4",
]


@st.composite
def statements(draw: st.DrawFn) -> str:
    """A small grammar: select items (scalars, CASE, aggregates, window functions,
    subqueries with and without aggregates), an optional join to ``ref``, an optional WHERE."""
    items = draw(
        st.lists(st.sampled_from(_SCALARS + _MANY + _ROW_SUBQUERIES), min_size=1, max_size=3)
    )
    with_id = draw(st.booleans())  # without it, a select list of aggregates is valid SQL
    select = ", ".join(
        [*(["id"] if with_id else []), *(f"{e} AS c{i}" for i, e in enumerate(items))]
    )
    join = draw(st.sampled_from(["", " LEFT JOIN ref ON input.k = ref.k", " JOIN ref USING (k)"]))
    if join:
        select += ", ref.x AS rx"
    where = draw(st.one_of(st.just(""), st.sampled_from(_CONDITIONS).map(" WHERE {}".format)))
    return f"SELECT {select} FROM input{join}{where}"


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sql=statements(), cuts=st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_i8_review_row_wise_statements_give_the_whole_input_answer_whatever_the_cuts(
    tmp_path: Path, sql: str, cuts: list[int]
) -> None:
    """Any statement the engine classifies row-wise gives, run per batch, DuckDB's answer over
    the whole input (and each row keeps its provenance); the others, run by the step (spilled,
    once at the end), give it too."""
    (tmp_path / "ref.csv").write_text(REF_CSV)
    try:
        want = _duckdb(sql, _INPUT, _REF)
    except duckdb.Error:
        return  # not a valid statement for DuckDB either (e.g. an aggregate without GROUP BY)
    plan = sqlengine.plan_statement(sql, frozenset({"ref"}))
    step = Sql(SqlStep(id="q", sql=sql, tables={"ref": {"kind": "csv", "path": "ref.csv"}}))
    step.open(RunContext("p", "r", tmp_path))
    got: list[pa.Table] = []
    try:
        i = k = 0
        while i < _INPUT.num_rows:
            n = cuts[k % len(cuts)]
            batch = with_positions(_INPUT.slice(i, n), "input.csv", i)
            res = step.process(batch)
            if plan.whole_input is None:
                assert res.table is not None
                got.append(as_arrow(res.table))
            else:
                assert res.table is None and res.aggregated == batch.num_rows
            i, k = i + n, k + 1
        finished = step.finish()
        if finished is not None:
            results = (
                [finished]
                if not isinstance(finished, list) and hasattr(finished, "table")
                else list(finished)
            )
            got.extend(as_arrow(r.table) for r in results if r.table is not None)
    finally:
        step.close()
    rows = [r for t in got for r in t.to_pylist()]
    for row in rows:  # provenance of row-wise statements: the row's position is its input row
        assert (ROW_COL in row) == (plan.whole_input is None)
        if ROW_COL in row:
            position = row.pop(ROW_COL)
            row.pop(SOURCE_COL)
            assert position == row["id"] if "id" in row else 0 <= position < _INPUT.num_rows
    assert sorted(map(_key, rows)) == sorted(map(_key, want)), (sql, plan.whole_input)
