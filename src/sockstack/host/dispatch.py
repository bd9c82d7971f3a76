"""From a decoded REQUEST to an outcome: method lookup, argument check, execution, error mapping.

Arguments are checked against the method's signature and, where it has them, its type hints
(PROTOCOL.md §3.1): a parameter annotated ``int``, ``str``, ``float``, ``bytes`` or ``bool``
costs one ``type(x) in ...`` test; any other annotation (``datetime``, a dataclass, ``set[int]``,
``X | None``...) is converted with :func:`~sockstack.protocol.codecs.decode_as`, so the method
receives the declared Python type. A mismatch is ``BAD_ARGUMENTS`` naming the parameter, the
type and what came, before the method runs. The result is checked against the return annotation
the same way: a mismatch is ``BAD_RESULT`` (the server's bug, logged). Parameters without a hint,
or with one no codec can carry (a plain class, a ``Callable``), are not checked, as before.

The host owns one :class:`Dispatcher` with the methods of every pattern (a service's methods
from RPC, ``broker.stats`` from publish/subscribe...), shared by every endpoint so that TCP and
UDP answer the same request the same way. A :class:`Handler` is one callable method; an outcome
is ``(True, result)`` or ``(False, (code, type, message))``.

A generator or async generator method streams its items (PROTOCOL.md §4, ITEM/CREDIT): called
with the STREAM flag, its call's outcome is an awaitable that pulls the items while the stream's
flow-control window allows and hands each to the host's :class:`ItemSink` (the call context's
``stream``), then gives the generator's return value (None for most) as the result. A sync
generator's ``next()`` always runs in a worker thread, never on the event loop (items are
pulled in batches as long as the window has room, so one stream holds a worker only while it
produces); an async generator runs on the loop. The generator is closed whatever ends the call:
its last item, an exception, CANCEL, the deadline, a lost connection (its ``finally`` runs).
Called without STREAM, a generator method is refused with STREAM_MISMATCH and does not run.

A method with a parameter annotated ``Iterator[T]`` (``def``), or ``AsyncIterator[T]``
(``async def``), takes an uploaded item stream
(PROTOCOL.md §4.4): called with the UPLOAD flag, the host gives that parameter an iterator over
the items the client sends (the call context's ``upload``, an :class:`ItemSource`); each item
is converted to ``T`` as an argument is (a mismatch ends the call with BAD_ARGUMENTS naming the
parameter and the item's index). The parameter is the last positional-or-keyword parameter or a
keyword-only one; the REQUEST's arguments fill the others. Called without UPLOAD (or a method
without such a parameter called with it), the call is refused with STREAM_MISMATCH.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import itertools
import logging
import threading
import time
import typing
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Protocol, cast

import msgspec

from sockstack.errors import CodecError, ErrorCode, LocalProtocolError, RemoteError, wire_name
from sockstack.interceptors import Failure, Hooks, Refused, await_quietly, call_quietly
from sockstack.protocol.calls import served_call
from sockstack.protocol.codecs import decode_as
from sockstack.protocol.events import Request
from sockstack.rpc.context import CallAborted, CallContext, run_guarded, served_context

__all__ = [
    "DEFAULT_MAX_WORKERS",
    "Dispatcher",
    "Handler",
    "ItemSink",
    "ItemSource",
    "Outcome",
    "ServiceError",
    "TypeCheck",
    "UploadParam",
    "make_handler",
]

log = logging.getLogger("sockstack.server")
_monotonic = time.monotonic


def _one(req: Request, args: Any) -> Request:
    """The request of one call of a batch: the batch's, with that call's arguments."""
    return Request(
        req.request_id, req.method, args, {}, req.codec, req.budget_ms, req.metadata, False, False
    )


def _batch_error(i: int, detail: tuple[int, str, str]) -> list[Any]:
    """A failed call's entry in a batch's errors: ``[index, code, name, message]``."""
    return [i, int(detail[0]), detail[1], detail[2]]


def _batch_late(errors: list[list[Any]], i: int, n: int) -> None:
    """The calls ``i..n-1`` of a batch, not run: its deadline passed."""
    errors.extend(
        [j, int(ErrorCode.DEADLINE_EXCEEDED), "DEADLINE_EXCEEDED", "the batch's deadline passed"]
        for j in range(i, n)
    )


_JSON_CODEC = 2  # JSON maps have text keys: decode_as converts them to the declared key type
Outcome = tuple[bool, Any]
DEFAULT_MAX_WORKERS = 32


class ServiceError(Exception):
    """Raise it (or a subclass) from a method to send the client an error meant for it; its
    message is always sent, even when the server hides other exceptions' text."""


_PLAIN: dict[Any, tuple[type, ...]] = {
    int: (int,),  # not bool: True is not an int argument
    float: (float, int),
    str: (str,),
    bytes: (bytes,),  # JSON's base64 text is converted by the slow path
    bool: (bool,),
    None: (type(None),),
    type(None): (type(None),),
}


class _Anything:
    """A container of every type: an unchecked parameter's entry in ``fast_positional``."""

    __slots__ = ()

    def __contains__(self, item: object) -> bool:
        return True


_ANYTHING = _Anything()

SYNC_GENERATOR = 1
ASYNC_GENERATOR = 2


class ItemSink(Protocol):
    """Where a streamed call's items go (the host's side of one stream: PROTOCOL.md §4)."""

    def room(self) -> int:
        """Bytes of ITEM bodies that may be sent now (the window less those not granted back);
        an item may be sent while this is above 0."""
        ...

    async def wait_room(self) -> None:
        """Return once :meth:`room` is above 0."""
        ...

    def encode(self, item: Any) -> bytes:
        """The ITEM frame of ``item`` (thread-safe: workers call it). Raises
        :class:`CodecError`, or :class:`LocalProtocolError` for an item over the frame limit."""
        ...

    def push(self, frame: bytes) -> None:
        """On the loop: queue an encoded ITEM (its body counts against the window)."""
        ...

    def push_threadsafe(self, frame: bytes) -> None:
        """From a worker thread: queue an encoded ITEM (in order, written soon)."""
        ...


