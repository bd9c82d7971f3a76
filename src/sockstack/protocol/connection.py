"""Session layer: one stream connection as a sans-I/O state machine (docs/PROTOCOL.md §4).

Bytes in, events out; calls in, bytes out. No sockets, no asyncio, no clock: time is passed in
(``handle_timer(now)``) and the connection says when it next needs it (``next_timer()``)::

    conn = Connection(Role.SERVER, now=0.0)
    events = conn.receive_data(b"SK...")       # -> [Hello(...), Request(...), ...]
    conn.send_response(7, 42)
    transport.write(conn.data_to_send())
    if conn.close_expected(): transport.close()

States and the messages each accepts (anything else closes the session with PROTOCOL_ERROR)::

    server  AWAIT_HELLO --HELLO--> OPEN --CLOSE sent--> CLOSING --CLOSE received--> CLOSED
    client  HELLO_SENT --WELCOME-> OPEN        (a client may send REQUESTs before WELCOME)
    OPEN accepts: every type the peer's role may send (the session's registry), PING is
    answered with PONG here, CLOSE is answered with CLOSE and ends the session.

Errors the peer caused are answered here — an ERROR frame when framing survived (bad body,
unknown type), a CLOSE frame when it did not (bad magic, oversized frame) — and reported as a
:class:`ProtocolViolation` event so the adapter logs them exactly once.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from sockstack.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from sockstack.protocol.codecs import (
    BIG_BYTES,
    MAX_CONTAINER,
    MSGPACK,
    Codec,
    msgpack_bin_header,
    msgpack_parts,
    refuse_ext,
)
from sockstack.protocol.events import (
    BadItem,
    Close,
    ConnectionTerminated,
    Error,
    Event,
    HandshakeComplete,
    Hello,
    Message,
    Metadata,
    Ping,
    ProtocolViolation,
    Request,
    Response,
    Role,
    Welcome,
)
from sockstack.protocol.frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_META,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    FrameDecoder,
    MessageType,
    pack_header,
    read_header,
)
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    FEATURE_CANCEL,
    FEATURE_STREAM,
    FEATURE_UPLOAD,
    FEATURES,
    FLAG_BATCH,
    FLAG_DEADLINE,
    FLAG_KWARGS,
    FLAG_METADATA,
    FLAG_STREAM,
    FLAG_UPLOAD,
    MAX_BUDGET_MS,
    MAX_HELLO_SIZE,
    MIN_MAX_FRAME,
    encode_cancel,
    encode_close,
    encode_credit,
    encode_error,
    encode_hello,
    encode_item,
    encode_ping,
    encode_pong,
    encode_request,
    encode_response,
    encode_welcome,
    features_extension,
    features_of,
    hello_too_large,
)
from sockstack.protocol.registry import Registry

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "Connection",
    "ConnectionTerminated",
    "HandshakeComplete",
    "ProtocolViolation",
    "State",
]

DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # websockets' open_timeout
DEFAULT_KEEPALIVE_INTERVAL = 20.0  # websockets' ping_interval: PING after 20 s of silence
DEFAULT_KEEPALIVE_TIMEOUT = 20.0  # websockets' ping_timeout: dead 20 s after an unanswered PING
SUPPORTED_VERSIONS = (PROTOCOL_VERSION, PROTOCOL_VERSION)


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    HELLO_SENT = "hello_sent"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_HANDSHAKE_STATES = (State.AWAIT_HELLO, State.HELLO_SENT)
_OPEN: State = State.OPEN
_CLOSED: State = State.CLOSED  # compared by identity in loops whose body may close the session
_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)
_unpackb = msgpack.unpackb
_MAXC = MAX_CONTAINER  # elements in one array or map (codecs.py)
_METHOD_BYTES: dict[str, bytes] = {}
_pack_header = pack_header
_unpack_header = read_header
_CORE_REGISTRY = Registry([CORE_MESSAGES], frozen=True)
_DEADLINE = FLAG_DEADLINE
# A REQUEST's flags the fast path leaves to the general one (which reads them all)
_CALL_FLAGS = FLAG_KWARGS | FLAG_DEADLINE | FLAG_METADATA | FLAG_STREAM | FLAG_UPLOAD | FLAG_BATCH
_ITEM_T = int(MessageType.ITEM)
_budget = struct.Struct(">I")
_pack_budget = _budget.pack
_unpack_budget = _budget.unpack_from


def _cut(text: str, size: int) -> str:
    """``text`` cut to at most ``size`` bytes of UTF-8 (never inside a character)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= size:
        return text
    return data[: max(size, 0)].decode("utf-8", "ignore")


