"""Backpressure through the NATS link: a publisher flooding its broker faster than the link
can pass messages on is slowed down (the broker stops reading it while the link's queue is
over half full; the publisher's client waits for its write buffer to drain), and nothing is
dropped, where before the link dropped what did not fit its queue and the publisher's client
reset its own connection past its 8 MiB of unsent bytes."""

from __future__ import annotations

import asyncio

from sockstack import AsyncClient
from tests.conftest import timeout
from tests.pubsub.test_cluster import NatsServer, nats_server, node

__all__ = ["nats_server"]  # (the fixture, imported for this module's tests)

N = 100_000  # 100-byte payloads: 10 MB, above the client's 8 MiB hard bound on unsent bytes


async def test_a_flood_through_the_link_is_slowed_not_dropped(nats_server: NatsServer) -> None:
    async with (
        node(nats_server, max_outgoing_bytes=2 << 20) as a,
        node(nats_server) as b,
        AsyncClient(a.url) as pub,
        AsyncClient(b.url) as sub,
    ):
        got = 0
        done = asyncio.Event()

        def count(_: object) -> None:
            nonlocal got
            got += 1
            if got == N:
                done.set()

        await sub.subscribe("flood.t", callback=count)
        await b.link.flush()  # (b's interest is on NATS)
        payload = b"x" * 100
        for _ in range(N):
            await pub.publish("flood.t", payload)
        try:
            await asyncio.wait_for(done.wait(), timeout(15))
        except TimeoutError:
            stats = a.broker.stats()
            raise AssertionError(
                f"{got} of {N} arrived; dropped for NATS: {stats['cluster_dropped_out']}"
            ) from None
        stats = a.broker.stats()
        assert stats["published"] == N
        assert stats["cluster_dropped_out"] == 0 and stats["cluster_sent"] == N
        assert got == N
        assert pub.channel is not None and pub.channel.stream is not None  # never reset
