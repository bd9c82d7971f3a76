"""Hosts for the scale-out tests, made of Linux network namespaces (issue 16).

``with Lab(["a", "b", "c"]) as lab:`` makes one network namespace per host and a *lab*
namespace holding a bridge (the switch). Each host has ``eth0``, one end of a veth pair whose
other end (``p0``, ``p1``...) is a port of the bridge, an address ``10.77.0.N/24`` and loopback
up. Nothing is created in, routed from or addressed in the root namespace: the veth pairs are
made inside the lab namespace and their host ends moved straight into the host namespaces, the
lab namespace has no address at all, and no host namespace has a default route, so the hosts
reach each other and nothing else. Every lab has its own bridge, so parallel labs (pytest-xdist
workers, two runs at once) may reuse the same addresses; their namespace names differ
(``sockstack-PID-N-a``: the pid of this process and a counter).

- :meth:`Host.run` starts a program in a host (``ip netns exec``), in a new session (its own
  process group); :meth:`Lab.stop` ends that group by its id (SIGTERM, then SIGKILL after a
  bounded wait). On leaving the lab every process started is stopped, then any process still
  inside one of the lab's namespaces (a child that left the group) is killed by PID (all of them
  are ours: the namespaces are), then the namespaces are deleted (which removes the veths and
  the bridge) and the lab's temporary directory is removed, also when the test failed.
- :meth:`Host.link_down` / :meth:`Host.link_up` take the host's bridge port down and up: the
  cable is cut at the switch, the host keeps its address (as a real host would). ``tc netem``
  does not work on these kernels; :meth:`Host.rate_limit` (``tc tbf``) does.
- Waits are bounded polls of a condition, run inside a namespace by a small checker program:
  :meth:`Host.wait_tcp` (a TCP connect answers), :meth:`Host.can_connect`, and
  :func:`start_nats_cluster`'s wait for each node's client port and its routes (``/routez`` on
  the monitoring port; and ``/healthz`` when JetStream is on).

:class:`Unavailable` (with the reason) when namespaces cannot be made here (not Linux, not
root, no ``ip``, ``ip netns add`` refused) or nats-server is not installed: the tests skip.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from types import TracebackType
from typing import IO, Any

from tests.conftest import timeout

__all__ = [
    "Host",
    "Lab",
    "Lines",
    "NatsNode",
    "Unavailable",
    "nats_server_path",
    "start_nats_cluster",
]

SUBNET = "10.77.0"
"""The hosts' /24: host i is SUBNET.(i+1). It exists only inside the lab's namespaces."""
PREFIX = "sockstack"
_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")
_OURS = re.compile(rf"{PREFIX}-(\d+)-(\d+)-[a-z0-9]+")
_counter = itertools.count(1)
_counter_lock = threading.Lock()


class Unavailable(Exception):
    """Namespaces or a program the lab needs cannot be had here (the message says why)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout(10), check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _pids_in(netns: str) -> list[int]:
    """The processes inside a namespace (``ip netns pids``)."""
    done = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale() -> None:
    """Delete namespaces an earlier lab of a dead process left (killed before its cleanup ran):
    only names of this harness's form whose pid is gone and that hold no process."""
    done = _ip("netns", "list", check=False)
    for line in done.stdout.splitlines():
        name = line.split(" ", 1)[0]
        m = _OURS.fullmatch(name)
        if m and not _alive(int(m.group(1))) and not _pids_in(name):
            _ip("netns", "del", name, check=False)


def check_available() -> None:
    """Raise :class:`Unavailable` unless this process can make network namespaces."""
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"network namespaces are Linux only (this is {sys.platform})")
    if os.geteuid() != 0:
        raise Unavailable("making network namespaces needs root (the scale tests run as root)")
    if shutil.which("ip") is None:
        raise Unavailable("the `ip` program (iproute2) is not installed")


def nats_server_path() -> str:
    """The nats-server program (Debian installs it in /usr/sbin, not on a user's PATH)."""
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")
    if found is None:
        raise Unavailable(
            "nats-server is not installed (`make test-deps` installs Debian's nats-server)"
        )
    return found


