"""The local executor: one process, Arrow micro-batches, bounded queues between threads.

::

    reader thread ─(queue)─▶ main thread: steps, in order ─(queue per sink)─▶ sink threads
                                   │                                                │
                                   └───── dead letters ─(queue)─▶ dead-letter thread ◀┘

Queues are bounded (``settings.queue_size`` batches), so a slow sink pauses the steps and the
reader: memory does not grow with the input. Arrow, Polars and DuckDB release the GIL while they
work, so reading, computing and writing overlap on separate cores.

At the end every sink commits (files appear atomically, databases commit their transaction). If
anything fails, the data sinks abort (no partial output), while the dead letters collected so far
are still committed, so nothing is lost; the error is re-raised after the report is written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import resource
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sluice.batch import (
    DEAD_LETTER_SCHEMA,
    Frame,
    as_arrow,
    concat,
    frame_rows,
    mask_pii,
    rows_dead_letters,
)
from sluice.config.models import JsonlSink, ParquetSink, PipelineConfig
from sluice.config.validate import build_components, step_kind
from sluice.errors import SinkError, SluiceError, TerminalError, TransientError
from sluice.plugins import Chunk, RunContext, Sink, Source, Step, StepResult, lookup
from sluice.runtime.progress import RunProgress, progress_wanted
from sluice.runtime.report import RunReport, StepStats
from sluice.runtime.retry import retry

_END: Any = object()


@dataclass
class _Failed:
    exc: BaseException


def dead_letter_sink(config: PipelineConfig, path: str) -> JsonlSink | ParquetSink:
    """The file sink config of the dead-letter output at ``path`` (a file, or a folder)."""
    if config.dead_letter.kind == "jsonl":
        return JsonlSink(id="dead_letter", kind="jsonl", path=path)
    return ParquetSink(id="dead_letter", kind="parquet", path=path)


def new_run_id() -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:6]}"


class _Worker(threading.Thread):
    """Feeds one sink from a bounded queue; records its failure instead of dying silently."""

    def __init__(
        self, name: str, handle: Callable[[pa.Table], None], queue_size: int, stop: threading.Event
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.handle = handle
        self.stop_event = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is _END:
                return
            if self.error is not None:
                continue  # drain so producers never block on a dead worker
            try:
                self.handle(item)
            except BaseException as exc:
                self.error = exc
                self.stop_event.set()

    def put(self, item: Any) -> None:
        while True:
            if self.error is not None and item is not _END:
                raise self.error
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


class Executor:
    """Run a :class:`PipelineConfig` in this process. Build once, call :meth:`run` once."""

    #: components are built for stream mode (:class:`~sluice.runtime.stream.StreamExecutor`)
    streaming = False

    def __init__(
        self,
        config: PipelineConfig,
        *,
        base_dir: Path | None = None,
        run_id: str | None = None,
        progress: bool | None = None,
        report_path: Path | None = None,
        source: Source | None = None,
        sinks: Mapping[str, Sink] | None = None,
    ) -> None:
        """``source`` and ``sinks`` (by sink id) replace the configured connectors; the test kit
        (:mod:`sluice.testing`) uses them."""
        self.cfg = config
        self.run_id = run_id or new_run_id()
        self.ctx = RunContext(config.pipeline, self.run_id, (base_dir or Path.cwd()).resolve())
        self.show_progress = progress_wanted() if progress is None else progress
        fmt = {"pipeline": config.pipeline, "run_id": self.run_id}
        self.report_path = (
            report_path
            or self.ctx.resolve(config.settings.report_dir.format(**fmt)) / f"{self.run_id}.json"
        )
        self.report = RunReport(config.pipeline, self.run_id)
        self.stop = threading.Event()
        self._dl_lock = threading.Lock()
        self._dl_reasons: Counter[str] = Counter()
        self._dl_count = 0

        s = config.settings
        # the one place components are built: `sluice validate` builds them the same way
        built = build_components(
            config,
            base_dir=self.ctx.base_dir,
            stream=self.streaming,
            source=source,
            sinks=sinks,
        )
        self.source: Source = built.source
        self.steps: list[tuple[Step, list[str]]] = built.steps
        self.last = built.last
        self.sinks: list[tuple[Sink, list[str]]] = built.sinks
        dl_dir = config.dead_letter.path.format(**fmt)
        dl_path = f"{dl_dir}/{self.run_id}.{config.dead_letter.kind}"
        dl_cfg = dead_letter_sink(config, dl_path)
        self.dl_sink: Sink = lookup("sink", dl_cfg.kind)(dl_cfg)
        self.dl_path = self.ctx.resolve(dl_path)

        self.stats: dict[str, StepStats] = {
            config.source.id: StepStats(config.source.id, config.source.kind)
        }
        for step, _ in self.steps:
            self.stats[step.step_id] = StepStats(step.step_id, step_kind(config.step(step.step_id)))
        for sink, _ in self.sinks:
            kind = next(sk.kind for sk in config.sinks if sk.id == sink.step_id)
            self.stats[sink.step_id] = StepStats(sink.step_id, f"{kind} sink")
        self.report.steps = list(self.stats.values())
        self._retry = (s.retry_attempts, s.retry_backoff)
        self._dl_open = False
        self._dl_worker = _Worker("sluice-dead-letters", self._write_dead, 64, self.stop)
        self._workers: list[_Worker] = []
        self._pii: set[str] = set()
        self._pii_steps: set[str] = set()

    # ------------------------------------------------------------------ dead letters

    def _dead(self, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            return
        n = table.num_rows
        if self._pii:
            table = mask_pii(table, self._pii, trusted_steps=self._pii_steps)
        table = table.set_column(0, "pipeline", pa.array([self.cfg.pipeline] * n, pa.string()))
        table = table.set_column(1, "run_id", pa.array([self.run_id] * n, pa.string()))
        counts = pc.value_counts(table.column("reason")).to_pylist()
        with self._dl_lock:
            self._dl_count += n
            for c in counts:
                self._dl_reasons[c["values"]] += c["counts"]
            if not self._dl_open:
                self.dl_sink.open(self.ctx)
                self._dl_open = True
        self._dl_worker.put(table.cast(DEAD_LETTER_SCHEMA))

    def _write_dead(self, table: pa.Table) -> None:
        refused = self.dl_sink.write(table)
        if refused.num_rows:
            raise SinkError(
                "dead_letter",
                f"the dead-letter output refused {refused.num_rows} letter(s)",
                fix="check the dead_letter path and its format",
            )

    # ------------------------------------------------------------------ sinks

    def _sink_handler(self, sink: Sink) -> Callable[[pa.Table], None]:
        stats = self.stats[sink.step_id]
        attempts, backoff = self._retry

        def handle(frame: Frame) -> None:
            t0 = time.perf_counter()
            table = as_arrow(frame)  # in the sink's own thread, in parallel with the steps
            n = table.num_rows
            try:
                dead = retry(lambda: sink.write(table), attempts=attempts, backoff=backoff)
            except (TransientError, TerminalError) as exc:
                dead = rows_dead_letters(
                    table, step_id=sink.step_id, reason="sink_rejected", message=str(exc)
                )
            stats.add(n, n - dead.num_rows, dead.num_rows, 0, time.perf_counter() - t0)
            self._dead(dead)

        return handle

    # ------------------------------------------------------------------ steps

    def _process(self, outputs: dict[str, Frame | None], start: int = 0) -> None:
        for step, inputs in self.steps[start:]:
            if step.step_id in outputs:
                continue
            ins = [t for i in inputs if (t := outputs.get(i)) is not None and frame_rows(t)]
            if not ins:
                outputs[step.step_id] = None
                continue
            table = ins[0] if len(ins) == 1 else concat(ins)
            t0 = time.perf_counter()
            try:
                res = self._call_step(step, table)
            except SluiceError as exc:
                self._dead(getattr(exc, "dead", None))  # write what the step found, then stop
                raise
            out = res.table
            n_out = frame_rows(out) if out is not None else 0
            self.stats[step.step_id].add(
                frame_rows(table),
                n_out,
                res.dead.num_rows,
                res.filtered,
                time.perf_counter() - t0,
                res.aggregated,
                getattr(step, "creates_rows", False),
            )
            self._dead(res.dead)
            outputs[step.step_id] = out
        for i, (_sink, inputs) in enumerate(self.sinks):
            ins = [t for src in inputs if (t := outputs.get(src)) is not None and frame_rows(t)]
            for t in ins:
                self._workers[i].put(t)

    def _call_step(self, step: Step, table: Frame) -> StepResult:
        return step.process(table)

    def _process_pending(self, pending: list[pa.Table]) -> None:
        """Merge small source batches; batches whose types cannot be merged (a column that
        changed type between files or blocks) go through one by one instead."""
        try:
            merged = concat(pending)
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            for table in pending:
                self._process({self.cfg.source.id: table})
            return
        self._process({self.cfg.source.id: merged})

    def _finish_steps(self, method: str = "finish") -> None:
        """Call ``finish`` (end of input) — or, in stream mode, ``tick`` (time passed without
        input) on steps that have it — and send what they release down the pipeline."""
        for idx, (step, _) in enumerate(self.steps):
            call = getattr(step, method, None)
            released = call() if call is not None else None
            if released is None:
                continue
            # a step with a large output (whole-input SQL) returns an iterator of results,
            # consumed one at a time so that memory stays bounded
            results = [released] if isinstance(released, StepResult) else released
            for res in results:
                n_out = frame_rows(res.table) if res.table is not None else 0
                # rows released at the end count as created by this call (nothing came in)
                self.stats[step.step_id].add(0, n_out, res.dead.num_rows, 0, 0.0)
                self._dead(res.dead)
                if n_out:
                    self._process({step.step_id: res.table}, start=idx + 1)

    # ------------------------------------------------------------------ run

    def _raise_worker_error(self) -> None:
        for w in [*self._workers, self._dl_worker]:
            if w.error is not None:
                raise w.error

    def _read(self, q: queue.Queue[Any]) -> None:
        try:
            for chunk in self.source.read():
                while True:
                    if self.stop.is_set():
                        return
                    try:
                        q.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            q.put(_END)
        except BaseException as exc:
            q.put(_Failed(exc))

    def _chunks(self) -> Iterator[Chunk]:
        q: queue.Queue[Any] = queue.Queue(maxsize=self.cfg.settings.queue_size)
        reader = threading.Thread(target=self._read, args=(q,), name="sluice-reader", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    # a sink or the dead-letter writer failed: the reader stops without an end
                    # marker, so the failure must be raised from here
                    self._raise_worker_error()
                    if self.stop.is_set() and not reader.is_alive() and q.empty():
                        raise RuntimeError("the reader stopped without finishing") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            self.stop.set()
            while reader.is_alive():
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.05)

    def run(self) -> RunReport:
        """Run to the end of the input; return the report (also written as JSON)."""
        rep = self.report
        started = time.perf_counter()
        rep.started_at = dt.datetime.now(dt.UTC).isoformat()
        rep.dead_letter_path = str(self.dl_path)
        self._workers = [
            _Worker(
                f"sluice-sink-{sink.step_id}",
                self._sink_handler(sink),
                self.cfg.settings.queue_size,
                self.stop,
            )
            for sink, _ in self.sinks
        ]
        opened: list[Source | Step | Sink] = []
        error: BaseException | None = None
        src_stats = self.stats[self.cfg.source.id]
        try:
            self._dl_worker.start()
            parts: list[Source | Step | Sink] = [
                self.source,
                *(s for s, _ in self.steps),
                *(s for s, _ in self.sinks),
            ]
            for obj in parts:
                obj.open(self.ctx)
                opened.append(obj)
                fields = getattr(obj, "pii_fields", None)
                if fields:  # a contract names PII fields: mask them in every dead letter
                    self._pii |= set(fields)
                    self._pii_steps.add(obj.step_id)
            for w in self._workers:
                w.start()
            pending: list[pa.Table] = []
            pending_rows = 0
            batch_rows = self.cfg.settings.batch_rows
            with RunProgress(
                self.cfg.pipeline, self.source.size_hint(), self.show_progress
            ) as progress:
                for chunk in self._chunks():
                    rep.bytes_read += chunk.bytes_read
                    if chunk.skipped:
                        src_stats.rows_in += chunk.skipped
                        src_stats.skipped += chunk.skipped
                    if chunk.dead is not None and chunk.dead.num_rows:
                        src_stats.dead += chunk.dead.num_rows
                        src_stats.rows_in += chunk.dead.num_rows
                        self._dead(chunk.dead)
                    if chunk.table is not None and chunk.table.num_rows:
                        n = chunk.table.num_rows
                        src_stats.rows_in += n
                        src_stats.rows_out += n
                        rep.rows_read += n
                        pending.append(chunk.table)
                        pending_rows += n
                        if pending_rows >= batch_rows:
                            self._process_pending(pending)
                            pending, pending_rows = [], 0
                    progress.update(
                        rep.bytes_read, rep.rows_read, self._dl_count, time.perf_counter() - started
                    )
                if pending:
                    self._process_pending(pending)
                self._finish_steps()
                for w in self._workers:
                    w.put(_END)
                for w in self._workers:
                    w.join()
                    if w.error is not None:
                        raise w.error
                for sink, _ in self.sinks:
                    sink.commit()
                progress.update(
                    rep.bytes_read, rep.rows_read, self._dl_count, time.perf_counter() - started
                )
            rep.status = "succeeded"
        except BaseException as exc:
            error = exc
            rep.status = "failed"
            rep.error = _describe(exc)
            self.stop.set()
            for w in self._workers:
                if w.is_alive():
                    w.put(_END)
            for w in self._workers:
                if w.ident is not None:  # started
                    w.join(timeout=30)
            for sink, _ in self.sinks:
                if sink in opened:
                    try:
                        sink.abort()
                    except Exception as abort_exc:  # keep the original error
                        rep.error += f"; abort of sink '{sink.step_id}' failed: {abort_exc}"
        finally:
            self._close_dead_letters(rep)
            closable: list[Source | Step] = [self.source, *(s for s, _ in self.steps)]
            for obj in reversed(closable):
                if obj in opened:
                    with contextlib.suppress(Exception):  # closing never hides the outcome
                        obj.close()
            rep.seconds = time.perf_counter() - started
            rep.finished_at = dt.datetime.now(dt.UTC).isoformat()
            rep.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            for step, _ in self.steps:
                quality = getattr(step, "quality_report", None)
                result = quality() if quality is not None else None
                if result:
                    rep.quality[step.step_id] = result
            rep.dead_letters = self._dl_count
            rep.dead_letters_by_reason = dict(self._dl_reasons)
            if not self._dl_count:
                rep.dead_letter_path = None
            rep.write(self.report_path)
        if error is not None:
            raise error
        return rep

    def _close_dead_letters(self, rep: RunReport) -> None:
        """Dead letters are committed even when the run failed: they are never lost."""
        self._dl_worker.put(_END)
        self._dl_worker.join()
        if not self._dl_open:
            return
        if self._dl_worker.error is not None:
            self.dl_sink.abort()
            msg = f"writing dead letters failed: {_describe(self._dl_worker.error)}"
            rep.status = "failed"
            rep.error = f"{rep.error}; {msg}" if rep.error else msg
            print(f"sluice: {msg}", file=sys.stderr)
            return
        try:
            self.dl_sink.commit()
        except Exception as exc:  # keep the run's own outcome; say the letters were not saved
            msg = f"committing dead letters failed: {_describe(exc)}"
            rep.status = "failed"
            rep.error = f"{rep.error}; {msg}" if rep.error else msg
            print(f"sluice: {msg}", file=sys.stderr)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SluiceError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


def run_pipeline(
    config: PipelineConfig, *, base_dir: Path | None = None, progress: bool | None = None
) -> RunReport:
    """Run a pipeline with the local executor and return its report."""
    return Executor(config, base_dir=base_dir, progress=progress).run()
