"""The same data contract checked by each engine, on the same orders CSV (with injected faults).

The contract (Sluice's format; 7 fields, 15 row checks, every action ``warn`` so every row is
counted against every check and no row is removed)::

    order_id     int        required, unique
    customer_id  int        required, references customers.csv (customer_id)
    ts           timestamp
    amount       float      min 0, max 10000
    quantity     int        min 1, max 8
    status       enum [paid, refunded, pending, cancelled]
    country      pattern ^[A-Z]{2}$

Engines (each run as a child process by ``run.py``)::

    python benchmarks/contracts/engines.py ENGINE ORDERS.csv CUSTOMERS.csv RESULT.json

* ``sluice``: a pipeline built with the Python API -- CSV source with ``infer_types: false``
  (every column read as text, so the contract's ``type`` checks see the raw values; with a
  source ``schema`` a bad value would be a source ``cast_error`` dead letter instead) -> the
  ``contract`` step -> no sink. Counts from the run report's ``quality`` section.
* ``sluice-evaluate``: ``pl.read_csv`` (all columns as text) + ``sluice.quality.engine.evaluate``.
* ``great_expectations``: pandas ``read_csv`` (text) -> the typed columns a pandas user derives
  (``to_numeric``) -> an ephemeral GX context, a pandas data source, two expectation suites
  (``raw``: types, not-null, enum, pattern on the text; ``typed``: ranges, unique,
  references on the numbers) -> ``ValidationDefinition.run`` -> ``unexpected_count`` each.
* ``pandas``: the same checks as plain pandas boolean masks (a floor: no validation library).

Null semantics, aligned on Sluice's: a missing value (empty CSV field) fails only ``required``;
a value that is present but does not parse as the field's type fails only ``type`` (it is then
missing for min/max/unique/references); every other check looks at present, parsed values.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATUSES = ["paid", "refunded", "pending", "cancelled"]
COUNTRY_PATTERN = "^[A-Z]{2}$"
INT_FIELDS = ("order_id", "customer_id", "quantity")
#: What "parses as int / float" means for text, written as the regular expressions the peers use
#: (Polars' non-strict string casts after strip, as Sluice does; see README "Semantic notes").
INT_RE = r"^\s*[+-]?\d+\s*$"
FLOAT_RE = r"^\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*$"
TS_FORMAT = "%Y-%m-%dT%H:%M:%S"

#: Check names, in Sluice's naming (``<field>.<check>``), in report order.
CHECKS = [
    "order_id.type",
    "order_id.required",
    "order_id.unique",
    "customer_id.type",
    "customer_id.required",
    "customer_id.references",
    "ts.type",
    "amount.type",
    "amount.min",
    "amount.max",
    "quantity.type",
    "quantity.min",
    "quantity.max",
    "status.enum",
    "country.pattern",
]


def contract(customers: Path) -> dict[str, Any]:
    """The contract as a user writes it inline (every check ``warn``)."""
    ref = {"path": str(customers), "column": "customer_id"}
    fields: list[dict[str, Any]] = [
        {"name": "order_id", "type": "int", "required": True, "unique": True},
        {"name": "customer_id", "type": "int", "required": True, "references": ref},
        {"name": "ts", "type": "timestamp"},
        {"name": "amount", "type": "float", "min": 0, "max": 10000},
        {"name": "quantity", "type": "int", "min": 1, "max": 8},
        {"name": "status", "enum": STATUSES},
        {"name": "country", "pattern": COUNTRY_PATTERN},
    ]
    return {
        "name": "orders",
        "version": "1.0.0",
        "schema_policy": "freeze",
        "schema": [{**f, "action": "warn"} for f in fields],
    }


# ------------------------------------------------------------------------------------- Sluice


def run_sluice(csv: Path, customers: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The contract as a pipeline step, built with the Python API as a user would."""
    import sluice

    settings: dict[str, Any] = {"report_dir": options["report_dir"]}
    for key in ("batch_rows", "queue_size"):
        if options.get(key):
            settings[key] = options[key]
    source_opts = {"block_size": options["block_size"]} if options.get("block_size") else {}
    p = sluice.Pipeline("contract_bench", **settings)
    p.read(sluice.csv(str(csv), infer_types=False, **source_opts))._step(
        "validate", "contract", contract(customers)
    )
    p.dead_letters(path=options["dead_letter_dir"])
    report = p.run(base_dir=csv.parent, progress=False)
    if report.status != "succeeded":
        raise SystemExit(f"sluice run {report.status}: {report.to_dict().get('error')}")
    checks = report.quality["validate"]["checks"]
    return {
        "rows_checked": report.rows_read,
        "counts": {c["check"]: c["failed"] for c in checks},
        "checked": {c["check"]: c["checked"] for c in checks},
        "dead_letters": report.dead_letters,
        "steps": [
            {k: s[k] for k in ("step_id", "kind", "rows_in", "rows_out", "seconds", "batches")}
            for s in report.to_dict()["steps"]
        ],
    }


