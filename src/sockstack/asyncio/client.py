"""The asyncio client, over TCP or UDP, with the same calls::

    async with AsyncClient("tcp://127.0.0.1:5050") as c:
        assert await c.call("add", 2, 3) == 5
        results = await asyncio.gather(*(c.call("add", i, i) for i in range(1000)))

Many calls share one connection (pipelining), matched by request id. Each call has a timeout
(:class:`CallTimeout`). Over TCP, a dropped connection fails every call in flight at once with
:class:`ConnectionLost` ("may or may not have run") and the client reconnects in the background
with jittered exponential backoff; a call made meanwhile waits for the reconnect within its own
timeout. Over UDP, a call is retransmitted with the same request id until answered or timed out;
the server's reply cache makes sure it runs once. When nothing listens on the server's port, the
host answers ICMP port unreachable; on Linux the kernel names the datagram it answered
(:mod:`sockstack.transport.udperr`), so each refusal counts for its own call only. A call fails
at once with :class:`ConnectError` ("did not run") when every datagram of it that left was
refused and its retransmission schedule had sent a second one (a server still starting gets
that one), and with :class:`ConnectionLost` ("may or may not have run") when its latest
datagrams were refused after an earlier one was not. Elsewhere, and under uvloop (libuv cannot
read a socket that queues these reports), refusals are not attributed and calls end at their
timeout. A call's timeout also bounds the connection: the first
connect takes at most ``min(connect_timeout, timeout)``.

This module is an I/O adapter: request ids, deadlines, matching answers, failover order and
backoff are the sans-I/O :mod:`sockstack.protocol.calls`, shared with the blocking client.
Patterns reach a connection through :class:`StreamChannel`'s small API (``exchange``,
``send_soon``, ``routes``, ``on_reconnect``): publish/subscribe's client side is
:mod:`sockstack.pubsub.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import socket
import ssl
import struct
import time
import weakref
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Literal, Self, cast, overload

from sockstack.asyncio.datagram import DatagramEndpoint
from sockstack.asyncio.stream import StreamLimits, StreamProtocol
from sockstack.asyncio.timer import CoreTimer
from sockstack.errors import (
    CallError,
    CallTimeout,
    CodecError,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
)
from sockstack.interceptors import (
    ClientCall,
    Hooks,
    StreamHooks,
    run_async,
)
from sockstack.protocol.auth import (
    NO_EPOCH,
    AuthFailure,
    refusal_of,
    token_extension,
    trailer_of,
    unsealed_refusal,
)
from sockstack.protocol.calls import (
    CURRENT_CALL,
    DEFAULT_WINDOW,
    INLINE_CALLS,
    Backoff,
    Calls,
    Failover,
    ItemStream,
    ItemUpload,
    PendingCall,
    Reply,
    batch_answers,
    batch_plan,
    budget_ms,
    deadline_passed,
    inherited_timeout,
    merge_metadata,
    outcome,
)
from sockstack.protocol.codecs import Codec
from sockstack.protocol.connection import Connection, State
from sockstack.protocol.datagram import DEFAULT_MAX_DATAGRAM, RetryPolicy
from sockstack.protocol.events import (
    ConnectionTerminated,
    Credit,
    Error,
    Event,
    HandshakeComplete,
    Item,
    Metadata,
    PatternMessage,
    Pong,
    ProtocolViolation,
    Response,
    Role,
)
from sockstack.protocol.frames import MessageType
from sockstack.protocol.messages import (
    FEATURE_BATCH,
    FEATURE_DEADLINE,
    FEATURE_METADATA,
    FEATURE_STREAM,
    FEATURE_UPLOAD,
    MAX_BUDGET_MS,
    encode_item_end,
)
from sockstack.transport.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    ClientSettings,
    refusal_verdict,
    udp_gone,
    udp_refused,
)
from sockstack.transport.tls import handshake_failure, handshake_lost, tls_reason
from sockstack.transport.udperr import enable_refusal_reports, refused_request_ids
from sockstack.transport.urls import Endpoint

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "Backoff",
    "DatagramChannel",
    "ResultStream",
    "StreamChannel",
]

log = logging.getLogger("sockstack.client")
_SENDABLE = (State.OPEN, State.HELLO_SENT)

Waiter = asyncio.Future[Any]
Route = Callable[[Any], None]
_REQUEST_ID = struct.Struct(">I")
_TYPE = 3  # offset of the message type in a frame
_ERROR = int(MessageType.ERROR)
_PONG = int(MessageType.PONG)
_PACE_BYTES = 256 << 10  # send_paced writes once this much is queued (then waits for a drain)
_MAX_HELD_BYTES = 1 << 20  # datagrams without answer held while a UDP client learns the epoch
_rng = random.Random()
_CURRENT_CALL = CURRENT_CALL
_INLINE_CALLS = INLINE_CALLS  # (non-empty in a process that runs a host)
_BUDGET_CAP_S = MAX_BUDGET_MS / 1000  # budget_ms's bound, in seconds
_DEADLINE_EXCEEDED = int(ErrorCode.DEADLINE_EXCEEDED)
_DECODE = int(ErrorCode.DECODE_ERROR)
_monotonic = time.monotonic
_SEQUENCES = frozenset((tuple, list))  # a call's arguments as they go in a BATCH body


async def _fail(exc: Exception) -> Any:
    raise exc


def _os_error(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _settle(call: PendingCall[Waiter] | None, ev: Response | Error | Pong) -> None:
    """Hand an answer to the future of the call it answers (if that call still waits)."""
    if call is not None and not call.waiter.done():
        ok, value = outcome(ev)
        if ok:
            md = ev.metadata if type(ev) is Response else None
            call.waiter.set_result(value if md is None else Reply(value, md))
        else:
            if type(ev) is Error and ev.code == _DEADLINE_EXCEEDED:  # as our own timer would
                value = deadline_passed(call.method, call.timeout)
            call.waiter.set_exception(value)


class _Batch:
    """The answers of one :meth:`StreamChannel.many`: the calls sent and not yet handed out,
    in order, and one future that wakes the batch's coroutine when the window has room or the
    next answer in order has come (one wake-up for many answers, not a future per call)."""

    __slots__ = ("base", "chunk", "left", "low", "values", "waiting", "wake", "window")

    def __init__(self, window: int, low: int, chunk: int) -> None:
        self.window = window  # calls in flight at most
        self.chunk = chunk  # calls per BATCH request at most
        self.base = 0  # index (in the batch) of values[0]
        self.values: list[Any] = []  # answer (or _Failed) per call sent, from ``base`` on
        self.left = 0  # calls sent and not answered
        self.low = low  # wake the sender when ``left`` falls to this
        self.waiting = False  # the coroutine waits for values[0]
        self.wake: asyncio.Future[None] | None = None

    def answered(self, n: int = 1) -> None:
        self.left -= n
        wake = self.wake
        if wake is not None and (self.left <= self.low or self.waiting) and not wake.done():
            wake.set_result(None)


class _FrameSlot:
    """:class:`_Slot` for a BATCH request (PROTOCOL.md §4.7): ``count`` calls from ``index``
    on, answered by one RESPONSE ``[results, errors]`` (or all failed by one ERROR)."""

    __slots__ = ("batch", "count", "index", "method", "settled", "timeout")

    def __init__(self, batch: _Batch, index: int, count: int, method: str, timeout: float) -> None:
        self.batch = batch
        self.index = index
        self.count = count
        self.method = method
        self.timeout = timeout
        self.settled = False

    def done(self) -> bool:
        return self.settled

    def set_result(self, value: Any) -> None:
        self.settled = True
        batch, count = self.batch, self.count
        start = self.index - batch.base
        try:
            results, failed = batch_answers(
                value.result if type(value) is Reply else value, count, self.method, self.timeout
            )
        except RemoteProtocolError as exc:
            batch.values[start : start + count] = [_Failed(exc)] * count
        else:
            values = batch.values
            values[start : start + count] = results
            for i, error in failed.items():
                values[start + i] = _Failed(error)
        batch.answered(count)

    def set_exception(self, exc: BaseException) -> None:
        self.settled = True
        batch, count = self.batch, self.count
        start = self.index - batch.base
        batch.values[start : start + count] = [_Failed(exc)] * count
        batch.answered(count)


class _Failed:
    """A call of a batch that failed: its exception (answers are msgpack values, never this)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_UNANSWERED: Any = object()


class _Slot:
    """What a batched call's :class:`PendingCall` holds in place of a future: the three
    methods the channel's answer, timer and loss paths use (``done``, ``set_result``,
    ``set_exception``), writing into the batch's list."""

    __slots__ = ("batch", "index", "settled")

    def __init__(self, batch: _Batch, index: int) -> None:
        self.batch = batch
        self.index = index
        self.settled = False

    def done(self) -> bool:
        return self.settled

    def set_result(self, value: Any) -> None:
        self.settled = True
        batch = self.batch
        batch.values[self.index - batch.base] = value.result if type(value) is Reply else value
        batch.answered()

    def set_exception(self, exc: BaseException) -> None:
        self.settled = True
        batch = self.batch
        batch.values[self.index - batch.base] = _Failed(exc)
        batch.answered()


