"""``sockstack edge status FILE`` and ``sockstack edge verify FILE``: a relay's store read from
its file, whether the relay runs or not.

``status`` opens the file read-only (SQLite's WAL lets it read beside a running relay): the
backlog, the oldest row's age, the counters and the forward rate the relay last wrote.
``verify`` checks the file (SQLite's ``integrity_check``) and every row's checksum. When no
relay has the store open, it also repairs: damaged rows go to quarantine, and a file SQLite
finds damaged is moved aside and rebuilt from what is intact (as a relay does when it starts);
beside a running relay it only reports.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import msgspec

from sockstack.edge.store import (
    ROW_OVERHEAD,
    Outbox,
    StoreLocked,
    bad_rows,
    integrity_of,
    meta_crc,
)

__all__ = ["file_status", "verify"]

_unpack = msgspec.msgpack.Decoder().decode


def _read_only(path: str) -> sqlite3.Connection:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such store")
    return sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, timeout=5.0)


def _meta(con: sqlite3.Connection) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value, crc in con.execute("SELECT key, value, crc FROM meta"):
        if isinstance(value, bytes) and meta_crc(key, value) == crc:
            out[key] = value.decode() if key == "origin" else _unpack(value)
    return out


def file_status(path: str, now: float | None = None) -> dict[str, Any]:
    """What a store's file says: backlog, oldest age, counters, what the relay last wrote."""
    now = time.time() if now is None else now
    con = _read_only(path)
    try:
        rows, nbytes, oldest, first, last = con.execute(
            "SELECT count(*), coalesce(sum(length(stream) + length(body)), 0),"
            " min(added), min(id), max(id) FROM outbox"
        ).fetchone()
        quarantined = con.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        meta = _meta(con)
    finally:
        con.close()
    live = meta.get("live") or {}
    return {
        "path": path,
        "origin": meta.get("origin"),
        "backlog_rows": rows,
        "backlog_bytes": nbytes + rows * ROW_OVERHEAD,
        "oldest_age": None if oldest is None else max(0.0, now - oldest),
        "first_id": first,
        "last_id": last,
        "next_id": meta.get("next_id"),
        "quarantine_rows": quarantined,
        "counters": meta.get("counters") or {},
        "live": live,
        "live_age": None if "updated" not in live else max(0.0, now - live["updated"]),
        "running": _locked(path),
    }


def _locked(path: str) -> bool:
    """True when a relay holds the store's lock."""
    import fcntl

    try:
        fd = os.open(path + ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def verify(path: str, repair: bool = True) -> dict[str, Any]:
    """Check ``path``: SQLite's integrity check and every row's checksum. With ``repair`` and
    no relay running: heal a damaged file and quarantine bad rows. Returns the report."""
    report: dict[str, Any] = {"path": path, "repaired": False, "running": False}
    if repair:
        store = Outbox(path)
        try:
            store.open()  # heals a file SQLite finds damaged; quarantines bad meta rows
        except StoreLocked:
            report["running"] = True
            repair = False
        else:
            try:
                report["repaired"] = True
                report["healed"] = store.damaged_path is not None
                report["damaged_file"] = store.damaged_path
                report["salvaged_rows"] = store.counters.salvaged if store.damaged_path else 0
                report["rows_checked"], report["rows_bad"] = store.verify_rows()
                report["quarantined_now"] = report["rows_bad"]
                report["integrity"] = store.integrity()
            finally:
                store.close_now()
            report["quarantine_rows"] = file_status(path)["quarantine_rows"]
            return report
    con = _read_only(path)
    try:
        report["integrity"] = integrity_of(con)
        if report["integrity"] == "ok":
            report["rows_checked"], bad = bad_rows(con)
            report["rows_bad"] = len(bad)
        report["quarantine_rows"] = con.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        report["integrity"] = str(exc)
    finally:
        con.close()
    return report
