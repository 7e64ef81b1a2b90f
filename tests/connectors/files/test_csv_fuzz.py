"""Hostile input through the CSV reader: every file of ../shared/data read as CSV, and generated
files of random bytes with random options. Nothing crashes or hangs, and every record of a file is
accounted for exactly once: a row or a dead letter at its own position (0..n-1), the rest counted
as skipped lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_csv_scan import reference

from sluice.batch import ROW_COL
from sluice.config.models import CsvSource
from sluice.connectors.files._csv_scan import BLANK, COMMENT, Dialect
from sluice.connectors.files.csv import CsvReader
from sluice.plugins import RunContext


def read_all(path: Path, **kw: Any) -> tuple[list[int], list[int | None], list[str], int, int]:
    """(row positions, letter positions, letter reasons, skipped, bytes) of one file."""
    block = kw.pop("block_size", None)
    cfg = CsvSource(kind="csv", path=str(path), **kw)
    if block is not None:
        cfg = cfg.model_copy(update={"block_size": block})
    reader = CsvReader(cfg)
    reader.open(RunContext("p", "r", Path("/")))
    rows: list[int] = []
    pos: list[int | None] = []
    reasons: list[str] = []
    skipped = nbytes = 0
    try:
        for chunk in reader.read():
            if chunk.table is not None:
                rows += chunk.table.column(ROW_COL).to_pylist()
            if chunk.dead is not None:
                pos += chunk.dead.column("position").to_pylist()
                reasons += chunk.dead.column("reason").to_pylist()
            skipped += chunk.skipped
            nbytes += chunk.bytes_read
    finally:
        reader.close()
    return rows, pos, reasons, skipped, nbytes


def accounted(rows: list[int], pos: list[int | None]) -> int:
    """The number of records; each position once, 0..n-1."""
    seen = sorted(rows + [p for p in pos if p is not None])
    assert seen == list(range(len(seen)))
    return len(seen)


SHARED = sorted(
    p
    for p in (Path(__file__).resolve().parents[3] / "../shared/data").resolve().rglob("*")
    if p.is_file()
)


@pytest.mark.parametrize("path", SHARED, ids=lambda p: str(p).split("/data/")[-1])
def test_every_shared_file_read_as_csv(path: Path) -> None:
    rows, pos, reasons, _, nbytes = read_all(path, max_record_bytes=1 << 16)
    accounted(rows, pos)
    assert nbytes == path.stat().st_size
    assert "corrupt_file" not in reasons or path.suffix in (".gz", ".zst", ".bz2")


SPECIAL = [b'"', b",", b";", b"\n", b"\r\n", b"\r", b"\\", b"#", b" ", b"a", b"1", b"\xff", b"\xc3"]
BYTES = st.lists(st.one_of(st.sampled_from(SPECIAL), st.binary(max_size=3)), max_size=200).map(
    b"".join
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    head=st.sampled_from([b"", b"a,b\n", b"a;b;c\n"]),
    data=BYTES,
    opts=st.fixed_dictionaries(
        {},
        optional={
            "delimiter": st.sampled_from([",", ";"]),
            "quote": st.sampled_from(['"', None]),
            "escape": st.sampled_from(["\\", None]),
            "comment": st.sampled_from(["#", None]),
            "strict_quotes": st.booleans(),
            "trim_spaces": st.booleans(),
            "infer_types": st.booleans(),
            "header": st.booleans(),
            "schema": st.sampled_from([{"a": "int"}, {"f0": "bool"}, {"x": "date"}]),
            "max_record_bytes": st.sampled_from([1024, 1 << 20]),
            "block_size": st.integers(1, 300),
        },
    ),
)
def test_hostile_bytes_are_accounted_for(
    tmp_path_factory: pytest.TempPathFactory, head: bytes, data: bytes, opts: dict[str, Any]
) -> None:
    data = head + data
    p = tmp_path_factory.mktemp("f") / "x.csv"
    p.write_bytes(data)
    rows, pos, _, skipped, nbytes = read_all(p, **opts)
    n = accounted(rows, pos)
    assert nbytes == len(data)
    if any(p_ is None for p_ in pos):  # a problem of the whole file (header, columns)
        return
    d = Dialect(
        delimiter=ord(opts.get("delimiter", ",")),
        quote=None if opts.get("quote", '"') is None else ord(opts.get("quote", '"')),
        escape=None if opts.get("escape") is None else ord(opts["escape"]),
        comment=None if opts.get("comment") is None else ord(opts["comment"]),
    )
    if data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        return  # a UTF-16/32 byte-order mark: the byte layer transcodes, the reference cannot
    recs, _ = reference(data.removeprefix(b"\xef\xbb\xbf"), d, True)
    records = [r for r in recs if r[3] not in (BLANK, COMMENT)]
    header = 1 if opts.get("header", True) and records else 0
    assert n == len(records) - header
    assert skipped == len(recs) - len(records)
