"""``sockstack call`` and ``sockstack ping``: call a method and print its result; PING/PONG
round-trip times."""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import IO, Any

from sockstack.cli.common import (
    EXIT_OK,
    UsageError,
    add_client_arguments,
    check_files,
    client_options,
    format_result,
    load_secret,
    parse_value,
)
from sockstack.clients import connect
from sockstack.errors import CallError, CallTimeout, ErrorCode, RemoteError

__all__ = ["add_parsers", "run_call", "run_ping"]


def run_call(args: argparse.Namespace) -> int:
    kwargs = {}
    for item in args.kw or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--kw {item!r}: expected KEY=VALUE")
        kwargs[key] = parse_value(value)
    values = [parse_value(a) for a in args.args]
    source = _open_items(args)  # before connecting: a file that cannot be read sends nothing
    deadline = time.monotonic() + args.timeout  # --timeout bounds the command: connect + call
    with connect(
        args.url, timeout=args.timeout, codec=args.codec, **_client_options(args)
    ) as client:
        try:
            if source is not None:
                try:
                    result = client.upload_request(
                        args.method,
                        read_items(source, deadline),
                        values,
                        kwargs,
                        timeout=left(deadline, args),
                    )
                finally:
                    if source is not sys.stdin:
                        source.close()
                print(format_result(result))
                return EXIT_OK
            if not args.stream:
                try:
                    result = client.request(
                        args.method, values, kwargs, timeout=left(deadline, args)
                    )
                except RemoteError as exc:
                    # A generator method refuses a plain call before it runs: stream it.
                    if exc.code != ErrorCode.STREAM_MISMATCH or args.url.startswith("udp"):
                        raise
                else:
                    print(format_result(result))
                    return EXIT_OK
            stream = client.stream_request(
                args.method, values, kwargs, timeout=left(deadline, args)
            )
            with stream:
                for item in stream:  # each as it comes, one a line
                    print(format_result(item), flush=True)
            if stream.result is not None:  # a generator's return value: not an item
                print(f"result: {format_result(stream.result)}", file=sys.stderr)
        except CallTimeout:  # say the command's --timeout, not what was left of it
            raise CallTimeout(args.method, args.timeout) from None
    return EXIT_OK


def _open_items(args: argparse.Namespace) -> IO[str] | None:
    """``--items-from``'s file (``-``: standard input), open; None without the option."""
    path = args.items_from
    if path is None:
        return None
    if args.stream:
        raise UsageError("--items-from uploads, --stream streams: a call does one or the other")
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")  # closed after the call
    except OSError as exc:
        raise UsageError(f"--items-from {path}: {exc.strerror or exc}") from None


def read_items(lines: IO[str], deadline: float | None = None) -> Iterator[Any]:
    """The items of an upload, one a line, each parsed as an ARG is (JSON when it parses, else
    the text); blank lines are skipped. Read as the upload sends them (a file of any size, or a
    pipe that is still being written). With a ``deadline`` (``time.monotonic()``), the lines
    are read by a thread of their own, at most about 1 MiB ahead, and a source that gives no line
    before the deadline (an idle pipe) raises :class:`CallTimeout`: ``--timeout`` bounds the
    command even while it waits for its input."""
    if deadline is None:
        source: Iterator[str] = iter(lines)
    else:
        source = _lines_until(lines, deadline)
    for line in source:
        text = line.rstrip("\r\n")
        if text.strip():
            yield parse_value(text)


_EOF = object()
_AHEAD_BYTES = 1 << 20  # lines read ahead of the upload, at most (one longer line alone)


def _lines_until(lines: IO[str], deadline: float) -> Iterator[str]:
    ahead: deque[object] = deque()
    held = [0]  # characters of the lines read ahead
    cond = threading.Condition()

    def pump() -> None:
        def put(item: object, size: int) -> None:
            with cond:
                # Room for it (or nothing ahead: a line longer than the bound goes alone).
                cond.wait_for(lambda: not ahead or held[0] + size <= _AHEAD_BYTES)
                ahead.append(item)
                held[0] += size
                cond.notify_all()

        try:
            for line in lines:
                put(line, len(line))
        except (OSError, ValueError) as exc:  # (closed meanwhile: the command has ended)
            put(exc, 0)
        put(_EOF, 0)

    threading.Thread(target=pump, name="items-from", daemon=True).start()
    while True:
        with cond:
            if not cond.wait_for(lambda: bool(ahead), max(0.0, deadline - time.monotonic())):
                raise CallTimeout("--items-from", 0, "no item came within the timeout")
            got = ahead.popleft()
            if isinstance(got, str):
                held[0] -= len(got)
            cond.notify_all()
        if got is _EOF:
            return
        if isinstance(got, Exception):
            raise got
        yield str(got)


