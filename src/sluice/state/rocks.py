"""The RocksDB key store (``checkpoint.backend: rocksdb``, extra ``rocksdb``: ``rocksdict``).

Same contract as :class:`sluice.state.keys.SeenKeys` — ``seen_before(keys)`` answers, per key,
whether an earlier call added it, then adds them all — but the keys live in a RocksDB database on
disk, so the set of keys seen by ``deduplicate`` or a contract's ``unique`` check can be larger
than memory. A checkpoint does not copy the keys: :meth:`snapshot` makes a RocksDB checkpoint (hard
links to the immutable SST files, cheap whatever the size) and returns its folder name;
:meth:`restore` replaces the working database with a copy of that checkpoint. The newest
``keep`` checkpoint folders are kept, like the checkpoint store keeps its newest checkpoints.

Keys are stored as bytes: integers as 8 bytes, strings as UTF-8, anything else (tuples of a
multi-column key, dates, decimals) as tagged JSON, so types are kept exactly. Speed: about
0.5-1 M keys per second (one batched multi-get and one write batch per call).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sluice.errors import require
from sluice.state.keys import _decode, _encode

_META = {b"backend": b"rocksdb"}


def _key(k: Any) -> bytes:
    if isinstance(k, int) and not isinstance(k, bool) and -(2**63) <= k < 2**63:
        return b"i" + k.to_bytes(8, "big", signed=True)
    if isinstance(k, str):
        return b"s" + k.encode("utf-8", "surrogatepass")
    return b"j" + _encode(k).encode()


class RocksKeys:
    """Keys seen so far, in RocksDB under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, keep: int = 4) -> None:
        require("rocksdict", "rocksdb", "RocksDB state backend")
        self.root = root
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._db: Any = None
        self._open_fresh()
        self.count = 0

    @property
    def spilled(self) -> bool:
        return True  # on disk by design

    def _open_fresh(self) -> None:
        from rocksdict import Rdict

        work = self.root / "work"
        if work.exists():
            shutil.rmtree(work)  # the working copy of a previous process: restore() decides
        self._db = Rdict(str(work))

    def seen_before(self, keys: Sequence[Any]) -> np.ndarray:
        from rocksdict import WriteBatch

        encoded = [None if k is None else _key(k) for k in keys]
        present = [k for k in encoded if k is not None]
        found = self._db.get(present) if present else []
        before = np.zeros(len(keys), dtype=bool)
        it = iter(found)
        batch = WriteBatch()
        new = 0
        for i, k in enumerate(encoded):
            if k is None:
                continue
            hit = next(it) is not None
            before[i] = hit
            if not hit:
                batch.put(k, b"")
                new += 1
        if new:
            self._db.write(batch)
        self.count += len({k for k, b in zip(encoded, before, strict=True) if k and not b})
        return before

    def snapshot(self) -> pa.Table:
        from rocksdict import Checkpoint

        name = f"ckpt-{uuid.uuid4().hex[:12]}"
        Checkpoint(self._db).create_checkpoint(str(self.root / name))
        self._prune(name)
        return pa.table({"checkpoint": [name], "count": [self.count]}).replace_schema_metadata(
            _META
        )

    def restore(self, table: pa.Table) -> None:
        from rocksdict import Rdict

        meta = table.schema.metadata or {}
        if meta.get(b"backend") != b"rocksdb":  # a snapshot of the in-memory backend
            keys = table.column("k").to_pylist()
            if b"tagged" in meta or b"spilled" in meta:
                keys = [_decode(v) for v in keys]
            self.seen_before(keys)
            return
        name = table.column("checkpoint")[0].as_py()
        source = self.root / name
        if not source.is_dir():
            raise FileNotFoundError(f"RocksDB checkpoint {source} is missing")
        self._db.close()
        work = self.root / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(source, work)
        self._db = Rdict(str(work))
        self.count = int(table.column("count")[0].as_py())

    def _prune(self, newest: str) -> None:
        dirs = sorted(
            (p for p in self.root.glob("ckpt-*") if p.is_dir()), key=lambda p: p.stat().st_mtime
        )
        for old in dirs[: -self.keep]:
            if old.name != newest:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


__all__ = ["RocksKeys"]
