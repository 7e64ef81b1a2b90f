"""Window step: assignment, batch independence, exact late counts, conservation in a run."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.batch import as_arrow, with_positions
from sluice.config import parse_pipeline
from sluice.config.models import WindowStep
from sluice.errors import ConfigError
from sluice.runtime.executor import Executor
from sluice.steps.window import Window
from sluice.testing import MemorySink, MemorySource


def _step(size_s: int, slide_s: int | None, lateness_s: int) -> Window:
    spec: dict[str, Any] = {
        "kind": "sliding" if slide_s else "tumbling",
        "size": size_s,
        "time": "ts",
        "key": "k",
        "time_unit": "s",
        "lateness": lateness_s,
    }
    if slide_s:
        spec["slide"] = slide_s
    return Window(
        WindowStep.model_validate(
            {
                "id": "w",
                "window": spec,
                "aggregate": {
                    "n": "count()",
                    "total": "sum(v)",
                    "low": "min(v)",
                    "hi": "max(v)",
                    "avg": "mean(v)",
                    "first": "first(v)",
                    "last": "last(v)",
                    "kinds": "count_distinct(v)",
                },
            }
        )
    )


def _run(step: Window, events: list[tuple[int, str, int]], batch: int) -> tuple[list[Any], int]:
    rows: list[Any] = []
    late = 0
    for i in range(0, len(events), batch):
        part = events[i : i + batch]
        t = pa.table(
            {"ts": [e[0] for e in part], "k": [e[1] for e in part], "v": [e[2] for e in part]}
        )
        res = step.process(with_positions(t, "mem", i))
        late += sum(1 for d in res.dead.to_pylist() if d["reason"] == "late")
        assert res.aggregated + res.dead.num_rows == len(part)
        if res.table is not None:
            rows += as_arrow(res.table).to_pylist()
    end = step.finish()
    if end is not None and end.table is not None:
        rows += as_arrow(end.table).to_pylist()
    key = [(r["window_start"], r["k"]) for r in rows]
    assert len(set(key)) == len(key), "a window was emitted twice"
    return sorted(rows, key=lambda r: (r["window_start"], r["k"])), late


def _reference(events: list[tuple[int, str, int]], size: int, slide: int) -> list[dict[str, Any]]:
    """Plain-Python windows over events that are all on time."""
    groups: dict[tuple[int, str], list[tuple[int, int]]] = defaultdict(list)
    for t, k, v in events:
        start = (t // slide) * slide
        while start > t - size:
            groups[(start, k)].append((t, v))
            start -= slide
    out = []
    for (start, k), items in sorted(groups.items()):
        vs = [v for _, v in items]
        by_t = sorted(items, key=lambda x: x[0])
        out.append(
            {
                "start": start,
                "k": k,
                "n": len(vs),
                "total": sum(vs),
                "low": min(vs),
                "hi": max(vs),
                "avg": sum(vs) / len(vs),
                "first": by_t[0][1],
                "last": by_t[-1][1],
                "kinds": len(set(vs)),
            }
        )
    return out


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "start": int(r["window_start"].timestamp()),
            "k": r["k"],
            **{c: r[c] for c in ("n", "total", "low", "hi", "avg", "first", "last", "kinds")},
        }
        for r in rows
    ]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 120),
    seed=st.integers(0, 10**6),
    batch=st.integers(1, 50),
    size=st.sampled_from([5, 10, 30]),
    sliding=st.booleans(),
    lateness=st.integers(0, 8),
)
def test_results_match_a_reference_and_do_not_depend_on_batches(
    n: int, seed: int, batch: int, size: int, sliding: bool, lateness: int
) -> None:
    rng = random.Random(seed)
    t = 1_000
    events = []
    for _ in range(n):
        t += rng.randint(0, 3)
        events.append((t, rng.choice("ab"), rng.randint(0, 5)))
    # shuffle within the allowed lateness: swap neighbours whose times differ by <= lateness
    for i in range(len(events) - 1):
        if events[i + 1][0] - events[i][0] <= lateness and rng.random() < 0.5:
            events[i], events[i + 1] = events[i + 1], events[i]
    slide = size // 5 if sliding else None
    one, late_one = _run(_step(size, slide, lateness), events, max(1, len(events)))
    many, late_many = _run(_step(size, slide, lateness), events, batch)
    assert late_one == late_many == 0
    assert many == one
    assert _plain(many) == _reference(events, size, slide or size)


@settings(max_examples=60, deadline=None)
@given(
    ts=st.lists(st.integers(0, 200), max_size=80),
    batch=st.integers(1, 20),
    lateness=st.integers(0, 30),
)
def test_late_records_are_counted_exactly(ts: list[int], batch: int, lateness: int) -> None:
    """Reference: a record is late when the end of its window is at or before the newest event
    time of all records before it (in arrival order) minus the lateness, whatever the batches."""
    size = 10
    expected_late = 0
    max_t: int | None = None
    for t in ts:
        if max_t is not None and (t // size) * size + size <= max_t - lateness:
            expected_late += 1
        max_t = t if max_t is None else max(max_t, t)
    step = _step(size, None, lateness)
    rows, late = _run(step, [(t, "a", 1) for t in ts], batch)
    assert late == expected_late
    assert sum(r["n"] for r in rows) + late == len(ts)  # main + late = input


def test_bad_configs_name_the_step() -> None:
    with pytest.raises(ConfigError, match=r"step 'w', field 'window.slide'.*multiple"):
        Window(
            WindowStep.model_validate(
                {
                    "id": "w",
                    "window": {"kind": "sliding", "size": "10s", "slide": "3s", "time": "ts"},
                    "aggregate": {"n": "count()"},
                }
            )
        )
    with pytest.raises(ConfigError, match=r"field 'aggregate.x'.*median"):
        Window(
            WindowStep.model_validate(
                {
                    "id": "w",
                    "window": {"size": "10s", "time": "ts"},
                    "aggregate": {"x": "median(v)"},
                }
            )
        )


def test_window_step_in_a_run_balances_and_dead_letters_late_rows(tmp_path: Path) -> None:
    cfg = parse_pipeline(
        {
            "pipeline": "w",
            "source": {"kind": "csv", "path": "unused.csv"},
            "steps": [
                {
                    "id": "per_minute",
                    "window": {"size": "1m", "time": "ts", "key": "k", "lateness": "10s"},
                    "aggregate": {"orders": "count()", "spend": "sum(v)"},
                }
            ],
            "sinks": [{"id": "out", "kind": "jsonl", "path": "x"}],
            "dead_letter": {"path": str(tmp_path / "dl")},
            "settings": {"report_dir": str(tmp_path / "runs"), "batch_rows": 1},
        }
    )
    batches = [
        pa.table(
            {"ts": ["2026-12-01T10:00:05", "2026-12-01T10:00:50"], "k": ["a", "a"], "v": [1.0, 2.0]}
        ),
        pa.table(
            {
                "ts": ["2026-12-01T10:01:30", "2026-12-01T10:01:10", "nonsense"],
                "k": ["a", "b", "a"],
                "v": [3.0, 4.0, 5.0],
            }
        ),
        pa.table({"ts": ["2026-12-01T10:00:40"], "k": ["a"], "v": [6.0]}),  # late
    ]
    sink = MemorySink("out")
    rep = Executor(
        cfg, base_dir=tmp_path, progress=False, source=MemorySource(batches), sinks={"out": sink}
    ).run()
    assert rep.balanced, [s.to_dict() for s in rep.steps]
    st_ = rep.step("per_minute")
    assert (st_.rows_in, st_.aggregated, st_.dead, st_.rows_out) == (6, 4, 2, 3)
    assert rep.dead_letters_by_reason == {"late": 1, "cast_error": 1}
    out = sorted(
        (r["k"], r["window_start"].minute, r["orders"], r["spend"])
        for r in sink.table().to_pylist()
    )
    assert out == [("a", 0, 2, 3.0), ("a", 1, 1, 3.0), ("b", 1, 1, 4.0)]


def test_sum_of_text_says_to_cast_first() -> None:
    from sluice.errors import StepError

    step = Window(
        WindowStep.model_validate(
            {"id": "w", "window": {"size": "10s", "time": "ts"}, "aggregate": {"s": "sum(v)"}}
        )
    )
    with pytest.raises(StepError, match=r"step 'w'.*sum\(v\) needs numbers.*cast: \{v: float\}"):
        step.process(with_positions(pa.table({"ts": [1], "v": ["x"]}), "mem", 0))


def test_i8_review_window_count_star_counts_rows() -> None:
    """``count(*)`` was read as a count of a column named '*' (and failed the run)."""
    step = Window(
        WindowStep.model_validate(
            {
                "id": "w",
                "window": {"size": 10, "time": "ts", "time_unit": "s"},
                "aggregate": {"n": "count(*)", "m": "count()"},
            }
        )
    )
    results = [step.process(with_positions(pa.table({"ts": [1, 2, 15]}), "m", 0)), step.finish()]
    tables = [as_arrow(r.table) for r in results if r is not None and r.table is not None]
    rows = sorted((r for t in tables for r in t.to_pylist()), key=lambda r: r["window_start"])
    assert [(r["n"], r["m"]) for r in rows] == [(2, 2), (1, 1)]
    with pytest.raises(ConfigError, match="takes a column name"):
        Window(
            WindowStep.model_validate(
                {"id": "w", "window": {"size": 10, "time": "ts"}, "aggregate": {"s": "sum(*)"}}
            )
        )
