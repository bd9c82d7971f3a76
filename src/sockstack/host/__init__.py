"""The host: one server that every pattern plugs into.

- :mod:`.pattern` — ``Pattern``: what a pattern adds (message types, methods, hooks).
- :mod:`.server` — ``Server``: endpoints, handshake and auth, limits, backpressure, drain.
- :mod:`.dispatch` — ``Dispatcher``: REQUEST -> method, for every pattern's methods.
- :mod:`.workers` — ``--workers N``: N host processes on the same ports.
"""
