"""Remote objects, live over loopback TCP with the blocking client: exposure, references,
release and leases, instance modes, errors and deadlines (issue 13, items 1-3, 5, 7)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from sockstack import CallTimeout, RemoteError, ServiceError
from sockstack.errors import ErrorCode, SessionExpired
from sockstack.objects import (
    AsyncObjectClient,
    AsyncPromise,
    AsyncProxy,
    ObjectClient,
    ObjectServer,
    Promise,
    Proxy,
    alookup,
    batch,
    expose,
    lookup,
    release,
    resolve,
)
from sockstack.objects.messages import AnswerTarget, ObjectTarget
from tests.conftest import timeout
from tests.helpers.faultproxy import TCPFaultProxy
from tests.objects.support import Running, quick_limits, running


@expose
class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.kept: Counter | None = None
        self._secret = "never exposed"
        self.plain = "a plain attribute: never exposed"

    def incr(self, by: int = 1) -> int:
        self.n += by
        return self.n

    def child(self) -> Counter:
        return Counter()

    def keep(self) -> Counter:
        """The same child each time (it crosses again: one proxy, counted twice)."""
        if self.kept is None:
            self.kept = Counter()
        return self.kept

    def same(self, other: Any) -> bool:
        return other is self.kept

    def pair(self) -> list[Any]:
        return [self.child(), {"k": self.child()}, 3]

    def fail(self) -> None:
        raise ServiceError("failed on purpose")

    def leaf(self, n: int) -> Any:
        """Untyped: blocks, and the proxy's interface is described on first sight."""
        return Leaf(n)

    def notify(self, listener: Any, x: int) -> Any:
        """A plain def (a worker thread) calling the client's object back: it blocks."""
        return listener.ping(x)

    async def notify_async(self, listener: Any, x: int) -> Any:
        return await listener.ping(x)

    def notify_slow(self, listener: Any) -> str:
        server_side = CALLBACKS.setdefault("objects", None)
        assert server_side is not None
        server_side.callback_timeout = 0.3
        try:
            listener.sleep(30)
        except CallTimeout:
            return "timed out"
        finally:
            server_side.callback_timeout = 10.0
        return "answered"

    def notify_error(self, listener: Any) -> str:
        try:
            listener.fail()
        except RemoteError as exc:
            return f"{exc.code} {exc}"
        return "no error"

    async def later(self, listener: Any) -> None:
        """Calls the client back after this call has been answered (the client is idle)."""

        async def soon() -> None:
            await asyncio.sleep(0)
            LATER.append(await listener.ping(21))

        self.task = asyncio.get_running_loop().create_task(soon())

    def bad_child(self) -> Counter:
        raise ServiceError("no child today")

    def gated_child(self, key: str) -> Counter:
        """Blocks a worker until the test opens the gate ``key`` (bounded)."""
        GATES.setdefault(key, threading.Event()).wait(timeout(20))
        return self.keep()

    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @property
    def value(self) -> int:
        return self.n

    def _hidden(self) -> str:
        return "never called"


GATES: dict[str, threading.Event] = {}
CALLBACKS: dict[str, Any] = {}  # "objects": the server's Objects pattern (for its timeout)
LATER: list[Any] = []


@expose
class Listener:
    """A client's object the server calls back."""

    def __init__(self, counter: Any = None) -> None:
        self.seen: list[int] = []
        self.counter = counter

    def ping(self, x: int) -> int:
        self.seen.append(x)
        if self.counter is not None:  # calls back into the server from inside the callback
            return int(self.counter.incr(x)) * 100
        return x * 2

    def sleep(self, seconds: float) -> None:
        GATES.setdefault("sleep", threading.Event()).wait(seconds)

    def fail(self) -> None:
        raise ServiceError("the client's own error")


