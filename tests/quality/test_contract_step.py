"""The contract step in real pipelines over real files; `sluice check`; PII never leaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sluice.cli import app
from sluice.config import parse_pipeline
from sluice.quality.engine import ContractFailure
from sluice.quality.step import ContractCheck
from sluice.runtime.executor import Executor

runner = CliRunner()

CONTRACT = {
    "name": "customers",
    "version": "1.2.0",
    "schema": [
        {"name": "id", "type": "int", "required": True, "unique": True},
        {"name": "email", "type": "string", "pattern": "[^@ ]+@[^@ ]+", "pii": True},
        {"name": "age", "type": "int", "min": 0, "max": 130, "actions": {"max": "drop"}},
        {"name": "tier", "enum": ["free", "pro"], "action": "warn"},
    ],
    "quality": [{"completeness": "50%", "columns": ["email"]}],
}
EMAILS = [
    "ann@example.org",
    "bob@example.org",
    "not-an-email-carol",
    "dan@example.org",
    "eve@example.org",
    "fay@example.org",
]
ROWS = [
    "id,email,age,tier",
    f"1,{EMAILS[0]},34,free",
    f"2,{EMAILS[1]},200,pro",  # age > max: dropped
    f"3,{EMAILS[2]},41,gold",  # bad email: dead letter; tier warns
    f"1,{EMAILS[3]},22,free",  # duplicate id: dead letter
    f"x,{EMAILS[4]},19,pro",  # id not an int: dead letter
    f"6,{EMAILS[5]},27,pro,extra-field",  # wrong field count: dead letter from the source
]


def _setup(tmp_path: Path, contract: dict[str, object] = CONTRACT) -> Path:
    (tmp_path / "in.csv").write_text("\n".join(ROWS) + "\n")
    (tmp_path / "contract.yaml").write_text(yaml.safe_dump(contract))
    return tmp_path


def _pipeline(tmp_path: Path) -> dict[str, object]:
    return {
        "pipeline": "people",
        "source": {"kind": "csv", "path": "in.csv", "infer_types": False},
        "steps": [{"id": "validate", "contract": "contract.yaml"}],
        "sinks": [{"id": "out", "kind": "jsonl", "path": "out"}],
        "dead_letter": {"kind": "jsonl", "path": "dl"},
    }


def test_contract_step_in_a_pipeline(tmp_path: Path) -> None:
    _setup(tmp_path)
    rep = Executor(parse_pipeline(_pipeline(tmp_path)), base_dir=tmp_path, progress=False).run()
    assert rep.status == "succeeded" and rep.balanced
    st = rep.step("validate")
    assert (st.rows_in, st.rows_out, st.dead, st.filtered) == (5, 1, 3, 1)
    checks = {c["check"]: c for c in rep.quality["validate"]["checks"]}
    assert checks["id.unique"]["failed"] == 1 and checks["id.type"]["samples"] == ["x"]
    assert checks["tier.enum"]["failed"] == 1 and checks["tier.enum"]["action"] == "warn"
    assert checks["email.pattern"]["samples"] == ["<redacted>"]
    assert rep.quality["validate"]["gates"][0]["failed"] == 0
    out = [
        json.loads(x)
        for f in (tmp_path / "out").glob("*.jsonl")
        for x in f.read_text().splitlines()
    ]
    assert [r["id"] for r in out] == [1]


def test_pii_never_appears_in_any_output(tmp_path: Path) -> None:
    """Dead letters, the run report, stdout/stderr of `sluice run` and `sluice check`: no e-mail
    address of the input appears in clear text anywhere except the main output."""
    _setup(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(_pipeline(tmp_path)))
    result = runner.invoke(app, ["run", str(tmp_path / "p.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    check = runner.invoke(
        app,
        [
            "check",
            str(tmp_path / "in.csv"),
            "--contract",
            str(tmp_path / "contract.yaml"),
            "--json",
        ],
    )
    texts = [result.output, check.output]
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.suffix in (".jsonl", ".json") and "out" not in f.parts:
            texts.append(f.read_text())
    assert len(texts) > 3
    for text in texts:
        for email in EMAILS:
            assert email not in text, f"PII {email!r} leaked"
    letters = [
        json.loads(x) for f in (tmp_path / "dl").glob("*.jsonl") for x in f.read_text().splitlines()
    ]
    assert {d["reason"] for d in letters} == {"contract_violation", "column_count"}
    raw = next(d for d in letters if d["reason"] == "column_count")
    assert raw["payload"].startswith("<redacted>")  # raw lines cannot be taken apart: redacted


def test_failed_gate_stops_the_run_and_names_the_rule(tmp_path: Path) -> None:
    strict = {
        **CONTRACT,
        "quality": [{"completeness": "99%", "columns": ["email"]}, {"row_count": {"max": 3}}],
    }
    _setup(tmp_path, strict)
    ROWS_WITH_NULLS = [*ROWS[:2], "7,,30,free"]
    (tmp_path / "in.csv").write_text("\n".join(ROWS_WITH_NULLS) + "\n")
    with pytest.raises(ContractFailure, match=r"step 'validate'.*completeness\(email\) >= 99.00%"):
        Executor(parse_pipeline(_pipeline(tmp_path)), base_dir=tmp_path, progress=False).run()
    assert not list((tmp_path / "out").glob("*.jsonl")), "sinks roll back on a failed gate"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(_pipeline(tmp_path)))
    result = runner.invoke(app, ["run", str(tmp_path / "p.yaml"), "--no-progress"])
    assert result.exit_code == 1 and "completeness(email)" in result.output


def test_sluice_check_prints_a_report_and_json(tmp_path: Path) -> None:
    _setup(tmp_path)
    text = runner.invoke(
        app, ["check", str(tmp_path / "in.csv"), "-c", str(tmp_path / "contract.yaml")]
    )
    assert text.exit_code == 1, text.output  # checks failed (whatever their action)
    assert "contract customers v1.2.0" in text.output and "id.unique" in text.output
    as_json = runner.invoke(
        app, ["check", str(tmp_path / "in.csv"), "-c", str(tmp_path / "contract.yaml"), "--json"]
    )
    data = json.loads(as_json.stdout)
    assert data["contract"] == "customers" and data["rows"] == 5
    assert {c["check"]: c["failed"] for c in data["checks"]}["age.max"] == 1
    bad = runner.invoke(app, ["check", str(tmp_path / "in.csv"), "-c", str(tmp_path / "nope.yaml")])
    assert bad.exit_code == 2 and "cannot read contract" in bad.output  # found before reading


def test_inline_contract_and_odcs_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    _setup(tmp_path)
    raw = _pipeline(tmp_path)
    raw["steps"] = [{"id": "validate", "contract": CONTRACT}]
    rep = Executor(parse_pipeline(raw), base_dir=tmp_path, progress=False).run()
    assert rep.step("validate").rows_out == 1
    (tmp_path / "contract.yaml").write_text("apiVersion: v3.0.0\nkind: DataContract\nid: x\n")
    with pytest.raises(Exception, match="sluice contract import"):
        Executor(parse_pipeline(_pipeline(tmp_path)), base_dir=tmp_path, progress=False).run()


def test_contract_import_cli_writes_a_contract_that_checks_data(tmp_path: Path) -> None:
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "odcs" / "examples"
    out = tmp_path / "c.yaml"
    ok = runner.invoke(
        app,
        [
            "contract",
            "import",
            str(shared / "quality" / "column-validity.odcs.yaml"),
            "-o",
            str(out),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "not enforced:" in ok.output and "invalidValues" in ok.output
    (tmp_path / "aq.csv").write_text("air_quality_status\ngood\nmoderate\ngood\n\n")
    result = runner.invoke(app, ["check", str(tmp_path / "aq.csv"), "-c", str(out), "--json"])
    checks = {c["check"]: c["failed"] for c in json.loads(result.stdout)["checks"]}
    assert checks == {
        "air_quality_status.present": 0,
        "air_quality_status.type": 0,
        "air_quality_status.required": 0,
        "air_quality_status.unique": 1,
    }
    refused = runner.invoke(
        app,
        ["contract", "import", str(shared / "roles" / "service-and-operational-roles.odcs.yaml")],
    )
    assert refused.exit_code == 1 and "empty 'schema' list" in refused.output


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
def test_i8_03_unique_counts_survive_a_stream_restart(tmp_path: Path, backend: str) -> None:
    """The values seen, and the values seen more than once, are checkpointed (in the SQLite
    checkpoint, or as RocksDB checkpoints): after a restart a repeat of a value from before it
    is still a duplicate, and a value already counted as repeated is not counted again."""
    import pyarrow as pa

    from sluice.runtime.stream import StreamExecutor
    from sluice.testing import MemoryStream

    tables = [
        pa.table({"id": [1, 2, 2]}),
        pa.table({"id": [3, 1]}),
        pa.table({"id": [2, 4, 4]}),  # after the restart
    ]
    contract = {
        "name": "t",
        "schema": [{"name": "id", "type": "int", "unique": True, "action": "warn"}],
    }
    cfg = parse_pipeline(
        {
            "pipeline": "unique_stream",
            "source": {"kind": "redis_stream", "stream": "unused"},
            "steps": [{"id": "validate", "contract": contract}],
            "sinks": [{"id": "out", "kind": "jsonl", "path": "out/"}],
            "checkpoint": {
                "path": str(tmp_path / "state" / "cp.db"),
                "every": "10ms",
                "backend": backend,
            },
            "dead_letter": {"path": str(tmp_path / "dead")},
            "settings": {"linger": "1ms"},
        }
    )

    def unique(source: MemoryStream) -> dict[str, int]:
        # the stream report has no quality section yet: read the step's results
        ex = StreamExecutor(cfg, base_dir=tmp_path, source=source, handle_signals=False)
        ex.run()
        step = ex.steps[0][0]
        assert isinstance(step, ContractCheck) and step.checker is not None
        return step.checker.results["id.unique"].to_dict()

    before = unique(MemoryStream(tables[:2]))
    assert (before["failed"], before["duplicated_values"]) == (2, 2)  # 2 again, 1 again
    after = unique(MemoryStream(tables))
    # this run checked the third table only: 2 (seen before the restart) and the second 4 are
    # duplicates; the distinct values seen more than once are {1, 2} from before, and 4
    assert (after["checked"], after["failed"], after["duplicated_values"]) == (3, 2, 3)
