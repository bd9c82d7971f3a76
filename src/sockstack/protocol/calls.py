"""A client's calls, sans-I/O: request ids, deadlines, matching answers, failover and backoff.

Both clients (:mod:`sockstack.asyncio.client`, :mod:`sockstack.sync.client`) keep their calls
here and differ only in how they wait: the asyncio client parks a future in each
:class:`PendingCall` (its ``waiter``), the blocking client's threads each wait on a
:class:`PendingCall` of their own (a subclass), settled by the thread reading the socket.
Time is an argument (``now``), never read.

- :class:`Calls` — the calls in flight on one connection or socket: ids that never collide with
  a call still waiting, a deadline per call, and answers matched *by request id* only, so a
  late answer to a call that timed out is never taken for the next call's.
- :class:`OneCall` — the same rules for a caller with one call out at a time, without the
  table (the blocking client used it before its threads' calls were pipelined).
- :func:`outcome` — RESPONSE -> result, ERROR -> :class:`RemoteError`, PONG -> None.

An ERROR with code UNKNOWN_DELIVERY is never an answer: it refuses an ACK (publish/subscribe),
whose id is a delivery id the broker chose, not one of our request ids (PROTOCOL.md §4.1; this
broker sends it with request id 0, an older one with the delivery id). No call ends on it.
- :class:`Failover` — the order in which a client tries its servers.
- :class:`Backoff` — jittered exponential delays between reconnect attempts.
- :func:`plan_call` — what a call sends beside its arguments (PROTOCOL.md §4): its timeout
  (shortened to the deadline of the served call it is made from, :data:`CURRENT_CALL`), the
  budget of the DEADLINE flag and the METADATA map, each only to a server that announced it.
- :class:`Reply` — a result with the server's trailers (``with_metadata=True``).
- :class:`ItemStream` — a streamed call's items on the client (PROTOCOL.md §4): queued in
  order, counted against the flow-control window, and the CREDIT to grant as they are consumed.
- :class:`ItemUpload` — an upload's items from the client (PROTOCOL.md §4.4): the bytes sent
  and not granted back by the server's CREDIT, which say when the next ITEM may go.

Deadlines and cancel in a client (both flavours do the same)::

    timeout, budget, metadata = plan_call(timeout, features, defaults, metadata, time.monotonic())
    core.send_request(rid, method, args, kwargs, codec, budget_ms=budget, metadata=metadata)
    ...                              # the call gave up (cancelled, timed out, interrupted):
    core.send_cancel(rid)            # a stream's Connection: only if the server announced CANCEL
"""

from __future__ import annotations

import heapq
import os
import random
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from threading import get_ident
from typing import Any, Generic, Protocol, TypeVar

from sockstack.errors import (
    CallTimeout,
    ConnectError,
    ErrorCode,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    typed_error,
)
from sockstack.protocol.events import Error, Item, Metadata, Pong, Response
from sockstack.protocol.messages import (
    FEATURE_DEADLINE,
    FEATURE_METADATA,
    FEATURES,
    MAX_BATCH_CALLS,
    MAX_BUDGET_MS,
    STREAM_WINDOW,
    check_metadata,
)

__all__ = [
    "CURRENT_CALL",
    "DEFAULT_WINDOW",
    "FEATURES",
    "INLINE_CALLS",
    "MAX_WINDOW",
    "Answer",
    "Backoff",
    "Calls",
    "Failover",
    "HeldCall",
    "ItemStream",
    "ItemUpload",
    "OneCall",
    "PendingCall",
    "Reply",
    "ServedCall",
    "batch_answers",
    "batch_plan",
    "budget_ms",
    "deadline_passed",
    "inherited_timeout",
    "merge_metadata",
    "outcome",
    "plan_call",
    "remote_error",
    "served_call",
]

W = TypeVar("W")
E = TypeVar("E")
Answer = Response | Error | Pong
"""The messages that end a call."""

_MAX_ID = 0xFFFFFFFF
_DEADLINE_EXCEEDED = int(ErrorCode.DEADLINE_EXCEEDED)
_NOT_AN_ANSWER = int(ErrorCode.UNKNOWN_DELIVERY)  # refuses an ACK, answers no request


def _not_an_answer(ev: Answer) -> bool:
    return type(ev) is Error and ev.code == _NOT_AN_ANSWER


