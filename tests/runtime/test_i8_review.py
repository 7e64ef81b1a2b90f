"""Regression tests for the review of the runtime and sinks after issue 8 (findings 1-12 and the
two races it noted): no run deletes another run's files, overwrite stays in its own output, a
committed run is published whole, replays write each record once and never write redacted
values, PII follows renames, publishes are journaled before they commit and bounded in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
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
import yaml

from sluice.batch import empty_dead_letters, with_positions
from sluice.config import parse_pipeline
from sluice.errors import ConfigError, ConfigErrors, SinkError, SluiceError
from sluice.plugins import Chunk, RunContext
from sluice.runtime.executor import Executor
from sluice.runtime.replay import replay
from sluice.testing import MemorySink

# ----------------------------------------------------------------------------------- helpers


def _csv(path: Path, rows: list[str], header: str = "id,k") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))


def _cfg(sinks: list[dict[str, Any]], pipeline: str = "p", **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "pipeline": pipeline,
        "source": {"kind": "csv", "path": "in/*.csv", "schema": {"id": "int64", "k": "string"}},
        "steps": [],
        "sinks": sinks,
        "dead_letter": {"kind": "jsonl", "path": "dl/{pipeline}"},
        "settings": {"report_dir": "runs", "retry_backoff": 0},
    }
    cfg.update(extra)
    return cfg


def _run(base: Path, cfg: dict[str, Any], **kw: Any) -> Any:
    return Executor(parse_pipeline(cfg), base_dir=base, progress=False, **kw).run()


def _visible(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _jsonl_ids(root: Path) -> list[int]:
    return sorted(json.loads(x)["id"] for f in _visible(root) for x in f.read_text().splitlines())


def _cli(base: Path, cfg: dict[str, Any], crash: str | None = None, *args: str) -> Any:
    (base / "p.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "SLUICE_TEST_CRASH"}
    if crash:
        env["SLUICE_TEST_CRASH"] = crash
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", "run", str(base / "p.yaml"), "--no-progress", *args],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


class _Rows:
    """A source that yields the given tables and runs ``between`` after the first one (another
    pipeline starting while this one runs)."""

    step_id = "source"

    def __init__(self, tables: list[pa.Table], between: Any) -> None:
        self.tables = tables
        self.between = between

    def open(self, ctx: RunContext) -> None: ...

    def close(self) -> None: ...

    def size_hint(self) -> int | None:
        return None

    def read(self) -> Iterator[Chunk]:
        start = 0
        for i, t in enumerate(self.tables):
            if i == 1:
                self.between()
            yield Chunk(table=with_positions(t, "mem", start))
            start += t.num_rows


# ------------------------------------------- 1: a run never deletes another run's temporaries


def test_i8_review_a_run_never_deletes_another_pipelines_temporary_files(tmp_path: Path) -> None:
    _csv(tmp_path / "in" / "a.csv", ["1,a", "2,b"])
    sink = [{"id": "lake", "kind": "jsonl", "path": "out", "mode": "append"}]
    other: list[Any] = []

    def b_runs() -> None:  # pipeline B appends to the same folder while A is writing
        other.append(_run(tmp_path, _cfg(sink, pipeline="other")))

    cfg = _cfg(sink, pipeline="A", source={"kind": "csv", "path": "in/*.csv"})
    cfg["settings"]["batch_rows"] = 1
    src = _Rows([pa.table({"id": [10, 11, 12]}), pa.table({"id": [13]})], b_runs)
    rep = _run(tmp_path, cfg, source=src)
    assert other[0].status == "succeeded" and rep.status == "succeeded"
    assert rep.step("lake").rows_out == 4
    assert _jsonl_ids(tmp_path / "out") == [1, 2, 10, 11, 12, 13]


def test_i8_review_a_shared_dead_letter_folder_keeps_every_runs_letters(tmp_path: Path) -> None:
    _csv(tmp_path / "in" / "a.csv", ["1,a"])

    def cfg(name: str, out: str) -> dict[str, Any]:
        c = _cfg([{"id": "o", "kind": "jsonl", "path": out}], pipeline=name)
        c["dead_letter"] = {"kind": "jsonl", "path": "dead_letters"}  # one folder for all
        c["steps"] = [{"id": "t", "cast": {"k": "int"}}]
        return c

    other: list[Any] = []
    a = cfg("A", "outA")
    a["settings"]["batch_rows"] = 1
    src = _Rows(
        [pa.table({"id": [10], "k": ["notanint"]}), pa.table({"id": [11], "k": ["5"]})],
        lambda: other.append(_run(tmp_path, cfg("other", "outB"))),
    )
    rep = _run(tmp_path, a, source=src)
    assert rep.dead_letters == 1 and other[0].dead_letters == 1
    letters = [
        json.loads(x)
        for f in _visible(tmp_path / "dead_letters")
        for x in f.read_text().splitlines()
    ]
    assert sorted(x["pipeline"] for x in letters) == ["A", "other"]


def test_i8_review_publish_refuses_when_a_committed_part_is_gone(tmp_path: Path) -> None:
    _csv(tmp_path / "in" / "a.csv", ["1,a", "2,b"])
    cfg = _cfg([{"id": "out", "kind": "jsonl", "path": "out", "mode": "append"}])
    killed = _cli(tmp_path, cfg, "after_checkpoint:1")
    assert killed.returncode == -9, killed.stderr
    temporaries = sorted((tmp_path / "out").glob(".*.tmp"))
    assert temporaries
    for t in temporaries:  # something else deletes the committed run's files
        t.unlink()
    with pytest.raises(SinkError, match="gone before they were published"):
        _run(tmp_path, cfg)
    assert _jsonl_ids(tmp_path / "out") == []


# --------------------------------------------------- 2: overwrite stays in its own output


def test_i8_review_overwrite_stays_out_of_nested_sink_folders(tmp_path: Path) -> None:
    nested = [
        [
            {"id": "inner", "kind": "parquet", "path": "out/inner"},
            {"id": "all", "kind": "parquet", "path": "out"},
        ],
        [{"id": "a", "kind": "jsonl", "path": "out"}, {"id": "b", "kind": "csv", "path": "out/"}],
        [
            {"id": "a", "kind": "jsonl", "path": "out"},
            {"id": "f", "kind": "csv", "path": "out/x.csv"},
        ],
        [{"id": "a", "kind": "jsonl", "path": "dl"}],  # the dead letters (dl/p) inside a sink
        [{"id": "a", "kind": "jsonl", "path": "dl/p/mine"}],  # a sink inside the dead letters
    ]
    for sinks in nested:
        with pytest.raises((ConfigError, ConfigErrors), match=r"inside the output of|same as"):
            parse_pipeline(_cfg(sinks))
    side_by_side = [
        {"id": "a", "kind": "jsonl", "path": "out/a"},
        {"id": "b", "kind": "csv", "path": "out/b.csv"},
    ]
    parse_pipeline(_cfg(side_by_side))  # siblings are fine
    # a folder that is not the output's own (a user's, not a partition of partition_by) is left
    # alone by overwrite; the output's partition folders are replaced
    _csv(tmp_path / "in" / "a.csv", ["1,a", "2,b"])
    sink = {"id": "lake", "kind": "parquet", "path": "out", "partition_by": ["k"]}
    assert _run(tmp_path, _cfg([sink])).status == "succeeded"
    keep = tmp_path / "out" / "keep" / "part-mine-00000.parquet"
    keep.parent.mkdir()
    pl.DataFrame({"id": [9]}).write_parquet(keep)
    _csv(tmp_path / "in" / "a.csv", ["3,a"])
    assert _run(tmp_path, _cfg([sink])).status == "succeeded"
    assert keep.exists()
    parts = [p for p in _visible(tmp_path / "out") if p.parent.name.startswith("k=")]
    assert [p.parent.name for p in parts] == ["k=a"]
    assert pl.read_parquet(parts[0])["id"].to_list() == [3]


# ------------------------------------------- 3: a single file is replaced also by no rows


def test_i8_review_single_file_overwrite_without_rows_leaves_no_stale_rows(tmp_path: Path) -> None:
    _csv(tmp_path / "in" / "a.csv", ["1,paid", "2,paid"])
    cfg = _cfg(
        [{"id": "latest", "kind": "csv", "path": "out/paid.csv"}],
        steps=[{"id": "f", "filter": "k = 'paid'"}],
    )
    assert _run(tmp_path, cfg).status == "succeeded"
    assert (tmp_path / "out" / "paid.csv").read_text().count("\n") == 3
    _csv(tmp_path / "in" / "a.csv", ["1,open", "2,open"])  # today nothing is paid
    rep = _run(tmp_path, cfg)
    assert rep.status == "succeeded" and rep.step("latest").rows_out == 0
    assert (tmp_path / "out" / "paid.csv").read_text().splitlines() == ['"id","k"']
    # no columns known at all (the step after the filter never ran): still replaced, empty
    cfg["steps"].append({"id": "d", "derive": {"n": "id + 1"}})
    for kind in ("csv", "jsonl", "parquet"):
        cfg["sinks"] = [{"id": "latest", "kind": kind, "path": f"out/paid.{kind}"}]
        _csv(tmp_path / "in" / "a.csv", ["1,paid"])
        assert _run(tmp_path, cfg).status == "succeeded"
        _csv(tmp_path / "in" / "a.csv", ["1,open"])
        assert _run(tmp_path, cfg).status == "succeeded"
        if kind == "parquet":
            assert pl.read_parquet(tmp_path / "out" / "paid.parquet").height == 0
        else:
            assert (tmp_path / "out" / f"paid.{kind}").read_text().strip() == ""


# ------------------------------------------------- 4: a sink may be called dead_letter


def test_i8_review_a_sink_called_dead_letter_is_published(tmp_path: Path) -> None:
    _csv(tmp_path / "in" / "a.csv", ["1,a", "2,b"])
    rep = _run(tmp_path, _cfg([{"id": "dead_letter", "kind": "jsonl", "path": "out"}]))
    assert rep.status == "succeeded" and rep.step("dead_letter").rows_out == 2
    assert _jsonl_ids(tmp_path / "out") == [1, 2]
    assert not list((tmp_path / "out").glob(".*.tmp"))


# ----------------------------------- 5: a committed run is published with all of its sinks


def test_i8_review_replay_rolls_forward_with_every_sink_of_the_run(tmp_path: Path) -> None:
    _csv(tmp_path / "in" / "a.csv", ["1,a", "2,b"])
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("CREATE TABLE t (id BIGINT, k BIGINT)")
    cfg = _cfg(
        [
            {"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t"},
            {"id": "out", "kind": "jsonl", "path": "out", "mode": "append"},
        ]
    )
    rep = _run(tmp_path, cfg)
    assert rep.dead_letters == 2  # the table refuses k: string
    letters = _visible(tmp_path / "dl" / "p")
    killed = _cli(tmp_path, cfg, "mid_publish:1")  # run 2: db published, out not yet
    assert killed.returncode == -9, killed.stderr
    assert _jsonl_ids(tmp_path / "out") == [1, 2]
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("DROP TABLE t")
        con.execute("CREATE TABLE t (id BIGINT, k VARCHAR)")
    # the replay enters at the db sink only; run 2 is rolled forward with every sink first
    reports = replay(parse_pipeline(cfg), letters[0], base_dir=tmp_path, progress=False)
    assert reports[0].recovered is not None and sorted(reports[0].recovered["sinks"]) == [
        "db",
        "out",
    ]
    assert _jsonl_ids(tmp_path / "out") == [1, 1, 2, 2]
    assert _run(tmp_path, cfg).recovered is None
    assert _jsonl_ids(tmp_path / "out") == [1, 1, 1, 2, 2, 2]


def test_i8_review_a_run_lacking_a_sink_of_the_committed_run_does_not_mark_it(
    tmp_path: Path,
) -> None:
    _csv(tmp_path / "in" / "a.csv", ["1,a", "2,b"])
    db = {"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t"}
    out = {"id": "out", "kind": "jsonl", "path": "out", "mode": "append"}
    cfg = _cfg([out, db])
    killed = _cli(tmp_path, cfg, "mid_publish:1")  # out published, db not yet
    assert killed.returncode == -9, killed.stderr
    without_db = _cfg([out])
    with pytest.raises(SinkError, match="which this pipeline does not have"):
        _run(tmp_path, without_db)
    rep = _run(tmp_path, cfg)  # the pipeline that committed it completes it
    assert rep.recovered is not None and rep.recovered["sinks"] == ["out", "db"]
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert sorted(r[0] for r in con.execute("SELECT id FROM t").fetchall()) == [1, 1, 2, 2]


# --------------------------------------------------- 6, 7: replay writes each record once


def test_i8_review_replay_of_a_rerun_replays_each_record_once(tmp_path: Path) -> None:
    _csv(tmp_path / "in" / "a.csv", ["1,5", "2,x", "3,7"])
    sink = [{"id": "out", "kind": "jsonl", "path": "out"}]
    src = {"kind": "csv", "path": "in/*.csv", "schema": {"id": "int64", "k": "int64"}}
    for _ in range(2):  # the same batch job, run twice (overwrite: the output is run 2's)
        assert _run(tmp_path, _cfg(sink, source=src)).dead_letters == 1
    assert len(_visible(tmp_path / "dl" / "p")) == 2
    fixed = _cfg(sink, source={**src, "schema": {"id": "int64", "k": "string"}})
    reps = replay(parse_pipeline(fixed), tmp_path / "dl" / "p", base_dir=tmp_path, progress=False)
    assert [r.rows_read for r in reps] == [1]
    assert _jsonl_ids(tmp_path / "out") == [1, 2, 3]


def test_i8_review_identical_letters_of_one_run_stay_distinct_records(tmp_path: Path) -> None:
    from sluice.runtime.replay import read_dead_letters

    folder = tmp_path / "dl"
    folder.mkdir()
    letter = {
        "step_id": "s",
        "reason": "late",
        "source": None,
        "position": None,
        "payload": '{"a":1}',
    }
    for run in ("r1", "r2"):  # two runs each rejected two identical rows without position
        (folder / f"{run}.jsonl").write_text(
            "".join(json.dumps({**letter, "run_id": run}) + "\n" for _ in range(2))
        )
    assert read_dead_letters(folder).height == 2


CONTRACT_NAME = """
name: people
version: 1.0
schema:
  - {name: id, type: int}
  - {name: name, type: string, pii: true}
