"""The relay's outbox: SQLite in WAL mode, written by one thread in group commits.

What a pipeline made from its input (rows), where the input stands (positions: per device stream
the last (epoch, seq) taken, per downstream relay the last row id taken) and the pipeline's
state that changed (open windows, dedupe keys) are committed in **one transaction**: after a
crash the relay resumes exactly where its last commit left it, with no output twice and none
lost. The transaction is fsync'd (``synchronous=FULL``) before any reading in it is
acknowledged at :attr:`~sockstack.edge.messages.AckLevel.DISK`.

**Group commit.** Readings are staged in memory (:meth:`Outbox.stage`) into the open batch;
one task commits the batches one after another on the writer thread, so everything staged while
the previous commit was on its way to the disk goes out in the next one: one fsync for hundreds
of readings under load, one per reading when idle (no timer waits to fill a batch).

**Every row carries a CRC-32** (records.row_crc; positions, state and meta rows have one of
their own, over a table tag and their fields). A row read back whose checksum does not match is
moved to the quarantine table and counted, never forwarded and never a reason to stop. When
SQLite itself finds the file damaged (``quick_check`` at open, or an error while running), the
file is moved aside and a new store is filled from what :func:`~sockstack.edge.salvage.salvage`
can still read page by page, keeping each row whose checksum holds (docs/EDGE.md).

**Bounds.** The rows' bytes (``max_bytes``) and age (``max_age``); when full, the policy
``refuse`` (new input gets STORE_FULL, counted) or ``drop_oldest`` (the oldest rows go, counted).
What is staged and not yet committed is bounded by ``max_pending_bytes`` (the relay stops reading
until a commit frees room); device streams by ``max_streams``; the quarantine by bytes. Disk
space is given back as rows drain (``auto_vacuum=INCREMENTAL``, a bounded WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import logging
import os
import secrets
import sqlite3
import struct
import time as _time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec

from sockstack.edge.records import FIXED, Row, row_crc

__all__ = [
    "Batch",
    "Outbox",
    "StoreBusy",
    "StoreFull",
    "StoreLimits",
    "StoreLocked",
    "bad_rows",
    "integrity_of",
    "position_crc",
    "row_of",
]

log = logging.getLogger("sockstack.edge.store")

KEEP_DAMAGED = 3
"""Damaged files kept beside the store after a heal (for inspection); older ones are removed."""
ROW_OVERHEAD = 48
"""Bytes counted per row beyond its stream name and body (its integers, time and SQLite's
record header): what ``max_bytes`` measures is close to what the rows take on disk."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS outbox(id INTEGER PRIMARY KEY, stream TEXT NOT NULL,"
    " seq INTEGER NOT NULL, time REAL NOT NULL, body BLOB NOT NULL, crc INTEGER NOT NULL,"
    " added REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS positions(source TEXT PRIMARY KEY, epoch INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, crc INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS state(stage TEXT NOT NULL, key BLOB NOT NULL,"
    " value BLOB NOT NULL, crc INTEGER NOT NULL, PRIMARY KEY(stage, key))",
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value BLOB NOT NULL,"
    " crc INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS quarantine(qid INTEGER PRIMARY KEY, kind TEXT NOT NULL,"
    " reason TEXT NOT NULL, at REAL NOT NULL, raw BLOB NOT NULL)",
)
_pack = msgspec.msgpack.Encoder().encode
_FIXED_PACK = FIXED.pack
_unpack = msgspec.msgpack.Decoder().decode
_POS = struct.Struct(">qQ")


def position_crc(source: str, epoch: int, seq: int) -> int:
    """CRC-32 of a positions row: tag ``P``, the source in UTF-8, a zero byte, epoch and seq."""
    return zlib.crc32(b"P" + source.encode() + b"\0" + _POS.pack(epoch, seq))


def _state_crc(stage: str, key: bytes, value: bytes) -> int:
    return zlib.crc32(b"S" + stage.encode() + b"\0" + _POS.pack(len(key), 0) + key + value)


def meta_crc(key: str, value: bytes) -> int:
    return zlib.crc32(b"M" + key.encode() + b"\0" + value)


class StoreFull(Exception):
    """The outbox is full and its policy is to refuse new input (STORE_FULL on the wire)."""


class StoreLocked(Exception):
    """Another process (a running relay) has the store open."""


class StoreBusy(Exception):
    """More is staged than ``max_pending_bytes``: wait for the commit under way."""


