"""A streamed call over HTTP to a client that does not read: the method is slowed to the
window (256 KiB of encoded items, plus the transport's buffer), the server's memory stays
bounded (measured), and other clients are served meanwhile."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc
from collections.abc import AsyncIterator

from sockstack import Service, method
from tests.conftest import timeout
from tests.gateway.support import arequest, gateway

ITEM = "x" * 8192
ITEMS = 20_000  # 160 MiB if nothing held the method back


class Flood(Service):
    def __init__(self) -> None:
        self.sent = 0

    @method
    async def flood(self) -> AsyncIterator[str]:
        for _ in range(ITEMS):
            self.sent += 1
            yield ITEM
            await asyncio.sleep(0)

    @method(readonly=True)
    def ping(self) -> str:
        return "pong"


async def _stalled(svc: Flood, turns: int = 300) -> None:
    """Until the method's count of items stops moving for ``turns`` loop turns in a row."""
    last, still = -1, 0
    while still < turns:  # bounded by the caller's wait_for
        await asyncio.sleep(0)
        if svc.sent == last:
            still += 1
        else:
            last, still = svc.sent, 0


async def test_a_stream_nobody_reads_holds_the_method_and_bounded_memory() -> None:
    svc = Flood()
    async with gateway(svc, tcp=["127.0.0.1:0"]) as (server, port):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                sock.sendall(
                    b"POST /rpc/flood HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: 2\r\n\r\n{}"
                )
                await asyncio.wait_for(_stalled(svc), timeout(20))
                held = tracemalloc.get_traced_memory()[0] - base
                print("items sent before the method was held:", svc.sent, "memory:", held)
                assert svc.sent < ITEMS // 4, svc.sent  # held back, far from the end
                assert held < 4 << 20, held  # window + transport buffer + slack
                r = await arequest(port, "GET", "/rpc/ping")
                assert r.json() == "pong"  # others are served meanwhile
            finally:
                sock.close()
            # the client gone, the method is stopped (not left pumping into nothing)
            await asyncio.wait_for(_idle(server), timeout(10))
            assert svc.sent < ITEMS // 4
        finally:
            tracemalloc.stop()


async def _idle(server: object) -> None:
    while getattr(server, "_in_flight", 0):  # bounded by the caller's wait_for
        await asyncio.sleep(0)
