"""One blocking client shared by many threads (issue 12, item 9): their calls are pipelined on
its one connection (or UDP socket), each answer reaches the thread that asked, and trouble in
one thread (its timeout, an interrupt) stays there, while trouble with the connection (a reset,
``close()``) fails every call in flight at once.

The server runs on its own event loop in a background thread, so the test's main thread is a
client thread like the others (it can be interrupted by a signal). Calls that must be in flight
together use ``hold(key)``, which returns once the test releases the key; the test waits for
the server to have them all (a condition variable), never for a time. Every thread is joined
with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme

from sockstack import (
    CallTimeout,
    ConnectError,
    ConnectionLost,
    Service,
    connect,
    method,
)
from sockstack.pubsub import Broker, BrokerLimits
from sockstack.transport.tls import server_context
from tests.conftest import timeout
from tests.helpers.faultproxy import Faults, TCPFaultProxy, UDPFaultProxy
from tests.helpers.threaded import Served as ThreadServed
from tests.helpers.threaded import serving_in_thread
from tests.integration.test_fork import forked

SCHEMES = ["tcp", "tls", "udp"]


class Work(Service):
    """``hold(key)`` answers once ``release(key)`` is called (or after ``limit`` s, so that a
    broken client fails its test instead of hanging it); the test waits for arrivals."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.arrived: dict[str, int] = {}
        self.runs: dict[str, int] = {}
        self.gates: dict[str, asyncio.Event] = {}

    @method(inline=True)
    def echo(self, value: Any = None) -> Any:
        return value

    @method
    async def sleep(self, seconds: float, tag: Any = None) -> Any:
        await asyncio.sleep(seconds)
        return tag

    @method
    async def hold(self, key: str, limit: float = 20.0) -> str:
        gate = self.gates.setdefault(key, asyncio.Event())
        with self.cond:
            self.arrived[key] = self.arrived.get(key, 0) + 1
            self.cond.notify_all()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gate.wait(), limit)
        return key

    @method(inline=True)
    def release(self, key: str) -> bool:
        self.gates.setdefault(key, asyncio.Event()).set()
        return True

    @method(inline=True)
    def count(self, key: str) -> int:
        """How many times this key's call ran (a retried UDP call must run once)."""
        self.runs[key] = self.runs.get(key, 0) + 1
        return self.runs[key]

    def wait_arrivals(self, key: str, n: int, seconds: float = 10.0) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.arrived.get(key, 0) >= n, timeout(seconds))
        assert ok, f"{self.arrived.get(key, 0)} of {n} calls of {key!r} reached the server"


Served = ThreadServed[Work]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("threads") / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


@contextlib.contextmanager
def serving(
    cert: Path, broker: Broker | None = None, secret: str | None = None
) -> Iterator[Served]:
    service = Work()

    def release_all() -> None:  # let held calls end before the drain
        for key in list(service.gates):
            s.loop.call_soon_threadsafe(service.gates[key].set)

    with serving_in_thread(service, cert, on_stop=release_all, broker=broker, secret=secret) as s:
        yield s


@pytest.fixture
def served(cert: Path) -> Iterator[Served]:
    with serving(cert) as s:
        yield s


def options(scheme: str, ca: trustme.CA, **more: Any) -> dict[str, Any]:
    if scheme == "tls":
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        more["tls"] = ctx
    return more