@dataclass(frozen=True)
class StoreLimits:
    """Bounds of an outbox (docs/EDGE.md, "Bounds")."""

    max_bytes: int = 1 << 30
    """Bytes of rows kept (stream names, bodies and ``ROW_OVERHEAD`` each): 1 GiB."""
    max_age: float | None = 7 * 86400.0
    """Seconds a row may wait for its upstream before it expires (counted); None: forever."""
    when_full: str = "refuse"
    """``"refuse"``: new input is refused (STORE_FULL) while full; ``"drop_oldest"``: the oldest
    rows are deleted to make room, counted."""
    max_pending_bytes: int = 16 << 20
    """Bytes staged in memory and not yet committed (the next group commit)."""
    max_streams: int = 200_000
    """Input positions kept (device streams and downstream relays); a new stream past it is
    refused with STORE_FULL (about 150 bytes of memory each)."""
    max_quarantine_bytes: int = 16 << 20
    """Bytes of quarantined rows kept for inspection; the oldest go first."""

    def __post_init__(self) -> None:
        if self.when_full not in ("refuse", "drop_oldest"):
            raise ValueError(f"when_full must be 'refuse' or 'drop_oldest', not {self.when_full!r}")
        if self.max_bytes <= 0 or self.max_pending_bytes <= 0 or self.max_streams <= 0:
            raise ValueError("store limits must be positive")


# A staged row: (stream, seq, time, body); its id and checksum are given at commit.
Staged = tuple[str, int, float, bytes]
Done = Callable[["Batch", BaseException | None], None]


@dataclass(eq=False)
class Batch:
    """What one group commit writes, and whom to tell when it is on disk."""

    rows: list[Staged] = field(default_factory=list)
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    changes: list[tuple[str, bytes, bytes | None]] = field(default_factory=list)
    size: int = 0
    forwarded: int = 0
    """Rows up to this id were acknowledged upstream: delete them."""
    quarantine: list[tuple[str, str, bytes, int | None]] = field(default_factory=list)
    """(kind, reason, raw, outbox id to delete or None)."""
    done: list[Done] = field(default_factory=list)
    acks: list[Any] = field(default_factory=list)
    """Whom to answer once it is on disk (the relay's: the store only carries them)."""
    answered: bool = False
    """The relay's callback for ``acks`` is in ``done`` (once per batch)."""
    first_id: int = 0
    last_id: int = 0
    """Ids given to ``rows`` at commit (last_id = first_id - 1: none)."""

    def empty(self) -> bool:
        return not (
            self.rows or self.positions or self.changes or self.forwarded or self.quarantine
        )


@dataclass
class Counters:
    """What the store counted since it was created (kept in its meta table)."""

    committed_rows: int = 0
    commits: int = 0
    forwarded_rows: int = 0
    dropped_full: int = 0
    refused_full: int = 0
    expired: int = 0
    quarantined: int = 0
    salvaged: int = 0
    heals: int = 0


