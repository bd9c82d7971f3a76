"""A client's session on an object server: the objects exported to it, counted, and its lease.

Sans-I/O: no sockets, no clock (times are arguments). The pattern (``objects/pattern.py``)
keeps one :class:`Session` per client session and one :class:`Tables` for the server's totals.

- **Exports.** An exposed object that crosses to the client (in a result) is exported under a
  random 16-byte id, scoped to this session: another session cannot name it. Each crossing
  counts +1; a RELEASE from the client subtracts what it says (never below 0); at 0 the entry
  goes and the object is no longer held for this client. The same object crossing again gets
  the same id while its entry lives.
- **Bounds.** Entries and bytes (200 bytes of bookkeeping plus the object's shallow
  ``sys.getsizeof``) per session and for the whole server: past a bound the export is refused
  with :class:`TooManyObjects` (the call that returned it answers TOO_MANY_OBJECTS).
- **Lease.** A session outlives its connection for ``lease`` seconds after its last frame, so
  a client that reconnects within it (``objects.attach`` with its token) keeps its objects; a
  session whose client is gone longer is freed whole (:meth:`Session.clear`).
"""

from __future__ import annotations

import hmac
import secrets
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sockstack.objects.expose import Exposed

__all__ = ["ENTRY_OVERHEAD", "Export", "Session", "Tables", "TooManyObjects"]

ENTRY_OVERHEAD = 200
"""Bytes counted per exported entry beside the object's own shallow size."""
ID_SIZE = 16
MAX_COUNT = 0xFFFFFFFF


class TooManyObjects(Exception):
    """An export refused by a bound (its message names the bound)."""


@dataclass(slots=True)
class Export:
    obj: object
    exposed: Exposed
    count: int
    size: int


