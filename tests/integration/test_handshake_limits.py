"""The handshake against a live server (issue 10, items 2 and 9): a HELLO is bounded before it is
parsed and the secret is checked first, so peers without the secret cannot spend the server's
CPU; the versions, frame limits and request ids the handshake and REQUEST carry follow
PROTOCOL.md §4 and §5.1, over TCP and UDP. Raw sockets send crafted bytes; a server runs in the
test's event loop."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

import sockstack.host.server as host_server
from sockstack import AsyncClient, ErrorCode, Server, ServerLimits
from sockstack.protocol.auth import token_extension
from sockstack.protocol.frames import HEADER_SIZE, FrameDecoder, MessageType, encode_frame
from sockstack.protocol.messages import (
    MAX_HELLO_EXTENSIONS,
    MAX_HELLO_SIZE,
    MIN_MAX_FRAME,
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

SECRET = b"the secret the attackers do not have"

# The HELLO of issue 10's attack: ~900 KB, 300,000 extensions, no secret.
HUGE_HELLO = encode_hello(Hello(extensions=((2, b""),) * 300_000))
HUGE_SIZE = len(HUGE_HELLO) - HEADER_SIZE
# The largest HELLO the server still reads: 4,096 bytes of meta + body, 16 extensions, the last
# one a wrong secret.
_EXTS = (*((2, b"p" * 240),) * (MAX_HELLO_EXTENSIONS - 1), token_extension(b"g" * 32))
_AGENT = "a" * (MAX_HELLO_SIZE - len(encode_hello(Hello(extensions=_EXTS))) + HEADER_SIZE)
MAX_HELLO = encode_hello(Hello(agent=_AGENT, extensions=_EXTS))
assert len(MAX_HELLO) - HEADER_SIZE == MAX_HELLO_SIZE


@pytest.fixture
async def guarded(probe: Probe) -> AsyncIterator[Server]:
    async with Server(probe, tcp=["127.0.0.1:0"], secret=SECRET) as srv:
        yield srv


@pytest.fixture
async def plain(probe: Probe) -> AsyncIterator[Server]:
    async with Server(probe, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"]) as srv:
        yield srv


def hello_frame(lo: int = 1, hi: int = 1, max_frame: int = 1 << 20) -> bytes:
    """A HELLO whose body says exactly this (header version 1, as any client sends it)."""
    body = bytes([lo, hi]) + max_frame.to_bytes(4, "big")
    return encode_frame(MessageType.HELLO, 0, b"", body)


async def session(
    server: Server, data: bytes, n: int | None = None, sizes: list[int] | None = None
) -> list[Any]:
    """Send ``data`` on a new connection; the first ``n`` messages, or with ``n`` None every
    message until the server closes the connection (bounded by a timeout either way). The size
    (meta + body) of each frame received is added to ``sizes``."""
    ep = server.endpoint("tcp")
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    writer.write(data)
    dec = FrameDecoder(1 << 30)
    out: list[Any] = []
    try:
        async with asyncio.timeout(timeout(5)):
            while n is None or len(out) < n:
                chunk = await reader.read(65536)
                if not chunk:
                    assert n is None, f"closed after {out}"
                    break
                frames = dec.feed(chunk)
                if sizes is not None:
                    sizes += [len(f.meta) + len(f.body) for f in frames]
                out += [decode_message(f) for f in frames]
    finally:
        writer.close()
    return out


def _blocking_exchange(server: Server, data: bytes) -> list[Any]:
    """``session`` with a blocking socket, for attacker threads."""
    ep = server.endpoint("tcp")
    with socket.create_connection((ep.host, ep.port), timeout=timeout(5)) as sock:
        sock.sendall(data)
        dec = FrameDecoder(1 << 30)
        out: list[Any] = []
        while chunk := sock.recv(65536):
            out += [decode_message(f) for f in dec.feed(chunk)]
        return out


# ------------------------------------------------------------------------- item 2: HELLO bounds


async def test_oversized_hello_is_refused_from_its_header(guarded: Server) -> None:
    """The 16-byte header alone gets the refusal: none of the 900 KB body has been sent."""
    out = await session(guarded, HUGE_HELLO[:HEADER_SIZE])
    reason = f"HELLO of {HUGE_SIZE} bytes exceeds the limit of {MAX_HELLO_SIZE} bytes"
    assert out == [Close(ErrorCode.FRAME_TOO_LARGE, reason)]


async def test_too_many_extensions_are_refused_before_the_secret_is_checked(
    guarded: Server, probe: Probe
) -> None:
    exts = ((2, b""),) * MAX_HELLO_EXTENSIONS + (token_extension(SECRET),)
    hello = encode_hello(Hello(extensions=exts))
    out = await session(guarded, hello + encode_request(1, "count", ["after-17"]))
    reason = f"HELLO carries more than {MAX_HELLO_EXTENSIONS} extensions"
    assert out == [Close(ErrorCode.FRAME_TOO_LARGE, reason)]
    assert probe.runs.get("after-17") is None
    # 16 extensions, the secret among them: served
    exts = ((2, b""),) * (MAX_HELLO_EXTENSIONS - 1) + (token_extension(SECRET),)
    hello = encode_hello(Hello(extensions=exts))
    out = await session(guarded, hello + encode_request(1, "add", [2, 3]), 2)
    assert isinstance(out[0], Welcome) and out[1] == Response(1, 5, 1)


async def test_authenticated_client_is_served_while_peers_without_the_secret_send_maximal_hellos(
    guarded: Server, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two peers without the secret alternate, as fast as the server answers, the largest HELLO
    it reads (4,096 bytes, 16 extensions, a wrong secret, requests pipelined behind it) and the
    900 KB HELLO of the attack (its header only: refused before the body is sent). An
    authenticated client is served meanwhile; the secret check never sees more than a bounded
    HELLO, and nothing sent behind a refused HELLO runs."""
    seen: list[int] = []  # extensions of each HELLO that reached the secret check
    real_checker = host_server.token_checker

    def spying_checker(secret: bytes) -> Any:
        check = real_checker(secret)

        def spy(hello: Hello) -> bool:
            seen.append(len(hello.extensions))
            return check(hello)

        return spy

    monkeypatch.setattr(host_server, "token_checker", spying_checker)
    rounds = 15
    failures: list[str] = []
    refused = {"auth": 0, "size": 0}
    lock = threading.Lock()
    too_large = Close(
        ErrorCode.FRAME_TOO_LARGE,
        f"HELLO of {HUGE_SIZE} bytes exceeds the limit of {MAX_HELLO_SIZE} bytes",
    )
    sneaky = MAX_HELLO + encode_request(1, "count", ["sneaky"])

    def attacker() -> None:
        try:
            for _ in range(rounds):
                out = _blocking_exchange(guarded, sneaky)
                if out != [Close(ErrorCode.AUTH_FAILED, "missing or wrong credentials")]:
                    failures.append(f"maximal HELLO: {out}")
                    return
                with lock:
                    refused["auth"] += 1
                out = _blocking_exchange(guarded, HUGE_HELLO[:HEADER_SIZE])
                if out != [too_large]:
                    failures.append(f"900 KB HELLO: {out}")
                    return
                with lock:
                    refused["size"] += 1
        except OSError as exc:  # e.g. no refusal within the timeout
            failures.append(f"{type(exc).__name__}: {exc}")

    attackers = [asyncio.create_task(asyncio.to_thread(attacker)) for _ in range(2)]
    attack = asyncio.gather(*attackers)
    calls = 0
    async with AsyncClient(str(guarded.endpoint("tcp")), secret=SECRET, timeout=timeout(5)) as c:
        while not attack.done() or calls < 100:
            assert await c.call("add", calls, 1) == calls + 1
            calls += 1
    await attack
    assert failures == []
    assert refused == {"auth": 2 * rounds, "size": 2 * rounds}
    assert probe.runs.get("sneaky") is None
    # Every HELLO that reached the secret check was bounded: the maximal ones and the client's.
    # The 900 KB ones never got that far.
    assert len(seen) == 2 * rounds + 1 and max(seen) == MAX_HELLO_EXTENSIONS


