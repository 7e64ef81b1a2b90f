"""Where the records of CSV text begin and end, found vectorized (NumPy), quote-aware.

pyarrow parses CSV fast but says nothing about *where* each record lies, and its streaming reader
fails when one record is longer than its block. The CSV reader therefore cuts its input itself,
at record boundaries, with :func:`scan`, and hands pyarrow only whole records. The same scan gives
every record its byte range (for its 0-based position and 1-based line number), and classifies
it: data, blank line, comment line, a record with a *stray quote* (a quote inside an unquoted
field, or text after a closing quote — what ``strict_quotes`` refuses), or a record cut short by
the end of the input inside a quoted field (*truncated*).

The grammar is pyarrow's (so that the boundaries found here are the ones pyarrow's parser sees):

* a field that starts with the quote character is quoted until the next quote that is not
  doubled (``""`` inside a quoted field is one quote); after the closing quote the field goes on
  unquoted until the delimiter or the end of the line;
* in an unquoted field a quote is an ordinary character;
* the escape character (when configured) makes the next byte literal, quoted or not;
* a record ends at ``\\n``, ``\\r\\n`` or a lone ``\\r`` outside quotes.

How it stays vectorized: the positions of quotes and line ends are found with NumPy once per
buffer. As long as every quote is where the strict grammar allows it (opening at the start of a
field, closing before a delimiter, a line end, another quote or the end of the input), a line
end ends a record exactly when an even number of quotes precedes it since the record's start —
a ``searchsorted`` per line end. A quote that breaks the strict grammar (rare) is resolved on its
own, in order, and the vectorized scan resumes right after it with the state it leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

# machine states at a position
RECORD_START: Final = 0
FIELD_START: Final = 1
FIELD: Final = 2
QUOTED: Final = 3

# record kinds
DATA: Final = 0
BLANK: Final = 1
COMMENT: Final = 2
STRAY: Final = 3
TRUNCATED: Final = 4

LF: Final = 10
CR: Final = 13

_EMPTY: Final = np.zeros(0, dtype=np.int64)

#: The buffers the scanner reads (the reader fills bytearrays straight from the stream).
Bytes = bytes | bytearray


@dataclass(frozen=True)
class Dialect:
    """The special bytes of a CSV dialect (each a single ASCII byte, or ``None``)."""

    delimiter: int = 44
    quote: int | None = 34
    escape: int | None = None
    comment: int | None = None

    def plain(self, data: Bytes) -> bool:
        """True when ``data`` holds no quote and no escape byte: every line end ends a record."""
        return (self.quote is None or bytes((self.quote,)) not in data) and (
            self.escape is None or bytes((self.escape,)) not in data
        )


@dataclass
class Scan:
    """The complete records of a buffer, in order.

    ``starts[i]``..``ends[i]`` is the content of record ``i`` (without its line terminator),
    ``nexts[i]`` where the next record starts, ``kinds[i]`` one of DATA, BLANK, COMMENT, STRAY,
    TRUNCATED. ``tail`` is the offset of the first byte not in a complete record (the length of
    the buffer when every record is complete); ``tail_state`` the machine state at the end of the
    buffer inside that incomplete record."""

    starts: np.ndarray
    ends: np.ndarray
    nexts: np.ndarray
    kinds: np.ndarray
    tail: int
    tail_state: int = RECORD_START

    def __len__(self) -> int:
        return len(self.starts)

    def head(self, k: int) -> Scan:
        """The first ``k`` records (the rest of the buffer is the tail)."""
        return Scan(
            self.starts[:k], self.ends[:k], self.nexts[:k], self.kinds[:k], int(self.nexts[k - 1])
        )


class Text:
    """A buffer and the positions of its special bytes (computed once, lazily)."""

    def __init__(self, data: Bytes, dialect: Dialect, *, final: bool) -> None:
        self.data = data
        self.d = dialect
        self.final = final
        self.n = len(data)
        self.a = np.frombuffer(data, dtype=np.uint8)
        self.escaped: np.ndarray | None = None  # bool mask: bytes made literal by an escape
        if dialect.escape is not None and bytes((dialect.escape,)) in data:
            e = np.flatnonzero(self.a == dialect.escape)
            idx = np.arange(len(e))
            run_start = np.ones(len(e), dtype=bool)
            run_start[1:] = e[1:] != e[:-1] + 1
            first = np.maximum.accumulate(np.where(run_start, idx, 0))
            active = e[(idx - first) % 2 == 0]  # in a run of escapes, every other one escapes
            target = active + 1
            self.escaped = np.zeros(self.n + 1, dtype=bool)
            self.escaped[target] = True
        #: bytes that may stand next to a quote: delimiter, line ends, the quote (doubled)
        self.edge = np.zeros(256, dtype=bool)
        for c in (dialect.delimiter, LF, CR, dialect.quote):
            if c is not None:
                self.edge[c] = True
        self.quotes = self._positions(dialect.quote)
        self.line_ends = self._line_ends()
        self._delims: np.ndarray | None = None

    def _positions(self, byte: int | None) -> np.ndarray:
        if byte is None or bytes((byte,)) not in self.data:
            return _EMPTY
        p = np.flatnonzero(self.a == byte)
        if self.escaped is not None:
            p = p[~self.escaped[p]]
        return p.astype(np.int64, copy=False)

    def _line_ends(self) -> np.ndarray:
        """Unescaped ``\\n`` and lone ``\\r`` (a ``\\r`` that is the last byte of a buffer that
        is not the end of the input may be half of ``\\r\\n``: not counted yet)."""
        lf = self._positions(LF)
        if b"\r" not in self.data:
            return lf
        cr = self._positions(CR)
        nxt = cr + 1
        lone = np.ones(len(cr), dtype=bool)
        inside = nxt < self.n
        lone[inside] = self.a[nxt[inside]] != LF
        if not self.final:
            lone &= inside
        cr = cr[lone]
        return np.union1d(lf, cr) if len(cr) else lf

    @property
    def delimiters(self) -> np.ndarray:
        if self._delims is None:
            self._delims = self._positions(self.d.delimiter)
        return self._delims

    def is_field_start(self, q: np.ndarray) -> np.ndarray:
        """Whether the byte before each position in ``q`` (all > 0) ends a field."""
        prev = self.a[q - 1]
        ok: np.ndarray = (prev == self.d.delimiter) | (prev == LF) | (prev == CR)
        if self.escaped is not None:
            ok &= ~self.escaped[q - 1]
        return ok

    def content_end(self, terminators: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Where the content of records ending at ``terminators`` ends (``\\r\\n`` → before
        the ``\\r``)."""
        if b"\r" not in self.data:
            return terminators
        ends = terminators.copy()
        at = terminators < self.n
        t = terminators[at]
        crlf = (self.a[t] == LF) & (t > starts[at])
        crlf[crlf] &= self.a[t[crlf] - 1] == CR
        if self.escaped is not None:
            crlf[crlf] &= ~self.escaped[t[crlf] - 1]
        ends[np.flatnonzero(at)[crlf]] -= 1
        return ends


