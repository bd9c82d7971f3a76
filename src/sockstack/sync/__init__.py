"""Blocking adapter: plain ``socket`` calls driving the same sans-I/O core.

- :mod:`.client` — ``Client`` / ``connect()``: TCP, TLS or UDP; thread-safe, threads' calls
  pipelined on one connection.
"""
