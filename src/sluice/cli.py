"""The ``sluice`` command: run, validate, schema, replay."""

from __future__ import annotations

import json as jsonlib
import sys
from enum import IntEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sluice.config.loader import json_schema, load_pipeline
from sluice.config.models import PipelineConfig
from sluice.errors import ConfigError, ConfigErrors, SluiceError
from sluice.runtime.executor import Executor
from sluice.runtime.report import RunReport


class ExitCode(IntEnum):
    """The exit codes of ``sluice`` (listed in ``--help``), in one place."""

    OK = 0
    RUN_FAILED = 1  # the run failed (a step, source or sink error; a failed quality gate)
    CONFIG_ERROR = 2  # the pipeline file is invalid (nothing was run)
    DEAD_LETTERS = 3  # with --fail-on-dead-letters: the run produced dead letters
    UNBALANCED = 4  # a step's counts do not balance (in != out + dead + filtered + ...)
    INTERRUPTED = 130  # Ctrl-C (a stream stops gracefully on SIGINT/SIGTERM and exits 0)


EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 the run failed; 2 invalid pipeline (nothing ran); "
    "3 dead letters (with --fail-on-dead-letters); 4 a step's counts do not balance; "
    "130 interrupted."
)

app = typer.Typer(
    name="sluice",
    help="Columnar data pipelines with dead letters: run, validate, schema, replay.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_WIDTH = None if sys.stdout.isatty() else 120
out = Console(soft_wrap=True, width=_WIDTH)
err = Console(stderr=True, soft_wrap=True, width=_WIDTH)

PipelineArg = Annotated[Path, typer.Argument(help="Pipeline YAML file.", show_default=False)]


def _version(value: bool) -> None:
    if value:
        from sluice import __version__

        out.print(f"sluice {__version__}", highlight=False)
        raise typer.Exit(ExitCode.OK)


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Columnar data pipelines with dead letters: run, validate, schema, replay."""


def _error(label: str, message: object) -> None:
    """Print a labelled error; the message is shown as is (no markup inside it)."""
    err.print(f"[red]{label}:[/red] ", end="")
    err.print(str(message), markup=False, highlight=False)


def _config_errors(exc: ConfigError, where: Path) -> None:
    """Print configuration mistakes, one per line, naming the file."""
    errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    err.print(f"[red]{len(errors)} problem(s)[/red] in {where}:", highlight=False)
    for e in errors:
        err.print(f"  - {e}", markup=False, highlight=False)


def summary_table(rep: RunReport) -> Table:
    """The per-step summary printed after a run. The ``aggregated`` and ``skipped`` columns
    appear when a step has such rows (they are part of every step's balance)."""
    t = Table(
        title=f"pipeline {rep.pipeline} · run {rep.run_id} · {rep.status}", title_justify="left"
    )
    extra = [c for c in ("aggregated", "skipped") if any(getattr(s, c) for s in rep.steps)]
    cols = ["step", "kind", "in", "out", "dead letters", "filtered", *extra, "seconds"]
    for col in (*cols, "balanced"):
        t.add_column(col, justify="left" if col in ("step", "kind") else "right", no_wrap=True)
    for s in rep.steps:
        t.add_row(
            s.step_id,
            s.kind,
            f"{s.rows_in:,}",
            f"{s.rows_out:,}",
            f"[red]{s.dead:,}[/red]" if s.dead else "0",
            f"{s.filtered:,}",
            *(f"{getattr(s, c):,}" for c in extra),
            f"{s.seconds:.2f}",
            "[green]yes[/green]" if s.balanced else "[red]NO[/red]",
        )
    return t


def report_written(rep: RunReport, path: Path) -> bool:
    """True when the run wrote its report to ``path`` (the report records where it was
    written; writing may have failed, e.g. in a read-only folder)."""
    return rep.written_to is not None and Path(rep.written_to) == Path(path)


def _rel(path: str | Path | None) -> str:
    """Show paths relative to the current folder when they are below it."""
    if path is None:
        return ""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def print_summary(rep: RunReport, report_path: Path) -> None:
    out.print(summary_table(rep))
    rate = f"{rep.rows_read / rep.seconds:,.0f} rows/s" if rep.seconds else ""
    out.print(
        f"{rep.rows_read:,} rows read in {rep.seconds:.2f} s ({rate}), "
        f"peak RSS {rep.peak_rss_mb:,.0f} MB"
    )
    if rep.dead_letters:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(rep.dead_letters_by_reason.items()))
        where = _rel(rep.dead_letter_path)
        out.print(f"[red]{rep.dead_letters:,} dead letters[/red] ({reasons}) → {where}")
    else:
        out.print("no dead letters")
    for step_id, q in rep.quality.items():
        checks = [*q.get("checks", []), *q.get("gates", [])]
        failing = [f"{c['check']}: {c['failed']:,} ({c['action']})" for c in checks if c["failed"]]
        out.print(
            f"contract {q.get('contract')} v{q.get('version')} at step '{step_id}': "
            f"{len(checks)} checks"
            + (f"; failures: {', '.join(failing)}" if failing else ", all passed")
        )
    if rep.recovered:
        r = rep.recovered
        out.print(
            f"recovered: run {r.get('run_id')} was committed but not completely published; "
            f"its sinks {', '.join(map(str, r.get('sinks') or []))} were completed first"
        )
    if report_written(rep, report_path):
        out.print(f"run report → {_rel(report_path)}")
    else:
        err.print(f"[red]run report not written[/red]: {_rel(report_path)}", highlight=False)


@app.command(epilog=EXIT_CODES_HELP)
def run(
    pipeline: PipelineArg,
    report: Annotated[Path | None, typer.Option(help="Write the JSON run report here.")] = None,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress", help="Progress bar (default: on a terminal, off in CI)."
        ),
    ] = None,
    json: Annotated[
        bool,
        typer.Option("--json", help="Print the run report as JSON (also when the run fails)."),
    ] = False,
    fail_on_dead_letters: Annotated[
        bool, typer.Option(help="Exit 3 when the run produced dead letters.")
    ] = False,
    until_idle: Annotated[
        str | None,
        typer.Option(
            help="Stream mode: stop after no record arrived for this long (e.g. 5s), treating "
            "it as the end of input: windows are flushed and a final checkpoint written."
        ),
    ] = None,
) -> None:
    """Run a pipeline and print a per-step summary.

    A batch pipeline runs to the end of its input; a stream pipeline (kafka / redis_stream
    source, or watch: true) runs until SIGINT or SIGTERM (final checkpoint, then exit 0) or
    --until-idle."""
    cfg = _load(pipeline)
    try:
        if cfg.streaming:
            from sluice.runtime.stream import StreamExecutor
            from sluice.time.durations import parse_duration

            try:
                idle = parse_duration(until_idle) if until_idle is not None else None
            except ValueError as exc:
                raise ConfigError(str(exc), field="--until-idle") from None
            ex: Executor = StreamExecutor(
                cfg,
                base_dir=pipeline.parent,
                progress=progress,
                report_path=report,
                until_idle=idle,
            )
        else:
            ex = Executor(cfg, base_dir=pipeline.parent, progress=progress, report_path=report)
    except ConfigError as exc:  # found while building the components (as `validate` does)
        _config_errors(exc, pipeline)
        raise typer.Exit(ExitCode.CONFIG_ERROR) from None
    except SluiceError as exc:  # e.g. a missing optional dependency
        _error("error", exc)
        raise typer.Exit(ExitCode.CONFIG_ERROR) from None
    code = ExitCode.OK
    try:
        rep = ex.run()
    except SluiceError as exc:  # rendered by the run (redacted when it declares PII)
        _error("error", ex.render_error(exc))
        rep, code = ex.report, ExitCode.RUN_FAILED
    except Exception as exc:  # a bug or an unexpected library error: still a clean exit
        _error("unexpected error", f"{ex.render_error(exc)} (please report it)")
        rep, code = ex.report, ExitCode.RUN_FAILED
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: data sinks aborted, dead letters kept")
        rep, code = ex.report, ExitCode.INTERRUPTED
    if json:
        out.print_json(data=rep.to_dict())
    else:
        print_summary(rep, ex.report_path)
    if code != ExitCode.OK:
        raise typer.Exit(code)
    if not rep.balanced:
        err.print(
            "[red]error:[/red] a step's counts do not balance "
            "(in ≠ out + dead + filtered + aggregated + skipped)"
        )
        raise typer.Exit(ExitCode.UNBALANCED)
    if fail_on_dead_letters and rep.dead_letters:
        raise typer.Exit(ExitCode.DEAD_LETTERS)


