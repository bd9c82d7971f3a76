"""OpenTelemetry tracing (issue 12 item 5), live over loopback: a span per call on both sides,
the W3C trace context carried in the call's metadata, the server span a child of the client
span (and of the caller's span before it), checked with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sockstack import (
    AsyncClient,
    ErrorCode,
    RemoteError,
    Server,
    Service,
    current_context,
    method,
)
from sockstack.tracing import ClientTracing, ServerTracing
from tests.conftest import timeout

HOST = "127.0.0.1"


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


class Svc(Service):
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    @method
    async def seen(self) -> dict[str, Any]:
        return dict(current_context().metadata)

    @method
    def threaded(self) -> int:
        return 1

    @method
    async def fails(self) -> None:
        raise ValueError("boom")

    @method
    async def ticks(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @method
    async def outer(self, url: str) -> Any:
        """Calls another server from inside a served call, through a traced client."""
        async with AsyncClient(
            url, timeout=timeout(10), interceptors=[ClientTracing(self.provider)]
        ) as c:
            return await c.call("threaded")


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


async def started(provider: TracerProvider) -> Server:
    server = Server(
        Svc(provider),
        tcp=[f"{HOST}:0"],
        udp=[f"{HOST}:0"],
        insecure=True,
        interceptors=[ServerTracing(provider)],
    )
    await server.start()
    return server


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_the_server_span_is_a_child_of_the_client_span(
    traced: tuple[TracerProvider, InMemorySpanExporter], scheme: str
) -> None:
    provider, exporter = traced
    server = await started(provider)
    tracer = provider.get_tracer("test")
    try:
        url = f"{scheme}://{HOST}:{server.endpoint(scheme).port}"
        async with AsyncClient(
            url, timeout=timeout(10), interceptors=[ClientTracing(provider)]
        ) as c:
            with tracer.start_as_current_span("caller") as caller:
                metadata = await c.call("seen")
    finally:
        await server.shutdown()
    spans = exporter.get_finished_spans()
    (client,) = by_kind(spans, SpanKind.CLIENT)
    (served,) = by_kind(spans, SpanKind.SERVER)
    # The context travelled in the metadata, under the W3C key.
    assert set(metadata) == {"traceparent"}
    assert metadata["traceparent"].split("-")[2] == f"{client.context.span_id:016x}"
    assert client.parent is not None and client.parent.span_id == caller.get_span_context().span_id
    assert served.parent is not None and served.parent.span_id == client.context.span_id
    assert served.parent.is_remote
    assert served.context.trace_id == client.context.trace_id == caller.get_span_context().trace_id
    assert served.name == client.name == "seen"
    assert served.attributes is not None and served.attributes["rpc.method"] == "seen"
    assert served.attributes["sockstack.transport"] == scheme


async def test_a_nested_call_continues_the_trace(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    front, back = await started(provider), await started(provider)
    try:
        back_url = f"tcp://{HOST}:{back.endpoint('tcp').port}"
        async with AsyncClient(
            f"tcp://{HOST}:{front.endpoint('tcp').port}",
            timeout=timeout(10),
            interceptors=[ClientTracing(provider)],
        ) as c:
            assert await c.call("outer", back_url) == 1
    finally:
        await front.shutdown()
        await back.shutdown()
    spans = {(s.name, s.kind): s for s in exporter.get_finished_spans()}
    chain = [
        spans["outer", SpanKind.CLIENT],
        spans["outer", SpanKind.SERVER],
        spans["threaded", SpanKind.CLIENT],  # made inside the served call: its child
        spans["threaded", SpanKind.SERVER],
    ]
    assert chain[0].parent is None  # the test made the first call outside any span
    for parent, child in itertools.pairwise(chain):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id
    assert len({s.context.trace_id for s in chain}) == 1


async def test_failed_calls_have_error_spans_on_both_sides(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    server = await started(provider)
    try:
        async with AsyncClient(
            f"tcp://{HOST}:{server.endpoint('tcp').port}",
            timeout=timeout(10),
            interceptors=[ClientTracing(provider)],
        ) as c:
            with pytest.raises(RemoteError):
                await c.call("fails")
    finally:
        await server.shutdown()
    spans = exporter.get_finished_spans()
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        (span,) = by_kind(spans, kind)
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["rpc.sockstack.error_code"] == ErrorCode.UNEXPECTED_ERROR


async def test_a_stream_is_one_span_on_each_side(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A streamed call is one CLIENT span (from the stream's start to its end, whatever the
    number of items) and one SERVER span, its child, through the trace context the client's
    interceptor put in the stream's metadata."""
    provider, exporter = traced
    server = await started(provider)
    try:
        async with AsyncClient(
            str(server.endpoint("tcp")),
            timeout=timeout(10),
            interceptors=[ClientTracing(provider)],
        ) as c:
            assert [i async for i in c.stream("ticks", 500)] == list(range(500))
    finally:
        await server.shutdown()
    spans = exporter.get_finished_spans()
    (client,) = by_kind(spans, SpanKind.CLIENT)
    (served,) = by_kind(spans, SpanKind.SERVER)
    assert client.name == served.name == "ticks"
    assert served.parent is not None and client.context is not None
    assert served.parent.span_id == client.context.span_id
    assert served.context is not None
    assert served.context.trace_id == client.context.trace_id
    assert client.status.status_code is not StatusCode.ERROR


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_the_blocking_client_traces_calls_and_streams(
    traced: tuple[TracerProvider, InMemorySpanExporter], scheme: str
) -> None:
    """The same CLIENT spans from the blocking client (its hooks are synchronous): a call, and
    over TCP a stream (one span for the whole stream); the server spans are their children."""
    from sockstack import connect

    provider, exporter = traced
    server = await started(provider)

    def scenario() -> dict[str, Any]:
        with connect(
            str(server.endpoint(scheme)),
            timeout=timeout(10),
            interceptors=[ClientTracing(provider)],
        ) as c:
            seen = c.call("seen")
            if scheme == "tcp":
                assert list(c.stream("ticks", 300)) == list(range(300))
            with pytest.raises(RemoteError):
                c.call("fails")
            return dict(seen)

    try:
        metadata = await asyncio.to_thread(scenario)
    finally:
        await server.shutdown()
    spans = exporter.get_finished_spans()
    clients = {s.name: s for s in by_kind(spans, SpanKind.CLIENT)}
    served = {s.name: s for s in by_kind(spans, SpanKind.SERVER)}
    names = {"seen", "fails"} | ({"ticks"} if scheme == "tcp" else set())
    assert set(clients) == set(served) == names
    assert metadata["traceparent"].split("-")[2] == f"{clients['seen'].context.span_id:016x}"
    for name in names:
        parent = served[name].parent
        assert parent is not None and parent.span_id == clients[name].context.span_id
    assert clients["fails"].status.status_code is StatusCode.ERROR
    assert clients["seen"].status.status_code is not StatusCode.ERROR
