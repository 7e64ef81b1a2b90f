"""Delta Lake sink (``deltalake``, imported lazily): one commit per run, or per epoch (stream)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sluice.batch import empty_dead_letters
from sluice.config.models import DeltaSink
from sluice.connectors._messages import Spool
from sluice.connectors.files.writers import SchemaAligner, normalize
from sluice.errors import SinkError, require
from sluice.plugins import RunContext


class DeltaWriter:
    """Write a run into a Delta table as **one Delta transaction** (one new table version).

    Batches are aligned to the sink's schema and spooled to a temporary, compressed Arrow file
    (:class:`~sluice.connectors._messages.Spool`: memory stays bounded whatever the run's size)
    until :meth:`commit`, which streams them into the table with one
    ``deltalake.write_deltalake`` call: one commit, atomic, checked by delta-rs like any write
    (schema, nullability, constraints). Nothing reaches the table before that commit, so
    :meth:`abort` (and a failed commit) only discards the spool: **the table is never touched by
    a run that does not commit, and no other writer's commit is ever undone**. A process killed
    mid-commit may leave Parquet files that no commit references; Delta ignores them and
    ``VACUUM`` removes them. The spool lives in the system's temporary folder (``TMPDIR``).

    Concurrent writers: delta-rs resolves a concurrent append by committing at the next
    version; an ``overwrite`` racing another commit fails with a :class:`SinkError` (nothing of
    the run is written).

    ``mode: overwrite`` replaces the table's content (and schema) in that one commit. In append
    mode the existing table's schema is the target: batches are aligned to it and incompatible
    ones become dead letters.

    **Stream mode** (:class:`~sluice.plugins.EpochPublisher`): :meth:`publish` writes one checkpoint
    epoch's rows as **one Delta commit** that also records the application transaction ``(app_id,
    version=epoch)`` (Delta's ``txn`` action, via ``CommitProperties``), so the rows and the epoch
    marker become visible together or not at all. :meth:`published_epoch` reads the marker back
    (``DeltaTable.transaction_version(app_id)``). ``app_id`` is ``sluice:<pipeline>:<sink id>:<run
    id>`` (:attr:`app_id`; in stream mode the run id names the checkpoint history, so a fresh
    checkpoint store never inherits old markers). An epoch not newer than the marker is skipped
    (nothing written, no dead letters), so a re-published epoch is never duplicated: exactly once,
    as long as one writer publishes for that pipeline and sink (the check and the commit are not one
    atomic step against a concurrent writer of the same ``app_id``). An epoch without rows (or with
    every row refused) still makes a commit, without data files, to record its marker; only before
    any column is known (no table, an epoch without columns) is nothing written, and the marker
    stays behind, which is harmless for an empty epoch. ``mode: overwrite`` replaces the table with
    the first epoch ever published (no marker yet); later epochs, also after a restart, append;
    in a batch run (``ctx.batch``, each epoch a whole run) every epoch replaces the table. The
    dead letters of refused rows are handed to the runtime's journal before the commit
    (:meth:`publish_journaled`). The history in ``app_id`` is the stream's checkpoint history or
    the batch runs of the pipeline's state store: one application transaction per sink, not
    one per run.
    Every epoch is one table version: compact small files now and then (``OPTIMIZE``) and keep
    Delta's transaction retention (``delta.setTransactionRetentionDuration``) unset or longer than
    any restart gap, or the marker expires and a replayed epoch would be written twice. The marker
    belongs to the checkpoint store's epoch numbering: a new, empty checkpoint store gets a new run
    id, so it never mistakes old markers for its own.
    """

    def __init__(self, config: DeltaSink) -> None:
        self.config = config
        self.step_id = config.id
        self._dl: Any = None
        self._uri = ""
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        self._spool = Spool()
        self._opened = False
        self._stream_used = False  # publish() has run (overwrite is only for the first epoch)
        self._batch = False  # epochs are whole batch runs: overwrite replaces at each
        self.app_id = ""

    def open(self, ctx: RunContext) -> None:
        require("deltalake", "delta", "Delta sink")
        import deltalake

        self._dl = deltalake
        self.app_id = f"sluice:{ctx.pipeline}:{self.step_id}:{ctx.run_id}"
        self._batch = ctx.batch
        self._stream_used = False
        path = self.config.path
        self._uri = path if "://" in path else str(ctx.resolve(path))
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        self._spool.discard()
        try:
            if deltalake.DeltaTable.is_deltatable(self._uri):
                table = deltalake.DeltaTable(self._uri)
                if self.config.mode == "append":
                    schema = pa.schema(table.schema().to_arrow())
                    self._aligner.schema = normalize(schema.empty_table()).schema
        except Exception as exc:
            raise SinkError(
                self.step_id,
                f"cannot open Delta table {self._uri}: {exc}",
                fix="check the path and that it holds a Delta table",
            ) from exc
        self._opened = True

    def write(self, table: pa.Table) -> pa.Table:
        if not self._opened:
            raise SinkError(self.step_id, "write() called before open() or after commit()/abort()")
        data, dead = self._aligner.prepare(table)
        if data is None or data.num_rows == 0:
            return dead
        if self.config.partition_by and not self._spool.rows:
            missing = [c for c in self.config.partition_by if c not in data.column_names]
            if missing:
                raise SinkError(
                    self.step_id,
                    f"partition columns {missing} are not in the data ({data.column_names})",
                    fix="partition_by must name columns of the data",
                )
        self._spool.add(data)
        return dead

    def commit(self) -> None:
        """Write the spooled run as one Delta commit (an overwrite run without rows still
        replaces the table, with an empty one)."""
        if not self._opened:
            return
        self._opened = False
        try:
            if self._spool.rows:
                self._write(self._spool.reader())
            elif self.config.mode == "overwrite":
                schema = self._aligner.schema or self._aligner.fallback
                if schema is not None:
                    self._write(schema.empty_table())
        finally:
            self._spool.discard()

    def abort(self) -> None:
        """Drop the spooled rows. The table was not touched: nothing to undo."""
        self._opened = False
        self._spool.discard()

    def _write(self, data: pa.Table | pa.RecordBatchReader) -> None:
        overwrite = self.config.mode == "overwrite"
        try:
            self._dl.write_deltalake(
                self._uri,
                data,
                mode="overwrite" if overwrite else "append",
                schema_mode="overwrite" if overwrite else None,
                partition_by=self.config.partition_by or None,
            )
        except Exception as exc:
            raise SinkError(
                self.step_id,
                f"writing to Delta table {self._uri} failed (nothing of the run was "
                f"committed): {exc}",
                fix="check that the data's schema and partition_by match the existing table",
            ) from exc

    # -- stream mode (EpochPublisher) --------------------------------------------------------

    def published_epoch(self) -> int | None:
        """The newest epoch published by this pipeline's sink (the Delta app transaction)."""
        if self._dl is None:
            raise SinkError(self.step_id, "published_epoch() called before open()")
        try:
            if not self._dl.DeltaTable.is_deltatable(self._uri):
                return None
            version = self._dl.DeltaTable(self._uri).transaction_version(self.app_id)
        except Exception as exc:
            raise SinkError(
                self.step_id,
                f"cannot read the epoch marker of Delta table {self._uri}: {exc}",
                fix="check the path and that it holds a Delta table",
            ) from exc
        return None if version is None else int(version)

    def publish(self, epoch: int, table: pa.Table) -> pa.Table:
        """Append ``table`` (position columns dropped) and record ``epoch`` in one Delta commit;
        returns the dead letters of refused rows. An epoch not newer than the marker is skipped:
        nothing is written and no dead letters are returned."""
        letters: list[pa.Table] = []
        self.publish_journaled(epoch, table, letters.append)
        return letters[0] if letters else empty_dead_letters()

    def publish_journaled(
        self, epoch: int, table: pa.Table, journal: Callable[[pa.Table], None]
    ) -> None:
        """:meth:`publish` for the runtime (:class:`~sluice.plugins.JournalingPublisher`): the
        dead letters of the refused rows (found before anything is written) go to ``journal``
        before the commit. In a batch run (``ctx.batch``) ``mode: overwrite`` replaces the
        table at every epoch (each run)."""
        if not self._opened:
            raise SinkError(self.step_id, "publish() called before open() or after close()")
        if self._spool.rows:
            raise SinkError(self.step_id, "publish() called on a sink used by write()/commit()")
        published = self.published_epoch()
        if published is not None and epoch <= published:
            return
        dl = self._dl
        exists = bool(dl.DeltaTable.is_deltatable(self._uri))
        overwrite = self.config.mode == "overwrite" and (
            self._batch or (published is None and not self._stream_used)
        )
        if overwrite:  # the run's own columns, whatever an earlier epoch had
            self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        if not overwrite and exists and self._aligner.schema is None:
            current = pa.schema(dl.DeltaTable(self._uri).schema().to_arrow())
            self._aligner.schema = normalize(current.empty_table()).schema
        data, dead = self._aligner.prepare(table)
        if data is None:
            schema = self._aligner.schema or self._aligner.fallback
            if schema is None or not schema.names:
                journal(dead)
                return  # no columns known: no table can hold the marker yet
            data = schema.empty_table()
        if self.config.partition_by and not exists:
            missing = [c for c in self.config.partition_by if c not in data.column_names]
            if missing:
                raise SinkError(
                    self.step_id,
                    f"partition columns {missing} are not in the data ({data.column_names})",
                    fix="partition_by must name columns of the data",
                )
        journal(dead)  # durable before the commit: a crash after it loses no letter
        try:
            dl.write_deltalake(
                self._uri,
                data,
                mode="overwrite" if overwrite else "append",
                schema_mode="overwrite" if overwrite else None,
                partition_by=self.config.partition_by or None,
                commit_properties=dl.CommitProperties(
                    app_transactions=[dl.Transaction(app_id=self.app_id, version=epoch)]
                ),
            )
        except Exception as exc:
            raise SinkError(
                self.step_id,
                f"publishing epoch {epoch} to Delta table {self._uri} failed: {exc}",
                fix="check that the data's schema and partition_by match the existing table",
            ) from exc
        self._stream_used = True

    def close(self) -> None:
        """End stream mode (nothing is held open); a batch run not committed is aborted."""
        self.abort()