@app.command(epilog="Exit codes: 0 valid; 2 invalid (every mistake is listed).")
def validate(pipeline: PipelineArg) -> None:
    """Check a pipeline file and report every mistake at once (exit 2 if any).

    Checks the settings and everything `sluice run` checks before reading data: each source,
    step and sink is built (not opened) exactly as the run builds it, and contract files the
    pipeline names are read."""
    from sluice.config.validate import validate_pipeline

    cfg = _load(pipeline)
    problems = validate_pipeline(cfg, base_dir=pipeline.parent)
    if problems:
        _config_errors(ConfigErrors(problems), pipeline)
        raise typer.Exit(ExitCode.CONFIG_ERROR)
    sinks = ", ".join(f"{s.id} ({s.kind})" for s in cfg.sinks)
    out.print(
        f"[green]ok[/green]: pipeline '{cfg.pipeline}': source {cfg.source.kind}, "
        f"{len(cfg.steps)} step(s), sinks: {sinks or 'none'}"
    )


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file.")] = None,
) -> None:
    """Print the JSON Schema of pipeline files (for editor completion and validation)."""
    text = jsonlib.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n", encoding="utf-8")
        err.print(f"JSON Schema written to {output}")
    else:
        sys.stdout.write(text + "\n")


@app.command()
def replay(
    dead_letters: Annotated[
        Path, typer.Argument(help="Dead-letter file or folder (.jsonl/.parquet).")
    ],
    pipeline: Annotated[
        Path, typer.Option("--pipeline", "-p", help="Pipeline YAML (after your fix).")
    ],
    reason: Annotated[
        list[str] | None, typer.Option(help="Replay only these reason codes.")
    ] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress")] = None,
) -> None:
    """Send dead letters back through the pipeline after a fix."""
    from sluice.runtime.replay import replay as do_replay

    cfg = _load(pipeline)
    try:
        reports = do_replay(
            cfg, dead_letters, base_dir=pipeline.parent, reasons=reason, progress=progress
        )
    except SluiceError as exc:
        _error("error", exc)
        raise typer.Exit(1) from None
    t = Table(title="replay", title_justify="left")
    for col in ("enters at", "records", "written", "filtered", "failed again"):
        t.add_column(col, justify="left" if col == "enters at" else "right", no_wrap=True)
    for rep in reports:
        entry = rep.steps[0].step_id.removeprefix("replay_")
        sinks = [s for s in rep.steps if s.kind.endswith(" sink")]
        t.add_row(
            entry,
            f"{rep.steps[0].rows_in:,}",
            f"{max((s.rows_out for s in sinks), default=0):,}",
            f"{sum(s.filtered for s in rep.steps):,}",
            f"{rep.dead_letters:,}",
        )
    out.print(t)
    failed = [r.dead_letter_path for r in reports if r.dead_letters]
    total_in = sum(r.steps[0].rows_in for r in reports)
    total_dead = sum(r.dead_letters for r in reports)
    out.print(f"replayed {total_in:,} record(s); {total_dead:,} failed again")
    if failed:
        out.print(f"new dead letters in {_rel(Path(str(failed[0])).parent)}")


