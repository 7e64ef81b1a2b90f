"""Child process of the reader fuzz test: reads (kind, file) cases and prints one JSON line each.

Run as ``python fuzz_worker.py CASES.json START``: reads the cases from index START on, each
through the file reader of its kind, and prints for each ``{"i": index, ...counts...}`` as soon
as it is done, so the parent knows which case crashed or hung the process. Kept out of pytest's
process so a segmentation fault or a hang is observed, not suffered.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def read_case(kind: str, path: str, options: dict[str, Any]) -> dict[str, Any]:
    from sluice.config.loader import parse_pipeline
    from sluice.plugins import RunContext, lookup

    source: dict[str, Any] = {"kind": kind, "path": path, **options}
    if kind == "xml":
        source.setdefault("record_path", "row")
    cfg = parse_pipeline({"pipeline": "fuzz", "source": source}).source
    reader = lookup("source", kind)(cfg)
    reader.open(RunContext("fuzz", "fuzz", Path(path).parent))
    rows = dead = skipped = 0
    positions: list[int] = []
    whole_file: list[str] = []
    reasons: dict[str, int] = {}
    try:
        for chunk in reader.read():
            skipped += chunk.skipped
            if chunk.table is not None:
                rows += chunk.table.num_rows
                if "__sluice_row" in chunk.table.column_names:
                    positions += chunk.table.column("__sluice_row").to_pylist()
            if chunk.dead is not None:
                dead += chunk.dead.num_rows
                for reason, pos in zip(
                    chunk.dead.column("reason").to_pylist(),
                    chunk.dead.column("position").to_pylist(),
                    strict=True,
                ):
                    reasons[reason] = reasons.get(reason, 0) + 1
                    if pos is None:
                        whole_file.append(reason)
                    else:
                        positions.append(pos)
    finally:
        reader.close()
    return {
        "rows": rows,
        "dead": dead,
        "skipped": skipped,
        "reasons": reasons,
        "whole_file": whole_file,
        "duplicate_positions": len(positions) - len(set(positions)),
        "max_position": max(positions) if positions else -1,
        "n_positions": len(positions),
    }


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    start = int(sys.argv[2])
    for i in range(start, len(cases)):
        case = cases[i]
        print(json.dumps({"i": i, "start": True}), flush=True)
        t0 = time.perf_counter()
        try:
            result = read_case(case["kind"], case["path"], case.get("options", {}))
            result["error"] = None
        except Exception as exc:  # an exception out of read() is a finding, not a crash
            result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        result["i"] = i
        result["seconds"] = round(time.perf_counter() - t0, 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
