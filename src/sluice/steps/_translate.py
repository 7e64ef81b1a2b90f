"""DuckDB expressions as Polars expressions, with DuckDB's semantics — or not at all.

``filter`` and ``derive`` speak DuckDB's SQL (one language for every step, see
``docs/expressions.md``). Evaluating them in DuckDB costs a copy of every column per batch, which
made the batch benchmark's filter + derive path about 3x slower than Polars. So the common
shapes are translated into Polars expressions that compute exactly what DuckDB computes, and
everything else runs in DuckDB itself (``sluice.steps.expressions``).

The translation works on DuckDB's own parse tree and on DuckDB's own types: every node of the
expression is bound by DuckDB against the batch's schema first (``bind types``), and each rule
below reproduces DuckDB's implicit casts, NULL and NaN semantics and errors for those types:

* columns, constants (folded by DuckDB, then cast the way DuckDB casts them to the other
  operand), ``= <> < <= > >=``, ``IS [NOT] DISTINCT FROM``, ``BETWEEN``, ``IN (constants)``,
  ``AND OR NOT`` (three-valued), ``IS [NOT] NULL``;
* ``+ - * /`` and unary ``-`` on integers and floats (integers are computed in 128 bits and
  cast back strictly: an overflow is an error, as in DuckDB), ``CASE``, ``COALESCE``;
* ``LIKE`` with a constant pattern, ``starts_with``, ``ends_with``, ``contains``, ``||`` on
  strings, ``length``; ``abs``, ``round(x)`` (half away from zero), ``floor``, ``ceil``;
  ``year`` ... ``second`` and ``date_trunc`` on dates and timestamps (TIMESTAMPTZ in UTC, the
  sandbox's session time zone); widening ``CAST``\\ s.

A rule that does not apply raises :class:`Untranslatable`, and the whole expression runs in
DuckDB; the final Polars type must equal DuckDB's result type, or it runs in DuckDB too. The
table-driven and property tests in ``tests/steps/test_expressions.py`` compare both paths.
"""

from __future__ import annotations

import decimal
import math
import re
from dataclasses import dataclass
from typing import Any, Final

import polars as pl

_INT_RANGES: Final[dict[type[pl.DataType], tuple[int, int]]] = {
    pl.Int8: (-(2**7), 2**7 - 1),
    pl.Int16: (-(2**15), 2**15 - 1),
    pl.Int32: (-(2**31), 2**31 - 1),
    pl.Int64: (-(2**63), 2**63 - 1),
    pl.UInt8: (0, 2**8 - 1),
    pl.UInt16: (0, 2**16 - 1),
    pl.UInt32: (0, 2**32 - 1),
    pl.UInt64: (0, 2**64 - 1),
    pl.Int128: (-(2**127), 2**127 - 1),
}
_DUCK_SIMPLE: Final[dict[str, pl.DataType]] = {
    "BOOLEAN": pl.Boolean(),
    "TINYINT": pl.Int8(),
    "SMALLINT": pl.Int16(),
    "INTEGER": pl.Int32(),
    "BIGINT": pl.Int64(),
    "HUGEINT": pl.Int128(),
    "UTINYINT": pl.UInt8(),
    "USMALLINT": pl.UInt16(),
    "UINTEGER": pl.UInt32(),
    "UBIGINT": pl.UInt64(),
    "FLOAT": pl.Float32(),
    "DOUBLE": pl.Float64(),
    "VARCHAR": pl.String(),
    "DATE": pl.Date(),
    "TIMESTAMP": pl.Datetime("us"),
    "TIMESTAMP_MS": pl.Datetime("ms"),
    "TIMESTAMP_NS": pl.Datetime("ns"),
}
_COMPARE: Final = {
    "COMPARE_EQUAL": "eq",
    "COMPARE_NOTEQUAL": "ne",
    "COMPARE_LESSTHAN": "lt",
    "COMPARE_LESSTHANOREQUALTO": "le",
    "COMPARE_GREATERTHAN": "gt",
    "COMPARE_GREATERTHANOREQUALTO": "ge",
    "COMPARE_DISTINCT_FROM": "ne_missing",
    "COMPARE_NOT_DISTINCT_FROM": "eq_missing",
}
_FLIP: Final = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}
_PARTS: Final = {
    "year": "year",
    "month": "month",
    "day": "day",
    "hour": "hour",
    "minute": "minute",
    "second": "second",
}
_TRUNC: Final = {
    "second": "1s",
    "minute": "1m",
    "hour": "1h",
    "day": "1d",
    "week": "1w",
    "month": "1mo",
    "quarter": "3mo",
    "year": "1y",
}
_FUNCTIONS: Final = frozenset(
    {
        "+",
        "-",
        "*",
        "/",
        "~~",
        "!~~",
        "||",
        "starts_with",
        "prefix",
        "ends_with",
        "suffix",
        "contains",
        "length",
        "abs",
        "round",
        "floor",
        "ceil",
        "ceiling",
        "date_trunc",
        "datetrunc",
        "date_part",
        "datepart",
        *_PARTS,
    }
)
_OPERATORS: Final = frozenset(
    {
        "OPERATOR_NOT",
        "OPERATOR_IS_NULL",
        "OPERATOR_IS_NOT_NULL",
        "COMPARE_IN",
        "COMPARE_NOT_IN",
        "OPERATOR_COALESCE",
    }
)
#: Conditional contexts: DuckDB evaluates their operands only for some rows, so an operation
#: that can fail (integer overflow) must not be evaluated eagerly for all rows by Polars.
_LAZY: Final = frozenset({"CONJUNCTION", "CASE"})