_KINDS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".xml": "xml",
}

# exit codes of `sluice check` (listed in its --help)
CHECK_PASSED, CHECK_FAILED, CHECK_USAGE, CHECK_NOTHING_READ = 0, 1, 2, 3


_CHECK_EXIT_CODES = (
    "Exit codes:\n\n"
    "0  every record was read and every check and gate passed\n\n"
    "1  a check or gate failed (whatever its action), some records could not be read, "
    "or the run failed\n\n"
    "2  usage or configuration error (contract file, options, format)\n\n"
    "3  nothing was read (an empty input, or every record a dead letter)"
)


@app.command(epilog=_CHECK_EXIT_CODES)
def check(
    data: Annotated[str, typer.Argument(help="A file or glob (csv, json, jsonl, parquet).")],
    contract: Annotated[Path, typer.Option("--contract", "-c", help="Contract YAML file.")],
    kind: Annotated[
        str | None, typer.Option(help="Source kind if not clear from the name.")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress")] = None,
    dead_letters: Annotated[
        Path | None,
        typer.Option(
            "--dead-letters",
            help="Keep the records that failed a check or could not be read, in this folder "
            "(one JSON-lines file per run). Default: none are written.",
        ),
    ] = None,
) -> None:
    """Check data against a contract, without a pipeline. Every check and gate is counted and
    reported, and any failure makes the exit code non-zero, whatever its action (actions decide
    what happens to rows inside a pipeline)."""
    from sluice.config.loader import parse_pipeline
    from sluice.quality.contract import load_contract
    from sluice.quality.step import ContractCheck

    suffix = Path(data.replace("*", "x")).suffix.lower()
    source_kind = kind or _KINDS.get(suffix)
    if source_kind is None:
        _error(
            "error", f"cannot tell the format of {data!r}; pass --kind csv|json|jsonl|parquet|xml"
        )
        raise typer.Exit(CHECK_USAGE)
    try:
        spec = load_contract(contract)
    except SluiceError as exc:
        _error("error", exc)
        raise typer.Exit(CHECK_USAGE) from None
    import tempfile

    failed_run: str | None = None
    with tempfile.TemporaryDirectory(prefix="sluice-check-") as tmp:
        letters = dead_letters.absolute() if dead_letters else Path(tmp) / "dead_letters"
        raw = {
            "pipeline": "check",
            "source": {"kind": source_kind, "path": str(Path(data).absolute())}
            | ({"infer_types": False} if source_kind == "csv" else {}),
            "steps": [{"id": "contract", "contract": spec}],
            "dead_letter": {"kind": "jsonl", "path": str(letters)},
        }
        try:
            ex = Executor(
                parse_pipeline(raw), progress=progress, report_path=Path(tmp) / "report.json"
            )
        except (SluiceError, ValueError) as exc:
            _error("error", exc)
            raise typer.Exit(CHECK_USAGE) from None
        for step, _ in ex.steps:
            if isinstance(step, ContractCheck):
                step.report_only = True  # count every check, stop for none
        try:
            rep = ex.run()
        except SluiceError as exc:
            failed_run = str(exc)
            rep = ex.report
        except Exception as exc:
            failed_run = f"unexpected error: {type(exc).__name__}: {exc} (please report it)"
            rep = ex.report
        first_letter = _first_dead_letter(rep.dead_letter_path)
    quality = rep.quality.get("contract", {})
    source = rep.step(ex.cfg.source.id)
    checks = [*quality.get("checks", []), *quality.get("gates", [])]
    failing = [c["check"] for c in checks if c["failed"]]
    reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(rep.dead_letters_by_reason.items()))
    why: str | None = None
    if failed_run:
        code, verdict = CHECK_FAILED, "error"
    elif rep.rows_read == 0:
        code, verdict = CHECK_NOTHING_READ, "nothing_read"
        why = _nothing_read(data, source_kind, source.dead, reasons, first_letter)
    elif failing or source.dead:
        code, verdict = CHECK_FAILED, "failed"
    else:
        code, verdict = CHECK_PASSED, "passed"
    if json:
        out.print_json(
            data={
                "verdict": verdict,
                "exit_code": code,
                "status": rep.status,
                "error": failed_run,
                "message": why,
                "rows": rep.rows_read,
                "unread": source.dead,
                "dead_letters": rep.dead_letters,
                "dead_letters_by_reason": rep.dead_letters_by_reason,
                "dead_letter_path": rep.dead_letter_path if dead_letters else None,
                "failed_checks": failing,
                **quality,
            }
        )
    else:
        if quality and rep.rows_read:
            print_quality(quality, rep)
        if rep.dead_letters:
            where = (
                f"→ {_rel(rep.dead_letter_path)}"
                if dead_letters
                else "(not kept: pass --dead-letters PATH to keep them)"
            )
            out.print(f"{rep.dead_letters:,} dead letters ({reasons}) {where}")
        if failed_run:
            _error("failed", failed_run)
        elif why:
            _error("nothing was read", why)
        elif code == CHECK_FAILED:
            parts = [f"{len(failing)} check(s) failed: {', '.join(failing)}"] if failing else []
            if source.dead:
                parts.append(f"{source.dead:,} record(s) could not be read and were not checked")
            _error("check failed", "; ".join(parts))
        else:
            out.print(f"[green]passed[/green]: {rep.rows_read:,} rows, {len(checks)} checks")
    raise typer.Exit(code)


