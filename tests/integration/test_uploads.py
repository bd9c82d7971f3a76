"""Uploads (client-side streaming), live over loopback: issue 12 item 6, PROTOCOL.md §4.4.

A method takes an item stream through a parameter annotated ``Iterator[T]`` (``def``) or
``AsyncIterator[T]`` (``async def``); ``client.upload(method, items, *args)`` sends a REQUEST
with the UPLOAD flag, the items as ITEMs under the flow-control window (the server grants bytes
back with CREDIT as the method takes them), then an ITEM with flag END; the call ends with its
one RESPONSE or ERROR. Each test runs a real server on 127.0.0.1 and the asyncio client (raw
frames where the client would never send them: a broken window, an undecodable ITEM). The
blocking client's twins are in test_blocking_uploads.py.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import pytest
import trustme

from sockstack import (
    AsyncClient,
    CallContext,
    CallTimeout,
    ClientInterceptor,
    ErrorCode,
    LocalProtocolError,
    Refused,
    RemoteError,
    Server,
    ServerInterceptor,
    Service,
    ServiceError,
    current_context,
    method,
)
from sockstack.interceptors import ClientCall
from sockstack.protocol.calls import Reply
from sockstack.protocol.events import Credit, Error, Pong, Response
from sockstack.protocol.frames import MessageType, encode_frame
from sockstack.protocol.messages import (
    FEATURE_UPLOAD,
    FEATURES,
    STREAM_WINDOW,
    encode_cancel,
    encode_error,
    encode_item,
    encode_item_end,
    encode_ping,
    encode_request,
)
from sockstack.transport.tls import client_context, server_context
from tests.conftest import timeout
from tests.integration.test_deadlines_metadata import RawDatagrams, RawStream, raw_call

HOST = "127.0.0.1"
ITEM = b"x" * 98  # msgpack bin 8: a 100-byte ITEM body
WINDOW_ITEMS = STREAM_WINDOW // len(b"\xc4\x62" + ITEM)  # 100-byte items in one window


class Uploads(Service):
    """Methods that take item streams and say what they took and when they stopped."""

    def __init__(self) -> None:
        self.took: list[Any] = []
        self.first = threading.Event()  # a method took its first item
        self.release = threading.Event()  # a slow method may go on
        self.stopped = threading.Event()  # a method's finally ran
        self.stopped_by: BaseException | None = None

    @method
    def total(self, scale: int, items: Iterator[int]) -> int:
        """Sum of the items, times scale."""
        return scale * sum(items)

    @method
    async def atotal(self, scale: int, items: AsyncIterator[int]) -> int:
        total = 0
        async for item in items:
            total += item
        return scale * total

    @method
    def collect(self, items: Iterator[Any], *, tag: str = "") -> list[Any]:
        got = list(items)
        self.took = got
        return [tag, len(got), current_context().transport]

    @method
    def slow(self, items: Iterator[bytes]) -> int:
        """Takes one item, waits for ``release``, then takes the rest."""
        try:
            n = len(next(items))
            self.first.set()
            self.release.wait(timeout(30))
            for item in items:
                n += len(item)
            return n
        except BaseException as exc:
            self.stopped_by = exc
            raise
        finally:
            self.stopped.set()

    @method
    async def aslow(self, items: AsyncIterator[bytes]) -> int:
        try:
            n = 0
            async for item in items:
                n += len(item)
                self.first.set()
            return n
        except BaseException as exc:
            self.stopped_by = exc
            raise
        finally:
            self.stopped.set()

    @method
    async def aslow_gate(self, items: AsyncIterator[bytes]) -> int:
        """Takes one item, waits for ``release`` (off the loop), then the rest."""
        n = len(await anext(items))
        await asyncio.to_thread(self.release.wait, timeout(30))
        async for item in items:
            n += len(item)
        return n

    @method
    def count_bytes(self, plus: int, items: Iterator[bytes]) -> int:
        return sum(map(len, items)) + plus

    @method
    def latest(self, items: Iterator[date]) -> list[Any]:
        """Each item converted to a date (JSON carries ISO text)."""
        got = list(items)
        return [max(got).isoformat(), all(type(d) is date for d in got)]

    @method
    def first_of(self, items: Iterator[Any]) -> Any:
        return next(items)

    @method
    def fails(self, items: Iterator[int]) -> int:
        next(items)
        next(items)
        raise ServiceError("two items were enough")

    @method
    def swallows(self, items: Iterator[int]) -> str:
        try:
            for _ in items:
                pass
        except Exception:
            pass  # a refused item, swallowed: the call is refused all the same
        return "fine"

    @method
    def plain(self, x: int) -> int:
        return x + 1


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, Uploads]]:
    svc = Uploads()
    server = Server(svc, tcp=[f"{HOST}:0"], udp=[f"{HOST}:0"])
    await server.start()
    try:
        yield server, svc
    finally:
        svc.release.set()
        await server.shutdown()


def tcp(server: Server) -> str:
    return f"tcp://{HOST}:{server.endpoint('tcp').port}"


async def waited(event: threading.Event) -> bool:
    """Wait (up to a generous bound) for a server-side event."""
    return await asyncio.to_thread(event.wait, timeout(10))


class Counted:
    """An iterable of ``n`` ITEMs that counts how many were taken from it."""

    def __init__(self, n: int, item: Any = ITEM) -> None:
        self.n, self.item, self.taken, self.closed = n, item, 0, False

    def __iter__(self) -> Iterator[Any]:
        try:
            for _ in range(self.n):
                self.taken += 1
                yield self.item
        finally:
            self.closed = True


def held_upload(server: Server) -> Any:
    """The server's queue of the one upload in flight (its _ItemIn)."""
    (conn,) = server._streams
    (inbox,) = conn._item_ins.values()
    return inbox


