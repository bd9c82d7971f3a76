"""The broker: subscriptions, routing, QoS 1 redelivery, retained messages, slow consumers.

Transport-agnostic: it talks to each subscriber through a :class:`Peer` (the server's stream
adapter implements it) and never blocks. Payloads are opaque: the broker forwards the bytes and
the codec id it was given, so a publish costs one topic match and one frame per subscriber.

Delivery, per subscription:

- QoS 0: written at once while the peer's transport accepts writes; otherwise queued, up to
  ``max_msgs`` and ``max_bytes``. Beyond that the subscription's policy applies: ``drop-oldest``
  (default), ``drop-newest``, or ``disconnect`` (CLOSE ``SLOW_CONSUMER``). Drops are counted per
  subscription and in :meth:`Broker.stats`. A slow subscriber therefore holds at most its own
  bounded queue, and the others are written to without waiting for it.
- QoS 1: as QoS 0, and each message waits for an ACK. Unacknowledged messages are sent again
  (flag REDELIVERED) every ``ack_wait`` seconds, at most ``max_deliveries`` times; at most
  ``max_inflight`` wait at once, the rest queue. At least once while the subscriber stays
  connected; nothing is persisted across broker restarts.

A message is delivered at the QoS of the subscription (live and retained alike), whatever the
QoS it was published with: the publisher's QoS covers publisher -> broker (is the PUB
acknowledged), the subscription's broker -> subscriber. Delivery ids (QoS 1) come from one
counter for the whole broker, so no id is reused on a connection while its delivery awaits an
ACK (after 2^32 deliveries the counter wraps and skips the ids still in flight there); an ACK
settles a delivery of its own connection only.

Memory, counted as what it really costs (issue 10): a queued message is charged its payload and
topic bytes plus :data:`QUEUED_OVERHEAD` (the Python objects that hold it), a QoS 1 message
waiting for its ACK its MSG frame plus :data:`INFLIGHT_OVERHEAD`. Both count against the
subscription's ``max_bytes`` and the broker's ``max_pending_total``, so these byte bounds bound
the process's memory even for empty messages (500,000 queued empty messages are ~45 MB of
objects, not ~2 MB of topics). The retained store is charged the same way (payload, topic twice,
:data:`RETAINED_OVERHEAD`) against ``max_retained_bytes``.

In-process subscribers (the HTTP gateway's event streams): :meth:`Broker.subscribe_local` takes a
:class:`LocalPeer`, which receives each message whole (``message(seq, topic, payload, codec,
flags)``) instead of a MSG frame, under the same queue bounds and slow-consumer policies as a
connection (its ``writable()`` says when it takes more; :meth:`Broker.peer_writable` sends what
waited; ``close_slow`` ends it under ``disconnect``). ``seq`` numbers the messages the broker
routes (:attr:`Broker.last_seq`), also for a message that waited in the queue, so such a
subscriber can give each message an id that orders it among all messages of the broker.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from sockstack.errors import ErrorCode, SockstackError, TopicError
from sockstack.protocol.frames import with_flags
from sockstack.pubsub.messages import FLAG_REDELIVERED, FLAG_RETAIN, encode_msg, msg_head
from sockstack.pubsub.topics import SubscriptionIndex, matches, validate_topic

if TYPE_CHECKING:
    from sockstack.pubsub.store import Loaded

__all__ = [
    "DURABLE_OVERHEAD",
    "INFLIGHT_OVERHEAD",
    "POLICIES",
    "QUEUED_OVERHEAD",
    "RETAINED_OVERHEAD",
    "Broker",
    "BrokerError",
    "BrokerLimits",
    "BrokerLink",
    "BrokerStore",
    "Durable",
    "DurableLink",
    "LocalPeer",
    "Peer",
    "SubOptions",
    "Subscription",
]

log = logging.getLogger("sockstack.broker")

POLICIES = ("drop-oldest", "drop-newest", "disconnect")

# What an entry costs beyond its payload and topic bytes, measured on CPython 3.11 (64-bit) with
# sys.getsizeof and the process's RSS for a million entries (tests/pubsub/test_broker.py checks
# the sys.getsizeof part, tests/integration/test_broker_memory.py the RSS). Rounded up: a bound
# that undercounts is no bound.
QUEUED_OVERHEAD = 192
"""A queued message: its (topic, payload, codec, flags, seq) tuple (80 B; seq is the cached 0
except for a local subscription, whose seq int, 32 B, is shared by every queue holding the
message), its deque slot (8 B), and the headers of its payload's and its topic's bytes objects
when they are not shared with other entries (33 B each, up to 48 allocated; a topic's bytes are
shared until the topic cache is renewed). Measured: 79-89 B per entry of RSS with shared
payloads, 124 B with 100-byte payloads of their own."""
INFLIGHT_OVERHEAD = 256
"""A QoS 1 message waiting for its ACK: its MSG frame's bytes object header (33 B), the
(frame, due, sends) tuple (64 B), the due time (a float, 24 B), the delivery id (an int, 32 B)
and its dict entry. Measured: 210-241 B per entry of RSS beyond the frame's length."""
RETAINED_OVERHEAD = 320
"""A retained message, beyond its payload and twice its topic (the key string and the topic's
bytes): the (topic, payload, codec) tuple (64 B), the string, bytes and payload headers
(49 + 33 + 33 B, each rounded up to 16) and its dict entry (32 B, up to 3x just after the table
grows). Measured: ~190 B per topic of RSS beyond the topic and payload bytes."""
DURABLE_OVERHEAD = 256
"""A message a durable subscription holds, beyond its payload and topic bytes: its entry in the
subscription's queue ((id, cost, time, content, flags) tuple 80 B, the id, cost and time
objects 84 B, the deque slot 8 B) and, once sent, its in-flight record. The entry stays in
memory while the message is on disk (``--store``): its content does not (the durable window).
Measured in tests/pubsub/test_durable.py."""
_MSG_EXTRA = 20  # a MSG frame beyond topic + payload: the 16-byte header and the 4-byte sid
_FLUSH_CHUNK = 16 << 10  # bytes of queued MSG frames written per writable() check
_ROUTES_MAX = 10_000  # topics whose matched subscriptions are cached
_ROUTE_REFS_MAX = 100_000  # subscription references in that cache, all topics together (~1 MB)
_INFLIGHT_EXTRA = _MSG_EXTRA + INFLIGHT_OVERHEAD  # charged for a message in flight, beyond its data


class BrokerError(SockstackError):
    """A request the broker refuses: ``code`` (an :class:`ErrorCode`) goes back in an ERROR."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Peer(Protocol):
    """What the broker needs from a subscriber's connection."""

    def write_soon(self, data: bytes) -> None: ...
    def writable(self) -> bool: ...
    def close_slow(self, code: int, reason: str) -> None: ...


class LocalPeer(Peer, Protocol):
    """An in-process subscriber (:meth:`Broker.subscribe_local`): it gets messages whole, never
    frames (``write_soon`` is not called for it). ``seq`` is the message's number among all the
    messages the broker routed (:attr:`Broker.last_seq` when it was published; 0 for a message
    from the retained store, ``flags`` then has :data:`FLAG_RETAIN`). Called on the broker's
    loop, inside ``publish`` or :meth:`Broker.peer_writable`: it must not block or publish."""

    def message(self, seq: int, topic: bytes, payload: bytes, codec: int, flags: int) -> None: ...


class BrokerLink(Protocol):
    """What joins a broker to others (:mod:`sockstack.pubsub.cluster`: NATS). Called on the
    broker's loop; must not block.

    - ``published``: a message published here (by a connection, a datagram, the gateway), once
      it is accepted; an empty ``payload`` with ``retain`` is a clear of the topic's retained
      message. Messages that came from the link (:meth:`Broker.deliver_remote`) are never
      handed back to it, so nothing loops.
    - ``interest``: the first local subscription with this (pattern, group) came
      (``present``), or the last one went. The link subscribes on the other side to what its
      broker's subscribers want, once per distinct (pattern, group).

    With a link, a publish goes straight to the local subscriptions without a group; a queue
    group spans every broker, so the link's side chooses its member (one across all brokers)
    and hands the message back with :meth:`Broker.deliver_remote`."""

    def published(self, topic: str, payload: bytes, codec: int, retain: bool) -> None: ...
    def interest(self, pattern: str, group: str | None, present: bool) -> None: ...


