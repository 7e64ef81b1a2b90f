"""The columns each step sees, known before any data is read: ``sluice validate`` uses them to
find misspelt column names.

Where the columns come from:

* a file source: the first matching file's header (CSV), schema (Parquet) — read cheaply, a few
  bytes — plus the declared ``schema``; a declared column that is not in the file is an error
  with the closest name of the file (``' barks'`` vs ``barks``);
* a stream source, or a file that is not there yet: the declared ``schema`` only. Such a set is
  *partial*: a name outside it is reported only when it is a near miss of a declared name (a
  typo), since other fields may arrive;
* each step: what it keeps, renames, adds or computes. ``filter``, ``derive`` and ``sql`` steps
  are bound by the SQL engine itself (:func:`sluice.steps.sqlengine.output_schema`, the binder
  the steps use at run time) on empty tables of the known columns — a sql step's reference
  ``tables`` probed like the source; a column whose type is not known binds as type NULL, and
  then only an unknown column is reported (a type problem may come from the guess). A window
  step's aggregates are read by the window step's own parser.

A step whose output cannot be known (SQL over partial input) hands an unknown set on, and the
checks after it are skipped rather than guessed. :func:`column_plan` also returns what each
node's output is known to be; :func:`input_schema` turns a step's input into an Arrow schema
when every column's type is known (``build_components`` hands it to steps that use it).
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


@dataclass
class ColumnPlan:
    """What :func:`column_plan` finds: every mistake, and each node's known output."""

    errors: list[ConfigError]
    #: node id (source, step) -> the columns of its output (None: unknown)
    known: dict[str, Known | None]
    #: step id -> the columns of its input (None: unknown)
    inputs: dict[str, Known | None]


def column_errors(
    cfg: Any, base_dir: Path, *, probe: SourceProbe | None = None
) -> list[ConfigError]:
    """Every column name the pipeline uses that cannot be in its input, with a "did you mean"."""
    return column_plan(cfg, base_dir, probe=probe).errors


def input_schema(known: Known | None) -> Any:
    """The Arrow schema of a step's input when every column and its type is known (else
    None)."""
    import pyarrow as pa

    if known is None or not known.complete:
        return None
    types = dict(known.types)
    if any(types.get(n) is None for n in known.names):
        return None
    return pa.schema([(n, types[n]) for n in known.names])


def column_plan(cfg: Any, base_dir: Path, *, probe: SourceProbe | None = None) -> ColumnPlan:
    """The columns each node of the pipeline produces, and every column name it uses that
    cannot be in its input (with a "did you mean")."""
    errors: list[ConfigError] = []
    inputs: dict[str, Known | None] = {}
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
        inp = inputs[step.id] = _merge(ins)
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
    return ColumnPlan(errors, known, inputs)


def _merge(ins: list[Known | None]) -> Known | None:
    if not ins or any(k is None for k in ins):
        return None
    if len(ins) == 1:
        return ins[0]
    names: dict[str, None] = {}
    types: dict[str, Any] = {}
    for k in ins:
        assert k is not None
        names.update(dict.fromkeys(k.names))
        for n, t in k.types:
            types[n] = t if types.get(n, t) == t else None  # a column of two types: unknown
    return Known(
        tuple(names),
        all(k.complete for k in ins if k is not None),
        tuple((n, t) for n, t in types.items() if t is not None),
    )


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
    if "filter" in fields or "derive" in fields or "sql" in fields:
        return _bound(step, inp, errors, base)
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
        from sluice.steps.window import parse_aggregate

        w = step.window
        used = [w.time, *w.keys()]
        for name, text in step.aggregate.items():
            column = parse_aggregate(step.id, name, text).column
            if column is not None:
                used.append(column)
        _check(errors, inp, used, step.id, "window")
        produced = [*w.keys(), "window_start", "window_end", *step.aggregate]
        if w.early is not None:
            produced.append("is_final")
        return Known(tuple(produced), True)
    if "contract" in fields:
        return inp  # a contract reports its own missing columns (presence checks)
    return None


