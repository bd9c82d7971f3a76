"""Prometheus metrics of a server, as an interceptor (``pip install 'sockstack[metrics]'``)::

    from sockstack.metrics import ServerMetrics

    metrics = ServerMetrics()
    server = Server(Calculator(), tcp=["127.0.0.1:5050"], interceptors=[metrics])
    http, _ = metrics.serve("127.0.0.1", 9464)   # GET http://127.0.0.1:9464/metrics

``sockstack serve --metrics HOST:PORT`` does the same. What it exports (per ``transport``:
``tcp``, ``tls``, ``udp``):

- ``sockstack_server_calls_total{transport,method}``: RPC calls answered (successes and errors);
- ``sockstack_server_errors_total{transport,method,code}``: those answered with an ERROR, by
  code name (``APPLICATION_ERROR``, ``REFUSED``...);
- ``sockstack_server_call_seconds{transport,method}``: a histogram of the time from dispatch
  to outcome (the method and the interceptors after this one);
- ``sockstack_server_received_bytes_total{transport}``, ``..._sent_bytes_total{transport}``:
  protocol bytes read and written (TLS: before encryption; calls, pub/sub and handshakes alike);
- ``sockstack_server_open_connections{transport}``: stream connections open now (``http``
  too: the gateway's);
- publish/subscribe, when the server has a broker: ``sockstack_broker_published_total``,
  ``..._delivered_total``, ``..._dropped_total``, ``..._redelivered_total``,
  ``..._expired_total``, ``..._slow_consumers_disconnected_total``,
  ``..._retained_refused_total``, and the gauges ``sockstack_broker_held_bytes`` and
  ``sockstack_broker_retained_bytes``.
- what the patterns report (``Pattern.report_metrics``): an edge relay's ``sockstack_edge_*``
  (backlog rows and bytes, the oldest row's age, readings in and out, bad, dropped, lost,
  forwarded, quarantined; docs/EDGE.md), a sink's ``sockstack_sink_*``.

Label cardinality is bounded by the server, never by its clients: ``method`` is one of the
methods the server serves (a remote object's methods, ``Counter.incr``, once one succeeded),
and every other name a client sends (each an UNKNOWN_METHOD) counts as
``method="(unknown)"``, so a client calling random names cannot grow the series without
bound (each series costs memory in this process and in Prometheus, for ever). ``code`` is a
name from the protocol's finite list. Bytes and connections are per transport only.

Scrapes run in the HTTP server's thread; the counters of a call are updated on the event loop
by the hooks (a few microseconds per call). Bytes are counted only on a server given this
interceptor (``Server.count_traffic``): other servers pay nothing.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sockstack.errors import ErrorCode
from sockstack.interceptors import Failure, ServerInterceptor

if TYPE_CHECKING:
    from sockstack.host.server import Server
    from sockstack.rpc.context import CallContext

__all__ = ["UNKNOWN_METHOD_LABEL", "ServerMetrics"]

UNKNOWN_METHOD_LABEL = "(unknown)"
"""The ``method`` label of calls to a name the server does not serve."""
DEFAULT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_clock = time.perf_counter


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(int(code))


class ServerMetrics(ServerInterceptor):
    """A server interceptor that counts calls, errors, latency, bytes and connections in a
    Prometheus registry: its own ``CollectorRegistry`` unless given one (pass
    ``prometheus_client.REGISTRY`` to export them with the process's other metrics)."""

    name = "metrics"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._servers: list[Server] = []
        self._known: frozenset[str] = frozenset()
        labels = ("transport", "method")
        # Calls and their latency: plain counters per (transport, method), updated on the loop
        # with no lock, turned into Prometheus families when scraped (_CallsCollector): a
        # prometheus_client Counter and Histogram took three locks per call (~1.5 us, 10 % of
        # a call over HTTP).
        self._bounds = tuple(sorted(float(b) for b in buckets))
        self.calls = _CallsCollector(self, histogram=False)
        self.latency = _CallsCollector(self, histogram=True)
        self.registry.register(self.calls)
        self.registry.register(self.latency)
        self.errors = Counter(
            "sockstack_server_errors",
            "RPC calls answered with an ERROR, by code name",
            (*labels, "code"),
            registry=self.registry,
        )
        self.registry.register(_HostCollector(self._servers))
        # (transport, method) -> its counts; bounded as the labels are.
        self._series: dict[tuple[str, str], _Series] = {}

    def bind(self, server: Server) -> None:
        """Given to a server: count its traffic, know its methods."""
        self._servers.append(server)
        server.count_traffic()
        self._known = self._known | frozenset(server.dispatcher.handlers)

    def _method(self, ctx: CallContext) -> str:
        return ctx.method if ctx.method in self._known else UNKNOWN_METHOD_LABEL

    def before(self, ctx: CallContext) -> None:
        ctx.state["metrics"] = _clock()

    def after(self, ctx: CallContext, result: Any) -> None:
        method = ctx.method
        if method not in self._known:
            # A call that succeeded ran a method the server defines: a pattern's own target
            # (a remote object's "Counter.incr"), not a name a client made up. Known from now
            # on; bounded by the server's code, never by its clients.
            self._known = self._known | {method}
        self._done(ctx, method)

    def error(self, ctx: CallContext, failure: Failure) -> None:
        method = self._method(ctx)
        self.errors.labels(ctx.transport, method, _code_name(failure.code)).inc()
        self._done(ctx, method)

    def _done(self, ctx: CallContext, method: str) -> None:
        key = (ctx.transport, method)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(len(self._bounds) + 1)
        series.count += 1
        started = ctx.state.get("metrics")
        if started is not None:  # None: an interceptor before this one refused the call
            took = _clock() - started
            series.sum += took
            series.buckets[bisect_left(self._bounds, took)] += 1  # (le: first bound >= took)

    def serve(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0: any free port; the bound one is
        ``server.server_port``) from a daemon thread: prometheus_client's own server, so a
        scrape never runs on the event loop. Stop it with ``server.shutdown()``. It has no
        authentication: bind it to loopback or a private interface."""
        return start_http_server(port, addr=host, registry=self.registry)


class _Series:
    """One (transport, method)'s calls: how many, their total seconds, and how many fell in
    each latency bucket (not cumulative; the last is +Inf)."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self, n: int) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * n


class _CallsCollector(Collector):
    """``sockstack_server_calls_total`` or ``sockstack_server_call_seconds`` (a histogram),
    read from the plain counters when scraped (in the scraping thread: ints and floats read
    under the GIL; a scrape may see a call counted and not yet timed, never a torn value)."""

    def __init__(self, metrics: ServerMetrics, *, histogram: bool) -> None:
        self._metrics = metrics
        self._histogram = histogram

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        labels = ["transport", "method"]
        series = sorted(m._series.items())
        if not self._histogram:
            calls = CounterMetricFamily(
                "sockstack_server_calls", "RPC calls answered, successes and errors", labels=labels
            )
            for key, s in series:
                calls.add_metric(list(key), s.count)
            yield calls
            return
        hist = HistogramMetricFamily(
            "sockstack_server_call_seconds",
            "Seconds from dispatch to the call's outcome",
            labels=labels,
        )
        bounds = [*(floatToGoString(b) for b in m._bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for key, s in series:
            running = 0
            cumulative = []
            for bound, n in zip(bounds, list(s.buckets), strict=True):
                running += n
                cumulative.append((bound, running))
            hist.add_metric(list(key), cumulative, s.sum)
        yield hist


class _HostCollector(Collector):
    """Bytes and open connections, read from the servers when scraped (in the HTTP thread)."""

    def __init__(self, servers: list[Server]) -> None:
        self._servers = servers

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "sockstack_server_received_bytes",
            "Protocol bytes received (TLS: after decryption)",
            labels=["transport"],
        )
        sent = CounterMetricFamily(
            "sockstack_server_sent_bytes",
            "Protocol bytes sent (TLS: before encryption)",
            labels=["transport"],
        )
        opened = GaugeMetricFamily(
            "sockstack_server_open_connections",
            "Stream connections open now",
            labels=["transport"],
        )
        totals: dict[str, list[int]] = {}
        connections: dict[str, int] = {}
        for server in tuple(self._servers):
            for kind, (n_in, n_out) in (server.traffic or {}).items():
                t = totals.setdefault(kind, [0, 0])
                t[0] += n_in
                t[1] += n_out
            for kind, n in server.open_connections().items():
                connections[kind] = connections.get(kind, 0) + n
        for kind, (n_in, n_out) in sorted(totals.items()):
            received.add_metric([kind], n_in)
            sent.add_metric([kind], n_out)
        for kind, n in sorted(connections.items()):
            opened.add_metric([kind], n)
        yield received
        yield sent
        yield opened
        yield from _broker_families(self._servers)
        yield from _pattern_families(self._servers)


def _pattern_families(servers: list[Server]) -> Iterator[Metric]:
    """What the patterns report of themselves (``Pattern.report_metrics``: an edge relay's backlog,
    a sink's rows...), summed over the servers by name."""
    kinds: dict[str, tuple[str, str]] = {}
    values: dict[str, float] = {}
    for server in tuple(servers):
        for pattern in server.patterns:
            for name, kind, text, value in pattern.report_metrics():
                kinds.setdefault(name, (kind, text))
                values[name] = values.get(name, 0.0) + value
    for name, (kind, text) in sorted(kinds.items()):
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = cls(name.removesuffix("_total") if kind == "counter" else name, text)
        family.add_metric([], values[name])
        yield family


_BROKER_COUNTERS = {
    "published": "Messages published to the broker (every transport)",
    "delivered": "Deliveries to subscribers (one per subscriber a message reached)",
    "dropped": "Messages dropped for slow subscribers (policies drop-oldest, drop-newest)",
    "redelivered": "QoS 1 messages sent again (no ACK in time, or after a reconnect)",
    "expired": "Messages that expired before they could be delivered",
    "slow_consumers_disconnected": "Subscribers cut off under the disconnect policy",
    "retained_refused": "Retained publishes refused for want of room in the retained store",
}


def _broker_families(servers: list[Server]) -> Iterator[Metric]:
    """Publish/subscribe: the broker's counters and what it holds (summed over the servers
    bound; read without iterating the broker's tables: a scrape may run in another thread)."""
    brokers = [b for b in (s.broker for s in tuple(servers)) if b is not None]
    if not brokers:
        return
    for key, text in _BROKER_COUNTERS.items():
        family = CounterMetricFamily(f"sockstack_broker_{key}", text)
        family.add_metric([], sum(int(dict(b.counters).get(key, 0)) for b in brokers))
        yield family
    held = GaugeMetricFamily(
        "sockstack_broker_held_bytes",
        "Bytes the broker holds for subscribers (queued and awaiting ACK), as bounded",
    )
    held.add_metric([], sum(int(b.held_total) for b in brokers))
    yield held
    retained = GaugeMetricFamily("sockstack_broker_retained_bytes", "Bytes of retained messages")
    retained.add_metric([], sum(int(b.retained_bytes) for b in brokers))
    yield retained
