"""``/openapi.json`` and ``/docs/`` (docs/HTTP.md, "OpenAPI"): the document has what a client
needs and is valid OpenAPI 3.1; schemathesis, run against a live gateway serving the demo and
the broker, finds nothing; the docs page is served from the package and renders offline."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import gzip
import json
import re
import shutil
import socket
import subprocess
import threading
import tracemalloc
import types
import urllib.request
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jsonschema
import pytest
import referencing
import referencing.jsonschema
import schemathesis
from openapi_spec_validator import validate as validate_openapi

from sockstack import Server, ServerLimits, Service, method
from sockstack.demo import Demo
from sockstack.errors import ErrorCode
from sockstack.gateway import openapi
from tests.conftest import timeout
from tests.gateway.support import arequest, gateway

MAX_EXAMPLES = 25
"""Examples per operation in the fuzzing phase (the coverage phase adds its own, bounded by
the schema): the whole file runs in well under a minute on 2 cores."""
DEADLINE_MS = 200
"""The deadline of every call the live run makes that does not set one itself: valid
arguments include ``sleep(50)`` and ``count(10**6, 1)``, answered 504 (documented) then."""
SECRET = "openapi-secret"


# ---------------------------------------------------------------- a service to describe


@dataclasses.dataclass
class Point:
    x: int
    y: int


@dataclasses.dataclass
class Problem:
    """A service type with the name of the gateway's own schema."""

    what: str


class SoldOut(Exception):
    """Nothing left of the item."""


class Shop(Service):
    """A shop, described."""

    errors = (SoldOut,)

    @method(readonly=True)
    def price(self, item: str, qty: int = 1, note: str | None = None) -> float:
        """The price of ``qty`` of ``item``.

        More words that are not the summary."""
        return 1.5 * qty

    @method
    def move(self, p: Point, by: int = 1) -> Point:
        return Point(p.x + by, p.y + by)

    @method
    def tags(self, names: list[str], *, limit: int | None = None) -> list[str]:
        return names[:limit]

    @method
    def count(self, n: int) -> Iterator[int]:
        """Stream 0 to n - 1."""
        yield from range(n)

    @method
    async def walk(self, n: int) -> AsyncIterator[Point]:
        for i in range(n):
            yield Point(i, i)

    @method
    def first(self, a: int, /, b: int = 0) -> int:
        return a + b

    @method
    def keyed(self, *, token: str) -> str:
        return token

    @method
    def total(self, *nums: int, **names: str) -> int:
        return sum(nums) + len(names)

    @method(name="odd name/{x}?é")
    def odd(self) -> str:
        return "odd"

    @method
    def upload(self, items: Iterator[int]) -> int:
        return sum(items)

    @method
    def buy(self, item: str) -> None:
        raise SoldOut(f"no {item} left")

    @method
    def later(self, day: datetime.date, worry: Problem | None = None) -> datetime.date:
        return day

    @method(readonly=True)
    def blob(self, data: bytes) -> int:
        return len(data)


