"""An object server on its own event loop in a background thread, for tests whose own thread
uses the blocking client (or its own loop)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sockstack.host.server import ServerLimits
from sockstack.objects import ObjectServer
from tests.conftest import timeout


def quick_limits() -> ServerLimits:
    return ServerLimits(drain_timeout=timeout(2), close_timeout=timeout(2))


class Running:
    """A running server: its URL, and code run on its loop (its state is the loop's)."""

    def __init__(self, server: ObjectServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.server.endpoint('tcp').port}"

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout(20))

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self.run(call())

    def exports(self) -> int:
        return int(self.on_loop(lambda: self.server.objects.tables.objects))

    def sessions(self) -> int:
        return int(self.on_loop(lambda: len(self.server.objects.sessions)))

    def eventually(self, cond: Callable[[], bool], seconds: float = 10.0) -> None:
        """Wait on the server's loop until ``cond()`` holds there (bounded)."""

        async def wait() -> None:
            async with asyncio.timeout(timeout(seconds)):
                while not cond():
                    await asyncio.sleep(0.01)

        self.run(wait())


@contextlib.contextmanager
def running(make: Callable[[], ObjectServer]) -> Iterator[Running]:
    """The server ``make()`` builds (in the server's thread), started; shut down after."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        srv = make()
        try:
            loop.run_until_complete(srv.start())
            box["server"] = srv
        finally:
            started.set()
        loop.run_forever()
        loop.run_until_complete(srv.shutdown())
        loop.close()

    thread = threading.Thread(target=run, name="objects-server", daemon=True)
    thread.start()
    assert started.wait(timeout(10)) and "server" in box, "the server did not start"
    try:
        yield Running(box["server"], loop)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout(20))
        assert not thread.is_alive(), "the server thread did not stop"
