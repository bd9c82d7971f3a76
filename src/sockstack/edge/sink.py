"""The cloud sink's storage: the rows relays forward, kept exactly once (docs/EDGE.md, "Cloud
sink"). SQLite by default (:class:`SQLiteSink`), PostgreSQL for larger deployments
(:class:`PostgresSink`, psycopg 3); :func:`open_sink` picks one from a path or URL.

**Exactly once by position.** Each relay (its ``origin``) numbers its rows 1, 2, 3... and
forwards them in order, at least once. The sink keeps, per origin, the highest id it stored (its
*position*), and in **one transaction** stores the rows of a batch above it and moves it: a
batch sent again (after a crash, or an answer lost on the way back) finds its ids at or below the
position and is skipped (counted as duplicates). The transaction is durable before
:meth:`SinkStore.accept` returns (SQLite: WAL with ``synchronous=FULL``; PostgreSQL:
``synchronous_commit=on``), so the position a relay is told is one that survives a crash: it
deletes those rows from its outbox only then. A batch whose ids skip some (the relay dropped its
oldest rows when full, or quarantined damaged ones) is stored; the gap is counted.

**Values as JSON.** A row's body (msgpack) is stored as JSON (SQLite: TEXT, PostgreSQL: JSONB)
so that users query it directly. Msgpack says more than JSON: bytes become base64 strings, NaN
and infinities ``null``, non-string map keys their string form, timestamps RFC 3339 strings,
other extension values ``{"$ext": code, "data": base64}``; a body that is not msgpack at all
(a relay's bug: its checksum held) is kept as ``{"$msgpack": base64}`` and counted
(``undecodable``). PostgreSQL's text cannot hold U+0000: there it becomes U+FFFD, in values and
stream names. An intact row is never refused for its content: a refusal makes its relay retry
the batch forever.

**Batches** are bounded by the caller: a relay sends at most 1000 rows and 512 KiB a batch
(edge/forward.py), inside the protocol's 1 MiB frame; the sink holds one batch per call.
"""

from __future__ import annotations

import base64
import logging
import math
import sqlite3
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import msgspec

from sockstack.edge.records import Row, decode_value

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = [
    "MAX_ORIGIN",
    "MAX_READINGS",
    "STATS_ORIGINS",
    "BadBatch",
    "PostgresSink",
    "SQLiteSink",
    "SinkError",
    "SinkStore",
    "open_sink",
    "value_json",
]

log = logging.getLogger("sockstack.edge.sink")

MAX_ORIGIN = 64
"""Characters of an origin (a relay's identity) at most."""
MAX_RELAY_STATS = 64
"""Counters of a relay's stats kept (names of at most 64 characters, integer values)."""
STATS_ORIGINS = 256
"""Origins listed one by one in :meth:`SinkStore.stats` (the most recently seen; the totals
cover all): the answer stays well under the protocol's frame limit."""
MAX_READINGS = 100_000
"""Rows :meth:`SinkStore.readings` returns at most, whatever ``limit`` asks."""
_COUNTERS = ("rows", "duplicates", "gaps", "missing", "batches", "undecodable")
"""Kept per origin, beside its position: rows stored, rows skipped as duplicates, gaps in the
ids and the ids missing in them, batches stored, bodies that were not msgpack."""

_INT64 = (1 << 63) - 1


class BadBatch(Exception):
    """A batch refused whole, nothing of it stored: a row's checksum does not match, its ids do
    not rise, or it is malformed (the message says which)."""


class SinkError(Exception):
    """The sink's database cannot be opened or failed (the message names it and says why)."""


