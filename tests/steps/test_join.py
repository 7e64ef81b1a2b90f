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


def test_i8_26_differing_duplicate_reference_keys_are_refused_by_default(tmp_path: Path) -> None:
    ref = "k,name\n2,two\n1,one\n2,deux\n3,three\n3,drei\n3,tres\n"
    with pytest.raises(StepError) as err:
        _join(tmp_path, ref)
    text = str(err.value)
    assert "step 'j'" in text and "2 key(s) on k" in text and "(5 rows in all)" in text
    assert "e.g. k=2" in text and "on_duplicate_keys" in text


def test_i8_26_identical_duplicate_reference_rows_are_accepted(tmp_path: Path) -> None:
    step = _join(tmp_path, "k,name\n2,two\n1,one\n2,two\n1,one\n")
    res = step.process(batch())
    out = as_arrow(res.table)
    assert out.column("name").to_pylist() == ["one", "two", None, "two"]  # nothing multiplied
    assert out.num_rows == 4 and res.dead.num_rows == 0


@pytest.mark.parametrize(
    ("policy", "names"), [("first", ["one", "two"]), ("last", ["uno", "deux"])]
)
def test_i8_26_on_duplicate_keys_first_or_last_in_file_order(
    tmp_path: Path, policy: str, names: list[str]
) -> None:
    ref = "k,name\n2,two\n1,one\n2,deux\n1,uno\n2,deux\n"
    res = _join(tmp_path, ref, on_duplicate_keys=policy, how="inner").process(batch())
    out = as_arrow(res.table)
    assert out.column("k").to_pylist() == [1, 2, 2]
    assert out.column("name").to_pylist() == [names[0], names[1], names[1]]
    assert res.filtered == 1


def test_i8_26_null_reference_keys_never_match_and_are_not_duplicates(tmp_path: Path) -> None:
    res = _join(tmp_path, "k,name\n,x\n,y\n1,one\n").process(
        with_positions(pa.table({"k": pa.array([1, None], pa.int64())}), "mem", 0)
    )
    assert as_arrow(res.table).column("name").to_pylist() == ["one", None]


def test_i8_26_on_duplicate_keys_is_checked_by_the_config() -> None:
    def cfg(policy: str) -> JoinStep:
        return JoinStep.model_validate(
            {
                "id": "j",
                "join": {
                    "reference": {"kind": "csv", "path": "ref.csv"},
                    "key": ["k"],
                    "on_duplicate_keys": policy,
                },
            }
        )

    assert cfg("last").join.on_duplicate_keys == "last"
    assert (
        JoinStep.model_validate(
            {"id": "j", "join": {"reference": {"kind": "csv", "path": "r.csv"}, "key": ["k"]}}
        ).join.on_duplicate_keys
        == "error"
    )
    with pytest.raises(ValueError, match="'error', 'first' or 'last'"):
        cfg("any")
