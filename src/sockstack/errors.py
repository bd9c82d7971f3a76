"""The one exception hierarchy of sockstack, and the numeric codes that go on the wire.

Every exception sockstack raises derives from :class:`SockstackError`::

    SockstackError
    ├── ProtocolError(code, message)      a frame or session rule was broken
    │   ├── LocalProtocolError            ... by us (misuse of the API: a bug in the caller)
    │   │   └── TopicError (also ValueError)  a topic or pattern breaks PROTOCOL.md §4.1
    │   └── RemoteProtocolError           ... by the peer (bad bytes on the wire)
    │       ├── FrameTooLarge(size, limit)
    │       └── AuthFailure(reason)       a datagram is not authentic (protocol/auth.py)
    ├── BrokerError(code, message)        the broker refuses a request (pubsub/broker.py)
    ├── CodecError                        a value could not be encoded or decoded
    ├── InvalidURL (also ValueError)      "tcp://host:port" could not be parsed
    └── CallError                         a call produced no result
        ├── CallTimeout(method, timeout)  no answer within the call's timeout
        ├── RemoteError(type, message)    the server answered with an ERROR frame
        ├── ConnectError                  no connection could be made: the call did NOT run
        └── ConnectionLost                the connection dropped: the call MAY OR MAY NOT have run
            └── ConnectionClosed(code, reason)  ... because the peer sent CLOSE

:class:`ErrorCode` lists the codes carried by ERROR and CLOSE frames (docs/PROTOCOL.md §7).
Codes 1000-1999 concern a whole connection (CLOSE), codes 2000-2999 one request (ERROR).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

__all__ = [
    "CallError",
    "CallTimeout",
    "CodecError",
    "ConnectError",
    "ConnectionClosed",
    "ConnectionLost",
    "ErrorCode",
    "FrameTooLarge",
    "InvalidURL",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "SessionExpired",
    "SockstackError",
    "TopicError",
    "register_error",
    "typed_error",
]


class ErrorCode(enum.IntEnum):
    """Codes of ERROR and CLOSE frames. Stable: new codes are added, none is renumbered."""

    # -- connection level (CLOSE) --
    NORMAL = 1000
    """Orderly close requested by the application."""
    GOING_AWAY = 1001
    """The server is shutting down (after answering what it had accepted)."""
    PROTOCOL_ERROR = 1002
    """Malformed frame, bad magic, message type not allowed in this state."""
    UNSUPPORTED_VERSION = 1003
    """No protocol version in common."""
    FRAME_TOO_LARGE = 1004
    """A frame's declared size is above the receiver's limit."""
    HANDSHAKE_TIMEOUT = 1005
    """No HELLO within the handshake timeout."""
    IDLE_TIMEOUT = 1006
    """Nothing received within the idle timeout."""
    TOO_MANY_CONNECTIONS = 1007
    """The server is at its connection limit."""
    AUTH_FAILED = 1008
    """Missing or wrong credentials."""
    INTERNAL_ERROR = 1009
    """The peer hit a bug; the connection cannot continue."""
    SLOW_CONSUMER = 1010
    """A subscriber fell behind beyond its limits, with the ``disconnect`` policy."""
    FRAME_TIMEOUT = 1015
    """A frame began but did not arrive whole within the receiver's frame timeout."""
    BUSY = 1016
    """The server holds as many bytes of unfinished frames as it allows; this connection's
    would go beyond it."""

    # -- request level (ERROR) --
    UNKNOWN_METHOD = 2000
    """The service has no method of that name."""
    BAD_ARGUMENTS = 2001
    """The arguments do not fit the method's signature."""
    APPLICATION_ERROR = 2002
    """The method raised an error meant for the client: a :class:`ServiceError` or an exception
    type its service declares (``errors = (...)``); its type name and message travel with it."""
    DECODE_ERROR = 2003
    """The body could not be decoded with the codec the header names."""
    UNSUPPORTED_CODEC = 2004
    """The header names a codec the receiver does not have."""
    UNKNOWN_TYPE = 2005
    """The message type is not known (framing is intact, so the connection stays open)."""
    SHUTTING_DOWN = 2006
    """The server is draining and accepts no new requests."""
    RESULT_NOT_ENCODABLE = 2007
    """The method returned a value the request's codec cannot represent."""
    DATAGRAM_TOO_LARGE = 2008
    """A datagram is above the receiver's limit."""
    BAD_TOPIC = 2010
    """An invalid topic or pattern, or a wildcard in a published topic."""
    UNKNOWN_DELIVERY = 2011
    """An ACK for a delivery id the broker is not waiting for. Sent with request id 0: it
    answers no request (PROTOCOL.md §4.1), and a client never ends a call on it."""
    UNKNOWN_SUBSCRIPTION = 2012
    """UNSUB of a subscription id that is not subscribed, or SUB of one already in use."""
    PAYLOAD_TOO_LARGE = 2013
    """A published payload above the broker's limit (``max_payload``)."""
    OVERLOADED = 2014
    """UDP: too many requests running; this one did not run (call again later)."""
    TOO_MANY_SUBSCRIPTIONS = 2015
    """SUB beyond the broker's subscriptions per connection (``max_subscriptions_per_peer``)."""
    RETAINED_STORE_FULL = 2016
    """A retained publish the broker's retained store has no room for (topics or bytes); it was
    neither retained nor delivered."""
    RESULT_TOO_LARGE = 2017
    """A stream session: the method's result encodes to more than the client's frame limit (the
    ``max_frame`` of its HELLO); the method ran. Over UDP the same is DATAGRAM_TOO_LARGE."""
    DEADLINE_EXCEEDED = 2018
    """The call's deadline (the budget its REQUEST carried) passed before or while it ran: it
    was refused without running, or stopped; it did not finish."""
    CANCELLED = 2019
    """The client cancelled the call (CANCEL): it did not run, or was stopped."""
    UNEXPECTED_ERROR = 2020
    """The method raised an exception its service does not declare: a bug of the server's
    (logged there with its traceback); its type name and message travel unless the server
    hides them."""
    BAD_RESULT = 2021
    """The method ran and returned a value that does not fit its return annotation: a bug of
    the server's (logged there), not of the call's arguments."""
    REFUSED = 2022
    """An interceptor of the server refused the call before the method ran (a missing
    credential, a quota...): the method did not run; the message says why."""
    STREAM_MISMATCH = 2023
    """A call and its method disagree on streaming: a generator method called without the
    STREAM flag (call it with ``stream()``), a method taking an item stream called without the
    UPLOAD flag (``upload()``) or one that takes none called with it, or a STREAM or UPLOAD
    request over UDP (streams need TCP or TLS). The method did not run."""
    WINDOW_EXCEEDED = 2024
    """An upload's client sent ITEMs beyond the flow-control window (PROTOCOL.md §4.4): the
    server stopped the call and dropped its items."""
    UNKNOWN_OBJECT = 2025
    """Remote objects: the call's target is not an object exported to this session (never
    exported to it, or released since), or no object is registered under that name."""
    TOO_MANY_OBJECTS = 2026
    """Remote objects: a table of the session or of the server (exports, imports, kept answers)
    is full; the method ran and its result was dropped (its side effects remain)."""
    SESSION_EXPIRED = 2027
    """Remote objects: the session token is unknown or its lease has passed; its references
    are gone."""
    BAD_TARGET = 2028
    """Remote objects: the CALL's target is malformed, or names a question that was not KEEP
    or is finished, or a path that leads to no reference."""
    PROMISE_ELSEWHERE = 2029
    """Remote objects: a pipelined call's target resolved to a reference this server does not
    host; the caller sends the call again to the reference's home."""
    NOT_FOUND = 2030
    """HTTP gateway: no resource at that path (a route, or a key of a resource); HTTP 404."""
    METHOD_NOT_ALLOWED = 2031
    """HTTP gateway: the path exists but does not answer that HTTP method (``Allow`` lists
    those it does); HTTP 405."""
    PRECONDITION_FAILED = 2032
    """HTTP gateway: a conditional request's ``If-Match`` or ``If-None-Match`` did not hold
    (the resource changed since the client read it); HTTP 412."""
    HEADERS_TOO_LARGE = 2033
    """HTTP gateway: the request line and headers are larger than the gateway's bound; HTTP
    431, and the connection is closed."""
    REPLAY_GAP = 2034
    """HTTP gateway: a reconnecting event stream asked (``Last-Event-ID``) for events no
    longer in the replay buffer; the stream goes on from the oldest kept, after saying so."""
    STORE_FULL = 2035
    """Edge relay: its outbox is full (bytes or streams) and its policy is to refuse new input;
    send again later (the relay drains as its upstream takes the backlog)."""
    BAD_RECORD = 2036
    """Edge relay or sink: a forwarded batch holds a row whose checksum does not match, or ids
    that do not rise; nothing of the batch was stored."""
    UNAVAILABLE = 2037
    """Edge sink or relay: its store cannot be written (a sink's database is down; a relay whose
    commit failed takes no input until it is restarted); nothing was stored; send it again
    later (a relay does, with backoff). A broker: its store or its link (JetStream) could not
    keep a QoS 1 message (it may have been delivered to subscribers connected then)."""
    ABANDONED = 2038
    """The server stopped before the call finished: it ran past the drain timeout and was cut
    off, so it may have run in part (unlike SHUTTING_DOWN: a call refused while draining, which
    did not run and may go to another server)."""
    UNAUTHENTICATED = 2009
    """A datagram without a valid MAC, outside the replay window, or replayed (UDP with a
    shared secret)."""

    @classmethod
    def describe(cls, code: int) -> str:
        """``"NAME (code)"`` for a known code, ``"code N"`` for an unknown one."""
        try:
            return f"{cls(code).name} ({code})"
        except ValueError:
            return f"code {code}"


