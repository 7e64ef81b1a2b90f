"""Sinks per epoch: each epoch is prepared, committed (checkpoint), then published.

One protocol serves both loops: a stream cuts its output into an epoch per checkpoint (see
:mod:`sluice.runtime.stream`), a batch run is one epoch (see :mod:`sluice.runtime.executor`)::

    begin(E) → write(rows)* → prepare() → token    # durable but invisible
    [commit record E saved with every sink's token] # the commit point
    publish(E, token) → late dead letters           # visible; idempotent
    forget(E)                                       # after the late letters are durable
    recover(E, token) on restart                    # roll E forward

Three adapters cover every sink:

* :class:`FileEpochSink` (Parquet, CSV, JSONL, and the dead-letter output): part files written
  under hidden temporary names and fsynced at ``prepare``; ``publish`` renames them. In a
  stream each epoch has its own parts, ``part-e<epoch>-<n>.<ext>``; on restart the checkpointed
  epoch's files are renamed if that had not happened yet, and this pipeline's temporary files
  and every part of a newer epoch (output of work the checkpoint does not cover) are deleted:
  the replayed epoch replaces, never duplicates. In a batch run the parts are named after the
  run (``part-<run id>-<n>.<ext>``) and the file sink's ``mode`` applies at publish:
  ``overwrite`` deletes every other part file of the output (the folder and its ``partition_by``
  folders; or, with ``overwrite_partitions``, of the partition folders the run wrote) right
  after the new parts were renamed in; the previous output is intact until the commit point.
  A file that is gone at publish (neither temporary nor final) raises instead of being skipped.
* :class:`StagedEpochSink` (PostgreSQL, Delta Lake, DuckDB, Redis Streams, Kafka: anything
  implementing :class:`~sluice.plugins.EpochPublisher`): the epoch's rows are staged in Arrow IPC
  files next to the checkpoint store, written as they arrive (memory stays bounded whatever the
  epoch's size), then published with the sink's epoch marker (in slices: see each publisher).
  A staged epoch is re-published after a crash only if the marker is older.
* :class:`PlainEpochSink`: any other batch :class:`~sluice.plugins.Sink` is opened per epoch and
  committed after the checkpoint — at-least-once across a crash.

**Dead letters of the publish** (rows a database refuses while publishing) belong to the epoch
they come from: the publisher hands them to a *journal* (an Arrow file per epoch, fsynced) —
before its transaction commits when it implements
:class:`~sluice.plugins.JournalingPublisher`, right after otherwise — and the runtime writes
them into that epoch's dead-letter output (:meth:`FileEpochSink.write_extra`, a file named after
the epoch and the sink, skipped when already there) before :meth:`StagedEpochSink.forget`
deletes the journal. A restart reads the journal of the epoch it rolls forward: the letters are
neither lost nor doubled.

Every token says what its publish needs: a file sink's folder, files, mode and partition
columns; a staged sink's files, the names of the sources its rows came from, and its mode. The
dead-letter output's token is kept under :data:`DEAD_LETTER_TOKEN` (never a step id).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from sluice.batch import (
    DEAD_LETTER_SCHEMA,
    SOURCE_COL,
    empty_dead_letters,
    rows_dead_letters,
    source_id,
    source_names,
)
from sluice.config.models import CsvSink, FileSinkBase, JsonlSink, ParquetSink
from sluice.connectors.files.writers import (
    drop_invalid_utf8,
    existing_output,
    fsync_dir,
    output_dirs,
    remove_temporaries,
    replace_output,
    temporary_owner,
)
from sluice.errors import ConfigError, SinkError
from sluice.plugins import EpochPublisher, JournalingPublisher, RunContext, Sink, lookup
from sluice.runtime.faults import crash_point

#: The key of the dead-letter output's token in a commit record: not a possible step id (ids
#: start with a letter or ``_``), so a sink may be called ``dead_letter``.
DEAD_LETTER_TOKEN = "@dead_letter"


def sink_tokens(tokens: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Split a commit record's tokens into ``(the sinks' tokens by sink id, the dead-letter
    output's token)``. Records written before :data:`DEAD_LETTER_TOKEN` existed keep the
    dead-letter token under ``dead_letter``."""
    sinks = dict(tokens)
    if DEAD_LETTER_TOKEN in sinks:
        return sinks, sinks.pop(DEAD_LETTER_TOKEN)
    return sinks, sinks.pop("dead_letter", None)


