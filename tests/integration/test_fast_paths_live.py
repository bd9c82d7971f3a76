"""The fast paths against a live server on loopback, each next to its general path:

- the UDP server's size check and msgpack extension refusal (a refused request never runs);
- the TCP server's frame limit on meta + body, however the bytes arrive;
- the TCP server's inline answer (receive_single, response_frame) against the general path
  (batch of frames, send_response), for every kind of outcome;
- the blocking client's call fast path: a timed-out call's late answer never becomes the
  answer of the next call;
- arguments checked before every kind of method runs (BAD_ARGUMENTS), over every client.

Services here count their runs so that "refused" is checked as "did not run". Nothing waits
on the clock: held methods wait on events the test sets, and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest

from sockstack import (
    AsyncClient,
    CallTimeout,
    Client,
    CodecError,
    ErrorCode,
    RemoteError,
    Server,
    ServerLimits,
    Service,
    ServiceError,
    StreamLimits,
    connect,
    method,
)
from sockstack.protocol import (
    MSGPACK,
    Close,
    Error,
    FrameDecoder,
    Hello,
    MessageType,
    Pong,
    Response,
    Welcome,
    decode_message,
    encode_frame,
)
from sockstack.protocol.messages import encode_hello, encode_ping, encode_request
from sockstack.rpc.service import make_handler
from tests.conftest import timeout

packb = msgpack.packb
MAX_FRAME = 1000
MAX_DATAGRAM = 1200
LONG_NAME = "long" * 1000  # a 4,000-byte method name: the meta of a REQUEST
UNKNOWN_FLAG = 0x40  # no message defines it: ignored by receivers, declined by the fast paths


class Counted(Service):
    """Methods of each kind that count their runs."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self._lock = threading.Lock()

    def _run(self, name: str) -> None:
        with self._lock:
            self.runs[name] = self.runs.get(name, 0) + 1

    @method(inline=True)
    def echo(self, value: Any = None) -> Any:
        self._run("echo")
        return value

    @method(inline=True, name=LONG_NAME)
    def long(self, value: Any = None) -> Any:
        self._run("long")
        return value

    @method
    def threaded_echo(self, value: Any) -> Any:
        self._run("threaded_echo")
        return value

    @method
    async def async_echo(self, value: Any) -> Any:
        self._run("async_echo")
        await asyncio.sleep(0)  # a real suspension: this is a coroutine
        return value

    @method
    async def async_pair(self, a: int, b: int) -> list[int]:
        self._run("async_pair")
        return [a, b]

    @method(inline=True)
    def fail(self) -> None:
        self._run("fail")
        raise ValueError("inline failure")

    @method(inline=True)
    def refuse(self) -> None:
        self._run("refuse")
        raise ServiceError("not for you")

    @method(inline=True)
    def unencodable(self) -> object:
        self._run("unencodable")
        return object()

    @method(inline=True)
    def blob(self, size: int) -> bytes:
        self._run("blob")
        return b"b" * size


@pytest.fixture
def counted() -> Counted:
    return Counted()


@pytest.fixture
async def small(counted: Counted) -> AsyncIterator[Server]:
    limits = ServerLimits(stream=StreamLimits(max_frame=MAX_FRAME), max_datagram=MAX_DATAGRAM)
    async with Server(counted, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], limits=limits) as srv:
        yield srv


def request(rid: int, meta: bytes, body: bytes, flags: int = 0) -> bytes:
    return encode_frame(MessageType.REQUEST, rid, meta, body, flags, 1)


def args_of_size(size: int) -> bytes:
    """A msgpack array of one bytes value, ``size`` bytes in all (260 <= size < 65536)."""
    body = packb([b"x" * (size - 4)])
    assert len(body) == size
    return body


def flagged(data: bytes, flags: int) -> bytes:
    return data[:4] + bytes([data[4] | flags]) + data[5:]


# ----------------------------------------------------------------------------- UDP server


async def udp_exchange(server: Server, datagram: bytes) -> Any:
    """Send one datagram from a fresh socket; the one answer, decoded."""
    ep = server.endpoint("udp")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((ep.host, ep.port))
        await loop.sock_sendall(sock, datagram)
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout(5))
    (frame,) = FrameDecoder().feed(data)
    return decode_message(frame)


