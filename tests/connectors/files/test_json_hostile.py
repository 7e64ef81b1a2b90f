"""Nothing a JSON or JSON-lines file holds may crash the process (issue 8, item 16).

pyarrow's JSON reader (``pyarrow.json.read_json``, RapidJSON inside) kills the process with a
segmentation fault on a block whose only line is ``null`` and on objects nested some 7,000 levels
deep. The JSON-lines reader therefore hands pyarrow only blocks a vectorized scan has vetted. Each
test here runs the readers in a child process, so a crash fails the test instead of killing the
test run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sluice.connectors.files.json import MAX_DEPTH

HERE = Path(__file__).resolve().parent
SUITE = HERE.parents[2].parent / "shared" / "data" / "jsontestsuite"

READ = """
import json, sys
from sluice.config.models import JsonlSource
from sluice.connectors.files.json import JsonlReader
results = []
for path in sys.argv[1:]:
    print(path, file=sys.stderr, flush=True)  # a crash names its file
    out = {"rows": 0, "dead": [], "skipped": 0}
    for c in JsonlReader(JsonlSource(kind="jsonl", path=path, block_size=4096)).read():
        out["rows"] += c.table.num_rows if c.table is not None else 0
        if c.dead is not None:
            out["dead"] += [[d["reason"], d["position"], d["line"]] for d in c.dead.to_pylist()]
        out["skipped"] += c.skipped
    results.append(out)
print(json.dumps(results))
"""


def read_in_child(*paths: Path) -> list[dict[str, Any]]:
    """Read each file with the JSON-lines reader in one child process; per file: rows, dead
    letters (reason, position, line) and skipped lines."""
    done = subprocess.run(
        [sys.executable, "-c", READ, *map(str, paths)], capture_output=True, text=True, timeout=240
    )
    last = done.stderr.strip().splitlines()[-1:] if done.returncode else []
    assert done.returncode == 0, f"the reader died with exit code {done.returncode} on {last}"
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


@pytest.mark.parametrize("content", [b"null", b"null\n", b"  null \r\n", b"\n\nnull\n\n"])
def test_i8_16_jsonl_file_whose_only_line_is_null_does_not_crash(
    tmp_path: Path, content: bytes
) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(content)
    [result] = read_in_child(p)
    line = content.split(b"\n").index(next(x for x in content.split(b"\n") if x.strip())) + 1
    assert result["rows"] == 0
    assert result["dead"] == [["parse_error", 0, line]]


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1, 7_000, 50_000])
def test_i8_16_jsonl_deep_nesting_does_not_crash(tmp_path: Path, depth: int) -> None:
    p = tmp_path / "a.jsonl"
    deep = b'{"deep": ' + b"[" * depth + b"]" * depth + b"}"  # pyarrow would build it
    p.write_bytes(b'{"a": 1}\n' + deep + b'\n{"a": 2}\n')
    [result] = read_in_child(p)
    if depth + 1 <= MAX_DEPTH:  # the object adds a level
        assert result == {"rows": 3, "dead": [], "skipped": 0}
    else:  # deeper than JSON documents accept (orjson's limit): the same answer for lines
        assert result == {"rows": 2, "dead": [["parse_error", 1, 2]], "skipped": 0}


def test_i8_16_fuzz_the_json_fast_paths_in_a_child_process(tmp_path: Path) -> None:
    """Hypothesis-generated blocks (random JSON values per line, NaN/Infinity, lone surrogates,
    random bytes, deep nesting, odd whitespace) through pyarrow's fast path and both readers in
    a child process: no crash, and the fast path only returns what orjson agrees with."""
    done = subprocess.run(
        [sys.executable, str(HERE / "_jsonl_fuzz_child.py"), str(tmp_path), "300"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    last = tmp_path / "last_case.bin"
    case = last.read_bytes()[:2000] if last.exists() else b""
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"exit code {done.returncode}; last case {case!r}\n{output}"
    assert done.stdout.strip().endswith("ok")


def _suite_lines() -> list[Path]:
    folder = SUITE / "test_parsing"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if b"\n" not in p.read_bytes().rstrip(b"\n"))


def test_i8_16_jsontestsuite_documents_as_json_lines(tmp_path: Path) -> None:
    """Every one-line JSONTestSuite document as a line between two good lines, in the first
    block and after the schema is pinned: y_ objects are rows, every other y_ value and every n_
    document is one dead letter (an n_ document that is only whitespace is a blank line:
    skipped), i_ documents do not crash; the good lines around are always read."""
    files = _suite_lines()
    assert len(files) > 250
    prefix = "".join(json.dumps({"a": i}) + "\n" for i in range(400)).encode()  # > one block
    expected: dict[str, tuple[int, int, int]] = {}  # file -> (rows, dead, skipped) per copy
    paths: list[Path] = []
    for f in files:
        content = f.read_bytes().rstrip(b"\n")
        for n, head in enumerate((b"", prefix)):
            p = tmp_path / f"{f.stem}.{n}.jsonl"
            p.write_bytes(head + b'{"a": -1}\n' + content + b'\n{"a": -2}\n')
            paths.append(p)
        if f.name.startswith("y_"):
            is_object = isinstance(json.loads(content), dict)
            expected[f.name] = (3, 0, 0) if is_object else (2, 1, 0)
        elif f.name.startswith("n_"):
            expected[f.name] = (2, 0, 1) if not content.strip(b" \t\r") else (2, 1, 0)
    results = read_in_child(*paths)
    failures = []
    for i, f in enumerate(files):
        for n in (0, 1):
            result = results[2 * i + n]
            rows = result["rows"] - (400 if n else 0)
            got = (rows, len(result["dead"]), result["skipped"])
            want = expected.get(f.name)
            # i_: either answer, but the good lines around are read and counted
            ok = got in ((3, 0, 0), (2, 1, 0)) if want is None else got == want
            if not ok:
                failures.append((f.name, n, got, want))
    assert failures == []
