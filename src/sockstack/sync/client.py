"""The blocking client, for scripts: plain ``socket`` calls driving the same sans-I/O core::

    with connect("tcp://127.0.0.1:5050") as c:
        assert c.call("add", 2, 3) == 5

A client is safe to share between threads, and their calls are *pipelined* on its one
connection (or UDP socket): 8 threads each calling a method that takes 0.2 s finish together in
about 0.2 s. There is no background thread. Each call sends its request at once; then one of the
threads waiting reads the socket for all of them (the *leader*) and hands every other thread its
answer, matched by request id; when the leader's own answer has come it hands the reading over
to a thread still waiting (leader/follower). A single-threaded caller is always the leader: it
reads its own answer on its own thread, with no hand-off, as before. Each call keeps its own
timeout; an exception in one thread (``KeyboardInterrupt`` included) ends only that thread's
call.

TCP: a lost connection fails every call in flight at once with :class:`ConnectionLost` (or
:class:`ConnectionClosed`), and the next call reconnects (with backoff, within its own timeout;
one thread connects, the others wait for it within theirs). :meth:`Client.close` from one thread
fails the calls other threads have in flight with :class:`ConnectionLost` ("the client was
closed"). UDP: retransmission with the same request id until the call's timeout, per call; the
server runs a retried call once. With a ``secret``, UDP calls are made one at a time (a call's
retransmissions are sealed for the server epoch its first datagram was sealed for, which the
client tracks for the call in flight). When nothing listens on the server's port, the host
answers ICMP port unreachable, reported as ECONNREFUSED on the connected socket; on Linux the
kernel also names the datagram it answered (:mod:`sockstack.transport.udperr`), so each refusal
counts for its own call only, and nothing is sent again at once (the call's retransmission
schedule sends its next datagram, which a server still starting gets). A call fails at once
with :class:`ConnectError` ("did not run") when every datagram of it that left was refused and
it had sent two at least, and with :class:`ConnectionLost` ("may or may not have run") when two
were refused after an earlier one was not; a PING fails when its one datagram is refused.
Elsewhere refusals are not attributed and calls end at their timeout. A call's timeout bounds
connecting too: :func:`connect` takes
at most ``min(connect_timeout, timeout)``, and a reconnect within a call never outlives the
call's deadline.

After ``os.fork()`` a client is safe to use in both processes: the child's copy lets go of the
parent's connection (its copy of the socket is closed, nothing is sent on it, so the parent's
session stays open) and its next call connects afresh; over UDP the child gets a new socket (a
new source port) and new random request ids, so the server's reply cache never answers one
process with the other's results. The calls other threads of the parent had in flight at the
fork are not the child's (those threads do not exist there): the child starts with no call
waiting and locks of its own. This happens in an ``os.register_at_fork`` hook: the calls
themselves check nothing.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import random
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Self, cast, overload

from sockstack.errors import (
    CallTimeout,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
)
from sockstack.interceptors import ClientCall, Hooks, StreamHooks, run_sync
from sockstack.protocol.auth import (
    NO_EPOCH,
    REFUSAL_SIZE,
    TRAILER_SIZE,
    AuthFailure,
    refusal_of,
    token_extension,
    trailer_of,
    unsealed_refusal,
)
from sockstack.protocol.calls import (
    CURRENT_CALL,
    DEFAULT_WINDOW,
    FEATURES,
    INLINE_CALLS,
    Backoff,
    Calls,
    Failover,
    ItemStream,
    ItemUpload,
    PendingCall,
    Reply,
    batch_answers,
    batch_plan,
    budget_ms,
    deadline_passed,
    inherited_timeout,
    merge_metadata,
    outcome,
    plan_call,
    remote_error,
)
from sockstack.protocol.codecs import MSGPACK, Codec
from sockstack.protocol.connection import Connection, State
from sockstack.protocol.datagram import DEFAULT_MAX_DATAGRAM, RetryPolicy
from sockstack.protocol.events import (
    ConnectionTerminated,
    Credit,
    Error,
    Event,
    Item,
    Metadata,
    PatternMessage,
    Pong,
    Response,
    Role,
)
from sockstack.protocol.frames import DEFAULT_MAX_FRAME, HEADER_SIZE, MessageType, declared_size
from sockstack.protocol.messages import (
    FEATURE_BATCH,
    FEATURE_DEADLINE,
    FEATURE_STREAM,
    FEATURE_UPLOAD,
    MAX_BUDGET_MS,
    MIN_MAX_FRAME,
    encode_item_end,
    encode_ping,
    encode_request,
)
from sockstack.transport.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    ClientSettings,
    refusal_verdict,
    udp_gone,
    udp_refused,
)
from sockstack.transport.tls import handshake_failure, handshake_lost, tls_reason
from sockstack.transport.udperr import enable_refusal_reports, refused_request_ids
from sockstack.transport.urls import Endpoint

__all__ = [
    "Client",
    "DatagramConnection",
    "ResultStream",
    "StreamConnection",
    "Ticket",
    "connect",
]

_RECV = 256 * 1024
_GATHER_ABOVE = 64 * 1024
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux: hold writes for the next one
# Reads go into one preallocated buffer per connection: sock.recv(256 KiB) would allocate (and
# mmap/mremap/munmap, above glibc's mmap threshold) a fresh 256 KiB object on every call.
Route = Callable[[Any], None]
_REQUEST_ID = struct.Struct(">I")
_TYPE = 3  # offset of the message type in a frame
_ERROR = int(MessageType.ERROR)
_PONG = int(MessageType.PONG)
_PING = int(MessageType.PING)
_rng = random.Random()
_OPEN = State.OPEN
_CURRENT_CALL = CURRENT_CALL
_INLINE_CALLS = INLINE_CALLS  # (non-empty in a process that runs a host)
_DEADLINE_EXCEEDED = int(ErrorCode.DEADLINE_EXCEEDED)
_DECODE = int(ErrorCode.DECODE_ERROR)
_FEATURE_DEADLINE = FEATURE_DEADLINE
_BUDGET_CAP_S = MAX_BUDGET_MS / 1000  # budget_ms's bound, in seconds
_monotonic = time.monotonic
_SEQUENCES = frozenset((tuple, list))  # a call's arguments as they go in a BATCH body
_FRESH_S = 0.0002
"""A call that begins within this long of the start of the previous call answered on the fast
path does not look for data that came while idle (a poll() system call): in a loop of calls
the connection is never idle. Anything that came is read with the call's own answer."""


def _answer(value: Any, with_metadata: bool) -> Any:
    """What a call returns: its result, or a :class:`Reply` with the server's trailers (a
    settled value is a Reply when the RESPONSE carried trailers)."""
    if type(value) is Reply:
        return value if with_metadata else value.result
    return Reply(value, {}) if with_metadata else value


class _Slot(PendingCall[None]):
    """One thread waiting on a connection: for the answer to its call (``rid``), or until a
    condition holds (``until``: a subscription's messages have come). Its outcome (``done``,
    ``ok``, ``value``) is written under the connection's mutex, by whichever thread settles it;
    ``event`` wakes it when it waits as a follower."""

    __slots__ = ("done", "event", "left", "ok", "track", "until", "value")

    def __init__(self, until: Callable[[], bool] | None = None) -> None:
        # A PendingCall of the call table itself (its waiter is the slot): one object per call.
        # The other fields (method, timeout, deadline) are set by _register.
        self.request_id = 0
        self.until = until
        self.done = False
        self.event: threading.Event | None = None
        self.left = False  # its thread has stopped waiting (all done under the mutex)
        self.track = False
        # Set when settled: ok, value (the result, or the exception to raise). track: UDP, the
        # datagram core retransmits it (a PING it does not); TCP/TLS, a REQUEST (CANCEL it when
        # its thread gives up).
        self.ok: bool
        self.value: Any


class _Gone(Exception):
    """Raised inside a read after the connection was dropped (every waiting call is failed)."""


def _lost(ep: Endpoint, why: str) -> Callable[[], BaseException]:
    return lambda: ConnectionLost(f"{ep}: {why}; the call may or may not have run")


class _Pipeline:
    """The calls in flight on one connection or socket, and who reads for them.

    Leader/follower: a thread waiting for an answer becomes the *leader* if nobody reads (it
    reads the socket, settles every call whose answer comes, routes pattern messages) or waits
    on its slot's event as a *follower*. A leader whose own call has ended hands the reading to
    a follower (:meth:`_leave`). Every wait is bounded by its own call's deadline.

    Locks: ``_mutex`` (short: the call table, the slots, who leads) is never held while
    blocking, and never taken before ``_io`` (the sending side: the core's output and the
    socket's writes; over TLS, reads too).
    """

    def _init_pipeline(self) -> None:
        self._mutex = threading.Lock()
        self._io = threading.RLock()
        self.calls: Calls[None] = Calls()  # its PendingCalls are the _Slots
        self._leader: _Slot | None = None
        self._waiting: set[_Slot] = set()  # followers blocked on their event
        self._watchers: set[_Slot] = set()  # read_until's slots (settled by a condition)
        self.settled = 0  # counts the reads that settled calls, and the failures of all
        # Streamed calls in flight (TCP/TLS), by request id: their ITEMs are queued there.
        self.item_streams: dict[int, ItemStream] = {}
        self.abandoned: list[Any] = []  # ResultStreams dropped where __del__ could not stop them
        # Uploads in flight (TCP/TLS), by request id: the server's CREDITs are counted there.
        self.uploads: dict[int, ItemUpload] = {}

    def _register(self, slot: _Slot, method: str, timeout: float, now: float, rid: int = 0) -> int:
        """Record ``slot``'s call (the caller holds ``_mutex``) with a fresh id unless ``rid``
        is given; returns its id. The deadline is the waiting thread's to keep, not the table's
        (as ``Calls.start(..., timed=False)``, without a second object)."""
        calls = self.calls
        slot.request_id = rid = rid or calls.new_id()
        slot.method, slot.timeout, slot.deadline, slot.waiter = method, timeout, now + timeout, None
        calls.pending[rid] = slot
        return rid

    def _settle(self, events: Sequence[Any]) -> None:
        """Hand each answer in ``events`` to the call it answers (by request id alone: an answer
        to a call that has stopped waiting is nobody's), and wake the threads whose condition
        now holds. A stream that failed here (an ITEM beyond the window or one that does not
        decode) is cancelled at once, by this thread, once the mutex is released."""
        failed: list[int] | None = None
        with self._mutex:
            self.settled += 1
            take = self.calls.take
            for ev in events:
                if type(ev) is Response or type(ev) is Error or type(ev) is Pong:
                    pending = take(ev)
                    if pending is not None:
                        if self.item_streams:  # no ITEM follows an answer: stop queueing
                            stream = self.item_streams.pop(ev.request_id, None)
                            if stream is not None and type(ev) is Error and ev.code == _DECODE:
                                # Not the server's answer: an ITEM this client cannot decode.
                                failed = (failed or []) + [ev.request_id]
                        slot: _Slot = pending  # type: ignore[assignment]  # (no cast call)
                        slot.ok, slot.value = outcome(ev)
                        if type(ev) is Response and ev.metadata is not None:
                            slot.value = Reply(ev.result, ev.metadata)  # the server's trailers
                        slot.done = True
                        if slot.event is not None:
                            slot.event.set()
                elif type(ev) is Item:
                    if self._queue_item(ev):
                        failed = (failed or []) + [ev.request_id]
                elif type(ev) is Credit:
                    up = self.uploads.get(ev.request_id)
                    if up is not None:  # else: not an upload in flight (ended, or never)
                        up.credit(ev.granted)
            if self._watchers:
                self._wake_watchers()
        if failed:
            for rid in failed:
                self._cancel(rid)

    def _cancel(self, request_id: int) -> None:
        """Tell the server a call is given up on (TCP/TLS: CANCEL; nothing over UDP)."""

    def _queue_item(self, ev: Item) -> bool:
        """Queue a streamed call's ITEM (under ``_mutex``); True when it broke the stream: one
        beyond the flow-control window ends the call here with :class:`RemoteProtocolError`
        (the caller then sends CANCEL). An ITEM of a stream given up on, or answered, is
        dropped."""
        rid = ev.request_id
        items = self.item_streams.get(rid)
        if items is None:
            return False
        problem = items.feed(ev)
        if problem is None:
            return False
        del self.item_streams[rid]
        pending = self.calls.pending.pop(rid, None)
        if pending is not None:
            slot: _Slot = pending  # type: ignore[assignment]
            slot.ok, slot.value, slot.done = False, RemoteProtocolError(problem), True
        return True

    def _wake_watchers(self) -> None:
        for slot in self._watchers:  # under _mutex
            if slot.event is not None and not slot.done and slot.until is not None:
                if slot.until():
                    slot.event.set()

    def _fail(self, slots: Sequence[_Slot], error: Callable[[], BaseException]) -> None:
        """Fail ``slots`` still waiting with ``error()`` (a new exception each: they are raised
        in different threads). The caller holds ``_mutex``."""
        self.settled += 1
        for slot in slots:
            if not slot.done:
                slot.ok, slot.value, slot.done = False, error(), True
                if slot.event is not None:
                    slot.event.set()

    def _fail_all(self, error: Callable[[], BaseException]) -> None:
        with self._mutex:
            slots = [cast(_Slot, p) for p in self.calls.drain()]
            self._fail(slots + list(self._watchers), error)

    def _step(self, slot: _Slot, deadline: float, method: str, timeout: float) -> None:
        """As the leader: one read and what it brought handled (or a retransmission timer)."""
        raise NotImplementedError

    def _wait(self, slot: _Slot, deadline: float, method: str, timeout: float) -> Any:
        """Wait, leading or following, until ``slot`` is settled; its result, or raise its
        error (:class:`CallTimeout` at ``deadline``)."""
        mutex = self._mutex
        while True:
            with mutex:
                if not slot.done and slot.until is not None and slot.until():
                    slot.ok, slot.value, slot.done = True, None, True
                if slot.done:
                    break
                leader = self._leader
                if leader is None:
                    self._leader = leader = slot
                event = None
                if leader is not slot:
                    event = slot.event
                    if event is None:
                        event = slot.event = threading.Event()
                    else:
                        event.clear()
                    self._waiting.add(slot)
            if leader is slot:
                self._step(slot, deadline, method, timeout)
                continue
            assert event is not None
            left = deadline - time.monotonic()
            woken = left > 0 and event.wait(left)
            with mutex:
                self._waiting.discard(slot)
                if not woken and not slot.done:
                    raise CallTimeout(method, timeout)
        if slot.ok:
            return slot.value
        raise slot.value

    def _leave(self, slot: _Slot) -> bool:
        """``slot``'s thread stops waiting (answered, failed, timed out or interrupted): a later
        answer to its id is nobody's; if it was reading, a follower takes over. True when its
        call was still waiting for an answer (the caller gave up on it)."""
        if slot.left:
            return False
        gave_up = False
        with self._mutex:
            slot.left = True
            rid = slot.request_id
            if rid and not slot.done and self.calls.pending.get(rid) is slot:  # (not another
                gave_up = self.calls.forget(rid) is not None  # table's call of the same id)
            if slot.until is not None:
                self._watchers.discard(slot)
            waiting = self._waiting
            waiting.discard(slot)
            if self._leader is slot:
                self._leader = None
            if self._leader is None and waiting:  # (also when a follower woken to lead left)
                self._promote()
        return gave_up

    def _promote(self) -> None:
        """Wake a follower to take over the reading (under ``_mutex``)."""
        follower = next(iter(self._waiting))
        assert follower.event is not None
        follower.event.set()


