"""``Server.on_shutdown``: awaited first when the stop begins, before the drain (an announcer
withdraws there, so clients stop sending calls the server would refuse)."""

from __future__ import annotations

from sockstack import Server, Service, method


class Calc(Service):
    @method
    def add(self, a: int, b: int) -> int:
        return a + b


async def test_hooks_run_once_first_and_a_failing_one_does_not_stop_the_shutdown() -> None:
    srv = Server(Calc(), tcp=["127.0.0.1:0"])
    await srv.start()
    seen: list[tuple[str, bool, bool]] = []

    async def failing() -> None:
        seen.append(("failing", srv.draining, bool(srv.endpoints)))
        raise RuntimeError("no name service")

    async def withdraw() -> None:
        seen.append(("withdraw", srv.draining, bool(srv.endpoints)))

    srv.on_shutdown += [failing, withdraw]
    await srv.shutdown()
    await srv.shutdown()  # (a second stop runs nothing again)
    assert seen == [("failing", True, True), ("withdraw", True, True)]
