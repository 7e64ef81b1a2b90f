"""The columns each step sees, known before any data is read: ``sluice validate`` uses them to
find misspelt column names.

Where the columns come from:

* a file source: the first matching file's header (CSV), schema (Parquet) — read cheaply, a few
  bytes — plus the declared ``schema``; a declared column that is not in the file is an error
  with the closest name of the file (``' barks'`` vs ``barks``);
* a stream source, or a file that is not there yet: the declared ``schema`` only. Such a set is
  *partial*: a name outside it is reported only when it is a near miss of a declared name (a
  typo), since other fields may arrive;
* each step: what it keeps, renames, adds or computes (SQL statements are bound by DuckDB on an
  empty table with the known columns).

A step whose output cannot be known (SQL over partial input) hands an unknown set on, and the
checks after it are skipped rather than guessed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.errors import ConfigError


@dataclass(frozen=True)
class Known:
    """Column names known to reach a step; ``complete`` when no other column can arrive;
    ``types`` for the columns whose Arrow type is known (declared, or from a Parquet file)."""

    names: tuple[str, ...]
    complete: bool
    types: tuple[tuple[str, Any], ...] = ()

    def type_of(self, name: str) -> Any:
        return dict(self.types).get(name)

    def missing(self, wanted: Iterable[str]) -> list[tuple[str, str | None]]:
        """``(name, closest known name)`` for each wanted name that cannot be there."""
        out = []
        for name in wanted:
            if name in self.names:
                continue
            close = difflib.get_close_matches(name, self.names, n=1, cutoff=0.6)
            if self.complete or close:
                out.append((name, close[0] if close else None))
        return out


#: Probes a source config for its columns: ``None`` when they cannot be known cheaply.
SourceProbe = Callable[[Any, Path], "Known | None"]


def column_errors(
    cfg: Any, base_dir: Path, *, probe: SourceProbe | None = None
) -> list[ConfigError]:
    """Every column name the pipeline uses that cannot be in its input, with a "did you mean"."""
    errors: list[ConfigError] = []
    known: dict[str, Known | None] = {}
    source = cfg.source
    try:
        known[source.id] = (probe or probe_source)(source, base_dir)
    except ConfigError as exc:
        errors.append(exc)
        known[source.id] = None
    previous = source.id
    for step in cfg.steps:
        ins = [known.get(i) for i in step.inputs(previous)]
        inp = _merge(ins)
        try:
            known[step.id] = _step_output(step, inp, errors, base_dir)
        except ConfigError as exc:  # a step whose columns cannot be worked out: skip after it
            errors.append(exc)
            known[step.id] = None
        previous = step.id
    for sink in cfg.sinks:
        inp = _merge([known.get(i) for i in sink.inputs(previous)])
        key = getattr(sink, "key", None) or []
        wanted = [*getattr(sink, "partition_by", []), *([key] if isinstance(key, str) else key)]
        _check(errors, inp, wanted, sink.id, "partition_by/key", role="sink")
    return errors


def _merge(ins: list[Known | None]) -> Known | None:
    if not ins or any(k is None for k in ins):
        return None
    if len(ins) == 1:
        return ins[0]
    names: dict[str, None] = {}
    for k in ins:
        assert k is not None
        names.update(dict.fromkeys(k.names))
    return Known(tuple(names), all(k.complete for k in ins if k is not None))


def _check(
    errors: list[ConfigError],
    known: Known | None,
    wanted: Iterable[str],
    step_id: str,
    field: str,
    *,
    role: str = "step",
) -> None:
    if known is None:
        return
    for name, close in known.missing(wanted):
        hint = f"did you mean '{close}'?" if close else f"use one of: {', '.join(known.names)}"
        errors.append(
            ConfigError(
                f"column {name!r} is not in the input"
                + ("" if known.complete else " (nor close to any declared column)"),
                step_id=step_id,
                field=field,
                value=name,
                fix=hint,
                role=role,
            )
        )


def _step_output(step: Any, inp: Known | None, errors: list[ConfigError], base: Path) -> Any:
    fields = type(step).model_fields
    if "select" in fields:
        _check(errors, inp, step.select, step.id, "select")
        types = tuple(t for t in inp.types if t[0] in step.select) if inp else ()
        return Known(tuple(step.select), True, types)
    if "rename" in fields:
        _check(errors, inp, step.rename, step.id, "rename")
        if inp is None:
            return None
        new = step.rename
        return Known(
            tuple(new.get(n, n) for n in inp.names),
            inp.complete,
            tuple((new.get(n, n), t) for n, t in inp.types),
        )
    if "cast" in fields:
        _check(errors, inp, step.cast, step.id, "cast")
        if inp is None:
            return None
        cast = {n: _arrow_type(t) for n, t in step.cast.items()}
        kept = tuple((n, t) for n, t in inp.types if n not in cast)
        return Known(inp.names, inp.complete, kept + tuple(cast.items()))
    if "deduplicate" in fields:
        _check(errors, inp, step.deduplicate.key, step.id, "deduplicate.key")
        return inp
    if ("filter" in fields or "derive" in fields or "sql" in fields) and _typed(inp, step):
        if "sql" in fields:
            return _bound(step, inp)
        if "filter" in fields:
            try:
                _bound(step, inp)
            except ConfigError as exc:
                errors.append(exc)
            return inp
        current: Known | None = inp  # derive: one expression at a time, each mistake reported
        for name, text in step.derive.items():
            if current is None or not _typed(current, step):
                break
            before = current
            try:
                current = _bound(step.model_copy(update={"derive": {name: text}}), before)
            except ConfigError as exc:
                errors.append(exc)
                names = tuple(dict.fromkeys([*before.names, name]))
                current = Known(names, True, tuple(t for t in before.types if t[0] != name))
        return current
    if "filter" in fields:
        _sql_columns(f"SELECT * FROM input WHERE {step.filter}", inp, step.id, "filter", errors)
        return inp
    if "derive" in fields:
        current = inp
        for name, text in step.derive.items():
            sql = f"SELECT *, {text} AS __derived FROM input"
            out = _sql_columns(sql, current, step.id, f"derive.{name}", errors)
            if current is None:
                continue
            typ = out.type_of("__derived") if out is not None else None
            names = tuple(dict.fromkeys([*current.names, name]))
            types = tuple((n, t) for n, t in current.types if n != name)
            current = Known(names, current.complete, types + (((name, typ),) if typ else ()))
        return current
    if "sql" in fields:
        return _sql_columns(step.sql, inp, step.id, "sql", errors)
    if "join" in fields:
        ref = probe_source(step.join.reference, base)
        _check(errors, inp, step.join.key, step.id, "join.key")
        _check(errors, ref, step.join.key, step.id, "join.reference")
        if inp is None or ref is None:
            return None
        joined = dict.fromkeys(inp.names)
        joined.update(dict.fromkeys(n for n in ref.names if n not in step.join.key))
        extra = tuple(t for t in ref.types if t[0] not in step.join.key)
        return Known(tuple(joined), inp.complete and ref.complete, inp.types + extra)
    if "window" in fields:
        w = step.window
        used = [w.time, *w.keys()]
        for text in step.aggregate.values():
            inner = text[text.find("(") + 1 : text.rfind(")")].strip() if "(" in text else ""
            if inner:
                used.append(inner)
        _check(errors, inp, used, step.id, "window")
        produced = [*w.keys(), "window_start", "window_end", *step.aggregate]
        if w.early is not None:
            produced.append("is_final")
        return Known(tuple(produced), True)
    if "contract" in fields:
        return inp  # a contract reports its own missing columns (presence checks)
    return None


def _typed(inp: Known | None, step: Any) -> bool:
    """True when every input column's type is known (and a sql step declares no reference
    tables): the step's own binder then gives its exact output."""
    if inp is None or not inp.complete or getattr(step, "tables", None):
        return False
    typed = dict(inp.types)
    return all(typed.get(n) is not None for n in inp.names)


