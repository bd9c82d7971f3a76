"""Edge and fog relays, and the cloud sink, as patterns on the host (docs/EDGE.md).

::

    relay = Relay("./edge.db", build(), upstream=["tcp://127.0.0.1:5050"],
                  listen=["udp://127.0.0.1:5060", "tcp://127.0.0.1:5061"])
    Server(patterns=[relay], tcp=["127.0.0.1:5062"])        # the relay
    Server(patterns=[Sink(open_sink("./cloud.db"))], tcp=["127.0.0.1:5050"])   # the cloud

**A relay** takes readings from devices (DATA frames on the host's sessions and datagrams, and
on its own listeners also JSON and raw lines), runs them through its pipeline, and stages what
the pipeline makes, with the input's position and the pipeline's changed state, in its outbox
(edge/store.py: one transaction per group commit). A device that asked for an acknowledgement
gets the level achieved: MEMORY once staged, DISK once committed and fsync'd, FORWARDED once
the upstream holds what its reading made. A :class:`~sockstack.edge.forward.Forwarder` sends the
outbox upstream. A relay also serves ``edge.forward``: another relay's rows are its input (fog).

**A sink** serves ``edge.forward`` into a :class:`~sockstack.edge.sink.SinkStore` (SQLite or
PostgreSQL), which keeps each relay's rows exactly once.

Both serve ``edge.stats``: what ``sockstack edge status`` and ``describe`` show.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from sockstack.edge.forward import Forwarder, ForwardSettings
from sockstack.edge.ingest import FRAME_PREFIX, BadInput, LineDecoder, SourceStats, parse_line
from sockstack.edge.messages import DATA, EDGE_MESSAGES, READINGS, AckLevel, Data, Readings
from sockstack.edge.records import Reading, Row, decode_value, encode_value
from sockstack.edge.store import ROW_OVERHEAD, Batch, Outbox, StoreBusy, StoreFull, StoreLimits
from sockstack.errors import ErrorCode, RemoteProtocolError
from sockstack.host.dispatch import Handler, ServiceError, make_handler
from sockstack.host.pattern import DatagramPeer, HostContext, Pattern, Peer
from sockstack.protocol.codecs import CODECS
from sockstack.protocol.events import PatternMessage
from sockstack.protocol.frames import pack_header, parse_datagram
from sockstack.protocol.messages import encode_error
from sockstack.protocol.registry import Registry
from sockstack.transport.listen import bind_all
from sockstack.transport.urls import Endpoint, format_peer, parse_endpoint

__all__ = ["EdgeError", "Relay", "Sink"]

log = logging.getLogger("sockstack.edge")
_ONLY_EDGE = Registry([EDGE_MESSAGES], frozen=True)
MAX_FORWARD_WAITS = 100_000
"""Acknowledgements waiting for FORWARDED at most; past it a reading is acknowledged at DISK
(what it has), so that a long uplink outage holds no unbounded memory."""
MAX_LINE_CONNECTIONS = 1024


class EdgeError(ServiceError):
    """A relay's or sink's refusal, with its wire code (STORE_FULL, BAD_RECORD, OVERLOADED)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self._sockstack_code = code


_NONE = (0, 0)
_FAILED = "the relay's store failed a commit: it takes no input until it is restarted"
_DROPPED: dict[int, str] = {
    ErrorCode.STORE_FULL: "store full",
    ErrorCode.UNAVAILABLE: "store failed",
}
_LEVEL_BODY = {1: b"\x01", 2: b"\x02", 3: b"\x03"}  # a RESPONSE's result: msgpack fixint
_RESPONSE = 0x04


class Answers(Protocol):
    """Where a device's answers go (its connection, its address, or a READINGS frame's one)."""

    def ok(self, rid: int, level: int) -> None: ...
    def refuse(self, rid: int, code: int, message: str) -> None: ...


class _StreamAnswers:
    """A session's answers: RESPONSE frames queued on the connection (one write per loop turn)."""

    __slots__ = ("peer",)

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def ok(self, rid: int, level: int) -> None:
        self.peer.write_soon(pack_header(_RESPONSE, 0, 1, 0, rid, 1) + _LEVEL_BODY[level])

    def refuse(self, rid: int, code: int, message: str) -> None:
        core = self.peer.core
        if core is not None:
            core.send_error(rid, code, ErrorCode(code).name, message)
            self.peer.flush()


class _DatagramAnswers:
    """A datagram's answer, never larger than the datagram (an ERROR carries the code alone)."""

    __slots__ = ("addr", "send", "size")

    def __init__(self, send: Callable[[bytes, Any], None], addr: Any, size: int) -> None:
        self.send, self.addr, self.size = send, addr, size

    def _out(self, answer: bytes) -> None:
        if len(answer) <= self.size:
            with contextlib.suppress(OSError):
                self.send(answer, self.addr)

    def ok(self, rid: int, level: int) -> None:
        self._out(pack_header(_RESPONSE, 0, 1, 0, rid, 1) + _LEVEL_BODY[level])

    def refuse(self, rid: int, code: int, message: str) -> None:
        self._out(encode_error(rid, code))


class _Group:
    """The readings of one READINGS frame: one answer once each has its own, at the lowest
    level achieved among them; the first refusal answers at once."""

    __slots__ = ("answers", "done", "left", "level", "rid")

    def __init__(self, answers: Answers, rid: int, count: int) -> None:
        self.answers, self.rid, self.left = answers, rid, count
        self.level = 3
        self.done = False

    def ok(self, rid: int, level: int) -> None:
        self.left -= 1
        self.level = min(self.level, level)
        if not self.left and not self.done:
            self.done = True
            self.answers.ok(self.rid, self.level)

    def refuse(self, rid: int, code: int, message: str) -> None:
        self.left -= 1
        if not self.done:
            self.done = True
            self.answers.refuse(self.rid, code, message)


