"""DuckDB sink: one transaction per run."""

from __future__ import annotations

import contextlib
from typing import Any

import pyarrow as pa

from sluice.config.models import DuckdbSink
from sluice.connectors.files.writers import SchemaAligner, normalize
from sluice.errors import SinkError, TransientError
from sluice.plugins import RunContext

_VIEW = "__sluice_batch"


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
    A database file locked by another process raises :class:`TransientError`.
    """

    def __init__(self, config: DuckdbSink) -> None:
        self.config = config
        self.step_id = config.id
        self._con: Any = None
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
        self._exists = False
        parts = config.table.split(".")
        self._qualified = ".".join(_quote(p) for p in parts)
        self._schema_name = parts[-2] if len(parts) >= 2 else None

    def open(self, ctx: RunContext) -> None:
        import duckdb

        path = ctx.resolve(self.config.path)
        self._aligner = SchemaAligner(self.step_id, null_as=pa.string())
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
        con = self._con
        try:
            self._exec(con, "BEGIN TRANSACTION")
            if self._schema_name is not None:
                self._exec(con, f"CREATE SCHEMA IF NOT EXISTS {_quote(self._schema_name)}")
            if self.config.mode == "replace":
                self._exec(con, f"DROP TABLE IF EXISTS {self._qualified}")
                self._exists = False
            else:
                self._exists = self._table_exists()
                if self._exists:
                    current = con.sql(f"SELECT * FROM {self._qualified} LIMIT 0").to_arrow_table()
                    self._aligner.schema = normalize(current).schema
        except duckdb.Error as exc:
            self._close(rollback=True)
            raise SinkError(
                self.step_id, f"cannot prepare table {self.config.table}: {exc}"
            ) from exc

    @staticmethod
    def _exec(con: Any, statement: str, params: list[Any] | None = None) -> list[Any]:
        """Run a statement and drain its result (DuckDB needs that before the next one)."""
        rows: list[Any] = con.execute(statement, params).fetchall()
        return rows

    def _table_exists(self) -> bool:
        parts = self.config.table.split(".")
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

    def _close(self, *, rollback: bool) -> None:
        con, self._con = self._con, None
        if con is None:
            return
        try:
            if rollback:
                self._exec(con, "ROLLBACK")
        except Exception:  # the transaction may already be aborted
            pass
        finally:
            con.close()