# ------------------------------------------------------------------------- item 9: deviations


@pytest.mark.parametrize(("lo", "hi"), [(0, 255), (0, 1), (1, 255)])
async def test_a_client_speaking_a_range_with_1_gets_version_1(
    plain: Server, lo: int, hi: int
) -> None:
    out = await session(plain, hello_frame(lo, hi) + encode_request(1, "add", [2, 3]), 2)
    assert isinstance(out[0], Welcome) and out[0].version == 1
    assert out[1:] == [Response(1, 5, 1)]


@pytest.mark.parametrize(
    ("lo", "hi", "reason"),
    [
        (0, 0, "client speaks versions 0..0, server 1..1"),
        (2, 255, "client speaks versions 2..255, server 1..1"),
        (3, 2, "HELLO version range 3..2 is empty"),
    ],
)
async def test_a_range_without_1_is_unsupported(
    plain: Server, lo: int, hi: int, reason: str
) -> None:
    out = await session(plain, hello_frame(lo, hi) + encode_request(1, "add", [2, 3]))
    assert out == [Close(ErrorCode.UNSUPPORTED_VERSION, reason)]


@pytest.mark.parametrize("max_frame", [0, 1, 16, MIN_MAX_FRAME - 1])
async def test_a_tiny_max_frame_is_refused_in_the_handshake(
    plain: Server, probe: Probe, max_frame: int
) -> None:
    """Nothing is served to a client whose limit no answer could respect: no WELCOME, no
    answer, nothing run; only the CLOSE that refuses its HELLO."""
    request = encode_request(1, "count", [f"tiny-{max_frame}"])
    out = await session(plain, hello_frame(max_frame=max_frame) + request)
    reason = f"HELLO announces max_frame {max_frame}, below the minimum of {MIN_MAX_FRAME} bytes"
    assert out == [Close(ErrorCode.PROTOCOL_ERROR, reason)]
    assert probe.runs.get(f"tiny-{max_frame}") is None


