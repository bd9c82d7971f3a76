"""The gateway's HTTP/1.1 connection: uvicorn's httptools protocol with four things added.

- **Bounds per connection**: the request line and headers are bounded in bytes
  (``max_header_bytes``: 431, then close) and must arrive within ``header_timeout`` seconds of
  the request's first byte (slowloris: uvicorn has no such timer); connections are bounded in
  total and per client address (``max_connections``, ``max_connections_per_address``): one
  more is closed at once.
- **``Upgrade: h2c``** (curl ``--http2``, some Java clients): llhttp treats what follows the
  headers as another protocol's bytes and uvicorn then hands the app an *empty* body (uvicorn
  #2722, httptools #124). Here the upgrade is ignored as RFC 9110 §7.8 allows: the body
  (``Content-Length`` bytes) is taken from the upgraded bytes and the request is served as
  HTTP/1.1, then the connection is closed (the parser cannot read past an upgrade). A chunked
  body with an upgrade is answered 400.
- Connections are counted per transport for ``/metrics`` and the dashboard.
- A client that disconnects mid-request has its request's task cancelled, so its call stops
  (as a CANCEL does over TCP) instead of running on for nobody.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sockstack.errors import ErrorCode
from sockstack.gateway.http import STATUS_LINE
from sockstack.gateway.problems import problem_body, status_of

__all__ = ["GatewayProtocol"]

_INF = float("inf")
_SLICE = 16 << 10
"""Bytes fed to the parser at a time: it stops between slices once a request waits behind the
one in flight (pipelining), and counts the head of a request that spans reads."""
_PER_HEADER = 100
"""What one header costs in memory beyond its bytes (uvicorn's (name, value) tuple and two
bytes objects): counted against ``max_header_bytes`` so that it bounds memory, not only bytes
on the wire (64 KB of ``a:`` lines would otherwise hold ~1.2 MB)."""


def _address(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


class GatewayProtocol(HttpToolsProtocol):
    """One HTTP connection of the gateway (``gateway`` is set on the class made per
    gateway: ``Gateway._config``)."""

    gateway: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._upgraded_left: int | None = None  # body bytes still to take after an upgrade
        self._dead = False  # after an upgrade: nothing more is parsed on this connection
        self._in_head = False
        self._head_wire = 0  # bytes read while a head was incomplete (it spans reads)
        self._backlog = bytearray()  # bytes read but not parsed: requests wait (pipelining)
        self._refusal: tuple[int, str] | None = None  # answered after those in flight
        self._lingering = -1  # after an answer given before its body: body bytes dropped
        self._address = _address(self.client)
        gw = self.gateway
        refused = gw.admit(self._address, transport.get_extra_info("sslcontext") is not None)
        self._counted = refused is None
        if refused is not None:
            gw.bad_log.warning("http %s: %s", self._address, refused)
            transport.abort()
            return
        # One timer per connection, not per request (a timer armed and cancelled per request
        # cost ~2.5 us of each): it checks the head deadline and the keep-alive idle time
        # against _mark, and re-arms itself for the next deadline. The first head is timed
        # from the connection (a client that sends nothing).
        self._mark = self.loop.time()
        self._in_head = True
        self._arm(self._deadline() - self._mark)

    def _deadline(self) -> float:
        """When this connection must have moved on: its head complete, or (idle between
        requests) a new request begun; ``inf`` while a request is being answered."""
        limits: Any = self.gateway.limits
        head: float = limits.header_timeout
        if self._in_head:
            return self._mark + head if head else _INF
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.pipeline:
            return self._mark + float(limits.keep_alive)
        return _INF

    def _arm(self, delay: float) -> None:
        limits = self.gateway.limits
        step = max(limits.header_timeout or 0.0, limits.keep_alive, 0.05)
        self._head_timer = self.loop.call_later(min(max(delay, 0.0), step), self._check)

    def _check(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        deadline = self._deadline()
        if now < deadline:
            self._arm(deadline - now)
        elif self._in_head:
            self._head_too_slow()
        else:  # idle on keep-alive
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The client left mid-request: stop its work (a call is cancelled as by CANCEL).
            # The app marks the scope with its task and ends quietly when "gone" is set.
            scope: Any = cycle.scope
            task = scope.get("sockstack.task")
            if task is not None and not task.done():
                scope["sockstack.gone"] = True
                task.cancel()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._counted:
            self._counted = False
            self.gateway.release(self._address, self.scheme == "https")
        super().connection_lost(exc)

    # ---------------------------------------------------------------- bounds on the head

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_wire = 0
        if not self._in_head:  # (the first head is timed from the connection)
            self._mark = self.loop.time()  # (the connection's timer checks the deadline)
        self._in_head = True

    def _head_too_slow(self) -> None:
        self.gateway.bad_log.warning("http %s: headers not complete in time", self._address)
        if not self.transport.is_closing():
            self._refuse(ErrorCode.FRAME_TIMEOUT, "the request's headers did not arrive in time")

    def _head_grew(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.gateway.limits.max_header_bytes:
            raise _HeadTooLarge

    def on_url(self, url: bytes) -> None:
        self._head_grew(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_grew(len(name) + len(value) + _PER_HEADER)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        if self.parser.should_upgrade() and not self._should_upgrade():
            self._ignore_upgrade()

    # ---------------------------------------------------------------- Upgrade: h2c

    def _ignore_upgrade(self) -> None:
        """Serve the request as HTTP/1.1: its body follows as "upgraded" bytes."""
        cycle = self.cycle
        cycle.keep_alive = False  # the parser stops at an upgrade: close after this answer
        length = b""
        chunked = False
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked or not length.strip().isdigit():
            self._upgraded_left = None if not chunked else -1
            return
        self._upgraded_left = int(length)

    def on_message_complete(self) -> None:
        if self._upgraded_left:  # not complete: the body is in the upgraded bytes
            return
        super().on_message_complete()

    def _take_upgraded(self, data: bytes) -> None:
        left = self._upgraded_left
        cycle = self.cycle
        if left is None or cycle is None or cycle.response_complete:
            return
        if left < 0:
            self._upgraded_left = None
            self._refuse(ErrorCode.DECODE_ERROR, "a chunked body cannot come with Upgrade")
            return
        part = data[:left]
        cycle.body += part
        left -= len(part)
        self._upgraded_left = left
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        if not left:
            self._upgraded_left = None
            cycle.more_body = False
        cycle.message_event.set()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            self._take_upgraded(data)
            return
        if self._lingering >= 0:  # an unread body after its answer: dropped, bounded
            self._lingering += len(data)
            if self._lingering > self.gateway.limits.max_body:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._backlog or self._refusal is not None:  # requests wait: keep the bytes raw
            if self._refusal is None:
                self._backlog += data
            self.flow.pause_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes | memoryview) -> None:
        """Parse ``data`` a slice at a time: no further once a request waits behind the one in
        flight (the rest kept raw, reading paused), and with a head that spans reads counted
        in wire bytes (httptools holds a header until it ends, unseen by ``on_header``)."""
        view = memoryview(data)
        limit = self.gateway.limits.max_header_bytes
        while view:
            if self.pipeline:
                self._backlog = bytearray(view)
                self.flow.pause_reading()
                return
            part, view = view[:_SLICE], view[_SLICE:]
            if self._in_head:
                self._head_wire += len(part)
            try:
                self.parser.feed_data(part)
                if self._in_head and self._head_wire > limit:
                    raise _HeadTooLarge
            except _HeadTooLarge:
                self._head_too_large()
                return
            except httptools.HttpParserUpgrade as exc:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                    return
                self._dead = True
                offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(part)
                self._take_upgraded(bytes(part[offset:]) + bytes(view))
                return
            except httptools.HttpParserError as exc:
                if isinstance(exc.__context__, _HeadTooLarge):  # (raised in a callback)
                    self._head_too_large()
                    return
                self.logger.debug("invalid HTTP request from %s", self._address)
                self.gateway.bad_log.warning("http %s: invalid HTTP request", self._address)
                self._refuse(ErrorCode.DECODE_ERROR, "invalid HTTP request")
                return

    def _head_too_large(self) -> None:
        self.gateway.bad_log.warning("http %s: request headers too large", self._address)
        limit = self.gateway.limits.max_header_bytes
        self._refuse(
            ErrorCode.HEADERS_TOO_LARGE, f"the request line and headers exceed {limit} bytes"
        )

    def on_response_complete(self) -> None:
        cycle = self.cycle
        unread = cycle is not None and cycle.more_body and not self.pipeline
        # uvicorn's, without its keep-alive timer per response (the connection's timer does it)
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        self._mark = self.loop.time()
        if self.pipeline:
            next_cycle, app = self.pipeline.pop()
            self._start_asgi_task(next_cycle, app)
        if unread:  # answered before its body was read: the rest is dropped, the connection ends
            self._unset_keepalive_if_required()
            self._lingering = 0
            if self.transport.can_write_eof():
                self.transport.write_eof()  # (the answer, then EOF: a close now could reset it)
            self.loop.call_later(min(1.0, self.gateway.limits.keep_alive), self.transport.close)
            return
        if self.pipeline:
            self.flow.pause_reading()
        elif self._refusal is not None:
            self._refuse(*self._refusal)
        elif self._backlog:
            self.loop.call_soon(self._resume_backlog)

    def _resume_backlog(self) -> None:
        if self.transport.is_closing() or self.pipeline or self._dead:
            return
        data, self._backlog = bytes(self._backlog), bytearray()
        self.flow.resume_reading()
        self._feed(data)

    def send_400_response(self, msg: str) -> None:
        self._refuse(ErrorCode.DECODE_ERROR, msg)

    def _refuse(self, code: int, detail: str) -> None:
        """Answer a problem below the routes, then close; after the answers of the requests
        already in flight (a pipelined bad request does not take a good one's answer)."""
        cycle = self.cycle
        waiting = cycle is not None and not cycle.response_complete and not cycle.more_body
        if waiting or self.pipeline:
            if self._refusal is None:
                self._refusal = (code, detail)
                self.flow.pause_reading()
            return
        self._refusal = None
        status = status_of(code)
        body = json.dumps(problem_body(code, detail), separators=(",", ":")).encode()
        self.transport.write(
            STATUS_LINE[status] + b"content-type: application/problem+json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
        )
        self.transport.close()


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the head passed ``max_header_bytes``."""
