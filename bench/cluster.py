"""Brokers joined through NATS (issue 16): the price of the hop through NATS.

Rows, 64-byte payloads at QoS 0, one publisher process and one subscriber process:

- ``one broker``: publisher and subscriber on one sockstack broker;
- ``two brokers + NATS``: the publisher on broker 1, the subscriber on broker 2, the brokers
  joined through a nats-server (``broker --cluster``);
- ``NATS alone``: nats-py publisher and subscriber on the nats-server (no sockstack).

Each is measured twice: flooded (messages/s delivered, from the first publish to the last
receipt) and paced (``PACED_RATE`` messages/s, publish-to-delivery latency p50/p99 from a
timestamp in the payload: one machine, one clock). Then ``serve --workers 2 --broker
--cluster`` against ``serve --broker``: ``PUBLISHERS`` publishing connections spread over the
workers by SO_REUSEPORT, one subscriber, messages/s delivered. Rounds are interleaved (A B C,
A B C...) and each row keeps its median round.

Readiness: interest crosses NATS asynchronously, so the publisher sends probes (topic
``bench.probe``) until the subscriber has one and says ``ready``; then the bench says go.

    python -m bench.cluster [--quick]          # this scenario alone, a table on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.harness import (
    Result,
    Server,
    SkipSystem,
    free_port,
    median_round,
    python,
    spawn,
    stats,
    wait_port,
)

__all__ = ["run_cluster"]

SIZE = 64
PACED_RATE = 2000  # messages/s in the latency runs
PUBLISHERS = 4  # connections of the workers comparison
IDLE = 2.0
_TS = struct.Struct(">q")
SCENARIO = "pub/sub through NATS, 64 B"
LATENCY = "pub/sub through NATS, 64 B, paced latency"
WORKERS = "pub/sub, serve --broker: 2 workers joined by NATS vs 1"


def _payload() -> bytes:
    return _TS.pack(time.time_ns()) + b"p" * (SIZE - _TS.size)


# ------------------------------------------------------------------------ clients (subprocess)


async def _sub(system: str, url: str, count: int) -> None:
    received, first, last = 0, 0.0, 0.0
    lat: list[int] = []
    done = asyncio.Event()
    ready = asyncio.Event()

    def on(topic: str, data: bytes) -> None:
        nonlocal received, first, last
        if topic == "bench.probe":
            ready.set()
            return
        now = time.time_ns()
        if not received:
            first = now / 1e9
        received += 1
        last = now / 1e9
        lat.append(now - _TS.unpack_from(data)[0])
        if received >= count:
            done.set()

    if system == "nats":
        import nats

        nc = await nats.connect(url, pending_size=64 << 20)

        async def cb(msg: Any) -> None:
            on(msg.subject, msg.data)

        await nc.subscribe("bench.>", cb=cb, pending_msgs_limit=10_000_000)
        await nc.flush()
        closer: Callable[[], Any] = nc.close
    else:
        from sockstack import AsyncClient

        client = AsyncClient(url, codec="raw", timeout=30)
        await client.connect()
        await client.subscribe(
            "bench.>", callback=lambda m: on(m.topic, m.value), max_pending=10_000_000
        )
        closer = client.close
    await asyncio.wait_for(ready.wait(), 60)
    print("ready", flush=True)
    start = time.time()
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), 0.25)
        except TimeoutError:
            if time.time() - (last or start) > IDLE:
                break
    await closer()
    p50, p99, _ = stats(lat)
    out = {"received": received, "first": first, "last": last, "p50": p50, "p99": p99}
    print("result " + json.dumps(out), flush=True)


async def _pub(system: str, url: str, count: int, rate: int, conns: int) -> None:
    """Probes until stdin says go, then ``count`` messages (``rate`` per second if given)
    spread over ``conns`` connections."""
    loop = asyncio.get_running_loop()
    go = loop.run_in_executor(None, sys.stdin.readline)
    if system == "nats":
        import nats

        ncs = [await nats.connect(url) for _ in range(conns)]
        pubs: list[Callable[[str, bytes], Awaitable[None]]] = [nc.publish for nc in ncs]
    else:
        from sockstack import AsyncClient

        clients = [AsyncClient(url, codec="raw", timeout=30) for _ in range(conns)]
        for c in clients:
            await c.connect()
        pubs = [c.publish for c in clients]
    while not go.done():
        for p in pubs:
            await p("bench.probe", _payload())
        await asyncio.sleep(0.02)  # the probe's period, until the bench says go
    if rate:
        step = max(1, rate // 1000)  # a batch each millisecond
        t0 = time.monotonic()
        for i in range(0, count, step):
            for k in range(min(step, count - i)):
                await pubs[(i + k) % conns]("bench.x", _payload())
            delay = t0 + (i + step) / rate - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
    else:
        for i in range(count):
            await pubs[i % conns]("bench.x", _payload())
            if i % 256 == 255:
                await asyncio.sleep(0)  # the loop writes what was queued
    await asyncio.sleep(0.5)  # (the last writes leave before the process ends)


def _client(role: str, system: str, url: str, count: int, rate: int = 0, conns: int = 1) -> Any:
    return subprocess.Popen(
        [
            python(),
            "-m",
            "bench.cluster",
            role,
            system,
            url,
            str(count),
            f"--rate={rate}",
            f"--conns={conns}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _line(proc: Any, prefix: str, seconds: float) -> str:
    box: list[str] = []

    def reader() -> None:
        for line in proc.stdout:
            if line.startswith(prefix):
                box.append(line.strip())
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(seconds)
    if not box:
        raise SkipSystem(f"no {prefix!r} line within {seconds:g} s")
    return box[0]


# ------------------------------------------------------------------------ servers


def _nats() -> Server:
    port = free_port()
    proc, _ = spawn(["nats-server", "-a", "127.0.0.1", "-p", str(port)], {0, 1}, ready=None)
    srv = Server("nats-server", [proc], port, f"nats://127.0.0.1:{port}")
    wait_port(port)
    return srv


def _broker(*extra: str, command: str = "broker", tcp_port: int = 0) -> Server:
    proc, m = spawn(
        [
            python(),
            "-m",
            "sockstack.cli",
            "--log-level",
            "WARNING",
            command,
            *(["--broker"] if command == "serve" else []),
            "--tcp",
            f"127.0.0.1:{tcp_port}",
            "--udp",
            "127.0.0.1:0",
            "--keepalive",
            "0",
            "--max-connections-per-address=100000",
            *extra,
        ],
        {0, 1},
        ready=r"tcp://127\.0\.0\.1:(\d+)|worker processes",
        seconds=30,
    )
    assert m is not None
    port = int(m.group(1)) if m.group(1) else tcp_port
    return Server(f"sockstack {command}", [proc], port, f"tcp://127.0.0.1:{port}")


def _setup(system: str) -> tuple[list[Server], str, str, str]:
    """Servers, the publisher's URL, the subscriber's URL, the client kind."""
    if system == "one broker":
        b = _broker()
        return [b], b.url, b.url, "sockstack"
    n = _nats()
    if system == "NATS alone":
        return [n], n.url, n.url, "nats"
    servers = [n]
    try:
        b1 = _broker("--cluster", n.url)
        servers.append(b1)
        b2 = _broker("--cluster", n.url)
        servers.append(b2)
    except BaseException:
        for s in reversed(servers):
            s.stop()
        raise
    return servers, b1.url, b2.url, "sockstack"


def _measure(
    scenario: str,
    name: str,
    servers: list[Server],
    pub_url: str,
    sub_url: str,
    kind: str,
    count: int,
    rate: int = 0,
    conns: int = 1,
) -> Result:
    procs = []
    try:
        sub = _client("sub", kind, sub_url, count)
        procs.append(sub)
        pub = _client("pub", kind, pub_url, count, rate, conns)
        procs.append(pub)
        _line(sub, "ready", 60)
        began = time.time()
        pub.stdin.write("go\n")
        pub.stdin.flush()
        res = json.loads(_line(sub, "result", 120)[7:])
        pub.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()
    received = res["received"]
    r = Result(
        scenario,
        name,
        "two cores, unpinned",
        received,
        max(res["last"] - began, 1e-9),
        SIZE,
        p50_us=res["p50"],
        p99_us=res["p99"],
    )
    lost = count - received
    r.extra["loss"] = lost
    r.note = f"{lost:,} lost of {count:,}" if lost else "no loss"
    return r


# ------------------------------------------------------------------------ the scenario


def run_rows(
    quick: bool, only: str, log: Callable[[str], None], rounds: int = 1
) -> tuple[list[Result], dict[str, str]]:
    import importlib.util
    import shutil

    results: list[Result] = []
    skipped: dict[str, str] = {}
    if shutil.which("nats-server") is None or importlib.util.find_spec("nats") is None:
        skipped["cluster"] = "nats-server or nats-py not installed (make bench installs them)"
        log("  skip cluster: " + skipped["cluster"])
        return results, skipped
    flood = 20_000 if quick else 200_000
    paced = PACED_RATE if quick else PACED_RATE * 5  # one second, or five
    systems = [s for s in ("one broker", "two brokers + NATS", "NATS alone") if only in s.lower()]
    runs: dict[tuple[str, str], list[Result]] = {}
    for _ in range(rounds):
        for system in systems:
            servers, pub_url, sub_url, kind = _setup(system)
            try:
                for scenario, count, rate in ((SCENARIO, flood, 0), (LATENCY, paced, PACED_RATE)):
                    r = _measure(scenario, system, servers, pub_url, sub_url, kind, count, rate)
                    runs.setdefault((scenario, system), []).append(r)
                    log(
                        f"  {scenario} / {system}: {r.rate:,.0f} msg/s, p50 {r.p50_us} µs, "
                        f"p99 {r.p99_us} µs, {r.note}"
                    )
            finally:
                for s in reversed(servers):
                    s.stop()
    # serve --broker: one worker, or two joined through NATS; publishers over 4 connections.
    if not only or only in "workers":
        for _ in range(rounds):
            for workers in (1, 2):
                name = f"serve --broker --workers {workers}" + (" --cluster" if workers > 1 else "")
                servers = []
                try:
                    extra: list[str] = []
                    if workers > 1:
                        n = _nats()
                        servers.append(n)
                        extra = ["--workers", "2", "--cluster", n.url]
                    port = free_port()
                    servers.append(_broker(*extra, command="serve", tcp_port=port))
                    url = f"tcp://127.0.0.1:{port}"
                    r = _measure(
                        WORKERS, name, servers, url, url, "sockstack", flood, 0, PUBLISHERS
                    )
                finally:
                    for s in reversed(servers):
                        s.stop()
                runs.setdefault((WORKERS, name), []).append(r)
                log(f"  {WORKERS} / {name}: {r.rate:,.0f} msg/s delivered, {r.note}")
    for rows in runs.values():
        results.append(median_round(rows))
    return results, skipped


def run_cluster(run: Any, budget: Any, only: str) -> None:
    """``python -m bench --scenario cluster`` (registered in bench/runner.py's SCENARIOS)."""
    results, skipped = run_rows(budget.rounds == 1, only, run.log, budget.rounds)
    run.results += results
    run.skipped.update(skipped)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The cluster benchmark, or one of its clients.")
    p.add_argument("role", nargs="?", choices=["sub", "pub"])
    p.add_argument("system", nargs="?")
    p.add_argument("url", nargs="?")
    p.add_argument("count", nargs="?", type=int)
    p.add_argument("--rate", type=int, default=0)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    if args.role == "sub":
        asyncio.run(_sub(args.system, args.url, args.count))
    elif args.role == "pub":
        asyncio.run(_pub(args.system, args.url, args.count, args.rate, args.conns))
    else:
        results, skipped = run_rows(args.quick, "", print, args.rounds)
        for r in results:
            print(
                f"{r.scenario:58} {r.system:40} {r.rate:>10,.0f} msg/s  p50 {r.p50_us} µs  "
                f"p99 {r.p99_us} µs  {r.note}"
            )
        for k, v in skipped.items():
            print(f"skipped {k}: {v}")


if __name__ == "__main__":
    main()