"""


def test_i8_review_redacted_letters_are_refused_not_replayed(tmp_path: Path) -> None:
    (tmp_path / "contract.yaml").write_text(CONTRACT_NAME)
    _csv(tmp_path / "in" / "a.csv", ["1,Zoltan Kodaly"], header="id,name")
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("CREATE TABLE t (id BIGINT, name BIGINT)")
    cfg = _cfg(
        [{"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t"}],
        source={"kind": "csv", "path": "in/*.csv", "schema": {"id": "int64", "name": "string"}},
        steps=[{"id": "check", "contract": "contract.yaml"}],
    )
    assert _run(tmp_path, cfg).dead_letters == 1
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("DROP TABLE t")
        con.execute("CREATE TABLE t (id BIGINT, name VARCHAR)")
    reps = replay(parse_pipeline(cfg), tmp_path / "dl" / "p", base_dir=tmp_path, progress=False)
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM t").fetchone() == (0,)
    (again,) = [
        json.loads(x)
        for f in (tmp_path / "dl" / "p").glob("replay-*/*.jsonl")
        for x in f.read_text().splitlines()
    ]
    assert again["reason"] == "replay_error" and "redacted" in again["message"]
    assert sum(r.dead_letters for r in reps) == 1
    with pytest.raises(ConfigError, match="replayed before"):  # dealt with: in the ledger
        replay(parse_pipeline(cfg), tmp_path / "dl" / "p", base_dir=tmp_path, progress=False)


# ------------------------------------------------------- 8: journaled before the commit


def test_i8_review_postgres_refused_rows_survive_a_crash_after_the_commit(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    import psycopg

    table = f"{pg_schema}.t"
    with psycopg.connect(pg_dsn, autocommit=True) as con:
        con.execute(f"CREATE TABLE {table} (id bigint CHECK (id < 3), k text)")
    _csv(tmp_path / "in" / "a.csv", ["1,a", "2,b", "3,c"])
    cfg = _cfg(
        [{"id": "pg", "kind": "postgres", "dsn": pg_dsn, "table": table}], pipeline=pg_schema
    )
    # right after the commit, before the letters were journaled (old order): nothing may be lost
    first = _cli(tmp_path, cfg, "before_journal:1")
    second = _cli(tmp_path, cfg, None, "--json")
    assert second.returncode == 0, second.stderr
    letters = [json.loads(x) for f in _visible(tmp_path / "dl") for x in f.read_text().splitlines()]
    runs = {x["run_id"] for x in letters}
    assert len(letters) == 2 and len(runs) == 2 and {x["position"] for x in letters} == {2}
    if first.returncode == -9:  # the old order: the letter came from the journal at restart
        assert json.loads(second.stdout)["recovered"]["dead_letters"] == 1
    # a crash inside the transaction, after the journal: rolled forward once, letter once
    with psycopg.connect(pg_dsn, autocommit=True) as con:
        con.execute(f"TRUNCATE {table}")
    for f in _visible(tmp_path / "dl"):
        f.unlink()
    killed = _cli(tmp_path, cfg, "publish_before_commit:1")
    assert killed.returncode == -9, killed.stderr
    after = _cli(tmp_path, cfg, None, "--json")
    assert json.loads(after.stdout)["recovered"]["dead_letters"] == 1
    with psycopg.connect(pg_dsn) as con:
        ids = sorted(r[0] for r in con.execute(f"SELECT id FROM {table}").fetchall())
    assert ids == [1, 1, 2, 2]
    letters = [json.loads(x) for f in _visible(tmp_path / "dl") for x in f.read_text().splitlines()]
    assert len(letters) == 2 and {x["position"] for x in letters} == {2}


def _journal_fails(_: pa.Table) -> None:
    raise RuntimeError("the journal could not be written")


def test_i8_review_every_database_publisher_journals_before_it_commits(
    tmp_path: Path, pg_dsn: str, pg_schema: str, redis_url: str, redis_prefix: str
) -> None:
    """A journal that fails stops the publish before its commit: nothing of the epoch (and no
    marker) is visible. Proves the letters are journaled before the commit, for each sink."""
    import deltalake
    import psycopg
    import redis

    from sluice.config.models import DeltaSink, PostgresSink, RedisStreamSink
    from sluice.connectors.delta import DeltaWriter
    from sluice.connectors.postgres import PostgresWriter
    from sluice.connectors.redis_streams import RedisStreamWriter
    from sluice.plugins import JournalingPublisher

    rows = with_positions(pa.table({"id": [1, 2]}), "src", 0)
    ctx = RunContext("p", "stream-x", tmp_path)
    pg = PostgresWriter(PostgresSink(id="pg", kind="postgres", dsn=pg_dsn, table=f"{pg_schema}.t"))
    rd = RedisStreamWriter(
        RedisStreamSink(id="rd", kind="redis_stream", url=redis_url, stream=f"{redis_prefix}:o")
    )
    dl = DeltaWriter(DeltaSink(id="dt", kind="delta", path="lake"))
    for w in (pg, rd, dl):
        assert isinstance(w, JournalingPublisher)
        w.open(ctx)
        with pytest.raises(RuntimeError, match="journal"):
            w.publish_journaled(1, rows, _journal_fails)
        assert w.published_epoch() is None
        w.close()
    with psycopg.connect(pg_dsn) as con:
        assert con.execute("SELECT to_regclass(%s)", [f"{pg_schema}.t"]).fetchone() == (None,)
    assert redis.Redis.from_url(redis_url).xlen(f"{redis_prefix}:o") == 0
    assert not deltalake.DeltaTable.is_deltatable(str(tmp_path / "lake"))


# ------------------------------------------------------- 9, 10: PII follows the data


def test_i8_review_pii_lineage_follows_renames_derives_and_sql() -> None:
    from sluice.runtime.redact import pii_lineage

    cfg = parse_pipeline(
        _cfg(
            [],
            steps=[
                {"id": "r", "rename": {"name": "nm"}},
                {"id": "d", "derive": {"initial": "substr(nm, 1, 1)", "n": "id + 1"}},
                {
                    "id": "s",
                    "sql": "WITH a AS (SELECT initial AS i2, id FROM input) "
                    "SELECT id, upper(i2), i2 AS x, n * 2 AS m FROM a JOIN input USING (id)",
                },
                {
                    "id": "w",
                    "window": {"size": "1m", "time": "ts"},
                    "aggregate": {"names": "max(x)", "c": "count()"},
                },
            ],
        )
    )
    pii, _names = pii_lineage(cfg, {"name"})
    assert pii == {"name", "nm", "initial", "i2", "upper(i2)", "x", "names"}


def test_i8_review_pii_stays_out_of_report_samples_and_renamed_payloads(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(CONTRACT_NAME)
    (tmp_path / "b.yaml").write_text(
        "name: out\nversion: 1.0\nschema:\n  - {name: id, type: int}\n"
        "  - {name: full_name, type: string, pattern: '^[A-Z]+$', action: warn}\n"
    )
    _csv(tmp_path / "in" / "a.csv", ["1,Zoltan Kodaly", "2,Ilona Szabo"], header="id,name")
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        con.execute("CREATE TABLE t (id BIGINT, full_name BIGINT)")
    cfg = _cfg(
        [{"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t"}],
        source={"kind": "csv", "path": "in/*.csv", "schema": {"id": "int64", "name": "string"}},
        steps=[
            {"id": "check", "contract": "a.yaml"},
            {"id": "ren", "sql": "SELECT id, name AS full_name FROM input"},
            {"id": "outcheck", "contract": "b.yaml"},  # does not say full_name is PII
        ],
    )
    result = _cli(tmp_path, cfg)
    (report,) = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*.json")]
    letters = "".join(f.read_text() for f in _visible(tmp_path / "dl"))
    assert report["dead_letters"] == 2 and report["quality"]["outcheck"]["checks"]
    seen = result.stdout + result.stderr + json.dumps(report) + letters
    for value in ("Zoltan", "Kodaly", "Ilona", "Szabo"):
        assert value not in seen, seen
    for letter in map(json.loads, letters.splitlines()):  # PII masked, the column named
        assert json.loads(letter["payload"])["full_name"] == "<redacted>"
        assert "column 'full_name'" in letter["message"]


# --------------------------------------------- 11: a batch run is published in slices


_MEMORY_SCRIPT = """
import sys
from pathlib import Path
import pyarrow as pa
from sluice.batch import with_positions
from sluice.plugins import RunContext
from sluice.runtime.epochs import StagedEpochSink
kind, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "redis":
    from sluice.config.models import RedisStreamSink
    from sluice.connectors.redis_streams import RedisStreamWriter
    w = RedisStreamWriter(RedisStreamSink(id="o", kind="redis_stream", stream=target))