# The session's transitions, as data. Each entry: (state, message type) -> what happens. In OPEN
# and CLOSING every other type the peer's role may send is delivered to the adapter as an event;
# in the handshake states anything not listed closes the session with PROTOCOL_ERROR.
_DELIVER, _HELLO, _WELCOME, _PING, _PONG, _CLOSE, _REFUSE = range(7)
_HELLO_T, _WELCOME_T = int(MessageType.HELLO), int(MessageType.WELCOME)
_PING_T, _PONG_T, _CLOSE_T = int(MessageType.PING), int(MessageType.PONG), int(MessageType.CLOSE)
TRANSITIONS: dict[State, dict[int, int]] = {
    State.AWAIT_HELLO: {_HELLO_T: _HELLO, _CLOSE_T: _CLOSE},  # -> OPEN (WELCOME sent) / CLOSED
    State.HELLO_SENT: {_WELCOME_T: _WELCOME, _CLOSE_T: _CLOSE},  # -> OPEN / CLOSED
    State.OPEN: {  # PING answered here; CLOSE answered and -> CLOSED
        _PING_T: _PING,
        _PONG_T: _PONG,
        _CLOSE_T: _CLOSE,
        _HELLO_T: _REFUSE,
        _WELCOME_T: _REFUSE,
    },
    State.CLOSING: {  # our CLOSE is out: the peer's CLOSE -> CLOSED; PINGs go unanswered
        _PING_T: _PING,
        _PONG_T: _PONG,
        _CLOSE_T: _CLOSE,
        _HELLO_T: _REFUSE,
        _WELCOME_T: _REFUSE,
    },
    State.CLOSED: {},
}
_DEFAULT_ACTION = {
    State.AWAIT_HELLO: _REFUSE,
    State.HELLO_SENT: _REFUSE,
    State.OPEN: _DELIVER,
    State.CLOSING: _DELIVER,
    State.CLOSED: _REFUSE,
}
_OPEN_ACTIONS = TRANSITIONS[State.OPEN]  # (OPEN's default is _DELIVER)


