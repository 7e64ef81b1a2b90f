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
  along without the statement ever seeing them: ``input`` holds only the user's columns, and
  the positions come from a second table joined to it row by row (``POSITIONAL JOIN``) that
  no user statement can name (on the parsed tree, then rendered back to SQL by DuckDB:
  ``json_deserialize_sql``).

Errors found while checking are :class:`SqlRefused` (a ``ValueError``, so pydantic validators
turn them into configuration errors that name the step and the field).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import itertools
import json
import re
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import duckdb
import pyarrow as pa

from sluice.batch import HIDDEN_COLS

DOCS: Final = "docs/expressions.md"
#: Prefix of every name Sluice keeps for itself (the hidden columns of :mod:`sluice.batch`,
#: the positions table): no user statement or expression may name it.
RESERVED_PREFIX: Final = "__sluice"
#: The table that holds a batch's hidden columns while a row-wise statement runs over it.
POSITIONS_TABLE: Final = "__sluice_pos"
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

#: The deepest parse tree accepted (levels of DuckDB's JSON serialization of a statement).
#: DuckDB cannot read back a tree deeper than 256 levels, and Sluice wraps an expression in a
#: few levels of its own (a filter's SELECT, a derive's WITH...): the margin is for those.
MAX_DEPTH: Final = 240
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]")


def serialize(sql: str) -> dict[str, Any]:
    """DuckDB's parse of one SELECT statement, as its JSON tree (the statement's query node).
    Raises :class:`SqlRefused` when it does not parse or is nested deeper than
    :data:`MAX_DEPTH` (checked on the JSON text, before it is turned into Python objects)."""
    try:
        text = _scalar("SELECT json_serialize_sql(?)", sql)
    except duckdb.Error as exc:
        raise SqlRefused(_too_deep() if "depth" in str(exc) else first_line(str(exc))) from None
    if _json_depth(text) > MAX_DEPTH:
        raise SqlRefused(_too_deep())
    tree = json.loads(text)
    if tree.get("error"):
        raise SqlRefused(first_line(str(tree.get("error_message", "cannot parse"))))
    statements = tree["statements"]
    if len(statements) != 1:
        raise SqlRefused(f"expected one statement, found {len(statements)}")
    node: dict[str, Any] = statements[0]["node"]
    return node


def _json_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in a JSON text (no recursion, no parsing)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    steps = (1 if c in "[{" else -1 for c in brackets)
    return max(itertools.accumulate(steps, initial=0))


def _too_deep() -> str:
    return (
        f"the text is nested too deeply (DuckDB's parse of it is deeper than {MAX_DEPTH} "
        "levels, e.g. about 75 chained + or || operators): split it over several derive entries "
        "or steps, or use a list function (list_sum, array_to_string, IN (...))"
    )


def to_sql(node: Mapping[str, Any]) -> str:
    """Render a query node back to SQL text with DuckDB's own printer."""
    tree = {"error": False, "statements": [{"node": node, "named_param_map": []}]}
    text: str = _scalar("SELECT json_deserialize_sql(?)", json.dumps(tree))
    return text


def first_line(message: str) -> str:
    """The first line of a DuckDB error message, without its "Binder Error: " kind prefix."""
    msg = message.strip()
    for prefix in ("Parser Error: ", "Binder Error: ", "Catalog Error: ", "Conversion Error: "):
        msg = msg.removeprefix(prefix)
    return msg.splitlines()[0] if msg else "cannot parse"


def _statement_types(sql: str) -> list[str]:
    with _LOCK:
        try:
            statements = _shared().extract_statements(sql)
        except duckdb.Error as exc:
            if "expression depth" in str(exc):
                raise SqlRefused(_too_deep()) from None
            raise SqlRefused(f"cannot parse the SQL: {first_line(str(exc))}") from None
    return [str(s.type).rsplit(".", 1)[-1] for s in statements]


