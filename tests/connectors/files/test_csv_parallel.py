"""A CSV file gives the same rows, positions and dead letters however it is cut into blocks.

The reader used to switch between a parallel path (quote-free pieces), pyarrow's streaming
reader and a safe mode; these tests compared those paths. There is now one path: blocks of whole
records cut by the scanner, each parsed by pyarrow on all cores. What must hold is that the cut
does not change the answer: each test reads the same bytes with tiny blocks (a few records each,
set below the configuration minimum on purpose) and with one block for the whole file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_csv_reader import Out

from sluice.config.models import CsvSource
from sluice.connectors.files.csv import CsvReader
from sluice.testing import drain


def run_cut(path: Path, block_size: int, **kw: Any) -> Out:
    cfg = CsvSource(kind="csv", path=str(path), **kw).model_copy(update={"block_size": block_size})
    return Out(*drain(CsvReader(cfg), Path("/")))


def both(path: Path, **kw: Any) -> tuple[Out, Out]:
    return run_cut(path, 64, **kw), run_cut(path, 1 << 24, **kw)


def letters(out: Out) -> list[tuple[str, str, int, int]]:
    return list(
        zip(
            out.dead.column("reason").to_pylist(),
            out.dead.column("payload").to_pylist(),
            out.dead.column("position").to_pylist(),
            out.dead.column("line").to_pylist(),
            strict=True,
        )
    )


def same(a: Out, b: Out) -> None:
    assert a.rows == b.rows
    assert a.positions == b.positions
    assert letters(a) == letters(b)
    assert a.nbytes == b.nbytes


def test_quote_free_file_reads_the_same_in_small_blocks(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("id,name,amount\n" + "".join(f"{i},n{i},{i * 1.5}\n" for i in range(500)))
    small, whole = both(p)
    same(small, whole)
    assert len(small.tables) > 10  # really crossed many blocks
    assert [r["id"] for r in small.rows] == list(range(500))


def test_a_quoted_multiline_field_later_in_the_file(tmp_path: Path) -> None:
    rows = [f"{i},n{i}\n" for i in range(300)]
    rows[200] = '200,"two\nlines, and a comma"\n'
    p = tmp_path / "q.csv"
    p.write_text("id,name\n" + "".join(rows))
    small, whole = both(p)
    same(small, whole)
    assert small.rows[200]["name"] == "two\nlines, and a comma"
    assert len(small.rows) == 300


def test_type_change_in_a_later_block_without_loss(tmp_path: Path) -> None:
    rows = [f"{i},{i}\n" for i in range(3000)]
    rows[2900] = "2900,not-a-number\n"
    p = tmp_path / "t.csv"
    p.write_text("id,v\n" + "".join(rows))
    small, whole = both(p, schema={"v": "int64"})
    same(small, whole)
    assert len(small.rows) == 2999
    assert letters(small) == [("cast_error", '{"id":"2900","v":"not-a-number"}', 2900, 2902)]


def test_wrong_field_counts_across_blocks(tmp_path: Path) -> None:
    rows = [f"{i},{i}\n" for i in range(400)]
    for i in (10, 150, 390):
        rows[i] = f"{i},{i},extra\n"
    p = tmp_path / "c.csv"
    p.write_text("id,v\n" + "".join(rows))
    small, whole = both(p)
    same(small, whole)
    assert [(r, pos, line) for r, _, pos, line in letters(small)] == [
        ("column_count", 10, 12),
        ("column_count", 150, 152),
        ("column_count", 390, 392),
    ]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cells=st.lists(
        st.tuples(st.integers(-5, 10**6), st.text('abc xyz,"é\n', max_size=6), st.booleans()),
        min_size=1,
        max_size=120,
    ),
    crlf=st.booleans(),
    block=st.integers(1, 300),
    infer=st.booleans(),
)
def test_any_cut_gives_the_same_answer(
    tmp_path: Path, cells: list[tuple[int, str, bool]], crlf: bool, block: int, infer: bool
) -> None:
    nl = "\r\n" if crlf else "\n"
    lines = []
    for n, text, quoted in cells:
        if quoted or any(ch in text for ch in ',"\n'):
            text = '"' + text.replace('"', '""') + '"'
        lines.append(f"{n},{text}{nl}")
    p = tmp_path / "h.csv"
    p.write_bytes(("n,t" + nl + "".join(lines)).encode())
    small = run_cut(p, block, infer_types=infer)
    whole = run_cut(p, 1 << 24, infer_types=infer)
    same(small, whole)
    assert len(small.rows) == len(cells)
