"""SQL step: one sandboxed DuckDB SELECT over the step's input, which it sees as ``input``.

How a statement runs is decided from DuckDB's own parse of it
(:func:`sluice.steps.sqlengine.plan_statement`):

* **row by row** (projections, ``WHERE``, scalar functions, ``UNNEST``, a join to a declared
  reference table): per batch, as the batches stream through. The statement never sees the
  hidden position columns: ``input`` holds the user's columns only, and the positions come
  from a second table joined row by row (:func:`sqlengine.carrying_positions`), so a later
  dead letter still names the row's source and position. Rows it does not return count as
  filtered; extra rows (UNNEST) as created.
* **over the whole input** (aggregates, ``GROUP BY``, ``DISTINCT``, window functions,
  ``ORDER BY``, ``LIMIT``, set operations, a subquery over ``input``...): in a batch run the
  input batches are spilled to an Arrow IPC file in a temporary folder as they arrive (counted
  as *aggregated*); at the end of the input DuckDB runs the statement over the spilled input,
  with a memory limit and its own temp folder so that large aggregates and sorts spill too, and
  the result is released in batches (counted as *created*). Memory stays bounded whatever the
  input's size. When no row comes at all, the statement runs over an empty input of the
  schema the column plan gave the step (:meth:`Sql.use_input_schema`). In a stream such a
  statement is refused when the pipeline is validated, unless ``per_batch: true`` says it is
  meant per micro-batch.
* ``per_batch: true``: the statement runs on each batch on its own (its rows count as
  aggregated, its results as created).

The statement reads nothing but ``input`` and the reference ``tables`` the step declares, which
Sluice reads once with its own file readers when the step opens (rows they cannot read are dead
letters of this step).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from sluice.batch import (
    HIDDEN_COLS,
    POSITION_COLS,
    Frame,
    as_arrow,
    concat,
    empty_dead_letters,
    frame_rows,
    strip_positions,
)
from sluice.config.models import SqlStep
from sluice.errors import ConfigError, StepError
from sluice.plugins import RunContext, StepResult
from sluice.spill import Spill, spill_dir
from sluice.steps import sqlengine
from sluice.steps._base import BaseStep, read_reference, sql_error

#: Rows per result released by a whole-input statement.
RELEASE_ROWS = 131_072


class Sql(BaseStep):
    """Run one DuckDB SELECT over the step's input (see the module docstring)."""

    config: SqlStep
    creates_rows = True

    def __init__(self, config: SqlStep) -> None:
        super().__init__(config)
        try:
            self.plan = sqlengine.plan_statement(config.sql, frozenset(config.tables))
        except sqlengine.SqlRefused as exc:
            raise ConfigError(str(exc), step_id=config.id, field="sql", value=config.sql) from exc
        #: the statement sees the whole input: spill, then run once at the end
        self.whole = self.plan.whole_input is not None and not config.per_batch
        self.con: duckdb.DuckDBPyConnection | None = None
        self.pending_dead = empty_dead_letters()
        self.table_schemas: dict[str, pa.Schema] = {}
        self._tmp: Path | None = None
        self._spill: Spill | None = None
        #: the input's schema when known before the run (see :meth:`use_input_schema`)
        self.input_schema: pa.Schema | None = None
        self._carry_plans: dict[pa.Schema, str | None] = {}

    # ------------------------------------------------------------------ lifecycle

    def open(self, ctx: RunContext) -> None:
        super().open(ctx)
        if self.whole:
            self._tmp = spill_dir(ctx.run_id, self.step_id)
            (self._tmp / "duckdb").mkdir()
            self.con = sqlengine.connect(
                memory_limit=self.config.memory_limit,
                temp_directory=str(self._tmp / "duckdb"),
            )
            self._spill = Spill(self._tmp, self.step_id)
        else:
            self.con = sqlengine.cursor()
        self._register_tables(ctx)

    def _register_tables(self, ctx: RunContext) -> None:
        assert self.con is not None
        dead = []
        for name, src in self.config.tables.items():
            tables, letters = read_reference(self.step_id, src, ctx)
            dead.extend(letters)
            if not tables:
                raise StepError(
                    self.step_id,
                    f"reference table {name!r} ({src.path!r}) has no columns",
                    fix="point tables." + name + ".path at a file with a header or data",
                )
            table = concat(tables)
            assert isinstance(table, pa.Table)
            self.con.register(name, table)
            self.table_schemas[name] = table.schema
        if dead:
            self.pending_dead = pa.concat_tables(dead)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self.con is not None:
            self.con.close()
            self.con = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # ------------------------------------------------------------------ batches

    def _take_dead(self) -> pa.Table:
        dead, self.pending_dead = self.pending_dead, empty_dead_letters()
        return dead

    def use_input_schema(self, schema: pa.Schema) -> None:
        """The schema of this step's input as the column plan knows it before the run
        (:func:`sluice.config.validate.build_components` hands it over): a whole-input
        statement that gets no row at all still answers over an empty input of these types."""
        self.input_schema = sqlengine.user_schema(schema)

    def process(self, table: Frame) -> StepResult:
        assert self.con is not None, "open() first"
        n = frame_rows(table)
        arrow = as_arrow(table)
        if self.whole:
            assert self._spill is not None
            self._spill.append(strip_positions(arrow))
            return StepResult(None, dead=self._take_dead(), aggregated=n)
        if self.plan.whole_input is not None:  # per_batch: true, by request
            out = self._run(self.plan.sql, strip_positions(arrow))
            return StepResult(out, dead=self._take_dead(), aggregated=n)
        carrying = self._carrying(arrow.schema)
        if carrying is not None:
            out = self._run(carrying, strip_positions(arrow), arrow.select(self._hidden(arrow)))
        else:  # no positions to carry (or a COLUMNS(regex) / #n that could reach them)
            out = self._run(self.plan.sql, strip_positions(arrow))
        return StepResult(out, dead=self._take_dead(), filtered=max(0, n - out.num_rows))

    @staticmethod
    def _hidden(arrow: pa.Table) -> list[str]:
        return [c for c in HIDDEN_COLS if c in arrow.column_names]

    def _carrying(self, schema: pa.Schema) -> str | None:
        """The statement carrying the hidden columns of batches of ``schema``, or None (run
        without them). Checked once per schema: what it returns besides the hidden columns
        must be exactly what the user's statement returns."""
        if schema in self._carry_plans:
            return self._carry_plans[schema]
        hidden = tuple(c for c in HIDDEN_COLS if c in schema.names)
        found: str | None = None
        if all(c in hidden for c in POSITION_COLS) and self.plan.carries_positions:
            sql = self.plan.carrying(hidden)
            user = sqlengine.user_schema(schema)
            pos = pa.schema([schema.field(c) for c in hidden])
            try:
                with sqlengine.binder() as con:
                    plain = sqlengine.bind_schema(con, self.plan.sql, user, self.table_schemas)
                    carried = sqlengine.bind_schema(
                        con, sql, user, {**self.table_schemas, sqlengine.POSITIONS_TABLE: pos}
                    )
            except duckdb.Error:
                pass  # it does not bind: the plain statement says why when it runs
            else:
                if carried.names == [*plain.names, *hidden] and carried.types[: len(plain)] == list(
                    plain.types
                ):
                    found = sql
        self._carry_plans[schema] = found
        return found

    def _run(self, sql: str, table: pa.Table, positions: pa.Table | None = None) -> pa.Table:
        assert self.con is not None
        self.con.register("input", table)
        if positions is not None:
            self.con.register(sqlengine.POSITIONS_TABLE, positions)
        try:
            out: pa.Table = self.con.sql(sql).to_arrow_table()
            return out
        except duckdb.Error as exc:
            raise sql_error(self.step_id, exc, table.column_names) from exc
        finally:
            self.con.unregister("input")
            if positions is not None:
                self.con.unregister(sqlengine.POSITIONS_TABLE)

    def finish(self) -> StepResult | Iterator[StepResult] | None:
        if self.whole:
            return self._release()
        if self.pending_dead.num_rows:  # no batch came: still report the tables' bad rows
            return StepResult(None, dead=self._take_dead())
        return None

    def _release(self) -> Iterator[StepResult]:
        """The whole-input statement over the spilled input, released in batches."""
        assert self.con is not None and self._spill is not None
        dead = self._take_dead()
        if dead.num_rows:
            yield StepResult(None, dead=dead)
        source: Any = self._spill.finish()
        if source is None:  # no row came in: the statement still has an answer (count = 0)
            source = self._empty_input()
            if source is None:
                return
        self.con.register("input", source)
        try:
            reader = self.con.sql(self.plan.sql).to_arrow_reader(RELEASE_ROWS)
            pending: list[pa.RecordBatch] = []
            rows = 0
            for batch in reader:  # DuckDB may hand out small chunks: release full batches
                pending.append(batch)
                rows += batch.num_rows
                if rows >= RELEASE_ROWS:
                    yield StepResult(pa.Table.from_batches(pending, schema=reader.schema))
                    pending, rows = [], 0
            if rows:
                yield StepResult(pa.Table.from_batches(pending, schema=reader.schema))
        except duckdb.Error as exc:
            raise sql_error(self.step_id, exc, source.schema.names) from exc
        finally:
            if self.con is not None:
                with contextlib.suppress(duckdb.Error):
                    self.con.unregister("input")
            self.close()

    def _empty_input(self) -> pa.Table | None:
        """A zero-row ``input`` for a whole-input statement that got no row at all (everything
        was filtered before it): a global aggregate then answers one row (count 0, sums null),
        as DuckDB does over an empty table.

        Its schema is the step's input schema when the column plan knew it before the run
        (:meth:`use_input_schema`). Otherwise (types inferred from the data, which never came)
        the columns are the statement's own names with the type NULL, which binds with any
        function; then numbers, then text. None when none of these binds (then no row is the
        answer)."""
        assert self.con is not None
        if self.input_schema is not None:
            return self.input_schema.empty_table()
        refs = sorted(sqlengine.column_refs(self.plan.sql) or ())
        if not refs:
            return pa.table({"__sluice_empty": pa.array([], pa.int8())})
        for typ in (pa.null(), pa.float64(), pa.string()):
            empty = pa.schema([pa.field(n, typ) for n in refs]).empty_table()
            self.con.register("input", empty)
            try:
                self.con.sql(self.plan.sql).limit(0).to_arrow_table()
                return empty
            except duckdb.Error:
                continue
            finally:
                self.con.unregister("input")
        return None


# ---------------------------------------------------------------------------------- schemas


def output_schema(
    config: SqlStep,
    input_schema: pa.Schema | None,
    tables: Mapping[str, pa.Schema] | None = None,
    *,
    untyped: Collection[str] = (),
) -> pa.Schema | None:
    """The schema of the step's output for an input of ``input_schema`` (hidden columns are not
    part of it), or None when it cannot be known (no input schema, reference tables whose
    schemas are not given, or a binding problem that may come from ``untyped`` columns, see
    :func:`sqlengine.bind_statement`). Raises :class:`ConfigError` when the statement does not
    bind: an unknown column (with 'did you mean'), a type mismatch..."""
    if input_schema is None:
        return None
    tables = dict(tables or {})
    if set(config.tables) - set(tables):
        return None
    try:
        return sqlengine.bind_statement(config.sql, input_schema, tables, untyped=untyped)
    except sqlengine.SqlRefused as exc:
        column = isinstance(exc, sqlengine.Unbound) and exc.unknown_column
        raise ConfigError(
            str(exc),
            step_id=config.id,
            field="sql",
            value=config.sql,
            fix="use the input's columns" if column else "fix the statement",
        ) from None
