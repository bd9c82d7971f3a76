"""``/openapi.json`` and ``/docs/``: what the gateway serves, as an OpenAPI 3.1 document, and a
page to read and try it (docs/HTTP.md, "OpenAPI").

The document is generated from the methods' own signatures and hints, through the data of
``rpc.describe`` (:class:`~sockstack.rpc.describe.Description`: a JSON Schema per parameter and
result, docstrings, declared errors, shared ``$defs``), never written by hand:

* ``POST /rpc/NAME`` per method the host's dispatcher serves over HTTP: the body is a JSON object
  of named arguments (the required ones listed) or an array of positional ones; ``200`` carries
  the result (a method that streams: ``application/x-ndjson`` or ``text/event-stream``); a method
  marked ``readonly`` also has ``GET /rpc/NAME`` with its arguments as query parameters.
  Left out, because HTTP cannot call them: methods that take an uploaded item stream, and the
  remote-object pattern's ``objects.*`` (both need a TCP or TLS session).
* every error as ``application/problem+json`` (a shared ``Problem`` schema) under the statuses
  the gateway really answers (:data:`sockstack.gateway.problems.STATUS`), ``401`` only when the
  host has a secret (then a ``bearer`` security scheme);
* the operations routes (``/healthz``, ``/readyz``, ``/metrics``), this document and the page,
  and the paths of the other route modules that describe their own (``openapi_paths(gateway)``
  in :mod:`sockstack.gateway.kv` and :mod:`sockstack.gateway.topics`).

It is built once, on the first request (the methods do not change while the host runs), and
kept as bytes with its gzip form and ETag: bounded by the service, like ``rpc.describe``'s.

The page is Swagger UI (``swagger-ui-dist``, Apache-2.0), served from the package's
``static/docs`` folder: nothing is fetched from elsewhere (no CDN; the browser may be offline).
The page is public (it is the same for every server); the document it loads is not: with a
secret, open ``/docs/?access_token=SECRET``, and the page sends it as a bearer token.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgspec

from sockstack.errors import ErrorCode, wire_name
from sockstack.gateway.http import HttpRequest, not_allowed
from sockstack.gateway.problems import RETRY_AFTER, STATUS, HttpProblem
from sockstack.rpc.describe import Description

if TYPE_CHECKING:
    from sockstack.gateway.pattern import Gateway
    from sockstack.host.dispatch import Handler

__all__ = ["OPENAPI_VERSION", "document", "install"]

log = logging.getLogger("sockstack.gateway")

OPENAPI_VERSION = "3.1.0"
PROBLEM = "Problem"
"""The shared problem-details schema, ``#/components/schemas/Problem`` (a service type of the
same name is renamed in the document, never this one: other route modules refer to it)."""

_GET = ("GET", "HEAD")
_SESSION_ONLY = "objects."  # the remote-object pattern's methods: they need a TCP/TLS session
_TIMEOUT_HEADER = "Sockstack-Timeout-Ms"
_STATIC = "static/docs"
_TEXT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE, NOTICE
}
_PAGE_POLICY = (
    b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    b"object-src 'none'; base-uri 'none'; frame-ancestors 'self'"
)
"""The page's Content-Security-Policy: scripts, styles and requests from this server only."""

# The components/responses every route module may refer to, by status (RFC 9110's names).
RESPONSE_NAMES: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    412: "PreconditionFailed",
    413: "ContentTooLarge",
    415: "UnsupportedMediaType",
    422: "UnprocessableContent",
    431: "HeadersTooLarge",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
    507: "InsufficientStorage",
}
_WHEN: dict[int, str] = {
    400: "the request cannot be read (bad JSON, header or query), or the method refused the call"
    " (APPLICATION_ERROR: a ServiceError or a declared error type, named under `error`)",
    401: "missing or wrong credentials: send `Authorization: Bearer <the server's secret>`",
    403: "an interceptor of the server refused the call",
    404: "no such resource or method",
    405: "the path does not answer this HTTP method (`Allow` lists those it answers)",
    408: "the request body did not arrive in time",
    412: "a precondition (`If-Match`, `If-None-Match`) does not hold",
    413: "the request body is larger than the server takes",
    415: "the request body is not JSON",
    422: "the arguments do not fit the method's parameters (BAD_ARGUMENTS)",
    431: "the request line and headers are too large (the connection is then closed)",
    499: "the client went away (never read)",
    500: "the server failed (a bug in the method, or a result it cannot send)",
    503: "the server is overloaded or draining: retry later (`Retry-After`)",
    504: "the call's deadline (`Sockstack-Timeout-Ms`) passed",
    507: "the broker's retained store is full",
}


