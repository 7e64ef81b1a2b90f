"""A batch run is one epoch: its sinks commit together, a re-run converges (issue 8).

Output modes of file sinks (overwrite by default, append, error_if_exists, overwrite_partitions),
the commit record and its roll-forward after a crash between two sinks' publishes (real
``sluice run`` processes killed at the crash points of ``runtime/faults.py``), dead letters of a
publish kept with their run, aborts that never race a writing sink thread, the run report that
says where it was written, and PII kept out of every message a run leaves behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pytest

import sluice
from sluice.batch import empty_dead_letters, strip_positions, with_positions
from sluice.config import parse_pipeline
from sluice.errors import ConfigErrors, SinkError, StepError
from sluice.plugins import Chunk, RunContext
from sluice.runtime.executor import Executor
from sluice.testing import MemorySink, MemorySource

# ----------------------------------------------------------------------------------- helpers


def _write_csv(path: Path, ids: range, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"id": list(ids), "k": [f"k{i % 3}" for i in ids]}).write_csv(path)
    if extra:
        with path.open("a") as fh:
            fh.write(extra)


def _config(sinks: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "pipeline": "orders",
        "source": {"kind": "csv", "path": "in/*.csv", "schema": {"id": "int64", "k": "string"}},
        "sinks": sinks,
        "dead_letter": {"kind": "jsonl", "path": "dl"},
        "settings": {"report_dir": "runs", "retry_backoff": 0},
        **extra,
    }


def _run(tmp_path: Path, cfg: dict[str, Any]) -> sluice.RunReport:
    return Executor(parse_pipeline(cfg), base_dir=tmp_path, progress=False).run()


def _visible(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*.tmp") if p.is_file())


def _ids(root: Path) -> list[int]:
    frames = []
    for f in _visible(root):
        if f.suffix == ".parquet":
            frames.append(pl.read_parquet(f, hive_partitioning=False).select("id"))
        elif f.suffix == ".jsonl":
            frames.append(pl.read_ndjson(f).select("id"))
        elif f.suffix == ".csv":
            frames.append(pl.read_csv(f).select("id"))
    return sorted(pl.concat(frames)["id"].to_list()) if frames else []


def _cli(pipeline: Path, crash: str | None = None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SLUICE_TEST_CRASH"}
    if crash:
        env["SLUICE_TEST_CRASH"] = crash
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", "run", str(pipeline), "--no-progress", *args],
        cwd=pipeline.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def _reports(tmp_path: Path) -> list[dict[str, Any]]:
    files = sorted((tmp_path / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return [json.loads(f.read_text()) for f in files]


def _duckdb_ids(path: Path, table: str = "t") -> list[int]:
    if not path.exists():
        return []
    with duckdb.connect(str(path), read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if table not in tables:
            return []
        return sorted(r[0] for r in con.execute(f"SELECT id FROM {table}").fetchall())


# ------------------------------------------------------------------------ item 11: file modes


def test_i8_11_rerun_replaces_the_output_instead_of_appending(tmp_path: Path) -> None:
    """Running a batch pipeline twice gives the same rows, in a folder, a partitioned folder
    and a single file: the default mode is overwrite."""
    _write_csv(tmp_path / "in" / "a.csv", range(1000))
    cfg = _config(
        [
            {"id": "pq", "kind": "parquet", "path": "out/pq", "rows_per_file": 300},
            {"id": "part", "kind": "parquet", "path": "out/part", "partition_by": ["k"]},
            {"id": "js", "kind": "jsonl", "path": "out/js"},
            {"id": "one", "kind": "csv", "path": "out/one.csv"},
        ]
    )
    first = _run(tmp_path, cfg)
    second = _run(tmp_path, cfg)
    assert first.status == second.status == "succeeded"
    for name in ("pq", "part", "js", "one.csv"):
        assert _ids(tmp_path / "out" / name) == list(range(1000)), name
    parts = _visible(tmp_path / "out" / "pq")
    assert len(parts) == 4 and all(second.run_id in p.name for p in parts)
    assert _temporaries(tmp_path) == []


def test_i8_11_append_mode_adds_the_run(tmp_path: Path) -> None:
    _write_csv(tmp_path / "in" / "a.csv", range(10))
    cfg = _config([{"id": "pq", "kind": "parquet", "path": "out", "mode": "append"}])
    _run(tmp_path, cfg)
    _run(tmp_path, cfg)
    assert _ids(tmp_path / "out") == sorted([*range(10), *range(10)])


def test_i8_11_error_if_exists_fails_before_reading(tmp_path: Path) -> None:
    _write_csv(tmp_path / "in" / "a.csv", range(10))
    for path in ("out", "one.jsonl"):
        cfg = _config([{"id": "o", "kind": "jsonl", "path": path, "mode": "error_if_exists"}])
        assert _run(tmp_path, cfg).status == "succeeded"
        before = {p: p.read_bytes() for p in _visible(tmp_path / path)}
        ex = Executor(parse_pipeline(cfg), base_dir=tmp_path, progress=False)
        with pytest.raises(SinkError, match="error_if_exists: output already exists"):
            ex.run()
        assert ex.report.rows_read == 0  # refused before any data was read
        assert {p: p.read_bytes() for p in _visible(tmp_path / path)} == before


def test_i8_11_overwrite_partitions_keeps_the_other_partitions(tmp_path: Path) -> None:
    src = tmp_path / "in" / "a.csv"
    src.parent.mkdir()
    sink = {"id": "p", "kind": "parquet", "path": "out", "partition_by": ["k"]}
    src.write_text("id,k\n1,a\n2,b\n")
    _run(tmp_path, _config([{**sink, "overwrite_partitions": True}]))
    src.write_text("id,k\n3,b\n4,c\n")
    _run(tmp_path, _config([{**sink, "overwrite_partitions": True}]))
    got = pl.read_parquet(tmp_path / "out", hive_partitioning=True).sort("id")
    assert got.select("id", "k").rows() == [(1, "a"), (3, "b"), (4, "c")]
    # plain overwrite replaces every partition
    _run(tmp_path, _config([sink]))
    got = pl.read_parquet(tmp_path / "out", hive_partitioning=True).sort("id")
    assert got.select("id", "k").rows() == [(3, "b"), (4, "c")]
    assert not (tmp_path / "out" / "k=a").exists()


def test_i8_11_modes_the_output_cannot_honour_are_refused_by_validation() -> None:
    stream = {
        "pipeline": "s",
        "source": {"kind": "redis_stream", "stream": "x"},
        "sinks": [{"id": "o", "kind": "parquet", "path": "out", "mode": "overwrite"}],
    }
    with pytest.raises(
        ConfigErrors,
        match=r"sink 'o', field 'mode': mode 'overwrite' is not possible in a "
        r"stream pipeline.*Fix: remove mode",
    ):
        parse_pipeline(stream)
    single = _config([{"id": "o", "kind": "csv", "path": "o.csv", "mode": "append"}])
    with pytest.raises(ConfigErrors, match="mode 'append' needs a folder"):
        parse_pipeline(single)
    no_partitions = _config(
        [{"id": "o", "kind": "parquet", "path": "o", "overwrite_partitions": True}]
    )
    with pytest.raises(
        ConfigErrors, match="sink 'o', field 'overwrite_partitions': overwrite_partitions needs"
    ):
        parse_pipeline(no_partitions)


def _pipeline_file(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_i8_11_kill_mid_write_keeps_the_previous_output_and_the_rerun_cleans_up(
    tmp_path: Path,
) -> None:
    """kill -9 while the second run writes: the first run's output stays as it was (names and
    bytes) until a run commits; the next run deletes the hidden temporary files the killed one
    left and replaces the output."""
    src = tmp_path / "in" / "a.csv"
    _write_csv(src, range(100))
    cfg = _config(
        [
            {"id": "js", "kind": "jsonl", "path": "out/js"},
            {"id": "cs", "kind": "csv", "path": "out/all.csv"},
        ],
        settings={"report_dir": "runs", "batch_rows": 20_000},
    )
    cfg["source"]["block_size"] = 1 << 16
    pipeline = _pipeline_file(tmp_path, cfg)
    assert _cli(pipeline).returncode == 0
    before = {p: p.read_bytes() for p in _visible(tmp_path / "out")}
    assert len(before) == 2

    _write_csv(src, range(6_000_000))  # long enough to be caught in the middle
    env = {k: v for k, v in os.environ.items() if k != "SLUICE_TEST_CRASH"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "run", str(pipeline), "--no-progress"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        sizes: list[int] = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            temps = [p for p in _temporaries(tmp_path / "out") if p.parent.name == "js"]
            if temps:
                sizes.append(temps[0].stat().st_size)
                if len(sizes) >= 2 and sizes[-1] > sizes[-2] > 0:
                    break
            time.sleep(0.02)
        else:
            pytest.fail(f"no growing temporary file: {sizes}")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {p: p.read_bytes() for p in _visible(tmp_path / "out")} == before
    assert _temporaries(tmp_path / "out")  # the killed run's leftovers

    _write_csv(src, range(50))
    assert _cli(pipeline).returncode == 0
    assert _ids(tmp_path / "out" / "js") == list(range(50))
    assert _ids(tmp_path / "out" / "all.csv") == list(range(50))
    assert _temporaries(tmp_path) == []


# ------------------------------------------------------------ F: one commit for all the sinks


def _two_sinks(mode: str) -> list[dict[str, Any]]:
    duck_mode = "append" if mode == "append" else "replace"
    return [
        {"id": "files", "kind": "parquet", "path": "out", "mode": mode},
        {"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t", "mode": duck_mode},
    ]


@pytest.mark.parametrize("mode", ["append", "overwrite"])
def test_i8_F_batch_crash_between_two_sinks_publish_is_rolled_forward(
    tmp_path: Path, mode: str
) -> None:
    """kill -9 after the first sink published and before the second: the commit record makes
    the next start publish the second sink's rows of that run (once) before it runs; then both
    sinks agree: append holds the run twice in both, overwrite once."""
    _write_csv(tmp_path / "in" / "a.csv", range(500))
    pipeline = _pipeline_file(tmp_path, _config(_two_sinks(mode)))
    crashed = _cli(pipeline, "mid_publish:1")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert _ids(tmp_path / "out") == list(range(500))  # the first sink published
    assert _duckdb_ids(tmp_path / "w.duckdb") == []  # the second had not
    assert not _reports(tmp_path)  # killed: no report

    again = _cli(pipeline)
    assert again.returncode == 0, again.stderr
    assert "was committed but not completely published" in again.stderr
    (report,) = _reports(tmp_path)
    assert report["recovered"]["sinks"] == ["files", "db"]
    assert report["recovered"]["run_id"] != report["run_id"]
    copies = 2 if mode == "append" else 1
    want = sorted(list(range(500)) * copies)
    assert _ids(tmp_path / "out") == want
    assert _duckdb_ids(tmp_path / "w.duckdb") == want
    assert _temporaries(tmp_path / "out") == []


def test_i8_F_batch_crash_before_the_commit_record_leaves_nothing_visible(
    tmp_path: Path,
) -> None:
    _write_csv(tmp_path / "in" / "a.csv", range(100))
    pipeline = _pipeline_file(tmp_path, _config(_two_sinks("append")))
    assert _cli(pipeline, "before_checkpoint:1").returncode == -signal.SIGKILL
    assert _ids(tmp_path / "out") == [] and _duckdb_ids(tmp_path / "w.duckdb") == []
    again = _cli(pipeline)
    assert again.returncode == 0, again.stderr
    (report,) = _reports(tmp_path)
    assert report["recovered"] is None
    assert _ids(tmp_path / "out") == list(range(100))
    assert _duckdb_ids(tmp_path / "w.duckdb") == list(range(100))
    assert _temporaries(tmp_path / "out") == []
    staged = tmp_path / "state" / "orders.db.batch-staging" / "db"
    assert staged.is_dir() and list(staged.iterdir()) == []  # the killed run's rows: deleted


def test_i8_F_deleted_state_store_forgets_a_pending_run_and_overwrite_still_converges(
    tmp_path: Path,
) -> None:
    """Documented: without the store a committed, half-published run is not rolled forward;
    with the default modes the next run replaces both outputs, so they agree again."""
    import shutil

    _write_csv(tmp_path / "in" / "a.csv", range(100))
    pipeline = _pipeline_file(tmp_path, _config(_two_sinks("overwrite")))
    assert _cli(pipeline, "mid_publish:1").returncode == -signal.SIGKILL
    shutil.rmtree(tmp_path / "state")
    again = _cli(pipeline)
    assert again.returncode == 0, again.stderr
    assert _ids(tmp_path / "out") == list(range(100))
    assert _duckdb_ids(tmp_path / "w.duckdb") == list(range(100))


def test_i8_F_dead_letters_of_a_publish_belong_to_their_run_across_a_crash(
    tmp_path: Path,
) -> None:
    """Rows the database refuses while a run is published are dead letters of that run: a
    crash right after the publish does not lose them (the publisher journals them before its
    commit) and the roll-forward does not write them twice."""
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("CREATE TABLE t (id BIGINT, k BIGINT)")  # k is text in the data
    _write_csv(tmp_path / "in" / "a.csv", range(40))
    cfg = _config([{"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t"}])
    pipeline = _pipeline_file(tmp_path, cfg)
    assert _cli(pipeline, "mid_publish:1").returncode == -signal.SIGKILL
    assert not list((tmp_path / "dl").glob("*.jsonl"))  # killed before the letters were out

    assert _cli(pipeline).returncode == 0
    (report,) = _reports(tmp_path)
    first = report["recovered"]["run_id"]
    assert report["recovered"]["dead_letters"] == 40
    mine = tmp_path / "dl" / f"{first}-refused-db.jsonl"
    letters = [json.loads(x) for x in mine.read_text().splitlines()]
    assert len(letters) == 40 and {x["reason"] for x in letters} == {"sink_rejected"}
    assert {x["run_id"] for x in letters} == {first}
    assert sorted(x["position"] for x in letters) == list(range(40))
    # the second run's own refusals: in its own file, counted in its report
    assert report["dead_letters"] == 40
    own = tmp_path / "dl" / f"{report['run_id']}-refused-db.jsonl"
    assert len(own.read_text().splitlines()) == 40
    db = next(s for s in report["steps"] if s["step_id"] == "db")
    assert (db["rows_in"], db["rows_out"], db["dead"], db["balanced"]) == (40, 0, 40, True)
    assert _duckdb_ids(tmp_path / "w.duckdb") == []


# ------------------------------------------------------------ F: aborts never race a write


class _BlockingSink(MemorySink):
    """A custom sink whose first write blocks until released; records what overlaps."""

    def __init__(self) -> None:
        super().__init__("out")
        self.release = threading.Event()
        self.writing = threading.Event()
        self.in_write = False
        self.abort_during_write = False
        self.threads: dict[str, str] = {}

    def write(self, table: pa.Table) -> pa.Table:
        self.in_write = True
        self.threads["write"] = threading.current_thread().name
        self.writing.set()
        self.release.wait(60)
        self.pending.append(strip_positions(table))
        self.in_write = False
        return empty_dead_letters()

    def abort(self) -> None:
        self.abort_during_write = self.abort_during_write or self.in_write
        self.threads["abort"] = threading.current_thread().name
        super().abort()


class _AfterWrite(MemorySource):
    """Yields the second table only once the sink is inside its first write."""

    def __init__(self, tables: list[pa.Table], writing: threading.Event) -> None:
        super().__init__(tables)
        self.writing = writing

    def read(self) -> Iterator[Chunk]:
        for i, chunk in enumerate(super().read()):
            if i:
                self.writing.wait(20)
            yield chunk


def test_i8_F_abort_never_races_a_sink_blocked_in_write(tmp_path: Path) -> None:
    t1 = pa.table({"a": ["1", "2"]})
    t2 = pa.table({"b": ["3"]})  # the cast step fails on the second batch
    sink = _BlockingSink()
    cfg = parse_pipeline(
        {
            "pipeline": "t",
            "source": {"kind": "csv", "path": "unused.csv"},
            "steps": [{"id": "types", "cast": {"a": "int"}}],
            "sinks": [{"id": "out", "kind": "jsonl", "path": "unused"}],
            "dead_letter": {"kind": "jsonl", "path": str(tmp_path / "dl")},
            "settings": {"report_dir": str(tmp_path / "runs"), "batch_rows": 1},
        }
    )
    source = _AfterWrite([t1, t2], sink.writing)
    ex = Executor(cfg, base_dir=tmp_path, progress=False, source=source, sinks={"out": sink})
    ex.join_timeout = 0.5
    errors: list[BaseException] = []

    def target() -> None:
        try:
            ex.run()
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=target)
    th.start()
    assert sink.writing.wait(20)
    th.join(30)
    assert not th.is_alive() and errors and isinstance(errors[0], StepError)
    assert "still writing" in (ex.report.error or "")
    assert not sink.aborted  # not while the write is in progress
    sink.release.set()
    deadline = time.monotonic() + 20
    while not sink.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.aborted and not sink.abort_during_write and not sink.committed
    assert sink.threads["abort"] == sink.threads["write"] == "sluice-sink-out"


# --------------------------------------------------------------------- item 19: the report


def test_i8_19_a_report_that_cannot_be_written_is_said_and_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "blocker").write_text("a file where the report folder should be")
    cfg = parse_pipeline(
        {
            "pipeline": "t",
            "source": {"kind": "csv", "path": "unused.csv"},
            "sinks": [{"id": "out", "kind": "jsonl", "path": "unused"}],
            "settings": {"report_dir": "blocker/runs"},
        }
    )
    rep = Executor(
        cfg,
        base_dir=tmp_path,
        progress=False,
        source=MemorySource([pa.table({"a": [1]})]),
        sinks={"out": MemorySink("out")},
    ).run()
    assert rep.status == "succeeded"
    assert rep.written_to is None and rep.write_error and "Error" in rep.write_error
    err = capsys.readouterr().err
    assert "the run report was not written to" in err and str(tmp_path / "blocker") in err
    assert rep.write_error in err
    ok = Executor(
        cfg.model_copy(update={"settings": cfg.settings.model_copy(update={"report_dir": "r"})}),
        base_dir=tmp_path,
        progress=False,
        source=MemorySource([pa.table({"a": [1]})]),
        sinks={"out": MemorySink("out")},
    ).run()
    assert ok.written_to is not None and ok.written_to.is_file()


# ---------------------------------------------------------------- item 21: PII stays hidden

CONTRACT = """
name: people
version: 1.0
schema:
  - {name: id, type: int}
  - {name: email, type: string, pii: true}
