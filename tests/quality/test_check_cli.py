"""`sluice check` and `sluice contract import` (issue 8: items 3, 6 and 12).

The verdict of a check is the same for the same data in CSV, Parquet, JSON and JSON lines; any
failed check makes the exit code non-zero whatever its action; reading nothing is not a pass;
no dead-letter folder appears unless asked; ODCS documents are validated against the ODCS JSON
Schema, and every file of the shared ODCS folder imports or is refused by path."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import yaml
from test_odcs import EXAMPLES_DIR, _examples, _raw, imported_example, matching_table
from typer.testing import CliRunner

from sluice.cli import app
from sluice.errors import ConfigError
from sluice.quality.contract import Contract, RowCount, load_contract
from sluice.quality.odcs import dump_contract

runner = CliRunner()
ODCS_DIR = EXAMPLES_DIR.parent
FORMATS = ("csv", "parquet", "json", "jsonl")


def check(*args: str) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["check", *args, "--json", "--no-progress"])
    return result.exit_code, json.loads(result.stdout)


def write_formats(frame: pl.DataFrame, folder: Path) -> dict[str, Path]:
    """The same table as CSV, Parquet, JSON (an array of objects) and JSON lines."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"data.{kind}" for kind in FORMATS}
    frame.write_csv(paths["csv"])
    frame.write_parquet(paths["parquet"])
    frame.write_ndjson(paths["jsonl"])
    rows = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
    paths["json"].write_text(json.dumps(rows))
    return paths


def verdicts(paths: dict[str, Path], contract: Path) -> dict[str, tuple[int, dict[str, int]]]:
    """Per format: the exit code, and the failures of every check and gate."""
    out = {}
    for kind, path in paths.items():
        code, data = check(str(path), "-c", str(contract))
        assert data["rows"] > 0 and data["unread"] == 0, (kind, data)
        failed = {c["check"]: c["failed"] for c in [*data["checks"], *data["gates"]]}
        out[kind] = (code, failed)
    return out


# ---------------------------------------------------------------------------------------------
# 6: the same verdict for CSV, Parquet, JSON and JSON lines
# ---------------------------------------------------------------------------------------------

TABLE = pl.DataFrame(
    {
        "id": [1, 2, 2, 3, None, 5],
        "email": ["a@x.org", "bad", "ok@x.org", None, "e@x.org", ""],
        "amount": [2.5, -1.0, 3.0, None, 10.25, 7.0],
        "day": [
            dt.date(2024, 1, 1),
            dt.date(2023, 5, 1),
            None,
            dt.date(2024, 2, 2),
            dt.date(2024, 3, 3),
            dt.date(2025, 1, 1),
        ],
        "ts": [
            dt.datetime(2024, 1, 1, 10),
            None,
            dt.datetime(2024, 1, 2, 11, 30),
            dt.datetime(2024, 1, 3),
            dt.datetime(2024, 1, 4),
            dt.datetime(2024, 1, 5),
        ],
        "flag": [True, False, None, True, True, False],
        "status": ["paid", "paid", "refunded", "weird", None, "paid"],
    }
)

