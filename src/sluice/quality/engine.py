"""Contract checks compiled to Polars expressions and evaluated per batch, no loop per row.

:class:`ContractChecker` keeps the run-wide state a contract needs (seen keys for ``unique``,
reference keys, counters for dataset rules), so the same contract gives the same counts whether
the data comes as one batch or as many. :func:`evaluate` checks one table in one call.

Every check looks at values in the field's declared type, and one definition of a *missing*
value (null, NaN, or text that is empty or blank) serves every check, so that the same data gives
the same verdict from CSV (text), JSON and Parquet (typed).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from sluice.batch import HIDDEN_COLS, REDACTED, as_arrow, empty_dead_letters, rows_dead_letters
from sluice.errors import StepError
from sluice.plugins import RunContext
from sluice.quality.contract import (
    Action,
    Completeness,
    Contract,
    FieldSpec,
    Freshness,
    RowCheck,
    RowCount,
    SqlRule,
    parse_percent,
)
from sluice.quality.sqlrules import RuleError, SqlRules, bind_rules
from sluice.state.keys import SeenKeys
from sluice.steps.columns import cast_expr, guess_format, polars_dtype
from sluice.time.durations import parse_duration
from sluice.types import parse_type

_SEVERITY = {"fail": 3, "dead_letter": 2, "drop": 1, "warn": 0}
_EXTRA = "schema.extra_columns"


class ContractFailure(StepError):
    """A check with action ``fail`` (or a failed gate) stopped the run. ``dead`` holds the dead
    letters found in the same batch, which the executor writes before it stops."""

    def __init__(
        self, step_id: str, message: str, *, dead: pa.Table | None = None, fix: str | None = None
    ) -> None:
        super().__init__(step_id, message, fix=fix)
        self.dead = dead


@dataclass
class CheckResult:
    name: str  # "<field>.<check>", "schema.extra_columns" or the dataset rule
    action: str
    checked: int = 0
    failed: int = 0
    samples: list[Any] = field(default_factory=list)
    detail: str | None = None
    # `unique` only: how many distinct values occur more than once (Soda's duplicate_count)
    duplicated_values: int | None = None

    def to_dict(self) -> dict[str, Any]:
        rate = self.failed / self.checked if self.checked else 0.0
        out = {
            "check": self.name,
            "action": self.action,
            "checked": self.checked,
            "failed": self.failed,
            "passed": self.checked - self.failed,
            "failure_rate": round(rate, 6),
            "samples": self.samples,
            "detail": self.detail,
        }
        if self.duplicated_values is not None:
            out["duplicated_values"] = self.duplicated_values
        return out


def regex_problem(pattern: str) -> str | None:
    """Why the engine that runs ``pattern`` checks (Polars, Rust regex syntax) cannot compile
    it, or None."""
    try:
        pl.select(pl.lit("x").str.contains(pattern))
    except Exception as exc:
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        said = [x.removeprefix("error: ") for x in lines if x.startswith("error:")]
        return (said[-1] if said else lines[0] if lines else type(exc).__name__)[:160]
    return None


def present(df: pl.DataFrame, name: str) -> pl.Expr:
    """True where the value is there: not null, not NaN, not empty or blank text. The one
    definition of a missing value, used by every check (``required`` fails on a missing value;
    the other row checks, ``unique`` included, skip it; ``completeness`` counts it)."""
    c = pl.col(name)
    dtype = df.schema[name]
    e = c.is_not_null()
    if dtype == pl.String:
        e = e & (c.str.strip_chars() != "")
    elif dtype.is_float():
        e = e & ~c.is_nan()
    return e.fill_null(False)


@dataclass
class _RowCheck:
    name: str
    field: FieldSpec
    check: str
    action: Action
    violated: pl.Expr  # True where the row fails, evaluated on the frame after type casts
    describe: pl.Expr  # text for the dead-letter message (no values for PII fields)


@dataclass
class BatchOutcome:
    table: pl.DataFrame
    dead: pa.Table
    dropped: int


class ContractChecker:
    """Compile once, then :meth:`check` each batch and :meth:`finish` at the end of input.

    With ``report_only`` nothing stops the run: a check with action ``fail`` routes its rows
    like ``dead_letter``, and a failed schema check (a missing column, an extra column under
    ``freeze``) is counted and reported instead of raised (``sluice check``, :func:`evaluate`).
    The reported action stays the contract's."""

    def __init__(
        self, contract: Contract, *, step_id: str = "contract", report_only: bool = False
    ) -> None:
        self.contract = contract
        self.step_id = step_id
        self.report_only = report_only
        self.policy = contract.schema_policy
        self.fields = {f.name: f for f in contract.fields}
        self.targets = {f.name: polars_dtype(parse_type(f.type)) for f in contract.fields if f.type}
        self.formats: dict[str, str | None] = {}
        # `unique`: the values seen so far, and the values seen more than once
        self.seen: dict[str, SeenKeys] = {f.name: SeenKeys() for f in contract.fields if f.unique}
        self.repeated: dict[str, SeenKeys] = {name: SeenKeys() for name in self.seen}
        self.refs: dict[str, pl.Series] = {}
        self.results: dict[str, CheckResult] = {}
        self.rows = 0
        #: the data columns of the input so far, in order of first appearance (the dataset's
        #: columns are those of all its batches: a field is present when any batch has it)
        self.columns: dict[str, None] = {}
        self.batches = 0
        self._untyped_missing: list[str] = []
        self.non_null: dict[str, int] = {}
        self.newest: dict[str, Any] = {}
        bind_rules(contract, step_id)  # ConfigError before any data is read
        self.sql = SqlRules(contract, step_id)
        if self.policy.extra_columns == "fail":
            self.results[_EXTRA] = CheckResult(_EXTRA, "fail")
        for f in contract.fields:
            if self.policy.missing_columns == "fail":
                self.results[f"{f.name}.present"] = CheckResult(f"{f.name}.present", "fail")
            for check in self._checks_of(f):
                name = f"{f.name}.{check}"
                self.results[name] = CheckResult(name, f.action_for(check))  # type: ignore[arg-type]
            if f.unique:
                self.results[f"{f.name}.unique"].duplicated_values = 0
        self._validate_patterns()

    # ------------------------------------------------------------------------------ setup

    @staticmethod
    def _checks_of(f: FieldSpec) -> list[str]:
        out = []
        if f.type:
            out.append("type")
        if f.required:
            out.append("required")
        for c in ("min", "max", "pattern", "enum", "min_length", "max_length"):
            if getattr(f, c) is not None:
                out.append(c)
        if f.unique:
            out.append("unique")
        if f.references:
            out.append("references")
        return out

    def _validate_patterns(self) -> None:
        for f in self.contract.fields:
            problem = regex_problem(f.pattern) if f.pattern is not None else None
            if problem:
                raise ContractFailure(
                    self.step_id,
                    f"field '{f.name}': pattern {f.pattern!r} is not supported by "
                    f"the regex engine: {problem}",
                    fix="use a pattern without look-around or back-references",
                )

    def open(self, ctx: RunContext | None) -> None:
        """Load reference datasets (once per run)."""
        self.sql.open(ctx.run_id if ctx else "check")
        for f in self.contract.fields:
            ref = f.references
            if ref is None:
                continue
            if ref.path is not None:
                path = ctx.resolve(ref.path) if ctx else ref.path
                kind = ref.kind or str(path).rsplit(".", 1)[-1]
                readers: dict[str, Callable[[Any], pl.DataFrame]] = {
                    "csv": pl.read_csv,
                    "parquet": pl.read_parquet,
                    "json": pl.read_json,
                    "jsonl": pl.read_ndjson,
                }
                reader = readers.get(kind)
                if reader is None:
                    raise ContractFailure(
                        self.step_id,
                        f"field '{f.name}': cannot read reference {path} (kind {kind!r})",
                        fix="set references.kind",
                    )
                try:
                    keys = reader(path)[ref.column]
                except Exception as exc:
                    raise ContractFailure(
                        self.step_id, f"field '{f.name}': reading reference {path} failed: {exc}"
                    ) from exc
            else:
                keys = _db_keys(self.step_id, f.name, ref.dsn or "", ref.table or "", ref.column)
            self.refs[f.name] = keys.drop_nulls().unique()

    # ------------------------------------------------------------------------------ per batch

    def _schema(self, df: pl.DataFrame) -> pl.DataFrame:
        """The schema of one batch: its columns join the dataset's (:attr:`columns`); the
        columns the contract does not name are passed, discarded or refused (``freeze``: one
        batch that has one is enough, whatever the other batches hold); the fields the batch
        lacks are columns of nulls of the field's type, as a record without the key is read
        (JSON, or files of different columns read together). Whether a field's column is
        *present* is decided over the whole input, at :meth:`finish`."""
        c = self.contract
        data_cols = [x for x in df.columns if x not in HIDDEN_COLS]
        self.batches += 1
        self.columns.update(dict.fromkeys(data_cols))
        unknown = [x for x in data_cols if x not in self.fields]
        missing = [f for f in c.fields if f.name not in df.columns]
        # dictionary-encoded text (Parquet, Arrow) is checked as the text it holds
        categorical = [
            x
            for x in df.columns
            if x in self.fields and isinstance(df.schema[x], (pl.Categorical, pl.Enum))
        ]
        if categorical:
            df = df.with_columns(pl.col(x).cast(pl.String) for x in categorical)
        self._schema_results()
        if unknown and self.policy.extra_columns == "fail" and not self.report_only:
            raise ContractFailure(
                self.step_id,
                f"contract '{c.name}' version {c.version} is frozen and the input has "
                f"columns it does not name: {unknown}",
                fix="add them to the contract, drop them upstream, or set "
                "schema_policy: evolve / discard_columns",
            )
        if unknown and self.policy.extra_columns == "discard":
            df = df.drop(unknown)
        if missing:
            df = df.with_columns(
                pl.lit(None, dtype=self.targets.get(f.name, pl.String)).alias(f.name)
                for f in missing
            )
        #: fields without a type this batch had no column for: of no type for SQL rules
        self._untyped_missing = [f.name for f in missing if f.name not in self.targets]
        return df

    def _unknown(self) -> list[str]:
        """The columns of the input so far that the contract does not name."""
        return sorted(x for x in self.columns if x not in self.fields)

    def _absent(self) -> list[FieldSpec]:
        """The fields no batch so far had a column for (none before the first batch)."""
        if not self.batches:
            return []
        return [f for f in self.contract.fields if f.name not in self.columns]

    def _schema_results(self) -> None:
        """The schema checks over the input so far: a field absent from every batch fails
        ``present`` on every row; a column the contract does not name fails
        ``schema.extra_columns`` (``freeze``) on every row. The counts are the same however the
        input was cut."""
        n = self.rows
        if self.policy.missing_columns == "fail":
            absent = {f.name for f in self._absent()}
            for f in self.contract.fields:
                res = self.results[f"{f.name}.present"]
                res.checked = n
                res.failed = n if f.name in absent else 0
                res.detail = "the input has no such column" if f.name in absent else None
        if self.policy.extra_columns == "fail":
            unknown = self._unknown()
            res = self.results[_EXTRA]
            res.checked = n
            res.failed = n if unknown else 0
            res.samples = list(unknown[: max(self.contract.samples, 1)])

    @property
    def schema_notes(self) -> list[str]:
        """What the schema policy did, over the input so far."""
        notes = []
        unknown = self._unknown()
        if unknown and self.policy.extra_columns != "fail":
            passed = self.policy.extra_columns == "pass"
            verb = "new columns passed through" if passed else "unknown columns discarded"
            notes.append(f"{verb}: {', '.join(unknown)}")
        absent = self._absent()
        if absent and self.policy.missing_columns == "fill_nulls":
            notes.append("missing columns read as nulls: " + ", ".join(f.name for f in absent))
        return notes

    def _cast(self, df: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, pl.Expr]]:
        """Cast to the contract's types; return the frame and a 'type failed' flag per field."""
        casts: dict[str, pl.Expr] = {}
        flags: dict[str, pl.Expr] = {}
        for name, dst in self.targets.items():
            src = df.schema[name]
            if src == dst:
                continue
            fmt = None
            if src == pl.String and (dst == pl.Date or isinstance(dst, pl.Datetime)):
                if name not in self.formats:
                    self.formats[name] = guess_format(df[name], dst)
                fmt = self.formats[name]
            casts[name] = cast_expr(name, src, dst, fmt).alias(name)
            present = pl.col(f"__orig_{name}").is_not_null()
            if src == pl.String:
                present = present & (pl.col(f"__orig_{name}").str.strip_chars() != "")
            flags[name] = present & pl.col(name).is_null()
        if not casts:
            return df, {}
        df = df.with_columns(pl.col(n).alias(f"__orig_{n}") for n in casts).with_columns(
            casts.values()
        )
        return df, flags

    def _row_checks(self, df: pl.DataFrame, type_flags: dict[str, pl.Expr]) -> list[_RowCheck]:
        checks: list[_RowCheck] = []
        for f in self.contract.fields:
            c = pl.col(f.name)
            there = present(df, f.name)
            shown = pl.lit(REDACTED) if f.pii else c.cast(pl.String).str.slice(0, 80)
            orig = pl.col(f"__orig_{f.name}") if f.name in type_flags else c
            orig_shown = pl.lit(REDACTED) if f.pii else orig.cast(pl.String).str.slice(0, 80)

            def add(
                check: RowCheck, violated: pl.Expr, describe: pl.Expr, f: FieldSpec = f
            ) -> None:
                checks.append(
                    _RowCheck(
                        f"{f.name}.{check}",
                        f,
                        check,
                        f.action_for(check),
                        violated.fill_null(False),
                        describe,
                    )
                )

            if f.type and f.name in type_flags:
                add(
                    "type",
                    type_flags[f.name],
                    pl.format("{}: {} is not a {}", pl.lit(f.name), orig_shown, pl.lit(f.type)),
                )
            elif f.type:
                add("type", pl.lit(False), pl.lit(""))
            if f.required:
                add(
                    "required",
                    ~there & ~(type_flags.get(f.name, pl.lit(False))),
                    pl.lit(f"{f.name}: required value missing"),
                )
            if f.min is not None:
                lo = self._bound(df, f.name, f.min)
                add(
                    "min",
                    there & (c < lo),
                    pl.format("{}: {} < {}", pl.lit(f.name), shown, pl.lit(str(f.min))),
                )
            if f.max is not None:
                hi = self._bound(df, f.name, f.max)
                add(
                    "max",
                    there & (c > hi),
                    pl.format("{}: {} > {}", pl.lit(f.name), shown, pl.lit(str(f.max))),
                )
            if f.pattern is not None:
                add(
                    "pattern",
                    there & ~c.cast(pl.String).str.contains(f"^(?:{f.pattern})$"),
                    pl.format("{}: {} does not match {}", pl.lit(f.name), shown, pl.lit(f.pattern)),
                )
            if f.enum is not None:
                allowed = pl.Series(f.enum).cast(df.schema[f.name], strict=False)
                add(
                    "enum",
                    there & ~c.is_in(allowed.implode()),
                    pl.format(
                        "{}: {} is not one of {}",
                        pl.lit(f.name),
                        shown,
                        pl.lit(", ".join(map(str, f.enum))[:200]),
                    ),
                )
            if f.min_length is not None:
                add(
                    "min_length",
                    there & (c.cast(pl.String).str.len_chars() < f.min_length),
                    pl.format(
                        "{}: {} is shorter than {}", pl.lit(f.name), shown, pl.lit(f.min_length)
                    ),
                )
            if f.max_length is not None:
                add(
                    "max_length",
                    there & (c.cast(pl.String).str.len_chars() > f.max_length),
                    pl.format(
                        "{}: {} is longer than {}", pl.lit(f.name), shown, pl.lit(f.max_length)
                    ),
                )
            if f.unique:
                add(
                    "unique",
                    pl.col(f"__dup_{f.name}"),
                    pl.format("{}: {} was seen before", pl.lit(f.name), shown),
                )
            if f.references is not None and f.name in self.refs:
                keys = self.refs[f.name].cast(df.schema[f.name], strict=False)
                add(
                    "references",
                    there & ~c.is_in(keys.implode()),
                    pl.format(
                        "{}: {} is not in {}",
                        pl.lit(f.name),
                        shown,
                        pl.lit(f.references.path or f.references.table or ""),
                    ),
                )
        return checks

    @staticmethod
    def _bound(df: pl.DataFrame, name: str, value: float | str) -> pl.Expr:
        dtype = df.schema[name]
        if isinstance(value, str) and (dtype == pl.Date or isinstance(dtype, pl.Datetime)):
            parsed = dt.datetime.fromisoformat(value)
            if dtype == pl.Date:
                return pl.lit(parsed.date())
            assert isinstance(dtype, pl.Datetime)
            if dtype.time_zone is None and parsed.tzinfo is not None:
                parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
            elif dtype.time_zone is not None:
                from zoneinfo import ZoneInfo

                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=dt.UTC)
                parsed = parsed.astimezone(ZoneInfo(dtype.time_zone))
            return pl.lit(parsed, dtype=dtype)
        return pl.lit(value)

    def _unique_flags(self, df: pl.DataFrame) -> pl.DataFrame:
        """``__dup_<field>``: the value already occurred in an earlier row of the input (this
        batch or an earlier one), whatever the other checks said about either row. Missing
        values and values that failed the type check are not compared. Exact (values, not
        hashes), bounded memory (see :class:`SeenKeys`); the values found repeated go to a
        second store, whose size is the number of distinct duplicated values."""
        cols = []
        for name, seen in self.seen.items():
            dup = np.zeros(df.height, dtype=bool)
            idx = np.flatnonzero(df.select(present(df, name)).to_series().to_numpy())
            if idx.size:
                keys = df[name].gather(idx)
                again = ~keys.is_first_distinct().to_numpy() | seen.seen_before(keys.to_list())
                dup[idx] = again
                if again.any():
                    repeated = self.repeated[name]
                    repeated.seen_before(keys.filter(pl.Series(again)).unique().to_list())
                    self.results[f"{name}.unique"].duplicated_values = repeated.count
            cols.append(pl.Series(f"__dup_{name}", dup))
        return df.with_columns(cols) if cols else df

    def check(self, frame: pl.DataFrame | pa.Table) -> BatchOutcome:
        df = frame if isinstance(frame, pl.DataFrame) else pl.from_arrow(frame)
        assert isinstance(df, pl.DataFrame)
        self.rows += df.height
        df = self._schema(df)
        df, type_flags = self._cast(df)
        checks = self._row_checks(df, type_flags)
        n = df.height
        self._dataset_counters(df)
        if not checks or n == 0:
            return BatchOutcome(self._clean(df), empty_dead_letters(), 0)
        df = self._unique_flags(df)
        vcols = [f"__v{i}" for i in range(len(checks))]
        df = df.with_columns(ck.violated.alias(v) for ck, v in zip(checks, vcols, strict=True))
        counts = df.select(pl.col(v).sum() for v in vcols).row(0)
        for ck, v, failed in zip(checks, vcols, counts, strict=True):
            res = self.results[ck.name]
            res.checked += n
            res.failed += int(failed)
            if failed and len(res.samples) < self.contract.samples:
                src = (
                    f"__orig_{ck.field.name}"
                    if ck.check == "type" and f"__orig_{ck.field.name}" in df.columns
                    else ck.field.name
                )
                vals = (
                    df.filter(pl.col(v))
                    .get_column(src)
                    .head(self.contract.samples - len(res.samples))
                )
                res.samples += [REDACTED if ck.field.pii else _plain(x) for x in vals.to_list()]
            if ck.check == "unique" and res.duplicated_values:
                res.detail = f"{res.duplicated_values:,} distinct value(s) repeated"
        by_action: dict[str, list[str]] = {"fail": [], "dead_letter": [], "drop": [], "warn": []}
        for ck, v in zip(checks, vcols, strict=True):
            action = "dead_letter" if self.report_only and ck.action == "fail" else ck.action
            by_action[action].append(v)

        def any_of(cols: list[str]) -> pl.Expr:
            return pl.any_horizontal(cols) if cols else pl.lit(False)

        df = df.with_columns(
            any_of(by_action["fail"]).alias("__fail"),
            any_of(by_action["dead_letter"]).alias("__dead"),
            any_of(by_action["drop"]).alias("__drop"),
        )
        dead = empty_dead_letters()
        dead_mask = pl.col("__dead") | pl.col("__fail")
        bad = df.filter(dead_mask)
        if bad.height:
            messages = bad.select(
                pl.concat_str(
                    [
                        pl.when(pl.col(v)).then(ck.describe)
                        for ck, v in zip(checks, vcols, strict=True)
                    ],
                    separator="; ",
                    ignore_nulls=True,
                )
            ).to_series()
            payload_frame = self._masked(self._clean(bad, original=True))
            dead = rows_dead_letters(
                payload_frame,
                step_id=self.step_id,
                reason="contract_violation",
                message=messages.to_arrow(),
            )
        if df["__fail"].any():
            failing = [
                ck.name
                for ck, v in zip(checks, vcols, strict=True)
                if ck.action == "fail" and df[v].any()
            ]
            raise ContractFailure(
                self.step_id,
                f"contract '{self.contract.name}': check(s) with action 'fail' failed: "
                f"{', '.join(failing)}",
                dead=dead,
                fix="fix the data, or change the check's action to dead_letter / drop / warn",
            )
        keep = df.filter(~dead_mask & ~pl.col("__drop"))
        dropped = int(df.select((pl.col("__drop") & ~dead_mask).sum()).item())
        return BatchOutcome(self._clean(keep), dead, dropped)

    def _clean(self, df: pl.DataFrame, *, original: bool = False) -> pl.DataFrame:
        """Drop helper columns; with ``original`` put back the values as they came in."""
        if original:
            df = df.with_columns(
                pl.col(c).alias(c.removeprefix("__orig_"))
                for c in df.columns
                if c.startswith("__orig_")
            )
        return df.drop(
            [
                c
                for c in df.columns
                if c.startswith(("__orig_", "__dup_", "__v")) or c in ("__fail", "__dead", "__drop")
            ]
        )

    def _masked(self, df: pl.DataFrame) -> pl.DataFrame:
        pii = [n for n in self.contract.pii if n in df.columns]
        return df.with_columns(pl.lit(REDACTED).alias(n) for n in pii) if pii else df

    # ------------------------------------------------------------------------------ dataset rules

    def _dataset_counters(self, df: pl.DataFrame) -> None:
        counted = list(
            dict.fromkeys(
                col
                for rule in self.contract.quality
                if isinstance(rule, Completeness)
                for col in rule.columns or list(self.fields)
                if col in df.columns
            )
        )
        if counted:  # the values that are there, every column in one pass
            there = df.select(present(df, col).sum().alias(col) for col in counted).row(0)
            for col, n in zip(counted, there, strict=True):
                self.non_null[col] = self.non_null.get(col, 0) + int(n)
        for rule in self.contract.quality:
            if isinstance(rule, Freshness) and rule.column in df.columns and df.height:
                newest = df[rule.column].max()
                if newest is not None and (
                    rule.column not in self.newest or newest > self.newest[rule.column]
                ):
                    self.newest[rule.column] = newest
        if self.sql.rules:
            try:
                self.sql.add(self._clean(df), untyped=self._untyped_missing)
            except RuleError as exc:
                raise self._rule_failure(exc) from exc

    def _rule_failure(self, exc: RuleError) -> ContractFailure:
        return ContractFailure(
            self.step_id, str(exc), fix="the query must return one number over the input"
        )

    def finish(self, now: dt.datetime | None = None) -> list[CheckResult]:
        """Decide the schema checks over the whole input (a field no batch had fails its
        ``present`` check: raised unless ``report_only``), evaluate the dataset rules and return
        their results (the caller decides what fails)."""
        self._schema_results()
        absent = self._absent()
        if absent and self.policy.missing_columns == "fail" and not self.report_only:
            c = self.contract
            raise ContractFailure(
                self.step_id,
                f"contract '{c.name}' version {c.version} declares field(s) "
                f"{[f.name for f in absent]} that the input does not have (input "
                f"columns: {', '.join(self.columns)})",
                fix="add the column(s) upstream, use the contract version the data was made "
                "for, or set schema_policy: {missing_columns: fill_nulls} to read them as "
                "nulls",
            )
        try:
            answers = self.sql.finish()
        except RuleError as exc:
            raise self._rule_failure(exc) from exc
        out = []
        now = now or dt.datetime.now(dt.UTC)
        for i, rule in enumerate(self.contract.quality):
            if isinstance(rule, Completeness):
                need = parse_percent(rule.completeness)
                for col in rule.columns or list(self.fields):
                    share = self.non_null.get(col, 0) / self.rows if self.rows else 1.0
                    out.append(
                        CheckResult(
                            f"completeness({col}) >= {need:.2%}",
                            rule.action,
                            self.rows,
                            int(self.rows - self.non_null.get(col, 0)) if share < need else 0,
                            detail=f"{share:.2%} non-null",
                        )
                    )
            elif isinstance(rule, Freshness):
                limit = parse_duration(rule.freshness)
                newest = self.newest.get(rule.column)
                age = _age_seconds(newest, now)
                ok = age is not None and age <= limit
                out.append(
                    CheckResult(
                        f"freshness({rule.column}) <= {rule.freshness}",
                        rule.action,
                        1,
                        0 if ok else 1,
                        detail=f"newest {newest} ("
                        + ("no data" if age is None else f"{age:,.0f} s old")
                        + ")",
                    )
                )
            elif isinstance(rule, RowCount):
                b = rule.row_count
                ok = (b.min is None or self.rows >= b.min) and (b.max is None or self.rows <= b.max)
                out.append(
                    CheckResult(
                        f"row_count in [{b.min}, {b.max}]",
                        rule.action,
                        1,
                        0 if ok else 1,
                        detail=f"{self.rows:,} rows",
                    )
                )
            elif isinstance(rule, SqlRule):
                total = answers.get(i, 0.0)
                ok = (rule.must_be is None or total == rule.must_be) and (
                    rule.max is None or total <= rule.max
                )
                out.append(
                    CheckResult(
                        rule.name or f"sql: {rule.sql[:60]}",
                        rule.action,
                        1,
                        0 if ok else 1,
                        detail=f"value {_number_text(total)}",
                    )
                )
        return out

    def close(self) -> None:
        for store in [*self.seen.values(), *self.repeated.values()]:
            store.close()
        self.sql.close()


