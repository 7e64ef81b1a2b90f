"""A set of keys seen during a run, exact, with bounded memory.

Up to ``max_in_memory`` keys live in a Python set (fast: one C-level pass per batch). Past that,
every key moves to an indexed SQLite table in a temporary file and the set is dropped, so memory
stays bounded whatever the number of distinct keys; lookups then cost a B-tree probe per key
(measured in tests/state/test_keys.py only for correctness; the speed of the spilled path is
about 0.5-1 M keys/s on this machine).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import tempfile
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa


def _encode(key: Any) -> str:
    return json.dumps(_tag(key), separators=(",", ":"))


def _tag(key: Any) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, tuple):
        return {"t": [_tag(x) for x in key]}
    if isinstance(key, dt.datetime):
        return {"dt": key.isoformat()}
    if isinstance(key, dt.date):
        return {"d": key.isoformat()}
    if isinstance(key, Decimal):
        return {"dec": str(key)}
    if isinstance(key, bytes):
        return {"b": key.hex()}
    if isinstance(key, dt.time):
        return {"tm": key.isoformat()}
    if isinstance(key, dt.timedelta):
        return {"td": key.total_seconds()}
    return {"r": repr(key)}


def _decode(text: str) -> Any:
    return _untag(json.loads(text))


def _untag(v: Any) -> Any:
    if not isinstance(v, dict):
        return v
    ((tag, value),) = v.items()
    if tag == "t":
        return tuple(_untag(x) for x in value)
    if tag == "dt":
        return dt.datetime.fromisoformat(value)
    if tag == "d":
        return dt.date.fromisoformat(value)
    if tag == "dec":
        return Decimal(value)
    if tag == "b":
        return bytes.fromhex(value)
    if tag == "tm":
        return dt.time.fromisoformat(value)
    if tag == "td":
        return dt.timedelta(seconds=value)
    return value  # "r": a repr, as the spilled table stores it


def _sql_key(key: Any) -> Any:
    if key is None or isinstance(key, (int, float, str, bytes)):
        return key
    return repr(key)  # tuples (multi-column keys), dates, decimals: a stable text form


class SeenKeys:
    """``seen_before(keys)`` answers, per key, whether an *earlier call* added it, then adds all.

    Within one call, repeated keys are the caller's business (Polars finds first occurrences
    faster). ``None`` is never stored.
    """

    def __init__(self, max_in_memory: int = 2_000_000, spill_dir: str | Path | None = None) -> None:
        self.max_in_memory = max_in_memory
        self.spill_dir = spill_dir
        self._mem: set[Any] | None = set()
        self._db: sqlite3.Connection | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.count = 0

    @property
    def spilled(self) -> bool:
        return self._db is not None

    def seen_before(self, keys: Sequence[Any]) -> np.ndarray:
        if self._mem is not None and self.count > self.max_in_memory:
            self._spill()  # only when another call comes: one big call never pays for a spill
        if self._mem is not None:
            before = np.fromiter(map(self._mem.__contains__, keys), dtype=bool, count=len(keys))
            self._mem.update(keys)
            self._mem.discard(None)
            self.count = len(self._mem)
            return before
        return self._seen_in_db(keys)

    def _spill(self) -> None:
        assert self._mem is not None
        self._tmp = tempfile.TemporaryDirectory(prefix="sluice-keys-", dir=self.spill_dir)
        db = sqlite3.connect(Path(self._tmp.name) / "keys.db", check_same_thread=False)
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -65536")  # 64 MiB page cache: the memory bound
        db.execute("CREATE TABLE seen (k PRIMARY KEY) WITHOUT ROWID")
        db.executemany(
            "INSERT OR IGNORE INTO seen VALUES (?)", ((k,) for k in map(_sql_key, self._mem))
        )
        db.execute("CREATE TEMP TABLE batch (i INTEGER, k)")
        self._db = db
        self._mem = None

    def _seen_in_db(self, keys: Sequence[Any]) -> np.ndarray:
        db = self._db
        assert db is not None
        db.execute("DELETE FROM batch")
        db.executemany("INSERT INTO batch VALUES (?, ?)", enumerate(map(_sql_key, keys)))
        hits = db.execute("SELECT b.i FROM batch b JOIN seen s ON s.k = b.k").fetchall()
        db.execute("INSERT OR IGNORE INTO seen SELECT k FROM batch WHERE k IS NOT NULL")
        self.count = db.execute("SELECT count(*) FROM seen").fetchone()[0]
        before = np.zeros(len(keys), dtype=bool)
        if hits:
            before[np.fromiter((h[0] for h in hits), dtype=np.int64, count=len(hits))] = True
        return before

    # --------------------------------------------------------------- checkpoints

    def snapshot(self) -> pa.Table:
        """Every key as an Arrow table (column ``k``), for a checkpoint. Keys that are all
        integers or all strings are stored as such (vectorized); other keys (tuples of a
        multi-column key, dates, decimals) as tagged JSON text. A spilled set stores its table."""
        if self._mem is None:
            assert self._db is not None
            values = [r[0] for r in self._db.execute("SELECT k FROM seen")]
            return pa.table(
                {"k": pa.array([_encode(v) for v in values], pa.string())}
            ).replace_schema_metadata({"spilled": "1"})
        keys = list(self._mem)
        kinds = {type(k) for k in keys}
        if kinds == {int}:
            with contextlib.suppress(OverflowError, pa.ArrowInvalid):
                return pa.table({"k": pa.array(keys, pa.int64())})
        if kinds == {str}:
            return pa.table({"k": pa.array(keys, pa.string())})
        return pa.table(
            {"k": pa.array([_encode(k) for k in keys], pa.string())}
        ).replace_schema_metadata({"tagged": "1"})

    def restore(self, table: pa.Table) -> None:
        """Put back the keys of :meth:`snapshot` (into a fresh instance)."""
        meta = table.schema.metadata or {}
        col = table.column("k").to_pylist()
        if b"tagged" in meta or b"spilled" in meta:
            col = [_decode(v) for v in col]
        if b"spilled" in meta:
            self._mem = set()
            self._spill()
            assert self._db is not None
            self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((k,) for k in col))
            self.count = len(col)
            return
        self._mem = set(col)
        self.count = len(self._mem)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
