"""``/kv`` and ``/kv/{key}``: the host's key-value store as a REST resource (docs/HTTP.md,
"Resources").

``GET /kv`` lists the keys (sorted); ``GET /kv/{key}`` answers the value as JSON with a strong
``ETag``; ``PUT /kv/{key}`` stores the JSON body (201 when new, 200 when replaced);
``DELETE /kv/{key}`` removes it (204). Conditional requests follow RFC 9110 §13: ``If-Match``
(strong comparison, ``*`` = must exist) and ``If-None-Match`` (weak comparison, ``*`` = must
not exist; 304 on GET/HEAD, 412 otherwise). A conditional write is compared and set under the
store's lock, so two writers holding the same tag cannot both win.

The key is the path's one segment after ``/kv/``, percent-decoded here from ``raw_path`` (UTF-8),
so a key may hold any character, ``/`` as ``%2F``. The store is the host's service when it
implements :class:`KeyValueStore` (the demo's :class:`~sockstack.demo.Demo` does); the gateway
does not know its class. Its calls are quick and take a lock only: they run on the loop.
"""

from __future__ import annotations

import re
from collections.abc import Set
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable
from urllib.parse import quote, unquote_to_bytes

from sockstack.errors import CodecError, ErrorCode, wire_name
from sockstack.gateway.http import FORM_TYPE, JSON_TYPE, PROBLEM_TYPE, HttpRequest, not_allowed
from sockstack.gateway.problems import PROBLEM_REF, HttpProblem, problem_body
from sockstack.protocol.codecs import JSON
from sockstack.rpc.service import ServiceError

if TYPE_CHECKING:
    from sockstack.gateway.pattern import Gateway

__all__ = ["CONDITION_GRAMMAR", "Condition", "KeyValueStore", "install", "openapi_paths"]

Condition = Literal["*"] | Set[str] | None
"""A precondition a store checks under its lock: ``"*"`` (any current value), a set of entity
tags as the store gives them (with their quotes), or None (no condition)."""

FULL_STATUS = 507
"""A store that cannot take a value answers 507 Insufficient Storage (RFC 4918 §11.5: "unable
to store the representation needed to complete the request"), with the code a TCP ``set``
gets for it (APPLICATION_ERROR, 2002, type ServiceError). Not 413: the request is within the
gateway's body bound and the same value may fit once keys are deleted."""


@runtime_checkable
class KeyValueStore(Protocol):
    """What ``/kv`` needs of a store (plain methods, not RPC ``@method``\\ s). Entity tags are
    strong, quoted (``'"a1b2-7"'``), and change with every write of the key by any path."""

    def keys(self) -> list[str]:
        """The keys, sorted."""
        ...

    def entry(self, key: str) -> tuple[Any, str] | None:
        """(value, entity tag), or None when ``key`` is absent."""
        ...

    def put(
        self,
        key: str,
        value: Any,
        *,
        if_match: Condition = None,
        if_none_match: Condition = None,
    ) -> tuple[bool, str] | None:
        """Store ``value`` if ``if_match`` matches the current entry and ``if_none_match``
        does not (atomically): (True if new, the new tag), or None when a condition fails.
        Raises :class:`~sockstack.rpc.service.ServiceError` when the store cannot hold it.
        A refusal changes nothing."""
        ...

    def remove(
        self, key: str, *, if_match: Condition = None, if_none_match: Condition = None
    ) -> bool | None:
        """Remove ``key`` (atomically, under the same conditions): True if removed, False if
        absent, None when a condition fails."""
        ...


_encode = JSON.encode
_LIST = ("GET", "HEAD")
_ITEM = ("GET", "HEAD", "PUT", "DELETE")
_IF_MATCH = b"if-match"
_IF_NONE_MATCH = b"if-none-match"
# RFC 9110 §13.1.1-2: If-Match / If-None-Match = "*" / #entity-tag; §8.8.3: entity-tag =
# [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text; §5.6.1: a #list may be
# empty, have empty elements and OWS around its commas; §5.5: OWS around a field value is not
# part of it. Written so that each character has one way to match (no backtracking blow-up on
# a long bad value); the document's header pattern is this same text.
_QUOTED = r'"[\x21\x23-\x7e\x80-\xff]*"'
_ETAG = rf"(?:W/)?{_QUOTED}[ \t]*"
CONDITION_GRAMMAR = rf"[ \t]*(?:\*[ \t]*|(?:{_ETAG})?(?:,[ \t]*(?:{_ETAG})?)*)"
"""What ``If-Match`` and ``If-None-Match`` accept (a Python and ECMA-262 regular expression
for the whole field value): anything else is 400 ``DECODE_ERROR``."""
_CONDITION = re.compile(CONDITION_GRAMMAR)
_TAG = re.compile(rf"(W/)?({_QUOTED})")
_NO_STORE = "no key-value store on this server"


