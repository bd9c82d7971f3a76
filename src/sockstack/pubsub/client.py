"""Publish/subscribe's client side, for both I/O adapters.

:class:`AsyncPubSub` and :class:`BlockingPubSub` give :class:`~sockstack.AsyncClient` and
:class:`~sockstack.Client` their ``publish`` and ``subscribe`` methods. They use only what the
adapters offer every pattern (``exchange`` a frame for a RESPONSE, ``send_soon`` a frame with no
answer, ``routes`` for incoming message classes, ``on_reconnect``, per-client ``state``), and
add publish/subscribe's messages to the client's registry when first used.

What is the same for both flavours (checking a publish, the SUB options, decoding a delivered
message) is written once, here.

Codecs: a publish goes in the client's codec; SUB options in the client's codec when it is
msgpack or JSON (msgpack for a raw client), a SUB without options, UNSUB and ACK with no body
and codec 0. ``clear_retained(topic)`` sends what clears a topic's retained message (an empty
RETAIN publish, codec 0), which no codec's ``publish`` can (an encoded value is never empty,
except the raw codec's ``b""``, which with ``retain=True`` clears too).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sockstack.errors import CallTimeout, CodecError, ConnectError, ConnectionClosed, ConnectionLost
from sockstack.protocol.codecs import CODECS, RAW, Codec
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
from sockstack.pubsub.topics import _CHECKED, check_topic

if TYPE_CHECKING:
    from sockstack.asyncio.client import DatagramChannel, StreamChannel
    from sockstack.sync.client import DatagramConnection, StreamConnection

__all__ = [
    "AsyncPubSub",
    "BlockingPubSub",
    "BlockingSubscription",
    "Message",
    "Subscription",
    "prepare_publish",
]

log = logging.getLogger("sockstack.client")
_STATE = "pubsub"
_MANY_BATCH = 64 << 10  # publish_many: bytes of PUB frames queued or sent as one piece


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


def prepare_publish(topic: str, value: Any, qos: int, codec: Codec) -> bytes:
    """Check a publish before anything is sent; returns the encoded payload. Raises
    ``ValueError`` for a bad QoS, :class:`TopicError` (a ValueError) for a bad topic, and
    :class:`CodecError` for a value the codec cannot encode."""
    if qos not in (0, 1):
        raise ValueError("qos must be 0 or 1")
    check_topic(topic)  # here rather than an ERROR from the broker later
    return codec.encode(value)


def sub_codec(codec: Codec) -> int:
    """The codec SUB options go in: msgpack, whatever the client's codec. Brokers of this
    version decode JSON options too (PROTOCOL.md §4.1, for other implementations), but earlier
    ones read options as msgpack only: a JSON client sending JSON options would break there."""
    return 1


_new = object.__new__
_set_topic, _set_value, _set_retained, _set_redelivered = (
    Message.__dict__[name].__set__ for name in ("topic", "value", "retained", "redelivered")
)


def _message(topic: str, value: Any, retained: bool, redelivered: bool) -> Message:
    """``Message(topic, value, retained, redelivered)`` at less than two thirds of the cost (a
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``; this sets
    its slots directly): once per message delivered."""
    m = _new(Message)
    _set_topic(m, topic)
    _set_value(m, value)
    _set_retained(m, retained)
    _set_redelivered(m, redelivered)
    return m


def _decode(msg: Msg) -> Message:
    """Raises KeyError (unknown codec) or CodecError."""
    return _message(msg.topic, CODECS[msg.codec].decode(msg.payload), msg.retained, msg.redelivered)


T = TypeVar("T")


def _state_of(states: dict[str, Any], make: Callable[[], T], cls: type[T]) -> T:
    """This pattern's state on a channel or connection, made on first use."""
    state = states.get(_STATE)
    if state is None:
        state = states[_STATE] = make()
    assert isinstance(state, cls)
    return state


def _use_pubsub(registry: Registry) -> None:
    registry.add(PUBSUB_MESSAGES)  # idempotent: MSG is decoded from now on


# ---------------------------------------------------------------------------- asyncio


