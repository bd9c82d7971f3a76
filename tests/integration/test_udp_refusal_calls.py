"""UDP calls and ICMP port unreachable (review of issue 11 item 10): a refusal is charged to the
call whose datagram the kernel names (transport/udperr.py); a call fails as "did not run" only
when every datagram of it that left was refused, after its retransmission schedule sent a
second one (a server still starting gets that one); a call whose server went away after an
earlier datagram reached it fails as "may or may not have run"."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable

import pytest

from sockstack import AsyncClient, ConnectError, ConnectionLost, Server, ServerLimits
from sockstack.protocol.datagram import RetryPolicy
from tests.conftest import Probe, timeout

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the kernel names refused datagrams on Linux"
)


def _on_drain(client: AsyncClient, seen: Callable[[], bool]) -> asyncio.Event:
    """An event set once the client's channel has charged refusals and ``seen()`` holds."""
    channel = client.channel
    assert channel is not None
    event = asyncio.Event()
    drain = channel._drain_refusals  # type: ignore[union-attr]

    def wrapped() -> None:
        drain()
        if seen():
            event.set()

    channel._drain_refusals = wrapped  # type: ignore[union-attr]
    return event


async def test_a_server_that_starts_after_the_first_refusal_answers_the_call() -> None:
    guard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # keeps the port ours, closed
    guard.bind(("127.0.0.1", 0))
    guard.connect(guard.getsockname())
    port = guard.getsockname()[1]
    srv: Server | None = None
    # A retransmission 2 s after the first datagram: room to start the server in between.
    retry = RetryPolicy(initial=timeout(2), jitter=0.0)
    async with AsyncClient(f"udp://127.0.0.1:{port}", timeout=timeout(30), retry=retry) as c:
        channel = c.channel
        refused = _on_drain(c, lambda: bool(channel._refused))  # type: ignore[union-attr]
        call = asyncio.ensure_future(c.call("add", 2, 3))
        try:
            await asyncio.wait_for(refused.wait(), timeout(10))
            assert not call.done()  # one refused datagram fails nothing: it may be starting
            guard.close()
            srv = Server(Probe(), udp=[f"127.0.0.1:{port}"])
            await srv.start()
            assert await asyncio.wait_for(call, timeout(20)) == 5
        finally:
            guard.close()
            if srv is not None:
                await srv.shutdown()


async def test_a_call_whose_server_went_away_may_or_may_not_have_run() -> None:
    probe = Probe()
    probe.gate = asyncio.Event()  # never opened: the method runs until the server stops
    probe.entered = asyncio.Event()
    srv = Server(probe, udp=["127.0.0.1:0"], limits=ServerLimits(drain_timeout=0.05))
    await srv.start()
    retry = RetryPolicy(initial=0.05, max_interval=0.2)
    async with AsyncClient(str(srv.endpoint("udp")), timeout=timeout(60), retry=retry) as c:
        call = asyncio.ensure_future(c.call("wait", "k"))
        await asyncio.wait_for(probe.entered.wait(), timeout(10))  # it reached the server
        await srv.shutdown()  # the port closes: the call's next datagrams are refused
        with pytest.raises(ConnectionLost, match="may or may not have run"):
            await asyncio.wait_for(call, timeout(30))


async def test_refusals_fail_each_call_on_its_own_evidence() -> None:
    """Many calls to a closed port at once: every one fails as "did not run" (each was refused
    for every datagram of it that left), none at its timeout."""
    guard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    guard.bind(("127.0.0.1", 0))
    guard.connect(guard.getsockname())
    try:
        url = f"udp://127.0.0.1:{guard.getsockname()[1]}"
        async with AsyncClient(url, timeout=timeout(60)) as c:
            results = await asyncio.gather(
                *(c.call("add", i, i) for i in range(20)), c.ping(), return_exceptions=True
            )
    finally:
        guard.close()
    assert all(isinstance(r, ConnectError) and "did not run" in str(r) for r in results), results
