"""A fault-injection proxy on loopback, since kernel traffic shaping (tc netem) is not available
on these machines: it sits between a client and a server and misbehaves on command.

- :class:`UDPFaultProxy` forwards datagrams both ways and drops, delays, duplicates and
  reorders them with the given probabilities (seeded, so a failing run can be replayed).
- :class:`TCPFaultProxy` pipes each accepted connection to the server and, on command, resets
  every connection (RST, as a crashed peer or middlebox would) or stalls them (bytes held, as a
  dead link would).

Both count what they did, so tests can check that faults really happened.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Faults:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    """Probability that a datagram is held back and sent after the next one."""
    delay: tuple[float, float] = (0.0, 0.0)
    """Extra delay, uniform in [low, high] seconds."""


@dataclass
class Counts:
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    by_direction: dict[str, int] = field(default_factory=dict)


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)


class UDPFaultProxy:
    """Clients send to ``port``; the proxy forwards to ``upstream`` from one socket per client,
    so the server sees one address per client, as it would without the proxy."""

    def __init__(self, upstream: tuple[str, int], faults: Faults, seed: int = 1) -> None:
        self.upstream = upstream
        self.faults = faults
        self.rng = random.Random(seed)
        self.counts = Counts()
        self.port = 0
        self._front: _Side | None = None
        self._backs: dict[Any, _Side] = {}
        self._held: dict[str, tuple[bytes, Any, Any] | None] = {"up": None, "down": None}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> UDPFaultProxy:
        loop = asyncio.get_running_loop()
        _, self._front = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_client), local_addr=("127.0.0.1", 0)
        )
        assert self._front.transport is not None
        self.port = self._front.transport.get_extra_info("sockname")[1]
        return self

    def _from_client(self, data: bytes, client: Any) -> None:
        back = self._backs.get(client)
        if back is None:
            loop = asyncio.get_running_loop()
            back = _Side(lambda d, _a, c=client: self._inject("down", d, self._front, c))
            self._backs[client] = back
            task = loop.create_task(self._open_back(back, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._inject("up", data, back, None)

    async def _open_back(self, back: _Side, first: bytes) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: back, remote_addr=self.upstream)
        self._inject("up", first, back, None)

    def _inject(self, direction: str, data: bytes, side: _Side | None, addr: Any) -> None:
        f, rng, c = self.faults, self.rng, self.counts
        if rng.random() < f.drop:
            c.dropped += 1
            return
        copies = 2 if rng.random() < f.duplicate else 1
        c.duplicated += copies - 1
        for _ in range(copies):
            if rng.random() < f.reorder and self._held[direction] is None:
                self._held[direction] = (data, side, addr)  # goes out after the next one
                c.reordered += 1
                continue
            self._later(data, side, addr)
            held = self._held[direction]
            if held is not None:
                self._held[direction] = None
                self._later(*held)

    def _later(self, data: bytes, side: Any, addr: Any) -> None:
        low, high = self.faults.delay
        delay = self.rng.uniform(low, high) if high > 0 else 0.0
        if delay:
            asyncio.get_running_loop().call_later(delay, self._send, data, side, addr)
        else:
            self._send(data, side, addr)

    def _send(self, data: bytes, side: _Side | None, addr: Any) -> None:
        if side is None or side.transport is None or side.transport.is_closing():
            return
        self.counts.forwarded += 1
        side.transport.sendto(data, addr)

    async def close(self) -> None:
        for side in [self._front, *self._backs.values()]:
            if side is not None and side.transport is not None:
                side.transport.close()


class TCPFaultProxy:
    """Pipes connections from ``port`` to ``upstream``; :meth:`reset` and :meth:`stall`
    inject faults into every connection open at that moment (and, for stall, later ones)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.resets = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TCPFaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            cwriter.close()
            return
        self.connections += 1
        self._pairs.append((cwriter, uwriter))
        for r, w in ((creader, uwriter), (ureader, cwriter)):
            task = asyncio.get_running_loop().create_task(self._pipe(r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()  # stalled: hold the bytes
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def reset(self) -> None:
        """Abort every open connection with an RST on both sides."""
        for cw, uw in self._pairs:
            for w in (cw, uw):
                sock = w.get_extra_info("socket")
                if sock is not None and not w.transport.is_closing():
                    try:  # linger 0: close() sends RST instead of FIN
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    except OSError:
                        pass
                w.transport.abort()
            self.resets += 1
        self._pairs.clear()

    async def reset_and_wait(self) -> None:
        """:meth:`reset`, then wait until the proxy's sockets are closed: their RSTs are sent
        (and on loopback, delivered) when this returns."""
        writers = [w for pair in self._pairs for w in pair]
        self.reset()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)

    def stall(self, stalled: bool = True) -> None:
        """Hold every byte in both directions (True) or let them flow again (False)."""
        if stalled:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def close(self) -> None:
        self.stall(False)
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
