"""Deadlines, cancellation and metadata, live over loopback (issue 12 items 3 and 4).

PROTOCOL.md §4: a REQUEST may carry the caller's time left (flag DEADLINE) and metadata (flag
METADATA); RESPONSE and ERROR may carry trailers; CANCEL (0x09, streams only) stops a call; the
server announces what it reads in WELCOME's extension 2. Each test drives a real server on
127.0.0.1 with the asyncio client, or with raw frames where the test needs bytes the client
would never send (a budget of 0, a bad key, a CANCEL for an unknown id).
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from sockstack import (
    AsyncClient,
    CallTimeout,
    ErrorCode,
    LocalProtocolError,
    Reply,
    Server,
    ServerLimits,
    Service,
    connect,
    current_context,
    method,
)
from sockstack.protocol.connection import Connection
from sockstack.protocol.events import Error, Pong, Request, Response, Role
from sockstack.protocol.frames import MessageType, encode_frame
from sockstack.protocol.messages import (
    FLAG_METADATA,
    encode_cancel,
    encode_ping,
    encode_request,
)
from tests.conftest import timeout

HOST = "127.0.0.1"


class Work(Service):
    """Methods that report what they saw and whether their work was stopped."""

    def __init__(self) -> None:
        self.runs = 0
        self.lock = threading.Lock()
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()
        self.gate = asyncio.Event()
        self.t_started = threading.Event()
        self.t_flagged = threading.Event()
        self.release = threading.Event()

    def _ran(self) -> None:
        with self.lock:
            self.runs += 1

    @method
    async def seen(self) -> dict[str, Any]:
        ctx = current_context()
        return {
            "remaining": ctx.time_remaining(),
            "metadata": dict(ctx.metadata),
            "transport": ctx.transport,
            "method": ctx.method,
        }

    @method
    def seen_threaded(self) -> dict[str, Any]:
        ctx = current_context()
        return {"remaining": ctx.time_remaining(), "metadata": dict(ctx.metadata)}

    @method
    async def count(self) -> int:
        self._ran()
        return self.runs

    @method
    def count_threaded(self) -> int:
        self._ran()
        return self.runs

    @method
    async def slow(self) -> str:
        """Waits for the test's gate; records whether it was cancelled or finished."""
        self.started.set()
        try:
            await asyncio.wait_for(self.gate.wait(), timeout(30))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished.set()
        return "done"

    @method
    def poll(self) -> str:
        """Threaded: polls its context until cancelled (bounded), as a blocking method should."""
        ctx = current_context()
        self.t_started.set()
        for _ in range(int(3000 * timeout(1))):
            if ctx.cancelled:
                self.t_flagged.set()
                return "stopped"
            self.release.wait(0.01)
        return "never cancelled"

    @method
    def block(self) -> str:
        """Threaded: holds the (only) worker until the test releases it."""
        self.t_started.set()
        self.release.wait(timeout(30))
        return "released"

    @method
    async def with_trailers(self, fail: bool = False) -> str:
        ctx = current_context()
        ctx.set_trailer("served-by", "node-1")
        ctx.set_trailer("cost", b"\x01\x02")
        if fail:
            raise ValueError("failed on purpose")
        return "ok"

    @method
    async def outer(self, url: str) -> Any:
        """Calls another server from inside a served call: the nested call inherits the
        deadline (its own client's timeout is 10 s)."""
        async with AsyncClient(url, timeout=10) as c:
            return await c.call("seen")


@pytest.fixture
async def work() -> AsyncIterator[tuple[Server, Work]]:
    svc = Work()
    server = Server(svc, tcp=[f"{HOST}:0"], udp=[f"{HOST}:0"])
    await server.start()
    try:
        yield server, svc
    finally:
        svc.gate.set()
        svc.release.set()
        await server.shutdown()


def url(server: Server, scheme: str) -> str:
    return f"{scheme}://{HOST}:{server.endpoint(scheme).port}"


# --------------------------------------------------------------------------- raw peers


