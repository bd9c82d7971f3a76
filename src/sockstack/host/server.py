"""The host: one server for every pattern, on any mix of TCP, TLS and UDP endpoints.

::

    server = Server(patterns=[RPC(Calculator()), PubSub()], tcp=["127.0.0.1:5050"],
                    udp=["127.0.0.1:5051"])
    await server.start()            # binds; server.endpoints has the real ports (port 0 works)
    await server.serve_forever()    # until shutdown() — SIGINT/SIGTERM call it in `sockstack serve`

``Server(service)`` and ``Server(service, broker=True)`` are shorthands for
``patterns=[RPC(service)]`` and ``[RPC(service), PubSub()]``.

The host owns what every pattern shares: endpoints, the handshake and authentication (the
secret is checked before anything else is parsed), limits, backpressure, one dispatcher for the
methods every pattern serves (REQUEST), drain and shutdown. Messages of a pattern's own types
are routed to it (:mod:`sockstack.host.pattern`); the host imports no pattern.

Each call is dispatched in its :class:`~sockstack.rpc.context.CallContext` (``current_context()``
inside the method; built lazily from the event loop thread's
:class:`~sockstack.rpc.context.LazyContext` holder, filled in place around each call, for a
method answered at once, which seldom asks for it): a REQUEST whose DEADLINE budget is 0 is refused
(DEADLINE_EXCEEDED) without running; an async or threaded method still running at its deadline,
or named by a CANCEL, is stopped (an async method's task is cancelled; a threaded method's
context is marked, and if it still waits for a worker it never runs) and answered
DEADLINE_EXCEEDED or CANCELLED (PROTOCOL.md §4). Trailers the method set go back with its answer.

Shutdown stops accepting, answers every request already accepted (up to ``drain_timeout``),
refuses new ones with SHUTTING_DOWN, cancels the methods still running on the loop (the server
keeps every task it starts, and awaits the cancelled ones up to ``close_timeout``; a threaded
method's thread cannot be stopped, its answer is dropped), then closes each connection with
CLOSE GOING_AWAY. A stopped server leaves no task of its own pending.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sockstack.asyncio.datagram import DatagramEndpoint
from sockstack.asyncio.stream import StreamLimits, StreamProtocol
from sockstack.errors import CodecError, ErrorCode, LocalProtocolError
from sockstack.host.dispatch import DEFAULT_MAX_WORKERS, Dispatcher, Handler, Outcome
from sockstack.host.pattern import Pattern
from sockstack.host.workers import READY_FD_ENV, report_ready
from sockstack.protocol.auth import (
    DEFAULT_REPLAY_WINDOW,
    TRAILER_SIZE,
    AuthFailure,
    DatagramAuth,
    EpochMismatch,
    token_checker,
)
from sockstack.protocol.calls import CURRENT_CALL
from sockstack.protocol.codecs import CODECS
from sockstack.protocol.connection import State
from sockstack.protocol.datagram import (
    DEFAULT_MAX_DATAGRAM,
    DEFAULT_REPLY_CACHE_BYTES,
    DEFAULT_REPLY_CACHE_ENTRIES,
    DEFAULT_REPLY_WINDOW,
    DatagramServer,
    ReplyCache,
)
from sockstack.protocol.events import (
    BadItem,
    Cancel,
    ConnectionTerminated,
    Credit,
    Event,
    HandshakeComplete,
    Item,
    PatternMessage,
    ProtocolViolation,
    Request,
    Role,
)
from sockstack.protocol.frames import (
    HEADER_SIZE,
    MessageType,
    encode_frame,
    peek_request_id,
    peek_type,
)
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    FEATURES,
    STREAM_WINDOW,
    encode_batch_answer,
    encode_close,
    encode_error,
)
from sockstack.protocol.registry import Registry
from sockstack.rpc.context import CallAborted, CallContext, LazyContext, inline_holder
from sockstack.transport.ratelog import RateLimitedLog
from sockstack.transport.secret import normalize_secret
from sockstack.transport.urls import Endpoint, format_peer, is_loopback_host, parse_endpoint

__all__ = ["Server", "ServerLimits", "refuse_unprotected", "serve"]


def _decrement(counts: dict[str, int], key: str) -> None:
    """One less for ``key``; the entry goes at zero (the table holds live addresses only)."""
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


_clock = time.perf_counter
_monotonic = time.monotonic
_set_call = CURRENT_CALL.set
_reset_call = CURRENT_CALL.reset
_LATE: Outcome = (
    False,
    (
        ErrorCode.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
        "the call arrived with no time left (budget 0 ms); it did not run",
    ),
)
_SHUTTING_DOWN: Outcome = (
    False,
    (ErrorCode.SHUTTING_DOWN, "SHUTTING_DOWN", "server is shutting down"),
)


_ABANDONED: Outcome = (
    False,
    (
        ErrorCode.ABANDONED,
        "ABANDONED",
        "the server stopped before the call finished (it ran past the drain timeout)",
    ),
)


_STOPPED: dict[int, str] = {
    ErrorCode.WINDOW_EXCEEDED: "the client sent items beyond the upload's flow-control window "
    f"of {STREAM_WINDOW} bytes; the call was stopped and its items dropped",
    ErrorCode.DECODE_ERROR: "an item of the upload could not be decoded; the call was stopped",
}


def _aborted(code: int) -> Outcome:
    """The answer of a call stopped by its deadline, by its client's CANCEL, or (an upload) by
    an item that broke the window or could not be read (DECODE_ERROR, UNSUPPORTED_CODEC)."""
    if code == ErrorCode.CANCELLED:
        return False, (code, "CANCELLED", "the call was cancelled by the client")
    if code == ErrorCode.DEADLINE_EXCEEDED:
        return False, (code, "DEADLINE_EXCEEDED", "the call's deadline passed; it did not finish")
    message = _STOPPED.get(code, "an item of the upload could not be read; the call was stopped")
    return False, (code, ErrorCode.describe(code).split(" (")[0], message)


def _context(req: Request, transport: str, peer: Any) -> CallContext | None:
    """The context of a request about to be dispatched; None when it is already late."""
    budget = req.budget_ms
    if budget is None:
        return CallContext(req.method, req.request_id, transport, peer, req.metadata)
    if not budget:
        return None
    deadline = _monotonic() + budget / 1000.0
    return CallContext(req.method, req.request_id, transport, peer, req.metadata, deadline)


def _trailers(req: Request, ctx: CallContext | None) -> dict[str, str | bytes] | None:
    """The trailers to send: the method's, to a client that sent DEADLINE or METADATA (one that
    sends neither may not read them: PROTOCOL.md §4)."""
    if ctx is None or (req.budget_ms is None and req.metadata is None):
        return None
    return ctx.trailers


class _Run:
    """A method running on the loop (async) or in a worker (threaded), which its deadline or a
    CANCEL may stop: its context, its task, and the timer of its deadline."""

    __slots__ = ("ctx", "started", "task", "timer")

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.started = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = self.ctx.deadline
        if deadline is not None:
            self.timer = loop.call_later(
                max(deadline - _monotonic(), 0.0), self.abort, ErrorCode.DEADLINE_EXCEEDED
            )

    def abort(self, code: int) -> None:
        """Stop it: an async method is cancelled, a threaded one's context marked (and, if it
        waits for a worker still, it will not run); its answer is ERROR ``code``."""
        ctx = self.ctx
        if ctx.abort_code:
            return
        ctx.aborted(code)  # (its hooks: a threaded method's wait for a callback ends)
        if ctx.upload is not None:
            ctx.upload.close()  # a method waiting for an item wakes up and stops
        task = self.task
        if self.started and task is not None and not task.done():
            task.cancel()  # not started yet: it sees abort_code first and does not run

    async def outcome(self, pending: Awaitable[Outcome]) -> Outcome:
        """Await the method unless stopped; the outcome to answer with."""
        self.started = True
        ctx = self.ctx
        try:
            if not ctx.abort_code:
                try:
                    return_value = await pending
                except asyncio.CancelledError:
                    if not ctx.abort_code:
                        raise  # the server's shutdown, not ours
                else:
                    if not ctx.abort_code:
                        return return_value
            elif inspect.iscoroutine(pending):
                pending.close()  # stopped before it started: it never runs
        finally:
            if self.timer is not None:
                self.timer.cancel()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()
        return _aborted(ctx.abort_code)


StreamRoute = Callable[[Any, Any], None]
"""A pattern's ``stream_message``, called with (connection, message) for its message classes."""

_SOON_BATCH = 16 << 10  # bytes a pattern queues for a peer before they are written at once

