"""Progress display: a rich progress bar on a terminal, nothing in CI or when piped."""

from __future__ import annotations

import os
import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_wanted() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class RunProgress:
    """Shows bytes read (against the source's size when known), rows, rows/s and dead letters."""

    def __init__(self, pipeline: str, total_bytes: int | None, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[rows]:>12,} rows  {task.fields[rate]:>10,.0f} rows/s"),
                TextColumn("[red]{task.fields[dead]:,} dead letters"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task(
                pipeline, total=total_bytes, rows=0, rate=0.0, dead=0
            )

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def update(self, bytes_read: int, rows: int, dead: int, elapsed: float) -> None:
        if self._progress is None or self._task is None:
            return
        rate = rows / elapsed if elapsed > 0 else 0.0
        self._progress.update(self._task, completed=bytes_read, rows=rows, rate=rate, dead=dead)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
