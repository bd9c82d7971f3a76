"""The HTTP gateway as a pattern: the host's services, broker and resources over HTTP/1.1.

::

    Server(Calculator(), tcp=["127.0.0.1:5050"], http=["127.0.0.1:8080"])
    Server(patterns=[RPC(Calculator()), Gateway(["127.0.0.1:8080"], cors=["https://app.example"])],
           tcp=["127.0.0.1:5050"])

It is an ASGI application (:meth:`Gateway.__call__`) served by uvicorn with httptools **inside
the host's event loop** (docs/HTTP.md says why uvicorn, measured against granian): the same
dispatcher, interceptors, deadlines, drain and secret as the TCP, TLS and UDP endpoints. Its
routes come from the other patterns' data, never from their code: ``/rpc/{method}`` from the
host's dispatcher (every ``@method``), ``/openapi.json`` from ``rpc.describe``'s data,
``/topics/...`` from the host's broker, ``/kv`` from the demo store's methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sockstack.errors import ErrorCode
from sockstack.gateway.http import HttpRequest, Route
from sockstack.gateway.problems import HttpProblem, problem_name
from sockstack.host.pattern import HostContext, Pattern
from sockstack.transport.listen import bind_all
from sockstack.transport.ratelog import RateLimitedLog
from sockstack.transport.urls import Endpoint, parse_endpoint

if TYPE_CHECKING:
    import uvicorn

    from sockstack.host.server import Server

__all__ = ["Gateway", "HttpLimits", "http_endpoint"]

log = logging.getLogger("sockstack.gateway")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The gateway's bounds (docs/HTTP.md, "Limits"); the host's ``ServerLimits`` bound the
    calls themselves (workers, drain)."""

    max_body: int = 1 << 20
    """Bytes of one request body (as the TCP ``max_frame``): more is 413, unread."""
    max_total_body: int = 64 << 20
    """Bytes of request bodies held at once over all requests; beyond it 503 OVERLOADED."""
    max_header_bytes: int = 64 << 10
    """Bytes of the request line and headers of one request: more is 431, then close."""
    header_timeout: float = 10.0
    """Seconds the head of a request may take to arrive (slowloris)."""
    body_timeout: float = 30.0
    """Seconds a body may take to arrive once its request started."""
    keep_alive: float = 5.0
    """Seconds an idle keep-alive connection stays open."""
    max_in_flight: int = 1024
    """HTTP requests being answered at once (all connections): one more is 503 OVERLOADED
    with ``Retry-After``."""
    max_connections: int = 10_000
    max_connections_per_address: int = 1_000


def http_endpoint(e: str | Endpoint) -> Endpoint:
    """``HOST:PORT``, ``http://HOST:PORT`` or ``https://HOST:PORT`` as an Endpoint."""
    if isinstance(e, Endpoint):
        return e
    scheme, sep, rest = e.partition("://")
    if not sep:
        scheme, rest = "http", e
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{e!r}: an HTTP endpoint is http://HOST:PORT or https://HOST:PORT")
    ep = parse_endpoint(rest, "tcp")
    return Endpoint(scheme, ep.host, ep.port)


class _Server:
    """uvicorn's Server that leaves SIGINT and SIGTERM to the host (made lazily: uvicorn is
    imported only by a gateway)."""

    @staticmethod
    def make(config: uvicorn.Config) -> uvicorn.Server:
        import uvicorn

        class Embedded(uvicorn.Server):
            def capture_signals(self) -> Any:
                return contextlib.nullcontext()

        return Embedded(config)


