"""Tests written from `make mutate`'s survivors: each kills mutants the rest of tests/protocol
and tests/rpc let through in the call core, the registry and the dispatcher (docs: README,
Development)."""

from __future__ import annotations

import threading

import pytest

from sockstack.errors import CallTimeout, ErrorCode, RemoteError, RemoteProtocolError
from sockstack.host.dispatch import Dispatcher, make_handler
from sockstack.protocol.calls import Calls, OneCall, remote_error
from sockstack.protocol.events import Error, Pong, Request, Response, Role
from sockstack.protocol.frames import Frame
from sockstack.protocol.messages import CORE_MESSAGES, decode_message
from sockstack.protocol.registry import MessageSet, MessageSpec, Registry


# ---- calls
def test_remote_error_fields() -> None:
    e = remote_error(Error(1, 2001, "BAD_ARGUMENTS", "nope"))
    assert (e.type, e.message, e.code) == ("BAD_ARGUMENTS", "nope", 2001)
    assert (
        remote_error(Error(1, 2002, "", "x")).type
        == ErrorCode.describe(2002)
        == "APPLICATION_ERROR (2002)"
    )


def test_pending_call_fields_and_expired() -> None:
    calls: Calls[str] = Calls()
    c = calls.start("m", 3.0, 0.0, "w")
    assert (c.method, c.timeout, c.waiter, c.deadline) == ("m", 3.0, "w", 3.0)
    (gone,) = calls.expire(3.0)  # deadline == now: expired
    exc = gone.expired("late")
    assert isinstance(exc, CallTimeout) and (exc.method, exc.timeout) == ("m", 3.0)
    assert str(exc) == "call 'm' got no answer within 3 s (late)"
    assert str(gone.expired()) == "call 'm' got no answer within 3 s"


def test_calls_first_id_max_is_allowed() -> None:
    assert Calls(first_id=0xFFFFFFFF).new_id() == 0xFFFFFFFF


def test_answers_true_for_own_answer() -> None:
    calls: Calls[None] = Calls()
    c = calls.start("m", 1.0, 0.0, None)
    assert calls.answers(Response(c.request_id, 1), c.request_id) and len(calls) == 0


def test_settle_error_and_pong() -> None:
    calls: Calls[None] = Calls()
    a = calls.start("a", 1.0, 0.0, None)
    ok, exc = calls.settle([Error(a.request_id, 2002, "X", "boom")], a.request_id)
    assert not ok and isinstance(exc, RemoteError)
    b = calls.start("b", 1.0, 0.0, None)
    assert calls.settle([Pong(b.request_id, b"")], b.request_id) == (True, None)


def test_forget_unknown_and_keeps_other_deadlines() -> None:
    calls: Calls[None] = Calls()
    assert calls.forget(12345) is None
    a = calls.start("a", 1.0, 0.0, None)
    b = calls.start("b", 2.0, 0.0, None)
    calls.forget(a.request_id)
    assert calls.expire(5.0) == [b]


def test_expire_skips_answered_entries() -> None:
    calls: Calls[None] = Calls()
    a = calls.start("a", 1.0, 0.0, None)
    b = calls.start("b", 2.0, 0.0, None)
    calls.take(Response(a.request_id))
    assert calls.expire(5.0) == [b]


def test_onecall_defaults_and_end() -> None:
    one = OneCall()
    assert not one.answers(Response(1, "x"))  # nothing waits yet
    assert one.begin() == 1
    one.end()
    assert not one.answers(Response(1, "late"))
    assert OneCall(first_id=1).begin() == 1
    rid = one.begin()
    assert one.settle([Response(rid, "r")]) == (True, "r")


# ---- registry
def _spec(t: int, name: str = "X") -> MessageSpec:
    return MessageSpec(t, name, lambda f: None, frozenset({Role.CLIENT}))  # type: ignore[arg-type,return-value]


def test_messageset_bounds() -> None:
    MessageSet("s", 0x50, 0x5F, (_spec(0x50), _spec(0x5F)))
    with pytest.raises(ValueError):
        MessageSet("s", 0x50, 0x5F, (_spec(0x60),))


def test_registry_not_frozen_by_default_and_frozen_when_asked() -> None:
    r = Registry([CORE_MESSAGES])
    r.add(MessageSet("p", 0x50, 0x5F, (_spec(0x50),)))
    with pytest.raises(ValueError):
        Registry([CORE_MESSAGES], frozen=True).add(MessageSet("p", 0x50, 0x5F, ()))


def test_registry_refuses_touching_ranges() -> None:
    r = Registry([MessageSet("a", 0x50, 0x5F, ())])
    with pytest.raises(ValueError):
        r.add(MessageSet("b", 0x5F, 0x6F, ()))
    with pytest.raises(ValueError):
        r.add(MessageSet("c", 0x40, 0x50, ()))


def test_registry_name() -> None:
    r = Registry([CORE_MESSAGES])
    assert r.name(0x01) == "HELLO" and r.name(0x7F) == "0x7f"


def test_unknown_type_code() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(Frame(0x7F))
    assert info.value.code == ErrorCode.UNKNOWN_TYPE


# ---- dispatch
def test_handler_with_unresolvable_annotation() -> None:
    def f(a: Undefined) -> None: ...  # noqa: F821

    h = make_handler("f", f, inline=True)
    assert h.check_arguments([1], {}) is None and h.check_arguments([], {}) is not None


def test_handler_var_keyword_shape() -> None:
    def f(a, **kw): ...

    h = make_handler("f", f, inline=True)
    assert h.accepts_kwargs and not h.simple


def test_dispatcher_add() -> None:
    d = Dispatcher()
    h = make_handler("f", lambda: 1, inline=True)
    d.add({"f": h}, "one")
    assert d.dispatch(Request(1, "f", [], {}, 1)) == (True, 1)
    with pytest.raises(ValueError, match="one2: method 'f' is already served"):
        d.add({"f": h}, "one2")


def test_shutdown_does_not_wait_and_cancels_queued() -> None:
    from sockstack.rpc.context import CallAborted

    release = threading.Event()
    started = threading.Event()
    d = Dispatcher(max_workers=1)

    def hold() -> None:
        started.set()
        release.wait(5)

    # As the host runs methods: in one of max_workers slots (the pool has as many threads
    # more, for workers that wait for callbacks with their slot given back).
    f1 = d.executor.submit(d._in_slot, hold)
    assert started.wait(5)
    f2 = d.executor.submit(d._in_slot, lambda: None)  # a thread waits for the slot
    f3 = d.executor.submit(d._in_slot, lambda: None)  # queued: no thread free
    returned = threading.Event()
    threading.Thread(target=lambda: (d.shutdown(), returned.set()), daemon=True).start()
    assert returned.wait(5)  # it did not wait for the running call (wait=False)...
    assert not f1.done()  # ...which is still running
    assert f3.cancelled()  # the queued one was cancelled (cancel_futures=True)
    release.set()
    f1.result(5)
    with pytest.raises(CallAborted):  # and the one waiting for a slot did not run
        f2.result(5)