class Outcome:
    """What a thread's function returned or raised."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def result(self) -> Any:
        assert self.finished.is_set(), "the thread did not finish"
        if self.error is not None:
            raise self.error
        return self.value


def start(fn: Callable[[], Any], name: str = "caller") -> tuple[threading.Thread, Outcome]:
    out = Outcome()

    def body() -> None:
        try:
            out.value = fn()
        except BaseException as exc:  # reported to the test through the outcome
            out.error = exc
        finally:
            out.finished.set()

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread, out


def join_all(threads: list[tuple[threading.Thread, Outcome]], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + timeout(seconds)
    for thread, _ in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        assert not thread.is_alive(), f"{thread.name} still waits after {seconds} s"


def key() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------ pipelining


@pytest.mark.parametrize("scheme", SCHEMES)
def test_eight_threads_have_their_calls_in_flight_together_on_one_connection(
    served: Served, ca: trustme.CA, scheme: str
) -> None:
    """A client making one call at a time could never have two calls in the server at once;
    here all eight are, then the main thread's own call (release) goes through beside them."""
    k = key()
    with connect(served.url(scheme), timeout=timeout(20), **options(scheme, ca)) as c:
        sock = c.connection.sock
        threads = [start(lambda: c.call("hold", k), f"holder-{i}") for i in range(8)]
        served.service.wait_arrivals(k, 8)
        assert c.call("release", k) is True  # answered while eight calls wait on the socket
        join_all(threads)
        assert [out.result() for _, out in threads] == [k] * 8
        assert c.connection.sock is sock  # the same connection (or UDP socket) throughout


@pytest.mark.parametrize("scheme", SCHEMES)
def test_eight_sleeps_take_about_as_long_as_one(
    served: Served, ca: trustme.CA, scheme: str
) -> None:
    """8 threads x sleep(0.2) through one client: about 0.2 s, not 1.6 s. The bound is a
    generous ratio to one such call (one at a time would be 8x)."""
    with connect(served.url(scheme), timeout=timeout(20), **options(scheme, ca)) as c:
        assert c.call("echo", "warm") == "warm"
        began = time.monotonic()
        assert c.call("sleep", 0.2, "one") == "one"
        one = time.monotonic() - began
        gate = threading.Barrier(9)

        def sleeper(i: int) -> Any:
            gate.wait(timeout(10))
            return c.call("sleep", 0.2, i)

        threads = [start(partial(sleeper, i), f"sleeper-{i}") for i in range(8)]
        gate.wait(timeout(10))
        began = time.monotonic()
        join_all(threads)
        eight = time.monotonic() - began
        assert [out.result() for _, out in threads] == list(range(8))
        assert eight < 3 * one, f"8 concurrent calls took {eight:.3f} s, one took {one:.3f} s"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_many_threads_each_get_their_own_answers(
    served: Served, ca: trustme.CA, scheme: str
) -> None:
    """16 threads x 100 calls of every kind (positional, keyword, a PING) interleaved on one
    client: every answer is the asking thread's (matched by request id)."""
    with connect(served.url(scheme), timeout=timeout(20), **options(scheme, ca)) as c:

        def worker(t: int) -> list[Any]:
            got = []
            for i in range(100):
                if i % 10 == 3:
                    got.append(c.call("echo", value=f"{t}-{i}"))  # the general (kwargs) path
                elif i % 10 == 7:
                    assert c.ping() >= 0
                    got.append(f"{t}-{i}")
                else:
                    got.append(c.call("echo", f"{t}-{i}"))
            return got

        threads = [start(partial(worker, t), f"worker-{t}") for t in range(16)]
        join_all(threads, 60)
        for t, (_, out) in enumerate(threads):
            assert out.result() == [f"{t}-{i}" for i in range(100)]


def test_udp_calls_of_many_threads_are_retransmitted_each_and_run_once(
    served: Served, ca: trustme.CA
) -> None:
    """Through a proxy dropping 30 % of datagrams both ways, 8 threads' calls are each
    retransmitted until answered, and each runs once (the server's reply cache)."""
    host, port = served.server.endpoint("udp").host, served.server.endpoint("udp").port
    proxy = served.run(UDPFaultProxy((host, port), Faults(drop=0.3), seed=12).start())
    try:
        with connect(f"udp://127.0.0.1:{proxy.port}", timeout=timeout(30)) as c:

            def worker(t: int) -> list[int]:
                return [c.call("count", f"lossy-{t}-{i}") for i in range(10)]

            threads = [start(partial(worker, t), f"lossy-{t}") for t in range(8)]
            join_all(threads, 60)
            for _, out in threads:
                assert out.result() == [1] * 10  # each call ran exactly once
        assert proxy.counts.dropped > 0  # datagrams were lost, so retransmissions happened
    finally:
        served.run(proxy.close())


