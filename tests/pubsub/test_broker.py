"""The broker with a fake peer and a fake clock: policies, groups, QoS 1, retained."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from sockstack.errors import ErrorCode
from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.registry import Registry
from sockstack.pubsub import Broker, BrokerError, BrokerLimits
from sockstack.pubsub.broker import INFLIGHT_OVERHEAD, QUEUED_OVERHEAD, RETAINED_OVERHEAD
from sockstack.pubsub.messages import PUBSUB_MESSAGES, Msg

_REGISTRY = Registry([PUBSUB_MESSAGES])


class FakePeer:
    def __init__(self) -> None:
        self.can_write = True
        self.frames: list[Msg] = []
        self.closed: tuple[int, str] | None = None
        self._dec = FrameDecoder()

    def write_soon(self, data: bytes) -> None:
        self.frames += [_REGISTRY.decode(f) for f in self._dec.feed(data)]

    def writable(self) -> bool:
        return self.can_write

    def close_slow(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def values(self) -> list[bytes]:
        return [m.payload for m in self.frames]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def payloads(n: int) -> list[bytes]:
    return [str(i).encode() for i in range(n)]


@pytest.mark.parametrize(
    ("policy", "kept"),
    [("drop-oldest", list(range(7, 10))), ("drop-newest", list(range(0, 3)))],
)
def test_drop_policies_keep_the_right_messages(policy: str, kept: list[int]) -> None:
    broker = Broker()
    slow = FakePeer()
    slow.can_write = False
    broker.subscribe(slow, 1, "t", {"policy": policy, "max_msgs": 3})
    for p in payloads(10):
        broker.publish("t", p)
    assert slow.frames == []
    slow.can_write = True
    broker.peer_writable(slow)
    assert slow.values() == [str(i).encode() for i in kept]
    assert broker.stats()["dropped"] == 7


def test_byte_bound_and_disconnect_policy() -> None:
    broker = Broker()
    slow = FakePeer()
    slow.can_write = False
    one = 60 + 1 + QUEUED_OVERHEAD  # payload, topic, and what holding it costs
    broker.subscribe(slow, 1, "t", {"policy": "disconnect", "max_bytes": one + one // 2})
    broker.publish("t", b"x" * 60)
    assert slow.closed is None
    broker.publish("t", b"x" * 60)  # two queued would pass the bound
    assert slow.closed is not None and slow.closed[0] == ErrorCode.SLOW_CONSUMER
    assert broker.stats()["subscriptions"] == 0  # the peer's subscriptions are gone
    assert broker.publish("t", b"y") == 0


def test_queue_group_round_robin() -> None:
    broker = Broker()
    peers = [FakePeer() for _ in range(3)]
    for i, p in enumerate(peers):
        broker.subscribe(p, i + 1, "jobs.*", {"group": "g"})
    for p in payloads(9):
        broker.publish("jobs.a", p)
    assert [len(p.frames) for p in peers] == [3, 3, 3]
    assert sorted(v for p in peers for v in p.values()) == sorted(payloads(9))


def test_qos1_inflight_bound_redelivery_and_expiry() -> None:
    clock = Clock()
    broker = Broker(BrokerLimits(max_inflight=2, ack_wait=1.0, max_deliveries=2), clock=clock)
    peer = FakePeer()
    broker.subscribe(peer, 1, "t", {"qos": 1})
    for p in payloads(4):
        broker.publish("t", p)
    assert peer.values() == [b"0", b"1"]  # two in flight, the rest wait
    broker.ack(peer, peer.frames[0].delivery_id)
    assert peer.values() == [b"0", b"1", b"2"]  # an ack frees a slot
    clock.now = 1.5
    broker.tick()  # 1 and 2 are overdue: sent again, REDELIVERED
    again = peer.frames[3:]
    assert [m.payload for m in again] == [b"1", b"2"] and all(m.redelivered for m in again)
    clock.now = 3.0
    broker.tick()  # second delivery was the last: given up, counted
    stats = broker.stats()
    assert stats["expired"] == 2 and stats["redelivered"] == 2
    assert peer.values()[-1] == b"3"  # the queued one went out once slots freed
    with pytest.raises(BrokerError) as info:
        broker.ack(peer, 12345)
    assert info.value.code == ErrorCode.UNKNOWN_DELIVERY


def test_retained_store_and_clearing() -> None:
    broker = Broker()
    broker.publish("a.b", b"1", retain=True)
    broker.publish("a.c", b"2", retain=True)
    broker.publish("a.b", b"3", retain=True)
    peer = FakePeer()
    sub = broker.subscribe(peer, 1, "a.*", {})
    assert broker.deliver_retained(sub) == 2
    assert sorted(peer.values()) == [b"2", b"3"] and all(m.retained for m in peer.frames)
    before = broker.stats()["published"]
    broker.publish("a.b", b"", retain=True)  # empty payload clears the topic
    assert list(broker.retained) == ["a.c"]
    # A clear is not a message: nothing goes to those subscribed (PROTOCOL.md §4.1), whatever
    # the codec byte; it counts as published; clearing a topic with nothing retained is fine.
    assert len(peer.frames) == 2
    assert broker.publish("a.c", b"", codec=2, retain=True) == 0
    assert broker.publish("a.nothing", b"", codec=0, retain=True) == 0
    assert broker.retained == {} and broker.retained_bytes == 0
    assert len(peer.frames) == 2 and broker.stats()["published"] == before + 3
    with pytest.raises(BrokerError) as info:
        broker.publish("a.*", b"", retain=True)  # a clear's topic is checked like any other
    assert info.value.code == ErrorCode.BAD_TOPIC


@pytest.mark.parametrize("codec", [1, 2])
def test_an_empty_payload_is_a_message_only_in_the_raw_codec(codec: int) -> None:
    """Without RETAIN, an empty body in msgpack or JSON is no value: refused (DECODE_ERROR),
    not delivered to subscribers who could not decode it; in the raw codec it is b""."""
    broker = Broker()
    peer = FakePeer()
    broker.subscribe(peer, 1, "t", {})
    with pytest.raises(BrokerError) as info:
        broker.publish("t", b"", codec=codec)
    assert info.value.code == ErrorCode.DECODE_ERROR and "raw codec" in info.value.message
    assert peer.frames == []
    assert broker.publish("t", b"", codec=0) == 1
    assert [(m.payload, m.codec) for m in peer.frames] == [(b"", 0)]


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda b, p: b.publish("a.*", b"x"), ErrorCode.BAD_TOPIC),
        (lambda b, p: b.publish("a", b"x" * 2_000_000), ErrorCode.PAYLOAD_TOO_LARGE),
        (lambda b, p: b.subscribe(p, 1, "a..b", {}), ErrorCode.BAD_TOPIC),
        (lambda b, p: b.subscribe(p, 2, "a", {"qos": 2}), ErrorCode.DECODE_ERROR),
        (lambda b, p: b.subscribe(p, 3, "a", {"nope": 1}), ErrorCode.DECODE_ERROR),
        (lambda b, p: b.subscribe(p, 4, "a", {"max_msgs": 10**9}), ErrorCode.DECODE_ERROR),
        (lambda b, p: b.unsubscribe(p, 77), ErrorCode.UNKNOWN_SUBSCRIPTION),
        (lambda b, p: b.subscribe(p, 5, "a", {"qos": True}), ErrorCode.DECODE_ERROR),
        (lambda b, p: b.subscribe(p, 6, "a", {"qos": 1.0}), ErrorCode.DECODE_ERROR),
        (lambda b, p: b.ack(p, 1), ErrorCode.UNKNOWN_DELIVERY),
    ],
)
def test_refusals_have_codes(call: Any, code: int) -> None:
    broker = Broker()
    with pytest.raises(BrokerError) as info:
        call(broker, FakePeer())
    assert info.value.code == code


def test_too_many_subscriptions_has_its_own_code() -> None:
    broker = Broker(BrokerLimits(max_subscriptions_per_peer=2))
    peer = FakePeer()
    broker.subscribe(peer, 1, "a", {})
    broker.subscribe(peer, 2, "b", {})
    with pytest.raises(BrokerError) as info:
        broker.subscribe(peer, 3, "c", {})
    assert info.value.code == ErrorCode.TOO_MANY_SUBSCRIPTIONS == 2015
    assert "max_subscriptions_per_peer" in info.value.message
    with pytest.raises(BrokerError) as info:
        broker.subscribe(peer, 2, "c", {})  # an id in use is still that
    assert info.value.code == ErrorCode.UNKNOWN_SUBSCRIPTION
    broker.subscribe(FakePeer(), 1, "c", {})  # per connection: another peer may


def test_delivery_ids_wrap_skipping_zero_and_the_ids_in_flight() -> None:
    """PROTOCOL.md §4.1: a delivery id is non-zero and not reused on a connection while its
    delivery awaits an ACK, also once the broker's counter has gone past 2^32 - 1."""
    broker = Broker()
    peer, other = FakePeer(), FakePeer()
    broker.subscribe(peer, 1, "t", {"qos": 1})
    broker.subscribe(other, 1, "u", {"qos": 1})
    broker._ids = iter([1, 2, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1, (1 << 32) + 2, (1 << 32) + 3])
    broker.publish("t", b"a")  # id 1, in flight on peer
    broker.publish("u", b"b")  # id 2, in flight on other
    broker.publish("t", b"c")  # 2^32 - 1
    broker.publish("t", b"d")  # 2^32 -> 0: skipped; 1: in flight on peer, skipped; 2: free here
    assert [m.delivery_id for m in peer.frames] == [1, 0xFFFFFFFF, 2]
    assert [m.delivery_id for m in other.frames] == [2]  # the same id on another connection
    with pytest.raises(BrokerError) as info:
        broker.ack(other, 0xFFFFFFFF)  # an ACK settles a delivery of its own connection only
    assert info.value.code == ErrorCode.UNKNOWN_DELIVERY
    broker.ack(peer, 2)
    broker.ack(other, 2)
    assert broker.stats()["inflight"] == 2  # 1 and 2^32 - 1, on peer


