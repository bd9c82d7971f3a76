"""The built-in demo service, served by ``sockstack serve`` when no service is named."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from sockstack.rpc.service import Service, ServiceError, method

__all__ = ["Demo"]

MAX_KEYS = 10_000


class Demo(Service):
    """echo, add, time, sleep and a small in-memory key-value store (bounded to 10,000 keys)."""

    def __init__(self) -> None:
        self._kv: dict[str, Any] = {}
        self._lock = threading.Lock()

    @method(inline=True)
    def echo(self, value: Any = None) -> Any:
        """Return the argument unchanged."""
        return value

    @method(inline=True)
    def add(self, a: Any, b: Any) -> Any:
        """a + b (numbers, strings or lists)."""
        return a + b

    @method(inline=True)
    def time(self) -> float:
        """The server's wall-clock time (seconds since the epoch)."""
        return time.time()

    @method
    async def sleep(self, seconds: float) -> float:
        """Wait ``seconds`` (at most 60) on the server without blocking it; returns them."""
        if not 0 <= seconds <= 60:
            raise ServiceError("seconds must be between 0 and 60")
        await asyncio.sleep(seconds)
        return seconds

    @method(inline=True)
    def set(self, key: str, value: Any) -> bool:
        """Store ``value`` under ``key``; True if the key is new."""
        with self._lock:
            new = key not in self._kv
            if new and len(self._kv) >= MAX_KEYS:
                raise ServiceError(f"store is full ({MAX_KEYS} keys)")
            self._kv[key] = value
            return new

    @method(inline=True)
    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        with self._lock:
            return self._kv.get(key, default)

    @method(inline=True)
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""
        with self._lock:
            return self._kv.pop(key, None) is not None

    @method(inline=True)
    def keys(self) -> list[str]:
        """The stored keys, sorted."""
        with self._lock:
            return sorted(self._kv)

    @method(inline=True)
    def methods(self) -> list[str]:
        """The names of this service's methods."""
        return ["add", "delete", "echo", "get", "keys", "methods", "set", "sleep", "time"]