class _TCPStream(StreamProtocol):
    role = Role.CLIENT

    def __init__(self, channel: StreamChannel, ep: Endpoint) -> None:
        super().__init__(channel.limits)
        self.channel = channel
        self.ep = ep
        self.welcome: asyncio.Future[None] = self.loop.create_future()
        self.terminated: ConnectionTerminated | None = None

    def core_options(self) -> dict[str, Any]:
        secret = self.channel.client.secret
        options: dict[str, Any] = {"registry": self.channel.client.registry}
        if secret is not None:
            options["hello_extensions"] = [token_extension(secret)]
        return options

    def handle_events(self, events: Sequence[Event]) -> None:
        take = self.channel.calls.take
        for ev in events:
            if type(ev) is Response:  # the bulk of the traffic: no outcome tuple on this path
                call = take(ev)
                if call is not None and not call.waiter.done():
                    md = ev.metadata
                    call.waiter.set_result(ev.result if md is None else Reply(ev.result, md))
            elif type(ev) is Error:
                call = take(ev)
                if call is not None:
                    if ev.code == _DECODE and ev.request_id in self.channel.item_streams:
                        # Not the server's answer: an ITEM this client cannot decode. Stop
                        # the stream there (its reader gets the items before it, then this).
                        del self.channel.item_streams[ev.request_id]
                        self.channel._cancel(ev.request_id)
                    _settle(call, ev)
                elif ev.request_id == 0:
                    log.warning("server %s reported: %s %s", self.peer, ev.type, ev.message)
            elif type(ev) is Item:
                self.channel._on_item(ev)
            elif type(ev) is Credit:
                up = self.channel.uploads.get(ev.request_id)
                if up is not None:  # else: not an upload in flight (ended, or never): ignored
                    up.credit(ev.granted)
            elif isinstance(ev, PatternMessage):
                route = self.channel.routes.get(type(ev))
                if route is not None:
                    route(ev)
            elif type(ev) is Pong:
                call = take(ev)
                if call is not None and not call.waiter.done():
                    call.waiter.set_result(self.loop.time())
            elif type(ev) is HandshakeComplete:
                if not self.welcome.done():
                    self.welcome.set_result(None)
            elif type(ev) is ConnectionTerminated:
                self.terminated = ev
            elif type(ev) is ProtocolViolation:
                self.log_violation(ev)

    def can_send(self) -> bool:
        core, transport = self.core, self.transport
        return (
            core is not None
            and core.state in _SENDABLE
            and transport is not None
            and not transport.is_closing()
        )

    def on_lost(self, exc: Exception | None) -> None:
        self.channel._on_lost(self, exc)


