"""Services found by name: servers announce themselves at the remote objects' name service,
clients call ``connect("name://calc")`` and spread their calls over the live servers.

- :mod:`sockstack.discovery.announce`: :class:`Announcer`, :func:`announce` (server side);
- :mod:`sockstack.discovery.client`: :class:`ServiceClient`, :class:`AsyncServiceClient`,
  :func:`resolve` (client side);
- :mod:`sockstack.discovery.balance`: the choice of a server (sans-I/O).

Not a pattern: a layer over the patterns' clients (it uses the objects client to reach the
name service and the RPC client's calls), as :mod:`sockstack.clients` is. docs/SCALING.md.
"""

from sockstack.discovery.announce import Announcer, announce, url_of
from sockstack.discovery.balance import POLICIES
from sockstack.discovery.client import AsyncServiceClient, ServiceClient, aresolve, resolve
from sockstack.discovery.common import DEFAULT_NAMES, NAMES_ENV, names_url

__all__ = [
    "DEFAULT_NAMES",
    "NAMES_ENV",
    "POLICIES",
    "Announcer",
    "AsyncServiceClient",
    "ServiceClient",
    "announce",
    "aresolve",
    "names_url",
    "resolve",
    "url_of",
]
