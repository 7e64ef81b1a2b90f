"""DuckDB sink: one transaction per run (batch mode) or per checkpoint epoch (stream mode)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sluice.batch import empty_dead_letters
from sluice.config.models import DuckdbSink
from sluice.connectors.files.writers import SchemaAligner, normalize
from sluice.errors import SinkError, TransientError
from sluice.plugins import RunContext

_VIEW = "__sluice_batch"

#: Name of the epoch marker table (stream mode), created next to the sink's table.
MARKER_TABLE = "sluice_epochs"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class DuckdbWriter:
    """Insert a run into a DuckDB table inside **one transaction**.

    ``BEGIN`` at :meth:`open`, ``COMMIT`` at :meth:`commit`, ``ROLLBACK`` at :meth:`abort`: other
    connections see all of the run's rows or none. The table is created from the first batch's
    Arrow schema when missing (all-null columns become VARCHAR). ``mode: replace`` drops the table
    inside the same transaction, so an aborted run keeps the old table. Rows are inserted from
    registered Arrow tables (no per-row work in Python) and keep their order.

    DuckDB has no savepoints: a constraint violation (NOT NULL, PRIMARY KEY, ...) aborts the
    whole transaction, so it fails the run with :class:`SinkError` instead of dead-lettering rows.
    A database file locked by another process raises :class:`TransientError` (at :meth:`open`,
    which connects; the batch transaction begins with the first :meth:`write` or :meth:`commit`).

    **Stream mode** (:class:`~sluice.plugins.EpochPublisher`): :meth:`publish` inserts one
    checkpoint epoch's rows and upserts the marker row ``(pipeline, sink, epoch)`` of the table
    ``sluice_epochs`` **in one transaction**, so the rows and the marker become visible
    together or not at all; :meth:`published_epoch` reads the marker back. An epoch not newer
    than the marker is skipped (nothing written, no dead letters), so a re-published epoch is
    never duplicated: exactly once. The marker table is created next to the sink's table (same
    database and schema, as DuckDB writes one database per transaction); its key is the
    pipeline name and the sink's step id with the run id (the history: the stream's
    checkpoint history, or the batch runs of the pipeline's state store). ``mode: replace``
    drops the old table in the transaction of the first epoch ever published (no marker yet);
    later epochs, also after a restart, append; in a batch run (``ctx.batch``, each epoch a
    whole run) it drops the table in every epoch's transaction. Rows refused while publishing
    (the aligner's dead letters) are handed to the runtime's journal before the commit
    (:meth:`publish_journaled`,
    :class:`~sluice.plugins.JournalingPublisher`). A failed insert rolls the epoch's
    transaction back and raises
    :class:`SinkError`; the marker is then unchanged. A sink instance is used either in batch
    mode or in stream mode, not both. The marker belongs to the checkpoint store's epoch
    numbering: a new, empty checkpoint store has a new id, so it never takes old markers for
    its own.
    """

    def __init__(self, config: DuckdbSink) -> None:
        self.config = config
        self.step_id = config.id
        self._con: Any = None
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        self._exists = False
        parts = config.table.split(".")
        self._parts = parts
        self._qualified = ".".join(_quote(p) for p in parts)
        self._schema_name = parts[-2] if len(parts) >= 2 else None
        self._marker_parts = [*parts[:-1], MARKER_TABLE]
        self._marker = ".".join(_quote(p) for p in self._marker_parts)
        self._ctx: RunContext | None = None
        self._in_batch = False  # the batch transaction has begun
        self._stream_ready = False  # the table was checked (and replaced) for stream mode

    def open(self, ctx: RunContext) -> None:
        """Connect to the database file (created if missing); no transaction begins yet."""
        import duckdb

        path = ctx.resolve(self.config.path)
        self._ctx = ctx
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        self._in_batch = False
        self._stream_ready = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._con = duckdb.connect(str(path))
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise TransientError(
                    self.step_id,
                    f"DuckDB database {path} is locked by another process: {exc}",
                    fix="close the other program using the database file",
                ) from exc
            raise SinkError(self.step_id, f"cannot open DuckDB database {path}: {exc}") from exc
        except (duckdb.Error, OSError) as exc:
            raise SinkError(self.step_id, f"cannot open DuckDB database {path}: {exc}") from exc

    def _begin_batch(self) -> None:
        """Begin the run's transaction (once) and prepare the table."""
        import duckdb

        if self._in_batch:
            return
        if self._stream_ready:
            raise SinkError(
                self.step_id, "write()/commit() called on a sink already used by publish()"
            )
        try:
            self._exec(self._con, "BEGIN TRANSACTION")
            self._in_batch = True
            self._prepare(replace=self.config.mode == "replace")
        except duckdb.Error as exc:
            self._close(rollback=True)
            raise SinkError(
                self.step_id, f"cannot prepare table {self.config.table}: {exc}"
            ) from exc

    def _prepare(self, *, replace: bool) -> None:
        """Inside a transaction: create the schema, drop (replace) or inspect the table."""
        con = self._con
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        if self._schema_name is not None:
            self._exec(con, f"CREATE SCHEMA IF NOT EXISTS {_quote(self._schema_name)}")
        if replace:
            self._exec(con, f"DROP TABLE IF EXISTS {self._qualified}")
            self._exists = False
        else:
            self._exists = self._table_exists()
            if self._exists:
                current = con.sql(f"SELECT * FROM {self._qualified} LIMIT 0").to_arrow_table()
                self._aligner.schema = normalize(current).schema

    @staticmethod
    def _exec(con: Any, statement: str, params: list[Any] | None = None) -> list[Any]:
        """Run a statement and drain its result (DuckDB needs that before the next one)."""
        rows: list[Any] = con.execute(statement, params).fetchall()
        return rows

    def _table_exists(self, parts: list[str] | None = None) -> bool:
        parts = self._parts if parts is None else parts
        schema = parts[-2] if len(parts) >= 2 else None
        sql = "SELECT count(*) FROM duckdb_tables() WHERE lower(table_name) = lower(?)"
        params = [parts[-1]]
        if schema is None:
            sql += " AND schema_name = current_schema()"
        else:
            sql += " AND lower(schema_name) = lower(?)"
            params.append(schema)
        if len(parts) == 3:
            sql += " AND lower(database_name) = lower(?)"
            params.append(parts[0])
        else:
            sql += " AND database_name = current_database()"
        row = self._exec(self._con, sql, params)[0]
        return bool(row and row[0])

    def write(self, table: pa.Table) -> pa.Table:
        import duckdb

        if self._con is None:
            raise SinkError(self.step_id, "write() called before open() or after commit()/abort()")
        self._begin_batch()
        data, dead = self._aligner.prepare(table)
        if data is None or data.num_rows == 0:
            return dead
        try:
            self._insert(data)
        except duckdb.Error as exc:
            raise SinkError(
                self.step_id,
                f"inserting into {self.config.table} failed: {exc}",
                fix="check constraints of the table; the run's transaction is rolled back",
            ) from exc
        return dead

    def _insert(self, data: pa.Table) -> None:
        import duckdb

        con = self._con
        con.register(_VIEW, data)
        try:
            if not self._exists:
                self._exec(con, f"CREATE TABLE {self._qualified} AS SELECT * FROM {_VIEW} LIMIT 0")
                self._exists = True
            if data.num_rows:
                self._exec(con, f"INSERT INTO {self._qualified} BY NAME SELECT * FROM {_VIEW}")
        finally:
            with contextlib.suppress(duckdb.Error):  # keep the real error visible
                con.unregister(_VIEW)

    def commit(self) -> None:
        import duckdb

        if self._con is None:
            return
        self._begin_batch()
        try:
            if not self._exists:
                schema = self._aligner.schema or self._aligner.fallback
                if schema is not None:  # a run without rows still leaves the (empty) table
                    self._insert(schema.empty_table())
            self._exec(self._con, "COMMIT")
        except duckdb.Error as exc:
            self._close(rollback=True)
            raise SinkError(self.step_id, f"commit of {self.config.table} failed: {exc}") from exc
        self._close(rollback=False)

    def abort(self) -> None:
        self._close(rollback=True)

    # -- stream mode (EpochPublisher) --------------------------------------------------------

    def published_epoch(self) -> int | None:
        """The newest epoch published by this pipeline's sink (its marker), None if none."""
        import duckdb

        con = self._stream_con("published_epoch")
        try:
            if not self._table_exists(self._marker_parts):
                return None
            rows = self._exec(
                con,
                f"SELECT max(epoch) FROM {self._marker} WHERE pipeline = ? AND sink = ?",
                [self._pipeline, self._marker_key],
            )
        except duckdb.Error as exc:
            raise SinkError(
                self.step_id, f"cannot read the epoch marker {self._marker}: {exc}"
            ) from exc
        value = rows[0][0] if rows else None
        return None if value is None else int(value)

    def publish(self, epoch: int, table: pa.Table) -> pa.Table:
        """Insert ``table`` (position columns dropped) and set the marker to ``epoch``, in one
        transaction; returns the dead letters of refused rows. An epoch not newer than the
        marker is skipped: nothing is written and no dead letters are returned."""
        letters: list[pa.Table] = []
        self.publish_journaled(epoch, table, letters.append)
        return letters[0] if letters else empty_dead_letters()

    def publish_journaled(
        self, epoch: int, table: pa.Table, journal: Callable[[pa.Table], None]
    ) -> None:
        """:meth:`publish` for the runtime (:class:`~sluice.plugins.JournalingPublisher`): the
        dead letters of refused rows go to ``journal`` before the transaction commits."""
        import duckdb

        con = self._stream_con("publish")
        published = self.published_epoch()
        if published is not None and epoch <= published:
            return
        # a batch run (each epoch a whole run) replaces the table at every epoch
        batch = self._ctx is not None and self._ctx.batch
        replace = self.config.mode == "replace" and (batch or published is None)
        try:
            self._exec(con, "BEGIN TRANSACTION")
            try:
                if replace or not self._stream_ready:
                    self._prepare(replace=replace)
                data, dead = self._aligner.prepare(table)
                if data is not None and data.num_rows:
                    self._insert(data)
                elif not self._exists:
                    schema = self._aligner.schema or self._aligner.fallback
                    if schema is not None and schema.names:  # an empty epoch creates it too
                        self._insert(schema.empty_table())
                self._exec(
                    con,
                    f"CREATE TABLE IF NOT EXISTS {self._marker} (pipeline VARCHAR NOT NULL, "
                    "sink VARCHAR NOT NULL, epoch BIGINT NOT NULL, PRIMARY KEY (pipeline, sink))",
                )
                self._exec(
                    con,
                    f"INSERT INTO {self._marker} (pipeline, sink, epoch) VALUES (?, ?, ?) "
                    "ON CONFLICT (pipeline, sink) DO UPDATE SET epoch = excluded.epoch",
                    [self._pipeline, self._marker_key, epoch],
                )
                journal(dead)  # durable before the commit: a crash after it loses no letter
                self._exec(con, "COMMIT")
            except BaseException:
                self._stream_ready = False  # re-inspect the table in the next transaction
                with contextlib.suppress(duckdb.Error):
                    self._exec(con, "ROLLBACK")
                raise
        except duckdb.Error as exc:
            raise SinkError(
                self.step_id,
                f"publishing epoch {epoch} to {self.config.table} failed: {exc}",
                fix="check constraints of the table; the epoch's transaction is rolled back",
            ) from exc
        self._stream_ready = True

    def close(self) -> None:
        """Close the connection (a batch transaction still open is rolled back)."""
        self._close(rollback=self._in_batch)
        self._stream_ready = False

    @property
    def _pipeline(self) -> str:
        return self._ctx.pipeline if self._ctx is not None else ""

    @property
    def _marker_key(self) -> str:
        """Sink id and run id: in stream mode the run id names the checkpoint history."""
        return f"{self.step_id}@{self._ctx.run_id if self._ctx is not None else ''}"

    def _stream_con(self, what: str) -> Any:
        if self._con is None:
            raise SinkError(self.step_id, f"{what}() called before open() or after close()")
        if self._in_batch:
            raise SinkError(
                self.step_id, f"{what}() called on a sink with an open batch transaction"
            )
        return self._con

    def _close(self, *, rollback: bool) -> None:
        con, self._con = self._con, None
        in_batch, self._in_batch = self._in_batch, False
        if con is None:
            return
        try:
            if rollback and in_batch:
                self._exec(con, "ROLLBACK")
        except Exception:  # the transaction may already be aborted
            pass
        finally:
            con.close()
