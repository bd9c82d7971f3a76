"""``sockstack serve --workers N``: N server processes on the same ports (SO_REUSEPORT).

The kernel spreads new TCP connections over the workers' listening sockets, and UDP datagrams
by their (source, destination) 4-tuple, so one UDP client always reaches the same worker and
its retransmissions meet the same reply cache. Python runs one thread of bytecode at a time per
process; processes are how a server uses more than one core.

With a secret, each worker draws its own epoch and accepts only datagrams sealed for it
(PROTOCOL.md §6.1): its replay guard is in its own memory, and a captured datagram replayed from
another source port, which the kernel may hand to another worker, is refused there. A client
learns its worker's epoch from the first refusal, and again if the kernel moves its address to
another worker (when one exits). The workers share no guard, so they need no coordination.

The supervisor (this module) binds nothing itself except to pick free ports when port 0 is
asked for; it starts the workers, waits until each serves, prints the endpoints, forwards
SIGINT/SIGTERM to them and exits when they all have (non-zero if any failed).
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from sockstack.transport.urls import Endpoint, parse_endpoint

__all__ = ["run_workers"]

_READY = re.compile(r"^serving \S+ on (\S+)$")


def _reserve(ep: Endpoint, kind: int) -> tuple[Endpoint, socket.socket | None]:
    """Resolve port 0 to a concrete port every worker can bind with SO_REUSEPORT."""
    if ep.port != 0:
        return ep, None
    family = socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((ep.host, 0))
    port = sock.getsockname()[1]
    if kind == socket.SOCK_DGRAM:
        # A bound UDP socket in the group would take datagrams: release it at once.
        sock.close()
        return Endpoint(ep.scheme, ep.host, port), None
    # A TCP socket that never listens gets no connections but keeps the port ours.
    return Endpoint(ep.scheme, ep.host, port), sock


def run_workers(
    worker_args: Sequence[str],
    tcp: Sequence[str],
    udp: Sequence[str],
    workers: int,
    ready_timeout: float = 30.0,
    tls: Sequence[str] = (),
) -> int:
    """Run ``workers`` copies of ``sockstack serve`` (``worker_args`` without endpoints)."""
    held: list[socket.socket] = []
    eps: list[Endpoint] = []
    for text, kind, scheme in (
        [(t, socket.SOCK_STREAM, "tcp") for t in tcp]
        + [(t, socket.SOCK_STREAM, "tls") for t in tls]
        + [(u, socket.SOCK_DGRAM, "udp") for u in udp]
    ):
        ep, sock = _reserve(parse_endpoint(text, scheme), kind)
        eps.append(ep)
        if sock is not None:
            held.append(sock)
    endpoint_args: list[str] = []
    for ep in eps:
        host = f"[{ep.host}]" if ep.is_ipv6 else ep.host
        endpoint_args += [f"--{ep.scheme}", f"{host}:{ep.port}"]
    cmd = [sys.executable, "-m", "sockstack.cli", *worker_args, *endpoint_args, "--reuse-port"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        name = _wait_ready(procs, len(eps), ready_timeout)
    except RuntimeError as exc:
        forward(signal.SIGTERM, None)
        for p in procs:
            p.wait()
        print(f"sockstack: error: {exc}", file=sys.stderr)
        return 3
    finally:
        for sock in held:
            sock.close()
    for ep in eps:
        print(f"serving {name} on {ep}", flush=True)
    print(
        f"{workers} worker processes (pids {', '.join(str(p.pid) for p in procs)}); "
        f"try: sockstack call {eps[0]} ...   (Ctrl-C stops)",
        flush=True,
    )
    codes = [p.wait() for p in procs]
    for p in procs:
        if p.stdout is not None:
            p.stdout.close()
    failed = [c for c in codes if c != 0]
    if failed and not stopping:
        print(f"sockstack: error: {len(failed)} worker(s) exited with {failed}", file=sys.stderr)
    return 0 if not failed else 3


def _wait_ready(procs: list[subprocess.Popen[str]], n_endpoints: int, timeout: float) -> str:
    """Read each worker's stdout until it has printed all its endpoints."""
    deadline = time.monotonic() + timeout
    name = "?"
    pending = {p.stdout.fileno(): (p, 0) for p in procs if p.stdout is not None}
    buffers: dict[int, str] = {fd: "" for fd in pending}
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"{len(pending)} worker(s) not serving within {timeout:g} s")
        ready, _, _ = select.select(list(pending), [], [], remaining)
        for fd in ready:
            chunk = os.read(fd, 4096).decode()
            proc, seen = pending[fd]
            if not chunk:
                raise RuntimeError(f"worker {proc.pid} exited with {proc.wait()} before serving")
            buffers[fd] += chunk
            *lines, buffers[fd] = buffers[fd].split("\n")
            for line in lines:
                m = _READY.match(line)
                if m:
                    name = line.split()[1]
                    seen += 1
            if seen >= n_endpoints:
                del pending[fd]
            else:
                pending[fd] = (proc, seen)
    return name