class Outbox:
    """The on-disk outbox of one relay (one file; one relay at a time: the file is locked)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        limits: StoreLimits | None = None,
        *,
        clock: Callable[[], float] = _time.time,
    ) -> None:
        self.path = os.fspath(path)
        self.limits = limits or StoreLimits()
        self.clock = clock
        self.origin = ""
        """This store's identity upstream (random, made with the store, kept in meta): a sink
        tells relays apart by it, and ids are unique under it."""
        self.next_id = 1
        self.stored_bytes = 0
        self.stored_rows = 0
        self.positions: dict[str, tuple[int, int]] = {}
        """Committed input positions (source -> (epoch, seq))."""
        self.latest: dict[str, tuple[int, int]] = {}
        """The committed positions with those staged since (the open and committing batches)
        over them: what a new reading is compared with."""
        self.before_commit: Callable[[Batch], None] | None = None
        """Called on the loop with the open batch just before it is taken to commit (the relay
        adds its pipeline's state changes: one set per transaction)."""
        self.state_rows: list[tuple[str, bytes, bytes]] = []
        """The pipeline state read at open (for Pipeline.restore), then emptied."""
        self.counters = Counters()
        self.pending = Batch()
        self._committing: Batch | None = None
        self._con: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sockstack-edge-store")
        self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="sockstack-edge-read")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._listeners: list[Callable[[Batch], None]] = []
        self.damaged_path: str | None = None
        self.failed: BaseException | None = None
        self.live: Callable[[], dict[str, Any]] = dict
        """What the relay says of itself now (forward rate...), kept in meta at each commit
        for ``sockstack edge status FILE``."""
        self._lock_fd: int | None = None
        self.oldest_added: float | None = None
        self.committing_bytes = 0
        """Bytes of the batch being committed now (0: none)."""
        self._quarantining: set[int] = set()
        """Ids of rows staged for quarantine (bounded: cleared at each commit)."""
        """When the oldest row was committed (kept up to date at each commit)."""

    # ------------------------------------------------------------------ open

    def open(self) -> None:
        """Open (or create) the file, check it, heal it if damaged, and read what a relay
        resumes from. Blocking: call it before serving, or in a thread. Raises
        :class:`StoreLocked` when another process has it open."""
        self._lock()
        try:
            if os.path.exists(self.path + "-wal"):
                from sockstack.edge.salvage import wal_report

                lost = wal_report(self.path).wal_commits_after_damage
                if lost:  # SQLite's WAL recovery would silently drop them: salvage instead
                    raise sqlite3.DatabaseError(
                        f"the WAL has {lost} committed transactions past a damaged frame"
                    )
            self._open_checked()
        except sqlite3.DatabaseError as exc:
            log.error("edge store %s is damaged (%s): salvaging what is intact", self.path, exc)
            # Closed without a checkpoint (it would write what SQLite read of the damaged file
            # back, and drop the WAL's frames past the damage), the lock kept.
            self._close_connections(checkpoint=False, unlock=False)
            self._heal()

    def _lock(self) -> None:
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"{self.path} is in use by another process (a running relay)"
            ) from None
        self._lock_fd = fd

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        con.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table: else no effect
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")  # WAL + FULL: each commit is fsync'd
        con.execute("PRAGMA secure_delete=ON")  # deleted rows are zeroed: salvage finds no ghosts
        con.execute("PRAGMA journal_size_limit=67108864")  # the WAL shrinks back to 64 MiB
        return con

    def _open_checked(self) -> None:
        con = self._con = self._connect()
        for sql in _SCHEMA:
            con.execute(sql)
        check = con.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            raise sqlite3.DatabaseError(f"quick_check: {check[0][0] if check else '?'}")
        self._load()
        self._reader = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=5.0
        )

    def _load(self) -> None:
        con = self._con
        assert con is not None
        bad: list[tuple[str, str, bytes, int | None]] = []
        meta: dict[str, bytes] = {}
        self.positions, self.state_rows = {}, []
        for key, value, crc in con.execute("SELECT key, value, crc FROM meta"):
            if isinstance(value, bytes) and meta_crc(key, value) == crc:
                meta[key] = value
            else:
                bad.append(("meta", "checksum", _pack([key, value, crc]), None))
        origin = meta.get("origin")
        stored_next = meta.get("next_id")
        top = con.execute("SELECT max(id) FROM outbox").fetchone()[0] or 0
        if origin is None or (stored_next is None and top == 0):
            # No identity, or none we can trust to never reuse an id: a new one (a sink then
            # takes this store's rows as a new relay's, and dedupes nothing it should keep).
            self.origin = secrets.token_hex(8)
            self.next_id = top + 1
            if origin is not None or stored_next is not None:
                log.warning("edge store %s: meta damaged, new identity %s", self.path, self.origin)
        else:
            self.origin = origin.decode()
            self.next_id = max(top + 1, int(_unpack(stored_next)) if stored_next else 1)
        counters = meta.get("counters")
        if counters is not None:
            with contextlib.suppress(Exception):
                self.counters = msgspec.convert(_unpack(counters), Counters)
        for source, epoch, seq, crc in con.execute("SELECT source, epoch, seq, crc FROM positions"):
            if isinstance(source, str) and position_crc(source, epoch, seq) == crc:
                self.positions[source] = (epoch, seq)
            else:
                bad.append(("position", "checksum", _pack([source, epoch, seq, crc]), None))
        for stage, key, value, crc in con.execute("SELECT stage, key, value, crc FROM state"):
            if (
                isinstance(stage, str)
                and isinstance(key, bytes)
                and isinstance(value, bytes)
                and _state_crc(stage, key, value) == crc
            ):
                self.state_rows.append((stage, key, value))
            else:
                bad.append(("state", "checksum", _pack([stage, key, value, crc]), None))
        self.latest = dict(self.positions)
        rows, nbytes = con.execute(
            "SELECT count(*), coalesce(sum(length(stream) + length(body)), 0) FROM outbox"
        ).fetchone()
        self.stored_rows = rows
        self.stored_bytes = nbytes + rows * ROW_OVERHEAD
        first = con.execute("SELECT added FROM outbox ORDER BY id LIMIT 1").fetchone()
        self.oldest_added = None if first is None else float(first[0])
        if bad or "origin" not in meta:
            with con:
                con.execute("BEGIN IMMEDIATE")
                self._write_quarantine(con, bad)
                if bad:
                    self._rewrite_meta_rows(con)
                self._write_meta(con)
            if bad:
                log.warning(
                    "edge store %s: %d damaged rows quarantined at open", self.path, len(bad)
                )

    def _rewrite_meta_rows(self, con: sqlite3.Connection) -> None:
        """After damaged positions or state rows were found: write back the good ones only."""
        con.execute("DELETE FROM positions")
        con.execute("DELETE FROM state")
        con.executemany(
            "INSERT INTO positions VALUES (?, ?, ?, ?)",
            [(s, e, q, position_crc(s, e, q)) for s, (e, q) in self.positions.items()],
        )
        con.executemany(
            "INSERT INTO state VALUES (?, ?, ?, ?)",
            [(s, k, v, _state_crc(s, k, v)) for s, k, v in self.state_rows],
        )

    # ------------------------------------------------------------------ heal

    def _heal(self) -> None:
        """Move the damaged file aside, make a new store, and fill it with every row salvage
        reads whose checksum holds."""
        from sockstack.edge.salvage import salvage

        aside = f"{self.path}.damaged-{int(self.clock())}"
        kept = sorted(glob.glob(glob.escape(self.path) + ".damaged-*[0-9]"))
        for old in kept[: max(0, len(kept) - (KEEP_DAMAGED - 1))]:  # bounded: the newest stay
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old + suffix)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path + suffix, aside + suffix)
        self.damaged_path = aside
        rows: list[tuple[Any, ...]] = []
        positions: dict[str, tuple[int, int]] = {}
        state: dict[tuple[str, bytes], bytes] = {}
        meta: dict[str, bytes] = {}
        for rowid, values in salvage(aside):
            n = len(values)
            if n == 7 and _is_row(rowid, values):
                _, stream, seq, t, body, crc, added = values
                rows.append((rowid, stream, seq, float(t), body, crc, float(added)))
            elif n == 4 and isinstance(values[0], str):
                a, b, c, crc = values
                if isinstance(b, int) and isinstance(c, int) and position_crc(a, b, c) == crc:
                    positions[a] = max(positions.get(a, (b, c)), (b, c))
                elif isinstance(b, bytes) and isinstance(c, bytes) and _state_crc(a, b, c) == crc:
                    state[(a, b)] = c
            elif n == 3 and isinstance(values[0], str) and isinstance(values[1], bytes):
                if meta_crc(values[0], values[1]) == values[2]:
                    meta[values[0]] = values[1]
        con = self._con = self._connect()
        for sql in _SCHEMA:
            con.execute(sql)
        rows.sort()
        unique = {r[0]: r for r in rows}
        with con:
            con.execute("BEGIN IMMEDIATE")
            con.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?)", unique.values())
            con.executemany(
                "INSERT INTO positions VALUES (?, ?, ?, ?)",
                [(s, e, q, position_crc(s, e, q)) for s, (e, q) in positions.items()],
            )
            con.executemany(
                "INSERT INTO state VALUES (?, ?, ?, ?)",
                [(s, k, v, _state_crc(s, k, v)) for (s, k), v in state.items()],
            )
            con.executemany(
                "INSERT INTO meta VALUES (?, ?, ?)",
                [(k, v, meta_crc(k, v)) for k, v in meta.items() if k in ("origin", "next_id")],
            )
        self._load()
        self.counters.heals += 1
        self.counters.salvaged += len(unique)
        with con:
            con.execute("BEGIN IMMEDIATE")
            self._write_meta(con)
        self._reader = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=5.0
        )
        log.warning(
            "edge store %s healed: %d rows, %d positions, %d state rows kept; the damaged file"
            " is %s",
            self.path,
            len(unique),
            len(positions),
            len(state),
            aside,
        )

    # ------------------------------------------------------------------ run

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start committing (on ``loop``); :meth:`open` first."""
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._commit_loop(), name="sockstack-edge-commit")

    def on_commit(self, listener: Callable[[Batch], None]) -> None:
        """Call ``listener(batch)`` on the loop after each batch is on disk."""
        self._listeners.append(listener)

    def room(self, nbytes: int, can_wait: bool = False) -> None:
        """Raise :class:`StoreFull` or :class:`StoreBusy` when ``nbytes`` more cannot be staged.
        ``can_wait``: the caller stops reading its source while the staged bytes are over the
        bound (a TCP connection of lines): no StoreBusy, the bound is passed by one read."""
        lim = self.limits
        if (
            self.pending.size + nbytes > lim.max_pending_bytes
            and self.pending.size
            and not can_wait
        ):
            raise StoreBusy("the relay's commit queue is full")
        if lim.when_full == "refuse":
            committing = self.committing_bytes
            if self.stored_bytes + committing + self.pending.size + nbytes > lim.max_bytes:
                self.counters.refused_full += 1
                raise StoreFull(f"the relay's store is full ({lim.max_bytes} bytes)")

    def stage(
        self,
        rows: Iterable[Staged],
        nbytes: int,
        source: str | None = None,
        position: tuple[int, int] | None = None,
        changes: list[tuple[str, bytes, bytes | None]] | None = None,
        done: Done | None = None,
    ) -> Batch:
        """Add rows (``nbytes``: their measure, as :func:`staged_bytes`), a new input position
        and state changes to the open batch, which the commit loop writes next. Check
        :meth:`room` first. Returns the batch (its ``done`` callbacks run when it is on disk)."""
        b = self.pending
        if source is not None and position is not None:  # (checked before anything is added)
            if source not in self.latest and len(self.latest) >= self.limits.max_streams:
                raise StoreFull(f"the relay keeps at most {self.limits.max_streams} streams")
        b.rows.extend(rows)
        b.size += nbytes
        if source is not None and position is not None:
            b.positions[source] = position
            self.latest[source] = position
        if changes:
            b.changes.extend(changes)
        if done is not None:
            b.done.append(done)
        assert self._wake is not None
        self._wake.set()
        return b

    def wake(self) -> None:
        """The open batch has something new: the commit loop takes it when it is free."""
        wake = self._wake
        assert wake is not None
        if not wake.is_set():
            wake.set()

    def position(self, source: str) -> tuple[int, int]:
        """The last (epoch, seq) taken from ``source``, staged or committed ((0, 0): none)."""
        return self.latest.get(source, (0, 0))

    def forwarded(self, through: int) -> None:
        """Rows up to ``through`` are durable upstream: delete them in the next commit."""
        if through > self.pending.forwarded:
            self.pending.forwarded = through
            assert self._wake is not None
            self._wake.set()

    def quarantine(self, kind: str, reason: str, raw: bytes, row_id: int | None) -> None:
        """Move a row (or keep raw input) to quarantine in the next commit."""
        self.pending.quarantine.append((kind, reason, raw, row_id))
        assert self._wake is not None
        self._wake.set()

    def flush(self) -> None:
        """Commit the open batch now even if it is empty (the counters, TTL expiry)."""
        assert self._wake is not None
        self._wake.set()

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            if self.before_commit is not None:
                self.before_commit(self.pending)
            batch, self.pending = self.pending, Batch()
            if batch.empty() and not batch.done and not (self._closing or self._expiry_due()):
                continue
            self._committing = batch
            self.committing_bytes = batch.size
            try:
                await loop.run_in_executor(self._writer, self._commit, batch)
            except BaseException as exc:
                self.failed = exc if isinstance(exc, Exception) else None
                log.error("edge store %s: commit failed: %s", self.path, exc)
                # Nothing of it was taken, nor of what was staged since (its positions may be
                # above the lost ones': a device sending again must not be told "already
                # have it"): both fail, and positions go back to the committed ones.
                later, self.pending = self.pending, Batch()
                self.latest = dict(self.positions)
                self._committing = None
                self.committing_bytes = 0
                self._quarantining.clear()
                for failed in (batch, later):
                    for cb in failed.done:
                        _call(cb, failed, exc)
                if not isinstance(exc, Exception) or self._closing:
                    if not isinstance(exc, Exception):
                        raise
                    return
                continue
            self._committing = None
            self.committing_bytes = 0
            self._quarantining.difference_update(q[3] for q in batch.quarantine)
            self.positions.update(batch.positions)
            for cb in batch.done:  # (one that raises is logged: the loop must go on)
                _call(cb, batch, None)
            for listener in self._listeners:
                _call(listener, batch)
            if self._closing and self.pending.empty() and not self.pending.done:
                return

    _last_expiry = 0.0

    def _expiry_due(self) -> bool:
        return self.limits.max_age is not None and self.clock() - self._last_expiry >= 10.0

    def _commit(self, b: Batch) -> None:
        """On the writer thread: one transaction, fsync'd."""
        con = self._con
        assert con is not None
        lim = self.limits
        now = self.clock()
        first = self.next_id
        out = []
        pack, crc32 = _FIXED_PACK, zlib.crc32  # row_crc, inlined: the writer's inner loop
        for i, (stream, seq, t, body) in enumerate(b.rows, first):
            crc = crc32(body, crc32(stream.encode() + b"\0", crc32(pack(i, seq, t))))
            out.append((i, stream, seq, t, body, crc, now))
        c = self.counters
        con.execute("BEGIN IMMEDIATE")
        try:
            freed = 0
            if b.forwarded:
                freed += self._delete(con, "id <= ?", (b.forwarded,), "forwarded_rows")
            if b.quarantine:
                self._write_quarantine(con, [(k, r, raw, None) for k, r, raw, _ in b.quarantine])
                ids = [(i,) for _, _, _, i in b.quarantine if i is not None]
                if ids:
                    freed += self._delete_ids(con, ids)
                    c.quarantined += len(ids)
                c.quarantined += sum(1 for q in b.quarantine if q[3] is None)
            if lim.max_age is not None and now - self._last_expiry >= 10.0:
                self._last_expiry = now
                freed += self._delete(con, "added < ?", (now - lim.max_age,), "expired")
            if out:
                incoming = b.size
                if lim.when_full == "drop_oldest":
                    excess = self.stored_bytes + incoming - lim.max_bytes
                    if excess > 0:
                        freed += self._drop_oldest(con, excess)
                con.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?)", out)
                self.stored_bytes += incoming
                self.stored_rows += len(out)
                c.committed_rows += len(out)
            if b.positions:
                con.executemany(
                    "INSERT OR REPLACE INTO positions VALUES (?, ?, ?, ?)",
                    [(s, e, q, position_crc(s, e, q)) for s, (e, q) in b.positions.items()],
                )
            for stage, key, value in b.changes:
                if value is None:
                    con.execute("DELETE FROM state WHERE stage = ? AND key = ?", (stage, key))
                else:
                    con.execute(
                        "INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?)",
                        (stage, key, value, _state_crc(stage, key, value)),
                    )
            c.commits += 1
            self.next_id = first + len(out)
            self._write_meta(con)
            con.execute("COMMIT")
        except BaseException:
            self.next_id = first
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            raise
        b.first_id, b.last_id = first, first + len(out) - 1
        if freed or self.oldest_added is None:  # by id: the primary key, not a scan
            row = con.execute("SELECT added FROM outbox ORDER BY id LIMIT 1").fetchone()
            self.oldest_added = None if row is None else float(row[0])
        if freed > 64 * 4096:  # give pages back to the file system as the outbox drains
            # (executescript: run to the end; execute() would free one page per step)
            con.executescript("PRAGMA incremental_vacuum;")

    def _delete(self, con: sqlite3.Connection, where: str, args: tuple[Any, ...], what: str) -> int:
        n, nbytes = con.execute(
            "SELECT count(*), coalesce(sum(length(stream) + length(body)), 0)"
            f" FROM outbox WHERE {where}",
            args,
        ).fetchone()
        if n:
            con.execute(f"DELETE FROM outbox WHERE {where}", args)
            self.stored_rows -= n
            self.stored_bytes -= nbytes + n * ROW_OVERHEAD
            setattr(self.counters, what, getattr(self.counters, what) + n)
        return int(nbytes + n * ROW_OVERHEAD)

    def _delete_ids(self, con: sqlite3.Connection, ids: list[tuple[int]]) -> int:
        freed = 0
        for (i,) in ids:
            row = con.execute(
                "SELECT length(stream) + length(body) FROM outbox WHERE id = ?", (i,)
            ).fetchone()
            if row is not None:
                con.execute("DELETE FROM outbox WHERE id = ?", (i,))
                self.stored_rows -= 1
                self.stored_bytes -= row[0] + ROW_OVERHEAD
                freed += row[0] + ROW_OVERHEAD
        return freed

    def _drop_oldest(self, con: sqlite3.Connection, excess: int) -> int:
        freed = 0
        while freed < excess and self.stored_rows:
            sizes = con.execute(
                "SELECT id, length(stream) + length(body) FROM outbox ORDER BY id LIMIT 512"
            ).fetchall()
            if not sizes:
                break
            last, reach = sizes[-1][0], freed
            for i, size in sizes:
                reach += size + ROW_OVERHEAD
                if reach >= excess:
                    last = i
                    break
            freed += self._delete(con, "id <= ?", (last,), "dropped_full")
        return freed

    def _write_quarantine(
        self, con: sqlite3.Connection, bad: list[tuple[str, str, bytes, int | None]]
    ) -> None:
        if not bad:
            return
        now = self.clock()
        con.executemany(
            "INSERT INTO quarantine(kind, reason, at, raw) VALUES (?, ?, ?, ?)",
            [(k, r, now, raw) for k, r, raw, _ in bad],
        )
        total = con.execute("SELECT coalesce(sum(length(raw)), 0) FROM quarantine").fetchone()[0]
        if total > self.limits.max_quarantine_bytes:
            con.execute(
                "DELETE FROM quarantine WHERE qid IN (SELECT qid FROM quarantine ORDER BY qid"
                " LIMIT (SELECT count(*) / 2 FROM quarantine))"
            )

    def _write_meta(self, con: sqlite3.Connection) -> None:
        items = {
            "origin": self.origin.encode(),
            "next_id": _pack(self.next_id),
            "counters": _pack(self.counters),
            "live": _pack({**self.live(), "updated": self.clock()}),
        }
        con.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?, ?)",
            [(k, v, meta_crc(k, v)) for k, v in items.items()],
        )

    # ------------------------------------------------------------------ read

    async def read(self, after: int, max_rows: int, max_bytes: int) -> tuple[list[Row], int]:
        """The rows above id ``after``, oldest first, at most ``max_rows`` and about
        ``max_bytes``, and the highest id examined; rows whose checksum fails are quarantined
        (next commit) and left out (once: a row already on its way there is skipped)."""
        loop = asyncio.get_running_loop()
        rows, bad = await loop.run_in_executor(
            self._read_pool, self._read, after, max_rows, max_bytes
        )
        examined = max(rows[-1].id if rows else after, max((b[0] for b in bad), default=after))
        for values in bad:
            if values[0] not in self._quarantining:
                self._quarantining.add(values[0])
                self.quarantine("row", "checksum", _pack(list(values)), values[0])
        return rows, examined

    def _read(self, after: int, max_rows: int, max_bytes: int) -> tuple[list[Row], list[Any]]:
        con = self._reader
        assert con is not None
        try:
            values = con.execute(
                SELECT_ROWS + " WHERE id > ? ORDER BY id LIMIT ?", (after, max_rows)
            ).fetchall()
        except sqlite3.DatabaseError as exc:  # a page SQLite cannot read: row by row instead
            log.error("edge store %s: reading rows after %d: %s", self.path, after, exc)
            values = self._read_one_by_one(con, after, max_rows)
        good: list[Row] = []
        bad: list[Any] = []
        total = 0
        for v in values:
            row = row_of(v)
            if row is None:
                bad.append(v)
                continue
            good.append(row)
            total += len(row.body) + ROW_OVERHEAD
            if total >= max_bytes:
                break
        return good, bad

    def _read_one_by_one(
        self, con: sqlite3.Connection, after: int, max_rows: int
    ) -> list[tuple[Any, ...]]:
        """The rows after ``after``, each read alone: a row that cannot be read comes back as
        ``(id, None, ...)`` (quarantined, so the forwarder moves past it)."""
        try:
            ids = [i for (i,) in con.execute(
                "SELECT id FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after, max_rows)
            )]  # fmt: skip
        except sqlite3.DatabaseError:  # even the ids: the next id alone, if that much reads
            ids = [after + 1] if after + 1 < self.next_id else []
        out: list[tuple[Any, ...]] = []
        for i in ids:
            try:
                row = con.execute(SELECT_ROWS + " WHERE id = ?", (i,)).fetchone()
            except sqlite3.DatabaseError:
                row = (i, None, None, None, None, None)
            if row is not None:
                out.append(row)
        return out

    def verify_rows(self) -> tuple[int, int]:
        """Check every row's checksum now (blocking, not while committing); move the bad ones
        to quarantine. Returns (rows checked, rows bad)."""
        con = self._con
        assert con is not None
        checked, bad = bad_rows(con)
        if bad:
            con.execute("BEGIN IMMEDIATE")
            self._write_quarantine(con, [("row", "checksum", _pack(list(v)), v[0]) for v in bad])
            freed = self._delete_ids(con, [(v[0],) for v in bad])
            del freed
            self.counters.quarantined += len(bad)
            self._write_meta(con)
            con.execute("COMMIT")
        return checked, len(bad)

    def integrity(self) -> str:
        """SQLite's ``integrity_check``: "ok", or what it found."""
        assert self._con is not None
        return integrity_of(self._con)

    def quarantined(self, limit: int = 100) -> list[tuple[int, str, str, float, bytes]]:
        """The newest quarantined rows: (qid, kind, reason, at, raw msgpack)."""
        assert self._reader is not None
        return self._reader.execute(
            "SELECT qid, kind, reason, at, raw FROM quarantine ORDER BY qid DESC LIMIT ?", (limit,)
        ).fetchall()

    def oldest_age(self) -> float | None:
        """Seconds the oldest row has waited (None: empty), as of the last commit."""
        oldest = self.oldest_added
        return None if oldest is None else max(0.0, self.clock() - oldest)

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Commit what is staged, checkpoint the WAL into the file, and close."""
        if self._task is not None and not self._task.done():
            self._closing = True
            assert self._wake is not None
            self._wake.set()
            with contextlib.suppress(BaseException):
                await self._task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._close_connections)
        self._writer.shutdown(wait=False)
        self._read_pool.shutdown(wait=False)

    def close_now(self) -> None:
        """Blocking close without committing (a store opened only to read, or a test)."""
        self._close_connections()
        self._writer.shutdown(wait=False)
        self._read_pool.shutdown(wait=False)

    def _close_connections(self, checkpoint: bool = True, unlock: bool = True) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._con is not None:
            if checkpoint:
                with contextlib.suppress(sqlite3.Error):
                    self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._con.close()
            self._con = None
        if self._lock_fd is not None and unlock:
            os.close(self._lock_fd)  # (closing the descriptor releases the lock)
            self._lock_fd = None


def integrity_of(con: sqlite3.Connection) -> str:
    """SQLite's ``integrity_check`` of a store's file: "ok", or (the first ten of) what it found."""
    result = con.execute("PRAGMA integrity_check").fetchall()
    return "ok" if result == [("ok",)] else "; ".join(str(r[0]) for r in result[:10])


def bad_rows(con: sqlite3.Connection) -> tuple[int, list[tuple[Any, ...]]]:
    """Every outbox row's checksum, in id order: (rows checked, the rows that are bad)."""
    checked = 0
    bad: list[tuple[Any, ...]] = []
    for values in con.execute(SELECT_ROWS + " ORDER BY id"):
        checked += 1
        if row_of(values) is None:
            bad.append(values)
    return checked, bad


