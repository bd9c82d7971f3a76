"""Review of remote objects (issue 13) as an attacker and a demanding user: each test shows one
problem found, live over loopback TCP, and is marked ``xfail(strict=True)`` until it is fixed
(the fix removes the mark). The report that goes with them names the file and line of each."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import secrets
import threading
import tracemalloc
import typing
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from sockstack import CallTimeout, RemoteError, ServiceError
from sockstack.errors import ConnectError, ConnectionLost, ErrorCode
from sockstack.host.server import ServerLimits
from sockstack.objects import (
    AsyncObjectClient,
    ObjectClient,
    ObjectLimits,
    ObjectServer,
    expose,
    release,
    resolve,
)
from sockstack.objects import client as client_module
from sockstack.objects.messages import (
    AnswerTarget,
    NameTarget,
    encode_call,
    encode_release,
)
from sockstack.objects.refs import FORM_HOME, FORM_PROMISE, FORM_SENDER, Ref
from sockstack.sync.client import Ticket
from tests.conftest import timeout
from tests.integration.test_fork import forked
from tests.objects.support import Running, quick_limits, running

GATES: dict[str, threading.Event] = {}
ENTERED: dict[str, threading.Event] = {}
BLOBS: weakref.WeakSet[Any] = weakref.WeakSet()
MARKS: list[str] = []


def gate(key: str) -> threading.Event:
    return GATES.setdefault(key, threading.Event())


def entered(key: str) -> threading.Event:
    return ENTERED.setdefault(key, threading.Event())


@expose
class Thing:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n

    def child(self) -> Thing:
        return Thing()

    def gated_child(self, key: str) -> Thing:
        """Blocks a worker until the test opens the gate ``key`` (bounded)."""
        entered(key).set()
        gate(key).wait(timeout(20))
        return Thing()

    def blob(self) -> Blob:
        return Blob()

    def same(self, other: Any) -> bool:
        return isinstance(other, Thing)

    def give(self, x: Any) -> Any:
        return x

    def relay(self, listener: Any, x: str) -> Any:
        """A worker thread calling the client's object back (blocks for its answer)."""
        return listener.echo(x)

    def take(self, listener: Any) -> str:
        return "taken"

    def sink(self, data: bytes) -> int:
        return len(data)

    @expose(oneway=True)
    def fire(self) -> None:
        pass

    @expose(inline=True)
    def mark(self, tag: str) -> str:
        MARKS.append(tag)
        return tag


@expose
class Blob:
    """An object holding 1 MiB (shallow size small: what the tables count of it is 200 + ~56)."""

    def __init__(self) -> None:
        self.data = bytearray(1 << 20)
        BLOBS.add(self)

    def size(self) -> int:
        return len(self.data)


@expose
class Listener:
    def echo(self, x: str) -> str:
        return x


class Served(Running):
    def peers(self) -> list[Any]:
        return list(self.on_loop(lambda: list(self.server.objects._peers.values())))


@contextlib.contextmanager
def serving(
    setup: Callable[[ObjectServer], None] | None = None,
    objects: ObjectLimits | None = None,
    limits: ServerLimits | None = None,
) -> Iterator[Served]:
    def make() -> ObjectServer:
        srv = ObjectServer(tcp=["127.0.0.1:0"], objects=objects, limits=limits or quick_limits())
        srv.register("thing", Thing())
        if setup is not None:
            setup(srv)
        return srv

    try:
        with running(make) as r:
            try:
                yield Served(r.server, r.loop)
            finally:
                for event in GATES.values():
                    event.set()
    finally:
        GATES.clear()
        ENTERED.clear()


def keep_call(oc: ObjectClient, method: str, args: list[Any] | None = None) -> Ticket:
    """A KEEP CALL of ``thing.method`` sent now (its answer waited for later)."""
    return oc._conn().start_exchange(
        lambda rid: encode_call(rid, NameTarget("thing"), method, args or [], keep=True),
        method,
        timeout(10),
    )


def raw_call(oc: ObjectClient, target: Any, method: str, args: list[Any]) -> Any:
    _, result = oc._conn().exchange(
        lambda rid: encode_call(rid, target, method, args), method, timeout(10)
    )
    return result


