"""Shared test helpers: one timing unit, a test service, servers on port 0."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sockstack import Server, ServerLimits, Service, ServiceError, method

# One timing unit for every wait in the tests; raise it on a slow machine.
UNIT = float(os.environ.get("SOCKSTACK_TEST_TIMEOUT_SCALE", "1.0"))


def timeout(seconds: float) -> float:
    return seconds * UNIT


class Probe(Service):
    """A service that lets tests observe and steer what the server runs."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.gate: asyncio.Event | None = None
        self.entered: asyncio.Event | None = None

    def _count(self, key: str) -> int:
        with self.lock:
            self.runs[key] = self.runs.get(key, 0) + 1
            return self.runs[key]

    @method(inline=True)
    def add(self, a: Any, b: Any) -> Any:
        return a + b

    @method(inline=True)
    def echo(self, value: Any = None) -> Any:
        return value

    @method
    def threaded_add(self, a: int, b: int) -> int:
        return a + b

    @method(inline=True)
    def kw(self, a: int, *, scale: int = 1) -> int:
        return a * scale

    @method(inline=True)
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @method(inline=True)
    def fail_for_client(self, message: str) -> None:
        raise ServiceError(message)

    @method(inline=True)
    def unencodable(self) -> object:
        return object()

    @method
    async def wait(self, key: str) -> int:
        """Counts a run, signals entry, then waits for the test to open the gate."""
        n = self._count(key)
        if self.entered is not None:
            self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return n

    @method
    async def count(self, key: str, seconds: float = 0.0) -> int:
        n = self._count(key)
        await asyncio.sleep(seconds)
        return n

    @method
    async def blob(self, size: int) -> bytes:
        """``size`` bytes, answered from a task (the path of async and threaded methods)."""
        await asyncio.sleep(0)
        return b"b" * size

    @method
    def block(self, seconds: float) -> bool:
        """Blocks a worker thread until released by the test (bounded by ``seconds``)."""
        return self.release.wait(seconds)


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(probe: Probe) -> AsyncIterator[Server]:
    srv = Server(
        probe,
        tcp=["127.0.0.1:0"],
        udp=["127.0.0.1:0"],
        limits=ServerLimits(drain_timeout=timeout(5), close_timeout=timeout(2)),
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.shutdown()


def url(server: Server, scheme: str) -> str:
    return str(server.endpoint(scheme))
