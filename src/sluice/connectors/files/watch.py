"""Watched folder: a stream source that reads each new file landing in a folder exactly once.

:class:`FolderWatcher` turns any file source (``csv``, ``json``, ``jsonl``, ``parquet``,
``xml``) configured with ``watch: true`` into a :class:`~sluice.plugins.StreamSource`:

* every ``poll_interval`` it lists the configured ``path`` glob (relative paths are resolved
  against the pipeline file's folder, as the readers do). A glob that matches nothing yet is not an
  error (the folder may be empty at start), but a missing *watched folder* (the part of the path
  before the first wildcard) is a :class:`~sluice.errors.SourceError` naming the step and the fix;
* files are read one after the other, the smallest unread name first (names compared as their
  path relative to the watched folder), each with the ordinary reader of its kind, so rows, types
  and dead letters are exactly those of a batch run over the same file. One ``poll()`` returns
  one chunk of the file being read;
* hidden files (a name, or a folder under the watched folder, starting with ``.``) and names
  ending in ``.tmp`` or ``.part`` are ignored. **Writers must make a file appear complete**:
  write it elsewhere (on the same file system) or under such a temporary name, then rename it to
  its final name. A file that is still being written when it is listed is read as it is then.

Position (the JSON value checkpointed for this source)::

    {"done": ["a.csv", "b.csv"], "current": "c.csv", "records": 1200}

``done`` is the sorted list of files completely read, ``current`` the file being read (or
``null``) and ``records`` the number of *records* of it already emitted: data rows plus dead
letters. The position attached to a chunk covers everything emitted up to and including that
chunk; the last chunk of a file already lists the file in ``done``.

Guarantees, given that the runtime resumes from the checkpointed position:

* every file is read **exactly once** across restarts: names in ``done`` are never read again;
  the ``current`` file is read again from its start and its first ``records`` records are
  dropped, so nothing is emitted twice and nothing is lost. The skip is exact because the readers
  are deterministic: the same file read with the same settings gives the same chunks, and
  checkpoints fall between chunks. Should the chunking differ (reader settings such as
  ``block_size`` changed between runs), the chunk holding the cut is split by record position
  (``__sluice_row`` of rows, ``position`` of dead letters), which is exact for every reader whose
  dead letters carry a position (all but CSV rows with a wrong field count, which are then
  counted after the rows of their chunk). A ``current`` file that changed in the meantime is
  read as it is now (do not modify files in place);
* a file that disappears between being listed and being read becomes one dead letter with
  reason ``missing_file`` (``source`` = the file, no payload; replay reads the file again if it
  is restored), never an error. A file that cannot be read at all is a ``corrupt_file`` letter;
* ``poll()`` never ends the stream, except with :attr:`FolderWatcher.stop_when_idle`, where it
  returns ``Chunk(end=True)`` once every file present has been read ("drain what is there").

Growth of the position: ``done`` holds one entry per file read *that is still in the folder*.
A name that a listing no longer finds is dropped from ``done`` (files moved away after
processing are forgotten; a new file written later under the same name is read as a new file),
so moving processed files out of the folder keeps the position small. A listing that finds
nothing at all while ``done`` is not empty prunes nothing (an unmounted share must not make every
file look new). Give every file a unique name: a file replaced under a name still listed in
``done`` is not read again.
"""

from __future__ import annotations

import bisect
import glob
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sluice.batch import ROW_COL, dead_letters
from sluice.errors import SourceError
from sluice.plugins import Chunk, RunContext, lookup
from sluice.time.durations import parse_duration

#: Name endings of files being written (ignored until renamed).
TEMPORARY_SUFFIXES = (".tmp", ".part")


def _records(chunk: Chunk) -> int:
    """Records of a chunk: data rows plus dead letters."""
    rows = chunk.table.num_rows if chunk.table is not None else 0
    dead = chunk.dead.num_rows if chunk.dead is not None else 0
    return rows + dead


