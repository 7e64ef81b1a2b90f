"""Contract benchmark: a 15-check data contract in Sluice against pandas + Great Expectations.

    python benchmarks/contracts/run.py                    # 1M rows (generated once, reused)
    python benchmarks/contracts/run.py --rows 10000000 --json benchmarks/contracts/out/10m.json
    python benchmarks/contracts/run.py --engines sluice,pandas --repeat 3

The input is the batch benchmark's seeded orders data (``benchmarks/batch/generate.py``'s
``chunk``), written as CSV with a controlled, seeded share of faults injected per column (nulls,
unparseable values, out-of-range values, duplicate keys, unknown customers, bad codes), plus a
``customers.csv`` reference (ids 1..200,000). The number of rows each check must fail is known
by construction (``expected``), and every check fails some rows.

Each engine (``engines.py``) runs in its own child process, one after the other, on the same
file, read once beforehand so every engine starts with it in the page cache. The child times
the work itself (imports excluded: reading the CSV, preparing, validating); its peak RSS comes
from ``os.wait4``. The failure counts per check must be equal in every engine and equal to the
expected counts -- otherwise MISMATCH and exit 1.

rows/s is CSV data rows per second of work. "vs GX" and "vs pandas" are throughput ratios:
10.0 means ten times as fast as that engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engines import CHECKS, COUNTRY_PATTERN, ENGINES, STATUSES  # noqa: E402

DATA_DIR = HERE / "data"
OUT_DIR = HERE / "out"
FORMAT_VERSION = 1
TARGETS = {"vs_great_expectations": 10.0}
PEERS = {"great_expectations": "GX", "pandas": "pandas"}


def _load_generator() -> Any:
    """``benchmarks/batch/generate.py``, imported by path (it is not a package)."""
    path = HERE.parent / "batch" / "generate.py"
    spec = importlib.util.spec_from_file_location("batch_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()

#: Faults injected per column, as a share of rows: (kind, share). Each kind takes its own rows
#: of the column (disjoint), chosen by a seeded permutation per chunk and column.
FAULTS: dict[str, list[tuple[str, float]]] = {
    "order_id": [("null", 0.001), ("text", 0.001), ("duplicate", 0.002)],
    "customer_id": [("null", 0.001), ("text", 0.0005), ("unknown", 0.005)],
    "ts": [("null", 0.0005), ("bad_date", 0.0005), ("text", 0.0005)],
    "amount": [("null", 0.0005), ("text", 0.0005), ("negative", 0.001), ("huge", 0.0005)],
    "quantity": [("null", 0.0005), ("decimal", 0.0005), ("zero", 0.001)],
    "status": [("null", 0.0005), ("upper", 0.0005)],
    "country": [("null", 0.0005), ("lower", 0.0005), ("alpha3", 0.0005)],
}
#: Which check each fault kind fails (nulls fail ``required`` where the field has it, else none).
FAULT_CHECK = {
    ("order_id", "null"): "order_id.required",
    ("order_id", "text"): "order_id.type",
    ("order_id", "duplicate"): "order_id.unique",
    ("customer_id", "null"): "customer_id.required",
    ("customer_id", "text"): "customer_id.type",
    ("customer_id", "unknown"): "customer_id.references",
    ("ts", "bad_date"): "ts.type",
    ("ts", "text"): "ts.type",
    ("amount", "text"): "amount.type",
    ("amount", "negative"): "amount.min",
    ("amount", "huge"): "amount.max",
    ("quantity", "decimal"): "quantity.type",
    ("quantity", "zero"): "quantity.min",
    ("status", "upper"): "status.enum",
    ("country", "lower"): "country.pattern",
    ("country", "alpha3"): "country.pattern",
}


def _as_text(df: pl.DataFrame) -> pl.DataFrame:
    """The generator's typed chunk as the text a CSV holds (same formats as the batch CSV)."""
    return df.select(
        pl.col("order_id").cast(pl.String),
        pl.col("customer_id").cast(pl.String),
        pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S"),
        pl.format("{}", pl.col("amount").round(2)).alias("amount"),
        pl.col("quantity").cast(pl.String),
        pl.col("status"),
        pl.col("country"),
    )


