"""Import Open Data Contract Standard (ODCS v3) documents into Sluice contracts.

::

    result = import_odcs("orders.odcs.yaml")
    for contract in result.contracts:       # one per ODCS schema object (table)
        print(dump_contract(contract))
    result.unsupported                      # what Sluice cannot enforce, with its location
    result.notes                            # what was mapped, and how (lossy choices)

Mapping (ODCS -> Sluice):

- ``schema[i]`` (an object with ``properties``) -> one :class:`Contract` named after the object,
  ``version`` from the document. Objects without properties are reported, not imported; a
  document with nothing importable raises :class:`ConfigError`.
- ``properties[j]`` -> :class:`FieldSpec`: ``logicalType``/``physicalType`` -> Sluice type,
  ``required``, ``unique``, ``primaryKey`` (one key column -> required + unique; a composite key
  -> each column required, the combination reported as not enforced), ``logicalTypeOptions``
  (minimum/maximum, exclusive bounds where exact, minLength/maxLength, pattern, format email/uuid,
  enum), ``varchar(n)`` -> max_length, classification/tags/customProperties -> ``pii``.
- ``quality`` rules: library metrics (nullValues, missingValues, invalidValues, duplicateValues,
  rowCount) map to field checks, :class:`Completeness`, :class:`RowCount` or a counting
  :class:`SqlRule` where the meaning is exact; ``type: sql`` -> :class:`SqlRule` with the
  ``${object}``/``${property}`` placeholders replaced by ``input`` and the column. Everything else
  (text, custom, percent units...) is listed in ``unsupported``. A sql rule is answered over
  the whole input (see :mod:`sluice.quality.sqlrules`), whatever its query computes.

Before any mapping, the document is validated against the ODCS JSON Schema (v3.1.0, shipped in
``sluice/quality/schemas``): every violation (a missing ``status``, an unknown top-level key,
``required: "yes"``...) is reported with its JSON path, and the document is refused. A value the
schema allows but Sluice cannot read (a pattern Python cannot compile, a date bound that is not
a date, a SQL placeholder where there is no column) is an error too, never a check dropped
silently; what Sluice does not enforce by design (text rules, custom engines, percent units...)
is listed in ``unsupported``.

YAML is read with dates kept as strings, as the ODCS JSON Schema expects.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from sluice.errors import ConfigError
from sluice.quality.contract import (
    Completeness,
    Contract,
    FieldSpec,
    RowCount,
    SqlRule,
)

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError as SchemaViolation
    from jsonschema.protocols import Validator

__all__ = ["ODCS_SCHEMA", "ImportResult", "dump_contract", "import_odcs", "schema_problems"]

# The ODCS JSON Schema, shipped as package data (sluice/quality/schemas): v3.1.0, copied
# unchanged from bitol-io/open-data-contract-standard, schema/odcs-json-schema-v3.1.0.json
# (commit e6a1c66ffc08, Apache License 2.0; see schemas/README.md). ODCS v3.0.x documents
# validate against it too (3.1.0 only adds optional keys).
ODCS_SCHEMA = "odcs-json-schema-v3.1.0.json"
_SPEC_URL = "https://bitol-io.github.io/open-data-contract-standard/"


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_odcs` produced: the contracts, and what could not be carried over."""

    contracts: list[Contract]
    unsupported: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _DateAsStringLoader(yaml.SafeLoader):
    """A safe loader that keeps ``2022-10-03`` as the string it is (the ODCS schema says so);
    :func:`~sluice.config.yamlsafe.load_yaml` runs it on libyaml's parser when installed."""


_DateAsStringLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

# Top-level sections that describe operations, not data: reported as not enforced.
_DOC_SECTIONS = (
    "servers",
    "slaProperties",
    "slaDefaultElement",
    "roles",
    "team",
    "stakeholders",
    "price",
    "support",
)
# Descriptive metadata with no effect on checks: mentioned in the notes.
_META_TOP = {
    "apiVersion",
    "kind",
    "id",
    "version",
    "status",
    "name",
    "domain",
    "dataProduct",
    "tenant",
    "description",
    "tags",
    "contractCreatedTs",
    "authoritativeDefinitions",
    "customProperties",
    "schema",
}
_META_OBJECT = {
    "id",
    "name",
    "physicalName",
    "physicalType",
    "businessName",
    "description",
    "authoritativeDefinitions",
    "tags",
    "dataGranularityDescription",
    "customProperties",
    "logicalType",
    "properties",
    "quality",
    "relationships",
}
_META_PROPERTY = {
    "id",
    "businessName",
    "authoritativeDefinitions",
    "tags",
    "partitioned",
    "partitionKeyPosition",
    "primaryKeyPosition",
    "criticalDataElement",
    "transformSourceObjects",
    "transformLogic",
    "transformDescription",
    "examples",
    "encryptedName",
    "customProperties",
    "physicalName",
    "classification",
}
_HANDLED_PROPERTY = {
    "name",
    "logicalType",
    "physicalType",
    "logicalTypeOptions",
    "required",
    "unique",
    "primaryKey",
    "description",
    "quality",
    "relationships",
    "items",
    "properties",
}

PII_CLASSIFICATIONS = frozenset({"restricted", "confidential", "pii", "sensitive"})
PII_TAGS = frozenset({"pii", "sensitive"})
PII_RULE = (
    "a field is marked pii when its classification is one of "
    f"{sorted(PII_CLASSIFICATIONS)}, when it is tagged {sorted(PII_TAGS)}, or when it has "
    "a custom property pii: true"
)