def test_peer_gone_removes_everything() -> None:
    broker = Broker()
    peer = FakePeer()
    broker.subscribe(peer, 1, "a.>", {})
    broker.subscribe(peer, 2, "b", {"group": "g"})
    broker.peer_gone(peer)
    assert broker.stats()["subscriptions"] == 0 and len(broker.index) == 0


def test_broker_wide_bound_on_queued_bytes() -> None:
    """Each subscription within its own bound, but together over the broker's: the policy of
    the subscription that would queue more applies, and the total stays under the cap."""
    broker = Broker(BrokerLimits(max_pending_total=1000))
    slow = [FakePeer() for _ in range(3)]
    for i, p in enumerate(slow):
        p.can_write = False
        broker.subscribe(p, i + 1, "t", {"policy": "drop-oldest"})
    for _ in range(100):
        broker.publish("t", b"x" * 50)
        assert broker.held_total <= 1000
    stats = broker.stats()
    assert stats["held_bytes"] <= 1000 and stats["dropped"] > 0
    assert stats["held_bytes"] == stats["pending_bytes"] + stats["pending"] * QUEUED_OVERHEAD
    broker.peer_gone(slow[0])
    assert broker.held_total == sum(s["held_bytes"] for s in broker.stats()["slow"])
    for p in slow[1:]:
        p.can_write = True
        broker.peer_writable(p)
    assert broker.held_total == 0


