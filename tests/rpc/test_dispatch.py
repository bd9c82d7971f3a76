"""rpc/service.py and rpc/dispatch.py on their own, without sockets: which methods a service
exposes, how each kind runs (inline on the loop, threaded in the pool, async on the loop), that
arguments are checked against the signature before any kind runs, and how failures map to
ERROR codes (docs/PROTOCOL.md §7)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable
from typing import Any

import pytest

from sockstack import ErrorCode, Service, ServiceError, method
from sockstack.host.dispatch import Dispatcher as HostDispatcher
from sockstack.protocol import Request
from sockstack.rpc.pattern import RPC
from sockstack.rpc.service import collect_handlers, make_handler


class Dispatcher(HostDispatcher):
    """The host's dispatcher with one service's methods, as ``RPC(service)`` registers them."""

    def __init__(self, service: object, *, allow_empty: bool = False, **options: Any) -> None:
        rpc = RPC(service, allow_empty=allow_empty)
        super().__init__(rpc.methods(), **options)
        self.service = rpc.service


BAD_ARGUMENTS = int(ErrorCode.BAD_ARGUMENTS)
APPLICATION_ERROR = int(ErrorCode.APPLICATION_ERROR)
UNEXPECTED_ERROR = int(ErrorCode.UNEXPECTED_ERROR)
HIDDEN = "internal error (details are in the server's log)"


class Refused(ServiceError):
    """An error meant for the client, as a service would define it."""


class Kinds(Service):
    """One method of each kind and shape; every run is recorded with the thread it ran in."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []

    def _ran(self, name: str) -> None:
        self.ran.append((name, threading.current_thread().name))

    @method(inline=True)
    def inline_add(self, a: int, b: int) -> int:
        self._ran("inline_add")
        return a + b

    @method(inline=True)
    def inline_default(self, a: int, b: int = 10) -> int:
        self._ran("inline_default")
        return a + b

    @method(inline=True)
    def inline_kw(self, a: int, *, scale: int = 1) -> int:
        self._ran("inline_kw")
        return a * scale

    @method(inline=True)
    def inline_varargs(self, *values: int) -> int:
        self._ran("inline_varargs")
        return sum(values)

    @method
    def threaded_add(self, a: int, b: int) -> int:
        self._ran("threaded_add")
        return a + b

    @method
    def threaded_kw(self, a: int, *, scale: int) -> int:
        self._ran("threaded_kw")
        return a * scale

    @method
    async def async_add(self, a: int, b: int) -> int:
        self._ran("async_add")
        await asyncio.sleep(0)  # a real suspension: the method is a coroutine, not a value
        return a + b

    @method
    async def async_kw(self, a: int, *, scale: int) -> int:
        self._ran("async_kw")
        return a * scale

    @method(name="renamed")
    def original(self) -> str:
        self._ran("renamed")
        return "renamed"

    @method(inline=True)
    def inline_fail(self, error: str) -> None:
        self._ran("inline_fail")
        raise _error(error)

    @method(inline=True)
    def inline_kw_fail(self, error: str, *, extra: int = 0) -> None:
        self._ran("inline_kw_fail")
        raise _error(error)

    @method
    def threaded_fail(self, error: str) -> None:
        self._ran("threaded_fail")
        raise _error(error)

    @method
    async def async_fail(self, error: str) -> None:
        self._ran("async_fail")
        raise _error(error)

    def helper(self) -> str:  # not marked: not callable remotely
        return "no"


def _error(kind: str) -> Exception:
    return {"value": ValueError("the secret detail"), "service": Refused("not allowed")}[kind]


def req(name: str, *args: Any, **kwargs: Any) -> Request:
    return Request(1, name, list(args), kwargs, 1)


async def settle(outcome: Any) -> tuple[bool, Any]:
    """The outcome of a dispatch: at once, or awaited for threaded and async methods."""
    if isinstance(outcome, tuple):
        return outcome
    assert isinstance(outcome, Awaitable)
    result: tuple[bool, Any] = await outcome
    return result


