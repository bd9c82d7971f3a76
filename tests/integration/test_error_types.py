"""Issue 12 item 8: errors by type. A service declares the exceptions meant for its callers
(``errors = (...)``); they travel as APPLICATION_ERROR under their name and come back as the same
class in a process that registered it, never as a class looked up by the remote's choice of
name. Any other exception is UNEXPECTED_ERROR (the server's bug). Both clients, TCP and UDP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sockstack import (
    AsyncClient,
    ErrorCode,
    RemoteError,
    Server,
    Service,
    ServiceError,
    connect,
    method,
    register_error,
)
from sockstack.errors import typed_error
from tests.conftest import timeout


class InsufficientFunds(Exception):
    """Declared by the service below: registered when the service is served."""


class Frozen(ServiceError):
    """A ServiceError: meant for the client, but not registered by anyone here."""


class Bank(Service):
    errors = (InsufficientFunds,)

    @method
    def withdraw(self, amount: int) -> int:
        if amount > 100:
            raise InsufficientFunds(f"balance 100, asked {amount}")
        return 100 - amount

    @method
    def frozen(self) -> None:
        raise Frozen("account frozen")

    @method
    def bug(self) -> None:
        raise KeyError("oops")


@pytest.fixture
async def bank() -> AsyncIterator[Server]:
    srv = Server(Bank(), tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"])
    await srv.start()
    try:
        yield srv
    finally:
        await srv.shutdown()


def _check(raised: list[BaseException]) -> None:
    declared, frozen, bug = raised
    assert type(declared) is InsufficientFunds and str(declared) == "balance 100, asked 500"
    assert isinstance(declared.remote, RemoteError)  # type: ignore[attr-defined]
    assert declared.remote.code == ErrorCode.APPLICATION_ERROR  # type: ignore[attr-defined]
    # Not registered in this process: a RemoteError, whatever the name says.
    assert type(frozen) is RemoteError and frozen.type == "Frozen"
    assert frozen.code == ErrorCode.APPLICATION_ERROR and frozen.message == "account frozen"
    # Undeclared: the server's bug, with its own code.
    assert type(bug) is RemoteError and bug.code == ErrorCode.UNEXPECTED_ERROR
    assert bug.type == "KeyError"


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_declared_errors_come_back_as_their_class_in_the_asyncio_client(
    bank: Server, scheme: str
) -> None:
    raised: list[BaseException] = []
    async with AsyncClient(str(bank.endpoint(scheme)), timeout=timeout(10)) as c:
        assert await c.call("withdraw", 30) == 70
        for name, args in (("withdraw", (500,)), ("frozen", ()), ("bug", ())):
            try:
                await c.call(name, *args)
            except Exception as exc:
                raised.append(exc)
    _check(raised)


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_declared_errors_come_back_as_their_class_in_the_blocking_client(
    bank: Server, scheme: str
) -> None:
    def scenario() -> list[BaseException]:
        raised: list[BaseException] = []
        with connect(str(bank.endpoint(scheme)), timeout=timeout(10)) as c:
            for name, args in (("withdraw", (500,)), ("frozen", ()), ("bug", ())):
                try:
                    c.call(name, *args)
                except Exception as exc:
                    raised.append(exc)
        return raised

    _check(await asyncio.to_thread(scenario))


async def test_hidden_errors_hide_only_the_unexpected() -> None:
    srv = Server(Bank(), tcp=["127.0.0.1:0"], expose_errors=False)
    await srv.start()
    try:
        async with AsyncClient(str(srv.endpoint("tcp")), timeout=timeout(10)) as c:
            with pytest.raises(InsufficientFunds, match="balance 100"):
                await c.call("withdraw", 500)
            with pytest.raises(RemoteError) as bug:
                await c.call("bug")
    finally:
        await srv.shutdown()
    assert bug.value.code == ErrorCode.UNEXPECTED_ERROR and "oops" not in str(bug.value)


def test_the_registry_takes_only_exception_classes_one_per_name() -> None:
    class InsufficientFundsToo(Exception):
        __sockstack_name__ = "InsufficientFunds"

    register_error(InsufficientFunds)  # again, the same class: fine
    with pytest.raises(ValueError, match="already registered"):
        register_error(InsufficientFundsToo)
    with pytest.raises(TypeError):
        register_error(int)  # type: ignore[type-var]

    class NeedsTwo(Exception):
        def __init__(self, a: str, b: str) -> None:
            super().__init__(a, b)

    register_error(NeedsTwo)
    err = RemoteError("NeedsTwo", "text", ErrorCode.APPLICATION_ERROR)
    assert typed_error(err) is err  # cannot be built from a message: the plain error
    # Only APPLICATION_ERROR is typed: a protocol code named like a class is not.
    other = RemoteError("InsufficientFunds", "x", ErrorCode.UNEXPECTED_ERROR)
    assert typed_error(other) is other
    # A name nobody registered (e.g. a module path) is never imported or looked up.
    odd = RemoteError("os.system", "x", ErrorCode.APPLICATION_ERROR)
    assert typed_error(odd) is odd


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
async def test_an_errors_trailers_are_on_the_remote_error(scheme: str) -> None:
    """PROTOCOL.md §4: an ERROR may carry trailers; both clients put them on RemoteError."""
    from tests.integration.test_deadlines_metadata import Work

    svc = Work()
    srv = Server(svc, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"])
    await srv.start()
    url = str(srv.endpoint(scheme))
    want = {"served-by": "node-1", "cost": b"\x01\x02"}
    try:
        async with AsyncClient(url, timeout=timeout(10)) as c:
            with pytest.raises(RemoteError) as caught:
                await c.call("with_trailers", True)
        assert caught.value.code == ErrorCode.UNEXPECTED_ERROR
        assert dict(caught.value.metadata) == want

        def blocking() -> dict[str, str | bytes]:
            with connect(url, timeout=timeout(10)) as bc:
                try:
                    bc.call("with_trailers", True)
                except RemoteError as exc:
                    return dict(exc.metadata)
            raise AssertionError("no error")

        assert await asyncio.to_thread(blocking) == want
    finally:
        svc.gate.set()
        await srv.shutdown()