class Subscription:
    """A live subscription: iterate it (``async for msg in sub``), or give ``callback``.

    At QoS 1 each message is acknowledged once the application has it: when the iterator
    returns it, or when the callback returns. Messages wait in a client-side queue of at most
    ``max_pending``; beyond that the oldest are dropped and counted in ``dropped``.
    """

    def __init__(
        self,
        channel: StreamChannel,
        pattern: str,
        options: dict[str, Any],
        callback: Callable[[Message], Any] | None,
        max_pending: int,
        codec: int = 1,
    ) -> None:
        self._channel = channel
        self.pattern = pattern
        self.options = options
        self._codec = codec  # of the SUB's options
        self.sid = 0
        self.callback = callback
        # A plain function's result is not checked for awaitables per message (costly).
        self._async_callback = callback is not None and not (
            inspect.isfunction(callback) and not inspect.iscoroutinefunction(callback)
        )
        self._direct = None if self._async_callback else callback
        """A plain function: QoS 0 messages go to it straight from the read (_AsyncState.on_msg)."""
        self.max_pending = max_pending
        self.dropped = 0
        self.received = 0
        self._queue: collections.deque[tuple[Message, int, object]] = collections.deque()
        """(message, delivery id, the connection it came on: its ACK goes there or nowhere)."""
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._tasks: set[asyncio.Future[Any]] = set()  # async callbacks running, kept till done

    def _ack(self, delivery_id: int, stream: object = None) -> None:
        """ACK on the connection the message came on: after a reconnect its delivery id means
        nothing (or another message) to the broker, which sends it again instead."""
        channel = self._channel
        if stream is None or channel.stream is stream:
            channel.send_soon(encode_ack(delivery_id))

    def _arrive(self, msg: Msg) -> None:
        try:
            message = _decode(msg)
        except (KeyError, CodecError) as exc:
            log.warning("message on %s not decodable: %s", msg.topic, exc)
            if msg.delivery_id:
                self._ack(msg.delivery_id)  # never redeliver what cannot be read
            return
        self.received += 1
        if self.callback is not None:
            if self._async_callback and len(self._tasks) >= self.max_pending:
                # As many callbacks running as messages may wait: drop this one (unacknowledged
                # at QoS 1, so the broker sends it again later) rather than start tasks without
                # bound.
                self.dropped += 1
                return
            result = self.callback(message)
            if self._async_callback and inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if msg.delivery_id:
                    delivery_id = msg.delivery_id
                    stream = self._channel.stream

                    def acked(done: asyncio.Future[Any]) -> None:
                        if not done.cancelled():
                            self._ack(delivery_id, stream)

                    task.add_done_callback(acked)
                return
            if msg.delivery_id:
                self._ack(msg.delivery_id)
            return
        if len(self._queue) >= self.max_pending:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((message, msg.delivery_id, self._channel.stream))
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
        message, delivery_id, stream = self._queue.popleft()
        if delivery_id:
            self._ack(delivery_id, stream)
        return message

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        return await self.get()

    async def unsubscribe(self, timeout: float = 5.0) -> None:
        """End the subscription; async callbacks still running are cancelled and awaited (at
        most ``timeout`` seconds): none outlives it."""
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        _AsyncState.of(self._channel).unsubscribe(self)
        await self._finish(timeout)

    async def _finish(self, timeout: float) -> None:
        await _cancel_and_wait(self._tasks, timeout)


async def _cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], timeout: float) -> None:
    """Cancel callback tasks and wait for them, at most ``timeout`` seconds in all; never the
    task running this (a callback that unsubscribes or closes the client goes on)."""
    me = asyncio.current_task()
    others = [t for t in tasks if t is not me]
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=timeout)


