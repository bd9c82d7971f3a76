"""Issue 11 item 10, in the clients' core: a UDP call to a port where nothing listens fails at
once with ConnectError (ICMP port unreachable, reported as ECONNREFUSED on the connected
socket) instead of waiting for its timeout; and a call's timeout bounds the whole call, the
connection and handshake included, in both clients."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sockstack import AsyncClient, CallTimeout, ConnectError, Server, StreamLimits, connect
from tests.conftest import Probe, timeout

LONG = 30.0  # the call timeout: a refused call that waited for it would raise CallTimeout


@contextmanager
def closed_udp_port() -> Iterator[socket.socket]:
    """A loopback UDP port that answers "port unreachable", kept ours while the test runs: the
    yielded socket is bound to it and connected to itself. Linux hands a datagram only to a
    connected socket whose peer sent it, so the client's datagrams find no socket (ICMP port
    unreachable, as for a closed port), while no other test can bind the port meanwhile
    (bound, then closed at once, it could be taken by a parallel test before use). A test that
    starts a server there closes the socket just before (``guard.close()``): the port is then
    free for the few system calls until the server binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as guard:
        guard.bind(("127.0.0.1", 0))
        guard.connect(guard.getsockname())
        yield guard


def _port(guard: socket.socket) -> int:
    return int(guard.getsockname()[1])


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_blocking_udp_call_to_a_closed_port_is_refused(secret: str | None) -> None:
    with (
        closed_udp_port() as guard,
        connect(f"udp://127.0.0.1:{_port(guard)}", timeout=timeout(LONG), secret=secret) as c,
    ):
        with pytest.raises(ConnectError, match=r"connection refused.*did not run"):
            c.call("add", 1, 2)
        with pytest.raises(ConnectError, match="connection refused"):
            c.request("add", [1], {"b": 2})
        with pytest.raises(ConnectError, match="connection refused"):
            c.ping()


@pytest.mark.parametrize("secret", [None, "s3cret"])
async def test_asyncio_udp_call_to_a_closed_port_is_refused(secret: str | None) -> None:
    with closed_udp_port() as guard:
        url = f"udp://127.0.0.1:{_port(guard)}"
        async with AsyncClient(url, timeout=timeout(LONG), secret=secret) as c:
            results = await asyncio.gather(
                *(c.call("add", i, i) for i in range(5)), c.ping(), return_exceptions=True
            )
            for r in results:
                assert isinstance(r, ConnectError) and "connection refused" in str(r), r
            assert len(c.channel.calls) == 0  # type: ignore[union-attr]


def test_a_stale_refusal_fails_no_call() -> None:
    """A refusal left on the socket by an earlier datagram (the server was not up yet) does not
    fail the next call: the kernel names the refused datagram, which is no call's (it was sent
    for no request), so the call goes on and the server that has started answers."""
    with (
        closed_udp_port() as guard,
        connect(f"udp://127.0.0.1:{_port(guard)}", timeout=timeout(LONG)) as c,
    ):
        port = _port(guard)
        c.connection.sock.send(b"nobody listens yet")  # type: ignore[union-attr]
        ready = threading.Event()
        done = threading.Event()

        async def serve() -> None:
            guard.close()  # the port free for the server, bound just below
            async with Server(Probe(), udp=[f"127.0.0.1:{port}"]):
                ready.set()
                await asyncio.get_running_loop().run_in_executor(None, done.wait, timeout(LONG))

        t = threading.Thread(target=asyncio.run, args=(serve(),))
        t.start()
        try:
            assert ready.wait(timeout(10))
            assert c.call("add", 2, 3) == 5
        finally:
            done.set()
            t.join(timeout(10))


async def test_asyncio_call_after_a_refusal_reaches_a_server_started_since() -> None:
    """The event loop reads a refusal as it comes (no call waits then): it fails nothing, and
    the next call reaches the server started meanwhile."""
    with closed_udp_port() as guard:
        port = _port(guard)
        async with AsyncClient(f"udp://127.0.0.1:{port}", timeout=timeout(LONG)) as c:
            endpoint = c.channel.endpoint  # type: ignore[union-attr]
            endpoint.transport.sendto(b"nobody listens yet")
            guard.close()  # the port free for the server, bound just below
            async with Server(Probe(), udp=[f"127.0.0.1:{port}"]):
                assert await c.call("add", 2, 3) == 5


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_blocking_connect_is_inside_the_call_timeout(silent_server: str) -> None:
    # connect_timeout is far longer than the call timeout: the call timeout must end it.
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            connect(silent_server, timeout=timeout(0.5), connect_timeout=300)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout(LONG))
    assert not t.is_alive(), "the connection attempt outlived the call timeout"
    (exc,) = outcome
    assert isinstance(exc, ConnectError) and "HELLO" in str(exc), exc


async def test_asyncio_connect_is_inside_the_call_timeout(silent_server: str) -> None:
    client = AsyncClient(
        silent_server,
        timeout=timeout(0.5),
        connect_timeout=300,
        stream_limits=StreamLimits(handshake_timeout=300),  # only the call timeout is short
    )
    with pytest.raises(ConnectError, match="handshake"):
        await asyncio.wait_for(client.connect(), timeout(LONG))


def test_a_call_waiting_for_an_answer_still_times_out() -> None:
    """The refusal path is for refusals only: a server that is up but slow to answer still
    gives CallTimeout (the call may have run)."""
    with socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM
    ) as mute:  # a UDP "server" that never answers
        mute.bind(("127.0.0.1", 0))
        with connect(f"udp://127.0.0.1:{mute.getsockname()[1]}", timeout=timeout(0.3)) as c:
            with pytest.raises(CallTimeout):
                c.call("add", 1, 2)
