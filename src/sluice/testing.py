"""The test kit users get too: an in-memory source and sink, and a sink that injects faults.

These are for unit tests of pipeline logic. Connectors themselves are tested against real files
and real servers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from sluice.batch import (
    DEAD_LETTER_SCHEMA,
    concat,
    empty_dead_letters,
    strip_positions,
    with_positions,
)
from sluice.errors import TerminalError, TransientError
from sluice.plugins import Chunk, RunContext, Source


class MemorySource:
    """Yields the given tables (and dead-letter tables) as batches, adding position columns."""

    def __init__(
        self,
        tables: Sequence[pa.Table],
        step_id: str = "source",
        name: str = "memory",
        dead: Sequence[pa.Table] = (),
    ) -> None:
        self.step_id = step_id
        self.tables = list(tables)
        self.dead = list(dead)
        self.name = name
        self.closed = False

    def open(self, ctx: RunContext) -> None:
        self.closed = False

    def read(self) -> Iterator[Chunk]:
        row = 0
        for t in self.tables:
            yield Chunk(table=with_positions(t, self.name, row), bytes_read=t.nbytes)
            row += t.num_rows
        for d in self.dead:
            yield Chunk(dead=d)

    def size_hint(self) -> int | None:
        return int(sum(t.nbytes for t in self.tables))

    def close(self) -> None:
        self.closed = True


class MemoryStream:
    """A stream source over the given tables, one chunk per table, then the end of input.

    The position is the number of tables consumed, so a pipeline restarted from a checkpoint
    continues with the next table (what a broker does with offsets). ``committed`` records the
    positions the runtime acknowledged."""

    def __init__(self, tables: Sequence[pa.Table], step_id: str = "source", name: str = "memory"):
        self.step_id = step_id
        self.tables = list(tables)
        self.name = name
        self.next = 0
        self.committed: list[int] = []

    def open(self, ctx: RunContext, position: object) -> None:
        self.next = int(position) if isinstance(position, int) else 0

    def poll(self, timeout: float) -> Chunk | None:
        if self.next >= len(self.tables):
            return Chunk(end=True, position=self.next)
        t = self.tables[self.next]
        first = sum(x.num_rows for x in self.tables[: self.next])
        self.next += 1
        return Chunk(table=with_positions(t, self.name, first), position=self.next)

    def commit(self, position: object) -> None:
        assert isinstance(position, int)
        self.committed.append(position)

    def close(self) -> None:
        return None


class MemorySink:
    """Collects written tables; ``committed`` holds them only after commit (like a real sink)."""

    def __init__(self, step_id: str = "sink") -> None:
        self.step_id = step_id
        self.pending: list[pa.Table] = []
        self.committed: list[pa.Table] = []
        self.aborted = False

    def open(self, ctx: RunContext) -> None:
        self.pending = []

    def write(self, table: pa.Table) -> pa.Table:
        self.pending.append(strip_positions(table))
        return empty_dead_letters()

    def commit(self) -> None:
        self.committed.extend(self.pending)
        self.pending = []

    def abort(self) -> None:
        self.pending = []
        self.aborted = True

    def table(self) -> pa.Table:
        return concat(self.committed) if self.committed else pa.table({})


class FlakySink(MemorySink):
    """Fails a fraction of writes with :class:`TransientError` (retried by the executor) and
    refuses batches containing ``poison`` values in ``column`` with :class:`TerminalError`."""

    def __init__(
        self,
        step_id: str = "sink",
        *,
        transient_rate: float = 0.0,
        seed: int = 0,
        column: str | None = None,
        poison: Sequence[object] = (),
    ) -> None:
        super().__init__(step_id)
        self.rng = random.Random(seed)
        self.transient_rate = transient_rate
        self.column = column
        self.poison = set(poison)
        self.transient_failures = 0

    def write(self, table: pa.Table) -> pa.Table:
        if self.rng.random() < self.transient_rate:
            self.transient_failures += 1
            raise TransientError(self.step_id, "injected transient failure")
        if self.column and self.poison & set(table.column(self.column).to_pylist()):
            raise TerminalError(self.step_id, "injected permanent failure (poison value)")
        return super().write(table)


class Drained(NamedTuple):
    """Everything a source produced: data tables, all dead letters, bytes read."""

    tables: list[pa.Table]
    dead: pa.Table
    bytes_read: int


def drain(source: Source, base_dir: Path = Path("/")) -> Drained:
    """Open a source, read it to the end and close it, keeping the source contract."""
    source.open(RunContext(pipeline="test", run_id="test", base_dir=base_dir))
    tables: list[pa.Table] = []
    dead: list[pa.Table] = []
    nbytes = 0
    try:
        for chunk in source.read():
            nbytes += chunk.bytes_read
            if chunk.table is not None:
                tables.append(chunk.table)
            if chunk.dead is not None:
                assert chunk.dead.schema == DEAD_LETTER_SCHEMA, chunk.dead.schema
                dead.append(chunk.dead)
    finally:
        source.close()
    return Drained(
        tables, pa.concat_tables(dead) if dead else DEAD_LETTER_SCHEMA.empty_table(), nbytes
    )
