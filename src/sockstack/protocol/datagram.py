"""Sans-I/O UDP endpoints: one frame per datagram, retries and de-duplication (PROTOCOL.md §5).

UDP has no session: no HELLO is required, every REQUEST names its codec, and each side keeps only
what makes retries safe.

* :class:`DatagramClient` retransmits a REQUEST with the *same* request id until an answer or the
  call's deadline; ``next_timer()`` / ``handle_timer(now)`` drive it (the adapter owns the clock).
* :class:`DatagramServer` remembers each answer in a :class:`ReplyCache` keyed by
  (peer address, request id): a retransmission of a request still running is dropped, one of a
  request already answered gets the remembered answer again. A retried call thus runs once.
"""

from __future__ import annotations

import heapq
import random
import struct
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from sockstack.errors import CodecError, ErrorCode, LocalProtocolError, RemoteProtocolError
from sockstack.protocol.codecs import MAX_CONTAINER, MSGPACK, Codec, refuse_ext
from sockstack.protocol.events import (
    Cancel,
    Credit,
    Error,
    Event,
    Hello,
    Item,
    Message,
    Metadata,
    Ping,
    Pong,
    ProtocolViolation,
    Request,
    Response,
    Role,
    Welcome,
)
from sockstack.protocol.frames import (
    DEFAULT_MAX_META,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    MessageType,
    pack_header,
    parse_datagram,
    peek_request_id,
    peek_type,
    read_header,
)
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    FLAG_DEADLINE,
    MAX_BUDGET_MS,
    encode_error,
    encode_ping,
    encode_pong,
    encode_request,
    encode_response,
    encode_welcome,
)
from sockstack.protocol.registry import Registry

__all__ = [
    "DEFAULT_MAX_DATAGRAM",
    "DEFAULT_REPLY_CACHE_BYTES",
    "DEFAULT_REPLY_CACHE_ENTRIES",
    "DEFAULT_REPLY_WINDOW",
    "CallExpired",
    "DatagramClient",
    "DatagramServer",
    "ReplyCache",
    "RetryPolicy",
    "datagram_error_code",
]

_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)
_unpack_header = read_header
_pack_header = pack_header
_CORE_REGISTRY = Registry([CORE_MESSAGES], frozen=True)
_METHOD_BYTES: dict[str, bytes] = {}
_unpackb = msgpack.unpackb
_MAXC = MAX_CONTAINER  # elements in one array or map (codecs.py)
_DEADLINE = FLAG_DEADLINE
_budget = struct.Struct(">I")
_pack_budget = _budget.pack
_unpack_budget = _budget.unpack_from

DEFAULT_MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4; see PROTOCOL.md §5 on MTU
DEFAULT_REPLY_WINDOW = 120.0  # as JetStream's 2-minute de-duplication window
DEFAULT_REPLY_CACHE_ENTRIES = 100_000
DEFAULT_REPLY_CACHE_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retransmit after ``initial`` s, then ``factor`` times longer each time up to ``max_interval``
    (with +-``jitter`` spread), until the call's own deadline."""

    initial: float = 0.05
    factor: float = 2.0
    max_interval: float = 1.0
    jitter: float = 0.1

    def interval(self, attempt: int, rng: random.Random) -> float:
        base = min(self.initial * self.factor**attempt, self.max_interval)
        return base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))


@dataclass(frozen=True, slots=True)
class CallExpired:
    """Event: no answer to ``request_id`` by its deadline, after ``attempts`` transmissions."""

    request_id: int
    attempts: int


class _Pending:
    __slots__ = ("attempts", "budget_at", "data", "deadline", "next_send")

    def __init__(self, data: bytes, deadline: float, next_send: float, budget_at: int = 0) -> None:
        self.data = data
        self.deadline = deadline
        self.next_send = next_send
        self.attempts = 1
        self.budget_at = budget_at  # offset of the DEADLINE budget in data (0: none)

    def refresh_budget(self, now: float) -> None:
        """A retransmission carries the time left *now*, not the first datagram's budget."""
        at = self.budget_at
        if at:
            ms = max(0, min(int((self.deadline - now) * 1000), MAX_BUDGET_MS))
            self.data = self.data[:at] + _pack_budget(ms) + self.data[at + 4 :]


