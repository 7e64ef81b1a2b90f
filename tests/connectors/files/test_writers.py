"""Parquet, CSV and JSONL writers: layouts, formats, schema alignment, dead-letter output."""

from __future__ import annotations

import datetime as dt
import decimal
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from sluice.batch import (
    DEAD_LETTER_SCHEMA,
    ROW_COL,
    SOURCE_COL,
    dead_letters,
    strip_positions,
    with_positions,
)
from sluice.config.models import CsvSink, FileSinkBase, JsonlSink, ParquetSink
from sluice.connectors.files import writers
from sluice.connectors.files.writers import CsvWriter, JsonlWriter, ParquetWriter
from sluice.errors import SinkError
from sluice.plugins import RunContext, Sink


def batch(ids: range, src: str = "in.csv") -> pa.Table:
    n = len(ids)
    t = pa.table(
        {
            "id": pa.array(list(ids), pa.int64()),
            "name": [f"n{i}" for i in ids],
            "amount": pa.array([float(i) / 2 for i in ids]),
        }
    )
    return with_positions(t, src, ids.start if n else 0)


def visible(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def hidden(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.startswith("."))


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    return RunContext(pipeline="p", run_id="r1", base_dir=tmp_path)


CONFIGS: dict[str, type[FileSinkBase]] = {
    "parquet": ParquetSink,
    "csv": CsvSink,
    "jsonl": JsonlSink,
}


def parquet(path: str, **kw: object) -> ParquetWriter:
    return ParquetWriter(
        ParquetSink.model_validate({"id": "out", "kind": "parquet", "path": path, **kw})
    )


def test_writers_implement_the_sink_protocol() -> None:
    assert isinstance(parquet("x"), Sink)
    assert isinstance(CsvWriter(CsvSink(id="c", kind="csv", path="x")), Sink)
    assert isinstance(JsonlWriter(JsonlSink(id="j", kind="jsonl", path="x")), Sink)
    assert parquet("x").step_id == "out"


def test_parquet_directory_parts_appear_only_at_commit(ctx: RunContext, tmp_path: Path) -> None:
    w = parquet("out", rows_per_file=25)
    w.open(ctx)
    for start in range(0, 100, 10):
        assert w.write(batch(range(start, start + 10))).num_rows == 0
    assert visible(tmp_path) == []  # finished parts are renamed only on commit
    assert hidden(tmp_path)
    w.commit()
    files = visible(tmp_path / "out")
    assert [f.name for f in files] == [f"part-r1-{i:05d}.parquet" for i in range(4)]
    assert [pq.read_metadata(f).num_rows for f in files] == [25, 25, 25, 25]
    assert hidden(tmp_path) == []
    back = ds.dataset(tmp_path / "out").to_table()
    assert back.column_names == ["id", "name", "amount"]  # no position columns
    assert back.column("id").to_pylist() == list(range(100))


def test_parquet_single_file_and_compression(ctx: RunContext, tmp_path: Path) -> None:
    w = parquet("sub/one.parquet", compression="none", rows_per_file=3)
    w.open(ctx)
    w.write(batch(range(10)))
    w.write(batch(range(10, 20)))
    w.commit()
    assert visible(tmp_path) == [tmp_path / "sub" / "one.parquet"]
    meta = pq.read_metadata(tmp_path / "sub" / "one.parquet")
    assert meta.num_rows == 20
    assert meta.row_group(0).column(0).compression == "UNCOMPRESSED"

    w = parquet("g.parquet", compression="gzip")
    w.open(ctx)
    w.write(batch(range(5)))
    w.commit()
    assert pq.read_metadata(tmp_path / "g.parquet").row_group(0).column(0).compression == "GZIP"


def test_parquet_hive_partitions(ctx: RunContext, tmp_path: Path) -> None:
    t = pa.table(
        {
            "country": ["de", "fr", None, "a/b", "de", "x=y %", ""],
            "year": pa.array([2024, 2024, 2023, 2023, 2023, 2024, 2024], pa.int32()),
            "v": list(range(7)),
        }
    )
    w = parquet("out", partition_by=["country", "year"])
    w.open(ctx)
    assert w.write(with_positions(t, "s", 0)).num_rows == 0
    w.write(with_positions(t, "s", 7))
    w.commit()
    dirs = sorted(str(p.parent.relative_to(tmp_path / "out")) for p in visible(tmp_path / "out"))
    assert "country=de/year=2024" in dirs
    assert "country=a%2Fb/year=2023" in dirs
    assert "country=__HIVE_DEFAULT_PARTITION__/year=2023" in dirs
    assert len(dirs) == 7  # one part per partition: both batches went to the same open writer
    for f in visible(tmp_path / "out"):
        assert pq.read_schema(f).names == ["v"]  # partition columns are not in the files
    back = ds.dataset(tmp_path / "out", partitioning="hive").to_table()
    got = sorted(
        zip(
            back["v"].to_pylist(),
            back["country"].to_pylist(),
            back["year"].to_pylist(),
            strict=True,
        )
    )
    expected = [
        (v, c or None, y)
        for c, y, v in zip(*[t[c].to_pylist() for c in t.column_names], strict=True)
    ]
    assert got == sorted(expected * 2)


def test_parquet_partition_writers_are_bounded(
    ctx: RunContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writers, "MAX_OPEN_PARTITIONS", 2)
    w = parquet("out", partition_by=["k"])
    w.open(ctx)
    t = pa.table({"k": ["a", "b", "c", "d"], "v": [1, 2, 3, 4]})
    w.write(t)
    assert w._state is not None and len(w._state.open_parts) <= 2
    w.write(t)
    w.commit()
    back = ds.dataset(tmp_path / "out", partitioning="hive").to_table()
    assert sorted(back["v"].to_pylist()) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert len(visible(tmp_path / "out")) == 8  # evicted writers were finished, new parts started


def test_parquet_partition_errors(ctx: RunContext) -> None:
    with pytest.raises(SinkError, match="directory"):
        parquet("x.parquet", partition_by=["k"]).open(ctx)
    w = parquet("out", partition_by=["nope"])
    w.open(ctx)
    with pytest.raises(SinkError, match="nope"):
        w.write(pa.table({"k": [1]}))
    w.abort()


def test_csv_header_once_per_file_and_delimiter(ctx: RunContext, tmp_path: Path) -> None:
    w = CsvWriter(CsvSink(id="c", kind="csv", path="out", delimiter=";"))
    w.open(ctx)
    w.write(batch(range(3)))
    w.write(batch(range(3, 5)))
    w.commit()
    [f] = visible(tmp_path / "out")
    assert f.name == "part-r1-00000.csv"
    lines = f.read_text().splitlines()
    assert lines[0] == '"id";"name";"amount"'
    assert len(lines) == 6
    back = pa_csv.read_csv(f, parse_options=pa_csv.ParseOptions(delimiter=";"))
    assert back["id"].to_pylist() == list(range(5))

    w = CsvWriter(CsvSink(id="c", kind="csv", path="nohead.csv", header=False))
    w.open(ctx)
    w.write(batch(range(2)))
    w.commit()
    assert (tmp_path / "nohead.csv").read_text().splitlines() == ['0,"n0",0', '1,"n1",0.5']


def test_jsonl_types_as_strings(ctx: RunContext, tmp_path: Path) -> None:
    t = pa.table(
        {
            "d": pa.array([dt.date(2024, 2, 29), None]),
            "amount": pa.array(
                [decimal.Decimal("12.30"), decimal.Decimal("-0.05")], pa.decimal128(10, 2)
            ),
            "ts": pa.array([dt.datetime(2024, 1, 1, 12, 30), None], pa.timestamp("us")),
            "s": ['a "quoted"\nline', "ünï"],
            "b": [True, None],
        }
    )
    w = JsonlWriter(JsonlSink(id="j", kind="jsonl", path="out.jsonl"))
    w.open(ctx)
    w.write(t)
    w.commit()
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["d"] == "2024-02-29"
    assert rows[0]["amount"] == "12.30" and rows[1]["amount"] == "-0.05"
    assert rows[0]["ts"].startswith("2024-01-01T12:30")
    assert rows[0]["s"] == 'a "quoted"\nline' and rows[1]["s"] == "ünï"
    assert rows[1]["d"] is None and rows[1]["b"] is None


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_dead_letter_output(ctx: RunContext, tmp_path: Path, kind: str) -> None:
    letters = dead_letters(
        step_id="cast",
        reason="cast_error",
        message="bad",
        payload=["{}", '{"a":1}'],
        source="f.csv",
    )
    assert letters.schema.equals(DEAD_LETTER_SCHEMA)
    w: Sink = (
        parquet("dl")
        if kind == "parquet"
        else JsonlWriter(JsonlSink(id="dl", kind="jsonl", path="dl"))
    )
    w.open(ctx)
    assert w.write(letters).num_rows == 0
    assert w.write(letters).num_rows == 0
    w.commit()
    [f] = visible(tmp_path / "dl")
    if kind == "parquet":
        back = pq.read_table(f)
        assert back.schema.names == DEAD_LETTER_SCHEMA.names
        assert back.column("payload").to_pylist() == ["{}", '{"a":1}'] * 2
    else:
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        assert [r["payload"] for r in rows] == ["{}", '{"a":1}'] * 2
        assert rows[0]["reason"] == "cast_error" and rows[0]["created_at"]


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_schema_alignment_and_rejection(ctx: RunContext, tmp_path: Path, kind: str) -> None:
    config = {"id": "out", "kind": kind, "path": f"o.{kind}"}
    w: Sink = {"parquet": ParquetWriter, "csv": CsvWriter, "jsonl": JsonlWriter}[kind](
        CONFIGS[kind].model_validate(config)
    )
    w.open(ctx)
    first = batch(range(3))
    assert w.write(first).num_rows == 0
    # column order differs, a column is all-null typed, positions in the middle: aligned
    b2 = batch(range(3, 5))
    reordered = b2.select(["amount", SOURCE_COL, "id", ROW_COL]).append_column("name", pa.nulls(2))
    assert w.write(reordered).num_rows == 0
    # a narrower integer type is widened losslessly
    narrow = strip_positions(batch(range(5, 6))).set_column(0, "id", pa.array([5], pa.int32()))
    assert w.write(narrow).num_rows == 0
    # genuinely incompatible: a string where a number is expected -> dead letters naming the column
    bad = batch(range(6, 8)).set_column(2, "amount", pa.array(["x", "y"]))
    dead = w.write(bad)
    assert dead.num_rows == 2
    assert dead["reason"].to_pylist() == ["sink_rejected"] * 2
    assert "'amount'" in dead["message"][0].as_py()
    assert dead["position"].to_pylist() == [6, 7]
    assert dead["source"].to_pylist() == ["in.csv"] * 2
    # an unknown extra column is rejected too
    extra = batch(range(8, 9)).append_column("zzz", pa.array([1]))
    assert "'zzz'" in w.write(extra)["message"][0].as_py()
    # a batch of 0 rows is fine
    assert w.write(batch(range(0))).num_rows == 0
    w.commit()
    f = tmp_path / f"o.{kind}"
    if kind == "parquet":
        back = pq.read_table(f)
    elif kind == "csv":
        back = pa_csv.read_csv(f, convert_options=pa_csv.ConvertOptions(strings_can_be_null=True))
    else:
        back = pa.Table.from_pylist([json.loads(x) for x in f.read_text().splitlines()])
    assert back["id"].to_pylist() == [0, 1, 2, 3, 4, 5]
    assert back["name"].to_pylist()[:3] == ["n0", "n1", "n2"]
    assert back["name"].to_pylist()[3:] == [None, None, "n5"]


@pytest.mark.parametrize("path", ["empty.parquet", "empty.csv", "empty.jsonl", "emptydir"])
def test_run_without_rows(ctx: RunContext, tmp_path: Path, path: str) -> None:
    kind = path.split(".")[-1] if "." in path else "parquet"
    w: Sink = {"parquet": ParquetWriter, "csv": CsvWriter, "jsonl": JsonlWriter}[kind](
        CONFIGS[kind].model_validate({"id": "out", "kind": kind, "path": path})
    )
    w.open(ctx)
    assert w.write(batch(range(0))).num_rows == 0
    w.commit()
    if path == "emptydir":
        assert (tmp_path / "emptydir").is_dir() and visible(tmp_path) == []
    else:
        assert visible(tmp_path) == [tmp_path / path]  # single file: a valid, empty file
        if kind == "parquet":
            assert pq.read_table(tmp_path / path).num_rows == 0
        if kind == "csv":
            assert (tmp_path / path).read_text().strip() == '"id","name","amount"'


def test_write_outside_open_is_an_error(ctx: RunContext) -> None:
    w = parquet("x")
    with pytest.raises(SinkError, match="before open"):
        w.write(batch(range(1)))
    w.open(ctx)
    w.commit()
    w.commit()  # idempotent
    w.abort()  # after commit: nothing to do
    with pytest.raises(SinkError):
        w.write(batch(range(1)))


def test_single_file_replaces_previous_run(tmp_path: Path) -> None:
    for run, n in (("r1", 5), ("r2", 3)):
        w = parquet("x.parquet")
        w.open(RunContext("p", run, tmp_path))
        w.write(batch(range(n)))
        w.commit()
    assert pq.read_table(tmp_path / "x.parquet").num_rows == 3


def test_small_batches_are_gathered_into_row_groups(
    tmp_path: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writers, "ROW_GROUP_ROWS", 2500)
    w = ParquetWriter(ParquetSink(id="out", kind="parquet", path="out.parquet"))
    w.open(ctx)
    for i in range(10):
        w.write(pa.table({"id": list(range(i * 1000, (i + 1) * 1000))}))
    w.commit()
    meta = pq.ParquetFile(tmp_path / "out.parquet").metadata
    # 10 batches of 1000 rows: flushed at 3000, 6000, 9000 rows, then the rest at commit
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3000] * 3 + [1000]
    assert pq.read_table(tmp_path / "out.parquet")["id"].to_pylist() == list(range(10_000))


