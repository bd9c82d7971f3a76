"""Durable subscriptions in the broker (fake peers, fake clocks) and with its SQLite store."""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
from typing import Any

import pytest

from sockstack.errors import ErrorCode
from sockstack.pubsub import Broker, BrokerError, BrokerLimits
from sockstack.pubsub.broker import DURABLE_OVERHEAD
from sockstack.pubsub.messages import Msg
from sockstack.pubsub.store import SQLiteStore, StoreError
from tests.pubsub.test_broker import Clock, FakePeer


def ack_all(broker: Broker, peer: FakePeer) -> list[bytes]:
    """Acknowledge what ``peer`` received; returns the payloads, in order."""
    got = []
    while peer.frames:  # (acknowledging may send more: those too)
        m = peer.frames.pop(0)
        got.append(m.payload)
        if m.delivery_id:
            broker.ack(peer, m.delivery_id)
    return got


def test_messages_wait_while_away_and_come_in_order() -> None:
    broker = Broker()
    a = FakePeer()
    broker.subscribe(a, 1, "orders.>", {"durable": "billing"})
    broker.publish("orders.1", b"1")
    assert [m.payload for m in a.frames] == [b"1"]
    assert a.frames[0].delivery_id  # QoS 1
    broker.peer_gone(a)  # away, without acknowledging 1
    for i in range(2, 6):
        broker.publish(f"orders.{i}", str(i).encode())
    broker.publish("other", b"x")
    b = FakePeer()
    sub = broker.subscribe(b, 7, "orders.>", {"durable": "billing"})
    broker.deliver_retained(sub)  # (the pattern calls it after answering the SUB)
    frames = list(b.frames)
    assert [m.payload for m in frames] == [b"1", b"2", b"3", b"4", b"5"]
    assert frames[0].redelivered and not frames[1].redelivered
    assert all(m.sid == 7 for m in frames)
    ack_all(broker, b)
    stats = broker.stats()["durables"][0]
    assert stats["pending"] == 0 and stats["attached"]
    assert broker.durable_bytes == 0


def test_a_new_subscriber_takes_a_durable_over() -> None:
    broker = Broker()
    a, b = FakePeer(), FakePeer()
    broker.subscribe(a, 1, "t", {"durable": "d"})
    broker.publish("t", b"1")
    broker.deliver_retained(broker.subscribe(b, 1, "t", {"durable": "d"}))
    broker.publish("t", b"2")
    assert [m.payload for m in a.frames] == [b"1"]  # a's subscription ended
    assert [(m.payload, m.redelivered) for m in b.frames] == [(b"1", True), (b"2", False)]
    with pytest.raises(BrokerError) as err:  # a's delivery is not b's
        broker.ack(a, a.frames[0].delivery_id)
    assert err.value.code == ErrorCode.UNKNOWN_DELIVERY
    assert ack_all(broker, b) == [b"1", b"2"]


def test_unsubscribe_deletes_and_a_closed_connection_keeps() -> None:
    broker = Broker()
    a = FakePeer()
    broker.subscribe(a, 1, "t", {"durable": "d"})
    broker.peer_gone(a)
    broker.publish("t", b"kept")
    assert broker.stats()["durables"][0]["pending"] == 1
    b = FakePeer()
    broker.deliver_retained(broker.subscribe(b, 2, "t", {"durable": "d"}))
    broker.unsubscribe(b, 2)
    assert broker.stats()["durables"] == [] and broker.durable_bytes == 0
    broker.publish("t", b"nobody")
    c = FakePeer()
    broker.deliver_retained(broker.subscribe(c, 3, "t", {"durable": "d"}))
    assert c.frames == []  # a new durable: only what comes from now on


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ({"durable": "d", "qos": 0}, ErrorCode.DECODE_ERROR),
        ({"durable": "d", "group": "g"}, ErrorCode.DECODE_ERROR),
        ({"durable": ""}, ErrorCode.DECODE_ERROR),
        ({"durable": "x" * 256}, ErrorCode.DECODE_ERROR),
        ({"durable": 5}, ErrorCode.DECODE_ERROR),
        ({"max_age": 5}, ErrorCode.DECODE_ERROR),
        ({"durable": "d", "max_age": -1}, ErrorCode.DECODE_ERROR),
        ({"durable": "d", "max_age": True}, ErrorCode.DECODE_ERROR),
    ],
)
def test_bad_durable_options_are_refused_with_a_code(raw: dict[str, Any], code: int) -> None:
    with pytest.raises(BrokerError) as err:
        Broker().subscribe(FakePeer(), 1, "t", raw)
    assert err.value.code == code