def datagram_error_code(code: int) -> int:
    """The request-level code an ERROR carries over UDP for a datagram the receiver refused.
    Codes 1000-1999 belong to CLOSE, which ends a session UDP does not have (PROTOCOL.md §7):
    an oversized datagram is DATAGRAM_TOO_LARGE, any other framing fault DECODE_ERROR."""
    if code < 2000:
        return (
            ErrorCode.DATAGRAM_TOO_LARGE
            if code == ErrorCode.FRAME_TOO_LARGE
            else (ErrorCode.DECODE_ERROR)
        )
    return code


def _parse(
    data: bytes, max_datagram: int, registry: Registry
) -> tuple[Message | None, ProtocolViolation | None, int]:
    """(message or None, violation or None, request id when the header was readable)."""
    try:
        frame = parse_datagram(data, max_datagram, DEFAULT_MAX_META)
    except RemoteProtocolError as exc:
        # A header with our magic is answered (it names a request id); anything else is not,
        # so that garbage from a spoofed address is never reflected.
        peeked = peek_request_id(data)
        rid = -1 if peeked is None else peeked
        return None, ProtocolViolation(exc.code, exc.message, max(rid, 0), fatal=True), rid
    try:
        return registry.decode(frame), None, frame.request_id
    except RemoteProtocolError as exc:
        return None, ProtocolViolation(exc.code, exc.message, frame.request_id), frame.request_id


