"""The three small interfaces every connector and step implements, and the registry by name.

Call contracts (the executor keeps them; implementations may rely on them):

``Source``
    ``open(ctx)`` once, then ``read()`` is iterated once to the end (or until the run stops),
    then ``close()`` exactly once, even after an error. ``read`` yields :class:`Chunk` objects:
    data (a ``pyarrow.Table`` *with* the position columns from :mod:`sluice.batch`), and/or dead
    letters for what could not be read. A corrupt file yields dead letters and the source goes on
    with the next file; ``read`` raises only for errors that make the whole run pointless (e.g. no
    file matches the glob), as a :class:`~sluice.errors.SourceError` naming the step.

``Step``
    ``open(ctx)`` once; ``process(frame)`` for each batch in order — a ``pyarrow.Table`` or a
    ``polars.DataFrame`` (see :mod:`sluice.batch`: ``as_polars`` / ``as_arrow``), returning a
    :class:`StepResult` (with either kind of frame) whose counts satisfy
    ``in = out + dead + filtered + aggregated``; ``finish()`` once at end of input: ``None``, a
    last result, or an iterator of results (a large output, consumed one result at a time so
    that memory stays bounded);
    ``close()`` exactly once.

``Sink``
    ``open(ctx)`` once; ``write(table)`` per batch (the table still has position columns: drop them
    with :func:`sluice.batch.strip_positions`, use them for dead letters), returning dead letters
    for rows the sink refused (empty table when all were written); then either ``commit()`` (the
    run succeeded: make the output visible atomically) or ``abort()`` (remove partial output).
    ``write`` is called from one thread per sink, never concurrently.

Stream mode (:mod:`sluice.runtime.stream`) adds two interfaces:

``StreamSource``
    ``open(ctx, position)`` once; ``position`` is the JSON value that the newest complete checkpoint
    recorded for this source (``None`` on a first start: begin where the consumer group stands, or
    at the stream's start). ``poll(timeout)`` is then called repeatedly from one reader thread: it
    returns a :class:`Chunk` (rows with position columns, whose ``__sluice_source`` is the interned
    *partition* name, and/or dead letters) whose ``position`` is the JSON-serializable position just
    after the chunk, or ``None`` when nothing arrived within ``timeout`` seconds. A chunk with
    ``end=True`` says the input is exhausted (a bounded replay; a live stream never ends).
    ``commit(position)`` is called from the main thread once a checkpoint covering ``position`` is
    durable: acknowledge messages / commit offsets up to there (it may run concurrently with
    ``poll``). After a restart, reading resumes right after the checkpointed position even if later
    messages were already delivered. ``close()`` exactly once.

``EpochPublisher``
    A sink that cannot hide uncommitted output (a database, a broker) is fed per checkpoint epoch:
    the runtime stages the epoch's rows locally and durably, writes the checkpoint, then calls
    ``publish(epoch, table)``, which must make the rows visible *together with* an epoch marker in
    one transaction and return dead letters for refused rows. ``published_epoch()`` returns the
    marker (newest epoch already visible, ``None`` if none): after a crash the runtime re-publishes
    a staged epoch only when the marker is older, so nothing is duplicated. A publisher without
    a transactional marker returns ``None`` and is at-least-once for the epoch in flight at a
    crash; its documentation says so. Batch runs use the same protocol, one epoch per run
    (the rows of the whole run are staged on disk: ``table`` may be larger than memory, memory
    mapped; a publisher converts and sends it in slices, so that its memory stays bounded).
    The ``ctx`` given to ``open`` names the history the marker belongs to: the stream's
    checkpoint history (``stream-<id>``), or the batch runs of the pipeline's state store
    (``batch-<id>``, one marker per sink for all runs, epochs numbered by the store). For
    batch runs ``ctx.batch`` is true: a mode that replaces the target (Delta ``overwrite``,
    DuckDB ``replace``) replaces it at every epoch (each run), not only at the first epoch of
    the history as in a stream.

``JournalingPublisher``
    An ``EpochPublisher`` that can refuse rows at publish (constraint violations, the
    :class:`~sluice.connectors.files.writers.SchemaAligner`) implements
    ``publish_journaled(epoch, table, journal)``: the same as ``publish``, but it calls
    ``journal(dead_letters)`` exactly once per attempt, after the rows are written and *before*
    its transaction commits (an empty table when nothing was refused), and returns nothing. The
    runtime makes the letters durable in that call, so a crash right after the commit loses
    none. Every built-in publisher implements it. For a plain ``EpochPublisher`` (a third
    party's) the runtime journals what ``publish`` returned, right after it returned (a crash
    in between loses those letters).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from sluice.batch import Frame, empty_dead_letters


@dataclass(frozen=True)
class RunContext:
    """What every source, step and sink learns about the run it is part of."""

    pipeline: str
    run_id: str
    base_dir: Path = field(default_factory=Path.cwd)
    #: the epochs published under this context are whole batch runs (see ``EpochPublisher``):
    #: a mode that replaces the target (Delta ``overwrite``, DuckDB ``replace``) replaces it at
    #: every epoch, not only at the first epoch of the history
    batch: bool = False

    def resolve(self, path: str) -> Path:
        """Resolve a configured path: relative paths are relative to the pipeline file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


