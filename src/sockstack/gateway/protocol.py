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
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["GatewayProtocol"]


def _address(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


class GatewayProtocol(HttpToolsProtocol):
    """One HTTP connection of the gateway (``gateway`` is set on the class made per
    gateway: :meth:`Gateway._protocol_class`)."""

    gateway: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._upgraded_left: int | None = None  # body bytes still to take after an upgrade
        self._dead = False  # after an upgrade: nothing more is parsed on this connection
        self._address = _address(self.client)
        gw = self.gateway
        refused = gw.admit(self._address, transport.get_extra_info("sslcontext") is not None)
        self._counted = refused is None
        if refused is not None:
            gw.bad_log.warning("http %s: %s", self._address, refused)
            transport.abort()

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
        timeout = self.gateway.limits.header_timeout
        if timeout and self._head_timer is None:
            self._head_timer = self.loop.call_later(timeout, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.gateway.bad_log.warning("http %s: headers not complete in time", self._address)
        if not self.transport.is_closing():
            self.send_400_response("Request headers did not arrive in time.")

    def _head_grew(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.gateway.limits.max_header_bytes:
            raise _HeadTooLarge

    def on_url(self, url: bytes) -> None:
        self._head_grew(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_grew(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
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
            self.send_400_response("A chunked body cannot come with Upgrade; send it without.")
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
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except _HeadTooLarge:
            self.gateway.bad_log.warning("http %s: request headers too large", self._address)
            self._send_431()
        except httptools.HttpParserError:
            self.logger.debug("invalid HTTP request from %s", self._address)
            self.gateway.bad_log.warning("http %s: invalid HTTP request", self._address)
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as exc:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
                return
            self._dead = True
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._take_upgraded(data[offset:])

    def _send_431(self) -> None:
        limit = self.gateway.limits.max_header_bytes
        body = (
            b'{"type":"urn:sockstack:error:HEADERS_TOO_LARGE","title":"HEADERS_TOO_LARGE",'
            b'"status":431,"detail":"the request line and headers exceed '
            + str(limit).encode()
            + b' bytes","code":2033}'
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/problem+json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\nconnection: close\r\n\r\n"
            + body
        )
        self.transport.close()


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the head passed ``max_header_bytes``."""
