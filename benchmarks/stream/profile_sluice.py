"""Where does a Sluice stream run over the events file spend its time? And which settings help?

    python benchmarks/stream/profile_sluice.py                  # 1M events, default settings
    python benchmarks/stream/profile_sluice.py --block-size 2MB --batch-rows 524288
    python benchmarks/stream/profile_sluice.py --sweep --events 10M   # grid of settings

1. **Stages** (one run in this process): wall seconds spent inside the main functions of the
   run, per thread (inclusive: a stage contains the stages it calls). Wall time, not CPU:
   pyarrow parses JSON in its own thread pool while the calling thread waits, so a CPU timer
   of the calling thread (or a sampling profiler such as py-spy, which only sees Python
   threads) would miss the parse.
2. ``--sweep``: un-instrumented child runs (``engines.py``) for a grid of ordinary user settings:
   the jsonl source's ``block_size``, ``settings.batch_rows``, ``settings.queue_size``,
   ``checkpoint.every``; best of ``--repeat`` runs each, interleaved. Use 10M events or more:
   a 1M-event run lasts under a second and the differences drown in noise.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engines import run_sluice  # noqa: E402
from generate import DATA_DIR, generate, parse_bytes, parse_count  # noqa: E402
from run import QUIET, wait_quiet  # noqa: E402

OUT_DIR = HERE / "out"

_TIMES: dict[tuple[str, str], float] = collections.defaultdict(float)
_CALLS: dict[tuple[str, str], int] = collections.defaultdict(int)


def _add(label: str, seconds: float) -> None:
    key = (threading.current_thread().name, label)
    _TIMES[key] += seconds
    _CALLS[key] += 1


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(label, time.perf_counter() - t0)

    return wrapper


def _timed_gen(label: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """Time each ``next()`` of the generator ``fn`` returns (the work between its yields)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        it = fn(*args, **kwargs)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                _add(label, time.perf_counter() - t0)
                return
            _add(label, time.perf_counter() - t0)
            yield item

    return wrapper


def instrument() -> None:
    """Wrap the functions a stream run over a JSONL file goes through."""
    import queue

    import sluice.connectors.files.json as sj
    from sluice.connectors.files._common import FileReader
    from sluice.connectors.files.watch import FolderWatcher
    from sluice.runtime.stream import StreamExecutor
    from sluice.steps.expressions import Filter
    from sluice.steps.window import Window

    sj.JsonlReader._blocks = _timed_gen(  # type: ignore[method-assign]
        "reader: read file blocks (JsonlReader._blocks)", sj.JsonlReader._blocks
    )
    sj.scan_lines = _timed("reader: vet blocks for pyarrow (scan_lines)", sj.scan_lines)
    sj.JsonlReader._fast = staticmethod(  # type: ignore[method-assign]
        _timed("reader: parse JSON (pyarrow.json.read_json)", sj.JsonlReader._fast)
    )
    sj.with_positions = _timed("reader: add position columns", sj.with_positions)
    FileReader.apply_schema = _timed(  # type: ignore[method-assign]
        "reader: apply schema (casts)", FileReader.apply_schema
    )
    FolderWatcher.poll = _timed(  # type: ignore[method-assign]
        "reader: FolderWatcher.poll (all of the above)", FolderWatcher.poll
    )
    queue.Queue.put = _timed("queue put (reader blocked when full)", queue.Queue.put)  # type: ignore[method-assign]
    queue.Queue.get = _timed("queue get (main waits for data)", queue.Queue.get)  # type: ignore[method-assign]
    StreamExecutor._process_pending = _timed(  # type: ignore[method-assign]
        "main: micro-batch (concat + steps + sink)", StreamExecutor._process_pending
    )
    Filter.process = _timed("main: filter step", Filter.process)  # type: ignore[method-assign]
    Window.process = _timed("main: window step", Window.process)  # type: ignore[method-assign]
    Window.finish = _timed("main: window finish (flush)", Window.finish)  # type: ignore[method-assign]
    StreamExecutor._checkpoint = _timed(  # type: ignore[method-assign]
        "main: checkpoint", StreamExecutor._checkpoint
    )
    original = StreamExecutor._stream_sink_handler

    def sink_handler(self: Any, esink: Any) -> Callable[[Any], None]:
        return _timed("main: parquet sink write", original(self, esink))

    StreamExecutor._stream_sink_handler = sink_handler  # type: ignore[method-assign]


def what_if_subblocks(size: int) -> None:
    """A what-if, not a Sluice setting: make the jsonl reader hand pyarrow ``size``-byte
    sub-blocks of each block, so ``read_json`` parses them on its thread pool (today each
    block is one pyarrow block: one thread). Same options otherwise."""
    import io

    import pyarrow as pa
    import pyarrow.json as pajson

    import sluice.connectors.files.json as sj

    def fast(block: bytes, pinned: pa.Schema | None, scan: Any = None) -> pa.Table | None:
        if scan is not None and not scan.safe:  # a block pyarrow must not see (see json.py)
            return None
        try:
            return pajson.read_json(
                io.BytesIO(block),
                read_options=pajson.ReadOptions(block_size=min(size, len(block) + 1)),
                parse_options=pajson.ParseOptions(
                    explicit_schema=pinned,
                    unexpected_field_behavior="infer",
                    newlines_in_values=False,
                ),
            )
        except (pa.ArrowException, ValueError):
            return None

    sj.JsonlReader._fast = staticmethod(fast)  # type: ignore[method-assign]


