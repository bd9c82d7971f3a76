"""Publish/subscribe benchmark: one publisher to 1 and to 10 subscribers, each its own process,
64-byte payloads at QoS 0 over TCP, for sockstack and the systems a user would pick instead
(NATS with nats-py, Redis pub/sub with redis-py, pyzmq PUB/SUB, MQTT with mosquitto and paho).

Each subscriber prints ``ready`` once its subscription is in place (sockstack, NATS, Redis and
MQTT confirm it; ZeroMQ cannot, so its publisher waits half a second: the "slow joiner"), then
counts messages until it has them all or hears nothing for 2 s, and prints its count and the
time of its last message. Every publisher connects (ZeroMQ's binds), says ``bound`` and waits
for the bench's go, so no system's process start-up is in its time. Delivered messages/s = all
messages received / (last receipt - go); loss = published x subscribers - received. CPU per
million delivered messages is the CPU time (user + system, all threads) of the
publisher from go to its last publish, of each subscriber from ``ready`` to its last message,
and of the server's processes (psutil) from go to the end, together, divided by the messages
delivered.

Latency at a fixed rate (``--rate``, 10,000 and 100,000 msg/s, 1 publisher to 1 subscriber,
sockstack, NATS and Redis): the publisher sends a batch every millisecond, as many as the rate
owes by then, each 64-byte payload starting with its send time (``time.perf_counter_ns``:
CLOCK_MONOTONIC, one clock for every process of the machine); the subscriber subtracts it from
its receipt time. p50/p99 over all but the first tenth of the messages (warm-up); the
publisher's achieved rate and the loss are in the row's note.

    python -m bench.pubsub sub --system sockstack --port 5052 --count 1000
    python -m bench.pubsub pub --system sockstack --port 5052 --count 1000
    python -m bench.pubsub sub --system nats --port 4222 --count 10000 --rate 10000
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
    stats,
    wait_port,
)

__all__ = ["LATENCY_RATES", "SYSTEMS", "latency_scenario", "run_pubsub"]

PAYLOAD = b"p" * 64
IDLE = 2.0  # seconds of silence after which a subscriber stops counting
TOPIC = "bench.x"
LATENCY_RATES = (10_000, 100_000)
LATENCY_SYSTEMS = ("sockstack", "nats", "redis")
TICK = 0.001  # the paced publisher sends a batch each millisecond
_STAMP = struct.Struct("<q")
_PAD = PAYLOAD[_STAMP.size :]


def latency_scenario(rate: int) -> str:
    return f"pub/sub 64 B latency at {rate:,} msg/s, 1 publisher to 1 subscriber"


def _cpu() -> float:
    """This process's CPU seconds (user + system, every thread; CLOCK_PROCESS_CPUTIME_ID, to
    the nanosecond: os.times counts 10 ms ticks)."""
    return time.process_time()


def _stamped() -> bytes:
    return _STAMP.pack(time.perf_counter_ns()) + _PAD


class _Sink:
    """What a subscriber counts: messages, the last receipt, its CPU since ``ready``, and with
    ``rate`` each message's latency (receipt - the send time in its first 8 bytes)."""

    def __init__(self, count: int, rate: int) -> None:
        self.count = count
        self.rate = rate
        self.received = 0
        self.first = self.last = 0.0
        self.lat: list[int] = []
        self.cpu0 = 0.0

    def ready(self) -> None:
        self.cpu0 = _cpu()
        print("ready", flush=True)

    def one(self, data: bytes) -> bool:
        """Count one message; True when all have come."""
        if self.rate:
            self.lat.append(time.perf_counter_ns() - _STAMP.unpack_from(data)[0])
        self.received += 1
        self.last = time.time()
        if not self.first:
            self.first = self.last
        return self.received >= self.count

    def report(self) -> None:
        out: dict[str, Any] = {
            "received": self.received,
            "first": self.first,
            "last": self.last,
            "cpu": _cpu() - self.cpu0,
        }
        if self.rate:
            p50, p99, _ = stats(self.lat[len(self.lat) // 10 :])  # the first tenth: warm-up
            out.update(p50=p50, p99=p99)
        print("result " + json.dumps(out), flush=True)


def _go() -> float:
    """A publisher is connected (ZeroMQ: bound): say so and wait for the bench's go, so that
    no system's start-up counts in its time; returns the CPU clock at the start."""
    print("bound", flush=True)
    sys.stdin.readline()
    return _cpu()


def _published(cpu0: float, sent: int, seconds: float) -> None:
    out = {"cpu": _cpu() - cpu0, "sent": sent, "seconds": seconds}
    print("published " + json.dumps(out), flush=True)


async def _pace(publish: Callable[[bytes], Any], count: int, rate: int) -> float:
    """Publish ``count`` stamped payloads at ``rate`` per second (a batch each millisecond,
    as many as are due by then); the seconds from the first publish to the last."""
    sent = 0
    t0 = time.perf_counter()
    while True:
        due = min(count, int((time.perf_counter() - t0) * rate) + 1)
        while sent < due:
            await publish(_stamped())
            sent += 1
        if sent >= count:
            return time.perf_counter() - t0
        await asyncio.sleep(TICK)


# ---------------------------------------------------------------------------------- sockstack


async def _ss_sub(port: int, count: int, rate: int) -> None:
    from sockstack import AsyncClient

    sink = _Sink(count, rate)
    done = asyncio.Event()

    def on_message(msg: Any) -> None:
        if sink.one(msg.value if rate else b""):
            done.set()

    async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=30) as c:
        await c.subscribe("bench.>", callback=on_message)
        sink.ready()
        await _wait_done(done, lambda: sink.last)
    sink.report()


async def _wait_done(done: asyncio.Event, last: Callable[[], float]) -> None:
    start = time.time()
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), 0.25)
        except TimeoutError:
            since = last() or start
            if time.time() - since > IDLE and (last() or time.time() - start > 60):
                return


