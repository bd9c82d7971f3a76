"""Transport adapters: move bytes between real sockets and the sans-I/O core.

- :mod:`.urls` — endpoint addresses (``tcp://host:port``, ``udp://[::1]:port``).
- :mod:`.loop` — uvloop when installed.
- :mod:`.tcp` — asyncio Protocol adapters for streams (server and client side).
- :mod:`.udp` — asyncio DatagramProtocol adapters (server and client side).
"""
