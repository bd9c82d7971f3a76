"""How calls on promises are written and answered, live over loopback TCP: they leave
together (corked) with the call that waits, yet a promise nobody waits on still reaches the
server; a promise dropped before its answer came gets a nil answer, with nothing exported
for it (the client gave its references up with FINISH in the same write)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from sockstack.objects import ObjectClient, ObjectServer, expose
from tests.conftest import timeout
from tests.objects.support import Running, quick_limits, running

TOUCHED = threading.Event()


@expose(inline=True)
class Node:
    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self.below: Node | None = None
        self.n = 0

    def child(self) -> Node:
        if self.below is None:
            self.below = Node(self.depth + 1)
        return self.below

    def touch(self) -> Node:
        TOUCHED.set()
        return self

    def incr(self) -> int:
        self.n += 1
        return self.n


@pytest.fixture
def served() -> Iterator[Running]:
    def make() -> ObjectServer:
        srv = ObjectServer(tcp=["127.0.0.1:0"], limits=quick_limits())
        srv.register("root", Node())
        return srv

    with running(make) as r:
        yield r


def test_a_chain_reaches_the_server_in_one_write_and_dropped_promises_export_nothing(
    served: Running,
) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        root = oc.lookup("root")
        assert root.incr() == 1
        for _ in range(3):  # warm: the interface described, the session attached
            x = root
            for _ in range(5):
                x = x.child()
            x.incr()
            del x
        root.incr()  # (the last chain's RELEASE and FINISH go with it)
        base = served.exports()
        x = root
        for _ in range(5):
            x = x.child()
        assert x.incr() >= 1
        # Only the promise still alive (x) had its reference exported: the four dropped
        # before their answers came were answered nil.
        assert served.exports() - base <= 1
        del x
        root.incr()
        served.eventually(lambda: served.server.objects.tables.objects <= base)


def test_a_promise_nobody_waits_on_still_reaches_the_server(served: Running) -> None:
    TOUCHED.clear()
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        root = oc.lookup("root")
        assert root.incr() >= 1
        kept = root.touch()  # a promise: corked, no call follows, nobody waits
        assert TOUCHED.wait(timeout(5)), "the held CALL never left the client"
        assert kept is not None


def test_a_wait_on_a_held_promise_sends_it(served: Running) -> None:
    from sockstack.objects import resolve

    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        root = oc.lookup("root")
        assert root.incr() >= 1
        conn = oc._conn()
        p = root.child().child()
        if hasattr(socket, "TCP_CORK"):  # Linux: held in the kernel until a write or a wait
            assert conn._corked
        node = resolve(p)  # waits: what was held leaves now (not up to 200 ms later)
        assert not conn._corked
        assert node.incr() == 1
        assert p.incr() == 2