def _doc_of(served: Server) -> dict[str, Any]:
    return openapi.document(served.pattern("gateway"))  # type: ignore[arg-type]


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _body(op: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = op["requestBody"]["content"]["application/json"]["schema"]
    return schema


def _forms(op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    schema = _body(op)
    return {f["type"]: f for f in schema.get("anyOf", [schema])}


def _needed(op: dict[str, Any]) -> set[str]:
    """The forms of arguments a call must take (``null``, "none", only when none is needed)."""
    forms = set(_forms(op))
    assert ("null" in forms) is (not op["requestBody"]["required"]), forms
    return forms - {"null"}


# ---------------------------------------------------------------- the document


async def test_the_document_has_what_a_client_needs() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "GET", "/openapi.json")
        assert (r.status, r.headers["content-type"]) == (200, "application/json")
        doc = r.json()
        validate_openapi(doc)  # the OpenAPI 3.1 schema itself
        assert doc["openapi"] == "3.1.0"
        assert doc["info"]["title"] == "Shop"
        assert "A shop, described." in doc["info"]["description"]
        assert "`SoldOut` (Nothing left of the item.)" in doc["info"]["description"]
        paths = doc["paths"]
        # every ref resolves, none is left pointing at describe's $defs
        for ref in _refs(doc):
            assert ref.startswith("#/components/"), ref
            _resolve(doc, ref)
        schemas = doc["components"]["schemas"]

        # a dataclass parameter and result: a component, referred to
        move = paths["/rpc/move"]["post"]
        assert set(move) >= {"operationId", "summary", "description", "requestBody", "responses"}
        assert "get" not in paths["/rpc/move"]  # not readonly
        named = _forms(move)["object"]
        assert named["required"] == ["p"]
        assert named["properties"]["p"]["$ref"] == "#/components/schemas/Point"
        assert named["properties"]["by"]["default"] == 1
        assert named["additionalProperties"] is False
        assert schemas["Point"]["required"] == ["x", "y"]
        ok = move["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": "#/components/schemas/Point"}
        assert move["requestBody"]["required"] is True
        positional = _forms(move)["array"]
        assert positional["minItems"] == 1 and positional["items"] is False
        assert len(positional["prefixItems"]) == 2

        # list[...], a keyword-only Optional: by name only (the array form cannot give it)
        tags = _forms(paths["/rpc/tags"]["post"])
        assert _needed(paths["/rpc/tags"]["post"]) == {"object", "array"}  # limit is optional
        assert tags["object"]["properties"]["names"]["type"] == "array"
        assert tags["object"]["properties"]["names"]["items"] == {"type": "string"}
        limit = tags["object"]["properties"]["limit"]
        assert {"type": "integer"} in limit["anyOf"] and {"type": "null"} in limit["anyOf"]
        assert len(tags["array"]["prefixItems"]) == 1  # names only
        assert _needed(paths["/rpc/keyed"]["post"]) == {"object"}  # required keyword-only
        assert _needed(paths["/rpc/first"]["post"]) == {"array"}  # required positional-only
        assert _needed(paths["/rpc/odd%20name/%7Bx%7D%3F%C3%A9"]["post"]) == {"object", "array"}
        total = _forms(paths["/rpc/total"]["post"])
        assert total["object"]["additionalProperties"] == {"type": "string"}
        assert total["array"]["items"] == {"type": "integer"}

        # a readonly method: GET with query parameters (text for str, JSON for others)
        price = paths["/rpc/price"]
        assert set(price) == {"get", "post"}
        assert price["post"]["summary"] == "The price of `qty` of `item`."
        assert (
            "price(item: str, qty: int = 1, note: str | None = None) -> float"
            in (price["post"]["description"])
        )
        query = {p["name"]: p for p in price["get"]["parameters"] if p["in"] == "query"}
        assert query["item"]["required"] is True and query["item"]["schema"]["type"] == "string"
        assert query["qty"]["content"]["application/json"]["schema"]["type"] == "integer"
        assert "content" in query["note"]  # str | None: "null" is None, so JSON
        assert "requestBody" not in price["get"]
        timeouts = [p for p in price["get"]["parameters"] if p["in"] == "header"]
        assert [p["name"] for p in timeouts] == ["Sockstack-Timeout-Ms"]
        assert price["get"]["operationId"] != price["post"]["operationId"]

        # streams: NDJSON and SSE, each line or event described
        count = paths["/rpc/count"]["post"]["responses"]["200"]["content"]
        assert set(count) == {"application/x-ndjson", "text/event-stream"}
        lines = {b["title"]: b for b in count["application/x-ndjson"]["schema"]["oneOf"]}
        assert lines["item"]["properties"]["item"] == {"type": "integer"}
        assert lines["error"]["properties"]["error"] == {"$ref": "#/components/schemas/Problem"}
        walk = paths["/rpc/walk"]["post"]["responses"]["200"]["content"]
        item = walk["application/x-ndjson"]["schema"]["oneOf"][0]["properties"]["item"]
        assert item == {"$ref": "#/components/schemas/Point"}

        # declared errors, and the statuses the gateway answers, as problem details
        buy = paths["/rpc/buy"]["post"]
        assert "SoldOut" in buy["responses"]["200"]["description"]
        assert buy["responses"]["200"]["content"]["application/json"]["schema"] == {"type": "null"}
        statuses = set(buy["responses"])
        assert statuses == {"200", "400", "403", "408", "413", "415", "422", "500", "503", "504"}
        assert "401" not in statuses  # no secret
        bad = _resolve(doc, buy["responses"]["422"]["$ref"])
        assert "BAD_ARGUMENTS" in bad["description"]
        assert bad["content"]["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
        problem = schemas["Problem"]
        assert problem["required"] == ["type", "title", "status", "detail", "code"]
        assert "error" in problem["properties"]
        unavailable = _resolve(doc, buy["responses"]["503"]["$ref"])
        assert "Retry-After" in unavailable["headers"]

        # a service type named like the gateway's own schema keeps its own, renamed
        later = _forms(paths["/rpc/later"]["post"])["object"]["properties"]
        assert later["day"]["format"] == "date"
        renamed = [r for r in _refs(later["worry"]) if r != "#/components/schemas/Problem"]
        assert renamed and _resolve(doc, renamed[0])["required"] == ["what"]

        # left out: an upload (HTTP cannot send one); kept: the built-in description
        assert "/rpc/upload" not in paths
        assert "/rpc/rpc.describe" in paths
        # and the gateway's own routes
        assert {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs/"} <= set(paths)
        assert "security" not in doc and "securitySchemes" not in doc["components"]


async def test_a_name_a_path_cannot_hold_is_percent_encoded_and_callable() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        doc = (await arequest(port, "GET", "/openapi.json")).json()
        path = "/rpc/odd%20name/%7Bx%7D%3F%C3%A9"
        assert path in doc["paths"]
        assert openapi.rpc_path("odd name/{x}?é") == path
        r = await arequest(port, "POST", path, [])
        assert (r.status, r.json()) == (200, "odd")


async def test_the_document_works_for_the_calls_it_describes() -> None:
    """A client that follows the document alone: each form of arguments it documents works."""
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        assert (await arequest(port, "POST", "/rpc/first", [2, 3])).json() == 5
        assert (await arequest(port, "POST", "/rpc/keyed", {"token": "t"})).json() == "t"
        r = await arequest(port, "POST", "/rpc/total", {"a": "x"})
        assert r.json() == 1
        assert (await arequest(port, "POST", "/rpc/total", [1, 2, 3])).json() == 6
        assert (await arequest(port, "POST", "/rpc/total", b"null")).json() == 0
        assert (await arequest(port, "POST", "/rpc/total", b"")).json() == 0
        r = await arequest(port, "GET", "/rpc/price?item=tea&qty=2&note=null")
        assert r.json() == 3.0
        r = await arequest(port, "GET", '/rpc/price?item=tea&note="5"')
        assert r.json() == 1.5
        r = await arequest(port, "POST", "/rpc/buy", {"item": "tea"})
        assert (r.status, r.problem["error"]) == (400, "SoldOut")


async def test_with_a_secret_every_path_but_the_probes_needs_the_bearer() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"], secret=SECRET) as (_, port):
        r = await arequest(port, "GET", "/openapi.json")
        assert r.status == 401 and r.problem["code"] == ErrorCode.AUTH_FAILED
        auth = {"authorization": f"Bearer {SECRET}"}
        doc = (await arequest(port, "GET", "/openapi.json", headers=auth)).json()
        validate_openapi(doc)
        scheme = doc["components"]["securitySchemes"]["bearer"]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
        assert doc["security"] == [{"bearer": []}]
        for name in ("/healthz", "/readyz"):
            assert doc["paths"][name]["get"]["security"] == []
            assert "401" not in doc["paths"][name]["get"]["responses"]
        assert "401" in doc["paths"]["/rpc/buy"]["post"]["responses"]
        assert "401" in doc["paths"]["/metrics"]["get"]["responses"]
        unauthorized = doc["components"]["responses"]["Unauthorized"]
        assert "WWW-Authenticate" in unauthorized["headers"]
        # the page and its files are public (a browser sends no bearer for them): the page
        # takes the secret in its address (?access_token=) for the document it loads
        assert doc["paths"]["/docs/"]["get"]["security"] == []
        for name in ("/docs/", "/docs/init.js", "/docs/swagger-ui-bundle.js"):
            assert (await arequest(port, "GET", name)).status == 200


async def test_other_route_modules_add_their_own_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """``openapi_paths(gateway)`` of kv and topics: a path map, or paths with components and
    tags; one that fails is left out (logged), the rest of the document stands."""
    from sockstack.gateway import kv, topics

    item = {"get": {"responses": {"200": {"description": "ok"}}}}
    monkeypatch.setattr(kv, "openapi_paths", lambda gw: {"/kv": item}, raising=False)
    monkeypatch.setattr(
        topics,
        "openapi_paths",
        lambda gw: {
            "paths": {"/topics/stats": item},
            "components": {"schemas": {"Event": {"type": "object"}, "Problem": {}}},
            "tags": [{"name": "topics"}],
        },
        raising=False,
    )
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (server, _):
        doc = _doc_of(server)
        assert doc["paths"]["/kv"] == item and doc["paths"]["/topics/stats"] == item
        assert doc["components"]["schemas"]["Event"] == {"type": "object"}
        assert doc["components"]["schemas"]["Problem"] == openapi.PROBLEM_SCHEMA
        assert {"name": "topics"} in doc["tags"]
        validate_openapi(doc)

        def broken(gw: Any) -> Any:
            raise RuntimeError("a bug in a route module")

        monkeypatch.setattr(kv, "openapi_paths", broken)
        doc = _doc_of(server)
        assert "/kv" not in doc["paths"] and "/topics/stats" in doc["paths"]


async def test_a_server_without_a_service_describes_what_it_has() -> None:
    """The broker alone: its ``broker.stats``, the gateway's routes, nothing of a service."""
    async with gateway(broker=True, tcp=["127.0.0.1:0"]) as (_, port):
        doc = (await arequest(port, "GET", "/openapi.json")).json()
        validate_openapi(doc)
        assert doc["info"]["title"] == "sockstack"
        assert "base class" not in doc["info"]["description"]  # (object's docstring)
        rpc = sorted(p for p in doc["paths"] if p.startswith("/rpc/"))
        assert rpc == ["/rpc/broker.stats"]
        r = await arequest(port, "GET", "/rpc/broker.stats")
        assert r.status == 200 and isinstance(r.json(), dict)


async def test_built_once_then_304_and_gzip() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        first = await arequest(port, "GET", "/openapi.json")
        again = await arequest(port, "GET", "/openapi.json")
        assert first.body == again.body and first.headers["etag"] == again.headers["etag"]
        tag = first.headers["etag"]
        r = await arequest(port, "GET", "/openapi.json", headers={"if-none-match": tag})
        assert (r.status, r.body, r.headers["etag"]) == (304, b"", tag)
        r = await arequest(port, "GET", "/openapi.json", headers={"accept-encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        assert gzip.decompress(r.body) == first.body and r.headers["etag"] != tag
        r = await arequest(port, "GET", "/openapi.json", headers={"accept-encoding": "gzip;q=0"})
        assert "content-encoding" not in r.headers and r.body == first.body
        r = await arequest(port, "HEAD", "/openapi.json")
        assert (r.status, r.body) == (200, b"")
        r = await arequest(port, "POST", "/openapi.json", {})
        assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
        r = await arequest(port, "GET", "/openapi.json/more")
        assert r.status == 404


# ---------------------------------------------------------------- the docs page


def _page_files(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


async def test_the_docs_page_is_served_from_the_package_and_nothing_else() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "GET", "/docs?access_token=x")
        assert (r.status, r.headers["location"]) == (308, "docs/?access_token=x")
        page = await arequest(port, "GET", "/docs/")
        assert page.status == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "http" not in policy
        html = page.body.decode()
        files = _page_files(html)
        assert {"swagger-ui.css", "swagger-ui-bundle.js", "init.js"} <= set(files)
        kinds = {".css": "text/css", ".js": "text/javascript", ".html": "text/html"}
        for name in files:
            if name.startswith("../"):
                continue  # the <noscript> link to /openapi.json
            assert "//" not in name, name  # nothing from elsewhere
            r = await arequest(port, "GET", f"/docs/{name}", headers={"accept-encoding": "gzip"})
            assert r.status == 200, name
            assert r.headers["content-type"].startswith(kinds[name[name.rfind(".") :]])
            plain = await arequest(port, "GET", f"/docs/{name}")
            body = gzip.decompress(r.body) if "content-encoding" in r.headers else r.body
            assert body == plain.body
        init = (await arequest(port, "GET", "/docs/init.js")).body.decode()
        assert "http:" not in init and "https:" not in init and "validatorUrl: null" in init
        for name in ("LICENSE", "NOTICE", "swagger-ui-bundle.js.LICENSE.txt"):
            r = await arequest(port, "GET", f"/docs/{name}")
            assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
        assert b"Apache License" in (await arequest(port, "GET", "/docs/LICENSE")).body
        for bad in ("/docs/nope.js", "/docs/../openapi.py", "/docs/%2e%2e/openapi.py"):
            r = await arequest(port, "GET", bad)
            assert r.status == 404, bad
        r = await arequest(port, "POST", "/docs/", {})
        assert r.status == 405


async def test_docs_files_and_document_are_kept_once_not_per_request() -> None:
    """The page's files and the document are read or built once: more requests hold no more
    memory (the caches are bounded by the package and the service)."""
    async with gateway(Demo(), tcp=["127.0.0.1:0"], broker=True) as (_, port):
        names = ["", "swagger-ui-bundle.js", "swagger-ui.css", "init.js", "LICENSE"]

        async def every() -> None:
            for enc in ("gzip", "identity"):
                headers = {"accept-encoding": enc}
                for name in names:
                    assert (await arequest(port, "GET", f"/docs/{name}", headers=headers)).status
                assert (await arequest(port, "GET", "/openapi.json", headers=headers)).status

        await every()  # read, compressed and built: kept from now on
        tracemalloc.start()
        try:
            await every()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(5):
                await every()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 256 << 10, f"{grown} bytes more after 5 more rounds"


async def test_the_page_renders_the_document_in_a_real_browser(tmp_path: Any) -> None:
    """Debian's Chromium, headless and offline: Swagger UI lists the methods, with a secret
    given as ``?access_token=``."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make test-deps installs Debian's)")
    async with gateway(Shop(), tcp=["127.0.0.1:0"], secret=SECRET) as (_, port):
        proc = await asyncio.create_subprocess_exec(
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            f"http://127.0.0.1:{port}/docs/?access_token={SECRET}",
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout(45))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    dom = out.decode()
    assert "swagger-ui" in dom
    for shown in ("/rpc/price", "/rpc/move", "/rpc/count", "The price of", "Shop"):
        assert shown in dom, shown


# ---------------------------------------------------------------- schemathesis, live


class Live:
    """The demo and the broker served on a loop in a background thread (schemathesis's client
    blocks): ``Server(Demo(), tcp=[...], http=["127.0.0.1:0"], broker=True)``."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openapi-live", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        srv = Server(
            Demo(),
            tcp=["127.0.0.1:0"],
            http=["127.0.0.1:0"],
            broker=True,
            limits=ServerLimits(drain_timeout=timeout(2), close_timeout=timeout(2)),
            **self.options,
        )
        try:
            self.loop.run_until_complete(srv.start())
            self.server = srv
        finally:
            self._started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(srv.shutdown())
        self.loop.close()

    def __enter__(self) -> Live:
        self._thread.start()
        assert self._started.wait(timeout(10)) and self.server is not None, "no server"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout(20))
        assert not self._thread.is_alive(), "the server thread did not stop"

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.endpoint('http').port}"


_ACCEPTING = ["2xx", "3xx", "400", "401", "403", "404", "5xx"]
_REFUSING = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]
"""(schemathesis's own default for negative_data_rejection)"""


def _config(**more: Any) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": 14,
            "request-timeout": 10,
            "max-stream-events": 256,
            # 504 is the caller's own deadline (Sockstack-Timeout-Ms; 0 is valid and already
            # past), documented per call: not a server error. A valid call may still be refused
            # by the method itself (400 APPLICATION_ERROR: add(null, null), sleep(61)): the
            # check sockstack_problems below tells that apart from any other 400.
            "checks": {
                "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "504"]},
                "positive_data_acceptance": {"expected-statuses": _ACCEPTING},
            },
            # /kv's If-Match and If-None-Match are conditions: a valid one that does not hold
            # is 412 (RFC 9110 §13.1), the answer the document gives (sockstack_problems checks
            # that the case sent one); it comes before the body is read (§13.2.1), so a PUT
            # whose body is missing or bad may be refused with it too.
            "operations": [
                {
                    "include-tag": "kv",
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": [*_ACCEPTING, "412"]},
                        "negative_data_rejection": {"expected-statuses": [*_REFUSING, "412"]},
                    },
                }
            ],
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            # The same cases every run: none drawn from earlier answers (time(), broker.stats
            # and the deadline's 504s differ from run to run).
            "phases": {
                "examples": {"extra-data-sources": {"responses": False}},
                "coverage": {"extra-data-sources": {"responses": False}},
                "fuzzing": {
                    "extra-data-sources": {"responses": False},
                    "error-feedback": {"enabled": False},
                },
            },
            **more,
        }
    )