_INT_PHYSICAL = {
    "int",
    "integer",
    "int2",
    "int4",
    "int8",
    "smallint",
    "bigint",
    "serial",
    "smallserial",
    "bigserial",
    "serial2",
    "serial4",
    "serial8",
    "tinyint",
    "long",
    "short",
    "byte",
    "int16",
    "int32",
    "int64",
    "mediumint",
}
_INT_FORMAT = {
    "i8": "int8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
    "u32": "uint32",
    "u64": "uint64",
}
_FLOAT_FORMAT = {"f32": "float32", "f64": "double"}
_DECIMAL = re.compile(r"^(?:decimal|numeric|number)\s*\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)$", re.I)
_VARCHAR = re.compile(
    r"^(?:varchar|character varying|nvarchar|char|character|nchar|bpchar|string)"
    r"\s*[\(\[]\s*(\d+)\s*[\)\]]$",
    re.I,
)
_COUNT_QUERY = re.compile(r"^\s*select\s+count\s*\(", re.I)
_FORMAT_PATTERNS = {
    "email": r"[^@\s]+@[^@\s]+\.[^@\s]+",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
_OPERATORS = (
    "mustBe",
    "mustNotBe",
    "mustBeGreaterThan",
    "mustBeGreaterOrEqualTo",
    "mustBeLessThan",
    "mustBeLessOrEqualTo",
    "mustBeBetween",
    "mustNotBeBetween",
)
# ODCS v3.0 used ``rule`` with other names for some of the library metrics.
_METRIC_ALIASES = {
    "nullCheck": "nullValues",
    "duplicateCount": "duplicateValues",
    "validValues": "invalidValues",
    "rowCount": "rowCount",
}


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if _is_number(v):
        return repr(_num(v))
    return "'" + str(v).replace("'", "''") + "'"


def _action(rule: dict[str, Any], loc: str, notes: list[str]) -> str:
    sev = str(rule.get("severity", "error")).strip().lower()
    if sev in ("warning", "warn", "info"):
        return "warn"
    if sev not in ("error", "critical", "fatal"):
        notes.append(
            f"{loc}: severity {rule.get('severity')!r} is not one of error/warning/info; "
            "treated as error (action: fail)"
        )
    return "fail"


def _operator(rule: dict[str, Any]) -> tuple[str, Any] | None:
    found = [(k, rule[k]) for k in _OPERATORS if k in rule]
    return found[0] if len(found) == 1 else None


def _count_bounds(op: str, v: Any, *, count: bool) -> dict[str, float] | None:
    """``{"must_be": x}`` or ``{"max": x}`` for a non-negative additive count, when exact."""
    if op == "mustBeBetween" and isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)):
        lo, hi = v
        return {"max": float(hi)} if count and lo <= 0 else None
    if not _is_number(v):
        return None
    if op == "mustBe":
        return {"must_be": float(v)}
    if op == "mustBeLessOrEqualTo":
        return {"max": float(v)}
    if op == "mustBeLessThan" and count and float(v).is_integer():
        return {"max": float(v) - 1}
    return None


def _row_bounds(op: str, v: Any) -> dict[str, int] | None:
    """Row count operator -> Bounds(min, max), when exact."""
    if op == "mustBeBetween" and isinstance(v, list) and len(v) == 2:
        lo, hi = v
        if _is_number(lo) and _is_number(hi) and float(lo).is_integer() and float(hi).is_integer():
            return {"min": max(int(lo), 0), "max": int(hi)} if hi >= 0 else None
        return None
    if not (_is_number(v) and float(v).is_integer()):
        return None
    n = int(v)
    bounds = {
        "mustBe": {"min": n, "max": n},
        "mustBeGreaterThan": {"min": n + 1},
        "mustBeGreaterOrEqualTo": {"min": n},
        "mustBeLessThan": {"max": n - 1},
        "mustBeLessOrEqualTo": {"max": n},
    }.get(op)
    if bounds is None or bounds.get("max", 0) < 0:
        return None
    return {k: max(b, 0) for k, b in bounds.items()}


def _describe(rule: dict[str, Any]) -> str:
    op = _operator(rule)
    text = f" {op[0]} {op[1]!r}" if op else ""
    unit = rule.get("unit")
    return text + (f" with unit {unit}" if unit else "")


