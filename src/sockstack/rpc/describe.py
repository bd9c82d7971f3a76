"""``rpc.describe``: the built-in method with which a server describes its service.

Every server with an :class:`~sockstack.rpc.pattern.RPC` pattern answers it, over every transport,
like any other method (PROTOCOL.md §4.2). The answer is one map (its shape is in PROTOCOL.md §4.2):
the service's name and docstring, each ``@method`` with its signature, parameters (name, kind,
required, default and annotation as text, JSON Schema), result (annotation and JSON Schema), for a
method that streams its items' (``stream``) and docstring, the declared error types, and ``$defs``:
the schemas the others refer to (``{"$ref": "#/$defs/Order"}``). It is what ``sockstack describe``
prints and what the HTTP gateway's OpenAPI will be generated from.

The JSON Schemas are msgspec's (:func:`msgspec.json.schema_components`) for the annotations the
dispatcher checks: they describe a value as the JSON codec carries it (bytes as base64 text, a
date as ISO text...). A parameter without an annotation, or with one no codec carries (a plain
class, ``Callable``: not checked either), has a schema that accepts anything.

The description is built once, when the pattern is made (a service's methods do not change);
an answer costs one map lookup per named method. Its size is bounded by the service: a service
whose whole description does not fit the client's ``max_frame`` (or, over UDP, a datagram) gets
RESULT_TOO_LARGE / DATAGRAM_TOO_LARGE like any other too-large result; the caller then asks for
some methods at a time: ``rpc.describe(["add", "mul"])`` (and ``rpc.describe([])``: everything
but the methods, with the names of all of them under ``"names"``).
"""

from __future__ import annotations

import collections.abc
import inspect
import logging
import types
import typing
from collections.abc import Mapping
from typing import Any

import msgspec

from sockstack.errors import wire_name
from sockstack.host.dispatch import Handler, ServiceError, make_handler

__all__ = ["DESCRIBE", "Description", "describe_handler"]

DESCRIBE = "rpc.describe"
"""The built-in method's wire name. ``rpc.`` is reserved for the RPC pattern's own methods: a
service cannot expose a method under it."""

log = logging.getLogger("sockstack.server")

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional_only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


def _unchecked(cls: Any) -> dict[str, Any]:
    """msgspec's hook for a type it has no schema for: any value (the dispatcher does not check
    it either)."""
    return {"description": f"any value (not checked: {getattr(cls, '__qualname__', cls)})"}


def annotation_text(annotation: Any) -> str | None:
    """``int``, ``list[Order]``, ``date | None``: classes by their own names, as the method's
    author wrote them (not ``datetime.date``, ``__main__.Order``); None without an annotation."""
    if annotation is inspect.Parameter.empty:
        return None
    return _text(annotation)


def _text(a: Any) -> str:
    if a is None or a is type(None):
        return "None"
    if a is Ellipsis:
        return "..."
    if isinstance(a, str):
        return a
    if isinstance(a, list):  # Callable's parameter list
        return "[" + ", ".join(map(_text, a)) + "]"
    origin, args = typing.get_origin(a), typing.get_args(a)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(map(_text, args))
    if origin is typing.Literal:
        return "Literal[" + ", ".join(map(repr, args)) + "]"
    if origin is typing.Annotated:
        return _text(args[0])
    if origin is not None and args:
        return f"{_text(origin)}[{', '.join(map(_text, args))}]"
    if isinstance(a, type):
        return a.__qualname__
    return repr(a).replace("typing.", "")


def signature_text(sig: inspect.Signature) -> str:
    """``(a: int, b: int = 1, *, note: str | None = None) -> int``, with the annotations as
    :func:`annotation_text` writes them."""
    parts: list[str] = []
    star = False
    positional_only = False
    for p in sig.parameters.values():
        if positional_only and p.kind is not p.POSITIONAL_ONLY:
            parts.append("/")
            positional_only = False
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            star = True
        prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        text = prefix + p.name
        ann = annotation_text(p.annotation)
        if ann is not None:
            text += f": {ann}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if ann is not None else f"={p.default!r}"
        positional_only = p.kind is p.POSITIONAL_ONLY
        parts.append(text)
    if positional_only:
        parts.append("/")
    out = f"({', '.join(parts)})"
    ret = annotation_text(sig.return_annotation)
    return out if ret is None else f"{out} -> {ret}"