def _bound(step: Any, inp: Known | None) -> Known | None:
    """Output of a filter/derive/sql step from the step's own binder (``ConfigError`` with a
    'did you mean' for a column that is not there)."""
    import pyarrow as pa

    from sluice.steps.sqlengine import output_schema

    assert inp is not None
    out = output_schema(step, pa.schema([(n, inp.type_of(n)) for n in inp.names]))
    if out is None:
        return None
    return Known(tuple(out.names), True, tuple((f.name, f.type) for f in out))


def _sql_columns(
    sql: str, inp: Known | None, step_id: str, field: str, errors: list[ConfigError]
) -> Known | None:
    """The output columns of ``sql`` over ``input`` with the known columns; a column the
    statement names that cannot be in the input is reported.

    With a complete set DuckDB binds the statement on an empty table (unknown types as text); when
    binding fails for a reason other than a missing column (a type the plan does not know), and
    for a partial set, the column references of DuckDB's parse tree are checked instead."""
    if inp is None:
        return None
    import duckdb
    import pyarrow as pa

    from sluice.steps.sqlengine import binder, column_refs

    with binder() as con:
        if inp.complete:
            empty = pa.schema([pa.field(n, inp.type_of(n) or pa.string()) for n in inp.names])
            con.register("input", empty.empty_table())
            try:
                out = con.sql(sql).limit(0).to_arrow_table().schema
            except duckdb.BinderException as exc:
                from sluice.steps.sqlengine import missing_column_hint

                text = str(exc)
                hint = missing_column_hint(text, list(inp.names))
                if hint is not None or ("not found" in text and "column" in text.lower()):
                    errors.append(
                        ConfigError(
                            hint or text.splitlines()[0].removeprefix("Binder Error: "),
                            step_id=step_id,
                            field=field,
                            fix="use one of the input columns",
                        )
                    )
                    return None
            except duckdb.Error:
                return None  # a syntax error is the step's own check
            else:
                return Known(tuple(out.names), True, tuple((f.name, f.type) for f in out))
        refs = column_refs(sql)
        if refs is not None:
            _check(errors, inp, sorted(refs), step_id, field)
        return None


