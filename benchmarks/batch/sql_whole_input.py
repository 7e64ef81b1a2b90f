"""A whole-input SQL aggregate through Sluice on an input larger than memory: peak RSS.

    python benchmarks/batch/sql_whole_input.py --size 200MB      # a quick check
    python benchmarks/batch/sql_whole_input.py --size 5GB        # the 1 GB RSS target

Generates (or reuses) a sensor CSV — ``device_id`` (50,000 devices), ``ts`` (one year, seconds),
``v`` (float) — under ``benchmarks/batch/data/``, then runs, in a child process::

    CSV -> sql: SELECT device_id, date_trunc('hour', ts) AS hour, count(*) AS n, avg(v) AS v
                FROM input GROUP BY ALL
        -> Parquet

The ``sql`` step needs the whole input: Sluice spills the input batches to disk as they arrive
and runs the statement once at the end with DuckDB's ``memory_limit`` (the step's
``memory_limit``, default 256MB), so the peak RSS must not grow with the input. The child's
peak RSS (``ru_maxrss``), its wall clock, the rows read and the groups written are printed, and
``--check`` compares the number of groups with DuckDB reading the CSV itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
OUT_DIR = HERE / "out"
CHUNK_ROWS = 1_000_000
DEVICES = 50_000
SQL = (
    "SELECT device_id, date_trunc('hour', ts) AS hour, count(*) AS n, avg(v) AS v "
    "FROM input GROUP BY ALL"
)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for unit in ("GB", "MB", "KB", "B"):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * _UNITS[unit])
    return int(t)


def generate(size: int, seed: int = 7) -> Path:
    """Write (or reuse) a sensor CSV of about ``size`` bytes, one 1M-row chunk at a time."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / f"sensors-{size}-s{seed}.csv"
    if path.exists() and path.stat().st_size >= size:
        return path
    tmp = path.with_name(f".{path.name}.tmp")
    base = np.datetime64("2026-01-01T00:00:00", "s")
    with open(tmp, "wb") as fh:
        index = 0
        while fh.tell() < size:
            rng = np.random.default_rng([seed, index])
            df = pl.DataFrame(
                {
                    "device_id": rng.integers(0, DEVICES, CHUNK_ROWS),
                    "ts": (
                        base + rng.integers(0, 365 * 86400, CHUNK_ROWS).astype("timedelta64[s]")
                    ).astype("datetime64[us]"),
                    "v": np.round(rng.normal(20, 5, CHUNK_ROWS), 3),
                }
            )
            df.write_csv(fh, include_header=index == 0, datetime_format="%Y-%m-%dT%H:%M:%S")
            index += 1
    os.replace(tmp, path)
    return path


def run_sluice(csv: Path, out: Path) -> dict[str, object]:
    """The child: run the pipeline, report what it did."""
    import sluice
    from sluice.config import parse_pipeline

    cfg = parse_pipeline(
        {
            "pipeline": "sql_whole_input",
            "source": {
                "kind": "csv",
                "path": str(csv),
                "schema": {"device_id": "int", "ts": "timestamp", "v": "float"},
            },
            "steps": [{"id": "per_hour", "sql": SQL}],
            "sinks": [{"id": "out", "kind": "parquet", "path": str(out)}],
            "dead_letter": {"kind": "jsonl", "path": str(out.parent / "dead_letters")},
            "settings": {"report_dir": str(out.parent / "runs")},
        }
    )
    started = time.perf_counter()
    report = sluice.run(cfg, progress=False)
    step = report.step("per_hour")
    return {
        "status": report.status,
        "balanced": report.balanced,
        "seconds": round(time.perf_counter() - started, 2),
        "rows_read": report.rows_read,
        "aggregated": step.aggregated,
        "groups": step.rows_out,
        "peak_rss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("200MB"))
    ap.add_argument("--check", action="store_true", help="count the groups with DuckDB too")
    ap.add_argument("--child", nargs=2, metavar=("CSV", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_sluice(Path(args.child[0]), Path(args.child[1]))))
        return
    csv = generate(args.size)
    print(f"input: {csv} ({csv.stat().st_size / 1e6:,.0f} MB)")
    out = OUT_DIR / "sql_whole_input.parquet"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, __file__, "--child", str(csv), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - started, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    if args.check:
        import duckdb

        want = duckdb.sql(
            f"SELECT count(*) FROM (SELECT device_id, date_trunc('hour', ts) FROM "
            f"read_csv('{csv}') GROUP BY ALL)"
        ).fetchall()
        result["duckdb_groups"] = want[0][0]
        result["same_groups"] = result["duckdb_groups"] == result["groups"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