# A checker run inside a namespace: every condition given must hold before the deadline.
# "tcp HOST PORT WAIT": a TCP connect succeeds. "routez URL N": the JSON at URL lists exactly N
# distinct routes (by remote server id). "refused HOST PORT WAIT" (alone): no TCP connection
# can be made within one attempt of WAIT seconds (exit 0 if so). "healthz URL": URL answers 200
# (nats-server's /healthz: 503 until its JetStream is current).
_CHECKER = r"""
import json, socket, sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
checks = [a.split(" ") for a in sys.argv[2:]]
def holds(c):
    if c[0] in ("tcp", "refused"):
        with socket.create_connection((c[1], int(c[2])), timeout=float(c[3])):
            return True
    with urllib.request.urlopen(c[1], timeout=1) as r:  # an HTTP error status is an OSError
        data = json.load(r)
    if c[0] == "healthz":
        return True
    ids = {x.get("remote_id") for x in data.get("routes") or []}
    if len(ids) == int(c[2]):
        return True
    raise OSError(f"{len(ids)} routes of {c[2]}: {sorted(map(str, ids))}")
if checks[0][0] == "refused":
    try:
        holds(checks[0])
    except OSError as e:
        print(f"no connection: {e!r}")
        sys.exit(0)
    print("connected")
    sys.exit(1)
last = {}
while checks:
    for c in list(checks):
        try:
            holds(c)
            checks.remove(c)
        except OSError as e:
            last[" ".join(c)] = repr(e)
    if checks and time.monotonic() >= deadline:
        print("; ".join(f"{' '.join(c)}: {last.get(' '.join(c))}" for c in checks))
        sys.exit(1)
    if checks:
        time.sleep(0.02)  # the poll's period (the loop ends at the deadline)
"""


