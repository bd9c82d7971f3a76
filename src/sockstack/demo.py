"""The built-in demo, served by ``sockstack serve`` when no service is named: the service
:class:`Demo` and the remote object :class:`Counter` (registered as "counter")."""

from __future__ import annotations

import asyncio
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Set
from typing import TYPE_CHECKING, Any, Literal

from sockstack.objects.expose import expose
from sockstack.rpc.service import Service, ServiceError, method

__all__ = ["KEY_OVERHEAD", "MAX_BYTES", "MAX_KEYS", "Counter", "Demo", "value_size"]

MAX_KEYS = 10_000
"""Default bound of the key-value store, in keys."""
MAX_BYTES = 64 << 20
"""Default bound of the key-value store, in bytes of memory: keys and values as
:func:`value_size` counts them, plus :data:`KEY_OVERHEAD` per key (the broker's retained store
has the same default)."""
KEY_OVERHEAD = 192
"""Bytes a stored key costs beyond its key and value objects: the (value, size, version) tuple
(64 B), the size and the version (ints, 32 B each as allocated) and its dict entry (keys are
str: 16 B of entry and 4 of index, times the table's spare room: at most 44 B per key,
measured from 1,000 to 1,200,000 keys), 172 B at worst (CPython 3.11, 64-bit), with room to
spare. Measured before the version existed: 135-184 B per key of RSS; tests/gateway/test_kv.py
measures a full store with tracemalloc."""

_SHARED = frozenset({type(None), bool})

Condition = Literal["*"] | Set[str] | None
"""A precondition on a stored key, as HTTP's ``If-Match``/``If-None-Match`` give it: ``"*"``
(any current value), a set of entity tags (quoted, as :meth:`Demo.entry` gives them), or None
(no condition)."""


_WIRE_NAMES = {
    type(None): "nil",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    bytes: "bin",
    list: "array",
    dict: "map",
}


def _kind(value: Any) -> str:
    """A value's type as the wire names it (msgpack's names), for error messages."""
    return _WIRE_NAMES.get(type(value), type(value).__name__)


def _check_key(key: Any) -> None:
    """Keys are strings (docs/PROTOCOL.md Appendix A): any other value, even a hashable one,
    is refused, so that ``keys`` can always sort them."""
    if type(key) is not str:
        raise ServiceError(
            f"a key is a str, not {_kind(key)}"
        )  # singletons: a reference costs its slot only


def value_size(value: Any, limit: int) -> int:
    """Bytes of memory ``value`` takes: ``sys.getsizeof`` of it and of everything it holds
    (lists, tuples, dicts, their keys and items); None, booleans and small ints are shared, so
    a reference to one costs only its container's slot. Counting stops once the total passes
    ``limit``. Cost: ~50-230 ns per element (a 1 MiB msgpack body of a million elements is
    walked in 30-230 ms; bounding a body's element count is the decoder's job)."""
    getsizeof = sys.getsizeof
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t in _SHARED or (t is int and -5 <= v <= 256):
            continue
        total += getsizeof(v)
        if total > limit:
            return total
        if t is list or t is tuple:
            stack.extend(v)
        elif t is dict and v:
            stack.extend(v)
            stack.extend(v.values())
    return total