class Ticket:
    """A request sent whose answer is waited for later (:meth:`StreamConnection.start_exchange`):
    by this thread or another, before or after other calls."""

    __slots__ = ("_conn", "_deadline", "_slot", "_timeout", "_what")

    def __init__(
        self, conn: _Pipeline, slot: _Slot, deadline: float, what: str, timeout: float
    ) -> None:
        self._conn = conn
        self._slot = slot
        self._deadline = deadline
        self._what = what
        self._timeout = timeout

    @property
    def request_id(self) -> int:
        return self._slot.request_id

    def done(self) -> bool:
        """The answer came (or the call failed): :meth:`result` returns at once."""
        return self._slot.done

    def result(self) -> Any:
        """The RESPONSE's result (waiting for it, within the timeout the request was sent
        with); raises :class:`RemoteError`, :class:`CallTimeout` or
        :class:`ConnectionLost` as a call does. May be called again (same outcome)."""
        slot = self._slot
        try:
            return self._conn._wait(slot, self._deadline, self._what, self._timeout)
        finally:
            self._conn._leave(slot)

    def cancel(self) -> None:
        """Stop waiting for the answer: a later one is nobody's, and a call still running is
        cancelled on the server (CANCEL, when it announced it). Nothing once answered."""
        slot = self._slot
        if isinstance(self._conn, StreamConnection):
            slot.track = True  # a REQUEST given up on: its _leave sends CANCEL
        self._conn._leave(slot)


