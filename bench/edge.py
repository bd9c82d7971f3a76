"""The edge benchmark (issue 15): device readings into a relay, beside raw SQLite, forwarding a
backlog to the sink, and the example pipeline's reduction.

**Ingest** (scenario :data:`INGEST`): 100 devices (streams ``dev0``..``dev99``) each send
readings ``{"temp": 21.5}`` as DATA frames, numbered (epoch, seq), over one sockstack TCP
session to ``sockstack edge --store FILE --listen tcp://...`` (no pipeline: one stored row per
reading). The relay is its own process pinned to CPU 0 (its event loop and its SQLite writer
thread share that core); the device load is this process, pinned to CPU 1: an asyncio protocol
that speaks the session itself (HELLO, then DATA frames, RESPONSEs counted by request id) and
keeps a window of :attr:`EdgePlan.window` acknowledgements outstanding. Rows:

- *sockstack relay, on-disk ack*: each DATA asks for level 2; a reading counts once the relay
  answers that it is committed and fsync'd (group commit: ``synchronous=FULL``, WAL). 4000 in
  flight: the relay's top rate (it takes a whole core; the device load about a tenth of one).
- *sockstack relay, on-disk ack, one in flight per device*: the same with 100 in flight, as
  100 devices that each wait for their acknowledgement before sending again (``Device.send``):
  a group commit then carries at most 100 rows, and the fsync's latency counts.
- *sockstack relay, in-memory ack*: level 1 (answered once staged for the next commit).
- *sockstack relay, no ack*: request id 0 (no answer), sent as fast as TCP takes them; then one
  reading asking for level 2, whose answer says that everything before it is committed. The
  rate counts what the relay committed (its ``edge.stats`` before and after), not what was sent.
- *raw SQLite*: the same rows (what the relay stores for those readings: id, stream, seq, time,
  msgpack body, CRC-32 by ``records.row_crc``, added) built and inserted with ``executemany``,
  each batch one transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``), WAL + ``synchronous=FULL``:
  one fsync per batch, in this process pinned to CPU 0, in a file on the file system the relay's
  store is on (a temporary directory under ``bench/results/tmp``, removed after). Batches of
  the size the relay's group commits reached in the run just before (rows committed / commits
  during the timed part of each on-disk run: like with like, the same number of fsyncs per
  row), and of 1000.

Rounds interleave the rows (relay on disk, raw at its batch size, raw 1000, relay one in flight
per device, raw at its batch size, relay in memory, relay no ack; again), each row keeps its
median round; every measurement starts after
``os.sync()``, so that no earlier run's dirty pages are written back during it (without it the
raw row right after a relay ran measured half its rate).

The goal (:func:`edge_targets`): the relay's on-disk rate at least half the raw rate at the
relay's batch size, at the top rate (the figure the goal is about) and one in flight per
device. Each row's CPU column is the relay's (or the raw loop's) CPU seconds per million
readings; the load generator's own CPU share is in the note (it must stay well under a core, or
the figure would be the load generator's).

**Forward** (scenario :data:`FORWARD`): the relay takes :attr:`EdgePlan.backlog` readings with
no upstream (the readings wait in its outbox), stops, and starts again with ``--upstream`` at
``sockstack serve --sink FILE`` (pinned to CPU 1). Rows/s = rows acknowledged by the sink / the
time the relay's ``forward.rows`` took to reach the backlog, read from its ``edge.stats`` every
10 ms from the first reading after it started (batches of 1000 rows, one in flight: the relay's
defaults). The sink's file is counted afterwards: it must hold the backlog, each row once. The
CPU column is the relay's and the sink's together.

**Reduction** (scenario :data:`REDUCTION`): ``examples/edge_pipeline.py``'s ``build()`` in this
process, fed 60 s of event time from 100 devices (one reading a second each in quick mode, ten
in a full run), then ticked past the last window: messages and bytes in vs out, counted as the
relay counts them (``edge status``: both as stored rows, stream + body + the row overhead).
Timed too (readings/s through the pipeline alone, one core).

    python -m bench --scenario edge [--quick]
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from bench.harness import Result, Server, SkipSystem, median_round, pin, python, spawn
from bench.scenarios import ROOT, run_async

if TYPE_CHECKING:
    from bench.runner import Run
    from bench.scenarios import Budget

__all__ = [
    "FORWARD",
    "INGEST",
    "RAW_1000",
    "RAW_PACED",
    "RAW_RELAY",
    "REDUCTION",
    "RELAY_DISK",
    "RELAY_MEMORY",
    "RELAY_NONE",
    "RELAY_PACED",
    "EdgePlan",
    "edge_targets",
    "measure_forward",
    "measure_ingest",
    "measure_reduction",
    "run_edge",
]

DEVICES = 100
INGEST = f"edge ingest, {DEVICES} devices, one TCP session (readings/s)"
FORWARD = "edge forward, a backlog to the sink (rows/s)"
REDUCTION = "edge pipeline, examples/edge_pipeline.py (readings/s in-process)"
RELAY_DISK = "sockstack relay, on-disk ack"
RELAY_MEMORY = "sockstack relay, in-memory ack"
RELAY_NONE = "sockstack relay, no ack (rows committed)"
RAW_RELAY = "raw SQLite, batches as the relay's group commits"
RAW_1000 = "raw SQLite, batches of 1000"
RELAY_PACED = "sockstack relay, on-disk ack, one in flight per device"
RAW_PACED = "raw SQLite, batches as the relay's group commits, one in flight per device"
BATCH = 100
RELAY_BATCHED = f"sockstack relay, on-disk ack, READINGS frames of {BATCH}"
RAW_BATCHED = "raw SQLite, batches as the relay's group commits, READINGS frames"
RELAY_FORWARD = "sockstack relay -> sink (SQLite)"
PIPELINE = "examples/edge_pipeline.py"
VALUE = {"temp": 21.5}
TWO = ("two cores", {0}, {1})  # the relay (or raw loop) on CPU 0, the device load on CPU 1
RESPONSE, ERROR, WELCOME, CLOSE = 0x04, 0x05, 0x02, 0x08


@dataclass(frozen=True)
class EdgePlan:
    readings: int = 20_000
    """Timed readings per ingest row."""
    warmup: int = 2_000
    """Readings before the timed ones (imports, caches, the first commits)."""
    window: int = 4_000
    """Acknowledgements outstanding at once (the acked rows)."""
    backlog: int = 10_000
    """Rows in the outbox when forwarding starts."""
    per_device_rate: int = 1
    """Readings a second per device in the reduction run (60 s of event time)."""
    rounds: int = 1
    cap: float = 60.0
    """Seconds one measurement may take at most (then it fails, reported as skipped)."""

    @classmethod
    def make(cls, quick: bool) -> EdgePlan:
        if quick:
            return cls()
        return cls(readings=200_000, warmup=10_000, backlog=100_000, per_device_rate=10, rounds=3)


# ------------------------------------------------------------------------------ placement


def _fs_type(path: Path) -> str:
    """The file system type /proc/mounts gives for ``path`` (the longest mount point above it)."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def work_dir() -> Path:
    """A fresh directory for the stores, on the repository's file system (bench/results/tmp,
    ignored by git): never a tmpfs, where an fsync costs nothing and the comparison would say
    nothing about disks. Both the relay's store and the raw SQLite files go there."""
    base = ROOT / "bench" / "results" / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    if _fs_type(base) in ("tmpfs", "ramfs"):
        raise SkipSystem(f"{base} is on a {_fs_type(base)}: fsync would cost nothing there")
    return Path(tempfile.mkdtemp(prefix="edge-", dir=base))


