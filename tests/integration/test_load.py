"""Load: one server process holding 5,000 concurrent TCP connections, each doing calls.
(The benchmark reports memory per idle connection at the same scale: `make bench`.)"""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path
from typing import Any

from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.messages import (
    Hello,
    Response,
    decode_message,
    encode_hello,
    encode_request,
)
from tests.cli.conftest import Proc
from tests.conftest import timeout

N = 5000


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError("no VmRSS")


class _Caller(asyncio.Protocol):
    """One connection: HELLO, then one call at a time on command; answers decoded."""

    def __init__(self) -> None:
        self.dec = FrameDecoder()
        self.answers: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for f in self.dec.feed(data):
            self.answers.put_nowait(decode_message(f))

    async def call(self, rid: int, a: int, b: int) -> Any:
        assert self.transport is not None
        self.transport.write(encode_request(rid, "add", [a, b]))
        while True:
            msg = await self.answers.get()
            if type(msg) is Response:
                return msg


def _raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


async def test_five_thousand_connections_each_calling() -> None:
    _raise_fd_limit(N + 1000)  # the server process inherits the raised limit too
    server = Proc(
        [
            "sockstack",
            "--log-level",
            "WARNING",
            "serve",
            "--tcp",
            "127.0.0.1:0",  # the banner names the port
            "--handshake-timeout",
            "60",
            "--keepalive",
            "0",
            # Every client here shares one address (loopback): lift the per-address limits.
            f"--max-connections-per-address={N}",
            f"--max-handshakes-per-address={N}",
        ],
        env={"PYTHONASYNCIODEBUG": ""},  # a load test: asyncio's debug mode is for the others
    )
    loop = asyncio.get_running_loop()
    debug = loop.get_debug()
    loop.set_debug(False)  # 5,000 connections would take minutes under debug checks
    callers: list[_Caller] = []
    try:
        port = int(server.wait_line(r"serving Demo on tcp://127\.0\.0\.1:(\d+)").group(1))
        base = _rss(server.popen.pid)
        hello = encode_hello(Hello(agent="load"))
        async with asyncio.timeout(timeout(120)):
            for start in range(0, N, 250):  # in batches, within the listen backlog
                batch = [_Caller() for _ in range(min(250, N - start))]
                await asyncio.gather(
                    *(loop.create_connection(lambda c=c: c, "127.0.0.1", port) for c in batch)
                )
                for c in batch:
                    assert c.transport is not None
                    c.transport.write(hello)
                callers += batch
            # Every connection calls, all at once, twice.
            for round_ in (1, 2):
                results = await asyncio.gather(
                    *(c.call(round_, i, round_) for i, c in enumerate(callers))
                )
                assert [r.result for r in results] == [i + round_ for i in range(N)]
                assert all(r.request_id == round_ for r in results)
        per_connection = (_rss(server.popen.pid) - base) / N
        print(f"server RSS growth: {per_connection:,.0f} bytes per connection")
        assert per_connection < 10 * 1024, per_connection  # the bound, with room
    finally:
        loop.set_debug(debug)
        for c in callers:
            if c.transport is not None:
                c.transport.close()
        assert server.stop(seconds=30) == 0
