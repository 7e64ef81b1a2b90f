"""The stream executor: the same pipeline over an unbounded source, exact after a crash.

::

    reader thread: source.poll() ─(bounded queue)─▶ main thread: cut micro-batches (batch_rows
    or linger) → steps → sinks (epoch adapters) ─▶ every checkpoint.every: checkpoint

**Micro-batches.** Records are cut into a batch when ``settings.batch_rows`` have arrived or the
first waiting record has waited ``settings.linger`` (default 50 ms). The queue between the reader
and the steps is bounded (``settings.queue_size`` chunks) and sinks are written on the main
thread, so a slow sink pauses the reader: memory stays flat.

**Checkpoints** (every ``checkpoint.every``, at a batch boundary), in this order:

1. every sink *prepares* the epoch: its rows become durable but stay invisible (file parts under
   temporary names, database rows staged in a local Arrow file; see :mod:`sluice.runtime.epochs`);
2. the checkpoint — epoch, source position, every stateful step's snapshot, every sink's token —
   is saved in one SQLite transaction (:mod:`sluice.state.checkpoints`). This is the commit point;
3. every sink *publishes* the epoch (rename / one transaction with an epoch marker);
4. the source is told the position is durable (Redis ``XACK``, Kafka offset commit), on a
   separate thread so the main thread does not wait for it.

A crash anywhere restarts from the newest complete checkpoint: state restored, the checkpointed
epoch's outputs rolled forward, anything newer discarded, the source re-read right after the
checkpointed position. Outputs then equal an uninterrupted run. A truncated or corrupt newest
checkpoint falls back to the previous one.

**Failures.** A sink write that fails transiently is retried with exponential backoff and jitter;
a batch a sink refuses for good is bisected so that exactly the refused rows become dead letters
(``sink_rejected``) and the stream keeps flowing. A stateless step that fails on a record's values
is bisected the same way: the poison record becomes a dead letter ``step_error`` instead of
crashing the process into a restart loop (see :meth:`StreamExecutor._call_step` for what stops
the run instead). A source error is retried; the stream stops only if retries run out.

**Stopping.** SIGINT/SIGTERM (or :meth:`StreamExecutor.request_stop`) stop reading, process what
was read, write a final checkpoint and exit. With ``until_idle`` the run also ends after no record
arrived for that long, which counts as the end of input: windows are flushed first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from sluice.batch import Frame, as_arrow, concat, frame_rows, rows_dead_letters
from sluice.config.models import STREAM_SOURCE_KINDS, PipelineConfig
from sluice.errors import ConfigError, StepError, TerminalError
from sluice.plugins import RunContext, Sink, Step, StepResult, StreamSource
from sluice.quality.engine import ContractFailure
from sluice.runtime.epochs import (
    DEAD_LETTER_TOKEN,
    EpochSink,
    FileEpochSink,
    StagedEpochSink,
    sink_tokens,
)
from sluice.runtime.executor import Executor, dead_letter_sink
from sluice.runtime.faults import crash_point
from sluice.runtime.report import RunReport
from sluice.runtime.retry import retry
from sluice.state.checkpoints import Checkpoint, CheckpointStore, CorruptCheckpoint, StoreBusy

_END: Any = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Feed:
    """Synchronous stand-in for the batch executor's sink worker: write on this thread."""

    def __init__(self, handle: Callable[[Any], None]) -> None:
        self.handle = handle
        self.error: BaseException | None = None

    def put(self, item: Any) -> None:
        if item is _END:
            return
        self.handle(item)

    def is_alive(self) -> bool:
        return False


class _Acker(threading.Thread):
    """Tells the source which positions are durable, off the main thread (an XACK of a second
    of messages takes tens of milliseconds). Only the newest waiting position is sent."""

    def __init__(self, source: StreamSource) -> None:
        super().__init__(name="sluice-acker", daemon=True)
        self.source = source
        self.q: queue.Queue[Any] = queue.Queue()
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.q.get()
            done = item is _END
            while not done:  # coalesce: a newer position covers the older ones
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _END:
                    done = True
                else:
                    item = nxt
            if item is not _END:
                try:
                    self.source.commit(item)
                except Exception as exc:  # the checkpoint is durable; acking again is safe
                    self.error = exc
                    print(f"sluice: acknowledging the source failed: {exc}", file=sys.stderr)
            if done:
                return