def _schemas(annotations: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A JSON Schema per annotation (``{}`` for one without: any value) and the shared
    ``$defs``. An annotation msgspec refuses (a TypeVar, a forward reference it cannot
    resolve, two classes of one name...) gets an any-value schema."""
    usable: list[int] = []
    for i, ann in enumerate(annotations):
        if ann is inspect.Parameter.empty:
            continue
        try:
            msgspec.json.schema_components([ann], schema_hook=_unchecked)
        except Exception:
            continue
        usable.append(i)
    out: list[dict[str, Any]] = [{} for _ in annotations]
    while True:
        try:
            found, defs = msgspec.json.schema_components(
                [annotations[i] for i in usable], schema_hook=_unchecked
            )
        except Exception:  # two types of one name: drop the last, bounded by len(usable)
            log.warning("rpc.describe: no schema for %s", annotation_text(annotations[usable[-1]]))
            usable.pop()
            continue
        for i, schema in zip(usable, found, strict=True):
            out[i] = schema
        return out, defs


def _doc(obj: Any) -> str:
    doc = obj.__doc__ if isinstance(obj, type) else inspect.getdoc(obj)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _stream_parts(annotation: Any) -> tuple[Any, Any]:
    """(each item's annotation, the result's) of a generator method's return annotation:
    ``Iterator[T]``, ``AsyncIterator[T]`` (and the Iterable forms) give (T, none),
    ``Generator[T, S, R]`` gives (T, R), ``AsyncGenerator[T, S]`` (T, none); ``none`` is
    ``inspect.Parameter.empty``, an undeclared type."""
    empty = inspect.Parameter.empty
    args = typing.get_args(annotation)
    if annotation is empty or not args:
        return empty, empty
    if typing.get_origin(annotation) is collections.abc.Generator and len(args) == 3:
        return args[0], args[2]
    return args[0], empty


class Description:
    """A service's description, built once from its handlers."""

    def __init__(self, service: object, handlers: Mapping[str, Handler]) -> None:
        cls = type(service)
        # Annotations of every parameter and result, schemas made in one go for shared $defs.
        annotations: list[Any] = []
        ordered = sorted(handlers.items())
        for _, handler in ordered:
            sig = handler.signature
            up = handler.upload
            annotations.extend(
                up.annotation if up is not None and p.name == up.name else p.annotation
                for p in sig.parameters.values()
            )
            if handler.streaming:  # the result (the generator's return value), then an item
                each, returned = _stream_parts(sig.return_annotation)
                annotations += [returned, each]
            else:
                annotations.append(sig.return_annotation)
        schemas, defs = _schemas(annotations)
        it = iter(schemas)
        self.methods: dict[str, dict[str, Any]] = {}
        for name, handler in ordered:
            sig = handler.signature
            params = []
            for p in sig.parameters.values():
                params.append(
                    {
                        "name": p.name,
                        "kind": _KINDS[p.kind],
                        "required": p.default is p.empty
                        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD),
                        "default": None if p.default is p.empty else repr(p.default),
                        "annotation": annotation_text(p.annotation),
                        "schema": next(it),
                        # The item stream of an upload (§4.4): its schema is each item's.
                        "stream": handler.upload is not None and p.name == handler.upload.name,
                    }
                )
            returned = sig.return_annotation
            item: Any = None
            if handler.streaming:
                item, returned = _stream_parts(returned)
            result = {"annotation": annotation_text(returned), "schema": next(it)}
            stream = None
            if handler.streaming:
                stream = {"annotation": annotation_text(item), "schema": next(it)}
            self.methods[name] = {
                "name": name,
                "signature": signature_text(sig),
                "doc": _doc(handler.func),
                "params": params,
                "result": result,
                "stream": stream,
                "readonly": handler.readonly,
            }
        errors = tuple(getattr(cls, "errors", ()) or ())
        self.head: dict[str, Any] = {
            "service": cls.__name__,
            "doc": "" if cls.__module__ == "sockstack.rpc.service" else _doc(cls),
        }
        self.errors = [{"name": wire_name(e), "doc": _doc(e)} for e in errors]
        self.defs = defs

    def answer(self, methods: list[str] | None = None) -> dict[str, Any]:
        """The description of every method, or of those named (``[]``: none, and the names
        of all under ``"names"``). An unknown name is a ServiceError naming it."""
        out = dict(self.head)
        if methods is None:
            out["methods"] = list(self.methods.values())
        else:
            unknown = [m for m in methods if m not in self.methods]
            if unknown:
                raise ServiceError(f"{DESCRIBE}: no method {unknown[0]!r}")
            out["methods"] = [self.methods[m] for m in dict.fromkeys(methods)]
            if not methods:
                out["names"] = list(self.methods)
        out["errors"] = self.errors
        out["$defs"] = self.defs  # all of them, also for a subset: a subset's refs resolve
        return out


def describe_handler(service: object, handlers: Mapping[str, Handler]) -> Handler:
    """The ``rpc.describe`` handler of a service with these handlers (inline: it only looks
    up what was built here)."""
    description = Description(service, handlers)

    def describe(methods: list[str] | None = None) -> dict[str, Any]:
        """This service's methods (all, or those named): signatures, docstrings, JSON Schemas
        of parameters and results, and the error types it declares."""
        return description.answer(methods)

    return make_handler(DESCRIBE, describe, inline=True, readonly=True)
