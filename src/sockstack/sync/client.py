"""The blocking client, for scripts: plain ``socket`` calls driving the same sans-I/O core::

    with connect("tcp://127.0.0.1:5050") as c:
        assert c.call("add", 2, 3) == 5

One call at a time per client (a lock makes it safe to share between threads). TCP: a lost
connection fails the call in flight with :class:`ConnectionLost`, and the next call reconnects
(with backoff, within its own timeout). UDP: retransmission with the same request id until the
call's timeout; the server runs a retried call once.
"""

from __future__ import annotations

import collections
import errno
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sockstack.asyncio.client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    Backoff,
    Message,
    tls_reason,
)
from sockstack.errors import (
    CallTimeout,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
    RemoteError,
)
from sockstack.protocol.auth import AuthFailure, DatagramAuth, token_extension, unsealed_refusal
from sockstack.protocol.codecs import CODECS, MSGPACK, Codec, get_codec
from sockstack.protocol.connection import Connection, ConnectionTerminated, State
from sockstack.protocol.datagram import DEFAULT_MAX_DATAGRAM, DatagramClient, RetryPolicy
from sockstack.protocol.frames import DEFAULT_MAX_FRAME, HEADER_SIZE, MAGIC
from sockstack.protocol.messages import CORE_MESSAGES, Error, Pong, Response, Role
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import (
    PUBSUB_MESSAGES,
    Msg,
    encode_ack,
    encode_pub,
    encode_sub,
    encode_unsub,
    sub_options,
)
from sockstack.pubsub.topics import check_topic
from sockstack.transport.tls import client_context
from sockstack.transport.urls import Endpoint, parse_endpoints

__all__ = ["Client", "connect"]

_RECV = 256 * 1024
_GATHER_ABOVE = 64 * 1024
_LARGE = struct.Struct(">2s4xHII")  # magic, meta_len, request id, body_len of a frame header
# Reads go into one preallocated buffer per connection: sock.recv(256 KiB) would allocate (and
# mmap/mremap/munmap, above glibc's mmap threshold) a fresh 256 KiB object on every call.


def _remote_error(ev: Error) -> RemoteError:
    return RemoteError(ev.type or ErrorCode.describe(ev.code), ev.message, ev.code)