def _first_dead_letter(path: str | None) -> dict[str, object] | None:
    """The first dead letter written by a run (to say why nothing was read)."""
    if not path or not Path(path).is_file():
        return None
    with Path(path).open(encoding="utf-8") as f:
        line = f.readline()
    try:
        letter = jsonlib.loads(line)
    except ValueError:
        return None
    return letter if isinstance(letter, dict) else None


def _nothing_read(
    data: str, kind: str, unread: int, reasons: str, first: dict[str, object] | None
) -> str:
    """Why a check read no row, and what to do."""
    if not unread:
        return f"{data} holds no records (an empty file, or a header only)"
    text = f"every record of {data} was a dead letter ({reasons})"
    if first is not None and first.get("message"):
        at = f" at line {first['line']}" if first.get("line") is not None else ""
        text += f"; the first{at}: {first['message']}"
    if kind == "json" and _looks_like_json_lines(data):
        text += "; the file looks like JSON lines (one document per line): pass --kind jsonl"
    return text


def _looks_like_json_lines(data: str) -> bool:
    """The first file of ``data`` starts with two lines that are each a JSON document."""
    import glob

    import orjson

    files = sorted(glob.glob(data)) or [data]
    try:
        with Path(files[0]).open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    lines = [x for x in head.removeprefix(b"\xef\xbb\xbf").splitlines() if x.strip()][:2]
    if len(lines) < 2:
        return False
    try:
        return all(isinstance(orjson.loads(x), (dict, list)) for x in lines)
    except orjson.JSONDecodeError:
        return False


