"""The curated public API: __all__ is exact, and everything in it exists."""

from __future__ import annotations

import sluice

EXPECTED = {
    "DEAD_LETTER_SCHEMA",
    "REASONS",
    "Chunk",
    "ConfigError",
    "ConfigErrors",
    "Connector",
    "Executor",
    "MissingDependencyError",
    "Pipeline",
    "PipelineConfig",
    "RunContext",
    "RunReport",
    "Sink",
    "SinkError",
    "SluiceError",
    "Source",
    "SourceError",
    "Step",
    "StepError",
    "StepResult",
    "StepStats",
    "Stream",
    "TerminalError",
    "TransientError",
    "__version__",
    "csv",
    "delta",
    "duckdb",
    "json",
    "json_schema",
    "jsonl",
    "load",
    "load_pipeline",
    "parquet",
    "parse_pipeline",
    "postgres",
    "register",
    "run",
    "xml",
}


def test_all_is_exact() -> None:
    assert set(sluice.__all__) == EXPECTED
    assert len(sluice.__all__) == len(EXPECTED)
    for name in sluice.__all__:
        assert hasattr(sluice, name), name


def test_error_tree() -> None:
    for err in (sluice.ConfigError, sluice.StepError, sluice.MissingDependencyError):
        assert issubclass(err, sluice.SluiceError)
    for err in (sluice.TransientError, sluice.TerminalError, sluice.SourceError, sluice.SinkError):
        assert issubclass(err, sluice.StepError)
    e = sluice.StepError("enrich", "boom", fix="do x")
    assert str(e) == "step 'enrich': boom. Fix: do x" and e.step_id == "enrich"
