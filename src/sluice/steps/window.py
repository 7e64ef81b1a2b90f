"""Keyed event-time windows (tumbling, sliding, session) with mergeable aggregates.

Each batch is folded into per-(key, window) partial aggregates, vectorized with Polars (no
per-record Python loop). State, per partition of the input (``__sluice_source``: a file, a
Kafka partition, a Redis stream):

* the partition's newest event time (its *maximum*);
* the step's **watermark**: the minimum over active partitions of (maximum - ``lateness``), never
  moving backwards. With ``idle_timeout`` a partition that sent nothing for that long (wall clock,
  ``time.monotonic``) is left out of the minimum; when every partition is idle the maximum over
  partitions is used;
* the open windows (partial aggregates) and, for ``count_distinct``, the exact value sets.

**Lateness is decided per record, in arrival order.** Record *i* of partition *p* is checked
against::

    wm_i = max(W, min(M_others, P_i) - lateness)

where ``W`` is the step's watermark after the previous batch, ``M_others`` the smallest maximum of
the *other* active partitions at the start of the batch, and ``P_i`` the newest event time of
partition *p* before record *i* (the partition's maximum carried from earlier batches combined
with a ``cum_max`` over the batch). The record is *late* (dead letter, reason ``late``) when the
earliest window it belongs to ends at or before ``wm_i`` — for a session window: when
``[t, t + gap)`` ends at or before ``wm_i``. With a single partition this is exactly "the newest
event time of all records before it, minus lateness", so which records are late, and every
window's result, do not depend on how the input is cut into batches. With several partitions,
other partitions' progress inside the same batch counts from the next batch on.

Windows are emitted at the end of each ``process`` call for the watermark after the batch:
tumbling and sliding windows when the watermark reaches their end, sessions when it reaches
their end plus ``gap`` (the soonest moment no on-time record can still extend them). The rest are
emitted by ``finish`` at the end of a bounded input.

``first``/``last`` pick by event time, ties by arrival order. Sums of float columns are kept
exactly (integer digits, see :func:`_limbs`), so they too are the same whatever the batch cuts.
``early`` additionally emits the
current partial result of every open window that changed, marked ``is_final = false``.
``snapshot()``/``restore()`` save and load the complete state as Arrow tables for checkpoints.
"""

from __future__ import annotations

import difflib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import polars as pl
import pyarrow as pa

from sluice.batch import SOURCE_COL, Frame, concat, empty_dead_letters, rows_dead_letters
from sluice.batch import source_names as _source_names
from sluice.config.models import WindowStep
from sluice.errors import ConfigError, StepError
from sluice.plugins import StepResult
from sluice.steps._base import BaseStep, check_columns, to_polars
from sluice.time.durations import format_duration, parse_duration

#: The aggregate functions of ``aggregate: {name: fn(column)}``.
AGGREGATES = ("count", "sum", "min", "max", "mean", "first", "last", "count_distinct")
_AGG = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.S)
_T = "__t_us"  # event time, microseconds since the epoch (UTC)
_P = "__part"  # partition id (interned __sluice_source, -1 when absent)
_I = "__i"  # arrival order
_SID = "__sid"  # session id while sessions are merged
_V = "__v"  # a distinct value
_F = "__f"  # a float value summed exactly
_LIMB = "__limb"  # exact float sums: block j, worth 2**(32 * j - 1074) (see _limbs)
_DIGITS = ("__d0", "__d1", "__d2")  # exact float sums: integer digit sums of a block
_LATE = "__late"  # behind the watermark (see _late_mask)
_DIRTY = "__dirty"  # changed since its last (early) emission
_WS = "window_start"
_WE = "window_end"
_FINAL = "is_final"
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}
_NO_PARTITION = ""  # partition name used when the input has no __sluice_source column
STATE_VERSION = 1


_Folded = tuple[pl.DataFrame, dict[str, pl.DataFrame], dict[str, pl.DataFrame]]


@dataclass(frozen=True)
class _Agg:
    name: str
    fn: str
    column: str | None


def parse_aggregate(step_id: str, name: str, text: str) -> _Agg:
    """One entry of a window step's ``aggregate: {name: fn(column)}`` (``count()`` and
    ``count(*)`` count rows): the function and the column it reads, or a
    :class:`ConfigError` saying what is wrong. The column plan (``sluice validate``) uses it
    too, so both read an aggregate the same way."""
    usage = (
        "use count(), sum(col), min(col), max(col), mean(col), first(col), last(col) or "
        "count_distinct(col)"
    )

    def fail(message: str, fix: str = usage) -> NoReturn:
        raise ConfigError(message, step_id=step_id, field=f"aggregate.{name}", value=text, fix=fix)

    m = _AGG.match(text)
    if not m:
        fail("cannot read this aggregate: write function(column)")
    fn, arg = m.group(1), m.group(2).strip()
    if fn not in AGGREGATES:
        close = difflib.get_close_matches(fn.lower(), AGGREGATES, n=1)
        hint = f"did you mean {close[0]}()? Or " if close else ""
        fail(f"unknown aggregate function {fn!r}", hint + usage)
    if fn == "count" and arg == "*":
        arg = ""
    if "," in arg or "(" in arg or ")" in arg:
        fail(f"{fn}() takes one column name", f"e.g. {fn}(amount); derive a column first")
    if arg[:1] in ("'", "$", "*"):
        fail(f"{fn}() takes a column name, not {arg!r}", f"e.g. {fn}(amount)")
    if fn != "count" and not arg:
        fail(f"{fn}() needs a column", f"e.g. {fn}(amount)")
    return _Agg(name, fn, arg or None)


