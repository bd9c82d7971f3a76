"""Interceptors, live over loopback (issue 12 item 5): server hooks around every RPC call
(before / after / error, sync and async, refusal, trailers), client hooks in both clients
(metadata added, local refusal, after/error). Real servers on 127.0.0.1, TCP and UDP."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sockstack import (
    AsyncClient,
    CallContext,
    ClientCall,
    ClientInterceptor,
    ErrorCode,
    Failure,
    Refused,
    RemoteError,
    Reply,
    Server,
    ServerInterceptor,
    Service,
    ServiceError,
    current_context,
    method,
)
from tests.conftest import timeout

HOST = "127.0.0.1"
SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


class Svc(Service):
    def __init__(self) -> None:
        self.runs = 0
        self.lock = threading.Lock()
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    def _ran(self) -> None:
        with self.lock:
            self.runs += 1

    @method(inline=True)
    def inline_md(self) -> dict[str, Any]:
        self._ran()
        return {"metadata": dict(current_context().metadata), "var": SEEN.get()}

    @method
    def threaded_md(self) -> dict[str, Any]:
        self._ran()
        return {"metadata": dict(current_context().metadata), "var": SEEN.get()}

    @method
    async def async_md(self) -> dict[str, Any]:
        self._ran()
        return {"metadata": dict(current_context().metadata), "var": SEEN.get()}

    @method
    async def fails(self) -> None:
        raise ValueError("boom")

    @method
    async def slow(self) -> str:
        self.started.set()
        await asyncio.wait_for(self.gate.wait(), timeout(30))
        return "done"


class Recorder(ServerInterceptor):
    """Records each hook it sees into a shared log, tagged with its name."""

    def __init__(self, name: str, log: list[tuple[str, ...]]) -> None:
        self.name = name
        self.log = log

    def before(self, ctx: CallContext) -> None:
        self.log.append((self.name, "before", ctx.method, ctx.transport))
        ctx.state[self.name] = "mine"
        SEEN.set(SEEN.get() + self.name)

    def after(self, ctx: CallContext, result: Any) -> None:
        assert ctx.state[self.name] == "mine"
        self.log.append((self.name, "after", ctx.method))
        ctx.set_trailer(f"by-{self.name}", "yes")

    def error(self, ctx: CallContext, failure: Failure) -> None:
        self.log.append((self.name, "error", ctx.method, failure.type))
        ctx.set_trailer(f"err-{self.name}", str(failure.code))


class AsyncRecorder(Recorder):
    async def before(self, ctx: CallContext) -> None:  # type: ignore[override]
        await asyncio.sleep(0)  # a real suspension: the hook is awaited on the loop
        super().before(ctx)

    async def after(self, ctx: CallContext, result: Any) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().after(ctx, result)

    async def error(self, ctx: CallContext, failure: Failure) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().error(ctx, failure)


class Gate(ServerInterceptor):
    """Refuses calls without a tenant (Refused), and calls of tenant "x" (a ServiceError)."""

    def before(self, ctx: CallContext) -> None:
        tenant = ctx.metadata.get("tenant")
        if tenant is None:
            raise Refused("a tenant is required")
        if tenant == "x":
            raise ServiceError("tenant x is suspended")


class NoTenant(Refused):
    pass


def url(server: Server, scheme: str) -> str:
    return f"{scheme}://{HOST}:{server.endpoint(scheme).port}"


@pytest.fixture
async def svc() -> AsyncIterator[Svc]:
    s = Svc()
    yield s
    s.gate.set()


async def started(svc: Svc, *interceptors: object) -> Server:
    server = Server(
        svc, tcp=[f"{HOST}:0"], udp=[f"{HOST}:0"], interceptors=interceptors, insecure=True
    )
    await server.start()
    return server


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
@pytest.mark.parametrize("flavour", ["sync", "async", "mixed"])
@pytest.mark.parametrize("name", ["inline_md", "threaded_md", "async_md"])
async def test_hooks_run_in_order_around_every_kind_of_method(
    svc: Svc, scheme: str, flavour: str, name: str
) -> None:
    log: list[tuple[str, ...]] = []
    a_cls = AsyncRecorder if flavour == "async" else Recorder
    b_cls = AsyncRecorder if flavour in ("async", "mixed") else Recorder
    server = await started(svc, a_cls("a", log), b_cls("b", log))
    try:
        async with AsyncClient(url(server, scheme), timeout=timeout(10)) as c:
            reply = await c.request(name, metadata={"tenant": "t1"}, with_metadata=True)
    finally:
        await server.shutdown()
    assert log == [
        ("a", "before", name, scheme),
        ("b", "before", name, scheme),
        ("b", "after", name),
        ("a", "after", name),
    ]
    # The method saw the caller's metadata and what the before hooks set in the context.
    assert reply.result == {"metadata": {"tenant": "t1"}, "var": "ab"}
    # Trailers set by after hooks reach the client.
    assert reply.metadata == {"by-a": "yes", "by-b": "yes"}
    assert svc.runs == 1
    assert SEEN.get() == ""  # nothing set in a hook leaks into the loop's own context


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_error_hooks_see_the_failure_and_add_trailers(svc: Svc, scheme: str) -> None:
    log: list[tuple[str, ...]] = []
    server = await started(svc, Recorder("a", log), AsyncRecorder("b", log))
    try:
        async with AsyncClient(url(server, scheme), timeout=timeout(10)) as c:
            with pytest.raises(RemoteError) as err:
                await c.request("fails", metadata={"k": "v"})
            with pytest.raises(RemoteError) as unknown:
                await c.request("no_such_method", metadata={"k": "v"})
    finally:
        await server.shutdown()
    assert err.value.code == ErrorCode.UNEXPECTED_ERROR
    assert unknown.value.code == ErrorCode.UNKNOWN_METHOD
    assert log == [
        ("a", "before", "fails", scheme),
        ("b", "before", "fails", scheme),
        ("b", "error", "fails", "ValueError"),
        ("a", "error", "fails", "ValueError"),
        ("a", "before", "no_such_method", scheme),
        ("b", "before", "no_such_method", scheme),
        ("b", "error", "no_such_method", "UNKNOWN_METHOD"),
        ("a", "error", "no_such_method", "UNKNOWN_METHOD"),
    ]


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
@pytest.mark.parametrize("name", ["inline_md", "threaded_md", "async_md"])
async def test_a_before_hook_refuses_the_call(svc: Svc, scheme: str, name: str) -> None:
    log: list[tuple[str, ...]] = []
    server = await started(svc, Gate(), Recorder("m", log))
    try:
        async with AsyncClient(url(server, scheme), timeout=timeout(10)) as c:
            with pytest.raises(RemoteError) as refused:
                await c.call(name)
            with pytest.raises(RemoteError) as suspended:
                await c.request(name, metadata={"tenant": "x"})
            ok = await c.request(name, metadata={"tenant": "t"})
    finally:
        await server.shutdown()
    assert refused.value.code == ErrorCode.REFUSED == 2022
    assert (refused.value.type, refused.value.message) == ("Refused", "a tenant is required")
    assert suspended.value.code == ErrorCode.APPLICATION_ERROR
    assert suspended.value.message == "tenant x is suspended"
    assert ok["metadata"] == {"tenant": "t"}
    assert svc.runs == 1  # the refused calls never ran
    # An interceptor after the refusing one still sees each refused call end (metrics count it).
    assert [e[1:] for e in log if e[1] == "error"] == [
        ("error", name, "Refused"),
        ("error", name, "ServiceError"),
    ]


async def test_a_refusal_subclass_travels_under_its_name(svc: Svc) -> None:
    class Strict(ServerInterceptor):
        async def before(self, ctx: CallContext) -> None:
            raise NoTenant("no tenant header")

    server = await started(svc, Strict())
    try:
        async with AsyncClient(url(server, "tcp"), timeout=timeout(10)) as c:
            with pytest.raises(RemoteError) as refused:
                await c.call("async_md")
    finally:
        await server.shutdown()
    assert (refused.value.code, refused.value.type) == (ErrorCode.REFUSED, "NoTenant")
    assert svc.runs == 0


async def test_a_hook_that_raises_after_the_method_does_not_change_the_answer(
    svc: Svc, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(ServerInterceptor):
        def after(self, ctx: CallContext, result: Any) -> None:
            raise RuntimeError("metrics backend down")

    server = await started(svc, Broken())
    try:
        async with AsyncClient(url(server, "tcp"), timeout=timeout(10)) as c:
            result = await c.call("inline_md")
    finally:
        await server.shutdown()
    assert result["var"] == ""
    assert "metrics backend down" in caplog.text


async def test_error_hooks_see_a_call_cancelled_by_its_client(svc: Svc) -> None:
    log: list[tuple[str, ...]] = []
    ended = asyncio.Event()

    class Watch(Recorder):
        def error(self, ctx: CallContext, failure: Failure) -> None:
            super().error(ctx, failure)
            ended.set()

    server = await started(svc, Watch("a", log))
    try:
        async with AsyncClient(url(server, "tcp"), timeout=timeout(10)) as c:
            task = asyncio.ensure_future(c.call("slow"))
            await asyncio.wait_for(svc.started.wait(), timeout(10))
            task.cancel()  # the client sends CANCEL: the server stops the async method
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(ended.wait(), timeout(10))
    finally:
        await server.shutdown()
    assert log == [("a", "before", "slow", "tcp"), ("a", "error", "slow", "CANCELLED")]


# --------------------------------------------------------------------------- client side


class ClientRecorder(ClientInterceptor):
    def __init__(self, name: str, log: list[tuple[str, ...]]) -> None:
        self.name = name
        self.log = log

    def before(self, call: ClientCall) -> None:
        self.log.append((self.name, "before", call.method, call.transport))
        call.metadata[f"from-{self.name}"] = "1"

    def after(self, call: ClientCall, reply: Reply) -> None:
        self.log.append((self.name, "after", call.method, ",".join(sorted(reply.metadata))))

    def error(self, call: ClientCall, exc: BaseException) -> None:
        self.log.append((self.name, "error", call.method, type(exc).__name__))


class AsyncClientRecorder(ClientRecorder):
    async def before(self, call: ClientCall) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().before(call)


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_client_hooks_add_metadata_and_see_trailers(svc: Svc, scheme: str) -> None:
    server_log: list[tuple[str, ...]] = []
    log: list[tuple[str, ...]] = []
    server = await started(svc, Recorder("s", server_log))
    try:
        async with AsyncClient(
            url(server, scheme),
            timeout=timeout(10),
            metadata={"tenant": "t1"},
            interceptors=[ClientRecorder("a", log), AsyncClientRecorder("b", log)],
        ) as c:
            result = await c.request("async_md", metadata={"call": "c1"})
            with pytest.raises(RemoteError):
                await c.call("fails")
    finally:
        await server.shutdown()
    # The server received the client's defaults, the call's metadata and what hooks added.
    assert result["metadata"] == {"tenant": "t1", "call": "c1", "from-a": "1", "from-b": "1"}
    assert log == [
        ("a", "before", "async_md", scheme),
        ("b", "before", "async_md", scheme),
        ("b", "after", "async_md", "by-s"),
        ("a", "after", "async_md", "by-s"),
        ("a", "before", "fails", scheme),
        ("b", "before", "fails", scheme),
        ("b", "error", "fails", "RemoteError"),
        ("a", "error", "fails", "RemoteError"),
    ]


async def test_a_client_hook_stops_a_call_before_it_is_sent(svc: Svc) -> None:
    log: list[tuple[str, ...]] = []

    class NoWrites(ClientInterceptor):
        def before(self, call: ClientCall) -> None:
            if call.method.startswith("threaded"):
                raise PermissionError(f"{call.method} is not allowed from here")

    server = await started(svc)
    try:
        async with AsyncClient(
            url(server, "tcp"),
            timeout=timeout(10),
            interceptors=[ClientRecorder("a", log), NoWrites()],
        ) as c:
            with pytest.raises(PermissionError, match="threaded_md is not allowed"):
                await c.call("threaded_md")
            assert (await c.call("inline_md"))["metadata"] == {"from-a": "1"}
    finally:
        await server.shutdown()
    assert svc.runs == 1  # only inline_md ran: the refused call was never sent
    assert ("a", "error", "threaded_md", "PermissionError") in log


async def test_no_interceptor_or_only_empty_hooks_keeps_the_plain_path(svc: Svc) -> None:
    """Without hooks the dispatcher's plain method serves (no per-call cost), and the client
    takes its plain path; an interceptor with only the base class's empty hooks is no hook."""
    from sockstack.host.dispatch import Dispatcher

    for interceptors in ((), (ServerInterceptor(),)):
        server = Server(svc, tcp=[f"{HOST}:0"], interceptors=interceptors, insecure=True)
        assert "dispatch" not in vars(server.dispatcher)
        assert server.dispatcher.dispatch.__func__ is Dispatcher.dispatch  # type: ignore[attr-defined]
    assert AsyncClient("tcp://127.0.0.1:1", interceptors=[ClientInterceptor()]).hooks is None
    server = Server(svc, tcp=[f"{HOST}:0"], interceptors=[Gate()], insecure=True)
    assert "dispatch" in vars(server.dispatcher)