class ItemSource(Protocol):
    """Where an upload's items come from (the host's side of one upload: PROTOCOL.md §4.4):
    the items the client sent, in order, granted back by CREDIT as they are taken."""

    def take(self) -> tuple[bool, Any]:
        """In a worker thread: (True, the next item's value), blocking until one came, or
        (False, None) after the last. Raises :class:`CallAborted` once the call was stopped
        (CANCEL, deadline, lost connection, a broken window)."""
        ...

    async def take_async(self) -> tuple[bool, Any]:
        """On the loop: as :meth:`take`."""
        ...

    def close(self) -> None:
        """The call ended: items still queued and any later ones are dropped."""
        ...


class _ItemRefused(Exception):
    """An uploaded item that does not fit its parameter's type: raised in the method; the
    call's outcome is BAD_ARGUMENTS whatever the method does with it."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome[1][2])
        self.outcome = outcome


class _Upload:
    """The iterator a method's item-stream parameter receives (sync and async forms)."""

    __slots__ = ("failure", "index", "method", "param", "source", "str_keys")

    def __init__(self, source: ItemSource, method: str, param: UploadParam, str_keys: bool):
        self.source = source
        self.method = method
        self.param = param
        self.str_keys = str_keys
        self.index = 0
        self.failure: Outcome | None = None

    def _convert(self, value: Any) -> Any:
        check = self.param.check
        index = self.index
        self.index = index + 1
        if check is None or type(value) in check.fast:
            return value
        try:
            return check.convert(value, self.str_keys)
        except CodecError as exc:
            message = (
                f"{self.method}(): parameter {self.param.name!r}, item {index}: expects "
                f"{_type_name(check.annotation)}, got {_got(value)}"
            )
            detail = str(exc)
            if detail and not (detail.startswith("Expected `") and " - at " not in detail):
                message += f" ({detail})"
            self.failure = (False, (ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS", message))
            self.source.close()  # the call ends with this: later items are dropped
            raise _ItemRefused(self.failure) from None

    def _fail_again(self) -> None:
        if self.failure is not None:  # taken again after the refusal: it stays refused
            raise _ItemRefused(self.failure)


class _SyncUpload(_Upload, Iterator[Any]):
    __slots__ = ()

    def __iter__(self) -> _SyncUpload:
        return self

    def __next__(self) -> Any:
        self._fail_again()
        more, value = self.source.take()
        if not more:
            raise StopIteration
        return self._convert(value)


class _AsyncUpload(_Upload, AsyncIterator[Any]):
    __slots__ = ()

    def __aiter__(self) -> _AsyncUpload:
        return self

    async def __anext__(self) -> Any:
        self._fail_again()
        more, value = await self.source.take_async()
        if not more:
            raise StopAsyncIteration
        return self._convert(value)


@dataclass(frozen=True, slots=True)
class UploadParam:
    """A method's item-stream parameter (PROTOCOL.md §4.4)."""

    name: str
    annotation: Any
    """Each item's annotation (``T`` of ``Iterator[T]``), ``inspect.Parameter.empty`` if
    none."""
    check: TypeCheck | None
    """How each item is checked (None: not checked)."""
    signature: inspect.Signature
    """The method's signature without this parameter: what the REQUEST's arguments bind to."""


# Iterator/AsyncIterator only: Iterable[T] is the usual way to say "a list of T" in services
# written before uploads (called with a list), which must keep working.
_SYNC_ITERS = (Iterator,)
_ASYNC_ITERS = (AsyncIterator,)


def _upload_param(
    name: str, sig: inspect.Signature, is_async: bool, streaming: int
) -> UploadParam | None:
    """The method's item-stream parameter, None if it has none; TypeError for one the host
    cannot fill (two of them, one in the wrong place or of the wrong flavour)."""
    found = []
    for p in sig.parameters.values():
        origin = typing.get_origin(p.annotation) or p.annotation
        if origin in _SYNC_ITERS or origin in _ASYNC_ITERS:
            found.append((p, origin in _ASYNC_ITERS))
    if not found:
        return None
    if len(found) > 1:
        raise TypeError(f"method {name!r}: at most one parameter takes an item stream")
    p, is_async_iter = found[0]
    if streaming:
        raise TypeError(
            f"method {name!r}: a generator method cannot take an item stream too (a call both "
            "streamed and uploaded is not supported)"
        )
    if is_async_iter != is_async:
        want = "AsyncIterator[T] (async def)" if is_async else "Iterator[T] (def)"
        raise TypeError(f"method {name!r}: parameter {p.name!r} must be annotated {want}")
    params = list(sig.parameters.values())
    later = params[params.index(p) + 1 :]
    if p.kind is p.POSITIONAL_ONLY or (
        p.kind is p.POSITIONAL_OR_KEYWORD
        and any(q.kind in (q.POSITIONAL_OR_KEYWORD, q.VAR_POSITIONAL) for q in later)
    ):
        raise TypeError(
            f"method {name!r}: parameter {p.name!r} (the item stream) must be the last "
            "positional parameter, or keyword-only"
        )
    args = typing.get_args(p.annotation)
    each = args[0] if args else inspect.Parameter.empty
    return UploadParam(
        p.name,
        each,
        type_check(p.name, each),
        sig.replace(parameters=[q for q in params if q is not p]),
    )


class _BadItem(Exception):
    """An item the stream could not carry: the call ends with this outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome[1][2])
        self.outcome = outcome


def _encoded(sink: ItemSink, item: Any) -> bytes:
    try:
        return sink.encode(item)
    except CodecError as exc:
        raise _BadItem(
            (False, (ErrorCode.RESULT_NOT_ENCODABLE, "RESULT_NOT_ENCODABLE", f"an item: {exc}"))
        ) from None
    except LocalProtocolError as exc:
        raise _BadItem(
            (False, (ErrorCode.RESULT_TOO_LARGE, "RESULT_TOO_LARGE", f"an item: {exc.message}"))
        ) from None


def _late(ctx: Any) -> int:
    """Why a streamed call must stop now (0: it need not)."""
    if type(ctx) is not CallContext:
        return 0
    if ctx.abort_code:
        return ctx.abort_code
    if ctx.deadline is not None and ctx.cancelled:
        return ErrorCode.DEADLINE_EXCEEDED
    return 0


def _pull(gen: Any, room: int, sink: ItemSink) -> tuple[bool, Any]:
    """In a worker thread, in the call's context: pull items while ``room`` bytes allow (the
    last one may pass it), hand each to the sink. (True, return value) when the generator
    ended, (False, None) when the room is used up. Raises what the generator raises,
    :class:`_BadItem`, or :class:`CallAborted` once the call was stopped."""
    ctx = served_context(served_call())
    push = sink.push_threadsafe
    while room > 0:
        code = _late(ctx)
        if code:
            raise CallAborted(code)
        try:
            item = next(gen)
        except StopIteration as stop:
            return True, stop.value
        frame = _encoded(sink, item)
        room -= len(frame) - 16
        push(frame)
    return False, None


def _mismatch(message: str) -> Outcome:
    return False, (ErrorCode.STREAM_MISMATCH, "STREAM_MISMATCH", message)


def _stopped(code: int) -> Outcome:
    if code == ErrorCode.CANCELLED:
        return False, (code, "CANCELLED", "the call was cancelled by the client")
    return False, (code, "DEADLINE_EXCEEDED", "the call's deadline passed; it did not finish")


@dataclass(frozen=True, slots=True)
class TypeCheck:
    """What one annotation asks of a value: ``fast`` holds the types accepted as they are (all
    of them for a plain annotation); anything else goes through :func:`decode_as`."""

    name: str
    """The parameter's name ("" for the result)."""
    annotation: Any
    fast: tuple[type, ...]
    plain: bool
    """The annotation is int, float, str, bytes, bool or None: a value of another type is only
    converted for bytes (JSON's base64 text)."""

    def convert(self, value: Any, str_keys: bool) -> Any:
        """The value as the annotation's type; CodecError if it cannot be."""
        if type(value) in self.fast:
            return value
        if self.plain and self.annotation is not bytes:
            raise CodecError("")
        return decode_as(value, self.annotation, str_keys=str_keys)

    def mismatch(self, method: str, value: Any, detail: str) -> str:
        what = f"parameter {self.name!r}" if self.name else "its result"
        message = f"{method}(): {what} expects {_type_name(self.annotation)}, got {_got(value)}"
        if detail and not (detail.startswith("Expected `") and " - at " not in detail):
            message += f" ({detail})"
        return message


def _type_name(annotation: Any) -> str:
    """``int``, ``date``, ``Order``, ``set[str] | None``: a class by its own name, as the
    method's author wrote it (not ``datetime.date``, ``__main__.Order``)."""
    if annotation is None or annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__qualname__
    return inspect.formatannotation(annotation).replace("typing.", "")


def _got(value: Any) -> str:
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        text = repr(value)
        shown = text if len(text) <= 40 else text[:37] + "..."
        return f"{type(value).__name__} {shown}" if value is not None else "None"
    if isinstance(value, list | dict | tuple):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _carried(annotation: Any) -> bool:
    """True when a codec can carry values of this annotation, so that checking it means
    something: not ``Any``, nor anywhere in it a plain class, ``object``, a ``Callable``...
    (msgspec's CustomType). ``Any`` inside (``dict[str, Any]``) is fine: the rest is checked."""
    try:
        info = msgspec.inspect.type_info(annotation)
    except Exception:  # a TypeVar, an unresolved string annotation...
        return False
    if isinstance(info, msgspec.inspect.AnyType):
        return False
    seen: set[int] = set()

    def walk(t: Any) -> bool:
        if isinstance(t, msgspec.inspect.CustomType):
            return False
        if id(t) in seen:
            return True
        seen.add(id(t))
        for attr in ("item_type", "key_type", "value_type"):
            sub = getattr(t, attr, None)
            if sub is not None and not walk(sub):
                return False
        for attr in ("types", "item_types"):
            for sub in getattr(t, attr, ()) or ():
                if not walk(sub):
                    return False
        return all(walk(f.type) for f in getattr(t, "fields", ()) or ())

    return walk(info)


def type_check(name: str, annotation: Any) -> TypeCheck | None:
    """How to check a value against ``annotation``; None when it is not checked."""
    if annotation is inspect.Parameter.empty:
        return None
    try:
        fast = _PLAIN.get(annotation)
    except TypeError:  # an unhashable annotation
        fast = None
    if fast is not None:
        return TypeCheck(name, annotation, fast, True)
    if not _carried(annotation):
        return None
    cls = annotation if isinstance(annotation, type) else None
    # A value already of the declared class is kept without a conversion (a datetime from the
    # msgpack timestamp); dataclasses and NamedTuples are not: their fields are checked.
    keep = (
        (cls,)
        if cls is not None
        and not dataclasses.is_dataclass(cls)
        and not issubclass(cls, tuple)
        and cls not in (dict, list, set, frozenset)
        else ()
    )
    return TypeCheck(name, annotation, keep, False)


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
    positional: tuple[TypeCheck | None, ...] | None = None
    """Per positional parameter, its check (None: unchecked); None when no parameter is
    checked at all (the method has no usable hints: arguments are only counted)."""
    var_positional: TypeCheck | None = None
    keywords: Mapping[str, TypeCheck] | None = None
    """Checks of the parameters that may come by keyword (``**kwargs``' under "")."""
    fast_positional: tuple[tuple[type, ...] | _Anything, ...] = ()
    """Per positional parameter, the types the inline fast path accepts as they are (plain
    annotations; anything for an unchecked parameter); empty when some check is not plain."""
    plain_signatures: frozenset[tuple[type, ...]] | None = None
    """Every plain annotated parameter: the tuples of argument types that fit as they are."""
    returns: TypeCheck | None = None
    """The return annotation's check; None without one (or one that is not checked)."""
    errors: tuple[type[BaseException], ...] = ()
    """The exception types its service declares (``errors = (...)``): sent to the client as
    APPLICATION_ERROR under their wire name, as a :class:`ServiceError` is; any other exception
    is UNEXPECTED_ERROR."""
    streaming: int = 0
    """SYNC_GENERATOR (1) or ASYNC_GENERATOR (2): the method streams its items; 0: it does
    not."""
    upload: UploadParam | None = None
    """Its item-stream parameter (it takes an upload), None without."""
    bare: bool = False
    """Inline and simple, no parameter and no result checked: the dispatcher's quickest path
    (arguments counted, the result sent as it is)."""
    readonly: bool = False
    """Marked read-only (``@method(readonly=True)``): it changes nothing, so the HTTP gateway
    also answers it to ``GET`` (cacheable, safe to retry)."""

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

    def plain_arguments_fit(self, args: Sequence[Any]) -> bool:
        """The inline fast path's test: every positional argument is of its plain type."""
        if self.plain_signatures is not None:  # one set lookup (~100 ns for 2-4 arguments)
            return tuple(map(type, args)) in self.plain_signatures
        for t, fast in zip(map(type, args), self.fast_positional):  # noqa: B905
            if t not in fast:
                return False
        return True

    def convert_arguments(
        self, args: Sequence[Any], kwargs: dict[str, Any], str_keys: bool
    ) -> tuple[Sequence[Any], dict[str, Any]] | str:
        """The arguments as the annotations' types, or a message saying which one does not
        fit (call it after :meth:`check_arguments`). ``str_keys``: the body was JSON."""
        checks = self.positional or ()
        out_args: list[Any] | None = None
        for i, value in enumerate(args):
            check = checks[i] if i < len(checks) else self.var_positional
            if check is None or type(value) in check.fast:
                continue
            try:
                converted = check.convert(value, str_keys)
            except CodecError as exc:
                return check.mismatch(self.name, value, str(exc))
            if out_args is None:
                out_args = list(args)
            out_args[i] = converted
        out_kwargs = kwargs
        if kwargs and self.keywords:
            for key, value in kwargs.items():
                check = self.keywords.get(key) or self.keywords.get("")
                if check is None or type(value) in check.fast:
                    continue
                try:
                    converted = check.convert(value, str_keys)
                except CodecError as exc:
                    return check.mismatch(self.name, value, str(exc))
                if out_kwargs is kwargs:
                    out_kwargs = dict(kwargs)
                out_kwargs[key] = converted
        return (args if out_args is None else out_args), out_kwargs

    def check_result(self, result: Any) -> str | None:
        """None when the result fits the return annotation, else a message saying why not."""
        check = self.returns
        if check is None or type(result) in check.fast:
            return None
        try:
            check.convert(result, False)
        except CodecError as exc:
            return check.mismatch(self.name, result, str(exc))
        return None


def _plain_signatures(
    checks: Sequence[TypeCheck | None], low: int, high: int
) -> frozenset[tuple[type, ...]] | None:
    """Every tuple of argument types that fits, when all parameters are plain and annotated
    and there are at most 256 such tuples (``float`` takes int or float: 2 each)."""
    if any(c is None or not c.plain for c in checks) or high < 0 or low > high:
        return None
    out: set[tuple[type, ...]] = set()
    for n in range(low, high + 1):
        combos = itertools.product(*(c.fast for c in checks[:n] if c is not None))
        out.update(itertools.islice(combos, 257))
        if len(out) > 256:
            return None
    return frozenset(out)


def make_handler(
    name: str,
    func: Callable[..., Any],
    inline: bool,
    errors: tuple[type[BaseException], ...] = (),
    *,
    readonly: bool = False,
) -> Handler:
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
    streaming = (
        SYNC_GENERATOR
        if inspect.isgeneratorfunction(func)
        else ASYNC_GENERATOR
        if inspect.isasyncgenfunction(func)
        else 0
    )
    if streaming:
        inline = False  # its items are pulled by the stream's pump, never inline
    is_async = inspect.iscoroutinefunction(func)
    upload = _upload_param(name, sig, is_async, streaming)
    if upload is not None:
        inline = False  # it waits for the client's items: a worker thread, or a task
    positional: list[TypeCheck | None] = []
    var_positional: TypeCheck | None = None
    keywords: dict[str, TypeCheck] = {}
    for p in sig.parameters.values():
        if upload is not None and p.name == upload.name:
            continue  # the host fills it (by keyword); the request's arguments fill the rest
        check = type_check(p.name, p.annotation)
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(check)
        elif p.kind is p.VAR_POSITIONAL:
            var_positional = check
        if check is not None and p.kind is not p.POSITIONAL_ONLY and p.kind is not p.VAR_POSITIONAL:
            keywords["" if p.kind is p.VAR_KEYWORD else p.name] = check
    checked = any(c is not None for c in positional) or var_positional is not None
    # A generator's return annotation (Iterator[T], AsyncIterator[T]) describes the stream, not
    # a result: items are not checked against it.
    returns = None if streaming else type_check("", sig.return_annotation)
    simple = not is_async and not streaming and upload is None and max_pos >= 0
    simple = simple and not accepts_kwargs
    return Handler(
        name,
        func,
        is_async,
        inline,
        sig,
        min_pos,
        max_pos if max_pos >= 0 else -1,
        accepts_kwargs,
        simple=simple,
        max_keywords=-1
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        else sum(p.kind is not p.VAR_POSITIONAL for p in sig.parameters.values()),
        positional=tuple(positional) if checked else None,
        var_positional=var_positional,
        keywords=keywords or None,
        fast_positional=tuple(_ANYTHING if c is None else c.fast for c in positional)
        if all(c is None or c.plain for c in positional) and var_positional is None
        else (),
        plain_signatures=_plain_signatures(positional, min_pos, max_pos)
        if var_positional is None
        else None,
        returns=returns,
        bare=inline and simple and not checked and returns is None,
        errors=errors,
        streaming=streaming,
        upload=upload,
        readonly=readonly,
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
        interceptors: Sequence[object] = (),
    ) -> None:
        self.handlers: dict[str, Handler] = dict(handlers)
        self.expose_errors = expose_errors
        self.max_workers = max_workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Worker threads: max_workers run methods at once (a slot each); as many more may wait
        # for a call to a client's object (a callback) with their slot given back meanwhile
        # (:meth:`waiting`), so that such waits never take the workers other calls need.
        self._slots = threading.Semaphore(max_workers)
        self._waiting_lock = threading.Lock()
        self.waiting_now = 0
        """Worker threads waiting for a callback, their slot given back (at most max_workers)."""
        self._held = threading.local()
        self.hooks = Hooks(interceptors)
        if self.hooks:  # else dispatch stays the plain method: no cost without interceptors
            self.dispatch = self._dispatch_intercepted  # type: ignore[method-assign]

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                2 * self.max_workers, thread_name_prefix="sockstack-handler"
            )
        return self._executor

    def _in_slot(self, call: Callable[[], Any]) -> Any:
        """In a worker thread: run ``call`` (:func:`run_guarded`) holding one of the
        ``max_workers`` slots."""
        self._slots.acquire()
        held = self._held
        held.slot = True
        try:
            if self._executor is None:  # shut down while it waited for a slot: not run
                raise CallAborted(ErrorCode.SHUTTING_DOWN)
            return run_guarded(call)
        finally:
            if held.slot:  # (one that waited on a client may go on without one: waiting())
                self._slots.release()
            held.slot = False

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a worker thread's wait for something only a client can end (a call to its
        object): the thread's slot is given back meanwhile, so other calls still get a worker.
        At most ``max_workers`` threads wait so at once: one more raises
        :class:`~sockstack.errors.RemoteError` OVERLOADED (nothing waited for). Outside a
        worker's slot (the event loop, a thread of the method's own): nothing changes.

        After the wait the thread takes a slot back if one is free, else it goes on without
        one (never blocks for it): the call that took its slot may wait for something this
        method holds (a lock around a call to a listener), and both must end. So up to
        ``2 * max_workers`` methods may run at once for a while, never more threads."""
        held = self._held
        if not getattr(held, "slot", False):
            yield
            return
        with self._waiting_lock:
            if self.waiting_now >= self.max_workers:
                raise RemoteError(
                    "OVERLOADED",
                    f"{self.max_workers} worker threads already wait for calls to clients' "
                    "objects (max_workers): this one was not made",
                    ErrorCode.OVERLOADED,
                )
            self.waiting_now += 1
        held.slot = False
        self._slots.release()
        try:
            yield
        finally:
            held.slot = self._slots.acquire(blocking=False)
            with self._waiting_lock:
                self.waiting_now -= 1

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _failure(self, req: Request, exc: BaseException) -> Outcome:
        """A declared error (a :class:`ServiceError`, or a type the service lists in its
        ``errors``) is APPLICATION_ERROR under its wire name, message always sent; any other
        exception is the server's bug: UNEXPECTED_ERROR, logged with its traceback, its message
        sent unless the server hides errors."""
        handler = self.handlers.get(req.method)
        if isinstance(exc, ServiceError) or (
            handler is not None and handler.errors and isinstance(exc, handler.errors)
        ):
            # (a pattern's own refusal may carry its code: objects.attach's SESSION_EXPIRED)
            code = getattr(exc, "_sockstack_code", ErrorCode.APPLICATION_ERROR)
            return False, (code, wire_name(type(exc)), str(exc))
        log.error("method %r raised %s", req.method, type(exc).__name__, exc_info=exc)
        if self.expose_errors:
            message = str(exc)
        else:
            message = "internal error (details are in the server's log)"
        return False, (ErrorCode.UNEXPECTED_ERROR, type(exc).__name__, message)

    def dispatch(self, req: Request) -> Outcome | Awaitable[Outcome]:
        """An outcome at once (unknown method, bad arguments, inline methods), or an awaitable
        that must be awaited on the event loop for threaded and async methods."""
        handler = self.handlers.get(req.method)
        if handler is None:
            return False, (ErrorCode.UNKNOWN_METHOD, "UNKNOWN_METHOD", f"no method {req.method!r}")
        args = req.args
        if handler.bare and not req.kwargs:  # the quickest: counted, called, sent as it is
            if handler.min_positional <= len(args) <= handler.max_positional:
                try:
                    return True, handler.func(*args)
                except Exception as exc:
                    return self._failure(req, exc)
        return self._dispatch_handler(handler, req)

    def dispatch_batch(self, req: Request) -> Outcome | Awaitable[Outcome]:
        """A BATCH request (PROTOCOL.md §4.7): its calls one after the other, each exactly as a
        REQUEST with its arguments runs (interceptors, argument checks and conversion, result
        check); the outcome ``[results, errors]``, ``errors`` the ``[index, code, name,
        message]`` of each call that failed. Inline methods run in one loop here; an ``async
        def`` or threaded one makes the rest run in the call's task, one call at a time. Past
        the deadline the calls not yet run fail with DEADLINE_EXCEEDED and do not run."""
        handler = self.handlers.get(req.method)
        if handler is None:
            return False, (ErrorCode.UNKNOWN_METHOD, "UNKNOWN_METHOD", f"no method {req.method!r}")
        if handler.streaming or handler.upload is not None:
            return False, (
                ErrorCode.STREAM_MISMATCH,
                "STREAM_MISMATCH",
                f"method {req.method!r} streams: it cannot be called in a batch",
            )
        calls = req.args
        n = len(calls)
        errors: list[list[Any]] = []
        call = served_call()
        deadline = call.deadline if call is not None else None
        if handler.bare and not self.hooks:
            # The quickest (as dispatch's): plain arguments, counted, called, kept as they are.
            func, low, high = handler.func, handler.min_positional, handler.max_positional
            results: list[Any] = []
            if not n or (low <= min(map(len, calls)) and max(map(len, calls)) <= high):
                # Every call's arguments fit: the calls made by itertools.starmap, 256 between
                # two readings of the clock. An exception stops extend() after the results
                # before it (kept): that call's error, then on from the next one.
                it = iter(calls)
                done = 0
                while done < n:
                    if deadline is not None and _monotonic() >= deadline:
                        _batch_late(errors, done, n)
                        results += [None] * (n - done)
                        break
                    try:
                        results.extend(itertools.starmap(func, itertools.islice(it, 256)))
                    except Exception as exc:
                        errors.append(_batch_error(len(results), self._failure(req, exc)[1]))
                        results.append(None)
                    done = len(results)
                return True, [results, errors]
            append = results.append
            for start in range(0, n, 64):
                if deadline is not None and _monotonic() >= deadline:
                    _batch_late(errors, start, n)
                    results += [None] * (n - start)
                    break
                for args in calls[start : start + 64]:
                    if low <= len(args) <= high:
                        try:
                            append(func(*args))
                            continue
                        except Exception as exc:
                            outcome = self._failure(req, exc)
                    else:
                        # BAD_ARGUMENTS, worded as usual (a tuple: a bare method is inline)
                        outcome = cast(Outcome, self.dispatch(_one(req, args)))
                        if outcome[0]:
                            append(outcome[1])
                            continue
                    errors.append(_batch_error(len(results), outcome[1]))
                    append(None)
            return True, [results, errors]
        return self._batch_from(req, 0, [None] * n, errors, deadline)

    def _batch_from(
        self,
        req: Request,
        i: int,
        results: list[Any],
        errors: list[list[Any]],
        deadline: float | None,
    ) -> Outcome | Awaitable[Outcome]:
        """The calls of a batch from ``i`` on, inline while they answer at once."""
        calls = req.args
        dispatch = self.dispatch
        n = len(calls)
        while i < n:
            if deadline is not None and _monotonic() >= deadline:  # before each call here
                _batch_late(errors, i, n)
                break
            outcome = dispatch(_one(req, calls[i]))
            if not isinstance(outcome, tuple):
                return self._batch_later(req, i, outcome, results, errors, deadline)
            if outcome[0]:
                results[i] = outcome[1]
            else:
                errors.append(_batch_error(i, outcome[1]))
            i += 1
        return True, [results, errors]

    async def _batch_later(
        self,
        req: Request,
        i: int,
        pending: Awaitable[Outcome],
        results: list[Any],
        errors: list[list[Any]],
        deadline: float | None,
    ) -> Outcome:
        """The rest of a batch, in the call's task: awaits each call that does not answer at
        once (cancelling the task, by CANCEL or the deadline, stops the batch there)."""
        calls = req.args
        dispatch = self.dispatch
        n = len(calls)
        next_one: Outcome | Awaitable[Outcome] = pending
        while True:
            outcome = next_one if isinstance(next_one, tuple) else await next_one
            if outcome[0]:
                results[i] = outcome[1]
            else:
                errors.append(_batch_error(i, outcome[1]))
            i += 1
            if i >= n:
                return True, [results, errors]
            if deadline is not None and _monotonic() >= deadline:
                _batch_late(errors, i, n)
                return True, [results, errors]
            next_one = dispatch(_one(req, calls[i]))

    def dispatch_to(self, handler: Handler, req: Request) -> Outcome | Awaitable[Outcome]:
        """:meth:`dispatch` with the handler given instead of looked up by ``req.method``: a
        pattern's own target (a remote object's method, whose instance is ``req.args[0]``).
        The interceptors run as for any call."""
        if self.hooks:
            return self._intercepted(handler, req)
        return self._dispatch_handler(handler, req)

    def _dispatch_handler(self, handler: Handler, req: Request) -> Outcome | Awaitable[Outcome]:
        args = req.args
        if not req.kwargs and handler.inline and handler.simple:
            # The common case, inlined: positional arguments within the signature's bounds
            # (and of their plain annotated types, when there are some).
            if handler.min_positional <= len(args) <= handler.max_positional and (
                handler.positional is None
                or (
                    tuple(map(type, args)) in handler.plain_signatures
                    if handler.plain_signatures is not None
                    else handler.fast_positional and handler.plain_arguments_fit(args)
                )
            ):
                try:
                    result = handler.func(*args)
                except Exception as exc:
                    return self._failure(req, exc)
                if handler.returns is None or type(result) in handler.returns.fast:
                    return True, result
                return self._checked((True, result), handler, req)
        if handler.upload is not None or req.upload:
            return self._dispatch_upload(handler, req)
        if handler.streaming and not req.stream:
            return False, (
                ErrorCode.STREAM_MISMATCH,
                "STREAM_MISMATCH",
                f"method {req.method!r} streams its results: call it with stream() (over TCP "
                "or TLS)",
            )
        problem = handler.check_arguments(args, req.kwargs)
        if problem is not None:
            return False, (ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS", problem)
        if handler.positional is not None or handler.keywords is not None:
            converted = handler.convert_arguments(args, req.kwargs, req.codec == _JSON_CODEC)
            if isinstance(converted, str):
                return False, (ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS", converted)
            if converted[0] is not args or converted[1] is not req.kwargs:
                req = dataclasses.replace(req, args=converted[0], kwargs=converted[1])
        outcome = self._start(handler, req)
        if handler.returns is None:
            return outcome
        if isinstance(outcome, tuple):
            return self._checked(outcome, handler, req)
        return self._checked_later(outcome, handler, req)

    def _start(self, handler: Handler, req: Request) -> Outcome | Awaitable[Outcome]:
        if handler.streaming:
            return self._run_stream(handler, req)
        if handler.is_async:
            return self._run_async(handler, req)
        if handler.inline:
            try:
                return True, handler.func(*req.args, **req.kwargs)
            except Exception as exc:
                return self._failure(req, exc)
        return self._run_threaded(handler, req)

    def _checked(self, outcome: Outcome, handler: Handler, req: Request) -> Outcome:
        """The outcome, or BAD_RESULT when its result does not fit the return annotation."""
        if not outcome[0]:
            return outcome
        problem = handler.check_result(outcome[1])
        if problem is None:
            return outcome
        log.error("method %r: %s", req.method, problem)
        return False, (ErrorCode.BAD_RESULT, "BAD_RESULT", problem)

    async def _checked_later(
        self, outcome: Awaitable[Outcome], handler: Handler, req: Request
    ) -> Outcome:
        return self._checked(await outcome, handler, req)

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
            return True, await loop.run_in_executor(self.executor, run, self._in_slot, call)
        except CallAborted as exc:
            return exc.outcome()
        except Exception as exc:
            return self._failure(req, exc)

    # ---------------------------------------------------------------- streams

    async def _run_stream(self, handler: Handler, req: Request) -> Outcome:
        """A streamed call: its items to the call context's sink under flow control, then its
        outcome (the generator's return value, or its error)."""
        ctx = served_context(served_call())
        sink: ItemSink | None = None if ctx is None else ctx.stream
        if sink is None:  # dispatched outside a stream session (tests of the dispatcher)
            return False, (
                ErrorCode.STREAM_MISMATCH,
                "STREAM_MISMATCH",
                "streams need TCP or TLS",
            )
        try:
            if handler.streaming == ASYNC_GENERATOR:
                return await self._pump_async(handler, req, sink)
            return await self._pump_sync(handler, req, sink)
        except _BadItem as exc:
            log.warning("method %r: %s", req.method, exc.outcome[1][2])
            return exc.outcome
        except CallAborted as exc:
            return _stopped(exc.code)
        except Exception as exc:
            return self._failure(req, exc)

    async def _pump_async(self, handler: Handler, req: Request, sink: ItemSink) -> Outcome:
        agen = handler.func(*req.args, **req.kwargs)
        try:
            while True:
                if sink.room() <= 0:
                    await sink.wait_room()
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    return True, None
                sink.push(_encoded(sink, item))
        finally:
            try:
                await agen.aclose()  # its finally runs (a no-op when it ended)
            except Exception as exc:
                log.warning("method %r: closing its generator raised %r", req.method, exc)

    async def _pump_sync(self, handler: Handler, req: Request, sink: ItemSink) -> Outcome:
        gen = handler.func(*req.args, **req.kwargs)  # runs none of its code yet
        loop = asyncio.get_running_loop()
        run = contextvars.copy_context().run  # one context for every pull: current_context()
        job: concurrent.futures.Future[tuple[bool, Any]] | None = None
        try:
            while True:
                room = sink.room()
                if room <= 0:
                    await sink.wait_room()
                    continue
                job = self.executor.submit(run, _pull, gen, room, sink)
                done, value = await asyncio.wrap_future(job, loop=loop)
                job = None
                if done:
                    return True, value
        finally:
            self._close_later(gen, job, run, req.method)

    def _close_later(
        self,
        gen: Any,
        job: concurrent.futures.Future[Any] | None,
        run: Callable[..., Any],
        method: str,
    ) -> None:
        """Close a sync generator in a worker (its ``finally`` may block), after the pull
        still running in one (a stopped call's task does not wait for it)."""

        def close() -> None:
            try:
                run(gen.close)
            except Exception as exc:
                log.warning("method %r: closing its generator raised %r", method, exc)

        def submit(_: object = None) -> None:
            try:
                self.executor.submit(close)
            except RuntimeError:  # the pool is shut down (server stopping)
                close()

        if job is not None:
            job.add_done_callback(submit)  # at once if it is done, else when the pull ends
        else:
            submit()

    # ---------------------------------------------------------------- uploads

    def _dispatch_upload(self, handler: Handler, req: Request) -> Outcome | Awaitable[Outcome]:
        """A call of a method taking an item stream, or one made with UPLOAD (PROTOCOL.md
        §4.4): both must hold, and the call must come with the host's item source."""
        up = handler.upload
        if up is None:
            return _mismatch(
                f"method {req.method!r} takes no item stream: call it without upload()"
            )
        if not req.upload or req.stream:
            what = "with upload() alone" if req.stream else "with upload() (over TCP or TLS)"
            return _mismatch(
                f"method {req.method!r} takes an item stream (parameter {up.name!r}): call it "
                + what
            )
        ctx = served_context(served_call())
        source = None if ctx is None else ctx.upload
        if source is None:  # dispatched outside a stream session (tests of the dispatcher)
            return _mismatch("uploads need TCP or TLS")
        try:
            up.signature.bind(*req.args, **req.kwargs)
        except TypeError as exc:
            problem = f"{handler.name}{handler.signature}: {exc}"
            return False, (ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS", problem)
        if handler.positional is not None or handler.keywords is not None:
            converted = handler.convert_arguments(req.args, req.kwargs, req.codec == _JSON_CODEC)
            if isinstance(converted, str):
                return False, (ErrorCode.BAD_ARGUMENTS, "BAD_ARGUMENTS", converted)
            req = dataclasses.replace(req, args=converted[0], kwargs=converted[1])
        return self._run_upload(handler, up, req, source)

    async def _run_upload(
        self, handler: Handler, up: UploadParam, req: Request, source: ItemSource
    ) -> Outcome:
        str_keys = req.codec == _JSON_CODEC
        items: _Upload = (
            _AsyncUpload(source, req.method, up, str_keys)
            if handler.is_async
            else _SyncUpload(source, req.method, up, str_keys)
        )
        kwargs = {**req.kwargs, up.name: items}
        try:
            if handler.is_async:
                outcome: Outcome = True, await handler.func(*req.args, **kwargs)
            else:
                loop = asyncio.get_running_loop()
                call = functools.partial(handler.func, *req.args, **kwargs)
                run = contextvars.copy_context().run
                result = await loop.run_in_executor(self.executor, run, self._in_slot, call)
                outcome = True, result
        except CallAborted as exc:
            outcome = exc.outcome()
        except _ItemRefused as exc:
            outcome = exc.outcome
        except Exception as exc:
            outcome = self._failure(req, exc)
        finally:
            source.close()  # answered (or stopped): later items are dropped
        if items.failure is not None:  # an item refused: whatever the method did with it
            return items.failure
        return self._checked(outcome, handler, req)

    # ---------------------------------------------------------------- interceptors

    def _dispatch_intercepted(self, req: Request) -> Outcome | Awaitable[Outcome]:
        """:meth:`dispatch` through the interceptors' hooks (sockstack.interceptors). The host
        set the call's context (served_call()) around this call. An inline method with
        synchronous hooks stays inline, hooks and method run in a copy of the context (what a
        hook sets there, an OpenTelemetry span made current, ends with the call); otherwise
        hooks and method run in the call's task."""
        return self._intercepted(self.handlers.get(req.method), req)

    def _intercepted(self, handler: Handler | None, req: Request) -> Outcome | Awaitable[Outcome]:
        if self.hooks.is_async or (
            handler is not None and (handler.is_async or not handler.inline or handler.streaming)
        ):
            return self._intercepted_async(handler, req)
        outcome: Outcome = contextvars.copy_context().run(self._intercepted_inline, handler, req)
        return outcome

    def _plain(self, handler: Handler | None, req: Request) -> Outcome | Awaitable[Outcome]:
        """The call without the interceptors (they run around it)."""
        if handler is None:
            return False, (ErrorCode.UNKNOWN_METHOD, "UNKNOWN_METHOD", f"no method {req.method!r}")
        return self._dispatch_handler(handler, req)

    def _call_context(self, req: Request) -> CallContext:
        ctx = served_context(served_call())
        if ctx is None:  # dispatched outside a host (tests of the dispatcher)
            ctx = CallContext(req.method, req.request_id, "local", "local", req.metadata)
        ctx.state = {}
        return ctx

    def _refusal(self, req: Request, exc: Exception) -> Outcome:
        """The outcome of a call a ``before`` hook stopped by raising ``exc``."""
        if isinstance(exc, Refused):
            return False, (ErrorCode.REFUSED, wire_name(type(exc)), str(exc))
        if isinstance(exc, ServiceError):
            return self._failure(req, exc)
        log.error(
            "interceptor refused %r by raising %s", req.method, type(exc).__name__, exc_info=exc
        )
        message = str(exc) if self.expose_errors else "internal error (details are in the log)"
        return False, (ErrorCode.UNEXPECTED_ERROR, type(exc).__name__, message)

    def _intercepted_inline(self, handler: Handler | None, req: Request) -> Outcome:
        hooks = self.hooks
        ctx = self._call_context(req)
        try:
            for before in hooks.before:
                before(ctx)
        except Exception as exc:
            outcome = self._refusal(req, exc)
        else:
            outcome = self._plain(handler, req)  # type: ignore[assignment]
        if outcome[0]:
            call_quietly(hooks.after, ctx, outcome[1])
        else:
            call_quietly(hooks.error, ctx, Failure(*outcome[1]))
        return outcome

    async def _intercepted_async(self, handler: Handler | None, req: Request) -> Outcome:
        hooks = self.hooks
        ctx = self._call_context(req)
        try:
            for before in hooks.before:
                r = before(ctx)
                if r is not None and inspect.isawaitable(r):
                    await r
        except Exception as exc:
            outcome = self._refusal(req, exc)
        else:
            try:
                pending = self._plain(handler, req)
                outcome = pending if isinstance(pending, tuple) else await pending
            except asyncio.CancelledError:
                code = ctx.abort_code
                if code:  # stopped by its deadline or a CANCEL: the host answers that
                    name = ErrorCode(code).name
                    message = (
                        "the call's deadline passed; it did not finish"
                        if code == ErrorCode.DEADLINE_EXCEEDED
                        else "the call was stopped"  # CANCEL, or an upload's broken item
                    )
                    for hook in hooks.error:
                        await await_quietly(
                            call_quietly((hook,), ctx, Failure(code, name, message))
                        )
                raise
        if outcome[0]:
            for hook in hooks.after:
                await await_quietly(call_quietly((hook,), ctx, outcome[1]))
        else:
            failure = Failure(*outcome[1])
            for hook in hooks.error:
                await await_quietly(call_quietly((hook,), ctx, failure))
        return outcome
