"""A broker's own durable subscription (its SQLite store) in a cluster joined through core
NATS: it holds what other brokers publish while its subscriber is away, across a restart of
its broker; its interest stays on NATS while nobody is attached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sockstack import AsyncClient
from sockstack.pubsub import Broker, SQLiteStore
from tests.pubsub.test_cluster import Inbox, NatsServer, nats_server, node, wait_for

__all__ = ["nats_server"]  # (the fixture, imported for this module's tests)


def stored_node(nats: NatsServer, path: Path) -> Any:
    return node(nats, broker=Broker(store=SQLiteStore(str(path))))


async def test_a_durable_holds_what_other_brokers_publish_while_away_and_over_a_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    path = tmp_path / "b.db"
    async with node(nats_server) as a, AsyncClient(a.url) as pub:
        async with stored_node(nats_server, path) as b:
            async with AsyncClient(b.url) as sub:
                first = Inbox()
                await sub.subscribe("orders.>", durable="billing", callback=first)
                await b.link.flush()
                await pub.publish("orders.1", 1, qos=1)
                await first.until(1)
            # Away (its client closed): the interest stays, what comes is held on disk.
            for i in (2, 3):
                await pub.publish(f"orders.{i}", i, qos=1)
            await wait_for(lambda: b.broker.stats()["durables"][0]["pending"] == 2)
        # b restarted on its store: the two wait for `billing`, then live ones follow.
        async with stored_node(nats_server, path) as b2, AsyncClient(b2.url) as sub2:
            back = Inbox()
            await sub2.subscribe("orders.>", durable="billing", callback=back)
            await back.until(3)
            await b2.link.flush()
            await pub.publish("orders.4", 4, qos=1)
            await back.until(4)
            assert back.values == [2, 3, 4]
