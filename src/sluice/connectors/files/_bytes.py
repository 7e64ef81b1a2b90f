"""The one place file readers get their bytes from.

Every file reader opens its input with :func:`open_input` and never with ``open()``: what can go
wrong between a path and its bytes is handled here once, for every format.

* **Unreadable files.** A file that vanished after the glob, is not a regular file, or cannot be
  opened or read raises :class:`FileUnreadable` (reason ``file_unreadable``): never "zero rows".
* **Compression.** gzip, bzip2, zstd and xz (and LZ4 frames) are recognised by their magic bytes
  (``compression: auto``, the default) or forced by name, and decompressed as a stream (pyarrow's
  C++ codecs; xz by the standard library), so memory does not grow with the file.
* **Limits.** The decompressed bytes of one file are capped (``max_file_bytes``, and for compressed
  input ``max_compression_ratio`` times the compressed size once past
  :data:`RATIO_GRACE_BYTES`): a decompression bomb raises :class:`InputTooLarge` (reason
  ``too_large``) after reading at most the limit. A compressed stream that is corrupt or truncated
  raises :class:`CorruptInput` (``corrupt_file``) at the point of damage: what was read before it
  is kept by the reader.
* **Text encodings.** The stream handed to a reader is UTF-8, without a byte-order mark. A UTF-8
  BOM is removed; a UTF-16/UTF-32 BOM selects that encoding when the declared one is UTF-8 (the
  default), and the text is transcoded to UTF-8; a declared non-UTF-8 encoding is transcoded too.
  Bytes that are invalid in the source encoding are passed on as *invalid UTF-8* (each bad byte
  becomes an encoded lone surrogate), so the reader's own vectorized UTF-8 check finds the exact
  record and dead-letters it with reason ``encoding``; nothing is replaced silently.

Line-oriented readers cut the stream with :func:`line_blocks`: blocks of whole lines, with every
line longer than ``max_record_bytes`` skipped without being held in memory and reported as an
:class:`Oversize` item in its place (a ``too_large`` dead letter with its line and offset), after
which the next line is read normally.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import lzma
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

import pyarrow as pa

Compression = Literal["auto", "none", "gzip", "bz2", "zstd", "xz", "lz4"]

#: Compressed input may expand by ``max_compression_ratio`` only after this many output bytes.
RATIO_GRACE_BYTES: Final = 64 << 20

#: Bytes of an oversize record kept as the dead letter's payload.
OVERSIZE_HEAD: Final = 1024

_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x04\x22\x4d\x18", "lz4"),
)
_EXTENSIONS: Final = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz", ".lz4": "lz4"}
_BOMS: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)
_MARK: Final = "sluice.invalid_as_utf8"


class InputError(Exception):
    """A problem with a file's bytes; ``reason`` is the dead-letter reason code."""

    reason: str = "corrupt_file"


class FileUnreadable(InputError):
    """The file vanished, is not a regular file, or cannot be opened or read."""

    reason = "file_unreadable"


class InputTooLarge(InputError):
    """The (decompressed) input is larger than a configured limit."""

    reason = "too_large"


class CorruptInput(InputError):
    """The compressed stream is corrupt or truncated."""

    reason = "corrupt_file"


@dataclass(frozen=True)
class ByteLimits:
    """Limits applied while reading one file (see the module docstring)."""

    max_file_bytes: int | None = None
    max_compression_ratio: float | None = 1000.0
    max_record_bytes: int = 64 << 20


def inner_name(path: Path) -> str:
    """The file name without a compression extension (``a.csv.gz`` → ``a.csv``)."""
    name = path.name
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def detect_compression(head: bytes, path: Path | None = None) -> str | None:
    """The codec named by the magic bytes at the start of ``head`` (``None``: not compressed)."""
    for magic, codec in _MAGIC:
        if head.startswith(magic):
            if codec == "bz2" and not (len(head) > 3 and head[3:4].isdigit()):
                continue  # "BZh" followed by the block size digit; plain text may start "BZh"
            return codec
    return None


def _mark_invalid(exc: UnicodeError) -> tuple[str, int]:
    """Decode error handler: each undecodable byte becomes a lone surrogate U+DC00+byte, which
    ``surrogatepass`` encodes as bytes that are invalid UTF-8: the reader's UTF-8 check finds the
    record."""
    if isinstance(exc, UnicodeDecodeError):
        bad = exc.object[exc.start : exc.end]
        return "".join(chr(0xDC00 + b) for b in bad), exc.end
    raise exc


codecs.register_error(_MARK, _mark_invalid)


