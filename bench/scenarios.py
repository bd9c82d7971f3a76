"""The benchmark scenarios: which systems run, under which CPU placement, measured how.

Every system's server is a separate process pinned with ``os.sched_setaffinity``; the client
loop runs in the bench process, pinned too. A wake-up across cores costs ~40 µs on these 2-core
virtual machines, so sequential scenarios run under both placements and report them apart:

- ``same core``: server and client on CPU 0 (no cross-core wake-ups: the kernel-limit case);
- ``two cores``: server on CPU 0, client on CPU 1.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import itertools
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    Result,
    Server,
    SkipSystem,
    free_port,
    percentiles,
    pin,
    python,
    spawn,
    stats,
    timed_loop,
    wait_port,
)

LENGTH = struct.Struct(">I")
MAX_FRAME = 4 << 20  # room for the 1 MiB payload scenario plus headers
SAME = ("same core", {0}, {0})
SPLIT = ("two cores", {0}, {1})
BOTH = ("two cores, unpinned", {0, 1}, {0, 1})
Placement = tuple[str, set[int], set[int]]
ROOT = Path(__file__).resolve().parents[1]  # the repository: bench/ sits at its root
CDF_POINTS = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)


@dataclass
class Budget:
    count: int
    cap: float
    pipelined: int
    concurrent: int
    idle_connections: int
    rounds: int = 1
    """Rounds per comparison, interleaved (A B C, A B C, ...); each row keeps its median round.
    Interleaving spreads a noisy minute on a shared VM over every system alike."""
    stream: int = 0
    """Items of the streamed-results scenario (one stream)."""

    @classmethod
    def make(cls, quick: bool) -> Budget:
        if quick:
            return cls(
                count=4000,
                cap=0.3,
                pipelined=20_000,
                concurrent=40_000,
                idle_connections=1000,
                stream=100_000,
            )
        return cls(
            count=40_000,
            cap=0.8,
            pipelined=150_000,
            concurrent=600_000,
            idle_connections=5000,
            rounds=3,
            stream=1_000_000,
        )


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SkipSystem(f"python package {module!r} not installed (make bench installs it)")


# ------------------------------------------------------------------------------ servers


_PKI: dict[str, Path] = {}


def bench_pki() -> dict[str, Path]:
    """Throwaway TLS files for the TLS rows: a CA and a certificate for 127.0.0.1 (trustme)."""
    if not _PKI:
        _need("trustme")
        import trustme

        d = Path(tempfile.mkdtemp(prefix="sockstack-bench-tls-"))
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(d / "ca.pem"))
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            str(d / "server.pem")
        )
        _PKI.update(ca=d / "ca.pem", server=d / "server.pem")
    return _PKI


def start_sockstack(cpus: set[int], workers: int = 1, tls: bool = False) -> Server:
    stream = ["--tls", "127.0.0.1:0", "--cert", str(bench_pki()["server"])] if tls else []
    proc, _ = spawn(
        [
            python(),
            "-m",
            "sockstack.cli",
            "--log-level",
            "WARNING",
            "serve",
            *(stream or ["--tcp", "127.0.0.1:0"]),
            "--udp",
            "127.0.0.1:0",
            "--keepalive",
            "0",
            "--workers",
            str(workers),
            f"--max-frame={MAX_FRAME}",
            # All the bench's clients share one address (loopback): lift the per-address limits.
            "--max-connections-per-address=100000",
            "--max-handshakes-per-address=100000",
        ],
        cpus,
        ready=r"udp://127\.0\.0\.1:(\d+)",
    )
    # The TCP line comes first; read it back from the listening sockets' ports.
    srv = Server("sockstack", [proc])
    srv.extra["udp_port"] = _ss_port(proc, socket.SOCK_DGRAM)
    srv.port = _ss_port(proc, socket.SOCK_STREAM)
    return srv


def _ss_port(proc: subprocess.Popen[bytes], kind: int) -> int:
    """The IPv4 port a process (or one of its workers) bound: a listening TCP socket, or a UDP
    socket (psutil)."""
    table = "tcp4" if kind == socket.SOCK_STREAM else "udp4"
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = []
    for p in procs:
        try:
            conns = p.net_connections(kind=table)
        except psutil.Error:
            continue
        for c in conns:
            if table == "udp4" or c.status == psutil.CONN_LISTEN:
                return int(c.laddr.port)
    raise SkipSystem(f"sockstack server has no {table[:3]} socket")


def start_example(script: str, cpus: set[int]) -> Server:
    path = ROOT / "examples" / script
    if not path.exists():
        raise SkipSystem(f"{path} not found (run the bench from a source checkout)")
    proc, m = spawn([python(), str(path), "--port", "0"], cpus, ready=r"listening on \S+:(\d+)")
    assert m is not None
    return Server(script, [proc], int(m.group(1)))


def start_tls_echo(cpus: set[int]) -> Server:
    return start_peer("tls-echo", cpus, cert=str(bench_pki()["server"]))


def _tls_client_context() -> Any:
    import ssl

    return ssl.create_default_context(cafile=str(bench_pki()["ca"]))


def tls_framed_client(port: int, payload: bytes) -> Sync:
    return framed_client(port, payload, tls=True)


def sockstack_tls_client(port: int, payload: bytes) -> Sync:
    from sockstack import connect

    client = connect(
        f"tls://127.0.0.1:{port}", tls=_tls_client_context(), max_frame=MAX_FRAME, timeout=10
    )
    call = client.call
    return (lambda: call("echo", payload)), client.close


def start_peer(name: str, cpus: set[int], module: str | None = None, **kw: str) -> Server:
    if module:
        _need(module)
    extra = [f"--{k}={v}" for k, v in kw.items()]
    proc, m = spawn([python(), "-m", "bench.peers", name, *extra], cpus)
    assert m is not None
    return Server(name, [proc], int(m.group(1)))


_CECHO: Path | None = None


def c_echo_binary() -> Path:
    global _CECHO
    if _CECHO is None:
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise SkipSystem("no C compiler (gcc) on this machine")
        out = Path(tempfile.mkdtemp(prefix="sockstack-bench-")) / "cecho"
        src = Path(__file__).with_name("cecho.c")
        subprocess.run([cc, "-O2", "-o", str(out), str(src)], check=True)
        _CECHO = out
    return _CECHO


def start_c_echo(kind: str, cpus: set[int]) -> Server:
    proc, m = spawn([str(c_echo_binary()), kind, "0"], cpus)
    assert m is not None
    return Server(f"c-echo-{kind}", [proc], int(m.group(1)))


def start_redis(cpus: set[int]) -> Server:
    port = free_port()
    proc, _ = spawn(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
        cpus,
        ready=None,
    )
    wait_port(port)
    return Server("redis", [proc], port)


def start_nats(cpus: set[int]) -> Server:
    _need("nats")
    port = free_port()
    proc, _ = spawn(["nats-server", "-a", "127.0.0.1", "-p", str(port)], cpus, ready=None)
    srv = Server("nats", [proc], port)
    try:
        wait_port(port)
        responder, _ = spawn(
            [
                python(),
                "-m",
                "bench.peers",
                "nats-responder",
                f"--nats=nats://127.0.0.1:{port}",
            ],
            cpus,
        )
    except BaseException:
        srv.stop()
        raise
    srv.procs.append(responder)
    return srv


# ------------------------------------------------------------------------------ clients
# Each returns (call, close): a blocking call doing one round trip with ``payload``.

Sync = tuple[Callable[[], object], Callable[[], None]]


def framed_client(port: int, payload: bytes, tls: bool = False) -> Sync:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        sock = _tls_client_context().wrap_socket(sock, server_hostname="127.0.0.1")
    msg = LENGTH.pack(len(payload)) + payload
    want = len(msg)
    recv_into = sock.recv_into
    buf = bytearray(want)
    view = memoryview(buf)

    def call() -> None:
        sock.sendall(msg)
        got = 0
        while got < want:
            n = recv_into(view[got:])
            if not n:
                raise ConnectionError("server closed")
            got += n

    return call, sock.close


def udp_client(port: int, payload: bytes) -> Sync:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(2.0)

    def call() -> None:
        sock.send(payload)
        sock.recv(65536)

    return call, sock.close


def sockstack_client(url: str, payload: bytes) -> Sync:
    from sockstack import connect

    client = connect(url, timeout=10.0, max_frame=MAX_FRAME)
    call = client.call
    return (lambda: call("echo", payload)), client.close


def zmq_client(port: int, payload: bytes) -> Sync:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.connect(f"tcp://127.0.0.1:{port}")

    def call() -> None:
        sock.send(payload)
        sock.recv()

    def close() -> None:
        sock.close(linger=0)
        ctx.term()

    return call, close


def grpc_client(port: int, payload: bytes) -> Sync:
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_unary("/bench.Echo/Echo")
    return (lambda: stub(payload, timeout=10)), channel.close


def pyro_client(port: int, payload: bytes) -> Sync:
    import Pyro5.api

    proxy = Pyro5.api.Proxy(f"PYRO:echo@127.0.0.1:{port}")
    proxy._pyroBind()
    return (lambda: proxy.echo(payload)), proxy._pyroRelease


def redis_client(port: int, payload: bytes) -> Sync:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    return (lambda: r.echo(payload)), r.close


# ------------------------------------------------------------------------ remote objects
# The peers serve a Counter (bench/peers.py): echo(x), incr(by=1), child() -> the next of
# CHAIN_DEPTH counters linked in advance. A chain is CHAIN_DEPTH - 1 child() calls, each on the
# result of the one before, then incr(): CHAIN_DEPTH dependent calls.


def need_sockstack_objects(*names: str) -> None:
    """Skip (with the reason) while ``sockstack.objects`` cannot be imported, or lacks a name
    the row uses."""
    try:
        mod = importlib.import_module("sockstack.objects")
    except ImportError as exc:
        raise SkipSystem(f"sockstack.objects cannot be imported (issue 13): {exc}") from None
    missing = [n for n in ("ObjectServer", "expose", "lookup", *names) if not hasattr(mod, n)]
    if missing:
        raise SkipSystem(f"sockstack.objects has no {', '.join(missing)}")


def start_sockstack_objects(cpus: set[int], *names: str) -> Server:
    need_sockstack_objects(*names)
    return start_peer("sockstack-objects", cpus)


def _pyro_counter(port: int) -> Any:
    import Pyro5.api

    counter = Pyro5.api.Proxy(f"PYRO:counter@127.0.0.1:{port}")
    counter._pyroBind()
    return counter


def pyro_object_client(port: int, payload: bytes) -> Sync:
    counter = _pyro_counter(port)
    return (lambda: counter.echo(payload)), counter._pyroRelease


def pyro_chain(port: int) -> Sync:
    """The chain call by call with Pyro5 at its best. Each ``child()`` returns a new Proxy, and a
    Pyro5 proxy owns a connection of its own (opened at its first call): a chain of fresh
    proxies would open CHAIN_DEPTH - 1 connections. So the client keeps one connected proxy per
    URI, as a careful Pyro5 user would, and each step costs one round trip, like the others."""
    from bench.peers import CHAIN_DEPTH

    counter = _pyro_counter(port)
    bound: dict[str, Any] = {}

    def chain() -> int:
        c = counter
        for _ in range(CHAIN_DEPTH - 1):
            p = c.child()
            c = bound.setdefault(str(p._pyroUri), p)
        return int(c.incr())

    def close() -> None:
        for p in bound.values():
            p._pyroRelease()
        counter._pyroRelease()

    return chain, close


def _rpyc_counter(port: int) -> tuple[Any, Any]:
    import rpyc  # type: ignore[import-untyped]
    from rpyc.core.stream import SocketStream  # type: ignore[import-untyped]

    # rpyc.connect with TCP_NODELAY (as the server sets it: bench/peers.py), the default config.
    stream = SocketStream.connect("127.0.0.1", port, nodelay=True)
    conn = rpyc.connect_stream(stream)
    return conn, conn.root.counter


def rpyc_object_client(port: int, payload: bytes) -> Sync:
    """RPyC at its best: every attribute of a netref is fetched from the server (a GETATTR round
    trip, then a DEL when the bound method's netref is dropped), so ``counter.echo(x)`` costs
    two round trips. The method is bound once, as a careful user would: one CALL per call."""
    conn, counter = _rpyc_counter(port)
    echo = counter.echo
    return (lambda: echo(payload)), conn.close


def rpyc_chain(port: int) -> Sync:
    """The chain call by call on one RPyC connection, RPyC at its best, one round trip a call.
    Written plainly (``c = c.child()``), each step would cost a GETATTR and a CALL, plus a
    HANDLE_INSPECT for a netref to an object the client held no netref to (RPyC caches netref
    classes for classes, not instances) and DELs for the netrefs dropped. So the client keeps
    each counter's netref and its bound ``child``/``incr`` (RPyC then hands back the netref it
    holds, and sends nothing else)."""
    from bench.peers import CHAIN_DEPTH

    conn, counter = _rpyc_counter(port)
    bound: dict[Any, tuple[Any, Any, Any]] = {}  # id_pack: (netref, its child, its incr)

    def methods(c: Any) -> tuple[Any, Any, Any]:
        key = c.____id_pack__  # a local attribute of the netref: no request
        got = bound.get(key)
        if got is None:
            got = bound[key] = (c, c.child, c.incr)
        return got

    def chain() -> int:
        c = counter
        for _ in range(CHAIN_DEPTH - 1):
            c = methods(c)[1]()
        return int(methods(c)[2]())

    return chain, conn.close


def _objects() -> Any:
    """``sockstack.objects`` typed as Any: the bench is written against issue 13's API before it
    lands (the rows skip while it cannot be imported)."""
    return importlib.import_module("sockstack.objects")


def _sockstack_counter(port: int) -> Any:
    return _objects().lookup(f"tcp://127.0.0.1:{port}/counter", timeout=10)


def sockstack_object_client(port: int, payload: bytes) -> Sync:
    counter = _sockstack_counter(port)
    return (lambda: counter.echo(payload)), (lambda: _objects().close(counter))


def sockstack_chain(port: int, pipelined: bool) -> Sync:
    """``counter.child().child()...child().incr()``: ``child()`` returns a promise at once, so
    the pipelined chain is the expression itself (one round trip); one by one, each step is
    forced with ``sockstack.objects.resolve`` before the next call is made."""
    from bench.peers import CHAIN_DEPTH

    counter = _sockstack_counter(port)
    if pipelined:

        def chain() -> int:
            c = counter
            for _ in range(CHAIN_DEPTH - 1):
                c = c.child()
            return int(c.incr())

    else:
        resolve = _objects().resolve

        def chain() -> int:
            c = counter
            for _ in range(CHAIN_DEPTH - 1):
                c = resolve(c.child())
            return int(c.incr())

    return chain, (lambda: _objects().close(counter))


# Async clients: (setup -> async call, async close), timed inside one event loop.
Async = tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[None]]]


async def nats_async(port: int, payload: bytes) -> Async:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    return (lambda: nc.request("bench.echo", payload, timeout=10)), nc.close


async def grpc_aio(port: int, payload: bytes) -> Async:
    import grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_unary("/bench.Echo/Echo")
    return (lambda: stub(payload, timeout=10)), channel.close


async def timed_loop_async(
    call: Callable[[], Awaitable[object]], count: int, cap: float, warmup: int = 200
) -> tuple[list[int], float]:
    for _ in range(warmup):
        await call()
    lat: list[int] = []
    now = time.perf_counter_ns
    start = t = now()
    stop_at = start + int(cap * 1e9)
    for _ in range(count):
        await call()
        t2 = now()
        lat.append(t2 - t)
        t = t2
        if t2 > stop_at:
            break
    return lat, (t - start) / 1e9


def run_async(coro: Awaitable[Any]) -> Any:
    import uvloop

    return uvloop.run(coro)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ measuring


def measure_sync(
    scenario: str,
    system: str,
    placement: Placement,
    server: Server,
    make: Callable[[], Sync],
    budget: Budget,
    payload: int,
    warmup: int = 200,
) -> Result:
    pin(placement[2])
    call, close = make()
    try:
        cpu0, scpu0 = time.process_time(), server.cpu_seconds()
        lat, seconds = timed_loop(call, budget.count, budget.cap, warmup)
        cpu = time.process_time() - cpu0 + server.cpu_seconds() - scpu0
    finally:
        close()
    return _result(scenario, system, placement, server, lat, seconds, cpu, payload)


def measure_async(
    scenario: str,
    system: str,
    placement: Placement,
    server: Server,
    make: Callable[[], Awaitable[Async]],
    budget: Budget,
    payload: int,
) -> Result:
    pin(placement[2])

    async def go() -> tuple[list[int], float, float]:
        call, close = await make()
        try:
            cpu0, scpu0 = time.process_time(), server.cpu_seconds()
            lat, seconds = await timed_loop_async(call, budget.count, budget.cap)
            return lat, seconds, time.process_time() - cpu0 + server.cpu_seconds() - scpu0
        finally:
            await close()

    lat, seconds, cpu = run_async(go())
    return _result(scenario, system, placement, server, lat, seconds, cpu, payload)


def _result(
    scenario: str,
    system: str,
    placement: Placement,
    server: Server,
    lat: list[int],
    seconds: float,
    cpu: float,
    payload: int,
) -> Result:
    p50, p99, p999 = stats(lat)
    calls = len(lat)
    r = Result(
        scenario,
        system,
        placement[0],
        calls,
        seconds,
        payload,
        p50,
        p99,
        p999,
        round(cpu / calls * 1e6, 1) if calls else None,
        round(server.rss_bytes() / 2**20, 1),
    )
    if lat:
        r.extra["cdf_us"] = [round(v / 1000, 1) for v in percentiles(lat, CDF_POINTS)]
    return r


# ------------------------------------------------------------------------------ pipelined


async def _pipelined_sockstack(
    url: str, payload: bytes, total: int, window: int
) -> tuple[list[int], float]:
    from sockstack import AsyncClient

    async with AsyncClient(url, timeout=60) as c:
        return await _in_flight(functools.partial(c.call, "echo", payload), total, window)


async def _in_flight(
    call: Callable[[], Awaitable[Any]], total: int, window: int
) -> tuple[list[int], float]:
    """``window`` workers, each awaiting one ``call()`` after another, ``total`` calls in all
    (after a warm-up of ``window``): each call's latency, and the seconds they took."""
    await asyncio.gather(*(call() for _ in range(window)))  # warm-up
    lat: list[int] = []
    remaining = total
    now = time.perf_counter_ns

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t = now()
            await call()
            lat.append(now() - t)

    start = now()
    await asyncio.gather(*(worker() for _ in range(window)))
    return lat, (now() - start) / 1e9


