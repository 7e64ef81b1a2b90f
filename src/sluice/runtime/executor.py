"""The local executor: one process, Arrow micro-batches, bounded queues between threads.

::

    reader thread ─(queue)─▶ main thread: steps, in order ─(queue per sink)─▶ sink threads
                                   │                                                │
                                   └───── dead letters ─(queue)─▶ dead-letter thread ◀┘

Queues are bounded (``settings.queue_size`` batches), so a slow sink pauses the steps and the
reader: memory does not grow with the input. Arrow, Polars and DuckDB release the GIL while they
work, so reading, computing and writing overlap on separate cores.

**A batch run is one epoch** of the stream's commit protocol (:mod:`sluice.runtime.epochs`):
every sink thread writes its epoch sink (file parts under temporary names; database and broker
rows staged in Arrow files on disk), then at the end of the input every sink *prepares* (its
output durable, still invisible), one **commit record** is saved in the pipeline's state store
(``checkpoint.path``, default ``state/{pipeline}.db``, table ``batch_runs``), and every sink
*publishes* (rename; one transaction with the run's marker). A crash or a failed publish after
the commit record is rolled forward at the next start of the same pipeline, before it reads
anything; a crash before it leaves nothing visible (temporary files are deleted at the next
start). So the sinks of a run are never half-visible for good and never doubled. The file
sinks' ``mode`` (overwrite by default) is applied at publish. A pipeline whose only sinks are
custom batch sinks (:class:`~sluice.plugins.Sink`, e.g. the test kit's) needs no state store:
they are committed one after the other.

If anything fails before the commit record, the data sinks abort (no partial output) — each on
its own thread once its write in progress returned, so an abort never races a write — while the
dead letters collected so far are still committed, so nothing is lost; the error is re-raised
after the report is written. Every message that leaves the run (dead letters, the report's
error, the exception re-raised, stderr) goes through the run's
:class:`~sluice.runtime.redact.Redactor`: with PII declared, no value of a record is in it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import resource
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sluice.batch import (
    DEAD_LETTER_SCHEMA,
    Frame,
    as_arrow,
    column_names,
    concat,
    frame_rows,
    rows_dead_letters,
)
from sluice.config.models import JsonlSink, ParquetSink, PipelineConfig
from sluice.config.validate import build_components, step_kind
from sluice.connectors.files.writers import remove_temporaries
from sluice.errors import ConfigError, SinkError, SluiceError, TerminalError, TransientError
from sluice.plugins import (
    Chunk,
    EpochPublisher,
    RunContext,
    Sink,
    Source,
    Step,
    StepResult,
    lookup,
)
from sluice.runtime.epochs import (
    DEAD_LETTER_TOKEN,
    EpochSink,
    FileEpochSink,
    PlainEpochSink,
    StagedEpochSink,
    epoch_sink,
    sink_tokens,
)
from sluice.runtime.faults import crash_point
from sluice.runtime.progress import RunProgress, progress_wanted
from sluice.runtime.redact import Redactor
from sluice.runtime.report import RunReport, StepStats
from sluice.runtime.retry import retry
from sluice.state.checkpoints import Checkpoint, CheckpointStore, CorruptCheckpoint, StoreBusy

_END: Any = object()


@dataclass
class _Failed:
    exc: BaseException


def dead_letter_sink(
    config: PipelineConfig, path: str, kind: str | None = None
) -> JsonlSink | ParquetSink:
    """The file sink config of the dead-letter output at ``path`` (a file, or a folder)."""
    if (kind or config.dead_letter.kind) == "jsonl":
        return JsonlSink(id="dead_letter", kind="jsonl", path=path)
    return ParquetSink(id="dead_letter", kind="parquet", path=path)


def new_run_id() -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:6]}"


class _Worker(threading.Thread):
    """Feeds one sink from a bounded queue; records its failure instead of dying silently.

    :meth:`request_abort` stops it cooperatively: it writes nothing more, and runs
    ``on_abort`` itself once the write in progress has returned, so an abort never runs while
    this thread is still writing."""

    def __init__(
        self,
        name: str,
        handle: Callable[[Any], None],
        queue_size: int,
        stop: threading.Event,
        on_abort: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.handle = handle
        self.stop_event = stop
        self.error: BaseException | None = None
        self.on_abort = on_abort
        self.aborting = threading.Event()
        self.abort_done = False
        self.abort_error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                try:
                    item = self.q.get(timeout=0.1)
                except queue.Empty:
                    if self.aborting.is_set():
                        return
                    continue
                if item is _END:
                    return
                if self.error is not None or self.aborting.is_set():
                    continue  # drain so producers never block on a dead worker
                try:
                    self.handle(item)
                except BaseException as exc:
                    self.error = exc
                    self.stop_event.set()
        finally:
            if self.aborting.is_set() and self.on_abort is not None:
                try:
                    self.on_abort()
                except BaseException as exc:
                    self.abort_error = exc
                self.abort_done = True

    def request_abort(self) -> None:
        self.aborting.set()

    def put(self, item: Any) -> None:
        while True:
            if self.error is not None and item is not _END:
                raise self.error
            if item is _END and not self.is_alive():
                return
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


class Executor:
    """Run a :class:`PipelineConfig` in this process. Build once, call :meth:`run` once."""

    #: batch (one epoch per run) or stream (:class:`~sluice.runtime.stream.StreamExecutor`);
    #: components are built for that mode
    streaming = False
    #: how long a failed run waits for the sink threads to stop before it returns; a sink still
    #: writing then aborts on its own thread when its write returns
    join_timeout = 30.0

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
        replayed: Sequence[str] = (),
        recovery: PipelineConfig | None = None,
    ) -> None:
        """``source`` and ``sinks`` (by sink id) replace the configured connectors; the test kit
        (:mod:`sluice.testing`) uses them. ``replayed`` (``sluice replay``) are the keys of the
        dead letters this run replays: they enter the replay ledger with the run's commit.
        ``recovery`` is the pipeline whose sinks can publish an earlier run found committed
        but not completely published at the start (default: ``config``; ``sluice replay``,
        whose runs have only some of the sinks, gives the whole pipeline)."""
        self.cfg = config
        self.recovery_cfg = recovery or config
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
        self.redactor = Redactor()
        self.replayed = list(replayed)
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
        self.store_path = self.ctx.resolve(config.checkpoint.path.format(**fmt))
        staging = ".staging" if self.streaming else ".batch-staging"
        self.staging = self.store_path.with_name(self.store_path.name + staging)
        #: the context staged sinks publish under (it keys their epoch markers: the history of
        #: the state store, set when the store is opened)
        self.sink_ctx = RunContext(
            config.pipeline, "batch", self.ctx.base_dir, batch=not self.streaming
        )
        self.epoch_sinks: list[EpochSink] = [
            self._epoch_sink(sink, sk)
            for (sink, _), sk in zip(self.sinks, config.sinks, strict=True)
        ]
        #: sinks that have been sent a batch (a sink is sent one batch without rows before any
        #: other, so that it learns the columns: a single file of a run without rows is empty
        #: but has its header)
        self._sink_fed = [False] * len(self.sinks)
        self.dl_path, self.dl_epoch = self._dead_letter_output()
        self.epoch = 0

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
        self._dl_token: Any = None
        self._dl_published = False
        self._dl_finished = False
        self._dl_worker = _Worker("sluice-dead-letters", self._write_dead, 64, self.stop)
        self._workers: list[_Worker] = []
        self._committed: int | None = None
        self.redactor.learn(self.stats)
        self.redactor.learn(getattr(config.source, "columns", None) or {})

    # ------------------------------------------------------------------ construction

    def _epoch_sink(self, sink: Sink, cfg: Any) -> EpochSink:
        return epoch_sink(
            sink,
            cfg,
            self.ctx,
            stream=self.streaming,
            staging=self.staging,
            sink_ctx=self.sink_ctx,
        )

    def _dead_letter_output(self) -> tuple[Path, FileEpochSink]:
        """A batch run writes its dead letters to one file named after the run."""
        fmt = {"pipeline": self.cfg.pipeline, "run_id": self.run_id}
        dl_dir = self.cfg.dead_letter.path.format(**fmt)
        dl_path = f"{dl_dir}/{self.run_id}.{self.cfg.dead_letter.kind}"
        sink = FileEpochSink(
            dead_letter_sink(self.cfg, dl_path), self.ctx, batch=True, name=self.run_id
        )
        return self.ctx.resolve(dl_path), sink

    def render_error(self, exc: BaseException) -> str:
        """The text of ``exc`` for a person, through this run's redactor (``sluice run``
        prints its error line with it)."""
        return self.redactor.render(exc)

    # ------------------------------------------------------------------ dead letters

    def _render_dead(self, table: pa.Table, run_id: str | None = None) -> pa.Table:
        """Dead letters as they are written: pipeline and run id filled in, PII removed."""
        n = table.num_rows
        table = self.redactor.dead_letters(table)
        table = table.set_column(0, "pipeline", pa.array([self.cfg.pipeline] * n, pa.string()))
        table = table.set_column(1, "run_id", pa.array([run_id or self.run_id] * n, pa.string()))
        return table.cast(DEAD_LETTER_SCHEMA)

    def _count_dead(self, table: pa.Table) -> None:
        counts = pc.value_counts(table.column("reason")).to_pylist()
        with self._dl_lock:
            self._dl_count += table.num_rows
            for c in counts:
                self._dl_reasons[c["values"]] += c["counts"]

    def _dead(self, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            return
        table = self._render_dead(table)
        self._count_dead(table)
        with self._dl_lock:
            if not self._dl_open:
                self.dl_epoch.begin(self.epoch)
                self._dl_open = True
        self._dl_worker.put(table)

    def _write_dead(self, table: pa.Table) -> None:
        refused = self.dl_epoch.write(table)
        if refused.num_rows:
            raise SinkError(
                "dead_letter",
                f"the dead-letter output refused {refused.num_rows} letter(s)",
                fix="check the dead_letter path and its format",
            )

    def _late_letters(
        self,
        dl: FileEpochSink,
        epoch: int,
        dl_token: Any,
        sink_id: str,
        table: pa.Table,
        *,
        run_id: str | None = None,
        this_run: bool = True,
    ) -> Path:
        """Dead letters of a sink's publish: written into the dead-letter output of the epoch
        they come from (before the sink's journal is forgotten)."""
        table = self._render_dead(table, run_id)
        path = dl.write_extra(epoch, dl_token, f"refused-{sink_id}", table)
        if this_run:
            self._count_dead(table)
            stats = self.stats.get(sink_id)
            if stats is not None:  # counted as written when staged; refused at publish
                stats.rows_out -= table.num_rows
                stats.dead += table.num_rows
        return path

    # ------------------------------------------------------------------ sinks

    def _sink_handler(self, sink: EpochSink) -> Callable[[Frame], None]:
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

    def _publish_epoch(
        self,
        epoch: int,
        tokens: Mapping[str, Any],
        dl: FileEpochSink,
        *,
        recovering: bool = False,
        run_id: str | None = None,
        sinks: Mapping[str, EpochSink] | None = None,
    ) -> tuple[list[str], int]:
        """Publish every sink of a committed epoch (retried), put each sink's publish-time dead
        letters into the epoch's dead-letter output, publish that, forget the staged data.
        ``sinks`` (by id) publish the tokens (default: this run's epoch sinks). Returns the
        sinks published and the number of late letters."""
        attempts, backoff = self._retry
        by_token, dl_token = sink_tokens(dict(tokens))
        by_id = dict(sinks) if sinks is not None else {es.step_id: es for es in self.epoch_sinks}
        done: list[str] = []
        late_total = 0
        for sid, token in by_token.items():
            es = by_id.get(sid)
            if es is None:  # a stream restarted without one of its sinks
                self.redactor.warn(
                    f"sink '{sid}' of the checkpointed epoch {epoch} is no longer in the "
                    "pipeline: its output of that epoch was not published"
                )
                continue
            roll = recovering and not isinstance(es, FileEpochSink)
            late = retry(
                partial(es.recover if roll else es.publish, epoch, token),
                attempts=attempts,
                backoff=max(backoff, 0.5),
            )
            crash_point("mid_publish")
            if late.num_rows:
                self._late_letters(
                    dl, epoch, dl_token, sid, late, run_id=run_id, this_run=not recovering
                )
                late_total += late.num_rows
            done.append(sid)
        dl.publish(epoch, dl_token)
        for es in by_id.values():
            es.forget(epoch)
        return done, late_total

    # ------------------------------------------------------------------ batch commit protocol

    def _open_store(self) -> CheckpointStore | None:
        """The state store holding this pipeline's batch commit records (and the replay ledger);
        None when no sink needs it (only custom sinks, which cannot be rolled forward)."""
        durable = any(not isinstance(es, PlainEpochSink) for es in self.epoch_sinks)
        if not durable and not self.replayed:
            return None
        try:
            return CheckpointStore(
                self.store_path, self.cfg.checkpoint.keep, table="batch_runs", lock=True
            )
        except StoreBusy as exc:
            raise ConfigError(
                f"{exc}: another run of pipeline '{self.cfg.pipeline}' is going on",
                field="checkpoint.path",
                fix="wait until it has finished (runs of one pipeline commit one after the "
                "other), or give this pipeline file its own checkpoint.path",
            ) from None
        except (CorruptCheckpoint, OSError) as exc:
            raise ConfigError(
                f"the state store that keeps this pipeline's commit records cannot be used: {exc}",
                field="checkpoint.path",
                value=str(self.store_path),
                fix="make its folder writable or set checkpoint.path elsewhere; if the file is "
                "damaged, restore it from a copy or move it away (a run that was committed but "
                "not completely published is then not rolled forward)",
            ) from exc

    def _recover(self, store: CheckpointStore) -> None:
        """Roll forward the newest commit record if its publish did not finish (a crash, a
        failed publish): every sink of that run publishes its output (idempotently) before
        this run reads anything. The record is marked published only once every one of its
        sinks is; a sink that cannot be built for it stops the run instead (see
        :meth:`_recovery_sinks`)."""
        cp, warnings = store.load()
        for w in warnings:
            self.redactor.warn(w)
        if cp is None:
            return
        published = store.published_epoch()
        if published is not None and published >= cp.epoch:
            return
        old = str((cp.position or {}).get("batch_run", "")) if isinstance(cp.position, dict) else ""
        tokens, dl_token = sink_tokens(cp.sinks)
        dl_token = dl_token or {}
        ext = str(dl_token.get("ext") or self.cfg.dead_letter.kind)
        dl_dir = str(dl_token.get("dir") or self.dl_path.parent)
        dl = FileEpochSink(
            dead_letter_sink(self.cfg, f"{dl_dir}/{old}.{ext}", ext), self.ctx, batch=True, name=old
        )
        built: list[EpochSink] = []
        try:
            sinks = self._recovery_sinks(tokens, old, built)
            done, late = self._publish_epoch(
                cp.epoch, cp.sinks, dl, recovering=True, run_id=old, sinks=sinks
            )
        finally:
            for es in built:
                with contextlib.suppress(Exception):
                    es.close()
        store.mark_published(cp.epoch)
        self.report.recovered = {
            "run_id": old,
            "epoch": cp.epoch,
            "sinks": done,
            "dead_letters": late,
        }
        self.redactor.warn(
            f"run {old} of pipeline '{self.cfg.pipeline}' was committed but not completely "
            f"published (a crash or a failed publish): its output is now published "
            f"(sinks: {', '.join(done) or 'none'})"
        )

    def _recovery_sinks(
        self, tokens: Mapping[str, Any], old: str, built: list[EpochSink]
    ) -> dict[str, EpochSink]:
        """An epoch sink for every sink of a committed run: this run's own when it publishes
        the token as it was committed; for a file sink this run lacks, one built from the token
        (which holds the folder and the files); for a database or broker sink this run lacks
        (a replay runs only some sinks) or configures with another mode, one built from the
        recovery pipeline's config with the mode the run was committed with. New ones are
        appended to ``built`` (the caller closes them). A sink that cannot be built raises:
        its output of that run would be lost."""
        own = {es.step_id: es for es in self.epoch_sinks}
        configs = {sk.id: sk for sk in self.recovery_cfg.sinks}
        out: dict[str, EpochSink] = {}
        for sid, token in tokens.items():
            es = own.get(sid)
            mode = token.get("mode") if isinstance(token, dict) else None
            if isinstance(es, (FileEpochSink, PlainEpochSink)):
                out[sid] = es
                continue
            if isinstance(es, StagedEpochSink) and mode in (None, es.mode):
                out[sid] = es
                continue
            if token is None:  # a custom sink: committed when its run published, nothing staged
                continue
            if isinstance(token, dict) and "ext" in token and "stem" in token:
                made: EpochSink = FileEpochSink.for_token(sid, token, self.ctx)
            else:
                cfg = configs.get(sid)
                publisher = (
                    lookup("sink", cfg.kind)(
                        cfg if mode is None else cfg.model_copy(update={"mode": mode})
                    )
                    if cfg is not None
                    else None
                )
                if not isinstance(publisher, EpochPublisher):
                    raise SinkError(
                        sid,
                        f"run {old} of pipeline '{self.cfg.pipeline}' was committed with sink "
                        f"'{sid}', which this pipeline does not have: that sink's output of the "
                        "run cannot be published, so the run is not marked published",
                        fix="run the pipeline definition that committed it once (its start "
                        "publishes the rest), or add the sink back",
                    )
                made = StagedEpochSink(publisher, self.staging, self.sink_ctx, mode=mode)
            built.append(made)
            out[sid] = made
        return out

    def _clean_dead_letter_folder(self) -> None:
        """Delete the hidden temporary dead-letter files that killed runs of this pipeline left
        behind (the caller holds the pipeline's lock; other pipelines' files stay)."""
        remove_temporaries(
            [self.dl_path.parent], f"*.{self.cfg.dead_letter.kind}", self.cfg.pipeline
        )

    def _finish_dead_letters(self) -> None:
        """Wait until every dead letter queued so far is written; raise if writing failed."""
        if self._dl_finished:
            return
        self._dl_finished = True
        if self._dl_worker.ident is not None:
            self._dl_worker.put(_END)
            self._dl_worker.join()
        if self._dl_worker.error is not None:
            raise self._dl_worker.error

    def _commit(self, store: CheckpointStore | None, epoch: int) -> None:
        """Prepare every sink, save the commit record, publish (see the module docstring)."""
        self._finish_dead_letters()
        tokens: dict[str, Any] = {es.step_id: es.prepare() for es in self.epoch_sinks}
        self._dl_token = tokens[DEAD_LETTER_TOKEN] = self.dl_epoch.prepare()
        if store is None:
            for es in self.epoch_sinks:  # custom sinks only: committed one after the other
                es.publish(epoch, tokens[es.step_id])
            self.dl_epoch.publish(epoch, self._dl_token)
            self._dl_published = True
            return
        crash_point("before_checkpoint")
        store.save(
            Checkpoint(epoch=epoch, position={"batch_run": self.run_id}, sinks=tokens),
            replayed=self.replayed,
            run_id=self.run_id,
        )
        self._committed = epoch
        crash_point("after_checkpoint")
        self._publish_epoch(epoch, tokens, self.dl_epoch)
        self._dl_published = True
        store.mark_published(epoch)

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
            if self.redactor.active:  # column names stay readable in redacted messages
                self.redactor.learn(column_names(table))
            t0 = time.perf_counter()
            try:
                res = self._call_step(step, table)
            except SluiceError as exc:
                self._dead(getattr(exc, "dead", None))  # write what the step found, then stop
                raise
            out = res.table
            n_out = frame_rows(out) if out is not None else 0
            if self.redactor.active and out is not None:  # the columns it made stay readable
                self.redactor.learn(column_names(out))
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
            for src in inputs:
                t = outputs.get(src)
                if t is None or not (frame_rows(t) or not self._sink_fed[i]):
                    continue
                self._sink_fed[i] = True  # a first batch without rows still says the columns
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

    def _open_parts(self, opened: list[Source | Step]) -> None:
        parts: list[Source | Step] = [self.source, *(s for s, _ in self.steps)]
        for obj in parts:
            obj.open(self.ctx)
            opened.append(obj)
            fields = getattr(obj, "pii_fields", None)
            if fields:  # a contract names PII fields: no message of the run may hold them
                self.redactor.declare(obj.step_id, fields)
        self.redactor.follow(self.cfg)  # and every column computed from them

    def run(self) -> RunReport:
        """Run to the end of the input; return the report (also written as JSON)."""
        rep = self.report
        started = time.perf_counter()
        rep.started_at = dt.datetime.now(dt.UTC).isoformat()
        rep.dead_letter_path = str(self.dl_path)
        self._workers = [
            _Worker(
                f"sluice-sink-{es.step_id}",
                self._sink_handler(es),
                self.cfg.settings.queue_size,
                self.stop,
                on_abort=es.close,
            )
            for es in self.epoch_sinks
        ]
        opened: list[Source | Step] = []
        error: BaseException | None = None
        store: CheckpointStore | None = None
        src_stats = self.stats[self.cfg.source.id]
        try:
            self._dl_worker.start()
            self._open_parts(opened)
            store = self._open_store()
            if store is not None:
                # the marker of a staged sink is kept per sink for the store's batch runs
                self.sink_ctx = RunContext(
                    self.cfg.pipeline, f"batch-{store.stream_id}", self.ctx.base_dir, batch=True
                )
                for es in self.epoch_sinks:
                    if isinstance(es, StagedEpochSink):
                        es.use_context(self.sink_ctx)
                self._recover(store)
                # what killed runs of this pipeline left behind (under the store's lock)
                for es in self.epoch_sinks:
                    if isinstance(es, FileEpochSink):
                        es.check_start()
                    elif isinstance(es, StagedEpochSink):
                        es.clear()
                self._clean_dead_letter_folder()
            self.epoch = store.next_epoch() if store is not None else 1
            for es in self.epoch_sinks:
                es.begin(self.epoch)
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
                self._commit(store, self.epoch)
                progress.update(
                    rep.bytes_read, rep.rows_read, self._dl_count, time.perf_counter() - started
                )
            rep.status = "succeeded"
        except BaseException as exc:
            error = exc
            rep.status = "failed"
            rep.error = self.redactor.render(exc)
            if self._committed is not None:
                rep.error += (
                    f"; the run was committed (epoch {self._committed}) but not completely "
                    "published: the next start of this pipeline publishes the rest"
                )
            self.stop.set()
            self._abort_sinks(rep)
        finally:
            self._close_dead_letters(rep)
            for es, w in zip(self.epoch_sinks, self._workers, strict=True):
                if not w.is_alive() and not w.abort_done:
                    try:
                        es.close()  # release connections; a prepared epoch stays as it is
                    except Exception as exc:
                        if error is None:
                            self.redactor.warn(f"closing sink '{es.step_id}' failed: {exc}")
            for obj in reversed(opened):
                with contextlib.suppress(Exception):  # closing never hides the outcome
                    obj.close()
            if store is not None:
                self._release_store(store)
            rep.seconds = time.perf_counter() - started
            rep.finished_at = dt.datetime.now(dt.UTC).isoformat()
            rep.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            for step, _ in self.steps:
                quality = getattr(step, "quality_report", None)
                result = quality() if quality is not None else None
                if result:
                    rep.quality[step.step_id] = self.redactor.quality(result)
            rep.dead_letters = self._dl_count
            rep.dead_letters_by_reason = dict(self._dl_reasons)
            if not self._dl_count:
                rep.dead_letter_path = None
            elif not self.dl_path.exists():  # only letters of a publish: point at their folder
                rep.dead_letter_path = str(self.dl_path.parent)
            if rep.error:
                rep.error = self.redactor.text(rep.error)
            rep.write(self.report_path)
        if error is not None:
            self.redactor.scrub(error)
            raise error
        return rep

    def _abort_sinks(self, rep: RunReport) -> None:
        """After a failure: every sink thread stops taking batches and aborts its sink itself,
        after the write in progress returned (never concurrently with it). A sink still writing
        after :attr:`join_timeout` is left to abort on its own thread; the run returns."""
        for w in self._workers:
            w.request_abort()
        deadline = time.monotonic() + self.join_timeout
        for w in self._workers:
            if w.ident is not None:
                w.join(timeout=max(0.0, deadline - time.monotonic()))
        for es, w in zip(self.epoch_sinks, self._workers, strict=True):
            if w.ident is None:  # never started: nothing can be writing
                try:
                    es.close()
                except Exception as exc:
                    rep.error = f"{rep.error}; abort of sink '{es.step_id}' failed: {exc}"
                w.abort_done = True
            elif w.is_alive():
                msg = (
                    f"sink '{es.step_id}' was still writing {self.join_timeout:g} s after the run "
                    "failed; it aborts on its own thread when that write returns, and the "
                    "pipeline stays locked until then (temporary output left by an exit before "
                    "that is deleted at the next start)"
                )
                rep.error = f"{rep.error}; {msg}"
                self.redactor.warn(msg)
            elif w.abort_error is not None:
                rep.error = (
                    f"{rep.error}; abort of sink '{es.step_id}' failed: "
                    f"{self.redactor.render(w.abort_error)}"
                )

    def _release_store(self, store: CheckpointStore) -> None:
        """Close the state store, which releases the pipeline's lock — but only once no sink
        thread can write any more: a sink still stuck in a write after the run failed (see
        :meth:`_abort_sinks`) keeps the pipeline locked until it has aborted, so the next run
        cannot start (and reuse its epoch number and staging files) under its feet. The process
        exiting releases the lock too; the next start then cleans up."""
        stuck = [w for w in self._workers if w.is_alive()]
        if not stuck:
            store.close()
            return

        def close_when_stopped() -> None:
            for w in stuck:
                w.join()
            store.close()

        threading.Thread(
            target=close_when_stopped, name="sluice-store-release", daemon=True
        ).start()

    def _close_dead_letters(self, rep: RunReport) -> None:
        """Dead letters are committed even when the run failed: they are never lost."""
        try:
            self._finish_dead_letters()
        except BaseException as exc:
            self.dl_epoch.close()
            msg = f"writing dead letters failed: {self.redactor.render(exc)}"
            rep.status = "failed"
            rep.error = f"{rep.error}; {msg}" if rep.error else msg
            self.redactor.warn(msg)
            return
        if self._dl_published or not self._dl_open:
            return
        try:
            if self._dl_token is None:
                self._dl_token = self.dl_epoch.prepare()
            self.dl_epoch.publish(self.epoch, self._dl_token)
            self._dl_published = True
        except Exception as exc:  # keep the run's own outcome; say the letters were not saved
            msg = f"committing dead letters failed: {self.redactor.render(exc)}"
            rep.status = "failed"
            rep.error = f"{rep.error}; {msg}" if rep.error else msg
            self.redactor.warn(msg)


def run_pipeline(
    config: PipelineConfig, *, base_dir: Path | None = None, progress: bool | None = None
) -> RunReport:
    """Run a pipeline with the local executor and return its report."""
    return Executor(config, base_dir=base_dir, progress=progress).run()