def _number_text(x: float) -> str:
    """A rule's answer as text: whole numbers in full (a count of 30,000,600 rows is not
    '3.00006e+07'), others as ``%g``."""
    return str(int(x)) if x.is_integer() and abs(x) < 1e18 else f"{x:g}"


def _plain(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def _age_seconds(newest: Any, now: dt.datetime) -> float | None:
    if newest is None:
        return None
    if isinstance(newest, dt.datetime):
        ts = newest if newest.tzinfo else newest.replace(tzinfo=dt.UTC)
        return (now - ts).total_seconds()
    if isinstance(newest, dt.date):
        start = dt.datetime(newest.year, newest.month, newest.day, tzinfo=dt.UTC)
        return (now - start).total_seconds()
    if isinstance(newest, (int, float)):  # epoch seconds or milliseconds
        secs = newest / 1000 if newest > 1e11 else newest
        return now.timestamp() - secs
    return None


def _db_keys(step_id: str, field_name: str, dsn: str, table: str, column: str) -> pl.Series:
    from sluice.errors import require

    require("psycopg", "postgres", "a PostgreSQL reference")
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                sql.SQL("SELECT DISTINCT {} FROM {}").format(
                    sql.Identifier(column), sql.Identifier(*table.split("."))
                )
            ).fetchall()
    except psycopg.Error as exc:
        raise ContractFailure(
            step_id, f"field '{field_name}': reading reference table {table} failed: {exc}"
        ) from exc
    return pl.Series(column, [r[0] for r in rows])


def evaluate(
    contract: Contract, table: pa.Table | pl.DataFrame, ctx: RunContext | None = None
) -> dict[str, int]:
    """Check one table against a contract; return the failures per check (row checks, schema
    checks and dataset rules), e.g. ``{"order_id.present": 0, "order_id.required": 0,
    "row_count in [1, None]": 0}``. Nothing is raised for a failed check, whatever its action
    (see ``report_only`` of :class:`ContractChecker`)."""
    checker = ContractChecker(contract, report_only=True)
    checker.open(ctx)
    try:
        checker.check(table if isinstance(table, pl.DataFrame) else as_arrow(table))
        gates = checker.finish()
        out = {name: r.failed for name, r in checker.results.items()}
        out.update({r.name: r.failed for r in gates})
        return out
    finally:
        checker.close()


__all__ = [
    "BatchOutcome",
    "CheckResult",
    "ContractChecker",
    "ContractFailure",
    "evaluate",
    "present",
    "regex_problem",
]