class StreamChannel:
    """The client's TCP/TLS side: one connection at a time, reconnecting, failing over.

    What patterns use: :meth:`exchange` (a frame of theirs that gets a RESPONSE),
    :meth:`send_soon` (a frame that gets none), ``routes`` (their message class -> handler),
    ``on_reconnect`` (callbacks after a reconnect), ``on_close`` (coroutines awaited when the
    client closes, before its connection ends: to finish the tasks a pattern started) and
    ``state`` (their per-client state)."""

    kind = "stream"

    def __init__(self, eps: list[Endpoint], client: AsyncClient) -> None:
        self.failover: Failover[Endpoint] = Failover(eps)
        self.client = client
        self.limits = client.stream_limits
        self.loop = asyncio.get_running_loop()
        self.calls: Calls[Waiter] = Calls()
        self.stream: _TCPStream | None = None
        self.connected = asyncio.Event()
        self.closed = False
        self.last_error: str = ""
        self.routes: dict[type, Route] = {}
        self.on_reconnect: list[Callable[[], None]] = []
        self.on_close: list[Callable[[], Awaitable[None]]] = []
        self.state: dict[str, Any] = {}
        self._reconnect_task: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._queued = 0  # bytes queued by send_soon since the last flush
        self._timer = CoreTimer(self.loop, self._on_timer)  # the earliest call deadline
        self.item_streams: dict[int, _Items] = {}  # streamed calls in flight, by request id
        self.uploads: dict[int, _Uploading] = {}  # uploads in flight, by request id (CREDIT)

    @property
    def ep(self) -> Endpoint:
        return self.failover.current

    async def connect_once(self, timeout: float) -> None:
        """Connect to the current server, else to the next ones in the list (failover)."""
        errors = []
        for index, ep in self.failover.attempts():
            try:
                stream = await self._connect_to(ep, timeout)
            except ConnectError as exc:
                errors.append(str(exc))
                continue
            previous = self.failover.connected(index)
            if previous is not None:
                log.warning("failing over from %s to %s", previous, ep)
            self.stream = stream
            self.last_error = ""
            self.connected.set()
            return
        raise Failover.all_failed(errors)

    async def _connect_to(self, ep: Endpoint, timeout: float) -> _TCPStream:
        stream: _TCPStream | None = None
        try:
            async with asyncio.timeout(timeout):
                tls = self.client.tls if ep.scheme == "tls" else None
                _, stream = await self.loop.create_connection(
                    lambda: _TCPStream(self, ep),
                    ep.host,
                    ep.port,
                    ssl=tls,
                    server_hostname=ep.host if tls is not None else None,
                )
                await asyncio.shield(stream.welcome)
        except TimeoutError:
            if stream is not None:
                stream.abort()
            raise ConnectError(f"{ep}: no connection and handshake within {timeout:g} s") from None
        except ssl.SSLError as exc:  # before OSError: its errno means nothing here
            raise ConnectError(f"{ep}: TLS: {tls_reason(exc)}") from None
        except ConnectError as exc:  # (an OSError too) ended before WELCOME: refused, no cert...
            raise ConnectError(f"{ep}: {exc}") from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
            if ep.scheme == "tls":  # during the TLS handshake, without an alert
                raise ConnectError(f"{ep}: {handshake_lost(exc)}") from None
            raise ConnectError(f"{ep}: {_os_error(exc)}") from None
        except OSError as exc:
            raise ConnectError(f"{ep}: {_os_error(exc)}") from None
        return stream

    def _on_lost(self, stream: _TCPStream, exc: Exception | None) -> None:
        term = stream.terminated
        if not stream.welcome.done():
            # Ended before WELCOME: no call went out on this connection (calls wait for
            # connect_once to finish), so this is a ConnectError saying what is likely wrong.
            tls = stream.ep.scheme == "tls"
            if isinstance(exc, ssl.SSLError):  # e.g. an alert after the handshake (TLS 1.3)
                why = f"TLS: {tls_reason(exc)}"
            elif term is not None and term.code is not None:
                why = handshake_failure(term.code, term.reason, term.by_peer, tls=tls)
            else:
                why = handshake_failure(None, "", True, tls=tls)
                if exc is not None:
                    why += f" ({exc})"
            stream.welcome.set_exception(ConnectError(why))
            stream.welcome.exception()  # retrieved: connect_once reports it
            return
        if term is not None and term.code is not None and term.by_peer:
            error: ConnectionLost = ConnectionClosed(term.code, term.reason)
        elif term is not None and term.code is not None:
            error = ConnectionLost(
                f"{self.ep}: connection closed ({ErrorCode.describe(term.code)}: {term.reason}); "
                "calls in flight may or may not have run"
            )
        else:
            detail = f": {exc}" if exc else ""
            error = ConnectionLost(
                f"{self.ep}: connection lost{detail}; calls in flight may or may not have run"
            )
        if stream is not self.stream:
            return
        self.stream = None
        self.connected.clear()
        self.last_error = str(error)
        for call in self.calls.drain():
            if not call.waiter.done():
                call.waiter.set_exception(error)
        if not self.closed and self.client.reconnect:
            log.info("%s; reconnecting", error)
            self.last_error = "reconnecting after: " + self.last_error
            self._reconnect_task = self.loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        while not self.closed:
            try:
                await self.connect_once(self.client.connect_timeout)
                log.info("reconnected to %s", self.ep)
                for callback in self.on_reconnect:
                    callback()
                return
            except ConnectError as exc:
                self.last_error = str(exc)
            await asyncio.sleep(self.client.backoff.delay(attempt))  # backoff between attempts
            attempt += 1

    async def _wait_connected(self, method: str, timeout: float, deadline: float) -> _TCPStream:
        """The current stream once it can carry a request, waiting for a reconnect if needed."""
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    if self.closed:
                        raise ConnectError("client is closed")
                    stream = self.stream
                    if stream is not None and stream.can_send():
                        return stream
                    if stream is not None:  # closing: wait until it is gone, then reconnect
                        await asyncio.shield(stream.closed)
                        continue
                    if not self.client.reconnect:  # this call was not sent: it did not run
                        raise ConnectError(
                            f"{self.ep}: not connected (the connection ended and reconnect is "
                            "off); the call was not sent"
                        )
                    await self.connected.wait()
        except TimeoutError:
            raise CallTimeout(method, timeout, f"not connected: {self.last_error}") from None

    async def call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float,
        codec: Codec,
        metadata: Metadata | None = None,
        with_metadata: bool = False,
    ) -> Any:
        stream = self.stream
        loop = self.loop
        now = loop.time()
        if _CURRENT_CALL.get() is not None or _INLINE_CALLS:  # inside a served call: its deadline
            timeout = inherited_timeout(timeout, _monotonic())
        if stream is None or not stream.can_send():
            stream = await self._wait_connected(method, timeout, now + timeout)
            budget = budget_ms(now + timeout - loop.time())
        elif 0.0 < timeout < _BUDGET_CAP_S:  # budget_ms(timeout), inlined for the common case
            budget = int(timeout * 1000)
        else:
            budget = budget_ms(timeout)
        calls = self.calls
        rid = calls.new_id()
        core = stream.core
        assert core is not None
        features = core.peer_features  # sent only to a server that announced them
        md = None
        defaults = self.client.metadata
        if (metadata or defaults) and features & FEATURE_METADATA:
            md = merge_metadata(defaults, metadata)
        # CodecError, LocalProtocolError (bad metadata): nothing sent
        core.send_request(
            rid,
            method,
            args,
            kwargs,
            codec,
            budget_ms=budget if features & FEATURE_DEADLINE else None,
            metadata=md,
        )
        call = calls.start(method, timeout, now, loop.create_future(), rid)
        if not self._flush_scheduled:
            # Requests made in the same loop iteration leave in one write.
            self._flush_scheduled = True
            loop.call_soon(self._flush, stream)
        when = self._timer.when
        if when is None or call.deadline < when:
            self._timer.set(call.deadline)
        try:
            result = await call.waiter
        finally:
            if calls.pending.get(rid) is call:  # cancelled by the caller: tell the server
                calls.forget(rid)
                self._cancel(rid)
        if type(result) is Reply:  # the RESPONSE carried trailers
            return result if with_metadata else result.result
        return Reply(result, {}) if with_metadata else result

    async def many(
        self,
        method: str,
        calls: Iterable[Sequence[Any]],
        timeout: float,
        codec: Codec,
        metadata: Metadata | None,
        window: int,
        eager: bool,
    ) -> AsyncGenerator[list[Any], None]:
        """Calls of ``method``, one per argument sequence in ``calls`` (read as they are sent),
        pipelined: up to ``window`` in flight, each refill encoded and written in one go, the
        answers written into one list by the read path (no future, task or wake-up per call).
        Yields the answers in call order, as runs of consecutive ones; a failed call is a
        :class:`_Failed`. ``eager``: yield each run as soon as it comes (else when the window
        is half empty or all is answered). Closing the generator forgets the calls still in
        flight and sends CANCEL for each (the server stops them). Each call has ``timeout``
        from when it is sent, as :meth:`call`'s."""
        loop = self.loop
        chunk, low = batch_plan(window)
        batch = _Batch(window, low, chunk)
        values = batch.values
        rids: list[int] = []  # the request id of each call in ``values`` (0: never sent)
        pending = self.calls.pending
        it = iter(calls)
        exhausted = False
        if _CURRENT_CALL.get() is not None or _INLINE_CALLS:  # inside a served call
            timeout = inherited_timeout(timeout, _monotonic())
        try:
            while True:
                if not exhausted and len(values) <= batch.low:
                    exhausted = await self._refill(
                        batch, rids, it, method, timeout, codec, metadata, window
                    )
                    if exhausted:
                        batch.low = 0  # no more to send: wake when all is answered
                k = 0
                n = len(values)
                while k < n and values[k] is not _UNANSWERED:
                    k += 1
                if k:
                    run = values[:k]
                    del values[:k], rids[:k]
                    batch.base += k
                    yield run
                    continue
                if exhausted and not values:
                    return
                if not exhausted and len(values) <= batch.low:
                    continue  # answers came while connecting or draining: room to send more
                # The window counts the calls not handed out yet, answered or not: while the
                # first of them is unanswered, only its answer makes room (wake at each one).
                batch.waiting = eager or batch.left <= batch.low
                batch.wake = wake = loop.create_future()
                await wake
        finally:
            for rid, value in zip(rids, values, strict=True):
                if value is _UNANSWERED:
                    call = pending.get(rid)
                    slot: Any = call.waiter if call is not None else None
                    if type(slot) in (_Slot, _FrameSlot) and slot.batch is batch:
                        self.calls.forget(rid)
                        self._cancel(rid)

    async def _refill(
        self,
        batch: _Batch,
        rids: list[int],
        it: Iterator[Sequence[Any]],
        method: str,
        timeout: float,
        codec: Codec,
        metadata: Metadata | None,
        window: int,
    ) -> bool:
        """Send the next calls of a batch, up to ``window`` in flight, in one write; True once
        ``it`` is exhausted. Waits for a connection, and while the write buffer is over its
        high-water mark (the bytes of a batch in the client are bounded as a call's are)."""
        loop = self.loop
        stream = self.stream
        if stream is None or not stream.can_send():
            stream = await self._wait_connected(method, timeout, loop.time() + timeout)
        if stream.write_paused:
            await stream.wait_drained()
            if stream is not self.stream or not stream.can_send():
                return False  # lost meanwhile: the next refill reconnects
        core = stream.core
        assert core is not None
        features = core.peer_features
        budget = budget_ms(timeout) if features & FEATURE_DEADLINE else None
        md = None
        defaults = self.client.metadata
        if (metadata or defaults) and features & FEATURE_METADATA:
            md = merge_metadata(defaults, metadata)
        now = loop.time()
        exhausted = False
        if features & FEATURE_BATCH and codec.structured:
            # BATCH requests (§4.7): up to ``chunk`` calls a frame, several frames in flight
            # (the server runs one while the next comes and this side reads the last answer).
            room = window - len(batch.values)
            while room > 0:
                want = min(batch.chunk, room)
                group = list(itertools.islice(it, want))
                if group:
                    if not _SEQUENCES.issuperset(map(type, group)):
                        # f(*args) for any other iterable (a call that is not one: TypeError,
                        # as call() would raise), never put in the body as it is: the server
                        # would refuse the whole request (§4.7), the good calls too
                        group = [
                            a if type(a) is tuple or type(a) is list else tuple(a) for a in group
                        ]
                    self._send_group(core, batch, rids, group, method, timeout, codec, budget, md)
                    room -= len(group)
                if len(group) < want:
                    exhausted = True
                    break
        else:
            exhausted = self._send_each(core, batch, rids, it, method, timeout, codec, budget, md)
        stream.flush()
        deadline = now + timeout
        when = self._timer.when
        if batch.left and (when is None or deadline < when):
            self._timer.set(deadline)
        return exhausted

    def _send_group(
        self,
        core: Connection,
        batch: _Batch,
        rids: list[int],
        group: list[Sequence[Any]],
        method: str,
        timeout: float,
        codec: Codec,
        budget: int | None,
        md: Metadata | None,
    ) -> None:
        """One BATCH request for ``group``; halved while over the server's frame limit, and
        sent call by call if an argument does not encode (that call alone fails)."""
        calls = self.calls
        rid = calls.new_id()
        try:
            core.send_request(
                rid, method, group, None, codec, budget_ms=budget, metadata=md, batch=True
            )
        except (CodecError, LocalProtocolError) as exc:
            if len(group) > 1 and getattr(exc, "code", None) == ErrorCode.FRAME_TOO_LARGE:
                half = len(group) // 2
                self._send_group(
                    core, batch, rids, group[:half], method, timeout, codec, budget, md
                )
                self._send_group(
                    core, batch, rids, group[half:], method, timeout, codec, budget, md
                )
            else:
                self._send_each(core, batch, rids, iter(group), method, timeout, codec, budget, md)
            return
        n = len(group)
        index = batch.base + len(batch.values)
        batch.values += [_UNANSWERED] * n
        rids.append(rid)
        rids += [0] * (n - 1)
        slot = _FrameSlot(batch, index, n, method, timeout)
        calls.start(method, timeout, self.loop.time(), cast(Waiter, slot), rid)
        batch.left += n

    def _send_each(
        self,
        core: Connection,
        batch: _Batch,
        rids: list[int],
        it: Iterator[Sequence[Any]],
        method: str,
        timeout: float,
        codec: Codec,
        budget: int | None,
        md: Metadata | None,
    ) -> bool:
        """A REQUEST per call of a batch (a server without BATCH), up to the window; True once
        ``it`` is exhausted."""
        calls = self.calls
        start, new_id, send = calls.start, calls.new_id, core.send_request
        values = batch.values
        now = self.loop.time()
        for _ in range(max(0, batch.window - len(values))):
            args = next(it, _UNANSWERED)
            if args is _UNANSWERED:
                return True
            index = batch.base + len(values)
            rid = new_id()
            try:
                send(rid, method, args, None, codec, budget_ms=budget, metadata=md)
            except (CodecError, LocalProtocolError) as exc:  # this call is not sent
                values.append(_Failed(exc))
                rids.append(0)
                continue
            values.append(_UNANSWERED)
            rids.append(rid)
            start(method, timeout, now, cast(Waiter, _Slot(batch, index)), rid)
            batch.left += 1
        return False

    def _flush(self, stream: _TCPStream) -> None:
        self._flush_scheduled = False
        self._queued = 0
        stream.flush()

    # ------------------------------------------------------------------ streamed calls

    async def start_stream(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float,
        codec: Codec,
        metadata: Mapping[str, str | bytes] | None,
    ) -> _Items:
        """Send a STREAM request; its items are queued in the returned state as they come."""
        call, _ = await self._start_flagged(
            method, args, kwargs, timeout, codec, metadata, stream=True
        )
        items = _Items(self, call)
        self.item_streams[call.request_id] = items
        call.waiter.add_done_callback(items.wake_up)
        return items

    async def _start_flagged(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float,
        codec: Codec,
        metadata: Mapping[str, str | bytes] | None,
        *,
        stream: bool,
    ) -> tuple[PendingCall[Waiter], _TCPStream]:
        """Send a REQUEST with the STREAM flag (``stream``) or the UPLOAD flag: the call
        started (its deadline on the timer) and the connection it went on. The caller
        registers its state before it awaits anything (no ITEM or CREDIT can come before).
        :class:`LocalProtocolError` (STREAM_MISMATCH), nothing sent, for a server that does not
        announce the feature."""
        what, feature = ("stream", FEATURE_STREAM) if stream else ("upload", FEATURE_UPLOAD)
        loop = self.loop
        now = loop.time()
        if _CURRENT_CALL.get() is not None or _INLINE_CALLS:
            timeout = inherited_timeout(timeout, _monotonic())
        conn = self.stream
        if conn is None or not conn.can_send():
            conn = await self._wait_connected(method, timeout, now + timeout)
        core = conn.core
        assert core is not None
        features = core.peer_features
        if not features & feature:
            raise LocalProtocolError(
                f"{what}({method!r}): the server does not announce {what}s (an older server); "
                "nothing was sent",
                ErrorCode.STREAM_MISMATCH,
            )
        md = None
        defaults = self.client.metadata
        if (metadata or defaults) and features & FEATURE_METADATA:
            md = merge_metadata(defaults, metadata)
        rid = self.calls.new_id()
        core.send_request(
            rid,
            method,
            args,
            kwargs,
            codec,
            budget_ms=budget_ms(now + timeout - loop.time())
            if features & FEATURE_DEADLINE
            else None,
            metadata=md,
            stream=stream,
            upload=not stream,
        )
        call = self.calls.start(method, timeout, now, loop.create_future(), rid)
        self._flush_soon(conn)
        when = self._timer.when
        if when is None or call.deadline < when:
            self._timer.set(call.deadline)
        return call, conn

    async def upload(
        self,
        method: str,
        items: Iterable[Any] | AsyncIterable[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float,
        codec: Codec,
        metadata: Mapping[str, str | bytes] | None,
    ) -> Reply:
        """An UPLOAD call (PROTOCOL.md §4.4): the REQUEST, then ``items`` as ITEMs under the
        window (waiting for CREDIT), then the END; its result with the server's trailers.
        Stops sending when the answer comes first; CANCEL when the caller gives up."""
        call, stream = await self._start_flagged(
            method, args, kwargs, timeout, codec, metadata, stream=False
        )
        rid, deadline = call.request_id, call.deadline
        up = self.uploads[rid] = _Uploading(call, ItemUpload(rid, method))
        call.waiter.add_done_callback(up.wake_up)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._send_items(stream, up, items, codec)
            except TimeoutError:  # the items' iterator was still waiting at the deadline
                if not call.waiter.done():
                    raise call.expired() from None
            result = await call.waiter
        finally:
            if self.uploads.get(rid) is up:
                del self.uploads[rid]
            if self.calls.pending.get(rid) is call:  # given up on here: tell the server
                self.calls.forget(rid)
                self._cancel(rid)
        if type(result) is Reply:
            return result
        return Reply(result, {})

    async def _send_items(
        self,
        stream: _TCPStream,
        up: _Uploading,
        items: Iterable[Any] | AsyncIterable[Any],
        codec: Codec,
    ) -> None:
        """Send the items while the call waits for its answer, each once the window allows,
        then the END. An iterator stopped before its end (the answer came first) is closed."""
        waiter = up.call.waiter
        count = up.count
        rid = count.request_id
        core = stream.core
        assert core is not None
        source: Any
        is_async = isinstance(items, AsyncIterable)
        source = aiter(items) if is_async else iter(items)  # type: ignore[arg-type]
        finished = False
        sent = 0
        try:
            while not waiter.done():
                try:
                    if is_async:
                        # Raced against the answer: an early answer (or the call's failure)
                        # must not wait for an iterator that has nothing to give yet.
                        step = asyncio.ensure_future(anext(source))
                        try:
                            if not step.done():
                                await asyncio.wait(
                                    (step, waiter), return_when=asyncio.FIRST_COMPLETED
                                )
                        finally:
                            if not step.done():
                                step.cancel()
                                step.add_done_callback(_retrieved)
                                await asyncio.wait((step,))  # (never raises step's error)
                        if step.cancelled():
                            break  # answered first: nothing more to send
                        item = step.result()
                    else:
                        item = next(source)
                except (StopAsyncIteration, StopIteration):
                    finished = True
                    break
                while not count.may_send() and not waiter.done():
                    await up.wait(self.loop)  # a CREDIT, the answer, or the connection's end
                if waiter.done() or stream is not self.stream or not stream.can_send():
                    break  # answered (early, or failed): nothing more to send
                frame = core.item_frame(rid, item, codec)  # CodecError, LocalProtocolError
                core.send_message(frame)
                count.sent(frame)
                self._flush_soon(stream)
                sent += 1
                if not sent & 255:  # a window of small items is many frames: let the loop
                    await asyncio.sleep(0)  # write them, and read an answer that came first
            if finished and not waiter.done() and stream is self.stream and stream.can_send():
                core.send_message(encode_item_end(rid, codec))
                self._flush_soon(stream)
        finally:
            if not finished:
                close = getattr(source, "aclose" if is_async else "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        r = close()
                        if is_async:
                            await r

    def _flush_soon(self, stream: _TCPStream) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush, stream)

    def _on_item(self, ev: Item) -> None:
        items = self.item_streams.get(ev.request_id)
        if items is None:
            return  # a stream given up on: its items are dropped (CANCEL is on its way)
        problem = items.items.feed(ev)
        if problem is not None:
            items.fail(RemoteProtocolError(problem))
            return
        items.wake_up()

    def grant(self, request_id: int, granted: int) -> None:
        """Send a CREDIT (with the next write)."""
        stream = self.stream
        if stream is None or stream.core is None or not stream.can_send():
            return
        if stream.core.send_credit(request_id, granted) and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush, stream)

    def _cancel(self, request_id: int) -> None:
        """Send CANCEL for a call this client gave up on (cancelled, or timed out), when the
        server announced CANCEL; it stops the call there (PROTOCOL.md §4)."""
        stream = self.stream
        if stream is None or stream.core is None or not stream.can_send():
            return
        if stream.core.send_cancel(request_id) and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush, stream)

    # One timer for all calls, set at the earliest deadline the call core reports.
    def _on_timer(self) -> None:
        for call in self.calls.expire(self.loop.time()):
            self._cancel(call.request_id)
            if not call.waiter.done():
                call.waiter.set_exception(call.expired())
        self._timer.set(self.calls.next_deadline())

    # ------------------------------------------------------------------ for patterns

    async def exchange(
        self, frame: Callable[[int], bytes], what: str, timeout: float
    ) -> tuple[int, Any]:
        """Send the frame ``frame(request_id)`` builds for a fresh id and wait for the RESPONSE
        to it; returns (request id, result). Raises :class:`CallTimeout`, or
        :class:`RemoteError` for an ERROR answer."""
        loop = self.loop
        now = loop.time()
        deadline = now + timeout
        stream = self.stream
        if stream is None or not stream.can_send():
            stream = await self._wait_connected(what, timeout, deadline)
        core = stream.core
        assert core is not None
        call = self.calls.start(what, timeout, now, loop.create_future(), timed=False)
        try:
            core.send_message(frame(call.request_id))
            stream.flush()
            async with asyncio.timeout_at(deadline):
                result = await call.waiter
        except TimeoutError:
            raise call.expired() from None
        finally:
            self.calls.forget(call.request_id)
        return call.request_id, result

    def send_soon(self, frame: bytes) -> bool:
        """Queue a frame that gets no answer on the open stream (False, nothing queued, when
        there is none); everything queued in one loop iteration leaves in one write."""
        stream = self.stream
        if stream is None or not stream.can_send():
            return False
        core = stream.core
        assert core is not None
        core.send_message(frame)
        self._queued += len(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush, stream)
        return True

    async def send_paced(self, frame: bytes) -> bool:
        """:meth:`send_soon`, with backpressure: once a batch's worth is queued it is written
        now, and while the connection's write buffer is above its high-water mark (the server
        reads slower than we send) this waits for it to drain. A sender in a tight loop (QoS 0
        publishing) is slowed to what the peer takes, instead of queuing without bound until
        the connection's hard limit resets it. False: no open stream (nothing queued)."""
        stream = self.stream
        if stream is None:
            return False
        if stream.write_paused:
            try:
                await stream.wait_drained()
            except ConnectionResetError:
                return False
        if not self.send_soon(frame):
            return False
        if self._queued >= _PACE_BYTES:
            self._flush(stream)
            if stream.write_paused:
                try:
                    await stream.wait_drained()
                except ConnectionResetError:
                    pass  # (queued and written: the connection's loss is reported as usual)
        return True

    async def wait_connected(self, what: str, timeout: float) -> None:
        """Return once the stream can carry a frame (reconnecting if needed), within timeout."""
        await self._wait_connected(what, timeout, self.loop.time() + timeout)

    async def ping(self, timeout: float) -> float:
        loop = self.loop
        start = loop.time()
        stream = self.stream
        if stream is None or not stream.can_send():
            stream = await self._wait_connected("PING", timeout, start + timeout)
        core = stream.core
        assert core is not None
        call = self.calls.start("PING", timeout, start, loop.create_future(), timed=False)
        core.send_ping(call.request_id, b"")
        stream.flush()
        try:
            async with asyncio.timeout_at(call.deadline):
                end = await call.waiter
        except TimeoutError:
            raise call.expired() from None
        finally:
            self.calls.forget(call.request_id)
        return float(end - start)

    async def close(self) -> None:
        self.closed = True
        self._timer.close()
        try:
            for hook in self.on_close:
                await hook()
        finally:  # the connection ends even if a hook fails or this task is cancelled
            try:
                await self._close_connection()
            except BaseException:
                if self.stream is not None:
                    self.stream.abort()
                raise

    async def _close_connection(self) -> None:
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stream = self.stream
        if stream is not None and stream.core is not None:
            stream.core.send_close(ErrorCode.NORMAL, "")
            stream.flush()
            try:
                async with asyncio.timeout(self.client.close_timeout):
                    await asyncio.shield(stream.closed)
            except TimeoutError:
                stream.abort()


