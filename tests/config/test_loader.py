"""Pipeline configs: YAML and Python give the same graph; every mistake is reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

import sluice
from sluice.config import json_schema, load_pipeline, parse_pipeline
from sluice.errors import ConfigError, ConfigErrors

ROOT = Path(__file__).resolve().parents[2]

YAML = """
pipeline: orders
source: {kind: csv, path: "${DATA_DIR:-data}/*.csv", delimiter: ";"}
steps:
  - {id: types, cast: {amount: "decimal(12,2)"}}
  - {id: big, filter: "amount > 100"}
  - {id: vat, derive: {vat: "amount * 0.2"}}
sinks:
  - {id: out, kind: parquet, path: out/orders, partition_by: [country]}
"""


def test_yaml_and_python_build_the_same_graph(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(YAML)
    from_yaml = load_pipeline(path, env={})
    p = sluice.Pipeline("orders")
    s = p.read(sluice.csv("data/*.csv", delimiter=";"))
    s = s.cast("types", {"amount": "decimal(12,2)"}).filter("big", "amount > 100")
    s.derive("vat", {"vat": "amount * 0.2"}).write(
        "out", sluice.parquet("out/orders", partition_by=["country"])
    )
    assert p.build() == from_yaml
    with pytest.raises(Exception, match="frozen"):
        from_yaml.steps[0].id = "x"  # type: ignore[misc]


def test_python_builder_takes_every_sql_and_join_option() -> None:
    """The builder reaches the options the sql and join steps gained (tables, per_batch,
    memory_limit, on_duplicate_keys): the same graph as the YAML form."""
    raw = {
        "pipeline": "p",
        "source": {"kind": "csv", "path": "in.csv"},
        "steps": [
            {
                "id": "s",
                "sql": "SELECT * FROM input JOIN rates USING (cur)",
                "tables": {"rates": {"kind": "csv", "path": "rates.csv"}},
                "per_batch": True,
                "memory_limit": "512MB",
            },
            {
                "id": "j",
                "join": {
                    "reference": {"kind": "csv", "path": "ref.csv"},
                    "key": ["id"],
                    "on_duplicate_keys": "last",
                },
            },
        ],
    }
    p = sluice.Pipeline("p")
    s = p.read(sluice.csv("in.csv")).sql(
        "s",
        "SELECT * FROM input JOIN rates USING (cur)",
        tables={"rates": sluice.csv("rates.csv")},
        per_batch=True,
        memory_limit="512MB",
    )
    s.join("j", sluice.csv("ref.csv"), key=["id"], on_duplicate_keys="last")
    assert p.build() == parse_pipeline(raw, env={})


def test_env_interpolation() -> None:
    raw = yaml.safe_load(YAML)
    assert parse_pipeline(raw, env={"DATA_DIR": "/in"}).source.path == "/in/*.csv"
    raw["sinks"][0]["path"] = "${OUT}"
    with pytest.raises(ConfigErrors, match=r"\$\{OUT\} is not set.*export OUT"):
        parse_pipeline(raw, env={})


def test_every_mistake_is_reported_at_once_with_step_value_and_fix() -> None:
    raw = {
        "pipeline": "p",
        "source": {"kind": "csv", "path": "x.csv", "delimter": ";"},
        "steps": [
            {"id": "a", "filtr": "x > 1"},
            {"id": "b", "cast": {"x": "decimel"}},
            {"id": "b", "from": "aa", "filter": "x > 1"},
        ],
        "sinks": [
            {"id": "o", "kind": "parqet", "path": "out"},
            {"id": "pg", "kind": "postgres", "dsn": "x", "table": "t", "mode": "upsert"},
        ],
    }
    with pytest.raises(ConfigErrors) as info:
        parse_pipeline(raw)
    errs = info.value.errors
    text = [str(e) for e in errs]
    assert len(errs) == 7, text
    assert any(
        "source 'source', field 'delimter'" in t and "did you mean 'delimiter'" in t for t in text
    )
    assert any(t.startswith("step 'a'") and "exactly one of" in t for t in text)
    assert any("step 'b', field 'cast'" in t and "decimel" in t for t in text)
    assert any("step 'b', field 'id': duplicate id" in t for t in text)
    assert any("field 'from'" in t and "'aa'" in t and "did you mean 'a'" in t for t in text)
    assert any(t.startswith("sink 'o'") and "parqet" in t for t in text)
    assert any("sink 'pg', field 'key'" in t and "upsert" in t for t in text)
    assert all(isinstance(e, ConfigError) and e.step_id for e in errs)


def test_yaml_errors_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="cannot read pipeline file"):
        load_pipeline(tmp_path / "missing.yaml")


def test_json_schema_validates_the_example_and_rejects_mistakes() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    example = yaml.safe_load((ROOT / "examples/orders/pipeline.yaml").read_text())
    jsonschema.validate(example, schema)
    example["sinks"][0]["kind"] = "nope"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(example, schema)


def test_published_schema_file_is_up_to_date() -> None:
    published = json.loads((ROOT / "docs/pipeline.schema.json").read_text())
    assert published == json_schema(), "run: make schema"


def test_i8_24_an_expression_cut_by_a_yaml_flow_mapping_says_to_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "pipeline: p\n"
        "source: {kind: csv, path: x.csv}\n"
        "steps:\n"
        "  - id: w\n"
        "    window: {size: 1m, time: ts}\n"
        "    aggregate: {p95: percentile(temperature, 0.95), n: count()}\n"
        "  - {id: d, derive: {x: 'round(a, 2)', y: coalesce(a, b, c)}}\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_pipeline(path, env={})
    text = [str(e) for e in info.value.errors]
    assert len(text) == 2, text
    assert text[0] == (
        "step 'w', field 'aggregate.p95': YAML cut this expression at a comma (inside {...} "
        "or [...] a comma separates entries) (got 'percentile(temperature, 0.95)'). "
        'Fix: quote it: p95: "percentile(temperature, 0.95)"'
    )
    assert "'aggregate.0.95)'" not in str(info.value)  # the old, baffling field name
    assert text[1].startswith("step 'd', field 'derive.y'") and "coalesce(a, b, c)" in text[1]
    # quoted, the same file is fine apart from the (unknown) aggregate function
    path.write_text(path.read_text().replace("percentile(temperature, 0.95)", "count()"))
    path.write_text(path.read_text().replace("coalesce(a, b, c)", "'coalesce(a, b, c)'"))
    assert load_pipeline(path, env={}).steps[1].derive["y"] == "coalesce(a, b, c)"


def test_i8_24_a_misspelt_step_key_gets_did_you_mean_and_sinks_are_called_sinks() -> None:
    raw = {
        "pipeline": "p",
        "source": {"kind": "csv", "path": "x.csv", "delimter": ";"},
        "steps": [
            {"id": "a", "filtr": "x > 1"},
            {"id": "b", "filter": "x > 1", "derive": {"y": "1"}},
        ],
        "sinks": [{"id": "o", "kind": "parquet", "path": "out", "rows_per_file": 0}],
    }
    with pytest.raises(ConfigErrors) as info:
        parse_pipeline(raw, env={})
    text = [str(e) for e in info.value.errors]
    assert any(
        t.startswith("step 'a':") and "Fix: did you mean 'filter' (instead of 'filtr')?" in t
        for t in text
    ), text
    assert any(t.startswith("step 'b':") and "split filter and derive" in t for t in text)
    assert any(t.startswith("source 'source', field 'delimter'") for t in text)
    assert any(t.startswith("sink 'o', field 'rows_per_file'") for t in text)
    assert [e.role for e in info.value.errors] == ["source", "step", "step", "sink"]
