"""Shared plumbing for built-in steps: Arrow <-> Polars and friendly column errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import polars as pl
import pyarrow as pa

from sluice.batch import HIDDEN_COLS, Frame, as_polars, strip_positions
from sluice.errors import StepError
from sluice.plugins import RunContext, StepResult, lookup


class BaseStep:
    """Default open/finish/close; subclasses implement ``process``."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.step_id: str = config.id
        self.ctx: RunContext | None = None

    def open(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def finish(self) -> StepResult | Iterable[StepResult] | None:
        return None

    def close(self) -> None:
        return None


def to_polars(frame: Frame) -> pl.DataFrame:
    """The frame as a Polars DataFrame (no work when it already is one)."""
    return as_polars(frame)


def user_columns(names: Iterable[str]) -> list[str]:
    return [n for n in names if n not in HIDDEN_COLS]


def check_columns(step_id: str, wanted: Iterable[str], available: Iterable[str], what: str) -> None:
    """Raise a StepError naming the missing column(s), the closest match and the input columns."""
    have = user_columns(available)
    missing = [c for c in wanted if c not in have]
    if not missing:
        return
    hints = []
    for m in missing:
        close = difflib.get_close_matches(m, have, n=1)
        hints.append(f"'{m}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise StepError(
        step_id,
        f"{what} names column(s) not in the input: {', '.join(hints)}",
        fix=f"use one of the input columns: {', '.join(have)}",
    )


def polars_error(step_id: str, what: str, exc: Exception, columns: Iterable[str]) -> StepError:
    """Convert a Polars/DuckDB error into a StepError that names the step and the columns."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StepError(
        step_id,
        f"{what} failed: {msg}",
        fix=f"check the expression; input columns are: {', '.join(user_columns(columns))}",
    )


def sql_error(step_id: str, exc: Exception, columns: Iterable[str]) -> StepError:
    """A DuckDB error of a step's SQL (a ``sql`` statement, a ``filter`` / ``derive``
    expression run by DuckDB) as a StepError: an unknown column with 'did you mean' and the
    input's columns, anything else with DuckDB's first line."""
    from sluice.steps.sqlengine import missing_column_hint

    hint = missing_column_hint(str(exc), user_columns(columns))
    if hint:
        return StepError(step_id, f"SQL failed: {hint}", fix="fix the column name")
    return polars_error(step_id, "SQL", exc, columns)


def read_reference(
    step_id: str, source_config: Any, ctx: RunContext
) -> tuple[list[pa.Table], list[pa.Table]]:
    """Read a reference source whole with Sluice's own reader (a join's ``reference``, a sql
    step's ``tables``): ``(its tables without position columns, its dead letters)``. Dead letters
    carry ``step_id`` (the step that reads the reference), so bad reference rows are never lost."""
    cfg = source_config.model_copy(update={"id": step_id})
    reader = lookup("source", cfg.kind)(cfg)
    reader.open(ctx)
    tables: list[pa.Table] = []
    dead: list[pa.Table] = []
    try:
        for chunk in reader.read():
            if chunk.table is not None:
                tables.append(strip_positions(chunk.table))
            if chunk.dead is not None and chunk.dead.num_rows:
                dead.append(chunk.dead)
    finally:
        reader.close()
    return tables, dead
