"""Where does a Sluice run of the benchmark pipeline spend its time?

    python benchmarks/batch/profile_sluice.py                   # 100 MB input, default settings
    python benchmarks/batch/profile_sluice.py --size 1GB --block-size 32MB --batch-rows 524288
    python benchmarks/batch/profile_sluice.py --sweep           # try a grid of settings

Three views, in one process (the numbers include the profiler's overhead; compare them with each
other, not with ``run.py``):

1. the run report's seconds per step (steps run in order on the main thread, each sink on its
   own thread, the CSV reader on its own thread);
2. cProfile *per thread* (the reader, the main thread, the sink): the functions with the most
   own time, so the cost of Arrow/Polars/DuckDB calls shows up under the calls that make them;
3. with ``--sweep``: wall seconds and peak RSS of un-profiled child runs for a grid of the user
   settings that matter (CSV ``block_size``, ``settings.batch_rows``, ``settings.queue_size``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engines import sluice_pipeline  # noqa: E402
from generate import DATA_DIR, generate, parse_size, size_label  # noqa: E402

OUT_DIR = HERE / "out"


def profile_threads(fn: Any) -> tuple[Any, dict[str, cProfile.Profile]]:
    """Call ``fn`` with every thread started meanwhile (and the caller) under its own profiler."""
    from sluice.runtime.executor import _Worker  # sink threads override Thread.run

    profiles: dict[str, cProfile.Profile] = {}
    originals = [(cls, cls.run) for cls in (threading.Thread, _Worker)]

    def wrap(original: Any) -> Any:
        def run(self: threading.Thread) -> None:
            prof = profiles.setdefault(self.name, cProfile.Profile())
            prof.enable()
            try:
                original(self)
            finally:
                prof.disable()

        return run

    for cls, original in originals:
        cls.run = wrap(original)  # type: ignore[method-assign]
    main = profiles.setdefault("main", cProfile.Profile())
    try:
        main.enable()
        try:
            result = fn()
        finally:
            main.disable()
    finally:
        for cls, original in originals:
            cls.run = original  # type: ignore[method-assign]
    return result, profiles


def top(prof: cProfile.Profile, n: int) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    buf.write(f"    own time of all functions: {total:.2f} s\n")
    stats.sort_stats("tottime").print_stats(n)
    lines = buf.getvalue().splitlines()
    keep = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith(("Ordered by",
                                                                               "List reduced"))]
    return "\n".join(keep)


def sweep(csv: Path, out: Path, grid: list[dict[str, Any]], repeat: int) -> None:
    """Run every setting ``repeat`` times (round-robin, so load elsewhere is spread); print the
    fastest run of each and the highest peak RSS."""
    runs: list[list[dict[str, Any]]] = [[] for _ in grid]
    for _ in range(repeat):
        for i, options in enumerate(grid):
            result_path = out.with_suffix(".sweep.json")
            cmd = [sys.executable, str(HERE / "engines.py"), "sluice", str(csv), str(out),
                   str(result_path), json.dumps(options)]
            subprocess.run(cmd, check=True)
            out.unlink(missing_ok=True)
            runs[i].append(json.loads(result_path.read_text()))
    for options, results in zip(grid, runs, strict=True):
        best = min(results, key=lambda r: r["seconds"])
        steps = {s["step_id"]: s["seconds"] for s in best["report"]["steps"]}
        main_steps = sum(v for k, v in steps.items() if k not in ("parquet", "source"))
        batches = best["report"]["steps"][1]["batches"]
        rss = max(r["self_peak_rss_mb"] for r in results)
        print(f"  {json.dumps(options):<62} {best['seconds']:6.2f} s  cpu "
              f"{best['work_cpu_seconds']:5.2f} s  steps {main_steps:5.2f} s  sink "
              f"{steps['parquet']:5.2f} s  {batches:>4} batches  peak RSS {rss:6,.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("100MB"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cast-step", action="store_true", help="profile the cast-step variant")
    ap.add_argument("--block-size", type=parse_size)
    ap.add_argument("--batch-rows", type=int)
    ap.add_argument("--queue-size", type=int)
    ap.add_argument("--top", type=int, default=15, help="functions shown per thread")
    ap.add_argument("--sweep", action="store_true", help="only run the settings grid")
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting in the sweep")
    ap.add_argument("--grid", help="JSON list of option dicts to sweep instead of the default")
    args = ap.parse_args()

    csv = generate(args.size, args.seed, DATA_DIR)
    out_dir = OUT_DIR / size_label(args.size)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "sluice-profile.parquet"

    if args.sweep:
        mb = 1 << 20
        grid: list[dict[str, Any]] = [{}]
        grid += [{"block_size": b * mb} for b in (4, 16, 32)]
        grid += [{"batch_rows": r} for r in (524_288, 1_048_576)]
        grid += [{"queue_size": q} for q in (1, 2, 8)]
        grid += [{"block_size": 4 * mb, "batch_rows": 524_288},
                 {"block_size": 4 * mb, "batch_rows": 1_048_576},
                 {"block_size": 4 * mb, "batch_rows": 1_048_576, "queue_size": 2}]
        if args.grid:
            grid = json.loads(args.grid)
        print(f"settings sweep on {csv} (un-profiled child runs, best of {args.repeat})")
        sweep(csv, out, grid, args.repeat)
        return

    options = {k: v for k, v in (("block_size", args.block_size), ("batch_rows", args.batch_rows),
                                 ("queue_size", args.queue_size), ("cast_step", args.cast_step))
               if v}
    p = sluice_pipeline(csv, out, options)
    started = time.perf_counter()
    report, profiles = profile_threads(lambda: p.run(base_dir=out.parent, progress=False))
    wall = time.perf_counter() - started
    out.unlink(missing_ok=True)
    print(f"{csv.name}, options {options or 'defaults'}: {report.rows_read:,} rows in {wall:.2f} s "
          f"under the profiler; peak RSS {report.peak_rss_mb:,.0f} MB\n")
    print("run report, seconds per step:")
    for s in report.steps:
        print(f"  {s.step_id:<12} {s.kind:<13} {s.seconds:7.2f} s  {s.batches:>4} batches")
    for name, prof in profiles.items():
        print(f"\n--- thread {name} ---")
        print(top(prof, args.top))


if __name__ == "__main__":
    main()
