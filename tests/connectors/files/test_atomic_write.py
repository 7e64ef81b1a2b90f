"""Atomic file output: a killed writer never leaves a file under its final name; abort() cleans up.

The kill test starts a real subprocess that writes a large output in many batches, SIGKILLs it
while the temporary file is growing, then checks the output directory and that a later run
commits complete, readable files next to the leftovers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from sluice.config.models import CsvSink, JsonlSink, ParquetSink
from sluice.connectors.files.writers import CsvWriter, JsonlWriter, ParquetWriter
from sluice.plugins import RunContext, Sink

WRITER_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
import pyarrow as pa
from sluice.config.models import CsvSink, ParquetSink
from sluice.connectors.files.writers import CsvWriter, ParquetWriter
from sluice.plugins import RunContext

kind, base, path = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "parquet":
    w = ParquetWriter(ParquetSink(id="out", kind="parquet", path=path, rows_per_file=10**9))
else:
    w = CsvWriter(CsvSink(id="out", kind="csv", path=path))
w.open(RunContext("kill", "killed", Path(base)))
n = 20_000
for i in range(1_000_000):  # far more than the test waits for: it is killed mid-write
    ids = np.arange(i * n, (i + 1) * n)
    w.write(pa.table({"id": ids, "s": pa.array(ids.astype(str)), "x": np.random.rand(n)}))
w.commit()
"""


def _final_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*.tmp") if p.is_file())


@pytest.mark.parametrize(("kind", "path"), [("parquet", "out"), ("csv", "out/all.csv")])
def test_writer_killed_mid_write_leaves_no_final_file(tmp_path: Path, kind: str, path: str) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, kind, str(tmp_path), path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        sizes: list[int] = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            temps = _temp_files(tmp_path)
            if temps:
                sizes.append(temps[0].stat().st_size)
                if len(sizes) >= 2 and sizes[-1] > sizes[-2] > 0:
                    break  # the temporary file exists and is growing: kill it mid-write
            time.sleep(0.05)
        else:
            pytest.fail(f"the writer never produced a growing temporary file: {sizes}")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    assert _final_files(tmp_path) == []  # nothing under a final name
    leftovers = _temp_files(tmp_path)
    assert leftovers and all(".killed.tmp" in p.name for p in leftovers)

    # A later run commits complete, readable files; the dead run's temp files stay hidden.
    w: Sink
    if kind == "parquet":
        w = ParquetWriter(ParquetSink(id="out", kind="parquet", path=path, rows_per_file=700))
    else:
        w = CsvWriter(CsvSink(id="out", kind="csv", path=path))
    w.open(RunContext("kill", "again", tmp_path))
    for i in range(5):
        w.write(pa.table({"id": list(range(i * 300, (i + 1) * 300)), "s": ["v"] * 300}))
    w.commit()
    finals = _final_files(tmp_path)
    assert finals and all(f.is_relative_to(out) for f in finals)
    if kind == "parquet":
        assert [f.name for f in finals] == [f"part-again-{i:05d}.parquet" for i in range(3)]
        ids = [i for f in finals for i in pq.read_table(f)["id"].to_pylist()]
    else:
        assert finals == [out / "all.csv"]
        ids = pa_csv.read_csv(finals[0])["id"].to_pylist()
    assert ids == list(range(1500))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ParquetWriter(ParquetSink(id="o", kind="parquet", path="a/b", rows_per_file=2)),
        lambda: ParquetWriter(ParquetSink(id="o", kind="parquet", path="a/b", partition_by=["k"])),
        lambda: ParquetWriter(ParquetSink(id="o", kind="parquet", path="a/b/x.parquet")),
        lambda: CsvWriter(CsvSink(id="o", kind="csv", path="a/b")),
        lambda: JsonlWriter(JsonlSink(id="o", kind="jsonl", path="a/b/x.jsonl")),
    ],
)
def test_writer_abort_leaves_nothing(tmp_path: Path, make: object) -> None:
    assert callable(make)
    w: Sink = make()
    w.open(RunContext("p", "r1", tmp_path))
    for i in range(3):
        w.write(pa.table({"k": ["x", "y", None], "v": [i, i + 1, i + 2]}))
    assert any(tmp_path.rglob(".*.tmp"))
    w.abort()
    assert list(tmp_path.iterdir()) == []  # temp files and the directories the run created: gone
    w.abort()  # idempotent


def test_writer_abort_keeps_existing_output(tmp_path: Path) -> None:
    w = ParquetWriter(ParquetSink(id="o", kind="parquet", path="out"))
    w.open(RunContext("p", "r1", tmp_path))
    w.write(pa.table({"v": [1]}))
    w.commit()
    w.open(RunContext("p", "r2", tmp_path))
    w.write(pa.table({"v": [2]}))
    w.abort()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["part-r1-00000.parquet"]