_PART = re.compile(r"^part-e(\d{9})-")
_TMP = re.compile(r"^\.part-e(\d{9})-.*\.tmp$")
#: files of a staged sink's folder: ``epoch-<epoch>-<n>.arrow`` (hidden ``.….tmp`` while being
#: written) and the journal ``refused-<epoch>.arrow``; group 1 is the epoch
_STAGED = re.compile(r"^\.?(?:epoch|refused)-(\d{9})")
_FILE_CONFIGS: dict[str, type[FileSinkBase]] = {
    "parquet": ParquetSink,
    "csv": CsvSink,
    "jsonl": JsonlSink,
}


def _write_arrow(path: Path, table: pa.Table) -> None:
    """Write ``table`` as an Arrow IPC file atomically and durably."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        with ipc.new_file(fh, table.schema) as writer:
            writer.write_table(table)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


class FileEpochSink:
    """Part files per epoch for a file sink config (see the module docstring).

    ``batch`` selects the batch-run behaviour: a single-file path is allowed, parts are named
    after ``name`` (the run id) and the config's ``mode`` applies (default ``overwrite``).

    The token of an epoch says everything its publish needs (folder, format, the files, what
    to replace, the partition columns), so any instance can publish it, also one built for a
    sink the pipeline no longer has (:meth:`for_token`).
    """

    def __init__(
        self,
        config: FileSinkBase,
        ctx: RunContext,
        *,
        batch: bool = False,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.step_id = config.id
        self.ctx = ctx
        self.batch = batch
        self.name = name
        self.ext = str(getattr(config, "kind"))  # noqa: B009 - every file sink config has a kind
        self.root = ctx.resolve(config.path)
        self.single = self.root.name.lower().endswith("." + self.ext)
        if self.single and not batch:
            raise ConfigError(
                "in stream mode a file sink writes part files per checkpoint epoch into a folder",
                step_id=config.id,
                field="path",
                value=config.path,
                fix=f"give a directory, e.g. {self.root.with_suffix('').name}/",
            )
        self.dir = self.root.parent if self.single else self.root
        self.mode = config.mode or ("overwrite" if batch else "append")
        self.partitions = bool(getattr(config, "overwrite_partitions", False))
        self.partition_by: list[str] = list(getattr(config, "partition_by", None) or [])
        # where the token says the files are: the configured folder (resolved again at publish)
        self._dir_text = str(Path(config.path).parent) if self.single else config.path
        self._writer: Any = None
        self._epoch = 0

    @classmethod
    def for_token(cls, step_id: str, token: Any, ctx: RunContext) -> FileEpochSink:
        """An instance that can publish ``token`` (a batch run's file sink) without the sink's
        config: the token holds the folder and the format."""
        ext = str(token.get("ext") or "jsonl") if isinstance(token, dict) else "jsonl"
        folder = str(token.get("dir") or ".") if isinstance(token, dict) else "."
        make = _FILE_CONFIGS.get(ext, JsonlSink)
        config = make(id=step_id, kind=ext, path=folder)  # type: ignore[call-arg]
        stem = str(token.get("stem") or "") if isinstance(token, dict) else ""
        return cls(config, ctx, batch=True, name=stem or None)

    # ------------------------------------------------------------------ batch-run checks

    def check_start(self) -> None:
        """Before a batch run reads data: ``error_if_exists`` refuses existing output, and the
        temporary files killed runs of this pipeline left in the output are deleted (the caller
        holds the pipeline's lock; other pipelines' temporary files are left alone)."""
        if self.mode == "error_if_exists":
            found = existing_output(
                self.root, self.ext, single=self.single, partition_by=self.partition_by
            )
            if found:
                what = str(found[0]) if self.single else f"{len(found)} part file(s) in {self.dir}"
                raise SinkError(
                    self.step_id,
                    f"mode error_if_exists: output already exists ({what})",
                    fix="delete the old output, or set mode: overwrite or mode: append",
                )
        if self.single:
            remove_temporaries([self.dir], self.root.name, self.ctx.pipeline)
        else:
            dirs = output_dirs(self.root, self.partition_by)
            remove_temporaries(dirs, "part-*", self.ctx.pipeline)

    # ------------------------------------------------------------------ protocol

    @property
    def stem(self) -> str:
        return self.name or f"e{self._epoch:09d}"

    def begin(self, epoch: int) -> None:
        self._epoch = epoch
        ctx = RunContext(self.ctx.pipeline, self.stem, self.ctx.base_dir)
        self._writer = lookup("sink", self.ext)(self.config)
        self._writer.open(ctx)

    def write(self, table: pa.Table) -> pa.Table:
        dead: pa.Table = self._writer.write(table)
        return dead

    def prepare(self) -> Any:
        pairs = self._writer.prepare() if self._writer is not None else []
        self._writer = None
        replace = None
        if self.batch and self.mode == "overwrite" and not self.single:
            replace = "partitions" if self.partitions else "all"
        return {
            "dir": self._dir_text,
            "ext": self.ext,
            "stem": self.stem,
            "files": [[self._rel(t), self._rel(f)] for t, f in pairs],
            "replace": replace,
            "partition_by": self.partition_by,
        }

    def _token_dir(self, token: Any) -> Path:
        if isinstance(token, dict) and token.get("dir") is not None:
            return self.ctx.resolve(str(token["dir"]))
        return self.dir

    def publish(self, epoch: int, token: Any) -> pa.Table:
        """Rename the epoch's files into place (a file renamed already is skipped) and apply the
        mode. A file neither under its temporary nor under its final name is gone (something
        else deleted it): that raises, before anything of this sink is renamed, instead of
        publishing the epoch without it."""
        d = self._token_dir(token)
        files = (token.get("files") if isinstance(token, dict) else token) or []
        pairs = [(d / tmp, d / final) for tmp, final in files]
        gone = [f for t, f in pairs if not t.exists() and not f.exists()]
        if gone:
            raise SinkError(
                self.step_id,
                f"{len(gone)} of the {len(pairs)} file(s) this sink wrote for epoch {epoch} are "
                f"gone before they were published (neither the temporary file nor {gone[0]} "
                "exists): something else deleted them, so the committed output cannot be "
                "completed",
                fix="find what deletes files in that folder; then run the pipeline again to "
                "write those rows (a batch run that cannot start because of this: move the "
                "state store, checkpoint.path, away first)",
            )
        dirs: set[Path] = set()
        keep: set[Path] = set()
        for t, f in pairs:
            keep.add(f)
            if t.exists():
                os.replace(t, f)
                dirs.add(f.parent)
        replace = token.get("replace") if isinstance(token, dict) else None
        if replace:
            ext = str(token.get("ext") or self.ext)
            partition_by = list(token.get("partition_by") or [])
            dirs |= replace_output(
                d, ext, keep, partitions=replace == "partitions", partition_by=partition_by
            )
        for path in dirs:
            fsync_dir(path)
        return empty_dead_letters()

    def recover(self, epoch: int, token: Any) -> pa.Table:
        """Stream restart: roll the checkpointed epoch forward, delete newer parts and this
        pipeline's temporary parts (in the output's own folders only)."""
        self.publish(epoch, token)
        for d in output_dirs(self.root, self.partition_by):
            for path in d.iterdir():
                m = _PART.match(path.name)
                newer = m is not None and int(m.group(1)) > epoch
                ours = _TMP.match(path.name) and temporary_owner(path.name) == self.ctx.pipeline
                if newer or ours:
                    path.unlink(missing_ok=True)
        return empty_dead_letters()

    def write_extra(self, epoch: int, token: Any, label: str, table: pa.Table) -> Path:
        """Write ``table`` as one more file of the epoch (the dead letters of a publish), named
        after the epoch and ``label``; atomic, and skipped when the file is already there."""
        d = self._token_dir(token)
        ext = str(token.get("ext") or self.ext) if isinstance(token, dict) else self.ext
        stem = str(token.get("stem") or self.stem) if isinstance(token, dict) else self.stem
        name = f"{stem}-{label}.{ext}" if self.batch else f"part-{stem}-{label}.{ext}"
        final = d / name
        if final.exists():
            return final
        config = _FILE_CONFIGS[ext](id=self.step_id, kind=ext, path=str(final))  # type: ignore[call-arg]
        writer = lookup("sink", ext)(config)
        writer.open(RunContext(self.ctx.pipeline, f"{stem}-{label}", self.ctx.base_dir))
        try:
            refused = writer.write(table)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        if refused.num_rows:
            raise SinkError(self.step_id, f"{refused.num_rows} dead letter(s) could not be written")
        return final

    def forget(self, epoch: int) -> None:
        return None

    def close(self) -> None:
        """Abort the epoch in progress (its temporary files are deleted). A prepared epoch
        is not touched: its files wait for publish or for the roll-forward at the next start."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.dir))


