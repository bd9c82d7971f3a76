"""The context of an inline call is built lazily (host: the thread's ``LazyContext`` holder,
filled around each call; the ``CallContext`` only when something asks for it). Whatever reads
it, a method answered at once must see what an eagerly built context showed: its request id,
method, transport, peer and deadline, one object per call, trailers that reach the client, a
deadline nested calls inherit, and a context that outlives the method once taken. A task the
method starts never sees another call's context. Live over loopback, TCP (one request per read,
and several requests in one read) and UDP.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sockstack import CallContext, Server, Service, connect, current_context, method
from sockstack.protocol.calls import CURRENT_CALL, inherited_timeout, served_call
from sockstack.protocol.events import Error, Pong, Request, Response
from sockstack.protocol.messages import encode_ping, encode_request
from sockstack.rpc.context import LazyContext, served_context
from tests.conftest import timeout
from tests.integration.test_deadlines_metadata import RawDatagrams, RawStream, raw_call

HOST = "127.0.0.1"


class Inline(Service):
    def __init__(self) -> None:
        self.conn: Any = None  # reenter: the host's protocol object of another connection
        self.later: asyncio.Future[dict[str, Any]] | None = None
        self.task: asyncio.Task[None] | None = None

    @method(inline=True)
    def seen(self) -> dict[str, Any]:
        ctx = current_context()
        return {
            "request_id": ctx.request_id,
            "method": ctx.method,
            "transport": ctx.transport,
            "peer": ctx.peer,
            "remaining": ctx.time_remaining(),
            "same": current_context() is ctx,  # one object per call
            # What a nested call made here would get as its timeout (its own being 60 s).
            "nested_timeout": inherited_timeout(60.0, time.monotonic()),
        }

    @method(inline=True)
    def trailer(self, fail: bool = False) -> str:
        current_context().set_trailer("served-by", "inline")
        if fail:
            raise ValueError("failed on purpose")
        return "ok"

    @method(inline=True)
    def plain(self) -> str:
        """Asks for nothing: its context is never built."""
        return "plain"

    @method(inline=True)
    def start_task(self) -> str:
        """Starts a task that runs after this method has returned. An inline method's call is
        held for the thread while it runs, not in a context variable: the task does not see
        it (LookupError), and gets what it needs from the method (README, "Call context")."""
        loop = asyncio.get_running_loop()
        self.later = fut = loop.create_future()
        ctx = current_context()  # read here, passed to the task

        async def read_later(ctx: CallContext = ctx) -> None:
            await asyncio.sleep(0)  # the method has returned, its answer is sent
            try:
                current_context()
                own = "seen"
            except LookupError:
                own = "LookupError"
            fut.set_result(
                {
                    "request_id": ctx.request_id,
                    "method": ctx.method,
                    "deadline": ctx.deadline,
                    "own": own,
                    "nested_timeout": inherited_timeout(60.0, time.monotonic()),
                }
            )

        self.task = loop.create_task(read_later())
        return "started"

    @method(inline=True)
    def reenter(self, frame: bytes) -> dict[str, Any]:
        """Hands ``frame`` (a REQUEST) to another connection of this host while this call
        runs: the host dispatches a call inside this one, on the same thread."""
        outer = current_context()
        assert self.conn is not None
        self.conn.data_received(frame)
        after = current_context()
        return {"outer": outer.request_id, "after": after.request_id, "same": after is outer}

    @method(inline=True)
    def from_thread(self) -> dict[str, Any]:
        """A thread started here (with a copy of the context) while the call runs: the call
        is this thread's (the loop's), not the other one's."""
        seen: list[object] = []
        thread = threading.Thread(target=contextvars.copy_context().run, args=(self._look, seen))
        thread.start()
        thread.join(timeout(10))
        return {"thread": seen == [None], "own": current_context().request_id}

    @staticmethod
    def _look(seen: list[object]) -> None:
        seen.append(served_call())

    @method
    def nested(self, url: str) -> Any:
        """A threaded def method calling the server again with a blocking client whose own
        timeout is 60 s: the nested call carries the outer call's time left instead."""
        with connect(url, timeout=60) as c:
            return c.call("seen")


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, Inline]]:
    svc = Inline()
    server = Server(svc, tcp=[f"{HOST}:0"], udp=[f"{HOST}:0"])
    await server.start()
    try:
        yield server, svc
    finally:
        await server.shutdown()


