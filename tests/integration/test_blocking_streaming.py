"""Streaming results with the blocking client, live over loopback (issue 12 item 6;
PROTOCOL.md §4.3): ``for item in client.stream("count", 10)``.

The same rules as the asyncio client's (tests/integration/test_streaming.py): items in order,
then the generator's return value; flow control (a reader that does not read holds the
server's generator at the window); leaving the loop early, ``close()``, the ``with`` block's
end, the stream's deadline or an interrupt send CANCEL and the generator's ``finally`` runs on
the server; errors after the items before them; UDP refused before anything is sent. And what
only a client shared by threads has: other threads' calls, and other streams, go on beside a
stream, each item reaching its own reader.

The server runs on its own event loop in a background thread (the test's thread is a blocking
client's); every wait is on an event with a timeout, every thread is joined with a timeout.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from sockstack import (
    AsyncClient,
    CallTimeout,
    ClientCall,
    ClientInterceptor,
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    Reply,
    connect,
    current_context,
    method,
)
from sockstack.protocol.calls import ItemStream
from sockstack.protocol.messages import STREAM_WINDOW
from tests.conftest import timeout
from tests.helpers.threaded import Served as ThreadServed
from tests.helpers.threaded import in_thread, options, result, server_cert, serving_in_thread
from tests.integration.test_streaming import ITEM, Streams

SCHEMES = ["tcp", "tls"]


class Blocking(Streams):
    """The asyncio tests' generators, and some for threads."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_metadata: dict[str, Any] = {}
        self.gate = threading.Event()
        self.started = threading.Event()
        self.finished = 0

    @method
    def tagged(self, n: int) -> Iterator[str]:
        self.seen_metadata = dict(current_context().metadata)
        current_context().set_trailer("done", "yes")
        for i in range(n):
            yield f"{i}"

    @method
    def counted(self) -> Iterator[int]:
        """Yields for ever; counts its ``finally`` runs (``finished``)."""
        try:
            yield from range(1 << 40)
        finally:
            with self.lock:
                self.finished += 1
            self.closed.set()

    @method
    def undecodable(self, n: int) -> Iterator[Any]:
        """0, then an array too long for any client to decode (MAX_CONTAINER elements + 1),
        then 2, 3... up to n: a client must stop at the bad one."""
        from sockstack.protocol.codecs import MAX_CONTAINER

        try:
            yield 0
            yield [0] * (MAX_CONTAINER + 1)
            for i in range(2, n):
                self._made()
                yield i
        finally:
            self.closed.set()

    @method
    def named(self, n: int, timeout: float = 0, metadata: str = "") -> Iterator[Any]:
        """Keyword arguments named like the client's own."""
        yield from [n, timeout, metadata]

    @method
    async def agated(self) -> AsyncIterator[int]:
        """Yields 0, then waits (on the loop) until the test opens the gate."""
        try:
            yield 0
            self.started.set()
            for _ in range(200):  # bounded: 20 s at most
                if self.gate.is_set():
                    break
                await asyncio.sleep(0.1)
            yield 1
        finally:
            self.closed.set()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return server_cert(ca, tmp_path_factory.mktemp("bstream"))


Served = ThreadServed[Blocking]


@pytest.fixture
def served(cert: Path) -> Iterator[Served]:
    service = Blocking()
    with serving_in_thread(service, cert, on_stop=lambda: service.gate.set()) as s:
        yield s


def closed(svc: Streams) -> bool:
    """Wait (up to a generous bound) until a generator's ``finally`` ran."""
    return svc.closed.wait(timeout(10))


# --------------------------------------------------------------------------- items, in order


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", ["count", "acount"])
def test_items_arrive_in_order_then_the_result(
    served: Served, ca: trustme.CA, scheme: str, name: str
) -> None:
    with connect(served.url(scheme), timeout=timeout(30), **options(scheme, ca)) as c:
        stream = c.stream(name, 100_000)  # far more than one window of items
        assert list(stream) == list(range(100_000))
        assert stream.result == (1_000_000 if name == "count" else None)
        assert c.call("plain", 1) == 2  # the connection is still good
        assert c.connection.item_streams == {}  # nothing left behind
    if name == "count":
        assert served.service.seen_transport == scheme