class _AsyncState:
    """Publish/subscribe's state on one asyncio channel: its live subscriptions by id."""

    def __init__(self, channel: StreamChannel) -> None:
        self.channel = channel
        self.subscriptions: dict[int, Subscription] = {}
        _use_pubsub(channel.client.registry)
        channel.routes[Msg] = self.on_msg
        channel.on_reconnect.append(self.resubscribe)
        channel.on_close.append(self.close)

    @classmethod
    def of(cls, channel: StreamChannel) -> _AsyncState:
        return _state_of(channel.state, lambda: cls(channel), cls)

    def on_msg(self, msg: Msg) -> None:
        sub = self.subscriptions.get(msg.sid)
        if sub is None:
            return  # unsubscribed meanwhile
        direct = sub._direct
        if direct is not None and not msg.delivery_id:
            # QoS 0 to a plain function, the bulk of the traffic: decoded and handed over here
            # (what _arrive does for this case, without its branches).
            codec = CODECS.get(msg.codec)
            if codec is not None:
                try:
                    value = codec.decode(msg.payload)
                except CodecError:
                    pass
                else:
                    sub.received += 1
                    direct(_message(msg.topic, value, msg.retained, msg.redelivered))
                    return
        sub._arrive(msg)  # (which also reports what cannot be decoded)

    async def subscribe(self, sub: Subscription, timeout: float) -> None:
        def frame(sid: int) -> bytes:
            sub.sid = sid
            self.subscriptions[sid] = sub  # before the answer: retained messages follow it
            return encode_sub(sid, sub.pattern, sub.options, sub._codec)

        try:
            await self.channel.exchange(frame, "SUB " + sub.pattern, timeout)
        except BaseException:
            self.subscriptions.pop(sub.sid, None)
            raise

    def unsubscribe(self, sub: Subscription) -> None:
        if self.subscriptions.pop(sub.sid, None) is not None:
            self.channel.send_soon(encode_unsub(sub.sid))

    async def close(self) -> None:
        """The client closes: no callback task of a subscription outlives it."""
        tasks: list[asyncio.Future[Any]] = []
        for sub in list(self.subscriptions.values()):
            sub._closed = True
            if sub._waiter is not None and not sub._waiter.done():
                sub._waiter.set_result(None)
            tasks += sub._tasks
        await _cancel_and_wait(tasks, self.channel.client.close_timeout)

    def resubscribe(self) -> None:
        """After a reconnect: the (new) broker knows none of our subscriptions; send them all
        again under the same ids. Their answers have no waiter and are ignored."""
        for sid, sub in self.subscriptions.items():
            self.channel.send_soon(encode_sub(sid, sub.pattern, sub.options, sub._codec))
        if self.subscriptions:
            log.info("resubscribed %d subscriptions", len(self.subscriptions))


