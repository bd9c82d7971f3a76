"""PROTOCOL.md §4.5 as another language's client meets it: ``objects.attach`` (its answer, tokens,
a CALL with no session), ``objects.describe``, the lifetimes of sessions, property reads. Raw
REQUEST and CALL frames over real loopback TCP (and UDP for describe), against an ObjectServer
on the test's loop; the lease's clock is the pattern's own ``_clock``, set by the test, so a
30 s lease is played without waiting for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sockstack import AsyncClient, RemoteError
from sockstack.errors import ErrorCode
from sockstack.objects import ObjectServer, expose
from sockstack.objects.client import _AsyncClient
from sockstack.objects.messages import NameTarget, ObjectTarget, Target, encode_call
from sockstack.objects.refs import Ref
from tests.conftest import timeout


@expose
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self, by: int = 1) -> int:
        self.n += by
        return self.n

    def child(self) -> Counter:
        return Counter()

    def maybe(self) -> Counter | None:
        return None

    def leaf(self) -> Any:  # undeclared: no pipelining, its interface described on demand
        return Leaf()

    @expose(oneway=True)
    def note(self, text: str) -> None:
        pass

    @property
    def value(self) -> int:
        return self.n


@expose
class Leaf:
    @property
    def size(self) -> int:
        return 1


COUNTER = {
    "methods": ["child", "incr", "leaf", "maybe", "note"],
    "properties": ["value"],
    "oneway": ["note"],
    "refs": {"child": "Counter", "maybe": "Counter"},
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[ObjectServer]:
    srv = ObjectServer(tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"])
    srv.register("counter", Counter())  # one shared instance: its count shows what ran
    async with srv:
        yield srv


def url(server: ObjectServer, scheme: str = "tcp") -> str:
    return f"{scheme}://127.0.0.1:{server.endpoint(scheme).port}"


async def call(
    client: AsyncClient, target: Target, method: str, args: list[Any] | None = None
) -> Any:
    """One CALL frame (§4.5), as a client of another language sends it; its answer."""

    def frame(rid: int) -> bytes:
        return encode_call(rid, target, method, args or [])

    channel = client.stream_channel(method)
    return (await channel.exchange(frame, method, timeout(10)))[1]


async def refused(code: int, what: Any) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        await what
    assert err.value.code == code, err.value
    return err.value


async def test_the_attach_answer_is_the_documented_map(server: ObjectServer) -> None:
    async with _AsyncClient(url(server), timeout=timeout(10)) as c:
        a = await c.call("objects.attach")
        assert list(a) == ["session", "lease_ms", "resumed", "names", "ifaces"]
        assert type(a["session"]) is bytes and len(a["session"]) == 16
        assert (a["lease_ms"], a["resumed"], a["names"]) == (30_000, False, {"counter": "Counter"})
        assert a["ifaces"] == {"Counter": COUNTER}
        assert list(a["ifaces"]["Counter"]) == ["methods", "properties", "oneway", "refs"]
        again = await c.call("objects.attach")  # the connection's session, not a new one
        assert (again["session"], again["resumed"]) == (a["session"], False)
        assert len(server.objects.sessions) == 1


async def test_a_call_on_a_connection_without_a_session_is_refused_before_it_runs(
    server: ObjectServer,
) -> None:
    async with _AsyncClient(url(server), timeout=timeout(10)) as c:
        await c.call("objects.describe", [])  # connected; no objects.attach
        target = NameTarget("counter")
        await refused(ErrorCode.SESSION_EXPIRED, call(c, target, "incr", [5]))
        await c.call("objects.attach")
        assert await call(c, target, "value") == 0  # incr did not run
        assert await call(c, target, "incr", [5]) == 5


async def test_a_token_moves_its_session_and_an_unknown_one_is_session_expired(
    server: ObjectServer,
) -> None:
    async with (
        _AsyncClient(url(server), timeout=timeout(10)) as first,
        _AsyncClient(url(server), timeout=timeout(10)) as second,
        _AsyncClient(url(server), timeout=timeout(10)) as third,
    ):
        token = (await first.call("objects.attach"))["session"]
        ref = await call(first, NameTarget("counter"), "child")
        assert type(ref) is Ref and ref.iface == "Counter" and ref.id is not None
        assert await call(first, ObjectTarget(ref.id), "incr") == 1

        moved = await second.call("objects.attach", token)  # as after a reconnect
        assert (moved["session"], moved["resumed"]) == (token, True)
        assert await call(second, ObjectTarget(ref.id), "incr") == 2  # its objects came along
        # the connection it left has no session any more
        await refused(ErrorCode.SESSION_EXPIRED, call(first, ObjectTarget(ref.id), "incr"))

        other = (await third.call("objects.attach"))["session"]
        assert (await third.call("objects.attach", token))["resumed"] is True
        # the session `third` had is ended: its token names nothing
        err = await refused(ErrorCode.SESSION_EXPIRED, first.call("objects.attach", other))
        assert err.type == "SESSION_EXPIRED"
        await refused(ErrorCode.SESSION_EXPIRED, first.call("objects.attach", bytes(16)))
        await refused(ErrorCode.SESSION_EXPIRED, first.call("objects.attach", b"short"))
        await refused(ErrorCode.BAD_ARGUMENTS, first.call("objects.attach", 5))
        # text is base64 bytes (§3.1): these name no session
        await refused(ErrorCode.SESSION_EXPIRED, first.call("objects.attach", "text"))
        assert token in server.objects.sessions and other not in server.objects.sessions


async def test_an_attached_session_never_expires_a_detached_one_goes_after_the_lease(
    server: ObjectServer,
) -> None:
    clock = Clock()
    objects = server.objects
    objects._clock = clock
    c = _AsyncClient(url(server), timeout=timeout(10))
    await c.connect()
    try:
        token = (await c.call("objects.attach"))["session"]
        await call(c, NameTarget("counter"), "child")
        clock.now += 1000 * objects.limits.lease  # idle, no RENEW: attached, it stays
        objects._expire()
        assert token in objects.sessions and objects.tables.objects == 1
    finally:
        await c.close()
    session = objects.sessions[token]
    async with asyncio.timeout(timeout(10)):
        while session.peer is not None:  # the server sees the close
            await asyncio.sleep(0.01)
    closed = clock.now
    clock.now = closed + objects.limits.lease - 0.001
    objects._expire()
    assert token in objects.sessions and objects.tables.objects == 1  # within its lease
    clock.now = closed + objects.limits.lease
    objects._expire()
    assert token not in objects.sessions and objects.tables.objects == 0  # freed whole
    async with _AsyncClient(url(server), timeout=timeout(10)) as again:
        await refused(ErrorCode.SESSION_EXPIRED, again.call("objects.attach", token))


async def test_describe_gives_the_interfaces_served_and_leaves_out_the_others(
    server: ObjectServer,
) -> None:
    async with _AsyncClient(url(server), timeout=timeout(10)) as c:
        names = ["Counter", "Leaf", "Nope"]
        assert await c.call("objects.describe", names) == {"Counter": COUNTER}
        await c.call("objects.attach")
        leaf = await call(c, NameTarget("counter"), "leaf")
        assert type(leaf) is Ref and leaf.iface == "Leaf"
        leaf_description = {"methods": [], "properties": ["size"], "oneway": [], "refs": {}}
        assert await c.call("objects.describe", names) == {
            "Counter": COUNTER,
            "Leaf": leaf_description,
        }
        await refused(ErrorCode.BAD_ARGUMENTS, c.call("objects.describe", "Counter"))
    async with AsyncClient(url(server, "udp"), timeout=timeout(10)) as u:  # no session needed
        assert await u.call("objects.describe", ["Leaf"]) == {"Leaf": leaf_description}


async def test_a_property_read_is_a_call_without_arguments(server: ObjectServer) -> None:
    async with _AsyncClient(url(server), timeout=timeout(10)) as c:
        await c.call("objects.attach")
        target = NameTarget("counter")
        assert await call(c, target, "incr", [3]) == 3
        assert await call(c, target, "value") == 3
        await refused(ErrorCode.BAD_ARGUMENTS, call(c, target, "value", [1]))
        for name in (".value", "_secret", "nothing"):
            await refused(ErrorCode.UNKNOWN_METHOD, call(c, target, name))