class _Ctx:
    """State while importing one schema object."""

    def __init__(self, doc_where: str, obj: dict[str, Any], idx: int) -> None:
        self.where = doc_where
        self.obj = obj
        self.obj_loc = f"schema[{idx}]"
        self.obj_name = str(obj.get("name") or obj.get("physicalName") or f"object_{idx}")
        self.fields: dict[str, dict[str, Any]] = {}
        self.rules: list[Any] = []
        self.unsupported: list[str] = []
        self.notes: list[str] = []
        self.meta_keys: set[str] = set()

    def refuse(self, loc: str, problem: str, fix: str) -> ConfigError:
        """A value Sluice cannot map: an error naming its JSON path, never a dropped check."""
        return _refuse(self.where, loc, problem, fix)

    # -- rules shared by property-level and object-level quality ---------------------------
    def sql_rule(self, rule: dict[str, Any], loc: str, col: str | None, name: str) -> None:
        query = str(rule.get("query") or "").strip()
        if not query:
            raise self.refuse(loc, "a sql rule without a query", "give the rule its 'query'")
        for ph in ("${object}", "${table}", "{object}", "{table}"):
            query = query.replace(ph, "input")
        if col is not None:
            for ph in ("${property}", "${column}", "{property}", "{column}"):
                query = query.replace(ph, _quote_ident(col))
        elif re.search(r"\$?\{(property|column)\}", query):
            raise self.refuse(
                loc,
                "the sql rule uses a ${property} placeholder at object level, where there is "
                "no property to put in",
                "move the rule under the property it checks, or write the column name",
            )
        names = {str(n) for n in (self.obj.get("name"), self.obj.get("physicalName")) if n}
        for n in sorted(names, key=len, reverse=True):
            rx = re.compile(r"(?i)\b(from|join)\s+(\"?)" + re.escape(n) + r"\2(?![\w.])")
            if rx.search(query):
                query = rx.sub(lambda m: f"{m.group(1)} input", query)
                self.notes.append(
                    f"{loc}: table {n!r} in the query replaced by 'input' (the batch being checked)"
                )
        op = _operator(rule)
        count = bool(_COUNT_QUERY.match(query))
        bounds = _count_bounds(*op, count=count) if op else None
        if bounds is None:
            self.unsupported.append(
                f"{loc}: sql rule{_describe(rule)} is not enforced (Sluice "
                "compares a query result with must_be or max only)"
            )
            return
        if op and op[0] == "mustBeLessThan":
            self.notes.append(f"{loc}: mustBeLessThan {op[1]} on a count -> max {op[1] - 1}")
        action = _action(rule, loc, self.notes)
        self.rules.append(
            SqlRule(sql=query, name=str(rule.get("name") or name), action=action, **bounds)
        )

    def row_count(self, rule: dict[str, Any], loc: str) -> None:
        op = _operator(rule)
        bounds = _row_bounds(*op) if op else None
        if bounds is None or str(rule.get("unit", "rows")).lower() not in ("rows", "row"):
            self.unsupported.append(f"{loc}: metric 'rowCount'{_describe(rule)} is not enforced")
            return
        action = _action(rule, loc, self.notes)
        self.rules.append(RowCount.model_validate({"row_count": bounds, "action": action}))
        self.notes.append(f"{loc}: rowCount{_describe(rule)} -> row_count {bounds}")

    def count_sql(self, rule: dict[str, Any], loc: str, col: str, metric: str, cond: str) -> bool:
        """A row-unit count metric -> SqlRule counting the bad rows (exact: counts add up)."""
        op = _operator(rule)
        bounds = _count_bounds(*op, count=True) if op else None
        if bounds is None or str(rule.get("unit", "rows")).lower() not in ("rows", "row"):
            return False
        sql = f"SELECT count(*) FROM input WHERE {cond}"
        action = _action(rule, loc, self.notes)
        self.rules.append(
            SqlRule(
                sql=sql, name=str(rule.get("name") or f"{col}.{metric}"), action=action, **bounds
            )
        )
        self.notes.append(f"{loc}: {metric}{_describe(rule)} -> sql rule counting the rows")
        return True

    def row_check(
        self, rule: dict[str, Any], loc: str, col: str, check: str, update: dict[str, Any]
    ) -> None:
        """Set a field check from a quality rule; severity warning/info -> that check warns."""
        spec = self.fields[col]
        already = all(spec.get(k) == v for k, v in update.items())
        spec.update(update)
        if _action(rule, loc, self.notes) == "warn":
            if already:
                self.notes.append(
                    f"{loc}: severity {rule.get('severity')} ignored: the property "
                    f"already declares {check} (kept strict)"
                )
            else:
                spec.setdefault("actions", {})[check] = "warn"
        self.notes.append(f"{loc}: {rule_name(rule)}{_describe(rule)} -> {col}.{check}")

    def library(self, rule: dict[str, Any], loc: str, col: str | None) -> None:
        raw = rule.get("metric") or rule.get("rule")
        metric = str(raw) if raw is not None else ""
        if "metric" not in rule and metric in _METRIC_ALIASES:
            metric = _METRIC_ALIASES[metric]
            self.notes.append(f"{loc}: deprecated 'rule: {raw}' read as metric {metric}")
        args = rule.get("arguments") or {}
        if not isinstance(args, dict):
            args = {}
        if metric == "validValues" or ("validValues" in rule and "validValues" not in args):
            args = {**args, "validValues": rule.get("validValues")}
        op = _operator(rule)
        unit = str(rule.get("unit", "rows")).lower()
        zero = op is not None and op[0] == "mustBe" and _is_number(op[1]) and op[1] == 0
        zero = zero or (
            op is not None and op[0] == "mustBeLessThan" and op[1] == 1 and unit in ("rows", "row")
        )
        if metric == "rowCount":
            self.row_count(rule, loc)
            return
        if col is None and metric == "duplicateValues":
            props = args.get("properties") or []
            if isinstance(props, list) and len(props) == 1 and props[0] in self.fields:
                col = str(props[0])
        if col is None:
            self.unsupported.append(
                f"{loc}: object-level metric {metric!r}{_describe(rule)} is not enforced"
            )
            return
        q = _quote_ident(col)
        if metric == "nullValues":
            if zero:
                self.row_check(rule, loc, col, "required", {"required": True})
                return
            if (
                unit in ("percent", "%")
                and op
                and op[0] in ("mustBeLessOrEqualTo", "mustBeBetween")
            ):
                x = op[1][1] if op[0] == "mustBeBetween" else op[1]
                lo_ok = op[0] != "mustBeBetween" or op[1][0] <= 0
                if _is_number(x) and 0 <= x <= 100 and lo_ok:
                    pct = f"{_num(100 - float(x))}%"
                    self.rules.append(
                        Completeness(
                            completeness=pct, columns=[col], action=_action(rule, loc, self.notes)
                        )
                    )
                    self.notes.append(
                        f"{loc}: nullValues{_describe(rule)} -> completeness {pct} of {col}"
                    )
                    return
            if self.count_sql(rule, loc, col, metric, f"{q} IS NULL"):
                return
        elif metric == "missingValues":
            missing = args.get("missingValues", [None])
            if not isinstance(missing, list):
                missing = [missing]
            non_null = [m for m in missing if m is not None]
            if not non_null:
                self.notes.append(f"{loc}: missingValues with only null read as nullValues")
                self.library({**rule, "metric": "nullValues", "arguments": {}}, loc, col)
                return
            cond = f"{q} IS NULL OR {q} IN ({', '.join(map(_sql_literal, non_null))})"
            if (zero or unit in ("rows", "row")) and self.count_sql(
                {**rule, "unit": "rows"}, loc, col, metric, cond
            ):
                return
        elif metric == "invalidValues":
            valid = args.get("validValues")
            pattern = args.get("pattern")
            if isinstance(valid, list) and valid:
                non_null = [v for v in valid if v is not None]
                if zero and non_null:
                    self.row_check(rule, loc, col, "enum", {"enum": non_null})
                    if None not in valid:
                        self.notes.append(
                            f"{loc}: nulls are not checked by enum; add "
                            "required: true if nulls are invalid"
                        )
                    return
                cond = f"{q} IS NOT NULL AND {q} NOT IN ({', '.join(map(_sql_literal, non_null))})"
                if non_null and self.count_sql(rule, loc, col, metric, cond):
                    return
            elif isinstance(pattern, str) and pattern:
                if zero:
                    self.row_check(rule, loc, col, "pattern", {"pattern": pattern})
                    self.notes.append(f"{loc}: Sluice patterns must match the whole value")
                    return
                cond = f"{q} IS NOT NULL AND NOT regexp_full_match({q}, {_sql_literal(pattern)})"
                if self.count_sql(rule, loc, col, metric, cond):
                    return
        elif metric == "duplicateValues" and zero:
            self.row_check(rule, loc, col, "unique", {"unique": True})
            return
        self.unsupported.append(f"{loc}: metric {metric or raw!r}{_describe(rule)} is not enforced")

    def quality(self, rules: Any, loc: str, col: str | None) -> None:
        if not isinstance(rules, list):
            raise self.refuse(f"{loc}.quality", "not a list", "make 'quality' a list of rules")
        for k, rule in enumerate(rules):
            rloc = f"{loc}.quality[{k}]"
            if not isinstance(rule, dict):
                raise self.refuse(
                    rloc,
                    "a quality rule that is not a mapping",
                    "write the rule as a mapping (type, metric, mustBe...)",
                )
            kind = str(rule.get("type") or "library").lower()
            if kind == "library" or (kind not in ("sql", "text", "custom") and "metric" in rule):
                self.library(rule, rloc, col)
            elif kind == "sql":
                self.sql_rule(rule, rloc, col, f"{col or self.obj_name}.quality[{k}]")
            elif kind == "custom":
                self.unsupported.append(
                    f"{rloc}: custom rule for engine {rule.get('engine')!r} is not enforced"
                )
            elif kind == "text":
                self.unsupported.append(
                    f"{rloc}: text rule is documentation only, not enforced"
                    + (f" ({rule['description']})" if rule.get("description") else "")
                )
            else:
                self.unsupported.append(f"{rloc}: quality rule type {kind!r} is not enforced")


