"""Connection loss, reconnect after a server restart, graceful shutdown with calls in flight."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from sockstack import (
    AsyncClient,
    Backoff,
    CallTimeout,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
    RemoteError,
    Server,
    ServerLimits,
    connect,
)
from sockstack.transport.urls import Endpoint
from tests.conftest import Probe, timeout, url

FAST = Backoff(initial=0.01, factor=2.0, max_delay=0.2)
QUICK_CLOSE = ServerLimits(close_timeout=0.2)  # idle blocking clients never answer CLOSE
T = TypeVar("T")


async def test_drop_fails_every_call_in_flight_at_once(server: Server, probe: Probe) -> None:
    probe.gate = asyncio.Event()
    probe.entered = asyncio.Event()
    async with AsyncClient(url(server, "tcp"), timeout=600, backoff=FAST) as c:
        calls = [asyncio.ensure_future(c.call("wait", f"k{i}")) for i in range(10)]
        await asyncio.wait_for(probe.entered.wait(), timeout(5))
        for stream in list(server._streams):
            stream.abort()  # the connection drops under the calls (a 600 s call timeout)
        # They fail now, not at their timeout: wait_for bounds the test if they would hang.
        done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout(5))
        assert all(isinstance(e, ConnectionLost) for e in done), done
        assert "may or may not have run" in str(done[0])
        # The client reconnects by itself; the next call goes through.
        probe.gate.set()
        assert await c.call("add", 1, 2, timeout=timeout(5)) == 3


def started_call(coro: Coroutine[Any, Any, T]) -> tuple[asyncio.Future[T], asyncio.Event]:
    """Run ``coro`` in a task, and an event set once it has run up to its first wait.

    The event is set just before the coroutine starts, in the task's first step, which goes on
    until the coroutine waits: so once the event's waiter resumes, the coroutine has started
    and either finished or is waiting (instead of hoping one ``sleep(0)`` was enough)."""
    started = asyncio.Event()

    async def run() -> T:
        started.set()
        return await coro

    return asyncio.ensure_future(run()), started


async def restart_on(ep: Endpoint, probe: Probe) -> Server:
    srv = Server(probe, tcp=[Endpoint("tcp", ep.host, ep.port)], limits=QUICK_CLOSE)
    await srv.start()
    return srv


async def test_reconnect_after_server_restart(probe: Probe) -> None:
    first = Server(probe, tcp=["127.0.0.1:0"], limits=QUICK_CLOSE)
    await first.start()
    ep = first.endpoint("tcp")
    async with AsyncClient(str(ep), timeout=timeout(10), backoff=FAST) as c:
        assert await c.call("add", 1, 1) == 2
        await first.shutdown()  # clients get CLOSE GOING_AWAY
        # A call made while the server is down waits for the reconnect within its timeout.
        pending, started = started_call(c.call("add", 2, 2))
        await asyncio.wait_for(started.wait(), timeout(5))  # it is waiting, the server is down
        assert not pending.done()
        second = await restart_on(ep, probe)
        try:
            assert await asyncio.wait_for(pending, timeout(10)) == 4
            assert await c.call("add", 3, 3) == 6
        finally:
            await second.shutdown()
        # And when the server stays down, a call times out with the reason.
        with pytest.raises(CallTimeout, match="not connected"):
            await c.call("add", 1, 1, timeout=0.3)


async def test_blocking_client_reconnects(probe: Probe) -> None:
    first = Server(probe, tcp=["127.0.0.1:0"], limits=QUICK_CLOSE)
    await first.start()
    ep = first.endpoint("tcp")
    client = await asyncio.to_thread(connect, str(ep), timeout=timeout(10), backoff=FAST)
    try:
        assert await asyncio.to_thread(client.call, "add", 1, 1) == 2
        await first.shutdown()
        second = await restart_on(ep, probe)
        try:
            assert await asyncio.to_thread(client.call, "add", 2, 3) == 5
        finally:
            await second.shutdown()
    finally:
        client.close()


async def test_blocking_client_call_in_flight_fails_on_close(probe: Probe) -> None:
    probe.gate = asyncio.Event()
    probe.entered = asyncio.Event()
    srv = Server(probe, tcp=["127.0.0.1:0"], limits=ServerLimits(drain_timeout=0.1))
    await srv.start()
    client = await asyncio.to_thread(connect, str(srv.endpoint("tcp")), timeout=600)
    try:
        call = asyncio.ensure_future(asyncio.to_thread(client.call, "wait", "x"))
        await asyncio.wait_for(probe.entered.wait(), timeout(5))
        await srv.shutdown()  # drain times out (the gate stays shut), then GOING_AWAY
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(call, timeout(5))
        assert info.value.code == ErrorCode.GOING_AWAY
    finally:
        probe.gate.set()
        client.close()


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_shutdown_answers_in_flight_then_refuses(probe: Probe, scheme: str) -> None:
    probe.gate = asyncio.Event()
    probe.entered = asyncio.Event()
    srv = Server(
        probe,
        tcp=["127.0.0.1:0"],
        udp=["127.0.0.1:0"],
        limits=ServerLimits(drain_timeout=timeout(10)),
    )
    await srv.start()
    async with AsyncClient(url(srv, scheme), timeout=timeout(10), reconnect=False) as c:
        in_flight = asyncio.ensure_future(c.call("wait", "drain"))
        await asyncio.wait_for(probe.entered.wait(), timeout(5))
        stopping, started = started_call(srv.shutdown())
        await asyncio.wait_for(started.wait(), timeout(5))
        assert srv.draining  # shutdown has begun: it drains the call in flight
        with pytest.raises(RemoteError) as info:  # accepted no more
            await c.call("add", 1, 1)
        assert info.value.code == ErrorCode.SHUTTING_DOWN
        assert not stopping.done()  # still draining: the accepted call is running
        probe.gate.set()
        assert await asyncio.wait_for(in_flight, timeout(5)) == 1  # answered before closing
        await asyncio.wait_for(stopping, timeout(5))


async def test_thread_blocked_handlers_do_not_block_the_loop(server: Server, probe: Probe) -> None:
    async with AsyncClient(url(server, "tcp"), timeout=timeout(10)) as c:
        blocked = [asyncio.ensure_future(c.call("block", timeout(10))) for _ in range(4)]
        assert await c.call("add", 1, 1) == 2  # the loop answers while 4 threads are blocked
        probe.release.set()
        assert await asyncio.gather(*blocked) == [True] * 4


def test_blocking_client_timeout_inside_a_large_frame_keeps_the_stream_in_step() -> None:
    """A call that times out while a large answer is half read leaves the connection usable:
    the rest of that answer is consumed (and ignored) and the next call gets its own answer."""
    from sockstack.protocol.frames import FrameDecoder
    from sockstack.protocol.messages import Welcome, encode_response, encode_welcome

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    go_on = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout(10))
                dec = FrameDecoder()
                frames: list[Any] = []

                def next_frame() -> Any:
                    while not frames:
                        data = conn.recv(65536)
                        assert data, "client went away"
                        frames.extend(dec.feed(data))
                    return frames.pop(0)

                next_frame()  # HELLO
                conn.sendall(encode_welcome(Welcome(1, (1, 2, 0), 1 << 20, "test")))
                first = next_frame()
                big = encode_response(first.request_id, b"z" * 300_000)
                conn.sendall(big[:100_000])  # half an answer, then silence
                assert go_on.wait(timeout(10))
                conn.sendall(big[100_000:])
                second = next_frame()
                conn.sendall(encode_response(second.request_id, "second"))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with connect(f"tcp://127.0.0.1:{port}", timeout=timeout(10)) as client:
            with pytest.raises(CallTimeout):
                client.call("echo", 1, timeout=0.3)
            go_on.set()
            assert client.call("echo", 2) == "second"
    finally:
        go_on.set()
        server.join(timeout(10))
        listener.close()
    assert not errors, errors
