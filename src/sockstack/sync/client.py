"""The blocking client, for scripts: plain ``socket`` calls driving the same sans-I/O core::

    with connect("tcp://127.0.0.1:5050") as c:
        assert c.call("add", 2, 3) == 5

One call at a time per client (a lock makes it safe to share between threads). TCP: a lost
connection fails the call in flight with :class:`ConnectionLost`, and the next call reconnects
(with backoff, within its own timeout). UDP: retransmission with the same request id until the
call's timeout; the server runs a retried call once. A refusal (ICMP port unreachable, reported
as ECONNREFUSED on the connected socket: nothing listens there) makes the call send once more,
and a second refusal fails it at once with :class:`ConnectError` (:class:`ConnectionLost` when
earlier datagrams of it may have reached a server that has gone), not after its timeout. A
call's timeout bounds connecting too: :func:`connect` takes at most ``min(connect_timeout,
timeout)``, and a reconnect within a call never outlives the call's deadline.

After ``os.fork()`` a client is safe to use in both processes: the child's copy lets go of the
parent's connection (its copy of the socket is closed, nothing is sent on it, so the parent's
session stays open) and its next call connects afresh; over UDP the child gets a new socket (a
new source port) and new random request ids, so the server's reply cache never answers one
process with the other's results. This happens in an ``os.register_at_fork`` hook: the calls
themselves check nothing.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Self

from sockstack.errors import (
    CallTimeout,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
)
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
from sockstack.protocol.calls import Backoff, Failover, OneCall, remote_error
from sockstack.protocol.codecs import MSGPACK, Codec
from sockstack.protocol.connection import Connection, State
from sockstack.protocol.datagram import DEFAULT_MAX_DATAGRAM, RetryPolicy
from sockstack.protocol.events import (
    ConnectionTerminated,
    Error,
    Event,
    PatternMessage,
    Response,
    Role,
)
from sockstack.protocol.frames import DEFAULT_MAX_FRAME, HEADER_SIZE, MessageType, declared_size
from sockstack.protocol.messages import MIN_MAX_FRAME, encode_ping
from sockstack.transport.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    ClientSettings,
    udp_refused,
)
from sockstack.transport.tls import handshake_failure, handshake_lost, tls_reason
from sockstack.transport.urls import Endpoint

__all__ = ["Client", "DatagramConnection", "StreamConnection", "connect"]

_RECV = 256 * 1024
_GATHER_ABOVE = 64 * 1024
# Reads go into one preallocated buffer per connection: sock.recv(256 KiB) would allocate (and
# mmap/mremap/munmap, above glibc's mmap threshold) a fresh 256 KiB object on every call.
Route = Callable[[Any], None]
_REQUEST_ID = struct.Struct(">I")
_TYPE = 3  # offset of the message type in a frame
_ERROR = int(MessageType.ERROR)
_PONG = int(MessageType.PONG)
_PING = int(MessageType.PING)
_rng = random.Random()


class StreamConnection:
    """One blocking TCP/TLS connection driving a :class:`Connection` core.

    Timeouts use the kernel's SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket rather than Python's
    socket timeouts, which poll() before every recv: one system call per read instead of two.

    What patterns use: :meth:`exchange` (a frame that gets a RESPONSE), :meth:`send_frame` (one
    that gets none), :meth:`read_until`, ``routes`` (message class -> handler, called for
    messages read during any call) and ``state`` (their per-connection state).
    """

    kind = "stream"

    def __init__(self, eps: list[Endpoint], client: Client) -> None:
        self.failover: Failover[Endpoint] = Failover(eps)
        self.client = client
        self.sock: socket.socket | None = None
        self.core: Connection | None = None
        self.calls = OneCall()
        self.routes: dict[type, Route] = {}
        self.state: dict[str, Any] = {}
        self.ever_connected = False
        self._sock_timeout = 0.0
        self._poller: select.poll | None = None
        self._buf = bytearray(_RECV)
        self._view = memoryview(self._buf)
        self._limit = HEADER_SIZE + client.max_frame  # the largest frame read whole
        self._tls = eps[0].scheme == "tls"

    def _set_timeout(self, seconds: float) -> None:
        assert self.sock is not None
        seconds = max(seconds, 0.001)
        sec = int(seconds)
        tv = struct.pack("@ll", sec, int((seconds - sec) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._sock_timeout = seconds

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
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    def _hello(self, ep: Endpoint, deadline: float) -> None:
        """Send HELLO and read until WELCOME. Every failure is a :class:`ConnectError` (no call
        was sent) saying what is most likely wrong."""
        sock, core = self.sock, self.core
        assert sock is not None and core is not None
        tls = ep.scheme == "tls"
        try:
            sock.sendall(core.data_to_send())
            while core.state is State.HELLO_SENT:
                try:
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
                if self.sock is None:  # ended by the core without a terminating event
                    raise ConnectError(f"{ep}: {handshake_failure(None, '', True, tls=tls)}")
        except ConnectError:  # an OSError too
            raise
        except ssl.SSLError as exc:  # an alert after the client's handshake (TLS 1.3)
            raise ConnectError(f"{ep}: TLS: {tls_reason(exc)}") from None
        except OSError as exc:  # reset, broken pipe...
            why = handshake_failure(None, "", True, tls=tls)
            raise ConnectError(f"{ep}: {why} ({exc.strerror or exc})") from None

    def drop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock, self.core = None, None

    def ensure(self, deadline: float, method: str, timeout: float) -> None:
        if self.sock is not None:
            # Anything readable between calls (a keepalive PING, the server's CLOSE) is handled
            # before sending, so a request never goes out on a session the server has ended.
            assert self._poller is not None
            if self._poller.poll(0):
                self._poll_idle()
            if self.sock is not None:
                return
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

    def _poll_idle(self) -> None:
        """Handle what arrived while idle (keepalive PINGs, a CLOSE) before reusing the socket."""
        sock, core = self.sock, self.core
        assert sock is not None and core is not None
        while True:
            r, _, _ = select.select([sock], [], [], 0)
            if not r:
                break
            try:
                data = sock.recv(_RECV)
            except OSError:
                data = b""
            # Only the core's side effects matter here: PONGs queued, CLOSE answered.
            core.receive_data(data) if data else core.receive_eof()
            out = core.data_to_send()
            if out:
                try:
                    sock.sendall(out)
                except OSError:
                    pass
            if not data or core.close_expected():
                self.drop()
                return

    def _send(self, data: bytes, method: str) -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except (BlockingIOError, ssl.SSLWantWriteError):  # SO_SNDTIMEO: server not reading
            self.drop()
            raise CallTimeout(method, self._sock_timeout, "server not reading") from None
        except OSError as exc:
            self.drop()
            raise ConnectionLost(f"{self.ep}: {exc}; the call may or may not have run") from None

    def _sendmsg(self, pieces: list[bytes], method: str) -> None:
        assert self.sock is not None
        if isinstance(self.sock, ssl.SSLSocket):  # TLS encrypts a copy anyway: no sendmsg
            self._send(b"".join(pieces), method)
            return
        total = sum(len(p) for p in pieces)
        try:
            sent = self.sock.sendmsg(pieces)
            if sent < total:  # finish what the kernel did not take at once
                self.sock.sendall(memoryview(b"".join(pieces))[sent:])
        except BlockingIOError:
            self.drop()
            raise CallTimeout(method, self._sock_timeout, "server not reading") from None
        except OSError as exc:
            self.drop()
            raise ConnectionLost(f"{self.ep}: {exc}; the call may or may not have run") from None

    def _recv(self, deadline: float, method: str, into: memoryview | None = None) -> int:
        """One read into the connection's buffer (or ``into``): bytes read (0 at end of stream),
        or -1 when the socket's timeout expired before the call's deadline."""
        sock = self.sock
        assert sock is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CallTimeout(method, self.client.timeout)
        t = self._sock_timeout
        if remaining < t * 0.9 or remaining > t * 1.1:
            self._set_timeout(remaining)  # re-armed only when off by more than 10 %
        try:
            return sock.recv_into(self._buf if into is None else into)
        except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO expired
            if time.monotonic() >= deadline:
                raise CallTimeout(method, self.client.timeout) from None
            return -1
        except OSError as exc:
            self.drop()
            raise ConnectionLost(f"{self.ep}: {exc}; the call may or may not have run") from None

    def _events(self, n: int, deadline: float = 0.0, method: str = "") -> list[Event]:
        """The events of ``n`` bytes just read (0: end of stream). The socket is dropped if the
        session ended. With a ``deadline``, a large frame begun in these bytes is read whole,
        straight into its own buffer."""
        core = self.core
        assert core is not None
        if n:
            view = self._view[:n]
            single = core.receive_single(view)  # the common case: one whole RESPONSE
            if single is not None:
                return [single]
            if deadline and n >= HEADER_SIZE and not core.buffered:
                total = declared_size(view)
                if total is not None and n < total and _GATHER_ABOVE < total <= self._limit:
                    return self._large(view, total, deadline, method)
            return self._feed(view.tobytes())
        return self._feed(None)

    def _large(self, first: memoryview, total: int, deadline: float, method: str) -> list[Event]:
        """Read the rest of a large frame into one buffer and decode it from there: no copies
        of the chunks and no join (the kernel writes where the frame will be decoded)."""
        core = self.core
        assert core is not None
        frame = bytearray(total)
        view = memoryview(frame)
        have = len(first)
        view[:have] = first
        try:
            while have < total:
                n = self._recv(deadline, method, view[have:])
                if n == 0:
                    return self._feed(bytes(frame[:have])) + self._feed(None)
                if n > 0:
                    have += n
        except BaseException:
            if self.sock is not None:
                core.receive_data(bytes(frame[:have]))  # keep the stream in step for later
            raise
        single = core.receive_single(view)
        if single is not None:
            return [single]
        return self._feed(bytes(frame))

    def _feed(self, data: bytes | None) -> list[Event]:
        """Bytes read (None: end of stream) through the general path."""
        sock, core = self.sock, self.core
        assert sock is not None and core is not None
        events = core.receive_data(data) if data is not None else core.receive_eof()
        out = core.data_to_send()
        if out:
            try:
                sock.sendall(out)
            except OSError:
                pass
        if core.close_expected():
            self.drop()
        return events

    @staticmethod
    def _terminated(events: list[Event], ep: Endpoint) -> None:
        for ev in events:
            if type(ev) is ConnectionTerminated:
                if ev.by_peer and ev.code is not None:
                    raise ConnectionClosed(ev.code, ev.reason)
                raise ConnectionLost(f"{ep}: {ev.reason}; the call may or may not have run")

    def call(
        self,
        method: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        codec: Codec,
        timeout: float,
        ping: bool = False,
    ) -> Any:
        now = time.monotonic()
        deadline = now + timeout
        sock = self.sock
        poller = self._poller
        if (
            sock is None
            or poller is None
            or poller.poll(0)
            or (self._tls and isinstance(sock, ssl.SSLSocket) and sock.pending())
        ):
            self.ensure(deadline, method, timeout)  # (re)connect, or read what came unasked
            sock = self.sock
        core = self.core
        assert core is not None and sock is not None
        calls = self.calls
        rid = calls.begin()
        try:
            pieces = None
            if not ping and kwargs is None and codec is MSGPACK:
                pieces = core.request_frame(rid, method, args)  # the common case, in one piece
                if pieces is not None and len(pieces) == 1:
                    self._send(pieces[0], method)
                    # The first read, inlined (_recv without its call and clock reading: the
                    # time left is still about ``timeout``).
                    t = self._sock_timeout
                    if timeout < t * 0.9 or timeout > t * 1.1:
                        self._set_timeout(timeout)
                    try:
                        n = sock.recv_into(self._buf)
                    except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO expired
                        n = -1
                    except OSError as exc:
                        self.drop()
                        raise ConnectionLost(
                            f"{self.ep}: {exc}; the call may or may not have run"
                        ) from None
                    if n > 0:
                        single = core.receive_single(self._view[:n])
                        if type(single) is Response and calls.answers(single):
                            return single.result
                        if single is not None:
                            events: list[Event] = [single]
                        else:
                            events = self._events(n, deadline, method)
                    else:
                        events = self._events(n) if n == 0 else []
                    return self._finish(events, rid, deadline, method, timeout)
            if pieces is None:
                if ping:
                    core.send_ping(rid)
                else:
                    core.send_request(rid, method, args, kwargs, codec)
                pieces = core.buffers_to_send()
            if len(pieces) > 3 or len(pieces[-1]) > _GATHER_ABOVE:
                self._sendmsg(pieces, method)  # header, meta, body pieces: no copy of the body
            else:
                self._send(b"".join(pieces), method)
            return self._finish([], rid, deadline, method, timeout)
        finally:
            calls.end()  # answered, failed or timed out: a late answer is nobody's

    def _finish(
        self, events: list[Event], rid: int, deadline: float, method: str, timeout: float
    ) -> Any:
        """Handle ``events`` and read on until the answer to ``rid`` (or the end) comes.
        Pattern messages that arrive meanwhile go to their routes (e.g. a subscription's
        inbox); answers are matched to calls by request id alone."""
        while True:
            self._route(events)
            result = self.calls.settle(events)
            if result is not None:
                ok, value = result
                if ok:
                    return value
                raise value
            self._terminated(events, self.ep)
            if self.sock is None:  # ended without a CLOSE frame
                raise ConnectionLost(
                    f"{self.ep}: connection lost; the call may or may not have run"
                )
            try:
                n = self._recv(deadline, method)
            except CallTimeout:
                raise CallTimeout(method, timeout) from None
            events = self._events(n, deadline, method) if n >= 0 else []

    def _route(self, events: list[Event]) -> None:
        routes = self.routes
        for ev in events:
            if isinstance(ev, PatternMessage):
                route = routes.get(type(ev))
                if route is not None:
                    route(ev)

    # ------------------------------------------------------------------ for patterns

    def exchange(self, frame: Callable[[int], bytes], what: str, timeout: float) -> tuple[int, Any]:
        """Send the frame ``frame(request_id)`` builds for a fresh id and wait for the RESPONSE
        to it; returns (request id, result). Raises :class:`CallTimeout`, or
        :class:`RemoteError` for an ERROR answer."""
        now = time.monotonic()
        deadline = now + timeout
        self.ensure(deadline, what, timeout)
        assert self.core is not None
        rid = self.calls.begin()
        try:
            self.core.send_message(frame(rid))
            self._send(self.core.data_to_send(), what)
            result = self._finish([], rid, deadline, what, timeout)
        finally:
            self.calls.end()
        return rid, result

    def send_frame(self, frame: bytes, what: str, timeout: float) -> None:
        """Send a frame that gets no answer (QoS 0 PUB, ACK)."""
        self.ensure(time.monotonic() + timeout, what, timeout)
        assert self.core is not None
        self.core.send_message(frame)
        self._send(self.core.data_to_send(), what)

    def read_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Read (routing what arrives) until ``done()`` holds. Raises :class:`CallTimeout`, or
        :class:`ConnectionLost` when the connection ends first."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.sock is None:
                raise ConnectionLost(f"{self.ep}: connection lost")
            n = self._recv(deadline, what)
            events = self._events(n, deadline, what) if n >= 0 else []
            self._route(events)
            self._terminated(events, self.ep)
            if self.sock is None and not done():
                raise ConnectionLost(f"{self.ep}: connection lost")

    def after_fork(self) -> None:
        """In a forked child: let go of the parent's session without a byte sent on it (no
        CLOSE, no shutdown: closing this process's copy of the socket leaves the parent's
        open, and dropping a TLS socket sends no close_notify). The next call connects anew."""
        sock = self.sock
        self.sock, self.core, self._poller = None, None, None
        self.calls = OneCall()
        self._sock_timeout = 0.0
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        if self.sock is not None and self.core is not None:
            try:
                self.core.send_close(ErrorCode.NORMAL, "")
                self.sock.sendall(self.core.data_to_send())
            except OSError:
                pass
        self.drop()


class DatagramConnection:
    """The blocking client's UDP socket: the datagram core retransmits, the call core matches
    answers to the call waiting.

    With a secret, every datagram is sealed for the server's epoch (PROTOCOL.md §6.1), learned
    from the server: a call sealed for an epoch the server does not have (none yet, or a
    restarted server's old one) is refused with the server's epoch, and sent again for it when
    nothing of it can have run, else failed with :class:`ConnectionLost` ("may or may not have
    run"). A call's retransmissions keep the epoch of its first datagram (its pin)."""

    kind = "datagram"

    def __init__(self, ep: Endpoint, client: Client) -> None:
        self.ep = ep
        self.client = client
        self.core = client.datagram_core()
        self.calls = OneCall()
        self.sock = self._open()
        self.last_id = 0
        self.last_error = ""
        self._sock_timeout = 0.0
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self.auth = client.datagram_auth()
        # The pin of the call in flight: the epoch its first datagram was sealed for, and the
        # time (ms) of that datagram (0: nothing sent yet). Reset by new_id().
        self._pin_epoch = NO_EPOCH
        self._pin_ms = 0
        # ECONNREFUSED (ICMP port unreachable) for the call in flight: None before any, else
        # whether the call had sent a single datagram when first refused. Reset by new_id().
        self._refused_lone: bool | None = None
        self._refusal = False  # a refusal reported by send(), handled by the call's loop

    def _open(self) -> socket.socket:
        """A UDP socket connected to the server (a new source port each time)."""
        ep = self.ep
        sock = socket.socket(socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.connect((ep.host, ep.port))
        except OSError as exc:
            sock.close()
            raise ConnectError(f"{ep}: {exc.strerror or exc}") from None
        return sock

    def after_fork(self) -> None:
        """In a forked child: a socket of its own (a new source port) and a new datagram core
        (request ids from a fresh random start, drawn from os.urandom; none of the parent's
        retransmissions), so the server's reply cache, keyed by address and request id, never
        answers this process with the parent's results. The parent's socket is untouched."""
        client = self.client
        old = self.sock
        self.core = client.datagram_core()
        self.calls = OneCall()
        self.last_id = 0
        self._sock_timeout = 0.0
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
        if auth is not None:
            self._read_waiting()
            if auth.epoch == NO_EPOCH:
                wait = self.client.connect_timeout
                if not self._ping_for_epoch(time.monotonic() + wait):
                    detail = f": {self.last_error}" if self.last_error else ""
                    raise ConnectError(
                        f"{self.ep}: no answer within {wait:g} s to learn the server's epoch, "
                        f"so nothing was sent{detail}"
                    )
            data = auth.seal(data, time.time())
        self._send(data)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:  # reported by send: that datagram did not go
                self._refusal = True
            self.last_error = exc.strerror or str(exc)

    def _on_refused(self, rid: int, track: bool) -> None:
        """The kernel reported ECONNREFUSED during call ``rid``: the first time, send its
        datagram once more (the refusal may be left over from an earlier datagram, or the server
        may be starting: the reply cache runs a call once, however many datagrams reach it);
        the second time, raise (:func:`udp_refused`)."""
        self._refusal = False
        self.last_error = "connection refused (no server on that port?)"
        if self._refused_lone is None:
            self._refused_lone = self.core.attempts(rid) <= 1
            if not (track and self.core.resend(rid)):
                self.core.send_ping(rid)  # a PING (not tracked by the core): send it again
            self._send_out()
            if not self._refusal:
                return
        self.core.cancel(rid)
        raise udp_refused(self.ep)

    def _send_call(self, data: bytes) -> None:
        """Send a datagram of the call in flight, sealed for its pin."""
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
        if rid == 0 or rid != self.calls.current or not self._pin_ms:
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
        refusals = 0
        rid = self.new_id()
        while auth.epoch == NO_EPOCH:
            now = time.monotonic()
            if now >= deadline:
                return False
            self._send(auth.seal(encode_ping(rid), time.time()))
            until = min(deadline, now + self.core.retry.interval(attempt, _rng))
            attempt += 1
            while auth.epoch == NO_EPOCH:
                if self._refusal:  # refused (by recv or by send): once more, then give up
                    self._refusal = False
                    self.last_error = "connection refused (no server on that port?)"
                    refusals += 1
                    if refusals > 1:
                        raise udp_refused(self.ep)
                    break
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

    def call_positional(self, method: str, args: Sequence[Any], timeout: float) -> Any:
        """The common case: a msgpack call with positional arguments."""
        now = time.monotonic()
        rid = self.new_id()
        self._send_call(self.core.request_datagram(rid, method, args, now=now, timeout=timeout))
        return self.exchange(method, rid, timeout, now + timeout)

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
        for data in self.core.datagrams_to_send():
            self._send_call(data)

    def exchange(
        self, method: str, rid: int, timeout: float, deadline: float, *, track: bool = True
    ) -> Any:
        """Send what the core queued for call ``rid`` and wait for its answer, retransmitting
        when the core says so (``track``), until ``deadline``."""
        auth = self.auth
        if auth is not None and auth.epoch == NO_EPOCH and not self._pin_ms:
            out = self.core.datagrams_to_send()
            if any(len(d) + TRAILER_SIZE < REFUSAL_SIZE and d[_TYPE] != _PING for d in out):
                # Shorter than the refusal that would tell the epoch (never longer than what
                # it answers): learn the epoch first.
                try:
                    self._ping_for_epoch(deadline)
                except BaseException:
                    self.core.cancel(rid)
                    raise
            self._pin_ms = 0
            for data in out:
                self._send_call(data)
        self.calls.begin(rid)  # the datagram core chose the id (random first id)
        try:
            return self._exchange(method, rid, timeout, deadline, track)
        finally:
            self.calls.end()

    def _exchange(self, method: str, rid: int, timeout: float, deadline: float, track: bool) -> Any:
        self._send_out()
        while True:
            if self._refusal:
                self._on_refused(rid, track)
            now = time.monotonic()
            if now >= deadline:
                self.core.cancel(rid)
                detail = f"last error: {self.last_error}" if self.last_error else ""
                raise CallTimeout(method, timeout, detail)
            nxt = self.core.next_timer() if track else None
            wait = max(0.0, min(deadline, nxt if nxt is not None else deadline) - now)
            self._fit_timeout(wait)
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:  # SO_RCVTIMEO: a retransmission (or the deadline) is due
                for ev in self.core.handle_timer(time.monotonic()):
                    if ev.request_id == rid:
                        raise CallTimeout(
                            method, timeout, f"{ev.attempts} datagrams sent"
                        ) from None
                self._send_out()
                continue
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:
                    self._on_refused(rid, track)
                    continue
                if exc.errno == errno.EBADF:  # closed, or no socket could be made after fork
                    self.core.cancel(rid)
                    detail = self.last_error or "client is closed"
                    raise ConnectError(f"{self.ep}: {detail}") from None
                raise
            frame = self._incoming(n)
            if frame is None:
                continue
            result = self.calls.settle(self.core.receive_datagram(frame))
            if result is not None:
                ok, value = result
                if ok:
                    return value
                raise value

    def new_id(self) -> int:
        self.last_id = self.core.new_request_id(self.last_id)
        self._pin_ms = 0
        self._refused_lone = None
        return self.last_id

    def close(self) -> None:
        self.sock.close()


class Client(ClientSettings):
    """A blocking client. Create it with :func:`connect`. ``sockstack.Client`` adds the
    patterns' client methods (``publish``, ``subscribe``)."""

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
    ) -> None:
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
        """One call at a time: held while a call (or a pattern's exchange) uses the socket."""
        _clients.add(self)  # so that a forked child's copy lets go of this process's session
        self.connection: StreamConnection | DatagramConnection
        if self.endpoint.scheme == "udp":
            self.connection = DatagramConnection(self.endpoint, self)
        else:
            self.connection = StreamConnection(self.endpoints, self)
            wait = self.first_connect_timeout()  # within the call timeout too
            self.connection.ensure(time.monotonic() + wait, "connect", wait)

    def stream_connection(self, what: str) -> StreamConnection:
        """The TCP/TLS connection, for patterns that need one (ConnectError over UDP)."""
        conn = self.connection
        if not isinstance(conn, StreamConnection):
            raise ConnectError(f"{what} needs a tcp:// or tls:// URL")
        return conn

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` and wait for its result (``timeout`` is the call's own timeout)."""
        conn = self.connection
        if kwargs or self.codec is not MSGPACK:
            return self.request(method, args, kwargs, timeout=timeout)
        with self.lock:  # the common case without the extra layer
            t = self.timeout if timeout is None else timeout
            if isinstance(conn, StreamConnection):
                return conn.call(method, args, None, MSGPACK, t)
            return conn.call_positional(method, args, t)

    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        timeout = self.timeout if timeout is None else timeout
        with self.lock:
            deadline = time.monotonic() + timeout
            conn = self.connection
            if isinstance(conn, DatagramConnection):
                rid = conn.new_id()
                conn.core.send_request(
                    rid,
                    method,
                    args,
                    kwargs or None,
                    self.codec,
                    now=time.monotonic(),
                    timeout=timeout,
                )
                return conn.exchange(method, rid, timeout, deadline)
            return conn.call(method, args, kwargs or None, self.codec, timeout)

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of one PING/PONG in seconds."""
        timeout = self.timeout if timeout is None else timeout
        with self.lock:
            start = time.monotonic()
            deadline = start + timeout
            conn = self.connection
            if isinstance(conn, DatagramConnection):
                rid = conn.new_id()
                conn.core.send_ping(rid)
                conn.exchange("PING", rid, timeout, deadline, track=False)
            else:
                conn.call("PING", (), None, self.codec, timeout, ping=True)
            return time.monotonic() - start

    def close(self) -> None:
        with self.lock:
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