def install(gateway: Gateway) -> None:
    """Add ``/openapi.json`` and ``/docs`` (the page and its files) to the gateway."""
    assets = _Assets()
    built: list[_Asset] = []

    async def openapi_json(req: HttpRequest) -> None:
        if req.method not in _GET:
            raise not_allowed(req, _GET)
        if req.path != "/openapi.json":
            raise HttpProblem(ErrorCode.NOT_FOUND, f"no resource at {req.path}")
        if not built:
            try:
                body = json.dumps(document(gateway), separators=(",", ":"), ensure_ascii=False)
            except Exception as exc:  # a bug (ours, or a route module's): said, not cached
                log.exception("openapi: the document could not be built")
                raise HttpProblem(
                    ErrorCode.UNEXPECTED_ERROR, f"the document could not be built: {exc!r}"
                ) from None
            built.append(_Asset(body.encode("utf-8"), "application/json"))
        await built[0].send(req, b"no-cache")

    async def docs(req: HttpRequest) -> None:
        if req.method not in _GET:
            raise not_allowed(req, _GET)
        path = req.path
        if path == "/docs":  # the page's files are relative to /docs/
            qs = req.scope.get("query_string") or b""
            location = b"docs/" + (b"?" + qs if qs else b"")
            await req.respond(308, b"", None, [(b"location", location)])
            return
        name = path[len("/docs/") :] or "index.html"
        asset = assets.get(name)
        if asset is None:
            raise HttpProblem(ErrorCode.NOT_FOUND, f"no resource at {path}")
        policy = [(b"content-security-policy", _PAGE_POLICY)] if name == "index.html" else []
        await asset.send(req, b"no-cache", policy)

    gateway.routes["openapi.json"] = openapi_json
    gateway.routes["docs"] = docs
    # The page and its files are the same for every server (Swagger UI, our init script): they
    # are served without the secret, so that a browser can load them (it sends no bearer for
    # scripts and styles); the document they fetch, /openapi.json, needs it.
    gateway.public.add("docs")


# ---------------------------------------------------------------- files served as they are


