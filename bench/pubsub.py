"""Publish/subscribe benchmark: one publisher to 1 and to 10 subscribers, each its own process,
64-byte payloads at QoS 0 over TCP, for sockstack and the systems a user would pick instead
(NATS with nats-py, Redis pub/sub with redis-py, pyzmq PUB/SUB, MQTT with mosquitto and paho).

Each subscriber prints ``ready`` once its subscription is in place (sockstack, NATS, Redis and
MQTT confirm it; ZeroMQ cannot, so its publisher waits half a second: the "slow joiner"), then
counts messages until it has them all or hears nothing for 2 s, and prints its count and the
time of its last message. Delivered messages/s = all messages received / (last receipt - start
of publishing); loss = published x subscribers - received.

    python -m bench.pubsub sub --system sockstack --port 5052 --count 1000
    python -m bench.pubsub pub --system sockstack --port 5052 --count 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.harness import (
    Result,
    Server,
    SkipSystem,
    free_port,
    median_round,
    python,
    spawn,
    wait_port,
)

__all__ = ["SYSTEMS", "run_pubsub"]

PAYLOAD = b"p" * 64
IDLE = 2.0  # seconds of silence after which a subscriber stops counting
TOPIC = "bench.x"


def _report(received: int, last: float) -> None:
    print("result " + json.dumps({"received": received, "last": last}), flush=True)


# ---------------------------------------------------------------------------------- sockstack


async def _ss_sub(port: int, count: int) -> None:
    from sockstack import AsyncClient

    received = 0
    last = 0.0
    done = asyncio.Event()

    def on_message(_msg: Any) -> None:
        nonlocal received, last
        received += 1
        last = time.time()
        if received >= count:
            done.set()

    async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=30) as c:
        await c.subscribe("bench.>", callback=on_message)
        print("ready", flush=True)
        await _wait_done(done, lambda: last)
    _report(received, last)


async def _wait_done(done: asyncio.Event, last: Callable[[], float]) -> None:
    start = time.time()
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), 0.25)
        except TimeoutError:
            since = last() or start
            if time.time() - since > IDLE and (last() or time.time() - start > 60):
                return


async def _ss_pub(port: int, count: int) -> None:
    from sockstack import AsyncClient

    async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=30) as c:
        for i in range(count):
            await c.publish(TOPIC, PAYLOAD)
            if i % 256 == 255:
                await asyncio.sleep(0)  # let the loop write what was queued
        await c.ping()  # everything before the PING has left


# --------------------------------------------------------------------------------------- NATS


async def _nats_sub(port: int, count: int) -> None:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}", pending_size=512 * 1024 * 1024)
    received = 0
    last = 0.0
    done = asyncio.Event()

    async def on_message(_msg: Any) -> None:
        nonlocal received, last
        received += 1
        last = time.time()
        if received >= count:
            done.set()

    await nc.subscribe("bench.>", cb=on_message, pending_msgs_limit=10_000_000)
    await nc.flush()
    print("ready", flush=True)
    await _wait_done(done, lambda: last)
    await nc.close()
    _report(received, last)


async def _nats_pub(port: int, count: int) -> None:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    for i in range(count):
        await nc.publish(TOPIC, PAYLOAD)
        if i % 256 == 255:
            await asyncio.sleep(0)
    await nc.flush()
    await nc.close()


# -------------------------------------------------------------------------------------- Redis


def _redis_sub(port: int, count: int) -> None:
    import redis

    r = redis.Redis(port=port)
    ps = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    ps.subscribe(TOPIC)
    while ps.get_message(timeout=1.0) is None and not ps.subscribed:
        pass
    print("ready", flush=True)
    received, last = 0, 0.0
    while received < count:
        msg = ps.get_message(timeout=IDLE)
        if msg is None:
            if received:
                break
            continue
        received += 1
        last = time.time()
    _report(received, last)


def _redis_pub(port: int, count: int) -> None:
    import redis

    r = redis.Redis(port=port)
    pipe = r.pipeline(transaction=False)
    for i in range(count):
        pipe.publish(TOPIC, PAYLOAD)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


# ------------------------------------------------------------------------------------- ZeroMQ


def _zmq_sub(port: int, count: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"bench.")
    sock.connect(f"tcp://127.0.0.1:{port}")
    print("ready", flush=True)
    received, last = 0, 0.0
    sock.setsockopt(zmq.RCVTIMEO, int(IDLE * 1000))
    while received < count:
        try:
            sock.recv()
        except zmq.Again:
            if received:
                break
            continue
        received += 1
        last = time.time()
    sock.close(linger=0)
    ctx.term()
    _report(received, last)


def _zmq_pub(port: int, count: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    print("bound", flush=True)
    sys.stdin.readline()  # the bench says go once the subscribers had time to join
    msg = TOPIC.encode() + b" " + PAYLOAD
    for _ in range(count):
        sock.send(msg)
    sock.close(linger=10_000)
    ctx.term()


# --------------------------------------------------------------------------------------- MQTT


def _mqtt_sub(port: int, count: int) -> None:
    import paho.mqtt.client as mqtt

    received, last = 0, 0.0
    subscribed = threading.Event()
    done = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal received, last
        received += 1
        last = time.time()
        if received >= count:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # type: ignore[attr-defined]
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe("bench/#", qos=0)
    client.loop_start()
    subscribed.wait(10)
    print("ready", flush=True)
    start = time.time()
    while not done.wait(0.25):
        since = last or start
        if time.time() - since > IDLE and (last or time.time() - start > 60):
            break
    client.loop_stop()
    _report(received, last)


def _mqtt_pub(port: int, count: int) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # type: ignore[attr-defined]
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    info = None
    for _ in range(count):
        info = client.publish("bench/x", PAYLOAD, qos=0)
    if info is not None:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()


# ------------------------------------------------------------------------------------ systems

PROGRAMS: dict[str, tuple[Callable[[int, int], Any], Callable[[int, int], Any]]] = {
    "sockstack": (lambda p, n: asyncio.run(_ss_sub(p, n)), lambda p, n: asyncio.run(_ss_pub(p, n))),
    "nats": (lambda p, n: asyncio.run(_nats_sub(p, n)), lambda p, n: asyncio.run(_nats_pub(p, n))),
    "redis": (_redis_sub, _redis_pub),
    "zmq": (_zmq_sub, _zmq_pub),
    "mqtt": (_mqtt_sub, _mqtt_pub),
}


def _start_sockstack(cpus: set[int]) -> Server:
    proc, m = spawn(
        [
            python(),
            "-m",
            "sockstack.cli",
            "--log-level",
            "WARNING",
            "broker",
            "--tcp",
            "127.0.0.1:0",
            "--keepalive",
            "0",
        ],
        cpus,
        ready=r"serving broker on tcp://127\.0\.0\.1:(\d+)",
    )
    assert m is not None
    return Server("sockstack broker", [proc], int(m.group(1)))


def _start_nats(cpus: set[int]) -> Server:
    port = free_port()
    proc, _ = spawn(
        ["nats-server", "-a", "127.0.0.1", "-p", str(port)],
        cpus,
        ready=None,
    )
    srv = Server("nats-server", [proc], port)
    wait_port(port)
    return srv


def _start_redis(cpus: set[int]) -> Server:
    from bench.scenarios import start_redis

    return start_redis(cpus)


def _start_mosquitto(cpus: set[int]) -> Server:
    import shutil

    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    proc, _ = spawn([exe, "-p", str(port)], cpus, ready=None)
    srv = Server("mosquitto", [proc], port)
    wait_port(port)
    return srv


def _start_zmq(_cpus: set[int]) -> Server:
    return Server("zmq (no broker)", [], free_port())


SYSTEMS: list[tuple[str, str, Callable[[set[int]], Server], str | None]] = [
    ("sockstack", "sockstack", _start_sockstack, None),
    ("NATS (nats-server + nats-py)", "nats", _start_nats, "nats"),
    ("Redis pub/sub (redis-py)", "redis", _start_redis, "redis"),
    ("pyzmq PUB/SUB (no broker)", "zmq", _start_zmq, "zmq"),
    ("MQTT (mosquitto + paho)", "mqtt", _start_mosquitto, "paho"),
]


def _client(role: str, system: str, port: int, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            python(),
            "-m",
            "bench.pubsub",
            role,
            "--system",
            system,
            "--port",
            str(port),
            "--count",
            str(count),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _read_line(proc: subprocess.Popen[str], prefix: str, seconds: float) -> str:
    """The first stdout line starting with ``prefix`` (bounded by ``seconds``)."""
    assert proc.stdout is not None
    box: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
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


def measure(
    name: str, system: str, start: Callable[[set[int]], Server], subs: int, count: int
) -> Result:

    server = start({0, 1})
    procs: list[subprocess.Popen[str]] = []
    try:
        publisher = None
        if system == "zmq":  # the publisher binds; subscribers connect to it
            publisher = _client("pub", system, server.port, count)
            procs.append(publisher)
            _read_line(publisher, "bound", 20)
        subscribers = [_client("sub", system, server.port, count) for _ in range(subs)]
        procs += subscribers
        for s in subscribers:
            _read_line(s, "ready", 30)
        began = time.time()
        if publisher is None:
            publisher = _client("pub", system, server.port, count)
            procs.append(publisher)
        else:
            time.sleep(0.5)  # ZeroMQ cannot confirm subscriptions (the "slow joiner")
            began = time.time()
            assert publisher.stdin is not None
            publisher.stdin.write("go\n")
            publisher.stdin.flush()
        results = [json.loads(_read_line(s, "result", 120)[7:]) for s in subscribers]
        publisher.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        server.stop()
    received = sum(r["received"] for r in results)
    last = max((r["last"] for r in results if r["last"]), default=began)
    r = Result(
        f"pub/sub 64 B, 1 publisher to {subs} subscriber{'s' if subs > 1 else ''}",
        name,
        "two cores, unpinned",
        received,
        max(last - began, 1e-9),
        64,
    )
    lost = count * subs - received
    r.extra["loss"] = lost
    r.note = f"{lost:,} lost of {count * subs:,}" if lost else "no loss"
    return r


def index_match(n_subs: int, lookups: int) -> tuple[Result, Result]:
    """Matches per second with ``n_subs`` subscriptions: the trie index against a scan of every
    pattern (what a broker without an index would do), in this process."""
    from sockstack.pubsub.topics import SubscriptionIndex, matches

    index: SubscriptionIndex[int] = SubscriptionIndex()
    patterns = [f"dev.{i}.temp" if i % 10 else f"dev.{i}.*" for i in range(n_subs)]
    for i, pattern in enumerate(patterns):
        index.add(i, pattern)
    topics = [f"dev.{i * 7919 % n_subs}.temp" for i in range(lookups)]
    start = time.perf_counter()
    for topic in topics:
        index.match(topic.split("."))
    indexed = time.perf_counter() - start
    scan_lookups = max(1, lookups // max(1, n_subs // 10))  # the scan is slow: fewer lookups
    start = time.perf_counter()
    for topic in topics[:scan_lookups]:
        [p for p in patterns if matches(p, topic)]
    scanned = time.perf_counter() - start
    scenario = "pub/sub topic match, in-process"
    return (
        Result(scenario, f"trie index, {n_subs:,} subscriptions", "one core", lookups, indexed, 0),
        Result(
            scenario,
            f"scan of every pattern, {n_subs:,} subscriptions",
            "one core",
            scan_lookups,
            scanned,
            0,
        ),
    )


def run_pubsub(
    quick: bool, only: str, log: Callable[[str], None], rounds: int = 1
) -> tuple[list[Result], dict[str, str]]:
    """Every system, ``rounds`` times interleaved (A B C, A B C...); each row is the median."""
    import importlib.util

    results: list[Result] = []
    skipped: dict[str, str] = {}
    if not only or only in "sockstack":
        for n_subs in (10, 1_000, 10_000):
            pair = index_match(n_subs, 20_000 if quick else 100_000)
            results += pair
            log(
                f"  topic match, {n_subs:,} subscriptions: index {pair[0].rate:,.0f}/s, "
                f"scan {pair[1].rate:,.0f}/s"
            )
    for subs, count in ((1, 20_000 if quick else 200_000), (10, 2_000 if quick else 30_000)):
        chosen = []
        for name, system, start, module in SYSTEMS:
            if only and only not in name.lower():
                continue
            if module and importlib.util.find_spec(module) is None:
                skipped[name] = f"python package {module!r} not installed (make bench installs it)"
                continue
            chosen.append((name, system, start))
        runs: dict[str, list[Result]] = {name: [] for name, _, _ in chosen}
        for _ in range(rounds):
            for name, system, start in chosen:
                if name in skipped:
                    continue
                try:
                    r = measure(name, system, start, subs, count)
                except SkipSystem as exc:
                    skipped[name] = str(exc)
                    log(f"  skip {name}: {exc}")
                    continue
                runs[name].append(r)
                log(f"  {r.scenario} / {name}: {r.rate:,.0f} msg/s delivered, {r.note}")
        for name, _, _ in chosen:
            if runs[name]:
                results.append(median_round(runs[name]))
    return results, skipped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Pub/sub benchmark clients (run by python -m bench).")
    p.add_argument("role", choices=["sub", "pub"])
    p.add_argument("--system", choices=sorted(PROGRAMS), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    args = p.parse_args(argv)
    sub, pub = PROGRAMS[args.system]
    (sub if args.role == "sub" else pub)(args.port, args.count)


if __name__ == "__main__":
    main()