# --------------------------------------------------------------------------- issue 10: memory
# The byte bounds count what holding a message costs, not only its payload: a bound in payload
# bytes let 100,000 empty messages per subscription take ~9 MB each while counting ~100 KB.


def test_overheads_cover_the_objects_an_entry_holds() -> None:
    """The documented overheads are at least what sys.getsizeof reports for the objects behind
    one entry, beyond the bytes already counted (the RSS side is
    tests/integration/test_broker_memory.py)."""

    def header(obj: bytes | str) -> int:  # what a bytes or str object costs beyond its data
        return sys.getsizeof(obj) - len(obj)

    topic, payload, frame = b"t", b"x" * 10, b"f" * 40
    slot = 8  # a pointer: a deque slot, or each of a dict entry's hash, key and value
    queued = sys.getsizeof((topic, payload, 1, 0)) + slot + header(payload) + header(topic)
    assert QUEUED_OVERHEAD >= queued
    delivery_id, due = 2**31, 1.5
    inflight = sys.getsizeof((frame, due, 1)) + sys.getsizeof(due) + sys.getsizeof(delivery_id)
    inflight += header(frame) + 3 * slot
    assert INFLIGHT_OVERHEAD >= inflight
    retained = sys.getsizeof((topic, payload, 1)) + header("t") + header(topic)
    retained += header(payload) + 3 * slot
    assert RETAINED_OVERHEAD >= retained


