"""The data contract: one YAML file, enforced the same way in batch and stream.

::

    name: orders
    version: 1.0.0
    schema_policy: evolve            # freeze | evolve | discard_columns
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
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from sluice.errors import ConfigError
from sluice.time.durations import parse_duration
from sluice.types import parse_type

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

    def action_for(self, check: RowCheck) -> Action:
        return self.actions.get(check, self.action)


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
    """A DuckDB query over each batch (``input``) returning one number per batch (summed over the
    run, e.g. a count of bad rows), compared at the end with ``must_be`` / ``max``."""

    sql: str
    must_be: float | None = None

    @field_validator("sql")
    @classmethod
    def _one_select(cls, v: str) -> str:
        body = v.strip().rstrip(";").strip()
        if ";" in body or not body.lower().startswith(("select", "with")):
            raise ValueError("a quality sql rule must be one SELECT statement (no ';')")
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


class Contract(_Model):
    name: str
    version: str = "1.0.0"
    description: str | None = None
    schema_policy: Literal["freeze", "evolve", "discard_columns"] = Field(
        "evolve",
        description="Columns the contract does not name: freeze = the run fails, evolve = they "
        "pass through and are reported, discard_columns = they are dropped and reported.",
    )
    fields: list[FieldSpec] = Field(alias="schema", min_length=1)
    quality: list[DatasetRule] = Field(default_factory=list)
    samples: int = Field(5, ge=0, description="Failing values kept per check in the report.")

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> str:
        return str(v)

    def model_post_init(self, _: Any) -> None:
        names = [f.name for f in self.fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"fields named more than once: {dup}")

    @property
    def pii(self) -> set[str]:
        return {f.name for f in self.fields if f.pii}


def load_contract(path: str | Path, *, step_id: str | None = None) -> Contract:
    """Read and validate a contract file; mistakes become a ConfigError naming the fix."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read contract {str(p)!r}: {exc.strerror}",
            step_id=step_id,
            field="contract",
            fix="check the path (relative to the pipeline file)",
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"contract {p} is not valid YAML: {exc}", step_id=step_id) from exc
    if isinstance(raw, dict) and raw.get("kind") == "DataContract" and "apiVersion" in raw:
        raise ConfigError(
            f"{p} is an Open Data Contract Standard file",
            step_id=step_id,
            fix=f"convert it first: sluice contract import {p} -o contract.yaml",
        )
    return parse_contract(raw, step_id=step_id, where=str(p))


def parse_contract(raw: Any, *, step_id: str | None = None, where: str = "contract") -> Contract:
    try:
        return Contract.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(x) for x in err["loc"])
            problems.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError(
            f"{where} is not a valid contract: " + "; ".join(problems),
            step_id=step_id,
            field="contract",
            fix="see docs/contracts.md for the contract format",
        ) from None
