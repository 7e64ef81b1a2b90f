"""`sluice replay`: dead letters go back through a fixed pipeline, each where it left."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from sluice.cli import app
from sluice.config import parse_pipeline
from sluice.errors import ConfigError
from sluice.runtime.executor import Executor
from sluice.runtime.replay import replay

runner = CliRunner()


def _pipeline(tmp_path: Path, amount_type: str) -> dict[str, object]:
    return {
        "pipeline": "orders",
        "source": {"kind": "csv", "path": "in/*.csv", "infer_types": False},
        "steps": [
            {"id": "types", "cast": {"id": "int", "amount": amount_type}},
            {"id": "positive", "filter": "amount > 0"},
        ],
        "sinks": [{"id": "out", "kind": "parquet", "path": "out"}],
        "dead_letter": {"kind": "jsonl", "path": "dl"},
    }


def test_replay_after_fixing_the_cast(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("id,amount\n1,10\n2,2.5\n3,-1\n4,7.25\n5,1,extra\n")
    cfg = _pipeline(tmp_path, "int")
    rep = Executor(parse_pipeline(cfg), base_dir=tmp_path, progress=False).run()
    assert rep.dead_letters_by_reason == {"cast_error": 2, "column_count": 1}
    assert pl.read_parquet(tmp_path / "out").height == 1

    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(yaml.safe_dump(_pipeline(tmp_path, "float")))
    result = runner.invoke(
        app, ["replay", str(tmp_path / "dl"), "--pipeline", str(fixed), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "replayed 3 record(s); 1 failed again" in result.output
    # the first run wrote amount as int, the replay as float: read the parts with relaxed types
    parts = sorted((tmp_path / "out").glob("*.parquet"))
    out = pl.concat([pl.read_parquet(p) for p in parts], how="vertical_relaxed").sort("id")
    assert out["id"].to_list() == [1, 2, 4]
    assert out["amount"].to_list() == [10.0, 2.5, 7.25]
    # the row with an extra field fails again, into a replay subfolder
    again = list((tmp_path / "dl").glob("replay-*/*.jsonl"))
    assert len(again) == 1
    letter = json.loads(again[0].read_text())
    assert letter["reason"] == "column_count" and letter["payload"] == "5,1,extra"


def test_replay_refuses_single_file_sinks(tmp_path: Path) -> None:
    raw = _pipeline(tmp_path, "int")
    raw["sinks"] = [{"id": "out", "kind": "parquet", "path": "out/all.parquet"}]
    (tmp_path / "dl").mkdir()
    with pytest.raises(ConfigError, match=r"step 'out'.*single-file"):
        replay(parse_pipeline(raw), tmp_path / "dl", base_dir=tmp_path)


def test_replay_of_an_empty_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "dl").mkdir()
    with pytest.raises(ConfigError, match="no dead-letter files"):
        replay(parse_pipeline(_pipeline(tmp_path, "int")), tmp_path / "dl", base_dir=tmp_path)


def test_replaying_source_rows_keeps_the_declared_types(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("id,amount\n1,10\n2,abc\n")
    raw = _pipeline(tmp_path, "int")
    raw["source"] = {"kind": "csv", "path": "in/*.csv", "schema": {"id": "int", "amount": "int"}}
    raw["steps"] = []
    rep = Executor(parse_pipeline(raw), base_dir=tmp_path, progress=False).run()
    assert rep.dead_letters_by_reason == {"cast_error": 1}
    # unchanged pipeline: the row fails again instead of being written with a text amount
    reports = replay(parse_pipeline(raw), tmp_path / "dl", base_dir=tmp_path)
    assert [r.dead_letters for r in reports] == [1]
    parts = sorted((tmp_path / "out").glob("*.parquet"))
    assert sum(pl.read_parquet(p).height for p in parts) == 1


def test_replaying_source_rows_with_inferred_types_is_refused(tmp_path: Path) -> None:
    # `amount` is declared and rejects "abc"; `id` is inferred over the whole file (int): a
    # replayed record alone would not get the same type for it
    (tmp_path / "in").mkdir()
    block = "".join(f"{i},{i}\n" for i in range(3000))
    (tmp_path / "in" / "a.csv").write_text("id,amount\n" + block + "3000,abc\n")
    raw = _pipeline(tmp_path, "int")
    raw["source"] = {
        "kind": "csv",
        "path": "in/*.csv",
        "block_size": 4096,
        "schema": {"amount": "int"},
    }
    raw["steps"] = []
    rep = Executor(parse_pipeline(raw), base_dir=tmp_path, progress=False).run()
    assert rep.dead_letters_by_reason == {"cast_error": 1}
    with pytest.raises(ConfigError, match=r"step 'source', field 'schema'.*infers the types"):
        replay(parse_pipeline(raw), tmp_path / "dl", base_dir=tmp_path)


def _out_ids(tmp_path: Path) -> list[int]:
    parts = sorted((tmp_path / "out").glob("*.parquet"))
    frames = [pl.read_parquet(p).select("id") for p in parts]
    return sorted(pl.concat(frames)["id"].to_list()) if frames else []


def test_i8_F_replaying_the_same_letters_twice_does_not_duplicate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The replay ledger (in the pipeline's state store, written with each replay run's
    commit) makes a second replay of the same letters a clear refusal; letters added later are
    replayed and the old ones skipped with a message."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("id,amount\n1,10\n2,2.5\n4,7.25\n")
    rep = Executor(parse_pipeline(_pipeline(tmp_path, "int")), base_dir=tmp_path).run()
    assert rep.dead_letters == 2
    fixed = parse_pipeline(_pipeline(tmp_path, "float"))
    replay(fixed, tmp_path / "dl", base_dir=tmp_path, progress=False)
    assert _out_ids(tmp_path) == [1, 2, 4]
    with pytest.raises(ConfigError, match=r"all 2 dead letter\(s\) were replayed before"):
        replay(fixed, tmp_path / "dl", base_dir=tmp_path, progress=False)
    assert _out_ids(tmp_path) == [1, 2, 4]

    # a later run adds letters to the folder: only those are replayed
    (tmp_path / "in" / "a.csv").write_text("id,amount\n7,1.5\n")
    Executor(parse_pipeline(_pipeline(tmp_path, "int")), base_dir=tmp_path).run()
    capsys.readouterr()
    reports = replay(fixed, tmp_path / "dl", base_dir=tmp_path, progress=False)
    assert sum(r.steps[0].rows_in for r in reports) == 1
    assert "2 of 3 dead letter(s) were replayed before" in capsys.readouterr().err
    assert _out_ids(tmp_path) == [7]  # the second run replaced the output; the replay appends


def test_i8_F_replay_killed_after_its_commit_is_completed_once(tmp_path: Path) -> None:
    """kill -9 a replay right after its commit record: its letters are in the ledger (a new
    replay refuses them) and the next start of the pipeline publishes what it committed:
    every replayed row once."""
    import os
    import subprocess
    import sys

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("id,amount\n1,10\n2,2.5\n3,4.5\n")
    appending = _pipeline(tmp_path, "int")
    appending["sinks"] = [{"id": "out", "kind": "parquet", "path": "out", "mode": "append"}]
    Executor(parse_pipeline(appending), base_dir=tmp_path).run()
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(yaml.safe_dump({**appending, "steps": _pipeline(tmp_path, "float")["steps"]}))
    command = [sys.executable, "-m", "sluice.cli", "replay", "dl", "-p", str(fixed)]
    env = {**os.environ, "SLUICE_TEST_CRASH": "after_checkpoint:1"}
    killed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, check=False)
    assert killed.returncode == -9, killed.stderr
    assert _out_ids(tmp_path) == [1]  # committed, not yet published
    env.pop("SLUICE_TEST_CRASH")
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "were replayed before" in again.stderr
    assert _out_ids(tmp_path) == [1]
    rep = Executor(parse_pipeline(appending), base_dir=tmp_path).run()
    assert rep.recovered is not None and rep.recovered["sinks"] == ["out"]
    assert _out_ids(tmp_path) == [1, 1, 2, 3]  # the run's [1] again, the replayed rows once