class SinkStore(Protocol):
    """What the sink pattern (edge/pattern.py) stores relays' rows in."""

    def accept(
        self, origin: str, rows: Sequence[Row], stats: Mapping[str, int] | None = None
    ) -> int:
        """Store durably every row above the origin's position, with the new position, in one
        transaction; return the position after it (module docstring). :class:`BadBatch` when
        a row is damaged or the ids do not rise."""
        ...

    def position(self, origin: str) -> int:
        """The highest id stored for ``origin`` (0: none)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Totals and per origin (position, rows, duplicates, gaps, reduction, last seen)."""
        ...

    def readings(
        self, origin: str | None = None, stream: str | None = None, limit: int = 1000
    ) -> list[tuple[str, int, str, int, float, Any]]:
        """(origin, id, stream, seq, time, value), the first ``limit`` in arrival order."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------- checking


def _check(origin: str, rows: Sequence[Row]) -> None:
    """BadBatch unless ``origin`` is a usable name and every row is intact, ids rising."""
    if not isinstance(origin, str) or not 0 < len(origin) <= MAX_ORIGIN or "\0" in origin:
        raise BadBatch(f"origin must be 1-{MAX_ORIGIN} characters, without NUL")
    try:
        origin.encode()
    except UnicodeEncodeError:
        raise BadBatch("origin is not valid Unicode (a lone surrogate)") from None
    if not isinstance(rows, Sequence):
        raise BadBatch(f"rows must be a sequence of rows, not {type(rows).__name__}")
    last: int | None = None
    for n, row in enumerate(rows):
        try:
            ok = row.intact()  # packs id, seq (int64) and time (f64), encodes the stream
            rid = row.id
            valid = isinstance(rid, int) and not isinstance(rid, bool)
            valid = valid and isinstance(row.stream, str) and isinstance(row.body, bytes)
        except (TypeError, ValueError, AttributeError, struct.error, OverflowError) as exc:
            raise BadBatch(f"row {n} of the batch is malformed: {exc}") from None
        if not valid:
            raise BadBatch(f"row {n} of the batch is malformed: its fields have the wrong types")
        if not ok:
            raise BadBatch(f"row {rid}: checksum does not match (nothing of the batch stored)")
        if last is not None and rid <= last:
            raise BadBatch(f"row ids must rise within a batch ({rid} after {last})")
        last = rid


def _relay_stats(stats: Mapping[str, int] | None) -> dict[str, int] | None:
    """The relay's counters worth keeping: string names, integer values, bounded in number."""
    if not isinstance(stats, Mapping):
        return None
    kept: dict[str, int] = {}
    for key, value in stats.items():
        if len(kept) >= MAX_RELAY_STATS:
            break
        if (
            isinstance(key, str)
            and 0 < len(key) <= 64
            and "\0" not in key
            and isinstance(value, int)
            and not isinstance(value, bool)
            and -_INT64 <= value <= _INT64
        ):
            kept[key] = value
    return kept


def _plan(rows: Sequence[Row], position: int) -> tuple[list[Row], int, int, int, int]:
    """(new rows, duplicates, gaps, missing ids, new position) for ``rows`` (checked) above
    ``position``."""
    new = [r for r in rows if r.id > position]
    gaps = missing = 0
    prev = position
    for r in new:
        if r.id > prev + 1:
            gaps += 1
            missing += r.id - prev - 1
        prev = r.id
    return new, len(rows) - len(new), gaps, missing, max(position, prev)


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if a and b else None


def _reduction(stats: Mapping[str, Any] | None) -> dict[str, float | None]:
    """Messages and bytes in per one out, as a relay reports them (edge/pattern.py)."""
    s = stats or {}
    return {
        "msgs": _ratio(s.get("in_msgs"), s.get("out_msgs")),
        "bytes": _ratio(s.get("in_bytes"), s.get("out_bytes")),
    }


# ---------------------------------------------------------------------------------- values


def _ext(obj: Any) -> Any:
    if isinstance(obj, msgspec.msgpack.Ext):
        return {"$ext": obj.code, "data": base64.b64encode(obj.data).decode()}
    raise TypeError(f"{type(obj).__name__} has no JSON form")


_json = msgspec.json.Encoder(enc_hook=_ext).encode
_unjson = msgspec.json.Decoder().decode


