"""PROTOCOL.md's exact statements against a live server (issue 11, item 5): a frame's size is
meta + body, the header never counted (§2), on a stream and on what a UDP side receives, while
what a UDP side sends counts the whole datagram (§6); a PING body over 125 bytes ends a stream
session with CLOSE PROTOCOL_ERROR and gets ERROR DECODE_ERROR over UDP, never a PONG (§5.2, §6);
which refused sealed datagrams are answered, and how, when their request id is 0 (§6.1).

Raw sockets send crafted bytes to a server running in the test's event loop. An answer that
must *not* come is proven absent without waiting for it: each such datagram is followed by a
marker datagram the server always answers, and the next datagram received must be the marker's
answer (one socket, loopback: the server reads, and answers, in order)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sockstack import ErrorCode, Server, ServerLimits, StreamLimits
from sockstack.protocol.auth import FLAG_AUTH, NO_EPOCH, REFUSAL_SIZE, DatagramAuth, trailer_of
from sockstack.protocol.connection import Connection
from sockstack.protocol.events import ConnectionTerminated, ProtocolViolation, Role
from sockstack.protocol.frames import HEADER_SIZE, FrameDecoder, MessageType, encode_frame
from sockstack.protocol.messages import (
    MAX_HELLO_SIZE,
    Close,
    Error,
    Hello,
    Pong,
    Response,
    Welcome,
    decode_message,
    encode_hello,
    encode_request,
    encode_welcome,
)
from tests.conftest import Probe, timeout

SECRET = b"item 5 secret"
LIMIT = 1024  # the frame limit of the servers below: meta + body


def hello_frame(max_frame: int = 1 << 20) -> bytes:
    return encode_frame(MessageType.HELLO, 0, b"", bytes([1, 1]) + max_frame.to_bytes(4, "big"))


def count_request(rid: int, key_len: int) -> bytes:
    """REQUEST ``count(key)`` with a key of ``key_len`` bytes (256-65535: str 16 header)."""
    return encode_request(rid, "count", ["k" * key_len])


# meta "count" (5) + msgpack [str16 of n] (1 + 3 + n) == LIMIT exactly
AT_LIMIT_KEY = LIMIT - 5 - 4


def ping(rid: int, size: int) -> bytes:
    return encode_frame(MessageType.PING, rid, b"", b"p" * size)


class _Stream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.dec = reader, writer, FrameDecoder()

    async def read(self, n: int) -> list[Any]:
        """``n`` messages, or fewer if the server closes first."""
        got: list[Any] = []
        async with asyncio.timeout(timeout(5)):
            while len(got) < n:
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                got += [decode_message(f) for f in self.dec.feed(chunk)]
        return got

    async def at_eof(self) -> bool:
        async with asyncio.timeout(timeout(5)):
            return await self.reader.read(65536) == b""


async def open_session(server: Server) -> _Stream:
    ep = server.endpoint("tcp")
    s = _Stream(*await asyncio.open_connection(ep.host, ep.port))
    s.writer.write(hello_frame())
    (welcome,) = await s.read(1)
    assert isinstance(welcome, Welcome)
    return s


class _Udp:
    def __init__(self, server: Server) -> None:
        ep = server.endpoint("udp")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((ep.host, ep.port))
        self.sock.settimeout(timeout(5))

    async def exchange(self, data: bytes) -> bytes:
        await asyncio.to_thread(self.sock.send, data)
        answer: bytes = await asyncio.to_thread(self.sock.recv, 65536)
        return answer

    def close(self) -> None:
        self.sock.close()


def message(datagram: bytes) -> Any:
    (frame,) = FrameDecoder().feed(datagram)
    return decode_message(frame)


@pytest.fixture
async def small(probe: Probe) -> AsyncIterator[Server]:
    limits = ServerLimits(stream=StreamLimits(max_frame=LIMIT), max_datagram=LIMIT)
    async with Server(probe, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], limits=limits) as srv:
        yield srv


# --------------------------------------------------------------------------- §2, §6: sizes


async def test_the_frame_limit_counts_meta_and_body_not_the_header_on_a_stream(
    small: Server, probe: Probe
) -> None:
    """WELCOME announces 1,024; a frame of 1,024 bytes of meta + body (1,040 on the wire) runs,
    one of 1,025 ends the session with CLOSE FRAME_TOO_LARGE and does not run."""
    s = await open_session(small)
    at_limit = count_request(1, AT_LIMIT_KEY)
    assert len(at_limit) == HEADER_SIZE + LIMIT
    s.writer.write(at_limit)
    assert await s.read(1) == [Response(1, 1, 1)]
    s.writer.close()

    ep = small.endpoint("tcp")
    s = _Stream(*await asyncio.open_connection(ep.host, ep.port))
    s.writer.write(hello_frame())
    welcome, *_ = await s.read(1)
    assert isinstance(welcome, Welcome) and welcome.max_frame == LIMIT
    s.writer.write(count_request(2, AT_LIMIT_KEY + 1))
    (close,) = await s.read(1)
    assert isinstance(close, Close) and close.code == ErrorCode.FRAME_TOO_LARGE
    assert "1025" in close.reason or "1,025" in close.reason, close.reason
    assert await s.at_eof()
    s.writer.close()
    assert probe.runs == {"k" * AT_LIMIT_KEY: 1}


async def test_udp_counts_meta_and_body_on_receipt_and_the_whole_datagram_on_sending(
    small: Server, probe: Probe
) -> None:
    """§6: the server with a limit of 1,024 accepts a datagram of 16 + 1,024 bytes and refuses
    one of 16 + 1,025 (DATAGRAM_TOO_LARGE, not run); it refuses to *send* a result whose whole
    datagram exceeds 1,024 although its meta + body would not; its WELCOME announces 1,024."""
    udp = _Udp(small)
    try:
        assert message(await udp.exchange(count_request(1, AT_LIMIT_KEY))) == Response(1, 1, 1)
        refused = message(await udp.exchange(count_request(2, AT_LIMIT_KEY + 1)))
        assert isinstance(refused, Error) and refused.request_id == 2
        assert refused.code == ErrorCode.DATAGRAM_TOO_LARGE
        # echo's RESPONSE: 16 + body; a body of 1,010 bytes (1,026 in all) is not sent
        value = "e" * (1010 - 3)  # msgpack str 16 header: 3 bytes
        answer = await udp.exchange(encode_request(3, "echo", [value]))
        err = message(answer)
        assert isinstance(err, Error) and err.code == ErrorCode.DATAGRAM_TOO_LARGE
        assert "result datagram of 1026 bytes" in err.message, err.message
        value = "e" * (1008 - 3)  # 16 + 1,008 = 1,024: sent
        assert message(await udp.exchange(encode_request(4, "echo", [value]))) == Response(
            4, value, 1
        )
        # §2: a version other than 1 over UDP gets DECODE_ERROR (not UNSUPPORTED_VERSION, 1003)
        v9 = encode_frame(MessageType.REQUEST, 5, b"count", b"\x91\xa1v", 0, 1, version=9)
        err = message(await udp.exchange(v9))
        assert isinstance(err, Error) and (err.request_id, err.code) == (
            5,
            ErrorCode.DECODE_ERROR,
        )
        hello = encode_hello(Hello(agent="x" * 64))
        welcome = message(await udp.exchange(hello))
        assert isinstance(welcome, Welcome) and welcome.max_frame == LIMIT
    finally:
        udp.close()
    assert probe.runs == {"k" * AT_LIMIT_KEY: 1}


async def test_a_hello_above_its_bounds_over_udp_gets_datagram_too_large(small: Server) -> None:
    """§5.1: over UDP a HELLO above 4,096 bytes gets ERROR DATAGRAM_TOO_LARGE (the request-level
    code for FRAME_TOO_LARGE), here with a frame limit of 65,507 so only the HELLO bound bites."""
    async with Server(Probe(), udp=["127.0.0.1:0"]) as srv:
        udp = _Udp(srv)
        try:
            big = encode_hello(Hello(agent="a" * (MAX_HELLO_SIZE - 6 + 1)))
            assert len(big) - HEADER_SIZE == MAX_HELLO_SIZE + 1
            err = message(await udp.exchange(big))
            assert isinstance(err, Error) and err.code == ErrorCode.DATAGRAM_TOO_LARGE
        finally:
            udp.close()


# --------------------------------------------------------------------------- §5.2: PING body


async def test_a_ping_body_over_125_bytes_closes_the_stream_with_protocol_error(
    small: Server,
) -> None:
    s = await open_session(small)
    s.writer.write(ping(5, 125))
    assert await s.read(1) == [Pong(5, b"p" * 125)]
    s.writer.write(ping(6, 126))
    got = await s.read(2)
    assert len(got) == 1 and isinstance(got[0], Close), got  # no PONG, only the CLOSE
    assert got[0].code == ErrorCode.PROTOCOL_ERROR
    assert await s.at_eof()
    s.writer.close()


def test_a_client_refuses_an_oversized_ping_from_its_server_the_same_way() -> None:
    """§5.2 "whichever side sent it": the client's session core closes with PROTOCOL_ERROR."""
    client = Connection(Role.CLIENT)
    client.data_to_send()
    client.receive_data(encode_welcome(Welcome(1, (1, 2, 0), 1 << 20, "srv")))
    events = client.receive_data(ping(9, 126))
    assert any(isinstance(e, ProtocolViolation) and e.fatal for e in events)
    assert [e for e in events if isinstance(e, ConnectionTerminated)] == [
        ConnectionTerminated(ErrorCode.PROTOCOL_ERROR, "PING payload of 126 bytes > 125", False)
    ]
    (close,) = [decode_message(f) for f in FrameDecoder().feed(client.data_to_send())]
    assert isinstance(close, Close) and close.code == ErrorCode.PROTOCOL_ERROR


