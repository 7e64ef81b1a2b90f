"""The one SQL engine of Sluice: a sandboxed DuckDB, and DuckDB's own parse of every statement.

The ``sql`` step, the ``filter`` and ``derive`` expressions and contract SQL rules all speak
DuckDB's SQL dialect (see ``docs/expressions.md``). This module is the single place that

* opens DuckDB connections locked down for untrusted SQL (:func:`connect`): no file system, no
  network, no extensions, no ``ATTACH``, settings locked, no Python variables as tables, time
  zone UTC;
* parses statements and expressions with DuckDB's parser (``json_serialize_sql``), never with a
  regular expression, and checks them before any data is read (:func:`plan_statement`,
  :func:`parse_expression`): one ``SELECT``; tables only ``input``, the step's declared
  reference tables and the statement's own CTEs; known functions only (an unknown one names the
  closest match and ``docs/expressions.md``);
* decides from the parse whether a statement works row by row (each output row comes from one
  input row: it can run per batch and carry the row's provenance) or needs the whole input
  (aggregates, ``GROUP BY``, ``DISTINCT``, window functions, ``ORDER BY``, ``LIMIT``, set
  operations, a subquery over ``input``...). When in doubt: the whole input;
* rewrites row-wise statements so that the hidden position columns of :mod:`sluice.batch` ride
  along (on the parsed tree, then rendered back to SQL by DuckDB: ``json_deserialize_sql``).

Errors found while checking are :class:`SqlRefused` (a ``ValueError``, so pydantic validators
turn them into configuration errors that name the step and the field).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import duckdb
import pyarrow as pa

from sluice.batch import POSITION_COLS, ROW_COL, SOURCE_COL

DOCS: Final = "docs/expressions.md"
#: Table functions a statement may use in FROM: they make values, they read nothing.
TABLE_FUNCTIONS: Final = frozenset({"unnest", "range", "generate_series"})
#: Scalar functions refused: they read settings or variables of the process, or stall it.
BLOCKED_FUNCTIONS: Final = frozenset(
    {
        "current_setting",
        "getvariable",
        "nextval",
        "currval",
        "sleep_ms",
        "pg_sleep",
        "write_log",
        "json_execute_serialized_sql",
    }
)
#: Names the parser produces for syntax, not found in the function catalog.
_SYNTAX_FUNCTIONS: Final = frozenset({"unnest", "unlist", "row", "struct_pack", "list_value"})
_TABLE_REFS: Final = frozenset(
    {"BASE_TABLE", "JOIN", "SUBQUERY", "TABLE_FUNCTION", "EXPRESSION_LIST", "EMPTY", "PIVOT"}
)
_EXPR_ALIAS: Final = "__sluice_expr"


class SqlRefused(ValueError):
    """A statement or expression that may not run (syntax, sandbox, unknown function...)."""


# ------------------------------------------------------------------------------ connections


def connect(
    *,
    database: str = ":memory:",
    threads: int = 2,
    memory_limit: str | None = None,
    temp_directory: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for untrusted SQL: only the tables registered on it from Python.

    External access (files, ``COPY``, ``ATTACH``, ``INSTALL``/``LOAD``, HTTP) is disabled,
    extensions are neither installed nor loaded automatically, Python variables are not
    visible as tables, the time zone is UTC and the configuration is locked, so a statement
    cannot undo any of it. ``memory_limit`` and ``temp_directory`` let DuckDB spill large
    operators (aggregates, sorts, joins) to disk — its own temp files still work under the
    sandbox. Use one connection per thread.

    Contract SQL rules use this too (``sluice.quality``): one engine, one set of semantics.
    """
    config: dict[str, Any] = {
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "python_enable_replacements": False,
        "threads": threads,
    }
    if memory_limit is not None:
        config["memory_limit"] = memory_limit
    if temp_directory is not None:
        config["temp_directory"] = temp_directory
    con = duckdb.connect(database, config=config)
    try:
        # the zone of TIMESTAMPTZ calendar maths, for this connection and its cursors
        con.execute("SET GLOBAL TimeZone = 'UTC'")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