# --------------------------------------------------------------------------- the service


def test_exposed_methods_are_the_marked_ones_by_wire_name() -> None:
    handlers = collect_handlers(Kinds())
    assert set(handlers) == {
        "inline_add",
        "inline_default",
        "inline_kw",
        "inline_varargs",
        "threaded_add",
        "threaded_kw",
        "async_add",
        "async_kw",
        "renamed",
        "inline_fail",
        "inline_kw_fail",
        "threaded_fail",
        "async_fail",
    }
    assert all(h.name == name for name, h in handlers.items())


@pytest.mark.parametrize(
    ("name", "is_async", "inline", "min_pos", "max_pos", "accepts_kwargs", "simple"),
    [
        ("inline_add", False, True, 2, 2, False, True),
        ("inline_default", False, True, 1, 2, False, True),
        ("inline_kw", False, True, 1, 1, True, False),
        ("inline_varargs", False, True, 0, -1, False, False),
        ("threaded_add", False, False, 2, 2, False, True),
        ("threaded_kw", False, False, 1 << 30, 1, True, False),  # required keyword-only
        ("async_add", True, False, 2, 2, False, False),
        ("async_kw", True, False, 1 << 30, 1, True, False),
        ("renamed", False, False, 0, 0, False, True),
    ],
)
def test_handler_shape(
    name: str,
    is_async: bool,
    inline: bool,
    min_pos: int,
    max_pos: int,
    accepts_kwargs: bool,
    simple: bool,
) -> None:
    h = collect_handlers(Kinds())[name]
    assert (h.is_async, h.inline, h.min_positional, h.max_positional) == (
        is_async,
        inline,
        min_pos,
        max_pos,
    )
    assert (h.accepts_kwargs, h.simple) == (accepts_kwargs, simple)
    assert "self" not in h.signature.parameters  # bound to the instance


def test_two_methods_under_one_wire_name_are_refused() -> None:
    class Twice(Service):
        @method(name="x")
        def a(self) -> None: ...

        @method(name="x")
        def b(self) -> None: ...

    with pytest.raises(ValueError, match="two methods are exposed as 'x'"):
        collect_handlers(Twice())


def test_a_service_without_methods_is_refused_unless_allowed() -> None:
    class Empty(Service):
        def helper(self) -> None: ...

    with pytest.raises(ValueError, match="Empty exposes no @method"):
        collect_handlers(Empty())
    assert collect_handlers(Empty(), allow_empty=True) == {}
    # Only the built-in rpc.describe (issue 12 item 7), which every RPC pattern serves.
    assert list(Dispatcher(Empty(), allow_empty=True).handlers) == ["rpc.describe"]


def test_method_marks_without_wrapping() -> None:
    def f(a: int) -> int:
        return a

    assert method(f) is f
    assert method(inline=True)(f) is f


def test_signature_annotations_are_resolved_in_messages() -> None:
    """This module uses ``from __future__ import annotations``: messages still read ``a: int``."""
    h = make_handler("add", Kinds().inline_add, inline=True)
    problem = h.check_arguments([1], {})
    assert problem is not None
    assert problem.startswith("add(a: int, b: int) -> int: ")
    assert "missing a required argument: 'b'" in problem


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "fits"),
    [
        ("inline_add", [1, 2], {}, True),
        ("inline_add", [1], {}, False),
        ("inline_add", [1, 2, 3], {}, False),
        ("inline_add", [], {"a": 1, "b": 2}, True),
        ("inline_add", [1], {"a": 1}, False),  # a given twice
        ("inline_add", [1, 2], {"c": 3}, False),
        ("inline_default", [1], {}, True),
        ("inline_default", [], {}, False),
        ("inline_kw", [1], {"scale": 2}, True),
        ("inline_kw", [1, 2], {}, False),  # scale is keyword-only
        ("inline_kw", [1], {"other": 2}, False),
        ("inline_varargs", [], {}, True),
        ("inline_varargs", list(range(50)), {}, True),
        ("inline_varargs", [], {"values": 1}, False),
        ("threaded_kw", [1], {}, False),  # required keyword-only missing
        ("threaded_kw", [1], {"scale": 3}, True),
        ("async_kw", [], {"scale": 3}, False),
    ],
)
def test_check_arguments(name: str, args: list[Any], kwargs: dict[str, Any], fits: bool) -> None:
    h = collect_handlers(Kinds())[name]
    problem = h.check_arguments(args, kwargs)
    assert (problem is None) == fits, problem
    # the count shortcut agrees with binding the signature for real
    try:
        h.signature.bind(*args, **kwargs)
        binds = True
    except TypeError:
        binds = False
    assert binds == fits


