"""The built-in demo, served by ``sockstack serve`` when no service is named: the service
:class:`Demo` and the remote object :class:`Counter` (registered as "counter")."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

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
"""Bytes a stored key costs beyond its key and value objects: the (value, size) tuple (56 B, 64
allocated), the size (an int, 32 B) and its dict entry (24 B of entry and 8 of index, times the
table's spare room: up to 3x just after it grows). Measured: 135-184 B per key of RSS."""

_SHARED = frozenset({type(None), bool})


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
    ``set`` beyond either is refused with a ServiceError that says which bound and by how much."""

    def __init__(self, max_keys: int = MAX_KEYS, max_bytes: int = MAX_BYTES) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._kv: dict[str, tuple[Any, int]] = {}  # key -> (value, bytes charged)
        self._bytes = 0
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
        _check_key(key)  # before anything is counted
        cost = KEY_OVERHEAD + value_size(key, self.max_bytes)
        cost += value_size(value, self.max_bytes - cost)
        with self._lock:
            old = self._kv.get(key)
            if old is None and len(self._kv) >= self.max_keys:
                raise ServiceError(f"store is full ({self.max_keys} keys)")
            freed = 0 if old is None else old[1]
            used = self._bytes - freed
            if used + cost > self.max_bytes:
                raise ServiceError(
                    f"store is full: {used} of {self.max_bytes} bytes in use, this value needs "
                    f"{cost}{'+' if cost > self.max_bytes else ''}; delete keys first"
                )
            self._kv[key] = (value, cost)
            self._bytes = used + cost
            return old is None

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
        _check_key(key)
        with self._lock:
            entry = self._kv.pop(key, None)
            if entry is None:
                return False
            self._bytes -= entry[1]
            return True

    @method(inline=True, readonly=True)
    def keys(self) -> list[str]:
        """The stored keys, sorted."""
        with self._lock:
            return sorted(self._kv)

    @method(inline=True, readonly=True)
    def methods(self) -> list[str]:
        """The names of this service's methods."""
        return ["add", "count", "delete", "echo", "get", "keys", "methods", "set", "sleep", "time"]


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
