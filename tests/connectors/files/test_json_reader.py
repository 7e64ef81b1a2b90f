"""JsonReader (whole documents, JSONTestSuite) and JsonlReader (lines, fallback per line)."""

from __future__ import annotations

import gzip
import json
import multiprocessing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sluice.batch import POSITION_COLS, ROW_COL, strip_positions
from sluice.config import parse_pipeline
from sluice.config.models import JsonlSource, JsonSource
from sluice.connectors.files.json import JsonlReader, JsonReader, scan_lines
from sluice.plugins import Chunk
from sluice.runtime.executor import Executor
from sluice.testing import drain

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"
SUITE = SHARED / "jsontestsuite" / "test_parsing"


def _names(prefix: str) -> list[str]:
    return sorted(p.name for p in SUITE.glob(f"{prefix}_*.json")) if SUITE.is_dir() else []


def run(reader: Any) -> tuple[list[pa.Table], pa.Table, int]:
    return tuple(drain(reader))  # type: ignore[return-value]


def json_run(path: Path, **kw: Any) -> tuple[list[dict[str, Any]], pa.Table]:
    tables, dead, _ = run(JsonReader(JsonSource(kind="json", path=str(path), **kw)))
    rows = [
        {k: v for k, v in r.items() if k not in POSITION_COLS}
        for t in tables
        for r in t.to_pylist()
    ]
    return rows, dead


def test_suite_counts() -> None:
    assert (len(_names("y")), len(_names("n")), len(_names("i"))) == (95, 188, 35)


@pytest.mark.parametrize("name", _names("y"))
def test_y_accepted(name: str) -> None:
    tables, dead, _ = run(JsonReader(JsonSource(kind="json", path=str(SUITE / name))))
    assert dead.num_rows == 0, dead.to_pylist()
    doc = json.loads((SUITE / name).read_bytes())
    if doc != []:
        assert sum(t.num_rows for t in tables) >= 1


@pytest.mark.parametrize("name", _names("n"))
def test_n_rejected(name: str) -> None:
    tables, dead, _ = run(JsonReader(JsonSource(kind="json", path=str(SUITE / name))))
    assert tables == []
    assert dead.num_rows == 1
    assert dead.column("reason")[0].as_py() in ("parse_error", "encoding")
    assert dead.column("message")[0].as_py()


def _read_in_child(path: str, q: Any) -> None:
    try:
        run(JsonReader(JsonSource(kind="json", path=path)))
        q.put("ok")
    except BaseException as exc:
        q.put(f"raised {exc!r}")


@pytest.mark.parametrize("name", _names("i"))
@pytest.mark.timeout(20)
def test_i_no_crash_no_hang(name: str) -> None:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(str(SUITE / name), q))
    proc.start()
    proc.join(10)
    assert not proc.is_alive(), "hangs"
    assert proc.exitcode == 0, f"crashed with exit code {proc.exitcode}"
    assert q.get(timeout=1) == "ok"


def test_deep_nesting_is_a_dead_letter_not_a_crash() -> None:
    rows, dead = json_run(SUITE / "n_structure_100000_opening_arrays.json")
    assert rows == [] and dead.column("reason").to_pylist() == ["parse_error"]


