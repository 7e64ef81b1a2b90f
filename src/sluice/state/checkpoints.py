"""The checkpoint store: one SQLite file, one row per checkpoint epoch.

Two histories can share a file: the stream's checkpoints (table ``checkpoints``) and the
commit records of batch runs (table ``batch_runs``, one epoch per run; see
:mod:`sluice.runtime.executor`), each with its own epoch numbering, its own "published" marker
and its own lock (``<file>.<table>.lock``, held while a run uses it, so that two runs of one
pipeline never share a history). The ``replayed`` table is the ledger of ``sluice replay``: the
keys of the dead letters a replay run consumed, inserted in the same transaction as that run's
commit record.

A checkpoint ties together what must agree after a crash: the epoch number, the source
position (JSON), every stateful step's state (Arrow tables) and every sink's commit token (JSON).
It is written in one SQLite transaction (WAL journal, ``synchronous=FULL``), so a crash during
the write leaves the previous checkpoint as the newest one. Each row also stores a SHA-256 of its
body: a truncated or corrupt newest checkpoint (a damaged disk, a copy cut short) is detected on
load and the one before it is used instead, with a warning naming the skipped epoch. The newest
``keep`` checkpoints are kept.

Body layout: 8-byte big-endian header length, a JSON header (epoch, position, sinks, created, and
the index of state tables), then the state tables as Arrow IPC streams back to back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import sqlite3
import struct
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.ipc as ipc

from sluice.errors import SluiceError
from sluice.runtime.faults import crash_point

State = dict[str, dict[str, pa.Table]]  # step id -> name -> table


@dataclass
class Checkpoint:
    epoch: int
    position: Any = None
    state: State = field(default_factory=dict)
    sinks: dict[str, Any] = field(default_factory=dict)
    created: str = ""


class CorruptCheckpoint(Exception):
    pass


class StoreBusy(Exception):
    """Another process holds the store's lock for this history (another run is going on)."""


class AlreadyReplayed(SluiceError):
    """A run that replays dead letters found, at its commit, that another replay had already
    consumed some of them: it is not committed (nothing of it is published)."""