class Lines:
    """The lines a process writes on a pipe, read by a thread, taken with a bounded wait."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: Queue[str | None] = Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next(self, wait: float) -> str:
        """The next line; AssertionError if none within ``wait`` seconds or the pipe closed."""
        try:
            line = self._queue.get(timeout=wait)
        except Empty:
            raise AssertionError(f"no line within {wait} s") from None
        if line is None:
            self._queue.put(None)  # stays closed for the next caller
            raise AssertionError("the process closed its output")
        return line

    def pending(self) -> list[str]:
        """The lines already read and not yet taken (no waiting)."""
        out: list[str] = []
        while True:
            try:
                line = self._queue.get_nowait()
            except Empty:
                return out
            if line is None:
                self._queue.put(None)
                return out
            out.append(line)


@dataclass
class Host:
    """One host: a network namespace with ``eth0`` at :attr:`ip` on the lab's bridge."""

    lab: Lab = field(repr=False)
    name: str
    netns: str
    ip: str
    port: str
    """Its bridge port's name, in the lab namespace."""

    def run(self, args: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start ``args`` in this host, in a new session (its own process group). Popen's
        keyword arguments pass through (stdin is /dev/null unless given). The lab stops it."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *args], start_new_session=True, **popen
        )
        self.lab._procs.append(proc)
        return proc

    def python(self, code: str, *args: str, **popen: Any) -> subprocess.Popen[Any]:
        """Run Python code in this host with this interpreter (the venv's packages), its
        output as text lines on pipes unless told otherwise."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        popen.setdefault("text", True)
        return self.run([sys.executable, "-c", code, *args], **popen)

    def check(
        self, *conditions: str, within: float, alive: subprocess.Popen[Any] | None = None
    ) -> None:
        """Wait until every condition holds, polled inside this host (see ``_CHECKER``);
        AssertionError with the last failure of each when the deadline passes, or as soon as
        the process ``alive`` (the server waited for) has exited."""
        proc = self.python(_CHECKER, str(within), *conditions)
        deadline = time.monotonic() + within + timeout(10)
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    if alive is not None and alive.poll() is not None:
                        raise AssertionError(
                            f"on host {self.name}: the process waited for exited"
                            f" ({alive.returncode})"
                        ) from None
                    if time.monotonic() >= deadline:
                        raise
        finally:
            self.lab.stop(proc)
        if proc.returncode != 0:
            raise AssertionError(
                f"on host {self.name}, not within {within} s: {out.strip()} {err.strip()}"
            )

    def wait_tcp(self, ip: str, port: int, within: float | None = None) -> None:
        """Wait until a TCP connect from this host to ip:port succeeds."""
        self.check(f"tcp {ip} {port} 0.5", within=within or timeout(10))

    def can_connect(self, ip: str, port: int, wait: float = 0.5) -> bool:
        """Whether one TCP connect from this host to ip:port succeeds within ``wait`` s."""
        proc = self.python(_CHECKER, str(wait), f"refused {ip} {port} {wait}")
        try:
            proc.communicate(timeout=wait + timeout(10))
        finally:
            self.lab.stop(proc)
        return proc.returncode != 0

    def link_down(self) -> None:
        """Cut this host off: its port on the bridge goes down (eth0 loses its carrier)."""
        _ip("-n", self.lab.netns, "link", "set", self.port, "down")

    def link_up(self) -> None:
        """Plug this host back in."""
        _ip("-n", self.lab.netns, "link", "set", self.port, "up")

    def rate_limit(self, rate: str, burst: str = "32kbit", latency: str = "50ms") -> None:
        """Limit what this host sends (``tc qdisc ... tbf`` on its eth0), e.g. ``"10mbit"``."""
        self._tc("replace", "root", "tbf", "rate", rate, "burst", burst, "latency", latency)

    def clear_rate_limit(self) -> None:
        self._tc("del", "root")

    def qdisc(self) -> str:
        """``tc qdisc show dev eth0`` in this host (what is in force)."""
        return self._tc("show")

    def _tc(self, verb: str, *args: str) -> str:
        if shutil.which("tc") is None:
            raise Unavailable("the `tc` program (iproute2) is not installed")
        done = subprocess.run(
            ["tc", "-n", self.netns, "qdisc", verb, "dev", "eth0", *args],
            capture_output=True,
            text=True,
            timeout=timeout(10),
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"tc qdisc {verb} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout


class Lab:
    """Hosts as network namespaces on one bridge (module docstring); a context manager."""

    def __init__(self, names: Sequence[str]) -> None:
        if not names or len(set(names)) != len(names) or len(names) > 250:
            raise ValueError(f"host names must be 1 to 250 distinct names, not {names!r}")
        for name in names:
            if not _NAME.fullmatch(name):
                raise ValueError(f"host name {name!r}: a lowercase letter, then up to 11 [a-z0-9]")
        self.names = list(names)
        with _counter_lock:
            n = next(_counter)
        self.tag = f"{PREFIX}-{os.getpid()}-{n}"
        self.netns = f"{self.tag}-lab"
        self.hosts: list[Host] = []
        self.dir = Path()
        self._procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in this lab (hosts: {self.names})")

    def __enter__(self) -> Lab:
        check_available()
        _sweep_stale()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        try:
            self._add_netns(self.netns)
            _ip("-n", self.netns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.netns, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                host = Host(self, name, f"{self.tag}-{name}", f"{SUBNET}.{i + 1}", f"p{i}")
                self._add_netns(host.netns)
                # Made in the lab namespace, one end moved straight into the host's: the root
                # namespace never holds either end.
                veth = ["type", "veth", "peer", "name", "eth0", "netns", host.netns]
                _ip("-n", self.netns, "link", "add", host.port, *veth)
                _ip("-n", self.netns, "link", "set", host.port, "master", "br0", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
                self.hosts.append(host)
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        done = _ip("netns", "add", name, check=False)
        if done.returncode != 0:
            if not self._made:  # the first one: namespaces cannot be made here at all
                raise Unavailable(f"`ip netns add` failed: {done.stderr.strip()}")
            raise RuntimeError(f"ip netns add {name}: {done.stderr.strip()}")
        self._made.append(name)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stop(self, proc: subprocess.Popen[Any], wait: float | None = None) -> int | None:
        """End a process this lab started, and its process group: SIGTERM, then SIGKILL if it
        has not ended within ``wait`` seconds. Its exit status (None if it would not die)."""
        wait = timeout(5) if wait is None else wait
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is None:
                # The group's id is the leader's pid (start_new_session): signalled by that id
                # while the leader is unreaped, so it cannot be another process's.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return proc.returncode

    def close(self) -> None:
        """Stop every process, delete every namespace and the temporary directory (idempotent;
        also what leaving the ``with`` does)."""
        errors: list[str] = []
        for proc in reversed(self._procs):
            self.stop(proc)
        self._procs.clear()
        for name in reversed(self._made):
            # What is still inside one of our namespaces is ours (a child that left its group).
            for _attempt in range(3):
                pids = _pids_in(name)
                if not pids:
                    break
                for pid in pids:
                    _kill_inside(pid, name)
                _wait_gone(pids, timeout(5))
            done = _ip("netns", "del", name, check=False)
            if done.returncode != 0:
                errors.append(f"ip netns del {name}: {done.stderr.strip()}")
        self._made.clear()
        if self.dir.parts:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))


def _kill_inside(pid: int, netns: str) -> None:
    """SIGKILL the process ``pid`` if it is (still) inside ``netns``: held by a pidfd while its
    namespace is checked, so a pid reused meanwhile by a process elsewhere is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except (ProcessLookupError, FileNotFoundError):
        pass  # it has gone
    finally:
        os.close(fd)