# --------------------------------------------------------------------------- items and result


@pytest.mark.parametrize("name", ["total", "atotal"])
async def test_items_arrive_in_order_and_the_result_comes_back(
    served: tuple[Server, Uploads], name: str
) -> None:
    server, _ = served
    async with AsyncClient(tcp(server)) as client:
        assert await client.upload(name, range(100_000), 3) == 3 * sum(range(100_000))
        assert await client.upload(name, [], 3) == 0  # no item: the END alone

        async def agen() -> AsyncIterator[int]:
            for i in range(1000):
                yield i

        assert await client.upload(name, agen(), scale=2) == 2 * sum(range(1000))


async def test_items_of_every_type_in_order_with_keyword_arguments(
    served: tuple[Server, Uploads],
) -> None:
    server, svc = served
    items = [1, "two", b"three", [4], {"five": 5}, None, 2**40] * 2000  # several windows' worth
    async with AsyncClient(tcp(server)) as client:
        assert await client.upload("collect", items, tag="t") == ["t", len(items), "tcp"]
    assert svc.took == items


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_items_are_converted_to_the_declared_type(
    served: tuple[Server, Uploads], codec: str
) -> None:
    server, _ = served
    days = [date(2026, 11, d) for d in (3, 30, 12)]
    async with AsyncClient(tcp(server), codec=codec) as client:
        assert await client.upload("latest", days) == ["2026-11-30", True]
        assert await client.upload("latest", ["2026-11-30", "2026-01-01"]) == ["2026-11-30", True]
        with pytest.raises(RemoteError) as err:
            await client.upload("latest", [days[0], "not a date"])
        assert err.value.code == ErrorCode.BAD_ARGUMENTS
        assert "parameter 'items', item 1: expects date" in str(err.value)


async def test_a_slow_consumer_holds_the_client_at_the_window(
    served: tuple[Server, Uploads],
) -> None:
    """20 windows of items to a method that takes one and waits: the client sends about one
    window (never more than the window plus one item unacknowledged) and pulls no further from
    its iterator; once the method goes on, every item arrives."""
    server, svc = served
    items = Counted(20 * WINDOW_ITEMS)
    async with AsyncClient(tcp(server)) as client:
        task = asyncio.create_task(client.upload("slow", items))
        assert await waited(svc.first)
        channel = client.channel
        assert channel is not None
        (up,) = channel.uploads.values()  # type: ignore[union-attr]
        for _ in range(4000):  # round trips until the client has sent its window
            if not up.count.may_send():
                break
            await client.ping()
        for _ in range(20):  # room for a client that would go on
            await client.ping()
        assert not up.count.may_send()
        assert STREAM_WINDOW <= up.count.most <= STREAM_WINDOW + 100
        assert held_upload(server).unacked <= STREAM_WINDOW + 100
        assert items.taken <= WINDOW_ITEMS + 2  # not 20 windows
        svc.release.set()
        assert await asyncio.wait_for(task, timeout(30)) == 20 * WINDOW_ITEMS * len(ITEM)
        assert up.count.most <= STREAM_WINDOW + 100  # held at the window all along
    assert items.taken == 20 * WINDOW_ITEMS


