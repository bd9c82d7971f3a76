"""The blocking client's deadlines, metadata, CANCEL, trailers, interceptors and tracing (issue
12 items 3-5), live over loopback, TCP and UDP: what test_deadlines_metadata.py, test_interceptors
and test_tracing.py show for the asyncio client. The server runs in a thread of its own (the
blocking client is called from the test's thread)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sockstack import (
    CallTimeout,
    ErrorCode,
    LocalProtocolError,
    RemoteError,
    Reply,
    Server,
    connect,
    method,
)
from sockstack.interceptors import ClientCall, ClientInterceptor
from sockstack.tracing import ClientTracing, ServerTracing
from tests.conftest import timeout
from tests.integration.test_deadlines_metadata import Work

HOST = "127.0.0.1"
T = TypeVar("T")


class BlockingWork(Work):
    @method
    def outer_blocking(self, url: str) -> Any:
        """Threaded: calls a server with a blocking client from inside a served call (its own
        client's timeout is 10 s): the nested call inherits the served call's deadline."""
        with connect(url, timeout=10) as c:
            return c.call("seen")

    @method
    def traced_outer(self, url: str) -> Any:
        """Threaded: a nested call through a traced blocking client."""
        assert self.provider is not None
        with connect(url, timeout=timeout(10), interceptors=[ClientTracing(self.provider)]) as c:
            return c.call("count_threaded")

    provider: TracerProvider | None = None


class Served:
    """A server in a thread with its own event loop, until :meth:`stop`."""

    def __init__(self, service: Any, **options: Any) -> None:
        self.service = service
        self.ready = threading.Event()
        self.server: Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._options = options
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()
        assert self.ready.wait(timeout(10))

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = Server(self.service, tcp=[f"{HOST}:0"], udp=[f"{HOST}:0"], **self._options)
        await server.start()
        self.server = server
        self.ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.shutdown()

    def url(self, scheme: str) -> str:
        assert self.server is not None
        return f"{scheme}://{HOST}:{self.server.endpoint(scheme).port}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout(20))

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout(20))


@pytest.fixture
def work() -> Iterator[tuple[Served, BlockingWork]]:
    svc = BlockingWork()
    served = Served(svc)
    try:
        yield served, svc
    finally:
        served.loop.call_soon_threadsafe(svc.gate.set)  # type: ignore[union-attr]
        svc.release.set()
        served.stop()


async def _set(event: asyncio.Event) -> bool:
    await asyncio.wait_for(event.wait(), timeout(10))
    return True


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_the_server_sees_the_deadline_and_the_metadata(
    work: tuple[Served, BlockingWork], scheme: str
) -> None:
    served, _ = work
    with connect(served.url(scheme), metadata={"tenant": "acme", "k": "default"}) as c:
        seen = c.request("seen", metadata={"k": "mine", "raw": b"\x00"}, timeout=5)
        assert seen["metadata"] == {"tenant": "acme", "k": "mine", "raw": b"\x00"}
        assert 0 < seen["remaining"] <= 5
        assert seen["transport"] == scheme and seen["method"] == "seen"
        plain = c.call("seen", timeout=3)  # the fast path: the defaults, the deadline
        assert plain["metadata"] == {"tenant": "acme", "k": "default"}
        assert 0 < plain["remaining"] <= 3
        threaded = c.request("seen_threaded", timeout=3)
        assert threaded["metadata"] == {"tenant": "acme", "k": "default"}
        assert 0 < threaded["remaining"] <= 3
    with connect(served.url(scheme)) as c:  # no metadata: the deadline alone
        seen = c.call("seen", timeout=4)
        assert seen["metadata"] == {} and 0 < seen["remaining"] <= 4


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_bad_metadata_is_refused_before_sending(
    work: tuple[Served, BlockingWork], scheme: str
) -> None:
    served, _ = work
    with pytest.raises(LocalProtocolError, match="metadata key 'Bad Key'"):
        connect(served.url(scheme), metadata={"Bad Key": "v"})
    with connect(served.url(scheme)) as c:
        with pytest.raises(LocalProtocolError) as info:
            c.request("count", metadata={"n": 1})  # type: ignore[dict-item]
        assert info.value.code == ErrorCode.DECODE_ERROR
        assert c.call("count") == 1  # nothing of the refused call was sent


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_a_nested_blocking_call_inherits_the_deadline(
    work: tuple[Served, BlockingWork], scheme: str
) -> None:
    served, _ = work
    with connect(served.url("tcp")) as c:
        inner = c.call("outer_blocking", served.url(scheme), timeout=2)
        # The inner client would have given it 10 s: it got the outer call's time left.
        assert 0 < inner["remaining"] <= 2
        no_deadline = c.call("outer_blocking", served.url(scheme))  # default 10 s timeout
        assert 2 < no_deadline["remaining"] <= 10


def test_a_call_timing_out_stops_the_async_method(work: tuple[Served, BlockingWork]) -> None:
    """TCP: the call times out after 0.3 s; the method stops on the server (its CANCEL, or its
    deadline: both were sent; the CANCEL alone is shown by the next test)."""
    served, svc = work
    with connect(served.url("tcp")) as c:
        # CallTimeout whichever comes first: the client's timeout, or the server's answer
        # DEADLINE_EXCEEDED at the deadline the call carried (within a millisecond or so).
        with pytest.raises(CallTimeout):
            c.call("slow", timeout=0.3)
        assert served.run(_set(svc.cancelled))
        assert not svc.finished.is_set()
        assert c.call("count") == 1  # the session goes on


def test_keyboard_interrupt_sends_cancel(work: tuple[Served, BlockingWork]) -> None:
    """A call with 30 s left is interrupted (SIGINT, KeyboardInterrupt in this thread) once the
    method runs: only the CANCEL can stop the method on the server."""
    served, svc = work
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT is delivered to the main thread")
    main = threading.get_ident()

    def interrupt() -> None:
        if served.run(_set(svc.started)):
            signal.pthread_kill(main, signal.SIGINT)

    with connect(served.url("tcp"), timeout=30) as c:
        t = threading.Thread(target=interrupt, daemon=True)
        t.start()
        with pytest.raises(KeyboardInterrupt):
            c.call("slow")
        t.join(timeout(10))
        assert served.run(_set(svc.cancelled))
        assert not svc.finished.is_set()
        assert c.call("count") == 1  # the session goes on (ERROR CANCELLED ignored)


def test_a_timed_out_threaded_call_flags_its_context(work: tuple[Served, BlockingWork]) -> None:
    served, svc = work
    with connect(served.url("tcp")) as c:
        with pytest.raises(CallTimeout):
            c.call("poll", timeout=0.3)
        assert svc.t_flagged.wait(timeout(10))


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_trailers_come_back_on_request(work: tuple[Served, BlockingWork], scheme: str) -> None:
    served, _ = work
    with connect(served.url(scheme)) as c:
        assert c.call("with_trailers") == "ok"  # a plain call: the result alone
        reply = c.request("with_trailers", with_metadata=True)
        assert reply == Reply("ok", {"served-by": "node-1", "cost": b"\x01\x02"})
        assert c.request("count", with_metadata=True) == Reply(1, {})
        assert c.request("count") == 2


class Recorder(ClientInterceptor):
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def before(self, call: ClientCall) -> None:
        call.metadata["added-by"] = "recorder"
        self.seen.append(("before", call.method))

    def after(self, call: ClientCall, reply: Reply) -> None:
        self.seen.append(("after", reply.result["metadata"]))

    def error(self, call: ClientCall, exc: BaseException) -> None:
        self.seen.append(("error", type(exc).__name__))


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_interceptors_run_around_each_call(work: tuple[Served, BlockingWork], scheme: str) -> None:
    served, _ = work
    rec = Recorder()
    with connect(served.url(scheme), metadata={"k": "v"}, interceptors=[rec]) as c:
        assert c.call("seen")["metadata"] == {"k": "v", "added-by": "recorder"}
        with pytest.raises(RemoteError):
            c.call("fail_unknown_method")
    assert rec.seen == [
        ("before", "seen"),
        ("after", {"k": "v", "added-by": "recorder"}),
        ("before", "fail_unknown_method"),
        ("error", "RemoteError"),
    ]


def test_async_hooks_are_refused() -> None:
    class Async(ClientInterceptor):
        async def before(self, call: ClientCall) -> None:
            return None

    with pytest.raises(TypeError, match="synchronous hooks only"):
        connect("udp://127.0.0.1:9", interceptors=[Async()])


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _by(spans: tuple[ReadableSpan, ...]) -> dict[tuple[str, SpanKind], ReadableSpan]:
    return {(s.name, s.kind): s for s in spans}


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_tracing_server_span_is_a_child_of_the_blocking_client_span(
    traced: tuple[TracerProvider, InMemorySpanExporter], scheme: str
) -> None:
    provider, exporter = traced
    svc = BlockingWork()
    svc.provider = provider
    front = Served(svc, insecure=True, interceptors=[ServerTracing(provider)])
    back = Served(BlockingWork(), insecure=True, interceptors=[ServerTracing(provider)])
    tracer = provider.get_tracer("test")
    try:
        with connect(
            front.url(scheme), timeout=timeout(10), interceptors=[ClientTracing(provider)]
        ) as c:
            with tracer.start_as_current_span("caller") as caller:
                assert c.call("traced_outer", back.url(scheme)) == 1
    finally:
        front.stop()
        back.stop()
    spans = _by(exporter.get_finished_spans())
    chain = [
        spans["traced_outer", SpanKind.CLIENT],
        spans["traced_outer", SpanKind.SERVER],
        spans["count_threaded", SpanKind.CLIENT],  # made inside the served call: its child
        spans["count_threaded", SpanKind.SERVER],
    ]
    assert chain[0].parent is not None
    assert chain[0].parent.span_id == caller.get_span_context().span_id
    for parent, child in itertools.pairwise(chain):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id
    assert len({s.context.trace_id for s in chain}) == 1
