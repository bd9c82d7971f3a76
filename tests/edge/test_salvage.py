"""edge.salvage on real SQLite files: intact, with flipped bytes, a destroyed header, truncated,
WITHOUT ROWID tables, a write-ahead log (committed, uncommitted, damaged), and bounded memory.

Which page holds which row comes from SQLite itself (the dbstat virtual table), not from the
reader under test: a row whose leaf and overflow pages were all left alone must come back."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockstack.edge.records import Row, row_crc
from sockstack.edge.salvage import (
    SalvageReport,
    salvage,
    salvage_index,
    salvage_report,
    wal_report,
)

OUTBOX = (
    "CREATE TABLE outbox(id INTEGER PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL,"
    " time REAL NOT NULL, body BLOB NOT NULL, crc INTEGER NOT NULL)"
)
POSITIONS = (
    "CREATE TABLE positions(source TEXT PRIMARY KEY, epoch INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, crc INTEGER NOT NULL)"
)
META = "CREATE TABLE meta(key TEXT PRIMARY KEY, value BLOB NOT NULL, crc INTEGER NOT NULL)"

Rows = dict[int, tuple[Any, ...]]


def _has_dbstat() -> bool:
    con = sqlite3.connect(":memory:")
    try:
        return any("DBSTAT" in opt for (opt,) in con.execute("PRAGMA compile_options"))
    finally:
        con.close()


needs_dbstat = pytest.mark.skipif(
    not _has_dbstat(), reason="this SQLite has no dbstat table to tell which page holds a row"
)


def _connect(path: Path, page_size: int = 4096) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"PRAGMA page_size={page_size}")
    con.execute("PRAGMA auto_vacuum=INCREMENTAL")  # as the relay's store (pointer-map pages)
    con.execute("PRAGMA secure_delete=ON")
    return con


def _outbox_rows(n: int, seed: int, big_every: int, first: int = 1) -> Rows:
    """Rows as the relay stores them (id as rowid, so NULL in the record); every ``big_every``th
    body is larger than a page (an overflow chain)."""
    rng = random.Random(seed)
    rows: Rows = {}
    for i in range(first, first + n):
        stream = f"site{rng.randrange(10)}/dév{rng.randrange(100)}"
        seq = rng.randrange(-(2**40), 2**62)
        t = rng.choice((rng.uniform(0, 2e9), float(rng.randrange(0, 2**31))))  # whole REAL too
        size = rng.randrange(5000, 20000) if i % big_every == 0 else rng.randrange(0, 300)
        body = rng.randbytes(size)
        rows[i] = (None, stream, seq, t, body, row_crc(i, stream, seq, t, body))
    return rows


def _insert(con: sqlite3.Connection, rows: Rows) -> None:
    con.executemany(
        "INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?)", [(i, *r[1:]) for i, r in rows.items()]
    )


def _position_crc(source: str, epoch: int, seq: int) -> int:
    return zlib.crc32(struct.pack(">qq", epoch, seq) + source.encode())


def _build(
    path: Path, n: int, *, page_size: int = 4096, seed: int = 1, big_every: int = 50
) -> Rows:
    """A store like the relay's: outbox rows, positions and meta rows (each with a crc)."""
    rows = _outbox_rows(n, seed, big_every)
    con = _connect(path, page_size)
    for sql in (OUTBOX, POSITIONS, META):
        con.execute(sql)
    con.execute("BEGIN")
    _insert(con, rows)
    con.executemany(
        "INSERT INTO positions VALUES (?, ?, ?, ?)",
        [(f"dev{i}", 1, i * 7, _position_crc(f"dev{i}", 1, i * 7)) for i in range(200)],
    )
    con.execute("INSERT INTO meta VALUES ('origin', x'0102', 7)")
    con.execute("COMMIT")
    con.close()
    return rows


