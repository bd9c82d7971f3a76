"""Issue 12 item 7: introspection (``rpc.describe``) and proxies (``client.proxy()``), live over
loopback with both clients, TCP and UDP."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from sockstack import (
    AsyncClient,
    CodecError,
    ErrorCode,
    RemoteError,
    Server,
    Service,
    ServiceError,
    connect,
    method,
)
from sockstack.asyncio.stream import StreamLimits
from sockstack.demo import Demo
from sockstack.protocol.messages import encode_response
from sockstack.rpc.pattern import RPC
from tests.conftest import timeout

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Order:
    item: str
    when: datetime.date | None = None


class OutOfStock(Exception):
    """Nothing left of the item."""


class Closed(ServiceError):
    """Raised, not declared: the server does not register it; a proxy that declares it does."""


class Shop(Service):
    """Sells things."""

    errors = (OutOfStock,)

    @method
    def buy(self, order: Order, qty: int = 1, *, note: str | None = None) -> list[Order]:
        """Buy ``qty`` of an order.

        The second paragraph."""
        if order.item == "none":
            raise OutOfStock(order.item)
        return [order] * qty

    @method(inline=True)
    def add(self, a: int, b: int) -> int:
        """a + b."""
        return a + b

    @method(name="shop.closed")
    def closed(self) -> None:
        raise Closed("closed for the day")

    @method
    async def later(self, x, *rest: float, **extra: str) -> Any:  # type: ignore[no-untyped-def]
        return x


class AsyncShop(Protocol):
    """What an asyncio caller declares: the Shop's methods, async."""

    errors: tuple[type[Exception], ...] = (Closed,)

    async def add(self, a: int, b: int) -> int: ...
    async def buy(self, order: Order, qty: int = 1, *, note: str | None = None) -> list[Order]: ...
    @method(name="shop.closed")  # its wire name
    async def closed(self) -> None: ...


class WrongShop(Protocol):
    async def add(self, a: int, b: int) -> str: ...