@expose
class AsyncListener:
    """A client's object with an async method (the asyncio client runs it on its loop)."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter

    async def ping(self, x: int) -> int:
        return int(await self.counter.incr(x)) * 100

    def plain(self, x: int) -> int:  # a plain def: the loop's executor
        return -x


@expose
class Leaf:
    """Never registered: clients learn its interface when a proxy of it first comes."""

    def __init__(self, n: int) -> None:
        self._n = n

    @property
    def size(self) -> int:
        return self._n

    def bigger(self) -> Leaf:
        return Leaf(self._n + 1)


@expose(instance="percall")
class PerCall:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


@expose
class PerSession:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


Served = Running


def serving(lease: float = 30.0) -> contextlib.AbstractContextManager[Running]:
    def make() -> ObjectServer:
        srv = ObjectServer(tcp=["127.0.0.1:0"], lease=lease, limits=quick_limits())
        srv.register("counter", Counter())
        CALLBACKS["objects"] = srv.objects
        srv.register("percall", PerCall)
        srv.register("session", PerSession)
        return srv

    return running(make)


@pytest.fixture
def served() -> Iterator[Served]:
    with serving() as s:
        yield s


def test_a_registered_object_is_called_through_its_proxy(served: Served) -> None:
    with lookup(f"{served.url}/counter", timeout=timeout(10)) as counter:
        assert isinstance(counter, Proxy)
        assert counter.incr(5) == 5
        assert counter.incr() == 6
        assert counter.value == 6  # a property reads as an attribute


def test_a_returned_object_crosses_as_a_reference(served: Served) -> None:
    with lookup(f"{served.url}/counter", timeout=timeout(10)) as counter:
        c2 = counter.child()
        assert isinstance(c2, Proxy)
        assert c2.incr() == 1 and c2.incr(2) == 3
        assert counter.incr() == 1  # another object
        first = resolve(counter.keep())
        assert resolve(counter.keep()) is first  # one proxy per remote object
        assert counter.same(first) is True  # passed back: the original object on its server
        got = counter.pair()
        assert isinstance(got[0], Proxy) and isinstance(got[1]["k"], Proxy) and got[2] == 3
        assert got[0].incr() == 1 and got[1]["k"].incr() == 1


def test_only_what_expose_marks_is_reachable(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        with pytest.raises(AttributeError):
            counter._hidden  # noqa: B018  (not even sent)
        with pytest.raises(AttributeError):
            counter.plain  # noqa: B018  (the description lists no such member)
        target = counter._target
        for name in ("_hidden", "_secret", "plain", "__init__", "__class__"):
            with pytest.raises(RemoteError) as err:
                oc.call(target, name)
            assert err.value.code == ErrorCode.UNKNOWN_METHOD, name


def test_object_ids_are_random_and_scoped_to_their_session(served: Served) -> None:
    with (
        ObjectClient(served.url, timeout=timeout(10)) as a,
        ObjectClient(served.url, timeout=timeout(10)) as b,
    ):
        children = [resolve(a.lookup("counter").child()) for _ in range(200)]
        ids = {c._id for c in children}
        assert len(ids) == 200 and all(i is not None and len(i) == 16 for i in ids)
        key = children[0]._id
        assert key is not None
        with pytest.raises(RemoteError) as err:
            b.call(ObjectTarget(key), "incr")
        assert err.value.code == ErrorCode.UNKNOWN_OBJECT
        assert children[0].incr() == 1  # still the owner's


def test_dropped_proxies_are_released_and_the_server_frees_them(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        kids = [resolve(counter.child()) for _ in range(100)]
        assert served.exports() == 100 and oc.held == 100
        del kids
        gc.collect()
        counter.incr()  # the RELEASEs go with the next call
        assert oc.held == 0
        served.eventually(lambda: served.server.objects.tables.objects == 0)
        kept = resolve(counter.keep())
        release(kept)
        with pytest.raises(ValueError):
            kept.incr()
        counter.incr()
        served.eventually(lambda: served.server.objects.tables.objects == 0)


@pytest.mark.timeout(180)  # (20,000 round trips under tracemalloc: ~50 s with asyncio debug)
def test_no_leak_after_10000_create_and_drop_cycles(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(30)) as oc:
        counter = oc.lookup("counter")
        for _ in range(200):  # warm up (caches, the first allocations)
            counter.child().incr()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for _ in range(10_000):
                c = counter.child()
                c.incr()
                del c
            gc.collect()
            counter.incr()  # the last RELEASEs
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        assert grown < 1 << 20, f"the client grew by {grown} bytes"
        assert oc.held == 0
        served.eventually(lambda: served.server.objects.tables.objects == 0)
        assert served.on_loop(lambda: served.server.objects.tables.bytes) == 0


def test_close_ends_the_session_at_once(served: Served) -> None:
    oc = ObjectClient(served.url, timeout=timeout(10))
    kids = [resolve(oc.lookup("counter").child()) for _ in range(10)]
    assert served.exports() == 10 and served.sessions() == 1
    oc.close()
    served.eventually(lambda: not served.server.objects.sessions)
    assert served.exports() == 0
    del kids


def test_instance_modes(served: Served) -> None:
    with (
        ObjectClient(served.url, timeout=timeout(10)) as a,
        ObjectClient(served.url, timeout=timeout(10)) as b,
    ):
        assert [a.lookup("percall").incr() for _ in range(3)] == [1, 1, 1]
        assert [a.lookup("session").incr() for _ in range(3)] == [1, 2, 3]
        assert b.lookup("session").incr() == 1  # a session of its own
        assert a.lookup("counter").incr() == 1 and b.lookup("counter").incr() == 2  # shared


def test_errors_and_deadlines(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        with pytest.raises(RemoteError) as err:
            counter.fail()
        assert err.value.code == ErrorCode.APPLICATION_ERROR
        assert "failed on purpose" in str(err.value)
        with pytest.raises(RemoteError) as err:
            counter.incr("not a number")
        assert err.value.code == ErrorCode.BAD_ARGUMENTS
        with pytest.raises(RemoteError) as err:
            oc.lookup("nobody").incr()
        assert err.value.code == ErrorCode.UNKNOWN_OBJECT
        with pytest.raises(CallTimeout):
            oc.call(counter._target, "slow", [30], timeout=0.3)
        assert counter.incr() == 1  # the connection serves on


def test_a_reconnect_within_the_lease_keeps_the_objects(served: Served) -> None:
    upstream = ("127.0.0.1", served.server.endpoint("tcp").port)
    proxy = served.run(TCPFaultProxy(upstream).start())
    try:
        with ObjectClient(f"tcp://127.0.0.1:{proxy.port}", timeout=timeout(10)) as oc:
            c2 = oc.lookup("counter").child()
            assert c2.incr() == 1
            served.run(proxy.reset_and_wait())
            served.eventually(
                lambda: (
                    served.server.objects.sessions
                    and all(s.peer is None for s in served.server.objects.sessions.values())
                )
            )
            assert c2.incr() == 2  # the same object: the session was re-attached
    finally:
        served.run(proxy.close())


def test_after_the_lease_a_session_is_gone() -> None:
    with serving(lease=1.0) as served:
        upstream = ("127.0.0.1", served.server.endpoint("tcp").port)
        proxy = served.run(TCPFaultProxy(upstream).start())
        try:
            with ObjectClient(f"tcp://127.0.0.1:{proxy.port}", timeout=timeout(10)) as oc:
                c2 = oc.lookup("counter").child()
                assert c2.incr() == 1
                oc._stop.set()  # away longer than the lease: not even its keeper renews
                oc._keeper.join(timeout(10))
                served.run(proxy.reset_and_wait())
                served.eventually(lambda: not served.server.objects.sessions)  # lease ran out
                assert served.exports() == 0
                with pytest.raises(SessionExpired):
                    c2.incr()
                assert oc.lookup("counter").incr() >= 1  # a new session: names work again
        finally:
            served.run(proxy.close())


_KILLED_CLIENT = textwrap.dedent(
    """
    import sys
    from sockstack.objects import ObjectClient
    oc = ObjectClient(sys.argv[1], timeout=10)
    from sockstack.objects import resolve
    kids = [resolve(oc.lookup("counter").child()) for _ in range(100)]
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def test_a_killed_clients_objects_are_freed_within_the_lease() -> None:
    with serving(lease=1.0) as served:
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_CLIENT, served.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            assert served.exports() == 100
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout(10))
            served.eventually(lambda: served.server.objects.tables.objects == 0, seconds=10)
            assert served.sessions() == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout(10))
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


