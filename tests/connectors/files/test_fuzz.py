"""Every file reader against hostile input: the shared public test suites (every file through
every text reader, whatever its format) plus generated hostile files.

For each (reader, file): no crash of the process, no hang, no exception out of ``read()``, no
noise on stderr, and the records account for the input: each record index appears once (as a row
or a dead letter), indexes are contiguous from 0, and for JSON lines every line is a row, a dead
letter or a counted skip. Runs in a child process (``fuzz_worker.py``) so that a segmentation
fault or a hang is observed, not suffered.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import queue
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[3]
SHARED_DATA = ROOT.parent / "shared" / "data"
WORKER = Path(__file__).with_name("fuzz_worker.py")
TEXT_KINDS = ("csv", "jsonl", "json", "xml")
CASE_TIMEOUT = 60.0
SMALL_LIMIT = {"max_record_bytes": 1 << 20, "max_file_bytes": 64 << 20}


def _hostile_files(root: Path) -> list[Path]:
    """Generated hostile inputs, deterministic (seeded), small on disk."""
    rnd = random.Random(8)
    files: dict[str, bytes] = {
        "empty.txt": b"",
        "newline.txt": b"\n",
        "blank_lines.txt": b"\n\n\r\n\n",
        "null.jsonl": b"null",
        "null_lines.jsonl": b'{"a":1}\nnull\n',
        "scalars.jsonl": b'1\n"x"\n[]\ntrue\n{"a":1}\n',
        "empty_object.json": b"{}",
        "empty_objects.json": b"[{},{}]",
        "bom_empty_object.json": b"\xef\xbb\xbf{}",
        "half_bom.jsonl": b"\xef\xbb{}\n",
        "utf16_no_bom.csv": "a,b\n1,2\n".encode("utf-16-le"),
        "utf16_bom.csv": b"\xff\xfe" + "a,b\n1,2\n".encode("utf-16-le"),
        "utf32_bom.csv": b"\xff\xfe\x00\x00" + "a,b\n1,é\n".encode("utf-32-le"),
        "bad_header.csv": b"a\x80,b\n1,2\n",
        "bad_rows.csv": b"a,b\n1,2\n\xff\xfe,2,3\n4,5\n",
        "unterminated.csv": b'a,b\n1,2\n2,"trunc',
        "stray_quote.csv": b'a,b\n1,x"y\n2,3\n',
        "cr_only.csv": b"a,b\r1,2\r3,4\r",
        "nul_bytes.csv": b"a,b\n1,\x00\x00\n2,3\n",
        "nul_bytes.jsonl": b'{"a":"\x00"}\n{"a":1}\n',
        "many_columns.csv": ",".join(f"c{i}" for i in range(5000)).encode()
        + b"\n"
        + ",".join("1" for _ in range(5000)).encode()
        + b"\n",
        "dup_header.csv": b"a,a,,\n1,2,3,4\n",
        "deep.json": b"[" * 100_000 + b"]" * 100_000,
        "deep.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n{}\n",
        "deep_object.jsonl": b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"\n",
        "huge_number.jsonl": b'{"a": 1' + b"0" * 5000 + b"}\n",
        "invalid_utf8.jsonl": b'{"a":"\xff\xfe"}\n{"a":"ok"}\n',
        "lone_surrogate.jsonl": b'{"a":"\\ud800"}\n',
        "long_line.jsonl": b'{"a":1}\n{"a":"' + b"y" * (3 << 20) + b'"}\n{"a":3}\n',
        "long_line.csv": b"a,b\n1,2\n3," + b"y" * (3 << 20) + b"\n4,5\n",
        "billion_laughs.xml": b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
        + b"".join(
            f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">'.encode() for i in range(8)
        )
        + b"]><rows><row><v>&i;</v></row></rows>",
        "xxe.xml": b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<rows><row><v>&x;</v></row></rows>",
        "malformed_middle.xml": b"<rows><row><v>1</v></row><row><v>2</v><row><v>3</v></row></rows>",
        "deep.xml": b"<rows>" + b"<x>" * 20_000 + b"</x>" * 20_000 + b"</rows>",
    }
    good_csv = b"id,name\n" + b"".join(b"%d,n%d\n" % (i, i) for i in range(5000))
    files["truncated.csv.gz"] = gzip.compress(good_csv)[:-200]
    files["garbage_tail.csv.gz"] = gzip.compress(good_csv) + b"garbage"
    files["bomb.jsonl.gz"] = gzip.compress(b"0" * (200 << 20), compresslevel=9)
    files["bomb.csv.bz2"] = bz2.compress(b"a\n" + b"1" * (300 << 20))
    files["zstd_garbage.csv"] = b"\x28\xb5\x2f\xfd" + bytes(rnd.randrange(256) for _ in range(500))
    for i in range(12):
        n = rnd.choice([1, 7, 100, 4096, 70_000])
        files[f"random_{i}.bin"] = bytes(rnd.randrange(256) for _ in range(n))
    # the shared suites, damaged: truncated and with flipped bytes
    sources = sorted(p for p in SHARED_DATA.rglob("*") if p.suffix in (".csv", ".json"))
    for i, src in enumerate(rnd.sample(sources, min(40, len(sources)))):
        data = src.read_bytes()
        if not data:
            continue
        cut = rnd.randrange(len(data))
        files[f"cut_{i}_{src.name}"] = data[:cut]
        flipped = bytearray(data)
        for _ in range(max(1, len(data) // 50)):
            flipped[rnd.randrange(len(data))] = rnd.randrange(256)
        files[f"flip_{i}_{src.name}"] = bytes(flipped)
    out = []
    for name, data in files.items():
        path = root / name
        path.write_bytes(data)
        out.append(path)
    return out


def _cases(tmp: Path) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    shared = sorted(
        p
        for p in SHARED_DATA.rglob("*")
        if p.is_file() and p.suffix in (".csv", ".json", ".parquet", ".xml", ".yaml", ".md")
    )
    for path in shared:
        kinds = [*TEXT_KINDS, "parquet"] if path.suffix == ".parquet" else TEXT_KINDS
        for kind in kinds:
            cases.append({"kind": kind, "path": str(path), "options": {}})
    for path in _hostile_files(tmp):
        for kind in (*TEXT_KINDS, "parquet"):
            options = {} if kind == "parquet" else dict(SMALL_LIMIT)
            cases.append({"kind": kind, "path": str(path), "options": options})
    return cases


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _drain(stream: Any, into: list[str]) -> None:
    into.append(stream.read())


def _run_all(cases: list[dict[str, Any]], tmp: Path) -> tuple[dict[int, dict[str, Any]], str]:
    """Run the cases in child processes; a crash or hang is recorded and the rest goes on."""
    case_file = tmp / "cases.json"
    case_file.write_text(json.dumps(cases))
    results: dict[int, dict[str, Any]] = {}
    stderr_all = ""
    start = 0
    env = {**os.environ, "PYTHONWARNINGS": "error::ResourceWarning"}
    while start < len(cases):
        with subprocess.Popen(
            [sys.executable, "-X", "faulthandler", str(WORKER), str(case_file), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(ROOT),
        ) as proc:
            lines: queue.Queue[str | None] = queue.Queue()
            errors: list[str] = []
            assert proc.stdout is not None and proc.stderr is not None
            out, err = proc.stdout, proc.stderr

            readers = [
                threading.Thread(target=_pump, args=(out, lines), daemon=True),
                threading.Thread(target=_drain, args=(err, errors), daemon=True),
            ]
            for t in readers:
                t.start()
            current: int | None = None
            hung = False
            while True:
                try:
                    line = lines.get(timeout=CASE_TIMEOUT)
                except queue.Empty:
                    hung = True
                    proc.kill()
                    break
                if line is None:
                    break
                msg = json.loads(line)
                if msg.get("start"):
                    current = msg["i"]
                else:
                    results[msg["i"]] = msg
                    current = None
            proc.wait()
            for t in readers:
                t.join(timeout=10)
            stderr_all += "".join(errors)
        if current is None:
            if len(results) < len(cases) - start and not hung:
                missing = min(set(range(start, len(cases))) - set(results))
                results[missing] = {"i": missing, "error": f"worker exited {proc.returncode}"}
                start = missing + 1
                continue
            break
        results[current] = {
            "i": current,
            "error": "HANG" if hung else f"CRASH exit {proc.returncode}",
        }
        start = current + 1
    return results, stderr_all


def _line_count(path: Path) -> int:
    """Lines of the file as the readers see it: decompressed, decoded (BOM), through the byte
    layer (itself tested against the standard library in test_bytes.py)."""
    from sluice.connectors.files._bytes import ByteLimits, open_input

    try:
        with open_input(path, limits=ByteLimits(max_file_bytes=64 << 20)) as f:
            data = f.read()
    except Exception:
        return -1
    if not data:
        return 0
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


@pytest.mark.timeout(1800)
def test_i8_fuzz_every_reader_survives_and_accounts_for_every_record(tmp_path: Path) -> None:
    cases = _cases(tmp_path)
    results, stderr = _run_all(cases, tmp_path)
    problems: list[str] = []
    for i, case in enumerate(cases):
        r = results.get(i)
        where = f"{case['kind']} reader on {Path(case['path']).name}"
        if r is None:
            problems.append(f"{where}: no result")
            continue
        if r.get("error"):
            problems.append(f"{where}: {r['error']}")
            continue
        if r["duplicate_positions"]:
            problems.append(f"{where}: {r['duplicate_positions']} record position(s) twice")
        if not r["whole_file"] and r["n_positions"] != r["max_position"] + 1:
            problems.append(
                f"{where}: record positions not contiguous "
                f"({r['n_positions']} records, highest position {r['max_position']})"
            )
        lines = _line_count(Path(case["path"])) if case["kind"] == "jsonl" else -1
        if lines >= 0 and not r["whole_file"] and r["rows"] + r["dead"] + r["skipped"] != lines:
            problems.append(
                f"{where}: {r['rows']} rows + {r['dead']} dead + {r['skipped']} skipped != "
                f"{lines} lines"
            )
    noise = [
        ln
        for ln in stderr.splitlines()
        if "Exception ignored" in ln or "Traceback" in ln or "Fatal Python error" in ln
    ]
    if noise:
        problems.append(f"stderr noise: {noise[:5]}")
    assert not problems, f"{len(problems)} problem(s) in {len(cases)} cases:\n" + "\n".join(
        problems[:80]
    )


def test_fuzz_cases_cover_every_shared_suite(tmp_path: Path) -> None:
    """The corpus really holds the shared suites and the hostile files (guards the globbing)."""
    cases = _cases(tmp_path)
    names = {Path(c["path"]).name for c in cases}
    assert "n_structure_100000_opening_arrays.json" in names
    assert "quotes_and_newlines.csv" in names
    assert "ARROW-GH-41317.parquet" in names
    assert "bomb.jsonl.gz" in names
    assert len(cases) > 1500
    assert pa.__version__  # the worker imports the same pyarrow
