"""Which server of a service takes the next call: the members, their state, the policies.

Sans-I/O (no sockets, no threads, no clock: times are arguments), shared by the blocking and
the asyncio clients of :mod:`sockstack.discovery.client`, which hold one connection per member
(``Member.conn``) and call these methods under their lock (blocking) or on their loop.

A member is *new* (listed, never connected), *up* (connected: calls go to it) or *down*
(set aside: it failed to connect, or its connection was lost; tried again after a backoff).
Only up members are picked:

- ``least`` (the default): the fewest calls in flight for its weight (``in_flight / weight``);
  among equals, the next one after the last picked (round-robin), so an idle client spreads
  its calls evenly too.
- ``round_robin``: in turn, smooth weighted (nginx's: a member of weight 3 takes 3 calls of
  every 4 beside one of weight 1, spread out, not in a burst).

A member's weight is its ``weight`` meta (an integer 1-1000 as text; 1 when absent or bad).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sockstack.protocol.calls import Backoff
from sockstack.transport.urls import parse_endpoint

__all__ = ["MAX_MEMBERS", "POLICIES", "Balancer", "Member"]

POLICIES = ("least", "round_robin")
MAX_MEMBERS = 256
"""Servers one client keeps (a listing beyond is cut: the first ones announced stay)."""
_MAX_WEIGHT = 1000
_SCHEMES = ("tcp://", "tls://")


def weight_of(meta: Mapping[str, str]) -> int:
    """The ``weight`` meta as an integer in 1..1000 (1 when absent or not a number)."""
    text = meta.get("weight")
    if not isinstance(text, str) or not text.isdigit():
        return 1
    return max(1, min(_MAX_WEIGHT, int(text)))


@dataclass(eq=False, slots=True)
class Member:
    """One server of the service, as this client sees it."""

    url: str
    meta: dict[str, str]
    weight: int = 1
    state: str = "new"
    """"new", "up" or "down"."""
    in_flight: int = 0
    calls: int = 0
    """Calls (and pings) started on it, for figures and tests."""
    failures: int = 0
    """Failures in a row (the backoff's attempt); 0 once connected."""
    retry_at: float = 0.0
    """While down: when it may be tried again."""
    connecting: bool = False
    listed: bool = True
    """False once the name service no longer lists it: never picked again; its connection is
    closed once its calls in flight have ended."""
    current: float = 0.0  # smooth weighted round-robin
    conn: Any = field(default=None, repr=False)
    """The I/O side's client for this server (None until it first connected)."""

    def view(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "in_flight": self.in_flight,
            "calls": self.calls,
            "weight": self.weight,
            "meta": dict(self.meta),
        }


class Balancer:
    """The members of one service and the choice among them."""

    def __init__(
        self,
        policy: str = "least",
        backoff: Backoff | None = None,
        match: Mapping[str, str] | None = None,
        max_members: int = MAX_MEMBERS,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: one of {', '.join(POLICIES)}, not {policy!r}")
        self.policy = policy
        self.backoff = backoff or Backoff(initial=0.25, factor=2.0, max_delay=5.0)
        self.match = dict(match or {})
        self.max_members = max_members
        self.members: dict[str, Member] = {}
        self._next = 0  # least: where the scan for ties starts

    # ------------------------------------------------------------------ the listing

    def update(
        self, listing: Iterable[Mapping[str, Any]], keep_unlisted: bool = False
    ) -> tuple[list[Member], list[Member]]:
        """Take the name service's listing (``[{"url", "meta"}]``): members added, and members
        removed (no longer listed; their connections are the caller's to close once idle).
        ``keep_unlisted``: add only (the name service lost its entries and the servers have
        not announced again yet). Entries that are not ``tcp://``/``tls://``, or do not carry
        ``match``'s meta, are left out; so is anything past ``max_members``."""
        seen: dict[str, dict[str, str]] = {}
        for entry in listing:
            url = entry.get("url") if isinstance(entry, Mapping) else None
            meta = entry.get("meta") if isinstance(entry, Mapping) else None
            if not isinstance(url, str) or not url.startswith(_SCHEMES) or url in seen:
                continue
            try:
                parse_endpoint(url)  # (announced by anyone: one a client cannot use is left out)
            except ValueError:
                continue
            meta = (
                {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}
                if isinstance(meta, Mapping)
                else {}
            )
            if any(meta.get(k) != v for k, v in self.match.items()):
                continue
            if len(seen) >= self.max_members:
                break
            seen[url] = meta
        added = []
        for url, meta in seen.items():
            member = self.members.get(url)
            if member is None:
                if len(self.members) >= self.max_members:
                    continue
                member = self.members[url] = Member(url, meta, weight_of(meta))
                added.append(member)
            else:
                member.meta, member.weight = meta, weight_of(meta)
        removed = []
        if not keep_unlisted:
            for url in [u for u in self.members if u not in seen]:
                member = self.members.pop(url)
                member.listed = False
                removed.append(member)
        return added, removed

    def remove_all(self) -> list[Member]:
        members = list(self.members.values())
        self.members.clear()
        for m in members:
            m.listed = False
        return members

    # ------------------------------------------------------------------ choosing

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Member | None:
        """The up member the next call goes to (None when none is up)."""
        up = [m for m in self.members.values() if m.state == "up" and m.url not in exclude]
        if not up:
            return None
        if self.policy == "round_robin":
            total = 0
            best = up[0]
            for m in up:
                m.current += m.weight
                total += m.weight
                if m.current > best.current:
                    best = m
            best.current -= total
            return best
        n = len(up)
        start = self._next % n
        best, best_load, best_at = up[start], up[start].in_flight / up[start].weight, start
        for i in range(1, n):
            at = (start + i) % n
            m = up[at]
            load = m.in_flight / m.weight
            if load < best_load:
                best, best_load, best_at = m, load, at
        self._next = best_at + 1
        return best

    def connectable(
        self, now: float, exclude: set[str] | frozenset[str] = frozenset(), due_only: bool = True
    ) -> list[Member]:
        """Members to connect now: new ones, then down ones whose backoff has passed (all down
        ones, soonest first, with ``due_only=False``: when nothing else is left to try)."""
        free = [
            m
            for m in self.members.values()
            if not m.connecting and m.url not in exclude and m.state != "up"
        ]
        new = [m for m in free if m.state == "new"]
        down = sorted((m for m in free if m.state == "down"), key=lambda m: m.retry_at)
        if due_only:
            down = [m for m in down if m.retry_at <= now]
        return new + down

    def next_retry(self) -> float | None:
        """When the first down member may be tried again (None: none is down)."""
        times = [
            m.retry_at for m in self.members.values() if m.state == "down" and not m.connecting
        ]
        return min(times) if times else None

    def any_connecting(self, exclude: set[str] | frozenset[str] = frozenset()) -> bool:
        return any(m.connecting and m.url not in exclude for m in self.members.values())

    # ------------------------------------------------------------------ what happened

    def connected(self, m: Member) -> None:
        m.state, m.failures, m.connecting = "up", 0, False

    def failed(self, m: Member, now: float) -> None:
        """Set ``m`` aside: tried again after the backoff (longer after each failure)."""
        m.state, m.connecting = "down", False
        m.retry_at = now + self.backoff.delay(min(m.failures, 30))
        m.failures += 1

    def begin(self, m: Member) -> None:
        m.in_flight += 1
        m.calls += 1

    def end(self, m: Member) -> bool:
        """A call on ``m`` ended: True when its connection is now to be closed (unlisted, idle)."""
        m.in_flight -= 1
        return not m.listed and m.in_flight == 0 and not m.connecting