log = logging.getLogger("sockstack.server")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Every limit of a server, with its default (README "Limits")."""

    stream: StreamLimits = StreamLimits()  # noqa: RUF009 (frozen, so sharing it is safe)
    max_in_flight: int = 1024
    """Requests running at once per TCP connection; above it the server stops reading that
    connection (backpressure) instead of queueing without bound. Uploads are not counted (their
    items must still be read): they have their own bound, ``max_uploads``."""
    max_in_flight_bytes: int = 32 << 20
    """Bytes of the requests running at once on one TCP connection (their frames' sizes, meta +
    body): above it the server stops reading that connection, as for ``max_in_flight``, until
    they are below half. Uploads are not counted (``max_uploads`` bounds them)."""
    max_total_in_flight_bytes: int = 512 << 20
    """The same over all TCP connections together: a connection whose request takes the total
    above it stops being read until the total is below half (every connection paused so is
    resumed then). The requests' decoded arguments take more memory than their bytes (Python
    objects: up to tens of times for many tiny values)."""
    max_uploads: int = 16
    """Uploads (PROTOCOL.md §4.4) in flight at once per TCP connection: each may queue up to its
    window plus one item, so a connection's uploads hold at most 16 x (256 KiB + a frame).
    One more is answered with ERROR OVERLOADED and does not run."""
    max_total_uploads: int = 256
    """Uploads in flight at once over all connections (so at most 256 x (256 KiB + a frame)
    queued in all); one more is answered with ERROR OVERLOADED and does not run."""
    max_datagram: int = DEFAULT_MAX_DATAGRAM
    reply_window: float = DEFAULT_REPLY_WINDOW
    reply_cache_entries: int = DEFAULT_REPLY_CACHE_ENTRIES
    reply_cache_bytes: int = DEFAULT_REPLY_CACHE_BYTES
    drain_timeout: float = 10.0
    close_timeout: float = 2.0
    backlog: int = 100
    max_workers: int = DEFAULT_MAX_WORKERS
    replay_window: float = DEFAULT_REPLAY_WINDOW
    """With a secret: seconds a sealed datagram is valid either side of this server's clock."""
    max_udp_in_flight: int = 1024
    """Requests running at once per UDP endpoint (threaded and async methods); more are
    answered with ERROR OVERLOADED and do not run."""
    max_connections: int = 10_000
    """TCP connections open at once; one more is answered with CLOSE TOO_MANY_CONNECTIONS and
    closed. (The process's file descriptor limit applies too: ``ulimit -n``.)"""
    max_connections_per_address: int = 1_000
    """TCP connections open at once from one IP address (a tenth of ``max_connections``): one
    client cannot take every slot. One more gets CLOSE TOO_MANY_CONNECTIONS."""
    work_slice: float = 0.02
    """Seconds of work on one read's events (a burst of PUBs fanned out to many subscribers)
    before the rest waits a loop turn with that connection's reading paused: other connections
    are served in between, and the busy peer is slowed by TCP backpressure."""
    max_partial_bytes: int = 256 << 20
    """Bytes held for unfinished frames (begun, not yet whole) over all connections: a
    connection whose frame would take the total beyond it gets CLOSE BUSY. Each connection holds
    at most ``stream.max_frame`` and for at most ``stream.frame_timeout`` seconds."""
    max_handshakes_per_address: int = 64
    """Connections from one IP address that have not completed the HELLO handshake yet (each
    is closed at ``handshake_timeout`` anyway): a slowloris from one address holds at most this
    many. One more gets CLOSE TOO_MANY_CONNECTIONS."""


class _ItemOut:
    """One streamed call's items on a connection (the host's ``ItemSink``): ITEMs are queued
    in the session in order, their body bytes counted against the window (STREAM_WINDOW) until
    CREDITs grant them back; the pump waits for room. Items from a worker thread are handed
    over in batches (one loop wake-up per batch)."""

    __slots__ = (
        "_lock",
        "_pending",
        "_scheduled",
        "codec",
        "conn",
        "core",
        "rid",
        "unacked",
        "waiter",
    )

    def __init__(self, conn: _HostStream, rid: int, codec: int) -> None:
        self.conn = conn
        core = conn.core
        assert core is not None
        self.core = core  # kept: a worker may encode after the connection is gone
        self.rid = rid
        self.codec = CODECS[codec]
        self.unacked = 0
        self.waiter: asyncio.Future[None] | None = None
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._scheduled = False

    def room(self) -> int:
        return STREAM_WINDOW - self.unacked

    async def wait_room(self) -> None:
        while self.unacked >= STREAM_WINDOW:
            waiter = self.waiter = self.conn.loop.create_future()
            try:
                await waiter
            finally:
                self.waiter = None

    def credit(self, granted: int) -> None:
        # Never below 0: a CREDIT cannot grant bytes that were not sent (the window stays the
        # bound on what is in flight, whatever a client grants).
        self.unacked = max(self.unacked - granted, 0)
        waiter = self.waiter
        if waiter is not None and not waiter.done() and self.unacked < STREAM_WINDOW:
            waiter.set_result(None)

    def encode(self, item: Any) -> bytes:
        return self.core.item_frame(self.rid, item, self.codec)

    def push(self, frame: bytes) -> None:
        core = self.core
        if core.state is not State.OPEN or self.conn.core is not core:
            return  # the session is ending: the call is stopped with it
        core.send_message(frame)
        self.unacked += len(frame) - HEADER_SIZE
        self.conn.flush_soon()

    def push_threadsafe(self, frame: bytes) -> None:
        with self._lock:
            self._pending.append(frame)
            if self._scheduled:
                return
            self._scheduled = True
        self.conn.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            frames, self._pending = self._pending, []
            self._scheduled = False
        for frame in frames:
            self.push(frame)


