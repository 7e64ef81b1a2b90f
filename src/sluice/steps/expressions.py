"""Expression steps: ``filter`` rows and ``derive`` columns with SQL expressions.

One expression language for every step: DuckDB's SQL, with DuckDB's semantics
(``docs/expressions.md``). An expression is parsed by DuckDB when the configuration is built
(syntax errors, unknown functions, aggregates: configuration errors). At the first batch of each
input schema it is bound by DuckDB, then either translated into an equivalent Polars expression
(the fast path for common shapes, see :mod:`sluice.steps._translate`) or run by the sandboxed
DuckDB engine itself. Both give DuckDB's answer.

DuckDB sees only the user's columns, never the hidden position columns: it computes a filter's
true/false per row or a derive's new columns, and the step applies them to the batch itself, so
rows keep their positions (and their other columns their exact types) whichever way ran.
A filter must give true or false (``BOOLEAN``): another type is refused before the run when the
input's types are known, at the first batch otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Hashable, Mapping
from typing import Any, cast

import duckdb
import polars as pl
import pyarrow as pa

from sluice.batch import HIDDEN_COLS, Frame, as_arrow, frame_rows, strip_positions
from sluice.config.models import DeriveStep, FilterStep
from sluice.errors import ConfigError, StepError
from sluice.plugins import StepResult
from sluice.steps import sqlengine
from sluice.steps._base import BaseStep, polars_error, sql_error, to_polars
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
    return sqlengine.serialize(sql)


def _copy(node: Any) -> Any:
    return sqlengine.copy_tree(node)


def _select(select_list: list[Node], from_table: Node, where: Node | None = None) -> Node:
    node: Node = _copy(_template("SELECT 1 FROM input"))
    node["select_list"] = select_list
    node["from_table"] = from_table
    node["where_clause"] = where
    return node


def _star(replace: list[tuple[str, Node]] | None = None) -> Node:
    star: Node = _copy(_template("SELECT * FROM input")["select_list"][0])
    star["replace_list"] = [{"key": k, "value": v} for k, v in replace or []]
    return star


def _table_ref(name: str = "input") -> Node:
    ref: Node = _copy(_template("SELECT 1 FROM input")["from_table"])
    ref["table_name"] = name
    if isinstance(ref.get("qualified_name"), dict):
        ref["qualified_name"]["path"] = [name]
    return ref


def _input_ref() -> Node:
    return _table_ref("input")


def _column(name: str) -> Node:
    ref: Node = _copy(_template("SELECT x FROM input")["select_list"][0])
    ref["column_names"] = [name]
    return ref


def _with(ctes: list[tuple[str, Node]], node: Node) -> Node:
    """``WITH name AS (query), ... node``: each query a sibling (the tree does not deepen)."""
    entry_template = _template("WITH a AS (SELECT 1) SELECT 1")["cte_map"]["map"][0]
    entries = []
    for name, query in ctes:
        entry = _copy(entry_template)
        entry["key"] = name
        entry["value"]["query_node"] = query
        entries.append(entry)
    out: Node = _copy(node)
    out["cte_map"] = {"map": entries}
    return out


def _aliased(node: Node, alias: str) -> Node:
    out: Node = _copy(node)
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
        """``sql`` over ``input`` = the batch's user columns (never its hidden columns); one
        result row per input row, in order (a projection: DuckDB keeps the input's order)."""
        con = self.con
        user = strip_positions(table)
        con.register("input", user)
        try:
            out: pa.Table = con.sql(sql).to_arrow_table()
        except duckdb.Error as exc:
            raise sql_error(self.step_id, exc, user.column_names) from exc
        finally:
            con.unregister("input")
        if out.num_rows != table.num_rows:  # cannot happen for one-row expressions
            raise StepError(self.step_id, "an expression changed the number of rows")
        return out

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

        stack = [node]
        while stack:  # typed nodes (naming a column) and maximal constant subtrees
            n = stack.pop()
            if not has_column(n):
                consts.append(n)
                continue
            typed.append(n)
            stack.extend(reversed(children(n)))
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
                empty = _copy(_template("SELECT 1")["from_table"])
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
    """The frame's user columns (not the hidden ones) as Arrow and as Polars types."""
    if isinstance(frame, pl.DataFrame):
        schema = frame.head(0).to_arrow().schema
        pl_schema = dict(frame.schema)
    else:
        schema = frame.schema
        pl_schema = dict(to_polars(frame.slice(0, 0)).schema)
    for name in HIDDEN_COLS:
        pl_schema.pop(name, None)
    return sqlengine.user_schema(schema), pl_schema


def _is_boolean(typ: pa.DataType) -> bool:
    return bool(pa.types.is_boolean(typ) or pa.types.is_null(typ))


def _not_boolean(text: str, typ: pa.DataType) -> str:
    return (
        f"the filter {text!r} gives {typ}, not true/false; write a condition, e.g. "
        "name = 'x', amount > 0 or flag IS TRUE"
    )


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
                try:
                    typ = self.engine.bind(self.node, schema).type
                except duckdb.Error as exc:
                    raise sql_error(self.step_id, exc, schema.names) from exc
                if not _is_boolean(typ):
                    raise StepError(
                        self.step_id,
                        _not_boolean(self.config.filter, typ),
                        fix="make the filter a condition (true or false)",
                    )
                keep = _aliased(self.node, "keep")
                plan = sqlengine.to_sql(_select([keep], _input_ref()))
            self._plans[key] = plan
        return plan

    def process(self, table: Frame) -> StepResult:
        plan = self._plan(table)
        n = frame_rows(table)
        if isinstance(plan, str):
            arrow = as_arrow(table)
            keep = self.engine.run(plan, arrow).column(0)
            if pa.types.is_null(keep.type):
                keep = pa.chunked_array([pa.nulls(n, pa.bool_())])
            out: Frame = arrow.filter(keep)  # null: not kept
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
        """One statement giving the derived columns (each name once, in order), one row per
        input row: a WITH step per expression, so later ones see earlier ones."""
        names = list(schema.names)
        ctes: list[tuple[str, Node]] = []
        source = _input_ref()
        for i, (name, expr) in enumerate(self.nodes):
            if name in names:
                node = _select([_star([(name, expr)])], source)
            else:
                node = _select([_star(), _aliased(expr, name)], source)
                names.append(name)
            ctes.append((f"__sluice_d{i}", node))
            source = _table_ref(f"__sluice_d{i}")
            source["alias"] = "input"  # later expressions see the row so far as input
        final = _select([_column(n) for n in self._derived_names()], source)
        return sqlengine.to_sql(_with(ctes, final))

    def _derived_names(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.nodes))

    def process(self, table: Frame) -> StepResult:
        plan = self._plan(table)
        if isinstance(plan, str):
            arrow = as_arrow(table)
            derived = self.engine.run(plan, arrow)
            for i, name in enumerate(self._derived_names()):
                idx = arrow.schema.get_field_index(name)
                column = derived.column(i)
                if idx >= 0:
                    arrow = arrow.set_column(idx, name, column)
                else:
                    arrow = arrow.append_column(name, column)
            return StepResult(arrow)
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