async def test_at_the_minimum_max_frame_nothing_sent_exceeds_it(plain: Server) -> None:
    """A client at 512 bytes: a result above it becomes an ERROR, and ERROR texts (an unknown
    method's name, echoed) are cut to fit. Every frame received is within the limit."""
    sizes: list[int] = []
    data = (
        hello_frame(max_frame=MIN_MAX_FRAME)
        + encode_request(1, "echo", ["x" * 1000])
        + encode_request(2, "m" * 3000, [])
        + encode_request(3, "echo", ["fits"])
    )
    out = await session(plain, data, 4, sizes)
    assert isinstance(out[0], Welcome)
    by_id = {m.request_id: m for m in out[1:] if isinstance(m, Response | Error)}
    assert by_id[1].code == ErrorCode.RESULT_TOO_LARGE  # a request-level code (§7)
    assert by_id[2].code == ErrorCode.UNKNOWN_METHOD and by_id[2].message.startswith("no method")
    assert by_id[3] == Response(3, "fits", 1)
    assert max(sizes) <= MIN_MAX_FRAME, sizes


async def test_request_id_0_gets_an_error_over_tcp(plain: Server, probe: Probe) -> None:
    """PROTOCOL.md §4: a REQUEST's id is non-zero. Id 0 is answered ERROR DECODE_ERROR (id 0)
    and does not run, whether alone in a read (the fast path) or behind a PING (the general
    path); the session goes on."""
    reason = "REQUEST with request id 0: a request's id is non-zero"
    ping = encode_frame(MessageType.PING, 7, b"", b"")
    ep = plain.endpoint("tcp")
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    dec = FrameDecoder()

    async def read(n: int) -> list[Any]:
        got: list[Any] = []
        async with asyncio.timeout(timeout(5)):
            while len(got) < n:
                chunk = await reader.read(65536)
                assert chunk, f"closed after {got}"
                got += [decode_message(f) for f in dec.feed(chunk)]
        return got

    writer.write(hello_frame())
    assert isinstance((await read(1))[0], Welcome)
    error = Error(0, ErrorCode.DECODE_ERROR, "DECODE_ERROR", reason)
    writer.write(encode_request(0, "count", ["id0-alone"]))
    assert await read(1) == [error]
    writer.write(
        ping + encode_request(0, "count", ["id0-behind"]) + encode_request(5, "add", [1, 1])
    )
    got = await read(3)
    assert got[1:] == [error, Response(5, 2, 1)]
    writer.close()
    assert probe.runs.get("id0-alone") is None and probe.runs.get("id0-behind") is None


