"""The checkpoint store: one SQLite file, one row per checkpoint epoch.

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

import datetime as dt
import hashlib
import io
import json
import sqlite3
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

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
    """Save and load checkpoints in a SQLite file (created with its folder)."""

    def __init__(self, path: Path, keep: int = 3) -> None:
        self.path = path
        self.keep = keep
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS checkpoints (epoch INTEGER PRIMARY KEY, "
                "created TEXT NOT NULL, sha256 TEXT NOT NULL, body BLOB NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('stream_id', ?)", (uuid.uuid4().hex[:16],)
            )
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise CorruptCheckpoint(f"the checkpoint store {path} cannot be opened: {exc}") from exc
        row = self._db.execute("SELECT value FROM meta WHERE key = 'stream_id'").fetchone()
        #: identifies this checkpoint history: sinks key their epoch markers with it, so a new
        #: store (state deleted: start over) never mistakes old markers for its own epochs
        self.stream_id: str = row[0]

    def save(self, cp: Checkpoint) -> int:
        """Write ``cp`` atomically; return the body size in bytes."""
        cp.created = cp.created or dt.datetime.now(dt.UTC).isoformat()
        body = encode(cp)
        digest = hashlib.sha256(body).hexdigest()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                (cp.epoch, cp.created, digest, body),
            )
            crash_point("in_checkpoint_write")
            self._db.execute(
                "DELETE FROM checkpoints WHERE epoch NOT IN "
                "(SELECT epoch FROM checkpoints ORDER BY epoch DESC LIMIT ?)",
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
            "SELECT epoch, sha256, body FROM checkpoints ORDER BY epoch DESC"
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
        return [r[0] for r in self._db.execute("SELECT epoch FROM checkpoints ORDER BY epoch")]

    def close(self) -> None:
        self._db.close()


__all__ = ["Checkpoint", "CheckpointStore", "CorruptCheckpoint", "decode", "encode"]
