"""The same work in each engine: CSV -> typed columns -> 3 filters -> 2 derived -> SQL shape ->
Parquet (zstd, one file).

The work, in words:

* types: order_id int64, customer_id int64, ts timestamp[us], amount float64, quantity int64
  (status and country stay strings);
* filters: ``status = 'paid'``, then ``amount >= 5.0``, then ``quantity BETWEEN 1 AND 8``;
* derived: ``total = amount * quantity``, then ``vat = total * 0.19``;
* SQL: ``SELECT * EXCLUDE (status), CAST(ts AS DATE) AS day, CASE WHEN total >= 500 THEN
  'large' WHEN total >= 100 THEN 'medium' ELSE 'small' END AS size FROM input``;
* write one zstd-compressed Parquet file.

Run as a child process by ``run.py`` (one process per engine, so peak RSS is per engine)::

    python benchmarks/batch/engines.py ENGINE CSV OUT.parquet RESULT.json [OPTIONS_JSON]

The child times only the work (imports and interpreter start are excluded; ``run.py`` also
records the whole process's wall clock) and writes its result as JSON.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Column types, in Sluice's type names (the benchmark's "casts").
TYPES = {
    "order_id": "int",
    "customer_id": "int",
    "ts": "timestamp",
    "amount": "float",
    "quantity": "int",
}
FILTERS = {
    "paid": "status = 'paid'",
    "amount_ok": "amount >= 5.0",
    "quantity_ok": "quantity BETWEEN 1 AND 8",
}
DERIVED = {"total": "amount * quantity", "vat": "total * 0.19"}
SQL = (
    "SELECT * EXCLUDE (status), CAST(ts AS DATE) AS day, "
    "CASE WHEN total >= 500 THEN 'large' WHEN total >= 100 THEN 'medium' ELSE 'small' END AS size "
    "FROM input"
)
#: The derived column whose sum is compared across engines.
CHECK_COLUMN = "vat"


# ------------------------------------------------------------------------------------- Sluice


def sluice_pipeline(csv: Path, out: Path, options: dict[str, Any]) -> Any:
    """The Sluice pipeline, built with the Python API exactly as a user would.

    ``options`` (all ordinary user settings):

    * ``cast_step`` (bool): read every column as a string (``infer_types: false``) and type them
      with a ``cast`` step that dead-letters uncastable values -- the style of
      ``examples/orders``. Default false: the types are declared on the CSV source
      (``schema:``), so pyarrow's CSV parser converts while it parses (bad values still become
      dead letters, via the reader's safe mode);
    * ``block_size`` (bytes): the CSV source's ``block_size``;
    * ``batch_rows``, ``queue_size``: the pipeline's ``settings``.
    """
    import sluice

    settings: dict[str, Any] = {"report_dir": str(out.parent / "runs")}
    for key in ("batch_rows", "queue_size"):
        if options.get(key):
            settings[key] = options[key]
    source_opts: dict[str, Any] = {}
    if options.get("block_size"):
        source_opts["block_size"] = options["block_size"]
    p = sluice.Pipeline("batch_bench", **settings)
    if options.get("cast_step"):
        stream = p.read(sluice.csv(str(csv), infer_types=False, **source_opts))
        stream = stream.cast("types", TYPES)
    else:
        stream = p.read(sluice.csv(str(csv), schema=TYPES, **source_opts))
    for step_id, expr in FILTERS.items():
        stream = stream.filter(step_id, expr)
    stream = stream.derive("money", DERIVED).sql("shape", SQL)
    stream.write("parquet", sluice.parquet(str(out)))
    p.dead_letters(path=str(out.parent / "dead_letters"))
    return p


def run_sluice(csv: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    p = sluice_pipeline(csv, out, options)
    report = p.run(base_dir=out.parent, progress=False)
    if report.status != "succeeded" or report.dead_letters:
        raise SystemExit(f"sluice run {report.status}, {report.dead_letters} dead letters")
    return {
        "rows_read": report.rows_read,
        "report": report.to_dict(),
    }


# ------------------------------------------------------------------------------------- Polars


def run_polars(csv: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Hand-written Polars: lazy scan, casts, streaming engine, sink_parquet.

    The numeric columns are typed by the CSV scan (``schema``); ``ts`` is read as a string and
    cast with an explicit format, which is ~3x faster in Polars 1.x/2.x than letting the scan
    parse a ``Datetime`` column (it then guesses the format).
    """
    import polars as pl

    schema = {
        "order_id": pl.Int64,
        "customer_id": pl.Int64,
        "ts": pl.String,
        "amount": pl.Float64,
        "quantity": pl.Int64,
        "status": pl.String,
        "country": pl.String,
    }
    total = pl.col("total")
    (
        pl.scan_csv(csv, schema=schema)
        .with_columns(pl.col("ts").str.to_datetime("%Y-%m-%dT%H:%M:%S", time_unit="us"))
        .filter(pl.col("status") == "paid")
        .filter(pl.col("amount") >= 5.0)
        .filter(pl.col("quantity").is_between(1, 8))
        .with_columns(total=pl.col("amount") * pl.col("quantity"))
        .with_columns(vat=total * 0.19)
        # the SQL step: SELECT * EXCLUDE (status), CAST(ts AS DATE) AS day, CASE ... AS size
        .drop("status")
        .with_columns(
            day=pl.col("ts").dt.date(),
            size=pl.when(total >= 500)
            .then(pl.lit("large"))
            .when(total >= 100)
            .then(pl.lit("medium"))
            .otherwise(pl.lit("small")),
        )
        .sink_parquet(out, compression="zstd", engine="streaming")
    )
    return {}