# --------------------------------------------------------------------------- dispatching


def test_a_service_class_is_instantiated() -> None:
    d = Dispatcher(Kinds)
    assert isinstance(d.service, Kinds)
    instance = Kinds()
    assert Dispatcher(instance).service is instance


async def test_defaults_expose_errors_and_refuse_empty_services() -> None:
    outcome = Dispatcher(Kinds()).dispatch(req("inline_fail", "value"))
    assert outcome == (False, (UNEXPECTED_ERROR, "ValueError", "the secret detail"))

    class Empty(Service):
        pass

    with pytest.raises(ValueError, match="exposes no @method"):
        Dispatcher(Empty())
    d = Dispatcher(Kinds(), max_workers=3)
    try:
        # max_workers methods run at once; as many threads more may wait for a call to a
        # client's object, their slot given back (Dispatcher.waiting)
        assert d.max_workers == 3 and d.executor._max_workers == 6
    finally:
        d.shutdown()


def test_at_most_max_workers_methods_run_at_once() -> None:
    import threading

    from tests.conftest import timeout

    d = Dispatcher(Kinds(), max_workers=2)
    lock = threading.Lock()
    now, peak = [0], [0]
    started = threading.Semaphore(0)
    release = threading.Event()

    def work() -> None:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        started.release()
        release.wait(timeout(10))
        with lock:
            now[0] -= 1

    try:
        futures = [d.executor.submit(d._in_slot, work) for _ in range(4)]
        assert started.acquire(timeout=timeout(10)) and started.acquire(timeout=timeout(10))
        release.set()
        for f in futures:
            f.result(timeout(10))
        assert peak[0] == 2  # four threads free, two slots
    finally:
        d.shutdown()


def test_unknown_method() -> None:
    d = Dispatcher(Kinds())
    assert d.dispatch(req("helper")) == (
        False,
        (ErrorCode.UNKNOWN_METHOD, "UNKNOWN_METHOD", "no method 'helper'"),
    )
    assert d.dispatch(req("nope", 1)) == (
        False,
        (ErrorCode.UNKNOWN_METHOD, "UNKNOWN_METHOD", "no method 'nope'"),
    )


BAD_CALLS = [
    req("inline_add", 1),
    req("inline_add", 1, 2, 3),
    req("inline_add", 1, 2, c=3),
    req("inline_kw", 1, 2),
    req("inline_varargs", values=[1]),
    req("threaded_add"),
    req("threaded_add", 1, 2, 3),
    req("threaded_add", 1, b=2, c=3),
    req("threaded_kw", 1),
    req("threaded_kw", 1, 2),
    req("async_add", 1),
    req("async_add", 1, 2, 3),
    req("async_add", 1, x=2),
    req("async_kw", 1),
    req("async_kw", 1, scale=2, other=3),
    req("renamed", 1),
]


@pytest.mark.parametrize(
    "request_", BAD_CALLS, ids=lambda r: f"{r.method}-{len(r.args)}-{'-'.join(r.kwargs)}"
)
def test_bad_arguments_are_refused_before_any_kind_runs(request_: Request) -> None:
    """Every kind of method: refused at once with BAD_ARGUMENTS (no awaitable to run, no
    thread or coroutine started), never as the TypeError of a call that was attempted."""
    service = Kinds()
    outcome = Dispatcher(service).dispatch(request_)
    if not isinstance(outcome, tuple):
        if inspect.iscoroutine(outcome):
            outcome.close()  # never run: no "never awaited" warning in a later test
        pytest.fail(f"{request_.method} was dispatched before its arguments were checked")
    ok, (code, type_name, message) = outcome
    assert (ok, code, type_name) == (False, BAD_ARGUMENTS, "BAD_ARGUMENTS")
    assert message.startswith(request_.method + "(")  # the signature, to help the caller
    assert service.ran == []