@dataclass(slots=True)
class Tables:
    """The server's totals over every session, and its bounds."""

    max_objects: int
    max_bytes: int
    max_total_objects: int
    max_total_bytes: int
    objects: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held by every change of a session's exports: a callback encoded in a worker thread
    exports there, while the event loop releases."""


class Session:
    """One client's exports, its session-mode instances, and when it expires."""

    __slots__ = (
        "_by_obj",
        "_instance_sizes",
        "bytes",
        "dead",
        "expires",
        "exports",
        "instances",
        "peer",
        "tables",
        "token",
    )

    def __init__(self, tables: Tables) -> None:
        self.token = secrets.token_bytes(ID_SIZE)
        self.tables = tables
        self.exports: dict[bytes, Export] = {}
        self._by_obj: dict[int, bytes] = {}  # id(obj) -> export id (the entry holds obj)
        self.bytes = 0
        self.instances: dict[str, tuple[object, object]] = {}
        """Session-mode instances by registered name: (the registration, the instance)."""
        self._instance_sizes: dict[str, int] = {}
        self.dead = False
        """Freed (ended or expired): nothing is exported to it any more."""
        self.peer: Any = None  # the connection it is attached to; None while detached
        self.expires: float | None = None  # while detached: when it is freed

    def matches(self, token: bytes) -> bool:
        return hmac.compare_digest(self.token, token)

    def _room(self, size: int) -> None:
        t = self.tables
        if len(self.exports) + len(self.instances) >= t.max_objects:
            raise TooManyObjects(f"this session holds {t.max_objects} objects (limit)")
        if self.bytes + size > t.max_bytes:
            raise TooManyObjects(f"this session's objects would exceed {t.max_bytes} bytes")
        if t.objects >= t.max_total_objects:
            raise TooManyObjects(f"the server holds {t.max_total_objects} objects (limit)")
        if t.bytes + size > t.max_total_bytes:
            raise TooManyObjects(f"the server's objects would exceed {t.max_total_bytes} bytes")

    def keep_instance(self, name: str, registration: object, obj: object) -> None:
        """Keep a session-mode instance (counted as an object, in its bytes), replacing one
        of an older registration of the name. Raises :class:`TooManyObjects`."""
        with self.tables.lock:
            self._keep_instance(name, registration, obj)

    def _keep_instance(self, name: str, registration: object, obj: object) -> None:
        if self.dead:
            raise TooManyObjects("the session has ended")
        self._drop_instance(name)
        size = ENTRY_OVERHEAD + sys.getsizeof(obj)
        self._room(size)
        self.instances[name] = (registration, obj)
        self._instance_sizes[name] = size
        self.bytes += size
        self.tables.objects += 1
        self.tables.bytes += size

    def _drop_instance(self, name: str) -> None:
        if self.instances.pop(name, None) is not None:
            size = self._instance_sizes.pop(name, 0)
            self.bytes -= size
            self.tables.objects -= 1
            self.tables.bytes -= size

    def export(self, obj: object, exposed: Exposed) -> bytes:
        """The id ``obj`` crosses under (its count +1). Raises :class:`TooManyObjects` (also
        once the session has ended: what would cross is nobody's)."""
        with self.tables.lock:
            return self._export(obj, exposed)

    def _export(self, obj: object, exposed: Exposed) -> bytes:
        if self.dead:
            raise TooManyObjects("the session has ended")
        key = self._by_obj.get(id(obj))
        if key is not None:
            entry = self.exports[key]
            if entry.count < MAX_COUNT:
                entry.count += 1
            return key
        t = self.tables
        size = ENTRY_OVERHEAD + sys.getsizeof(obj)
        self._room(size)
        key = secrets.token_bytes(ID_SIZE)
        while key in self.exports:  # (2^-128: never, but never a wrong object either)
            key = secrets.token_bytes(ID_SIZE)
        self.exports[key] = Export(obj, exposed, 1, size)
        self._by_obj[id(obj)] = key
        self.bytes += size
        t.objects += 1
        t.bytes += size
        return key

    def room_for(self, objs: list[object]) -> str | None:
        """Why exporting ``objs`` (those not exported yet) would pass a bound, or None."""
        if len(objs) == 1:  # (the common case: a method returned an object)
            obj = objs[0]
            if id(obj) in self._by_obj:
                return None
            t = self.tables
            size = ENTRY_OVERHEAD + sys.getsizeof(obj)
            if (
                not self.dead
                and len(self.exports) + len(self.instances) < t.max_objects
                and self.bytes + size <= t.max_bytes
                and t.objects < t.max_total_objects
                and t.bytes + size <= t.max_total_bytes
            ):
                return None  # (else the general path below says which bound)
        with self.tables.lock:
            if self.dead:
                return "the session has ended"
            seen: set[int] = set()
            n = size = 0
            for obj in objs:
                if id(obj) in self._by_obj or id(obj) in seen:
                    continue
                seen.add(id(obj))
                n += 1
                size += ENTRY_OVERHEAD + sys.getsizeof(obj)
            if not n:
                return None
            t = self.tables
            if len(self.exports) + len(self.instances) + n > t.max_objects:
                return f"this session holds {t.max_objects} objects (limit)"
            if self.bytes + size > t.max_bytes:
                return f"this session's objects would exceed {t.max_bytes} bytes"
            if t.objects + n > t.max_total_objects:
                return f"the server holds {t.max_total_objects} objects (limit)"
            if t.bytes + size > t.max_total_bytes:
                return f"the server's objects would exceed {t.max_total_bytes} bytes"
            return None

    def get(self, key: bytes) -> Export | None:
        return self.exports.get(key)

    def release(self, key: bytes, count: int) -> bool:
        """Subtract ``count`` crossings of ``key`` (unknown ids and counts past 0 are ignored:
        False); the entry goes at 0."""
        with self.tables.lock:
            entry = self.exports.get(key)
            if entry is None or count <= 0:
                return False
            entry.count -= min(count, entry.count)
            if entry.count == 0:
                self._drop(key, entry)
            return True

    def _drop(self, key: bytes, entry: Export) -> None:
        del self.exports[key]
        self._by_obj.pop(id(entry.obj), None)
        self.bytes -= entry.size
        self.tables.objects -= 1
        self.tables.bytes -= entry.size

    def clear(self) -> int:
        """Free everything (the session ended, or its lease expired); how many entries went."""
        with self.tables.lock:
            n = len(self.exports)
            for key, entry in list(self.exports.items()):
                self._drop(key, entry)
            for name in list(self.instances):
                self._drop_instance(name)
            return n

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.exports)
