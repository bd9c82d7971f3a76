"""The caches issue 17 added to the pub/sub path, measured: a publisher (or a broker's peer)
that sends ever new topics must not grow them past their bounds. Memory is read with
tracemalloc after 30,000 distinct topics of ~200 bytes each, three times a cache's count
bound."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest

import sockstack.pubsub.broker as broker_module
from sockstack.pubsub import Broker
from sockstack.pubsub.messages import _MSG_METAS, _PUB_TOPICS, _fast_msg, encode_msg, encode_pub
from tests.pubsub.test_speed_paths import RawPeer

TOPICS = [f"dev.{i:06d}." + "x" * 190 for i in range(30_000)]


def _growth(run: Callable[[], None]) -> int:
    """Bytes still allocated after ``run`` (what it keeps), by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _publish_all(broker: Broker) -> None:
    for topic in TOPICS:
        broker.publish(topic, b"p")


def test_the_route_cache_stays_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same publishes to two brokers, one whose route cache is off: the difference is the
    # cache's (the broker's older per-topic caches are in both).
    def broker() -> Broker:
        b = Broker()
        b.subscribe(RawPeer(), 1, "dev.>", {})
        return b

    bound = broker_module._ROUTES_MAX
    with_cache = broker()
    cached = _growth(lambda: _publish_all(with_cache))
    monkeypatch.setattr(broker_module, "_ROUTES_MAX", 0)
    without = broker()
    plain = _growth(lambda: _publish_all(without))
    assert len(with_cache._routes) <= bound
    assert cached - plain < 6 * 2**20, f"route cache: {(cached - plain) >> 10} KiB"


def test_the_pub_and_msg_encoding_caches_stay_within_their_bounds() -> None:
    _PUB_TOPICS.clear()
    _MSG_METAS.clear()

    def encode_all() -> None:
        for topic in TOPICS:
            encode_pub(topic, b"p")

    def parse_all() -> None:
        for topic in TOPICS:
            frame = encode_msg(7, 1, topic.encode(), b"p")
            meta_len = int.from_bytes(frame[6:8], "big")
            assert _fast_msg(frame, 16, 16 + meta_len, len(frame), 0, 1, 7) is not None

    assert _growth(encode_all) < 3 * 2**20
    assert len(_PUB_TOPICS) <= 4096
    assert _growth(parse_all) < 3 * 2**20
    assert len(_MSG_METAS) <= 4096