def _dicts(obj: Any, *, into_subqueries: bool = True) -> Iterator[dict[str, Any]]:
    """Every JSON object of a parse tree, depth first (no recursion). With
    ``into_subqueries=False`` the insides of subqueries (expressions and FROM items) are
    skipped: what is left is the query's own scope."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            if not into_subqueries and (
                item.get("class") == "SUBQUERY" or _is_ref(item, "SUBQUERY")
            ):
                if item.get("child") is not None:  # the left side of IN / ANY: this scope
                    stack.append(item["child"])
                continue
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _is_ref(d: Mapping[str, Any], kind: str | None = None) -> bool:
    """Is ``d`` a table reference (a FROM item), of this kind if given?"""
    kind_of = d.get("type")
    return (
        "class" not in d
        and isinstance(kind_of, str)
        and kind_of in _TABLE_REFS
        and (kind is None or kind_of == kind)
    )


def copy_tree(node: Any) -> Any:
    """A deep copy of a parse tree (no recursion in Python)."""
    return json.loads(json.dumps(node))


@dataclass(frozen=True)
class StatementPlan:
    """A checked ``SELECT`` of a ``sql`` step."""

    sql: str
    #: why the statement needs the whole input (e.g. "GROUP BY"), or None: it is row-wise
    whole_input: str | None
    #: row-wise statements: can the hidden position columns be carried along (see
    #: :func:`carrying_positions`)? False when the statement could pick them up itself
    #: (``COLUMNS('regex')``, ``#n``): it then runs without them, and provenance is dropped
    carries_positions: bool
    #: the reference tables the statement may read (besides ``input``)
    tables: frozenset[str] = frozenset()

    def carrying(self, hidden: tuple[str, ...]) -> str:
        """The row-wise statement carrying the ``hidden`` columns of table
        :data:`POSITIONS_TABLE` (see :func:`carrying_positions`)."""
        return carrying_positions(self.sql, self.tables, hidden)


@functools.lru_cache(maxsize=256)
def plan_statement(sql: str, tables: frozenset[str] = frozenset()) -> StatementPlan:
    """Check one ``SELECT`` (a ``sql`` step's, a contract's SQL rule...) and classify it;
    raise :class:`SqlRefused` (a ``ValueError``) if it may not run. ``tables`` are the
    reference tables the statement may read besides ``input``."""
    types = _statement_types(sql)
    if len(types) != 1:
        raise SqlRefused(
            f"a statement is exactly one SELECT; this text holds {len(types)} "
            f"({', '.join(types) or 'none'})"
        )
    if types[0] != "SELECT":
        what = "INSTALL / LOAD" if types[0] == "LOAD" else types[0]
        raise SqlRefused(f"a statement is one SELECT over its input; {what} is not allowed")
    node = serialize(sql)
    allowed = {"input", *(t.lower() for t in tables)}
    check_sandbox(node, allowed)
    reason = whole_input_reason(node, allowed - {"input"})
    carries = reason is None and not any(
        d.get("class") == "POSITIONAL_REFERENCE"
        or (d.get("class") == "STAR" and d.get("expr") is not None)
        for d in _dicts(node)
    )
    return StatementPlan(sql, reason, carries, frozenset(tables))


def parse_expression(text: str) -> dict[str, Any]:
    """DuckDB's parse of one SQL expression (for ``filter`` / ``derive``), checked: no
    subquery, aggregate, window function or ``unnest`` (an expression works on one row and
    gives one value), known functions only, nothing outside the sandbox."""
    # no parentheses around the text: "a) OR (b" must not become one expression
    sql = f"SELECT\n{text}\nAS {_EXPR_ALIAS} FROM input"
    try:
        types = _statement_types(sql)
    except SqlRefused:
        _statement_types(f"SELECT {text}")  # DuckDB's message about the text alone
        raise
    if types != ["SELECT"]:
        raise SqlRefused("not one SQL expression")
    node = serialize(sql)
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
    expr: dict[str, Any] = copy_tree(items[0])
    expr["alias"] = ""
    check_sandbox(expr, {"input"})
    for d in _dicts(expr):
        cls = d.get("class")
        if cls == "SUBQUERY":
            raise SqlRefused("a subquery cannot be part of an expression; use a sql step")
        name = str(d.get("function_name", "")).lower()
        if cls == "WINDOW" or (cls == "FUNCTION" and name in _aggregate_like()):
            raise SqlRefused(
                f"{name}() works over many rows, an expression over one row; use a sql step "
                "(or a window step for aggregates over time)"
            )
        if cls == "FUNCTION" and name in ("unnest", "unlist"):
            raise SqlRefused(
                f"{name}() makes several rows of one, an expression gives one value; use a "
                "sql step: SELECT *, unnest(...) AS x FROM input"
            )
        if cls == "STAR":
            raise SqlRefused("* / COLUMNS(...) cannot be part of an expression; use a sql step")
        if cls == "POSITIONAL_REFERENCE":
            raise SqlRefused("#n column positions cannot be part of an expression; name it")
    return expr


# ------------------------------------------------------------------------------ sandbox


def check_sandbox(node: Mapping[str, Any], tables: set[str]) -> None:
    """Refuse what may not run: tables other than ``tables`` and CTEs, table functions other
    than :data:`TABLE_FUNCTIONS`, unknown or blocked functions, parameters, SHOW/DESCRIBE,
    and names Sluice reserves for itself (:data:`RESERVED_PREFIX`: the hidden columns)."""
    ctes = {
        str(entry["key"]).lower()
        for d in _dicts(node)
        for entry in (d.get("cte_map") or {}).get("map", [])
        if isinstance(d.get("cte_map"), dict)
    }
    table_functions: set[int] = set()
    for d in _dicts(node):
        _check_names(d)
        for key in ("from_table", "left", "right", "source"):
            ref = d.get(key)
            if isinstance(ref, dict) and "class" not in ref and "type" in ref:
                if ref["type"] not in _TABLE_REFS:
                    what = (
                        "DESCRIBE / SHOW / SUMMARIZE" if ref["type"] == "SHOW_REF" else ref["type"]
                    )
                    raise SqlRefused(f"{what} is not allowed: a statement is a query")
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


def _check_names(d: Mapping[str, Any]) -> None:
    """Refuse a name (column, table, alias, star qualifier) Sluice reserves for itself."""
    names: list[Any] = []
    if d.get("class") == "COLUMN_REF":
        names.extend(d.get("column_names") or [])
    elif d.get("class") == "STAR":
        names.append(d.get("relation_name"))
        names.extend(d.get("exclude_list") or [])
    elif _is_ref(d):
        names.extend((d.get("table_name"), *(d.get("column_name_alias") or [])))
    names.append(d.get("alias"))
    for name in names:
        if isinstance(name, str) and name.lower().startswith(RESERVED_PREFIX):
            raise SqlRefused(
                f"{name!r}: names starting with {RESERVED_PREFIX} are Sluice's own (hidden row "
                "positions); choose another name"
            )


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
    ``input``; a subquery holding an aggregate or window function is row by row only when it
    provably reads nothing but declared tables (every column it names belongs to a table of
    its own FROM): an aggregate over a column of ``input`` inside a subquery (``(SELECT
    sum(v))``, correlated or not) aggregates the outer query. Running a row-wise statement per
    batch gives the same rows as over the whole input. Anything else, or anything this
    function does not recognise, needs the whole input."""
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
        reason = _expr_reason(expr, tables)
        if reason:
            return reason
    return None