def _row_pages(path: Path, table: str = "outbox") -> dict[int, set[int]]:
    """rowid -> the pages holding its cell and its overflow chain, as SQLite's dbstat says."""
    con = sqlite3.connect(path)
    try:
        stat = con.execute(
            "SELECT path, pageno, pagetype, ncell FROM dbstat WHERE name = ? ORDER BY path",
            (table,),
        ).fetchall()
        rowids = [r for (r,) in con.execute(f"SELECT rowid FROM {table} ORDER BY rowid")]
    finally:
        con.close()
    overflow: dict[tuple[str, int], set[int]] = {}
    for where, pageno, kind, _ in stat:
        if kind == "overflow":
            cell = where.rsplit("/", 1)
            overflow.setdefault((cell[0] + "/", int(cell[1].split("+")[0], 16)), set()).add(pageno)
    pages: dict[int, set[int]] = {}
    it = iter(rowids)
    for where, pageno, kind, ncell in stat:
        if kind == "leaf":
            for cell in range(ncell):
                pages[next(it)] = {pageno} | overflow.get((where, cell), set())
    assert len(pages) == len(rowids)
    return pages


def _outbox_of(found: Iterator[tuple[int, tuple[Any, ...]]]) -> list[tuple[int, tuple[Any, ...]]]:
    """The salvaged rows shaped like an outbox row (the caller's filter)."""
    return [(rowid, v) for rowid, v in found if len(v) == 6 and v[0] is None]


def _norm(v: tuple[Any, ...]) -> tuple[Any, ...]:
    """An outbox row's values with its time as a float (SQLite stores a whole REAL as an
    integer: it reads back as a float, and so does the relay)."""
    return (None, v[1], v[2], float(v[3]), v[4], v[5])


def _intact(rowid: int, v: tuple[Any, ...]) -> bool:
    _, stream, seq, t, body, crc = v
    if not (
        isinstance(stream, str)
        and isinstance(seq, int)
        and isinstance(t, (int, float))
        and isinstance(body, bytes)
        and isinstance(crc, int)
    ):
        return False
    return Row(rowid, stream, seq, float(t), body, crc).intact()


def _check_damaged(path: Path, rows: Rows, pages: dict[int, set[int]], touched: set[int]) -> int:
    """Salvage ``path``: every row whose checksum holds is one inserted with those exact values,
    and every row none of whose pages were touched comes back. Returns the rows kept."""
    report = SalvageReport()
    kept: dict[int, tuple[Any, ...]] = {}
    for rowid, v in _outbox_of(salvage(path, report=report)):
        if _intact(rowid, v):
            assert rowid in rows and _norm(v) == rows[rowid]
            kept[rowid] = v
    missing = [r for r, on in pages.items() if not on & touched and r not in kept]
    assert not missing, (touched, report)
    assert report.overflow_pages_read <= 2 * report.pages + 64
    assert report.pages_read <= report.pages
    return len(kept)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Rows]:
    """10,000 rows (every 50th with a body of 5-20 KB: overflow chains), 4 KiB pages."""
    path = tmp_path_factory.mktemp("salvage") / "edge.db"
    return path, _build(path, 10_000)


# ---------------------------------------------------------------------------- intact


def test_an_intact_store_gives_back_exactly_every_row(store: tuple[Path, Rows]) -> None:
    path, rows = store
    report = SalvageReport()
    found = list(salvage(path, report=report))
    outbox = _outbox_of(iter(found))
    assert len(outbox) == len(rows)  # each once
    assert {rowid: _norm(v) for rowid, v in outbox} == rows
    assert all(_intact(rowid, v) for rowid, v in outbox)
    positions = {v[0]: v for _, v in found if len(v) == 4}
    assert len(positions) == 200
    assert all(_position_crc(s, e, q) == c for s, e, q, c in positions.values())
    assert [v for _, v in found if len(v) == 3] == [("origin", b"\x01\x02", 7)]
    schema = {v[1] for _, v in found if len(v) == 5 and v[0] == "table"}
    assert schema == {"outbox", "positions", "meta"}
    assert report.header_ok and report.geometry_from == "header"
    assert (report.page_size, report.usable_size) == (4096, 4096)
    assert report.cells_refused == 0 and report.pages_unreadable == 0
    assert report.overflow_pages_read > 0


@pytest.mark.parametrize("page_size", [512, 1024, 8192, 65536])
def test_every_page_size(tmp_path: Path, page_size: int) -> None:
    rows = _build(tmp_path / "p.db", 600, page_size=page_size, big_every=20)
    report = SalvageReport()
    got = {rowid: v for rowid, v in _outbox_of(salvage(tmp_path / "p.db", report=report))}
    assert got.keys() == rows.keys() and all(_intact(r, v) for r, v in got.items())
    assert report.page_size == page_size and report.cells_refused == 0