# Errors a record's values can cause in a step (a cast that fails, a division, bad JSON, a
# DuckDB conversion). Anything else (AttributeError, TypeError, ...) is a bug or an outage and
# stops the run instead of turning every record into a dead letter.
_DATA_ERRORS: tuple[type[Exception], ...] = (
    pl.exceptions.PolarsError,
    duckdb.Error,
    pa.ArrowException,
    ValueError,
    ArithmeticError,
    UnicodeError,
    StepError,
)


def _slice(frame: Frame, offset: int, length: int) -> Frame:
    return frame.slice(offset, length)


class StreamExecutor(Executor):
    """Run a streaming :class:`PipelineConfig` until stopped (or idle, with ``until_idle``)."""

    streaming = True

    def __init__(
        self,
        config: PipelineConfig,
        *,
        base_dir: Path | None = None,
        run_id: str | None = None,
        progress: bool | None = None,
        report_path: Path | None = None,
        source: StreamSource | None = None,
        sinks: Mapping[str, Sink] | None = None,
        until_idle: float | None = None,
        handle_signals: bool = True,
    ) -> None:
        # a streaming config builds a stream source (build_components, via Executor)
        super().__init__(
            config,
            base_dir=base_dir,
            run_id=run_id,
            progress=progress,
            report_path=report_path,
            source=source,  # type: ignore[arg-type]
            sinks=sinks,
        )
        stream_source: StreamSource = self.source  # type: ignore[assignment]
        self.linger = config.settings.linger  # durations are seconds, checked by the config
        self.every = config.checkpoint.every
        self.until_idle = until_idle
        self.handle_signals = handle_signals
        self.stream_source: StreamSource = stream_source
        self._acker = _Acker(stream_source)
        self._last_step_error = ""
        self._stateful = [s for s, _ in self.steps if hasattr(s, "snapshot")]
        self._stop_requested = threading.Event()
        self.epoch = 0
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0
        self.position: Any = None
        self.restored_from: int | None = None
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ construction

    def _dead_letter_output(self) -> tuple[Path, FileEpochSink]:
        """A stream writes its dead letters like a file sink: part files per epoch."""
        fmt = {"pipeline": self.cfg.pipeline, "run_id": self.run_id}
        dl_dir = self.cfg.dead_letter.path.format(**fmt)
        return self.ctx.resolve(dl_dir), FileEpochSink(dead_letter_sink(self.cfg, dl_dir), self.ctx)

    def _configure_step(self, step: Step) -> None:
        if hasattr(step, "per_partition") and self.cfg.source.kind in STREAM_SOURCE_KINDS:
            step.per_partition = True  # broker partitions: one watermark each
        if self.cfg.checkpoint.backend != "rocksdb" or not hasattr(step, "use_key_store"):
            return
        from sluice.state.rocks import RocksKeys

        root = self.store_path.with_name(self.store_path.name + ".rocksdb") / step.step_id
        keep = self.cfg.checkpoint.keep + 1
        step.use_key_store(lambda name: RocksKeys(root / name, keep=keep))

    def request_stop(self) -> None:
        """Stop gracefully: finish the current batch, write a final checkpoint, return."""
        self._stop_requested.set()

    # ------------------------------------------------------------------ sinks

    def _stream_sink_handler(self, esink: EpochSink) -> Callable[[Frame], None]:
        stats = self.stats[esink.step_id]
        attempts, backoff = self._retry

        def write(table: pa.Table) -> pa.Table:
            try:
                return retry(lambda: esink.write(table), attempts=attempts, backoff=backoff)
            except TerminalError as exc:
                # refused for good (an outage that outlasts the retries raises instead: the run
                # stops and resumes from its checkpoint, nothing is dead-lettered for it)
                if table.num_rows > 1:  # isolate exactly the refused rows
                    half = table.num_rows // 2
                    parts = [write(table.slice(0, half)), write(table.slice(half))]
                    return pa.concat_tables(parts)
                return rows_dead_letters(
                    table, step_id=esink.step_id, reason="sink_rejected", message=str(exc)
                )

        def handle(frame: Frame) -> None:
            t0 = time.perf_counter()
            table = as_arrow(frame)
            dead = write(table)
            n = table.num_rows
            stats.add(n, n - dead.num_rows, dead.num_rows, 0, time.perf_counter() - t0)
            self._dead(dead)

        return handle

    # ------------------------------------------------------------------ steps

    def _call_step(self, step: Step, table: Frame) -> StepResult:
        """Poison isolation: a batch that makes a stateless step raise is bisected until the
        records that fail are found; they become dead letters ``step_error`` and the stream
        goes on. Errors that mean "stop" (a contract's ``fail`` action, a configuration error)
        and errors of stateful steps (whose state a failed call may have changed) stop the run;
        the restart resumes from the last checkpoint."""
        if hasattr(step, "snapshot"):
            return step.process(table)
        res = self._try_step(step, table)
        if res is not None:
            return res
        return self._bisect(step, table)

    def _try_step(self, step: Step, table: Frame) -> StepResult | None:
        try:
            return step.process(table)
        except (ConfigError, ContractFailure):
            raise
        except _DATA_ERRORS as exc:  # what a record's value can cause: isolate the record
            self._last_step_error = self.redactor.render(exc)
            return None

    def _bisect(self, step: Step, table: Frame) -> StepResult:
        n = frame_rows(table)
        message = self._last_step_error
        if n > 1 and not self._systematic(step, table):
            half = n // 2
            parts = [_slice(table, 0, half), _slice(table, half, n - half)]
            done = []
            for part in parts:
                res = self._try_step(step, part)
                done.append(res if res is not None else self._bisect(step, part))
            outs = [r.table for r in done if r.table is not None and frame_rows(r.table)]
            return StepResult(
                concat(outs) if len(outs) > 1 else (outs[0] if outs else None),
                dead=pa.concat_tables([r.dead for r in done]),
                filtered=sum(r.filtered for r in done),
                aggregated=sum(r.aggregated for r in done),
            )
        return StepResult(
            None,
            dead=rows_dead_letters(
                table, step_id=step.step_id, reason="step_error", message=message
            ),
        )

    def _systematic(self, step: Step, table: Frame) -> bool:
        """A failing part whose first, middle and last rows each fail alone: every row is
        taken to fail (a systematic error), so the part is dead-lettered without bisecting
        it record by record."""
        n = frame_rows(table)
        if n < 64:
            return False
        return all(self._try_step(step, _slice(table, i, 1)) is None for i in (0, n // 2, n - 1))

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, store: CheckpointStore) -> None:
        t0 = time.perf_counter()
        epoch = self.epoch
        tokens: dict[str, Any] = {s.step_id: s.prepare() for s in self.epoch_sinks}
        tokens[DEAD_LETTER_TOKEN] = self.dl_epoch.prepare()
        state = {s.step_id: s.snapshot() for s in self._stateful}
        crash_point("before_checkpoint")
        store.save(Checkpoint(epoch=epoch, position=self.position, state=state, sinks=tokens))
        crash_point("after_checkpoint")
        # rows a database refuses while publishing are dead letters of this same epoch
        self._publish_epoch(epoch, tokens, self.dl_epoch)
        crash_point("before_ack")
        if self.position is not None:
            self._acker.q.put(self.position)
        self.epoch = epoch + 1
        for s in self.epoch_sinks:
            s.begin(self.epoch)
        self.dl_epoch.begin(self.epoch)
        self.checkpoints += 1
        self.checkpoint_seconds += time.perf_counter() - t0

    def _restore(self, store: CheckpointStore) -> None:
        cp, warnings = store.load()
        self.warnings.extend(warnings)
        for w in warnings:
            self.redactor.warn(w)
        if cp is None and warnings:
            raise ConfigError(
                f"no intact checkpoint in {self.store_path}: every kept checkpoint is damaged, "
                "and starting a new history would replace the outputs written so far",
                field="checkpoint.path",
                fix="restore the checkpoint file from a copy, or move it away to start over "
                "(file outputs of the old history are then replaced)",
            )
        epoch = cp.epoch if cp is not None else 0
        tokens = cp.sinks if cp is not None else {}
        if cp is not None:
            # roll the checkpointed epoch forward; refused rows become its dead letters
            self._publish_epoch(epoch, tokens, self.dl_epoch, recovering=True)
        else:  # a new history: a database sink must not hold epochs of it already
            attempts, backoff = self._retry
            for s in self.epoch_sinks:
                if isinstance(s, StagedEpochSink):
                    retry(
                        lambda s=s: s.recover(0, None),  # type: ignore[misc]
                        attempts=attempts,
                        backoff=max(backoff, 0.5),
                    )
        by_sink, dl_token = sink_tokens(tokens)
        self.dl_epoch.recover(epoch, dl_token)
        for s in self.epoch_sinks:
            if isinstance(s, FileEpochSink):
                s.recover(epoch, by_sink.get(s.step_id))
        if cp is not None:
            self.restored_from = cp.epoch
            for step in self._stateful:
                saved = cp.state.get(step.step_id)
                if saved is not None:
                    step.restore(saved)  # type: ignore[attr-defined]
            self.position = cp.position
        self.epoch = epoch + 1
        for s in self.epoch_sinks:
            s.begin(self.epoch)
        self.dl_epoch.begin(self.epoch)

    # ------------------------------------------------------------------ reading

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def _read_stream(self, q: queue.Queue[Any]) -> None:
        attempts, backoff = self._retry
        try:
            while not self.stop.is_set():
                chunk = retry(
                    lambda: self.stream_source.poll(self.linger),
                    attempts=attempts,
                    backoff=backoff,
                    sleep=self._sleep,  # a stop interrupts the backoff
                )
                if chunk is None:
                    continue
                while not self.stop.is_set():
                    try:
                        q.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if chunk.end:
                    return
        except BaseException as exc:
            while not self.stop.is_set():
                try:
                    q.put(_Failed(exc), timeout=0.1)
                    return
                except queue.Full:
                    continue

    # ------------------------------------------------------------------ run

    def run(self) -> RunReport:
        rep = self.report
        started = time.perf_counter()
        rep.started_at = dt.datetime.now(dt.UTC).isoformat()
        rep.dead_letter_path = str(self.dl_path)
        self._workers = [
            _Feed(self._stream_sink_handler(es))  # type: ignore[misc]
            for es in self.epoch_sinks
        ]
        self._dl_worker = _Feed(self._write_dead)  # type: ignore[assignment]
        old_handlers: dict[signal.Signals, Any] = {}
        opened: list[Any] = []
        error: BaseException | None = None
        src_stats = self.stats[self.cfg.source.id]
        reader: threading.Thread | None = None
        status = _Status(self)
        store: CheckpointStore | None = None
        try:
            if self.handle_signals and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    old_handlers[sig] = signal.signal(sig, lambda *_: self.request_stop())
            try:
                store = CheckpointStore(self.store_path, self.cfg.checkpoint.keep, lock=True)
            except StoreBusy as exc:
                raise ConfigError(
                    f"{exc}: another process runs stream pipeline '{self.cfg.pipeline}'",
                    field="checkpoint.path",
                    fix="stop the other process first (one process per checkpoint store)",
                ) from None
            except CorruptCheckpoint as exc:
                raise ConfigError(
                    str(exc),
                    field="checkpoint.path",
                    fix="restore the file from a copy, or move it away to start over (file "
                    "outputs of the old history are then replaced)",
                ) from exc
            sink_ctx = RunContext(self.cfg.pipeline, f"stream-{store.stream_id}", self.ctx.base_dir)
            self.sink_ctx = sink_ctx
            for es in self.epoch_sinks:
                if isinstance(es, StagedEpochSink):
                    es.use_context(sink_ctx)
            for step, _ in self.steps:
                step.open(self.ctx)
                opened.append(step)
                self._configure_step(step)
                fields = getattr(step, "pii_fields", None)
                if fields:
                    self.redactor.declare(step.step_id, fields)
            self.redactor.follow(self.cfg)
            self._restore(store)
            self._dl_open = True
            self.stream_source.open(self.ctx, self.position)
            opened.append(self.stream_source)
            self._acker.start()
            if self.position is not None:
                self._acker.q.put(self.position)
            q: queue.Queue[Any] = queue.Queue(maxsize=self.cfg.settings.queue_size)
            reader = threading.Thread(
                target=self._read_stream, args=(q,), name="sluice-stream-reader", daemon=True
            )
            reader.start()
            pending: list[pa.Table] = []
            pending_rows = 0
            first_at = 0.0
            last_data = time.monotonic()
            last_tick = last_data
            next_ckpt = time.monotonic() + self.every
            batch_rows = self.cfg.settings.batch_rows
            ended = False
            while True:
                now = time.monotonic()
                wait = next_ckpt - now
                if pending:
                    wait = min(wait, first_at + self.linger - now)
                try:
                    item = q.get(timeout=max(0.001, min(wait, 0.1)))
                except queue.Empty:
                    item = None
                if isinstance(item, _Failed):
                    raise item.exc
                if item is not None:
                    rep.bytes_read += item.bytes_read
                    if item.position is not None:
                        self.position = item.position
                    if item.skipped:
                        src_stats.rows_in += item.skipped
                        src_stats.skipped += item.skipped
                    if item.dead is not None and item.dead.num_rows:
                        src_stats.dead += item.dead.num_rows
                        src_stats.rows_in += item.dead.num_rows
                        self._dead(item.dead)
                        last_data = time.monotonic()
                    if item.table is not None and item.table.num_rows:
                        n = item.table.num_rows
                        src_stats.rows_in += n
                        src_stats.rows_out += n
                        rep.rows_read += n
                        if not pending:
                            first_at = time.monotonic()
                        pending.append(item.table)
                        pending_rows += n
                        last_data = time.monotonic()
                    ended = item.end
                now = time.monotonic()
                if self.until_idle is not None and now - last_data >= self.until_idle:
                    ended = True
                stopping = self._stop_requested.is_set()
                checkpoint_due = now >= next_ckpt or ended or stopping
                if pending and (
                    pending_rows >= batch_rows
                    or now - first_at >= self.linger
                    or checkpoint_due  # the checkpoint's position covers every pending record
                ):
                    self._process_pending(pending)
                    pending, pending_rows = [], 0
                if ended:
                    self._finish_steps()
                elif item is None and not pending and now - last_tick >= self.linger:
                    # quiet input: idle partitions and early updates still move on
                    self._finish_steps("tick")
                    last_tick = now
                if checkpoint_due:
                    self._checkpoint(store)
                    next_ckpt = time.monotonic() + self.every
                status.update()
                if ended or stopping:
                    break
            rep.status = "succeeded" if ended else "stopped"
        except BaseException as exc:
            error = exc
            rep.status = "failed"
            rep.error = self.redactor.render(exc)
        finally:
            self.stop.set()
            status.close()
            if self._acker.is_alive():
                self._acker.q.put(_END)
                self._acker.join(timeout=30)
            if reader is not None:
                reader.join(timeout=30)
                if reader.is_alive():  # stuck in a source call: do not close under its feet
                    opened = [o for o in opened if o is not self.stream_source]
            for s in self.epoch_sinks:
                with contextlib.suppress(Exception):
                    s.close()
            with contextlib.suppress(Exception):
                self.dl_epoch.close()
            for obj in reversed(opened):
                with contextlib.suppress(Exception):
                    obj.close()
            if store is not None:
                store.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            rep.seconds = time.perf_counter() - started
            rep.finished_at = dt.datetime.now(dt.UTC).isoformat()
            rep.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            rep.dead_letters = self._dl_count
            rep.dead_letters_by_reason = dict(self._dl_reasons)
            rep.stream = {
                "epoch": self.epoch - 1,
                "checkpoints": self.checkpoints,
                "checkpoint_seconds": round(self.checkpoint_seconds, 4),
                "restored_from": self.restored_from,
                "checkpoint_store": str(self.store_path),
                "warnings": self.warnings,
            }
            if not self._dl_count:
                rep.dead_letter_path = None
            if rep.error:
                rep.error = self.redactor.text(rep.error)
            rep.write(self.report_path)
        if error is not None:
            self.redactor.scrub(error)
            raise error
        return rep


class _Status:
    """A live status line on a terminal: rate, lag, watermark, dead letters, epoch."""

    def __init__(self, ex: StreamExecutor) -> None:
        self.ex = ex
        self.on = bool(ex.show_progress) and sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.last_rows = 0
        self.lag: int | None = None

    def update(self) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if now - self.last < 1.0:
            return
        rows = self.ex.report.rows_read
        rate = (rows - self.last_rows) / (now - self.last) if self.last else 0.0
        self.last, self.last_rows = now, rows
        lag_fn = getattr(self.ex.stream_source, "lag", None)
        if lag_fn is not None:
            with contextlib.suppress(Exception):
                self.lag = lag_fn()
        marks = [w for s, _ in self.ex.steps if (w := getattr(s, "watermark", None)) is not None]
        wm = (
            dt.datetime.fromtimestamp(min(marks) / 1e6, dt.UTC).strftime("%H:%M:%S")
            if marks
            else "-"
        )
        line = (
            f"\r{self.ex.cfg.pipeline}: {rows:,} records  {rate:,.0f}/s  "
            f"lag {self.lag if self.lag is not None else '-'}  watermark {wm}  "
            f"dead letters {self.ex._dl_count:,}  epoch {self.ex.epoch}  "
        )
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\n")


def run_stream(
    config: PipelineConfig,
    *,
    base_dir: Path | None = None,
    progress: bool | None = None,
    until_idle: float | None = None,
) -> RunReport:
    """Run a streaming pipeline until SIGINT/SIGTERM (or idle for ``until_idle`` seconds)."""
    return StreamExecutor(config, base_dir=base_dir, progress=progress, until_idle=until_idle).run()


__all__ = ["StreamExecutor", "run_stream"]