def install(gateway: Gateway) -> None:
    cache: list[Any] = [None, None]  # [host, its store or None]: the host is set at start

    def store() -> KeyValueStore:
        host = gateway.host
        if cache[0] is not host:
            service = host.service if host is not None else None
            cache[:] = [host, service if isinstance(service, KeyValueStore) else None]
        found: KeyValueStore | None = cache[1]
        if found is None:
            raise HttpProblem(ErrorCode.NOT_FOUND, _NO_STORE)
        return found

    async def kv(req: HttpRequest) -> None:
        await _serve(gateway, req, store())

    gateway.routes["kv"] = kv


def _key(req: HttpRequest) -> str | None:
    """The key the path names, None for the collection (``/kv``)."""
    raw: bytes | None = req.scope.get("raw_path")
    if raw is None:
        raw = quote(req.path, safe="/").encode("ascii")
    _, sep, segment = raw[1:].partition(b"/")
    if not sep:
        return None
    if b"/" in segment:
        raise HttpProblem(
            ErrorCode.NOT_FOUND,
            f"no resource at {req.path}: a key is one path segment (send '/' in a key as %2F)",
        )
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise HttpProblem(ErrorCode.DECODE_ERROR, "the key is not UTF-8 once decoded") from None


def _tags(req: HttpRequest, name: bytes) -> Literal["*"] | list[tuple[bool, str]] | None:
    """The entity tags of ``If-Match``/``If-None-Match`` (all their lines, one list): ``"*"``,
    a list of (weak, quoted tag), or None without the header. An empty list (``If-Match:``,
    ``,``) is a list of no tags: nothing matches it. A malformed value is a 400."""
    lines = [v for n, v in req.scope["headers"] if n == name]
    if not lines:
        return None
    text = b",".join(lines).decode("latin-1")
    if _CONDITION.fullmatch(text) is None:
        raise HttpProblem(
            ErrorCode.DECODE_ERROR,
            f'{name.decode()}: not "*" nor a list of entity tags (quoted: "tag" or W/"tag")',
        )
    if text.strip(" \t") == "*":
        return "*"
    return [(bool(w), tag) for w, tag in _TAG.findall(text)]


def _conditions(req: HttpRequest) -> tuple[Condition, Condition]:
    """(If-Match as strong tags, If-None-Match as weak tags): RFC 9110 §8.8.3.2 comparison."""
    given = _tags(req, _IF_MATCH)
    # a weak tag never matches If-Match
    match = frozenset(t for weak, t in given if not weak) if isinstance(given, list) else given
    given = _tags(req, _IF_NONE_MATCH)
    none_match = frozenset(t for _, t in given) if isinstance(given, list) else given
    return match, none_match


def _holds(etag: str | None, condition: Condition) -> bool:
    if etag is None or condition is None:
        return False
    return isinstance(condition, str) or etag in condition  # (a str is "*")


def _failed(what: str) -> HttpProblem:
    return HttpProblem(ErrorCode.PRECONDITION_FAILED, what)


