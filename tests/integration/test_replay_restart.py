"""Issue 10, item 3: a captured sealed datagram never runs again, after a restart or on another
``--workers`` process, and both clients keep working across a restart without running a call
twice (docs/PROTOCOL.md §6.1: datagrams are sealed for the server process's epoch).

The datagrams replayed are captured the way an attacker on the path gets them: a relay between a
real client and the server keeps a copy of everything the client sends. Each replay waits for
the server's answer (a refusal, or a result if it ran), so nothing here waits on a clock.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from sockstack import (
    AsyncClient,
    Client,
    ConnectionLost,
    Server,
    Service,
    connect,
    method,
)
from sockstack.protocol.auth import unsealed_refusal
from sockstack.protocol.frames import MessageType, peek_type
from tests.cli.conftest import Proc
from tests.conftest import Probe, timeout

SECRET = b"correct horse battery staple"
REQUEST = int(MessageType.REQUEST)


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # no server on the port for a moment
        pass


class Tap:
    """A UDP relay between one client and a server, as an attacker on the path sees the
    traffic: it keeps a copy of every datagram the client sends (``sent``), and while
    ``drop_answers`` is set it drops the server's answers (``dropped`` is set when it has)."""

    def __init__(self, port: int, duplicate: bool = False) -> None:
        self.upstream = ("127.0.0.1", port)
        self.sent: list[bytes] = []
        self.duplicate = duplicate  # send every datagram of the client twice, as a network may
        self.drop_answers = False
        self.dropped = asyncio.Event()
        self.refusal = asyncio.Event()  # set when an ERROR UNAUTHENTICATED went to the client
        self._client: Any = None
        self._front: _Side | None = None
        self._back: _Side | None = None
        self.url = ""

    async def start(self) -> Tap:
        loop = asyncio.get_running_loop()
        _, self._front = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_client), local_addr=("127.0.0.1", 0)
        )
        _, self._back = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_server), remote_addr=self.upstream
        )
        assert self._front.transport is not None
        self.url = f"udp://127.0.0.1:{self._front.transport.get_extra_info('sockname')[1]}"
        return self

    def _from_client(self, data: bytes, addr: Any) -> None:
        self._client = addr
        self.sent.append(data)
        assert self._back is not None and self._back.transport is not None
        for _ in range(2 if self.duplicate else 1):
            self._back.transport.sendto(data)

    def _from_server(self, data: bytes, _addr: Any) -> None:
        if self.drop_answers:
            self.dropped.set()
            return
        assert self._front is not None and self._front.transport is not None
        if self._client is not None:
            self._front.transport.sendto(data, self._client)
            if unsealed_refusal(data):
                self.refusal.set()

    def requests(self) -> list[bytes]:
        """The sealed REQUEST datagrams the client sent, in order."""
        return [d for d in self.sent if peek_type(d) == REQUEST]

    def close(self) -> None:
        for side in (self._front, self._back):
            if side is not None and side.transport is not None:
                side.transport.close()


def replay(port: int, datagram: bytes, times: int) -> list[bytes | None]:
    """Send ``datagram`` ``times`` times, each from its own socket (its own source port, all
    open at once so the ports differ), and wait for each answer (None: no answer)."""
    socks = []
    answers: list[bytes | None] = []
    try:
        for _ in range(times):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            s.connect(("127.0.0.1", port))
            s.settimeout(timeout(2))
            s.send(datagram)
            try:
                answers.append(s.recv(65536))
            except TimeoutError:
                answers.append(None)
        assert len({s.getsockname()[1] for s in socks}) == times
    finally:
        for s in socks:
            s.close()
    return answers


def refused(answer: bytes | None) -> bool:
    """An ERROR UNAUTHENTICATED (sealed, carrying an epoch, or the unsealed 18 bytes)."""
    return answer is not None and unsealed_refusal(answer)


async def restart(old: Server, probe: Probe, port: int) -> Server:
    """Stop ``old`` and start a new server on the same port, with the same secret."""
    await old.shutdown()
    await asyncio.gather(*(d.closed for d in old._datagrams))  # its socket is closed: port free
    new = Server(probe, udp=[f"127.0.0.1:{port}"], secret=SECRET)
    await new.start()
    return new