class Untranslatable(Exception):
    """This expression (or part of it) is left to DuckDB."""


def duck_dtype(name: str) -> pl.DataType | None:
    """The Polars type of a DuckDB type name (None when there is no exact one)."""
    name = name.strip().upper()
    if name in _DUCK_SIMPLE:
        return _DUCK_SIMPLE[name]
    if name == "TIMESTAMP WITH TIME ZONE":
        return pl.Datetime("us", "UTC")
    m = re.fullmatch(r"DECIMAL\((\d+),\s*(\d+)\)", name)
    if m:
        return pl.Decimal(int(m.group(1)), int(m.group(2)))
    return None


def same_type(duck: str, dtype: pl.DataType) -> bool:
    """Does a Polars column of ``dtype`` hold exactly DuckDB's ``duck`` values?"""
    want = duck_dtype(duck)
    if want is None:
        return False
    if isinstance(want, pl.Datetime) and isinstance(dtype, pl.Datetime):
        if want.time_zone is not None:  # TIMESTAMPTZ: any zone, same instants
            return dtype.time_zone is not None and dtype.time_unit == want.time_unit
        return dtype.time_zone is None and dtype.time_unit == want.time_unit
    return bool(dtype == want)


def shape_ok(node: dict[str, Any]) -> bool:
    """Only the node kinds the translator knows (checked before asking DuckDB for types)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if not _node_ok(n):
            return False
        stack.extend(children(n))
    return True


def _node_ok(node: dict[str, Any]) -> bool:
    cls = node.get("class")
    if cls in ("COLUMN_REF", "CONSTANT", "COMPARISON", "CONJUNCTION", "BETWEEN", "CASE"):
        return True
    if cls == "OPERATOR":
        return node.get("type") in _OPERATORS
    if cls == "CAST":
        return node.get("type") == "OPERATOR_CAST"
    if cls == "FUNCTION":
        return not (
            str(node.get("function_name", "")).lower() not in _FUNCTIONS
            or node.get("distinct")
            or node.get("filter")
            or (node.get("order_bys") or {}).get("orders")
            or any(a.get("name") for a in node.get("arguments") or [])
        )
    return False


def children(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The expression children of a node (not CAST's type)."""
    cls = node.get("class")
    if cls == "COMPARISON":
        return [node["left"], node["right"]]
    if cls in ("CONJUNCTION", "OPERATOR"):
        return list(node.get("children") or [])
    if cls == "BETWEEN":
        return [node["input"], node["lower"], node["upper"]]
    if cls == "CASE":
        out = []
        for check in node.get("case_checks") or []:
            out += [check["when_expr"], check["then_expr"]]
        return [*out, node["else_expr"]]
    if cls == "CAST":
        return [node["child"]]
    if cls == "FUNCTION":
        return [a["expression"] for a in node.get("arguments") or []]
    return []