def test_nan_rejected(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text('[{"a": NaN}]')
    rows, dead = json_run(p)
    assert rows == [] and dead.column("reason").to_pylist() == ["parse_error"]


def test_shapes(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text('[{"a": 1, "b": "x"}, {"a": 2, "c": true}, {"a": 3.5, "b": {"k": [1]}}]')
    rows, dead = json_run(p)
    assert dead.num_rows == 0
    assert rows == [
        {"a": 1.0, "b": '"x"', "c": None},
        {"a": 2.0, "b": None, "c": True},
        {"a": 3.5, "b": '{"k":[1]}', "c": None},
    ]
    p.write_text('{"only": "one"}')
    assert json_run(p)[0] == [{"only": "one"}]
    p.write_text('[1, "two", null]')
    assert json_run(p)[0] == [{"value": "1"}, {"value": '"two"'}, {"value": "null"}]


def test_truncated_payload(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text("[" + ",".join(['{"a": 1}'] * 20000) + ",")
    _, dead = json_run(p)
    d = dead.to_pylist()[0]
    assert d["reason"] == "parse_error" and len(d["payload"]) == 64 * 1024
    assert "truncated" in d["message"]


def test_invalid_utf8_and_max_bytes(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_bytes(b'[{"a": "\xff"}]')
    assert json_run(p)[1].column("reason").to_pylist() == ["encoding"]
    p.write_text(json.dumps([{"a": i} for i in range(1000)]))
    _, dead = json_run(p, max_bytes=1024)  # the old name of max_record_bytes
    assert dead.column("reason").to_pylist() == ["too_large"]
    assert "max_record_bytes=1024" in dead.column("message")[0].as_py()


def test_json_schema_and_positions(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"n": str(i)} for i in range(70000)] + [{"n": "x"}]))
    cfg = JsonSource(kind="json", path=str(p), schema={"n": "int32"})
    tables, dead, nbytes = run(JsonReader(cfg))
    assert len(tables) == 2 and all(t.schema.field("n").type == pa.int32() for t in tables)
    rows = [r for t in tables for r in t.column(ROW_COL).to_pylist()]
    assert rows == list(range(70000))
    assert dead.column("position").to_pylist() == [70000]
    assert nbytes == p.stat().st_size


# ------------------------------------------------------------------------------------- JSONL


def jsonl_run(path: Path, **kw: Any) -> tuple[list[pa.Table], pa.Table, int]:
    return run(JsonlReader(JsonlSource(kind="jsonl", path=str(path), **kw)))


def test_jsonl_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    lines = [json.dumps({"i": i, "s": f"v{i}"}) for i in range(3000)]
    lines[1234] = '{"i": 1234, "s": broken'
    lines[2000] = "[1, 2]"
    lines.insert(10, "")
    p.write_text("\n".join(lines) + "\n\n")
    tables, dead, nbytes = jsonl_run(p, block_size=4096)
    ids = [i for t in tables for i in t.column("i").to_pylist()]
    assert ids == [i for i in range(3000) if i not in (1234, 2000)]
    d = dead.to_pylist()
    assert [x["reason"] for x in d] == ["parse_error", "parse_error"]
    assert [x["line"] for x in d] == [1236, 2002]  # 1-based, counting the blank line
    assert d[0]["payload"] == '{"i": 1234, "s": broken'
    assert [x["position"] for x in d] == [1234, 2000]
    positions = [r for t in tables for r in t.column(ROW_COL).to_pylist()]
    assert positions == [i for i in range(3000) if i not in (1234, 2000)]
    assert nbytes == p.stat().st_size
    assert len(ids) + dead.num_rows == 3000


def test_jsonl_invalid_utf8_and_mixed(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n{"a": "x"}\n')
    tables, dead, _ = jsonl_run(p)
    assert dead.column("reason").to_pylist() == ["encoding"]
    assert dead.column("line").to_pylist() == [2]
    assert sum(t.num_rows for t in tables) == 2


def test_jsonl_bad_line_in_first_block_keeps_later_batches_clean(tmp_path: Path) -> None:
    """Regression: the schema pinned from a first block parsed line by line must not include
    the position columns, or every later batch carried them twice."""
    lines = ['{"a": 1, "b": "x"}', "not json"] + [f'{{"a": {i}, "b": "y"}}' for i in range(3000)]
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = drain(JsonlReader(JsonlSource(kind="jsonl", path=str(path), block_size=4096)))
    assert len(out.tables) > 1
    for table in out.tables:
        assert table.column_names.count(ROW_COL) == 1
    assert sum(t.num_rows for t in out.tables) == 3001
    assert out.dead.num_rows == 1


def test_jsonl_big_blocks_parsed_in_parallel_pieces_keep_rows_and_order(tmp_path: Path) -> None:
    """Blocks after the first (schema pinned) are parsed in 1 MiB pieces on pyarrow's thread
    pool; a field that appears late with clashing types falls back to one piece. Same rows, same
    order as the input either way."""
    path = tmp_path / "big.jsonl"
    n = 120_000
    with path.open("w") as f:
        for i in range(n):
            extra = f', "late": {i if i % 2 else json.dumps(str(i))}' if i > 100_000 else ""
            f.write(
                f'{{"id": {i}, "name": "row {i:06d} ....................", "v": {i / 3}{extra}}}\n'
            )
    assert path.stat().st_size > 3 * (1 << 20)
    cfg = JsonlSource(kind="jsonl", path=str(path), block_size=3 << 20)
    out = drain(JsonlReader(cfg))
    ids = [i for t in out.tables for i in t.column("id").to_pylist()]
    assert ids == list(range(n))
    rows = [r for t in out.tables for r in t.column(ROW_COL).to_pylist()]
    assert rows == list(range(n))
    assert out.dead.num_rows == 0


# ----------------------------------------------------------------------------------- issue 8


def chunks(reader: Any) -> list[Chunk]:
    return list(reader.read())


def totals(out: list[Chunk]) -> tuple[list[pa.Table], pa.Table, int]:
    """Tables, dead letters (concatenated) and skipped records of a reader's chunks."""
    tables = [c.table for c in out if c.table is not None]
    dead = [c.dead for c in out if c.dead is not None]
    letters = pa.concat_tables(dead) if dead else pa.table({"reason": pa.array([], pa.string())})
    return tables, letters, sum(c.skipped for c in out)


def run_pipeline(tmp_path: Path, kind: str, name: str, sink: str = "jsonl") -> Any:
    raw = {
        "pipeline": "p",
        "source": {"kind": kind, "path": name},
        "sinks": [{"id": "out", "kind": sink, "path": f"out.{sink}"}],
        "dead_letter": {"kind": "jsonl", "path": "dead"},
    }
    return Executor(parse_pipeline(raw), base_dir=tmp_path, progress=False).run()


@pytest.mark.parametrize(
    ("content", "rows"),
    [(b"{}", 1), (b"[{},{}]", 2), (b"\xef\xbb\xbf{}", 1), (b"  {} \n", 1), (b'[{}, {"a": 1}]', 2)],
)
def test_i8_05_json_empty_object_is_one_row(tmp_path: Path, content: bytes, rows: int) -> None:
    p = tmp_path / "a.json"
    p.write_bytes(content)
    tables, dead, _ = run(JsonReader(JsonSource(kind="json", path=str(p))))
    assert dead.num_rows == 0
    assert sum(t.num_rows for t in tables) == rows
    assert [r for t in tables for r in t.column(ROW_COL).to_pylist()] == list(range(rows))
    rep = run_pipeline(tmp_path, "json", "a.json")
    assert rep.step("source").rows_in == rows and rep.step("out").rows_out == rows
    assert rep.balanced
    assert (tmp_path / "out.jsonl").read_text().count("\n") == rows


def test_i8_05_jsonl_rows_without_columns_are_counted_exactly(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"{}\n{}\n{}\n")
    tables, dead, _ = run(JsonlReader(JsonlSource(kind="jsonl", path=str(p))))
    assert dead.num_rows == 0 and sum(t.num_rows for t in tables) == 3
    assert all(strip_positions(t).num_columns == 0 for t in tables)
    assert [r for t in tables for r in t.column(ROW_COL).to_pylist()] == [0, 1, 2]
    rep = run_pipeline(tmp_path, "jsonl", "a.jsonl")
    assert rep.step("source").rows_in == 3 and rep.step("out").rows_out == 3 and rep.balanced


@pytest.mark.parametrize("value", [b"null", b"1", b'"x"', b"[1, 2]", b"true", b"  null  "])
def test_i8_05_jsonl_line_that_is_not_an_object_is_a_parse_error(
    tmp_path: Path, value: bytes
) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n' + value + b'\n{"a": 3}')
    tables, dead, _ = jsonl_run(p)
    assert [r for t in tables for r in strip_positions(t).to_pylist()] == [{"a": 1}, {"a": 3}]
    letters = dead.to_pylist()
    assert [(d["reason"], d["position"], d["line"]) for d in letters] == [("parse_error", 1, 2)]
    assert "must be an object" in letters[0]["message"]
    # the fast path itself refuses the block: pyarrow would take a null line as a row of nulls
    assert JsonlReader._fast(b'{"a": 1}\n' + value + b"\n", None) is None


def test_i8_05_slow_path_never_changes_a_value_to_fit_the_pinned_schema(tmp_path: Path) -> None:
    """A block parsed line by line builds its columns with the schema pinned from the first
    block only where every value fits exactly: 1.5 must not become 1, true must not become 1."""
    first = "".join(json.dumps({"n": i, "b": i, "s": "x"}) + "\n" for i in range(400))
    second = '{"n": 1.5, "b": true, "s": "y"}\nnot json\n'
    p = tmp_path / "a.jsonl"
    p.write_text(first + second)
    tables, dead, _ = jsonl_run(p, block_size=len(first))
    rows = [r for t in tables for r in strip_positions(t).to_pylist()]
    assert len(rows) == 401 and dead.column("position").to_pylist() == [401]
    assert rows[400] == {"n": 1.5, "b": True, "s": "y"}
    assert tables[-1].schema.field("s").type == pa.string()  # fits the pinned type: kept


def test_i8_10_jsonl_invalid_utf8_is_an_encoding_letter_and_never_reaches_a_sink(
    tmp_path: Path,
) -> None:
    lines = [json.dumps({"id": i, "s": f"v{i}"}).encode() for i in range(2000)]
    lines[700] = b'{"id": 700, "s": "bad \xff\xfe here"}'
    lines[1500] = b'{"id": 1500, "s": "\xed\xa0\x80"}'  # an encoded surrogate: not UTF-8
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    block = p.read_bytes()
    assert not scan_lines(block).safe and JsonlReader._fast(block, None) is None
    tables, dead, _ = jsonl_run(p)
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    assert ids == [i for i in range(2000) if i not in (700, 1500)]
    assert [(d["reason"], d["position"], d["line"]) for d in dead.to_pylist()] == [
        ("encoding", 700, 701),
        ("encoding", 1500, 1501),
    ]
    for t in tables:
        t.validate(full=True)  # every string is valid UTF-8
    rep = run_pipeline(tmp_path, "jsonl", "a.jsonl", sink="parquet")
    assert rep.balanced and rep.dead_letters_by_reason == {"encoding": 2}
    import duckdb

    out = str(tmp_path / "out.parquet")
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}')").fetchall()
    assert count == [(1998,)]


def test_i8_bom_truncated_jsonl_line_is_a_dead_letter_not_an_object(tmp_path: Path) -> None:
    """ "EF BB {}": two bytes of a byte-order mark before an object are not whitespace."""
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'\xef\xbb{}\n{"a": 1}\n')
    tables, dead, _ = jsonl_run(p)
    assert [r for t in tables for r in strip_positions(t).to_pylist()] == [{"a": 1}]
    assert [(d["reason"], d["position"], d["line"]) for d in dead.to_pylist()] == [
        ("encoding", 0, 1)
    ]
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')  # a whole BOM is removed by the byte layer
    tables, dead, _ = jsonl_run(p)
    assert dead.num_rows == 0 and sum(t.num_rows for t in tables) == 1


