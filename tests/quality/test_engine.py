"""Contract checks: counts independent of batching, state across batches, vectorized."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.batch import with_positions
from sluice.plugins import RunContext
from sluice.quality.contract import parse_contract
from sluice.quality.engine import ContractChecker, ContractFailure, evaluate

CONTRACT = {
    "name": "orders",
    "version": "1.0.0",
    "schema": [
        {"name": "order_id", "type": "int", "required": True, "unique": True, "action": "warn"},
        {"name": "amount", "type": "float", "min": 0, "max": 1000, "action": "warn"},
        {"name": "status", "enum": ["paid", "refunded"], "action": "warn"},
        {
            "name": "email",
            "pattern": "[^@]+@[^@]+",
            "min_length": 3,
            "max_length": 20,
            "action": "warn",
            "pii": True,
        },
        {
            "name": "customer_id",
            "type": "int",
            "action": "warn",
            "references": {"path": "customers.csv", "column": "id"},
        },
    ],
}


def _counts(checker: ContractChecker) -> dict[str, int]:
    return {name: r.failed for name, r in checker.results.items()}


def _run_batches(
    tmp_path: Path, table: pa.Table, size: int, keys_in_memory: int = 10**9
) -> dict[str, int]:
    checker = ContractChecker(parse_contract(CONTRACT), step_id="v")
    for store in checker.seen.values():  # a small limit sends the unique keys to disk
        store.max_in_memory = keys_in_memory
    checker.open(RunContext("p", "r", tmp_path))
    try:
        for start in range(0, max(table.num_rows, 1), size):
            part = table.slice(start, size)
            if part.num_rows:
                checker.check(with_positions(part, "mem", start))
        return _counts(checker)
    finally:
        checker.close()


rows = st.lists(
    st.tuples(
        st.sampled_from(["1", "2", "3", "4", "x", "", None]),
        st.sampled_from(["5", "-1", "2000", "abc", None]),
        st.sampled_from(["paid", "refunded", "lost", None]),
        st.sampled_from(["a@b.c", "nope", "x@", "a@b", "very-long-address@example.org", None]),
        st.sampled_from(["1", "2", "9", None]),
    ),
    max_size=120,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=rows, size=st.integers(1, 40))
def test_counts_are_the_same_in_one_batch_and_in_many(
    tmp_path: Path, data: list[tuple[Any, ...]], size: int
) -> None:
    """Also covers uniqueness and referential integrity across batch boundaries."""
    (tmp_path / "customers.csv").write_text("id\n1\n2\n")
    cols = list(zip(*data, strict=True)) if data else [[]] * 5
    table = pa.table(
        {
            n: pa.array(list(c), pa.string())
            for n, c in zip(
                ["order_id", "amount", "status", "email", "customer_id"], cols, strict=True
            )
        }
    )
    whole = _run_batches(tmp_path, table, max(1, table.num_rows))
    assert _run_batches(tmp_path, table, size) == whole
    assert _run_batches(tmp_path, table, size, keys_in_memory=2) == whole  # spilled to disk
    # and the expected numbers, computed independently in plain Python
    ids = [r[0] for r in data]
    ints = [int(x) if x not in (None, "") and x.lstrip("-").isdigit() else None for x in ids]
    seen: set[int] = set()
    dup = 0
    for v in ints:
        if v is not None:
            dup += v in seen
            seen.add(v)
    assert whole["order_id.unique"] == dup
    assert whole["order_id.type"] == sum(1 for x in ids if x == "x")
    assert whole["order_id.required"] == sum(1 for x in ids if x in (None, ""))
    assert whole["customer_id.references"] == sum(1 for r in data if r[4] == "9")
    assert whole["amount.min"] == sum(1 for r in data if r[1] == "-1")
    assert whole["amount.max"] == sum(1 for r in data if r[1] == "2000")
    assert whole["status.enum"] == sum(1 for r in data if r[2] == "lost")
    assert whole["email.pattern"] == sum(1 for r in data if r[3] in ("nope", "x@"))
    assert whole["email.max_length"] == sum(1 for r in data if r[3] and len(r[3]) > 20)


def test_actions_dead_letter_drop_warn_and_precedence() -> None:
    c = parse_contract(
        {
            "name": "t",
            "schema": [
                {"name": "a", "type": "int", "min": 0, "actions": {"min": "drop"}},
                {"name": "b", "enum": ["x"], "action": "warn"},
            ],
        }
    )
    checker = ContractChecker(c, step_id="v")
    out = checker.check(
        with_positions(pa.table({"a": ["1", "-1", "z", "-2"], "b": ["x", "x", "y", "y"]}), "mem", 0)
    )
    assert out.table["a"].to_list() == [1]
    assert out.dropped == 2  # the two negative amounts
    dead = out.dead.to_pylist()
    assert [(d["position"], d["reason"]) for d in dead] == [(2, "contract_violation")]
    assert dead[0]["message"] == "a: z is not a int; b: y is not one of x"  # every failed check
    assert checker.results["b.enum"].failed == 2  # warn counts, row kept or not


def test_fail_action_stops_with_the_batch_dead_letters() -> None:
    c = parse_contract(
        {
            "name": "t",
            "schema": [
                {"name": "a", "type": "int"},
                {"name": "b", "required": True, "action": "fail"},
            ],
        }
    )
    checker = ContractChecker(c, step_id="v")
    with pytest.raises(ContractFailure, match=r"step 'v'.*'fail' failed: b.required") as info:
        checker.check(with_positions(pa.table({"a": ["z", "1"], "b": ["x", None]}), "mem", 0))
    assert info.value.dead is not None and info.value.dead.num_rows == 2


def test_schema_policies_and_version_bump() -> None:
    base = {"name": "t", "version": "2.0.0", "schema": [{"name": "a"}]}
    t = with_positions(pa.table({"a": ["1"], "extra": ["2"]}), "mem", 0)
    evolve = ContractChecker(parse_contract(base))
    assert "extra" in evolve.check(t).table.columns
    assert evolve.schema_notes == ["new columns passed through: extra"]
    discard = ContractChecker(parse_contract({**base, "schema_policy": "discard_columns"}))
    assert "extra" not in discard.check(t).table.columns
    with pytest.raises(ContractFailure, match=r"frozen.*\['extra'\]"):
        ContractChecker(parse_contract({**base, "schema_policy": "freeze"})).check(t)
    bumped = {**base, "schema": [{"name": "a"}, {"name": "b", "required": True}]}
    checker = ContractChecker(parse_contract(bumped))
    checker.check(t)  # presence is decided over the whole input: at the end
    with pytest.raises(
        ContractFailure,
        match=r"contract 't' version 2.0.0 declares field\(s\) "
        r"\['b'\] that the input does not have \(input columns: a, extra\)",
    ):
        checker.finish()


def test_dataset_rules() -> None:
    import datetime as dt

    c = parse_contract(
        {
            "name": "t",
            "schema": [{"name": "e"}, {"name": "ts", "type": "timestamp"}],
            "quality": [
                {"completeness": "75%", "columns": ["e"]},
                {"freshness": "1 hour", "column": "ts"},
                {"row_count": {"min": 5}},
                {
                    "sql": "SELECT count(*) FROM input WHERE e = 'bad'",
                    "must_be": 0,
                    "name": "no bad",
                },
            ],
        }
    )
    checker = ContractChecker(c)
    checker.check(
        with_positions(
            pa.table({"e": ["a", None, "bad", "b"], "ts": ["2026-12-01T10:00:00"] * 4}), "mem", 0
        )
    )
    now = dt.datetime(2026, 12, 1, 10, 30, tzinfo=dt.UTC)
    gates = {g.name: g for g in checker.finish(now=now)}
    assert gates["completeness(e) >= 75.00%"].failed == 0  # exactly 75%
    assert gates["freshness(ts) <= 1 hour"].failed == 0
    assert gates["row_count in [5, None]"].failed == 1
    assert gates["no bad"].failed == 1 and gates["no bad"].detail == "value 1"
    late = {g.name: g for g in checker.finish(now=now + dt.timedelta(hours=2))}
    assert late["freshness(ts) <= 1 hour"].failed == 1


def test_evaluate_counts_fail_actions_without_raising() -> None:
    c = parse_contract({"name": "t", "schema": [{"name": "a", "required": True, "action": "fail"}]})
    assert evaluate(c, pa.table({"a": ["x", None]})) == {"a.present": 0, "a.required": 1}


def _python_calls(fn: Any) -> int:
    calls = 0

    def prof(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_ten_column_checks_are_vectorized_no_python_call_per_row(tmp_path: Path) -> None:
    """The number of Python function calls does not grow with the number of rows."""
    (tmp_path / "customers.csv").write_text("id\n" + "\n".join(map(str, range(100))) + "\n")
    contract = parse_contract(
        {
            "name": "wide",
            "schema": [
                {"name": "id", "type": "int", "required": True, "unique": True},
                {"name": "amount", "type": "float", "min": 0, "max": 100},
                {"name": "qty", "type": "int", "min": 1},
                {"name": "status", "enum": ["a", "b"]},
                {"name": "code", "pattern": "[A-Z]{2}", "min_length": 2, "max_length": 2},
                {
                    "name": "cust",
                    "type": "int",
                    "references": {"path": "customers.csv", "column": "id"},
                },
                {"name": "ts", "type": "timestamp"},
                {"name": "day", "type": "date"},
                {"name": "flag", "type": "bool"},
                {"name": "note", "required": True},
            ],
        }
    )

    def table(n: int) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "id": [str(i) for i in range(n)],
                "amount": ["5.5"] * n,
                "qty": ["3"] * n,
                "status": ["a", "c"] * (n // 2),
                "code": ["AB", "abc"] * (n // 2),
                "cust": [str(i % 150) for i in range(n)],
                "ts": ["2026-01-01T00:00:00"] * n,
                "day": ["2026-01-01"] * n,
                "flag": ["true"] * n,
                "note": ["x"] * n,
            }
        )

    def run(n: int) -> int:
        checker = ContractChecker(contract, step_id="v")
        checker.open(RunContext("p", "r", tmp_path))
        frame = table(n)
        checker.check(frame)  # warm-up: formats guessed, expressions built
        return _python_calls(
            lambda: checker.check(
                frame.with_columns(pl.Series("id", [str(i + n) for i in range(n)]))
            )
        )

    small, large = run(1_000), run(50_000)
    assert large <= small * 1.1 + 50, (small, large)


def test_references_a_real_postgresql_table(pg_dsn: str, pg_schema: str) -> None:
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{pg_schema}".customers (id bigint PRIMARY KEY)')
        conn.execute(f'INSERT INTO "{pg_schema}".customers SELECT generate_series(1, 100)')
    contract = parse_contract(
        {
            "name": "t",
            "schema": [
                {
                    "name": "cust",
                    "type": "int",
                    "references": {
                        "dsn": pg_dsn,
                        "table": f"{pg_schema}.customers",
                        "column": "id",
                    },
                }
            ],
        }
    )
    table = pa.table({"cust": ["1", "50", "101", None, "100", "0"]})
    assert evaluate(contract, table) == {"cust.present": 0, "cust.type": 0, "cust.references": 2}
    bad = parse_contract(
        {
            "name": "t",
            "schema": [
                {
                    "name": "cust",
                    "references": {"dsn": pg_dsn, "table": f"{pg_schema}.nope", "column": "id"},
                }
            ],
        }
    )
    with pytest.raises(ContractFailure, match=r"reading reference table .*nope failed"):
        evaluate(bad, table)


def test_i8_03_unique_counts_a_duplicate_whatever_the_other_checks_say() -> None:
    """`id,email / 2,bad / 2,ok@x.org`: the second row repeats id 2, although the first row is
    dead-lettered by its pattern check. Both rows become dead letters, each with its reason."""
    c = parse_contract(
        {
            "name": "t",
            "schema": [
                {"name": "id", "type": "int", "unique": True},
                {"name": "email", "pattern": ".+@.+"},
            ],
        }
    )
    for cuts in ([2], [1, 1]):  # one batch or two: same answer
        checker = ContractChecker(c)
        table = pa.table({"id": ["2", "2"], "email": ["bad", "ok@x.org"]})
        dead = []
        start = 0
        for size in cuts:
            out = checker.check(with_positions(table.slice(start, size), "mem", start))
            dead += out.dead.to_pylist()
            assert out.table.height == 0
            start += size
        res = checker.results["id.unique"]
        assert (res.failed, res.duplicated_values) == (1, 1), cuts
        assert checker.results["email.pattern"].failed == 1
        assert [(d["position"], d["message"]) for d in dead] == [
            (0, "email: bad does not match .+@.+"),
            (1, "id: 2 was seen before"),
        ]
    assert evaluate(c, pa.table({"id": ["2", "2"], "email": ["bad", "ok@x.org"]}))["id.unique"] == 1


unique_rows = st.lists(
    st.tuples(
        st.sampled_from(["1", "2", "3", "01", " 2 ", "x", "", "  ", None]),
        st.sampled_from(["a@b.c", "nope", None]),
    ),
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(data=unique_rows, cuts=st.lists(st.integers(1, 30), min_size=1, max_size=10))
def test_i8_03_unique_counts_are_independent_of_batch_cuts(
    data: list[tuple[str | None, str | None]], cuts: list[int]
) -> None:
    """One batch, the same rows cut anywhere (also with keys spilled to disk), and a plain
    Python count agree: ``failed`` = non-missing values - distinct values (pandas
    ``duplicated(keep='first')``, SQL ``count(k) - count(DISTINCT k)``), ``duplicated_values`` =
    distinct values occurring more than once (Soda's duplicate_count), whatever the pattern
    check on the other column decides (action fail / dead_letter / drop / warn)."""
    c = parse_contract(
        {
            "name": "t",
            "schema": [
                {"name": "id", "type": "int", "unique": True},
                {"name": "email", "pattern": "[^@]+@[^@]+", "action": "drop"},
            ],
        }
    )
    table = pa.table(
        {
            "id": pa.array([r[0] for r in data], pa.string()),
            "email": pa.array([r[1] for r in data], pa.string()),
        }
    )

    def run(sizes: list[int], keys_in_memory: int = 10**9) -> tuple[int, int, list[int]]:
        checker = ContractChecker(c)
        for store in [*checker.seen.values(), *checker.repeated.values()]:
            store.max_in_memory = keys_in_memory
        flagged: list[int] = []
        start = batch = 0
        try:
            while start < table.num_rows:
                size = sizes[batch % len(sizes)]
                part = with_positions(table.slice(start, size), "mem", start)
                out = checker.check(part)
                flagged += [
                    d["position"] for d in out.dead.to_pylist() if "was seen before" in d["message"]
                ]
                start += size
                batch += 1
            res = checker.results["id.unique"]
            return res.failed, res.duplicated_values or 0, flagged
        finally:
            checker.close()

    whole = run([max(table.num_rows, 1)])
    assert run(cuts) == whole
    assert run(cuts, keys_in_memory=1) == whole
    values = [int(x) for x in (r[0] for r in data) if x is not None and x.strip().isdigit()]
    counts = {v: values.count(v) for v in values}
    assert whole[0] == len(values) - len(counts)
    assert whole[1] == sum(1 for n in counts.values() if n > 1)
    # every flagged row repeats an earlier value (the first occurrence is never flagged)
    seen: set[int] = set()
    expected = []
    for i, r in enumerate(data):
        if r[0] is not None and r[0].strip().isdigit():
            if int(r[0]) in seen:
                expected.append(i)
            seen.add(int(r[0]))
    assert whole[2] == expected


def test_i8_06_a_missing_column_fails_its_presence_check() -> None:
    c = {"name": "t", "version": "3.0.0", "schema": [{"name": "a"}, {"name": "note"}]}
    t = with_positions(pa.table({"a": ["1", "2"]}), "mem", 0)
    checker = ContractChecker(parse_contract(c))
    checker.check(t)
    with pytest.raises(ContractFailure, match=r"declares field\(s\) \['note'\].*fill_nulls"):
        checker.finish()
    assert evaluate(parse_contract(c), t) == {"a.present": 0, "note.present": 2}
    filled = ContractChecker(
        parse_contract({**c, "schema_policy": {"missing_columns": "fill_nulls"}})
    )
    out = filled.check(t)
    assert out.table["note"].to_list() == [None, None]
    assert "note.present" not in filled.results
    assert filled.schema_notes == ["missing columns read as nulls: note"]


def test_i8_06_a_missing_value_is_the_same_in_every_format() -> None:
    """Null (CSV's empty field), an empty or blank string (JSON's ""), NaN (Parquet) are all
    missing: `required` fails, completeness counts them, no other check looks at them."""
    c = parse_contract(
        {
            "name": "t",
            "schema": [
                {"name": "s", "required": True, "unique": True, "min_length": 2},
                {"name": "x", "type": "double", "required": True, "unique": True, "max": 1},
            ],
            "quality": [{"completeness": "50%", "columns": ["s", "x"]}],
        }
    )
    table = pa.table(
        {
            "s": ["ab", None, "", "  ", "ab"],
            "x": [0.5, None, float("nan"), float("nan"), 0.5],
        }
    )
    got = evaluate(c, table)
    assert got["s.required"] == 3 and got["x.required"] == 3
    assert got["s.unique"] == 1 and got["x.unique"] == 1
    assert got["s.min_length"] == 0 and got["x.max"] == 0
    assert got["completeness(s) >= 50.00%"] == 3 and got["completeness(x) >= 50.00%"] == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "a", "min": 0}, "min needs a type to compare in"),
        ({"name": "a", "type": "int", "max": "10"}, "max '10' is not a number"),
        ({"name": "a", "type": "date", "min": "2024-13-01"}, "is not an ISO date"),
        ({"name": "a", "type": "bool", "min": 0}, "type bool has no order for min"),
    ],
)
def test_i8_06_bounds_need_a_type_they_can_be_read_in(spec: dict[str, Any], message: str) -> None:
    """A bound compared with text in CSV and with numbers in Parquet gave different verdicts
    (or a crash): a bound now needs a type, and must be readable in it."""
    from sluice.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_contract({"name": "t", "schema": [spec]})


def test_contract_sql_cannot_touch_files(tmp_path: Path) -> None:
    from sluice.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one SELECT"):
        parse_contract(
            {
                "name": "t",
                "schema": [{"name": "a"}],
                "quality": [
                    {"sql": "COPY (SELECT * FROM input) TO 'x.csv'; SELECT 1", "must_be": 0}
                ],
            }
        )
    target = tmp_path / "secret.txt"
    target.write_text("42")
    with pytest.raises(ConfigError, match=r"read_text\(\) is not allowed"):
        parse_contract(
            {
                "name": "t",
                "schema": [{"name": "a"}],
                "quality": [{"sql": f"SELECT count(*) FROM read_text('{target}')", "must_be": 0}],
            }
        )
