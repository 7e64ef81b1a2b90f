"""A file that matched the glob but cannot be read is a ``file_unreadable`` dead letter (or fails
the run with ``on_unreadable: fail``), never zero rows — for every file reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluice.batch import concat
from sluice.config.loader import parse_pipeline
from sluice.errors import SourceError
from sluice.plugins import RunContext, lookup

CONTENT = {
    "csv": b"id,name\n1,a\n2,b\n",
    "jsonl": b'{"id": 1, "name": "a"}\n{"id": 2, "name": "b"}\n',
    "json": b'[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]',
    "xml": b"<rows><row><id>1</id><name>a</name></row><row><id>2</id><name>b</name></row></rows>",
}
EXTRA = {"xml": {"record_path": "row"}}


def _write(kind: str, path: Path) -> None:
    if kind == "parquet":
        pq.write_table(pa.table({"id": [1, 2], "name": ["a", "b"]}), path)
    else:
        path.write_bytes(CONTENT[kind])


def _reader(kind: str, pattern: str, **extra: Any) -> Any:
    cfg = parse_pipeline(
        {
            "pipeline": "p",
            "source": {"kind": kind, "path": pattern, **EXTRA.get(kind, {}), **extra},
        }
    ).source
    return lookup("source", kind)(cfg)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "json", "xml", "parquet"])
def test_i8_07_file_vanishing_between_glob_and_read_is_a_dead_letter(
    tmp_path: Path, kind: str
) -> None:
    for name in ("a", "b"):
        _write(kind, tmp_path / f"{name}.{kind}")
    reader = _reader(kind, f"{tmp_path}/*.{kind}")
    reader.open(RunContext("p", "r", tmp_path))
    (tmp_path / f"a.{kind}").unlink()  # gone after the glob, before the read
    chunks = list(reader.read())
    dead = concat([c.dead for c in chunks if c.dead is not None])
    rows = sum(c.table.num_rows for c in chunks if c.table is not None)
    assert dead.column("reason").to_pylist() == ["file_unreadable"]
    assert dead.column("source").to_pylist() == [str(tmp_path / f"a.{kind}")]
    assert "No such file" in dead.column("message")[0].as_py()
    assert rows == 2  # the other file is read as usual


def test_i8_07_on_unreadable_fail_stops_the_run(tmp_path: Path) -> None:
    _write("csv", tmp_path / "a.csv")
    reader = _reader("csv", f"{tmp_path}/*.csv", on_unreadable="fail")
    reader.open(RunContext("p", "r", tmp_path))
    (tmp_path / "a.csv").unlink()
    with pytest.raises(SourceError, match="on_unreadable"):
        list(reader.read())
