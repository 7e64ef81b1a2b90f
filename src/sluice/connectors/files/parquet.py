"""Parquet reader: ``ParquetFile.iter_batches``; all-or-nothing for files that fit in memory."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sluice.batch import with_positions
from sluice.config.models import ParquetSource
from sluice.connectors.files._bytes import FileUnreadable
from sluice.connectors.files._common import FileReader, FileState, unreadable
from sluice.plugins import Chunk

BATCH_ROWS = 65_536


class ParquetReader(FileReader):
    """Read Parquet files, ``select`` columns only when given.

    A file up to :attr:`whole_file_limit` bytes (256 MiB) is decoded completely before any of its
    rows is emitted, so a corrupt file is all-or-nothing: it becomes one ``corrupt_file`` dead
    letter with pyarrow's message and no row of it is loaded. A bigger file is streamed one row
    group at a time; if a row group fails, the rest of the file becomes one ``corrupt_file`` dead
    letter whose message says how many rows were already emitted and how many are lost. A file
    missing a ``select`` column is a ``corrupt_file`` dead letter naming the columns it has. The
    configured ``schema`` is applied after reading (uncastable rows → ``cast_error``).

    Parquet is binary and read at random offsets, so it does not go through the byte layer
    (no decompression or text limits apply), but its failures are sorted the same way: a file
    that vanished, is not a regular file, or that the operating system refuses to read is a
    ``file_unreadable`` dead letter (or fails the run with ``on_unreadable: fail``); a file whose
    bytes are not valid Parquet is ``corrupt_file``. Rows carry ``__sluice_row`` = their 0-based
    index in the file; a failed row group's letter has ``position`` = the first row not loaded.
    """

    #: Files up to this size are read whole before emitting (all-or-nothing).
    whole_file_limit: int = 256 << 20

    def __init__(self, config: ParquetSource) -> None:
        super().__init__(config)
        self.config: ParquetSource = config

    def _read_file(self, path: Path, state: FileState) -> Iterator[Chunk]:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise FileUnreadable(f"{path} is not a regular file")
            with open(path, "rb"):  # the operating system's refusal, named as such
                pass
            yield from self._read_parquet(path, state)
        except OSError as exc:
            if _os_refused(exc):
                raise unreadable(exc) from exc
            raise

    def _read_parquet(self, path: Path, state: FileState) -> Iterator[Chunk]:
        with pq.ParquetFile(str(path)) as pf:
            select = self.config.select
            if select:
                have = set(pf.schema_arrow.names)
                missing = [c for c in select if c not in have]
                if missing:
                    yield Chunk(
                        dead=self.dead(
                            state,
                            "corrupt_file",
                            f"column(s) {missing} not in this file; it has {sorted(have)}",
                            None,
                        )
                    )
                    return
            if state.size <= self.whole_file_limit:
                batches = list(pf.iter_batches(batch_size=BATCH_ROWS, columns=select))
                expected = pf.metadata.num_rows
                got = sum(b.num_rows for b in batches)
                if got != expected:
                    raise ValueError(f"file metadata says {expected} rows but {got} were decoded")
                for b in batches:
                    yield self._emit(pa.Table.from_batches([b]), state)
                return
            total = pf.metadata.num_rows
            for rg in range(pf.num_row_groups):
                try:
                    parts = list(
                        pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=select)
                    )
                except Exception as exc:
                    refused = isinstance(exc, OSError) and _os_refused(exc)
                    yield Chunk(
                        dead=self.dead(
                            state,
                            "file_unreadable" if refused else "corrupt_file",
                            f"row group {rg} of {pf.num_row_groups} failed: {exc}; "
                            f"{state.rows} rows of this file were already emitted, the remaining "
                            f"{total - state.rows} rows are not loaded",
                            None,
                            position=state.rows,
                        )
                    )
                    return
                for b in parts:
                    yield self._emit(pa.Table.from_batches([b]), state)

    def _emit(self, table: pa.Table, state: FileState) -> Chunk:
        table = with_positions(table, state.source, state.rows)
        table, dead = self.apply_schema(table)
        state.rows += table.num_rows + dead.num_rows
        return Chunk(table=table if table.num_rows else None, dead=dead if dead.num_rows else None)


def _os_refused(exc: OSError) -> bool:
    """Whether an error from opening or reading a file is the operating system's (vanished, no
    permission, I/O error) rather than bytes that are not Parquet. pyarrow raises ``OSError`` for
    both; its I/O errors carry an errno, or name it in the message."""
    if isinstance(exc, FileUnreadable):
        return True
    return exc.errno is not None or "Detail: [errno" in str(exc)
