"""Client failover between two servers (the deployment story in docs/PERFORMANCE.md)."""

from __future__ import annotations

import asyncio

import pytest

from sockstack import (
    AsyncClient,
    Backoff,
    InvalidURL,
    Server,
    ServerLimits,
    Service,
    connect,
    method,
)
from tests.conftest import timeout

FAST = Backoff(initial=0.01, factor=2.0, max_delay=0.1)
QUICK = ServerLimits(close_timeout=0.2)


class Named(Service):
    def __init__(self, name: str) -> None:
        self.name = name

    @method(inline=True)
    def whoami(self) -> str:
        return self.name


async def two_servers() -> tuple[Server, Server]:
    a = Server(Named("a"), tcp=["127.0.0.1:0"], limits=QUICK)
    b = Server(Named("b"), tcp=["127.0.0.1:0"], limits=QUICK)
    await a.start()
    await b.start()
    return a, b


async def test_async_client_fails_over_and_back() -> None:
    a, b = await two_servers()
    urls = f"{a.endpoint('tcp')},{b.endpoint('tcp')}"
    try:
        async with AsyncClient(urls, timeout=timeout(10), backoff=FAST) as c:
            assert await c.call("whoami") == "a"  # the first server is preferred
            await a.shutdown()
            assert await c.call("whoami") == "b"  # reconnected to the next one by itself
            assert await c.call("whoami") == "b"
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_first_server_down_at_connect() -> None:
    a, b = await two_servers()
    down = str(a.endpoint("tcp"))
    await a.shutdown()
    try:
        async with AsyncClient([down, str(b.endpoint("tcp"))], timeout=timeout(5)) as c:
            assert await c.call("whoami") == "b"
        with pytest.raises(Exception, match="refused"):
            async with AsyncClient([down], connect_timeout=timeout(2)):
                pass
    finally:
        await b.shutdown()


async def test_blocking_client_fails_over() -> None:
    a, b = await two_servers()
    urls = [str(a.endpoint("tcp")), str(b.endpoint("tcp"))]
    client = await asyncio.to_thread(connect, urls, timeout=timeout(10), backoff=FAST)
    try:
        assert await asyncio.to_thread(client.call, "whoami") == "a"
        await a.shutdown()
        assert await asyncio.to_thread(client.call, "whoami") == "b"
    finally:
        client.close()
        await b.shutdown()


def test_failover_lists_are_tcp_only() -> None:
    with pytest.raises(InvalidURL, match="TCP"):
        AsyncClient("udp://127.0.0.1:1,udp://127.0.0.1:2")
    with pytest.raises(InvalidURL, match="mixed"):
        AsyncClient(["tcp://127.0.0.1:1", "udp://127.0.0.1:2"])