class AsyncPubSub:
    """``publish``, ``clear_retained`` and ``subscribe`` for :class:`~sockstack.AsyncClient`."""

    codec: Codec
    timeout: float

    if TYPE_CHECKING:

        @property
        def channel(self) -> StreamChannel | DatagramChannel | None: ...
        def stream_channel(self, what: str) -> StreamChannel: ...

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
        channel = self.channel
        if qos == 0 and channel is not None and channel.kind == "stream":
            # QoS 0 while connected, the bulk of publishing: queued for this loop iteration's
            # write, without another coroutine; paced to what the broker reads (a publisher
            # in a tight loop waits for the write buffer to drain rather than overrun it).
            # prepare_publish's checks, inline (a topic seen before is a dictionary lookup).
            if topic not in _CHECKED:
                check_topic(topic)
            codec = self.codec
            stream: StreamChannel = channel  # type: ignore[assignment]
            if await stream.send_paced(encode_pub(topic, codec.encode(value), 0, codec.id, retain)):
                return
        payload = prepare_publish(topic, value, qos, self.codec)
        await self._publish(topic, payload, self.codec.id, qos, retain, timeout)

    async def publish_many(self, topic: str, values: Iterable[Any], *, retain: bool = False) -> int:
        """Publish each of ``values`` to ``topic`` at QoS 0, in order: the same messages as a
        ``publish(topic, value, retain=retain)`` per value, for a fraction of the CPU (the
        topic checked once, no coroutine per message: the frames are queued together, 64 KiB
        at a time, and paced as :meth:`publish` paces them). Returns how many were published
        (all, unless an exception is raised). A value the codec cannot encode raises
        :class:`CodecError`, those before it having been queued only if they filled a batch;
        a bad topic raises :class:`TopicError` before anything is sent. QoS 1 has an answer
        per message: use :meth:`publish` for it."""
        check_topic(topic)
        codec = self.codec
        encode, cid = codec.encode, codec.id
        n = size = 0
        batch: list[bytes] = []
        for value in values:
            frame = encode_pub(topic, encode(value), 0, cid, retain)
            if batch and size + len(frame) > _MANY_BATCH:
                n += await self._publish_batch(topic, batch)
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        if batch:
            n += await self._publish_batch(topic, batch)
        return n

    async def _publish_batch(self, topic: str, frames: list[bytes]) -> int:
        """Queue QoS 0 PUB frames as one piece (the session checks a piece as one frame
        against the server's limit: within it, or frames one by one)."""
        channel = self.channel
        if channel is not None and channel.kind == "stream" and len(frames) > 1:
            stream: StreamChannel = channel  # type: ignore[assignment]
            tcp = stream.stream
            core = tcp.core if tcp is not None else None
            if core is not None and sum(map(len, frames)) <= core.peer_max_frame:
                if await stream.send_paced(b"".join(frames)):
                    return len(frames)
        for frame in frames:  # one by one: over UDP, or not connected now (as publish waits)
            await self._publish_frame(topic, frame, None)
        return len(frames)

    async def clear_retained(
        self, topic: str, *, qos: int = 1, timeout: float | None = None
    ) -> None:
        """Clear ``topic``'s retained message: later subscribers get none, and nothing is
        delivered to those subscribed now (an empty RETAIN publish, PROTOCOL.md §4.1). At QoS
        1 (the default) it returns once the broker has done it; clearing a topic with nothing
        retained is not an error."""
        prepare_publish(topic, None, qos, RAW)
        await self._publish(topic, b"", 0, qos, True, timeout)

    async def _publish(
        self,
        topic: str,
        payload: bytes,
        codec: int,
        qos: int,
        retain: bool,
        timeout: float | None,
    ) -> None:
        if not qos:
            await self._publish_frame(topic, encode_pub(topic, payload, 0, codec, retain), timeout)
            return
        stream = self.stream_channel("QoS 1")
        t = self.timeout if timeout is None else timeout
        await stream.exchange(
            lambda rid: encode_pub(topic, payload, rid, codec, retain), "PUB " + topic, t
        )

    async def _publish_frame(self, topic: str, frame: bytes, timeout: float | None) -> None:
        """A QoS 0 PUB ``frame``: queued for this loop iteration's write while connected
        (paced), a datagram over UDP, or sent once (re)connected."""
        channel = self.channel
        if channel is not None:
            if channel.kind == "stream":
                if await cast("StreamChannel", channel).send_paced(frame):
                    return
            else:
                cast("DatagramChannel", channel).send_datagram(frame)
                return
        stream = self.stream_channel("QoS 1")
        t = self.timeout if timeout is None else timeout
        await stream.wait_connected("PUB " + topic, t)
        stream.send_soon(frame)

    async def subscribe(
        self,
        pattern: str,
        *,
        group: str | None = None,
        qos: int = 0,
        policy: str | None = None,
        max_msgs: int | None = None,
        max_bytes: int | None = None,
        durable: str | None = None,
        max_age: float | None = None,
        callback: Callable[[Message], Any] | None = None,
        max_pending: int = 100_000,
        timeout: float | None = None,
    ) -> Subscription:
        """Subscribe to a pattern (``*`` one token, ``>`` the rest). Returns once the broker
        has the subscription, so anything published after that is delivered to it.

        ``durable="name"``: a durable subscription (QoS 1): the broker keeps it, and the
        messages not acknowledged, while this client is away (within ``max_msgs``,
        ``max_bytes`` and ``max_age`` seconds), and across its restarts with ``--store``; the
        next subscribe with the same name (after a reconnect, resubscribing, or from another
        process) gets them, in order. ``unsubscribe()`` deletes it."""
        options = sub_options(group, qos, policy, max_msgs, max_bytes, durable, max_age)
        channel = self.stream_channel("subscribe")
        sub = Subscription(channel, pattern, options, callback, max_pending, sub_codec(self.codec))
        await _AsyncState.of(channel).subscribe(sub, self.timeout if timeout is None else timeout)
        return sub


