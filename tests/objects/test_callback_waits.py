"""A worker thread that waits for a call to the client's object (a callback), live over
loopback TCP: the served call's CANCEL ends the wait, the thread gives its slot back while it
waits (other calls still get a worker), and at most ``max_workers`` threads wait so at once
(one more callback is refused with OVERLOADED, not made)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sockstack.errors import ErrorCode, RemoteError
from sockstack.host.server import ServerLimits
from sockstack.objects import ObjectClient, ObjectServer, expose
from sockstack.objects.messages import encode_call
from tests.conftest import timeout
from tests.objects.support import Running, running

ENDED: dict[str, threading.Event] = {}
SEEN: dict[str, BaseException] = {}
GATE = threading.Event()


@expose
class Relay:
    def relay(self, listener: Any, key: str) -> str:
        """A worker thread calling the client's object back (blocks for its answer)."""
        try:
            return str(listener.echo(key))
        except BaseException as exc:
            SEEN[key] = exc
            raise
        finally:
            ENDED.setdefault(key, threading.Event()).set()

    def incr(self) -> int:
        return 1


@expose
class Silent:
    """A client's object that does not answer until the test lets it."""

    def echo(self, x: str) -> str:
        GATE.wait(timeout(30))
        return x


@contextlib.contextmanager
def serving(max_workers: int) -> Iterator[Running]:
    limits = ServerLimits(
        drain_timeout=timeout(2), close_timeout=timeout(2), max_workers=max_workers
    )

    def make() -> ObjectServer:
        srv = ObjectServer(tcp=["127.0.0.1:0"], limits=limits)
        srv.objects.callback_timeout = 60.0  # (far beyond what any wait below takes)
        srv.register("relay", Relay())
        return srv

    GATE.clear()
    ENDED.clear()
    SEEN.clear()
    try:
        with running(make) as r:
            yield r
    finally:
        GATE.set()


def _waiting(served: Running) -> int:
    return int(served.on_loop(lambda: served.server.dispatcher.waiting_now))


def test_cancel_ends_a_workers_wait_for_a_callback() -> None:
    with serving(max_workers=2) as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        relay = oc.lookup("relay")
        silent = Silent()
        conn = oc._conn()
        ticket = conn.start_exchange(  # a 60 s deadline: only the CANCEL can end it early
            lambda rid: encode_call(
                rid,
                relay._call_target(),
                "relay",
                [silent, "c"],
                budget_ms=60_000,
                to_ref=oc._to_ref,
            ),
            "relay",
            timeout(30),
        )
        served.eventually(lambda: served.server.dispatcher.waiting_now == 1)
        conn._cancel(ticket.request_id)  # the caller gives up: CANCEL
        with pytest.raises(RemoteError) as err:
            ticket.result()
        assert err.value.code == ErrorCode.CANCELLED
        ended = ENDED.setdefault("c", threading.Event())
        # Not the callback timeout, nor the deadline (60 s): the CANCEL ended the wait.
        assert ended.wait(timeout(10)), "the worker still waits for the callback"
        assert type(SEEN["c"]).__name__ == "CallAborted"
        served.eventually(lambda: served.server.dispatcher.waiting_now == 0)
        assert relay.incr() == 1


def test_waiting_workers_give_their_slot_back_and_are_bounded() -> None:
    with (
        serving(max_workers=2) as served,
        ObjectClient(served.url, timeout=timeout(30)) as bad,
        ObjectClient(served.url, timeout=timeout(10)) as good,
    ):
        relay = bad.lookup("relay")
        silent = Silent()
        results: dict[str, Any] = {}

        def call(key: str) -> None:
            try:
                results[key] = relay.relay(silent, key)
            except Exception as exc:
                results[key] = exc

        first = [threading.Thread(target=call, args=(k,), daemon=True) for k in ("a", "b")]
        for t in first:
            t.start()
        served.eventually(lambda: served.server.dispatcher.waiting_now == 2)
        # Both workers wait for the silent client, their slots given back: another client's
        # plain call still runs in a worker.
        assert good.call(good.lookup("relay")._call_target(), "incr", timeout=timeout(5)) == 1
        # A third wait would take more than max_workers threads: refused, nothing sent.
        third = threading.Thread(target=call, args=("c",), daemon=True)
        third.start()
        third.join(timeout(10))
        assert not third.is_alive()
        assert isinstance(results["c"], RemoteError)
        assert type(SEEN["c"]) is RemoteError and SEEN["c"].code == ErrorCode.OVERLOADED
        assert _waiting(served) == 2
        GATE.set()
        for t in first:
            t.join(timeout(20))
        assert results["a"] == "a" and results["b"] == "b"
        served.eventually(lambda: served.server.dispatcher.waiting_now == 0)