class _Asset:
    """Bytes served with an ETag (``If-None-Match`` answers 304) and, to a client that takes it,
    gzip (made once, on the first request that asks)."""

    __slots__ = ("_gz", "body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type.encode()
        self.etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
        self._gz: bytes | None = None

    def gzipped(self) -> bytes | None:
        if len(self.body) < 1024:
            return None
        if self._gz is None:
            self._gz = gzip.compress(self.body, compresslevel=6, mtime=0)
        return self._gz

    async def send(
        self, req: HttpRequest, cache: bytes, more: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        body, etag = self.body, self.etag
        headers = [
            (b"cache-control", cache),
            (b"vary", b"Accept-Encoding"),
            (b"x-content-type-options", b"nosniff"),
            *(more or ()),
        ]
        if _accepts_gzip(req.header(b"accept-encoding")):
            gz = self.gzipped()
            if gz is not None:
                body, etag = gz, etag[:-1] + b'-gz"'
                headers.append((b"content-encoding", b"gzip"))
        headers.append((b"etag", etag))
        if _matches(req.header(b"if-none-match"), etag):
            await req.respond(304, b"", None, headers)
            return
        await req.respond(200, body, self.content_type, headers)


def _accepts_gzip(value: bytes | None) -> bool:
    """Whether ``Accept-Encoding`` takes gzip (named, or ``*``, with a q above 0)."""
    if not value:
        return False
    for part in value.split(b","):
        coding, _, params = part.partition(b";")
        if coding.strip().lower() not in (b"gzip", b"x-gzip", b"*"):
            continue
        q = params.strip().lower()
        if q.startswith(b"q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def _matches(value: bytes | None, etag: bytes) -> bool:
    """``If-None-Match`` (RFC 9110 §13.1.2: weak comparison) names this ETag, or is ``*``."""
    if value is None:
        return False
    if value.strip() == b"*":
        return True
    return any(tag.strip().removeprefix(b"W/") == etag for tag in value.split(b","))


class _Assets:
    """The page's files (``static/docs``), read on first use and kept: a fixed set, bounded by
    the package (about 2 MB, and 0.5 MB more for the gzip forms)."""

    def __init__(self) -> None:
        self._files: dict[str, _Asset | None] | None = None

    def get(self, name: str) -> _Asset | None:
        files = self._files
        if files is None:
            folder = resources.files("sockstack.gateway").joinpath(_STATIC)
            files = self._files = {
                f.name: None for f in folder.iterdir() if f.is_file() and f.name[:1] != "."
            }
        if name not in files:  # (only names listed: no path ever reaches the file system)
            return None
        asset = files[name]
        if asset is None:
            data = resources.files("sockstack.gateway").joinpath(_STATIC, name).read_bytes()
            suffix = name[name.rfind(".") :] if "." in name else ""
            ctype = _TEXT_TYPES.get(suffix, "application/octet-stream")
            asset = files[name] = _Asset(data, ctype)
        return asset


# ---------------------------------------------------------------- the document


def document(gateway: Gateway) -> dict[str, Any]:
    """The OpenAPI 3.1 document of what ``gateway`` serves (its host must be started)."""
    host = gateway.host
    assert host is not None, "the gateway's host is not started"
    secured = host.secret is not None
    handlers = {n: h for n, h in host.dispatcher.handlers.items() if _over_http(n, h)}
    service = host.service
    description = Description(service if service is not None else object(), handlers)
    schemas, fix = _components(description.defs)

    paths: dict[str, Any] = {}
    used_ids: set[str] = set()
    for name, described in description.methods.items():
        paths[rpc_path(name)] = _rpc_item(described, handlers[name], fix, secured, used_ids)
    paths.update(_own_paths(gateway, secured))
    tags = [
        {"name": "rpc", "description": "The service's methods: `POST /rpc/NAME`."},
        {"name": "operations", "description": "Probes and metrics."},
        {"name": "docs", "description": "This document and its page."},
    ]
    components: dict[str, Any] = {
        "schemas": {PROBLEM: PROBLEM_SCHEMA, **schemas},
        "responses": _responses(),
    }
    from sockstack.gateway import kv, topics

    for module in (kv, topics):  # what they add never replaces what is here (first one kept)
        extra = _module_paths(module, gateway)
        if extra is None:
            continue
        for path, item in extra.get("paths", {}).items():
            if paths.setdefault(path, item) is not item:
                log.warning("openapi: %s describes %s again: kept the first", module, path)
        for kind, entries in extra.get("components", {}).items():
            section = components.setdefault(kind, {})
            for name, entry in entries.items():
                if section.setdefault(name, entry) is not entry:
                    log.warning("openapi: %s redefines %s/%s: kept the first", module, kind, name)
        tags += [t for t in extra.get("tags", ()) if t.get("name") not in {x["name"] for x in tags}]

    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": _info(service, description, secured),
        "tags": tags,
        "paths": paths,
        "components": components,
    }
    if secured:
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The server's shared secret as a bearer token (RFC 6750). A GET "
                "may give it as `?access_token=` instead (for EventSource, which cannot send "
                "headers).",
            }
        }
        doc["security"] = [{"bearer": []}]
    return doc


def _module_paths(module: Any, gateway: Gateway) -> dict[str, Any] | None:
    """What a route module describes of its own routes: ``openapi_paths(gateway)`` gives a
    ``{path: path item}`` map, or ``{"paths": ..., "components": ..., "tags": [...]}``."""
    fn = getattr(module, "openapi_paths", None)
    if fn is None:
        return None
    try:
        got = fn(gateway)
    except Exception:  # one module's bug must not take the whole document down
        log.exception("openapi: %s.openapi_paths failed; its routes are left out", module.__name__)
        return None
    if not isinstance(got, Mapping):
        return None
    if "paths" in got and isinstance(got["paths"], Mapping):
        return dict(got)
    return {"paths": dict(got)}


