"""Third-party references (issue 13, item 2; PROTOCOL.md §4.5 form 4, ``objects.share`` and
``objects.adopt``), live over loopback TCP: three servers in threads, C hosting counters, B a
broker holding proxies of C's objects (B is C's client), and A, B's client, that gets them
handed on and calls C itself. The introductions' clock is C's pattern ``_clock``, driven by the
test (no waiting for a 30 s ttl)."""

from __future__ import annotations

import asyncio
import gc
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from sockstack import RemoteError
from sockstack.errors import ErrorCode
from sockstack.objects import (
    AsyncObjectClient,
    AsyncProxy,
    ObjectClient,
    ObjectServer,
    Promise,
    Proxy,
    expose,
    handoff,
    resolve,
)
from sockstack.objects.handoff import Introductions
from tests.conftest import timeout
from tests.objects.support import Running, quick_limits, running


@expose
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self, by: int = 1) -> int:
        self.n += by
        return self.n

    def child(self) -> Counter:
        return Counter()

    @property
    def value(self) -> int:
        return self.n


@expose
class Broker:
    """B's object: hands on what it holds of C (through a blocking client of C)."""

    def __init__(self, c_url: str) -> None:
        self.oc = ObjectClient(c_url, timeout=timeout(10))
        self.kid = resolve(self.oc.lookup("counter").child())
        self.aproxy: AsyncProxy | None = None  # set by a test: an asyncio client's proxy

    def named(self) -> Any:
        """A proxy of C's registered name (the shared counter)."""
        return self.oc.lookup("counter")

    def kids(self) -> Any:
        """The same exported child of C, twice, and a new one."""
        return [self.kid, {"again": self.kid}, resolve(self.oc.lookup("counter").child())]

    def typed(self) -> Counter:
        """Declared to return an object: clients call it with KEEP (a promise)."""
        proxy: Any = self.oc.lookup("counter")
        return proxy  # (a proxy of C's Counter, handed on)

    def ping(self) -> str:
        return "pong"

    async def named_async(self) -> Any:
        """An ``async def`` (on B's loop) returning a proxy of C."""
        return self.oc.lookup("counter")

    async def held_async(self) -> Any:
        """A proxy of C from an asyncio client running on B's own loop."""
        return self.aproxy

    def give(self, listener: Any) -> Any:
        """A plain def (a worker thread) calling A back with a proxy of C's object."""
        return listener.take(self.kid)

    async def give_async(self, listener: Any) -> Any:
        """The same from an ``async def``: the callback's arguments are encoded on the loop."""
        return await listener.take(self.kid)


@expose
class Listener:
    def __init__(self) -> None:
        self.got: Any = None

    def take(self, counter: Any) -> int:
        self.got = counter
        result: int = counter.incr(100)
        return result


@expose
class AsyncListener:
    async def take(self, counter: Any) -> int:
        assert isinstance(counter, AsyncProxy)
        result: int = await counter.incr(100)
        return result


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Three:
    def __init__(self, c: Running, b: Running, broker: Broker) -> None:
        self.c = c
        self.b = b
        self.broker = broker

    def table(self) -> Introductions:
        return handoff.introductions(self.c.server.objects)

    def tokens(self) -> int:
        return int(self.c.on_loop(lambda: len(self.table())))


def _server() -> ObjectServer:
    return ObjectServer(tcp=["127.0.0.1:0"], limits=quick_limits())


@pytest.fixture
def three() -> Iterator[Three]:
    with running(_server) as c:
        c.on_loop(lambda: c.server.register("counter", Counter()))
        broker = Broker(c.url)
        try:
            with running(_server) as b:
                b.on_loop(lambda: b.server.register("broker", broker))
                yield Three(c, b, broker)
        finally:
            broker.oc.close()


def _share(oc: ObjectClient, what: bytes | str) -> bytes:
    answer = oc.client.call("objects.share", what, timeout=timeout(10))
    assert set(answer) == {"token", "iface", "ttl_ms"}
    token: bytes = answer["token"]
    assert type(token) is bytes and len(token) == 16
    return token


