"""The `sluice` command: run, validate, schema, with exit codes a scheduler can act on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from typer.testing import CliRunner

import sluice
from sluice.cli import ExitCode, app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _example(tmp_path: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", ROOT / "examples/orders/generate.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    bad = gen.generate(5000, tmp_path / "data")
    assert bad["cast_error"] == 6
    shutil.copy(ROOT / "examples/orders/pipeline.yaml", tmp_path / "pipeline.yaml")
    shutil.copy(ROOT / "examples/orders/contract.yaml", tmp_path / "contract.yaml")
    return tmp_path / "pipeline.yaml"


def test_run_prints_summary_and_writes_outputs(tmp_path: Path) -> None:
    pipeline = _example(tmp_path)
    result = runner.invoke(app, ["run", str(pipeline), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output
    assert "10 dead letters (cast_error: 6, column_count: 3, encoding: 1)" in result.output
    for step in ("types", "paid", "unique", "customers", "enrich", "by_day", "lake", "warehouse"):
        assert step in result.output
    reports = list((tmp_path / "runs" / "orders").glob("*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["status"] == "succeeded" and report["balanced"] is True
    written = report["steps"][-1]["rows_out"]
    parts = list((tmp_path / "out" / "orders").rglob("*.parquet"))
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == written > 0
    letters = [
        json.loads(x)
        for f in (tmp_path / "dead_letters").glob("*.jsonl")
        for x in f.read_text().splitlines()
    ]
    assert len(letters) == 10 and all(d["run_id"] == report["run_id"] for d in letters)


def test_run_json_and_fail_on_dead_letters(tmp_path: Path) -> None:
    pipeline = _example(tmp_path)
    result = runner.invoke(app, ["run", str(pipeline), "--json", "--fail-on-dead-letters"])
    assert result.exit_code == 3
    assert json.loads(result.stdout)["dead_letters"] == 10


def test_validate_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    pipeline = _example(tmp_path)
    raw = yaml.safe_load(pipeline.read_text())
    raw["steps"][0]["cast"]["amount"] = "money"
    next(s for s in raw["steps"] if s["id"] == "paid")["from"] = "typos"
    raw["sinks"][0]["kind"] = "parket"
    pipeline.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", str(pipeline)])
    assert result.exit_code == 2
    assert "3 problem(s)" in result.output
    assert "step 'types', field 'cast'" in result.output and "money" in result.output
    assert "did you mean 'types'?" in result.output
    assert "sink 'lake'" in result.output and "parket" in result.output


def test_validate_ok(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(_example(tmp_path))])
    assert result.exit_code == 0 and "ok: pipeline 'orders'" in result.output


def test_run_failure_exits_1_and_names_the_step(tmp_path: Path) -> None:
    pipeline = _example(tmp_path)
    raw = yaml.safe_load(pipeline.read_text())
    step = next(s for s in raw["steps"] if s["id"] == "paid")
    step["filter"] = "stauts = 'paid'"  # misspelt: found from the files' header, before reading
    pipeline.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(pipeline), "--no-progress"])
    assert result.exit_code == 2
    assert "step 'paid'" in result.output and "did you mean 'status'" in result.output
    step["filter"] = "CAST(status AS INTEGER) > 0"  # fails on the data: 'paid' is no number
    pipeline.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(pipeline), "--no-progress"])
    assert result.exit_code == 1
    assert "step 'paid'" in result.output and "paid" in result.output
    assert not list((tmp_path / "out").rglob("*.parquet")), "no partial output after a failure"
    assert list((tmp_path / "dead_letters").glob("*.jsonl")), "dead letters are kept"


def test_schema_prints_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["title"] == "Sluice pipeline"


def test_i8_26_json_prints_the_report_when_the_run_fails_too(tmp_path: Path) -> None:
    pipeline = _example(tmp_path)
    raw = yaml.safe_load(pipeline.read_text())
    step = next(s for s in raw["steps"] if s["id"] == "paid")
    step["filter"] = "CAST(status AS INTEGER) > 0"  # fails on the data: 'paid' is no number
    pipeline.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(pipeline), "--json", "--no-progress"])
    assert result.exit_code == ExitCode.RUN_FAILED == 1
    report = json.loads(result.stdout)
    assert report["status"] == "failed" and "step 'paid'" in report["error"]
    assert report["dead_letters"] == 10 and report["steps"][0]["step_id"] == "source"


def test_i8_26_exit_codes_in_help_and_version() -> None:
    codes = {c.value for c in ExitCode}
    assert codes == {0, 1, 2, 3, 4, 130}
    for args in (["--help"], ["run", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        assert "Exit codes: 0 ok; 1 the run failed; 2 invalid pipeline" in text, text
        assert (
            "3 dead letters" in text and "4 a step's counts" in text and "130 interrupted" in text
        )
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sluice {sluice.__version__}"


def test_i8_26_summary_shows_aggregated_when_a_step_aggregates(tmp_path: Path) -> None:
    pipeline = _example(tmp_path)
    result = runner.invoke(app, ["run", str(pipeline), "--no-progress"])
    assert "aggregated" not in result.output and "skipped" not in result.output
    raw = yaml.safe_load(pipeline.read_text())
    raw["steps"].append(
        {
            "id": "per_day",
            "window": {"size": "1 day", "time": "ts", "lateness": "60 days"},
            "aggregate": {"n": "count()"},
        }
    )
    raw["sinks"] = [{"id": "days", "kind": "jsonl", "path": "out/days"}]
    pipeline.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(pipeline), "--no-progress"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "dead letters" in line)
    assert "aggregated" in header and "skipped" not in header
    reports = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "orders").glob("*.json")]
    steps = [s for r in reports for s in r["steps"] if s["step_id"] == "per_day"]
    aggregated = steps[0]["aggregated"]
    row = next(line for line in result.output.splitlines() if "per_day" in line)
    assert f"{aggregated:,}" in row and aggregated > 0


def test_i8_19_a_report_that_could_not_be_written_is_not_claimed(tmp_path: Path) -> None:
    pipeline = _example(tmp_path)
    raw = yaml.safe_load(pipeline.read_text())
    # a folder below a regular file cannot be created (a read-only folder would not stop root)
    raw["settings"] = {"report_dir": "contract.yaml/runs"}
    pipeline.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(pipeline), "--no-progress"])
    assert "run report →" not in result.output, result.output
    assert "run report not written" in result.output
    ok = runner.invoke(app, ["run", str(_example(tmp_path / "again")), "--no-progress"])
    assert ok.exit_code == 0 and "run report →" in ok.output
    written = ok.output.split("run report →")[1].strip()
    assert Path(written).name.endswith(".json") and Path(written).exists()


def test_i8_24_run_time_errors_name_sources_and_sinks_by_role(tmp_path: Path) -> None:
    from sluice.errors import SinkError, TransientError

    assert str(SinkError("lake", "disk full", fix="free space")) == (
        "sink 'lake': disk full. Fix: free space"
    )
    err = TransientError("pg", "cannot connect")
    err.role = "sink"  # what a runtime that caught it from a sink may say
    assert str(err) == "sink 'pg': cannot connect"
    path = tmp_path / "p.yaml"
    path.write_text("pipeline: p\nsource: {kind: csv, path: 'nothing/*.csv'}\n")
    result = runner.invoke(app, ["run", str(path), "--no-progress"])
    assert result.exit_code == 1 and "source 'source'" in result.output, result.output