class RawStream:
    """A client session over a plain TCP connection: frames in, the core's events out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.core = Connection(Role.CLIENT, keepalive_interval=None)
        self.events: list[Any] = []

    @classmethod
    async def open(cls, server: Server) -> RawStream:
        reader, writer = await asyncio.open_connection(HOST, server.endpoint("tcp").port)
        raw = cls(reader, writer)
        writer.write(raw.core.data_to_send())  # HELLO
        return raw

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def answer(self) -> Response | Error | Pong:
        """The next RESPONSE, ERROR or PONG."""
        async with asyncio.timeout(timeout(10)):
            while True:
                for i, ev in enumerate(self.events):
                    if type(ev) in (Response, Error, Pong):
                        del self.events[: i + 1]
                        return ev  # type: ignore[no-any-return]
                data = await self.reader.read(65536)
                assert data, "the server closed the connection"
                self.events += self.core.receive_data(data)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


class RawDatagrams:
    def __init__(self, transport: asyncio.DatagramTransport, proto: _Datagrams) -> None:
        self.transport, self.proto = transport, proto

    @classmethod
    async def open(cls, server: Server) -> RawDatagrams:
        transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(
            _Datagrams, remote_addr=(HOST, server.endpoint("udp").port)
        )
        return cls(transport, proto)

    def send(self, data: bytes) -> None:
        self.transport.sendto(data)

    async def answer(self) -> Any:
        from sockstack.protocol.frames import parse_datagram
        from sockstack.protocol.messages import decode_message

        data = await asyncio.wait_for(self.proto.queue.get(), timeout(10))
        return decode_message(parse_datagram(data, 65507))

    def close(self) -> None:
        self.transport.close()


async def raw_call(server: Server, scheme: str, frame: bytes) -> Any:
    """Send one frame on a fresh TCP session or UDP socket; its answer."""
    if scheme == "tcp":
        raw = await RawStream.open(server)
        try:
            raw.send(frame)
            return await raw.answer()
        finally:
            await raw.close()
    dg = await RawDatagrams.open(server)
    try:
        dg.send(frame)
        return await dg.answer()
    finally:
        dg.close()


# --------------------------------------------------------------------------- the server sees them


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_the_server_sees_the_deadline_and_the_metadata(
    work: tuple[Server, Work], scheme: str
) -> None:
    server, _ = work
    async with AsyncClient(url(server, scheme), metadata={"tenant": "acme", "k": "default"}) as c:
        seen = await c.request("seen", metadata={"k": "mine", "raw": b"\x00"}, timeout=5)
        assert seen["metadata"] == {"tenant": "acme", "k": "mine", "raw": b"\x00"}
        assert 0 < seen["remaining"] <= 5
        assert seen["transport"] == scheme and seen["method"] == "seen"
        # A threaded method sees the same context (copied into its worker thread).
        threaded = await c.request("seen_threaded", timeout=3)
        assert threaded["metadata"] == {"tenant": "acme", "k": "default"}
        assert 0 < threaded["remaining"] <= 3


async def test_current_context_outside_a_call_is_an_error() -> None:
    with pytest.raises(LookupError, match="no call is being served"):
        current_context()


# --------------------------------------------------------------------------- late, deadline


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_a_call_already_late_is_refused_without_running(
    work: tuple[Server, Work], scheme: str
) -> None:
    server, svc = work
    for name in ("count", "count_threaded"):
        answer = await raw_call(server, scheme, encode_request(7, name, [], budget_ms=0))
        assert type(answer) is Error and answer.request_id == 7
        assert answer.code == ErrorCode.DEADLINE_EXCEEDED == 2018
        assert answer.type == "DEADLINE_EXCEEDED"
    assert svc.runs == 0  # neither ran
    answer = await raw_call(server, scheme, encode_request(8, "count", [], budget_ms=5000))
    assert answer == Response(8, 1, 1)


async def test_a_threaded_call_that_waited_past_its_deadline_for_a_worker_does_not_run() -> None:
    svc = Work()
    async with Server(svc, tcp=[f"{HOST}:0"], limits=ServerLimits(max_workers=1)) as server:
        raw = await RawStream.open(server)
        try:
            raw.send(encode_request(1, "block", []))  # holds the only worker, no deadline
            await asyncio.wait_for(asyncio.to_thread(svc.t_started.wait, timeout(10)), timeout(11))
            raw.send(encode_request(2, "count_threaded", [], budget_ms=100))  # queued behind it
            answer = await raw.answer()
            assert type(answer) is Error and answer.request_id == 2
            assert answer.code == ErrorCode.DEADLINE_EXCEEDED
            svc.release.set()
            assert await raw.answer() == Response(1, "released", 1)
            # One worker, first in first out: had call 2 been left queued it would run before
            # call 3. Call 3 is the first count_threaded to run.
            raw.send(encode_request(3, "count_threaded", []))
            assert await raw.answer() == Response(3, 1, 1)
            assert svc.runs == 1
        finally:
            svc.release.set()
            await raw.close()


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_an_async_method_is_cancelled_at_its_deadline(
    work: tuple[Server, Work], scheme: str
) -> None:
    server, svc = work
    answer = await raw_call(server, scheme, encode_request(5, "slow", [], budget_ms=200))
    assert type(answer) is Error and answer.request_id == 5
    assert answer.code == ErrorCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(svc.cancelled.wait(), timeout(5))  # its work was stopped
    assert svc.started.is_set() and not svc.finished.is_set()


async def test_a_call_timing_out_on_the_client_stops_the_method(work: tuple[Server, Work]) -> None:
    server, svc = work
    async with AsyncClient(url(server, "tcp")) as c:
        with pytest.raises(CallTimeout):
            await c.call("slow", timeout=0.3)
        await asyncio.wait_for(svc.cancelled.wait(), timeout(5))
        assert not svc.finished.is_set()
        assert await c.call("count") == 1  # the session goes on


# --------------------------------------------------------------------------- CANCEL


async def test_cancelling_the_calling_task_stops_an_async_method(
    work: tuple[Server, Work],
) -> None:
    server, svc = work
    async with AsyncClient(url(server, "tcp"), timeout=30) as c:
        task = asyncio.create_task(c.call("slow"))
        await asyncio.wait_for(svc.started.wait(), timeout(5))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # No deadline is near (30 s): only the CANCEL can have stopped it.
        await asyncio.wait_for(svc.cancelled.wait(), timeout(5))
        assert not svc.finished.is_set()
        assert await c.call("count") == 1  # the session goes on (ERROR CANCELLED ignored)


async def test_cancelling_the_calling_task_flags_a_threaded_method(
    work: tuple[Server, Work],
) -> None:
    server, svc = work
    async with AsyncClient(url(server, "tcp"), timeout=30) as c:
        task = asyncio.create_task(c.call("poll"))
        assert await asyncio.to_thread(svc.t_started.wait, timeout(5))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(svc.t_flagged.wait, timeout(5))  # ctx.cancelled seen
        assert await c.call("count") == 1


async def test_cancel_gets_exactly_one_answer_cancelled(work: tuple[Server, Work]) -> None:
    server, svc = work
    raw = await RawStream.open(server)
    try:
        raw.send(encode_request(3, "slow", []))
        await asyncio.wait_for(svc.started.wait(), timeout(5))
        raw.send(encode_cancel(3), encode_cancel(3))  # twice: still one answer
        answer = await raw.answer()
        assert type(answer) is Error and answer.request_id == 3
        assert (answer.code, answer.type) == (ErrorCode.CANCELLED, "CANCELLED")
        await asyncio.wait_for(svc.cancelled.wait(), timeout(5))
        raw.send(encode_ping(9))
        assert await raw.answer() == Pong(9, b"")  # nothing else came for id 3
        raw.send(encode_request(4, "poll", []))  # threaded: answered at once, flag set
        assert await asyncio.to_thread(svc.t_started.wait, timeout(5))
        raw.send(encode_cancel(4))
        answer = await raw.answer()
        assert type(answer) is Error and (answer.request_id, answer.code) == (4, 2019)
        assert await asyncio.to_thread(svc.t_flagged.wait, timeout(5))
    finally:
        await raw.close()


async def test_a_cancel_for_an_id_not_in_flight_gets_no_answer(work: tuple[Server, Work]) -> None:
    server, _ = work
    raw = await RawStream.open(server)
    try:
        raw.send(encode_request(1, "count", []))
        assert await raw.answer() == Response(1, 1, 1)
        # Already answered, and never sent: both ignored (a CANCEL is not a request).
        raw.send(encode_cancel(1), encode_cancel(999), encode_ping(2))
        assert await raw.answer() == Pong(2, b"")
        raw.send(encode_request(3, "count", []))
        assert await raw.answer() == Response(3, 2, 1)
    finally:
        await raw.close()


async def test_a_cancel_datagram_is_dropped_unanswered(work: tuple[Server, Work]) -> None:
    server, _ = work
    dg = await RawDatagrams.open(server)
    try:
        dg.send(encode_cancel(5))
        dg.send(encode_ping(6))
        assert await dg.answer() == Pong(6, b"")  # the first answer is the PING's
    finally:
        dg.close()


# --------------------------------------------------------------------------- trailers, bounds


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_trailers_come_back_on_request(work: tuple[Server, Work], scheme: str) -> None:
    server, _ = work
    async with AsyncClient(url(server, scheme)) as c:
        assert await c.call("with_trailers") == "ok"  # a plain call: the result alone
        reply = await c.request("with_trailers", with_metadata=True)
        assert reply == Reply("ok", {"served-by": "node-1", "cost": b"\x01\x02"})
        plain = await c.request("count", with_metadata=True)
        assert plain == Reply(1, {})
    # An ERROR carries them too.
    frame = encode_request(4, "with_trailers", [True], budget_ms=5000)
    answer = await raw_call(server, scheme, frame)
    assert type(answer) is Error and answer.code == ErrorCode.UNEXPECTED_ERROR
    assert answer.type == "ValueError"
    assert answer.metadata == {"served-by": "node-1", "cost": b"\x01\x02"}


BAD_METADATA = [
    ({f"k{i}": "v" for i in range(65)}, "metadata entries"),
    ({"Bad Key": "v"}, "metadata key 'Bad Key'"),
    ({"k" * 65: "v"}, "keys are 1-64 bytes"),
    ({"n": 1}, "value of type int"),
]


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
@pytest.mark.parametrize(
    ("metadata", "says"), BAD_METADATA, ids=["65-keys", "bad-key", "long-key", "int"]
)
async def test_metadata_out_of_bounds_is_decode_error(
    work: tuple[Server, Work], scheme: str, metadata: dict[str, Any], says: str
) -> None:
    server, svc = work
    meta = b"count\x00" + msgpack.packb(metadata)
    frame = encode_frame(MessageType.REQUEST, 6, meta, msgpack.packb([]), FLAG_METADATA, 1)
    answer = await raw_call(server, scheme, frame)
    assert type(answer) is Error and answer.request_id == 6
    assert answer.code == ErrorCode.DECODE_ERROR
    # Over UDP a refusal is never larger than the datagram: its text may be left out.
    assert says in answer.message or (scheme == "udp" and answer.message == "")
    assert svc.runs == 0
    # The client refuses the same before sending anything.
    with pytest.raises(LocalProtocolError, match=says) as info:
        AsyncClient(url(server, scheme), metadata=metadata)
    assert info.value.code == ErrorCode.DECODE_ERROR
    async with AsyncClient(url(server, scheme)) as c:
        with pytest.raises(LocalProtocolError, match=says):
            await c.request("count", metadata=metadata)
        assert await c.call("count") == 1  # the refused call never ran


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_metadata_above_the_meta_limit_is_refused_before_sending(
    work: tuple[Server, Work], scheme: str
) -> None:
    server, svc = work
    async with AsyncClient(url(server, scheme)) as c:
        with pytest.raises(LocalProtocolError, match="meta limit of 4096") as info:
            await c.request("count", metadata={"big": "x" * 4100})
        assert info.value.code == ErrorCode.DECODE_ERROR
        assert await c.call("count") == 1
    assert svc.runs == 1


# --------------------------------------------------------------------------- old peers


async def test_a_client_without_the_flags_still_works(work: tuple[Server, Work]) -> None:
    server, _ = work
    answer = await raw_call(server, "tcp", encode_request(1, "seen", []))
    assert type(answer) is Response
    assert answer.result["remaining"] is None and answer.result["metadata"] == {}
    answer = await raw_call(server, "udp", encode_request(2, "count", []))
    assert answer == Response(2, 1, 1)

    def blocking() -> Any:  # the blocking client (it sends DEADLINE: test_blocking_deadlines...)
        with connect(url(server, "tcp")) as c:
            return c.call("count_threaded")

    assert await asyncio.to_thread(blocking) == 2


async def test_the_client_sends_no_flags_to_a_server_that_does_not_announce_them() -> None:
    svc = Work()
    server = Server(svc, tcp=[f"{HOST}:0"])
    server.features = 0  # its WELCOME carries no extension 2, as a server before issue 12
    async with server:
        raw = await RawStream.open(server)
        raw.send(encode_ping(1))
        assert await raw.answer() == Pong(1, b"")
        assert raw.core.peer_features == 0
        await raw.close()
        async with AsyncClient(url(server, "tcp"), metadata={"tenant": "acme"}, timeout=30) as c:
            seen = await c.call("seen")
            assert seen["remaining"] is None and seen["metadata"] == {}  # neither was sent
            task = asyncio.create_task(c.call("slow"))
            await asyncio.wait_for(svc.started.wait(), timeout(5))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # No CANCEL went: the method runs on until the gate opens, and finishes.
            assert await c.call("count") == 1  # (a round trip after the cancel)
            assert not svc.cancelled.is_set()
            svc.gate.set()
            await asyncio.wait_for(svc.finished.wait(), timeout(5))
            assert not svc.cancelled.is_set()


async def test_a_server_that_announces_the_features_says_so_in_welcome(
    work: tuple[Server, Work],
) -> None:
    server, _ = work
    raw = await RawStream.open(server)
    try:
        raw.send(encode_ping(1))
        await raw.answer()
        # DEADLINE, METADATA, CANCEL, STREAM, UPLOAD, BATCH
        assert raw.core.peer_features == 0b111111
    finally:
        await raw.close()


# --------------------------------------------------------------------------- nested calls


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_a_nested_call_inherits_the_deadline(work: tuple[Server, Work], scheme: str) -> None:
    server, _ = work
    async with AsyncClient(url(server, "tcp")) as c:
        inner = await c.call("outer", url(server, scheme), timeout=2)
        # The inner call's own client would have given it 10 s: it got the outer call's
        # time left instead.
        assert 0 < inner["remaining"] <= 2
        no_deadline = await c.call("outer", url(server, scheme))  # default 10 s timeout
        assert 2 < no_deadline["remaining"] <= 10


def test_a_budget_is_a_u32_of_milliseconds_at_the_end_of_meta() -> None:
    """PROTOCOL.md §4: with DEADLINE the budget is the meta section's last 4 bytes."""
    frame = encode_request(1, "m", [], budget_ms=1500, metadata={"k": "v"})
    meta_len = struct.unpack_from(">H", frame, 6)[0]
    assert frame[4] == 0x0C  # DEADLINE | METADATA
    assert frame[16 : 16 + meta_len] == b"m\x00" + msgpack.packb({"k": "v"}) + struct.pack(
        ">I", 1500
    )
    assert Request(1, "m").budget_ms is None and Request(1, "m").metadata is None