class ServedCall(Protocol):
    """What a client needs of the call being served when it makes a call of its own."""

    @property
    def deadline(self) -> float | None:
        """The served call's deadline, in ``time.monotonic()`` seconds (None: no deadline)."""
        ...


CURRENT_CALL: ContextVar[ServedCall | None] = ContextVar("sockstack_current_call", default=None)
"""The call a server is running in this context (set by the host around each method it runs in
a task or a thread; a :class:`sockstack.CallContext`), None elsewhere. A call made with a
sockstack client from inside it inherits its deadline (:func:`inherited_timeout`). Read it with
:func:`served_call`, which also sees an inline method's call (:data:`INLINE_CALLS`)."""


class HeldCall(ServedCall, Protocol):
    """A thread's holder of the inline call being served there (:data:`INLINE_CALLS`)."""

    @property
    def request(self) -> object | None:
        """The request being served; None between calls."""
        ...


INLINE_CALLS: dict[int, HeldCall] = {}
"""Per thread (``threading.get_ident()``) that runs a host's event loop, the holder of the call
an inline method is running there (its ``request`` None between calls). The host fills it in
place around each inline call instead of setting :data:`CURRENT_CALL` (a context variable set
and reset, and an object made, per call cost more than an inline echo's whole dispatch:
PERFORMANCE.md §14); only code on that thread while the method runs sees it (a task or thread
the method starts does not)."""


def served_call() -> ServedCall | None:
    """The call being served where this runs: :data:`CURRENT_CALL`, else the inline call the
    host runs on this thread at this moment (:data:`INLINE_CALLS`); None outside a served
    call."""
    served = CURRENT_CALL.get()
    if served is None and INLINE_CALLS:
        held = INLINE_CALLS.get(get_ident())
        if held is not None and held.request is not None:
            return held
    return served


@dataclass(frozen=True, slots=True)
class Reply:
    """A call's result with the server's trailers (the RESPONSE's metadata; empty when the
    server sent none). What ``request(..., with_metadata=True)`` returns."""

    result: Any
    metadata: Mapping[str, str | bytes] = field(default_factory=dict)


def inherited_timeout(timeout: float, now: float) -> float:
    """``timeout``, shortened to the time left of the served call this code runs in (if any):
    a nested call never outlives the call it serves. ``now``: ``time.monotonic()``."""
    served = served_call()
    if served is not None:
        deadline = served.deadline
        if deadline is not None and deadline - now < timeout:
            return max(deadline - now, 0.0)
    return timeout


def budget_ms(remaining: float) -> int:
    """The DEADLINE budget for ``remaining`` seconds: whole milliseconds, rounded down (a
    budget never promises more time than the caller has), 0..2^32-1."""
    if remaining <= 0:
        return 0
    if remaining >= MAX_BUDGET_MS / 1000:  # math.inf too: no deadline worth sending is longer
        return MAX_BUDGET_MS
    return int(remaining * 1000)


def merge_metadata(
    defaults: Mapping[str, str | bytes] | None, metadata: Mapping[str, str | bytes] | None
) -> Metadata | None:
    """The metadata a call sends: the client's defaults, overridden key by key by the call's
    own; None when both are empty. Raises :class:`LocalProtocolError` (code DECODE_ERROR, what
    the server would answer) naming what breaks the rules, before anything is sent."""
    if not metadata:
        merged = defaults or None
    elif not defaults:
        merged = metadata
    else:
        merged = {**defaults, **metadata}
    if merged:
        problem = check_metadata(merged)
        if problem is not None:
            raise LocalProtocolError(problem, ErrorCode.DECODE_ERROR)
    return merged or None


def plan_call(
    timeout: float,
    features: int,
    defaults: Mapping[str, str | bytes] | None,
    metadata: Mapping[str, str | bytes] | None,
    now: float,
) -> tuple[float, int | None, Metadata | None]:
    """(timeout, budget_ms or None, metadata or None) for a call about to be sent to a server
    that announced ``features`` (its WELCOME's extension 2; :data:`FEATURES` over UDP, where
    there is no WELCOME). The timeout is shortened to the served call's deadline
    (:func:`inherited_timeout`); the budget is the whole timeout (send it at once; a request
    sent later sends ``budget_ms(deadline - now)``); metadata is dropped for a server that
    does not read it. ``now``: ``time.monotonic()``."""
    if CURRENT_CALL.get() is not None or INLINE_CALLS:
        timeout = inherited_timeout(timeout, now)
    budget = budget_ms(timeout) if features & FEATURE_DEADLINE else None
    md = None
    if defaults or metadata:
        md = merge_metadata(defaults, metadata)
        if not features & FEATURE_METADATA:
            md = None
    return timeout, budget, md


