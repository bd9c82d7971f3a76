"""The HTTP gateway: the host's services, broker and resources over HTTP (docs/HTTP.md)."""

from sockstack.gateway.pattern import Gateway, HttpLimits

__all__ = ["Gateway", "HttpLimits"]
