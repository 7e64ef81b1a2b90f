"""Contract SQL rules: checked before any data is read, answered over the whole input.

A rule (``{sql: ..., must_be / max}``) is one DuckDB SELECT over ``input`` that returns one
number. ``input`` is every row that reached the contract (dead-lettered rows included), in the
contract's types, without Sluice's hidden columns. The answer may not depend on how the input
was cut into batches, so:

* a rule that **counts rows** — ``SELECT count(*) FROM input [WHERE <condition on the row>]``,
  also ``count(expr)`` and ``count(*) FILTER (WHERE ...)``, decided from DuckDB's parse — runs
  on each batch and the counts are added: the count of a whole is the sum of the counts of its
  parts, exactly. Nothing is kept, so it also suits streams;
* **any other rule** (``max``, ``avg``, ``count(DISTINCT ...)``, a subquery, ``GROUP BY``...)
  runs once, when the input ends, over the whole input: the columns it names are spilled to
  Arrow IPC files in a temporary folder as the batches pass (the spill of the ``sql`` step, see
  :mod:`sluice.steps.sql`), and DuckDB runs it there with a memory limit (the ``sql`` step's
  default) and its own temporary folder, so memory stays bounded whatever the input's size.

Before any data is read, every rule has been through the SQL engine's checks when the contract
was read (:func:`sluice.steps.sqlengine.plan_statement`: one SELECT, only ``input``, known
functions, the sandbox), and :func:`bind_rules` binds it against the contract's declared fields
when the contract step is built (unknown columns with 'did you mean', types when every field
has one, a result that is not one number).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl
import pyarrow as pa

from sluice.batch import HIDDEN_COLS
from sluice.errors import ConfigError
from sluice.quality.contract import Contract, SqlRule
from sluice.steps import sqlengine
from sluice.types import parse_type

if TYPE_CHECKING:
    from sluice.spill import Spill

#: Name of the one column spilled for a rule that names no column (its rows still count).
_ROWS = "__sluice_rows"


@dataclass(frozen=True)
class PlannedRule:
    """A contract SQL rule and how it is answered."""

    index: int  # its place in ``contract.quality``
    rule: SqlRule
    #: a count of rows: answered per batch, the counts added up
    counts_rows: bool
    #: the names (lower case) of the columns it may read; None: every column
    columns: frozenset[str] | None


def _tree(sql: str) -> dict[str, Any]:
    """DuckDB's parse of a (checked) statement: its query node."""
    return sqlengine.serialize(sql)


def _dicts(obj: Any) -> Iterator[dict[str, Any]]:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _counts_rows(node: dict[str, Any]) -> bool:
    """True for ``SELECT count(*) | count(expr) [FILTER (WHERE c)] FROM input [WHERE c]`` whose
    expressions work on one row at a time (no subquery, aggregate or window function in them):
    its answer over the whole input is the sum of its answers over the batches."""
    if (
        node.get("type") != "SELECT_NODE"
        or (node.get("cte_map") or {}).get("map")
        or node.get("modifiers")
        or node.get("group_expressions")
        or node.get("group_sets")
        or node.get("aggregate_handling") != "STANDARD_HANDLING"
        or node.get("having")
        or node.get("qualify")
        or node.get("sample")
    ):
        return False
    src = node.get("from_table") or {}
    if (
        src.get("type") != "BASE_TABLE"
        or str(src.get("table_name", "")).lower() != "input"
        or src.get("schema_name")
        or src.get("catalog_name")
        or src.get("sample")
    ):
        return False
    items = node.get("select_list") or []
    if len(items) != 1:
        return False
    agg = items[0]
    if (
        agg.get("class") != "FUNCTION"
        or str(agg.get("function_name", "")).lower() not in ("count", "count_star")
        or agg.get("distinct")
        or agg.get("is_operator")
        or agg.get("export_state")
        or agg.get("schema")
        or agg.get("catalog")
        or len(agg.get("arguments") or []) > 1
    ):
        return False
    parts = [agg.get("arguments") or [], agg.get("filter"), node.get("where_clause")]
    if any(d.get("class") == "SUBQUERY" for d in _dicts(parts)):
        return False
    # the row-wise test of the sql step: no aggregate or window function in the parts
    probe = {**node, "select_list": [p for p in parts[:2] if p]}
    return sqlengine.whole_input_reason(probe, set()) is None


