"""What every I/O adapter shares, below the protocol: addresses, TLS, the event loop.

- :mod:`.urls` — endpoint addresses (``tcp://host:port``, ``udp://[::1]:port``).
- :mod:`.tls` — TLS contexts (verification on, TLS 1.2 minimum).
- :mod:`.loop` — uvloop when installed.
- :mod:`.memory` — malloc tuning for many connections.
- :mod:`.ratelog` — rate-limited logging of bad input.
"""
