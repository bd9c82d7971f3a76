"""RPC, the seed's main pattern: a service's methods called over TCP or UDP.

- :mod:`.service` — ``Service`` and ``@method``: the one service definition.
- :mod:`.pattern` — ``RPC(service)``: the pattern that serves it on the host.
- :mod:`.context` — ``current_context()``: the deadline, cancellation, metadata and trailers of
  the call a method serves.

The server is the pattern-neutral host (:mod:`sockstack.host`); the clients are the I/O
adapters (:mod:`sockstack.asyncio`, :mod:`sockstack.sync`).
"""
