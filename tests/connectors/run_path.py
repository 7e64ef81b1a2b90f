"""Drive a sink the way a batch run does, for connector tests.

A run never calls a database or broker sink's ``write``/``commit`` itself: every sink goes
through the runtime's epoch adapter (:func:`sluice.runtime.epochs.epoch_sink`) — file sinks
write their parts under temporary names and rename them at publish; database and broker sinks
(:class:`~sluice.plugins.EpochPublisher`) have their rows staged on disk and then *published*
with the run's marker, in slices. :class:`RunPath` gives a connector test that path behind the
familiar ``open``/``write``/``commit``/``abort`` calls, so that a test of "what a run does"
tests the code a run executes.

Dead letters: a file sink refuses rows at ``write``; a staged sink refuses invalid strings at
``write`` and everything else (schema mismatches, constraints) at publish: ``commit`` returns
those. :attr:`RunPath.letters` holds every letter of the run.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pyarrow as pa

from sluice.batch import empty_dead_letters
from sluice.plugins import RunContext, Sink
from sluice.runtime.epochs import EpochSink, epoch_sink
from sluice.runtime.retry import retry


class RunPath:
    """One batch run (one epoch) of ``sink`` built from ``config``."""

    def __init__(self, sink: Sink, config: Any, *, epoch: int = 1) -> None:
        self.sink = sink
        self.config = config
        self.step_id = sink.step_id
        self.epoch = epoch
        self.adapter: EpochSink | None = None
        self.letters: list[pa.Table] = []

    def open(self, ctx: RunContext) -> None:
        """Start the run: ``ctx.run_id`` names it (and the history of its epoch marker)."""
        sink_ctx = RunContext(ctx.pipeline, f"batch-{ctx.run_id}", ctx.base_dir, batch=True)
        self.adapter = epoch_sink(
            self.sink,
            self.config,
            ctx,
            stream=False,
            staging=ctx.base_dir / ".staging",
            sink_ctx=sink_ctx,
        )
        self.adapter.begin(self.epoch)
        self.letters = []

    def write(self, table: pa.Table) -> pa.Table:
        assert self.adapter is not None, "open() first"
        dead = self.adapter.write(table)
        self.letters.append(dead)
        return dead

    def commit(self, *, attempts: int = 3) -> pa.Table:
        """Prepare, publish (retried like the runtime does), forget; returns the dead letters
        of the publish."""
        adapter, self.adapter = self.adapter, None
        assert adapter is not None, "open() first"
        try:
            token = adapter.prepare()
            late: pa.Table = retry(
                partial(adapter.publish, self.epoch, token), attempts=attempts, backoff=0.05
            )
            adapter.forget(self.epoch)
        finally:
            adapter.close()
        self.letters.append(late)
        return late

    def abort(self) -> None:
        """The run failed before its commit: nothing is published."""
        adapter, self.adapter = self.adapter, None
        if adapter is not None:
            adapter.close()

    def dead(self) -> pa.Table:
        """Every dead letter of the run so far (write and publish)."""
        kept = [t for t in self.letters if t.num_rows]
        return pa.concat_tables(kept) if kept else empty_dead_letters()