class _ItemIn:
    """One upload's items on a connection (the host's ``ItemSource``, PROTOCOL.md §4.4): the
    client's ITEMs queued in order, their body bytes counted against the window
    (STREAM_WINDOW) until granted back by CREDIT as the method takes them (in batches of half
    the window). An ITEM beyond the window stops the call (ERROR WINDOW_EXCEEDED) and drops its
    items: the queue never holds more than the window plus one item. Fed on the loop; taken on
    the loop (async methods) or in a worker thread (def methods, blocking until an item)."""

    __slots__ = (
        "_cond",
        "_waiter",
        "closed",
        "conn",
        "ctx",
        "ended",
        "forgotten",
        "holds_worker",
        "items",
        "rid",
        "unacked",
        "untold",
    )

    def __init__(self, conn: _HostStream, rid: int, ctx: CallContext) -> None:
        self.conn = conn
        self.rid = rid
        self.ctx = ctx
        self.items: deque[tuple[Any, int]] = deque()
        self.unacked = 0  # bytes received, not granted back (loop only)
        self.untold = 0  # bytes taken, not granted yet (the taker's)
        self.ended = False  # the ITEM with END came
        self.closed = False  # the call ended: items dropped
        self.holds_worker = False  # a def method's: counted in the server's _worker_uploads
        self.forgotten = False  # no longer counted in the server's _uploads
        self._cond = threading.Condition(threading.Lock())
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, ev: Item) -> None:
        """On the loop: an ITEM of this upload."""
        if self.closed or self.ended:
            return  # after the END, or the call ended: dropped
        if not ev.end and self.unacked >= STREAM_WINDOW:
            self.conn._upload_broken(self)
            return
        with self._cond:
            if ev.end:
                self.ended = True
            else:
                self.items.append((ev.value, ev.size))
                self.unacked += ev.size
            self._cond.notify()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _stopped(self) -> CallAborted:
        return CallAborted(self.ctx.abort_code or ErrorCode.CANCELLED)

    def _took(self, size: int) -> None:
        """``size`` bytes taken: grant them back once they reach half the window."""
        untold = self.untold + size
        if untold < STREAM_WINDOW // 2:
            self.untold = untold
            return
        self.untold = 0
        if threading.get_ident() == self.conn._loop_thread:
            self._grant(untold)
        else:
            try:
                self.conn.loop.call_soon_threadsafe(self._grant, untold)
            except RuntimeError:  # the loop is closed (server stopped)
                pass

    def _grant(self, granted: int) -> None:
        self.unacked = max(self.unacked - granted, 0)
        core = self.conn.core
        if not self.closed and core is not None and core.state is State.OPEN:
            core.send_credit(self.rid, granted)
            self.conn.flush_soon()

    def take(self) -> tuple[bool, Any]:
        with self._cond:
            while True:
                if self.closed:
                    raise self._stopped()
                if self.items:
                    value, size = self.items.popleft()
                    break
                if self.ended:
                    return False, None
                self._cond.wait()
        self._took(size)
        return True, value

    async def take_async(self) -> tuple[bool, Any]:
        while True:
            if self.closed:
                raise self._stopped()
            if self.items:
                with self._cond:
                    value, size = self.items.popleft()
                self._took(size)
                return True, value
            if self.ended:
                return False, None
            waiter = self._waiter = self.conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """The call ended or was stopped (any thread): drop the items, wake the taker."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self.items.clear()
            self._cond.notify_all()
        conn = self.conn
        if threading.get_ident() == conn._loop_thread:
            self._forget()
        else:
            try:
                conn.loop.call_soon_threadsafe(self._forget)
            except RuntimeError:
                pass

    def _forget(self) -> None:
        conn = self.conn
        if conn._item_ins.get(self.rid) is self:
            del conn._item_ins[self.rid]
        if not self.forgotten:
            self.forgotten = True
            conn.server._uploads -= 1
        if self.holds_worker:
            self.holds_worker = False
            conn.server._worker_uploads -= 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _dispatch_lazily(
    dispatch: Callable[[Request], Outcome | Awaitable[Outcome]],
    req: Request,
    kind: str,
    peer: Any,
    deadline: float | None,
    stream: object = None,
) -> tuple[Outcome | Awaitable[Outcome], CallContext]:
    """``dispatch(req)`` in a context of its own set in CURRENT_CALL (a LazyContext): for a
    call dispatched while this thread's holder holds another (from inside a method), and for
    a call that came outside a session (:meth:`Server.call`; ``stream``: its items' sink)."""
    lazy = LazyContext()
    lazy.request = req
    lazy.transport = kind
    lazy.peer = peer
    lazy.deadline = deadline
    lazy.ctx = None
    if stream is not None:
        lazy.context().stream = stream
    token = _set_call(lazy)
    try:
        outcome = dispatch(req)
    finally:
        _reset_call(token)
    return outcome, lazy.context()


class _HostStream(StreamProtocol):
    """One stream connection of the host: the hot path for calls, routing for patterns."""

    role = Role.SERVER

    def __init__(self, server: Server) -> None:
        super().__init__(server.limits.stream)
        self.server = server
        self.dispatcher = server.dispatcher
        self.routes = server._stream_routes
        self.state: dict[str, Any] = {}  # per-connection state of the patterns, by name
        self.in_flight = 0
        self._read_paused = False  # paused because too many requests are running
        self._bytes_paused = False  # paused because its requests in flight hold too many bytes
        self._pattern_hold = False  # paused by a pattern (hold_reading)
        self.in_flight_bytes = 0  # frame bytes of its requests running (not uploads)
        self.refused = False  # over the connection limit: CLOSE sent, nothing read
        # Events of a read not handled yet (see _run), and where to go on from.
        self._backlog: tuple[list[Event], int] | None = None
        self._later: list[bytes] = []
        self.address = "?"  # the peer's IP address, the key of the per-address limits
        self._handshaking = False
        self._soon: list[bytes] = []  # frames from patterns for this peer, not yet written
        self._soon_bytes = 0
        self._soon_scheduled = False
        self.kind = "tcp"  # "tls" over TLS: CallContext.transport
        self._running: dict[int, _Run] = {}  # async and threaded calls, by request id (CANCEL)
        self._item_outs: dict[int, _ItemOut] = {}  # streamed calls, by request id (CREDIT)
        self._item_ins: dict[int, _ItemIn] = {}  # uploads, by request id (their ITEMs)
        self._loop_thread = threading.get_ident()
        self._inline = inline_holder()  # (made on the loop's thread: that thread's holder)
        self._flush_scheduled = False

    def core_options(self) -> dict[str, Any]:
        secret = self.server.secret
        options: dict[str, Any] = {"registry": self.server.registry}
        if self.server.features != FEATURES:
            options["features"] = self.server.features
        if secret is not None:
            options["authenticate"] = token_checker(secret)
        return options

    def on_open(self) -> None:
        server = self.server
        lim = server.limits
        self.bad_log = server.bad_log
        transport = self.transport
        assert transport is not None
        peername = transport.get_extra_info("peername")
        address = self.address = str(peername[0]) if isinstance(peername, tuple) else "?"
        if transport.get_extra_info("ssl_object") is not None:
            self.kind = "tls"
        if len(server._streams) >= lim.max_connections:
            why = f"{len(server._streams)} connections open (limit {lim.max_connections})"
            self._refuse(why, "too many connections")
            return
        if server._by_address.get(address, 0) >= lim.max_connections_per_address:
            why = f"{lim.max_connections_per_address} connections from {address} (limit)"
            self._refuse(why, "too many connections from your address")
            return
        if server._handshaking.get(address, 0) >= lim.max_handshakes_per_address:
            why = f"{lim.max_handshakes_per_address} handshakes in progress from {address} (limit)"
            self._refuse(why, "too many handshakes in progress from your address")
            return
        server._streams.add(self)
        server._by_address[address] = server._by_address.get(address, 0) + 1
        server._handshaking[address] = server._handshaking.get(address, 0) + 1
        self._handshaking = True

    def partial_changed(self, delta: int) -> None:
        server = self.server
        server._partial_bytes += delta
        limit = server.limits.max_partial_bytes
        if delta > 0 and server._partial_bytes > limit:
            server.bad_log.warning(
                "client %s: its unfinished frame would take the server past %d bytes held for "
                "unfinished frames [%s]",
                self.peer,
                limit,
                ErrorCode.describe(ErrorCode.BUSY),
            )
            self.close_now(ErrorCode.BUSY, "server holds too many unfinished frames")

    def _refuse(self, why: str, reason: str) -> None:
        self.refused = True
        self.server.bad_log.warning(
            "refusing %s: %s [%s]",
            self.peer,
            why,
            ErrorCode.describe(ErrorCode.TOO_MANY_CONNECTIONS),
        )
        transport = self.transport
        assert transport is not None
        transport.write(encode_close(ErrorCode.TOO_MANY_CONNECTIONS, reason))
        transport.close()

    def _handshake_done(self) -> None:
        if self._handshaking:
            self._handshaking = False
            _decrement(self.server._handshaking, self.address)

    def on_lost(self, exc: Exception | None) -> None:
        server = self.server
        server._bytes_paused.discard(self)
        if self in server._streams:
            server._streams.discard(self)
            _decrement(server._by_address, self.address)
            self._handshake_done()
        for pattern in server.patterns:
            pattern.connection_lost(self)
        for inbox in list(self._item_ins.values()):  # no more items will come
            inbox.close()
        # Nobody can receive the answers of the calls still running: each stops as if its
        # CANCEL came (PROTOCOL.md §4). (A client interrupted while it wrote a request cannot
        # tell whether the frame left whole, so it drops the connection: this is its CANCEL.)
        for run in list(self._running.values()):
            run.abort(ErrorCode.CANCELLED)

    def flush_soon(self) -> None:
        """Write what the session queued at the end of this loop turn (items of streams)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def data_received(self, data: bytes) -> None:
        # The hot path, flattened: decode every complete frame of this read, answer inline
        # methods at once, route pattern messages, and send all answers with one write.
        core = self.core
        assert core is not None
        if self.refused:
            return
        if self._backlog is not None:  # a read delivered after pause_reading (TLS may): in order
            self._later.append(data)
            return
        # The common case: one whole REQUEST per read (or one pattern frame: routed at once).
        single = core.receive_single(data, True)
        events: list[Event]
        if single is not None and type(single) is Request and not self.server.draining:
            budget = single.budget_ms
            ctx: CallContext | None = None
            if budget is not None and not budget:  # no time left: it does not run
                outcome: Outcome | Awaitable[Outcome] = _LATE
            else:
                # The call's context, lazily: this thread's holder filled in place (its
                # CallContext is built only if the method, an interceptor or a later answer
                # needs it), emptied after the dispatch.
                held = self._inline
                if held.request is not None:  # inside another call's dispatch: not the holder
                    at = None if budget is None else _monotonic() + budget / 1000.0
                    outcome, ctx = self._dispatch_nested(single, self.kind, self.peer, at)
                else:
                    held.request = single
                    held.transport = self.kind
                    held.peer = self.peer
                    held.deadline = None if budget is None else _monotonic() + budget / 1000.0
                    try:
                        outcome = self.dispatcher.dispatch(single)
                        ctx = held.ctx if type(outcome) is tuple else held.context()
                    finally:
                        held.request = held.ctx = None
            if type(outcome) is tuple and outcome[0] and (ctx is None or ctx.trailers is None):
                try:
                    frame = core.response_frame(single.request_id, outcome[1])
                except CodecError:
                    frame = None
                transport = self.transport
                if frame is not None and transport is not None:
                    transport.write(frame)  # answered inline: one frame, one write
                    if self.write_paused and self.check_outbound():
                        return
                    if core.state is not self._timer_state:
                        self.flush()
                        self.arm_timer()
                    return
            events = []
            self._outcome(single, outcome, ctx)
        elif single is None:
            events = core.receive_data(data)
            self.track_partial(len(data))  # a frame begun here must end within frame_timeout
        elif type(single) is not Request and (route := self.routes.get(type(single))):
            route(self, single)  # one pattern message (a remote object's CALL...)
            events = []
        else:
            events = [single]
        if events:
            self._run(events, 0)
        out = core.buffers_to_send()
        transport = self.transport
        if out and transport is not None:
            if len(out[-1]) > 65536:
                transport.writelines(out)  # a large answer: header and body without a join
            else:
                transport.write(b"".join(out))
            if self.write_paused and self.check_outbound():
                return
        if core.state is not self._timer_state:
            self.flush()
            self.arm_timer()

    def _run(self, events: list[Event], i: int) -> None:
        """Handle ``events[i:]``. A read can carry thousands of frames (a flood of PUBs, each
        fanned out to many subscribers): after ``limits.work_slice`` seconds of work (checked
        every 16 events) the rest waits for the
        next loop turn, with reading paused, so that one connection never holds the loop for
        long while others wait (their reads are handled in between).

        A request's deadline is its budget from when this run over its read began
        (``arrived``: one clock reading for the requests of a read, which came together; a
        rest deferred by the work slice reads the clock again when it runs)."""
        draining = self.server.draining
        routes = self.routes
        run_method = self.dispatcher.dispatch
        kind, peer = self.kind, self.peer
        held = self._inline
        n = len(events)
        deadline = _clock() + self.server.limits.work_slice
        arrived = 0.0  # read at the first request with a budget
        while i < n:
            ev = events[i]
            i += 1
            if type(ev) is Request and not draining:
                # _dispatch and _outcome, inlined for the common case (a call that is not
                # streamed, answered at once without trailers): no tuple between them.
                if ev.stream or ev.upload or ev.batch:
                    outcome, ctx = self._dispatch(ev)
                    self._outcome(ev, outcome, ctx)
                else:
                    budget = ev.budget_ms
                    if budget is not None and not budget:  # no time left: it does not run
                        self._answer(ev, _LATE)
                    else:
                        if budget is None:
                            deadline_at = None
                        else:
                            if not arrived:
                                arrived = _monotonic()
                            deadline_at = arrived + budget / 1000.0
                        if held.request is not None:  # (as in data_received)
                            outcome, ctx = self._dispatch_nested(ev, kind, peer, deadline_at)
                        else:
                            held.request = ev  # (as in data_received: built only if needed)
                            held.transport = kind
                            held.peer = peer
                            held.deadline = deadline_at
                            try:
                                outcome = run_method(ev)
                                ctx = held.ctx if type(outcome) is tuple else held.context()
                            finally:
                                held.request = held.ctx = None
                        if type(outcome) is not tuple:
                            assert ctx is not None
                            self._outcome(ev, outcome, ctx)
                        elif outcome[0] and (ctx is None or ctx.trailers is None):
                            core = self.core
                            assert core is not None
                            try:
                                core.send_response(ev.request_id, outcome[1], CODECS[ev.codec])
                            except (CodecError, LocalProtocolError):
                                self._answer(ev, outcome, ctx)
                        else:
                            self._answer(ev, outcome, ctx)
            else:
                route = routes.get(type(ev))
                if route is not None:
                    route(self, ev)
                else:
                    self.handle_events([ev])
            if not i & 15 and i < n and _clock() > deadline:
                self._backlog = (events, i)
                self._update_reading()
                self.loop.call_soon(self._run_backlog)
                return

    def _dispatch_nested(
        self, req: Request, kind: str, peer: Any, deadline: float | None
    ) -> tuple[Outcome | Awaitable[Outcome], CallContext | None]:
        """Dispatch ``req`` while this thread's holder holds another call (a call dispatched
        from inside a method: not the common case): in a context of its own, set in
        CURRENT_CALL around it."""
        return _dispatch_lazily(self.dispatcher.dispatch, req, kind, peer, deadline)

    def _run_backlog(self) -> None:
        backlog, self._backlog = self._backlog, None
        transport = self.transport
        if backlog is None or transport is None or transport.is_closing():
            return
        self._run(*backlog)
        self.flush()
        if self._backlog is None:
            later, self._later = self._later, []
            for data in later:
                self.data_received(data)
            self._update_reading()  # caught up: read again (unless other backpressure holds)

    def _dispatch(self, req: Request) -> tuple[Outcome | Awaitable[Outcome], CallContext | None]:
        """Dispatch a request in its context (None, and no dispatch, when it came late)."""
        ctx = _context(req, self.kind, self.peer)
        if ctx is None:
            return _LATE, None
        if req.upload:
            return self._dispatch_upload(req, ctx), ctx
        if req.stream:
            ctx.stream = out = _ItemOut(self, req.request_id, req.codec)
            self._item_outs[req.request_id] = out
        token = _set_call(ctx)
        try:
            if req.batch:  # PROTOCOL.md §4.7: its calls, one after the other
                outcome = self.dispatcher.dispatch_batch(req)
            else:
                outcome = self.dispatcher.dispatch(req)
        finally:
            _reset_call(token)
        if req.stream and isinstance(outcome, tuple):  # answered at once: no items
            self._item_outs.pop(req.request_id, None)
        return outcome, ctx

    def _dispatch_upload(self, req: Request, ctx: CallContext) -> Outcome | Awaitable[Outcome]:
        """An UPLOAD request (PROTOCOL.md §4.4): its items are queued for the method as they
        come (an ITEM before its REQUEST, or after the call ended, is dropped)."""
        handler = self.dispatcher.handlers.get(req.method)
        if handler is not None and handler.upload is None:  # refused before anything is queued
            return False, (
                ErrorCode.STREAM_MISMATCH,
                "STREAM_MISMATCH",
                f"method {req.method!r} takes no item stream: call it without upload()",
            )
        rid = req.request_id
        old = self._item_ins.get(rid)
        if old is not None:  # the id of an upload still in flight: that one's items end here
            old.close()
        refused = self._upload_refused(handler)
        if refused is not None:
            return False, (ErrorCode.OVERLOADED, "OVERLOADED", refused)
        ctx.upload = inbox = _ItemIn(self, rid, ctx)
        self.server._uploads += 1
        if handler is not None and not handler.is_async:
            inbox.holds_worker = True
            self.server._worker_uploads += 1
        self._item_ins[rid] = inbox
        token = _set_call(ctx)
        try:
            outcome = self.dispatcher.dispatch(req)
        finally:
            _reset_call(token)
        if isinstance(outcome, tuple):  # answered at once (refused): no items wanted
            inbox.close()
        return outcome  # (its queue is closed when the call ends: _finish)

    def _upload_refused(self, handler: Any) -> str | None:
        """Why an upload cannot start now (None: it can): this connection has ``max_uploads``
        in flight, or (a ``def`` method, which holds a worker thread while it waits for items)
        the server's ``def`` uploads hold half its worker threads already: the other half stay
        free for other calls, whatever a client sends or does not send."""
        limits = self.server.limits
        if self.server._uploads >= limits.max_total_uploads:
            return (
                f"{self.server._uploads} uploads in flight on this server (limit "
                f"{limits.max_total_uploads}); retry when one has ended"
            )
        if len(self._item_ins) >= limits.max_uploads:
            return (
                f"{len(self._item_ins)} uploads in flight on this connection (limit "
                f"{limits.max_uploads}); retry when one has ended"
            )
        if handler is not None and not handler.is_async:
            most = max(1, limits.max_workers // 2)
            if self.server._worker_uploads >= most:
                return (
                    f"{most} uploads to def methods hold worker threads already (half of "
                    f"max_workers {limits.max_workers}); retry when one has ended"
                )
        return None

    def _upload_broken(self, inbox: _ItemIn) -> None:
        """The client sent an ITEM beyond its upload's window: stop the call, drop its items."""
        self.server.bad_log.warning(
            "client %s: upload %d: an item beyond the flow-control window of %d bytes [%s]",
            self.peer,
            inbox.rid,
            STREAM_WINDOW,
            ErrorCode.describe(ErrorCode.WINDOW_EXCEEDED),
        )
        run = self._running.get(inbox.rid)
        if run is not None:
            run.abort(ErrorCode.WINDOW_EXCEEDED)
        inbox.close()

    def _outcome(
        self, req: Request, outcome: Outcome | Awaitable[Outcome], ctx: CallContext | None
    ) -> None:
        """Queue the answer to a dispatched request, or start the method that will give it."""
        if isinstance(outcome, tuple):
            if outcome[0] and (ctx is None or ctx.trailers is None) and not req.batch:
                core = self.core
                assert core is not None
                try:
                    core.send_response(req.request_id, outcome[1], CODECS[req.codec])
                    return
                except (CodecError, LocalProtocolError):
                    pass
            self._answer(req, outcome, ctx)
        else:
            assert ctx is not None
            self._start(req, outcome, ctx)

    def handle_events(self, events: Sequence[Event]) -> None:
        for ev in events:
            if isinstance(ev, Request):
                self._on_request(ev)
            elif isinstance(ev, PatternMessage):
                route = self.routes.get(type(ev))
                if route is not None:
                    route(self, ev)
            elif isinstance(ev, Credit):
                out = self._item_outs.get(ev.request_id)
                if out is not None:  # else: the stream ended already: ignored
                    out.credit(ev.granted)
            elif type(ev) is Item:
                inbox = self._item_ins.get(ev.request_id)
                if inbox is not None:  # else: not an upload in flight (ended, or never): dropped
                    inbox.feed(ev)
            elif type(ev) is BadItem:  # an upload's ITEM that did not decode (the core's report)
                inbox = self._item_ins.get(ev.request_id)
                run = self._running.get(ev.request_id)
                if inbox is not None and run is not None:
                    run.abort(ev.code)
                    inbox.close()
            elif isinstance(ev, Cancel):
                run = self._running.get(ev.request_id)
                if run is not None:
                    run.abort(ErrorCode.CANCELLED)
                else:  # a pattern's call not running yet (a pipelined one), or nobody's
                    for pattern in self.server.patterns:
                        if pattern.cancel(self, ev.request_id):
                            break
            elif isinstance(ev, ProtocolViolation):
                self.log_violation(ev)
            elif isinstance(ev, HandshakeComplete):
                self._handshake_done()
                for pattern in self.server.patterns:
                    pattern.connection_made(self)
            elif (
                isinstance(ev, ConnectionTerminated)
                and ev.by_peer
                and ev.code is None
                and self.in_flight
            ):
                log.info("client %s went away with %d calls in flight", self.peer, self.in_flight)

    # ---------------------------------------------------------------- for patterns (Peer)

    def writable(self) -> bool:
        # Measured, not only the pause flag: the transport may report its pause a little late,
        # and a pattern's backlog (a subscriber's queue) must stay in its own bounded queue,
        # not in the transport.
        transport = self.transport
        high = self.limits.write_high_water
        return (
            not self.write_paused
            and self._soon_bytes < high
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() < high
        )

    def write_soon(self, data: bytes) -> None:
        self._soon.append(data)
        self._soon_bytes += len(data)
        if self._soon_bytes >= _SOON_BATCH:
            # A batch's worth (a long read fanned out): written now, so that the peer reads
            # while the rest of the read is handled, rather than all of it at the end (no
            # pattern is called back from here: that waits for the scheduled write).
            out, self._soon, self._soon_bytes = self._soon, [], 0
            transport = self.transport
            if transport is not None and not transport.is_closing():
                # What the session queued first leaves first (a SUB's answer before the
                # retained messages that follow it), as at the end of the read.
                core = self.core
                first = core.buffers_to_send() if core is not None else []
                transport.write(b"".join([*first, *out] if first else out))
        if not self._soon_scheduled:
            # Frames for this peer in the same loop iteration leave in one write.
            self._soon_scheduled = True
            self.loop.call_soon(self._write_soon_now)

    def _write_soon_now(self) -> None:
        self._soon_scheduled = False
        out, self._soon, self._soon_bytes = self._soon, [], 0
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        transport.write(b"".join(out))
        if self.write_paused:
            self.check_outbound()
        elif self.writable():
            for pattern in self.server._on_writable:
                pattern.connection_writable(self)  # room again: what it queued for this peer

    def close_slow(self, code: int, reason: str) -> None:
        core, transport = self.core, self.transport
        if core is None or transport is None or transport.is_closing():
            return
        self.server.bad_log.warning(
            "client %s: %s [%s]", self.peer, reason, ErrorCode.describe(code)
        )
        self._soon.clear()
        core.send_close(code, reason)
        self.flush()
        # A peer that does not read would not read the CLOSE either: cut it off.
        self.loop.call_later(self.server.limits.close_timeout, transport.abort)

    # ---------------------------------------------------------------- calls

    def _on_request(self, req: Request) -> None:
        core = self.core
        assert core is not None
        if self.server.draining:
            core.send_error(
                req.request_id, ErrorCode.SHUTTING_DOWN, "SHUTTING_DOWN", "server is shutting down"
            )
            return
        outcome, ctx = self._dispatch(req)
        if isinstance(outcome, tuple):
            self._answer(req, outcome, ctx)
            return
        assert ctx is not None
        self._start(req, outcome, ctx)

    def submit(
        self,
        req: Request,
        handler: Handler,
        answer: Callable[[Request, Outcome, CallContext | None], None],
    ) -> None:
        """For patterns (:class:`~sockstack.host.pattern.Peer`): run ``handler`` for ``req``
        as a REQUEST's method is run, its outcome to ``answer``."""
        if self.server.draining:
            answer(req, _SHUTTING_DOWN, None)
            return
        budget = req.budget_ms
        if budget is not None and not budget:  # no time left: it does not run
            answer(req, _LATE, None)
            return
        deadline = None if budget is None else _monotonic() + budget / 1000.0
        held = self._inline
        ctx: CallContext | None
        if held.request is not None:  # inside another call's dispatch: not the holder
            outcome, ctx = _dispatch_lazily(
                functools.partial(self.dispatcher.dispatch_to, handler),
                req,
                self.kind,
                self.peer,
                deadline,
            )
        else:  # (as _run: the call's context built only if something needs it)
            held.request = req
            held.transport = self.kind
            held.peer = self.peer
            held.deadline = deadline
            try:
                outcome = self.dispatcher.dispatch_to(handler, req)
                ctx = held.ctx if type(outcome) is tuple else held.context()
            finally:
                held.request = held.ctx = None
        if isinstance(outcome, tuple):
            answer(req, outcome, ctx)
        else:
            assert ctx is not None
            self._start(req, outcome, ctx, answer)

    def _start(
        self,
        req: Request,
        pending: Awaitable[Outcome],
        ctx: CallContext,
        answer: Callable[[Request, Outcome, CallContext | None], None] | None = None,
    ) -> None:
        server = self.server
        if not req.upload:  # (an upload's items must still be read: bounded by max_uploads)
            self.in_flight += 1
            size = req.size
            self.in_flight_bytes += size
            server._in_flight_bytes += size
            if not self._bytes_paused and (
                self.in_flight_bytes > server.limits.max_in_flight_bytes
                or server._in_flight_bytes > server.limits.max_total_in_flight_bytes
            ):
                self._bytes_paused = True
                server._bytes_paused.add(self)
                self._update_reading()
        server._in_flight += 1
        if self.in_flight >= self.server.limits.max_in_flight and not self._read_paused:
            self._read_paused = True
            self._update_reading()
        run = _Run(ctx)
        self._running[req.request_id] = run
        token = _set_call(ctx)  # the task runs in the call's context (copied when created)
        try:
            run.task = self.server._spawn(self._finish(req, pending, run, answer))
        finally:
            _reset_call(token)
        run.arm(self.loop)

    async def _finish(
        self,
        req: Request,
        pending: Awaitable[Outcome],
        run: _Run,
        answer: Callable[[Request, Outcome, CallContext | None], None] | None = None,
    ) -> None:
        try:
            outcome = await run.outcome(pending)
        finally:
            if self._running.get(req.request_id) is run:
                del self._running[req.request_id]
            if not req.upload:
                self.in_flight -= 1
                self.in_flight_bytes -= req.size
                self.server._in_flight_bytes -= req.size
            self.server._request_done()
            if req.upload and run.ctx.upload is not None:
                # However it ended (an interceptor's refusal too): later items are dropped.
                run.ctx.upload.close()
        (answer or self._answer)(req, outcome, run.ctx)
        self.flush()
        if self._read_paused and self.in_flight < self.server.limits.max_in_flight // 2:
            self._read_paused = False
            self._update_reading()

    # Backpressure: stop reading a connection while too many of its requests run, or while its
    # answers pile up unread in the write buffer (the peer does not read). Reading resumes when
    # both have cleared, so a client cannot make the server queue without bound.
    def pause_writing(self) -> None:
        super().pause_writing()
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._update_reading()
        for pattern in self.server._on_writable:
            pattern.connection_writable(self)

    def hold_reading(self, held: bool) -> None:
        self._pattern_hold = held
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if (
            self._read_paused
            or self._bytes_paused
            or self.write_paused
            or self._pattern_hold
            or self._backlog is not None
        ):
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    def _answer(self, req: Request, outcome: Outcome, ctx: CallContext | None = None) -> None:
        core = self.core
        assert core is not None
        if req.stream:
            self._item_outs.pop(req.request_id, None)
        ok, value = outcome
        trailers = _trailers(req, ctx)
        if ok:
            try:
                if req.batch and trailers is None:  # §4.7: built within the client's limit
                    codec = CODECS[req.codec]
                    body = encode_batch_answer(value[0], value[1], codec, core.peer_max_frame)
                    core.send_message(
                        encode_frame(MessageType.RESPONSE, req.request_id, b"", body, 0, codec.id)
                    )
                    return
                core.send_response(req.request_id, value, CODECS[req.codec], metadata=trailers)
                return
            except CodecError as exc:
                value = (ErrorCode.RESULT_NOT_ENCODABLE, "RESULT_NOT_ENCODABLE", str(exc))
            except LocalProtocolError as exc:  # a result larger than the peer's frame limit
                # A request-level code: 1000-1999 belong to CLOSE (PROTOCOL.md §7).
                value = (ErrorCode.RESULT_TOO_LARGE, "RESULT_TOO_LARGE", exc.message)
            log.warning("method %r: %s", req.method, value[2])
        code, type_name, message = value
        core.send_error(req.request_id, code, type_name, message, metadata=trailers)