async def test_a_ping_body_over_125_bytes_over_udp_gets_decode_error_not_pong(
    small: Server,
) -> None:
    udp = _Udp(small)
    try:
        assert message(await udp.exchange(ping(5, 125))) == Pong(5, b"p" * 125)
        err = message(await udp.exchange(ping(6, 126)))
        assert isinstance(err, Error) and (err.request_id, err.code) == (
            6,
            ErrorCode.DECODE_ERROR,
        )
        # and nothing else was sent for it: the next datagram is the next PING's PONG
        assert message(await udp.exchange(ping(7, 1))) == Pong(7, b"p")
    finally:
        udp.close()


# --------------------------------------------------------------------------- §6.1: request id 0

MARKER_ID = 0xFEED


@pytest.fixture
async def sealed(probe: Probe) -> AsyncIterator[Server]:
    async with Server(probe, udp=["127.0.0.1:0"], secret=SECRET) as srv:
        yield srv


def _marker() -> bytes:
    """An unsealed REQUEST naming MARKER_ID: always answered with the unsealed 18-byte refusal."""
    return encode_request(MARKER_ID, "count", ["marker"])


async def _answers(udp: _Udp, data: bytes) -> bytes | None:
    """The answer to ``data``, or None when the server answered nothing to it (the next datagram
    received is the marker's refusal)."""
    await asyncio.to_thread(udp.sock.send, data)
    await asyncio.to_thread(udp.sock.send, _marker())
    first: bytes = await asyncio.to_thread(udp.sock.recv, 65536)
    if _is_marker_refusal(first):
        return None
    second: bytes = await asyncio.to_thread(udp.sock.recv, 65536)
    assert _is_marker_refusal(second), second.hex(" ")
    return first