class SockstackError(Exception):
    """Base class of every exception raised by sockstack."""


class ProtocolError(SockstackError):
    """A rule of the wire protocol was broken. ``code`` is the ErrorCode sent or received."""

    def __init__(self, message: str, code: int = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids (a bug in the calling code)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol."""


class FrameTooLarge(RemoteProtocolError):
    """A frame header declared more bytes than the limit allows; rejected before reading them."""

    def __init__(self, size: int, limit: int, code: int = ErrorCode.FRAME_TOO_LARGE) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes", code)
        self.size = size
        self.limit = limit


class TopicError(LocalProtocolError, ValueError):
    """An invalid topic or pattern (PROTOCOL.md §4.1); the message says why. Raised by the
    clients before anything is sent (``publish``, ``subscribe``), with ``code`` BAD_TOPIC, the
    code the broker answers the same mistake with. Also a ``ValueError``, as it always was."""

    def __init__(self, message: str, code: int = ErrorCode.BAD_TOPIC) -> None:
        super().__init__(message, code)


class CodecError(SockstackError):
    """A value could not be encoded, or a body decoded, by the chosen codec."""


class InvalidURL(SockstackError, ValueError):
    """An endpoint URL such as ``tcp://127.0.0.1:5050`` could not be parsed."""


class CallError(SockstackError):
    """A remote call produced no result."""


class CallTimeout(CallError, TimeoutError):
    """No answer arrived within the call's timeout. The call may or may not have run."""

    def __init__(self, method: str, timeout: float, detail: str = "") -> None:
        extra = f" ({detail})" if detail else ""
        super().__init__(f"call {method!r} got no answer within {timeout:g} s{extra}")
        self.method = method
        self.timeout = timeout


class RemoteError(CallError):
    """The server answered the call with an ERROR frame.

    ``type`` is the remote exception's type name (e.g. ``"ZeroDivisionError"``) or the name of a
    protocol error code (e.g. ``"UNKNOWN_METHOD"``); ``message`` is its text; ``code`` the
    :class:`ErrorCode`. No remote traceback is ever sent.
    """

    def __init__(
        self,
        type: str,
        message: str,
        code: int = ErrorCode.APPLICATION_ERROR,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> None:
        super().__init__(f"{type}: {message}" if message else type)
        self.type = type
        self.message = message
        self.code = int(code)
        self.metadata: Mapping[str, str | bytes] = metadata or {}
        """The server's trailers sent with the ERROR (PROTOCOL.md §4), empty without."""


class ConnectError(CallError, ConnectionError):
    """No connection to the server could be made. The call did not run."""


class ConnectionLost(CallError, ConnectionError):
    """The connection dropped while the call was in flight: it MAY OR MAY NOT have run."""


class ConnectionClosed(ConnectionLost):
    """The peer closed the connection with a CLOSE frame (``code``, ``reason``)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(
            f"connection closed by peer: {ErrorCode.describe(code)}"
            + (f": {reason}" if reason else "")
            + "; calls in flight may or may not have run"
        )
        self.code = int(code)
        self.reason = reason


class SessionExpired(CallError):
    """A remote objects' session is gone (its lease ran out while the client was away, or the
    server restarted): the objects it held were freed, their proxies do not work any more.
    Code :attr:`ErrorCode.SESSION_EXPIRED`; the client attached a new session."""

    code = ErrorCode.SESSION_EXPIRED


# --------------------------------------------------------------------------- typed errors

_ERROR_TYPES: dict[str, type[BaseException]] = {}
"""Exception classes a remote ERROR may be raised as, by wire name: only those registered here
by this process (never a class looked up by a name the remote chose)."""

E = TypeVar("E", bound=type[BaseException])


def wire_name(cls: type[BaseException]) -> str:
    """The type name an exception class travels under: ``__sockstack_name__`` or its name."""
    name = getattr(cls, "__sockstack_name__", None)
    return name if isinstance(name, str) and name else cls.__name__


def register_error(cls: E) -> E:
    """Let ERRORs of this type (code APPLICATION_ERROR, type name :func:`wire_name`) be raised
    in this process as ``cls(message)`` instead of :class:`RemoteError`; a class decorator.
    A server registers the ``errors`` its services declare itself; a client registers the
    classes it wants back (the same ones, imported from shared code). Two classes under one
    name are refused (``ValueError``)."""
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        raise TypeError(f"{cls!r} is not an exception class")
    name = wire_name(cls)
    known = _ERROR_TYPES.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"error type name {name!r} is already registered for {known!r}")
    _ERROR_TYPES[name] = cls
    return cls


def typed_error(err: RemoteError) -> BaseException:
    """The exception to raise for a remote ERROR: an instance of the class registered under its
    type name (APPLICATION_ERROR only; built as ``cls(message)``, with the original as its
    ``remote`` attribute), else ``err`` itself."""
    if err.code != ErrorCode.APPLICATION_ERROR:
        return err
    cls = _ERROR_TYPES.get(err.type)
    if cls is None:
        return err
    try:
        exc = cls(err.message)
    except Exception:  # a constructor that wants more than a message: the plain error
        return err
    try:
        exc.remote = err  # type: ignore[attr-defined]
    except AttributeError:  # a class with __slots__: no room for it
        pass
    return exc
