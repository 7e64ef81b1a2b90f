"""The local executor: accounting, dead letters, retries, failure handling, backpressure."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sluice
from sluice.batch import empty_dead_letters, strip_positions, with_positions
from sluice.config import parse_pipeline
from sluice.errors import StepError
from sluice.plugins import Chunk, RunContext
from sluice.runtime.executor import Executor
from sluice.testing import FlakySink, MemorySink, MemorySource


def _cfg(
    tmp_path: Path, steps: list[dict[str, object]], **settings: object
) -> sluice.PipelineConfig:
    return parse_pipeline(
        {
            "pipeline": "t",
            "source": {"kind": "csv", "path": "unused.csv"},
            "steps": steps,
            "sinks": [{"id": "out", "kind": "jsonl", "path": "unused"}],
            "dead_letter": {"kind": "jsonl", "path": str(tmp_path / "dl")},
            "settings": {"report_dir": str(tmp_path / "runs"), "retry_backoff": 0, **settings},
        }
    )


def _run(
    tmp_path: Path,
    steps: list[dict[str, object]],
    tables: list[pa.Table],
    sink: MemorySink | None = None,
    **settings: object,
) -> tuple[sluice.RunReport, MemorySink]:
    sink = sink or MemorySink("out")
    ex = Executor(
        _cfg(tmp_path, steps, **settings),
        base_dir=tmp_path,
        progress=False,
        source=MemorySource(tables),
        sinks={"out": sink},
    )
    return ex.run(), sink


def _dead_letters(rep: sluice.RunReport) -> list[dict[str, object]]:
    if not rep.dead_letter_path:
        return []
    lines = Path(rep.dead_letter_path).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_counts_balance_and_dead_letters_carry_positions(tmp_path: Path) -> None:
    t = pa.table({"id": ["1", "2", "x", "4", "5", "5"], "amount": ["10", "-1", "3", "y", "7", "7"]})
    steps = [
        {"id": "types", "cast": {"id": "int", "amount": "float"}},
        {"id": "positive", "filter": "amount > 0"},
        {"id": "unique", "deduplicate": {"key": ["id"]}},
    ]
    rep, sink = _run(tmp_path, steps, [t])
    assert rep.status == "succeeded" and rep.balanced
    assert sink.table().column("id").to_pylist() == [1, 5]
    s = {x.step_id: x for x in rep.steps}
    assert (s["types"].rows_in, s["types"].rows_out, s["types"].dead) == (6, 4, 2)
    assert (s["positive"].rows_out, s["positive"].filtered) == (3, 1)
    assert (s["unique"].rows_out, s["unique"].filtered) == (2, 1)
    assert (s["out"].rows_in, s["out"].rows_out) == (2, 2)
    letters = _dead_letters(rep)
    assert sorted(d["position"] for d in letters) == [2, 3]
    assert {d["reason"] for d in letters} == {"cast_error"}
    assert all(d["pipeline"] == "t" and d["run_id"] == rep.run_id for d in letters)
    assert all(d["step_id"] == "types" and d["source"] == "memory" for d in letters)
    report = json.loads((tmp_path / "runs" / f"{rep.run_id}.json").read_text())
    assert report["balanced"] is True and report["dead_letters"] == 2


def test_no_dead_letter_file_when_there_are_none(tmp_path: Path) -> None:
    rep, _ = _run(tmp_path, [], [pa.table({"a": [1, 2]})])
    assert rep.dead_letters == 0 and rep.dead_letter_path is None
    assert not (tmp_path / "dl").exists()


def test_branch_and_merge(tmp_path: Path) -> None:
    t = pa.table({"a": list(range(10))})
    steps = [
        {"id": "small", "from": "source", "filter": "a < 3"},
        {"id": "big", "from": "source", "filter": "a >= 8"},
        {"id": "both", "from": ["small", "big"], "derive": {"b": "a * 10"}},
    ]
    rep, sink = _run(tmp_path, steps, [t])
    assert sorted(sink.table().column("b").to_pylist()) == [0, 10, 20, 80, 90]
    assert rep.step("both").rows_in == 5 and rep.balanced


rows = st.lists(
    st.one_of(
        st.integers(-1000, 1000).map(str),  # good (maybe filtered when negative)
        st.sampled_from(["", "abc", "1.5.2", "--3"]),  # bad casts or nulls
    ),
    min_size=0,
    max_size=300,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=rows, batch=st.integers(1, 50))
def test_conservation_law_holds_for_any_mix(tmp_path: Path, data: list[str], batch: int) -> None:
    """in = out + dead + filtered, per step and end to end, over random good/bad rows."""
    tables = [
        pa.table(
            {
                "v": data[i : i + batch],
                "k": [str(j % 7) for j in range(i, i + len(data[i : i + batch]))],
            }
        )
        for i in range(0, len(data), batch)
    ] or [pa.table({"v": pa.array([], pa.string()), "k": pa.array([], pa.string())})]
    steps = [
        {"id": "types", "cast": {"v": "int"}},
        {"id": "nonneg", "filter": "v >= 0"},
        {"id": "unique", "deduplicate": {"key": ["v"]}},
    ]
    rep, sink = _run(tmp_path, steps, tables, batch_rows=batch)
    assert rep.balanced
    bad = sum(1 for x in data if x in ("abc", "1.5.2", "--3"))
    good = [int(x) for x in data if x not in ("", "abc", "1.5.2", "--3")]
    expected = list(dict.fromkeys(v for v in good if v >= 0))
    got = sink.table().column("v").to_pylist() if sink.committed else []
    assert got == expected
    total_filtered = sum(s.filtered for s in rep.steps)
    assert len(got) + rep.dead_letters + total_filtered == len(data)
    assert rep.dead_letters == bad


def test_transient_sink_failures_are_retried_and_deliver_once(tmp_path: Path) -> None:
    tables = [pa.table({"id": list(range(i * 10, i * 10 + 10))}) for i in range(50)]
    sink = FlakySink("out", transient_rate=0.3, seed=1)
    rep, _ = _run(tmp_path, [], tables, sink=sink, retry_attempts=20, batch_rows=1)
    assert sink.transient_failures > 0
    assert sorted(sink.table().column("id").to_pylist()) == list(range(500))
    assert rep.dead_letters == 0


def test_permanent_sink_failures_become_dead_letters_and_the_rest_flows(tmp_path: Path) -> None:
    tables = [pa.table({"id": list(range(i * 10, i * 10 + 10))}) for i in range(10)]
    sink = FlakySink("out", column="id", poison=[35])
    rep, _ = _run(tmp_path, [], tables, sink=sink, batch_rows=1)
    assert sorted(sink.table().column("id").to_pylist()) == [
        i for i in range(100) if not 30 <= i < 40
    ]
    letters = _dead_letters(rep)
    assert sorted(json.loads(d["payload"])["id"] for d in letters) == list(range(30, 40))
    assert {d["reason"] for d in letters} == {"sink_rejected"} and rep.step("out").dead == 10
    assert rep.balanced


def test_step_error_aborts_sinks_but_keeps_dead_letters(tmp_path: Path) -> None:
    t1 = pa.table({"a": ["1", "x"]})
    t2 = pa.table({"b": ["2"]})  # second batch lacks column 'a': the cast step fails
    sink = MemorySink("out")
    with pytest.raises(StepError, match=r"step 'types'.*'a'"):
        _run(tmp_path, [{"id": "types", "cast": {"a": "int"}}], [t1, t2], sink=sink, batch_rows=1)
    assert sink.aborted and not sink.committed
    letters = list((tmp_path / "dl").glob("*.jsonl"))
    assert len(letters) == 1 and "cast_error" in letters[0].read_text()
    report = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert report["status"] == "failed" and "types" in report["error"]


class _CountingSource:
    step_id = "source"

    def __init__(self) -> None:
        self.produced = 0

    def open(self, ctx: RunContext) -> None: ...

    def read(self) -> Iterator[Chunk]:
        for i in range(200):
            self.produced += 1
            yield Chunk(table=with_positions(pa.table({"i": [i]}), "count", i))

    def size_hint(self) -> int | None:
        return None

    def close(self) -> None: ...


class _BlockedSink(MemorySink):
    def __init__(self) -> None:
        super().__init__("out")
        self.release = threading.Event()

    def write(self, table: pa.Table) -> pa.Table:
        self.release.wait(10)
        self.pending.append(strip_positions(table))
        return empty_dead_letters()


def test_backpressure_bounds_what_the_reader_runs_ahead(tmp_path: Path) -> None:
    src = _CountingSource()
    sink = _BlockedSink()
    ex = Executor(
        _cfg(tmp_path, [], batch_rows=1, queue_size=2),
        base_dir=tmp_path,
        progress=False,
        source=src,
        sinks={"out": sink},
    )
    result: list[sluice.RunReport] = []
    th = threading.Thread(target=lambda: result.append(ex.run()))
    th.start()
    time.sleep(0.5)
    # reader queue (2) + the batch in the main thread + sink queue (2) + the batch in write + slack
    assert src.produced <= 8
    sink.release.set()
    th.join(20)
    assert result and result[0].rows_read == 200 and sink.table().num_rows == 200


def test_a_source_that_cannot_open_reports_its_own_error(tmp_path: Path) -> None:
    cfg = parse_pipeline(
        {
            "pipeline": "t",
            "source": {"kind": "csv", "path": "missing/*.csv"},
            "sinks": [{"id": "out", "kind": "parquet", "path": "out"}],
            "settings": {"report_dir": str(tmp_path / "runs")},
        }
    )
    with pytest.raises(sluice.SourceError, match=r"source 'source'.*missing/\*\.csv"):
        Executor(cfg, base_dir=tmp_path, progress=False).run()
    report = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert report["status"] == "failed" and "missing" in report["error"]


class _BrokenSink(MemorySink):
    def write(self, table: pa.Table) -> pa.Table:
        raise OSError("disk full")


class _SlowSource(_CountingSource):
    def read(self) -> Iterator[Chunk]:
        for i in range(50):
            time.sleep(0.02)  # the reader is the bottleneck: the main thread waits on it
            yield Chunk(table=with_positions(pa.table({"i": [i]}), "slow", i))


def test_a_failing_sink_stops_the_run_instead_of_hanging(tmp_path: Path) -> None:
    ex = Executor(
        _cfg(tmp_path, [], batch_rows=1),
        base_dir=tmp_path,
        progress=False,
        source=_SlowSource(),
        sinks={"out": _BrokenSink("out")},
    )
    result: list[BaseException] = []

    def target() -> None:
        try:
            ex.run()
        except BaseException as exc:
            result.append(exc)

    th = threading.Thread(target=target)
    th.start()
    th.join(20)
    assert not th.is_alive(), "the run hung"
    assert result and isinstance(result[0], OSError) and "disk full" in str(result[0])


def test_a_step_that_duplicates_rows_shows_as_unbalanced() -> None:
    from sluice.runtime.report import StepStats

    s = StepStats("dup", "custom")
    s.add(10, 20, 0, 0, 0.0, may_create=False)
    assert not s.balanced
    s2 = StepStats("sql", "sql")
    s2.add(10, 20, 0, 0, 0.0, may_create=True)
    assert s2.balanced and s2.created == 10


def test_pii_values_in_messages_are_redacted() -> None:
    from sluice.batch import dead_letters, mask_pii

    letters = dead_letters(
        step_id="pg",
        reason="sink_rejected",
        message=["Failing row contains (1, bob@example.org, null)", "value too long"],
        payload=['{"id": 1, "mail": "bob@example.org"}', '{"id": 2, "mail": "x@y.z"}'],
    )
    masked = mask_pii(letters, {"mail"}).to_pylist()
    assert "bob@example.org" not in str(masked)
    assert masked[1]["message"] == "value too long"  # no PII in it: kept


def test_batches_whose_types_cannot_merge_still_flow(tmp_path: Path) -> None:
    tables = [pa.table({"v": [1, 2]}), pa.table({"v": ["x", "y"]})]
    rep, sink = _run(tmp_path, [], tables, batch_rows=10)
    assert rep.status == "succeeded" and rep.rows_read == 4
    assert sum(t.num_rows for t in sink.committed) == 4