def _reduction(stats: Mapping[str, int]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        return round(stats[a] / stats[b], 3) if stats.get(b) else None

    return {"msgs": ratio("in_msgs", "out_msgs"), "bytes": ratio("in_bytes", "out_bytes")}


class Relay(Pattern):
    """An edge or fog relay: ingest, pipeline, outbox, forwarding (module docstring)."""

    name = "edge"
    messages = EDGE_MESSAGES
    datagram_types = frozenset({DATA, READINGS})

    def __init__(
        self,
        store: str | Outbox,
        pipeline: Any = None,
        *,
        upstream: str | Sequence[str] | None = None,
        listen: Sequence[str | Endpoint] = (),
        limits: StoreLimits | None = None,
        ack: int = AckLevel.DISK,
        ack_for: Mapping[str, int] | None = None,
        forward: ForwardSettings | None = None,
        upstream_secret: str | bytes | None = None,
        max_line: int = 64 * 1024,
    ) -> None:
        self.store = store if isinstance(store, Outbox) else Outbox(store, limits)
        self.pipeline = pipeline
        if isinstance(upstream, str):
            upstream = [u.strip() for u in upstream.split(",") if u.strip()]
        self.upstream = list(upstream or [])
        self.listen = [e if isinstance(e, Endpoint) else parse_endpoint(e) for e in listen]
        for ep in self.listen:
            if ep.scheme not in ("tcp", "udp"):
                raise ValueError(f"--listen takes tcp:// or udp:// endpoints, not {ep}")
        self.ack = AckLevel(ack)
        self.ack_for = [(pattern, AckLevel(level)) for pattern, level in (ack_for or {}).items()]
        self.forward_settings = forward or ForwardSettings()
        self.upstream_secret = upstream_secret
        self.max_line = max_line
        self.sources: dict[str, SourceStats] = {}
        self.totals = {"in_msgs": 0, "in_bytes": 0, "out_msgs": 0, "out_bytes": 0}
        self.forwarder: Forwarder | None = None
        self.host: HostContext | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._bound: list[Endpoint] = []
        self._sockets: list[socket.socket] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._lines: set[_LineStream] = set()
        self._paused: set[_LineStream] = set()
        self._forward_waits: deque[tuple[int, Answers, int]] = deque()
        self._sessions = self.source("sessions")
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0
        self._async_lock: asyncio.Lock | None = None
        self.waiting_bytes = 0
        """Bytes of readings waiting for an async pipeline (bounded like the staged batch)."""
        self._opened = False
        self._stopped = False
        self._listening: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ host hooks

    def methods(self) -> Mapping[str, Handler]:
        return {
            "edge.forward": make_handler("edge.forward", self.forward_in, inline=False),
            "edge.stats": make_handler("edge.stats", self.stats, inline=True, readonly=True),
        }

    def endpoints(self) -> Sequence[Endpoint]:
        return self._bound if self._bound else self.listen

    def open(self) -> None:
        """Open the store and restore the pipeline's state (blocking; :meth:`start` does it
        when it was not done before)."""
        if self._opened:
            return
        self.store.open()
        if self.pipeline is not None:  # (also with no rows: its change tracking starts here)
            self.pipeline.restore(self.store.state_rows)
        self.store.state_rows = []
        self._opened = True

    def start(self, host: HostContext) -> None:
        self.host = host
        loop = self.loop = host.loop
        assert loop is not None
        self._started = time.time()
        # Bound now: an error (an address in use) reaches Server.start.
        self._sockets = bind_all(self.listen, host.limits.backlog)
        self._bound = [
            Endpoint(ep.scheme, *sock.getsockname()[:2])
            for ep, sock in zip(self.listen, self._sockets, strict=True)
        ]
        self.open()
        self.store.start(loop)
        self.store.on_commit(self._committed)
        if self.upstream:
            self.forwarder = Forwarder(
                self.store,
                self.upstream,
                self.forward_settings,
                secret=self.upstream_secret,
                stats=lambda: dict(self.totals),
                acked=self._forwarded,
            )
            self.forwarder.start(loop)
        self.store.live = self._live
        if self.pipeline is not None and getattr(self.pipeline, "is_async", False):
            self._async_lock = asyncio.Lock()
        elif self.pipeline is not None:
            self.store.before_commit = self._changes
        self._listening = loop.create_task(self._serve_listeners(), name="sockstack-edge-listen")
        self._timer = loop.call_later(1.0, self._tick)

    async def _serve_listeners(self) -> None:
        loop = self.loop
        assert loop is not None
        for ep, sock in zip(self._bound, self._sockets, strict=True):
            name = str(ep)
            if ep.scheme == "tcp":
                srv = await loop.create_server(
                    functools.partial(_LineStream, self, name), sock=sock
                )
                self._servers.append(srv)
                if self._stopped:
                    srv.close()
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_Datagrams, self, name), sock=sock
                )
                self._transports.append(transport)
                if self._stopped:
                    transport.close()

    def _tick(self) -> None:
        """Once a second: windows of quiet devices close (processing time), TTL expiry."""
        host, loop = self.host, self.loop
        if host is None or loop is None:
            return
        self._timer = loop.call_later(1.0, self._tick)  # (first: nothing below stops the chain)
        try:
            if self.pipeline is not None:
                if self.pipeline.is_async:
                    loop.create_task(self._atick())
                else:
                    self._ticked(self.pipeline.tick(time.time()))
            self.store.flush()
        except Exception:
            log.exception("edge relay: the once-a-second tick failed")

    async def _atick(self) -> None:
        assert self._async_lock is not None
        async with self._async_lock:  # (between readings, as they are taken one at a time)
            self._ticked(await self.pipeline.atick(time.time()))

    def _ticked(self, outputs: Sequence[Reading]) -> None:
        # (a sync pipeline's state changes join each batch as it goes to commit: _changes)
        changes = self.pipeline.take_changes() if self._async_lock is not None else None
        if outputs or changes:
            rows, nbytes = self._rows(outputs)
            self.store.stage(rows, nbytes, changes=changes)

    def _changes(self, batch: Batch) -> None:
        """Before each commit: what a sync pipeline's state changed since the last one (the
        readings staged in the batch made those changes: one transaction holds both)."""
        changes = self.pipeline.take_changes()
        if changes:
            batch.changes.extend(changes)

    def stop(self) -> None:
        self._stopped = True  # (listeners being set up close as they come)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for srv in self._servers:
            srv.close()
        for line in list(self._lines):
            line.close()
        for t in self._transports:
            t.close()

    async def closed(self) -> None:
        if self._listening is not None:
            await self._listening
            for srv in self._servers:
                await srv.wait_closed()
        if self.forwarder is not None:
            await self.forwarder.stop()
        if self._async_lock is not None:  # (a sync pipeline's join the last commit: _changes)
            changes = self.pipeline.take_changes()
            if changes:
                self.store.stage((), 0, changes=changes)
        await self.store.close()

    # ------------------------------------------------------------------ ingest

    def source(self, name: str) -> SourceStats:
        stats = self.sources.get(name)
        if stats is None:
            if len(self.sources) >= 4096:
                name = "other"
                stats = self.sources.get(name)
            if stats is None:
                stats = self.sources[name] = SourceStats()
        return stats

    def _level_for(self, stream: str) -> int:
        for pattern, level in self.ack_for:
            if fnmatch.fnmatchcase(stream, pattern):
                return level
        return self.ack

    def _rows(self, outputs: Sequence[Reading]) -> tuple[list[tuple[str, int, float, bytes]], int]:
        rows = []
        nbytes = 0
        for r in outputs:
            try:
                body = encode_value(r.value)
            except (TypeError, ValueError, OverflowError):  # a stage made what msgpack cannot hold
                self.source("pipeline").count_dropped("output not encodable")
                continue
            rows.append((r.stream, r.seq, float(r.time), body))
            nbytes += len(r.stream) + len(body) + ROW_OVERHEAD
        self.totals["out_msgs"] += len(rows)
        self.totals["out_bytes"] += nbytes
        return rows, nbytes

    def _refused(self, size: int, can_wait: bool, key: str | None = None) -> tuple[int, str] | None:
        """Why ``size`` more bytes (for input position ``key``) cannot be staged now (code,
        message), or None."""
        store = self.store
        if store.failed is not None:
            return ErrorCode.UNAVAILABLE, _FAILED
        if key is not None and key not in store.latest:
            if len(store.latest) >= store.limits.max_streams:
                return (
                    ErrorCode.STORE_FULL,
                    f"the relay keeps at most {store.limits.max_streams} streams",
                )
        try:
            self.store.room(size, can_wait)
        except StoreFull as exc:
            return ErrorCode.STORE_FULL, str(exc)
        except StoreBusy as exc:
            return ErrorCode.OVERLOADED, str(exc)
        if self._async_lock is not None and not can_wait:
            if self.waiting_bytes >= self.store.limits.max_pending_bytes:
                return ErrorCode.OVERLOADED, "the relay's pipeline is busy"
        return None

    def take(
        self,
        reading: Reading,
        epoch: int,
        size: int,
        stats: SourceStats,
        answers: Answers | None = None,
        rid: int = 0,
        wanted: int = 0,
        can_wait: bool = False,
        body: bytes | None = None,
    ) -> bool:
        """One reading from a device: deduplicated by its (epoch, seq), checked against the
        store's room, run through the pipeline, staged; the device answered (``rid`` on
        ``answers``) at the level achieved. ``body``: the value's msgpack bytes as received
        (stored as they are when there is no pipeline). False when it was refused (counted,
        the device told why)."""
        store = self.store
        seq = reading.seq
        key = None
        gap = 0
        size += len(reading.stream)  # (a reading's bytes as a row would hold them)
        if seq:
            key = "d:" + reading.stream
            pos = (epoch, seq)
            last = store.latest.get(key, _NONE)
            if pos <= last:
                stats.duplicates += 1  # (or a datagram overtaken by a later one: docs/EDGE.md)
                if answers is not None:
                    self._ack_again(key, pos, answers, rid)
                return True
            if epoch == last[0] and last[1]:
                gap = seq - last[1] - 1
        why = self._refused(size + ROW_OVERHEAD, can_wait, key)
        if why is not None:
            stats.count_dropped(_DROPPED.get(why[0], "busy"))
            if answers is not None:
                answers.refuse(rid, *why)
            return False
        if self._async_lock is not None:  # an async stage: in order, one at a time
            if key is not None:  # taken now: a copy arriving meanwhile is a retransmission
                store.latest[key] = (epoch, seq)
            self.waiting_bytes += size + ROW_OVERHEAD
            assert self.loop is not None
            self.loop.create_task(
                self._take_async(reading, key, epoch, size, stats, answers, rid, wanted)
            )
            return True
        if self.pipeline is None:
            if body is None:
                body = encode_value(reading.value)
            n = len(reading.stream) + len(body) + ROW_OVERHEAD
            self.totals["out_msgs"] += 1
            self.totals["out_bytes"] += n
            rows = [(reading.stream, seq, float(reading.time), body)]
        else:
            rows, n = self._rows(self.pipeline.push(reading, time.time()))
        staged = self._stage(
            rows, n, key, epoch, seq, size, stats, answers, rid, wanted, stream=reading.stream
        )
        if staged and gap > 0:
            stats.lost += gap
        return True

    async def _take_async(
        self,
        reading: Reading,
        key: str | None,
        epoch: int,
        size: int,
        stats: SourceStats,
        answers: Answers | None,
        rid: int,
        wanted: int,
    ) -> None:
        assert self._async_lock is not None
        try:
            async with self._async_lock:  # in order, one at a time: state and position agree
                rows, n = self._rows(await self.pipeline.apush(reading, time.time()))
                changes = self.pipeline.take_changes()
                self._stage(rows, n, key, epoch, reading.seq, size, stats, answers, rid, wanted,
                            changes, stream=reading.stream)  # fmt: skip
        finally:
            self.waiting_bytes -= size + ROW_OVERHEAD
            if self._paused and not self.waiting_bytes:  # (nothing staged: no commit wakes them)
                for line in list(self._paused):
                    line.resume()

    def _stage(
        self,
        rows: list[tuple[str, int, float, bytes]],
        nbytes: int,
        key: str | None,
        epoch: int,
        seq: int,
        size: int,
        stats: SourceStats,
        answers: Answers | None,
        rid: int,
        wanted: int,
        changes: list[tuple[str, bytes, bytes | None]] | None = None,
        stream: str = "",
    ) -> bool:
        try:
            batch = self.store.stage(rows, nbytes, key, (epoch, seq) if key else None, changes)
        except StoreFull as exc:  # too many streams
            store = self.store
            if key is not None and store.latest.get(key) == (epoch, seq):  # (taken early)
                committed = store.positions.get(key)
                if committed is None:
                    store.latest.pop(key, None)
                else:
                    store.latest[key] = committed
            stats.count_dropped("store full")
            if answers is not None:
                answers.refuse(rid, ErrorCode.STORE_FULL, str(exc))
            return False
        totals = self.totals
        totals["in_msgs"] += 1
        totals["in_bytes"] += size + ROW_OVERHEAD  # (as a row: what out_bytes counts too)
        stats.accepted += 1
        if answers is not None:
            level = wanted or self._level_for(stream)
            if level == 1:
                answers.ok(rid, 1)
            else:
                if not batch.answered:
                    batch.answered = True
                    batch.done.append(self._answer)
                batch.acks.append((answers, rid, level, bool(rows)))
        return True

    def _answer(self, batch: Batch, exc: BaseException | None) -> None:
        """A batch is on disk (or failed): answer the readings it holds."""
        fw = self.forwarder
        waits = self._forward_waits
        for answers, rid, level, produced in batch.acks:
            if exc is not None:
                answers.refuse(
                    rid, ErrorCode.UNEXPECTED_ERROR, f"the relay could not store it: {exc}"
                )
            elif level == 3 and produced and fw is not None and len(waits) < MAX_FORWARD_WAITS:
                if fw.through >= batch.last_id:
                    answers.ok(rid, 3)
                else:
                    waits.append((batch.last_id, answers, rid))
            else:
                answers.ok(rid, 2)

    def _ack_again(self, key: str, pos: tuple[int, int], answers: Answers, rid: int) -> None:
        """A retransmission: acknowledged at DISK once what it repeats is committed."""
        if pos <= self.store.positions.get(key, _NONE):
            answers.ok(rid, 2)
            return
        batch = self.store.pending
        if not batch.answered:
            batch.answered = True
            batch.done.append(self._answer)
        batch.acks.append((answers, rid, 2, False))
        self.store.flush()

    def _forwarded(self, through: int) -> None:
        waits = self._forward_waits
        while waits and waits[0][0] <= through:
            _, answers, rid = waits.popleft()
            answers.ok(rid, 3)

    def _committed(self, batch: Batch) -> None:
        for line in list(self._paused):
            line.resume()

    # ------------------------------------------------------------------ DATA frames

    def stream_message(self, peer: Peer, msg: PatternMessage) -> None:
        assert isinstance(msg, Data | Readings)
        answers: Answers | None = None
        if msg.request_id:
            answers = peer.state.get("edge")
            if answers is None:
                answers = peer.state["edge"] = _StreamAnswers(peer)
        if type(msg) is Data:
            if self.pipeline is None and msg.codec == 1:
                self._plain_data(msg, answers)
                return
            stats = self._sessions
            stats.received += 1
            stats.bytes += len(msg.value)
            self._take_data(msg, stats, answers)
        else:
            assert isinstance(msg, Readings)
            self._take_readings(msg, self._sessions, answers)

    def _plain_data(self, msg: Data, answers: Answers | None) -> None:
        """A msgpack DATA on a session of a relay without a pipeline: :meth:`take` and
        :meth:`_stage` in one, the value checked and stored as received (the bulk of a relay's
        input: every call saved is a few percent of its rate, docs/PERFORMANCE.md)."""
        stats = self._sessions
        body = msg.value
        size = len(body)
        stats.received += 1
        stats.bytes += size
        rid = msg.request_id
        try:
            decode_value(body)
        except Exception:
            stats.count_bad("value does not decode")
            if answers is not None:
                answers.refuse(rid, ErrorCode.DECODE_ERROR, "the value does not decode")
            return
        store = self.store
        stream = msg.stream
        seq = msg.seq
        key = None
        gap = 0
        latest = store.latest
        if seq:
            key = "d:" + stream
            pos = (msg.epoch, seq)
            last = latest.get(key, _NONE)
            if pos <= last:
                stats.duplicates += 1
                if answers is not None:
                    self._ack_again(key, pos, answers, rid)
                return
            if pos[0] == last[0] and last[1]:
                gap = seq - last[1] - 1
        n = len(stream) + size + ROW_OVERHEAD
        pending = store.pending
        lim = store.limits
        why: tuple[int, str] | None = None
        if store.failed is not None:
            why = ErrorCode.UNAVAILABLE, _FAILED
        elif pending.size + n > lim.max_pending_bytes and pending.size:
            why = ErrorCode.OVERLOADED, "the relay's commit queue is full"
        elif key is not None and key not in latest and len(latest) >= lim.max_streams:
            why = ErrorCode.STORE_FULL, f"the relay keeps at most {lim.max_streams} streams"
        elif (
            lim.when_full == "refuse"
            and store.stored_bytes + store.committing_bytes + pending.size + n > lim.max_bytes
        ):
            why = self._refused(n, False)  # (counted there)
        if why is not None:
            stats.count_dropped(_DROPPED.get(why[0], "busy"))
            if answers is not None:
                answers.refuse(rid, *why)
            return
        t = time.time() if msg.time is None else msg.time
        pending.rows.append((stream, seq, t, body))
        pending.size += n
        if key is not None:
            pending.positions[key] = latest[key] = pos
        if not pending.answered:  # (the first of a batch: its answers' callback, the wake-up)
            pending.answered = True
            pending.done.append(self._answer)
            store.wake()
        totals = self.totals
        totals["in_msgs"] += 1
        totals["in_bytes"] += n
        totals["out_msgs"] += 1
        totals["out_bytes"] += n
        stats.accepted += 1
        if gap > 0:
            stats.lost += gap
        if answers is not None:
            level = msg.level or (self.ack if not self.ack_for else self._level_for(stream))
            if level == 1:
                answers.ok(rid, 1)
            else:
                pending.acks.append((answers, rid, level, True))

    def _take_data(self, msg: Data, stats: SourceStats, answers: Answers | None) -> None:
        body = msg.value
        codec = msg.codec
        try:
            if codec == 1:  # msgpack: checked, and stored as received
                value = decode_value(body)
            else:
                value = CODECS[codec].decode(body) if codec else body
                body = encode_value(value)
        except Exception:
            stats.count_bad("value does not decode")
            if answers is not None:
                answers.refuse(
                    msg.request_id, ErrorCode.DECODE_ERROR, "the value does not decode in its codec"
                )
            return
        t = time.time() if msg.time is None else msg.time
        self.take(Reading(msg.stream, t, value, msg.seq), msg.epoch, len(msg.value), stats,
                  answers, msg.request_id, msg.level, body=body)  # fmt: skip

    def _take_readings(self, msg: Readings, stats: SourceStats, answers: Answers | None) -> None:
        """READINGS: many readings, one answer: all of them staged, or none."""
        items = msg.items
        stats.received += len(items)
        stats.bytes += msg.size
        rid = msg.request_id
        why = self._refused(msg.size + len(items) * ROW_OVERHEAD, False)
        if why is not None:
            stats.count_dropped(_DROPPED.get(why[0], "busy"))
            if answers is not None:
                answers.refuse(rid, *why)
            return
        if self.pipeline is None:
            self._plain_readings(msg, stats, answers)
            return
        group = _Group(answers, rid, len(items)) if answers is not None else None
        now = time.time()
        for stream, epoch, seq, t, raw in items:
            body = bytes(raw)
            value = None if self.pipeline is None else decode_value(body)
            self.take(Reading(stream, now if t is None else t, value, seq), epoch, len(body),
                      stats, group, 0, msg.level, can_wait=True, body=body)  # fmt: skip

    def _plain_readings(self, msg: Readings, stats: SourceStats, answers: Answers | None) -> None:
        """READINGS on a relay without a pipeline, its room checked: every reading staged as
        received in one pass, one answer (:meth:`_plain_data`'s steps, per reading)."""
        store = self.store
        latest, committed = store.latest, store.positions
        pending = store.pending
        rows, positions = pending.rows, pending.positions
        max_streams = store.limits.max_streams
        now = time.time()
        nbytes = accepted = dups = lost = 0
        full = False
        for stream, epoch, seq, t, raw in msg.items:
            if seq:
                key = "d:" + stream
                pos = (epoch, seq)
                last = latest.get(key, _NONE)
                if pos <= last:
                    dups += 1
                    continue
                if last is _NONE and key not in committed and len(latest) >= max_streams:
                    full = True
                    continue
                if epoch == last[0] and last[1]:
                    lost += seq - last[1] - 1
                positions[key] = latest[key] = pos
            body = bytes(raw)
            rows.append((stream, seq, now if t is None else t, body))
            nbytes += len(stream) + len(body) + ROW_OVERHEAD
            accepted += 1
        pending.size += nbytes
        totals = self.totals
        totals["in_msgs"] += accepted
        totals["in_bytes"] += nbytes
        totals["out_msgs"] += accepted
        totals["out_bytes"] += nbytes
        stats.accepted += accepted
        stats.duplicates += dups
        stats.lost += lost
        if not pending.answered:
            pending.answered = True
            pending.done.append(self._answer)
        store.wake()
        if full:
            stats.count_dropped("store full")
        if answers is None:
            return
        rid = msg.request_id
        if full:  # (the rest is staged: sent again, it is taken as a retransmission)
            answers.refuse(
                rid, ErrorCode.STORE_FULL, f"the relay keeps at most {max_streams} streams"
            )
            return
        level = msg.level or (
            self.ack if not self.ack_for else min(self._level_for(i[0]) for i in msg.items)
        )
        if level == 1:
            answers.ok(rid, 1)
        else:  # (duplicates staged and not committed yet are in this batch or one before it)
            pending.acks.append((answers, rid, level, accepted > 0))

    def datagram_received(self, endpoint: DatagramPeer, data: bytes, addr: Any) -> None:
        """A DATA datagram on one of the host's UDP endpoints (its seal already checked)."""
        self._datagram(data, addr, self.source("udp sessions"), endpoint.send_datagram, endpoint)

    def _datagram(
        self,
        data: bytes,
        addr: Any,
        stats: SourceStats,
        send: Callable[[bytes, Any], None],
        endpoint: DatagramPeer | None = None,
    ) -> None:
        try:
            msg = _ONLY_EDGE.decode(parse_datagram(data, 65507))
        except RemoteProtocolError as exc:
            stats.received += 1
            stats.bytes += len(data)
            stats.count_bad(ErrorCode.describe(exc.code))
            if endpoint is not None:
                endpoint.count_bad()
            assert self.host is not None
            self.host.bad_log.warning("edge: bad datagram from %s: %s", format_peer(addr), exc)
            return
        assert isinstance(msg, Data | Readings)
        answers = _DatagramAnswers(send, addr, len(data)) if msg.request_id else None
        if isinstance(msg, Data):
            stats.received += 1
            stats.bytes += len(data)
            self._take_data(msg, stats, answers)
        else:
            assert isinstance(msg, Readings)
            self._take_readings(msg, stats, answers)

    # ------------------------------------------------------------------ lines

    def take_line(self, line: bytes, name: str, stats: SourceStats, can_wait: bool = False) -> None:
        stats.received += 1
        stats.bytes += len(line) + 1
        try:
            reading, epoch, _ = parse_line(line, time.time())
        except BadInput as exc:
            stats.count_bad(str(exc))
            assert self.host is not None
            self.host.bad_log.warning("edge %s: bad line: %s", name, exc)
            return
        self.take(reading, epoch, len(line), stats, can_wait=can_wait)

    # ------------------------------------------------------------------ fog: rows from a relay

    async def forward_in(
        self, origin: str, rows: list[Any], stats: dict[str, int] | None = None
    ) -> dict[str, int]:
        """``edge.forward`` on a relay: a downstream relay's rows are this relay's input."""
        checked = check_rows(origin, rows)
        src = self.source("relay " + origin[:64])
        key = "r:" + origin
        src.received += len(checked)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def done(batch: Batch, exc: BaseException | None) -> None:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

        def take() -> list[Row]:
            """What is new in the batch, checked against the position now (under the lock
            for an async pipeline: a copy of this batch sent meanwhile is not taken twice)."""
            _, position = self.store.position(key)
            fresh = [r for r in checked if r.id > position]
            src.duplicates += len(checked) - len(fresh)
            if fresh:
                size = sum(len(r.stream) + len(r.body) + ROW_OVERHEAD for r in fresh)
                why = self._refused(size, False, key)
                if why is not None:
                    raise EdgeError(*why)
            return fresh

        async def run() -> list[Row]:
            fresh = take()
            if not fresh:
                return fresh
            outputs: list[Reading] = []
            for r in fresh:
                reading = Reading(r.stream, r.time, decode_value(r.body), r.seq)
                if self.pipeline is None:
                    outputs.append(reading)
                elif self.pipeline.is_async:
                    outputs.extend(await self.pipeline.apush(reading, time.time()))
                else:
                    outputs.extend(self.pipeline.push(reading, time.time()))
            rows_out, nbytes = self._rows(outputs)
            self.totals["in_msgs"] += len(fresh)
            self.totals["in_bytes"] += sum(
                len(r.stream) + len(r.body) + ROW_OVERHEAD for r in fresh
            )
            changes = self.pipeline.take_changes() if self._async_lock is not None else None
            try:
                self.store.stage(rows_out, nbytes, key, (0, fresh[-1].id), changes, done)
            except StoreFull as exc:
                raise EdgeError(ErrorCode.STORE_FULL, str(exc)) from None
            src.accepted += len(fresh)
            return fresh

        if self._async_lock is not None:
            async with self._async_lock:
                fresh = await run()
        else:
            fresh = await run()
        if not fresh:  # all sent before: answered once what holds them is on disk
            position = await self._committed_through(key)
            return {"through": max(position, checked[-1].id if checked else 0), "level": 2}
        try:
            await waiter
        except Exception as exc:
            raise EdgeError(
                ErrorCode.UNAVAILABLE, f"the relay could not store them: {exc}"
            ) from None
        return {"through": fresh[-1].id, "level": 2}

    async def _committed_through(self, key: str) -> int:
        """The position of ``key`` once what is staged for it is committed (UNAVAILABLE when
        that commit failed: then the rows are in neither store, and must be sent again)."""
        staged = self.store.position(key)[1]
        if self.store.positions.get(key, _NONE)[1] < staged:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def done(batch: Batch, exc: BaseException | None) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            self.store.pending.done.append(done)
            self.store.flush()
            await waiter
        committed = self.store.positions.get(key, _NONE)[1]
        if committed < staged:
            raise EdgeError(ErrorCode.UNAVAILABLE, "the relay could not store them: send again")
        return committed

    # ------------------------------------------------------------------ visibility

    def _live(self) -> dict[str, Any]:
        fw = self.forwarder
        if fw is None:
            return {}
        return {"forward_rate": fw.rate(), "connected": fw.connected, "through": fw.through}

    def report_metrics(self) -> Sequence[tuple[str, str, str, float]]:
        store, fw, c = self.store, self.forwarder, self.store.counters
        sources = list(self.sources.values())
        age = store.oldest_age()
        out = [
            ("sockstack_edge_backlog_rows", "gauge", "Rows in the outbox", store.stored_rows),
            ("sockstack_edge_backlog_bytes", "gauge", "Bytes of rows in the outbox",
             store.stored_bytes),
            ("sockstack_edge_oldest_age_seconds", "gauge",
             "Seconds the oldest row of the outbox has waited (0: empty)", age or 0.0),
            ("sockstack_edge_received_total", "counter", "Readings and lines received",
             sum(s.received for s in sources)),
            ("sockstack_edge_bad_total", "counter", "Bad input: not a reading",
             sum(sum(s.bad.values()) for s in sources)),
            ("sockstack_edge_dropped_total", "counter",
             "Readings dropped: store full, busy, unauthenticated...",
             sum(sum(s.dropped.values()) for s in sources)),
            ("sockstack_edge_lost_total", "counter", "Readings never received (gaps in seq)",
             sum(s.lost for s in sources)),
            ("sockstack_edge_duplicates_total", "counter", "Retransmissions taken once",
             sum(s.duplicates for s in sources)),
            ("sockstack_edge_in_messages_total", "counter", "Readings into the pipeline",
             self.totals["in_msgs"]),
            ("sockstack_edge_out_messages_total", "counter", "Rows the pipeline made",
             self.totals["out_msgs"]),
            ("sockstack_edge_committed_rows_total", "counter", "Rows committed to the outbox",
             c.committed_rows),
            ("sockstack_edge_forwarded_rows_total", "counter", "Rows the upstream acknowledged",
             c.forwarded_rows),
            ("sockstack_edge_quarantined_total", "counter", "Damaged rows quarantined",
             c.quarantined),
            ("sockstack_edge_expired_total", "counter", "Rows expired (max age)", c.expired),
            ("sockstack_edge_dropped_full_total", "counter",
             "Oldest rows dropped when full (drop_oldest)", c.dropped_full),
        ]  # fmt: skip
        if fw is not None:
            out.append(("sockstack_edge_forward_failures_total", "counter",
                        "Forwarding attempts that failed", fw.failures))  # fmt: skip
        return out

    def stats(self) -> dict[str, Any]:
        """What ``sockstack edge status`` shows: the outbox, forwarding, the pipeline, sources."""
        store = self.store
        fw = self.forwarder
        c = store.counters
        return {
            "origin": store.origin,
            "store": {
                "path": store.path,
                "rows": store.stored_rows,
                "bytes": store.stored_bytes,
                "max_bytes": store.limits.max_bytes,
                "when_full": store.limits.when_full,
                "oldest_age": store.oldest_age(),
                "next_id": store.next_id,
                "streams": len(store.positions),
                "committed_rows": c.committed_rows,
                "commits": c.commits,
                "dropped_full": c.dropped_full,
                "refused_full": c.refused_full,
                "expired": c.expired,
                "quarantined": c.quarantined,
                "heals": c.heals,
                "salvaged": c.salvaged,
                "damaged_file": store.damaged_path,
            },
            "forward": None
            if fw is None
            else {
                "upstream": fw.upstream,
                "connected": fw.connected,
                "through": fw.through,
                "rows": fw.sent_rows,
                "batches": fw.sent_batches,
                "rate": fw.rate(),
                "failures": fw.failures,
                "last_error": fw.last_error,
                "waiting_acks": len(self._forward_waits),
            },
            "totals": dict(self.totals),
            "reduction": _reduction(self.totals),
            "pipeline": None if self.pipeline is None else self.pipeline.stats(),
            "sources": {name: s.as_dict() for name, s in self.sources.items()},
            "listen": [str(e) for e in self.endpoints()],
        }


