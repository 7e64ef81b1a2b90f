"""Regression tests for the review of filter / derive after issue 8 (REVIEW_SQL sections 1, 3):
hidden columns, unsigned 64-bit comparisons, nesting depth, filters that are not conditions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluice.batch import ROW_COL, as_arrow, with_positions
from sluice.config import parse_pipeline
from sluice.config.models import DeriveStep, FilterStep, SqlStep
from sluice.config.validate import validate_pipeline
from sluice.errors import StepError
from sluice.plugins import RunContext
from sluice.runtime.executor import Executor
from sluice.steps.expressions import Derive, Filter
from sluice.steps.sql import Sql


def _batch() -> pa.Table:
    return with_positions(pa.table({"v": [1, 2, 3], "s": ["a", "b", "c"]}), "in.csv", 10)


# ------------------------------------------------------------------ hidden columns


def test_i8_review_derive_row_value_has_no_hidden_columns() -> None:
    """``to_json(input)`` in a derive (run by DuckDB) saw the position columns."""
    step = Derive(DeriveStep(id="d", derive={"j": "to_json(input)", "w": "v * 10"}))
    out = as_arrow(step.process(_batch()).table)
    assert out["j"].to_pylist() == ['{"v":1,"s":"a"}', '{"v":2,"s":"b"}', '{"v":3,"s":"c"}']
    assert out["w"].to_pylist() == [10, 20, 30]
    assert out[ROW_COL].to_pylist() == [10, 11, 12]  # the rows keep their positions


def test_i8_review_later_derived_columns_see_earlier_ones_in_the_row_value() -> None:
    step = Derive(DeriveStep(id="d", derive={"w": "v + 1", "j": "to_json(input)"}))
    out = as_arrow(step.process(_batch()).table)
    assert out["j"].to_pylist()[0] == '{"v":1,"s":"a","w":2}'


def test_i8_review_filter_on_a_row_value_has_no_hidden_columns() -> None:
    step = Filter(FilterStep(id="f", filter='to_json(input) = \'{"v":2,"s":"b"}\''))
    out = as_arrow(step.process(_batch()).table)
    assert out["v"].to_pylist() == [2] and out[ROW_COL].to_pylist() == [11]
    assert out.schema == _batch().schema  # every column keeps its exact type


@pytest.mark.parametrize(
    "step",
    [
        lambda: FilterStep(id="f", filter="__sluice_row > 1"),
        lambda: DeriveStep(id="d", derive={"p": "__sluice_source"}),
        lambda: DeriveStep(id="d", derive={"__sluice_line": "1"}),
    ],
)
def test_i8_review_expressions_cannot_name_the_hidden_columns(step: Any) -> None:
    with pytest.raises(ValueError, match="__sluice"):
        step()


def test_i8_review_unnest_is_refused_in_an_expression() -> None:
    """unnest makes rows; a derive / filter gives one value per row."""
    with pytest.raises(ValueError, match="unnest"):
        DeriveStep(id="d", derive={"u": "unnest([1, 2])"})


# ------------------------------------------------------------------ unsigned 64-bit


def test_i8_review_uint64_against_uint32_is_compared_unsigned(tmp_path: Path) -> None:
    """Parquet u = 2^63 (uint64) and w (uint32): ``u > w`` was translated as signed 64-bit
    and failed at run time; DuckDB answers true."""
    table = pa.table(
        {
            "u": pa.array([2**63, 5, 2**64 - 1], pa.uint64()),
            "w": pa.array([1, 7, 2**32 - 1], pa.uint32()),
        }
    )
    pq.write_table(table, tmp_path / "u.parquet")
    raw = {
        "pipeline": "u",
        "source": {"kind": "parquet", "path": "u.parquet"},
        "steps": [{"id": "f", "filter": "u > w"}],
        "sinks": [{"id": "out", "kind": "parquet", "path": "out"}],
        "dead_letter": {"kind": "jsonl", "path": "dl"},
        "settings": {"report_dir": "runs"},
    }
    cfg = parse_pipeline(raw)
    assert validate_pipeline(cfg, base_dir=tmp_path) == []
    rep = Executor(cfg, base_dir=tmp_path, progress=False).run()
    assert rep.status == "succeeded" and rep.balanced
    con = duckdb.connect()
    con.register("input", table)
    want = con.sql("SELECT u FROM input WHERE u > w").fetchall()
    assert pq.read_table(tmp_path / "out")["u"].to_pylist() == [r[0] for r in want]
    step = Filter(FilterStep(id="f", filter="u > w"))
    step.process(with_positions(table, "u.parquet", 0))
    assert not any(isinstance(p, str) for p in step._plans.values())  # still the Polars path


# ------------------------------------------------------------------ nesting depth


def _deep(step: str, n: int) -> Any:
    if step == "filter":
        return FilterStep(id="f", filter=" + ".join(["v"] * n) + " > 0")
    if step == "derive":
        return DeriveStep(id="d", derive={"k": " || '-' || ".join(["s"] * n)})
    return SqlStep(id="q", sql="SELECT " + " + ".join(["v"] * n) + " AS k FROM input")


@pytest.mark.parametrize("kind", ["filter", "derive", "sql"])
@pytest.mark.parametrize("n", [100, 300, 900])
def test_i8_review_deeply_nested_expression_is_refused_by_validate(kind: str, n: int) -> None:
    """100 '+' terms passed validate and failed at run time (SerializationException); 300
    crashed validate itself with a RecursionError."""
    with pytest.raises(ValueError, match="nested too deeply"):
        _deep(kind, n)


@pytest.mark.parametrize("kind", ["filter", "derive", "sql"])
def test_i8_review_the_deepest_accepted_expression_runs(kind: str) -> None:
    """Whatever validate accepts runs: the deepest accepted chain runs on both paths (the
    Polars translation and DuckDB itself, made to run by a row value in the same step)."""
    n = 2
    while True:
        try:
            _deep(kind, n + 1)
        except ValueError:
            break
        n += 1
    config = _deep(kind, n)
    batch = _batch()
    if kind == "sql":
        step: Any = Sql(config)
        step.open(RunContext("p", "r"))
    elif kind == "filter":
        step = Filter(config)
        step.process(batch)
        # the same depth, but not translatable: DuckDB runs it
        step = Filter(
            FilterStep(id="f", filter=config.filter.replace("> 0", "> length(to_json(input))"))
        )
    else:
        step = Derive(config)
        step.process(batch)
        step = Derive(config.model_copy(update={"derive": {**config.derive, "j": "input"}}))
    out = step.process(batch)
    assert out.table is not None


# ------------------------------------------------------------------ filter type


def test_i8_review_filter_must_be_boolean_when_the_type_is_known(tmp_path: Path) -> None:
    """``filter: name`` on a text column passed validate and failed at run time."""
    pq.write_table(pa.table({"name": ["ann"], "n": [1]}), tmp_path / "in.parquet")
    raw = {
        "pipeline": "p",
        "source": {"kind": "parquet", "path": "in.parquet"},
        "steps": [{"id": "f", "filter": "name"}, {"id": "g", "filter": "n"}],
    }
    errs = validate_pipeline(parse_pipeline(raw), base_dir=tmp_path)
    assert {e.step_id for e in errs} == {"f", "g"}, errs
    assert all("not true/false" in str(e) for e in errs)


def test_i8_review_filter_that_is_not_a_condition_says_so_at_run_time() -> None:
    """Types not known before the run: the first batch finds it, before any row is judged."""
    step = Filter(FilterStep(id="f", filter="s"))
    with pytest.raises(StepError, match="gives string, not true/false"):
        step.process(_batch())
    assert as_arrow(Filter(FilterStep(id="f", filter="NULL")).process(_batch()).table).num_rows == 0


def test_i8_review_duckdb_path_keeps_rows_aligned_on_large_batches() -> None:
    """The DuckDB path computes a filter's mask / a derive's columns over the user columns and
    applies them to the batch: that relies on DuckDB keeping the input's order and row count,
    also over several chunks and threads."""
    n = 300_001
    table = pa.concat_tables(
        [pa.table({"v": list(range(i, min(n, i + 65_536)))}) for i in range(0, n, 65_536)]
    )
    batch = with_positions(table, "big.csv", 0)
    kept = as_arrow(
        Filter(FilterStep(id="f", filter="v % 3 = 0 AND length(to_json(input)) > 0"))
        .process(batch)
        .table
    )
    assert kept["v"].to_pylist() == kept[ROW_COL].to_pylist() == list(range(0, n, 3))
    derived = as_arrow(
        Derive(DeriveStep(id="d", derive={"j": "v * 2 + length(to_json(input)) * 0"}))
        .process(batch)
        .table
    )
    assert derived[ROW_COL].to_pylist() == derived["v"].to_pylist() == list(range(n))
    assert derived["j"].to_pylist() == [2 * x for x in range(n)]
