"""Endpoint addresses: ``tcp://127.0.0.1:5050``, ``tls://host:5443``, ``udp://[::1]:5051``, or
``host:port``."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sockstack.errors import InvalidURL

__all__ = [
    "DEFAULT_BROKER_TCP_PORT",
    "DEFAULT_BROKER_UDP_PORT",
    "DEFAULT_TCP_PORT",
    "DEFAULT_UDP_PORT",
    "SCHEMES",
    "Endpoint",
    "format_peer",
    "is_loopback_host",
    "parse_endpoint",
    "parse_endpoints",
]

SCHEMES = ("tcp", "tls", "udp")
DEFAULT_TCP_PORT = 5050  # above 5000, as the course notes advise for our own services
DEFAULT_UDP_PORT = 5051
DEFAULT_BROKER_TCP_PORT = 5052
DEFAULT_BROKER_UDP_PORT = 5053


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    @property
    def is_stream(self) -> bool:
        """TCP, with or without TLS."""
        return self.scheme != "udp"

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_endpoint(text: str, default_scheme: str | None = None) -> Endpoint:
    """Parse ``scheme://host:port`` (IPv6 hosts in brackets). ``default_scheme`` allows a bare
    ``host:port`` or ``:port``; a missing host means 127.0.0.1."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        if default_scheme is None:
            raise InvalidURL(f"{text!r}: expected scheme://host:port, e.g. tcp://127.0.0.1:5050")
        scheme, rest = default_scheme, text
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidURL(f"{text!r}: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    rest = rest.rstrip("/")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise InvalidURL(f"{text!r}: IPv6 addresses are written [addr]:port")
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise InvalidURL(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            form = f"{scheme}://HOST:PORT" if sep else "HOST:PORT"
            if rest.isdigit():  # `--tcp 5070`: a port without its host
                example = f"{scheme}://127.0.0.1:{rest}" if sep else f"127.0.0.1:{rest}"
                raise InvalidURL(f"{text!r}: missing host: expected {form}, e.g. {example}")
            example = f"{scheme}://{rest or '127.0.0.1'}:5050" if sep else f"{rest}:5050"
            raise InvalidURL(f"{text!r}: missing :port: expected {form}, e.g. {example}")
        if ":" in host:
            raise InvalidURL(f"{text!r}: write IPv6 addresses in brackets, e.g. tcp://[::1]:5050")
    host = host or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidURL(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise InvalidURL(f"{text!r}: port {port} is outside 0-65535")
    return Endpoint(scheme, host, port)


def parse_endpoints(urls: str | Sequence[str]) -> list[Endpoint]:
    """One URL, a comma-separated list, or a sequence: the servers a client may use, in order
    of preference (failover). All must share one scheme; UDP takes a single server."""
    items = [u.strip() for u in urls.split(",")] if isinstance(urls, str) else list(urls)
    eps = [parse_endpoint(u) for u in items if u]
    if not eps:
        raise InvalidURL("no server URL given")
    schemes = {e.scheme for e in eps}
    if len(schemes) > 1:
        raise InvalidURL(f"{urls!r}: mixed schemes {sorted(schemes)}; use one")
    if len(eps) > 1 and eps[0].scheme == "udp":
        raise InvalidURL(f"{urls!r}: failover lists are for TCP; a UDP client talks to one server")
    return eps


def format_peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def is_loopback_host(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, "localhost"). Other
    names are not resolved (that would need DNS): they count as reachable from the network."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