class _UDPEndpoint(DatagramEndpoint):
    side = "client"

    def __init__(self, channel: DatagramChannel) -> None:
        super().__init__()
        self.channel = channel

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.channel._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.channel.last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ConnectionRefusedError):  # ICMP port unreachable: no server there
            self.channel._on_refused()


class DatagramChannel:
    """The client's UDP side: the datagram core retransmits, the call core matches answers.

    With a secret, every datagram is sealed for the server's epoch (PROTOCOL.md §6.1), learned
    from the server: a call sealed for an epoch the server does not have (none yet, or a
    restarted server's old one) is refused with the server's epoch, and sent again for it when
    nothing of it can have run, else failed with :class:`ConnectionLost` ("may or may not have
    run", as a TCP call in flight when its server dies). Each call keeps the epoch of its first
    datagram (its pin) for its retransmissions, so no two server processes both accept a call."""

    kind = "datagram"

    def __init__(self, ep: Endpoint, client: AsyncClient) -> None:
        self.ep = ep
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.core = client.datagram_core()
        # Ids start at a random point, as the datagram core's own do: a restarted client on a
        # reused port never meets its predecessor's answers in the server's reply cache.
        self.calls: Calls[Waiter] = Calls(first_id=self.core.new_request_id(0))
        self.endpoint: _UDPEndpoint | None = None
        self.last_error = ""
        self._timer = CoreTimer(self.loop, self._on_timer)  # retransmissions and deadlines
        self.auth = client.datagram_auth()
        # With a secret: each call's pin, (epoch, time in ms of its first datagram sealed for
        # it); datagrams that get no answer, held until the epoch is known; the task learning it.
        self._pins: dict[int, tuple[bytes, int]] = {}
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._probe: asyncio.Task[None] | None = None
        # ECONNREFUSED (an ICMP port unreachable): the kernel names the datagram it answered
        # (transport/udperr.py), so a refusal counts for its own call only. Per call: datagrams
        # refused, and datagrams whose send reported an earlier refusal instead (never left).
        # A call fails (udp_refused: it did not run) once it has sent at least two datagrams on
        # its schedule and every one that left was refused; where the kernel cannot name them
        # (_errsock None) calls end at their timeout.
        self._errsock: socket.socket | None = None
        self._refused: dict[int, int] = {}
        self._unsent: dict[int, int] = {}
        self._sending = 0  # the request id being sent (0: none)
        self._drain_soon = False

    async def connect_once(self, timeout: float) -> None:
        family = socket.AF_INET6 if self.ep.is_ipv6 else socket.AF_INET
        try:
            _, self.endpoint = await self.loop.create_datagram_endpoint(
                lambda: _UDPEndpoint(self), remote_addr=(self.ep.host, self.ep.port), family=family
            )
        except OSError as exc:
            raise ConnectError(f"{self.ep}: {_os_error(exc)}") from None
        transport = self.endpoint.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        # A second handle on the same socket, to read its error queue. Only under asyncio's
        # own loops: libuv (uvloop 0.23) crashes reading a socket with IP_RECVERR set, so
        # under uvloop a refusal is not attributed and calls end at their timeout.
        if sock is not None and isinstance(self.loop, asyncio.BaseEventLoop):
            errsock = socket.socket(family, socket.SOCK_DGRAM, 0, os.dup(sock.fileno()))
            if enable_refusal_reports(errsock):
                self._errsock = errsock
            else:
                errsock.close()

    def send_datagram(self, data: bytes) -> None:
        """Send one datagram that gets no answer (sealed when the client has a secret). With a
        secret and no epoch known yet, it is held until a PING has told the epoch (nothing
        would come back to tell it)."""
        ep = self.endpoint
        if ep is None or ep.transport is None:
            raise ConnectError("client is closed")
        auth = self.auth
        if auth is None:
            ep.transport.sendto(data)
        elif auth.epoch != NO_EPOCH:
            ep.transport.sendto(auth.seal(data, time.time()))
        elif self._held_bytes + len(data) <= _MAX_HELD_BYTES:
            self._held.append(data)
            self._held_bytes += len(data)
            self._learn_epoch()
        else:
            self.last_error = "a datagram was dropped: too many held while learning the epoch"

    def _flush(self) -> None:
        ep = self.endpoint
        if ep is None or ep.transport is None:
            return
        auth = self.auth
        if auth is None:
            for data in self.core.datagrams_to_send():
                self._sending = _REQUEST_ID.unpack_from(data, 8)[0]
                ep.transport.sendto(data)
        else:
            ms = int(time.time() * 1000)
            pins = self._pins
            for data in self.core.datagrams_to_send():
                rid = self._sending = _REQUEST_ID.unpack_from(data, 8)[0]
                pin = pins.get(rid)
                if pin is None:
                    pin = pins[rid] = (auth.epoch, ms)
                ep.transport.sendto(auth.seal_ms(data, ms, pin[0]))
        self._sending = 0
        self._timer.set(self.core.next_timer())

    def _on_timer(self) -> None:
        for ev in self.core.handle_timer(self.loop.time()):
            call = self.calls.forget(ev.request_id)
            if call is not None and not call.waiter.done():
                detail = f"{ev.attempts} datagrams sent"
                if self.last_error:
                    detail += f"; last error: {self.last_error}"
                call.waiter.set_exception(call.expired(detail))
        self._flush()

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        auth = self.auth
        if auth is not None:
            try:
                frame = auth.open(data, time.time(), track=False)
            except AuthFailure as exc:
                if not unsealed_refusal(data):
                    self.last_error = f"dropped a datagram: {exc.reason}"
                    return
                # Refused without the server's epoch (its answer would have been longer than
                # what we sent): learn the epoch anew before the next datagram that needs it.
                auth.epoch = NO_EPOCH
            else:
                t = frame[_TYPE]
                if (t == _ERROR or t == _PONG) and self._epoch_news(data, frame):
                    return
                data = frame
        for ev in self.core.receive_datagram(data):
            if type(ev) is Response or type(ev) is Error:
                _settle(self.calls.take(ev), ev)
            elif type(ev) is Pong:
                call = self.calls.take(ev)
                if call is not None and not call.waiter.done():
                    call.waiter.set_result(self.loop.time())
            elif type(ev) is ProtocolViolation and self.endpoint is not None:
                self.endpoint.log_violation(ev, addr)

    def _on_refused(self) -> None:
        """The kernel reported ECONNREFUSED: an ICMP port unreachable answered one of our
        datagrams. Reported by a send, that send's own datagram did not leave. Which datagram
        was refused is read from the socket's error queue soon after (not here: this may run
        inside a send)."""
        if self._sending:
            self._unsent[self._sending] = self._unsent.get(self._sending, 0) + 1
        if not self._drain_soon:
            self._drain_soon = True
            self.loop.call_soon(self._drain_refusals)

    def _drain_refusals(self) -> None:
        """Charge each refusal the kernel queued to the call it names. A call fails with
        :class:`ConnectError` (it did not run) once every datagram of it that left was refused
        and it had sent two at least: the second on its retransmission schedule, so a server
        that was still starting when the first came gets it."""
        self._drain_soon = False
        if self._errsock is None:
            return
        pending = self.calls.pending
        resend = False
        for rid in list(self._unsent):
            call = pending.get(rid)
            if call is not None and call.method == "PING" and rid not in self._refused:
                del self._unsent[rid]  # its one datagram never left (pings are not retried)
                self.core.send_ping(rid)
                resend = True
        for rid in refused_request_ids(self._errsock):
            if rid in pending:
                self._refused[rid] = self._refused.get(rid, 0) + 1
        for rid in list(self._refused):
            call = pending.get(rid)
            if call is None:
                del self._refused[rid]
                self._unsent.pop(rid, None)
                continue
            lone = refusal_verdict(
                self.core.attempts(rid),
                self._refused[rid],
                self._unsent.get(rid, 0),
                call.method == "PING",
            )
            if lone is None:
                continue
            error = udp_refused(self.ep) if lone else udp_gone(self.ep)
            del self._refused[rid]
            self._unsent.pop(rid, None)
            self.calls.forget(rid)
            self.core.cancel(rid)
            if not call.waiter.done():
                call.waiter.set_exception(error)
        if resend:
            self._flush()
        else:
            self._timer.set(self.core.next_timer())

    def _epoch_news(self, data: bytes, frame: bytes) -> bool:
        """What a sealed PONG or ERROR UNAUTHENTICATED says of the server's epoch; True when
        the datagram was an epoch refusal (handled here, not an answer)."""
        auth = self.auth
        assert auth is not None
        refusal = refusal_of(data, frame)
        if refusal is None:
            if frame[_TYPE] == _PONG:
                self._epoch_is(trailer_of(data)[0])
            return False
        epoch, refused_ms = refusal
        self._epoch_is(epoch)
        rid = _REQUEST_ID.unpack_from(frame, 8)[0]
        pin = self._pins.get(rid)
        if pin is None or pin[0] == epoch:
            return True  # not a call of ours, or a datagram sent before its last re-send
        if pin[0] == NO_EPOCH or pin[1] == refused_ms:
            # Nothing of it can have run: no server accepts NO_EPOCH, and the refused datagram
            # is the first sealed for its epoch. Send it again, sealed for the new epoch.
            del self._pins[rid]
            if self.core.resend(rid):
                self._flush()
            return True
        # An earlier datagram went to the old epoch's process, which may have run it.
        call = self.calls.forget(rid)
        self.core.cancel(rid)
        del self._pins[rid]
        if call is not None and not call.waiter.done():
            call.waiter.set_exception(
                ConnectionLost(
                    f"{self.ep}: the server restarted (new epoch) while {call.method!r} was "
                    "in flight: it may or may not have run"
                )
            )
        return True

    def _epoch_is(self, epoch: bytes) -> None:
        """The server's epoch, from an authentic datagram: held datagrams go out now."""
        auth = self.auth
        assert auth is not None
        auth.epoch = epoch
        if self._held:
            self._send_held()

    def _send_held(self) -> None:
        held, self._held, self._held_bytes = self._held, [], 0
        ep = self.endpoint
        auth = self.auth
        if ep is None or ep.transport is None or auth is None:
            return
        now = time.time()
        for data in held:
            ep.transport.sendto(auth.seal(data, now))

    def _learn_epoch(self) -> asyncio.Task[None]:
        """The task that PINGs the server until it knows the epoch (one at a time)."""
        if self._probe is None or self._probe.done():
            self._probe = self.loop.create_task(self._ping_for_epoch())
        return self._probe

    async def _ping_for_epoch(self) -> None:
        auth = self.auth
        assert auth is not None
        deadline = self.loop.time() + self.client.timeout
        attempt = 0
        try:
            while auth.epoch == NO_EPOCH:
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    break
                try:
                    await self.ping(min(remaining, self.core.retry.interval(attempt, _rng)))
                except CallTimeout:
                    attempt += 1
        except CallError as exc:  # closed meanwhile, or refused (not our secret)
            self.last_error = str(exc)
        finally:
            if self._held and auth.epoch == NO_EPOCH:
                self.last_error = (
                    f"{len(self._held)} datagram(s) dropped: no answer from the server to "
                    "learn its epoch"
                )
                self._held, self._held_bytes = [], 0

    async def call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float,
        codec: Codec,
        metadata: Metadata | None = None,
        with_metadata: bool = False,
    ) -> Any:
        if self.endpoint is None:
            raise ConnectError("client is closed")
        if _CURRENT_CALL.get() is not None or _INLINE_CALLS:  # inside a served call: its deadline
            timeout = inherited_timeout(timeout, _monotonic())
        md = None
        defaults = self.client.metadata
        if metadata or defaults:  # no WELCOME over UDP: always sent (PROTOCOL.md §6)
            md = merge_metadata(defaults, metadata)
        auth = self.auth
        if auth is not None and auth.epoch == NO_EPOCH and not codec.structured:
            # A raw request may be shorter than the refusal that would tell the epoch (which
            # is never longer than what it answers): learn the epoch first, within the timeout.
            start = self.loop.time()
            await asyncio.wait([self._learn_epoch()], timeout=timeout)
            timeout = max(0.0, timeout - (self.loop.time() - start))
        calls = self.calls
        rid = calls.new_id()
        now = self.loop.time()
        # DATAGRAM_TOO_LARGE and CodecError are raised here, before anything is sent.
        self.core.send_request(
            rid, method, args, kwargs, codec, now=now, timeout=timeout, deadline=True, metadata=md
        )
        # The datagram core owns this call's deadline (it retransmits until then).
        call = calls.start(method, timeout, now, self.loop.create_future(), rid, timed=False)
        self._flush()
        try:
            result = await call.waiter
        finally:
            if calls.forget(rid) is not None:  # cancelled by the caller
                self.core.cancel(rid)
            if auth is not None:
                self._pins.pop(rid, None)
            if self._refused:
                self._refused.pop(rid, None)
                self._unsent.pop(rid, None)
        if type(result) is Reply:  # the RESPONSE carried trailers
            return result if with_metadata else result.result
        return Reply(result, {}) if with_metadata else result

    async def ping(self, timeout: float) -> float:
        if self.endpoint is None:
            raise ConnectError("client is closed")
        start = self.loop.time()
        call = self.calls.start("PING", timeout, start, self.loop.create_future(), timed=False)
        self.core.send_ping(call.request_id)
        self._flush()
        try:
            async with asyncio.timeout(timeout):
                end = await call.waiter
        except TimeoutError:
            raise call.expired("lost or no server") from None
        finally:
            self.calls.forget(call.request_id)
            self._pins.pop(call.request_id, None)
            self._refused.pop(call.request_id, None)
            self._unsent.pop(call.request_id, None)
        return float(end - start)

    async def close(self) -> None:
        self._timer.close()
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        for call in self.calls.drain():
            if not call.waiter.done():
                call.waiter.set_exception(ConnectError("client closed"))
        if self.endpoint is not None and self.endpoint.transport is not None:
            self.endpoint.transport.close()
        self.endpoint = None
        if self._errsock is not None:
            self._errsock.close()
            self._errsock = None


