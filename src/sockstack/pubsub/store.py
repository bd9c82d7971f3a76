"""The broker's store: retained messages and durable subscriptions in SQLite (``--store FILE``).

What survives a restart and a kill -9: the retained messages, the durable subscriptions (name,
pattern, options) and, for each, the messages it has not acknowledged yet. A message is written
once (``messages``) however many durable subscriptions hold it; ``pending`` says which hold
which, and a message goes when the last of them acknowledges it (or drops it, by its bounds).

**Group commit.** The broker stages operations in memory (no I/O on its loop); one task commits
them on a writer thread, so everything staged while the previous commit was on its way to the
disk goes out in the next one: one fsync for hundreds of publishes under load, one per publish
when idle (no timer waits to fill a batch). :meth:`SQLiteStore.after_commit` runs a callback
once everything staged before it is committed: a QoS 1 publish is answered then.

**fsync policy** (``sync``, SQLite's ``synchronous`` in WAL mode):

- ``full`` (default): every commit is fsync'd before its publishes are acknowledged. An
  acknowledged QoS 1 publish survives a kill -9, an OS crash and a power cut.
- ``normal``: commits reach the OS at once, the disk at checkpoints. An acknowledged publish
  survives a kill -9 of the broker, not an OS crash or power cut (the last commits may go).
- ``off``: no fsync at all; as ``normal`` for a kill -9, and a power cut may damage the file.

**Bounds.** What waits to be committed is bounded in bytes (``max_staged_bytes``): past it the
broker refuses publishes that would add to it (STORE_FULL) until the disk catches up. What is
stored is bounded by the broker's limits (each durable subscription's ``max_msgs``,
``max_bytes`` and ``max_age``; ``max_durable_bytes`` for all together; the retained store's).
Disk space comes back as messages are acknowledged (``auto_vacuum=INCREMENTAL``), and the WAL
is kept to 64 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack

__all__ = ["SYNC_MODES", "Loaded", "SQLiteStore", "StoreError", "StoredDurable"]

log = logging.getLogger("sockstack.broker.store")

SYNC_MODES = ("full", "normal", "off")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS retained ("
    " topic TEXT PRIMARY KEY, payload BLOB NOT NULL, codec INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS durables ("
    " name TEXT PRIMARY KEY, pattern TEXT NOT NULL, options BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS messages ("
    " id INTEGER PRIMARY KEY, topic BLOB NOT NULL, payload BLOB NOT NULL,"
    " codec INTEGER NOT NULL, at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS pending ("
    " name TEXT NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (name, id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS pending_id ON pending (id)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_OP_OVERHEAD = 128  # a staged operation's tuple and list slot, beyond its data


class StoreError(Exception):
    """The store cannot be opened (in use by another broker, damaged, not a store)."""


@dataclass(slots=True)
class StoredDurable:
    """A durable subscription as stored: its definition and the messages it has not
    acknowledged, in order: (id, payload + topic bytes, when published, wall clock)."""

    name: str
    pattern: str
    options: dict[str, Any]
    pending: list[tuple[int, int, float]] = field(default_factory=list)


@dataclass(slots=True)
class Loaded:
    """What a broker resumes from."""

    retained: list[tuple[str, bytes, int]]
    durables: list[StoredDurable]
    last_id: int
    """The highest message id ever stored (ids are never reused)."""


class SQLiteStore:
    """A broker's store in the SQLite file ``path`` (WAL mode), one broker per file (a lock
    file enforces it). :meth:`load` at start (blocking), :meth:`start` on the loop; the
    broker stages with the other methods (no I/O on the caller's thread)."""

    durable = True

    def __init__(self, path: str, sync: str = "full", max_staged_bytes: int = 64 << 20) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, not {sync!r}")
        self.path = path
        self.sync = sync
        self.max_staged_bytes = max_staged_bytes
        self.staged: list[tuple[Any, ...]] = []
        self.staged_bytes = 0
        self.committing_bytes = 0
        self._waiting: list[Callable[[bool], None]] = []  # after the staged ops are committed
        self.committed_through = 0
        """Every message with an id up to this is committed (readable by :meth:`read`)."""
        self._staged_top = 0  # highest message id staged
        self.on_commit: Callable[[], bool] | None = None
        """Called on the loop after each commit (the broker pages in what waited for it)."""
        self.commits = 0
        self.failed: BaseException | None = None
        self._con: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sockstack-broker-store")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._closing = False

    # ------------------------------------------------------------------ open

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        con.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table: else no effect
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={self.sync.upper()}")
        con.execute("PRAGMA journal_size_limit=67108864")
        return con

    def load(self) -> Loaded:
        """Open (or create) the file and read what the broker resumes from. Blocking."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path} is in use by another broker") from None
        self._lock_fd = fd
        try:
            con = self._con = self._connect()
            for sql in _SCHEMA:
                con.execute(sql)
            check = con.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise StoreError(
                    f"{self.path} is damaged (quick_check: {check[0][0] if check else '?'}); "
                    "move it aside and start with a new file"
                )
            retained = [
                (t, bytes(p), c) for t, p, c in con.execute("SELECT * FROM retained ORDER BY 1")
            ]
            durables: dict[str, StoredDurable] = {}
            for name, pattern, options in con.execute("SELECT * FROM durables ORDER BY 1"):
                opts = msgpack.unpackb(options)
                if not isinstance(opts, dict):
                    raise ValueError(f"durable subscription {name!r}: options are not a map")
                durables[name] = StoredDurable(name, pattern, opts)
            for name, mid, size, at in con.execute(
                "SELECT p.name, p.id, length(m.topic) + length(m.payload), m.at"
                " FROM pending p JOIN messages m ON m.id = p.id ORDER BY p.name, p.id"
            ):
                d = durables.get(name)
                if d is not None:
                    d.pending.append((mid, size, at))
            last = con.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
            row = con.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
            last = max(last, row[0] if row else 0)
            self.committed_through = self._staged_top = last
            self._reader = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except (sqlite3.DatabaseError, ValueError) as exc:  # (msgpack's errors are ValueErrors)
            self.close_now()
            raise StoreError(f"{self.path}: {exc}") from None
        except BaseException:
            self.close_now()
            raise
        return Loaded(retained, list(durables.values()), last)

    def start(self) -> None:
        """Start committing on the running loop (the pattern's start)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._commit_loop())
            if self.staged:
                self._wake.set()

    # ------------------------------------------------------------------ staging

    def _stage(self, op: tuple[Any, ...], size: int) -> None:
        self.staged.append(op)
        self.staged_bytes += size + _OP_OVERHEAD
        if self._wake is not None:
            self._wake.set()

    def busy(self) -> bool:
        """More than ``max_staged_bytes`` wait for the disk: refuse what would add to it."""
        return self.staged_bytes + self.committing_bytes > self.max_staged_bytes

    def retain(self, topic: str, payload: bytes, codec: int) -> None:
        """Keep (or, ``payload`` empty, forget) the topic's retained message."""
        self._stage(("r", topic, payload, codec), len(topic) + len(payload))

    def save_durable(self, name: str, pattern: str, options: dict[str, Any]) -> None:
        self._stage(("d", name, pattern, msgpack.packb(options)), len(name) + len(pattern) + 64)

    def delete_durable(self, name: str) -> None:
        self._stage(("x", name), len(name))

    def append(
        self, mid: int, topic: bytes, payload: bytes, codec: int, at: float, names: Sequence[str]
    ) -> None:
        """Message ``mid`` for the durable subscriptions ``names``."""
        self._staged_top = mid
        self._stage(
            ("m", mid, topic, payload, codec, at, names),
            len(topic) + len(payload) + 64 * len(names),
        )

    def remove(self, name: str, ids: Iterable[int]) -> None:
        """``name`` is done with these messages (acknowledged, dropped or expired)."""
        ids = list(ids)
        if ids:
            self._stage(("a", name, ids), len(name) + 40 * len(ids))

    def after_commit(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(ok)`` on the loop once everything staged so far is committed (at
        once when nothing is staged or committing); ``ok`` is False when the commit failed
        (what it held is not kept)."""
        if not self.staged and not self.committing_bytes:
            callback(True)
            return
        self._waiting.append(callback)
        if self._wake is not None:  # (with nothing staged, no _stage would wake the loop)
            self._wake.set()

    def pending_commit(self) -> bool:
        """Something is staged or being committed."""
        return bool(self.staged) or bool(self.committing_bytes)

    # ------------------------------------------------------------------ reading

    def read(self, ids: Sequence[int]) -> dict[int, tuple[bytes, bytes, int]]:
        """The committed messages ``ids``: id -> (topic, payload, codec). Blocking but short
        (a few hundred rows by primary key from the WAL)."""
        con = self._reader
        assert con is not None
        out: dict[int, tuple[bytes, bytes, int]] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            for mid, topic, payload, codec in con.execute(
                f"SELECT id, topic, payload, codec FROM messages WHERE id IN ({marks})", part
            ):
                out[mid] = (bytes(topic), bytes(payload), codec)
        return out

    # ------------------------------------------------------------------ committing

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            ops, self.staged = self.staged, []
            waiting, self._waiting = self._waiting, []
            top = self._staged_top
            if not ops:
                for cb in waiting:
                    _call(cb, True)
                if self._closing:
                    return
                continue
            self.committing_bytes = self.staged_bytes
            self.staged_bytes = 0
            ok = True
            try:
                await loop.run_in_executor(self._writer, self._commit, ops)
            except Exception as exc:
                ok = False
                # The broker goes on in memory; what it was to keep is not kept. Said loudly,
                # and those waiting for the commit are told (a QoS 1 PUB gets an ERROR).
                self.failed = exc
                log.error("broker store %s: commit failed: %s", self.path, exc)
            ops = []  # (not held while waiting for the next batch: they hold payloads)
            self.committing_bytes = 0
            self.committed_through = max(self.committed_through, top)
            self.commits += 1
            for cb in waiting:
                _call(cb, ok)
            if self.on_commit is not None:
                self._on_commit()
            if self._closing and not self.staged:
                return

    def _on_commit(self) -> None:
        """Tell the broker; while it says more waits (a byte budget per turn), again on the
        loop's next turn, so reading back from disk never holds the loop for long."""
        assert self.on_commit is not None
        try:
            more = self.on_commit()
        except Exception:
            log.exception("broker store: the commit callback raised")
            return
        if more:
            asyncio.get_running_loop().call_soon(self._on_commit)

    def _commit(self, ops: list[tuple[Any, ...]]) -> None:
        """On the writer thread: one transaction for ``ops``, in order."""
        con = self._con
        assert con is not None
        con.execute("BEGIN IMMEDIATE")
        try:
            top = 0
            for op in ops:
                kind = op[0]
                if kind == "m":
                    _, mid, topic, payload, codec, at, names = op
                    con.execute(
                        "INSERT INTO messages VALUES (?, ?, ?, ?, ?)",
                        (mid, topic, payload, codec, at),
                    )
                    con.executemany(
                        "INSERT OR IGNORE INTO pending VALUES (?, ?)", [(n, mid) for n in names]
                    )
                    top = mid
                elif kind == "a":
                    _, name, ids = op
                    con.executemany(
                        "DELETE FROM pending WHERE name = ? AND id = ?", [(name, i) for i in ids]
                    )
                    con.executemany(
                        "DELETE FROM messages WHERE id = ?"
                        " AND NOT EXISTS (SELECT 1 FROM pending WHERE id = ?)",
                        [(i, i) for i in ids],
                    )
                elif kind == "r":
                    _, topic, payload, codec = op
                    if payload:
                        con.execute(
                            "INSERT OR REPLACE INTO retained VALUES (?, ?, ?)",
                            (topic, payload, codec),
                        )
                    else:
                        con.execute("DELETE FROM retained WHERE topic = ?", (topic,))
                elif kind == "d":
                    _, name, pattern, options = op
                    con.execute(
                        "INSERT OR REPLACE INTO durables VALUES (?, ?, ?)", (name, pattern, options)
                    )
                elif kind == "x":
                    (_, name) = op
                    con.execute("DELETE FROM durables WHERE name = ?", (name,))
                    con.execute("DELETE FROM pending WHERE name = ?", (name,))
                    con.execute("DELETE FROM messages WHERE id NOT IN (SELECT id FROM pending)")
            if top:
                # The id counter outlives its messages: ids are never reused after a restart.
                con.execute("INSERT OR REPLACE INTO meta VALUES ('last_id', ?)", (top,))
            # Free pages back to the OS in this transaction (no commit or fsync of its own).
            # Python's execute() steps a PRAGMA once, and incremental_vacuum frees one page a
            # step: one page per execute (executescript would commit the transaction first).
            free = con.execute("PRAGMA freelist_count").fetchone()[0]
            for _ in range(min(free, 1024)):
                con.execute("PRAGMA incremental_vacuum(1)")
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Commit what is staged, then close (the pattern's stop)."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            assert self._wake is not None
            self._wake.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), 30.0)
        self.close_now()

    def close_now(self) -> None:
        """Close at once (what is staged and not committed is not kept)."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        self._writer.shutdown(wait=True)
        for con in (self._reader, self._con):
            if con is not None:
                with contextlib.suppress(sqlite3.Error):
                    con.close()
        self._con = self._reader = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sync": self.sync,
            "commits": self.commits,
            "staged_bytes": self.staged_bytes + self.committing_bytes,
            "failed": str(self.failed) if self.failed is not None else None,
        }


def _call(cb: Callable[..., None], *args: bool) -> None:
    try:
        cb(*args)
    except Exception:  # one bad callback must not stop the commits
        log.exception("broker store: a commit callback raised")
