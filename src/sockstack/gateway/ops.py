"""Operations: ``/healthz`` (the process answers), ``/readyz`` (it serves: not while it drains)
and ``/metrics`` (Prometheus text: every pattern and transport, from the host's
:class:`~sockstack.metrics.ServerMetrics`). The probes answer without the secret."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sockstack.errors import ErrorCode
from sockstack.gateway.http import HttpRequest, not_allowed
from sockstack.gateway.problems import HttpProblem

if TYPE_CHECKING:
    from sockstack.gateway.pattern import Gateway

_GET = ("GET", "HEAD")


def _only_get(req: HttpRequest, path: str) -> None:
    """The route answers GET and HEAD of ``path`` alone."""
    if req.method not in _GET:
        raise not_allowed(req, _GET)
    if req.path != path:
        raise HttpProblem(ErrorCode.NOT_FOUND, f"no resource at {req.path}")


def install(gateway: Gateway) -> None:
    async def healthz(req: HttpRequest) -> None:
        _only_get(req, "/healthz")
        await req.json({"status": "ok"})

    async def readyz(req: HttpRequest) -> None:
        _only_get(req, "/readyz")
        host = gateway.host
        if host is None or host.draining:
            raise HttpProblem(ErrorCode.SHUTTING_DOWN, "the server is draining")
        await req.json({"status": "ready"})

    async def metrics(req: HttpRequest) -> None:
        _only_get(req, "/metrics")
        m = gateway.metrics
        if m is None:
            raise HttpProblem(
                ErrorCode.NOT_FOUND,
                "metrics are off (Gateway(metrics=False), or prometheus-client is not installed)",
            )
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        await req.respond(200, generate_latest(m.registry), CONTENT_TYPE_LATEST.encode())

    gateway.routes["healthz"] = healthz
    gateway.routes["readyz"] = readyz
    gateway.routes["metrics"] = metrics
