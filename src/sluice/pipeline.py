"""The Python builder API. It produces exactly the :class:`PipelineConfig` a YAML file does.

>>> import sluice
>>> p = sluice.Pipeline("orders")
>>> orders = p.read(sluice.csv("data/orders.csv"))
>>> big = orders.filter("big", "amount > 100").derive("vat", {"vat": "amount * 0.2"})
>>> _ = big.write("out", sluice.parquet("out/orders"))
>>> p.build().steps[1].id
'vat'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sluice.config.loader import load_pipeline, parse_pipeline
from sluice.config.models import PipelineConfig
from sluice.runtime.executor import Executor
from sluice.runtime.report import RunReport


@dataclass(frozen=True)
class Connector:
    """A connector kind with its options; valid as a source or a sink where the kind allows."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, **extra: Any) -> dict[str, Any]:
        return {"kind": self.kind, **self.options, **extra}


def _connector(kind: str) -> Any:
    def make(path: str, **options: Any) -> Connector:
        return Connector(kind, {"path": path, **options})

    make.__name__ = kind
    make.__doc__ = f"A {kind} connector at ``path`` (see the {kind} options in `sluice schema`)."
    return make


csv = _connector("csv")
json = _connector("json")
jsonl = _connector("jsonl")
parquet = _connector("parquet")
xml = _connector("xml")
delta = _connector("delta")


def duckdb(path: str, table: str, **options: Any) -> Connector:
    """A DuckDB table sink."""
    return Connector("duckdb", {"path": path, "table": table, **options})


def postgres(dsn: str, table: str, **options: Any) -> Connector:
    """A PostgreSQL table sink (COPY; append or upsert on key)."""
    return Connector("postgres", {"dsn": dsn, "table": table, **options})


class Stream:
    """The output of a source or step; each method adds a step fed by this one."""

    def __init__(self, pipeline: Pipeline, node_id: str) -> None:
        self.pipeline = pipeline
        self.id = node_id

    def _step(self, step_id: str, key: str, value: Any, **options: Any) -> Stream:
        self.pipeline._steps.append({"id": step_id, "from": self.id, key: value, **options})
        return Stream(self.pipeline, step_id)

    def select(self, step_id: str, columns: list[str]) -> Stream:
        return self._step(step_id, "select", columns)

    def rename(self, step_id: str, mapping: dict[str, str]) -> Stream:
        return self._step(step_id, "rename", mapping)

    def cast(self, step_id: str, types: dict[str, str]) -> Stream:
        return self._step(step_id, "cast", types)

    def filter(self, step_id: str, expression: str) -> Stream:
        return self._step(step_id, "filter", expression)

    def derive(self, step_id: str, columns: dict[str, str]) -> Stream:
        return self._step(step_id, "derive", columns)

    def sql(
        self,
        step_id: str,
        query: str,
        *,
        tables: dict[str, Connector] | None = None,
        **options: Any,
    ) -> Stream:
        """A DuckDB statement over ``input`` (and the declared reference ``tables``); options
        as in YAML, e.g. ``per_batch=True``, ``memory_limit="512MB"``."""
        if tables:
            options["tables"] = {name: c.as_dict() for name, c in tables.items()}
        return self._step(step_id, "sql", query, **options)

    def deduplicate(self, step_id: str, key: list[str]) -> Stream:
        return self._step(step_id, "deduplicate", {"key": key})

    def join(
        self,
        step_id: str,
        reference: Connector,
        key: list[str],
        how: str = "left",
        unmatched: str = "filter",
        on_duplicate_keys: str = "error",
    ) -> Stream:
        return self._step(
            step_id,
            "join",
            {
                "reference": reference.as_dict(),
                "key": key,
                "how": how,
                "unmatched": unmatched,
                "on_duplicate_keys": on_duplicate_keys,
            },
        )

    def merge(self, step_id: str, *others: Stream) -> Stream:
        """Union this stream with others (columns matched by name)."""
        self.pipeline._steps.append(
            {
                "id": step_id,
                "from": [self.id, *(o.id for o in others)],
                "sql": "SELECT * FROM input",
            }
        )
        return Stream(self.pipeline, step_id)

    def write(self, sink_id: str, sink: Connector) -> Stream:
        self.pipeline._sinks.append(sink.as_dict(id=sink_id, **{"from": self.id}))
        return self


class Pipeline:
    """Build a pipeline in Python; :meth:`build` validates it into the immutable config."""

    def __init__(self, name: str, **settings: Any) -> None:
        self.name = name
        self._source: dict[str, Any] | None = None
        self._steps: list[dict[str, Any]] = []
        self._sinks: list[dict[str, Any]] = []
        self._dead_letter: dict[str, Any] | None = None
        self._settings = settings

    def read(self, source: Connector, source_id: str = "source") -> Stream:
        self._source = source.as_dict(id=source_id)
        return Stream(self, source_id)

    def dead_letters(self, kind: str = "jsonl", path: str = "dead_letters/{pipeline}") -> None:
        self._dead_letter = {"kind": kind, "path": path}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "pipeline": self.name,
            "source": self._source,
            "steps": self._steps,
            "sinks": self._sinks,
        }
        if self._dead_letter:
            d["dead_letter"] = self._dead_letter
        if self._settings:
            d["settings"] = self._settings
        return d

    def build(self) -> PipelineConfig:
        return parse_pipeline(self.to_dict())

    def run(self, *, base_dir: Path | None = None, progress: bool | None = None) -> RunReport:
        return Executor(self.build(), base_dir=base_dir, progress=progress).run()


def load(path: str | Path) -> PipelineConfig:
    """Load and validate a pipeline YAML file."""
    return load_pipeline(path)


def run(
    pipeline: str | Path | PipelineConfig,
    *,
    base_dir: Path | None = None,
    progress: bool | None = None,
) -> RunReport:
    """Run a pipeline given as a YAML path or a config. Relative paths in a YAML file resolve
    against the file's folder."""
    if isinstance(pipeline, PipelineConfig):
        return Executor(pipeline, base_dir=base_dir, progress=progress).run()
    path = Path(pipeline)
    return Executor(load_pipeline(path), base_dir=base_dir or path.parent, progress=progress).run()