def test_a_durable_keeps_its_pattern() -> None:
    broker = Broker()
    broker.subscribe(FakePeer(), 1, "a.*", {"durable": "d"})
    with pytest.raises(BrokerError) as err:
        broker.subscribe(FakePeer(), 1, "b.*", {"durable": "d"})
    assert err.value.code == ErrorCode.BAD_TOPIC and "a.*" in err.value.message


@pytest.mark.parametrize(
    ("policy", "kept"), [("drop-oldest", [b"7", b"8", b"9"]), ("drop-newest", [b"0", b"1", b"2"])]
)
def test_bounds_while_away_follow_the_policy(policy: str, kept: list[bytes]) -> None:
    broker = Broker()
    a = FakePeer()
    broker.subscribe(a, 1, "t", {"durable": "d", "max_msgs": 3, "policy": policy})
    broker.peer_gone(a)
    for i in range(10):
        broker.publish("t", str(i).encode())
    b = FakePeer()
    broker.deliver_retained(broker.subscribe(b, 1, "t", {"durable": "d"}))
    assert ack_all(broker, b) == kept
    assert broker.stats()["dropped"] == 7


def test_byte_bounds_count_the_overhead_and_the_broker_total() -> None:
    one = 100 + 1 + DURABLE_OVERHEAD
    broker = Broker(BrokerLimits(max_durable_bytes=5 * one))
    a = FakePeer()
    broker.subscribe(a, 1, "t", {"durable": "d1", "max_bytes": 3 * one})
    broker.subscribe(a, 2, "t", {"durable": "d2"})
    broker.peer_gone(a)
    for _ in range(10):
        broker.publish("t", b"x" * 100)
    held = {d["name"]: d["pending"] for d in broker.stats()["durables"]}
    assert held["d1"] == 3  # its own bound
    assert held["d1"] + held["d2"] == 5  # the broker's, for all together
    assert broker.durable_bytes == 5 * one


def test_disconnect_policy_ends_the_subscriber_and_keeps_the_durable() -> None:
    broker = Broker()
    a = FakePeer()
    a.can_write = False
    broker.subscribe(a, 1, "t", {"durable": "d", "max_msgs": 2, "policy": "disconnect"})
    for i in range(3):
        broker.publish("t", str(i).encode())
    assert a.closed is not None and a.closed[0] == ErrorCode.SLOW_CONSUMER
    b = FakePeer()
    broker.deliver_retained(broker.subscribe(b, 1, "t", {"durable": "d"}))
    assert ack_all(broker, b) == [b"0", b"1"]


def test_max_age_gives_up_old_messages() -> None:
    wall = Clock()
    broker = Broker(clock=Clock(), wallclock=wall)
    a = FakePeer()
    broker.subscribe(a, 1, "t", {"durable": "d", "max_age": 60})
    broker.peer_gone(a)
    broker.publish("t", b"old")
    wall.now = 50.0
    broker.publish("t", b"new")
    wall.now = 61.0
    broker.tick()
    b = FakePeer()
    broker.deliver_retained(broker.subscribe(b, 1, "t", {"durable": "d"}))
    assert ack_all(broker, b) == [b"new"]
    assert broker.stats()["expired"] == 1


def test_durable_messages_are_sent_again_until_acknowledged() -> None:
    clock = Clock()
    broker = Broker(BrokerLimits(ack_wait=1.0, max_deliveries=2), clock=clock)
    a = FakePeer()
    broker.subscribe(a, 1, "t", {"durable": "d"})
    broker.publish("t", b"m")
    for _ in range(5):  # beyond max_deliveries: a durable gives up only by age
        clock.now += 2.0
        broker.tick()
    assert len(a.frames) == 6 and all(m.redelivered for m in a.frames[1:])
    broker.ack(a, a.frames[-1].delivery_id)
    assert broker.stats()["durables"][0]["pending"] == 0


def test_inflight_bound_applies_and_acks_move_the_queue() -> None:
    broker = Broker(BrokerLimits(max_inflight=2))
    a = FakePeer()
    broker.subscribe(a, 1, "t", {"durable": "d"})
    for i in range(5):
        broker.publish("t", str(i).encode())
    assert [m.payload for m in a.frames] == [b"0", b"1"]
    got = []
    for _ in range(5):
        got += ack_all(broker, a)
    assert got == [b"0", b"1", b"2", b"3", b"4"]