# ------------------------------------------------------------------------------ raw SQLite

_SCHEMA = (
    "CREATE TABLE outbox(id INTEGER PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL,"
    " time REAL NOT NULL, body BLOB NOT NULL, crc INTEGER NOT NULL, added REAL NOT NULL)"
)


def raw_inserts(path: Path, total: int, batch: int, warmup: int) -> tuple[float, float]:
    """Insert ``total`` rows (after ``warmup`` untimed ones) in transactions of ``batch`` rows:
    (seconds, CPU seconds). Each row is built as the relay builds it: id, stream, seq, time,
    msgpack body, CRC-32, added; one ``executemany`` and one fsync'd commit per batch."""
    from sockstack.edge.records import encode_value, row_crc

    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute(_SCHEMA)
        seqs = [0] * DEVICES
        streams = [f"dev{k}" for k in range(DEVICES)]
        next_id = 1

        def insert(n: int) -> None:
            nonlocal next_id
            done = 0
            while done < n:
                now = time.time()
                rows = []
                for i in range(next_id, next_id + min(batch, n - done)):
                    k = i % DEVICES
                    seqs[k] += 1
                    stream, seq, body = streams[k], seqs[k], encode_value(VALUE)
                    rows.append(
                        (i, stream, seq, now, body, row_crc(i, stream, seq, now, body), now)
                    )
                con.execute("BEGIN IMMEDIATE")
                con.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                con.execute("COMMIT")
                next_id += len(rows)
                done += len(rows)

        insert(warmup)
        cpu0, t0 = time.process_time(), time.perf_counter()
        insert(total)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        (count,) = con.execute("SELECT count(*) FROM outbox").fetchone()
        if count != warmup + total:
            raise RuntimeError(f"raw SQLite: {count} rows stored of {warmup + total}")
        return seconds, cpu
    finally:
        con.close()


