"""OpenTelemetry tracing as interceptors (``pip install 'sockstack[tracing]'``): a span per call
on both sides, the W3C trace context carried in the call's metadata::

    from sockstack.tracing import ClientTracing, ServerTracing

    server = Server(Calculator(), tcp=["127.0.0.1:5050"], interceptors=[ServerTracing()])
    client = AsyncClient("tcp://127.0.0.1:5050", interceptors=[ClientTracing()])

The client's span (kind CLIENT, named after the method) is a child of whatever span is current
where the call is made; its context travels in the metadata keys ``traceparent`` and
``tracestate`` (W3C Trace Context; PROTOCOL.md §4 reserves them); the server's span (kind
SERVER) is its child and is the current span while the method runs, so calls the method makes
with a traced client are its children in turn. A failed call's span has status ERROR with the
error's code (``rpc.sockstack.error_code``). Spans go to the tracer provider given, else the
global one (``opentelemetry.trace.set_tracer_provider``): with none configured they cost
little and go nowhere.

The trace context is sent only to a server that reads metadata (PROTOCOL.md §4: one that
announced it in WELCOME; always over UDP); an older server simply starts a new trace.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sockstack.interceptors import ClientCall, ClientInterceptor, Failure, ServerInterceptor
from sockstack.protocol.calls import Reply
from sockstack.rpc.context import CallContext

__all__ = ["TRACE_KEYS", "ClientTracing", "ServerTracing"]

TRACE_KEYS = ("traceparent", "tracestate")
"""The metadata keys the W3C trace context travels in."""
_NAME = "sockstack"


class _MetadataGetter(Getter[Mapping[str, str | bytes]]):
    def get(self, carrier: Mapping[str, str | bytes], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, str | bytes]) -> list[str]:
        return list(carrier)


class _MetadataSetter(Setter[MutableMapping[str, str | bytes]]):
    def set(self, carrier: MutableMapping[str, str | bytes], key: str, value: str) -> None:
        carrier[key.lower()] = value  # metadata keys are lower case (PROTOCOL.md §4)


_GET = _MetadataGetter()
_SET = _MetadataSetter()


def _attributes(method: str, transport: str, peer: str) -> dict[str, Any]:
    return {
        "rpc.system": _NAME,
        "rpc.method": method,
        "network.transport": "udp" if transport == "udp" else "tcp",
        "sockstack.transport": transport,
        "sockstack.peer": peer,
    }


class ServerTracing(ServerInterceptor):
    """A SERVER span per call, the child of the caller's span when its metadata carries one."""

    name = "tracing"

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.tracer = trace.get_tracer(_NAME, tracer_provider=tracer_provider)
        self.propagator = propagator or TraceContextTextMapPropagator()

    def before(self, ctx: CallContext) -> None:
        md = ctx.metadata
        parent = self.propagator.extract(md, getter=_GET) if md else None
        span = self.tracer.start_span(
            ctx.method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_attributes(ctx.method, ctx.transport, ctx.peer),
        )
        # Current while the method runs (hooks and method share the call's own context).
        token = otel_context.attach(trace.set_span_in_context(span))
        ctx.state["tracing"] = (span, token)

    def after(self, ctx: CallContext, result: Any) -> None:
        self._end(ctx, None)

    def error(self, ctx: CallContext, failure: Failure) -> None:
        self._end(ctx, failure)

    def _end(self, ctx: CallContext, failure: Failure | None) -> None:
        entry = ctx.state.pop("tracing", None)
        if entry is None:  # an interceptor before this one refused the call: no span
            return
        span, token = entry
        if failure is not None:
            span.set_attribute("rpc.sockstack.error_code", int(failure.code))
            span.set_status(Status(StatusCode.ERROR, f"{failure.type}: {failure.message}"))
        span.end()
        otel_context.detach(token)


class ClientTracing(ClientInterceptor):
    """A CLIENT span per call, its context sent in the call's metadata."""

    name = "tracing"

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.tracer = trace.get_tracer(_NAME, tracer_provider=tracer_provider)
        self.propagator = propagator or TraceContextTextMapPropagator()

    def before(self, call: ClientCall) -> None:
        span = self.tracer.start_span(
            call.method,
            kind=SpanKind.CLIENT,
            attributes=_attributes(call.method, call.transport, call.peer),
        )
        self.propagator.inject(call.metadata, context=trace.set_span_in_context(span), setter=_SET)
        call.state["tracing"] = span

    def after(self, call: ClientCall, reply: Reply) -> None:
        span = call.state.pop("tracing", None)
        if span is not None:
            span.end()

    def error(self, call: ClientCall, exc: BaseException) -> None:
        span = call.state.pop("tracing", None)
        if span is None:
            return
        code = getattr(exc, "code", None)
        if isinstance(code, int):
            span.set_attribute("rpc.sockstack.error_code", code)
        if isinstance(exc, Exception):
            span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()