async def test_asyncio_proxies() -> None:
    with serving() as served:
        async with AsyncObjectClient(served.url, timeout=timeout(10)) as oc:
            counter = oc.lookup("counter")
            assert await counter.incr(5) == 5
            c2 = await counter.child()
            assert isinstance(c2, AsyncProxy)
            assert await c2.incr() == 1 and await counter.value == 5
            kept = await counter.keep()
            assert await counter.same(kept) is True
            await oc.release(kept)
            with pytest.raises(ValueError):
                await kept.incr()
            with pytest.raises(RemoteError) as err:
                await counter.fail()
            assert err.value.code == ErrorCode.APPLICATION_ERROR
            assert oc.held == 1  # c2
        served.eventually(lambda: not served.server.objects.sessions)
        proxy = await alookup(f"{served.url}/counter", timeout=timeout(10))
        async with proxy as counter:
            assert await counter.incr() == 6
        served.eventually(lambda: not served.server.objects.sessions)


def test_an_idle_client_keeps_its_session_across_a_drop() -> None:
    """No call after the drop: the client's keeper re-attaches within the lease (3 s here; it
    renews every lease/3), so the session never expires."""
    with serving(lease=3.0) as served:
        upstream = ("127.0.0.1", served.server.endpoint("tcp").port)
        proxy = served.run(TCPFaultProxy(upstream).start())
        try:
            with ObjectClient(f"tcp://127.0.0.1:{proxy.port}", timeout=timeout(10)) as oc:
                c2 = oc.lookup("counter").child()
                assert c2.incr() == 1
                (session,) = served.on_loop(lambda: list(served.server.objects.sessions.values()))
                served.run(proxy.reset_and_wait())
                served.eventually(lambda: session.peer is None)  # the server saw the drop
                served.eventually(lambda: session.peer is not None)  # re-attached, no call
                assert served.on_loop(lambda: list(served.server.objects.sessions.values())) == [
                    session
                ]
                assert c2.incr() == 2
        finally:
            served.run(proxy.close())


