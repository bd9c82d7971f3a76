"""The call core, sans-I/O: ids, deadlines, matching, failover, backoff (protocol/calls.py)."""

from __future__ import annotations

import pytest

from sockstack.errors import ConnectError, RemoteError
from sockstack.protocol.calls import Backoff, Calls, Failover, outcome, remote_error
from sockstack.protocol.events import Error, Pong, Response


def test_ids_never_collide_with_a_call_still_waiting() -> None:
    calls: Calls[None] = Calls(first_id=0xFFFFFFFE)
    a = calls.start("a", 1.0, 0.0, None)
    b = calls.start("b", 1.0, 0.0, None)
    c = calls.start("c", 1.0, 0.0, None)
    assert (a.request_id, b.request_id, c.request_id) == (
        0xFFFFFFFE,
        0xFFFFFFFF,
        1,
    )  # wraps, 0 skipped
    calls2: Calls[None] = Calls()
    held = calls2.start("held", 1.0, 0.0, None)  # id 1 stays pending
    for _ in range(3):
        calls2.forget(calls2.start("x", 1.0, 0.0, None).request_id)
    calls2._last_id = 0xFFFFFFFF  # wrap around onto the held id: it is skipped
    assert calls2.new_id() == 2 and held.request_id == 1


def test_first_id_is_checked() -> None:
    with pytest.raises(ValueError):
        Calls(first_id=0)
    with pytest.raises(ValueError):
        Calls(first_id=1 << 32)


def test_answers_match_by_request_id_only() -> None:
    calls: Calls[str] = Calls()
    first = calls.start("slow", 1.0, 0.0, "w1")
    calls.forget(first.request_id)  # timed out: its answer may still come
    second = calls.start("next", 1.0, 0.0, "w2")
    late = Response(first.request_id, 1)
    assert calls.take(late) is None  # the late answer reaches nobody
    assert not calls.answers(late, second.request_id)
    assert calls.settle([late], second.request_id) is None
    assert calls.settle([late, Response(second.request_id, 2)], second.request_id) == (True, 2)
    assert len(calls) == 0


def test_outcomes() -> None:
    assert outcome(Response(1, "r")) == (True, "r")
    assert outcome(Pong(1, b"")) == (True, None)
    ok, exc = outcome(Error(1, 2001, "BAD_ARGUMENTS", "nope"))
    assert not ok and isinstance(exc, RemoteError) and exc.code == 2001
    assert remote_error(Error(1, 2002, "", "x")).code == 2002


def test_deadlines_expire_in_order_and_answered_calls_are_skipped() -> None:
    calls: Calls[None] = Calls()
    a = calls.start("a", 3.0, 0.0, None)
    b = calls.start("b", 1.0, 0.0, None)
    c = calls.start("c", 2.0, 0.0, None)
    assert calls.next_deadline() == 1.0
    calls.take(Response(b.request_id))
    assert calls.next_deadline() == 2.0
    assert calls.expire(1.5) == []
    assert calls.expire(2.5) == [c]
    assert calls.expire(10.0) == [a]
    assert calls.next_deadline() is None and len(calls) == 0


def test_the_deadline_heap_stays_bounded_under_sustained_load() -> None:
    """Answered calls leave stale heap entries; with one call always pending the heap must not
    grow with the number of calls made."""
    calls: Calls[None] = Calls()
    calls.start("held", 1e9, 0.0, None)
    for i in range(10_000):
        call = calls.start("c", 10.0, float(i), None)
        calls.take(Response(call.request_id))
        assert len(calls._deadlines) <= 2 * (len(calls) + 1) + 65  # +1: the call just answered
    assert calls.next_deadline() == 1e9


def test_untimed_calls_leave_no_heap_entries() -> None:
    calls: Calls[None] = Calls()
    for _ in range(100):
        calls.start("c", 1.0, 0.0, None, timed=False)
    assert calls._deadlines == [] and len(calls) == 100
    assert len(calls.drain()) == 100 and len(calls) == 0


