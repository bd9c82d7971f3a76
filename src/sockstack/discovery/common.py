"""Where the name service is, and what a service URL looks like."""

from __future__ import annotations

import os

from sockstack.errors import InvalidURL

__all__ = ["DEFAULT_NAMES", "NAMES_ENV", "SCHEME", "names_url", "service_of"]

SCHEME = "name://"
NAMES_ENV = "SOCKSTACK_NAMES"
"""The environment variable naming the name service when ``names=`` is not given."""
DEFAULT_NAMES = "tcp://127.0.0.1:5055"
"""The name service's default address (``sockstack names serve`` listens there)."""


def names_url(names: str | None = None) -> str:
    """The name service's URL: ``names``, else ``$SOCKSTACK_NAMES``, else
    ``tcp://127.0.0.1:5055``; ``HOST:PORT`` means ``tcp://HOST:PORT``."""
    url = names or os.environ.get(NAMES_ENV) or DEFAULT_NAMES
    url = url.strip()
    if "://" not in url:
        url = "tcp://" + url
    return url


def service_of(url: str) -> str:
    """The service name of ``name://NAME`` (InvalidURL for anything else)."""
    if not url.startswith(SCHEME):
        raise InvalidURL(f"expected name://SERVICE, got {url!r}")
    name = url[len(SCHEME) :]
    if not name or "/" in name or len(name.encode()) > 255:
        raise InvalidURL(f"expected name://SERVICE (1-255 bytes, no '/'), got {url!r}")
    return name