def test_udp_with_a_secret_threads_calls_are_sealed_and_each_answered(cert: Path) -> None:
    """With a secret, UDP calls of several threads are made one at a time (a call's
    retransmissions keep the epoch its first datagram was sealed for): all are answered."""
    secret = "s" * 32
    with serving(cert, secret=secret) as s:
        with connect(s.url("udp"), secret=secret, timeout=timeout(20)) as c:

            def worker(t: int) -> list[Any]:
                return [c.call("echo", f"{t}-{i}") for i in range(30)]

            threads = [start(partial(worker, t), f"sealed-{t}") for t in range(4)]
            join_all(threads, 60)
            for t, (_, out) in enumerate(threads):
                assert out.result() == [f"{t}-{i}" for i in range(30)]


def test_udp_refusal_fails_every_threads_call_at_once() -> None:
    """Nothing listens on the port: the ICMP refusals fail each thread's call with ConnectError
    (the call did not run), long before its 60 s timeout. Each refusal is charged to the call
    whose datagram the kernel names, so no call is failed by another's refusal: every one is
    "did not run" (ConnectionLost, once accepted here, would now be a wrong claim)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # a port nothing listens on (now)
    with connect(f"udp://127.0.0.1:{port}", timeout=timeout(60)) as c:
        threads = [start(partial(c.call, "echo", i), f"refused-{i}") for i in range(4)]
        join_all(threads, 20)
        for _, out in threads:
            with pytest.raises(ConnectError, match="did not run"):
                out.result()


# ------------------------------------------------------------------------ failures


def test_a_reset_fails_every_call_in_flight_at_once_and_one_reconnect_serves_all(
    served: Served,
) -> None:
    """The connection is reset under six waiting calls (timeouts of 60 s): each fails with
    ConnectionLost at once. Then four threads call together: one reconnect serves them all."""
    ep = served.server.endpoint("tcp")
    proxy = served.run(TCPFaultProxy((ep.host, ep.port)).start())
    k = key()
    try:
        with connect(f"tcp://127.0.0.1:{proxy.port}", timeout=timeout(60)) as c:
            threads = [start(lambda: c.call("hold", k), f"held-{i}") for i in range(6)]
            served.service.wait_arrivals(k, 6)
            served.run(proxy.reset_and_wait())
            join_all(threads, 10)  # far below the calls' 60 s timeout
            for _, out in threads:
                with pytest.raises(ConnectionLost):
                    out.result()
            gate = threading.Barrier(4)

            def again(i: int) -> Any:
                gate.wait(timeout(10))
                return c.call("echo", i)

            threads = [start(partial(again, i), f"again-{i}") for i in range(4)]
            join_all(threads)
            assert [out.result() for _, out in threads] == [0, 1, 2, 3]
            assert proxy.connections == 2  # the first connection, and one reconnect for all four
    finally:
        served.run(proxy.close())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("leader_first", [True, False], ids=["short-call-reads", "long-reads"])
def test_a_call_timing_out_leaves_the_others_waiting_and_answered(
    served: Served, ca: trustme.CA, leader_first: bool, scheme: str
) -> None:
    """A call with a short timeout fails with CallTimeout at its own deadline, whether it was
    the thread reading the socket for the others or not; the call with a long timeout waits on
    and gets its answer (the reading passes to it). Over TLS too (a blocking TLS read ignores
    SO_RCVTIMEO: the client waits for data with poll() before reading)."""
    short, long_ = key(), key()
    with connect(served.url(scheme), timeout=timeout(20), **options(scheme, ca)) as c:
        first_key, first_timeout = (short, 0.3) if leader_first else (long_, timeout(20))
        second_key, second_timeout = (long_, timeout(20)) if leader_first else (short, 0.3)
        first = start(lambda: c.call("hold", first_key, timeout=first_timeout), "first")
        served.service.wait_arrivals(first_key, 1)  # it reads: nobody else waits yet
        second = start(lambda: c.call("hold", second_key, timeout=second_timeout), "second")
        served.service.wait_arrivals(second_key, 1)
        short_call = first if leader_first else second
        long_call = second if leader_first else first
        short_call[0].join(timeout(10))
        with pytest.raises(CallTimeout):
            short_call[1].result()
        assert not long_call[1].finished.is_set()  # still waiting for its own answer
        assert c.call("release", long_) is True
        join_all([long_call])
        assert long_call[1].result() == long_
        assert c.call("echo", "after") == "after"


def wait_until_out_of(thread_id: int, function: str) -> None:
    """Wait (bounded) until the thread's stack holds no frame of ``function``."""
    done = threading.Event()
    for _ in range(10_000):
        frame = sys._current_frames().get(thread_id)
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        if function not in names:
            return
        done.wait(0.001)  # re-check the condition; the bound is 10 s in all
    raise AssertionError(f"thread still in {function}")


