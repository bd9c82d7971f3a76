"""Review findings on the JetStream link (issue 16): each test fails on the code as merged."""

from __future__ import annotations

import asyncio

import pytest

from sockstack import AsyncClient
from tests.conftest import timeout
from tests.pubsub.test_cluster_jetstream import JsServer, js, node  # noqa: F401

pytestmark = pytest.mark.timeout(60)


async def test_clearing_a_retained_topic_is_answered_with_jetstream(js: JsServer) -> None:  # noqa: F811
    """clear_retained() is QoS 1 by default: through a JetStream link its answer must come
    (as it does without JetStream), not wait for a confirm the link is never asked for."""
    async with node(js) as a, AsyncClient(a.url, timeout=timeout(5)) as c:
        await c.publish("cfg.x", {"v": 1}, qos=1, retain=True)
        assert "cfg.x" in a.broker.retained
        await asyncio.wait_for(c.clear_retained("cfg.x"), timeout(5))
        assert "cfg.x" not in a.broker.retained