async def _serve(gateway: Gateway, req: HttpRequest, store: KeyValueStore) -> None:
    key = _key(req)
    method = req.method
    if key is None:
        if method not in _LIST:
            raise not_allowed(req, _LIST)
        await req.respond(200, _encode(store.keys()))
        return
    if method not in _ITEM:
        raise not_allowed(req, _ITEM)
    if_match, if_none_match = _conditions(req)
    # RFC 9110 §13.2.1: conditions are ignored where the answer without them would not be 2xx
    # (GET and DELETE of an absent key: 404), and checked before the body is read (PUT).
    current = store.entry(key)
    etag = None if current is None else current[1]
    if method in _LIST:
        if current is None:
            raise HttpProblem(ErrorCode.NOT_FOUND, f"no key {key!r}")
        if if_match is not None and not _holds(etag, if_match):
            raise _failed(f"If-Match: key {key!r} is at another version")
        assert etag is not None
        tag = [(b"etag", etag.encode("latin-1"))]
        if if_none_match is not None and _holds(etag, if_none_match):
            await req.respond(304, b"", None, tag)
            return
        try:
            body = _encode(current[0])
        except CodecError as exc:  # (a value set over TCP that JSON cannot write)
            raise HttpProblem(ErrorCode.RESULT_NOT_ENCODABLE, str(exc)) from None
        await req.respond(200, body, JSON_TYPE, tag)
        return
    if method == "DELETE":
        if current is None:
            raise HttpProblem(ErrorCode.NOT_FOUND, f"no key {key!r}")
        removed = store.remove(key, if_match=if_match, if_none_match=if_none_match)
        if removed is None:
            raise _failed(f"key {key!r}: {_why(if_match, if_none_match)}")
        if not removed:  # (removed meanwhile: not on this loop, but by a thread's call)
            raise HttpProblem(ErrorCode.NOT_FOUND, f"no key {key!r}")
        await req.respond(204, b"", None)
        return
    # PUT
    if (if_match is not None and not _holds(etag, if_match)) or (
        if_none_match is not None and _holds(etag, if_none_match)
    ):
        raise _failed(f"key {key!r}: {_why(if_match, if_none_match)}")
    limits = gateway.limits
    data = await req.body(limits.max_body, limits.body_timeout)
    value = _value(req, data)
    try:
        body = _encode(value)  # before storing: what GET will answer, and NaN refused
    except CodecError as exc:
        raise HttpProblem(ErrorCode.DECODE_ERROR, str(exc)) from None
    try:
        written = store.put(key, value, if_match=if_match, if_none_match=if_none_match)
    except ServiceError as exc:
        await _full(gateway, req, exc)
        return
    if written is None:  # (the key changed while the body arrived)
        raise _failed(f"key {key!r}: {_why(if_match, if_none_match)}")
    created, etag = written
    where = b"/kv/" + quote(key, safe="").encode("ascii")
    headers = [(b"etag", etag.encode("latin-1")), (b"content-location", where)]
    if created:
        headers.append((b"location", where))
    await req.respond(201 if created else 200, body, JSON_TYPE, headers)


def _why(if_match: Condition, if_none_match: Condition) -> str:
    if if_match is not None and not if_match:  # (evaluated first, and never holds)
        return "If-Match lists no strong entity tag: nothing matches it"
    if if_none_match == "*":
        return "If-None-Match: * but the key exists"
    if if_match == "*":
        return "If-Match: * but the key does not exist"
    if if_match is not None:
        return "If-Match: the key is absent or at another version"
    return "If-None-Match: the key is at a version listed"


