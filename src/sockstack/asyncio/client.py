"""The asyncio client, over TCP or UDP, with the same calls::

    async with AsyncClient("tcp://127.0.0.1:5050") as c:
        assert await c.call("add", 2, 3) == 5
        results = await asyncio.gather(*(c.call("add", i, i) for i in range(1000)))

Many calls share one connection (pipelining), matched by request id. Each call has a timeout
(:class:`CallTimeout`). Over TCP, a dropped connection fails every call in flight at once with
:class:`ConnectionLost` ("may or may not have run") and the client reconnects in the background
with jittered exponential backoff; a call made meanwhile waits for the reconnect within its own
timeout. Over UDP, a call is retransmitted with the same request id until answered or timed out;
the server's reply cache makes sure it runs once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import inspect
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from sockstack.asyncio.datagram import DatagramEndpoint
from sockstack.asyncio.stream import StreamLimits, StreamProtocol
from sockstack.errors import (
    CallTimeout,
    CodecError,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
    RemoteError,
)
from sockstack.protocol.auth import AuthFailure, DatagramAuth, token_extension, unsealed_refusal
from sockstack.protocol.codecs import CODECS, Codec, get_codec
from sockstack.protocol.connection import (
    ConnectionTerminated,
    HandshakeComplete,
    ProtocolViolation,
    State,
)
from sockstack.protocol.datagram import (
    DEFAULT_MAX_DATAGRAM,
    CallExpired,
    DatagramClient,
    RetryPolicy,
)
from sockstack.protocol.messages import CORE_MESSAGES, Error, Pong, Response, Role
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import (
    PUBSUB_MESSAGES,
    Msg,
    encode_ack,
    encode_pub,
    encode_sub,
    encode_unsub,
    sub_options,
)
from sockstack.pubsub.topics import check_topic
from sockstack.transport.tls import client_context
from sockstack.transport.urls import Endpoint, parse_endpoints

__all__ = ["DEFAULT_TIMEOUT", "AsyncClient", "Backoff"]

log = logging.getLogger("sockstack.client")
_SENDABLE = (State.OPEN, State.HELLO_SENT)
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``initial * factor**attempt`` capped at ``max_delay``, each scaled by a
    random factor in [0.5, 1] so that many clients do not reconnect in lockstep."""

    initial: float = 0.05
    factor: float = 2.0
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.initial * self.factor**attempt, self.max_delay) * random.uniform(0.5, 1.0)


async def _fail(exc: Exception) -> Any:
    raise exc


def tls_reason(exc: ssl.SSLError) -> str:
    """What went wrong in a TLS handshake, in words (the verify message when there is one)."""
    detail = getattr(exc, "verify_message", None) or exc.reason or str(exc)
    return f"{exc.reason}: {detail}" if exc.reason and detail != exc.reason else str(detail)


