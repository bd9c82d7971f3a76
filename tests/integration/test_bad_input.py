"""Bad input against a live server: each gets a clear ERROR or CLOSE with a code, is logged
once, and leaves the server serving a well-behaved client connected beside it."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sockstack import AsyncClient, ErrorCode, Server, ServerLimits, StreamLimits
from sockstack.protocol.frames import HEADER, MAGIC, FrameDecoder, MessageType, encode_frame
from sockstack.protocol.messages import (
    Close,
    Error,
    Hello,
    Response,
    Welcome,
    decode_message,
    encode_hello,
    encode_request,
)
from tests.conftest import Probe, timeout

HELLO = encode_hello(Hello())


@pytest.fixture
async def small_server(probe: Probe) -> AsyncIterator[Server]:
    limits = ServerLimits(
        stream=StreamLimits(max_frame=4096, handshake_timeout=timeout(0.5)), max_datagram=1200
    )
    async with Server(probe, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], limits=limits) as srv:
        yield srv


@pytest.fixture
async def bystander(small_server: Server) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(str(small_server.endpoint("tcp")), timeout=timeout(5)) as c:
        assert await c.call("add", 1, 1) == 2
        yield c


async def exchange(server: Server, data: bytes, *, then_eof: bool = False) -> list[Any]:
    """Send raw bytes on a new connection; return every message until the server closes it
    (or 1 s of silence, for cases where the connection must stay open)."""
    ep = server.endpoint("tcp")
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    writer.write(data)
    if then_eof:
        writer.write_eof()
    dec = FrameDecoder()
    out: list[Any] = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout(1))
            if not chunk:
                break
            out += [decode_message(f) for f in dec.feed(chunk)]
    except TimeoutError:
        out.append("open")
    writer.close()
    return out


def violations(caplog: pytest.LogCaptureFixture, code: ErrorCode) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and code.name in r.message)


CASES = [
    ("bad-magic", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.PROTOCOL_ERROR),
    (
        "wrong-version",
        encode_frame(MessageType.HELLO, 0, b"", b"\x09\x09\x00\x00\x10\x00", version=9),
        ErrorCode.UNSUPPORTED_VERSION,
    ),
    (
        "no-common-version",
        encode_frame(MessageType.HELLO, 0, b"", b"\x02\x03\x00\x10\x00\x00"),
        ErrorCode.UNSUPPORTED_VERSION,
    ),
    ("request-before-hello", encode_request(1, "add", [1, 2]), ErrorCode.PROTOCOL_ERROR),
    (
        "oversized-length",
        HELLO + HEADER.pack(MAGIC, 1, 3, 0, 1, 0, 1, 2**32 - 1),
        ErrorCode.FRAME_TOO_LARGE,
    ),
    (
        "just-over-limit",
        HELLO + HEADER.pack(MAGIC, 1, 3, 0, 1, 0, 1, 4097),
        ErrorCode.FRAME_TOO_LARGE,
    ),
    (
        "response-from-client",
        HELLO + encode_frame(MessageType.RESPONSE, 1, b"", b"\xc0", 0, 1),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("truncated-hello-then-silence", HELLO[:10], ErrorCode.HANDSHAKE_TIMEOUT),
    ("silence", b"", ErrorCode.HANDSHAKE_TIMEOUT),
]


@pytest.mark.parametrize(("name", "data", "code"), CASES, ids=[c[0] for c in CASES])
async def test_fatal_input_closes_with_code(
    small_server: Server,
    bystander: AsyncClient,
    caplog: pytest.LogCaptureFixture,
    name: str,
    data: bytes,
    code: ErrorCode,
) -> None:
    caplog.set_level(logging.WARNING)
    out = await exchange(small_server, data)
    assert out and isinstance(out[-1], Close), out
    assert out[-1].code == code and out[-1].reason
    assert violations(caplog, code) == 1
    assert await bystander.call("add", 2, 2) == 4


NON_FATAL = [
    ("unknown-type", encode_frame(0x7F, 9, b"", b"x"), ErrorCode.UNKNOWN_TYPE),
    (
        "undecodable-body",
        encode_frame(MessageType.REQUEST, 9, b"add", b"\xc1", 0, 1),
        ErrorCode.DECODE_ERROR,
    ),
    (
        "unknown-codec",
        encode_frame(MessageType.REQUEST, 9, b"add", b"\x90", 0, 99),
        ErrorCode.UNSUPPORTED_CODEC,
    ),
    ("unknown-method", encode_request(9, "no_such_method", []), ErrorCode.UNKNOWN_METHOD),
    ("wrong-arguments", encode_request(9, "add", [1, 2, 3]), ErrorCode.BAD_ARGUMENTS),
]


@pytest.mark.parametrize(("name", "data", "code"), NON_FATAL, ids=[c[0] for c in NON_FATAL])
async def test_request_level_input_gets_error_and_connection_survives(
    small_server: Server,
    bystander: AsyncClient,
    caplog: pytest.LogCaptureFixture,
    name: str,
    data: bytes,
    code: ErrorCode,
) -> None:
    caplog.set_level(logging.WARNING)
    out = await exchange(small_server, HELLO + data + encode_request(10, "add", [3, 4]))
    assert isinstance(out[0], Welcome)
    assert isinstance(out[1], Error) and out[1].request_id == 9 and out[1].code == code
    assert out[2] == Response(10, 7, 1)  # the same connection still serves
    assert out[-1] == "open"
    if code < ErrorCode.UNKNOWN_METHOD or code > ErrorCode.BAD_ARGUMENTS:
        assert violations(caplog, code) == 1  # protocol-level errors are logged once
    assert await bystander.call("add", 2, 2) == 4


async def test_truncated_frame_then_eof(small_server: Server, bystander: AsyncClient) -> None:
    out = await exchange(small_server, HELLO + encode_request(1, "add", [1, 2])[:-3], then_eof=True)
    assert isinstance(out[0], Welcome) and "open" not in out
    assert await bystander.call("add", 2, 2) == 4


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


async def test_garbage_datagrams(
    small_server: Server, bystander: AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    ep = small_server.endpoint("udp")
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _Datagrams, remote_addr=(ep.host, ep.port)
    )
    try:
        rnd = random.Random(7)
        for _ in range(200):  # bounded: random bytes, never a valid frame (no magic)
            transport.sendto(b"\x00" + rnd.randbytes(rnd.randint(0, 300)))
        transport.sendto(encode_frame(MessageType.REQUEST, 5, b"add", b"\xc1", 0, 1))
        transport.sendto(encode_frame(MessageType.REQUEST, 6, b"add", b"x" * 2000, 0, 1))
        transport.sendto(encode_request(8, "add", [1, 2]))
        answers = []
        for _ in range(3):
            data = await asyncio.wait_for(proto.queue.get(), timeout(5))
            answers += [decode_message(f) for f in FrameDecoder(1 << 20).feed(data)]
    finally:
        transport.close()
    by_id = {a.request_id: a for a in answers}
    assert by_id[5].code == ErrorCode.DECODE_ERROR
    assert (
        by_id[6].code == ErrorCode.DATAGRAM_TOO_LARGE
    )  # 2000 > max_datagram 1200: a request-level code over UDP
    assert by_id[8] == Response(8, 3, 1)
    # Each bad datagram is counted; the log takes the first 20 and then summarises the flood.
    (endpoint,) = small_server._datagrams
    assert endpoint.bad_datagrams == 202  # the 200, and the two answered with an ERROR
    assert violations(caplog, ErrorCode.PROTOCOL_ERROR) == endpoint.bad_log.burst == 20
    assert endpoint.bad_log.suppressed == 182
    async with AsyncClient(str(ep), timeout=timeout(5)) as c:
        assert await c.call("add", 2, 2) == 4
    assert await bystander.call("add", 2, 2) == 4


def _mutations(rnd: random.Random, n: int) -> list[bytes]:
    """``n`` malformed frames, mutated from valid ones: flipped bytes, truncations, random
    header fields, lengths that lie, and plain garbage."""
    valid = [
        encode_request(1, "add", [1, 2]),
        encode_request(2, "kw", [1], {"scale": 2}),
        encode_frame(MessageType.PING, 3, b"", b"hi"),
        encode_frame(MessageType.REQUEST, 4, b"echo", b"\x91\xc4\x03abc", 0, 1),
        HELLO,
    ]
    out = []
    for _ in range(n):
        frame = bytearray(rnd.choice(valid))
        op = rnd.randrange(5)
        if op == 0:
            for _ in range(rnd.randint(1, 4)):
                frame[rnd.randrange(len(frame))] = rnd.randrange(256)
        elif op == 1:
            frame = frame[: rnd.randrange(len(frame))]
        elif op == 2:  # random type, flags, codec
            frame[3], frame[4], frame[5] = rnd.randrange(256), rnd.randrange(256), rnd.randrange(8)
        elif op == 3:  # lengths that lie (within the limit, so the stream waits or misparses)
            frame[6:8] = rnd.randrange(0, 64).to_bytes(2, "big")
            frame[12:16] = rnd.randrange(0, 200).to_bytes(4, "big")
        else:
            frame = bytearray(rnd.randbytes(rnd.randint(1, 60)))
        out.append(bytes(frame))
    return out


async def test_ten_thousand_malformed_frames_and_datagrams(
    small_server: Server, bystander: AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """10,000 malformed frames over TCP and 10,000 malformed datagrams, while well-behaved
    clients keep calling on both transports: every call of theirs succeeds, nothing crashes."""
    caplog.set_level(logging.WARNING)
    rnd = random.Random(1234)
    ep_tcp, ep_udp = small_server.endpoint("tcp"), small_server.endpoint("udp")
    stop = asyncio.Event()
    served = {"tcp": 0, "udp": 0}

    async def well_behaved() -> None:
        async with AsyncClient(str(ep_udp), timeout=timeout(5)) as udp:
            while not stop.is_set():  # bounded by the abuse below, which sets stop
                assert await bystander.call("add", 2, 2) == 4
                served["tcp"] += 1
                assert await udp.call("add", 3, 3) == 6
                served["udp"] += 1

    async def abuse_tcp() -> int:
        sent = 0
        frames = _mutations(rnd, 10_000)
        for i in range(0, len(frames), 100):  # 100 connections, 100 frames each
            batch = frames[i : i + 100]
            reader, writer = await asyncio.open_connection(ep_tcp.host, ep_tcp.port)
            prefix = HELLO if i % 200 == 0 else b""  # half after a valid HELLO
            writer.write(prefix + b"".join(batch))
            writer.write_eof()
            sent += len(batch)
            try:
                async with asyncio.timeout(timeout(5)):
                    while await reader.read(65536):
                        pass
            finally:
                writer.close()
        return sent

    async def abuse_udp() -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(ep_udp.host, ep_udp.port)
        )
        try:
            for i, data in enumerate(_mutations(rnd, 10_000)):
                transport.sendto(data)
                if i % 50 == 0:
                    await asyncio.sleep(0)  # let the server (same loop) read
        finally:
            transport.close()
        return 10_000

    calls = asyncio.ensure_future(well_behaved())
    try:
        sent = await asyncio.gather(abuse_tcp(), abuse_udp())
    finally:
        stop.set()
    await asyncio.wait_for(calls, timeout(10))
    assert sent == [10_000, 10_000]
    assert served["tcp"] > 0 and served["udp"] > 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage()
    assert await bystander.call("add", 5, 5) == 10
    async with AsyncClient(str(ep_udp), timeout=timeout(5)) as again:
        assert await again.call("add", 1, 1) == 2