def _value(req: HttpRequest, data: bytes) -> Any:
    """The body as the value: JSON (any JSON value). A form-typed body is read as JSON too
    (``curl -d 5`` sends ``application/x-www-form-urlencoded``; a value is no form)."""
    if not data.strip():
        raise HttpProblem(ErrorCode.DECODE_ERROR, "the body is empty: send the value as JSON")
    ctype = (req.header(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype == FORM_TYPE:
        try:
            return JSON.decode(data)
        except CodecError as exc:
            raise HttpProblem(ErrorCode.DECODE_ERROR, str(exc)) from None
    return req.json_body(data)


async def _full(gateway: Gateway, req: HttpRequest, exc: ServiceError) -> None:
    """507 with the store's own message (it says which bound and by how much)."""
    detail = str(exc)
    gateway.bad_log.warning(
        "http %s: %s %s: %s", req.peer and req.peer[0], req.method, req.path, detail
    )
    body = problem_body(
        ErrorCode.APPLICATION_ERROR,
        detail,
        type_name=wire_name(type(exc)),
        extra={"status": FULL_STATUS},
    )
    await req.respond(FULL_STATUS, _encode(body), PROBLEM_TYPE)


# --------------------------------------------------------------------------- OpenAPI


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": PROBLEM_REF}},
    }


_VALUE: dict[str, Any] = {"description": "any JSON value"}
_ETAG_HEADER = {
    "description": "strong entity tag of the stored value (changes with every write)",
    "schema": {"type": "string"},
}
_WHERE_HEADER = {"description": "/kv/{key}, the key percent-encoded", "schema": {"type": "string"}}


def openapi_paths(gateway: Gateway) -> dict[str, Any]:
    """OpenAPI 3.1 path items of ``/kv`` and ``/kv/{key}`` (none when the host has no store:
    ``/kv`` then answers 404)."""
    host = gateway.host
    if host is None or not isinstance(host.service, KeyValueStore):
        return {}
    json_value = {"application/json": {"schema": _VALUE}}
    etag = {"ETag": _ETAG_HEADER}
    key = {
        "name": "key",
        "in": "path",
        "required": True,
        "description": "the key (UTF-8, percent-encoded: '/' as %2F)",
        "schema": {"type": "string"},
    }

    def header(name: str, text: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "header",
            "required": False,
            "description": text,
            "schema": {"type": "string", "pattern": f"^(?:{CONDITION_GRAMMAR})$"},
        }

    tags = (
        ' (RFC 9110: "*", or a comma-separated list of entity tags "x" or W/"x", empty elements '
        "allowed; an empty list names no tag)"
    )
    if_match = header(
        "If-Match", "the key must be at one of these tags, compared strongly (else 412)" + tags
    )
    if_none_match = header(
        "If-None-Match",
        "the key must not be at one of these tags, compared weakly (else 304 for GET and HEAD, "
        "412 otherwise)" + tags,
    )
    bad_header = _problem("malformed If-Match or If-None-Match, or key not UTF-8")
    no_key = _problem("no such key (or no key-value store on this server)")
    failed = _problem("a precondition failed (PRECONDITION_FAILED)")
    default = _problem("an error (RFC 9457 problem details)")

    def read(summary: str, op_id: str) -> dict[str, Any]:
        return {
            "summary": summary,
            "operationId": op_id,
            "tags": ["kv"],
            "parameters": [if_match, if_none_match],
            "responses": {
                "200": {"description": "the value", "headers": etag, "content": json_value},
                "304": {"description": "not modified (If-None-Match)", "headers": etag},
                "400": bad_header,
                "404": no_key,
                "412": failed,
                "default": default,
            },
        }

    def head(operation: dict[str, Any]) -> dict[str, Any]:
        """The HEAD of a GET: its answers' headers, no body (RFC 9110 §9.3.2)."""
        answers = {
            status: {k: v for k, v in answer.items() if k != "content"}
            for status, answer in operation["responses"].items()
        }
        return {**operation, "responses": answers}

    keys = {
        "description": "the keys, sorted by code point",
        "content": {"application/json": {"schema": {"type": "array", "items": {"type": "string"}}}},
    }
    listing = {"200": keys, "404": _problem(_NO_STORE), "default": default}
    written = {"ETag": _ETAG_HEADER, "Content-Location": _WHERE_HEADER}
    return {
        "/kv": {
            "get": {
                "summary": "List the keys",
                "operationId": "kv.list",
                "tags": ["kv"],
                "responses": listing,
            },
            "head": head(
                {
                    "summary": "List the keys (headers only)",
                    "operationId": "kv.list.head",
                    "tags": ["kv"],
                    "responses": listing,
                }
            ),
        },
        "/kv/{key}": {
            "parameters": [key],
            "get": read("Read a value", "kv.get"),
            "head": head(read("Read a value (headers only)", "kv.head")),
            "put": {
                "summary": "Store a value",
                "operationId": "kv.put",
                "tags": ["kv"],
                "parameters": [if_match, if_none_match],
                "requestBody": {"required": True, "content": json_value},
                "responses": {
                    "200": {
                        "description": "replaced; the value as stored",
                        "headers": written,
                        "content": json_value,
                    },
                    "201": {
                        "description": "created; the value as stored",
                        "headers": {**written, "Location": _WHERE_HEADER},
                        "content": json_value,
                    },
                    "400": _problem("the body is not JSON, or a malformed header"),
                    "404": _problem(_NO_STORE),
                    "408": _problem("the body did not arrive in time"),
                    "412": failed,
                    "413": _problem("the body is over the gateway's bound"),
                    "415": _problem("the body is not application/json"),
                    "507": _problem("the store is full (code APPLICATION_ERROR)"),
                    "default": default,
                },
            },
            "delete": {
                "summary": "Remove a value",
                "operationId": "kv.delete",
                "tags": ["kv"],
                "parameters": [if_match, if_none_match],
                "responses": {
                    "204": {"description": "removed"},
                    "400": bad_header,
                    "404": no_key,
                    "412": failed,
                    "default": default,
                },
            },
        },
    }