# ---------------------------------------------------------------------------- 1. wrong objects


@expose
class Vault:
    def __init__(self) -> None:
        self.paid: list[int] = []

    def withdraw(self, amount: int) -> int:
        self.paid.append(amount)
        return amount


class CheckedVault(Vault):
    """Not decorated itself: a subclass that adds a check to an exposed method."""

    def withdraw(self, amount: int) -> int:
        if amount > 10:
            raise ServiceError("over the limit")
        return super().withdraw(amount)


def test_an_undecorated_subclass_runs_its_own_override() -> None:
    with (
        serving(lambda s: s.register("vault", CheckedVault())) as served,
        ObjectClient(served.url, timeout=timeout(10)) as oc,
    ):
        with pytest.raises(RemoteError):
            oc.lookup("vault").withdraw(1_000_000)  # the override refuses it


@expose
class First:
    def __init__(self) -> None:
        self.first = "first"

    def who(self) -> str:
        return self.first


@expose(name="First")
class Second:
    def __init__(self) -> None:
        self.second = "second"

    def who(self) -> str:
        return self.second


def test_a_name_registered_again_is_not_served_by_the_old_instance() -> None:
    with (
        serving(lambda s: s.register("svc", First)) as served,
        ObjectClient(served.url, timeout=timeout(10)) as oc,
    ):
        svc = oc.lookup("svc")
        assert svc.who() == "first"
        served.on_loop(lambda: served.server.register("svc", Second))
        assert svc.who() == "second"


# ---------------------------------------------------------------------------- 3. exposure


class Audit:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, *args: Any) -> str:
        self.calls.append(args)
        return "ran"


@expose
class Account:
    audit = Audit()  # a plain class attribute (callable): "a plain attribute never is" exposed

    def balance(self) -> int:
        return 1


def test_a_callable_class_attribute_is_not_exposed() -> None:
    with (
        serving(lambda s: s.register("account", Account())) as served,
        ObjectClient(served.url, timeout=timeout(10)) as oc,
    ):
        target = oc.lookup("account")._target
        with pytest.raises(RemoteError) as err:
            oc.call(target, "audit", ["anything"])
        assert err.value.code == ErrorCode.UNKNOWN_METHOD
        assert Account.audit.calls == []


@expose
class Store(collections.UserDict[str, int]):
    """Its own surface is ``size``; its base is the standard library's."""

    def size(self) -> int:
        return len(self)


# ---------------------------------------------------------------------------- 5. protocol


def test_a_call_without_oneway_to_a_oneway_method_is_answered() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        target = oc.lookup("thing")._target
        try:
            oc.call(target, "fire", timeout=timeout(2))  # not ONEWAY: it asks for an answer
        except RemoteError:
            pass  # an ERROR is an answer too; CallTimeout is not


def test_end_drops_the_sessions_kept_answers() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        ticket = keep_call(oc, "child")
        ref = ticket.result()
        assert type(ref) is Ref
        conn = oc._conn()
        conn.send_frame(encode_release(end=True), "RELEASE", timeout(10))
        oc.client.call("objects.attach", None, timeout=timeout(10))  # a new session here
        with pytest.raises(RemoteError) as err:
            raw_call(oc, AnswerTarget(ticket.request_id), "incr", [])
        assert err.value.code == ErrorCode.BAD_TARGET


def test_a_pipelined_calls_deadline_counts_from_its_arrival() -> None:
    MARKS.clear()
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        conn = oc._conn()
        ticket = keep_call(oc, "gated_child", ["late"])
        assert entered("late").wait(timeout(10))
        waiter = conn.start_exchange(
            lambda rid: encode_call(
                rid, AnswerTarget(ticket.request_id), "mark", ["late"], budget_ms=200
            ),
            "mark",
            timeout(0.5),
        )
        with pytest.raises(CallTimeout):
            waiter.result()  # the caller gave up (its deadline passed too)
        gate("late").set()
        ticket.result()  # the question's answer: its waiting calls ran before it went out
        assert MARKS == []


def test_a_promise_passed_as_an_argument_is_its_object() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        ticket = keep_call(oc, "child")
        promise = Ref(FORM_PROMISE, question=ticket.request_id, path=())
        assert raw_call(oc, NameTarget("thing"), "same", [promise]) is True
        ticket.result()


