"""Issue 11 item 14: rate-limited logging is a logging.Filter (RateLimitFilter) on the
"sockstack.transport" logger, configurable through logging.config, one window per server and
per UDP endpoint, with a summary of what it left out, bounded in keys and message length."""

from __future__ import annotations

import asyncio
import logging
import logging.config
from collections.abc import Iterator

import pytest

from sockstack import AsyncClient, Server
from sockstack.transport.ratelog import RATE_KEY, RateLimitedLog, RateLimitFilter
from tests.conftest import Probe, timeout

LOGGER = logging.getLogger("sockstack.transport")


@pytest.fixture(autouse=True)
def restore_filters() -> Iterator[None]:
    saved = list(LOGGER.filters)
    yield
    LOGGER.filters[:] = saved


class _Sink(asyncio.DatagramProtocol):
    pass


def record(msg: str, key: object = None) -> logging.LogRecord:
    r = logging.LogRecord("sockstack.transport", logging.WARNING, __file__, 1, msg, None, None)
    if key is not None:
        setattr(r, RATE_KEY, key)
    return r


def test_burst_then_summary_per_window() -> None:
    now = [0.0]
    f = RateLimitFilter(burst=2, interval=10, clock=lambda: now[0])
    written = [f.filter(record(f"a{i}", key="a")) for i in range(5)]
    assert written == [True, True, False, False, False]
    assert f.suppressed("a") == 3
    assert f.filter(record("b0", key="b"))  # another window is not affected
    now[0] = 10.0  # the window reopens: the next record carries the summary
    r = record("a5", key="a")
    assert f.filter(r)
    assert r.getMessage() == "a5 (and 3 similar messages suppressed)"
    assert f.suppressed("a") == 0


def test_bounds_keys_and_message_length() -> None:
    f = RateLimitFilter(burst=1, interval=3600, max_keys=4, max_length=10)
    for key in range(100):
        assert f.filter(record("x", key=key))
    assert len(f._windows) == 4  # the least recently used windows were forgotten
    r = record("y" * 50, key="long")
    assert f.filter(r)
    assert r.getMessage() == "y" * 10 + "... (40 characters cut)"
    with pytest.raises(ValueError):
        RateLimitFilter(burst=0)


async def test_configured_through_logging_config_for_a_live_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "floods": {
                    "()": "sockstack.transport.ratelog.RateLimitFilter",
                    "burst": 3,
                    "interval": 3600,
                }
            },
            "loggers": {"sockstack.transport": {"filters": ["floods"]}},
        }
    )
    async with Server(Probe(), udp=["127.0.0.1:0"], tcp=["127.0.0.1:0"]) as srv:
        (endpoint,) = srv._datagrams
        assert isinstance(endpoint.bad_log, RateLimitedLog)
        assert endpoint.bad_log.burst == 3  # the configured filter, not the default
        filters = [f for f in LOGGER.filters if isinstance(f, RateLimitFilter)]
        assert len(filters) == 1 and filters[0].burst == 3
        ep = srv.endpoint("udp")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(_Sink, remote_addr=(ep.host, ep.port))
        try:
            for _ in range(10):  # bounded: not our magic, so never answered, only logged
                transport.sendto(b"\x00garbage")
        finally:
            transport.close()
        # Handled in order: once this call is answered, the garbage has been read.
        async with AsyncClient(str(ep), timeout=timeout(5)) as c:
            assert await c.call("add", 1, 2) == 3
        lines = [
            r for r in caplog.records if r.name == "sockstack.transport" and "udp" in r.message
        ]
        assert len(lines) == 3
        assert all(getattr(r, RATE_KEY) == endpoint.bad_log.key for r in lines)
        assert endpoint.bad_log.suppressed == 7
        assert srv.bad_log.suppressed == 0  # the server's own window (TCP) is another


def test_default_filter_is_installed_once() -> None:
    other = logging.getLogger("tests.ratelog.installed_once")
    a, b = RateLimitedLog(other), RateLimitedLog(other)
    filters = [f for f in other.filters if isinstance(f, RateLimitFilter)]
    assert len(filters) == 1 and filters[0].burst == 20 and filters[0].interval == 10.0
    assert a.key != b.key and a.rate_filter is b.rate_filter
    # On sockstack.transport it is there from the import on, before any server.
    assert any(getattr(f, "_sockstack_default", False) for f in LOGGER.filters)


def test_a_removed_filter_stays_removed(caplog: pytest.LogCaptureFixture) -> None:
    # The documented way to turn rate limiting off: remove the filter; nothing puts it back,
    # neither a log in use nor a new one (a new server).
    other = logging.getLogger("tests.ratelog.removed")
    log = RateLimitedLog(other)
    for f in [f for f in other.filters if isinstance(f, RateLimitFilter)]:
        other.removeFilter(f)
    caplog.set_level(logging.WARNING, logger=other.name)
    for i in range(30):  # more than the default's burst of 20
        log.warning("bad input %d", i)
    RateLimitedLog(other).warning("from a new log")
    assert [r.getMessage() for r in caplog.records if r.name == other.name][-2:] == [
        "bad input 29",
        "from a new log",
    ]
    assert len([r for r in caplog.records if r.name == other.name]) == 31
    assert not [f for f in other.filters if isinstance(f, RateLimitFilter)]
    assert log.rate_filter is None and log.burst is None and log.suppressed == 0


async def test_turned_off_for_a_live_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sockstack.transport")
    for f in [f for f in LOGGER.filters if isinstance(f, RateLimitFilter)]:
        LOGGER.removeFilter(f)
    async with Server(Probe(), udp=["127.0.0.1:0"]) as srv:
        ep = srv.endpoint("udp")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(_Sink, remote_addr=(ep.host, ep.port))
        try:
            for _ in range(30):  # bounded; more than the default's burst
                transport.sendto(b"\x00garbage")
        finally:
            transport.close()
        async with AsyncClient(str(ep), timeout=timeout(5)) as c:  # answered: all read
            assert await c.call("add", 1, 2) == 3
    lines = [r for r in caplog.records if r.name == "sockstack.transport" and "udp" in r.message]
    assert len(lines) == 30
    assert not [f for f in LOGGER.filters if isinstance(f, RateLimitFilter)]


def test_the_rewritten_message_is_what_every_handler_sees() -> None:
    # As documented: a summary (or a cut) rewrites record.msg/args in place, once, on a
    # logger's filter; all of its handlers get the same final text.
    now = [0.0]
    other = logging.getLogger("tests.ratelog.rewrite")
    other.propagate = False
    other.addFilter(RateLimitFilter(burst=1, interval=10, clock=lambda: now[0]))
    seen: list[list[tuple[object, object, str]]] = [[], []]

    class Keep(logging.Handler):
        def __init__(self, into: list[tuple[object, object, str]]) -> None:
            super().__init__()
            self.into = into

        def emit(self, r: logging.LogRecord) -> None:
            self.into.append((r.msg, r.args, r.getMessage()))

    handlers = [Keep(seen[0]), Keep(seen[1])]
    for h in handlers:
        other.addHandler(h)
    try:
        log = RateLimitedLog(other)
        for i in range(3):
            log.warning("bad %d", i)
        now[0] = 10.0
        log.warning("bad %d", 3)
    finally:
        for h in handlers:
            other.removeHandler(h)
    summary = "bad 3 (and 2 similar messages suppressed)"
    for kept in seen:
        assert kept == [("bad %d", (0,), "bad 0"), (summary, None, summary)]