def profile(events: Path, out: Path, options: dict[str, Any], subblock: int | None) -> None:
    import sluice.runtime.stream  # noqa: F401  (imports outside the timed part)

    if subblock:
        what_if_subblocks(subblock)
    instrument()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wait_quiet(QUIET[0], QUIET[1])
    t0 = time.perf_counter()
    result = run_sluice(events, out, options)
    wall = time.perf_counter() - t0
    report = result["report"]
    what_if = f", WHAT-IF: parse in {subblock:,}-byte sub-blocks" if subblock else ""
    print(f"\nSluice, options {options or 'defaults'}{what_if}: {wall:.2f} s wall "
          f"(instrumented; {report['rows_read'] / wall:,.0f} events/s), "
          f"{report['rows_read']:,} events, {result['stream']['checkpoints']} checkpoints")
    print(f"{'thread':<22} {'stage':<52} {'seconds':>8} {'calls':>7}")
    for (thread, label), secs in sorted(_TIMES.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"{thread:<22} {label:<52} {secs:8.3f} {_CALLS[(thread, label)]:7d}")
    print("\nrun report, seconds per step:")
    for s in report["steps"]:
        print(f"  {s['step_id']:<10} {s['kind']:<14} {s['rows_in']:>10,} in {s['rows_out']:>10,} "
              f"out {s['seconds']:7.3f} s {s['batches']:5d} batches")


def sweep(events: Path, out: Path, repeat: int, n_events: int) -> None:
    grid: list[dict[str, Any]] = [{}]
    for bs, br in itertools.product((1 << 20, 2 << 20, 8 << 20, 32 << 20), (131_072, 1_048_576)):
        if (bs, br) != (8 << 20, 131_072):  # the defaults
            grid.append({"block_size": bs, "batch_rows": br})
    grid += [{"queue_size": q} for q in (2, 8)]
    grid += [{"every": e} for e in ("200ms", "1h")]
    print(f"\nsweep: {len(grid)} settings x {repeat} runs (interleaved), {n_events:,} events; "
          "seconds = best child run (engines.py sluice)")
    target = out / "sweep"
    result_path = out / "sweep.result.json"
    runs: list[list[dict[str, Any]]] = [[] for _ in grid]
    for rep in range(repeat):
        for i, options in enumerate(grid):
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            wait_quiet(QUIET[0], QUIET[1])
            subprocess.run([sys.executable, str(HERE / "engines.py"), "sluice", str(events),
                            str(target), str(result_path), json.dumps(options)], check=True)
            runs[i].append(json.loads(result_path.read_text()))
            print(f"  run {rep + 1}/{repeat} {options or 'defaults'}: "
                  f"{runs[i][-1]['seconds']:.2f} s", flush=True)
    print(f"\n{'settings':<44} {'seconds':>8} {'all runs':>12} {'events/s':>11} "
          f"{'ckpts':>5} {'CPU s':>6} {'RSS MB':>7}")
    for options, rs in zip(grid, runs, strict=True):
        best = min(rs, key=lambda r: r["seconds"])
        label = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        every = " ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"{label:<44} {best['seconds']:8.2f} {every:>12} {n_events / best['seconds']:11,.0f} "
              f"{best['stream']['checkpoints']:5d} {best['work_cpu_seconds']:6.2f} "
              f"{max(r['self_peak_rss_mb'] for r in rs):7,.0f}")
    shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=parse_count, default=1_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--block-size", type=parse_bytes, help="jsonl source block_size")
    ap.add_argument("--batch-rows", type=int, help="settings.batch_rows")
    ap.add_argument("--queue-size", type=int, help="settings.queue_size")
    ap.add_argument("--every", help="checkpoint.every (default 1s)")
    ap.add_argument("--what-if-subblock", type=parse_bytes,
                    help="what-if (patches the reader in this process only): parse each block "
                    "as pyarrow sub-blocks of this size, in parallel, e.g. 1MB")
    ap.add_argument("--sweep", action="store_true", help="also run the grid of settings")
    ap.add_argument("--repeat", type=int, default=2, help="runs per sweep setting (best kept)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    events = generate(args.events, args.seed, args.data_dir)
    options = {k: v for k, v in (("block_size", args.block_size), ("batch_rows", args.batch_rows),
                                 ("queue_size", args.queue_size), ("every", args.every)) if v}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if args.sweep:
        sweep(events, args.out_dir, args.repeat, args.events)
    profile(events, args.out_dir / "profile", options, args.what_if_subblock)


if __name__ == "__main__":
    main()