def check_rows(origin: str, rows: list[Any]) -> list[Row]:
    """``edge.forward``'s rows as :class:`Row` (a relay's and a sink's input), refused whole
    with BAD_RECORD when one is malformed, damaged (checksum) or out of order."""
    if not isinstance(origin, str) or not 0 < len(origin) <= 64:
        raise EdgeError(ErrorCode.BAD_RECORD, "origin must be 1-64 characters")
    out: list[Row] = []
    last = 0
    for values in rows:
        try:
            i, stream, seq, t, body, crc = values
            row = Row(int(i), str(stream), int(seq), float(t), bytes(body), int(crc))
        except (TypeError, ValueError):
            raise EdgeError(
                ErrorCode.BAD_RECORD, "a row is [id, stream, seq, time, body, crc]"
            ) from None
        if not row.intact():
            raise EdgeError(ErrorCode.BAD_RECORD, f"row {row.id}: checksum does not match")
        if row.id <= last:
            raise EdgeError(ErrorCode.BAD_RECORD, f"row ids must rise ({row.id} after {last})")
        last = row.id
        out.append(row)
    return out


class Sink(Pattern):
    """The cloud side: ``edge.forward`` into a sink store (edge/sink.py), exactly once."""

    name = "edge-sink"

    def __init__(self, store: Any) -> None:
        self.store = store

    def methods(self) -> Mapping[str, Handler]:
        return {
            "edge.forward": make_handler("edge.forward", self.forward_in, inline=False),
            "edge.stats": make_handler("edge.stats", self.stats, inline=False, readonly=True),
        }

    def forward_in(
        self, origin: str, rows: list[Any], stats: dict[str, int] | None = None
    ) -> dict[str, int]:
        """Store a relay's rows, each once; answers through which id they are durable
        (docs/PROTOCOL.md §4.6). On a worker thread: the database's transaction blocks."""
        from sockstack.edge.sink import BadBatch, SinkError

        checked = check_rows(origin, rows)
        try:
            through = self.store.accept(origin, checked, stats)
        except BadBatch as exc:
            raise EdgeError(ErrorCode.BAD_RECORD, str(exc)) from None
        except SinkError as exc:
            log.error("sink: %s", exc)
            raise EdgeError(ErrorCode.UNAVAILABLE, str(exc)) from None
        return {"through": int(through), "level": 2}

    def stats(self) -> dict[str, Any]:
        """What the sink holds: totals, and per relay its position, rows, duplicates, gaps and
        how much it reduced its data."""
        return dict(self.store.stats())

    def report_metrics(self) -> Sequence[tuple[str, str, str, float]]:
        try:
            totals = self.store.stats()["totals"]
        except Exception:  # (the database is down: the scrape goes on without these)
            return ()
        return [
            ("sockstack_sink_rows_total", "counter", "Rows stored, once each", totals["rows"]),
            ("sockstack_sink_duplicates_total", "counter", "Rows sent again, skipped",
             totals["duplicates"]),
            ("sockstack_sink_missing_total", "counter",
             "Ids never received (relays that dropped or quarantined rows)", totals["missing"]),
            ("sockstack_sink_relays", "gauge", "Relays (origins) seen", totals["origins"]),
        ]  # fmt: skip

    async def closed(self) -> None:
        self.store.close()


