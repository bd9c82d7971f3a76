"""`sockstack call --timeout S` and `sockstack pub --timeout S`: one deadline for the whole
command, connecting included (issue 11 item 10). A scripted server that is slow to send its
WELCOME and then slow to answer shows it by the outcome, not by a clock: the connect time
leaves too little of S for the answer, which the old behaviour (a fresh S for the call after
connecting) would have waited for and printed."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from sockstack.protocol.frames import FrameDecoder
from sockstack.protocol.messages import Welcome, encode_response, encode_welcome
from tests.cli.conftest import run
from tests.conftest import timeout

WELCOME_DELAY = 1.5  # of a --timeout of 2: 0.5 s is left for the call
ANSWER_DELAY = 1.0  # more than what is left, less than a whole --timeout


@pytest.fixture
def slow_server() -> Iterator[str]:
    """Accepts one connection, waits WELCOME_DELAY before its WELCOME, then answers each
    REQUEST (a RESPONSE with result 5) ANSWER_DELAY after it came."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(timeout(30))
            decoder = FrameDecoder()
            frames = []
            while not frames:  # the HELLO
                data = conn.recv(65536)
                if not data:
                    return
                frames = decoder.feed(data)
            if stop.wait(WELCOME_DELAY):  # the server's slowness is the workload here
                return
            conn.sendall(encode_welcome(Welcome()))
            pending = frames[1:]
            while not stop.is_set():
                for frame in pending:
                    if frame.type == 3 and not stop.wait(ANSWER_DELAY):  # REQUEST
                        conn.sendall(encode_response(frame.request_id, 5))
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                pending = decoder.feed(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(timeout(10))


def test_call_timeout_bounds_connect_and_call(slow_server: str) -> None:
    out = run(["sockstack", "call", slow_server, "add", "2", "3", "--timeout", "2"])
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr)
    assert "no answer within" in out.stderr and out.stdout == ""


def test_pub_clear_over_udp_is_a_usage_error_naming_clear() -> None:
    out = run(["sockstack", "pub", "udp://127.0.0.1:5999", "a.b", "--clear"])
    assert out.returncode == 2 and "pub --clear" in out.stderr and "tcp://" in out.stderr
