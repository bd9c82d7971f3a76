"""Blocking adapter: plain ``socket`` calls driving the same sans-I/O core.

- :mod:`.client` — ``Client`` / ``connect()``: one call at a time, TCP or UDP.
"""