def test_a_plain_method_streamed_gives_no_items_and_its_result(served: Served) -> None:
    with connect(served.url("tcp"), timeout=timeout(10)) as c:
        stream = c.stream("plain", 41)
        assert list(stream) == []
        assert stream.result == 42


def test_metadata_goes_with_the_stream_and_trailers_come_back(served: Served) -> None:
    with connect(served.url("tcp"), timeout=timeout(10), metadata={"tenant": "a"}) as c:
        stream = c.stream("tagged", 3, metadata={"trace": "t1"})
        assert list(stream) == ["0", "1", "2"]
        assert served.service.seen_metadata == {"tenant": "a", "trace": "t1"}
        assert stream.metadata == {"done": "yes"}


# --------------------------------------------------------------------------- flow control


@pytest.mark.parametrize("name", ["blobs", "ablobs"])
def test_a_reader_that_does_not_read_holds_the_producer_at_the_window(
    served: Served, name: str
) -> None:
    svc = served.service
    total = 20 * STREAM_WINDOW // len(ITEM)  # 20 windows' worth
    per_window = STREAM_WINDOW // 100  # 100-byte bodies
    with connect(served.url("tcp"), timeout=timeout(30)) as c:
        stream = c.stream(name, total)
        assert next(stream) == ITEM  # the stream is open; nothing more is taken for now
        assert stream._call is not None
        _, items = stream._call
        # Round trips on the same connection (each reads what came) until the server has
        # sent (about) its window.
        for _ in range(2000):
            if items.queued + 100 * 2 >= STREAM_WINDOW:
                break
            c.ping()
        else:
            pytest.fail(f"only {items.queued} bytes arrived")
        for _ in range(20):  # round trips for a producer that would go on
            c.ping()
        assert svc.produced <= per_window + 3, svc.produced
        assert svc.produced < total // 10
        assert items.queued <= STREAM_WINDOW + 100  # the client's memory, too
        rest = list(stream)  # reading again: credit flows, the stream ends
        assert len(rest) == total - 1
        assert svc.produced == total


