"""The name service (issue 13, item 6), live over loopback: register, look up, list; names
belong to their registrant's session and go with it (close at once; a killed server within
the lease)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from sockstack import RemoteError
from sockstack.errors import ErrorCode
from sockstack.objects import ObjectClient, ObjectServer, expose, lookup
from tests.conftest import timeout
from tests.objects.support import Running, quick_limits, running


@expose
class Greeter:
    def hello(self, who: str) -> str:
        return f"hello {who}"


@pytest.fixture
def registry() -> Iterator[Running]:
    with running(
        lambda: ObjectServer(tcp=["127.0.0.1:0"], host_names=True, lease=1.0, limits=quick_limits())
    ) as r:
        yield r


def test_a_server_registers_its_names_and_clients_find_them(registry: Running) -> None:
    def make() -> ObjectServer:
        srv = ObjectServer(tcp=["127.0.0.1:0"], names=registry.url, limits=quick_limits())
        srv.register("greeter", Greeter())
        return srv

    with running(make) as served:
        with lookup("greeter", registry=registry.url, timeout=timeout(10)) as greeter:
            assert greeter.hello("you") == "hello you"
        with ObjectClient(registry.url, timeout=timeout(10)) as oc:
            names = oc.lookup("names")
            listed = names.list()
            assert listed["greeter"]["url"] == f"{served.url}/greeter"
            with pytest.raises(RemoteError) as err:
                names.lookup("nobody")
            assert err.value.code == ErrorCode.APPLICATION_ERROR
            with pytest.raises(RemoteError):  # another's name: not without replace=True
                names.register("greeter", "tcp://127.0.0.1:1/x")
    # the server shut down: its session ended, its names with it
    registry.eventually(
        lambda: registry.server.names is not None and not registry.server.names.list()
    )


_KILLED_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from sockstack.objects import ObjectServer, expose

    @expose
    class Greeter:
        def hello(self, who: str) -> str:
            return "hello " + who

    async def main() -> None:
        srv = ObjectServer(tcp=["127.0.0.1:0"], names=sys.argv[1])
        srv.register("killed", Greeter())
        await srv.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_a_killed_servers_names_go_within_the_lease(registry: Running) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SERVER, registry.url],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        names = registry.server.names
        assert names is not None
        registry.eventually(lambda: "killed" in names.list())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout(10))
        registry.eventually(lambda: "killed" not in names.list())  # lease 1 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout(10))
        if proc.stdout is not None:
            proc.stdout.close()
