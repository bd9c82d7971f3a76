"""Attribute-style calls: ``calc = client.proxy(); calc.add(2, 3)``, for both clients.

``client.proxy()`` makes ``calc.add(2, 3)`` mean ``client.request("add", (2, 3), {})``: with
the blocking :class:`~sockstack.Client` it returns the result; with the
:class:`~sockstack.AsyncClient` it returns an awaitable (``await calc.add(2, 3)``). Dotted names
work as attributes (``client.proxy().broker.stats()`` calls ``broker.stats``). Any name is
accepted when the attribute is read; a name the server does not serve is
:class:`~sockstack.RemoteError` ``UNKNOWN_METHOD`` when it is called. Keyword arguments are all
the method's (``timeout=`` too: the call's own timeout is the client's). Names starting with
``_`` are not methods (``calc._x`` is AttributeError: Python's protocols look such names up);
call those with ``client.call``.

**Typed.** ``client.proxy(Calculator)``, given the service class (or a :class:`typing.Protocol`
that declares its methods), returns an object that mypy sees as a ``Calculator``: the caller's
arguments and the results are checked against the class's signatures (``calc.add(2, "x")`` is
a mypy error). It is a ``cast``, which is honest only where the class's signatures are what a
call returns:

- blocking client: the class's methods, as written (``def add(self, a: int, b: int) -> int``);
  a call returns what the method returns;
- asyncio client: every method must be ``async def`` (the service's own, when its methods are
  all async, or a Protocol written for the callers:
  ``async def add(self, a: int, b: int) -> int: ...``), so that mypy expects an awaitable;
  a class with a plain ``def`` method is refused with TypeError (mypy would take ``calc.add(2,
  3)`` for an ``int`` when it is an awaitable).

Results come back as the class's return annotations say (``-> list[Order]``: a list of
``Order``, converted as the server converts arguments, with
:func:`~sockstack.protocol.codecs.decode_as`); a result that does not fit is
:class:`~sockstack.CodecError` naming the method (the server does not serve what the class
declares). Arguments are not checked before they are sent: mypy checks
them in the caller's code, the server when they arrive (``BAD_ARGUMENTS``).

A method of the class that takes an item stream (a parameter annotated ``Iterator[T]``,
``AsyncIterator[T]``, PROTOCOL.md §4.4; ``Iterable[T]`` stays a plain argument) is called
with the client's ``upload()``: ``calc.total(2, iter(rows))`` sends the stream argument's
items (given by position or by name) and the other arguments with the call (``timeout=`` and
``metadata=`` there are ``upload()``'s own).

Only the class's methods are methods of the proxy: a service's ``@method``s, under their wire
names; a Protocol's functions, each under its own name or the one ``@method(name="...")`` on it
gives. Any other attribute is AttributeError.
``isinstance(proxy, Calculator)`` is False, and nothing checks that the server serves the class
(``rpc.describe`` says what it does). The class's declared ``errors`` are registered
(:func:`sockstack.register_error`), so they come back as those classes.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
)
from typing import Any, Protocol, TypeVar, cast, overload

from sockstack.errors import CodecError, register_error
from sockstack.host.dispatch import TypeCheck, type_check

__all__ = ["AsyncProxies", "BlockingProxies", "Proxy"]

T = TypeVar("T")
_MARK = "__sockstack_method__"  # rpc.service's mark on @method functions
_JSON = 2  # the JSON codec's id: its maps have text keys


_Upload = tuple[str, int]
"""A method's item-stream parameter: its name and its position among the arguments (-1:
keyword-only)."""
_Call = Callable[[str, tuple[Any, ...], dict[str, Any], "TypeCheck | None", "_Upload | None"], Any]
_ITERS = (Iterator, AsyncIterator)


class _Method:
    """``proxy.name``: call it, or read a further attribute for a dotted name."""

    __slots__ = ("_call", "_check", "_name", "_upload")

    def __init__(
        self,
        call: _Call,
        name: str,
        check: TypeCheck | None = None,
        upload: _Upload | None = None,
    ) -> None:
        self._call = call
        self._name = name
        self._check = check
        self._upload = upload

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self._name, args, kwargs, self._check, self._upload)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self._call, f"{self._name}.{name}")

    def __repr__(self) -> str:
        return f"<remote method {self._name!r}>"


class Proxy:
    """The object ``client.proxy()`` returns: ``proxy.name(*args, **kwargs)`` calls ``name``."""

    __slots__ = ("_call", "_names")

    def __init__(
        self,
        call: _Call,
        names: dict[str, tuple[str, TypeCheck | None, _Upload | None]] | None = None,
    ) -> None:
        self._call = call
        self._names = names
        """Attribute -> (wire name, result check) for a typed proxy; None: any attribute."""

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._names is None:
            return _Method(self._call, name)
        found = self._names.get(name)
        if found is None:
            raise AttributeError(f"{name!r} is not a method of the proxied class")
        return _Method(self._call, *found)

    def __dir__(self) -> list[str]:
        return sorted(self._names) if self._names is not None else []

    def __repr__(self) -> str:
        kind = "any method" if self._names is None else ", ".join(sorted(self._names))
        return f"<sockstack proxy: {kind}>"


def _result_check(func: Any) -> TypeCheck | None:
    """How to convert a result to the function's return annotation (None: as it comes)."""
    try:
        annotation = inspect.signature(func, eval_str=True).return_annotation
    except Exception:  # a name the annotation uses is not importable here: not converted
        return None
    return type_check("", annotation)


