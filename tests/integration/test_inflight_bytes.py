"""The bytes of requests in flight are bounded, not only their number (``ServerLimits.
max_in_flight_bytes`` per connection, ``max_total_in_flight_bytes`` in all): a client that
sends many large requests to a slow method stops being read once those it has running hold the
bound, and the server's memory shows it (tracemalloc: the server runs in this process; the
client is a plain blocking socket in a thread, its unsent bytes in the kernel, not in Python).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import tracemalloc
from typing import Any

import pytest

from sockstack import AsyncClient, Server, ServerLimits, Service, method
from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.messages import Hello, decode_message, encode_hello, encode_request
from tests.conftest import timeout

BLOB = 512 * 1024  # bytes of each request's argument
COUNT = 64  # 32 MiB of requests in all
LIMIT = 4 << 20


class Held(Service):
    def __init__(self) -> None:
        self.started = 0
        self.gate = asyncio.Event()

    @method
    async def hold(self, blob: bytes) -> int:
        self.started += 1
        await asyncio.wait_for(self.gate.wait(), timeout(30))
        return len(blob)


def _client(port: int, out: dict[str, Any], sent_all: threading.Event) -> None:
    """HELLO, then COUNT requests (one bytes object sent again and again), then read every
    answer; bounded by socket timeouts."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout(30)) as s:
        s.sendall(encode_hello(Hello()))
        frames = [encode_request(i + 1, "hold", [b"\0" * BLOB]) for i in range(1)]
        body = frames[0]
        try:
            for i in range(COUNT):  # the same frame with its request id patched in
                frame = body[:8] + (i + 1).to_bytes(4, "big") + body[12:]
                s.sendall(frame)
            sent_all.set()
            dec = FrameDecoder()
            while len(answers) < COUNT:
                chunk = s.recv(65536)
                if not chunk:
                    break
                for f in dec.feed(chunk):
                    msg = decode_message(f)
                    if type(msg).__name__ == "Response":
                        answers.append(msg.result)
        except OSError as exc:
            out["error"] = exc
    out["answers"] = answers


@pytest.mark.parametrize("where", ["per connection", "in all"])
async def test_requests_in_flight_are_bounded_by_their_bytes(where: str) -> None:
    """One client against the per-connection bound; two against the server-wide one (each
    below its own bound: together they are held at the total, and both resume)."""
    svc = Held()
    clients = 1 if where == "per connection" else 2
    if clients == 1:
        limits = ServerLimits(max_in_flight_bytes=LIMIT)
    else:
        limits = ServerLimits(max_in_flight_bytes=4 * LIMIT, max_total_in_flight_bytes=LIMIT)
    tracemalloc.start()
    try:
        async with Server(svc, tcp=["127.0.0.1:0"], limits=limits) as server:
            port = server.endpoint("tcp").port
            before = tracemalloc.get_traced_memory()[0]
            outs: list[dict[str, Any]] = [{} for _ in range(clients)]
            sent = [threading.Event() for _ in range(clients)]
            threads = [
                threading.Thread(target=_client, args=(port, o, e), daemon=True)
                for o, e in zip(outs, sent, strict=True)
            ]
            for t in threads:
                t.start()
            async with AsyncClient(str(server.endpoint("tcp")), timeout=timeout(10)) as other:
                # Round trips of another client (each a turn of the server's loop) until the
                # server has started what the bound lets in, then more for a server that would
                # read on; the client meanwhile is blocked in its send (32 MiB cannot fit in
                # the kernel's buffers).
                for _ in range(2000):
                    if svc.started >= LIMIT // BLOB:
                        break
                    await other.ping()
                for _ in range(200):
                    await other.ping()
                    await asyncio.to_thread(lambda: None)  # the sender thread runs too
            held = tracemalloc.get_traced_memory()[0] - before
            started = svc.started
            assert not any(e.is_set() for e in sent), "a client sent everything: not held back"
            assert started <= LIMIT // BLOB + clients, started
            assert server._in_flight_bytes <= LIMIT + clients * (BLOB + 64)
            # Memory measured: the requests let in, the frames being read, decoder buffers.
            assert held < 3 * LIMIT + clients * (2 << 20), (held, LIMIT)
            svc.gate.set()  # they all end; reading resumes; every request gets its answer
            for t in threads:
                await asyncio.to_thread(t.join, timeout(30))
                assert not t.is_alive()
            for out in outs:
                assert "error" not in out, out.get("error")
                assert out["answers"] == [BLOB] * COUNT
            assert svc.started == COUNT * clients
            assert server._in_flight_bytes == 0 and not server._bytes_paused
            assert all(c.in_flight_bytes == 0 for c in server._streams)
    finally:
        tracemalloc.stop()