async def test_uploads_to_slow_consumers_hold_memory_at_their_windows(
    served: tuple[Server, Uploads],
) -> None:
    """Memory measured, not counted: 8 uploads of 20 windows each to consumers that took one
    item. Server and client share this process, and tracemalloc sees both: what they hold stays
    near 8 windows (the server's queues; the client holds what it sent in the kernel), far from
    the 160 windows the iterators would give unchecked."""
    import tracemalloc

    server, svc = served
    n = 8
    its = [Counted(20 * WINDOW_ITEMS, bytes(98)) for _ in range(n)]
    async with AsyncClient(tcp(server), timeout=timeout(60)) as client:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tasks = [asyncio.create_task(client.upload("aslow_gate", it)) for it in its]
            (conn,) = server._streams
            for _ in range(4000):  # round trips until every upload is at its window
                inboxes = list(conn._item_ins.values())
                if len(inboxes) == n and all(i.unacked >= STREAM_WINDOW for i in inboxes):
                    break
                await client.ping()
            for _ in range(20):
                await client.ping()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert all(i.unacked <= STREAM_WINDOW + 100 for i in conn._item_ins.values())
        assert all(it.taken <= WINDOW_ITEMS + 2 for it in its)
        svc.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout(60))
    assert results == [20 * WINDOW_ITEMS * 98] * n
    windows = n * STREAM_WINDOW
    # Each queued 100-byte item costs its bytes object and its slot in Python: < 3x its size.
    assert held < 3 * windows, (held, windows)


# --------------------------------------------------------------------------- the call's end


async def test_an_early_answer_stops_the_client_sending(served: tuple[Server, Uploads]) -> None:
    server, _ = served
    items = Counted(20 * WINDOW_ITEMS)
    async with AsyncClient(tcp(server)) as client:
        assert await client.upload("first_of", items) == ITEM
        assert items.taken <= WINDOW_ITEMS + 2
        assert items.closed  # the generator left unfinished was closed
        assert await client.call("plain", 1) == 2  # the connection goes on


async def test_an_early_answer_does_not_wait_for_a_waiting_iterator(
    served: tuple[Server, Uploads],
) -> None:
    """The method answers after one item while the caller's async iterator waits for its next:
    upload() returns the answer at once (not at its timeout) and closes the iterator."""
    server, _ = served
    never = asyncio.Event()
    closed = asyncio.Event()

    async def waits() -> AsyncIterator[bytes]:
        try:
            yield ITEM
            await never.wait()
            yield ITEM
        finally:
            closed.set()

    async with AsyncClient(tcp(server), timeout=timeout(30)) as client:
        async with asyncio.timeout(timeout(5)):
            assert await client.upload("first_of", waits()) == ITEM
        assert closed.is_set()
        assert await client.call("plain", 1) == 2


async def test_the_methods_error_ends_the_call(served: tuple[Server, Uploads]) -> None:
    server, _ = served
    per_window = STREAM_WINDOW // 9  # 2**40 is 9 bytes of msgpack
    items = Counted(20 * per_window, 2**40)
    async with AsyncClient(tcp(server)) as client:
        with pytest.raises(RemoteError) as err:
            await client.upload("fails", items)
        assert err.value.code == ErrorCode.APPLICATION_ERROR
        assert "two items were enough" in str(err.value)
        assert items.taken <= per_window + 2  # at most one window sent, then it stopped