class StreamConnection(_Pipeline):
    """One blocking TCP/TLS connection driving a :class:`Connection` core, shared by threads.

    Timeouts use the kernel's SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket rather than Python's
    socket timeouts, which poll() before every recv: one system call per read instead of two.
    Over plain TCP the leader reads while other threads write (whole frames, under ``_io``);
    over TLS every use of the TLS object is under ``_io`` (OpenSSL does not allow a read and a
    write at once on one connection), so the leader waits for data with ``poll()`` outside it;
    a thread writing a large TLS request holds it until the kernel has taken the bytes, and
    reading waits meanwhile (a server that stops reading until its answers are read fails the
    write at the writer's timeout, SO_SNDTIMEO, as a single thread's would).

    What patterns use: :meth:`exchange` (a frame that gets a RESPONSE), :meth:`send_frame` (one
    that gets none), :meth:`read_until`, ``routes`` (message class -> handler, called for
    messages read during any call, by whichever thread reads) and ``state`` (their
    per-connection state). All of them are safe to call from any thread.
    """

    kind = "stream"

    def __init__(self, eps: list[Endpoint], client: Client) -> None:
        self.failover: Failover[Endpoint] = Failover(eps)
        self.client = client
        self.sock: socket.socket | None = None
        self.core: Connection | None = None
        self.live = False
        """True from the server's WELCOME until the connection is dropped."""
        self._init_pipeline()
        self._connecting = threading.Lock()
        self.routes: dict[type, Route] = {}
        self.state: dict[str, Any] = {}
        self.ever_connected = False
        self._sock_timeout = 0.0
        self._poller: select.poll | None = None  # for a look before a call (not waiting)
        self._answered = -math.inf  # when the last call answered on the fast path began
        self._lead_poller: select.poll | None = None  # TLS: the leader waits for data on it
        self._buf = bytearray(_RECV)
        self._view = memoryview(self._buf)
        self._limit = HEADER_SIZE + client.max_frame  # the largest frame read whole
        self._tls = eps[0].scheme == "tls"
        # Frames written corked (TCP_CORK; :meth:`start_exchanges` and :meth:`send_frame` with
        # ``hold``): the kernel keeps them until the next write without ``hold``, a wait here
        # (:meth:`push`), or 200 ms at most (tcp(7)). Not MSG_MORE: an ACK that comes in
        # pushes what MSG_MORE held when TCP_NODELAY is set. Plain TCP on Linux only (TLS
        # writes go at once).
        # (no more attributes here without need: past ~29, CPython 3.11 stops sharing the
        # instance dict's keys and every attribute read on the hot path gets slower)
        self._corked = False

    @property
    def ep(self) -> Endpoint:
        return self.failover.current

    def _connect(self, deadline: float) -> None:
        """Connect to the current server, else to the next ones in the list (failover)."""
        errors = []
        for index, ep in self.failover.attempts():
            try:
                self._connect_one(ep, deadline)
            except ConnectError as exc:
                errors.append(str(exc))
                continue
            self.failover.connected(index)
            return
        raise Failover.all_failed(errors)

    def _connect_one(self, ep: Endpoint, deadline: float) -> None:
        # Connect, TLS and HELLO together within connect_timeout and the call's deadline.
        now = time.monotonic()
        deadline = min(deadline, now + self.client.connect_timeout)
        timeout = max(0.001, deadline - now)
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
        except OSError as exc:
            raise ConnectError(f"{ep}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ep.scheme == "tls":
            assert self.client.tls is not None
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:  # the handshake runs under the connect timeout still set on the socket
                sock = self.client.tls.wrap_socket(sock, server_hostname=ep.host)
            except ssl.SSLError as exc:
                sock.close()
                raise ConnectError(f"{ep}: TLS: {tls_reason(exc)}") from None
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
                sock.close()
                raise ConnectError(f"{ep}: {handshake_lost(exc)}") from None
            except OSError as exc:
                sock.close()
                raise ConnectError(f"{ep}: TLS handshake: {exc.strerror or exc}") from None
        if ep.scheme == "tls":
            # Non-blocking: a blocking TLS read ignores SO_RCVTIMEO (the ssl module retries
            # SSL_read until application data comes, e.g. after a session ticket), so TLS reads
            # and writes wait with poll() (the read outside _io, see _step_tls).
            sock.setblocking(False)
        else:
            sock.settimeout(None)
        secret = self.client.secret
        core = Connection(
            Role.CLIENT,
            registry=self.client.registry,
            max_frame=self.client.max_frame,
            keepalive_interval=None,
            handshake_timeout=None,
            hello_extensions=[token_extension(secret)] if secret is not None else (),
        )
        self.sock, self.core = sock, core
        self._set_timeout(max(0.001, deadline - time.monotonic()))
        try:
            self._hello(ep, deadline)
        except BaseException:
            self.drop()
            raise
        self.ever_connected = True
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if self._tls:
            self._lead_poller = select.poll()
            self._lead_poller.register(sock, select.POLLIN)
        self.live = True  # other threads' calls may go out from here on
        self._poller = poller  # (after live: a call that sees it finds the connection live)

    def _hello(self, ep: Endpoint, deadline: float) -> None:
        """Send HELLO and read until WELCOME. Every failure is a :class:`ConnectError` (no call
        was sent) saying what is most likely wrong."""
        sock, core = self.sock, self.core
        assert sock is not None and core is not None
        tls = ep.scheme == "tls"
        try:
            self._sendall(sock, core.data_to_send())
            waiter = None
            if isinstance(sock, ssl.SSLSocket):  # non-blocking: wait for data with poll()
                waiter = select.poll()
                waiter.register(sock, select.POLLIN)
            while core.state is State.HELLO_SENT:
                try:
                    if waiter is not None and not sock.pending():  # type: ignore[attr-defined]
                        left = deadline - time.monotonic()
                        if left <= 0 or not waiter.poll(int(left * 1000) + 1):
                            raise BlockingIOError
                    n = sock.recv_into(self._buf)
                except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO expired
                    left = deadline - time.monotonic()
                    if left > 0:
                        self._set_timeout(left)
                        continue
                    raise ConnectError(
                        f"{ep}: no answer to HELLO in time: is it a sockstack server?"
                        + ("" if tls else " If it expects TLS, use a tls:// URL")
                    ) from None
                for ev in self._events(n):
                    if type(ev) is ConnectionTerminated:
                        why = handshake_failure(ev.code, ev.reason, ev.by_peer, tls=tls)
                        raise ConnectError(f"{ep}: {why}")
                if core.close_expected():  # ended by the core without a terminating event
                    raise ConnectError(f"{ep}: {handshake_failure(None, '', True, tls=tls)}")
        except ConnectError:  # an OSError too
            raise
        except ssl.SSLError as exc:  # an alert after the client's handshake (TLS 1.3)
            raise ConnectError(f"{ep}: TLS: {tls_reason(exc)}") from None
        except OSError as exc:  # reset, broken pipe...
            why = handshake_failure(None, "", True, tls=tls)
            raise ConnectError(f"{ep}: {why} ({exc.strerror or exc})") from None

    def drop(
        self, error: Callable[[], BaseException] | None = None, only: socket.socket | None = None
    ) -> None:
        """Close the connection (``only`` if it is still that socket). Every call waiting on it
        (any thread's) fails at once with ``error()``, by default :class:`ConnectionLost`; a
        thread blocked reading it is woken."""
        with self._mutex:
            sock = self.sock
            if only is not None and sock is not only:
                return  # a connection already dropped (and maybe replaced) by another thread
            self.sock, self.core, self._poller, self.live = None, None, None, False
            self._lead_poller = None
            self._corked = False
            self.item_streams.clear()  # their readers hold them: items queued stay readable
            self.uploads.clear()
            slots = [cast(_Slot, p) for p in self.calls.drain()]
            self._fail(slots + list(self._watchers), error or _lost(self.ep, "connection lost"))
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a leader blocked in recv (close does not)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    def ensure(self, deadline: float, method: str, timeout: float) -> None:
        """Connect if not connected: one thread connects (and reconnects with backoff), the
        others wait for it, each within its own deadline."""
        if self.live:
            return
        if not self._connecting.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise CallTimeout(method, timeout, "not connected: another thread is connecting")
        try:
            if not self.live:
                self._reconnect(deadline, method, timeout)
        finally:
            self._connecting.release()

    def _reconnect(self, deadline: float, method: str, timeout: float) -> None:
        if self.sock is not None:
            self.drop()  # ended while no call was reading
        if not self.ever_connected:
            self._connect(deadline)
            return
        attempt = 0
        last = ""
        while True:
            try:
                self._connect(deadline)
                return
            except ConnectError as exc:
                last = str(exc)
            delay = self.client.backoff.delay(attempt)
            attempt += 1
            if time.monotonic() + delay >= deadline:
                raise CallTimeout(method, timeout, f"not connected: {last}")
            time.sleep(delay)  # reconnect backoff, bounded by the call's deadline

    def _idle(self) -> bool:
        """Something arrived while no call was reading (a keepalive PING, the server's CLOSE,
        a subscription's message)."""
        poller, sock = self._poller, self.sock
        if poller is None or sock is None:
            return False
        try:
            if poller.poll(0):
                return True
        except RuntimeError:  # another thread polls at this moment: it will read what came
            return False
        return self._tls and isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def _tls_pending(self) -> bool:
        """Bytes the TLS layer decrypted already (poll() does not see them)."""
        sock = self.sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def _read_idle(self, deadline: float, method: str, timeout: float) -> None:
        """Handle what arrived while idle before sending, so that a request never goes out on a
        session the server has ended; only when nobody else reads (else the leader does)."""
        slot = _Slot()
        with self._mutex:
            if self._leader is not None:
                return
            self._leader = slot
        try:
            while self.live and self._idle():
                self._step(slot, deadline, method, timeout)
        finally:
            self._leave(slot)

    def _sendall(self, sock: socket.socket, data: bytes) -> None:
        """``sock.sendall(data)``; over TLS (a non-blocking socket) with poll() while the
        kernel's buffer is full, within the client's timeout (then BlockingIOError, as an
        expired SO_SNDTIMEO). The caller holds ``_io`` once connected."""
        if not isinstance(sock, ssl.SSLSocket):
            sock.sendall(data)
            return
        view = memoryview(data)
        pos, total = 0, len(view)
        deadline = time.monotonic() + self.client.timeout
        waiter: select.poll | None = None
        while pos < total:
            try:
                pos += sock.send(view[pos:])
                continue
            except ssl.SSLWantWriteError:
                want = select.POLLOUT
            except ssl.SSLWantReadError:
                want = select.POLLIN
            left = deadline - time.monotonic()
            if left <= 0:
                raise BlockingIOError("the TLS write did not finish in time")
            if waiter is None:
                waiter = select.poll()
                waiter.register(sock, want)
            else:
                waiter.modify(sock, want)
            waiter.poll(int(left * 1000) + 1)

    def _send(
        self, data: bytes | list[bytes], method: str, sock: socket.socket, hold: bool = False
    ) -> None:
        """Write whole frames (the caller holds ``_io``). A frame cut short would leave the
        stream unreadable: the connection is dropped (every call fails) on any failure.
        ``hold``: with MSG_MORE where it works (the frames leave with the next write)."""
        try:
            if _TCP_CORK is not None and not self._tls:
                if hold:
                    if not self._corked:
                        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
                        self._corked = True
                    sock.sendall(data if isinstance(data, bytes) else b"".join(data))
                    return
                if self._corked:  # this write, then everything held, leaves now
                    sock.sendall(data if isinstance(data, bytes) else b"".join(data))
                    self._uncork(sock)
                    return
            if isinstance(data, bytes):
                if self._tls:
                    self._sendall(sock, data)
                else:
                    sock.sendall(data)
            elif isinstance(sock, ssl.SSLSocket):  # TLS encrypts a copy anyway: no sendmsg
                self._sendall(sock, b"".join(data))
            else:
                total = sum(len(p) for p in data)
                sent = sock.sendmsg(data)
                if sent < total:  # finish what the kernel did not take at once
                    sock.sendall(memoryview(b"".join(data))[sent:])
        except (BlockingIOError, ssl.SSLWantWriteError):  # SO_SNDTIMEO: server not reading
            self.drop(_lost(self.ep, "a write timed out (server not reading)"), sock)
            raise CallTimeout(method, self._sock_timeout, "server not reading") from None
        except OSError as exc:
            self.drop(_lost(self.ep, str(exc)), sock)
            raise ConnectionLost(f"{self.ep}: {exc}; the call may or may not have run") from None
        except BaseException:  # interrupted part-way: the stream is not whole any more
            self.drop(_lost(self.ep, "a write was interrupted"), sock)
            raise

    def _set_timeout(self, seconds: float, sock: socket.socket | None = None) -> None:
        sock = self.sock if sock is None else sock
        assert sock is not None
        seconds = max(seconds, 0.001)
        sec = int(seconds)
        tv = struct.pack("@ll", sec, int((seconds - sec) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._sock_timeout = seconds

    def _recv(
        self, deadline: float, method: str, sock: socket.socket, into: memoryview | None = None
    ) -> int:
        """One read into the connection's buffer (or ``into``): bytes read (0 at end of stream),
        or -1 when the socket's timeout expired before the call's deadline. Raises _Gone when
        the connection failed (dropped: every call has its error)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CallTimeout(method, self.client.timeout)
        t = self._sock_timeout
        if remaining < t * 0.9 or remaining > t * 1.1:
            self._set_timeout(remaining, sock)  # re-armed only when off by more than 10 %
        try:
            return sock.recv_into(self._buf if into is None else into)
        except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO expired
            if time.monotonic() >= deadline:
                raise CallTimeout(method, self.client.timeout) from None
            return -1
        except OSError as exc:
            self.drop(_lost(self.ep, str(exc)), sock)
            raise _Gone from None

    def _events(self, n: int, deadline: float = 0.0, method: str = "") -> list[Event]:
        """The events of ``n`` bytes just read (0: end of stream). With a ``deadline``, a large
        frame begun in these bytes is read whole, straight into its own buffer."""
        core = self.core
        if core is None:
            raise _Gone
        if n:
            view = self._view[:n]
            single = core.receive_single(view)  # the common case: one whole RESPONSE
            if single is not None:
                return [single]
            if deadline and n >= HEADER_SIZE and not core.buffered:
                total = declared_size(view)
                if total is not None and n < total and _GATHER_ABOVE < total <= self._limit:
                    return self._large(core, view, total, deadline, method)
            return self._feed(core, view.tobytes())
        return self._feed(core, None)

    def _large(
        self, core: Connection, first: memoryview, total: int, deadline: float, method: str
    ) -> list[Event]:
        """Read the rest of a large frame into one buffer and decode it from there: no copies
        of the chunks and no join (the kernel writes where the frame will be decoded)."""
        sock = self.sock
        if sock is None:
            raise _Gone
        frame = bytearray(total)
        view = memoryview(frame)
        have = len(first)
        view[:have] = first
        try:
            while have < total:
                n = self._recv(deadline, method, sock, view[have:])
                if n == 0:
                    return self._feed(core, bytes(frame[:have])) + self._feed(core, None)
                if n > 0:
                    have += n
                elif self._tls and self._lead_poller is not None:  # the rest is on its way
                    left = deadline - time.monotonic()
                    self._lead_poller.poll(max(1, int(left * 1000) + 1))
        except BaseException:
            if self.sock is sock:
                with self._io:
                    core.receive_data(bytes(frame[:have]))  # keep the stream in step for later
            raise
        single = core.receive_single(view)
        if single is not None:
            return [single]
        return self._feed(core, bytes(frame))

    def _feed(self, core: Connection, data: bytes | None) -> list[Event]:
        """Bytes read (None: end of stream) through the general path; what the core answers
        (a PONG, the reply to a CLOSE) is sent at once."""
        with self._io:  # the core's output is shared with the senders
            events = core.receive_data(data) if data is not None else core.receive_eof()
            out = core.data_to_send()
            sock = self.sock
            if out and sock is not None:
                try:
                    self._sendall(sock, out)
                except OSError:
                    pass
            if self.live and sock is not None and self.core is core and core.close_expected():
                # The session ended: settle what came with the end and drop the connection
                # before any other thread may send on it (they wait for _io).
                self._handle(events, core, sock)
                return []
        return events

    def _handle(self, events: list[Event], core: Connection, sock: socket.socket) -> None:
        """Route pattern messages, settle answers; drop the connection if the session ended
        (every call waiting fails with the CLOSE's code, or ConnectionLost)."""
        routes = self.routes
        ended: ConnectionTerminated | None = None
        for ev in events:
            if isinstance(ev, PatternMessage):
                route = routes.get(type(ev))
                if route is not None:
                    route(ev)
            elif type(ev) is ConnectionTerminated:
                ended = ev
        self._settle(events)
        if ended is not None or core.close_expected():
            ep = self.ep
            if ended is not None and ended.by_peer and ended.code is not None:
                code, reason = ended.code, ended.reason
                self.drop(lambda: ConnectionClosed(code, reason), sock)
            else:
                self.drop(_lost(ep, ended.reason if ended is not None else "connection lost"), sock)

    def _step(self, slot: _Slot, deadline: float, method: str, timeout: float) -> None:
        sock, core = self.sock, self.core
        if sock is None or core is None or not self.live:
            with self._mutex:
                self._fail([slot], _lost(self.ep, "connection lost"))
            return
        if time.monotonic() >= deadline:
            raise CallTimeout(method, timeout)
        try:
            if self._tls:
                self._step_tls(sock, core, deadline, method)
                return
            n = self._recv(deadline, method, sock)
            if n > 0:
                single = core.receive_single(self._view[:n])  # the common case first
                if single is not None:
                    self._settle((single,))
                    return
            if n >= 0:
                self._took(n, sock, core, deadline, method)
        except CallTimeout:
            raise CallTimeout(method, timeout) from None
        except _Gone:
            return  # every call (this one too) has its error

    def _took(
        self, n: int, sock: socket.socket, core: Connection, deadline: float, method: str
    ) -> None:
        """Handle ``n`` bytes the leader read (0: end of stream) through the general path."""
        try:
            self._handle(self._events(n, deadline, method), core, sock)
        except (CallTimeout, _Gone):
            raise
        except BaseException:  # read, not handled (interrupted): the answers in it are lost
            self.drop(_lost(self.ep, "a read was interrupted"), sock)
            raise

    def _step_tls(
        self, sock: socket.socket, core: Connection, deadline: float, method: str
    ) -> None:
        assert isinstance(sock, ssl.SSLSocket)
        if not sock.pending():
            poller = self._lead_poller  # the leader's own: a poll object is one thread's
            if poller is None:
                raise _Gone
            left = deadline - time.monotonic()
            if not poller.poll(max(1, int(left * 1000) + 1)):  # outside _io: others may write
                return
        with self._io:
            if self.sock is not sock:
                raise _Gone
            n = self._recv(deadline, method, sock)
            if n < 0:
                return
            try:
                events = self._events(n, deadline, method)
            except (CallTimeout, _Gone):
                raise
            except BaseException:
                self.drop(_lost(self.ep, "a read was interrupted"), sock)
                raise
        self._handle(events, core, sock)

    # ------------------------------------------------------------------ calls

    def _begin(self, slot: _Slot, deadline: float, method: str, timeout: float) -> None:
        """Connect if needed; read what came while idle when nobody else reads."""
        if not self.live:
            self.ensure(deadline, method, timeout)
        elif self._leader is None and self._idle():
            self._read_idle(deadline, method, timeout)
            if not self.live:
                self.ensure(deadline, method, timeout)

    def _start(
        self,
        slot: _Slot,
        method: str,
        timeout: float,
        now: float,
        frame: Callable[[Connection, int], bytes | list[bytes]],
    ) -> None:
        """Register ``slot``'s call and send the frame ``frame(core, request_id)`` gives; the
        request id and the frame are made under ``_io``, so requests leave whole and in the
        order of their ids."""
        with self._io:
            sock, core = self.sock, self.core
            if sock is None or core is None or not self.live or core.state is not _OPEN:
                sock, core = self._relive(now + timeout, method, timeout)
            with self._mutex:
                rid = self._register(slot, method, timeout, now)
            data = frame(core, rid)
            self._send(data, method, sock)

    def _relive(
        self, deadline: float, method: str, timeout: float
    ) -> tuple[socket.socket, Connection]:
        """Called holding ``_io`` when the connection went down between a call's check and its
        send (another thread's call lost it): connect again within the call's deadline, and
        return holding ``_io``. The call was not sent: ConnectError if it cannot be."""
        io = self._io
        for _ in range(3):
            io.release()
            try:
                self.ensure(deadline, method, timeout)
            finally:
                io.acquire()
            sock, core = self.sock, self.core
            if sock is not None and core is not None and self.live:
                if core.state is State.OPEN:
                    return sock, core
                self.drop(_lost(self.ep, "the session ended"), sock)  # (not expected: safety)
        raise ConnectError(
            f"{self.ep}: the connection ended as soon as it was made, three times; the call was "
            "not sent"
        )

    def call(
        self,
        method: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        codec: Codec,
        timeout: float,
        ping: bool = False,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: bool = False,
        frame: Callable[[int], bytes] | None = None,
    ) -> Any:
        """Make a call (a PING with ``ping``) and wait for its answer. It carries its time left
        (DEADLINE) and the client's and the call's ``metadata`` (METADATA) to a server that
        announced them; a call given up on (timed out, interrupted) sends CANCEL to a server
        that announced it (:meth:`_leave`). ``frame``: a pattern's own request instead of a
        REQUEST, ``frame(request_id)``'s bytes, answered with RESPONSE or ERROR (a remote
        object's CALL): the same path, the first read inline."""
        now = _monotonic()
        if _CURRENT_CALL.get() is not None or _INLINE_CALLS:  # inside a served call: its deadline
            timeout = inherited_timeout(timeout, now)
        deadline = now + timeout
        slot = _Slot()
        slot.track = not ping
        waited = False
        try:
            poller = self._poller  # None when not connected
            if poller is None:
                self._begin(slot, deadline, method, timeout)
                waited = True
            elif self._leader is None and now - self._answered > _FRESH_S:
                # Nobody reads: anything that came while idle? (Not looked for right after an
                # answer read on the fast path: a poll() costs a system call, and what came
                # since is read with this call's answer.)
                try:
                    idle = poller.poll(0) or (self._tls and self._tls_pending())
                except RuntimeError:  # another thread polls at this moment: it reads
                    idle = False
                if idle:
                    self._begin(slot, deadline, method, timeout)
                    waited = True
            # The hot path below takes its locks with acquire/release (no with-statement: ~50
            # ns each) where nothing between them can raise but an interrupt; the id and the
            # frame under _io: requests leave whole, in id order.
            io = self._io
            io.acquire()
            try:
                sock, core = self.sock, self.core
                if sock is None or core is None or not self.live or core.state is not _OPEN:
                    sock, core = self._relive(deadline, method, timeout)
                    waited = True
                # DEADLINE and METADATA only to a server that announced them (LocalProtocolError
                # for bad metadata: nothing sent).
                features = core.peer_features
                defaults = self.client.metadata
                md = None
                if metadata is not None or defaults is not None:
                    timeout, budget, md = plan_call(timeout, features, defaults, metadata, now)
                    if waited and budget is not None:  # the time left after the wait
                        budget = budget_ms(deadline - _monotonic())
                elif not features & _FEATURE_DEADLINE:  # (plan_call inlined: the hot path)
                    budget = None
                elif waited:  # the time left after the wait
                    budget = budget_ms(deadline - _monotonic())
                elif 0.0 < timeout < _BUDGET_CAP_S:  # budget_ms(timeout), inlined
                    budget = int(timeout * 1000)
                else:
                    budget = budget_ms(timeout)
                mutex = self._mutex
                mutex.acquire()
                try:  # (_register inlined: the hot path)
                    calls = self.calls
                    slot.request_id = rid = calls.new_id()
                    slot.method, slot.timeout, slot.deadline = method, timeout, deadline
                    slot.waiter = None
                    calls.pending[rid] = slot
                    if self._leader is None:
                        self._leader = slot  # nobody reads: this thread will
                finally:
                    mutex.release()
                data: bytes | list[bytes] | None = None
                if frame is not None:
                    data = frame(rid)
                elif not ping and kwargs is None and codec is MSGPACK and md is None:
                    data = core.request_frame(rid, method, args, budget)  # the common case
                    if data is not None and len(data) == 1:
                        data = data[0]
                if data is None:
                    if ping:
                        core.send_ping(rid)
                    else:
                        core.send_request(
                            rid, method, args, kwargs, codec, budget_ms=budget, metadata=md
                        )
                    pieces = core.buffers_to_send()
                    if len(pieces) > 3 or len(pieces[-1]) > _GATHER_ABOVE:
                        data = pieces  # header, meta, body pieces: no copy of the body
                    else:
                        data = b"".join(pieces)
                # (not inlined: a write in progress shows as a frame of _send, which
                # test_blocking_threads waits to end before it interrupts the thread)
                self._send(data, method, sock)
            finally:
                io.release()
            if self._leader is slot:
                # The first read inline: one thread alone reads its own answer right here.
                # Over TLS, a wait for data outside _io (others may write), then the read in it.
                tls = self._tls
                ready = not tls
                if tls:
                    poller = self._lead_poller
                    ready = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
                    if not ready and poller is not None:
                        ready = bool(poller.poll(max(1, int(timeout * 1000) + 1)))
                    if ready:
                        self._io.acquire()
                        if self.sock is not sock:
                            self._io.release()
                            ready = False
                if ready:
                    try:
                        # (_recv inlined: the time left is about ``timeout``)
                        t = self._sock_timeout
                        if timeout < t * 0.9 or timeout > t * 1.1:
                            self._set_timeout(timeout, sock)
                        try:
                            try:
                                n = sock.recv_into(self._buf)
                            except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO expired
                                n = -1
                            except OSError as exc:
                                self.drop(_lost(self.ep, str(exc)), sock)
                                raise _Gone from None
                            if n > 0:
                                single = core.receive_single(self._view[:n])
                                if type(single) is Response and single.request_id == rid:
                                    mutex = self._mutex
                                    mutex.acquire()
                                    try:
                                        mine = self.calls.pending.pop(rid, None) is not None
                                        if mine:
                                            slot.left = True
                                            self._leader = None
                                            if self._waiting:
                                                self._promote()
                                    finally:
                                        mutex.release()
                                    if mine:
                                        self._answered = now
                                        if single.metadata is None and not with_metadata:
                                            return single.result
                                        return _answer(
                                            Reply(single.result, single.metadata or {}),
                                            with_metadata,
                                        )
                                elif single is not None:
                                    self._settle((single,))
                                else:
                                    self._took(n, sock, core, deadline, method)
                            elif n == 0:
                                self._took(0, sock, core, deadline, method)
                        except CallTimeout:
                            raise CallTimeout(method, timeout) from None
                        except _Gone:
                            pass
                    finally:
                        if tls:
                            self._io.release()
            try:
                result = self._wait(slot, deadline, method, timeout)
            except RemoteError as exc:
                if exc.code == _DEADLINE_EXCEEDED:  # as our own timer (both clients)
                    raise deadline_passed(method, timeout) from None
                raise
        finally:
            if not slot.left or self.abandoned:  # (answered on the fast path: unless a
                # dropped stream waits to be stopped, nothing is left to do)
                self._leave(slot)  # answered, failed or timed out: a late answer is nobody's
        if with_metadata or type(result) is Reply:
            return _answer(result, with_metadata)
        return result

    def _leave(self, slot: _Slot) -> bool:
        """As :meth:`_Pipeline._leave`; a REQUEST given up on (timed out, interrupted) is
        cancelled on the server when it announced CANCEL (PROTOCOL.md §4): it stops the
        work nobody waits for."""
        gave_up = super()._leave(slot)
        if gave_up and slot.track:
            self._cancel(slot.request_id)
        abandoned = self.abandoned
        while abandoned:
            try:
                abandoned.pop()._release()
            except IndexError:
                break
            except Exception:
                pass
        return gave_up and slot.track

    def _cancel(self, request_id: int) -> None:
        """Send CANCEL for ``request_id`` (only to a server that announced it; nothing when
        the connection is gone). A failure to send it is the connection's, not the call's."""
        with self._io:
            sock, core = self.sock, self.core
            if sock is None or core is None or not self.live or core.state is not _OPEN:
                return
            if core.send_cancel(request_id):
                try:
                    self._send(core.data_to_send(), "CANCEL", sock)
                except (CallTimeout, ConnectionLost):  # dropped: the calls in flight know
                    pass

    # ------------------------------------------------------------------ streamed calls

    def start_stream(
        self,
        method: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        codec: Codec,
        timeout: float,
        metadata: Mapping[str, str | bytes] | None,
    ) -> tuple[_Slot, ItemStream]:
        """Send a REQUEST with the STREAM flag; its ITEMs are queued in the returned
        :class:`ItemStream` by whichever thread reads, and its answer settles the returned
        slot (a call of the table, its deadline ``now + timeout``, that no thread waits on:
        the reader waits with :meth:`read_until`). The caller must :meth:`end_stream` it.
        :class:`LocalProtocolError` (STREAM_MISMATCH), nothing sent, for a server that does
        not announce streams."""
        slot, items, _, _ = self._start_flagged(
            method, args, kwargs, codec, timeout, metadata, stream=True
        )
        return slot, cast(ItemStream, items)

    def _start_flagged(
        self,
        method: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        codec: Codec,
        timeout: float,
        metadata: Mapping[str, str | bytes] | None,
        *,
        stream: bool,
    ) -> tuple[_Slot, ItemStream | ItemUpload, socket.socket, Connection]:
        """Send a REQUEST with the STREAM flag (``stream``) or the UPLOAD flag, registered
        with its state (the ITEMs' queue in ``item_streams``, or the window count in
        ``uploads``) under ``_mutex`` before it leaves: (slot, state, socket, core). The slot's
        deadline is the call's. :class:`LocalProtocolError` (STREAM_MISMATCH), nothing sent,
        for a server that does not announce the feature; nothing left registered if the
        request does not encode."""
        what, feature = ("stream", FEATURE_STREAM) if stream else ("upload", FEATURE_UPLOAD)
        now = time.monotonic()
        if _CURRENT_CALL.get() is not None or _INLINE_CALLS:  # inside a served call: its deadline
            timeout = inherited_timeout(timeout, now)
        deadline = now + timeout
        slot = _Slot()
        self._begin(slot, deadline, method, timeout)
        with self._io:
            sock, core = self.sock, self.core
            if sock is None or core is None or not self.live or core.state is not _OPEN:
                sock, core = self._relive(deadline, method, timeout)
            features = core.peer_features
            if not features & feature:
                raise LocalProtocolError(
                    f"{what}({method!r}): the server does not announce {what}s (an older "
                    "server); nothing was sent",
                    ErrorCode.STREAM_MISMATCH,
                )
            _, budget, md = plan_call(timeout, features, self.client.metadata, metadata, now)
            if budget is not None:
                budget = budget_ms(deadline - time.monotonic())
            table: dict[int, Any] = self.item_streams if stream else self.uploads
            with self._mutex:
                rid = self._register(slot, method, timeout, now)
                state = table[rid] = ItemStream(rid, method) if stream else ItemUpload(rid, method)
            try:
                core.send_request(
                    rid,
                    method,
                    args,
                    kwargs,
                    codec,
                    budget_ms=budget,
                    metadata=md,
                    stream=stream,
                    upload=not stream,
                )
            except BaseException:  # not encodable: nothing was sent
                with self._mutex:
                    if table.get(rid) is state:
                        del table[rid]
                self._leave(slot)
                raise
            slot.track = True  # sent: given up on, it is cancelled
            self._send(core.data_to_send(), method, sock)
        return slot, state, sock, core

    def upload(
        self,
        method: str,
        items: Iterable[Any],
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        codec: Codec,
        timeout: float,
        metadata: Mapping[str, str | bytes] | None,
    ) -> Any:
        """An UPLOAD call (PROTOCOL.md §4.4): the REQUEST, then ``items`` as ITEMs under the
        window (waiting for CREDIT with :meth:`read_until`: whichever thread reads may settle
        it), then the END; the result (a :class:`Reply` when the RESPONSE had trailers). Stops
        sending when the answer comes first; a call given up on (timed out, interrupted) sends
        CANCEL. :class:`LocalProtocolError` (STREAM_MISMATCH), nothing sent, for a server that
        does not announce uploads."""
        slot, state, sock, core = self._start_flagged(
            method, args, kwargs, codec, timeout, metadata, stream=False
        )
        up, rid, deadline, timeout = (
            cast(ItemUpload, state),
            slot.request_id,
            slot.deadline,
            slot.timeout,
        )
        try:
            self._send_items(slot, up, items, codec, sock, core, deadline)
            try:
                return self._wait(slot, deadline, method, timeout)
            except RemoteError as exc:
                if exc.code == _DEADLINE_EXCEEDED:  # as our own timer (both clients)
                    raise deadline_passed(method, timeout) from None
                raise
        except CallTimeout:
            raise CallTimeout(method, timeout) from None
        finally:
            with self._mutex:
                if self.uploads.get(rid) is up:
                    del self.uploads[rid]
            self._leave(slot)  # answered, failed, or given up on (then CANCEL)

    def _send_items(
        self,
        slot: _Slot,
        up: ItemUpload,
        items: Iterable[Any],
        codec: Codec,
        sock: socket.socket,
        core: Connection,
        deadline: float,
    ) -> None:
        """Send the items while the call waits for its answer, each once the window allows,
        then the END. An iterator stopped before its end (the answer came first) is closed."""
        rid, method = up.request_id, up.method
        source = iter(items)
        finished = False

        def room() -> bool:
            return up.may_send() or slot.done

        try:
            while not slot.done:
                try:
                    item = next(source)
                except StopIteration:
                    finished = True
                    break
                if not up.may_send():
                    self.read_until(room, deadline - time.monotonic(), method)
                frame = core.item_frame(rid, item, codec)  # CodecError, LocalProtocolError
                with self._io:
                    if slot.done or self.sock is not sock or not self.live:
                        break  # answered (early, or failed with the connection)
                    with self._mutex:  # counted before it leaves: its CREDIT may come at once
                        up.sent(frame)
                    core.send_message(frame)
                    self._send(core.data_to_send(), method, sock)
            if finished:
                with self._io:
                    if not slot.done and self.sock is sock and self.live:
                        core.send_message(encode_item_end(rid, codec))
                        self._send(core.data_to_send(), method, sock)
        finally:
            if not finished:
                close = getattr(source, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception:
                        pass

    def grant(self, request_id: int, granted: int) -> None:
        """Send a CREDIT for stream ``request_id`` (nothing when the connection is gone: the
        stream has failed with it)."""
        with self._io:
            sock, core = self.sock, self.core
            if sock is None or core is None or not self.live:
                return
            if core.send_credit(request_id, granted):
                try:
                    self._send(core.data_to_send(), "CREDIT", sock)
                except (CallTimeout, ConnectionLost):  # dropped: the calls in flight know
                    pass

    def end_stream(self, slot: _Slot, items: ItemStream) -> None:
        """The reader of a streamed call is done with it (ended, failed, or stopped early: then
        CANCEL, as for any call given up on)."""
        with self._mutex:
            rid = items.request_id
            if self.item_streams.get(rid) is items:
                del self.item_streams[rid]
        self._leave(slot)

    def take_item(self, items: ItemStream) -> tuple[Any, int]:
        """The next item queued (there is one) and the bytes to grant (under ``_mutex``: the
        reading thread feeds the same counters)."""
        with self._mutex:
            return items.take()

    # ------------------------------------------------------------------ for patterns

    def start_exchange(
        self, frame: Callable[[int], bytes], what: str, timeout: float, hold: bool = False
    ) -> Ticket:
        """Send the frame ``frame(request_id)`` builds for a fresh id now, and wait for its
        RESPONSE later (:meth:`Ticket.result`): an answer that comes while nobody waits is kept
        (the thread that reads takes it). A ticket never waited for ends with its answer.
        ``hold``: as :meth:`start_exchanges`."""
        now = _monotonic()
        deadline = now + timeout
        slot = _Slot()
        try:
            # (what came while idle is not looked for between held requests made in a row: the
            # connection is corked since the first of them)
            if not (hold and self._corked and self.live):
                self._begin(slot, deadline, what, timeout)
            with self._io:
                sock, core = self.sock, self.core
                if sock is None or core is None or not self.live or core.state is not _OPEN:
                    sock, core = self._relive(deadline, what, timeout)
                with self._mutex:
                    rid = self._register(slot, what, timeout, now)
                self._send(frame(rid), what, sock, hold)  # (a whole frame: as call() sends)
        except BaseException:
            self._leave(slot)
            raise
        return Ticket(self, slot, deadline, what, timeout)

    def start_exchanges(
        self,
        frames: Sequence[Callable[[int], bytes]],
        what: str,
        timeout: float,
        hold: bool = False,
    ) -> list[Ticket]:
        """:meth:`start_exchange` for several requests sent in one write (a batch: one round
        trip), in order. ``hold``: written with MSG_MORE, so that requests made in a row leave
        together (the next write, any wait on this connection, or 200 ms at most, sends
        them)."""
        now = time.monotonic()
        deadline = now + timeout
        slots = [_Slot() for _ in frames]
        try:
            self._begin(slots[0], deadline, what, timeout)
            with self._io:
                sock, core = self.sock, self.core
                if sock is None or core is None or not self.live or core.state is not _OPEN:
                    sock, core = self._relive(deadline, what, timeout)
                out = []
                for slot, frame in zip(slots, frames, strict=True):
                    with self._mutex:
                        rid = self._register(slot, what, timeout, now)
                    out.append(frame(rid))
                for data in out:
                    core.send_message(data)
                self._send(core.data_to_send(), what, sock, hold)
        except BaseException:
            for slot in slots:
                self._leave(slot)
            raise
        return [Ticket(self, slot, deadline, what, timeout) for slot in slots]

    def exchange(self, frame: Callable[[int], bytes], what: str, timeout: float) -> tuple[int, Any]:
        """Send the frame ``frame(request_id)`` builds for a fresh id and wait for the RESPONSE
        to it; returns (request id, result). Raises :class:`CallTimeout`, or
        :class:`RemoteError` for an ERROR answer."""
        ticket = self.start_exchange(frame, what, timeout)
        return ticket.request_id, ticket.result()

    def send_frame(self, frame: bytes, what: str, timeout: float, hold: bool = False) -> None:
        """Send a frame that gets no answer (QoS 0 PUB, ACK); ``hold``: with the next write
        (as :meth:`start_exchanges`)."""
        deadline = time.monotonic() + timeout
        if not self.live:
            self.ensure(deadline, what, timeout)
        with self._io:
            sock, core = self.sock, self.core
            if sock is None or core is None or not self.live:
                raise ConnectError(f"{self.ep}: connection lost before {what} was sent")
            core.send_message(frame)
            self._send(core.data_to_send(), what, sock, hold)

    def push(self) -> None:
        """Send what was written with ``hold`` now (before a wait: the answer waited for may be
        one of those requests')."""
        with self._io:
            sock = self.sock
            if self._corked and sock is not None:
                try:
                    self._uncork(sock)
                except OSError:
                    pass  # (a dead socket: the read that follows finds it)

    def _uncork(self, sock: socket.socket) -> None:
        self._corked = False
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)  # type: ignore[arg-type]  # pushes

    def _wait(self, slot: _Slot, deadline: float, method: str, timeout: float) -> Any:
        if self._corked and not slot.done:  # (an answer already here needs nothing sent)
            self.push()
        return _Pipeline._wait(self, slot, deadline, method, timeout)

    def read_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``done()`` holds, reading (routing what arrives) when no other thread
        reads. Raises :class:`CallTimeout`, or :class:`ConnectionLost` when the connection ends
        first."""
        if done():
            return
        deadline = time.monotonic() + timeout
        slot = _Slot(done)
        with self._mutex:
            if not self.live:
                raise ConnectionLost(f"{self.ep}: connection lost")
            self._watchers.add(slot)
        try:
            self._wait(slot, deadline, what, timeout)
        finally:
            self._leave(slot)

    def after_fork(self) -> None:
        """In a forked child: let go of the parent's session without a byte sent on it (no
        CLOSE, no shutdown: closing this process's copy of the socket leaves the parent's
        open, and dropping a TLS socket sends no close_notify). The next call connects anew.
        The calls of the parent's other threads are forgotten (those threads are not here), and
        the locks are new (one of those threads may have held one at the fork)."""
        sock = self.sock
        self.sock, self.core, self._poller, self.live = None, None, None, False
        self._lead_poller = None
        self._init_pipeline()
        self._connecting = threading.Lock()
        self._sock_timeout = 0.0
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        """Send CLOSE and close the socket. Calls other threads have in flight fail at once
        with :class:`ConnectionLost` (the client was closed)."""
        closed = _lost(self.ep, "the client was closed while the call was in flight")
        if not self._io.acquire(timeout=1.0):  # a writer stuck on a full socket: no CLOSE
            self.drop(closed)
            return
        try:
            sock, core = self.sock, self.core
            if sock is not None and core is not None and self.live:
                try:
                    core.send_close(ErrorCode.NORMAL, "")
                    self._sendall(sock, core.data_to_send())
                except OSError:
                    pass
            self.drop(closed)  # before another thread may send on the closing session
        finally:
            self._io.release()


class DatagramConnection(_Pipeline):
    """The blocking client's UDP socket, shared by threads: the datagram core retransmits each
    call on its own timers, the call table matches answers to the calls waiting, and the leader
    (:class:`_Pipeline`) reads for all of them and runs the retransmission timers.

    With a secret, every datagram is sealed for the server's epoch (PROTOCOL.md §6.1), learned
    from the server: a call sealed for an epoch the server does not have (none yet, or a
    restarted server's old one) is refused with the server's epoch, and sent again for it when
    nothing of it can have run, else failed with :class:`ConnectionLost` ("may or may not have
    run"). A call's retransmissions keep the epoch of its first datagram (its pin); the pin is
    the connection's, so with a secret calls are made one at a time."""

    kind = "datagram"

    def __init__(self, ep: Endpoint, client: Client) -> None:
        self.ep = ep
        self.client = client
        self.core = client.datagram_core()
        self._init_pipeline()
        self.sock = self._open()
        self.last_id = 0
        self.last_error = ""
        self._sock_timeout = 0.0
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self.auth = client.datagram_auth()
        self._serial = threading.Lock()  # with a secret: one call at a time (its pin)
        # The pin of the call in flight (with a secret): its id, the epoch its first datagram
        # was sealed for, and the time (ms) of that datagram (0: nothing sent yet).
        self._pin_rid = 0
        self._pin_epoch = NO_EPOCH
        self._pin_ms = 0
        # ECONNREFUSED (an ICMP port unreachable) reported by recv or send, handled by the
        # leader: the kernel names the refused datagram (transport/udperr.py), so a refusal
        # counts for its own call only. Per call (under _io): datagrams refused, and datagrams
        # whose send reported an earlier refusal instead (they never left). A call fails
        # (udp_refused: it did not run) once it has sent two datagrams at least on its schedule
        # and every one that left was refused; udp_gone (it may have run) once two were refused
        # after an earlier one was not. Where the kernel cannot name them (_attributed False),
        # refusals fail nothing: calls end at their timeout.
        self._refusal = False
        self._refusals: dict[int, int] = {}
        self._unsent: dict[int, int] = {}

    def _open(self) -> socket.socket:
        """A UDP socket connected to the server (a new source port each time)."""
        ep = self.ep
        sock = socket.socket(socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.connect((ep.host, ep.port))
        except OSError as exc:
            sock.close()
            raise ConnectError(f"{ep}: {exc.strerror or exc}") from None
        self._attributed = enable_refusal_reports(sock)
        return sock

    def after_fork(self) -> None:
        """In a forked child: a socket of its own (a new source port) and a new datagram core
        (request ids from a fresh random start, drawn from os.urandom; none of the parent's
        retransmissions), so the server's reply cache, keyed by address and request id, never
        answers this process with the parent's results. The parent's socket is untouched; the
        calls of its other threads are forgotten here, and the locks are new."""
        client = self.client
        old = self.sock
        self.core = client.datagram_core()
        self._init_pipeline()
        self._serial = threading.Lock()
        self.last_id = 0
        self._pin_rid = 0
        self._sock_timeout = 0.0
        self._refusal = False
        self._refusals, self._unsent = {}, {}
        if old.fileno() < 0:  # closed before the fork: stays closed
            return
        try:
            self.sock = self._open()
            self.last_error = ""
        except ConnectError as exc:  # calls fail with it (EBADF on the closed socket)
            self.last_error = f"no socket after fork: {exc}"
        old.close()

    def send_datagram(self, data: bytes) -> None:
        """Send one datagram that gets no answer (sealed when the client has a secret: first
        the refusals that came meanwhile are read, which tell of a restarted server's epoch,
        and when no epoch is known yet a PING learns it, within the connect timeout)."""
        auth = self.auth
        if auth is None:
            self._send(data)
            return
        with self._serial:
            self._read_waiting()
            if auth.epoch == NO_EPOCH:
                wait = self.client.connect_timeout
                if not self._ping_for_epoch(time.monotonic() + wait):
                    detail = f": {self.last_error}" if self.last_error else ""
                    raise ConnectError(
                        f"{self.ep}: no answer within {wait:g} s to learn the server's epoch, "
                        f"so nothing was sent{detail}"
                    )
            self._send(auth.seal(data, time.time()))

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            self._send_failed(exc, data)

    def _send_failed(self, exc: OSError, data: bytes) -> None:
        """The send of ``data`` failed with ``exc`` (not raised: calls end on their schedule)."""
        if exc.errno == errno.ECONNREFUSED:  # reported by send: this datagram did not leave
            self._refusal = True
            if len(data) >= HEADER_SIZE:
                rid = _REQUEST_ID.unpack_from(data, 8)[0]
                self._unsent[rid] = self._unsent.get(rid, 0) + 1
        self.last_error = exc.strerror or str(exc)

    def _drain_refusals(self) -> None:
        """The kernel reported ECONNREFUSED (an ICMP port unreachable answered one of our
        datagrams): charge each refusal it queued to the call it names. Nothing is sent again
        at once (the refusal may be an earlier datagram's, or the server may be starting: the
        call's retransmission schedule sends its next datagram). A call fails with
        :func:`udp_refused` (it did not run) once every datagram of it that left was refused
        and it had sent two at least; with :func:`udp_gone` (it may have run) once two were
        refused after an earlier one was not. A PING (one datagram, not retransmitted) whose
        datagram never left is sent again; one refused fails at once."""
        self._refusal = False
        self.last_error = "connection refused (no server on that port?)"
        if not self._attributed:
            self._unsent.clear()
            return
        failed: list[tuple[_Slot, Callable[[], BaseException]]] = []
        with self._io:
            core = self.core
            refused, unsent = self._refusals, self._unsent
            with self._mutex:
                pending = dict(self.calls.pending)
            resend = False
            for rid in list(unsent):
                slot = cast("_Slot | None", pending.get(rid))
                if slot is not None and not slot.track and rid not in refused:
                    del unsent[rid]  # its one datagram never left (pings are not retried)
                    core.send_ping(rid)
                    resend = True
            for rid in refused_request_ids(self.sock):
                if rid in pending:
                    refused[rid] = refused.get(rid, 0) + 1
            for rid in list(refused):
                slot = cast("_Slot | None", pending.get(rid))
                if slot is None:
                    del refused[rid]
                    unsent.pop(rid, None)
                    continue
                lone = refusal_verdict(
                    core.attempts(rid), refused[rid], unsent.get(rid, 0), not slot.track
                )
                if lone is None:
                    continue
                error = udp_refused_error(self.ep, lone)
                del refused[rid]
                unsent.pop(rid, None)
                core.cancel(rid)
                failed.append((slot, error))
            if resend:
                self._send_out()
        if failed:
            with self._mutex:
                for slot, error in failed:
                    self.calls.forget(slot.request_id)
                    self._fail([slot], error)

    def _send_call(self, data: bytes) -> None:
        """Send a datagram of a call in flight (with a secret, the one call: sealed for its
        pin)."""
        auth = self.auth
        if auth is not None:
            ms = int(time.time() * 1000)
            if not self._pin_ms:
                self._pin_epoch = auth.epoch
                self._pin_ms = ms
            data = auth.seal_ms(data, ms, self._pin_epoch)
        self._send(data)

    def _incoming(self, n: int) -> bytes | memoryview | None:
        """The frame in ``n`` bytes received, or None for a datagram that is not authentic or
        that only told the server's epoch. Raises :class:`ConnectionLost` when it says the call
        in flight may have run in a server process that is gone."""
        auth = self.auth
        if auth is None:
            return self._view[:n]
        data = bytes(self._view[:n])
        try:
            frame = auth.open(data, time.time(), track=False)
        except AuthFailure as exc:
            if unsealed_refusal(data):
                auth.epoch = NO_EPOCH  # refused without the epoch: learn it anew when needed
                return data
            self.last_error = f"dropped a datagram: {exc.reason}"
            return None
        t = frame[_TYPE]
        if t == _ERROR:
            refusal = refusal_of(data, frame)
            if refusal is not None:
                self._refused(frame, *refusal)
                return None
        elif t == _PONG:
            auth.epoch = trailer_of(data)[0]
        return frame

    def _refused(self, frame: bytes, epoch: bytes, refused_ms: int) -> None:
        """A datagram sealed for an epoch the server does not have was refused: learn the
        epoch; send the call in flight again if nothing of it can have run."""
        assert self.auth is not None
        self.auth.epoch = epoch
        rid = _REQUEST_ID.unpack_from(frame, 8)[0]
        if rid == 0 or rid != self._pin_rid or not self._pin_ms:
            return  # not the call in flight
        if self._pin_epoch == epoch:
            return  # a datagram sent before the call's last re-send
        if self._pin_epoch == NO_EPOCH or self._pin_ms == refused_ms:
            # No server accepts NO_EPOCH, and the refused datagram is the first sealed for
            # its epoch: nothing of the call ran. Send it again, sealed for the new epoch.
            self._pin_ms = 0
            if self.core.resend(rid):
                self._send_out()
            return
        self.core.cancel(rid)
        raise ConnectionLost(
            f"{self.ep}: the server restarted (new epoch) while the call was in flight: it may "
            "or may not have run"
        )

    def _read_waiting(self) -> None:
        """Read what arrived since the last call, without waiting (answers that came too late,
        refusals that tell of a new epoch)."""
        while True:
            try:
                n = self.sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error reported late
                self.last_error = exc.strerror or str(exc)
                return
            self._incoming(n)

    def _ping_for_epoch(self, deadline: float) -> bool:
        """PING until a PONG tells the server's epoch (retransmitting as calls do), or until
        ``deadline``; True when the epoch is known. An unsealed refusal (the server does not
        share our secret) raises :class:`RemoteError` at once."""
        auth = self.auth
        assert auth is not None
        attempt = 0
        rid = self.new_id()
        while auth.epoch == NO_EPOCH:
            now = time.monotonic()
            if now >= deadline:
                return False
            self._send(auth.seal(encode_ping(rid), time.time()))
            until = min(deadline, now + self.core.retry.interval(attempt, _rng))
            attempt += 1
            while auth.epoch == NO_EPOCH:
                if self._refusal:  # refused (by recv or by send)
                    self._refusal = False
                    self.last_error = "connection refused (no server on that port?)"
                    if self._attributed:
                        unsent = self._unsent.pop(rid, 0)
                        if rid in refused_request_ids(self.sock):
                            raise udp_refused(self.ep)  # its one datagram was refused
                        if unsent:
                            break  # it never left: send it again
                    self._unsent.clear()
                wait = until - time.monotonic()
                if wait <= 0:
                    break
                self._fit_timeout(wait)
                try:
                    n = self.sock.recv_into(self._buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ECONNREFUSED:
                        raise
                    self._refusal = True
                    continue
                frame = self._incoming(n)
                if frame is not None and unsealed_refusal(frame):
                    if _REQUEST_ID.unpack_from(frame, 8)[0] == rid:
                        raise remote_error(Error(rid, ErrorCode.UNAUTHENTICATED, "", ""))
        return True

    def _fit_timeout(self, wait: float) -> None:
        """SO_RCVTIMEO, re-armed only when it would wake more than 10 % late or more than twice
        too early: the retransmission waits are jittered, and a system call per call to follow
        the jitter exactly would cost more than waking a little early (a spurious wake-up just
        loops) or retransmitting a few milliseconds late."""
        t = self._sock_timeout
        if t > wait * 1.1 or t < wait * 0.5:
            wait = max(wait, 0.001)
            sec = int(wait)
            tv = struct.pack("@ll", sec, int((wait - sec) * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self._sock_timeout = wait

    def _send_out(self) -> None:
        """Send what the core queued (the caller holds ``_io``)."""
        for data in self.core.datagrams_to_send():
            self._send_call(data)

    def new_id(self) -> int:
        """A fresh request id (never one of a call waiting)."""
        pending = self.calls.pending
        rid = self.last_id = self.core.new_request_id(self.last_id)
        while rid in pending:
            rid = self.last_id = self.core.new_request_id(rid)
        self._pin_ms = 0
        return rid

    def call(
        self,
        method: str,
        timeout: float,
        send: Callable[[int, float], bytes | None] | None = None,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        codec: Codec = MSGPACK,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: bool = False,
        track: bool = True,
    ) -> Any:
        """Make a call: ``send(request_id, now)`` has the core track it (returning the datagram
        to send now, or None when it queued it), then wait for its answer, retransmitting when
        the core says so (``track``), until its timeout. Without ``send``: a REQUEST of
        ``method`` with ``args`` and ``kwargs``, carrying its time left (DEADLINE: each
        retransmission the time left then) and the client's and the call's ``metadata``
        (METADATA): over UDP there is no WELCOME, so they are always sent (PROTOCOL.md §6)."""
        now = _monotonic()
        md: Metadata | None = None
        if (
            metadata is not None
            or self.client.metadata is not None
            or _CURRENT_CALL.get() is not None
            or _INLINE_CALLS
        ):
            # LocalProtocolError for bad metadata: nothing sent
            timeout, _, md = plan_call(timeout, FEATURES, self.client.metadata, metadata, now)
        deadline = now + timeout
        slot = _Slot()
        slot.track = track
        auth = self.auth
        if auth is not None and not self._serial.acquire(timeout=max(0.0, timeout)):
            raise CallTimeout(method, timeout, "the client's calls are made one at a time")
        try:
            nxt = None
            core = self.core
            # The locks of the hot path with acquire/release (no with-statement: ~50 ns each)
            # where nothing between them can raise but an interrupt.
            io, mutex = self._io, self._mutex
            io.acquire()
            try:
                mutex.acquire()
                try:  # (_register and new_id inlined: the hot path)
                    pending = self.calls.pending
                    rid = self.last_id = core.new_request_id(self.last_id)
                    while rid in pending:
                        rid = self.last_id = core.new_request_id(rid)
                    self._pin_ms = 0
                    slot.request_id = rid
                    slot.method, slot.timeout, slot.deadline = method, timeout, deadline
                    slot.waiter = None
                    pending[rid] = slot
                    lead = auth is None and self._leader is None
                    if lead:
                        self._leader = slot  # nobody reads: this thread will
                finally:
                    mutex.release()
                data: bytes | None = None
                if send is not None:
                    data = send(rid, now)
                elif kwargs is None and codec is MSGPACK and md is None:
                    data = core.request_datagram(
                        rid, method, args, now=now, timeout=timeout, deadline=True
                    )
                else:
                    core.send_request(
                        rid,
                        method,
                        args,
                        kwargs,
                        codec,
                        now=now,
                        timeout=timeout,
                        deadline=True,
                        metadata=md,
                    )
                if auth is None:
                    if data is not None:
                        try:  # (_send inlined)
                            self.sock.send(data)
                        except OSError as exc:
                            self._send_failed(exc, data)
                    else:
                        self._send_out()
                    if lead:
                        nxt = core.next_timer()
            finally:
                io.release()
            if auth is not None:
                self._pin_rid = rid
                self._start_sealed(rid, data, deadline)
            elif lead and not self._refusal:
                # The first read inline: one thread alone reads its own answer right here.
                wait = (nxt if nxt is not None and nxt < deadline else deadline) - now
                t = self._sock_timeout
                if t > wait * 1.1 or t < wait * 0.5:  # (_fit_timeout's test inlined)
                    self._fit_timeout(wait)
                try:
                    n = self.sock.recv_into(self._buf)
                except BlockingIOError:  # a retransmission is due: _wait sends it
                    pass
                except OSError as exc:
                    if exc.errno == errno.ECONNREFUSED:
                        self._refusal = True  # handled in _wait
                    elif exc.errno != errno.EBADF:  # (EBADF: _wait reports the closed socket)
                        raise
                else:
                    io.acquire()
                    try:
                        events = self.core.receive_datagram(self._view[:n])
                    finally:
                        io.release()
                    if len(events) == 1:
                        ev = events[0]
                        if type(ev) is Response and ev.request_id == rid:
                            mutex.acquire()
                            try:
                                mine = self.calls.pending.pop(rid, None) is not None
                                if mine:
                                    slot.left = True
                                    self._leader = None
                                    if self._waiting:
                                        self._promote()
                            finally:
                                mutex.release()
                            if mine:
                                if ev.metadata is None and not with_metadata:
                                    return ev.result
                                return _answer(Reply(ev.result, ev.metadata or {}), with_metadata)
                    if events:
                        self._settle(events)
            try:
                result = self._wait(slot, deadline, method, timeout)
            except RemoteError as exc:
                if send is None and exc.code == _DEADLINE_EXCEEDED:
                    raise deadline_passed(method, timeout) from None
                raise
        finally:
            if not slot.left:  # (answered on the fast path: the core has forgotten it already)
                self._leave(slot)
            if auth is not None:
                self._pin_rid = 0
                self._serial.release()
        if with_metadata or type(result) is Reply:
            return _answer(result, with_metadata)
        return result

    def _start_sealed(self, rid: int, data: bytes | None, deadline: float) -> None:
        """Send a call's first datagram sealed (with a secret; one call at a time)."""
        auth = self.auth
        assert auth is not None
        if data is not None:
            self._send_call(data)
            return
        out = self.core.datagrams_to_send()
        if auth.epoch == NO_EPOCH:
            if any(len(d) + TRAILER_SIZE < REFUSAL_SIZE and d[_TYPE] != _PING for d in out):
                # Shorter than the refusal that would tell the epoch (never longer than what
                # it answers): learn the epoch first.
                self._ping_for_epoch(deadline)
            self._pin_ms = 0
        for d in out:
            self._send_call(d)

    def call_positional(self, method: str, args: Sequence[Any], timeout: float) -> Any:
        """The common case: a msgpack call with positional arguments."""
        return self.call(method, timeout, args=args)

    def _leave(self, slot: _Slot) -> bool:
        if slot.left:
            return False  # (answered on the fast path: the core has forgotten it already)
        gave_up = super()._leave(slot)
        rid = slot.request_id
        if rid and not (slot.done and slot.ok):
            with self._io:
                self.core.cancel(rid)  # no more retransmissions of it
                if self._refusals or self._unsent:
                    self._refusals.pop(rid, None)
                    self._unsent.pop(rid, None)
        return gave_up

    def _step(self, slot: _Slot, deadline: float, method: str, timeout: float) -> None:
        if self._refusal:
            self._drain_refusals()
            return
        now = time.monotonic()
        if now >= deadline:
            detail = f"last error: {self.last_error}" if self.last_error else ""
            raise CallTimeout(method, timeout, detail)
        with self._io:
            nxt = self.core.next_timer()
        wait = max(0.0, min(deadline, nxt if nxt is not None else deadline) - now)
        self._fit_timeout(wait)
        try:
            n = self.sock.recv_into(self._buf)
        except BlockingIOError:  # SO_RCVTIMEO: a retransmission (or a deadline) is due
            with self._io:
                expired = self.core.handle_timer(time.monotonic())
                self._send_out()
            if expired:
                with self._mutex:
                    for ev in expired:
                        pending = self.calls.forget(ev.request_id)
                        if pending is not None:
                            m, t, sent = pending.method, pending.timeout, ev.attempts
                            self._fail(
                                [cast(_Slot, pending)],
                                lambda m=m, t=t, sent=sent: CallTimeout(  # type: ignore[misc]
                                    m, t, f"{sent} datagrams sent"
                                ),
                            )
            return
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                self._drain_refusals()
                return
            if exc.errno == errno.EBADF:  # closed, or no socket could be made after fork
                detail = self.last_error or "client is closed"
                self._fail_all(lambda: ConnectError(f"{self.ep}: {detail}"))
                return
            raise
        frame = self._incoming(n)
        if frame is None:
            return
        with self._io:
            events = self.core.receive_datagram(frame)
        if events:
            self._settle(events)

    def close(self) -> None:
        """Close the socket. Calls other threads have in flight fail at once with
        :class:`ConnectionLost` (the client was closed)."""
        self._fail_all(_lost(self.ep, "the client was closed while the call was in flight"))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
        except OSError:
            pass
        self.sock.close()


class ResultStream:
    """The items of a streamed call, in order: ``for item in client.stream("ticks", 10)``.

    The blocking twin of :class:`sockstack.asyncio.client.ResultStream`: the request is sent
    when iteration starts; items are queued as they arrive (read by whichever thread reads the
    connection: other threads' calls go on meanwhile), within the stream's flow-control window,
    and granted back (CREDIT) as they are taken, so a slow reader slows the server's generator
    down instead of filling memory. The call's timeout bounds the whole stream. Its error (the
    generator's exception, the deadline as :class:`CallTimeout`, a lost connection) is raised
    after the items that came before it. Leaving the loop early (``break``, an exception,
    ``KeyboardInterrupt``), :meth:`close` or the ``with`` block ending sends CANCEL: the server
    closes the generator. After the last item, :attr:`result` is the generator's return value
    (None for most) and :attr:`metadata` the server's trailers. One thread reads a stream.
    """

    def __init__(
        self,
        client: Client,
        connection: StreamConnection,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float,
        metadata: Mapping[str, str | bytes] | None,
    ) -> None:
        self._client = client
        self._connection = connection
        self._request = (method, args, kwargs, timeout, metadata)
        self._call: tuple[_Slot, ItemStream] | None = None
        self._ended = False
        self._hooks: StreamHooks | None = None  # the client's interceptors, if any
        self.result: Any = None
        """The generator's return value, once the stream ended."""
        self.metadata: Mapping[str, str | bytes] = {}
        """The server's trailers, once the stream ended."""

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        hooks = self._hooks
        if hooks is None and self._client.hooks is None:
            return self._next()
        try:
            return self._next()
        except StopIteration:
            if self._hooks is not None:
                self._hooks.end(Reply(self.result, self.metadata), None)
            raise
        except BaseException as exc:
            if self._hooks is not None:
                self._hooks.end(None, exc)
            raise

    def _start(self) -> tuple[_Slot, ItemStream]:
        request = self._request
        client = self._client
        self._ended = True  # until the request is sent: a failed start is the stream's end
        if client.hooks is not None:
            ep = self._connection.ep
            hooks = StreamHooks.around(client.hooks, request, client.metadata, ep)
            self._hooks = hooks
            hooks.start_sync()
            request = hooks.request()
        method, args, kwargs, timeout, metadata = request
        started = self._connection.start_stream(
            method, args, kwargs, client.codec, timeout, metadata
        )
        self._ended = False
        return started

    def _next(self) -> Any:
        call = self._call
        if call is None:
            if self._ended:
                raise StopIteration
            call = self._call = self._start()
        slot, items = call
        if self._ended:
            raise StopIteration
        conn = self._connection
        try:
            for _ in range(1 << 62):  # (bounded: each turn waits for an item or the end)
                if self._ended:  # closed meanwhile (by another thread)
                    raise StopIteration
                done = slot.done  # read first: every item before the answer is queued by then
                if items.items:
                    if not (done and slot.ok) and time.monotonic() >= slot.deadline:
                        # The timeout bounds the stream for a slow reader too: what is queued
                        # of a stream that did not end in time is dropped.
                        if done:
                            return self._finish(slot, items)
                        raise CallTimeout(slot.method, slot.timeout)
                    value, grant = conn.take_item(items)
                    if grant:
                        conn.grant(items.request_id, grant)
                    return value
                if done:
                    return self._finish(slot, items)
                try:
                    conn.read_until(
                        lambda: bool(items.items) or slot.done or self._ended,
                        slot.deadline - time.monotonic(),
                        slot.method,
                    )
                except Exception:
                    if not slot.done:  # the stream's own end (items queued first) wins
                        raise
        except CallTimeout:
            if self._ended:  # the server's DEADLINE_EXCEEDED (_finish): as it is
                raise
            timed_out = CallTimeout(slot.method, slot.timeout)  # the whole stream's timeout
            self._release(timed_out)
            raise timed_out from None
        except BaseException as exc:
            self._release(exc)
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _finish(self, slot: _Slot, items: ItemStream) -> Any:
        """The call's answer came and every item before it was taken: end, or raise."""
        self._ended = True
        conn = self._connection
        conn.end_stream(slot, items)  # answered: sends nothing
        if slot.ok:
            value = slot.value
            if type(value) is Reply:
                self.result, self.metadata = value.result, value.metadata
            else:
                self.result = value
            raise StopIteration
        exc = slot.value  # (ended here, beyond the window or an ITEM that did not decode: the
        # reading thread sent CANCEL then, _settle)
        if isinstance(exc, RemoteError) and exc.code == _DEADLINE_EXCEEDED:
            raise deadline_passed(slot.method, slot.timeout) from None
        raise exc

    def close(self) -> None:
        """Stop reading: CANCEL (the server closes the generator) unless the stream ended."""
        self._release()

    def _release(self, exc: BaseException | None = None) -> None:
        """Stop the stream (CANCEL) if it has not ended; the interceptors' ``error`` hooks get
        ``exc`` (what the reader's ``next()`` raises), else "stopped early"."""
        if self._ended:
            return
        self._ended = True
        call = self._call
        if call is not None:
            conn = self._connection
            conn.end_stream(*call)
            with conn._mutex:  # a reader waiting in another thread sees the end
                conn._wake_watchers()
            hooks = self._hooks
            if hooks is not None:
                hooks.end(None, exc or hooks.stopped())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    def __del__(self) -> None:
        # ``break`` out of ``for``: the iterator is dropped at once (CPython), and with it the
        # stream: CANCEL, so that the server stops. Not when this thread may hold the
        # connection's lock (a garbage collection inside the client): the server's deadline
        # ends that generator instead.
        if self._ended or self._call is None:
            return
        conn = self._connection
        mutex = conn._mutex
        if not mutex.acquire(blocking=False):
            conn.abandoned.append(self)  # the next call to end on the connection stops it
            return
        mutex.release()
        if conn._io._is_owned():  # type: ignore[attr-defined]  # inside a send or read
            conn.abandoned.append(self)
            return
        try:
            self._release()
        except Exception:
            pass


def _many(
    client: Client,
    conn: StreamConnection,
    method: str,
    calls: Iterable[Sequence[Any]],
    timeout: float,
    metadata: Mapping[str, str | bytes] | None,
    window: int,
    chunk: int,
    return_exceptions: bool,
) -> Iterator[Any]:
    """:meth:`Client.iter_many` over TCP/TLS: BATCH requests of ``chunk`` calls (a request
    per call to a server without BATCH), ``window`` calls in flight, answers in order."""
    it = iter(calls)
    flight: deque[tuple[Ticket, int]] = deque()  # (ticket, calls it answers: 0 for one call)
    in_flight = 0
    exhausted = False
    try:
        while True:
            if not exhausted and in_flight <= window // 2:
                now = _monotonic()
                conn.ensure(now + timeout, method, timeout)
                core = conn.core
                features = core.peer_features if core is not None else 0
                t, budget, md = plan_call(timeout, features, client.metadata, metadata, now)
                use_batch = bool(features & FEATURE_BATCH) and client.codec.structured
                size = chunk if use_batch else 1
                frames: list[Callable[[int], bytes]] = []
                counts: list[int] = []
                while in_flight < window:
                    want = min(size, window - in_flight)
                    group = list(itertools.islice(it, want))
                    if group and not _SEQUENCES.issuperset(map(type, group)):
                        # f(*args) for any other iterable, never put in a BATCH body as it is (the
                        # server would refuse the whole request, the good calls too)
                        group = [
                            a if type(a) is tuple or type(a) is list else tuple(a) for a in group
                        ]
                    if group:
                        frames.append(
                            _batch_frame(conn, method, group, client.codec, budget, md, use_batch)
                        )
                        counts.append(len(group) if use_batch else 0)
                        in_flight += len(group)
                    if len(group) < want:
                        exhausted = True
                        break
                if frames:
                    tickets = conn.start_exchanges(frames, method, t)
                    flight.extend(zip(tickets, counts, strict=True))
            if not flight:
                return
            ticket, count = flight.popleft()
            in_flight -= max(count, 1)
            try:
                value = ticket.result()
            except Exception as exc:  # every call of the ticket failed with it
                if not return_exceptions:
                    raise
                yield from [exc] * max(count, 1)
                continue
            if not count:
                yield value
                continue
            results, failed = batch_answers(value, count, method, timeout)
            if not failed:
                yield from results
                continue
            for i, result in enumerate(results):
                error = failed.get(i)
                if error is None:
                    yield result
                elif return_exceptions:
                    yield error
                else:
                    raise error
    finally:  # left early (a call raised, or the caller stopped): the rest are cancelled
        for ticket, _ in flight:
            ticket.cancel()


def _batch_frame(
    conn: StreamConnection,
    method: str,
    group: list[Sequence[Any]],
    codec: Codec,
    budget: int | None,
    metadata: Metadata | None,
    batch: bool,
) -> Callable[[int], bytes]:
    """The builder of a batch's request for ``group`` (one call's, when not ``batch``)."""

    def frame(rid: int) -> bytes:
        core = conn.core
        if batch and (core is None or not core.peer_features & FEATURE_BATCH):
            raise LocalProtocolError(  # reconnected meanwhile to a server without BATCH
                "the server no longer takes BATCH requests; nothing was sent"
            )
        if batch:
            return encode_request(
                rid, method, group, None, codec, budget_ms=budget, metadata=metadata, batch=True
            )
        return encode_request(
            rid, method, group[0], None, codec, budget_ms=budget, metadata=metadata
        )

    return frame


class Client(ClientSettings):
    """A blocking client. Create it with :func:`connect`. ``sockstack.Client`` adds the
    patterns' client methods (``publish``, ``subscribe``).

    ``metadata``: sent with every call (string keys of ``[a-z0-9._-]``, str or bytes values;
    a call's own ``metadata`` overrides it key by key), to servers that read it.
    ``interceptors``: :class:`sockstack.interceptors.ClientInterceptor` objects (synchronous
    hooks only; TypeError for ``async`` ones) run around every call.

    Each call carries the time it has left (its timeout; inside a method a server runs, at most
    that call's time left), so the server stops work nobody waits for; a call that times out
    or is interrupted (``KeyboardInterrupt``) sends CANCEL, which stops it on the server
    (TCP/TLS, PROTOCOL.md §4).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        codec: str = "msgpack",
        backoff: Backoff | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        retry: RetryPolicy | None = None,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
        tls: ssl.SSLContext | None = None,
        secret: str | bytes | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        interceptors: Sequence[object] = (),
    ) -> None:
        self.metadata: Metadata | None = merge_metadata(metadata, None)  # checked now
        hooks = Hooks(interceptors)
        if hooks.is_async:
            raise TypeError("the blocking client takes synchronous hooks only")
        self.hooks: Hooks | None = hooks if hooks else None
        """Hooks of the interceptors around every call (sockstack.interceptors); None
        without (one ``is None`` test a call)."""
        self._configure(
            url,
            timeout=timeout,
            connect_timeout=connect_timeout,
            codec=codec,
            backoff=backoff,
            retry=retry,
            max_datagram=max_datagram,
            tls=tls,
            secret=secret,
        )
        if max_frame < MIN_MAX_FRAME:
            raise ValueError(
                f"max_frame {max_frame} is below the protocol's minimum of {MIN_MAX_FRAME}"
            )
        self.max_frame = max_frame
        self.lock = threading.Lock()
        """Not needed: the client is thread-safe (its connection's methods are). Kept for
        pattern code written when the client made one call at a time; holding it excludes only
        other holders."""
        _clients.add(self)  # so that a forked child's copy lets go of this process's session
        self.connection: StreamConnection | DatagramConnection
        if self.endpoint.scheme == "udp":
            self.connection = DatagramConnection(self.endpoint, self)
        else:
            self.connection = StreamConnection(self.endpoints, self)
            wait = self.first_connect_timeout()  # within the call timeout too
            self.connection.ensure(time.monotonic() + wait, "connect", wait)

    def _stream_only(self, kind: str, method: str) -> StreamConnection:
        """The TCP/TLS connection a stream or an upload (``kind``) needs; over UDP
        :class:`LocalProtocolError` (STREAM_MISMATCH), nothing sent."""
        conn = self.connection
        if not isinstance(conn, StreamConnection):
            raise LocalProtocolError(
                f"{kind}({method!r}): {kind}s need TCP or TLS (this client is "
                f"{self.endpoint}); nothing was sent",
                ErrorCode.STREAM_MISMATCH,
            )
        return conn

    def stream_connection(self, what: str) -> StreamConnection:
        """The TCP/TLS connection, for patterns that need one (ConnectError over UDP)."""
        conn = self.connection
        if not isinstance(conn, StreamConnection):
            raise ConnectError(f"{what} needs a tcp:// or tls:// URL")
        return conn

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` and wait for its result (``timeout`` is the call's own timeout).
        Safe from any thread: calls of several threads are pipelined on the connection."""
        if kwargs or self.codec is not MSGPACK or self.hooks is not None:
            return self.request(method, args, kwargs, timeout=timeout)
        t = self.timeout if timeout is None else timeout
        conn = self.connection
        if isinstance(conn, StreamConnection):
            return conn.call(method, args, None, MSGPACK, t)
        return conn.call(method, t, args=args)

    @overload
    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: Literal[False] = False,
    ) -> Any: ...

    @overload
    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: Literal[True],
    ) -> Reply: ...

    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        with_metadata: bool = False,
    ) -> Any:
        """Like :meth:`call`, with the arguments as a sequence and a mapping. ``metadata``:
        this call's, over the client's defaults; ``with_metadata=True``: return a
        :class:`~sockstack.protocol.calls.Reply` (the result, and the server's trailers)."""
        timeout = self.timeout if timeout is None else timeout
        hooks = self.hooks
        if hooks is None:
            return self._request(method, args, kwargs or None, timeout, metadata, with_metadata)
        call = ClientCall.of(
            method, args, kwargs, self.metadata, metadata, timeout, self.connection.ep
        )

        def send(c: ClientCall) -> Reply:
            return cast(
                Reply, self._request(c.method, c.args, c.kwargs, c.timeout, c.metadata, True)
            )

        reply = run_sync(hooks, call, send)
        return reply if with_metadata else reply.result

    def call_many(
        self,
        method: str,
        calls: Iterable[Sequence[Any]],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        window: int = DEFAULT_WINDOW,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Call ``method`` once per argument sequence of ``calls`` (positional arguments:
        ``[(1, 2), (3, 4)]``), pipelined on the connection, and return the results in order:
        the calls go in BATCH requests (PROTOCOL.md §4.7; a request per call to a server
        without them), up to ``window`` in flight, so many calls cost about one round trip.
        ``calls`` is read as calls are sent (a generator of any length works in bounded
        memory). Each call has ``timeout`` from when it is sent. A call that fails raises its
        error once the calls before it are answered (the calls after it still in flight are
        then cancelled: CANCEL, the server stops them; some may have run);
        ``return_exceptions=True`` puts the exception in its place instead."""
        return list(
            self.iter_many(
                method,
                calls,
                timeout=timeout,
                metadata=metadata,
                window=window,
                return_exceptions=return_exceptions,
            )
        )

    def iter_many(
        self,
        method: str,
        calls: Iterable[Sequence[Any]],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        window: int = DEFAULT_WINDOW,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """:meth:`call_many` as an iterator: each result in call order as soon as it and those
        before it are in (``for result in client.iter_many("add", pairs)``)."""
        chunk, _ = batch_plan(window)
        t = self.timeout if timeout is None else timeout
        conn = self.connection
        if self.hooks is not None or not isinstance(conn, StreamConnection):
            # Interceptors see each call; over UDP a datagram per call: one by one.
            for args in calls:
                try:
                    yield self.request(method, tuple(args), timeout=t, metadata=metadata)
                except Exception as exc:  # the call's outcome
                    if not return_exceptions:
                        raise
                    yield exc
            return
        yield from _many(self, conn, method, calls, t, metadata, window, chunk, return_exceptions)

    def _request(
        self,
        method: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        timeout: float,
        metadata: Mapping[str, str | bytes] | None,
        with_metadata: bool,
    ) -> Any:
        conn = self.connection
        if isinstance(conn, DatagramConnection):
            return conn.call(
                method,
                timeout,
                args=args,
                kwargs=kwargs,
                codec=self.codec,
                metadata=metadata,
                with_metadata=with_metadata,
            )
        return conn.call(method, args, kwargs, self.codec, timeout, False, metadata, with_metadata)

    def stream(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        **kwargs: Any,
    ) -> ResultStream:
        """The items of a generator method, as they come: ``for item in
        client.stream("ticks", 10)`` (TCP and TLS; see :class:`ResultStream`). ``timeout``
        (default: the client's) bounds the whole stream; ``metadata`` is this call's, over the
        client's defaults. Over UDP raises :class:`LocalProtocolError` (code STREAM_MISMATCH)
        and sends nothing. The client's interceptors run once around the whole stream
        (:class:`sockstack.interceptors.StreamHooks`)."""
        return self.stream_request(method, args, kwargs, timeout=timeout, metadata=metadata)

    def stream_request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> ResultStream:
        """Like :meth:`stream`, with the arguments as a sequence and a mapping (as
        :meth:`request` is to :meth:`call`): the method's own keyword arguments may then be
        named ``timeout`` or ``metadata``."""
        args = args if type(args) is tuple else tuple(args)
        return ResultStream(
            self,
            self._stream_only("stream", method),
            method,
            args,
            kwargs or None,
            self.timeout if timeout is None else timeout,
            metadata,
        )

    def upload(
        self,
        method: str,
        items: Iterable[Any],
        *args: Any,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call a method that takes an item stream (a parameter annotated ``Iterator[T]`` or
        ``AsyncIterator[T]``) with ``items`` (any iterable) as that stream, and
        ``args``/``kwargs`` as its other arguments: ``client.upload("total", rows, 2)`` (TCP
        and TLS, PROTOCOL.md §4.4). The items go as the server takes them (its flow-control
        window bounds what is in flight: this thread waits for the server's CREDIT, reading
        for the other threads' calls meanwhile); the result comes back once the method
        returns, which may be before every item was sent (sending then stops and a generator
        left unfinished is closed). ``timeout`` (default: the client's) bounds the call,
        though not a wait inside ``items`` itself; a call that times out or is interrupted
        sends CANCEL. Over UDP, or to a server that does not announce uploads, raises
        :class:`LocalProtocolError` (STREAM_MISMATCH) and sends nothing. Safe beside other
        threads' calls. The client's interceptors run once around it (``call.upload``)."""
        return self.upload_request(method, items, args, kwargs, timeout=timeout, metadata=metadata)

    def upload_request(
        self,
        method: str,
        items: Iterable[Any],
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> Any:
        """Like :meth:`upload`, with the other arguments as a sequence and a mapping (as
        :meth:`request` is to :meth:`call`): the method's own keyword arguments may then be
        named ``timeout`` or ``metadata``."""
        args = args if type(args) is tuple else tuple(args)
        conn = self._stream_only("upload", method)
        t = self.timeout if timeout is None else timeout
        codec = self.codec
        hooks = self.hooks
        if hooks is None:
            return _answer(
                conn.upload(method, items, args, kwargs or None, codec, t, metadata), False
            )
        call = ClientCall.of(method, args, kwargs, self.metadata, metadata, t, conn.ep, upload=True)

        def send(c: ClientCall) -> Reply:
            value = conn.upload(c.method, items, c.args, c.kwargs, codec, c.timeout, c.metadata)
            return cast(Reply, _answer(value, True))

        return run_sync(hooks, call, send).result

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of one PING/PONG in seconds."""
        timeout = self.timeout if timeout is None else timeout
        start = time.monotonic()
        conn = self.connection
        if isinstance(conn, DatagramConnection):
            core = conn.core

            def send(rid: int, now: float) -> None:
                core.send_ping(rid)

            conn.call("PING", timeout, send, track=False)
        else:
            conn.call("PING", (), None, self.codec, timeout, ping=True)
        return time.monotonic() - start

    def close(self) -> None:
        """Close the connection; calls other threads have in flight fail at once with
        :class:`ConnectionLost`. A later call connects anew (TCP/TLS)."""
        self.connection.close()

    def _after_fork(self) -> None:
        """In a forked child (the only thread there): a lock of its own (a thread of the parent
        may have held this one at the fork, and it does not exist here), and a connection of
        its own from the next call on."""
        self.lock = threading.Lock()
        connection = getattr(self, "connection", None)  # None while __init__ still connects
        if connection is not None:
            connection.after_fork()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_clients: weakref.WeakSet[Client] = weakref.WeakSet()
"""Every live blocking client of this process: a forked child resets its copies."""


def _after_fork_in_child() -> None:
    for client in list(_clients):
        try:
            client._after_fork()
        except Exception:  # a hook must not raise; that client's next call reports the trouble
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def connect(url: str | Sequence[str], **options: Any) -> Client:
    """A blocking :class:`Client` for ``tcp://host:port`` or ``udp://host:port``; TCP connects
    (and completes the handshake) now and raises :class:`ConnectError` if it cannot."""
    return Client(url, **options)


def udp_refused_error(ep: Endpoint, lone: bool) -> Callable[[], BaseException]:
    """A maker of the error a refused UDP call fails with (a new one per call)."""
    return (lambda: udp_refused(ep)) if lone else (lambda: udp_gone(ep))
