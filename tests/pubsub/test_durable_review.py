"""Review of the durable broker (hrev): each test shows one finding; they fail on the code as
reviewed and pass with the proposed fixes."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from sockstack.errors import ErrorCode
from sockstack.pubsub import Broker, BrokerError, BrokerLimits
from sockstack.pubsub.store import SQLiteStore, StoreError
from tests.pubsub.test_broker import Clock, FakePeer


async def until(cond: Callable[[], Any], seconds: float = 10.0) -> None:
    """Wait (bounded) for ``cond`` to hold, yielding to the loop and the writer thread."""
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


# ---------------------------------------------------------------- 1. after_commit never called


async def test_after_commit_while_a_commit_runs_and_nothing_is_staged_is_called(
    tmp_path: Any,
) -> None:
    """A callback registered while a commit is on its way and nothing new is staged waits for
    a wake that never comes (only _stage sets it): called only when something else is staged."""
    store = SQLiteStore(str(tmp_path / "b.db"))
    store.load()
    store.start()
    gate = threading.Event()
    store._writer.submit(gate.wait, 10)  # the writer thread busy: the next commit waits
    store.retain("t", b"x", 1)
    await until(lambda: not store.staged and store.committing_bytes > 0)
    called = asyncio.Event()
    store.after_commit(lambda ok: called.set())
    gate.set()
    try:
        await asyncio.wait_for(called.wait(), 5)
    finally:
        await store.close()


async def test_qos1_publish_on_a_topic_no_durable_holds_is_answered_during_a_commit(
    tmp_path: Any,
) -> None:
    """End to end: a QoS 1 PUB on a topic the store does not keep, arriving while the commit of
    another publish runs, is never answered on an idle broker (the client times out)."""
    from sockstack import AsyncClient, Server

    broker = Broker(store=SQLiteStore(str(tmp_path / "b.db")))
    store = broker.store
    assert isinstance(store, SQLiteStore)
    async with Server(tcp=["127.0.0.1:0"], broker=broker) as srv:
        async with AsyncClient(str(srv.endpoint("tcp")), timeout=10) as client:
            await client.subscribe("t", durable="d")
            await until(lambda: not store.pending_commit())
            gate = threading.Event()
            store._writer.submit(gate.wait, 10)
            first = asyncio.create_task(client.publish("t", 1, qos=1))  # held: a commit
            await until(
                lambda: (
                    broker.counters["published"] == 1
                    and not store.staged
                    and store.committing_bytes > 0
                )
            )
            second = asyncio.create_task(client.publish("other", 2, qos=1))  # nothing staged
            await until(lambda: broker.counters["published"] == 2)
            gate.set()
            await asyncio.wait_for(first, 5)
            await asyncio.wait_for(second, 5)


# ---------------------------------------------------------------- 2. held_total drift


def test_retained_messages_after_a_slow_consumer_disconnect_leave_nothing_held() -> None:
    """deliver_retained goes on delivering to a subscription that _deliver just disconnected
    (policy disconnect): its bytes are charged to held_total and never given back."""
    broker = Broker()
    for i in range(3):
        broker.publish(f"r.{i}", b"x" * 100, retain=True)
    a = FakePeer()
    sub = broker.subscribe(a, 1, "r.*", {"qos": 1, "policy": "disconnect", "max_bytes": 400})
    broker.deliver_retained(sub)
    assert a.closed is not None and a.closed[0] == ErrorCode.SLOW_CONSUMER
    assert broker.stats()["subscriptions"] == 0
    assert broker.held_total == 0, broker.held_total


def test_durable_with_disconnect_policy_and_retained_leaves_nothing_held() -> None:
    broker = Broker()
    for i in range(3):
        broker.publish(f"r.{i}", b"x" * 100, retain=True)
    a = FakePeer()
    sub = broker.subscribe(a, 1, "r.*", {"durable": "d", "policy": "disconnect", "max_bytes": 400})
    broker.deliver_retained(sub)
    assert a.closed is not None
    assert broker.held_total == 0, broker.held_total


def test_a_publish_to_two_subscriptions_of_a_disconnected_peer_leaves_nothing_held() -> None:
    """publish's loop over the matched subscriptions goes on to a subscription of the peer that
    the previous one's disconnect already forgot."""
    broker = Broker()
    a = FakePeer()
    a.can_write = False
    broker.subscribe(a, 1, "t", {"policy": "disconnect", "max_msgs": 1})
    broker.subscribe(a, 2, "t", {"policy": "disconnect", "max_msgs": 1})
    broker.publish("t", b"1")
    broker.publish("t", b"2")
    assert a.closed is not None
    assert broker.stats()["subscriptions"] == 0
    assert broker.held_total == 0, broker.held_total
    assert broker.counters["slow_consumers_disconnected"] == 1


# ---------------------------------------------------------------- 3. staged bytes unbounded