@pytest.mark.parametrize("name", ["total", "atotal"])
async def test_a_bad_item_is_bad_arguments_naming_the_parameter_and_index(
    served: tuple[Server, Uploads], name: str
) -> None:
    server, _ = served
    async with AsyncClient(tcp(server)) as client:
        with pytest.raises(RemoteError) as err:
            await client.upload(name, [1, 2, "three", 4], 1)
        assert err.value.code == ErrorCode.BAD_ARGUMENTS
        assert "parameter 'items', item 2: expects int, got str 'three'" in str(err.value)
        with pytest.raises(RemoteError) as err:
            await client.upload(name, [1], "x")  # the other arguments are checked as ever
        assert err.value.code == ErrorCode.BAD_ARGUMENTS
        with pytest.raises(RemoteError) as err:
            await client.upload("swallows", [1, "x", 3])  # refused even when swallowed
        assert err.value.code == ErrorCode.BAD_ARGUMENTS


async def test_the_deadline_bounds_the_whole_call(served: tuple[Server, Uploads]) -> None:
    """The client's items stop coming (its iterator waits): at the deadline the caller gets
    CallTimeout and the server stops the method waiting for its next item."""
    server, svc = served
    never = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield ITEM
        await never.wait()
        yield ITEM

    async with AsyncClient(tcp(server)) as client:
        with pytest.raises(CallTimeout):
            await client.upload("aslow", stalls(), timeout=timeout(0.5))
        assert await waited(svc.stopped)
        assert await client.call("plain", 1) == 2


async def test_cancelling_the_caller_stops_the_method(served: tuple[Server, Uploads]) -> None:
    server, svc = served
    never = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield ITEM
        await never.wait()
        yield ITEM

    async with AsyncClient(tcp(server)) as client:
        task = asyncio.create_task(client.upload("slow", stalls(), timeout=timeout(60)))
        assert await waited(svc.first)
        svc.release.set()  # the method waits for its next item now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await waited(svc.stopped)  # CANCEL reached it: its next() raised
        assert svc.stopped_by is not None
        assert await client.call("plain", 1) == 2


async def test_a_lost_connection_stops_the_method(served: tuple[Server, Uploads]) -> None:
    server, svc = served
    raw = await RawStream.open(server)
    raw.send(encode_request(1, "aslow", [], upload=True), encode_item(1, ITEM))
    assert await waited(svc.first)
    await raw.close()
    assert await waited(svc.stopped)


# --------------------------------------------------------------------------- refusals


async def test_udp_refuses_uploads(served: tuple[Server, Uploads]) -> None:
    server, _ = served
    async with AsyncClient(f"udp://{HOST}:{server.endpoint('udp').port}") as client:
        with pytest.raises(LocalProtocolError) as err:
            await client.upload("total", [1], 1)
        assert err.value.code == ErrorCode.STREAM_MISMATCH
    answer = await raw_call(server, "udp", encode_request(5, "total", [1], upload=True))
    assert type(answer) is Error and answer.code == ErrorCode.STREAM_MISMATCH
    dg = await RawDatagrams.open(server)
    try:
        dg.send(encode_item(5, 1))  # an ITEM datagram: dropped unanswered, as a CREDIT is
        dg.send(encode_item_end(5))
        dg.send(encode_ping(6))
        answer = await dg.answer()
        assert type(answer) is Pong and answer.request_id == 6
    finally:
        dg.close()


async def test_mismatches_are_refused_before_the_method_runs(
    served: tuple[Server, Uploads],
) -> None:
    server, _ = served
    async with AsyncClient(tcp(server)) as client:
        with pytest.raises(RemoteError) as err:
            await client.upload("plain", [1], 1)  # takes no item stream
        assert err.value.code == ErrorCode.STREAM_MISMATCH
        with pytest.raises(RemoteError) as err:
            await client.call("total", 1)  # takes one: call it with upload()
        assert err.value.code == ErrorCode.STREAM_MISMATCH
        assert "upload()" in str(err.value)
        with pytest.raises(RemoteError) as err:
            await client.upload("nothing-here", [1])
        assert err.value.code == ErrorCode.UNKNOWN_METHOD
    # UPLOAD and STREAM on one REQUEST: not supported (PROTOCOL.md §4.4)
    answer = await raw_call(
        server, "tcp", encode_request(6, "total", [1], upload=True, stream=True)
    )
    assert type(answer) is Error and answer.code == ErrorCode.STREAM_MISMATCH