class DurableLink(BrokerLink, Protocol):
    """A link that keeps durable subscriptions itself, for all the brokers it joins (NATS
    JetStream: a durable consumer per name), so a durable subscriber may come back on any
    broker. The broker holds only what it is about to send and what awaits its subscriber's
    ACK; the link feeds it (:meth:`Broker.durable_feed`) within :meth:`Broker.durable_room`,
    and is told of ACKs and of subscribers leaving (their unacknowledged messages go back to
    the link, which gives them to the next subscriber, here or on another broker)."""

    holds_durables: bool

    def publish_confirmed(
        self,
        topic: str,
        payload: bytes,
        codec: int,
        retain: bool,
        confirm: Callable[[bool, str], None],
    ) -> None:
        """As ``published``, for a QoS 1 publish: call ``confirm`` once it is kept."""

    def durable_attach(self, d: Durable) -> None: ...
    def durable_more(self, d: Durable) -> None: ...
    def durable_ack(self, d: Durable, token: object) -> None: ...
    def durable_detach(self, d: Durable, unacked: list[object]) -> None: ...
    def durable_delete(self, d: Durable) -> None: ...


class BrokerStore(Protocol):
    """Where the broker keeps what must survive it (:class:`~sockstack.pubsub.store.SQLiteStore`):
    the broker stages changes (no I/O on its loop) and reads back messages of durable
    subscriptions that are on disk only."""

    committed_through: int
    on_commit: Callable[[], bool] | None

    def load(self) -> Loaded: ...
    def busy(self) -> bool: ...
    def retain(self, topic: str, payload: bytes, codec: int) -> None: ...
    def save_durable(self, name: str, pattern: str, options: dict[str, Any]) -> None: ...
    def delete_durable(self, name: str) -> None: ...
    def append(
        self, mid: int, topic: bytes, payload: bytes, codec: int, at: float, names: Sequence[str]
    ) -> None: ...
    def remove(self, name: str, ids: Iterable[int]) -> None: ...
    def read(self, ids: Sequence[int]) -> dict[int, tuple[bytes, bytes, int]]: ...
    def after_commit(self, callback: Callable[[bool], None]) -> None: ...
    def pending_commit(self) -> bool: ...
    def stats(self) -> dict[str, Any]: ...
    def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """Broker limits with their defaults (README "Limits")."""

    max_payload: int = 1_000_000
    """Bytes of one published payload (NATS's default max_payload is 1 MB)."""
    max_msgs: int = 500_000
    """Default per-subscription queue bound, in messages, while the subscriber is not reading."""
    max_bytes: int = 64 << 20
    """Default per-subscription bound, in bytes, on what the broker holds for it: queued
    messages (payload + topic + :data:`QUEUED_OVERHEAD` each) and, at QoS 1, messages waiting
    for their ACK (frame + :data:`INFLIGHT_OVERHEAD` each; one may always be in flight). Redis
    bounds a pub/sub client's output at 32 MB; NATS at 64 MB."""
    max_inflight: int = 1000
    """QoS 1: unacknowledged messages per subscription (their bytes count in ``max_bytes``)."""
    ack_wait: float = 5.0
    """QoS 1: seconds before an unacknowledged message is sent again."""
    max_deliveries: int = 5
    """QoS 1: sends of one message before it is given up (counted as expired)."""
    max_retained: int = 10_000
    """Topics with a retained message; more are refused (ERROR RETAINED_STORE_FULL)."""
    max_retained_bytes: int = 64 << 20
    """Bytes of the retained store: payload + twice the topic + :data:`RETAINED_OVERHEAD` per
    topic. A retained publish that would pass it is refused whole (ERROR RETAINED_STORE_FULL,
    counted as ``retained_refused`` in :meth:`Broker.stats`); replacing or clearing a topic's
    message frees its bytes. 64 MiB (the demo store's bound too); ``retained_bytes`` in stats."""
    max_subscriptions_per_peer: int = 10_000
    """Subscriptions of one connection; a SUB beyond is refused (ERROR TOO_MANY_SUBSCRIPTIONS)."""
    max_durables: int = 10_000
    """Durable subscriptions one broker keeps (ERROR TOO_MANY_SUBSCRIPTIONS beyond)."""
    max_durable_bytes: int = 256 << 20
    """Bytes held for all durable subscriptions together: each message a durable subscription
    holds (queued or awaiting its ACK) is charged payload + topic + :data:`DURABLE_OVERHEAD`
    (per subscription holding it). Past it each durable subscription that would hold more
    applies its own policy. In memory without a store; on disk with one (the entries that
    order them stay in memory: this bounds them too). ``durable_bytes`` in stats."""
    durable_max_age: float = 7 * 86400.0
    """Default age (seconds since published) past which a durable subscription's messages not
    yet acknowledged are given up (counted as expired); a SUB's ``max_age`` may lower it."""
    durable_window: int = 4 << 20
    """With a store: bytes of one durable subscription's messages kept in memory, ready to
    send, while it is attached; the rest wait on disk and are read back in order."""
    max_pending_total: int = 512 << 20
    """Bytes held for all subscriptions together, queued and QoS 1 in flight, each message
    charged with its overhead (:data:`QUEUED_OVERHEAD`, :data:`INFLIGHT_OVERHEAD`); past it,
    each subscription that would hold more applies its own policy (so the broker's memory is
    bounded, not only each subscription's). ``held_bytes`` in :meth:`Broker.stats`."""