def test_a_chain_of_calls_on_promises(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        p = counter.child()
        assert isinstance(p, Promise)  # at once: child() returns a remote object
        assert p.incr() == 1 and p.incr(2) == 3  # calls on the promise
        assert counter.child().child().child().incr(5) == 5  # a chain
        c = resolve(p)
        assert isinstance(c, Proxy) and not isinstance(c, Promise) and c.incr() == 4
        assert resolve(c) is c and resolve(3) == 3
        assert counter.same(counter.keep()) is True  # a promise as an argument: its object
        assert p.value == 4  # a property, through the promise


def test_a_pipelined_call_goes_out_before_its_question_is_answered(served: Served) -> None:
    """gated_child() blocks on the server until the gate opens; the call made on its promise
    has reached the server (it waits there for the answer) before that."""
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        GATES["pipe"] = gate = threading.Event()
        box: dict[str, Any] = {}

        def chain() -> None:
            box["value"] = counter.gated_child("pipe").incr(7)

        t = threading.Thread(target=chain)
        t.start()
        try:

            def waiting() -> bool:
                peers = list(served.server._streams)
                return any(
                    q.waiters
                    for peer in peers
                    for q in peer.state.get("objects.questions", {}).values()
                )

            served.eventually(waiting)  # incr() is at the server, its question unanswered
        finally:
            gate.set()
            t.join(timeout(20))
        assert box["value"] == 7


def test_a_failed_call_fails_the_calls_on_its_promise(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        p = counter.bad_child()
        with pytest.raises(RemoteError) as err:
            p.incr()
        assert err.value.code == ErrorCode.APPLICATION_ERROR and "no child today" in str(err.value)
        with pytest.raises(RemoteError) as err:
            resolve(p)
        assert "no child today" in str(err.value)
        with pytest.raises(RemoteError) as err:  # a question this connection never asked
            oc.call(AnswerTarget(424242), "incr")
        assert err.value.code == ErrorCode.BAD_TARGET
        assert counter.incr() == 1


def test_chains_leave_nothing_behind(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(30)) as oc:
        counter = oc.lookup("counter")
        for _ in range(2_000):
            assert counter.child().child().incr() == 1
        gc.collect()
        counter.incr()  # RELEASE and FINISH go with it
        served.eventually(lambda: served.server.objects.tables.objects == 0)

        def kept() -> int:
            return sum(len(p.state.get("objects.questions", {})) for p in served.server._streams)

        served.eventually(lambda: kept() == 0)
        assert oc.held == 0


def test_an_interface_never_registered_is_described_when_it_first_comes(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        leaf = oc.lookup("counter").leaf(3)
        assert isinstance(leaf, Proxy) and "Leaf" in oc.ifaces
        assert leaf.size == 3  # a property: known as one
        nxt = leaf.bigger()
        assert isinstance(nxt, Promise) and nxt.size == 4  # its ref result pipelines


def test_the_server_calls_a_clients_object_back(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        listener = Listener()
        assert counter.notify(listener, 4) == 8  # from a worker thread: blocks
        assert counter.notify_async(listener, 5) == 10  # from the loop: awaited
        assert listener.seen == [4, 5]
        assert counter.same(listener) is False  # it crosses as a reference, not a copy


def test_a_callback_may_call_the_server_again(served: Served) -> None:
    """The client's thread leads (reads) while it waits for notify(); the callback runs on a
    callback thread, and its own call to the server is answered through that reader."""
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        listener = Listener(counter)
        assert counter.notify(listener, 3) == 300  # incr(3) inside the callback
        assert counter.notify_async(listener, 2) == 500
        assert counter.incr() == 6


def test_a_callback_reaches_an_idle_client(served: Served) -> None:
    """No call of the client is in flight when the server calls back: its keeper reads."""
    LATER.clear()
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        listener = Listener()
        counter.later(listener)
        served.eventually(lambda: LATER == [42])
        assert listener.seen == [21]


def test_callback_timeouts_and_errors(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        listener = Listener()
        GATES["sleep"] = gate = threading.Event()
        try:
            assert counter.notify_slow(listener) == "timed out"
        finally:
            gate.set()
        assert counter.notify_error(listener) == (
            f"{int(ErrorCode.APPLICATION_ERROR)} ServiceError: the client's own error"
        )
        assert counter.incr() == 1  # the connection serves on


async def test_asyncio_client_objects_are_called_back() -> None:
    with serving() as served:
        async with AsyncObjectClient(served.url, timeout=timeout(10)) as oc:
            counter = oc.lookup("counter")
            listener = AsyncListener(counter)
            # an async def callback calling the server again, from both kinds of server method
            assert await counter.notify(listener, 3) == 300
            assert await counter.notify_async(listener, 2) == 500
            LATER.clear()
            await counter.later(listener)  # called back while this client is idle
            # (waited for in a thread: this loop must run to answer the callback)
            await asyncio.to_thread(served.eventually, lambda: LATER == [2600])


def test_a_batch_is_one_write_and_each_call_answers_on_its_own(served: Served) -> None:
    with ObjectClient(served.url, timeout=timeout(10)) as oc:
        counter = oc.lookup("counter")
        assert counter.incr(0) == 0  # attached, nothing left to release
        conn = oc._conn()
        real = conn.sock
        writes: list[bytes] = []

        class Tap:  # counts the writes of the batch
            def sendall(self, data: bytes, *a: Any) -> None:
                writes.append(bytes(data))
                real.sendall(data, *a)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        conn.sock = Tap()  # type: ignore[assignment]
        try:
            with batch(counter) as b:
                first, failed, second, kid = b.incr(1), b.fail(), b.incr(2), b.pair()
                with pytest.raises(RuntimeError):
                    first.result()  # not sent before the block ends
        finally:
            conn.sock = real
        assert len(writes) == 1 and writes[0].count(b"SK\x01\x20") == 4  # four CALLs, one write
        assert first.result() == 1 and second.result() == 3  # the failure did not stop it
        with pytest.raises(RemoteError) as err:
            failed.result()
        assert err.value.code == ErrorCode.APPLICATION_ERROR
        assert isinstance(kid.result()[0], Proxy)


async def test_asyncio_proxies_pipeline_too() -> None:
    with serving() as served:
        async with AsyncObjectClient(served.url, timeout=timeout(10)) as oc:
            counter = oc.lookup("counter")
            p = counter.child()
            assert isinstance(p, AsyncPromise)
            assert await p.incr(2) == 2 and await p.value == 2
            assert await counter.child().child().child().incr(5) == 5  # one round trip
            c = await p
            assert isinstance(c, AsyncProxy) and await c.incr() == 3
            GATES["apipe"] = gate = threading.Event()
            task = asyncio.get_running_loop().create_task(counter.gated_child("apipe").incr(7))

            def waiting() -> bool:
                return any(
                    q.waiters
                    for peer in list(served.server._streams)
                    for q in peer.state.get("objects.questions", {}).values()
                )

            try:  # incr() reached the server while gated_child() still runs
                await asyncio.to_thread(served.eventually, waiting)
            finally:
                gate.set()
            assert await asyncio.wait_for(task, timeout(10)) == 7
            with pytest.raises(RemoteError) as err:
                await counter.bad_child().incr()
            assert "no child today" in str(err.value)
        await asyncio.to_thread(
            served.eventually, lambda: served.server.objects.tables.objects == 0
        )
