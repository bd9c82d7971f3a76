"""TLS for stream endpoints: contexts with safe defaults, built from certificate files.

The standard library's ``ssl`` module does the work (OpenSSL underneath); this module only
chooses the defaults: TLS 1.2 at least, certificates verified against a CA and host names
checked on the client, optional client certificates (mutual TLS) on the server.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from sockstack.errors import ErrorCode

__all__ = [
    "client_context",
    "handshake_failure",
    "handshake_lost",
    "server_context",
    "tls_reason",
]

PathLike = str | Path


def server_context(
    cert: PathLike, key: PathLike | None = None, *, client_ca: PathLike | None = None
) -> ssl.SSLContext:
    """A server context presenting ``cert`` (PEM, with its chain) and ``key``. With
    ``client_ca``, clients must present a certificate signed by that CA (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca))
    return ctx


def client_context(
    ca: PathLike | None = None,
    *,
    cert: PathLike | None = None,
    key: PathLike | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client context verifying the server against ``ca`` (PEM), or against the system's
    trusted CAs when None. ``cert``/``key`` present a client certificate (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


# What an OpenSSL reason most likely means for a sockstack client, said in words next to it
# (the reason itself stays in the message: it is what one searches for).
_NOT_TLS = "the server does not speak TLS (a plain tcp:// port?)"
_NO_VERSION = "no TLS version in common (sockstack needs TLS 1.2 or newer)"
_LOST = (
    "the server closed the connection during the TLS handshake: it may not speak TLS (a plain "
    "tcp:// port?), or it refused this client (a client certificate missing or not trusted?)"
)
_HINTS = {
    # Bytes that are not a TLS record: a plain sockstack server answers a ClientHello with a
    # CLOSE frame ("SK..."), which OpenSSL reads as a record of an unknown version.
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "RECORD_LAYER_FAILURE": _NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": _NOT_TLS,
    "UNKNOWN_PROTOCOL": _NOT_TLS,
    "HTTP_REQUEST": _NOT_TLS,
    "UNEXPECTED_EOF_WHILE_READING": _LOST,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "the server requires a client certificate (mutual TLS): pass one (cert=, --cert)"
    ),
    "SSLV3_ALERT_HANDSHAKE_FAILURE": (
        "the server refused the handshake: it may require a client certificate (mutual TLS), "
        "or share no TLS version or cipher with this client"
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server refused the client certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the server refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server refused the client certificate (expired)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server refused the client certificate (revoked)",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the CA of the client certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "the server refused this client",
    "TLSV1_ALERT_PROTOCOL_VERSION": _NO_VERSION,
    "UNSUPPORTED_PROTOCOL": _NO_VERSION,
}


def tls_reason(exc: ssl.SSLError) -> str:
    """What went wrong in a TLS handshake, in words: OpenSSL's reason, then the verify message
    when there is one, or what the reason most likely means (e.g. ``WRONG_VERSION_NUMBER: the
    server does not speak TLS``)."""
    reason = exc.reason
    if reason is None and isinstance(exc, ssl.SSLEOFError):
        reason = "UNEXPECTED_EOF_WHILE_READING"
    detail = getattr(exc, "verify_message", None) or _HINTS.get(reason or "") or reason or str(exc)
    return f"{reason}: {detail}" if reason and detail != reason else str(detail)


def handshake_lost(exc: OSError) -> str:
    """What a connection reset or closed during the TLS handshake, without a TLS alert, most
    likely means (asyncio raises a bare ``ConnectionResetError`` then)."""
    detail = exc.strerror or str(exc)
    return f"TLS: {_LOST}" + (f" ({detail})" if detail else "")


def handshake_failure(code: int | None, reason: str, by_peer: bool, *, tls: bool) -> str:
    """Why a new connection ended before the server's WELCOME, in words, for a
    :class:`~sockstack.errors.ConnectError` (no call was sent on it).

    ``code`` is the CLOSE code (None when the stream ended without CLOSE), ``by_peer`` whether
    the server sent it, ``tls`` whether the connection is TLS. A sockstack server answers every
    HELLO it refuses with a CLOSE and a code, so a connection that ends without one most likely
    met a different kind of server: a TLS port for a plain client (an asyncio TLS server drops
    a plain client without a byte), or, after a TLS handshake, a server that wanted a client
    certificate (TLS 1.3 checks it after the client's handshake has completed)."""
    if code is None:
        if tls:
            return (
                "the server closed the connection after the TLS handshake without answering "
                "HELLO: it most likely requires a client certificate (mutual TLS) and got none, "
                "or does not trust the one sent"
            )
        return (
            "the server closed the connection without answering HELLO: it most likely expects "
            "TLS (use a tls:// URL), or is not a sockstack server"
        )
    if by_peer:
        return f"refused: {reason} [{ErrorCode.describe(code)}]"
    hint = "is it a sockstack server?"
    if not tls:
        hint += " If it expects TLS, use a tls:// URL"
    return f"the server's answer is not sockstack ({reason}): {hint}"