def _from_reason(ref: Mapping[str, Any], tables: set[str]) -> str | None:
    while ref.get("type") == "JOIN":
        right = ref.get("right") or {}
        if (
            ref.get("join_type") not in ("INNER", "LEFT")
            or ref.get("ref_type") not in ("REGULAR", "CROSS", "NATURAL")
            or right.get("type") != "BASE_TABLE"
            or str(right.get("table_name", "")).lower() not in tables
            or right.get("sample")
        ):
            return "a join other than input [LEFT] JOIN a declared table"
        reason = _expr_reason(ref.get("condition"), tables)
        if reason:
            return reason
        ref = ref.get("left") or {}
    if ref.get("type") == "BASE_TABLE":
        if str(ref.get("table_name", "")).lower() != "input":
            return "a FROM clause that does not start with input"
        if ref.get("sample"):
            return "TABLESAMPLE"
        return None
    return "a FROM clause other than input"


def _expr_reason(expr: Any, tables: set[str]) -> str | None:
    for d in _dicts(expr, into_subqueries=False):
        cls = d.get("class")
        if cls == "WINDOW":
            return f"the window function {d.get('function_name', '')}()"
        if cls == "FUNCTION" and str(d.get("function_name", "")).lower() in _aggregate_like():
            return f"the aggregate function {d.get('function_name')}()"
        if cls == "SUBQUERY":
            sub = d.get("subquery")
            if _reads_input(sub):
                return "a subquery over input"
            many = _many_rows(sub)
            if many and not _only_reads(sub, tables):
                return (
                    f"{many} in a subquery that may read input's columns (an aggregate over "
                    "them aggregates the whole input)"
                )
    return None