else:
    from sluice.config.models import KafkaSink
    from sluice.connectors.kafka import KafkaWriter
    brokers, topic = target.split("/")
    w = KafkaWriter(KafkaSink(id="o", kind="kafka", brokers=brokers, topic=topic))
staged = StagedEpochSink(w, Path(sys.argv[4]), RunContext("p", "batch-x", Path(sys.argv[4])))
staged.begin(1)
for start in range(0, n, 100_000):
    m = min(100_000, n - start)
    t = pa.table({"id": pa.array(range(start, start + m), pa.int64()), "v": ["x" * 40] * m})
    staged.write(with_positions(t, "in.parquet", start))
token = staged.prepare()
del t
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS")
staged.publish(1, token)
print((status("VmHWM") - before) // 1024)
staged.close()
"""


def _publish_growth_mb(kind: str, target: str, n: int, tmp_path: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, kind, target, str(n), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_i8_review_redis_publishes_a_large_run_in_bounded_memory(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    import redis

    key = f"{redis_prefix}:big"
    growth = _publish_growth_mb("redis", key, 300_000, tmp_path)
    assert redis.Redis.from_url(redis_url).xlen(key) == 300_000
    assert growth < 60, f"publishing 300k rows grew the peak RSS by {growth} MB"


def test_i8_review_redis_publish_resumes_after_a_failed_slice(
    tmp_path: Path, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from sluice.config.models import RedisStreamSink
    from sluice.connectors import redis_streams

    monkeypatch.setattr(redis_streams, "PUBLISH_SLICE_ROWS", 100)
    key = f"{redis_prefix}:out"
    cfg = RedisStreamSink(id="o", kind="redis_stream", url=redis_url, stream=key)
    w = redis_streams.RedisStreamWriter(cfg)
    w.open(RunContext("p", "batch-x", tmp_path, batch=True))
    calls = {"n": 0}
    real = w._add_slice

    def fail_third(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise redis.ConnectionError("cut")
        real(*args)

    monkeypatch.setattr(w, "_add_slice", fail_third)
    rows = with_positions(pa.table({"id": list(range(1050))}), "src", 0)
    with pytest.raises(SluiceError):
        w.publish(1, rows)
    client = redis.Redis.from_url(redis_url)
    assert client.xlen(key) == 200 and w.published_epoch() is None
    monkeypatch.setattr(w, "_add_slice", real)
    w.publish(1, rows)  # the retry adds the rest, nothing twice
    w.publish(1, rows)  # published: skipped
    ids = [json.loads(f[b"data"])["id"] for _, f in client.xrange(key)]
    assert ids == list(range(1050)) and w.published_epoch() == 1
    assert not client.exists(f"{w._marker}:partial")
    w.close()


# --------------------------------- 12: staged sources as ids; one marker per sink, not per run


def test_i8_review_staged_rows_keep_source_ids_and_the_token_names_them(tmp_path: Path) -> None:
    from sluice.batch import SOURCE_COL, source_id
    from sluice.runtime.epochs import StagedEpochSink, _read_arrow, _remap_sources

    class _Pub:
        step_id = "db"

        def open(self, ctx: RunContext) -> None: ...
        def close(self) -> None: ...
        def published_epoch(self) -> int | None:
            return None

        def publish(self, epoch: int, table: pa.Table) -> pa.Table:
            return empty_dead_letters()

    staged = StagedEpochSink(_Pub(), tmp_path, RunContext("p", "batch-x", tmp_path))
    staged.begin(1)
    staged.write(with_positions(pa.table({"a": [1, 2]}), "/data/in/a.csv", 0))
    staged.write(with_positions(pa.table({"a": [3]}), "/data/in/b.csv", 0))
    token = staged.prepare()
    table = _read_arrow(tmp_path / "db" / token["files"][0])
    assert table.schema.field(SOURCE_COL).type == pa.int32()
    assert sorted(token["sources"].values()) == ["/data/in/a.csv", "/data/in/b.csv"]
    # another process interned other ids: the names in the token map them back
    a, b = source_id("/data/in/a.csv"), source_id("/data/in/b.csv")
    shifted = table.set_column(
        table.column_names.index(SOURCE_COL), SOURCE_COL, pa.array([7, 7, 9], pa.int32())
    )
    back = _remap_sources(shifted, {"7": "/data/in/a.csv", "9": "/data/in/b.csv"})
    assert back.column(SOURCE_COL).to_pylist() == [a, a, b]


def test_i8_review_batch_runs_keep_one_marker_per_sink(
    tmp_path: Path, pg_dsn: str, pg_schema: str, redis_url: str, redis_prefix: str
) -> None:
    import psycopg
    import redis

    _csv(tmp_path / "in" / "a.csv", ["1,a"])
    stream = f"{redis_prefix}:o"
    cfg = _cfg(
        [
            {"id": "pg", "kind": "postgres", "dsn": pg_dsn, "table": f"{pg_schema}.t"},
            {"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t"},
            {"id": "rd", "kind": "redis_stream", "url": redis_url, "stream": stream},
            {"id": "dt", "kind": "delta", "path": "lake"},
        ],
        pipeline=pg_schema,
    )
    for _ in range(3):
        assert _run(tmp_path, cfg).status == "succeeded"
    with psycopg.connect(pg_dsn) as con:
        assert con.execute(
            f"SELECT count(*), max(epoch) FROM {pg_schema}.sluice_epochs"
        ).fetchone() == (1, 3)
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*), max(epoch) FROM sluice_epochs").fetchone() == (1, 3)
    client = redis.Redis.from_url(redis_url)
    assert len(list(client.scan_iter(f"{stream}:sluice-epoch:*"))) == 1 and client.xlen(stream) == 3
    app_ids = set()
    for f in (tmp_path / "lake" / "_delta_log").glob("*.json"):
        for line in f.read_text().splitlines():
            if '"txn"' in line:
                app_ids.add(json.loads(line)["txn"]["appId"])
    assert len(app_ids) == 1


# ------------------------------------------------------------------- the two noted races


class _StuckSink(MemorySink):
    def __init__(self) -> None:
        super().__init__("stuck")
        self.release = threading.Event()
        self.writing = threading.Event()

    def write(self, table: pa.Table) -> pa.Table:
        self.writing.set()
        self.release.wait(60)
        return super().write(table)


def test_i8_review_a_sink_still_writing_keeps_the_pipeline_locked(tmp_path: Path) -> None:
    _csv(tmp_path / "in" / "a.csv", ["1,a", "2,x"])
    cfg = _cfg(
        [
            {"id": "out", "kind": "jsonl", "path": "out"},
            {"id": "stuck", "kind": "jsonl", "path": "unused"},
        ],
        steps=[{"id": "t", "cast": {"k": "int"}}],
    )
    cfg["settings"]["batch_rows"] = 1
    stuck = _StuckSink()

    class _Failing(_Rows):
        def read(self) -> Iterator[Chunk]:
            yield Chunk(table=with_positions(pa.table({"id": [1], "k": ["1"]}), "mem", 0))
            stuck.writing.wait(20)
            raise RuntimeError("the source broke")

    ex = Executor(
        parse_pipeline(cfg),
        base_dir=tmp_path,
        progress=False,
        source=_Failing([], None),
        sinks={"stuck": stuck},
    )
    ex.join_timeout = 0.3
    with pytest.raises(RuntimeError, match="source broke"):
        ex.run()
    assert "still writing" in (ex.report.error or "")
    with pytest.raises(ConfigError, match="another run"):  # the stuck sink holds the lock
        _run(tmp_path, cfg)
    stuck.release.set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            rep = _run(tmp_path, cfg, sinks={"stuck": MemorySink("stuck")})
            break
        except ConfigError:
            time.sleep(0.05)
    assert rep.status == "succeeded"


def test_i8_review_two_replays_at_once_replay_each_letter_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluice.runtime import replay as replay_module

    _csv(tmp_path / "in" / "a.csv", ["1,5", "2,x"])
    sink = [{"id": "out", "kind": "jsonl", "path": "out", "mode": "append"}]
    src = {"kind": "csv", "path": "in/*.csv", "schema": {"id": "int64", "k": "int64"}}
    assert _run(tmp_path, _cfg(sink, source=src)).dead_letters == 1
    fixed = parse_pipeline(_cfg(sink, source={**src, "schema": {"id": "int64", "k": "string"}}))
    checked = threading.Barrier(2, timeout=3)
    first_done = threading.Event()
    real = replay_module._skip_replayed

    def slow_check(*args: Any) -> Any:
        left = real(*args)
        name = threading.current_thread().name
        with contextlib.suppress(threading.BrokenBarrierError):
            checked.wait()  # both replays passed the ledger check before either commits
        if name == "second":
            first_done.wait(20)
        return left

    monkeypatch.setattr(replay_module, "_skip_replayed", slow_check)
    outcome: dict[str, Any] = {}

    def go(name: str) -> None:
        try:
            outcome[name] = replay(fixed, tmp_path / "dl" / "p", base_dir=tmp_path, progress=False)
        except Exception as exc:
            outcome[name] = exc
        finally:
            if name == "first":
                first_done.set()

    threads = [threading.Thread(target=go, args=(n,), name=n) for n in ("first", "second")]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for t in threads:
        t.join(60)
    assert _jsonl_ids(tmp_path / "out") == [1, 2]
    assert isinstance(outcome["second"], SluiceError) and "another" in str(outcome["second"])


def test_i8_review_the_ledger_refuses_a_key_replayed_meanwhile(tmp_path: Path) -> None:
    from sluice.state.checkpoints import AlreadyReplayed, Checkpoint, CheckpointStore

    store = CheckpointStore(tmp_path / "s.db", table="batch_runs")
    store.save(Checkpoint(epoch=1), replayed=["k1"], run_id="a")
    with pytest.raises(AlreadyReplayed):
        store.save(Checkpoint(epoch=2), replayed=["k2", "k1"], run_id="b")
    assert store.epochs() == [1] and set(store.replayed(["k1", "k2"])) == {"k1"}
    store.close()


# ------------------------------ 13: found by routing the sink tests through the run path


def test_i8_review_a_staged_batch_of_another_type_is_a_letter_not_a_failed_publish(
    tmp_path: Path,
) -> None:
    """Two files whose column types differ reach a staged sink as batches of different
    schemas: the batch that cannot be merged becomes sink_rejected letters (as a sink's schema
    check does), instead of the publish of the committed run failing at every start."""
    _csv(tmp_path / "in" / "a.csv", ["1,a", "2,b"])
    _csv(tmp_path / "in" / "b.csv", ["x,c"])
    cfg = _cfg(
        [{"id": "db", "kind": "duckdb", "path": "w.duckdb", "table": "t"}],
        source={"kind": "csv", "path": "in/*.csv"},
    )
    rep = _run(tmp_path, cfg)
    assert rep.status == "succeeded" and rep.dead_letters_by_reason == {"sink_rejected": 1}
    (letter,) = [
        json.loads(x) for f in _visible(tmp_path / "dl" / "p") for x in f.read_text().splitlines()
    ]
    assert letter["source"].endswith("b.csv") and "'id'" in letter["message"]
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert sorted(r[0] for r in con.execute("SELECT id FROM t").fetchall()) == [1, 2]
    assert _run(tmp_path, cfg).recovered is None
