"""Window step, stream features: exact per-record lateness whatever the batch cuts, session
windows, per-partition watermarks with idle timeout, early updates, snapshot/restore."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sluice.batch import ROW_COL, SOURCE_COL, as_arrow, frame_rows, source_id, with_positions
from sluice.config import parse_pipeline
from sluice.config.models import WindowStep
from sluice.errors import ConfigError
from sluice.runtime.executor import Executor
from sluice.steps.window import Window
from sluice.testing import MemorySink, MemorySource

AGGS = {
    "n": "count()",
    "nv": "count(v)",
    "total": "sum(v)",
    "low": "min(v)",
    "hi": "max(v)",
    "avg": "mean(v)",
    "first": "first(v)",
    "last": "last(v)",
    "kinds": "count_distinct(v)",
}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

Event = tuple[int, str | None, float | None, str]  # (time s, key, value, partition)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    kind: str = "tumbling",
    *,
    size: str | int | None = None,
    slide: str | int | None = None,
    gap: str | int | None = None,
    lateness: str | int = 0,
    idle: str | float | None = None,
    early: str | float | None = None,
    aggs: dict[str, str] | None = None,
    key: str | None = "k",
) -> Window:
    spec: dict[str, Any] = {"kind": kind, "time": "ts", "time_unit": "s", "lateness": lateness}
    for name, value in (
        ("size", size),
        ("slide", slide),
        ("gap", gap),
        ("idle_timeout", idle),
        ("early", early),
        ("key", key),
    ):
        if value is not None:
            spec[name] = value
    step = Window(WindowStep.model_validate({"id": "w", "window": spec, "aggregate": aggs or AGGS}))
    step.per_partition = True  # as the stream runtime sets it for broker sources
    return step


def table(events: list[Event], first_pos: int) -> pa.Table:
    n = len(events)
    return pa.table(
        {
            "ts": pa.array([e[0] for e in events], pa.int64()),
            "k": pa.array([e[1] for e in events], pa.string()),
            "v": pa.array(
                [e[2] for e in events],
                pa.float64() if any(isinstance(e[2], float) for e in events) else pa.int64(),
            ),
            SOURCE_COL: pa.array([source_id(e[3]) for e in events], pa.int32()),
            ROW_COL: pa.array(np.arange(first_pos, first_pos + n, dtype=np.int64)),
        }
    )


def us(value: dt.datetime) -> int:
    return (value - EPOCH) // dt.timedelta(microseconds=1)


def plain(frame: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = as_arrow(frame).to_pylist()
    for r in rows:
        r["window_start"] = us(r["window_start"]) // 1_000_000
        r["window_end"] = us(r["window_end"]) // 1_000_000
    return rows


def feed(
    step: Window, batches: list[list[Event]], first_pos: int = 0
) -> tuple[list[dict[str, Any]], set[int]]:
    """Run batches through process(); the emitted rows in order, and positions of late rows."""
    out: list[dict[str, Any]] = []
    late: set[int] = set()
    pos = first_pos
    for part in batches:
        res = step.process(table(part, pos))
        assert res.aggregated + res.dead.num_rows == len(part)  # in = dead + aggregated
        late |= {d["position"] for d in res.dead.to_pylist() if d["reason"] == "late"}
        if res.table is not None:
            out += plain(res.table)
        pos += len(part)
    return out, late


def finish(step: Window) -> list[dict[str, Any]]:
    res = step.finish()
    return plain(res.table) if res is not None and res.table is not None else []


def cut(events: list[Event], cuts: list[int]) -> list[list[Event]]:
    points = sorted({c % (len(events) + 1) for c in cuts} | {0, len(events)})
    return [events[a:b] for a, b in itertools.pairwise(points) if b > a]


def key_of(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["window_start"], r["k"] or "")


# ------------------------------------------------------------------------ reference


def threshold(kind: str, t: int, slide: int, gap: int) -> int:
    return t + gap if kind == "session" else (t // slide) * slide + slide


def ref_late(events: list[Event], kind: str, slide: int, gap: int, lateness: int) -> set[int]:
    """Late: the earliest window's end <= max event time of all earlier records - lateness."""
    late, newest = set(), None
    for i, (t, *_rest) in enumerate(events):
        if newest is not None and threshold(kind, t, slide, gap) <= newest - lateness:
            late.add(i)
        newest = t if newest is None else max(newest, t)
    return late