def test_i8_25_jsonl_positions_and_lines_never_shift(tmp_path: Path) -> None:
    """Blank lines are skipped (and counted), rejected lines keep their record index, an
    oversize line is a too_large letter in its place: every row's __sluice_row is its index."""
    lines: list[str] = []
    expect_rows: dict[int, int] = {}  # id -> record index
    expect_dead: list[tuple[str, int, int]] = []
    record = 0
    for i in range(3000):
        if i % 500 == 7:
            lines.append("   ")
            continue
        if i % 700 == 3:
            lines.append('{"id": broken')
            expect_dead.append(("parse_error", record, len(lines)))
        elif i % 900 == 5:
            lines.append(json.dumps({"id": i, "pad": "x" * 5000}))
            expect_dead.append(("too_large", record, len(lines)))
        else:
            lines.append(json.dumps({"id": i}))
            expect_rows[i] = record
        record += 1
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(lines) + "\n\n")
    reader = JsonlReader(
        JsonlSource(kind="jsonl", path=str(p), block_size=4096, max_record_bytes=4096)
    )
    tables, dead, skipped = totals(chunks(reader))
    got = {
        i: r
        for t in tables
        for i, r in zip(t.column("id").to_pylist(), t.column(ROW_COL).to_pylist(), strict=True)
    }
    assert got == expect_rows
    assert sorted((d["reason"], d["position"], d["line"]) for d in dead.to_pylist()) == sorted(
        expect_dead
    )
    assert set(dead.column("source").to_pylist()) == {str(p)}
    assert skipped == 7  # six blank lines and the empty line at the end
    assert len(got) + dead.num_rows + skipped == len(lines) + 1