@pytest.mark.parametrize("flags", [0, 0x40], ids=["fast-path", "general-path"])
async def test_request_id_0_gets_an_error_over_udp(plain: Server, probe: Probe, flags: int) -> None:
    """Over UDP too: ERROR DECODE_ERROR with id 0 (no larger than the datagram: the code alone
    here), nothing runs; a flag bit no message defines sends it down the general path."""
    ep = plain.endpoint("udp")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((ep.host, ep.port))
    sock.settimeout(timeout(5))
    try:
        key = f"udp-id0-{flags}"
        data = encode_frame(MessageType.REQUEST, 0, b"count", msgpack.packb([key]), flags, 1)
        await asyncio.to_thread(sock.send, data)
        answer = await asyncio.to_thread(sock.recv, 65536)
        (frame,) = FrameDecoder().feed(answer)
        err = decode_message(frame)
        assert isinstance(err, Error) and (err.request_id, err.code) == (0, ErrorCode.DECODE_ERROR)
        assert len(answer) <= len(data)
        await asyncio.to_thread(sock.send, encode_request(9, "add", [2, 2]))
        answer = await asyncio.to_thread(sock.recv, 65536)
        assert decode_message(FrameDecoder().feed(answer)[0]) == Response(9, 4, 1)
        assert probe.runs.get(key) is None
    finally:
        sock.close()


# ------------------------------------------- §5.1 step 3: requests pipelined behind a refusal

SNEAKY = encode_request(1, "count", ["sneaky"]) + encode_request(2, "count", ["sneaky"])


async def _count_sneaky(server: Server) -> int:
    """How many times "sneaky" had been counted, asked on a good connection (this call counts
    once more: the answer less one)."""
    out = await session(server, hello_frame() + encode_request(1, "count", ["sneaky"]), n=2)
    assert isinstance(out[0], Welcome) and isinstance(out[1], Response), out
    return int(out[1].result) - 1


@pytest.mark.parametrize(
    ("hello", "code"),
    [
        (hello_frame(2, 3), ErrorCode.UNSUPPORTED_VERSION),
        (hello_frame(3, 2), ErrorCode.UNSUPPORTED_VERSION),
        (hello_frame(max_frame=MIN_MAX_FRAME - 1), ErrorCode.PROTOCOL_ERROR),
    ],
)
async def test_requests_pipelined_behind_a_refused_hello_did_not_run(
    plain: Server, hello: bytes, code: int
) -> None:
    # §5.1 step 3: a HELLO answered with CLOSE instead of WELCOME: nothing sent behind it ran.
    # (AUTH_FAILED: test_auth.py::test_requests_pipelined_behind_a_bad_hello_never_run.)
    out = await session(plain, hello + SNEAKY)
    assert len(out) == 1 and isinstance(out[0], Close) and out[0].code == code, out
    assert await _count_sneaky(plain) == 0


async def test_requests_pipelined_on_a_refused_connection_did_not_run(probe: Probe) -> None:
    # CLOSE TOO_MANY_CONNECTIONS is sent as the connection is accepted: nothing it carries is
    # read, let alone run.
    async with Server(probe, tcp=["127.0.0.1:0"], limits=ServerLimits(max_connections=1)) as srv:
        ep = srv.endpoint("tcp")
        async with AsyncClient(str(ep), timeout=timeout(5)) as holder:  # the one connection
            assert await holder.call("add", 1, 1) == 2
            reader, writer = await asyncio.open_connection(ep.host, ep.port)
            writer.write(hello_frame() + SNEAKY)
            dec = FrameDecoder()
            out: list[Any] = []
            try:
                async with asyncio.timeout(timeout(5)):
                    while chunk := await reader.read(65536):
                        out += [decode_message(f) for f in dec.feed(chunk)]
            except ConnectionResetError:
                pass  # closed with our bytes unread: the CLOSE came first
            finally:
                writer.close()
            assert len(out) == 1 and isinstance(out[0], Close), out
            assert out[0].code == ErrorCode.TOO_MANY_CONNECTIONS
            assert await holder.call("count", "sneaky") == 1  # this call is the first