def test_entry_memory_is_within_the_overhead() -> None:
    """DURABLE_OVERHEAD covers what an entry a durable holds costs in memory (tracemalloc over
    20,000 held messages sharing one payload, with the subscriber away: the entries only)."""
    broker = Broker()
    a = FakePeer()
    broker.subscribe(a, 1, "t.x", {"durable": "d"})
    broker.peer_gone(a)
    payload = b"p" * 100
    n = 20_000
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        broker.publish("t.x", payload)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per = used / n
    assert broker.stats()["durables"][0]["pending"] == n
    assert per <= DURABLE_OVERHEAD, per


# ---------------------------------------------------------------------------- with the store


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def committed(store: SQLiteStore) -> None:
    done = asyncio.Event()
    store.after_commit(lambda ok: done.set())
    await asyncio.wait_for(done.wait(), 10)


def test_store_keeps_durables_retained_and_ids_across_restarts(tmp_path: Any) -> None:
    path = str(tmp_path / "broker.db")

    async def first() -> None:
        store = SQLiteStore(path)
        broker = Broker(store=store)
        store.start()
        a = FakePeer()
        broker.subscribe(a, 1, "t.>", {"durable": "d", "max_msgs": 1000})
        broker.publish("t.1", b"acked")
        broker.publish("keep", b"r", retain=True)
        await committed(store)
        ack_all(broker, a)
        broker.peer_gone(a)
        broker.publish("t.2", b"two")
        broker.publish("t.3", b"three", codec=2)
        await store.close()

    async def second() -> list[Msg]:
        store = SQLiteStore(path)
        broker = Broker(store=store)
        store.start()
        assert broker.retained["keep"][1] == b"r"
        assert broker.stats()["durables"][0]["pending"] == 2
        b = FakePeer()
        broker.deliver_retained(broker.subscribe(b, 1, "t.>", {"durable": "d"}))
        got = list(b.frames)
        ack_all(broker, b)
        broker.publish("t.4", b"four")
        await committed(store)
        assert broker._mid == 4  # ids go on from where they were
        await store.close()
        return got

    run(first())
    got = run(second())
    assert [(m.topic, m.payload, m.codec) for m in got] == [
        ("t.2", b"two", 1),
        ("t.3", b"three", 2),
    ]


def test_store_reads_back_beyond_the_window_in_order(tmp_path: Any) -> None:
    """A durable whose messages do not fit its window reads them back from disk, in order,
    waiting for the commit when they are not on disk yet."""
    path = str(tmp_path / "broker.db")

    async def main() -> list[bytes]:
        store = SQLiteStore(path)
        broker = Broker(BrokerLimits(durable_window=2000, max_inflight=50), store=store)
        store.start()
        a = FakePeer()
        broker.subscribe(a, 1, "t", {"durable": "d"})
        for i in range(400):
            broker.publish("t", f"{i:04d}".encode() * 25)
        got: list[bytes] = []
        for _ in range(100):
            got += ack_all(broker, a)
            if len(got) == 400:
                break
            await committed(store)
        await store.close()
        return got

    got = run(main())
    assert got == [f"{i:04d}".encode() * 25 for i in range(400)]


def test_one_broker_per_store_file(tmp_path: Any) -> None:
    path = str(tmp_path / "broker.db")
    store = SQLiteStore(path)
    store.load()
    try:
        with pytest.raises(StoreError, match="in use"):
            SQLiteStore(path).load()
    finally:
        store.close_now()


def test_a_file_that_is_not_a_store_is_refused_clearly(tmp_path: Any) -> None:
    path = tmp_path / "broker.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError):
        SQLiteStore(str(path)).load()


def test_publish_is_refused_when_the_disk_is_behind(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "b.db"), max_staged_bytes=10_000)
    broker = Broker(store=store)  # not started: nothing is committed
    broker.subscribe(FakePeer(), 1, "t", {"durable": "d"})
    with pytest.raises(BrokerError) as err:
        for _ in range(1000):
            broker.publish("t", b"x" * 100)
    assert err.value.code == ErrorCode.STORE_FULL
    assert store.staged_bytes <= 10_000 + 1000
    assert broker.publish("other.topic", b"x") == 0  # what the store does not hold goes on
    store.close_now()