class _HostDatagram(DatagramEndpoint):
    """One UDP endpoint of the host: calls through the datagram core, pattern datagrams routed."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server
        self._inline = inline_holder()  # (made on the loop's thread: that thread's holder)
        self.in_flight = 0  # requests running in tasks or threads, from any client
        self.epoch_refusals = 0  # datagrams sealed for another epoch (PROTOCOL.md §6.1)
        lim = server.limits
        self.core = DatagramServer(
            max_datagram=lim.max_datagram,
            reply_cache=ReplyCache(
                lim.reply_window, lim.reply_cache_entries, lim.reply_cache_bytes
            ),
            registry=server.registry,
            overhead=TRAILER_SIZE if server.datagram_auth is not None else 0,
        )

    def datagram_received(self, data: bytes, addr: Any) -> None:
        core = self.core
        now = self.loop.time()
        auth = self.server.datagram_auth
        if auth is not None:
            try:
                data = auth.open(data, time.time())
            except AuthFailure as exc:
                self._unauthenticated(data, addr, exc)
                return
        routes = self.server._datagram_routes
        if routes:
            t = peek_type(data)
            pattern = routes.get(t) if t is not None else None
            if pattern is not None:
                pattern.datagram_received(self, data, addr)
                return
        for ev in core.receive_datagram(data, addr, now):
            if isinstance(ev, Request):
                self._on_request(ev, addr, now)
            elif isinstance(ev, ProtocolViolation):
                self.log_violation(ev, addr)
        self.send_all(core.datagrams_to_send())

    # ---------------------------------------------------------------- for patterns (DatagramPeer)

    def send_datagram(self, data: bytes, addr: Any) -> None:
        self.send_all([(data, addr)])

    def count_bad(self) -> None:
        self.bad_datagrams += 1

    # ---------------------------------------------------------------- calls

    def _unauthenticated(self, data: bytes, addr: Any, exc: AuthFailure) -> None:
        """Count and log it, and answer ERROR UNAUTHENTICATED, never with more bytes than came
        in (never an amplifier): the sealed refusal naming this server's epoch when the datagram
        was authentic (``exc.answer``: sealed for another epoch, or a copy), else unsealed, the
        code alone (18 bytes), when it names a request (PROTOCOL.md §6.1)."""
        if isinstance(exc, EpochMismatch):
            # Each new client's first datagram, and each client's first after a restart (or a
            # datagram captured on its way to another process): routine, so not logged loudly.
            self.epoch_refusals += 1
            log.debug("udp server %s: %s", format_peer(addr), exc.reason)
        else:
            self.bad_datagrams += 1
            self.bad_log.warning(
                "udp server %s: %s [%s]",
                format_peer(addr),
                exc.reason,
                ErrorCode.describe(ErrorCode.UNAUTHENTICATED),
            )
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        answer = exc.answer
        if answer is not None and len(answer) <= len(data):
            transport.sendto(answer, addr)
            return
        rid = peek_request_id(data)
        if not rid:  # not our header, or a datagram that names no request
            return
        reply = encode_error(rid, ErrorCode.UNAUTHENTICATED)  # 18 bytes: the code alone
        if len(reply) <= len(data):
            transport.sendto(reply, addr)

    def send_all(self, datagrams: list[tuple[bytes, Any]]) -> None:
        auth = self.server.datagram_auth
        if auth is not None:
            now = time.time()
            datagrams = [(auth.seal(d, now), a) for d, a in datagrams]
        super().send_all(datagrams)

    def _on_request(self, req: Request, addr: Any, now: float) -> None:
        if self.server.draining:
            self.core.send_error(
                addr,
                req.request_id,
                ErrorCode.SHUTTING_DOWN,
                "SHUTTING_DOWN",
                "server is shutting down",
                now,
            )
            return
        dispatcher = self.server.dispatcher
        if self.in_flight >= self.server.limits.max_udp_in_flight:
            handler = dispatcher.handlers.get(req.method)
            if handler is not None and (handler.is_async or not handler.inline):
                # UDP has no connection to stop reading: past the bound, refuse out loud (the
                # request did not run; the client may call again later).
                self.core.send_error(
                    addr,
                    req.request_id,
                    ErrorCode.OVERLOADED,
                    "OVERLOADED",
                    f"{self.in_flight} UDP requests running (limit "
                    f"{self.server.limits.max_udp_in_flight})",
                    now,
                )
                self.bad_log.warning(
                    "udp server %s: refused %r: overloaded", format_peer(addr), req.method
                )
                return
        budget = req.budget_ms
        if budget is not None and not budget:  # no time left: it does not run
            self._answer(req, addr, _LATE, now)
            return
        # From the loop's clock reading for this datagram (``now``: time.monotonic()'s clock).
        deadline = None if budget is None else now + budget / 1000.0
        held = self._inline  # (as over TCP: the CallContext built only if needed)
        ctx: CallContext | None
        if held.request is not None:
            outcome, ctx = _dispatch_lazily(dispatcher.dispatch, req, "udp", addr, deadline)
        else:
            held.request = req
            held.transport = "udp"
            held.peer = addr
            held.deadline = deadline
            try:
                outcome = dispatcher.dispatch(req)
                ctx = held.ctx if type(outcome) is tuple else held.context()
            finally:
                held.request = held.ctx = None
        if isinstance(outcome, tuple):
            if ctx is None and outcome[0]:  # (_answer inlined: a result, no trailers)
                self.core.send_response(addr, req.request_id, outcome[1], CODECS[req.codec], now)
            else:
                self._answer(req, addr, outcome, now, ctx)
            return
        assert ctx is not None
        self.server._in_flight += 1
        self.in_flight += 1
        run = _Run(ctx)
        token = _set_call(ctx)  # the task runs in the call's context (copied when created)
        try:
            run.task = self.server._spawn(self._finish(req, addr, outcome, run))
        finally:
            _reset_call(token)
        run.arm(self.loop)

    async def _finish(
        self, req: Request, addr: Any, pending: Awaitable[Outcome], run: _Run
    ) -> None:
        try:
            outcome = await run.outcome(pending)
        finally:
            self.in_flight -= 1
            self.server._request_done()
        self._answer(req, addr, outcome, self.loop.time(), run.ctx)
        self.send_all(self.core.datagrams_to_send())

    def _answer(
        self,
        req: Request,
        addr: Any,
        outcome: Outcome,
        now: float,
        ctx: CallContext | None = None,
    ) -> None:
        ok, value = outcome
        trailers = _trailers(req, ctx)
        if ok:
            self.core.send_response(
                addr, req.request_id, value, CODECS[req.codec], now, metadata=trailers
            )
        else:
            code, type_name, message = value
            self.core.send_error(
                addr, req.request_id, code, type_name, message, now, metadata=trailers
            )


class Server:
    """The host: patterns served over TCP, TLS and UDP endpoints. ``async with Server(...)``.

    ``patterns`` are the patterns it serves (each a :class:`~sockstack.host.pattern.Pattern`);
    ``service`` (an object with ``@method``s) adds ``RPC(service)`` and ``broker`` (True or a
    :class:`~sockstack.pubsub.Broker`) adds ``PubSub(broker)``, in front of them.
    """

    def __init__(
        self,
        service: object | None = None,
        *,
        patterns: Iterable[Pattern] = (),
        tcp: Iterable[str | Endpoint] = (),
        udp: Iterable[str | Endpoint] = (),
        tls: Iterable[str | Endpoint] = (),
        tls_context: ssl.SSLContext | None = None,
        limits: ServerLimits | None = None,
        expose_errors: bool = True,
        reuse_port: bool = False,
        secret: str | bytes | None = None,
        broker: object = False,
        insecure: bool = False,
        interceptors: Iterable[object] = (),
        http: Iterable[str | Endpoint] = (),
    ) -> None:
        self.limits = limits or ServerLimits()
        patterns = list(patterns)
        self.patterns: list[Pattern] = [
            *shorthand_patterns(service, broker, with_others=bool(patterns)),
            *patterns,
            *gateway_pattern(http),
        ]
        if not self.patterns:
            raise ValueError("a server needs a service or at least one pattern")
        # A shared secret: required in every TCP/TLS HELLO, and on every UDP datagram (HMAC).
        # One rule (sockstack.transport.secret): str or bytes, surrounding ASCII whitespace
        # removed, empty refused with ValueError.
        self.secret = secret = normalize_secret(secret)
        self.datagram_auth = (
            DatagramAuth(secret, window=self.limits.replay_window) if secret is not None else None
        )
        # Interceptors (sockstack.interceptors): hooks around every RPC call, in the dispatcher;
        # then those the patterns add (the gateway's metrics).
        given = tuple(interceptors)
        self.interceptors = given + tuple(
            i for pattern in self.patterns for i in pattern.interceptors(given)
        )
        self.dispatcher = Dispatcher(
            expose_errors=expose_errors,
            max_workers=self.limits.max_workers,
            interceptors=self.interceptors,
        )
        self.traffic: dict[str, list[int]] | None = None
        """Bytes received and sent per transport (``{"tcp": [in, out], ...}``; TLS: before
        encryption), counted only once an interceptor asks for it (:meth:`count_traffic`)."""
        self.registry = Registry([CORE_MESSAGES])
        self._stream_routes: dict[type, StreamRoute] = {}
        self._datagram_routes: dict[int, Pattern] = {}
        self._on_writable: list[Pattern] = []
        names: set[str] = set()
        for pattern in self.patterns:
            self._register(pattern, names)
        self._tcp = [e if isinstance(e, Endpoint) else parse_endpoint(e, "tcp") for e in tcp]
        self._udp = [e if isinstance(e, Endpoint) else parse_endpoint(e, "udp") for e in udp]
        self._tls = [e if isinstance(e, Endpoint) else parse_endpoint(e, "tls") for e in tls]
        own = [e for pattern in self.patterns for e in pattern.endpoints()]
        if not self._tcp and not self._udp and not self._tls and not own:
            raise ValueError("a server needs at least one TCP, TLS, UDP or HTTP endpoint")
        if self._tls and tls_context is None:
            raise ValueError("TLS endpoints need tls_context (sockstack.tls.server_context)")
        refuse_unprotected(self._tcp + self._udp + own, secret, insecure)
        self.tls_context = tls_context
        self.reuse_port = reuse_port
        self.endpoints: list[Endpoint] = []
        self.draining = False
        self._listeners: list[asyncio.Server] = []
        self._datagrams: list[_HostDatagram] = []
        self._streams: set[_HostStream] = set()
        self._by_address: dict[str, int] = {}  # open connections per IP address
        self._handshaking: dict[str, int] = {}  # connections per IP address awaiting HELLO
        self._partial_bytes = 0  # held for unfinished frames, all connections together
        self.bad_log = RateLimitedLog(logging.getLogger("sockstack.transport"))
        self._in_flight = 0
        self._in_flight_bytes = 0  # frame bytes of the TCP requests running (not uploads)
        self._bytes_paused: set[_HostStream] = set()  # connections paused for those bytes
        self._uploads = 0  # uploads in flight over all connections
        self._worker_uploads = 0  # uploads to def methods in flight (each may hold a worker)
        self._idle: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # shutdown started by a signal
        # Methods running on the loop (async methods, and the tasks awaiting threaded ones):
        # kept here until done, so none is garbage-collected while pending, and each still
        # running after the drain is cancelled and awaited by shutdown().
        self._work: set[asyncio.Task[None]] = set()
        self._stopped: asyncio.Event | None = None
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        """Awaited first when :meth:`shutdown` begins, before the drain: e.g. an announcer
        withdraws (sockstack.discovery), so that clients stop sending calls it would refuse."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.features = FEATURES
        """The optional features the WELCOME of new connections announces (PROTOCOL.md §5.1,
        extension 2); 0 behaves as a server older than them (clients then send no DEADLINE,
        METADATA or CANCEL). A REQUEST carrying them is understood whatever this says."""
        for interceptor in self.interceptors:
            bind = getattr(interceptor, "bind", None)
            if bind is not None:
                bind(self)

    def count_traffic(self) -> dict[str, list[int]]:
        """Count the bytes of every connection and datagram from now on (call it before
        :meth:`start`): ``{"tcp"|"tls"|"udp": [received, sent]}``. Without it the hot path
        counts nothing."""
        if self.traffic is None:
            self.traffic = {"tcp": [0, 0], "tls": [0, 0], "udp": [0, 0]}
        return self.traffic

    def open_connections(self) -> dict[str, int]:
        """Stream connections open now, by transport (safe to call from another thread)."""
        counts = {"tcp": 0, "tls": 0}
        for stream in tuple(self._streams):
            counts[stream.kind] = counts.get(stream.kind, 0) + 1
        for pattern in self.patterns:
            for kind, n in pattern.connections().items():
                counts[kind] = counts.get(kind, 0) + n
        return counts

    def _register(self, pattern: Pattern, names: set[str]) -> None:
        """Plug one pattern in: its message types, routes, methods and hooks."""
        if pattern.name in names:
            raise ValueError(f"two patterns are named {pattern.name!r}")
        names.add(pattern.name)
        own: set[int] = set()
        if pattern.messages is not None:
            self.registry.add(pattern.messages)  # refuses a range another pattern owns
            for spec in pattern.messages.specs:
                own.add(spec.type)
                if Role.CLIENT not in spec.sent_by:
                    continue
                if spec.cls is None:  # decoded, then dropped for want of a route: refuse now
                    raise ValueError(
                        f"{pattern.name}: {spec.name} is sent by clients but names no message "
                        "class (MessageSpec.cls) to route it by"
                    )
                self._stream_routes[spec.cls] = pattern.stream_message
        for t in pattern.datagram_types:
            if t not in own:  # e.g. claiming REQUEST would bypass the reply cache and limits
                raise ValueError(f"{pattern.name}: datagram type 0x{t:02x} is not one of its own")
            self._datagram_routes[t] = pattern
        self.dispatcher.add(pattern.methods(), pattern.name)
        if type(pattern).connection_writable is not Pattern.connection_writable:
            self._on_writable.append(pattern)

    def pattern(self, name: str) -> Pattern:
        """The registered pattern called ``name``."""
        for p in self.patterns:
            if p.name == name:
                return p
        raise LookupError(f"no pattern {name!r} on this server")

    @property
    def service(self) -> object:
        """The service of the first pattern that serves one (``RPC``), else None."""
        for p in self.patterns:
            service = getattr(p, "service", None)
            if service is not None:
                return service
        return None

    @property
    def broker(self) -> Any:
        """The broker of the first pattern that has one (``PubSub``), else None."""
        for p in self.patterns:
            broker = getattr(p, "broker", None)
            if broker is not None:
                return broker
        return None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a request's method as a task this server keeps until it is done."""
        loop = self.loop
        assert loop is not None
        task = loop.create_task(coro)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return task

    async def _cancel_work(self) -> None:
        """Cancel the methods still running after the drain, and wait until they have ended
        (a method that ignores cancellation is left after ``close_timeout``, logged)."""
        work = [t for t in self._work if not t.done()]
        if not work:
            return
        for task in work:
            task.cancel()
        _, pending = await asyncio.wait(work, timeout=self.limits.close_timeout)
        if pending:
            log.warning("%d methods did not end when cancelled", len(pending))

    async def call(
        self,
        req: Request,
        transport: str,
        peer: Any,
        *,
        handler: Handler | None = None,
        stream: object = None,
    ) -> tuple[Outcome, CallContext | None]:
        """Run one call that arrived some other way than a session (the HTTP gateway) as the
        host runs a REQUEST: refused while draining, its deadline (``req.budget_ms``), the
        interceptors, ``current_context()``, the drain's count of calls in flight. ``handler``:
        a pattern's own target instead of ``req.method``'s; ``stream``: the ItemSink of a
        streamed call's items. Returns its outcome and context (None when it did not run). A
        cancelled caller (its client went away) stops the call as a CANCEL does."""
        if self.draining:
            return _SHUTTING_DOWN, None
        budget = req.budget_ms
        if budget is not None and not budget:
            return _LATE, None
        deadline = None if budget is None else _monotonic() + budget / 1000.0
        dispatch = (
            self.dispatcher.dispatch
            if handler is None
            else functools.partial(self.dispatcher.dispatch_to, handler)
        )
        outcome, ctx = _dispatch_lazily(dispatch, req, transport, peer, deadline, stream)
        if isinstance(outcome, tuple):
            return outcome, ctx
        loop = self.loop
        assert loop is not None
        self._in_flight += 1
        run = _Run(ctx)
        token = _set_call(ctx)
        try:
            task: asyncio.Task[Outcome] = loop.create_task(run.outcome(outcome))
            self._work.add(task)  # type: ignore[arg-type]
            task.add_done_callback(self._work.discard)
            run.task = task  # type: ignore[assignment]
        finally:
            _reset_call(token)
        run.arm(loop)
        try:
            return await asyncio.shield(task), ctx
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                return _ABANDONED, ctx  # the shutdown cancelled it after the drain
            run.abort(ErrorCode.CANCELLED)  # our caller is gone: stop the call too
            raise
        finally:
            if task.done():
                self._request_done()
            else:
                task.add_done_callback(lambda _: self._request_done())

    def _request_done(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()
        if (
            self._bytes_paused
            and self._in_flight_bytes <= self.limits.max_total_in_flight_bytes // 2
        ):
            self._resume_bytes_paused()

    def _resume_bytes_paused(self) -> None:
        """Resume the connections paused for the bytes of their requests in flight, those whose
        own bytes are below half of ``max_in_flight_bytes`` (the others resume as theirs end)."""
        half = self.limits.max_in_flight_bytes // 2
        for conn in list(self._bytes_paused):
            if conn.in_flight_bytes <= half:
                self._bytes_paused.discard(conn)
                conn._bytes_paused = False
                conn._update_reading()

    async def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for pattern in self.patterns:  # ready before the first connection can reach it
            pattern.start(self)
        try:
            for ep in self._tcp + self._tls:
                tls = ep.scheme == "tls"
                srv = await loop.create_server(
                    functools.partial(
                        _HostStream if self.traffic is None else _CountedStream, self
                    ),
                    ep.host,
                    ep.port,
                    backlog=self.limits.backlog,
                    reuse_address=True,
                    reuse_port=self.reuse_port or None,
                    ssl=self.tls_context if tls else None,
                    # The TLS handshake counts against the same budget as HELLO (slowloris).
                    ssl_handshake_timeout=(self.limits.stream.handshake_timeout or 60.0)
                    if tls
                    else None,
                )
                self._listeners.append(srv)
                for sock in srv.sockets:
                    host, port = sock.getsockname()[:2]
                    self.endpoints.append(Endpoint(ep.scheme, host, port))
            for ep in self._udp:
                family = socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET
                transport, proto = await loop.create_datagram_endpoint(
                    functools.partial(
                        _HostDatagram if self.traffic is None else _CountedDatagram, self
                    ),
                    local_addr=(ep.host, ep.port),
                    family=family,
                    reuse_port=self.reuse_port or None,
                )
                self._datagrams.append(proto)
                host, port = transport.get_extra_info("sockname")[:2]
                self.endpoints.append(Endpoint("udp", host, port))
            for pattern in self.patterns:  # bound in their start()
                self.endpoints.extend(pattern.endpoints())
        except BaseException:
            await self._close_endpoints()
            for pattern in self.patterns:
                pattern.stop()
            raise
        for ep in self.endpoints:
            log.debug("serving %s on %s", self.name, ep)
        if READY_FD_ENV in os.environ:  # a worker of `serve --workers N`: tell the supervisor
            report_ready(self.name, self.endpoints)

    def adopt_stream(self, transport: asyncio.Transport, data: bytes) -> None:
        """A pattern's own listener found a sockstack session on a connection it accepted (an
        edge relay's port takes lines and sessions): the host serves it from here on, from the
        bytes ``data`` already read (the handshake, authentication and limits all apply)."""
        proto = (_HostStream if self.traffic is None else _CountedStream)(self)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if data:
            proto.data_received(data)

    @property
    def name(self) -> str:
        """What it serves, for logs: the service's class name, else the patterns' names."""
        service = self.service
        if service is not None:
            return type(service).__name__
        return "+".join(p.name for p in self.patterns)

    def endpoint(self, scheme: str) -> Endpoint:
        """The first bound endpoint of a scheme (handy with port 0)."""
        for ep in self.endpoints:
            if ep.scheme == scheme:
                return ep
        raise LookupError(f"no {scheme} endpoint")

    async def serve_forever(self) -> None:
        assert self._stopped is not None, "call start() first"
        await self._stopped.wait()

    async def run(
        self, *, handle_signals: bool = True, on_ready: Callable[[], None] | None = None
    ) -> None:
        """Start, serve until :meth:`shutdown` — or, with ``handle_signals``, until SIGINT or
        SIGTERM, which drain in-flight requests before returning. ``on_ready`` is called once
        the endpoints are bound and the signal handlers installed (where a banner saying
        "Ctrl-C stops" belongs: a signal sent after it is always a graceful stop)."""
        if self._stopped is None:
            await self.start()
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
        if on_ready is not None:
            on_ready()
        try:
            await self.serve_forever()
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        log.info("%s received: draining and stopping", signal.Signals(sig).name)
        task = asyncio.get_running_loop().create_task(self.shutdown())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_endpoints(self) -> None:
        for srv in self._listeners:
            srv.close()
        for dg in self._datagrams:
            if dg.transport is not None:
                dg.transport.close()
        self._listeners.clear()

    async def shutdown(self) -> None:
        """Stop accepting, answer accepted requests, close every connection. Idempotent."""
        if self.draining:
            if self._stopped is not None:
                await self._stopped.wait()
            return
        self.draining = True
        for hook in list(self.on_shutdown):
            try:
                await hook()
            except Exception:
                log.exception("an on_shutdown hook failed")
        for srv in self._listeners:
            srv.close()  # no new connections; existing ones keep going
        for pattern in self.patterns:
            pattern.drain()  # (the gateway: its listeners too)
        if self._in_flight:
            log.info("draining %d requests in flight", self._in_flight)
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(self.limits.drain_timeout):
                    await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "%d requests still running after %.1f s; closing anyway",
                    self._in_flight,
                    self.limits.drain_timeout,
                )
        await self._cancel_work()  # what the drain left running: abandoned, not leaked
        for pattern in self.patterns:
            pattern.stop()
        for pattern in self.patterns:
            await pattern.closed()
        for dg in self._datagrams:
            if dg.transport is not None:
                dg.transport.close()
        streams = list(self._streams)
        for s in streams:
            if s.core is not None:
                s.core.send_close(ErrorCode.GOING_AWAY, "server shutting down")
                s.flush()
        if streams:
            await asyncio.wait([s.closed for s in streams], timeout=self.limits.close_timeout)
            for s in streams:
                if not s.closed.done():
                    s.abort()
        # The UDP sockets are closed by the loop a turn later: wait, so that a server started
        # again in this process can bind the same ports at once.
        closing = [dg.closed for dg in self._datagrams if not dg.closed.done()]
        if closing:
            await asyncio.wait(closing, timeout=self.limits.close_timeout)
        for srv in self._listeners:
            try:
                await asyncio.wait_for(srv.wait_closed(), self.limits.close_timeout)
            except TimeoutError:
                pass  # closed anyway; only its bookkeeping lags
        self.dispatcher.shutdown()
        if self._stopped is not None:
            self._stopped.set()
        log.info("server stopped")

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


