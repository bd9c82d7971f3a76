"""Runs every scenario in one process, so all figures come from the same machine and minute."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import scenarios as sc
from bench.cluster import run_cluster
from bench.edge import run_edge
from bench.harness import Result, Server, SkipSystem, median_round, pin, stats
from bench.http import run_http, run_sse_fanout
from bench.peers import CHAIN_DEPTH

__all__ = ["Run", "run_all"]


@dataclass
class Run:
    quick: bool
    results: list[Result] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    cdf: dict[str, list[float]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    log: Callable[[str], None] = print
    rounds: int = 1


@dataclass
class System:
    name: str
    start: Callable[[set[int]], Server]
    client: Callable[[Server, bytes], Any]
    is_async: bool = False
    warmup: int = 200
    """Calls before the timed ones (a chain counts as one call)."""


def _ss_url(s: Server, scheme: str = "tcp") -> str:
    port = s.extra["udp_port"] if scheme == "udp" else s.port
    return f"{scheme}://127.0.0.1:{port}"


SEQ_TCP = [
    System(
        "C echo (kernel limit)",
        lambda c: sc.start_c_echo("tcp", c),
        lambda s, p: sc.framed_client(s.port, p),
    ),
    System(
        "raw socket (examples/)",
        lambda c: sc.start_example("raw_tcp_server.py", c),
        lambda s, p: sc.framed_client(s.port, p),
    ),
    System(
        "asyncio+uvloop framed echo",
        lambda c: sc.start_peer("uvloop-echo", c),
        lambda s, p: sc.framed_client(s.port, p),
    ),
    System("sockstack", sc.start_sockstack, lambda s, p: sc.sockstack_client(_ss_url(s), p)),
    System(
        "pyzmq REQ/REP",
        lambda c: sc.start_peer("zmq-rep", c, "zmq"),
        lambda s, p: sc.zmq_client(s.port, p),
    ),
    System(
        "gRPC sync unary",
        lambda c: sc.start_peer("grpc", c, "grpc"),
        lambda s, p: sc.grpc_client(s.port, p),
    ),
    System(
        "gRPC aio unary",
        lambda c: sc.start_peer("grpc", c, "grpc"),
        lambda s, p: sc.grpc_aio(s.port, p),
        is_async=True,
    ),
    System(
        "Pyro5", lambda c: sc.start_peer("pyro", c, "Pyro5"), lambda s, p: sc.pyro_client(s.port, p)
    ),
    System(
        "NATS request/reply (nats-py)",
        sc.start_nats,
        lambda s, p: sc.nats_async(s.port, p),
        is_async=True,
    ),
    System("Redis ECHO (redis-py)", sc.start_redis, lambda s, p: sc.redis_client(s.port, p)),
]

SEQ_UDP = [
    System(
        "C echo UDP (kernel limit)",
        lambda c: sc.start_c_echo("udp", c),
        lambda s, p: sc.udp_client(s.port, p),
    ),
    System(
        "raw UDP socket (examples/)",
        lambda c: sc.start_example("raw_udp_server.py", c),
        lambda s, p: sc.udp_client(s.port, p),
    ),
    System(
        "sockstack UDP", sc.start_sockstack, lambda s, p: sc.sockstack_client(_ss_url(s, "udp"), p)
    ),
]


def _measure(
    run: Run,
    scenario: str,
    system: System,
    placement: sc.Placement,
    budget: sc.Budget,
    payload: int,
) -> Result | None:
    key = f"{scenario} / {system.name}"
    try:
        server = system.start(placement[1])
    except SkipSystem as exc:
        run.skipped[system.name] = str(exc)
        run.log(f"  skip {system.name}: {exc}")
        return None
    data = b"x" * payload
    try:
        if system.is_async:
            r = sc.measure_async(
                scenario,
                system.name,
                placement,
                server,
                lambda: system.client(server, data),
                budget,
                payload,
            )
        else:
            r = sc.measure_sync(
                scenario,
                system.name,
                placement,
                server,
                lambda: system.client(server, data),
                budget,
                payload,
                system.warmup,
            )
    except SkipSystem as exc:
        run.skipped[system.name] = str(exc)
        return None
    except Exception as exc:  # a peer that breaks must not end the whole run
        run.skipped[system.name] = f"failed: {type(exc).__name__}: {exc}"
        run.log(f"  {key}: failed: {exc}")
        return None
    finally:
        server.stop()
    run.log(f"  {key} [{placement[0]}]: {r.rate:,.0f} calls/s, p50 {r.p50_us} µs")
    return r


def _compare(
    run: Run,
    scenario: str,
    systems: list[System],
    placement: sc.Placement,
    budget: sc.Budget,
    payload: int,
    only: str,
) -> None:
    """Each system once per round, rounds interleaved; the median round of each goes in."""
    chosen = [s for s in systems if not (only and only not in s.name.lower())]
    rounds: dict[str, list[Result]] = {s.name: [] for s in chosen}
    for _ in range(budget.rounds):
        for system in chosen:
            if system.name in run.skipped:
                continue
            r = _measure(run, scenario, system, placement, budget, payload)
            if r is not None:
                rounds[system.name].append(r)
    for system in chosen:
        if rounds[system.name]:
            run.results.append(median_round(rounds[system.name]))


SEQ_TLS = [
    System(
        "raw TLS socket (ssl module)",
        sc.start_tls_echo,
        lambda s, p: sc.tls_framed_client(s.port, p),
    ),
    System(
        "sockstack TLS",
        lambda c: sc.start_sockstack(c, tls=True),
        lambda s, p: sc.sockstack_tls_client(s.port, p),
    ),
]


OBJECTS_SCENARIO = "remote object call, sequential 64 B"
OBJECTS = [
    SEQ_TCP[0],  # the C echo: the kernel's ceiling for any client in this run and placement
    System(
        "sockstack.objects",
        sc.start_sockstack_objects,
        lambda s, p: sc.sockstack_object_client(s.port, p),
    ),
    System(
        "Pyro5 objects",
        lambda c: sc.start_peer("pyro-objects", c, "Pyro5"),
        lambda s, p: sc.pyro_object_client(s.port, p),
    ),
    System(
        "RPyC objects",
        lambda c: sc.start_peer("rpyc-objects", c, "rpyc"),
        lambda s, p: sc.rpyc_object_client(s.port, p),
    ),
]

CHAIN_SCENARIO = (
    f"object chain, {CHAIN_DEPTH} dependent calls (calls/s = chains/s, p50 = one chain)"
)
CHAIN = [
    System(
        "sockstack.objects, pipelined",
        sc.start_sockstack_objects,
        lambda s, p: sc.sockstack_chain(s.port, pipelined=True),
        warmup=20,
    ),
    System(
        "sockstack.objects, one by one",
        lambda c: sc.start_sockstack_objects(c, "resolve"),
        lambda s, p: sc.sockstack_chain(s.port, pipelined=False),
        warmup=20,
    ),
    System(
        "Pyro5 objects, one by one",
        lambda c: sc.start_peer("pyro-objects", c, "Pyro5"),
        lambda s, p: sc.pyro_chain(s.port),
        warmup=20,
    ),
    System(
        "RPyC objects, one by one",
        lambda c: sc.start_peer("rpyc-objects", c, "rpyc"),
        lambda s, p: sc.rpyc_chain(s.port),
        warmup=20,
    ),
]


def objects(run: Run, budget: sc.Budget, only: str) -> None:
    """A method call on a remote object (issue 13), sequential, 64 B echoed, both placements:
    sockstack.objects, Pyro5 (Daemon, proxy) and RPyC (ThreadedServer, netref), beside the C
    echo (what no client can exceed: it bounds the ratios reachable on two cores)."""
    for placement in (sc.SAME, sc.SPLIT):
        _compare(run, OBJECTS_SCENARIO, OBJECTS, placement, budget, 64, only)


def chain(run: Run, budget: sc.Budget, only: str) -> None:
    """A 10-deep dependent chain (9 x child(), then incr()) over counters linked in advance:
    sockstack pipelined (one round trip) and every system call by call, both placements. Each
    row's calls are chains: calls/s is chains/s, the percentiles are one chain's latency."""
    b = sc.Budget(max(100, budget.count // CHAIN_DEPTH), budget.cap, 0, 0, 0, budget.rounds)
    for placement in (sc.SAME, sc.SPLIT):
        _compare(run, CHAIN_SCENARIO, CHAIN, placement, b, 0, only)


def seq_tls(run: Run, budget: sc.Budget, only: str) -> None:
    for placement in (sc.SAME, sc.SPLIT):
        _compare(run, "sequential TLS 64 B", SEQ_TLS, placement, budget, 64, only)


def seq_tcp(run: Run, budget: sc.Budget, only: str) -> None:
    for placement in (sc.SAME, sc.SPLIT):
        _compare(run, "sequential TCP 64 B", SEQ_TCP, placement, budget, 64, only)


def seq_udp(run: Run, budget: sc.Budget, only: str) -> None:
    for placement in (sc.SAME, sc.SPLIT):
        _compare(run, "sequential UDP 64 B", SEQ_UDP, placement, budget, 64, only)


def payloads(run: Run, budget: sc.Budget, only: str) -> None:
    systems = [SEQ_TCP[1], SEQ_TCP[3]]
    for size in (64, 1024, 64 * 1024, 1024 * 1024):
        scale = max(1, size // 4096)
        b = sc.Budget(max(200, budget.count // scale), budget.cap, 0, 0, 0, budget.rounds)
        _compare(run, f"TCP payload {_size(size)}", systems, sc.SPLIT, b, size, only)


def _size(n: int) -> str:
    return f"{n // 1048576} MiB" if n >= 1048576 else f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def pipelined(run: Run, budget: sc.Budget, only: str, window: int = 1000) -> None:
    scenario = f"pipelined TCP 64 B, window {window}"
    payload = b"x" * 64
    # call_many's rows make more calls in their 0.8 s (each row's count is its own)
    many, timed = budget.pipelined * 8, budget.pipelined * 4
    counts = {
        "sockstack call_many (BATCH requests)": many,
        "sockstack call_many, blocking client": many,
        "sockstack iter_many, each result timed": timed,
    }
    cases: list[
        tuple[str, Callable[[set[int]], Server], Callable[[Server], tuple[list[int], float]]]
    ] = [
        (
            "asyncio+uvloop framed echo",
            lambda c: sc.start_peer("uvloop-echo", c),
            lambda s: sc.run_async(sc._pipelined_framed(s.port, payload, budget.pipelined, window)),
        ),
        (
            "pyzmq DEALER/ROUTER",
            lambda c: sc.start_peer("zmq-router", c, "zmq"),
            lambda s: sc._pipelined_zmq(s.port, payload, budget.pipelined, window),
        ),
        (
            "asyncio+uvloop client, a future per call (minimal)",
            lambda c: sc.start_peer("uvloop-echo", c),
            lambda s: sc.run_async(
                sc._pipelined_futures(s.port, payload, budget.pipelined, window)
            ),
        ),
        (
            "sockstack",
            sc.start_sockstack,
            lambda s: sc.run_async(
                sc._pipelined_sockstack(_ss_url(s), payload, budget.pipelined, window)
            ),
        ),
        (
            "sockstack call_many (BATCH requests)",
            sc.start_sockstack,
            lambda s: sc.run_async(sc._pipelined_call_many(_ss_url(s), payload, many, window)),
        ),
        (
            "sockstack call_many, blocking client",
            sc.start_sockstack,
            lambda s: sc._pipelined_call_many_blocking(_ss_url(s), payload, many, window),
        ),
        (
            "sockstack iter_many, each result timed",
            sc.start_sockstack,
            lambda s: sc.run_async(sc._pipelined_batch(_ss_url(s), payload, timed, window)),
        ),
    ]
    chosen = [c for c in cases if not (only and only not in c[0].lower())]
    rounds: dict[str, list[Result]] = {name: [] for name, _, _ in chosen}
    for _ in range(budget.rounds):
        for name, start, go in chosen:
            if name in run.skipped:
                continue
            try:
                server = start(sc.SPLIT[1])
            except SkipSystem as exc:
                run.skipped[name] = str(exc)
                continue
            try:
                pin(sc.SPLIT[2])
                cpu0, scpu0 = time.process_time(), server.cpu_seconds()
                lat, seconds = go(server)
                cpu = time.process_time() - cpu0 + server.cpu_seconds() - scpu0
                rss = server.rss_bytes()
            finally:
                server.stop()
            p50, p99, p999 = stats(lat) if lat else (None, None, None)
            calls = counts.get(name, budget.pipelined)
            r = Result(
                scenario,
                name,
                sc.SPLIT[0],
                calls,
                seconds,
                64,
                p50,
                p99,
                p999,
                round(cpu / calls * 1e6, 1),
                round(rss / 2**20, 1),
            )
            rounds[name].append(r)
            run.log(f"  {scenario} / {name}: {r.rate:,.0f} calls/s")
    for name, _, _ in chosen:
        if rounds[name]:
            run.results.append(median_round(rounds[name]))


def stream(run: Run, budget: sc.Budget, only: str) -> None:
    """Streamed results (issue 12 item 6): items/s of one stream of small items (ints), a sync
    generator (pulled in a worker thread) and an async one read by the asyncio client, the sync
    one by the blocking client too, under the pipelined row's placement
    (server on one core, client on the other). ``calls`` counts items."""
    if only and only not in "sockstack":
        return
    total = budget.stream
    scenario = f"streamed results, {total:,} small items"
    cases = [
        ("sockstack stream, def generator", "count", False),
        ("sockstack stream, async def", "acount", False),
        ("sockstack stream, def generator, blocking client", "count", True),
    ]
    rounds: dict[str, list[Result]] = {name: [] for name, _, _ in cases}
    for _ in range(budget.rounds):
        for name, method, blocking in cases:
            server = sc.start_peer("sockstack-stream", sc.SPLIT[1])
            try:
                pin(sc.SPLIT[2])
                cpu0, scpu0 = time.process_time(), server.cpu_seconds()
                if blocking:
                    _, seconds = sc._streamed_blocking(server.port, method, total)
                else:
                    _, seconds = sc.run_async(sc._streamed(server.port, method, total))
                cpu = time.process_time() - cpu0 + server.cpu_seconds() - scpu0
                rss = server.rss_bytes()
            finally:
                server.stop()
            r = Result(
                scenario,
                name,
                sc.SPLIT[0],
                total,
                seconds,
                3,
                cpu_s_per_m=round(cpu / total * 1e6, 1),
                peak_rss_mb=round(rss / 2**20, 1),
                note="items/s (calls = items)",
            )
            rounds[name].append(r)
            run.log(f"  {scenario} / {name}: {r.rate:,.0f} items/s")
    for name, _, _ in cases:
        if rounds[name]:
            run.results.append(median_round(rounds[name]))


def hints(run: Run, budget: sc.Budget, only: str) -> None:
    """What validation from type hints costs a call (issue 12 item 2): sequential blocking
    calls, client and server pinned to the same core, to inline methods without hints, with
    plain hints (str, int, float, bytes) and with a dataclass parameter (bench/codec_choice.py's
    live rows, median of the rounds)."""
    from bench.codec_choice import live_rows

    _live_table(
        run,
        budget,
        only,
        "type hints, sequential TCP same core (4 arguments)",
        lambda count: [(k.removeprefix("live call, "), ns) for k, ns in live_rows(count)],
    )


def features(run: Run, budget: sc.Budget, only: str) -> None:
    """What the RPC features cost a call when used (issue 17; bench/features.py): metadata,
    client and server interceptors, validation, each against the plain call of the same round
    (sequential blocking calls, client and server on one core; median of the rounds)."""
    from bench.features import live_rows

    _live_table(
        run, budget, only, "RPC features, sequential TCP same core (4 arguments)", live_rows
    )


def _live_table(
    run: Run,
    budget: sc.Budget,
    only: str,
    scenario: str,
    live_rows: Callable[[int], list[tuple[str, float]]],
) -> None:
    """A table of ``live_rows(count)``'s (row, ns per call), median of the rounds."""
    if only and only not in "sockstack":
        return
    count = 5_000 if budget.rounds == 1 else 20_000
    rounds: dict[str, list[float]] = {}
    for _ in range(budget.rounds):
        for label, ns in live_rows(count):
            rounds.setdefault(label, []).append(ns)
    for label, values in rounds.items():
        ns = sorted(values)[len(values) // 2]
        r = Result(
            scenario,
            f"sockstack, {label}",
            "same core",
            count,
            count * ns / 1e9,
            note="µs per call = 1e6 / calls/s",
        )
        run.results.append(r)
        run.log(f"  {scenario} / {label}: {ns / 1000:.2f} µs per call")


def concurrency(run: Run, budget: sc.Budget, only: str, clients: int = 100) -> None:
    if only and only not in "sockstack":
        return
    # Each client keeps `depth` calls in flight: the load generator shares the two cores with
    # the workers, and deeper pipelines cut its cost per call, so the figure shows the server.
    depth = 32
    scenario = f"{clients} concurrent clients, {depth} calls in flight each"
    rounds: dict[int, list[Result]] = {1: [], 2: []}
    for _ in range(budget.rounds):
        for workers in (1, 2):
            server = sc.start_sockstack(sc.BOTH[1], workers=workers)
            try:
                pin(sc.BOTH[2])
                cpu0, scpu0 = time.process_time(), server.cpu_seconds()
                seconds = sc.run_async(
                    sc._concurrent(server.port, b"x" * 64, clients, budget.concurrent, depth)
                )
                cpu = time.process_time() - cpu0 + server.cpu_seconds() - scpu0
                rss = server.rss_bytes()
            finally:
                server.stop()
            r = Result(
                scenario,
                f"sockstack --workers {workers}",
                sc.BOTH[0],
                budget.concurrent,
                seconds,
                64,
                cpu_s_per_m=round(cpu / budget.concurrent * 1e6, 1),
                peak_rss_mb=round(rss / 2**20, 1),
            )
            rounds[workers].append(r)
            run.log(f"  {scenario} / {r.system}: {r.rate:,.0f} calls/s")
    for workers in (1, 2):
        run.results.append(median_round(rounds[workers]))


def memory(run: Run, budget: sc.Budget, only: str) -> None:
    if only and only not in "sockstack":
        return
    r = sc.idle_memory(budget.idle_connections)
    run.results.append(r)
    run.log(f"  idle memory: {r.extra['bytes_per_idle_connection']} bytes per connection")


def pubsub(run: Run, budget: sc.Budget, only: str) -> None:
    from bench.pubsub import run_pubsub

    results, skipped = run_pubsub(budget.rounds == 1, only, run.log, budget.rounds)
    run.results += results
    run.skipped.update(skipped)


SCENARIOS: dict[str, Callable[[Run, sc.Budget, str], None]] = {
    "seq-tcp": seq_tcp,
    "seq-udp": seq_udp,
    "seq-tls": seq_tls,
    "pipelined": pipelined,
    "stream": stream,
    "hints": hints,
    "features": features,
    "concurrency": concurrency,
    "payload": payloads,
    "memory": memory,
    "pubsub": pubsub,
    "objects": objects,
    "chain": chain,
    "http": run_http,
    "sse-fanout": run_sse_fanout,
    "edge": run_edge,
    "cluster": run_cluster,
}


def run_all(
    quick: bool,
    scenarios: list[str] | None = None,
    only: str = "",
    log: Callable[[str], None] = print,
) -> Run:
    run = Run(quick, log=log)
    budget = sc.Budget.make(quick)
    run.rounds = budget.rounds
    saved = os.sched_getaffinity(0)
    try:
        for name in scenarios or list(SCENARIOS):
            log(f"{name}:")
            SCENARIOS[name](run, budget, only.lower())
    finally:
        os.sched_setaffinity(0, saved)
    return run
