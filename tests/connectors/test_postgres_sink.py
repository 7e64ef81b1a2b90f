"""PostgreSQL sink against the real server (fixture pg_schema: a fresh schema per test).

Runs go through the runtime's epoch adapter (:class:`run_path.RunPath`: rows staged on disk,
then published in one transaction with the run's marker, in slices), as ``sluice run`` drives
the sink; the writer's own batch-sink calls (``write``/``commit``) are no longer used by runs
(kept until issue 9 removes them)."""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

psycopg = pytest.importorskip("psycopg")

from run_path import RunPath  # noqa: E402

from sluice.batch import with_positions  # noqa: E402
from sluice.config.models import PostgresSink  # noqa: E402
from sluice.connectors.postgres import PostgresWriter, pg_type  # noqa: E402
from sluice.errors import ConfigError, SinkError, TransientError  # noqa: E402
from sluice.plugins import RunContext, Sink  # noqa: E402

pytestmark = pytest.mark.integration

UTC = dt.UTC


def orders(start: int, n: int) -> pa.Table:
    ids = range(start, start + n)
    t = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "amount": pa.array(
                [None if i % 7 == 3 else decimal.Decimal(i) / 100 for i in ids],
                pa.decimal128(12, 2),
            ),
            "ratio": pa.array([i / 3 for i in ids], pa.float64()),
            "paid": [i % 2 == 0 for i in ids],
            "day": pa.array([dt.date(2024, 1, 1) + dt.timedelta(days=i % 300) for i in ids]),
            "at": pa.array(
                [
                    dt.datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC) + dt.timedelta(hours=i)
                    for i in ids
                ],
                pa.timestamp("us", tz="UTC"),
            ),
            "local": pa.array([dt.datetime(2024, 3, 1, 8, 30) for _ in ids], pa.timestamp("us")),
            "note": [
                [None, "", "a,b", 'say "hi"', "line\nbreak", "ünïcødé ✓", "tab\tx", "\\N"][i % 8]
                for i in ids
            ],
        }
    )
    return with_positions(t, "orders.csv", start)


def sink(dsn: str, schema: str, **kw: object) -> PostgresWriter:
    cfg = {"id": "pg", "kind": "postgres", "dsn": dsn, "table": f"{schema}.orders", **kw}
    return PostgresWriter(PostgresSink.model_validate(cfg))


