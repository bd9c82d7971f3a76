"""asyncio stream adapter: moves bytes between a TCP transport and a sans-I/O :class:`Connection`.

:class:`StreamProtocol` owns everything that is the same for every pattern on a stream: the core,
its timers (handshake timeout, keepalive) driven by the loop's clock, one ``write`` per batch of
output, flow control (``pause_writing``), and logging each protocol violation once. Subclasses
(the RPC server and client, later the pub/sub broker) implement only ``handle_events``.

asyncio's Protocol API was chosen over streams because it hands us whole ``data_received``
chunks with no extra buffering or task switch per message: twice the round trips of streams on
the standard loop (bench/transport_choice.py, figures in the README).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sockstack.asyncio.timer import CoreTimer
from sockstack.errors import ErrorCode
from sockstack.protocol.connection import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_KEEPALIVE_TIMEOUT,
    Connection,
    ProtocolViolation,
)
from sockstack.protocol.events import Event, Role
from sockstack.protocol.frames import DEFAULT_MAX_FRAME
from sockstack.protocol.messages import MIN_MAX_FRAME
from sockstack.transport.ratelog import RateLimitedLog
from sockstack.transport.urls import format_peer

__all__ = ["StreamLimits", "StreamProtocol", "format_peer"]  # format_peer: re-exported

log = logging.getLogger("sockstack.transport")

LINGER = 2.0
"""Seconds a connection closed for misbehaving gets to read its CLOSE before it is cut off."""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per-connection limits of a stream endpoint; every field is documented in the README."""

    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT
    keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    write_high_water: int = 64 * 1024
    """Bytes buffered in the transport before ``pause_writing``: the server then stops reading
    that connection until the peer catches up."""
    max_outbound: int = 8 << 20
    """Hard bound on a connection's unsent bytes (answers the peer does not read). Above it, and
    above twice ``max_frame``, the connection is reset: the answers still queued are lost."""
    frame_timeout: float | None = 30.0
    """Seconds a frame may take to arrive once its first byte has: a peer trickling a large
    frame a byte at a time holds its buffer at most this long (CLOSE FRAME_TIMEOUT). None: no
    bound."""

    def __post_init__(self) -> None:
        if self.max_frame < MIN_MAX_FRAME:  # refused here, not on every connection
            raise ValueError(
                f"max_frame {self.max_frame} is below the protocol's minimum of {MIN_MAX_FRAME}"
            )


class _PlainLog:
    @staticmethod
    def warning(msg: str, *args: Any) -> bool:
        log.warning(msg, *args)
        return True


_plain = _PlainLog()