def test_messages_from_the_link_for_a_local_durable_respect_max_staged_bytes(
    tmp_path: Any,
) -> None:
    """deliver_remote (the NATS link, broker --store --cluster) holds messages for local durable
    subscriptions without looking at store.busy(): while the disk is behind, staged grows
    without bound (the durable itself stays within max_msgs: drop-oldest stages removals too)."""
    store = SQLiteStore(str(tmp_path / "b.db"), max_staged_bytes=10_000)
    broker = Broker(store=store)  # not started: the disk never catches up
    a = FakePeer()
    broker.subscribe(a, 1, "t", {"durable": "d", "max_msgs": 10})
    broker.peer_gone(a)  # away: drop-oldest drops what waits
    for _ in range(2000):
        try:
            broker.deliver_remote("t", None, "t", b"x" * 100, 1)
        except BrokerError:
            pass
    assert broker.stats()["durables"][0]["pending"] <= 10
    staged = store.staged_bytes
    store.close_now()
    assert staged <= 10_000 + 1000, staged


def test_retained_clears_respect_max_staged_bytes(tmp_path: Any) -> None:
    """An empty retained publish (a clear) is staged before the busy() check."""
    store = SQLiteStore(str(tmp_path / "b.db"), max_staged_bytes=10_000)
    broker = Broker(store=store)
    refused = 0
    for i in range(2000):
        try:
            broker.publish(f"t.{i}", b"", retain=True)
        except BrokerError as exc:
            assert exc.code == ErrorCode.STORE_FULL
            refused += 1
    staged = store.staged_bytes
    store.close_now()
    assert staged <= 10_000 + 1000, (staged, refused)


# ---------------------------------------------------------------- 4. max_age and in flight


def test_a_message_in_flight_past_max_age_is_given_up() -> None:
    """PROTOCOL.md §4.1: "sent again until acknowledged or too old". _expire_durables looks at
    todo only: a message in flight to an attached subscriber that never ACKs it is sent again
    every ack_wait for ever, whatever its age."""
    clock, wall = Clock(), Clock()
    broker = Broker(BrokerLimits(ack_wait=1.0), clock=clock, wallclock=wall)
    a = FakePeer()
    broker.subscribe(a, 1, "t", {"durable": "d", "max_age": 10})
    broker.publish("t", b"old")
    assert len(a.frames) == 1
    for _ in range(20):
        clock.now += 2
        wall.now += 2
        broker.tick()
    assert broker.stats()["durables"][0]["expired"] == 1
    assert broker.durable_bytes == 0


# ---------------------------------------------------------------- 5. the window's bound


def test_page_in_keeps_the_window_within_durable_window(tmp_path: Any) -> None:
    """_page_in reads up to durable_window bytes whatever the window already holds (messages
    kept at its tail while attached): the window reaches twice durable_window."""
    window = 4000

    async def main() -> int:
        store = SQLiteStore(str(tmp_path / "b.db"))
        broker = Broker(BrokerLimits(durable_window=window, max_inflight=1), store=store)
        store.start()
        a = FakePeer()
        broker.subscribe(a, 1, "t", {"durable": "d"})
        broker.peer_gone(a)  # away: what comes waits on disk only
        for i in range(20):
            broker.publish("t", bytes([i]) * 1000)
        await until(lambda: not store.pending_commit())
        b = FakePeer()
        b.can_write = False
        sub = broker.subscribe(b, 2, "t", {"durable": "d"})
        for i in range(20, 30):  # attached, not writable: kept in memory at the tail
            broker.publish("t", bytes([i]) * 1000)
        await until(lambda: not store.pending_commit())
        d = sub.durable
        assert d is not None
        before = d.window
        b.can_write = True
        broker.peer_writable(b)  # pages in the head
        most = max(before, d.window)
        got: list[bytes] = []
        for _ in range(200):  # and everything still comes, in order
            while b.frames:
                m = b.frames.pop(0)
                got.append(m.payload)
                broker.ack(b, m.delivery_id)
                most = max(most, d.window)
            if len(got) == 30:
                break
            await until(lambda: not store.pending_commit())
            broker.peer_writable(b)
        assert got == [bytes([i]) * 1000 for i in range(30)]
        await store.close()
        return most

    most = run(main())
    assert most <= window + 1001, most


# ---------------------------------------------------------------- 6. a failing read


class FailingReadStore(SQLiteStore):
    """The store whose reads fail (a damaged page, an I/O error): what sqlite3 raises then."""

    fail = False

    def read(self, ids: Sequence[int]) -> dict[int, tuple[bytes, bytes, int]]:
        if self.fail:
            raise sqlite3.DatabaseError("database disk image is malformed")
        return super().read(ids)