def inject(df: pl.DataFrame, index: int, seed: int) -> tuple[pl.DataFrame, dict[str, int]]:
    """Inject the FAULTS into one generated chunk; return the text frame and the failures per
    check it must produce (injected + natural, e.g. the generator's quantities 9-10)."""
    n = df.height
    text = _as_text(df)
    expected = dict.fromkeys(CHECKS, 0)
    columns: dict[str, pl.Series] = {}
    for ci, (col, faults) in enumerate(FAULTS.items()):
        rng = np.random.default_rng([seed, index, 1000 + ci])
        order = rng.permutation(n)
        values = text[col].to_numpy().astype(object)
        touched = np.zeros(n, dtype=bool)
        start = 0
        for kind, share in faults:
            k = round(n * share)
            rows = order[start : start + k]
            start += k
            if kind == "duplicate":  # k more rows (untouched) lend their key to these rows
                source = order[start : start + k]
                start += k
                values[rows] = values[source]
                touched[source] = True  # a lender keeps its value but is not a natural row
            else:
                values[rows] = _fault(kind, rng, df[col].to_numpy()[rows], k)
            touched[rows] = True
            check = FAULT_CHECK.get((col, kind))
            if check:
                expected[check] += k
        columns[col] = pl.Series(col, values, dtype=pl.String)
        natural = ~touched
        raw = df[col].to_numpy()
        if col == "quantity":
            expected["quantity.min"] += int((natural & (raw < 1)).sum())
            expected["quantity.max"] += int((natural & (raw > 8)).sum())
        elif col == "amount":
            expected["amount.min"] += int((natural & (raw < 0)).sum())
            expected["amount.max"] += int((natural & (raw > 10000)).sum())
        elif col == "status":
            expected["status.enum"] += int((natural & ~np.isin(raw, STATUSES)).sum())
        elif col == "country":
            ok = pl.Series(raw).str.contains(COUNTRY_PATTERN).to_numpy()
            expected["country.pattern"] += int((natural & ~ok).sum())
    return pl.DataFrame(columns).select(text.columns), expected


def _fault(kind: str, rng: np.random.Generator, original: np.ndarray, k: int) -> np.ndarray:
    """k bad values of one kind (no commas, quotes or blanks: see README "Semantic notes")."""
    if kind == "null":
        return np.full(k, None, dtype=object)
    if kind == "text":
        return np.array([f"X{v}" if i % 2 else "n/a" for i, v in enumerate(original)], dtype=object)
    if kind == "unknown":
        return rng.integers(gen.N_CUSTOMERS + 1, gen.N_CUSTOMERS + 50_000, k).astype(str)
    if kind == "bad_date":
        return np.array(["2026-02-30T10:00:00"] * k, dtype=object)
    if kind == "negative":
        return np.array([f"-{v + 0.01:.2f}" for v in original], dtype=object)
    if kind == "huge":
        return np.array([f"{v:.2f}" for v in rng.uniform(10_000.01, 99_999, k)], dtype=object)
    if kind == "decimal":
        return np.array([f"{v}.5" for v in original], dtype=object)
    if kind == "zero":
        return np.array(["0" if i % 2 else "-1" for i in range(k)], dtype=object)
    if kind == "upper":
        return np.array(["PAID"] * k, dtype=object)
    if kind == "lower":
        return np.array([str(v).lower() for v in original], dtype=object)
    if kind == "alpha3":
        return np.array(["DEU"] * k, dtype=object)
    raise ValueError(kind)


