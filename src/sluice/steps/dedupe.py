"""Deduplicate on key columns across the whole run (first occurrence wins)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
import pyarrow as pa

from sluice.batch import Frame
from sluice.config.models import DeduplicateStep
from sluice.plugins import StepResult
from sluice.state.keys import SeenKeys
from sluice.steps._base import BaseStep, check_columns, to_polars


class Deduplicate(BaseStep):
    """Drop rows whose key was already seen in this run; dropped rows count as filtered.

    Exact: keys are compared as values, not hashes. Within a batch Polars finds first
    occurrences; earlier batches are looked up in :class:`sluice.state.keys.SeenKeys` (a set in
    memory, spilled to an indexed file on disk past 2M keys, so memory stays bounded). With a
    single key column, rows whose key is null are kept (null is not a key).
    """

    config: DeduplicateStep

    def __init__(self, config: DeduplicateStep) -> None:
        super().__init__(config)
        self.keys = list(config.deduplicate.key)
        self.seen = SeenKeys()

    def process(self, table: Frame) -> StepResult:
        df = to_polars(table)
        check_columns(self.step_id, self.keys, df.columns, "deduplicate.key")
        if df.height == 0:
            return StepResult(table)
        # rows whose key is null (single-column key) are never duplicates: the same rule in any
        # batch, matching SeenKeys, which does not store null
        first = df.select(
            pl.struct(self.keys).is_first_distinct()
            | (pl.col(self.keys[0]).is_null() if len(self.keys) == 1 else pl.lit(False))
        ).to_series()
        cand = df.filter(first)
        if len(self.keys) == 1:
            keys: list[Any] = cand[self.keys[0]].to_list()
        else:
            keys = list(zip(*(cand[k].to_list() for k in self.keys), strict=True))
        fresh = ~self.seen.seen_before(keys)
        out = cand.filter(pl.Series(fresh))
        return StepResult(out, filtered=df.height - out.height)

    def use_key_store(self, make: Callable[[str], Any]) -> None:
        """Stream mode with ``checkpoint.backend: rocksdb``: keep the keys in that store."""
        self.seen.close()
        self.seen = make("seen")

    def snapshot(self) -> dict[str, pa.Table]:
        """Stream checkpoints: the keys seen so far."""
        return {"seen": self.seen.snapshot()}

    def restore(self, state: dict[str, pa.Table]) -> None:
        self.seen.restore(state["seen"])

    def close(self) -> None:
        self.seen.close()
