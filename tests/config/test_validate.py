"""`sluice validate` finds every configuration mistake that `sluice run` rejects.

Both build the pipeline's components with :func:`sluice.config.validate.build_components`.
The test below enumerates every place in ``src/sluice`` (outside ``sluice/config``) that raises
a ``ConfigError`` and, for each, either runs ``sluice validate`` on a pipeline that makes that
place raise, or says why it is not a mistake in a pipeline file. A new ``ConfigError(`` site
without an entry fails the test: add the pipeline that triggers it (and make sure validate
finds it), or the reason it cannot be found before the run.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sluice.cli import app
from sluice.config import parse_pipeline
from sluice.config.validate import (
    PIPELINE_CHECKS,
    Components,
    build_components,
    validate_pipeline,
)
from sluice.errors import ConfigError, ConfigErrors

SRC = Path(__file__).resolve().parents[2] / "src" / "sluice"
#: Modules that run during validation (their ConfigErrors are what validate reports).
VALIDATION_MODULES = ("config/", "plan.py")
runner = CliRunner()


def config_error_sites() -> list[str]:
    """``module path::enclosing function#n`` for every ``ConfigError(``/``ConfigErrors(`` call
    outside :data:`VALIDATION_MODULES` (n counts calls within a function, in file order)."""
    sites: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(VALIDATION_MODULES):
            continue
        counts: dict[str, int] = {}

        def visit(
            node: ast.AST, scope: list[str], rel: str = rel, counts: dict[str, int] = counts
        ) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    visit(child, [*scope, child.name])
                    continue
                if isinstance(child, ast.Call):
                    fn = child.func
                    name = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", None)
                    if name in ("ConfigError", "ConfigErrors"):
                        where = ".".join(scope) or "<module>"
                        n = counts.get(where, 0)
                        counts[where] = n + 1
                        sites.append(f"{rel}::{where}#{n}")
                visit(child, scope)

        visit(ast.parse(path.read_text(encoding="utf-8")), [])
    return sites


@dataclass(frozen=True)
class Case:
    """A pipeline (YAML) that makes the site raise, the text validate must report, and any
    files next to the pipeline."""

    pipeline: str
    expect: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    pending: str = ""  # not found by validate yet: who fixes it (the test is xfail, strict)


CSV = "source: {kind: csv, path: data.csv}\n"
WATCH = "source: {kind: csv, path: 'in/*.csv', watch: true}\n"
KAFKA = "source: {kind: kafka, brokers: '127.0.0.1:1', topic: t}\n"


_KAFKA_SINK_BOGUS = (
    f"{KAFKA}sinks: [{{id: k, kind: kafka, brokers: x, topic: t, options: {{bogus.prop: 1}}}}]\n"
)
_KAFKA_SINK_SSL = (
    f"{KAFKA}sinks: [{{id: k, kind: kafka, brokers: x, topic: t, "
    "options: {security.protocol: bogus}}]\n"
)


def _parquet_bytes() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [1], "amount": [2.5]}), buf)
    return buf.getvalue()


#: A typed source (a Parquet file): the plan binds filter/derive/sql with the steps' own binder.
TYPED = "source: {kind: parquet, path: in.parquet}\n"
TYPED_FILES: dict[str, str | bytes] = {"in.parquet": _parquet_bytes()}


def _window(window: str, aggregate: str = "{n: count()}") -> str:
    return f"{CSV}steps:\n  - id: w\n    window: {window}\n    aggregate: {aggregate}\n"


def _contract(path: str = "contract.yaml") -> str:
    return f"{CSV}steps:\n  - {{id: c, contract: {path}}}\n"


TRIGGERS: dict[str, Case] = {
    "connectors/kafka.py::_check_options#0": Case(
        "source: {kind: kafka, brokers: x, topic: t, options: {enable.auto.commit: true}}\n",
        "cannot be overridden",
    ),
    "connectors/kafka.py::KafkaReader.__init__#0": Case(
        "source: {kind: kafka, brokers: x, topic: []}\n", "topic must name at least one topic"
    ),
    "connectors/kafka.py::KafkaReader.open#0": Case(
        "source: {kind: kafka, brokers: '127.0.0.1:1', topic: t, options: {bogus.prop: 1}}\n",
        "bogus.prop",
    ),
    "connectors/kafka.py::KafkaReader.check_config#0": Case(
        "source: {kind: kafka, brokers: '127.0.0.1:1', topic: t, options: {bogus.prop: 1}}\n",
        "bogus.prop",
    ),
    "connectors/kafka.py::KafkaWriter.open#0": Case(_KAFKA_SINK_BOGUS, "bogus.prop"),
    "connectors/kafka.py::KafkaWriter.check_config#0": Case(_KAFKA_SINK_BOGUS, "bogus.prop"),
    # the epoch marker's consumer shares only the connection options, which the producer
    # checks first: the same mistake is found (and reported) by check_config#0
    "connectors/kafka.py::KafkaWriter.check_config#1": Case(_KAFKA_SINK_SSL, "security.protocol"),
    "connectors/kafka.py::KafkaWriter._marker_consumer#0": Case(
        _KAFKA_SINK_SSL, "security.protocol"
    ),
    "connectors/postgres.py::PostgresWriter.__init__#0": Case(
        f"{CSV}sinks: [{{id: pg, kind: postgres, dsn: x, table: a.b.c}}]\n",
        "sink 'pg', field 'table': table must be 'name' or 'schema.name'",
    ),
    "connectors/postgres.py::PostgresWriter.__init__#1": Case(
        f"{CSV}sinks: [{{id: pg, kind: postgres, dsn: x, table: t, mode: upsert}}]\n",
        "sink 'pg', field 'key'",
    ),
    "quality/contract.py::load_contract#0": Case(
        _contract(),
        "is an Open Data Contract Standard file",
        {"contract.yaml": "kind: DataContract\napiVersion: v3.0.0\n"},
    ),
    "quality/contract.py::parse_contract#0": Case(
        _contract(), "must be a mapping", {"contract.yaml": "- a\n- b\n"}
    ),
    "quality/contract.py::parse_contract#1": Case(
        _contract(), "is not a valid contract", {"contract.yaml": "name: c\n"}
    ),
    "quality/sqlrules.py::bind_rules#0": Case(
        _contract(),
        "step 'c', field 'contract.quality[0].sql': quality sql rule: unknown column 'amout' "
        "(did you mean 'amount'?)",
        {
            "contract.yaml": "name: c\nschema: [{name: a}, {name: amount}]\n"
            "quality: [{sql: 'SELECT count(*) FROM input WHERE amout > 1', must_be: 0}]\n"
        },
    ),
    "runtime/epochs.py::FileEpochSink.__init__#0": Case(
        f"{WATCH}sinks: [{{id: out, kind: parquet, path: out/all.parquet}}]\n",
        "sink 'out', field 'path': in stream mode a file sink writes part files",
    ),
    "steps/expressions.py::compile_expr#0": Case(
        f"{CSV}steps: [{{id: f, filter: 'amount >'}}]\n",
        "step 'f', field 'filter': cannot parse the SQL",
    ),
    "steps/expressions.py::_config_error#0": Case(
        f"{TYPED}steps: [{{id: f, filter: 'amout > 1'}}]\n",
        "step 'f', field 'filter': unknown column 'amout' (did you mean 'amount'?)",
        TYPED_FILES,
    ),
    "steps/sql.py::output_schema#0": Case(
        f"{TYPED}steps: [{{id: s, sql: 'SELECT amout FROM input'}}]\n",
        "step 's', field 'sql'",
        TYPED_FILES,
    ),
    # the SqlStep model refuses the statement first; the constructor repeats the check for
    # configs built without validation (model_construct)
    "steps/sql.py::Sql.__init__#0": Case(
        f"{CSV}steps: [{{id: s, sql: \"SELECT * FROM read_csv('x.csv')\"}}]\n",
        "step 's', field 'sql'",
    ),
    "steps/window.py::Window._fail#0": Case(
        _window("{kind: session, time: ts}"), "field 'window.gap': a session window needs gap"
    ),
    "steps/window.py::Window._us#0": Case(
        _window("{size: 1m, time: ts, lateness: late}"), "field 'window.lateness'"
    ),
    "steps/window.py::Window._us#1": Case(
        _window("{kind: session, gap: 0, time: ts}"), "field 'window.gap': must be longer than"
    ),
    "steps/window.py::parse_aggregate.fail#0": Case(
        _window("{size: 1 hr, time: ts}", "{p: 'percentile(a)'}"),
        "field 'aggregate.p': unknown aggregate function 'percentile'",
    ),
    "steps/expressions.py::filter_output_schema#0": Case(
        f"{TYPED}steps: [{{id: f, filter: 'amount'}}]\n",
        "step 'f', field 'filter': the filter 'amount' gives double, not true/false",
        TYPED_FILES,
    ),
}

_ODCS = "`sluice contract import`: the ODCS file given to the command, not a pipeline"
_REPLAY = "`sluice replay`: the dead letters given to replay, checked before anything is replayed"
_BUSY = "another process holds the checkpoint store (a run of the same pipeline), not the file"
_STATE = "the checkpoint store's content (a damaged or foreign checkpoint), not the pipeline file"
NOT_PIPELINE_MISTAKES: dict[str, str] = {
    "cli.py::run#0": "`sluice run --until-idle`: a command-line option, checked before running",
    "cli.py::validate#0": "validate's own report of the mistakes it found",
    "quality/odcs.py::_import_object#0": _ODCS,
    "quality/odcs.py::_load#0": _ODCS,
    "quality/odcs.py::_load#1": _ODCS,
    "quality/odcs.py::_refuse#0": _ODCS,
    "quality/odcs.py::_validate#0": _ODCS,
    "quality/odcs.py::import_odcs#0": _ODCS,
    "quality/odcs.py::import_odcs#1": _ODCS,
    "quality/odcs.py::import_odcs#2": _ODCS,
    "quality/odcs.py::import_odcs#3": _ODCS,
    "quality/odcs.py::import_odcs#4": _ODCS,
    "runtime/replay.py::read_dead_letters#0": _REPLAY,
    "runtime/replay.py::replay#0": _REPLAY + " (a single-file sink cannot take a replay)",
    "runtime/replay.py::_replay_source#0": _REPLAY,
    "runtime/replay.py::_replay_source#1": _REPLAY,
    "runtime/replay.py::_header_line#0": _REPLAY,
    "runtime/replay.py::_replay_objects#0": _REPLAY,
    "runtime/replay.py::_run#0": _REPLAY,
    "runtime/stream.py::StreamExecutor._restore#0": _STATE,
    "runtime/stream.py::StreamExecutor.run#0": _BUSY,
    "runtime/stream.py::StreamExecutor.run#1": _STATE,
    "runtime/executor.py::Executor._open_store#0": _BUSY,
    "runtime/executor.py::Executor._open_store#1": _STATE
    + " (or a folder for it that cannot be written: found when the store is opened)",
    "runtime/replay.py::_skip_replayed#0": _REPLAY + " (every letter was replayed before)",
    "steps/window.py::Window.restore#0": _STATE,
}


def test_i8_23_every_run_time_config_error_site_is_in_the_table() -> None:
    sites = config_error_sites()
    assert len(sites) > 20  # the scan works
    known = {*TRIGGERS, *NOT_PIPELINE_MISTAKES}
    new = [s for s in sites if s not in known]
    gone = sorted(known - set(sites))
    assert not new, (
        f"ConfigError raised outside sluice/config at {new}: add to TRIGGERS a pipeline that "
        "makes it raise (and make `sluice validate` find it: raise it from the component's "
        "constructor or a config validator), or to NOT_PIPELINE_MISTAKES why it cannot be"
    )
    assert not gone, f"sites no longer in the code (remove or renumber them): {gone}"
    assert not set(TRIGGERS) & set(NOT_PIPELINE_MISTAKES)


def _write(tmp_path: Path, case: Case) -> Path:
    for name, content in case.files.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content)
    (tmp_path / "data.csv").write_text("ts,a,amount\n2024-01-01T00:00:00,1,2\n")
    (tmp_path / "in").mkdir()
    path = tmp_path / "pipeline.yaml"
    path.write_text("pipeline: p\n" + textwrap.dedent(case.pipeline))
    return path


@pytest.mark.parametrize(
    "site",
    [
        pytest.param(
            s,
            marks=[pytest.mark.xfail(strict=True, reason=c.pending)] if c.pending else [],
        )
        for s, c in TRIGGERS.items()
    ],
)
def test_i8_23_validate_reports_each_run_time_config_error(tmp_path: Path, site: str) -> None:
    case = TRIGGERS[site]
    path = _write(tmp_path, case)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert case.expect in result.output, result.output
    # and `run` refuses it the same way, before reading data (exit 2, not a failed run)
    result = runner.invoke(app, ["run", str(path), "--no-progress"])
    assert result.exit_code == 2 and case.expect in result.output, result.output


def test_i8_23_build_collects_every_mistake_and_names_roles(tmp_path: Path) -> None:
    raw = {
        "pipeline": "p",
        "source": {"kind": "csv", "path": "data.csv"},
        "steps": [
            {"id": "w", "window": {"size": "1 hr", "time": "ts"}, "aggregate": {"p": "p(a)"}},
            {"id": "c", "contract": "missing.yaml"},
            {"id": "j", "join": {"reference": {"kind": "csv", "path": "r.csv"}}},
        ],
        "sinks": [{"id": "pg", "kind": "postgres", "dsn": "x", "table": "a.b.c"}],
    }
    raw["steps"][2]["join"]["key"] = ["a"]
    cfg = parse_pipeline(raw, env={})
    problems = validate_pipeline(cfg, base_dir=tmp_path)
    text = [str(p) for p in problems]
    assert len(problems) == 3, text
    assert text[0].startswith("step 'w', field 'aggregate.p'")
    assert text[1].startswith("step 'c', field 'contract'")
    assert text[2].startswith("sink 'pg', field 'table'")
    with pytest.raises(ConfigErrors) as info:
        build_components(cfg, base_dir=tmp_path)
    assert [str(e) for e in info.value.errors] == text
    # an unknown function or encoding is found even earlier, when the pipeline is parsed, and
    # all of them at once
    raw["steps"].insert(0, {"id": "f", "filter": "nosuchfn(a) > 1"})
    raw["source"]["encoding"] = "klingon"
    raw["steps"][3]["join"]["reference"]["encoding"] = "x"
    with pytest.raises(ConfigErrors) as early:
        parse_pipeline(raw, env={})
    found = [str(e) for e in early.value.errors]
    assert len(found) == 3, found
    assert found[0].startswith("source 'source', field 'encoding'")
    assert "step 'f', field 'filter'" in found[1] and "nosuchfn" in found[1]
    assert found[2].startswith("step 'j', field 'join.reference.csv.encoding'")


def test_i8_23_a_contract_file_is_loaded_once_and_the_step_gets_it(tmp_path: Path) -> None:
    (tmp_path / "contract.yaml").write_text("name: c\nschema: [{name: a, type: int}]\n")
    cfg = parse_pipeline(
        {
            "pipeline": "p",
            "source": {"kind": "csv", "path": "data.csv"},
            "steps": [{"id": "c", "contract": "contract.yaml"}],
        },
        env={},
    )
    built = build_components(cfg, base_dir=tmp_path)
    step = built.steps[0][0]
    assert step.contract is not None and step.contract.name == "c"  # type: ignore[attr-defined]


def test_i8_23_schema_checks_hook_runs_on_the_built_components(tmp_path: Path) -> None:
    seen: list[str] = []

    def check(cfg: object, built: Components) -> list[ConfigError]:
        seen.append(str(built.base_dir))
        return [ConfigError("column 'amout' is not in the schema", step_id="f", field="filter")]

    cfg = parse_pipeline(
        {"pipeline": "p", "source": {"kind": "csv", "path": "x.csv"}, "steps": []}, env={}
    )
    PIPELINE_CHECKS.append(check)
    try:
        problems = validate_pipeline(cfg, base_dir=tmp_path)
    finally:
        PIPELINE_CHECKS.remove(check)
    assert seen == [str(tmp_path.resolve())] and "amout" in str(problems[0])


def test_i8_stream_refuses_contract_sql_that_needs_the_whole_input(tmp_path: Path) -> None:
    """A stream never ends: a contract SQL rule other than a count of rows would spill forever;
    validate refuses it with the fix, and accepts counts of rows."""
    base = {
        "pipeline": "p",
        "source": {"kind": "redis_stream", "stream": "s"},
        "steps": [
            {
                "id": "c",
                "contract": {
                    "name": "c",
                    "schema": [{"name": "id", "type": "int"}],
                    "quality": [{"sql": "SELECT count(*) - count(DISTINCT id) FROM input"}],
                },
            }
        ],
    }
    problems = validate_pipeline(parse_pipeline(base, env={}), base_dir=tmp_path)
    assert len(problems) == 1
    assert "step 'c', field 'quality[0].sql'" in str(problems[0]) and "count(*)" in str(
        problems[0]
    )
    rule = base["steps"][0]["contract"]["quality"][0]  # type: ignore[index]
    rule["sql"] = "SELECT count(*) FROM input WHERE id < 0"
    assert validate_pipeline(parse_pipeline(base, env={}), base_dir=tmp_path) == []
