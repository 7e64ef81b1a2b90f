"""Issue 8, CSV reader: every record gets its own verdict, a true position and line, and nothing
a file holds crashes the reader or disappears without a count."""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import json
import lzma
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_csv_reader import Out, run

import sluice
from sluice.config.loader import parse_pipeline
from sluice.config.models import CsvSource
from sluice.connectors.files._bytes import InputError
from sluice.connectors.files.csv import CsvReader
from sluice.errors import ConfigErrors
from sluice.plugins import Chunk, RunContext

SRC = Path(sluice.__file__).resolve().parents[1]  # the sluice under test, for child processes


def chunks(path: Path, **kw: Any) -> list[Chunk]:
    reader = CsvReader(CsvSource(kind="csv", path=str(path), **kw))
    reader.open(RunContext("p", "r", Path("/")))
    try:
        return list(reader.read())
    finally:
        reader.close()


def skipped(path: Path, **kw: Any) -> int:
    return sum(c.skipped for c in chunks(path, **kw))


def letters(out: Out) -> list[tuple[str, int | None, int | None]]:
    d = out.dead
    return list(
        zip(
            d.column("reason").to_pylist(),
            d.column("position").to_pylist(),
            d.column("line").to_pylist(),
            strict=True,
        )
    )


def run_cli(tmp_path: Path, source: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``sluice run`` in a child process with warnings as errors; stderr is captured."""
    pipeline = {
        "pipeline": "t",
        "source": source,
        "sinks": [{"id": "out", "kind": "jsonl", "path": "out.jsonl"}],
        "dead_letter": {"kind": "jsonl", "path": "dl"},
        "settings": {"report_dir": "runs"},
    }
    (tmp_path / "p.yaml").write_text(json.dumps(pipeline))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "sluice.cli", "run", "p.yaml", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def dead_letter_files(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        json.loads(x) for f in (tmp_path / "dl").glob("*.jsonl") for x in f.read_text().splitlines()
    ]


# ------------------------------------------------------------------------------------ item 4


def test_i8_04_a_rows_fate_does_not_depend_on_other_rows(tmp_path: Path) -> None:
    schema = {"d": "date", "n": "int"}
    both = tmp_path / "both.csv"
    both.write_text("d,n\n 2023-01-01, 2\n2023-01-05,x\n")
    alone = tmp_path / "alone.csv"
    alone.write_text("d,n\n 2023-01-01, 2\n")
    first = {"d": dt.date(2023, 1, 1), "n": 2}
    assert run(alone, schema=schema).rows == [first]
    out = run(both, schema=schema)
    assert out.rows == [first]  # the bad row does not take the good one with it
    assert letters(out) == [("cast_error", 1, 3)]


def test_i8_04_inferred_types_never_reject_a_row(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("n,s\n" + "".join(f"{i},v{i}\n" for i in range(3000)) + "oops,bad\n3001,ok\n")
    for block in (4096, 1 << 20):
        out = run(p, block_size=block)
        assert out.dead.num_rows == 0
        assert [r["n"] for r in out.rows] == [str(i) for i in range(3000)] + ["oops", "3001"]
    q = tmp_path / "b.csv"  # the same column without the odd value: integers
    q.write_text("n,s\n" + "".join(f"{i},v{i}\n" for i in range(3000)))
    assert run(q, block_size=4096).tables[0].schema.field("n").type == pa.int64()


POOL = [
    "1",
    " 2",
    "x",
    "2023-01-05",
    "",
    '"q"',
    '"a\nb"',
    'a"b',
    "1.5",
    "1,2",
    "true",
    '"unterminated',
]


def verdicts(out: Out, typed: bool) -> dict[str, Any]:
    """id → ("row", value) or ("dead", reason)."""
    got: dict[str, Any] = {}
    for r in out.rows:
        got[str(r["id"])] = ("row", r["v"] if typed else None)
    for reason, payload in zip(
        out.dead.column("reason").to_pylist(), out.dead.column("payload").to_pylist(), strict=True
    ):
        key = json.loads(payload)["id"] if payload.startswith("{") else payload.split(",")[0]
        got[key] = ("dead", reason)
    return got


ROWS = st.lists(
    st.tuples(st.sampled_from(range(len(POOL))), st.sampled_from([b"", b"\xff", b"\xc3\xa9"])),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mine=ROWS,
    others=ROWS,
    seed=st.randoms(use_true_random=False),
    schema=st.sampled_from([None, {"v": "int"}, {"v": "date"}, {"v": "double"}, {"v": "bool"}]),
    block=st.sampled_from([64, 1 << 20]),
)
def test_i8_04_a_rows_verdict_is_the_same_whatever_else_is_in_the_file(
    tmp_path_factory: pytest.TempPathFactory,
    mine: list[tuple[int, bytes]],
    others: list[tuple[int, bytes]],
    seed: Any,
    schema: dict[str, str] | None,
    block: int,
) -> None:
    """Rows ``r0..`` read alone, then mixed at random with other rows ``o0..``: each ``r`` row
    gets the same verdict (and, with a declared type, the same value). The last line of a file
    is what an unterminated quote swallows, so the mixed file keeps the same last row."""
    d = tmp_path_factory.mktemp("v")

    def line(tag: str, i: int, k: int, extra: bytes) -> bytes:
        return f"{tag}{i},".encode() + POOL[k].encode() + extra + b"\n"

    # an unterminated quote swallows the rest of the file: only as the last row
    mine = [m for m in mine[:-1] if '"u' not in POOL[m[0]]] + mine[-1:]
    own = [line("r", i, k, e) for i, (k, e) in enumerate(mine)]
    other = [line("o", i, k, e) for i, (k, e) in enumerate(others) if '"u' not in POOL[k]]
    mixed = own[:-1] + other
    seed.shuffle(mixed)
    mixed.append(own[-1])
    kw: dict[str, Any] = {"schema": schema} if schema else {}
    for name, lines in (("alone.csv", own), ("mixed.csv", mixed)):
        (d / name).write_bytes(b"id,v\n" + b"".join(lines))
    cfg = {**kw, "block_size": block}
    alone = verdicts(_read(d / "alone.csv", cfg), bool(schema))
    mixed_v = verdicts(_read(d / "mixed.csv", cfg), bool(schema))
    for key, verdict in alone.items():
        assert mixed_v[key] == verdict, (key, verdict, mixed_v[key])


def _read(path: Path, options: dict[str, Any]) -> Out:
    kw = dict(options)
    block = kw.pop("block_size")
    cfg = CsvSource(kind="csv", path=str(path), **kw).model_copy(update={"block_size": block})
    from sluice.testing import drain

    return Out(*drain(CsvReader(cfg), Path("/")))


# ------------------------------------------------------------------------------------ item 7


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_i8_07_read_error_is_file_unreadable_and_empty_file_is_empty(tmp_path: Path) -> None:
    # /proc/self/mem is a regular file whose read fails with EIO: a real I/O error
    out = run("/proc/self/mem")
    assert out.rows == []
    assert out.dead.column("reason").to_pylist() == ["file_unreadable"]
    empty = tmp_path / "e.csv"
    empty.write_bytes(b"")
    out = run(empty)
    assert out.rows == [] and out.dead.num_rows == 0
    assert skipped(empty) == 0


# ------------------------------------------------------------------------------------ item 8


def test_i8_08_unterminated_quote_at_the_end_is_a_truncated_letter(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text('a,b\n1,x\n2,"trunc')
    out = run(p)
    assert out.rows == [{"a": 1, "b": "x"}]
    assert letters(out) == [("truncated", 1, 3)]
    assert out.dead.column("payload").to_pylist() == ['2,"trunc']


def test_i8_08_blank_lines_are_counted_in_the_report(tmp_path: Path) -> None:
    p = tmp_path / "b.csv"
    p.write_text("a,b\n1,2\n\n3,4\r\n\r\n\n5,6\n\n")
    out = run(p)
    assert [r["a"] for r in out.rows] == [1, 3, 5]
    assert [pos for _, pos in out.positions] == [0, 1, 2]
    assert skipped(p) == 4
    one = tmp_path / "one.csv"  # one column: an empty line is still a blank line, not a row
    one.write_text("a\n1\n\n2\n")
    assert [r["a"] for r in run(one).rows] == [1, 2] and skipped(one) == 1
    pipe = sluice.Pipeline("blank")
    pipe.read(sluice.csv(str(p))).write("out", sluice.jsonl(str(tmp_path / "o.jsonl")))
    report = pipe.run(base_dir=tmp_path, progress=False)
    src = report.steps[0]
    assert (src.rows_in, src.rows_out, src.skipped) == (7, 3, 4)
    assert report.balanced


# ------------------------------------------------------------------------------------ item 9


def test_i8_09_bad_rows_are_each_their_own_letter_and_no_noise(tmp_path: Path) -> None:
    p = tmp_path / "in.csv"
    p.write_bytes(b"a,b\n1,2\n\xff\xfe,2,3\n4,5\n\xff,6\n7,8\n")
    out = run(p)
    assert out.rows == [{"a": 1, "b": 2}, {"a": 4, "b": 5}, {"a": 7, "b": 8}]
    assert letters(out) == [("column_count", 1, 3), ("encoding", 3, 5)]
    result = run_cli(tmp_path, {"kind": "csv", "path": "in.csv"})
    assert result.returncode == 0, result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    assert sorted(d["reason"] for d in dead_letter_files(tmp_path)) == ["column_count", "encoding"]


# ----------------------------------------------------------------------------------- item 13


def test_i8_13_invalid_utf8_in_the_header_is_one_encoding_letter(tmp_path: Path) -> None:
    p = tmp_path / "in.csv"
    p.write_bytes(b"a\x80,b\n1,2\n")
    out = run(p)
    assert out.rows == []
    assert letters(out) == [("encoding", None, 1)]
    assert "encoding" in out.dead.column("message")[0].as_py()
    result = run_cli(tmp_path, {"kind": "csv", "path": "in.csv"})
    assert result.returncode == 0, result.stderr
    assert "unexpected error" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_i8_13_utf16_with_and_without_byte_order_mark(tmp_path: Path) -> None:
    text = "name,n\r\nJosé,1\r\n日本,2\r\n"
    with_bom = tmp_path / "bom.csv"
    with_bom.write_bytes(text.encode("utf-16"))
    assert run(with_bom).rows == [{"name": "José", "n": 1}, {"name": "日本", "n": 2}]
    no_bom = tmp_path / "nobom.csv"
    no_bom.write_bytes(text.encode("utf-16-le"))
    out = run(no_bom)
    assert out.rows == [] and letters(out) == [("encoding", None, 1)]
    assert "utf-16" in out.dead.column("message")[0].as_py()
    assert run(no_bom, encoding="utf-16-le").rows == [
        {"name": "José", "n": 1},
        {"name": "日本", "n": 2},
    ]


# ----------------------------------------------------------------------------------- item 14

ROWS_5000 = b"".join(b"%d,v%d\n" % (i, i) for i in range(5000))
BODY = b"id,v\n" + ROWS_5000


@pytest.mark.parametrize(
    ("ext", "compress"),
    [
        (".gz", gzip.compress),
        (".bz2", bz2.compress),
        (".xz", lzma.compress),
        (".zst", lambda b: _zstd(b)),
    ],
)
def test_i8_14_compressed_files_are_read(tmp_path: Path, ext: str, compress: Any) -> None:
    p = tmp_path / f"in.csv{ext}"
    p.write_bytes(compress(BODY))
    out = run(p, block_size=4096)
    assert [r["id"] for r in out.rows] == list(range(5000))
    assert out.dead.num_rows == 0
    assert out.nbytes == p.stat().st_size


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return bytes(sink.getvalue())


def test_i8_14_truncated_gzip_keeps_the_rows_before_the_damage(tmp_path: Path) -> None:
    data = gzip.compress(BODY + ROWS_5000 * 39)
    p = tmp_path / "cut.csv.gz"
    p.write_bytes(data[: len(data) // 2])
    out = run(p, block_size=4096)
    assert 1000 < len(out.rows) < 5000 * 40
    ids = [r["id"] for r in out.rows]
    assert ids == [i % 5000 for i in range(len(ids))]
    assert out.dead.column("reason").to_pylist() == ["corrupt_file"]


def test_i8_14_gzip_bomb_is_a_too_large_letter_with_memory_bounded(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.csv.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(b"a,b\n")
        row = b"1,2\n" * (1 << 18)
        for _ in range(512):  # 512 MiB of rows in ~0.5 MiB
            fh.write(row)
    script = textwrap.dedent(
        f"""
        import resource, json
        from pathlib import Path
        from sluice.config.models import CsvSource
        from sluice.connectors.files.csv import CsvReader
        from sluice.testing import drain
        from sluice.plugins import RunContext
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = CsvReader(CsvSource(kind="csv", path={str(bomb)!r}, max_compression_ratio=100))
        r.open(RunContext("p", "r", Path("/")))
        rows, reasons = 0, []
        for c in r.read():
            rows += c.table.num_rows if c.table is not None else 0
            reasons += c.dead.column("reason").to_pylist() if c.dead is not None else []
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(json.dumps({{"rows": rows, "reasons": reasons, "grew": grew}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["reasons"] == ["too_large"]
    assert 0 < got["rows"] < 64 << 20  # rows before the limit are kept
    assert got["grew"] < 200 * 1024  # KiB: far below the 512 MiB the bomb expands to


# ----------------------------------------------------------------------------------- item 15


def test_i8_15_a_record_over_max_record_bytes_is_skipped_and_the_next_is_read(
    tmp_path: Path,
) -> None:
    p = tmp_path / "long.csv"
    huge = b"2," + b"x" * 300_000 + b"\n"
    quoted = b'3,"' + b"y\n" * 200_000 + b'"\n'
    p.write_bytes(b"a,b\n1,ok\n" + huge + quoted + b"4,fine\n")
    for block in (4096, 1 << 20):
        out = run(p, max_record_bytes=100_000, block_size=block)
        assert out.rows == [{"a": 1, "b": "ok"}, {"a": 4, "b": "fine"}]
        assert letters(out) == [("too_large", 1, 3), ("too_large", 2, 4)]
        assert [pos for _, pos in out.positions] == [0, 3]
        assert out.dead.column("payload")[0].as_py().startswith("2,xxx")


def test_i8_15_a_huge_one_line_record_keeps_memory_bounded(tmp_path: Path) -> None:
    p = tmp_path / "huge.csv"
    with p.open("wb") as fh:
        fh.write(b"a,b\n1,")
        chunk = b"z" * (1 << 20)
        for _ in range(256):  # a 256 MiB record
            fh.write(chunk)
        fh.write(b"\n2,after\n")
    script = textwrap.dedent(
        f"""
        import resource, json
        from pathlib import Path
        from sluice.config.models import CsvSource
        from sluice.connectors.files.csv import CsvReader
        from sluice.testing import drain
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = CsvReader(CsvSource(kind="csv", path={str(p)!r}, max_record_bytes=1 << 20))
        tables, dead, _ = drain(r, Path("/"))
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(json.dumps({{"rows": [x for t in tables for x in t.column("b").to_pylist()],
                           "letters": dead.select(["reason", "position", "line"]).to_pylist(),
                           "grew": grew}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["rows"] == ["after"]
    assert got["letters"] == [{"reason": "too_large", "position": 0, "line": 2}]
    assert got["grew"] < 100 * 1024  # KiB, for a 256 MiB record


# ----------------------------------------------------------------------------------- item 23


def _config_error(**source: Any) -> Any:
    with pytest.raises(ConfigErrors) as err:
        parse_pipeline({"pipeline": "p", "source": {"kind": "csv", "path": "x.csv", **source}})
    assert len(err.value.errors) == 1
    return err.value.errors[0]


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"delimiter": "→"}, "delimiter", "ASCII"),
        ({"delimiter": "||"}, "delimiter", "one ASCII character"),
        ({"delimiter": "\\t"}, "delimiter", "tab"),
        ({"delimiter": '"'}, "quote", "also the delimiter"),
        ({"quote": "«"}, "quote", "ASCII"),
        ({"escape": ","}, "escape", "also the delimiter"),
        ({"comment": ","}, "comment", "also the delimiter"),
        ({"column_names": ["a", "b"]}, "column_names", "header"),
        ({"header": False, "column_names": ["a", "a"]}, "column_names", "twice"),
        (
            {"header": False, "column_names": ["barks"], "schema": {" barks": "int"}},
            "column_names",
            "did you mean 'barks'",
        ),
        ({"encoding": "utf-99"}, "encoding", "unknown"),
        ({"encoding": "base64"}, "encoding", "unknown"),
        ({"max_line_bytes": 10}, None, "max_record_bytes"),
        ({"block_size": 10**20}, "block_size", "less than"),
    ],
)
def test_i8_23_csv_options_are_refused_at_config_time(
    options: dict[str, Any], field: str | None, words: str
) -> None:
    err = _config_error(**options)
    assert err.field == field
    assert words in str(err)
    assert err.fix or err.field in ("block_size",)


def test_i8_23_escape_equal_to_quote_means_quote_doubling(tmp_path: Path) -> None:
    p = tmp_path / "q.csv"
    p.write_text('a,b\n"say ""hi""",1\n2,3\n')
    out = run(p, escape='"')
    assert out.rows == [{"a": 'say "hi"', "b": 1}, {"a": "2", "b": 3}]
    assert out.dead.num_rows == 0


def test_i8_23_a_declared_column_missing_from_the_file(tmp_path: Path) -> None:
    p = tmp_path / "dogs.csv"
    p.write_text("name, barks\nrex,3\n")
    out = run(p, schema={"barks": "int"})
    assert out.rows == []
    assert letters(out) == [("missing_column", None, 1)]
    message = out.dead.column("message")[0].as_py()
    assert "did you mean ' barks'" in message
    reader = CsvReader(CsvSource(kind="csv", path=str(p), schema={"barks": "int"}))
    names = reader.columns(p)
    assert names == ["name", " barks"]
    assert "did you mean ' barks'" in reader.schema_problems(names)[0]
    late = tmp_path / "late.csv"  # the letter names the header's line
    late.write_text("# exported\n\nname, barks\nrex,3\n")
    assert letters(run(late, schema={"barks": "int"}, comment="#")) == [("missing_column", None, 3)]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"a\x80\n1\n")
    with pytest.raises(InputError) as err:
        reader.columns(bad)
    assert err.value.reason == "encoding"


# ----------------------------------------------------------------------------------- item 25


def test_i8_25_positions_and_lines_are_true(tmp_path: Path) -> None:
    p = tmp_path / "ids.csv"
    rows = ["id,note"]
    for i in range(12):
        if i in (2, 5):
            rows.append(f"{i},bad,extra")
        elif i == 7:
            rows.append(f'{i},"two\nlines"')
        elif i == 9:
            rows.append(f"{i},oops")
        else:
            rows.append(f"{i},n{i}")
    p.write_text("\n".join(rows) + "\n")
    out = run(p, schema={"id": "int", "note": "string"}, block_size=4096)
    assert [(r["id"], pos) for r, (_, pos) in zip(out.rows, out.positions, strict=True)] == [
        (i, i) for i in range(12) if i not in (2, 5)
    ]
    assert letters(out) == [("column_count", 2, 4), ("column_count", 5, 7)]
    bad = tmp_path / "late.csv"
    bad.write_text(p.read_text().replace("9,oops", "nine,oops"))
    out = run(bad, schema={"id": "int"})
    # the record after the two-line record starts two lines further down
    assert letters(out)[-1] == ("cast_error", 9, 12)


# ----------------------------------------------------------------------------------- item 27


def test_i8_27_comment_and_skip_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text('exported by X\nversion 2 "beta\n# a comment\na,b\n1,2\n# he said "hi\n3,4\n')
    out = run(p, skip_rows=2, comment="#")
    assert out.rows == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert [pos for _, pos in out.positions] == [0, 1]
    assert skipped(p, skip_rows=2, comment="#") == 4


def test_i8_27_null_values_and_trim_spaces(tmp_path: Path) -> None:
    p = tmp_path / "n.csv"
    p.write_text('a,b,c\nNA, x ,1\n"",  ,  true\n')
    out = run(p, null_values=["NA", ""], schema={"c": "bool"})
    assert out.rows == [{"a": None, "b": " x ", "c": True}]  # bool: no trimming
    assert letters(out) == [("cast_error", 1, 3)]
    out = run(p, null_values=["NA", ""], schema={"c": "bool"}, trim_spaces=True)
    assert out.rows == [
        {"a": None, "b": "x", "c": True},
        {"a": None, "b": None, "c": True},
    ]


def test_i8_27_strict_quotes(tmp_path: Path) -> None:
    p = tmp_path / "s.csv"
    p.write_text('a,b\n1,12" pipe\n"x"y,2\n3,"ok"\n')
    out = run(p)
    assert out.rows == [{"a": 3, "b": "ok"}]
    assert letters(out) == [("unquoted_value", 0, 2), ("unquoted_value", 1, 3)]
    out = run(p, strict_quotes=False)
    assert out.rows == [
        {"a": "1", "b": '12" pipe'},
        {"a": "xy", "b": "2"},
        {"a": "3", "b": "ok"},
    ]
    plain = pacsv.read_csv(pa.py_buffer(p.read_bytes())).to_pylist()
    assert [str(r["a"]) for r in plain] == [r["a"] for r in out.rows]  # pyarrow's own reading


def test_i8_25_replay_of_csv_letters_from_a_compressed_file_with_a_preamble(
    tmp_path: Path,
) -> None:
    """A source letter's payload is the record's text; replay writes it under the original
    header, which it reads like the source does (decompressed, after the skipped lines)."""
    from sluice.runtime.executor import Executor
    from sluice.runtime.replay import replay

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv.gz").write_bytes(
        gzip.compress(b"exported 2024\nid,v\n1,2\n2,x,9\n3,4\n")
    )
    raw = {
        "pipeline": "r",
        "source": {"kind": "csv", "path": "in/*.csv.gz", "skip_rows": 1, "schema": {"v": "int"}},
        "sinks": [{"id": "out", "kind": "jsonl", "path": "out"}],
        "dead_letter": {"kind": "jsonl", "path": "dl"},
    }
    rep = Executor(parse_pipeline(raw), base_dir=tmp_path, progress=False).run()
    assert rep.dead_letters_by_reason == {"column_count": 1}
    [letter] = dead_letter_files(tmp_path)
    assert (letter["payload"], letter["position"], letter["line"]) == ("2,x,9", 1, 4)
    reports = replay(parse_pipeline(raw), tmp_path / "dl", base_dir=tmp_path)
    assert [(r.rows_read, r.dead_letters) for r in reports] == [(0, 1)]  # fails again, alone
    again = [
        json.loads(x)
        for f in (tmp_path / "dl").glob("replay-*/*.jsonl")
        for x in f.read_text().splitlines()
    ]
    assert [(d["reason"], d["payload"]) for d in again] == [("column_count", "2,x,9")]