def _call(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("edge store: a commit callback raised")


def staged_bytes(stream: str, body: bytes) -> int:
    """What a staged row counts against the store's bounds."""
    return len(stream) + len(body) + ROW_OVERHEAD


SELECT_ROWS = "SELECT id, CAST(stream AS BLOB), seq, time, body, crc FROM outbox"
"""The stream as bytes: a damaged name that is not UTF-8 is a bad row, not a failed query."""


def row_of(values: tuple[Any, ...]) -> Row | None:
    """A row as :data:`SELECT_ROWS` reads it, if it is whole and its checksum holds."""
    i, stream, seq, t, body, crc = values
    if not isinstance(stream, bytes):
        return None
    try:
        name = stream.decode()
    except UnicodeDecodeError:
        return None
    if not _is_row(i, (None, name, seq, t, body, crc, 0.0)):
        return None
    return Row(i, name, seq, float(t), body, crc)


def _is_row(rowid: Any, values: tuple[Any, ...]) -> bool:
    """An outbox row's shape (salvage and reads): (None, stream, seq, time, body, crc, added)."""
    _, stream, seq, t, body, crc, added = values
    return (
        isinstance(rowid, int)
        and isinstance(stream, str)
        and isinstance(seq, int)
        and isinstance(t, (float, int))  # SQLite keeps a whole REAL as an integer on disk
        and isinstance(body, bytes)
        and isinstance(crc, int)
        and isinstance(added, (float, int))
        and row_crc(rowid, stream, seq, t, body) == crc
    )
