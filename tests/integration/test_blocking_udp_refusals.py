"""The blocking client's UDP calls and ICMP port unreachable (issue 12, the review of issue 11
item 10), as the asyncio client's (test_udp_refusal_calls.py): a refusal is charged to the call
whose datagram the kernel names (transport/udperr.py) and nothing is sent again at once; a call
fails as "did not run" only when every datagram of it that left was refused, after its
retransmission schedule sent a second one (a server still starting gets that one); a call whose
server went away after an earlier datagram reached it fails as "may or may not have run"."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

import pytest

from sockstack import CallTimeout, ConnectError, ConnectionLost, Server, ServerLimits, connect
from sockstack.protocol.datagram import RetryPolicy
from sockstack.sync.client import Client, DatagramConnection
from tests.conftest import Probe, timeout

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the kernel names refused datagrams on Linux"
)


def _on_drain(client: Client, seen: Callable[[DatagramConnection], bool]) -> threading.Event:
    """An event set once the client's connection has charged refusals and ``seen()`` holds."""
    conn = client.connection
    assert isinstance(conn, DatagramConnection)
    event = threading.Event()
    drain = conn._drain_refusals

    def wrapped() -> None:
        drain()
        if seen(conn):
            event.set()

    conn._drain_refusals = wrapped  # type: ignore[method-assign]
    return event


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, Future[Any]]:
    out: Future[Any] = Future()

    def run() -> None:
        try:
            out.set_result(fn())
        except BaseException as exc:
            out.set_exception(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _closed_port() -> socket.socket:
    """A socket keeping a loopback UDP port ours while nothing receives the client's datagrams
    there (connected to itself: the kernel answers ICMP port unreachable)."""
    guard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    guard.bind(("127.0.0.1", 0))
    guard.connect(guard.getsockname())
    return guard


class _ServerThread:
    """A server on ``port`` in a thread of its own, until stop()."""

    def __init__(self, service: Any, port: int, limits: ServerLimits | None = None) -> None:
        self.ready = threading.Event()
        self.stop_now = threading.Event()
        self.server: Server | None = None
        self._service, self._port, self._limits = service, port, limits
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        kw: dict[str, Any] = {} if self._limits is None else {"limits": self._limits}
        async with Server(self._service, udp=[f"127.0.0.1:{self._port}"], **kw) as srv:
            self.server = srv
            self.ready.set()
            await self.loop.run_in_executor(None, self.stop_now.wait, timeout(60))

    def stop(self) -> None:
        self.stop_now.set()
        self.thread.join(timeout(20))
        assert not self.thread.is_alive()


def test_a_server_that_starts_after_the_first_refusal_answers_the_call() -> None:
    guard = _closed_port()
    port = guard.getsockname()[1]
    # A retransmission 2 s after the first datagram: room to start the server in between.
    retry = RetryPolicy(initial=timeout(2), jitter=0.0)
    server: _ServerThread | None = None
    with guard, connect(f"udp://127.0.0.1:{port}", timeout=timeout(30), retry=retry) as c:
        refused = _on_drain(c, lambda conn: bool(conn._refusals))
        t, out = _in_thread(lambda: c.call("add", 2, 3))
        try:
            assert refused.wait(timeout(10))  # the first datagram was refused, and charged
            assert not out.done()  # one refused datagram fails nothing: it may be starting
            guard.close()
            server = _ServerThread(Probe(), port)
            assert server.ready.wait(timeout(10))
            assert out.result(timeout(20)) == 5
        finally:
            guard.close()
            t.join(timeout(20))
            if server is not None:
                server.stop()


def test_concurrent_calls_to_a_closed_port_each_fail_as_not_run() -> None:
    """Threads' calls (and a ping) to a closed port at once: every one fails as "did not run"
    (each was refused for every datagram of it that left), none at its 60 s timeout."""
    guard = _closed_port()
    try:
        with connect(f"udp://127.0.0.1:{guard.getsockname()[1]}", timeout=timeout(60)) as c:
            runs = [_in_thread(partial(c.call, "add", i, i)) for i in range(8)]
            runs.append(_in_thread(c.ping))
            for t, _ in runs:
                t.join(timeout(30))
            for _, out in runs:
                exc = out.exception(0)
                assert isinstance(exc, ConnectError), exc
                assert "did not run" in str(exc), exc
            assert len(c.connection.calls) == 0
    finally:
        guard.close()


def test_a_call_whose_server_went_away_may_or_may_not_have_run() -> None:
    probe = Probe()
    server = _ServerThread(probe, 0, ServerLimits(drain_timeout=0.05))
    assert server.ready.wait(timeout(10))
    assert server.loop is not None and server.server is not None
    port = server.server.endpoint("udp").port
    entered = threading.Event()

    async def arm() -> None:  # the method waits (never let through) until the server stops
        probe.gate = asyncio.Event()
        probe.entered = asyncio.Event()

        async def flag() -> None:
            assert probe.entered is not None
            await probe.entered.wait()
            entered.set()

        asyncio.get_running_loop().create_task(flag())

    asyncio.run_coroutine_threadsafe(arm(), server.loop).result(timeout(10))
    retry = RetryPolicy(initial=0.05, max_interval=0.2)
    try:
        with connect(f"udp://127.0.0.1:{port}", timeout=timeout(60), retry=retry) as c:
            t, out = _in_thread(lambda: c.call("wait", "k"))
            assert entered.wait(timeout(10))  # it reached the server
            server.stop()  # the port closes: the call's next datagrams are refused
            t.join(timeout(30))
            exc = out.exception(0)
            assert isinstance(exc, ConnectionLost), exc
            assert "may or may not have run" in str(exc)
    finally:
        server.stop()


def test_without_the_error_queue_refusals_fail_no_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel cannot name the refused datagram (no IP_RECVERR: another OS), a refusal
    is not attributed to any call: the calls end at their timeout (CallTimeout, "may or may not
    have run"), never with a claim that they did not run."""
    import sockstack.sync.client as sync_client

    monkeypatch.setattr(sync_client, "enable_refusal_reports", lambda sock: False)
    guard = _closed_port()
    try:
        with connect(f"udp://127.0.0.1:{guard.getsockname()[1]}", timeout=0.5) as c:
            with pytest.raises(CallTimeout):
                c.call("add", 1, 2)
            with pytest.raises(CallTimeout):
                c.ping()
            assert "connection refused" in c.connection.last_error  # type: ignore[union-attr]
    finally:
        guard.close()