def run_sluice_evaluate(csv: Path, customers: Path, options: dict[str, Any]) -> dict[str, Any]:
    """``evaluate(contract, table)`` on the whole file read into memory by Polars (as text)."""
    import polars as pl

    from sluice.quality.contract import parse_contract
    from sluice.quality.engine import evaluate

    t0 = time.perf_counter()
    df = pl.read_csv(csv, infer_schema=False)
    t1 = time.perf_counter()
    counts = evaluate(parse_contract(contract(customers)), df)
    t2 = time.perf_counter()
    return {
        "rows_checked": df.height,
        "counts": counts,
        "phases": {"read": t1 - t0, "validate": t2 - t1},
    }


# ------------------------------------------------------------------------------------- pandas


def _read_pandas(csv: Path) -> Any:
    """Every column as text; only an empty field is missing (Sluice's CSV ``null_values``
    default). pandas' default NA strings ("n/a", "NULL", "NaN", ...) would turn values that
    Sluice counts as type failures into missing values."""
    import pandas as pd

    return pd.read_csv(csv, dtype=str, keep_default_na=False, na_values=[""])


def _typed_pandas(raw: Any) -> Any:
    """The numeric columns a pandas user derives: text that parses -> number, else NaN."""
    import pandas as pd

    typed = {}
    for col in INT_FIELDS:
        s = raw[col]
        typed[col] = pd.to_numeric(s, errors="coerce").where(s.str.match(INT_RE, na=False))
    s = raw["amount"]
    typed["amount"] = pd.to_numeric(s, errors="coerce").where(s.str.match(FLOAT_RE, na=False))
    return pd.DataFrame(typed)


def _customer_ids(customers: Path) -> list[int]:
    import pandas as pd

    return pd.read_csv(customers, usecols=["customer_id"])["customer_id"].dropna().tolist()