def _over_http(name: str, handler: Handler) -> bool:
    """Whether ``POST /rpc/NAME`` can call this method: not an upload's, nor one that needs a
    remote-object session."""
    return handler.upload is None and not name.startswith(_SESSION_ONLY)


def rpc_path(name: str) -> str:
    """The path of a method, percent-encoding what a path cannot hold as it is (``{``, ``%``,
    ``?``, ``#``, spaces, non-ASCII...): ``/rpc/rpc.describe``, ``/rpc/a%20b``."""
    return "/rpc/" + urllib.parse.quote(name, safe="/!$&'()*+,;=:@-._~")


def _components(defs: Mapping[str, Any]) -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """The service's ``$defs`` as ``components/schemas`` (names a component may have, never
    ``Problem``), and a function that rewrites a schema's ``#/$defs/X`` refs to them."""
    names: dict[str, str] = {}
    taken = {PROBLEM}
    for name in defs:
        safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name)
        base, n = safe or "Schema", 1
        while safe in taken:
            n += 1
            safe = f"{base}_{n}"
        taken.add(safe)
        names[name] = safe

    def fix(schema: Any) -> Any:
        if isinstance(schema, dict):
            out = {}
            for k, v in schema.items():
                if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                    target = names.get(v[len("#/$defs/") :])
                    out[k] = f"#/components/schemas/{target}" if target else v
                else:
                    out[k] = fix(v)
            return out
        if isinstance(schema, list):
            return [fix(v) for v in schema]
        return schema

    return {names[n]: fix(s) for n, s in defs.items()}, fix


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An error as RFC 9457 problem details, with the sockstack error code "
    "(the same code a TCP or UDP client reads).",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {
            "type": "string",
            "description": "`urn:sockstack:error:` and the code's name.",
            "pattern": "^urn:sockstack:error:",
        },
        "title": {"type": "string", "description": "The code's name (`BAD_ARGUMENTS`)."},
        "status": {"type": "integer", "description": "The HTTP status."},
        "detail": {"type": "string", "description": "What went wrong, for a person."},
        "code": {"type": "integer", "description": "The sockstack error code (2001...)."},
        "error": {
            "type": "string",
            "description": "An APPLICATION_ERROR's error type: a declared error's name.",
        },
    },
    "examples": [
        {
            "type": "urn:sockstack:error:BAD_ARGUMENTS",
            "title": "BAD_ARGUMENTS",
            "status": 422,
            "detail": "add(a: int, b: int) -> int: missing a required argument: 'b'",
            "code": 2001,
        }
    ],
}


def _ref(status: int) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{RESPONSE_NAMES[status]}"}


def _responses() -> dict[str, Any]:
    """``components/responses``: one problem response per status the gateway answers, its
    description naming the error codes that map to it."""
    codes: dict[int, list[str]] = {}
    for code, status in STATUS.items():
        codes.setdefault(status, []).append(ErrorCode(code).name)
    retry = ", ".join(f"{ErrorCode(c).name}: {s} s" for c, s in RETRY_AFTER.items())
    out: dict[str, Any] = {}
    for status, name in RESPONSE_NAMES.items():
        response: dict[str, Any] = {
            "description": f"{_WHEN[status][:1].upper()}{_WHEN[status][1:]}. Codes: "
            + ", ".join(sorted(codes.get(status, ["UNEXPECTED_ERROR"])))
            + ".",
            "content": {
                "application/problem+json": {"schema": {"$ref": f"#/components/schemas/{PROBLEM}"}}
            },
        }
        if status == 503:
            response["headers"] = {
                "Retry-After": {
                    "description": f"Seconds to wait before trying again ({retry}).",
                    "schema": {"type": "integer", "minimum": 0},
                }
            }
        elif status == 401:
            response["headers"] = {
                "WWW-Authenticate": {
                    "schema": {"type": "string", "const": 'Bearer realm="sockstack"'}
                }
            }
        elif status == 405:
            response["headers"] = {
                "Allow": {
                    "description": "The methods the path answers.",
                    "schema": {"type": "string"},
                }
            }
        out[name] = response
    return out