def test_empty_messages_count_against_the_byte_bounds() -> None:
    """Empty payloads: the per-subscription and broker-wide bounds hold in charged bytes, so the
    number of queued entries is bounded by bytes / overhead, not by max_msgs."""
    per_sub = 100 * (1 + QUEUED_OVERHEAD)
    broker = Broker(BrokerLimits(max_bytes=per_sub, max_pending_total=3 * per_sub))
    slow = [FakePeer() for _ in range(5)]
    for i, p in enumerate(slow):
        p.can_write = False
        broker.subscribe(p, i + 1, "t", {})
    for _ in range(1000):
        broker.publish("t", b"", codec=0)  # empty raw messages
    stats = broker.stats()
    assert stats["pending"] <= 300  # 3 subscriptions' worth for 5 subscriptions together
    assert stats["held_bytes"] <= 3 * per_sub
    assert all(s["pending"] <= 100 and s["held_bytes"] <= per_sub for s in stats["slow"])
    assert stats["held_bytes"] == stats["pending"] * (1 + QUEUED_OVERHEAD)
    assert stats["dropped"] == 5000 - stats["pending"]


def test_qos1_in_flight_frames_count_in_the_byte_bounds() -> None:
    """A QoS 1 subscriber that reads but never acknowledges: the frames kept for redelivery are
    charged to its bound (not only max_inflight), the overflow queues then drops; ACKs free the
    bytes and the queue flows again."""
    payload = b"p" * 1000
    per_msg = len(payload) + 1 + 20 + INFLIGHT_OVERHEAD  # MSG frame (header + sid) + overhead
    broker = Broker(BrokerLimits(max_bytes=10 * per_msg))
    peer = FakePeer()
    sub = broker.subscribe(peer, 1, "t", {"qos": 1})
    for _ in range(100):
        broker.publish("t", payload)
    stats = broker.stats()
    assert stats["inflight"] == 10 and len(peer.frames) == 10  # the bound, not max_inflight
    assert stats["inflight_bytes"] == 10 * per_msg
    assert stats["held_bytes"] == sub.held <= 10 * per_msg
    assert stats["pending"] == 0 and stats["dropped"] == 90  # no room to queue either
    for m in peer.frames[:5]:
        broker.ack(peer, m.delivery_id)
    assert broker.stats()["held_bytes"] == 5 * per_msg
    broker.publish("t", b"q" * 1000)
    assert len(peer.frames) == 11 and broker.stats()["inflight"] == 6
    broker.peer_gone(peer)
    assert broker.held_total == 0


def test_qos1_counts_in_the_broker_wide_bound_and_flushes_after_acks() -> None:
    clock = Clock()
    payload = b"p" * 100
    per_msg = len(payload) + 1 + 20 + INFLIGHT_OVERHEAD
    broker = Broker(
        BrokerLimits(max_pending_total=20 * per_msg, ack_wait=1.0, max_deliveries=1),
        clock=clock,
    )
    peers = [FakePeer() for _ in range(4)]
    for i, p in enumerate(peers):
        broker.subscribe(p, i + 1, "t", {"qos": 1})
    for _ in range(50):
        broker.publish("t", payload)
        assert broker.held_total <= 20 * per_msg + 4 * (QUEUED_OVERHEAD + 1 + 100)
    assert broker.stats()["inflight"] <= 20
    clock.now = 2.0
    broker.tick()  # one send only: every in-flight message is given up, and its bytes freed
    assert broker.stats()["inflight"] == 0 and broker.held_total == 0
    assert broker.stats()["expired"] > 0


def test_one_message_may_always_be_in_flight() -> None:
    """A bound smaller than one message slows a QoS 1 subscription to one at a time; it never
    stops it."""
    broker = Broker()
    peer = FakePeer()
    broker.subscribe(peer, 1, "t", {"qos": 1, "max_bytes": 100, "policy": "drop-newest"})
    broker.publish("t", b"x" * 500)
    broker.publish("t", b"y" * 500)  # no room in flight or in the queue: dropped
    assert peer.values() == [b"x" * 500]
    broker.ack(peer, peer.frames[0].delivery_id)
    broker.publish("t", b"z" * 500)
    assert peer.values() == [b"x" * 500, b"z" * 500]
    assert broker.stats()["dropped"] == 1