@contextlib.contextmanager
def binder() -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived sandboxed connection for binding statements against schemas."""
    con = cursor()
    try:
        yield con
    finally:
        con.close()


_LOCK = threading.Lock()
_SHARED: duckdb.DuckDBPyConnection | None = None


def _shared() -> duckdb.DuckDBPyConnection:
    global _SHARED
    if _SHARED is None:
        _SHARED = connect()
    return _SHARED


def cursor() -> duckdb.DuckDBPyConnection:
    """A new connection to the process's shared sandboxed in-memory engine (cheap: no new
    database). Tables registered on it are its own; close it when done."""
    with _LOCK:
        return _shared().cursor()


def _scalar(sql: str, *params: object) -> Any:
    with _LOCK:
        rows = _shared().execute(sql, list(params)).fetchall()
    return rows[0][0]


# ------------------------------------------------------------------------------ catalog


@functools.cache
def _catalog() -> dict[str, frozenset[str]]:
    """Function name (lower case) -> the kinds DuckDB knows it as (scalar, aggregate...)."""
    with _LOCK:
        rows = (
            _shared()
            .sql(
                "SELECT lower(function_name), list(DISTINCT function_type) "
                "FROM duckdb_functions() GROUP BY ALL"
            )
            .fetchall()
        )
    return {name: frozenset(kinds) for name, kinds in rows}


@functools.cache
def _aggregate_like() -> frozenset[str]:
    """Aggregate and window functions, plus the built-in macros that expand into one."""
    found = {n for n, kinds in _catalog().items() if kinds & {"aggregate", "window"}}
    with _LOCK:
        macros = (
            _shared()
            .sql(
                "SELECT lower(function_name), json_serialize_sql('SELECT ' || macro_definition) "
                "FROM duckdb_functions() "
                "WHERE function_type = 'macro' AND macro_definition IS NOT NULL"
            )
            .fetchall()
        )
    uses: dict[str, set[str]] = {}
    for name, text in macros:
        called = uses.setdefault(name, set())
        for d in _dicts(json.loads(text)):
            if d.get("class") == "FUNCTION":
                called.add(str(d.get("function_name", "")).lower())
            elif d.get("class") in ("WINDOW", "SUBQUERY"):
                called.add("\0subquery")
    changed = True
    while changed:
        changed = False
        for name, called in uses.items():
            if name not in found and (called & found or "\0subquery" in called):
                found.add(name)
                changed = True
    return frozenset(found)


def function_names() -> list[str]:
    """Every function an expression may call (for messages and docs checks)."""
    return sorted(
        n
        for n, kinds in _catalog().items()
        if kinds & {"scalar", "macro", "aggregate", "window"} and n not in BLOCKED_FUNCTIONS
    )


# ------------------------------------------------------------------------------ parsing


def _serialize(sql: str) -> dict[str, Any]:
    """DuckDB's parse of one SELECT statement, as its JSON tree (the statement's query node)."""
    text = _scalar("SELECT json_serialize_sql(?)", sql)
    tree = json.loads(text)
    if tree.get("error"):
        raise SqlRefused(_first_line(str(tree.get("error_message", "cannot parse"))))
    statements = tree["statements"]
    if len(statements) != 1:
        raise SqlRefused(f"expected one statement, found {len(statements)}")
    node: dict[str, Any] = statements[0]["node"]
    return node


def to_sql(node: Mapping[str, Any]) -> str:
    """Render a query node back to SQL text with DuckDB's own printer."""
    tree = {"error": False, "statements": [{"node": node, "named_param_map": []}]}
    text: str = _scalar("SELECT json_deserialize_sql(?)", json.dumps(tree))
    return text


def _first_line(message: str) -> str:
    msg = message.strip()
    for prefix in ("Parser Error: ", "Binder Error: ", "Catalog Error: ", "Conversion Error: "):
        msg = msg.removeprefix(prefix)
    return msg.splitlines()[0] if msg else "cannot parse"