@pytest.fixture
async def shop() -> AsyncIterator[Server]:
    srv = Server(Shop(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"])
    await srv.start()
    try:
        yield srv
    finally:
        await srv.shutdown()


def _check_shop(d: dict[str, Any]) -> None:
    assert d["service"] == "Shop" and d["doc"] == "Sells things."
    assert [m["name"] for m in d["methods"]] == ["add", "buy", "later", "shop.closed"]
    add, buy, later, closed = d["methods"]
    assert add["signature"] == "(a: int, b: int) -> int" and add["doc"] == "a + b."
    assert add["params"][0] == {
        "name": "a",
        "kind": "positional_or_keyword",
        "required": True,
        "default": None,
        "annotation": "int",
        "schema": {"type": "integer"},
        "stream": False,
    }
    assert add["result"] == {"annotation": "int", "schema": {"type": "integer"}}
    assert buy["signature"] == (
        "(order: Order, qty: int = 1, *, note: str | None = None) -> list[Order]"
    )
    assert buy["doc"] == "Buy ``qty`` of an order.\n\nThe second paragraph."
    order, qty, note = buy["params"]
    assert order["schema"] == {"$ref": "#/$defs/Order"} and order["required"] is True
    assert qty["default"] == "1" and qty["required"] is False
    assert note["kind"] == "keyword_only" and note["annotation"] == "str | None"
    assert note["schema"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert buy["result"]["schema"] == {"type": "array", "items": {"$ref": "#/$defs/Order"}}
    assert d["$defs"]["Order"]["required"] == ["item"]
    assert d["$defs"]["Order"]["properties"]["when"]["anyOf"][0] == {
        "type": "string",
        "format": "date",
    }
    # Without annotations: any value; *args and **kwargs are never required.
    x, rest, extra = later["params"]
    assert x["annotation"] is None and x["schema"] == {}
    assert rest["kind"] == "var_positional" and rest["required"] is False
    assert rest["schema"] == {"type": "number"}
    assert extra["kind"] == "var_keyword" and later["signature"] == (
        "(x, *rest: float, **extra: str) -> Any"
    )
    assert closed["result"] == {"annotation": "None", "schema": {"type": "null"}}
    assert d["errors"] == [{"name": "OutOfStock", "doc": "Nothing left of the item."}]


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_describe_and_proxy_with_the_asyncio_client(shop: Server, scheme: str) -> None:
    async with AsyncClient(str(shop.endpoint(scheme)), timeout=timeout(10)) as c:
        _check_shop(await c.call("rpc.describe"))
        some = await c.call("rpc.describe", ["add"])
        assert [m["name"] for m in some["methods"]] == ["add"] and "names" not in some
        names = await c.call("rpc.describe", [])
        assert names["methods"] == [] and names["names"] == ["add", "buy", "later", "shop.closed"]
        with pytest.raises(RemoteError) as unknown:
            await c.call("rpc.describe", ["nope"])
        assert unknown.value.code == ErrorCode.APPLICATION_ERROR and "'nope'" in str(unknown.value)

        calc = c.proxy()
        assert await calc.add(2, 3) == 5
        with pytest.raises(RemoteError) as missing:
            await calc.subtract(2, 3)  # any attribute: refused when called
        assert missing.value.code == ErrorCode.UNKNOWN_METHOD

        typed = c.proxy(AsyncShop)
        assert await typed.add(a=4, b=5) == 9
        got = await typed.buy(Order("tea", datetime.date(2026, 11, 30)), 2, note="x")
        # The result comes back as the Protocol's return annotation says.
        assert got == [Order("tea", datetime.date(2026, 11, 30))] * 2
        with pytest.raises(OutOfStock):  # registered by the server (same process)
            await typed.buy(Order("none"))
        with pytest.raises(Closed, match="closed for the day"):  # registered by the proxy
            await typed.closed()
        with pytest.raises(AttributeError):
            typed.subtract  # type: ignore[attr-defined]  # noqa: B018
        with pytest.raises(CodecError, match=r"add\(\): its result expects str, got int 9"):
            await c.proxy(WrongShop).add(4, 5)  # the interface lies about the server


async def test_the_asyncio_typed_proxy_wants_async_methods(shop: Server) -> None:
    async with AsyncClient(str(shop.endpoint("tcp")), timeout=timeout(10)) as c:
        with pytest.raises(TypeError, match=r"Shop\.add is not 'async def'"):
            c.proxy(Shop)
        with pytest.raises(TypeError, match="takes a class"):
            c.proxy(len)


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_describe_and_proxy_with_the_blocking_client(shop: Server, scheme: str) -> None:
    def scenario() -> None:
        with connect(str(shop.endpoint(scheme)), timeout=timeout(10)) as c:
            _check_shop(c.call("rpc.describe"))
            calc = c.proxy()
            assert calc.add(2, 3) == 5
            assert calc.add(a=2, b=3) == 5
            with pytest.raises(RemoteError) as missing:
                calc.subtract(2, 3)
            assert missing.value.code == ErrorCode.UNKNOWN_METHOD
            with pytest.raises(RemoteError) as bad:
                calc.add(2, "x")
            assert bad.value.code == ErrorCode.BAD_ARGUMENTS
            typed = c.proxy(Shop)  # the service class itself, wire names from @method(name=)
            assert typed.add(1, 2) == 3
            assert typed.buy(Order("tea"), 1) == [Order("tea")]
            with pytest.raises(Closed):
                typed.closed()  # under its wire name, shop.closed
            with pytest.raises(OutOfStock):
                typed.buy(Order("none"))
            assert sorted(dir(typed)) == ["add", "buy", "closed", "later"]
            # Dotted names as attributes.
            with pytest.raises(Closed):
                calc.shop.closed()

    await asyncio.to_thread(scenario)


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_the_demo_describes_itself(scheme: str) -> None:
    srv = Server(Demo(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"])
    await srv.start()
    try:
        async with AsyncClient(str(srv.endpoint(scheme)), timeout=timeout(10)) as c:
            d = await c.call("rpc.describe")
    finally:
        await srv.shutdown()
    assert d["service"] == "Demo" and d["errors"] == []
    methods = {m["name"]: m for m in d["methods"]}
    assert sorted(methods) == await asyncio.to_thread(Demo().methods)
    assert methods["sleep"]["signature"] == "(seconds: float) -> float"
    assert methods["sleep"]["params"][0]["schema"] == {"type": "number"}
    assert methods["get"]["params"][1]["default"] == "None"
    assert methods["keys"]["result"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert methods["echo"]["doc"] == "Return the argument unchanged."


class Feeds(Service):
    @method
    def ints(self, n: int) -> Iterator[int]:
        yield from range(n)

    @method
    def counted(self, n: int) -> Generator[str, None, int]:
        yield from map(str, range(n))
        return n

    @method
    async def dates(self) -> AsyncIterator[datetime.date]:
        yield datetime.date(2026, 11, 30)

    @method
    def bare(self):  # type: ignore[no-untyped-def]
        yield 1

    @method
    def plain(self) -> int:
        return 1


async def test_a_streaming_method_is_described_with_its_items() -> None:
    """PROTOCOL.md §4.2: ``stream`` is nil for a plain method, else the items' annotation and
    schema; ``result`` is then the generator's return value."""
    srv = Server(Feeds(), tcp=["127.0.0.1:0"])
    await srv.start()
    try:
        async with AsyncClient(str(srv.endpoint("tcp")), timeout=timeout(10)) as c:
            d = await c.call("rpc.describe")
    finally:
        await srv.shutdown()
    m = {x["name"]: x for x in d["methods"]}
    assert m["plain"]["stream"] is None
    assert m["ints"]["stream"] == {"annotation": "int", "schema": {"type": "integer"}}
    assert m["ints"]["result"] == {"annotation": None, "schema": {}}
    assert m["counted"]["stream"] == {"annotation": "str", "schema": {"type": "string"}}
    assert m["counted"]["result"] == {"annotation": "int", "schema": {"type": "integer"}}
    assert m["dates"]["stream"] == {
        "annotation": "date",
        "schema": {"type": "string", "format": "date"},
    }
    assert m["bare"]["stream"] == {"annotation": None, "schema": {}}
    assert m["ints"]["signature"] == "(n: int) -> Iterator[int]"


def test_names_under_rpc_are_reserved() -> None:
    class Clash(Service):
        @method(name="rpc.describe")
        def mine(self) -> None: ...

    with pytest.raises(ValueError, match="reserved for the built-in"):
        RPC(Clash())


async def test_a_description_too_large_for_a_frame_is_refused_and_a_subset_fits() -> None:
    """The documented bound: a big service's whole description does not fit the client's
    max_frame (TCP: RESULT_TOO_LARGE) or a datagram (UDP: DATAGRAM_TOO_LARGE); the names, then
    some methods at a time, do."""

    def make(i: int) -> Any:
        def f(self: Any, a: int) -> int:
            return a

        f.__doc__ = "x" * 2000
        return method(f)

    big = type("Big", (Service,), {f"m{i:03}": make(i) for i in range(100)})
    srv = Server(big(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"])
    await srv.start()
    try:
        for scheme, code in (
            ("tcp", ErrorCode.RESULT_TOO_LARGE),
            ("udp", ErrorCode.DATAGRAM_TOO_LARGE),
        ):
            async with AsyncClient(
                str(srv.endpoint(scheme)),
                timeout=timeout(10),
                stream_limits=StreamLimits(max_frame=64 << 10),
            ) as c:
                with pytest.raises(RemoteError) as too_big:
                    await c.call("rpc.describe")
                assert too_big.value.code == code
                names = (await c.call("rpc.describe", []))["names"]
                assert len(names) == 100
                part = await c.call("rpc.describe", names[:10])
                assert [m["name"] for m in part["methods"]] == names[:10]
    finally:
        await srv.shutdown()


class Clock(Service):
    @method
    def now(self) -> float:
        """Seconds since the epoch."""
        return 0.0


async def test_the_spec_vector_is_what_a_server_answers() -> None:
    """PROTOCOL.md §4.2's describe-answer is the live answer for its Clock service."""
    kit = json.loads((ROOT / "docs" / "conformance" / "vectors.json").read_text())
    entry = next(v for v in kit["vectors"] if v["name"] == "describe-answer")
    srv = Server(Clock(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"])
    await srv.start()
    try:
        for scheme in ("tcp", "udp"):
            async with AsyncClient(str(srv.endpoint(scheme)), timeout=timeout(10)) as c:
                got = await c.call("rpc.describe")
            assert got == entry["fields"]["result"]
            assert encode_response(1, got) == bytes.fromhex(entry["hex"])
    finally:
        await srv.shutdown()