def url(server: Server, scheme: str) -> str:
    return f"{scheme}://{HOST}:{server.endpoint(scheme).port}"


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_an_inline_method_sees_its_own_call(
    served: tuple[Server, Inline], scheme: str
) -> None:
    server, _ = served
    answer = await raw_call(server, scheme, encode_request(41, "seen", [], budget_ms=5000))
    assert type(answer) is Response
    seen = answer.result
    assert seen["request_id"] == 41 and seen["method"] == "seen"
    assert seen["transport"] == scheme and seen["peer"].startswith(f"{HOST}:")
    assert 0 < seen["remaining"] <= 5.0 and seen["same"] is True
    assert 0 < seen["nested_timeout"] <= 5.0  # not the nested call's own 60 s
    # Without DEADLINE: no deadline, and a nested call keeps its own timeout.
    answer = await raw_call(server, scheme, encode_request(42, "seen", []))
    assert type(answer) is Response
    assert answer.result["request_id"] == 42 and answer.result["remaining"] is None
    assert answer.result["nested_timeout"] == 60.0


async def test_several_requests_in_one_read_each_see_their_own_call(
    served: tuple[Server, Inline],
) -> None:
    """The pipelined path (HostStream._run): one write, three inline calls."""
    server, _ = served
    raw = await RawStream.open(server)
    try:
        raw.send(
            encode_request(7, "seen", [], budget_ms=4000),
            encode_request(8, "plain", []),
            encode_request(9, "seen", []),
        )
        answers = {}
        for _ in range(3):
            a = await raw.answer()
            assert type(a) is Response
            answers[a.request_id] = a.result
    finally:
        await raw.close()
    assert answers[7]["request_id"] == 7 and 0 < answers[7]["remaining"] <= 4.0
    assert answers[8] == "plain"
    assert answers[9]["request_id"] == 9 and answers[9]["remaining"] is None


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_trailers_set_by_an_inline_method_come_back(
    served: tuple[Server, Inline], scheme: str
) -> None:
    server, _ = served
    ok = await raw_call(server, scheme, encode_request(5, "trailer", [], budget_ms=5000))
    assert ok == Response(5, "ok", 1, {"served-by": "inline"})
    failed = await raw_call(server, scheme, encode_request(6, "trailer", [True], budget_ms=5000))
    assert type(failed) is Error and failed.type == "ValueError"
    assert failed.metadata == {"served-by": "inline"}
    # In one read with other requests (TCP's pipelined path) too.
    if scheme == "tcp":
        raw = await RawStream.open(server)
        try:
            raw.send(
                encode_request(1, "plain", [], budget_ms=5000),
                encode_request(2, "trailer", [], budget_ms=5000),
            )
            got = {}
            for _ in range(2):
                a = await raw.answer()
                assert type(a) is Response
                got[a.request_id] = a
        finally:
            await raw.close()
        assert got[1].metadata is None
        assert got[2].metadata == {"served-by": "inline"}


async def test_a_task_started_by_an_inline_method_gets_the_context_from_it(
    served: tuple[Server, Inline],
) -> None:
    """The context the method passed is its call's (and outlives the method); the task's own
    current_context() raises, and a call it makes keeps its own timeout: a task never sees
    another call's context (the thread's holder has moved on to the next call)."""
    server, svc = served
    before = time.monotonic()
    answer = await raw_call(server, "tcp", encode_request(77, "start_task", [], budget_ms=9000))
    assert answer == Response(77, "started", 1)
    assert svc.later is not None
    later = await asyncio.wait_for(svc.later, timeout(10))
    assert later["request_id"] == 77 and later["method"] == "start_task"
    assert before < later["deadline"] <= time.monotonic() + 9.0
    assert later["own"] == "LookupError" and later["nested_timeout"] == 60.0


