"""Memory bounded in bytes, shown by the server's RSS (issue 10, items 1 and 6).

Each test runs the server in a child process (``sockstack broker`` / ``sockstack serve`` as users
run them, or a child hosting ``Server(patterns=[PubSub(Broker(limits))])`` with small limits), and
reads its resident memory from ``/proc/PID/status``: a bound is shown by what the process holds,
never by the broker's own counters. Before the fix, the byte bounds counted payload and topic
bytes only: empty messages were nearly free to queue (~90 bytes of objects each, counted as 1),
QoS 1 frames kept for redelivery were not counted at all, and the retained store and the demo's
key-value store were bounded in entries only.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from sockstack import RemoteError, connect
from sockstack.errors import ErrorCode
from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.messages import (
    CORE_MESSAGES,
    Error,
    Hello,
    Response,
    Welcome,
    decode_message,
    encode_hello,
    encode_request,
)
from sockstack.protocol.registry import Registry
from sockstack.pubsub.messages import PUBSUB_MESSAGES, Msg, encode_pub, encode_sub
from tests.cli.conftest import Proc
from tests.conftest import timeout

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads RSS from /proc"
)

REGISTRY = Registry([CORE_MESSAGES, PUBSUB_MESSAGES])
MiB = 1 << 20
# The child's environment: no asyncio debug mode (``make test`` sets it), which would keep a
# traceback per callback and slow the server down: the process measured is the one users run.
ENV = {"PYTHONASYNCIODEBUG": ""}

# A broker with the given BrokerLimits, served as `sockstack broker` serves it (malloc tuning
# included), printing its endpoint as `sockstack broker` does.
CHILD = """
import asyncio, json, sys
from sockstack import Broker, BrokerLimits, PubSub, Server, tune_malloc

async def main() -> None:
    tune_malloc()
    server = Server(
        patterns=[PubSub(Broker(BrokerLimits(**json.loads(sys.argv[1]))))], tcp=["127.0.0.1:0"]
    )
    async with server:
        print("serving broker on", server.endpoint("tcp"), flush=True)
        await server.serve_forever()

asyncio.run(main())
"""


def rss(proc: Proc) -> int:
    """Resident memory of the child, in bytes, from /proc."""
    with open(f"/proc/{proc.popen.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start(args: list[str], what: str) -> tuple[Proc, int]:
    proc = Proc(args, env=ENV)
    try:
        port = int(proc.wait_line(rf"serving {what} on tcp://127\.0\.0\.1:(\d+)").group(1))
    except BaseException:
        proc.stop()
        raise
    return proc, port


def broker_with(limits: dict[str, Any]) -> tuple[Proc, int]:
    return start([sys.executable, "-c", CHILD, json.dumps(limits)], "broker")


class Raw:
    """A blocking connection speaking the protocol frame by frame (no client library between the
    test and the broker: it decides exactly what is sent, and what is never read)."""

    def __init__(self, port: int, rcvbuf: int = 0) -> None:
        self.sock = socket.socket()
        if rcvbuf:  # a subscriber that does not read: its kernel buffer fills at once
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout(15))
        self.sock.connect(("127.0.0.1", port))
        self.dec = FrameDecoder()
        self.inbox: deque[Any] = deque()
        self._rid = 0
        self.sock.sendall(encode_hello(Hello()))
        assert isinstance(self.next(), Welcome)

    def next(self) -> Any:
        while not self.inbox:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.inbox.extend(decode_message(f, REGISTRY) for f in self.dec.feed(data))
        return self.inbox.popleft()

    def answer(self, rid: int) -> Response | Error:
        """The RESPONSE or ERROR to request ``rid`` (anything else read on the way is dropped)."""
        while True:
            m = self.next()
            if isinstance(m, (Response, Error)) and m.request_id == rid:
                return m

    def subscribe(self, sid: int, pattern: str, **options: Any) -> None:
        self.sock.sendall(encode_sub(sid, pattern, options))
        assert isinstance(self.answer(sid), Response)

    def stats(self) -> dict[str, Any]:
        """broker.stats, answered after every PUB this connection sent before it was routed."""
        self._rid += 1
        self.sock.sendall(encode_request(self._rid, "broker.stats"))
        answer = self.answer(self._rid)
        assert isinstance(answer, Response), answer
        stats: dict[str, Any] = answer.result
        return stats

    def close(self) -> None:
        self.sock.close()


class Drain(threading.Thread):
    """Reads and discards everything until the connection ends (a subscriber that reads every
    MSG but never acknowledges one), counting the bytes so that a test can wait for them."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.received = 0
        self.cond = threading.Condition()

    def run(self) -> None:
        try:
            while data := self.sock.recv(1 << 20):
                with self.cond:
                    self.received += len(data)
                    self.cond.notify_all()
        except OSError:
            pass

    def wait_for(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.received >= n, timeout(10)), (
                f"received {self.received} of {n} bytes"
            )


