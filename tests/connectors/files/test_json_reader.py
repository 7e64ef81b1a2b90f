"""JsonReader (whole documents, JSONTestSuite) and JsonlReader (lines, fallback per line)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sluice.batch import POSITION_COLS, ROW_COL
from sluice.config.models import JsonlSource, JsonSource
from sluice.connectors.files.json import JsonlReader, JsonReader
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
    p.write_text('[{"a": 1}]')
    _, dead = json_run(p, max_bytes=4)
    assert dead.column("reason").to_pylist() == ["corrupt_file"]
    assert "max_bytes" in dead.column("message")[0].as_py()


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
