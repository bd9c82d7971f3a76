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

Readiness travels on a channel of its own, as systemd's ``sd_notify`` does: each worker
inherits the write end of a pipe, named by ``$SOCKSTACK_READY_FD``. The worker takes the
variable out of its environment as it starts, before it loads the service
(:func:`take_ready_fd`), so no process the service spawns inherits the name of a descriptor it
does not have; once every endpoint is bound and the signal handlers are in place, it writes one
JSON line there (``{"pid", "name", "endpoints"}``), then closes it. It writes only if the
descriptor is still a pipe (a service may have closed it, and the number been reused). End of
file without that line means the worker ended before serving (or closed the pipe: it is then
given what is left of the ready timeout to exit, then killed). Nothing is parsed from the
workers' output: a service that prints whatever it likes cannot fool the supervisor. The
workers' standard output is discarded (each would repeat the supervisor's banner); their
standard error (logs) is the supervisor's.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence

from sockstack.transport.urls import Endpoint, parse_endpoint

__all__ = ["READY_FD_ENV", "report_ready", "run_workers", "take_ready_fd"]

READY_FD_ENV = "SOCKSTACK_READY_FD"
"""The environment variable that names a worker's readiness pipe (a file descriptor)."""
_MAX_READY = 1 << 16  # bytes of one worker's readiness line, at most


_ready_fd: int | None = None
"""The readiness pipe taken from the environment by :func:`take_ready_fd`, until used."""


def take_ready_fd() -> None:
    """In a worker of :func:`run_workers`, first thing (``sockstack serve`` calls it before it
    loads the service): move ``$SOCKSTACK_READY_FD`` out of the environment into this module,
    so a process the service starts does not inherit the variable (it does not inherit the
    descriptor). Elsewhere, does nothing."""
    global _ready_fd
    value = os.environ.pop(READY_FD_ENV, None)
    if value is None:
        return
    try:
        fd = int(value)
    except ValueError:
        return
    if fd >= 0:
        _ready_fd = fd


def report_ready(name: str, endpoints: Sequence[Endpoint]) -> None:
    """In a worker of :func:`run_workers`: tell the supervisor that it serves ``endpoints``.
    Once per process: a later call, or a child process, says nothing. Writes only if the
    descriptor is a pipe (a FIFO); elsewhere, does nothing."""
    global _ready_fd
    take_ready_fd()  # a program that set the variable itself, without `sockstack serve`
    fd, _ready_fd = _ready_fd, None
    if fd is None:
        return
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return  # closed and the number reused (a file, a socket): not ours to write or close
    except OSError:
        return  # closed
    line = json.dumps({"pid": os.getpid(), "name": name, "endpoints": [str(e) for e in endpoints]})
    data = memoryview(line.encode() + b"\n")
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # the supervisor is gone: nothing to tell
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


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
    http: Sequence[str] = (),
) -> int:
    """Run ``workers`` copies of ``sockstack serve`` (``worker_args`` without endpoints).
    ``http``: the HTTP gateway's endpoints (``HOST:PORT``, ``http://`` or ``https://``)."""
    held: list[socket.socket] = []
    eps: list[Endpoint] = []
    for text, kind, scheme in (
        [(t, socket.SOCK_STREAM, "tcp") for t in tcp]
        + [(t, socket.SOCK_STREAM, "tls") for t in tls]
        + [(u, socket.SOCK_DGRAM, "udp") for u in udp]
        + [(h, socket.SOCK_STREAM, "http") for h in http]
    ):
        if scheme == "http":
            web, sep, rest = text.partition("://")
            scheme, text = (web.lower(), rest) if sep else ("http", text)
            ep = parse_endpoint(text, "tcp")
            ep, sock = _reserve(Endpoint(scheme, ep.host, ep.port), kind)
        else:
            ep, sock = _reserve(parse_endpoint(text, scheme), kind)
        eps.append(ep)
        if sock is not None:
            held.append(sock)
    endpoint_args: list[str] = []
    for ep in eps:
        host = f"[{ep.host}]" if ep.is_ipv6 else ep.host
        if ep.scheme in ("http", "https"):
            endpoint_args += ["--http", f"{ep.scheme}://{host}:{ep.port}"]
        else:
            endpoint_args += [f"--{ep.scheme}", f"{host}:{ep.port}"]
    cmd = [sys.executable, "-m", "sockstack.cli", *worker_args, *endpoint_args, "--reuse-port"]
    procs: list[subprocess.Popen[bytes]] = []
    ready_fds: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    # Before the first worker starts: a SIGTERM meanwhile must not leave workers orphaned.
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        for _ in range(workers):
            if stopping:
                break
            r, w = os.pipe()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdout=subprocess.DEVNULL,
                    env={**os.environ, READY_FD_ENV: str(w)},
                    pass_fds=(w,),
                )
            except BaseException:
                os.close(r)
                raise
            finally:
                os.close(w)  # the worker has its copy: end of file when it exits
            procs.append(proc)
            ready_fds[r] = proc
        if stopping:
            forward(signal.SIGTERM, None)  # the workers started after the signal, too
            raise RuntimeError("stopped before serving")
        name = _wait_ready(ready_fds, eps, ready_timeout)
    except RuntimeError as exc:
        interrupted = stopping
        forward(signal.SIGTERM, None)
        for p in procs:
            p.wait()
        if interrupted:  # asked to stop while starting: not an error
            return 0
        print(f"sockstack: error: {exc}", file=sys.stderr)
        # A worker that exited with 2 could not create the service (its __init__ failed: the
        # supervisor checks the class, the workers create it) and said why: bad usage, as
        # without --workers. Anything else: 3.
        return 2 if any(p.returncode == 2 for p in procs) else 3
    finally:
        for sock in held:
            sock.close()
        for fd in ready_fds:
            os.close(fd)
    for ep in eps:
        print(f"serving {name} on {ep}", flush=True)
    print(
        f"{workers} worker processes (pids {', '.join(str(p.pid) for p in procs)}); "
        f"try: sockstack call {eps[0]} ...   (Ctrl-C stops)",
        flush=True,
    )
    codes = [p.wait() for p in procs]
    failed = [c for c in codes if c != 0]
    if failed and not stopping:
        print(f"sockstack: error: {len(failed)} worker(s) exited with {failed}", file=sys.stderr)
    return 0 if not failed else 3


