"""Sinks in stream mode: each checkpoint epoch is prepared, checkpointed, then published.

The epoch protocol (see :mod:`sluice.runtime.stream`)::

    begin(E) → write(rows)* → prepare() → token    # durable but invisible
    [checkpoint E saved with every sink's token]    # the commit point
    publish(E, token)                               # visible; idempotent
    recover(E, token) on restart                    # roll E forward, discard anything newer

Three adapters cover every sink:

* :class:`FileEpochSink` (Parquet, CSV, JSONL, and the dead-letter output): one set of part files
  per epoch, ``part-e<epoch>-<n>.<ext>``, written under hidden temporary names and fsynced at
  ``prepare``; ``publish`` renames them. On restart the checkpointed epoch's files are renamed if
  that had not happened yet, and every temporary file and every part of a newer epoch (output
  of work the checkpoint does not cover) is deleted: the replayed epoch replaces, never
  duplicates. No data is written twice.
* :class:`StagedEpochSink` (PostgreSQL, Delta Lake, DuckDB, Redis Streams, Kafka: anything
  implementing :class:`~sluice.plugins.EpochPublisher`): the epoch's rows are staged in an Arrow
  IPC file next to the checkpoint store, then published in one transaction with the sink's epoch
  marker. A staged epoch is re-published after a crash only if the marker is older.
* :class:`PlainEpochSink`: any other batch :class:`~sluice.plugins.Sink` is opened per epoch and
  committed after the checkpoint — at-least-once across a crash.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from sluice.batch import SOURCE_COL, concat, empty_dead_letters, source_id, source_names
from sluice.config.models import FileSinkBase
from sluice.errors import ConfigError, SinkError
from sluice.plugins import EpochPublisher, RunContext, Sink, lookup


def _intern_sources(table: pa.Table) -> pa.Table:
    """Staged tables keep source names; turn them back into this process's interned ids."""
    if SOURCE_COL not in table.column_names:
        return table
    names = table.column(SOURCE_COL)
    if not pa.types.is_string(names.type) and not pa.types.is_large_string(names.type):
        return table
    encoded = pc.dictionary_encode(names).combine_chunks()
    ids = pa.array([source_id(n) for n in encoded.dictionary.to_pylist()], pa.int32())
    column = pc.take(ids, encoded.indices)
    return table.set_column(table.column_names.index(SOURCE_COL), SOURCE_COL, column)


_PART = re.compile(r"^part-e(\d{9})-")
_TMP = re.compile(r"^\.part-e(\d{9})-.*\.tmp$")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FileEpochSink:
    """Part files per epoch for a file sink config (see the module docstring)."""

    def __init__(self, config: FileSinkBase, ctx: RunContext) -> None:
        self.config = config
        self.step_id = config.id
        self.ctx = ctx
        self.root = ctx.resolve(config.path)
        ext = str(getattr(config, "kind"))  # noqa: B009 - every file sink config has a kind
        if self.root.name.lower().endswith("." + ext):
            raise ConfigError(
                "in stream mode a file sink writes part files per checkpoint epoch into a folder",
                step_id=config.id,
                field="path",
                value=config.path,
                fix=f"give a directory, e.g. {self.root.with_suffix('').name}/",
            )
        self._writer: Any = None

    def begin(self, epoch: int) -> None:
        ctx = RunContext(self.ctx.pipeline, f"e{epoch:09d}", self.ctx.base_dir)
        self._writer = lookup("sink", str(getattr(self.config, "kind")))(self.config)  # noqa: B009
        self._writer.open(ctx)

    def write(self, table: pa.Table) -> pa.Table:
        dead: pa.Table = self._writer.write(table)
        return dead

    def prepare(self) -> Any:
        pairs = self._writer.prepare() if self._writer is not None else []
        self._writer = None
        return [[self._rel(t), self._rel(f)] for t, f in pairs]

    def publish(self, epoch: int, token: Any) -> pa.Table:
        dirs: set[Path] = set()
        for tmp, final in token or []:
            t, f = self.root / tmp, self.root / final
            if t.exists():
                os.replace(t, f)
                dirs.add(f.parent)
        for d in dirs:
            _fsync_dir(d)
        return empty_dead_letters()

    def recover(self, epoch: int, token: Any) -> pa.Table:
        self.publish(epoch, token)
        if self.root.exists():
            for path in self.root.rglob("*"):
                m = _PART.match(path.name)
                if (m and int(m.group(1)) > epoch) or _TMP.match(path.name):
                    path.unlink(missing_ok=True)
        return empty_dead_letters()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))