async def _pipelined_batch(
    url: str, payload: bytes, total: int, window: int
) -> tuple[list[int], float]:
    """AsyncClient.iter_many (BATCH requests, PROTOCOL.md §4.7) with ``window`` calls in flight;
    a call's latency is from its batch's write to its result's arrival in order."""
    from sockstack import AsyncClient

    async with AsyncClient(url, timeout=60) as c:
        await c.call_many("echo", [(payload,)] * window, window=window)  # warm-up
        timed = _Timed(payload, total)
        async for _ in c.iter_many("echo", timed.calls(), window=window):
            timed.answered()
        return timed.result()


async def _pipelined_call_many(
    url: str, payload: bytes, total: int, window: int
) -> tuple[list[int], float]:
    """AsyncClient.call_many (answers as a list): calls/s only, no per-call timing (the
    iter_many row has the latency)."""
    from sockstack import AsyncClient

    async with AsyncClient(url, timeout=60) as c:
        await c.call_many("echo", [(payload,)] * window, window=window)  # warm-up
        args = (payload,)
        start = time.perf_counter_ns()
        out = await c.call_many("echo", itertools.repeat(args, total), window=window)
        seconds = (time.perf_counter_ns() - start) / 1e9
    if len(out) != total:
        raise RuntimeError(f"call_many: {len(out)} answers of {total}")
    return [], seconds


