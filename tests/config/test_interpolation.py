"""``${VAR}`` interpolation: raw text in paths and DSNs, one SQL literal inside expressions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from sluice.config import parse_pipeline
from sluice.config.loader import SQL_FIELDS, interpolate
from sluice.config.validate import validate_pipeline
from sluice.errors import ConfigError, ConfigErrors
from sluice.runtime.executor import Executor

INJECTION = "nothing' OR '1'='1"


def _data(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "orders.csv"
    path.write_text("id,status,amount\n1,paid,10\n2,open,20\n3,paid,30\n")
    return path


def _run(tmp_path: Path, steps: list[dict[str, Any]], env: dict[str, str]) -> pl.DataFrame:
    raw = {
        "pipeline": "p",
        "source": {"kind": "csv", "path": str(_data(tmp_path))},
        "steps": steps,
        "sinks": [{"id": "out", "kind": "jsonl", "path": "out"}],
        "dead_letter": {"path": "dl"},
    }
    rep = Executor(parse_pipeline(raw, env=env), base_dir=tmp_path, progress=False).run()
    assert rep.status == "succeeded" and rep.balanced
    files = sorted((tmp_path / "out").glob("*.jsonl"))
    return pl.concat([pl.read_ndjson(f) for f in files]) if files else pl.DataFrame()


@pytest.mark.parametrize(
    "steps",
    [
        [{"id": "f", "filter": "status = ${WANT}"}],
        [{"id": "f", "filter": "status = '${WANT}'"}],  # already in quotes: still one literal
        [{"id": "s", "sql": "SELECT * FROM input WHERE status = ${WANT}"}],
        [{"id": "s", "sql": "SELECT * FROM input WHERE status = '${WANT}'"}],
    ],
    ids=["filter", "filter-quoted", "sql", "sql-quoted"],
)
def test_i8_22_an_injected_variable_stays_one_literal(
    tmp_path: Path, steps: list[dict[str, Any]]
) -> None:
    # before: the filter became status = 'nothing' OR '1'='1' and every row passed
    assert _run(tmp_path, steps, {"WANT": INJECTION}).height == 0
    # the same expression selects what the variable says
    out = _run(tmp_path / "again", steps, {"WANT": "paid"})
    assert sorted(out["id"].to_list()) == [1, 3]


def test_i8_22_derive_and_numbers_and_defaults(tmp_path: Path) -> None:
    steps = [
        {"id": "d", "derive": {"label": "${WANT}", "big": "amount > ${MIN:-${FALLBACK:-15}}"}},
    ]
    out = _run(tmp_path, steps, {"WANT": INJECTION})
    assert out["label"].to_list() == [INJECTION] * 3  # the value, as a string
    assert out["big"].to_list() == [False, True, True]  # a number stays a number; nested default


def test_i8_22_expression_fields_are_listed_and_inline_contract_rules_are_literals() -> None:
    assert ("steps", "*", "contract", "quality", "*", "sql") in SQL_FIELDS
    raw = {
        "pipeline": "p",
        "source": {"kind": "csv", "path": "x.csv"},
        "steps": [
            {
                "id": "c",
                "contract": {
                    "name": "c",
                    "schema": [{"name": "status"}],
                    "quality": [
                        {"sql": "SELECT count(*) FROM input WHERE status = ${WANT}", "must_be": 0}
                    ],
                },
            },
            {"id": "w", "window": {"size": 10, "time": "ts"}, "aggregate": {"n": "sum(${COL})"}},
        ],
        "sinks": [{"id": "o", "kind": "csv", "path": "${OUT:-out}/x"}],
    }
    cfg = parse_pipeline(raw, env={"WANT": INJECTION, "COL": "amount"})
    rule = cfg.steps[0].contract.quality[0]
    assert rule.sql == "SELECT count(*) FROM input WHERE status = 'nothing'' OR ''1''=''1'"
    assert cfg.steps[1].aggregate == {"n": "sum('amount')"}  # a literal, not a column: refused
    assert cfg.sinks[0].path == "out/x"  # outside expressions: raw text
    problems = validate_pipeline(cfg)
    assert len(problems) == 1 and "field 'aggregate.n': sum() takes a column name" in str(
        problems[0]
    )


def test_i8_22_quotes_identifiers_escapes_and_comments() -> None:
    def filt(text: str, env: dict[str, str]) -> str:
        raw = {
            "pipeline": "p",
            "source": {"kind": "csv", "path": "x.csv"},
            "steps": [{"id": "f", "filter": text}],
        }
        return str(parse_pipeline(raw, env=env).steps[0].filter)

    env = {"V": INJECTION, "N": "-5", "T": "true", "B": "a\\' OR 1=1 --"}
    assert filt("x = 'it''s ${V}'", env) == "x = 'it''s nothing'' OR ''1''=''1'"
    assert filt('"${V}" > 1', env) == "\"nothing' OR '1'='1\" > 1"  # one identifier
    assert filt("x -${N}", env) == "x -(-5)"  # no `--` comment
    assert filt("flag = ${T}", env) == "flag = TRUE"
    assert filt("x = E'${B}'", env) == "x = E'a\\\\'' OR 1=1 --'"
    assert filt("${A:-${B2:-${C:-x}}} = 1", env) == "'x' = 1"
    for text, message in (
        ("x = 1 -- ${V}", "inside an SQL comment"),
        ("x = 1 /* ${V} */", "inside an SQL comment"),
        ("x = $$${V}$$", "inside a $$-quoted string"),
        ("x = ${V", "unclosed ${V"),
        ("x = ${MISSING}", "${MISSING} is not set"),
    ):
        with pytest.raises(ConfigErrors) as info:
            filt(text, env)
        assert len(info.value.errors) == 1
        assert "step 'f', field 'filter'" in str(info.value) and message in str(info.value)


def test_i8_22_raw_interpolation_keeps_its_api() -> None:
    assert interpolate({"a": ["${X:-${Y:-d}}/p"]}, {}) == {"a": ["d/p"]}
    assert interpolate("${X}", {"X": "it's"}) == "it's"
    with pytest.raises(ConfigError, match=r"\$\{X\} is not set"):
        interpolate("${X}", {})


def _filter_text(text: str, env: dict[str, str]) -> str:
    raw = {
        "pipeline": "p",
        "source": {"kind": "csv", "path": "x.csv"},
        "steps": [{"id": "f", "filter": text}],
    }
    return str(parse_pipeline(raw, env=env).steps[0].filter)


def test_i8_review_nested_block_comment_cannot_hide_a_variable(tmp_path: Path) -> None:
    """DuckDB nests block comments: the lexer ended the comment at the first ``*/`` and took
    the variable for code, so WANT='*/ OR 1=1 /*' turned the filter into a tautology."""
    text = "status = 'paid' /* was: /* old */ status = ${WANT} */"
    with pytest.raises(ConfigErrors, match="inside an SQL comment"):
        _filter_text(text, {"WANT": "*/ OR 1=1 /*"})
    # a nested comment without a variable is fine, and the run keeps only the paid rows
    out = _run(tmp_path, [{"id": "f", "filter": "status = 'paid' /* a /* b */ c */"}], {})
    assert sorted(out["id"].to_list()) == [1, 3]
    assert _filter_text("x /* /* */ */ = ${V}", {"V": "1"}) == "x /* /* */ */ = 1"


@pytest.mark.parametrize(
    "text", ["status = E${W}", "status = X${W}", "status = U&${W}", "s = a${W}"]
)
def test_i8_review_variable_glued_to_a_prefix_is_refused(text: str) -> None:
    """``E${W}`` with W="\\' OR 1=1 --" became an escape string matching every row."""
    with pytest.raises(ConfigErrors, match="would merge with it"):
        _filter_text(text, {"W": "\\' OR 1=1 --"})
    assert _filter_text("status = ${W}", {"W": "\\' OR 1=1 --"}) == "status = '\\'' OR 1=1 --'"