class Connection:
    """A sockstack session over a byte stream, for either role."""

    def __init__(
        self,
        role: Role,
        *,
        now: float = 0.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_meta: int = DEFAULT_MAX_META,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        agent: str = "sockstack-py/1",
        hello_extensions: Sequence[tuple[int, bytes]] = (),
        authenticate: Callable[[Hello], bool] | None = None,
        registry: Registry | None = None,
        features: int = FEATURES,
    ) -> None:
        """``features``: server: the optional features its WELCOME announces (extension 2,
        PROTOCOL.md §5.1; 0 announces none, as a server older than them)."""
        if max_frame < MIN_MAX_FRAME:
            raise ValueError(
                f"max_frame {max_frame} is below the protocol's minimum of {MIN_MAX_FRAME} bytes"
            )
        self.role = role
        # The message types this session decodes: the core's, plus those of the patterns the
        # host (or client) registered. Shared, so a pattern added later is seen here too.
        self.registry = registry if registry is not None else _CORE_REGISTRY
        # Server: decides on the client's HELLO (e.g. a token extension) before anything else
        # is answered; False ends the session with CLOSE AUTH_FAILED and nothing is served.
        self._authenticate = authenticate
        self.max_frame = max_frame
        self.agent = agent
        self._peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._fast_ext = self.registry.fast_from(self._peer_role)  # e.g. PUB (server), MSG
        self._fast_type = _RESPONSE if role is Role.CLIENT else _REQUEST
        self._fast_limit = HEADER_SIZE + max_frame  # receive_single: whole frames up to this
        self._decoder = FrameDecoder(max_frame, max_meta)
        self._out: list[bytes] = []
        # request_frame's last method, budget and meta (the method's name, then the budget)
        self._last_method = ""
        self._last_budget = -1
        self._last_meta = b""
        self._handshake_deadline = now + handshake_timeout if handshake_timeout else None
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._next_tick: float | None = None
        self._activity = False
        self._ping_outstanding = False
        self._ping_id = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.version = PROTOCOL_VERSION
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.features = features
        self.peer_features = 0
        """Client: the features the server's WELCOME announced (0 until it arrived, and from a
        server that announces none): send DEADLINE, METADATA and CANCEL only when set here."""
        # Server: the first frame's header is checked as soon as it has arrived (before its body
        # is buffered): a HELLO is small (MAX_HELLO_SIZE), and nothing else may come first.
        self._first_header = role is Role.SERVER
        if role is Role.CLIENT:
            self.state = State.HELLO_SENT
            hello = Hello(*SUPPORTED_VERSIONS, max_frame, agent, tuple(hello_extensions))
            self._out.append(encode_hello(hello))
        else:
            self.state = State.AWAIT_HELLO

    # ------------------------------------------------------------------ output side

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call, as one buffer (one write)."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def buffers_to_send(self) -> list[bytes]:
        """Like :meth:`data_to_send`, as the list of queued pieces (header, meta, body...), for a
        gathering write (``sendmsg``, ``writelines``) that spares copying large bodies."""
        out, self._out = self._out, []
        return out

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return self._decoder.buffered

    def close_expected(self) -> bool:
        """True once the session is over: flush ``data_to_send()`` and close the transport."""
        return self.state is State.CLOSED

    def _check_can_send(self) -> bool:
        if self.state is State.OPEN or (
            self.state is State.HELLO_SENT and self.role is Role.CLIENT
        ):
            return True
        if self.state in (State.CLOSING, State.CLOSED):
            return False
        raise LocalProtocolError(f"cannot send in state {self.state.value}")

    def send_request(
        self,
        request_id: int,
        method: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        codec: Codec = MSGPACK,
        *,
        budget_ms: int | None = None,
        metadata: Metadata | None = None,
        stream: bool = False,
        upload: bool = False,
        batch: bool = False,
    ) -> None:
        """Queue a REQUEST; ``budget_ms`` sets DEADLINE, ``metadata`` METADATA, ``stream``
        STREAM, ``upload`` UPLOAD, ``batch`` BATCH (``args``: the calls' argument arrays)
        (send them only to a server whose WELCOME announced them: :attr:`peer_features`)."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client sends REQUEST")
        if self.state is not State.OPEN and not self._check_can_send():
            raise LocalProtocolError(f"cannot send a request: session is {self.state.value}")
        meta = _METHOD_BYTES.get(method)
        if (
            kwargs
            or not codec.structured
            or meta is None
            or metadata is not None
            or stream
            or upload
            or batch
        ):
            self._out.append(
                self._fit(
                    encode_request(
                        request_id,
                        method,
                        args,
                        kwargs,
                        codec,
                        budget_ms=budget_ms,
                        metadata=metadata,
                        stream=stream,
                        upload=upload,
                        batch=batch,
                    )
                )
            )
            if meta is None and len(_METHOD_BYTES) < 4096 and 0 not in method.encode():
                _METHOD_BYTES[method] = method.encode("utf-8")  # names repeat: encode once
            return
        flags = 0
        if budget_ms is not None:  # the deadline, on by default in the clients: kept cheap
            if not 0 <= budget_ms <= MAX_BUDGET_MS:
                budget_ms = min(max(budget_ms, 0), MAX_BUDGET_MS)
            meta += _pack_budget(budget_ms)
            flags = _DEADLINE
        items = args if type(args) is list else list(args)
        parts = msgpack_parts(items, True) if codec is MSGPACK else None
        if parts is not None:
            size = sum(map(len, parts))
            if len(meta) + size > self.peer_max_frame:
                self._fit(encode_request(request_id, method, args, kwargs, codec))  # raises
            self._out.append(_pack_header(_REQUEST, flags, codec.id, len(meta), request_id, size))
            self._out.append(meta)
            self._out += parts
            return
        body = codec.encode(items)
        if len(meta) + len(body) > self.peer_max_frame:
            self._fit(encode_request(request_id, method, args, kwargs, codec))  # raises
        self._out += (
            _pack_header(_REQUEST, flags, codec.id, len(meta), request_id, len(body)),
            meta,
            body,
        )

    def request_frame(
        self, request_id: int, method: str, args: Sequence[Any], budget_ms: int | None = None
    ) -> list[bytes] | None:
        """Fast path for a client adapter: a msgpack REQUEST with positional arguments, encoded
        and returned as the pieces of one frame to write at once (nothing is queued). None when
        the general :meth:`send_request` is needed: session not open, output already queued, a
        method name not seen before, or a frame over the peer's limit.
        ``budget_ms``: the DEADLINE flag's budget (send it only to a server that announced it).
        Raises :class:`CodecError` if the arguments cannot be encoded."""
        if self.state is not _OPEN or self._out:
            return None
        if budget_ms is None:
            meta = _METHOD_BYTES.get(method)
            if meta is None:
                return None
            flags = 0
        elif budget_ms == self._last_budget and method == self._last_method:
            meta = self._last_meta  # a loop of calls with one timeout: the same meta each time
            flags = _DEADLINE
        else:
            meta = _METHOD_BYTES.get(method)
            if meta is None:
                return None
            if not 0 <= budget_ms <= MAX_BUDGET_MS:
                budget_ms = min(max(budget_ms, 0), MAX_BUDGET_MS)
            meta += _pack_budget(budget_ms)
            self._last_method, self._last_budget, self._last_meta = method, budget_ms, meta
            flags = _DEADLINE
        items = args if type(args) is list else list(args)
        for item in items:
            if type(item) is bytes and len(item) > BIG_BYTES:
                parts = msgpack_parts(items, True)  # large bytes inside: send them uncopied
                assert parts is not None
                size = sum(map(len, parts))
                if len(meta) + size > self.peer_max_frame:
                    return None
                head = _pack_header(_REQUEST, flags, 1, len(meta), request_id, size)
                return [head, meta, *parts]
        body = MSGPACK.encode(items)
        if len(meta) + len(body) > self.peer_max_frame:
            return None
        return [_pack_header(_REQUEST, flags, 1, len(meta), request_id, len(body)) + meta + body]

    def response_frame(self, request_id: int, result: Any) -> bytes | None:
        """Fast path for a server adapter: a msgpack RESPONSE returned as one frame to write at
        once (nothing is queued). None when the general :meth:`send_response` is needed: session
        not open, output already queued, large bytes, or a frame over the peer's limit.
        Raises :class:`CodecError` if the result cannot be encoded."""
        if self.state is not _OPEN or self._out:
            return None
        if type(result) is bytes and len(result) > BIG_BYTES:
            return None
        body = MSGPACK.encode(result)
        if len(body) > self.peer_max_frame:  # the general path refuses it with the sizes
            return None
        return _pack_header(_RESPONSE, 0, 1, 0, request_id, len(body)) + body

    def send_response(
        self,
        request_id: int,
        result: Any,
        codec: Codec = MSGPACK,
        *,
        metadata: Metadata | None = None,
    ) -> bool:
        """Queue a RESPONSE (``metadata``: its trailers); False (nothing queued) if the session
        already ended. Raises :class:`CodecError` if the result cannot be encoded, and
        :class:`LocalProtocolError` for bad trailers or a frame over the peer's limit (nothing
        queued)."""
        if self.state is not State.OPEN and not self._check_can_send():
            return False
        if metadata is not None:
            self._out.append(
                self._fit(encode_response(request_id, result, codec, metadata=metadata))
            )
            return True
        if type(result) is bytes and len(result) > BIG_BYTES and codec is MSGPACK:
            head = msgpack_bin_header(len(result))  # the result's bytes go out uncopied
            size = len(head) + len(result)
            if size > self.peer_max_frame:
                self._fit(encode_response(request_id, result, codec))  # raises with the sizes
            self._out += (
                _pack_header(_RESPONSE, 0, codec.id, 0, request_id, size),
                head,
                result,
            )
            return True
        body = codec.encode(result)
        if len(body) > self.peer_max_frame:
            self._fit(encode_response(request_id, result, codec))  # raises with the sizes
        # Header and body are queued apart: data_to_send joins them once, with the batch.
        self._out += (
            _pack_header(_RESPONSE, 0, codec.id, 0, request_id, len(body)),
            body,
        )
        return True

    def _fit(self, data: bytes) -> bytes:
        """Refuse locally what the peer would reject: its limit, from HELLO/WELCOME."""
        size = len(data) - HEADER_SIZE
        if size > self.peer_max_frame:
            raise LocalProtocolError(
                f"frame of {size} bytes exceeds the peer's limit of {self.peer_max_frame} bytes",
                ErrorCode.FRAME_TOO_LARGE,
            )
        return data

    def send_error(
        self,
        request_id: int,
        code: int,
        type: str = "",
        message: str = "",
        *,
        metadata: Metadata | None = None,
    ) -> bool:
        """Queue an ERROR (``metadata``: its trailers); its texts are cut if the whole would
        exceed the peer's limit (and trailers that would not fit, or break the rules, are left
        out: the error itself always goes)."""
        if not self._check_can_send():
            return False
        self._out.append(self._error_frame(request_id, code, type, message, metadata))
        return True

    def send_cancel(self, request_id: int) -> bool:
        """Client: queue a CANCEL of call ``request_id`` when the server announced CANCEL
        (:attr:`peer_features`) and the session is open; else False, nothing queued."""
        if self.state is not _OPEN or not self.peer_features & FEATURE_CANCEL:
            return False
        self._out.append(encode_cancel(request_id))
        return True

    def item_frame(self, request_id: int, value: Any, codec: Codec = MSGPACK) -> bytes:
        """An ITEM of stream ``request_id`` (server) or of upload ``request_id`` (client, §4.4),
        encoded and checked against the peer's frame limit, not queued (a worker thread may
        build it; queue it with :meth:`send_message`). Its body's size, what flow control counts, is
        ``len(frame) - 16``. Raises :class:`CodecError`, or :class:`LocalProtocolError`
        (FRAME_TOO_LARGE) for an item over the peer's limit."""
        return self._fit(encode_item(request_id, value, codec))

    @property
    def can_stream(self) -> bool:
        """Client: the server announced STREAM (send a STREAM request only then)."""
        return bool(self.peer_features & FEATURE_STREAM)

    @property
    def can_upload(self) -> bool:
        """Client: the server announced UPLOAD (send an UPLOAD request only then)."""
        return bool(self.peer_features & FEATURE_UPLOAD)

    def send_credit(self, request_id: int, granted: int) -> bool:
        """Queue a CREDIT granting ``granted`` bytes: a client to stream ``request_id``, a
        server to upload ``request_id``; False, nothing queued, when the session is not open."""
        if self.state is not _OPEN:
            return False
        self._out.append(encode_credit(request_id, granted))
        return True

    def _error_frame(
        self,
        request_id: int,
        code: int,
        type: str,
        message: str,
        metadata: Metadata | None = None,
    ) -> bytes:
        if metadata is not None:
            try:
                data = encode_error(request_id, code, type, message, metadata=metadata)
            except LocalProtocolError:
                data = b""
            if data and len(data) - HEADER_SIZE <= self.peer_max_frame:
                return data
        data = encode_error(request_id, code, type, message)
        if len(data) - HEADER_SIZE <= self.peer_max_frame:
            return data
        type_ = _cut(type, 128)  # peer_max_frame >= MIN_MAX_FRAME: the code always fits
        room = self.peer_max_frame - 2 - len(type_.encode("utf-8", "replace"))
        return encode_error(request_id, code, type_, _cut(message, room))

    def _close_frame(self, code: int, reason: str) -> bytes:
        data = encode_close(code, reason)
        if len(data) - HEADER_SIZE <= self.peer_max_frame:
            return data
        return encode_close(code, _cut(reason, self.peer_max_frame - 2))

    def send_message(self, frame: bytes) -> None:
        """Queue an already-encoded frame of an extension type (e.g. SUB, PUB, ACK from
        :mod:`sockstack.pubsub.messages`). Raises :class:`LocalProtocolError` when the session
        cannot send, or when the frame is over the peer's limit."""
        if self.state is not State.OPEN and not self._check_can_send():
            raise LocalProtocolError(f"cannot send: session is {self.state.value}")
        self._out.append(self._fit(frame))

    def send_ping(self, request_id: int, payload: bytes = b"") -> None:
        if not self._check_can_send():
            raise LocalProtocolError(f"cannot ping: session is {self.state.value}")
        self._out.append(encode_ping(request_id, payload))

    def send_close(self, code: int = ErrorCode.NORMAL, reason: str = "") -> None:
        """Start an orderly close; the session ends when the peer's CLOSE arrives (or EOF)."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        self._out.append(self._close_frame(code, reason))
        self.close_code, self.close_reason = code, reason
        self.state = State.CLOSING

    def _fail(self, code: int, message: str, events: list[Event]) -> None:
        """Close at once because the peer broke the protocol (no CLOSE reply is awaited)."""
        events.append(ProtocolViolation(code, message, 0, fatal=True))
        if self.state is not State.CLOSED:
            self._out.append(self._close_frame(code, message))
            self.close_code, self.close_reason = code, message
            self.state = State.CLOSED
            events.append(ConnectionTerminated(code, message, by_peer=False))

    # ------------------------------------------------------------------ input side

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the stream; returns the events they complete, in order."""
        if self.state is not _OPEN:
            return self._receive(data)
        if self._decoder.buffered:
            # A frame began in the previous read (the usual case under load: reads end
            # mid-frame). Unless it is a large frame being gathered, take its bytes back and
            # parse it with the rest on the fast path.
            tail = self._decoder.take_partial()
            if tail is None:
                return self._receive(data)
            data = tail + data
        # Fast path for a batch of whole frames parsed straight from ``data``, without Frame
        # objects: msgpack REQUESTs (server) or RESPONSEs (client), and the types a pattern gave
        # a fast decoder (PUB, MSG). The first frame that is anything else, incomplete, or that
        # a fast decoder declines, and all that follows, go through the general path, which
        # checks everything again and reports the exact error.
        events: list[Event] = []
        n = len(data)
        pos = 0
        fast, limit, max_meta = self._fast_type, self._fast_limit, self._decoder.max_meta
        is_response = fast == _RESPONSE
        ext = self._fast_ext
        unpack = _unpack_header
        hsize, version_1 = HEADER_SIZE, PROTOCOL_VERSION  # locals: as cheap as literals
        while n - pos >= hsize:
            magic, version, t, flags, codec, meta_len, rid, body_len = unpack(data, pos)
            mid = pos + hsize + meta_len
            end = mid + body_len
            if (
                end > n
                or magic != MAGIC
                or version != version_1
                or meta_len > max_meta
                or end - pos > limit  # meta + body against max_frame, as the decoder does
            ):
                break
            if t != fast:
                decode = ext.get(t)
                if decode is None:
                    break
                ev = decode(data, pos + hsize, mid, end, flags, codec, rid)
                if ev is None:
                    break
                events.append(ev)
                pos = end
                continue
            if codec != 1 or not rid:  # request id 0: the general path refuses it
                break
            if flags and (flags != _DEADLINE or is_response or meta_len < 4):
                break  # KWARGS, METADATA, unknown flags, trailers: the general path
            try:
                value = _unpackb(
                    data[mid:end],
                    raw=False,
                    strict_map_key=False,
                    ext_hook=refuse_ext,
                    timestamp=3,
                    max_array_len=_MAXC,
                    max_map_len=_MAXC,
                )
                if is_response:
                    events.append(Response(rid, value, 1))
                else:
                    if type(value) is not list:
                        break
                    if flags:  # DEADLINE alone: the budget is the meta's last 4 bytes
                        method = str(data[pos + hsize : mid - 4], "utf-8")
                        budget = _unpack_budget(data, mid - 4)[0]
                        events.append(
                            Request(
                                rid,
                                method,
                                value,
                                {},
                                1,
                                budget,
                                None,
                                False,
                                False,
                                end - pos - hsize,
                            )
                        )
                    else:
                        method = str(data[pos + hsize : mid], "utf-8")
                        events.append(
                            Request(
                                rid,
                                method,
                                value,
                                {},
                                1,
                                None,
                                None,
                                False,
                                False,
                                end - pos - hsize,
                            )
                        )
            except Exception:
                break
            pos = end
        if pos:
            self._activity = True
            if pos == n:
                return events
            return events + self._receive(data[pos:])
        return self._receive(data)

    def _receive(self, data: bytes) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self._activity = True
        events: list[Event] = []
        if self._first_header:
            data = self._check_first_header(data, events)
            if self.state is _CLOSED:
                return events
        try:
            frames = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            frames = []
            error: RemoteProtocolError | None = exc
        else:
            error = self._decoder.error  # framing broke after the frames returned
        specs = self.registry.specs
        peer = self._peer_role
        fast = self._fast_type
        for frame in frames:
            if self.state is _CLOSED:
                break
            t = frame.type
            # Fast path for the bulk of the traffic: a msgpack REQUEST (server) or RESPONSE
            # (client) on an open session. Anything unusual falls through to the general path,
            # which decodes again and reports the exact error.
            if (
                t == fast
                and frame.codec == 1
                and frame.request_id
                and not frame.flags & _CALL_FLAGS  # (decoded once, by the general path)
                and self.state is State.OPEN
            ):
                try:
                    value = _unpackb(
                        frame.body,
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
                    if t == _RESPONSE:
                        if not frame.flags & FLAG_METADATA:
                            events.append(Response(frame.request_id, value, 1))
                            continue
                    elif type(value) is list and not frame.flags & _CALL_FLAGS:
                        try:
                            method = frame.meta.decode()
                        except UnicodeDecodeError:
                            pass
                        else:
                            size = len(frame.meta) + len(frame.body)
                            events.append(
                                Request(frame.request_id, method, value, {}, 1, size=size)
                            )
                            continue
            spec = specs.get(t)
            if spec is None:
                msg = f"unknown message type 0x{t:02x}"
                events.append(ProtocolViolation(ErrorCode.UNKNOWN_TYPE, msg, frame.request_id))
                self._out.append(
                    self._error_frame(frame.request_id, ErrorCode.UNKNOWN_TYPE, "UNKNOWN_TYPE", msg)
                )
                continue
            if peer not in spec.sent_by:
                self._fail(
                    ErrorCode.PROTOCOL_ERROR,
                    f"{spec.name} may not be sent by a {peer.value}",
                    events,
                )
                break
            try:
                msg_obj = spec.decode(frame)
            except RemoteProtocolError as exc:
                if exc.code >= 2000:  # request-level: answer ERROR, keep the session
                    events.append(ProtocolViolation(exc.code, exc.message, frame.request_id))
                    if self.role is Role.CLIENT:
                        events.append(
                            Error(frame.request_id, exc.code, ErrorCode(exc.code).name, exc.message)
                        )
                    elif t == _ITEM_T:
                        # A client's undecodable ITEM (an upload's, §4.4) is not answered here:
                        # the host ends that call if it is in flight (it alone knows). Its own
                        # event: a client's ERROR frame must not pass for it.
                        events.append(BadItem(frame.request_id, exc.code, exc.message))
                    elif self.state is State.OPEN:
                        self._out.append(
                            self._error_frame(
                                frame.request_id, exc.code, ErrorCode(exc.code).name, exc.message
                            )
                        )
                    continue
                self._fail(exc.code, exc.message, events)
                break
            if not self._transition(t, spec.name, msg_obj, events):
                break
        if error is not None and not self._is_closed():
            self._fail(error.code, error.message, events)
        return events

    def _check_first_header(self, data: bytes, events: list[Event]) -> bytes:
        """Server, awaiting HELLO: check the first frame's header as soon as it is whole, before
        any of its body is buffered. A HELLO (or CLOSE) above MAX_HELLO_SIZE, and any other type
        (PROTOCOL.md §5.1: HELLO or CLOSE first), end the session from the header alone. Returns
        the bytes to decode: ``data`` behind the few header bytes held from earlier reads."""
        tail = self._decoder.take_partial()  # < 16 bytes: the header was incomplete until now
        if tail:
            data = tail + data
        if len(data) < HEADER_SIZE:
            return data
        self._first_header = False
        magic, version, t, _, _, meta_len, _, body_len = _unpack_header(data)
        if magic != MAGIC or version != PROTOCOL_VERSION:
            return data  # the decoder refuses it, saying why
        size = meta_len + body_len
        if t == _HELLO_T:
            if size > MAX_HELLO_SIZE:
                exc = hello_too_large(size)
                self._fail(exc.code, exc.message, events)
            return data
        if t == _CLOSE_T:
            if size > MAX_HELLO_SIZE:
                self._fail(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"CLOSE of {size} bytes before HELLO exceeds the limit of {MAX_HELLO_SIZE} "
                    "bytes",
                    events,
                )
            return data
        spec = self.registry.specs.get(t)
        name = spec.name if spec is not None else f"type 0x{t:02x}"
        self._fail(ErrorCode.PROTOCOL_ERROR, f"expected HELLO, got {name}", events)
        return data

    def _transition(self, t: int, name: str, msg: Message, events: list[Event]) -> bool:
        """Apply :data:`TRANSITIONS` to one decoded message; False when the session ended."""
        state = self.state
        if state is _OPEN:  # (the common case: no enum hashed)
            action = _OPEN_ACTIONS.get(t, _DELIVER)
        else:
            action = TRANSITIONS[state].get(t, _DEFAULT_ACTION[state])
        if action is _DELIVER:
            events.append(msg)
        elif action is _PING:
            assert isinstance(msg, Ping)
            if state is State.OPEN:
                self._out.append(encode_pong(msg.request_id, msg.payload))
        elif action is _PONG:
            self._ping_outstanding = False
            events.append(msg)
        elif action is _CLOSE:
            assert isinstance(msg, Close)
            self._on_close(msg, events)
            return False
        elif action is _HELLO:
            assert isinstance(msg, Hello)
            self._on_hello(msg, events)
        elif action is _WELCOME:
            assert isinstance(msg, Welcome)
            self._on_welcome(msg, events)
        elif state is State.OPEN or state is State.CLOSING:
            self._fail(ErrorCode.PROTOCOL_ERROR, "handshake message on an open session", events)
            return False
        else:
            expected = "HELLO" if state is State.AWAIT_HELLO else "WELCOME"
            self._fail(ErrorCode.PROTOCOL_ERROR, f"expected {expected}, got {name}", events)
            return False
        return not self._is_closed()

    def receive_single(
        self, data: bytes | memoryview, ext: bool = False
    ) -> Request | Response | None:
        """Fast path for the bulk of the traffic, used by adapters before ``receive_data``.

        When ``data`` is exactly one msgpack REQUEST (server) or RESPONSE (client) frame with no
        flags, on an open session with nothing buffered, returns its message — the same one
        ``receive_data`` would have produced. Otherwise returns None *having consumed nothing*:
        feed the same bytes to ``receive_data``. ``data`` may be a memoryview (no copy).

        With ``ext`` (a host: it routes whatever event comes), one whole frame of a type with a
        registered fast decoder (a pattern's message: a remote object's CALL...) gives its event
        too (the type is then wider than the annotation says). (An argument, not an attribute:
        a 30th attribute of the core cost every read ~3 % on CPython 3.11.)
        """
        n = len(data)
        if self.state is not _OPEN or n < HEADER_SIZE or self._decoder.buffered:
            return None
        magic, version, t, flags, codec, meta_len, rid, body_len = _unpack_header(data)
        if (
            HEADER_SIZE + meta_len + body_len != n
            or t != self._fast_type
            or codec != 1
            or (flags and (flags != _DEADLINE or t != _REQUEST or meta_len < 4))
            or magic != MAGIC
            or version != PROTOCOL_VERSION
            or meta_len > self._decoder.max_meta
            or n > self._fast_limit
            or not rid  # request id 0: the general path refuses it
        ):
            if ext and t != self._fast_type:  # a pattern's frame, whole?
                decode = self._fast_ext.get(t)
                if (
                    decode is None
                    or HEADER_SIZE + meta_len + body_len != n
                    or magic != MAGIC
                    or version != PROTOCOL_VERSION
                    or meta_len > self._decoder.max_meta
                    or n > self._fast_limit
                ):
                    return None
                ev = decode(data, HEADER_SIZE, HEADER_SIZE + meta_len, n, flags, codec, rid)  # type: ignore[arg-type]  # (memoryview: sliced as bytes)
                if ev is not None:
                    self._activity = True
                return ev  # type: ignore[return-value]  # (any event: see above)
            return None
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
            if t == _REQUEST:
                if type(value) is not list:
                    return None
                if flags:  # DEADLINE alone: the budget is the meta's last 4 bytes
                    end = HEADER_SIZE + meta_len - 4
                    method = str(data[HEADER_SIZE:end], "utf-8")
                    self._activity = True
                    budget = _unpack_budget(data, end)[0]
                    return Request(
                        rid, method, value, {}, 1, budget, None, False, False, n - HEADER_SIZE
                    )
                method = str(data[HEADER_SIZE : HEADER_SIZE + meta_len], "utf-8")
        except Exception:
            return None
        self._activity = True
        if t == _RESPONSE:
            return Response(rid, value, 1)
        # (every field by position: a keyword costs the generated __init__ ~70 ns)
        return Request(rid, method, value, {}, 1, None, None, False, False, n - HEADER_SIZE)

    def _is_closed(self) -> bool:
        # A method, not an inline test: handlers called in the loop change the state.
        return self.state is State.CLOSED

    def _on_hello(self, hello: Hello, events: list[Event]) -> None:
        # The secret first: a peer without it learns nothing else (not even which versions or
        # limits this server accepts). The HELLO it sent is bounded already (MAX_HELLO_SIZE
        # checked on the header, at most MAX_HELLO_EXTENSIONS extensions decoded).
        if self._authenticate is not None and not self._authenticate(hello):
            self._fail(ErrorCode.AUTH_FAILED, "missing or wrong credentials", events)
            return
        lo, hi = SUPPORTED_VERSIONS
        if hello.min_version > hello.max_version:
            self._fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"HELLO version range {hello.min_version}..{hello.max_version} is empty",
                events,
            )
            return
        if hello.max_version < lo or hello.min_version > hi:
            self._fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"client speaks versions {hello.min_version}..{hello.max_version}, "
                f"server {lo}..{hi}",
                events,
            )
            return
        if hello.max_frame < MIN_MAX_FRAME:
            self._fail(
                ErrorCode.PROTOCOL_ERROR,
                f"HELLO announces max_frame {hello.max_frame}, below the minimum of "
                f"{MIN_MAX_FRAME} bytes",
                events,
            )
            return
        self.version = min(hello.max_version, hi)
        self.peer_max_frame = hello.max_frame
        exts = (features_extension(self.features),) if self.features else ()
        self._out.append(
            encode_welcome(Welcome(self.version, (1, 2, 0), self.max_frame, self.agent, exts))
        )
        self._open()
        events.append(HandshakeComplete(self.version, hello.agent, hello.max_frame))
        events.append(hello)  # extensions (e.g. credentials) are the application's to read

    def _on_welcome(self, welcome: Welcome, events: list[Event]) -> None:
        lo, hi = SUPPORTED_VERSIONS
        if not lo <= welcome.version <= hi:
            self._fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"server chose version {welcome.version}, client speaks {lo}..{hi}",
                events,
            )
            return
        if welcome.max_frame < MIN_MAX_FRAME:
            self._fail(
                ErrorCode.PROTOCOL_ERROR,
                f"WELCOME announces max_frame {welcome.max_frame}, below the minimum of "
                f"{MIN_MAX_FRAME} bytes",
                events,
            )
            return
        self.version = welcome.version
        self.peer_max_frame = welcome.max_frame
        self.peer_features = features_of(welcome.extensions)
        self._open()
        events.append(HandshakeComplete(welcome.version, welcome.agent, welcome.max_frame))

    def _open(self) -> None:
        self.state = State.OPEN
        self._handshake_deadline = None
        self._next_tick = None  # armed by the next handle_timer

    def _on_close(self, close: Close, events: list[Event]) -> None:
        if self.state is not State.CLOSING:
            self._out.append(encode_close(ErrorCode.NORMAL, ""))
            self.close_code, self.close_reason = close.code, close.reason
            self.state = State.CLOSED
            events.append(ConnectionTerminated(close.code, close.reason, by_peer=True))
        else:
            self.state = State.CLOSED
            events.append(ConnectionTerminated(self.close_code, self.close_reason, by_peer=False))

    def receive_eof(self) -> list[Event]:
        """The stream ended. Returns ConnectionTerminated unless the session had already ended."""
        if self.state is State.CLOSED:
            return []
        was_closing = self.state is State.CLOSING
        self.state = State.CLOSED
        if was_closing:  # we asked to close; EOF is the peer's (terse) agreement
            return [ConnectionTerminated(self.close_code, self.close_reason, by_peer=False)]
        return [ConnectionTerminated(None, "connection lost without CLOSE", by_peer=True)]

    # ------------------------------------------------------------------ time

    def next_timer(self, now: float) -> float | None:
        """When ``handle_timer`` must next be called (absolute time), or None for never."""
        if self.state in _HANDSHAKE_STATES:
            return self._handshake_deadline
        if self.state is State.OPEN and self._keepalive_interval:
            if self._next_tick is None:
                self._next_tick = now + self._keepalive_interval
            return self._next_tick
        return None

    def handle_timer(self, now: float) -> list[Event]:
        """Run the timers due at ``now``: handshake timeout and keepalive."""
        events: list[Event] = []
        if self.state in _HANDSHAKE_STATES:
            if self._handshake_deadline is not None and now >= self._handshake_deadline:
                self._fail(ErrorCode.HANDSHAKE_TIMEOUT, "no handshake within the timeout", events)
            return events
        if self.state is not State.OPEN or not self._keepalive_interval:
            return events
        if self._next_tick is None:
            self.next_timer(now)
            return events
        if now < self._next_tick:
            return events
        if self._activity:
            self._activity = False
            self._ping_outstanding = False
            self._next_tick = now + self._keepalive_interval
        elif not self._ping_outstanding:
            self._ping_id = (self._ping_id % 0xFFFFFFFF) + 1
            self._out.append(encode_ping(self._ping_id, b"keepalive"))
            self._ping_outstanding = True
            self._next_tick = now + self._keepalive_timeout
        else:
            self._fail(ErrorCode.IDLE_TIMEOUT, "peer did not answer keepalive PING", events)
        return events