def test_with_a_store_memory_holds_the_window_not_the_backlog(tmp_path: Any) -> None:
    """20 MB published to a durable subscription whose subscriber does not read: once
    committed, the broker's memory grows by its entries and its window (1 MiB here), not by
    the 20 MB, which wait on disk (tracemalloc, after the commit)."""
    window = 1 << 20
    n, size = 2000, 10_000

    async def main() -> tuple[int, int]:
        store = SQLiteStore(str(tmp_path / "b.db"))
        broker = Broker(BrokerLimits(durable_window=window), store=store)
        store.start()
        a = FakePeer()
        a.can_write = False
        broker.subscribe(a, 1, "t", {"durable": "d"})
        await committed(store)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            broker.publish("t", i.to_bytes(4, "big") * (size // 4))  # each its own bytes
            if store.busy():
                await committed(store)
        await committed(store)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        pending = broker.stats()["durables"][0]["pending"]
        a.can_write = True
        broker.peer_writable(a)
        got: list[bytes] = []
        for _ in range(200):
            got += ack_all(broker, a)
            if len(got) == n:
                break
            await committed(store)
        assert got == [i.to_bytes(4, "big") * (size // 4) for i in range(n)]
        await store.close()
        return used, pending

    used, pending = run(main())
    assert pending == n
    assert used <= n * DURABLE_OVERHEAD + window + size + 256 * 1024, used


async def test_a_failed_commit_answers_the_qos1_publish_with_an_error(tmp_path: Any) -> None:
    """The disk refuses (a trigger makes SQLite abort the commit): a QoS 1 PUB the store was to
    keep gets ERROR UNAVAILABLE, never the RESPONSE that would say it is kept."""
    import sqlite3

    from sockstack import AsyncClient, RemoteError, Server

    path = str(tmp_path / "b.db")
    broker = Broker(store=SQLiteStore(path))
    async with Server(tcp=["127.0.0.1:0"], broker=broker) as srv:
        async with AsyncClient(str(srv.endpoint("tcp")), timeout=10) as client:
            await client.subscribe("t", durable="d")
            await client.publish("t", 1, qos=1)  # kept
            con = sqlite3.connect(path)
            con.execute(
                "CREATE TRIGGER no BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'no'); END"
            )
            con.commit()
            con.close()
            with pytest.raises(RemoteError) as err:
                await client.publish("t", 2, qos=1)
            assert err.value.code == ErrorCode.UNAVAILABLE
            assert "not kept" in str(err.value)


class KeepingLink:
    """The broker's side of a link that keeps durable subscriptions (as JetStream does): it
    records what the broker tells it, and feeds what the test gives it."""

    holds_durables = True

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def published(self, topic: str, payload: bytes, codec: int, retain: bool) -> None:
        pass

    def interest(self, pattern: str, group: str | None, present: bool) -> None:
        pass

    def durable_attach(self, d: Any) -> None:
        self.events.append(("attach", d.name))

    def durable_more(self, d: Any) -> None:
        self.events.append(("more", d.name))

    def durable_ack(self, d: Any, token: object) -> None:
        self.events.append(("ack", token))

    def durable_detach(self, d: Any, unacked: list[object]) -> None:
        self.events.append(("detach", sorted(unacked)))  # type: ignore[type-var]

    def durable_delete(self, d: Any) -> None:
        self.events.append(("delete", d.name))


def test_a_link_that_keeps_durables_feeds_them_within_room_and_gets_acks_and_returns() -> None:
    broker = Broker(BrokerLimits(max_inflight=2))
    link = KeepingLink()
    broker.attach_link(link)
    a = FakePeer()
    sub = broker.subscribe(a, 1, "t.>", {"durable": "d"})
    d = sub.durable
    assert d is not None and d.remote and link.events == [("attach", "d")]
    assert broker.durable_room(d) == 2
    broker.publish("t.x", b"live")  # not held by the broker: the link keeps durables
    assert a.frames == [] and broker.durable_bytes == 0
    assert broker.durable_feed(d, "t.1", b"1", 1, "tok1")
    assert broker.durable_feed(d, "t.2", b"2", 1, "tok2", redelivered=True)
    assert broker.durable_room(d) == 0
    assert [(m.payload, m.redelivered) for m in a.frames] == [(b"1", False), (b"2", True)]
    broker.ack(a, a.frames[0].delivery_id)
    assert ("ack", "tok1") in link.events and link.events[-1] == ("more", "d")
    assert broker.durable_room(d) == 1
    assert broker.durable_feed(d, "t.3", b"3", 1, "tok3")
    broker.peer_gone(a)  # away: what it did not acknowledge goes back to the link
    assert link.events[-1] == ("detach", ["tok2", "tok3"])
    assert broker.durable_bytes == 0 and not broker.durables
    assert not broker.durable_feed(d, "t.4", b"4", 1, "tok4")  # (the link gives it back)
    b = FakePeer()
    broker.subscribe(b, 5, "t.>", {"durable": "d"})
    broker.unsubscribe(b, 5)
    assert link.events[-1] == ("delete", "d")
