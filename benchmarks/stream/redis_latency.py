"""Redis Streams latency: a paced producer and a Sluice consumer, each in its own process.

    python benchmarks/stream/redis_latency.py produce --stream KEY --rate 50000 --seconds 30 \\
        --result producer.json
    python benchmarks/stream/redis_latency.py consume --stream KEY --pipeline events \\
        --out DIR --result consumer.json [--options JSON]

``run.py`` starts both (consumer first, producer once the consumer is ready) and summarizes.

**Producer.** Adds events to the stream at ``--rate`` events/s for ``--seconds``: batches of
``--batch`` events, each batch due at ``start + i * batch / rate`` (paced by the clock; a batch
that is late is sent at once, never skipped), sent as pipelined ``XADD`` commands through
redis-py (one round trip per batch). Every event is ``{"ts", "key", "value", "status", "pt"}`` in
the message field ``data``: ``pt`` is the produce time in microseconds (``time.time_ns() //
1000``, taken just before the batch is sent, so the Redis round trip counts as latency) and
``ts`` = ``pt // 1000`` (event time = produce time, in ms). ``key``/``value``/``status`` are drawn
like the file's events (seed 42). The producer reports what it achieved: events, seconds,
events/s, and how far behind schedule its batches were sent.

**Consumer.** A Sluice stream pipeline: source ``kind: redis_stream`` (consumer group, schema
declared) -> ``filter: status = 'ok'`` -> [``window`` (``--pipeline windows``)] -> a sink with id
``latency``, configured as a jsonl sink and replaced through ``StreamExecutor(sinks={"latency":
LatencySink()})``. Checkpoints every 1 s. The run ends once no message arrived for 5 s.

:class:`LatencySink` records, vectorized, for every row it gets:

* ``write`` latency: the time the sink's ``write(table)`` is called minus the row's ``pt``
  (``events``) or minus its ``window_end`` (``windows``: the earliest moment, in the producer's
  clock, the window could be complete);
* ``visible`` latency: the time of the sink's ``commit()`` -- called when the checkpoint that
  covers the rows is durable, i.e. when the epoch is published -- minus the same reference.

Producer and consumer run on the same machine, so both use the same wall clock.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engines import FILTER, SCHEMA, WINDOW_STEP  # noqa: E402
from generate import KEYS, N_KEYS, OK_SHARE  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"
GROUP = "bench"
IDLE_END_SECONDS = 5.0


def now_us() -> int:
    return time.time_ns() // 1000


# ------------------------------------------------------------------------------------ producer


def produce(stream: str, rate: float, seconds: float, batch: int, seed: int,
            url: str = REDIS_URL) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    total = int(rate * seconds)
    rng = np.random.default_rng(seed)
    keys = KEYS[rng.integers(0, N_KEYS, total)].tolist()
    values = np.round(rng.normal(100.0, 25.0, total), 2).tolist()
    statuses = np.where(rng.random(total) < OK_SHARE, "ok", "error").tolist()
    behind: list[float] = []
    sent = 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    start_us = now_us()
    while sent < total:
        due = start + sent / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        behind.append(max(0.0, time.perf_counter() - due))
        n = min(batch, total - sent)
        pt = now_us()
        ts = pt // 1000
        pipe = client.pipeline(transaction=False)
        for i in range(sent, sent + n):
            payload = (f'{{"ts":{ts},"key":"{keys[i]}","value":{values[i]},'
                       f'"status":"{statuses[i]}","pt":{pt}}}')
            pipe.execute_command("XADD", stream, "*", "data", payload)
        pipe.execute()
        sent += n
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    client.close()
    lag = np.asarray(behind)
    return {
        "events": sent,
        "ok_events": sum(1 for s in statuses if s == "ok"),
        "seconds": elapsed,
        "events_per_second": sent / elapsed,
        "target_rate": rate,
        "batch": batch,
        "start_us": start_us,
        "end_us": now_us(),
        "cpu_seconds": cpu,
        "behind_p50_ms": float(np.percentile(lag, 50) * 1e3),
        "behind_p99_ms": float(np.percentile(lag, 99) * 1e3),
        "behind_max_ms": float(lag.max() * 1e3),
    }


# ------------------------------------------------------------------------------------ consumer


class LatencySink:
    """A Sink that keeps, per row, write time and commit time minus the row's reference time.

    The reference is the column ``pt`` (produce time, µs) when present, otherwise
    ``window_end`` (a UTC timestamp, as µs since the epoch).
    """

    def __init__(self, step_id: str = "latency") -> None:
        self.step_id = step_id
        self.ref: list[np.ndarray] = []  # reference time per row (µs)
        self.written: list[np.ndarray] = []  # write time per row (µs)
        self.visible: list[np.ndarray] = []  # commit time per row (µs); same order
        self._epoch_refs: list[np.ndarray] = []
        self.epochs = 0
        self.rows = 0
        self.count_sum = 0  # windows: the sum of the count column (= events counted)

    def open(self, ctx: Any) -> None:
        self._epoch_refs = []

    def write(self, table: Any) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc

        from sluice.batch import empty_dead_letters

        t = now_us()
        if "pt" in table.column_names:
            col = table.column("pt")
        else:
            col = table.column("window_end").cast(pa.timestamp("us", "UTC")).cast(pa.int64())
        ref = col.to_numpy().astype(np.int64, copy=False)
        self.rows += len(ref)
        if "count" in table.column_names:
            self.count_sum += int(pc.sum(table.column("count")).as_py() or 0)
        self.ref.append(ref)
        self.written.append(np.full(len(ref), t, dtype=np.int64))
        self._epoch_refs.append(ref)
        return empty_dead_letters()

    def commit(self) -> None:
        t = now_us()
        for ref in self._epoch_refs:
            self.visible.append(np.full(len(ref), t, dtype=np.int64))
        self._epoch_refs = []
        self.epochs += 1

    def abort(self) -> None:  # rows of an unpublished epoch never became visible
        for ref in self._epoch_refs:
            self.visible.append(np.full(len(ref), -1, dtype=np.int64))
        self._epoch_refs = []

    def arrays(self) -> dict[str, np.ndarray]:
        def cat(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)

        return {"ref_us": cat(self.ref), "write_us": cat(self.written),
                "visible_us": cat(self.visible)}


def consumer_config(stream: str, pipeline: str, out: Path, options: dict[str, Any],
                    url: str = REDIS_URL) -> dict[str, Any]:
    settings: dict[str, Any] = {"report_dir": str(out / "runs")}
    for key in ("batch_rows", "queue_size", "linger"):
        if options.get(key):
            settings[key] = options[key]
    source: dict[str, Any] = {"kind": "redis_stream", "url": url, "stream": stream,
                              "group": GROUP, "consumer": "bench-1",
                              "schema": {**SCHEMA, "pt": "int"}}
    if options.get("count"):
        source["count"] = int(options["count"])
    steps: list[dict[str, Any]] = [{"id": "ok", "filter": FILTER}]
    if pipeline == "windows":
        steps.append(WINDOW_STEP)
    return {
        "pipeline": f"redis_latency_{pipeline}",
        "source": source,
        "steps": steps,
        # replaced by the LatencySink object (sinks={"latency": ...}); only the id matters
        "sinks": [{"id": "latency", "kind": "jsonl", "path": str(out / "unused")}],
        "dead_letter": {"path": str(out / "dead_letters")},
        "checkpoint": {"path": str(out / "state.db"), "every": options.get("every", "1s")},
        "settings": settings,
    }


def _time_calls(owner: Any, name: str, into: list[float]) -> None:
    """Wrap ``owner.name`` (in this process only) to append each call's wall seconds."""
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    setattr(owner, name, timed)


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values) * 1e3
    return {"calls": len(a), "total_s": float(a.sum() / 1e3), "p50_ms": float(np.median(a)),
            "max_ms": float(a.max())}


