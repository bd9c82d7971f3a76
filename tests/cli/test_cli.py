"""The `sockstack` command as a user runs it: real subprocesses, real sockets."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import Proc, _env, free_port, run, serving
from tests.conftest import timeout


@pytest.mark.parametrize(
    "sub",
    [[], ["serve"], ["broker"], ["pub"], ["sub"], ["call"], ["ping"], ["inspect"]],
)
def test_help(sub: list[str]) -> None:
    out = run(["sockstack", *sub, "--help"])
    assert out.returncode == 0
    assert "usage: sockstack" in out.stdout
    if sub:
        assert sub[0] in out.stdout.splitlines()[0]


def test_call_and_ping_both_transports(demo_server: tuple[str, str]) -> None:
    for url in demo_server:
        out = run(["sockstack", "call", url, "add", "2", "3"])
        assert (out.returncode, out.stdout) == (0, "5\n")
        out = run(["sockstack", "call", url, "echo", "hello world"])
        assert out.stdout == "hello world\n"
        out = run(["sockstack", "call", url, "echo", '{"a": [1, true, null]}'])
        assert out.stdout == '{"a": [1, true, null]}\n'
        out = run(["sockstack", "ping", url, "--count", "20"])
        assert out.returncode == 0 and "20 pings" in out.stdout and "p99" in out.stdout


def test_key_value_store_shared_across_transports(demo_server: tuple[str, str]) -> None:
    tcp, udp = demo_server
    assert run(["sockstack", "call", udp, "set", "room", "21.5"]).stdout == "true\n"
    assert run(["sockstack", "call", tcp, "get", "room"]).stdout == "21.5\n"
    assert run(["sockstack", "call", tcp, "get", "nothing", "--kw", "default=0"]).stdout == "0\n"


def test_exit_codes_and_one_line_errors(demo_server: tuple[str, str]) -> None:
    tcp, _ = demo_server
    out = run(["sockstack", "call", tcp, "nope"])
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "sockstack: remote error: UNKNOWN_METHOD: no method 'nope'"
    ]
    out = run(["sockstack", "call", tcp, "add", "1"])
    assert out.returncode == 1 and "BAD_ARGUMENTS" in out.stderr
    out = run(["sockstack", "call", "tcp://127.0.0.1", "add"])
    assert out.returncode == 2 and "missing :port" in out.stderr
    out = run(["sockstack", "call", f"tcp://127.0.0.1:{free_port()}", "add", "1", "2"])
    assert out.returncode == 3 and len(out.stderr.strip().splitlines()) == 1
    assert "refused" in out.stderr
    out = run(["sockstack", "call", tcp, "sleep", "5", "--timeout", "0.2"])
    assert out.returncode == 3 and "got no answer within 0.2 s" in out.stderr
    out = run(["sockstack", "serve", "no_such_module:X"])
    assert out.returncode == 2 and "cannot import" in out.stderr


def test_serve_a_user_module_and_drain_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "slow_service.py").write_text(
        "import asyncio\n"
        "from sockstack import Service, method\n"
        "class Slow(Service):\n"
        "    @method\n"
        "    async def slow(self, x):\n"
        "        print('started', x, flush=True)\n"
        "        await asyncio.sleep(0.5)\n"
        "        return x * 2\n"
    )
    proc = Proc(["sockstack", "serve", "slow_service:Slow", "--tcp", "127.0.0.1:0"], cwd=tmp_path)
    signalled = False
    try:
        url = proc.wait_line(r"serving Slow on (tcp://\S+)").group(1)
        caller = Proc(["sockstack", "call", url, "slow", "21"])
        proc.wait_line(r"^started 21$")  # the call is running on the server: now stop it
        proc.popen.send_signal(signal.SIGTERM)
        signalled = True
        assert caller.wait_line(r"^\d+$").group(0) == "42"  # answered despite the shutdown
        assert caller.wait() == 0
    finally:
        # One SIGTERM only: a second one could land after the handlers are gone, mid-exit.
        code = proc.wait() if signalled else proc.stop(signal.SIGTERM)
    assert code == 0
    assert "server stopped" in proc.stderr()


def test_serve_function_runs_until_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        "import logging, sys\n"
        "from sockstack import Service, method, serve\n"
        "class Hi(Service):\n"
        "    @method\n"
        "    def hi(self, name):\n"
        "        return f'hi {name}'\n"
        "if __name__ == '__main__':\n"
        "    logging.basicConfig(stream=sys.stdout, level=logging.DEBUG)\n"
        "    serve(Hi(), tcp=['127.0.0.1:0'], udp=['127.0.0.1:0'])\n"
        "    print('stopped', flush=True)\n"
    )
    proc = Proc([sys.executable, str(script)], cwd=tmp_path)
    try:
        url = proc.wait_line(r"serving Hi on (tcp://\S+)").group(1)
        assert run(["sockstack", "call", url, "hi", "you"]).stdout == "hi you\n"
        proc.popen.send_signal(signal.SIGTERM)
        proc.wait_line("^stopped$")  # serve() returned after the drain
        assert proc.wait() == 0
    finally:
        if proc.popen.poll() is None:
            proc.stop(signal.SIGKILL)


def test_wait_line_has_a_deadline_in_all() -> None:
    # A process that prints another line every 0.1 s for a minute: waiting 1 s for a line that
    # never comes ends while it still prints (each line used to restart the wait).
    chatter = "import time\nfor i in range(600):\n    print(i, flush=True)\n    time.sleep(0.1)\n"
    proc = Proc([sys.executable, "-c", chatter])
    try:
        with pytest.raises(AssertionError, match="no line matching"):
            proc.wait_line("never printed", seconds=1)
        assert proc.popen.poll() is None  # it ended on its deadline, not with the process
    finally:
        proc.stop()


def test_call_prints_a_streams_items_as_they_come(demo_server: tuple[str, str]) -> None:
    """A generator method (the demo's ``count``) refuses a plain call before it runs; ``call``
    then streams it and prints each item on its own line as it arrives (the second item is
    on stdout while the command still runs), ``--stream`` at once; Ctrl-C stops it."""
    tcp, udp = demo_server
    out = run(["sockstack", "call", tcp, "count", "3"])
    assert (out.returncode, out.stdout, out.stderr) == (0, "0\n1\n2\n", "")
    out = run(["sockstack", "call", tcp, "count", "4", "--stream"])
    assert (out.returncode, out.stdout) == (0, "0\n1\n2\n3\n")
    out = run(["sockstack", "call", tcp, "add", "2", "3", "--stream"])  # not a generator
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "result: 5\n")
    out = run(["sockstack", "call", udp, "count", "3"])  # streams need TCP or TLS
    assert out.returncode == 1 and "STREAM_MISMATCH" in out.stderr
    out = run(["sockstack", "call", tcp, "count", "2000000"])
    assert out.returncode == 1 and "n must be between 0 and 1000000" in out.stderr

    slow = Proc(["sockstack", "call", tcp, "count", "1000", "--kw", "interval=0.05"])
    try:
        slow.wait_line("^0$")
        slow.wait_line("^1$")
        assert slow.popen.poll() is None  # printed while the stream goes on
    finally:
        code = slow.stop(signal.SIGINT)
    assert code == 130, slow.stderr()


def test_work_slice_flag() -> None:
    """``--work-slice SECONDS`` (ServerLimits.work_slice) is accepted by serve, passed on to
    its workers, and refused when not a positive number."""
    from tests.cli.conftest import serving

    for bad in ("0", "-1", "inf", "soon"):
        out = run(["sockstack", "serve", "--tcp", "127.0.0.1:0", "--work-slice", bad])
        assert out.returncode == 2, (bad, out.stderr)
        assert "--work-slice" in out.stderr
    for extra in ([], ["--workers", "2"]):
        with serving("--work-slice", "0.001", *extra) as proc:
            out = run(["sockstack", "call", proc.urls[0], "add", "2", "3"])
            assert (out.returncode, out.stdout) == (0, "5\n"), out.stderr


SINK = '''\
from collections.abc import Iterator

from sockstack import Service, method


class Sink(Service):
    @method
    def total(self, scale: int, items: Iterator[int]) -> int:
        """Sum of the items, scaled."""
        return scale * sum(items)
'''


def test_call_uploads_a_files_lines_as_an_item_stream(tmp_path: Path) -> None:
    """``--items-from FILE`` (or ``-``: standard input): each line an item, parsed as an ARG
    is; a bad item is the server's BAD_ARGUMENTS; a file that cannot be read sends nothing."""
    (tmp_path / "sink.py").write_text(SINK)
    items = tmp_path / "items.txt"
    items.write_text("1\n2\n\n3\n")
    with serving(f"{tmp_path / 'sink.py'}:Sink") as proc:
        tcp, udp = proc.urls
        out = run(["sockstack", "call", tcp, "total", "2", "--items-from", str(items)])
        assert (out.returncode, out.stdout, out.stderr) == (0, "12\n", "")
        many = subprocess.run(
            ["sockstack", "call", tcp, "total", "1", "--items-from", "-"],
            input="".join(f"{i}\n" for i in range(100_000)),  # several windows, from a pipe
            capture_output=True,
            text=True,
            timeout=timeout(30),
            env=_env(),
        )
        assert (many.returncode, many.stdout) == (0, f"{sum(range(100_000))}\n")
        items.write_text("1\nx\n")
        out = run(["sockstack", "call", tcp, "total", "2", "--items-from", str(items)])
        assert out.returncode == 1 and "parameter 'items', item 1" in out.stderr
        out = run(["sockstack", "call", tcp, "total", "2", "--items-from", "/nonexistent"])
        assert out.returncode == 2 and "--items-from /nonexistent" in out.stderr
        out = run(["sockstack", "call", udp, "total", "2", "--items-from", str(items)])
        assert out.returncode == 3 and "uploads need TCP or TLS" in out.stderr  # refused here
        out = run(["sockstack", "call", tcp, "total", "2"])  # it takes an item stream
        assert out.returncode == 1 and "upload()" in out.stderr


def test_items_from_an_idle_pipe_end_at_the_timeout(tmp_path: Path) -> None:
    """``--timeout`` bounds the command while it waits for its input too: a pipe that gives one
    line and then nothing (still open) ends the upload at the timeout, exit 3, not never."""
    (tmp_path / "sink.py").write_text(SINK)
    with serving(f"{tmp_path / 'sink.py'}:Sink") as proc:
        tcp = proc.urls[0]
        cmd = ["sockstack", "call", tcp, "total", "1", "--items-from", "-", "--timeout", "1"]
        p = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert p.stdin is not None
        try:
            p.stdin.write("1\n")
            p.stdin.flush()  # and nothing more: the pipe stays open (communicate would close it)
            p.wait(timeout(15))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise AssertionError("the command outlived its --timeout by far") from None
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        p.stdin.close()
        p.stdout.close()
        p.stderr.close()
        assert p.returncode == 3, err
        assert "1 s" in err and out == ""


def test_items_from_reads_at_most_about_a_mebibyte_ahead() -> None:
    """--items-from's reader thread holds at most ~1 MiB of lines the upload has not taken
    (not a count of lines: they may be long); memory measured with tracemalloc."""
    import threading
    import time
    import tracemalloc
    from collections.abc import Iterator

    from sockstack.cli.client import read_items

    line = '"' + "x" * 10_000 + '"\n'  # ~10 KB a line; 20 MiB offered in all
    read = [0]

    class Source:
        def __iter__(self) -> Iterator[str]:
            for _ in range(2_000):
                read[0] += 1
                yield line

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        items = read_items(Source(), time.monotonic() + timeout(30))  # type: ignore[arg-type]
        assert len(next(items)) == 10_000
        bound = (1 << 20) // len(line) + 2  # lines ahead at most (one over, one taken)
        pause = threading.Event()
        for _ in range(2000):  # until the reader has filled what it may (bounded)
            if read[0] >= bound - 1:
                break
            pause.wait(0.001)
        for _ in range(50):  # room for a reader that would go on
            pause.wait(0.001)
        held = tracemalloc.get_traced_memory()[0] - before
        assert bound - 1 <= read[0] <= bound + 1, read[0]
        assert held < 3 << 20, held  # ~1 MiB of lines ahead, not 20
        assert sum(1 for _ in items) == 1_999  # the rest, in order, as it is taken
        assert read[0] == 2_000
    finally:
        tracemalloc.stop()
