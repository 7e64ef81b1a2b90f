"""Expression steps: filter rows and derive columns with SQL expressions (run by Polars)."""

from __future__ import annotations

import polars as pl

from sluice.batch import Frame
from sluice.config.models import DeriveStep, FilterStep
from sluice.errors import ConfigError, StepError
from sluice.plugins import StepResult
from sluice.steps._base import BaseStep, polars_error, to_polars


def compile_expr(step_id: str, text: str, field: str) -> pl.Expr:
    try:
        return pl.sql_expr(text)
    except Exception as exc:  # polars raises several types for SQL syntax errors
        raise ConfigError(
            f"cannot parse SQL expression: {str(exc).splitlines()[0]}",
            step_id=step_id,
            field=field,
            value=text,
            fix="write a SQL expression such as: amount > 0 AND status = 'ok'",
        ) from exc


class Filter(BaseStep):
    """Keep rows where the SQL expression is true; false and null rows are filtered on purpose."""

    config: FilterStep

    def __init__(self, config: FilterStep) -> None:
        super().__init__(config)
        self.expr = compile_expr(config.id, config.filter, "filter")

    def process(self, table: Frame) -> StepResult:
        df = to_polars(table)
        try:
            out = df.filter(self.expr.fill_null(False))
        except Exception as exc:
            if isinstance(exc, StepError):
                raise
            raise polars_error(
                self.step_id, f"filter {self.config.filter!r}", exc, df.columns
            ) from exc
        return StepResult(out, filtered=df.height - out.height)


class Derive(BaseStep):
    """Add or replace columns from SQL expressions, in order (later ones may use earlier ones)."""

    config: DeriveStep

    def __init__(self, config: DeriveStep) -> None:
        super().__init__(config)
        self.exprs = [
            (name, compile_expr(config.id, text, f"derive.{name}").alias(name))
            for name, text in config.derive.items()
        ]

    def process(self, table: Frame) -> StepResult:
        df = to_polars(table)
        try:
            lazy = df.lazy()
            for _, expr in self.exprs:
                lazy = lazy.with_columns(expr)
            out = lazy.collect()
        except Exception as exc:
            raise polars_error(self.step_id, "derive", exc, df.columns) from exc
        return StepResult(out)