def test_i8_12_json_file_holding_json_lines_says_to_use_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "data.json"
    p.write_text('{"a": 1}\n{"a": 2}\n')
    rows, dead = json_run(p)
    assert rows == []
    d = dead.to_pylist()
    assert [(x["reason"], x["position"], x["line"]) for x in d] == [("parse_error", 0, 2)]
    assert "use kind: jsonl" in d[0]["message"]
    p.write_text('{"a": 1} {"a": 2}')  # trailing content, but not JSON lines: no such hint
    assert "jsonl" not in json_run(p)[1].column("message")[0].as_py()


def test_i8_15_json_document_over_max_record_bytes_is_too_large(tmp_path: Path) -> None:
    doc = json.dumps([{"i": i, "pad": "x" * 100} for i in range(200)]).encode()
    p = tmp_path / "a.json.gz"
    p.write_bytes(gzip.compress(doc))  # the limit counts decompressed bytes
    rows, dead = json_run(p, max_record_bytes=len(doc) - 1)
    d = dead.to_pylist()
    assert rows == [] and [(x["reason"], x["position"], x["line"]) for x in d] == [
        ("too_large", 0, 1)
    ]
    assert f"max_record_bytes={len(doc) - 1}" in d[0]["message"]
    assert d[0]["payload"] == doc[:1024].decode()
    rows, dead = json_run(p, max_record_bytes=len(doc))
    assert len(rows) == 200 and dead.num_rows == 0
    assert JsonSource(kind="json", path="x").max_record_bytes == 1 << 30  # the old max_bytes


