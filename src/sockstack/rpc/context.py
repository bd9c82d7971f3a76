"""The context of the call a method is serving: deadline, cancellation, metadata, trailers.

Inside any method the host serves (async, threaded or inline), :func:`current_context` returns
the :class:`CallContext` of the call being served::

    from sockstack import Service, current_context, method

    class Svc(Service):
        @method
        async def work(self) -> str:
            ctx = current_context()
            tenant = ctx.metadata.get("tenant", "")     # the caller's metadata
            ctx.set_trailer("served-by", "node-1")      # comes back with the answer
            return f"{tenant}: {ctx.time_remaining()} s left"

The deadline is the caller's: its REQUEST carried the time it had left (PROTOCOL.md §4, flag
DEADLINE), and the server's deadline is the request's arrival plus that budget. The host refuses
a call already late without running it (ERROR DEADLINE_EXCEEDED), cancels an ``async`` method
when the deadline passes, and marks the context of a threaded method (``ctx.cancelled``), which
cannot be stopped from outside and should poll it. A CANCEL from the client does the same with
ERROR CANCELLED. A call made with a sockstack client from inside the method inherits the
deadline: its timeout is at most ``ctx.time_remaining()``.

Times are ``time.monotonic()`` seconds (the clock of the event loop the host runs on, and of
every thread).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from sockstack.errors import ErrorCode
from sockstack.protocol.calls import INLINE_CALLS, served_call
from sockstack.protocol.events import Request
from sockstack.protocol.messages import MAX_METADATA_ENTRIES, check_metadata

__all__ = [
    "CallAborted",
    "CallContext",
    "LazyContext",
    "current_context",
    "inline_holder",
    "run_guarded",
    "served_context",
]

_EMPTY: Mapping[str, str | bytes] = MappingProxyType({})
_monotonic = time.monotonic
_T = TypeVar("_T")
_BUILDING = threading.Lock()  # LazyContext.context(): one CallContext per call


def _new_lock_after_fork() -> None:
    global _BUILDING, _HOOKS
    _BUILDING = threading.Lock()  # a thread of the parent may have held it at the fork
    _HOOKS = threading.Lock()


_HOOKS = threading.Lock()  # CallContext.on_abort and aborted: a hook never lost between them
os.register_at_fork(after_in_child=_new_lock_after_fork)


def _nothing() -> None:
    pass


class CallContext:
    """One call being served. Read-only but for :meth:`set_trailer`; the host sets the rest."""

    state: dict[str, Any]
    """Interceptors' per-call state, one entry per interceptor (key: its name); set only for
    calls of a server that has interceptors (:mod:`sockstack.interceptors`)."""

    __slots__ = (
        "_metadata",
        "_on_abort",
        "_peer",
        "abort_code",
        "deadline",
        "method",
        "request_id",
        "state",
        "stream",
        "trailers",
        "transport",
        "upload",
    )

    def __init__(
        self,
        method: str,
        request_id: int,
        transport: str,
        peer: Any,
        metadata: Mapping[str, str | bytes] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.method = method
        self.request_id = request_id
        self.transport = transport
        """``"tcp"``, ``"tls"`` or ``"udp"``."""
        self._peer = peer
        self._metadata = metadata
        self.deadline = deadline
        """When the caller stops waiting, in ``time.monotonic()`` seconds; None when its
        REQUEST carried no deadline."""
        self.trailers: dict[str, str | bytes] | None = None
        """The trailers set so far (None: none), sent with the answer."""
        self.abort_code = 0
        """Host: why the call was stopped (DEADLINE_EXCEEDED, CANCELLED), 0 while it was not."""
        self._on_abort: list[Callable[[int], None]] | None = None
        self.stream: Any = None
        """Host: where a streamed call's items go (a ``host.dispatch.ItemSink``), None for a
        call that is not streamed."""
        self.upload: Any = None
        """Host: where an upload's items come from (a ``host.dispatch.ItemSource``), None for
        a call that is not an upload."""

    @property
    def peer(self) -> str:
        """The caller's address, ``host:port``."""
        peer = self._peer
        if isinstance(peer, tuple) and len(peer) >= 2:
            host, port = peer[0], peer[1]
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        return str(peer)

    @property
    def metadata(self) -> Mapping[str, str | bytes]:
        """The caller's metadata (empty when it sent none), read-only."""
        md = self._metadata
        return _EMPTY if not md else MappingProxyType(dict(md))

    def time_remaining(self) -> float | None:
        """Seconds left until the deadline (0.0 once it has passed), None without one."""
        deadline = self.deadline
        if deadline is None:
            return None
        return max(deadline - _monotonic(), 0.0)

    @property
    def cancelled(self) -> bool:
        """True once the call was cancelled by its client or its deadline passed: its answer is
        already sent (or never will be), so a method polling this can stop its work."""
        if self.abort_code:
            return True
        deadline = self.deadline
        return deadline is not None and _monotonic() >= deadline

    def on_abort(self, fn: Callable[[int], None]) -> Callable[[], None]:
        """Call ``fn(code)`` on the event loop when the call is stopped (its client cancelled it,
        or its deadline passed): what the method waits for (a call to the client's object)
        can end then. Returns what removes it (call it once the wait is over)."""
        hooks: list[Callable[[int], None]] = []
        with _HOOKS:
            code = self.abort_code
            if not code:
                if self._on_abort is None:
                    self._on_abort = hooks
                hooks = self._on_abort
                hooks.append(fn)
        if code:  # stopped already: at once, on this thread
            fn(code)
            return _nothing

        def remove() -> None:
            with _HOOKS:
                try:
                    hooks.remove(fn)
                except ValueError:
                    pass

        return remove

    def aborted(self, code: int) -> None:
        """Host: the call is stopped with ``code``; run the :meth:`on_abort` hooks once."""
        with _HOOKS:
            self.abort_code = code
            hooks, self._on_abort = self._on_abort, None
        for fn in hooks or ():
            try:
                fn(code)
            except Exception:  # (a hook's failure is its own; the others still run)
                logging.getLogger("sockstack.rpc").exception("an on_abort hook failed")

    def set_trailer(self, key: str, value: str | bytes) -> None:
        """Add metadata to the answer (RESPONSE or ERROR trailers, PROTOCOL.md §4): the same
        rules as the caller's (keys of 1-64 bytes of ``[a-z0-9._-]``, str or bytes values, at
        most 64 entries, within the 4,096-byte meta section). Raises ``ValueError`` at once
        for a key or value the rules refuse."""
        trailers = self.trailers
        if trailers is None:
            trailers = {}
        elif key not in trailers and len(trailers) >= MAX_METADATA_ENTRIES:
            raise ValueError(f"at most {MAX_METADATA_ENTRIES} trailers")
        problem = check_metadata({key: value})
        if problem is not None:
            raise ValueError(problem)
        trailers[key] = value
        self.trailers = trailers

    def __repr__(self) -> str:
        return (
            f"CallContext(method={self.method!r}, request_id={self.request_id}, "
            f"transport={self.transport!r}, peer={self.peer!r}, "
            f"time_remaining={self.time_remaining()!r}, cancelled={self.cancelled})"
        )