_PROTECTED = ("tls", "https")


def refuse_unprotected(
    endpoints: Iterable[Endpoint], secret: bytes | None, insecure: bool = False
) -> None:
    """Raise ``ValueError`` for plain TCP/UDP endpoints on an address other machines can reach
    when there is no secret (as Mosquitto 2 and Redis's protected mode: no silent open door).
    TLS endpoints, loopback addresses, a secret or ``insecure`` pass."""
    exposed = [e for e in endpoints if e.scheme not in _PROTECTED and not is_loopback_host(e.host)]
    if exposed and secret is None and not insecure:
        raise ValueError(
            f"refusing to serve {', '.join(map(str, exposed))} without a secret: anyone who "
            "can reach that address could call every method and publish. Give a secret "
            "(--secret-file or SOCKSTACK_SECRET; secret= in Python), serve tls:// endpoints "
            "instead, or bind to 127.0.0.1; --insecure (insecure=True) allows it"
        )


def shorthand_patterns(
    service: object | None, broker: object = False, *, with_others: bool = False
) -> list[Pattern]:
    """The patterns ``Server(service, broker=...)`` stands for: ``RPC(service)`` when a service
    is given, ``PubSub(broker)`` when ``broker`` is a Broker or true. The one place the host
    names a pattern, imported here only when asked for."""
    patterns: list[Pattern] = []
    with_broker = bool(broker)
    if service is not None:
        from sockstack.rpc.pattern import RPC

        # A service with no methods is allowed beside other patterns (they serve), as it always
        # was beside a broker; alone it is a mistake.
        patterns.append(RPC(service, allow_empty=with_broker or with_others))
    if with_broker:
        from sockstack.pubsub.broker import Broker
        from sockstack.pubsub.pattern import PubSub

        patterns.append(PubSub(broker if isinstance(broker, Broker) else None))
    return patterns


