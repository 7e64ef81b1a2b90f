"""Built-in steps on real Arrow batches: select, rename, cast, filter, derive, sql, deduplicate."""

from __future__ import annotations

import decimal

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sluice.batch import ROW_COL, as_arrow, with_positions
from sluice.config import parse_pipeline
from sluice.config.models import (
    CastStep,
    DeduplicateStep,
    DeriveStep,
    FilterStep,
    RenameStep,
    SelectStep,
    SqlStep,
)
from sluice.errors import ConfigErrors, StepError
from sluice.plugins import RunContext
from sluice.steps.columns import Cast, Rename, Select
from sluice.steps.dedupe import Deduplicate
from sluice.steps.expressions import Derive, Filter
from sluice.steps.sql import Sql


def batch(**cols: list[object]) -> pa.Table:
    return with_positions(pa.table(cols), "mem", 0)


def test_select_keeps_order_and_positions_and_names_missing_columns() -> None:
    t = batch(a=[1], b=[2], c=[3])
    out = as_arrow(Select(SelectStep(id="s", select=["c", "a"])).process(t).table)
    assert out.column_names[:2] == ["c", "a"] and ROW_COL in out.column_names
    with pytest.raises(StepError, match=r"step 's'.*'amout' \(did you mean 'amount'\?\)"):
        Select(SelectStep(id="s", select=["amout"])).process(batch(amount=[1]))


def test_rename_refuses_collisions() -> None:
    out = as_arrow(Rename(RenameStep(id="r", rename={"a": "x"})).process(batch(a=[1], b=[2])).table)
    assert out.column_names[:2] == ["x", "b"]
    with pytest.raises(StepError, match="duplicate"):
        Rename(RenameStep(id="r", rename={"a": "b"})).process(batch(a=[1], b=[2]))


def test_cast_types_and_dead_letters_name_column_value_and_type() -> None:
    t = batch(
        i=["1", " 2 ", "x", "", None],
        d=["1.25", "2", "3", "4", "5"],
        ts=["2026-01-01T10:00:00", "2026-01-02", "2026-01-03 01:02:03", "nope", None],
        b=["true", "no", "1", "F", "maybe"],
    )
    step = Cast(
        CastStep(id="c", cast={"i": "int", "d": "decimal(10,2)", "ts": "timestamp", "b": "bool"})
    )
    res = step.process(t)
    out = as_arrow(res.table).to_pydict()
    assert out["i"] == [1, 2]
    assert out["d"] == [decimal.Decimal("1.25"), decimal.Decimal("2.00")]
    assert out["b"] == [True, False]
    assert as_arrow(res.table).schema.field("ts").type == pa.timestamp("us")
    dead = res.dead.to_pylist()
    assert [d["position"] for d in dead] == [2, 3, 4]
    assert "column 'i': value x cannot be cast to int" in dead[0]["message"]
    assert "column 'b': value 1" not in dead[0]["message"]  # '1' is a valid bool
    assert "column 'ts': value nope cannot be cast to timestamp" in dead[1]["message"]
    assert "column 'b': value maybe cannot be cast to bool" in dead[2]["message"]
    assert all(d["reason"] == "cast_error" and d["step_id"] == "c" for d in dead)


def test_filter_counts_false_and_null_as_filtered() -> None:
    res = Filter(FilterStep(id="f", filter="a > 1")).process(batch(a=[0, 2, None, 3]))
    assert as_arrow(res.table).column("a").to_pylist() == [2, 3] and res.filtered == 2


def test_bad_expressions_are_config_errors_naming_the_step() -> None:
    with pytest.raises(ConfigErrors, match=r"step 'f', field 'filter'.*cannot parse"):
        parse_pipeline(
            {
                "pipeline": "p",
                "source": {"kind": "csv", "path": "x.csv"},
                "steps": [{"id": "f", "filter": "a >>> "}],
            }
        )
    with pytest.raises(ValidationError, match="cannot parse"):  # the model itself refuses it
        FilterStep(id="f", filter="a >>> ")
    with pytest.raises(StepError, match=r"step 'f'.*input columns are: a"):
        Filter(FilterStep(id="f", filter="zzz > 1")).process(batch(a=[1]))


def test_derive_in_order() -> None:
    res = Derive(DeriveStep(id="d", derive={"b": "a * 2", "c": "b + 1"})).process(batch(a=[1, 2]))
    assert as_arrow(res.table).column("c").to_pylist() == [3, 5]


def test_sql_sees_the_batch_as_input() -> None:
    step = Sql(SqlStep(id="q", sql="SELECT *, a * 10 AS b FROM input WHERE a <> 2"))
    step.open(RunContext("p", "r"))
    try:
        res = step.process(batch(a=[1, 2, 3]))
        assert as_arrow(res.table).column("b").to_pylist() == [10, 30] and res.filtered == 1
        assert as_arrow(res.table).column(ROW_COL).to_pylist() == [0, 2]
        bad = Sql(SqlStep(id="q2", sql="SELECT nope FROM input"))
        bad.open(RunContext("p", "r"))
        with pytest.raises(StepError, match="step 'q2': SQL failed"):
            bad.process(batch(a=[1]))
        bad.close()
    finally:
        step.close()


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.tuples(st.integers(0, 20), st.sampled_from(["a", "b", None])), max_size=200),
    size=st.integers(1, 40),
)
def test_dedupe_across_batches_equals_global_first_occurrence(
    keys: list[tuple[int, str | None]], size: int
) -> None:
    step = Deduplicate(DeduplicateStep(id="u", deduplicate={"key": ["k", "s"]}))
    got: list[tuple[int, str | None]] = []
    filtered = 0
    for i in range(0, len(keys), size):
        part = keys[i : i + size]
        res = step.process(batch(k=[k for k, _ in part], s=[s for _, s in part]))
        assert res.table is not None
        got += list(
            zip(
                as_arrow(res.table).column("k").to_pylist(),
                as_arrow(res.table).column("s").to_pylist(),
                strict=True,
            )
        )
        filtered += res.filtered
    assert got == list(dict.fromkeys(keys))
    assert len(got) + filtered == len(keys)


def test_cast_guesses_the_timestamp_format_but_accepts_other_formats() -> None:
    step = Cast(CastStep(id="c", cast={"ts": "timestamp"}))
    first = step.process(batch(ts=["2026-01-01T10:00:00", "2026-01-02T11:30:00"]))
    assert step.formats == {"ts": "%Y-%m-%dT%H:%M:%S"}
    assert as_arrow(first.table).column("ts").to_pylist()[1].hour == 11
    # later batch in other ISO shapes: parsed by inference, not dead-lettered
    later = step.process(batch(ts=["2026-01-03 04:05:06", "2026-01-04T10:00:00", "garbage"]))
    got = as_arrow(later.table).column("ts").to_pylist()
    assert [t.day for t in got] == [3, 4]
    assert [d["payload"] for d in later.dead.to_pylist()] == ['{"ts":"garbage"}']


def test_dedupe_keeps_null_keys_whatever_the_batching() -> None:
    for sizes in ([4], [2, 2], [1, 1, 1, 1]):
        step = Deduplicate(DeduplicateStep(id="u", deduplicate={"key": ["k"]}))
        kept = 0
        values: list[str | None] = [None, None, "a", "a"]
        start = 0
        for n in sizes:
            kept += as_arrow(step.process(batch(k=values[start : start + n])).table).num_rows
            start += n
        step.close()
        assert kept == 3, sizes  # both nulls and the first "a"