def rule_name(rule: dict[str, Any]) -> str:
    return str(rule.get("metric") or rule.get("rule") or rule.get("type") or "rule")


def _map_type(prop: dict[str, Any], loc: str, name: str, ctx: _Ctx) -> str | None:
    logical = str(prop.get("logicalType") or "").strip().lower()
    physical = str(prop.get("physicalType") or "").strip()
    phys = physical.lower()
    raw_opts = prop.get("logicalTypeOptions")
    opts: dict[str, Any] = raw_opts if isinstance(raw_opts, dict) else {}
    if not logical:
        guess = {
            "string": "string",
            "varchar": "string",
            "text": "string",
            "boolean": "boolean",
            "bool": "boolean",
            "date": "date",
            "timestamp": "timestamp",
            "double": "number",
            "float": "number",
            "time": "time",
        }
        if phys in _INT_PHYSICAL:
            logical = "integer"
        elif _DECIMAL.match(phys):
            logical = "number"
        elif _VARCHAR.match(phys):
            logical = "string"
        else:
            logical = guess.get(phys, "")
        if not logical:
            ctx.notes.append(
                f"{loc} {name!r}: no logicalType"
                + (f" and physicalType {physical!r} is not recognised" if phys else "")
                + "; the field is not type-checked"
            )
            return None
        ctx.notes.append(
            f"{loc} {name!r}: no logicalType; {logical} inferred from physicalType {physical!r}"
        )
    tz = opts.get("timezone") is True or "tz" in phys or "with time zone" in phys
    if logical == "string":
        return "string"
    if logical == "boolean":
        return "bool"
    if logical == "integer":
        fmt = opts.get("format")
        if fmt in _INT_FORMAT:
            return _INT_FORMAT[str(fmt)]
        return "int"
    if logical == "number":
        fmt = opts.get("format")
        m = _DECIMAL.match(phys)
        if m:
            p, s = int(m.group(1)), int(m.group(2) or 0)
            if 1 <= p <= 38 and s <= p:
                return f"decimal({p},{s})"
            ctx.notes.append(
                f"{loc} {name!r}: physicalType {physical!r} is outside decimal(38) "
                "-> double (lossy)"
            )
            return "double"
        if phys in _INT_PHYSICAL:
            ctx.notes.append(
                f"{loc} {name!r}: logicalType number with integer physicalType {physical!r} -> int"
            )
            return "int"
        if fmt in _FLOAT_FORMAT:
            return _FLOAT_FORMAT[str(fmt)]
        if phys in ("numeric", "decimal", "money", "number"):
            ctx.notes.append(
                f"{loc} {name!r}: physicalType {physical!r} without precision -> "
                "double (lossy for exact decimals)"
            )
        return "double"
    if logical == "date":
        if phys.startswith(("timestamp", "datetime")):
            ctx.notes.append(
                f"{loc} {name!r}: logicalType date with physicalType {physical!r} "
                f"-> {'timestamptz' if tz else 'timestamp'}"
            )
            return "timestamptz" if tz else "timestamp"
        if phys.startswith("time"):
            ctx.notes.append(
                f"{loc} {name!r}: logicalType date with physicalType {physical!r} "
                "-> string (Sluice has no time-of-day type)"
            )
            return "string"
        return "date"
    if logical == "timestamp":
        if tz:
            ctx.notes.append(f"{loc} {name!r}: timestamp with time zone -> timestamptz (UTC)")
        return "timestamptz" if tz else "timestamp"
    if logical == "time":
        ctx.notes.append(
            f"{loc} {name!r}: logicalType time -> string (Sluice has no time-of-day "
            "type; values are kept as text)"
        )
        return "string"
    if logical in ("object", "array"):
        ctx.unsupported.append(
            f"{loc} {name!r}: logicalType {logical!r}"
            + (f" (physicalType {physical!r})" if physical else "")
            + " is not supported; the field is kept without a type"
        )
        return None
    ctx.unsupported.append(
        f"{loc} {name!r}: logicalType {prop.get('logicalType')!r} is unknown; "
        "the field is kept without a type"
    )
    return None


