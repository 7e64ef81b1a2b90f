"""PostgreSQL sink (psycopg 3, imported lazily): COPY, one transaction per run, upsert, bisect."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from sluice.batch import empty_dead_letters, rows_dead_letters
from sluice.config.models import PostgresSink
from sluice.connectors.files.writers import SchemaAligner
from sluice.errors import ConfigError, SinkError, TransientError, require
from sluice.plugins import RunContext
from sluice.runtime.faults import crash_point

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

_ORD = "__sluice_ord"
_STAGE = "__sluice_stage"
_SAVEPOINT = "sluice_part"
_WRITE_SAVEPOINT = "sluice_batch"
_COPY_CHUNK = 4 << 20


def pg_type(t: pa.DataType) -> str:
    """The PostgreSQL column type a sink-created table uses for an Arrow type."""
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer"
    if pa.types.is_int64(t) or pa.types.is_uint32(t):
        return "bigint"
    if pa.types.is_uint64(t):
        return "numeric(20,0)"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "real"
    if pa.types.is_float64(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision},{t.scale})"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz is not None else "timestamp"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "bytea"
    return "text"


def _csv_ready(data: pa.Table) -> pa.Table:
    """Render the columns pyarrow's CSV writer cannot write, or not the way COPY reads them."""
    for i, f in enumerate(data.schema):
        t = f.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            hexed = pl.Series(values=data.column(i)).bin.encode("hex").to_arrow()
            col = pc.binary_join_element_wise("\\x", pc.cast(hexed, pa.string()), "")
        elif pg_type(t) == "text" and not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            try:
                col = pc.cast(data.column(i), pa.string())
            except pa.ArrowNotImplementedError:
                df = pl.from_arrow(data.select([i]))
                assert isinstance(df, pl.DataFrame)
                col = df.select(pl.struct(pl.all()).struct.json_encode())[:, 0].to_arrow()
                prefix = len('{"' + f.name + '":')  # unwrap {"name": <value>} to <value>
                col = pc.utf8_slice_codeunits(pc.cast(col, pa.string()), prefix, -1)
                col = pc.if_else(pc.is_null(data.column(i)), pa.scalar(None, pa.string()), col)
        else:
            continue
        data = data.set_column(i, pa.field(f.name, pa.string()), col)
    return data


#: Rows written per COPY when an epoch (a whole batch run) is published.
PUBLISH_SLICE_ROWS = 65_536


def _to_csv(data: pa.Table) -> bytes:
    buf = io.BytesIO()
    pa_csv.write_csv(_csv_ready(data), buf, pa_csv.WriteOptions(include_header=False))
    return buf.getvalue()


