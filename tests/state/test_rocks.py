"""The RocksDB key store answers exactly like the in-memory one, across checkpoints."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.state.keys import SeenKeys
from sluice.state.rocks import RocksKeys

_scalar = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=6),
    st.dates(),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
)
_key = st.one_of(_scalar, st.tuples(_scalar, st.integers(0, 3)))


@settings(max_examples=40, deadline=None)
@given(
    calls=st.lists(st.lists(_key, max_size=20), min_size=1, max_size=4),
    cut=st.integers(0, 4),
    probe=st.lists(_key, max_size=20),
)
def test_same_answers_as_memory_with_a_checkpoint_in_between(
    calls: list[list[object]], cut: int, probe: list[object]
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        memory = SeenKeys()
        rocks = RocksKeys(Path(tmp) / "keys")
        try:
            for i, keys in enumerate(calls):
                if i == cut:  # checkpoint, then restore into a new store (a restart)
                    snap = rocks.snapshot()
                    rocks.close()
                    rocks = RocksKeys(Path(tmp) / "keys")
                    rocks.restore(snap)
                assert list(rocks.seen_before(keys)) == list(memory.seen_before(keys))
            assert list(rocks.seen_before(probe)) == list(memory.seen_before(probe))
        finally:
            rocks.close()
            memory.close()


def test_restore_from_a_memory_snapshot_and_old_checkpoints_pruned(tmp_path: Path) -> None:
    memory = SeenKeys()
    memory.seen_before([1, "a", (2, dt.date(2026, 1, 1)), Decimal("1.5")])
    rocks = RocksKeys(tmp_path / "k", keep=2)
    rocks.restore(memory.snapshot())
    assert list(rocks.seen_before([1, "a", (2, dt.date(2026, 1, 1)), Decimal("1.5"), 3])) == [
        True,
        True,
        True,
        True,
        False,
    ]
    for _ in range(5):
        rocks.snapshot()
    assert len(list((tmp_path / "k").glob("ckpt-*"))) == 2
    rocks.close()
