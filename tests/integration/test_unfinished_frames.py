"""Issue 10 item 7: a frame that has begun must arrive whole in time, and the bytes held for
unfinished frames are bounded over all connections (RSS measured in a server subprocess)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from sockstack import AsyncClient, ErrorCode, Server, ServerLimits, StreamLimits
from sockstack.protocol.frames import FrameDecoder, MessageType, pack_header
from sockstack.protocol.messages import Close, Hello, decode_message, encode_hello
from tests.cli.conftest import Proc
from tests.conftest import Probe, timeout


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError("no VmRSS")


def _begin(size: int) -> bytes:
    """A HELLO, then the header and first byte of a REQUEST of ``size`` body bytes."""
    head = pack_header(MessageType.REQUEST, 1, 0, 1, 3, size)
    return encode_hello(Hello()) + head + b"add" + b"\x92"


async def _close_of(reader: asyncio.StreamReader) -> Close | None:
    """The CLOSE the server sent (after its WELCOME), or None if the stream ended without."""
    dec = FrameDecoder(1 << 30, 1 << 16)
    while data := await reader.read(65536):
        for f in dec.feed(data):
            msg = decode_message(f)
            if isinstance(msg, Close):
                return msg
    return None


async def test_a_trickled_frame_is_cut_off_and_others_are_served() -> None:
    limits = ServerLimits(stream=StreamLimits(frame_timeout=0.5))
    async with Server(Probe(), tcp=["127.0.0.1:0"], limits=limits) as srv:
        ep = srv.endpoint("tcp")
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        writer.write(_begin(100_000))
        closing = asyncio.ensure_future(_close_of(reader))
        async with AsyncClient(str(ep)) as good:
            for i in range(100):  # a byte every 20 ms: it would take 33 min to finish
                if closing.done():
                    break
                writer.write(b"\x00")
                assert await good.call("add", i, 1) == i + 1  # served all along
                await asyncio.sleep(0.02)  # the attack's pace, not synchronisation
        close = await asyncio.wait_for(closing, timeout(5))
        assert close is not None and close.code == ErrorCode.FRAME_TIMEOUT
        writer.close()
        assert srv._partial_bytes == 0


async def test_frames_that_keep_arriving_are_not_cut_off() -> None:
    """Under load reads end mid-frame all the time: only a frame that does not finish counts."""
    limits = ServerLimits(stream=StreamLimits(frame_timeout=0.3))
    async with Server(Probe(), tcp=["127.0.0.1:0"], limits=limits) as srv:
        async with AsyncClient(str(srv.endpoint("tcp"))) as client:
            blob = b"x" * 200_000
            for _ in range(20):  # each call's frame spans many reads
                assert await client.call("echo", blob) == blob


def test_bytes_of_unfinished_frames_are_bounded_over_all_connections() -> None:
    """30 connections each begin a 1 MiB frame and stop: the server holds at most its bound
    (4 MiB), the rest get CLOSE BUSY, and its RSS grows by far less than 30 MiB."""
    server = Proc(
        [
            "sockstack",
            "--log-level",
            "ERROR",
            "serve",
            "--tcp",
            "127.0.0.1:0",  # the banner names the port
            "--max-frame",
            str(2 << 20),
            "--max-partial-bytes",
            str(4 << 20),
        ],
        env={"PYTHONASYNCIODEBUG": ""},
    )
    socks: list[socket.socket] = []
    try:
        port = int(server.wait_line(r"serving Demo on tcp://127\.0\.0\.1:(\d+)").group(1))
        base = _rss(server.popen.pid)
        chunk = _begin(1 << 20) + b"\x00" * ((1 << 20) - 64)  # all but the last 60-odd bytes
        busy = 0
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout(5))
            socks.append(s)
            s.sendall(chunk)
        for s in socks:  # read what each got back: WELCOME, and CLOSE BUSY for the refused
            s.settimeout(0.5)
            data = b""
            try:
                while part := s.recv(4096):
                    data += part
            except TimeoutError:
                pass  # still open: holding its unfinished frame
            frames = FrameDecoder().feed(data)
            closes = [m for m in map(decode_message, frames) if isinstance(m, Close)]
            busy += any(c.code == ErrorCode.BUSY for c in closes)
        grown = _rss(server.popen.pid) - base
        assert busy >= 25, busy  # 4 MiB holds at most 4 of the 1 MiB frames
        assert grown < 16 << 20, grown  # without the bound: ~30 MiB (and more with copies)
        out = socket.create_connection(("127.0.0.1", port), timeout=timeout(5))
        out.close()
    finally:
        for s in socks:
            s.close()
        assert server.stop(seconds=30) == 0