_VALIDATORS: dict[tuple[int, str, str], jsonschema.protocols.Validator] = {}


def _line_validator(doc: dict[str, Any], path: str, verb: str) -> Any:
    """A validator of one NDJSON line of ``verb path``'s 200, as the document describes it."""
    key = (id(doc), path, verb)
    found = _VALIDATORS.get(key)
    if found is None:
        resource = referencing.Resource.from_contents(
            doc, default_specification=referencing.jsonschema.DRAFT202012
        )
        registry: referencing.Registry[Any] = referencing.Registry().with_resource(
            "urn:doc", resource
        )
        pointer = "/".join(
            p.replace("~", "~0").replace("/", "~1")
            for p in ("paths", path, verb, "responses", "200", "content", "application/x-ndjson")
        )
        found = jsonschema.Draft202012Validator(
            {"$ref": f"urn:doc#/{pointer}/schema"}, registry=registry
        )
        _VALIDATORS[key] = found
    return found


def _sse_lines(text: str) -> Iterator[dict[str, Any]]:
    """Each event of an SSE body as the NDJSON line of the same meaning."""
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        yield {fields["event"]: json.loads(fields["data"])}


def _conditional(case: Any) -> bool:
    """Whether the case sent ``If-Match`` or ``If-None-Match``."""
    return any(k.lower() in ("if-match", "if-none-match") for k in case.headers or {})


