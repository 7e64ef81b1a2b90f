"""The CSV reader's parallel path (quote-free UTF-8 pieces) gives exactly what streaming gives.

``PARALLEL_PIECE`` is made tiny so that small generated files cross many pieces; each test
reads the same bytes once through the parallel path and once with it disabled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_csv_reader import Out, run

from sluice.connectors.files import csv as csv_module


def both(path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[Out, Out]:
    monkeypatch.setattr(csv_module, "PARALLEL_PIECE", 256)
    parallel = run(path, **kw)
    monkeypatch.setattr(csv_module, "PARALLEL_PIECE", 1 << 40)  # never parallel
    streaming = run(path, **kw)
    return parallel, streaming


def letters(out: Out) -> list[tuple[str, str]]:
    return sorted(
        zip(
            out.dead.column("reason").to_pylist(),
            out.dead.column("payload").to_pylist(),
            strict=True,
        )
    )


def same(a: Out, b: Out) -> None:
    assert a.rows == b.rows
    assert a.positions == b.positions
    assert letters(a) == letters(b)
    assert a.nbytes == b.nbytes


def test_quote_free_file_reads_the_same_in_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "a.csv"
    p.write_text("id,name,amount\n" + "".join(f"{i},n{i},{i * 1.5}\n" for i in range(500)))
    par, stream = both(p, monkeypatch)
    same(par, stream)
    assert len(par.tables) > 10  # really crossed many pieces
    assert [r["id"] for r in par.rows] == list(range(500))


def test_a_quote_later_in_the_file_switches_to_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [f"{i},n{i}\n" for i in range(300)]
    rows[200] = '200,"two\nlines, and a comma"\n'
    p = tmp_path / "q.csv"
    p.write_text("id,name\n" + "".join(rows))
    par, stream = both(p, monkeypatch)
    same(par, stream)
    assert par.rows[200]["name"] == "two\nlines, and a comma"
    assert len(par.rows) == 300


def test_type_change_in_a_later_piece_goes_to_safe_mode_without_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # types are inferred from the first piece / block, so the bad value must come after both
    rows = [f"{i},{i}\n" for i in range(3000)]
    rows[2900] = "2900,not-a-number\n"
    p = tmp_path / "t.csv"
    p.write_text("id,v\n" + "".join(rows))
    par, stream = both(p, monkeypatch, block_size=4096)
    same(par, stream)
    assert len(par.rows) == 2999
    assert letters(par) == [("cast_error", '{"id":"2900","v":"not-a-number"}')]


def test_wrong_field_counts_across_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [f"{i},{i}\n" for i in range(400)]
    for i in (10, 150, 390):
        rows[i] = f"{i},{i},extra\n"
    p = tmp_path / "c.csv"
    p.write_text("id,v\n" + "".join(rows))
    par, stream = both(p, monkeypatch)
    same(par, stream)
    assert [d for d, _ in letters(par)] == ["column_count"] * 3


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cells=st.lists(
        st.tuples(st.integers(-5, 10**6), st.text('abc xyz,"é', max_size=6), st.booleans()),
        min_size=1,
        max_size=120,
    ),
    crlf=st.booleans(),
)
def test_parallel_equals_streaming_for_any_content(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cells: list[tuple[int, str, bool]],
    crlf: bool,
) -> None:
    nl = "\r\n" if crlf else "\n"
    lines = []
    for n, text, quoted in cells:
        if quoted or any(ch in text for ch in ',"'):
            text = '"' + text.replace('"', '""') + '"'
        lines.append(f"{n},{text}{nl}")
    p = tmp_path / "h.csv"
    p.write_bytes(("n,t" + nl + "".join(lines)).encode())
    par, stream = both(p, monkeypatch, infer_types=False)
    same(par, stream)
    assert len(par.rows) == len(cells)
