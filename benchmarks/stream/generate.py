"""Generate the stream benchmark's events as JSON lines: deterministic (seeded), vectorized.

    python benchmarks/stream/generate.py                   # 1M events -> benchmarks/stream/data/
    python benchmarks/stream/generate.py --events 10000000

One event per line, keys in this order::

    {"ts":1796428800000,"key":"k0818","value":117.36,"status":"ok"}

* ``ts``: epoch milliseconds (int), starting at 2026-12-05T00:00:00Z and rising by a random
  0, 1 or 2 ms per event (``rng.integers(0, 3)``), so it never decreases: no event is late;
* ``key``: one of 1,000 strings ``k0000`` .. ``k0999`` (uniform);
* ``value``: float, normal(100, 25) rounded to 2 decimals;
* ``status``: ``"ok"`` with probability 0.9, else ``"error"``.

Events are made in chunks of 1M, each from its own NumPy stream seeded with ``[seed, chunk]``
(``ts`` carries on from the previous chunk), so the content depends only on ``--seed`` and
``--events``. The file lives in its own folder (``events-<n>-s<seed>/events.jsonl``: the folder is
what a watched-folder source watches); a ``.meta.json`` sidecar next to the folder lets later
runs reuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
FORMAT_VERSION = 1
CHUNK_EVENTS = 1_000_000
N_KEYS = 1_000
OK_SHARE = 0.9
#: 2026-12-05T00:00:00Z in epoch milliseconds.
BASE_TS_MS = int(np.datetime64("2026-12-05T00:00:00", "ms").astype(np.int64))
KEYS = np.array([f"k{i:04d}" for i in range(N_KEYS)])


def events_label(n: int) -> str:
    """1_000_000 -> '1M', 250_000 -> '250k', 1234 -> '1234'."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def parse_count(text: str) -> int:
    """'1M' -> 1_000_000, '250k' -> 250_000, '1000' -> 1000."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1M, 250k)") from None
    if value < 1:
        raise argparse.ArgumentTypeError("need at least one event")
    return int(value)


def parse_bytes(text: str) -> int:
    """'2MB' / '2MiB' -> bytes (MB and MiB both mean 2**20 here, as pyarrow block sizes go)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2MB, 512KB)") from None


def chunk(index: int, n: int, seed: int, first_ts: int) -> pl.DataFrame:
    """Chunk ``index``: ``n`` events, the first one ``first_ts`` + a 0..2 ms step."""
    rng = np.random.default_rng([seed, index])
    ts = first_ts + np.cumsum(rng.integers(0, 3, n, dtype=np.int64))
    return pl.DataFrame(
        {
            "ts": ts,
            "key": KEYS[rng.integers(0, N_KEYS, n)],
            "value": np.round(rng.normal(100.0, 25.0, n), 2),
            "status": np.where(rng.random(n) < OK_SHARE, "ok", "error"),
        }
    )


def generate(events: int, seed: int = 42, data_dir: Path = DATA_DIR, *, force: bool = False,
             verbose: bool = True) -> Path:
    """Write (or reuse) the JSONL file of ``events`` events; return its path."""
    folder = data_dir / f"events-{events_label(events)}-s{seed}"
    path = folder / "events.jsonl"
    meta_path = folder.with_suffix(".meta.json")
    want = {"events": events, "seed": seed, "chunk_events": CHUNK_EVENTS,
            "version": FORMAT_VERSION}
    if not force and path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} == want and path.stat().st_size == meta["bytes"]:
            if verbose:
                print(f"reusing {path} ({events:,} events, {meta['bytes'] / 1e6:,.0f} MB)")
            return path
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():  # the watched folder must hold nothing but the events
        stale.unlink()
    started = time.perf_counter()
    tmp = folder.parent / f".{folder.name}.jsonl.tmp"
    last_ts = BASE_TS_MS
    ok = 0
    with open(tmp, "wb") as fh:
        for index, start in enumerate(range(0, events, CHUNK_EVENTS)):
            df = chunk(index, min(CHUNK_EVENTS, events - start), seed, last_ts)
            last_ts = int(df["ts"][-1])
            ok += int((df["status"] == "ok").sum())
            df.write_ndjson(fh)
        nbytes = fh.tell()
    os.replace(tmp, path)
    meta = {**want, "bytes": nbytes, "ok_events": ok, "first_ts_ms": BASE_TS_MS,
            "last_ts_ms": last_ts}
    meta_path.write_text(json.dumps(meta, indent=2))
    if verbose:
        secs = time.perf_counter() - started
        print(f"generated {path}: {events:,} events ({ok:,} ok), {nbytes / 1e6:,.0f} MB "
              f"in {secs:.1f} s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=parse_count, default=1_000_000,
                    help="number of events: 1M (default), 250k, 10M ...")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--force", action="store_true", help="regenerate even if the file exists")
    args = ap.parse_args()
    generate(args.events, args.seed, args.data_dir, force=args.force)


if __name__ == "__main__":
    main()
