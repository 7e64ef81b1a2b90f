"""One conformance suite run against every built-in sink, driven the way a run drives it.

Every sink goes through the runtime's epoch adapter (:class:`run_path.RunPath`): file sinks
write parts under temporary names renamed at publish; database and broker sinks have the run's
rows staged on disk and then published with the run's marker. Every sink must: write all rows
of a run exactly once (order kept where the format keeps order: files, DuckDB, Redis), show
nothing after an aborted run, accept a batch whose columns come in another order, accept 0-row
batches, and turn a batch it cannot take into dead letters (at write for files, at publish
for staged sinks: the run's letters are both).

Retry contract (PostgreSQL): when the connection is lost, the publish raises
:class:`~sluice.errors.TransientError` (its transaction rolled back); the runtime retries the
publish (with backoff) and the sink reconnects. See ``test_postgres_connection_loss_is_transient``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from run_path import RunPath

from sluice.batch import with_positions
from sluice.plugins import RunContext, Sink, lookup

Row = dict[str, Any]


@dataclass
class Case:
    sink: RunPath
    read: Callable[[], list[Row] | None]  # None: nothing visible
    ordered: bool


def _visible(root: Path) -> list[Path]:
    if not root.exists():
        return []
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _files(root: Path, load: Callable[[Path], list[Row]]) -> Callable[[], list[Row] | None]:
    def read() -> list[Row] | None:
        files = _visible(root)
        return [r for f in files for r in load(f)] if files else None

    return read


def _parquet(f: Path) -> list[Row]:
    rows: list[Row] = pq.read_table(f).to_pylist()
    return rows


def _csv(f: Path) -> list[Row]:
    opts = pa_csv.ConvertOptions(
        strings_can_be_null=True,
        column_types={"id": pa.int64(), "name": pa.string(), "amount": pa.float64()},
    )
    rows: list[Row] = pa_csv.read_csv(f, convert_options=opts).to_pylist()
    return rows


def _jsonl(f: Path) -> list[Row]:
    return [json.loads(line) for line in f.read_text().splitlines()]


def _build(kind: str, config: dict[str, Any]) -> RunPath:
    from sluice.config.models import PipelineConfig

    pipeline = PipelineConfig.model_validate(
        {"pipeline": "p", "source": {"kind": "csv", "path": "x.csv"}, "sinks": [config]}
    )
    sink: Sink = lookup("sink", kind)(pipeline.sinks[0])
    assert isinstance(sink, Sink)
    return RunPath(sink, pipeline.sinks[0])


def make_case(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Case:
    base = {"id": "out"}
    if name == "parquet_dir":
        sink = _build("parquet", {**base, "kind": "parquet", "path": "out", "rows_per_file": 7})
        return Case(sink, _files(tmp_path / "out", _parquet), True)
    if name == "parquet_file":
        sink = _build("parquet", {**base, "kind": "parquet", "path": "o.parquet"})
        return Case(sink, _files(tmp_path / "o.parquet", _parquet), True)
    if name == "csv":
        sink = _build("csv", {**base, "kind": "csv", "path": "out"})
        return Case(sink, _files(tmp_path / "out", _csv), True)
    if name == "jsonl":
        sink = _build("jsonl", {**base, "kind": "jsonl", "path": "o.jsonl"})
        return Case(sink, _files(tmp_path / "o.jsonl", _jsonl), True)
    if name == "delta":
        deltalake = pytest.importorskip("deltalake")
        sink = _build("delta", {**base, "kind": "delta", "path": "lake"})

        def read_delta() -> list[Row] | None:
            if not deltalake.DeltaTable.is_deltatable(str(tmp_path / "lake")):
                return None
            rows: list[Row] = (
                deltalake.DeltaTable(str(tmp_path / "lake")).to_pyarrow_table().to_pylist()
            )
            return rows

        return Case(sink, read_delta, False)
    if name == "duckdb":
        sink = _build("duckdb", {**base, "kind": "duckdb", "path": "w.duckdb", "table": "t"})

        def read_duckdb() -> list[Row] | None:
            if not (tmp_path / "w.duckdb").exists():
                return None
            with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
                if not con.execute(
                    "SELECT count(*) FROM duckdb_tables() WHERE table_name='t'"
                ).fetchall()[0][0]:
                    return None
                rows: list[Row] = con.sql("SELECT * FROM t").to_arrow_table().to_pylist()
                return rows

        return Case(sink, read_duckdb, True)
    if name == "postgres":
        psycopg = pytest.importorskip("psycopg")
        dsn: str = request.getfixturevalue("pg_dsn")
        schema: str = request.getfixturevalue("pg_schema")
        sink = _build("postgres", {**base, "kind": "postgres", "dsn": dsn, "table": f"{schema}.t"})

        def read_pg() -> list[Row] | None:
            with psycopg.connect(dsn) as conn:
                exists = conn.execute("SELECT to_regclass(%s)", [f'"{schema}".t']).fetchone()
                if exists is None or exists[0] is None:
                    return None
                cur = conn.execute(f'SELECT * FROM "{schema}".t')
                names = [d.name for d in cur.description or []]
                return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

        return Case(sink, read_pg, False)
    if name == "redis_stream":
        import redis

        url: str = request.getfixturevalue("redis_url")
        key = f"{request.getfixturevalue('redis_prefix')}:out"
        sink = _build("redis_stream", {**base, "kind": "redis_stream", "url": url, "stream": key})

        def read_redis() -> list[Row] | None:
            client = redis.Redis.from_url(url)
            try:
                entries = client.xrange(key)
            finally:
                client.close()
            return [json.loads(fields[b"data"]) for _, fields in entries] if entries else None

        return Case(sink, read_redis, True)
    raise AssertionError(name)


# Kafka's sink is not here (reading a topic back needs a consumer group join per check);
# tests/connectors/test_kafka.py runs it through the same run path against a real broker.
SINKS = [
    "parquet_dir",
    "parquet_file",
    "csv",
    "jsonl",
    "delta",
    "duckdb",
    "postgres",
    "redis_stream",
]


@pytest.fixture(params=SINKS)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    return make_case(request.param, tmp_path, request)


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    return RunContext("p", "run1", tmp_path)


def batch(start: int, n: int) -> pa.Table:
    ids = list(range(start, start + n))
    t = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "name": [f'name {i}, "q"' for i in ids],
            "amount": pa.array([None if i % 5 == 0 else i * 1.25 for i in ids], pa.float64()),
        }
    )
    return with_positions(t, "src.csv", start)


def expected(*batches: pa.Table) -> list[Row]:
    rows: list[Row] = []
    for b in batches:
        rows += b.drop_columns(["__sluice_source", "__sluice_row"]).to_pylist()
    return rows


def check(case: Case, want: list[Row]) -> None:
    got = case.read()
    assert got is not None
    got = [{k: r[k] for k in ("id", "name", "amount")} for r in got]
    if not case.ordered:
        got.sort(key=lambda r: r["id"])
        want = sorted(want, key=lambda r: r["id"])
    assert got == want


def test_sink_roundtrip(case: Case, ctx: RunContext) -> None:
    sink = case.sink
    assert sink.step_id == "out"
    sink.open(ctx)
    batches = [batch(0, 10), batch(10, 25), batch(35, 3)]
    for b in batches:
        assert sink.write(b).num_rows == 0
    sink.commit()
    check(case, expected(*batches))


def test_sink_abort_leaves_nothing(case: Case, ctx: RunContext) -> None:
    case.sink.open(ctx)
    case.sink.write(batch(0, 10))
    case.sink.write(batch(10, 10))
    case.sink.abort()
    assert case.read() is None


def test_sink_reordered_columns(case: Case, ctx: RunContext) -> None:
    case.sink.open(ctx)
    first, second = batch(0, 4), batch(4, 4)
    second = second.select(["amount", "__sluice_row", "name", "id", "__sluice_source"])
    assert case.sink.write(first).num_rows == 0
    assert case.sink.write(second).num_rows == 0
    case.sink.commit()
    check(case, expected(first, batch(4, 4)))


def test_sink_empty_batches(case: Case, ctx: RunContext) -> None:
    case.sink.open(ctx)
    assert case.sink.write(batch(0, 0)).num_rows == 0
    assert case.sink.write(batch(0, 6)).num_rows == 0
    assert case.sink.write(batch(6, 0)).num_rows == 0
    case.sink.commit()
    check(case, expected(batch(0, 6)))


def test_sink_incompatible_batch_is_dead_lettered(case: Case, ctx: RunContext) -> None:
    case.sink.open(ctx)
    case.sink.write(batch(0, 3))
    bad = batch(3, 2).set_column(0, "id", pa.array(["x", "y"]))
    case.sink.write(bad)
    case.sink.commit()
    dead = case.sink.dead()  # refused at write (files) or at publish (staged sinks)
    assert dead.num_rows == 2
    assert dead["reason"].to_pylist() == ["sink_rejected"] * 2
    assert "'id'" in dead["message"][0].as_py()
    assert dead["position"].to_pylist() == [3, 4]
    check(case, expected(batch(0, 3)))


@pytest.mark.integration
def test_postgres_connection_loss_is_transient(
    tmp_path: Path, ctx: RunContext, request: pytest.FixtureRequest
) -> None:
    import psycopg

    from sluice.connectors.postgres import PostgresWriter

    case = make_case("postgres", tmp_path, request)
    case.sink.open(ctx)
    assert case.sink.write(batch(0, 5)).num_rows == 0  # staged
    sink = case.sink.sink
    assert isinstance(sink, PostgresWriter)
    sink.published_epoch()  # connected
    assert sink._conn is not None
    pid = sink._conn.info.backend_pid  # kill exactly this sink's session, from another one
    with psycopg.connect(request.getfixturevalue("pg_dsn"), autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
    attempts: list[str] = []
    real = sink.published_epoch

    def counted() -> int | None:
        attempts.append("try")
        return real()

    sink.published_epoch = counted  # type: ignore[method-assign]
    # the first publish attempt meets the dead session (TransientError), the runtime's retry
    # reconnects: the run's rows once
    assert case.sink.commit().num_rows == 0
    assert len(attempts) == 2
    check(case, expected(batch(0, 5)))


def _invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding exactly these bytes (Arrow does not check them on creation)."""
    import numpy as np

    offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(),
        len(values),
        [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))],
    )


def test_i8_10_sink_never_writes_invalid_utf8(case: Case, ctx: RunContext) -> None:
    """Every sink goes through the shared SchemaAligner: a row holding a string that is not
    valid UTF-8 becomes an ``encoding`` dead letter (bytes shown escaped), the other rows of
    the batch are written, and the output holds valid strings only."""
    case.sink.open(ctx)
    first = batch(0, 3)
    second = batch(3, 3)
    second = second.set_column(1, "name", _invalid_utf8([b"fine", b"bad \xff\xfe", b"ok"]))
    assert case.sink.write(first).num_rows == 0
    dead = case.sink.write(second)
    if dead.num_rows == 0:
        case.sink.abort()
    assert dead["reason"].to_pylist() == ["encoding"]
    assert dead["position"].to_pylist() == [4]
    assert "'name'" in dead["message"][0].as_py()
    assert "bad \\\\xff\\\\xfe" in dead["payload"][0].as_py()
    case.sink.commit()
    kept = second.filter(pa.array([True, False, True]))
    kept = kept.set_column(1, "name", pa.array(["fine", "ok"]))
    check(case, expected(first, kept))