# ---------------------------------------------------------------------------- blocking


class BlockingPubSub:
    """``publish``, ``clear_retained`` and ``subscribe`` for the blocking
    :class:`~sockstack.Client`."""

    codec: Codec
    timeout: float

    if TYPE_CHECKING:

        @property
        def connection(self) -> StreamConnection | DatagramConnection: ...
        def stream_connection(self, what: str) -> StreamConnection: ...

    def publish(
        self,
        topic: str,
        value: Any,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish ``value`` (encoded with the client's codec) to ``topic``. QoS 0 returns once
        sent (over UDP too); QoS 1 once the broker has accepted it."""
        payload = prepare_publish(topic, value, qos, self.codec)
        self._publish(topic, payload, self.codec.id, qos, retain, timeout)

    def publish_many(
        self,
        topic: str,
        values: Iterable[Any],
        *,
        retain: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Publish each of ``values`` to ``topic`` at QoS 0, in order: the same messages as a
        ``publish(topic, value, retain=retain)`` per value, sent together (one system call
        per 64 KiB of frames instead of one per message; the topic checked once). Returns how
        many were published (all, unless an exception is raised). A value the codec cannot
        encode raises :class:`CodecError`, those before it having been sent only if they
        filled a batch; a bad topic raises :class:`TopicError` before anything is sent.
        ``timeout``: for each batch's send. Over UDP each message is a datagram of its own."""
        check_topic(topic)
        codec = self.codec
        encode, cid = codec.encode, codec.id
        t = self.timeout if timeout is None else timeout
        conn = self.connection
        if conn.kind == "datagram":
            dgram = cast("DatagramConnection", conn)
            n = 0
            for value in values:
                dgram.send_datagram(encode_pub(topic, encode(value), 0, cid, retain))
                n += 1
            return n
        stream = cast("StreamConnection", conn)
        if not stream.live:  # connected first: the batches' size depends on the server's limit
            stream.ensure(time.monotonic() + t, "PUB " + topic, t)
        core = stream.core
        # A batch goes as one piece, which the session checks as a frame against the peer's
        # limit: batches stay within it (a message larger than a batch goes alone).
        most = min(_MANY_BATCH, core.peer_max_frame) if core is not None else _MANY_BATCH
        n = size = 0
        batch: list[bytes] = []
        for value in values:
            frame = encode_pub(topic, encode(value), 0, cid, retain)
            if batch and size + len(frame) > most:
                stream.send_frame(b"".join(batch), "PUB", t)
                n += len(batch)
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        if batch:
            stream.send_frame(b"".join(batch), "PUB", t)
            n += len(batch)
        return n

    def clear_retained(self, topic: str, *, qos: int = 1, timeout: float | None = None) -> None:
        """Clear ``topic``'s retained message: later subscribers get none, and nothing is
        delivered to those subscribed now (an empty RETAIN publish, PROTOCOL.md §4.1). At QoS
        1 (the default) it returns once the broker has done it; clearing a topic with nothing
        retained is not an error."""
        prepare_publish(topic, None, qos, RAW)
        self._publish(topic, b"", 0, qos, True, timeout)

    def _publish(
        self,
        topic: str,
        payload: bytes,
        codec: int,
        qos: int,
        retain: bool,
        timeout: float | None,
    ) -> None:
        t = self.timeout if timeout is None else timeout
        conn = self.connection  # thread-safe: no lock here (calls of threads are pipelined)
        if conn.kind == "datagram":
            if qos:
                raise ConnectError("QoS 1 needs a tcp:// or tls:// broker URL")
            cast("DatagramConnection", conn).send_datagram(
                encode_pub(topic, payload, 0, codec, retain)
            )
            return
        stream = cast("StreamConnection", conn)
        if qos:
            stream.exchange(
                lambda rid: encode_pub(topic, payload, rid, codec, retain), "PUB " + topic, t
            )
        else:
            stream.send_frame(encode_pub(topic, payload, 0, codec, retain), "PUB", t)

    def subscribe(
        self,
        pattern: str,
        *,
        group: str | None = None,
        qos: int = 0,
        policy: str | None = None,
        max_msgs: int | None = None,
        max_bytes: int | None = None,
        durable: str | None = None,
        max_age: float | None = None,
        timeout: float | None = None,
    ) -> BlockingSubscription:
        """Subscribe (``*`` one token, ``>`` the rest); returns once the broker has it. Read
        with ``sub.get(timeout)`` or ``for msg in sub``. ``durable``, ``max_age``: as for
        :meth:`AsyncPubSub.subscribe` (a durable subscription outlives this connection)."""
        options = sub_options(group, qos, policy, max_msgs, max_bytes, durable, max_age)
        codec = sub_codec(self.codec)
        conn = self.stream_connection("subscribe")
        inbox = _BlockingState.of(conn).inbox
        made: list[int] = []

        def frame(rid: int) -> bytes:
            # The box exists before SUB leaves: retained messages follow its answer, and may
            # arrive in the same read (by whichever thread reads).
            inbox[rid] = collections.deque()
            made.append(rid)
            return encode_sub(rid, pattern, options, codec)

        try:
            sid, _ = conn.exchange(
                frame, "SUB " + pattern, self.timeout if timeout is None else timeout
            )
        except BaseException:
            for rid in made:
                inbox.pop(rid, None)
            raise
        return BlockingSubscription(self, sid, pattern)


class _BlockingState:
    """Publish/subscribe's state on one blocking connection: messages waiting, by
    subscription (they arrive while any call reads the socket)."""

    def __init__(self, conn: StreamConnection) -> None:
        self.inbox: dict[int, collections.deque[Msg]] = {}
        _use_pubsub(conn.client.registry)
        conn.routes[Msg] = self.on_msg

    @classmethod
    def of(cls, conn: StreamConnection) -> _BlockingState:
        return _state_of(conn.state, lambda: cls(conn), cls)

    def on_msg(self, msg: Msg) -> None:
        box = self.inbox.get(msg.sid)
        if box is not None:  # else: unsubscribed meanwhile
            box.append(msg)


class BlockingSubscription:
    """Messages of one subscription, read from the blocking client's connection.

    There is no background thread: messages are read from the socket when ``get()`` (or another
    call on the same client, in any thread) runs, and kept for their subscription. A program
    that stops calling ``get()`` stops reading, and the broker then treats it as a slow consumer
    (bounded queue, the subscription's policy). ``get()`` may run in one thread while others
    make calls on the same client: whichever thread reads hands the messages over. Use
    :class:`~sockstack.AsyncClient` to receive while doing other work.
    """

    def __init__(self, client: BlockingPubSub, sid: int, pattern: str) -> None:
        self.client = client
        self.sid = sid
        self.pattern = pattern

    def get(self, timeout: float | None = None) -> Message:
        """The next message (QoS 1: acknowledged as it is returned); CallTimeout if none."""
        client = self.client
        t = client.timeout if timeout is None else timeout
        conn = client.stream_connection("subscribe")
        what = f"messages for subscription {self.sid}"
        box = _BlockingState.of(conn).inbox.setdefault(self.sid, collections.deque())
        deadline = time.monotonic() + t
        while True:  # more than one turn only when another thread took the message first
            if not box:
                try:
                    conn.read_until(lambda: bool(box), max(0.0, deadline - time.monotonic()), what)
                except CallTimeout:
                    raise CallTimeout(what, t) from None
                except ConnectionClosed:
                    raise  # the broker's CLOSE, with its code (SLOW_CONSUMER, GOING_AWAY...)
                except ConnectionLost:
                    raise ConnectionLost(
                        f"{conn.ep}: connection lost; subscriptions are gone"
                    ) from None
            try:
                msg = box.popleft()
            except IndexError:
                continue
            break
        if msg.delivery_id:
            conn.send_frame(encode_ack(msg.delivery_id), "ACK", client.timeout)
        return _decode(msg)

    def __iter__(self) -> Iterator[Message]:
        while True:
            yield self.get()

    def unsubscribe(self) -> None:
        client = self.client
        conn = client.stream_connection("subscribe")
        _BlockingState.of(conn).inbox.pop(self.sid, None)
        conn.send_frame(encode_unsub(self.sid), "UNSUB", client.timeout)