def print_quality(quality: dict[str, object], rep: RunReport) -> None:
    t = Table(
        title=f"contract {quality.get('contract')} v{quality.get('version')} · "
        f"{rep.rows_read:,} rows",
        title_justify="left",
    )
    for col in ("check", "action", "checked", "failed", "rate", "samples"):
        t.add_column(
            col,
            justify="right" if col in ("checked", "failed", "rate") else "left",
            no_wrap=col != "samples",
        )
    rows = [*quality.get("checks", []), *quality.get("gates", [])]  # type: ignore[misc]
    for r in rows:
        failed = r["failed"]
        t.add_row(
            r["check"],
            r["action"],
            f"{r['checked']:,}",
            f"[red]{failed:,}[/red]" if failed else "0",
            f"{r['failure_rate']:.2%}",
            " ".join(
                x
                for x in (
                    ", ".join(map(str, r["samples"]))[:60],
                    f"({r['detail']})" if r.get("detail") else "",
                )
                if x
            ),
        )
    out.print(t)
    for note in quality.get("schema", []):  # type: ignore[attr-defined]
        out.print(f"schema: {note}")


contract_app = typer.Typer(
    help="Data contracts: import from the Open Data Contract Standard.", no_args_is_help=True
)
app.add_typer(contract_app, name="contract")


@contract_app.command("import")
def contract_import(
    source: Annotated[Path, typer.Argument(help="An ODCS v3 YAML file.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write here (several tables: one file each, named after the table).",
        ),
    ] = None,
) -> None:
    """Convert an Open Data Contract Standard v3 file into Sluice contract(s), and say plainly
    which ODCS parts Sluice cannot enforce."""
    from sluice.quality.odcs import dump_contract, import_odcs

    try:
        result = import_odcs(source)
    except SluiceError as exc:
        _error("error", exc)
        raise typer.Exit(1) from None
    for i, c in enumerate(result.contracts):
        text = dump_contract(c)
        if output is None:
            sys.stdout.write(("---\n" if i else "") + text)
            continue
        target = (
            output
            if len(result.contracts) == 1
            else output.with_name(f"{output.stem}.{c.name}{output.suffix or '.yaml'}")
        )
        target.write_text(text, encoding="utf-8")
        err.print(f"contract '{c.name}' → {target}")
    for line in result.notes:
        err.print(f"note: {line}", markup=False, highlight=False)
    for line in result.unsupported:
        err.print(f"[yellow]not enforced:[/yellow] {line}", highlight=False)


def _load(path: Path) -> PipelineConfig:
    try:
        return load_pipeline(path)
    except ConfigError as exc:
        _config_errors(exc, path)
        raise typer.Exit(ExitCode.CONFIG_ERROR) from None
    except SluiceError as exc:
        _error("error", exc)
        raise typer.Exit(ExitCode.CONFIG_ERROR) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