def _pipelined_call_many_blocking(
    url: str, payload: bytes, total: int, window: int
) -> tuple[list[int], float]:
    """:func:`_pipelined_call_many` with the blocking client."""
    from sockstack import connect

    with connect(url, timeout=60) as c:
        c.call_many("echo", [(payload,)] * window, window=window)  # warm-up
        args = (payload,)
        start = time.perf_counter_ns()
        out = c.call_many("echo", itertools.repeat(args, total), window=window)
        seconds = (time.perf_counter_ns() - start) / 1e9
    if len(out) != total:
        raise RuntimeError(f"call_many: {len(out)} answers of {total}")
    return [], seconds


class _Timed:
    """``total`` calls' arguments for call_many/iter_many, each stamped as it is taken (taken =
    encoded and sent with its batch's refill), and each answer's latency from that stamp."""

    def __init__(self, payload: bytes, total: int) -> None:
        self.args, self.total = (payload,), total
        self.sent: list[int] = []
        self.lat: list[int] = []
        self.start = time.perf_counter_ns()

    def calls(self) -> Iterator[tuple[bytes]]:
        now, sent, args = time.perf_counter_ns, self.sent, self.args
        for _ in range(self.total):
            sent.append(now())
            yield args

    def answered(self) -> None:
        lat = self.lat
        lat.append(time.perf_counter_ns() - self.sent[len(lat)])

    def result(self) -> tuple[list[int], float]:
        if len(self.lat) != self.total:
            raise RuntimeError(f"call_many: {len(self.lat)} answers of {self.total}")
        return self.lat, (time.perf_counter_ns() - self.start) / 1e9