def test_every_serial_type_decodes_as_sqlite_reads_it(tmp_path: Path) -> None:
    """NULL, integers of 1/2/3/4/6/8 bytes (both signs, the 0 and 1 constants), floats, text
    (UTF-8 beyond ASCII), blobs (empty too), and rowids from most negative to most positive."""
    path = tmp_path / "types.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t(v)")
    values: list[Any] = [None, 0, 1, -1, 127, -128, 32767, -32768, 2**23 - 1, -(2**23)]
    values += [2**31 - 1, -(2**31), 2**47 - 1, -(2**47), 2**63 - 1, -(2**63), 1.5, -0.0, 1e308]
    values += ["", "é€😀", b"", b"\x00\xff", "x" * 5000, b"y" * 70000]
    rowids = [-(2**63), -1, 0, 2**63 - 1, *range(1, len(values) - 3)]
    con.executemany("INSERT INTO t(rowid, v) VALUES (?, ?)", zip(rowids, values, strict=True))
    con.commit()
    truth = dict(con.execute("SELECT rowid, v FROM t"))
    con.close()
    got = {rowid: v[0] for rowid, v in salvage(path) if len(v) == 1}
    assert got == truth
    assert all(type(got[r]) is type(truth[r]) for r in truth)


def test_a_text_encoding_of_utf16_is_read(tmp_path: Path) -> None:
    path = tmp_path / "utf16.db"
    con = sqlite3.connect(path)
    con.execute("PRAGMA encoding='UTF-16be'")
    con.execute("CREATE TABLE t(v)")
    con.executemany("INSERT INTO t VALUES (?)", [("név",), ("😀" * 3000,)])
    con.commit()
    con.close()
    assert [v for _, v in salvage(path) if len(v) == 1] == [("név",), ("😀" * 3000,)]


# ---------------------------------------------------------------------------- damage


