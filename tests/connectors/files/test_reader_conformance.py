"""Every file reader: the Source protocol, registry names, glob errors, a corrupt file goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sluice import testing
from sluice.batch import ROW_COL, SOURCE_COL, source_names
from sluice.config.models import CsvSource, JsonlSource, JsonSource, ParquetSource, XmlSource
from sluice.errors import SourceError
from sluice.plugins import RunContext, Source, lookup

KINDS: dict[str, tuple[type, dict[str, Any], str, bytes]] = {
    "csv": (CsvSource, {}, "csv", b"a\n1\n2\n"),
    "json": (JsonSource, {}, "json", b'[{"a": 1}, {"a": 2}]'),
    "jsonl": (JsonlSource, {}, "jsonl", b'{"a": 1}\n{"a": 2}\n'),
    "parquet": (ParquetSource, {}, "parquet", b""),
    "xml": (XmlSource, {"record_path": "r/i"}, "xml", b"<r><i><a>1</a></i><i><a>2</a></i></r>"),
}


def make(kind: str, path: str, **extra: Any) -> Any:
    model, kw, _, _ = KINDS[kind]
    return lookup("source", kind)(model(kind=kind, id=f"src_{kind}", path=path, **kw, **extra))


def write_good(kind: str, path: Path) -> None:
    if kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"a": [1, 2]}), path)
    else:
        path.write_bytes(KINDS[kind][3])


def drain(reader: Any, base: Path) -> tuple[list[pa.Table], pa.Table, int]:
    return tuple(testing.drain(reader, base))  # type: ignore[return-value]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_protocol_and_step_id(kind: str) -> None:
    reader = make(kind, "x")
    assert isinstance(reader, Source)
    assert reader.step_id == f"src_{kind}"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_glob_matching_nothing(kind: str, tmp_path: Path) -> None:
    reader = make(kind, "in/*.dat")
    with pytest.raises(SourceError) as err:
        reader.open(RunContext(pipeline="p", run_id="r", base_dir=tmp_path))
    text = str(err.value)
    assert f"src_{kind}" in text and "in/*.dat" in text and "Fix:" in text


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_two_files_sorted_positions_bytes_and_a_broken_one(kind: str, tmp_path: Path) -> None:
    ext = KINDS[kind][2]
    write_good(kind, tmp_path / f"b.{ext}")
    write_good(kind, tmp_path / f"c.{ext}")
    (tmp_path / f"a.{ext}").write_bytes(b"\x00\x01garbage" if kind != "csv" else b"a\n\xff\n")
    reader = make(kind, f"*.{ext}")
    tables, dead, nbytes = drain(reader, tmp_path)
    t = pa.concat_tables(tables, promote_options="permissive")
    good = [str(tmp_path / f"b.{ext}")] * 2 + [str(tmp_path / f"c.{ext}")] * 2
    assert source_names(t.column(SOURCE_COL)).to_pylist()[-4:] == good
    assert t.column(ROW_COL).to_pylist()[-4:] == [0, 1, 0, 1]
    assert dead.num_rows >= 1 or kind == "csv"
    assert set(dead.column("source").to_pylist()) <= {str(tmp_path / f"a.{ext}")}
    total = sum((tmp_path / f"{n}.{ext}").stat().st_size for n in "abc")
    assert nbytes == total


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_size_hint(kind: str, tmp_path: Path) -> None:
    ext = KINDS[kind][2]
    write_good(kind, tmp_path / f"b.{ext}")
    reader = make(kind, str(tmp_path / f"b.{ext}"))
    reader.open(RunContext(pipeline="p", run_id="r", base_dir=tmp_path))
    assert reader.size_hint() == (tmp_path / f"b.{ext}").stat().st_size
    reader.close()