def _iso_date(v: Any) -> date | None:
    try:
        return date.fromisoformat(str(v).strip())
    except ValueError:
        return None


def _iso_timestamp(v: Any) -> str | None:
    text = str(v).strip()
    if re.match(r"^\d{4}-\d{2}-\d{2} \d", text):
        text = text.replace(" ", "T", 1)
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return None
    return text


def _options(prop: dict[str, Any], spec: dict[str, Any], loc: str, name: str, ctx: _Ctx) -> None:
    opts = prop.get("logicalTypeOptions")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise ctx.refuse(
            f"{loc}.logicalTypeOptions", "not a mapping", "write the options as a mapping"
        )
    stype = spec.get("type")
    oloc = f"{loc}.logicalTypeOptions"
    if stype is None:
        if opts:
            ctx.unsupported.append(
                f"{oloc} ({', '.join(sorted(opts))}) on an untyped field is not enforced"
            )
        return
    logical = str(prop.get("logicalType") or "").lower()
    is_int = stype.startswith(("int", "uint"))
    is_num = is_int or stype in ("double", "float32") or stype.startswith("decimal")
    is_date = stype == "date"
    is_ts = stype.startswith("timestamp")
    is_time = logical == "time" or (stype == "string" and logical == "date")
    for key, value in opts.items():
        where = f"{oloc}.{key}"
        if is_time and key == "timezone" and value is False:
            continue  # a time of day without a zone: nothing to check
        if is_time:
            ctx.unsupported.append(f"{where} = {value!r} on a time of day is not enforced")
        elif key in ("minLength", "maxLength") and stype == "string":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                spec["min_length" if key == "minLength" else "max_length"] = value
            else:
                raise ctx.refuse(where, f"{value!r} is not a length", "give a whole number >= 0")
        elif key == "pattern" and stype == "string":
            problem = _pattern_problem(str(value))
            if problem:
                raise ctx.refuse(
                    where,
                    f"pattern {value!r} cannot be used by Sluice's regular expression engine "
                    f"({problem})",
                    "rewrite the pattern without look-around or back-references",
                )
            spec["pattern"] = str(value)
            ctx.notes.append(
                f"{where}: pattern {value!r} kept as written; Sluice requires the "
                "whole value to match (ECMA patterns match anywhere): write "
                "'.*(...).*' for a substring match"
            )
        elif key == "format" and stype == "string":
            fmt = str(value).lower()
            if fmt in _FORMAT_PATTERNS and "pattern" not in opts:
                spec["pattern"] = _FORMAT_PATTERNS[fmt]
                ctx.notes.append(f"{where}: format {value!r} -> pattern {_FORMAT_PATTERNS[fmt]!r}")
            else:
                ctx.unsupported.append(f"{where} {value!r} is not enforced")
        elif key == "format" and is_num and (value in _INT_FORMAT or value in _FLOAT_FORMAT):
            ctx.notes.append(f"{where} {value!r} -> type {stype}")
        elif key == "timezone" and is_ts:
            continue  # read by _map_type
        elif key in ("minimum", "maximum") and (is_num or is_date or is_ts):
            target = "min" if key == "minimum" else "max"
            if is_num and _is_number(value):
                spec[target] = _num(value)
            elif is_date and _iso_date(value) is not None:
                spec[target] = str(_iso_date(value))
            elif is_ts and _iso_timestamp(value) is not None:
                spec[target] = _iso_timestamp(value)
                if spec[target] != value:
                    ctx.notes.append(f"{where} {value!r} -> {spec[target]!r} (ISO 8601)")
            else:
                raise ctx.refuse(
                    where,
                    f"{value!r} cannot be read as a {stype}",
                    "write a number, or an ISO date / timestamp ('2024-01-31', "
                    "'2024-01-31T12:00:00')",
                )
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and (is_int or is_date):
            target, step = ("min", 1) if key == "exclusiveMinimum" else ("max", -1)
            if is_int and _is_number(value):
                # the next whole number inside the bound: exact for integers
                spec[target] = math.floor(value) + 1 if step > 0 else math.ceil(value) - 1
            elif is_date and _iso_date(value) is not None:
                d = _iso_date(value)
                assert d is not None
                spec[target] = str(d + timedelta(days=step))
            else:
                raise ctx.refuse(
                    where,
                    f"{value!r} cannot be read as a {'number' if is_int else 'date'}",
                    "write a number, or an ISO date ('2024-01-31')",
                )
            ctx.notes.append(
                f"{where} {value!r} -> {target} {spec[target]!r} (exact for "
                f"{'whole numbers' if is_int else 'dates'})"
            )
        else:
            ctx.unsupported.append(f"{where} = {value!r} is not enforced")