class Gateway(Pattern):
    """HTTP endpoints of the host: ``endpoints`` as ``"127.0.0.1:8080"``, ``"http://..."`` or
    ``"https://..."`` (TLS with the host's ``tls_context``). ``cors``: origins allowed to call
    from a browser (none by default; ``["*"]`` for any); ``metrics``: serve ``/metrics``
    (Prometheus; a :class:`~sockstack.metrics.ServerMetrics` interceptor is added unless the
    host has one)."""

    name = "gateway"

    def __init__(
        self,
        endpoints: Iterable[str | Endpoint],
        *,
        cors: Iterable[str] = (),
        metrics: bool = True,
        limits: HttpLimits | None = None,
    ) -> None:
        self._configured = [http_endpoint(e) for e in endpoints]
        if not self._configured:
            raise ValueError("a gateway needs at least one HTTP endpoint")
        self.limits = limits or HttpLimits()
        self.cors = frozenset(o.rstrip("/") for o in cors)
        self._metrics_wanted = metrics
        self.metrics: Any = None  # the ServerMetrics serving /metrics, once the host is made
        self.problems: Any = None  # its Counter of problem answers by code name
        self.bad_log = RateLimitedLog(log)
        self.host: Server | None = None
        self.routes: dict[str, Route] = {}
        """Routes by the first segment of the path (``"rpc"`` for ``/rpc/...``; ``""`` for
        ``/``): each pattern folder's module adds its own (:func:`sockstack.gateway.routes`)."""
        self.public: set[str] = {"healthz", "readyz"}
        """First segments answered without the secret (probes)."""
        self._bound: list[Endpoint] = []
        self._sockets: list[socket.socket] = []
        self._servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
        self._open: dict[str, int] = {}  # connections per client address
        self.open = {"http": 0, "https": 0}
        self.in_flight = 0
        self.body_bytes = 0  # bodies held now (all requests)
        self._secret: bytes | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = asyncio.Event()
        """Set when the host begins to drain: long-lived streams (events, the dashboard) end
        on it at once."""
        from sockstack.gateway import routes

        routes.install(self)

    # ---------------------------------------------------------------- the host's hooks

    def interceptors(self, given: Sequence[object]) -> Sequence[object]:
        if not self._metrics_wanted:
            return ()
        try:
            from sockstack.metrics import ServerMetrics
        except ImportError:  # prometheus-client not installed: /metrics says so
            return ()
        added: tuple[object, ...] = ()
        found = next((i for i in given if isinstance(i, ServerMetrics)), None)
        if found is None:
            found = ServerMetrics()
            added = (found,)
        self.metrics = found
        from prometheus_client import Counter

        self.problems = Counter(
            "sockstack_http_problems",
            "HTTP answers that were problem details (errors), by code name: calls that failed "
            "and requests the gateway refused before any call (401, 404, 413...)",
            ("code",),
            registry=found.registry,
        )
        return added

    def endpoints(self) -> Sequence[Endpoint]:
        return self._bound if self._bound or self.host is not None else self._configured

    def connections(self) -> Mapping[str, int]:
        return self.open

    def start(self, host: HostContext) -> None:
        self.host = server = host  # type: ignore[assignment]
        secret = host.secret
        self._secret = secret
        if any(e.scheme == "https" for e in self._configured) and host.tls_context is None:
            raise ValueError("https:// endpoints need the host's tls_context")
        # Bound now: an error (an address in use) reaches Server.start.
        self._sockets = bind_all(
            self._configured, host.limits.backlog, bool(getattr(server, "reuse_port", False))
        )
        self._bound = [
            Endpoint(ep.scheme, *sock.getsockname()[:2])
            for ep, sock in zip(self._configured, self._sockets, strict=True)
        ]
        loop = self.loop = host.loop
        assert loop is not None
        for ep, sock in zip(self._bound, self._sockets, strict=True):
            uv = _Server.make(self._config(ep.scheme == "https"))
            task = loop.create_task(uv.serve(sockets=[sock]), name=f"sockstack-http {ep}")
            self._servers.append((uv, task))

    def _config(self, tls: bool) -> uvicorn.Config:
        import uvicorn

        quiet = logging.getLogger("uvicorn.error")
        if quiet.level == logging.NOTSET:  # its "Started server process" is not ours to say
            quiet.setLevel(logging.WARNING)

        from sockstack.gateway.protocol import GatewayProtocol

        protocol = type("GatewayProtocol", (GatewayProtocol,), {"gateway": self})
        assert self.host is not None
        limits = self.host.limits
        config = uvicorn.Config(
            self,
            http=protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=int(self.limits.keep_alive) or 1,
            timeout_graceful_shutdown=int(limits.drain_timeout + limits.close_timeout) or 1,
            backlog=limits.backlog,
        )
        config.load()
        if tls:
            config.ssl = self.host.tls_context
        return config

    def drain(self) -> None:
        self.closing.set()
        for uv, _ in self._servers:
            uv.should_exit = True  # stops accepting; open connections finish what they have

    def stop(self) -> None:
        self.drain()

    async def closed(self) -> None:
        tasks = [t for _, t in self._servers]
        if tasks:
            assert self.host is not None
            limits = self.host.limits
            _, pending = await asyncio.wait(tasks, timeout=limits.close_timeout + 1.0)
            for t in pending:  # (uvicorn's own graceful timeout should have ended them)
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=limits.close_timeout)
        self._servers.clear()
        for s in self._sockets:
            s.close()
        self._sockets.clear()

    # ---------------------------------------------------------------- connections

    def admit(self, address: str, tls: bool) -> str | None:
        """Count a new connection; a reason to refuse it instead."""
        limits = self.limits
        total = self.open["http"] + self.open["https"]
        if total >= limits.max_connections:
            return f"refused: {total} HTTP connections open (limit {limits.max_connections})"
        n = self._open.get(address, 0)
        if n >= limits.max_connections_per_address:
            return (
                f"refused: {n} HTTP connections open from this address (limit "
                f"{limits.max_connections_per_address})"
            )
        self._open[address] = n + 1
        self.open["https" if tls else "http"] += 1
        return None

    def release(self, address: str, tls: bool) -> None:
        n = self._open.get(address, 0) - 1
        if n > 0:
            self._open[address] = n
        else:
            self._open.pop(address, None)
        self.open["https" if tls else "http"] -= 1

    # ---------------------------------------------------------------- the ASGI application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # (lifespan is off; no WebSocket protocol is configured)
        # (cancelled if the client leaves; given the loop: without, CPython 3.11 asks getpid())
        scope["sockstack.task"] = asyncio.current_task(self.loop)
        req = HttpRequest(self, scope, receive, send)
        path = req.path
        first, _, _ = path[1:].partition("/")
        route = self.routes.get(first)
        try:
            if self.cors:
                origin = req.header(b"origin")
                if origin is not None and self._cors(req, origin):
                    await req.respond(204, b"", None)  # a preflight
                    return
            if self._secret is not None and first not in self.public:
                self._authenticate(req)
            if route is None:
                raise HttpProblem(ErrorCode.NOT_FOUND, f"no resource at {path}")
            if first in self.public:  # the probes: answered at once, even at the bound
                await route(req)
                return
            if self.in_flight >= self.limits.max_in_flight:
                raise HttpProblem(
                    ErrorCode.OVERLOADED,
                    f"{self.in_flight} HTTP requests in flight (limit {self.limits.max_in_flight})",
                )
            self.in_flight += 1
            req.counted = True
            try:
                await route(req)
            finally:
                if req.counted:
                    self.in_flight -= 1
                self.body_bytes -= req.held
        except asyncio.CancelledError:
            if scope.get("sockstack.gone"):
                return  # the client left (GatewayProtocol.connection_lost): nobody to answer
            raise
        except HttpProblem as exc:
            if req.started:
                log.warning("%s %s: %s after the answer began", req.method, path, exc.detail)
                return
            self.bad_log.warning(
                "http %s: %s %s: %s", req.peer and req.peer[0], req.method, path, exc.detail
            )
            if self.problems is not None:
                self.problems.labels(problem_name(exc.code)).inc()
            await req.problem(exc)

    @property
    def has_secret(self) -> bool:
        return self._secret is not None

    def _authenticate(self, req: HttpRequest) -> None:
        """The host's secret as a bearer token (RFC 6750), checked before any work; also as
        ``?access_token=`` for the browser's EventSource, which cannot send headers."""
        expected = self._secret
        assert expected is not None
        given = None
        header = req.header(b"authorization")
        if header is not None:
            scheme, _, token = header.partition(b" ")
            if scheme.lower() == b"bearer":  # (a scheme is case-insensitive: RFC 9110 §11.1)
                given = token.strip(b" ")
        elif req.method == "GET":
            for k, v in req.query():
                if k == "access_token":
                    given = v.encode()
        if given is None or not hmac.compare_digest(given, expected):
            raise HttpProblem(
                ErrorCode.AUTH_FAILED,
                "missing or wrong credentials: send Authorization: Bearer <the server's secret>",
            )

    def _cors(self, req: HttpRequest, origin: bytes) -> bool:
        """Add CORS headers for an allowed origin; answer a preflight (True when answered)."""
        text = origin.decode("latin-1")
        if "*" not in self.cors and text not in self.cors:
            return False
        req.cors = [
            (b"access-control-allow-origin", b"*" if "*" in self.cors else origin),
            (b"vary", b"Origin"),
            (b"access-control-expose-headers", b"etag, retry-after, sockstack-trailer-*"),
        ]
        if req.method != "OPTIONS" or req.header(b"access-control-request-method") is None:
            return False
        asked = req.header(b"access-control-request-headers") or b""
        req.cors += [
            (b"access-control-allow-methods", b"GET, HEAD, POST, PUT, DELETE"),
            (b"access-control-allow-headers", asked),
            (b"access-control-max-age", b"600"),
        ]
        return True
