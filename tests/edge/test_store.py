"""The outbox on its own (a real file): group commit, age limit, state and positions across a
reopen, ids never reused, a failed commit answered as such."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from sockstack.edge.store import Batch, Outbox, StoreLimits, staged_bytes
from tests.conftest import timeout


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def row(stream: str, seq: int) -> tuple[str, int, float, bytes]:
    return (stream, seq, 1.0 * seq, b"\x01")


async def commit(store: Outbox) -> Batch:
    done: asyncio.Future[Batch] = asyncio.get_running_loop().create_future()
    store.pending.done.append(lambda b, e: done.set_exception(e) if e else done.set_result(b))
    store.flush()
    async with asyncio.timeout(timeout(5)):
        return await done


async def test_group_commit_gathers_what_comes_during_a_commit(tmp_path: Path) -> None:
    store = Outbox(tmp_path / "o.db")
    store.open()
    store.start(asyncio.get_running_loop())
    try:
        batches: list[Batch] = []
        store.on_commit(batches.append)
        for i in range(1, 2001):  # staged as fast as the loop goes, each woken for commit
            store.stage([row("s", i)], staged_bytes("s", b"\x01"))
            if i % 100 == 0:
                await asyncio.sleep(0)  # (let the commit loop run: a device's next read)
        await commit(store)
        assert store.stored_rows == 2000
        assert sum(len(b.rows) for b in batches) == 2000
        assert len(batches) < 200  # many readings per fsync
        ids = [(b.first_id, b.last_id) for b in batches if b.rows]
        assert ids[0][0] == 1 and ids[-1][1] == 2000
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ids))
    finally:
        await store.close()


async def test_rows_past_their_age_expire_counted(tmp_path: Path) -> None:
    clock = Clock()
    store = Outbox(tmp_path / "o.db", StoreLimits(max_age=60.0), clock=clock)
    store.open()
    store.start(asyncio.get_running_loop())
    try:
        store.stage([row("s", i) for i in range(1, 11)], 10 * staged_bytes("s", b"\x01"))
        await commit(store)
        clock.now += 30
        store.stage([row("s", 11)], staged_bytes("s", b"\x01"))
        await commit(store)
        clock.now += 45  # the first ten are 75 s old, the last 45 s
        await commit(store)
        assert store.counters.expired == 10 and store.stored_rows == 1
        assert store.oldest_age() == pytest.approx(45.0)
    finally:
        await store.close()


async def test_positions_state_and_ids_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    store = Outbox(path)
    store.open()
    store.start(asyncio.get_running_loop())
    origin = store.origin
    store.stage([row("s", 1)], 60, "d:s", (3, 1), [("0:window", b"k", b"v")])
    store.forwarded(0)
    await commit(store)
    store.forwarded(1)  # forwarded: deleted; its id must never come back
    await commit(store)
    assert store.stored_rows == 0
    await store.close()
    again = Outbox(path)
    again.open()
    try:
        assert again.origin == origin
        assert again.positions == {"d:s": (3, 1)}
        assert again.state_rows == [("0:window", b"k", b"v")]
        assert again.next_id == 2  # not 1: the sink has id 1 already
    finally:
        again.close_now()


async def test_a_full_store_refuses_before_staging(tmp_path: Path) -> None:
    from sockstack.edge.store import StoreBusy, StoreFull

    store = Outbox(tmp_path / "o.db", StoreLimits(max_bytes=1000, max_pending_bytes=500))
    store.open()
    store.start(asyncio.get_running_loop())
    try:
        store.room(400)
        store.stage([row("s", 1)], 400)
        with pytest.raises(StoreBusy):
            store.room(200)  # staged bytes over their bound: wait for the commit
        store.room(200, can_wait=True)  # (a caller that stops reading passes it by one read)
        await commit(store)
        store.stage([row("s", 2)], 400)
        await commit(store)
        with pytest.raises(StoreFull):
            store.room(400)  # 800 stored + 400 > 1000
        assert store.counters.refused_full == 1
    finally:
        await store.close()
