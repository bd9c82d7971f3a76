"""Authentication, sans-I/O: a shared secret, checked in the TCP handshake and on every datagram.

TCP: the client puts the secret in its HELLO as extension type 1 (``EXT_TOKEN``); the server
compares it in constant time before it answers anything (:func:`token_checker`). Send it over
TLS: on plain TCP anyone who can read the traffic can read the token.

UDP has no handshake, so every datagram is authenticated on its own (:class:`DatagramAuth`):
the sender sets flag bit 1 (``FLAG_AUTH``) in the frame header and appends a 24-byte trailer,
the time it was sealed (u64, milliseconds since the Unix epoch) and the first 16 bytes of
HMAC-SHA256 over everything before the MAC, keyed with a key derived from the secret. The
receiver refuses a datagram whose MAC is wrong, whose time is more than ``window`` seconds away
from its own clock, or whose MAC it has already seen (a replay); every datagram is sealed anew
when it is sent, retransmissions included, so no two legitimate datagrams share a MAC.
Byte layout: docs/PROTOCOL.md §6.1.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from collections.abc import Callable

from sockstack.errors import ErrorCode
from sockstack.protocol.frames import (
    HEADER_SIZE,
    MAGIC,
    MessageType,
    peek_flags,
    read_header,
    with_flags,
)
from sockstack.protocol.messages import Hello

__all__ = [
    "DEFAULT_REPLAY_WINDOW",
    "EXT_TOKEN",
    "FLAG_AUTH",
    "TRAILER_SIZE",
    "AuthFailure",
    "DatagramAuth",
    "token_checker",
    "token_extension",
    "unsealed_refusal",
]

EXT_TOKEN = 1
FLAG_AUTH = 0x02
MAC_SIZE = 16
TRAILER_SIZE = 8 + MAC_SIZE
DEFAULT_REPLAY_WINDOW = 30.0
"""Seconds a sealed datagram stays valid either side of the receiver's clock (clock skew
included). A UDP call's retransmissions are sealed anew, so calls may last longer."""
DEFAULT_MAX_SEEN = 200_000
_TS = struct.Struct(">Q")
_ERROR = int(MessageType.ERROR)


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


class AuthFailure(Exception):
    """A datagram that is not authentic: ``reason`` says why (for the log, not for the peer)."""

    code = ErrorCode.UNAUTHENTICATED

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DatagramAuth:
    """Seals outgoing datagrams and opens incoming ones for one shared secret.

    ``open`` remembers the MACs it accepted for twice the window (a sealed datagram is valid for
    that long at most), up to ``max_seen`` of them: beyond that the oldest are forgotten first,
    and a replay of one of those is caught only by the time check.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        window: float = DEFAULT_REPLAY_WINDOW,
        max_seen: int = DEFAULT_MAX_SEEN,
    ) -> None:
        if not secret:
            raise ValueError("the shared secret is empty")
        self._key = hmac.new(secret, b"sockstack datagram v1", hashlib.sha256).digest()
        self.window = window
        self.max_seen = max_seen
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def _mac(self, data: bytes | memoryview) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()[:MAC_SIZE]

    def seal(self, frame: bytes, now: float) -> bytes:
        """``frame`` (one whole frame) with FLAG_AUTH set and the trailer appended; ``now`` is
        wall-clock time in seconds (``time.time()``)."""
        signed = with_flags(frame, FLAG_AUTH) + _TS.pack(int(now * 1000))
        return signed + self._mac(signed)

    def open(self, datagram: bytes, now: float, track: bool = True) -> bytes:
        """The frame inside a sealed datagram (FLAG_AUTH cleared, trailer removed), or
        :class:`AuthFailure`. ``track`` records the MAC to refuse replays (servers)."""
        n = len(datagram)
        flags = peek_flags(datagram)
        if n < HEADER_SIZE + TRAILER_SIZE or flags is None:
            raise AuthFailure("not a sealed frame")
        if not flags & FLAG_AUTH:
            raise AuthFailure("no authentication (FLAG_AUTH clear)")
        mac = datagram[n - MAC_SIZE :]
        if not hmac.compare_digest(mac, self._mac(datagram[: n - MAC_SIZE])):
            raise AuthFailure("bad MAC (wrong secret, or altered)")
        (sealed_ms,) = _TS.unpack_from(datagram, n - TRAILER_SIZE)
        skew = now - sealed_ms / 1000
        if abs(skew) > self.window:
            raise AuthFailure(f"sealed {skew:+.0f} s from now (window {self.window:g} s)")
        if track:
            seen = self._seen
            if mac in seen:
                raise AuthFailure("replayed datagram")
            forget = now - 2 * self.window
            while seen and (len(seen) >= self.max_seen or next(iter(seen.values())) < forget):
                seen.popitem(last=False)
            seen[mac] = now
        return with_flags(memoryview(datagram)[: n - TRAILER_SIZE], 0, clear=FLAG_AUTH)


def unsealed_refusal(datagram: bytes) -> bool:
    """Client side: True for the one unsealed datagram a client with a secret accepts, a
    server's ERROR UNAUTHENTICATED (the server cannot seal it for a client whose secret it
    does not share). It carries no result, so forging one can only fail a call."""
    if len(datagram) < HEADER_SIZE + 2:
        return False
    magic, _, type_, _, _, meta_len, _, _ = read_header(datagram)
    if magic != MAGIC or type_ != _ERROR:
        return False
    code = datagram[HEADER_SIZE + meta_len : HEADER_SIZE + meta_len + 2]
    return int.from_bytes(code, "big") == ErrorCode.UNAUTHENTICATED