class StreamProtocol(asyncio.Protocol):
    """Base adapter between one stream transport and one :class:`Connection` core."""

    role: Role = Role.SERVER

    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.limits = limits or StreamLimits()
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.core: Connection | None = None
        self.peer = "?"
        self._timer = CoreTimer(self.loop, self._on_timer)
        self._rx = 0  # bytes received through receive_data (offsets of unfinished frames)
        self._held = 0  # bytes of an unfinished frame held by the core, as last seen
        self._partial_start = -1
        self._partial_timer: asyncio.TimerHandle | None = None
        self._cut = False  # close_now ran: reading stopped, the connection is on its way out
        self._timer_state: object = None
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.closed = self.loop.create_future()
        self.bad_log: RateLimitedLog | None = None  # shared by a server's connections
        self._outbound_limit = max(self.limits.max_outbound, 2 * self.limits.max_frame)

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = format_peer(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Requests are small and latency-bound: never wait for Nagle's coalescing.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=self.limits.write_high_water)
        lim = self.limits
        self.core = Connection(
            self.role,
            now=self.loop.time(),
            max_frame=lim.max_frame,
            handshake_timeout=lim.handshake_timeout,
            keepalive_interval=lim.keepalive_interval,
            keepalive_timeout=lim.keepalive_timeout,
            **self.core_options(),
        )
        self.on_open()
        self.flush()
        self.arm_timer()

    def core_options(self) -> dict[str, Any]:
        return {}

    def on_open(self) -> None:
        """Hook: the transport is up and the core exists (the client's HELLO is queued)."""

    def data_received(self, data: bytes) -> None:
        core = self.core
        assert core is not None
        events = core.receive_data(data)
        if events:
            self.handle_events(events)
        self.track_partial(len(data))
        self.flush()
        if core.state is not self._timer_state:  # handshake done, or closing: timers change
            self.arm_timer()

    # ---------------------------------------------------------------- unfinished frames

    def track_partial(self, n: int) -> None:
        """After a read of ``n`` bytes went through ``receive_data``: note an unfinished frame
        (where it started, when), so that it must arrive whole within ``frame_timeout``, and
        report the bytes it holds (:meth:`partial_changed`). A read that ``receive_single``
        took whole leaves nothing unfinished, so the fast path needs no call here."""
        core = self.core
        assert core is not None
        if self._cut:
            return  # closed for misbehaving (close_now): nothing it sends counts any more
        self._rx += n
        held = core.buffered
        if held != self._held:
            self.partial_changed(held - self._held)
            self._held = held
        if not held:
            self._partial_start = -1
            return
        start = self._rx - held  # stream offset of the unfinished frame
        if start != self._partial_start:  # a new frame: its clock starts now
            self._partial_start = start
            timeout = self.limits.frame_timeout
            if timeout is not None:
                if self._partial_timer is not None:
                    self._partial_timer.cancel()
                self._partial_timer = self.loop.call_later(timeout, self._partial_expired, start)

    def partial_changed(self, delta: int) -> None:
        """Hook: the bytes this connection holds for an unfinished frame changed by ``delta``."""

    def _partial_expired(self, start: int) -> None:
        self._partial_timer = None
        core = self.core
        if core is None or start != self._partial_start or not core.buffered:
            return  # that frame arrived meanwhile
        (self.bad_log or _plain).warning(
            "%s %s: a frame of which %d bytes arrived was not whole after %g s [%s]",
            self.role.value,
            self.peer,
            core.buffered,
            self.limits.frame_timeout,
            ErrorCode.describe(ErrorCode.FRAME_TIMEOUT),
        )
        self.close_now(ErrorCode.FRAME_TIMEOUT, "frame not received in time")

    def close_now(self, code: int, reason: str) -> None:
        """CLOSE ``code``, stop reading and let go of the unfinished frame's bytes at once, then
        cut the connection after ``LINGER`` seconds (a peer that trickles or floods would not
        read an orderly close in time; closing at once would reset the CLOSE away)."""
        core, transport = self.core, self.transport
        if transport is None or transport.is_closing():
            return
        if self._held:
            self.partial_changed(-self._held)  # counted as freed now: the peer gets no more in
            self._held = 0
        self._partial_start = -1
        self._cut = True
        transport.pause_reading()
        if core is not None:
            core.send_close(code, reason)
            data = core.data_to_send()
            if data:
                transport.write(data)
        if transport.can_write_eof():
            transport.write_eof()  # CLOSE, then FIN: the peer reads both before any reset
        self.loop.call_later(LINGER, transport.abort)

    def eof_received(self) -> bool | None:
        assert self.core is not None
        events = self.core.receive_eof()
        if events:
            self.handle_events(events)
        return False  # let asyncio close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.close()
        if self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None
        if self._held:
            self.partial_changed(-self._held)
            self._held = 0
        if self.core is not None:
            events = self.core.receive_eof()
            if events:
                self.handle_events(events)
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters.clear()
        self.on_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def on_lost(self, exc: Exception | None) -> None:
        """Hook: the transport is gone."""

    def pause_writing(self) -> None:
        self.write_paused = True

    def check_outbound(self) -> bool:
        """After a write while paused: reset the connection if its unsent bytes are above the
        hard bound (the peer does not read). True when the connection was reset."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        size = transport.get_write_buffer_size()
        if size <= self._outbound_limit:
            return False
        (self.bad_log or _plain).warning(
            "%s %s: %d bytes unsent (limit %d): the peer does not read; connection reset",
            self.role.value,
            self.peer,
            size,
            self._outbound_limit,
        )
        transport.abort()
        return True

    def resume_writing(self) -> None:
        self.write_paused = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    async def wait_drained(self) -> None:
        """Return once the transport's write buffer is below its high-water mark."""
        if not self.write_paused:
            return
        fut = self.loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    # ---------------------------------------------------------------- core plumbing

    def handle_events(self, events: Sequence[Event]) -> None:
        """Override: react to the core's events. Call super() for violations' logging."""
        for ev in events:
            if type(ev) is ProtocolViolation:
                self.log_violation(ev)

    def log_violation(self, ev: ProtocolViolation) -> None:
        (self.bad_log or _plain).warning(
            "%s %s: %s [%s]%s",
            self.role.value,
            self.peer,
            ev.message,
            ErrorCode.describe(ev.code),
            "; connection closed" if ev.fatal else "",
        )

    def flush(self) -> None:
        """Write what the core queued (one write per batch) and close when the core says so."""
        core = self.core
        transport = self.transport
        if core is None or transport is None:
            return
        data = core.data_to_send()
        if data and not transport.is_closing():
            transport.write(data)
            if self.write_paused and self.check_outbound():
                return
        if core.close_expected() and not transport.is_closing():
            transport.close()

    def arm_timer(self) -> None:
        core = self.core
        if core is None:
            return
        self._timer_state = core.state
        self._timer.set(core.next_timer(self.loop.time()))

    def _on_timer(self) -> None:
        core = self.core
        if core is None:
            return
        events = core.handle_timer(self.loop.time())
        if events:
            self.handle_events(events)
        self.flush()
        self.arm_timer()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