@needs_dbstat
def test_flipped_bytes_never_raise_and_keep_every_untouched_row(
    store: tuple[Path, Rows], tmp_path: Path
) -> None:
    """Seeded trials on the 10,000-row store: a few flipped bytes anywhere (header, interior,
    leaf, overflow, pointer-map pages), or a burst of garbage over part of a page."""
    path, rows = store
    pages = _row_pages(path)
    pristine = path.read_bytes()
    size = len(pristine)
    rng = random.Random(15)
    damaged = tmp_path / "damaged.db"
    for trial in range(12):
        data = bytearray(pristine)
        spots = [rng.randrange(size) for _ in range(rng.randrange(1, 12))]
        if trial % 3 == 2:  # a burst over up to 512 bytes
            start = rng.randrange(size - 512)
            spots += range(start, start + rng.randrange(1, 512))
        for at in spots:
            data[at] ^= rng.randrange(1, 256)
        damaged.write_bytes(data)
        kept = _check_damaged(damaged, rows, pages, {at // 4096 + 1 for at in spots})
        assert kept >= len(rows) * 0.9


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Rows, dict[int, set[int]]]:
    """400 rows on 512-byte pages (many pages, many overflow chains): cheap trials."""
    path = tmp_path_factory.mktemp("salvage-small") / "small.db"
    rows = _build(path, 400, page_size=512, seed=2, big_every=7)
    return path.read_bytes(), rows, _row_pages(path)


@needs_dbstat
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=40)
)
def test_any_flipped_bytes_keep_every_untouched_row(
    small: tuple[bytes, Rows, dict[int, set[int]]],
    tmp_path_factory: pytest.TempPathFactory,
    flips: list[tuple[float, int]],
) -> None:
    pristine, rows, pages = small
    data = bytearray(pristine)
    spots = [int(where * len(data)) for where, _ in flips]
    for at, (_, xor) in zip(spots, flips, strict=True):
        data[at] ^= xor
    damaged = tmp_path_factory.mktemp("flip") / "d.db"
    damaged.write_bytes(data)
    _check_damaged(damaged, rows, pages, {at // 512 + 1 for at in spots})


@needs_dbstat
@pytest.mark.parametrize("offset", [16, 17, 18, 20, 21, 28, 59])
def test_a_flipped_header_field_loses_nothing(
    store: tuple[Path, Rows], tmp_path: Path, offset: int
) -> None:
    """The page size, reserved bytes, payload fractions, page count, text encoding: each checked
    against the pages, so a flip in the header costs no row (page 1 holds only the schema)."""
    path, rows = store
    pages = _row_pages(path)
    damaged = tmp_path / "h.db"
    for xor in (0x01, 0x02, 0x03, 0x18, 0x30, 0xFF):  # 4096 -> 2048, 8192; UTF-8 -> UTF-16
        data = bytearray(path.read_bytes())
        data[offset] ^= xor
        damaged.write_bytes(data)
        assert _check_damaged(damaged, rows, pages, {1}) == len(rows)


@pytest.mark.parametrize("page_size", [512, 1024, 4096, 8192, 65536])
@pytest.mark.parametrize("how", ["zeros", "garbage", "wrong size"])
def test_a_destroyed_header_still_recovers(tmp_path: Path, page_size: int, how: str) -> None:
    path = tmp_path / "h.db"
    rows = _build(path, 400, page_size=page_size, big_every=9)
    data = bytearray(path.read_bytes())
    if how == "zeros":
        data[:100] = bytes(100)
    elif how == "garbage":
        data[:100] = random.Random(page_size).randbytes(100)
    else:  # a sane-looking header that states another page size
        data[16:18] = struct.pack(">H", 1024 if page_size != 1024 else 4096)
    path.write_bytes(data)
    report = SalvageReport()
    got = dict(_outbox_of(salvage(path, report=report)))
    assert got.keys() == rows.keys() and all(_intact(r, v) for r, v in got.items())
    assert report.page_size == page_size and report.geometry_from == "guessed"


@needs_dbstat
def test_a_truncated_file(store: tuple[Path, Rows], tmp_path: Path) -> None:
    path, rows = store
    pages = _row_pages(path)
    pristine = path.read_bytes()
    rng = random.Random(4)
    cut_file = tmp_path / "cut.db"
    for cut in [0, 1, 99, 4096, 4097] + [rng.randrange(len(pristine)) for _ in range(4)]:
        cut_file.write_bytes(pristine[:cut])
        whole = cut // 4096
        gone = set(range(whole + 1, len(pristine) // 4096 + 1))
        if cut:
            assert _check_damaged(cut_file, rows, pages, gone) >= 0
        else:
            assert list(salvage(cut_file)) == []


@needs_dbstat
def test_an_overflow_chain_that_loops_is_refused_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "loop.db"
    rows = _build(path, 300, page_size=512, big_every=10)
    pages = _row_pages(path)
    victim = next(r for r, on in pages.items() if len(on) >= 4)
    chain = sorted(pages[victim])[1:]
    data = bytearray(path.read_bytes())
    for pgno in chain:  # every overflow page of the row points back at the first one
        data[(pgno - 1) * 512 : (pgno - 1) * 512 + 4] = struct.pack(">I", chain[0])
    path.write_bytes(data)
    report = SalvageReport()
    got = dict(_outbox_of(salvage(path, report=report)))
    assert victim not in got and got.keys() == rows.keys() - {victim}
    assert report.refused == {"overflow chain loops": 1}


def test_an_unreadable_file_raises_oserror_and_nothing_else(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(salvage(tmp_path / "absent.db"))
    with pytest.raises(IsADirectoryError):
        list(salvage(tmp_path))
    junk = tmp_path / "junk.db"
    junk.write_bytes(random.Random(1).randbytes(300_000))
    report = salvage_report(junk)
    assert report.geometry_from in ("guessed", "default") and report.pages_read == report.pages


def test_max_bytes_bounds_what_is_read(store: tuple[Path, Rows]) -> None:
    path, rows = store
    report = SalvageReport()
    got = _outbox_of(salvage(path, max_bytes=1 << 20, report=report))
    assert report.pages == 256 and report.pages_skipped > 0
    assert 0 < len(got) < len(rows) and all(_intact(r, v) for r, v in got)


def test_max_payload_refuses_larger_cells(store: tuple[Path, Rows]) -> None:
    path, rows = store
    report = SalvageReport()
    got = _outbox_of(salvage(path, max_payload=4000, report=report))
    assert len(got) == sum(len(r[4]) < 3900 for r in rows.values())
    assert report.refused["payload larger than max_payload"] == len(rows) - len(got)


# ---------------------------------------------------------------------------- WITHOUT ROWID


def test_without_rowid_tables_come_back_from_index_pages(tmp_path: Path) -> None:
    """A WITHOUT ROWID table's rows (primary key columns first, then the others, as the record
    holds them), with values long enough to spill from index pages, leaf and interior."""
    path = tmp_path / "wr.db"
    con = _connect(path)
    con.execute(
        "CREATE TABLE state(value BLOB NOT NULL, crc INTEGER NOT NULL, stage TEXT NOT NULL,"
        " key BLOB NOT NULL, PRIMARY KEY(stage, key)) WITHOUT ROWID"
    )
    con.execute(OUTBOX)
    con.execute("CREATE INDEX by_stream ON outbox(stream)")
    rng = random.Random(3)
    state = {
        (f"stage{i % 7}", rng.randbytes(2000 if i % 50 == 0 else 8) + bytes([i % 256])): (
            rng.randbytes(rng.randrange(0, 6000 if i % 30 == 0 else 50)),
            i,
        )
        for i in range(3000)
    }
    con.execute("BEGIN")
    con.executemany(
        "INSERT INTO state VALUES (?, ?, ?, ?)", [(v, c, s, k) for (s, k), (v, c) in state.items()]
    )
    rows = _outbox_rows(200, 5, 1000)
    _insert(con, rows)
    con.execute("COMMIT")
    con.close()
    records = list(salvage_index(path))
    got = {(s, k): (v, c) for s, k, v, c in (r for r in records if len(r) == 4)}
    assert got == state and sum(len(r) == 4 for r in records) == len(state)
    entries = [r for r in records if len(r) == 2]  # the index on outbox(stream): stream, rowid
    assert sorted(entries) == sorted((r[1], i) for i, r in rows.items())
    assert all(len(v) != 4 for _, v in salvage(path))  # not a table leaf's row


# ---------------------------------------------------------------------------- WAL


def _wal_store(path: Path) -> sqlite3.Connection:
    con = _connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute(OUTBOX)
    return con


def _snapshot(path: Path, to: Path) -> None:
    """Copy a live database and its WAL, as a crash would leave them."""
    shutil.copyfile(path, to)
    if os.path.exists(f"{path}-wal"):
        shutil.copyfile(f"{path}-wal", f"{to}-wal")


def _read_back(path: Path, to: Path) -> Rows:
    """What SQLite itself reads from a copy of ``path`` (it replays the WAL)."""
    _snapshot(path, to)
    con = sqlite3.connect(to)
    try:
        return {r[0]: (None, *r[1:]) for r in con.execute("SELECT * FROM outbox")}
    finally:
        con.close()


def test_committed_transactions_in_the_wal_are_read(tmp_path: Path) -> None:
    """Inserts, updates and deletes in the WAL: the newest version of each page wins, so the
    result is exactly what SQLite reads; without the WAL, the main file's older state."""
    live = tmp_path / "live.db"
    con = _wal_store(live)
    rows = _outbox_rows(1500, 6, 40)
    _insert(con, rows)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the main file holds these
    con.execute("BEGIN")
    _insert(con, _outbox_rows(1500, 7, 40, first=1501))
    con.execute("DELETE FROM outbox WHERE id % 3 = 0")
    con.execute("UPDATE outbox SET seq = seq + 1, crc = 0 WHERE id % 5 = 0")
    con.execute("COMMIT")
    truth = _read_back(live, tmp_path / "truth.db")
    crashed = tmp_path / "crashed.db"
    _snapshot(live, crashed)
    con.close()
    report = SalvageReport()
    got = _outbox_of(salvage(crashed, report=report))
    assert len(got) == len(truth) and dict(got) == truth
    assert report.wal_frames_used > 0 and report.wal_frames_refused == 0
    assert report.pages_from_wal > 0
    assert dict(_outbox_of(salvage(crashed, wal=False))) == rows


def test_frames_of_a_transaction_that_never_committed_are_not_read(tmp_path: Path) -> None:
    """A transaction larger than the page cache spills pages into the WAL before its commit:
    a crash then leaves frames no commit frame follows. Salvage reads none of them."""
    live = tmp_path / "live.db"
    con = _wal_store(live)
    con.execute("PRAGMA cache_size=8")  # pages: a big transaction spills
    _insert(con, _outbox_rows(500, 8, 25))
    truth = _read_back(live, tmp_path / "truth.db")
    con.execute("BEGIN")
    _insert(con, _outbox_rows(3000, 9, 25, first=501))
    con.execute("DELETE FROM outbox WHERE id < 100")
    crashed = tmp_path / "crashed.db"
    _snapshot(live, crashed)
    con.execute("ROLLBACK")
    con.close()
    report = SalvageReport()
    got = _outbox_of(salvage(crashed, report=report))
    assert report.wal_frames_refused > 0  # the spilled frames
    assert dict(got) == truth and len(got) == len(truth)


def test_frames_of_an_older_wal_generation_are_not_read(tmp_path: Path) -> None:
    """After a checkpoint the next writer starts the WAL over (new salts) and overwrites it from
    the start: the older frames left past its end are stale versions of pages, not read."""
    live = tmp_path / "live.db"
    con = _wal_store(live)
    for batch in range(4):
        _insert(con, _outbox_rows(400, 20 + batch, 30, first=1 + 400 * batch))
    con.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the WAL keeps its frames, all copied
    size = os.path.getsize(f"{live}-wal")
    stream, seq, t, body = con.execute("SELECT stream, seq, time, body FROM outbox").fetchone()
    con.execute(
        "UPDATE outbox SET seq = ?, crc = ? WHERE id = 1",
        (seq + 1, row_crc(1, stream, seq + 1, t, body)),
    )
    assert os.path.getsize(f"{live}-wal") == size  # started over: the old frames are still there
    truth = _read_back(live, tmp_path / "truth.db")
    crashed = tmp_path / "crashed.db"
    _snapshot(live, crashed)
    con.close()
    report = SalvageReport()
    got = _outbox_of(salvage(crashed, report=report))
    assert dict(got) == truth and len(got) == len(truth)
    assert report.wal_frames_refused > 0  # the older generation's


def test_a_damaged_wal_never_raises_and_keeps_only_committed_versions(tmp_path: Path) -> None:
    """Flipped bytes in the WAL's frames: every row read whose checksum holds is a version of
    that row some transaction committed (the newest, or an older one when the newest frame of
    its page is damaged); every frame is either used or refused."""
    live = tmp_path / "live.db"
    con = _wal_store(live)
    versions: set[tuple[int, tuple[Any, ...]]] = set()  # every (rowid, values) ever committed
    rng = random.Random(11)
    for batch in range(6):
        rows = _outbox_rows(300, 10 + batch, 20, first=1 + 300 * batch)
        con.execute("BEGIN")
        _insert(con, rows)
        con.execute("COMMIT")
        versions |= set(rows.items())
        changed = {}
        for i in rng.sample(sorted(rows), 50):
            _, s, q, t, b, _ = rows[i]
            changed[i] = (None, s, q + 1, t, b, row_crc(i, s, q + 1, t, b))
        con.executemany(
            "UPDATE outbox SET seq = ?, crc = ? WHERE id = ?",
            [(v[2], v[5], i) for i, v in changed.items()],
        )
        versions |= set(changed.items())
    crashed = tmp_path / "crashed.db"
    _snapshot(live, crashed)
    con.close()
    pristine_wal = Path(f"{crashed}-wal").read_bytes()
    for _ in range(8):
        wal = bytearray(pristine_wal)
        spots = [rng.randrange(32, len(wal)) for _ in range(rng.randrange(1, 20))]
        for at in spots:  # in the frames (a flip in the WAL header is tried below)
            wal[at] ^= rng.randrange(1, 256)
        Path(f"{crashed}-wal").write_bytes(wal)
        report = SalvageReport()
        for rowid, v in _outbox_of(salvage(crashed, report=report)):
            if _intact(rowid, v):
                assert (rowid, _norm(v)) in versions
        assert report.wal_frames_used + report.wal_frames_refused == report.wal_frames
        assert report.wal_frames_refused >= 1  # each damaged frame fails its checksum
    for at in (0, 9, 16, 24):  # magic, page size, salt, checksum of the WAL header
        wal = bytearray(pristine_wal)
        wal[at] ^= 0x40
        Path(f"{crashed}-wal").write_bytes(wal)
        report = SalvageReport()
        for rowid, v in _outbox_of(salvage(crashed, report=report)):
            assert not _intact(rowid, v) or (rowid, _norm(v)) in versions
        assert report.wal_note or report.wal_frames_refused >= 1


def test_the_wal_gives_the_page_size_when_the_header_is_gone(tmp_path: Path) -> None:
    live = tmp_path / "live.db"
    con = _wal_store(live)
    rows = _outbox_rows(300, 12, 30)
    _insert(con, rows)
    crashed = tmp_path / "crashed.db"
    _snapshot(live, crashed)
    con.close()
    data = bytearray(crashed.read_bytes())
    data[:100] = bytes(100)
    crashed.write_bytes(data)
    report = SalvageReport()
    assert dict(_outbox_of(salvage(crashed, report=report))) == rows
    assert report.page_size == 4096 and report.geometry_from in ("wal", "guessed")


# ---------------------------------------------------------------------------- memory


def test_memory_is_one_page_and_one_cell_not_the_file(tmp_path: Path) -> None:
    """A 12 MB store, one row of it 1 MB: the peak is about that row, not the file."""
    path = tmp_path / "big.db"
    con = _connect(path)
    con.execute(OUTBOX)
    con.execute("BEGIN")
    body = b"\x5a" * 1000
    con.executemany(
        "INSERT INTO outbox VALUES (?, 's', 0, 0.0, ?, 0)", ((i, body) for i in range(12_000))
    )
    con.execute("INSERT INTO outbox VALUES (99999, 's', 0, 0.0, ?, 0)", (b"\x5b" * 1_000_000,))
    con.execute("COMMIT")
    con.close()
    assert path.stat().st_size > 12_000_000
    tracemalloc.start()
    try:
        n = 0
        biggest = 0
        for _rowid, values in salvage(path):
            n += 1
            biggest = max(biggest, len(values[4]) if len(values) == 6 else 0)
            del values
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 12_002 and biggest == 1_000_000
    assert peak < 2 * 1_000_000 + 64 * 1024, peak  # the row's payload, then its body


def test_committed_transactions_after_a_damaged_wal_frame_are_kept(tmp_path: Path) -> None:
    """SQLite's own recovery stops at the first frame whose checksum fails and drops every
    transaction after it, committed or not; salvage checks each frame against the one before it
    and keeps them, and wal_report counts them (the relay salvages instead of opening)."""
    live = tmp_path / "live.db"
    con = _wal_store(live)
    batches = [_outbox_rows(300, 30 + b, 1000, first=1 + 300 * b) for b in range(6)]
    frames_before = 0
    for b, rows in enumerate(batches):
        con.execute("BEGIN")
        _insert(con, rows)
        con.execute("COMMIT")
        if b == 0:
            frames_before = (os.path.getsize(f"{live}-wal") - 32) // (24 + 4096)
    crashed = tmp_path / "crashed.db"
    _snapshot(live, crashed)
    con.close()
    assert wal_report(crashed).wal_commits_after_damage == 0
    wal = bytearray(Path(f"{crashed}-wal").read_bytes())
    damaged_frame = frames_before + 1  # the second frame of the second transaction
    wal[32 + damaged_frame * (24 + 4096) + 24 + 2000] ^= 0x55  # its page data
    Path(f"{crashed}-wal").write_bytes(wal)
    report = wal_report(crashed)
    assert report.wal_commits_after_damage == 5 and report.wal_frames_refused == 1
    copy = tmp_path / "sqlite-reads.db"
    _snapshot(crashed, copy)
    sqlite_reads = sqlite3.connect(copy)
    kept_by_sqlite = {i for (i,) in sqlite_reads.execute("SELECT id FROM outbox")}
    sqlite_reads.close()
    assert kept_by_sqlite == set(batches[0])  # SQLite: the five later transactions are gone
    got = {rowid for rowid, v in _outbox_of(salvage(crashed)) if _intact(rowid, v)}
    assert set(batches[-1]) <= got  # salvage: the newest transactions are there
    assert len(got) >= sum(map(len, batches)) - 300


# ---------------------------------------------------------------------------- deletes, reserve


@pytest.mark.parametrize("secure_delete", ["ON", "OFF"])
def test_deleted_rows_stay_deleted_only_with_secure_delete(
    tmp_path: Path, secure_delete: str
) -> None:
    """The relay deletes rows as they are forwarded. With secure_delete SQLite zeroes what it
    frees, so salvage gives back exactly the remaining rows. Without it freed pages keep their
    old cells, rows whose checksum still holds (they were good rows): salvage would resurrect
    them, and no checksum can tell."""
    path = tmp_path / "drained.db"
    rows = _outbox_rows(4000, 40, 25)
    con = _connect(path)
    con.execute(f"PRAGMA secure_delete={secure_delete}")
    con.execute(OUTBOX)
    con.execute("BEGIN")
    _insert(con, rows)
    con.execute("COMMIT")
    con.execute("DELETE FROM outbox WHERE id <= 3000")  # drained: whole pages freed
    con.execute("DELETE FROM outbox WHERE id % 2 = 0")  # and cells freed inside pages
    con.execute("PRAGMA incremental_vacuum(3)")  # a few pages given back, most still free
    con.close()
    remaining = {i: r for i, r in rows.items() if i > 3000 and i % 2}
    report = SalvageReport()
    got = dict(_outbox_of(salvage(path, report=report)))
    assert report.usable_size == 4096
    assert remaining.items() <= {i: _norm(v) for i, v in got.items()}.items()
    ghosts = {i for i, v in got.items() if i not in remaining and _intact(i, v)}
    if secure_delete == "ON":
        assert got.keys() == remaining.keys()
    else:
        assert ghosts, "freed pages kept no old rows?"


def _reserve_bytes(path: Path, n: int) -> bool:
    """Rewrite ``path`` with ``n`` bytes reserved at the end of each page (SQLite's
    SQLITE_FCNTL_RESERVE_BYTES then VACUUM, through the SQLite library itself: Python's module
    has no call for it). False where the library cannot be loaded."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("sqlite3")
    if name is None:
        return False
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return False
    db = ctypes.c_void_p()
    if lib.sqlite3_open(os.fsencode(path), ctypes.byref(db)) != 0:
        return False
    try:
        reserve = ctypes.c_int(n)
        if lib.sqlite3_file_control(db, b"main", 38, ctypes.byref(reserve)) != 0:
            return False
        return bool(lib.sqlite3_exec(db, b"VACUUM", None, None, None) == 0)
    finally:
        lib.sqlite3_close(db)


@pytest.mark.parametrize("damage", ["none", "reserve byte zeroed", "header zeroed"])
def test_bytes_reserved_at_each_page_end(tmp_path: Path, damage: str) -> None:
    """A database with 40 bytes reserved per page (as checksum or encryption extensions keep):
    the usable size changes where overflowing payloads split; it is taken from the pages."""
    path = tmp_path / "reserved.db"
    rows = _build(path, 1500, big_every=9)
    if not _reserve_bytes(path, 40):
        pytest.skip("the SQLite library cannot be loaded to reserve bytes")
    data = bytearray(path.read_bytes())
    assert data[20] == 40
    if damage == "reserve byte zeroed":
        data[20] = 0
    elif damage == "header zeroed":
        data[:100] = bytes(100)
    path.write_bytes(data)
    report = SalvageReport()
    got = dict(_outbox_of(salvage(path, report=report)))
    assert report.usable_size == 4096 - 40
    assert {i: _norm(v) for i, v in got.items()} == rows


@needs_dbstat
def test_many_copies_of_a_long_chain_spend_a_bounded_budget(tmp_path: Path) -> None:
    """A leaf page whose row has a 100-page overflow chain, written over 40 other pages (as
    misdirected writes would): each copy follows the chain, but all chains together read at
    most twice the file's pages plus 64, then cells are refused, counted."""
    path = tmp_path / "copies.db"
    con = _connect(path)
    con.execute(OUTBOX)
    con.execute("BEGIN")
    _insert(con, _outbox_rows(2000, 50, 10**9))
    con.execute(
        "INSERT INTO outbox VALUES (99999, 's', 0, 0.0, ?, 0)",
        (random.Random(5).randbytes(400_000),),
    )
    con.execute("COMMIT")
    con.close()
    pages = _row_pages(path)
    data = bytearray(path.read_bytes())
    (leaf,) = (p for p in pages[99999] if data[(p - 1) * 4096] == 0x0D)  # the rest: overflow
    others = sorted({p for r, on in pages.items() if r != 99999 for p in on} - {leaf})[:40]
    for pgno in others:
        data[(pgno - 1) * 4096 : pgno * 4096] = data[(leaf - 1) * 4096 : leaf * 4096]
    path.write_bytes(data)
    report = salvage_report(path)
    assert report.overflow_pages_read <= 2 * report.pages + 64 < 40 * 100
    assert report.refused["overflow budget spent"] > 0