def _statuses(secured: bool, *statuses: int) -> dict[str, Any]:
    codes = sorted({*statuses, 503} | ({401} if secured else set()))
    return {str(s): _ref(s) for s in codes}


def _info(service: object, description: Description, secured: bool) -> dict[str, Any]:
    from sockstack import __version__

    head = description.head
    title = str(head["service"]) if service is not None else "sockstack"
    errors = description.errors
    text = [markdown(head["doc"])] if head["doc"] and service is not None else []
    text.append(
        "Served by sockstack's HTTP gateway (docs/HTTP.md): every method is `POST /rpc/NAME` "
        "with its arguments as a JSON object (by name) or array (by position); the result is "
        "the JSON body. Headers: `Sockstack-Timeout-Ms` (the call's deadline), "
        "`Sockstack-Meta-KEY` (metadata; `-bin` keys base64), `traceparent`/`tracestate`; the "
        "method's trailers come back as `Sockstack-Trailer-KEY`. Errors are RFC 9457 problem "
        "details with the sockstack error code. Not listed: methods that take an uploaded item "
        "stream and the remote-object methods (`objects.*`): they need a TCP or TLS session."
    )
    if errors:
        text.append(
            "Declared error types (APPLICATION_ERROR, status 400, the type under `error`): "
            + ", ".join(
                f"`{e['name']}`" + (f" ({markdown(e['doc'])})" if e["doc"] else "") for e in errors
            )
            + "."
        )
    if secured:
        text.append("Every path but the probes needs the server's secret as a bearer token.")
    return {
        "title": title,
        "version": str(getattr(service, "__version__", None) or __version__),
        "description": "\n\n".join(text),
    }


# ---------------------------------------------------------------- one method


def _param_schema(p: dict[str, Any], handler: Handler, fix: Callable[[Any], Any]) -> Any:
    """A parameter's schema with its annotation, and its default where it is a JSON value of
    the parameter's type."""
    schema = dict(fix(p["schema"]))
    if p["annotation"]:
        schema.setdefault("description", f"`{p['annotation']}`")
    if not p["required"] and p["default"] is not None:
        param = handler.signature.parameters[p["name"]]
        default = _json_default(param)
        if default is not _NO_DEFAULT:
            schema["default"] = default
    return schema


_NO_DEFAULT = object()


def _json_default(param: inspect.Parameter) -> Any:
    ann = param.annotation
    try:
        data = msgspec.json.encode(param.default)
        if ann is not inspect.Parameter.empty:
            msgspec.json.decode(data, type=ann)
        return msgspec.json.decode(data)
    except Exception:  # not JSON, or not of its own annotated type: left out
        return _NO_DEFAULT


def _body_schema(
    params: list[dict[str, Any]], handler: Handler, fix: Callable[[Any], Any]
) -> dict[str, Any]:
    """The JSON body: an object of named arguments, or an array of positional ones (each form
    only where every required parameter can be given that way), or, with none required,
    ``null`` (the gateway reads it as an empty body)."""
    forms: list[dict[str, Any]] = []
    named = [p for p in params if p["kind"] in ("positional_or_keyword", "keyword_only")]
    positional = [p for p in params if p["kind"] in ("positional_only", "positional_or_keyword")]
    var_pos = next((p for p in params if p["kind"] == "var_positional"), None)
    var_kw = next((p for p in params if p["kind"] == "var_keyword"), None)
    if not any(p["required"] and p["kind"] == "positional_only" for p in params):
        obj: dict[str, Any] = {
            "type": "object",
            "title": "named arguments",
            "properties": {p["name"]: _param_schema(p, handler, fix) for p in named},
            "additionalProperties": fix(var_kw["schema"]) if var_kw is not None else False,
        }
        required = [p["name"] for p in named if p["required"]]
        if required:
            obj["required"] = required
        forms.append(obj)
    if not any(p["required"] and p["kind"] == "keyword_only" for p in params):
        arr: dict[str, Any] = {"type": "array", "title": "positional arguments"}
        if positional:
            arr["prefixItems"] = [_param_schema(p, handler, fix) for p in positional]
        arr["items"] = fix(var_pos["schema"]) if var_pos is not None else False
        least = sum(1 for p in positional if p["required"])
        if least:
            arr["minItems"] = least
        forms.append(arr)
    if not any(p["required"] for p in params):  # JSON null, as an empty body: no arguments
        forms.append({"type": "null", "title": "no arguments"})
    return forms[0] if len(forms) == 1 else {"anyOf": forms}


