"""``/rpc/{method}`` over real loopback HTTP: arguments, results, typed values, headers, and a
test per status code the gateway maps a call's error to (docs/HTTP.md, "Calls", "Errors")."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from sockstack import Server, ServerLimits, Service, ServiceError, method
from sockstack.demo import Demo
from sockstack.errors import ErrorCode
from sockstack.rpc.context import current_context
from tests.conftest import timeout
from tests.gateway.support import arequest, gateway


@dataclasses.dataclass
class Point:
    x: int
    y: int


class NoStockLeft(Exception):
    pass


class Shop(Service):
    errors = (NoStockLeft,)

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    @method(readonly=True)
    def add(self, a: int, b: int) -> int:
        return a + b

    @method
    def move(self, p: Point, by: int = 1) -> Point:
        return Point(p.x + by, p.y + by)

    @method(readonly=True)
    def later(self, day: datetime.date, days: int) -> datetime.date:
        return day + datetime.timedelta(days=days)

    @method
    def buy(self, item: str) -> None:
        raise NoStockLeft(f"no {item} left")

    @method
    def broken(self) -> None:
        raise RuntimeError("a bug")

    @method
    def wrong(self) -> int:
        return "not an int"  # type: ignore[return-value]

    @method
    async def wait(self, seconds: float) -> float:
        self.started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return seconds

    @method
    def whoami(self) -> dict[str, str]:
        ctx = current_context()
        assert ctx is not None
        ctx.set_trailer("served-by", "shop")
        ctx.set_trailer("raw-bin", b"\x00\x01")
        return {"transport": ctx.transport, "tenant": str(ctx.metadata.get("tenant"))}

    @method
    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    @method
    async def fail_midway(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise ServiceError("stopped at the end")


async def test_named_and_positional_arguments_and_get_for_readonly() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "POST", "/rpc/add", {"a": 2, "b": 3})
        assert (r.status, r.json(), r.headers["content-type"]) == (200, 5, "application/json")
        r = await arequest(port, "POST", "/rpc/add", [40, 2])
        assert r.json() == 42
        r = await arequest(port, "GET", "/rpc/add?a=2&b=3")
        assert (r.status, r.json()) == (200, 5)
        r = await arequest(port, "HEAD", "/rpc/add?a=2&b=3")
        assert (r.status, r.body) == (200, b"")
        # curl -d sends a form type: JSON text in it is read as JSON, a form as fields
        form = {"content-type": "application/x-www-form-urlencoded"}
        r = await arequest(port, "POST", "/rpc/add", '{"a": 1, "b": 1}', headers=form)
        assert r.json() == 2
        r = await arequest(port, "POST", "/rpc/add", "a=5&b=6", headers=form)
        assert r.json() == 11


async def test_named_arguments_with_defaults_unknown_and_missing_names() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "POST", "/rpc/move", {"p": {"x": 1, "y": 1}})
        assert r.json() == {"x": 2, "y": 2}  # by's default
        r = await arequest(port, "POST", "/rpc/move", {"by": 2, "p": {"x": 0, "y": 0}})
        assert r.json() == {"x": 2, "y": 2}  # any order
        r = await arequest(port, "POST", "/rpc/add", {"a": 1, "b": 2, "c": 3})
        assert (r.status, r.problem["code"]) == (422, ErrorCode.BAD_ARGUMENTS)
        assert "3 keyword arguments" in r.problem["detail"]
        r = await arequest(port, "POST", "/rpc/add", {"b": 2})
        assert (r.status, r.problem["code"]) == (422, ErrorCode.BAD_ARGUMENTS)
        assert "'a'" in r.problem["detail"]


async def test_typed_values_travel_as_the_json_codec_carries_them() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "POST", "/rpc/move", {"p": {"x": 1, "y": 2}, "by": 3})
        assert r.json() == {"x": 4, "y": 5}
        r = await arequest(port, "GET", "/rpc/later?day=2026-11-30&days=2")
        assert r.json() == "2026-12-02"


async def test_metadata_deadline_and_trailers_as_headers() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "POST", "/rpc/whoami", {}, headers={"sockstack-meta-tenant": "t1"})
        assert r.json() == {"transport": "http", "tenant": "t1"}
        assert r.headers["sockstack-trailer-served-by"] == "shop"
        assert base64.b64decode(r.headers["sockstack-trailer-raw-bin"]) == b"\x00\x01"
        r = await arequest(
            port, "POST", "/rpc/wait", {"seconds": 5}, headers={"sockstack-timeout-ms": "50"}
        )
        assert r.status == 504 and r.problem["code"] == ErrorCode.DEADLINE_EXCEEDED
        r = await arequest(
            port, "POST", "/rpc/wait", {"seconds": 0}, headers={"sockstack-timeout-ms": "0"}
        )
        assert r.status == 504 and r.problem["code"] == ErrorCode.DEADLINE_EXCEEDED
        r = await arequest(
            port, "POST", "/rpc/add", [1, 2], headers={"sockstack-timeout-ms": "soon"}
        )
        assert r.status == 400 and r.problem["code"] == ErrorCode.DECODE_ERROR


async def test_each_error_has_its_status_and_code() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        cases = [
            ("POST", "/rpc/nope", [1], 404, ErrorCode.UNKNOWN_METHOD),
            ("POST", "/rpc/add", {"a": 1}, 422, ErrorCode.BAD_ARGUMENTS),
            ("POST", "/rpc/add", {"a": "x", "b": 1}, 422, ErrorCode.BAD_ARGUMENTS),
            ("POST", "/rpc/add", 7, 422, ErrorCode.BAD_ARGUMENTS),
            ("POST", "/rpc/add", b"{not json", 400, ErrorCode.DECODE_ERROR),
            ("POST", "/rpc/buy", {"item": "tea"}, 400, ErrorCode.APPLICATION_ERROR),
            ("POST", "/rpc/broken", [], 500, ErrorCode.UNEXPECTED_ERROR),
            ("POST", "/rpc/wrong", [], 500, ErrorCode.BAD_RESULT),
            ("GET", "/rpc/buy?item=tea", None, 405, ErrorCode.METHOD_NOT_ALLOWED),
            ("PUT", "/rpc/add", [1, 2], 405, ErrorCode.METHOD_NOT_ALLOWED),
            ("GET", "/nowhere", None, 404, ErrorCode.NOT_FOUND),
        ]
        for verb, path, body, status, code in cases:
            headers = {"content-type": "application/json"} if isinstance(body, bytes) else None
            r = await arequest(port, verb, path, body, headers=headers)
            assert (r.status, r.problem["code"]) == (status, code), (verb, path, r)
        r = await arequest(port, "POST", "/rpc/buy", {"item": "tea"})
        assert r.problem["error"] == "NoStockLeft" and "no tea left" in r.problem["detail"]
        r = await arequest(port, "GET", "/rpc/buy")
        assert r.headers["allow"] == "POST"
        r = await arequest(port, "POST", "/rpc/add", "<a/>", headers={"content-type": "text/xml"})
        assert (r.status, r.problem["code"]) == (415, ErrorCode.UNSUPPORTED_CODEC)
        # every problem answered is counted by code name, refusals before any call too
        text = (await arequest(port, "GET", "/metrics")).body.decode()
        assert 'sockstack_http_problems_total{code="NOT_FOUND"} 1.0' in text
        assert 'sockstack_http_problems_total{code="UNSUPPORTED_CODEC"} 1.0' in text
        assert 'sockstack_server_errors_total{code="UNKNOWN_METHOD"' not in text  # (no call)


async def test_a_body_beyond_the_bound_is_413_unread() -> None:
    from sockstack.gateway import Gateway, HttpLimits

    gw = Gateway(["127.0.0.1:0"], limits=HttpLimits(max_body=1000))
    async with gateway(Shop(), patterns=[gw], tcp=["127.0.0.1:0"], http=()) as (_, port):
        r = await arequest(port, "POST", "/rpc/add", json.dumps({"a": "x" * 2000, "b": 1}))
        assert (r.status, r.problem["code"]) == (413, ErrorCode.PAYLOAD_TOO_LARGE)


async def test_overload_is_503_with_retry_after() -> None:
    from sockstack.gateway import Gateway, HttpLimits

    shop = Shop()
    gw = Gateway(["127.0.0.1:0"], limits=HttpLimits(max_in_flight=1))
    async with gateway(shop, patterns=[gw], tcp=["127.0.0.1:0"], http=()) as (_, port):
        slow = asyncio.ensure_future(arequest(port, "POST", "/rpc/wait", {"seconds": 2}))
        await asyncio.wait_for(shop.started.wait(), timeout(10))
        r = await arequest(port, "POST", "/rpc/add", [1, 2])
        assert (r.status, r.problem["code"], r.headers["retry-after"]) == (
            503,
            ErrorCode.OVERLOADED,
            "1",
        )
        assert (await slow).json() == 2


async def test_a_call_accepted_before_the_drain_is_answered_and_then_the_port_closes() -> None:
    shop = Shop()
    server = Server(
        shop, tcp=["127.0.0.1:0"], http=["127.0.0.1:0"], limits=ServerLimits(drain_timeout=10)
    )
    await server.start()
    port = server.endpoint("http").port
    try:
        assert (await arequest(port, "GET", "/readyz")).status == 200
        slow = asyncio.ensure_future(arequest(port, "POST", "/rpc/wait", {"seconds": 0.5}))
        await asyncio.wait_for(shop.started.wait(), timeout(10))
        stopping = asyncio.ensure_future(server.shutdown())
        # the call accepted before the drain gets its answer
        assert (await asyncio.wait_for(slow, timeout(10))).json() == 0.5
        await asyncio.wait_for(stopping, timeout(20))
        with pytest.raises(ConnectionRefusedError):
            await arequest(port, "GET", "/readyz")
    finally:
        await server.shutdown()


async def test_streams_as_ndjson_and_sse() -> None:
    async with gateway(Shop(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(port, "POST", "/rpc/count", {"n": 3})
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(x) for x in r.body.splitlines()]
        assert lines == [{"item": 0}, {"item": 1}, {"item": 2}, {"result": None}]
        r = await arequest(
            port, "POST", "/rpc/count", {"n": 2}, headers={"accept": "text/event-stream"}
        )
        assert r.headers["content-type"] == "text/event-stream"
        assert r.body == (
            b"event: item\ndata: 0\n\nevent: item\ndata: 1\n\nevent: result\ndata: null\n\n"
        )
        r = await arequest(port, "POST", "/rpc/fail_midway", {"n": 1})
        last = json.loads(r.body.splitlines()[-1])
        assert last["error"]["code"] == ErrorCode.APPLICATION_ERROR
        r = await arequest(port, "POST", "/rpc/count", {"n": "x"})
        assert (r.status, r.problem["code"]) == (422, ErrorCode.BAD_ARGUMENTS)


async def test_upgrade_h2c_keeps_the_body() -> None:
    """uvicorn #2722: with httptools, Upgrade: h2c made the body vanish."""
    async with gateway(Demo(), tcp=["127.0.0.1:0"]) as (_, port):
        r = await arequest(
            port,
            "POST",
            "/rpc/add",
            {"a": 2, "b": 3},
            headers={
                "connection": "Upgrade, HTTP2-Settings",
                "upgrade": "h2c",
                "http2-settings": "AAMAAABkAARAAAAAAAIAAAAA",
            },
        )
        assert (r.status, r.json()) == (200, 5)