UDP_REFUSALS = [
    (  # a 2,000-byte datagram at max_datagram 1,200
        "2000-byte-request",
        request(3, b"echo", args_of_size(1980)),
        ErrorCode.DATAGRAM_TOO_LARGE,  # over UDP, the request-level code (PROTOCOL.md §6)
        "echo",
    ),
    (  # the body alone (300) fits: meta + body (4,300) does not
        "long-name-request",
        request(3, LONG_NAME.encode(), args_of_size(300)),
        ErrorCode.DATAGRAM_TOO_LARGE,
        "long",
    ),
    (
        "ext-type-argument",
        request(3, b"echo", packb([msgpack.ExtType(5, b"x")])),
        ErrorCode.DECODE_ERROR,
        "echo",
    ),
    (
        "ext-type-nested",
        request(3, b"threaded_echo", packb([{"k": [msgpack.ExtType(1, b"")]}])),
        ErrorCode.DECODE_ERROR,
        "threaded_echo",
    ),
    (
        "ext-type-to-async",
        request(3, b"async_echo", packb([msgpack.ExtType(9, b"")])),
        ErrorCode.DECODE_ERROR,
        "async_echo",
    ),
]


@pytest.mark.parametrize("path", ["fast", "slow"])
@pytest.mark.parametrize(
    ("datagram", "code", "name"), [c[1:] for c in UDP_REFUSALS], ids=[c[0] for c in UDP_REFUSALS]
)
async def test_udp_refusals_reach_the_server_and_nothing_runs(
    small: Server, counted: Counted, path: str, datagram: bytes, code: int, name: str
) -> None:
    """Sent raw (the clients refuse these locally): the server answers ERROR with the code and
    the request id, and the method does not run. ``slow`` sets a flag bit receivers ignore,
    which the server's fast path declines."""
    data = datagram if path == "fast" else flagged(datagram, UNKNOWN_FLAG)
    answer = await udp_exchange(small, data)
    assert isinstance(answer, Error) and (answer.request_id, answer.code) == (3, code)
    assert counted.runs == {}
    # The method is there and runs when called within the limits, on the same path (the
    # 4,000-byte name cannot fit with a body: echo instead).
    ran = "echo" if name == "long" else name
    fine = request(4, ran.encode(), packb([1]))
    answer = await udp_exchange(small, fine if path == "fast" else flagged(fine, UNKNOWN_FLAG))
    assert answer == Response(4, 1, 1)
    assert counted.runs == {ran: 1}


async def test_udp_request_at_the_limit_runs(small: Server, counted: Counted) -> None:
    datagram = request(5, b"echo", args_of_size(MAX_DATAGRAM - 20))  # 1,200 bytes whole
    assert len(datagram) == MAX_DATAGRAM
    answer = await udp_exchange(small, datagram)
    assert answer == Response(5, b"x" * (MAX_DATAGRAM - 24), 1)
    assert counted.runs == {"echo": 1}


async def test_udp_answer_over_the_limit_becomes_an_error(small: Server, counted: Counted) -> None:
    """Issue 10 item 11: the limit counts the whole datagram; an answer that would not fit is
    an ERROR, never a send the OS refuses while the client retries to its timeout."""
    datagram = request(5, b"echo", args_of_size(MAX_DATAGRAM - 4))  # meta + body: 1,200
    answer = await udp_exchange(small, datagram)  # the echo would be 1,211 bytes whole
    assert isinstance(answer, Error) and answer.code == ErrorCode.DATAGRAM_TOO_LARGE
    assert "1211 bytes exceeds the limit of 1200" in answer.message
    assert counted.runs == {"echo": 1}


# ----------------------------------------------------------------------------- TCP server


async def tcp_session(server: Server, max_frame: int = 1 << 20) -> tuple[Any, Any, FrameDecoder]:
    """A raw connection past its handshake (HELLO with ``max_frame``, WELCOME read)."""
    ep = server.endpoint("tcp")
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    writer.write(encode_hello(Hello(1, 1, max_frame)))
    dec = FrameDecoder()
    got: list[Any] = []
    async with asyncio.timeout(timeout(5)):
        while not got:
            got += [decode_message(f) for f in dec.feed(await reader.read(65536))]
    assert isinstance(got[0], Welcome) and len(got) == 1
    return reader, writer, dec


