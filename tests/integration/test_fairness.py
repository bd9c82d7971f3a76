"""A connection whose read carries a lot of work (a burst of PUBs, each fanned out to many
subscribers) does not hold the event loop until it is all done: after a slice of work the rest
waits a loop turn, and other connections are served in between (issue 10: the broker stopped
answering under a publish flood fanned out to 200 subscriptions)."""

from __future__ import annotations

import asyncio
import time

from sockstack import AsyncClient, Broker, PubSub, Server, ServerLimits, Service, method
from sockstack.pubsub.client import Message
from tests.conftest import timeout

SUBSCRIPTIONS = 200
BURST = 2000  # one write, one read: 400,000 deliveries of work


async def test_a_burst_of_fan_out_work_is_sliced_and_others_are_served() -> None:
    # A 1 ms slice: the burst spans a hundred slices whatever the machine's speed.
    limits = ServerLimits(work_slice=0.001)
    async with Server(patterns=[PubSub(Broker())], tcp=["127.0.0.1:0"], limits=limits) as srv:
        url = str(srv.endpoint("tcp"))
        first = asyncio.Event()
        got = 0

        def on_message(_msg: Message) -> None:
            nonlocal got
            got += 1
            first.set()

        async with AsyncClient(url) as subs, AsyncClient(url) as pub, AsyncClient(url) as good:
            for _ in range(SUBSCRIPTIONS):
                await subs.subscribe("flood", callback=on_message, max_pending=1 << 20)
            for i in range(BURST):  # queued in one loop turn: they leave in one write
                await pub.publish("flood", i)
            await asyncio.wait_for(first.wait(), timeout(30))
            # Deliveries are written only when the work of a read yields the loop. Before
            # slicing, the first message came once the whole burst was published; now a good
            # client is answered while most of the burst is still to do.
            stats = await good.call("broker.stats", timeout=timeout(10))
            assert stats["published"] < BURST, stats["published"]
            await pub.ping(timeout=timeout(60))  # everything before the PING was read
            async with asyncio.timeout(timeout(60)):
                while (await good.call("broker.stats"))["published"] < BURST:
                    await asyncio.sleep(0.05)  # bounded poll: the broker has no event for it


class _Busy(Service):
    """An inline method with a little work per call (a tenth of a millisecond on the clock)."""

    def __init__(self) -> None:
        self.done = 0
        self.started = asyncio.Event()

    @method(inline=True)
    def work(self) -> int:
        self.started.set()  # inline: runs on the server's loop, the test's loop
        end = time.perf_counter() + 0.0001
        while time.perf_counter() < end:  # bounded by the clock: CPU work, not a wait
            pass
        self.done += 1
        return self.done

    @method(inline=True)
    def count(self) -> int:
        return self.done


async def test_a_burst_of_inline_calls_is_sliced_and_others_are_served() -> None:
    # Calls answered at once take the server's inlined path: it too yields the loop after a
    # slice of work, so that a burst of pipelined inline calls (one write) does not hold it.
    limits = ServerLimits(work_slice=0.001)
    busy = _Busy()
    async with Server(busy, tcp=["127.0.0.1:0"], limits=limits) as srv:
        url = str(srv.endpoint("tcp"))
        async with AsyncClient(url) as burst, AsyncClient(url) as good:
            calls = [
                asyncio.ensure_future(burst.call("work", timeout=timeout(60))) for _ in range(BURST)
            ]  # made in one loop turn: they leave in one write
            try:
                await asyncio.wait_for(busy.started.wait(), timeout(30))
                seen = await good.call("count", timeout=timeout(30))
                assert seen < BURST, seen  # answered while most of the burst was still to do
                results = await asyncio.gather(*calls)
            finally:
                for c in calls:
                    c.cancel()
            assert sorted(results) == list(range(1, BURST + 1))