def test_a_path_to_the_callers_own_object_is_promise_elsewhere() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        mine = Ref(FORM_SENDER, id=secrets.token_bytes(16), iface="Listener")  # a callback
        ticket = keep_call(oc, "give", [mine])
        with pytest.raises(RemoteError) as err:
            raw_call(oc, AnswerTarget(ticket.request_id), "echo", ["x"])
        assert err.value.code == ErrorCode.PROMISE_ELSEWHERE


def test_an_unresolvable_argument_is_bad_arguments() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        for ref in (Ref(FORM_HOME, id=secrets.token_bytes(16)), Ref(FORM_HOME, name="nope")):
            with pytest.raises(RemoteError) as err:
                raw_call(oc, NameTarget("thing"), "same", [ref])
            assert err.value.code == ErrorCode.BAD_ARGUMENTS


def test_deeply_nested_arguments_get_an_error_with_a_code() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        deep: Any = [Ref(FORM_HOME, name="thing")]
        for _ in range(1000):
            deep = [deep]
        with pytest.raises(RemoteError) as err:
            raw_call(oc, NameTarget("thing"), "same", [deep])
        assert err.value.code in (ErrorCode.BAD_ARGUMENTS, ErrorCode.DECODE_ERROR)
        assert oc.lookup("thing").incr() == 1  # the session goes on


# ---------------------------------------------------------------------------- 2. resources


def test_an_answer_after_end_does_not_leak_into_the_server_totals() -> None:
    with serving() as served:
        oc = ObjectClient(served.url, timeout=timeout(10))
        try:
            ticket = oc._conn().start_exchange(
                lambda rid: encode_call(rid, NameTarget("thing"), "gated_child", ["g"]),
                "gated_child",
                timeout(10),
            )
            assert entered("g").wait(timeout(10))
            oc._conn().send_frame(encode_release(end=True), "RELEASE", timeout(10))
            served.eventually(lambda: not served.server.objects.sessions)
            gate("g").set()
            with pytest.raises(RemoteError) as err:  # nothing is exported to an ended session
                ticket.result()
            assert err.value.code == ErrorCode.TOO_MANY_OBJECTS
        finally:
            oc.close()
        served.eventually(lambda: not served.server.objects._peers)
        tables = served.server.objects.tables
        assert served.on_loop(lambda: (tables.objects, tables.bytes)) == (0, 0)


def test_objects_held_by_kept_answers_are_counted() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for _ in range(8):
                ref = keep_call(oc, "blob").result()
                assert type(ref) is Ref and ref.id is not None
                oc._conn().send_frame(encode_release([(ref.id, 1)]), "RELEASE", timeout(10))
            oc.lookup("thing").incr()  # after the RELEASEs, on the same stream
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        tables = served.server.objects.tables
        counted = served.on_loop(lambda: tables.bytes)
        held = len(BLOBS)
        # 8 MiB held for this client while the bounds count nothing of it:
        assert held == 0 or counted >= grown // 2, (held, grown, counted)


def test_waiting_pipelined_calls_are_bounded_in_bytes() -> None:
    limit = 1 << 20
    limits = ServerLimits(
        drain_timeout=timeout(2), close_timeout=timeout(2), max_in_flight_bytes=limit
    )
    with serving(limits=limits) as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        ticket = keep_call(oc, "gated_child", ["w"])
        assert entered("w").wait(timeout(10))
        big = b"x" * (256 << 10)
        tickets: list[Ticket] = []
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()

            def send() -> None:
                conn = oc._conn()
                for _ in range(16):  # 4 MiB of arguments, 4x the connection's byte bound
                    tickets.append(
                        conn.start_exchange(
                            lambda rid: encode_call(
                                rid, AnswerTarget(ticket.request_id), "sink", [big]
                            ),
                            "sink",
                            timeout(20),
                        )
                    )

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            sender.join(timeout(20))
            peer = served.peers()[0]
            refused: list[int] = []

            def read() -> None:  # the refusals come at once (the held calls, once answered)
                for t in reversed(tickets):
                    try:
                        t.result()
                    except RemoteError as exc:
                        if exc.code == ErrorCode.OVERLOADED:
                            refused.append(t.request_id)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()

            def settled() -> bool:  # every call held or refused (OVERLOADED)
                waiting = int(peer.state.get("objects.waiting", 0))
                return len(refused) + waiting == 16

            served.eventually(settled)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        gate("w").set()
        ticket.result()
        reader.join(timeout(20))
        assert grown < 2 * limit, f"the server holds {grown} bytes of waiting calls"
        assert refused, "no call was refused past the byte bound"


