"""Review findings on services found by name (issue 16): each test fails on the code as
merged."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator

import pytest

from sockstack import Server, Service, method
from sockstack.discovery import Announcer
from sockstack.discovery.client import AsyncServiceClient
from tests.conftest import timeout
from tests.objects.support import Running
from tests.scale.test_services import listed, ns, wait_until  # noqa: F401

pytestmark = pytest.mark.timeout(30)


class Who(Service):
    @method(inline=True)
    def who(self) -> str:
        return "late"


@contextlib.contextmanager
def blackhole() -> Iterator[socket.socket]:
    """A loopback listener that never answers: a client's HELLO waits for ever."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s
    finally:
        s.close()


def test_a_cancelled_call_does_not_wedge_a_server_for_ever(ns: Running) -> None:  # noqa: F811
    """A call cancelled (asyncio.wait_for, a task cancelled) while it connects a server must
    not leave that server marked "connecting" for ever: once the server answers, calls reach
    it again (the client tries it again after its backoff)."""
    with blackhole() as hole:
        port = hole.getsockname()[1]
        url = f"tcp://127.0.0.1:{port}"
        with Announcer("calc", url, names=ns.url):
            wait_until(lambda: listed(ns) == {url}, what="the silent server listed")

            async def main() -> None:
                async with AsyncServiceClient(
                    "name://calc", names=ns.url, timeout=timeout(5), connect_timeout=0.5
                ) as client:
                    # (connect() tried it once: down, its backoff not over yet.) A call now
                    # connects it itself; the caller gives up first.
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(client.call("who"), 0.2)
                    hole.close()  # the server comes up on that port
                    server = Server(Who(), tcp=[f"127.0.0.1:{port}"])
                    await server.start()
                    try:
                        got = await client.call("who", timeout=timeout(4))
                        assert got == "late"
                    finally:
                        print(client.servers())
                        await server.shutdown()

            asyncio.run(main())


async def until(cond: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Poll ``cond`` on the loop until it holds (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout(seconds)
    while not cond():
        assert loop.time() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(0.01)  # the poll's period (bounded by the deadline)


class Named(Service):
    def __init__(self, name: str) -> None:
        self.name = name

    @method(inline=True)
    def who(self) -> str:
        return self.name


def test_a_malformed_entry_does_not_break_the_clients(ns: Running) -> None:  # noqa: F811
    """Anyone with a session at the name service may announce any string as a URL. An entry
    a client cannot parse (no port) is one server that cannot be reached: set aside, the
    others used; not an InvalidURL out of connect(), nor a dead refresh thread/task."""
    from sockstack import connect

    async def main() -> None:
        good = Server(Named("good"), tcp=["127.0.0.1:0"])
        await good.start()
        url = str(good.endpoint("tcp"))
        try:
            with Announcer("calc", url, names=ns.url):
                wait_until(lambda: listed(ns) == {url}, what="the good server listed")
                async with AsyncServiceClient(
                    "name://calc", names=ns.url, timeout=timeout(5), refresh=0.05
                ) as aclient:
                    assert await aclient.call("who") == "good"
                    # a malformed entry appears: the client's refresh must survive it
                    with Announcer("calc", "tcp://127.0.0.1", names=ns.url):
                        wait_until(lambda: len(listed(ns)) == 2, what="the bad entry listed")
                        await aclient.refresh_now()  # (read now; its refresh task tries it)
                        await until(
                            lambda: (
                                (aclient._task is not None and aclient._task.done())
                                or all(s["state"] != "new" for s in aclient.servers())
                            ),
                            "the bad entry tried (set aside), or the refresh task dead",
                        )
                        task = aclient._task
                        assert task is not None and not task.done(), task
                        assert await aclient.call("who") == "good"
                        # and a client made now connects all the same
                        blocking = await asyncio.to_thread(
                            connect, "name://calc", names=ns.url, timeout=timeout(5)
                        )
                        try:
                            assert await asyncio.to_thread(blocking.call, "who") == "good"
                        finally:
                            await asyncio.to_thread(blocking.close)
        finally:
            await good.shutdown()

    asyncio.run(main())
