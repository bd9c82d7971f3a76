"""What a remote object offers: ``@expose`` decides it once, when the class is decorated.

- ``@expose`` on a class exposes its public methods and read-only properties, those of its
  bases included (``object``'s excepted). ``@expose`` on methods of a class that is not
  decorated itself exposes those methods alone (properties: decorate the class).
- A name starting with ``_`` is never exposed, even when decorated; plain attributes never
  are (only properties are readable); nothing is looked up by a name a client sent beyond the
  table built here (no ``getattr`` on client input).
- ``@expose(instance=...)``: what a class registered by name gives each caller, as Pyro5's
  instance modes: ``"single"`` (one instance for everyone), ``"session"`` (one per client
  session, the default for a class) or ``"percall"`` (a new one per call). An instance
  registered is always single.
- ``@expose(inline=True)``: its methods run on the event loop (quick, never blocking); by
  default a plain ``def`` runs in the server's thread pool, an ``async def`` on the loop, as
  RPC methods do. ``@expose(oneway=True)`` on a method: callers do not wait for it (no answer).

Each member's :class:`~sockstack.host.dispatch.Handler` is built here from the unbound
function (the instance is its first argument), so argument checks, type conversion and the
dispatcher's paths are those of RPC methods.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

from sockstack.host.dispatch import Handler, make_handler

__all__ = ["Exposed", "InstanceMode", "Member", "expose", "exposed"]

InstanceMode = Literal["single", "session", "percall"]
INSTANCE_MODES: tuple[str, ...] = ("single", "session", "percall")
_CLASS_MARK = "__sockstack_exposed__"
_MEMBER_MARK = "__sockstack_expose__"
_MAX_NAME = 255  # a wire name is at most 255 UTF-8 bytes (PROTOCOL.md §4.5)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _MemberOptions:
    oneway: bool
    inline: bool | None


@dataclass(frozen=True, slots=True)
class Member:
    """One exposed member of a class."""

    name: str
    kind: Literal["method", "property"]
    handler: Handler
    """Called with the instance first, then the caller's arguments."""
    oneway: bool = False
    """Callers do not wait for an answer (``@expose(oneway=True)``)."""


@dataclass(frozen=True, slots=True)
class Exposed:
    """A class's exposed surface (``type(obj).__sockstack_exposed__``)."""

    cls: type
    iface: str
    """Its wire name: ``@expose(name=...)``, else the class's ``__name__``."""
    instance: InstanceMode
    members: Mapping[str, Member]


@overload
def expose(target: type[T]) -> type[T]: ...
@overload
def expose(target: Callable[..., Any]) -> Callable[..., Any]: ...
@overload
def expose(
    *,
    name: str | None = None,
    instance: InstanceMode = "session",
    inline: bool = False,
    oneway: bool = False,
) -> Callable[[T], T]: ...


def expose(
    target: Any = None,
    *,
    name: str | None = None,
    instance: InstanceMode = "session",
    inline: bool = False,
    oneway: bool = False,
) -> Any:
    """Expose a class (its public methods and properties) or a method to remote callers."""
    if instance not in INSTANCE_MODES:
        raise ValueError(f"instance must be one of {', '.join(INSTANCE_MODES)}, not {instance!r}")

    def mark(t: Any) -> Any:
        if isinstance(t, type):
            if oneway:
                raise TypeError("oneway=True marks a method, not a class")
            _expose_class(t, name, instance, inline)
            return t
        if isinstance(t, property):
            raise TypeError("@expose a class to expose its properties (not a property alone)")
        func = t.__func__ if isinstance(t, staticmethod | classmethod) else t
        if not callable(func):
            raise TypeError(f"@expose marks classes and methods, not {type(t).__name__}")
        if name is not None:
            raise TypeError("name= names a class (its wire name); a method keeps its own name")
        setattr(func, _MEMBER_MARK, _MemberOptions(oneway, inline if inline else None))
        return t

    return mark(target) if target is not None else mark


def exposed(cls: type) -> Exposed | None:
    """The exposed surface of ``cls``, or None when nothing of it is exposed: a decorated
    class's (an undecorated subclass has its base's), else the methods decorated one by one."""
    found = cls.__dict__.get(_CLASS_MARK)
    if isinstance(found, Exposed):
        return found
    if isinstance(getattr(cls, _CLASS_MARK, None), Exposed):
        return _subclass(cls)
    return _methods_only(cls)


