"""Authentication, sans-I/O: a shared secret, checked in the TCP handshake and on every datagram.

TCP: the client puts the secret in its HELLO as extension type 1 (``EXT_TOKEN``); the server
compares it in constant time before it answers anything (:func:`token_checker`). Send it over
TLS: on plain TCP anyone who can read the traffic can read the token.

UDP has no handshake, so every datagram is authenticated on its own (:class:`DatagramAuth`):
the sender sets flag bit 1 (``FLAG_AUTH``) in the frame header and appends a 32-byte trailer,
the server's **epoch** (8 bytes), the time it was sealed (u64, milliseconds since the Unix epoch)
and the first 16 bytes of HMAC-SHA256 over everything before the MAC, keyed with a key derived
from the secret. Byte layout: docs/PROTOCOL.md §6.1.

Replays. A server's replay guard (the MACs it accepted) lives in its memory, so it must never
meet a datagram that another guard may have accepted. Each server draws a random epoch when it
starts (each ``--workers`` process its own) and accepts only datagrams sealed for that epoch:
a datagram captured on its way to one process is refused by every other one (a restarted
server, another worker, another server holding the same secret), and the process it was for
refuses a second copy for as long as the copy could pass the time check. A client learns the
epoch from the server: a datagram sealed for another epoch (or for none: ``NO_EPOCH``, what a
client sends before it knows one) is refused with a *sealed* ERROR UNAUTHENTICATED that
carries the server's epoch and, in its time field, the refused datagram's own time, so the
client knows exactly which of its datagrams was refused and may send it again, sealed for the
right epoch (:func:`refusal_of`). A copy of a datagram already accepted (a replay, or the
network's duplicate) gets the same sealed refusal, naming the epoch the client sealed for: the
client then knows the copy was refused, not its call. PING is accepted under any epoch (it runs
nothing, and its PONG, as long as the PING, tells the epoch): it is how a client learns the
epoch before sending what gets no answer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from heapq import heappop, heappush

from sockstack.errors import ErrorCode, RemoteProtocolError
from sockstack.protocol.frames import (
    HEADER_SIZE,
    MAGIC,
    MessageType,
    pack_header,
    peek_flags,
    read_header,
    with_flags,
)
from sockstack.protocol.messages import Hello

__all__ = [
    "DEFAULT_REPLAY_WINDOW",
    "EPOCH_SIZE",
    "EXT_TOKEN",
    "FLAG_AUTH",
    "KEY_LABEL",
    "NO_EPOCH",
    "REFUSAL_SIZE",
    "TRAILER_SIZE",
    "AuthFailure",
    "DatagramAuth",
    "EpochMismatch",
    "refusal_of",
    "token_checker",
    "token_extension",
    "trailer_of",
    "unsealed_refusal",
]

EXT_TOKEN = 1
FLAG_AUTH = 0x02
MAC_SIZE = 16
EPOCH_SIZE = 8
TRAILER_SIZE = EPOCH_SIZE + 8 + MAC_SIZE
NO_EPOCH = bytes(EPOCH_SIZE)
"""The epoch a client seals with before it knows the server's: no server accepts it."""
REFUSAL_SIZE = HEADER_SIZE + 2 + TRAILER_SIZE
"""Bytes of the sealed ERROR UNAUTHENTICATED that tells a client the server's epoch (50): it is
sent only in answer to a datagram at least that long."""
KEY_LABEL = b"sockstack datagram v2"
DEFAULT_REPLAY_WINDOW = 30.0
"""Seconds a sealed datagram stays valid either side of the receiver's clock (clock skew
included). A UDP call's retransmissions are sealed anew, so calls may last longer."""
DEFAULT_MAX_SEEN = 200_000
_TRAILER = struct.Struct(">8sQ")  # epoch, time (ms)
_CODE = struct.Struct(">H")
_ERROR = int(MessageType.ERROR)
_PING = int(MessageType.PING)
_TYPE_OFFSET = 3


def token_extension(secret: bytes) -> tuple[int, bytes]:
    """The HELLO extension that carries ``secret``. A HELLO is at most 4,096 bytes
    (docs/PROTOCOL.md §5.1): a longer secret is refused by the server (CLOSE FRAME_TOO_LARGE)."""
    return (EXT_TOKEN, secret)


def token_checker(secret: bytes) -> Callable[[Hello], bool]:
    """A HELLO check for :class:`~sockstack.protocol.connection.Connection`'s ``authenticate``:
    True when the HELLO carries exactly one token extension, equal to ``secret``.

    The session calls it first, before versions and limits are looked at; what it reads is
    bounded by the HELLO's limits (4,096 bytes, 16 extensions, checked before decoding). Both
    sides are hashed to 32 bytes and compared with ``hmac.compare_digest``, so the time taken
    depends neither on where the tokens differ nor on the secret's length."""
    want = hashlib.sha256(secret).digest()

    def check(hello: Hello) -> bool:
        tokens = [v for t, v in hello.extensions if t == EXT_TOKEN]
        given = hashlib.sha256(tokens[0] if tokens else b"").digest()
        ok = hmac.compare_digest(given, want)  # computed even without a token: same work
        return ok and len(tokens) == 1

    return check