@expose
class Scratch:
    """A session-mode class whose instance holds 64 KiB."""

    def __init__(self) -> None:
        self.buf = bytearray(64 << 10)

    def size(self) -> int:
        return len(self.buf)


def test_session_instances_are_counted() -> None:
    with serving(lambda s: s.register("scratch", Scratch)) as served:
        for _ in range(4):  # clients that vanish: each session kept for the lease
            oc = ObjectClient(served.url, timeout=timeout(10))
            assert oc.lookup("scratch").size() == 64 << 10
            oc.client.close()  # no RELEASE END (a killed client)
            oc.close()
        served.eventually(lambda: not served.server.objects._peers)
        objects = served.server.objects
        assert served.on_loop(lambda: len(objects.sessions)) == 4
        assert served.on_loop(lambda: objects.tables.objects) >= 4


# ---------------------------------------------------------------------------- 2. client side


def test_callback_objects_the_server_dropped_are_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "MAX_EXPORTS", 10)
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        thing = oc.lookup("thing")
        for i in range(20):  # each call passes a new listener; the server keeps none
            assert thing.relay(Listener(), str(i)) == str(i)


def test_a_release_after_a_drop_reaches_the_session() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        thing = oc.lookup("thing")
        kid = resolve(thing.child())
        objects = served.server.objects
        assert served.on_loop(lambda: objects.tables.objects) == 1
        served.on_loop(lambda: [cast(Any, p).transport.abort() for p in objects._peers.values()])
        with pytest.raises(ConnectionLost):  # the client sees the drop (its keeper would too)
            oc._conn().read_until(lambda: False, timeout(10), "the drop")
        release(kid)
        assert thing.incr() == 1  # re-attached within the lease: the session resumed
        assert served.on_loop(lambda: objects.tables.objects) == 0


@expose
class Stalling:
    """A client's object whose method does not answer until the test lets it."""

    def echo(self, x: str) -> str:
        gate("stall").wait(timeout(20))
        return x


def test_a_client_that_never_answers_callbacks_does_not_take_every_worker() -> None:
    limits = ServerLimits(drain_timeout=timeout(2), close_timeout=timeout(2), max_workers=4)
    with (
        serving(limits=limits) as served,
        ObjectClient(served.url, timeout=timeout(30)) as bad,
        ObjectClient(served.url, timeout=timeout(10)) as good,
    ):
        thing = bad.lookup("thing")
        stalling = Stalling()
        callers = [
            threading.Thread(target=thing.relay, args=(stalling, str(i)), daemon=True)
            for i in range(4)
        ]
        for t in callers:
            t.start()
        peer = served.peers()[0]
        served.eventually(lambda: len(peer.state.get("objects.out", ())) == 4)
        try:
            assert good.call(NameTarget("thing"), "incr", timeout=timeout(3)) >= 1
        finally:
            gate("stall").set()
            for t in callers:
                t.join(timeout(20))


async def test_an_asyncio_release_while_disconnected_is_not_lost() -> None:
    with serving() as served:
        async with AsyncObjectClient(served.url, timeout=timeout(10)) as oc:
            thing = oc.lookup("thing")
            kid = await thing.child()
            objects = served.server.objects
            assert served.on_loop(lambda: objects.tables.objects) == 1
            served.on_loop(
                lambda: [cast(Any, p).transport.abort() for p in objects._peers.values()]
            )
            channel = oc._channel()
            async with asyncio.timeout(timeout(10)):
                while channel.stream is oc._attached:  # until the client sees the drop
                    await asyncio.sleep(0.01)
            await oc.release(kid)
            assert await thing.incr() == 1  # re-attached: the session resumed
            assert served.on_loop(lambda: objects.tables.objects) == 0