def test_a_server_that_breaks_the_window_is_stopped(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client refuses items beyond the window it expects (it bounds its own memory):
    here it expects 1,000 bytes and meets a server that (rightly) sends 262,144."""
    import sockstack.sync.client as client_module

    def small(request_id: int, method: str) -> ItemStream:
        return ItemStream(request_id, method, window=1000)

    monkeypatch.setattr(client_module, "ItemStream", small)
    svc = served.service
    with connect(served.url("tcp"), timeout=timeout(20)) as c:
        got = []
        with pytest.raises(RemoteProtocolError, match="beyond the flow-control window of 1000"):
            for item in c.stream("forever", 0):
                got.append(item)
        assert got == list(range(len(got)))  # the items before it, in order
        assert 300 <= len(got) <= 1000  # 1-3 bytes each, up to the window
        assert closed(svc)  # the client's CANCEL stopped the generator
        assert c.call("plain", 1) == 2


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", ["forever", "aforever"])
def test_breaking_out_of_the_loop_closes_the_generator(
    served: Served, ca: trustme.CA, scheme: str, name: str
) -> None:
    with connect(served.url(scheme), timeout=timeout(20), **options(scheme, ca)) as c:
        for item in c.stream(name, 0.001):
            if item == 5:
                break
        assert closed(served.service)  # CANCEL reached it: its finally ran
        assert c.call("plain", 1) == 2
        assert c.connection.item_streams == {}


def test_close_and_the_with_block_cancel(served: Served) -> None:
    svc = served.service
    with connect(served.url("tcp"), timeout=timeout(20)) as c:
        with c.stream("forever", 0.001) as stream:
            assert next(stream) == 0
        assert closed(svc)
        svc.closed.clear()
        stream = c.stream("aforever", 0.001)
        assert next(stream) == 0
        stream.close()
        assert closed(svc)
        with pytest.raises(StopIteration):
            next(stream)


@pytest.mark.parametrize("name", ["forever", "aforever"])
def test_a_dropped_connection_fails_the_stream_and_closes_the_generator(
    served: Served, name: str
) -> None:
    with connect(served.url("tcp"), timeout=timeout(20)) as c:
        stream = c.stream(name, 0.001)
        assert next(stream) == 0
        c.connection.drop()  # the connection is lost (as a reset would)
        assert closed(served.service)
        with pytest.raises(ConnectionLost):
            for _ in stream:  # items already queued may come first
                pass
        assert c.call("plain", 1) == 2  # the next call reconnects


@pytest.mark.parametrize("name", ["fails_after", "afails_after"])
def test_an_error_mid_stream_comes_after_the_items_before_it(served: Served, name: str) -> None:
    with connect(served.url("tcp"), timeout=timeout(10)) as c:
        got = []
        with pytest.raises(RemoteError) as info:
            for item in c.stream(name, 3):
                got.append(item)
        assert got == [0, 1, 2]
        assert info.value.code == ErrorCode.APPLICATION_ERROR
        assert "broke after the items" in str(info.value)


@pytest.mark.parametrize("name", ["forever", "aforever"])
def test_the_deadline_bounds_the_whole_stream(served: Served, name: str) -> None:
    """Whichever clock goes first (the server's DEADLINE_EXCEEDED or the client's own), the
    blocking caller sees CallTimeout, as for a plain call."""
    with connect(served.url("tcp"), timeout=timeout(20)) as c:
        got = 0
        with pytest.raises(CallTimeout):
            for _ in c.stream(name, 0.01, timeout=0.3):
                got += 1
        assert got > 0
        assert closed(served.service)  # stopped on the server too


def wait_until_in(thread_id: int, function: str) -> None:
    """Wait (bounded) until the thread's stack holds a frame of ``function``."""
    pause = threading.Event()
    for _ in range(10_000):
        frame = sys._current_frames().get(thread_id)
        while frame is not None:
            if frame.f_code.co_name == function:
                return
            frame = frame.f_back
        pause.wait(0.001)  # re-check; the bound is 10 s in all
    raise AssertionError(f"thread never in {function}")


class Interrupted(BaseException):
    """What the test's SIGINT handler raises (as KeyboardInterrupt would)."""


def test_an_interrupt_while_waiting_for_an_item_cancels_the_stream(served: Served) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals go to the main thread")
    svc = served.service

    def interrupt(*_: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    main = threading.get_ident()
    try:
        with connect(served.url("tcp"), timeout=timeout(20)) as c:
            stream = c.stream("agated")
            assert next(stream) == 0

            def kill_when_waiting() -> None:
                assert svc.started.wait(timeout(10))
                wait_until_in(main, "read_until")
                signal.pthread_kill(main, signal.SIGINT)

            killer = in_thread(kill_when_waiting)
            with pytest.raises(Interrupted):
                next(stream)
            result(*killer)
            assert closed(svc)  # CANCEL (or the dropped connection) closed the generator
            with pytest.raises(StopIteration):
                next(stream)
            assert c.call("plain", 1) == 2
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("scheme", SCHEMES)
def test_streams_and_calls_of_several_threads_share_the_connection(
    served: Served, ca: trustme.CA, scheme: str
) -> None:
    """Four threads each read a stream of their own, two others make calls, all at once on one
    connection: each thread gets exactly its own items (whoever read them from the socket)."""
    with connect(served.url(scheme), timeout=timeout(60), **options(scheme, ca)) as c:
        sock = c.connection.sock

        def read(n: int) -> list[int]:
            return list(c.stream("count", n))

        def calls(k: int) -> list[int]:
            return [c.call("plain", k * 1000 + i) for i in range(300)]

        streams = [in_thread(lambda n=n: read(n)) for n in (20_000, 30_000, 40_000, 50_000)]
        callers = [in_thread(lambda k=k: calls(k)) for k in (1, 2)]
        for (thread, box), n in zip(streams, (20_000, 30_000, 40_000, 50_000), strict=True):
            assert result(thread, box) == list(range(n))
        for (thread, box), k in zip(callers, (1, 2), strict=True):
            assert result(thread, box) == [k * 1000 + i + 1 for i in range(300)]
        assert c.connection.sock is sock  # one connection throughout
        assert c.connection.item_streams == {}


def test_a_call_from_another_thread_while_a_stream_waits_unread(served: Served) -> None:
    """A stream left unread (its window full) does not hold other threads' calls up."""
    with connect(served.url("tcp"), timeout=timeout(20)) as c:
        stream = c.stream("forever", 0)
        assert next(stream) == 0
        others = [in_thread(lambda i=i: c.call("plain", i)) for i in range(4)]
        assert [result(*t) for t in others] == [1, 2, 3, 4]
        stream.close()
        assert closed(served.service)


# --------------------------------------------------------------------------- refusals


def test_a_stream_over_udp_is_refused_before_anything_is_sent(served: Served) -> None:
    with connect(served.url("udp"), timeout=timeout(5)) as c:
        with pytest.raises(LocalProtocolError) as info:
            c.stream("count", 3)
        assert info.value.code == ErrorCode.STREAM_MISMATCH
        assert "TCP or TLS" in str(info.value)
        assert served.service.produced == 0


def test_a_generator_called_with_call_is_refused_and_does_not_run(served: Served) -> None:
    with connect(served.url("tcp"), timeout=timeout(5)) as c:
        with pytest.raises(RemoteError) as info:
            c.call("blobs", 3)
        assert info.value.code == ErrorCode.STREAM_MISMATCH
        assert served.service.produced == 0
        assert list(c.stream("blobs", 2)) == [ITEM, ITEM]


def test_a_request_that_does_not_encode_sends_nothing_and_leaves_no_state(
    served: Served,
) -> None:
    with connect(served.url("tcp"), timeout=timeout(5)) as c:
        with pytest.raises(Exception) as info:
            next(c.stream("count", object()))
        assert "serial" in str(info.value) or "encode" in str(info.value).lower()
        assert c.connection.item_streams == {}
        assert len(c.connection.calls) == 0
        assert c.call("plain", 1) == 2


def test_streams_nobody_reads_hold_memory_at_their_windows(served: Served) -> None:
    """Memory measured, not counted: 16 streams on one blocking client that nobody reads past
    their first item. Server and client share this process (the server on its thread), and
    tracemalloc sees both: together they hold about 16 windows (the client's queues), far
    below the 320 windows the generators would make unchecked."""
    import tracemalloc

    svc = served.service
    streams_n = 16
    total = 20 * STREAM_WINDOW // len(ITEM)  # 20 windows' worth per stream
    tracemalloc.start()
    try:
        with connect(served.url("tcp"), timeout=timeout(60)) as c:
            before = tracemalloc.get_traced_memory()[0]
            streams = [c.stream("ablobs", total) for _ in range(streams_n)]
            for s in streams:
                assert next(s) == ITEM
            queues = [s._call[1] for s in streams if s._call is not None]
            for _ in range(4000):  # round trips until every window has arrived
                if all(q.queued + 200 >= STREAM_WINDOW for q in queues):
                    break
                c.ping()
            for _ in range(20):  # room for a producer that would go on
                c.ping()
            held = tracemalloc.get_traced_memory()[0] - before
            for s in streams:
                s.close()
    finally:
        tracemalloc.stop()
    assert svc.produced < streams_n * total // 10
    windows = streams_n * STREAM_WINDOW
    assert held < 3 * windows, (held, windows)
    assert held > windows // 2  # the windows did arrive (the measure sees them)


# --------------------------------------------------------------------------- interceptors


class StreamRecorder(ClientInterceptor):
    def __init__(self, name: str, log: list[tuple[str, ...]]) -> None:
        self.name = name
        self.log = log

    def before(self, call: ClientCall) -> None:
        self.log.append((self.name, "before", call.method, str(call.stream)))
        call.metadata[f"from-{self.name}"] = "1"
        if call.method == "refused-here":
            raise PermissionError("not from this client")

    def after(self, call: ClientCall, reply: Reply) -> None:
        trailers = ",".join(f"{k}={v!s}" for k, v in sorted(reply.metadata.items()))
        self.log.append((self.name, "after", call.method, f"{reply.result}|{trailers}"))

    def error(self, call: ClientCall, exc: BaseException) -> None:
        self.log.append((self.name, "error", call.method, type(exc).__name__))


class AsyncStreamRecorder(StreamRecorder):
    async def before(self, call: ClientCall) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().before(call)

    async def error(self, call: ClientCall, exc: BaseException) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().error(call, exc)


def _expected(names: list[str]) -> list[tuple[str, ...]]:
    """What the hooks log for the scenario both client tests run (before in list order, after
    and error reversed; each once per stream)."""
    rev = list(reversed(names))
    out: list[tuple[str, ...]] = []
    out += [(n, "before", "tagged", "True") for n in names]
    out += [(n, "after", "tagged", "None|done=yes") for n in rev]
    out += [(n, "before", "count", "True") for n in names]
    out += [(n, "after", "count", "30|") for n in rev]
    out += [(n, "before", "fails_after", "True") for n in names]
    out += [(n, "error", "fails_after", "RemoteError") for n in rev]
    out += [(n, "before", "forever", "True") for n in names]
    out += [(n, "error", "forever", "CallError") for n in rev]  # the reader stopped it
    out += [(n, "before", "refused-here", "True") for n in names[:1]]
    out += [(n, "error", "refused-here", "PermissionError") for n in rev]
    out += [(n, "before", "plain", "True") for n in names]  # no item at all
    out += [(n, "after", "plain", "2|") for n in rev]
    out += [(n, "before", "fails_after", "True") for n in names]  # fails before any item
    out += [(n, "error", "fails_after", "RemoteError") for n in rev]
    return out


def test_client_interceptors_run_once_around_a_blocking_stream(served: Served) -> None:
    log: list[tuple[str, ...]] = []
    svc = served.service
    with connect(
        served.url("tcp"), timeout=timeout(20), interceptors=[StreamRecorder("a", log)]
    ) as c:
        assert list(c.stream("tagged", 2)) == ["0", "1"]
        assert svc.seen_metadata == {"from-a": "1"}  # what the hook added was sent
        assert list(c.stream("count", 3)) == [0, 1, 2]
        with pytest.raises(RemoteError):
            list(c.stream("fails_after", 1))
        for _ in c.stream("forever", 0.001):
            break
        assert closed(svc)
        with pytest.raises(PermissionError):
            next(c.stream("refused-here"))
        assert list(c.stream("plain", 1)) == []
        with pytest.raises(RemoteError):
            next(c.stream("fails_after", 0))
    assert log == _expected(["a"])


def test_client_interceptors_run_once_around_an_asyncio_stream(served: Served) -> None:
    log: list[tuple[str, ...]] = []
    svc = served.service

    async def scenario() -> None:
        async with AsyncClient(
            served.url("tcp"),
            timeout=timeout(20),
            interceptors=[StreamRecorder("a", log), AsyncStreamRecorder("b", log)],
        ) as c:
            assert [i async for i in c.stream("tagged", 2)] == ["0", "1"]
            assert svc.seen_metadata == {"from-a": "1", "from-b": "1"}
            assert [i async for i in c.stream("count", 3)] == [0, 1, 2]
            with pytest.raises(RemoteError):
                [i async for i in c.stream("fails_after", 1)]
            async with c.stream("forever", 0.001) as stream:
                async for _ in stream:
                    break
            assert await asyncio.to_thread(closed, svc)
            with pytest.raises(PermissionError):
                await anext(aiter(c.stream("refused-here")))
            assert [i async for i in c.stream("plain", 1)] == []
            with pytest.raises(RemoteError):
                await anext(aiter(c.stream("fails_after", 0)))

    asyncio.run(scenario())
    assert log == _expected(["a", "b"])


# --------------------------------------------------------------------------- review findings


def test_breaking_out_while_other_threads_call_still_cancels(served: Served) -> None:
    """A stream dropped (``break``) while other threads keep the connection's lock busy is
    still cancelled: at once when it can be, else by the next call that ends on the
    connection. Every generator's ``finally`` runs; nothing is left queued."""
    svc = served.service
    rounds = 30
    with connect(served.url("tcp"), timeout=timeout(30)) as c:
        stop = threading.Event()

        def calls() -> int:
            n = 0
            for _ in range(100_000):  # bounded; ends when the main thread is done
                if stop.is_set():
                    break
                assert c.call("plain", 1) == 2
                n += 1
            return n

        callers = [in_thread(calls) for _ in range(3)]
        try:
            for _ in range(rounds):
                for item in c.stream("counted"):
                    if item == 3:
                        break
        finally:
            stop.set()
            made = [result(*t) for t in callers]
        assert all(n > 0 for n in made)
        assert c.call("plain", 1) == 2  # (a call ending: runs any CANCEL left to send)
        cond = threading.Condition()
        with cond:
            ok = cond.wait_for(lambda: svc.finished >= rounds, timeout(10))
        assert ok, f"{svc.finished} of {rounds} generators closed"
        assert c.connection.item_streams == {}
        assert c.connection.abandoned == []


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
def test_an_item_that_does_not_decode_stops_the_stream_there(served: Served, flavour: str) -> None:
    """PROTOCOL.md §4.3: the call fails with DECODE_ERROR at the bad ITEM (the items before it
    come first, none after it) and CANCEL stops the generator."""
    svc = served.service
    total = 1_000_000  # far beyond one window: without CANCEL it would wait at the window
    if flavour == "blocking":
        with connect(served.url("tcp"), timeout=timeout(20)) as c:
            got = []
            with pytest.raises(RemoteError) as info:
                for item in c.stream("undecodable", total):
                    got.append(item)
            assert c.call("plain", 1) == 2
    else:

        async def scenario() -> tuple[list[Any], pytest.ExceptionInfo[RemoteError]]:
            async with AsyncClient(served.url("tcp"), timeout=timeout(20)) as c:
                got = []
                with pytest.raises(RemoteError) as info:
                    async for item in c.stream("undecodable", total):
                        got.append(item)
                assert await c.call("plain", 1) == 2
                return got, info

        got, info = asyncio.run(scenario())
    assert got == [0]
    assert info.value.code == ErrorCode.DECODE_ERROR
    assert closed(served.service)
    assert svc.produced < total // 2  # stopped by the CANCEL, not run to its end


def test_close_from_another_thread_ends_a_waiting_reader(served: Served) -> None:
    svc = served.service
    with connect(served.url("tcp"), timeout=timeout(30)) as c:
        stream = c.stream("agated")
        assert next(stream) == 0

        def read_on() -> list[int]:
            return list(stream)  # waits for item 1, which comes only when the gate opens

        reader = in_thread(read_on)
        assert svc.started.wait(timeout(10))
        wait_until_in(reader[0].ident or 0, "read_until")
        stream.close()
        assert result(*reader) == []  # ended at once, long before the 30 s timeout
        assert closed(svc)


def test_close_from_another_task_ends_a_waiting_reader(served: Served) -> None:
    svc = served.service

    async def scenario() -> list[int]:
        async with AsyncClient(served.url("tcp"), timeout=timeout(30)) as c:
            stream = c.stream("agated")
            assert await anext(aiter(stream)) == 0
            reader = asyncio.ensure_future(_drain(stream))
            assert await asyncio.to_thread(svc.started.wait, timeout(10))
            await stream.aclose()
            return await asyncio.wait_for(reader, timeout(10))

    assert asyncio.run(scenario()) == []
    assert closed(svc)


async def _drain(stream: Any) -> list[Any]:
    return [item async for item in stream]


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
def test_a_slow_reader_gets_the_timeout_not_a_window_of_late_items(
    served: Served, flavour: str
) -> None:
    """The timeout bounds the stream for the reader too: once it has passed, the next read of
    a stream still in flight raises CallTimeout (what was queued is dropped) and CANCEL stops
    the generator; the reader is not handed a window's worth of items first."""
    svc = served.service
    pause = threading.Event()  # never set: waited on to be a slow reader, past the deadline
    if flavour == "blocking":
        with connect(served.url("tcp"), timeout=timeout(20)) as c:
            stream = c.stream("forever", 0, timeout=0.5)
            assert next(stream) == 0
            pause.wait(0.8)  # the reader is slow: the deadline passes meanwhile
            with pytest.raises(CallTimeout):
                next(stream)
    else:

        async def scenario() -> None:
            async with AsyncClient(served.url("tcp"), timeout=timeout(20)) as c:
                stream = c.stream("forever", 0, timeout=0.5)
                it = aiter(stream)
                assert await anext(it) == 0
                await asyncio.to_thread(pause.wait, 0.8)
                with pytest.raises(CallTimeout):
                    await anext(it)

        asyncio.run(scenario())
    assert closed(svc)


def test_keyword_arguments_named_like_the_clients_own(served: Served) -> None:
    """stream_request passes the method's keyword arguments as a mapping: they may be named
    ``timeout`` or ``metadata``; ``sockstack call --kw timeout=...`` uses it."""
    kwargs = {"timeout": 1.5, "metadata": "m"}
    with connect(served.url("tcp"), timeout=timeout(10)) as c:
        assert list(c.stream_request("named", [7], kwargs)) == [7, 1.5, "m"]

    async def scenario() -> list[Any]:
        async with AsyncClient(served.url("tcp"), timeout=timeout(10)) as c:
            return [i async for i in c.stream_request("named", (7,), kwargs)]

    assert asyncio.run(scenario()) == [7, 1.5, "m"]


def test_items_queued_before_the_connection_drops_reach_a_following_reader() -> None:
    """Another thread reads the socket (its call waits) when the server sends a stream's
    items and then drops the connection: the stream's reader, waiting as a follower, still
    gets every item queued for it, then ConnectionLost (the asyncio client does the same).
    The server here is built from the sans-I/O core: it never answers "hold"; for a stream it
    sends three ITEMs and closes."""
    from sockstack.protocol.connection import Connection
    from sockstack.protocol.events import Request, Role

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        core = Connection(Role.SERVER)
        try:
            while data := await reader.read(65536):
                for ev in core.receive_data(data):
                    if type(ev) is Request and ev.stream:
                        for i in range(3):
                            core.send_message(core.item_frame(ev.request_id, i))
                        writer.write(core.data_to_send())
                        await writer.drain()
                        return  # closes the connection (finally)
                writer.write(core.data_to_send())
                await writer.drain()
        finally:
            writer.close()

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", 0))
        box["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(timeout(10))
    try:
        with connect(f"tcp://127.0.0.1:{box['port']}", timeout=timeout(20)) as c:
            holder = in_thread(lambda: c.call("hold"))
            for _ in range(10_000):  # until the holder reads the socket for everyone
                if c.connection._leader is not None:
                    break
                threading.Event().wait(0.001)
            got: list[int] = []
            with pytest.raises(ConnectionLost):
                for item in c.stream("items"):
                    got.append(item)
            assert got == [0, 1, 2]
            with pytest.raises(ConnectionLost):
                result(*holder)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout(10))
