"""Build a pipeline's components from its config, and with that, validate it.

``sluice validate`` and every executor (batch, stream, replay, ``sluice check``, the Python API)
construct the source, the steps and the sinks through :func:`build_components`, so they cannot
disagree about what is a configuration mistake:

1. every component is **constructed, not opened** — constructors make the config-level checks
   (an expression's syntax and functions, a window's aggregates, an encoding name, a table
   name); a component whose checks need more than its constructor (a client library that
   validates its settings) implements :class:`ChecksConfig`. Nothing connects, and no data is
   read;
2. configuration a step refers to is loaded here, once: a contract file named by a ``contract``
   step is read and validated, and the step is given the loaded contract (so ``open`` uses
   exactly what was validated); a join's reference source is constructed (it is read at open);
3. the rules that involve more than one setting (:data:`PIPELINE_RULES`, e.g. a single-file sink
   in a stream) run;
4. the checks registered in :data:`PIPELINE_CHECKS` run on the built components, first of all
   the column plan (:func:`sluice.plan.column_plan`: a column a step names that its input
   cannot have);
5. each step that implements :class:`UsesInputSchema` is given its input's schema when the
   column plan knows every column and type of it before the run (declared source schema,
   Parquet metadata, then each step's output as its own binder computes it): e.g. a ``sql``
   statement over the whole input that gets no row at all still answers over an empty input
   of the right types.

Every :class:`~sluice.errors.ConfigError` is collected — each tagged with its node's role
(source, step, sink) — and raised together.

Mistakes that ``run`` still finds only at run time are listed, each with the reason, in
``tests/config/test_validate.py`` (a test fails when a new ``ConfigError`` site appears without
an entry there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sluice.config.models import (
    STEP_KEYS,
    STREAM_SOURCE_KINDS,
    ContractStep,
    FileSinkBase,
    JoinStep,
    PipelineConfig,
)
from sluice.errors import ConfigError, ConfigErrors
from sluice.plugins import RunContext, Sink, Source, Step, StreamSource, lookup


@runtime_checkable
class ChecksConfig(Protocol):
    """A component whose configuration checks need more than its constructor."""

    def check_config(self, ctx: RunContext) -> None:
        """Raise :class:`~sluice.errors.ConfigError` (or ``ConfigErrors``) for every mistake in
        the component's settings that can be found without connecting to anything or reading
        data — e.g. create a client library's configuration object to have it validate the
        options, then discard it. Called by :func:`build_components` after construction."""


@runtime_checkable
class UsesInputSchema(Protocol):
    """A step that wants the schema of its input before any data arrives."""

    def use_input_schema(self, schema: Any) -> None:
        """Called by :func:`build_components`, before ``open``, with the ``pyarrow.Schema``
        of the step's input (its user columns, exact types) when the column plan knows it.
        Not called when it is not known (types inferred from data, a partial stream schema);
        the step must then do without."""


@dataclass
class Components:
    """What :func:`build_components` returns: constructed, not opened."""

    source: Any  # a Source, or a StreamSource for a streaming config
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths of the config start here
    steps: list[tuple[Step, list[str]]] = field(default_factory=list)  # (step, input ids)
    sinks: list[tuple[Sink, list[str]]] = field(default_factory=list)  # (sink, input ids)
    last: str = ""  # id of the last step (or the source): the default input of sinks
    #: step id -> the columns of its input as the column plan knows them (filled by the plan)
    inputs: dict[str, Any] = field(default_factory=dict)


#: Rules over several settings: (config, stream mode?) -> problems, each naming node and field.
PipelineRule = Callable[[PipelineConfig, bool], Iterable[ConfigError]]
#: Checks over the built components: (config, components) -> problems.
PipelineCheck = Callable[[PipelineConfig, Components], Iterable[ConfigError]]


def _stream_file_outputs(cfg: PipelineConfig, stream: bool) -> Iterable[ConfigError]:
    """In a stream every file output is a folder: each checkpoint epoch adds part files
    (the rule :class:`sluice.runtime.epochs.FileEpochSink` enforces when it is built)."""
    if not stream:
        return
    for sink in cfg.sinks:
        if not isinstance(sink, FileSinkBase):
            continue
        ext = "." + str(getattr(sink, "kind"))  # noqa: B009 - every file sink has a kind
        if sink.path.lower().rstrip("/").endswith(ext):
            yield ConfigError(
                "in stream mode a file sink writes part files per checkpoint epoch into a folder",
                step_id=sink.id,
                field="path",
                value=sink.path,
                fix=f"give a directory, e.g. {sink.path[: -len(ext)]}/",
                role="sink",
            )
    dl = cfg.dead_letter
    if dl.path.lower().rstrip("/").endswith("." + dl.kind):
        yield ConfigError(
            "in stream mode the dead-letter output is a folder (part files per epoch)",
            step_id="dead_letter",
            field="path",
            value=dl.path,
            fix=f"give a directory, e.g. {dl.path[: -len(dl.kind) - 1]}/",
            role="sink",
        )


#: Rules checked by :func:`build_components`; add new cross-setting rules here.
PIPELINE_RULES: list[PipelineRule] = [_stream_file_outputs]
#: Checks run on the built components (``built.base_dir`` resolves the config's paths). A
#: schema-propagation pass (columns each step produces, from the declared source schema, so
#: that a misspelt column is found before data is read) registers here, e.g.
#: ``PIPELINE_CHECKS.append(lambda cfg, built: column_errors(cfg, built.base_dir))``.
def _columns(cfg: PipelineConfig, built: Components) -> list[ConfigError]:
    from sluice.plan import column_plan  # higher layer, imported when validation runs

    plan = column_plan(cfg, built.base_dir)
    built.inputs = plan.inputs
    return plan.errors


def _hand_input_schemas(built: Components) -> None:
    from sluice.plan import input_schema

    for step, _ in built.steps:
        if isinstance(step, UsesInputSchema):
            schema = input_schema(built.inputs.get(step.step_id))
            if schema is not None:
                step.use_input_schema(schema)


def _stream_contract_sql(cfg: PipelineConfig, built: Components) -> list[ConfigError]:
    """A stream never ends: a contract SQL rule that needs the whole input (anything but a count
    of rows, which is added up per batch) would spill without end and never answer."""
    if not cfg.streaming:
        return []
    from sluice.quality.sqlrules import plan_rules
    from sluice.quality.step import ContractCheck

    errors = []
    for step, _ in built.steps:
        contract = step.contract if isinstance(step, ContractCheck) else None
        if contract is None:
            continue
        for planned in plan_rules(contract):
            if not planned.counts_rows:
                errors.append(
                    ConfigError(
                        f"quality rule {planned.index} of contract '{contract.name}' needs the "
                        "whole input, which a stream never has",
                        step_id=step.step_id,
                        field=f"quality[{planned.index}].sql",
                        value=planned.rule.sql,
                        fix="in a stream, contract SQL rules must count rows (SELECT count(*) "
                        "FROM input WHERE ...); aggregate over event time with a window step",
                        role="step",
                    )
                )
    return errors


PIPELINE_CHECKS: list[PipelineCheck] = [_columns, _stream_contract_sql]


def step_kind(step_config: Any) -> str:
    """The step key (``filter``, ``window``...) of a step config."""
    return next(k for k in STEP_KEYS if k in type(step_config).model_fields)


def make_source(cfg: PipelineConfig, *, stream: bool | None = None) -> Any:
    """Construct the pipeline's source: a stream source in stream mode (default: when the
    config is streaming — a broker, or a watched folder), else a batch source."""
    src = cfg.source
    if not (cfg.streaming if stream is None else stream):
        return lookup("source", src.kind)(src)
    if getattr(src, "watch", False):
        from sluice.connectors.files.watch import FolderWatcher

        return FolderWatcher(src)
    made = lookup("source", src.kind)(src)
    if not isinstance(made, StreamSource):
        raise ConfigError(
            f"source kind {src.kind!r} is not a stream source",
            step_id=src.id,
            field="kind",
            fix=f"use kind {' or '.join(STREAM_SOURCE_KINDS)}, or watch: true on a file source",
            role="source",
        )
    return made


def build_components(
    cfg: PipelineConfig,
    *,
    base_dir: Path | None = None,
    stream: bool | None = None,
    source: Source | StreamSource | None = None,
    sinks: Mapping[str, Sink] | None = None,
) -> Components:
    """Construct (without opening) the source, steps and sinks of ``cfg`` and check everything
    that can be checked before data is read; see the module docstring.

    ``stream``: build for the stream executor (default: when ``cfg.streaming``, as ``sluice
    run`` chooses). ``source`` and ``sinks`` (by id) replace configured ones (the test kit uses
    them). Raises the one :class:`~sluice.errors.ConfigError` found, or
    :class:`~sluice.errors.ConfigErrors` for several."""
    stream = cfg.streaming if stream is None else stream
    ctx = RunContext(cfg.pipeline, "validate", (base_dir or Path.cwd()).resolve())
    errors: list[ConfigError] = []

    def attempt(
        role: str, node_id: str, make: Callable[..., Any], *args: Any, prefix: str = ""
    ) -> Any:
        try:
            made = make(*args)
            if isinstance(made, ChecksConfig):
                made.check_config(ctx)
            return made
        except ConfigError as exc:
            for e in exc.errors if isinstance(exc, ConfigErrors) else [exc]:
                e.role = e.role or role
                e.step_id = e.step_id or node_id
                if prefix:
                    e.field = f"{prefix}.{e.field}" if e.field else prefix
                errors.append(e)
        except ValueError as exc:  # a constructor's check that did not say ConfigError
            errors.append(ConfigError(str(exc), step_id=node_id, role=role, field=prefix or None))
        return None

    built = Components(
        base_dir=ctx.base_dir,
        source=source
        if source is not None
        else attempt("source", cfg.source.id, partial(make_source, cfg, stream=stream)),
    )
    previous = cfg.source.id
    for sc in cfg.steps:
        kind = step_kind(sc)
        resolved = _resolve_references(sc, ctx, attempt)
        step = attempt("step", sc.id, lookup("step", kind), resolved)
        if step is not None:
            built.steps.append((step, sc.inputs(previous)))
        previous = sc.id
    built.last = previous
    given = dict(sinks or {})
    for sk in cfg.sinks:
        sink = given.get(sk.id) or attempt("sink", sk.id, lookup("sink", sk.kind), sk)
        if sink is not None:
            built.sinks.append((sink, sk.inputs(previous)))
    for rule in PIPELINE_RULES:
        errors.extend(rule(cfg, stream))
    if not errors:
        for check in PIPELINE_CHECKS:
            errors.extend(check(cfg, built))
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    _hand_input_schemas(built)
    return built


def _resolve_references(sc: Any, ctx: RunContext, attempt: Callable[..., Any]) -> Any:
    """The step config with the configuration it refers to loaded: a contract file becomes
    the loaded contract; a join's reference source is constructed (to check its settings)."""
    if isinstance(sc, ContractStep) and isinstance(sc.contract, str):
        from sluice.quality.contract import load_contract

        path = ctx.resolve(sc.contract)
        contract = attempt("step", sc.id, partial(load_contract, path, step_id=sc.id))
        return sc if contract is None else sc.model_copy(update={"contract": contract})
    if isinstance(sc, JoinStep):
        ref = sc.join.reference.model_copy(update={"id": sc.id})
        attempt("step", sc.id, lookup("source", ref.kind), ref, prefix="join.reference")
    return sc


def validate_pipeline(cfg: PipelineConfig, *, base_dir: Path | None = None) -> list[ConfigError]:
    """Every configuration mistake :func:`build_components` finds for the executor ``sluice
    run`` would choose (empty: the pipeline is valid)."""
    try:
        build_components(cfg, base_dir=base_dir)
    except ConfigErrors as exc:
        return list(exc.errors)
    except ConfigError as exc:
        return [exc]
    return []


__all__ = [
    "PIPELINE_CHECKS",
    "PIPELINE_RULES",
    "ChecksConfig",
    "Components",
    "UsesInputSchema",
    "build_components",
    "make_source",
    "step_kind",
    "validate_pipeline",
]
