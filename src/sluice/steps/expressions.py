"""Expression steps: ``filter`` rows and ``derive`` columns with SQL expressions.

One expression language for every step: DuckDB's SQL, with DuckDB's semantics
(``docs/expressions.md``). An expression is parsed by DuckDB when the configuration is built
(syntax errors, unknown functions, aggregates: configuration errors). At the first batch of each
input schema it is bound by DuckDB, then either translated into an equivalent Polars expression
(the fast path for common shapes, see :mod:`sluice.steps._translate`) or run by the sandboxed
DuckDB engine itself. Both give DuckDB's answer; rows keep their position columns either way.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Hashable, Mapping
from typing import Any, cast

import duckdb
import polars as pl
import pyarrow as pa

from sluice.batch import Frame, as_arrow, frame_rows
from sluice.config.models import DeriveStep, FilterStep
from sluice.errors import ConfigError, StepError
from sluice.plugins import StepResult
from sluice.steps import sqlengine
from sluice.steps._base import BaseStep, polars_error, to_polars
from sluice.steps._translate import Translator, Untranslatable, children, has_column, shape_ok

Node = dict[str, Any]


def compile_expr(step_id: str, text: str, field: str) -> Node:
    """DuckDB's parse of one expression; a :class:`ConfigError` naming the step otherwise."""
    try:
        return sqlengine.parse_expression(text)
    except sqlengine.SqlRefused as exc:
        raise ConfigError(
            str(exc),
            step_id=step_id,
            field=field,
            value=text,
            fix=f"write one SQL expression such as: amount > 0 AND status = 'ok' "
            f"(functions: {sqlengine.DOCS})",
        ) from exc


@functools.cache
def _template(sql: str) -> Node:
    return sqlengine._serialize(sql)


def _select(select_list: list[Node], from_table: Node, where: Node | None = None) -> Node:
    node: Node = copy.deepcopy(_template("SELECT 1 FROM input"))
    node["select_list"] = select_list
    node["from_table"] = from_table
    node["where_clause"] = where
    return node


def _star(replace: list[tuple[str, Node]] | None = None) -> Node:
    star: Node = copy.deepcopy(_template("SELECT * FROM input")["select_list"][0])
    star["replace_list"] = [{"key": k, "value": v} for k, v in replace or []]
    return star


def _input_ref() -> Node:
    ref: Node = copy.deepcopy(_template("SELECT 1 FROM input")["from_table"])
    return ref


def _subquery(node: Node, alias: str) -> Node:
    ref: Node = copy.deepcopy(_template("SELECT 1 FROM (SELECT 1) AS t")["from_table"])
    ref["subquery"]["node"] = node
    ref["alias"] = alias
    return ref


def _aliased(node: Node, alias: str) -> Node:
    out = copy.deepcopy(node)
    out["alias"] = alias
    return out


_PL_TO_DUCK: dict[Any, str] = {
    pl.Boolean: "BOOLEAN",
    pl.Int8: "TINYINT",
    pl.Int16: "SMALLINT",
    pl.Int32: "INTEGER",
    pl.Int64: "BIGINT",
    pl.UInt8: "UTINYINT",
    pl.UInt16: "USMALLINT",
    pl.UInt32: "UINTEGER",
    pl.UInt64: "UBIGINT",
    pl.Float32: "FLOAT",
    pl.Float64: "DOUBLE",
    pl.String: "VARCHAR",
    pl.Date: "DATE",
}


