"""Join with a reference file: left/inner, unmatched rows, unique reference keys."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from sluice.batch import as_arrow, with_positions
from sluice.config.models import JoinStep
from sluice.errors import StepError
from sluice.plugins import RunContext
from sluice.steps.join import Join


def _join(tmp_path: Path, ref_text: str, **opts: object) -> Join:
    (tmp_path / "ref.csv").write_text(ref_text)
    cfg = JoinStep.model_validate(
        {"id": "j", "join": {"reference": {"kind": "csv", "path": "ref.csv"}, "key": ["k"], **opts}}
    )
    step = Join(cfg)
    step.open(RunContext("p", "r", tmp_path))
    return step


def batch() -> pa.Table:
    return with_positions(pa.table({"k": [1, 2, 3, 2], "v": ["a", "b", "c", "d"]}), "mem", 0)


def test_left_join_keeps_order_and_every_row(tmp_path: Path) -> None:
    res = _join(tmp_path, "k,name\n2,two\n1,one\n").process(batch())
    assert as_arrow(res.table).column("name").to_pylist() == ["one", "two", None, "two"]
    assert as_arrow(res.table).column("v").to_pylist() == ["a", "b", "c", "d"]


def test_inner_join_filters_or_dead_letters_misses(tmp_path: Path) -> None:
    res = _join(tmp_path, "k,name\n2,two\n1,one\n", how="inner").process(batch())
    assert as_arrow(res.table).num_rows == 3 and res.filtered == 1 and res.dead.num_rows == 0
    res = _join(tmp_path, "k,name\n2,two\n1,one\n", how="inner", unmatched="dead_letter").process(
        batch()
    )
    assert as_arrow(res.table).num_rows == 3 and res.filtered == 0
    dead = res.dead.to_pylist()
    assert [(d["reason"], d["position"], d["payload"]) for d in dead] == [
        ("join_unmatched", 2, '{"k":3,"v":"c"}')
    ]


def test_duplicate_reference_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StepError, match=r"step 'j'.*duplicate keys.*\(2,\)"):
        _join(tmp_path, "k,name\n2,two\n2,deux\n")


def test_bad_reference_rows_become_dead_letters_of_the_join(tmp_path: Path) -> None:
    step = _join(tmp_path, "k,name\n1,one\n2,two,extra\n")
    res = step.process(batch())
    assert [d["reason"] for d in res.dead.to_pylist()] == ["column_count"]
    assert all(d["step_id"] == "j" for d in res.dead.to_pylist())


def test_reference_dead_letters_come_out_even_without_input(tmp_path: Path) -> None:
    step = _join(tmp_path, "k,name\n1,one\n2,two,extra\n")
    res = step.finish()
    assert res is not None and [d["reason"] for d in res.dead.to_pylist()] == ["column_count"]
    assert step.finish() is None