async def _ss_pub(port: int, count: int, rate: int) -> None:
    from sockstack import AsyncClient

    async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=30) as c:
        cpu0 = _go()
        t0 = time.perf_counter()
        if rate:
            seconds = await _pace(lambda data: c.publish(TOPIC, data), count, rate)
        else:
            for i in range(count):
                await c.publish(TOPIC, PAYLOAD)
                if i % 256 == 255:
                    await asyncio.sleep(0)  # let the loop write what was queued
            seconds = time.perf_counter() - t0
        await c.ping()  # everything before the PING has left
        _published(cpu0, count, seconds)


# --------------------------------------------------------------------------------------- NATS


async def _nats_sub(port: int, count: int, rate: int) -> None:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}", pending_size=512 * 1024 * 1024)
    sink = _Sink(count, rate)
    done = asyncio.Event()

    async def on_message(msg: Any) -> None:
        if sink.one(msg.data):
            done.set()

    await nc.subscribe("bench.>", cb=on_message, pending_msgs_limit=10_000_000)
    await nc.flush()
    sink.ready()
    await _wait_done(done, lambda: sink.last)
    await nc.close()
    sink.report()


async def _nats_pub(port: int, count: int, rate: int) -> None:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    cpu0 = _go()
    t0 = time.perf_counter()
    if rate:
        seconds = await _pace(lambda data: nc.publish(TOPIC, data), count, rate)
    else:
        for i in range(count):
            await nc.publish(TOPIC, PAYLOAD)
            if i % 256 == 255:
                await asyncio.sleep(0)
        seconds = time.perf_counter() - t0
    await nc.flush()
    _published(cpu0, count, seconds)
    await nc.close()


# -------------------------------------------------------------------------------------- Redis


def _redis_sub(port: int, count: int, rate: int) -> None:
    import redis

    r = redis.Redis(port=port)
    ps = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    ps.subscribe(TOPIC)
    while ps.get_message(timeout=1.0) is None and not ps.subscribed:
        pass
    sink = _Sink(count, rate)
    sink.ready()
    while True:
        msg = ps.get_message(timeout=IDLE)
        if msg is None:
            if sink.received:
                break
            continue
        if sink.one(msg["data"]):
            break
    sink.report()