# ---------------------------------------------------------------------------- (a) a restart


async def test_a_captured_datagram_does_not_run_again_after_a_restart(probe: Probe) -> None:
    """A client's call runs once; the server restarts on the same port with the same secret;
    every datagram the client sent is replayed: none runs (each is sealed for an epoch the new
    server does not have)."""
    server = Server(probe, udp=["127.0.0.1:0"], secret=SECRET)
    await server.start()
    port = server.endpoint("udp").port
    tap = await Tap(port).start()
    try:
        async with AsyncClient(tap.url, secret=SECRET, timeout=timeout(5)) as c:
            assert await c.call("count", "captured") == 1
        captured = tap.requests()  # the one that ran, and any the server refused
        assert captured
        server = await restart(server, probe, port)
        answers = [a for d in captured for a in await asyncio.to_thread(replay, port, d, 1)]
    finally:
        tap.close()
        await server.shutdown()
    assert probe.runs == {"captured": 1}  # it ran once, before the restart; never after
    assert all(refused(a) for a in answers), answers
    assert server._datagrams[0].epoch_refusals == len(captured)


# ---------------------------------------------------------------------------- (b) workers

COUNTER = """
import os
from sockstack import Service, method

class Counter(Service):
    @method
    def hit(self, tag: str) -> int:
        with open(os.environ["REPLAY_LOG"], "a") as f:  # every run, whichever worker
            f.write(f"{os.getpid()} {tag}\\n")
        return os.getpid()
"""


async def test_b_a_datagram_replayed_to_every_worker_runs_once(tmp_path: Path) -> None:
    """``serve --workers 2``: the kernel spreads datagrams over the workers by source address,
    so replays from 40 source ports reach both; the captured datagram runs once in all."""
    (tmp_path / "replay_counter.py").write_text(COUNTER)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.decode())
    log = tmp_path / "runs.log"
    server = Proc(
        [
            "sockstack",
            "serve",
            "replay_counter:Counter",
            "--udp",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--secret-file",
            str(secret_file),
        ],
        cwd=tmp_path,
        env={"REPLAY_LOG": str(log)},
    )
    try:
        ready = await asyncio.to_thread(server.wait_line, r"serving Counter on udp://\S+:(\d+)", 20)
        port = int(ready.group(1))
        tap = await Tap(port).start()
        try:
            async with AsyncClient(tap.url, secret=SECRET, timeout=timeout(5)) as c:
                await c.call("hit", "captured")
        finally:
            tap.close()
        captured = tap.requests()[-1]  # the datagram that ran
        answers = await asyncio.to_thread(replay, port, captured, 40)
    finally:
        assert server.stop() == 0
    runs = [line for line in log.read_text().splitlines() if line.endswith(" captured")]
    assert len(runs) == 1, runs  # not once per worker
    assert all(refused(a) for a in answers), answers
    # Both workers answered, each with a sealed refusal naming its own epoch: the one that ran
    # it refuses a replay, the other one a datagram sealed for another epoch.
    from sockstack.protocol.auth import NO_EPOCH, DatagramAuth, trailer_of

    auth = DatagramAuth(SECRET, epoch=NO_EPOCH)
    named = set()
    for a in answers:
        assert a is not None
        auth.open(a, time.time(), track=False)
        named.add(trailer_of(a)[0])
    assert len(named) == 2 and trailer_of(captured)[0] in named, "a worker got no replay"


# ---------------------------------------------------------------------------- (c) clients


