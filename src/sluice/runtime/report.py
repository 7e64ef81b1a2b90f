"""The run report: per-step accounting (the conservation law), timings, dead letters, outputs."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StepStats:
    """Counts for one node. For every node: ``in + created == out + dead + filtered + aggregated``.

    ``created`` is non-zero only for steps that make rows (SQL with UNNEST, window results);
    ``filtered`` counts rows removed on purpose (filter, deduplicate, SQL WHERE);
    ``aggregated`` counts rows folded into window aggregates;
    ``skipped`` (sources only) counts input records skipped on purpose (blank or comment lines).
    """

    step_id: str
    kind: str
    rows_in: int = 0
    rows_out: int = 0
    dead: int = 0
    filtered: int = 0
    aggregated: int = 0
    created: int = 0
    skipped: int = 0
    seconds: float = 0.0
    batches: int = 0

    def add(
        self,
        rows_in: int,
        rows_out: int,
        dead: int,
        filtered: int,
        seconds: float,
        aggregated: int = 0,
        may_create: bool = True,
    ) -> None:
        """Add one call's counts. Unless ``may_create``, extra output rows are not explained
        away as created, so a step that duplicates rows shows as unbalanced."""
        self.rows_in += rows_in
        self.rows_out += rows_out
        self.dead += dead
        self.filtered += filtered
        self.aggregated += aggregated
        if may_create:
            self.created += max(0, rows_out + dead + filtered + aggregated - rows_in)
        self.seconds += seconds
        self.batches += 1

    @property
    def balanced(self) -> bool:
        return (
            self.rows_in + self.created
            == self.rows_out + self.dead + self.filtered + self.aggregated + self.skipped
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 4)
        d["balanced"] = self.balanced
        return d


@dataclass
class RunReport:
    pipeline: str
    run_id: str
    status: str = "running"  # running | succeeded | failed
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    rows_read: int = 0
    bytes_read: int = 0
    dead_letters: int = 0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    dead_letter_path: str | None = None
    peak_rss_mb: float = 0.0
    error: str | None = None
    steps: list[StepStats] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    stream: dict[str, Any] | None = None  # stream mode: epoch, checkpoints, restored_from...
    #: batch runs: the earlier run whose committed output this run's start rolled forward
    #: (``run_id``, ``epoch``, ``sinks`` published, ``dead_letters``); None when none was pending
    recovered: dict[str, Any] | None = None
    #: where :meth:`write` wrote this report; None when it was not written (e.g. a read-only
    #: ``report_dir``: then :attr:`write_error` says why and a warning went to stderr)
    written_to: Path | None = None
    write_error: str | None = None

    def step(self, step_id: str) -> StepStats:
        for s in self.steps:
            if s.step_id == step_id:
                return s
        raise KeyError(step_id)

    @property
    def balanced(self) -> bool:
        return all(s.balanced for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("steps", "quality", "written_to", "write_error")
        }
        d["seconds"] = round(self.seconds, 3)
        d["rows_per_second"] = round(self.rows_read / self.seconds) if self.seconds else None
        d["balanced"] = self.balanced
        d["steps"] = [s.to_dict() for s in self.steps]
        d["quality"] = self.quality
        return d

    def write(self, path: Path) -> bool:
        """Write the report as JSON (atomically). A failure does not fail the run and is not
        hidden either: :attr:`written_to` stays None, :attr:`write_error` holds the OS error and
        a warning naming the path goes to stderr. Returns whether the file was written."""
        self.written_to = None
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            self.write_error = f"{type(exc).__name__}: {exc}"
            print(
                f"sluice: warning: the run report was not written to {path}: {self.write_error}",
                file=sys.stderr,
            )
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False
        self.write_error = None
        self.written_to = path
        return True