def _query_parameters(
    params: list[dict[str, Any]], handler: Handler, fix: Callable[[Any], Any]
) -> list[dict[str, Any]]:
    """A readonly method's GET arguments: text as it is for a ``str`` parameter, any other
    value as JSON (``?n=5``, ``?tags=["a"]``): as the gateway reads them."""
    out = []
    for p in params:
        if p["kind"] not in ("positional_or_keyword", "keyword_only"):
            continue
        param = handler.signature.parameters[p["name"]]
        schema = _param_schema(p, handler, fix)
        q: dict[str, Any] = {"name": p["name"], "in": "query", "required": p["required"]}
        if param.annotation in (str, "str"):
            q["schema"] = schema
        else:
            q["content"] = {"application/json": {"schema": schema}}
        out.append(q)
    return out


def _timeout_parameter() -> dict[str, Any]:
    return {
        "name": _TIMEOUT_HEADER,
        "in": "header",
        "required": False,
        "description": "The call's deadline, in milliseconds from now: past it the call stops "
        "and the answer is 504 (0: already past).",
        "schema": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    }


def _result_responses(
    described: dict[str, Any], fix: Callable[[Any], Any], errors: list[str]
) -> dict[str, Any]:
    result = fix(described["result"]["schema"])
    tail = ""
    if errors:
        tail = " Declared errors (400, under `error`): " + ", ".join(errors) + "."
    stream = described["stream"]
    if stream is None:
        return {
            "200": {
                "description": "The result"
                + (
                    f" (`{described['result']['annotation']}`)."
                    if described["result"]["annotation"]
                    else "."
                )
                + tail,
                "content": {"application/json": {"schema": result}},
            }
        }
    item = fix(stream["schema"])
    problem = {"$ref": f"#/components/schemas/{PROBLEM}"}
    lines = [
        ("item", item, "one item"),
        ("result", result, "the end: the method's return value"),
        ("error", problem, "the end: an error after items were sent"),
    ]
    ndjson = {
        "oneOf": [
            {
                "type": "object",
                "title": kind,
                "description": what,
                "required": [kind],
                "properties": {kind: schema},
                "additionalProperties": False,
            }
            for kind, schema, what in lines
        ]
    }
    sse = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"enum": [kind for kind, _, _ in lines]},
            "data": {"type": "string", "contentMediaType": "application/json"},
        },
        "oneOf": [
            {
                "title": kind,
                "description": what,
                "properties": {
                    "event": {"const": kind},
                    "data": {"contentMediaType": "application/json", "contentSchema": schema},
                },
            }
            for kind, schema, what in lines
        ],
    }
    return {
        "200": {
            "description": "The items as they come, then the end: newline-delimited JSON "
            '(`{"item": ...}` per line, then `{"result": ...}` or `{"error": <problem>}`), or, '
            "to a client that accepts `text/event-stream`, Server-Sent Events (`event: item` / "
            "`result` / `error`, the value as JSON in `data`). The schemas describe one line or "
            "one event. An error before the first item is answered with its status instead." + tail,
            "content": {
                "application/x-ndjson": {"schema": ndjson},
                "text/event-stream": {"schema": sse},
            },
        }
    }