def prepare(rows: int, seed: int, data_dir: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Write (or reuse) the orders CSV with faults and the customers reference."""
    data_dir.mkdir(parents=True, exist_ok=True)
    orders = data_dir / f"orders-{rows}-s{seed}-faults.csv"
    customers = data_dir / "customers.csv"
    meta_path = orders.with_suffix(".meta.json")
    want = {
        "rows": rows,
        "seed": seed,
        "version": FORMAT_VERSION,
        "faults": FAULTS,
        "customers": gen.N_CUSTOMERS,
    }
    if not customers.exists() or customers.stat().st_size == 0:
        ids = np.arange(1, gen.N_CUSTOMERS + 1)
        pl.DataFrame({"customer_id": ids, "name": [f"customer {i}" for i in ids]}).write_csv(
            customers
        )
    if orders.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} == json.loads(json.dumps(want)) and (
            orders.stat().st_size == meta["bytes"]
        ):
            print(f"reusing {orders} ({rows:,} rows, {meta['bytes'] / 1e6:,.0f} MB)")
            return orders, customers, meta
    started = time.perf_counter()
    expected = dict.fromkeys(CHECKS, 0)
    tmp = orders.with_name(f".{orders.name}.tmp")
    with open(tmp, "wb") as fh:
        done, index = 0, 0
        while done < rows:
            n = min(gen.CHUNK_ROWS, rows - done)
            text, exp = inject(gen.chunk(index, n, seed), index, seed)
            text.write_csv(fh, include_header=index == 0)
            for k, v in exp.items():
                expected[k] += v
            done += n
            index += 1
        nbytes = fh.tell()
    os.replace(tmp, orders)
    meta = {**want, "bytes": nbytes, "expected": expected}
    meta_path.write_text(json.dumps(meta, indent=2))
    print(
        f"generated {orders}: {rows:,} rows, {nbytes / 1e6:,.0f} MB in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return orders, customers, meta


def warm_cache(*paths: Path) -> None:
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(16 << 20):
                pass


def run_child(
    engine: str, csv: Path, customers: Path, result_path: Path, options: dict[str, Any]
) -> dict[str, Any]:
    """Run one engine in a child process; return its result with the child's peak RSS."""
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(HERE / "engines.py"),
        engine,
        str(csv),
        str(customers),
        str(result_path),
        json.dumps(options),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"engine {engine} failed with exit code {code}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["engine"] = engine
    result["process_seconds"] = wall
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["process_cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def _print_rows(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    lines = [head, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for n, line in enumerate(lines):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def compare(results: list[dict[str, Any]], expected: dict[str, int]) -> list[str]:
    """Print the per-check comparison; return the mismatches."""
    head = ("check", "expected", *(r["engine"] for r in results), "")
    rows, mismatch = [], []
    for check in CHECKS:
        cells = []
        ok = True
        for r in results:
            got = r["counts"].get(check)
            native = r.get("native_counts", {}).get(check)
            cells.append(
                "missing"
                if got is None
                else f"{got:,}" + (f" ({native:,})" if native is not None else "")
            )
            if got != expected[check]:
                ok = False
                mismatch.append(f"{check}: {r['engine']} {got}, expected {expected[check]}")
        rows.append((check, f"{expected[check]:,}", *cells, "equal" if ok else "MISMATCH"))
    _print_rows(head, rows)
    return mismatch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="orders rows (default 1M)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--engines",
        default="sluice,sluice-evaluate,great_expectations,pandas",
        help=f"comma-separated, in run order; of: {', '.join(ENGINES)}",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per engine, interleaved; the fastest is reported (RSS: highest)",
    )
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--block-size", type=int, help="Sluice CSV source block_size (bytes)")
    ap.add_argument("--batch-rows", type=int, help="Sluice settings.batch_rows")
    ap.add_argument("--queue-size", type=int, help="Sluice settings.queue_size")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args()

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    csv, customers, meta = prepare(args.rows, args.seed, args.data_dir)
    expected = meta["expected"]
    out_dir = args.out_dir / str(args.rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    sluice_options: dict[str, Any] = {
        k: v
        for k, v in (
            ("block_size", args.block_size),
            ("batch_rows", args.batch_rows),
            ("queue_size", args.queue_size),
        )
        if v
    }
    print(
        f"input {csv} ({args.rows:,} rows, {meta['bytes'] / 1e6:,.0f} MB), reference "
        f"{customers.name} ({gen.N_CUSTOMERS:,} ids); {os.cpu_count()} CPUs; "
        f"Sluice options: {sluice_options or 'defaults'}"
    )
    warm_cache(csv, customers)

    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for i in range(args.repeat):
        for engine in engines:
            options = {
                **sluice_options,
                "report_dir": str(out_dir / "runs"),
                "dead_letter_dir": str(out_dir / "dead_letters"),
            }
            r = run_child(engine, csv, customers, out_dir / f"{engine}.result.json", options)
            r["load_average"] = os.getloadavg()[0]
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r.get("phases", {}).items())
            print(
                f"  {engine} run {i + 1}/{args.repeat}: {r['seconds']:.2f} s"
                + (f" ({phases})" if phases else "")
                + f", peak RSS {r['peak_rss_mb']:,.0f} MB, load avg {r['load_average']:.1f}"
            )
            runs[engine].append(r)

    results: list[dict[str, Any]] = []
    for engine in engines:
        best = dict(min(runs[engine], key=lambda r: r["seconds"]))
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs[engine])
        best["runs_seconds"] = [round(r["seconds"], 3) for r in runs[engine]]
        best["rows_per_second"] = args.rows / best["seconds"]
        results.append(best)
    by_name = {r["engine"]: r for r in results}
    for r in results:
        for peer in PEERS:
            if peer in by_name:
                r[f"vs_{peer}"] = by_name[peer]["seconds"] / r["seconds"]

    print(
        "\nfailures per check (GX's own order_id.unique count in brackets: it counts every "
        "row of a duplicated key)"
    )
    mismatch = compare(results, expected)
    for engine in engines:  # every run of an engine must count the same
        if any(r["counts"] != runs[engine][0]["counts"] for r in runs[engine]):
            mismatch.append(f"{engine}: runs counted differently")
    print()
    head = (
        "engine",
        "rows",
        "seconds",
        "rows/s",
        "peak RSS MB",
        "work CPU s",
        *(f"vs {label}" for peer, label in PEERS.items() if peer in by_name),
    )
    _print_rows(
        head,
        [
            (
                r["engine"],
                f"{r['rows_checked']:,}",
                f"{r['seconds']:.2f}",
                f"{r['rows_per_second']:,.0f}",
                f"{r['peak_rss_mb']:,.0f}",
                f"{r['work_cpu_seconds']:.2f}",
                *(f"{r[f'vs_{peer}']:.2f}x" for peer in PEERS if peer in by_name),
            )
            for r in results
        ],
    )
    for r in results:
        if r["rows_checked"] != args.rows:
            mismatch.append(f"{r['engine']} checked {r['rows_checked']:,} rows, not {args.rows:,}")
    print()
    if mismatch:
        for m in mismatch:
            print(f"MISMATCH: {m}")
    else:
        print(
            f"failure counts agree: all {len(CHECKS)} checks, every engine, equal to the "
            "injected (expected) counts"
        )
    for r in results:
        if r["engine"].startswith("sluice") and "vs_great_expectations" in r:
            target = TARGETS["vs_great_expectations"]
            ok = r["vs_great_expectations"] >= target
            print(
                f"{r['engine']} target >= {target:.0f}x GX: {'met' if ok else 'MISSED'} "
                f"({r['vs_great_expectations']:.2f}x)"
            )

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "input": {"path": str(csv), "customers": str(customers), **meta},
            "targets": TARGETS,
            "mismatch": mismatch,
            "results": results,
        }
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"\nresults -> {args.json}")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