def _redis_pub(port: int, count: int, rate: int) -> None:
    import redis

    r = redis.Redis(port=port)
    pipe = r.pipeline(transaction=False)
    r.ping()  # connected
    cpu0 = _go()
    t0 = time.perf_counter()
    if rate:  # a pipeline per millisecond's batch: what a redis-py publisher at this rate does
        sent = 0
        while True:
            due = min(count, int((time.perf_counter() - t0) * rate) + 1)
            while sent < due:
                pipe.publish(TOPIC, _stamped())
                sent += 1
            pipe.execute()
            if sent >= count:
                break
            time.sleep(TICK)  # the pace of a paced publisher, not synchronisation
    else:
        for i in range(count):
            pipe.publish(TOPIC, PAYLOAD)
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
    _published(cpu0, count, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------- ZeroMQ


def _zmq_sub(port: int, count: int, rate: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"bench.")
    sock.connect(f"tcp://127.0.0.1:{port}")
    sink = _Sink(count, rate)
    sink.ready()
    sock.setsockopt(zmq.RCVTIMEO, int(IDLE * 1000))
    while True:
        try:
            sock.recv()
        except zmq.Again:
            if sink.received:
                break
            continue
        if sink.one(b""):
            break
    sock.close(linger=0)
    ctx.term()
    sink.report()


def _zmq_pub(port: int, count: int, rate: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    cpu0 = _go()  # (the bench says go once the subscribers had time to join)
    t0 = time.perf_counter()
    msg = TOPIC.encode() + b" " + PAYLOAD
    for _ in range(count):
        sock.send(msg)
    seconds = time.perf_counter() - t0
    sock.close(linger=10_000)
    ctx.term()
    _published(cpu0, count, seconds)


# --------------------------------------------------------------------------------------- MQTT


def _mqtt_sub(port: int, count: int, rate: int) -> None:
    import paho.mqtt.client as mqtt

    sink = _Sink(count, rate)
    subscribed = threading.Event()
    done = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        if sink.one(b""):
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # type: ignore[attr-defined]
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe("bench/#", qos=0)
    client.loop_start()
    subscribed.wait(10)
    sink.ready()
    start = time.time()
    while not done.wait(0.25):
        since = sink.last or start
        if time.time() - since > IDLE and (sink.last or time.time() - start > 60):
            break
    client.loop_stop()
    sink.report()


def _mqtt_pub(port: int, count: int, rate: int) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # type: ignore[attr-defined]
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    cpu0 = _go()
    t0 = time.perf_counter()
    info = None
    for _ in range(count):
        info = client.publish("bench/x", PAYLOAD, qos=0)
    if info is not None:
        info.wait_for_publish(30)
    seconds = time.perf_counter() - t0
    client.loop_stop()
    client.disconnect()
    _published(cpu0, count, seconds)


# ------------------------------------------------------------------------------------ systems

Program = Callable[[int, int, int], Any]
PROGRAMS: dict[str, tuple[Program, Program]] = {
    "sockstack": (
        lambda p, n, r: asyncio.run(_ss_sub(p, n, r)),
        lambda p, n, r: asyncio.run(_ss_pub(p, n, r)),
    ),
    "nats": (
        lambda p, n, r: asyncio.run(_nats_sub(p, n, r)),
        lambda p, n, r: asyncio.run(_nats_pub(p, n, r)),
    ),
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


def _client(role: str, system: str, port: int, count: int, rate: int = 0) -> subprocess.Popen[str]:
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
            "--rate",
            str(rate),
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


def _run(
    system: str, start: Callable[[set[int]], Server], subs: int, count: int, rate: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any], float, float]:
    """One run: the subscribers' results, the publisher's, the server's CPU seconds while
    messages flowed, and when publishing began (time.time)."""
    server = start({0, 1})
    procs: list[subprocess.Popen[str]] = []
    try:
        publisher = None
        if system == "zmq":  # the publisher binds; subscribers connect to it
            publisher = _client("pub", system, server.port, count, rate)
            procs.append(publisher)
            _read_line(publisher, "bound", 20)
        subscribers = [_client("sub", system, server.port, count, rate) for _ in range(subs)]
        procs += subscribers
        for s in subscribers:
            _read_line(s, "ready", 30)
        if publisher is None:
            publisher = _client("pub", system, server.port, count, rate)
            procs.append(publisher)
            _read_line(publisher, "bound", 30)
        else:
            time.sleep(0.5)  # ZeroMQ cannot confirm subscriptions (the "slow joiner")
        # Every publisher is connected and waits: its start-up is not counted (the same for all).
        server_cpu0 = server.cpu_seconds()
        began = time.time()
        assert publisher.stdin is not None
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        results = [json.loads(_read_line(s, "result", 120)[7:]) for s in subscribers]
        published = json.loads(_read_line(publisher, "published", 60)[10:])
        server_cpu = server.cpu_seconds() - server_cpu0
        publisher.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()
        server.stop()
    return results, published, server_cpu, began


def _cpu_per_million(
    r: Result, results: list[dict[str, Any]], published: dict[str, Any], server_cpu: float
) -> None:
    """Client + server CPU seconds per million delivered messages, and its parts in extra."""
    subs_cpu = sum(x["cpu"] for x in results)
    total = published["cpu"] + server_cpu + subs_cpu
    if r.calls:
        r.cpu_s_per_m = round(total / r.calls * 1e6, 2)
    r.extra["cpu_s"] = {
        "publisher": round(published["cpu"], 3),
        "server": round(server_cpu, 3),
        "subscribers": round(subs_cpu, 3),
    }


def measure(
    name: str, system: str, start: Callable[[set[int]], Server], subs: int, count: int
) -> Result:
    results, published, server_cpu, began = _run(system, start, subs, count)
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
    _cpu_per_million(r, results, published, server_cpu)
    lost = count * subs - received
    r.extra["loss"] = lost
    r.note = f"{lost:,} lost of {count * subs:,}" if lost else "no loss"
    return r


def measure_latency(
    name: str, system: str, start: Callable[[set[int]], Server], rate: int, count: int
) -> Result:
    """Publish-to-delivery latency at ``rate`` messages/s, 1 publisher to 1 subscriber."""
    results, published, server_cpu, _ = _run(system, start, 1, count, rate)
    res = results[0]
    received = res["received"]
    achieved = published["sent"] / max(published["seconds"], 1e-9)
    r = Result(
        latency_scenario(rate),
        name,
        "two cores, unpinned",
        received,
        max(published["seconds"], 1e-9),  # the publisher's span: calls/s is what it kept up
        64,
        p50_us=res.get("p50"),
        p99_us=res.get("p99"),
    )
    _cpu_per_million(r, results, published, server_cpu)
    lost = count - received
    r.extra.update(loss=lost, rate=rate, achieved_rate=round(achieved))
    kept = "rate kept" if achieved >= 0.95 * rate else "rate NOT kept"
    r.note = f"{kept}: published {achieved:,.0f} msg/s; " + (
        f"{lost:,} lost of {count:,}" if lost else "no loss"
    )
    return r


def _median_latency(rounds: list[Result]) -> Result:
    """The round with the median p99 (every round's p50 and p99 kept in ``extra``)."""
    ordered = sorted(rounds, key=lambda r: r.p99_us or 0.0)
    pick = ordered[(len(ordered) - 1) // 2]
    if len(rounds) > 1:
        pick.extra["round_p50_us"] = [r.p50_us for r in rounds]
        pick.extra["round_p99_us"] = [r.p99_us for r in rounds]
    return pick


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
    chosen = []
    for name, system, start, module in SYSTEMS:
        if only and only not in name.lower():
            continue
        if module and importlib.util.find_spec(module) is None:
            skipped[name] = f"python package {module!r} not installed (make bench installs it)"
            continue
        chosen.append((name, system, start))
    for subs, count in ((1, 20_000 if quick else 200_000), (10, 2_000 if quick else 30_000)):
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
                log(
                    f"  {r.scenario} / {name}: {r.rate:,.0f} msg/s delivered, "
                    f"{r.cpu_s_per_m} CPU s per million, {r.note}"
                )
        for name, _, _ in chosen:
            if runs[name]:
                results.append(median_round(runs[name]))
    seconds = 1.0 if quick else 1.5  # of publishing, per row
    for rate in LATENCY_RATES:
        lat_runs: dict[str, list[Result]] = {}
        for _ in range(rounds):
            for name, system, start in chosen:
                if system not in LATENCY_SYSTEMS or name in skipped:
                    continue
                try:
                    r = measure_latency(name, system, start, rate, int(rate * seconds))
                except SkipSystem as exc:
                    skipped[name] = str(exc)
                    log(f"  skip {name}: {exc}")
                    continue
                lat_runs.setdefault(name, []).append(r)
                log(
                    f"  {r.scenario} / {name}: p50 {r.p50_us} µs, p99 {r.p99_us} µs, "
                    f"{r.cpu_s_per_m} CPU s per million, {r.note}"
                )
        for name, _, _ in chosen:
            if lat_runs.get(name):
                results.append(_median_latency(lat_runs[name]))
    return results, skipped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Pub/sub benchmark clients (run by python -m bench).")
    p.add_argument("role", choices=["sub", "pub"])
    p.add_argument("--system", choices=sorted(PROGRAMS), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=int, default=0, help="messages/s, stamped (0: flood)")
    args = p.parse_args(argv)
    sub, pub = PROGRAMS[args.system]
    (sub if args.role == "sub" else pub)(args.port, args.count, args.rate)


if __name__ == "__main__":
    main()