def _rpc_item(
    described: dict[str, Any],
    handler: Handler,
    fix: Callable[[Any], Any],
    secured: bool,
    used_ids: set[str],
) -> dict[str, Any]:
    """The path item of ``/rpc/NAME``: POST, and GET for a readonly method."""
    name = described["name"]
    doc = markdown(described["doc"])
    errors = [wire_name(e) for e in handler.errors]
    summary = _summary(doc) or name
    text = f"`{name}{described['signature']}`" + (f"\n\n{doc}" if doc else "")
    params = [p for p in described["params"] if not p["stream"]]
    common = {"summary": summary, "description": text, "tags": ["rpc"]}
    post: dict[str, Any] = {
        **common,
        "operationId": _operation_id(name, used_ids),
        "parameters": [_timeout_parameter()],
        "requestBody": {
            "required": any(p["required"] for p in params),
            "description": "The arguments: a JSON object by name, or an array by position "
            "(empty or absent: none).",
            "content": {"application/json": {"schema": _body_schema(params, handler, fix)}},
        },
        "responses": {
            **_result_responses(described, fix, errors),
            **_statuses(secured, 400, 403, 408, 413, 415, 422, 500, 504),
        },
    }
    item: dict[str, Any] = {"post": post}
    if described["readonly"]:
        item["get"] = {
            **common,
            "operationId": _operation_id(name + "_get", used_ids),
            "description": text + "\n\nRead-only: also answered to GET (and HEAD), with the "
            "arguments as query parameters (text for a `str` parameter, JSON for any other).",
            "parameters": [*_query_parameters(params, handler, fix), _timeout_parameter()],
            "responses": {
                **_result_responses(described, fix, errors),
                **_statuses(secured, 400, 403, 422, 500, 504),
            },
        }
    return item


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def markdown(doc: str) -> str:
    """A docstring as the CommonMark the document's descriptions are: reST's ``code`` and
    roles (:class:`~a.B`, :func:`f`) as `code`; the rest as it is."""
    return _ROLE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", doc).replace("``", "`")


def _summary(doc: str) -> str:
    """The first sentence of the first paragraph, on one line (at most 120 characters)."""
    first = " ".join(doc.split("\n\n", 1)[0].split())
    if len(first) > 120:
        end = first.find(". ")
        first = first[: end + 1] if 0 < end < 120 else first[:119].rstrip() + "…"
    return first


def _operation_id(wanted: str, used: set[str]) -> str:
    n, oid = 1, wanted
    while oid in used:
        n += 1
        oid = f"{wanted}_{n}"
    used.add(oid)
    return oid


# ---------------------------------------------------------------- the gateway's own routes


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _status_schema(value: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": value}},
    }


def _own_paths(gateway: Gateway, secured: bool) -> dict[str, Any]:
    public: dict[str, Any] = {"security": []} if secured else {}
    metrics = (
        {
            "200": {
                "description": "Prometheus text: calls, errors and latency per method and "
                "transport, connections, broker drops.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        }
        if gateway.metrics is not None
        else {"404": _ref(404)}
    )
    return {
        "/healthz": {
            "get": {
                "tags": ["operations"],
                "operationId": "healthz",
                "summary": "The process answers (liveness).",
                **public,
                "responses": {
                    "200": _json_response("Alive.", _status_schema("ok")),
                    "503": _ref(503),
                },
            }
        },
        "/readyz": {
            "get": {
                "tags": ["operations"],
                "operationId": "readyz",
                "summary": "The server takes calls (readiness): 503 while it drains.",
                **public,
                "responses": {
                    "200": _json_response("Ready.", _status_schema("ready")),
                    "503": _ref(503),
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["operations"],
                "operationId": "metrics",
                "summary": "Metrics in Prometheus text form.",
                "responses": {**metrics, **_statuses(secured)},
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["docs"],
                "operationId": "openapi",
                "summary": "This document.",
                "parameters": [_if_none_match()],
                "responses": {
                    "200": {
                        **_json_response("The OpenAPI 3.1 document.", {"type": "object"}),
                        "headers": {"ETag": {"schema": {"type": "string"}}},
                    },
                    "304": {"description": "Not modified (`If-None-Match` names its ETag)."},
                    **_statuses(secured),
                },
            }
        },
        "/docs/": {
            "get": {
                "tags": ["docs"],
                "operationId": "docs",
                **public,
                "summary": "A page to read this document and try the calls (Swagger UI, "
                "served by this server).",
                "parameters": [_if_none_match()],
                "responses": {
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    "304": {"description": "Not modified (`If-None-Match` names its ETag)."},
                    "503": _ref(503),
                },
            }
        },
    }


def _if_none_match() -> dict[str, Any]:
    return {
        "name": "If-None-Match",
        "in": "header",
        "required": False,
        "description": "An ETag from an earlier answer: 304 while it still holds.",
        "schema": {"type": "string"},
    }