def _adopt(oc: ObjectClient, token: bytes) -> Any:
    return oc.client.call("objects.adopt", token, timeout=timeout(10))


def _refused(code: int, call: Any, *args: Any) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        call(*args)
    assert info.value.code == code, info.value
    return info.value


# --------------------------------------------------------------------------- handing on


def test_a_calls_the_object_on_c_after_b_handed_it_on(three: Three) -> None:
    with ObjectClient(three.b.url, timeout=timeout(10)) as a:
        broker = a.lookup("broker")
        shared = broker.named()
        assert isinstance(shared, Proxy)
        assert shared._client is not a  # a proxy of A's own connection to C
        assert str(shared._client.client.endpoint) == three.c.url
        assert shared.incr(5) == 5
        assert three.broker.named().incr() == 6  # the same object on C, seen by B
        assert shared.value == 6  # a property of C's interface (described by C)
        first, again, other = (lambda r: (r[0], r[1]["again"], r[2]))(broker.kids())
        assert first is again  # one object, one token, one proxy
        assert first is not other
        assert first.incr(3) == 3 and three.broker.kid.incr() == 4
        assert other.incr() == 1
        # one connection to C, reused; B's tokens were all used
        assert list(handoff.third_clients(a)) == [three.c.url]
        assert three.tokens() == 0
        # A's own session on C holds its references: C exports to A's session (3 objects)
        c_sessions = three.c.sessions()
        assert c_sessions == 2  # B's and A's


def test_a_promise_resolves_to_the_object_on_c(three: Three) -> None:
    """A method declared to return an object is a promise on the blocking client; resolving
    it adopts the reference. (Calls pipelined on it before it resolves go to B, which does not
    host the object: resolve it first; see docs/OBJECTS.md.)"""
    with ObjectClient(three.b.url, timeout=timeout(10)) as a:
        promise = a.lookup("broker").typed()
        assert isinstance(promise, Promise)
        shared = resolve(promise)
        assert isinstance(shared, Proxy) and shared._client is not a
        assert shared.incr(11) == 11


def test_the_reference_stays_after_b_lets_go(three: Three) -> None:
    """A's proxy is its own reference on C: B releasing its proxy, or B's session on C ending,
    does not take A's object away."""
    with ObjectClient(three.b.url, timeout=timeout(10)) as a:
        kid = a.lookup("broker").kids()[0]
        three.broker.oc.close()
        assert kid.incr(2) == 2


def test_asyncio_client_adopts_in_the_same_call(three: Three) -> None:
    async def main() -> None:
        async with AsyncObjectClient(three.b.url, timeout=timeout(10)) as a:
            broker = a.lookup("broker")
            shared = await broker.named()
            assert isinstance(shared, AsyncProxy)
            assert await shared.incr(7) == 7
            kids = await broker.kids()
            assert kids[0] is kids[1]["again"]
            assert await kids[0].incr() == 1
            assert await shared.value == 7
            subs = handoff.third_clients(a)
            assert list(subs) == [three.c.url]
        assert all(sub.closed for sub in subs.values())  # closed with A's client

    asyncio.run(main())


def test_an_async_method_hands_on_a_blocking_clients_proxy_without_blocking_the_loop(
    three: Three,
) -> None:
    with ObjectClient(three.b.url, timeout=timeout(10)) as a:
        shared = a.lookup("broker").named_async()
        assert shared.incr(4) == 4


