"""``sluice replay``: send dead letters back through a (fixed) pipeline.

Each dead letter re-enters where it left:

* a letter written by a **step or sink** holds the row as a JSON object; it re-enters at that
  step (the step and everything downstream of it run again);
* a letter written by the **source** for one record (a bad CSV row, a bad JSON line) holds the raw
  text; it is written to a temporary file of the source's format (for CSV with the header line
  of the original file) and read again by the pipeline's own source;
* a letter for a **whole file** (``corrupt_file``, an unparseable JSON document) has no payload;
  the original file (its path is in ``source``) is read again.

Replay appends: it refuses pipelines with a single-file sink, whose file it would replace.
Records that fail again become new dead letters in a subfolder ``replay-<time>/`` of the
pipeline's dead-letter folder, so replaying the original folder again never picks them up
(only files directly inside the given folder are read).
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from sluice.config.loader import parse_pipeline
from sluice.config.models import PipelineConfig
from sluice.errors import ConfigError
from sluice.runtime.executor import Executor
from sluice.runtime.report import RunReport

_SINGLE_FILE_EXT = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}


def read_dead_letters(path: Path) -> pl.DataFrame:
    files = sorted(
        p
        for p in (path.glob("*") if path.is_dir() else [path])
        if p.suffix in (".jsonl", ".parquet") and not p.name.startswith(".")
    )
    if not files:
        raise ConfigError(
            f"no dead-letter files (.jsonl, .parquet) at {str(path)!r}",
            fix="pass a dead-letter file or folder written by `sluice run`",
        )
    frames = [
        pl.read_parquet(f)
        if f.suffix == ".parquet"
        else pl.read_ndjson(f, infer_schema_length=None)
        for f in files
    ]
    cols = ["step_id", "reason", "source", "payload"]
    return pl.concat([f.select([pl.col(c).cast(pl.String) for c in cols]) for f in frames])


def replay(
    cfg: PipelineConfig,
    dead_letters: Path,
    *,
    base_dir: Path,
    reasons: list[str] | None = None,
    progress: bool | None = None,
) -> list[RunReport]:
    for sink in cfg.sinks:
        ext = _SINGLE_FILE_EXT.get(sink.kind)
        if ext and getattr(sink, "path", "").endswith(ext):
            raise ConfigError(
                "replay would replace this single-file output",
                step_id=sink.id,
                field="path",
                value=getattr(sink, "path", None),
                fix="write to a folder (a path without the file extension)",
            )
    letters = read_dead_letters(dead_letters)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    cfg = cfg.model_copy(
        update={
            "dead_letter": cfg.dead_letter.model_copy(
                update={"path": f"{cfg.dead_letter.path}/replay-{stamp}"}
            )
        }
    )
    if reasons:
        letters = letters.filter(pl.col("reason").is_in(reasons))
    reports: list[RunReport] = []
    with tempfile.TemporaryDirectory(prefix="sluice-replay-") as tmp:
        tmpdir = Path(tmp)
        src_id = cfg.source.id
        from_source = letters.filter(pl.col("step_id") == src_id)
        from_steps = letters.filter(pl.col("step_id") != src_id)
        if from_source.height:
            reports += _replay_source(cfg, from_source, tmpdir, base_dir, progress)
        for (step_id,), group in from_steps.group_by(["step_id"], maintain_order=True):
            reports.append(_replay_rows(cfg, str(step_id), group, tmpdir, base_dir, progress))
    return reports


def _is_object(payload: str | None) -> bool:
    return bool(payload) and payload.lstrip().startswith("{")  # type: ignore[union-attr]


def _replay_source(
    cfg: PipelineConfig, letters: pl.DataFrame, tmpdir: Path, base_dir: Path, progress: bool | None
) -> list[RunReport]:
    raw: dict[str, list[str]] = {}
    objects: list[str] = []
    whole_files: list[str] = []
    for row in letters.iter_rows(named=True):  # dead letters are few; a loop is fine here
        payload, source = row["payload"], row["source"]
        if payload is None:
            if source:
                whole_files.append(source)
        elif _is_object(payload) and cfg.source.kind != "jsonl":
            objects.append(payload)
        else:
            raw.setdefault(source or "", []).append(payload)
    reports: list[RunReport] = []
    kind = cfg.source.kind
    files: list[str] = list(dict.fromkeys(whole_files))
    for n, (origin, lines) in enumerate(raw.items()):
        if kind not in ("csv", "jsonl"):
            raise ConfigError(f"cannot replay raw {kind} records", step_id=cfg.source.id)
        target = tmpdir / f"raw-{n}.{kind}"
        header = ""
        if kind == "csv" and getattr(cfg.source, "header", True):
            header = _header_line(cfg, Path(origin))
        with target.open("w", encoding="utf-8", newline="") as fh:
            if header:
                fh.write(header)
            for line in lines:
                fh.write(line if line.endswith("\n") else line + "\n")
        files.append(str(target))
    for f in files:
        src = cfg.source.model_dump(by_alias=True, exclude_none=True)
        src["path"] = f
        src["watch"] = False  # a replay reads these records once, as a batch
        if f.startswith(str(tmpdir)) and kind == "csv":
            src["encoding"] = "utf-8"  # the records were written as UTF-8 text...
            src["skip_rows"] = 0  # ...after the header line, without the original's preamble
        reports.append(_run(cfg, src, None, tmpdir, base_dir, progress))
    if objects:
        declared = dict(getattr(cfg.source, "columns", None) or {})
        if getattr(cfg.source, "infer_types", False):
            keys = {k for p in objects for k in orjson.loads(p)}
            missing = sorted(keys - set(declared))
            if missing:
                raise ConfigError(
                    f"cannot replay {len(objects)} record(s) that the source rejected while "
                    f"converting types: the source infers the types of {missing}, and a replayed "
                    "record alone would not get the same types",
                    step_id=cfg.source.id,
                    field="schema",
                    fix="declare the column types in the source's schema (or set infer_types: "
                    "false and type them with a cast step), then replay",
                )
        reports.append(
            _replay_objects(cfg, None, objects, tmpdir, base_dir, progress, schema=declared)
        )
    return reports


def _header_line(cfg: PipelineConfig, path: Path) -> str:
    """The header record of the original CSV file, as its source reads it (compressed, with a
    preamble, in another encoding: all the same)."""
    from sluice.config.models import CsvSource
    from sluice.connectors.files._bytes import InputError
    from sluice.connectors.files.csv import CsvReader

    problem = "is gone" if not path.is_file() else ""
    if not problem:
        assert isinstance(cfg.source, CsvSource)
        try:
            header = CsvReader(cfg.source).header_text(path)
        except InputError as exc:
            problem = f"has no readable header ({exc})"
        else:
            if header:
                return header if header.endswith(("\n", "\r")) else header + "\n"
            problem = "has no header line"
    raise ConfigError(
        f"cannot replay CSV rows: the original file {str(path)!r} (needed for its header "
        f"line) {problem}",
        fix="restore the file, or replay with a pipeline whose CSV source has header: false "
        "and column_names",
    )


def _replay_rows(
    cfg: PipelineConfig,
    step_id: str,
    letters: pl.DataFrame,
    tmpdir: Path,
    base_dir: Path,
    progress: bool | None,
) -> RunReport:
    payloads = [p for p in letters["payload"].to_list() if p]
    return _replay_objects(cfg, step_id, payloads, tmpdir, base_dir, progress)


def _replay_objects(
    cfg: PipelineConfig,
    step_id: str | None,
    payloads: list[str],
    tmpdir: Path,
    base_dir: Path,
    progress: bool | None,
    schema: dict[str, str] | None = None,
) -> RunReport:
    target = tmpdir / f"rows-{step_id or 'source'}.jsonl"
    with target.open("wb") as fh:
        for p in payloads:
            try:
                row = orjson.loads(p)
            except orjson.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise ConfigError(
                    f"a dead letter of step '{step_id}' holds a raw record, not a row",
                    step_id=step_id,
                    fix="replay it by fixing the file it came from (source: see the letter)",
                )
            fh.write(orjson.dumps(row) + b"\n")
    src: dict[str, Any] = {"kind": "jsonl", "path": str(target)}
    if schema:
        src["schema"] = schema
    return _run(cfg, src, step_id, tmpdir, base_dir, progress)


def _run(
    cfg: PipelineConfig,
    source: dict[str, Any],
    entry: str | None,
    tmpdir: Path,
    base_dir: Path,
    progress: bool | None,
) -> RunReport:
    """Run the part of the pipeline downstream of ``entry`` (the whole pipeline when None)."""
    raw = cfg.model_dump(by_alias=True, exclude_none=True)
    src_id = f"replay_{entry}" if entry else cfg.source.id
    raw["source"] = {**source, "id": src_id}
    steps = raw["steps"]
    previous = cfg.source.id
    kept: set[str] = {src_id}
    new_steps = []
    started = entry is None
    for step in steps:
        inputs = step.get("from", previous)
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        previous = step["id"]
        if entry is not None and step["id"] == entry:
            started = True
            step["from"] = src_id
        elif not started:
            continue
        else:
            inside = [i for i in inputs if i in kept]
            if not inside:
                continue
            step["from"] = inside if len(inside) > 1 else inside[0]
        kept.add(step["id"])
        new_steps.append(step)
    sinks = []
    for sink in raw["sinks"]:
        inputs = sink.get("from", previous)
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        inside = [i for i in inputs if i in kept]
        if inside:
            sink["from"] = inside if len(inside) > 1 else inside[0]
            sinks.append(sink)
    if entry is not None and entry not in kept:
        if any(s["id"] == entry for s in raw["sinks"]):
            sinks = [s for s in raw["sinks"] if s["id"] == entry]
            sinks[0]["from"] = src_id
        else:
            raise ConfigError(
                "dead letters name a step this pipeline does not have",
                step_id=entry,
                fix="replay with the pipeline that wrote them",
            )
    raw["steps"] = new_steps
    raw["sinks"] = sinks
    sub = parse_pipeline(raw, env={})
    return Executor(sub, base_dir=base_dir, progress=progress).run()