async def test_inline_methods_answer_at_once_on_the_calling_thread() -> None:
    service = Kinds()
    d = Dispatcher(service)
    here = threading.current_thread().name
    assert d.dispatch(req("inline_add", 2, 3)) == (True, 5)
    assert d.dispatch(req("inline_add", a=2, b=3)) == (True, 5)  # keywords: the bound path
    assert d.dispatch(req("inline_default", 2)) == (True, 12)
    assert d.dispatch(req("inline_kw", 2, scale=4)) == (True, 8)
    assert d.dispatch(req("inline_varargs", 1, 2, 3)) == (True, 6)
    assert [t for _, t in service.ran] == [here] * 5
    assert d._executor is None  # no thread pool was needed


async def test_threaded_methods_run_in_the_pool() -> None:
    service = Kinds()
    d = Dispatcher(service, max_workers=2)
    try:
        outcome = d.dispatch(req("threaded_add", 2, 3))
        assert not isinstance(outcome, tuple) and service.ran == []  # not run yet
        assert await settle(outcome) == (True, 5)
        assert await settle(d.dispatch(req("threaded_kw", 2, scale=3))) == (True, 6)
        assert await settle(d.dispatch(req("renamed"))) == (True, "renamed")
        threads = {t for _, t in service.ran}
        assert all(t.startswith("sockstack-handler") for t in threads), threads
        d.shutdown()
        assert await settle(d.dispatch(req("threaded_add", 1, 1))) == (True, 2)  # a new pool
    finally:
        d.shutdown()


async def test_async_methods_run_on_the_loop() -> None:
    service = Kinds()
    d = Dispatcher(service)
    outcome = d.dispatch(req("async_add", 2, 3))
    assert inspect.isawaitable(outcome) and service.ran == []  # not run yet
    assert await settle(outcome) == (True, 5)
    assert await settle(d.dispatch(req("async_kw", 2, scale=5))) == (True, 10)
    assert [t for _, t in service.ran] == [threading.current_thread().name] * 2
    assert d._executor is None


@pytest.mark.parametrize("kind", ["inline", "inline_kw", "threaded", "async"])
@pytest.mark.parametrize("expose", [True, False], ids=["exposed", "hidden"])
async def test_failures_map_to_application_error(
    kind: str, expose: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="sockstack.server")
    d = Dispatcher(Kinds(), expose_errors=expose)
    try:
        ok, value = await settle(d.dispatch(req(f"{kind}_fail", "value")))
        assert (ok, value) == (
            False,
            (UNEXPECTED_ERROR, "ValueError", "the secret detail" if expose else HIDDEN),
        )
        (record,) = caplog.records  # an unexpected exception is logged, with its traceback
        assert record.levelno == logging.ERROR and record.exc_info is not None
        assert record.getMessage() == f"method '{kind}_fail' raised ValueError"
        caplog.clear()
        # A ServiceError is meant for the client: its text is always sent, and not logged.
        ok, value = await settle(d.dispatch(req(f"{kind}_fail", "service")))
        assert (ok, value) == (False, (APPLICATION_ERROR, "Refused", "not allowed"))
        assert caplog.records == []
    finally:
        d.shutdown()


async def test_a_method_may_return_anything_even_false_or_none() -> None:
    class Values(Service):
        @method(inline=True)
        def none(self) -> None:
            return None

        @method
        async def false(self) -> bool:
            return False

    d = Dispatcher(Values())
    assert d.dispatch(req("none")) == (True, None)
    assert await settle(d.dispatch(req("false"))) == (True, False)
