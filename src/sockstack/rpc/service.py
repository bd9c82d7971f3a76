"""Application layer: a service is a class whose ``@method``-marked methods clients may call.

::

    class Calculator(Service):
        @method
        def add(self, a: int, b: int) -> int:          # sync: runs in the server's thread pool
            return a + b

        @method(inline=True)
        def echo(self, value):                          # trivial and non-blocking: runs on the loop
            return value

        @method
        async def slow(self, seconds: float) -> str:   # async: runs on the event loop
            await asyncio.sleep(seconds)
            return "done"

One definition serves every transport (TCP, UDP, and later TLS and HTTP).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

__all__ = ["Handler", "Service", "ServiceError", "collect_handlers", "method"]

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__sockstack_method__"


class ServiceError(Exception):
    """Raise it (or a subclass) from a method to send the client an error meant for it; its
    message is always sent, even when the server hides other exceptions' text."""


@dataclass(frozen=True, slots=True)
class _MethodOptions:
    name: str | None
    inline: bool


@overload
def method(fn: F) -> F: ...
@overload
def method(*, name: str | None = None, inline: bool = False) -> Callable[[F], F]: ...


def method(
    fn: F | None = None, *, name: str | None = None, inline: bool = False
) -> F | Callable[[F], F]:
    """Expose a method to clients, under its own name or ``name``.

    A plain ``def`` runs in the server's thread pool so it can block without stalling other
    clients; ``inline=True`` runs it on the event loop instead (faster, for methods that never
    block). An ``async def`` always runs on the event loop.
    """

    def mark(f: F) -> F:
        setattr(f, _MARK, _MethodOptions(name, inline))
        return f

    return mark(fn) if fn is not None else mark


class Service:
    """Base class of services. Only methods marked with :func:`method` are callable remotely."""


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

    def check_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        """None when the arguments fit the signature, else a message saying why not."""
        if not kwargs and not self.accepts_kwargs:
            n = len(args)
            if n >= self.min_positional and (self.max_positional < 0 or n <= self.max_positional):
                return None  # the common case, without building a BoundArguments
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
    )


def collect_handlers(service: object, allow_empty: bool = False) -> dict[str, Handler]:
    """The ``@method`` handlers of a service instance, by wire name."""
    handlers: dict[str, Handler] = {}
    for attr in dir(type(service)):
        raw = getattr(type(service), attr, None)
        opts = getattr(raw, _MARK, None)
        if not isinstance(opts, _MethodOptions):
            continue
        bound = getattr(service, attr)
        wire = opts.name or attr
        if wire in handlers:
            raise ValueError(f"two methods are exposed as {wire!r}")
        handlers[wire] = make_handler(wire, bound, opts.inline)
    if not handlers and not allow_empty:
        raise ValueError(f"{type(service).__name__} exposes no @method")
    return handlers
