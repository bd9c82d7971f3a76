"""Issue 11 item 13: the server and the asyncio client keep every task they start, and a closed
server or client leaves no pending task of theirs behind (nor a "Task was destroyed but it is
pending" message when the garbage collector runs)."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket

import pytest

from sockstack import AsyncClient, ConnectionLost, Server, ServerLimits
from tests.conftest import Probe, timeout


def pending_tasks() -> list[asyncio.Task[object]]:
    me = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not me and not t.done()]


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_shutdown_cancels_methods_the_drain_left_running(
    scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    probe = Probe()
    probe.gate = asyncio.Event()  # never opened: the method runs until cancelled
    probe.entered = asyncio.Event()
    srv = Server(
        probe,
        tcp=["127.0.0.1:0"],
        udp=["127.0.0.1:0"],
        limits=ServerLimits(drain_timeout=0.05, close_timeout=timeout(2)),
    )
    await srv.start()
    client = AsyncClient(str(srv.endpoint(scheme)), timeout=timeout(30), reconnect=False)
    await client.connect()
    call = asyncio.ensure_future(client.call("wait", "k"))
    await asyncio.wait_for(probe.entered.wait(), timeout(10))
    assert len(srv._work) == 1  # kept by the server while it runs
    await srv.shutdown()
    assert not srv._work
    if scheme == "tcp":  # the connection was closed with GOING_AWAY
        with pytest.raises(ConnectionLost):
            await call
    else:  # UDP has no connection to close: the call is abandoned by its caller
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await client.close()
    assert pending_tasks() == []
    gc.collect()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


async def test_a_closed_client_leaves_no_task_reconnecting() -> None:
    probe = Probe()
    srv = Server(probe, tcp=["127.0.0.1:0"], limits=ServerLimits(close_timeout=timeout(2)))
    await srv.start()
    client = AsyncClient(str(srv.endpoint("tcp")), timeout=timeout(5))
    await client.connect()
    assert await client.call("add", 1, 2) == 3
    channel = client.channel
    assert channel is not None
    stream = channel.stream  # type: ignore[union-attr]
    await srv.shutdown()  # the client starts reconnecting in the background
    await asyncio.wait_for(asyncio.shield(stream.closed), timeout(5))  # on_lost has run
    assert channel._reconnect_task in pending_tasks()  # type: ignore[union-attr]
    await client.close()
    assert pending_tasks() == []


async def test_a_closed_udp_client_leaves_no_task_learning_the_epoch() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:  # a server that never answers
        mute.bind(("127.0.0.1", 0))
        client = AsyncClient(
            f"udp://127.0.0.1:{mute.getsockname()[1]}", timeout=timeout(30), secret="s"
        )
        await client.connect()
        client.channel.send_datagram(b"held until the epoch is known")  # type: ignore[union-attr]
        assert pending_tasks()  # the PING probe
        await client.close()
        assert pending_tasks() == []


async def test_async_subscription_callbacks_are_kept_bounded_and_cancelled_on_close() -> None:
    """An async callback per message is a task the client keeps (never more at once than the
    subscription's ``max_pending``: beyond, messages are dropped and counted), and closing the
    client cancels and awaits those still running."""
    srv = Server(
        None, tcp=["127.0.0.1:0"], broker=True, limits=ServerLimits(close_timeout=timeout(2))
    )
    await srv.start()
    client = AsyncClient(str(srv.endpoint("tcp")), timeout=timeout(10))
    gate = asyncio.Event()  # never opened: every callback waits until cancelled
    started: list[object] = []
    cancelled: list[object] = []

    async def slow(msg: object) -> None:
        started.append(msg)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            cancelled.append(msg)
            raise

    try:
        await client.connect()
        sub = await client.subscribe("t.>", callback=slow, max_pending=4)
        for i in range(10):
            await client.publish(f"t.{i}", i, qos=1)
        # The broker queued every MSG on this connection before it answers this call.
        await client.call("broker.stats")
        assert sub.received == 10
        assert len(started) == 4 and sub.dropped == 6
        assert len(sub._tasks) == 4
    finally:
        await client.close()
        await srv.shutdown()
    assert len(cancelled) == 4
    assert not sub._tasks
    assert pending_tasks() == []


@pytest.mark.parametrize("how", ["unsubscribe", "close"])
async def test_a_callback_may_unsubscribe_or_close_the_client(how: str) -> None:
    """The callback running is never cancelled by what it calls itself, and a client closed
    from inside one still ends its connection."""
    srv = Server(
        None, tcp=["127.0.0.1:0"], broker=True, limits=ServerLimits(close_timeout=timeout(2))
    )
    await srv.start()
    client = AsyncClient(str(srv.endpoint("tcp")), timeout=timeout(10))
    finished = asyncio.Event()

    async def callback(msg: object) -> None:
        if how == "unsubscribe":
            await sub.unsubscribe()
        else:
            await client.close()
        finished.set()  # reached: the call above did not cancel this task

    try:
        await client.connect()
        sub = await client.subscribe("t.>", callback=callback)
        await client.publish("t.1", 1, qos=1)
        stream = client.channel.stream  # type: ignore[union-attr]
        await asyncio.wait_for(finished.wait(), timeout(10))
        if how == "close":  # the CLOSE exchange ran: the connection ended, nothing leaked
            assert stream is not None and stream.closed.done()
    finally:
        await client.close()
        await srv.shutdown()
    assert pending_tasks() == []
