"""Keyed event-time windows (tumbling, sliding) with mergeable aggregates.

Each batch is folded into per-(key, window) partial aggregates (vectorized: one Polars
group-by per batch). The watermark is the newest event time seen minus the allowed lateness; a
window is emitted once the watermark passes its end, and all remaining windows are emitted when
the input ends. A record that arrives when the earliest window it belongs to has already closed
is a dead letter with reason ``late`` (it could not be counted in every window it belongs to),
so nothing is dropped silently.

``first``/``last`` pick by event time, ties by arrival order. Results do not depend on how the
input is cut into batches as long as records are out of order
by less than the allowed lateness; the watermark only advances between batches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from sluice.batch import Frame, concat, empty_dead_letters, rows_dead_letters
from sluice.config.models import WindowStep
from sluice.errors import ConfigError, StepError
from sluice.plugins import StepResult
from sluice.steps._base import BaseStep, check_columns, to_polars
from sluice.time.durations import parse_duration

_AGG = re.compile(
    r"^\s*(count|sum|min|max|mean|first|last|count_distinct)\s*\(\s*([^)]*?)\s*\)\s*$"
)
_T = "__t_us"
_WS = "window_start"
_WE = "window_end"
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}


@dataclass(frozen=True)
class _Agg:
    name: str
    fn: str
    column: str | None


class Window(BaseStep):
    """The ``window`` step: ``window: {kind, size, slide, time, key, lateness}`` plus
    ``aggregate: {name: fn(col)}``. Output columns: the keys, ``window_start``, ``window_end``
    (UTC timestamps) and one column per aggregate."""

    config: WindowStep
    creates_rows = True

    def __init__(self, config: WindowStep) -> None:
        super().__init__(config)
        w = config.window
        try:
            self.size = round(parse_duration(w.size) * 1_000_000)
            self.slide = round(parse_duration(w.slide) * 1_000_000) if w.slide else self.size
            self.lateness = round(parse_duration(w.lateness) * 1_000_000)
        except ValueError as exc:
            raise ConfigError(str(exc), step_id=config.id, field="window") from None
        if self.size <= 0 or self.slide <= 0 or self.size % self.slide:
            raise ConfigError(
                "window size must be a positive multiple of slide",
                step_id=config.id,
                field="window.slide",
                value=w.slide,
                fix="e.g. size: 1m with slide: 10s",
            )
        if w.kind == "tumbling" and w.slide and self.slide != self.size:
            raise ConfigError(
                "a tumbling window has no slide",
                step_id=config.id,
                field="window.slide",
                fix="use kind: sliding, or remove slide",
            )
        self.keys = w.keys()
        self.aggs = [self._parse(name, text) for name, text in config.aggregate.items()]
        self.state: pl.DataFrame | None = None
        self.distinct: dict[str, pl.DataFrame] = {}
        self.max_t: int | None = None

    def _parse(self, name: str, text: str) -> _Agg:
        m = _AGG.match(text)
        if not m or (m.group(1) != "count" and not m.group(2)):
            raise ConfigError(
                f"cannot read aggregate {text!r}",
                step_id=self.config.id,
                field=f"aggregate.{name}",
                fix="use count(), sum(col), min(col), max(col), mean(col), first(col), "
                "last(col) or count_distinct(col)",
            )
        return _Agg(name, m.group(1), m.group(2) or None)

    # ------------------------------------------------------------------------ helpers

    def _event_time(self, df: pl.DataFrame) -> pl.Expr:
        col = self.config.window.time
        dtype = df.schema[col]
        c = pl.col(col)
        if isinstance(dtype, pl.Datetime):
            expr = c.dt.replace_time_zone(None) if dtype.time_zone else c
            return expr.dt.cast_time_unit("us").cast(pl.Int64)
        if dtype == pl.Date:
            return c.cast(pl.Datetime("us")).cast(pl.Int64)
        if dtype.is_numeric():
            return (c.cast(pl.Float64) * _UNIT_US[self.config.window.time_unit]).cast(pl.Int64)
        return (
            c.str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
            .dt.replace_time_zone(None)
            .cast(pl.Int64)
        )

    @property
    def watermark(self) -> int | None:
        return None if self.max_t is None else self.max_t - self.lateness

    def _partials(self, df: pl.DataFrame) -> pl.DataFrame:
        """Per (key, window) partial aggregates of one batch."""
        per_row = self.size // self.slide
        base = (pl.col(_T) // self.slide) * self.slide
        if per_row == 1:
            df = df.with_columns(base.alias(_WS))
        else:
            df = df.with_columns((base - pl.int_ranges(0, per_row) * self.slide).alias(_WS))
            df = df.explode(_WS)
        group = [*self.keys, _WS]
        exprs: list[pl.Expr] = []
        for a in self.aggs:
            c = pl.col(a.column) if a.column else None
            if a.fn == "count":
                exprs.append(
                    (c.count() if c is not None else pl.len()).cast(pl.Int64).alias(a.name)
                )
            elif a.fn in ("sum", "min", "max"):
                assert c is not None
                exprs.append(getattr(c, a.fn)().alias(a.name))
            elif a.fn == "mean":
                assert c is not None
                exprs += [c.sum().alias(f"{a.name}__sum"), c.count().alias(f"{a.name}__n")]
            elif a.fn in ("first", "last"):
                assert c is not None
                pick = (
                    c.sort_by(_T, maintain_order=True).first()
                    if a.fn == "first"
                    else c.sort_by(_T, maintain_order=True).last()
                )
                t = pl.col(_T).min() if a.fn == "first" else pl.col(_T).max()
                exprs += [pick.alias(a.name), t.alias(f"{a.name}__t")]
            else:  # count_distinct: the exact set of values is kept per window
                assert c is not None
                vals = df.select([*group, c.alias("v")]).drop_nulls("v").unique()
                old = self.distinct.get(a.name)
                self.distinct[a.name] = vals if old is None else pl.concat([old, vals]).unique()
        return df.group_by(group).agg(exprs) if exprs else df.select(group).unique()

    def _merge(self, partials: pl.DataFrame) -> None:
        if self.state is None:
            self.state = partials
            return
        both = pl.concat([self.state, partials], how="diagonal_relaxed")
        group = [*self.keys, _WS]
        exprs: list[pl.Expr] = []
        for a in self.aggs:
            if a.fn in ("count", "sum"):
                exprs.append(pl.col(a.name).sum())
            elif a.fn in ("min", "max"):
                exprs.append(getattr(pl.col(a.name), a.fn)())
            elif a.fn == "mean":
                exprs += [pl.col(f"{a.name}__sum").sum(), pl.col(f"{a.name}__n").sum()]
            elif a.fn in ("first", "last"):
                t = pl.col(f"{a.name}__t")
                exprs += [
                    pl.col(a.name).sort_by(t, maintain_order=True).first()
                    if a.fn == "first"
                    else pl.col(a.name).sort_by(t, maintain_order=True).last(),
                    t.min() if a.fn == "first" else t.max(),
                ]
        self.state = (
            both.group_by(group, maintain_order=True).agg(exprs)
            if exprs
            else both.unique(group, maintain_order=True)
        )

    def _emit(self, upto: int | None) -> pl.DataFrame | None:
        """Remove and return the windows whose end is at or before ``upto`` (all when None)."""
        if self.state is None or self.state.height == 0:
            return None
        done_mask = (pl.col(_WS) + self.size <= upto) if upto is not None else pl.lit(True)
        done = self.state.filter(done_mask)
        self.state = self.state.filter(~done_mask)
        if done.height == 0:
            return None
        group = [*self.keys, _WS]
        for a in self.aggs:
            if a.fn == "count_distinct":
                vals = self.distinct[a.name]
                counts = (
                    vals.join(done.select(group), on=group, how="semi")
                    .group_by(group)
                    .agg(pl.len().cast(pl.Int64).alias(a.name))
                )
                done = done.join(counts, on=group, how="left").with_columns(
                    pl.col(a.name).fill_null(0)
                )
                self.distinct[a.name] = vals.join(done.select(group), on=group, how="anti")
            elif a.fn == "mean":
                done = done.with_columns(
                    (pl.col(f"{a.name}__sum") / pl.col(f"{a.name}__n")).alias(a.name)
                )
        out = done.with_columns(
            pl.col(_WS).cast(pl.Datetime("us", "UTC")),
            (pl.col(_WS) + self.size).cast(pl.Datetime("us", "UTC")).alias(_WE),
        ).sort([_WS, *self.keys])
        return out.select([*self.keys, _WS, _WE, *(a.name for a in self.aggs)])

    # ------------------------------------------------------------------------ step

    def process(self, table: Frame) -> StepResult:
        df = to_polars(table)
        cols = [self.config.window.time, *self.keys, *(a.column for a in self.aggs if a.column)]
        check_columns(self.step_id, cols, df.columns, "window")
        for a in self.aggs:
            if a.fn in ("sum", "mean") and a.column and not df.schema[a.column].is_numeric():
                raise StepError(
                    self.step_id,
                    f"aggregate {a.name}: {a.fn}({a.column}) needs numbers, but column "
                    f"{a.column!r} is {df.schema[a.column]}",
                    fix=f"cast it first, e.g. a step with cast: {{{a.column}: float}}",
                )
        df = df.with_columns(self._event_time(df).alias(_T))
        bad_time = df.filter(pl.col(_T).is_null())
        dead = empty_dead_letters()
        if bad_time.height:
            dead = rows_dead_letters(
                bad_time.drop(_T),
                step_id=self.step_id,
                reason="cast_error",
                message=f"event time {self.config.window.time!r} is missing or cannot be read",
            )
            df = df.filter(pl.col(_T).is_not_null())
        wm = self.watermark
        if wm is not None:
            # late: the earliest window the record belongs to has already closed
            first_end = (
                (pl.col(_T) // self.slide) * self.slide - (self.size - self.slide) + self.size
            )
            late = df.filter(first_end <= wm)
            if late.height:
                dead = concat(
                    [
                        dead,
                        rows_dead_letters(
                            late.drop(_T),
                            step_id=self.step_id,
                            reason="late",
                            message=f"event time is behind the watermark (allowed lateness "
                            f"{self.config.window.lateness}): its window already closed",
                        ),
                    ]
                )
                df = df.filter(first_end > wm)
        if df.height:
            self._merge(self._partials(df))
            newest = df[_T].max()
            assert isinstance(newest, int)
            self.max_t = newest if self.max_t is None else max(self.max_t, newest)
        emitted = self._emit(self.watermark)
        assert isinstance(dead, pa.Table)
        return StepResult(emitted, dead=dead, aggregated=df.height)

    def finish(self) -> StepResult | None:
        out = self._emit(None)
        return StepResult(out) if out is not None else None


__all__ = ["Window"]