def _plain_keys(value: Any) -> Any:
    """``value`` with every map key a string (msgpack allows arrays and maps as keys)."""
    if isinstance(value, dict):
        return {
            k if isinstance(k, str) else _json(k).decode(): _plain_keys(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_plain_keys(v) for v in value]
    return value


def _without_nul(value: Any) -> Any:
    """``value`` with U+0000 in its strings (and keys) replaced by U+FFFD (for PostgreSQL)."""
    if isinstance(value, str):
        return value.replace("\0", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def value_json(body: bytes, nul: bool = True) -> tuple[bytes, bool]:
    """The JSON (UTF-8) a row's msgpack body is stored as, and False when the body is not
    msgpack (then ``{"$msgpack": base64}``). ``nul=False``: no U+0000 in strings (PostgreSQL).
    Never raises: an intact row is always stored (module docstring)."""
    try:
        value = decode_value(body)
    except Exception:  # not msgpack, or nested past the decoder's depth
        return b'{"$msgpack":"' + base64.b64encode(body) + b'"}', False
    try:
        try:
            out = _json(value)
        except TypeError:  # a map key that is an array or a map
            value = _plain_keys(value)
            out = _json(value)
        if not nul and b"\\u0000" in out:
            out = _json(_without_nul(value))
    except Exception:  # nothing should remain, but a value never stops its batch
        return b'{"$msgpack":"' + base64.b64encode(body) + b'"}', False
    return out, True


def _as_float(t: Any) -> float:
    return math.nan if t is None else float(t)


# ---------------------------------------------------------------------------------- SQLite

_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS readings(origin TEXT NOT NULL, id INTEGER NOT NULL,"
    " stream TEXT NOT NULL, seq INTEGER NOT NULL, time REAL, value TEXT NOT NULL,"
    " received REAL NOT NULL, PRIMARY KEY(origin, id))",
    "CREATE INDEX IF NOT EXISTS readings_stream_time ON readings(stream, time)",
    "CREATE TABLE IF NOT EXISTS positions(origin TEXT PRIMARY KEY, position INTEGER NOT NULL,"
    " rows INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0,"
    " gaps INTEGER NOT NULL DEFAULT 0, missing INTEGER NOT NULL DEFAULT 0,"
    " batches INTEGER NOT NULL DEFAULT 0, undecodable INTEGER NOT NULL DEFAULT 0,"
    " updated REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS relays(origin TEXT PRIMARY KEY, stats TEXT NOT NULL,"
    " updated REAL NOT NULL)",
)
_COUNTER_UPDATE = ", ".join(f"{c} = {c} + ?" for c in _COUNTERS)


class SQLiteSink:
    """The sink in one SQLite file: WAL, ``synchronous=FULL`` (each commit fsync'd), one
    connection guarded by a lock (``accept`` may be called from several threads), and a busy
    timeout for another process on the same file (its writes wait, then fail with SinkError).
    """

    backend = "sqlite"

    def __init__(self, path: str, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.target = path
        self._lock = threading.Lock()
        self.refused = 0
        """Batches refused (BadBatch) since this store was opened."""
        self._count_lock = threading.Lock()
        try:
            con = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
        except sqlite3.Error as exc:
            raise SinkError(f"cannot open the sink {path!r}: {exc}") from None
        try:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and path != ":memory:":
                log.warning("sink %s: journal mode %s, not WAL", path, mode)
            con.execute("PRAGMA synchronous=FULL")  # WAL + FULL: every commit is fsync'd
            con.execute("PRAGMA journal_size_limit=67108864")
            con.execute("BEGIN IMMEDIATE")
            for sql in _SQLITE_SCHEMA:
                con.execute(sql)
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            con.close()
            raise SinkError(f"cannot open the sink {path!r}: {exc}") from None
        self._con: sqlite3.Connection | None = con

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            raise SinkError(f"the sink {self.path!r} is closed")
        return self._con

    def accept(
        self, origin: str, rows: Sequence[Row], stats: Mapping[str, int] | None = None
    ) -> int:
        relay = _admit(self, origin, rows, stats)
        if not rows and relay is None:
            return self.position(origin)
        with self._lock:
            con = self._connection()
            try:
                con.execute("BEGIN IMMEDIATE")  # the write lock first: the position stays ours
                try:
                    top = self._accept(con, origin, rows, relay)
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise SinkError(f"sink {self.path!r}: {exc}") from exc
        return top

    def _accept(
        self,
        con: sqlite3.Connection,
        origin: str,
        rows: Sequence[Row],
        relay: dict[str, int] | None,
    ) -> int:
        now = time.time()
        found = con.execute("SELECT position FROM positions WHERE origin = ?", (origin,))
        got = found.fetchone()
        if got is None:
            con.execute(
                "INSERT INTO positions(origin, position, updated) VALUES (?, 0, ?)", (origin, now)
            )
            position = 0
        else:
            position = int(got[0])
        new, duplicates, gaps, missing, top = _plan(rows, position)
        undecodable = 0
        if new:
            values = []
            for r in new:
                text, ok = value_json(r.body)
                undecodable += not ok
                values.append((origin, r.id, r.stream, r.seq, r.time, text.decode(), now))
            con.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?)", values)
        con.execute(
            f"UPDATE positions SET position = ?, {_COUNTER_UPDATE}, updated = ? WHERE origin = ?",
            (top, len(new), duplicates, gaps, missing, 1 if new else 0, undecodable, now, origin),
        )
        if relay is not None:
            con.execute(
                "INSERT INTO relays VALUES (?, ?, ?) ON CONFLICT(origin) DO UPDATE"
                " SET stats = excluded.stats, updated = excluded.updated",
                (origin, _json(relay).decode(), now),
            )
        return top

    def position(self, origin: str) -> int:
        with self._lock:
            try:
                got = (
                    self._connection()
                    .execute("SELECT position FROM positions WHERE origin = ?", (origin,))
                    .fetchone()
                )
            except sqlite3.Error as exc:
                raise SinkError(f"sink {self.path!r}: {exc}") from exc
        return int(got[0]) if got else 0

    def stats(self) -> dict[str, Any]:
        counters = ", ".join(f"coalesce(sum({c}), 0)" for c in _COUNTERS)
        sums = ", ".join(
            f"sum(json_extract(stats, '$.{k}'))"
            for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")
        )
        with self._lock:
            con = self._connection()
            try:
                totals = con.execute(f"SELECT count(*), {counters} FROM positions").fetchone()
                relay_sums = con.execute(f"SELECT {sums} FROM relays").fetchone()
                listed = con.execute(
                    f"SELECT p.origin, p.position, {', '.join('p.' + c for c in _COUNTERS)},"
                    " p.updated, r.stats FROM positions p LEFT JOIN relays r USING(origin)"
                    " ORDER BY p.updated DESC LIMIT ?",
                    (STATS_ORIGINS,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise SinkError(f"sink {self.path!r}: {exc}") from exc
        return _stats_dict(self, totals, relay_sums, listed)

    def readings(
        self, origin: str | None = None, stream: str | None = None, limit: int = 1000
    ) -> list[tuple[str, int, str, int, float, Any]]:
        where, args = _filters(origin, stream, "?")
        limit = max(0, min(int(limit), MAX_READINGS))
        with self._lock:
            try:
                got = (
                    self._connection()
                    .execute(
                        "SELECT origin, id, stream, seq, time, value FROM readings"
                        f"{where} ORDER BY rowid LIMIT ?",
                        (*args, limit),
                    )
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise SinkError(f"sink {self.path!r}: {exc}") from exc
        return [(o, i, s, q, _as_float(t), _unjson(v)) for o, i, s, q, t, v in got]

    def close(self) -> None:
        with self._lock:
            con, self._con = self._con, None
            if con is not None:
                try:
                    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass  # another process reads the file: its WAL stays, nothing is lost
                con.close()


def _filters(origin: str | None, stream: str | None, mark: str) -> tuple[str, tuple[str, ...]]:
    clauses, args = [], []
    if origin is not None:
        clauses.append(f"origin = {mark}")
        args.append(origin)
    if stream is not None:
        clauses.append(f"stream = {mark}")
        args.append(stream)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def _admit(
    sink: SQLiteSink | PostgresSink,
    origin: str,
    rows: Sequence[Row],
    stats: Mapping[str, int] | None,
) -> dict[str, int] | None:
    """A batch's checks, both backends: BadBatch (counted as refused) unless it may be stored;
    the relay's counters to keep, if it sent any."""
    try:
        _check(origin, rows)
    except BadBatch:
        with sink._count_lock:
            sink.refused += 1
        raise
    return _relay_stats(stats)


def _stats_dict(
    sink: SQLiteSink | PostgresSink,
    totals: Sequence[Any],
    relay_sums: Sequence[Any],
    listed: Sequence[Sequence[Any]],
) -> dict[str, Any]:
    """The JSON-able answer of ``stats()`` from the queries' rows (both backends)."""
    in_msgs, out_msgs, in_bytes, out_bytes = (int(v or 0) for v in relay_sums)
    origins: dict[str, Any] = {}
    for row in listed:
        origin, position = row[0], int(row[1])
        counters = {c: int(v) for c, v in zip(_COUNTERS, row[2 : 2 + len(_COUNTERS)], strict=True)}
        updated, relay = row[-2], row[-1]
        if isinstance(relay, str):
            relay = _unjson(relay)
        origins[origin] = {
            "position": position,
            **counters,
            "last_seen": float(updated),
            "relay": relay,
            "reduction": _reduction(relay),
        }
    return {
        "backend": sink.backend,
        "target": sink.target,
        "totals": {
            "origins": int(totals[0]),
            **{c: int(v) for c, v in zip(_COUNTERS, totals[1:], strict=True)},
            "refused": sink.refused,
            "in_msgs": in_msgs,
            "out_msgs": out_msgs,
            "in_bytes": in_bytes,
            "out_bytes": out_bytes,
            "reduction": _reduction(
                {
                    "in_msgs": in_msgs,
                    "out_msgs": out_msgs,
                    "in_bytes": in_bytes,
                    "out_bytes": out_bytes,
                }
            ),
        },
        "origins": origins,
        "origins_listed": len(origins),
    }


# ---------------------------------------------------------------------------------- PostgreSQL

_PG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS readings(origin text NOT NULL, id bigint NOT NULL,"
    " stream text NOT NULL, seq bigint NOT NULL, time double precision NOT NULL,"
    " value jsonb NOT NULL, received timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (origin, id))",
    "CREATE INDEX IF NOT EXISTS readings_stream_time ON readings(stream, time)",
    "CREATE TABLE IF NOT EXISTS positions(origin text PRIMARY KEY, position bigint NOT NULL,"
    " rows bigint NOT NULL DEFAULT 0, duplicates bigint NOT NULL DEFAULT 0,"
    " gaps bigint NOT NULL DEFAULT 0, missing bigint NOT NULL DEFAULT 0,"
    " batches bigint NOT NULL DEFAULT 0, undecodable bigint NOT NULL DEFAULT 0,"
    " updated timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS relays(origin text PRIMARY KEY, stats jsonb NOT NULL,"
    " updated timestamptz NOT NULL DEFAULT now())",
)
_PG_SCHEMA_LOCK = 0x736F636B  # "sock": the advisory lock two sinks creating tables take
_PG_COUNTER_UPDATE = ", ".join(f"{c} = {c} + %s" for c in _COUNTERS)


def redact(url: str) -> str:
    """``url`` without its password and query (what stats and errors show)."""
    try:
        u = urlsplit(url)
        host = u.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = (f"{u.username}@" if u.username else "") + host
        if u.port:
            netloc += f":{u.port}"
        return f"{u.scheme}://{netloc}{u.path}"
    except ValueError:
        return f"{url.split('://', 1)[0]}://..."


class PostgresSink:
    """The sink in a PostgreSQL database (psycopg 3): each batch one transaction that locks its
    origin's position row (``SELECT ... FOR UPDATE``), so that two accepts of the same origin at
    once, in this process or in two sinks on one database, never both store an id; batches go
    in by ``COPY`` (faster than ``executemany`` for 1000-row batches: docs/EDGE.md);
    ``synchronous_commit=on`` for every connection.

    Connections come from a small pool (``psycopg_pool``, ``max_connections``): batches of
    different relays are stored in parallel (docs/EDGE.md: 4 relays at once, 1.1 to 1.4 times
    the rows a second of one connection with the server on the same 2-core machine; more with
    a database across a network, where one connection would wait out every round trip of every
    batch in turn), and a connection the server dropped (a restart) is replaced, its batch
    tried once more at once (safe: a batch that had committed is skipped by position).
    """

    backend = "postgresql"

    def __init__(
        self, url: str, *, max_connections: int = 4, connect_timeout: float = 10.0
    ) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise SinkError(
                "a PostgreSQL sink needs psycopg 3 and psycopg_pool: pip install 'sockstack[edge]'"
            ) from None
        self.target = redact(url)
        self.refused = 0
        self._count_lock = threading.Lock()
        self._psycopg = psycopg
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        timeout = max(1, round(connect_timeout))
        try:  # one connection first: a refusal's reason (the pool would only time out)
            with psycopg.connect(url, autocommit=True, connect_timeout=timeout) as conn:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                    for sql in _PG_SCHEMA:
                        conn.execute(sql)
                fsync = conn.execute("SHOW fsync").fetchone()
            pool = ConnectionPool(
                url,
                min_size=1,
                max_size=max(1, max_connections),
                kwargs={"autocommit": True, "connect_timeout": timeout},
                configure=self._configure,
                timeout=connect_timeout,
                name="sockstack-sink",
                open=False,
            )
        except psycopg.Error as exc:
            raise SinkError(f"cannot open the sink {self.target}: {exc}") from None
        try:
            pool.open(wait=True, timeout=connect_timeout)
        except Exception as exc:
            pool.close()
            raise SinkError(f"cannot open the sink {self.target}: {exc}") from None
        self._pool = pool
        self.fsync = bool(fsync and fsync[0] == "on")
        if not self.fsync:
            log.warning("sink %s: the server runs with fsync off: commits are not durable", url)

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET synchronous_commit = on")  # the commit waits for the WAL's flush

    def _pool_open(self) -> ConnectionPool[psycopg.Connection[Any]]:
        if self._pool is None:
            raise SinkError(f"the sink {self.target} is closed")
        return self._pool

    def accept(
        self, origin: str, rows: Sequence[Row], stats: Mapping[str, int] | None = None
    ) -> int:
        relay = _admit(self, origin, rows, stats)
        if not rows and relay is None:
            return self.position(origin)
        pool = self._pool_open()
        for attempt in (1, 2):
            conn = None
            try:
                with pool.connection() as conn, conn.transaction():
                    return self._accept(conn, origin, rows, relay)
            except self._psycopg.OperationalError as exc:
                # A connection the server dropped (a restart): the pool replaces it. Once more
                # at once, which is safe even if the commit had been done: the batch is then
                # skipped by position.
                if attempt == 2 or conn is None or not conn.broken:
                    raise SinkError(f"sink {self.target}: {exc}") from exc
            except self._psycopg.Error as exc:
                raise SinkError(f"sink {self.target}: {exc}") from exc
        raise AssertionError("unreachable")

    def _accept(
        self,
        conn: psycopg.Connection[Any],
        origin: str,
        rows: Sequence[Row],
        relay: dict[str, int] | None,
    ) -> int:
        from psycopg.types.json import Jsonb

        cur = conn.cursor()
        lock = "SELECT position FROM positions WHERE origin = %s FOR UPDATE"
        got = cur.execute(lock, (origin,)).fetchone()
        if got is None:  # a new origin: its row, then its lock (a concurrent insert waits)
            cur.execute(
                "INSERT INTO positions(origin, position) VALUES (%s, 0)"
                " ON CONFLICT (origin) DO NOTHING",
                (origin,),
            )
            got = cur.execute(lock, (origin,)).fetchone()
            assert got is not None
        new, duplicates, gaps, missing, top = _plan(rows, int(got[0]))
        undecodable = 0
        if new:
            with cur.copy("COPY readings(origin, id, stream, seq, time, value) FROM STDIN") as copy:
                for r in new:
                    text, ok = value_json(r.body, nul=False)
                    undecodable += not ok
                    stream = r.stream.replace("\0", "\ufffd") if "\0" in r.stream else r.stream
                    copy.write_row((origin, r.id, stream, r.seq, r.time, text.decode()))
        cur.execute(
            f"UPDATE positions SET position = %s, {_PG_COUNTER_UPDATE}, updated = now()"
            " WHERE origin = %s",
            (top, len(new), duplicates, gaps, missing, 1 if new else 0, undecodable, origin),
        )
        if relay is not None:
            cur.execute(
                "INSERT INTO relays(origin, stats) VALUES (%s, %s) ON CONFLICT (origin)"
                " DO UPDATE SET stats = excluded.stats, updated = excluded.updated",
                (origin, Jsonb(relay)),
            )
        return top

    def position(self, origin: str) -> int:
        try:
            with self._pool_open().connection() as conn:
                got = conn.execute(
                    "SELECT position FROM positions WHERE origin = %s", (origin,)
                ).fetchone()
        except self._psycopg.Error as exc:
            raise SinkError(f"sink {self.target}: {exc}") from exc
        return int(got[0]) if got else 0

    def stats(self) -> dict[str, Any]:
        counters = ", ".join(f"coalesce(sum({c}), 0)" for c in _COUNTERS)
        sums = ", ".join(
            f"sum((stats->>'{k}')::numeric)"
            for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")
        )
        try:
            with self._pool_open().connection() as conn:
                totals = conn.execute(f"SELECT count(*), {counters} FROM positions").fetchone()
                relay_sums = conn.execute(f"SELECT {sums} FROM relays").fetchone()
                listed = conn.execute(
                    f"SELECT p.origin, p.position, {', '.join('p.' + c for c in _COUNTERS)},"
                    " extract(epoch FROM p.updated), r.stats"
                    " FROM positions p LEFT JOIN relays r USING (origin)"
                    " ORDER BY p.updated DESC LIMIT %s",
                    (STATS_ORIGINS,),
                ).fetchall()
        except self._psycopg.Error as exc:
            raise SinkError(f"sink {self.target}: {exc}") from exc
        assert totals is not None and relay_sums is not None
        out = _stats_dict(self, totals, relay_sums, listed)
        out["fsync"] = self.fsync
        return out

    def readings(
        self, origin: str | None = None, stream: str | None = None, limit: int = 1000
    ) -> list[tuple[str, int, str, int, float, Any]]:
        where, args = _filters(origin, stream, "%s")
        limit = max(0, min(int(limit), MAX_READINGS))
        try:
            with self._pool_open().connection() as conn:
                got = conn.execute(
                    "SELECT origin, id, stream, seq, time, value FROM readings"
                    f"{where} ORDER BY received, origin, id LIMIT %s",
                    (*args, limit),
                ).fetchall()
        except self._psycopg.Error as exc:
            raise SinkError(f"sink {self.target}: {exc}") from exc
        return [(o, int(i), s, int(q), float(t), v) for o, i, s, q, t, v in got]

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def open_sink(target: str) -> SinkStore:
    """The sink store ``target`` names: ``postgresql://...`` or ``postgres://...`` (libpq's
    URL) a :class:`PostgresSink`; ``sqlite://PATH`` or a plain path a :class:`SQLiteSink`
    (``sqlite:///abs/cloud.db`` is the absolute path ``/abs/cloud.db``)."""
    t = target.strip()
    if t.startswith(("postgresql://", "postgres://")):
        return PostgresSink(t)
    if t.startswith("sqlite://"):
        t = t[len("sqlite://") :]
    elif "://" in t:
        scheme = t.split("://", 1)[0]
        raise ValueError(
            f"unknown sink {scheme}://: give a file path, sqlite:///path or postgresql://..."
        )
    if not t:
        raise ValueError("the sink needs a file path or a postgresql:// URL")
    return SQLiteSink(t)
