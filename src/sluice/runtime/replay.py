"""``sluice replay``: send dead letters back through a (fixed) pipeline.

Each dead letter re-enters where it left:

* a letter written by a **step or sink** holds the row as a JSON object; it re-enters at that
  step (the step and everything downstream of it run again);
* a letter written by the **source** for one record (a bad CSV row, a bad JSON line) holds the raw
  text; it is written to a temporary file of the source's format (for CSV with the header line
  of the original file) and read again by the pipeline's own source;
* a letter for a **whole file** (``corrupt_file``, an unparseable JSON document) has no payload;
  the original file (its path is in ``source``) is read again.

Replay appends: every sink with a ``mode`` that replaces its target (file sinks' default
``overwrite``, Delta ``overwrite``, DuckDB ``replace``) appends instead, and pipelines with a
single-file sink, whose file it would replace, are refused. Records that fail again become new
dead letters in a subfolder ``replay-<time>/`` of the pipeline's dead-letter folder, so
replaying the original folder again never picks them up (only files directly inside the given
folder are read).

**Each record is replayed once.** A letter's key is a hash of its step, reason, source,
position, line and payload — not of the run that wrote it: a pipeline run twice over the same
input writes the same letter twice, and it is one record (identical letters of one run, which
have no position to tell them apart, stay distinct: the n-th of them in one run is the n-th in
another). Identical letters in the folder are replayed once. Each replay run is a batch run
with its own commit record in the pipeline's state store (``checkpoint.path``); the keys of the
letters it replays go into the store's ``replayed`` ledger in the same transaction as that
commit record (a key already there makes that transaction fail: the run is not committed). A
later replay skips the letters already in the ledger, with a message on stderr, and refuses
when nothing is left; one replay of a pipeline runs at a time (the lock
``<store>.replay.lock``, held from the ledger check to the last commit). A replay that crashed
after its commit is completed at the next start of the pipeline (or of a replay), like any
batch run; a replay rolls an earlier committed run forward with all of the pipeline's sinks.
Deleting the state store forgets the ledger.

**Letters with redacted PII are not replayed.** When the pipeline declares PII, the PII
values of a letter's payload (or a raw record as a whole) were replaced by ``<redacted>``
before the letter was written: its record is gone. Such letters are written again, as
``replay_error`` letters saying so, in the replay's folder (and their keys enter the ledger);
nothing of them reaches a sink.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa

from sluice.batch import REDACTED, dead_letters
from sluice.config.loader import parse_pipeline
from sluice.config.models import PipelineConfig
from sluice.errors import ConfigError, SluiceError
from sluice.plugins import Chunk, RunContext
from sluice.runtime.executor import Executor
from sluice.runtime.report import RunReport
from sluice.state.checkpoints import CheckpointStore, StoreBusy, exclusive

_SINGLE_FILE_EXT = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}
#: what identifies a dead letter's record: not the run that wrote it (a re-run that rejects
#: the same record again writes an identical letter: it is one record, replayed once)
_KEY_COLS = ["step_id", "reason", "source", "position", "line", "payload"]
#: modes that replace a sink's target: a replay appends instead
_REPLACING = {"overwrite", "replace", "error_if_exists"}


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
    keyed = [
        f.select(
            *[pl.col(c).cast(pl.String) for c in cols],
            *[
                (pl.col(c) if c in f.columns else pl.lit(None)).cast(pl.Int64).alias(c)
                for c in ("position", "line")
            ],
            *[
                (pl.col(c) if c in f.columns else pl.lit(None)).cast(pl.String).alias(f"_k_{c}")
                for c in [*_KEY_COLS, "run_id"]
            ],
        )
        for f in frames
    ]
    letters = pl.concat(keyed)
    parts = [pl.col(f"_k_{c}").fill_null("\x00") for c in _KEY_COLS]
    content = pl.concat_str(parts, separator="\x1f")
    # identical letters of one run are different records (no position to tell them apart):
    # the n-th of them in one run is the n-th in another run that rejected the same input
    letters = letters.with_columns(
        _content=content, _n=pl.int_range(pl.len()).over(content, "_k_run_id")
    ).drop([f"_k_{c}" for c in [*_KEY_COLS, "run_id"]])
    keys = [
        hashlib.sha256(f"{c}\x1e{n}".encode()).hexdigest()[:40]
        for c, n in zip(letters["_content"], letters["_n"], strict=True)
    ]
    letters = letters.drop("_content", "_n").with_columns(key=pl.Series(keys, dtype=pl.String))
    return letters.unique(subset="key", keep="first", maintain_order=True)


def _ledger(cfg: PipelineConfig, base_dir: Path) -> Path:
    fmt = {"pipeline": cfg.pipeline, "run_id": "replay"}
    return RunContext(cfg.pipeline, "replay", base_dir.resolve()).resolve(
        cfg.checkpoint.path.format(**fmt)
    )


def _skip_replayed(cfg: PipelineConfig, letters: pl.DataFrame, base_dir: Path) -> pl.DataFrame:
    """Drop the letters a replay already consumed (the ledger in the state store)."""
    path = _ledger(cfg, base_dir)
    if not path.exists() or letters.height == 0:
        return letters
    store = CheckpointStore(path, cfg.checkpoint.keep, table="batch_runs")
    try:
        done = store.replayed(letters["key"].to_list())
    finally:
        store.close()
    if not done:
        return letters
    runs = sorted({run for _, run, _ in done.values()})
    total = letters.height
    left = letters.filter(~pl.col("key").is_in(list(done)))
    if left.height == 0:
        raise ConfigError(
            f"all {total} dead letter(s) were replayed before (replay run(s) "
            f"{', '.join(runs)}); replaying them again would write their records twice",
            fix="nothing to do; a letter that failed again in a replay is in that replay's "
            "replay-<time>/ folder: replay that folder after the next fix",
        )
    print(
        f"sluice: {len(done)} of {total} dead letter(s) were replayed before (replay run(s) "
        f"{', '.join(runs)}) and are skipped",
        file=sys.stderr,
    )
    return left


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
    if reasons:
        letters = letters.filter(pl.col("reason").is_in(reasons))
    try:
        # one replay of a pipeline at a time, from the ledger check to its last commit
        with exclusive(_ledger(cfg, base_dir), "replay"):
            return _replay(cfg, letters, base_dir, progress)
    except StoreBusy as exc:
        raise SluiceError(
            f"{exc}: another `sluice replay` of pipeline '{cfg.pipeline}' is running; wait "
            "until it has finished, then replay again (the letters it replays are skipped)"
        ) from None


def _replay(
    cfg: PipelineConfig, letters: pl.DataFrame, base_dir: Path, progress: bool | None
) -> list[RunReport]:
    letters = _skip_replayed(cfg, letters, base_dir)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    cfg = cfg.model_copy(
        update={
            "dead_letter": cfg.dead_letter.model_copy(
                update={"path": f"{cfg.dead_letter.path}/replay-{stamp}"}
            )
        }
    )
    masked = letters.filter(
        pl.col("payload").map_elements(_redacted, return_dtype=pl.Boolean).fill_null(False)
    )
    letters = letters.filter(~pl.col("key").is_in(masked["key"].implode()))
    reports: list[RunReport] = []
    if masked.height:
        reports.append(_refuse_redacted(cfg, masked, base_dir, progress))
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


def _redacted(payload: str | None) -> bool:
    """Whether a letter's payload had PII redacted when it was written (``<redacted>`` in
    place of a value, or of the whole raw record): its record is no longer there to replay."""
    if not payload or REDACTED not in payload:
        return False
    if payload.startswith(REDACTED):
        return True
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and any(v == REDACTED for v in obj.values())


class _Letters:
    """A source that yields nothing but the given dead letters."""

    def __init__(self, step_id: str, letters: pa.Table) -> None:
        self.step_id = step_id
        self.letters = letters

    def open(self, ctx: RunContext) -> None:
        return None

    def read(self) -> Iterator[Chunk]:
        yield Chunk(dead=self.letters)

    def size_hint(self) -> int | None:
        return None

    def close(self) -> None:
        return None


_REDACTED_MESSAGE = (
    "not replayed: the letter's payload was redacted when it was written (the pipeline "
    "declares PII fields), so the record it held is gone and replaying it would write "
    "'<redacted>' as data. Fix the input it came from (see source, position, line) and run "
    "the pipeline on it again"
)


def _refuse_redacted(
    cfg: PipelineConfig, letters: pl.DataFrame, base_dir: Path, progress: bool | None
) -> RunReport:
    """Letters whose payload was redacted cannot be replayed faithfully: a run writes each
    of them again as a ``replay_error`` letter (in the replay's folder, with the reason), and
    their keys enter the ledger with its commit; nothing reaches a sink."""
    print(
        f"sluice: {letters.height} dead letter(s) hold redacted PII and cannot be replayed; "
        "they are written as replay_error letters",
        file=sys.stderr,
    )
    table = dead_letters(
        step_id="",
        reason="replay_error",
        message=_REDACTED_MESSAGE,
        payload=letters["payload"].to_list(),
        source=letters["source"].to_list(),
        position=letters["position"].to_list(),
        line=letters["line"].to_list(),
    )
    steps = pa.array([str(x) for x in letters["step_id"].to_list()], pa.string())
    table = table.set_column(table.schema.get_field_index("step_id"), "step_id", steps)
    raw = cfg.model_dump(by_alias=True, exclude_none=True)
    raw["source"] = {"kind": "jsonl", "path": "redacted.jsonl", "id": "replay_redacted"}
    raw["steps"] = []
    raw["sinks"] = []
    sub = parse_pipeline(raw, env={})
    return Executor(
        sub,
        base_dir=base_dir,
        progress=progress,
        replayed=letters["key"].to_list(),
        source=_Letters("replay_redacted", table),
        recovery=cfg,
    ).run()


def _is_object(payload: str | None) -> bool:
    return bool(payload) and payload.lstrip().startswith("{")  # type: ignore[union-attr]


def _replay_source(
    cfg: PipelineConfig, letters: pl.DataFrame, tmpdir: Path, base_dir: Path, progress: bool | None
) -> list[RunReport]:
    raw: dict[str, list[str]] = {}
    raw_keys: dict[str, list[str]] = {}
    objects: list[str] = []
    object_keys: list[str] = []
    whole_files: dict[str, list[str]] = {}
    for row in letters.iter_rows(named=True):  # dead letters are few; a loop is fine here
        payload, source, key = row["payload"], row["source"], row["key"]
        if payload is None:
            if source:
                whole_files.setdefault(source, []).append(key)
        elif _is_object(payload) and cfg.source.kind != "jsonl":
            objects.append(payload)
            object_keys.append(key)
        else:
            raw.setdefault(source or "", []).append(payload)
            raw_keys.setdefault(source or "", []).append(key)
    reports: list[RunReport] = []
    kind = cfg.source.kind
    files: list[tuple[str, list[str]]] = list(whole_files.items())
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
        files.append((str(target), raw_keys[origin]))
    for f, keys in files:
        src = cfg.source.model_dump(by_alias=True, exclude_none=True)
        src["path"] = f
        src["watch"] = False  # a replay reads these records once, as a batch
        if f.startswith(str(tmpdir)) and kind == "csv":
            src["encoding"] = "utf-8"  # the records were written as UTF-8 text...
            src["skip_rows"] = 0  # ...after the header line, without the original's preamble
        reports.append(_run(cfg, src, None, tmpdir, base_dir, progress, keys))
    if objects:
        declared = dict(getattr(cfg.source, "columns", None) or {})
        if getattr(cfg.source, "infer_types", False):
            keys_seen = {k for p in objects for k in orjson.loads(p)}
            missing = sorted(keys_seen - set(declared))
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
            _replay_objects(
                cfg, None, objects, tmpdir, base_dir, progress, object_keys, schema=declared
            )
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
    kept = letters.filter(pl.col("payload").is_not_null() & (pl.col("payload") != ""))
    payloads = kept["payload"].to_list()
    return _replay_objects(
        cfg, step_id, payloads, tmpdir, base_dir, progress, letters["key"].to_list()
    )


def _replay_objects(
    cfg: PipelineConfig,
    step_id: str | None,
    payloads: list[str],
    tmpdir: Path,
    base_dir: Path,
    progress: bool | None,
    keys: list[str],
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
    return _run(cfg, src, step_id, tmpdir, base_dir, progress, keys)


def _run(
    cfg: PipelineConfig,
    source: dict[str, Any],
    entry: str | None,
    tmpdir: Path,
    base_dir: Path,
    progress: bool | None,
    keys: list[str],
) -> RunReport:
    """Run the part of the pipeline downstream of ``entry`` (the whole pipeline when None),
    appending to the sinks; ``keys`` (the letters replayed) enter the ledger with its commit."""
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
    for sink in sinks:
        if sink.get("kind") in _SINGLE_FILE_EXT or sink.get("mode") in _REPLACING:
            sink["mode"] = "append"
            sink.pop("overwrite_partitions", None)
    raw["steps"] = new_steps
    raw["sinks"] = sinks
    sub = parse_pipeline(raw, env={})
    # an earlier run found committed but not completely published is rolled forward with the
    # whole pipeline's sinks, not only with those of this part
    return Executor(sub, base_dir=base_dir, progress=progress, replayed=keys, recovery=cfg).run()
