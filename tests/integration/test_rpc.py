"""Calls over real loopback sockets, TCP and UDP, async and blocking clients."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sockstack import (
    AsyncClient,
    CallTimeout,
    ConnectError,
    ErrorCode,
    LocalProtocolError,
    RemoteError,
    Server,
    connect,
)
from sockstack.protocol.datagram import RetryPolicy
from tests.conftest import Probe, timeout, url

SCHEMES = ["tcp", "udp"]


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_call_and_errors(server: Server, scheme: str) -> None:
    async with AsyncClient(url(server, scheme), timeout=timeout(5)) as c:
        assert await c.call("add", 2, 3) == 5
        assert await c.call("threaded_add", 2, 3) == 5
        assert await c.call("kw", 4, scale=3) == 12
        assert await c.call("echo", {"nested": [1, b"\x00", None, 2.5]}) == {
            "nested": [1, b"\x00", None, 2.5]
        }
        with pytest.raises(RemoteError) as info:
            await c.call("nope")
        assert info.value.code == ErrorCode.UNKNOWN_METHOD
        with pytest.raises(RemoteError) as info:
            await c.call("add", 1)
        assert info.value.code == ErrorCode.BAD_ARGUMENTS and "'b'" in info.value.message
        with pytest.raises(RemoteError) as info:
            await c.call("fail", "boom")
        assert (info.value.type, info.value.message) == ("ValueError", "boom")
        assert "Traceback" not in str(info.value)
        with pytest.raises(RemoteError) as info:
            await c.call("unencodable")
        assert info.value.code == ErrorCode.RESULT_NOT_ENCODABLE
        assert await c.call("add", 1, 1) == 2  # still serving on the same client


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_json_codec(server: Server, scheme: str) -> None:
    async with AsyncClient(url(server, scheme), codec="json", timeout=timeout(5)) as c:
        assert await c.call("echo", {"a": [1, "x"]}) == {"a": [1, "x"]}


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_thousand_pipelined_calls_on_one_client(server: Server, scheme: str) -> None:
    async with AsyncClient(url(server, scheme), timeout=timeout(20)) as c:
        results = await asyncio.gather(*(c.call("add", i, i) for i in range(1000)))
        assert results == [2 * i for i in range(1000)]
        results = await asyncio.gather(*(c.call("threaded_add", i, 1) for i in range(1000)))
        assert results == [i + 1 for i in range(1000)]


async def test_tcp_pipelining_matches_out_of_order_answers(server: Server, probe: Probe) -> None:
    probe.gate = asyncio.Event()
    probe.entered = asyncio.Event()
    async with AsyncClient(url(server, "tcp"), timeout=timeout(5)) as c:
        slow = asyncio.ensure_future(c.call("wait", "k"))
        await asyncio.wait_for(probe.entered.wait(), timeout(5))
        assert await c.call("add", 1, 2) == 3  # answered while the slow one is still running
        probe.gate.set()
        assert await slow == 1


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_call_timeout(server: Server, probe: Probe, scheme: str) -> None:
    probe.gate = asyncio.Event()
    async with AsyncClient(url(server, scheme)) as c:
        with pytest.raises(CallTimeout) as info:
            await c.call("wait", "t", timeout=0.2)
        assert info.value.method == "wait" and info.value.timeout == 0.2
        probe.gate.set()
        assert await c.call("add", 1, 1, timeout=timeout(5)) == 2  # a late answer is ignored


async def test_udp_refused_when_nobody_listens() -> None:
    # The host answers ICMP port unreachable: ConnectError at once, not CallTimeout (issue 11).
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with AsyncClient(f"udp://127.0.0.1:{port}") as c:
        with pytest.raises(ConnectError, match="connection refused"):
            await c.call("add", 1, 2, timeout=timeout(30))


async def test_connect_refused_is_connect_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(ConnectError, match="refused"):
        async with AsyncClient(f"tcp://127.0.0.1:{port}", connect_timeout=timeout(2)):
            pass
    with pytest.raises(ConnectError, match="refused"):
        connect(f"tcp://127.0.0.1:{port}", connect_timeout=timeout(2))


async def test_udp_oversized_request_refused_locally(server: Server) -> None:
    async with AsyncClient(url(server, "udp"), max_datagram=1200) as c:
        with pytest.raises(LocalProtocolError) as info:
            await c.call("echo", b"x" * 5000)
        assert info.value.code == ErrorCode.DATAGRAM_TOO_LARGE
        assert await c.call("echo", b"x" * 1000, timeout=timeout(5)) == b"x" * 1000


async def test_udp_retried_call_runs_once(server: Server, probe: Probe) -> None:
    """The answer takes longer than several retransmission intervals: the server sees the
    retransmissions, runs the method once and answers from its reply cache."""
    fast_retry = RetryPolicy(initial=0.02, factor=1.0, max_interval=0.02, jitter=0.0)
    async with AsyncClient(url(server, "udp"), retry=fast_retry, timeout=timeout(5)) as c:
        assert await c.call("count", "once", 0.3) == 1
        results = await asyncio.gather(*(c.call("count", f"k{i}", 0.1) for i in range(50)))
    assert results == [1] * 50
    assert probe.runs["once"] == 1
    assert all(probe.runs[f"k{i}"] == 1 for i in range(50))
    udp = server._datagrams[0].core
    assert udp.duplicates >= 5  # retransmissions really arrived and were absorbed


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_blocking_client_against_live_server(server: Server, scheme: str) -> None:
    def work() -> list[object]:
        out: list[object] = []
        with connect(url(server, scheme), timeout=timeout(5)) as c:
            out.append(c.call("add", 2, 3))
            out.append(c.call("kw", 2, scale=5))
            try:
                c.call("fail", "x")
            except RemoteError as exc:
                out.append(exc.type)
            out.append(c.call("threaded_add", 1, 1))
            out.append(c.ping() > 0)
        return out

    assert await asyncio.to_thread(work) == [5, 10, "ValueError", 2, True]


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_ping(server: Server, scheme: str) -> None:
    async with AsyncClient(url(server, scheme), timeout=timeout(5)) as c:
        rtts = [await c.ping() for _ in range(5)]
    assert all(0 < r < timeout(5) for r in rtts)


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_ipv6(probe: Probe, scheme: str) -> None:
    async with Server(probe, tcp=["[::1]:0"], udp=["[::1]:0"]) as srv:
        target = str(srv.endpoint(scheme))
        assert target.startswith(f"{scheme}://[::1]:")
        async with AsyncClient(target, timeout=timeout(5)) as c:
            assert await c.call("add", 20, 22) == 42

        def blocking_call() -> int:
            with connect(target, timeout=timeout(5)) as c:
                return c.call("add", 1, 2)  # type: ignore[no-any-return]

        assert await asyncio.to_thread(blocking_call) == 3


async def test_large_bytes_go_out_by_reference_and_arrive_whole(server: Server) -> None:
    """Bytes above 64 KiB are written from the caller's buffer (gathering writes) both ways;
    mixed with small calls in flight on one connection, every answer is intact and in place."""
    a, b = bytes(range(256)) * 400, b"\xff" * 200_000  # 102,400 and 200,000 bytes
    async with AsyncClient(url(server, "tcp"), timeout=timeout(10)) as c:
        results = await asyncio.gather(
            c.call("add", a, b), c.call("add", 1, 2), c.call("echo", b), c.call("add", [a], [1])
        )
    assert results == [a + b, 3, b, [a, 1]]

    def blocking() -> list[object]:  # in a thread: the server runs on this test's loop
        with connect(url(server, "tcp"), timeout=timeout(10)) as bc:
            return [bc.call("add", a, b), bc.call("echo", a), bc.call("add", 2, 2)]

    assert await asyncio.to_thread(blocking) == [a + b, a, 4]
