"""Column steps: select, rename, cast (uncastable values become dead letters)."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from sluice.batch import (
    POSITION_COLS,
    Frame,
    as_arrow,
    column_names,
    empty_dead_letters,
    rows_dead_letters,
)
from sluice.config.models import CastStep, RenameStep, SelectStep
from sluice.errors import StepError
from sluice.plugins import StepResult
from sluice.steps._base import BaseStep, check_columns, to_polars
from sluice.types import parse_type


class Select(BaseStep):
    """Keep the listed columns in the listed order (position columns always ride along)."""

    config: SelectStep

    def process(self, table: Frame) -> StepResult:
        names = column_names(table)
        check_columns(self.step_id, self.config.select, names, "select")
        keep = list(self.config.select) + [c for c in POSITION_COLS if c in names]
        return StepResult(table.select(keep))


class Rename(BaseStep):
    """Rename columns: ``{old: new}``."""

    config: RenameStep

    def process(self, table: Frame) -> StepResult:
        mapping = self.config.rename
        old = column_names(table)
        check_columns(self.step_id, mapping, old, "rename")
        names = [mapping.get(n, n) for n in old]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise StepError(
                self.step_id,
                f"rename would create duplicate column(s) {dup}",
                fix="rename to names that are not already used",
            )
        return StepResult(as_arrow(table).rename_columns(names))


def polars_dtype(arrow_type: pa.DataType) -> pl.DataType:
    s = pl.from_arrow(pa.array([], type=arrow_type))
    assert isinstance(s, pl.Series)
    return s.dtype


_TRUE = ["true", "t", "yes", "y", "1"]
_FALSE = ["false", "f", "no", "n", "0"]


_DATETIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
)
_DATE_FORMATS = ("%Y-%m-%d",)


def temporal_expr(col: str, dst: pl.DataType, fmt: str | None) -> pl.Expr:
    c = pl.col(col).str.strip_chars()
    if dst == pl.Date:
        return c.str.to_date(fmt, strict=False)
    assert isinstance(dst, pl.Datetime)
    return c.str.to_datetime(fmt, strict=False, time_unit="us", time_zone=dst.time_zone)


def guess_format(values: pl.Series, dst: pl.DataType) -> str | None:
    """A strftime format that parses every value of a sample (parsing with a known format is
    several times faster than letting Polars infer one per batch); None if none fits."""
    sample = values.drop_nulls().head(1000).str.strip_chars()
    sample = sample.filter(sample != "")
    if sample.is_empty():
        return None
    frame = sample.to_frame("v")
    for fmt in _DATE_FORMATS if dst == pl.Date else _DATETIME_FORMATS:
        parsed = frame.select(temporal_expr("v", dst, fmt)).to_series()
        if parsed.null_count() == 0:
            return fmt
    return None


def cast_expr(col: str, src: pl.DataType, dst: pl.DataType, fmt: str | None = None) -> pl.Expr:
    """A non-strict cast: a value that does not convert becomes null (and is detected after)."""
    c = pl.col(col)
    if src == pl.String:
        if dst == pl.Boolean:
            low = c.str.strip_chars().str.to_lowercase()
            return (
                pl.when(low.is_in(_TRUE))
                .then(True)
                .when(low.is_in(_FALSE))
                .then(False)
                .otherwise(None)
            )
        if dst == pl.Date or isinstance(dst, pl.Datetime):
            return temporal_expr(col, dst, fmt)
        if dst.is_numeric():
            return c.str.strip_chars().cast(dst, strict=False)
    return c.cast(dst, strict=False)


class Cast(BaseStep):
    """Cast columns to types; a row with any value that cannot be cast is a dead letter.

    Vectorized: each column is cast non-strictly, and a value that was non-null before and null
    after marks its row. Empty or blank strings become null (a missing value, not an error).
    The dead letter lists every failing column of the row with its value.

    Strings to dates/timestamps: the format is guessed once from the first batch; a value that
    does not match it gets a second chance with Polars' own format inference before it counts
    as a failure (only batches with such values pay for that).
    """

    config: CastStep

    def __init__(self, config: CastStep) -> None:
        super().__init__(config)
        self.targets = {c: polars_dtype(parse_type(t)) for c, t in config.cast.items()}
        self.type_names = dict(config.cast)
        self.formats: dict[str, str | None] = {}

    def process(self, table: Frame) -> StepResult:
        df = to_polars(table)
        check_columns(self.step_id, self.targets, df.columns, "cast")
        casts: dict[str, pl.Expr] = {}
        flags: dict[str, pl.Expr] = {}
        for col, dst in self.targets.items():
            src = df.schema[col]
            if src == dst:
                continue
            fmt = None
            if src == pl.String and (dst == pl.Date or isinstance(dst, pl.Datetime)):
                if col not in self.formats:
                    self.formats[col] = guess_format(df[col], dst)
                fmt = self.formats[col]
            new = cast_expr(col, src, dst, fmt)
            present = pl.col(col).is_not_null()
            if src == pl.String:  # an empty or blank string is a missing value, not an error
                present = present & (pl.col(col).str.strip_chars() != "")
            casts[col] = new
            flags[col] = present & pl.col(f"{col}__cast").is_null()
        if not casts:
            return StepResult(table)
        # the cast values (suffixed), then a failure flag per column computed from them
        marked = df.with_columns(*(e.alias(f"{c}__cast") for c, e in casts.items()))
        marked = marked.with_columns(*(e.alias(f"{c}__bad") for c, e in flags.items()))
        bad_cols = [f"{c}__bad" for c in flags]
        any_bad = pl.any_horizontal(bad_cols)
        retry = [c for c in casts if self.formats.get(c) and marked[f"{c}__bad"].any()]
        if retry:  # values in another format than the guessed one: let Polars infer theirs
            marked = marked.with_columns(
                pl.when(pl.col(f"{c}__bad"))
                .then(temporal_expr(c, self.targets[c], None))
                .otherwise(pl.col(f"{c}__cast"))
                .alias(f"{c}__cast")
                for c in retry
            ).with_columns(flags[c].alias(f"{c}__bad") for c in retry)
        helper_cols = [f"{c}__cast" for c in casts] + bad_cols
        dead = empty_dead_letters()
        if marked.select(any_bad.any()).item():
            bad_rows = marked.filter(any_bad)
            # messages are built for the failing rows only
            messages = bad_rows.select(
                pl.concat_str(
                    [
                        pl.when(pl.col(f"{c}__bad")).then(
                            pl.format(
                                "column '{}': value {} cannot be cast to {}",
                                pl.lit(c),
                                pl.col(c).cast(pl.String).str.slice(0, 80),
                                pl.lit(self.type_names[c]),
                            )
                        )
                        for c in flags
                    ],
                    separator="; ",
                    ignore_nulls=True,
                )
            )
            dead = rows_dead_letters(
                bad_rows.drop(helper_cols),
                step_id=self.step_id,
                reason="cast_error",
                message=messages.to_series().to_arrow(),
            )
            marked = marked.filter(~any_bad)
        out = marked.with_columns(*(pl.col(f"{c}__cast").alias(c) for c in casts)).drop(helper_cols)
        return StepResult(out, dead=dead)
