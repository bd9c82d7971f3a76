"""``/topics``: the host's broker over HTTP (docs/HTTP.md, "Publish/subscribe").

- ``POST /topics/{topic}`` publishes the body. ``application/json`` (and ``+json``) is published
  in the JSON codec, ``application/msgpack`` in msgpack, a form body (``curl -d``) in JSON when
  it is JSON, anything else as raw bytes: a TCP subscriber gets exactly that value.
  ``?qos=1`` answers 200 ``{"id": N, "delivered": n}`` once the broker has routed it; QoS 0
  answers 202. ``?retain=1`` keeps it as the topic's retained message.
- ``GET /topics/{pattern}/events`` is a Server-Sent Events stream of the messages matching the
  pattern, from whichever transport they were published on. Each event's ``id`` is the broker's
  number for the message (:attr:`~sockstack.pubsub.broker.Broker.last_seq`), so a client that
  reconnects with ``Last-Event-ID`` (or ``?last_event_id=``) gets what it missed from a replay
  ring bounded in bytes and messages (:class:`TopicsLimits`); when the ring no longer holds
  all of it, an ``event: gap`` (problem ``REPLAY_GAP``) comes first.

Each stream is a local subscription of the broker (:meth:`Broker.subscribe_local`): while the
client does not read, its messages wait in the broker's queue for it, bounded in bytes, and the
subscription's policy (``?policy=``, the broker's ``drop-oldest`` by default) applies, counted in
``broker.stats`` as for a TCP subscriber; ``disconnect`` ends the stream with ``event: error``
(``SLOW_CONSUMER``). A stream ends when its client goes and when the server drains, and its
subscription goes with it.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import msgspec

from sockstack.errors import CodecError, ErrorCode
from sockstack.gateway.http import JSON_TYPE, HttpRequest, not_allowed
from sockstack.gateway.problems import PROBLEM_REF, HttpProblem, problem_body
from sockstack.protocol.codecs import JSON, MSGPACK
from sockstack.pubsub.broker import BrokerError
from sockstack.pubsub.messages import FLAG_RETAIN
from sockstack.pubsub.topics import MAX_TOKENS, MAX_TOPIC_BYTES, matches

if TYPE_CHECKING:
    from sockstack.gateway.pattern import Gateway
    from sockstack.pubsub.broker import Broker, Subscription

__all__ = [
    "RING_OVERHEAD",
    "SUBJECT_PATTERN",
    "TOPIC_PATTERN",
    "Topics",
    "TopicsLimits",
    "install",
    "openapi_paths",
]

log = logging.getLogger("sockstack.gateway")

RING_OVERHEAD = 192
"""Bytes charged per message in the replay ring beyond its payload and topic: the (seq, topic,
payload, codec) tuple (80 B), its deque slot (8 B), the seq int (32 B) and the payload's bytes
header when nothing else holds it (48 B), rounded up. Measured with tracemalloc: 111 B per
entry beyond payloads held elsewhere (tests/gateway/test_topics.py)."""
_EVENT_OVERHEAD = 64
"""Bytes charged per formatted event waiting for a stream's writer (its list slot and bytes
header), beyond its length."""
_UNDECODED = 0x100  # (_data's own flag, beyond a MSG's: send the payload as base64)
_SCAN = 1024  # ring entries a replay looks at per turn of its stream's writer (loop latency)

_MSGPACK_TYPES = (b"application/msgpack", b"application/x-msgpack", b"application/vnd.msgpack")
_FORM_TYPE = b"application/x-www-form-urlencoded"
_CODEC_NAMES = {0: "raw", 1: "msgpack", 2: "json"}
_KEEP_ALIVE = b": keep-alive\n\n"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer the stream
]
_POST = ("POST",)
_GET = ("GET",)
_MAX_ID = 2**63 - 1  # (an event id a client may send: the broker numbers messages from 1)
_MAX_COUNT = 2**31

# pubsub/topics.py's rules as ECMA-262 / Python patterns (for the document): tokens joined by
# '.', non-empty, no whitespace (space, tab, CR, LF) nor NUL; in a topic no '*' or '>'; in a
# pattern '*' as a whole token, '>' as the whole last token; at most MAX_TOKENS tokens. (The
# 256-byte bound is on UTF-8 bytes, which a pattern cannot count: maxLength bounds characters.)
_TOKEN = r"[^.*> \t\r\n\x00]+"
TOPIC_PATTERN = rf"^{_TOKEN}(?:\.{_TOKEN}){{0,{MAX_TOKENS - 1}}}$"
"""What ``POST /topics/{topic}`` takes as a topic (and at most 256 bytes of UTF-8)."""
SUBJECT_PATTERN = rf"^(?:(?:\*|{_TOKEN})\.){{0,{MAX_TOKENS - 1}}}(?:\*|>|{_TOKEN})$"
"""What ``GET /topics/{pattern}/events`` takes as a pattern (and at most 256 bytes of UTF-8)."""


@dataclass(frozen=True, slots=True)
class TopicsLimits:
    """Bounds of ``/topics`` (docs/HTTP.md, "Limits"); set with :func:`configure`. The broker's
    own limits (``max_payload``, ``max_pending_total``...) apply too."""

    replay_bytes: int = 4 << 20
    """Bytes of the replay ring (payload + topic + :data:`RING_OVERHEAD` per message): what a
    reconnecting client can get back. One ring per gateway, shared by every stream."""
    replay_count: int = 100_000
    """Messages in the replay ring."""
    stream_bytes: int = 1 << 20
    """The broker's queue bound (``max_bytes``) of one stream while its client does not read
    (at most the broker's ``max_bytes``); past it the stream's policy applies."""
    stream_msgs: int = 100_000
    """The same in messages (``max_msgs``)."""
    window: int = 64 << 10
    """Bytes of formatted events a stream holds for its writer; beyond, messages wait in the
    broker's queue (above). With the connection's own write buffer (64 KiB) and ``stream_bytes``,
    this bounds what one stream holds."""
    max_streams: int = 1000
    """Event streams open at once on this gateway; one more is 503 OVERLOADED. An open stream
    does not count in the gateway's ``max_in_flight``."""
    keep_alive: float = 15.0
    """Seconds without an event before a ``: keep-alive`` comment line (proxies close idle
    connections)."""


class _Ring:
    """The gateway's replay ring: every message the broker routes (a local subscription to
    ``>``), the newest kept within :class:`TopicsLimits` bytes and count. ``base``: every
    message numbered above it is here (older ones were let go, or came before the ring)."""

    def __init__(self, broker: Broker, limits: TopicsLimits) -> None:
        self.broker = broker
        self.max_bytes = limits.replay_bytes
        self.max_count = limits.replay_count
        self.entries: deque[tuple[int, bytes, bytes, int]] = deque()
        self.bytes = 0
        self.base = broker.last_seq
        self.sub = broker.subscribe_local(self, ">")

    # the broker's LocalPeer
    def message(self, seq: int, topic: bytes, payload: bytes, codec: int, flags: int) -> None:
        entries = self.entries
        entries.append((seq, topic, payload, codec))
        self.bytes += len(topic) + len(payload) + RING_OVERHEAD
        if self.bytes > self.max_bytes or len(entries) > self.max_count:
            while entries and (self.bytes > self.max_bytes or len(entries) > self.max_count):
                old = entries.popleft()
                self.bytes -= len(old[1]) + len(old[2]) + RING_OVERHEAD
                self.base = old[0]

    def writable(self) -> bool:
        return True  # it never falls behind: it only appends

    def write_soon(self, data: bytes) -> None:
        """(Not called: a local subscriber gets messages whole.)"""

    def close_slow(self, code: int, reason: str) -> None:
        """(Not called: the ring is always writable.)"""

    def close(self) -> None:
        self.broker.peer_gone(self)
        self.entries.clear()
        self.bytes = 0

    def after(self, seq: int) -> int:
        """The index of the first entry numbered above ``seq``."""
        return bisect.bisect_right(self.entries, seq, key=lambda e: e[0])

    @property
    def first(self) -> int | None:
        return self.entries[0][0] if self.entries else None


class _Stream:
    """One ``GET /topics/{pattern}/events``: a local subscriber of the broker whose messages
    become SSE events, taken by the stream's writer (:meth:`Topics._pump`)."""

    def __init__(
        self, topics: Topics, req: HttpRequest, pattern: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.topics = topics
        self.req = req
        self.pattern = pattern
        self.loop = loop
        self.window = topics.limits.window
        self.sub: Subscription | None = None
        self.buf: list[bytes] = []
        self.size = 0  # bytes charged for buf
        self.waiter: asyncio.Future[bool] | None = None
        self.ended = False
        self.finished = False  # the writer has returned
        # Replay (Last-Event-ID): ring entries numbered in (cursor, until] that match.
        self.replaying = False
        self.cursor = 0
        self.until = 0
        self.events = 0  # messages pushed (live, retained and replayed)
        self.limit = 0  # ?count=N: the stream ends after N messages (0: never)
        self.last_sent = loop.time()  # (keep-alive comments when idle)

    # the broker's LocalPeer
    def message(self, seq: int, topic: bytes, payload: bytes, codec: int, flags: int) -> None:
        self.deliver(self.topics.event(seq, topic, payload, codec, flags))

    def deliver(self, event: bytes) -> None:
        """A message's event; the stream ends after its ``?count=``-th."""
        if self.ended:
            return
        self.events += 1
        self.push(event)
        if self.limit and self.events >= self.limit:
            self.end()

    def writable(self) -> bool:
        return not self.replaying and self.size < self.window

    def write_soon(self, data: bytes) -> None:
        """(Not called: a local subscriber gets messages whole.)"""

    def close_slow(self, code: int, reason: str) -> None:
        """The broker's ``disconnect`` policy (it has already forgotten the subscription)."""
        self.sub = None
        self.topics.slow_disconnects += 1
        gw = self.topics.gateway
        peer = self.req.peer
        gw.bad_log.warning("http %s: event stream %s: %s", peer and peer[0], self.pattern, reason)
        self.end(b"event: error\ndata: " + _json(problem_body(code, reason)) + b"\n\n")

    # the writer's side
    def push(self, event: bytes) -> None:
        self.buf.append(event)
        self.size += len(event) + _EVENT_OVERHEAD
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def take(self) -> bytes:
        data = b"".join(self.buf)
        self.buf.clear()
        self.size = 0
        return data

    def end(self, last: bytes | None = None) -> None:
        """End the stream: forget the subscription, send ``last`` (if any) and close. A client
        that does not read even that is cut off after the host's ``close_timeout``."""
        if self.ended:
            return
        self.ended = True
        self.replaying = False
        if self.sub is not None:
            self.sub = None
            self.topics.broker_of().peer_gone(self)
        if last is not None:
            self.buf.append(last)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)
        if not self.finished:
            host = self.topics.gateway.host
            delay = host.limits.close_timeout if host is not None else 2.0
            self.loop.call_later(delay, self._cut)

    def _cut(self) -> None:
        if not self.finished:
            _abort(self.req)


def _abort(req: HttpRequest) -> None:
    """Close the connection at once (a client that does not read the end of its stream). The
    ASGI interface has no such call: uvicorn's ``send`` is its request cycle's method, whose
    ``transport`` is the connection's."""
    transport = getattr(getattr(req.send, "__self__", None), "transport", None)
    if transport is not None:
        transport.abort()  # (close() with a full buffer would wait for the client forever)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _data(topic: bytes, payload: bytes, codec: int, flags: int) -> bytes:
    """An event's ``data``: one line of JSON, ``{"topic", "codec"}`` and the payload as
    ``payload`` (a JSON value: JSON, or msgpack in its JSON form), ``text`` (raw bytes that
    are UTF-8) or ``base64`` (anything else); ``"retained": true`` from the retained store."""
    name = _CODEC_NAMES.get(codec, str(codec)).encode()
    head = b'{"topic":' + _json(topic.decode()) + b',"codec":"' + name
    tail = b',"retained":true}' if flags & FLAG_RETAIN else b"}"
    if flags & _UNDECODED:
        pass
    elif codec == 2:
        try:
            msgspec.json.decode(payload)  # valid JSON: kept as the publisher wrote it
        except (msgspec.MsgspecError, RecursionError):
            pass
        else:
            if b"\n" in payload or b"\r" in payload:  # one line: SSE splits data at newlines
                payload = JSON.encode(json.loads(payload))
            return head + b'","payload":' + payload + tail
    elif codec == 1:
        try:
            return head + b'","payload":' + JSON.encode(MSGPACK.decode(payload)) + tail
        except (CodecError, RecursionError):
            pass
    else:
        try:
            return head + b'","text":' + _json(payload.decode()) + tail
        except UnicodeDecodeError:
            pass
    return head + b'","base64":"' + base64.b64encode(payload) + b'"' + tail


class Topics:
    """The ``/topics`` route of one gateway (``gateway.routes["topics"]``), its streams and
    its replay ring. :meth:`of` finds it; :func:`configure` sets its limits."""

    def __init__(self, gateway: Gateway, limits: TopicsLimits | None = None) -> None:
        self.gateway = gateway
        self.limits = limits or TopicsLimits()
        self.streams: set[_Stream] = set()
        self.ring: _Ring | None = None
        self._cache = (0, b"")  # the last live message's event: fanned out to every stream
        self._ticker: asyncio.TimerHandle | None = None  # keep-alive comments
        self.slow_disconnects = 0
        self.gaps = 0
        self.events = 0
        self._closing: asyncio.Task[None] | None = None  # waits for the gateway's drain

    @staticmethod
    def of(gateway: Gateway) -> Topics:
        route = gateway.routes.get("topics")
        if not isinstance(route, Topics):
            raise LookupError("this gateway has no /topics route")
        return route

    def broker_of(self) -> Broker:
        host = self.gateway.host
        broker: Broker | None = None if host is None else host.broker
        if broker is None:
            raise HttpProblem(
                ErrorCode.NOT_FOUND,
                "this server has no broker (serve it with --broker, or Server(broker=True))",
            )
        return broker

    def stats(self) -> dict[str, Any]:
        """Streams open, events sent, gaps reported, streams ended as slow consumers, and the
        replay ring (messages, bytes, first and last id)."""
        ring = self.ring
        return {
            "streams": len(self.streams),
            "events": self.events + sum(s.events for s in self.streams),
            "gaps": self.gaps,
            "slow_consumers_disconnected": self.slow_disconnects,
            "replay": {
                "messages": len(ring.entries) if ring else 0,
                "bytes": ring.bytes if ring else 0,
                "first_id": ring.first if ring else None,
                "last_id": ring.entries[-1][0] if ring and ring.entries else None,
            },
        }

    # ---------------------------------------------------------------- the route

    async def __call__(self, req: HttpRequest) -> None:
        parts = (req.scope.get("raw_path") or req.path.encode()).split(b"/")
        if len(parts) == 3:
            if req.method != "POST":
                raise not_allowed(req, _POST)
            await self._publish(req, _segment(parts[2], "topic"))
        elif len(parts) == 4 and parts[3] == b"events":
            if req.method != "GET":
                raise not_allowed(req, _GET)
            await self._stream(req, _segment(parts[2], "pattern"))
        else:
            raise HttpProblem(
                ErrorCode.NOT_FOUND,
                f"no resource at {req.path}: POST /topics/{{topic}} publishes, "
                "GET /topics/{pattern}/events streams",
            )

    async def _publish(self, req: HttpRequest, topic: str) -> None:
        broker = self.broker_of()
        qos = 0
        retain = False
        for key, value in req.query():
            if key == "qos":
                if value not in ("0", "1"):
                    raise HttpProblem(ErrorCode.DECODE_ERROR, "qos is 0 or 1")
                qos = int(value)
            elif key == "retain":
                if value not in ("0", "1"):
                    raise HttpProblem(ErrorCode.DECODE_ERROR, "retain is 0 or 1")
                retain = value == "1"
        limits = self.gateway.limits
        body = await req.body(min(limits.max_body, broker.limits.max_payload), limits.body_timeout)
        codec = _codec(req, body)
        ring = self._ensure_ring(broker)
        try:
            n = broker.publish(topic, body, codec, retain)
        except BrokerError as exc:
            raise HttpProblem(exc.code, exc.message) from None
        if qos:
            if n and ring is not None:
                n -= 1  # (the replay ring is no subscriber)
            await req.json({"id": broker.last_seq, "delivered": n})
        else:
            await req.respond(202, b"", None)

    async def _stream(self, req: HttpRequest, pattern: str) -> None:
        broker = self.broker_of()
        gateway = self.gateway
        host = gateway.host
        if host is None or host.draining or gateway.closing.is_set():
            raise HttpProblem(ErrorCode.SHUTTING_DOWN, "the server is draining")
        limits = self.limits
        asked: int | None = None
        raw_id = req.header(b"last-event-id")
        options: dict[str, Any] = {
            "max_bytes": min(limits.stream_bytes, broker.limits.max_bytes),
            "max_msgs": min(limits.stream_msgs, broker.limits.max_msgs),
        }
        count = 0
        for key, value in req.query():
            if key == "last_event_id" and raw_id is None:
                raw_id = value.encode()
            elif key == "policy":
                options["policy"] = value
            elif key == "count":
                count = _number(value.encode(), _MAX_COUNT)
                if count < 1:
                    raise HttpProblem(
                        ErrorCode.DECODE_ERROR, f"count is a number of messages, 1 to {_MAX_COUNT}"
                    )
        if raw_id is not None and raw_id.strip(b" \t"):  # (empty: EventSource's "no id")
            asked = _number(raw_id.strip(b" \t"), _MAX_ID)
            if asked < 0:
                raise HttpProblem(
                    ErrorCode.DECODE_ERROR,
                    "Last-Event-ID is an event id of this server (digits, 0 to 2**63 - 1)",
                )
        if len(self.streams) >= limits.max_streams:
            raise HttpProblem(
                ErrorCode.OVERLOADED,
                f"{len(self.streams)} event streams open (limit {limits.max_streams})",
            )
        ring = self._ensure_ring(broker)
        assert ring is not None  # (not draining)
        loop = asyncio.get_running_loop()
        stream = _Stream(self, req, pattern, loop)
        stream.limit = count
        try:
            sub = stream.sub = broker.subscribe_local(stream, pattern, options)
        except BrokerError as exc:
            raise HttpProblem(exc.code, exc.message) from None
        self.streams.add(stream)
        req.detach()  # long-lived: bounded by max_streams, not by the calls' max_in_flight
        try:
            # No await until this is set up: what is numbered up to `newest` comes from the
            # ring, what follows live (it waits in the broker's queue while the replay runs:
            # the stream is not writable then).
            newest = broker.last_seq
            if asked is not None:
                stream.replaying = True
                stream.until = newest
                if asked < ring.base or asked > newest:
                    self._gap(stream, asked, ring)
                else:
                    stream.cursor = asked
            else:
                broker.deliver_retained(sub)
            if self._ticker is None:
                self._ticker = loop.call_later(limits.keep_alive / 4, self._tick)
            await req.start(200, _SSE_HEADERS)
            await self._pump(stream)
        finally:  # (a client that leaves has this task cancelled by the gateway's protocol)
            stream.finished = True
            stream.end()
            self.streams.discard(stream)
            self.events += stream.events

    async def _pump(self, stream: _Stream) -> None:
        """Write the stream's events as they come, a keep-alive comment when idle, and the end
        (the response's last chunk) once it is ended."""
        send = stream.req.send
        loop = stream.loop
        while True:
            if stream.replaying:
                self._replay(stream)
                if stream.replaying:
                    # The rest on a later turn of the loop (a send that is not blocked does not
                    # yield): the other streams and the publishers run between.
                    await asyncio.sleep(0)
            if stream.buf:
                data = stream.take()
                sub = stream.sub
                if sub is not None and sub.pending and not stream.replaying:
                    self.broker_of().peer_writable(stream)  # what waited, up to the window
                await send({"type": "http.response.body", "body": data, "more_body": True})
                stream.last_sent = loop.time()
                continue
            if stream.ended:
                break
            waiter = stream.waiter = loop.create_future()
            try:
                await waiter
            finally:
                stream.waiter = None
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _tick(self) -> None:
        """Every quarter of ``keep_alive`` while streams are open: a comment line to each
        stream that sent nothing for ``keep_alive`` seconds."""
        self._ticker = None
        if not self.streams:
            return
        keep_alive = self.limits.keep_alive
        loop = next(iter(self.streams)).loop
        now = loop.time()
        for stream in self.streams:
            if not stream.buf and not stream.ended and now - stream.last_sent >= keep_alive:
                stream.push(_KEEP_ALIVE)
        self._ticker = loop.call_later(keep_alive / 4, self._tick)

    # ---------------------------------------------------------------- replay

    def _ensure_ring(self, broker: Broker) -> _Ring | None:
        """The replay ring, made on the first ``/topics`` request (None while draining), and
        the task that ends everything when the gateway drains."""
        ring = self.ring
        if ring is None:
            gateway = self.gateway
            host = gateway.host
            if host is None or host.draining or gateway.closing.is_set():
                return None
            ring = self.ring = _Ring(broker, self.limits)
            if self._closing is None:
                self._closing = asyncio.ensure_future(self._drain_on_closing())
        return ring

    async def _drain_on_closing(self) -> None:
        try:
            await self.gateway.closing.wait()
        finally:
            self._closing = None
        self.drain()

    def _gap(self, stream: _Stream, asked: int, ring: _Ring) -> None:
        """Tell the client that messages it asked for are gone, and go on from the oldest kept."""
        self.gaps += 1
        first = ring.first
        if asked > stream.until:
            detail = (
                f"event id {asked} is ahead of this server's newest message ({stream.until}): "
                "the server restarted, or the id is not one of its; sending what it keeps"
            )
        else:
            detail = (
                f"events after {asked} are no longer all kept (the replay buffer keeps "
                f"{self.limits.replay_bytes} bytes, {self.limits.replay_count} messages); "
                + ("sending from the oldest kept" if first is not None else "none kept")
            )
        extra = {"last_event_id": asked, "first_id": first}
        stream.push(
            b"event: gap\ndata: "
            + _json(problem_body(ErrorCode.REPLAY_GAP, detail, extra=extra))
            + b"\n\n"
        )
        stream.cursor = ring.base

    def _replay(self, stream: _Stream) -> None:
        """Move the next matching ring entries (up to the window, :data:`_SCAN` looked at) into
        the stream; at the end, let the live messages that waited in the broker's queue in."""
        ring = self.ring
        assert ring is not None
        if stream.cursor < ring.base:  # the ring moved on while this replay ran
            self._gap(stream, stream.cursor, ring)
        entries = ring.entries
        i = ring.after(stream.cursor)
        end = min(len(entries), i + _SCAN)
        pattern, until = stream.pattern, stream.until
        done = True
        while i < end:
            seq, topic, payload, codec = entries[i]
            if seq > until:
                break
            if matches(pattern, topic.decode()):
                stream.deliver(self.event(seq, topic, payload, codec, 0))
                if stream.ended:  # (its ?count= reached)
                    return
            stream.cursor = seq
            i += 1
            if stream.size >= stream.window:
                done = False
                break
        else:
            done = end >= len(entries)
        if done or stream.cursor >= until:
            stream.replaying = False
            if stream.sub is not None:
                self.broker_of().peer_writable(stream)

    # ---------------------------------------------------------------- events

    def event(self, seq: int, topic: bytes, payload: bytes, codec: int, flags: int) -> bytes:
        """One SSE event (formatted once per live message, whatever the streams it goes to)."""
        cached_seq, cached = self._cache
        if seq and seq == cached_seq:
            return cached
        try:
            data = _data(topic, payload, codec, flags)
        except Exception as exc:  # (unforeseen: it must not fail the publish that called it)
            self.gateway.bad_log.warning("event of topic %r: %r; sent as base64", topic, exc)
            data = _data(topic, payload, codec, flags | _UNDECODED)
        if seq:
            event = b"id: %d\nevent: message\ndata: %b\n\n" % (seq, data)
            self._cache = (seq, event)
            return event
        return b"event: message\ndata: " + data + b"\n\n"  # retained: not in the id order

    # ---------------------------------------------------------------- drain

    def drain(self) -> None:
        """The server drains: end every stream (its subscription goes) and drop the ring."""
        for stream in list(self.streams):
            stream.end()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None


def _number(text: bytes, most: int) -> int:
    """``text`` as a number of ASCII digits from 0 to ``most``, or -1 (not ``int()``, which
    takes signs, ``_`` and other scripts' digits)."""
    if not text.isdigit() or len(text) > len(str(most)):  # (bytes: ASCII digits only)
        return -1
    n = int(text)
    return n if n <= most else -1


def _segment(raw: bytes, what: str) -> str:
    """One path segment, percent-decoded (``sensors.%3E`` is ``sensors.>``; ``%2F`` a ``/`` of
    the topic, not a separator)."""
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise HttpProblem(ErrorCode.BAD_TOPIC, f"the {what} is not UTF-8") from None


def _codec(req: HttpRequest, body: bytes) -> int:
    """The codec a body is published in, from its Content-Type; JSON and msgpack are checked
    (subscribers decode them)."""
    ctype = (req.header(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype == JSON_TYPE or ctype.endswith(b"+json"):
        if body:  # (empty: the broker refuses it, or clears the retained message)
            try:
                msgspec.json.decode(body)
            except (msgspec.MsgspecError, RecursionError) as exc:
                raise HttpProblem(ErrorCode.DECODE_ERROR, f"the body is not JSON: {exc}") from None
        return 2
    if ctype in _MSGPACK_TYPES:
        if body:
            try:
                MSGPACK.decode(body)
            except CodecError as exc:
                raise HttpProblem(ErrorCode.DECODE_ERROR, str(exc)) from None
        return 1
    if ctype == _FORM_TYPE and body:  # curl -d '{"t": 21.5}' sends this type
        try:
            msgspec.json.decode(body)
        except (msgspec.MsgspecError, RecursionError):
            return 0
        return 2
    return 0


def install(gateway: Gateway) -> None:
    gateway.routes["topics"] = Topics(gateway)


def configure(gateway: Gateway, limits: TopicsLimits) -> None:
    """Set the gateway's ``/topics`` limits (before its first ``/topics`` request)."""
    Topics.of(gateway).limits = limits


# ---------------------------------------------------------------------------- OpenAPI


def openapi_paths(gateway: Gateway) -> dict[str, Any]:
    """OpenAPI 3.1 path items of ``/topics`` (merged by the gateway's ``/openapi.json``)."""
    problem_content = {"application/problem+json": {"schema": PROBLEM_REF}}

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": problem_content}

    any_value: dict[str, Any] = {}
    return {
        "/topics/{topic}": {
            "post": {
                "operationId": "topics.publish",
                "summary": "Publish the body to a topic of the broker",
                "description": (
                    "application/json (or +json) is published in the JSON codec, "
                    "application/msgpack in msgpack, a form body that is JSON in JSON, "
                    "anything else as raw bytes. QoS 0 answers 202; QoS 1 answers 200 once "
                    "the broker has routed it. An empty body with retain=1 clears the "
                    "topic's retained message."
                ),
                "parameters": [
                    {
                        "name": "topic",
                        "in": "path",
                        "required": True,
                        "description": (
                            "tokens separated by '.': each non-empty, without whitespace, NUL, "
                            f"'*' or '>'; at most {MAX_TOKENS} tokens and {MAX_TOPIC_BYTES} "
                            "bytes of UTF-8 (else 400 BAD_TOPIC); percent-encoded ('/' as %2F)"
                        ),
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_TOPIC_BYTES,
                            "pattern": TOPIC_PATTERN,
                        },
                    },
                    {
                        "name": "qos",
                        "in": "query",
                        "required": False,
                        "description": "1: answer 200 once the broker has routed it",
                        "schema": {"type": "integer", "enum": [0, 1], "default": 0},
                    },
                    {
                        "name": "retain",
                        "in": "query",
                        "required": False,
                        "description": "1: keep it as the topic's retained message",
                        "schema": {"type": "integer", "enum": [0, 1], "default": 0},
                    },
                ],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {"schema": any_value},
                        "application/msgpack": {
                            "schema": {"type": "string", "contentEncoding": "binary"}
                        },
                        "application/octet-stream": {
                            "schema": {"type": "string", "contentEncoding": "binary"}
                        },
                        "text/plain": {"schema": {"type": "string"}},
                    },
                },
                "responses": {
                    "202": {"description": "QoS 0: published"},
                    "200": {
                        "description": "QoS 1: the broker has routed it",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["id", "delivered"],
                                    "properties": {
                                        "id": {
                                            "type": "integer",
                                            "description": "the message's event id",
                                        },
                                        "delivered": {
                                            "type": "integer",
                                            "description": "subscriptions it went to",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "400": error("bad topic (BAD_TOPIC), parameter or body (DECODE_ERROR)"),
                    "404": error("the server has no broker (NOT_FOUND)"),
                    "405": error("not POST (METHOD_NOT_ALLOWED)"),
                    "408": error("the body did not arrive in time (FRAME_TIMEOUT)"),
                    "413": error("the body is over the broker's max_payload (PAYLOAD_TOO_LARGE)"),
                    "507": error("the retained store is full (RETAINED_STORE_FULL)"),
                    "default": error("an error (RFC 9457 problem details)"),
                },
            }
        },
        "/topics/{pattern}/events": {
            "get": {
                "operationId": "topics.events",
                "summary": "Server-Sent Events: the messages matching a pattern",
                "description": (
                    "Events 'message' (id: the message's number; data: JSON {topic, codec, "
                    "and payload, text or base64; retained}), 'gap' (problem REPLAY_GAP: "
                    "the replay buffer no longer holds all that was asked), 'error' (problem "
                    "SLOW_CONSUMER, then the stream ends), and ': keep-alive' comments. "
                    "Last-Event-ID (or last_event_id) resends what was missed."
                ),
                "parameters": [
                    {
                        "name": "pattern",
                        "in": "path",
                        "required": True,
                        "description": (
                            "a topic whose tokens may be '*' (one token) and, last, '>' (one or "
                            f"more); at most {MAX_TOKENS} tokens and {MAX_TOPIC_BYTES} bytes of "
                            "UTF-8 (else 400 BAD_TOPIC); percent-encoded ('>' as %3E)"
                        ),
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_TOPIC_BYTES,
                            "pattern": SUBJECT_PATTERN,
                        },
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "resume after this event id (digits; empty: none)",
                        "schema": {"type": "integer", "minimum": 0, "maximum": _MAX_ID},
                    },
                    {
                        "name": "last_event_id",
                        "in": "query",
                        "required": False,
                        "description": "the same, for clients that cannot set headers",
                        "schema": {"type": "integer", "minimum": 0, "maximum": _MAX_ID},
                    },
                    {
                        "name": "policy",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "enum": ["drop-oldest", "drop-newest", "disconnect"],
                            "default": "drop-oldest",
                        },
                    },
                    {
                        "name": "count",
                        "in": "query",
                        "required": False,
                        "description": "end the stream after this many messages",
                        "schema": {"type": "integer", "minimum": 1, "maximum": _MAX_COUNT},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the event stream (it ends by itself only with ?count=)",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": error("bad pattern (BAD_TOPIC), Last-Event-ID, policy or count"),
                    "404": error("the server has no broker (NOT_FOUND)"),
                    "405": error("not GET (METHOD_NOT_ALLOWED)"),
                    "503": error("too many streams (OVERLOADED) or draining (SHUTTING_DOWN)"),
                    "default": error("an error (RFC 9457 problem details)"),
                },
            }
        },
    }