async def test_c_both_clients_keep_working_across_a_restart(probe: Probe) -> None:
    """The next call after a restart succeeds and runs once: refused once (sealed for the old
    epoch), sent again for the new one; later calls need no retry."""
    server = Server(probe, udp=["127.0.0.1:0"], secret=SECRET)
    await server.start()
    port = server.endpoint("udp").port
    url = f"udp://127.0.0.1:{port}"
    blocking = await asyncio.to_thread(connect, url, secret=SECRET, timeout=timeout(5))
    try:
        async with AsyncClient(url, secret=SECRET, timeout=timeout(5)) as c:
            assert await c.call("count", "async-before") == 1
            assert await asyncio.to_thread(blocking.call, "count", "blocking-before") == 1
            for _ in range(2):
                server = await restart(server, probe, port)
                assert await c.call("count", "async-after") == 1
                assert await asyncio.to_thread(blocking.call, "count", "blocking-after") == 1
                assert server._datagrams[0].epoch_refusals == 2  # one refusal per client
                assert await c.call("add", 1, 2) == 3
                assert await asyncio.to_thread(blocking.call, "add", 2, 2) == 4
                assert server._datagrams[0].epoch_refusals == 2
                assert server._datagrams[0].bad_datagrams == 0  # nothing logged as an attack
                probe.runs.pop("async-after")
                probe.runs.pop("blocking-after")
    finally:
        blocking.close()
        await server.shutdown()
    assert probe.runs == {"async-before": 1, "blocking-before": 1}


@pytest.mark.parametrize("flavour", ["asyncio", "blocking"])
async def test_c_a_call_in_flight_across_a_restart_never_runs_twice(
    probe: Probe, flavour: str
) -> None:
    """The call ran, its answer was lost, the server restarted: the retransmission reaches a
    server that cannot know it ran. It must not run again: the call fails as "may or may not
    have run" (as a TCP call does when its server dies), and the next call works."""
    server = Server(probe, udp=["127.0.0.1:0"], secret=SECRET)
    await server.start()
    port = server.endpoint("udp").port
    tap = await Tap(port).start()
    ac: AsyncClient | None = None
    bc: Client | None = None
    try:
        if flavour == "asyncio":
            ac = await AsyncClient(tap.url, secret=SECRET, timeout=timeout(5)).connect()
            client_call: Any = ac.call
        else:
            bc = await asyncio.to_thread(connect, tap.url, secret=SECRET, timeout=timeout(5))
            client_call = bc.call

        async def call(*args: Any) -> Any:
            if ac is not None:
                return await client_call(*args)
            return await asyncio.to_thread(client_call, *args)

        assert await call("count", "warm") == 1  # the client knows the epoch
        tap.drop_answers = True
        in_flight = asyncio.ensure_future(call("count", "in-flight"))
        async with asyncio.timeout(timeout(5)):
            await tap.dropped.wait()  # it ran: its answer is lost
        server = await restart(server, probe, port)
        tap.drop_answers = False
        async with asyncio.timeout(timeout(10)):
            (outcome,) = await asyncio.gather(in_flight, return_exceptions=True)
        assert probe.runs["in-flight"] == 1, outcome  # not run again by the new server
        assert isinstance(outcome, ConnectionLost), outcome
        assert "may or may not have run" in str(outcome)
        assert await call("count", "next") == 1
    finally:
        if ac is not None:
            await ac.close()
        if bc is not None:
            bc.close()
        tap.close()
        await server.shutdown()
    assert probe.runs == {"warm": 1, "in-flight": 1, "next": 1}


@pytest.mark.parametrize("flavour", ["asyncio", "blocking"])
async def test_a_duplicated_datagram_does_not_fail_its_call(probe: Probe, flavour: str) -> None:
    """The network delivers a sealed request twice: the copy is refused as a replay, and that
    refusal reaches the client before the call's answer. It must not end the call (the call
    runs, once); it names the epoch the call is sealed for, so the client knows it was the
    copy's."""
    server = Server(probe, udp=["127.0.0.1:0"], secret=SECRET)
    await server.start()
    tap = await Tap(server.endpoint("udp").port, duplicate=True).start()
    ac: AsyncClient | None = None
    bc: Client | None = None
    try:
        if flavour == "asyncio":
            ac = await AsyncClient(tap.url, secret=SECRET, timeout=timeout(5)).connect()
        else:
            bc = await asyncio.to_thread(connect, tap.url, secret=SECRET, timeout=timeout(5))

        async def call(*args: Any) -> Any:
            if ac is not None:
                return await ac.call(*args)
            assert bc is not None
            return await asyncio.to_thread(bc.call, *args)

        assert await call("count", "warm") == 1
        probe.gate, probe.entered = asyncio.Event(), asyncio.Event()
        tap.refusal.clear()
        pending = asyncio.ensure_future(call("wait", "duplicated"))
        async with asyncio.timeout(timeout(5)):
            await probe.entered.wait()  # the request runs, held at the gate
            await tap.refusal.wait()  # its copy was refused: the refusal is ahead of the answer
        probe.gate.set()
        async with asyncio.timeout(timeout(5)):
            (outcome,) = await asyncio.gather(pending, return_exceptions=True)
        assert outcome == 1, outcome
    finally:
        if ac is not None:
            await ac.close()
        if bc is not None:
            bc.close()
        tap.close()
        await server.shutdown()
    assert probe.runs == {"warm": 1, "duplicated": 1}