def _os_error(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def outcome_error(ev: Error, method: str) -> RemoteError:
    return RemoteError(ev.type or ErrorCode.describe(ev.code), ev.message, ev.code)


class _Pending:
    __slots__ = ("deadline", "fut", "method", "timeout")

    def __init__(self, fut: asyncio.Future[Any], method: str, timeout: float = 0.0) -> None:
        self.fut = fut
        self.method = method
        self.timeout = timeout
        self.deadline = 0.0


class _TCPStream(StreamProtocol):
    role = Role.CLIENT

    def __init__(self, channel: _TCPChannel) -> None:
        super().__init__(channel.limits)
        self.channel = channel
        self.welcome: asyncio.Future[None] = self.loop.create_future()
        self.terminated: ConnectionTerminated | None = None

    def core_options(self) -> dict[str, Any]:
        secret = self.channel.client.secret
        options: dict[str, Any] = {"registry": self.channel.client.registry}
        if secret is not None:
            options["hello_extensions"] = [token_extension(secret)]
        return options

    def handle_events(self, events: list[Any]) -> None:
        pending = self.channel.pending
        for ev in events:
            t = type(ev)
            if t is Response:
                p = pending.pop(ev.request_id, None)
                if p is not None and not p.fut.done():
                    p.fut.set_result(ev.result)
            elif t is Error:
                p = pending.pop(ev.request_id, None)
                if p is not None and not p.fut.done():
                    p.fut.set_exception(outcome_error(ev, p.method))
                elif ev.request_id == 0:
                    log.warning("server %s reported: %s %s", self.peer, ev.type, ev.message)
            elif t is Pong:
                p = pending.pop(ev.request_id, None)
                if p is not None and not p.fut.done():
                    p.fut.set_result(self.loop.time())
            elif t is HandshakeComplete:
                if not self.welcome.done():
                    self.welcome.set_result(None)
            elif t is ConnectionTerminated:
                self.terminated = ev
            elif t is Msg:
                self.channel._on_msg(ev)
            elif t is ProtocolViolation:
                self.log_violation(ev)

    def can_send(self) -> bool:
        core = self.core
        return core is not None and core.state in _SENDABLE and not self.transport.is_closing()  # type: ignore[union-attr]

    def on_lost(self, exc: Exception | None) -> None:
        self.channel._on_lost(self, exc)


class _TCPChannel:
    def __init__(self, eps: list[Endpoint], client: AsyncClient) -> None:
        self.eps = eps
        self._index = 0
        self.client = client
        self.limits = client.stream_limits
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, _Pending] = {}
        self.stream: _TCPStream | None = None
        self.connected = asyncio.Event()
        self.closed = False
        self.last_error: str = ""
        self._next_id = 0
        self._reconnect_task: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._deadlines: list[tuple[float, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.subscriptions: dict[int, Subscription] = {}

    @property
    def ep(self) -> Endpoint:
        return self.eps[self._index]

    async def connect_once(self, timeout: float) -> None:
        """Connect to the current server, else to the next ones in the list (failover)."""
        errors = []
        n = len(self.eps)
        for i in range(n):
            index = (self._index + i) % n
            try:
                stream = await self._connect_to(self.eps[index], timeout)
            except ConnectError as exc:
                errors.append(str(exc))
                continue
            if index != self._index:
                log.warning("failing over from %s to %s", self.ep, self.eps[index])
            self._index = index
            self.stream = stream
            self.last_error = ""
            self.connected.set()
            return
        raise ConnectError("; ".join(errors))

    async def _connect_to(self, ep: Endpoint, timeout: float) -> _TCPStream:
        stream: _TCPStream | None = None
        try:
            async with asyncio.timeout(timeout):
                tls = self.client.tls if ep.scheme == "tls" else None
                _, stream = await self.loop.create_connection(
                    lambda: _TCPStream(self),
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
        except OSError as exc:
            raise ConnectError(f"{ep}: {_os_error(exc)}") from None
        except ConnectionLost as exc:  # closed during the handshake (version, auth...)
            raise ConnectError(f"{ep}: {exc}") from None
        return stream

    def _on_lost(self, stream: _TCPStream, exc: Exception | None) -> None:
        term = stream.terminated
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
        if not stream.welcome.done():
            stream.welcome.set_exception(error)
            stream.welcome.exception()  # retrieved: connect_once reports it
        if stream is not self.stream:
            return
        self.stream = None
        self.connected.clear()
        self.last_error = str(error)
        pending, self.pending = self.pending, {}
        for p in pending.values():
            if not p.fut.done():
                p.fut.set_exception(error)
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
                self._resubscribe()
                return
            except ConnectError as exc:
                self.last_error = str(exc)
            await asyncio.sleep(self.client.backoff.delay(attempt))  # backoff between attempts
            attempt += 1

    def _new_id(self) -> int:
        rid = self._next_id
        while True:
            rid = rid % 0xFFFFFFFF + 1
            if rid not in self.pending:
                self._next_id = rid
                return rid

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
                    if not self.client.reconnect:
                        raise ConnectionLost(self.last_error or f"{self.ep}: not connected")
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
    ) -> Any:
        stream = self.stream
        loop = self.loop
        deadline = loop.time() + timeout
        if stream is None or not stream.can_send():
            stream = await self._wait_connected(method, timeout, deadline)
        rid = self._new_id()
        assert stream.core is not None
        stream.core.send_request(rid, method, args, kwargs, codec)  # CodecError: nothing sent
        fut = loop.create_future()
        p = self.pending[rid] = _Pending(fut, method, timeout)
        p.deadline = deadline
        if not self._flush_scheduled:
            # Requests made in the same loop iteration leave in one write.
            self._flush_scheduled = True
            loop.call_soon(self._flush, stream)
        heapq.heappush(self._deadlines, (deadline, rid))
        if self._timer_at is None or deadline < self._timer_at:
            self._arm(deadline)
        try:
            return await fut
        finally:
            if self.pending.get(rid) is p:  # cancelled by the caller
                del self.pending[rid]

    def _flush(self, stream: _TCPStream) -> None:
        self._flush_scheduled = False
        stream.flush()

    # One timer for all calls: a heap of (deadline, id), the timer set at the earliest. Answered
    # calls leave stale heap entries that are skipped when they come up.
    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = self.loop.time()
        heap = self._deadlines
        pending = self.pending
        while heap and heap[0][0] <= now:
            deadline, rid = heapq.heappop(heap)
            p = pending.get(rid)
            if p is not None and p.deadline == deadline:
                del pending[rid]
                if not p.fut.done():
                    p.fut.set_exception(CallTimeout(p.method, p.timeout))
        if not pending:
            heap.clear()
        elif heap:
            self._arm(heap[0][0])

    def _expire(self, rid: int, timeout: float) -> None:
        p = self.pending.pop(rid, None)
        if p is not None and not p.fut.done():
            p.fut.set_exception(CallTimeout(p.method, timeout))

    # ------------------------------------------------------------------ publish/subscribe

    async def _exchange(self, frame: Callable[[int], bytes], what: str, timeout: float) -> int:
        """Send the frame built for a fresh id and wait for its RESPONSE; returns the id."""
        loop = self.loop
        deadline = loop.time() + timeout
        stream = self.stream
        if stream is None or not stream.can_send():
            stream = await self._wait_connected(what, timeout, deadline)
        rid = self._new_id()
        assert stream.core is not None
        fut = loop.create_future()
        self.pending[rid] = _Pending(fut, what, timeout)
        try:
            stream.core.send_message(frame(rid))
            stream.flush()
            async with asyncio.timeout_at(deadline):
                await fut
        except TimeoutError:
            raise CallTimeout(what, timeout) from None
        finally:
            self.pending.pop(rid, None)
        return rid

    async def publish(
        self, topic: str, payload: bytes, codec: int, qos: int, retain: bool, timeout: float
    ) -> None:
        if qos == 1:
            await self._exchange(
                lambda rid: encode_pub(topic, payload, rid, codec, retain), "PUB " + topic, timeout
            )
            return
        if not self.publish_now(topic, payload, codec, retain):
            await self._wait_connected("PUB " + topic, timeout, self.loop.time() + timeout)
            self.publish_now(topic, payload, codec, retain)

    def publish_now(self, topic: str, payload: bytes, codec: int, retain: bool) -> bool:
        """QoS 0: queue the PUB on the open stream (False, nothing queued, when there is none)."""
        stream = self.stream
        if stream is None or stream.core is None or not stream.can_send():
            return False
        self._send_soon(stream, encode_pub(topic, payload, 0, codec, retain))
        return True

    def _send_soon(self, stream: _TCPStream, frame: bytes) -> None:
        """Queue a frame; everything queued in one loop iteration leaves in one write."""
        assert stream.core is not None
        stream.core.send_message(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush, stream)

    async def subscribe(self, sub: Subscription, timeout: float) -> None:
        def frame(sid: int) -> bytes:
            sub.sid = sid
            self.subscriptions[sid] = sub  # before the answer: retained messages follow it
            return encode_sub(sid, sub.pattern, sub.options)

        try:
            await self._exchange(frame, "SUB " + sub.pattern, timeout)
        except BaseException:
            self.subscriptions.pop(sub.sid, None)
            raise

    async def unsubscribe(self, sub: Subscription, timeout: float) -> None:
        if self.subscriptions.pop(sub.sid, None) is None:
            return
        stream = self.stream
        if stream is not None and stream.can_send() and stream.core is not None:
            stream.core.send_message(encode_unsub(sub.sid))
            stream.flush()

    def _resubscribe(self) -> None:
        """After a reconnect: the (new) broker knows none of our subscriptions; send them all
        again under the same ids. Their answers have no waiter and are ignored."""
        stream = self.stream
        if stream is None or stream.core is None or not self.subscriptions:
            return
        for sid, sub in self.subscriptions.items():
            stream.core.send_message(encode_sub(sid, sub.pattern, sub.options))
        stream.flush()
        log.info("resubscribed %d subscriptions", len(self.subscriptions))

    def _on_msg(self, msg: Msg) -> None:
        sub = self.subscriptions.get(msg.sid)
        if sub is None:
            return  # unsubscribed meanwhile
        sub._arrive(msg)

    def ack(self, delivery_id: int) -> None:
        stream = self.stream
        if stream is not None and stream.can_send() and stream.core is not None:
            self._send_soon(stream, encode_ack(delivery_id))

    async def ping(self, timeout: float) -> float:
        loop = self.loop
        deadline = loop.time() + timeout
        stream = self.stream
        if stream is None or not stream.can_send():
            stream = await self._wait_connected("PING", timeout, deadline)
        rid = self._new_id()
        assert stream.core is not None
        fut = loop.create_future()
        self.pending[rid] = _Pending(fut, "PING")
        start = loop.time()
        stream.core.send_ping(rid, b"")
        stream.flush()
        handle = loop.call_at(deadline, self._expire, rid, timeout)
        try:
            end = await fut
        finally:
            handle.cancel()
        return float(end - start)

    async def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
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

    def __init__(self, channel: _UDPChannel) -> None:
        super().__init__()
        self.channel = channel

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.channel._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.channel.last_error = f"{type(exc).__name__}: {exc}"


class _UDPChannel:
    def __init__(self, ep: Endpoint, client: AsyncClient) -> None:
        self.ep = ep
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.core = DatagramClient(max_datagram=client.max_datagram, retry=client.retry)
        self.pending: dict[int, _Pending] = {}
        self.endpoint: _UDPEndpoint | None = None
        self.last_error = ""
        self._last_id = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._ping_start: dict[int, float] = {}
        secret = client.secret
        self.auth = DatagramAuth(secret) if secret is not None else None

    async def connect_once(self, timeout: float) -> None:
        family = socket.AF_INET6 if self.ep.is_ipv6 else socket.AF_INET
        try:
            _, self.endpoint = await self.loop.create_datagram_endpoint(
                lambda: _UDPEndpoint(self), remote_addr=(self.ep.host, self.ep.port), family=family
            )
        except OSError as exc:
            raise ConnectError(f"{self.ep}: {_os_error(exc)}") from None

    def _new_id(self) -> int:
        rid = self.core.new_request_id(self._last_id)
        while rid in self.pending:
            rid = self.core.new_request_id(rid)
        self._last_id = rid
        return rid

    def publish(self, topic: str, payload: bytes, codec: int, retain: bool) -> None:
        """QoS 0 over UDP: one PUB datagram, no answer."""
        ep = self.endpoint
        if ep is None or ep.transport is None:
            raise ConnectError("client is closed")
        data = encode_pub(topic, payload, 0, codec, retain)
        ep.transport.sendto(data if self.auth is None else self.auth.seal(data, time.time()))

    def _flush(self) -> None:
        ep = self.endpoint
        if ep is None or ep.transport is None:
            return
        auth = self.auth
        for data in self.core.datagrams_to_send():
            ep.transport.sendto(data if auth is None else auth.seal(data, time.time()))
        self._arm()

    def _arm(self) -> None:
        when = self.core.next_timer()
        if when == self._timer_when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = None if when is None else self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        for ev in self.core.handle_timer(self.loop.time()):
            self._expired(ev)
        self._flush()

    def _expired(self, ev: CallExpired) -> None:
        p = self.pending.pop(ev.request_id, None)
        if p is not None and not p.fut.done():
            detail = f"{ev.attempts} datagrams sent"
            if self.last_error:
                detail += f"; last error: {self.last_error}"
            p.fut.set_exception(CallTimeout(p.method, p.timeout, detail))

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        if self.auth is not None:
            try:
                data = self.auth.open(data, time.time(), track=False)
            except AuthFailure as exc:
                if not unsealed_refusal(data):
                    self.last_error = f"dropped a datagram: {exc.reason}"
                    return
        for ev in self.core.receive_datagram(data):
            t = type(ev)
            if t is Response:
                p = self.pending.pop(ev.request_id, None)
                if p is not None and not p.fut.done():
                    p.fut.set_result(ev.result)
            elif t is Error:
                p = self.pending.pop(ev.request_id, None)
                if p is not None and not p.fut.done():
                    p.fut.set_exception(outcome_error(ev, p.method))
            elif t is Pong:
                p = self.pending.pop(ev.request_id, None)
                if p is not None and not p.fut.done():
                    p.fut.set_result(self.loop.time())
            elif t is ProtocolViolation and self.endpoint is not None:
                self.endpoint.log_violation(ev, addr)

    async def call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float,
        codec: Codec,
    ) -> Any:
        if self.endpoint is None:
            raise ConnectError("client is closed")
        rid = self._new_id()
        now = self.loop.time()
        # DATAGRAM_TOO_LARGE and CodecError are raised here, before anything is sent.
        self.core.send_request(rid, method, args, kwargs, codec, now=now, timeout=timeout)
        fut = self.loop.create_future()
        self.pending[rid] = _Pending(fut, method, timeout)
        self._flush()
        try:
            return await fut
        finally:
            if rid in self.pending:  # cancelled by the caller
                del self.pending[rid]
                self.core.cancel(rid)

    async def ping(self, timeout: float) -> float:
        if self.endpoint is None:
            raise ConnectError("client is closed")
        rid = self._new_id()
        fut = self.loop.create_future()
        self.pending[rid] = _Pending(fut, "PING")
        start = self.loop.time()
        self.core.send_ping(rid)
        self._flush()
        try:
            async with asyncio.timeout(timeout):
                end = await fut
        except TimeoutError:
            raise CallTimeout("PING", timeout, "lost or no server") from None
        finally:
            self.pending.pop(rid, None)
        return float(end - start)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for p in self.pending.values():
            if not p.fut.done():
                p.fut.set_exception(ConnectError("client closed"))
        self.pending.clear()
        if self.endpoint is not None and self.endpoint.transport is not None:
            self.endpoint.transport.close()
        self.endpoint = None


@dataclass(frozen=True, slots=True)
class Message:
    """One published message, as a subscriber receives it."""

    topic: str
    value: Any
    """The payload, decoded with the codec it was published in."""
    retained: bool = False
    """Delivered from the topic's retained store on subscribing."""
    redelivered: bool = False
    """QoS 1: sent again because the first delivery was not acknowledged in time."""


class Subscription:
    """A live subscription: iterate it (``async for msg in sub``), or give ``callback``.

    At QoS 1 each message is acknowledged once the application has it: when the iterator
    returns it, or when the callback returns. Messages wait in a client-side queue of at most
    ``max_pending``; beyond that the oldest are dropped and counted in ``dropped``.
    """

    def __init__(
        self,
        channel: _TCPChannel,
        pattern: str,
        options: dict[str, Any],
        callback: Callable[[Message], Any] | None,
        max_pending: int,
    ) -> None:
        self._channel = channel
        self.pattern = pattern
        self.options = options
        self.sid = 0
        self.callback = callback
        # A plain function's result is not checked for awaitables per message (costly).
        self._async_callback = callback is not None and not (
            inspect.isfunction(callback) and not inspect.iscoroutinefunction(callback)
        )
        self.max_pending = max_pending
        self.dropped = 0
        self.received = 0
        self._queue: collections.deque[tuple[Message, int]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def _arrive(self, msg: Msg) -> None:
        try:
            value = CODECS[msg.codec].decode(msg.payload)
        except (KeyError, CodecError) as exc:
            log.warning("message on %s not decodable: %s", msg.topic, exc)
            if msg.delivery_id:
                self._channel.ack(msg.delivery_id)  # never redeliver what cannot be read
            return
        self.received += 1
        message = Message(msg.topic, value, msg.retained, msg.redelivered)
        if self.callback is not None:
            result = self.callback(message)
            if self._async_callback and inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                if msg.delivery_id:
                    delivery_id = msg.delivery_id

                    def acked(_task: asyncio.Future[Any]) -> None:
                        self._channel.ack(delivery_id)

                    task.add_done_callback(acked)
                return
            if msg.delivery_id:
                self._channel.ack(msg.delivery_id)
            return
        if len(self._queue) >= self.max_pending:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((message, msg.delivery_id))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self, timeout: float | None = None) -> Message:
        """The next message; :class:`CallTimeout` after ``timeout`` seconds without one."""
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise CallTimeout(f"messages on {self.pattern}", timeout or 0.0) from None
            finally:
                self._waiter = None
        message, delivery_id = self._queue.popleft()
        if delivery_id:
            self._channel.ack(delivery_id)
        return message

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        return await self.get()

    async def unsubscribe(self, timeout: float = 5.0) -> None:
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        await self._channel.unsubscribe(self, timeout)


class AsyncClient:
    """An asyncio client for ``tcp://host:port`` or ``udp://host:port``.

    ``url`` may list several TCP servers (``"tcp://a:5050,tcp://b:5050"`` or a list): the client
    uses the first that answers and, when its connection drops, reconnects to the same server or
    else fails over to the next ones in order.
    ``timeout`` is the default per-call timeout; ``codec`` one of "msgpack" (default), "json",
    "raw". TCP: ``reconnect`` (default True) with ``backoff``. UDP: ``retry`` policy and
    ``max_datagram`` (requests above it are refused locally, before sending).
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
        secret: bytes | None = None,
    ) -> None:
        self.secret = secret
        self.endpoints = parse_endpoints(url)
        self.endpoint = self.endpoints[0]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        # tls:// URLs: the given context, else one that verifies against the system's CAs.
        self.tls = tls if tls is not None or self.endpoint.scheme != "tls" else client_context()
        self.codec = get_codec(codec)
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.stream_limits = stream_limits or StreamLimits()
        self.retry = retry
        self.max_datagram = max_datagram
        self._channel: _TCPChannel | _UDPChannel | None = None
        self.registry = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])

    async def connect(self) -> AsyncClient:
        """Connect (TCP: and complete the handshake). Raises :class:`ConnectError`."""
        if self._channel is None:
            channel: _TCPChannel | _UDPChannel
            if self.endpoint.scheme == "udp":
                channel = _UDPChannel(self.endpoint, self)
            else:
                channel = _TCPChannel(self.endpoints, self)
            await channel.connect_once(self.connect_timeout)
            self._channel = channel
        return self

    def call(
        self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Coroutine[Any, Any, Any]:
        """Call ``method`` with positional and keyword arguments; await the result.
        ``timeout`` is reserved for the call's own timeout (use :meth:`request` for a remote
        parameter named ``timeout``)."""
        # A plain function returning the channel's coroutine: one coroutine layer less per call.
        return self.request(method, args, kwargs, timeout=timeout)

    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """Like :meth:`call`, with the arguments as a sequence and a mapping."""
        channel = self._channel
        if channel is None:
            return _fail(ConnectError("client is not connected: use `async with` or connect()"))
        return channel.call(
            method,
            args if type(args) is tuple else tuple(args),
            kwargs or None,
            self.timeout if timeout is None else timeout,
            self.codec,
        )

    def _tcp(self) -> _TCPChannel:
        channel = self._channel
        if channel is None:
            raise ConnectError("client is not connected: use `async with` or connect()")
        if not isinstance(channel, _TCPChannel):
            raise ConnectError("subscribe and QoS 1 need a tcp:// or tls:// broker URL")
        return channel

    async def publish(
        self,
        topic: str,
        value: Any,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish ``value`` (encoded with the client's codec) to ``topic``. QoS 0 returns at
        once (over UDP too); QoS 1 returns once the broker has accepted the message."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        check_topic(topic)  # TopicError (a ValueError) here rather than an ERROR later
        payload = self.codec.encode(value)
        t = self.timeout if timeout is None else timeout
        channel = self._channel
        if isinstance(channel, _UDPChannel):
            if qos:
                raise ConnectError("QoS 1 needs a tcp:// or tls:// broker URL")
            channel.publish(topic, payload, self.codec.id, retain)
            return
        if not qos and type(channel) is _TCPChannel:
            if channel.publish_now(topic, payload, self.codec.id, retain):
                return  # QoS 0 while connected: no coroutine layer below this one
        await self._tcp().publish(topic, payload, self.codec.id, qos, retain, t)

    async def subscribe(
        self,
        pattern: str,
        *,
        group: str | None = None,
        qos: int = 0,
        policy: str | None = None,
        max_msgs: int | None = None,
        max_bytes: int | None = None,
        callback: Callable[[Message], Any] | None = None,
        max_pending: int = 100_000,
        timeout: float | None = None,
    ) -> Subscription:
        """Subscribe to a pattern (``*`` one token, ``>`` the rest). Returns once the broker
        has the subscription, so anything published after that is delivered to it."""
        options = sub_options(group, qos, policy, max_msgs, max_bytes)
        channel = self._tcp()
        sub = Subscription(channel, pattern, options, callback, max_pending)
        await channel.subscribe(sub, self.timeout if timeout is None else timeout)
        return sub

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of one PING/PONG, in seconds."""
        if self._channel is None:
            raise ConnectError("client is not connected")
        return await self._channel.ping(self.timeout if timeout is None else timeout)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