async def read_messages(reader: Any, dec: FrameDecoder, n: int) -> list[Any]:
    """The next ``n`` messages (bounded by a timeout)."""
    out: list[Any] = []
    async with asyncio.timeout(timeout(5)):
        while len(out) < n:
            chunk = await reader.read(65536)
            assert chunk, f"closed after {out}"
            out += [decode_message(f) for f in dec.feed(chunk)]
    return out


async def read_until_closed(reader: Any, dec: FrameDecoder) -> list[Any]:
    out: list[Any] = []
    async with asyncio.timeout(timeout(5)):
        while chunk := await reader.read(65536):
            out += [decode_message(f) for f in dec.feed(chunk)]
    return out


OVERSIZED = request(3, LONG_NAME.encode(), args_of_size(1000))  # 4,000 meta + 1,000 body
ANSWER_OF_OVERSIZED = Close(
    ErrorCode.FRAME_TOO_LARGE, f"frame of 5000 bytes exceeds the limit of {MAX_FRAME} bytes"
)


@pytest.mark.parametrize(
    "mode", ["one-write", "after-an-answer", "behind-a-ping", "header-alone", "with-hello"]
)
async def test_tcp_frame_limit_counts_meta_and_body(
    small: Server, counted: Counted, mode: str
) -> None:
    """A request whose body alone fits the limit but meta + body does not closes the session
    with FRAME_TOO_LARGE, however the bytes arrive; the method (it exists) does not run."""
    if mode == "with-hello":  # the whole exchange in the connection's first read
        ep = small.endpoint("tcp")
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        dec = FrameDecoder()
    else:
        reader, writer, dec = await tcp_session(small)
    try:
        if mode == "after-an-answer":  # the session has served a request first
            writer.write(request(1, b"echo", packb([1])))
            assert await read_messages(reader, dec, 1) == [Response(1, 1, 1)]
        writer.write(
            {
                "with-hello": encode_hello(Hello()) + OVERSIZED,
                "one-write": OVERSIZED,
                "after-an-answer": OVERSIZED,
                "behind-a-ping": encode_ping(9, b"p") + OVERSIZED,
                "header-alone": OVERSIZED[:16],  # refused on the header, before the rest is sent
            }[mode]
        )
        out = await read_until_closed(reader, dec)
    finally:
        writer.close()
    if mode == "with-hello":
        assert isinstance(out[0], Welcome)
        out = out[1:]
    if mode == "behind-a-ping":
        assert out[0] == Pong(9, b"p")
        out = out[1:]
    assert out == [ANSWER_OF_OVERSIZED]
    assert "long" not in counted.runs


def _bad_arguments_message(name: str, args: list[Any]) -> str:
    """What the signature check says (the reference: rpc/service.py)."""
    problem = make_handler(name, getattr(Counted(), name), inline=True).check_arguments(args, {})
    assert problem is not None
    return problem


def _encoder_message(value: Any) -> str:
    with pytest.raises(CodecError) as info:
        MSGPACK.encode(value)
    return str(info.value)


