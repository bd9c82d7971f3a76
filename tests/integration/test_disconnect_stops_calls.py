"""A connection that ends stops the calls still running on it, as their CANCEL would
(PROTOCOL.md §4), live over loopback TCP: nobody can receive their answers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sockstack import connect
from sockstack.protocol.connection import Connection, Role
from sockstack.protocol.frames import HEADER_SIZE
from sockstack.protocol.messages import encode_request
from tests.conftest import timeout
from tests.integration.test_blocking_deadlines_metadata import BlockingWork, Served, _set


@pytest.fixture
def work() -> Iterator[tuple[Served, BlockingWork]]:
    svc = BlockingWork()
    served = Served(svc)
    try:
        yield served, svc
    finally:
        served.loop.call_soon_threadsafe(svc.gate.set)  # type: ignore[union-attr]
        svc.release.set()
        served.stop()


def test_a_client_that_closes_stops_its_running_call(work: tuple[Served, BlockingWork]) -> None:
    served, svc = work
    c = connect(served.url("tcp"), timeout=30)
    failed: dict[str, Any] = {}

    def call() -> None:
        try:
            c.call("slow")
        except Exception as exc:  # the connection closed under it
            failed["call"] = exc

    t = threading.Thread(target=call, daemon=True)
    t.start()
    assert served.run(_set(svc.started))
    c.close()  # no CANCEL: the connection ends
    t.join(timeout(10))
    assert "call" in failed
    assert served.run(_set(svc.cancelled))  # stopped on the server (its deadline is 30 s away)
    assert not svc.finished.is_set()


def test_a_connection_cut_mid_call_stops_the_call(work: tuple[Served, BlockingWork]) -> None:
    """A raw socket: HELLO, the REQUEST, then a reset (SO_LINGER 0), nothing else."""
    served, svc = work
    assert served.server is not None
    port = served.server.endpoint("tcp").port
    with socket.create_connection(("127.0.0.1", port), timeout=timeout(10)) as s:
        s.sendall(Connection(Role.CLIENT).data_to_send())  # HELLO
        assert s.recv(HEADER_SIZE + 4096)  # WELCOME
        s.sendall(encode_request(1, "slow", []))
        assert served.run(_set(svc.started))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    assert served.run(_set(svc.cancelled))
    assert not svc.finished.is_set()