class LazyContext:
    """The call the host is dispatching (the request, where it came from and its deadline),
    held where readers find it: this thread's holder (:func:`inline_holder`, reused call after
    call, the common case), or :data:`~sockstack.protocol.calls.CURRENT_CALL` when a call is
    dispatched inside another on the same thread. The :class:`CallContext` is built the first
    time something asks for it (:func:`current_context`, an interceptor, a method that is not
    answered at once) and kept: every reader of one call gets the same object, and what it set
    (trailers) is the host's to send. Building a ``CallContext`` for every call cost more than
    the rest of an inline echo's dispatch (PERFORMANCE.md §12). ``deadline`` is read as it is
    by nested calls (``ServedCall``).

    The host fills the fields one by one (no ``__init__``: one Python call less per call)."""

    __slots__ = ("ctx", "deadline", "peer", "request", "transport")

    ctx: CallContext | None
    deadline: float | None
    peer: Any
    request: Request | None
    transport: str

    def context(self) -> CallContext:
        """The call's :class:`CallContext`, built on first use (under a lock: a thread the
        method started may ask at the same moment, and both must get the same object)."""
        ctx = self.ctx
        if ctx is None:
            with _BUILDING:
                ctx = self.ctx
                if ctx is None:
                    req = self.request
                    assert req is not None  # (a holder between calls is never read)
                    ctx = self.ctx = CallContext(
                        req.method,
                        req.request_id,
                        self.transport,
                        self.peer,
                        req.metadata,
                        self.deadline,
                    )
        return ctx


def inline_holder() -> LazyContext:
    """This thread's holder of inline calls (:data:`~sockstack.protocol.calls.INLINE_CALLS`):
    the host on this thread's event loop fills it around each call it dispatches and empties it
    after (``request`` None), so code the method runs on this thread finds the call
    (:func:`current_context`, a nested call's deadline) without a context variable."""
    tid = threading.get_ident()
    held = INLINE_CALLS.get(tid)
    if type(held) is not LazyContext:
        held = LazyContext()
        held.request = None
        held.ctx = None
        held.deadline = None
        held.peer = None
        held.transport = ""
        INLINE_CALLS[tid] = held
    return held


def served_context(value: object) -> CallContext | None:
    """The :class:`CallContext` of what :data:`CURRENT_CALL` holds (built from a
    :class:`LazyContext` on first use); None outside a served call."""
    if type(value) is CallContext:
        return value
    if type(value) is LazyContext:
        return value.context()
    return None


def current_context() -> CallContext:
    """The context of the call being served (inside a method the host runs). Raises
    ``LookupError`` elsewhere."""
    ctx = served_context(served_call())
    if ctx is None:
        raise LookupError(
            "no call is being served here: current_context() works inside a method a sockstack "
            "server runs"
        )
    return ctx


class CallAborted(Exception):
    """Raised in the worker thread instead of running a threaded method whose call was
    cancelled or went past its deadline while it waited for a worker: it does not run."""

    def __init__(self, code: int) -> None:
        super().__init__(ErrorCode(code).name)
        self.code = code

    def outcome(self) -> tuple[bool, tuple[int, str, str]]:
        if self.code == ErrorCode.CANCELLED:
            return False, (self.code, "CANCELLED", "the call was cancelled before it ran")
        if self.code == ErrorCode.SHUTTING_DOWN:
            return False, (self.code, "SHUTTING_DOWN", "the server shut down before it ran")
        return False, (
            self.code,
            "DEADLINE_EXCEEDED",
            "the call's deadline passed while it waited for a worker; it did not run",
        )


def run_guarded(call: Callable[[], _T]) -> _T:
    """In a worker thread (inside the call's copied context): run ``call`` unless its call was
    cancelled or is already late (raises :class:`CallAborted`: it does not run)."""
    ctx = served_context(served_call())
    if ctx is not None:
        if ctx.abort_code:
            raise CallAborted(ctx.abort_code)
        if ctx.deadline is not None and _monotonic() >= ctx.deadline:
            raise CallAborted(ErrorCode.DEADLINE_EXCEEDED)
    return call()