def fetch(dsn: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        rows: list[tuple[object, ...]] = conn.execute(sql).fetchall()
        return rows


def ctx(tmp_path: Path, run_id: str = "r1") -> RunContext:
    return RunContext("p", run_id, tmp_path)


def start(w: PostgresWriter, tmp_path: Path, run_id: str = "r1") -> RunPath:
    """A batch run of ``w`` as the runtime drives it, opened."""
    rp = RunPath(w, w.config)
    rp.open(ctx(tmp_path, run_id))
    return rp


def run(w: PostgresWriter, tmp_path: Path, *batches: pa.Table, run_id: str = "r1") -> pa.Table:
    """One batch run: stage the batches, publish; returns every dead letter of the run."""
    rp = start(w, tmp_path, run_id)
    for b in batches:
        rp.write(b)
    rp.commit()
    return rp.dead()


def test_type_mapping() -> None:
    assert pg_type(pa.int64()) == "bigint"
    assert pg_type(pa.float64()) == "double precision"
    assert pg_type(pa.string()) == "text"
    assert pg_type(pa.bool_()) == "boolean"
    assert pg_type(pa.date32()) == "date"
    assert pg_type(pa.timestamp("us")) == "timestamp"
    assert pg_type(pa.timestamp("us", tz="UTC")) == "timestamptz"
    assert pg_type(pa.decimal128(12, 2)) == "numeric(12,2)"
    assert pg_type(pa.list_(pa.int64())) == "text"


def test_append_and_read_back(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    w = sink(pg_dsn, pg_schema)
    assert isinstance(w, Sink)
    assert run(w, tmp_path, *(orders(first, 40) for first in (0, 40, 80))).num_rows == 0
    columns = fetch(
        pg_dsn,
        "SELECT column_name, data_type FROM information_schema.columns "
        f"WHERE table_schema = '{pg_schema}' AND table_name = 'orders'",
    )
    types = {r[0]: r[1] for r in columns}
    assert types == {
        "id": "bigint",
        "amount": "numeric",
        "ratio": "double precision",
        "paid": "boolean",
        "day": "date",
        "at": "timestamp with time zone",
        "local": "timestamp without time zone",
        "note": "text",
    }
    got = fetch(pg_dsn, f'SELECT * FROM "{pg_schema}".orders ORDER BY id')
    expected = pa.concat_tables([orders(s, 40) for s in (0, 40, 80)]).drop_columns(
        ["__sluice_source", "__sluice_row"]
    )
    assert got == [tuple(r.values()) for r in expected.to_pylist()]
    assert any(r[7] == "" for r in got) and any(r[7] is None for r in got)  # '' vs NULL kept


def test_upsert_updates_existing_rows(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    first = pa.table({"id": [1, 2, 3], "v": ["a", "b", "c"]})
    run(sink(pg_dsn, pg_schema, mode="upsert", key=["id"]), tmp_path, first)
    # duplicate keys inside one run: the last one wins; a null key is a dead letter
    dead = run(
        sink(pg_dsn, pg_schema, mode="upsert", key=["id"]),
        tmp_path,
        pa.table({"id": [2, 4, 2, None], "v": ["x", "d", "y", "z"]}),
        pa.table({"v": ["w"], "id": [3]}),
        run_id="r2",
    )
    assert dead.num_rows == 1 and "null" in dead["message"][0].as_py()
    assert fetch(pg_dsn, f'SELECT id, v FROM "{pg_schema}".orders ORDER BY id') == [
        (1, "a"),
        (2, "y"),
        (3, "w"),
        (4, "d"),
    ]


def test_upsert_needs_a_unique_key(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{pg_schema}".orders (id bigint, v text)')
    w = sink(pg_dsn, pg_schema, mode="upsert", key=["id"])
    with pytest.raises(SinkError, match="unique") as info:
        w.open(ctx(tmp_path))
    assert info.value.fix and "CREATE UNIQUE INDEX" in info.value.fix
    with pytest.raises(ConfigError, match="key"):
        sink(pg_dsn, pg_schema, mode="upsert")


def test_check_constraint_rejects_exactly_the_bad_rows(
    pg_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE "{pg_schema}".orders (id bigint NOT NULL, qty integer '
            "CONSTRAINT qty_positive CHECK (qty > 0))"
        )
    qty = [1 + i % 50 for i in range(1000)]
    bad = [17, 500, 999]
    for i in bad:
        qty[i] = -5
    t = with_positions(pa.table({"id": list(range(1000)), "qty": qty}), "in.csv", 0)
    dead = run(sink(pg_dsn, pg_schema, create=False), tmp_path, t)
    assert dead.num_rows == 3
    assert dead["position"].to_pylist() == bad
    assert set(dead["reason"].to_pylist()) == {"sink_rejected"}
    assert all("qty_positive" in m for m in dead["message"].to_pylist())
    assert dead["payload"][0].as_py() == '{"id":17,"qty":-5}'
    assert fetch(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".orders') == [(997,)]
    ids = {r[0] for r in fetch(pg_dsn, f'SELECT id FROM "{pg_schema}".orders')}
    assert ids == set(range(1000)) - set(bad)


def test_value_out_of_range_is_a_dead_letter(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{pg_schema}".orders (id smallint, s text NOT NULL)')
    t = pa.table({"id": [1, 70000, 3, 4], "s": ["a", "b", None, "nul\x00"]})
    dead = run(sink(pg_dsn, pg_schema, create=False), tmp_path, t)
    assert dead.num_rows == 3
    assert fetch(pg_dsn, f'SELECT id, s FROM "{pg_schema}".orders') == [(1, "a")]


def test_abort_leaves_the_table_empty(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{pg_schema}".orders (id bigint, v text)')
    rp = start(sink(pg_dsn, pg_schema), tmp_path)
    rp.write(pa.table({"id": [1, 2], "v": ["a", "b"]}))
    rp.abort()
    assert fetch(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".orders') == [(0,)]
    # a table the run would have created is not created either
    rp = start(sink(pg_dsn, pg_schema, table=f"{pg_schema}.fresh"), tmp_path)
    rp.write(pa.table({"id": [1]}))
    rp.abort()
    assert fetch(pg_dsn, f"SELECT to_regclass('\"{pg_schema}\".fresh')") == [(None,)]


def test_missing_table_without_create(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="does not exist"):
        sink(pg_dsn, pg_schema, create=False).open(ctx(tmp_path))


def test_unknown_column_is_rejected(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{pg_schema}".orders (id bigint)')
    dead = run(sink(pg_dsn, pg_schema), tmp_path, pa.table({"id": [1], "extra": ["x"]}))
    assert dead.num_rows == 1 and "extra" in dead["message"][0].as_py()


def _terminate(dsn: str, w: PostgresWriter) -> None:
    """Kill exactly the sink's server process from another connection (not other sessions)."""
    assert w._conn is not None
    pid = w._conn.info.backend_pid
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)


def test_connection_loss_before_the_publish_is_transient(
    pg_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    w = sink(pg_dsn, pg_schema)
    rp = start(w, tmp_path)
    rp.write(orders(0, 5))  # staged
    w.published_epoch()
    _terminate(pg_dsn, w)
    with pytest.raises(TransientError):
        w.published_epoch()  # what the publish meets first
    # the runtime retries the publish: the sink reconnects
    assert rp.commit().num_rows == 0
    assert fetch(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".orders') == [(5,)]


def test_connection_loss_inside_the_publish_rolls_it_back_and_the_retry_writes_once(
    pg_dsn: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = sink(pg_dsn, pg_schema)
    rp = start(w, tmp_path)
    for first in (0, 5):
        rp.write(orders(first, 5))
    real = w._write
    calls: list[int] = []

    def cut_after_first_slice(table: pa.Table, data: pa.Table) -> pa.Table:
        calls.append(data.num_rows)
        out = real(table, data)
        if len(calls) == 1:
            _terminate(pg_dsn, w)  # the session dies with rows of the run written
        return out

    monkeypatch.setattr(w, "_write", cut_after_first_slice)
    monkeypatch.setattr("sluice.connectors.postgres.PUBLISH_SLICE_ROWS", 5)
    assert rp.commit().num_rows == 0  # the first attempt lost its transaction; retried
    assert len(calls) >= 3
    got = fetch(pg_dsn, f'SELECT id FROM "{pg_schema}".orders ORDER BY id')
    assert [r[0] for r in got] == list(range(10))  # the run once, nothing of the lost attempt


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    values=st.lists(
        st.one_of(
            st.none(),
            st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=("Cs",))),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_any_text_round_trips_through_copy(
    pg_dsn: str, pg_schema: str, tmp_path: Path, values: list[str | None]
) -> None:
    name = f"t_{uuid.uuid4().hex[:8]}"
    w = sink(pg_dsn, pg_schema, table=f"{pg_schema}.{name}")
    t = pa.table({"i": list(range(len(values))), "s": pa.array(values, pa.string())})
    assert run(w, tmp_path, t, run_id=name).num_rows == 0
    got = fetch(pg_dsn, f'SELECT s FROM "{pg_schema}"."{name}" ORDER BY i')
    assert [r[0] for r in got] == values


# ------------------------------------------------------------------------------ issue 8, 26


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(st.tuples(st.integers(0, 6), st.integers(-2, 9)), min_size=1, max_size=60),
    cuts=st.lists(st.integers(1, 59), max_size=5),
    batch_rows=st.integers(1, 64),
    slice_rows=st.integers(1, 70),
)
def test_i8_26_upsert_last_row_wins_in_input_order_whatever_the_cuts(
    pg_dsn: str,
    pg_schema: str,
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[int, int]],
    cuts: list[int],
    batch_rows: int,
    slice_rows: int,
) -> None:
    """A batch run with mode: upsert over input with repeated keys, cut into files at random
    points, into batches of a random size, and published (the run is one epoch) in slices of a
    random size: the table holds, per key, the last row in input order that the table accepts
    (CHECK v >= 0), and every refused row is a dead letter — the same whatever the cuts, also
    when a refused row is superseded by a later one."""
    from unittest import mock

    from sluice.config.loader import parse_pipeline
    from sluice.connectors import postgres
    from sluice.runtime.executor import Executor

    tmp = tmp_path_factory.mktemp("upsert")
    table = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE "{pg_schema}"."{table}" (k bigint PRIMARY KEY, v bigint, '
            "seq bigint, CHECK (v >= 0))"
        )
    lines = [f"{k},{v},{i}" for i, (k, v) in enumerate(rows)]
    bounds = sorted({0, len(lines), *(c for c in cuts if c < len(lines))})
    for n, (a, b) in enumerate(itertools.pairwise(bounds)):
        (tmp / f"in-{n:03d}.csv").write_text("k,v,seq\n" + "\n".join(lines[a:b]) + "\n")
    cfg = parse_pipeline(
        {
            "pipeline": "upsert_cuts",
            "source": {
                "kind": "csv",
                "path": str(tmp / "in-*.csv"),
                "schema": {"k": "int64", "v": "int64", "seq": "int64"},
            },
            "sinks": [
                {
                    "id": "db",
                    "kind": "postgres",
                    "dsn": pg_dsn,
                    "table": f"{pg_schema}.{table}",
                    "mode": "upsert",
                    "key": ["k"],
                }
            ],
            "dead_letter": {"path": str(tmp / "dead")},
            "settings": {"batch_rows": batch_rows},
        }
    )
    with mock.patch.object(postgres, "PUBLISH_SLICE_ROWS", slice_rows):
        rep = Executor(cfg, base_dir=tmp, progress=False).run()
    assert rep.status == "succeeded"
    expect: dict[int, tuple[int, int]] = {}
    for i, (k, v) in enumerate(rows):
        if v >= 0:
            expect[k] = (v, i)
    got = fetch(pg_dsn, f'SELECT k, v, seq FROM "{pg_schema}"."{table}" ORDER BY k')
    assert got == [(k, *expect[k]) for k in sorted(expect)]
    assert rep.dead_letters == sum(1 for _, v in rows if v < 0)
