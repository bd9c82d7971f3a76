"""TLS for stream endpoints: contexts with safe defaults, built from certificate files.

The standard library's ``ssl`` module does the work (OpenSSL underneath); this module only
chooses the defaults: TLS 1.2 at least, certificates verified against a CA and host names
checked on the client, optional client certificates (mutual TLS) on the server.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["client_context", "server_context", "tls_reason"]

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


def tls_reason(exc: ssl.SSLError) -> str:
    """What went wrong in a TLS handshake, in words (the verify message when there is one)."""
    detail = getattr(exc, "verify_message", None) or exc.reason or str(exc)
    return f"{exc.reason}: {detail}" if exc.reason and detail != exc.reason else str(detail)