def _many_rows(node: Any) -> str | None:
    """The first aggregate or window function anywhere in ``node`` (subqueries included)."""
    for d in _dicts(node):
        cls = d.get("class")
        name = str(d.get("function_name", "")).lower()
        if cls == "WINDOW" or (cls == "FUNCTION" and name in _aggregate_like()):
            return f"{'the window function' if cls == 'WINDOW' else 'the aggregate'} {name}()"
    return None


def _only_reads(sub: Any, tables: set[str]) -> bool:
    """Does a subquery provably read nothing but declared tables? Every table it reads is one
    of ``tables`` (or a WITH table of its own), and every column it names is qualified by a
    table of its own FROM (an unqualified name might be a column of ``input``)."""
    defined: set[str] = set()
    for d in _dicts(sub):
        for entry in (
            (d.get("cte_map") or {}).get("map", []) if isinstance(d.get("cte_map"), dict) else []
        ):
            defined.add(str(entry.get("key", "")).lower())
    for d in _dicts(sub):
        if not _is_ref(d):
            continue
        name = str(d.get("table_name") or "").lower()
        if d["type"] == "BASE_TABLE" and name not in tables and name not in defined:
            return False
        defined.add(str(d.get("alias") or name).lower())
    if "input" in defined:
        return False
    for d in _dicts(sub):
        if d.get("class") == "COLUMN_REF":
            parts = d.get("column_names") or []
            if len(parts) < 2 or str(parts[0]).lower() not in defined:
                return False
    return True


def _reads_input(node: Any) -> bool:
    return any(
        d.get("type") == "BASE_TABLE" and str(d.get("table_name", "")).lower() == "input"
        for d in _dicts(node)
    )


# ------------------------------------------------------------------------------ provenance