def _forked_error(pid: int) -> ConnectError:
    """What a forked child's copy of a client connected in process ``pid`` raises."""
    return ConnectError(
        f"this client was connected in process {pid}, and an event loop and its connections "
        "do not survive os.fork(): call `await client.connect()` in this process (inside its "
        "own event loop) to connect anew, or create a new AsyncClient"
    )


def _release(transport: asyncio.BaseTransport | None) -> None:
    """In a forked child: this process's copy of the transport's socket is pointed at
    /dev/null, so the child no longer holds the parent's connection open, and nothing the
    inherited loop might still run (a queued write, a keepalive) reaches the parent's peer.
    The descriptor number stays valid, so no later close can hit an unrelated file."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def _orphan(channel: StreamChannel | DatagramChannel) -> None:
    """In a forked child: make the parent's channel inert there (no reconnect, no timer, no
    socket of the parent's), without sending anything."""
    if isinstance(channel, StreamChannel):
        channel.closed = True  # no reconnect from this process
        channel._timer.close()
        stream = channel.stream
        _release(stream.transport if stream is not None else None)
    else:
        channel._timer.close()  # no retransmission of the parent's calls from here
        endpoint = channel.endpoint
        _release(endpoint.transport if endpoint is not None else None)
        errsock, channel._errsock = channel._errsock, None
        if errsock is not None:  # the child's copy of the second handle: closing it is local
            errsock.close()