def test_a_store_read_error_neither_escapes_nor_loses_the_head_of_the_queue(
    tmp_path: Any,
) -> None:
    """_page_in pops up to 256 entries off todo, then reads: when the read raises (a damaged
    page, an I/O error) the entries are never put back (the messages vanish from the queue
    while still charged in d.bytes and durable_bytes, and still on disk), and the sqlite3 error
    escapes from peer_writable / ack / publish, which the pattern does not catch (asyncio then
    drops that connection: with publish, any client's)."""

    async def main() -> tuple[list[str], int, int]:
        store = FailingReadStore(str(tmp_path / "b.db"))
        broker = Broker(store=store)
        store.start()
        a = FakePeer()
        broker.subscribe(a, 1, "t", {"durable": "d"})
        broker.peer_gone(a)
        broker.publish("t", b"on disk")
        await until(lambda: not store.pending_commit())
        b = FakePeer()
        b.can_write = False
        broker.subscribe(b, 2, "t", {"durable": "d"})
        store.fail = True
        b.can_write = True
        escaped: list[str] = []
        try:
            broker.peer_writable(b)
        except sqlite3.Error as exc:
            escaped.append(f"peer_writable: {exc!r}")
        store.fail = False  # the disk is fine again
        broker.peer_writable(b)
        await until(lambda: not store.pending_commit())
        broker.peer_writable(b)
        got = len(b.frames)
        pending = broker.stats()["durables"][0]["pending"]
        await store.close()
        return escaped, got, pending

    escaped, got, pending = run(main())
    assert (got, pending) == (1, 1), (got, pending, escaped)
    assert not escaped, escaped


# ---------------------------------------------------------------- 7. loading


def test_a_damaged_durable_row_is_a_store_error(tmp_path: Any) -> None:
    """A durables row whose options are not msgpack (a damaged or hand-edited file that passes
    quick_check): load raises msgpack's exception, which serve's _broker does not catch (a
    traceback instead of the clear refusal of a damaged file)."""
    path = str(tmp_path / "b.db")

    async def first() -> None:
        store = SQLiteStore(path)
        broker = Broker(store=store)
        store.start()
        broker.subscribe(FakePeer(), 1, "t", {"durable": "d"})
        await store.close()

    run(first())
    con = sqlite3.connect(path)
    con.execute("UPDATE durables SET options = x'c1'")
    con.commit()
    con.close()
    with pytest.raises(StoreError):
        Broker(store=SQLiteStore(path))


def test_lower_limits_at_restart_do_not_delete_a_durable_and_its_messages(tmp_path: Any) -> None:
    """A durable stored with max_msgs above the new broker's limit is deleted from the store,
    with every message it held (_load: SubOptions.parse refuses, then delete_durable)."""
    path = str(tmp_path / "b.db")

    async def first() -> None:
        store = SQLiteStore(path)
        broker = Broker(store=store)
        store.start()
        a = FakePeer()
        broker.subscribe(a, 1, "t", {"durable": "d"})  # max_msgs: the default 500,000
        broker.peer_gone(a)
        broker.publish("t", b"keep me")
        await store.close()

    async def second() -> list[dict[str, Any]]:
        store = SQLiteStore(path)
        broker = Broker(BrokerLimits(max_msgs=1000), store=store)
        store.start()
        await store.close()
        return list(broker.stats()["durables"])

    run(first())
    durables = run(second())
    assert [d["pending"] for d in durables] == [1]


# ---------------------------------------------------------------- 8. disk space


def test_disk_space_comes_back_once_acknowledged(tmp_path: Any) -> None:
    """SCALING.md: "Disk space comes back as messages are acknowledged (auto_vacuum=
    INCREMENTAL)". Python's execute() steps a PRAGMA once, and incremental_vacuum frees one
    page per step: each commit frees one 4 KiB page (in a transaction and fsync of its own)."""
    path = str(tmp_path / "b.db")

    async def main() -> None:
        store = SQLiteStore(path)
        broker = Broker(store=store)
        store.start()
        a = FakePeer()
        broker.subscribe(a, 1, "t", {"durable": "d"})
        broker.peer_gone(a)
        for i in range(2000):  # 20 MB while away
            broker.publish("t", i.to_bytes(4, "big") * 2500)
            if store.busy():
                await until(lambda: not store.pending_commit())
        await until(lambda: not store.pending_commit())
        b = FakePeer()
        sub = broker.subscribe(b, 2, "t", {"durable": "d"})
        broker.deliver_retained(sub)
        got = 0
        for _ in range(2000):
            while b.frames:
                broker.ack(b, b.frames.pop(0).delivery_id)
                got += 1
            if got == 2000:
                break
            await until(lambda: not store.pending_commit())
            broker.peer_writable(b)
        assert got == 2000
        for _ in range(5):  # a few more commits (each vacuums)
            broker.publish("keep", b"r", retain=True)
            await until(lambda: not store.pending_commit())
        await store.close()

    run(main())
    con = sqlite3.connect(path)
    free = con.execute("PRAGMA freelist_count").fetchone()[0]
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    assert free < 500, (free, pages)
