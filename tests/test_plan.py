"""The column plan: misspelt column names are found before any data is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluice.config.loader import parse_pipeline
from sluice.plan import column_errors


@pytest.fixture
def parquet_source(tmp_path: Path) -> dict[str, Any]:
    pq.write_table(
        pa.table({"id": [1], "amount": [2.5], "ts": ["2024-01-01"], "country": ["DE"]}),
        tmp_path / "in.parquet",
    )
    return {"kind": "parquet", "path": "in.parquet"}


def _errors(tmp_path: Path, source: dict[str, Any], steps: list[Any], sinks: Any = ()) -> list[str]:
    cfg = parse_pipeline(
        {"pipeline": "p", "source": source, "steps": steps, "sinks": list(sinks)}
    )
    return [str(e) for e in column_errors(cfg, tmp_path)]


def test_i8_23_misspelt_select_column_is_found_with_a_suggestion(
    tmp_path: Path, parquet_source: dict[str, Any]
) -> None:
    errs = _errors(tmp_path, parquet_source, [{"id": "keep", "select": ["id", "amout"]}])
    assert len(errs) == 1
    assert "step 'keep'" in errs[0] and "'amout'" in errs[0] and "did you mean 'amount'" in errs[0]


def test_i8_23_misspelt_columns_in_expressions_and_sql(
    tmp_path: Path, parquet_source: dict[str, Any]
) -> None:
    steps = [
        {"id": "f", "filter": "amout > 0"},
        {"id": "d", "derive": {"double": "amount * 2", "triple": "amuont * 3"}},
        {"id": "s", "sql": "SELECT id, double, countr FROM input"},
        {"id": "after", "select": ["id", "double"]},
    ]
    errs = _errors(tmp_path, parquet_source, steps)
    assert any("step 'f'" in e and "amout" in e for e in errs), errs
    assert any("step 'd'" in e and "derive.triple" in e and "amuont" in e for e in errs), errs
    assert any("step 's'" in e and "countr" in e for e in errs), errs
    assert len(errs) == 3, errs  # 'double' (derived) is known to the later steps


def test_i8_23_columns_flow_through_rename_select_and_sql(
    tmp_path: Path, parquet_source: dict[str, Any]
) -> None:
    steps = [
        {"id": "r", "rename": {"amount": "value"}},
        {"id": "s", "sql": "SELECT id, value * 2 AS twice FROM input"},
        {"id": "bad", "select": ["amount"]},  # renamed away, then not selected by the SQL
    ]
    errs = _errors(tmp_path, parquet_source, steps)
    assert len(errs) == 1 and "step 'bad'" in errs[0], errs


def test_i8_23_sink_partition_column_is_checked_and_called_a_sink(
    tmp_path: Path, parquet_source: dict[str, Any]
) -> None:
    sinks = [{"id": "lake", "kind": "parquet", "path": "out", "partition_by": ["contry"]}]
    errs = _errors(tmp_path, parquet_source, [], sinks)
    assert len(errs) == 1
    assert errs[0].startswith("sink 'lake'") and "did you mean 'country'" in errs[0]


def test_i8_23_window_columns_are_checked(
    tmp_path: Path, parquet_source: dict[str, Any]
) -> None:
    step = {
        "id": "w",
        "window": {"size": "1m", "time": "tss", "key": "id"},
        "aggregate": {"n": "count()", "total": "sum(amount)", "bad": "max(amont)"},
    }
    errs = _errors(tmp_path, parquet_source, [step])
    assert len(errs) == 2, errs
    assert any("'tss'" in e for e in errs) and any("'amont'" in e for e in errs)


def test_i8_23_partial_schema_reports_only_near_misses(tmp_path: Path) -> None:
    source = {
        "kind": "redis_stream",
        "stream": "s",
        "schema": {"amount": "double", "customer_id": "int"},
    }
    near = _errors(tmp_path, source, [{"id": "f", "filter": "amout > 0"}])
    # a stream's declared schema is partial: 'amout' is a typo of 'amount' ...
    assert near and "did you mean 'amount'" in near[0]
    # ... while a field far from every declared name may arrive with the data
    assert _errors(tmp_path, source, [{"id": "k", "select": ["status"]}]) == []


def test_plan_stops_guessing_after_an_unknown_step(tmp_path: Path) -> None:
    source = {"kind": "redis_stream", "stream": "s"}  # nothing declared: nothing known
    steps = [{"id": "a", "select": ["x"]}, {"id": "b", "select": ["y"]}]
    errs = _errors(tmp_path, source, steps)
    assert len(errs) == 1 and "step 'b'" in errs[0]  # after a select, columns are known again


def test_i8_23_sluice_validate_reports_a_misspelt_column(
    tmp_path: Path, parquet_source: dict[str, Any]
) -> None:
    from typer.testing import CliRunner

    from sluice.cli import app

    path = tmp_path / "p.yaml"
    path.write_text(
        "pipeline: p\nsource: {kind: parquet, path: in.parquet}\n"
        "steps: [{id: f, filter: 'amout > 1'}]\n"
    )
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "step 'f'" in result.output and "amout" in result.output


def _csv_pipeline(tmp_path: Path, steps: list[Any]) -> list[str]:
    (tmp_path / "main.csv").write_text("k,v\na,1\nb,2\n")
    (tmp_path / "ref.csv").write_text("k,rate\na,10\nb,20\n")
    return _errors(tmp_path, {"kind": "csv", "path": "main.csv"}, steps)


@pytest.mark.parametrize(
    "tables,sql,expect",
    [
        (
            {"r": {"kind": "csv", "path": "ref.csv"}},
            "SELECT input.k, v * r.rtae AS x FROM input JOIN r ON input.k = r.k",
            "unknown column 'r.rtae' (did you mean 'rate'?)",
        ),
        (
            {"r": {"kind": "csv", "path": "ref.csv", "schema": {" rate": "int"}}},
            "SELECT input.k, v * r.rate AS x FROM input JOIN r ON input.k = r.k",
            "field 'tables.r.schema. rate'",
        ),
        (
            {"r": {"kind": "csv", "path": "ref.csv"}},
            "SELECT input.k, vv * r.rate AS x FROM input JOIN r ON input.k = r.k",
            "unknown column 'vv' (did you mean 'v'?)",
        ),
    ],
)
def test_i8_review_sql_tables_are_bound_at_validate(
    tmp_path: Path, tables: dict[str, Any], sql: str, expect: str
) -> None:
    """A sql step with ``tables:`` was never bound: a misspelt r.rtae and a schema key missing
    from the reference file passed validate and failed the run."""
    errs = _csv_pipeline(tmp_path, [{"id": "q", "sql": sql, "tables": tables}])
    assert len(errs) == 1 and "step 'q'" in errs[0] and expect in errs[0], errs


def test_i8_review_sql_with_tables_hands_its_columns_on(tmp_path: Path) -> None:
    steps = [
        {
            "id": "q",
            "sql": "SELECT input.k, v * r.rate AS x FROM input JOIN r ON input.k = r.k",
            "tables": {"r": {"kind": "csv", "path": "ref.csv"}},
        },
        {"id": "after", "select": ["k", "xx"]},
    ]
    errs = _csv_pipeline(tmp_path, steps)
    assert len(errs) == 1 and "step 'after'" in errs[0] and "did you mean 'x'" in errs[0], errs


def test_i8_review_window_count_star_is_a_row_count(
    tmp_path: Path, parquet_source: dict[str, Any]
) -> None:
    """The plan re-parsed window aggregates itself and reported ``count(*)`` as column '*';
    it now uses the window step's parser, which reads count(*) as a row count."""
    step = {
        "id": "w",
        "window": {"size": "1m", "time": "ts", "key": "id"},
        "aggregate": {"n": "count(*)", "m": "count( )", "bad": "max(amont)"},
    }
    errs = _errors(tmp_path, parquet_source, [step])
    assert len(errs) == 1 and "'amont'" in errs[0], errs
