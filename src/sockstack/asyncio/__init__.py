"""asyncio adapters: real sockets driving the sans-I/O core.

- :mod:`.stream` — ``StreamProtocol``: one TCP/TLS connection <-> one session core.
- :mod:`.datagram` — ``DatagramEndpoint``: one UDP socket <-> a datagram core.
- :mod:`.client` — ``AsyncClient``: calls over TCP (pipelined, reconnecting) or UDP.
"""