def _remap_sources(table: pa.Table, names: dict[str, str]) -> pa.Table:
    """Staged rows keep the interned source ids of the process that staged them, ``names``
    maps those ids to the source names: give the rows this process's ids (vectorized; nothing
    to do in the process that staged them, the usual case)."""
    if SOURCE_COL not in table.column_names or not names:
        return table
    pairs = {int(k): source_id(v) for k, v in names.items()}
    if all(k == v for k, v in pairs.items()):
        return table
    lookup_ids = np.arange(max(pairs) + 1, dtype=np.int32)
    for old, new in pairs.items():
        lookup_ids[old] = new
    column = pc.take(pa.array(lookup_ids), table.column(SOURCE_COL))
    return table.set_column(table.column_names.index(SOURCE_COL), SOURCE_COL, column)


def _conflict(schema: pa.Schema, other: pa.Schema) -> str:
    """The first column of ``other`` whose type cannot be merged with ``schema``'s."""
    for field in other:
        if field.name not in schema.names:
            continue
        try:
            pa.unify_schemas(
                [pa.schema([schema.field(field.name)]), pa.schema([field])],
                promote_options="permissive",
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return str(field.name)
    return str(other.names[0])


class StagedEpochSink:
    """Stage each epoch in Arrow IPC files, publish through an :class:`EpochPublisher`.

    The staged rows keep their source as the interned id (4 bytes a row); the token maps the
    ids to the source names, so a restarted process (other ids) reads them back right. ``mode``
    (the sink's configured mode) is recorded in the token: a run rolled forward by another
    pipeline definition (``sluice replay``, whose sinks append) is published with the mode it
    was committed with."""

    def __init__(
        self,
        publisher: EpochPublisher,
        staging: Path,
        ctx: RunContext,
        *,
        mode: str | None = None,
    ) -> None:
        self.publisher = publisher
        self.step_id = publisher.step_id
        self.dir = staging / publisher.step_id
        self.ctx = ctx
        self.mode = mode
        self._epoch = 0
        self._opened = False
        self._files: list[str] = []
        self._fh: Any = None
        self._writer: Any = None
        self._schema: pa.Schema | None = None
        self._rows = 0
        self._sources: set[int] = set()

    def use_context(self, ctx: RunContext) -> None:
        """Publish under another run context from now on (the publisher's epoch marker is keyed
        by its run id: the stream's checkpoint history, or the batch runs' history of the
        state store)."""
        if ctx == self.ctx:
            return
        if self._opened:
            self.publisher.close()
            self._opened = False
        self.ctx = ctx

    def _open(self) -> None:
        if not self._opened:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.publisher.open(self.ctx)
            self._opened = True

    def begin(self, epoch: int) -> None:
        self._open()
        self._epoch = epoch
        self._files = []
        self._schema = None
        self._rows = 0
        self._sources = set()

    def write(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            if self._writer is None:  # no rows, but the columns: the publish can use them
                self._roll(table.schema)
            return empty_dead_letters()
        # invalid strings are dead letters of this epoch now, not of the publish later
        table, dead = drop_invalid_utf8(table, self.step_id)
        if table.num_rows == 0:
            return dead
        if SOURCE_COL in table.column_names:  # ids are per process: the token names them
            self._sources.update(pc.unique(table.column(SOURCE_COL)).to_pylist())
        if self._writer is None or not table.schema.equals(self._schema):
            self._roll(table.schema)
        self._writer.write_table(table)
        self._rows += table.num_rows
        return dead

    def _roll(self, schema: pa.Schema) -> None:
        """Start the next staging file (the first, or one for a batch of another schema)."""
        self._close_file()
        name = f"epoch-{self._epoch:09d}-{len(self._files):05d}.arrow"
        self._fh = open(self.dir / f".{name}.tmp", "wb")  # noqa: SIM115 - closed in _close_file
        self._writer = ipc.new_file(self._fh, schema)
        self._schema = schema
        self._files.append(name)

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._writer = self._fh = None

    def prepare(self) -> Any:
        self._close_file()
        files, self._files = self._files, []
        for name in files:
            os.replace(self.dir / f".{name}.tmp", self.dir / name)
        if files:
            fsync_dir(self.dir)
        rows, self._rows = self._rows, 0
        ids, self._sources = sorted(i for i in self._sources if i is not None), set()
        names = source_names(pa.array(ids, pa.int32())).to_pylist() if ids else []
        return {
            "rows": rows,
            "files": files,
            "sources": {str(i): n for i, n in zip(ids, names, strict=True)},
            "mode": self.mode,
        }

    def _journal(self, epoch: int) -> Path:
        return self.dir / f"refused-{epoch:09d}.arrow"

    def publish(self, epoch: int, token: Any) -> pa.Table:
        """Publish the staged epoch unless the marker says it is in already; return the dead
        letters of the publish (from the epoch's journal, also when an earlier attempt
        published it before a crash)."""
        self._open()
        token = token or {}
        names = list(token.get("files") or ([token["file"]] if token.get("file") else []))
        journal = self._journal(epoch)
        # a batch run publishes also without rows: a mode that replaces the target replaces it
        # (with an empty table when the columns are known), the marker records the run
        if names or self.ctx.batch:
            done = self.publisher.published_epoch()
            paths = [self.dir / n for n in names]
            if (done is None or done < epoch) and all(p.exists() for p in paths):
                sources = dict(token.get("sources") or {})
                table, refused = self._staged_table(paths, sources)

                def write_journal(dead: pa.Table) -> None:
                    if refused.num_rows:
                        dead = pa.concat_tables([refused, dead.cast(DEAD_LETTER_SCHEMA)])
                    if dead.num_rows:
                        _write_arrow(journal, dead.cast(DEAD_LETTER_SCHEMA))
                    else:
                        journal.unlink(missing_ok=True)

                if isinstance(self.publisher, JournalingPublisher):
                    self.publisher.publish_journaled(epoch, table, write_journal)
                else:
                    dead = self.publisher.publish(epoch, table)
                    crash_point("before_journal")
                    write_journal(dead)
        if journal.exists():
            return _read_arrow(journal)
        return empty_dead_letters()

    def _staged_table(
        self, paths: list[Path], sources: dict[str, str]
    ) -> tuple[pa.Table, pa.Table]:
        """The epoch's staged rows as one table (memory mapped) and the dead letters of staged
        batches whose columns cannot be merged with the batches before them (a column that
        changed to an incompatible type): like a sink's schema check, the first batch decides;
        refused batches are ``sink_rejected`` letters naming the column."""
        tables = [_remap_sources(_read_arrow(p), sources) for p in paths]
        if not tables:
            return pa.table({}), empty_dead_letters()
        # batches without rows only say the columns when no batch has rows
        tables = [t for t in tables if t.num_rows] or tables[:1]
        if len(tables) == 1:
            return tables[0], empty_dead_letters()
        kept: list[pa.Table] = []
        refused: list[pa.Table] = []
        schema: pa.Schema | None = None
        for t in tables:
            if schema is None:
                schema = t.schema
                kept.append(t)
                continue
            try:
                schema = pa.unify_schemas([schema, t.schema], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                column = _conflict(schema, t.schema)
                refused.append(
                    rows_dead_letters(
                        t,
                        step_id=self.step_id,
                        reason="sink_rejected",
                        message=f"batch does not match the sink's schema: column {column!r} "
                        f"has type {t.schema.field(column).type}, earlier batches of the run "
                        f"have {schema.field(column).type}",
                    )
                )
                continue
            kept.append(t)
        table = kept[0] if len(kept) == 1 else pa.concat_tables(kept, promote_options="permissive")
        return table, pa.concat_tables(refused) if refused else empty_dead_letters()

    def _staged(self) -> list[tuple[Path, int]]:
        """The files of the staging folder with the epoch each belongs to."""
        if not self.dir.is_dir():
            return []
        return [
            (path, int(m.group(1)))
            for path in self.dir.iterdir()
            if (m := _STAGED.match(path.name)) is not None
        ]

    def forget(self, epoch: int) -> None:
        """The epoch and its dead letters are safe elsewhere: delete its staged files and
        journal (and any older ones)."""
        for path, e in self._staged():
            if e <= epoch and not path.name.startswith("."):
                path.unlink(missing_ok=True)

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
        self.discard_newer(epoch)
        return self.publish(epoch, token)

    def discard_newer(self, epoch: int) -> None:
        """Delete staged files and journals of epochs after ``epoch`` (work no commit covers)."""
        for path, e in self._staged():
            if e > epoch:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete everything staged (a batch run starting after the roll-forward: what is left
        belongs to runs that never committed)."""
        for path, _ in self._staged():
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Abort the epoch in progress (its staging files are deleted; a prepared epoch stays
        for publish or roll-forward) and close the publisher."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
                self._fh.close()
            self._writer = self._fh = None
        for name in self._files:
            (self.dir / f".{name}.tmp").unlink(missing_ok=True)
        self._files = []
        if self._opened:
            self.publisher.close()
            self._opened = False


class PlainEpochSink:
    """A batch sink opened per epoch and committed after the checkpoint: at-least-once."""

    def __init__(self, sink: Sink, ctx: RunContext, *, batch: bool = False) -> None:
        self.sink = sink
        self.step_id = sink.step_id
        self.ctx = ctx
        self.batch = batch
        self._open = False

    def begin(self, epoch: int) -> None:
        run_id = self.ctx.run_id if self.batch else f"e{epoch:09d}"
        self.sink.open(RunContext(self.ctx.pipeline, run_id, self.ctx.base_dir))
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

    def forget(self, epoch: int) -> None:
        return None

    def close(self) -> None:
        if self._open:
            self._open = False
            self.sink.abort()


EpochSink = FileEpochSink | StagedEpochSink | PlainEpochSink


def epoch_sink(
    sink: Sink,
    config: Any,
    ctx: RunContext,
    *,
    stream: bool,
    staging: Path,
    sink_ctx: RunContext,
) -> EpochSink:
    """The adapter a run drives ``sink`` (built from ``config``) through: a built-in file sink's
    parts per epoch (:class:`FileEpochSink`; in a batch run named after ``ctx.run_id``), an
    :class:`~sluice.plugins.EpochPublisher` staged under ``staging`` and published under
    ``sink_ctx`` (:class:`StagedEpochSink`), any other sink committed after the checkpoint
    (:class:`PlainEpochSink`)."""
    if isinstance(config, FileSinkBase) and type(sink).__module__.startswith(
        "sluice.connectors.files"
    ):
        name = None if stream else ctx.run_id
        return FileEpochSink(config, ctx, batch=not stream, name=name)
    if isinstance(sink, EpochPublisher):
        return StagedEpochSink(sink, staging, sink_ctx, mode=getattr(config, "mode", None))
    return PlainEpochSink(sink, ctx, batch=not stream)


__all__ = [
    "DEAD_LETTER_TOKEN",
    "EpochSink",
    "FileEpochSink",
    "PlainEpochSink",
    "StagedEpochSink",
    "epoch_sink",
    "sink_tokens",
]