def scan(
    data: Bytes | Text,
    dialect: Dialect | None = None,
    *,
    final: bool,
    state: int = RECORD_START,
) -> Scan:
    """The complete records of ``data`` (which starts at a record start, or inside a record in
    ``state``); ``final``: the input ends with ``data``."""
    t = data if isinstance(data, Text) else Text(data, dialect or Dialect(), final=final)
    d, a, n, Q, E = t.d, t.a, t.n, t.quotes, t.line_ends
    out_term: list[np.ndarray] = []  # terminator positions of complete records
    out_first: list[int] = []  # start of the first record of each group
    out_stray: list[bool] = []  # whether the first record of each group is stray
    s = r = 0  # scan position; start of the current record
    st = state
    stray = False
    window = max(len(Q), 256)  # all quotes at once; after a stray quote, small windows
    tail = -1
    tail_state = RECORD_START
    truncated = False
    while True:
        qi = int(np.searchsorted(Q, s))
        kk = min(len(Q), qi + window)
        inside0 = 1 if st == QUOTED else 0
        bad_at = -1  # position of the first quote that breaks the strict grammar
        pending = False  # a closing quote at the end of a non-final buffer: undecidable yet
        if kk > qi:
            q = Q[qi:kk]
            closing = np.zeros(len(q), dtype=bool)
            closing[1 - inside0 :: 2] = True  # parity: every other quote closes
            legal = _legal(t, q, qi, closing, s, st)
            bad = np.flatnonzero(~legal)
            if len(bad):
                jb = int(bad[0])
                bad_at = int(q[jb])
                pending = bool(closing[jb]) and bad_at + 1 == n and not final
            limit = bad_at if bad_at >= 0 else (int(Q[kk]) if kk < len(Q) else n)
        else:
            limit = n
        lo, hi = int(np.searchsorted(E, s)), int(np.searchsorted(E, limit))
        les = E[lo:hi]
        if len(les) and kk > qi:
            inside = (np.searchsorted(Q, les) - qi + inside0) % 2 == 1
            les = les[~inside]
        # comment lines: a record that starts with the comment byte ends at its first line end,
        # whatever quotes that line holds; the quote parity above is wrong for such a line
        comment_at = -1
        if d.comment is not None and len(Q):
            cand = les[les + 1 < n] + 1
            if st == RECORD_START and s == r and r < n:
                cand = np.concatenate((np.array([r], dtype=np.int64), cand))
            cand = cand[a[cand] == d.comment]
            if len(cand):
                ei = np.searchsorted(E, cand)
                line_end = np.full(len(cand), n, dtype=np.int64)
                has = ei < len(E)
                line_end[has] = E[ei[has]]
                quoted = np.flatnonzero(np.searchsorted(Q, line_end) > np.searchsorted(Q, cand))
                if len(quoted):
                    comment_at = int(cand[quoted[0]])
        if comment_at >= 0 and (bad_at < 0 or comment_at < bad_at):
            before = les[les < comment_at]
            if len(before):
                out_first.append(r)
                out_stray.append(stray)
                out_term.append(before)
            ei = int(np.searchsorted(E, comment_at))
            if ei < len(E):
                out_first.append(comment_at)
                out_stray.append(False)
                out_term.append(E[ei : ei + 1])
                s = r = int(E[ei]) + 1
                st, stray = RECORD_START, False
                continue
            if final:
                out_first.append(comment_at)
                out_stray.append(False)
                out_term.append(np.array([n], dtype=np.int64))
                tail = n
            else:
                tail = comment_at
                tail_state = FIELD
            break
        if bad_at >= 0:
            before = les[les < bad_at]
            if len(before):
                out_first.append(r)
                out_stray.append(stray)
                out_term.append(before)
                r = int(before[-1]) + 1
                stray = False
            if pending:
                tail, tail_state = r, QUOTED
                break
            # the stray quote is literal (unquoted field) or closes a quoted field followed by
            # other text; either way the field goes on unquoted after it
            stray = True
            s, st = bad_at + 1, FIELD
            window = 256
            continue
        if len(les):
            out_first.append(r)
            out_stray.append(stray)
            out_term.append(les)
            s = r = int(les[-1]) + 1
            st, stray = RECORD_START, False
            window *= 4
            if kk < len(Q) or s < n:
                continue
        elif kk < len(Q):
            window *= 4
            continue
        # no record end after s: the rest (from r) is the last record, complete only at the end
        inside = (len(Q) - int(np.searchsorted(Q, s)) + (1 if st == QUOTED else 0)) % 2 == 1
        if r >= n:
            tail = n
        elif final:
            out_first.append(r)
            out_stray.append(stray)
            out_term.append(np.array([n], dtype=np.int64))
            tail = n
            truncated = inside
        else:
            tail = r
            if inside:
                tail_state = QUOTED
            elif s >= n:
                tail_state = st
            else:
                esc = t.escaped is not None and bool(t.escaped[n - 1])
                tail_state = FIELD_START if a[n - 1] == d.delimiter and not esc else FIELD
        break
    return _assemble(t, out_first, out_stray, out_term, tail, tail_state, truncated)