def _columns(node: dict[str, Any]) -> frozenset[str] | None:
    """The names (lower case) of the columns a statement may read, from its parse: every part
    of every column reference (``s.x`` keeps ``s`` and ``x``). None — every column — when it
    has a star, ``COLUMNS(...)``, or uses a table's row as a value (``to_json(input)``)."""
    tables = {"input"}  # the names a table (or its row) goes by in the statement
    for d in _dicts(node):
        if "class" not in d:
            tables.update(str(d[k]).lower() for k in ("alias", "table_name") if d.get(k))
    names: set[str] = set()
    for d in _dicts(node):
        if d.get("class") == "STAR":
            return None
        if d.get("class") == "COLUMN_REF":
            parts = [str(p).lower() for p in d.get("column_names") or []]
            if len(parts) == 1 and parts[0] in tables:
                return None
            names.update(parts)
    return frozenset(names)


def plan_rules(contract: Contract) -> list[PlannedRule]:
    """How each SQL rule of the contract is answered."""
    out = []
    for i, rule in enumerate(contract.quality):
        if isinstance(rule, SqlRule):
            node = _tree(rule.sql)
            counts = _counts_rows(node)
            out.append(PlannedRule(i, rule, counts, None if counts else _columns(node)))
    return out


def _one_number(schema: pa.Schema) -> bool:
    t = schema[0].type if len(schema) == 1 else None
    return t is not None and (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_decimal(t)
        or pa.types.is_boolean(t)
        or pa.types.is_null(t)
    )


def bind_rules(contract: Contract, step_id: str) -> None:
    """Bind every SQL rule against the contract's declared fields (no data is read); raise
    :class:`ConfigError` naming the rule (``contract.quality[2].sql``) when it cannot run.

    The fields are what ``input`` is sure to hold (a field the data lacks is read as nulls of
    its type); a field without a type is bound as DuckDB's NULL type, which binds wherever a
    value of some type could. When other columns may pass through (``extra_columns: pass``),
    a name outside the fields is refused only when it is a near miss of one (a typo);
    otherwise every unknown name is. Type errors and a result that is not one number are
    refused when every field has a type (an untyped field's type comes from the data)."""
    rules = [(i, r) for i, r in enumerate(contract.quality) if isinstance(r, SqlRule)]
    if not rules:
        return
    typed = all(f.type for f in contract.fields)
    closed = contract.schema_policy.extra_columns != "pass"
    schema = pa.schema(
        [pa.field(f.name, parse_type(f.type) if f.type else pa.null()) for f in contract.fields]
    )
    with sqlengine.binder() as con:
        for i, rule in rules:
            problem = _bind_problem(con, rule.sql, schema, typed=typed, closed=closed)
            if problem is not None:
                message, fix = problem
                raise ConfigError(
                    f"quality sql rule: {message}",
                    step_id=step_id,
                    field=f"contract.quality[{i}].sql",
                    value=rule.sql,
                    fix=fix,
                )


def _bind_problem(
    con: duckdb.DuckDBPyConnection, sql: str, schema: pa.Schema, *, typed: bool, closed: bool
) -> tuple[str, str] | None:
    """(message, fix) when a rule cannot run over ``input`` of this schema, else None."""
    try:
        out = sqlengine.bind_schema(con, sql, schema)
    except duckdb.Error as exc:
        hint = sqlengine.missing_column_hint(str(exc), schema.names)
        if hint is not None and (closed or "(did you mean" in hint):
            return hint, "name the contract's fields (or columns the data has)"
        if hint is None and typed:
            return f"it does not bind: {sqlengine.first_line(str(exc))}", "fix the statement"
        return None  # names a column that may pass through, or depends on untyped fields
    if len(out) != 1 or (typed and not _one_number(out)):
        got = ", ".join(f"{f.name} {f.type}" for f in out)
        return (
            f"a rule returns one number; this one returns ({got})",
            "select one count or other number, e.g. SELECT count(*) FROM input WHERE ...",
        )
    return None


class RuleError(ValueError):
    """A rule failed when it ran, or did not answer a number."""