class Interrupted(BaseException):
    """What the test's SIGINT handler raises (as KeyboardInterrupt would)."""


@pytest.mark.parametrize("main_reads", [True, False], ids=["main-reads", "main-follows"])
def test_an_interrupt_in_one_thread_leaves_the_other_threads_calls_alone(
    served: Served, main_reads: bool
) -> None:
    """SIGINT in the main thread while it waits for its call (reading the socket for all, or
    following) ends that call only: the other threads' calls get their answers, and the
    client goes on working."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals go to the main thread")
    mine, theirs = key(), key()

    def interrupt(*_: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    main = threading.get_ident()
    try:
        with connect(served.url("tcp"), timeout=timeout(20)) as c:
            others: list[tuple[threading.Thread, Outcome]] = []
            if not main_reads:
                others = [start(lambda: c.call("hold", theirs), f"other-{i}") for i in range(3)]
                served.service.wait_arrivals(theirs, 3)

            def kill_when_waiting() -> None:
                served.service.wait_arrivals(mine, 1)
                if main_reads:
                    others.extend(
                        start(lambda: c.call("hold", theirs), f"other-{i}") for i in range(3)
                    )
                    served.service.wait_arrivals(theirs, 3)
                # The server has the request, but the main thread may still be returning from
                # the write that sent it: an interrupt there drops the connection (a frame may
                # be cut short, PROTOCOL.md §5.3), which is not what this test is about.
                wait_until_out_of(main, "_send")
                signal.pthread_kill(main, signal.SIGINT)

            killer = start(kill_when_waiting, "killer")
            with pytest.raises(Interrupted):
                c.call("hold", mine)
            join_all([killer])
            killer[1].result()
            assert all(not out.finished.is_set() for _, out in others)  # still waiting
            assert c.call("release", theirs) is True
            join_all(others)
            assert [out.result() for _, out in others] == [theirs] * 3
            assert c.call("echo", "after") == "after"
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_close_from_one_thread_fails_the_others_calls_at_once(
    served: Served, ca: trustme.CA, scheme: str
) -> None:
    k = key()
    c = connect(served.url(scheme), timeout=timeout(60), **options(scheme, ca))
    threads = [start(lambda: c.call("hold", k), f"held-{i}") for i in range(4)]
    served.service.wait_arrivals(k, 4)
    c.close()
    join_all(threads, 10)  # far below the calls' 60 s timeout
    for _, out in threads:
        with pytest.raises(ConnectionLost, match="closed"):
            out.result()


# ------------------------------------------------------------------------------ fork


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fork_while_other_threads_have_calls_in_flight(
    served: Served, ca: trustme.CA, scheme: str
) -> None:
    """The child of a process whose threads wait on the client (one of them reading, its locks
    held or not) makes calls of its own at once; the parent's threads get their answers after
    the child is done, on the parent's same connection."""
    k = key()
    c = connect(served.url(scheme), timeout=timeout(20), **options(scheme, ca))
    try:
        sock = c.connection.sock
        threads = [start(lambda: c.call("hold", k), f"parent-{i}") for i in range(3)]
        served.service.wait_arrivals(k, 3)

        def child() -> list[Any]:
            got = [c.call("echo", f"child-{i}") for i in range(5)]
            got.append(c.call("sleep", 0.01, "child-sleep"))
            c.close()
            return got

        with forked(child) as kid:
            theirs = kid.result()
        assert theirs == [f"child-{i}" for i in range(5)] + ["child-sleep"]
        assert all(not out.finished.is_set() for _, out in threads)
        assert c.call("release", k) is True
        join_all(threads)
        assert [out.result() for _, out in threads] == [k] * 3
        assert c.connection.sock is sock
    finally:
        c.close()