def test_failover_order_sticks_to_the_server_that_answered() -> None:
    f = Failover(["a", "b", "c"])
    assert [ep for _, ep in f.attempts()] == ["a", "b", "c"]
    assert f.connected(1) == "a" and f.current == "b"
    assert [ep for _, ep in f.attempts()] == ["b", "c", "a"]
    assert f.connected(1) is None  # stayed: no failover
    err = Failover.all_failed(["a: refused", "b: timeout"])
    assert isinstance(err, ConnectError) and str(err) == "a: refused; b: timeout"
    with pytest.raises(ValueError):
        Failover([])


def test_backoff_is_bounded_and_jittered() -> None:
    b = Backoff(initial=0.1, factor=2.0, max_delay=1.0)
    delays = [b.delay(n) for n in range(10)]
    assert all(0.05 <= d <= 1.0 for d in delays)
    assert 0.05 <= b.delay(0) <= 0.1 and 0.5 <= b.delay(9) <= 1.0
    assert len({b.delay(3) for _ in range(20)}) > 1  # jitter: clients do not move in lockstep


def test_one_call_at_a_time_matches_by_request_id_only() -> None:
    from sockstack.protocol.calls import OneCall

    one = OneCall(first_id=0xFFFFFFFF)
    first = one.begin()
    one.end()  # timed out: its answer may still come
    second = one.begin()
    assert (first, second) == (0xFFFFFFFF, 1)  # wraps, 0 skipped
    assert not one.answers(Response(first, "late"))  # never the next call's
    assert one.settle([Response(first, "late"), Error(7, 2001)]) is None
    assert one.settle([Pong(second, b"")]) == (True, None)
    assert one.current == 0 and not one.answers(Response(0, "x"))  # nothing waits
    assert one.begin(request_id=42) == 42  # an id chosen elsewhere (the UDP core's)
    ok, exc = one.settle([Error(42, 2002, "APPLICATION_ERROR", "boom")]) or (True, None)
    assert not ok and isinstance(exc, RemoteError)
    with pytest.raises(ValueError):
        OneCall(first_id=0)


# --------------------------------------------------------------------------- streamed calls


def test_item_stream_queues_in_order_and_grants_half_windows() -> None:
    """A streamed call's items on the client (PROTOCOL.md §4.3): in order; bytes granted back
    in batches once half the window was consumed; an item beyond the window is reported."""
    from sockstack.protocol.calls import ItemStream
    from sockstack.protocol.events import Item

    stream = ItemStream(9, "ticks", window=1000)
    for i in range(10):
        assert stream.feed(Item(9, i, 1, 100)) is None
    assert stream.queued == 1000
    grants = []
    for i in range(10):
        value, grant = stream.take()
        assert value == i
        grants.append(grant)
    assert grants == [0, 0, 0, 0, 500, 0, 0, 0, 0, 500]  # half the window at a time
    assert stream.queued == stream.ungranted == 0
    # The server may send while (queued + not granted back) < window: 10 x 100 fills it...
    for i in range(10):
        assert stream.feed(Item(9, i, 1, 100)) is None
    problem = stream.feed(Item(9, 10, 1, 1))  # ...and one more is beyond it
    assert problem is not None and "beyond the flow-control window of 1000 bytes" in problem
    stream.take()  # consumed, not yet granted: still counts against the window
    assert stream.feed(Item(9, 10, 1, 1)) is not None


def test_a_budget_of_unbounded_time_is_the_largest_budget() -> None:
    """A long-lived stream may be given ``timeout=math.inf``: its DEADLINE budget is the
    largest the u32 holds (49.7 days), not an OverflowError."""
    import math

    from sockstack.protocol.calls import budget_ms

    assert budget_ms(math.inf) == budget_ms(1e12) == 0xFFFFFFFF
    assert budget_ms(1.5) == 1500
    assert budget_ms(-1.0) == budget_ms(0.0) == 0
