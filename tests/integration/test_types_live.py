"""Types and validation over real loopback sockets (issue 12 items 1-2): every documented type
(PROTOCOL.md §3.1) goes to a method that declares it, arrives as that Python type, comes back,
and is the same value again after ``decode_as`` on the client; in both clients (asyncio and
blocking), over TCP and UDP, in msgpack and JSON. Validation errors arrive as documented."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import date
from typing import Any

import pytest

from sockstack import (
    AsyncClient,
    ErrorCode,
    RemoteError,
    Server,
    ServerLimits,
    Service,
    ServiceError,
    connect,
    decode_as,
    method,
)
from tests.cli.conftest import run
from tests.conftest import timeout
from tests.rpc.test_types import IDS, REPRESENTATION, Movie

# (method name, declared type, value, the Python type the method must receive)
CASES: list[tuple[str, Any, Any, type]] = [
    (name.replace("-", "_"), type_, value, dict if type_ is Movie else type(value))
    for name, (value, type_, _, _) in zip(IDS, REPRESENTATION, strict=True)
]


def _echo(declared: Any, runtime: type) -> Callable[..., Any]:
    def echo(self: Any, value: Any) -> Any:
        if type(value) is not runtime:  # what the method receives is the declared type
            raise ServiceError(f"received {type(value).__name__}, not {runtime.__name__}")
        return value

    echo.__annotations__ = {"value": declared, "return": declared}
    return echo


Types = type(
    "Types",
    (Service,),
    {name: method(inline=True)(_echo(t, runtime)) for name, t, _, runtime in CASES},
)


@pytest.fixture
async def types_server() -> AsyncIterator[Server]:
    srv = Server(
        Types(),
        tcp=["127.0.0.1:0"],
        udp=["127.0.0.1:0"],
        limits=ServerLimits(drain_timeout=timeout(5), close_timeout=timeout(2)),
    )
    async with srv:
        yield srv


def _json_keys(codec: str) -> bool:
    return codec == "json"


@pytest.mark.parametrize("codec", ["msgpack", "json"])
@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_every_type_round_trips_in_the_asyncio_client(
    types_server: Server, scheme: str, codec: str
) -> None:
    target = str(types_server.endpoint(scheme))
    async with AsyncClient(target, codec=codec, timeout=timeout(5)) as c:
        for name, declared, value, _ in CASES:
            result = await c.call(name, value)
            back = decode_as(result, declared, str_keys=_json_keys(codec))
            assert back == value and type(back) is type(value), name


@pytest.mark.parametrize("codec", ["msgpack", "json"])
@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_every_type_round_trips_in_the_blocking_client(
    types_server: Server, scheme: str, codec: str
) -> None:
    target = str(types_server.endpoint(scheme))

    def work() -> list[tuple[str, Any]]:  # in a thread: the server runs on this test's loop
        with connect(target, codec=codec, timeout=timeout(5)) as c:
            return [
                (name, decode_as(c.call(name, value), declared, str_keys=_json_keys(codec)))
                for name, declared, value, _ in CASES
            ]

    got = await asyncio.to_thread(work)
    for (name, back), (_, _, value, _) in zip(got, CASES, strict=True):
        assert back == value and type(back) is type(value), name


class Checked(Service):
    @method(inline=True)
    def add(self, a: int, b: int) -> int:
        return a + b

    @method(inline=True)
    def days_until(self, day: date, start: date = date(2026, 11, 1)) -> int:
        return (day - start).days

    @method(inline=True)
    def distinct(self, tags: set[str]) -> list[str]:
        assert isinstance(tags, set)
        return sorted(tags)

    @method
    def wrong(self) -> int:
        return "not an int"  # type: ignore[return-value]  # the server's bug, on purpose


@pytest.mark.parametrize("codec", ["msgpack", "json"])
@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_validation_errors_arrive_as_documented(scheme: str, codec: str) -> None:
    async with Server(Checked(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"]) as srv:
        target = str(srv.endpoint(scheme))
        async with AsyncClient(target, codec=codec, timeout=timeout(5)) as c:
            with pytest.raises(RemoteError) as info:
                await c.call("add", 2, "x")
            assert (info.value.code, info.value.type, info.value.message) == (
                ErrorCode.BAD_ARGUMENTS,
                "BAD_ARGUMENTS",
                "add(): parameter 'b' expects int, got str 'x'",
            )
            with pytest.raises(RemoteError) as info:
                await c.call("wrong")
            assert (info.value.code, info.value.type) == (ErrorCode.BAD_RESULT, "BAD_RESULT")
            assert info.value.message == "wrong(): its result expects int, got str 'not an int'"
            assert await c.call("add", 2, 3) == 5

        def blocking() -> str:
            with connect(target, codec=codec, timeout=timeout(5)) as bc:
                try:
                    bc.call("add", 2.5, 1)
                except RemoteError as exc:
                    return exc.message
            return "no error"

        assert (
            await asyncio.to_thread(blocking) == "add(): parameter 'a' expects int, got float 2.5"
        )


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_the_cli_converts_its_arguments_where_the_annotations_say(codec: str) -> None:
    """`sockstack call` passes "2026-11-30" as text and [..] as a list: the server converts
    them to the date and the set its method declares; a value that does not fit is one line."""
    async with Server(Checked(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"]) as srv:
        for scheme in ("tcp", "udp"):
            target = str(srv.endpoint(scheme))

            def cli(*args: str, target: str = target) -> tuple[int, str, str]:
                out = run(["sockstack", "call", target, *args, "--codec", codec])
                return out.returncode, out.stdout, out.stderr

            assert await asyncio.to_thread(cli, "days_until", "2026-11-30") == (0, "29\n", "")
            assert await asyncio.to_thread(cli, "distinct", '["b", "a", "b"]') == (
                0,
                '["a", "b"]\n',
                "",
            )
            assert await asyncio.to_thread(cli, "add", "2", "x") == (
                1,
                "",
                "sockstack: remote error: BAD_ARGUMENTS: add(): parameter 'b' expects int, "
                "got str 'x'\n",
            )
