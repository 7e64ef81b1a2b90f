"""Batch benchmark: Sluice against hand-written Polars and pandas on the same orders CSV.

    python benchmarks/batch/run.py                      # ~100 MB input (generated once, reused)
    python benchmarks/batch/run.py --size 1GB --json benchmarks/batch/out/1gb.json
    python benchmarks/batch/run.py --size 5GB

Each engine runs in its own child process (``engines.py``), one after the other, on the same
file; the file is read once beforehand so every engine starts with it in the page cache. The
child times the work itself (imports excluded); its peak RSS comes from ``os.wait4`` (the
child's own ``ru_maxrss``). The outputs are then checked: the same row count and the same sum
of the derived column ``vat`` (relative tolerance 1e-9) -- otherwise MISMATCH and exit 1.

rows/s is input rows (CSV data rows) per second of work. "vs Polars" and "vs pandas" are
throughput ratios: 2.0 means twice as fast as that engine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engines import CHECK_COLUMN, ENGINES, TUNED  # noqa: E402
from generate import DATA_DIR, generate, parse_size, size_label  # noqa: E402

OUT_DIR = HERE / "out"
REL_TOLERANCE = 1e-9
TARGETS = {"vs_polars": 0.8, "vs_pandas": 10.0, "peak_rss_mb": 1024.0}


def warm_cache(path: Path) -> None:
    """Read the file once so no engine pays for (or benefits from) the first cold read."""
    with open(path, "rb") as fh:
        while fh.read(16 << 20):
            pass


def run_child(engine: str, csv: Path, out: Path, options: dict[str, Any],
              profile: Path | None = None) -> dict[str, Any]:
    """Run one engine in a child process; return its result with the child's peak RSS."""
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    result_path = out.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += [str(HERE / "engines.py"), engine, str(csv), str(out), str(result_path),
            json.dumps(options)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"engine {engine} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["engine"] = engine
    result["process_seconds"] = wall
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["process_cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def same_sum(a: float, b: float) -> bool:
    """Float sums agree up to summation order."""
    return abs(a - b) <= REL_TOLERANCE * max(abs(a), abs(b), 1.0)


def check_output(path: Path) -> tuple[int, float]:
    """Row count and sum of the check column, read back from the Parquet output."""
    import polars as pl

    row = pl.scan_parquet(path).select(pl.len(), pl.col(CHECK_COLUMN).sum()).collect().row(0)
    return int(row[0]), float(row[1])


def print_table(results: list[dict[str, Any]]) -> None:
    head = ("engine", "rows out", "seconds", "rows/s", "peak RSS MB", "work CPU s", "vs Polars",
            "vs pandas")
    lines = [head]
    for r in results:
        lines.append((
            r["engine"],
            f"{r['rows_out']:,}",
            f"{r['seconds']:.2f}",
            f"{r['rows_per_second']:,.0f}",
            f"{r['peak_rss_mb']:,.0f}",
            f"{r['work_cpu_seconds']:.2f}",
            f"{r['vs_polars']:.2f}x" if r.get("vs_polars") else "-",
            f"{r['vs_pandas']:.2f}x" if r.get("vs_pandas") else "-",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for n, line in enumerate(lines):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def print_steps(result: dict[str, Any]) -> None:
    report = result.get("report")
    if not report:
        return
    print(f"\n{result['engine']}: seconds per step (run report; steps run one after the other on "
          "the main thread, the sink on its own thread, the CSV reader on its own thread)")
    for s in report["steps"]:
        print(f"  {s['step_id']:<12} {s['kind']:<13} {s['rows_in']:>12,} in {s['rows_out']:>12,}"
              f" out {s['seconds']:>7.2f} s  {s['batches']:>5} batches")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("100MB"),
                    help="input CSV size: 100MB (default), 1GB, 5GB ...")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--engines", default="sluice,polars,pandas",
                    help=f"comma-separated, in run order; one of: {', '.join(ENGINES)}")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per engine; the fastest run is reported (peak RSS: the highest)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--block-size", type=parse_size,
                    help="Sluice CSV source block_size (default: Sluice's, 8 MiB)")
    ap.add_argument("--batch-rows", type=int, help="Sluice settings.batch_rows")
    ap.add_argument("--queue-size", type=int, help="Sluice settings.queue_size")
    ap.add_argument("--profile", action="store_true",
                    help="run the Sluice engines under cProfile (main thread only) and print "
                    "the top functions; timings then include the profiler's overhead")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--keep-output", action="store_true", help="keep the Parquet outputs")
    args = ap.parse_args()

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")

    csv = generate(args.size, args.seed, args.data_dir)
    meta = json.loads(csv.with_suffix(".meta.json").read_text())
    rows_in = int(meta["rows"])
    out_dir = args.out_dir / size_label(args.size)
    out_dir.mkdir(parents=True, exist_ok=True)
    sluice_options = {k: v for k, v in (("block_size", args.block_size),
                                        ("batch_rows", args.batch_rows),
                                        ("queue_size", args.queue_size)) if v}
    print(f"input {csv} ({rows_in:,} rows, {meta['bytes'] / 1e6:,.0f} MB); "
          f"{os.cpu_count()} CPUs; Sluice options: {sluice_options or 'defaults'}")
    warm_cache(csv)

    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for i in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every engine
        for engine in engines:
            out = out_dir / f"{engine}.parquet"
            options = dict(sluice_options) if engine.startswith("sluice") else {}
            if engine == "sluice-tuned":
                options = {**TUNED, **options}
            profile = (out_dir / f"{engine}.prof"
                       if args.profile and engine.startswith("sluice") else None)
            r = run_child(engine, csv, out, options, profile)
            r["rows_out"], r["check_sum"] = check_output(out)
            r["options"] = options
            r["load_average"] = os.getloadavg()[0]
            if not args.keep_output:
                out.unlink(missing_ok=True)
            print(f"  {engine} run {i + 1}/{args.repeat}: {r['seconds']:.2f} s, "
                  f"work CPU {r['work_cpu_seconds']:.2f} s, "
                  f"peak RSS {r['peak_rss_mb']:,.0f} MB, load avg {r['load_average']:.1f}")
            runs[engine].append(r)

    results: list[dict[str, Any]] = []
    for engine in engines:
        best = dict(min(runs[engine], key=lambda r: r["seconds"]))
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs[engine])
        best["runs_seconds"] = [round(r["seconds"], 3) for r in runs[engine]]
        best["rows_in"] = rows_in
        best["rows_per_second"] = rows_in / best["seconds"]
        results.append(best)
        for r in runs[engine]:  # every run of an engine must write the same output
            if r["rows_out"] != best["rows_out"] or not same_sum(r["check_sum"],
                                                                 best["check_sum"]):
                raise SystemExit(f"MISMATCH: {engine} runs differ: "
                                 f"{[(x['rows_out'], x['check_sum']) for x in runs[engine]]}")

    by_name = {r["engine"]: r for r in results}
    for r in results:
        for ref in ("polars", "pandas"):
            if ref in by_name:
                r[f"vs_{ref}"] = by_name[ref]["seconds"] / r["seconds"]

    print()
    print_table(results)
    for r in results:
        print_steps(r)

    mismatch = []
    ref = results[0]
    for r in results[1:]:
        if r["rows_out"] != ref["rows_out"]:
            mismatch.append(f"{r['engine']} wrote {r['rows_out']:,} rows, "
                            f"{ref['engine']} {ref['rows_out']:,}")
        if not same_sum(r["check_sum"], ref["check_sum"]):
            mismatch.append(f"{r['engine']} sum({CHECK_COLUMN}) = {r['check_sum']!r}, "
                            f"{ref['engine']} {ref['check_sum']!r}")
    print()
    if mismatch:
        for m in mismatch:
            print(f"MISMATCH: {m}")
    else:
        print(f"outputs agree: {ref['rows_out']:,} rows, sum({CHECK_COLUMN}) = "
              f"{ref['check_sum']:,.2f} in every engine")

    for r in results:
        if not r["engine"].startswith("sluice"):
            continue
        checks = []
        if "vs_polars" in r:
            checks.append((f">= {TARGETS['vs_polars']}x Polars",
                           r["vs_polars"] >= TARGETS["vs_polars"], f"{r['vs_polars']:.2f}x"))
        if "vs_pandas" in r:
            checks.append((f">= {TARGETS['vs_pandas']:.0f}x pandas",
                           r["vs_pandas"] >= TARGETS["vs_pandas"], f"{r['vs_pandas']:.2f}x"))
        checks.append((f"peak RSS < {TARGETS['peak_rss_mb']:.0f} MB",
                       r["peak_rss_mb"] < TARGETS["peak_rss_mb"], f"{r['peak_rss_mb']:,.0f} MB"))
        print(f"{r['engine']} targets: " + "; ".join(
            f"{name}: {'met' if ok else 'MISSED'} ({value})" for name, ok, value in checks))

    if args.profile:
        import pstats

        for r in results:
            prof = out_dir / f"{r['engine']}.prof"
            if prof.exists():
                print(f"\n{r['engine']}: cProfile, main thread, top 25 by cumulative time")
                pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "input": {"path": str(csv), **meta},
            "targets": TARGETS,
            "mismatch": mismatch,
            "results": results,
        }
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"\nresults -> {args.json}")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
