"""Client/server request-response (the seed's main pattern) on the protocol core.

- :mod:`.service` — ``Service`` and ``@method``: the one service definition.
- :mod:`.dispatch` — request -> outcome: lookup, argument check, thread pool or loop.
- :mod:`.server` — ``Server``: a service on TCP and UDP endpoints, graceful drain.
- :mod:`.client` — ``AsyncClient`` (asyncio), TCP with reconnect, UDP with retries.
- :mod:`.blocking` — ``connect()``: the blocking client, plain sockets on the same core.
"""