class Window(BaseStep):
    """The ``window`` step: ``window: {kind, size, slide, gap, time, key, lateness,
    idle_timeout, early}`` plus ``aggregate: {name: fn(col)}``.

    Output columns: the keys, ``window_start``, ``window_end`` (UTC timestamps), one column per
    aggregate, and with ``early`` a boolean ``is_final``.

    What a runtime may rely on: ``process``/``finish`` (the Step protocol), ``tick()`` (advance
    idle timeouts and early updates without input), ``watermark`` (int microseconds or None),
    ``snapshot()`` / ``restore(state)`` (Arrow tables), and ``clock`` (the processing-time
    source, ``time.monotonic`` unless replaced).
    """

    config: WindowStep
    creates_rows = True
    #: Watermarks per source partition (``__sluice_source``). The stream runtime turns this on
    #: for broker sources (Redis stream keys, Kafka partitions), whose partitions all stay live.
    #: Off for files (batch runs and watched folders): a file that was read to its end would
    #: otherwise hold the watermark back, and windows would only close at the end of input.
    per_partition = False

    def __init__(self, config: WindowStep) -> None:
        super().__init__(config)
        w = config.window
        self.kind: str = w.kind
        self.lateness = self._us("lateness", w.lateness, allow_zero=True)
        self.size = 0
        self.slide = 0
        self.gap = 0
        if w.kind == "session":
            if w.gap is None:
                self._fail("a session window needs gap", "window.gap", None, "e.g. gap: 30 min")
            for field in ("size", "slide"):
                if getattr(w, field) is not None:
                    self._fail(
                        f"a session window has no {field}: its length comes from its events",
                        f"window.{field}",
                        getattr(w, field),
                        f"remove {field} and set gap (e.g. gap: 30 min)",
                    )
            self.gap = self._us("gap", w.gap, allow_zero=False)
        else:
            if w.gap is not None:
                self._fail(
                    f"a {w.kind} window has no gap",
                    "window.gap",
                    w.gap,
                    "use kind: session, or remove gap",
                )
            if w.size is None:
                self._fail(f"a {w.kind} window needs size", "window.size", None, "e.g. size: 1 min")
            self.size = self._us("size", w.size, allow_zero=False)
            self.slide = (
                self._us("slide", w.slide, allow_zero=False) if w.slide is not None else self.size
            )
            if self.size % self.slide:
                self._fail(
                    "window size must be a positive multiple of slide",
                    "window.slide",
                    w.slide,
                    "e.g. size: 1m with slide: 10s",
                )
            if w.kind == "tumbling" and w.slide is not None and self.slide != self.size:
                self._fail(
                    "a tumbling window has no slide",
                    "window.slide",
                    w.slide,
                    "use kind: sliding, or remove slide",
                )
        self.idle_timeout: float | None = (
            self._us("idle_timeout", w.idle_timeout, allow_zero=False) / 1e6
            if w.idle_timeout is not None
            else None
        )
        self.early: float | None = (
            self._us("early", w.early, allow_zero=True) / 1e6 if w.early is not None else None
        )
        self.keys = w.keys()
        self.aggs = [self._parse(name, text) for name, text in config.aggregate.items()]
        #: input column -> partial columns holding its sums (sum: the aggregate, mean: __sum)
        self._float_partials: dict[str, list[str]] = {}
        for a in self.aggs:
            if a.fn in ("sum", "mean") and a.column:
                partial = a.name if a.fn == "sum" else f"{a.name}__sum"
                self._float_partials.setdefault(a.column, []).append(partial)
        #: processing-time clock (seconds); tests and runtimes may replace it
        self.clock: Callable[[], float] = time.monotonic
        self.state: pl.DataFrame | None = None  # open windows: keys, _WS, _WE, partials, _DIRTY
        self.distinct: dict[str, pl.DataFrame] = {}  # count_distinct: keys, _WS, _V
        self.fsums: dict[str, pl.DataFrame] = {}  # exact float sums: keys, _WS, _LIMB, digits
        self.part_max: dict[str, int] = {}  # partition name -> newest event time (us)
        self.part_seen: dict[str, float] = {}  # partition name -> clock() when last heard of
        self._wm: int | None = None
        self._last_early: float | None = None

    # ------------------------------------------------------------------------ config

    def _fail(self, message: str, field: str, value: object, fix: str) -> NoReturn:
        raise ConfigError(message, step_id=self.config.id, field=field, value=value, fix=fix)

    def _us(self, field: str, value: str | float, *, allow_zero: bool) -> int:
        """A configured duration in microseconds, or a ConfigError naming the field."""
        try:
            seconds = parse_duration(value)
        except (TypeError, ValueError):
            raise ConfigError(
                "cannot read this duration",
                step_id=self.config.id,
                field=f"window.{field}",
                value=value,
                fix="write e.g. '30s', '15 min', '1 hour', '2 days' (or a number of seconds)",
            ) from None
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise ConfigError(
                f"{field} must be {'zero or more' if allow_zero else 'positive'}",
                step_id=self.config.id,
                field=f"window.{field}",
                value=value,
                fix="e.g. '10s'",
            )
        return round(seconds * 1_000_000)

    def _parse(self, name: str, text: str) -> _Agg:
        return parse_aggregate(self.config.id, name, text)

    # ------------------------------------------------------------------------ public state

    @property
    def watermark(self) -> int | None:
        """The step's watermark in microseconds since the epoch (UTC), None before any data."""
        return self._wm

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
        if dtype.is_integer():
            return c.cast(pl.Int64) * _UNIT_US[self.config.window.time_unit]
        if dtype.is_numeric():
            return (c.cast(pl.Float64) * _UNIT_US[self.config.window.time_unit]).cast(pl.Int64)
        if dtype == pl.Null:
            return pl.lit(None, dtype=pl.Int64)
        return (
            c.cast(pl.String)
            .str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
            .dt.replace_time_zone(None)
            .cast(pl.Int64)
        )

    def _threshold(self) -> pl.Expr:
        """End of the earliest window a record belongs to: late when it is <= the watermark."""
        if self.kind == "session":
            return pl.col(_T) + self.gap
        return (pl.col(_T) // self.slide) * self.slide + self.slide

    def _partition_names(self, ids: list[int]) -> dict[int, str]:
        known = [i for i in ids if i >= 0]
        names: dict[int, str] = {-1: _NO_PARTITION}
        if known:
            try:
                got = _source_names(pa.array(known, pa.int32())).to_pylist()
            except (IndexError, pa.ArrowException):
                got = [f"#{i}" for i in known]
            for i, g in zip(known, got, strict=True):
                names[i] = g if g is not None else f"#{i}"
        return names

    def _active(self, now: float) -> set[str]:
        if self.idle_timeout is None:
            return set(self.part_max)
        return {n for n in self.part_max if now - self.part_seen.get(n, now) < self.idle_timeout}

    def _combined(self, now: float) -> int | None:
        """min over active partitions of their maximum - lateness (max when all are idle)."""
        if not self.part_max:
            return None
        active = self._active(now)
        if active:
            return min(self.part_max[n] for n in active) - self.lateness
        return max(self.part_max.values()) - self.lateness

    # ------------------------------------------------------------------------ partials

    def _float_columns(self, df: pl.DataFrame) -> list[str]:
        """Input columns of sum/mean aggregates that are floats in this batch. Their sums are
        kept exactly (see :func:`_limbs`), so they do not depend on the order in which values
        are added, i.e. on batch cuts; one table per column serves sum and mean alike."""
        return [c for c in self._float_partials if df.schema[c].is_float()]

    def _record_partials(self, floats: list[str]) -> list[pl.Expr]:
        """One partial-aggregate row per record (merged later by :meth:`_combine`)."""
        exprs: list[pl.Expr] = []
        for a in self.aggs:
            c = pl.col(a.column) if a.column else None
            if a.fn == "count":
                exprs.append(
                    (
                        c.is_not_null().cast(pl.Int64) if c is not None else pl.lit(1, pl.Int64)
                    ).alias(a.name)
                )
            elif a.fn in ("sum", "min", "max"):
                assert c is not None
                exact = a.fn == "sum" and a.column in floats
                exprs.append((pl.lit(None, pl.Float64) if exact else c).alias(a.name))
            elif a.fn == "mean":
                assert c is not None
                exact = a.column in floats
                exprs += [
                    (pl.lit(None, pl.Float64) if exact else c).alias(f"{a.name}__sum"),
                    c.is_not_null().cast(pl.Int64).alias(f"{a.name}__n"),
                ]
            elif a.fn in ("first", "last"):
                assert c is not None
                exprs += [c.alias(a.name), pl.col(_T).alias(f"{a.name}__t")]
        return exprs

    def _combine(self) -> list[pl.Expr]:
        """Merge partial rows of one window (rows in arrival order)."""
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
                v = pl.col(a.name).sort_by(t, maintain_order=True)
                exprs += [
                    v.first() if a.fn == "first" else v.last(),
                    t.min() if a.fn == "first" else t.max(),
                ]
        return exprs

    def _distinct_aggs(self) -> list[_Agg]:
        return [a for a in self.aggs if a.fn == "count_distinct"]

    def _fold_fixed(self, df: pl.DataFrame) -> _Folded:
        """New open windows and side tables with on-time records folded into tumbling/sliding
        windows (nothing is changed: the caller commits)."""
        per_row = self.size // self.slide
        base = (pl.col(_T) // self.slide) * self.slide
        lf = df.lazy()
        if per_row == 1:
            lf = lf.with_columns(base.alias(_WS))
        else:
            lf = lf.with_columns((base - pl.int_ranges(0, per_row) * self.slide).alias(_WS))
            lf = lf.explode(_WS)
        floats = self._float_columns(df)
        if self._distinct_aggs() or floats:  # side tables need the records' windows
            df = lf.collect()
            lf = df.lazy()
        group = [*self.keys, _WS]
        distinct = dict(self.distinct)
        for a in self._distinct_aggs():
            assert a.column is not None
            vals = df.select([*group, pl.col(a.column).alias(_V)]).drop_nulls(_V).unique()
            old = self.distinct.get(a.name)
            distinct[a.name] = (
                vals if old is None else pl.concat([old, vals], how="vertical_relaxed").unique()
            )
        fsums = dict(self.fsums)
        for col in floats:
            old = self.fsums.get(col)
            fsums[col] = _sum_limbs([*([old] if old is not None else []), _limbs(df, group, col)])
        # one query: a window's end is its start + size, so it is set after the group-by
        recs = lf.select(*group, *self._record_partials(floats), pl.lit(True).alias(_DIRTY))
        both = (
            recs
            if self.state is None
            else pl.concat([self.state.lazy().drop(_WE), recs], how="diagonal_relaxed")
        )
        state = (
            both.group_by(group, maintain_order=True)
            .agg(*self._combine(), pl.col(_DIRTY).any())
            .select(*group, (pl.col(_WS) + self.size).alias(_WE), pl.exclude(group))
        )
        return state.collect(), distinct, fsums

    def _fold_session(self, df: pl.DataFrame) -> _Folded:
        """New open sessions and side tables with on-time records folded in (nothing is
        changed: the caller commits): sort old sessions and new [t, t + gap) intervals
        by start per key; a new session begins where the start is at or after every earlier end
        (sessions that a record bridges merge)."""
        dist = self._distinct_aggs()
        floats = self._float_columns(df)
        recs = df.select(
            *self.keys,
            pl.col(_T).alias(_WS),
            (pl.col(_T) + self.gap).alias(_WE),
            *self._record_partials(floats),
            pl.lit(True).alias(_DIRTY),
            *(pl.col(a.column).alias(f"{a.name}{_V}") for a in dist if a.column),
            *(pl.col(col).cast(pl.Float64).alias(f"{_F}:{col}") for col in floats),
        )
        n_old = 0 if self.state is None else self.state.height
        both = recs if self.state is None else pl.concat([self.state, recs], how="diagonal_relaxed")
        both = both.with_row_index(_I)
        prev_end = pl.col(_WE).cum_max().shift(1)
        if self.keys:
            prev_end = prev_end.over(self.keys)
        starts = prev_end.is_null() | (pl.col(_WS) >= prev_end)
        both = (
            both.sort([*self.keys, _WS, _I], nulls_last=True)
            .with_columns(starts.cast(pl.Int64).cum_sum().alias(_SID))
            .sort(_I)
        )
        merged = both.group_by(_SID, maintain_order=True).agg(
            *(pl.col(k).first() for k in self.keys),
            pl.col(_WS).min(),
            pl.col(_WE).max(),
            *self._combine(),
            pl.col(_DIRTY).any(),
        )
        distinct = dict(self.distinct)
        fsums = dict(self.fsums)
        if dist or self.fsums or floats:
            # side tables follow their sessions: old (key, start) -> session id -> new start
            new_start = merged.select(_SID, _WS)
            old_ids = both.filter(pl.col(_I) < n_old).select(*self.keys, _WS, _SID)
            new_rows = both.filter(pl.col(_I) >= n_old)

            def relabel(side: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
                return side.join(old_ids, on=[*self.keys, _WS], nulls_equal=True).select(
                    *self.keys, _SID, *cols
                )

            for a in dist:
                parts: list[pl.DataFrame] = []
                old = self.distinct.get(a.name)
                if old is not None and old.height:
                    parts.append(relabel(old, [_V]))
                parts.append(new_rows.select(*self.keys, _SID, pl.col(f"{a.name}{_V}").alias(_V)))
                distinct[a.name] = (
                    pl.concat(parts, how="vertical_relaxed")
                    .drop_nulls(_V)
                    .join(new_start, on=_SID)
                    .select(*self.keys, _WS, _V)
                    .unique()
                )
            for col in {*self.fsums, *floats}:
                parts = []
                old = self.fsums.get(col)
                if old is not None and old.height:
                    parts.append(relabel(old, [_LIMB, *_DIGITS]))
                if col in floats:
                    parts.append(_limbs(new_rows, [*self.keys, _SID], f"{_F}:{col}"))
                relabeled = [
                    p.join(new_start, on=_SID).select(*self.keys, _WS, _LIMB, *_DIGITS)
                    for p in parts
                ]
                fsums[col] = _sum_limbs(relabeled)
        return merged.drop(_SID), distinct, fsums

    # ------------------------------------------------------------------------ emission

    def _finalize(self, rows: pl.DataFrame, side: pl.Expr | None, *, remove: bool) -> pl.DataFrame:
        """Output rows for windows ``rows`` (state rows). ``side`` selects the same windows'
        rows of the side tables (None: by a join on key and start); ``remove`` drops them."""
        group = [*self.keys, _WS]

        def pick(table: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame | None]:
            """(rows of these windows, the rest when removing)"""
            if side is not None:
                return table.filter(side), table.filter(~side) if remove else None
            keep = (
                table.join(rows.select(group), on=group, how="anti", nulls_equal=True)
                if remove
                else None
            )
            return table.join(rows.select(group), on=group, how="semi", nulls_equal=True), keep

        for col, limbs in list(self.fsums.items()):
            sel, rest = pick(limbs)
            if rest is not None:
                self.fsums[col] = rest
            if sel.height == 0:
                continue
            rows = rows.join(_limb_values(sel, group), on=group, how="left", nulls_equal=True)
            rows = rows.with_columns(
                pl.when(pl.col(_F).is_not_null())
                .then(pl.col(p).cast(pl.Float64).fill_null(0.0) + pl.col(_F))
                .otherwise(pl.col(p))
                .alias(p)
                for p in self._float_partials.get(col, [])
            ).drop(_F)
        for a in self.aggs:
            if a.fn == "count_distinct":
                vals = self.distinct.get(a.name)
                if vals is None or vals.height == 0:
                    rows = rows.with_columns(pl.lit(0, pl.Int64).alias(a.name))
                    continue
                sel, rest = pick(vals)
                if rest is not None:
                    self.distinct[a.name] = rest
                counts = sel.group_by(group).agg(pl.len().cast(pl.Int64).alias(a.name))
                rows = rows.join(counts, on=group, how="left", nulls_equal=True).with_columns(
                    pl.col(a.name).fill_null(0)
                )
            elif a.fn == "mean":
                n = pl.col(f"{a.name}__n")
                rows = rows.with_columns(
                    pl.when(n > 0).then(pl.col(f"{a.name}__sum") / n).alias(a.name)
                )
        # window starts are never null; without null keys the nulls_last sort (a slower one)
        # gives the same order
        nulls = any(rows.get_column(k).null_count() for k in self.keys)
        return rows.sort([_WS, *self.keys], nulls_last=nulls).select(
            *self.keys,
            pl.col(_WS).cast(pl.Datetime("us", "UTC")),
            pl.col(_WE).cast(pl.Datetime("us", "UTC")),
            *(a.name for a in self.aggs),
        )

    def _take_closed(self, upto: int | None, *, everything: bool = False) -> pl.DataFrame | None:
        """Remove and return the windows the watermark ``upto`` has closed (all: everything)."""
        if self.state is None or self.state.height == 0:
            return None
        side: pl.Expr | None
        if everything:
            done_mask = side = pl.lit(True)
        elif upto is None:
            return None
        elif self.kind == "session":
            done_mask, side = pl.col(_WE) + self.gap <= upto, None  # side tables have no end
        else:
            done_mask = side = pl.col(_WS) + self.size <= upto
        done = self.state.filter(done_mask)
        if done.height == 0:
            return None
        self.state = self.state.filter(~done_mask)
        return self._finalize(done, side, remove=True)

    def _take_early(self, now: float) -> pl.DataFrame | None:
        """Partial results of open windows that changed since their last emission, if due."""
        if self.early is None:
            return None
        if self._last_early is not None and now - self._last_early < self.early:
            return None
        if self.state is None or self.state.height == 0:
            return None
        changed = self.state.filter(pl.col(_DIRTY))
        if changed.height == 0:
            return None
        self._last_early = now
        self.state = self.state.with_columns(pl.lit(False).alias(_DIRTY))
        return self._finalize(changed, None, remove=False)

    def _output(
        self, finals: pl.DataFrame | None, partials: pl.DataFrame | None
    ) -> pl.DataFrame | None:
        if self.early is None:
            return finals
        parts = [
            f.with_columns(pl.lit(flag).alias(_FINAL))
            for f, flag in ((finals, True), (partials, False))
            if f is not None
        ]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else pl.concat(parts, how="diagonal_relaxed")

    def _advance(self, now: float) -> pl.DataFrame | None:
        """Move the watermark for ``now``, emit closed windows and due early updates."""
        cand = self._combined(now)
        if cand is not None and (self._wm is None or cand > self._wm):
            self._wm = cand
        finals = self._take_closed(self._wm)
        return self._output(finals, self._take_early(now))

    # ------------------------------------------------------------------------ step

    def _check(self, df: pl.DataFrame) -> None:
        cols = [self.config.window.time, *self.keys, *(a.column for a in self.aggs if a.column)]
        check_columns(self.step_id, cols, df.columns, "window")
        for a in self.aggs:
            if a.fn in ("sum", "mean") and a.column:
                dtype = df.schema[a.column]
                if not dtype.is_numeric() and dtype != pl.Null:
                    raise StepError(
                        self.step_id,
                        f"aggregate {a.name}: {a.fn}({a.column}) needs numbers, but column "
                        f"{a.column!r} is {dtype}",
                        fix=f"cast it first, e.g. a step with cast: {{{a.column}: float}}",
                    )

    def process(self, table: Frame) -> StepResult:
        now = self.clock()
        df = to_polars(table)
        if df.height == 0:
            return StepResult(self._advance(now))
        self._check(df)  # before any state changes: a failing batch leaves the state as it was
        partitioned = self.per_partition and SOURCE_COL in df.columns
        part = (
            pl.col(SOURCE_COL).cast(pl.Int64).fill_null(-1) if partitioned else pl.lit(-1, pl.Int64)
        )
        df = df.with_columns(self._event_time(df).alias(_T), part.alias(_P))
        ids: list[int] = df[_P].unique().to_list() if partitioned else [-1]
        names = self._partition_names(ids)
        dead = empty_dead_letters()
        if df.get_column(_T).null_count():
            bad_time = df.filter(pl.col(_T).is_null())
            dead = rows_dead_letters(
                bad_time.drop(_T, _P),
                step_id=self.step_id,
                reason="cast_error",
                message=f"event time {self.config.window.time!r} is missing or cannot be read",
            )
            df = df.filter(pl.col(_T).is_not_null())
        late_mask = self._late_mask(df, ids, names, now)
        # partitions' progress counts every record with a time, late ones too (with several
        # partitions a late record can still be its own partition's newest)
        newest: list[tuple[int, int]]
        if len(ids) == 1:
            t_max = df.get_column(_T).max()
            newest = [] if t_max is None else [(ids[0], int(t_max))]  # type: ignore[arg-type]
        else:
            newest = list(df.group_by(_P).agg(pl.col(_T).max()).iter_rows())
        if late_mask is not None and late_mask.any():
            late = df.filter(late_mask)
            dead = concat(
                [
                    dead,
                    rows_dead_letters(
                        late.drop(_T, _P),
                        step_id=self.step_id,
                        reason="late",
                        message=f"event time is behind the watermark (allowed lateness "
                        f"{format_duration(self.config.window.lateness)}): its window already "
                        "closed",
                    ),
                ]
            )
            df = df.filter(~late_mask)
        if df.height:
            fold = self._fold_session if self.kind == "session" else self._fold_fixed
            self.state, self.distinct, self.fsums = fold(df)  # computed first, then committed
        for pid, newest_t in newest:
            name = names[pid]
            old = self.part_max.get(name)
            self.part_max[name] = newest_t if old is None else max(old, newest_t)
        for pid in ids:
            self.part_seen[names[pid]] = now
        emitted = self._advance(now)
        assert isinstance(dead, pa.Table)
        return StepResult(emitted, dead=dead, aggregated=df.height)

    def _late_mask(
        self, df: pl.DataFrame, ids: list[int], names: dict[int, str], now: float
    ) -> pl.Series | None:
        """Per record: is the end of its earliest window at or before its watermark? (None:
        no record is)"""
        if df.height == 0 or (len(ids) == 1 and self._in_order(df, names[ids[0]])):
            return None
        return df.select(self._late_expr(ids, names, now)).get_column(_LATE)

    def _in_order(self, df: pl.DataFrame, name: str) -> bool:
        """True when the batch (records with a time, of the one partition ``name``) can hold no
        late record because its times never decrease and start at or after the partition's
        newest time: then each record's watermark is at most ``max(W, t - lateness)`` with
        ``t`` its own time or an earlier one, below the end of any window holding ``t``, so
        only ``W`` could make a record late, and the first record has the earliest end. (The
        first record of a new partition is checked against the other partitions alone: that
        case is left to the full check.)"""
        t = df.get_column(_T)
        if not t.is_sorted():
            return False
        first = t[0]
        newest = self.part_max.get(name)
        if newest is None:
            if self.part_max:
                return False
        elif first < newest:
            return False
        if self.kind == "session":
            end = first + self.gap
        else:
            end = (first // self.slide) * self.slide + self.slide
        return self._wm is None or end > self._wm

    def _late_expr(self, ids: list[int], names: dict[int, str], now: float) -> pl.Expr:
        """The expression of :meth:`_late_mask` (column ``_LATE``), for partitions ``ids``."""
        batch_names = {names[i] for i in ids}
        active = self._active(now) | (batch_names & set(self.part_max))
        ranked = sorted((self.part_max[n], n) for n in active)
        m0: list[int | None] = []
        others: list[int | None] = []
        for pid in ids:
            name = names[pid]
            m0.append(self.part_max.get(name))
            rest = [m for m, n in ranked[:2] if n != name]
            others.append(rest[0] if rest else None)
        if len(ids) == 1:  # one partition in the batch: plain values, a running max overall
            own = pl.max_horizontal(pl.lit(m0[0], pl.Int64), pl.col(_T).cum_max().shift(1))
            bound = pl.min_horizontal(pl.lit(others[0], pl.Int64), own)
        else:
            own = pl.max_horizontal(
                pl.col(_P).replace_strict(ids, m0, default=None, return_dtype=pl.Int64),
                pl.col(_T).cum_max().shift(1).over(_P),
            )
            bound = pl.min_horizontal(
                pl.col(_P).replace_strict(ids, others, default=None, return_dtype=pl.Int64), own
            )
        wm = pl.max_horizontal(pl.lit(self._wm, pl.Int64), bound - self.lateness)
        return (self._threshold() <= wm).fill_null(False).alias(_LATE)

    def tick(self) -> StepResult | None:
        """Without input: re-evaluate idle partitions, emit windows the watermark closed and
        early updates that are due. Rows returned are created by this call (nothing came in)."""
        out = self._advance(self.clock())
        return StepResult(out) if out is not None else None

    def finish(self) -> StepResult | None:
        out = self._output(self._take_closed(None, everything=True), None)
        return StepResult(out) if out is not None else None

    # ------------------------------------------------------------------------ checkpoints

    def _fingerprint(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "size": self.size,
                "slide": self.slide,
                "gap": self.gap,
                "time_unit": self.config.window.time_unit,
                "keys": self.keys,
                "aggregate": [[a.name, a.fn, a.column] for a in self.aggs],
            },
            sort_keys=True,
        )

    def snapshot(self) -> dict[str, pa.Table]:
        """The complete state as Arrow tables: ``meta`` (version, configuration fingerprint,
        watermark), ``partitions`` (partition name, newest event time), ``windows`` (open
        windows' partial aggregates) and ``distinct:<aggregate>`` (count_distinct value sets)."""
        names = sorted(self.part_max)
        out: dict[str, pa.Table] = {
            "meta": pa.table(
                {
                    "version": pa.array([STATE_VERSION], pa.int32()),
                    "config": pa.array([self._fingerprint()], pa.string()),
                    "watermark": pa.array([self._wm], pa.int64()),
                }
            ),
            "partitions": pa.table(
                {
                    "partition": pa.array(names, pa.string()),
                    "max_time": pa.array([self.part_max[n] for n in names], pa.int64()),
                }
            ),
        }
        if self.state is not None:
            out["windows"] = self.state.to_arrow()
        for name, vals in self.distinct.items():
            out[f"distinct:{name}"] = vals.to_arrow()
        for col, limbs in self.fsums.items():
            out[f"fsum:{col}"] = limbs.to_arrow()
        return out

    def restore(self, state: dict[str, pa.Table]) -> None:
        """Load a :meth:`snapshot` (after ``open``, before the first ``process``). Restored
        partitions count as heard of now, so ``idle_timeout`` starts afresh."""
        meta = state.get("meta")
        if meta is None or meta.num_rows != 1:
            raise StepError(self.step_id, "the saved window state has no meta table")
        row: dict[str, Any] = meta.to_pylist()[0]
        if row.get("version") != STATE_VERSION or row.get("config") != self._fingerprint():
            raise ConfigError(
                "the checkpoint holds window state for a different window configuration "
                "(kind, size, slide, gap, time_unit, key or aggregates changed)",
                step_id=self.step_id,
                field="window",
                fix="restore with the configuration the checkpoint was made with, or start "
                "from a new checkpoint path",
            )
        now = self.clock()
        self._wm = row.get("watermark")
        parts = state.get("partitions")
        self.part_max = {}
        self.part_seen = {}
        if parts is not None:
            for name, newest in zip(
                parts.column("partition").to_pylist(),
                parts.column("max_time").to_pylist(),
                strict=True,
            ):
                self.part_max[name] = newest
                self.part_seen[name] = now
        windows = state.get("windows")
        self.state = _frame(windows) if windows is not None else None
        self.distinct = {
            key.removeprefix("distinct:"): _frame(tab)
            for key, tab in state.items()
            if key.startswith("distinct:")
        }
        self.fsums = {
            key.removeprefix("fsum:"): _frame(tab)
            for key, tab in state.items()
            if key.startswith("fsum:")
        }
        self._last_early = None


_MASK32 = (1 << 32) - 1
_NAN, _POS_INF, _NEG_INF = -1, -2, -3  # special blocks: counts (in digit 0) of NaN, +inf, -inf


def _limbs(frame: pl.DataFrame, group: list[str], value: str) -> pl.DataFrame:
    """The float values of column ``value``, summed exactly per ``group``.

    A finite float64 is ``m * 2**(p - 1074)`` with integers ``0 <= m < 2**53`` and
    ``0 <= p < 2046``. With ``j = p // 32``, ``m << (p % 32)`` is split into three base-2**32
    digits, so the value is ``(d0 + d1 * 2**32 + d2 * 2**64) * 2**(32 * j - 1074)``. Rows of
    ``(group, j)`` hold the sums of the digits: exact integer arithmetic (up to 2**31 values per
    row), so the total does not depend on the order in which values are added. NaN and
    infinities are counted in special blocks. Vectorized with NumPy and one group-by.
    """
    sub = frame.select(*group, pl.col(value).cast(pl.Float64).alias(_F)).drop_nulls(_F)
    x = np.ascontiguousarray(sub[_F].to_numpy(), dtype=np.float64)
    bits = x.view(np.int64)
    exp = (bits >> 52) & 0x7FF
    frac = bits & ((1 << 52) - 1)
    sign = np.where(bits < 0, -1, 1).astype(np.int64)
    finite = exp != 0x7FF
    m = np.where(finite, np.where(exp == 0, frac, frac | (1 << 52)), 0)
    p = np.where(exp == 0, 0, exp - 1)
    r = p % 32
    full = m >> (32 - r)
    block = np.where(
        finite, p // 32, np.where(frac != 0, _NAN, np.where(sign > 0, _POS_INF, _NEG_INF))
    )
    digits = (
        np.where(finite, ((m & (np.left_shift(np.int64(1), 32 - r) - 1)) << r) * sign, 1),
        (full & _MASK32) * sign,
        (full >> 32) * sign,
    )
    rows = sub.select(group).with_columns(
        pl.Series(_LIMB, block, pl.Int32),
        *(pl.Series(name, d, pl.Int64) for name, d in zip(_DIGITS, digits, strict=True)),
    )
    return _sum_limbs([rows])


def _sum_limbs(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Add block tables (same group columns): one row per (group, block); all-zero rows go."""
    both = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical_relaxed")
    group = [c for c in both.columns if c not in (_LIMB, *_DIGITS)]
    return (
        both.group_by([*group, _LIMB])
        .agg(pl.col(d).sum() for d in _DIGITS)
        .filter(pl.any_horizontal(pl.col(d) != 0 for d in _DIGITS))
    )


def _limb_values(limbs: pl.DataFrame, group: list[str]) -> pl.DataFrame:
    """Float value (column ``_F``) per window of ``limbs``. A block's digits, then a window's
    blocks (in block order) are added in a fixed order, so equal blocks give the same float."""
    block = limbs[_LIMB].to_numpy().astype(np.int64)
    d0, d1, d2 = (limbs[d].to_numpy().astype(np.int64) for d in _DIGITS)
    finite = block >= 0
    scale = np.where(finite, 32 * block - 1074, 0)
    with np.errstate(over="ignore", invalid="ignore"):  # a sum beyond float range is +-inf
        value = (
            np.ldexp(d2.astype(np.float64), scale + 64)
            + np.ldexp(d1.astype(np.float64), scale + 32)
            + np.ldexp(d0.astype(np.float64), scale)
        )
    value = np.where(finite, value, 0.0)
    # blocks in a fixed order: sorted by block, and a group-by keeps row order within a group
    frame = limbs.select(*group, _LIMB, _DIGITS[0]).with_columns(pl.Series(_F, value, pl.Float64))
    frame = frame.sort(_LIMB, maintain_order=True)
    if finite.all():
        return frame.group_by(group).agg(pl.col(_F).sum())
    n = pl.col(_DIGITS[0])
    summed = frame.group_by(group).agg(
        pl.col(_F).sum(),
        n.filter(pl.col(_LIMB) == _NAN).sum().alias("nan"),
        n.filter(pl.col(_LIMB) == _POS_INF).sum().alias("pos"),
        n.filter(pl.col(_LIMB) == _NEG_INF).sum().alias("neg"),
    )
    nan, pos, neg = pl.col("nan") > 0, pl.col("pos") > 0, pl.col("neg") > 0
    return summed.select(
        *group,
        pl.when(nan | (pos & neg))
        .then(float("nan"))
        .when(pos)
        .then(float("inf"))
        .when(neg)
        .then(float("-inf"))
        .otherwise(pl.col(_F))
        .alias(_F),
    )


def _frame(table: pa.Table) -> pl.DataFrame:
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    return df


__all__ = ["Window"]