def test_bs_loop_serves_other_calls_while_a_token_is_asked_for(three: Three) -> None:
    """The share's round trip runs off B's loop: with C holding the token back, B still
    answers another client, and the held call completes once C answers."""
    table = three.table()
    mint = table.mint
    entered, go = threading.Event(), threading.Event()

    def slow_mint(*args: Any) -> bytes:  # on C's loop: C answers share late
        entered.set()
        assert go.wait(timeout(10))
        return mint(*args)

    table.mint = slow_mint  # type: ignore[method-assign]
    done: dict[str, Any] = {}
    try:
        with (
            ObjectClient(three.b.url, timeout=timeout(20)) as a,
            ObjectClient(three.b.url, timeout=timeout(20)) as other,
        ):

            def handed() -> None:
                done["shared"] = a.lookup("broker").named()

            t = threading.Thread(target=handed)
            t.start()
            assert entered.wait(timeout(10)), "B did not ask C for a token"
            assert other.lookup("broker").ping() == "pong"  # B's loop is free
            assert "shared" not in done
            go.set()
            t.join(timeout(20))
            assert done["shared"].incr(2) == 2
    finally:
        go.set()
        table.mint = mint  # type: ignore[method-assign]


def test_a_proxy_of_an_asyncio_client_on_bs_loop_is_handed_on(three: Three) -> None:
    async def connect() -> AsyncProxy:
        oc = AsyncObjectClient(three.c.url, timeout=timeout(10))
        await oc.connect()
        proxy: AsyncProxy = oc.lookup("counter")
        return proxy

    proxy = three.b.run(connect())
    three.broker.aproxy = proxy
    try:
        with ObjectClient(three.b.url, timeout=timeout(10)) as a:
            shared = a.lookup("broker").held_async()
            assert isinstance(shared, Proxy) and shared.incr(9) == 9
    finally:
        three.b.run(proxy._client.close())


def test_a_callback_gets_a_proxy_of_c_from_a_worker_thread_and_from_the_loop(
    three: Three,
) -> None:
    listener = Listener()
    with ObjectClient(three.b.url, timeout=timeout(10)) as a:
        broker = a.lookup("broker")
        assert broker.give(listener) == 100  # A's listener called C's object itself
        assert isinstance(listener.got, Proxy) and listener.got._client is not a
        assert broker.give_async(listener) == 200
        assert three.broker.kid.incr() == 201


def test_an_asyncio_clients_callback_gets_a_proxy_of_c(three: Three) -> None:
    async def main() -> None:
        async with AsyncObjectClient(three.b.url, timeout=timeout(10)) as a:
            broker = a.lookup("broker")
            assert await broker.give(AsyncListener()) == 100
            assert await broker.give_async(AsyncListener()) == 200

    asyncio.run(main())
    assert three.broker.kid.incr() == 201


def test_closing_a_closes_its_connections_to_third_servers(three: Three) -> None:
    a = ObjectClient(three.b.url, timeout=timeout(10))
    shared = a.lookup("broker").named()
    sub = shared._client
    assert isinstance(sub, ObjectClient) and not sub.closed
    a.close()
    assert sub.closed and handoff.third_clients(a) == {}
    three.c.eventually(lambda: len(three.c.server.objects.sessions) == 1)  # B's alone


def test_a_failed_share_fails_the_call_with_a_clear_error(three: Three) -> None:
    with ObjectClient(three.b.url, timeout=timeout(10)) as a:
        broker = a.lookup("broker")
        three.broker.oc.close()  # B can no longer ask C for a token
        err = _refused(ErrorCode.RESULT_NOT_ENCODABLE, broker.named)
        assert "could not be handed on" in str(err)
        with pytest.raises(RemoteError):  # a callback's arguments: the method raises
            broker.give(Listener())


# --------------------------------------------------------------------------- the tokens


def test_a_token_is_single_use(three: Three) -> None:
    with (
        ObjectClient(three.c.url, timeout=timeout(10)) as b,
        ObjectClient(three.c.url, timeout=timeout(10)) as a,
    ):
        kid = resolve(b.lookup("counter").child())
        token = _share(b, kid._id)
        got = _adopt(a, token)
        assert set(got) == {"id", "iface"} and got["iface"] == "Counter"
        assert got["id"] != kid._id  # an id of A's own session
        err = _refused(ErrorCode.UNKNOWN_OBJECT, _adopt, a, token)
        assert "used already" in str(err)
        # another client cannot use it either
        with ObjectClient(three.c.url, timeout=timeout(10)) as other:
            _refused(ErrorCode.UNKNOWN_OBJECT, _adopt, other, token)