async def test_a_server_without_the_feature_is_refused_locally() -> None:
    svc = Uploads()
    server = Server(svc, tcp=[f"{HOST}:0"])
    server.features = FEATURES & ~FEATURE_UPLOAD  # a server before uploads
    async with server:
        async with AsyncClient(tcp(server)) as client:
            with pytest.raises(LocalProtocolError) as err:
                await client.upload("total", [1], 1)
            assert err.value.code == ErrorCode.STREAM_MISMATCH
            assert await client.call("plain", 1) == 2


async def test_an_unencodable_item_fails_locally_and_cancels(
    served: tuple[Server, Uploads],
) -> None:
    server, svc = served

    async def items() -> AsyncIterator[Any]:
        yield ITEM
        assert await waited(svc.first)  # the method runs, waiting for its next item
        yield object()

    async with AsyncClient(tcp(server)) as client:
        with pytest.raises(Exception, match=r"serialize|encode"):
            await client.upload("aslow", items())
        assert await waited(svc.stopped)  # CANCEL sent: the method stopped
        assert await client.call("plain", 1) == 2


# --------------------------------------------------------------------------- raw frames


async def test_a_client_breaking_the_window_gets_an_error_and_the_server_stays_healthy(
    served: tuple[Server, Uploads],
) -> None:
    """Two windows sent at once to a method that took one item: ERROR WINDOW_EXCEEDED, the
    items dropped (the queue held at most the window plus one item); later ITEMs of that id are
    dropped, and the connection serves calls as before."""
    server, _ = served
    raw = await RawStream.open(server)
    try:
        items = [encode_item(1, ITEM) for _ in range(2 * WINDOW_ITEMS + 10)]
        raw.send(encode_request(1, "aslow_gate", [], upload=True), *items)
        answer = await raw.answer()
        assert type(answer) is Error and answer.code == ErrorCode.WINDOW_EXCEEDED
        assert answer.request_id == 1
        (conn,) = server._streams
        assert not conn._item_ins  # its items dropped
        raw.send(encode_item(1, ITEM), encode_item_end(1), encode_request(2, "plain", [1]))
        answer = await raw.answer()
        assert type(answer) is Response and (answer.request_id, answer.result) == (2, 2)
    finally:
        await raw.close()


async def test_stray_items_are_dropped_and_a_bad_item_ends_its_upload(
    served: tuple[Server, Uploads],
) -> None:
    server, svc = served
    raw = await RawStream.open(server)
    try:
        # An ITEM and an END of no upload in flight: dropped, never answered.
        raw.send(encode_item(7, 1), encode_item_end(7), encode_ping(8))
        answer = await raw.answer()
        assert type(answer) is Pong and answer.request_id == 8
        # An ITEM that does not decode ends its upload with DECODE_ERROR.
        bad = encode_frame(MessageType.ITEM, 9, b"", b"\xc1", 0, 1)
        raw.send(encode_request(9, "aslow", [], upload=True), encode_item(9, ITEM))
        assert await waited(svc.first)  # it runs, waiting for its next item
        raw.send(bad)
        answer = await raw.answer()
        assert type(answer) is Error and answer.code == ErrorCode.DECODE_ERROR
        assert answer.request_id == 9
        assert await waited(svc.stopped)
        # One in a codec the server does not know ends it with UNSUPPORTED_CODEC.
        svc.first.clear()
        raw.send(encode_request(12, "aslow", [], upload=True), encode_item(12, ITEM))
        assert await waited(svc.first)
        raw.send(encode_frame(MessageType.ITEM, 12, b"", b"x", 0, 9))
        answer = await raw.answer()
        assert type(answer) is Error and answer.code == ErrorCode.UNSUPPORTED_CODEC
        assert (answer.request_id, answer.type) == (12, "UNSUPPORTED_CODEC")
        raw.send(encode_request(10, "total", [2], upload=True))
        raw.send(encode_item(10, 5), encode_item(10, 6), encode_item_end(10))
        answer = await raw.answer()
        assert type(answer) is Response and answer.result == 22
        # The server grants bytes back (CREDIT, server -> client) as the method takes them.
        many = [encode_item(11, ITEM) for _ in range(WINDOW_ITEMS)]
        raw.send(encode_request(11, "slow", [], upload=True), *many, encode_item_end(11))
        svc.release.set()
        seen: list[Any] = []
        async with asyncio.timeout(timeout(10)):
            while not any(type(e) is Response for e in seen):
                data = await raw.reader.read(65536)
                assert data, "the server closed the connection"
                seen += raw.core.receive_data(data)
        (answer,) = [e for e in seen if type(e) is Response]
        assert answer.result == WINDOW_ITEMS * len(ITEM)
        credits = [e for e in seen if type(e) is Credit]
        assert credits and all(c.request_id == 11 for c in credits)
        assert STREAM_WINDOW // 2 <= sum(c.granted for c in credits) <= STREAM_WINDOW
    finally:
        await raw.close()