# ------------------------------------------------------------------------------ the relay


def start_relay(store: Path, cpus: set[int], *options: str) -> Server:
    """``sockstack edge --store FILE --listen tcp://127.0.0.1:0`` pinned to ``cpus``."""
    proc, m = spawn(
        [
            python(),
            "-m",
            "sockstack.cli",
            "--log-level",
            "WARNING",
            "edge",
            "--store",
            str(store),
            "--listen",
            "tcp://127.0.0.1:0",
            *options,
        ],
        cpus,
        ready=r"relay listening on tcp://127\.0\.0\.1:(\d+)",
    )
    assert m is not None
    return Server("sockstack edge", [proc], int(m.group(1)))


def start_sink(store: Path, cpus: set[int]) -> Server:
    """``sockstack serve --tcp 127.0.0.1:0 --sink FILE`` pinned to ``cpus``."""
    proc, m = spawn(
        [
            python(),
            "-m",
            "sockstack.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--tcp",
            "127.0.0.1:0",
            "--sink",
            str(store),
            "--keepalive",
            "0",
        ],
        cpus,
        ready=r"on tcp://127\.0\.0\.1:(\d+)",
    )
    assert m is not None
    return Server("sockstack sink", [proc], int(m.group(1)))


def relay_stats(port: int) -> dict[str, Any]:
    """The relay's ``edge.stats`` (a blocking client: one call)."""
    from sockstack import connect

    with connect(f"tcp://127.0.0.1:{port}", timeout=30) as c:
        stats: dict[str, Any] = c.call("edge.stats")
    return stats


# ------------------------------------------------------------------------------ device load