class _TCP:
    """One blocking TCP connection driving a :class:`Connection` core.

    Timeouts use the kernel's SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket rather than Python's
    socket timeouts, which poll() before every recv: one system call per read instead of two.
    """

    def __init__(self, eps: list[Endpoint], client: Client) -> None:
        self.eps = eps
        self._index = 0
        self.client = client
        self.sock: socket.socket | None = None
        self.core: Connection | None = None
        self.next_id = 0
        self.ever_connected = False
        self._sock_timeout = 0.0
        self._poller: select.poll | None = None
        self._buf = bytearray(_RECV)
        self._view = memoryview(self._buf)
        self._limit = HEADER_SIZE + client.max_frame  # the largest frame read whole
        self._tls = eps[0].scheme == "tls"
        self.inbox: dict[int, collections.deque[Msg]] = {}  # published messages, by subscription

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
        return self.eps[self._index]

    def _connect(self, deadline: float) -> None:
        """Connect to the current server, else to the next ones in the list (failover)."""
        errors = []
        start = self._index
        for i in range(len(self.eps)):
            self._index = (start + i) % len(self.eps)
            try:
                self._connect_one(deadline)
                return
            except ConnectError as exc:
                errors.append(str(exc))
        self._index = start
        raise ConnectError("; ".join(errors))

    def _connect_one(self, deadline: float) -> None:
        timeout = max(0.001, min(self.client.connect_timeout, deadline - time.monotonic()))
        try:
            sock = socket.create_connection((self.ep.host, self.ep.port), timeout=timeout)
        except OSError as exc:
            raise ConnectError(f"{self.ep}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ep.scheme == "tls":
            assert self.client.tls is not None
            try:  # the handshake runs under the connect timeout still set on the socket
                sock = self.client.tls.wrap_socket(sock, server_hostname=self.ep.host)
            except ssl.SSLError as exc:
                sock.close()
                raise ConnectError(f"{self.ep}: TLS: {tls_reason(exc)}") from None
            except OSError as exc:
                sock.close()
                raise ConnectError(f"{self.ep}: TLS handshake: {exc.strerror or exc}") from None
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
        self._set_timeout(timeout)
        try:
            self._send(core.data_to_send(), "HELLO")
            while core.state is State.HELLO_SENT:
                n = self._recv(deadline, "HELLO")
                for ev in self._events(n) if n >= 0 else []:
                    if type(ev) is ConnectionTerminated:
                        raise ConnectError(
                            f"{self.ep}: refused: {ev.reason} [{ErrorCode.describe(ev.code or 0)}]"
                        )
        except (ConnectionLost, CallTimeout, OSError) as exc:
            self.drop()
            raise ConnectError(
                f"{self.ep}: handshake failed: {exc}".replace(f": {self.ep}:", ":")
            ) from None
        except ConnectError:
            self.drop()
            raise
        self.ever_connected = True
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

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

    def _events(self, n: int, deadline: float = 0.0, method: str = "") -> list[Any]:
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
                magic, meta_len, _, body_len = _LARGE.unpack_from(view)
                total = HEADER_SIZE + meta_len + body_len
                if magic == MAGIC and n < total and _GATHER_ABOVE < total <= self._limit:
                    return self._large(view, total, deadline, method)
            return self._feed(view.tobytes())
        return self._feed(None)

    def _large(self, first: memoryview, total: int, deadline: float, method: str) -> list[Any]:
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

    def _feed(self, data: bytes | None) -> list[Any]:
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
    def _terminated(events: list[Any], ep: Endpoint) -> None:
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
        deadline = time.monotonic() + timeout
        sock = self.sock
        if (
            sock is None
            or self._poller.poll(0)  # type: ignore[union-attr]
            or (self._tls and sock.pending())  # type: ignore[attr-defined]
        ):
            self.ensure(deadline, method, timeout)  # (re)connect, or read what came unasked
            sock = self.sock
        core = self.core
        assert core is not None and sock is not None
        self.next_id = rid = self.next_id % 0xFFFFFFFF + 1
        pieces = None
        if not ping and kwargs is None and codec is MSGPACK:
            pieces = core.request_frame(rid, method, args)  # the common case, in one piece
            if pieces is not None and len(pieces) == 1:
                self._send(pieces[0], method)
                # The first read, inlined (_recv without its call and clock reading: the time
                # left is still about ``timeout``).
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
                    if type(single) is Response and single.request_id == rid:
                        return single.result
                    events = [single] if single is not None else self._events(n, deadline, method)
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
            self._sendmsg(pieces, method)  # header, meta, body pieces: no copy of a large body
        else:
            self._send(b"".join(pieces), method)
        return self._finish([], rid, deadline, method, timeout)

    def _finish(
        self, events: list[Any], rid: int, deadline: float, method: str, timeout: float
    ) -> Any:
        """Handle ``events`` and read on until the answer to ``rid`` (or the end) comes.
        Published messages that arrive meanwhile wait in the inbox of their subscription."""
        while True:
            for ev in events:
                if type(ev) is Msg:
                    self.inbox.setdefault(ev.sid, collections.deque()).append(ev)
            for ev in events:
                t = type(ev)
                if t is Response and ev.request_id == rid:
                    return ev.result
                if t is Error and ev.request_id == rid:
                    raise _remote_error(ev)
                if t is Pong and ev.request_id == rid:
                    return None
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

    # ------------------------------------------------------------------ publish/subscribe

    def exchange_frame(self, frame: Callable[[int], bytes], what: str, timeout: float) -> int:
        """Send the frame built for a fresh id and wait for its RESPONSE; returns the id."""
        deadline = time.monotonic() + timeout
        self.ensure(deadline, what, timeout)
        assert self.core is not None
        self.next_id = rid = self.next_id % 0xFFFFFFFF + 1
        self.core.send_message(frame(rid))
        self._send(self.core.data_to_send(), what)
        self._finish([], rid, deadline, what, timeout)
        return rid

    def send_frame(self, frame: bytes, what: str, timeout: float) -> None:
        """Send a frame that gets no answer (QoS 0 PUB, ACK)."""
        self.ensure(time.monotonic() + timeout, what, timeout)
        assert self.core is not None
        self.core.send_message(frame)
        self._send(self.core.data_to_send(), what)

    def next_message(self, sid: int, timeout: float) -> Msg:
        """The next message for subscription ``sid``, reading the socket as needed."""
        box = self.inbox.setdefault(sid, collections.deque())
        deadline = time.monotonic() + timeout
        what = f"messages for subscription {sid}"
        while not box:
            if self.sock is None:
                raise ConnectionLost(f"{self.ep}: connection lost; subscriptions are gone")
            try:
                n = self._recv(deadline, what)
            except CallTimeout:
                raise CallTimeout(what, timeout) from None
            events = self._events(n, deadline, what) if n >= 0 else []
            for ev in events:
                if type(ev) is Msg:
                    self.inbox.setdefault(ev.sid, collections.deque()).append(ev)
            self._terminated(events, self.ep)
            if self.sock is None and not box:
                raise ConnectionLost(f"{self.ep}: connection lost; subscriptions are gone")
        return box.popleft()

    def close(self) -> None:
        if self.sock is not None and self.core is not None:
            try:
                self.core.send_close(ErrorCode.NORMAL, "")
                self.sock.sendall(self.core.data_to_send())
            except OSError:
                pass
        self.drop()


class _UDP:
    def __init__(self, ep: Endpoint, client: Client) -> None:
        self.ep = ep
        self.client = client
        self.core = DatagramClient(max_datagram=client.max_datagram, retry=client.retry)
        family = socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.connect((ep.host, ep.port))
        except OSError as exc:
            self.sock.close()
            raise ConnectError(f"{ep}: {exc.strerror or exc}") from None
        self.last_id = 0
        self.last_error = ""
        self._sock_timeout = 0.0
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        secret = client.secret
        self.auth = DatagramAuth(secret) if secret is not None else None

    def _send_datagram(self, data: bytes) -> None:
        if self.auth is not None:
            data = self.auth.seal(data, time.time())
        try:
            self.sock.send(data)
        except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP: the retry resends
            self.last_error = exc.strerror or str(exc)

    def _incoming(self, n: int) -> bytes | memoryview | None:
        """The frame in ``n`` bytes received, or None for a datagram that is not authentic."""
        if self.auth is None:
            return self._view[:n]
        data = bytes(self._view[:n])
        try:
            return self.auth.open(data, time.time(), track=False)
        except AuthFailure as exc:
            if unsealed_refusal(data):
                return data
            self.last_error = f"dropped a datagram: {exc.reason}"
            return None

    def call_positional(self, method: str, args: Sequence[Any], timeout: float) -> Any:
        """The common case: a msgpack call with positional arguments."""
        now = time.monotonic()
        rid = self.new_id()
        self._send_datagram(self.core.request_datagram(rid, method, args, now=now, timeout=timeout))
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
            self._send_datagram(data)

    def exchange(
        self, method: str, rid: int, timeout: float, deadline: float, *, track: bool = True
    ) -> Any:
        self._send_out()
        while True:
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
                    self.last_error = "connection refused (no server on that port?)"
                    continue
                raise
            frame = self._incoming(n)
            if frame is None:
                continue
            for ev in self.core.receive_datagram(frame):
                t = type(ev)
                if getattr(ev, "request_id", None) != rid:
                    continue
                if t is Response:
                    return ev.result
                if t is Error:
                    raise _remote_error(ev)
                if t is Pong:
                    return None

    def new_id(self) -> int:
        self.last_id = self.core.new_request_id(self.last_id)
        return self.last_id

    def close(self) -> None:
        self.sock.close()


class Client:
    """A blocking client. Create it with :func:`connect`."""

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
        secret: bytes | None = None,
    ) -> None:
        self.secret = secret
        self.endpoints = parse_endpoints(url)
        self.endpoint = self.endpoints[0]
        # tls:// URLs: the given context, else one that verifies against the system's CAs.
        self.tls = tls if tls is not None or self.endpoint.scheme != "tls" else client_context()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.codec: Codec = get_codec(codec)
        self.backoff = backoff or Backoff()
        self.max_frame = max_frame
        self.retry = retry
        self.max_datagram = max_datagram
        self._lock = threading.Lock()
        self.registry = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])
        self._impl: _TCP | _UDP
        if self.endpoint.scheme == "udp":
            self._impl = _UDP(self.endpoint, self)
        else:
            self._impl = _TCP(self.endpoints, self)
            self._impl.ensure(time.monotonic() + connect_timeout, "connect", connect_timeout)

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` and wait for its result (``timeout`` is the call's own timeout)."""
        impl = self._impl
        if kwargs or self.codec is not MSGPACK:
            return self.request(method, args, kwargs, timeout=timeout)
        with self._lock:  # the common case without the extra layer
            t = self.timeout if timeout is None else timeout
            if isinstance(impl, _TCP):
                return impl.call(method, args, None, MSGPACK, t)
            return impl.call_positional(method, args, t)

    def request(
        self,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            deadline = time.monotonic() + timeout
            impl = self._impl
            if isinstance(impl, _UDP):
                rid = impl.new_id()
                impl.core.send_request(
                    rid,
                    method,
                    args,
                    kwargs or None,
                    self.codec,
                    now=time.monotonic(),
                    timeout=timeout,
                )
                return impl.exchange(method, rid, timeout, deadline)
            return impl.call(method, args, kwargs or None, self.codec, timeout)

    def publish(
        self,
        topic: str,
        value: Any,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish ``value`` (encoded with the client's codec) to ``topic``. QoS 0 returns once
        sent (over UDP too); QoS 1 once the broker has accepted it."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        check_topic(topic)  # TopicError (a ValueError) here rather than an ERROR later
        payload = self.codec.encode(value)
        t = self.timeout if timeout is None else timeout
        with self._lock:
            impl = self._impl
            if isinstance(impl, _UDP):
                if qos:
                    raise ConnectError("QoS 1 needs a tcp:// or tls:// broker URL")
                impl._send_datagram(encode_pub(topic, payload, 0, self.codec.id, retain))
            elif qos:
                impl.exchange_frame(
                    lambda rid: encode_pub(topic, payload, rid, self.codec.id, retain),
                    "PUB " + topic,
                    t,
                )
            else:
                impl.send_frame(encode_pub(topic, payload, 0, self.codec.id, retain), "PUB", t)

    def subscribe(
        self,
        pattern: str,
        *,
        group: str | None = None,
        qos: int = 0,
        policy: str | None = None,
        max_msgs: int | None = None,
        max_bytes: int | None = None,
        timeout: float | None = None,
    ) -> BlockingSubscription:
        """Subscribe (``*`` one token, ``>`` the rest); returns once the broker has it. Read
        with ``sub.get(timeout)`` or ``for msg in sub``."""
        options = sub_options(group, qos, policy, max_msgs, max_bytes)
        impl = self._impl
        if not isinstance(impl, _TCP):
            raise ConnectError("subscribe needs a tcp:// or tls:// broker URL")
        with self._lock:
            sid = impl.exchange_frame(
                lambda rid: encode_sub(rid, pattern, options),
                "SUB " + pattern,
                self.timeout if timeout is None else timeout,
            )
        return BlockingSubscription(self, sid, pattern)

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of one PING/PONG in seconds."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            start = time.monotonic()
            deadline = start + timeout
            impl = self._impl
            if isinstance(impl, _UDP):
                rid = impl.new_id()
                impl.core.send_ping(rid)
                impl.exchange("PING", rid, timeout, deadline, track=False)
            else:
                impl.call("PING", (), None, self.codec, timeout, ping=True)
            return time.monotonic() - start

    def close(self) -> None:
        with self._lock:
            self._impl.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockingSubscription:
    """Messages of one subscription, read from the blocking client's connection.

    There is no background thread: messages are read from the socket when ``get()`` (or another
    call on the same client) runs. A program that stops calling ``get()`` stops reading, and the
    broker then treats it as a slow consumer (bounded queue, the subscription's policy). Use
    :class:`~sockstack.AsyncClient` to receive while doing other work.
    """

    def __init__(self, client: Client, sid: int, pattern: str) -> None:
        self.client = client
        self.sid = sid
        self.pattern = pattern

    def get(self, timeout: float | None = None) -> Message:
        """The next message (QoS 1: acknowledged as it is returned); CallTimeout if none."""
        client = self.client
        impl = client._impl
        assert isinstance(impl, _TCP)
        with client._lock:
            msg = impl.next_message(self.sid, client.timeout if timeout is None else timeout)
            if msg.delivery_id:
                impl.send_frame(encode_ack(msg.delivery_id), "ACK", client.timeout)
        return Message(
            msg.topic, CODECS[msg.codec].decode(msg.payload), msg.retained, msg.redelivered
        )

    def __iter__(self) -> Iterator[Message]:
        while True:
            yield self.get()

    def unsubscribe(self) -> None:
        client = self.client
        impl = client._impl
        assert isinstance(impl, _TCP)
        with client._lock:
            impl.inbox.pop(self.sid, None)
            impl.send_frame(encode_unsub(self.sid), "UNSUB", client.timeout)


def connect(url: str | Sequence[str], **options: Any) -> Client:
    """A blocking :class:`Client` for ``tcp://host:port`` or ``udp://host:port``; TCP connects
    (and completes the handshake) now and raises :class:`ConnectError` if it cannot."""
    return Client(url, **options)