def _wait_gone(pids: Sequence[int], within: float) -> None:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)  # the poll's period, bounded by the deadline


@dataclass
class NatsNode:
    """A nats-server on one host of a lab (:func:`start_nats_cluster`)."""

    host: Host
    proc: subprocess.Popen[Any]
    config: Path
    log: Path
    store: Path | None
    client_port: int = 4222
    cluster_port: int = 6222
    http_port: int = 8222
    peers: list[Host] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://{self.host.ip}:{self.client_port}"

    @property
    def monitor(self) -> str:
        return f"http://{self.host.ip}:{self.http_port}"

    def wait_ready(self, routes: int | None = None, within: float | None = None) -> None:
        """Wait until the client port answers, exactly ``routes`` routes (default: one to
        each peer) are up and, with JetStream, /healthz says it is current; polled inside the
        node's host, the log's tail in the error."""
        want = len(self.peers) if routes is None else routes
        port = f"tcp {self.host.ip} {self.client_port} 0.5"
        conditions = [port, f"routez {self.monitor}/routez {want}"]
        if self.store is not None:
            conditions.append(f"healthz {self.monitor}/healthz")
        try:
            self.host.check(*conditions, within=within or timeout(15), alive=self.proc)
        except AssertionError as e:
            state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
            message = f"nats-server on {self.host.name} ({state}): {e}\n{self.log_tail()}"
            raise AssertionError(message) from None

    def routez(self) -> dict[str, Any]:
        """The node's /routez, fetched inside its host."""
        code = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())"  # noqa: E501
        proc = self.host.python(code, f"{self.monitor}/routez")
        try:
            out, err = proc.communicate(timeout=timeout(10))
        finally:
            self.host.lab.stop(proc)
        if proc.returncode != 0:
            raise AssertionError(f"/routez on {self.host.name}: {err.strip()}")
        data: dict[str, Any] = json.loads(out)
        return data

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_nats_cluster(
    lab: Lab,
    hosts: Sequence[Host],
    *,
    jetstream: bool = False,
    ping_interval: str | None = None,
    ping_max: int | None = None,
    within: float | None = None,
) -> list[NatsNode]:
    """A nats-server on each host, clustered by routes (port 6222) to every other host's
    address; clients on 4222, monitoring on 8222; JetStream off unless asked (then its store is
    a directory of the lab's temporary one). ``ping_interval`` (e.g. ``"500ms"``) and
    ``ping_max`` make a dead route noticed sooner than NATS's default two minutes. Returns once
    every node answers on its client port and has its routes up (bounded)."""
    binary = nats_server_path()
    nodes: list[NatsNode] = []
    for host in hosts:
        root = lab.dir / f"nats-{host.name}"
        root.mkdir()
        peers = [h for h in hosts if h is not host]
        store = root / "jetstream" if jetstream else None
        routes = ", ".join(f'"nats-route://{p.ip}:6222"' for p in peers)
        lines = [
            f"server_name: {json.dumps(host.name)}",
            'listen: "0.0.0.0:4222"',
            'http: "0.0.0.0:8222"',
            f"pid_file: {json.dumps(str(root / 'nats.pid'))}",
            "cluster {",
            '  name: "sockstack-lab"',
            '  listen: "0.0.0.0:6222"',
            f"  routes: [{routes}]",
            "}",
        ]
        if ping_interval is not None:
            lines.append(f"ping_interval: {json.dumps(ping_interval)}")
        if ping_max is not None:
            lines.append(f"ping_max: {ping_max}")
        if store is not None:
            lines += [
                "jetstream {",
                f"  store_dir: {json.dumps(str(store))}",
                "  max_memory_store: 64MB",
                "  max_file_store: 256MB",
                "}",
            ]
        config = root / "nats.conf"
        config.write_text("\n".join(lines) + "\n")
        log = root / "nats.log"
        with log.open("wb") as out:  # its log on stderr: a config error is in it too
            proc = host.run([binary, "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
        nodes.append(NatsNode(host, proc, config, log, store, peers=peers))
    _wait_all(nodes, within or timeout(15))
    return nodes


def _wait_all(nodes: Sequence[NatsNode], within: float) -> None:
    """Every node ready; the checks run at once, one per host."""
    errors: list[str] = []
    threads = [threading.Thread(target=_ready_or_note, args=(n, within, errors)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(within + timeout(15))
    if errors:
        raise AssertionError("\n".join(errors))


def _ready_or_note(node: NatsNode, within: float, errors: list[str]) -> None:
    try:
        node.wait_ready(within=within)
    except AssertionError as e:
        errors.append(str(e))