@dataclass
class Chunk:
    """One item from a source: rows, dead letters, or both; ``bytes_read`` drives progress.

    ``skipped`` counts records of the input skipped on purpose and not turned into rows (blank
    lines, comment lines, ``skip_rows``): they appear in the run report, so that for every input
    ``records = rows + dead letters + skipped``."""

    table: pa.Table | None = None
    dead: pa.Table | None = None
    bytes_read: int = 0
    skipped: int = 0
    position: Any = None  # stream sources: JSON-serializable position just after this chunk
    end: bool = False  # stream sources: the (bounded) input is exhausted


@dataclass
class StepResult:
    """What a step returns for one batch."""

    table: Frame | None
    dead: pa.Table = field(default_factory=empty_dead_letters)
    filtered: int = 0
    aggregated: int = 0  # rows folded into state (window aggregates); their results come later


@runtime_checkable
class Source(Protocol):
    step_id: str

    def open(self, ctx: RunContext) -> None: ...
    def read(self) -> Iterator[Chunk]: ...
    def size_hint(self) -> int | None: ...
    def close(self) -> None: ...


@runtime_checkable
class Step(Protocol):
    step_id: str

    def open(self, ctx: RunContext) -> None: ...
    def process(self, table: Frame) -> StepResult: ...
    def finish(self) -> StepResult | Iterable[StepResult] | None: ...
    def close(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    step_id: str

    def open(self, ctx: RunContext) -> None: ...
    def write(self, table: pa.Table) -> pa.Table: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


@runtime_checkable
class StreamSource(Protocol):
    step_id: str

    def open(self, ctx: RunContext, position: Any) -> None: ...
    def poll(self, timeout: float) -> Chunk | None: ...
    def commit(self, position: Any) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class EpochPublisher(Protocol):
    step_id: str

    def open(self, ctx: RunContext) -> None: ...
    def published_epoch(self) -> int | None: ...
    def publish(self, epoch: int, table: pa.Table) -> pa.Table: ...
    def close(self) -> None: ...


@runtime_checkable
class JournalingPublisher(EpochPublisher, Protocol):
    def publish_journaled(
        self, epoch: int, table: pa.Table, journal: Callable[[pa.Table], None]
    ) -> None: ...


Factory = Callable[[Any], Any]

# Built-ins are imported lazily ("module:attribute") so a run only imports what it uses.
_BUILTIN: dict[str, dict[str, str]] = {
    "source": {
        "csv": "sluice.connectors.files.csv:CsvReader",
        "json": "sluice.connectors.files.json:JsonReader",
        "jsonl": "sluice.connectors.files.json:JsonlReader",
        "parquet": "sluice.connectors.files.parquet:ParquetReader",
        "xml": "sluice.connectors.files.xml:XmlReader",
        "redis_stream": "sluice.connectors.redis_streams:RedisStreamReader",
        "kafka": "sluice.connectors.kafka:KafkaReader",
    },
    "sink": {
        "parquet": "sluice.connectors.files.writers:ParquetWriter",
        "csv": "sluice.connectors.files.writers:CsvWriter",
        "jsonl": "sluice.connectors.files.writers:JsonlWriter",
        "delta": "sluice.connectors.delta:DeltaWriter",
        "duckdb": "sluice.connectors.duckdb:DuckdbWriter",
        "postgres": "sluice.connectors.postgres:PostgresWriter",
        "redis_stream": "sluice.connectors.redis_streams:RedisStreamWriter",
        "kafka": "sluice.connectors.kafka:KafkaWriter",
    },
    "step": {
        "select": "sluice.steps.columns:Select",
        "rename": "sluice.steps.columns:Rename",
        "cast": "sluice.steps.columns:Cast",
        "filter": "sluice.steps.expressions:Filter",
        "derive": "sluice.steps.expressions:Derive",
        "sql": "sluice.steps.sql:Sql",
        "deduplicate": "sluice.steps.dedupe:Deduplicate",
        "join": "sluice.steps.join:Join",
        "contract": "sluice.quality.step:ContractCheck",
        "window": "sluice.steps.window:Window",
    },
}
_REGISTERED: dict[str, dict[str, Factory]] = {"source": {}, "sink": {}, "step": {}}


def register(role: str, name: str, factory: Factory) -> None:
    """Register a source, sink or step factory under a name (third parties: entry points
    ``sluice.sources`` / ``sluice.sinks`` / ``sluice.steps``)."""
    _REGISTERED[role][name] = factory


def lookup(role: str, name: str) -> Factory:
    if name in _REGISTERED[role]:
        return _REGISTERED[role][name]
    if name in _BUILTIN[role]:
        module, attr = _BUILTIN[role][name].split(":")
        factory: Factory = getattr(importlib.import_module(module), attr)
        _REGISTERED[role][name] = factory
        return factory
    for ep in entry_points(group=f"sluice.{role}s"):
        if ep.name == name:
            factory = ep.load()
            _REGISTERED[role][name] = factory
            return factory
    known = sorted({*_BUILTIN[role], *_REGISTERED[role]})
    raise KeyError(f"no {role} named {name!r}; known: {', '.join(known)}")


def names(role: str) -> list[str]:
    return sorted({*_BUILTIN[role], *_REGISTERED[role]})