class StagedEpochSink:
    """Stage each epoch in an Arrow IPC file, publish through an :class:`EpochPublisher`."""

    def __init__(self, publisher: EpochPublisher, staging: Path, ctx: RunContext) -> None:
        self.publisher = publisher
        self.step_id = publisher.step_id
        self.dir = staging / publisher.step_id
        self.ctx = ctx
        self._tables: list[pa.Table] = []
        self._epoch = 0
        self._opened = False

    def _open(self) -> None:
        if not self._opened:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.publisher.open(self.ctx)
            self._opened = True

    def begin(self, epoch: int) -> None:
        self._open()
        self._epoch = epoch
        self._tables = []

    def write(self, table: pa.Table) -> pa.Table:
        if table.num_rows:
            self._tables.append(table)
        return empty_dead_letters()

    def prepare(self) -> Any:
        tables, self._tables = self._tables, []
        if not tables:
            return {"rows": 0}
        merged = concat(tables)
        assert isinstance(merged, pa.Table)
        if SOURCE_COL in merged.column_names:  # interned ids are per process: store the names
            i = merged.column_names.index(SOURCE_COL)
            merged = merged.set_column(i, SOURCE_COL, source_names(merged.column(SOURCE_COL)))
        name = f"epoch-{self._epoch:09d}.arrow"
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            with ipc.new_file(fh, merged.schema) as writer:
                writer.write_table(merged)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / name)
        _fsync_dir(self.dir)
        return {"rows": merged.num_rows, "file": name}

    def publish(self, epoch: int, token: Any) -> pa.Table:
        self._open()
        dead = empty_dead_letters()
        name = (token or {}).get("file")
        if name:
            done = self.publisher.published_epoch()
            path = self.dir / name
            if (done is None or done < epoch) and path.exists():
                with pa.memory_map(str(path)) as source:
                    table = ipc.open_file(source).read_all()
                dead = self.publisher.publish(epoch, _intern_sources(table))
        for old in self.dir.glob("epoch-*.arrow"):
            if old.name != name:
                old.unlink(missing_ok=True)
        return dead

    def recover(self, epoch: int, token: Any) -> pa.Table:
        self._open()
        done = self.publisher.published_epoch()
        if done is not None and done > epoch:
            # only possible when a newer checkpoint was lost after its epoch was published
            # (e.g. the checkpoint file was damaged or replaced by an older copy)
            raise SinkError(
                self.step_id,
                f"the sink already holds epoch {done}, newer than the checkpoint being restored "
                f"({epoch}; a newer checkpoint was damaged or lost): replaying would write the "
                "records after it a second time",
                fix="restore the checkpoint store from a copy that has that epoch, or delete "
                "the sink's rows written after epoch "
                f"{epoch} together with its epoch marker, then restart",
            )
        for path in self.dir.glob("*"):
            m = re.match(r"^\.?epoch-(\d{9})", path.name)
            if m and int(m.group(1)) > epoch:
                path.unlink(missing_ok=True)
        return self.publish(epoch, token)

    def close(self) -> None:
        if self._opened:
            self.publisher.close()
            self._opened = False


class PlainEpochSink:
    """A batch sink opened per epoch and committed after the checkpoint: at-least-once."""

    def __init__(self, sink: Sink, ctx: RunContext) -> None:
        self.sink = sink
        self.step_id = sink.step_id
        self.ctx = ctx
        self._open = False

    def begin(self, epoch: int) -> None:
        self.sink.open(RunContext(self.ctx.pipeline, f"e{epoch:09d}", self.ctx.base_dir))
        self._open = True

    def write(self, table: pa.Table) -> pa.Table:
        return self.sink.write(table)

    def prepare(self) -> Any:
        return None

    def publish(self, epoch: int, token: Any) -> pa.Table:
        if self._open:
            self.sink.commit()
            self._open = False
        return empty_dead_letters()

    def recover(self, epoch: int, token: Any) -> pa.Table:
        return empty_dead_letters()

    def close(self) -> None:
        if self._open:
            self.sink.abort()
            self._open = False


EpochSink = FileEpochSink | StagedEpochSink | PlainEpochSink

__all__ = ["EpochSink", "FileEpochSink", "PlainEpochSink", "StagedEpochSink"]