def _duck_name(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            return "TIMESTAMPTZ"
        if dtype.time_unit == "ms":
            return "TIMESTAMP_MS"
        if dtype.time_unit == "us":
            return "TIMESTAMP"
        raise Untranslatable("nanosecond constant")
    if isinstance(dtype, pl.Decimal):
        return f"DECIMAL({dtype.precision},{dtype.scale})"
    name = _PL_TO_DUCK.get(type(dtype))
    if name is None:
        raise Untranslatable(f"constant of type {dtype}")
    return name


class _Engine:
    """Per step: a sandboxed DuckDB connection, opened on first use (binding, fallback)."""

    def __init__(self, step_id: str) -> None:
        self.step_id = step_id
        self._con: duckdb.DuckDBPyConnection | None = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = sqlengine.cursor()
        return self._con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def run(self, sql: str, table: pa.Table) -> pa.Table:
        con = self.con
        con.register("input", table)
        try:
            out: pa.Table = con.sql(sql).to_arrow_table()
            return out
        except duckdb.Error as exc:
            raise _step_error(self.step_id, exc, table.column_names) from exc
        finally:
            con.unregister("input")

    def bind(self, node: Node, schema: pa.Schema) -> pa.Field:
        """The Arrow field DuckDB gives ``node`` over an input of ``schema``."""
        out = sqlengine.bind_schema(
            self.con, sqlengine.to_sql(_select([_aliased(node, "x")], _input_ref())), schema
        )
        return out.field(0)

    def translate(
        self, node: Node, schema: pa.Schema, polars_schema: Mapping[str, pl.DataType]
    ) -> tuple[pl.Expr, pl.DataType] | None:
        """The Polars expression computing DuckDB's value of ``node``, or None."""
        if not shape_ok(node):
            return None
        typed: list[Node] = []
        consts: list[Node] = []

        def walk(n: Node) -> None:
            if not has_column(n):
                consts.append(n)
                return
            typed.append(n)
            for c in children(n):
                walk(c)

        walk(node)
        con = self.con
        try:
            items = [_aliased(n, f"e{i}") for i, n in enumerate(typed)]
            rel_sql = sqlengine.to_sql(_select(items, _input_ref()))
            con.register("input", schema.empty_table())
            try:
                types = [str(t) for t in con.sql(rel_sql).types]
            finally:
                con.unregister("input")
            values: list[tuple[Any, str]] = []
            if consts:
                c_items = [_aliased(n, f"c{i}") for i, n in enumerate(consts)]
                empty = copy.deepcopy(_template("SELECT 1")["from_table"])
                rel = con.sql(sqlengine.to_sql(_select(c_items, empty)))
                c_types = [str(t) for t in rel.types]
                row = rel.to_arrow_table()
                values = [(row.column(i)[0].as_py(), c_types[i]) for i in range(len(consts))]
        except duckdb.Error:
            return None  # it does not bind: DuckDB will say why when it runs
        translator = Translator(
            dict(polars_schema),
            {id(n): t for n, t in zip(typed, types, strict=True)},
            {id(n): v for n, v in zip(consts, values, strict=True)},
            self._fold,
        )
        try:
            out = translator(node)
        except Untranslatable:
            return None
        if out.dtype == pl.Null():
            return None
        return out.expr, out.dtype

    def _fold(self, value: Any, target: pl.DataType) -> Any:
        """A string literal cast by DuckDB to ``target`` (as DuckDB casts it implicitly)."""
        try:
            return self.con.execute(f"SELECT CAST(? AS {_duck_name(target)})", [value]).fetchall()[
                0
            ][0]
        except duckdb.Error:
            raise Untranslatable("the constant does not cast") from None


def _schema_key(frame: Frame) -> Hashable:
    if isinstance(frame, pl.DataFrame):
        key: Hashable = tuple(frame.schema.items())
        return key
    return cast(Hashable, frame.schema)


def _schemas(frame: Frame) -> tuple[pa.Schema, Mapping[str, pl.DataType]]:
    if isinstance(frame, pl.DataFrame):
        return frame.head(0).to_arrow().schema, frame.schema
    return frame.schema, to_polars(frame.slice(0, 0)).schema


def _conform(out: pa.Table, schema: pa.Schema) -> pa.Table:
    """Give pass-through columns back their input types (DuckDB relabels time zones, turns
    large strings into strings...): a filter does not change a column's type."""
    fields = []
    changed = False
    for f in out.schema:
        idx = schema.get_field_index(f.name)
        if idx >= 0 and schema.field(idx).type != f.type:
            fields.append(schema.field(idx))
            changed = True
        else:
            fields.append(f)
    if not changed:
        return out
    try:
        return out.cast(pa.schema(fields))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return out


def _step_error(step_id: str, exc: Exception, columns: list[str]) -> StepError:
    hint = sqlengine.missing_column_hint(str(exc), columns)
    if hint:
        return StepError(step_id, hint, fix="fix the column name in the expression")
    return polars_error(step_id, "SQL", exc, columns)


class Filter(BaseStep):
    """Keep rows where the expression is true; false and null rows are filtered on purpose."""

    config: FilterStep

    def __init__(self, config: FilterStep) -> None:
        super().__init__(config)
        self.node = compile_expr(config.id, config.filter, "filter")
        self.engine = _Engine(config.id)
        self._plans: dict[Hashable, pl.Expr | str] = {}

    def _plan(self, frame: Frame) -> pl.Expr | str:
        key = _schema_key(frame)
        plan = self._plans.get(key)
        if plan is None:
            schema, pl_schema = _schemas(frame)
            fast = self.engine.translate(self.node, schema, pl_schema)
            if fast is not None and fast[1] == pl.Boolean():
                plan = fast[0]
            else:
                plan = sqlengine.to_sql(_select([_star()], _input_ref(), self.node))
            self._plans[key] = plan
        return plan

    def process(self, table: Frame) -> StepResult:
        plan = self._plan(table)
        n = frame_rows(table)
        if isinstance(plan, str):
            arrow = as_arrow(table)
            out: Frame = _conform(self.engine.run(plan, arrow), arrow.schema)
        else:
            df = to_polars(table)
            try:
                out = df.filter(plan)
            except Exception as exc:
                raise polars_error(
                    self.step_id, f"filter {self.config.filter!r}", exc, df.columns
                ) from exc
        return StepResult(out, filtered=n - frame_rows(out))

    def close(self) -> None:
        self.engine.close()


class Derive(BaseStep):
    """Add or replace columns from expressions, in order (later ones may use earlier ones)."""

    config: DeriveStep

    def __init__(self, config: DeriveStep) -> None:
        super().__init__(config)
        self.nodes = [
            (name, compile_expr(config.id, text, f"derive.{name}"))
            for name, text in config.derive.items()
        ]
        self.engine = _Engine(config.id)
        self._plans: dict[Hashable, list[pl.Expr] | str] = {}

    def _plan(self, frame: Frame) -> list[pl.Expr] | str:
        key = _schema_key(frame)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._compile(*_schemas(frame))
            self._plans[key] = plan
        return plan

    def _compile(
        self, schema: pa.Schema, pl_schema: Mapping[str, pl.DataType]
    ) -> list[pl.Expr] | str:
        exprs: list[pl.Expr] = []
        current = dict(pl_schema)
        original = schema
        for name, node in self.nodes:
            fast = self.engine.translate(node, schema, current)
            if fast is None:
                return self._duckdb_sql(original)
            try:
                field = self.engine.bind(node, schema).with_name(name)
            except duckdb.Error:
                return self._duckdb_sql(original)
            exprs.append(fast[0].alias(name))
            current[name] = fast[1]
            idx = schema.get_field_index(name)
            schema = schema.set(idx, field) if idx >= 0 else schema.append(field)
        return exprs

    def _duckdb_sql(self, schema: pa.Schema) -> str:
        names = list(schema.names)
        node: Node | None = None
        for i, (name, expr) in enumerate(self.nodes):
            source = _input_ref() if node is None else _subquery(node, f"__sluice_d{i}")
            if name in names:
                node = _select([_star([(name, expr)])], source)
            else:
                node = _select([_star(), _aliased(expr, name)], source)
                names.append(name)
        assert node is not None
        return sqlengine.to_sql(node)

    def process(self, table: Frame) -> StepResult:
        plan = self._plan(table)
        if isinstance(plan, str):
            arrow = as_arrow(table)
            out = self.engine.run(plan, arrow)
            kept = pa.schema([f for f in arrow.schema if f.name not in self.config.derive])
            return StepResult(_conform(out, kept))
        df = to_polars(table)
        try:
            lazy = df.lazy()
            for expr in plan:
                lazy = lazy.with_columns(expr)
            return StepResult(lazy.collect())
        except Exception as exc:
            raise polars_error(self.step_id, "derive", exc, df.columns) from exc

    def close(self) -> None:
        self.engine.close()


# ------------------------------------------------------------------------------ schemas


def _config_error(step_id: str, field: str, exc: Exception, schema: pa.Schema) -> ConfigError:
    hint = sqlengine.missing_column_hint(str(exc), list(schema.names))
    return ConfigError(
        hint or sqlengine._first_line(str(exc)),
        step_id=step_id,
        field=field,
        fix="fix the expression" if hint is None else "use one of the input columns",
    )


def filter_output_schema(config: FilterStep, input_schema: pa.Schema | None) -> pa.Schema | None:
    """A filter keeps its input's schema; with a known input schema the expression is bound
    (unknown column -> :class:`ConfigError` with 'did you mean')."""
    if input_schema is None:
        return None
    node = compile_expr(config.id, config.filter, "filter")
    with sqlengine.binder() as con:
        try:
            sqlengine.bind_schema(
                con, sqlengine.to_sql(_select([_star()], _input_ref(), node)), input_schema
            )
        except duckdb.Error as exc:
            raise _config_error(config.id, "filter", exc, input_schema) from None
    return input_schema


def derive_output_schema(config: DeriveStep, input_schema: pa.Schema | None) -> pa.Schema | None:
    """The input's schema with the derived columns added or replaced, as DuckDB types them."""
    if input_schema is None:
        return None
    schema = input_schema
    with sqlengine.binder() as con:
        for name, text in config.derive.items():
            node = compile_expr(config.id, text, f"derive.{name}")
            sql = sqlengine.to_sql(_select([_aliased(node, name)], _input_ref()))
            try:
                field = sqlengine.bind_schema(con, sql, schema).field(0)
            except duckdb.Error as exc:
                raise _config_error(config.id, f"derive.{name}", exc, schema) from None
            idx = schema.get_field_index(name)
            schema = schema.set(idx, field) if idx >= 0 else schema.append(field)
    return schema
