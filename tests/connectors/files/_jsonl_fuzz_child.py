"""Run in a child process by test_json_hostile.py: whatever a block holds, the JSON readers must
not crash the process, and the pyarrow fast path may only return what orjson's line-by-line
reading would (every non-blank line a JSON object, one row per line, valid UTF-8).

``python _jsonl_fuzz_child.py WORK_DIR [MAX_EXAMPLES]``: before each call into the readers the
case is written to ``WORK_DIR/last_case.bin``, so a crash names its input. Exit 0: all good.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import orjson
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.config.models import JsonlSource, JsonSource
from sluice.connectors.files.json import JsonlReader, JsonReader, scan_lines

WORK = Path(sys.argv[1])
EXAMPLES = int(sys.argv[2]) if len(sys.argv) > 2 else 300
LAST = WORK / "last_case.bin"
PINNED = pa.schema([("a", pa.int64()), ("s", pa.string())])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities too: json.dumps writes NaN / Infinity tokens
    | st.text(max_size=20)  # lone surrogates too: escaped, or raw (invalid UTF-8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def dumped(draw: st.DrawFn, top: st.SearchStrategy[object]) -> bytes:
    value = draw(top)
    ascii_only = draw(st.booleans())
    text = json.dumps(
        value, ensure_ascii=ascii_only, separators=draw(st.sampled_from([None, (",", ":")]))
    )
    return text.encode("utf-8", "surrogatepass")


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.sampled_from([1000, 1024, 1025, 3000, 7000, 20000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    closed = draw(st.booleans())
    return b'{"a":' + opener * depth + b"1" + (closer * depth if closed else b"") + b"}"


odd = st.sampled_from(
    [
        b"null",
        b"  null ",
        b"",
        b"   ",
        b"\r",
        b"\t",
        b"\x0c",
        b"\xef\xbb{}",
        b"\xef\xbb\xbf{}",
        b"{}{}",
        b'{"a":1} {"b":2}',
        b'{"a":1}\r{"b":2}',
        b'{"a":NaN}',
        b'{"a":-Infinity}',
        b'{"a":[1,NaN]}',
        b'{"a":{"b":Infinity}}',
        b'{"a":1,"a":2}',
        b'{"a":"\\ud800"}',
        b'{"a":"\xed\xa0\x80"}',
        b'{"a":1}\x00',
        b"{",
        b"}",
        b'{"a":1e400}',
        b'{"a":123456789012345678901234567890}',
    ]
)
line = st.one_of(
    dumped(st.dictionaries(st.sampled_from(["a", "s", "b", "é"]), values, max_size=4)),
    dumped(values),
    st.binary(max_size=40),
    st.binary(max_size=40).map(lambda b: b"{" + b),
    deep(),
    odd,
)
blocks = st.tuples(st.lists(line, min_size=1, max_size=12), st.booleans()).map(
    lambda t: b"\n".join(t[0]) + (b"\n" if t[1] else b"")
)


def check_fast(block: bytes, pinned: pa.Schema | None) -> None:
    LAST.write_bytes(block)
    table = JsonlReader._fast(block, pinned, scan_lines(block))
    if table is None:
        return
    table.validate(full=True)
    records = [ln for ln in block.split(b"\n") if ln.strip(b" \t\r")]
    assert table.num_rows == len(records), (table.num_rows, len(records))
    for ln in records:
        assert isinstance(orjson.loads(ln), dict), ln  # raises for anything orjson refuses


def check_readers(block: bytes) -> None:
    path = WORK / "case.jsonl"
    path.write_bytes(block)
    LAST.write_bytes(block)
    reader = JsonlReader(
        JsonlSource(kind="jsonl", path=str(path), block_size=4096, compression="none")
    )
    rows = dead = skipped = 0
    for chunk in reader.read():
        if chunk.table is not None:
            chunk.table.validate(full=True)
            rows += chunk.table.num_rows
        dead += chunk.dead.num_rows if chunk.dead is not None else 0
        skipped += chunk.skipped
    lines = block.count(b"\n") + (0 if block.endswith(b"\n") or not block else 1)
    assert rows + dead + skipped == lines, (rows, dead, skipped, lines)
    doc = WORK / "case.json"
    doc.write_bytes(block)
    for chunk in JsonReader(JsonSource(kind="json", path=str(doc), compression="none")).read():
        if chunk.table is not None:
            chunk.table.validate(full=True)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(blocks)
def fuzz(block: bytes) -> None:
    check_fast(block, None)
    check_fast(block, PINNED)
    check_readers(block)


if __name__ == "__main__":
    fuzz()
    print("ok")