def _wait_ready(
    ready_fds: dict[int, subprocess.Popen[bytes]], eps: Sequence[Endpoint], timeout: float
) -> str:
    """Read each worker's readiness line (see the module's notes); the name of what they
    serve. Raises RuntimeError when one ends first, reports other endpoints, or is late."""
    deadline = time.monotonic() + timeout
    name = "?"
    want = {(e.scheme, e.port) for e in eps}  # the host may be spelt otherwise (localhost)
    pending = dict(ready_fds)
    buffers: dict[int, bytes] = {fd: b"" for fd in pending}
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"{len(pending)} worker(s) not serving within {timeout:g} s")
        ready, _, _ = select.select(list(pending), [], [], remaining)
        for fd in ready:
            proc = pending[fd]
            chunk = os.read(fd, 4096)
            buffers[fd] += chunk
            if not chunk or b"\n" in buffers[fd] or len(buffers[fd]) > _MAX_READY:
                del pending[fd]
                if b"\n" not in buffers[fd]:
                    raise RuntimeError(_ended_early(proc, deadline))
                try:
                    report = json.loads(buffers[fd].split(b"\n", 1)[0])
                    served = [str(e) for e in report["endpoints"]]
                    name = str(report["name"])
                    got = {(u.split("://", 1)[0], int(u.rsplit(":", 1)[1])) for u in served}
                except (ValueError, KeyError, TypeError, IndexError):
                    raise RuntimeError(f"worker {proc.pid}: unreadable readiness report") from None
                if not want <= got:
                    raise RuntimeError(f"worker {proc.pid} serves {served}, not every endpoint")
    return name


def _ended_early(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """Why a worker's readiness pipe ended without a report. It usually means the worker
    exited; one that closed the pipe and lives on is given the rest of the ready timeout to
    exit, then killed (by its PID, which it still holds: it has not been waited for)."""
    try:
        code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"worker {proc.pid} closed its readiness pipe without serving; killed"
    return f"worker {proc.pid} exited with {code} before serving"
