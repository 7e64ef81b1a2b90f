"""Generate the benchmark's orders CSV: deterministic (seeded), vectorized, written in chunks.

    python benchmarks/batch/generate.py                 # ~100 MB -> benchmarks/batch/data/
    python benchmarks/batch/generate.py --size 5GB      # ~5 GB, never more than one chunk in memory

Columns: order_id, customer_id, ts (ISO 8601, seconds), amount (2 decimals), quantity, status,
country. All values are valid (no dead letters), so every engine sees the same rows.

The file name carries the size and the seed (``orders-100MB-s42.csv``); a file that already
exists with its ``.meta.json`` sidecar (same size, seed, chunk size and format version) is
reused, so a benchmark can be re-run without paying for generation again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
FORMAT_VERSION = 1
CHUNK_ROWS = 1_000_000
N_CUSTOMERS = 200_000
STATUSES = np.array(["paid", "refunded", "pending", "test"])
STATUS_P = [0.6, 0.15, 0.15, 0.10]
COUNTRIES = np.array(["DE", "FR", "NL", "PL", "ES", "IT"])
BASE_TS = np.datetime64("2026-01-01T00:00:00", "s")
YEAR_SECONDS = 365 * 86_400

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """'100MB' -> 100_000_000 (decimal units; also KB, GB, B or a plain number of bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 100MB, 1GB, 5GB)")
    unit = m.group(2) if m.group(2).endswith("B") or not m.group(2) else m.group(2) + "B"
    return int(float(m.group(1)) * _UNITS[unit])


def size_label(n: int) -> str:
    for unit in ("TB", "GB", "MB", "KB"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n}B"


def chunk(index: int, rows: int, seed: int) -> pl.DataFrame:
    """Chunk ``index`` of the file: its own RNG stream, so the content depends only on the seed."""
    rng = np.random.default_rng([seed, index])
    first = index * CHUNK_ROWS + 1
    ts = (BASE_TS + rng.integers(0, YEAR_SECONDS, rows).astype("timedelta64[s]")).astype(
        "datetime64[us]"
    )
    return pl.DataFrame(
        {
            "order_id": np.arange(first, first + rows, dtype=np.int64),
            "customer_id": rng.integers(1, N_CUSTOMERS + 1, rows),
            "ts": ts,
            "amount": np.round(rng.gamma(2.0, 40.0, rows), 2),
            "quantity": rng.integers(1, 11, rows),
            "status": rng.choice(STATUSES, rows, p=STATUS_P),
            "country": rng.choice(COUNTRIES, rows),
        }
    )


def generate(size: int, seed: int = 42, data_dir: Path = DATA_DIR, *, force: bool = False,
             verbose: bool = True) -> Path:
    """Write (or reuse) an orders CSV of about ``size`` bytes; return its path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"orders-{size_label(size)}-s{seed}.csv"
    meta_path = path.with_suffix(".meta.json")
    want = {"size": size, "seed": seed, "chunk_rows": CHUNK_ROWS, "version": FORMAT_VERSION}
    if not force and path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} == want and path.stat().st_size == meta["bytes"]:
            if verbose:
                print(f"reusing {path} ({meta['rows']:,} rows, {meta['bytes'] / 1e6:,.0f} MB)")
            return path
    started = time.perf_counter()
    tmp = path.with_name(f".{path.name}.tmp")
    rows_total = 0
    index = 0
    with open(tmp, "wb") as fh:
        while True:
            written = fh.tell()
            if written >= size:
                break
            rows = CHUNK_ROWS
            if index > 0:  # the last chunk is trimmed to land close to the requested size
                per_row = written / rows_total
                rows = min(CHUNK_ROWS, max(1, int((size - written) / per_row)))
            df = chunk(index, rows, seed)
            df.write_csv(fh, include_header=index == 0, datetime_format="%Y-%m-%dT%H:%M:%S",
                         float_precision=2)
            rows_total += rows
            index += 1
            if rows < CHUNK_ROWS:
                break
        nbytes = fh.tell()
    os.replace(tmp, path)
    meta = {**want, "rows": rows_total, "bytes": nbytes}
    meta_path.write_text(json.dumps(meta, indent=2))
    if verbose:
        secs = time.perf_counter() - started
        print(f"generated {path}: {rows_total:,} rows, {nbytes / 1e6:,.0f} MB in {secs:.1f} s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("100MB"),
                    help="approximate file size, e.g. 100MB (default), 1GB, 5GB")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--force", action="store_true", help="regenerate even if the file exists")
    args = ap.parse_args()
    generate(args.size, args.seed, args.data_dir, force=args.force)


if __name__ == "__main__":
    main()
