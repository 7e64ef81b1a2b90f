"""SeenKeys: exact in memory and after spilling to disk, same answers either way."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.state.keys import SeenKeys

keys = st.one_of(
    st.none(),
    st.integers(-3, 30),
    st.sampled_from(["a", "b", "c"]),
    st.tuples(st.integers(0, 3), st.sampled_from(["x", "y"])),
    st.dates(dt.date(2026, 1, 1), dt.date(2026, 1, 4)),
)


@settings(max_examples=80, deadline=None)
@given(batches=st.lists(st.lists(keys, max_size=30), max_size=12), limit=st.integers(0, 20))
def test_spilled_and_in_memory_answers_are_identical(
    batches: list[list[object]], limit: int
) -> None:
    memory, spilling = SeenKeys(max_in_memory=10**9), SeenKeys(max_in_memory=limit)
    reference: set[object] = set()
    try:
        for batch in batches:
            expected = [k is not None and k in reference for k in batch]
            assert memory.seen_before(batch).tolist() == expected
            assert spilling.seen_before(batch).tolist() == expected
            reference.update(k for k in batch if k is not None)
        assert memory.count == spilling.count == len(reference)
    finally:
        spilling.close()


def test_spill_bounds_the_in_memory_set() -> None:
    store = SeenKeys(max_in_memory=1000)
    try:
        store.seen_before(list(range(5000)))
        assert not store.spilled  # a single call never spills
        again = store.seen_before([4999, 5000, 1, 5000])
        assert again.tolist() == [True, False, True, False]
        assert store.spilled and store.count == 5001
    finally:
        store.close()


# ------------------------------------------------------------------ checkpoint round trips

_scalar = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=8),
    st.dates(),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
)
_key = st.one_of(_scalar, st.tuples(_scalar, st.integers(0, 5)))


@settings(max_examples=60, deadline=None)
@given(first=st.lists(_key, max_size=30), second=st.lists(_key, max_size=30))
def test_snapshot_restore_answers_like_the_original(
    first: list[object], second: list[object]
) -> None:
    original = SeenKeys()
    original.seen_before(first)
    restored = SeenKeys()
    restored.restore(original.snapshot())
    assert list(restored.seen_before(second)) == list(original.seen_before(second))


def test_spilled_snapshot_restores_spilled(tmp_path: Path) -> None:
    original = SeenKeys(max_in_memory=10, spill_dir=tmp_path)
    original.seen_before([(i, "a") for i in range(50)])
    original.seen_before([dt.date(2026, 1, 1), Decimal("1.50")])  # spills now
    assert original.spilled
    restored = SeenKeys(max_in_memory=10, spill_dir=tmp_path)
    restored.restore(original.snapshot())
    assert restored.spilled
    probe = [(3, "a"), (99, "a"), dt.date(2026, 1, 1), Decimal("1.50"), "new"]
    assert list(restored.seen_before(probe)) == [True, False, True, True, False]
    original.close()
    restored.close()