# ------------------------------------------------------------------------------------- pandas


def run_pandas(csv: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Hand-written pandas: read_csv in chunks, vectorized ops, pyarrow ParquetWriter appends."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    dtypes = {
        "order_id": "int64",
        "customer_id": "int64",
        "ts": "str",
        "amount": "float64",
        "quantity": "int64",
        "status": "str",
        "country": "str",
    }
    writer: pq.ParquetWriter | None = None
    rows_read = 0
    try:
        for df in pd.read_csv(csv, dtype=dtypes, chunksize=options.get("chunksize", 500_000)):
            rows_read += len(df)
            df["ts"] = pd.to_datetime(df["ts"], format="%Y-%m-%dT%H:%M:%S")
            df = df[df["status"] == "paid"]
            df = df[df["amount"] >= 5.0]
            df = df[df["quantity"].between(1, 8)]
            df = df.assign(total=df["amount"] * df["quantity"])
            df = df.assign(vat=df["total"] * 0.19)
            df = df.drop(columns="status")
            df["day"] = df["ts"].dt.floor("D").astype("date32[pyarrow]")
            df["size"] = np.select(
                [df["total"] >= 500, df["total"] >= 100], ["large", "medium"], "small"
            )
            table = pa.Table.from_pandas(df, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema, compression="zstd")
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    return {"rows_read": rows_read}


def run_sluice_cast(csv: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Sluice, typing with a ``cast`` step after an all-string read (see ``sluice_pipeline``)."""
    return run_sluice(csv, out, {**options, "cast_step": True})


#: Ordinary user settings that made the 1 GB run faster with a peak RSS under 1 GB on the
#: benchmark machine (see benchmarks/README.md): small CSV blocks (the pyarrow streaming reader
#: keeps ~36 blocks in flight), merged into large batches (fewer per-batch conversions and fewer,
#: larger Parquet row groups), and a shorter queue.
TUNED = {"block_size": 2 << 20, "batch_rows": 1 << 20, "queue_size": 2}


def run_sluice_tuned(csv: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Sluice with the ``TUNED`` settings (options given on the command line win)."""
    return run_sluice(csv, out, {**TUNED, **options})


ENGINES: dict[str, Callable[[Path, Path, dict[str, Any]], dict[str, Any]]] = {
    "sluice": run_sluice,
    "sluice-tuned": run_sluice_tuned,
    "sluice-cast": run_sluice_cast,
    "polars": run_polars,
    "pandas": run_pandas,
}


def main() -> None:
    engine = sys.argv[1]
    csv, out, result = (Path(a).resolve() for a in sys.argv[2:5])
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    started, cpu_started = time.perf_counter(), time.process_time()
    extra = ENGINES[engine](csv, out, options)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.write_text(json.dumps({"seconds": seconds, "work_cpu_seconds": cpu,
                                  "self_peak_rss_mb": rss, **extra}))


if __name__ == "__main__":
    main()
