"""One expression language: every function docs/expressions.md lists gives DuckDB's value in
filter, derive, sql and a contract sql rule (NULLs, NaN, infinities, halves, time zones)."""

from __future__ import annotations

import datetime as dt
import decimal
import math
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.batch import ROW_COL, SOURCE_COL, as_arrow, with_positions
from sluice.config import parse_pipeline
from sluice.config.models import DeriveStep, FilterStep, SqlStep
from sluice.errors import ConfigError, ConfigErrors, StepError
from sluice.plugins import RunContext
from sluice.quality.contract import parse_contract
from sluice.quality.engine import evaluate
from sluice.steps.expressions import (
    Derive,
    Filter,
    derive_output_schema,
    filter_output_schema,
)
from sluice.steps.sql import Sql

DOC = Path(__file__).resolve().parents[2] / "docs" / "expressions.md"
PARIS = ZoneInfo("Europe/Paris")


def _cycle(values: list[Any], n: int) -> list[Any]:
    return [values[i % len(values)] for i in range(n)]


def data() -> pa.Table:
    """The columns the docs' examples use, with the awkward values."""
    n = 18
    amounts = [
        2.5,
        -2.5,
        0.5,
        1.5,
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        None,
        100.0,
        10.0,
        0.125,
        2.675,
        99.99,
        5.0,
        1e-300,
        7.0,
        -0.5,
    ]
    statuses = [
        "paid",
        "refunded",
        "",
        None,
        "Paid",
        " pa id ",
        "ünïcødé",
        "e\u0301",
        "İstanbul",
        "a\nb",
        "%_x",
        "pending",
        "PAID",
        "paid ",
        "test",
    ]
    days = [
        dt.date(2024, 2, 29),
        dt.date(1969, 12, 31),
        None,
        dt.date(2024, 1, 1),
        dt.date(2023, 12, 31),
        dt.date(2026, 11, 30),
    ]
    tss = [
        dt.datetime(2024, 3, 31, 1, 59, 59, 500000),
        dt.datetime(1969, 12, 31, 23, 59, 59),
        None,
        dt.datetime(2024, 1, 1),
        dt.datetime(2024, 10, 27, 2, 30),
        dt.datetime(2026, 11, 30, 23, 0, 1),
    ]
    ats = [
        dt.datetime(2024, 3, 31, 0, 30, tzinfo=dt.UTC),
        dt.datetime(2024, 3, 31, 1, 30, tzinfo=dt.UTC),
        dt.datetime(2023, 12, 31, 23, 30, tzinfo=dt.UTC),
        None,
        dt.datetime(2024, 10, 27, 0, 59, 59, tzinfo=dt.UTC),
        dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
    ]
    return pa.table(
        {
            "quantity": pa.array(_cycle([1, 2, 3, 0, -4, 10, None, 7, 5], n), pa.int64()),
            "amount": pa.array(amounts[:n], pa.float64()),
            "price": pa.array(
                _cycle(
                    [
                        decimal.Decimal("2.50"),
                        decimal.Decimal("-2.50"),
                        None,
                        decimal.Decimal("0.05"),
                        decimal.Decimal("1234567.89"),
                    ],
                    n,
                ),
                pa.decimal128(12, 2),
            ),
            "status": pa.array(_cycle(statuses, n), pa.string()),
            "day": pa.array(_cycle(days, n), pa.date32()),
            "ts": pa.array(_cycle(tss, n), pa.timestamp("us")),
            "ts_tz": pa.array(_cycle(ats, n), pa.timestamp("us", tz="UTC")).cast(
                pa.timestamp("us", tz="Europe/Paris")
            ),
            "ok": pa.array(_cycle([True, False, None], n), pa.bool_()),
        }
    )


