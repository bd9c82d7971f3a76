"""Faults injected by a user-space proxy (tests/helpers/faultproxy.py): lossy, duplicating,
reordering UDP; TCP connections reset or stalled mid-call."""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import AsyncIterator

import pytest

from sockstack import (
    AsyncClient,
    Backoff,
    CallTimeout,
    ConnectionLost,
    Server,
    connect,
)
from sockstack.protocol.datagram import RetryPolicy
from tests.conftest import Probe, timeout
from tests.helpers.faultproxy import Faults, TCPFaultProxy, UDPFaultProxy

FAST = Backoff(initial=0.01, max_delay=0.05)


@pytest.fixture
async def server(probe: Probe) -> AsyncIterator[Server]:
    async with Server(probe, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"]) as srv:
        yield srv


async def test_udp_calls_under_20_percent_loss_run_once(server: Server, probe: Probe) -> None:
    """20 % loss each way, plus duplicates, reordering and jitter: every call completes within
    its retry budget or fails with a clear timeout, and no call runs twice on the server."""
    ep = server.endpoint("udp")
    faults = Faults(drop=0.2, duplicate=0.1, reorder=0.1, delay=(0.0, 0.005))
    proxy = await UDPFaultProxy((ep.host, ep.port), faults, seed=20).start()
    try:
        async with AsyncClient(
            f"udp://127.0.0.1:{proxy.port}",
            timeout=timeout(5),
            retry=RetryPolicy(initial=0.02, factor=2.0, max_interval=0.2),
        ) as c:
            outcomes = await asyncio.gather(
                *(c.call("count", f"call-{i}") for i in range(200)), return_exceptions=True
            )
    finally:
        await proxy.close()
    done = [o for o in outcomes if o == 1]
    failed = [o for o in outcomes if o != 1]
    assert all(isinstance(o, CallTimeout) and "datagrams sent" in str(o) for o in failed), failed
    assert len(done) >= 190, f"{len(failed)} of 200 calls timed out"
    # The server ran each call at most once, although retransmissions and duplicates reached it.
    assert set(probe.runs.values()) == {1}
    assert len(probe.runs) >= len(done)
    c = proxy.counts
    assert c.dropped > 40 and c.duplicated > 10 and c.reordered > 10, c


async def test_blocking_udp_client_under_loss(server: Server, probe: Probe) -> None:
    ep = server.endpoint("udp")
    proxy = await UDPFaultProxy((ep.host, ep.port), Faults(drop=0.2, duplicate=0.1), 7).start()
    try:

        def calls() -> list[object]:
            with connect(
                f"udp://127.0.0.1:{proxy.port}",
                timeout=timeout(5),
                retry=RetryPolicy(initial=0.02, factor=2.0, max_interval=0.2),
            ) as bc:
                out: list[object] = []
                for i in range(50):
                    try:
                        out.append(bc.call("count", f"b-{i}"))
                    except CallTimeout as exc:
                        out.append(exc)
                return out

        outcomes = await asyncio.to_thread(calls)
    finally:
        await proxy.close()
    assert sum(1 for o in outcomes if o == 1) >= 48
    assert set(probe.runs.values()) == {1}
    assert proxy.counts.dropped > 5


async def test_tcp_reset_fails_calls_in_flight_then_the_client_reconnects(
    server: Server, probe: Probe
) -> None:
    ep = server.endpoint("tcp")
    proxy = await TCPFaultProxy((ep.host, ep.port)).start()
    probe.gate = asyncio.Event()
    probe.entered = asyncio.Event()
    try:
        async with AsyncClient(
            f"tcp://127.0.0.1:{proxy.port}", timeout=timeout(5), backoff=FAST
        ) as c:
            assert await c.call("add", 1, 1) == 2
            in_flight = asyncio.ensure_future(c.call("wait", "reset"))
            await asyncio.wait_for(probe.entered.wait(), timeout(5))
            proxy.reset()
            with pytest.raises(ConnectionLost, match="may or may not have run"):
                await asyncio.wait_for(in_flight, timeout(5))  # at once, not at its timeout
            assert await c.call("add", 2, 3) == 5  # after a transparent reconnect
            assert proxy.connections == 2 and proxy.resets == 1
    finally:
        probe.gate.set()
        await proxy.close()


async def test_tcp_stall_times_out_then_recovers(server: Server) -> None:
    ep = server.endpoint("tcp")
    proxy = await TCPFaultProxy((ep.host, ep.port)).start()
    try:
        async with AsyncClient(f"tcp://127.0.0.1:{proxy.port}", timeout=timeout(5)) as c:
            assert await c.call("add", 1, 1) == 2
            proxy.stall()
            with pytest.raises(CallTimeout):
                await c.call("add", 1, 2, timeout=0.3)
            proxy.stall(False)
            # The stalled request and its answer now flow; the stale answer is ignored.
            assert await c.call("add", 3, 4) == 7
    finally:
        await proxy.close()


def _readable(sock: socket.socket | None) -> bool:
    """The socket has something to report (data, end of stream, or a reset)."""
    return sock is None or bool(select.select([sock], [], [], 0)[0])


async def test_blocking_client_survives_a_reset_between_calls(server: Server) -> None:
    """A reset that arrives while the client is idle is seen before the next request goes out:
    the client reconnects and that call is served, transparently."""
    ep = server.endpoint("tcp")
    proxy = await TCPFaultProxy((ep.host, ep.port)).start()
    try:
        bc = await asyncio.to_thread(
            connect, f"tcp://127.0.0.1:{proxy.port}", timeout=timeout(5), backoff=FAST
        )
        try:
            assert await asyncio.to_thread(bc.call, "add", 1, 1) == 2
            await asyncio.wait_for(proxy.reset_and_wait(), timeout(5))
            sock = bc.connection.sock  # the client's connection: the reset has reached it
            async with asyncio.timeout(timeout(5)):
                while not _readable(sock):
                    await asyncio.sleep(0.001)
            assert await asyncio.to_thread(bc.call, "add", 2, 2) == 4
            assert await asyncio.to_thread(bc.call, "add", 3, 3) == 6
            assert proxy.connections == 2 and proxy.resets == 1
        finally:
            bc.close()
    finally:
        await proxy.close()


async def test_blocking_client_call_in_flight_fails_on_a_reset(
    server: Server, probe: Probe
) -> None:
    """A reset during a call fails that call at once (it may or may not have run); the next
    call reconnects and is served."""
    probe.gate = asyncio.Event()
    probe.entered = asyncio.Event()
    ep = server.endpoint("tcp")
    proxy = await TCPFaultProxy((ep.host, ep.port)).start()
    try:
        bc = await asyncio.to_thread(
            connect, f"tcp://127.0.0.1:{proxy.port}", timeout=timeout(30), backoff=FAST
        )
        try:
            in_flight = asyncio.ensure_future(asyncio.to_thread(bc.call, "wait", "reset"))
            await asyncio.wait_for(probe.entered.wait(), timeout(5))  # it runs on the server
            await asyncio.wait_for(proxy.reset_and_wait(), timeout(5))
            with pytest.raises(ConnectionLost, match="may or may not have run"):
                await asyncio.wait_for(in_flight, timeout(5))  # at once, not at its timeout
            assert await asyncio.to_thread(bc.call, "add", 2, 2) == 4
            assert proxy.connections == 2 and proxy.resets == 1
        finally:
            probe.gate.set()
            bc.close()
    finally:
        await proxy.close()