def _bound(step: Any, inp: Known | None, errors: list[ConfigError], base: Path) -> Known | None:
    """The output of a filter / derive / sql step, from the SQL engine's own binder over empty
    tables of the known columns (a sql step's reference tables probed like a source). Each
    mistake is added to ``errors``; None when the output cannot be known."""
    from sluice.config.models import DeriveStep, FilterStep
    from sluice.steps.sqlengine import output_schema

    tables = _probe_tables(step, errors, base)
    if inp is None or tables is None:
        return None
    if not inp.complete:
        _check_partial(step, inp, errors)
        return None
    if isinstance(step, DeriveStep):
        return _derive_output(step, inp, errors)
    untyped = [*_untyped(inp), *(f"{t}.{n}" for t, k in tables.items() for n in _untyped(k))]
    try:
        out = output_schema(
            step, _schema(inp), {t: _schema(k) for t, k in tables.items()}, untyped=untyped
        )
    except ConfigError as exc:
        errors.append(exc)
        out = None
    if isinstance(step, FilterStep):
        return inp
    return None if out is None else _known(out, trusted=not untyped)


def _derive_output(step: Any, inp: Known, errors: list[ConfigError]) -> Known:
    """A derive step's output, one expression at a time (each mistake reported)."""
    from sluice.steps.sqlengine import output_schema

    current = inp
    for name, text in step.derive.items():
        one = step.model_copy(update={"derive": {name: text}})
        untyped = _untyped(current)
        try:
            out = output_schema(one, _schema(current), untyped=untyped)
        except ConfigError as exc:
            errors.append(exc)
            out = None
        typ = out.field(name).type if out is not None and not untyped else None
        current = Known(
            tuple(dict.fromkeys([*current.names, name])),
            True,
            tuple(t for t in current.types if t[0] != name) + (((name, typ),) if typ else ()),
        )
    return current


def _probe_tables(step: Any, errors: list[ConfigError], base: Path) -> dict[str, Known] | None:
    """The columns of a sql step's reference ``tables`` (probed like a source: a declared
    schema key that the file lacks is reported); None when one cannot be known."""
    tables: dict[str, Known] = {}
    for name, src in (getattr(step, "tables", None) or {}).items():
        try:
            ref = probe_source(src.model_copy(update={"id": step.id}), base)
        except ConfigError as exc:
            exc.role, exc.field = "step", f"tables.{name}.{exc.field}"
            errors.append(exc)
            return None
        if ref is None or not ref.complete:
            return None  # its columns come with its data
        tables[name] = ref
    return tables


def _check_partial(step: Any, inp: Known, errors: list[ConfigError]) -> None:
    """Over a partial set of columns (other fields may arrive): report only the names that are
    near misses of known ones, from the parse of each expression / statement."""
    from sluice.steps.sqlengine import column_refs, parse_expression

    texts: list[tuple[str, Any]] = []
    if getattr(step, "filter", None):
        texts.append(("filter", parse_expression(step.filter)))
    for name, text in (getattr(step, "derive", None) or {}).items():
        texts.append((f"derive.{name}", parse_expression(text)))
    if getattr(step, "sql", None):
        texts.append(("sql", step.sql))
    for field, parsed in texts:
        refs = column_refs(parsed)
        if refs is not None:
            _check(errors, inp, sorted(refs), step.id, field)


def _untyped(known: Known) -> list[str]:
    return [n for n in known.names if known.type_of(n) is None]


def _schema(known: Known) -> Any:
    """The known columns as an Arrow schema, type NULL where the type is not known."""
    import pyarrow as pa

    return pa.schema([(n, known.type_of(n) or pa.null()) for n in known.names])


def _known(schema: Any, *, trusted: bool) -> Known:
    types = tuple((f.name, f.type) for f in schema) if trusted else ()
    return Known(tuple(schema.names), True, types)


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