def test_a_token_expires_after_its_ttl(three: Three) -> None:
    clock = Clock()
    three.c.on_loop(lambda: setattr(three.c.server.objects, "_clock", clock))
    ttl = three.c.on_loop(lambda: three.table().ttl)
    assert ttl == three.c.server.objects.limits.lease == 30.0  # default: the lease
    with (
        ObjectClient(three.c.url, timeout=timeout(10)) as b,
        ObjectClient(three.c.url, timeout=timeout(10)) as a,
    ):
        answer = b.client.call("objects.share", "counter", timeout=timeout(10))
        assert answer["ttl_ms"] == 30_000
        early, late = answer["token"], _share(b, "counter")
        clock.now += ttl - 0.001
        assert _adopt(a, early)["iface"] == "Counter"  # just within
        clock.now += 0.001
        err = _refused(ErrorCode.UNKNOWN_OBJECT, _adopt, a, late)
        assert "expired" in str(err)
        assert three.tokens() == 0  # the expired one is gone from the table


def test_a_token_expired_before_a_adopts_it_fails_the_call(three: Three) -> None:
    table = three.table()
    three.c.on_loop(lambda: setattr(table, "ttl", 0.0))  # expired as soon as made
    try:
        with ObjectClient(three.b.url, timeout=timeout(10)) as a:
            err = _refused(ErrorCode.UNKNOWN_OBJECT, a.lookup("broker").named)
            assert "expired" in str(err)
    finally:
        three.c.on_loop(lambda: setattr(table, "ttl", 30.0))
    assert three.tokens() == 0


def test_an_adopt_past_the_sessions_bound_keeps_the_token(three: Three) -> None:
    tables = three.c.server.objects.tables
    with (
        ObjectClient(three.c.url, timeout=timeout(10)) as b,
        ObjectClient(three.c.url, timeout=timeout(10)) as a,
    ):
        token = _share(b, resolve(b.lookup("counter").child())._id)
        kept = resolve(a.lookup("counter").child())  # A's session holds one object
        limit = tables.max_objects
        three.c.on_loop(lambda: setattr(tables, "max_objects", 1))
        try:
            _refused(ErrorCode.TOO_MANY_OBJECTS, _adopt, a, token)
        finally:
            three.c.on_loop(lambda: setattr(tables, "max_objects", limit))
        assert _adopt(a, token)["iface"] == "Counter"  # the token was not used
        assert kept.incr() == 1


def test_guessing_fails(three: Three) -> None:
    """Another client cannot adopt what it was not given, nor share what it does not hold."""
    with (
        ObjectClient(three.c.url, timeout=timeout(10)) as b,
        ObjectClient(three.c.url, timeout=timeout(10)) as m,
    ):
        kid = resolve(b.lookup("counter").child())
        token = _share(b, kid._id)
        _refused(ErrorCode.UNKNOWN_OBJECT, _adopt, m, bytes(16))
        _refused(ErrorCode.UNKNOWN_OBJECT, _adopt, m, bytes(a ^ 1 for a in token))
        _refused(ErrorCode.UNKNOWN_OBJECT, _adopt, m, kid._id)  # an object id is no token
        _refused(ErrorCode.UNKNOWN_OBJECT, _adopt, m, token[:15])
        _refused(ErrorCode.BAD_ARGUMENTS, _adopt, m, 5)
        _refused(ErrorCode.UNKNOWN_OBJECT, _share, m, kid._id)  # B's id, not M's
        _refused(ErrorCode.UNKNOWN_OBJECT, _share, m, "nope")
        _refused(ErrorCode.BAD_ARGUMENTS, _share, m, 5)
        assert _adopt(b, token)["iface"] == "Counter"  # the token was still good


