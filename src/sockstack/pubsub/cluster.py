"""Brokers joined through NATS: :class:`NatsLink`, a :class:`~sockstack.pubsub.broker.BrokerLink`
that carries a broker's publishes, interest and retained messages over core NATS (nats-py).

::

    link = NatsLink(broker, ["nats://n1:4222", "nats://n2:4222"])
    await link.start()          # on the broker's loop; raises ConnectError if no server answers
    ...
    await link.close()

Two NATS connections, both on the broker's loop:

- **P** (``no_echo``): every local publish goes out on it, on the topic's subject; it holds one
  plain subscription per distinct local pattern without a group (made when the first local
  subscriber of the pattern comes, removed when the last goes). A message arriving there goes
  to :meth:`Broker.deliver_remote` for exactly that pattern, so overlapping patterns each get
  it once. ``no_echo``: NATS never hands P its own publishes back (Broker.publish delivered them
  locally already), so nothing loops or doubles.
- **Q** (echo on): one queue subscription (subject = the pattern, queue = the group) per
  distinct local (pattern, group). With a link the broker leaves group members to it: NATS
  chooses one member across all brokers, this one included (P and Q are different
  connections), and the message comes back through ``deliver_remote(pattern, group, ...)``.

Subjects (:class:`SubjectMap`): ``prefix`` + the topic, token for token (sockstack's topics
and patterns are NATS tokens already: non-empty, no whitespace or NUL, ``*``/``>`` whole
tokens), with ``%XX`` (the UTF-8 bytes, upper-case hex) for what NATS cannot carry or what
would be ambiguous: ``%`` itself, control characters (C0, DEL, C1), whitespace (Unicode's:
ASCII whitespace is no topic's) and lone surrogates; with
an empty prefix, also the ``_`` of a first token equal to the control namespace's.

Payloads go as published. The codec travels in a ``Sockstack-Codec`` header, except for
msgpack (codec 1, the default), which has none: a message from a plain NATS client without the
header is taken as msgpack (send ``Sockstack-Codec: 0`` for raw bytes, ``2`` for JSON).

Retained messages: a retained publish (or a clear, empty) also goes to
``<control>retain.<topic>``, to which every broker is subscribed whatever its interest
(:meth:`Broker.retain_remote`). A starting broker (and one whose connection came back) asks a
peer for the store it missed (``<control>snap``, a queue group of brokers that have theirs):
chunk by chunk, bounded by its ``max_retained_bytes``; a topic that changed live meanwhile
keeps the live value.

Outgoing messages wait in one queue bounded in bytes (``max_outgoing_bytes``, each message
charged its subject, payload and :data:`OUTGOING_OVERHEAD`), emptied by one task into nats-py
(no task per message); while NATS is unreachable they wait there, and what would pass the
bound is dropped (newest first) and counted (``cluster_dropped_out``).

Counters go into :meth:`Broker.stats` (keys ``cluster_*``). Without JetStream, core NATS is
at most once between brokers.

JetStream (``jetstream=True``): the link is a :class:`~sockstack.pubsub.broker.DurableLink`.

- One stream (``SOCKSTACK`` for the prefix ``sockstack.``) captures ``prefix + ">"``: every
  publish of every broker (QoS 0 ones too, as they come, unconfirmed), file storage, bounded
  (``stream_max_bytes``, ``stream_max_age``, messages up to the broker's ``max_payload``),
  discarding the oldest. Made at :meth:`NatsLink.start`; an existing stream with other settings
  is a clear error (what differs and how to fix it): brokers never fight over its config.
- A QoS 1 publish goes out once, with a reply subject under one wildcard inbox: the core
  subscribers of other brokers get it as before, the stream stores it, and its PubAck confirms
  the broker's PUB (``confirm(True, "")``); a negative ack, no answer within
  ``publish_timeout``, NATS unreachable or too many waiting (``max_confirm_bytes``) answer
  ``confirm(False, why)`` (the client gets ERROR UNAVAILABLE and may publish again). Waiting
  confirms are one dict entry each, timed out by the link's tick: no task per message.
- Durable subscriptions are JetStream durable pull consumers (name from the durable's name,
  filter = the pattern's subject, explicit ack, ``ack_wait`` = the broker's, ``max_ack_pending``
  = its ``max_inflight``, no redelivery limit, delivered from the SUB's time when it is made).
  Each attached durable has one inbox subscription and at most one pull request out, of
  ``Broker.durable_room`` messages and the durable window's bytes; messages go to
  ``Broker.durable_feed``; acks, naks (of what a leaving subscriber did not acknowledge) and
  progress marks (``+WPI`` every ``ack_wait / 2`` for what the broker holds, so JetStream does
  not send it again while the broker lives) go out through one queue. A leaving subscriber's
  messages are nak'ed once this broker's pull request has ended (``pull_expires``, 2 s): while
  it is open, JetStream would hand them straight back to it. A broker killed with
  messages in flight: JetStream sends them again after ``ack_wait``, to whichever broker the
  subscriber is on then.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from sockstack.errors import ConnectError, ErrorCode
from sockstack.protocol.codecs import CODECS
from sockstack.pubsub.broker import RETAINED_OVERHEAD, Broker, BrokerError, Durable
from sockstack.transport.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg as NatsMsg
    from nats.aio.subscription import Subscription as NatsSubscription

__all__ = [
    "CODEC_HEADER",
    "CONFIRM_OVERHEAD",
    "DEFAULT_PREFIX",
    "OUTGOING_OVERHEAD",
    "NatsLink",
    "SubjectMap",
    "require_nats",
]

log = logging.getLogger("sockstack.cluster")

DEFAULT_PREFIX = "sockstack."
"""Subjects of sockstack topics: JetStream can capture ``sockstack.>`` later, and other NATS
traffic stays apart."""
CODEC_HEADER = "Sockstack-Codec"
"""The payload's codec (0 raw, 2 JSON); absent: msgpack (1)."""
OUTGOING_OVERHEAD = 160
"""What a message waiting to go to NATS costs beyond its subject and payload bytes: its tuple
(72 B), its deque slot (8 B) and the payload's bytes header when it is not shared (33 B, up to
48 allocated), rounded up; tests/pubsub/test_cluster.py measures it with tracemalloc."""
CONFIRM_OVERHEAD = 320
"""What a QoS 1 publish waiting for its PubAck costs the link: its dict entry and (confirm,
deadline) tuple, the deadline float and id int, and the broker's answer object the confirm is
bound to (a bound method and its ``_Answer``), rounded up; tests/pubsub/test_cluster_jetstream.py
measures it with tracemalloc."""
CONTROL_OVERHEAD = 120
"""A JetStream ack, nak, progress mark or pull request waiting to go: its tuple and deque slot
and its payload (shared constants), beyond its subject's bytes."""
HEADER_ROOM = 256
"""Bytes of headers a stored message may carry beyond the broker's max_payload (the stream's
max_msg_size): the codec header, and room for a plain client's."""
SNAPSHOT_CHUNK = 256 << 10
"""Bytes of retained messages per snapshot reply (below NATS's 1 MB max_payload)."""
_SNAP_ENTRY_EXTRA = 16  # msgpack framing of one [topic, codec, payload] entry, at most

_HEADERS: dict[int, dict[str, str] | None] = {c: {CODEC_HEADER: str(c)} for c in CODECS}
_HEADERS[1] = None


