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