def _over_the_topic_bytes(case: Any) -> bool:
    """A topic or pattern within the document's ``maxLength`` (characters) but over the
    broker's 256 bytes of UTF-8: the document says so in words, a schema cannot count bytes."""
    name = (case.path_parameters or {}).get("topic")
    return isinstance(name, str) and len(name.encode("utf-8", "surrogatepass")) > 256


@schemathesis.check
def sockstack_problems(ctx: Any, response: Any, case: Any) -> bool | None:
    """sockstack's own promises: an error is a problem object carrying the HTTP status and
    its error code (a HEAD's answer: the type, no body); data the document calls valid is
    refused only by the method itself (APPLICATION_ERROR), never as unreadable (400
    DECODE_ERROR) nor as bad arguments (422), and a 412 only for a condition the case sent;
    each NDJSON line and SSE event of a stream fits the document, and the stream ends with a
    result or an error."""
    ctype = (response.headers.get("content-type") or [""])[0]
    status = response.status_code
    if case.method.upper() == "HEAD":
        assert response.content in (b"", None), "a HEAD answer has no body"
        if status >= 400:
            assert ctype == "application/problem+json", ctype
        return None
    if status >= 400:
        assert ctype == "application/problem+json", ctype
        problem = response.json()
        assert problem["status"] == status, problem
        assert problem["type"] == f"urn:sockstack:error:{problem['title']}", problem
        assert problem["title"] == ErrorCode(problem["code"]).name, problem
        if status == 412:
            assert problem["code"] == ErrorCode.PRECONDITION_FAILED, problem
            assert _conditional(case), f"412 without a condition: {problem}"
        meta = case.meta
        documented = case.method.lower() in case.operation.schema.raw_schema["paths"].get(
            case.operation.path, {}
        )
        if meta is not None and meta.generation.mode.is_positive and documented:
            assert status != 422, f"valid arguments refused: {problem}"
            if status == 400 and not (
                problem["code"] == ErrorCode.BAD_TOPIC and _over_the_topic_bytes(case)
            ):
                assert problem["code"] == ErrorCode.APPLICATION_ERROR, problem
    elif status == 200 and ctype in ("application/x-ndjson", "text/event-stream"):
        doc = case.operation.schema.raw_schema
        check = _line_validator(doc, case.operation.path, case.method.lower())
        text = response.content.decode()
        if ctype == "text/event-stream":
            lines = list(_sse_lines(text))
        else:
            assert text.endswith("\n"), "the last line is ended"
            lines = [json.loads(line) for line in text.splitlines()]
        for line in lines:
            check.validate(line)
        if len(lines) < 256:  # (schemathesis reads 256 events at most)
            assert lines and set(lines[-1]) <= {"result", "error"}, lines[-1:]
            assert all(set(line) == {"item"} for line in lines[:-1])
    return None