class DatagramClient:
    """Client side of request/response over datagrams, with bounded retransmission."""

    def __init__(
        self,
        *,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
        retry: RetryPolicy | None = None,
        seed: int | None = None,
        registry: Registry | None = None,
        overhead: int = 0,
    ) -> None:
        """``max_datagram``: the largest datagram sent, whole (header, meta, body and the
        ``overhead`` the adapter adds after encoding, e.g. a seal's trailer)."""
        self.max_datagram = max_datagram
        self.overhead = overhead
        self.registry = registry if registry is not None else _CORE_REGISTRY
        self.retry = retry or RetryPolicy()
        self._rng = random.Random(seed)
        # request_datagram's last method, timeout, meta (name and budget) and budget offset
        self._last_method = ""
        self._last_timeout = -1.0
        self._last_meta = b""
        self._last_at = 0
        self._pending: dict[int, _Pending] = {}
        self._timers: list[tuple[float, int]] = []
        self._out: list[bytes] = []

    def new_request_id(self, last: int) -> int:
        """Ids start at a random point so that a restarted client on a reused port does not
        collide with its predecessor's entries in the server's reply cache."""
        if last == 0:
            return self._rng.randrange(1, 0xFFFFFFFF)
        return last % 0xFFFFFFFF + 1

    def send_request(
        self,
        request_id: int,
        method: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        codec: Codec = MSGPACK,
        *,
        now: float,
        timeout: float,
        deadline: bool = False,
        metadata: Metadata | None = None,
    ) -> None:
        """Queue a REQUEST datagram and track it until an answer or ``now + timeout``.
        ``deadline``: carry the time left (flag DEADLINE; each retransmission carries the time
        left when it is sent); ``metadata``: the METADATA map.
        Raises :class:`LocalProtocolError` (code DATAGRAM_TOO_LARGE) before sending anything
        if it would not fit in one datagram, or (DECODE_ERROR) for bad metadata."""
        budget = None
        if deadline:
            budget = max(0, min(int(timeout * 1000), MAX_BUDGET_MS))
        data = encode_request(
            request_id, method, args, kwargs, codec, budget_ms=budget, metadata=metadata
        )
        if len(data) + self.overhead > self.max_datagram:
            raise LocalProtocolError(
                f"a datagram of {len(data) + self.overhead} bytes exceeds the limit of "
                f"{self.max_datagram} bytes (use TCP for large payloads)",
                ErrorCode.DATAGRAM_TOO_LARGE,
            )
        nxt = now + self.retry.interval(0, self._rng)
        at = HEADER_SIZE + _unpack_header(data)[5] - 4 if deadline else 0  # the budget's place
        self._pending[request_id] = _Pending(data, now + timeout, nxt, at)
        heapq.heappush(self._timers, (min(nxt, now + timeout), request_id))
        self._out.append(data)

    def request_datagram(
        self,
        request_id: int,
        method: str,
        args: Sequence[Any],
        *,
        now: float,
        timeout: float,
        deadline: bool = False,
    ) -> bytes:
        """Like :meth:`send_request` for a msgpack call with positional arguments, returning
        the datagram to send at once instead of queueing it (the fast path of a blocking
        client). Raises like :meth:`send_request`."""
        if deadline and timeout == self._last_timeout and method == self._last_method:
            # A loop of calls with one timeout: the same meta each time (name and budget).
            meta, at, named, flags = self._last_meta, self._last_at, True, _DEADLINE
        else:
            known = _METHOD_BYTES.get(method)
            named = known is not None
            if known is not None:
                meta = known
            else:
                meta = method.encode("utf-8")
                named = 0 not in meta  # a NUL in a name: refused by send_request
                if named and len(_METHOD_BYTES) < 4096:
                    _METHOD_BYTES[method] = meta
            flags = at = 0
            if deadline:
                at = HEADER_SIZE + len(meta)
                meta += _pack_budget(max(0, min(int(timeout * 1000), MAX_BUDGET_MS)))
                flags = _DEADLINE
                if named:
                    self._last_method, self._last_timeout = method, timeout
                    self._last_meta, self._last_at = meta, at
        body = MSGPACK.encode(args if type(args) is list else list(args))
        size = HEADER_SIZE + len(meta) + len(body) + self.overhead  # the whole datagram
        if size > self.max_datagram or len(meta) > DEFAULT_MAX_META or not named:
            self.send_request(
                request_id,
                method,
                args,
                None,
                MSGPACK,
                now=now,
                timeout=timeout,
                deadline=deadline,
            )
            return self._out.pop()  # (raises first, with the exact reason)
        data = _pack_header(_REQUEST, flags, 1, len(meta), request_id, len(body)) + meta + body
        r = self.retry
        nxt = now + min(r.initial, r.max_interval) * (
            1.0 + r.jitter * (2.0 * self._rng.random() - 1.0)
        )
        end = now + timeout
        self._pending[request_id] = _Pending(data, end, nxt, at)
        heapq.heappush(self._timers, (nxt if nxt < end else end, request_id))
        return data

    def send_ping(self, request_id: int, payload: bytes = b"") -> None:
        """Queue a PING (not retransmitted: a lost ping is what ping measures)."""
        self._out.append(encode_ping(request_id, payload))

    def cancel(self, request_id: int) -> None:
        self._pending.pop(request_id, None)

    def resend(self, request_id: int) -> bool:
        """Queue call ``request_id``'s datagram again, now (the adapter seals it anew, e.g. for
        a restarted server's epoch: PROTOCOL.md §6.1); its retransmissions go on as planned.
        False when the call is not pending any more."""
        p = self._pending.get(request_id)
        if p is None:
            return False
        self._out.append(p.data)
        p.attempts += 1
        return True

    def attempts(self, request_id: int) -> int:
        """Datagrams queued so far for call ``request_id`` (0 when it is not pending)."""
        p = self._pending.get(request_id)
        return 0 if p is None else p.attempts

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def receive_datagram(self, data: bytes | memoryview) -> list[Event]:
        """Returns [Response | Error | Pong | Welcome] for an answer to a pending call, or a
        ProtocolViolation for garbage; answers to unknown or finished ids are ignored."""
        if len(data) >= HEADER_SIZE:  # fast path: a well-formed msgpack RESPONSE
            magic, version, t, flags, codec, meta_len, rid, body_len = _unpack_header(data)
            if (
                t == _RESPONSE
                and codec == 1
                and not flags  # trailers (METADATA), unknown flags: the general path
                and magic == MAGIC
                and version == PROTOCOL_VERSION
                and HEADER_SIZE + meta_len + body_len == len(data)
                and meta_len + body_len <= self.max_datagram
            ):
                try:
                    value = _unpackb(
                        data[HEADER_SIZE + meta_len :],
                        raw=False,
                        strict_map_key=False,
                        ext_hook=refuse_ext,
                        timestamp=3,
                        max_array_len=_MAXC,
                        max_map_len=_MAXC,
                    )
                except Exception:
                    pass
                else:
                    if self._pending.pop(rid, None) is None:
                        return []
                    return [Response(rid, value, 1)]
        msg, violation, rid = _parse(bytes(data), self.max_datagram, self.registry)
        if violation is not None:
            if rid > 0 and rid in self._pending and violation.code >= 2000:
                del self._pending[rid]
                return [
                    violation,
                    Error(rid, violation.code, ErrorCode(violation.code).name, violation.message),
                ]
            return [violation]
        if isinstance(msg, Welcome | Pong):
            return [msg]
        if isinstance(msg, Response | Error):
            if self._pending.pop(msg.request_id, None) is None:
                return []  # a duplicate answer, or one that came after the deadline
            return [msg]
        return []  # a client serves nothing, and nothing else answers a call

    def next_timer(self) -> float | None:
        timers = self._timers
        while timers:
            when, rid = timers[0]
            p = self._pending.get(rid)
            if p is not None and when == min(p.next_send, p.deadline):
                return when
            heapq.heappop(timers)  # stale: answered, cancelled, or rescheduled
        return None

    def handle_timer(self, now: float) -> list[CallExpired]:
        """Retransmit what is due; returns a CallExpired for each call past its deadline."""
        expired: list[CallExpired] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, rid = heapq.heappop(timers)
            p = self._pending.get(rid)
            if p is None or when != min(p.next_send, p.deadline):
                continue
            if now >= p.deadline:
                del self._pending[rid]
                expired.append(CallExpired(rid, p.attempts))
                continue
            if p.budget_at:
                p.refresh_budget(now)
            self._out.append(p.data)
            p.next_send = now + self.retry.interval(p.attempts, self._rng)
            p.attempts += 1
            heapq.heappush(timers, (min(p.next_send, p.deadline), rid))
        return expired


