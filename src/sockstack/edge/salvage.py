"""Salvage: the rows of a damaged SQLite database, read from its pages directly.

When SQLite itself reports a store corrupt, a relay moves the file aside and fills a new store
from what this module can still read (docs/EDGE.md, "Damage and healing"). It reads the file page
by page in the SQLite file format (https://www.sqlite.org/fileformat2.html) and does not follow
the b-trees from their roots (a damaged interior page would hide every row below it): it visits
each page once, keeps those whose type byte says *table leaf* (0x0D), and decodes each cell the
page's cell-pointer array names, following overflow chains. A cell whose bytes do not decode is
skipped and counted, never raised; the caller keeps a row only when its own checksum (a column of
the row, e.g. ``records.row_crc``) holds, since a flipped byte can also make a cell decode into
wrong values.

What it copes with:

* a damaged header: the page size (and the bytes reserved at each page's end) are checked
  against the pages themselves, and guessed from them when the header is wrong or destroyed;
* a truncated file, unreadable pages (an I/O error on one page skips that page), flipped cell
  pointers, varints, record headers, overflow pointers (a chain is followed at most as far as the
  payload needs, never outside the file and never in a cycle, and all chains together read at
  most about twice the file's pages: bounded time whatever the bytes);
* the write-ahead log (``path + "-wal"``): the committed frames whose salt and checksum hold are
  read, the newest version of each page winning over the main file, as SQLite itself would.

Memory is one page plus the payload of the cell being decoded (twice that while a value is copied
out of it; a payload is at most ``max_payload`` and never more than the file holds), and a map of
page numbers to WAL frames, one entry per page the WAL holds.

Index b-tree pages (0x0A, 0x02) are read only by :func:`salvage_index`: they hold the rows of
``WITHOUT ROWID`` tables, and the entries of ordinary indexes (the indexed columns then the rowid).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["SalvageReport", "salvage", "salvage_index", "salvage_report", "wal_report"]

_MAGIC = b"SQLite format 3\x00"
_PAGE_SIZES = tuple(1 << n for n in range(9, 17))  # 512 .. 65536
_TABLE_LEAF, _TABLE_INTERIOR, _INDEX_LEAF, _INDEX_INTERIOR = 0x0D, 0x05, 0x0A, 0x02
_BTREE_TYPES = frozenset((_TABLE_LEAF, _TABLE_INTERIOR, _INDEX_LEAF, _INDEX_INTERIOR))
_WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums little-endian, big-endian
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24
_SAMPLE_WINDOW = 256 * 1024  # page-size guess: bytes of each sampled stretch of the file
_SAMPLE_POINTERS = 64  # ...and cell pointers checked per page there
_CONTENT_SIZES = (0, 1, 2, 3, 4, 6, 8, 8, 0, 0)  # bytes of serial types 0..9 (10, 11 reserved)
_M32 = 0xFFFFFFFF
_ENCODINGS = {1: "utf-8", 2: "utf-16-le", 3: "utf-16-be"}  # the header's text encoding field
_u16 = struct.Struct(">H").unpack_from
_u32 = struct.Struct(">I").unpack_from
_f64 = struct.Struct(">d").unpack_from
_frame_header = struct.Struct(">6I").unpack_from


@dataclass
class SalvageReport:
    """What one salvage pass saw: filled in as the pass runs (pass one to :func:`salvage`), or
    returned by :func:`salvage_report`."""

    page_size: int = 0
    usable_size: int = 0
    """The page size less the bytes reserved at the end of each page."""
    geometry_from: str = ""
    """Where the page size came from: ``header``, ``wal`` (the WAL's header), ``guessed`` (the
    file's header is damaged: the size under which most pages parse) or ``default`` (4096:
    nothing parses under any size)."""
    header_ok: bool = False
    """The 100-byte header had its magic, a valid page size and its fixed bytes."""
    pages: int = 0
    """Pages of the database: the file's (a partial last page counts), or the size the newest
    committed WAL frame states."""
    pages_read: int = 0
    pages_unreadable: int = 0
    """Missing (a truncated file), short, or an I/O error."""
    pages_skipped: int = 0
    """Pages past ``max_bytes``: not read."""
    pages_from_wal: int = 0
    table_leaves: int = 0
    index_pages: int = 0
    pages_bad: int = 0
    """Leaf pages whose header is impossible (cell count beyond the page): their cells are still
    tried."""
    cells: int = 0
    """Cells decoded (and returned)."""
    cells_refused: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    """Refused cells by reason (a fixed, small set of reasons)."""
    overflow_pages_read: int = 0
    wal_frames: int = 0
    wal_frames_used: int = 0
    """Committed frames with a good salt and checksum (older versions of a page included)."""
    wal_frames_refused: int = 0
    """Frames with a bad salt or checksum, or written by a transaction that never committed."""
    wal_commits_after_damage: int = 0
    """Committed transactions in the WAL that follow a damaged frame (or a damaged WAL header).
    SQLite's own recovery stops at the first bad frame and would drop them without a word (and
    its next checkpoint deletes them): salvage still reads them."""
    wal_note: str = ""
    """Why the WAL was not read, when it exists and was not."""

    def _refuse(self, reason: str) -> None:
        self.cells_refused += 1
        self.refused[reason] = self.refused.get(reason, 0) + 1


def salvage(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = 1 << 34,
    max_payload: int = 1 << 30,
    wal: bool = True,
    report: SalvageReport | None = None,
) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """Every row of every table b-tree leaf page that can still be decoded: ``(rowid, values)``.

    Rows of every table come out (the schema's own rows too), in page order, with no table name:
    the caller tells its tables apart by their shape and checksum. A column declared ``INTEGER
    PRIMARY KEY`` is the rowid: its value in the record is NULL (``None``), the rowid holds it.
    A REAL column's whole value may be stored as an integer (SQLite does so to save room): it
    comes back as an ``int``. The same rowid may come twice (a stale copy of a page) and a row
    may be an older version of itself (when the newest copy of its page is damaged).

    Reads at most ``max_bytes`` of the file (and of its WAL), refuses a cell whose payload claims
    more than ``max_payload`` bytes, and reads ``path + "-wal"`` too unless ``wal`` is false.
    Raises only OSError, when the file cannot be opened (on first iteration: this is a
    generator); bad content is skipped and counted in ``report``."""
    for kind, rowid, values in _Salvager(path, max_bytes, max_payload, wal, report).scan(
        tables=True, indexes=False
    ):
        if kind == _TABLE_LEAF:
            yield rowid, values


def salvage_index(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = 1 << 34,
    max_payload: int = 1 << 30,
    wal: bool = True,
    report: SalvageReport | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Every record of every index b-tree page (leaf 0x0A and interior 0x02) that decodes.

    A ``WITHOUT ROWID`` table is an index b-tree: each of its rows is a record of its primary
    key columns followed by its other columns, in declaration order. The entries of ordinary
    indexes come out too (the indexed columns, then the rowid): the caller keeps what matches its
    shape and checksum. Same bounds and errors as :func:`salvage`."""
    for _kind, _rowid, values in _Salvager(path, max_bytes, max_payload, wal, report).scan(
        tables=False, indexes=True
    ):
        yield values


def salvage_report(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = 1 << 34,
    max_payload: int = 1 << 30,
    wal: bool = True,
) -> SalvageReport:
    """One pass over ``path`` (table and index pages) that only counts: pages read, bad and
    unreadable, cells decoded and refused (by reason), WAL frames used and refused."""
    report = SalvageReport()
    for _ in _Salvager(path, max_bytes, max_payload, wal, report).scan(tables=True, indexes=True):
        pass
    return report


def wal_report(path: str | os.PathLike[str], *, max_bytes: int = 1 << 34) -> SalvageReport:
    """Check ``path``'s WAL (``path + "-wal"``) without reading the database's pages: its frames
    used and refused, and :attr:`SalvageReport.wal_commits_after_damage`. Run it before SQLite
    opens a store that has a WAL: when that count is not 0, opening normally would lose those
    committed transactions, so salvage instead. Raises only OSError (the file cannot be read)."""
    report = SalvageReport()
    salvager = _Salvager(path, max_bytes, 1 << 30, True, report)
    for _ in salvager.scan(tables=False, indexes=False, pages=False):
        pass  # pragma: no cover - yields nothing
    return report


class _Refused(Exception):
    """A cell that does not decode (the reason is the message: one of a fixed set)."""


def _varint(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """SQLite's varint at ``pos`` (1 to 9 bytes, big-endian, 7 bits a byte but the ninth's 8):
    (value, position after it). Refused when it runs past ``end``."""
    if pos >= end:
        raise _Refused("varint past the end")
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    value = b & 0x7F
    stop = min(pos + 8, end)
    pos += 1
    while pos < stop:
        b = buf[pos]
        pos += 1
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, pos
    if pos >= end:
        raise _Refused("varint past the end")
    return (value << 8) | buf[pos], pos + 1


def _pread(f: IO[bytes], size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(f.fileno(), size, offset)
    f.seek(offset)  # pragma: no cover - platforms without pread
    return f.read(size)  # pragma: no cover


def _read_or_nothing(f: IO[bytes], size: int, offset: int) -> bytes:
    """What a damaged stretch (an I/O error) gives: nothing, so that it counts as bad bytes."""
    try:
        return _pread(f, size, offset)
    except OSError:
        return b""


def _wal_checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """The WAL's checksum (fileformat2 §4.3) of ``data`` (a multiple of 8 bytes) from (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for x0, x1 in zip(words[0::2], words[1::2], strict=True):
        s0 = (s0 + x0 + s1) & _M32
        s1 = (s1 + x1 + s0) & _M32
    return s0, s1


def _page_is_btree(head: bytes, offset: int, size: int) -> bool:
    """Whether ``head`` (the start of a page; its b-tree header at ``offset``) is a plausible
    b-tree page for a page size of ``size``: a known type, the cell-pointer array and the content
    area inside the page, the first cell pointers inside the content area."""
    if len(head) < offset + 12 or head[offset] not in _BTREE_TYPES:
        return False
    kind = head[offset]
    freeblock, ncells, content = struct.unpack_from(">HHH", head, offset + 1)
    content = content or 65536
    array_end = offset + (8 if kind in (_TABLE_LEAF, _INDEX_LEAF) else 12) + 2 * ncells
    if array_end > size or not array_end <= content <= size or head[offset + 7] > 60:
        return False
    if freeblock and not array_end <= freeblock <= size - 4:
        return False
    start = array_end - 2 * ncells
    for i in range(min(ncells, _SAMPLE_POINTERS, (len(head) - start) // 2)):
        if not content <= _u16(head, start + 2 * i)[0] <= size - 4:
            return False
    return True


def _leaf_usable(head: bytes, offset: int, page_size: int) -> list[int]:
    """The usable sizes a table-leaf page accounts for (none: it cannot tell). Every byte from
    the start of the content area to the end of the usable area is in a cell, a freeblock or a
    fragment, whatever was deleted from the page, so their sum is the usable size; a cell that
    spills keeps a part on the page whose size depends on the usable size, so each possible one
    is tried."""
    least = max(480, page_size - 255)
    try:
        freeblock, ncells, content, fragmented = struct.unpack_from(">HHHB", head, offset + 1)
        fixed = (content or 65536) + fragmented
        spilled: list[tuple[int, int]] = []  # (bytes before the payload, payload size)
        for i in range(ncells):
            ptr = _u16(head, offset + 8 + 2 * i)[0]
            n, pos = _varint(head, ptr, page_size)
            _rowid, pos = _varint(head, pos, page_size)
            if n <= least - 35:  # never spills, whatever the usable size
                fixed += max(4, pos + n - ptr)
            else:
                spilled.append((pos - ptr, n))
        for _ in range(page_size // 4):  # the freeblock chain, ascending
            if not freeblock:
                break
            following, size = struct.unpack_from(">HH", head, freeblock)
            if following and following <= freeblock + size:
                return []
            fixed += size
            freeblock = following
        else:
            return []
    except (_Refused, struct.error):
        return []
    if not spilled:
        return [fixed] if least <= fixed <= page_size else []
    return [u for u in range(least, page_size + 1) if fixed + _spilled_size(spilled, u) == u]


def _spilled_size(cells: list[tuple[int, int]], usable: int) -> int:
    """The bytes the cells of ``cells`` (head bytes, payload size) take on a table-leaf page of
    ``usable`` bytes (fileformat2 §1.6, the local payload rule)."""
    most = usable - 35
    least = (usable - 12) * 32 // 255 - 23
    total = 0
    for head, n in cells:
        if n <= most:
            total += max(4, head + n)
        else:
            local = least + (n - least) % (usable - 4)
            total += head + (local if local <= most else least) + 4
    return total


class _Salvager:
    """One pass over a database file (and its WAL): geometry, then every page once."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        max_payload: int,
        wal: bool,
        report: SalvageReport | None,
    ) -> None:
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.max_payload = max_payload
        self.use_wal = wal
        self.report = report if report is not None else SalvageReport()
        self.db: IO[bytes] | None = None
        self.wal: IO[bytes] | None = None
        self.frames: dict[int, int] = {}  # page number -> offset of its newest committed frame
        self.page_size = 4096
        self.usable = 4096
        self.encoding = "utf-8"
        self.npages = 0
        self.budget = 0  # overflow pages all chains together may still read

    # ------------------------------------------------------------------ the pass

    def scan(
        self, *, tables: bool, indexes: bool, pages: bool = True
    ) -> Iterator[tuple[int, int, tuple[Any, ...]]]:
        """(page kind, rowid or 0, values) of every cell that decodes, page by page (none and no
        page read unless ``pages``: the geometry and the WAL only)."""
        with contextlib.ExitStack() as files:
            self.db = files.enter_context(open(self.path, "rb", buffering=0))
            wal_path = self.path + "-wal"
            if self.use_wal and os.path.exists(wal_path):
                try:
                    self.wal = files.enter_context(open(wal_path, "rb", buffering=0))
                except OSError as exc:
                    self.report.wal_note = f"WAL not readable: {exc}"
            try:
                self._geometry()
                if pages:
                    yield from self._pages(tables, indexes)
            finally:
                self.db = self.wal = None

    def _pages(self, tables: bool, indexes: bool) -> Iterator[tuple[int, int, tuple[Any, ...]]]:
        report = self.report
        for pgno in range(1, self.npages + 1):
            page = self._page(pgno)
            report.pages_read += 1
            offset = 100 if pgno == 1 else 0
            if page is None or len(page) < offset + 8:
                report.pages_unreadable += 1
                continue
            kind = page[offset]
            if kind == _TABLE_LEAF and tables:
                report.table_leaves += 1
                yield from self._cells(page, offset, kind)
            elif kind in (_INDEX_LEAF, _INDEX_INTERIOR) and indexes:
                report.index_pages += 1
                yield from self._cells(page, offset, kind)

    def _page(self, pgno: int) -> bytes | None:
        """Page ``pgno`` (from 1): the newest committed WAL frame of it, else the main file's;
        None when neither has it (or it cannot be read). A partial last page comes back short."""
        try:
            frame = self.frames.get(pgno)
            if frame is not None and self.wal is not None:
                page = _pread(self.wal, self.page_size, frame + _WAL_FRAME_HEADER)
                if len(page) == self.page_size:
                    self.report.pages_from_wal += 1
                    return page
            assert self.db is not None
            page = _pread(self.db, self.page_size, (pgno - 1) * self.page_size)
        except OSError:
            return None
        return page or None

    # ------------------------------------------------------------------ cells

    def _cells(
        self, page: bytes, offset: int, kind: int
    ) -> Iterator[tuple[int, int, tuple[Any, ...]]]:
        report = self.report
        end = min(self.usable, len(page))
        leaf = kind in (_TABLE_LEAF, _INDEX_LEAF)
        array = offset + (8 if leaf else 12)
        ncells = _u16(page, offset + 3)[0]
        most = max(0, (end - array) // 2)
        if ncells > most:
            report.pages_bad += 1
            ncells = most
        seen: set[int] = set()
        for i in range(ncells):
            ptr = _u16(page, array + 2 * i)[0]
            if ptr in seen:
                report._refuse("cell pointer repeated")
                continue
            seen.add(ptr)
            try:
                if ptr < array or ptr >= end:
                    raise _Refused("cell pointer outside the page")
                if kind == _TABLE_LEAF:
                    rowid, values = self._table_cell(page, ptr, end)
                else:
                    rowid, values = 0, self._index_cell(page, ptr if leaf else ptr + 4, end)
            except _Refused as refused:
                report._refuse(str(refused))
                continue
            report.cells += 1
            yield kind, rowid, values

    def _table_cell(self, page: bytes, ptr: int, end: int) -> tuple[int, tuple[Any, ...]]:
        n, pos = _varint(page, ptr, end)
        rowid, pos = _varint(page, pos, end)
        if rowid >= 1 << 63:
            rowid -= 1 << 64
        return rowid, self._payload(page, pos, end, n, self.usable - 35)

    def _index_cell(self, page: bytes, ptr: int, end: int) -> tuple[Any, ...]:
        n, pos = _varint(page, ptr, end)
        return self._payload(page, pos, end, n, (self.usable - 12) * 64 // 255 - 23)

    def _payload(self, page: bytes, pos: int, end: int, n: int, most_local: int) -> tuple[Any, ...]:
        """The record of a payload of ``n`` bytes starting at ``pos``: on the page, or its first
        part there and the rest in overflow pages (fileformat2 §1.6: the local size rule)."""
        if n > self.max_payload:
            raise _Refused("payload larger than max_payload")
        if n <= most_local:
            if pos + n > end:
                raise _Refused("cell past the end of the page")
            return _record(page, pos, n, self.encoding)
        usable = self.usable
        least = (usable - 12) * 32 // 255 - 23
        local = least + (n - least) % (usable - 4)
        if local > most_local:
            local = least
        if pos + local + 4 > end:
            raise _Refused("cell past the end of the page")
        if n - local > self.npages * (usable - 4):  # before allocating the payload
            raise _Refused("payload larger than the file")
        head = page[pos : pos + local]
        if _record_header_fits(head, n) is False:  # None: the header itself spills; check later
            raise _Refused("record header does not match the payload size")
        payload = bytearray(n)  # one allocation: the chain is copied into it
        payload[:local] = head
        self._overflow(payload, local, _u32(page, pos + local)[0])
        return _record(payload, 0, n, self.encoding)

    def _overflow(self, payload: bytearray, filled: int, pgno: int) -> None:
        """Fill ``payload`` past its first ``filled`` bytes from the overflow chain starting at
        ``pgno``: never a page outside the database, never one twice, never past the budget."""
        chain: set[int] = set()
        room = self.usable - 4
        n = len(payload)
        while filled < n:
            if not 1 <= pgno <= self.npages:
                raise _Refused("overflow page outside the file")
            if pgno in chain:
                raise _Refused("overflow chain loops")
            if self.budget <= 0:
                raise _Refused("overflow budget spent")
            chain.add(pgno)
            self.budget -= 1
            self.report.overflow_pages_read += 1
            page = self._page(pgno)
            take = min(n - filled, room)
            if page is None or len(page) < 4 + take:
                raise _Refused("overflow page missing")
            payload[filled : filled + take] = memoryview(page)[4 : 4 + take]
            filled += take
            pgno = _u32(page, 0)[0]

    # ------------------------------------------------------------------ geometry

    def _geometry(self) -> None:
        """Page size, usable size, text encoding and page count: from the header when it agrees
        with the pages, else from the WAL's header, else guessed from the pages."""
        assert self.db is not None
        report = self.report
        size = os.fstat(self.db.fileno()).st_size
        header = _read_or_nothing(self.db, 100, 0)
        raw = _u16(header, 16)[0] if len(header) >= 18 else 0
        stated = 65536 if raw == 1 else raw
        report.header_ok = ok = (
            len(header) == 100
            and header[:16] == _MAGIC
            and stated in _PAGE_SIZES
            and header[21:24] == b"\x40\x20\x20"
        )
        wal_size = self._wal_page_size()
        scores = {p: self._score(size, p) for p in _PAGE_SIZES}
        best = max(scores.values())
        if ok and scores[stated] == best:
            page_size, source = stated, "header"
        elif wal_size and scores[wal_size] == best:
            page_size, source = wal_size, "wal"
        elif best > 0:
            page_size, source = min(p for p in _PAGE_SIZES if scores[p] == best), "guessed"
        elif ok:
            page_size, source = stated, "header"
        else:
            page_size, source = wal_size or 4096, "wal" if wal_size else "default"
        self.page_size = report.page_size = page_size
        report.geometry_from = source
        self.usable = report.usable_size = self._usable(size, header if ok else None)
        npages = -(-size // page_size)
        committed = self._read_wal() if self.wal is not None else 0
        if committed:
            npages = committed
        limit = max(0, self.max_bytes // page_size)
        if npages > limit:
            report.pages_skipped = npages - limit
            npages = limit
        self.npages = report.pages = npages
        self.budget = 2 * npages + 64
        self.encoding = self._encoding(_u32(header, 56)[0] if ok else 0)

    def _score(self, size: int, page_size: int) -> int:
        """How many pages in the sampled stretches of the file parse as b-tree pages when pages
        are ``page_size`` bytes."""
        assert self.db is not None
        count = 0
        for start, stop in _windows(size):
            for at in range(start, stop, page_size):
                head = _read_or_nothing(self.db, 12 + 2 * _SAMPLE_POINTERS + 100 * (at == 0), at)
                count += _page_is_btree(head, 100 if at == 0 else 0, page_size)
        return count

    def _usable(self, size: int, header: bytes | None) -> int:
        """The page size less the bytes reserved at each page's end: the header's unless the
        leaf pages clearly account for another (:func:`_leaf_usable`)."""
        assert self.db is not None
        page_size = self.page_size
        votes: Counter[int] = Counter()
        for start, stop in _windows(size):
            for at in range(start - start % page_size, stop, page_size):
                offset = 100 if at == 0 else 0
                head = _read_or_nothing(self.db, page_size, at)
                if _page_is_btree(head, offset, page_size) and head[offset] == _TABLE_LEAF:
                    votes.update(_leaf_usable(head, offset, page_size))
        stated = page_size - header[20] if header is not None else None
        if stated is not None and stated < 480:
            stated = None
        if votes:
            usable, n = votes.most_common(1)[0]
            if stated is None or (n >= 2 and votes[stated] * 2 < n):
                return usable
        return stated if stated is not None else page_size

    def _encoding(self, stated: int) -> str:
        """The text encoding: the one under which the schema's first row on page 1 reads as a
        schema row (its type is "table", "index", "view" or "trigger"), else the header's (1
        UTF-8, 2 UTF-16le, 3 UTF-16be), else UTF-8."""
        named = _ENCODINGS.get(stated, "utf-8")
        page = self._page(1) if self.npages else None
        if page is None or len(page) < 110 or page[100] != _TABLE_LEAF or _u16(page, 103)[0] == 0:
            return named
        for encoding in dict.fromkeys((named, *_ENCODINGS.values())):
            try:
                self.encoding = encoding
                _rowid, values = self._table_cell(page, _u16(page, 108)[0], self.usable)
            except (_Refused, struct.error):
                continue
            if values and values[0] in ("table", "index", "view", "trigger"):
                return encoding
        return named

    # ------------------------------------------------------------------ WAL

    def _wal_page_size(self) -> int:
        """The WAL header's page size when its magic and checksum hold (0 otherwise)."""
        if self.wal is None:
            return 0
        try:
            header = _pread(self.wal, _WAL_HEADER, 0)
        except OSError:
            return 0
        if len(header) < _WAL_HEADER or _u32(header, 0)[0] not in _WAL_MAGIC:
            return 0
        big = _u32(header, 0)[0] == _WAL_MAGIC[1]
        if _wal_checksum(header[:24], 0, 0, big) != struct.unpack_from(">II", header, 24):
            return 0
        page_size = _u32(header, 8)[0]
        return page_size if page_size in _PAGE_SIZES else 0

    def _read_wal(self) -> int:
        """Map each page to its newest committed WAL frame whose salt and checksum hold; return
        the database size in pages the newest such commit states (0: the WAL adds nothing).

        A frame's checksum is checked from the stored checksum of the frame before it, so one
        damaged frame costs that frame (and the next, when the damage is in its stored
        checksum), not the rest of the log as in SQLite's own recovery. Every frame before
        a good commit frame was committed (a writer only appends after the last commit), so
        frames of a transaction whose own commit frame is damaged count from the next good
        commit on; frames after the last good commit are a transaction that never committed."""
        assert self.wal is not None
        report = self.report
        try:
            wal_bytes = os.fstat(self.wal.fileno()).st_size
            header = _pread(self.wal, _WAL_HEADER, 0)
        except OSError as exc:
            report.wal_note = f"WAL not readable: {exc}"
            return 0
        if wal_bytes == 0:
            return 0
        magic = _u32(header, 0)[0] if len(header) == _WAL_HEADER else 0
        if magic not in _WAL_MAGIC:
            report.wal_note = "WAL header damaged (magic): its frames are not read"
            return 0
        if _u32(header, 8)[0] != self.page_size:
            report.wal_note = "WAL page size differs from the database's: its frames are not read"
            return 0
        big = magic == _WAL_MAGIC[1]
        salts = header[16:24]
        prev = struct.unpack_from(">II", header, 24)
        damaged = _wal_checksum(header[:24], 0, 0, big) != prev  # SQLite then ignores the WAL
        frame_size = _WAL_FRAME_HEADER + self.page_size
        nframes = min(wal_bytes, self.max_bytes) - _WAL_HEADER
        nframes = max(0, nframes // frame_size)
        report.wal_frames = nframes
        pending: dict[int, int] = {}
        npending = 0
        committed = 0
        for k in range(nframes):
            at = _WAL_HEADER + k * frame_size
            try:
                frame = _pread(self.wal, frame_size, at)
            except OSError:
                frame = b""
            if len(frame) < frame_size:
                report.wal_frames_refused += 1
                damaged = True
                continue
            pgno, commit, _s1, _s2, c0, c1 = _frame_header(frame, 0)
            good = (
                frame[8:16] == salts
                and pgno >= 1
                and _wal_checksum(frame[:8] + frame[24:], prev[0], prev[1], big) == (c0, c1)
            )
            prev = (c0, c1)
            if not good:
                report.wal_frames_refused += 1
                damaged = True  # SQLite's recovery ends here
                continue
            pending[pgno] = at
            npending += 1
            if commit:
                report.wal_commits_after_damage += damaged
                self.frames.update(pending)
                report.wal_frames_used += npending
                pending.clear()
                npending = 0
                committed = commit
        report.wal_frames_refused += npending
        return committed


def _windows(size: int) -> list[tuple[int, int]]:
    """The stretches of a file of ``size`` bytes sampled to tell its page size: the whole file
    when small, else four stretches spread over it, each starting on a 64 KiB boundary."""
    if size <= 4 * _SAMPLE_WINDOW:
        return [(0, size)]
    starts = (0, size // 3, 2 * size // 3, size - _SAMPLE_WINDOW)
    spans = [(s - s % 65536, s - s % 65536 + _SAMPLE_WINDOW) for s in starts]
    return [(a, min(b, size)) for a, b in dict.fromkeys(spans)]


def _record_header_fits(head: bytes, n: int) -> bool | None:
    """Whether the record header at the start of ``head`` states a record of ``n`` bytes (None:
    the header runs past ``head``, so it cannot be told yet)."""
    try:
        hsize, pos = _varint(head, 0, len(head))
        if hsize > len(head):
            return None
        total = hsize
        while pos < hsize:
            t, pos = _varint(head, pos, hsize)
            total += _content_size(t)
    except _Refused:
        return False
    return pos == hsize and total == n


def _content_size(t: int) -> int:
    if t >= 12:
        return (t - 12) >> 1
    if t >= 10:
        raise _Refused("reserved serial type")
    return _CONTENT_SIZES[t]


def _record(buf: bytes | bytearray, start: int, n: int, encoding: str) -> tuple[Any, ...]:
    """The values of the record of ``n`` bytes at ``start`` (fileformat2 §2.1): refused when its
    header does not add up to exactly ``n`` bytes or a text is not valid in ``encoding``."""
    end = start + n
    hsize, pos = _varint(buf, start, end)
    hend = start + hsize
    if hsize < 1 or hend > end:
        raise _Refused("record header size impossible")
    types: list[int] = []
    body = hend
    while pos < hend:
        t, pos = _varint(buf, pos, hend)
        body += _content_size(t)
        types.append(t)
    if pos != hend or body != end:
        raise _Refused("record header does not match the payload size")
    values: list[Any] = []
    pos = hend
    for t in types:
        if t == 0:
            values.append(None)
        elif t <= 6:
            size = _CONTENT_SIZES[t]
            values.append(int.from_bytes(buf[pos : pos + size], "big", signed=True))
            pos += size
        elif t == 7:
            values.append(_f64(buf, pos)[0])
            pos += 8
        elif t <= 9:
            values.append(t - 8)
        else:
            size = (t - 12) >> 1
            data = bytes(memoryview(buf)[pos : pos + size])  # one copy, from a page or payload
            pos += size
            if t & 1:
                try:
                    values.append(data.decode(encoding))
                except UnicodeDecodeError:
                    raise _Refused("text not valid in the database's encoding") from None
            else:
                values.append(data)
    return tuple(values)