def _pattern_problem(pattern: str) -> str | None:
    """Why the contract engine (Python's re to validate, Polars' Rust regex to run) cannot use
    a pattern, or None."""
    from sluice.quality.engine import regex_problem

    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return regex_problem(pattern)


def _refuse(where: str, loc: str, problem: str, fix: str) -> ConfigError:
    path = f"$.{loc}" if not loc.startswith("$") else loc
    return ConfigError(
        f"{where}: {path}: {problem}; Sluice cannot map it to a check", field=path, fix=fix
    )


def _pii(prop: dict[str, Any]) -> str | None:
    cls = str(prop.get("classification") or "").strip().lower()
    if cls in PII_CLASSIFICATIONS:
        return f"classification {cls!r}"
    tags = prop.get("tags") or []
    if isinstance(tags, list):
        hit = sorted({str(t).lower() for t in tags} & PII_TAGS)
        if hit:
            return f"tag {hit[0]!r}"
    for cp in prop.get("customProperties") or []:
        if (
            isinstance(cp, dict)
            and str(cp.get("property", "")).lower() == "pii"
            and cp.get("value") in (True, "true", "True", "yes")
        ):
            return "custom property pii: true"
    if prop.get("pii") is True:
        return "pii: true"
    return None


def _import_object(obj: dict[str, Any], idx: int, doc_where: str, version: str) -> _Ctx:
    ctx = _Ctx(doc_where, obj, idx)
    ctx.meta_keys |= {k for k in obj if k in _META_OBJECT} - {
        "name",
        "properties",
        "quality",
        "relationships",
        "description",
    }
    for key in obj:
        if key not in _META_OBJECT:
            ctx.unsupported.append(f"{ctx.obj_loc}.{key}: unknown key, not enforced")
    props = [p for p in obj.get("properties") or [] if isinstance(p, dict)]
    pk = [p for p in props if p.get("primaryKey") is True]
    pk_names = [str(p.get("name")) for p in pk]
    if len(pk) > 1:
        ctx.unsupported.append(
            f"{ctx.obj_loc} {ctx.obj_name!r}: composite primary key "
            f"({', '.join(pk_names)}): each column is required, but uniqueness "
            "of the combination is not enforced"
        )
    for j, prop in enumerate(props):
        loc = f"{ctx.obj_loc}.properties[{j}]"
        name = str(prop.get("name") or "").strip()
        if not name:
            raise ctx.refuse(f"{loc}.name", "a property without a name", "name the property")
        if name in ctx.fields:
            raise ConfigError(
                f"{doc_where}: {loc}: fields named more than once in {ctx.obj_name!r}: {name!r}",
                field="schema",
                fix="give every property of an object its own name",
            )
        spec: dict[str, Any] = {"name": name}
        ctx.fields[name] = spec
        ctx.meta_keys |= {k for k in prop if k in _META_PROPERTY}
        for key in prop:
            if key not in _META_PROPERTY and key not in _HANDLED_PROPERTY:
                ctx.unsupported.append(f"{loc}.{key}: unknown key, not enforced")
        phys_name = prop.get("physicalName")
        if phys_name and phys_name != name:
            ctx.notes.append(
                f"{loc}: field named {name!r} (the ODCS name); its physical column "
                f"is {phys_name!r}: rename the column or the field if they differ"
            )
        stype = _map_type(prop, loc, name, ctx)
        if stype is not None:
            spec["type"] = stype
        if isinstance(prop.get("description"), str):
            spec["description"] = prop["description"]
        if prop.get("required") is True:
            spec["required"] = True
        if prop.get("unique") is True:
            spec["unique"] = True
        if prop.get("primaryKey") is True:
            if prop.get("required") is False:
                ctx.notes.append(
                    f"{loc}: primaryKey with required: false -> required (a key cannot be null)"
                )
            spec["required"] = True
            if len(pk) == 1:
                spec["unique"] = True
                ctx.notes.append(f"{loc}: primaryKey -> required + unique")
        _options(prop, spec, loc, name, ctx)
        if stype == "string" and "max_length" not in spec:
            m = _VARCHAR.match(str(prop.get("physicalType") or "").strip())
            if m:
                spec["max_length"] = int(m.group(1))
                ctx.notes.append(
                    f"{loc}: physicalType {prop['physicalType']!r} -> max_length {m.group(1)}"
                )
        why = _pii(prop)
        if why:
            spec["pii"] = True
            ctx.notes.append(f"{loc}: pii (from {why})")
        for r, rel in enumerate(prop.get("relationships") or []):
            to = rel.get("to") if isinstance(rel, dict) else rel
            ctx.unsupported.append(
                f"{loc}.relationships[{r}]: relationship to {to!r} is not "
                "enforced (a Sluice reference needs the file or table to read; "
                "add references: by hand)"
            )
        if prop.get("items") is not None or prop.get("properties") is not None:
            ctx.unsupported.append(f"{loc} {name!r}: nested items/properties are not enforced")
        if prop.get("quality") is not None:
            ctx.quality(prop["quality"], loc, name)
    for r, rel in enumerate(obj.get("relationships") or []):
        desc = f"{rel.get('from')!r} -> {rel.get('to')!r}" if isinstance(rel, dict) else repr(rel)
        ctx.unsupported.append(
            f"{ctx.obj_loc}.relationships[{r}]: relationship {desc} is not enforced"
        )
    if obj.get("quality") is not None:
        ctx.quality(obj["quality"], ctx.obj_loc, None)
    return ctx