def has_column(node: dict[str, Any]) -> bool:
    """Does the expression name a column anywhere (no recursion)?"""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.get("class") == "COLUMN_REF":
            return True
        stack.extend(children(n))
    return False


@dataclass
class Typed:
    """A translated node: the Polars expression, its Polars type, and for a constant its
    value and how DuckDB typed it (a STRING literal casts implicitly to the other side)."""

    expr: pl.Expr
    dtype: pl.DataType
    value: Any = None
    literal: str | None = None  # INTEGER | NUMERIC | STRING | BOOLEAN | NULL | VALUE
    duck: str = ""

    @property
    def const(self) -> bool:
        return self.literal is not None


class Translator:
    """Translate one bound expression. ``types`` maps ``id(node)`` to DuckDB's type name of
    every non-constant node; ``consts`` maps ``id(node)`` to (value, DuckDB type) for every
    maximal constant subtree; ``fold`` casts a constant with DuckDB (value, type -> value)."""

    def __init__(
        self,
        schema: dict[str, pl.DataType],
        types: dict[int, str],
        consts: dict[int, tuple[Any, str]],
        fold: Any,
    ) -> None:
        self.schema = schema
        self.types = types
        self.consts = consts
        self.fold = fold
        self.lazy_depth = 0

    def __call__(self, node: dict[str, Any]) -> Typed:
        if id(node) in self.consts:
            return self._const(node)
        cls = node["class"]
        out: Typed
        if cls == "COLUMN_REF":
            out = self._column(node)
        elif cls == "COMPARISON":
            op = _COMPARE.get(node["type"])
            if op is None:
                raise Untranslatable(node["type"])
            out = self._compare(op, self(node["left"]), self(node["right"]))
        elif cls == "BETWEEN":
            x = self(node["input"])
            lo, hi = self(node["lower"]), self(node["upper"])
            out = Typed(
                self._compare("ge", x, lo).expr & self._compare("le", x, hi).expr, pl.Boolean()
            )
        elif cls == "CONJUNCTION":
            out = self._conjunction(node)
        elif cls == "OPERATOR":
            out = self._operator(node)
        elif cls == "CASE":
            out = self._case(node)
        elif cls == "CAST":
            out = self._cast(node)
        elif cls == "FUNCTION":
            out = self._function(node)
        else:
            raise Untranslatable(cls)
        want = self.types.get(id(node))
        if want is None or not same_type(want, out.dtype):
            raise Untranslatable(f"type {out.dtype} is not DuckDB's {want}")
        out.duck = want
        return out

    # ------------------------------------------------------------------ leaves

    def _column(self, node: dict[str, Any]) -> Typed:
        names = node["column_names"]
        if len(names) == 2 and names[0].lower() == "input":
            names = names[1:]
        if len(names) != 1:
            raise Untranslatable("qualified column")
        name = names[0]
        if name not in self.schema:
            matches = [c for c in self.schema if c.lower() == name.lower()]
            if len(matches) != 1:
                raise Untranslatable("column")
            name = matches[0]
        elif sum(c.lower() == name.lower() for c in self.schema) > 1:
            raise Untranslatable("ambiguous column")  # DuckDB refuses; let it say so
        return Typed(pl.col(name), self.schema[name])

    def _const(self, node: dict[str, Any]) -> Typed:
        value, duck = self.consts[id(node)]
        dtype = pl.Null() if duck.strip('"').upper() == "NULL" else duck_dtype(duck)
        if dtype is None:
            raise Untranslatable(f"constant of type {duck}")
        literal = "VALUE"
        if node.get("class") == "CONSTANT":
            kind = (node.get("literal") or {}).get("kind", "VALUE")
            literal = "NULL" if kind == "NULL_LITERAL" else kind
        elif value is None:
            literal = "NULL"
        if isinstance(value, float) and math.isnan(value):
            value = float("nan")
        return Typed(pl.lit(value, dtype=dtype), dtype, value, literal, duck)

    # ------------------------------------------------------------------ casting rules

    def _lit_as(self, c: Typed, target: pl.DataType) -> Typed:
        """A constant cast to ``target`` exactly the way DuckDB casts it implicitly."""
        value = c.value
        if value is None:
            return Typed(pl.lit(None, dtype=target), target, None, "NULL")
        if c.dtype == target:
            return c
        if c.literal == "STRING" and target != pl.String():
            folded = self.fold(value, target)
            if isinstance(target, pl.Datetime) and target.time_zone is not None:
                utc = pl.Datetime(target.time_unit, "UTC")
                expr = pl.lit(folded, dtype=utc).cast(target)
                return Typed(expr, target, folded, "VALUE")
            return Typed(pl.lit(folded, dtype=target), target, folded, "VALUE")
        if target.is_integer() and isinstance(value, int) and not isinstance(value, bool):
            lo, hi = _int_range(target)
            if lo <= value <= hi:
                return Typed(pl.lit(value, dtype=target), target, value, "VALUE")
        if target == pl.Float64() and isinstance(value, (int, decimal.Decimal)):
            exact = isinstance(value, int) and abs(value) <= 2**53
            if isinstance(value, decimal.Decimal):
                exact = len(value.as_tuple().digits) <= 15
            if exact and not isinstance(value, bool):
                f = float(value)
                return Typed(pl.lit(f, dtype=target), target, f, "VALUE")
        if isinstance(target, pl.Decimal) and isinstance(value, (int, decimal.Decimal)):
            d = decimal.Decimal(value)
            exp = d.as_tuple().exponent
            scale = target.scale or 0
            prec = target.precision or 38
            if (
                isinstance(exp, int)
                and -exp <= scale
                and abs(d) < decimal.Decimal(10) ** (prec - scale)
            ):
                return Typed(pl.lit(d, dtype=target), target, d, "VALUE")
        raise Untranslatable(f"constant {value!r} as {target}")

    @staticmethod
    def _numeric_target(a: pl.DataType, b: pl.DataType) -> pl.DataType:
        """DuckDB's common type for comparing two numeric columns (no decimals)."""
        if pl.Float64() in (a, b):
            return pl.Float64()
        if pl.Float32() in (a, b):
            return pl.Float32()
        if a.is_integer() and b.is_integer():
            if pl.UInt64() in (a, b):
                if a.is_signed_integer() or b.is_signed_integer():
                    # DuckDB compares UBIGINT with a signed integer as HUGEINT: left to it
                    raise Untranslatable("UBIGINT against a signed integer")
                return pl.UInt64()  # both unsigned: every value fits UBIGINT
            return pl.Int64()
        raise Untranslatable(f"{a} against {b}")

    def _compare(self, op: str, a: Typed, b: Typed) -> Typed:
        if a.const and b.const:
            raise Untranslatable("constant comparison")  # folded by DuckDB, never reached
        if a.const:
            op = _FLIP.get(op, op)
            a, b = b, a
        col, other = a, b  # ``col`` is not a constant
        if other.const:
            special = self._int_vs_fraction(op, col, other)
            if special is not None:
                return special
            target = self._const_target(col, other)
            other = self._lit_as(other, target)
            left = col.expr if col.dtype == target else col.expr.cast(target)
            return Typed(getattr(left, op)(other.expr), pl.Boolean())
        target = self._common(col.dtype, other.dtype)
        left = col.expr if col.dtype == target else col.expr.cast(target)
        right = other.expr if other.dtype == target else other.expr.cast(target)
        return Typed(getattr(left, op)(right), pl.Boolean())

    def _common(self, a: pl.DataType, b: pl.DataType) -> pl.DataType:
        if a == b:
            return a
        if a.is_numeric() and b.is_numeric():
            if isinstance(a, pl.Decimal) or isinstance(b, pl.Decimal):
                raise Untranslatable("decimal against another type")
            return self._numeric_target(a, b)
        if isinstance(a, (pl.Datetime, pl.Date)) and isinstance(b, (pl.Datetime, pl.Date)):
            tz_a = getattr(a, "time_zone", None)
            tz_b = getattr(b, "time_zone", None)
            units = {getattr(t, "time_unit", "us") for t in (a, b)}
            if "ns" in units or (tz_a is None) != (tz_b is None):
                raise Untranslatable("timestamps of different kinds")
            if tz_a is not None and pl.Date() in (a, b):
                raise Untranslatable("DATE against TIMESTAMPTZ")
            return pl.Datetime("us", tz_a)  # same instants whatever the zone label
        raise Untranslatable(f"{a} against {b}")

    def _const_target(self, col: Typed, c: Typed) -> pl.DataType:
        t = col.dtype
        if c.literal == "NULL":
            return t
        if c.literal == "STRING" or c.dtype == t:
            return t
        if isinstance(t, pl.Decimal):
            return t  # _lit_as refuses a constant that does not fit the column's decimal
        if t.is_numeric() and c.dtype.is_numeric():
            if isinstance(c.dtype, pl.Decimal):
                if t.is_float():
                    return pl.Float64() if t == pl.Float64() else _raise("FLOAT vs DECIMAL")
                return _raise("integer vs decimal constant")  # handled by _int_vs_fraction
            if t.is_float():
                return pl.Float64() if t == pl.Float64() else _raise("FLOAT vs integer")
            return t if isinstance(c.value, int) else self._numeric_target(t, c.dtype)
        return self._common(t, c.dtype)

    def _int_vs_fraction(self, op: str, col: Typed, c: Typed) -> Typed | None:
        """An integer column against a DECIMAL constant: compared exactly, as DuckDB does."""
        if not (col.dtype.is_integer() and isinstance(c.value, decimal.Decimal)):
            return None
        d = c.value
        if d == d.to_integral_value():
            whole = Typed(pl.lit(int(d)), pl.Int64(), int(d), "INTEGER")
            return self._compare(op, col, whole)
        lo, hi = _int_range(col.dtype)
        floor, ceil = math.floor(d), math.ceil(d)
        if not (lo <= floor and ceil <= hi):
            raise Untranslatable("constant out of range")
        present = col.expr.is_not_null()
        if op in ("eq", "eq_missing"):
            expr = pl.when(present).then(pl.lit(False)) if op == "eq" else pl.lit(False)
        elif op in ("ne", "ne_missing"):
            expr = pl.when(present).then(pl.lit(True)) if op == "ne" else pl.lit(True)
        elif op in ("lt", "le"):
            expr = col.expr <= pl.lit(floor, dtype=col.dtype)
        else:
            expr = col.expr >= pl.lit(ceil, dtype=col.dtype)
        return Typed(expr, pl.Boolean())

    # ------------------------------------------------------------------ logic

    def _lazy(self, node: dict[str, Any]) -> Typed:
        self.lazy_depth += 1
        try:
            return self(node)
        finally:
            self.lazy_depth -= 1

    def _conjunction(self, node: dict[str, Any]) -> Typed:
        parts = [self(node["children"][0]), *(self._lazy(c) for c in node["children"][1:])]
        if any(p.dtype != pl.Boolean() for p in parts):
            raise Untranslatable("non-boolean operand")
        expr = parts[0].expr
        for p in parts[1:]:
            expr = expr & p.expr if node["type"] == "CONJUNCTION_AND" else expr | p.expr
        return Typed(expr, pl.Boolean())

    def _operator(self, node: dict[str, Any]) -> Typed:
        kind = node["type"]
        kids = node["children"]
        if kind == "OPERATOR_NOT":
            x = self(kids[0])
            if x.dtype != pl.Boolean():
                raise Untranslatable("NOT of a non-boolean")
            return Typed(~x.expr, pl.Boolean())
        if kind == "OPERATOR_IS_NULL":
            return Typed(self(kids[0]).expr.is_null(), pl.Boolean())
        if kind == "OPERATOR_IS_NOT_NULL":
            return Typed(self(kids[0]).expr.is_not_null(), pl.Boolean())
        if kind in ("COMPARE_IN", "COMPARE_NOT_IN"):
            x = self(kids[0])
            if x.const:
                raise Untranslatable("constant IN")
            values = []
            for k in kids[1:]:
                c = self(k)
                if not c.const or c.value is None:
                    raise Untranslatable("IN with a non-constant or NULL")
                if isinstance(c.value, decimal.Decimal) and x.dtype.is_integer():
                    if c.value != c.value.to_integral_value():
                        continue  # can never be equal to an integer
                    c = Typed(pl.lit(int(c.value)), pl.Int64(), int(c.value), "INTEGER")
                values.append(self._lit_as(c, self._const_target(x, c)).value)
            target = x.dtype
            expr = x.expr.is_in(pl.lit(pl.Series(values, dtype=target)).implode())
            if not values:
                expr = pl.when(x.expr.is_not_null()).then(pl.lit(False))
            return Typed(~expr if kind == "COMPARE_NOT_IN" else expr, pl.Boolean())
        if kind == "OPERATOR_COALESCE":
            want = duck_dtype(self.types.get(id(node), ""))
            if want is None:
                raise Untranslatable("COALESCE type")
            args = [self(kids[0]), *(self._lazy(k) for k in kids[1:])]
            return Typed(pl.coalesce([self._as(a, want) for a in args]), want)
        raise Untranslatable(kind)

    def _as(self, x: Typed, target: pl.DataType) -> pl.Expr:
        """A value widened to ``target`` exactly (no value can change or fail)."""
        if x.const:
            return self._lit_as(x, target).expr
        if x.dtype == target:
            return x.expr
        if _widens(x.dtype, target):
            return x.expr.cast(target)
        raise Untranslatable(f"{x.dtype} as {target}")

    def _case(self, node: dict[str, Any]) -> Typed:
        want = duck_dtype(self.types.get(id(node), ""))
        if want is None:
            raise Untranslatable("CASE type")
        checks = node["case_checks"]
        first = checks[0]
        cond = self(first["when_expr"])
        if cond.dtype != pl.Boolean():
            raise Untranslatable("non-boolean WHEN")
        chain: Any = pl.when(cond.expr).then(self._as(self._lazy(first["then_expr"]), want))
        for check in checks[1:]:
            c = self._lazy(check["when_expr"])
            if c.dtype != pl.Boolean():
                raise Untranslatable("non-boolean WHEN")
            chain = chain.when(c.expr).then(self._as(self._lazy(check["then_expr"]), want))
        out: pl.Expr = chain.otherwise(self._as(self._lazy(node["else_expr"]), want))
        return Typed(out, want)

    # ------------------------------------------------------------------ casts and functions

    def _cast(self, node: dict[str, Any]) -> Typed:
        x = self(node["child"])
        want = duck_dtype(self.types.get(id(node), ""))
        if want is None:
            raise Untranslatable("CAST target")
        if x.dtype == want:
            return Typed(x.expr, want)
        if _widens(x.dtype, want):
            return Typed(x.expr.cast(want), want)
        if isinstance(x.dtype, pl.Datetime) and want == pl.Date():
            return Typed(_utc(x).dt.date(), want)
        if x.dtype == pl.Date() and isinstance(want, pl.Datetime) and want.time_zone is None:
            return Typed(x.expr.cast(want), want)
        raise Untranslatable(f"CAST {x.dtype} AS {want}")

    def _function(self, node: dict[str, Any]) -> Typed:
        name = str(node["function_name"]).lower()
        args = node.get("arguments") or []
        want = duck_dtype(self.types.get(id(node), ""))
        if want is None:
            raise Untranslatable(f"{name} type")
        if name in ("+", "-", "*", "/"):
            return self._arith(name, [self(a["expression"]) for a in args], want)
        if name in ("date_part", "datepart", "date_trunc", "datetrunc"):
            part = self(args[0]["expression"])
            if not part.const or not isinstance(part.value, str) or len(args) != 2:
                raise Untranslatable("non-constant date part")
            x = self(args[1]["expression"])
            if name.startswith("date_p") or name == "datepart":
                return self._part(part.value.lower(), x, want)
            return self._trunc(part.value.lower(), x, want)
        vals = [self(a["expression"]) for a in args]
        if name in _PARTS and len(vals) == 1:
            return self._part(name, vals[0], want)
        if name in ("~~", "!~~"):
            return self._like(name == "!~~", vals)
        if name in ("starts_with", "prefix", "ends_with", "suffix", "contains"):
            s, sub = vals
            if s.dtype != pl.String() or not sub.const or not isinstance(sub.value, str):
                raise Untranslatable(name)
            method = {"prefix": "starts_with", "suffix": "ends_with"}.get(name, name)
            if method == "contains":
                return Typed(s.expr.str.contains(sub.value, literal=True), pl.Boolean())
            return Typed(getattr(s.expr.str, method)(sub.value), pl.Boolean())
        if name == "||":
            if any(v.dtype != pl.String() for v in vals):
                raise Untranslatable("|| of non-strings")
            return Typed(pl.concat_str([v.expr for v in vals]), pl.String())
        if name == "length" and len(vals) == 1 and vals[0].dtype == pl.String():
            return Typed(vals[0].expr.str.len_chars().cast(pl.Int64), pl.Int64())
        if name in ("floor", "ceil", "ceiling", "round", "abs") and vals:
            return self._math(name, vals, want)
        raise Untranslatable(name)

    def _arith(self, op: str, vals: list[Typed], want: pl.DataType) -> Typed:
        parts_type: pl.DataType = want
        if want.is_float():
            parts = [self._lit_as(v, want).expr if v.const else v.expr.cast(want) for v in vals]
            if any(
                not (v.dtype.is_numeric() and not isinstance(v.dtype, pl.Decimal))
                for v in vals
                if not v.const
            ):
                raise Untranslatable("non-numeric operand")
        elif want.is_integer() and op != "/":
            parts_type = pl.Int128()
            if self.lazy_depth:
                raise Untranslatable("integer arithmetic in a conditional context")
            if any(not v.dtype.is_integer() for v in vals if not v.const):
                raise Untranslatable("non-integer operand")
            wide = pl.Int128()
            parts = [
                self._lit_as(v, pl.Int64()).expr.cast(wide) if v.const else v.expr.cast(wide)
                for v in vals
            ]
        else:
            raise Untranslatable(f"arithmetic giving {want}")
        if len(parts) == 1:
            if op != "-":
                raise Untranslatable(op)
            out = pl.lit(0, dtype=parts_type) - parts[0]
        else:
            a, b = parts
            out = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
        if want.is_integer():
            out = out.cast(want, strict=True)  # overflow: an error, as in DuckDB
        return Typed(out, want)

    def _math(self, name: str, vals: list[Typed], want: pl.DataType) -> Typed:
        x = vals[0]
        if x.const or not x.dtype.is_numeric() or isinstance(x.dtype, pl.Decimal):
            raise Untranslatable(name)
        if name == "round":
            if len(vals) == 2 and not (vals[1].const and vals[1].value == 0):
                raise Untranslatable("round to decimals")
            if x.dtype.is_integer():
                return Typed(x.expr, x.dtype)
            return Typed(x.expr.round(0, mode="half_away_from_zero"), x.dtype)
        if len(vals) != 1:
            raise Untranslatable(name)
        if name == "abs":
            if x.dtype.is_float():
                return Typed(x.expr.abs(), x.dtype)
            if self.lazy_depth:
                raise Untranslatable("integer abs in a conditional context")
            return Typed(x.expr.cast(pl.Int128()).abs().cast(want, strict=True), want)
        if x.dtype.is_integer():
            return Typed(x.expr, x.dtype)
        return Typed(x.expr.floor() if name == "floor" else x.expr.ceil(), x.dtype)

    def _part(self, part: str, x: Typed, want: pl.DataType) -> Typed:
        if part not in _PARTS or not isinstance(x.dtype, (pl.Datetime, pl.Date)):
            raise Untranslatable(f"date part {part}")
        if x.dtype == pl.Date() and part in ("hour", "minute", "second"):
            raise Untranslatable("time part of a date")
        expr = getattr(_utc(x).dt, _PARTS[part])()
        return Typed(expr.cast(want), want)

    def _trunc(self, part: str, x: Typed, want: pl.DataType) -> Typed:
        if part not in _TRUNC or not isinstance(x.dtype, (pl.Datetime, pl.Date)):
            raise Untranslatable(f"date_trunc {part}")
        expr = _utc(x).dt.truncate(_TRUNC[part])
        if x.dtype == pl.Date():
            if part in ("second", "minute", "hour"):
                raise Untranslatable("date_trunc of a date by a time unit")
            expr = expr.cast(want) if want != pl.Date() else expr
            return Typed(expr, want)
        dtype: pl.DataType = x.dtype
        if isinstance(x.dtype, pl.Datetime) and x.dtype.time_zone is not None:
            dtype = pl.Datetime(x.dtype.time_unit, "UTC")
        if dtype != want:
            expr, dtype = expr.cast(want), want
        return Typed(expr, dtype)

    def _like(self, negate: bool, vals: list[Typed]) -> Typed:
        s, pattern = vals
        if s.dtype != pl.String() or not pattern.const or not isinstance(pattern.value, str):
            raise Untranslatable("LIKE")
        p = pattern.value
        inner = p.strip("%")
        if "_" not in p and "%" not in inner:
            starts, ends = p.startswith("%"), p.endswith("%")
            if starts and ends:
                expr = s.expr.str.contains(inner, literal=True)
            elif ends:
                expr = s.expr.str.starts_with(inner)
            elif starts:
                expr = s.expr.str.ends_with(inner)
            else:
                expr = s.expr == pl.lit(inner)
        else:
            regex = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in p)
            expr = s.expr.str.contains(f"^(?s:{regex})$")
        return Typed(~expr if negate else expr, pl.Boolean())


def _widens(a: pl.DataType, b: pl.DataType) -> bool:
    """Is every value of ``a`` exactly a value of ``b`` (the casts DuckDB makes silently)?"""
    if a.is_integer() and b.is_integer():
        lo_a, hi_a = _int_range(a)
        lo_b, hi_b = _int_range(b)
        return lo_b <= lo_a and hi_a <= hi_b
    if a.is_integer() and b.is_float():
        return True  # rounded to nearest, the same in DuckDB and Polars
    return a == pl.Float32() and b == pl.Float64()


def _int_range(dtype: pl.DataType) -> tuple[int, int]:
    found = _INT_RANGES.get(type(dtype))
    if found is None:
        raise Untranslatable(f"integer type {dtype}")
    return found


def _utc(x: Typed) -> pl.Expr:
    """Calendar maths on TIMESTAMPTZ happen in the session zone, UTC."""
    if isinstance(x.dtype, pl.Datetime) and x.dtype.time_zone is not None:
        return x.expr.dt.convert_time_zone("UTC")
    return x.expr


def _raise(why: str) -> pl.DataType:
    raise Untranslatable(why)