class _FutureClient(asyncio.Protocol):
    """The least an asyncio client with a future per call can do: frames of ``[u32 length]
    [u32 request id][payload]`` to the framed echo server, each answer matched to its future by
    its request id (a dict), no other feature. The ceiling of gather-style pipelining."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.next_id = 0
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, n, pending = 0, len(buf), self.pending
        while n - pos >= 8:
            size, rid = _LEN_ID.unpack_from(buf, pos)
            end = pos + 4 + size
            if end > n:
                break
            fut = pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(bytes(buf[pos + 8 : end]))
            pos = end
        del buf[:pos]

    def call(self, payload: bytes) -> asyncio.Future[bytes]:
        self.next_id = rid = (self.next_id + 1) & 0xFFFFFFFF
        fut = self.loop.create_future()
        self.pending[rid] = fut
        self.transport.write(_LEN_ID.pack(4 + len(payload), rid) + payload)
        return fut


_LEN_ID = struct.Struct("!II")


async def _pipelined_futures(
    port: int, payload: bytes, total: int, window: int
) -> tuple[list[int], float]:
    """:func:`_pipelined_sockstack`'s shape (``window`` workers each awaiting one call after
    another) on :class:`_FutureClient`."""
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(_FutureClient, "127.0.0.1", port)
    try:
        return await _in_flight(functools.partial(client.call, payload), total, window)
    finally:
        transport.close()


async def _streamed(port: int, method: str, total: int) -> tuple[list[int], float]:
    """One streamed call of ``total`` small items (ints), read with ``async for``: seconds from
    the request to the last item. No per-item latency (items are not calls)."""
    from sockstack import AsyncClient

    async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=600) as c:
        async for _ in c.stream(method, 1000):  # warm-up: connection, worker thread, caches
            pass
        start = time.perf_counter_ns()
        n = 0
        async for _ in c.stream(method, total):
            n += 1
        seconds = (time.perf_counter_ns() - start) / 1e9
    if n != total:
        raise RuntimeError(f"{method}: {n} items of {total}")
    return [], seconds


def _streamed_blocking(port: int, method: str, total: int) -> tuple[list[int], float]:
    """:func:`_streamed` with the blocking client: ``for item in client.stream(...)``."""
    from sockstack import connect

    with connect(f"tcp://127.0.0.1:{port}", timeout=600) as c:
        for _ in c.stream(method, 1000):  # warm-up: connection, worker thread, caches
            pass
        start = time.perf_counter_ns()
        n = 0
        for _ in c.stream(method, total):
            n += 1
        seconds = (time.perf_counter_ns() - start) / 1e9
    if n != total:
        raise RuntimeError(f"{method}: {n} items of {total}")
    return [], seconds


class _Blaster(asyncio.Protocol):
    """Keeps ``window`` length-prefixed echoes in flight; counts answers by size."""

    def __init__(self, msg: bytes, total: int, window: int, done: asyncio.Future[None]) -> None:
        self.msg, self.total, self.window, self.done = msg, total, window, done
        self.sent = self.received_bytes = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        first = min(self.window, self.total)
        self.transport.write(self.msg * first)
        self.sent = first

    def data_received(self, data: bytes) -> None:
        before = self.received_bytes // len(self.msg)
        self.received_bytes += len(data)
        got = self.received_bytes // len(self.msg)
        more = min(got - before, self.total - self.sent)
        if more > 0:
            self.transport.write(self.msg * more)
            self.sent += more
        if got >= self.total and not self.done.done():
            self.done.set_result(None)


async def _pipelined_framed(
    port: int, payload: bytes, total: int, window: int
) -> tuple[list[int], float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    msg = LENGTH.pack(len(payload)) + payload
    start = time.perf_counter_ns()
    transport, _ = await loop.create_connection(
        lambda: _Blaster(msg, total, window, done), "127.0.0.1", port
    )
    await asyncio.wait_for(done, 120)
    transport.close()
    return [], (time.perf_counter_ns() - start) / 1e9


def _pipelined_zmq(port: int, payload: bytes, total: int, window: int) -> tuple[list[int], float]:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        start = time.perf_counter_ns()
        sent = 0
        for _ in range(min(window, total)):
            sock.send(payload)
            sent += 1
        for _ in range(total):
            sock.recv()
            if sent < total:
                sock.send(payload)
                sent += 1
        return [], (time.perf_counter_ns() - start) / 1e9
    finally:
        sock.close(linger=0)
        ctx.term()


# --------------------------------------------------------------------------- concurrency


class _Loader(asyncio.Protocol):
    """One connection of the load generator: HELLO, then ``depth`` pre-encoded echo requests
    in flight; answers are counted by size, so the generator costs little per call."""

    def __init__(
        self,
        hello: bytes,
        req: bytes,
        resp_len: int,
        welcome_len: int,
        depth: int,
        shared: dict[str, Any],
    ) -> None:
        self.hello, self.req, self.resp_len, self.welcome_len = hello, req, resp_len, welcome_len
        self.depth, self.shared = depth, shared
        self.got = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.hello + self.req * self.depth)
        self.shared["sent"] += self.depth

    def data_received(self, data: bytes) -> None:
        sh = self.shared
        before = max(0, self.got - self.welcome_len) // self.resp_len
        self.got += len(data)
        answered = max(0, self.got - self.welcome_len) // self.resp_len - before
        sh["done"] += answered
        more = min(answered, sh["total"] - sh["sent"])
        if more > 0:
            self.transport.write(self.req * more)
            sh["sent"] += more
        if sh["done"] >= sh["total"] and not sh["future"].done():
            sh["future"].set_result(None)


async def _concurrent(
    port: int, payload: bytes, clients: int, total: int, depth: int = 32
) -> float:
    from sockstack.protocol.messages import (
        Hello,
        Welcome,
        encode_hello,
        encode_request,
        encode_response,
        encode_welcome,
        features_extension,
    )

    hello = encode_hello(Hello(agent="bench"))
    req = encode_request(1, "echo", [payload])
    resp_len = len(encode_response(1, payload))
    welcome_len = len(
        encode_welcome(Welcome(1, (1, 2, 0), 1 << 20, "sockstack-py/1", (features_extension(),)))
    )
    loop = asyncio.get_running_loop()
    shared: dict[str, Any] = {"sent": 0, "done": 0, "total": total, "future": loop.create_future()}
    transports = []
    start = time.perf_counter_ns()
    for _ in range(clients):
        t, _ = await loop.create_connection(
            lambda: _Loader(hello, req, resp_len, welcome_len, depth, shared), "127.0.0.1", port
        )
        transports.append(t)
    await asyncio.wait_for(shared["future"], 120)
    seconds = (time.perf_counter_ns() - start) / 1e9
    for t in transports:
        t.close()
    return seconds


# --------------------------------------------------------------------------- idle memory


async def _hold_idle(port: int, n: int) -> list[Any]:
    from sockstack.protocol.messages import Hello, encode_hello

    hello = encode_hello(Hello(agent="bench"))
    loop = asyncio.get_running_loop()
    opened: list[Any] = []

    class Idle(asyncio.Protocol):
        def __init__(self, fut: asyncio.Future[None]) -> None:
            self.fut = fut

        def connection_made(self, transport: Any) -> None:
            transport.write(hello)

        def data_received(self, data: bytes) -> None:
            if not self.fut.done():
                self.fut.set_result(None)  # WELCOME: the server holds a session for us

    for base in range(0, n, 250):
        futs = []
        for _ in range(min(250, n - base)):
            fut = loop.create_future()
            t, _ = await loop.create_connection(lambda f=fut: Idle(f), "127.0.0.1", port)  # type: ignore[misc]
            opened.append(t)
            futs.append(fut)
        await asyncio.wait_for(asyncio.gather(*futs), 60)
    return opened


def idle_memory(n: int) -> Result:
    """Server RSS growth per idle, handshaken TCP connection."""
    srv = start_sockstack({0})
    try:
        pin({1})
        before = srv.rss_bytes("VmRSS")

        async def go() -> float:
            opened = await _hold_idle(srv.port, n)
            await asyncio.sleep(0.5)  # let the server settle its buffers before sampling RSS
            after = srv.rss_bytes("VmRSS")
            for t in opened:
                t.close()
            return (after - before) / n

        per_conn = run_async(go())
    finally:
        srv.stop()
    r = Result(
        "idle-memory",
        "sockstack",
        "two cores",
        n,
        0.0,
        0,
        peak_rss_mb=round(srv.extra.get("peak", 0) / 2**20, 1) or None,
    )
    r.extra["bytes_per_idle_connection"] = round(per_conn)
    r.note = f"{n} idle connections; RSS growth / connection"
    return r


__all__ = [
    "BOTH",
    "CDF_POINTS",
    "SAME",
    "SPLIT",
    "Budget",
    "idle_memory",
    "measure_async",
    "measure_sync",
]
