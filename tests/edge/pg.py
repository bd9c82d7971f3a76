"""A throwaway PostgreSQL server for the tests, from Debian's ``postgresql`` package.

``with postgres() as pg: url = pg.url()`` runs ``initdb`` into a new temporary directory, starts
the server with ``pg_ctl`` on 127.0.0.1 at a free port (and a unix socket in that directory),
with ``fsync`` and ``synchronous_commit`` on, and on leaving stops it (``pg_ctl stop -m fast``)
and removes the directory. PostgreSQL refuses to run as root: when this process is root the
server runs as the ``postgres`` user the package creates (``runuser``, else ``su``), in a
directory owned by it. Authentication is by a random password (SCRAM), in the URL.

:class:`Unavailable` (with the reason) when the binaries are absent: the tests skip. A server
that is there but does not start is an error (the log's tail is in the message).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

__all__ = ["PgServer", "Unavailable", "find_bindir", "postgres"]

SUPERUSER = "postgres"


class Unavailable(Exception):
    """PostgreSQL cannot be run here (the message says why)."""


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding initdb and pg_ctl (Debian's layout),
    else the directory of a ``pg_ctl`` on PATH that has an initdb beside it."""

    def major(d: str) -> int:
        m = re.search(r"/postgresql/(\d+)/", d)
        return int(m.group(1)) if m else 0

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    for d in candidates:
        p = Path(d)
        if os.access(p / "initdb", os.X_OK) and os.access(p / "pg_ctl", os.X_OK):
            return p
    return None


@dataclass
class PgServer:
    """A running throwaway server: connect with :meth:`url`."""

    bindir: Path
    root: Path
    port: int
    password: str
    run_as: pwd.struct_passwd | None
    """The account the server runs as when this process is root (else None: ours)."""

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres", options: str = "") -> str:
        """A ``postgresql://`` URL for the superuser; ``options`` as libpq's (e.g.
        ``-csearch_path=t1``)."""
        url = (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/"
            f"{dbname}"
        )
        return f"{url}?options={quote(options, safe='')}" if options else url

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run one of the server's programs (as its account), output captured."""
        return _run([str(self.bindir / args[0]), *args[1:]], self.run_as, self.root, timeout)

    def restart(self) -> None:
        """Stop the server (fast: sessions are cut) and start it again, same port."""
        done = self.run(
            "pg_ctl",
            "restart",
            "-D",
            str(self.data),
            "-m",
            "fast",
            "-w",
            "-l",
            str(self.root / "log"),
        )  # the log file: with the server's output on our pipe, run() would wait for its end
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed: {done.stderr}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.root / "log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _run(
    argv: Sequence[str], run_as: pwd.struct_passwd | None, cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    if run_as is not None:
        if shutil.which("runuser"):
            argv = ["runuser", "-u", run_as.pw_name, "--", *argv]
        else:
            argv = ["su", run_as.pw_name, "-s", "/bin/sh", "-c", shlex.join(argv)]
    env = dict(os.environ, LC_ALL="C", LANG="C")
    env.pop("PGDATA", None)
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres(deadline: float = 30.0) -> Iterator[PgServer]:
    """A new server, stopped and removed on leaving (module docstring)."""
    bindir = find_bindir()
    if bindir is None:
        raise Unavailable(
            "PostgreSQL's server binaries are not installed (no /usr/lib/postgresql/*/bin/initdb;"
            " `make test-deps` installs Debian's postgresql package)"
        )
    run_as = None
    if os.geteuid() == 0:
        try:
            run_as = pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise Unavailable(
                "running as root, and there is no 'postgres' account to run PostgreSQL as"
            ) from None
        if not (shutil.which("runuser") or shutil.which("su")):
            raise Unavailable("running as root, and neither runuser nor su is installed")
    # As root, under /tmp (world-searchable): the postgres account must reach the directory.
    root = Path(tempfile.mkdtemp(prefix="sockstack-pg-", dir="/tmp" if run_as else None))
    server = PgServer(bindir, root, 0, secrets.token_urlsafe(18), run_as)
    started = False
    try:
        if run_as is not None:
            os.chown(root, run_as.pw_uid, run_as.pw_gid)
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        pwfile.chmod(0o600)
        if run_as is not None:
            os.chown(pwfile, run_as.pw_uid, run_as.pw_gid)
        # -N: initdb does not fsync its template files (a throwaway cluster; seconds saved).
        # The server itself runs with fsync on.
        init = server.run(
            "initdb",
            "-D",
            str(server.data),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--no-locale",
            "-E",
            "UTF8",
            "-N",
            timeout=deadline,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr[-2000:]}")
        pwfile.unlink()
        conf = server.data / "postgresql.conf"
        base = conf.read_text()
        for attempt in range(3):  # a port taken between our probe and the server's bind: again
            server.port = _free_port()
            conf.write_text(
                base
                + "\n# sockstack tests (tests/edge/pg.py)\n"
                + f"listen_addresses = '127.0.0.1'\nport = {server.port}\n"
                + f"unix_socket_directories = '{root}'\n"
                + "fsync = on\nsynchronous_commit = on\nmax_connections = 40\n"
                + "shared_buffers = 32MB\n"
            )
            start = server.run(
                "pg_ctl",
                "start",
                "-D",
                str(server.data),
                "-l",
                str(root / "log"),
                "-w",  # pg_ctl polls the server until it accepts connections (or -t passes)
                "-t",
                str(int(deadline)),
                timeout=deadline + 5,
            )
            started = start.returncode == 0
            if started or "could not bind" not in server.log_tail() or attempt == 2:
                break
        if not started:
            raise RuntimeError(f"PostgreSQL did not start: {start.stderr}\n{server.log_tail()}")
        _wait_ready(server, deadline)
        yield server
    finally:
        try:
            if started:
                stop = server.run("pg_ctl", "stop", "-D", str(server.data), "-m", "fast", "-w")
                if stop.returncode != 0:
                    raise RuntimeError(f"pg_ctl stop failed: {stop.stderr}")
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _wait_ready(server: PgServer, deadline: float) -> None:
    """pg_isready until it answers "accepting connections", within ``deadline`` seconds (pg_ctl
    -w already waited: this is a bounded confirmation, usually one call)."""
    end = time.monotonic() + deadline
    while True:
        ready = server.run(
            "pg_isready", "-h", "127.0.0.1", "-p", str(server.port), "-t", "5", timeout=10
        )
        if ready.returncode == 0:
            return
        if time.monotonic() > end:
            raise RuntimeError(f"PostgreSQL not ready: {ready.stdout}\n{server.log_tail()}")
        time.sleep(0.1)  # a pause between bounded retries, not a wait for an event