def _lock(lock_path: Path, what: str) -> IO[bytes] | None:
    """Take the exclusive advisory lock ``lock_path`` (held while the file stays open); raise
    :class:`StoreBusy` naming ``what`` when another process (or another open of it) holds it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        return None
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_path, "ab")  # noqa: SIM115 - held open while the lock is
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise StoreBusy(f"{what} (lock {lock_path.name})") from None
    return fh


@contextlib.contextmanager
def exclusive(path: Path, name: str) -> Iterator[None]:
    """Hold the lock ``<store file>.<name>.lock`` for the ``with`` block (e.g. ``replay``: one
    replay of a pipeline at a time, from the ledger check to its last commit); raise
    :class:`StoreBusy` when it is held elsewhere."""
    fh = _lock(path.with_name(f"{path.name}.{name}.lock"), f"another {name} of {path} is going on")
    try:
        yield
    finally:
        if fh is not None:
            fh.close()


TABLES = ("checkpoints", "batch_runs")


def encode(cp: Checkpoint) -> bytes:
    blobs: list[bytes] = []
    index: list[dict[str, Any]] = []
    offset = 0
    for step_id, tables in cp.state.items():
        for name, table in tables.items():
            sink = io.BytesIO()
            with ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            blob = sink.getvalue()
            index.append({"step": step_id, "name": name, "offset": offset, "length": len(blob)})
            blobs.append(blob)
            offset += len(blob)
    header = json.dumps(
        {
            "epoch": cp.epoch,
            "position": cp.position,
            "sinks": cp.sinks,
            "created": cp.created,
            "state": index,
        }
    ).encode()
    return struct.pack(">Q", len(header)) + header + b"".join(blobs)


def decode(body: bytes) -> Checkpoint:
    try:
        (n,) = struct.unpack(">Q", body[:8])
        header = json.loads(body[8 : 8 + n])
        data = memoryview(body)[8 + n :]
        state: State = {}
        for item in header["state"]:
            blob = data[item["offset"] : item["offset"] + item["length"]]
            if len(blob) != item["length"]:
                raise CorruptCheckpoint("state table cut short")
            state.setdefault(item["step"], {})[item["name"]] = ipc.open_stream(
                pa.py_buffer(bytes(blob))
            ).read_all()
        return Checkpoint(
            epoch=int(header["epoch"]),
            position=header["position"],
            state=state,
            sinks=header["sinks"],
            created=header.get("created", ""),
        )
    except CorruptCheckpoint:
        raise
    except Exception as exc:
        raise CorruptCheckpoint(f"{type(exc).__name__}: {exc}") from exc


class CheckpointStore:
    """Save and load checkpoints in a SQLite file (created with its folder).

    ``table`` chooses the history: ``checkpoints`` (stream) or ``batch_runs`` (batch runs).
    With ``lock`` the store takes an exclusive lock on ``<file>.<table>.lock`` for as long as
    it is open and raises :class:`StoreBusy` if another process holds it.
    """

    def __init__(
        self, path: Path, keep: int = 3, *, table: str = "checkpoints", lock: bool = False
    ) -> None:
        if table not in TABLES:
            raise ValueError(f"unknown checkpoint table {table!r}")
        self.path = path
        self.keep = keep
        self.table = table
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock: IO[bytes] | None = self._take_lock() if lock else None
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30
            )
        except sqlite3.Error as exc:
            self._release()
            raise CorruptCheckpoint(f"the checkpoint store {path} cannot be opened: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            for name in TABLES:
                self._db.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} (epoch INTEGER PRIMARY KEY, "
                    "created TEXT NOT NULL, sha256 TEXT NOT NULL, body BLOB NOT NULL)"
                )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS replayed (key TEXT PRIMARY KEY, epoch INTEGER NOT "
                "NULL, run_id TEXT NOT NULL, at TEXT NOT NULL)"
            )
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('stream_id', ?)", (uuid.uuid4().hex[:16],)
            )
            row = self._db.execute("SELECT value FROM meta WHERE key = 'stream_id'").fetchone()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise CorruptCheckpoint(f"the checkpoint store {path} cannot be opened: {exc}") from exc
        #: identifies this checkpoint history: sinks key their epoch markers with it, so a new
        #: store (state deleted: start over) never mistakes old markers for its own epochs
        self.stream_id: str = row[0]

    def _take_lock(self) -> IO[bytes] | None:
        return _lock(
            self.path.with_name(f"{self.path.name}.{self.table}.lock"),
            f"another process is using the checkpoint store {self.path} ({self.table})",
        )

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # closing the file releases the lock

    def save(self, cp: Checkpoint, *, replayed: Iterable[str] = (), run_id: str = "") -> int:
        """Write ``cp`` atomically; return the body size in bytes. ``replayed`` (dead-letter
        keys of a replay run) are added to the ledger in the same transaction."""
        cp.created = cp.created or dt.datetime.now(dt.UTC).isoformat()
        body = encode(cp)
        digest = hashlib.sha256(body).hexdigest()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?, ?)",
                (cp.epoch, cp.created, digest, body),
            )
            try:
                self._db.executemany(
                    "INSERT INTO replayed VALUES (?, ?, ?, ?)",
                    [(key, cp.epoch, run_id, cp.created) for key in replayed],
                )
            except sqlite3.IntegrityError:
                raise AlreadyReplayed(
                    "some of the dead letters this run replays were replayed by another run "
                    "while it ran: it is not committed (nothing of it is published), so they "
                    "are not written twice"
                ) from None
            crash_point("in_checkpoint_write")
            self._db.execute(
                f"DELETE FROM {self.table} WHERE epoch NOT IN "
                f"(SELECT epoch FROM {self.table} ORDER BY epoch DESC LIMIT ?)",
                (self.keep,),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return len(body)

    def load(self) -> tuple[Checkpoint | None, list[str]]:
        """The newest checkpoint that reads back intact, and warnings for newer ones skipped."""
        warnings: list[str] = []
        rows = self._db.execute(
            f"SELECT epoch, sha256, body FROM {self.table} ORDER BY epoch DESC"
        ).fetchall()
        for epoch, digest, body in rows:
            body = bytes(body)
            if hashlib.sha256(body).hexdigest() != digest:
                warnings.append(
                    f"checkpoint {epoch} in {self.path} is truncated or corrupt "
                    f"(checksum mismatch, {len(body)} bytes); using the one before it"
                )
                continue
            try:
                return decode(body), warnings
            except CorruptCheckpoint as exc:
                warnings.append(f"checkpoint {epoch} in {self.path} cannot be read ({exc})")
        return None, warnings

    def epochs(self) -> list[int]:
        return [r[0] for r in self._db.execute(f"SELECT epoch FROM {self.table} ORDER BY epoch")]

    def next_epoch(self) -> int:
        """The epoch after the newest one ever saved (also after damaged rows)."""
        row = self._db.execute(f"SELECT max(epoch) FROM {self.table}").fetchone()
        done = self.published_epoch() or 0
        return max(int(row[0] or 0), done) + 1

    def published_epoch(self) -> int | None:
        """The newest epoch of this history whose outputs were all published."""
        row = self._db.execute(
            "SELECT value FROM meta WHERE key = ?", (f"{self.table}.published",)
        ).fetchone()
        return None if row is None else int(row[0])

    def mark_published(self, epoch: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"{self.table}.published", str(epoch))
        )

    def replayed(self, keys: Iterable[str]) -> dict[str, tuple[int, str, str]]:
        """The keys among ``keys`` already in the replay ledger: key -> (epoch, run id, time)."""
        found: dict[str, tuple[int, str, str]] = {}
        batch: list[str] = []

        def look(part: list[str]) -> None:
            marks = ",".join("?" * len(part))
            for key, epoch, run_id, at in self._db.execute(
                f"SELECT key, epoch, run_id, at FROM replayed WHERE key IN ({marks})", part
            ):
                found[key] = (int(epoch), run_id, at)

        for key in keys:
            batch.append(key)
            if len(batch) == 500:
                look(batch)
                batch = []
        if batch:
            look(batch)
        return found

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._db.close()
        self._release()


def remove_store(path: Path) -> None:
    """Delete a store file with its WAL and lock files (tests, and starting over)."""
    for suffix in ("", "-wal", "-shm", ".replay.lock", *(f".{t}.lock" for t in TABLES)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.with_name(path.name + suffix))


__all__ = [
    "AlreadyReplayed",
    "Checkpoint",
    "CheckpointStore",
    "CorruptCheckpoint",
    "StoreBusy",
    "decode",
    "encode",
    "exclusive",
    "remove_store",
]