@functools.cache
def _validator() -> Validator:
    from jsonschema import Draft201909Validator

    text = resources.files("sluice.quality").joinpath("schemas", ODCS_SCHEMA).read_text("utf-8")
    schema = json.loads(text)
    Draft201909Validator.check_schema(schema)
    validator: Validator = Draft201909Validator(schema)
    return validator


@functools.cache
def _declared_keys() -> frozenset[str]:
    """Every property name the ODCS schema declares somewhere."""
    keys: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                keys.update(props)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(_validator().schema)
    return frozenset(keys)


def _json_path(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unexpected(err: SchemaViolation) -> list[str]:
    """The keys named by an additionalProperties / unevaluatedProperties error."""
    m = re.search(r"\((.*) (?:was|were) unexpected\)", err.message)
    return re.findall(r"'((?:[^'\\]|\\.)*)'", m.group(1)) if m else []


def _render(err: SchemaViolation) -> list[tuple[str, str]]:
    """(JSON path, message) for one schema violation (the branches of oneOf/anyOf are
    summarised: which keys are missing, or which ones clash)."""
    path = _json_path(err.absolute_path)
    kind = err.validator
    if kind == "required":
        m = re.match(r"'(.*)' is a required property", err.message)
        key = m.group(1) if m else "?"
        return [(f"{path}.{key}" if path != "$" else f"$.{key}", "required key missing")]
    if kind in ("additionalProperties", "unevaluatedProperties"):
        return [(f"{path}.{k}", "unknown key (not in ODCS v3.1.0)") for k in _unexpected(err)]
    if kind in ("oneOf", "anyOf"):
        ctx = list(err.context or [])
        if "is valid under each of" in err.message:
            inst = err.instance
            keys = sorted(set(inst) & set(_OPERATORS)) if isinstance(inst, dict) else []
            what = f" ({', '.join(keys)})" if keys else ""
            return [(path, f"matches more than one of the allowed forms{what}: give only one")]
        if ctx and all(c.validator == "required" for c in ctx):
            missing = []
            for c in ctx:
                m = re.match(r"'(.*)' is a required property", c.message)
                if m:
                    missing.append(m.group(1))
            return [(path, f"needs one of: {', '.join(dict.fromkeys(missing))}")]
        if ctx:
            from jsonschema.exceptions import best_match

            best = best_match(ctx)
            if best is not None:
                return _render(best)
    if kind == "type" and err.validator_value == "string" and _is_number(err.instance):
        return [(path, f"{_short(err.instance)} is not text: quote it ('{err.instance}')")]
    message = err.message
    if len(message) > 200:
        message = message[:197] + "..."
    return [(path, message)]


def schema_problems(doc: Any) -> list[str]:
    """Every violation of the ODCS JSON Schema in ``doc``, as ``"$.path: message"`` lines,
    sorted by path (empty when the document is valid)."""
    errors = list(_validator().iter_errors(doc))
    paths = [_json_path(e.absolute_path) for e in errors]
    found: dict[tuple[str, str], None] = {}
    for err, path in zip(errors, paths, strict=True):
        rendered = _render(err)
        if err.validator == "unevaluatedProperties":
            # after another failure at or under this object, its valid keys are reported as
            # "unevaluated" too: keep only keys the standard does not know at all
            others = any(
                p == path or p.startswith((path + ".", path + "["))
                for e, p in zip(errors, paths, strict=True)
                if e is not err and e.validator != "unevaluatedProperties"
            )
            if others:
                known = _declared_keys()
                rendered = [(p, m) for p, m in rendered if p.rsplit(".", 1)[-1] not in known]
        for item in rendered:
            found[item] = None

    def order(item: tuple[str, str]) -> list[Any]:
        return [int(x) if x.isdigit() else x for x in re.split(r"\[(\d+)\]", item[0])]

    return [f"{p}: {m}" for p, m in sorted(found, key=order)]


def _validate(doc: dict[str, Any], where: str) -> None:
    problems = schema_problems(doc)
    if not problems:
        return
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise ConfigError(
        f"{where} is not a valid ODCS v3 document ({len(problems)} problem(s)): "
        + "; ".join(shown),
        field=problems[0].split(":", 1)[0],
        fix="correct the document against the Open Data Contract Standard v3.1.0 "
        f"({_SPEC_URL}); Sluice validates it with the ODCS JSON Schema {ODCS_SCHEMA}",
    )


def _load(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(source, dict):
        return source, "ODCS document"
    if isinstance(source, str) and "\n" in source:
        text, where = source, "ODCS document"
    else:
        p = Path(source)
        where = str(p)
        from sluice.config.yamlsafe import load_yaml  # one loader, with limits on aliases/depth

        raw = load_yaml(p, what="ODCS contract", loader=_DateAsStringLoader, field="contract")
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{where} is not an ODCS document (expected a mapping at the top)",
                field="contract",
                fix="pass an Open Data Contract Standard v3 file",
            )
        return raw, where
    from sluice.config.yamlsafe import load_yaml

    raw = load_yaml(text, what="ODCS contract", where=where, loader=_DateAsStringLoader)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where} is not an ODCS document (expected a mapping at the top)",
            field="contract",
            fix="pass an Open Data Contract Standard v3 file",
        )
    return raw, where