class SqlRules:
    """Answers a contract's SQL rules: :meth:`add` each batch (the contract's cleaned frame),
    :meth:`finish` at the end of input, :meth:`close` always."""

    def __init__(self, contract: Contract, step_id: str, *, memory_limit: str | None = None):
        self.contract = contract
        self.step_id = step_id
        self.rules = plan_rules(contract)
        if memory_limit is None:
            from sluice.config.models import SqlStep  # one default for every whole-input query

            memory_limit = str(SqlStep.model_fields["memory_limit"].default)
        self.memory_limit = memory_limit
        self._values: dict[int, float] | None = None
        self.counts: dict[int, int] = {r.index: 0 for r in self.rules if r.counts_rows}
        self.spilled = [r for r in self.rules if not r.counts_rows]
        #: the columns the spilled rules may read (lower case); None: every column
        self.keep: frozenset[str] | None = frozenset()
        for r in self.spilled:
            self.keep = None if r.columns is None or self.keep is None else self.keep | r.columns
        self.run_id = "check"
        self._cursor: duckdb.DuckDBPyConnection | None = None
        self._tmp: Path | None = None
        self._spill: Spill | None = None

    def open(self, run_id: str) -> None:
        self.run_id = run_id

    def add(self, df: pl.DataFrame, untyped: Sequence[str] = ()) -> None:
        """One batch: count the counting rules, spill what the others read. ``untyped``: the
        columns of nulls put in for fields without a type that the batch had no column for;
        they have no type (the type of the column in other batches wins when the spill is
        read, as when files of different columns are read together)."""
        if not self.rules:
            return
        data = df.drop([c for c in df.columns if c in HIDDEN_COLS])
        if untyped:
            data = data.with_columns(pl.lit(None, dtype=pl.Null).alias(c) for c in untyped)
        if self.counts and data.height:
            if self._cursor is None:
                self._cursor = sqlengine.cursor()
            self._cursor.register("input", data.to_arrow())
            try:
                for r in self.rules:
                    if r.counts_rows:
                        self.counts[r.index] += int(_answer(self._run(self._cursor, r)))
            finally:
                self._cursor.unregister("input")
        if self.spilled:
            self._spill_batch(data)

    def _spill_batch(self, data: pl.DataFrame) -> None:
        from sluice.spill import Spill, spill_dir  # the sql step's spill too

        if self._spill is None:
            self._tmp = spill_dir(self.run_id, self.step_id)
            (self._tmp / "duckdb").mkdir()
            self._spill = Spill(self._tmp, self.step_id)
        if self.keep is None:
            self._spill.append(data.to_arrow())
            return
        picked = [c for c in data.columns if c.lower() in self.keep]
        self._spill.append(
            data.select(picked).to_arrow()
            if picked
            else pa.table({_ROWS: pa.nulls(data.height, pa.int8())})
        )

    def _run(self, con: duckdb.DuckDBPyConnection, r: PlannedRule) -> Any:
        try:
            rows = con.execute(r.rule.sql).fetchall()
        except duckdb.Error as exc:
            raise RuleError(f"quality sql failed: {sqlengine.first_line(str(exc))}") from exc
        return rows[0][0] if rows and rows[0] else None

    def finish(self) -> dict[int, float]:
        """The answer of every rule (its index in ``contract.quality`` -> value)."""
        if self._values is not None:
            return dict(self._values)
        values: dict[int, float] = {i: float(n) for i, n in self.counts.items()}
        if not self.spilled:
            self._values = values
            return dict(values)
        source: Any = self._spill.finish() if self._spill is not None else None
        if source is None:  # no batch came: the rules answer over an empty table
            source = pa.schema(
                [
                    pa.field(f.name, parse_type(f.type) if f.type else pa.null())
                    for f in self.contract.fields
                ]
            ).empty_table()
        if self._tmp is not None:
            con = sqlengine.connect(
                memory_limit=self.memory_limit, temp_directory=str(self._tmp / "duckdb")
            )
        else:
            con = sqlengine.cursor()
        try:
            con.register("input", source)
            for r in self.spilled:
                values[r.index] = _answer(self._run(con, r))
        finally:
            con.close()
            self.close()
        self._values = values
        return dict(values)

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _answer(value: Any) -> float:
    """The number a rule answered (null counts as 0)."""
    if value is None:
        return 0.0
    if isinstance(value, (bool, int, float, Decimal)):
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        return float(value)
    raise RuleError(f"the query answered {str(value)[:40]!r}, not a number")