class ReplyCache:
    """Answers remembered per (peer, request id) for ``window`` seconds, bounded in entries and
    bytes (oldest evicted first). ``None`` as the stored answer means "still running"."""

    def __init__(
        self,
        window: float = DEFAULT_REPLY_WINDOW,
        max_entries: int = DEFAULT_REPLY_CACHE_ENTRIES,
        max_bytes: int = DEFAULT_REPLY_CACHE_BYTES,
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[float, bytes | None]] = OrderedDict()
        self._bytes = 0
        self.evicted = 0
        self._next_expiry = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: Hashable, now: float) -> tuple[bool, bytes | None]:
        """(seen, answer): seen is False for a new request, answer is None while it runs."""
        if now >= self._next_expiry:
            self._expire(now)
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        return True, entry[1]

    def begin(self, key: Hashable, now: float) -> None:
        self._entries[key] = (now + self.window, None)
        if len(self._entries) > self.max_entries:
            self._trim()

    def complete(self, key: Hashable, answer: bytes, now: float) -> None:
        entries = self._entries
        old = entries.get(key)
        if old is not None:
            if old[1] is not None:
                self._bytes -= len(old[1])
            entries.move_to_end(key)
        entries[key] = (now + self.window, answer)
        self._bytes += len(answer)
        if self._bytes > self.max_bytes or len(entries) > self.max_entries:
            self._trim()

    def _expire(self, now: float) -> None:
        # Entries sit in deadline order (each insert or completion goes to the end with the
        # latest deadline), so expiry pops from the front and stops at the first live one; the
        # next check is due when that one expires.
        entries = self._entries
        self._next_expiry = now + self.window
        while entries:
            _, (deadline, answer) = next(iter(entries.items()))
            if deadline > now:
                self._next_expiry = deadline
                break
            entries.popitem(last=False)
            if answer is not None:
                self._bytes -= len(answer)

    def _trim(self) -> None:
        entries = self._entries
        while entries and (len(entries) > self.max_entries or self._bytes > self.max_bytes):
            _, (_, answer) = entries.popitem(last=False)
            self.evicted += 1
            if answer is not None:
                self._bytes -= len(answer)