@functools.lru_cache(maxsize=1024)
def _subclass(cls: type) -> Exposed:
    """An undecorated subclass of an exposed class: the base's members (no more), each run
    as ``cls`` defines it (an override runs, not the base's function it replaced)."""
    base: Exposed = getattr(cls, _CLASS_MARK)
    members: dict[str, Member] = {}
    for name, member in base.members.items():
        raw = inspect.getattr_static(cls, name, None)
        if isinstance(raw, property) and member.kind == "property" and raw.fget is not None:
            handler = make_handler(f"{base.iface}.{name}", raw.fget, True)
            members[name] = Member(name, "property", handler)
        elif member.kind == "method" and (inspect.isfunction(raw) or _is_coroutine(raw)):
            func = raw
            if func is not member.handler.func:
                inline = member.handler.inline
                handler = make_handler(f"{base.iface}.{name}", func, inline)
                members[name] = Member(name, "method", handler, oneway=member.oneway)
            else:
                members[name] = member
        # (an override that is no longer a function or property: not exposed)
    return Exposed(cls, base.iface, base.instance, members)


def _is_coroutine(raw: Any) -> bool:
    return inspect.iscoroutinefunction(raw)


@functools.lru_cache(maxsize=1024)
def _methods_only(cls: type) -> Exposed | None:
    """For a class that is not decorated: its methods decorated with ``@expose``, if any."""
    members: dict[str, Member] = {}
    for attr, raw in _public_members(cls):
        func = _function_of(raw)
        opts = getattr(func, _MEMBER_MARK, None)
        if func is None or not isinstance(opts, _MemberOptions):
            continue
        if isinstance(raw, staticmethod | classmethod):
            continue
        handler = make_handler(f"{cls.__name__}.{attr}", func, bool(opts.inline))
        members[attr] = Member(attr, "method", handler, oneway=opts.oneway)
    if not members:
        return None
    return Exposed(cls, cls.__name__, "session", members)


def _expose_class(cls: type, name: str | None, instance: InstanceMode, inline: bool) -> None:
    iface = name or cls.__name__
    if not iface or len(iface.encode()) > _MAX_NAME or "\x00" in iface:
        raise ValueError(f"an exposed class's name is 1-{_MAX_NAME} bytes without NUL: {iface!r}")
    members: dict[str, Member] = {}
    for attr, raw in _public_members(cls):
        opts = getattr(_function_of(raw), _MEMBER_MARK, None)
        if isinstance(raw, property):
            if raw.fget is None:
                continue
            handler = make_handler(f"{iface}.{attr}", raw.fget, True)  # a getter: inline
            members[attr] = Member(attr, "property", handler)
            continue
        func = _function_of(raw)
        if func is None or not callable(func):
            continue  # a plain attribute: never exposed
        if isinstance(raw, staticmethod | classmethod):
            continue  # not an instance's: not exposed (their first argument is no instance)
        run_inline = opts.inline if isinstance(opts, _MemberOptions) and opts.inline else inline
        handler = make_handler(f"{iface}.{attr}", func, run_inline)
        one = isinstance(opts, _MemberOptions) and opts.oneway
        members[attr] = Member(attr, "method", handler, oneway=one)
    if not members:
        raise ValueError(f"{cls.__name__} exposes nothing: no public method or property")
    setattr(cls, _CLASS_MARK, Exposed(cls, iface, instance, members))


def _public_members(cls: type) -> list[tuple[str, Any]]:
    """Public names of ``cls`` and its bases (``object`` excepted), nearest definition first."""
    seen: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is object:
            continue
        for attr, raw in vars(klass).items():
            if attr.startswith("_") or attr in seen:
                continue
            if len(attr.encode()) > _MAX_NAME:
                continue
            seen[attr] = raw
    return list(seen.items())


def _function_of(raw: Any) -> Any:
    """The function a class member runs: functions, coroutine functions, property getters
    (and static/class methods' functions, never exposed); None for anything else (a callable
    instance, a builtin, a partial is a plain attribute: never exposed)."""
    if isinstance(raw, staticmethod | classmethod):
        return raw.__func__
    if inspect.isfunction(raw) or inspect.iscoroutinefunction(raw):
        return raw
    if isinstance(raw, property):
        return raw.fget
    return None