_connected: weakref.WeakSet[AsyncClient] = weakref.WeakSet()
"""Every client of this process connected at least once: a forked child disowns their
channels."""


def _after_fork_in_child() -> None:
    for client in list(_connected):
        try:
            client._after_fork()
        except Exception:  # a hook must not raise; that client's calls still refuse
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a dropped iterator step's exception retrieved (no 'never retrieved' warning)."""
    if not task.cancelled():
        task.exception()


class _Uploading:
    """One upload of a :class:`StreamChannel`: its call, its window count, and the future its
    sender waits on for room (woken by a CREDIT, the call's answer or the connection's end)."""

    __slots__ = ("call", "count", "wake")

    def __init__(self, call: PendingCall[Waiter], count: ItemUpload) -> None:
        self.call = call
        self.count = count
        self.wake: asyncio.Future[None] | None = None

    def wake_up(self, _: object = None) -> None:
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def credit(self, granted: int) -> None:
        self.count.credit(granted)
        self.wake_up()

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        wake = self.wake = loop.create_future()
        try:
            await wake
        finally:
            self.wake = None


class _Items:
    """One streamed call of a :class:`StreamChannel`: its queued items (:class:`ItemStream`),
    its call (deadline and answer, in the channel's :class:`Calls`), and the future its reader
    waits on. Held by the channel; the reader holds a :class:`ResultStream` around it (so that
    a reader dropping it, ``break``, is seen: the channel keeps no reference to that)."""

    __slots__ = ("call", "channel", "items", "wake")

    def __init__(self, channel: StreamChannel, call: PendingCall[Waiter]) -> None:
        self.channel = channel
        self.call = call
        self.items = ItemStream(call.request_id, call.method)
        self.wake: asyncio.Future[None] | None = None

    def wake_up(self, _: object = None) -> None:
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def fail(self, exc: Exception) -> None:
        """End the call here (the server broke flow control): CANCEL, and ``exc`` raised once
        the items queued before were read."""
        self.give_up()
        if not self.call.waiter.done():
            self.call.waiter.set_exception(exc)

    def give_up(self) -> None:
        """The reader stopped (or the call failed here): forget the call, send CANCEL."""
        channel = self.channel
        rid = self.call.request_id
        if channel.item_streams.get(rid) is self:
            del channel.item_streams[rid]
        if channel.calls.pending.get(rid) is self.call:
            channel.calls.forget(rid)
            channel._cancel(rid)
        self.wake_up()  # a reader awaiting the next item sees the end