def import_odcs(source: str | Path | dict[str, Any]) -> ImportResult:
    """Convert an ODCS v3 document (path, YAML text or parsed dict) into Sluice contracts.

    Raises :class:`ConfigError` when the document is not ODCS v3, violates the ODCS JSON Schema
    (every violation listed with its JSON path), holds a value Sluice cannot map, or describes
    no table with properties (the message names what the document holds instead)."""
    doc, where = _load(source)
    if "kind" in doc and doc["kind"] != "DataContract":
        raise ConfigError(
            f"{where}: $.kind {doc.get('kind')!r} is not an ODCS DataContract",
            field="$.kind",
            fix="pass an Open Data Contract Standard v3 file",
        )
    api = str(doc.get("apiVersion", "v3"))
    if not api.lstrip("v").startswith("3"):
        raise ConfigError(
            f"{where}: $.apiVersion {api!r} is not supported (ODCS v3 only)",
            field="$.apiVersion",
            fix="upgrade the contract to ODCS v3",
        )
    _validate(doc, where)
    version = str(doc["version"])
    unsupported: list[str] = []
    notes: list[str] = []
    doc_only = [k for k in _DOC_SECTIONS if doc.get(k)]
    if doc_only:
        unsupported.append(f"{', '.join(doc_only)}: documentation only, not enforced")
    unknown = [k for k in doc if k not in _META_TOP and k not in _DOC_SECTIONS]
    if unknown:
        unsupported.append(f"{', '.join(unknown)}: unknown top-level keys, not enforced")
    meta_top = [
        k for k in doc if k in _META_TOP and k not in ("schema", "version", "kind", "apiVersion")
    ]
    schema = doc.get("schema")
    if not isinstance(schema, list) or not schema:
        holds = ", ".join(k for k in doc if k not in _META_TOP) or "identification only"
        what = "no 'schema' section" if schema is None else "an empty 'schema' list"
        raise ConfigError(
            f"{where}: $.schema: the document is valid ODCS but has {what}, so there is no "
            f"table to import (it describes: {holds})",
            field="$.schema",
            fix="add a schema object with properties (name, logicalType, ...) to "
            "the ODCS document, or write the Sluice contract by hand",
        )
    contracts: list[Contract] = []
    meta_keys: set[str] = set()
    skipped: list[str] = []
    for i, obj in enumerate(schema):
        if not isinstance(obj, dict):
            raise _refuse(where, f"schema[{i}]", "not a mapping", "describe it as a mapping")
        name = obj.get("name") or obj.get("physicalName")
        if not [p for p in obj.get("properties") or [] if isinstance(p, dict) and p.get("name")]:
            refs = [
                str(a["url"])
                for a in obj.get("authoritativeDefinitions") or []
                if isinstance(a, dict) and a.get("url")
            ]
            reason = f"$.schema[{i}] {name!r} has no properties" + (
                f" (its schema is defined elsewhere: {', '.join(refs)})" if refs else ""
            )
            skipped.append(reason)
            unsupported.append(reason + "; not imported")
            continue
        ctx = _import_object(obj, i, where, version)
        unsupported += ctx.unsupported
        notes += ctx.notes
        meta_keys |= ctx.meta_keys
        try:
            fields = [FieldSpec.model_validate(spec) for spec in ctx.fields.values()]
            contracts.append(
                Contract.model_validate(
                    {
                        "name": ctx.obj_name,
                        "version": version,
                        **(
                            {"description": obj["description"]}
                            if isinstance(obj.get("description"), str)
                            else {}
                        ),
                        "schema": fields,
                        "quality": ctx.rules,
                    }
                )
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors(include_url=False)
            )
            raise ConfigError(
                f"{where}: schema[{i}] {ctx.obj_name!r} cannot become a Sluice "
                f"contract: {problems}",
                field="schema",
                fix="correct the ODCS document",
            ) from None
    if not contracts:
        raise ConfigError(
            f"{where}: no schema object with properties to import: "
            + "; ".join(skipped or ["schema holds no objects"]),
            field="$.schema",
            fix="describe the table's properties (name, logicalType, ...) in the "
            "ODCS document, or write the Sluice contract by hand",
        )
    notes.insert(0, f"pii rule: {PII_RULE}")
    if meta_top or meta_keys:
        notes.append(
            "kept as documentation only (no check): "
            + ", ".join([*meta_top, *sorted(meta_keys - set(meta_top))])
        )
    return ImportResult(contracts=contracts, unsupported=unsupported, notes=notes)


def dump_contract(contract: Contract) -> str:
    """YAML text of a Sluice contract; ``parse_contract(yaml.safe_load(text)) == contract``."""
    data = contract.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude_none=True)
    data = {"name": contract.name, "version": contract.version, **data}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