# --------------------------------------------------------------------------- blocking client


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_blocking_client_hooks_add_metadata_see_trailers_and_errors(
    svc: Svc, scheme: str
) -> None:
    """The blocking client runs the same protocol (run_sync): before in list order (adding
    metadata that is sent), after/error reversed, a before that raises stops the call with
    nothing sent; async hooks are refused when the client is built."""
    from sockstack import connect

    server_log: list[tuple[str, ...]] = []
    log: list[tuple[str, ...]] = []
    server = await started(svc, Recorder("s", server_log))

    class NoThreaded(ClientInterceptor):
        def before(self, call: ClientCall) -> None:
            if call.method == "threaded_md":
                raise PermissionError("not from here")

    def scenario() -> tuple[Any, Reply]:
        with connect(
            url(server, scheme),
            timeout=timeout(10),
            metadata={"tenant": "t1"},
            interceptors=[ClientRecorder("a", log), ClientRecorder("b", log), NoThreaded()],
        ) as c:
            result = c.request("async_md", metadata={"call": "c1"})
            reply = c.request("inline_md", with_metadata=True)
            with pytest.raises(RemoteError):
                c.call("fails")
            runs = svc.runs
            with pytest.raises(PermissionError):
                c.call("threaded_md")
            assert svc.runs == runs  # refused here: never sent
            return result, reply

    try:
        result, reply = await asyncio.to_thread(scenario)
    finally:
        await server.shutdown()
    assert result["metadata"] == {"tenant": "t1", "call": "c1", "from-a": "1", "from-b": "1"}
    assert reply.metadata.get("by-s") is not None  # the server interceptor's trailer
    assert log == [
        ("a", "before", "async_md", scheme),
        ("b", "before", "async_md", scheme),
        ("b", "after", "async_md", "by-s"),
        ("a", "after", "async_md", "by-s"),
        ("a", "before", "inline_md", scheme),
        ("b", "before", "inline_md", scheme),
        ("b", "after", "inline_md", "by-s"),
        ("a", "after", "inline_md", "by-s"),
        ("a", "before", "fails", scheme),
        ("b", "before", "fails", scheme),
        ("b", "error", "fails", "RemoteError"),
        ("a", "error", "fails", "RemoteError"),
        ("a", "before", "threaded_md", scheme),
        ("b", "before", "threaded_md", scheme),
        ("b", "error", "threaded_md", "PermissionError"),
        ("a", "error", "threaded_md", "PermissionError"),
    ]
    with pytest.raises(TypeError, match="synchronous hooks only"):
        connect("tcp://127.0.0.1:1", interceptors=[AsyncClientRecorder("x", log)])