def _legal(t: Text, q: np.ndarray, qi: int, closing: np.ndarray, s: int, st: int) -> np.ndarray:
    """Whether each quote ``q`` (``Q[qi:]``) is where the strict grammar allows it, assuming
    the parity ``closing``: an opening quote at the start of a field (or the second quote of a
    doubled pair), a closing one before a delimiter, a line end, another quote or the end."""
    d, a, n, Q = t.d, t.a, t.n, t.quotes
    if t.escaped is None:  # every quote byte is a quote: look at the neighbours only
        first_closer = 0 if len(q) and closing[0] else 1
        qo = q[1 - first_closer :: 2]
        qc = q[first_closer::2]
        legal = np.empty(len(q), dtype=bool)
        before = qo - 1
        if len(before) and before[0] < 0:
            before[0] = 0  # a quote at offset 0: decided below (it is at the scan position)
        legal[1 - first_closer :: 2] = t.edge[a[before]]
        after = qc + 1
        end = len(after) and after[-1] >= n
        if end:
            after[-1] = n - 1
        legal[first_closer::2] = t.edge[a[after]]
        if end:
            legal[first_closer + 2 * (len(qc) - 1)] = t.final
    else:
        legal = np.zeros(len(q), dtype=bool)
        op = ~closing
        qo = q[op]
        ok = np.zeros(len(qo), dtype=bool)
        pos = qo > 0
        ok[pos] = t.is_field_start(qo[pos])
        jo = np.flatnonzero(op)
        cont = jo > 0
        ok[cont] |= q[jo[cont] - 1] == qo[cont] - 1
        legal[op] = ok
        qc = q[closing]
        nxt_i = qc + 1
        okc = np.zeros(len(qc), dtype=bool)
        within = nxt_i < n
        b = a[nxt_i[within]]
        gi = qi + np.flatnonzero(closing)[within]  # global index of each closer
        doubled = (b == d.quote) & (gi + 1 < len(Q))
        doubled[doubled] &= Q[np.minimum(gi[doubled] + 1, len(Q) - 1)] == nxt_i[within][doubled]
        okc[within] = (b == d.delimiter) | (b == LF) | (b == CR) | doubled
        okc[~within] = t.final
        legal[closing] = okc
    if len(q) and not closing[0] and q[0] == s:  # an opener right at the scan position
        legal[0] = st in (RECORD_START, FIELD_START)
    return legal