async def test_a_clients_error_frame_is_not_a_bad_item(served: tuple[Server, Uploads]) -> None:
    """An ERROR frame from the client with its upload's id (whatever its code, 0 included) is not
    the core's report of an undecodable ITEM: the upload goes on and gets its one answer."""
    server, _ = served
    raw = await RawStream.open(server)
    try:
        for rid, code in ((20, ErrorCode.WINDOW_EXCEEDED), (21, 0), (22, 4321)):
            raw.send(encode_request(rid, "total", [2], upload=True), encode_item(rid, 5))
            raw.send(encode_error(rid, code, "X", "a client's ERROR"), encode_ping(99))
            answer = await raw.answer()
            assert type(answer) is Pong, answer  # nothing answered for the ERROR
            raw.send(encode_item(rid, 6), encode_item_end(rid))
            answer = await raw.answer()
            assert type(answer) is Response and (answer.request_id, answer.result) == (rid, 22)
    finally:
        await raw.close()


@pytest.mark.parametrize("name", ["slow", "aslow"])
async def test_the_servers_own_deadline_stops_an_upload_waiting_for_items(
    served: tuple[Server, Uploads], name: str
) -> None:
    """No CANCEL here (raw frames): the deadline the REQUEST carried alone stops the method,
    waiting in a worker thread (def) or on the loop (async def), with DEADLINE_EXCEEDED."""
    server, svc = served
    raw = await RawStream.open(server)
    try:
        raw.send(encode_request(40, name, [], upload=True, budget_ms=300))  # and no item
        answer = await raw.answer()
        assert type(answer) is Error and answer.request_id == 40
        assert answer.code == ErrorCode.DEADLINE_EXCEEDED
        assert await waited(svc.stopped)  # its finally ran: it stopped, it was not left waiting
    finally:
        await raw.close()


async def test_an_end_is_read_for_its_flag_alone(served: tuple[Server, Uploads]) -> None:
    """PROTOCOL.md §4.4: neither an END's body nor its codec byte is read (an unknown codec
    byte there is no UNSUPPORTED_CODEC)."""
    server, _ = served
    raw = await RawStream.open(server)
    try:
        end = bytearray(encode_item_end(30))
        end[5] = 0x7F  # a codec byte no one defines
        raw.send(encode_request(30, "total", [2], upload=True), encode_item(30, 5), bytes(end))
        answer = await raw.answer()
        assert type(answer) is Response and (answer.request_id, answer.result) == (30, 10)
    finally:
        await raw.close()


async def test_an_upload_cancelled_before_it_ran_does_not_run(
    served: tuple[Server, Uploads],
) -> None:
    server, svc = served
    raw = await RawStream.open(server)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no coroutine left unawaited
            raw.send(
                encode_request(3, "aslow", [], upload=True),
                encode_item(3, ITEM),
                encode_cancel(3),
                encode_ping(4),
            )
            answers = {type(a): a for a in [await raw.answer(), await raw.answer()]}
            assert answers[Error].code == ErrorCode.CANCELLED  # (the PONG may come first)
            assert answers[Pong].request_id == 4
            gc.collect()
        assert not svc.first.is_set()  # it never ran
        (conn,) = server._streams
        assert conn._item_ins == {}
    finally:
        await raw.close()


