"""Deduplicate on key columns across the whole run (first occurrence wins)."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from sluice.batch import Frame
from sluice.config.models import DeduplicateStep
from sluice.plugins import StepResult
from sluice.steps._base import BaseStep, check_columns, to_polars


class Deduplicate(BaseStep):
    """Drop rows whose key was already seen in this run; dropped rows count as filtered.

    Exact: the seen keys are held as values (not hashes) in a set, so memory grows with the
    number of distinct keys (roughly 60-100 bytes per key). Within a batch Polars finds first
    occurrences; the membership test against earlier batches is one C-level pass over the keys
    (``map(set.__contains__, ...)``), measured in benchmarks/batch/README.md.
    """

    config: DeduplicateStep

    def __init__(self, config: DeduplicateStep) -> None:
        super().__init__(config)
        self.keys = list(config.deduplicate.key)
        self.seen: set[Any] = set()

    def process(self, table: Frame) -> StepResult:
        df = to_polars(table)
        check_columns(self.step_id, self.keys, df.columns, "deduplicate.key")
        if df.height == 0:
            return StepResult(table)
        first = df.select(pl.struct(self.keys).is_first_distinct()).to_series()
        cand = df.filter(first)
        if len(self.keys) == 1:
            keys: list[Any] = cand[self.keys[0]].to_list()
        else:
            keys = list(zip(*(cand[k].to_list() for k in self.keys), strict=True))
        fresh = ~np.fromiter(map(self.seen.__contains__, keys), dtype=bool, count=len(keys))
        self.seen.update(keys)
        out = cand.filter(pl.Series(fresh))
        return StepResult(out, filtered=df.height - out.height)
