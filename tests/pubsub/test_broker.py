"""The broker with a fake peer and a fake clock: policies, groups, QoS 1, retained."""

from __future__ import annotations

from typing import Any

import pytest

from sockstack.errors import ErrorCode
from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.registry import Registry
from sockstack.pubsub import Broker, BrokerError, BrokerLimits
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
    broker.subscribe(slow, 1, "t", {"policy": "disconnect", "max_bytes": 100})
    broker.publish("t", b"x" * 60)
    assert slow.closed is None
    broker.publish("t", b"x" * 60)  # 120 bytes queued would pass the 100-byte bound
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
    broker.publish("a.b", b"", retain=True)  # empty payload clears the topic
    assert list(broker.retained) == ["a.c"]


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
    ],
)
def test_refusals_have_codes(call: Any, code: int) -> None:
    broker = Broker()
    with pytest.raises(BrokerError) as info:
        call(broker, FakePeer())
    assert info.value.code == code


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
        assert broker.pending_total <= 1000
    stats = broker.stats()
    assert stats["pending_bytes"] <= 1000 and stats["dropped"] > 0
    broker.peer_gone(slow[0])
    assert broker.pending_total == sum(s["pending_bytes"] for s in broker.stats()["slow"])
    for p in slow[1:]:
        p.can_write = True
        broker.peer_writable(p)
    assert broker.pending_total == 0
