"""The few HTTP pieces every route uses: one request (:class:`HttpRequest`) over the raw ASGI
``scope``/``receive``/``send``, its body read under a byte bound and a deadline, and answers
(JSON, problem details, bytes). No framework: a route is an ``async def route(req)``; the
gateway's own cost per call stays a few microseconds (docs/HTTP.md, "Speed")."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from sockstack.errors import CodecError, ErrorCode
from sockstack.gateway.problems import RETRY_AFTER, HttpProblem, problem_body, status_of
from sockstack.protocol.codecs import JSON, json_loads

STATUS_LINE = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode())
    for code, phrase in ((s.value, s.phrase) for s in HTTPStatus)
}
STATUS_LINE.update({499: b"HTTP/1.1 499 Client Closed Request\r\n"})


def _cycle(send: Any) -> Any:
    """uvicorn's request cycle behind ``send`` (its bound method), None under another server.
    (Not kept in the scope: the cycle holds the scope, and that loop of references made
    garbage for the cyclic collector at every request: its full passes stalled the loop for
    milliseconds.)"""
    cycle = getattr(send, "__self__", None)
    return cycle if type(cycle) is RequestResponseCycle else None


_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]").search

__all__ = ["HttpRequest", "Route", "loads"]


loads = json_loads
"""(The JSON codec's strict reading: no NaN, Infinity or 1e999.)"""

Route = Callable[["HttpRequest"], Awaitable[None]]
"""A route: answers one request (``await req.json(...)``, ``req.problem(...)``...)."""

JSON_TYPE = b"application/json"
PROBLEM_TYPE = b"application/problem+json"
FORM_TYPE = b"application/x-www-form-urlencoded"
_encode = JSON.encode


class HttpRequest:
    """One HTTP request as the routes see it: method, path, headers (lower-case names), query,
    the client's address, and ways to answer it once."""

    __slots__ = (
        "_headers",
        "cors",
        "counted",
        "gateway",
        "held",
        "method",
        "path",
        "peer",
        "receive",
        "scope",
        "send",
        "started",
    )

    def __init__(self, gateway: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.gateway = gateway
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        client = scope.get("client")
        self.peer = tuple(client) if client else None
        self._headers: dict[bytes, bytes] | None = None
        self.held = 0
        """Body bytes this request holds, counted in the gateway's total (``max_total_body``)
        until it is answered."""
        self.cors: list[tuple[bytes, bytes]] = []
        """Headers every answer carries (CORS, when the request's Origin is allowed)."""
        self.started = False
        self.counted = False  # in the gateway's max_in_flight (until detach())

    def detach(self) -> None:
        """A long-lived answer (an event stream) leaves ``max_in_flight``, which bounds calls:
        streams have bounds of their own (per route), and must not starve calls of slots."""
        if self.counted:
            self.counted = False
            self.gateway.in_flight -= 1

    # ---------------------------------------------------------------- reading

    @property
    def headers(self) -> dict[bytes, bytes]:
        """Headers by lower-case name (the last of repeated ones)."""
        h = self._headers
        if h is None:
            h = self._headers = dict(self.scope["headers"])
        return h

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    def query(self) -> list[tuple[str, str]]:
        qs = self.scope.get("query_string") or b""
        if not qs:
            return []
        try:
            return parse_qsl(
                qs.decode("utf-8"), keep_blank_values=True, strict_parsing=False, errors="strict"
            )
        except UnicodeDecodeError:
            raise HttpProblem(ErrorCode.DECODE_ERROR, "the query string is not UTF-8") from None

    def _hold(self, n: int) -> None:
        gw = self.gateway
        total = gw.limits.max_total_body
        if gw.body_bytes + n > total:
            raise HttpProblem(
                ErrorCode.OVERLOADED,
                f"request bodies take {gw.body_bytes} bytes of the server's {total}; try later",
            )
        gw.body_bytes += n
        self.held += n

    async def body(self, limit: int, timeout: float | None) -> bytes:
        """The whole body, refused beyond ``limit`` bytes (413, before reading it when
        Content-Length says so), beyond the gateway's ``max_total_body`` for all requests
        together (503), and after ``timeout`` seconds (408: a client trickling it)."""
        length = self.headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise HttpProblem(
                    ErrorCode.DECODE_ERROR, "Content-Length is not a number"
                ) from None
            if n > limit:
                raise HttpProblem(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"the body is {n} bytes; this server takes at most {limit}",
                )
            self._hold(n)
        else:
            n = -1
        receive = self.receive
        cycle = _cycle(self.send)
        if cycle is not None and not cycle.more_body:  # all here already (the common case)
            message = await receive()  # (returns at once: no timer needed)
            body: bytes = message.get("body", b"")
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError  # nobody to answer
            if n < 0 and len(body) > limit:
                raise HttpProblem(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"the body is over {limit} bytes, this server's bound",
                )
            if n < 0:
                self._hold(len(body))
            return body
        try:
            async with asyncio.timeout(timeout):  # (from the first byte: a body never sent)
                message = await receive()
                body = message.get("body", b"")
                if message["type"] == "http.disconnect":
                    raise asyncio.CancelledError  # nobody to answer
                if n < 0:  # chunked: counted as it comes
                    if len(body) > limit:
                        raise HttpProblem(
                            ErrorCode.PAYLOAD_TOO_LARGE,
                            f"the body is over {limit} bytes, this server's bound",
                        )
                    self._hold(len(body))
                if not message.get("more_body"):
                    return body
                parts = [body]
                size = len(body)
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise asyncio.CancelledError
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise HttpProblem(
                            ErrorCode.PAYLOAD_TOO_LARGE,
                            f"the body is over {limit} bytes, this server's bound",
                        )
                    if n < 0:
                        self._hold(len(chunk))
                    parts.append(chunk)
                    if not message.get("more_body"):
                        return b"".join(parts)
        except TimeoutError:
            raise HttpProblem(
                ErrorCode.FRAME_TIMEOUT,
                f"the body did not arrive within {timeout} s",
            ) from None

    def json_body(self, data: bytes) -> Any:
        """The body as JSON. A form (``application/x-www-form-urlencoded``) whose text starts
        with ``{`` or ``[`` is read as JSON too (``curl -d '{...}'`` sends that type), any other
        form as named fields (a JSON object of text values, each read as JSON where it is)."""
        ctype = self.headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        if ctype == FORM_TYPE:
            if data.lstrip()[:1] not in (b"{", b"["):
                return form_fields(data)
        elif ctype != JSON_TYPE and not ctype.endswith(b"+json"):
            raise HttpProblem(
                ErrorCode.UNSUPPORTED_CODEC,
                f"the body is {ctype.decode('latin-1')!r}; send application/json",
            )
        if not data:
            return None
        try:
            return loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise HttpProblem(
                ErrorCode.DECODE_ERROR, f"body is not valid UTF-8 JSON: {exc}"
            ) from None

    # ---------------------------------------------------------------- answering

    async def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send(
            {"type": "http.response.start", "status": status, "headers": [*headers, *self.cors]}
        )

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes | None = JSON_TYPE,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        cycle = _cycle(self.send)
        if (
            cycle is not None
            and not cycle.response_started
            and not cycle.disconnected
            and not cycle.flow.write_paused
            and 200 <= status
        ):
            self._respond_at_once(cycle, status, body, content_type, headers)
            return
        h = [*headers, *self.cors]
        if content_type is not None:
            h.append((b"content-type", content_type))
        if status >= 200 and status not in (204, 304):
            h.append((b"content-length", str(len(body)).encode()))
        self.started = True
        send = self.send
        await send({"type": "http.response.start", "status": status, "headers": h})
        await send({"type": "http.response.body", "body": b"" if self.method == "HEAD" else body})

    def _respond_at_once(
        self,
        cycle: Any,
        status: int,
        body: bytes,
        content_type: bytes | None,
        headers: Iterable[tuple[bytes, bytes]],
    ) -> None:
        """A whole answer in one write (uvicorn's ``send`` writes the head and the body in two
        system calls, and checks every header with two regular expressions: ~5 us of a call).
        The cycle's state is set as its ``send`` would set it. Header values that come from
        outside (trailers, keys) are checked for CR/LF as uvicorn checks them."""
        self.started = True
        parts = [STATUS_LINE[status]]
        for name, value in cycle.default_headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in headers:
            if _BAD_VALUE(value):
                raise RuntimeError("Invalid HTTP header value.")
            parts += (name, b": ", value, b"\r\n")
        for name, value in self.cors:
            parts += (name, b": ", value, b"\r\n")
        if content_type is not None:
            parts += (b"content-type: ", content_type, b"\r\n")
        if status not in (204, 304):
            parts += (b"content-length: ", b"%d" % len(body), b"\r\n")
        keep_alive = cycle.keep_alive
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if self.method != "HEAD" and status not in (204, 304):
            parts.append(body)
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        transport = cycle.transport
        transport.write(b"".join(parts))
        cycle.response_complete = True
        cycle.message_event.set()
        if not keep_alive:
            transport.close()
        cycle.on_response()

    async def json(
        self, value: Any, status: int = 200, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        try:
            body = _encode(value)
        except CodecError as exc:
            raise HttpProblem(ErrorCode.RESULT_NOT_ENCODABLE, str(exc)) from None
        await self.respond(status, body, JSON_TYPE, headers)

    async def problem(self, exc: HttpProblem) -> None:
        body = problem_body(exc.code, exc.detail, type_name=exc.type_name, extra=exc.extra)
        headers = list(exc.headers)
        retry = RETRY_AFTER.get(exc.code)
        if retry is not None:
            headers.append((b"retry-after", retry.encode()))
        if exc.code in (ErrorCode.AUTH_FAILED, ErrorCode.UNAUTHENTICATED):
            headers.append((b"www-authenticate", b'Bearer realm="sockstack"'))
        await self.respond(
            status_of(exc.code),
            json.dumps(body, separators=(",", ":")).encode(),
            PROBLEM_TYPE,
            headers,
        )


def form_fields(data: bytes) -> dict[str, Any]:
    try:
        pairs = parse_qsl(data.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HttpProblem(ErrorCode.DECODE_ERROR, "the form is not UTF-8") from None
    return {key: json_or_text(text, f"field {key!r}") for key, text in pairs}


def json_or_text(text: str, what: str) -> Any:
    """A form field's or query value's text read as JSON where it is JSON (``5``, ``[1]``),
    else the text itself; JSON nested too deep is a 400."""
    try:
        return loads(text)
    except ValueError:
        return text
    except RecursionError:
        raise HttpProblem(ErrorCode.DECODE_ERROR, f"{what}: nested too deep") from None


def allow(methods: Iterable[str]) -> list[tuple[bytes, bytes]]:
    return [(b"allow", ", ".join(methods).encode())]


def not_allowed(req: HttpRequest, methods: Iterable[str]) -> HttpProblem:
    methods = list(methods)
    return HttpProblem(
        ErrorCode.METHOD_NOT_ALLOWED,
        f"{req.path} answers {', '.join(methods)}, not {req.method}",
        headers=allow(methods),
    )