# Outcomes of an inline method, and of the others, as the server must answer them.
ANSWERS: list[tuple[str, str, list[Any], Callable[[int], Any]]] = [
    ("echo", "echo", [{"k": [1, "é"]}], lambda rid: Response(rid, {"k": [1, "é"]}, 1)),
    ("async", "async_echo", [7], lambda rid: Response(rid, 7, 1)),
    ("threaded", "threaded_echo", [b"x"], lambda rid: Response(rid, b"x", 1)),
    (
        "raises",
        "fail",
        [],
        lambda rid: Error(rid, ErrorCode.UNEXPECTED_ERROR, "ValueError", "inline failure"),
    ),
    (
        "service-error",
        "refuse",
        [],
        lambda rid: Error(rid, ErrorCode.APPLICATION_ERROR, "ServiceError", "not for you"),
    ),
    (
        "unknown-method",
        "nope",
        [],
        lambda rid: Error(rid, ErrorCode.UNKNOWN_METHOD, "UNKNOWN_METHOD", "no method 'nope'"),
    ),
    (
        "bad-arguments",
        "echo",
        [1, 2],
        lambda rid: Error(
            rid,
            ErrorCode.BAD_ARGUMENTS,
            "BAD_ARGUMENTS",
            _bad_arguments_message("echo", [1, 2]),
        ),
    ),
    (
        "unencodable-result",
        "unencodable",
        [],
        lambda rid: Error(
            rid,
            ErrorCode.RESULT_NOT_ENCODABLE,
            "RESULT_NOT_ENCODABLE",
            _encoder_message(object()),
        ),
    ),
    (
        "result-above-the-client-limit",  # the client's HELLO said max_frame 1,000
        "blob",
        [5000],
        lambda rid: Error(
            rid,
            ErrorCode.RESULT_TOO_LARGE,
            "RESULT_TOO_LARGE",
            "frame of 5003 bytes exceeds the peer's limit of 1000 bytes",
        ),
    ),
]


def _answer_params() -> list[Any]:
    params = []
    for name, meth, args, want in ANSWERS:
        for mode in ("one-write", "pipelined", "behind-a-ping"):
            params.append(pytest.param(meth, args, want, mode, id=f"{name}-{mode}"))
    return params


@pytest.mark.parametrize(("meth", "args", "want", "mode"), _answer_params())
async def test_tcp_answers_are_the_same_on_every_path(
    small: Server,
    meth: str,
    args: list[Any],
    want: Callable[[int], Any],
    mode: str,
) -> None:
    """One request alone in a read (receive_single; an inline method is answered at once with
    response_frame), two in one read (the batch loop; answers queued with send_response), or
    behind a PING (the general loop): the same answers."""
    reader, writer, dec = await tcp_session(small, max_frame=1000)
    try:
        one = encode_request(7, meth, args)
        if mode == "one-write":
            writer.write(one)
            got = await read_messages(reader, dec, 1)
            expected = [want(7)]
        elif mode == "pipelined":
            writer.write(one + encode_request(8, meth, args))
            got = await read_messages(reader, dec, 2)
            expected = [want(7), want(8)]
        else:
            writer.write(encode_ping(5, b"p") + one)
            got = await read_messages(reader, dec, 2)
            expected = [Pong(5, b"p"), want(7)]
        assert sorted(got, key=repr) == sorted(expected, key=repr)
        # and the session goes on
        writer.write(encode_request(9, "echo", ["after"]))
        assert await read_messages(reader, dec, 1) == [Response(9, "after", 1)]
    finally:
        writer.close()


# ----------------------------------------------------------------------------- arguments


BAD_ARGS = [
    ("inline", "echo", (1, 2)),
    ("threaded", "threaded_echo", ()),
    ("threaded-too-many", "threaded_echo", (1, 2)),
    ("async", "async_echo", ()),
    ("async-too-many", "async_echo", (1, 2)),
    ("async-two", "async_pair", (1,)),
]