def _is_empty(chunk: Chunk) -> bool:
    """Nothing to emit: no record, and no skipped line to count in the report."""
    return _records(chunk) == 0 and not chunk.skipped


def _keys(values: pa.Array | pa.ChunkedArray | None, n: int) -> np.ndarray:
    """Record positions as int64 (nulls, or no column at all: after every known position)."""
    last = np.iinfo(np.int64).max
    if values is None:
        return np.full(n, last, dtype=np.int64)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return np.asarray(values.cast(pa.int64()).fill_null(last).to_numpy(zero_copy_only=False))


def drop_first_records(chunk: Chunk, k: int) -> Chunk:
    """Remove the ``k`` first records of ``chunk``, ordered by record position.

    Rows are ordered by ``__sluice_row`` (a table without it keeps its order, before the dead
    letters), dead letters by their ``position`` (letters without one come last); a row and a
    letter at the same position: the row first.
    """
    table, dead = chunk.table, chunk.dead
    n_rows = table.num_rows if table is not None else 0
    n_dead = dead.num_rows if dead is not None else 0
    if k <= 0:
        return chunk
    if k >= n_rows + n_dead:
        return Chunk(bytes_read=chunk.bytes_read)
    if table is not None and ROW_COL in table.column_names:
        row_keys = _keys(table.column(ROW_COL), n_rows)
    else:
        row_keys = np.iinfo(np.int64).min + np.arange(n_rows, dtype=np.int64)
    dead_keys = _keys(dead.column("position") if dead is not None else None, n_dead)
    keys = np.concatenate([row_keys, dead_keys])
    kinds = np.concatenate([np.zeros(n_rows, np.int8), np.ones(n_dead, np.int8)])
    order = np.lexsort((np.arange(len(keys)), kinds, keys))  # stable: by key, rows first
    drop = np.zeros(len(keys), dtype=bool)
    drop[order[:k]] = True
    if table is not None:
        table = table.filter(pa.array(~drop[:n_rows]))
    if dead is not None:
        dead = dead.filter(pa.array(~drop[n_rows:]))
    return Chunk(
        table=table if table is not None and table.num_rows else None,
        dead=dead if dead is not None and dead.num_rows else None,
        bytes_read=chunk.bytes_read,
    )


def _watched_folder(pattern: Path) -> Path:
    """The folder a path or glob lives in: the longest leading part without wildcards."""
    parts = pattern.parts
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return Path(*parts[:i]) if i else Path(".")
    return pattern.parent


