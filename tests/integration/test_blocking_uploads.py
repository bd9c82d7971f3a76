"""Uploads with the blocking client, live over loopback (issue 12 item 6; PROTOCOL.md §4.4):
``client.upload("total", items, 2)``.

The same rules as the asyncio client's (tests/integration/test_uploads.py): items in order and
the result; the window holds a client whose server does not take its items (the uploading
thread waits for CREDIT, reading for the other threads meanwhile); an early answer stops the
sending; the method's error, a bad item, the deadline and an interrupt end the call (CANCEL
stops the method); UDP and mismatches refused. And what only a client shared by threads has:
uploads and calls of many threads at once on one connection.

The server runs on its own event loop in a background thread (the test's thread is a blocking
client's); every wait is on an event with a timeout, every thread is joined with a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from sockstack import (
    CallTimeout,
    ClientCall,
    ClientInterceptor,
    ErrorCode,
    LocalProtocolError,
    RemoteError,
    Reply,
    connect,
)
from sockstack.protocol.messages import FEATURE_UPLOAD, FEATURES, STREAM_WINDOW
from tests.conftest import timeout
from tests.helpers.threaded import Served as ThreadServed
from tests.helpers.threaded import in_thread, options, result, server_cert, serving_in_thread
from tests.integration.test_uploads import ITEM, WINDOW_ITEMS, Counted, Uploads

SCHEMES = ["tcp", "tls"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return server_cert(ca, tmp_path_factory.mktemp("bupload"))


Served = ThreadServed[Uploads]


@pytest.fixture
def served(cert: Path) -> Iterator[Served]:
    service = Uploads()
    with serving_in_thread(service, cert, on_stop=lambda: service.release.set()) as s:
        yield s


# --------------------------------------------------------------------------- items and result


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", ["total", "atotal"])
def test_items_arrive_in_order_and_the_result_comes_back(
    served: Served, ca: trustme.CA, scheme: str, name: str
) -> None:
    with connect(served.url(scheme), timeout=timeout(30), **options(scheme, ca)) as c:
        assert c.upload(name, range(100_000), 3) == 3 * sum(range(100_000))
        assert c.upload(name, iter(()), scale=2) == 0
        items = [1, "two", b"three", [4], {"five": 5}, None] * 3000  # several windows
        assert c.upload("collect", items, tag="t") == ["t", len(items), scheme]
        assert served.service.took == items
        assert c.call("plain", 1) == 2
        assert c.connection.uploads == {}  # type: ignore[union-attr]  # nothing left behind


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_slow_consumer_holds_the_client_at_the_window(
    served: Served, ca: trustme.CA, scheme: str
) -> None:
    """20 windows to a method that took one item and waits: the uploading thread sends about
    one window (never more than the window plus one item unacknowledged) and pulls no further;
    other calls of the client go on meanwhile; once the method goes on, every item arrives."""
    svc = served.service
    items = Counted(20 * WINDOW_ITEMS)
    with connect(served.url(scheme), timeout=timeout(30), **options(scheme, ca)) as c:
        thread, box = in_thread(lambda: c.upload("slow", items))
        assert svc.first.wait(timeout(10))
        conn = c.connection
        for _ in range(4000):  # round trips until the uploading thread is at its window
            ups = list(conn.uploads.values())  # type: ignore[union-attr]
            if ups and not ups[0].may_send():
                break
            assert c.call("plain", 1) == 2  # calls of this thread go on beside it
        (up,) = conn.uploads.values()  # type: ignore[union-attr]
        for _ in range(20):
            c.ping()
        assert STREAM_WINDOW <= up.most <= STREAM_WINDOW + 100
        assert items.taken <= WINDOW_ITEMS + 2
        svc.release.set()
        assert result(thread, box) == 20 * WINDOW_ITEMS * len(ITEM)
        assert up.most <= STREAM_WINDOW + 100
    assert items.taken == 20 * WINDOW_ITEMS


def test_an_early_answer_stops_the_sending(served: Served) -> None:
    items = Counted(20 * WINDOW_ITEMS)
    with connect(served.url("tcp"), timeout=timeout(30)) as c:
        assert c.upload("first_of", items) == ITEM
        assert items.taken <= WINDOW_ITEMS + 2
        assert items.closed
        assert c.call("plain", 1) == 2


def test_the_methods_error_and_a_bad_item(served: Served) -> None:
    with connect(served.url("tcp"), timeout=timeout(30)) as c:
        with pytest.raises(RemoteError) as err:
            c.upload("fails", range(10**6))
        assert err.value.code == ErrorCode.APPLICATION_ERROR
        with pytest.raises(RemoteError) as err:
            c.upload("total", [1, 2, "three"], 1)
        assert err.value.code == ErrorCode.BAD_ARGUMENTS
        assert "parameter 'items', item 2: expects int, got str 'three'" in str(err.value)
        assert c.call("plain", 1) == 2


def test_the_deadline_bounds_the_call_and_stops_the_method(served: Served) -> None:
    """The server does not take the items: the uploading thread waits for CREDIT until the
    call's deadline (CallTimeout, not a hang), and the method's next item never comes."""
    svc = served.service
    with connect(served.url("tcp"), timeout=timeout(30)) as c:
        with pytest.raises(CallTimeout):
            c.upload("slow", Counted(20 * WINDOW_ITEMS), timeout=timeout(1))
        svc.release.set()  # it goes on to its next item: the call was stopped
        assert svc.stopped.wait(timeout(10))
        assert svc.stopped_by is not None
        assert c.call("plain", 1) == 2


class Interrupted(BaseException):
    """What a KeyboardInterrupt is to the client: not an Exception."""


def test_an_interrupt_sends_cancel_and_stops_the_method(served: Served) -> None:
    svc = served.service

    def items() -> Iterator[bytes]:
        yield ITEM
        assert svc.first.wait(timeout(10))  # the method runs, waiting for its next item
        raise Interrupted

    with connect(served.url("tcp"), timeout=timeout(30)) as c:
        with pytest.raises(Interrupted):
            c.upload("aslow", items())
        assert svc.stopped.wait(timeout(10))
        assert c.call("plain", 1) == 2


# --------------------------------------------------------------------------- refusals


def test_udp_and_mismatches_are_refused(served: Served) -> None:
    with connect(served.url("udp"), timeout=timeout(10)) as u:
        with pytest.raises(LocalProtocolError) as local:
            u.upload("total", [1], 1)
        assert local.value.code == ErrorCode.STREAM_MISMATCH
    with connect(served.url("tcp"), timeout=timeout(10)) as c:
        with pytest.raises(RemoteError) as err:
            c.upload("plain", [1], 1)
        assert err.value.code == ErrorCode.STREAM_MISMATCH
        with pytest.raises(RemoteError) as err:
            c.call("total", 1)
        assert err.value.code == ErrorCode.STREAM_MISMATCH


def test_a_server_without_the_feature_is_refused_locally(served: Served) -> None:
    served.server.features = FEATURES & ~FEATURE_UPLOAD  # its next WELCOMEs: before uploads
    try:
        with connect(served.url("tcp"), timeout=timeout(10)) as c:
            with pytest.raises(LocalProtocolError) as err:
                c.upload("total", [1], 1)
            assert err.value.code == ErrorCode.STREAM_MISMATCH
            assert c.call("plain", 1) == 2
    finally:
        served.server.features = FEATURES


# --------------------------------------------------------------------------- threads, hooks


class Seen(ClientInterceptor):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, Any]] = []

    def before(self, call: ClientCall) -> None:
        self.log.append(("before", call.method, call.upload))

    def after(self, call: ClientCall, reply: Reply) -> None:
        self.log.append(("after", call.method, reply.result))


def test_interceptors_see_an_upload_once(served: Served) -> None:
    seen = Seen()
    with connect(served.url("tcp"), timeout=timeout(10), interceptors=[seen]) as c:
        assert c.upload("total", range(10_000), 2) == 2 * sum(range(10_000))
    total = 2 * sum(range(10_000))
    assert seen.log == [("before", "total", True), ("after", "total", total)]


def test_a_typed_proxy_uploads_the_item_stream_argument(served: Served) -> None:
    with connect(served.url("tcp"), timeout=timeout(10)) as c:
        calc = c.proxy(Uploads)
        assert calc.total(2, iter(range(10))) == 90
        assert calc.collect(iter("ab"), tag="t") == ["t", 2, "tcp"]
        with pytest.raises(RemoteError) as err:  # untyped: it cannot know, a plain call
            c.proxy().total(2, [1])
        assert err.value.code == ErrorCode.STREAM_MISMATCH


@pytest.mark.parametrize("scheme", SCHEMES)
def test_threads_share_a_client_with_uploads_and_calls_at_once(
    served: Served, ca: trustme.CA, scheme: str
) -> None:
    """8 threads on one client: half upload several windows each, half make calls; every
    answer reaches its own caller."""
    with connect(served.url(scheme), timeout=timeout(60), **options(scheme, ca)) as c:

        def work(k: int) -> list[Any]:
            out = []
            for i in range(10):
                if k % 2:
                    out.append(c.upload("count_bytes", [ITEM] * (3 * WINDOW_ITEMS), i))
                else:
                    out.append(c.call("plain", k * 100 + i))
            return out

        runs = [in_thread(lambda k=k: work(k)) for k in range(8)]  # type: ignore[misc]
        for k, (thread, box) in enumerate(runs):
            size = 3 * WINDOW_ITEMS * len(ITEM)  # 3 windows each
            want = [size + i for i in range(10)] if k % 2 else [k * 100 + i + 1 for i in range(10)]
            assert result(thread, box) == want
        assert c.connection.uploads == {}  # type: ignore[union-attr]


def test_upload_request_passes_keywords_named_like_the_clients_own(served: Served) -> None:
    """upload_request takes the method's other arguments as a sequence and a mapping: they may
    be named ``timeout`` or ``metadata`` (``sockstack call --items-from`` uses it)."""
    with connect(served.url("tcp"), timeout=timeout(10)) as c:
        assert c.upload_request("collect", [1, 2], (), {"tag": "t"}) == ["t", 2, "tcp"]

    async def scenario() -> Any:
        from sockstack import AsyncClient

        async with AsyncClient(served.url("tcp"), timeout=timeout(10)) as a:
            return await a.upload_request("collect", [3], [], {"tag": "u"})

    assert asyncio.run(scenario()) == ["u", 1, "tcp"]
