"""ODCS v3 import: the 18 public examples, each mapping rule, round trips, generated data."""

from __future__ import annotations

import functools
import math
import re
import re._parser as sre_parse  # the stdlib regex parser, used to generate matching strings
import string
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from sluice.errors import ConfigError
from sluice.quality.contract import (
    Completeness,
    Contract,
    FieldSpec,
    RowCount,
    SqlRule,
    parse_contract,
)
from sluice.quality.odcs import ImportResult, dump_contract, import_odcs
from sluice.types import parse_type

EXAMPLES_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "odcs" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("**/*.odcs.yaml"))

# Examples that hold no table with properties: the ConfigError must name what is missing.
_EMPTY = "$.schema: the document is valid ODCS but has an empty 'schema' list"
REFUSED = {
    "roles/service-and-operational-roles": _EMPTY,
    "schema/kafka-schemaregistry": "$.schema[0] 'Orders' has no properties",
    "server/azure-server": "$.schema: the document is valid ODCS but has no 'schema' section",
    "server/kafka-server": "$.schema[0] 'Orders' has no properties",
    "sla/database-table-sla": _EMPTY,
    "stakeholders/basic-four-dpo": _EMPTY,
}


def _key(path: Path) -> str:
    return str(path.relative_to(EXAMPLES_DIR)).removesuffix(".odcs.yaml")


IMPORTED = [p for p in EXAMPLES if _key(p) not in REFUSED]


@functools.cache
def imported_example(path: Path) -> ImportResult:
    """import_odcs of an example file, once per test session (validating the 68-table
    AdventureWorks document against the ODCS JSON Schema takes a couple of seconds)."""
    return import_odcs(path)


def _id(path: Path) -> str:
    return f"{'refused' if _key(path) in REFUSED else 'imports'}:{_key(path)}"


