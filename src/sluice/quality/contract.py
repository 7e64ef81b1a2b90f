"""The data contract: one YAML file, enforced the same way in batch and stream.

::

    name: orders
    version: 1.0.0
    schema_policy: evolve            # freeze | evolve | discard_columns, or a mapping (below)
    schema:
      - {name: order_id, type: string, required: true, unique: true}
      - {name: amount, type: "decimal(12,2)", required: true, min: 0}
      - {name: email, type: string, pattern: '^.+@.+$', pii: true}
      - {name: status, type: string, enum: [paid, refunded], action: drop}
      - {name: customer_id, type: int, references: {path: customers.csv, column: customer_id}}
    quality:
      - {freshness: 1 hour, column: ts}
      - {completeness: 99%, columns: [email]}
      - {row_count: {min: 1}}
      - {sql: "SELECT count(*) FROM input WHERE amount > 100000", must_be: 0, action: warn}

Row checks (type, required, min/max, pattern, enum, min_length/max_length, unique, references)
act per row with the field's ``action`` (or a per-check override in ``actions``):
``dead_letter`` (default; the dead letter lists every check the row failed), ``drop``
(filtered, counted), ``warn`` (counted, row kept), ``fail`` (the run stops, after the dead
letters found so far are written). Dataset rules (freshness, completeness, row_count, sql) are
gates evaluated at the end of the input; ``action: fail`` (default) makes the run exit non-zero
naming the rule, ``warn`` only reports.

A value is *missing* when it is null or text that is empty or only blanks, whatever the file
format: ``required`` fails on it, ``completeness`` counts it, and no other check looks at it.
The contract describes the whole input (all files, all batches): a field whose column no part
of the input has fails its ``present`` check when the input ends (the run stops) unless
``schema_policy: {missing_columns: fill_nulls}`` reads it as a column of nulls; the records of a
part without the column have missing values there. A ``sql`` rule is answered over the whole
input too (:mod:`sluice.quality.sqlrules`).
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from sluice.errors import ConfigError
from sluice.time.durations import parse_duration
from sluice.types import parse_type

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

Action = Literal["dead_letter", "drop", "warn", "fail"]
RowCheck = Literal[
    "type",
    "required",
    "min",
    "max",
    "pattern",
    "enum",
    "min_length",
    "max_length",
    "unique",
    "references",
]


def parse_percent(text: str | int | float) -> float:
    """'99%' -> 0.99, 0.99 -> 0.99, 99 -> 0.99."""
    if isinstance(text, str):
        t = text.strip()
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    else:
        value = float(text)
    if value > 1:
        value /= 100
    if not 0 <= value <= 1:
        raise ValueError(f"a percentage must be between 0% and 100%, got {text!r}")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Reference(_Model):
    """Referential integrity: values must exist in ``column`` of a reference dataset, read once:
    a file (``path`` + optional ``kind``, default from the extension) or a PostgreSQL table
    (``dsn`` + ``table``)."""

    column: str
    path: str | None = None
    kind: Literal["csv", "json", "jsonl", "parquet"] | None = None
    dsn: str | None = None
    table: str | None = None

    def model_post_init(self, _: Any) -> None:
        if (self.path is None) == (self.dsn is None):
            raise ValueError("a reference needs either 'path' (a file) or 'dsn' + 'table'")
        if self.dsn is not None and not self.table:
            raise ValueError("a database reference needs 'table'")


class FieldSpec(_Model):
    name: str = Field(min_length=1)
    type: str | None = Field(
        None, description="Sluice type name (int, decimal(12,2), timestamp...)."
    )
    description: str | None = None
    required: bool = False
    unique: bool = False
    min: float | str | None = Field(None, description="Inclusive lower bound (number or ISO date).")
    max: float | str | None = None
    pattern: str | None = Field(None, description="Regular expression the whole value must match.")
    enum: list[Any] | None = None
    min_length: int | None = Field(None, ge=0)
    max_length: int | None = Field(None, ge=0)
    pii: bool = Field(
        False, description="Never shown in clear text in logs, dead letters, samples."
    )
    references: Reference | None = None
    action: Action = "dead_letter"
    actions: dict[RowCheck, Action] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _type(cls, v: str | None) -> str | None:
        if v is not None:
            parse_type(v)
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v!r}: {exc}") from None
        return v

    @field_validator("min", "max", mode="before")
    @classmethod
    def _bound_text(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("a bound is a number or an ISO date, not true/false")
        if isinstance(v, (dt.date, dt.datetime)):  # YAML reads 2024-01-01 as a date
            return v.isoformat()
        return v

    @model_validator(mode="after")
    def _bounds_fit_the_type(self) -> FieldSpec:
        """``min``/``max`` compare values in the field's type, so that a CSV column (text) and
        a Parquet column (numbers) of the same data give the same verdict: a bound needs a
        type, and must be readable in it."""
        for key in ("min", "max"):
            value = getattr(self, key)
            if value is None:
                continue
            if self.type is None:
                raise ValueError(
                    f"{key} needs a type to compare in (the same column "
                    "is text in a CSV file and numbers in Parquet); add type: int, double, "
                    "decimal(P,S), date, timestamp or string"
                )
            kind = bound_kind(self.type)
            if kind == "number" and not isinstance(value, (int, float)):
                raise ValueError(f"{key} {value!r} is not a number (type {self.type})")
            if kind in ("date", "timestamp"):
                if not isinstance(value, str):
                    raise ValueError(
                        f"{key} {value!r} must be an ISO {kind} "
                        f"(type {self.type}), e.g. '2024-01-31'"
                    )
                try:
                    parsed = dt.datetime.fromisoformat(value)
                except ValueError:
                    raise ValueError(
                        f"{key} {value!r} is not an ISO {kind}, "
                        "e.g. '2024-01-31' or '2024-01-31T12:00:00'"
                    ) from None
                if kind == "date" and parsed.time() != dt.time():
                    raise ValueError(f"{key} {value!r} has a time of day; the field is a date")
            if kind == "string" and not isinstance(value, str):
                raise ValueError(
                    f"{key} {value!r} must be text (type {self.type}); "
                    "quote it, or give the field a numeric type"
                )
            if kind is None:
                raise ValueError(f"type {self.type} has no order for {key}")
        return self

    def action_for(self, check: RowCheck) -> Action:
        return self.actions.get(check, self.action)


def bound_kind(type_name: str) -> Literal["number", "date", "timestamp", "string"] | None:
    """How ``min``/``max`` of a field of this type are written and compared."""
    import pyarrow as pa

    t = parse_type(type_name)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return None


class Freshness(_Model):
    freshness: str | float = Field(description="Newest event must be at most this old: '1 hour'.")
    column: str
    action: Literal["fail", "warn"] = "fail"

    @field_validator("freshness")
    @classmethod
    def _d(cls, v: str | float) -> str | float:
        parse_duration(v)
        return v


class Completeness(_Model):
    completeness: str | float = Field(description="Minimum share of non-null values: '99%'.")
    columns: list[str] | None = Field(None, description="Default: every field of the contract.")
    action: Literal["fail", "warn"] = "fail"

    @field_validator("completeness")
    @classmethod
    def _p(cls, v: str | float) -> str | float:
        parse_percent(v)
        return v


class Bounds(_Model):
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=0)


class RowCount(_Model):
    row_count: Bounds
    action: Literal["fail", "warn"] = "fail"


class SqlRule(_Model):
    """One DuckDB SELECT over the whole input (``input``: every row that reached the contract,
    in the contract's types) returning one number (null counts as 0), compared at the end with
    ``must_be`` / ``max``. See docs/contracts.md, "SQL rules"."""

    # checked when the contract is read, by the SQL engine's own parse (plan_statement): one
    # SELECT reading only `input`, known functions, nothing outside the sandbox; bound against
    # the declared fields when the contract step is built (sluice.quality.sqlrules.bind_rules)
    sql: str
    must_be: float | None = None

    @field_validator("sql")
    @classmethod
    def _one_select(cls, v: str) -> str:
        from sluice.steps.sqlengine import plan_statement

        plan_statement(v)  # SqlRefused (a ValueError) names what may not run
        return v

    max: float | None = None
    name: str | None = None
    action: Literal["fail", "warn"] = "fail"


def _rule_tag(v: Any) -> str | None:
    keys = v.keys() if isinstance(v, dict) else type(v).model_fields.keys()
    for k in ("freshness", "completeness", "row_count", "sql"):
        if k in keys:
            return k
    return None


DatasetRule = Annotated[
    Annotated[Freshness, Tag("freshness")]
    | Annotated[Completeness, Tag("completeness")]
    | Annotated[RowCount, Tag("row_count")]
    | Annotated[SqlRule, Tag("sql")],
    Discriminator(
        _rule_tag,
        custom_error_type="rule_kind",
        custom_error_message="a quality rule needs one of: freshness, completeness, row_count, sql",
    ),
]


class SchemaPolicy(_Model):
    """What happens to the columns of the input that do not match the contract's fields."""

    extra_columns: Literal["pass", "discard", "fail"] = Field(
        "pass",
        description="Columns the contract does not name: pass = they go through and are "
        "reported, discard = they are dropped and reported, fail = the schema check fails.",
    )
    missing_columns: Literal["fail", "fill_nulls"] = Field(
        "fail",
        description="Fields whose column the input lacks: fail = their 'present' check fails "
        "(the run stops), fill_nulls = they are read as columns of nulls (then 'required' "
        "fails on every row).",
    )


# the names of common policies (schema_policy: evolve)
SCHEMA_POLICIES: dict[str, SchemaPolicy] = {
    "evolve": SchemaPolicy(),
    "discard_columns": SchemaPolicy(extra_columns="discard"),
    "freeze": SchemaPolicy(extra_columns="fail"),
}


# in files, schema_policy is a name or a mapping
_POLICY_JSON_SCHEMA = {
    "anyOf": [
        {"type": "string", "enum": list(SCHEMA_POLICIES)},
        SchemaPolicy.model_json_schema(),
    ]
}


class Contract(_Model):
    name: str
    version: str = "1.0.0"
    description: str | None = None
    schema_policy: Annotated[SchemaPolicy, WithJsonSchema(_POLICY_JSON_SCHEMA)] = Field(
        default_factory=SchemaPolicy,
        description="evolve (default: extra columns pass through, missing columns fail), "
        "discard_columns (extra columns dropped), freeze (extra columns fail), or a mapping "
        "{extra_columns: pass | discard | fail, missing_columns: fail | fill_nulls}.",
    )
    fields: list[FieldSpec] = Field(alias="schema", min_length=1)
    quality: list[DatasetRule] = Field(default_factory=list)
    samples: int = Field(5, ge=0, description="Failing values kept per check in the report.")

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> str:
        return str(v)

    @field_validator("schema_policy", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in SCHEMA_POLICIES:
                raise ValueError(
                    f"unknown schema_policy {v!r}: use {', '.join(SCHEMA_POLICIES)} or a mapping "
                    "{extra_columns: pass | discard | fail, missing_columns: fail | fill_nulls}"
                )
            return SCHEMA_POLICIES[v]
        return v

    @field_validator("fields")
    @classmethod
    def _distinct_names(cls, v: list[FieldSpec]) -> list[FieldSpec]:
        names = [f.name for f in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"fields named more than once: {dup}")
        return v

    @property
    def pii(self) -> set[str]:
        return {f.name for f in self.fields if f.pii}


def load_contract(path: str | Path, *, step_id: str | None = None) -> Contract:
    """Read and validate a contract file; every mistake becomes a ConfigError that names the
    file, the key and the fix."""
    from sluice.config.yamlsafe import load_yaml  # one loader, with limits on aliases/depth

    p = Path(path)
    raw = load_yaml(p, what="contract", step_id=step_id, field="contract")
    if isinstance(raw, dict) and raw.get("kind") == "DataContract" and "apiVersion" in raw:
        raise ConfigError(
            f"{p} is an Open Data Contract Standard file",
            step_id=step_id,
            field="contract",
            fix=f"convert it first: sluice contract import {p} -o contract.yaml",
        )
    return parse_contract(raw, step_id=step_id, where=f"contract {p}")


_TOP_KEYS = "name, version, description, schema_policy, schema, quality, samples"


def parse_contract(raw: Any, *, step_id: str | None = None, where: str = "contract") -> Contract:
    """Validate a parsed contract (a mapping); mistakes become one ConfigError listing each
    problem by its place (``schema[2].patern``), with the fix (``did you mean 'pattern'?``)."""
    if not isinstance(raw, dict):
        got = "an empty document" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(
            f"{where} must be a mapping with the keys {_TOP_KEYS}; it holds {got}",
            step_id=step_id,
            field="contract",
            fix="start the file with 'name: ...' and list the fields under 'schema:' "
            "(see docs/contracts.md)",
        )
    try:
        return Contract.model_validate(raw)
    except ValidationError as exc:
        problems: list[tuple[str, str, str | None]] = [
            _problem(err, raw) for err in exc.errors(include_url=False)
        ]
    first_path, _, first_fix = problems[0]
    text = "; ".join(msg for _, msg, _ in problems)
    fixes = [f for _, _, f in problems if f]
    raise ConfigError(
        f"{where} is not a valid contract: {text}",
        step_id=step_id,
        field=first_path,
        fix=first_fix
        if len(problems) == 1 and first_fix
        else "; ".join([*dict.fromkeys(fixes), "see docs/contracts.md for the contract format"]),
    ) from None


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model that holds the key at ``loc`` (for 'unknown key' messages)."""
    rules: dict[str, type[BaseModel]] = {
        "freshness": Freshness,
        "completeness": Completeness,
        "row_count": RowCount,
        "sql": SqlRule,
    }
    parent = loc[:-1]
    if parent == ():
        return Contract
    if parent == ("schema_policy",):
        return SchemaPolicy
    if len(parent) == 2 and parent[0] == "schema":
        return FieldSpec
    if len(parent) == 3 and parent[0] == "schema" and parent[2] == "references":
        return Reference
    if len(parent) == 3 and parent[0] == "quality":
        return rules.get(str(parent[2]))
    if len(parent) == 4 and parent[0] == "quality" and parent[3] == "row_count":
        return Bounds
    return None


def _path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for i, x in enumerate(loc):
        if isinstance(x, int) and parts:
            parts[-1] += f"[{x}]"
        elif i == 2 and loc[0] == "quality":
            continue  # the rule kind pydantic puts in the location
        else:
            parts.append(str(x))
    return ".".join(parts) or "(top level)"


def _problem(err: ErrorDetails, raw: dict[str, Any]) -> tuple[str, str, str | None]:
    """(path, message, fix) of one validation error."""
    loc = tuple(err["loc"])
    path = _path(loc)
    where = path
    if len(loc) >= 2 and loc[0] == "schema" and isinstance(loc[1], int):
        fields = raw.get("schema")
        spec = fields[loc[1]] if isinstance(fields, list) and loc[1] < len(fields) else None
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            where = f"{path} (field '{spec['name']}')"
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(loc)
        known = [f.alias or n for n, f in model.model_fields.items()] if model is not None else []
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            return (
                path,
                f"unknown key {key!r} at {where}: did you mean {close[0]!r}?",
                f"rename {key!r} to {close[0]!r}",
            )
        return (
            path,
            f"unknown key {key!r} at {where}",
            f"remove {key!r}; the keys allowed there are: {', '.join(known)}"
            if known
            else f"remove {key!r}",
        )
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return path, f"{where}: a required key is missing", f"add {str(loc[-1])!r}"
    return path, f"{where}: {msg}", None