def _config_error(step_id: str, field: str, err: sqlengine.Unbound) -> ConfigError:
    return ConfigError(
        str(err),
        step_id=step_id,
        field=field,
        fix="use one of the input columns" if err.unknown_column else "fix the expression",
    )


def _bind_expression(
    step_id: str, field: str, node: Node, schema: pa.Schema, untyped: Collection[str]
) -> pa.Field | None:
    """The field DuckDB gives one expression over ``schema``; None when it does not bind for
    a reason that may come from an ``untyped`` column; a :class:`ConfigError` otherwise."""
    sql = sqlengine.to_sql(_select([_aliased(node, "x")], _input_ref()))
    with sqlengine.binder() as con:
        try:
            return sqlengine.bind_schema(con, sql, schema).field(0)
        except duckdb.Error as exc:
            err = sqlengine.unbound(exc, schema)
    if untyped and not err.unknown_column:
        return None
    raise _config_error(step_id, field, err)


def filter_output_schema(
    config: FilterStep, input_schema: pa.Schema | None, *, untyped: Collection[str] = ()
) -> pa.Schema | None:
    """A filter keeps its input's schema; with a known input schema the expression is bound
    (unknown column -> :class:`ConfigError` with 'did you mean'; a result that is not
    BOOLEAN -> :class:`ConfigError`). ``untyped``: columns of unknown type (``pa.null()`` in
    the schema): binding problems that may come from them are not reported."""
    if input_schema is None:
        return None
    node = compile_expr(config.id, config.filter, "filter")
    schema = sqlengine.user_schema(input_schema)
    field = _bind_expression(config.id, "filter", node, schema, untyped)
    if field is not None and not _is_boolean(field.type):
        raise ConfigError(
            _not_boolean(config.filter, field.type),
            step_id=config.id,
            field="filter",
            value=config.filter,
            fix="make the filter a condition (true or false)",
        )
    return input_schema


def derive_output_schema(
    config: DeriveStep, input_schema: pa.Schema | None, *, untyped: Collection[str] = ()
) -> pa.Schema | None:
    """The input's schema with the derived columns added or replaced, as DuckDB types them
    (a column whose type cannot be known from ``untyped`` inputs gets ``pa.null()``)."""
    if input_schema is None:
        return None
    schema = sqlengine.user_schema(input_schema)
    for name, text in config.derive.items():
        node = compile_expr(config.id, text, f"derive.{name}")
        field = _bind_expression(config.id, f"derive.{name}", node, schema, untyped)
        field = pa.field(name, pa.null()) if field is None else field.with_name(name)
        idx = schema.get_field_index(name)
        schema = schema.set(idx, field) if idx >= 0 else schema.append(field)
    return schema
