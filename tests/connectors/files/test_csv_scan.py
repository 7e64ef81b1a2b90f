"""The vectorized CSV record scanner agrees with a byte-by-byte reference machine and with
pyarrow's parser, on any input (hypothesis), cut anywhere."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.connectors.files._csv_scan import (
    BLANK,
    COMMENT,
    DATA,
    FIELD,
    FIELD_START,
    QUOTED,
    RECORD_START,
    STRAY,
    TRUNCATED,
    Dialect,
    Text,
    field_counts,
    line_breaks,
    scan,
)

LF, CR = 10, 13


def reference(data: bytes, d: Dialect, final: bool) -> tuple[list[tuple[int, int, int, int]], int]:
    """Records as (start, content end, next, kind), and the tail: a plain state machine."""
    n = len(data)
    out: list[tuple[int, int, int, int]] = []
    i = 0
    while i < n:
        start = i
        st = RECORD_START
        stray = False
        comment = d.comment is not None and data[i] == d.comment
        j = i
        end = None
        while j < n:
            c = data[j]
            if d.escape is not None and c == d.escape:
                if j + 1 >= n:
                    j = n
                    break
                j += 2
                if st != QUOTED:
                    st = FIELD
                continue
            if st == QUOTED and not comment:
                if c == d.quote:
                    if j + 1 < n and data[j + 1] == d.quote:
                        j += 2
                        continue
                    if j + 1 == n and not final:
                        return out, start
                    st = FIELD
                    if j + 1 < n and data[j + 1] not in (d.delimiter, LF, CR):
                        stray = True
                j += 1
                continue
            if c == LF:
                end = j
                break
            if c == CR:
                if j + 1 < n and data[j + 1] == LF:
                    j += 1
                    continue
                if j + 1 == n and not final:
                    return out, start
                end = j
                break
            if comment:
                j += 1
                continue
            if c == d.delimiter:
                st = FIELD_START
            elif d.quote is not None and c == d.quote:
                if st in (RECORD_START, FIELD_START):
                    st = QUOTED
                else:
                    stray = True
                    st = FIELD
            else:
                st = FIELD
            j += 1
        if end is None:
            if not final:
                return out, start
            content = n
            kind = TRUNCATED if st == QUOTED and not comment else None
            nxt = n
        else:
            content = end
            if data[end] == LF and end > start and data[end - 1] == CR:
                escaped = False
                k = end - 2
                while d.escape is not None and k >= start and data[k] == d.escape:
                    escaped = not escaped
                    k -= 1
                if not escaped:
                    content = end - 1
            kind = None
            nxt = end + 1
        if kind is None:
            if comment:
                kind = COMMENT
            elif content == start:
                kind = BLANK
            elif stray:
                kind = STRAY
            else:
                kind = DATA
        out.append((start, content, nxt, kind))
        i = nxt
    return out, n


def scanned(data: bytes, d: Dialect, final: bool) -> tuple[list[tuple[int, int, int, int]], int]:
    sc = scan(data, d, final=final)
    recs = list(
        zip(sc.starts.tolist(), sc.ends.tolist(), sc.nexts.tolist(), sc.kinds.tolist(), strict=True)
    )
    return recs, sc.tail


DIALECTS = st.sampled_from(
    [
        Dialect(),
        Dialect(escape=ord("\\")),
        Dialect(comment=ord("#")),
        Dialect(delimiter=ord(";"), escape=ord("\\"), comment=ord("#")),
        Dialect(quote=None),
    ]
)
CHUNKS = st.lists(
    st.sampled_from(['"', '""', ",", ";", "\n", "\r\n", "\r", "a", "bc", " ", "\\", "#", "é", "x"]),
    max_size=60,
).map(lambda parts: "".join(parts).encode())


@settings(max_examples=3000, deadline=None)
@given(data=CHUNKS, d=DIALECTS, final=st.booleans())
def test_scan_matches_the_reference_machine(data: bytes, d: Dialect, final: bool) -> None:
    assert scanned(data, d, final) == reference(data, d, final)


@settings(max_examples=500, deadline=None)
@given(data=CHUNKS, d=DIALECTS, cut=st.integers(0, 60))
def test_scanning_a_prefix_then_the_rest_gives_the_same_records(
    data: bytes, d: Dialect, cut: int
) -> None:
    whole, _ = scanned(data, d, True)
    cut = min(cut, len(data))
    first, tail = scanned(data[:cut], d, False)
    rest, _ = scanned(data[tail:], d, True)
    assert first + [(s + tail, e + tail, x + tail, k) for s, e, x, k in rest] == whole


def _pyarrow_rows(data: bytes, d: Dialect, ncols: int) -> list[dict[str, object]]:
    names = [f"c{i}" for i in range(ncols)]
    return pacsv.read_csv(
        pa.py_buffer(data),
        read_options=pacsv.ReadOptions(column_names=names, block_size=len(data) + 1),
        parse_options=pacsv.ParseOptions(
            delimiter=chr(d.delimiter),
            quote_char=chr(d.quote) if d.quote is not None else False,
            escape_char=chr(d.escape) if d.escape is not None else False,
            newlines_in_values=True,
            invalid_row_handler=lambda row: "skip",
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.binary() for c in names}, null_values=[], strings_can_be_null=False
        ),
    ).to_pylist()


@settings(max_examples=1500, deadline=None)
@given(data=CHUNKS, d=DIALECTS)
def test_each_record_is_one_pyarrow_row_with_the_counted_fields(data: bytes, d: Dialect) -> None:
    """Parsing the records one at a time gives what pyarrow gives for them all together: the
    boundaries are pyarrow's, and ``field_counts`` is the number of fields pyarrow sees."""
    if d.comment is not None:
        d = Dialect(d.delimiter, d.quote, d.escape, None)
    sc = scan(data, d, final=True)
    idx = [i for i, k in enumerate(sc.kinds.tolist()) if k in (DATA, STRAY)]
    if not idx:
        return
    counts = field_counts(Text(data, d, final=True), sc, __import__("numpy").array(idx))
    for i, count in zip(idx, counts.tolist(), strict=True):
        rec = data[sc.starts[i] : sc.nexts[i]]
        assert len(_pyarrow_rows(rec, d, count)) == 1, rec
        if count > 1:
            assert _pyarrow_rows(rec, d, count - 1) == [], rec
    clean = b"".join(data[sc.starts[i] : sc.ends[i]] + b"\n" for i in idx if sc.kinds[i] == DATA)
    if clean and len(set(counts.tolist())) == 1:
        assert len(_pyarrow_rows(clean, d, int(counts[0]))) == sum(
            1 for i in idx if sc.kinds[i] == DATA
        )


