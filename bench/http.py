"""The HTTP benchmark (issue 14): the sockstack gateway against FastAPI on uvicorn, with wrk.

**Calls** (scenario ``http``): every server answers ``POST /rpc/add`` with the body
``{"a": 2, "b": 3}`` (bench/http_apps.py): the sockstack gateway (``sockstack serve`` of a
service whose ``add(a: int, b: int) -> int`` is typed as FastAPI's body model), FastAPI +
uvicorn (httptools, uvloop) and a bare ASGI app on that uvicorn (the floor: what the HTTP server
costs before any framework). The load generator is wrk (C, Debian's package), one thread, with
a Lua script (:data:`WRK_SCRIPT`) that sends the request and prints wrk's own figures as JSON
when done: requests, seconds, latency percentiles (µs, per request), errors. Each server is its
own process pinned to CPU 0; wrk runs on CPU 0 too ("same core") or on CPU 1 ("two cores"),
with 1 and 50 keep-alive connections. A server is started once per round and measured in the
four cells after a warm-up; rounds interleave the systems (A B C, A B C, ...) and each row is
its median round (by requests/s). The goals are ratios to FastAPI in the same cell: at least 2x
its requests/s and at most half its p99 (:func:`http_targets`).

**SSE fan-out** (scenario ``sse-fanout``): 100 subscribers of ``GET /topics/bench.%3E/events``
on the gateway (Server-Sent Events from the host's broker) while one publisher sends N 64-byte
JSON messages to ``bench.x`` over sockstack TCP (QoS 0, written all at once). Delivered
messages/s = all events received by all subscribers / time from the first publish to the last
subscriber's last event. Beside it, the same fan-out to 100 sockstack TCP subscribers of the same
server. The clients are raw asyncio sockets in the bench process (uvloop), pinned to CPU 1, the
server to CPU 0: an SSE subscriber counts ``data:`` fields in what it reads, a TCP one counts
bytes (every MSG frame has the same size), so the figure is the server's.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from bench.harness import Result, Server, SkipSystem, median_round, pin, python, spawn
from bench.http_apps import ADD_BODY
from bench.scenarios import ROOT, SAME, SPLIT, Budget, Placement, run_async

if TYPE_CHECKING:
    from bench.runner import Run

__all__ = [
    "CALLS",
    "FANOUT",
    "SYSTEMS",
    "CallsPlan",
    "FanoutPlan",
    "HttpSystem",
    "calls_scenario",
    "http_targets",
    "measure_calls",
    "measure_fanout",
    "run_http",
    "run_sse_fanout",
    "run_wrk",
]

CALLS = "HTTP POST /rpc/add"
"""The calls scenario's name; a row's scenario adds the connections (":func:`calls_scenario`)."""
FANOUT = "pub/sub fan-out 64 B, 1 publisher to 100 subscribers"
GATEWAY = "sockstack gateway"
FASTAPI = "FastAPI + uvicorn"
BARE = "bare ASGI app + uvicorn (msgspec)"
SSE = "sockstack gateway, SSE subscribers"
TCP_SUBS = "sockstack, TCP subscribers"
CONNECTIONS = (1, 50)
PLACEMENTS = (SAME, SPLIT)

WRK_SCRIPT = (
    """\
wrk.method = "POST"
wrk.body = '"""
    + ADD_BODY.decode()
    + """'
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50": %d, "p99": %d, "p999": %d, '
    .. '"max": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""
)
"""wrk's Lua script: the request (the body is :data:`ADD_BODY`), and a ``done`` hook printing
wrk's figures on one line (latencies in µs, as wrk keeps them)."""


def calls_scenario(connections: int) -> str:
    return f"{CALLS}, {connections} connection{'s' if connections > 1 else ''}"


# ----------------------------------------------------------------------------- servers


def _env() -> dict[str, str]:
    """The servers import bench.http_apps: the repository on their path, whatever the cwd."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _listening_ports(proc: subprocess.Popen[bytes]) -> set[int]:
    try:
        conns = psutil.Process(proc.pid).net_connections(kind="tcp4")
    except psutil.Error:
        return set()
    return {int(c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


def start_gateway(cpus: set[int]) -> Server:
    """``sockstack serve bench.http_apps:Calculator`` with TCP, HTTP and the broker; ``port``
    is the HTTP port, ``extra["tcp_port"]`` the TCP one."""
    proc, m = spawn(
        [
            python(),
            "-m",
            "sockstack.cli",
            "--log-level",
            "WARNING",
            "serve",
            "bench.http_apps:Calculator",
            "--tcp",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--broker",
            "--keepalive",
            "0",
            # All the bench's clients share one address (loopback): lift the per-address limits.
            "--max-connections-per-address=100000",
            "--max-handshakes-per-address=100000",
        ],
        cpus,
        ready=r"on http://127\.0\.0\.1:(\d+)",  # printed after the tcp:// line
        env=_env(),
    )
    assert m is not None
    srv = Server(GATEWAY, [proc], int(m.group(1)))
    others = _listening_ports(proc) - {srv.port}
    if len(others) != 1:
        srv.stop()
        raise SkipSystem(f"sockstack serve: no single TCP port besides HTTP ({sorted(others)})")
    srv.extra["tcp_port"] = others.pop()
    return srv


def _start_uvicorn(app: str, module: str) -> Callable[[set[int]], Server]:
    def start(cpus: set[int]) -> Server:
        for needed in (module, "uvicorn", "httptools"):
            if importlib.util.find_spec(needed) is None:
                raise SkipSystem(
                    f"python package {needed!r} not installed (make bench installs it)"
                )
        proc, m = spawn([python(), "-m", "bench.http_apps", app], cpus, env=_env())
        assert m is not None
        return Server(app, [proc], int(m.group(1)))

    return start


def _need_gateway() -> None:
    for needed in ("uvicorn", "httptools"):
        if importlib.util.find_spec(needed) is None:
            raise SkipSystem(
                f"python package {needed!r} not installed: the gateway needs sockstack[http]"
            )


def _gateway(cpus: set[int]) -> Server:
    _need_gateway()
    return start_gateway(cpus)


@dataclass(frozen=True)
class HttpSystem:
    name: str
    start: Callable[[set[int]], Server]


SYSTEMS = [
    HttpSystem(GATEWAY, _gateway),
    HttpSystem(FASTAPI, _start_uvicorn("fastapi", "fastapi")),
    HttpSystem(BARE, _start_uvicorn("asgi", "msgspec")),
]


def check_answer(port: int, seconds: float = 10.0) -> None:
    """One ``POST /rpc/add`` (http.client): the server must answer 200 and ``5``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=seconds)
    try:
        conn.request("POST", "/rpc/add", ADD_BODY, {"content-type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200 or body.strip() != b"5":
        raise SkipSystem(f"POST /rpc/add answered {resp.status} {body[:200]!r}, not 200 5")


# --------------------------------------------------------------------------------- wrk


def wrk_binary() -> str:
    exe = shutil.which("wrk")
    if exe is None:
        raise SkipSystem("wrk is not installed (make bench-deps installs Debian's wrk)")
    return exe


_SCRIPT: Path | None = None


def _script() -> Path:
    global _SCRIPT
    if _SCRIPT is None or not _SCRIPT.exists():
        path = Path(tempfile.mkdtemp(prefix="sockstack-bench-http-")) / "post.lua"
        path.write_text(WRK_SCRIPT)
        _SCRIPT = path
    return _SCRIPT


@dataclass
class WrkRun:
    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    p999_us: float
    errors: dict[str, int]
    cpu_s: float
    """CPU seconds wrk used (user + system)."""

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def run_wrk(port: int, connections: int, seconds: int, cpus: set[int]) -> WrkRun:
    """wrk on ``cpus`` for ``seconds`` (whole seconds: wrk's unit), one thread, against
    ``POST /rpc/add``; bounded by a timeout of its own."""
    args = [
        wrk_binary(),
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(_script()),
        f"http://127.0.0.1:{port}/rpc/add",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        out = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=seconds + 20,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not end within {seconds + 20} s") from None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((s for s in out.stdout.splitlines() if s.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout)[-300:]}")
    d = json.loads(line[8:])
    return WrkRun(
        d["requests"],
        d["duration_us"] / 1e6,
        float(d["p50"]),
        float(d["p99"]),
        float(d["p999"]),
        {k: d[k] for k in ("connect", "read", "write", "status", "timeout") if d[k]},
        (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )


# ------------------------------------------------------------------------------- calls


@dataclass
class CallsPlan:
    seconds: int = 2
    """Of each measured cell (wrk's -d: whole seconds)."""
    warmup: int = 1
    """Seconds of wrk at 50 connections once a server started, before its cells."""
    rounds: int = 3
    cells: tuple[tuple[Placement, int], ...] = tuple(
        (p, c) for p in PLACEMENTS for c in CONNECTIONS
    )

    @classmethod
    def make(cls, quick: bool) -> CallsPlan:
        return cls(seconds=1, warmup=1, rounds=1) if quick else cls()


def _calls_round(system: HttpSystem, plan: CallsPlan, log: Callable[[str], None]) -> list[Result]:
    """One round of one system: its server started on CPU 0, warmed up, measured in every
    cell, stopped."""
    server = system.start(SAME[1])
    out: list[Result] = []
    try:
        check_answer(server.port)
        run_wrk(server.port, 50, plan.warmup, SPLIT[2])
        for placement, connections in plan.cells:
            scpu0 = server.cpu_seconds()
            w = run_wrk(server.port, connections, plan.seconds, placement[2])
            scpu = server.cpu_seconds() - scpu0
            cpu = scpu + w.cpu_s
            r = Result(
                calls_scenario(connections),
                system.name,
                placement[0],
                w.requests,
                w.seconds,
                0,  # no payload column: the body is 16 bytes of JSON, the answer 1
                w.p50_us,
                w.p99_us,
                w.p999_us,
                round(cpu / w.requests * 1e6, 1) if w.requests else None,
                round(server.rss_bytes() / 2**20, 1),
            )
            if w.requests:  # the server's own CPU per request: the figure least moved by load
                r.extra["server_cpu_us_per_call"] = round(scpu / w.requests * 1e6, 1)
            if w.failed:
                r.extra["errors"] = w.errors
                r.note = f"{w.failed:,} errors: {w.errors}"
            out.append(r)
            log(
                f"  {r.scenario} / {system.name} [{placement[0]}]: {r.rate:,.0f} req/s, "
                f"p99 {w.p99_us / 1000:.2f} ms, server CPU "
                f"{r.extra.get('server_cpu_us_per_call', '-')} µs/request"
                + (f", {r.note}" if r.note else "")
            )
    finally:
        server.stop()
    return out


def measure_calls(
    systems: Iterable[HttpSystem],
    plan: CallsPlan,
    log: Callable[[str], None] = print,
    skipped: dict[str, str] | None = None,
) -> list[Result]:
    """Every system in every cell of ``plan``, rounds interleaved; the median round of each
    (system, cell), with the ratios to FastAPI in the same cell on the other rows."""
    skipped = {} if skipped is None else skipped
    wrk_binary()  # no wrk: the whole scenario is skipped, with the reason
    chosen = list(systems)
    rounds: dict[tuple[str, str, str], list[Result]] = {}
    for _ in range(plan.rounds):
        for system in chosen:
            if system.name in skipped:
                continue
            try:
                rows = _calls_round(system, plan, log)
            except SkipSystem as exc:
                skipped[system.name] = str(exc)
                log(f"  skip {system.name}: {exc}")
                continue
            except Exception as exc:  # a server that breaks must not end the whole run
                skipped[system.name] = f"failed: {type(exc).__name__}: {exc}"
                log(f"  {system.name}: failed: {exc}")
                continue
            for r in rows:
                rounds.setdefault((r.scenario, r.placement, r.system), []).append(r)
    results = [median_round(rs) for rs in rounds.values()]
    _add_ratios(results)
    return results


def _add_ratios(results: list[Result]) -> None:
    """On every row but FastAPI's: ``vs_fastapi_rate`` (its requests/s / FastAPI's) and
    ``vs_fastapi_p99`` (its p99 / FastAPI's), FastAPI in the same cell."""
    peers = {(r.scenario, r.placement): r for r in results if r.system == FASTAPI}
    for r in results:
        peer = peers.get((r.scenario, r.placement))
        if peer is None or r is peer or not peer.rate:
            continue
        r.extra["vs_fastapi_rate"] = round(r.rate / peer.rate, 2)
        if r.p99_us and peer.p99_us:
            r.extra["vs_fastapi_p99"] = round(r.p99_us / peer.p99_us, 2)


def http_targets(results: Iterable[Result]) -> list[tuple[str, float | None, float, bool]]:
    """Issue 14's goals as (what, measured ratio or None, goal, higher is better), one pair per
    cell: the gateway's requests/s / FastAPI's (>= 2) and its p99 / FastAPI's (<= 0.5)."""
    rows = {(r.scenario, r.placement, r.system): r for r in results}
    out: list[tuple[str, float | None, float, bool]] = []
    for connections in CONNECTIONS:
        scenario = calls_scenario(connections)
        for placement, _, _ in PLACEMENTS:
            ss = rows.get((scenario, placement, GATEWAY))
            ok = ss is not None and (scenario, placement, FASTAPI) in rows
            head = f"{scenario}, {placement}: sockstack gateway / FastAPI"
            out.append(
                (f"{head} req/s", ss.extra.get("vs_fastapi_rate") if ok and ss else None, 2.0, True)
            )
            out.append(
                (f"{head} p99", ss.extra.get("vs_fastapi_p99") if ok and ss else None, 0.5, False)
            )
    return out


def run_http(run: Run, budget: Budget, only: str) -> None:
    """The ``http`` scenario of ``python -m bench``."""
    plan = CallsPlan.make(run.quick)
    chosen = [s for s in SYSTEMS if not (only and only not in s.name.lower())]
    try:
        run.results += measure_calls(chosen, plan, run.log, run.skipped)
    except SkipSystem as exc:
        for s in chosen:
            run.skipped[s.name] = str(exc)
        run.log(f"  skip the HTTP rows: {exc}")
        return
    for what, ratio, goal, higher in http_targets(run.results):
        shown = "-" if ratio is None else f"{ratio:.2f}"
        run.log(f"  {what}: {shown} (goal {'>=' if higher else '<='} {goal})")


# ----------------------------------------------------------------------------- fan-out

TOPIC = "bench.x"
PATTERN = "bench.>"
PAYLOAD = json.dumps({"v": "p" * 56}, separators=(",", ":")).encode()  # 64 bytes of JSON
assert len(PAYLOAD) == 64
JSON_CODEC = 2
_DATA = b"data:"
IDLE = 2.0  # seconds without a new event after which a fan-out stops waiting (loss)


@dataclass
class FanoutPlan:
    subscribers: int = 100
    messages: int = 10_000
    """Published, each delivered to every subscriber (a million deliveries: ~2 s here)."""
    rounds: int = 3
    cap: float = 60.0
    """Seconds a fan-out may take at most (then what arrived counts)."""

    @classmethod
    def make(cls, quick: bool) -> FanoutPlan:
        return cls(messages=1_000, rounds=1, cap=20.0) if quick else cls()


@dataclass
class _Tally:
    """What the subscribers of one fan-out received, shared by their protocols."""

    want: int
    subscribers: int
    received: int = 0
    finished: int = 0
    last: float = 0.0
    """perf_counter of the last event any subscriber received."""
    ready: int = 0
    all_ready: asyncio.Event = field(default_factory=asyncio.Event)
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str = ""

    def got(self, n: int, total: int) -> None:
        self.received += n
        self.last = time.perf_counter()
        if total >= self.want and total - n < self.want:
            self.finished += 1
            if self.finished >= self.subscribers:
                self.all_done.set()

    def is_ready(self) -> None:
        self.ready += 1
        if self.ready >= self.subscribers:
            self.all_ready.set()

    def fail(self, why: str) -> None:
        self.failure = self.failure or why
        self.all_ready.set()
        self.all_done.set()


class _SseSubscriber(asyncio.Protocol):
    """One SSE subscriber: sends the GET, reads the response head, then counts ``data:``
    fields (no parsing: a count over each read, keeping the last 4 bytes for a field split
    between reads; ``data:`` cannot overlap itself, so nothing counts twice)."""

    def __init__(self, request: bytes, tally: _Tally) -> None:
        self.request, self.tally = request, tally
        self.head = b""
        self.streaming = False
        self.tail = b""
        self.count = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.streaming:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    self.tally.fail("an SSE response head over 64 KiB")
                return
            status = self.head.split(b"\r\n", 1)[0]
            if b" 200 " not in status + b" ":
                self.tally.fail(
                    f"GET /topics/.../events answered {status.decode(errors='replace')}"
                )
                return
            data = self.head[end + 4 :]
            self.streaming = True
            self.tally.is_ready()
        buf = self.tail + data
        n = buf.count(_DATA)
        self.tail = buf[-4:]
        if n:
            self.count += n
            self.tally.got(n, self.count)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.count < self.tally.want and not self.tally.all_done.is_set():
            self.tally.fail(f"an SSE subscriber was closed after {self.count} events: {exc}")


class _TcpSubscriber(asyncio.Protocol):
    """One sockstack TCP subscriber on raw frames: HELLO and SUB, frames read one by one until
    the SUB's RESPONSE, then every byte counted (each MSG frame has the same size)."""

    def __init__(self, hello: bytes, sub: bytes, msg_size: int, tally: _Tally) -> None:
        self.first = hello + sub
        self.msg_size, self.tally = msg_size, tally
        self.buf = b""
        self.subscribed = False
        self.bytes = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.first)

    def data_received(self, data: bytes) -> None:
        if self.subscribed:
            before = self.bytes // self.msg_size
            self.bytes += len(data)
            n = self.bytes // self.msg_size - before
            if n:
                self.tally.got(n, self.bytes // self.msg_size)
            return
        from sockstack.protocol.frames import HEADER_SIZE, MessageType, declared_size

        self.buf += data
        while True:
            size = declared_size(self.buf)
            if size is None:
                if len(self.buf) >= HEADER_SIZE:
                    self.tally.fail("a TCP subscriber read something that is no sockstack frame")
                return
            if len(self.buf) < size:
                return
            kind = self.buf[3]
            self.buf = self.buf[size:]
            if kind == MessageType.ERROR or kind == MessageType.CLOSE:
                self.tally.fail("the SUB was refused or the session closed")
                return
            if kind == MessageType.RESPONSE:
                self.subscribed = True
                self.tally.is_ready()
                rest, self.buf = self.buf, b""
                if rest:
                    self.data_received(rest)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.tally.all_done.is_set():
            self.tally.fail(f"a TCP subscriber was closed: {exc}")


class _Publisher(asyncio.Protocol):
    def __init__(self, hello: bytes, welcomed: asyncio.Future[None]) -> None:
        self.hello, self.welcomed = hello, welcomed

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.hello)

    def data_received(self, data: bytes) -> None:
        if not self.welcomed.done():
            self.welcomed.set_result(None)  # WELCOME (nothing else comes: QoS 0)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _fanout(server: Server, sse: bool, plan: FanoutPlan) -> tuple[int, float, str]:
    """One fan-out: subscribers connected and subscribed, then every message published at
    once; (events received by all, seconds to the last one, a failure or "")."""
    from sockstack.protocol.messages import Hello, encode_hello
    from sockstack.pubsub.messages import encode_msg, encode_pub, encode_sub

    loop = asyncio.get_running_loop()
    tally = _Tally(plan.messages, plan.subscribers)
    hello = encode_hello(Hello(agent="bench"))
    tcp_port = server.extra["tcp_port"]
    transports: list[Any] = []
    factory: Callable[[], asyncio.Protocol]
    if sse:
        path = "/topics/" + PATTERN.replace(">", "%3E") + "/events"
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        port = server.port
        factory = lambda: _SseSubscriber(request, tally)  # noqa: E731
    else:
        sub = encode_sub(1, PATTERN)
        size = len(encode_msg(0, 1, TOPIC.encode(), PAYLOAD, JSON_CODEC))
        port = tcp_port
        factory = lambda: _TcpSubscriber(hello, sub, size, tally)  # noqa: E731
    try:
        for _ in range(plan.subscribers):
            t, _ = await loop.create_connection(factory, "127.0.0.1", port)
            transports.append(t)
        if not await _wait(tally.all_ready, 20.0):
            raise RuntimeError(f"{tally.ready} of {plan.subscribers} subscribers ready in 20 s")
        if tally.failure:  # refused (no SSE endpoint on this server yet?): no row
            raise SkipSystem(tally.failure)
        await _wait_subscriptions(tcp_port, plan.subscribers)
        welcomed: asyncio.Future[None] = loop.create_future()
        pub_t, _ = await loop.create_connection(
            lambda: _Publisher(hello, welcomed), "127.0.0.1", tcp_port
        )
        transports.append(pub_t)
        await asyncio.wait_for(welcomed, 10.0)
        frames = encode_pub(TOPIC, PAYLOAD, 0, JSON_CODEC) * plan.messages
        start = time.perf_counter()
        pub_t.write(frames)
        deadline = start + plan.cap
        while not tally.all_done.is_set():  # bounded: the cap, or IDLE seconds of silence
            now = time.perf_counter()
            if now > deadline or now - max(tally.last, start) > IDLE:
                break
            await _wait(tally.all_done, 0.25)
        return tally.received, max(tally.last - start, 1e-9), tally.failure
    finally:
        for t in transports:
            t.close()


async def _wait_subscriptions(tcp_port: int, n: int) -> None:
    """Until the broker holds ``n`` subscriptions (``broker.stats``; bounded: 10 s): an SSE
    response may start before its subscription is in place."""
    from sockstack import AsyncClient

    async with AsyncClient(f"tcp://127.0.0.1:{tcp_port}", timeout=10) as c:
        deadline = time.monotonic() + 10.0
        while True:
            stats = await c.call("broker.stats")
            if stats["subscriptions"] >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker has {stats['subscriptions']} of {n} subscriptions")
            await asyncio.sleep(0.02)  # polling the server's own count; bounded above


def _fanout_row(name: str, server: Server, sse: bool, plan: FanoutPlan) -> Result:
    saved = os.sched_getaffinity(0)
    pin(SPLIT[2])
    try:
        cpu0, scpu0 = time.process_time(), server.cpu_seconds()
        received, seconds, failure = run_async(_fanout(server, sse, plan))
        cpu = time.process_time() - cpu0 + server.cpu_seconds() - scpu0
    finally:
        pin(saved)
    want = plan.messages * plan.subscribers
    r = Result(
        FANOUT,
        name,
        SPLIT[0],
        received,
        seconds,
        64,
        cpu_s_per_m=round(cpu / received * 1e6, 1) if received else None,
        peak_rss_mb=round(server.rss_bytes() / 2**20, 1),
    )
    lost = want - received
    r.extra["loss"] = lost
    r.extra["published"] = plan.messages
    r.extra["subscribers"] = plan.subscribers
    r.note = f"{lost:,} lost of {want:,}" if lost else "no loss"
    if failure:
        r.note += f"; {failure}"
        r.extra["failure"] = failure
    return r


def measure_fanout(
    plan: FanoutPlan,
    log: Callable[[str], None] = print,
    only: str = "",
    skipped: dict[str, str] | None = None,
) -> list[Result]:
    """The SSE fan-out and the TCP one, rounds interleaved, a fresh server each time; each row
    is its median round (messages/s delivered: ``calls`` counts deliveries)."""
    skipped = {} if skipped is None else skipped
    cases = [(SSE, True), (TCP_SUBS, False)]
    cases = [c for c in cases if not (only and only not in c[0].lower())]
    rounds: dict[str, list[Result]] = {name: [] for name, _ in cases}
    for _ in range(plan.rounds):
        for name, sse in cases:
            if name in skipped:
                continue
            try:
                server = _gateway(SPLIT[1])
            except SkipSystem as exc:
                skipped[name] = str(exc)
                log(f"  skip {name}: {exc}")
                continue
            try:
                r = _fanout_row(name, server, sse, plan)
            except SkipSystem as exc:
                skipped[name] = str(exc)
                log(f"  skip {name}: {exc}")
                continue
            except Exception as exc:  # a fan-out that breaks must not end the whole run
                skipped[name] = f"failed: {type(exc).__name__}: {exc}"
                log(f"  {name}: failed: {exc}")
                continue
            finally:
                server.stop()
            rounds[name].append(r)
            log(f"  {FANOUT} / {name}: {r.rate:,.0f} msg/s delivered, {r.note}")
    return [median_round(rs) for rs in rounds.values() if rs]


def run_sse_fanout(run: Run, budget: Budget, only: str) -> None:
    """The ``sse-fanout`` scenario of ``python -m bench``."""
    run.results += measure_fanout(FanoutPlan.make(run.quick), run.log, only, run.skipped)