def _is_marker_refusal(data: bytes) -> bool:
    return len(data) == HEADER_SIZE + 2 and message(data) == Error(
        MARKER_ID, ErrorCode.UNAUTHENTICATED, "", ""
    )


def _cases(epoch: bytes, rid: int) -> dict[str, bytes]:
    """Refused datagrams of each kind §6.1 lists, naming ``rid``."""
    right = DatagramAuth(SECRET, epoch=epoch)
    now = time.time()
    request = encode_request(rid, "count", [f"never-{rid}"])
    forged = bytearray(right.seal(request, now))
    forged[HEADER_SIZE + 2] ^= 0x01
    pong = encode_frame(MessageType.PONG, rid, b"", b"x")  # 17 bytes: sealed, 49 (< 50)
    return {
        "bad-mac": bytes(forged),
        "unsealed": request,
        "too-short": encode_frame(MessageType.REQUEST, rid, b"", b"1234", flags=FLAG_AUTH),
        "stale": right.seal(request, now - 3600),
        "other-epoch-short": right.seal(pong, now, epoch=NO_EPOCH),
    }


async def test_refused_datagrams_with_request_id_0_get_no_answer_unless_sealed_for_another_epoch(
    sealed: Server, probe: Probe
) -> None:
    """§6.1: with request id 0, a bad MAC, an unsealed datagram, one too short to be sealed, a
    stale one, an epoch refusal under 50 bytes and a copy of an accepted datagram get no
    answer; the same datagrams naming id 5 get the 18-byte unsealed refusal (the copy: the
    sealed one). An epoch refusal of at least 50 bytes is answered, id 0 included, with the
    sealed refusal naming id 0."""
    host = sealed._datagrams[0]
    epoch = sealed.datagram_auth.epoch
    right = DatagramAuth(SECRET, epoch=epoch)
    udp = _Udp(sealed)
    try:
        for name, data in _cases(epoch, 0).items():
            assert await _answers(udp, data) is None, name
        for name, data in _cases(epoch, 5).items():
            answer = await _answers(udp, data)
            assert answer is not None and len(answer) == HEADER_SIZE + 2, name
            assert message(answer) == Error(5, ErrorCode.UNAUTHENTICATED, "", ""), name

        # An epoch refusal of at least 50 bytes names id 0 in a sealed refusal.
        now = time.time()
        pub_like = right.seal(encode_request(0, "count", ["never-0"]), now, epoch=NO_EPOCH)
        answer = await _answers(udp, pub_like)
        assert answer is not None and len(answer) == REFUSAL_SIZE
        client = DatagramAuth(SECRET, epoch=NO_EPOCH)
        assert message(client.open(answer, time.time(), track=False)) == Error(
            0, ErrorCode.UNAUTHENTICATED, "", ""
        )
        assert trailer_of(answer) == (epoch, int(now * 1000))

        # Accepted with id 0: the REQUEST gets the sealed DECODE_ERROR (§5.2); a copy, nothing.
        accepted = right.seal(encode_request(0, "count", ["never-0"]), time.time())
        answer = await _answers(udp, accepted)
        assert answer is not None
        err = message(client.open(answer, time.time(), track=False))
        assert isinstance(err, Error) and (err.request_id, err.code) == (
            0,
            ErrorCode.DECODE_ERROR,
        )
        assert await _answers(udp, accepted) is None
        # ... while a copy naming id 5 gets the sealed refusal
        accepted = right.seal(encode_request(5, "count", ["once-5"]), time.time())
        answer = await _answers(udp, accepted)
        assert answer is not None and message(client.open(answer, time.time(), False)) == (
            Response(5, 1, 1)
        )
        answer = await _answers(udp, accepted)
        assert answer is not None and len(answer) == REFUSAL_SIZE
        assert message(client.open(answer, time.time(), track=False)) == Error(
            5, ErrorCode.UNAUTHENTICATED, "", ""
        )
    finally:
        udp.close()
    assert probe.runs == {"once-5": 1}
    # Each refusal counted once: 4 per id of the five cases (the fifth is an epoch refusal),
    # the two copies, the id-0 REQUEST's DECODE_ERROR, and the 15 markers (unsealed).
    assert host.bad_datagrams == 2 * 4 + 2 + 1 + 15
    assert host.epoch_refusals == 2 + 1