def _raw(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    return yaml.load(text, Loader=_DatesAsText)  # a SafeLoader subclass


class _DatesAsText(yaml.SafeLoader):
    pass


_DatesAsText.yaml_implicit_resolvers = {
    k: [(t, r) for t, r in v if t != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def test_there_are_18_examples() -> None:
    assert len(EXAMPLES) == 18
    assert set(REFUSED) <= {_key(p) for p in EXAMPLES}
    assert len(IMPORTED) == 12


# ---------------------------------------------------------------------------------------------
# The 18 public examples
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=_id)
def test_example_imports_or_is_refused_clearly(path: Path) -> None:
    key = _key(path)
    if key in REFUSED:
        with pytest.raises(ConfigError) as info:
            import_odcs(path)
        message = str(info.value)
        assert REFUSED[key] in message
        assert str(path) in message
        assert "Fix:" in message
        return
    result = imported_example(path)
    assert isinstance(result, ImportResult)
    assert len(result.contracts) >= 1
    raw = _raw(path)
    objects = [o for o in raw["schema"] if o.get("properties")]
    assert [c.name for c in result.contracts] == [o["name"] for o in objects]
    for contract, obj in zip(result.contracts, objects, strict=True):
        assert contract.version == str(raw["version"])
        assert [f.name for f in contract.fields] == [p["name"] for p in obj["properties"]]


@pytest.mark.parametrize("path", IMPORTED, ids=_id)
def test_example_round_trips_through_yaml(path: Path) -> None:
    for contract in imported_example(path).contracts:
        text = dump_contract(contract)
        assert parse_contract(yaml.safe_load(text)) == contract, text


@pytest.mark.parametrize("path", IMPORTED, ids=_id)
def test_example_drops_nothing_silently(path: Path) -> None:
    """Every quality rule, option, relationship and documentation section of the example is
    either mapped (a note) or listed as unsupported, by its location."""
    result = imported_example(path)
    raw = _raw(path)
    lines = result.notes + result.unsupported
    everything = "\n".join(lines)

    def mentioned(loc: str) -> bool:
        return any(line.startswith(loc) or f"{loc}:" in line or f"{loc} " in line for line in lines)

    for i, obj in enumerate(raw["schema"]):
        if not obj.get("properties"):
            assert f"schema[{i}] {obj.get('name')!r} has no properties" in everything
            continue
        for k, _ in enumerate(obj.get("quality") or []):
            assert mentioned(f"schema[{i}].quality[{k}]"), f"schema[{i}].quality[{k}]"
        for r, _ in enumerate(obj.get("relationships") or []):
            assert mentioned(f"schema[{i}].relationships[{r}]")
        for j, prop in enumerate(obj["properties"]):
            loc = f"schema[{i}].properties[{j}]"
            for k, _ in enumerate(prop.get("quality") or []):
                assert mentioned(f"{loc}.quality[{k}]"), f"{loc}.quality[{k}]"
            for r, _ in enumerate(prop.get("relationships") or []):
                assert mentioned(f"{loc}.relationships[{r}]")
            opts = prop.get("logicalTypeOptions") or {}
            field = result.contracts[[c.name for c in result.contracts].index(obj["name"])]
            spec = next(f for f in field.fields if f.name == prop["name"])
            for key in opts:
                handled = mentioned(f"{loc}.logicalTypeOptions.{key}") or mentioned(
                    f"{loc}.logicalTypeOptions ("
                )
                mapped = {
                    "minLength": spec.min_length,
                    "maxLength": spec.max_length,
                    "minimum": spec.min,
                    "maximum": spec.max,
                    "timezone": spec.type,
                    "enum": spec.enum,
                }.get(key)
                assert handled or mapped is not None, f"{loc}.logicalTypeOptions.{key}"
            if prop.get("logicalType") in ("object", "array"):
                assert spec.type is None
                assert mentioned(loc)
    for section in ("servers", "slaProperties", "roles", "team", "price", "support"):
        if raw.get(section):
            assert any(section in u and "documentation only" in u for u in result.unsupported)


def test_example_summary() -> None:
    """The whole picture across the 18 files, pinned so that changes are deliberate."""
    imported, refused = {}, {}
    for path in EXAMPLES:
        try:
            imported[_key(path)] = len(imported_example(path).contracts)
        except ConfigError as exc:
            refused[_key(path)] = str(exc)
    assert sorted(refused) == sorted(REFUSED)
    assert len(imported) == 12
    assert imported["all/postgresql-adventureworks-contract"] == 68
    assert imported["all/full-example"] == 2
    assert imported["schema/all-schema-types"] == 3


def test_full_example_mapping() -> None:
    result = imported_example(EXAMPLES_DIR / "all" / "full-example.odcs.yaml")
    tbl, receivers = result.contracts
    assert (tbl.name, tbl.version) == ("tbl", "1.1.0")
    f = {x.name: x for x in tbl.fields}
    assert f["transaction_reference_date"].type == "date"
    assert f["rcvr_id"].required and f["rcvr_id"].unique and f["rcvr_id"].pii
    assert f["rcvr_id"].max_length == 18
    assert f["rcvr_cntry_code"].required and not f["rcvr_cntry_code"].pii
    assert tbl.quality == [RowCount.model_validate({"row_count": {"min": 1_000_001}})]
    r = {x.name: x for x in receivers.fields}
    # composite primary key (id, country_code): each column required, not unique by itself
    assert r["id"].required and r["id"].unique  # ODCS says unique: true explicitly
    assert r["country_code"].required and not r["country_code"].unique
    assert any("composite primary key (id, country_code)" in u for u in result.unsupported)
    assert any(
        u.startswith("servers, slaProperties, roles, team, price, support: documentation only")
        for u in result.unsupported
    )


def test_column_validity_percent_is_reported() -> None:
    result = imported_example(EXAMPLES_DIR / "quality" / "column-validity.odcs.yaml")
    assert result.unsupported == [
        "schema[0].properties[0].quality[0]: metric 'invalidValues' mustBeLessOrEqualTo 5 with "
        "unit percent is not enforced"
    ]


def test_column_accuracy_sql_runs_on_input() -> None:
    (contract,) = imported_example(EXAMPLES_DIR / "quality" / "column-accuracy.odcs.yaml").contracts
    (rule,) = contract.quality
    assert isinstance(rule, SqlRule)
    assert rule.sql == "select count(*) from input where DataValue <= 0 or DataValue >= 500"
    assert (rule.must_be, rule.action) == (0, "fail")


def test_all_data_types_mapping() -> None:
    path = EXAMPLES_DIR / "data-types" / "all-data-types.odcs.yaml"
    (contract,) = imported_example(path).contracts
    f = {x.name: x for x in contract.fields}
    assert (
        f["account_id"].type,
        f["account_id"].min_length,
        f["account_id"].max_length,
        f["account_id"].pattern,
    ) == ("string", 11, 11, "ACC[0-9]{8}")
    assert (f["txn_ref_date"].min, f["txn_ref_date"].max) == ("2020-01-02", "2021-01-01")
    assert (f["txn_timestamp"].type, f["txn_timestamp"].min) == ("timestamp", "2020-01-01T00:00:00")
    assert f["txn_timestamp_tz"].type == "timestamptz"
    assert f["txn_time"].type == "string"
    assert (f["amount"].type, f["amount"].min) == ("float32", 0)
    assert (f["age"].type, f["age"].min, f["age"].max) == ("int64", 18, 99)
    assert f["is_open"].type == "bool"
    assert f["latest_txns"].type is None and f["customer_details"].type is None


# ---------------------------------------------------------------------------------------------
# Targeted mapping rules on small hand-written documents
# ---------------------------------------------------------------------------------------------


def odcs(
    *props: dict[str, Any], quality: list[dict[str, Any]] | None = None, **top: Any
) -> dict[str, Any]:
    obj: dict[str, Any] = {"name": "orders", "properties": list(props)}
    if quality is not None:
        obj["quality"] = quality
    return {
        "apiVersion": "v3.1.0",
        "kind": "DataContract",
        "id": "x",
        "version": "2.0.0",
        "status": "active",
        "schema": [obj],
        **top,
    }


def one(*props: dict[str, Any], **kw: Any) -> tuple[Contract, ImportResult]:
    result = import_odcs(odcs(*props, **kw))
    (contract,) = result.contracts
    return contract, result


def field(*props: dict[str, Any], **kw: Any) -> tuple[FieldSpec, ImportResult]:
    contract, result = one(*props, **kw)
    return contract.fields[0], result


@pytest.mark.parametrize(
    ("logical", "physical", "options", "expected"),
    [
        ("string", "varchar", {}, "string"),
        ("integer", "bigint", {}, "int"),
        ("integer", "int", {"format": "i32"}, "int32"),
        ("number", "double", {}, "double"),
        ("number", "decimal(12,2)", {}, "decimal(12,2)"),
        ("number", "NUMERIC(10)", {}, "decimal(10,0)"),
        ("number", "numeric", {}, "double"),
        ("number", "int4", {}, "int"),
        ("number", "float", {"format": "f32"}, "float32"),
        ("boolean", "bool", {}, "bool"),
        ("date", "date", {}, "date"),
        ("date", "timestamp", {}, "timestamp"),
        ("timestamp", "timestamp", {}, "timestamp"),
        ("timestamp", "timestamptz", {}, "timestamptz"),
        ("timestamp", "timestamp", {"timezone": True}, "timestamptz"),
        ("time", "time", {}, "string"),
        (None, "varchar(10)", {}, "string"),
        (None, "bigint", {}, "int"),
        ("object", "json", {}, None),
        ("array", "list", {}, None),
    ],
)
def test_type_mapping(
    logical: str | None, physical: str, options: dict[str, Any], expected: str | None
) -> None:
    prop: dict[str, Any] = {"name": "c", "physicalType": physical}
    if logical:
        prop["logicalType"] = logical
    if options:
        prop["logicalTypeOptions"] = options
    spec, result = field(prop)
    assert spec.type == expected
    if expected is None:
        assert any("properties[0] 'c': logicalType" in u for u in result.unsupported)
    if logical == "time":
        assert any("Sluice has no time-of-day type" in n for n in result.notes)


def test_required_unique_and_single_primary_key() -> None:
    contract, result = one(
        {"name": "a", "logicalType": "string", "required": True},
        {"name": "b", "logicalType": "string", "unique": True},
        {"name": "c", "logicalType": "string", "primaryKey": True, "required": False},
    )
    a, b, c = contract.fields
    assert (a.required, a.unique) == (True, False)
    assert (b.required, b.unique) == (False, True)
    assert (c.required, c.unique) == (True, True)
    assert any("primaryKey with required: false -> required" in n for n in result.notes)
    assert (contract.name, contract.version) == ("orders", "2.0.0")


def test_composite_primary_key_is_required_not_unique_and_reported() -> None:
    contract, result = one(
        {"name": "a", "logicalType": "string", "primaryKey": True, "primaryKeyPosition": 1},
        {"name": "b", "logicalType": "integer", "primaryKey": True, "primaryKeyPosition": 2},
    )
    assert [(f.required, f.unique) for f in contract.fields] == [(True, False), (True, False)]
    assert result.unsupported == [
        "schema[0] 'orders': composite primary key (a, b): each column is required, but "
        "uniqueness of the combination is not enforced"
    ]


def test_numeric_and_date_bounds() -> None:
    contract, result = one(
        {
            "name": "n",
            "logicalType": "number",
            "logicalTypeOptions": {"minimum": 0, "maximum": 9.5},
        },
        {
            "name": "i",
            "logicalType": "integer",
            "logicalTypeOptions": {"exclusiveMinimum": 0, "exclusiveMaximum": 10},
        },
        {"name": "x", "logicalType": "number", "logicalTypeOptions": {"exclusiveMinimum": 0}},
        {
            "name": "d",
            "logicalType": "date",
            "logicalTypeOptions": {
                "exclusiveMinimum": "2024-02-28",
                "exclusiveMaximum": "2024-03-01",
            },
        },
        {
            "name": "t",
            "logicalType": "timestamp",
            "logicalTypeOptions": {
                "minimum": "2024-01-01 10:00:00",
                "exclusiveMaximum": "2025-01-01 00:00:00",
            },
        },
    )
    n, i, x, d, t = contract.fields
    assert (n.min, n.max) == (0, 9.5)
    assert (i.min, i.max) == (1, 9)
    assert x.min is None
    assert (d.min, d.max) == ("2024-02-29", "2024-02-29")
    assert (t.min, t.max) == ("2024-01-01T10:00:00", None)
    assert "schema[0].properties[2].logicalTypeOptions.exclusiveMinimum = 0 is not enforced" in (
        result.unsupported
    )
    assert any(
        u.startswith("schema[0].properties[4].logicalTypeOptions.exclusiveMaximum")
        for u in result.unsupported
    )


def test_string_options_and_formats() -> None:
    contract, result = one(
        {
            "name": "s",
            "logicalType": "string",
            "logicalTypeOptions": {"minLength": 2, "maxLength": 5, "pattern": "[A-Z]+"},
        },
        {"name": "email", "logicalType": "string", "logicalTypeOptions": {"format": "email"}},
        {"name": "host", "logicalType": "string", "logicalTypeOptions": {"format": "hostname"}},
        {"name": "code", "logicalType": "string", "physicalType": "varchar(3)"},
    )
    s, email, host, code = contract.fields
    assert (s.min_length, s.max_length, s.pattern) == (2, 5, "[A-Z]+")
    assert email.pattern is not None and re.fullmatch(email.pattern, "a.b@example.org")
    assert not re.fullmatch(email.pattern, "not an email")
    assert host.pattern is None
    assert "schema[0].properties[2].logicalTypeOptions.format 'hostname' is not enforced" in (
        result.unsupported
    )
    assert code.max_length == 3
    assert any("whole value to match" in n for n in result.notes)


@pytest.mark.parametrize(
    ("extra", "pii"),
    [
        ({"classification": "restricted"}, True),
        ({"classification": "Confidential"}, True),
        ({"classification": "pii"}, True),
        ({"classification": "public"}, False),
        ({"customProperties": [{"property": "pii", "value": True}]}, True),
        ({"customProperties": [{"property": "pii", "value": False}]}, False),
        ({"tags": ["sensitive"]}, True),
        ({}, False),
    ],
)
def test_pii_rule(extra: dict[str, Any], pii: bool) -> None:
    spec, result = field({"name": "email", "logicalType": "string", **extra})
    assert spec.pii is pii
    assert result.notes[0].startswith("pii rule: a field is marked pii when its classification")
    assert any("pii (from" in n for n in result.notes) is pii


def test_null_and_duplicate_rules_become_field_checks() -> None:
    contract, result = one(
        {
            "name": "a",
            "logicalType": "string",
            "quality": [
                {"type": "library", "metric": "nullValues", "mustBe": 0, "severity": "error"},
                {"metric": "duplicateValues", "mustBe": 0, "unit": "percent"},
            ],
        },
        {
            "name": "b",
            "logicalType": "string",
            "quality": [{"metric": "nullValues", "mustBe": 0, "severity": "warning"}],
        },
    )
    a, b = contract.fields
    assert (a.required, a.unique, a.actions) == (True, True, {})
    assert (b.required, b.actions) == (True, {"required": "warn"})
    assert contract.quality == []
    assert result.unsupported == []
    assert "schema[0].properties[0].quality[0]: nullValues mustBe 0 -> a.required" in result.notes


def test_null_percent_becomes_completeness() -> None:
    contract, _ = one(
        {
            "name": "email",
            "logicalType": "string",
            "quality": [
                {
                    "metric": "nullValues",
                    "mustBeLessOrEqualTo": 5,
                    "unit": "percent",
                    "severity": "warning",
                }
            ],
        }
    )
    assert contract.quality == [Completeness(completeness="95%", columns=["email"], action="warn")]
    assert not contract.fields[0].required


def test_row_counts_become_counting_sql() -> None:
    contract, _ = one(
        {
            "name": "email",
            "logicalType": "string",
            "quality": [
                {"metric": "nullValues", "mustBeLessOrEqualTo": 3, "unit": "rows"},
                {
                    "metric": "invalidValues",
                    "mustBeLessThan": 10,
                    "arguments": {"validValues": ["a", "it's"]},
                },
                {
                    "metric": "missingValues",
                    "mustBe": 0,
                    "arguments": {"missingValues": [None, "", "n/a"]},
                },
            ],
        }
    )
    assert contract.quality == [
        SqlRule(
            sql='SELECT count(*) FROM input WHERE "email" IS NULL', max=3, name="email.nullValues"
        ),
        SqlRule(
            sql='SELECT count(*) FROM input WHERE "email" IS NOT NULL AND "email" NOT IN '
            "('a', 'it''s')",
            max=9,
            name="email.invalidValues",
        ),
        SqlRule(
            sql="SELECT count(*) FROM input WHERE \"email\" IS NULL OR \"email\" IN ('', 'n/a')",
            must_be=0,
            name="email.missingValues",
        ),
    ]


def test_valid_values_become_enum() -> None:
    spec, result = field(
        {
            "name": "status",
            "logicalType": "string",
            "quality": [
                {
                    "metric": "invalidValues",
                    "mustBe": 0,
                    "arguments": {"validValues": ["paid", "new"]},
                }
            ],
        }
    )
    assert spec.enum == ["paid", "new"]
    assert any("nulls are not checked by enum" in n for n in result.notes)


@pytest.mark.parametrize(
    ("rule", "bounds"),
    [
        ({"mustBeGreaterThan": 10}, {"min": 11}),
        ({"mustBeGreaterOrEqualTo": 10}, {"min": 10}),
        ({"mustBeLessThan": 10}, {"max": 9}),
        ({"mustBeLessOrEqualTo": 10}, {"max": 10}),
        ({"mustBeBetween": [5, 10]}, {"min": 5, "max": 10}),
        ({"mustBe": 7}, {"min": 7, "max": 7}),
    ],
)
def test_row_count_operators(rule: dict[str, Any], bounds: dict[str, int]) -> None:
    contract, _ = one(
        {"name": "a", "logicalType": "string"},
        quality=[{"type": "library", "metric": "rowCount", **rule}],
    )
    assert contract.quality == [RowCount.model_validate({"row_count": bounds})]


def test_sql_placeholders_and_severity() -> None:
    contract, result = one(
        {
            "name": "amount",
            "logicalType": "number",
            "quality": [
                {
                    "type": "sql",
                    "query": "SELECT count(*) FROM ${object} WHERE ${property} < 0",
                    "mustBe": 0,
                    "severity": "error",
                },
                {
                    "type": "sql",
                    "query": "SELECT count(*) FROM {object} WHERE {property} > 1e6",
                    "mustBeLessOrEqualTo": 10,
                    "severity": "warning",
                },
                {
                    "type": "sql",
                    "query": "SELECT count(*) FROM {object}",
                    "mustBeLessThan": 5,
                    "severity": "info",
                    "name": "few",
                },
                {
                    "type": "sql",
                    "query": "SELECT avg(amount) FROM {object}",
                    "mustBeGreaterThan": 5,
                },
            ],
        },
        quality=[
            {
                "type": "sql",
                "query": "SELECT count(*) FROM orders o JOIN orders p ON 1=0",
                "mustBe": 0,
            }
        ],
    )
    assert contract.quality == [
        SqlRule(
            sql='SELECT count(*) FROM input WHERE "amount" < 0',
            must_be=0,
            name="amount.quality[0]",
            action="fail",
        ),
        SqlRule(
            sql='SELECT count(*) FROM input WHERE "amount" > 1e6',
            max=10,
            name="amount.quality[1]",
            action="warn",
        ),
        SqlRule(sql="SELECT count(*) FROM input", max=4, name="few", action="warn"),
        SqlRule(
            sql="SELECT count(*) FROM input o JOIN input p ON 1=0",
            must_be=0,
            name="orders.quality[0]",
        ),
    ]
    assert result.unsupported == [
        "schema[0].properties[0].quality[3]: sql rule mustBeGreaterThan 5 is not enforced "
        "(Sluice compares a query result with must_be or max only)"
    ]


def test_unsupported_rules_are_listed_not_dropped() -> None:
    contract, result = one(
        {
            "name": "a",
            "logicalType": "string",
            "quality": [
                {"type": "text", "description": "must be nice"},
                {"type": "custom", "engine": "soda", "implementation": "x"},
                {
                    "metric": "invalidValues",
                    "mustBeLessOrEqualTo": 5,
                    "unit": "percent",
                    "arguments": {"validValues": ["x"]},
                },
                {"metric": "nullValues", "mustBeGreaterThan": 1},
            ],
            "relationships": [{"to": "customers.id", "type": "foreignKey"}],
        },
        quality=[{"metric": "nullValues", "mustBe": 0}],
        servers=[
            {
                "server": "pg",
                "type": "postgres",
                "host": "h",
                "port": 5432,
                "database": "d",
                "schema": "s",
            }
        ],
        price={"priceAmount": 1},
        slaProperties=[{"property": "latency", "value": 4, "unit": "d"}],
    )
    assert contract.quality == [] and not contract.fields[0].required
    assert result.unsupported == [
        "servers, slaProperties, price: documentation only, not enforced",
        "schema[0].properties[0].relationships[0]: relationship to 'customers.id' is not "
        "enforced (a Sluice reference needs the file or table to read; add references: by hand)",
        "schema[0].properties[0].quality[0]: text rule is documentation only, not enforced "
        "(must be nice)",
        "schema[0].properties[0].quality[1]: custom rule for engine 'soda' is not enforced",
        "schema[0].properties[0].quality[2]: metric 'invalidValues' mustBeLessOrEqualTo 5 with "
        "unit percent is not enforced",
        "schema[0].properties[0].quality[3]: metric 'nullValues' mustBeGreaterThan 1 is not "
        "enforced",
        "schema[0].quality[0]: object-level metric 'nullValues' mustBe 0 is not enforced",
    ]


VALID_TOP = {
    "apiVersion": "v3.1.0",
    "kind": "DataContract",
    "id": "x",
    "version": "1",
    "status": "ok",
}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({**VALID_TOP}, "$.schema: the document is valid ODCS but has no 'schema' section"),
        ({**VALID_TOP, "schema": []}, "$.schema: the document is valid ODCS but has an empty"),
        ({**VALID_TOP, "schema": [{"name": "t"}]}, "$.schema[0] 't' has no properties"),
        ({"apiVersion": "v2.2.0", "kind": "DataContract", "dataset": []}, "apiVersion 'v2.2.0'"),
        ({"apiVersion": "v3.1.0", "kind": "Pipeline"}, "kind 'Pipeline'"),
        (odcs({"name": "a"}, {"name": "a"}), "fields named more than once"),
    ],
)
def test_refusals_name_the_construct(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        import_odcs(doc)


def test_object_without_properties_is_skipped_and_reported() -> None:
    doc = odcs({"name": "a", "logicalType": "string"})
    doc["schema"].append({"name": "elsewhere"})
    result = import_odcs(doc)
    assert [c.name for c in result.contracts] == ["orders"]
    assert "$.schema[1] 'elsewhere' has no properties; not imported" in result.unsupported


def test_yaml_text_and_file_keep_dates_as_strings(tmp_path: Path) -> None:
    text = (
        "apiVersion: v3.1.0\nkind: DataContract\nid: x\nstatus: draft\nversion: 1.0.0\nschema:\n"
        "  - name: t\n    properties:\n      - name: d\n        logicalType: date\n"
        "        examples: [2022-10-03]\n        logicalTypeOptions: {minimum: 2020-01-01}\n"
    )
    path = tmp_path / "c.odcs.yaml"
    path.write_text(text, encoding="utf-8")
    for source in (text, path, str(path)):
        (contract,) = import_odcs(source).contracts
        assert contract.fields[0].min == "2020-01-01"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read ODCS contract"):
        import_odcs(tmp_path / "nope.yaml")


def test_dump_contract_round_trips_every_construct() -> None:
    contract = parse_contract(
        {
            "name": "orders",
            "version": "3.2.1",
            "description": "d",
            "schema_policy": "freeze",
            "schema": [
                {
                    "name": "id",
                    "type": "string",
                    "required": True,
                    "unique": True,
                    "pattern": "A\\d+",
                    "min_length": 2,
                    "max_length": 9,
                    "pii": True,
                    "actions": {"required": "warn"},
                },
                {"name": "amount", "type": "decimal(12,2)", "min": 0, "max": 10.5},
                {"name": "day", "type": "date", "min": "2020-01-01", "enum": ["2020-01-02"]},
                {"name": "ok", "type": "bool", "action": "drop"},
            ],
            "quality": [
                {"freshness": "1 hour", "column": "day"},
                {"completeness": "99%", "columns": ["id"], "action": "warn"},
                {"row_count": {"min": 1}},
                {"sql": "SELECT 1", "must_be": 1, "name": "one"},
            ],
            "samples": 3,
        }
    )
    text = dump_contract(contract)
    assert parse_contract(yaml.safe_load(text)) == contract
    assert text.startswith("name: orders\nversion: 3.2.1\n")
    assert "2020-01-01" in text and "dead_letter" not in text  # defaults left out
    assert dump_contract(contract) == text  # stable


# ---------------------------------------------------------------------------------------------
# Each imported contract accepts a generated dataset that matches it
# ---------------------------------------------------------------------------------------------

_ALNUM = string.digits + string.ascii_letters


def _charset(items: list[tuple[Any, Any]]) -> list[str]:
    chars: list[str] = []
    negate = False
    for op, av in items:
        name = str(op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            chars.append(chr(av))
        elif name == "RANGE":
            chars += [chr(c) for c in range(av[0], av[1] + 1)]
        elif name == "CATEGORY":
            chars += {
                "CATEGORY_DIGIT": list(string.digits),
                "CATEGORY_WORD": list(_ALNUM + "_"),
                "CATEGORY_SPACE": [" "],
            }.get(str(av), [])
        else:
            raise ValueError(name)
    if negate:
        chars = [c for c in _ALNUM if c not in chars]
    if not chars:
        raise ValueError("empty character set")
    return chars


def pattern_value(pattern: str, seed: int) -> str:
    """A string that fully matches ``pattern``, different for each seed (for simple patterns:
    literals, classes, repeats, groups). Raises ValueError for constructs it does not handle."""
    out: list[str] = []

    def walk(items: Any) -> None:
        nonlocal seed
        for op, av in items:
            name = str(op)
            if name == "LITERAL":
                out.append(chr(av))
            elif name == "ANY":
                out.append("a")
            elif name in ("IN", "NOT_LITERAL"):
                chars = _charset(av if name == "IN" else [("NEGATE", None), ("LITERAL", av)])
                out.append(chars[seed % len(chars)])
                seed //= len(chars)
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, sub = av
                for _ in range(lo if lo == hi else min(hi, max(lo, 4))):
                    walk(sub)
            elif name == "SUBPATTERN":
                walk(av[-1])
            elif name == "BRANCH":
                walk(av[1][0])
            elif name == "AT":
                continue
            else:
                raise ValueError(f"cannot generate {name}")

    walk(sre_parse.parse(pattern))
    value = "".join(out)
    if not re.fullmatch(pattern, value):
        raise ValueError(f"generated {value!r} does not match {pattern!r}")
    return value


def _b36(i: int) -> str:
    digits = string.digits + string.ascii_lowercase
    s = ""
    while True:
        i, r = divmod(i, 36)
        s = digits[r] + s
        if i == 0:
            return s


def _strings(f: FieldSpec, n: int, examples: Sequence[Any], skipped: set[str]) -> list[str]:
    lo_len, hi_len = f.min_length or 0, f.max_length

    def fits(v: str) -> bool:
        return lo_len <= len(v) and (hi_len is None or len(v) <= hi_len)

    if f.pattern:
        try:
            values = [pattern_value(f.pattern, i) for i in range(n)]
            if all(map(fits, values)):
                return values
        except ValueError:
            pass
        good = [str(e) for e in examples if re.fullmatch(f.pattern, str(e)) and fits(str(e))]
        if good and (not f.unique or len(good) >= n):
            return [good[i % len(good)] for i in range(n)]
        skipped.add(f"{f.name}.pattern")  # no value known to match: that check is not asserted
    values = [_b36(i).rjust(lo_len, "0") for i in range(n)]
    if hi_len is not None:
        assert all(len(v) <= hi_len for v in values) or not f.unique, f.name
        values = [v[-hi_len:] if hi_len else "" for v in values]
    return values


def _column(f: FieldSpec, n: int, examples: Sequence[Any], skipped: set[str]) -> pa.Array:
    typ = parse_type(f.type) if f.type else pa.string()
    idx = np.arange(n, dtype=np.int64)
    if f.enum:
        assert not f.unique or n <= len(f.enum), f.name
        return pa.array([f.enum[i % len(f.enum)] for i in range(n)]).cast(typ)
    if pa.types.is_integer(typ):
        lo = (
            math.ceil(float(f.min))
            if f.min is not None
            else (math.floor(float(f.max)) - n + 1 if f.max is not None else 1)
        )
        hi = math.floor(float(f.max)) if f.max is not None else lo + n - 1
        assert not f.unique or hi - lo + 1 >= n, f.name
        return pa.array(lo + idx % (hi - lo + 1), type=typ)
    if pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        lo_f = (
            float(f.min) if f.min is not None else (float(f.max) - n if f.max is not None else 1.0)
        )
        hi_f = float(f.max) if f.max is not None else lo_f + n
        if pa.types.is_decimal(typ):
            hi_f = min(hi_f, 10.0 ** (typ.precision - typ.scale) - 10.0**-typ.scale)
            step = Decimal(1).scaleb(-typ.scale)
            values = [
                max(
                    Decimal(str(lo_f)),
                    min(
                        Decimal(str(hi_f)),
                        Decimal(str(lo_f + (hi_f - lo_f) * i / n)).quantize(step),
                    ),
                )
                for i in range(n)
            ]
            return pa.array(values, type=typ)
        return pa.array(lo_f + (hi_f - lo_f) * idx / n, type=typ)
    if pa.types.is_boolean(typ):
        return pa.array(idx % 2 == 0)
    if pa.types.is_date(typ):
        epoch = date(1970, 1, 1)
        lo_d = (
            date.fromisoformat(str(f.min))
            if f.min is not None
            else (
                date.fromisoformat(str(f.max)) - timedelta(days=n)
                if f.max is not None
                else date(2020, 1, 1)
            )
        )
        hi_d = date.fromisoformat(str(f.max)) if f.max is not None else lo_d + timedelta(days=n)
        span = (hi_d - lo_d).days + 1
        assert not f.unique or span >= n, f.name
        return pa.array(((lo_d - epoch).days + idx % span).astype(np.int32), type=pa.date32())
    if pa.types.is_timestamp(typ):

        def micros(v: Any) -> int:
            t = datetime.fromisoformat(str(v))
            t = t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
            return int(t.timestamp()) * 1_000_000 + t.microsecond

        lo_t = (
            micros(f.min)
            if f.min is not None
            else (micros(f.max) - n * 60_000_000 if f.max is not None else micros("2020-01-01"))
        )
        hi_t = micros(f.max) if f.max is not None else lo_t + n * 60_000_000
        span = (hi_t - lo_t) // 60_000_000 + 1
        return pa.array(lo_t + (idx % span) * 60_000_000, type=typ)
    values = _strings(f, n, examples, skipped)
    if pa.types.is_binary(typ):
        return pa.array([v.encode() for v in values], type=typ)
    return pa.array(values, type=pa.string())


def matching_table(
    contract: Contract,
    n: int = 50,
    *,
    examples: Mapping[str, Sequence[Any]] | None = None,
    skipped: set[str] | None = None,
) -> pa.Table:
    """A table of ``n`` rows (more or fewer when a row_count rule says so) whose values satisfy
    every FieldSpec: type, required (no nulls), unique, min/max, lengths, enum and pattern.
    Patterns are generated for simple regular expressions; otherwise values come from
    ``examples`` (the ODCS ``examples`` of the property) when they match, and otherwise the
    pattern check is added to ``skipped`` (not asserted). Unbounded numbers start at 1."""
    for rule in contract.quality:
        if isinstance(rule, RowCount):
            if rule.row_count.min is not None:
                n = max(n, rule.row_count.min)
            if rule.row_count.max is not None:
                n = min(n, rule.row_count.max)
    skipped = set() if skipped is None else skipped
    examples = examples or {}
    return pa.table(
        {f.name: _column(f, n, examples.get(f.name, ()), skipped) for f in contract.fields}
    )


def _examples(raw: dict[str, Any], name: str) -> dict[str, list[Any]]:
    obj = next(o for o in raw["schema"] if o.get("name") == name)
    return {p["name"]: p["examples"] for p in obj["properties"] if p.get("examples")}


def test_pattern_value_generator() -> None:
    values = {pattern_value("ACC[0-9]{8}", i) for i in range(50)}
    assert len(values) == 50 and all(re.fullmatch("ACC[0-9]{8}", v) for v in values)
    assert re.fullmatch(r"^[A-Z]{2}-\d+(x|y)?$", pattern_value(r"^[A-Z]{2}-\d+(x|y)?$", 3))
    with pytest.raises(ValueError):
        pattern_value(r"(a)\1", 0)


def test_matching_table_satisfies_a_rich_contract() -> None:
    from sluice.quality.engine import evaluate

    contract, _ = one(
        {
            "name": "id",
            "logicalType": "string",
            "primaryKey": True,
            "logicalTypeOptions": {"pattern": "ORD-[0-9]{4}"},
        },
        {
            "name": "amount",
            "logicalType": "number",
            "physicalType": "decimal(12,2)",
            "logicalTypeOptions": {"minimum": 0, "maximum": 100},
        },
        {
            "name": "age",
            "logicalType": "integer",
            "logicalTypeOptions": {"minimum": 18, "exclusiveMaximum": 100},
        },
        {
            "name": "status",
            "logicalType": "string",
            "quality": [
                {"metric": "invalidValues", "mustBe": 0, "arguments": {"validValues": ["a", "b"]}}
            ],
        },
        {"name": "code", "logicalType": "string", "physicalType": "varchar(2)", "unique": True},
        {
            "name": "day",
            "logicalType": "date",
            "required": True,
            "logicalTypeOptions": {"minimum": "2024-01-01", "maximum": "2024-12-31"},
        },
        {"name": "ts", "logicalType": "timestamp", "logicalTypeOptions": {"timezone": True}},
        quality=[{"metric": "rowCount", "mustBeGreaterThan": 60}],
    )
    table = matching_table(contract)
    assert table.num_rows == 61
    failures = evaluate(contract, table)
    assert failures and all(v == 0 for v in failures.values()), failures


@pytest.mark.parametrize("path", IMPORTED, ids=_id)
def test_each_imported_contract_accepts_matching_data(path: Path) -> None:
    from sluice.quality.engine import evaluate

    raw = _raw(path)
    for contract in imported_example(path).contracts:
        skipped: set[str] = set()
        table = matching_table(contract, examples=_examples(raw, contract.name), skipped=skipped)
        failures = evaluate(contract, table)
        # an object whose only fields are untyped (arrays, objects) has no check to run
        assert failures or all(f.type is None for f in contract.fields), contract.name
        bad = {k: v for k, v in failures.items() if v and k not in skipped}
        assert bad == {}, f"{contract.name}: {bad}"
        assert skipped == set(), skipped  # every pattern in the examples can be generated


# ---------------------------------------------------------------------------------------------
# Issue 8, item 6: the ODCS JSON Schema decides what a valid document is
# ---------------------------------------------------------------------------------------------


def test_i8_06_the_odcs_json_schema_ships_in_the_package() -> None:
    from importlib import resources

    from sluice.quality.odcs import ODCS_SCHEMA

    shipped = resources.files("sluice.quality").joinpath("schemas", ODCS_SCHEMA).read_bytes()
    original = EXAMPLES_DIR.parent / "schema" / ODCS_SCHEMA
    assert shipped == original.read_bytes()  # unchanged copy
    assert "v3.1.0" in ODCS_SCHEMA


@pytest.mark.parametrize(
    ("change", "problems"),
    [
        (
            {"drop": ["status", "version"]},
            ["$.status: required key missing", "$.version: required key missing"],
        ),
        (
            {"add": {"owner": "me", "schemas": []}},
            [
                "$.owner: unknown key (not in ODCS v3.1.0)",
                "$.schemas: unknown key (not in ODCS v3.1.0)",
            ],
        ),
        (
            {"prop": {"required": "yes"}},
            ["$.schema[0].properties[0].required: 'yes' is not of type 'boolean'"],
        ),
        (
            {"prop": {"quality": [{"metric": "nullValues", "mustBe": 0, "mustBeLessThan": 2}]}},
            [
                "$.schema[0].properties[0].quality[0]: matches more than one of the allowed "
                "forms (mustBe, mustBeLessThan): give only one"
            ],
        ),
        ({"add": {"version": 1.5}}, ["$.version: 1.5 is not text: quote it ('1.5')"]),
        (
            {"prop": {"logicalTypeOptions": {"minLength": -1, "enum": ["a"]}}},
            [
                "$.schema[0].properties[0].logicalTypeOptions.enum: unknown key (not in ODCS "
                "v3.1.0)",
                "$.schema[0].properties[0].logicalTypeOptions.minLength: -1 is less than the "
                "minimum of 0",
            ],
        ),
    ],
)
def test_i8_06_import_refuses_a_document_that_violates_the_odcs_schema(
    change: dict[str, Any], problems: list[str]
) -> None:
    """Every violation, with its JSON path; before this, a missing status / an unknown key
    passed, ``required: "yes"`` silently gave no required check, and a misspelt ``schemas``
    was reported as "no 'schema' section"."""
    from sluice.quality.odcs import schema_problems

    doc = odcs({"name": "a", "logicalType": "string", **change.get("prop", {})})
    for key in change.get("drop", []):
        del doc[key]
    doc.update(change.get("add", {}))
    if "schemas" in doc:
        doc["schemas"] = doc.pop("schema")
    assert schema_problems(doc) == problems
    with pytest.raises(ConfigError) as info:
        import_odcs(doc)
    message = str(info.value)
    assert f"is not a valid ODCS v3 document ({len(problems)} problem(s))" in message
    assert all(p in message for p in problems)
    assert info.value.field == problems[0].split(":")[0]
    assert "no 'schema' section" not in message


@pytest.mark.parametrize(
    ("prop", "quality", "path", "problem"),
    [
        (
            {"logicalTypeOptions": {"pattern": "(?=a)[a-z]+"}},
            None,
            "$.schema[0].properties[0].logicalTypeOptions.pattern",
            "look-around",
        ),
        (
            {"logicalType": "date", "logicalTypeOptions": {"minimum": "soon"}},
            None,
            "$.schema[0].properties[0].logicalTypeOptions.minimum",
            "'soon' cannot be read as a date",
        ),
        (
            {},
            [{"type": "sql", "query": "SELECT count(*) FROM t WHERE ${property} < 0", "mustBe": 0}],
            "$.schema[0].quality[0]",
            "${property} placeholder at object level",
        ),
    ],
)
def test_i8_06_a_value_sluice_cannot_map_is_an_error_not_a_dropped_check(
    prop: dict[str, Any], quality: list[dict[str, Any]] | None, path: str, problem: str
) -> None:
    doc = odcs({"name": "a", "logicalType": "string", **prop}, quality=quality)
    from sluice.quality.odcs import schema_problems

    assert schema_problems(doc) == []  # valid ODCS, but Sluice cannot turn it into a check
    with pytest.raises(ConfigError) as info:
        import_odcs(doc)
    assert info.value.field == path
    assert problem in str(info.value) and "Sluice cannot map it to a check" in str(info.value)


def test_i8_06_exclusive_integer_bounds_map_exactly() -> None:
    spec, result = field(
        {
            "name": "n",
            "logicalType": "integer",
            "logicalTypeOptions": {"exclusiveMinimum": 0.5, "exclusiveMaximum": 9.5},
        }
    )
    assert (spec.min, spec.max) == (1, 9)
    assert result.unsupported == []