# --------------------------------------------------------------------------- pub/sub


def test_blocking_subscription_with_other_threads_calling(cert: Path) -> None:
    """One thread reads a QoS 1 subscription while three others make calls on the same client:
    every message reaches the subscription, in order, each acknowledged once (none
    redelivered, none left in flight at the broker), and every call gets its own answer."""
    broker = Broker(BrokerLimits(ack_wait=0.5, max_deliveries=5))
    n = 200
    with serving(cert, broker) as s:
        url = s.url("tcp")
        with connect(url, timeout=timeout(20)) as c, connect(url, timeout=timeout(20)) as pub:
            sub = c.subscribe("feed.>", qos=1)

            def read() -> list[Any]:
                return [sub.get(timeout(20)) for _ in range(n)]

            def caller(t: int) -> list[Any]:
                return [c.call("echo", f"{t}-{i}") for i in range(150)]

            reader = start(read, "subscriber")
            callers = [start(partial(caller, t), f"caller-{t}") for t in range(3)]
            for i in range(n):
                pub.publish(f"feed.{i % 3}", i, qos=1)
            join_all([reader, *callers], 60)
            got = reader[1].result()
            assert [m.value for m in got] == list(range(n))
            assert not any(m.redelivered for m in got)
            for t, (_, out) in enumerate(callers):
                assert out.result() == [f"{t}-{i}" for i in range(150)]
            # A call after the last ACK: the server reads the connection in order, so the
            # ACKs have been handled when its answer comes.
            assert c.call("echo", "sync") == "sync"
            assert broker.stats()["inflight"] == 0
            sub.unsubscribe()


def test_tls_connect_to_a_server_that_never_answers_hello_ends_in_time(
    cert: Path, ca: trustme.CA
) -> None:
    """A TLS peer that completes the handshake and then says nothing: connect() fails with
    ConnectError at its connect timeout (a blocking TLS read ignores SO_RCVTIMEO, so the client
    waits for the WELCOME with poll())."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(timeout(10))
    done = threading.Event()

    def silent_peer() -> None:
        conn, _ = listener.accept()
        with server_context(cert).wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(timeout(10))
            done.wait(timeout(10))  # holds the session open, says nothing

    peer = start(silent_peer, "silent-peer")
    try:
        port = listener.getsockname()[1]
        with pytest.raises(ConnectError, match="no answer to HELLO in time"):
            connect(f"tls://127.0.0.1:{port}", connect_timeout=0.5, **options("tls", ca))
    finally:
        done.set()
        join_all([peer])
        listener.close()
    peer[1].result()


def test_a_message_that_arrives_between_calls_is_kept_for_its_subscription(cert: Path) -> None:
    """A subscription's message read by a call (not by get()) reaches the subscription: a call
    reads what came while the client was idle before it sends (the old client discarded
    messages read then)."""
    with serving(cert, Broker()) as s:
        url = s.url("tcp")
        with connect(url, timeout=timeout(10)) as c, connect(url, timeout=timeout(10)) as pub:
            sub = c.subscribe("idle.>")
            pub.publish("idle.x", "while idle", qos=1)
            sock = c.connection.sock
            assert sock is not None
            ready, _, _ = select.select([sock], [], [], timeout(10))  # the MSG has arrived
            assert ready
            assert c.call("echo", "call") == "call"  # reads the MSG before sending
            assert sub.get(timeout(5)).value == "while idle"