# --------------------------------------------------------------------------- interceptors, TLS


class ServerSeen(ServerInterceptor):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, Any]] = []

    def before(self, ctx: CallContext) -> None:
        self.log.append(("before", ctx.method, ctx.upload is not None))

    def after(self, ctx: CallContext, result: Any) -> None:
        self.log.append(("after", ctx.method, result))


class ClientSeen(ClientInterceptor):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, Any]] = []

    def before(self, call: ClientCall) -> None:
        self.log.append(("before", call.method, call.upload))
        call.metadata["tenant"] = "t1"

    def after(self, call: ClientCall, reply: Reply) -> None:
        self.log.append(("after", call.method, reply.result))


class Tenant(Uploads):
    @method
    def tenant_total(self, items: Iterator[int]) -> str:
        return f"{current_context().metadata.get('tenant')}:{sum(items)}"


async def test_interceptors_see_an_upload_once() -> None:
    seen, mine = ServerSeen(), ClientSeen()
    async with Server(Tenant(), tcp=[f"{HOST}:0"], interceptors=[seen]) as server:
        async with AsyncClient(tcp(server), interceptors=[mine]) as client:
            assert await client.upload("tenant_total", range(50_000)) == f"t1:{sum(range(50_000))}"
    result = f"t1:{sum(range(50_000))}"
    assert seen.log == [("before", "tenant_total", True), ("after", "tenant_total", result)]
    assert mine.log == [("before", "tenant_total", True), ("after", "tenant_total", result)]


class SinkAPI(Protocol):
    """What a caller of Uploads sees (the asyncio client's typed proxy: async methods)."""

    async def total(self, scale: int, items: Iterator[int]) -> int: ...

    async def latest(self, items: AsyncIterator[date]) -> list[Any]: ...


async def test_a_typed_proxy_uploads_the_item_stream_argument(
    served: tuple[Server, Uploads],
) -> None:
    server, _ = served
    async with AsyncClient(tcp(server)) as client:
        api = client.proxy(SinkAPI)
        assert await api.total(2, range(10)) == 90  # by position
        assert await api.total(items=[1, 2], scale=3) == 9  # by name

        async def days() -> AsyncIterator[date]:
            yield date(2026, 1, 2)

        assert await api.latest(days()) == ["2026-01-02", True]
        with pytest.raises(TypeError, match="needs its item stream 'items'"):
            await api.total(2)  # type: ignore[call-arg]


class NoUploads(ServerInterceptor):
    def before(self, ctx: CallContext) -> None:
        if ctx.upload is not None:
            raise Refused("no uploads here")


async def test_an_upload_an_interceptor_refuses_leaves_nothing_queued() -> None:
    async with Server(Uploads(), tcp=[f"{HOST}:0"], interceptors=[NoUploads()]) as server:
        async with AsyncClient(tcp(server)) as client:
            items = Counted(20 * WINDOW_ITEMS)
            with pytest.raises(RemoteError) as err:
                await client.upload("total", items, 1)
            assert err.value.code == ErrorCode.REFUSED
            assert items.taken <= WINDOW_ITEMS + 2
            await client.ping()  # whatever it sent before the answer has arrived
            (conn,) = server._streams
            assert conn._item_ins == {}  # its queue closed with the call: items dropped
            assert await client.call("plain", 1) == 2


async def test_an_upload_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    svc = Uploads()
    async with Server(svc, tls=[f"{HOST}:0"], tls_context=server_context(cert)) as server:
        url = str(server.endpoint("tls"))
        async with AsyncClient(url, tls=client_context(ca_file)) as client:
            items = [ITEM] * (4 * WINDOW_ITEMS)  # several windows, across many records
            assert await client.upload("collect", items) == ["", len(items), "tls"]
            assert svc.took == items
            assert await client.upload("first_of", Counted(20 * WINDOW_ITEMS)) == ITEM


# --------------------------------------------------------------------------- bounds (review)


async def _gated(gate: asyncio.Event) -> AsyncIterator[int]:
    """Items 1, then (once the gate opens) 2: an upload held open by its client."""
    yield 1
    await gate.wait()
    yield 2