# --------------------------------------------------------------------------- item 1


@pytest.mark.parametrize(
    ("limits", "subs", "publishes", "bound"),
    [
        # Each subscription's bound: 8 subscriptions x 1 MiB. Before the fix: each queued up to
        # 100,000 empty messages counted as 1 byte each (~70 MiB of RSS).
        pytest.param({"max_bytes": 1 * MiB}, 8, 100_000, 8 * MiB, id="per-subscription"),
        # The broker-wide bound: 30 subscriptions, 4 MiB for all of them. Before: ~130 MiB.
        pytest.param({"max_pending_total": 4 * MiB}, 30, 50_000, 4 * MiB, id="all-subscriptions"),
    ],
)
def test_empty_messages_to_slow_subscribers_stay_within_the_byte_bounds(
    limits: dict[str, Any], subs: int, publishes: int, bound: int
) -> None:
    proc, port = broker_with(limits)
    conns: list[Raw] = []
    try:
        # Subscribers that never read, ten subscriptions per connection, all on topic "t".
        for first in range(0, subs, 10):
            slow = Raw(port, rcvbuf=4096)
            conns.append(slow)
            for sid in range(first + 1, min(first + 10, subs) + 1):
                slow.subscribe(sid, "t")
        normal = Raw(port)
        conns.append(normal)
        normal.subscribe(1, "done")
        pub = Raw(port)
        conns.append(pub)
        pub.sock.sendall(encode_pub("t", b"", codec=0) * 1000)  # warm-up: buffers fill
        pub.stats()
        before = rss(proc)
        batch = encode_pub("t", b"", codec=0) * 10_000  # empty raw messages (codec 0)
        for _ in range(publishes // 10_000):
            pub.sock.sendall(batch)
        stats = pub.stats()  # every publish above has been routed
        grown = rss(proc) - before
        # The bound holds for the process's memory (margin: twice the bound, plus 8 MiB for
        # transport buffers and the allocator), not only in the broker's counters.
        assert grown < 2 * bound + 8 * MiB, (
            f"RSS grew {grown / MiB:.1f} MiB for a {bound / MiB:.0f} MiB bound; the broker "
            f"counted {stats['pending']} queued messages as {stats.get('held_bytes')} bytes"
        )
        assert stats["dropped"] > 0 and stats["held_bytes"] <= bound
        # A well-behaved subscriber is still served, and the broker still answers.
        pub.sock.sendall(encode_pub("done", b"\x01", request_id=99))
        assert isinstance(pub.answer(99), Response)
        msg = normal.next()
        assert isinstance(msg, Msg) and (msg.topic, msg.payload) == ("done", b"\x01")
    finally:
        for c in conns:
            c.close()
        proc.stop()


def test_unacknowledged_qos1_frames_count_in_the_byte_bound() -> None:
    """A QoS 1 subscriber that reads everything and acknowledges nothing: the frames the broker
    keeps for redelivery count in its max_bytes (before the fix only max_inflight, 1,000
    messages, bounded them: ~80 MB here for a 2 MiB bound)."""
    proc, port = broker_with({"max_bytes": 2 * MiB})
    sub = Raw(port)
    pub = Raw(port)
    reader = Drain(sub.sock)
    try:
        sub.subscribe(1, "big", qos=1)
        sub.subscribe(2, "big", qos=1)
        reader.start()  # reads every MSG from now on, and never sends an ACK
        frame = encode_pub("big", b"p" * 50_000)
        msg_size = 16 + 4 + len("big") + 50_000  # header, subscription id, topic, payload
        pub.sock.sendall(frame * 4)
        reader.wait_for(pub.stats()["delivered"] * msg_size)
        before = rss(proc)
        for _ in range(80):  # 800 messages, 40 MB, to each subscription
            pub.sock.sendall(frame * 10)
            # The subscriber keeps up: whatever the broker sent has arrived before the next
            # batch, so the broker's transport stays writable and only the bounds hold it back.
            reader.wait_for(pub.stats()["delivered"] * msg_size)
        stats = pub.stats()
        grown = rss(proc) - before
        bound = 2 * 2 * MiB  # two subscriptions
        assert grown < 2 * bound + 8 * MiB, (
            f"RSS grew {grown / MiB:.1f} MiB for a {bound / MiB:.0f} MiB bound; "
            f"{stats['inflight']} messages in flight"
        )
        assert stats["inflight_bytes"] <= bound and stats["held_bytes"] <= bound
        assert stats["inflight"] < 2 * 800 and stats["dropped"] > 0
    finally:
        sub.sock.shutdown(socket.SHUT_RDWR)
        if reader.is_alive():
            reader.join(timeout(10))
        sub.close()
        pub.close()
        proc.stop()


# --------------------------------------------------------------------------- item 6


def test_retained_store_is_bounded_in_bytes() -> None:
    """`sockstack broker` with its defaults: 160 topics x 1 MB retained. Before the fix all were
    kept (10,000 topics allowed, ~10 GB): +160 MB of RSS. Now the 64 MiB byte bound refuses the
    rest with RETAINED_STORE_FULL and says why."""
    proc, port = start(["sockstack", "broker", "--tcp", "127.0.0.1:0"], "broker")
    pub = Raw(port)
    try:
        pub.sock.sendall(encode_pub("warm.up", b"w" * 1_000_000, request_id=1, retain=True))
        pub.sock.sendall(encode_pub("warm.up", b"", request_id=2, retain=True))  # cleared
        assert isinstance(pub.answer(2), Response)
        before = rss(proc)
        kept, refused = 0, []
        for i in range(160):
            pub.sock.sendall(
                encode_pub(f"ret.{i}", b"r" * 1_000_000, request_id=100 + i, retain=True)
            )
            answer = pub.answer(100 + i)
            if isinstance(answer, Response):
                kept += 1
            else:
                refused.append(answer)
        grown = rss(proc) - before
        assert grown < 96 * MiB, f"RSS grew {grown / MiB:.1f} MiB, {kept} retained messages kept"
        assert 60 <= kept <= 67 and len(refused) == 160 - kept
        assert {e.code for e in refused} == {ErrorCode.RETAINED_STORE_FULL}
        assert "max_retained_bytes" in refused[0].message
        stats = pub.stats()
        assert stats["retained"] == kept and stats["retained_bytes"] <= 64 * MiB
        assert stats["retained_refused"] == len(refused)
        # Clearing a topic frees its bytes: one more fits.
        pub.sock.sendall(encode_pub("ret.0", b"", request_id=1000, retain=True))
        assert isinstance(pub.answer(1000), Response)
        pub.sock.sendall(encode_pub("ret.new", b"n" * 1_000_000, request_id=1001, retain=True))
        assert isinstance(pub.answer(1001), Response)
    finally:
        pub.close()
        proc.stop()


def test_demo_key_value_store_is_bounded_in_bytes() -> None:
    """`sockstack serve` (the demo) with its defaults: 160 values of 1 MB. Before the fix all
    were stored (10,000 keys allowed): +160 MB of RSS. Now the 64 MiB byte bound refuses the
    rest with a message that says so."""
    proc, port = start(["sockstack", "serve", "--tcp", "127.0.0.1:0"], "Demo")
    try:
        with connect(f"tcp://127.0.0.1:{port}", timeout=timeout(15)) as c:
            c.call("set", "warm", b"w" * 1_000_000)
            c.call("delete", "warm")
            before = rss(proc)
            kept, refused = 0, []
            for i in range(160):
                try:
                    c.call("set", f"k{i}", b"v" * 1_000_000)
                    kept += 1
                except RemoteError as exc:
                    refused.append(exc)
            grown = rss(proc) - before
            assert grown < 96 * MiB, f"RSS grew {grown / MiB:.1f} MiB, {kept} values stored"
            assert 60 <= kept <= 67 and len(refused) == 160 - kept
            assert "store is full" in str(refused[0]) and str(64 * MiB) in str(refused[0])
            assert c.call("delete", "k0") is True  # deleting frees room
            assert c.call("set", "again", b"a" * 1_000_000) is True
            assert c.call("set", "small", [1, "two", {"3": 4.0}]) is True
            assert c.call("get", "small") == [1, "two", {"3": 4.0}]
    finally:
        proc.stop()
