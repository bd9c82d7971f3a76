"""Interceptors: code that runs around every RPC call, in the server and in the clients.

An interceptor is an object with any of three hooks, each a plain function or a coroutine
function (``async def``); subclass :class:`ServerInterceptor` or :class:`ClientInterceptor`
(their hooks do nothing) or write the hooks on any object::

    class Audit(ServerInterceptor):
        def before(self, ctx):                        # before the method runs
            if "tenant" not in ctx.metadata:
                raise Refused("a tenant is required")  # ERROR REFUSED (2022): it does not run
            ctx.state["audit"] = time.monotonic()
        def after(self, ctx, result):                 # it returned a result
            ctx.set_trailer("audited", "yes")
        def error(self, ctx, failure):                # it failed: failure.code, .type, .message
            log.warning("%s failed: %s", ctx.method, failure.message)

    Server(Calculator(), tcp=["127.0.0.1:5050"], interceptors=[Audit()])

**Server side.** The hooks see the call's :class:`~sockstack.rpc.context.CallContext` (method,
request id, transport, peer, metadata, deadline) and its ``ctx.state``, a dict for the
interceptors' own per-call state (key it by the interceptor's name). ``before`` hooks run in
list order before the method, in the call's context (``current_context()`` works; a contextvar
set there is seen by the method and by the later hooks of the same call); ``after`` or
``error`` hooks run in the reverse order once the outcome is known, every interceptor's for
every call that got past the host's own checks (so a metrics interceptor counts calls an
interceptor before it refused). ``after`` and ``error`` may add trailers
(``ctx.set_trailer``). A ``before`` hook refuses the call by raising :class:`Refused` (ERROR
REFUSED 2022, its message sent) or a :class:`~sockstack.ServiceError` (APPLICATION_ERROR, as
from a method); any other exception there is the server's bug (UNEXPECTED_ERROR, logged).
An exception raised by an ``after`` or ``error`` hook is logged and does not change the
answer. With synchronous hooks only, an inline method stays inline; one ``async`` hook makes
every call a task on the event loop (its hooks are awaited there).

Interceptors apply to RPC calls: REQUESTs, over TCP, TLS and UDP (``broker.stats`` included,
being a method), not to publish/subscribe frames (PUB, SUB, MSG...). They do not see a request
the host answers without dispatching it: one arriving with no time left (DEADLINE_EXCEEDED), or
during shutdown (SHUTTING_DOWN), an undecodable one, a UDP duplicate answered from the reply
cache, one cancelled by its client before its task began. An answer the host cannot send as
the method gave it (RESULT_NOT_ENCODABLE, RESULT_TOO_LARGE) was a success to the ``after``
hook.

**Client side** (``AsyncClient(url, interceptors=[...])``). The hooks see a :class:`ClientCall`:
``before(call)`` runs before the request is sent and may add to ``call.metadata`` (sent with
the request, over the client's defaults) or raise to stop the call (the exception reaches the
caller; nothing is sent); ``after(call, reply)`` gets the :class:`~sockstack.Reply` (result and
the server's trailers); ``error(call, exc)`` the exception the call raises (``RemoteError``,
``CallTimeout``...), which is re-raised after the hooks. ``after``/``error`` run in reverse
order; an exception they raise is logged and ignored. :func:`run_async` and :func:`run_sync` are
the whole protocol, shared by the client flavours (the blocking client takes synchronous hooks
only). A streamed call (``client.stream(...)``) passes the hooks once: ``before`` when it
starts, ``after`` or ``error`` when it ends (:class:`StreamHooks`); an upload
(``client.upload(...)``) passes them once too, as a call (``call.upload`` is True).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from sockstack.errors import CallError, ErrorCode

if TYPE_CHECKING:
    from sockstack.host.server import Server
    from sockstack.protocol.calls import Reply
    from sockstack.rpc.context import CallContext

__all__ = [
    "ClientCall",
    "ClientInterceptor",
    "Failure",
    "Hooks",
    "Refused",
    "ServerInterceptor",
    "StreamHooks",
    "run_async",
    "run_sync",
]

log = logging.getLogger("sockstack.interceptors")


class Refused(Exception):
    """Raise it from a server interceptor's ``before`` hook to refuse the call: the method does
    not run; the client gets ERROR REFUSED (2022) with this message, under the class's name
    (``Refused``, or a subclass's name)."""

    code = ErrorCode.REFUSED


class Failure(NamedTuple):
    """How a call failed, as its ERROR says it: code, type name, message."""

    code: int
    type: str
    message: str


class ServerInterceptor:
    """Base class of server interceptors: hooks that do nothing (override the ones you need)."""

    def bind(self, server: Server) -> None:
        """Called once by the :class:`~sockstack.Server` it is given to, when it is built."""

    def before(self, ctx: CallContext) -> Awaitable[None] | None:
        return None

    def after(self, ctx: CallContext, result: Any) -> Awaitable[None] | None:
        return None

    def error(self, ctx: CallContext, failure: Failure) -> Awaitable[None] | None:
        return None


@dataclass(slots=True)
class ClientCall:
    """One call a client is about to make, as its interceptors see it."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] | None
    metadata: dict[str, str | bytes]
    """Sent with the request: the client's defaults and the call's own; add to it in
    ``before`` (sent only to a server that reads metadata: PROTOCOL.md §4)."""
    timeout: float
    transport: str
    """``"tcp"``, ``"tls"`` or ``"udp"``."""
    peer: str
    """The server's endpoint (``tcp://host:port``)."""
    state: dict[str, Any] = field(default_factory=dict)
    """The interceptors' per-call state (key it by the interceptor's name)."""
    stream: bool = False
    """True for a streamed call (``client.stream(...)``): ``after`` gets the stream's end."""
    upload: bool = False
    """True for an upload (``client.upload(...)``): its items pass no hook; ``args`` are the
    call's other arguments."""

    @classmethod
    def of(
        cls,
        method: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        defaults: Mapping[str, str | bytes] | None,
        metadata: Mapping[str, str | bytes] | None,
        timeout: float,
        endpoint: Any,
        *,
        stream: bool = False,
        upload: bool = False,
    ) -> ClientCall:
        """The call a client makes, as both clients build it: its metadata the client's
        ``defaults`` overridden by the call's own, its transport and peer the ``endpoint``'s."""
        return cls(
            method,
            args if type(args) is tuple else tuple(args),
            kwargs or None,
            merged(defaults, metadata),
            timeout,
            endpoint.scheme,
            str(endpoint),
            stream=stream,
            upload=upload,
        )


class ClientInterceptor:
    """Base class of client interceptors: hooks that do nothing (override the ones you need)."""

    def before(self, call: ClientCall) -> Awaitable[None] | None:
        return None

    def after(self, call: ClientCall, reply: Reply) -> Awaitable[None] | None:
        return None

    def error(self, call: ClientCall, exc: BaseException) -> Awaitable[None] | None:
        return None


_NOOPS = {
    name: (getattr(ServerInterceptor, name), getattr(ClientInterceptor, name))
    for name in ("before", "after", "error")
}


class Hooks:
    """The hooks of a list of interceptors, in the order they run: ``before`` in list order,
    ``after`` and ``error`` reversed; hooks a base class leaves empty are skipped."""

    __slots__ = ("after", "before", "error", "is_async")

    def __init__(self, interceptors: Iterable[object]) -> None:
        found: dict[str, list[Callable[..., Any]]] = {"before": [], "after": [], "error": []}
        for icpt in interceptors:
            for name, hooks in found.items():
                hook = getattr(icpt, name, None)
                if hook is None:
                    continue
                if not callable(hook):
                    raise TypeError(f"interceptor {icpt!r}: {name} is not callable")
                if getattr(type(icpt), name, None) in _NOOPS[name]:
                    continue  # a base class's empty hook
                hooks.append(hook)
        self.before = tuple(found["before"])
        self.after = tuple(reversed(found["after"]))
        self.error = tuple(reversed(found["error"]))
        self.is_async = any(
            inspect.iscoroutinefunction(h) for h in (*self.before, *self.after, *self.error)
        )

    def __bool__(self) -> bool:
        return bool(self.before or self.after or self.error)


def call_quietly(hooks: tuple[Callable[..., Any], ...], *args: Any) -> list[Awaitable[Any]]:
    """Run ``after``/``error`` hooks, logging what they raise; their awaitables, to await."""
    pending: list[Awaitable[Any]] = []
    for hook in hooks:
        try:
            r = hook(*args)
        except Exception:
            log.exception("interceptor hook %r raised (ignored)", hook)
            continue
        if r is not None and inspect.isawaitable(r):
            pending.append(r)
    return pending


async def await_quietly(pending: list[Awaitable[Any]]) -> None:
    for r in pending:
        try:
            await r
        except Exception:
            log.exception("interceptor hook raised (ignored)")


async def _run_each_async(hooks: tuple[Callable[..., Any], ...], *args: Any) -> None:
    """``after``/``error`` hooks in order, each awaited before the next."""
    for hook in hooks:
        await await_quietly(call_quietly((hook,), *args))


async def run_async(
    hooks: Hooks, call: ClientCall, send: Callable[[ClientCall], Awaitable[Reply]]
) -> Reply:
    """A client call through its interceptors: ``before`` hooks (awaited when async), then
    ``send(call)`` (the request, with ``call.metadata``), then ``after`` or ``error``."""
    try:
        for hook in hooks.before:
            r = hook(call)
            if r is not None and inspect.isawaitable(r):
                await r
        reply = await send(call)
    except BaseException as exc:
        await _run_each_async(hooks.error, call, exc)
        raise
    await _run_each_async(hooks.after, call, reply)
    return reply


def run_sync(hooks: Hooks, call: ClientCall, send: Callable[[ClientCall], Reply]) -> Reply:
    """:func:`run_async` for a blocking client: every hook must be synchronous (check
    ``hooks.is_async`` when the client is built and refuse async ones there)."""
    try:
        for hook in hooks.before:
            hook(call)
        reply = send(call)
    except BaseException as exc:
        call_quietly(hooks.error, call, exc)
        raise
    call_quietly(hooks.after, call, reply)
    return reply


class StreamHooks:
    """The interceptors around one streamed call (``client.stream(...)``, both clients): the
    ``before`` hooks once, when it starts (before its request is sent: they may add metadata);
    then, once, when it ends, ``after`` with a :class:`~sockstack.Reply` of the generator's
    return value and the server's trailers, or ``error`` with the exception the stream raises,
    or a :class:`~sockstack.CallError` when the reader stopped it early (``break``, close:
    CANCEL sent). The items themselves pass no hook."""

    __slots__ = ("call", "ended", "hooks")

    def __init__(self, hooks: Hooks, call: ClientCall) -> None:
        self.hooks = hooks
        self.call = call
        self.ended = False

    @classmethod
    def around(
        cls,
        hooks: Hooks,
        request: tuple[str, tuple[Any, ...], dict[str, Any] | None, float, Any],
        defaults: Mapping[str, str | bytes] | None,
        endpoint: Any,
    ) -> StreamHooks:
        """The hooks of a stream about to start: ``request`` is (method, args, kwargs,
        timeout, metadata), ``defaults`` the client's metadata."""
        method, args, kwargs, timeout, metadata = request
        return cls(
            hooks,
            ClientCall.of(method, args, kwargs, defaults, metadata, timeout, endpoint, stream=True),
        )

    def request(self) -> tuple[str, tuple[Any, ...], dict[str, Any] | None, float, Any]:
        """(method, args, kwargs, timeout, metadata) as the ``before`` hooks left them."""
        c = self.call
        return c.method, c.args, c.kwargs, c.timeout, c.metadata

    def start_sync(self) -> None:
        """The ``before`` hooks (synchronous: the blocking client); one that raises ends the
        call with ``error`` hooks, and its exception is raised."""
        try:
            for hook in self.hooks.before:
                hook(self.call)
        except BaseException as exc:
            self.end(None, exc)
            raise

    async def start_async(self) -> None:
        try:
            for hook in self.hooks.before:
                r = hook(self.call)
                if r is not None and inspect.isawaitable(r):
                    await r
        except BaseException as exc:
            await self.end_async(None, exc)
            raise

    def end(self, reply: Reply | None, exc: BaseException | None) -> list[Awaitable[Any]]:
        """Run ``after`` (``exc`` None) or ``error`` hooks, the first time only; the
        awaitables of async hooks, for the caller to await (or schedule)."""
        if self.ended:
            return []
        self.ended = True
        if exc is None:
            return call_quietly(self.hooks.after, self.call, reply)
        return call_quietly(self.hooks.error, self.call, exc)

    async def end_async(self, reply: Reply | None, exc: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        if exc is None:
            await _run_each_async(self.hooks.after, self.call, reply)
        else:
            await _run_each_async(self.hooks.error, self.call, exc)

    def stopped(self) -> CallError:
        """What ``error`` hooks get when the reader stopped the stream before its end."""
        return CallError(
            f"stream({self.call.method!r}): the reader stopped it before its end (CANCEL sent)"
        )


def merged(*maps: Mapping[str, str | bytes] | None) -> dict[str, str | bytes]:
    out: dict[str, str | bytes] = {}
    for m in maps:
        if m:
            out.update(m)
    return out
