"""The byte layer every file reader uses: unreadable files, compression, limits, encodings,
and line blocks with oversize lines skipped."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.connectors.files._bytes import (
    Block,
    ByteLimits,
    CorruptInput,
    FileUnreadable,
    InputTooLarge,
    Oversize,
    inner_name,
    line_blocks,
    open_input,
)

TEXT = b"a,b\n" + b"".join(b"%d,x%d\n" % (i, i) for i in range(20_000))


def _read_all(path: Path, **kw: object) -> bytes:
    with open_input(path, **kw) as f:  # type: ignore[arg-type]
        return f.read()


def _compress(codec: str, data: bytes) -> bytes:
    if codec == "gzip":
        return gzip.compress(data)
    if codec == "bz2":
        return bz2.compress(data)
    if codec == "xz":
        return lzma.compress(data)
    return pa.compress(data, codec, asbytes=True)


@pytest.mark.parametrize(
    "codec,ext", [("gzip", ".gz"), ("bz2", ".bz2"), ("zstd", ".zst"), ("xz", ".xz")]
)
def test_i8_14_compressed_inputs_are_read_by_magic_bytes(
    tmp_path: Path, codec: str, ext: str
) -> None:
    path = tmp_path / f"data.csv{ext}"
    path.write_bytes(_compress(codec, TEXT))
    assert _read_all(path) == TEXT
    # the name does not matter: the magic bytes do
    renamed = tmp_path / "plain.csv"
    renamed.write_bytes(path.read_bytes())
    assert _read_all(renamed) == TEXT
    assert inner_name(path) == "data.csv"


@pytest.mark.parametrize("codec", ["gzip", "bz2", "zstd", "xz"])
def test_i8_14_truncated_compressed_input_is_corrupt_after_the_good_part(
    tmp_path: Path, codec: str
) -> None:
    blob = _compress(codec, os.urandom(1 << 20).hex().encode())
    path = tmp_path / "cut.bin"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptInput, match="corrupt or truncated"):
        _read_all(path)


def test_i8_14_decompression_bomb_is_too_large_with_bounded_reading(tmp_path: Path) -> None:
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        zeros = b"0" * (1 << 20)
        for _ in range(300):  # 300 MiB of zeros, ~300 KiB compressed
            f.write(zeros)
    assert path.stat().st_size < 1 << 20
    read = 0
    limits = ByteLimits(max_compression_ratio=100)
    with (
        pytest.raises(InputTooLarge, match="max_compression_ratio"),
        open_input(path, limits=limits) as f,
    ):
        while chunk := f.read(1 << 20):
            read += len(chunk)
    assert read <= 65 << 20  # stopped at the grace limit, not at 300 MiB


def test_i8_14_max_file_bytes_limits_plain_files(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_bytes(TEXT)
    with pytest.raises(InputTooLarge, match="max_file_bytes"):
        _read_all(path, limits=ByteLimits(max_file_bytes=1000))


def test_i8_07_missing_file_and_directory_are_unreadable(tmp_path: Path) -> None:
    with pytest.raises(FileUnreadable, match="No such file"):
        open_input(tmp_path / "gone.csv")
    with pytest.raises(FileUnreadable, match="not a regular file"):
        open_input(tmp_path)


@pytest.mark.parametrize(
    "encoded",
    [
        b"\xef\xbb\xbf" + "a,é\n".encode(),
        b"\xff\xfe" + "a,é\n".encode("utf-16-le"),
        b"\xfe\xff" + "a,é\n".encode("utf-16-be"),
        b"\xff\xfe\x00\x00" + "a,é\n".encode("utf-32-le"),
    ],
)
def test_i8_13_bom_selects_encoding_and_is_removed(tmp_path: Path, encoded: bytes) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(encoded)
    assert _read_all(path) == "a,é\n".encode()


def test_i8_13_declared_encoding_is_transcoded_and_bad_bytes_stay_invalid(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("a,é\n".encode("latin-1"))
    assert _read_all(path, encoding="latin-1") == "a,é\n".encode()
    bad = tmp_path / "bad16.csv"
    bad.write_bytes(b"\xff\xfe" + "ab".encode("utf-16-le") + b"\x00\xd8")  # lone high surrogate
    out = _read_all(bad)
    assert out.startswith(b"ab")
    with pytest.raises(UnicodeDecodeError):
        out.decode("utf-8")  # the bad unit is passed on as invalid UTF-8, not replaced


def _lines(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.integers(0, 40), max_size=60),
    trailing_newline=st.booleans(),
    block_size=st.integers(1, 64),
    max_record=st.integers(1, 30),
)
def test_line_blocks_keep_every_line_in_order_and_skip_only_long_ones(
    lines: list[int], trailing_newline: bool, block_size: int, max_record: int
) -> None:
    text = b"\n".join(b"%02d" % (i % 100) + b"x" * n for i, n in enumerate(lines))
    if trailing_newline and lines:
        text += b"\n"
    expected = _lines(text)
    got: list[tuple[int, int, bytes | None]] = []  # (line, offset, content or None=oversize)
    for item in line_blocks(io.BytesIO(text), block_size=block_size, max_record_bytes=max_record):
        if isinstance(item, Oversize):
            assert item.length > max_record
            assert text[item.offset : item.offset + item.length].find(b"\n") < 0
            assert item.head == text[item.offset : item.offset + min(item.length, 1024)]
            got.append((item.line, item.offset, None))
            continue
        assert isinstance(item, Block)
        assert text[item.offset : item.offset + len(item.data)] == item.data
        off = item.offset
        for k, ln in enumerate(_lines(item.data) if item.data else [b""]):
            assert len(ln) <= max_record
            got.append((item.first_line + k, off, ln))
            off += len(ln) + 1
    assert [g[0] for g in got] == list(range(1, len(expected) + 1))
    for (_, _, content), want in zip(got, expected, strict=True):
        if content is not None:
            assert content == want
        else:
            assert len(want) > max_record


def test_i8_15_huge_line_is_skipped_with_bounded_memory_and_next_line_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"a": 1}\n{"a": "')
        chunk = b"y" * (1 << 20)
        for _ in range(200):  # a 200 MiB line
            f.write(chunk)
        f.write(b'"}\n{"a": 3}\n')
    items = []
    with open_input(path) as stream:
        for item in line_blocks(stream, block_size=1 << 20, max_record_bytes=8 << 20):
            items.append(item if isinstance(item, Oversize) else item.data)
    assert items[0] == b'{"a": 1}\n'
    assert isinstance(items[1], Oversize)
    assert items[1].line == 2 and items[1].length == 200 * (1 << 20) + 9
    assert items[2] == b'{"a": 3}\n'