class _Counted(io.RawIOBase):
    """A raw stream over ``inner`` that enforces the limits and converts library errors."""

    def __init__(
        self,
        inner: Any,
        *,
        raw: IO[bytes],
        path: Path,
        limit: int | None,
        what: str,
        compressed: bool,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._raw = raw
        self._path = path
        self._limit = limit
        self._what = what
        self._compressed = compressed
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            n = self._inner.readinto(b) or 0  # straight into the caller's buffer: no copy
        except (OSError, EOFError, lzma.LZMAError, pa.ArrowException) as exc:
            if not self._compressed:
                raise FileUnreadable(f"reading {self._path} failed: {exc}") from exc
            raise CorruptInput(
                f"the {self._what} stream is corrupt or truncated after {self.count} "
                f"decompressed bytes: {exc}"
            ) from exc
        self.count += n
        if self._limit is not None and self.count > self._limit:
            raise InputTooLarge(
                f"the file's {'decompressed ' if self._compressed else ''}content is larger than "
                f"{self._limit} bytes ({self._what}); raise the source's max_file_bytes"
                + (" or max_compression_ratio" if self._compressed else "")
                + " if this file is genuine"
            )
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken stream hides no original error
            self._inner.close()
        self._raw.close()
        super().close()


class _Transcoder(io.RawIOBase):
    """A raw stream: ``inner`` decoded from ``codec`` and re-encoded as UTF-8 (invalid input
    bytes come out as invalid UTF-8, see :func:`_mark_invalid`)."""

    def __init__(self, inner: IO[bytes], codec: str) -> None:
        super().__init__()
        self._inner = inner
        self._decoder = codecs.getincrementaldecoder(codec)(errors=_MARK)
        self._buf = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf and not self._eof:
            data = self._inner.read(1 << 20)
            if not data:
                self._eof = True
                text = self._decoder.decode(b"", final=True)
            else:
                text = self._decoder.decode(data)
            self._buf = text.encode("utf-8", "surrogatepass")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


def _ratio_limit(limits: ByteLimits, compressed_size: int) -> int | None:
    if limits.max_compression_ratio is None:
        return None
    return max(RATIO_GRACE_BYTES, int(compressed_size * limits.max_compression_ratio))


def open_input(
    path: Path,
    *,
    limits: ByteLimits = ByteLimits(),
    compression: Compression = "auto",
    encoding: str | None = "utf-8",
) -> IO[bytes]:
    """Open ``path`` for reading: decompressed, size-limited, UTF-8 without BOM.

    ``encoding=None`` returns the bytes as they are (after decompression; binary formats such as
    Parquet do not use this function). Raises :class:`FileUnreadable` when the file cannot be
    opened; the stream raises :class:`InputTooLarge` / :class:`CorruptInput` /
    :class:`FileUnreadable` while it is read.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FileUnreadable(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise FileUnreadable(f"{path} is not a regular file")
    try:
        raw: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed by the returned stream
    except OSError as exc:
        raise FileUnreadable(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        head = raw.read(8)
        raw.seek(0)
    except OSError as exc:
        raw.close()
        raise FileUnreadable(f"cannot read {path}: {exc.strerror or exc}") from exc
    codec: str | None
    if compression == "auto":
        codec = detect_compression(head, path)
    elif compression == "none":
        codec = None
    else:
        codec = compression
    if codec is None:
        stream: IO[bytes] = io.BufferedReader(
            _Counted(
                raw, raw=raw, path=path, limit=limits.max_file_bytes, what="file", compressed=False
            ),
            buffer_size=1 << 20,
        )
    else:
        inner: Any
        if codec == "xz":
            inner = lzma.LZMAFile(raw)  # noqa: SIM115 - closed by the returned stream
        else:
            inner = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), codec)
        limit = _ratio_limit(limits, st.st_size)
        if limits.max_file_bytes is not None:
            limit = limits.max_file_bytes if limit is None else min(limit, limits.max_file_bytes)
        stream = io.BufferedReader(
            _Counted(inner, raw=raw, path=path, limit=limit, what=f"{codec} file", compressed=True),
            buffer_size=1 << 20,
        )
    if encoding is None:
        return stream
    return _text_stream(stream, encoding)


def _text_stream(stream: IO[bytes], encoding: str) -> IO[bytes]:
    """Strip a BOM; transcode to UTF-8 unless the input is UTF-8 already."""
    head = stream.peek(4)[:4] if isinstance(stream, io.BufferedReader) else b""
    declared = codecs.lookup(encoding).name
    codec = declared
    bom = b""
    for mark, name in _BOMS:
        if head.startswith(mark):
            if declared in ("utf-8", "utf-8-sig") or codecs.lookup(name).name.startswith(
                declared.split("-")[0]
            ):
                codec, bom = name, mark
            break
    if bom:
        stream.read(len(bom))
    if codecs.lookup(codec).name in ("utf-8", "utf-8-sig"):
        return stream
    return io.BufferedReader(_Transcoder(stream, codec), buffer_size=1 << 20)


# ----------------------------------------------------------------------------- line blocks


@dataclass
class Block:
    """Whole lines of the input. ``first_line`` is the 1-based number of the first line;
    ``offset`` the byte offset of ``data[0]`` in the (decompressed, UTF-8) stream. The last line
    of the last block may lack its newline."""

    data: bytes
    offset: int
    first_line: int


@dataclass
class Oversize:
    """A line longer than ``max_record_bytes``, skipped without being kept in memory."""

    line: int  # 1-based
    offset: int
    length: int  # bytes, without the newline
    head: bytes  # the first OVERSIZE_HEAD bytes, for the dead letter's payload


def line_blocks(
    stream: IO[bytes], *, block_size: int, max_record_bytes: int
) -> Iterator[Block | Oversize]:
    """Cut ``stream`` into blocks of about ``block_size`` bytes of whole lines, in order, with
    every line longer than ``max_record_bytes`` replaced by an :class:`Oversize` item at its
    place. Memory: at most ``block_size + max_record_bytes`` bytes are held."""
    offset = 0  # stream offset of buf[0]
    line = 1  # line number of buf[0]
    buf = b""
    skipping: Oversize | None = None
    read_size = max(1 << 16, min(block_size, 1 << 24))
    while True:
        data = stream.read(read_size)
        if skipping is not None:
            if not data:
                yield skipping
                return
            nl = data.find(b"\n")
            if nl < 0:
                skipping.length += len(data)
                offset += len(data)
                continue
            skipping.length += nl
            yield skipping
            skipping = None
            offset += nl + 1
            line += 1
            data = data[nl + 1 :]
            if not data:
                continue
        if not data:
            if buf:
                yield from _split_long(buf, offset, line, max_record_bytes)
            return
        buf += data
        while True:
            start_last = buf.rfind(b"\n") + 1  # where the incomplete last line starts
            if len(buf) - start_last > max_record_bytes:
                # the incomplete last line is already too long: emit the lines before it, then
                # skip it up to its newline without keeping it
                if start_last:
                    yield from _split_long(buf[:start_last], offset, line, max_record_bytes)
                    line += buf.count(b"\n", 0, start_last)
                    offset += start_last
                head = buf[start_last : start_last + OVERSIZE_HEAD]
                skipping = Oversize(line, offset, len(buf) - start_last, head)
                offset += len(buf) - start_last
                buf = b""
                break
            if len(buf) <= block_size or start_last == 0:
                break
            cut = buf.rfind(b"\n", 0, block_size + 1)
            if cut < 0:
                cut = start_last - 1  # one long (allowed) line: up to the last newline
            part = buf[: cut + 1]
            yield from _split_long(part, offset, line, max_record_bytes)
            line += part.count(b"\n")
            offset += len(part)
            buf = buf[cut + 1 :]


def _split_long(
    data: bytes, offset: int, line: int, max_record_bytes: int
) -> Iterator[Block | Oversize]:
    """``data`` (whole lines) as blocks, with lines over the limit taken out as Oversize."""
    if len(data) <= max_record_bytes or _longest_line(data) <= max_record_bytes:
        yield Block(data, offset, line)
        return
    start = 0
    block_start = 0
    n = line
    block_line = line
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if end - start > max_record_bytes:
            if start > block_start:
                yield Block(data[block_start:start], offset + block_start, block_line)
            head = data[start : min(end, start + OVERSIZE_HEAD)]
            yield Oversize(n, offset + start, end - start, head)
            block_start = end + 1
            block_line = n + 1
        start = end + 1
        n += 1
    if block_start < len(data):
        yield Block(data[block_start:], offset + block_start, block_line)


def _longest_line(data: bytes) -> int:
    """Length of the longest line of ``data`` (vectorized: newline positions by NumPy)."""
    import numpy as np

    arr = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(arr == 10)
    if nl.size == 0:
        return len(data)
    edges = np.concatenate(([-1], nl, [len(data)]))
    return int(np.max(np.diff(edges)) - 1)
