"""The blocking client's fast path does not look for data that came while the connection was
idle (a poll() system call) when a call begins right after the previous one was answered on
that path (within ``_FRESH_S``, as in a loop of calls). Whatever came meanwhile is then read
with the call's own answer: the call still gets its own answer, and what came (here a
keepalive PING from the server) is handled. Live over loopback TCP, the server in a thread.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from sockstack import Service, connect, method
from sockstack.asyncio.stream import StreamLimits
from sockstack.host.server import ServerLimits
from sockstack.sync import client as sync_client
from tests.conftest import timeout
from tests.helpers.threaded import Served, serving_in_thread


class Echo(Service):
    @method(inline=True)
    def echo(self, value: Any = None) -> Any:
        return value


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served[Echo]]:
    path = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    limits = ServerLimits(
        drain_timeout=timeout(2),
        close_timeout=timeout(2),
        # The server PINGs an idle connection after 0.2 s, and waits long for the PONG.
        stream=StreamLimits(keepalive_interval=0.2, keepalive_timeout=timeout(30)),
    )
    with serving_in_thread(Echo(), path, limits=limits) as s:
        yield s


def test_a_frame_pending_when_the_look_is_skipped_is_read_with_the_answer(
    served: Served[Echo],
) -> None:
    with connect(served.url("tcp"), timeout=timeout(10)) as c:
        assert c.call("echo", 1) == 1  # answered on the fast path
        conn = c.connection
        assert isinstance(conn, sync_client.StreamConnection)
        sock = conn.sock
        assert sock is not None
        # Wait (on the socket, bounded) for the server's keepalive PING to be there, unread.
        readable, _, _ = select.select([sock], [], [], timeout(10))
        assert readable, "no PING from the server"
        # As in a loop of calls: the previous call was answered a moment ago, no look.
        conn._answered = time.monotonic()
        assert c.call("echo", "second") == "second"
        assert conn.sock is sock  # the same connection: the PING was taken, not an error
        # The PING was answered: the connection serves on (a PONG missing would not show
        # before keepalive_timeout; the call shows the PING did not take the answer's place).
        assert c.call("echo", [3]) == [3]
        assert conn.sock is sock


def test_the_window_is_short() -> None:
    """Only a call that begins right after another skips the look: a script that calls now
    and then (an idle connection) still looks first, and reconnects if the server left."""
    assert 0 < sync_client._FRESH_S <= 0.001