def left(deadline: float, args: argparse.Namespace) -> float:
    """What remains of the command's ``--timeout`` for its call, after connecting."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise CallTimeout(args.method, args.timeout, "connecting took all of it")
    return remaining


def _p50_p99(values: list[float]) -> tuple[float, float]:
    """By ``statistics.quantiles`` ("inclusive", as the bench): one value is its own p50/p99."""
    if len(values) < 2:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


def run_ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    rtts: list[float] = []
    lost = 0
    with connect(args.url, timeout=args.timeout, **_client_options(args)) as client:
        for _ in range(args.count):
            try:
                rtts.append(client.ping())
            except CallError as exc:
                if not args.url.startswith("udp"):
                    raise
                lost += 1
                last = exc
    if not rtts:
        raise last
    rtts.sort()
    us = [r * 1e6 for r in rtts]
    p50, p99 = _p50_p99(us)
    print(
        f"{args.count} pings to {args.url}, {lost} lost: "
        f"min {us[0]:.1f} µs, p50 {p50:.1f} µs, p99 {p99:.1f} µs, max {us[-1]:.1f} µs"
    )
    return EXIT_OK


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``client_options``, and for ``name://SERVICE`` URLs the name service (``--names``, else
    $SOCKSTACK_NAMES, else 127.0.0.1:5055) and TLS when --ca/--cert is given (for servers
    announced with tls:// URLs)."""
    if not args.url.startswith("name://"):
        return client_options(args)
    options: dict[str, Any] = {"secret": load_secret(args), "names": args.names}
    if args.ca or args.cert:
        from sockstack.transport.tls import client_context

        if args.key and not args.cert:
            raise UsageError("--key needs --cert")
        check_files(("--ca", args.ca), ("--cert", args.cert), ("--key", args.key))
        try:
            options["tls"] = client_context(args.ca, cert=args.cert, key=args.key)
        except (OSError, ValueError) as exc:
            raise UsageError(f"TLS files: {exc}") from None
    return options


def _add_names(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--names",
        metavar="URL",
        help="name://SERVICE URLs: the name service to find SERVICE's servers at (default "
        "$SOCKSTACK_NAMES, else tcp://127.0.0.1:5055); each call goes to one of them",
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser(
        "call",
        help="call a method and print its result",
        description="Call METHOD on the server at URL. Each ARG is parsed as JSON when it parses "
        '(3, true, [1,2], "text"), else taken as a string. A method that streams (a generator) '
        "prints its items as they come, one a line (TCP and TLS; a return value other than "
        "None goes to stderr as 'result: ...'); Ctrl-C stops it on the server too. A method that "
        "takes an item stream gets FILE's lines with --items-from FILE.",
    )
    add_client_arguments(c)
    _add_names(c)
    c.add_argument("method")
    c.add_argument("args", nargs="*", metavar="ARG")
    c.add_argument(
        "--kw", action="append", metavar="KEY=VALUE", help="keyword argument, repeatable"
    )
    c.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds for the whole command, a stream included (default 10)",
    )
    c.add_argument(
        "--stream",
        action="store_true",
        help="call METHOD as a stream at once (without: a plain call first, which a generator "
        "method refuses before it runs, then the stream)",
    )
    c.add_argument(
        "--items-from",
        metavar="FILE",
        help="upload: FILE's lines (one value a line, parsed as ARG is; blank lines skipped; "
        "'-': standard input) are the item stream of METHOD, which takes one (TCP and TLS)",
    )
    c.add_argument(
        "--codec",
        default="msgpack",
        choices=["msgpack", "json"],
        help="presentation codec (default msgpack)",
    )

    g = sub.add_parser(
        "ping",
        help="measure round-trip times with PING/PONG",
        description="Send PING frames one after the other and print min/p50/p99/max round-trip "
        "time. Over UDP a lost ping is counted, not retried.",
    )
    add_client_arguments(g)
    _add_names(g)
    g.add_argument("--count", type=int, default=10, help="number of pings (default 10)")
    g.add_argument("--timeout", type=float, default=2.0, help="seconds per ping (default 2)")
