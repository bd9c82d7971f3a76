"""asyncio datagram adapter: moves datagrams between a UDP socket and a sans-I/O datagram core.

:class:`DatagramEndpoint` owns what every datagram pattern shares: the transport, sending what
the core queued, and logging each bad datagram once (rate-limited: a flood is summarised). The
RPC server and client subclass it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from sockstack.errors import ErrorCode
from sockstack.protocol.connection import ProtocolViolation
from sockstack.transport.ratelog import RateLimitedLog
from sockstack.transport.urls import format_peer

__all__ = ["DatagramEndpoint"]

log = logging.getLogger("sockstack.transport")


class DatagramEndpoint(asyncio.DatagramProtocol):
    side = "server"

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.closed = self.loop.create_future()
        self.bad_datagrams = 0
        self.bad_log = RateLimitedLog(
            log
        )  # a flood of garbage is summarised, not logged per packet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement DatagramTransport without subclassing it.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def send_all(self, datagrams: list[tuple[bytes, Any]]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data, addr in datagrams:
            transport.sendto(data, addr)

    def log_violation(self, ev: ProtocolViolation, addr: Any) -> None:
        self.bad_datagrams += 1
        self.bad_log.warning(
            "udp %s %s: %s [%s]",
            self.side,
            format_peer(addr),
            ev.message,
            ErrorCode.describe(ev.code),
        )