_background: set[asyncio.Task[None]] = set()  # hooks of dropped streams, running


class ResultStream:
    """The items of a streamed call, in order: ``async for item in client.stream(...)``.

    The request is sent when iteration starts. Items are queued as they arrive, within the
    stream's flow-control window, and granted back to the server (CREDIT) as they are read, so
    a slow reader slows the server's generator down instead of filling memory. The call's
    timeout bounds the whole stream. Its error (the generator's exception, the deadline, a lost
    connection) is raised from the iterator after the items that came before it. Leaving the
    loop early (``break``, an exception), :meth:`aclose` or ``async with`` ending sends CANCEL:
    the server closes the generator. After the last item, :attr:`result` is the generator's
    return value (None for most) and :attr:`metadata` the server's trailers."""

    def __init__(
        self,
        client: AsyncClient,
        channel: StreamChannel,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float,
        metadata: Mapping[str, str | bytes] | None,
    ) -> None:
        self._client = client
        self._channel = channel
        self._request = (method, args, kwargs, timeout, metadata)
        self._items: _Items | None = None
        self._ended = False
        self._hooks: StreamHooks | None = None  # the client's interceptors, if any
        self.result: Any = None
        """The generator's return value, once the stream ended."""
        self.metadata: Mapping[str, str | bytes] = {}
        """The server's trailers, once the stream ended."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._hooks is None and self._client.hooks is None:
            return await self._next()
        try:
            return await self._next()
        except StopAsyncIteration:
            if self._hooks is not None:
                await self._hooks.end_async(Reply(self.result, self.metadata), None)
            raise
        except BaseException as exc:
            if self._hooks is not None:
                await self._hooks.end_async(None, exc)
            raise

    async def _start(self) -> _Items:
        request = self._request
        client = self._client
        self._ended = True  # until the request is sent: a failed start is the stream's end
        if client.hooks is not None:
            ep = self._channel.ep
            hooks = StreamHooks.around(client.hooks, request, client.metadata, ep)
            self._hooks = hooks
            await hooks.start_async()
            request = hooks.request()
        method, args, kwargs, timeout, metadata = request
        items = await self._channel.start_stream(
            method, args, kwargs, timeout, client.codec, metadata
        )
        self._ended = False
        return items

    async def _next(self) -> Any:
        items = self._items
        if items is None:
            if self._ended:
                raise StopAsyncIteration
            items = self._items = await self._start()
        queue = items.items
        while True:
            if self._ended:  # ended, or closed by the reader (items still queued are dropped)
                raise StopAsyncIteration
            if queue.items:
                call = items.call
                if call.deadline <= self._channel.loop.time():
                    # The timeout bounds the stream for a slow reader too: what is queued of a
                    # stream that did not end in time is dropped (one that did is read out).
                    waiter = call.waiter
                    if not waiter.done():
                        items.give_up()  # CANCEL
                        waiter.set_exception(call.expired())
                    if waiter.cancelled() or waiter.exception() is not None:
                        self._finish(items, waiter)
                value, grant = queue.take()
                if grant:
                    self._channel.grant(queue.request_id, grant)
                return value
            waiter = items.call.waiter
            if waiter.done():
                self._finish(items, waiter)
            wake = items.wake = self._channel.loop.create_future()
            try:
                await wake
            finally:
                items.wake = None

    def _finish(self, items: _Items, waiter: Waiter) -> None:
        """The call's answer came and every item before it was read: end, or raise."""
        self._ended = True
        items.give_up()  # no longer in flight: sends nothing (the call is answered)
        exc = waiter.exception()
        if exc is not None:
            raise exc  # (an ITEM that did not decode: CANCEL was sent then, handle_events)
        result = waiter.result()
        if type(result) is Reply:
            self.result, self.metadata = result.result, result.metadata
        else:
            self.result = result
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop reading: CANCEL (the server closes the generator) unless the stream ended."""
        if self._release() and self._hooks is not None:
            await self._hooks.end_async(None, self._hooks.stopped())

    def _release(self) -> bool:
        """Stop the stream (CANCEL) if it has not ended; True when it was stopped here (the
        interceptors' ``error`` hooks are then the caller's to run)."""
        items = self._items
        if self._ended:
            return False
        self._ended = True
        if items is None:
            return False
        items.give_up()
        waiter = items.call.waiter
        if waiter.done() and not waiter.cancelled():
            waiter.exception()  # retrieved: nobody reads this stream's end now
        return True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # ``break`` out of ``async for``: the iterator is dropped at once (CPython), and with
        # it the stream: CANCEL, so that the server stops. Not here (a garbage collection may
        # run this in any thread, inside anything): on the loop, as its next callback.
        if not self._ended and self._items is not None:
            try:
                loop = self._channel.loop
                if not loop.is_closed():
                    loop.call_soon_threadsafe(self._dropped)
            except Exception:
                pass

    def _dropped(self) -> None:
        """On the loop, for a stream its reader dropped: CANCEL, and the interceptors' error
        hooks (a task of their own)."""
        if self._release() and self._hooks is not None:
            task = self._channel.loop.create_task(
                self._hooks.end_async(None, self._hooks.stopped())
            )
            _background.add(task)
            task.add_done_callback(_background.discard)


class AsyncClient(ClientSettings):
    """An asyncio client for ``tcp://host:port`` or ``udp://host:port``.

    ``url`` may list several TCP servers (``"tcp://a:5050,tcp://b:5050"`` or a list): the client
    uses the first that answers and, when its connection drops, reconnects to the same server or
    else fails over to the next ones in order.
    ``timeout`` is the default per-call timeout; ``codec`` one of "msgpack" (default), "json",
    "raw". TCP: ``reconnect`` (default True) with ``backoff``. UDP: ``retry`` policy and
    ``max_datagram`` (requests above it are refused locally, before sending).
    ``metadata``: sent with every call (string keys of ``[a-z0-9._-]``, str or bytes values;
    a call's own ``metadata`` overrides it key by key), to servers that read it.

    Each call carries the time it has left (its timeout; inside a method a server runs, at most
    that call's time left), so the server stops work nobody waits for; a call cancelled or
    timed out here sends CANCEL, which stops it on the server (TCP/TLS, PROTOCOL.md §4).
    ``sockstack.AsyncClient`` adds the patterns' client methods (``publish``, ``subscribe``).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        close_timeout: float = 2.0,
        codec: str = "msgpack",
        reconnect: bool = True,
        backoff: Backoff | None = None,
        stream_limits: StreamLimits | None = None,
        retry: RetryPolicy | None = None,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
        tls: ssl.SSLContext | None = None,
        secret: str | bytes | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        interceptors: Sequence[object] = (),
    ) -> None:
        self.metadata: Metadata | None = merge_metadata(metadata, None)  # checked now
        hooks = Hooks(interceptors)
        self.hooks: Hooks | None = hooks if hooks else None
        """Hooks of the interceptors around every call (sockstack.interceptors); None
        without (one ``is None`` test a call)."""
        self._configure(
            url,
            timeout=timeout,
            connect_timeout=connect_timeout,
            codec=codec,
            backoff=backoff,
            retry=retry,
            max_datagram=max_datagram,
            tls=tls,
            secret=secret,
        )
        self.close_timeout = close_timeout
        self.reconnect = reconnect
        self.stream_limits = stream_limits or StreamLimits()
        self._channel: StreamChannel | DatagramChannel | None = None
        self._pid = os.getpid()
        self._forked_from = 0
        """In a forked child: the pid of the process this client was connected in (its
        channel stays there: ``_channel`` is None here until :meth:`connect`)."""

    async def connect(self) -> Self:
        """Connect (TCP: and complete the handshake). Raises :class:`ConnectError`. In a
        forked child, connects anew a client that was connected in the parent."""
        if self._channel is None:
            channel: StreamChannel | DatagramChannel
            if self.endpoint.scheme == "udp":
                channel = DatagramChannel(self.endpoint, self)
            else:
                channel = StreamChannel(self.endpoints, self)
            # Within connect_timeout and the call timeout (a call's timeout bounds the whole
            # call, connecting included).
            await channel.connect_once(self.first_connect_timeout())
            self._channel = channel
            self._pid = os.getpid()
            self._forked_from = 0
            _connected.add(self)
        return self

    def _after_fork(self) -> None:
        """In a forked child: refuse to use the parent's channel (see the module's notes)."""
        channel = self._channel
        if channel is None:
            return
        self._channel = None
        self._forked_from = self._pid
        _orphan(channel)

    def _not_connected(self, detail: str = ": use `async with` or connect()") -> ConnectError:
        if self._forked_from:
            return _forked_error(self._forked_from)
        return ConnectError(f"client is not connected{detail}")

    def call(
        self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Coroutine[Any, Any, Any]:
        """Call ``method`` with positional and keyword arguments; await the result.
        ``timeout`` is reserved for the call's own timeout (use :meth:`request` for a remote
        parameter named ``timeout``)."""
        # A plain function returning the channel's coroutine: one coroutine layer less per call.
        return self.request(method, args, kwargs, timeout=timeout)

    @overload
    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: Literal[False] = False,
    ) -> Coroutine[Any, Any, Any]: ...

    @overload
    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: Literal[True],
    ) -> Coroutine[Any, Any, Reply]: ...

    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """Like :meth:`call`, with the arguments as a sequence and a mapping. ``metadata``:
        this call's, over the client's defaults; ``with_metadata=True``: return a
        :class:`~sockstack.protocol.calls.Reply` (the result, and the server's trailers)."""
        channel = self._channel
        if channel is None:
            return _fail(self._not_connected())
        if self.hooks is not None:
            return self._intercepted(
                channel, method, args, kwargs, timeout, metadata, with_metadata
            )
        return channel.call(
            method,
            args if type(args) is tuple else tuple(args),
            kwargs or None,
            self.timeout if timeout is None else timeout,
            self.codec,
            metadata,
            with_metadata,
        )

    async def call_many(
        self,
        method: str,
        calls: Iterable[Sequence[Any]],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        window: int = DEFAULT_WINDOW,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Call ``method`` once per argument sequence of ``calls`` (positional arguments: ``[(1,
        2), (3, 4)]``), pipelined on one connection, and return the results in order. Far
        cheaper than ``gather`` of :meth:`call`: the calls are encoded and written together,
        up to ``window`` in flight, and their answers go into one list (no future or task per
        call). ``calls`` is read as calls are sent, so a generator of any length works in
        bounded memory (``window`` calls and their answers).

        Each call has ``timeout`` from when it is sent. A call that fails raises its error
        once the calls before it are answered; the calls after it still in flight are then
        cancelled (CANCEL: the server stops them; some may have run). With
        ``return_exceptions=True`` a failed call's exception takes its place in the list
        instead, as with :func:`asyncio.gather`."""
        out: list[Any] = []
        async for run in self._many(method, calls, timeout, metadata, window, False):
            for value in run:
                if type(value) is _Failed:
                    if not return_exceptions:
                        raise value.exc
                    value = value.exc
                out.append(value)
        return out

    async def iter_many(
        self,
        method: str,
        calls: Iterable[Sequence[Any]],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        window: int = DEFAULT_WINDOW,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Any]:
        """:meth:`call_many` as an async iterator: each result in call order as soon as it
        and those before it are in (``async for result in client.iter_many("add", pairs)``).
        Leaving the loop early cancels the calls still in flight."""
        gen = self._many(method, calls, timeout, metadata, window, True)
        try:
            async for run in gen:
                for value in run:
                    if type(value) is _Failed:
                        if not return_exceptions:
                            raise value.exc
                        value = value.exc
                    yield value
        finally:
            await gen.aclose()

    def _many(
        self,
        method: str,
        calls: Iterable[Sequence[Any]],
        timeout: float | None,
        metadata: Mapping[str, str | bytes] | None,
        window: int,
        eager: bool,
    ) -> AsyncGenerator[list[Any], None]:
        batch_plan(window)  # ValueError for a window out of range
        channel = self._channel
        if channel is None:
            raise self._not_connected()
        t = self.timeout if timeout is None else timeout
        if self.hooks is not None or not isinstance(channel, StreamChannel):
            # Interceptors see each call; UDP sends a datagram per call: calls one by one,
            # ``window`` of them in flight.
            return self._many_calls(method, calls, t, metadata, window)
        md = merge_metadata(metadata, None)  # checked now, as the client's defaults are
        return channel.many(method, calls, t, self.codec, md, window, eager)

    async def _many_calls(
        self,
        method: str,
        calls: Iterable[Sequence[Any]],
        timeout: float,
        metadata: Mapping[str, str | bytes] | None,
        window: int,
    ) -> AsyncGenerator[list[Any], None]:
        loop = asyncio.get_running_loop()
        running: deque[asyncio.Future[Any]] = deque()
        it = iter(calls)
        try:
            while True:
                while len(running) < window:
                    args = next(it, _UNANSWERED)
                    if args is _UNANSWERED:
                        break
                    running.append(
                        loop.create_task(
                            self.request(method, tuple(args), timeout=timeout, metadata=metadata)
                        )
                    )
                if not running:
                    return
                first = running.popleft()
                try:
                    value = await first
                except Exception as exc:  # the call's outcome, as call_many's fast path
                    value = _Failed(exc)
                yield [value]
        finally:
            for task in running:
                task.cancel()

    async def _intercepted(
        self,
        channel: StreamChannel | DatagramChannel,
        method: str,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        metadata: Mapping[str, str | bytes] | None,
        with_metadata: bool,
    ) -> Any:
        """A call through the interceptors (run_async: before, the request, after/error)."""
        call = ClientCall.of(
            method,
            args,
            kwargs,
            self.metadata,
            metadata,
            self.timeout if timeout is None else timeout,
            channel.ep,
        )

        def send(c: ClientCall) -> Awaitable[Reply]:
            return cast(
                Awaitable[Reply],
                channel.call(c.method, c.args, c.kwargs, c.timeout, self.codec, c.metadata, True),
            )

        assert self.hooks is not None
        reply = await run_async(self.hooks, call, send)
        return reply if with_metadata else reply.result

    def stream(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        **kwargs: Any,
    ) -> ResultStream:
        """The items of a generator method, as they come: ``async for item in
        client.stream("ticks", 10)`` (TCP and TLS; see :class:`ResultStream`). ``timeout``
        (default: the client's) bounds the whole stream; ``metadata`` is this call's, over the
        client's defaults. Over UDP raises :class:`LocalProtocolError` (code STREAM_MISMATCH)
        and sends nothing. The client's interceptors run once around the whole stream
        (:class:`sockstack.interceptors.StreamHooks`)."""
        return self.stream_request(method, args, kwargs, timeout=timeout, metadata=metadata)

    def stream_request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> ResultStream:
        """Like :meth:`stream`, with the arguments as a sequence and a mapping (as
        :meth:`request` is to :meth:`call`): the method's own keyword arguments may then be
        named ``timeout`` or ``metadata``."""
        args = args if type(args) is tuple else tuple(args)
        return ResultStream(
            self,
            self._stream_only("stream", method),
            method,
            args,
            kwargs or None,
            self.timeout if timeout is None else timeout,
            metadata,
        )

    async def upload(
        self,
        method: str,
        items: Iterable[Any] | AsyncIterable[Any],
        *args: Any,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call a method that takes an item stream (a parameter annotated ``Iterator[T]`` or
        ``AsyncIterator[T]``) with ``items`` (an iterable or async iterable) as that stream,
        and ``args``/``kwargs`` as its other arguments: ``await client.upload("total", rows,
        2)`` (TCP and TLS, PROTOCOL.md §4.4). A plain iterable is iterated on the event loop
        (keep each step quick: a list, a range, a generator of data at hand); one that waits
        should be an async iterable. The items go as the server takes them (its
        flow-control window bounds what is in flight); the result comes back once the method
        returns, which may be before every item was sent (sending then stops and an iterator
        left unfinished is closed). ``timeout`` (default: the client's) bounds the whole call,
        the items' iteration included; a cancelled call sends CANCEL. Over UDP, or to a server
        that does not announce uploads, raises :class:`LocalProtocolError` (STREAM_MISMATCH)
        and sends nothing. The client's interceptors run once around it (``call.upload``)."""
        return await self.upload_request(
            method, items, args, kwargs, timeout=timeout, metadata=metadata
        )

    async def upload_request(
        self,
        method: str,
        items: Iterable[Any] | AsyncIterable[Any],
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> Any:
        """Like :meth:`upload`, with the other arguments as a sequence and a mapping (as
        :meth:`request` is to :meth:`call`): the method's own keyword arguments may then be
        named ``timeout`` or ``metadata``."""
        args = args if type(args) is tuple else tuple(args)
        channel = self._stream_only("upload", method)
        t = self.timeout if timeout is None else timeout
        codec = self.codec
        if self.hooks is None:
            reply = await channel.upload(method, items, args, kwargs or None, t, codec, metadata)
            return reply.result
        call = ClientCall.of(
            method, args, kwargs, self.metadata, metadata, t, channel.ep, upload=True
        )

        def send(c: ClientCall) -> Awaitable[Reply]:
            return channel.upload(c.method, items, c.args, c.kwargs, c.timeout, codec, c.metadata)

        return (await run_async(self.hooks, call, send)).result

    def _stream_only(self, kind: str, method: str) -> StreamChannel:
        """The TCP/TLS channel a stream or an upload (``kind``) needs; over UDP
        :class:`LocalProtocolError` (STREAM_MISMATCH), nothing sent."""
        channel = self._channel
        if channel is None:
            raise self._not_connected()
        if not isinstance(channel, StreamChannel):
            raise LocalProtocolError(
                f"{kind}({method!r}): {kind}s need TCP or TLS (this client is "
                f"{self.endpoint}); nothing was sent",
                ErrorCode.STREAM_MISMATCH,
            )
        return channel

    def stream_channel(self, what: str) -> StreamChannel:
        """The TCP/TLS channel, for patterns that need a connection (ConnectError if none)."""
        channel = self._channel
        if channel is None:
            raise self._not_connected()
        if not isinstance(channel, StreamChannel):
            raise ConnectError(f"{what} needs a tcp:// or tls:// URL")
        return channel

    @property
    def channel(self) -> StreamChannel | DatagramChannel | None:
        """The connected channel (None before :meth:`connect`, and in a forked child until
        :meth:`connect`)."""
        return self._channel

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of one PING/PONG, in seconds."""
        if self._channel is None:
            raise self._not_connected("")
        return await self._channel.ping(self.timeout if timeout is None else timeout)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