HAND_WRITTEN = {
    "every_check": {
        "name": "every_check",
        "version": "3.0.0",
        "schema": [
            {"name": "id", "type": "int", "required": True, "unique": True},
            {"name": "email", "type": "string", "pattern": "[^@]+@[^@]+", "required": True},
            {"name": "amount", "type": "double", "min": 0, "max": 10},
            {"name": "day", "type": "date", "min": "2024-01-01"},
            {"name": "ts", "type": "timestamp", "required": True, "max": "2024-01-04T00:00:00"},
            {"name": "flag", "type": "bool"},
            {"name": "status", "type": "string", "enum": ["paid", "refunded"], "action": "warn"},
        ],
        "quality": [
            {"completeness": "90%", "columns": ["email"]},
            {"row_count": {"min": 10}},
            {"sql": "SELECT count(*) FROM input WHERE amount > 5", "max": 0},
        ],
    },
    # a newer contract version on older data: a declared column the data lacks
    "v3_on_v1_data": {
        "name": "orders",
        "version": "3.0.0",
        "schema": [
            {"name": "id", "type": "int"},
            {"name": "email", "min_length": 3, "max_length": 7},
            {"name": "currency", "type": "string", "required": True},
        ],
    },
    "decimals_and_untyped": {
        "name": "c3",
        "schema": [
            {"name": "id", "type": "decimal(10,2)", "min": 2},
            {"name": "amount", "type": "decimal(5,1)"},
            {"name": "day", "type": "timestamp"},
            {"name": "status", "enum": ["paid"], "action": "drop"},
            {"name": "email", "unique": True, "pattern": ".*@x[.]org"},
        ],
    },
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_i8_06_same_verdict_for_csv_parquet_json_and_json_lines(name: str, tmp_path: Path) -> None:
    contract = tmp_path / "contract.yaml"
    contract.write_text(yaml.safe_dump(HAND_WRITTEN[name]))
    got = verdicts(write_formats(TABLE, tmp_path / "data"), contract)
    assert got["csv"] == got["parquet"] == got["json"] == got["jsonl"], got
    code, failed = got["parquet"]
    assert code == 1 and any(failed.values())  # each contract has failing checks here


def test_i8_06_the_verdicts_are_the_right_ones(tmp_path: Path) -> None:
    """Pin the numbers of one contract, so that 'the same in every format' is also 'right'."""
    contract = tmp_path / "contract.yaml"
    contract.write_text(yaml.safe_dump(HAND_WRITTEN["every_check"]))
    _, failed = verdicts(write_formats(TABLE, tmp_path / "data"), contract)["csv"]
    assert failed == {
        **{f"{f}.present": 0 for f in TABLE.columns},
        "id.type": 0,
        "id.required": 1,
        "id.unique": 1,
        "email.type": 0,
        "email.required": 2,  # null and "" (CSV writes both as an empty field)
        "email.pattern": 1,
        "amount.type": 0,
        "amount.min": 1,
        "amount.max": 1,
        "day.type": 0,
        "day.min": 1,
        "ts.type": 0,
        "ts.required": 1,
        "ts.max": 1,
        "flag.type": 0,
        "status.type": 0,
        "status.enum": 1,
        "completeness(email) >= 90.00%": 2,
        "row_count in [10, None]": 1,
        "sql: SELECT count(*) FROM input WHERE amount > 5": 1,
    }


def _odcs_cases() -> list[tuple[str, str]]:
    """(file, contract name) for the imported ODCS examples (a few of the 68 AdventureWorks
    tables)."""
    cases = []
    for path in sorted(EXAMPLES_DIR.glob("**/*.odcs.yaml")):
        try:
            contracts = imported_example(path).contracts
        except ConfigError:
            continue
        for c in contracts[:2]:
            if any(f.type for f in c.fields):
                cases.append((str(path.relative_to(EXAMPLES_DIR)), c.name))
    return cases


def _spoil(table: pa.Table, contract: Contract) -> pl.DataFrame:
    """The matching table with planted faults: row 1 repeats row 0, row 2 holds nulls."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    if frame.height < 3:
        return frame
    frame = pl.concat([frame.head(1), frame.slice(0, 1), frame.slice(2)], how="vertical")
    nullable = [f.name for f in contract.fields if f.type is not None][:3]
    return (
        frame.with_row_index("__i")
        .with_columns(
            pl.when(pl.col("__i") == 2).then(None).otherwise(pl.col(c)).alias(c) for c in nullable
        )
        .drop("__i")
    )


@pytest.mark.parametrize(("file", "name"), _odcs_cases(), ids=lambda x: str(x))
def test_i8_06_same_verdict_for_every_format_with_imported_odcs_contracts(
    file: str, name: str, tmp_path: Path
) -> None:
    path = EXAMPLES_DIR / file
    contract = next(c for c in imported_example(path).contracts if c.name == name)
    # generated without the row_count gates (one asks for a million rows); they stay in the
    # contract that is checked, and fail the same way in every format
    plain = contract.model_copy(update={"quality": []})
    table = matching_table(plain, n=8, examples=_examples(_raw(path), name))
    target = tmp_path / "contract.yaml"
    target.write_text(dump_contract(contract))
    typed = [f for f in contract.fields if f.type]
    frame = _spoil(table, contract).select([f.name for f in contract.fields])
    frame = frame.select(
        [
            c
            for c in frame.columns
            if not isinstance(frame.schema[c], (pl.Binary, pl.List, pl.Struct, pl.Object))
        ]
    )
    # a row number column (not in the contract: passed through): in a one-column CSV a null is
    # an empty line, which CSV readers skip
    frame = frame.with_row_index("_row_no")
    got = verdicts(write_formats(frame, tmp_path / "data"), target)
    assert got["csv"] == got["parquet"] == got["json"] == got["jsonl"], got
    assert typed and len(got["csv"][1]) >= len(typed)


# ---------------------------------------------------------------------------------------------
# 6: exit codes, whatever the action
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["dead_letter", "drop", "warn", "fail"])
def test_i8_06_check_exits_non_zero_when_any_check_fails_whatever_the_action(
    action: str, tmp_path: Path
) -> None:
    contract = tmp_path / "c.yaml"
    contract.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "schema": [{"name": "id", "type": "int", "unique": True, "action": action}],
                "quality": [{"row_count": {"min": 1}, "action": "warn"}],
            }
        )
    )
    (tmp_path / "bad.csv").write_text("id\n1\n1\n2\n")
    (tmp_path / "good.csv").write_text("id\n1\n2\n3\n")
    code, data = check(str(tmp_path / "bad.csv"), "-c", str(contract))
    assert (code, data["verdict"], data["failed_checks"]) == (1, "failed", ["id.unique"])
    checks = {c["check"]: c for c in data["checks"]}
    assert checks["id.unique"]["action"] == action and checks["id.unique"]["failed"] == 1
    code, data = check(str(tmp_path / "good.csv"), "-c", str(contract))
    assert (code, data["verdict"], data["failed_checks"]) == (0, "passed", [])


def test_i8_06_a_failed_warn_gate_also_fails_the_check(tmp_path: Path) -> None:
    contract = tmp_path / "c.yaml"
    contract.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "schema": [{"name": "id", "type": "int"}],
                "quality": [{"row_count": {"min": 5}, "action": "warn"}],
            }
        )
    )
    (tmp_path / "d.csv").write_text("id\n1\n")
    code, data = check(str(tmp_path / "d.csv"), "-c", str(contract))
    assert code == 1 and data["failed_checks"] == ["row_count in [5, None]"]


def test_i8_06_check_help_lists_the_exit_codes() -> None:
    text = runner.invoke(app, ["check", "--help"]).output
    for line in ("Exit codes", "0  every record", "1  a check or gate failed", "2  usage", "3  "):
        assert line in text, line


def test_i8_06_unreadable_records_fail_the_check(tmp_path: Path) -> None:
    contract = tmp_path / "c.yaml"
    contract.write_text(yaml.safe_dump({"name": "t", "schema": [{"name": "a"}, {"name": "b"}]}))
    (tmp_path / "d.csv").write_text("a,b\n1,2\n3,4,5\n")  # a row with a field too many
    code, data = check(str(tmp_path / "d.csv"), "-c", str(contract))
    assert (code, data["failed_checks"], data["unread"]) == (1, [], 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: t\nschema: [{name: a, patern: x}]\n", "unknown key 'patern' at schema[0].patern"),
        ("name: t\nschema: [{name: a}\n", "is not valid YAML"),
        ("- name: t\n", "must be a mapping"),
        ("name: t\nschemas: []\n", "unknown key 'schemas'"),
    ],
)
def test_i8_06_a_bad_contract_file_exits_2_naming_file_key_and_fix(
    text: str, message: str, tmp_path: Path
) -> None:
    contract = tmp_path / "bad.yaml"
    contract.write_text(text)
    (tmp_path / "d.csv").write_text("a\n1\n")
    result = runner.invoke(app, ["check", str(tmp_path / "d.csv"), "-c", str(contract)])
    assert result.exit_code == 2
    assert message in result.output and str(contract) in result.output
    assert "Fix:" in result.output
    with pytest.raises(ConfigError) as info:
        load_contract(contract)
    assert info.value.fix and str(contract) in str(info.value)


def test_i8_06_unknown_contract_key_suggests_the_right_one(tmp_path: Path) -> None:
    contract = tmp_path / "c.yaml"
    contract.write_text("name: t\nschema:\n  - {name: a}\n  - {name: b, requird: true}\n")
    with pytest.raises(ConfigError) as info:
        load_contract(contract)
    err = info.value
    assert err.field == "schema[1].requird"
    assert "unknown key 'requird' at schema[1].requird (field 'b'): did you mean 'required'?" in (
        str(err)
    )
    assert err.fix == "rename 'requird' to 'required'"


# ---------------------------------------------------------------------------------------------
# 12: reading nothing is not a pass; no dead-letter folder unless asked
# ---------------------------------------------------------------------------------------------


def _contract(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"name": "t", "schema": [{"name": "id", "type": "int", "unique": True}]})
    )
    return path


def test_i8_12_json_lines_in_a_json_file_read_nothing_and_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_text('{"id": 1}\n{"id": 2}\n')
    result = runner.invoke(
        app, ["check", "data.json", "-c", str(_contract(tmp_path)), "--no-progress"]
    )
    assert result.exit_code == 3, result.output
    assert "nothing was read" in result.output
    assert "every record of data.json was a dead letter (parse_error: 1)" in result.output
    assert "pass --kind jsonl" in result.output
    code, data = check("data.json", "-c", str(_contract(tmp_path)))
    assert (code, data["verdict"], data["rows"]) == (3, "nothing_read", 0)
    fixed, data = check("data.json", "-c", str(_contract(tmp_path)), "--kind", "jsonl")
    assert (fixed, data["rows"]) == (0, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "data.json"]


def test_i8_12_an_empty_input_reads_nothing_and_fails(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("id\n")
    code, data = check(str(tmp_path / "empty.csv"), "-c", str(_contract(tmp_path)))
    assert (code, data["verdict"]) == (3, "nothing_read")
    assert "holds no records" in data["message"]


def test_i8_12_check_writes_dead_letters_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("id\n1\n1\nx\n")
    contract = _contract(tmp_path)
    code, data = check("d.csv", "-c", str(contract))
    assert (code, data["dead_letters"], data["dead_letter_path"]) == (1, 2, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "d.csv"]
    text = runner.invoke(app, ["check", "d.csv", "-c", str(contract), "--no-progress"]).output
    assert "pass --dead-letters PATH to keep them" in text
    code, data = check("d.csv", "-c", str(contract), "--dead-letters", "letters")
    assert code == 1 and data["dead_letter_path"]
    files = list((tmp_path / "letters").glob("*.jsonl"))
    assert len(files) == 1
    letters = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert sorted(d["message"] for d in letters) == ["id: 1 was seen before", "id: x is not a int"]


# ---------------------------------------------------------------------------------------------
# 6: ODCS import validates against the ODCS JSON Schema
# ---------------------------------------------------------------------------------------------


def test_i8_06_contract_import_reports_schema_errors_with_their_paths(tmp_path: Path) -> None:
    doc = tmp_path / "bad.odcs.yaml"
    doc.write_text(
        "apiVersion: v3.1.0\nkind: DataContract\nid: x\nowner: me\n"
        "schema:\n  - name: t\n    properties:\n      - {name: a, required: 'yes'}\n"
    )
    result = runner.invoke(app, ["contract", "import", str(doc)])
    assert result.exit_code == 1
    for line in (
        "$.owner: unknown key (not in ODCS v3.1.0)",
        "$.schema[0].properties[0].required: 'yes' is not of type 'boolean'",
        "$.status: required key missing",
        "$.version: required key missing",
    ):
        assert line in result.output, line
    assert "no 'schema' section" not in result.output


def _huge(rule: Any) -> bool:
    return isinstance(rule, RowCount) and (rule.row_count.min or 0) > 10_000


def test_i8_06_every_odcs_file_of_the_shared_folder_imports_or_is_refused(tmp_path: Path) -> None:
    """Every YAML file under the shared ODCS folder: it imports (and each contract written by
    `sluice contract import` accepts a generated matching table through `sluice check`), or it
    is refused with an error naming the JSON path."""
    files = sorted(p for p in ODCS_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))
    imported: dict[str, int] = {}
    refused: dict[str, str] = {}
    for path in files:
        key = str(path.relative_to(ODCS_DIR))
        out = tmp_path / key.replace("/", "_")
        result = runner.invoke(app, ["contract", "import", str(path), "-o", str(out)])
        if result.exit_code != 0:
            assert "$." in result.output and "Fix:" in result.output, result.output
            refused[key] = result.output
            continue
        contracts = imported_example(path).contracts
        imported[key] = len(contracts)
        for c in contracts[:3]:
            if not any(f.type for f in c.fields):
                continue
            written = (
                out if len(contracts) == 1 else out.with_name(f"{out.stem}.{c.name}{out.suffix}")
            )
            # one example asks for more than a million rows: that gate is left out here
            small = c.model_copy(update={"quality": [q for q in c.quality if not _huge(q)]})
            written.write_text(dump_contract(small))
            table = matching_table(small, n=20, examples=_examples(_raw(path), c.name))
            data = tmp_path / f"{written.stem}.parquet"
            pl.from_arrow(table).write_parquet(data)  # type: ignore[union-attr]
            code, verdict = check(str(data), "-c", str(written))
            assert (code, verdict["failed_checks"]) == (0, []), (key, c.name)
    assert len(files) == 18
    assert (len(imported), len(refused)) == (12, 6)
    assert all("$.schema" in text for text in refused.values())