async def test_trailers_go_only_to_a_client_that_sent_deadline_or_metadata(
    work: tuple[Server, Work],
) -> None:
    """PROTOCOL.md §4: a client sending neither flag (every client before them) never gets a
    RESPONSE or ERROR with METADATA, which it could misread."""
    server, _ = work
    for scheme in ("tcp", "udp"):
        ok = await raw_call(server, scheme, encode_request(1, "with_trailers", []))
        assert ok == Response(1, "ok", 1)  # metadata None: no flag
        failed = await raw_call(server, scheme, encode_request(2, "with_trailers", [True]))
        assert type(failed) is Error and failed.type == "ValueError" and failed.metadata is None


async def test_a_server_answering_deadline_exceeded_is_a_call_timeout_in_both_clients() -> None:
    """The server's DEADLINE_EXCEEDED and the client's own timer end a call within a
    millisecond of each other; whichever comes first, both clients raise CallTimeout (one
    error for one cause). Deterministic here: a server built from the sans-I/O core answers
    every REQUEST (a plain call, a stream) with DEADLINE_EXCEEDED at once, long before the
    clients' 20 s timers."""
    requests: list[Request] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        core = Connection(Role.SERVER)
        try:
            while data := await reader.read(65536):
                for ev in core.receive_data(data):
                    if type(ev) is Request:
                        requests.append(ev)
                        core.send_error(
                            ev.request_id,
                            ErrorCode.DEADLINE_EXCEEDED,
                            "DEADLINE_EXCEEDED",
                            "no time left",
                        )
                writer.write(core.data_to_send())
                await writer.drain()
        finally:
            writer.close()

    fake = await asyncio.start_server(serve, HOST, 0)
    port = fake.sockets[0].getsockname()[1]
    url = f"tcp://{HOST}:{port}"
    try:
        async with AsyncClient(url, timeout=timeout(20)) as c:
            with pytest.raises(CallTimeout, match="stopped it at its deadline"):
                await c.call("anything")
            with pytest.raises(CallTimeout, match="stopped it at its deadline"):
                [i async for i in c.stream("items")]

        def blocking() -> None:
            with connect(url, timeout=timeout(20)) as b:
                with pytest.raises(CallTimeout, match="stopped it at its deadline"):
                    b.call("anything")
                with pytest.raises(CallTimeout, match="stopped it at its deadline"):
                    list(b.stream("items"))

        await asyncio.to_thread(blocking)
    finally:
        fake.close()
        await fake.wait_closed()
    assert [r.method for r in requests] == ["anything", "items"] * 2
    assert all(r.budget_ms is not None and r.budget_ms > 1000 for r in requests)
