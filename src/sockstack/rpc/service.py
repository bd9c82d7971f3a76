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

Type hints are the contract (PROTOCOL.md §3.1): arguments are checked and converted to the
annotated types before the method runs (a ``date`` parameter receives a ``date``, a dataclass
parameter the dataclass; a mismatch is ``BAD_ARGUMENTS``), and the result is checked against
the return annotation (``BAD_RESULT``). Parameters without hints are passed as decoded. A
generator or async generator method streams its items (``client.stream(...)``, PROTOCOL.md
§4.3); its return annotation (``Iterator[T]``) is not checked as a result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from sockstack.errors import register_error
from sockstack.host.dispatch import Handler, ServiceError, make_handler

__all__ = ["Handler", "Service", "ServiceError", "collect_handlers", "make_handler", "method"]

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__sockstack_method__"


@dataclass(frozen=True, slots=True)
class _MethodOptions:
    name: str | None
    inline: bool
    readonly: bool = False


@overload
def method(fn: F) -> F: ...
@overload
def method(
    *, name: str | None = None, inline: bool = False, readonly: bool = False
) -> Callable[[F], F]: ...


def method(
    fn: F | None = None, *, name: str | None = None, inline: bool = False, readonly: bool = False
) -> F | Callable[[F], F]:
    """Expose a method to clients, under its own name or ``name``.

    A plain ``def`` runs in the server's thread pool so it can block without stalling other
    clients; ``inline=True`` runs it on the event loop instead (faster, for methods that never
    block). An ``async def`` always runs on the event loop. ``readonly=True`` says it changes
    nothing: the HTTP gateway then also answers it to ``GET /rpc/NAME?arg=value``.
    """

    def mark(f: F) -> F:
        setattr(f, _MARK, _MethodOptions(name, inline, readonly))
        return f

    return mark(fn) if fn is not None else mark


class Service:
    """Base class of services. Only methods marked with :func:`method` are callable remotely.

    ``errors``: the exception types the service's methods raise for their callers. They are
    sent as APPLICATION_ERROR under their name (``__sockstack_name__`` or the class name) with
    their message, as a :class:`ServiceError` is, and a client that registered the same class
    (:func:`sockstack.register_error`) raises it again; any other exception is the server's
    bug: UNEXPECTED_ERROR, logged with its traceback."""

    errors: tuple[type[Exception], ...] = ()


def collect_handlers(service: object, allow_empty: bool = False) -> dict[str, Handler]:
    """The ``@method`` handlers of a service instance, by wire name."""
    handlers: dict[str, Handler] = {}
    errors = tuple(getattr(type(service), "errors", ()) or ())
    for cls in errors:
        register_error(cls)  # raises for what is not an exception class, or a name clash
    for attr in dir(type(service)):
        raw = getattr(type(service), attr, None)
        opts = getattr(raw, _MARK, None)
        if not isinstance(opts, _MethodOptions):
            continue
        bound = getattr(service, attr)
        wire = opts.name or attr
        if wire in handlers:
            raise ValueError(f"two methods are exposed as {wire!r}")
        handlers[wire] = make_handler(wire, bound, opts.inline, errors, readonly=opts.readonly)
    if not handlers and not allow_empty:
        raise ValueError(f"{type(service).__name__} exposes no @method")
    return handlers