@dataclass(slots=True)
class SubOptions:
    group: str | None = None
    qos: int = 0
    policy: str = "drop-oldest"
    max_msgs: int = 500_000
    max_bytes: int = 64 << 20
    durable: str | None = None
    """A durable subscription's name (QoS 1; kept while its subscriber is away)."""
    max_age: float | None = None
    """A durable subscription's bound on the age of what it holds (seconds)."""

    def stored(self) -> dict[str, Any]:
        """The options as a durable subscription keeps them (its store row)."""
        return {
            "policy": self.policy,
            "max_msgs": self.max_msgs,
            "max_bytes": self.max_bytes,
            "max_age": self.max_age,
        }

    @classmethod
    def parse(cls, raw: dict[str, Any], limits: BrokerLimits) -> SubOptions:
        unknown = set(raw) - {
            "group",
            "qos",
            "policy",
            "max_msgs",
            "max_bytes",
            "durable",
            "max_age",
        }
        if unknown:
            raise BrokerError(ErrorCode.DECODE_ERROR, f"unknown SUB options {sorted(unknown)}")
        group = raw.get("group")
        durable = raw.get("durable")
        max_age = raw.get("max_age")
        if durable is not None:
            if not isinstance(durable, str) or not durable or len(durable.encode()) > 255:
                raise BrokerError(ErrorCode.DECODE_ERROR, "durable must be a name of 1-255 bytes")
            if group is not None:
                raise BrokerError(
                    ErrorCode.DECODE_ERROR,
                    "a durable subscription has no group (one subscriber at a time holds it)",
                )
            if raw.get("qos", 1) != 1:
                raise BrokerError(ErrorCode.DECODE_ERROR, "a durable subscription is QoS 1")
            if max_age is None:
                max_age = limits.durable_max_age
            elif (
                not isinstance(max_age, (int, float))
                or isinstance(max_age, bool)
                or not 0 < max_age <= limits.durable_max_age
            ):
                raise BrokerError(
                    ErrorCode.DECODE_ERROR,
                    f"max_age must be seconds in (0, {limits.durable_max_age:g}]",
                )
        elif max_age is not None:
            raise BrokerError(ErrorCode.DECODE_ERROR, "max_age is for durable subscriptions")
        qos = raw.get("qos", 1 if durable is not None else 0)
        policy = raw.get("policy", "drop-oldest")
        max_msgs = raw.get("max_msgs", limits.max_msgs)
        max_bytes = raw.get("max_bytes", limits.max_bytes)
        if group is not None and (not isinstance(group, str) or not group or len(group) > 256):
            raise BrokerError(ErrorCode.DECODE_ERROR, "group must be a non-empty string")
        if type(qos) is not int or qos not in (0, 1):  # not True/False, not 1.0
            raise BrokerError(ErrorCode.DECODE_ERROR, "qos must be 0 or 1")
        if policy not in POLICIES:
            raise BrokerError(ErrorCode.DECODE_ERROR, f"policy must be one of {POLICIES}")
        for name, v, cap in (
            ("max_msgs", max_msgs, limits.max_msgs),
            ("max_bytes", max_bytes, limits.max_bytes),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= cap:
                raise BrokerError(ErrorCode.DECODE_ERROR, f"{name} must be 1..{cap}")
        return cls(
            group,
            qos,
            policy,
            max_msgs,
            max_bytes,
            durable,
            None if max_age is None else float(max_age),
        )


@dataclass(slots=True, eq=False)
class Subscription:
    peer: Peer
    sid: int
    pattern: str
    options: SubOptions
    pending: deque[tuple[bytes, bytes, int, int, int]] = field(default_factory=deque)
    """Messages waiting for the peer to read: (topic, payload, codec, flags, seq); seq is 0
    unless the subscription is local (only a :class:`LocalPeer` is told it)."""
    pending_bytes: int = 0
    """Payload and topic bytes of the queued messages."""
    held: int = 0
    """Bytes charged against ``max_bytes``: queued messages and in-flight frames, each with its
    overhead (:data:`QUEUED_OVERHEAD`, :data:`INFLIGHT_OVERHEAD`)."""
    inflight: dict[int, tuple[bytes, float, int]] = field(default_factory=dict)
    """QoS 1: delivery id -> (frame, when to send again, sends so far)."""
    delivered: int = 0
    dropped: int = 0
    redelivered: int = 0
    expired: int = 0
    sink: LocalPeer | None = None
    """The in-process subscriber of a local subscription (:meth:`Broker.subscribe_local`)."""
    durable: Durable | None = None
    """The durable subscription this connection's subscription is attached to."""
    closed: bool = False
    """Forgotten (unsubscribed, its peer gone or disconnected as slow): delivers nothing."""

    def __hash__(self) -> int:
        return id(self)


# A published topic's route (Broker._route): tokens, UTF-8 bytes, and the matched subscriptions
# (direct: QoS 0 to a connection; others: the rest without a group; grouped: queue groups).
_Route = tuple[
    list[str], bytes, tuple[Subscription, ...], tuple[Subscription, ...], tuple[Subscription, ...]
]

# A durable subscription's message: (id, cost, published at (wall clock), content or None when
# it is on disk only, MSG flags). content: (topic bytes, payload, codec).
_Entry = tuple[int, int, float, "tuple[bytes, bytes, int] | None", int]


@dataclass(slots=True, eq=False)
class Durable:
    """A durable subscription: named, kept while its subscriber is away (and, with a store,
    across restarts). It holds, in order, every message published to its pattern that its
    subscriber has not acknowledged, within its bounds; one connection's subscription at a
    time is attached to it (a new one takes it over)."""

    name: str
    pattern: str
    options: SubOptions
    todo: deque[_Entry] = field(default_factory=deque)
    """Messages not sent (or sent and given back when the subscriber went), oldest first."""
    inflight: dict[int, _Entry] = field(default_factory=dict)
    """Delivery id -> the message sent and awaiting its ACK."""
    bytes: int = 0
    """Charged for what it holds (todo and in flight): payload + topic + DURABLE_OVERHEAD."""
    window: int = 0
    """Payload and topic bytes of the todo entries whose content is in memory."""
    sub: Subscription | None = None
    dropped: int = 0
    expired: int = 0
    delivered: int = 0
    remote: bool = False
    """Kept by the link (:class:`DurableLink`), not by this broker."""
    tokens: dict[int, object] = field(default_factory=dict)
    """A remote durable's messages here: local id -> the link's token (to ACK it there)."""

    def __hash__(self) -> int:
        return id(self)


class Broker:
    """``store``: where retained messages and durable subscriptions are kept across restarts
    (:class:`~sockstack.pubsub.store.SQLiteStore`; None: in memory). ``wallclock`` dates the
    messages durable subscriptions hold (their ``max_age``, across restarts)."""

    def __init__(
        self,
        limits: BrokerLimits | None = None,
        clock: Callable[[], float] | None = None,
        store: BrokerStore | None = None,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits or BrokerLimits()
        self.clock = clock or time.monotonic
        self.wallclock = wallclock
        self.store = store
        self.durables: dict[str, Durable] = {}
        self.durable_index: SubscriptionIndex[Durable] = SubscriptionIndex()
        self.durable_bytes = 0
        self._mid = 0  # the last id given to a message a durable subscription holds
        self._paging: set[Durable] = set()  # attached, waiting for a commit to read on
        self.index: SubscriptionIndex[Subscription] = SubscriptionIndex()
        self.retained: dict[str, tuple[bytes, bytes, int]] = {}
        self.retained_bytes = 0  # charged against max_retained_bytes
        self._peers: dict[Peer, dict[int, Subscription]] = {}
        self._group_turn: dict[str, int] = {}
        self._topics: dict[str, tuple[list[str], bytes]] = {}  # validated topics
        self._routes: dict[str, _Route] = {}
        """Published topics -> their tokens, bytes and matched subscriptions, split by how
        they are delivered (:meth:`_route`); emptied whenever a subscription comes or goes,
        bounded by ``_ROUTES_MAX`` topics and ``_ROUTE_REFS_MAX`` references."""
        self._route_refs = 0
        self.held_total = 0  # bytes held for all subscriptions (queued + in flight, charged)
        self._ids = itertools.count(1)
        self.link: BrokerLink | None = None
        self._by_key: dict[tuple[str, str | None], dict[Subscription | Durable, None]] = {}
        """Local subscriptions by (pattern, group): the link's interest, and the subscriptions
        a message from the link is for."""
        self._seq = 0  # messages routed: local publishes and clears, and those from the link
        self.counters = {
            "published": 0,
            "from_link": 0,
            "delivered": 0,
            "dropped": 0,
            "redelivered": 0,
            "expired": 0,
            "slow_consumers_disconnected": 0,
            "retained_refused": 0,
            "store_refused": 0,
        }
        if store is not None:
            self._load(store)

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, peer: Peer, sid: int, pattern: str, raw: dict[str, Any]) -> Subscription:
        """Register; the caller answers SUB, then calls :meth:`deliver_retained`."""
        subs = self._peers.setdefault(peer, {})
        if sid in subs:
            raise BrokerError(ErrorCode.UNKNOWN_SUBSCRIPTION, f"subscription id {sid} in use")
        if len(subs) >= self.limits.max_subscriptions_per_peer:
            raise BrokerError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"too many subscriptions: this connection has {len(subs)}, the broker's "
                "max_subscriptions_per_peer",
            )
        options = SubOptions.parse(raw, self.limits)
        if options.durable is not None:
            return self._attach(peer, sid, pattern, options)
        sub = Subscription(peer, sid, pattern, options)
        try:
            self.index.add(sub, pattern)
        except TopicError as exc:
            raise BrokerError(ErrorCode.BAD_TOPIC, str(exc)) from None
        self._routes_changed()
        subs[sid] = sub
        self._interested(pattern, options.group, sub)
        return sub

    def _interested(self, pattern: str, group: str | None, member: Subscription | Durable) -> None:
        """``member`` holds (pattern, group): the link is told when it is the first."""
        same = self._by_key.get((pattern, group))
        if same is None:
            same = self._by_key[(pattern, group)] = {}
            if self.link is not None:
                self.link.interest(pattern, group, True)
        same[member] = None

    def _uninterested(
        self, pattern: str, group: str | None, member: Subscription | Durable
    ) -> None:
        """``member`` no longer holds (pattern, group): the link is told when it was the last."""
        same = self._by_key.get((pattern, group))
        if same is not None:
            same.pop(member, None)
            if not same:
                del self._by_key[(pattern, group)]
                if self.link is not None:
                    self.link.interest(pattern, group, False)

    def _check_payload(self, payload: bytes) -> None:
        if len(payload) > self.limits.max_payload:
            raise BrokerError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"payload of {len(payload)} bytes above the broker's {self.limits.max_payload}",
            )

    def subscribe_local(
        self, sink: LocalPeer, pattern: str, raw: dict[str, Any] | None = None
    ) -> Subscription:
        """Subscribe an in-process subscriber (one subscription per ``sink``, id 1): it gets
        :meth:`LocalPeer.message` calls, bounded and dropped as a connection's MSG frames are
        (``raw``: the SUB options, QoS 0 only). Ended by ``unsubscribe(sink, 1)`` or
        ``peer_gone(sink)``; call :meth:`deliver_retained` for the retained messages."""
        options = dict(raw or {})
        if options.get("qos", 0) != 0:
            raise BrokerError(ErrorCode.DECODE_ERROR, "a local subscription is QoS 0")
        sub = self.subscribe(sink, 1, pattern, options)
        sub.sink = sink
        self._routes_changed()  # (a local subscription is delivered to another way)
        return sub

    @property
    def last_seq(self) -> int:
        """The number of the last message routed (1, 2, ...; a clear of a retained topic
        takes a number too, and so does a message from the link): what
        :meth:`LocalPeer.message` gets as ``seq``."""
        return self._seq

    def attach_link(self, link: BrokerLink | None) -> None:
        """Join this broker to others through ``link`` (None: detach). The link is told at
        once of every (pattern, group) the local subscriptions hold."""
        self.link = link
        if link is not None:
            for pattern, group in list(self._by_key):
                link.interest(pattern, group, True)

    def interests(self) -> list[tuple[str, str | None]]:
        """The distinct (pattern, group) of the local subscriptions."""
        return list(self._by_key)

    def deliver_retained(self, sub: Subscription) -> int:
        n = 0
        for topic, (topic_b, payload, codec) in list(self.retained.items()):
            if matches(sub.pattern, topic):
                self._deliver(sub, topic_b, payload, codec, FLAG_RETAIN, 0)
                n += 1
        if sub.durable is not None:
            self._pump(sub.durable)  # what it held while away, after the retained messages
        return n

    def unsubscribe(self, peer: Peer, sid: int) -> None:
        """End a subscription; a durable one is deleted with what it held (a subscriber that
        only goes away, closing its connection, leaves it kept)."""
        sub = self._peers.get(peer, {}).pop(sid, None)
        if sub is None:
            raise BrokerError(ErrorCode.UNKNOWN_SUBSCRIPTION, f"no subscription {sid}")
        self._forget(sub)
        if sub.durable is not None:
            self._delete_durable(sub.durable)

    def peer_gone(self, peer: Peer) -> None:
        for sub in self._peers.pop(peer, {}).values():
            self._forget(sub)

    def _forget(self, sub: Subscription) -> None:
        sub.closed = True
        if sub.durable is not None:
            self._detach(sub)
            return
        self.index.remove(sub)
        self._routes_changed()
        self._uninterested(sub.pattern, sub.options.group, sub)
        self.held_total -= sub.held
        sub.pending.clear()
        sub.inflight.clear()
        sub.pending_bytes = 0
        sub.held = 0

    # ------------------------------------------------------------------ publishing

    def publish(
        self,
        topic: str,
        payload: bytes,
        codec: int = 1,
        retain: bool = False,
        confirm: Callable[[bool, str], None] | None = None,
    ) -> int:
        """Route one message; returns how many subscriptions it went to.

        ``confirm`` (a QoS 1 publish): with a link that keeps durable subscriptions, the
        message is handed to it with ``confirm``, which it calls once the message is kept
        there (``True, ""``) or could not be (``False, why``); without one, ``confirm`` is
        not called (the caller answers at once, or after the store's commit).

        An empty ``payload`` with ``retain`` clears the topic's retained message and goes to
        no subscriber (it is not a message). Without ``retain``, an empty payload is a message
        only in the raw codec (0, the empty bytes value); in msgpack or JSON it is no value at
        all and is refused (DECODE_ERROR) rather than delivered undecodable
        (PROTOCOL.md §4.1)."""
        if not payload:
            if retain:
                self._clear(topic)
                return 0
            if codec:
                raise BrokerError(
                    ErrorCode.DECODE_ERROR,
                    f"empty payload in codec {codec}: not a value (an empty payload is a "
                    "message only in the raw codec 0; with RETAIN it clears the topic)",
                )
        elif len(payload) > self.limits.max_payload:
            self._check_payload(payload)
        route = self._routes.get(topic)  # the common case inline: no call per publish
        tokens, topic_b, direct, others, grouped = (
            route if route is not None else self._route(topic)
        )
        store = self.store
        held = self.durable_index.match(tokens) if self.durables else None
        if store is not None and (retain or held) and store.busy():
            self.counters["store_refused"] += 1
            raise BrokerError(
                ErrorCode.STORE_FULL,
                "the broker's store is behind: more than its max_staged_bytes wait for the "
                "disk; publish again shortly",
            )
        if retain:
            self._retain(topic, topic_b, payload, codec)
            if store is not None:
                store.retain(topic, payload, codec)
        self.counters["published"] += 1
        seq = self._seq = self._seq + 1
        link = self.link
        if link is not None:
            if confirm is not None and getattr(link, "holds_durables", False):
                cast(DurableLink, link).publish_confirmed(topic, payload, codec, retain, confirm)
            else:
                link.published(topic, payload, codec, retain)
        if held:
            self._hold(held, topic_b, payload, codec)
        if direct:
            # QoS 0 to connections, the bulk of the traffic: one MSG frame for every
            # subscription with the same id (subscribers of a fan-out usually have id 1),
            # written at once while the connection takes it, queued otherwise (_deliver).
            frame = b""
            frame_sid = -1
            sent = 0
            for sub in direct:
                if sub.pending or sub.closed or not sub.peer.writable():
                    self._deliver(sub, topic_b, payload, codec, 0, seq)
                    continue
                if sub.sid != frame_sid:
                    frame_sid = sub.sid
                    frame = encode_msg(0, frame_sid, topic_b, payload, codec)
                sub.peer.write_soon(frame)
                sub.delivered += 1
                sent += 1
            if sent:
                self.counters["delivered"] += sent
        for sub in others:
            self._deliver(sub, topic_b, payload, codec, 0, seq)
        n = len(direct) + len(others)
        if not grouped or link is not None:
            return n  # with a link, a group spans the brokers: the link's side chooses the member
        groups: dict[str, list[Subscription]] | None = None
        for sub in grouped:
            group = sub.options.group
            assert group is not None
            if groups is None:
                groups = {}
            groups.setdefault(group, []).append(sub)
        if groups:
            turns = self._group_turn
            for group, members in groups.items():
                turn = turns.get(group)
                if turn is None:
                    turn = 0
                    if len(turns) >= 10_000:
                        turns.clear()  # bounded: names of groups long gone would pile up
                turns[group] = turn + 1
                self._deliver(members[turn % len(members)], topic_b, payload, codec, 0, seq)
                n += 1
        return n

    def _route(self, topic: str) -> _Route:
        """A published topic's tokens, UTF-8 bytes and matched subscriptions (validated, the
        subscription index matched once, and cached until a subscription comes or goes):
        ``direct`` QoS 0 to a connection, without group or durable (the fast path of
        :meth:`publish`), ``others`` the rest without a group (QoS 1, local, durable),
        ``grouped`` the members of queue groups, each in match order."""
        tokens, topic_b = self._topic(topic)
        direct: list[Subscription] = []
        others: list[Subscription] = []
        grouped: list[Subscription] = []
        for sub in self.index.match(tokens):
            opts = sub.options
            if opts.group is not None:
                grouped.append(sub)
            elif opts.qos == 0 and sub.sink is None and sub.durable is None:
                direct.append(sub)
            else:
                others.append(sub)
        route = (tokens, topic_b, tuple(direct), tuple(others), tuple(grouped))
        refs = 1 + len(direct) + len(others) + len(grouped)
        if len(self._routes) >= _ROUTES_MAX or self._route_refs + refs > _ROUTE_REFS_MAX:
            self._routes_changed()  # bounded: topics repeat, so the cache refills at once
        if refs <= _ROUTE_REFS_MAX:
            self._routes[topic] = route
            self._route_refs += refs
        return route

    def _routes_changed(self) -> None:
        """A subscription came or went: matches cached for topics are stale."""
        if self._routes:
            self._routes.clear()
        self._route_refs = 0

    def _topic(self, topic: str) -> tuple[list[str], bytes]:
        """A published topic's tokens and UTF-8 bytes, validated once and cached."""
        cached = self._topics.get(topic)
        if cached is None:
            try:
                tokens = validate_topic(topic)
            except TopicError as exc:
                raise BrokerError(ErrorCode.BAD_TOPIC, str(exc)) from None
            if len(self._topics) >= 10_000:
                self._topics.clear()  # bounded: topics repeat, so the cache refills at once
            cached = self._topics[topic] = (tokens, topic.encode())
        return cached

    def _clear(self, topic: str) -> None:
        """An empty retained publish: forget the topic's retained message (if any). Counted as
        published, delivered to no one."""
        self._topic(topic)  # a bad topic is refused, as for any publish
        if self.store is not None and self.store.busy():
            self.counters["store_refused"] += 1
            raise BrokerError(
                ErrorCode.STORE_FULL,
                "the broker's store is behind: more than its max_staged_bytes wait for the "
                "disk; publish again shortly",
            )
        self.counters["published"] += 1
        self._seq += 1
        self._unretain(topic)
        if self.store is not None:
            self.store.retain(topic, b"", 0)
        if self.link is not None:
            self.link.published(topic, b"", 0, True)

    def _unretain(self, topic: str) -> None:
        old = self.retained.pop(topic, None)
        if old is not None:
            self.retained_bytes -= len(old[1]) + 2 * len(old[0]) + RETAINED_OVERHEAD

    # ------------------------------------------------------------------ from the link

    def deliver_remote(
        self, pattern: str, group: str | None, topic: str, payload: bytes, codec: int
    ) -> int:
        """A message the link received for the local subscriptions with exactly this
        (``pattern``, ``group``): every one of them without a group, one (in turn) of a group.
        It is not handed back to the link. Returns how many subscriptions it went to; raises
        :class:`BrokerError` for a topic or payload this broker would refuse from a client."""
        same = self._by_key.get((pattern, group))
        if not same:
            return 0  # the last one went while the message was on its way
        self._check_payload(payload)
        topic_b = self._topic(topic)[1]
        self.counters["from_link"] += 1
        seq = self._seq = self._seq + 1
        if group is None:
            durables: list[Durable] = []
            for sub in list(same):
                if type(sub) is Durable:
                    durables.append(sub)
                else:
                    assert isinstance(sub, Subscription)
                    self._deliver(sub, topic_b, payload, codec, 0, seq)
            if durables:
                if self.store is not None and self.store.busy():
                    # The disk is behind (the link cannot be refused): counted, not held.
                    self.counters["store_refused"] += 1
                    for d in durables:
                        d.dropped += 1
                        self.counters["dropped"] += 1
                else:
                    self._hold(durables, topic_b, payload, codec)
            return len(same)
        turns = self._group_turn
        key = group + "\x00" + pattern
        turn = turns.get(key, 0)
        if len(turns) >= 10_000 and key not in turns:
            turns.clear()
        turns[key] = turn + 1
        members = list(same)
        member = members[turn % len(members)]
        assert isinstance(member, Subscription)
        self._deliver(member, topic_b, payload, codec, 0, seq)
        return 1

    def retain_remote(self, topic: str, payload: bytes, codec: int) -> None:
        """A retained message (or, empty, a clear) published at another broker: kept here too,
        within this store's bounds (:class:`BrokerError` RETAINED_STORE_FULL beyond them), so
        subscribers of every broker see it. Not delivered (the live copy comes through
        :meth:`deliver_remote`) and not handed back to the link."""
        if self.store is not None and self.store.busy():
            self.counters["store_refused"] += 1
            raise BrokerError(ErrorCode.STORE_FULL, "the broker's store is behind the disk")
        if not payload:
            self._topic(topic)
            self._unretain(topic)
        else:
            self._retain(topic, self._topic(topic)[1], payload, codec)
        if self.store is not None:
            self.store.retain(topic, payload, codec)

    def _retain(self, topic: str, topic_b: bytes, payload: bytes, codec: int) -> None:
        """Keep ``payload`` (not empty) as the topic's retained message, within the store's
        bounds in topics and bytes; raise :class:`BrokerError` RETAINED_STORE_FULL beyond
        them (nothing is retained or delivered then)."""
        old = self.retained.get(topic)
        freed = 0 if old is None else len(old[1]) + 2 * len(old[0]) + RETAINED_OVERHEAD
        lim = self.limits
        if old is None and len(self.retained) >= lim.max_retained:
            self.counters["retained_refused"] += 1
            raise BrokerError(
                ErrorCode.RETAINED_STORE_FULL,
                f"retained store is full: {len(self.retained)} topics, the broker's "
                f"max_retained; clear one (clear_retained(topic): an empty retained publish) "
                "first",
            )
        cost = len(payload) + 2 * len(topic_b) + RETAINED_OVERHEAD
        if self.retained_bytes - freed + cost > lim.max_retained_bytes:
            self.counters["retained_refused"] += 1
            raise BrokerError(
                ErrorCode.RETAINED_STORE_FULL,
                f"retained store is full: {self.retained_bytes - freed} of the broker's "
                f"{lim.max_retained_bytes} bytes (max_retained_bytes) in use, this message "
                f"needs {cost}; clear topics (clear_retained(topic): an empty retained "
                "publish) first",
            )
        self.retained[topic] = (topic_b, payload, codec)
        self.retained_bytes += cost - freed

    def _deliver(
        self, sub: Subscription, topic_b: bytes, payload: bytes, codec: int, flags: int, seq: int
    ) -> None:
        if sub.closed:  # (disconnected by an earlier delivery of the same publish or SUB)
            return
        opts = sub.options
        if not sub.pending and sub.peer.writable():
            if opts.qos == 0:
                self._send(sub, topic_b, payload, codec, flags, seq)
                return
            # QoS 1: in flight within the broker-wide byte bound, and within max_inflight and
            # the subscription's byte bound, except that one message may always be in flight
            # (a bound smaller than a message slows a subscription, never stops it).
            inflight = sub.inflight
            lim = self.limits
            more = len(payload) + len(topic_b) + _INFLIGHT_EXTRA
            if self.held_total + more <= lim.max_pending_total and (
                not inflight
                or (len(inflight) < lim.max_inflight and sub.held + more <= opts.max_bytes)
            ):
                self._send(sub, topic_b, payload, codec, flags, seq)
                return
        size = len(payload) + len(topic_b)
        cost = size + QUEUED_OVERHEAD
        total_cap = self.limits.max_pending_total
        if (
            len(sub.pending) >= opts.max_msgs
            or sub.held + cost > opts.max_bytes
            or self.held_total + cost > total_cap
        ):
            # Over this subscription's bound, or over the broker's for all subscriptions
            # together: the subscription's own policy decides.
            if opts.policy == "drop-newest":
                self._drop(sub, 1)
                return
            if opts.policy == "disconnect":
                self._disconnect_slow(sub)
                return
            while sub.pending and (
                len(sub.pending) >= opts.max_msgs
                or sub.held + cost > opts.max_bytes
                or self.held_total + cost > total_cap
            ):
                old = sub.pending.popleft()
                data = len(old[0]) + len(old[1])
                sub.pending_bytes -= data
                sub.held -= data + QUEUED_OVERHEAD
                self.held_total -= data + QUEUED_OVERHEAD
                self._drop(sub, 1)
            if sub.held + cost > opts.max_bytes or self.held_total + cost > total_cap:
                # Still no room (one message above the bound, or in-flight frames hold it):
                # the newest goes.
                self._drop(sub, 1)
                return
        # Only a local subscriber is told the number (0 is a cached int: no memory per entry).
        sub.pending.append((topic_b, payload, codec, flags, seq if sub.sink is not None else 0))
        sub.pending_bytes += size
        sub.held += cost
        self.held_total += cost

    def _may_send(self, sub: Subscription, size: int, queued: int) -> bool:
        """QoS 1: may the first queued message (``size`` payload + topic bytes, charged
        ``queued`` while it waits) go in flight now? Within ``max_inflight``, and the frame
        within the subscription's and the broker's byte bounds; always when nothing is in
        flight (the message is charged already: moving it adds a few bytes, and refusing would
        leave a subscription stuck while the broker is full)."""
        if len(sub.inflight) >= self.limits.max_inflight:
            return False
        if not sub.inflight:
            return True
        more = size + _INFLIGHT_EXTRA - queued
        return (
            sub.held + more <= sub.options.max_bytes
            and self.held_total + more <= self.limits.max_pending_total
        )

    def _send(
        self, sub: Subscription, topic_b: bytes, payload: bytes, codec: int, flags: int, seq: int
    ) -> None:
        if sub.sink is not None:  # in process (always QoS 0): the message whole, no frame
            sub.sink.message(seq, topic_b, payload, codec, flags)
            sub.delivered += 1
            self.counters["delivered"] += 1
            return
        if sub.options.qos:
            did = next(self._ids)
            if did > 0xFFFFFFFF:
                did = self._wrapped_id(sub.peer, did)
            frame = encode_msg(did, sub.sid, topic_b, payload, codec, flags)
            sub.inflight[did] = (frame, self.clock() + self.limits.ack_wait, 1)
            cost = len(frame) + INFLIGHT_OVERHEAD
            sub.held += cost
            self.held_total += cost
        else:
            frame = encode_msg(0, sub.sid, topic_b, payload, codec, flags)
        sub.peer.write_soon(frame)
        sub.delivered += 1
        self.counters["delivered"] += 1

    def _wrapped_id(self, peer: Peer, did: int) -> int:
        """A delivery id once the counter has passed 2^32 - 1: the next u32 that is not 0 and
        not awaiting an ACK on ``peer``'s connection (PROTOCOL.md §4.1). Ends: a connection
        has at most ``max_subscriptions_per_peer * max_inflight`` ids in flight, far fewer
        than 2^32."""
        subs = self._peers.get(peer, {}).values()
        while True:
            did &= 0xFFFFFFFF
            if did and not any(did in s.inflight for s in subs):
                return did
            did = next(self._ids)

    def _settled(self, sub: Subscription, frame: bytes) -> None:
        """An in-flight frame was acknowledged or given up: its bytes are free."""
        cost = len(frame) + INFLIGHT_OVERHEAD
        sub.held -= cost
        self.held_total -= cost

    def _drop(self, sub: Subscription, n: int) -> None:
        sub.dropped += n
        self.counters["dropped"] += n

    def _disconnect_slow(self, sub: Subscription) -> None:
        peer = sub.peer
        behind, unacked = len(sub.pending), len(sub.inflight)
        held, total = sub.held, self.held_total
        self.counters["slow_consumers_disconnected"] += 1
        self._drop(sub, 1 + behind)
        self.peer_gone(peer)
        peer.close_slow(
            ErrorCode.SLOW_CONSUMER,
            f"subscription {sub.sid} ({sub.pattern}) fell behind by {behind} messages"
            + (f" and {unacked} unacknowledged" if unacked else "")
            + f" ({held} bytes held of its {sub.options.max_bytes}; {total} of the broker's"
            f" {self.limits.max_pending_total} for all subscriptions)",
        )

    # ------------------------------------------------------------------ durable subscriptions

    def _load(self, store: BrokerStore) -> None:
        """Resume from the store: retained messages, durable subscriptions and what each holds
        (content on disk, read back when sent)."""
        loaded = store.load()
        self._mid = loaded.last_id
        for topic, payload, codec in loaded.retained:
            try:
                self._retain(topic, self._topic(topic)[1], payload, codec)
            except BrokerError as exc:  # limits lowered since: said, not fatal
                log.warning("stored retained message on %s not kept: %s", topic, exc.message)
        lim = self.limits
        caps = {
            "max_msgs": lim.max_msgs,
            "max_bytes": lim.max_bytes,
            "max_age": lim.durable_max_age,
        }
        for stored in loaded.durables:
            raw = dict(stored.options)
            for key, cap in caps.items():  # limits lowered since: kept, within the new ones
                v = raw.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v > cap:
                    raw[key] = cap
            try:
                options = SubOptions.parse({**raw, "durable": stored.name}, self.limits)
                self.durable_index.add(
                    d := Durable(stored.name, stored.pattern, options), stored.pattern
                )
            except (BrokerError, TopicError) as exc:
                log.warning("stored durable subscription %s not kept: %s", stored.name, exc)
                store.delete_durable(stored.name)
                continue
            self.durables[d.name] = d
            self._interested(d.pattern, None, d)
            for mid, size, at in stored.pending:
                cost = size + DURABLE_OVERHEAD
                d.todo.append((mid, cost, at, None, 0))
                d.bytes += cost
                self.durable_bytes += cost
        store.on_commit = self._committed

    def _attach(self, peer: Peer, sid: int, pattern: str, options: SubOptions) -> Subscription:
        """SUB with ``durable``: attach to the named durable subscription (made now if new;
        taken over from the connection that held it, whose subscription ends silently)."""
        name = options.durable
        assert name is not None
        d = self.durables.get(name)
        link = self.link
        if link is not None and getattr(link, "holds_durables", False):
            return self._attach_remote(peer, sid, pattern, options, d)
        if d is None:
            if len(self.durables) >= self.limits.max_durables:
                raise BrokerError(
                    ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                    f"the broker keeps {len(self.durables)} durable subscriptions (its "
                    "max_durables); unsubscribe one first",
                )
            d = Durable(name, pattern, options)
            try:
                self.durable_index.add(d, pattern)
            except TopicError as exc:
                raise BrokerError(ErrorCode.BAD_TOPIC, str(exc)) from None
            self.durables[name] = d
            self._interested(pattern, None, d)
            if self.store is not None:
                self.store.save_durable(name, pattern, options.stored())
        elif d.pattern != pattern:
            raise BrokerError(
                ErrorCode.BAD_TOPIC,
                f"durable subscription {name!r} is on {d.pattern!r}, not {pattern!r}: "
                "unsubscribe it first to change its pattern",
            )
        else:
            if d.options.stored() != options.stored():
                d.options = options
                if self.store is not None:
                    self.store.save_durable(name, pattern, options.stored())
            if d.sub is not None:  # taken over: the old connection's subscription ends
                old = d.sub
                self._peers.get(old.peer, {}).pop(old.sid, None)
                self._detach(old)
        sub = Subscription(peer, sid, pattern, options, durable=d)
        self._peers.setdefault(peer, {})[sid] = sub
        d.sub = sub
        return sub

    def _attach_remote(
        self, peer: Peer, sid: int, pattern: str, options: SubOptions, d: Durable | None
    ) -> Subscription:
        """A durable subscription the link keeps: attach here; the link feeds it."""
        link = self.link
        assert link is not None
        if d is None:
            if len(self.durables) >= self.limits.max_durables:
                raise BrokerError(
                    ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                    f"this broker has {len(self.durables)} durable subscriptions attached (its "
                    "max_durables)",
                )
            d = self.durables[options.durable or ""] = Durable(
                options.durable or "", pattern, options, remote=True
            )
        elif d.pattern != pattern:
            raise BrokerError(
                ErrorCode.BAD_TOPIC,
                f"durable subscription {d.name!r} is on {d.pattern!r} here, not {pattern!r}",
            )
        if d.sub is not None:
            old = d.sub
            self._peers.get(old.peer, {}).pop(old.sid, None)
            self._detach(old)
            self.durables[d.name] = d
        d.options = options
        sub = Subscription(peer, sid, pattern, options, durable=d)
        self._peers.setdefault(peer, {})[sid] = sub
        d.sub = sub
        cast(DurableLink, link).durable_attach(d)
        return sub

    def durable_room(self, d: Durable) -> int:
        """How many more messages the link may feed ``d`` now (0 while it has no subscriber
        here): up to ``max_inflight`` held, in flight and waiting, within the window."""
        if d.sub is None or d.window >= self.limits.durable_window:
            return 0
        return max(0, self.limits.max_inflight - len(d.todo) - len(d.inflight))

    def durable_feed(
        self,
        d: Durable,
        topic: str,
        payload: bytes,
        codec: int,
        token: object,
        redelivered: bool = False,
    ) -> bool:
        """A message of remote durable ``d`` from the link: held and sent in turn; False when
        ``d`` has no subscriber here any more (the link gives it to the next one). Raises
        :class:`BrokerError` for a topic or payload this broker refuses (the link drops it)."""
        if d.sub is None or self.durables.get(d.name) is not d:
            return False
        self._check_payload(payload)
        topic_b = self._topic(topic)[1]
        size = len(topic_b) + len(payload)
        cost = size + DURABLE_OVERHEAD
        mid = self._mid = self._mid + 1
        flags = FLAG_REDELIVERED if redelivered else 0
        d.todo.append((mid, cost, self.wallclock(), (topic_b, payload, codec), flags))
        d.tokens[mid] = token
        d.window += size
        d.bytes += cost
        self.durable_bytes += cost
        self.counters["from_link"] += 1
        self._pump(d)
        return True

    def _detach(self, sub: Subscription) -> None:
        """The subscriber of a durable subscription went: what it had in flight goes back to
        the front of the queue (sent again, flagged REDELIVERED, to the next subscriber)."""
        d = sub.durable
        assert d is not None
        sub.closed = True
        self.held_total -= sub.held
        sub.pending.clear()
        sub.inflight.clear()
        sub.pending_bytes = sub.held = 0
        if d.sub is sub and d.remote:
            # Its messages here go back to the link, which gives them to the next subscriber.
            d.sub = None
            held = (*d.inflight.values(), *d.todo)
            unacked = [d.tokens[e[0]] for e in held if e[0] in d.tokens]
            for e in d.inflight.values():
                self._release(d, e, queued=False)
            for e in d.todo:
                self._release(d, e)
            d.todo.clear()
            d.inflight.clear()
            d.tokens.clear()
            self.durables.pop(d.name, None)
            if self.link is not None:
                cast(DurableLink, self.link).durable_detach(d, unacked)
        elif d.sub is sub:
            d.sub = None
            back = sorted(d.inflight.values(), reverse=True)
            d.inflight.clear()
            for mid, cost, at, content, _ in back:
                d.todo.appendleft((mid, cost, at, content, FLAG_REDELIVERED))
                if content is not None:
                    d.window += len(content[0]) + len(content[1])
            if self.store is not None and d.window:
                # Away: its messages wait on disk only (memory for those who are here).
                d.todo = deque((e[0], e[1], e[2], None, e[4]) for e in d.todo)
                d.window = 0
            self._paging.discard(d)

    def _delete_durable(self, d: Durable) -> None:
        if d.remote:
            if self.link is not None:
                cast(DurableLink, self.link).durable_delete(d)
            self.durables.pop(d.name, None)
            return
        self.durables.pop(d.name, None)
        self.durable_index.remove(d)
        self._uninterested(d.pattern, None, d)
        self.durable_bytes -= d.bytes
        d.bytes = d.window = 0
        d.todo.clear()
        d.inflight.clear()
        self._paging.discard(d)
        if self.store is not None:
            self.store.delete_durable(d.name)

    def _hold(
        self, durables: Iterable[Durable], topic_b: bytes, payload: bytes, codec: int
    ) -> None:
        """A message for these durable subscriptions: each holds it, within its bounds (its
        policy decides beyond them), and sends it when it can."""
        size = len(topic_b) + len(payload)
        cost = size + DURABLE_OVERHEAD
        at = self.wallclock()
        store = self.store
        lim = self.limits
        mid = 0
        names: list[str] = []
        for d in durables:
            if not self._room(d, cost):
                continue
            if not mid:
                mid = self._mid = self._mid + 1
            # In memory: always without a store (nowhere else), else while its subscriber
            # is here and its window has room (the rest is read back from disk in order).
            keep = store is None or (d.sub is not None and d.window + size <= lim.durable_window)
            d.todo.append((mid, cost, at, (topic_b, payload, codec) if keep else None, 0))
            if keep:
                d.window += size
            d.bytes += cost
            self.durable_bytes += cost
            names.append(d.name)
            if d.sub is not None and len(d.todo) == 1:
                self._pump(d)
        if names and store is not None:
            store.append(mid, topic_b, payload, codec, at, names)

    def _room(self, d: Durable, cost: int) -> bool:
        """Make room for a message of ``cost`` under ``d``'s bounds and the broker's, by its
        policy: drop-oldest drops what waits longest (never what is in flight); drop-newest
        and disconnect refuse the new one (disconnect also ends the attached subscriber)."""
        opts = d.options
        total = self.limits.max_durable_bytes

        def over() -> bool:
            return (
                len(d.todo) + len(d.inflight) >= opts.max_msgs
                or d.bytes + cost > opts.max_bytes
                or self.durable_bytes + cost > total
            )

        if not over():
            return True
        if opts.policy == "drop-oldest":
            gone: list[int] = []
            while d.todo and over():
                old = d.todo.popleft()
                self._release(d, old)
                gone.append(old[0])
                d.dropped += 1
                self.counters["dropped"] += 1
            if gone and self.store is not None:
                self.store.remove(d.name, gone)
            if not over():
                return True
        d.dropped += 1
        self.counters["dropped"] += 1
        if opts.policy == "disconnect" and d.sub is not None:
            self._disconnect_slow(d.sub)
        return False

    def _release(self, d: Durable, entry: _Entry, queued: bool = True) -> None:
        """``entry`` is no longer held (``queued``: it was in ``todo``, not in flight)."""
        d.bytes -= entry[1]
        self.durable_bytes -= entry[1]
        content = entry[3]
        if queued and content is not None:
            d.window -= len(content[0]) + len(content[1])

    def _pump(self, d: Durable) -> None:
        """Send what the durable subscription holds, in order, while its subscriber takes
        more (QoS 1 bounds: max_inflight, the byte bounds; one always may be in flight)."""
        sub = d.sub
        if sub is None or sub.pending:  # (retained messages queued first go first)
            return
        peer, todo, lim = sub.peer, d.todo, self.limits
        while todo and peer.writable():
            mid, cost, at, content, flags = todo[0]
            if content is None:
                if not self._page_in(d):
                    return
                mid, cost, at, content, flags = todo[0]
                assert content is not None
            topic_b, payload, codec = content
            more = len(payload) + len(topic_b) + _INFLIGHT_EXTRA
            if sub.inflight and (
                len(sub.inflight) >= lim.max_inflight
                or sub.held + more > sub.options.max_bytes
                or self.held_total + more > lim.max_pending_total
            ):
                return
            todo.popleft()
            d.window -= len(topic_b) + len(payload)
            did = next(self._ids)
            if did > 0xFFFFFFFF:
                did = self._wrapped_id(peer, did)
            frame = encode_msg(did, sub.sid, topic_b, payload, codec, flags)
            sub.inflight[did] = (frame, self.clock() + lim.ack_wait, 1)
            # Without a store the content is kept: it is sent again if the subscriber goes.
            d.inflight[did] = (mid, cost, at, content if self.store is None else None, 0)
            charge = len(frame) + INFLIGHT_OVERHEAD
            sub.held += charge
            self.held_total += charge
            peer.write_soon(frame)
            sub.delivered += 1
            d.delivered += 1
            self.counters["delivered"] += 1

    def _page_in(self, d: Durable) -> bool:
        """Read back from the store the next messages of ``d`` that are on disk only (up to
        256, and the durable window); False when the first is not committed yet (the commit
        pumps again)."""
        store = self.store
        todo = d.todo
        if store is None or todo[0][0] > store.committed_through:
            self._paging.add(d)
            return False
        head: list[_Entry] = []
        room = self.limits.durable_window - d.window  # (the window may hold its tail already)
        while todo and len(head) < 256 and (not head or room > 0):
            e = todo.popleft()
            head.append(e)
            room -= e[1]
        ids = [e[0] for e in head if e[3] is None and e[0] <= store.committed_through]
        try:
            found = store.read(ids) if ids else {}
        except Exception as exc:  # sqlite3.Error: a damaged page, an I/O error
            todo.extendleft(reversed(head))  # kept, in order: read again after the next commit
            self._paging.add(d)
            log.error("durable subscription %s: reading the store failed: %s", d.name, exc)
            return False
        lost: list[int] = []
        for e in reversed(head):
            mid, cost, at, content, flags = e
            if content is None and mid <= store.committed_through:
                content = found.get(mid)
                if content is None:  # not in the store (it should be): said, not sent
                    self._release(d, e)
                    lost.append(mid)
                    continue
                d.window += len(content[0]) + len(content[1])
            todo.appendleft((mid, cost, at, content, flags))
        if lost:
            log.error(
                "durable subscription %s: %d messages missing from the store", d.name, len(lost)
            )
            d.dropped += len(lost)
            self.counters["dropped"] += len(lost)
            store.remove(d.name, lost)
        if todo and todo[0][3] is None:
            self._paging.add(d)
            return False
        return bool(todo)

    def _committed(self) -> bool:
        """The store committed: durable subscriptions waiting for it read on, within a byte
        budget per call (two windows: a few milliseconds of reading on the loop); True when
        some still wait (the store calls again, on the next turn of the loop)."""
        waiting, self._paging = self._paging, set()
        budget = 2 * self.limits.durable_window
        while waiting and budget > 0:
            d = waiting.pop()
            before = d.window + len(d.inflight)
            self._pump(d)
            budget -= max(1, d.window + len(d.inflight) - before) + d.window
        self._paging |= waiting
        return bool(waiting)

    def _expire_durables(self) -> None:
        """Give up messages older than their durable subscription's ``max_age``."""
        now = self.wallclock()
        for d in list(self.durables.values()):
            if d.remote:
                continue  # (the link's own bounds apply)
            max_age = d.options.max_age or self.limits.durable_max_age
            todo = d.todo
            gone: list[int] = []
            sub = d.sub
            while d.inflight:  # in flight, oldest first (sent in order), never acknowledged
                did, e = next(iter(d.inflight.items()))
                if e[2] >= now - max_age:
                    break
                del d.inflight[did]
                self._release(d, e, queued=False)
                gone.append(e[0])
                if sub is not None:
                    sent = sub.inflight.pop(did, None)
                    if sent is not None:
                        self._settled(sub, sent[0])
                d.expired += 1
                self.counters["expired"] += 1
            while todo and todo[0][2] < now - max_age:
                e = todo.popleft()
                self._release(d, e)
                gone.append(e[0])
                d.expired += 1
                self.counters["expired"] += 1
            if gone and self.store is not None:
                self.store.remove(d.name, gone)
            if gone and sub is not None:
                self._pump(d)

    # ------------------------------------------------------------------ flow

    def peer_writable(self, peer: Peer) -> None:
        """The peer's transport drained: send what its subscriptions queued, while it lasts."""
        for sub in list(self._peers.get(peer, {}).values()):
            self._flush(sub)
            if sub.durable is not None:
                self._pump(sub.durable)

    def _flush(self, sub: Subscription) -> None:
        peer = sub.peer
        pending = sub.pending
        qos = sub.options.qos
        if not qos and sub.sink is None:
            self._flush_frames(sub)
            return
        while pending and peer.writable():
            topic_b, payload, codec, flags, seq = pending[0]
            data = len(topic_b) + len(payload)
            if qos and not self._may_send(sub, data, data + QUEUED_OVERHEAD):
                break
            pending.popleft()
            sub.pending_bytes -= data
            sub.held -= data + QUEUED_OVERHEAD
            self.held_total -= data + QUEUED_OVERHEAD
            self._send(sub, topic_b, payload, codec, flags, seq)

    def _flush_frames(self, sub: Subscription) -> None:
        """:meth:`_flush` for QoS 0 to a connection (what a subscriber that fell behind gets
        when its connection drains): MSG frames written in chunks of about ``_FLUSH_CHUNK``
        bytes (the peer's ``writable()`` asked once a chunk, so its unsent bytes pass its
        high-water mark by at most a chunk and a message), a run of messages with the same
        topic, codec, flags and size sharing one header, the counters settled once."""
        peer = sub.peer
        pending = sub.pending
        write = peer.write_soon
        sid = sub.sid
        n = freed = 0
        head = last_topic = b""
        last_len = last_codec = last_flags = -1
        while pending and peer.writable():
            chunk: list[bytes] = []
            size = 0
            while pending and size < _FLUSH_CHUNK:
                topic_b, payload, codec, flags, _ = pending.popleft()
                data = len(topic_b) + len(payload)
                freed += data
                size += data + _MSG_EXTRA
                if (
                    len(payload) != last_len
                    or topic_b is not last_topic
                    or codec != last_codec
                    or flags != last_flags
                ):
                    last_topic, last_len, last_codec, last_flags = (
                        topic_b,
                        len(payload),
                        codec,
                        flags,
                    )
                    head = msg_head(0, sid, topic_b, last_len, codec, flags)
                chunk.append(head)
                chunk.append(payload)
            write(b"".join(chunk))
            n += len(chunk) >> 1
        if n:
            charged = freed + n * QUEUED_OVERHEAD
            sub.pending_bytes -= freed
            sub.held -= charged
            self.held_total -= charged
            sub.delivered += n
            self.counters["delivered"] += n

    def ack(self, peer: Peer, delivery_id: int) -> None:
        for sub in self._peers.get(peer, {}).values():
            entry = sub.inflight.pop(delivery_id, None)
            if entry is not None:
                self._settled(sub, entry[0])
                d = sub.durable
                if d is not None:
                    held = d.inflight.pop(delivery_id, None)
                    if held is not None:
                        self._release(d, held, queued=False)
                        if d.remote:
                            token = d.tokens.pop(held[0], None)
                            if self.link is not None and token is not None:
                                link = cast(DurableLink, self.link)
                                link.durable_ack(d, token)
                                self._pump(d)
                                link.durable_more(d)
                                return
                        elif self.store is not None:
                            self.store.remove(d.name, (held[0],))
                if sub.pending:
                    self._flush(sub)
                if d is not None:
                    self._pump(d)
                return
        raise BrokerError(
            ErrorCode.UNKNOWN_DELIVERY,
            f"no delivery {delivery_id} awaits an ACK on this connection",
        )

    def tick(self) -> None:
        """Send again what was not acknowledged in time (call about once a second)."""
        now = self.clock()
        lim = self.limits
        for subs in list(self._peers.values()):
            for sub in list(subs.values()):
                for did, (frame, due, sends) in list(sub.inflight.items()):
                    if due > now:
                        continue
                    if sends >= lim.max_deliveries and (
                        sub.durable is None or did not in sub.durable.inflight
                    ):  # (a durable subscription's messages are sent until acked or too old)
                        del sub.inflight[did]
                        self._settled(sub, frame)
                        sub.expired += 1
                        self.counters["expired"] += 1
                        continue
                    if not sub.peer.writable():
                        continue
                    sub.inflight[did] = (frame, now + lim.ack_wait, sends + 1)
                    sub.peer.write_soon(with_flags(frame, FLAG_REDELIVERED))
                    sub.redelivered += 1
                    self.counters["redelivered"] += 1
                if sub.pending:
                    self._flush(sub)
                    if sub.durable is not None:
                        self._pump(sub.durable)  # (after the retained messages it sent)
        if self.durables:
            self._expire_durables()

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        """Counters since start, and what the broker holds now. ``pending_bytes`` is the
        payload and topic bytes of queued messages; ``inflight_bytes`` the QoS 1 frames waiting
        for an ACK, with their overhead; ``held_bytes`` both, as charged against
        ``max_pending_total`` (queued messages with their overhead); ``retained_bytes`` the
        retained store, as charged against ``max_retained_bytes``. ``local_subscriptions``
        counts the in-process ones (:meth:`subscribe_local`), which are in ``subscriptions``
        too (and each of their subscribers in ``connections``)."""
        subs = [s for subs in self._peers.values() for s in subs.values()]
        return {
            **self.counters,
            "subscriptions": len(subs),
            "local_subscriptions": sum(1 for s in subs if s.sink is not None),
            "connections": len(self._peers),
            "retained": len(self.retained),
            "retained_bytes": self.retained_bytes,
            "pending": sum(len(s.pending) for s in subs),
            "pending_bytes": sum(s.pending_bytes for s in subs),
            "inflight": sum(len(s.inflight) for s in subs),
            "inflight_bytes": sum(
                len(f) + INFLIGHT_OVERHEAD for s in subs for f, _, _ in s.inflight.values()
            ),
            "held_bytes": self.held_total,
            "durable_bytes": self.durable_bytes,
            "durables": [
                {
                    "name": d.name,
                    "pattern": d.pattern,
                    "attached": d.sub is not None,
                    "kept_by": "link" if d.remote else "broker",
                    "pending": len(d.todo) + len(d.inflight),
                    "inflight": len(d.inflight),
                    "bytes": d.bytes,
                    "delivered": d.delivered,
                    "dropped": d.dropped,
                    "expired": d.expired,
                }
                for d in self.durables.values()
            ],
            "store": self.store.stats() if self.store is not None else None,
            "slow": [
                {
                    "sid": s.sid,
                    "pattern": s.pattern,
                    "policy": s.options.policy,
                    "pending": len(s.pending),
                    "pending_bytes": s.pending_bytes,
                    "inflight": len(s.inflight),
                    "held_bytes": s.held,
                    "delivered": s.delivered,
                    "dropped": s.dropped,
                }
                for s in subs
                if s.dropped or s.pending
            ],
        }