class Demo(Service):
    """echo, add, time, sleep, count (a stream) and a small in-memory key-value store, bounded
    to ``max_keys`` keys (default 10,000) and ``max_bytes`` bytes of memory (default 64 MiB;
    keys and values as :func:`value_size` counts them, plus :data:`KEY_OVERHEAD` per key).
    ``set`` beyond either is refused with a ServiceError that says which bound and by how much.

    The store is also the gateway's ``/kv`` resource (:mod:`sockstack.gateway.kv`) through
    plain methods that are not RPC methods: :meth:`entry`, :meth:`put`, :meth:`remove` and
    :meth:`keys`. Every write stamps its key with the next value of a store-wide counter, so a
    key's entity tag (``"EPOCH-VERSION"``, EPOCH random per store: a restart never repeats a
    tag) changes with every ``set``, ``put`` and recreation, whichever transport made it, and
    a conditional write compares and sets under the store's lock."""

    def __init__(self, max_keys: int = MAX_KEYS, max_bytes: int = MAX_BYTES) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._kv: dict[str, tuple[Any, int, int]] = {}  # key -> (value, bytes charged, version)
        self._bytes = 0
        self._version = 0  # store-wide: every write and delete counts one
        self._tag = '"' + secrets.token_hex(4) + "-"
        self._lock = threading.Lock()

    @method(inline=True, readonly=True)
    def echo(self, value: Any = None) -> Any:
        """Return the argument unchanged."""
        return value

    @method(inline=True, readonly=True)
    def add(self, a: Any, b: Any) -> Any:
        """a + b: two numbers (int or float), two strings or two arrays (concatenated)."""
        numbers = (int, float)
        if (
            (type(a) in numbers and type(b) in numbers)
            or (type(a) is str and type(b) is str)
            or (type(a) is list and type(b) is list)
        ):
            return a + b
        raise ServiceError(f"cannot add {_kind(a)} and {_kind(b)}")

    @method(inline=True, readonly=True)
    def time(self) -> float:
        """The server's wall-clock time (seconds since the epoch)."""
        return time.time()

    @method
    async def count(self, n: int, interval: float = 0) -> AsyncIterator[int]:
        """Stream the integers 0 to n - 1 (n at most 1,000,000), ``interval`` seconds apart (0
        to 1): ``sockstack call URL count 5`` or ``client.stream("count", 5)`` (TCP, TLS)."""
        if not 0 <= n <= 1_000_000:
            raise ServiceError("n must be between 0 and 1000000")
        if not 0 <= interval <= 1:
            raise ServiceError("interval must be a number between 0 and 1")
        for i in range(n):
            if interval and i:
                await asyncio.sleep(interval)
            yield i

    @method
    async def sleep(self, seconds: float) -> float:
        """Wait ``seconds`` (at most 60) on the server without blocking it; returns them."""
        if type(seconds) not in (int, float) or not 0 <= seconds <= 60:
            raise ServiceError("seconds must be a number between 0 and 60")
        await asyncio.sleep(seconds)
        return seconds

    @method(inline=True)
    def set(self, key: str, value: Any) -> bool:
        """Store ``value`` under ``key``; True if the key is new."""
        written = self.put(key, value)
        assert written is not None  # (no condition: it cannot fail one)
        return written[0]

    @method(inline=True, readonly=True)
    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        _check_key(key)
        with self._lock:
            entry = self._kv.get(key)
            return default if entry is None else entry[0]

    @method(inline=True)
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""
        return self.remove(key) is True

    @method(inline=True, readonly=True)
    def keys(self) -> list[str]:
        """The stored keys, sorted."""
        with self._lock:
            return sorted(self._kv)

    @method(inline=True, readonly=True)
    def methods(self) -> list[str]:
        """The names of this service's methods."""
        return ["add", "count", "delete", "echo", "get", "keys", "methods", "set", "sleep", "time"]

    # ------------------------------------------------ the store as a resource (not RPC methods)

    def _etag(self, version: int) -> str:
        return f'{self._tag}{version}"'

    def _holds(self, old: tuple[Any, int, int] | None, condition: Condition) -> bool:
        """Whether ``condition`` matches the current entry (under the lock)."""
        if old is None or condition is None:
            return False
        return isinstance(condition, str) or self._etag(old[2]) in condition  # str: "*"

    def entry(self, key: str) -> tuple[Any, str] | None:
        """The value under ``key`` and its entity tag, or None."""
        _check_key(key)
        with self._lock:
            old = self._kv.get(key)
            return None if old is None else (old[0], self._etag(old[2]))

    def put(
        self,
        key: str,
        value: Any,
        *,
        if_match: Condition = None,
        if_none_match: Condition = None,
    ) -> tuple[bool, str] | None:
        """Store ``value`` under ``key`` if the conditions hold, compared and set under the
        lock: ``if_match`` must match the current entry (``"*"``: any), ``if_none_match`` must
        not (``"*"``: there must be none). (True if the key is new, its new entity tag); None
        when a condition fails. A full store raises ServiceError. Either way a refusal changes
        nothing."""
        _check_key(key)  # before anything is counted
        cost = KEY_OVERHEAD + value_size(key, self.max_bytes)
        cost += value_size(value, self.max_bytes - cost)
        with self._lock:
            old = self._kv.get(key)
            if if_match is not None and not self._holds(old, if_match):
                return None
            if if_none_match is not None and self._holds(old, if_none_match):
                return None
            if old is None and len(self._kv) >= self.max_keys:
                raise ServiceError(f"store is full ({self.max_keys} keys)")
            freed = 0 if old is None else old[1]
            used = self._bytes - freed
            if used + cost > self.max_bytes:
                raise ServiceError(
                    f"store is full: {used} of {self.max_bytes} bytes in use, this value needs "
                    f"{cost}{'+' if cost > self.max_bytes else ''}; delete keys first"
                )
            self._version = version = self._version + 1
            self._kv[key] = (value, cost, version)
            self._bytes = used + cost
            return old is None, self._etag(version)

    def remove(
        self, key: str, *, if_match: Condition = None, if_none_match: Condition = None
    ) -> bool | None:
        """Remove ``key`` if the conditions hold (as :meth:`put` checks them): True if it
        existed, False if not (whatever the conditions), None when a condition fails (nothing
        removed)."""
        _check_key(key)
        with self._lock:
            old = self._kv.get(key)
            if old is None:
                return False  # (RFC 9110 §13.2.1: 404 rather than 412)
            if if_match is not None and not self._holds(old, if_match):
                return None
            if if_none_match is not None and self._holds(old, if_none_match):
                return None
            del self._kv[key]
            self._version += 1
            self._bytes -= old[1]
            return True


if TYPE_CHECKING:
    from sockstack.gateway.kv import KeyValueStore

    def _is_a_store(demo: Demo) -> KeyValueStore:
        return demo  # (mypy checks that Demo implements the gateway's /kv protocol)


@expose(inline=True)
class Counter:
    """The demo's remote object (docs/OBJECTS.md): ``sockstack serve`` without a service
    registers the class as "counter", so each client session gets a counter of its own, from 0:
    ``lookup("tcp://127.0.0.1:5050/counter")``. Its objects are bounded by the server's
    ``ObjectLimits`` (10,000 per session by default)."""

    def __init__(self) -> None:
        self.n = 0

    def incr(self, by: int = 1) -> int:
        """Add ``by`` (default 1); the new value."""
        self.n += by
        return self.n

    def child(self) -> Counter:
        """A new counter, from 0 (it crosses as a reference: a proxy on the client)."""
        return Counter()

    @property
    def value(self) -> int:
        """The current value."""
        return self.n
