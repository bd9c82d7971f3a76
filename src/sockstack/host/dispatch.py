"""From a decoded REQUEST to an outcome: method lookup, argument check, execution, error mapping.

The host owns one :class:`Dispatcher` with the methods of every pattern (a service's methods
from RPC, ``broker.stats`` from publish/subscribe...), shared by every endpoint so that TCP and
UDP answer the same request the same way. A :class:`Handler` is one callable method; an outcome
is ``(True, result)`` or ``(False, (code, type, message))``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sockstack.errors import ErrorCode
from sockstack.protocol.events import Request
from sockstack.rpc.context import CallAborted, run_guarded

__all__ = [
    "DEFAULT_MAX_WORKERS",
    "Dispatcher",
    "Handler",
    "Outcome",
    "ServiceError",
    "make_handler",
]

log = logging.getLogger("sockstack.server")
Outcome = tuple[bool, Any]
DEFAULT_MAX_WORKERS = 32


class ServiceError(Exception):
    """Raise it (or a subclass) from a method to send the client an error meant for it; its
    message is always sent, even when the server hides other exceptions' text."""


@dataclass(frozen=True, slots=True)
class Handler:
    """One callable method of a service, with what the dispatcher needs to know about it."""

    name: str
    func: Callable[..., Any]
    is_async: bool
    inline: bool
    signature: inspect.Signature
    min_positional: int
    max_positional: int  # -1: unbounded (*args)
    accepts_kwargs: bool
    simple: bool = False
    """A synchronous method with a fixed number of positional parameters (none keyword-only):
    its arguments are checked by counting alone."""
    max_keywords: int = -1
    """Keyword arguments it can take at most (its named parameters), -1 with ``**kwargs``."""

    def check_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        """None when the arguments fit the signature, else a message saying why not."""
        if not kwargs and not self.accepts_kwargs:
            n = len(args)
            if n >= self.min_positional and (self.max_positional < 0 or n <= self.max_positional):
                return None  # the common case, without building a BoundArguments
        if len(kwargs) > self.max_keywords >= 0:
            # Refused by counting: binding 90,000 keywords would cost ~25 ms on the event loop.
            return (
                f"{self.name}{self.signature}: {len(kwargs)} keyword arguments for at most "
                f"{self.max_keywords} parameters"
            )
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            return f"{self.name}{self.signature}: {exc}"
        return None


def make_handler(name: str, func: Callable[..., Any], inline: bool) -> Handler:
    try:  # resolve string annotations so error messages read "a: int", not "a: 'int'"
        sig = inspect.signature(func, eval_str=True)
    except Exception:
        sig = inspect.signature(func)
    min_pos = 0
    max_pos = 0
    accepts_kwargs = False
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            max_pos += 1
            if p.default is p.empty:
                min_pos += 1
        elif p.kind is p.VAR_POSITIONAL:
            max_pos = -1
        elif p.kind is p.KEYWORD_ONLY:
            accepts_kwargs = True  # keyword-only parameters: always bind to check them
        elif p.kind is p.VAR_KEYWORD:
            accepts_kwargs = True
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in sig.parameters.values()):
        min_pos = 1 << 30  # required keyword-only args: never take the fast path
    is_async = inspect.iscoroutinefunction(func)
    return Handler(
        name,
        func,
        is_async,
        inline,
        sig,
        min_pos,
        max_pos if max_pos >= 0 else -1,
        accepts_kwargs,
        simple=not is_async and max_pos >= 0 and not accepts_kwargs,
        max_keywords=-1
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        else sum(p.kind is not p.VAR_POSITIONAL for p in sig.parameters.values()),
    )


class Dispatcher:
    """Runs requests against the methods the host's patterns registered."""

    def add(self, handlers: Mapping[str, Handler], owner: str) -> None:
        """Register methods; a name two patterns both claim is refused."""
        for name, handler in handlers.items():
            if name in self.handlers:
                raise ValueError(f"{owner}: method {name!r} is already served")
            self.handlers[name] = handler

    def __init__(
        self,
        handlers: Mapping[str, Handler] = {},
        *,
        expose_errors: bool = True,
        max_workers: int = DEFAULT_MAX_WORKERS,
    ) -> None:
        self.handlers: dict[str, Handler] = dict(handlers)
        self.expose_errors = expose_errors
        self.max_workers = max_workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.max_workers, thread_name_prefix="sockstack-handler"
            )
        return self._executor

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _failure(self, req: Request, exc: BaseException) -> Outcome:
        if isinstance(exc, ServiceError) or self.expose_errors:
            message = str(exc)
        else:
            message = "internal error (details are in the server's log)"
        if not isinstance(exc, ServiceError):
            log.error("method %r raised %s", req.method, type(exc).__name__, exc_info=exc)
        return False, (ErrorCode.APPLICATION_ERROR, type(exc).__name__, message)

    def dispatch(self, req: Request) -> Outcome | Awaitable[Outcome]:
        """An outcome at once (unknown method, bad arguments, inline methods), or an awaitable
        that must be awaited on the event loop for threaded and async methods."""
        handler = self.handlers.get(req.method)
        if handler is None:
            return False, (ErrorCode.UNKNOWN_METHOD, "UNKNOWN_METHOD", f"no method {req.method!r}")
        args = req.args
        if not req.kwargs and handler.inline and handler.simple:
            # The common case, inlined: positional arguments within the signature's bounds.
            if handler.min_positional <= len(args) <= handler.max_positional:
                try:
                    return True, handler.func(*args)
                except Exception as exc:
                    return self._failure(req, exc)
        problem = handler.check_arguments(args, req.kwargs)
        if problem is not None:
            return False, (ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS", problem)
        if handler.is_async:
            return self._run_async(handler, req)
        if handler.inline:
            try:
                return True, handler.func(*req.args, **req.kwargs)
            except Exception as exc:
                return self._failure(req, exc)
        return self._run_threaded(handler, req)

    async def _run_async(self, handler: Handler, req: Request) -> Outcome:
        try:
            return True, await handler.func(*req.args, **req.kwargs)
        except Exception as exc:
            return self._failure(req, exc)

    async def _run_threaded(self, handler: Handler, req: Request) -> Outcome:
        loop = asyncio.get_running_loop()
        call = functools.partial(handler.func, *req.args, **req.kwargs)
        # In the call's context (current_context() works in the thread), and not at all if the
        # call was cancelled or went past its deadline while it waited for a worker.
        run = contextvars.copy_context().run
        try:
            return True, await loop.run_in_executor(self.executor, run, run_guarded, call)
        except CallAborted as exc:
            return exc.outcome()
        except Exception as exc:
            return self._failure(req, exc)