async def test_a_call_dispatched_inside_another_sees_its_own_context(
    served: tuple[Server, Inline],
) -> None:
    """The thread's holder is busy with the outer call: the inner one is dispatched in a
    context of its own (CURRENT_CALL), and the outer call's is intact after it."""
    server, svc = served
    inner = await RawStream.open(server)
    try:
        inner.send(encode_ping(1))
        assert type(await inner.answer()) is Pong  # its session is open
        port = inner.writer.get_extra_info("sockname")[1]
        (svc.conn,) = [c for c in server._streams if c.peer == f"{HOST}:{port}"]
        frame = encode_request(99, "seen", [], budget_ms=3000)
        answer = await raw_call(server, "tcp", encode_request(5, "reenter", [frame]))
        assert answer == Response(5, {"outer": 5, "after": 5, "same": True}, 1)
        got = await inner.answer()
        assert type(got) is Response and got.request_id == 99
        assert got.result["request_id"] == 99 and got.result["method"] == "seen"
        assert 0 < got.result["remaining"] <= 3.0 and got.result["same"] is True
    finally:
        await inner.close()


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_another_thread_never_sees_the_loops_inline_call(
    served: tuple[Server, Inline], scheme: str
) -> None:
    server, _ = served
    answer = await raw_call(server, scheme, encode_request(31, "from_thread", []))
    assert answer == Response(31, {"thread": True, "own": 31}, 1)


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_a_nested_call_from_a_def_method_inherits_the_deadline(
    served: tuple[Server, Inline], scheme: str
) -> None:
    server, _ = served

    def outer() -> Any:
        with connect(url(server, "tcp"), timeout=3) as c:
            return c.call("nested", url(server, scheme))

    inner = await asyncio.to_thread(outer)
    assert inner["method"] == "seen" and inner["transport"] == scheme
    assert 0 < inner["remaining"] <= 3.0  # the outer call's time left, not the client's 60 s


async def test_udp_datagram_calls_see_their_own_ids(served: tuple[Server, Inline]) -> None:
    """Two datagrams in a row from one socket: each inline call its own context."""
    server, _ = served
    dg = await RawDatagrams.open(server)
    try:
        dg.send(encode_request(11, "seen", [], budget_ms=2000))
        first = await dg.answer()
        dg.send(encode_request(12, "seen", []))
        second = await dg.answer()
    finally:
        dg.close()
    assert first.result["request_id"] == 11 and 0 < first.result["remaining"] <= 2.0
    assert second.result["request_id"] == 12 and second.result["remaining"] is None


def test_a_lazy_context_is_built_once_and_only_on_demand() -> None:
    lazy = LazyContext()
    lazy.request = Request(3, "m", [], {}, 1, 1000, {"k": "v"})
    lazy.transport, lazy.peer, lazy.deadline, lazy.ctx = "tcp", ("127.0.0.1", 9), 12.5, None
    assert lazy.ctx is None  # nothing built yet
    token = CURRENT_CALL.set(lazy)
    try:
        ctx = current_context()
        assert type(ctx) is CallContext and lazy.ctx is ctx and current_context() is ctx
        assert (ctx.method, ctx.request_id, ctx.transport, ctx.peer) == (
            "m",
            3,
            "tcp",
            "127.0.0.1:9",
        )
        assert ctx.deadline == 12.5 and dict(ctx.metadata) == {"k": "v"}
        assert inherited_timeout(60.0, 12.0) == 0.5  # nested calls read lazy.deadline
    finally:
        CURRENT_CALL.reset(token)
    assert served_context(None) is None and served_context(ctx) is ctx
    with pytest.raises(LookupError):
        current_context()


def test_threads_asking_at_once_get_one_context() -> None:
    """A thread the method started may ask for the context at the moment the method does:
    every asker gets the same object (the one whose trailers the host sends). Without the lock
    in LazyContext.context() it failed in each of three runs here."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between almost any two bytecodes: races show
    try:
        for round_ in range(200):
            lazy = LazyContext()
            lazy.request = Request(round_ + 1, "m", [], {}, 1)
            lazy.transport, lazy.peer, lazy.deadline, lazy.ctx = "tcp", "local", None, None
            start = threading.Barrier(8)
            got: list[CallContext] = []

            def ask(
                lazy: LazyContext = lazy,
                start: threading.Barrier = start,
                got: list[CallContext] = got,
            ) -> None:
                start.wait(timeout(10))
                got.append(lazy.context())

            threads = [threading.Thread(target=ask) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout(10))
            assert len(got) == 8 and all(c is got[0] for c in got) and lazy.ctx is got[0]
    finally:
        sys.setswitchinterval(switch)