def _statement_types(sql: str) -> list[str]:
    with _LOCK:
        try:
            statements = _shared().extract_statements(sql)
        except duckdb.Error as exc:
            raise SqlRefused(f"cannot parse the SQL: {_first_line(str(exc))}") from None
    return [str(s.type).rsplit(".", 1)[-1] for s in statements]


def _dicts(obj: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object of a parse tree, depth first."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


@dataclass(frozen=True)
class StatementPlan:
    """A checked ``SELECT`` of a ``sql`` step."""

    sql: str
    #: why the statement needs the whole input (e.g. "GROUP BY"), or None: it is row-wise
    whole_input: str | None
    #: row-wise statements: the same statement carrying the position columns (None when it
    #: cannot, e.g. COLUMNS('regex') may select them itself: then provenance is dropped)
    with_positions: str | None


@functools.lru_cache(maxsize=256)
def plan_statement(sql: str, tables: frozenset[str] = frozenset()) -> StatementPlan:
    """Check a ``sql`` step's statement and classify it; raise :class:`SqlRefused` if it may
    not run. ``tables`` are the reference tables the step declares (besides ``input``)."""
    types = _statement_types(sql)
    if len(types) != 1:
        raise SqlRefused(
            f"a sql step runs exactly one SELECT statement; this text holds {len(types)} "
            f"({', '.join(types) or 'none'})"
        )
    if types[0] != "SELECT":
        what = "INSTALL / LOAD" if types[0] == "LOAD" else types[0]
        raise SqlRefused(
            f"a sql step runs one SELECT statement over its input; {what} is not allowed"
        )
    node = _serialize(sql)
    allowed = {"input", *(t.lower() for t in tables)}
    check_sandbox(node, allowed)
    reason = whole_input_reason(node, allowed - {"input"})
    rewritten = None
    if reason is None:
        carried = _carry_positions(node)
        rewritten = to_sql(carried) if carried is not None else None
    return StatementPlan(sql, reason, rewritten)


def parse_expression(text: str) -> dict[str, Any]:
    """DuckDB's parse of one SQL expression (for ``filter`` / ``derive``), checked: no
    subquery, aggregate or window function (an expression works on one row), known functions
    only, nothing outside the sandbox."""
    # no parentheses around the text: "a) OR (b" must not become one expression
    sql = f"SELECT\n{text}\nAS {_EXPR_ALIAS} FROM input"
    try:
        types = _statement_types(sql)
    except SqlRefused:
        _statement_types(f"SELECT {text}")  # DuckDB's message about the text alone
        raise
    if types != ["SELECT"]:
        raise SqlRefused("not one SQL expression")
    node = _serialize(sql)
    items = node.get("select_list") or []
    from_ = node.get("from_table") or {}
    if (
        node.get("type") != "SELECT_NODE"
        or len(items) != 1
        or items[0].get("alias") != _EXPR_ALIAS
        or node.get("modifiers")
        or (node.get("cte_map") or {}).get("map")
        or from_.get("type") != "BASE_TABLE"
        or from_.get("table_name") != "input"
        or from_.get("alias")
        or node.get("where_clause")
        or node.get("group_expressions")
        or node.get("group_sets")
        or node.get("having")
        or node.get("qualify")
        or node.get("sample")
        or node.get("aggregate_handling") != "STANDARD_HANDLING"
    ):
        raise SqlRefused("not one SQL expression")
    expr: dict[str, Any] = copy.deepcopy(items[0])
    expr["alias"] = ""
    check_sandbox(expr, {"input"})
    for d in _dicts(expr):
        cls = d.get("class")
        if cls == "SUBQUERY":
            raise SqlRefused("a subquery cannot be part of an expression; use a sql step")
        if cls == "WINDOW" or (
            cls == "FUNCTION" and str(d.get("function_name", "")).lower() in _aggregate_like()
        ):
            name = str(d.get("function_name", "")).lower()
            raise SqlRefused(
                f"{name}() works over many rows, an expression over one row; use a sql step "
                "(or a window step for aggregates over time)"
            )
        if cls == "STAR":
            raise SqlRefused("* / COLUMNS(...) cannot be part of an expression; use a sql step")
    return expr


# ------------------------------------------------------------------------------ sandbox


def check_sandbox(node: Mapping[str, Any], tables: set[str]) -> None:
    """Refuse what may not run: tables other than ``tables`` and CTEs, table functions other
    than :data:`TABLE_FUNCTIONS`, unknown or blocked functions, parameters, SHOW/DESCRIBE."""
    ctes = {
        str(entry["key"]).lower()
        for d in _dicts(node)
        for entry in (d.get("cte_map") or {}).get("map", [])
        if isinstance(d.get("cte_map"), dict)
    }
    table_functions: set[int] = set()
    for d in _dicts(node):
        for key in ("from_table", "left", "right", "source"):
            ref = d.get(key)
            if isinstance(ref, dict) and "class" not in ref and "type" in ref:
                if ref["type"] not in _TABLE_REFS:
                    what = (
                        "DESCRIBE / SHOW / SUMMARIZE" if ref["type"] == "SHOW_REF" else ref["type"]
                    )
                    raise SqlRefused(f"{what} is not allowed: a sql step runs a query")
                if ref["type"] == "TABLE_FUNCTION":
                    fn = ref.get("function") or {}
                    table_functions.add(id(fn))
                    name = str(fn.get("function_name", "")).lower()
                    if name not in TABLE_FUNCTIONS:
                        raise SqlRefused(
                            f"table function {name}() is not allowed: a statement reads only "
                            "`input` and the step's declared tables (no files, no catalog); "
                            "declare a file under `tables:`"
                        )
        if d.get("type") == "BASE_TABLE" and "class" not in d:
            name = str(d.get("table_name", "")).lower()
            if d.get("schema_name") or d.get("catalog_name") or name not in tables | ctes:
                shown = ".".join(
                    p
                    for p in (d.get("catalog_name"), d.get("schema_name"), d.get("table_name"))
                    if p
                )
                known = ", ".join(sorted(tables))
                raise SqlRefused(
                    f"unknown table {shown!r}: a statement reads only {known} (and its own "
                    "WITH tables); declare other data under the step's `tables:`"
                )
        cls = d.get("class")
        if cls == "PARAMETER":
            raise SqlRefused("parameters ($1, ?) are not allowed; write the value")
        if cls == "FUNCTION" and id(d) not in table_functions:
            _check_function(d)


def _check_function(d: Mapping[str, Any]) -> None:
    name = str(d.get("function_name", "")).lower()
    if d.get("is_operator"):
        if name not in _catalog():
            raise SqlRefused(f"unknown operator {name}; see {DOCS}")
        return
    if d.get("schema") or d.get("catalog"):
        raise SqlRefused(f"qualified function names are not allowed ({name})")
    if name in BLOCKED_FUNCTIONS:
        raise SqlRefused(f"function {name}() is not allowed in Sluice SQL")
    kinds = _catalog().get(name)
    if name in _SYNTAX_FUNCTIONS:
        return
    if not kinds or not kinds & {"scalar", "macro", "aggregate", "window"}:
        close = difflib.get_close_matches(name, function_names(), n=1)
        hint = f" (did you mean {close[0]}()?)" if close else ""
        raise SqlRefused(
            f"unknown function {name}(){hint}; the supported functions are listed in {DOCS}"
        )


# ------------------------------------------------------------------------------ classification


def whole_input_reason(node: Mapping[str, Any], tables: set[str]) -> str | None:
    """Why a statement needs the whole input at once, or None when it works row by row.

    Row by row means: one SELECT over ``input`` (optionally joined, inner or left, to declared
    reference tables), without aggregates, window functions, DISTINCT, GROUP BY, HAVING,
    QUALIFY, ORDER BY, LIMIT/OFFSET, samples, WITH, set operations or subqueries over
    ``input``. Running such a statement per batch gives the same rows as over the whole input.
    Anything else, or anything this function does not recognise, needs the whole input."""
    if node.get("type") != "SELECT_NODE":
        return "a set operation (UNION / EXCEPT / INTERSECT)"
    if (node.get("cte_map") or {}).get("map"):
        return "WITH (a common table expression)"
    for mod in node.get("modifiers") or []:
        kind = mod.get("type")
        if kind == "DISTINCT_MODIFIER":
            return "DISTINCT"
        if kind == "ORDER_MODIFIER":
            return "ORDER BY"
        if kind in ("LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER"):
            return "LIMIT / OFFSET"
        return str(kind)
    if node.get("group_expressions") or node.get("group_sets"):
        return "GROUP BY"
    if node.get("aggregate_handling") != "STANDARD_HANDLING":
        return "GROUP BY ALL"
    for key, what in (("having", "HAVING"), ("qualify", "QUALIFY"), ("sample", "USING SAMPLE")):
        if node.get(key):
            return what
    reason = _from_reason(node.get("from_table") or {}, tables)
    if reason:
        return reason
    for expr in [*(node.get("select_list") or []), node.get("where_clause")]:
        reason = _expr_reason(expr)
        if reason:
            return reason
    return None


def _from_reason(ref: Mapping[str, Any], tables: set[str]) -> str | None:
    kind = ref.get("type")
    if kind == "BASE_TABLE":
        if str(ref.get("table_name", "")).lower() != "input":
            return "a FROM clause that does not start with input"
        if ref.get("sample"):
            return "TABLESAMPLE"
        return None
    if kind == "JOIN":
        right = ref.get("right") or {}
        if (
            ref.get("join_type") not in ("INNER", "LEFT")
            or ref.get("ref_type") not in ("REGULAR", "CROSS", "NATURAL")
            or right.get("type") != "BASE_TABLE"
            or str(right.get("table_name", "")).lower() not in tables
            or right.get("sample")
        ):
            return "a join other than input [LEFT] JOIN a declared table"
        return _from_reason(ref.get("left") or {}, tables) or _expr_reason(ref.get("condition"))
    return "a FROM clause other than input"


def _expr_reason(expr: Any) -> str | None:
    stack = [expr]
    aggregates = _aggregate_like()
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        cls = item.get("class")
        if cls == "WINDOW":
            return f"the window function {item.get('function_name', '')}()"
        if cls == "FUNCTION" and str(item.get("function_name", "")).lower() in aggregates:
            return f"the aggregate function {item.get('function_name')}()"
        if cls == "SUBQUERY":
            if _reads_input(item):
                return "a subquery over input"
            continue  # a subquery over reference tables only: the same for every batch
        stack.extend(item.values())
    return None


def _reads_input(node: Any) -> bool:
    return any(
        d.get("type") == "BASE_TABLE" and str(d.get("table_name", "")).lower() == "input"
        for d in _dicts(node)
    )


# ------------------------------------------------------------------------------ provenance


def _carry_positions(node: Mapping[str, Any]) -> dict[str, Any] | None:
    """The row-wise statement with the position columns kept out of its stars and appended
    explicitly, taken from ``input``; None when a COLUMNS(regex / lambda) makes that unsafe."""
    out = copy.deepcopy(dict(node))
    ref = out["from_table"]
    while ref.get("type") == "JOIN":
        ref = ref["left"]
    qualifier = ref.get("alias") or ref.get("table_name") or "input"
    stack: list[Any] = list(out["select_list"])
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict) or item.get("class") == "SUBQUERY":
            continue
        if item.get("class") == "STAR":
            if item.get("expr") is not None:
                return None
            relation = str(item.get("relation_name") or "")
            if relation and relation.lower() != str(qualifier).lower():
                continue
            excluded = {str(e).lower() for e in item.get("exclude_list") or []}
            item["exclude_list"] = list(item.get("exclude_list") or []) + [
                c for c in POSITION_COLS if c not in excluded
            ]
            continue
        stack.extend(item.values())
    template = out["select_list"][0] if out["select_list"] else None
    for col in (SOURCE_COL, ROW_COL):
        out["select_list"].append(
            {
                "class": "COLUMN_REF",
                "type": "COLUMN_REF",
                "alias": col,
                "query_location": (template or {}).get("query_location", 0),
                "column_names": [qualifier, col],
            }
        )
    return out