def test_i8_15_jsonl_huge_line_is_too_large_next_record_read_memory_bounded(
    tmp_path: Path,
) -> None:
    """A 150 MB line with max_record_bytes = 1 MiB: a too_large letter with its line, the next
    record is read, and the reader never holds the line (measured in a fresh process)."""
    p = tmp_path / "big.jsonl"
    with p.open("wb") as f:
        f.write(b'{"id": 0}\n{"id": 1, "blob": "')
        piece = b"y" * (1 << 20)
        for _ in range(150):
            f.write(piece)
        f.write(b'"}\n{"id": 2}\n')
    script = f"""
import json, resource
from sluice.config.models import JsonlSource
from sluice.connectors.files.json import JsonlReader
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reader = JsonlReader(JsonlSource(kind="jsonl", path={str(p)!r}, max_record_bytes=1 << 20))
rows, dead = [], []
for c in reader.read():
    if c.table is not None:
        rows += c.table.column("id").to_pylist()
    if c.dead is not None:
        dead += [(d["reason"], d["position"], d["line"]) for d in c.dead.to_pylist()]
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
print(json.dumps({{"rows": rows, "dead": dead, "grown_mb": grown}}))
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rows"] == [0, 2]
    assert result["dead"] == [["too_large", 1, 2]]
    assert result["grown_mb"] < 80, result  # the line is 150 MB; blocks are 8 MiB


def test_i8_15_jsonl_block_size_is_bounded() -> None:
    """Memory is about block_size + max_record_bytes: both have a checked range."""
    from sluice.errors import ConfigError

    with pytest.raises(ConfigError, match="block_size"):
        parse_pipeline(
            {"pipeline": "p", "source": {"kind": "jsonl", "path": "x", "block_size": 10**20}}
        )