class FolderWatcher:
    """Stream source over a watched folder; see the module documentation for the guarantees.

    ``config`` is a file source config (``csv``, ``json``, ``jsonl``, ``parquet``, ``xml``),
    normally with ``watch: true``. Each file is read by the reader registered for
    ``config.kind`` (:func:`sluice.plugins.lookup`), built from a copy of ``config`` whose
    ``path`` is that one file.
    """

    #: Make ``poll`` return ``Chunk(end=True)`` once every file present has been read.
    stop_when_idle: bool = False
    #: Drop names from ``done`` once a listing no longer finds the file (keeps positions small).
    prune_missing: bool = True

    def __init__(self, config: Any, *, stop_when_idle: bool = False) -> None:
        self.config = config
        self.step_id: str = config.id
        self.stop_when_idle = stop_when_idle
        self.poll_interval: float = max(0.001, parse_duration(config.poll_interval))
        self._ctx: RunContext | None = None
        self._factory: Any = None
        self._folder = Path(".")
        self._pattern = ""
        self._done: list[str] = []  # sorted
        self._done_set: set[str] = set()
        self._pending: list[str] = []  # sorted, neither done nor current
        self._current: str | None = None
        self._records = 0  # records of the current file emitted (or to skip, before reading)
        self._chunks: Iterator[Chunk] | None = None
        self._ahead: Chunk | None = None
        self._carry = 0  # bytes of empty chunks, reported with the next chunk
        self._next_listing = 0.0
        self._closed = threading.Event()

    # -- StreamSource protocol -------------------------------------------------------------

    def open(self, ctx: RunContext, position: Any) -> None:
        """Check the watched folder exists and restore ``position`` (``None``: from scratch)."""
        self._ctx = ctx
        self._factory = lookup("source", self.config.kind)
        resolved = ctx.resolve(self.config.path)
        self._pattern = str(resolved)
        self._folder = _watched_folder(resolved)
        if not self._folder.is_dir():
            raise SourceError(
                self.step_id,
                f"the watched folder {str(self._folder)!r} does not exist "
                f"(from path {self.config.path!r})",
                fix="create the folder before starting the pipeline, or correct 'path' "
                f"(relative paths are resolved against {ctx.base_dir})",
            )
        done, current, records = self._parse_position(position)
        self._done = sorted(set(done) - ({current} if current else set()))
        self._done_set = set(self._done)
        self._current, self._records = current, records
        self._pending = []
        self._chunks, self._ahead, self._carry = None, None, 0
        self._next_listing = 0.0
        self._closed.clear()

    def poll(self, timeout: float) -> Chunk | None:
        """The next chunk, or None when nothing new arrived within ``timeout`` seconds."""
        if self._ctx is None:
            raise SourceError(self.step_id, "poll() called before open()")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._current is not None:
                chunk = self._advance()
                if chunk is not None:
                    return chunk
                continue
            if self._closed.is_set():
                return None
            now = time.monotonic()
            if now >= self._next_listing or (self.stop_when_idle and not self._pending):
                self._list()
            if self._pending:
                self._start(self._pending.pop(0), skip=0)
                continue
            if self.stop_when_idle:
                carry, self._carry = self._carry, 0
                return Chunk(end=True, position=self.position(), bytes_read=carry)
            now = time.monotonic()
            if now >= deadline:
                return None
            self._closed.wait(min(deadline, self._next_listing) - now)

    def commit(self, position: Any) -> None:
        """Nothing to acknowledge: files stay where they are (move them away when you like)."""

    def close(self) -> None:
        self._closed.set()
        self._stop_file()
        self._current = None

    # -- position ----------------------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        """The position after everything emitted so far (a fresh JSON-serializable value)."""
        return {"done": list(self._done), "current": self._current, "records": self._records}

    def _parse_position(self, position: Any) -> tuple[list[str], str | None, int]:
        if position is None:
            return [], None, 0
        try:
            done = position["done"]
            current = position.get("current")
            records = int(position.get("records") or 0)
            if not isinstance(done, list) or not all(isinstance(n, str) for n in done):
                raise TypeError("'done' must be a list of file names")
            if current is not None and not isinstance(current, str):
                raise TypeError("'current' must be a file name or null")
            if records < 0:
                raise ValueError("'records' must not be negative")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SourceError(
                self.step_id,
                f"cannot restore the watched-folder position {position!r}: {exc}",
                fix="restart from an older checkpoint, or remove the checkpoint to read every "
                "file in the folder again",
            ) from None
        return done, current, records if current is not None else 0

    # -- listing -----------------------------------------------------------------------------

    def _list(self) -> None:
        """List the glob: new names go to ``pending``; names gone are pruned from ``done``."""
        self._next_listing = time.monotonic() + self.poll_interval
        names: set[str] = set()
        for p in glob.glob(self._pattern, recursive=True):
            try:
                rel = Path(p).relative_to(self._folder).as_posix()
            except ValueError:
                continue
            if self._ignored(rel) or not os.path.isfile(p):
                continue
            names.add(rel)
        if self.prune_missing and names and not self._done_set <= names:
            self._done = [n for n in self._done if n in names]
            self._done_set = set(self._done)
        new = names - self._done_set - set(self._pending)
        new.discard(self._current or "")
        if new:
            self._pending = sorted(set(self._pending) | new)

    @staticmethod
    def _ignored(rel: str) -> bool:
        if any(part.startswith(".") for part in rel.split("/")):
            return True
        return rel.lower().endswith(TEMPORARY_SUFFIXES)

    # -- reading one file -------------------------------------------------------------------

    def _start(self, name: str, *, skip: int) -> None:
        self._current, self._records = name, skip
        self._chunks = self._file_chunks(name, skip)
        self._ahead = None

    def _next_chunk(self) -> Chunk | None:
        """The next chunk with records of the current file (None at its end)."""
        assert self._chunks is not None
        for chunk in self._chunks:
            if _is_empty(chunk):
                self._carry += chunk.bytes_read
                continue
            return chunk
        return None

    def _advance(self) -> Chunk | None:
        """Emit the next chunk of the current file, or finish the file (then None)."""
        if self._chunks is None:  # restored mid-file: read it again, skipping what was emitted
            assert self._current is not None
            self._start(self._current, skip=self._records)
        chunk = self._ahead if self._ahead is not None else self._next_chunk()
        self._ahead = None
        if chunk is None:
            self._finish_file()
            return None
        self._ahead = self._next_chunk()  # look ahead: the file's last chunk marks it done
        self._records += _records(chunk)
        if self._ahead is None:
            self._finish_file()
        chunk.position = self.position()
        chunk.bytes_read += self._carry
        self._carry = 0
        return chunk

    def _finish_file(self) -> None:
        name = self._current
        self._stop_file()
        self._current, self._records = None, 0
        if name is not None and name not in self._done_set:
            bisect.insort(self._done, name)
            self._done_set.add(name)

    def _stop_file(self) -> None:
        chunks, self._chunks, self._ahead = self._chunks, None, None
        close = getattr(chunks, "close", None)
        if close is not None:
            close()

    def _file_chunks(self, name: str, skip: int) -> Iterator[Chunk]:
        """Chunks of one file by its own reader, without its first ``skip`` records."""
        assert self._ctx is not None
        path = self._folder / name
        if not path.is_file():
            yield self._missing(path, skip)
            return
        cfg = self.config.model_copy(update={"path": glob.escape(str(path)), "watch": False})
        reader: Any = None
        try:
            reader = self._factory(cfg)
            reader.open(self._ctx)
        except Exception as exc:
            if reader is not None:
                reader.close()
            yield self._missing(path, skip) if not path.is_file() else self._corrupt(path, exc)
            return
        chunks = reader.read()
        done = 0
        try:
            try:
                for chunk in chunks:
                    n = _records(chunk)
                    if done >= skip:
                        yield chunk
                    elif done + n <= skip:
                        done += n
                    else:
                        yield drop_first_records(chunk, skip - done)
                        done = skip
            except Exception as exc:  # a third-party reader that raises: one letter, go on
                if done >= skip:
                    yield self._corrupt(path, exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            reader.close()

    def _missing(self, path: Path, emitted: int) -> Chunk:
        message = f"file {str(path)!r} disappeared before it was read"
        if emitted:
            message = (
                f"file {str(path)!r} disappeared while being read: {emitted} record(s) of it "
                "were emitted before, the rest is lost"
            )
        message += "; write files elsewhere and rename them into the watched folder"
        letter = dead_letters(
            step_id=self.step_id,
            reason="missing_file",
            message=message,
            payload=None,
            source=str(path),
        )
        return Chunk(dead=letter)

    def _corrupt(self, path: Path, exc: BaseException) -> Chunk:
        letter = dead_letters(
            step_id=self.step_id,
            reason="corrupt_file",
            message=str(exc) or type(exc).__name__,
            payload=None,
            source=str(path),
        )
        return Chunk(dead=letter)


__all__ = ["TEMPORARY_SUFFIXES", "FolderWatcher", "drop_first_records"]