# ------------------------------------------------------------------------------ schemas


def bind_schema(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    input_schema: pa.Schema,
    tables: Mapping[str, pa.Schema] | None = None,
) -> pa.Schema:
    """The Arrow schema of ``sql``'s result over inputs of these schemas (no data is read).
    Raises ``duckdb.Error`` when the statement does not bind (unknown column, wrong types)."""
    names = ["input", *(tables or {})]
    try:
        con.register("input", input_schema.empty_table())
        for name, schema in (tables or {}).items():
            con.register(name, schema.empty_table())
        return con.sql(sql).limit(0).to_arrow_table().schema
    finally:
        for name in names:
            with contextlib.suppress(duckdb.Error):
                con.unregister(name)


def output_schema(
    step: Any, input_schema: pa.Schema | None, tables: Mapping[str, pa.Schema] | None = None
) -> pa.Schema | None:
    """The output schema of a ``filter``, ``derive`` or ``sql`` step config for an input of
    ``input_schema`` (None: unknown, e.g. no input schema, or reference tables not given);
    raises :class:`~sluice.errors.ConfigError` naming the step when an expression does not
    bind — an unknown column comes with 'did you mean'. ``tables`` are the schemas of a sql
    step's reference tables. Other step kinds: None."""
    from sluice.config.models import DeriveStep, FilterStep, SqlStep

    if isinstance(step, FilterStep):
        from sluice.steps.expressions import filter_output_schema

        return filter_output_schema(step, input_schema)
    if isinstance(step, DeriveStep):
        from sluice.steps.expressions import derive_output_schema

        return derive_output_schema(step, input_schema)
    if isinstance(step, SqlStep):
        from sluice.steps.sql import output_schema as sql_output_schema

        return sql_output_schema(step, input_schema, tables)
    return None