@pytest.mark.parametrize(("meth", "args"), [b[1:] for b in BAD_ARGS], ids=[b[0] for b in BAD_ARGS])
@pytest.mark.parametrize("scheme", ["tcp", "udp"])
@pytest.mark.parametrize("client_kind", ["async", "blocking"])
async def test_bad_arguments_are_refused_and_nothing_runs(
    small: Server,
    counted: Counted,
    scheme: str,
    client_kind: str,
    meth: str,
    args: tuple[Any, ...],
) -> None:
    url = str(small.endpoint(scheme))
    errors: list[RemoteError] = []
    if client_kind == "async":
        async with AsyncClient(url, timeout=timeout(5)) as c:
            for call in (c.call(meth, *args), c.call(meth, *args[:1], nonsense=1)):
                with pytest.raises(RemoteError) as info:
                    await call
                errors.append(info.value)
    else:

        def calls() -> None:
            with connect(url, timeout=timeout(5)) as c:
                with pytest.raises(RemoteError) as info:
                    c.call(meth, *args)  # the call's fast path
                errors.append(info.value)
                with pytest.raises(RemoteError) as info:
                    c.call(meth, *args[:1], nonsense=1)  # an unknown keyword: the general path
                errors.append(info.value)

        await asyncio.to_thread(calls)
    assert len(errors) == 2
    for error in errors:
        assert (error.code, error.type) == (ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS"), error
        assert error.message.startswith(meth + "(")
    assert counted.runs == {}  # refused before running: not the TypeError of a call
    # and the methods do run with fitting arguments
    async with AsyncClient(url, timeout=timeout(5)) as c:
        assert await c.call("async_pair", 1, 2) == [1, 2]
    assert counted.runs == {"async_pair": 1}


# ----------------------------------------------------------------------------- late answers


class Held(Service):
    """``held(n)`` runs in a worker thread until the test releases ``n``."""

    def __init__(self) -> None:
        self.entered = {n: threading.Event() for n in (1, 2)}
        self.release = {n: threading.Event() for n in (1, 2)}

    @method
    def held(self, n: int) -> int:
        self.entered[n].set()
        self.release[n].wait(timeout(30))  # bounded: the test sets it
        return n


def unread_bytes(client: Client) -> int:
    """Bytes received by the client's socket that it has not read yet (0: all consumed)."""
    sock = client.connection.sock
    assert sock is not None
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


async def eventually(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait, bounded, for a condition nothing signals (another thread's or the kernel's)."""
    async with asyncio.timeout(timeout(seconds)):
        while not cond():
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("style", ["positional", "keywords"])
@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_blocking_client_never_returns_a_late_answer_to_the_next_call(
    scheme: str, style: str
) -> None:
    """Call 1 times out; call 2 is sent; then call 1's answer arrives, alone, while call 2
    waits: call 2 must ignore it and return its own answer. ``positional`` takes the call's
    fast path (one-piece request, first read inlined), ``keywords`` the general one."""
    service = Held()
    async with Server(service, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"]) as srv:
        client = await asyncio.to_thread(connect, str(srv.endpoint(scheme)), timeout=timeout(10))
        try:

            def call(n: int, t: float | None = None) -> Any:
                if style == "positional":
                    return client.call("held", n, timeout=t)
                return client.call("held", n=n, timeout=t)

            with pytest.raises(CallTimeout):
                await asyncio.to_thread(call, 1, 0.2)  # held by the test: it cannot answer
            assert await asyncio.to_thread(service.entered[1].wait, timeout(5))
            second = asyncio.ensure_future(asyncio.to_thread(call, 2))
            assert await asyncio.to_thread(service.entered[2].wait, timeout(5))
            service.release[1].set()  # call 1 ends now: its answer comes late
            # Its answer is written (the server counts it done in the same step) and read by
            # the client while call 2 is still held: call 2 sees it alone.
            await eventually(lambda: srv._in_flight == 1)
            await eventually(lambda: unread_bytes(client) == 0)
            service.release[2].set()
            assert await asyncio.wait_for(second, timeout(10)) == 2
            assert await asyncio.to_thread(call, 2) == 2  # and the session is still in step
        finally:
            for ev in service.release.values():
                ev.set()
            client.close()


async def test_sealed_udp_answer_counts_its_trailer(counted: Counted) -> None:
    """With a secret the seal adds a trailer: an answer that fits unsealed but not sealed is an
    ERROR (DATAGRAM_TOO_LARGE), not a datagram the OS refuses while the client times out."""
    from sockstack import AsyncClient, RemoteError

    limits = ServerLimits(max_datagram=1200)
    async with Server(counted, udp=["127.0.0.1:0"], limits=limits, secret=b"k" * 32) as srv:
        url = str(srv.endpoint("udp"))
        async with AsyncClient(url, secret=b"k" * 32, timeout=timeout(5)) as client:
            assert await client.call("echo", b"x" * 1100) == b"x" * 1100  # fits sealed
            with pytest.raises(RemoteError) as info:
                await client.call("echo", b"x" * 1170)  # 1,189 bytes unsealed, 1,221 sealed
            assert info.value.code == ErrorCode.DATAGRAM_TOO_LARGE