class AuthFailure(RemoteProtocolError):
    """A datagram that is not authentic (code UNAUTHENTICATED): ``reason`` says why (for the
    log, not for the peer).
    ``answer``, when set, is the sealed refusal to send back (an authentic datagram sealed for
    another epoch, or a copy of one already accepted): it names the server's epoch and the
    refused datagram's time, and is never longer than the datagram it answers."""

    code = ErrorCode.UNAUTHENTICATED

    def __init__(self, reason: str, answer: bytes | None = None) -> None:
        super().__init__(reason, ErrorCode.UNAUTHENTICATED)
        self.reason = reason
        self.answer = answer


class EpochMismatch(AuthFailure):
    """An authentic, fresh datagram sealed for another epoch (or none): what every new client
    sends first, and every client first after the server restarted. Routine, unlike the other
    failures; ``answer`` tells the client the epoch (when it fits)."""


def new_epoch() -> bytes:
    """A random epoch (never ``NO_EPOCH``)."""
    while True:
        epoch = os.urandom(EPOCH_SIZE)
        if epoch != NO_EPOCH:
            return epoch


class DatagramAuth:
    """Seals outgoing datagrams and opens incoming ones for one shared secret.

    ``epoch`` is the server epoch this side seals for: a server's own, drawn at random when not
    given (so every server object, and every process, has its own); a client passes
    ``NO_EPOCH`` and sets :attr:`epoch` to what the server tells it.

    Server side (``open(..., track=True)``): a datagram is accepted only when sealed for this
    epoch (PING excepted), within ``window`` seconds of the clock, and not accepted before.
    The guard remembers each accepted MAC until the datagram's own time is more than a window
    in the past (from then on the time check refuses it), at most ``max_seen`` of them; when
    it must forget one early (the oldest by time of sealing), it raises a floor and refuses
    every datagram sealed at or before the floor instead, so a forgotten datagram is never
    accepted again, whatever the load and even if the clock steps back.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        window: float = DEFAULT_REPLAY_WINDOW,
        max_seen: int = DEFAULT_MAX_SEEN,
        epoch: bytes | None = None,
    ) -> None:
        if not secret:
            raise ValueError("the shared secret is empty")
        if epoch is not None and len(epoch) != EPOCH_SIZE:
            raise ValueError(f"an epoch is {EPOCH_SIZE} bytes, not {len(epoch)}")
        key = hmac.new(secret, KEY_LABEL, hashlib.sha256).digest()
        # HMAC (RFC 2104) from SHA-256 states keyed once: a MAC is then two copies, two
        # updates and two digests, ~2.5x faster than hmac.digest(), which keys anew each time.
        block = key.ljust(hashlib.sha256().block_size, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
        self.window = window
        self.max_seen = max_seen
        self.epoch: bytes = new_epoch() if epoch is None else bytes(epoch)
        self._seen: set[bytes] = set()
        self._by_time: list[tuple[int, bytes]] = []  # (time of sealing in ms, MAC), a heap
        self.floor_ms = -1
        """Datagrams sealed at or before this time (ms) are refused: the guard forgot MACs
        up to it (-1: it forgot none)."""

    def _mac(self, data: bytes | memoryview) -> bytes:
        """HMAC-SHA256(key, data), its first 16 bytes."""
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:MAC_SIZE]

    def seal(self, frame: bytes, now: float, epoch: bytes | None = None) -> bytes:
        """``frame`` (one whole frame) with FLAG_AUTH set and the trailer appended; ``now`` is
        wall-clock time in seconds (``time.time()``); ``epoch`` defaults to :attr:`epoch`."""
        return self.seal_ms(frame, int(now * 1000), epoch)

    def seal_ms(self, frame: bytes | memoryview, ms: int, epoch: bytes | None = None) -> bytes:
        """:meth:`seal` with the time in milliseconds, as it goes on the wire."""
        signed = with_flags(frame, FLAG_AUTH) + _TRAILER.pack(
            self.epoch if epoch is None else epoch, ms
        )
        return signed + self._mac(signed)

    def open(self, datagram: bytes, now: float, track: bool = True) -> bytes:
        """The frame inside a sealed datagram (FLAG_AUTH cleared, trailer removed), or
        :class:`AuthFailure`. ``track`` (servers): refuse a datagram sealed for another epoch
        and replays, and remember the MAC. Without it (clients) any epoch is accepted: use
        :func:`trailer_of` to read which."""
        n = len(datagram)
        flags = peek_flags(datagram)
        if n < HEADER_SIZE + TRAILER_SIZE or flags is None:
            raise AuthFailure("not a sealed frame")
        if not flags & FLAG_AUTH:
            raise AuthFailure("no authentication (FLAG_AUTH clear)")
        mac = datagram[n - MAC_SIZE :]
        if not hmac.compare_digest(mac, self._mac(datagram[: n - MAC_SIZE])):
            raise AuthFailure("bad MAC (wrong secret, or altered)")
        epoch, sealed_ms = _TRAILER.unpack_from(datagram, n - TRAILER_SIZE)
        skew = now - sealed_ms / 1000
        if abs(skew) > self.window:
            raise AuthFailure(f"sealed {skew:+.0f} s from now (window {self.window:g} s)")
        if track:
            if epoch != self.epoch and datagram[_TYPE_OFFSET] != _PING:
                raise EpochMismatch(
                    "sealed for another server epoch "
                    + ("(none yet)" if epoch == NO_EPOCH else f"({epoch.hex()})")
                    + f", not this server's ({self.epoch.hex()})",
                    self._refusal(datagram, sealed_ms),
                )
            self._remember(bytes(mac), sealed_ms, now, datagram)
        return with_flags(memoryview(datagram)[: n - TRAILER_SIZE], 0, clear=FLAG_AUTH)

    def _remember(self, mac: bytes, sealed_ms: int, now: float, datagram: bytes) -> None:
        """Refuse a replay (or a datagram the guard may have forgotten), else remember it."""
        if sealed_ms <= self.floor_ms:
            raise AuthFailure(
                "sealed no later than datagrams the replay guard has forgotten (it remembers "
                f"{self.max_seen} at most): refused, as it could be a replay"
            )
        seen = self._seen
        if mac in seen:
            # Sealed, so that a client whose datagram the network duplicated knows the refusal
            # is of the copy (its epoch is the call's): the call's own answer is on its way.
            named = datagram[8:12] != b"\0\0\0\0"
            raise AuthFailure(
                "replayed datagram", self._refusal(datagram, sealed_ms) if named else None
            )
        by_time = self._by_time
        window = self.window
        # Forget what the time check refuses from now on (its time more than a window ago),
        # then the oldest by time of sealing while full; the floor covers all forgotten.
        while by_time and (now - by_time[0][0] / 1000 > window or len(seen) >= self.max_seen):
            ms, old = heappop(by_time)
            seen.discard(old)
            if ms > self.floor_ms:
                self.floor_ms = ms
        seen.add(mac)
        heappush(by_time, (sealed_ms, mac))

    def _refusal(self, datagram: bytes, sealed_ms: int) -> bytes | None:
        """The sealed ERROR UNAUTHENTICATED answering an authentic ``datagram``: this server's
        epoch in the trailer and, in the time field, the refused datagram's time, which tells
        the client which of its datagrams was refused. None when it would be longer than
        ``datagram``."""
        if len(datagram) < REFUSAL_SIZE:
            return None
        (rid,) = struct.unpack_from(">I", datagram, 8)
        frame = pack_header(_ERROR, FLAG_AUTH, 0, 0, rid, 2) + _CODE.pack(ErrorCode.UNAUTHENTICATED)
        signed = frame + _TRAILER.pack(self.epoch, sealed_ms)
        return signed + self._mac(signed)


def trailer_of(datagram: bytes | memoryview) -> tuple[bytes, int]:
    """(epoch, time in ms) of a sealed datagram (read, not checked: open it first)."""
    epoch, ms = _TRAILER.unpack_from(datagram, len(datagram) - TRAILER_SIZE)
    return bytes(epoch), ms


def refusal_of(datagram: bytes | memoryview, frame: bytes | memoryview) -> tuple[bytes, int] | None:
    """Client side, for a datagram that opened to ``frame``: when it is a sealed ERROR
    UNAUTHENTICATED with no type or message (the server refused a datagram sealed for another
    epoch), the server's epoch and the time (ms) of the refused datagram; else None."""
    if (
        len(frame) != HEADER_SIZE + 2
        or frame[_TYPE_OFFSET] != _ERROR
        or not unsealed_refusal(frame)
    ):
        return None
    return trailer_of(datagram)


def unsealed_refusal(datagram: bytes | memoryview) -> bool:
    """True for an ERROR UNAUTHENTICATED frame. Client side: the one unsealed datagram a
    client with a secret accepts (the server cannot seal it for a client whose secret it does
    not share). It carries no result, so forging one can only fail a call."""
    if len(datagram) < HEADER_SIZE + 2:
        return False
    magic, _, type_, _, _, meta_len, _, _ = read_header(datagram)
    if magic != MAGIC or type_ != _ERROR:
        return False
    code = datagram[HEADER_SIZE + meta_len : HEADER_SIZE + meta_len + 2]
    return int.from_bytes(code, "big") == ErrorCode.UNAUTHENTICATED