def _before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Every call gets a deadline unless the case sets the header itself (valid or not); the
    streaming methods are asked for SSE every other case (chosen by the case's content)."""
    headers = dict(case.headers or {})
    if not any(k.lower() == "sockstack-timeout-ms" for k in headers):
        headers["Sockstack-Timeout-Ms"] = str(DEADLINE_MS)
    operation = case.operation.schema.raw_schema["paths"].get(case.operation.path, {})
    ok = operation.get(case.method.lower(), {}).get("responses", {}).get("200", {})
    if "text/event-stream" in ok.get("content", {}):
        if zlib.crc32(repr((case.body, case.query)).encode()) & 1:
            headers["Accept"] = "text/event-stream"
    case.headers = headers


def _endless(ctx: Any) -> bool:
    """An operation whose only answer is an event stream that ends when the client leaves
    (``/topics/{pattern}/events``): schemathesis would wait out each case's request timeout.
    Those streams are tested where they are served; a method that streams (NDJSON or SSE,
    ending with its result) is kept."""
    ok = ctx.operation.definition.raw.get("responses", {}).get("200", {})
    return set(ok.get("content", {})) == {"text/event-stream"}


def run_schemathesis(schema: Any) -> tuple[list[str], collections.Counter[tuple[int, str]]]:
    """Every phase of schemathesis (examples, coverage, fuzzing, stateful) as ``schemathesis
    run`` runs them; the failures, each with a curl command that reproduces it, and how many
    answers of each (status, content type) came back. (The engine
    rather than ``schema.parametrize()``: its lazy fixture loader reads a pytest private
    attribute that pytest 9 no longer has.)"""
    from schemathesis.engine import Status, events, from_schema
    from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER

    GLOBAL_HOOK_DISPATCHER.register_hook_with_name(_before_call, "before_call")
    found: list[str] = []
    seen: collections.Counter[tuple[int, str]] = collections.Counter()
    try:
        for event in from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                for interaction in event.recorder.interactions.values():
                    answer = interaction.response
                    if answer is not None:
                        ctype = (answer.headers.get("content-type") or [""])[0]
                        seen[(answer.status_code, ctype.split(";")[0])] += 1
                for checks in event.recorder.checks.values():
                    for check in checks:
                        if check.status == Status.FAILURE and check.failure_info is not None:
                            info = check.failure_info
                            found.append(
                                f"{event.label} [{check.name}] {info.failure.title}: "
                                f"{info.failure.message}\n{info.code_sample}"
                            )
            elif isinstance(event, events.NonFatalError):
                found.append(f"{event.label}: {event.value!r}")
            elif isinstance(event, events.FatalError):
                found.append(f"fatal: {event.exception!r}")
            elif isinstance(event, events.EngineFinished):
                assert event.stop_reason == "completed", event.stop_reason
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(_before_call)
    return sorted(set(found)), seen


@pytest.mark.slow
def test_schemathesis_finds_nothing() -> None:
    """The demo and the broker: every operation, every phase, every check."""
    with Live() as live:
        url = f"{live.url}/openapi.json"
        doc = json.loads(urllib.request.urlopen(url, timeout=timeout(10)).read())
        validate_openapi(doc)
        schema = schemathesis.openapi.from_url(url, config=_config()).exclude(func=_endless)
        found, seen = run_schemathesis(schema)
    assert not found, "\n\n".join(found)
    # (what it reached: results, both stream forms, refusals of each kind; /kv's created,
    # removed, not modified and failed preconditions; /topics' QoS 0 answer)
    for answer in [
        (200, "application/json"),
        (201, "application/json"),
        (202, ""),
        (204, ""),
        (304, ""),
        (412, "application/problem+json"),
        (200, "application/x-ndjson"),
        (200, "text/event-stream"),
        (200, "text/html"),
        (200, "text/plain"),
        (400, "application/problem+json"),
        (405, "application/problem+json"),
        (415, "application/problem+json"),
        (422, "application/problem+json"),
        (504, "application/problem+json"),
    ]:
        assert seen[answer], (answer, seen)
    assert sum(seen.values()) > 500, seen


@pytest.mark.slow
def test_schemathesis_with_a_secret_finds_nothing() -> None:
    """With a secret: the bearer opens every path, and without it each answers 401
    (schemathesis's ignored_auth); a few operations, fewer examples."""
    with Live(secret=SECRET) as live:
        config = _config(auth={"openapi": {"bearer": {"bearer": SECRET}}}, **{"base-url": live.url})
        config.projects.get_default().generation.update(max_examples=5)
        ask = urllib.request.Request(
            f"{live.url}/openapi.json", headers={"Authorization": f"Bearer {SECRET}"}
        )
        doc = json.loads(urllib.request.urlopen(ask, timeout=timeout(10)).read())
        # (An exclusion: the config's [[operations]] entry makes the loader's filter one that
        # includes everything, and includes are or-ed.)
        wanted = re.compile("^/(rpc/(add|time|count)|metrics|healthz|openapi.json|docs/)$")
        schema = (
            schemathesis.openapi.from_dict(doc, config=config)
            .exclude(func=lambda ctx: not wanted.match(ctx.operation.path))
            .exclude(func=_endless)
        )
        found, seen = run_schemathesis(schema)
    assert not found, "\n\n".join(found)
    assert seen[(401, "application/problem+json")] and seen[(200, "application/json")], seen


# ---------------------------------------------------------------- found on the way


async def test_accepted_connections_have_nodelay() -> None:
    """Accepted connections have TCP_NODELAY (else each keep-alive request on asyncio's loop
    waits ~40 ms for a delayed ACK)."""
    async with gateway(Demo(), tcp=["127.0.0.1:0"]) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert b"200" in await asyncio.wait_for(reader.readline(), timeout(10))
            uv, _ = server.pattern("gateway")._servers[0]  # type: ignore[attr-defined]
            (conn,) = uv.server_state.connections
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            writer.close()
            await writer.wait_closed()


def test_module_paths_takes_both_shapes() -> None:
    """(The unit under test_other_route_modules_add_their_own_paths, without a server.)"""
    item = {"get": {"responses": {"200": {"description": "ok"}}}}
    plain = types.SimpleNamespace(__name__="m", openapi_paths=lambda gw: {"/a": item})
    assert openapi._module_paths(plain, None) == {"paths": {"/a": item}}  # type: ignore[arg-type]
    none = types.SimpleNamespace(__name__="m")
    assert openapi._module_paths(none, None) is None  # type: ignore[arg-type]


async def test_a_non_finite_number_in_a_body_is_bad_input() -> None:
    """NaN, Infinity and numbers beyond a float are not JSON (RFC 8259): 400 DECODE_ERROR, not a
    500 when the answer cannot be encoded."""
    async with gateway(Demo(), tcp=["127.0.0.1:0"]) as (_, port):
        for text in (b'{"value": 1e400}', b'{"value": NaN}', b"[-Infinity]"):
            r = await arequest(port, "POST", "/rpc/echo", text)
            assert (r.status, r.problem["code"]) == (400, ErrorCode.DECODE_ERROR), text


async def test_a_non_finite_number_in_a_query_is_not_a_server_error() -> None:
    """A GET's query value that is no JSON number (NaN, Infinity, 1e400) is the text itself."""
    async with gateway(Demo(), tcp=["127.0.0.1:0"]) as (_, port):
        for value in ("NaN", "Infinity", "1e400"):
            r = await arequest(port, "GET", f"/rpc/echo?value={value}")
            assert r.status == 200, (value, r)
            assert r.json() == value  # not JSON: the text as it is, as documented


async def test_a_lone_surrogate_escape_goes_back_as_it_came() -> None:
    """A lone surrogate escape (valid JSON text) goes back escaped, not as a 500."""
    async with gateway(Demo(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "POST", "/rpc/echo", b'{"value": "a\\ud800"}')
        assert (r.status, r.body) == (200, b'"a\\ud800"')


async def test_the_deadline_header_is_digits_only() -> None:
    """Sockstack-Timeout-Ms is ASCII digits (what the document says), not whatever int() takes."""
    async with gateway(Demo(), tcp=["127.0.0.1:0"]) as (_, port):
        for value in ("5_0", "+5", "0x10"):
            headers = {"sockstack-timeout-ms": value}
            r = await arequest(port, "POST", "/rpc/time", [], headers=headers)
            assert (r.status, r.problem["code"]) == (400, ErrorCode.DECODE_ERROR), value


async def test_a_query_that_is_not_utf8_is_refused() -> None:
    """Percent-escapes that are not UTF-8 are refused (400 DECODE_ERROR), not read as U+FFFD."""
    async with gateway(Demo(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "GET", "/rpc/echo?value=%ff")
        assert (r.status, r.problem["code"]) == (400, ErrorCode.DECODE_ERROR)