def _raw_strings(values: list[bytes | None], typ: pa.DataType | None = None) -> pa.Array:
    """A string array holding exactly these bytes (Arrow does not check them on creation)."""
    import numpy as np

    typ = typ or pa.string()
    sizes = [len(v or b"") for v in values]
    offsets = np.cumsum([0, *sizes]).astype(np.int64 if typ == pa.large_string() else np.int32)
    valid = pa.array([v is not None for v in values]).buffers()[1]
    data = b"".join(v or b"" for v in values)
    return pa.Array.from_buffers(
        typ, len(values), [valid, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)]
    )


def test_i8_10_invalid_utf8_rows_are_encoding_letters_and_the_file_stays_readable(
    tmp_path: Path,
) -> None:
    """What a reader let through (invalid UTF-8 in a JSON line) never reaches a file: DuckDB
    reads the Parquet output, the bad rows are dead letters with their positions."""
    import duckdb

    texts = _raw_strings([b"ok", b"\xff\xfebad", None, b"caf\xc3\xa9", b"half \xc3"])
    nested = pa.array([["a"], ["b"], ["c"], ["d"], ["e"]])
    big = _raw_strings([b"x", b"y", b"z", b"w", b"v\x80"], pa.large_string())
    t = with_positions(pa.table({"s": texts, "l": nested, "b": big}), "in.jsonl", 10)
    w = ParquetWriter(ParquetSink(id="pq", kind="parquet", path="out"))
    w.open(RunContext("p", "r1", tmp_path))
    dead = w.write(t)
    w.commit()
    assert dead["reason"].to_pylist() == ["encoding"] * 2
    assert dead["position"].to_pylist() == [11, 14]
    assert dead["source"].to_pylist() == ["in.jsonl"] * 2
    payloads = [json.loads(p) for p in dead["payload"].to_pylist()]
    assert payloads[0]["s"] == "\\xff\\xfebad" and payloads[1]["b"] == "v\\x80"
    assert "'s'" in dead["message"][0].as_py() and "'b'" in dead["message"][0].as_py()
    out = tmp_path / "out"
    rows = duckdb.sql(f"SELECT s, b FROM '{out}/*.parquet' ORDER BY b").fetchall()
    assert rows == [("café", "w"), ("ok", "x"), (None, "z")]


def test_i8_10_invalid_utf8_nested_in_a_list_is_found() -> None:
    inner = _raw_strings([b"fine", b"\xc0\xaf"])
    lists = pa.ListArray.from_arrays(pa.array([0, 1, 2], pa.int32()), inner)
    t = with_positions(pa.table({"tags": lists, "n": [1, 2]}), "f", 0)
    aligner = writers.SchemaAligner("out")
    kept, data, dead = aligner.split(t)
    assert data is not None and data["n"].to_pylist() == [1]
    assert kept[ROW_COL].to_pylist() == [0]
    assert dead["position"].to_pylist() == [1] and dead["reason"][0].as_py() == "encoding"