def probe_source(source: Any, base_dir: Path) -> Known | None:
    """The columns of a source, from its first file's header/schema and its declared schema."""
    declared_types = dict((getattr(source, "columns", None) or {}).items())
    declared = list(declared_types)
    kind = getattr(source, "kind", "")
    path = getattr(source, "path", None)
    found: list[str] | None = None
    if path is not None and kind in ("csv", "parquet"):
        files = _glob(path, base_dir)
        if files:
            found = _file_columns(source, files[0])
    types = tuple((n, _arrow_type(t)) for n, t in declared_types.items())
    if found is None:
        return Known(tuple(declared), False, types) if declared else None
    missing = [(n, difflib.get_close_matches(n, found, n=1)) for n in declared if n not in found]
    if missing:
        name, close = missing[0]
        raise ConfigError(
            f"the declared schema names column {name!r}, which the file does not have",
            step_id=source.id,
            role="source",
            field=f"schema.{name}",
            value=name,
            fix=(f"did you mean '{close[0]}'?" if close else f"the file has: {', '.join(found)}"),
        )
    if kind == "parquet" and path is not None:
        files = _glob(path, base_dir)
        import pyarrow.parquet as pq

        with_types = {f.name: f.type for f in pq.read_schema(files[0])}
        types = tuple((n, with_types[n]) for n in found if n in with_types) + types
    return Known(tuple(found), True, types)


def _arrow_type(name: str) -> Any:
    from sluice.types import parse_type

    return parse_type(name)


def _glob(pattern: str, base_dir: Path) -> list[Path]:
    import glob

    p = Path(pattern).expanduser()
    p = p if p.is_absolute() else base_dir / p
    return sorted(Path(x) for x in glob.glob(str(p), recursive=True) if Path(x).is_file())


def _file_columns(source: Any, path: Path) -> list[str] | None:
    """The column names of one file, read from its header / metadata only."""
    try:
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            names = list(pq.read_schema(path).names)
            select = getattr(source, "select", None)
            return [n for n in names if n in select] if select else names
        from sluice.plugins import lookup

        reader = lookup("source", "csv")(source)
        columns = getattr(reader, "columns", None)
        if columns is None:
            return None
        result: list[str] | None = columns(path)
        return result
    except Exception:  # a file the probe cannot read is the run's business (dead letters)
        return None