def gateway_pattern(http: Iterable[str | Endpoint]) -> list[Pattern]:
    """``Server(http=[...])``: the HTTP gateway on those endpoints (``[]`` without any)."""
    endpoints = list(http)
    if not endpoints:
        return []
    from sockstack.gateway.pattern import Gateway

    return [Gateway(endpoints)]


def serve(
    service: object | None = None,
    *,
    patterns: Iterable[Pattern] = (),
    tcp: Iterable[str | Endpoint] = (),
    udp: Iterable[str | Endpoint] = (),
    tls: Iterable[str | Endpoint] = (),
    tls_context: ssl.SSLContext | None = None,
    limits: ServerLimits | None = None,
    expose_errors: bool = True,
    secret: str | bytes | None = None,
    broker: object = False,
    insecure: bool = False,
) -> None:
    """Serve ``service`` (and/or ``patterns``) until SIGINT/SIGTERM (blocking; uvloop when
    installed)::

    serve(Calculator(), tcp=["127.0.0.1:5050"], udp=["127.0.0.1:5051"])
    """
    from sockstack.transport.loop import run

    async def main() -> None:
        server = Server(
            service,
            patterns=patterns,
            tcp=tcp,
            udp=udp,
            tls=tls,
            tls_context=tls_context,
            limits=limits,
            expose_errors=expose_errors,
            secret=secret,
            broker=broker,
            insecure=insecure,
        )
        await server.run()

    run(main())