@functools.lru_cache(maxsize=256)
def carrying_positions(sql: str, tables: frozenset[str], hidden: tuple[str, ...]) -> str:
    """A row-wise statement rewritten to return the ``hidden`` columns too.

    The statement runs over ``input`` holding only the user's columns — so nothing in it
    (``*``, ``input`` as a row value, ``COLUMNS(*)``...) can see a hidden column — joined
    row by row (``POSITIONAL JOIN``) to :data:`POSITIONS_TABLE`, which holds the same batch's
    hidden columns. The rewrite keeps that table's columns out of every unqualified star and
    appends them to the select list; no user statement can name the table (reserved prefix).
    Only for statements whose plan has ``carries_positions``."""
    plan = plan_statement(sql, tables)
    assert plan.whole_input is None and plan.carries_positions, "a row-wise statement"
    out = copy_tree(serialize(sql))
    parent, key = out, "from_table"
    while parent[key].get("type") == "JOIN":
        parent, key = parent[key], "left"
    join = copy_tree(
        _template(f"SELECT 1 FROM input POSITIONAL JOIN {POSITIONS_TABLE}")["from_table"]
    )
    join["left"] = parent[key]
    parent[key] = join
    for d in _dicts(out["select_list"], into_subqueries=False):
        _exclude_hidden(d, hidden)
    for d in _dicts([out.get("where_clause"), out["from_table"]], into_subqueries=False):
        _exclude_hidden(d, hidden)
    template = _template(f"SELECT {POSITIONS_TABLE}.x AS x")["select_list"][0]
    for col in hidden:
        item = copy_tree(template)
        item["column_names"] = [POSITIONS_TABLE, col]
        item["alias"] = col
        out["select_list"].append(item)
    return to_sql(out)


def _exclude_hidden(d: dict[str, Any], hidden: tuple[str, ...]) -> None:
    if d.get("class") == "STAR" and d.get("expr") is None and not d.get("relation_name"):
        d["exclude_list"] = [*(d.get("exclude_list") or []), *hidden]


@functools.cache
def _template(sql: str) -> dict[str, Any]:
    return serialize(sql)


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


class Unbound(SqlRefused):
    """A statement or expression that does not bind over the given schemas."""

    def __init__(self, message: str, *, unknown_column: bool) -> None:
        super().__init__(message)
        #: True for a column that is not there (the message has 'did you mean'); False for
        #: anything else (types that do not fit a function or an operator...)
        self.unknown_column = unknown_column


def user_schema(schema: pa.Schema) -> pa.Schema:
    """The schema without Sluice's hidden columns (what user SQL sees as ``input``)."""
    return pa.schema([f for f in schema if f.name not in HIDDEN_COLS])


def unbound(
    exc: Exception, input_schema: pa.Schema, tables: Mapping[str, pa.Schema] | None = None
) -> Unbound:
    """A DuckDB binding error as :class:`Unbound` (an unknown column with 'did you mean')."""
    columns = {name: list(s.names) for name, s in (tables or {}).items()}
    hint = missing_column_hint(str(exc), list(input_schema.names), columns)
    return Unbound(hint or first_line(str(exc)), unknown_column=hint is not None)


def bind_statement(
    sql: str,
    input_schema: pa.Schema,
    tables: Mapping[str, pa.Schema] | None = None,
    *,
    untyped: Collection[str] = (),
) -> pa.Schema | None:
    """Check one SELECT over ``input`` (and reference ``tables``) and bind it over empty inputs
    of these schemas: the Arrow schema of its result, found before any data is read.

    For any statement the caller knows the input of: a ``sql`` step, a contract's SQL rule.
    Hidden columns of ``input_schema`` are left out (user SQL never sees them). Raises
    :class:`SqlRefused` when it may not run (:func:`plan_statement`), and its subclass
    :class:`Unbound` when it does not bind (an unknown column comes with 'did you mean' and
    the input's columns). ``untyped``: columns (of ``input``, or ``table.column``) whose type
    is not known — give them ``pa.null()``, which binds with anything; a binding error that is
    not an unknown column then returns None (it may come from the guessed type)."""
    plan_statement(sql, frozenset(tables or ()))
    schema = user_schema(input_schema)
    with binder() as con:
        try:
            return bind_schema(con, sql, schema, tables)
        except duckdb.Error as exc:
            err = unbound(exc, schema, tables)
    if untyped and not err.unknown_column:
        return None
    raise err