def stream_name(prefix: str) -> str:
    """The JetStream stream of a subject prefix: its tokens upper-cased, joined by ``_``, with
    what stream names cannot hold made ``_`` (``sockstack.`` -> ``SOCKSTACK``)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", prefix.rstrip(".")).upper()
    return name or "SOCKSTACK"


def consumer_name(durable: str) -> str:
    """A JetStream consumer name for a durable subscription's name: ASCII letters, digits and
    ``-`` as they are, every other byte of its UTF-8 ``_XX`` (upper-case hex), so different
    names never share a consumer; longer than 200 characters (a consumer is a directory on the
    server's disk): its first 160 and a hash of the whole name."""
    out = []
    for ch in durable:
        if ch.isascii() and (ch.isalnum() or ch == "-"):
            out.append(ch)
        else:
            out.append("".join(f"_{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
    name = "".join(out)
    if len(name) > 200:
        digest = hashlib.sha256(durable.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        name = name[:160] + "-" + digest
    return name


def _delivered(token: str) -> int:
    """How many times JetStream delivered a message, from its ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or the form with
    domain and account hash: 12 tokens or more)."""
    parts = token.split(".")
    try:
        return int(parts[4] if len(parts) == 9 else parts[6])
    except (IndexError, ValueError):
        return 1


def require_nats() -> None:
    """Raise ImportError with what to install when nats-py is missing."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise ImportError(
            "joining brokers through NATS needs nats-py: pip install 'sockstack[nats]'"
        ) from None


# ------------------------------------------------------------------------------ subjects


def _needs_escape(c: str) -> bool:
    o = ord(c)
    return c == "%" or o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or c.isspace()


def _escape(text: str) -> str:
    if not any(_needs_escape(c) for c in text):
        return text
    out = []
    for c in text:
        if _needs_escape(c):
            out.append("".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass")))
        else:
            out.append(c)
    return "".join(out)


def _unescape(text: str) -> str:
    """The inverse of :func:`_escape` on what it makes. A ``%`` that does not start an escape
    :func:`_escape` would have written (of one character) stays as it is: a plain NATS
    client's subject is taken literally."""
    if "%" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "%":
            decoded, used = _one_escape(text, i)
            if decoded is not None:
                out.append(decoded)
                i += used
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _hex_byte(text: str, i: int) -> int | None:
    """The byte of a ``%XX`` (upper-case hex) at ``text[i]``, else None."""
    if i + 3 > len(text) or text[i] != "%":
        return None
    two = text[i + 1 : i + 3]
    if not all(ch in "0123456789ABCDEF" for ch in two):
        return None
    return int(two, 16)


def _one_escape(text: str, i: int) -> tuple[str | None, int]:
    """One escaped character at ``text[i]``: (it, characters used), or (None, 0) when
    :func:`_escape` would not have written this."""
    lead = _hex_byte(text, i)
    if lead is None:
        return None, 0
    size = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
    raw = bytearray([lead])
    for k in range(1, size):
        b = _hex_byte(text, i + 3 * k)
        if b is None:
            return None, 0
        raw.append(b)
    try:
        ch = bytes(raw).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None, 0
    if len(ch) != 1 or not _needs_escape(ch):
        return None, 0
    return ch, 3 * size


class SubjectMap:
    """sockstack topics, patterns and groups <-> NATS subjects and queue names.

    ``prefix`` ('' or tokens ending in ``.``) goes before every topic; ``control`` (default
    ``"_" + prefix``, ``"_sockstack."`` with no prefix) before the link's own subjects. Each
    token maps on its own (so ``*`` and ``>`` keep their meaning and the token count is kept);
    see the module's notes for what is escaped."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, control: str | None = None) -> None:
        for what, value in (("prefix", prefix), ("control", control)):
            if value is None or value == "":
                continue
            if (
                not value.endswith(".")
                or any(c in "*>" or _needs_escape(c) for c in value)
                or not all(value[:-1].split("."))
            ):
                raise ValueError(
                    f"cluster {what} {value!r}: non-empty tokens each ending with '.', no "
                    "whitespace, wildcards, '%' or control characters (e.g. 'sockstack.')"
                )
        self.prefix = prefix
        self.control = control if control else ("_" + prefix if prefix else "_sockstack.")
        if self.control == prefix:
            raise ValueError("the cluster's control namespace must differ from its prefix")
        # With no prefix, a topic could land in the control namespace: its first token is
        # escaped ('_' -> '%5F') when it equals the control namespace's first token.
        first = self.control.split(".", 1)[0]
        self._clash = first if not prefix else None
        self._clash_escaped = "%" + f"{ord(first[0]):02X}" + first[1:] if first else ""

    def subject(self, topic: str) -> str:
        """The subject of a topic or pattern (already valid)."""
        out = _escape(topic)
        if self._clash is not None and (out == self._clash or out.startswith(self._clash + ".")):
            out = self._clash_escaped + out[len(self._clash) :]
        return self.prefix + out

    def topic(self, subject: str) -> str | None:
        """The topic of a subject under the prefix; None for one outside it (or in the
        control namespace)."""
        if not subject.startswith(self.prefix) or subject.startswith(self.control):
            return None
        body = subject[len(self.prefix) :]
        if self._clash is not None and (
            body == self._clash_escaped or body.startswith(self._clash_escaped + ".")
        ):
            body = self._clash + body[len(self._clash_escaped) :]
        return _unescape(body)

    @staticmethod
    def queue(group: str) -> str:
        """A NATS queue name for a group (whitespace escaped too: groups may hold it)."""
        return _escape(group)


# ------------------------------------------------------------------------------ the link


class _Pull:
    """An attached durable subscription's JetStream side: its consumer, its inbox, the pull
    request out (``outstanding`` messages asked and not come yet, ``deadline`` when it is given
    up locally if its end never comes: a reconnect lost it)."""

    __slots__ = (
        "binding",
        "closed",
        "d",
        "deadline",
        "filter",
        "held",
        "inbox",
        "name",
        "next_try",
        "outstanding",
        "ready",
        "since",
        "sub",
    )

    def __init__(self, d: Durable, name: str, subject: str, inbox: str, since: float) -> None:
        self.d = d
        self.name = name
        self.filter = subject
        self.inbox = inbox
        self.since = since  # the SUB's time: a consumer made now delivers from it
        self.sub: NatsSubscription | None = None
        self.ready = False
        self.binding = False
        self.closed = False
        self.outstanding = 0
        self.deadline = 0.0
        self.next_try = 0.0
        self.held: list[str] = []  # closed: tokens to nak once its request has ended


class NatsLink:
    """Joins ``broker`` to the brokers on the same NATS servers (module docstring).

    ``servers``: NATS URLs (nats-py tries them in random order and moves to another when its
    server goes). ``max_outgoing_bytes`` bounds what waits to go to NATS (while it is
    unreachable, or slower than the publishers); ``sub_pending_bytes`` what waits in each of
    nats-py's subscriptions for the loop (beyond it NATS counts a slow consumer, and the link
    ``cluster_dropped_in``). ``ping_interval`` (seconds) and ``max_outstanding_pings`` decide
    how soon a silent server is given up (NATS's default of two minutes is long for a broker).

    ``jetstream``: QoS 1 publishes confirmed by JetStream and durable subscriptions kept there
    for every broker (module docstring). ``stream`` (default from the prefix), ``replicas``
    (1, or 3 on a 3-node cluster: a stored message outlives a node), ``stream_max_bytes``
    (per replica on disk; 1 GiB by default, a bound a small node can hold: raise it for long
    absences at high rates) and ``stream_max_age`` (the broker's ``durable_max_age``, 7 days, by
    default) make the stream; ``publish_timeout`` bounds a QoS 1 publish's wait for its PubAck,
    ``max_confirm_bytes`` what waiting PubAcks may hold, ``max_control_bytes`` the acks and naks
    waiting to go, ``api_timeout`` each JetStream API call, ``pull_expires`` how long a pull
    request waits for messages (a leaving subscriber's messages go back once its broker's
    request has ended: at most this long).
    """

    holds_durables: bool

    def __init__(
        self,
        broker: Broker,
        servers: Sequence[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        control: str | None = None,
        name: str | None = None,
        max_outgoing_bytes: int = 16 << 20,
        sub_pending_bytes: int = 8 << 20,
        connect_timeout: float = 5.0,
        reconnect_wait: float = 0.5,
        ping_interval: float = 2.0,
        max_outstanding_pings: int = 2,
        snapshot_timeout: float = 2.0,
        jetstream: bool = False,
        stream: str | None = None,
        replicas: int = 1,
        stream_max_bytes: int = 1 << 30,
        stream_max_age: float | None = None,
        publish_timeout: float = 5.0,
        max_confirm_bytes: int = 16 << 20,
        max_control_bytes: int = 4 << 20,
        api_timeout: float = 5.0,
        pull_expires: float = 2.0,
    ) -> None:
        require_nats()
        if not servers:
            raise ValueError("a cluster needs at least one NATS URL (nats://host:4222)")
        if max_outgoing_bytes < 1 or sub_pending_bytes < 1:
            raise ValueError("max_outgoing_bytes and sub_pending_bytes must be positive")
        self.broker = broker
        self.servers = list(servers)
        self.map = SubjectMap(prefix, control)
        self.id = os.urandom(6).hex()
        self.name = name or f"sockstack-broker-{self.id}"
        self.max_outgoing_bytes = max_outgoing_bytes
        self.sub_pending_bytes = sub_pending_bytes
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.ping_interval = ping_interval
        self.max_outstanding_pings = max_outstanding_pings
        self.snapshot_timeout = snapshot_timeout
        self.holds_durables = jetstream
        if jetstream:
            if not self.map.prefix:
                raise ValueError(
                    "JetStream needs a subject prefix (--cluster-prefix): its stream captures "
                    "PREFIX> and '>' would take NATS's own subjects too"
                )
            if not 1 <= replicas <= 5:
                raise ValueError("replicas must be 1..5 (JetStream's limit)")
            for what, v in (
                ("stream_max_bytes", stream_max_bytes),
                ("max_confirm_bytes", max_confirm_bytes),
                ("max_control_bytes", max_control_bytes),
            ):
                if v < 1:
                    raise ValueError(f"{what} must be positive")
            if publish_timeout <= 0 or api_timeout <= 0 or pull_expires <= 0:
                raise ValueError("publish_timeout, api_timeout and pull_expires must be positive")
        self.stream = stream or stream_name(self.map.prefix)
        self.replicas = replicas
        self.stream_max_bytes = stream_max_bytes
        self.stream_max_age = (
            stream_max_age if stream_max_age is not None else broker.limits.durable_max_age
        )
        if self.stream_max_age <= 0:
            raise ValueError("stream_max_age must be positive")
        self.publish_timeout = publish_timeout
        self.max_confirm_bytes = max_confirm_bytes
        self.max_control_bytes = max_control_bytes
        self.api_timeout = api_timeout
        self.pull_expires = pull_expires
        # JetStream state: QoS 1 publishes waiting for their PubAck (id -> (confirm,
        # deadline); insertion order is deadline order), control messages waiting to go
        # (acks, naks, progress, pull requests), the attached durables' pulls, and the consumer
        # operations (made, deleted), done in order by one task.
        self._confirms: dict[int, tuple[Callable[[bool, str], None], float]] = {}
        self._confirm_id = 0
        self._reply_prefix = ""
        self._ctl: deque[tuple[str, bytes, str]] = deque()
        self._ctl_bytes = 0
        self._pulls: dict[str, _Pull] = {}
        self._ops: deque[tuple[str, Any]] = deque()
        self._ops_running = False
        self._refused: set[Durable] = set()
        self._closing: set[_Pull] = set()  # closed, waiting for their pull request to end
        self._timer: asyncio.TimerHandle | None = None
        self._next_progress = 0.0
        self._p: NatsClient | None = None
        self._q: NatsClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # (subject, payload, headers, cost, confirm id: 0, or a QoS 1 publish's PubAck's)
        self._out: deque[tuple[str, bytes, dict[str, str] | None, int, int]] = deque()
        self._out_bytes = 0
        self.backlogged = False
        """More than half of ``max_outgoing_bytes`` waits to go: the broker's pattern stops
        reading the connections that publish until it is back under a quarter (backpressure
        to the publishers, instead of dropping what they send)."""
        self._drained_callbacks: list[Callable[[], None]] = []
        self._draining = False
        self._closed = False
        self._subjects: dict[str, str] = {}  # topic -> subject, bounded
        self._retain_subjects: dict[str, str] = {}
        self._interest: dict[tuple[str, str | None], NatsSubscription] = {}
        self._dirty: dict[tuple[str, str | None], bool] = {}
        self._reconciling = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._syncing = False
        self._live: set[str] = set()
        self._live_overflow = False
        self._sync_task: asyncio.Task[int] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.bad_log = RateLimitedLog(log)
        self._last_error = ""
        self._started = False
        self._quiet = False  # a connection error was logged: the next ones go to DEBUG
        c = broker.counters
        for key in (
            "cluster_sent",
            "cluster_received",
            "cluster_dropped_out",
            "cluster_dropped_in",
            "cluster_bad_in",
            "cluster_disconnects",
            "cluster_reconnects",
            "cluster_interest_subscriptions",
            "cluster_outgoing",
            "cluster_outgoing_bytes",
            "cluster_retained_in",
            "cluster_snapshot_entries",
            "cluster_connected",
        ):
            c.setdefault(key, 0)
        if jetstream:
            for key in (
                "cluster_js_confirmed",
                "cluster_js_refused",
                "cluster_js_waiting",
                "cluster_js_waiting_bytes",
                "cluster_js_fed",
                "cluster_js_acks",
                "cluster_js_naks",
                "cluster_js_control_dropped",
                "cluster_js_durables",
            ):
                c.setdefault(key, 0)
        self._c = c

    # -------------------------------------------------------------------------- life

    async def start(self) -> None:
        """Connect (both connections), subscribe to the retained namespace, join the broker
        (its current interest is subscribed), fetch the retained store from a peer. Raises
        :class:`ConnectError` when no NATS server answers."""
        from nats.aio.client import Client
        from nats.errors import Error as NatsError

        self._loop = asyncio.get_running_loop()
        opts: dict[str, Any] = {
            "servers": self.servers,
            "connect_timeout": self.connect_timeout,
            "reconnect_time_wait": self.reconnect_wait,
            # Starting: each server tried twice, then a clear error. Once connected: for ever
            # (set below; nats-py reads it at each reconnect).
            "max_reconnect_attempts": 1,
            "ping_interval": self.ping_interval,
            "max_outstanding_pings": self.max_outstanding_pings,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
        }
        self._p, self._q = Client(), Client()
        try:
            await self._p.connect(
                name=self.name + "-p", no_echo=True, reconnected_cb=self._on_p_reconnected, **opts
            )
            await self._q.connect(
                name=self.name + "-q", reconnected_cb=self._on_q_reconnected, **opts
            )
        except (NatsError, OSError, TimeoutError) as exc:
            await self._close_connections()
            raise ConnectError(
                f"cannot reach NATS at {', '.join(self.servers)}: "
                f"{self._last_error or exc or type(exc).__name__}"
            ) from None
        for nc in (self._p, self._q):
            nc.options["max_reconnect_attempts"] = -1
        self._started = True
        self._c["cluster_connected"] = 2
        ctl = self.map.control
        await self._p.subscribe(
            ctl + "retain.>", cb=self._on_retain, pending_bytes_limit=self.sub_pending_bytes
        )
        await self._p.subscribe(ctl + "snap." + self.id, cb=self._on_snapshot_request)
        if self.holds_durables:
            try:
                await self._setup_stream()
            except ConnectError:
                self._started = False  # (closing is no lost connection to report)
                await self._close_connections()
                raise
            self._reply_prefix = self._p.new_inbox() + "."
            await self._p.subscribe(
                self._reply_prefix + "*",
                cb=self._on_puback,
                pending_bytes_limit=self.sub_pending_bytes,
            )
            self._timer = self._loop.call_later(self._tick_period(), self._tick)
        self.broker.attach_link(self)
        await self.sync_retained()
        await self._p.subscribe(ctl + "snap", queue="snap", cb=self._on_snapshot_request)
        await self.flush()
        log.info(
            "broker joined the NATS cluster at %s (prefix %r, id %s)",
            self._p.connected_url.netloc if self._p.connected_url else self.servers,
            self.map.prefix,
            self.id,
        )

    async def close(self, timeout: float = 2.0) -> None:
        """Leave: detach from the broker, send what waits (within ``timeout`` seconds), close
        both connections."""
        if self._closed:
            return
        self._release_backlog()  # (publishers held for this link are read again)
        if self.broker.link is self:
            self.broker.attach_link(None)
        if self.holds_durables:
            # Durables whose subscribers left: their pull requests end (pull_expires at most),
            # then what they did not acknowledge is nak'ed, for the next broker at once.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._quiesce(), min(timeout, self.pull_expires + 1.0))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._send_waiting(), timeout)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for confirm, _ in self._confirms.values():
            with contextlib.suppress(Exception):
                confirm(False, "the broker's link to NATS closed before JetStream answered")
        self._confirms.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        await self._close_connections()
        self._c["cluster_connected"] = 0

    async def _quiesce(self) -> None:
        for pull in list(self._pulls.values()):
            self._close_pull(pull)
        self._pulls.clear()
        while self._closing or self._ops or self._ops_running:
            await asyncio.sleep(0.02)  # the poll's period (bounded by the caller's wait_for)

    async def _send_waiting(self) -> None:
        if self._drain_task is not None and not self._drain_task.done():
            await asyncio.shield(self._drain_task)
        if (self._out or self._ctl) and self._p is not None and self._p.is_connected:
            await self._drain()
        if self._p is not None and self._p.is_connected:
            await self._p.flush()

    async def _close_connections(self) -> None:
        for nc in (self._p, self._q):
            if nc is not None and not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.close()

    @property
    def connected(self) -> bool:
        return bool(self._p and self._q and self._p.is_connected and self._q.is_connected)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the interest changes made so far are subscribed and both connections'
        servers have seen everything sent (a PING/PONG each)."""
        await asyncio.wait_for(self._idle.wait(), timeout)
        if self._out or self._ctl:
            await asyncio.wait_for(self._send_waiting(), timeout)
        for nc in (self._p, self._q):
            if nc is not None and nc.is_connected:
                await nc.flush(max(1, round(timeout)))

    def stats(self) -> dict[str, Any]:
        """The link's counters (they are in :meth:`Broker.stats` too)."""
        return {k: v for k, v in self._c.items() if k.startswith("cluster_")}

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -------------------------------------------------------------------------- NATS events

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError

        if isinstance(exc, SlowConsumerError):
            self._c["cluster_dropped_in"] += 1
            self.bad_log.warning(
                "NATS: slow consumer, a message on %s dropped (the loop is behind by %d bytes "
                "for that subscription, sub_pending_bytes)",
                exc.subject,
                self.sub_pending_bytes,
            )
            return
        self._last_error = str(exc) or type(exc).__name__
        if isinstance(exc, OSError | TimeoutError) and self._quiet:
            log.debug("NATS: %s", self._last_error)  # (while reconnecting: once is enough)
            return
        self._quiet = isinstance(exc, OSError | TimeoutError)
        log.warning("NATS: %s", self._last_error)

    async def _on_disconnected(self) -> None:
        if self._closed or not self._started:
            return
        self._c["cluster_disconnects"] += 1
        self._c["cluster_connected"] = sum(
            1 for nc in (self._p, self._q) if nc is not None and nc.is_connected
        )
        log.warning("NATS connection lost; reconnecting (%d bytes wait to go)", self._out_bytes)
        # Unreachable is not "behind": publishers are read again (local delivery goes on;
        # what does not fit the outgoing queue is dropped for the other brokers, counted).
        self._release_backlog()

    async def _on_p_reconnected(self) -> None:
        await self._on_reconnected(True)

    async def _on_q_reconnected(self) -> None:
        await self._on_reconnected(False)

    async def _on_reconnected(self, is_p: bool) -> None:
        self._c["cluster_reconnects"] += 1
        self._quiet = False
        self._c["cluster_connected"] = sum(
            1 for nc in (self._p, self._q) if nc is not None and nc.is_connected
        )
        nc = self._p if is_p else self._q
        where = nc.connected_url.netloc if nc is not None and nc.connected_url else "?"
        log.info("NATS connection back (%s)", where)
        self._kick_reconcile()
        if is_p:
            for pull in self._pulls.values():
                pull.outstanding = 0  # its request died with the connection
                self._pull_more(pull)
            self._kick_drain()
            # Retained changes made while we were away: ask a peer again.
            if self._sync_task is None or self._sync_task.done():
                assert self._loop is not None
                self._sync_task = self._loop.create_task(self.sync_retained())
                self._tasks.add(self._sync_task)
                self._sync_task.add_done_callback(self._tasks.discard)

    # -------------------------------------------------------------------------- outgoing

    def published(self, topic: str, payload: bytes, codec: int, retain: bool) -> None:
        """BrokerLink: a local publish (or, empty with ``retain``, a clear) goes to NATS."""
        self._publish(topic, payload, codec, retain, None)

    def publish_confirmed(
        self,
        topic: str,
        payload: bytes,
        codec: int,
        retain: bool,
        confirm: Callable[[bool, str], None],
    ) -> None:
        """DurableLink: a QoS 1 publish goes to NATS as a JetStream publish; ``confirm`` is
        called once its PubAck comes (``True, ""``), or with ``False, why`` on a negative ack,
        after ``publish_timeout`` seconds, at once while NATS is unreachable or when
        ``max_confirm_bytes`` wait already."""
        self._publish(topic, payload, codec, retain, confirm)

    def _publish(
        self,
        topic: str,
        payload: bytes,
        codec: int,
        retain: bool,
        confirm: Callable[[bool, str], None] | None,
    ) -> None:
        subject = self._subjects.get(topic)
        if subject is None:
            subject = self.map.subject(topic)
            if len(self._subjects) >= 10_000:
                self._subjects.clear()  # bounded: topics repeat, the cache refills at once
            self._subjects[topic] = subject
        headers = _HEADERS.get(codec) if codec != 1 else None
        if confirm is not None:
            self._publish_js(subject, payload, headers, confirm)
        elif payload or not retain:
            self._enqueue(subject, payload, headers)
        if retain:
            rsubject = self._retain_subjects.get(topic)
            if rsubject is None:
                rsubject = self.map.control + "retain." + subject[len(self.map.prefix) :]
                if len(self._retain_subjects) >= 10_000:
                    self._retain_subjects.clear()
                self._retain_subjects[topic] = rsubject
            self._enqueue(rsubject, payload, headers)
            if self._syncing:
                self._note_live(topic)

    def _publish_js(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        confirm: Callable[[bool, str], None],
    ) -> None:
        """One QoS 1 publish: queued with a PubAck id (the reply subject is made when it is
        sent), or refused at once (nothing goes to NATS then: the publisher is told to send it
        again, so no copy it was told is lost goes twice)."""
        c = self._c
        p = self._p
        why = ""
        if self._closed or p is None or not p.is_connected:
            why = "NATS is unreachable from this broker: the message is not kept; publish again"
        elif (len(self._confirms) + 1) * CONFIRM_OVERHEAD > self.max_confirm_bytes:
            why = (
                f"{len(self._confirms)} QoS 1 publishes already wait for JetStream "
                f"(max_confirm_bytes {self.max_confirm_bytes}); publish again shortly"
            )
        if not why:
            cid = self._confirm_id = self._confirm_id + 1
            self._confirms[cid] = (confirm, time.monotonic() + self.publish_timeout)
            if self._enqueue(subject, payload, headers, cid):
                c["cluster_js_waiting"] = len(self._confirms)
                c["cluster_js_waiting_bytes"] = len(self._confirms) * CONFIRM_OVERHEAD
                return
            del self._confirms[cid]
            why = (
                f"{self._out_bytes} bytes already wait to go to NATS (max_outgoing_bytes "
                f"{self.max_outgoing_bytes}); publish again shortly"
            )
        c["cluster_js_refused"] += 1
        confirm(False, why)

    def _confirmed(self, cid: int, ok: bool, why: str) -> None:
        entry = self._confirms.pop(cid, None)
        if entry is None:
            return  # answered already (timed out): a late PubAck
        c = self._c
        c["cluster_js_confirmed" if ok else "cluster_js_refused"] += 1
        c["cluster_js_waiting"] = len(self._confirms)
        c["cluster_js_waiting_bytes"] = len(self._confirms) * CONFIRM_OVERHEAD
        try:
            entry[0](ok, why)
        except Exception:
            log.exception("a QoS 1 publish's confirm callback failed")

    async def _on_puback(self, msg: NatsMsg) -> None:
        """JetStream's answer to a QoS 1 publish: ``{"stream":..,"seq":..}``, or
        ``{"error":{..}}``, or a 503 status (no stream took the subject)."""
        try:
            cid = int(msg.subject[len(self._reply_prefix) :])
        except ValueError:
            return
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status:
            self._confirmed(
                cid, False, f"JetStream did not take it (NATS status {status}: no stream answered)"
            )
            return
        data = msg.data
        if b'"error"' in data:
            try:
                err = json.loads(data)["error"]
                why = f"{err.get('description', err)} (JetStream error {err.get('err_code', '?')})"
            except Exception:
                why = data[:200].decode("utf-8", "replace")
            self._confirmed(cid, False, f"JetStream refused it: {why}")
            return
        self._confirmed(cid, True, "")

    def _enqueue(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, cid: int = 0
    ) -> bool:
        if self._closed:
            return False
        cost = len(subject) + len(payload) + OUTGOING_OVERHEAD
        if self._out_bytes + cost > self.max_outgoing_bytes:
            self._c["cluster_dropped_out"] += 1
            self.bad_log.warning(
                "NATS %s: %d bytes already wait to go (max_outgoing_bytes %d); a message to "
                "%s dropped",
                "unreachable" if not self.connected else "behind",
                self._out_bytes,
                self.max_outgoing_bytes,
                subject,
            )
            return False
        self._out.append((subject, payload, headers, cost, cid))
        self._out_bytes += cost
        if (
            not self.backlogged
            and self._out_bytes > self.max_outgoing_bytes // 2
            and self._p is not None
            and self._p.is_connected
        ):  # NATS is there but behind: the broker stops reading its publishers until drained
            self.backlogged = True
        c = self._c
        c["cluster_outgoing_bytes"] = self._out_bytes
        c["cluster_outgoing"] = len(self._out)
        if not self._draining:
            self._kick_drain()
        return True

    def _kick_drain(self) -> None:
        p = self._p
        if (
            self._draining
            or not (self._out or self._ctl)
            or p is None
            or not p.is_connected
            or self._closed
        ):
            return
        self._draining = True
        self._drain_task = self._spawn(self._drain())

    async def _drain(self) -> None:
        """Hand what waits to nats-py (whose flusher task writes it): JetStream control
        messages first (acks free the subscribers' windows), then the publishes in order. One
        task for a whole batch; it ends when both queues are empty or the connection is down
        (the reconnect starts it again)."""
        from nats.errors import (
            ConnectionClosedError,
            ConnectionDrainingError,
            MaxPayloadError,
            OutboundBufferLimitError,
        )

        self._draining = True
        out, ctl, c = self._out, self._ctl, self._c
        confirms = self._confirms
        n = 0
        try:
            while out or ctl:
                p = self._p
                if p is None or not p.is_connected:
                    return
                if ctl:
                    subject, payload, reply = ctl[0]
                    try:
                        await p.publish(subject, payload, reply=reply)
                    except (
                        OutboundBufferLimitError,
                        ConnectionClosedError,
                        ConnectionDrainingError,
                    ):
                        return
                    ctl.popleft()
                    self._ctl_bytes -= len(subject) + CONTROL_OVERHEAD
                else:
                    subject, payload, headers, cost, cid = out[0]
                    if cid and cid not in confirms:
                        pass  # its publisher was answered already (timed out): not sent
                    else:
                        reply = self._reply_prefix + str(cid) if cid else ""
                        try:
                            await p.publish(subject, payload, reply=reply, headers=headers)
                        except (
                            OutboundBufferLimitError,
                            ConnectionClosedError,
                            ConnectionDrainingError,
                        ):
                            return  # kept: tried again once the connection is back
                        except MaxPayloadError:
                            c["cluster_dropped_out"] += 1
                            self.bad_log.warning(
                                "NATS refuses a payload of %d bytes (its max_payload %d); a "
                                "message to %s dropped",
                                len(payload),
                                p.max_payload,
                                subject,
                            )
                            if cid:
                                self._confirmed(cid, False, "NATS refuses a payload this large")
                        else:
                            c["cluster_sent"] += 1
                    out.popleft()  # (only this task takes from the left)
                    self._out_bytes -= cost
                n += 1
                if n % 512 == 0:
                    c["cluster_outgoing_bytes"] = self._out_bytes
                    c["cluster_outgoing"] = len(out)
                    self._check_drained()
                    await asyncio.sleep(0)  # the loop's other work gets a turn
        finally:
            self._draining = False
            c["cluster_outgoing_bytes"] = self._out_bytes
            c["cluster_outgoing"] = len(out)
            self._check_drained()

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the outgoing queue is back under a quarter of its bound
        (after :attr:`backlogged` was set); at once when it is not backlogged."""
        if not self.backlogged:
            callback()
            return
        self._drained_callbacks.append(callback)

    def _check_drained(self) -> None:
        if self.backlogged and self._out_bytes <= self.max_outgoing_bytes // 4:
            self._release_backlog()

    def _release_backlog(self) -> None:
        if self.backlogged or self._drained_callbacks:
            self.backlogged = False
            callbacks, self._drained_callbacks = self._drained_callbacks, []
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    log.exception("a drained callback raised")

    # -------------------------------------------------------------------------- interest

    def interest(self, pattern: str, group: str | None, present: bool) -> None:
        """BrokerLink: the first local subscriber of (pattern, group) came, or the last went:
        subscribe or unsubscribe on NATS (in order, by one task; while a connection is down
        the change waits and is made once it is back)."""
        key = (pattern, group)
        self._dirty.pop(key, None)
        self._dirty[key] = present
        self._kick_reconcile()

    def _kick_reconcile(self) -> None:
        if self._reconciling or not self._dirty or self._closed or self._loop is None:
            return
        self._reconciling = True
        self._idle.clear()
        self._spawn(self._reconcile())

    async def _reconcile(self) -> None:
        try:
            progress = True
            while self._dirty and progress:
                progress = False
                for key, present in list(self._dirty.items()):
                    pattern, group = key
                    nc = self._p if group is None else self._q
                    if nc is None or not nc.is_connected:
                        continue  # made once this connection is back
                    if self._dirty.get(key) is not present:
                        continue  # changed meanwhile: the next pass takes it
                    del self._dirty[key]
                    progress = True
                    try:
                        await self._apply(nc, pattern, group, present)
                    except Exception as exc:
                        what = "subscribe" if present else "unsubscribe"
                        if nc.is_connected:  # refused for itself: not tried again
                            log.error("NATS %s %s failed: %r", what, pattern, exc)
                            continue
                        if key not in self._dirty:
                            self._dirty[key] = present
                        log.warning(
                            "NATS %s %s: %r (made when the connection is back)", what, pattern, exc
                        )
                        return
        finally:
            self._reconciling = False
            self._c["cluster_interest_subscriptions"] = len(self._interest)
            if not self._dirty or not self.connected:
                self._idle.set()
            if self._dirty and self.connected:
                self._kick_reconcile()

    async def _apply(self, nc: NatsClient, pattern: str, group: str | None, present: bool) -> None:
        key = (pattern, group)
        sub = self._interest.get(key)
        if present and sub is None:
            subject = self.map.subject(pattern)
            cb = self._receiver(pattern, group)
            if group is None:
                sub = await nc.subscribe(subject, cb=cb, pending_bytes_limit=self.sub_pending_bytes)
            else:
                sub = await nc.subscribe(
                    subject,
                    queue=self.map.queue(group),
                    cb=cb,
                    pending_bytes_limit=self.sub_pending_bytes,
                )
            self._interest[key] = sub
        elif not present and sub is not None:
            del self._interest[key]
            await sub.unsubscribe()
        self._c["cluster_interest_subscriptions"] = len(self._interest)

    # -------------------------------------------------------------------------- incoming

    def _receiver(self, pattern: str, group: str | None) -> Callable[[NatsMsg], Awaitable[None]]:
        topic_of = self.map.topic
        deliver = self.broker.deliver_remote
        c = self._c

        async def on_message(msg: NatsMsg) -> None:
            c["cluster_received"] += 1
            topic = topic_of(msg.subject)
            if topic is None:
                return  # the link's own subjects (under an empty prefix, '>' sees them)
            headers = msg.headers
            codec = self._codec(headers, msg.subject) if headers else 1
            if codec is None:
                return
            payload = msg.data
            if not payload and codec:
                self._bad(msg.subject, "an empty payload is a message only in the raw codec 0")
                return
            try:
                deliver(pattern, group, topic, payload, codec)
            except BrokerError as exc:
                self._bad(msg.subject, f"{exc.message} [{ErrorCode.describe(exc.code)}]")

        return on_message

    def _codec(self, headers: dict[str, str], subject: str) -> int | None:
        raw = headers.get(CODEC_HEADER)
        if raw is None:
            return 1
        try:
            codec = int(raw)
        except ValueError:
            codec = -1
        if codec not in CODECS:
            self._bad(subject, f"unknown codec {raw!r} in its {CODEC_HEADER} header")
            return None
        return codec

    def _bad(self, subject: str, why: str) -> None:
        self._c["cluster_bad_in"] += 1
        self.bad_log.warning("NATS message on %s refused: %s", subject[:300], why)

    # -------------------------------------------------------------------------- retained

    def _note_live(self, topic: str) -> None:
        """While a snapshot is being fetched: this topic changed live (the snapshot must not
        overwrite it). Bounded by the broker's max_retained topics; beyond, snapshot entries
        are taken only for topics with nothing retained here."""
        if len(self._live) < self.broker.limits.max_retained:
            self._live.add(topic)
        else:
            self._live_overflow = True

    async def _on_retain(self, msg: NatsMsg) -> None:
        """A retained message (or, empty, a clear) published at another broker."""
        self._c["cluster_retained_in"] += 1
        prefix = self.map.control + "retain."
        subject = msg.subject
        topic = self.map.topic(self.map.prefix + subject[len(prefix) :])
        if topic is None:
            self._bad(subject, "not a topic")
            return
        codec = self._codec(msg.headers, subject) if msg.headers else 1
        if codec is None:
            return
        if self._syncing:
            self._note_live(topic)
        try:
            self.broker.retain_remote(topic, msg.data, codec)
        except BrokerError as exc:
            self._bad(subject, f"{exc.message} [{ErrorCode.describe(exc.code)}]")

    async def _on_snapshot_request(self, msg: NatsMsg) -> None:
        """A peer asks for retained messages after a topic (sorted), one chunk."""
        p = self._p
        if not msg.reply or p is None:
            return
        try:
            req = msgpack.unpackb(msg.data) if msg.data else {}
            after = req.get("after")
            if after is not None and not isinstance(after, str):
                raise ValueError("'after' must be a topic")
        except Exception as exc:
            self._bad(msg.subject, f"bad snapshot request: {exc}")
            return
        retained = self.broker.retained
        topics = sorted(retained)
        start = 0 if after is None else bisect.bisect_right(topics, after)
        room = min(SNAPSHOT_CHUNK, max(p.max_payload - 1024, 1024))
        entries: list[list[Any]] = []
        used = 0
        more = False
        for topic in topics[start:]:
            topic_b, payload, codec = retained[topic]
            size = len(topic_b) + len(payload) + _SNAP_ENTRY_EXTRA
            if size > room:
                if entries:
                    more = True
                    break
                # Too big for one NATS message with the envelope: skipped (counted)
                self._c["cluster_dropped_out"] += 1
                self.bad_log.warning("retained %s too large for a snapshot chunk", topic)
                continue
            if used + size > room:
                more = True
                break
            entries.append([topic, codec, payload])
            used += size
        if not more and entries and entries[-1][0] != topics[-1]:
            more = True
        reply = msgpack.packb({"id": self.id, "entries": entries, "more": more})
        with contextlib.suppress(Exception):
            await p.publish(msg.reply, reply)

    async def sync_retained(self) -> int:
        """Fetch the retained store from a peer (one that has its own), chunk by chunk, within
        this broker's ``max_retained_bytes``; a topic that changes live meanwhile keeps its
        live value. Returns the entries taken. No peer: nothing to fetch."""
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout

        p = self._p
        if p is None or self._syncing:
            return 0
        self._syncing = True
        self._live.clear()
        self._live_overflow = False
        taken = 0
        try:
            target = self.map.control + "snap"
            after: str | None = None
            budget = self.broker.limits.max_retained_bytes
            used = 0
            while True:
                try:
                    reply = await p.request(
                        target, msgpack.packb({"after": after}), timeout=self.snapshot_timeout
                    )
                    data = msgpack.unpackb(reply.data)
                    entries = data["entries"]
                    more = bool(data["more"])
                    peer = str(data["id"])
                except NoRespondersError:
                    return taken  # no broker has a store to give: ours is the first
                except (NatsTimeout, TimeoutError):
                    log.warning("retained snapshot: no answer within %gs", self.snapshot_timeout)
                    return taken
                except Exception as exc:
                    log.warning("retained snapshot: bad answer (%s)", exc)
                    return taken
                target = self.map.control + "snap." + peer  # the rest from the same peer
                for entry in entries:
                    topic, codec, payload = entry
                    after = topic
                    if topic in self._live or (
                        self._live_overflow and topic in self.broker.retained
                    ):
                        continue
                    cost = len(payload) + 2 * len(topic.encode()) + RETAINED_OVERHEAD
                    if used + cost > budget:
                        log.warning("retained snapshot: stopped at max_retained_bytes (%d)", budget)
                        return taken
                    try:
                        self.broker.retain_remote(topic, payload, codec)
                    except BrokerError as exc:
                        self._bad(topic, f"snapshot entry: {exc.message}")
                        continue
                    used += cost
                    taken += 1
                    self._c["cluster_snapshot_entries"] += 1
                if not more or not entries:
                    return taken
        finally:
            self._syncing = False
            self._live.clear()

    # -------------------------------------------------------------------------- JetStream

    def _stream_config(self) -> Any:
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

        return StreamConfig(
            name=self.stream,
            subjects=[self.map.prefix + ">"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            max_bytes=self.stream_max_bytes,
            max_age=self.stream_max_age,
            max_msg_size=self.broker.limits.max_payload + HEADER_ROOM,
            discard=DiscardPolicy.OLD,
        )

    async def _setup_stream(self) -> None:
        """Make the stream, or check the one there: its settings must be ours (what differs
        is said, with how to fix it). While a new JetStream cluster elects its leader its API
        answers 503: asked again for up to ``connect_timeout`` seconds. Raises
        :class:`ConnectError` when the servers have no JetStream or the stream differs."""
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

        assert self._p is not None
        jsm = self._p.jsm(timeout=self.api_timeout)
        want = self._stream_config()
        deadline = time.monotonic() + max(self.connect_timeout, 2.0)
        no_js = (
            f"the NATS servers at {', '.join(self.servers)} have no JetStream (start "
            "nats-server with -js and a store directory, -sd DIR, or `jetstream {}` in its "
            "configuration; on a cluster, on every node)"
        )
        while True:
            try:
                try:
                    info = await jsm.stream_info(self.stream)
                except NotFoundError:
                    await jsm.add_stream(want)
                    log.info(
                        "JetStream stream %s made (%s>, %d replicas, %d bytes, %gs)",
                        self.stream,
                        self.map.prefix,
                        self.replicas,
                        self.stream_max_bytes,
                        self.stream_max_age,
                    )
                    return
                break
            except NoRespondersError:
                raise ConnectError(no_js) from None
            except (ServiceUnavailableError, NatsTimeout, TimeoutError) as exc:
                if isinstance(exc, APIError) and not exc.description:
                    raise ConnectError(no_js) from None  # (no responders: a 503 status)
                if time.monotonic() > deadline:
                    if isinstance(exc, APIError):
                        raise ConnectError(f"JetStream unavailable: {exc.description}") from None
                    raise ConnectError(no_js + " (or it did not answer in time)") from None
                await asyncio.sleep(0.25)  # the leader election's pace (bounded by deadline)
            except APIError as exc:
                raise ConnectError(
                    f"JetStream refused the stream {self.stream}: {exc.description} "
                    f"(error {exc.err_code})"
                ) from None
        have = info.config
        diffs = []
        for what, mine, theirs in (
            ("subjects", want.subjects, have.subjects),
            ("storage", want.storage, have.storage),
            ("retention", want.retention, have.retention),
            ("replicas (--cluster-replicas)", want.num_replicas, have.num_replicas or 1),
            ("max_bytes (--cluster-stream-bytes)", want.max_bytes, have.max_bytes),
            ("max_age (--cluster-stream-age)", want.max_age, have.max_age),
            ("max_msg_size (the broker's max_payload + 256)", want.max_msg_size, have.max_msg_size),
            ("discard", want.discard, have.discard),
        ):
            if isinstance(mine, float | int) and isinstance(theirs, float | int):
                same = abs(float(mine) - float(theirs)) < 1e-3
            else:
                same = mine == theirs
            if not same:
                diffs.append(f"{what}: {theirs!r} there, {mine!r} here")
        if diffs:
            raise ConnectError(
                f"the JetStream stream {self.stream} exists with other settings ("
                + "; ".join(diffs)
                + "): start this broker with the same options as the others, or change the "
                f"stream (`nats stream edit {self.stream}`), or delete it (its stored messages "
                "with it) to have it made again"
            )

    def _tick_period(self) -> float:
        return max(0.05, min(0.5, self.broker.limits.ack_wait / 4, self.publish_timeout / 4))

    def _tick(self) -> None:
        """Every ``_tick_period`` seconds: time out PubAcks, give up pull requests whose end
        never came, pull for durables with room, mark what the broker holds as in progress,
        try again consumers that could not be made."""
        if self._closed or self._loop is None:
            return
        self._timer = self._loop.call_later(self._tick_period(), self._tick)
        now = time.monotonic()
        confirms = self._confirms
        if confirms:
            late = []
            for cid, (_, deadline) in confirms.items():
                if deadline > now:
                    break
                late.append(cid)
            for cid in late:
                self._confirmed(
                    cid,
                    False,
                    f"JetStream did not confirm within {self.publish_timeout:g}s (the message "
                    "may or may not be kept: publish again)",
                )
        progress = now >= self._next_progress
        if progress:
            self._next_progress = now + self.broker.limits.ack_wait / 2
        connected = self._p is not None and self._p.is_connected
        for pull in list(self._closing):
            if now > pull.deadline:
                self._release(pull)
        for pull in list(self._pulls.values()):
            if not pull.ready:
                if not pull.binding and now >= pull.next_try and connected:
                    self._op("attach", pull)
                continue
            if pull.outstanding and now > pull.deadline:
                pull.outstanding = 0
            self._pull_more(pull)
            if progress and connected:
                for token in pull.d.tokens.values():
                    self._control(str(token), b"+WPI")

    def _control(self, subject: str, payload: bytes, reply: str = "") -> bool:
        """Queue a JetStream ack, nak, progress mark or pull request (bounded by
        ``max_control_bytes``: beyond it an ack is dropped and the message comes again)."""
        cost = len(subject) + CONTROL_OVERHEAD
        if self._closed or self._ctl_bytes + cost > self.max_control_bytes:
            self._c["cluster_js_control_dropped"] += 1
            self.bad_log.warning(
                "JetStream control messages behind (%d bytes wait, max_control_bytes %d): "
                "one to %s dropped",
                self._ctl_bytes,
                self.max_control_bytes,
                subject[:120],
            )
            return False
        self._ctl.append((subject, payload, reply))
        self._ctl_bytes += cost
        if not self._draining:
            self._kick_drain()
        return True

    # durable subscriptions ------------------------------------------------------------

    def durable_attach(self, d: Durable) -> None:
        """DurableLink: a subscriber attached to durable ``d`` here: bind (or make) its
        consumer and pull for it."""
        old = self._pulls.pop(d.name, None)
        if old is not None:
            self._close_pull(old)
        assert self._p is not None
        pull = _Pull(
            d,
            consumer_name(d.name),
            self.map.subject(d.pattern),
            self._p.new_inbox(),
            self.broker.wallclock(),
        )
        self._pulls[d.name] = pull
        self._c["cluster_js_durables"] = len(self._pulls)
        self._op("attach", pull)

    def durable_more(self, d: Durable) -> None:
        """DurableLink: ``d`` has room again (its subscriber acknowledged)."""
        pull = self._pulls.get(d.name)
        if pull is not None and pull.d is d:
            self._pull_more(pull)

    def durable_ack(self, d: Durable, token: object) -> None:
        """DurableLink: the subscriber acknowledged the message of ``token`` (its ack subject)."""
        if self._control(str(token), b"+ACK"):
            self._c["cluster_js_acks"] += 1

    def durable_detach(self, d: Durable, unacked: list[object]) -> None:
        """DurableLink: the subscriber went: what it did not acknowledge is given back at once
        (a nak: the next subscriber, on any broker, gets it without waiting for ack_wait), and
        this broker stops pulling for it."""
        tokens = [str(t) for t in unacked]
        pull = self._pulls.get(d.name)
        if pull is not None and pull.d is d:
            del self._pulls[d.name]
            # The naks wait for this broker's pull request to end (at most pull_expires):
            # while it is open, JetStream hands what is nak'ed straight back to it.
            self._close_pull(pull, tokens)
        else:
            self._nak(tokens)
        self._c["cluster_js_durables"] = len(self._pulls)

    def _nak(self, tokens: list[str]) -> None:
        for token in tokens:
            if self._control(token, b"-NAK"):
                self._c["cluster_js_naks"] += 1

    def durable_delete(self, d: Durable) -> None:
        """DurableLink: the subscriber unsubscribed: the consumer is deleted (for every
        broker). Not for one refused here (its name is another pattern's)."""
        if d in self._refused:
            self._refused.discard(d)
            return
        self._op("delete", consumer_name(d.name))

    def _close_pull(self, pull: _Pull, naks: list[str] | None = None) -> None:
        """Stop pulling for ``pull``; its inbox stays until its request has ended (what comes
        meanwhile is nak'ed with ``naks`` then), then goes."""
        pull.closed = True
        pull.ready = False
        pull.held.extend(naks or ())
        if pull.sub is None:
            self._nak(pull.held)
            pull.held = []
        elif not pull.outstanding:
            self._release(pull)
        else:
            self._closing.add(pull)

    def _release(self, pull: _Pull) -> None:
        self._closing.discard(pull)
        if pull.sub is not None:
            self._op("release", (pull.sub, pull.held))
            pull.sub = None
            pull.held = []

    def _op(self, what: str, arg: Any) -> None:
        if what == "attach":
            arg.binding = True
        self._ops.append((what, arg))
        if not self._ops_running and not self._closed:
            self._ops_running = True
            self._spawn(self._run_ops())

    async def _run_ops(self) -> None:
        """Consumer operations, in order (a delete before a new attach of the same name)."""
        try:
            while self._ops:
                what, arg = self._ops.popleft()
                try:
                    if what == "attach":
                        await self._bind(arg)
                    elif what == "delete":
                        await self._delete(arg)
                    else:  # release: the inbox, then the naks
                        sub, naks = arg
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                            if self._p is not None and self._p.is_connected:
                                await self._p.flush(max(1, round(self.api_timeout)))
                        self._nak(naks)
                except Exception as exc:  # said, the link goes on
                    log.warning("JetStream %s failed: %r", what, exc)
                    if what == "attach":
                        arg.binding = False
                        arg.next_try = time.monotonic() + 1.0
        finally:
            self._ops_running = False

    async def _bind(self, pull: _Pull) -> None:
        """Bind the pull to its consumer (made if new), or refuse the durable when the
        consumer of that name filters another pattern."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import BadRequestError, NotFoundError

        p = self._p
        if pull.closed or p is None:
            return
        if not p.is_connected:
            pull.binding = False  # tried again by the tick once the connection is back
            return
        jsm = p.jsm(timeout=self.api_timeout)
        lim = self.broker.limits
        try:
            try:
                info = await jsm.consumer_info(self.stream, pull.name)
            except NotFoundError:
                config = ConsumerConfig(
                    name=pull.name,
                    durable_name=pull.name,
                    description=f"sockstack durable subscription {pull.d.name[:200]}",
                    filter_subject=pull.filter,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=lim.ack_wait,
                    max_ack_pending=lim.max_inflight,
                    max_deliver=-1,
                    deliver_policy=DeliverPolicy.BY_START_TIME,
                    opt_start_time=datetime.datetime.fromtimestamp(pull.since, datetime.UTC),
                )
                try:
                    info = await jsm.add_consumer(self.stream, config)
                except BadRequestError:  # made by another broker meanwhile, maybe otherwise
                    info = await jsm.consumer_info(self.stream, pull.name)
        except Exception as exc:
            pull.binding = False
            pull.next_try = time.monotonic() + 1.0
            self.bad_log.warning(
                "JetStream consumer %s for durable subscription %r not ready (%s); tried again",
                pull.name,
                pull.d.name,
                getattr(exc, "description", None) or repr(exc),
            )
            return
        have = info.config.filter_subject or ">"
        if have != pull.filter:
            self._refuse(
                pull,
                f"durable subscription {pull.d.name!r} is on "
                f"{self.map.topic(have) or have!r} (its JetStream consumer), not "
                f"{pull.d.pattern!r}: unsubscribe it first to change its pattern",
            )
            return
        if pull.closed:
            return
        if pull.sub is None:
            pull.sub = await p.subscribe(
                pull.inbox, cb=self._puller(pull), pending_bytes_limit=self.sub_pending_bytes
            )
        if pull.closed:  # detached while subscribing
            self._op("release", (pull.sub, []))
            pull.sub = None
            return
        pull.binding = False
        pull.ready = True
        self._pull_more(pull)

    def _refuse(self, pull: _Pull, why: str) -> None:
        """The durable's name is another pattern's consumer: its subscriber is refused here
        (unsubscribed at the broker, the consumer left as it is) and its connection closed with
        the reason (BAD_TOPIC): the SUB was answered before the consumer could be read."""
        pull.binding = False
        d = pull.d
        if self._pulls.get(d.name) is pull:
            del self._pulls[d.name]
        self._close_pull(pull)
        self._c["cluster_js_durables"] = len(self._pulls)
        log.error("%s", why)
        sub = d.sub
        if sub is None:
            return
        self._refused.add(d)
        with contextlib.suppress(BrokerError):
            self.broker.unsubscribe(sub.peer, sub.sid)
        self._refused.discard(d)
        sub.peer.close_slow(ErrorCode.BAD_TOPIC, why)

    async def _delete(self, name: str) -> None:
        from nats.js.errors import NotFoundError

        p = self._p
        if p is None:
            return
        try:
            await p.jsm(timeout=self.api_timeout).delete_consumer(self.stream, name)
        except NotFoundError:
            pass

    def _pull_more(self, pull: _Pull) -> None:
        """Ask JetStream for as many messages as the broker has room for (count, and the
        durable window's bytes), when no request is out."""
        if not pull.ready or pull.closed or pull.outstanding:
            return
        p = self._p
        if p is None or not p.is_connected:
            return
        broker = self.broker
        room = broker.durable_room(pull.d)
        if room <= 0:
            return
        lim = broker.limits
        max_bytes = max(lim.durable_window - pull.d.window, lim.max_payload + HEADER_ROOM + 1024)
        request = json.dumps(
            {"batch": room, "expires": int(self.pull_expires * 1e9), "max_bytes": max_bytes}
        ).encode()
        if self._control(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{pull.name}", request, pull.inbox
        ):
            pull.outstanding = room
            pull.deadline = time.monotonic() + self.pull_expires + 1.0

    def _puller(self, pull: _Pull) -> Callable[[NatsMsg], Awaitable[None]]:
        topic_of = self.map.topic
        broker = self.broker
        c = self._c

        async def on_message(msg: NatsMsg) -> None:
            headers = msg.headers
            token = msg.reply
            if not token:  # a status: 100 (heartbeat), 404/408 (request ended), 409 ...
                status = headers.get("Status") if headers else None
                if status == "100":
                    return
                pull.outstanding = 0
                if pull.closed:
                    self._release(pull)
                    return
                desc = str(headers.get("Description", "")) if headers else ""
                if status == "503" or (status == "409" and "Deleted" in desc):
                    # The consumer is gone (unsubscribed on another broker) while a subscriber
                    # is attached here: made again by the tick, delivering from now.
                    self.bad_log.warning(
                        "JetStream consumer %s: %s %s; made again for the subscriber here",
                        pull.name,
                        status,
                        desc or "no responders",
                    )
                    pull.ready = False
                    pull.since = self.broker.wallclock()
                    pull.next_try = time.monotonic() + 1.0
                    return
                if status not in ("404", "408", "409"):
                    self.bad_log.warning(
                        "JetStream pull for %s: status %s %s", pull.name, status, desc
                    )
                    return  # (the tick pulls again)
                self._pull_more(pull)
                return
            if pull.outstanding:
                pull.outstanding -= 1
            if pull.closed:  # given back once the request has ended
                pull.held.append(token)
                if not pull.outstanding:
                    self._release(pull)
                return
            topic = topic_of(msg.subject)
            codec = 1
            if headers:
                got = self._codec(headers, msg.subject)
                if got is None:
                    self._control(token, b"+TERM")
                    return
                codec = got
            if topic is None or (not msg.data and codec):
                self._bad(msg.subject, "not a topic" if topic is None else "an empty payload")
                self._control(token, b"+TERM")
                return
            try:
                fed = broker.durable_feed(
                    pull.d, topic, msg.data, codec, token, _delivered(token) > 1
                )
            except BrokerError as exc:
                self._bad(msg.subject, f"{exc.message} [{ErrorCode.describe(exc.code)}]")
                self._control(token, b"+TERM")  # never delivered: not sent again
                return
            if fed:
                c["cluster_js_fed"] += 1
            else:
                self._control(token, b"-NAK")
                c["cluster_js_naks"] += 1
            if not pull.outstanding:
                self._pull_more(pull)

        return on_message