async def _until(check: Any, client: AsyncClient) -> None:
    for _ in range(2000):  # round trips until the server has what the test waits for
        if check():
            return
        await client.ping()
    raise AssertionError("the server never got there")


async def test_uploads_per_connection_are_bounded_and_do_not_pause_reading() -> None:
    """``max_uploads`` bounds a connection's uploads (each may queue a window): one more is
    OVERLOADED and does not run. Uploads are not counted in ``max_in_flight``: with more
    uploads waiting for items than that, the connection is still read (their items, other
    calls), where pausing it would leave them waiting for ever."""
    from sockstack import ServerLimits

    svc = Uploads()
    server = Server(svc, tcp=[f"{HOST}:0"], limits=ServerLimits(max_uploads=3, max_in_flight=2))
    await server.start()
    try:
        async with AsyncClient(tcp(server), timeout=timeout(20)) as c:
            gate = asyncio.Event()
            held = [asyncio.ensure_future(c.upload("atotal", _gated(gate), 1)) for _ in range(3)]
            (conn,) = server._streams
            await _until(lambda: len(conn._item_ins) == 3, c)
            with pytest.raises(RemoteError) as info:
                await c.upload("atotal", [5], 1)
            assert info.value.code == ErrorCode.OVERLOADED
            assert "3 uploads in flight on this connection" in info.value.message
            assert await c.call("plain", 1) == 2  # read, though 3 uploads > max_in_flight 2
            gate.set()
            assert await asyncio.gather(*held) == [3, 3, 3]
            assert await c.upload("atotal", [5], 1) == 5  # room again
    finally:
        await server.shutdown()


async def test_uploads_to_def_methods_hold_at_most_half_the_workers() -> None:
    """A def method waits for items in a worker thread: such uploads are capped at half of
    ``max_workers`` (server-wide), so a client sending nothing cannot take every worker; the
    other calls still get theirs, and async uploads are not capped by it."""
    from sockstack import ServerLimits

    svc = Uploads()
    server = Server(svc, tcp=[f"{HOST}:0"], limits=ServerLimits(max_workers=4))
    await server.start()
    try:
        async with AsyncClient(tcp(server), timeout=timeout(20)) as c:
            gate = asyncio.Event()
            held = [asyncio.ensure_future(c.upload("total", _gated(gate), 1)) for _ in range(2)]
            await _until(lambda: server._worker_uploads == 2, c)
            with pytest.raises(RemoteError) as info:
                await c.upload("total", [5], 1)
            assert info.value.code == ErrorCode.OVERLOADED
            assert "half of max_workers 4" in info.value.message
            assert await c.call("plain", 1) == 2  # a def method: a worker was free
            assert await c.upload("atotal", [5], 1) == 5  # async: no worker held
            gate.set()
            assert await asyncio.gather(*held) == [3, 3]
            await _until(lambda: server._worker_uploads == 0, c)
            assert await c.upload("total", [5], 1) == 5
    finally:
        await server.shutdown()


async def test_uploads_are_bounded_over_all_connections() -> None:
    """``max_total_uploads`` bounds the uploads of every connection together (each may queue
    its window): one more, from any client, is OVERLOADED and does not run."""
    from sockstack import ServerLimits

    svc = Uploads()
    server = Server(svc, tcp=[f"{HOST}:0"], limits=ServerLimits(max_total_uploads=2))
    await server.start()
    try:
        async with (
            AsyncClient(tcp(server), timeout=timeout(20)) as a,
            AsyncClient(tcp(server), timeout=timeout(20)) as b,
        ):
            gate = asyncio.Event()
            held = [asyncio.ensure_future(c.upload("atotal", _gated(gate), 1)) for c in (a, b)]
            await _until(lambda: server._uploads == 2, a)
            for c in (a, b):
                with pytest.raises(RemoteError) as info:
                    await c.upload("atotal", [5], 1)
                assert info.value.code == ErrorCode.OVERLOADED
                assert "2 uploads in flight on this server" in info.value.message
            gate.set()
            assert await asyncio.gather(*held) == [3, 3]
            await _until(lambda: server._uploads == 0, a)
            assert await b.upload("atotal", [5], 1) == 5
    finally:
        await server.shutdown()