def consume(stream: str, pipeline: str, out: Path, options: dict[str, Any],
            ready: Path | None) -> dict[str, Any]:
    from sluice.config.loader import parse_pipeline
    from sluice.connectors.redis_streams import RedisStreamReader
    from sluice.runtime.stream import StreamExecutor
    from sluice.state.checkpoints import CheckpointStore

    # where the main thread's pauses come from: whole checkpoints, the SQLite save in them,
    # and the XACK of the checkpointed messages (RedisStreamReader.commit)
    pauses: dict[str, list[float]] = {"checkpoint": [], "checkpoint_store_save": [],
                                      "source_commit_xack": []}
    _time_calls(StreamExecutor, "_checkpoint", pauses["checkpoint"])
    _time_calls(CheckpointStore, "save", pauses["checkpoint_store_save"])
    _time_calls(RedisStreamReader, "commit", pauses["source_commit_xack"])
    sink = LatencySink()
    cfg = parse_pipeline(consumer_config(stream, pipeline, out, options))
    ex = StreamExecutor(cfg, base_dir=out, sinks={"latency": sink}, until_idle=IDLE_END_SECONDS,
                        progress=False, handle_signals=True)
    import sluice.connectors.redis_streams
    import sluice.steps.expressions
    import sluice.steps.window  # noqa: F401

    if ready is not None:
        ready.write_text("ready")
    cpu0 = time.process_time()
    started = time.perf_counter()
    report = ex.run()
    seconds = time.perf_counter() - started
    arrays = sink.arrays()
    np.savez(out / "latency.npz", ref_us=arrays["ref_us"], write_us=arrays["write_us"],
             visible_us=arrays["visible_us"])
    return {
        "status": report.status,
        "rows_read": report.rows_read,
        "dead_letters": report.dead_letters,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "epochs_committed": sink.epochs,
        "sink_rows": sink.rows,
        "sink_count_sum": sink.count_sum,
        "stream": report.stream,
        "pauses": {k: _summary(v) for k, v in pauses.items()},
        "options": options,
        "report": report.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--stream", required=True)
    p.add_argument("--rate", type=float, default=50_000)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--result", type=Path, required=True)
    c = sub.add_parser("consume")
    c.add_argument("--stream", required=True)
    c.add_argument("--pipeline", choices=("events", "windows"), default="events")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--options", default="{}")
    c.add_argument("--ready", type=Path)
    c.add_argument("--result", type=Path, required=True)
    args = ap.parse_args()
    if args.role == "produce":
        result = produce(args.stream, args.rate, args.seconds, args.batch, args.seed)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        result = consume(args.stream, args.pipeline, args.out, json.loads(args.options),
                         args.ready)
    args.result.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
