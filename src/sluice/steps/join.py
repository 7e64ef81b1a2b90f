"""Join each batch with a reference table read once from a file."""

from __future__ import annotations

import polars as pl

from sluice.batch import Frame, concat, empty_dead_letters, rows_dead_letters
from sluice.config.models import JoinStep
from sluice.errors import StepError
from sluice.plugins import RunContext, StepResult
from sluice.steps._base import BaseStep, check_columns, read_reference, to_polars


class Join(BaseStep):
    """Left or inner join with a reference file, held in memory.

    The reference holds one row per key (settled at open), so a join never multiplies rows and
    the per-step accounting ``in = out + dead + filtered`` holds: identical duplicate rows are
    kept once; rows that share a key but differ fail the step (``on_duplicate_keys: error``,
    the default; the message names a key and the counts) or are resolved by keeping the
    ``first`` or ``last`` of them in file order. Reference rows with a null in a key column
    never match (a null key equals nothing) and are left out. Rows of the reference file that
    cannot be read become dead letters of this step (reported with the first batch). With
    ``how: inner`` an input row without a match is filtered, or a dead letter with
    ``unmatched: dead_letter``.
    """

    config: JoinStep
    creates_rows = True  # unreadable reference rows come out as dead letters of this step

    def __init__(self, config: JoinStep) -> None:
        super().__init__(config)
        self.ref: pl.DataFrame | None = None
        self.pending_dead = empty_dead_letters()

    def open(self, ctx: RunContext) -> None:
        super().open(ctx)
        opts = self.config.join
        tables, dead = read_reference(self.step_id, opts.reference, ctx)
        tables = [t for t in tables if t.num_rows]
        if not tables:
            raise StepError(
                self.step_id,
                f"reference {opts.reference.path!r} has no rows",
                fix="point join.reference.path at a file with data",
            )
        ref = to_polars(concat(tables))
        check_columns(self.step_id, opts.key, ref.columns, "join.key (reference side)")
        self.ref = self._one_row_per_key(ref)
        if dead:
            self.pending_dead = concat(dead)

    def _one_row_per_key(self, ref: pl.DataFrame) -> pl.DataFrame:
        opts = self.config.join
        ref = ref.drop_nulls(subset=opts.key).unique(maintain_order=True)  # identical: once
        dup = ref.select(opts.key).is_duplicated()
        if not dup.any():
            return ref
        if opts.on_duplicate_keys != "error":
            return ref.unique(subset=opts.key, keep=opts.on_duplicate_keys, maintain_order=True)
        keys = ref.filter(dup).select(opts.key).unique(maintain_order=True)
        example = ", ".join(f"{k}={v!r}" for k, v in zip(opts.key, keys.row(0), strict=True))
        raise StepError(
            self.step_id,
            f"reference {opts.reference.path!r} has {keys.height} key(s) on "
            f"{', '.join(opts.key)} with differing rows ({int(dup.sum())} rows in all), "
            f"e.g. {example}; a join must not multiply rows",
            fix="set join.on_duplicate_keys to 'first' or 'last' to keep one row per key (in "
            "file order), or deduplicate the reference file",
        )

    def process(self, table: Frame) -> StepResult:
        assert self.ref is not None, "open() first"
        opts = self.config.join
        df = to_polars(table)
        check_columns(self.step_id, opts.key, df.columns, "join.key")
        ref = self.ref
        # match key dtypes (e.g. int keys read as strings on one side)
        casts = [pl.col(k).cast(df.schema[k]) for k in opts.key if ref.schema[k] != df.schema[k]]
        if casts:
            ref = ref.with_columns(casts)
        dead, self.pending_dead = self.pending_dead, empty_dead_letters()
        if opts.how == "left":
            out = df.join(ref, on=opts.key, how="left", maintain_order="left", suffix="_ref")
            return StepResult(out, dead=dead)
        matched = df.join(ref.select(opts.key), on=opts.key, how="semi")
        out = df.join(ref, on=opts.key, how="inner", maintain_order="left", suffix="_ref")
        missing = df.height - matched.height
        if opts.unmatched == "dead_letter" and missing:
            miss = df.join(ref.select(opts.key), on=opts.key, how="anti")
            dl = rows_dead_letters(
                miss,
                step_id=self.step_id,
                reason="join_unmatched",
                message=f"no row in the reference with this {', '.join(opts.key)}",
            )
            return StepResult(out, dead=concat([dead, dl]))
        return StepResult(out, dead=dead, filtered=missing)

    def finish(self) -> StepResult | None:
        if self.pending_dead.num_rows:  # no input row came: still report the reference's
            dead, self.pending_dead = self.pending_dead, empty_dead_letters()
            return StepResult(None, dead=dead)
        return None