def ref_aggs(items: list[tuple[int, float | None]]) -> dict[str, Any]:
    """items: (time, value) in arrival order."""
    vs = [v for _, v in items if v is not None]
    by_t = sorted(items, key=lambda x: x[0])  # stable: ties keep arrival order
    return {
        "n": len(items),
        "nv": len(vs),
        "total": math.fsum(vs) if any(isinstance(v, float) for v in vs) else sum(vs),
        "low": min(vs) if vs else None,
        "hi": max(vs) if vs else None,
        "avg": math.fsum(vs) / len(vs) if vs else None,
        "first": by_t[0][1],
        "last": by_t[-1][1],
        "kinds": len(set(vs)),
    }


def ref_windows(
    events: list[Event], late: set[int], kind: str, size: int, slide: int, gap: int
) -> list[dict[str, Any]]:
    on_time = [e for i, e in enumerate(events) if i not in late]
    groups: dict[tuple[int, int, str | None], list[tuple[int, float | None]]] = defaultdict(list)
    if kind == "session":
        per_key: dict[str | None, list[tuple[int, float | None]]] = defaultdict(list)
        for t, k, v, _p in on_time:
            per_key[k].append((t, v))
        for k, items in per_key.items():
            items_by_t = sorted(items, key=lambda x: x[0])
            sessions: list[list[tuple[int, float | None]]] = []
            for t, _v in items_by_t:
                if sessions and t - max(x[0] for x in sessions[-1]) < gap:
                    sessions[-1].append((t, _v))
                else:
                    sessions.append([(t, _v)])
            for s in sessions:
                ts = {x[0] for x in s}
                # keep arrival order inside the session (for first/last ties)
                members = [x for x in items if x[0] in ts]
                start, end = min(ts), max(ts) + gap
                groups[(start, end, k)] = members
    else:
        for t, k, v, _p in on_time:
            start = (t // slide) * slide
            while start > t - size:
                groups[(start, start + size, k)].append((t, v))
                start -= slide
    out = [
        {"k": k, "window_start": s, "window_end": e, **ref_aggs(items)}
        for (s, e, k), items in groups.items()
    ]
    return sorted(out, key=key_of)


def normalized(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ["k", "window_start", "window_end", *AGGS]
    return sorted(({c: r[c] for c in keep} for r in rows), key=key_of)


def random_events(
    rng: random.Random,
    n: int,
    disorder: int,
    parts: int = 1,
    null_values: bool = True,
    floats: bool = False,
) -> list[Event]:
    """Events about 2 s apart on average, 40% of them up to ``disorder`` seconds early. With
    ``floats``, values of very different magnitudes (sums of them depend on addition order)."""
    t = 1_000
    events: list[Event] = []
    for _ in range(n):
        t += rng.randint(0, 4)
        jitter = rng.randint(0, disorder) if rng.random() < 0.4 else 0
        v: float | None = (
            rng.uniform(-1, 1) * 10 ** rng.randint(-6, 12) if floats else rng.randint(0, 5)
        )
        if null_values and rng.random() < 0.1:
            v = None
        events.append((t - jitter, rng.choice("ab"), v, f"p{rng.randrange(parts)}"))
    return events


KINDS = st.sampled_from(["tumbling", "sliding", "session"])


def step_for(kind: str, size: int, lateness: int, **kw: Any) -> Window:
    if kind == "session":
        return make("session", gap=size // 2, lateness=lateness, **kw)
    if kind == "sliding":
        return make("sliding", size=size, slide=size // 5, lateness=lateness, **kw)
    return make("tumbling", size=size, lateness=lateness, **kw)


def geometry(kind: str, size: int) -> tuple[int, int, int]:
    """(size, slide, gap) as the reference sees them."""
    if kind == "session":
        return 0, 1, size // 2
    return size, size // 5 if kind == "sliding" else size, 0


# ------------------------------------------------------------------------ batch independence


@settings(max_examples=80, deadline=None)
@given(
    kind=KINDS,
    n=st.integers(0, 120),
    seed=st.integers(0, 10**6),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
    size=st.sampled_from([5, 10, 30]),
    lateness=st.integers(0, 8),
    disorder=st.integers(0, 40),
)
def test_late_set_and_results_do_not_depend_on_batch_cuts(
    kind: str,
    n: int,
    seed: int,
    cuts: list[int],
    size: int,
    lateness: int,
    disorder: int,
) -> None:
    events = random_events(random.Random(seed), n, disorder)
    size_, slide, gap = geometry(kind, size)
    expected_late = ref_late(events, kind, slide, gap, lateness)
    expected = ref_windows(events, expected_late, kind, size_, slide, gap)

    one = step_for(kind, size, lateness)
    rows_one, late_one = feed(one, [events] if events else [])
    rows_one += finish(one)
    many = step_for(kind, size, lateness)
    rows_many, late_many = feed(many, cut(events, cuts))
    rows_many += finish(many)

    assert late_one == late_many == expected_late
    assert normalized(rows_one) == normalized(rows_many) == expected
    for rows in (rows_one, rows_many):
        assert len({key_of(r) for r in rows}) == len(rows), "a window was emitted twice"
    per_record = size // (size // 5) if kind == "sliding" else 1
    assert sum(r["n"] for r in rows_many) == per_record * (n - len(expected_late))


def approx_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        for c, v in w.items():
            if isinstance(v, float) or isinstance(g[c], float):
                if not math.isclose(g[c], v, rel_tol=1e-9, abs_tol=1e-3):
                    return False
            elif g[c] != v:
                return False
    return True


@settings(max_examples=60, deadline=None)
@given(
    kind=KINDS,
    n=st.integers(0, 120),
    seed=st.integers(0, 10**6),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
    lateness=st.integers(0, 8),
    disorder=st.integers(0, 40),
)
def test_float_sums_are_the_same_bit_for_bit_whatever_the_batch_cuts(
    kind: str, n: int, seed: int, cuts: list[int], lateness: int, disorder: int
) -> None:
    """Values of magnitudes 1e-6..1e12: adding partial sums in another order would change the
    last bits. Float sums are kept exactly, so sum and mean do not depend on batch cuts."""
    events = random_events(random.Random(seed), n, disorder, floats=True)
    one = step_for(kind, 10, lateness)
    rows_one, late_one = feed(one, [events] if events else [])
    rows_one += finish(one)
    many = step_for(kind, 10, lateness)
    rows_many, late_many = feed(many, cut(events, cuts))
    rows_many += finish(many)
    assert late_one == late_many
    assert normalized(rows_one) == normalized(rows_many)  # exact, floats included
    size_, slide, gap = geometry(kind, 10)
    expected = ref_windows(events, late_one, kind, size_, slide, gap)
    assert approx_rows(normalized(rows_many), expected)


def test_float_sums_keep_small_values_next_to_big_ones() -> None:
    step = make(size=10, aggs={"total": "sum(v)", "avg": "mean(v)"})
    inf = float("inf")
    events: list[Event] = [
        (1, "a", 1e16, "p"),
        (2, "a", 1.0, "p"),
        (3, "a", -1e16, "p"),
        (4, "a", 1.0, "p"),
        (15, "b", float("nan"), "p"),
        (15, "b", 1.0, "p"),
        (15, "c", inf, "p"),
        (15, "c", -inf, "p"),
        (15, "d", -inf, "p"),
        (15, "d", 1.0, "p"),
    ]
    rows, _ = feed(step, [[e] for e in events])  # one record per batch
    rows += finish(step)
    assert (rows[0]["total"], rows[0]["avg"]) == (2.0, 0.5)  # in arrival order: 1.0
    assert math.isnan(rows[1]["total"]) and math.isnan(rows[2]["total"])
    assert rows[3]["total"] == -inf


def test_a_record_behind_an_earlier_one_in_the_same_batch_is_late() -> None:
    # one batch: 10:00:59 arrives after 10:01:30 with 10 s lateness -> late, as if cut apart
    step = make(size=60, lateness=10)
    rows, late = feed(step, [[(90, "a", 1, "p"), (59, "a", 1, "p"), (85, "a", 1, "p")]])
    assert late == {1}
    assert rows == []
    assert step.watermark == 80 * 1_000_000
    assert [(r["window_start"], r["n"]) for r in finish(step)] == [(60, 2)]


# ------------------------------------------------------------------------ sessions


def test_sessions_merge_when_a_record_bridges_two() -> None:
    step = make("session", gap=15, lateness=100)
    rows, late = feed(step, [[(0, "a", 1, "p"), (20, "a", 2, "p")], [(10, "a", 2, "p")]])
    assert not rows and not late
    [s] = finish(step)
    assert (s["window_start"], s["window_end"], s["n"], s["total"]) == (0, 35, 3, 5)
    assert (s["first"], s["last"], s["kinds"], s["low"], s["hi"]) == (1, 2, 2, 1, 2)


def test_events_exactly_gap_apart_are_two_sessions() -> None:
    step = make("session", gap=15, lateness=100)
    feed(step, [[(0, "a", 1, "p"), (15, "a", 1, "p"), (15, "b", 1, "p")]])
    got = [(r["k"], r["window_start"], r["window_end"]) for r in finish(step)]
    assert got == [("a", 0, 15), ("a", 15, 30), ("b", 15, 30)]


def test_a_session_is_emitted_once_the_watermark_passes_its_end_plus_gap() -> None:
    step = make("session", gap=10, lateness=0)
    rows, _ = feed(step, [[(0, "a", 1, "p"), (5, "a", 1, "p")], [(24, "b", 1, "p")]])
    assert rows == []  # session a ends at 15; 15 + gap > watermark 24
    rows, _ = feed(step, [[(25, "b", 1, "p")]], first_pos=3)
    assert [(r["k"], r["window_start"], r["window_end"], r["n"]) for r in rows] == [("a", 0, 15, 2)]
    # a record that would still have joined session a is late, not a new session
    step = make("session", gap=10, lateness=0)
    feed(step, [[(0, "a", 1, "p"), (5, "a", 1, "p")], [(24, "b", 1, "p")]])
    _, late = feed(step, [[(14, "a", 1, "p")]], first_pos=3)
    assert late == {3}


def test_session_config_errors_name_step_field_and_fix() -> None:
    with pytest.raises(ConfigError, match=r"step 'w', field 'window.gap'.*needs gap.*Fix: e\.g\."):
        make("session")
    with pytest.raises(ConfigError, match=r"field 'window.size'.*no size.*Fix: remove size"):
        make("session", gap=10, size=10)
    with pytest.raises(ConfigError, match=r"field 'window.slide'.*no slide"):
        make("session", gap=10, slide=10)
    with pytest.raises(ConfigError, match=r"field 'window.gap'.*tumbling window has no gap"):
        make("tumbling", size=10, gap=5)
    with pytest.raises(ConfigError, match=r"field 'window.size'.*sliding window needs size"):
        make("sliding", slide=5)
    with pytest.raises(ConfigError, match=r"field 'window.size'.*needs size"):
        make("tumbling")
    # durations are read and range-checked by the config model (tests/config/test_durations.py)
    with pytest.raises(ValidationError, match=r"window.early\n.*cannot read duration 'soon'"):
        make("tumbling", size=10, early="soon")
    with pytest.raises(ValidationError, match=r"window.idle_timeout\n.*cannot read duration"):
        make("tumbling", size=10, idle="a while")
    with pytest.raises(ValidationError, match=r"window.idle_timeout\n.*must be longer than 0s"):
        make("tumbling", size=10, idle=0)
    with pytest.raises(ValidationError, match=r"window.gap\n.*must be longer than 0s"):
        make("session", gap="0s")
    with pytest.raises(ValidationError, match=r"window.lateness\n.*cannot read duration"):
        make("tumbling", size=10, lateness="late")


# ------------------------------------------------------------------------ partitions


def test_watermark_is_the_minimum_over_partitions() -> None:
    step = make(size=10)
    assert step.watermark is None
    feed(step, [[(100, "a", 1, "fast"), (20, "a", 1, "slow")]])
    assert step.watermark == 20_000_000
    rows, _ = feed(step, [[(35, "a", 1, "slow")]], first_pos=2)
    assert [r["window_start"] for r in rows] == [20]  # [20, 30) closed by slow's 35
    assert step.watermark == 35_000_000


def test_without_a_partition_column_the_input_is_one_partition() -> None:
    step = make(size=10)
    res = step.process(pa.table({"ts": [5, 25], "k": ["a", "a"], "v": [1, 2]}))
    assert plain(res.table)[0]["window_start"] == 0
    assert step.snapshot()["partitions"].to_pylist() == [{"partition": "", "max_time": 25_000_000}]


def test_an_idle_partition_is_left_out_after_idle_timeout() -> None:
    clock = Clock()
    step = make(size=10, idle="30s")
    step.clock = clock
    feed(step, [[(100, "a", 1, "busy"), (20, "a", 1, "quiet")]])
    assert step.watermark == 20_000_000
    clock.now += 29
    feed(step, [[(110, "a", 1, "busy")]], first_pos=2)
    assert step.watermark == 20_000_000  # quiet not idle yet
    clock.now += 2
    rows, _ = feed(step, [[(120, "a", 1, "busy")]], first_pos=3)
    assert step.watermark == 120_000_000  # quiet is idle: only busy counts
    assert [r["window_start"] for r in rows] == [20, 100, 110]
    # quiet comes back: its old records are late, and it counts again from now on
    _, late = feed(step, [[(25, "a", 1, "quiet"), (121, "a", 1, "quiet")]], first_pos=4)
    assert late == {4}
    assert step.watermark == 120_000_000  # never moves backwards
    feed(step, [[(130, "a", 1, "busy")]], first_pos=6)
    assert step.watermark == 121_000_000  # quiet counts again


def test_when_every_partition_is_idle_the_watermark_is_the_maximum() -> None:
    clock = Clock()
    step = make(size=10, idle=5)
    step.clock = clock
    feed(step, [[(100, "a", 1, "x"), (20, "a", 1, "y")]])
    assert step.tick() is None
    clock.now += 6
    res = step.tick()
    assert res is not None and res.table is not None
    assert [r["window_start"] for r in plain(res.table)] == [20]
    assert step.watermark == 100_000_000


def test_per_record_check_with_several_partitions_uses_own_prefix_and_others_at_start() -> None:
    step = make(size=10, lateness=0)
    feed(step, [[(50, "a", 1, "x"), (30, "a", 1, "y")]])
    assert step.watermark == 30_000_000
    # y's 45 comes after y's own 70: checked against min(x's 50 at the batch start, own 70)
    # = 50, so its window [40, 50) has closed -> late. x's 42 is checked against min(own 50,
    # y's 30 at the batch start) = 30: on time, although y reached 70 earlier in the batch.
    batch: list[Event] = [(70, "a", 1, "y"), (45, "a", 1, "y"), (42, "a", 1, "x")]
    _, late = feed(step, [batch], first_pos=2)
    assert late == {3}
    assert step.watermark == 50_000_000


def test_a_late_record_still_moves_its_partition_forward() -> None:
    step = make(size=10, lateness=1)
    feed(step, [[(972, "a", 2, "p1"), (992, "b", 1, "p1")]])
    # p0's first record is late against the step's watermark 991, but p0 has reached 987
    _, late = feed(step, [[(987, "a", 5, "p0"), (1012, "a", 5, "p1")]], first_pos=2)
    assert late == {2}
    # p1's 1004 is checked against min(p0's 987, p1's own 1012) - 1 = 986 (floor 991): on time
    _, late = feed(step, [[(1004, "b", None, "p1")]], first_pos=4)
    assert late == set()
    assert step.snapshot()["partitions"].to_pylist()[0] == {
        "partition": "p0",
        "max_time": 987_000_000,
    }


def multi_ref_late(batches: list[list[Event]], size: int, lateness: int) -> set[int]:
    """Several partitions, no idle timeout: the documented per-record rule."""
    late: set[int] = set()
    wm: int | None = None
    newest: dict[str, int] = {}
    pos = 0
    for part in batches:
        start = dict(newest)
        own: dict[str, int | None] = {}
        for t, _k, _v, p in part:
            others = [m for q, m in start.items() if q != p]
            prefix = own.get(p, start.get(p))
            bound = min(
                [x for x in (min(others) if others else None, prefix) if x is not None],
                default=None,
            )
            cand = [
                x for x in (wm, bound - lateness if bound is not None else None) if x is not None
            ]
            if cand and (t // size) * size + size <= max(cand):
                late.add(pos)
            own[p] = t if prefix is None else max(prefix, t)
            pos += 1
        for p, m in own.items():
            if m is not None:
                newest[p] = m
        if newest:
            c = min(newest.values()) - lateness
            wm = c if wm is None else max(wm, c)
    return late


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 100),
    seed=st.integers(0, 10**6),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
    lateness=st.integers(0, 8),
    parts=st.integers(1, 3),
)
def test_several_partitions_follow_the_documented_rule(
    n: int, seed: int, cuts: list[int], lateness: int, parts: int
) -> None:
    events = random_events(random.Random(seed), n, 30, parts=parts)
    batches = cut(events, cuts)
    step = make(size=10, lateness=lateness)
    rows, late = feed(step, batches)
    rows += finish(step)
    assert late == multi_ref_late(batches, 10, lateness)
    # no on-time record ever lands in a window that was already emitted
    assert normalized(rows) == ref_windows(events, late, "tumbling", 10, 10, 0)
    if parts == 1:
        assert late == ref_late(events, "tumbling", 10, 0, lateness)


# ------------------------------------------------------------------------ early updates


def test_early_updates_are_marked_and_only_for_changed_windows() -> None:
    clock = Clock()
    step = make(size=10, early="5s", aggs={"n": "count()", "kinds": "count_distinct(v)"})
    step.clock = clock
    rows, _ = feed(step, [[(1, "a", 1, "p"), (2, "b", 1, "p")]])
    assert [(r["k"], r["n"], r["is_final"]) for r in rows] == [("a", 1, False), ("b", 1, False)]
    clock.now += 1
    rows, _ = feed(step, [[(3, "a", 2, "p")]], first_pos=2)
    assert rows == []  # less than 5 s since the last early emission
    clock.now += 5
    rows, _ = feed(step, [[(4, "a", 2, "p")]], first_pos=3)
    assert [(r["k"], r["n"], r["kinds"], r["is_final"]) for r in rows] == [("a", 3, 2, False)]
    clock.now += 5
    rows, _ = feed(step, [[(12, "b", 3, "p")]], first_pos=4)
    assert [(r["k"], r["window_start"], r["n"], r["is_final"]) for r in rows] == [
        ("a", 0, 3, True),
        ("b", 0, 1, True),
        ("b", 10, 1, False),
    ]
    assert [(r["k"], r["n"], r["is_final"]) for r in finish(step)] == [("b", 1, True)]


def test_without_early_there_is_no_is_final_column() -> None:
    step = make(size=10)
    rows, _ = feed(step, [[(1, "a", 1, "p"), (12, "a", 1, "p")]])
    assert rows and "is_final" not in rows[0]


def test_early_results_then_final_results_match_the_final_only_run() -> None:
    events = random_events(random.Random(3), 200, 20)
    batches = cut(events, list(range(0, 200, 7)))
    plain_step = make("session", gap=6, lateness=5)
    want, _ = feed(plain_step, batches)
    want += finish(plain_step)
    early_step = make("session", gap=6, lateness=5, early=0)
    got, _ = feed(early_step, batches)
    got += finish(early_step)
    finals = [{k: v for k, v in r.items() if k != "is_final"} for r in got if r["is_final"]]
    assert normalized(finals) == normalized(want)
    assert any(not r["is_final"] for r in got)


# ------------------------------------------------------------------------ snapshot / restore


def roundtrip(state: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Through Arrow IPC bytes, as a checkpoint stores it."""
    out = {}
    for name, tab in state.items():
        sink = io.BytesIO()
        with ipc.new_stream(sink, tab.schema) as writer:
            writer.write_table(tab)
        out[name] = ipc.open_stream(pa.py_buffer(sink.getvalue())).read_all()
    return out


@settings(max_examples=80, deadline=None)
@given(
    kind=KINDS,
    n=st.integers(0, 120),
    seed=st.integers(0, 10**6),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
    stop=st.integers(0, 10**6),
    lateness=st.integers(0, 8),
    parts=st.integers(1, 3),
    early=st.sampled_from([None, 0]),
    keyed=st.booleans(),
    floats=st.booleans(),
)
def test_snapshot_and_restore_continue_exactly(
    kind: str,
    n: int,
    seed: int,
    cuts: list[int],
    stop: int,
    lateness: int,
    parts: int,
    early: int | None,
    keyed: bool,
    floats: bool,
) -> None:
    events = random_events(random.Random(seed), n, 25, parts=parts, floats=floats)
    batches = cut(events, cuts)
    at = stop % (len(batches) + 1)
    key = "k" if keyed else None
    whole = step_for(kind, 10, lateness, early=early, key=key)
    want, want_late = feed(whole, batches)
    want += finish(whole)

    first = step_for(kind, 10, lateness, early=early, key=key)
    got, got_late = feed(first, batches[:at])
    saved = roundtrip(first.snapshot())
    assert first.watermark == (saved["meta"].column("watermark")[0].as_py())
    second = step_for(kind, 10, lateness, early=early, key=key)
    second.restore(saved)
    assert second.watermark == first.watermark
    more, more_late = feed(second, batches[at:], first_pos=sum(len(b) for b in batches[:at]))
    got += more + finish(second)
    assert got == want
    assert got_late | more_late == want_late


def test_snapshot_keys_partitions_by_name() -> None:
    step = make(size=10)
    feed(step, [[(5, "a", 1, "topic-a/0"), (7, "a", 1, "topic-a/1")]])
    parts = step.snapshot()["partitions"].to_pylist()
    assert parts == [
        {"partition": "topic-a/0", "max_time": 5_000_000},
        {"partition": "topic-a/1", "max_time": 7_000_000},
    ]


def test_restore_refuses_state_of_another_configuration() -> None:
    step = make(size=10)
    feed(step, [[(5, "a", 1, "p")]])
    other = make(size=20)
    with pytest.raises(ConfigError, match=r"step 'w', field 'window'.*different window"):
        other.restore(step.snapshot())


def test_null_keys_and_values_are_windows_of_their_own() -> None:
    step = make(size=10)
    feed(step, [[(1, None, None, "p"), (2, None, 3, "p"), (3, "a", None, "p")]])
    rows = sorted(finish(step), key=key_of)
    assert [(r["k"], r["n"], r["nv"], r["total"], r["kinds"], r["avg"]) for r in rows] == [
        (None, 2, 1, 3, 1, 3.0),
        ("a", 1, 0, 0, 0, None),
    ]
    assert [(r["low"], r["hi"], r["first"], r["last"]) for r in rows] == [
        (3, 3, None, 3),  # first/last take the earliest/latest record's value, even null
        (None, None, None, None),
    ]


def test_session_windows_in_a_run_balance(tmp_path: Path) -> None:
    cfg = parse_pipeline(
        {
            "pipeline": "s",
            "source": {"kind": "csv", "path": "unused.csv"},
            "steps": [
                {
                    "id": "visits",
                    "window": {"kind": "session", "gap": "30 min", "time": "ts", "key": "k"},
                    "aggregate": {"clicks": "count()", "pages": "count_distinct(page)"},
                }
            ],
            "sinks": [{"id": "out", "kind": "jsonl", "path": "x"}],
            "dead_letter": {"path": str(tmp_path / "dl")},
            "settings": {"report_dir": str(tmp_path / "runs"), "batch_rows": 1},
        }
    )
    batches = [
        pa.table(
            {
                "ts": ["2026-12-01T10:00:00", "2026-12-01T10:20:00", "2026-12-01T12:00:00"],
                "k": ["a", "a", "b"],
                "page": ["/", "/x", "/"],
            }
        ),
        pa.table({"ts": ["2026-12-01T10:10:00", "bad"], "k": ["a", "a"], "page": ["/x", "/"]}),
        pa.table({"ts": ["2026-12-01T13:00:00"], "k": ["a"], "page": ["/y"]}),
    ]
    sink = MemorySink("out")
    rep = Executor(
        cfg, base_dir=tmp_path, progress=False, source=MemorySource(batches), sinks={"out": sink}
    ).run()
    assert rep.balanced, [s.to_dict() for s in rep.steps]
    st_ = rep.step("visits")
    assert (st_.rows_in, st_.aggregated, st_.dead, st_.rows_out) == (6, 4, 2, 3)
    assert rep.dead_letters_by_reason == {"late": 1, "cast_error": 1}
    out = sorted(
        (r["k"], r["window_start"].hour, r["window_end"].minute, r["clicks"], r["pages"])
        for r in sink.table().to_pylist()
    )
    assert out == [("a", 10, 50, 2, 2), ("a", 13, 30, 1, 1), ("b", 12, 30, 1, 1)]


def test_event_time_from_dates_epoch_milliseconds_and_floats() -> None:
    day = Window(
        WindowStep.model_validate(
            {"id": "w", "window": {"size": "1 day", "time": "d"}, "aggregate": {"n": "count()"}}
        )
    )
    day.process(pa.table({"d": [dt.date(2026, 11, 2), dt.date(2026, 11, 2), None]}))
    [row] = plain(day.finish().table)  # type: ignore[union-attr]
    assert (row["n"], row["window_start"]) == (
        2,
        us(dt.datetime(2026, 11, 2, tzinfo=dt.UTC)) // 10**6,
    )
    for unit, values in (("ms", [1_500, 2_999]), ("s", [1.5, 2.999])):
        step = Window(
            WindowStep.model_validate(
                {
                    "id": "w",
                    "window": {"size": "1s", "time": "t", "time_unit": unit},
                    "aggregate": {"n": "count()"},
                }
            )
        )
        res = step.process(pa.table({"t": values}))
        rows = plain(res.table) + plain(step.finish().table)  # type: ignore[union-attr]
        got = [(r["window_start"], r["n"]) for r in rows]
        assert got == [(1, 1), (2, 1)], unit


def test_early_updates_of_a_session_can_move_its_bounds() -> None:
    step = make("session", gap=10, lateness=100, early=0)
    rows, _ = feed(step, [[(20, "a", 1, "p")], [(12, "a", 1, "p")]])
    assert [(r["window_start"], r["window_end"], r["is_final"]) for r in rows] == [
        (20, 30, False),
        (12, 30, False),
    ]
    assert [(r["window_start"], r["n"], r["is_final"]) for r in finish(step)] == [(12, 2, True)]


def test_restore_restarts_wall_clock_state() -> None:
    clock = Clock()
    step = make(size=10, idle=30, early=60)
    step.clock = clock
    feed(step, [[(100, "a", 1, "x"), (20, "a", 1, "y")]])
    saved = step.snapshot()
    clock.now += 3600  # a long outage: x and y would both be idle by the old clock
    again = make(size=10, idle=30, early=60, lateness=5)  # lateness may change
    again.clock = clock
    again.restore(saved)
    assert again.tick() is None  # idle timeouts start afresh; nothing changed since the restore
    rows, _ = feed(again, [[(101, "a", 1, "x")]], first_pos=2)
    assert [(r["window_start"], r["is_final"]) for r in rows] == [(100, False)]  # early due
    assert again.watermark == 20_000_000
    clock.now += 31
    res = again.tick()
    assert res is not None and again.watermark == 96_000_000  # both idle: max - lateness 5
    make(size=10, idle=99, early=1, lateness=0).restore(saved)  # these may change too


def test_a_batch_that_fails_leaves_the_state_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    step = make(size=10)
    feed(step, [[(5, "a", 1, "p"), (7, "b", 2, "p")]])
    before = step.snapshot()

    def boom(_df: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(step, "_fold_fixed", boom)
    with pytest.raises(RuntimeError):
        step.process(table([(25, "a", 1, "p"), (8, "a", 1, "q")], 2))
    after = step.snapshot()
    assert before.keys() == after.keys()
    assert all(before[k].equals(after[k]) for k in before)


def test_files_are_one_partition_unless_the_runtime_says_otherwise() -> None:
    """Batch runs and watched folders: a file read to its end must not hold the watermark back,
    so windows close as the newest time passes them, not only at the end of input."""
    step = Window(
        WindowStep.model_validate(
            {
                "id": "w",
                "window": {"size": 10, "time": "ts", "time_unit": "s", "key": "k"},
                "aggregate": {"n": "count()"},
            }
        )
    )
    first = with_positions(pa.table({"k": ["a"], "ts": [1]}), "file-1.jsonl", 0)
    second = with_positions(pa.table({"k": ["a"], "ts": [25]}), "file-2.jsonl", 0)
    step.process(first)
    out = step.process(second).table
    assert out is not None and frame_rows(out) == 1  # [0, 10) closed by file 2's time


def test_batches_in_time_order_still_find_their_late_records() -> None:
    """Times that never decrease within a batch: records behind the partition's newest time
    (from earlier batches) and a new partition's records behind the watermark are late."""
    step = make(size=10, aggs={"n": "count()"})
    batches: list[list[Event]] = [
        [(1, "a", 1.0, "p"), (25, "a", 1.0, "p")],
        [(3, "a", 1.0, "p"), (5, "a", 1.0, "p"), (21, "a", 1.0, "p")],
        [(12, "a", 1.0, "q"), (30, "a", 1.0, "q")],
    ]
    out, late = feed(step, batches)
    assert late == {2, 3, 5}
    assert late == multi_ref_late(batches, 10, 0)
    rows = out + finish(step)
    assert [(r["window_start"], r["n"]) for r in rows] == [(0, 1), (20, 2), (30, 1)]
