"""Generate the example orders data (deterministic), with a few bad rows on purpose.

    python examples/orders/generate.py --rows 200000

Writes ``data/orders-00N.csv`` (3 files) and ``data/customers.csv`` next to this script, and
clears earlier outputs (``out/``, ``dead_letters/``, ``runs/``) so each demo starts clean.
Bad rows on purpose: a row with a missing field, amounts that are not numbers, a timestamp
that is not a date, a line with bytes that are not UTF-8, and duplicated order ids.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent


def generate(rows: int, out: Path, files: int = 3, seed: int = 7) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    n_customers = 5_000
    customers = pl.DataFrame(
        {
            "customer_id": np.arange(1, n_customers + 1),
            "segment": rng.choice(
                ["retail", "smb", "enterprise"], n_customers, p=[0.7, 0.25, 0.05]
            ),
            "country": rng.choice(["DE", "FR", "NL", "PL", "ES"], n_customers),
        }
    )
    customers.write_csv(out / "customers.csv")
    ids = np.arange(1, rows + 1)
    base = np.datetime64("2026-11-01T00:00:00")
    df = pl.DataFrame(
        {
            "order_id": ids,
            "customer_id": rng.integers(1, n_customers + 1, rows),
            "ts": (base + rng.integers(0, 30 * 86400, rows).astype("timedelta64[s]")).astype(str),
            "amount": np.round(rng.gamma(2.0, 60.0, rows), 2).astype(str),
            "quantity": rng.integers(1, 10, rows),
            "status": rng.choice(["paid", "paid", "paid", "refunded", "test"], rows),
        }
    )
    # a few duplicated order ids (filtered on purpose by the deduplicate step)
    dup_rows = df.sample(max(1, rows // 2000), seed=seed)
    df = pl.concat([df, dup_rows]).sample(fraction=1.0, shuffle=True, seed=seed)
    parts = np.array_split(np.arange(df.height), files)
    bad = {"column_count": 0, "cast_error": 0, "encoding": 0, "duplicates": dup_rows.height}
    for i, idx in enumerate(parts, start=1):
        path = out / f"orders-{i:03d}.csv"
        part = df[idx.tolist()]
        text = part.write_csv()
        lines = text.splitlines(keepends=True)
        header, body = lines[0], lines[1:]
        body.insert(len(body) // 3, "999000001,17,2026-11-02T10:00:00,12.50\n")  # missing fields
        bad["column_count"] += 1
        body.insert(len(body) // 2, f"99900000{i}2,18,2026-11-02T11:00:00,n/a,1,paid\n")
        body.insert(len(body) // 2, f"99900000{i}3,19,yesterday,10.00,1,paid\n")
        bad["cast_error"] += 2
        raw = (header + "".join(body)).encode("utf-8")
        if i == files:
            raw += f"99900000{i}4,20,2026-11-03T09:00:00,5.00,1,caf\xe9\n".encode("latin-1")
            bad["encoding"] += 1
        path.write_bytes(raw)
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dir", type=Path, default=HERE)
    args = ap.parse_args()
    for sub in ("data", "out", "dead_letters", "runs"):
        shutil.rmtree(args.dir / sub, ignore_errors=True)
    bad = generate(args.rows, args.dir / "data")
    print(f"generated {args.rows:,} orders in {args.dir / 'data'}; bad on purpose: {bad}")


if __name__ == "__main__":
    main()