def test_examples() -> None:
    d = Dialect()
    recs, tail = scanned(b'a,"b\nc",d\n"x"y,z\r\n\n1,"2', d, True)
    assert [k for *_, k in recs] == [DATA, STRAY, BLANK, TRUNCATED]
    assert tail == len(b'a,"b\nc",d\n"x"y,z\r\n\n1,"2')
    recs, tail = scanned(b'a,"b\nc",d\n1,"2', d, False)
    assert len(recs) == 1 and tail == len(b'a,"b\nc",d\n')
    sc = scan(b'b",c\nd\n', d, final=False, state=QUOTED)
    assert sc.nexts[0] == 5  # the quoted field closes, the record ends at the first newline


def test_line_breaks() -> None:
    assert line_breaks(b"a\r\nb\rc\nd\r", final=False).tolist() == [2, 4, 6]
    assert line_breaks(b"a\r\nb\rc\nd\r", final=True).tolist() == [2, 4, 6, 8]


# ------------------------------------------------------------------ value by value conversion

VALUES = st.lists(
    st.lists(
        st.sampled_from(
            [
                "1",
                "0",
                "-",
                "+",
                ".",
                "e",
                "x",
                "0x1f",
                " ",
                "\t",
                ":",
                "T",
                "Z",
                "2023",
                "-01",
                "-31",
                "12",
                "true",
                "True",
                "nan",
                "inf",
                "9" * 20,
                "1.5",
                "é",
                '"',
                ",",
            ]
        ),
        max_size=5,
    ).map("".join)
    | st.none(),
    min_size=1,
    max_size=30,
)
TYPES = [
    pa.int64(),
    pa.int8(),
    pa.uint32(),
    pa.float64(),
    pa.bool_(),
    pa.date32(),
    pa.timestamp("us"),
    pa.timestamp("us", tz="UTC"),
    pa.decimal128(10, 2),
]


@settings(max_examples=400, deadline=None)
@given(values=VALUES, typ=st.sampled_from(TYPES))
def test_value_by_value_verdicts_are_the_csv_converters(
    values: list[str | None], typ: pa.DataType
) -> None:
    """The failing values found by the reader's slow path are exactly those pyarrow's CSV
    converter refuses one at a time, and the good ones convert to the same values as when the
    whole file is parsed directly (the fast path)."""
    from sluice.connectors.files.csv import _convert_values, _csv_convert

    arr = pa.array(values, pa.string())
    truth = []
    for i, v in enumerate(values):
        try:
            _csv_convert(pa.array([v], pa.string()), typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            truth.append(i)
    converted, bad = _convert_values(arr, typ)
    assert sorted(bad) == truth
    good = [v for i, v in enumerate(values) if i not in truth]
    if good:
        text = "v\n" + "".join(
            ("" if v is None else '"' + v.replace('"', '""') + '"') + "\n" for v in good
        )
        direct = pacsv.read_csv(
            pa.py_buffer(text.encode()),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={"v": typ}, null_values=[""], quoted_strings_can_be_null=False
            ),
        ).column(0)
        kept = converted.filter(pa.array([i not in truth for i in range(len(values))]))
        assert [repr(x) for x in kept.to_pylist()] == [repr(x) for x in direct.to_pylist()]


@settings(max_examples=500, deadline=None)
@given(
    values=st.lists(
        st.lists(
            st.sampled_from([b"a", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xff", b"\xf0"])
        ).map(b"".join)
        | st.none(),
        max_size=20,
    ),
    offset=st.integers(0, 3),
)
def test_invalid_utf8_values_are_found_one_by_one(values: list[bytes | None], offset: int) -> None:
    """A UTF-8 sequence cut between two values is not taken for a whole one."""
    from sluice.connectors.files.csv import _invalid_rows

    arr = pa.array([b"x"] * offset + values, pa.binary()).slice(offset)
    expected = []
    for i, v in enumerate(values):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                expected.append(i)
    assert _invalid_rows(arr).tolist() == expected