def _assemble(
    t: Text,
    firsts: list[int],
    strays: list[bool],
    terms: list[np.ndarray],
    tail: int,
    tail_state: int,
    truncated: bool,
) -> Scan:
    """Records from groups of terminators (each group: the first record's start and whether it
    holds a stray quote; the others start after the previous terminator)."""
    groups = [(f, s, e) for f, s, e in zip(firsts, strays, terms, strict=True) if len(e)]
    if not groups:
        return Scan(_EMPTY, _EMPTY, _EMPTY, np.zeros(0, dtype=np.int8), tail, tail_state)
    term = np.concatenate([e for _, _, e in groups])
    starts = np.empty(len(term), dtype=np.int64)
    starts[1:] = term[:-1] + 1
    strayed = np.zeros(len(term), dtype=bool)
    i = 0
    for first, stray, e in groups:
        starts[i] = first
        strayed[i] = stray
        i += len(e)
    ends = t.content_end(term, starts)
    nexts = np.minimum(term + 1, t.n)
    kinds = np.zeros(len(starts), dtype=np.int8)
    kinds[ends == starts] = BLANK
    if t.d.comment is not None:
        nonempty = np.flatnonzero(ends > starts)
        kinds[nonempty[t.a[starts[nonempty]] == t.d.comment]] = COMMENT
    kinds[strayed] = STRAY
    if truncated:
        kinds[-1] = TRUNCATED
    return Scan(starts, ends, nexts, kinds, tail, tail_state)


def line_breaks(data: Bytes, *, final: bool) -> np.ndarray:
    """Positions of the physical line breaks of ``data`` (``\\n``, and ``\\r`` not followed by
    ``\\n``), escaped or quoted or not: line ``k`` (1-based) starts after break ``k - 1``."""
    a = np.frombuffer(data, dtype=np.uint8)
    lf = np.flatnonzero(a == LF)
    if b"\r" not in data:
        return lf
    cr = np.flatnonzero(a == CR)
    nxt = cr + 1
    inside = nxt < len(a)
    lone = np.ones(len(cr), dtype=bool)
    lone[inside] = a[nxt[inside]] != LF
    if not final:
        lone &= inside
    return np.union1d(lf, cr[lone]) if lone.any() else lf


def field_counts(t: Text, sc: Scan, idx: np.ndarray) -> np.ndarray:
    """The number of fields of the records ``idx`` of ``sc`` (DATA or STRAY records)."""
    starts, ends = sc.starts[idx], sc.ends[idx]
    counts = np.ones(len(idx), dtype=np.int64)
    if not len(idx):
        return counts
    D, Q = t.delimiters, t.quotes
    stray = sc.kinds[idx] == STRAY
    if len(D):
        rec = np.searchsorted(starts, D, side="right") - 1
        ok = rec >= 0
        ok[ok] &= D[ok] < ends[rec[ok]]
        ok[ok] &= ~stray[rec[ok]]
        if len(Q):
            before = np.searchsorted(Q, D[ok]) - np.searchsorted(Q, starts[rec[ok]])
            keep = np.flatnonzero(ok)[before % 2 == 0]
        else:
            keep = np.flatnonzero(ok)
        counts += np.bincount(rec[keep], minlength=len(idx)).astype(np.int64)
    for i in np.flatnonzero(stray):
        counts[i] = _count_fields(t, int(starts[i]), int(ends[i]))
    return counts


def _count_fields(t: Text, start: int, end: int) -> int:
    """Fields of one record, following the machine byte by byte between special bytes (used for
    records with a stray quote, where quote parity does not apply)."""
    Q, D = t.quotes, t.delimiters
    i, st, fields = start, FIELD_START, 1
    while i < end:
        if st == QUOTED:
            k = int(np.searchsorted(Q, i))
            if k >= len(Q) or Q[k] >= end:
                return fields
            q = int(Q[k])
            if k + 1 < len(Q) and Q[k + 1] == q + 1 and q + 1 < end:
                i = q + 2
                continue
            i, st = q + 1, FIELD
            continue
        kq = int(np.searchsorted(Q, i))
        q = int(Q[kq]) if kq < len(Q) and Q[kq] < end else end
        kd = int(np.searchsorted(D, i))
        dl = int(D[kd]) if kd < len(D) and D[kd] < end else end
        if dl < q:
            fields += 1
            i, st = dl + 1, FIELD_START
            continue
        if q >= end:
            return fields
        if st == FIELD_START and q == i:
            i, st = q + 1, QUOTED
        else:
            i, st = q + 1, FIELD
    return fields