def output_schema(
    step: Any,
    input_schema: pa.Schema | None,
    tables: Mapping[str, pa.Schema] | None = None,
    *,
    untyped: Collection[str] = (),
) -> pa.Schema | None:
    """The output schema of a ``filter``, ``derive`` or ``sql`` step config for an input of
    ``input_schema`` (None: unknown, e.g. no input schema, or reference tables not given);
    raises :class:`~sluice.errors.ConfigError` naming the step when an expression does not
    bind — an unknown column comes with 'did you mean'. ``tables`` are the schemas of a sql
    step's reference tables; ``untyped`` as in :func:`bind_statement`. Other step kinds:
    None."""
    from sluice.config.models import DeriveStep, FilterStep, SqlStep

    if isinstance(step, FilterStep):
        from sluice.steps.expressions import filter_output_schema

        return filter_output_schema(step, input_schema, untyped=untyped)
    if isinstance(step, DeriveStep):
        from sluice.steps.expressions import derive_output_schema

        return derive_output_schema(step, input_schema, untyped=untyped)
    if isinstance(step, SqlStep):
        from sluice.steps.sql import output_schema as sql_output_schema

        return sql_output_schema(step, input_schema, tables, untyped=untyped)
    return None


_UNKNOWN_COLUMN = re.compile(r'Referenced column "([^"]+)" not found')
_UNKNOWN_QUALIFIED = re.compile(
    r'^(?:Table|Values list) "([^"]+)" does not have a column named "([^"]+)"'
)


def missing_column_hint(
    message: str, columns: list[str], tables: Mapping[str, list[str]] | None = None
) -> str | None:
    """From a DuckDB binder error about an unknown column, 'did you mean' text (or None).
    ``columns`` are the input's, ``tables`` the columns of the reference tables by name."""
    text = first_line(message)
    m = _UNKNOWN_COLUMN.search(text)
    relation = "input"
    if m is not None:
        name = m.group(1)
    else:
        q = _UNKNOWN_QUALIFIED.search(text)
        if q is None:
            return None
        relation, name = q.group(1), q.group(2)
        columns = (tables or {}).get(relation, columns if relation == "input" else [])
        name_shown = f"{relation}.{name}"
    user = [c for c in columns if c not in HIDDEN_COLS]
    close = difflib.get_close_matches(name, user, n=1) or difflib.get_close_matches(
        name.lower(), [c.lower() for c in user], n=1
    )
    hint = f"unknown column '{name if m is not None else name_shown}'"
    if close:
        hint += f" (did you mean '{close[0]}'?)"
    where = "the input columns" if relation == "input" else f"the columns of {relation}"
    return hint + f"; {where} are: {', '.join(user)}"


def column_refs(sql: str | Mapping[str, Any]) -> set[str] | None:
    """Names of the input columns a statement (its text, or a parse tree such as
    :func:`parse_expression` gives) refers to (None when it does not parse); names that are
    aliases, CTEs or table names of the statement, and lambda parameters, are left out."""
    tree: Any = sql
    if isinstance(sql, str):
        try:
            tree = serialize(sql)
        except SqlRefused:
            return None
    refs: set[str] = set()
    defined: set[str] = set()
    for d in _dicts(tree):
        if d.get("class") == "COLUMN_REF":
            parts = d.get("column_names") or []
            if parts:
                refs.add(parts[-1] if len(parts) > 1 else parts[0])
                if len(parts) > 1:
                    defined.add(parts[0])
        for key in ("alias", "table_name"):
            if isinstance(d.get(key), str) and d[key]:
                defined.add(d[key])
        if d.get("class") == "LAMBDA":
            defined.update(
                str(p)
                for n in _dicts(d.get("lhs"))
                if n.get("class") == "COLUMN_REF"
                for p in n.get("column_names") or []
            )
        cte = d.get("cte_map")
        if isinstance(cte, dict):
            defined.update(
                e["key"] for e in cte.get("map", []) if isinstance(e, dict) and "key" in e
            )
    return refs - defined