class PostgresWriter:
    """Write a run into a PostgreSQL table with COPY, in **one transaction**.

    * ``commit()`` commits the run's transaction, ``abort()`` rolls it back: other sessions see all
      of the run's rows or none (a table the sink creates is created in the same transaction).
    * Each batch is loaded with ``COPY ... FROM STDIN (FORMAT csv)`` from CSV text produced by
      pyarrow (no per-row Python work) inside a SAVEPOINT. When PostgreSQL refuses the batch for
      data reasons (SQLSTATE classes 22 and 23: NOT NULL, CHECK, UNIQUE, out of range, bad value)
      the savepoint is rolled back and the batch is bisected (each half in its own savepoint)
      until the refused rows are isolated: they become ``sink_rejected`` dead letters carrying the
      database's message, all other rows are written.
    * ``mode: upsert``: rows are copied into a temporary staging table, deduplicated on ``key``
      (the last row of the batch wins), then ``INSERT ... ON CONFLICT (key) DO UPDATE``; batches
      are upserted in input order in the one transaction. So whatever the batch cuts, **per key
      the last row in input order that the table accepts wins** (tested with random cuts). The
      stage carries the table's NOT NULL and CHECK constraints on the staged columns, so every
      row is checked, also one a later row of the same key supersedes: the refused rows
      (dead letters) do not depend on the cuts either (checks that only the table can make —
      other unique indexes, foreign keys, triggers — apply to the surviving row of a batch).
      A table the sink creates gets a unique index on ``key``; an existing table must already
      have one. Rows with a null key are dead letters.
    * Connection loss raises :class:`TransientError` as long as nothing of the run has been
      written yet: the executor's retry of ``write`` reconnects and starts a new transaction.
      Once rows were written, the lost transaction cannot be resumed (the server rolled it back),
      so the error is a :class:`SinkError` and the run must be re-run; nothing of it is visible.
      Lock timeouts, deadlocks and serialization failures inside a batch roll back to the
      batch's savepoint and raise :class:`TransientError`: the retried ``write`` continues the
      same transaction.
    """

    def __init__(self, config: PostgresSink) -> None:
        self.config = config
        self.step_id = config.id
        self._parts = config.table.split(".")
        if len(self._parts) > 2 or not all(self._parts):
            raise ConfigError(
                "table must be 'name' or 'schema.name'",
                step_id=config.id,
                field="table",
                value=config.table,
            )
        if config.mode == "upsert" and not config.key:
            raise ConfigError(
                "mode upsert needs the conflict key columns",
                step_id=config.id,
                field="key",
                fix="add key: [id] (the columns that identify a row)",
            )
        self._conn: psycopg.Connection[Any] | None = None
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        self._columns: dict[str, str] | None = None  # existing table: column -> type
        self._stage_ready = False
        self._dirty = False  # rows of this run were written in the current transaction
        self._opened = False
        self._pipeline = ""
        self._marker = ""
        self._epochs_table: Any = None

    # ---------------------------------------------------------------------------- sink protocol

    def open(self, ctx: RunContext) -> None:
        require("psycopg", "postgres", "PostgreSQL sink")
        self._pipeline = ctx.pipeline
        self._marker = f"{self.step_id}@{ctx.run_id}"  # stream mode: run_id names the history
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        self._dirty = False
        self._connect()
        self._opened = True

    def write(self, table: pa.Table) -> pa.Table:
        import psycopg

        if not self._opened:
            raise SinkError(self.step_id, "write() called before open() or after commit()/abort()")
        kept, data, dead = self._aligner.split(table)
        if data is None:
            return dead
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._dirty:
                raise self._lost_run(None)
            self._connect()
        try:
            refused = self._write(kept, data)
            return pa.concat_tables([dead, refused]) if dead.num_rows else refused
        except psycopg.OperationalError as exc:
            conn = self._conn
            if conn is not None and (conn.broken or conn.closed):
                if self._dirty:
                    raise self._lost_run(exc) from exc
                raise TransientError(
                    self.step_id,
                    f"connection to PostgreSQL lost: {exc}",
                    fix="the write is retried on a new connection",
                ) from exc
            raise SinkError(self.step_id, f"writing to {self.config.table} failed: {exc}") from exc
        except psycopg.Error as exc:
            raise SinkError(self.step_id, f"writing to {self.config.table} failed: {exc}") from exc

    def commit(self) -> None:
        import psycopg

        if not self._opened:
            return
        self._opened = False
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._columns is None and not conn.broken:
                schema = self._aligner.schema or self._aligner.fallback
                if schema is not None and self.config.create:  # no rows: still create the table
                    self._conn = conn
                    self._create_table(schema)
                    self._conn = None
            conn.commit()
        except psycopg.Error as exc:
            raise SinkError(
                self.step_id,
                f"commit to {self.config.table} failed, nothing of the run was written: {exc}",
            ) from exc
        finally:
            conn.close()

    def abort(self) -> None:
        self._opened = False
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not conn.broken and not conn.closed:
                conn.rollback()
        except Exception:  # the server rolls back a dead session anyway
            pass
        finally:
            conn.close()

    # ------------------------------------------------------------- stream mode (EpochPublisher)

    def published_epoch(self) -> int | None:
        """The newest checkpoint epoch whose rows are committed in the table (its marker)."""
        import psycopg
        from psycopg import sql

        if self._conn is None or self._conn.closed or self._conn.broken:
            self._connect()
        conn = self._conn
        assert conn is not None
        try:
            self._ensure_epochs(conn)
            row = conn.execute(
                sql.SQL("SELECT epoch FROM {} WHERE pipeline = %s AND sink = %s").format(
                    self._epochs_table
                ),
                [self._pipeline, self._marker],
            ).fetchone()
            conn.commit()
        except psycopg.OperationalError as exc:
            self._drop_connection()
            raise TransientError(self.step_id, f"PostgreSQL connection failed: {exc}") from exc
        return None if row is None else int(row[0])

    def publish(self, epoch: int, table: pa.Table) -> pa.Table:
        """Write one checkpoint epoch's rows and its marker row (table ``sluice_epochs``) in one
        transaction; an epoch at or below the marker is skipped (it is already in the table).
        Returns the dead letters of the rows refused."""
        letters: list[pa.Table] = []
        self.publish_journaled(epoch, table, letters.append)
        return letters[0] if letters else empty_dead_letters()

    def publish_journaled(
        self, epoch: int, table: pa.Table, journal: Callable[[pa.Table], None]
    ) -> None:
        """:meth:`publish` for the runtime (:class:`~sluice.plugins.JournalingPublisher`): the
        dead letters of the refused rows go to ``journal`` after the rows are written and
        before the transaction commits, so a crash right after the commit loses none."""
        import psycopg
        from psycopg import sql

        if self._conn is None or self._conn.closed or self._conn.broken:
            self._connect()
        conn = self._conn
        assert conn is not None
        self._opened = True
        try:
            self._ensure_epochs(conn)
            row = conn.execute(
                sql.SQL("SELECT epoch FROM {} WHERE pipeline = %s AND sink = %s FOR UPDATE").format(
                    self._epochs_table
                ),
                [self._pipeline, self._marker],
            ).fetchone()
            if row is not None and int(row[0]) >= epoch:
                conn.rollback()
                return
            # a batch run publishes the whole run as one (memory-mapped) table: write it in
            # slices, in input order, so that memory stays bounded (one transaction still)
            letters: list[pa.Table] = []
            for start in range(0, max(table.num_rows, 1), PUBLISH_SLICE_ROWS):
                kept, data, refused = self._aligner.split(table.slice(start, PUBLISH_SLICE_ROWS))
                if refused.num_rows:
                    letters.append(refused)
                if data is not None and data.num_rows:
                    written = self._write(kept, data)
                    if written.num_rows:
                        letters.append(written)
            dead = pa.concat_tables(letters) if letters else empty_dead_letters()
            if self._columns is None and self.config.create:  # no rows: still the table
                schema = self._aligner.schema or self._aligner.fallback
                if schema is not None and schema.names:
                    self._create_table(schema)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (pipeline, sink, epoch) VALUES (%s, %s, %s) "
                    "ON CONFLICT (pipeline, sink) DO UPDATE SET epoch = EXCLUDED.epoch, "
                    "updated = now()"
                ).format(self._epochs_table),
                [self._pipeline, self._marker, epoch],
            )
            journal(dead)  # durable before the commit: a crash after it loses no letter
            crash_point("publish_before_commit")
            conn.commit()
            self._stage_ready = False
        except TransientError:
            # a lock timeout or deadlock inside the epoch: start the retry from a clean slate
            self._stage_ready = False
            with contextlib.suppress(Exception):
                conn.rollback()
            raise
        except psycopg.OperationalError as exc:
            self._drop_connection()
            raise TransientError(
                self.step_id, f"PostgreSQL connection lost while publishing epoch {epoch}: {exc}"
            ) from exc
        except psycopg.Error as exc:
            self._stage_ready = False
            with contextlib.suppress(Exception):
                conn.rollback()
            raise SinkError(
                self.step_id, f"publishing epoch {epoch} to {self.config.table} failed: {exc}"
            ) from exc
        except BaseException:  # e.g. the journal could not be written: nothing is committed
            self._stage_ready = False
            with contextlib.suppress(Exception):
                conn.rollback()
            raise

    def close(self) -> None:
        self.abort()

    def _ensure_epochs(self, conn: Any) -> None:
        from psycopg import sql

        if self._epochs_table is None:
            schema = self._parts[0] if len(self._parts) == 2 else None
            self._epochs_table = (
                sql.Identifier(schema, "sluice_epochs")
                if schema
                else sql.Identifier("sluice_epochs")
            )
            if schema:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
                )
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (pipeline text NOT NULL, sink text NOT NULL,"
                " epoch bigint NOT NULL, updated timestamptz NOT NULL DEFAULT now(), "
                "PRIMARY KEY (pipeline, sink))"
            ).format(self._epochs_table)
        )

    # -------------------------------------------------------------------------------- internals

    @property
    def _table(self) -> sql.Identifier:
        from psycopg import sql

        return sql.Identifier(*self._parts)

    def _lost_run(self, exc: Exception | None) -> SinkError:
        return SinkError(
            self.step_id,
            "the connection to PostgreSQL was lost after rows of this run were written; the "
            f"server rolled the run's transaction back{f' ({exc})' if exc else ''}",
            fix="re-run the pipeline (nothing of this run was committed)",
        )

    def _connect(self) -> None:
        import psycopg

        if self._conn is not None:
            self._conn.close()
            self._conn = None
        try:
            conn = psycopg.connect(
                self.config.dsn, autocommit=False, client_encoding="UTF8", application_name="sluice"
            )
        except psycopg.OperationalError as exc:
            raise TransientError(
                self.step_id,
                f"cannot connect to PostgreSQL: {exc}",
                fix="check that the server is up and the dsn (host, port, user, database)",
            ) from exc
        self._conn = conn
        self._stage_ready = False
        try:
            self._inspect()
        except psycopg.OperationalError as exc:
            self._drop_connection()
            raise TransientError(self.step_id, f"PostgreSQL connection failed: {exc}") from exc
        except psycopg.Error as exc:
            self._drop_connection()
            raise SinkError(
                self.step_id, f"cannot inspect table {self.config.table}: {exc}"
            ) from exc
        except BaseException:
            self._drop_connection()
            raise

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _inspect(self) -> None:
        conn = self._conn
        assert conn is not None
        name = self._table.as_string(conn)
        rows = conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped "
            "ORDER BY a.attnum",
            [name],
        ).fetchall()
        self._columns = {r[0]: r[1] for r in rows} if rows else None
        if self._columns is None:
            if not self.config.create:
                raise SinkError(
                    self.step_id,
                    f"table {self.config.table} does not exist",
                    fix="create the table, or set create: true",
                )
            return
        if self.config.mode == "upsert":
            missing = [k for k in self.config.key if k not in self._columns]
            if missing:
                raise SinkError(
                    self.step_id,
                    f"key columns {missing} are not columns of {self.config.table}",
                    fix="key must name columns of the table",
                )
            uniques = conn.execute(
                "SELECT array_agg(a.attname::text) FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indpred IS NULL "
                "AND i.indexprs IS NULL GROUP BY i.indexrelid",
                [name],
            ).fetchall()
            if not any(set(r[0]) == set(self.config.key) for r in uniques):
                cols = ", ".join(self.config.key)
                raise SinkError(
                    self.step_id,
                    f"upsert needs a unique index or constraint on ({cols}) of {self.config.table}",
                    fix=f"CREATE UNIQUE INDEX ON {self.config.table} ({cols})",
                )

    def _create_table(self, schema: pa.Schema) -> None:
        from psycopg import sql

        conn = self._conn
        assert conn is not None
        if len(self._parts) == 2:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._parts[0]))
            )
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(f.name), sql.SQL(pg_type(f.type)))
            for f in schema
        )
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(self._table, columns))
        if self.config.mode == "upsert":
            key = sql.SQL(", ").join(map(sql.Identifier, self.config.key))
            conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(self._table, key))
        self._columns = {f.name: pg_type(f.type) for f in schema}

    def _write(self, table: pa.Table, data: pa.Table) -> pa.Table:
        if self._columns is None:
            self._create_table(data.schema)
        assert self._columns is not None
        unknown = [c for c in data.column_names if c not in self._columns]
        if unknown:
            return rows_dead_letters(
                table,
                step_id=self.step_id,
                reason="sink_rejected",
                message=f"columns {unknown} are not in table {self.config.table}",
            )
        if data.num_rows == 0:
            return empty_dead_letters()
        dead: list[pa.Table] = []
        if self.config.mode == "upsert":
            missing = [k for k in self.config.key if k not in data.column_names]
            if missing:
                return rows_dead_letters(
                    table,
                    step_id=self.step_id,
                    reason="sink_rejected",
                    message=f"upsert key columns {missing} are missing from the batch",
                )
            null_key = pc.is_null(data.column(self.config.key[0]))
            for k in self.config.key[1:]:
                null_key = pc.or_(null_key, pc.is_null(data.column(k)))
            if pc.any(null_key).as_py():
                message = f"upsert key ({', '.join(self.config.key)}) is null"
                dead.append(
                    rows_dead_letters(
                        table.filter(null_key),
                        step_id=self.step_id,
                        reason="sink_rejected",
                        message=message,
                    )
                )
                keep = pc.invert(null_key)
                table, data = table.filter(keep), data.filter(keep)
            self._prepare_stage(data.column_names)
            data = data.append_column(_ORD, pa.array(np.arange(data.num_rows, dtype=np.int64)))
        failures: list[tuple[int, str]] = []
        conn = self._conn
        assert conn is not None
        conn.execute(f"SAVEPOINT {_WRITE_SAVEPOINT}")
        try:
            self._load_range(data, 0, data.num_rows, failures)
        except TransientError:
            # Undo the parts of this batch already loaded, so the retried write starts clean.
            conn.execute(f"ROLLBACK TO SAVEPOINT {_WRITE_SAVEPOINT}")
            conn.execute(f"RELEASE SAVEPOINT {_WRITE_SAVEPOINT}")
            raise
        conn.execute(f"RELEASE SAVEPOINT {_WRITE_SAVEPOINT}")
        if failures:
            idx = pa.array([i for i, _ in failures], pa.int64())
            dead.append(
                rows_dead_letters(
                    table.take(idx),
                    step_id=self.step_id,
                    reason="sink_rejected",
                    message=[m for _, m in failures],
                )
            )
        if not dead:
            return empty_dead_letters()
        return pa.concat_tables(dead) if len(dead) > 1 else dead[0]

    def _prepare_stage(self, columns: list[str]) -> None:
        from psycopg import sql

        if self._stage_ready:
            return
        conn = self._conn
        assert conn is not None
        conn.execute(
            sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                sql.Identifier(_STAGE),
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                self._table,
            )
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint").format(
                sql.Identifier(_STAGE), sql.Identifier(_ORD)
            )
        )
        # The row checks of the table (NOT NULL, CHECK on the staged columns) on the stage too:
        # every input row is checked, also one a later row of the same key supersedes, so the
        # rows refused do not depend on how the input was cut into batches.
        name = self._table.as_string(conn)
        stage = sql.Identifier(_STAGE)
        for (column,) in conn.execute(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attnum > 0 AND NOT attisdropped AND attnotnull",
            [name],
        ).fetchall():
            if column in columns:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(
                        stage, sql.Identifier(column)
                    )
                )
        for constraint, definition, used in conn.execute(
            "SELECT c.conname::text, pg_get_constraintdef(c.oid), ARRAY(SELECT a.attname::text "
            "FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)) "
            "FROM pg_constraint c WHERE c.conrelid = to_regclass(%s) AND c.contype = 'c'",
            [name],
        ).fetchall():
            if set(used) <= set(columns):
                conn.execute(
                    sql.Composed(
                        [
                            sql.SQL("ALTER TABLE "),
                            stage,
                            sql.SQL(" ADD CONSTRAINT "),
                            sql.Identifier(constraint),
                            sql.SQL(" "),
                            sql.SQL(definition),  # the server's own rendering of the check
                        ]
                    )
                )
        self._stage_ready = True

    def _load_range(
        self, data: pa.Table, start: int, length: int, failures: list[tuple[int, str]]
    ) -> None:
        """Load rows [start, start+length) in a savepoint; bisect on data errors."""
        if length == 0:
            return
        error = self._try_load(data.slice(start, length))
        if error is None:
            return
        if length == 1:
            failures.append((start, error))
            return
        half = length // 2
        self._load_range(data, start, half, failures)
        self._load_range(data, start + half, length - half, failures)

    def _try_load(self, data: pa.Table) -> str | None:
        """Load ``data`` inside a savepoint: None on success, the message of a data error."""
        import psycopg

        conn = self._conn
        assert conn is not None
        conn.execute(f"SAVEPOINT {_SAVEPOINT}")
        try:
            self._load(data)
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            conn.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            conn.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
            state = exc.sqlstate or ""
            if state[:2] in ("22", "23"):
                diag = exc.diag.message_primary or str(exc)
                # a check found on the upsert's stage: name the table the user knows
                diag = diag.replace(f'relation "{_STAGE}"', f'relation "{self.config.table}"')
                detail = exc.diag.message_detail
                return f"{diag} ({detail})" if detail else diag
            if state[:2] == "40" or state in ("55P03", "57014"):
                raise TransientError(
                    self.step_id, f"PostgreSQL asked to retry the batch: {exc}"
                ) from exc
            raise
        conn.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
        self._dirty = True
        return None

    def _load(self, data: pa.Table) -> None:
        from psycopg import sql

        conn = self._conn
        assert conn is not None
        upsert = self.config.mode == "upsert"
        target = sql.Identifier(_STAGE) if upsert else self._table
        names = sql.SQL(", ").join(map(sql.Identifier, data.column_names))
        payload = memoryview(_to_csv(data))
        with conn.cursor() as cur:
            if upsert:
                cur.execute(sql.SQL("TRUNCATE {}").format(target))
            copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(target, names)
            with cur.copy(copy) as cp:
                for off in range(0, len(payload), _COPY_CHUNK):
                    cp.write(payload[off : off + _COPY_CHUNK])
            if upsert:
                cur.execute(self._upsert_sql([c for c in data.column_names if c != _ORD]))

    def _upsert_sql(self, columns: list[str]) -> sql.Composed:
        from psycopg import sql

        key = sql.SQL(", ").join(map(sql.Identifier, self.config.key))
        cols = sql.SQL(", ").join(map(sql.Identifier, columns))
        rest = [c for c in columns if c not in self.config.key]
        action: sql.Composable
        if rest:
            action = sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(
                    sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in rest
                )
            )
        else:
            action = sql.SQL("DO NOTHING")
        return sql.SQL(
            "INSERT INTO {table} ({cols}) SELECT DISTINCT ON ({key}) {cols} FROM {stage} "
            "ORDER BY {key}, {ord} DESC ON CONFLICT ({key}) {action}"
        ).format(
            table=self._table,
            cols=cols,
            key=key,
            stage=sql.Identifier(_STAGE),
            ord=sql.Identifier(_ORD),
            action=action,
        )
