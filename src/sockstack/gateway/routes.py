"""The gateway's routes, each from the module that owns it (one place that lists them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sockstack.gateway.pattern import Gateway


def install(gateway: Gateway) -> None:
    from sockstack.gateway import calls, dashboard, kv, openapi, ops, topics

    for module in (calls, ops, kv, topics, openapi, dashboard):
        module.install(gateway)
