"""``/rpc/{method}``: every method of the host's dispatcher over HTTP (docs/HTTP.md, "Calls").

``POST /rpc/add`` with ``{"a": 2, "b": 3}`` (named arguments) or ``[2, 3]`` (positional)
answers ``5``. Arguments are converted to the method's annotated types as over the JSON codec
(PROTOCOL.md §3.1); the result is JSON as the JSON codec writes it. Headers carry the rest of a
call: ``Sockstack-Timeout-Ms`` (its deadline), ``Sockstack-Meta-KEY`` (metadata, also
``traceparent``/``tracestate``), and the method's trailers come back as ``Sockstack-Trailer-KEY``
(a bytes value under a key ending ``-bin``, base64, as gRPC does). A method marked
``readonly`` also answers ``GET /rpc/NAME?a=2&b=3``. A method that streams answers
newline-delimited JSON, or Server-Sent Events when the client accepts ``text/event-stream``.
Errors are problem details with the call's error code (:mod:`sockstack.gateway.problems`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import itertools
import logging
from typing import TYPE_CHECKING, Any

from sockstack.errors import CodecError, ErrorCode
from sockstack.gateway.http import JSON_TYPE, HttpRequest, json_or_text, not_allowed
from sockstack.gateway.problems import HttpProblem, problem_body
from sockstack.protocol.codecs import JSON
from sockstack.protocol.events import Request
from sockstack.protocol.messages import check_metadata

if TYPE_CHECKING:
    from sockstack.gateway.pattern import Gateway
    from sockstack.host.dispatch import Handler
    from sockstack.rpc.context import CallContext

__all__ = ["install"]

log = logging.getLogger("sockstack.gateway")

_TIMEOUT = b"sockstack-timeout-ms"
_META = b"sockstack-meta-"
_TRACE = (b"traceparent", b"tracestate")
_MAX_BUDGET_MS = 2**32 - 1  # as the DEADLINE field (PROTOCOL.md §4)
_ids = itertools.count(1)
_encode = JSON.encode
_POST = ("POST",)
_GET_POST = ("GET", "HEAD", "POST")
_STREAM_WINDOW = 256 << 10  # bytes of items queued for a slow HTTP reader before the pump waits


_MISSING = object()
_EMPTY = inspect.Parameter.empty
_Spec = tuple[tuple[str, Any], ...] | None


def _spec(handler: Handler) -> _Spec:
    """(name, default) of each parameter when all are positional-or-keyword; else None."""
    params = handler.signature.parameters.values()
    if handler.upload is not None or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
        return None
    return tuple((p.name, p.default) for p in params)


def _positional(
    specs: dict[str, tuple[Handler, _Spec]], handler: Handler, kwargs: dict[str, Any]
) -> list[Any] | None:
    """Named arguments as positional ones, when that is the same call (every parameter
    positional-or-keyword, every name known, every required one given): the dispatcher's fast
    path then takes it, as for a TCP call (binding names costs ~3 us). None: leave them named
    (the dispatcher says what is wrong)."""
    known = specs.get(handler.name)
    if known is not None and known[0] is handler:
        spec = known[1]
    else:  # bounded: one per method the host serves
        spec = _spec(handler)
        specs[handler.name] = (handler, spec)
    if spec is None or len(kwargs) > len(spec):
        return None
    out = []
    used = 0
    for name, default in spec:
        value = kwargs.get(name, _MISSING)
        if value is _MISSING:
            if default is _EMPTY:
                return None
            out.append(default)
        else:
            out.append(value)
            used += 1
    return out if used == len(kwargs) else None


def install(gateway: Gateway) -> None:
    specs: dict[str, tuple[Handler, _Spec]] = {}

    async def rpc(req: HttpRequest) -> None:
        await _call(gateway, req, specs)

    gateway.routes["rpc"] = rpc


def _metadata(req: HttpRequest) -> dict[str, str | bytes] | None:
    md: dict[str, str | bytes] | None = None
    for name, value in req.scope["headers"]:
        if name.startswith(_META):
            key = name[len(_META) :].decode("latin-1")
        elif name in _TRACE:
            key = name.decode("latin-1")
        else:
            continue
        if md is None:
            md = {}
        if key.endswith("-bin"):
            try:
                md[key] = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise HttpProblem(
                    ErrorCode.DECODE_ERROR, f"header {name.decode('latin-1')}: not base64"
                ) from None
        else:
            try:
                md[key] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise HttpProblem(
                    ErrorCode.DECODE_ERROR, f"header {name.decode('latin-1')}: not UTF-8"
                ) from None
    if md is not None:
        problem = check_metadata(md)
        if problem is not None:
            raise HttpProblem(ErrorCode.BAD_ARGUMENTS, f"metadata: {problem}")
    return md


def _budget(req: HttpRequest) -> int | None:
    raw = req.header(_TIMEOUT)
    if raw is None:
        return None
    ms = int(raw) if raw.isdigit() else -1  # (digits only: int() also takes "+5", "5_0")
    if not 0 <= ms <= _MAX_BUDGET_MS:
        raise HttpProblem(
            ErrorCode.DECODE_ERROR,
            f"Sockstack-Timeout-Ms is milliseconds, 0 to {_MAX_BUDGET_MS}",
        )
    return ms


def _query_arguments(req: HttpRequest, handler: Handler) -> dict[str, Any]:
    """GET's query as keyword arguments: text for a parameter declared ``str``, else the value
    read as JSON (``?n=5`` is 5, ``?tags=["a"]`` a list) and as text when it is not JSON.
    With a secret, ``access_token`` is the credential (taken by the gateway), not an
    argument."""
    params = handler.signature.parameters
    out: dict[str, Any] = {}
    token = req.gateway.has_secret  # then ?access_token= is the credential, not an argument
    for key, text in req.query():
        if token and key == "access_token":
            continue
        if key in out:
            raise HttpProblem(ErrorCode.BAD_ARGUMENTS, f"argument {key!r} given twice")
        p = params.get(key)
        if p is not None and p.annotation in (str, "str"):
            out[key] = text
            continue
        out[key] = json_or_text(text, f"argument {key!r}")
    return out


def _trailers(ctx: CallContext | None) -> list[tuple[bytes, bytes]]:
    if ctx is None or not ctx.trailers:
        return []
    out = []
    for key, value in ctx.trailers.items():
        if isinstance(value, bytes):
            if not key.endswith("-bin"):
                key += "-bin"
            v = base64.b64encode(value)
        else:
            v = value.encode("utf-8")
        out.append((b"sockstack-trailer-" + key.encode("latin-1"), v))
    return out


async def _call(
    gateway: Gateway, req: HttpRequest, specs: dict[str, tuple[Handler, _Spec]]
) -> None:
    host = gateway.host
    assert host is not None
    name = req.path[5:]
    handler = host.dispatcher.handlers.get(name)
    if handler is None:
        raise HttpProblem(ErrorCode.UNKNOWN_METHOD, f"no method {name!r}")
    method = req.method
    size = 0
    if method == "POST":
        limits = gateway.limits
        data = await req.body(limits.max_body, limits.body_timeout)
        size = len(data)
        value = req.json_body(data)
        if value is None:
            args: list[Any] = []
            kwargs: dict[str, Any] = {}
        elif type(value) is dict:
            positional = _positional(specs, handler, value)
            if positional is None:
                args, kwargs = [], value
            else:
                args, kwargs = positional, {}
        elif type(value) is list:
            args, kwargs = value, {}
        else:
            raise HttpProblem(
                ErrorCode.BAD_ARGUMENTS,
                "send the arguments as a JSON object (by name) or array (by position)",
            )
    elif method in ("GET", "HEAD") and handler.readonly:
        args, kwargs = [], _query_arguments(req, handler)
    else:
        raise not_allowed(req, _GET_POST if handler.readonly else _POST)
    call = Request(
        next(_ids),
        name,
        args,
        kwargs,
        JSON.id,
        _budget(req),
        _metadata(req),
        stream=bool(handler.streaming),
        size=size,
    )
    if handler.streaming:
        await _stream(gateway, req, call)
        return
    outcome, ctx = await host.call(call, "http", req.peer)
    ok, value = outcome
    if ok:
        try:
            body = _encode(value)
        except CodecError as exc:
            log.warning("method %r: %s", name, exc)
            raise HttpProblem(ErrorCode.RESULT_NOT_ENCODABLE, str(exc)) from None
        await req.respond(200, body, JSON_TYPE, _trailers(ctx))
        return
    code, type_name, message = value
    raise HttpProblem(code, message, type_name=type_name, headers=_trailers(ctx))


class _HttpItems:
    """A streamed call's items for an HTTP response (the host's ``ItemSink``): encoded as
    NDJSON lines or SSE events, queued up to a window of bytes that the writer task frees as
    it sends (a client that reads slowly slows the method, as CREDIT does over TCP)."""

    def __init__(self, sse: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.sse = sse
        self.loop = loop
        self.queued: list[bytes] = []
        self.size = 0
        self.event = asyncio.Event()
        self.room_waiter: asyncio.Future[None] | None = None

    def room(self) -> int:
        return _STREAM_WINDOW - self.size

    async def wait_room(self) -> None:
        while self.size >= _STREAM_WINDOW:
            waiter = self.room_waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self.room_waiter = None

    def encode(self, item: Any) -> bytes:
        data = _encode(item)
        if self.sse:
            return b"event: item\ndata: " + data + b"\n\n"
        return b'{"item":' + data + b"}\n"

    def push(self, frame: bytes) -> None:
        self.queued.append(frame)
        self.size += len(frame)
        self.event.set()

    def push_threadsafe(self, frame: bytes) -> None:
        self.loop.call_soon_threadsafe(self.push, frame)

    def take(self) -> bytes:
        data = b"".join(self.queued)
        self.queued.clear()
        self.size = 0
        self.event.clear()
        waiter = self.room_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return data


async def _gone(req: HttpRequest) -> None:
    """Returns when the client has disconnected (a body not read yet is discarded)."""
    while (await req.receive())["type"] != "http.disconnect":
        pass  # bounded: the rest of a body, bounded by max_body, then only the disconnect


async def _stream(gateway: Gateway, req: HttpRequest, call: Request) -> None:
    accept = req.header(b"accept") or b""
    sse = b"text/event-stream" in accept
    host = gateway.host
    assert host is not None
    items = _HttpItems(sse, asyncio.get_running_loop())
    running = asyncio.ensure_future(host.call(call, "http", req.peer, stream=items))
    gone = asyncio.ensure_future(_gone(req))
    send = req.send
    try:
        # The first item or the outcome, whichever comes first: an error before any item is
        # answered with its status, as for a call that does not stream.
        waiting = asyncio.ensure_future(items.event.wait())
        await asyncio.wait((running, waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if gone.done():
            return  # nobody to answer (finally stops the method)
        if running.done() and not items.queued:
            outcome, ctx = running.result()
            if not outcome[0]:
                code, type_name, message = outcome[1]
                raise HttpProblem(code, message, type_name=type_name, headers=_trailers(ctx))
        ctype = b"text/event-stream" if sse else b"application/x-ndjson"
        await req.start(200, [(b"content-type", ctype), (b"cache-control", b"no-store")])
        while not gone.done():
            if items.queued:
                await send({"type": "http.response.body", "body": items.take(), "more_body": True})
                continue
            if running.done():
                break
            waiting = asyncio.ensure_future(items.event.wait())
            await asyncio.wait((running, waiting, gone), return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
        else:
            return  # the client went away
        outcome, ctx = running.result()
        if outcome[0]:
            kind, last = b"result", outcome[1]
        else:
            code, type_name, message = outcome[1]
            kind, last = b"error", problem_body(code, message, type_name=type_name)
        try:
            data = _encode(last)
        except CodecError as exc:
            kind = b"error"
            data = _encode(problem_body(ErrorCode.RESULT_NOT_ENCODABLE, str(exc)))
        if sse:
            tail = b"event: " + kind + b"\ndata: " + data + b"\n\n"
        else:
            tail = b'{"' + kind + b'":' + data + b"}\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})
    finally:
        gone.cancel()
        if not running.done():
            running.cancel()  # the client went away: stop the method (Server.call cancels it)
