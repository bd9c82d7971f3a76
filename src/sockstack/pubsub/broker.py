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
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sockstack.errors import ErrorCode
from sockstack.protocol.frames import with_flags
from sockstack.pubsub.messages import FLAG_REDELIVERED, FLAG_RETAIN, encode_msg
from sockstack.pubsub.topics import SubscriptionIndex, TopicError, matches, validate_topic

__all__ = [
    "POLICIES",
    "Broker",
    "BrokerError",
    "BrokerLimits",
    "Peer",
    "SubOptions",
    "Subscription",
]

POLICIES = ("drop-oldest", "drop-newest", "disconnect")


class BrokerError(Exception):
    """A request the broker refuses: ``code`` goes back in an ERROR."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Peer(Protocol):
    """What the broker needs from a subscriber's connection."""

    def write_soon(self, data: bytes) -> None: ...
    def writable(self) -> bool: ...
    def close_slow(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """Broker limits with their defaults (README "Limits")."""

    max_payload: int = 1_000_000
    """Bytes of one published payload (NATS's default max_payload is 1 MB)."""
    max_msgs: int = 500_000
    """Default per-subscription queue bound, in messages, while the subscriber is not reading."""
    max_bytes: int = 32 << 20
    """Default per-subscription queue bound, in bytes (Redis bounds a pub/sub client's output
    at 32 MB; NATS at 64 MB)."""
    max_inflight: int = 1000
    """QoS 1: unacknowledged messages per subscription."""
    ack_wait: float = 5.0
    """QoS 1: seconds before an unacknowledged message is sent again."""
    max_deliveries: int = 5
    """QoS 1: sends of one message before it is given up (counted as expired)."""
    max_retained: int = 10_000
    """Topics with a retained message; more are refused with an ERROR."""
    max_subscriptions_per_peer: int = 10_000
    max_pending_total: int = 512 << 20
    """Bytes queued for all slow subscribers together; past it, each subscription that would
    queue more applies its own policy (so the broker's memory is bounded, not only each
    subscription's)."""


@dataclass(slots=True)
class SubOptions:
    group: str | None = None
    qos: int = 0
    policy: str = "drop-oldest"
    max_msgs: int = 500_000
    max_bytes: int = 32 << 20

    @classmethod
    def parse(cls, raw: dict[str, Any], limits: BrokerLimits) -> SubOptions:
        unknown = set(raw) - {"group", "qos", "policy", "max_msgs", "max_bytes"}
        if unknown:
            raise BrokerError(ErrorCode.DECODE_ERROR, f"unknown SUB options {sorted(unknown)}")
        group = raw.get("group")
        qos = raw.get("qos", 0)
        policy = raw.get("policy", "drop-oldest")
        max_msgs = raw.get("max_msgs", limits.max_msgs)
        max_bytes = raw.get("max_bytes", limits.max_bytes)
        if group is not None and (not isinstance(group, str) or not group or len(group) > 256):
            raise BrokerError(ErrorCode.DECODE_ERROR, "group must be a non-empty string")
        if qos not in (0, 1):
            raise BrokerError(ErrorCode.DECODE_ERROR, "qos must be 0 or 1")
        if policy not in POLICIES:
            raise BrokerError(ErrorCode.DECODE_ERROR, f"policy must be one of {POLICIES}")
        for name, v, cap in (
            ("max_msgs", max_msgs, limits.max_msgs),
            ("max_bytes", max_bytes, limits.max_bytes),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= cap:
                raise BrokerError(ErrorCode.DECODE_ERROR, f"{name} must be 1..{cap}")
        return cls(group, qos, policy, max_msgs, max_bytes)


@dataclass(slots=True, eq=False)
class Subscription:
    peer: Peer
    sid: int
    pattern: str
    options: SubOptions
    pending: deque[tuple[bytes, bytes, int, int]] = field(default_factory=deque)
    """Messages waiting for the peer to read: (topic, payload, codec, flags)."""
    pending_bytes: int = 0
    inflight: dict[int, tuple[bytes, float, int]] = field(default_factory=dict)
    """QoS 1: delivery id -> (frame, when to send again, sends so far)."""
    delivered: int = 0
    dropped: int = 0
    redelivered: int = 0
    expired: int = 0

    def __hash__(self) -> int:
        return id(self)


class Broker:
    def __init__(
        self, limits: BrokerLimits | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        self.limits = limits or BrokerLimits()
        self.clock = clock or time.monotonic
        self.index: SubscriptionIndex[Subscription] = SubscriptionIndex()
        self.retained: dict[str, tuple[bytes, bytes, int]] = {}
        self._peers: dict[Peer, dict[int, Subscription]] = {}
        self._group_turn: dict[str, int] = {}
        self._topics: dict[str, tuple[list[str], bytes]] = {}  # validated topics
        self.pending_total = 0  # bytes queued for all subscriptions
        self._ids = itertools.count(1)
        self.counters = {
            "published": 0,
            "delivered": 0,
            "dropped": 0,
            "redelivered": 0,
            "expired": 0,
            "slow_consumers_disconnected": 0,
        }

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, peer: Peer, sid: int, pattern: str, raw: dict[str, Any]) -> Subscription:
        """Register; the caller answers SUB, then calls :meth:`deliver_retained`."""
        subs = self._peers.setdefault(peer, {})
        if sid in subs:
            raise BrokerError(ErrorCode.UNKNOWN_SUBSCRIPTION, f"subscription id {sid} in use")
        if len(subs) >= self.limits.max_subscriptions_per_peer:
            raise BrokerError(ErrorCode.UNKNOWN_SUBSCRIPTION, "too many subscriptions")
        options = SubOptions.parse(raw, self.limits)
        sub = Subscription(peer, sid, pattern, options)
        try:
            self.index.add(sub, pattern)
        except TopicError as exc:
            raise BrokerError(ErrorCode.BAD_TOPIC, str(exc)) from None
        subs[sid] = sub
        return sub

    def deliver_retained(self, sub: Subscription) -> int:
        n = 0
        for topic, (topic_b, payload, codec) in list(self.retained.items()):
            if matches(sub.pattern, topic):
                self._deliver(sub, topic_b, payload, codec, FLAG_RETAIN)
                n += 1
        return n

    def unsubscribe(self, peer: Peer, sid: int) -> None:
        sub = self._peers.get(peer, {}).pop(sid, None)
        if sub is None:
            raise BrokerError(ErrorCode.UNKNOWN_SUBSCRIPTION, f"no subscription {sid}")
        self._forget(sub)

    def peer_gone(self, peer: Peer) -> None:
        for sub in self._peers.pop(peer, {}).values():
            self._forget(sub)

    def _forget(self, sub: Subscription) -> None:
        self.index.remove(sub)
        self.pending_total -= sub.pending_bytes
        sub.pending.clear()
        sub.pending_bytes = 0

    # ------------------------------------------------------------------ publishing

    def publish(self, topic: str, payload: bytes, codec: int = 1, retain: bool = False) -> int:
        """Route one message; returns how many subscriptions it went to."""
        if len(payload) > self.limits.max_payload:
            raise BrokerError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"payload of {len(payload)} bytes above the broker's {self.limits.max_payload}",
            )
        cached = self._topics.get(topic)
        if cached is None:
            try:
                tokens = validate_topic(topic)
            except TopicError as exc:
                raise BrokerError(ErrorCode.BAD_TOPIC, str(exc)) from None
            if len(self._topics) >= 10_000:
                self._topics.clear()  # bounded: topics repeat, so the cache refills at once
            cached = self._topics[topic] = (tokens, topic.encode())
        tokens, topic_b = cached
        if retain:
            if not payload:
                self.retained.pop(topic, None)  # an empty retained message clears the topic
            elif topic in self.retained or len(self.retained) < self.limits.max_retained:
                self.retained[topic] = (topic_b, payload, codec)
            else:
                raise BrokerError(ErrorCode.PAYLOAD_TOO_LARGE, "retained store is full")
        self.counters["published"] += 1
        matched = self.index.match(tokens)
        if not matched:
            return 0
        groups: dict[str, list[Subscription]] | None = None
        n = 0
        for sub in matched:
            group = sub.options.group
            if group is None:
                self._deliver(sub, topic_b, payload, codec, 0)
                n += 1
            else:
                if groups is None:
                    groups = {}
                groups.setdefault(group, []).append(sub)
        if groups:
            for group, members in groups.items():
                turn = self._group_turn.get(group, 0)
                self._group_turn[group] = turn + 1
                self._deliver(members[turn % len(members)], topic_b, payload, codec, 0)
                n += 1
        return n

    def _deliver(
        self, sub: Subscription, topic_b: bytes, payload: bytes, codec: int, flags: int
    ) -> None:
        opts = sub.options
        if (
            not sub.pending
            and sub.peer.writable()
            and (opts.qos == 0 or len(sub.inflight) < self.limits.max_inflight)
        ):
            self._send(sub, topic_b, payload, codec, flags)
            return
        size = len(payload) + len(topic_b)
        total_cap = self.limits.max_pending_total
        if (
            len(sub.pending) >= opts.max_msgs
            or sub.pending_bytes + size > opts.max_bytes
            or self.pending_total + size > total_cap
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
                or sub.pending_bytes + size > opts.max_bytes
                or self.pending_total + size > total_cap
            ):
                old = sub.pending.popleft()
                freed = len(old[0]) + len(old[1])
                sub.pending_bytes -= freed
                self.pending_total -= freed
                self._drop(sub, 1)
            if size > opts.max_bytes or self.pending_total + size > total_cap:
                self._drop(sub, 1)
                return
        sub.pending.append((topic_b, payload, codec, flags))
        sub.pending_bytes += size
        self.pending_total += size

    def _send(
        self, sub: Subscription, topic_b: bytes, payload: bytes, codec: int, flags: int
    ) -> None:
        if sub.options.qos:
            did = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            frame = encode_msg(did, sub.sid, topic_b, payload, codec, flags)
            sub.inflight[did] = (frame, self.clock() + self.limits.ack_wait, 1)
        else:
            frame = encode_msg(0, sub.sid, topic_b, payload, codec, flags)
        sub.peer.write_soon(frame)
        sub.delivered += 1
        self.counters["delivered"] += 1

    def _drop(self, sub: Subscription, n: int) -> None:
        sub.dropped += n
        self.counters["dropped"] += n

    def _disconnect_slow(self, sub: Subscription) -> None:
        peer = sub.peer
        behind = len(sub.pending)
        self.counters["slow_consumers_disconnected"] += 1
        self._drop(sub, 1 + behind)
        self.peer_gone(peer)
        peer.close_slow(
            ErrorCode.SLOW_CONSUMER,
            f"subscription {sub.sid} ({sub.pattern}) fell behind by {behind} messages",
        )

    # ------------------------------------------------------------------ flow

    def peer_writable(self, peer: Peer) -> None:
        """The peer's transport drained: send what its subscriptions queued, while it lasts."""
        for sub in list(self._peers.get(peer, {}).values()):
            self._flush(sub)

    def _flush(self, sub: Subscription) -> None:
        peer = sub.peer
        while (
            sub.pending
            and peer.writable()
            and (sub.options.qos == 0 or len(sub.inflight) < self.limits.max_inflight)
        ):
            topic_b, payload, codec, flags = sub.pending.popleft()
            sub.pending_bytes -= len(topic_b) + len(payload)
            self.pending_total -= len(topic_b) + len(payload)
            self._send(sub, topic_b, payload, codec, flags)

    def ack(self, peer: Peer, delivery_id: int) -> None:
        for sub in self._peers.get(peer, {}).values():
            if sub.inflight.pop(delivery_id, None) is not None:
                if sub.pending:
                    self._flush(sub)
                return
        raise BrokerError(ErrorCode.UNKNOWN_DELIVERY, f"no delivery {delivery_id} awaits an ACK")

    def tick(self) -> None:
        """Send again what was not acknowledged in time (call about once a second)."""
        now = self.clock()
        lim = self.limits
        for subs in list(self._peers.values()):
            for sub in list(subs.values()):
                for did, (frame, due, sends) in list(sub.inflight.items()):
                    if due > now:
                        continue
                    if sends >= lim.max_deliveries:
                        del sub.inflight[did]
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

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        subs = [s for subs in self._peers.values() for s in subs.values()]
        return {
            **self.counters,
            "subscriptions": len(subs),
            "connections": len(self._peers),
            "retained": len(self.retained),
            "pending": sum(len(s.pending) for s in subs),
            "pending_bytes": self.pending_total,
            "inflight": sum(len(s.inflight) for s in subs),
            "slow": [
                {
                    "sid": s.sid,
                    "pattern": s.pattern,
                    "policy": s.options.policy,
                    "pending": len(s.pending),
                    "pending_bytes": s.pending_bytes,
                    "delivered": s.delivered,
                    "dropped": s.dropped,
                }
                for s in subs
                if s.dropped or s.pending
            ],
        }