def doc_functions() -> list[tuple[str, str, bool]]:
    """(function, example, fast?) from the functions table of docs/expressions.md."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("## Functions", 1)[1]
    rows = []
    for line in table.splitlines():
        m = re.match(r"\| (`.+?`(?: .+?)?) \| `(.+)` \| (.*)\|$", line)
        if m:
            example = m.group(2).replace("\\|", "|")
            rows.append((m.group(1), example, m.group(3).strip().startswith("fast")))
    return rows


def oracle(expr: str, table: pa.Table) -> pa.ChunkedArray:
    """Plain DuckDB (not Sluice's engine), session time zone UTC."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("input", table)
    out: pa.ChunkedArray = con.sql(f"SELECT ({expr}) AS out FROM input").to_arrow_table()["out"]
    con.close()
    return out


def same(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if isinstance(x, float) and isinstance(y, float) and x == y == 0:
            if math.copysign(1, x) != math.copysign(1, y):
                return False
            continue
        if x != y or type(x) is not type(y):
            return False
    return True


def plain(t: pa.DataType) -> pa.DataType:
    """Arrow types that hold the same values: string kinds, and time zone labels."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_timestamp(t) and t.tz is not None:
        return pa.timestamp(t.unit, tz="UTC")
    return t


FUNCTIONS = doc_functions()


def test_the_docs_list_functions() -> None:
    assert len(FUNCTIONS) >= 80
    names = " ".join(f for f, _, _ in FUNCTIONS)
    for fn in ("round", "epoch", "date_diff", "regexp_matches", "date_trunc", "CASE"):
        assert fn in names


@pytest.mark.parametrize(
    ("function", "example", "fast"), FUNCTIONS, ids=[e for _, e, _ in FUNCTIONS]
)
def test_i8_02_every_documented_function_is_the_same_in_filter_derive_sql_and_contracts(
    function: str, example: str, fast: bool
) -> None:
    table = data()
    want = oracle(example, table)
    batch = with_positions(table, "mem", 0)

    derive = Derive(DeriveStep(id="d", derive={"out": example}))
    got = as_arrow(derive.process(batch).table)
    assert same(got["out"].to_pylist(), want.to_pylist()), (got["out"], want)
    assert plain(got.schema.field("out").type) == plain(want.type)
    assert got[ROW_COL].to_pylist() == list(range(table.num_rows))
    used_polars = not isinstance(next(iter(derive._plans.values())), str)
    assert used_polars == fast, f"docs say fast={fast}, derive ran in " + (
        "Polars" if used_polars else "DuckDB"
    )

    sql = Sql(SqlStep(id="q", sql=f"SELECT ({example}) AS out FROM input"))
    sql.open(RunContext("p", "r"))
    try:
        got_sql = as_arrow(sql.process(batch).table)
    finally:
        sql.close()
    assert same(got_sql["out"].to_pylist(), want.to_pylist())

    with_expected = batch.append_column("expected", want)
    keep = Filter(FilterStep(id="f", filter=f"({example}) IS NOT DISTINCT FROM expected"))
    assert keep.process(with_expected).filtered == 0
    if pa.types.is_boolean(want.type):
        filt = Filter(FilterStep(id="f", filter=example))
        res = filt.process(batch)
        kept = as_arrow(res.table)[ROW_COL].to_pylist()
        assert kept == [i for i, v in enumerate(want.to_pylist()) if v is True]
        assert (not isinstance(next(iter(filt._plans.values())), str)) == fast

    contract = parse_contract(
        {
            "name": "same",
            "schema": [{"name": c} for c in with_expected.column_names[:-3]]
            + [{"name": "expected"}],
            "quality": [
                {
                    "sql": f"SELECT count(*) FROM input WHERE ({example}) "
                    "IS DISTINCT FROM expected",
                    "must_be": 0,
                    "name": "same",
                }
            ],
        }
    )
    assert evaluate(contract, table.append_column("expected", want))["same"] == 0


def test_i8_02_round_half_is_the_same_in_filter_derive_and_sql() -> None:
    batch = with_positions(pa.table({"x": [2.5, -2.5, 0.5, 3.5]}), "mem", 0)
    derived = as_arrow(Derive(DeriveStep(id="d", derive={"r": "round(x)"})).process(batch).table)
    assert derived["r"].to_pylist() == [3.0, -3.0, 1.0, 4.0]
    kept = Filter(FilterStep(id="f", filter="round(x) = 3")).process(batch)
    assert as_arrow(kept.table)["x"].to_pylist() == [2.5]
    assert (
        as_arrow(Derive(DeriveStep(id="d", derive={"r": "round(2.5)"})).process(batch).table)[
            "r"
        ].to_pylist()
        == [decimal.Decimal("3")] * 4
    )  # 2.5 is a DECIMAL literal, as in sql
    sql = Sql(SqlStep(id="q", sql="SELECT round(x) AS r FROM input"))
    sql.open(RunContext("p", "r"))
    assert as_arrow(sql.process(batch).table)["r"].to_pylist() == [3.0, -3.0, 1.0, 4.0]
    sql.close()


def test_i8_02_epoch_date_diff_regexp_matches_run_in_filter_and_derive() -> None:
    batch = with_positions(
        pa.table(
            {
                "ts": pa.array(
                    [dt.datetime(2024, 1, 1, 23, 0), dt.datetime(2024, 1, 2)], pa.timestamp("us")
                ),
                "s": ["paid", "nope"],
            }
        ),
        "mem",
        0,
    )
    derive = Derive(
        DeriveStep(
            id="d",
            derive={
                "e": "epoch(ts)",
                "dd": "date_diff('day', TIMESTAMP '2024-01-01 12:00:00', ts)",
                "m": "regexp_matches(s, '^p.*d$')",
            },
        )
    )
    out = as_arrow(derive.process(batch).table)
    assert out["e"].to_pylist() == [1704150000.0, 1704153600.0]
    assert out["dd"].to_pylist() == [0, 1]
    assert out["m"].to_pylist() == [True, False]
    kept = Filter(FilterStep(id="f", filter="regexp_matches(s, 'p.*d') AND epoch(ts) > 0"))
    assert as_arrow(kept.process(batch).table)["s"].to_pylist() == ["paid"]


def _pipeline(steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pipeline": "p", "source": {"kind": "csv", "path": "x.csv"}, "steps": steps}


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"filter": "epochh(ts) > 0"}, r"unknown function epochh\(\) \(did you mean epoch\(\)\?\)"),
        ({"filter": "amount >>> 2"}, "unknown operator >>>"),
        ({"filter": "amount >"}, "cannot parse"),
        ({"filter": "sum(amount) > 0"}, r"sum\(\) works over many rows"),
        ({"derive": {"x": "row_number() OVER ()"}}, "works over many rows"),
        ({"derive": {"x": "(SELECT 1)"}}, "subquery"),
        ({"filter": "amount > 0) OR (1 = 1"}, "cannot parse|not one SQL expression"),
        ({"sql": "SELECT datediff2('day', ts, ts) FROM input"}, r"unknown function datediff2"),
    ],
)
def test_i8_02_unknown_functions_and_syntax_errors_are_config_errors(
    step: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigErrors) as err:
        parse_pipeline(_pipeline([{"id": "bad", **step}]))
    text = str(err.value)
    assert "step 'bad'" in text
    assert re.search(message, text), text
    if "unknown function" in message:
        assert "docs/expressions.md" in text


def test_i8_02_output_schema_names_unknown_columns_with_did_you_mean() -> None:
    schema = pa.schema([("amount", pa.float64()), ("status", pa.string())])
    with pytest.raises(ConfigError, match=r"unknown column 'amout' \(did you mean 'amount'\?\)"):
        filter_output_schema(FilterStep(id="f", filter="amout > 1"), schema)
    assert filter_output_schema(FilterStep(id="f", filter="amount > 1"), schema) == schema
    out = derive_output_schema(
        DeriveStep(id="d", derive={"total": "amount * 2", "amount": "round(amount)"}), schema
    )
    assert out is not None
    assert out.names == ["amount", "status", "total"]
    assert out.field("total").type == pa.float64()
    with pytest.raises(ConfigError, match=r"step 'd', field 'derive.t'.*'statsu'"):
        derive_output_schema(DeriveStep(id="d", derive={"t": "upper(statsu)"}), schema)
    assert filter_output_schema(FilterStep(id="f", filter="amount > 1"), None) is None


def test_unknown_column_at_run_time_names_the_step_and_the_columns() -> None:
    batch = with_positions(pa.table({"amount": [1.0]}), "mem", 0)
    with pytest.raises(StepError, match=r"step 'f'.*'amout' \(did you mean 'amount'\?\)"):
        Filter(FilterStep(id="f", filter="amout > 1")).process(batch)


def test_filter_and_derive_keep_provenance_on_both_paths() -> None:
    batch = with_positions(pa.table({"s": ["a", "b", "c"], "n": [1, 2, 3]}), "f.csv", 10)
    for expr in ("n >= 2", "lower(s) <> 'a'"):  # Polars, then DuckDB
        out = as_arrow(Filter(FilterStep(id="f", filter=expr)).process(batch).table)
        assert out[ROW_COL].to_pylist() == [11, 12]
        assert out[SOURCE_COL].to_pylist() == batch[SOURCE_COL].to_pylist()[1:]
    out = as_arrow(
        Derive(DeriveStep(id="d", derive={"u": "upper(s)", "n": "n * 2"})).process(batch).table
    )
    assert out[ROW_COL].to_pylist() == [10, 11, 12] and out["u"].to_pylist() == ["A", "B", "C"]


# ------------------------------------------------------------------ the two paths agree

_VALUES = {
    "i": st.one_of(st.none(), st.integers(-(2**40), 2**40)),
    "j": st.one_of(st.none(), st.integers(-5, 5)),
    "f": st.one_of(
        st.none(),
        st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.5, -0.5, 2.5]),
        st.floats(-1e6, 1e6),
    ),
    "s": st.one_of(st.none(), st.sampled_from(["", "a", "paid", "PAID", "a%b", "ü", "a_c"])),
    "t": st.one_of(
        st.none(),
        st.datetimes(dt.datetime(1960, 1, 1), dt.datetime(2090, 1, 1)),
    ),
    "z": st.one_of(
        st.none(),
        st.datetimes(dt.datetime(1960, 1, 1), dt.datetime(2090, 1, 1), timezones=st.just(dt.UTC)),
    ),
    "d": st.one_of(st.none(), st.dates(dt.date(1960, 1, 1), dt.date(2090, 1, 1))),
    "p": st.one_of(
        st.none(),
        st.decimals(-(10**6), 10**6, places=2, allow_nan=False, allow_infinity=False),
    ),
}
_EXPRS = [
    "i > j",
    "i = 3",
    "f >= 0.5",
    "f = f",
    "f > 1e300",
    "i BETWEEN -2 AND 2.5",
    "i > 2.5",
    "i = 2.5",
    "j IN (1, 2, 3)",
    "j NOT IN (1, 2.5)",
    "s IN ('a', 'paid')",
    "s LIKE 'a%'",
    "s LIKE '%a_c'",
    "s LIKE 'a_c'",
    "NOT (i > 0 AND s IS NULL) OR f < 0",
    "i IS DISTINCT FROM j",
    "f + i",
    "i + j",
    "i * j - 7",
    "i / j",
    "f / j",
    "-i",
    "abs(f)",
    "abs(j)",
    "round(f)",
    "floor(f)",
    "ceil(f)",
    "CASE WHEN i > 0 THEN f WHEN j IS NULL THEN 1 ELSE i END",
    "coalesce(j, i, 0)",
    "s || 'x'",
    "length(s)",
    "starts_with(s, 'p')",
    "CAST(j AS DOUBLE)",
    "t >= '2024-01-01'",
    "t < d",
    "d = '2024-02-29'",
    "z >= '2024-03-31 01:30:00'",
    "year(t)",
    "month(d)",
    "hour(z)",
    "day(z)",
    "date_trunc('hour', t)",
    "date_trunc('month', z)",
    "date_trunc('week', t)",
    "date_part('minute', z)",
    "CAST(z AS DATE)",
    "CAST(t AS DATE)",
    "p > 0",
    "p = 2.5",
    "p BETWEEN -1 AND 1.25",
    "p IS NULL OR p < 0",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.fixed_dictionaries(_VALUES), min_size=1, max_size=30),
    expr=st.sampled_from(_EXPRS),
)
def test_polars_translation_equals_duckdb(rows: list[dict[str, Any]], expr: str) -> None:
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("i", pa.int64()),
                ("j", pa.int32()),
                ("f", pa.float64()),
                ("s", pa.string()),
                ("t", pa.timestamp("us")),
                ("z", pa.timestamp("us", tz="UTC")),
                ("d", pa.date32()),
                ("p", pa.decimal128(12, 2)),
            ]
        ),
    )
    table = table.set_column(  # the same instants, labelled with another zone
        table.schema.get_field_index("z"),
        "z",
        table["z"].cast(pa.timestamp("us", tz="Europe/Paris")),
    )
    want = oracle(expr, table).to_pylist()
    derive = Derive(DeriveStep(id="d", derive={"out": expr}))
    got = as_arrow(derive.process(with_positions(table, "mem", 0)).table)["out"].to_pylist()
    assert not isinstance(next(iter(derive._plans.values())), str), f"{expr} not translated"
    assert same(got, want), (expr, got, want)


def test_integer_overflow_is_an_error_as_in_duckdb_never_a_wrapped_value() -> None:
    big = pa.table({"i": pa.array([2**63 - 1, 1], pa.int64())})
    with pytest.raises(duckdb.Error, match="Overflow"):
        oracle("i + 1", big)
    derive = Derive(DeriveStep(id="d", derive={"j": "i + 1"}))
    with pytest.raises(StepError, match="step 'd'"):
        derive.process(with_positions(big, "mem", 0))
    assert not isinstance(next(iter(derive._plans.values())), str)  # the Polars path raised
    # DuckDB evaluates a CASE branch only for its rows: no error there, in either engine
    guarded = "CASE WHEN i < 100 THEN i + 1 ELSE 0 END"
    assert oracle(guarded, big).to_pylist() == [0, 2]
    out = Derive(DeriveStep(id="d", derive={"j": guarded})).process(with_positions(big, "m", 0))
    assert as_arrow(out.table)["j"].to_pylist() == [0, 2]
