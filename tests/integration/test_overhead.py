"""`sockstack inspect`: the layer model, and its transport figures against a real capture."""

from __future__ import annotations

import queue
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from sockstack.cli.inspect import (
    ETHERNET,
    IPV4,
    TCP_HEADER,
    Exchange,
    capture_exchange,
    layers,
)
from sockstack.protocol.frames import HEADER_SIZE
from sockstack.protocol.messages import (
    Hello,
    Welcome,
    encode_hello,
    encode_welcome,
    features_extension,
)
from tests.conftest import timeout


def test_exchange_sizes_come_from_real_frames() -> None:
    ex = capture_exchange(None, 64)
    # REQUEST: header + "echo" + msgpack [bin8(64)] (1 + 2 + 64); RESPONSE: header + bin8(64)
    assert (ex.request_frame, ex.request_meta, ex.request_body) == (HEADER_SIZE + 4 + 67, 4, 67)
    assert (ex.response_frame, ex.response_body) == (HEADER_SIZE + 66, 66)


def test_layer_model() -> None:
    tcp = layers(87, 4, 67, 64, "tcp")
    assert (tcp.packets, tcp.ethernet, tcp.ip, tcp.l4) == (1, ETHERNET, IPV4, TCP_HEADER)
    assert tcp.total == 18 + 20 + 32 + 16 + 4 + 3 + 64
    udp = layers(87, 4, 67, 64, "udp")
    assert udp.total == 18 + 20 + 8 + 16 + 4 + 3 + 64
    assert udp.efficiency > tcp.efficiency
    big = layers(16 + 4 + 5 + 4000, 4, 4005, 4000, "udp")
    assert big.packets == 3 and big.ip == 3 * IPV4  # IP fragments each carry a header
    batched = layers(87, 4, 67, 64, "tcp", frames_per_packet=10)
    assert batched.total < tcp.total and batched.efficiency > 0.6
    assert layers(87, 4, 67, 64, "tcp", tls=True).tls == 22


def _can_capture() -> bool:
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    except (PermissionError, AttributeError, OSError):
        return False
    s.close()
    return True


@pytest.mark.skipif(not _can_capture(), reason="packet capture needs CAP_NET_RAW (root)")
def test_transport_figures_match_a_loopback_capture() -> None:
    """Capture a real sockstack call on `lo` with an AF_PACKET socket and check the IPv4 and
    TCP header sizes (timestamps option included) and the segment payload the model uses."""
    ex_holder: list[object] = []
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sniff.bind(("lo", 0))
    sniff.settimeout(0.2)
    seen: list[tuple[int, int, int]] = []  # (ip header, tcp header, tcp payload)
    stop = threading.Event()

    def pump() -> None:
        deadline = time.monotonic() + timeout(20)
        while time.monotonic() < deadline:
            if stop.is_set():  # the exchange is over: read what is queued, for 1 s at most
                deadline = min(deadline, time.monotonic() + 1.0)  # (other traffic on `lo`
                # may never leave the socket idle long enough for a timeout)
            try:
                pkt = sniff.recv(65535)
            except TimeoutError:
                if stop.is_set():
                    break  # everything captured has been read
                continue
            except OSError:
                break  # closed under us: the test has given up waiting
            if len(pkt) < 14 + 20 or pkt[12:14] != b"\x08\x00" or pkt[14 + 9] != 6:
                continue  # not IPv4/TCP
            ihl = (pkt[14] & 0x0F) * 4
            total = struct.unpack_from(">H", pkt, 16)[0]
            tcp = 14 + ihl
            doff = (pkt[tcp + 12] >> 4) * 4
            payload = total - ihl - doff
            if payload > 0 and pkt[tcp + doff : tcp + doff + 2] == b"SK":
                seen.append((ihl, doff, payload))

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        ex_holder.append(capture_exchange(None, 64))
    finally:
        stop.set()
        t.join(timeout(5) + 1.0)
        sniff.close()
    ex = ex_holder[0]
    assert seen, "no sockstack segment captured"
    assert all(ihl == IPV4 and doff == TCP_HEADER for ihl, doff, _ in seen)
    # One segment each way: HELLO + REQUEST, then WELCOME + RESPONSE, exactly the frame sizes
    # the model counts (the handshake frames ride in the same segments).
    hello = len(encode_hello(Hello(agent="inspect")))
    welcome = len(
        encode_welcome(Welcome(1, (1, 2, 0), 64 << 20, "sockstack-py/1", (features_extension(),)))
    )
    assert isinstance(ex, Exchange)
    # (On `lo` a capture sees each packet twice, as sent and as received; the server's CLOSE
    # GOING_AWAY at its shutdown is captured too.)
    assert {hello + ex.request_frame, welcome + ex.response_frame} <= {p for _, _, p in seen}


@pytest.mark.skipif(
    shutil.which("tshark") is None or not _can_capture(),
    reason="tshark not installed (make test installs it where root and apt are available) "
    "or no capture permission",
)
def test_transport_figures_match_a_tshark_capture() -> None:
    """The same check with tshark (Wireshark's dissectors) reading live traffic on `lo`."""
    hello = len(encode_hello(Hello(agent="inspect")))
    welcome = len(
        encode_welcome(Welcome(1, (1, 2, 0), 64 << 20, "sockstack-py/1", (features_extension(),)))
    )
    cap = subprocess.Popen(
        [
            "tshark",
            "-l",
            "-i",
            "lo",
            "-f",
            "tcp",
            "-Y",
            "tcp.len > 0",
            "-T",
            "fields",
            "-e",
            "ip.hdr_len",
            "-e",
            "tcp.hdr_len",
            "-e",
            "tcp.len",
            "-e",
            "tcp.payload",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rows: queue.Queue[str] = queue.Queue()
    started = threading.Event()

    def pump_rows() -> None:
        assert cap.stdout is not None
        for line in cap.stdout:
            rows.put(line)

    def pump_log() -> None:
        assert cap.stderr is not None
        for line in cap.stderr:
            if "Capture started" in line:  # (after "Capturing on": the capture is live)
                started.set()

    readers = [threading.Thread(target=f, daemon=True) for f in (pump_rows, pump_log)]
    for r in readers:
        r.start()
    seen: set[int] = set()
    try:
        started.wait(timeout(5))  # older tshark may not say it: the retries below cover that
        for _ in range(3):  # bounded
            ex = capture_exchange(None, 64)
            want = {hello + ex.request_frame, welcome + ex.response_frame}
            deadline = time.monotonic() + timeout(5)  # tshark lags behind a busy `lo`
            while not want <= seen and time.monotonic() < deadline:
                try:
                    row = rows.get(timeout=0.2)
                except queue.Empty:
                    continue
                ip_len, tcp_len, payload_len, payload = row.rstrip("\n").split("\t")
                if payload.replace(":", "").startswith("534b"):  # "SK": a sockstack segment
                    assert (int(ip_len), int(tcp_len)) == (IPV4, TCP_HEADER)
                    seen.add(int(payload_len))
            if want <= seen:
                break
    finally:
        cap.send_signal(signal.SIGINT)  # ours, by PID
        cap.wait(timeout(20))
        for r in readers:
            r.join(timeout(5))
        for pipe in (cap.stdout, cap.stderr):
            if pipe is not None:
                pipe.close()
    assert want <= seen, seen