def run_great_expectations(csv: Path, customers: Path, options: dict[str, Any]) -> dict[str, Any]:
    """pandas + Great Expectations (GX Core 1.x), used the documented way."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    t0 = time.perf_counter()
    raw = _read_pandas(csv)
    t1 = time.perf_counter()
    typed = _typed_pandas(raw)
    ids = _customer_ids(customers)
    t2 = time.perf_counter()

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # quiet, not slower
    source = context.data_sources.add_pandas("orders")
    raw_batch = source.add_dataframe_asset("orders_raw").add_batch_definition_whole_dataframe("all")
    typed_batch = source.add_dataframe_asset("orders_typed").add_batch_definition_whole_dataframe(
        "all"
    )
    # Each expectation, with the Sluice check it corresponds to.
    raw_checks: dict[str, Any] = {
        "order_id.type": gxe.ExpectColumnValuesToMatchRegex(column="order_id", regex=INT_RE),
        "order_id.required": gxe.ExpectColumnValuesToNotBeNull(column="order_id"),
        "customer_id.type": gxe.ExpectColumnValuesToMatchRegex(column="customer_id", regex=INT_RE),
        "customer_id.required": gxe.ExpectColumnValuesToNotBeNull(column="customer_id"),
        "ts.type": gxe.ExpectColumnValuesToMatchStrftimeFormat(
            column="ts", strftime_format=TS_FORMAT
        ),
        "amount.type": gxe.ExpectColumnValuesToMatchRegex(column="amount", regex=FLOAT_RE),
        "quantity.type": gxe.ExpectColumnValuesToMatchRegex(column="quantity", regex=INT_RE),
        "status.enum": gxe.ExpectColumnValuesToBeInSet(column="status", value_set=STATUSES),
        "country.pattern": gxe.ExpectColumnValuesToMatchRegex(
            column="country", regex=COUNTRY_PATTERN
        ),
    }
    typed_checks: dict[str, Any] = {
        "order_id.unique": gxe.ExpectColumnValuesToBeUnique(column="order_id"),
        # GX's unique counts every row of a duplicated value; Sluice counts the repeats (rows
        # whose value was seen before) = non-null rows - distinct values. This expectation gives
        # the distinct count, so the Sluice-style count comes from GX's own results.
        "order_id.distinct": gxe.ExpectColumnUniqueValueCountToBeBetween(
            column="order_id", min_value=0
        ),
        "customer_id.references": gxe.ExpectColumnValuesToBeInSet(
            column="customer_id", value_set=ids
        ),
        "amount.min": gxe.ExpectColumnValuesToBeBetween(column="amount", min_value=0),
        "amount.max": gxe.ExpectColumnValuesToBeBetween(column="amount", max_value=10000),
        "quantity.min": gxe.ExpectColumnValuesToBeBetween(column="quantity", min_value=1),
        "quantity.max": gxe.ExpectColumnValuesToBeBetween(column="quantity", max_value=8),
    }
    runs = []
    for name, batch, checks, frame in (
        ("raw", raw_batch, raw_checks, raw),
        ("typed", typed_batch, typed_checks, typed),
    ):
        suite = context.suites.add(gx.ExpectationSuite(name=f"orders_{name}"))
        for expectation in checks.values():
            suite.add_expectation(expectation)
        vd = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"orders_{name}", data=batch, suite=suite)
        )
        runs.append((vd, checks, frame))
    t3 = time.perf_counter()

    by_id: dict[str, Any] = {}
    for vd, checks, frame in runs:
        result = vd.run(batch_parameters={"dataframe": frame}, result_format="BASIC")
        by_expectation = {r.expectation_config.id: r for r in result.results}
        for check, expectation in checks.items():
            by_id[check] = by_expectation[expectation.id]
    t4 = time.perf_counter()

    counts: dict[str, int] = {}
    native: dict[str, int] = {}
    for check, r in by_id.items():
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise SystemExit(f"GX expectation for {check} raised: {r.exception_info}")
        if check == "order_id.distinct":
            continue
        counts[check] = int(r.result["unexpected_count"])
    unique = by_id["order_id.unique"].result
    native["order_id.unique"] = counts["order_id.unique"]
    counts["order_id.unique"] = (
        int(unique["element_count"])
        - int(unique["missing_count"])
        - int(by_id["order_id.distinct"].result["observed_value"])
    )
    return {
        "rows_checked": len(raw),
        "counts": counts,
        "native_counts": native,
        "phases": {"read": t1 - t0, "prepare": t2 - t1, "setup": t3 - t2, "validate": t4 - t3},
    }


def run_pandas(csv: Path, customers: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The same checks as plain pandas masks: no validation library, no reports."""
    import pandas as pd

    t0 = time.perf_counter()
    raw = _read_pandas(csv)
    t1 = time.perf_counter()
    typed = _typed_pandas(raw)
    ids = pd.Series(_customer_ids(customers))
    t2 = time.perf_counter()

    def present(col: str) -> Any:
        return raw[col].notna()

    def bad_type(col: str, regex: str) -> int:
        return int((present(col) & ~raw[col].str.match(regex, na=False)).sum())

    ts = pd.to_datetime(raw["ts"], format=TS_FORMAT, errors="coerce")
    oid = typed["order_id"]
    counts = {
        "order_id.type": bad_type("order_id", INT_RE),
        "order_id.required": int(raw["order_id"].isna().sum()),
        "order_id.unique": int((oid.notna() & oid.duplicated()).sum()),
        "customer_id.type": bad_type("customer_id", INT_RE),
        "customer_id.required": int(raw["customer_id"].isna().sum()),
        "customer_id.references": int(
            (typed["customer_id"].notna() & ~typed["customer_id"].isin(ids)).sum()
        ),
        "ts.type": int((present("ts") & ts.isna()).sum()),
        "amount.type": bad_type("amount", FLOAT_RE),
        "amount.min": int((typed["amount"] < 0).sum()),
        "amount.max": int((typed["amount"] > 10000).sum()),
        "quantity.type": bad_type("quantity", INT_RE),
        "quantity.min": int((typed["quantity"] < 1).sum()),
        "quantity.max": int((typed["quantity"] > 8).sum()),
        "status.enum": int((present("status") & ~raw["status"].isin(STATUSES)).sum()),
        "country.pattern": int(
            (present("country") & ~raw["country"].str.match(COUNTRY_PATTERN, na=False)).sum()
        ),
    }
    t3 = time.perf_counter()
    return {
        "rows_checked": len(raw),
        "counts": counts,
        "phases": {"read": t1 - t0, "prepare": t2 - t1, "validate": t3 - t2},
    }


#: Modules each engine imports before its clock starts (interpreter start and imports are not
#: part of the work; ``run.py`` also records the whole process's wall clock).
IMPORTS: dict[str, list[str]] = {
    "sluice": ["sluice", "sluice.quality.step", "polars", "pyarrow.csv"],
    "sluice-evaluate": ["sluice", "sluice.quality.engine", "polars"],
    "great_expectations": ["great_expectations", "great_expectations.expectations", "pandas"],
    "pandas": ["pandas"],
}

ENGINES: dict[str, Callable[[Path, Path, dict[str, Any]], dict[str, Any]]] = {
    "sluice": run_sluice,
    "sluice-evaluate": run_sluice_evaluate,
    "great_expectations": run_great_expectations,
    "pandas": run_pandas,
}


def main() -> None:
    engine = sys.argv[1]
    csv, customers, result = (Path(a).resolve() for a in sys.argv[2:5])
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no network here; no telemetry
    for module in IMPORTS[engine]:
        importlib.import_module(module)
    started, cpu_started = time.perf_counter(), time.process_time()
    extra = ENGINES[engine](csv, customers, options)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.write_text(
        json.dumps({"seconds": seconds, "work_cpu_seconds": cpu, "self_peak_rss_mb": rss, **extra})
    )


if __name__ == "__main__":
    main()