def test_share_and_adopt_need_a_session(three: Three) -> None:
    from sockstack import Client

    with Client(three.c.url, timeout=timeout(10)) as raw:
        _refused(ErrorCode.SESSION_EXPIRED, raw.call, "objects.share", "counter")
        _refused(ErrorCode.SESSION_EXPIRED, raw.call, "objects.adopt", bytes(16))


def test_tokens_go_with_the_session_that_asked_for_them(three: Three) -> None:
    with ObjectClient(three.c.url, timeout=timeout(10)) as a:
        b = ObjectClient(three.c.url, timeout=timeout(10))
        token = _share(b, "counter")
        assert three.tokens() == 1
        b.close()
        three.c.eventually(lambda: len(three.table()) == 0)
        _refused(ErrorCode.UNKNOWN_OBJECT, _adopt, a, token)


def test_tokens_are_bounded_per_session_and_in_total_by_count_and_bytes(three: Three) -> None:
    table = three.table()
    limits = (
        table.max_per_session,
        table.max_session_bytes,
        table.max_total,
        table.max_total_bytes,
    )

    def bound(per: int, per_bytes: int, total: int, total_bytes: int) -> None:
        table.max_per_session, table.max_session_bytes = per, per_bytes
        table.max_total, table.max_total_bytes = total, total_bytes

    def held() -> int:  # the bytes of the one session holding tokens
        return next(iter(table.owned.values())).bytes

    try:
        with (
            ObjectClient(three.c.url, timeout=timeout(10)) as b,
            ObjectClient(three.c.url, timeout=timeout(10)) as b2,
        ):
            three.c.on_loop(lambda: bound(5, 1 << 20, 8, 1 << 20))
            for _ in range(5):
                _share(b, "counter")
            err = _refused(ErrorCode.TOO_MANY_OBJECTS, _share, b, "counter")
            assert "5 introductions" in str(err)
            for _ in range(3):
                _share(b2, "counter")
            err = _refused(ErrorCode.TOO_MANY_OBJECTS, _share, b2, "counter")
            assert "the server holds 8" in str(err)
            b.close()
            three.c.eventually(lambda: len(table) == 3)
            now = three.c.on_loop(held)
            assert now == table.bytes and now >= 3 * 200  # 200 each, plus the object's size
            three.c.on_loop(lambda: bound(100, now + 100, 100, 1 << 20))
            err = _refused(ErrorCode.TOO_MANY_OBJECTS, _share, b2, "counter")
            assert f"exceed {now + 100} bytes" in str(err)
            three.c.on_loop(lambda: bound(100, 1 << 20, 100, now + 100))
            err = _refused(ErrorCode.TOO_MANY_OBJECTS, _share, b2, "counter")
            assert f"the server's introductions would exceed {now + 100} bytes" in str(err)
            assert len(table) == 3
    finally:
        three.c.on_loop(lambda: bound(*limits))
    three.c.eventually(lambda: len(table) == 0 and table.bytes == 0)


def test_the_table_holds_a_bounded_number_of_bytes_and_frees_them_all(three: Three) -> None:
    """A session at its bound of introductions (1,000) costs a bounded amount of memory,
    measured by tracemalloc, and gives all of it back when it ends."""
    table = three.table()
    with ObjectClient(three.c.url, timeout=timeout(30)) as b:
        _share(b, "counter")  # warm up (the session's entry, the first allocations)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for _ in range(table.max_per_session - 1):
                _share(b, "counter")
            _refused(ErrorCode.TOO_MANY_OBJECTS, _share, b, "counter")
            full = tracemalloc.take_snapshot()
            grown = sum(
                s.size_diff
                for s in full.compare_to(before, "filename")
                if s.traceback[0].filename.endswith("handoff.py")
            )
            assert len(table) == table.max_per_session
            assert 0 < grown < 1_000 * 600, f"1,000 tokens hold {grown} bytes"
            assert table.bytes <= table.max_session_bytes
        finally:
            tracemalloc.stop()
    three.c.eventually(lambda: len(table) == 0 and table.bytes == 0 and not table.owned)