def missing_column_hint(message: str, columns: list[str]) -> str | None:
    """From a DuckDB binder error about an unknown column, 'did you mean' text (or None)."""
    marker = 'Referenced column "'
    if marker not in message:
        return None
    name = message.split(marker, 1)[1].split('"', 1)[0]
    user = [c for c in columns if c not in POSITION_COLS]
    close = difflib.get_close_matches(name, user, n=1) or difflib.get_close_matches(
        name.lower(), [c.lower() for c in user], n=1
    )
    hint = f"unknown column '{name}'"
    if close:
        hint += f" (did you mean '{close[0]}'?)"
    return hint + f"; the input columns are: {', '.join(user)}"


def column_refs(sql: str) -> set[str] | None:
    """Names of the input columns ``sql`` refers to, from DuckDB's parse tree (None when it does
    not parse); names that are aliases, CTEs or table names of the statement are left out."""
    try:
        tree = json.loads(_scalar("SELECT json_serialize_sql(?)", sql))
    except Exception:
        return None
    if tree.get("error"):
        return None
    refs: set[str] = set()
    defined: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class") == "COLUMN_REF":
                parts = node.get("column_names") or []
                if parts:
                    refs.add(parts[-1] if len(parts) > 1 else parts[0])
                    if len(parts) > 1:
                        defined.add(parts[0])
            for key in ("alias", "table_name"):
                if isinstance(node.get(key), str) and node[key]:
                    defined.add(node[key])
            if node.get("class") == "LAMBDA":
                defined.update(_lambda_params(node))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree.get("statements"))
    for cte in _cte_names(tree):
        defined.add(cte)
    return refs - defined


def _lambda_params(node: Any) -> set[str]:
    out: set[str] = set()
    lhs = node.get("lhs")
    stack = [lhs]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if n.get("class") == "COLUMN_REF":
                out.update(n.get("column_names") or [])
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return out


def _cte_names(tree: Any) -> set[str]:
    out: set[str] = set()
    stack = [tree]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            cte = n.get("cte_map")
            if isinstance(cte, dict):
                for entry in cte.get("map", []):
                    if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                        out.add(entry["key"])
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return out