async def test_datagrams_without_answer_reach_the_server_from_new_clients() -> None:
    """A QoS 0 publish over UDP gets no answer to learn the epoch from: a new client (either
    flavour) learns it with a PING first, so its first publish is delivered."""
    server = Server(broker=True, tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], secret=SECRET)
    await server.start()
    try:
        tcp, udp = str(server.endpoint("tcp")), str(server.endpoint("udp"))
        async with AsyncClient(tcp, secret=SECRET, timeout=timeout(5)) as sub_client:
            sub = await sub_client.subscribe("t.>")
            async with AsyncClient(udp, secret=SECRET, timeout=timeout(5)) as pub:
                await pub.publish("t.async", 1)
                msg = await sub.get(timeout=timeout(5))
                assert (msg.topic, msg.value) == ("t.async", 1)
            blocking = await asyncio.to_thread(connect, udp, secret=SECRET, timeout=timeout(5))
            try:
                await asyncio.to_thread(blocking.publish, "t.blocking", 2)
            finally:
                blocking.close()
            msg = await sub.get(timeout=timeout(5))
            assert (msg.topic, msg.value) == ("t.blocking", 2)
    finally:
        await server.shutdown()


class Tiny(Service):
    def __init__(self) -> None:
        self.runs = 0

    @method(inline=True)
    def e(self, value: bytes = b"") -> bytes:
        self.runs += 1
        return value


@pytest.mark.parametrize("flavour", ["asyncio", "blocking"])
async def test_requests_shorter_than_the_refusal_learn_the_epoch_first(flavour: str) -> None:
    """A raw call of "e" with an empty argument was 49 bytes sealed, shorter than the refusal
    that tells the epoch (50), which the server may then not send: a new client learned the
    epoch with a PING first, and after a restart such a call was refused without the epoch.
    Both clients now send their deadline (4 bytes of meta: 53 bytes sealed), so after a restart
    the refusal names the new epoch and the call, which cannot have run, is sent again."""
    tiny = Tiny()
    server = Server(tiny, udp=["127.0.0.1:0"], secret=SECRET)
    await server.start()
    port = server.endpoint("udp").port
    url = f"udp://127.0.0.1:{port}"
    ac: AsyncClient | None = None
    bc: Client | None = None
    try:
        if flavour == "asyncio":
            ac = await AsyncClient(url, secret=SECRET, codec="raw", timeout=timeout(5)).connect()
        else:
            bc = await asyncio.to_thread(
                connect, url, secret=SECRET, codec="raw", timeout=timeout(5)
            )

        async def call() -> Any:
            if ac is not None:
                return await ac.call("e", b"")
            assert bc is not None
            return await asyncio.to_thread(bc.call, "e", b"")

        assert await call() == b""
        assert tiny.runs == 1
        await server.shutdown()
        await asyncio.gather(*(d.closed for d in server._datagrams))
        server = Server(tiny, udp=[f"127.0.0.1:{port}"], secret=SECRET)
        await server.start()
        # Both clients send their deadline (PROTOCOL.md §4: 4 bytes of meta), so the datagram
        # (53 bytes sealed) is longer than the refusal naming the new epoch: that refusal
        # comes, and the call, which cannot have run, is sent again for the epoch (before the
        # blocking client sent deadlines, it got UNAUTHENTICATED here and the next call ran).
        assert await call() == b""
        assert tiny.runs == 2
    finally:
        if ac is not None:
            await ac.close()
        if bc is not None:
            bc.close()
        await server.shutdown()