class _Counting:
    """A transport that counts the bytes written through it into ``counts[1]``."""

    __slots__ = ("_counts", "_transport", "get_write_buffer_size", "is_closing", "is_reading")

    def __init__(self, transport: Any, counts: list[int]) -> None:
        self._transport = transport
        self._counts = counts
        # The transport's own methods for those the hot path calls (no __getattr__ on them).
        self.is_closing = transport.is_closing
        self.get_write_buffer_size = getattr(transport, "get_write_buffer_size", None)
        self.is_reading = getattr(transport, "is_reading", None)

    def write(self, data: bytes) -> None:
        self._counts[1] += len(data)
        self._transport.write(data)

    def writelines(self, lines: Iterable[bytes]) -> None:
        lines = list(lines)
        self._counts[1] += sum(map(len, lines))
        self._transport.writelines(lines)

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._counts[1] += len(data)
        self._transport.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _CountedStream(_HostStream):
    """A connection of a server that counts its traffic (metrics): the plain class is used
    otherwise, so that counting costs nothing when nobody reads it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        kind = "tls" if transport.get_extra_info("ssl_object") is not None else "tcp"
        traffic = self.server.traffic
        assert traffic is not None
        self._counts = traffic[kind]
        super().connection_made(cast(asyncio.BaseTransport, _Counting(transport, self._counts)))

    def data_received(self, data: bytes) -> None:
        self._counts[0] += len(data)
        super().data_received(data)


class _CountedDatagram(_HostDatagram):
    """A UDP endpoint of a server that counts its traffic (metrics)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        traffic = self.server.traffic
        assert traffic is not None
        self._counts = traffic["udp"]
        super().connection_made(cast(asyncio.BaseTransport, _Counting(transport, self._counts)))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._counts[0] += len(data)
        super().datagram_received(data, addr)