class DatagramServer:
    """Server side over datagrams: parses, answers control messages, de-duplicates requests."""

    def __init__(
        self,
        *,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
        reply_cache: ReplyCache | None = None,
        agent: str = "sockstack-py/1",
        registry: Registry | None = None,
        overhead: int = 0,
    ) -> None:
        """``max_datagram``: the largest datagram sent, whole (header, meta, body and the
        ``overhead`` the adapter adds after encoding, e.g. a seal's trailer); a larger answer is
        replaced by ERROR DATAGRAM_TOO_LARGE, never left for the OS to refuse in silence."""
        self.max_datagram = max_datagram
        self.overhead = overhead
        self.registry = registry if registry is not None else _CORE_REGISTRY
        self.cache = reply_cache or ReplyCache()
        self.agent = agent
        self._out: list[tuple[bytes, Any]] = []
        self.duplicates = 0

    def datagrams_to_send(self) -> list[tuple[bytes, Any]]:
        out, self._out = self._out, []
        return out

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> list[Event]:
        """Returns [Request] for a new request to run, [ProtocolViolation] for bad input (and
        queues an ERROR where the header was readable), or [] when this side answered itself
        (a PING, a copy of a request already answered, a streamed call or an upload: ERROR
        STREAM_MISMATCH, they need TCP or TLS)."""
        if len(data) >= HEADER_SIZE:  # fast path: a well-formed msgpack REQUEST
            magic, version, t, flags, codec, meta_len, rid, body_len = _unpack_header(data)
            if (
                t == _REQUEST
                and codec == 1
                and (not flags or (flags == _DEADLINE and meta_len >= 4))
                and rid  # request id 0: the general path refuses it
                and magic == MAGIC
                and version == PROTOCOL_VERSION
                and HEADER_SIZE + meta_len + body_len == len(data)
                and meta_len <= DEFAULT_MAX_META
                and meta_len + body_len <= self.max_datagram
            ):
                try:
                    value = _unpackb(
                        data[HEADER_SIZE + meta_len :],
                        raw=False,
                        strict_map_key=False,
                        ext_hook=refuse_ext,
                        timestamp=3,
                        max_array_len=_MAXC,
                        max_map_len=_MAXC,
                    )
                    # (bytes.decode: strict UTF-8, faster than str(..., "utf-8"))
                    if flags:  # DEADLINE alone: the budget is the meta's last 4 bytes
                        end = HEADER_SIZE + meta_len - 4
                        method = data[HEADER_SIZE:end].decode()
                        budget: int | None = _unpack_budget(data, end)[0]
                    else:
                        method = data[HEADER_SIZE : HEADER_SIZE + meta_len].decode()
                        budget = None
                except Exception:
                    pass
                else:
                    if type(value) is list:  # (every field by position: no keyword cost)
                        req = Request(rid, method, value, {}, 1, budget, None, False, False, 0)
                        return self._request(req, addr, now)
        msg, violation, rid = _parse(data, self.max_datagram, self.registry)
        if violation is not None:
            if rid >= 0:  # the header was ours: say what was wrong with it
                code = datagram_error_code(violation.code)
                reply = encode_error(rid, code, ErrorCode(code).name, violation.message)
                if len(reply) > len(data):
                    # Never answer with more bytes than came in (a spoofed source would make
                    # this server an amplifier): the code alone (18 bytes), if even that fits.
                    reply = encode_error(rid, code)
                if len(reply) <= len(data):
                    self._out.append((reply, addr))
            return [violation]
        assert msg is not None  # no violation: the datagram decoded
        if isinstance(msg, Request):
            if msg.stream or msg.upload or msg.batch:  # refused before anything runs
                if self._request(msg, addr, now):  # (a copy is answered from the cache)
                    self.send_error(
                        addr,
                        msg.request_id,
                        ErrorCode.STREAM_MISMATCH,
                        "STREAM_MISMATCH",
                        "streams need TCP or TLS"
                        if msg.stream
                        else "uploads need TCP or TLS"
                        if msg.upload
                        else "batches need TCP or TLS",
                        now,
                    )
                return []
            return self._request(msg, addr, now)
        if isinstance(msg, Ping):
            self._out.append((encode_pong(msg.request_id, msg.payload), addr))
            return []
        if isinstance(msg, Cancel | Credit | Item):  # streams and uploads only: dropped, unanswered
            return []
        if isinstance(msg, Hello):
            # Answered only with no more bytes than it carried (a spoofed HELLO must not make
            # this server an amplifier): without the agent text if need be, else not at all. A
            # client that wants the WELCOME pads its HELLO's agent.
            for agent in (self.agent, ""):
                welcome = encode_welcome(Welcome(1, (1, 2, 0), self.max_datagram, agent))
                if len(welcome) <= len(data):
                    self._out.append((welcome, addr))
                    break
            return []
        t_ = peek_type(data)
        spec = self.registry.specs.get(t_) if t_ is not None else None
        if spec is not None and Role.CLIENT not in spec.sent_by:
            v = ProtocolViolation(
                ErrorCode.PROTOCOL_ERROR, f"{spec.name} is not sent to a server", rid
            )
            return [v]
        return [msg]  # a pattern's message (e.g. PUB over UDP): the host routes it

    def _request(self, msg: Request, addr: Any, now: float) -> list[Event]:
        key = (addr, msg.request_id)
        seen, answer = self.cache.lookup(key, now)
        if seen:
            self.duplicates += 1
            if answer is not None:
                self._out.append((answer, addr))
            return []
        self.cache.begin(key, now)
        return [msg]

    def _answer(self, addr: Any, request_id: int, data: bytes, now: float) -> None:
        self.cache.complete((addr, request_id), data, now)
        self._out.append((data, addr))

    def send_response(
        self,
        addr: Any,
        request_id: int,
        result: Any,
        codec: Codec,
        now: float,
        *,
        metadata: Metadata | None = None,
    ) -> None:
        """Queue and remember the answer (``metadata``: its trailers). A result that does not
        encode, or does not fit one datagram, is answered with an ERROR instead
        (RESULT_NOT_ENCODABLE, DATAGRAM_TOO_LARGE)."""
        try:
            if metadata is not None:
                data = encode_response(request_id, result, codec, metadata=metadata)
            else:
                body = codec.encode(result)
                data = _pack_header(_RESPONSE, 0, codec.id, 0, request_id, len(body)) + body
        except LocalProtocolError as exc:  # bad trailers: the server's own mistake
            data = encode_error(request_id, ErrorCode.APPLICATION_ERROR, "ValueError", str(exc))
        except CodecError as exc:
            data = encode_error(
                request_id, ErrorCode.RESULT_NOT_ENCODABLE, "RESULT_NOT_ENCODABLE", str(exc)
            )
        if len(data) + self.overhead > self.max_datagram:
            data = encode_error(
                request_id,
                ErrorCode.DATAGRAM_TOO_LARGE,
                "DATAGRAM_TOO_LARGE",
                f"a result datagram of {len(data) + self.overhead} bytes exceeds the limit of "
                f"{self.max_datagram} bytes (use TCP for large payloads)",
            )
        self._answer(addr, request_id, data, now)

    def send_error(
        self,
        addr: Any,
        request_id: int,
        code: int,
        type: str,
        message: str,
        now: float,
        *,
        metadata: Metadata | None = None,
    ) -> None:
        data = b""
        if metadata is not None:
            try:
                data = encode_error(request_id, code, type, message, metadata=metadata)
            except LocalProtocolError:
                data = b""
            if len(data) + self.overhead > self.max_datagram:
                data = b""
        if not data:  # no trailers, or trailers that break the rules or do not fit: left out
            data = encode_error(request_id, code, type, message)
        self._answer(addr, request_id, data, now)