class _Devices(asyncio.Protocol):
    """One sockstack session carrying every device's DATA frames: HELLO first, then readings
    round-robin over the devices, at most ``window`` unanswered (0: no answers wanted)."""

    def __init__(self, epoch: int) -> None:
        from sockstack.protocol.frames import FrameDecoder

        self.decoder = FrameDecoder()
        self.epoch = epoch
        self.streams = [f"dev{k}" for k in range(DEVICES)]
        self.seqs = [0] * DEVICES
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.next_rid = 1
        self.level = 0
        self.window = 0
        self.to_send = 0
        self.answered = 0
        self.expected = 0
        self.refused: dict[int, int] = {}
        self.levels: dict[int, int] = {}
        self.sent_at: dict[int, int] = {}
        self.latencies: list[int] = []
        self.closed: str | None = None
        self.batch = 1
        """Readings per frame: 1, DATA frames; more, READINGS frames of that many."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from sockstack.protocol.events import Hello
        from sockstack.protocol.messages import encode_hello

        t = cast(asyncio.Transport, transport)  # (uvloop's: not a subclass)
        self.transport = t
        t.write(encode_hello(Hello(agent="sockstack-bench-edge")))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = str(exc) if exc else "closed by the relay"
        for fut in (self.welcome, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(self.closed))

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def frames(self, n: int, level: int, acked: bool) -> bytes:
        """``n`` DATA frames, the next reading of each device in turn (or ``n`` READINGS
        frames of :attr:`batch` readings each)."""
        from sockstack.edge.messages import encode_data, encode_readings
        from sockstack.edge.records import encode_value

        if self.batch > 1:
            now = time.time()
            stamp = time.perf_counter_ns()
            out = []
            for _ in range(n):
                rid = self.next_rid
                self.next_rid = rid + 1
                items = []
                for j in range(self.batch):
                    k = (rid * self.batch + j) % DEVICES
                    self.seqs[k] += 1
                    items.append((self.streams[k], self.epoch, self.seqs[k], now, VALUE))
                if acked:
                    self.sent_at[rid] = stamp
                out.append(encode_readings(rid if acked else 0, items, level=level))
            return b"".join(out)

        body = encode_value(VALUE)
        now = time.time()
        out = []
        seqs, streams, epoch = self.seqs, self.streams, self.epoch
        stamp = time.perf_counter_ns()
        for _ in range(n):
            rid = self.next_rid
            self.next_rid = rid + 1
            k = rid % DEVICES
            seqs[k] += 1
            if acked:
                self.sent_at[rid] = stamp
            out.append(
                encode_data(
                    rid if acked else 0,
                    streams[k],
                    body,
                    seq=seqs[k],
                    epoch=epoch,
                    time=now,
                    level=level,
                )
            )
        return b"".join(out)

    def data_received(self, data: bytes) -> None:
        freed = 0
        now = time.perf_counter_ns()
        for f in self.decoder.feed(data):
            if f.type == RESPONSE:
                freed += 1
                level = f.body[0] if f.body else 0
                self.levels[level] = self.levels.get(level, 0) + 1
            elif f.type == ERROR:
                freed += 1
                self.refused[f.request_id] = 1
            elif f.type == WELCOME:
                if not self.welcome.done():
                    self.welcome.set_result(None)
                continue
            elif f.type == CLOSE:
                self.closed = f"CLOSE from the relay: {f.body[:200]!r}"
                continue
            else:
                continue
            sent = self.sent_at.pop(f.request_id, None)
            if sent is not None:
                self.latencies.append(now - sent)
        if not freed:
            return
        self.answered += freed
        if self.to_send and self.transport is not None:
            n = min(freed, self.to_send)
            self.to_send -= n
            self.transport.write(self.frames(n, self.level, True))
        if self.answered >= self.expected and self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def acked(self, total: int, level: int, window: int, seconds: float) -> None:
        """Send ``total`` readings asking for ``level``, ``window`` at most unanswered; return
        once every one is answered."""
        assert self.transport is not None
        if total <= 0:
            return
        self.level, self.answered, self.expected = level, 0, total
        self.latencies = []
        self.done = asyncio.get_running_loop().create_future()
        first = min(window, total)
        self.to_send = total - first
        self.transport.write(self.frames(first, level, True))
        async with asyncio.timeout(seconds):
            await self.done

    async def blast(self, total: int, seconds: float) -> None:
        """Send ``total`` - 1 readings wanting no answer as fast as TCP takes them, then one
        asking for level 2: its answer comes once everything before it is committed."""
        assert self.transport is not None
        async with asyncio.timeout(seconds):
            sent = 0
            while sent < total - 1:
                await self.writable.wait()
                n = min(256, total - 1 - sent)
                self.transport.write(self.frames(n, 0, False))
                sent += n
            await self.acked(1, 2, 1, seconds)  # the last of the ``total``


async def _session(port: int) -> tuple[asyncio.Transport, _Devices]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(
        lambda: _Devices(int(time.time())), "127.0.0.1", port
    )
    async with asyncio.timeout(10):
        await proto.welcome
    return transport, proto  # type: ignore[return-value]


@dataclass
class IngestRun:
    seconds: float
    readings: int
    client_cpu: float
    relay_cpu: float
    commits: int
    committed: int
    latencies: list[int] = field(default_factory=list)
    refused: int = 0
    levels: dict[int, int] = field(default_factory=dict)


def device_load(relay: Server, level: int | None, plan: EdgePlan, batch: int = 1) -> IngestRun:
    """Warm up, then the timed readings: ``level`` 1 or 2 with a window, None for no ack;
    ``batch`` readings a frame (READINGS when more than 1; totals and window in readings)."""

    async def go() -> IngestRun:
        transport, proto = await _session(relay.port)
        proto.batch = batch
        try:
            await proto.acked(plan.warmup // batch, 2, max(1, plan.window // batch), plan.cap)
            before = await asyncio.to_thread(relay_stats, relay.port)
            cpu0, rcpu0, t0 = time.process_time(), relay.cpu_seconds(), time.perf_counter()
            if level is None:
                await proto.blast(plan.readings, plan.cap)
            else:
                await proto.acked(
                    plan.readings // batch, level, max(1, plan.window // batch), plan.cap
                )
            seconds = time.perf_counter() - t0
            cpu, rcpu = time.process_time() - cpu0, relay.cpu_seconds() - rcpu0
            after = await asyncio.to_thread(relay_stats, relay.port)
        finally:
            transport.close()
        b, a = before["store"], after["store"]
        return IngestRun(
            seconds,
            plan.readings,
            cpu,
            rcpu,
            a["commits"] - b["commits"],
            a["committed_rows"] - b["committed_rows"],
            proto.latencies,
            len(proto.refused),
            dict(proto.levels),
        )

    pin(TWO[2])
    result: IngestRun = run_async(go())
    return result


# ------------------------------------------------------------------------------ measuring


def _ingest_result(name: str, run: IngestRun, level: int | None, window: int) -> Result:
    from bench.harness import stats

    counted = run.committed if level is None else run.readings - run.refused
    # (no ack: the one answered reading's wait says nothing of the others)
    timed = run.latencies if level is not None else []
    p50, p99, p999 = stats(timed) if timed else (None, None, None)
    batch = run.committed / run.commits if run.commits else 0.0
    load = run.client_cpu / run.seconds if run.seconds else 0.0
    r = Result(
        INGEST,
        name,
        TWO[0],
        counted,
        run.seconds,
        0,
        p50,
        p99,
        p999,
        round(run.relay_cpu / max(counted, 1) * 1e6, 1),
    )
    r.extra.update(
        rows_per_commit=round(batch, 1),
        commits=run.commits,
        committed=run.committed,
        load_cpu_share=round(load, 2),
        relay_cpu_share=round(run.relay_cpu / run.seconds, 2) if run.seconds else 0.0,
    )
    parts = [f"{batch:,.0f} rows per commit", f"device load {load:.0%} of a core"]
    if level is not None:
        parts.insert(0, f"{window:,} in flight")
    if level is None:
        lost = run.readings - run.committed
        r.extra["loss"] = lost
        parts.append(f"{lost:,} of {run.readings:,} not committed" if lost else "all committed")
    elif run.refused:
        parts.append(f"{run.refused:,} refused")
    r.note = ", ".join(parts)
    return r


def _raw_row(name: str, work: Path, plan: EdgePlan, size: int) -> Result:
    pin(TWO[1])
    os.sync()  # no earlier run's dirty pages written back during this one
    seconds, cpu = raw_inserts(
        work / f"raw-{size}-{len(os.listdir(work))}.db", plan.readings, size, plan.warmup
    )
    r = Result(
        INGEST,
        name,
        "one core",
        plan.readings,
        seconds,
        0,
        cpu_s_per_m=round(cpu / plan.readings * 1e6, 1),
        note=f"{size:,} rows per commit",
    )
    r.extra["rows_per_commit"] = size
    return r


@dataclass(frozen=True)
class _Case:
    name: str
    level: int | None
    window: int
    raws: tuple[tuple[str, int], ...] = ()
    """Raw SQLite rows measured right after it: (name, batch size; 0: the batch this run's group
    commits reached)."""
    batch: int = 1
    """Readings per frame (READINGS frames when more than 1)."""


def measure_ingest(
    plan: EdgePlan, log: Callable[[str], None], skipped: dict[str, str], only: str = ""
) -> list[Result]:
    """The ingest rows, ``plan.rounds`` interleaved rounds, each row its median round."""
    cases = [
        _Case(RELAY_DISK, 2, plan.window, ((RAW_RELAY, 0), (RAW_1000, 1000))),
        _Case(RELAY_PACED, 2, DEVICES, ((RAW_PACED, 0),)),
        _Case(RELAY_BATCHED, 2, plan.window, ((RAW_BATCHED, 0),), BATCH),
        _Case(RELAY_MEMORY, 1, plan.window),
        _Case(RELAY_NONE, None, plan.window),
    ]
    names = [n for c in cases for n in (c.name, *(raw for raw, _ in c.raws))]
    chosen = {n for n in names if not (only and only not in n.lower())}
    for c in cases:
        if any(raw in chosen and not size for raw, size in c.raws):
            chosen.add(c.name)  # the raw row's batch size comes from the relay's run
    rounds: dict[str, list[Result]] = {n: [] for n in names}
    for _ in range(plan.rounds):
        work = work_dir()
        try:
            for c in cases:
                if c.name not in chosen or c.name in skipped:
                    continue
                os.sync()
                relay = start_relay(work / f"relay-{len(os.listdir(work))}.db", TWO[1])
                try:
                    run = device_load(relay, c.level, replace(plan, window=c.window), c.batch)
                except Exception as exc:  # a run that breaks must not end the whole suite
                    skipped[c.name] = f"failed: {type(exc).__name__}: {exc}"
                    log(f"  {c.name}: failed: {exc}")
                    continue
                finally:
                    relay.stop()
                r = _ingest_result(c.name, run, c.level, c.window)
                rounds[c.name].append(r)
                log(f"  {INGEST} / {c.name}: {r.rate:,.0f} readings/s ({r.note})")
                for raw, size in c.raws:
                    if raw in chosen:
                        batch = size or max(1, round(r.extra["rows_per_commit"]))
                        rr = _raw_row(raw, work, plan, batch)
                        rounds[raw].append(rr)
                        log(f"  {INGEST} / {raw}: {rr.rate:,.0f} rows/s ({rr.note})")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return [median_round(rounds[n]) for n in names if rounds[n]]


def _fill(store: Path, rows: int, plan: EdgePlan) -> None:
    """The relay takes ``rows`` readings with no upstream: its outbox keeps them."""
    relay = start_relay(store, TWO[1])
    try:
        run = device_load(relay, None, EdgePlan(rows, 0, plan.window, cap=plan.cap))
    finally:
        relay.stop()
    if run.committed < rows:
        raise RuntimeError(f"the relay committed {run.committed} readings of {rows}")


def measure_forward(plan: EdgePlan, log: Callable[[str], None], rounds: int) -> Result | None:
    """Rows/s the relay forwards from a backlog of ``plan.backlog`` rows to the sink."""
    runs: list[Result] = []
    for _ in range(rounds):
        work = work_dir()
        try:
            store = work / "edge.db"
            _fill(store, plan.backlog, plan)
            os.sync()
            sink = start_sink(work / "cloud.db", TWO[2])
            try:
                pin(TWO[2])
                scpu0 = sink.cpu_seconds()
                relay = start_relay(store, TWO[1], "--upstream", f"tcp://127.0.0.1:{sink.port}")
                try:
                    seconds, rows, batches, rcpu = _watch_forward(relay, plan.backlog, plan.cap)
                finally:
                    relay.stop()
                scpu = sink.cpu_seconds() - scpu0
            finally:
                sink.stop()
            con = sqlite3.connect(work / "cloud.db")
            try:
                (stored,) = con.execute("SELECT count(*) FROM readings").fetchone()
            finally:
                con.close()
            if stored != plan.backlog:
                raise RuntimeError(f"the sink holds {stored} readings of {plan.backlog}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        r = Result(
            FORWARD,
            RELAY_FORWARD,
            "two cores",
            rows,
            seconds,
            0,
            cpu_s_per_m=round((rcpu + scpu) / max(rows, 1) * 1e6, 1),
            note=f"{plan.backlog:,} rows backlog, {rows / max(batches, 1):,.0f} rows per batch",
        )
        r.extra.update(backlog=plan.backlog, batches=batches)
        runs.append(r)
        log(f"  {FORWARD} / {RELAY_FORWARD}: {r.rate:,.0f} rows/s ({r.note})")
    return median_round(runs) if runs else None


def _watch_forward(relay: Server, backlog: int, cap: float) -> tuple[float, int, int, float]:
    """Poll the relay's ``edge.stats`` every 10 ms from its start until the sink holds the whole
    backlog: (seconds from the first sample, rows forwarded since it, batches, relay CPU)."""
    from sockstack import connect

    with connect(f"tcp://127.0.0.1:{relay.port}", timeout=30) as c:
        rcpu0 = relay.cpu_seconds()
        t0 = time.perf_counter()
        first = c.call("edge.stats")["forward"]
        rows0, batches0 = first["rows"], first["batches"]
        deadline = t0 + cap
        while True:
            fw = c.call("edge.stats")["forward"]
            now = time.perf_counter()
            if fw["rows"] >= backlog:
                return (
                    now - t0,
                    fw["rows"] - rows0,
                    fw["batches"] - batches0,
                    (relay.cpu_seconds() - rcpu0),
                )
            if now > deadline:
                raise TimeoutError(f"forwarded {fw['rows']} of {backlog} in {cap:g} s")
            time.sleep(0.01)  # sampling a running relay; bounded by the deadline above


def measure_reduction(per_device_rate: int, seconds: float = 60.0) -> Result:
    """``examples/edge_pipeline.py`` fed ``seconds`` of event time from 100 devices."""
    import random

    from sockstack.edge.records import Reading, encode_value
    from sockstack.edge.store import ROW_OVERHEAD

    path = ROOT / "examples" / "edge_pipeline.py"
    if not path.exists() or importlib.util.find_spec("sockstack.edge.pipeline") is None:
        raise SkipSystem(f"{PIPELINE} or sockstack.edge.pipeline is not there yet")
    spec = importlib.util.spec_from_file_location("bench_edge_pipeline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipeline = module.build()
    rng = random.Random(15)
    start = 1_700_000_000.0
    temps = [20.0 + rng.uniform(-2, 2) for _ in range(DEVICES)]
    readings = []
    for step in range(int(seconds * per_device_rate)):
        t = start + step / per_device_rate
        for k in range(DEVICES):
            temps[k] += rng.gauss(0, 0.1)
            readings.append(Reading(f"dev{k}", t, {"temp": round(temps[k], 3)}, step + 1))
    outputs = []
    t0 = time.perf_counter()
    for r in readings:
        outputs += pipeline.push(r, r.time)
        # (the relay takes the state changes once per commit; per reading here: an upper bound)
        pipeline.take_changes()
    outputs += pipeline.tick(start + seconds + 3600.0)  # every window closes
    elapsed = time.perf_counter() - t0
    out_bytes = sum(len(o.stream) + len(encode_value(o.value)) + ROW_OVERHEAD for o in outputs)
    in_bytes = sum(len(r.stream) + len(encode_value(r.value)) + ROW_OVERHEAD for r in readings)
    in_msgs, out_msgs = len(readings), len(outputs)
    row = Result(REDUCTION, PIPELINE, "one core", in_msgs, elapsed, 0)
    row.extra.update(
        in_msgs=in_msgs,
        out_msgs=out_msgs,
        in_bytes=in_bytes,
        out_bytes=out_bytes,
        reduction_msgs=round(in_msgs / out_msgs, 2) if out_msgs else None,
        reduction_bytes=round(in_bytes / out_bytes, 2) if out_bytes else None,
    )
    row.note = (
        f"{in_msgs:,} readings ({in_bytes:,} B) in, {out_msgs:,} rows ({out_bytes:,} B) out: "
        f"{row.extra['reduction_msgs']}x fewer messages, "
        f"{row.extra['reduction_bytes']}x fewer bytes (as the relay counts them: stored rows on "
        "both sides)"
    )
    return row


# ------------------------------------------------------------------------------ the suite


def run_edge(run: Run, budget: Budget, only: str) -> None:
    """``python -m bench --scenario edge``: the three scenarios above."""
    plan = EdgePlan.make(budget.rounds == 1)
    if budget.rounds != plan.rounds:
        plan = EdgePlan(**{**plan.__dict__, "rounds": budget.rounds})
    try:
        run.results += measure_ingest(plan, run.log, run.skipped, only)
    except SkipSystem as exc:
        run.skipped["edge ingest"] = str(exc)
        run.log(f"  skip edge ingest: {exc}")
    if not only or only in RELAY_FORWARD.lower():
        try:
            r = measure_forward(plan, run.log, plan.rounds)
        except Exception as exc:  # (as above: reported, the suite goes on)
            run.skipped[RELAY_FORWARD] = f"{type(exc).__name__}: {exc}"
            run.log(f"  {RELAY_FORWARD}: {exc}")
        else:
            if r is not None:
                run.results.append(r)
    if not only or only in PIPELINE.lower():
        try:
            r = measure_reduction(plan.per_device_rate)
        except SkipSystem as exc:
            run.skipped[PIPELINE] = str(exc)
            run.log(f"  skip {PIPELINE}: {exc}")
        else:
            run.results.append(r)
            run.log(f"  {REDUCTION}: {r.note}")


def edge_targets(results: list[Result]) -> list[tuple[str, float | None, float, bool]]:
    """(what, ratio, goal, higher is better): the relay's on-disk rate over raw SQLite's at the
    relay's batch size, in the same run: at the relay's top rate (the goal's figure), and with
    each device waiting for its acknowledgement before it sends again."""
    found = {r.system: r for r in results if r.scenario == INGEST}

    def ratio(a: str, b: str) -> float | None:
        x, y = found.get(a), found.get(b)
        return round(x.rate / y.rate, 2) if x is not None and y is not None and y.rate else None

    what = "edge ingest, on-disk ack: sockstack relay / raw SQLite batched inserts"
    return [
        (what, ratio(RELAY_DISK, RAW_RELAY), 0.5, True),
        (f"{what} (one reading in flight per device)", ratio(RELAY_PACED, RAW_PACED), 0.5, True),
        (f"{what} (READINGS frames of {BATCH})", ratio(RELAY_BATCHED, RAW_BATCHED), 0.5, True),
    ]