# ---------------------------------------------------------------------------- 4. concurrency


class _RacingOut(dict[int, Any]):
    """The server's table of callbacks in flight, made to interleave two worker threads as
    they may: both look for a free id before either takes one, and both take theirs before
    either goes on (barriers; bounded, and harmless once ids are taken under a lock: then a
    barrier times out and the calls go on one after the other). ``overwritten``: ids whose
    waiting call was replaced by another's."""

    def __init__(self) -> None:
        super().__init__()
        self.looked = threading.Barrier(2, timeout=timeout(2))
        self.taken = threading.Barrier(2, timeout=timeout(2))
        self.lookups = 0
        self.sets = 0
        self.overwritten: list[int] = []

    def __contains__(self, key: object) -> bool:
        found = super().__contains__(key)
        self.lookups += 1
        if self.lookups <= 2:
            with contextlib.suppress(threading.BrokenBarrierError):
                self.looked.wait()
        return found

    def __setitem__(self, key: int, value: Any) -> None:
        self.sets += 1
        if self.sets <= 2:
            with contextlib.suppress(threading.BrokenBarrierError):
                self.taken.wait()
        if hasattr(super().get(key), "done"):  # another call's future, waiting there
            self.overwritten.append(key)
        super().__setitem__(key, value)


def test_concurrent_callbacks_get_their_own_answers() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        thing = oc.lookup("thing")
        listener = Listener()
        assert thing.relay(listener, "warm") == "warm"
        objects = served.server.objects
        objects.callback_timeout = timeout(3)
        peer = served.peers()[0]
        out = _RacingOut()
        served.on_loop(lambda: peer.state.__setitem__("objects.out", out))
        results: dict[str, Any] = {}

        def relay(x: str) -> None:
            try:
                results[x] = thing.relay(listener, x)
            except Exception as exc:  # what the caller sees instead of its answer
                results[x] = exc

        threads = [threading.Thread(target=relay, args=(x,)) for x in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout(20))
        assert out.overwritten == []  # two calls in flight under one id: answers cross
        assert results == {"a": "a", "b": "b"}


def test_a_refused_keep_call_does_not_settle_the_question_it_collides_with() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        conn = oc._conn()
        ticket = keep_call(oc, "gated_child", ["d"])
        assert entered("d").wait(timeout(10))
        q = ticket.request_id
        waiter = conn.start_exchange(
            lambda rid: encode_call(rid, AnswerTarget(q), "incr", []), "incr", timeout(10)
        )
        # A second KEEP CALL under the same id (a buggy or hostile client): it is refused
        # (and its ERROR names id q: the first ticket takes it; that is the sender's doing).
        dup = encode_call(q, NameTarget("thing"), "incr", [], keep=True)
        conn.send_frame(dup, "dup", timeout(10))
        gate("d").set()
        with contextlib.suppress(RemoteError):
            ticket.result()
        assert waiter.result() == 1  # it waited for question q's own answer


# ---------------------------------------------------------------------------- CPU on the loop


def test_describe_does_not_redo_its_work_per_name(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = typing.get_type_hints

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        monkeypatch.setattr(typing, "get_type_hints", counting)
        described = oc.client.call("objects.describe", ["Thing"] * 1024, timeout=timeout(10))
        assert "incr" in described["Thing"]["methods"]
    members = len(Thing.__sockstack_exposed__.members)  # type: ignore[attr-defined]
    assert calls <= 2 * members, f"{calls} type-hint evaluations for {members} members"


# ---------------------------------------------------------------------------- fork


def test_a_forked_child_cannot_take_its_parents_session() -> None:
    with serving() as served, ObjectClient(served.url, timeout=timeout(10)) as oc:
        thing = oc.lookup("thing")
        kid = resolve(thing.child())
        assert kid.incr() == 1

        def body() -> str:
            try:
                resolve(thing.child())  # returns an object: a promise (KEEP)
            except ConnectError:
                return "refused"
            return "ran in the parent's session"

        with forked(body) as child:
            assert child.result() == "refused"
        assert kid.incr() == 2  # the parent's session is where it was