"""


@pytest.mark.parametrize(
    ("case", "step", "data"),
    [
        ("derive", {"id": "d", "derive": {"n": "CAST(email AS INT)"}}, None),
        ("sql", {"id": "s", "sql": "SELECT id, CAST(email AS INTEGER) AS n FROM input"}, None),
        # a bad byte and a wrong field count: the parser quotes the raw line in its message
        ("corrupt_line", None, "id,email\n1,ok@x.org\n\udcff,leak-ok@example.com,x\n3,c@x.org\n"),
        ("sink_refusal", None, None),
    ],
)
def test_i8_21_no_pii_value_in_any_output_of_a_run(
    tmp_path: Path, case: str, step: dict[str, Any] | None, data: str | None
) -> None:
    (tmp_path / "contract.yaml").write_text(CONTRACT)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_bytes(
        (data or "id,email\n1,first-leak@example.com\n2,leak-ok@example.com\n").encode(
            "utf-8", "surrogateescape"
        )
    )
    sinks: list[dict[str, Any]] = [{"id": "out", "kind": "jsonl", "path": "out"}]
    if case == "sink_refusal":
        with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
            con.execute("CREATE TABLE t (id BIGINT, email BIGINT)")
        sinks = [{"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t"}]
    cfg = {
        "pipeline": "people",
        "source": {"kind": "csv", "path": "in/*.csv", "schema": {"id": "int64", "email": "string"}},
        "steps": [{"id": "check", "contract": "contract.yaml"}, *([step] if step else [])],
        "sinks": sinks,
        "dead_letter": {"kind": "jsonl", "path": "dl"},
        "settings": {"report_dir": "runs"},
    }
    result = _cli(_pipeline_file(tmp_path, cfg))
    (report,) = _reports(tmp_path)
    letters = "".join(p.read_text() for p in (tmp_path / "dl").glob("*.jsonl"))
    if case in ("derive", "sql"):
        assert result.returncode == 1 and report["status"] == "failed"
        assert "<redacted>" in result.stderr and "email" in result.stderr  # names readable
    else:
        assert report["dead_letters"] >= 1 and "<redacted>" in letters
    seen = result.stdout + result.stderr + json.dumps(report) + letters
    for value in ("leak-ok@example.com", "first-leak@example.com", "@example.com"):
        assert value not in seen, (case, seen)


# ------------------------------------------------------------ provenance: line survives steps


class _LinedSource:
    step_id = "source"

    def open(self, ctx: RunContext) -> None: ...

    def read(self) -> Iterator[Chunk]:
        t = pa.table({"a": ["1", "x", "3"]})
        yield Chunk(table=with_positions(t, "in.csv", 0, lines=[2, 4, 7]))

    def size_hint(self) -> int | None:
        return None

    def close(self) -> None: ...


def test_i8_25_line_of_the_record_survives_into_a_later_steps_dead_letter(
    tmp_path: Path,
) -> None:
    sink = MemorySink("out")
    cfg = parse_pipeline(
        {
            "pipeline": "t",
            "source": {"kind": "csv", "path": "unused.csv"},
            "steps": [{"id": "keep", "filter": "a <> '3'"}, {"id": "types", "cast": {"a": "int"}}],
            "sinks": [{"id": "out", "kind": "jsonl", "path": "unused"}],
            "dead_letter": {"kind": "jsonl", "path": "dl"},
            "settings": {"report_dir": "runs"},
        }
    )
    rep = Executor(
        cfg, base_dir=tmp_path, progress=False, source=_LinedSource(), sinks={"out": sink}
    ).run()
    (letter,) = [json.loads(x) for x in Path(str(rep.dead_letter_path)).read_text().splitlines()]
    assert (letter["source"], letter["position"], letter["line"]) == ("in.csv", 1, 4)
    assert sink.table().column_names == ["a"]  # the line column is never written
