"""What the I/O adapters share: addresses, TLS, the event loop, the clients' settings.

- :mod:`.urls` — endpoint addresses (``tcp://host:port``, ``udp://[::1]:port``).
- :mod:`.tls` — TLS contexts (verification on, TLS 1.2 minimum).
- :mod:`.loop` — uvloop when installed.
- :mod:`.settings` — the options and defaults both clients share.
- :mod:`.memory` — malloc tuning for many connections.
- :mod:`.ratelog` — rate-limited logging of bad input.
"""
