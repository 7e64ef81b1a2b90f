"""ParquetReader: parquet-testing good files read exactly, bad files quarantined whole."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluice.batch import POSITION_COLS, ROW_COL, SOURCE_COL, source_names
from sluice.config.models import ParquetSource
from sluice.connectors.files.parquet import ParquetReader
from sluice.testing import drain

PT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "parquet-testing"
GOOD = sorted(p.name for p in (PT / "data").glob("*.parquet"))
BAD = sorted(p.name for p in (PT / "bad_data").glob("*.parquet"))
# ARROW-GH-43605 is a Go reader crash repro (RLE dictionary indices with bit width 0, which the
# spec allows for a one-entry dictionary); pyarrow decodes it to 21186 valid rows, so we read it.
READABLE_BAD = {"ARROW-GH-43605.parquet"}


def run(
    path: str, reader_cls: Any = ParquetReader, **kw: Any
) -> tuple[list[pa.Table], pa.Table, int]:
    return tuple(drain(reader_cls(ParquetSource(kind="parquet", path=path, **kw))))  # type: ignore[return-value]


def test_suite_present() -> None:
    assert len(GOOD) == 10 and len(BAD) == 8


@pytest.mark.parametrize("name", GOOD)
def test_good_files_match_pyarrow(name: str) -> None:
    path = PT / "data" / name
    tables, dead, nbytes = run(str(path))
    assert dead.num_rows == 0
    got = pa.concat_tables(tables).drop_columns(list(POSITION_COLS))
    expected = pq.read_table(path)
    assert got.num_rows == expected.num_rows
    assert got.equals(expected)
    assert pa.concat_tables(tables).column(ROW_COL).to_pylist() == list(range(expected.num_rows))
    assert nbytes == path.stat().st_size


@pytest.mark.parametrize("name", BAD)
def test_bad_files(name: str) -> None:
    tables, dead, _ = run(str(PT / "bad_data" / name))
    if name in READABLE_BAD:
        expected = pq.read_table(PT / "bad_data" / name)
        assert dead.num_rows == 0
        assert pa.concat_tables(tables).drop_columns(list(POSITION_COLS)).equals(expected)
        return
    assert tables == [], "no partial load"
    d = dead.to_pylist()
    assert len(d) == 1 and d[0]["reason"] == "corrupt_file" and d[0]["message"]
    assert d[0]["source"] == str(PT / "bad_data" / name)


def test_glob_bad_then_good(tmp_path: Path) -> None:
    for i, name in enumerate(sorted(set(BAD) - READABLE_BAD)):
        (tmp_path / f"{i}_bad.parquet").symlink_to(PT / "bad_data" / name)
    shutil.copy(PT / "data" / "alltypes_plain.parquet", tmp_path / "9_good.parquet")
    tables, dead, _ = run(str(tmp_path / "*.parquet"))
    assert dead.num_rows == 7 and set(dead.column("reason").to_pylist()) == {"corrupt_file"}
    t = pa.concat_tables(tables)
    assert t.num_rows == 8
    assert set(source_names(t.column(SOURCE_COL)).to_pylist()) == {str(tmp_path / "9_good.parquet")}


def test_select_and_schema(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"a": ["1", "2", "x"], "b": [1, 2, 3]}), p)
    tables, dead, _ = run(str(p), select=["a"], schema={"a": "int64"})
    t = pa.concat_tables(tables)
    assert t.column_names == ["a", *POSITION_COLS]
    assert t.column("a").to_pylist() == [1, 2]
    assert dead.column("reason").to_pylist() == ["cast_error"]
    assert dead.column("position").to_pylist() == [2]
    _, dead, _ = run(str(p), select=["nope"])
    assert "nope" in dead.column("message")[0].as_py()


def test_streaming_big_file_mode(tmp_path: Path) -> None:
    class Small(ParquetReader):
        whole_file_limit = 0

    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"a": list(range(1000))}), p, row_group_size=100)
    tables, dead, _ = run(str(p), reader_cls=Small)
    t = pa.concat_tables(tables)
    assert t.column("a").to_pylist() == list(range(1000))
    assert t.column(ROW_COL).to_pylist() == list(range(1000))
    assert dead.num_rows == 0


def test_i8_07_parquet_path_that_is_no_longer_a_file_is_file_unreadable(tmp_path: Path) -> None:
    """Between the glob and the read a file became a folder: the operating system's refusal is
    file_unreadable (pyarrow says so without an errno), while bytes that are not Parquet stay
    corrupt_file."""
    from sluice.plugins import RunContext

    for name in ("a", "b"):
        pq.write_table(pa.table({"x": [1, 2]}), tmp_path / f"{name}.parquet")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really PAR1")
    reader = ParquetReader(ParquetSource(kind="parquet", path=str(tmp_path / "*.parquet")))
    reader.open(RunContext("p", "r", tmp_path))
    (tmp_path / "a.parquet").unlink()
    (tmp_path / "a.parquet").mkdir()
    chunks = list(reader.read())
    dead = pa.concat_tables([c.dead for c in chunks if c.dead is not None]).to_pylist()
    assert [(d["reason"], d["source"]) for d in dead] == [
        ("file_unreadable", str(tmp_path / "a.parquet")),
        ("corrupt_file", str(tmp_path / "c.parquet")),
    ]
    assert "not a regular file" in dead[0]["message"]
    assert sum(c.table.num_rows for c in chunks if c.table is not None) == 2