async def test_a_call_still_running_after_the_drain_timeout_is_answered_503() -> None:
    shop = Shop()
    limits = ServerLimits(drain_timeout=0.2, close_timeout=2)
    server = Server(shop, tcp=["127.0.0.1:0"], http=["127.0.0.1:0"], limits=limits)
    await server.start()
    port = server.endpoint("http").port
    try:
        slow = asyncio.ensure_future(arequest(port, "POST", "/rpc/wait", {"seconds": 30}))
        await asyncio.wait_for(shop.started.wait(), timeout(10))
        await asyncio.wait_for(server.shutdown(), timeout(20))
        r = await asyncio.wait_for(slow, timeout(10))
        assert (r.status, r.problem["code"]) == (503, ErrorCode.ABANDONED)
    finally:
        await server.shutdown()


async def test_a_client_that_leaves_mid_call_stops_the_call() -> None:
    shop = Shop()
    async with gateway(shop, tcp=["127.0.0.1:0"]) as (_, port):
        body = b'{"seconds": 30}'
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /rpc/wait HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await asyncio.wait_for(shop.started.wait(), timeout(10))
        sock.close()
        await asyncio.wait_for(shop.cancelled.wait(), timeout(10))
        r = await arequest(port, "POST", "/rpc/add", [1, 2])
        assert r.json() == 3


async def test_accepted_connections_have_tcp_nodelay() -> None:
    """Without it (a listening socket made with proto 0), asyncio leaves Nagle on and every
    keep-alive request waits for the peer's delayed ACK (~40 ms)."""
    seen: list[int] = []

    class Probe(Service):
        @method(inline=True)
        def nothing(self) -> None:
            pass

    async with gateway(Probe(), tcp=["127.0.0.1:0"]) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), timeout(10))
            assert line.startswith(b"HTTP/1.1 200")
            gw = server.pattern("gateway")
            for uv, _ in gw._servers:  # type: ignore[attr-defined]
                for conn in uv.server_state.connections:
                    s = conn.transport.get_extra_info("socket")
                    seen.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            writer.close()
    assert seen and all(seen), seen