class _LineStream(asyncio.Protocol):
    """A connection on a relay's TCP listener: a sockstack session (handed to the host) or
    lines of readings."""

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.first = b""
        self.decoder = LineDecoder(relay.max_line)
        self.stats_json = relay.source(f"{name} lines")
        self.paused = False
        self.backlog: list[bytes] = []
        """Lines read and not taken yet (at most one read's): the store's batch was full."""
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's: not a subclass)
        if len(self.relay._lines) >= MAX_LINE_CONNECTIONS:
            self.stats_json.count_dropped("too many connections")
            self.transport.close()
            return
        self.relay._lines.add(self)

    def data_received(self, data: bytes) -> None:
        if self.first is not None and len(self.first) < len(FRAME_PREFIX):
            self.first += data
            if len(self.first) < len(FRAME_PREFIX) and FRAME_PREFIX.startswith(self.first):
                return
            data, self.first = self.first, None  # type: ignore[assignment]
            if data.startswith(FRAME_PREFIX):  # a sockstack session: the host's
                self.relay._lines.discard(self)
                adopt = getattr(self.relay.host, "adopt_stream", None)
                assert self.transport is not None and adopt is not None
                adopt(self.transport, data)
                return
            if self.relay.host is not None and self.relay.host.secret is not None:
                self.stats_json.count_dropped("unauthenticated (the relay has a secret)")
                assert self.transport is not None
                self.transport.close()
                return
        self.backlog.extend(self.decoder.feed(data))
        if self.decoder.too_long:
            for _ in range(self.decoder.too_long):
                self.stats_json.count_bad("line too long")
            self.decoder.too_long = 0
        self._take()

    def _take(self) -> None:
        """Take the lines read, until the staged bytes reach the store's bound: then stop
        reading (backpressure) and keep the rest (at most one read) for after the commit."""
        relay = self.relay
        stats = self.stats_json
        store = relay.store
        bound = store.limits.max_pending_bytes
        lines = self.backlog
        i = 0
        n = len(lines)
        while i < n:
            if store.pending.size + relay.waiting_bytes >= bound:
                break
            line = lines[i]
            i += 1
            if line.strip():
                relay.take_line(line, self.name, stats, can_wait=True)
        del lines[:i]
        if lines and not self.paused and self.transport is not None:
            self.paused = True  # read on once the commit under way is done
            relay._paused.add(self)
            self.transport.pause_reading()
        if self.ended and not lines:
            self._end()

    def resume(self) -> None:
        self.relay._paused.discard(self)
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()
            self._take()

    def eof_received(self) -> bool | None:
        self.ended = True
        if not self.backlog:
            self._end()
        return True  # (closed by us once the backlog is taken)

    def _end(self) -> None:
        for line in self.decoder.end():
            if line.strip():
                self.relay.take_line(line, self.name, self.stats_json)
        self.ended = False
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._lines.discard(self)
        self.relay._paused.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Datagrams(asyncio.DatagramProtocol):
    """A relay's UDP listener: DATA datagrams and lines (one or more per datagram)."""

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None
        self.frames = relay.source(f"{name} frames")
        self.lines = relay.source(f"{name} lines")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        relay = self.relay
        secret = relay.host.secret if relay.host is not None else None
        if data.startswith(FRAME_PREFIX):
            if secret is not None:
                self.frames.count_dropped("unauthenticated (use the host's --udp endpoint)")
                return
            assert self.transport is not None
            relay._datagram(data, addr, self.frames, self.transport.sendto)
            return
        if secret is not None:
            self.lines.count_dropped("unauthenticated (the relay has a secret)")
            return
        for line in data.split(b"\n"):
            if line.strip():
                relay.take_line(line, self.name, self.lines)