def _upload_param(func: Any) -> _Upload | None:
    """The function's item-stream parameter (after ``self``), None if it has none."""
    try:
        sig = inspect.signature(func, eval_str=True)
    except Exception:
        try:
            sig = inspect.signature(func)
        except Exception:
            return None
    for i, p in enumerate(list(sig.parameters.values())[1:]):
        if (typing.get_origin(p.annotation) or p.annotation) in _ITERS:
            positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            return p.name, i if positional else -1
    return None


def _methods(
    interface: type, need_async: bool
) -> dict[str, tuple[str, TypeCheck | None, _Upload | None]]:
    """The interface's methods, attribute name -> (wire name, result check, item-stream
    parameter): a service's
    ``@method``s (under their ``name=``), else every public function (a Protocol's;
    ``@method(name=...)`` on one gives its wire name)."""
    marked: dict[str, str] = {}
    plain: dict[str, str] = {}
    functions: dict[str, Any] = {}
    for attr in dir(interface):
        if attr.startswith("_"):
            continue
        raw = inspect.getattr_static(interface, attr, None)
        if not inspect.isfunction(raw):  # staticmethod, classmethod, data: not methods
            continue
        functions[attr] = raw
        opts = getattr(raw, _MARK, None)
        if opts is not None:
            marked[attr] = getattr(opts, "name", None) or attr
        else:
            plain[attr] = attr
    # A service's methods are its @methods (not its helpers); a Protocol's are all of them (a
    # Protocol may mark some with @method(name=...) for their wire names).
    names = marked if marked and not getattr(interface, "_is_protocol", False) else plain | marked
    if need_async:
        sync = [a for a in names if not inspect.iscoroutinefunction(functions[a])]
        if sync:
            raise TypeError(
                f"{interface.__name__}.{sync[0]} is not 'async def': the asyncio client's "
                "typed proxy needs a class whose methods are all async (a typing.Protocol "
                "with 'async def' methods), so that mypy expects awaitables"
            )
    return {
        attr: (wire, _result_check(functions[attr]), _upload_param(functions[attr]))
        for attr, wire in names.items()
    }


def _converted(value: Any, check: TypeCheck | None, method: str, str_keys: bool) -> Any:
    """The result as the interface's return annotation says; CodecError when it does not fit
    (the server is not serving what the interface declares)."""
    if check is None or type(value) in check.fast:
        return value
    try:
        return check.convert(value, str_keys)
    except CodecError as exc:
        raise CodecError(check.mismatch(method, value, str(exc))) from None


def _register_errors(interface: type) -> None:
    for cls in getattr(interface, "errors", ()) or ():
        register_error(cls)


class _Requester(Protocol):
    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = ...,
        kwargs: dict[str, Any] | None = ...,
        *,
        timeout: float | None = ...,
    ) -> Any: ...

    def upload(self, method: str, items: Any, *args: Any, **kwargs: Any) -> Any: ...


class _Proxies:
    _proxy_async = False

    @overload
    def proxy(self: _Requester) -> Proxy: ...
    @overload
    def proxy(self: _Requester, interface: Callable[..., T]) -> T: ...

    # Callable[..., T] rather than type[T]: mypy refuses a Protocol (an abstract class) where
    # type[T] is expected, and takes it as a callable returning T.
    def proxy(self: _Requester, interface: Callable[..., Any] | None = None) -> Any:
        """Attribute-style calls to the server's methods; ``interface`` (the service class, or
        a Protocol): typed as it, for mypy (module :mod:`sockstack.rpc.proxy` says what that
        checks). A typed proxy registers the class's declared ``errors``."""

        str_keys = getattr(getattr(self, "codec", None), "id", 1) == _JSON
        asynchronous = getattr(self, "_proxy_async", False)

        def call(
            name: str,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            check: TypeCheck | None,
            upload: _Upload | None = None,
        ) -> Any:
            if upload is not None:
                pending = _uploaded(self, name, args, kwargs, upload)
            else:
                pending = self.request(name, args, kwargs)
            if check is None:
                return pending
            if asynchronous:
                return _await_converted(pending, check, name, str_keys)
            return _converted(pending, check, name, str_keys)

        if interface is None:
            return Proxy(call)
        if not isinstance(interface, type):
            raise TypeError(f"proxy() takes a class (a service or a Protocol), not {interface!r}")
        names = _methods(interface, asynchronous)
        _register_errors(interface)
        return cast(Any, Proxy(call, names))


def _uploaded(
    client: _Requester, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], up: _Upload
) -> Any:
    """``client.upload(...)`` with the item-stream argument taken out of the call's arguments
    (by name, else by position)."""
    param, index = up
    if param in kwargs:
        kwargs = dict(kwargs)
        items = kwargs.pop(param)
    elif 0 <= index < len(args):
        items = args[index]
        args = args[:index] + args[index + 1 :]
    else:
        raise TypeError(f"{name}() needs its item stream {param!r}")
    return client.upload(name, items, *args, **kwargs)


async def _await_converted(
    pending: Awaitable[Any], check: TypeCheck, method: str, str_keys: bool
) -> Any:
    return _converted(await pending, check, method, str_keys)


class BlockingProxies(_Proxies):
    """``proxy()`` for :class:`~sockstack.Client`: a call returns the result."""


class AsyncProxies(_Proxies):
    """``proxy()`` for :class:`~sockstack.AsyncClient`: a call returns an awaitable."""

    _proxy_async = True
