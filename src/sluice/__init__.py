"""Sluice: columnar data pipelines with dead letters, for batch today and streams tomorrow.

The public API is exactly ``__all__`` (a test keeps it so).
"""

from sluice.batch import DEAD_LETTER_SCHEMA, REASONS
from sluice.config import PipelineConfig, json_schema, load_pipeline, parse_pipeline
from sluice.errors import (
    ConfigError,
    ConfigErrors,
    MissingDependencyError,
    SinkError,
    SluiceError,
    SourceError,
    StepError,
    TerminalError,
    TransientError,
)
from sluice.pipeline import (
    Connector,
    Pipeline,
    Stream,
    csv,
    delta,
    duckdb,
    json,
    jsonl,
    load,
    parquet,
    postgres,
    run,
    xml,
)
from sluice.plugins import Chunk, RunContext, Sink, Source, Step, StepResult, register
from sluice.runtime.executor import Executor
from sluice.runtime.report import RunReport, StepStats

__version__ = "0.1.0"

__all__ = [
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
]