def test_qos1_queue_moves_in_flight_within_the_bound() -> None:
    """Messages queued while the peer could not write go in flight as it drains, only as far as
    the byte bound allows; acks let the rest through, all in order."""
    payload = b"p" * 200
    per_msg = len(payload) + 1 + 20 + INFLIGHT_OVERHEAD
    queued = len(payload) + 1 + QUEUED_OVERHEAD
    bound = 6 * queued + (per_msg - queued)  # 6 queued fit, and room to move one in flight
    broker = Broker(BrokerLimits(max_bytes=bound))
    peer = FakePeer()
    peer.can_write = False
    broker.subscribe(peer, 1, "t", {"qos": 1})
    for i in range(6):
        broker.publish("t", b"%03d" % i + payload[3:])
    assert broker.stats()["pending"] == 6
    peer.can_write = True
    broker.peer_writable(peer)
    sent = len(peer.frames)
    assert 1 <= sent < 6  # in flight replaces queued: the frame costs more than the entry
    assert broker.held_total <= bound
    acked: set[int] = set()
    for _ in range(6):  # each round acknowledges what arrived, which lets more through
        for m in [m for m in peer.frames if m.delivery_id not in acked]:
            acked.add(m.delivery_id)
            broker.ack(peer, m.delivery_id)
    assert [m.payload[:3] for m in peer.frames] == [b"%03d" % i for i in range(6)]
    assert broker.held_total == 0 and broker.stats()["inflight"] == 0


def test_retained_store_is_bounded_in_bytes() -> None:
    """Refused whole beyond max_retained_bytes, with a clear message and a counter; replacing and
    clearing free bytes; the count bound still holds."""
    per = 1000 + 2 * 3 + RETAINED_OVERHEAD  # topics "t.N" for N < 10
    broker = Broker(BrokerLimits(max_retained_bytes=5 * per))
    peer = FakePeer()
    broker.subscribe(peer, 1, "t.*", {})
    for i in range(5):
        broker.publish(f"t.{i}", b"r" * 1000, retain=True)
    assert broker.stats()["retained_bytes"] == 5 * per
    with pytest.raises(BrokerError) as info:
        broker.publish("t.5", b"r" * 1000, retain=True)
    assert info.value.code == ErrorCode.RETAINED_STORE_FULL == 2016
    assert "max_retained_bytes" in info.value.message and str(5 * per) in info.value.message
    assert len(peer.frames) == 5  # the refused message was not routed either
    broker.publish("t.0", b"s" * 900, retain=True)  # replacing with less fits
    assert broker.stats()["retained_bytes"] == 5 * per - 100
    with pytest.raises(BrokerError):
        broker.publish("t.1", b"s" * 1101, retain=True)  # replacing with more than fits
    broker.publish("t.1", b"", retain=True)  # clearing frees it
    broker.publish("t.5", b"r" * 1000, retain=True)
    stats = broker.stats()
    assert stats["retained"] == 5 and stats["retained_bytes"] == 5 * per - 100
    assert stats["retained_refused"] == 2
    small = Broker(BrokerLimits(max_retained=2))
    small.publish("a", b"1", retain=True)
    small.publish("b", b"1", retain=True)
    with pytest.raises(BrokerError) as info:
        small.publish("c", b"1", retain=True)
    assert "max_retained" in info.value.message
    assert info.value.code == ErrorCode.RETAINED_STORE_FULL
    small.publish("a", b"2", retain=True)  # an existing topic may always be replaced


def test_one_message_in_flight_still_respects_the_broker_wide_bound() -> None:
    """The one-in-flight allowance is per subscription: many QoS 1 subscriptions that never
    acknowledge cannot each hold a message beyond the broker's bound."""
    per_msg = 1000 + 1 + 20 + INFLIGHT_OVERHEAD
    broker = Broker(BrokerLimits(max_pending_total=5 * per_msg))
    peers = [FakePeer() for _ in range(20)]
    for i, p in enumerate(peers):
        broker.subscribe(p, i + 1, "t", {"qos": 1, "max_bytes": 100})
    broker.publish("t", b"x" * 1000)
    assert sum(len(p.frames) for p in peers) == 5
    assert broker.held_total <= 5 * per_msg and broker.stats()["dropped"] == 15


def test_group_turns_are_bounded() -> None:
    broker = Broker()
    peer = FakePeer()
    for i in range(10_050):
        broker.subscribe(peer, 1, "t", {"group": f"g{i}"})
        broker.publish("t", b"x")
        broker.unsubscribe(peer, 1)
    assert len(broker._group_turn) <= 10_000
    assert len(peer.frames) == 10_050