_rng = random.Random()
if hasattr(os, "register_at_fork"):  # a forked child jitters apart from its parent
    os.register_at_fork(after_in_child=_rng.seed)
_jitter = _rng.uniform
"""A generator of our own: the module ``random``'s shared state is the application's (a
reconnect in a client's thread must not move it under a program, or a test, that seeded it)."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``initial * factor**attempt`` capped at ``max_delay``, each scaled by a
    random factor in [0.5, 1] so that many clients do not reconnect in lockstep."""

    initial: float = 0.05
    factor: float = 2.0
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.initial * self.factor**attempt, self.max_delay) * _jitter(0.5, 1.0)


def remote_error(ev: Error) -> BaseException:
    """The exception an ERROR answer raises in the caller: :class:`RemoteError`, or the class
    this process registered under its type name (:func:`sockstack.errors.typed_error`)."""
    return typed_error(
        RemoteError(ev.type or ErrorCode.describe(ev.code), ev.message, ev.code, ev.metadata)
    )


DEFAULT_WINDOW = 1000
"""Calls of a ``call_many`` in flight at once, by default."""
MAX_WINDOW = 65536


def batch_plan(window: int) -> tuple[int, int]:
    """For ``call_many``'s ``window`` (calls in flight at most): the calls per BATCH request
    (half the window: two requests in flight, so that the server runs one while the client
    reads the answer to the other and sends the next) and the calls in flight at or below
    which the client sends more (half the window: one request's worth answered). Measured
    against a quarter and a third of the window, and against refills at three quarters:
    this pair was the fastest (docs/PERFORMANCE.md §18). Raises ValueError for a window out of
    range."""
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"window {window} is not in 1..{MAX_WINDOW}")
    return max(1, min(MAX_BATCH_CALLS, window // 2)), window // 2


def batch_answers(
    value: Any, count: int, method: str, timeout: float
) -> tuple[list[Any], dict[int, BaseException]]:
    """A BATCH RESPONSE's body ``[results, errors]`` (PROTOCOL.md §4.7) for ``count`` calls:
    the results by position, and the exception of each call that failed, by its index (as its
    own ERROR answer would raise: DEADLINE_EXCEEDED as the call's timeout). Raises
    :class:`RemoteProtocolError` for a body that is not the answer to ``count`` calls."""
    if not (
        type(value) is list
        and len(value) == 2
        and type(value[0]) is list
        and len(value[0]) == count
        and type(value[1]) is list
    ):
        raise RemoteProtocolError(
            f"the answer to a batch of {count} calls is not [results, errors] (§4.7)",
            ErrorCode.DECODE_ERROR,
        )
    results, errors = value
    failed: dict[int, BaseException] = {}
    for entry in errors:
        if not (
            type(entry) is list
            and len(entry) == 4
            and type(entry[0]) is int
            and 0 <= entry[0] < count
            and type(entry[1]) is int
            and type(entry[2]) is str
            and type(entry[3]) is str
        ):
            raise RemoteProtocolError(
                f"a batch's error entry is not [index, code, name, message]: {entry!r:.100}",
                ErrorCode.DECODE_ERROR,
            )
        i, code, name, message = entry
        if code == _DEADLINE_EXCEEDED:
            failed[i] = deadline_passed(method, timeout)
        else:
            failed[i] = remote_error(Error(0, code, name, message))
    return results, failed


def deadline_passed(method: str, timeout: float) -> CallTimeout:
    """What a call fails with when the server answered DEADLINE_EXCEEDED to the deadline it
    carried: its timeout passed, as when the client's own clock says so first (the two end
    within a millisecond or so of each other: the server counts the budget from the request's
    arrival, rounded down to a millisecond), so the caller sees one error for both, in both
    clients."""
    return CallTimeout(method, timeout, "the server stopped it at its deadline: it did not finish")


def outcome(ev: Answer) -> tuple[bool, Any]:
    """``(True, result)`` for a RESPONSE (None for a PONG), ``(False, RemoteError)`` for ERROR."""
    if type(ev) is Response:
        return True, ev.result
    if type(ev) is Error:
        return False, remote_error(ev)
    return True, None


class PendingCall(Generic[W]):
    """One call waiting for its answer. ``waiter`` is the adapter's (a future, or None)."""

    __slots__ = ("deadline", "method", "request_id", "timeout", "waiter")

    def __init__(
        self, request_id: int, method: str, timeout: float, deadline: float, waiter: W
    ) -> None:
        self.request_id = request_id
        self.method = method
        self.timeout = timeout
        self.deadline = deadline
        self.waiter = waiter

    def expired(self, detail: str = "") -> CallTimeout:
        return CallTimeout(self.method, self.timeout, detail)


class Calls(Generic[W]):
    """The calls in flight on one connection (or UDP socket)."""

    __slots__ = ("_deadlines", "_last_id", "pending")

    def __init__(self, first_id: int = 1) -> None:
        """``first_id``: where ids start (UDP clients start at a random point, so that a
        restarted client on a reused port never meets its predecessor's answers in the
        server's reply cache)."""
        if not 1 <= first_id <= _MAX_ID:
            raise ValueError(f"first_id {first_id} is not a request id (1..{_MAX_ID})")
        self.pending: dict[int, PendingCall[W]] = {}
        self._last_id = first_id - 1
        # (deadline, id) of every call, the earliest first; entries of calls answered meanwhile
        # are skipped when they come up (cheaper than removing them from the heap).
        self._deadlines: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self.pending)

    def new_id(self) -> int:
        """The next request id, 1..2^32-1, never one of a call still waiting."""
        rid = self._last_id
        pending = self.pending
        while True:
            rid = rid % _MAX_ID + 1
            if rid not in pending:
                self._last_id = rid
                return rid

    def start(
        self,
        method: str,
        timeout: float,
        now: float,
        waiter: W,
        request_id: int = 0,
        *,
        timed: bool = True,
    ) -> PendingCall[W]:
        """Register a call (with a fresh id unless ``request_id`` is given); its deadline is
        ``now + timeout``. ``timed=False``: the caller enforces the deadline itself (a blocking
        read with a timeout), so :meth:`expire` need not track it."""
        rid = request_id or self.new_id()
        deadline = now + timeout
        pending = self.pending
        call = pending[rid] = PendingCall(rid, method, timeout, deadline, waiter)
        if timed:
            heap = self._deadlines
            heapq.heappush(heap, (deadline, rid))
            if len(heap) > 2 * len(pending) + 64:
                self._compact()
        return call

    def _compact(self) -> None:
        """Drop the heap entries of calls answered meanwhile: the heap stays within about twice
        the calls waiting, whatever the rate of calls and their timeouts."""
        pending = self.pending
        self._deadlines = [
            (d, rid) for d, rid in self._deadlines if (c := pending.get(rid)) and c.deadline == d
        ]
        heapq.heapify(self._deadlines)

    def take(self, ev: Answer) -> PendingCall[W] | None:
        """The call ``ev`` answers, now no longer pending; None for an answer to no call waiting
        (a duplicate, or one that came after the call's deadline), or for an ERROR that answers
        no call (UNKNOWN_DELIVERY): ignore it."""
        if type(ev) is Error and ev.code == _NOT_AN_ANSWER:
            return None
        return self.pending.pop(ev.request_id, None)

    def answers(self, ev: Answer, request_id: int) -> bool:
        """True when ``ev`` answers the call ``request_id`` (which is then no longer pending).
        An answer to another id is consumed as :meth:`take` does, and is not this call's."""
        if _not_an_answer(ev):
            return False
        call = self.pending.pop(ev.request_id, None)
        return call is not None and call.request_id == request_id

    def settle(self, events: Sequence[Any], request_id: int) -> tuple[bool, Any] | None:
        """For a caller waiting on ``request_id`` alone: the outcome if ``events`` hold its
        answer, else None. Answers to other ids are matched (and dropped) as :meth:`take` does."""
        found: tuple[bool, Any] | None = None
        for ev in events:
            if type(ev) is Response or type(ev) is Error or type(ev) is Pong:
                if _not_an_answer(ev):
                    continue
                call = self.pending.pop(ev.request_id, None)
                if call is not None and call.request_id == request_id:
                    found = outcome(ev)
        return found

    def forget(self, request_id: int) -> PendingCall[W] | None:
        """Drop a call the caller gave up on (cancelled, or its deadline passed)."""
        call = self.pending.pop(request_id, None)
        if not self.pending:
            self._deadlines.clear()
        return call

    def next_deadline(self) -> float | None:
        """The earliest deadline of a call still waiting, or None."""
        heap, pending = self._deadlines, self.pending
        while heap:
            deadline, rid = heap[0]
            call = pending.get(rid)
            if call is not None and call.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def expire(self, now: float) -> list[PendingCall[W]]:
        """The calls whose deadline has passed at ``now``, removed: fail each with
        :meth:`PendingCall.expired`."""
        heap, pending = self._deadlines, self.pending
        out: list[PendingCall[W]] = []
        while heap and heap[0][0] <= now:
            deadline, rid = heapq.heappop(heap)
            call = pending.get(rid)
            if call is not None and call.deadline == deadline:
                del pending[rid]
                out.append(call)
        if not pending:
            heap.clear()
        return out

    def drain(self) -> list[PendingCall[W]]:
        """Every call still waiting, removed (the connection is gone: fail them all)."""
        calls = list(self.pending.values())
        self.pending.clear()
        self._deadlines.clear()
        return calls


class OneCall:
    """Ids and matching for a caller with one call out at a time (the blocking client): the
    same rules as :class:`Calls` (ids 1..2^32-1; an answer is a call's only by its request id,
    so a late answer to a call that timed out never reaches the next), without a table."""

    __slots__ = ("_last_id", "current")

    def __init__(self, first_id: int = 1) -> None:
        if not 1 <= first_id <= _MAX_ID:
            raise ValueError(f"first_id {first_id} is not a request id (1..{_MAX_ID})")
        self._last_id = first_id - 1
        self.current = 0
        """The id of the call waiting (0: none)."""

    def begin(self, request_id: int = 0) -> int:
        """Start the call (with the next id unless ``request_id`` is given); returns its id."""
        if not request_id:
            request_id = self._last_id = self._last_id % _MAX_ID + 1
        self.current = request_id
        return request_id

    def answers(self, ev: Answer) -> bool:
        """True when ``ev`` answers the call waiting (which then ends)."""
        if ev.request_id == self.current != 0:
            if type(ev) is Error and ev.code == _NOT_AN_ANSWER:
                return False
            self.current = 0
            return True
        return False

    def settle(self, events: Sequence[Any]) -> tuple[bool, Any] | None:
        """The outcome of the call waiting if ``events`` hold its answer, else None."""
        for ev in events:
            if (type(ev) is Response or type(ev) is Error or type(ev) is Pong) and self.answers(ev):
                return outcome(ev)
        return None

    def end(self) -> None:
        """The caller stopped waiting (answered, failed or timed out): a later answer to that
        id is not any call's."""
        self.current = 0


class Failover(Generic[E]):
    """The servers a client may use, in the order it tries them: the one it used last first,
    then the others in list order. It stays on whichever answered."""

    __slots__ = ("endpoints", "index")

    def __init__(self, endpoints: Sequence[E]) -> None:
        if not endpoints:
            raise ValueError("no endpoint to connect to")
        self.endpoints = list(endpoints)
        self.index = 0

    @property
    def current(self) -> E:
        return self.endpoints[self.index]

    def attempts(self) -> Iterator[tuple[int, E]]:
        """(index, endpoint) to try, in order; call :meth:`connected` with the one that worked."""
        n = len(self.endpoints)
        for i in range(n):
            index = (self.index + i) % n
            yield index, self.endpoints[index]

    def connected(self, index: int) -> E | None:
        """Record the server that answered; returns the one it fails over *from*, if any."""
        previous = self.endpoints[self.index] if index != self.index else None
        self.index = index
        return previous

    @staticmethod
    def all_failed(errors: Sequence[str]) -> ConnectError:
        """The error when no server could be reached: every server's reason, in order."""
        return ConnectError("; ".join(errors))


class ItemStream:
    """The client side of one streamed call (a REQUEST with the STREAM flag), sans-I/O.

    The adapter feeds it the call's ITEMs (:meth:`feed`) as they arrive and takes them as the
    application consumes them (:meth:`take`), sending the CREDIT :meth:`take` returns; the call
    itself (its deadline, its one RESPONSE or ERROR, a lost connection) stays a call of
    :class:`Calls` (or :class:`OneCall`), which ends the stream once the queue is empty. Memory:
    a server that keeps the window never makes the queue hold more than ``window`` bytes plus
    one item; :meth:`feed` reports one that does not. Grants are batched: bytes consumed are
    granted back once they reach half the window.

    Both clients use it the same way::

        rid = calls.new_id(); stream = ItemStream(rid, method)
        core.send_request(rid, method, args, kwargs, codec, budget_ms=..., stream=True)
        on Item ev:            problem = stream.feed(ev)  # not None: CANCEL, fail the call
        to get the next item:  item, grant = stream.take() (while stream.items) ;
                               if grant: core.send_credit(rid, grant)
        when the queue is empty and the call has its answer: the stream ended (RESPONSE: its
        result is the generator's return value) or raises (ERROR); the caller stopped early
        (break, close): core.send_cancel(rid).
    """

    __slots__ = ("items", "method", "queued", "request_id", "ungranted", "window")

    def __init__(self, request_id: int, method: str, window: int = STREAM_WINDOW) -> None:
        self.request_id = request_id
        self.method = method
        self.window = window
        self.items: deque[tuple[Any, int]] = deque()
        self.queued = 0
        """Bytes of ITEM bodies queued, not yet taken."""
        self.ungranted = 0
        """Bytes taken and not granted back yet."""

    def feed(self, ev: Item) -> str | None:
        """Queue an ITEM; None, or what is wrong when the server sent it beyond the window (it
        may send while the bytes it sent and had not granted back are below the window)."""
        if ev.end:
            return (
                f"stream {self.method!r}: the server sent an ITEM with flag END (only a client "
                "ends an upload)"
            )
        if self.queued + self.ungranted >= self.window:
            return (
                f"stream {self.method!r}: the server sent an item beyond the flow-control "
                f"window of {self.window} bytes"
            )
        self.items.append((ev.value, ev.size))
        self.queued += ev.size
        return None

    def take(self) -> tuple[Any, int]:
        """The next item (the queue must not be empty) and the bytes to grant now by CREDIT (0:
        none yet)."""
        value, size = self.items.popleft()
        self.queued -= size
        ungranted = self.ungranted + size
        if ungranted >= self.window // 2:
            self.ungranted = 0
            return value, ungranted
        self.ungranted = ungranted
        return value, 0


class ItemUpload:
    """The client side of one upload (a REQUEST with the UPLOAD flag, PROTOCOL.md §4.4),
    sans-I/O: the flow-control count both clients keep.

    The client may send an ITEM while the bytes of ITEM bodies it sent and the server has not
    granted back (CREDIT) are below the window, so it passes the window by one item at most;
    the last ITEM (flag END, an empty body) may go at any time. Both clients use it the same
    way::

        rid = calls.new_id(); up = ItemUpload(rid, method)
        core.send_request(rid, method, args, kwargs, codec, budget_ms=..., upload=True)
        for each item:   wait until up.may_send() (or the call's answer came: stop sending)
                         frame = core.item_frame(rid, item, codec); send it; up.sent(frame)
        then:            send encode_item_end(rid, codec); wait for the call's answer
        on Credit ev:    up.credit(ev.granted)
    """

    __slots__ = ("method", "most", "request_id", "unacked", "window")

    def __init__(self, request_id: int, method: str, window: int = STREAM_WINDOW) -> None:
        self.request_id = request_id
        self.method = method
        self.window = window
        self.unacked = 0
        """Bytes of ITEM bodies sent, not granted back yet."""
        self.most = 0
        """The largest ``unacked`` has been (at most the window plus one item)."""

    def may_send(self) -> bool:
        """True when the next ITEM may go now."""
        return self.unacked < self.window

    def sent(self, frame: bytes | int) -> None:
        """An ITEM went out (its frame, or its body's size)."""
        size = frame if isinstance(frame, int) else len(frame) - 16
        unacked = self.unacked = self.unacked + size
        if unacked > self.most:
            self.most = unacked

    def credit(self, granted: int) -> None:
        """The server granted ``granted`` bytes back; never below 0 (a CREDIT cannot grant
        bytes not sent)."""
        self.unacked = max(self.unacked - granted, 0)
