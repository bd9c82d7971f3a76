"""The ``sockstack`` command: ``serve``, ``call`` and ``ping``.

Exit codes: 0 success; 1 the server answered with an error; 2 bad usage; 3 no connection, lost
connection or timeout. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import ssl
import sys
from typing import Any

from sockstack.errors import CallError, CallTimeout, RemoteError, SockstackError
from sockstack.protocol.datagram import DEFAULT_MAX_DATAGRAM
from sockstack.protocol.frames import DEFAULT_MAX_FRAME
from sockstack.rpc.blocking import connect
from sockstack.rpc.server import Server, ServerLimits
from sockstack.transport.loop import run
from sockstack.transport.tcp import StreamLimits
from sockstack.transport.urls import (
    DEFAULT_BROKER_TCP_PORT,
    DEFAULT_BROKER_UDP_PORT,
    DEFAULT_TCP_PORT,
    DEFAULT_UDP_PORT,
    parse_endpoint,
)

__all__ = ["main"]

_DEFAULT_LIMITS = ServerLimits()
EXIT_OK, EXIT_REMOTE, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3
log = logging.getLogger("sockstack")


class _UsageError(Exception):
    pass


def parse_value(text: str) -> Any:
    """A command-line argument: JSON when it parses (``3``, ``true``, ``[1,2]``), else a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_result(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    return json.dumps(value, ensure_ascii=False, default=repr)


def load_service(spec: str) -> object:
    """``module:Class`` (module importable from the current directory) -> a service instance."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise _UsageError(f"service {spec!r}: expected module:Class, e.g. demo_service:Calculator")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _UsageError(f"cannot import {module_name!r}: {exc}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise _UsageError(f"module {module_name!r} has no {attr!r}") from None
    return obj() if isinstance(obj, type) else obj


# ------------------------------------------------------------------------------------ serve


async def _serve(args: argparse.Namespace) -> int:
    if not args.no_malloc_tuning:
        from sockstack.transport.memory import tune_malloc

        tune_malloc()
    service: object
    if args.command == "broker":
        from sockstack.rpc.service import Service

        service = Service()
    elif args.service:
        service = load_service(args.service)
    else:
        from sockstack.demo import Demo

        service = Demo()
    tcp, udp, tls = args.tcp or [], args.udp or [], args.tls or []
    if not tcp and not udp and not tls:
        if args.command == "broker":
            tcp, udp = (
                [f"127.0.0.1:{DEFAULT_BROKER_TCP_PORT}"],
                [f"127.0.0.1:{DEFAULT_BROKER_UDP_PORT}"],
            )
        else:
            tcp, udp = [f"127.0.0.1:{DEFAULT_TCP_PORT}"], [f"127.0.0.1:{DEFAULT_UDP_PORT}"]
    tls_context = _server_tls(args)
    limits = ServerLimits(
        stream=StreamLimits(
            max_frame=args.max_frame,
            handshake_timeout=args.handshake_timeout or None,
            keepalive_interval=args.keepalive or None,
            keepalive_timeout=args.keepalive or 20.0,
            max_outbound=args.max_outbound,
        ),
        max_in_flight=args.max_in_flight,
        max_connections=args.max_connections,
        max_datagram=args.max_datagram,
        drain_timeout=args.drain_timeout,
    )
    try:
        server = Server(
            service,
            tcp=tcp,
            udp=udp,
            tls=tls,
            tls_context=tls_context,
            limits=limits,
            expose_errors=not args.hide_errors,
            reuse_port=args.reuse_port,
            secret=load_secret(args),
            broker=args.broker,
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    try:
        await server.start()
    except OSError as exc:
        print(f"sockstack: error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONNECTION
    name = "broker" if args.command == "broker" else type(server.service).__name__
    if server.broker is not None and args.command != "broker":
        name += " and the broker"
    for ep in server.endpoints:
        print(f"serving {name} on {ep}", flush=True)
    first = server.endpoints[0]
    if args.command == "broker":
        print(
            f"try: sockstack sub {first} 'sensors.>'   and   sockstack pub {first} "
            "sensors.room1.temp 21.5   (Ctrl-C stops)",
            flush=True,
        )
    else:
        print(f"try: sockstack call {first} {_example_call(server)}   (Ctrl-C stops)", flush=True)
    await server.run(handle_signals=True)
    return EXIT_OK


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls:
        if args.cert or args.client_ca:
            raise _UsageError("--cert/--key/--client-ca need a --tls endpoint")
        return None
    if not args.cert:
        raise _UsageError("--tls needs --cert (and --key unless the key is in the cert file)")
    from sockstack.transport.tls import server_context

    try:
        return server_context(args.cert, args.key, client_ca=args.client_ca)
    except (OSError, ValueError) as exc:
        raise _UsageError(f"TLS files: {exc}") from None


def _serve_workers(args: argparse.Namespace) -> int:
    from sockstack.rpc.workers import run_workers

    if args.service:
        load_service(args.service)  # fail here, once, rather than in every worker
    tcp, udp, tls = args.tcp or [], args.udp or [], args.tls or []
    if not tcp and not udp and not tls:
        tcp, udp = [f"127.0.0.1:{DEFAULT_TCP_PORT}"], [f"127.0.0.1:{DEFAULT_UDP_PORT}"]
    _server_tls(args)  # check the files once, here
    worker_args = ["--log-level", args.log_level, "serve"]
    if args.service:
        worker_args.append(args.service)
    worker_args += [
        f"--max-frame={args.max_frame}",
        f"--max-datagram={args.max_datagram}",
        f"--max-in-flight={args.max_in_flight}",
        f"--max-connections={args.max_connections}",
        f"--max-outbound={args.max_outbound}",
        f"--handshake-timeout={args.handshake_timeout}",
        f"--keepalive={args.keepalive}",
        f"--drain-timeout={args.drain_timeout}",
    ]
    load_secret(args)  # check it once, here; workers read the same file or environment
    for flag, value in (
        ("--cert", args.cert),
        ("--key", args.key),
        ("--client-ca", args.client_ca),
        ("--secret-file", args.secret_file),
    ):
        if value:
            worker_args.append(f"{flag}={value}")
    if args.hide_errors:
        worker_args.append("--hide-errors")
    if args.no_malloc_tuning:
        worker_args.append("--no-malloc-tuning")
    return run_workers(worker_args, tcp, udp, args.workers, tls=tls)


def _example_call(server: Server) -> str:
    handlers = server.dispatcher.handlers
    if "add" in handlers:
        return "add 2 3"
    return next(iter(sorted(handlers)))


# ------------------------------------------------------------------------------ call, ping


SECRET_ENV = "SOCKSTACK_SECRET"


def load_secret(args: argparse.Namespace) -> bytes | None:
    """The shared secret from --secret-file, else from $SOCKSTACK_SECRET, else None. Never from
    a command-line value: those show in `ps` and in shell history."""
    if args.secret_file:
        try:
            with open(args.secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise _UsageError(f"--secret-file: {exc.strerror or exc}") from None
        if not secret:
            raise _UsageError(f"--secret-file {args.secret_file}: the file is empty")
        return secret
    value = os.environ.get(SECRET_ENV, "")
    return value.encode() if value else None


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """TLS and credential options shared by call and ping."""
    secret = load_secret(args)
    if not args.url.startswith("tls"):
        if args.ca or args.cert:
            raise _UsageError("--ca/--cert/--key are for tls:// URLs")
        return {"secret": secret}
    from sockstack.transport.tls import client_context

    if args.key and not args.cert:
        raise _UsageError("--key needs --cert")
    try:
        return {"tls": client_context(args.ca, cert=args.cert, key=args.key), "secret": secret}
    except (OSError, ValueError) as exc:
        raise _UsageError(f"TLS files: {exc}") from None


def _add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="tcp://host:port, tls://host:port or udp://host:port")
    p.add_argument(
        "--ca", metavar="FILE", help="tls://: trust this CA (PEM) instead of the system's"
    )
    p.add_argument("--cert", metavar="FILE", help="tls://: client certificate, PEM (mutual TLS)")
    p.add_argument("--key", metavar="FILE", help="tls://: private key of --cert, PEM")
    p.add_argument(
        "--secret-file",
        metavar="FILE",
        help="shared secret of the server, read from FILE (else from $SOCKSTACK_SECRET)",
    )


def _pub(args: argparse.Namespace) -> int:
    with connect(args.url, timeout=args.timeout, **_client_options(args)) as client:
        client.publish(args.topic, parse_value(args.value), qos=args.qos, retain=args.retain)
    return EXIT_OK


def _sub(args: argparse.Namespace) -> int:
    with connect(args.url, **_client_options(args)) as client:
        sub = client.subscribe(args.pattern, group=args.group, qos=args.qos)
        seen = 0
        while not args.count or seen < args.count:
            try:
                msg = sub.get(timeout=args.timeout or 365 * 86400.0)
            except CallTimeout:
                break
            print(f"{msg.topic} {json.dumps(msg.value, default=repr)}", flush=True)
            seen += 1
    return EXIT_OK


def _call(args: argparse.Namespace) -> int:
    kwargs = {}
    for item in args.kw or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise _UsageError(f"--kw {item!r}: expected KEY=VALUE")
        kwargs[key] = parse_value(value)
    values = [parse_value(a) for a in args.args]
    with connect(
        args.url, timeout=args.timeout, codec=args.codec, **_client_options(args)
    ) as client:
        result = client.request(args.method, values, kwargs)
    print(format_result(result))
    return EXIT_OK


def _percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def _ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise _UsageError("--count must be at least 1")
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
    print(
        f"{args.count} pings to {args.url}, {lost} lost: "
        f"min {us[0]:.1f} µs, p50 {_percentile(us, 0.5):.1f} µs, "
        f"p99 {_percentile(us, 0.99):.1f} µs, max {us[-1]:.1f} µs"
    )
    return EXIT_OK


# ------------------------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sockstack",
        description="Client/server over TCP and UDP sockets: serve a service, call it, ping it.",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING... (default INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Options shared by `serve` and `broker`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tcp",
        action="append",
        metavar="HOST:PORT",
        help="TCP endpoint, repeatable ([::1]:5050 for IPv6; port 0 picks one)",
    )
    common.add_argument(
        "--udp", action="append", metavar="HOST:PORT", help="UDP endpoint, repeatable"
    )
    common.add_argument(
        "--tls",
        action="append",
        metavar="HOST:PORT",
        help="TLS-over-TCP endpoint, repeatable (needs --cert and --key)",
    )
    common.add_argument("--cert", metavar="FILE", help="server certificate chain, PEM (for --tls)")
    common.add_argument("--key", metavar="FILE", help="private key of --cert, PEM")
    common.add_argument(
        "--client-ca",
        metavar="FILE",
        help="require client certificates signed by this CA, PEM (mutual TLS)",
    )
    common.add_argument(
        "--secret-file",
        metavar="FILE",
        help="shared secret every client must present (TCP: in HELLO; UDP: HMAC on every "
        "datagram), read from FILE (else from $SOCKSTACK_SECRET)",
    )
    common.add_argument(
        "--max-frame",
        type=int,
        default=DEFAULT_MAX_FRAME,
        help="largest frame (meta + body) accepted, bytes (default 1 MiB)",
    )
    common.add_argument(
        "--max-datagram",
        type=int,
        default=DEFAULT_MAX_DATAGRAM,
        help="largest UDP frame accepted or sent, bytes (default 65507)",
    )
    common.add_argument(
        "--max-in-flight",
        type=int,
        default=_DEFAULT_LIMITS.max_in_flight,
        help="requests running at once per TCP connection before the server stops "
        "reading it (default 1024)",
    )
    common.add_argument(
        "--max-connections",
        type=int,
        default=_DEFAULT_LIMITS.max_connections,
        help="TCP connections open at once; more are refused with CLOSE TOO_MANY_CONNECTIONS "
        "(default 10000; `ulimit -n` applies too)",
    )
    common.add_argument(
        "--max-outbound",
        type=int,
        default=_DEFAULT_LIMITS.stream.max_outbound,
        help="unsent bytes per connection (answers its client does not read) before the "
        "connection is reset; at least twice --max-frame (default 8 MiB)",
    )
    common.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        help="seconds a new TCP connection has to send HELLO; 0 disables (default 10)",
    )
    common.add_argument(
        "--keepalive",
        type=float,
        default=20.0,
        help="PING a silent connection after this many seconds, close it if no answer "
        "in as many again; 0 disables (default 20)",
    )
    common.add_argument(
        "--drain-timeout",
        type=float,
        default=_DEFAULT_LIMITS.drain_timeout,
        help="seconds to finish in-flight requests on shutdown (default 10)",
    )
    common.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the ports with SO_REUSEPORT, to use several cores "
        "(default 1)",
    )
    common.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT so that several processes serve the same port",
    )
    common.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's default malloc thresholds (by default large frames reuse heap "
        "memory instead of fresh pages: faster, keeps up to 64 MiB of freed memory)",
    )
    common.add_argument(
        "--hide-errors",
        action="store_true",
        help="send clients only the type of unexpected exceptions, not their message",
    )

    s = sub.add_parser(
        "serve",
        parents=[common],
        help="serve a service over TCP and/or UDP",
        description="Serve a service (module:Class; the built-in demo when omitted) until "
        "SIGINT/SIGTERM, which drain in-flight requests before exiting. Without --tcp/--udp: "
        f"tcp 127.0.0.1:{DEFAULT_TCP_PORT} and udp 127.0.0.1:{DEFAULT_UDP_PORT}.",
    )
    s.add_argument("service", nargs="?", help="module:Class, importable from the current directory")
    s.add_argument(
        "--broker",
        action="store_true",
        help="also host the publish/subscribe broker on the same ports",
    )
    k = sub.add_parser(
        "broker",
        parents=[common],
        help="run a publish/subscribe broker",
        description="Run the publish/subscribe broker alone until SIGINT/SIGTERM. Without "
        f"--tcp/--udp: tcp 127.0.0.1:{DEFAULT_BROKER_TCP_PORT} and udp "
        f"127.0.0.1:{DEFAULT_BROKER_UDP_PORT}. Subscribers need TCP (or TLS); UDP takes QoS 0 "
        "publishes.",
    )
    k.set_defaults(service=None, broker=True)

    pb = sub.add_parser(
        "pub",
        help="publish a message",
        description="Publish VALUE (JSON when it parses, else a string) to TOPIC.",
    )
    _add_client_arguments(pb)
    pb.add_argument("topic")
    pb.add_argument("value")
    pb.add_argument("--qos", type=int, choices=[0, 1], default=0, help="0 (default) or 1")
    pb.add_argument("--retain", action="store_true", help="keep as the topic's last message")
    pb.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    sb = sub.add_parser(
        "sub",
        help="subscribe and print messages",
        description="Subscribe to PATTERN (* is one token, > the rest) and print one line per "
        "message: the topic, a space, the value as JSON. Stops after --count messages or "
        "--timeout seconds without one.",
    )
    _add_client_arguments(sb)
    sb.add_argument("pattern")
    sb.add_argument("--group", help="queue group: members share the messages")
    sb.add_argument("--qos", type=int, choices=[0, 1], default=0, help="0 (default) or 1")
    sb.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    sb.add_argument(
        "--timeout", type=float, default=0.0, help="stop after this many seconds of silence"
    )

    c = sub.add_parser(
        "call",
        help="call a method and print its result",
        description="Call METHOD on the server at URL. Each ARG is parsed as JSON when it parses "
        '(3, true, [1,2], "text"), else taken as a string.',
    )
    _add_client_arguments(c)
    c.add_argument("method")
    c.add_argument("args", nargs="*", metavar="ARG")
    c.add_argument(
        "--kw", action="append", metavar="KEY=VALUE", help="keyword argument, repeatable"
    )
    c.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
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
    _add_client_arguments(g)
    g.add_argument("--count", type=int, default=10, help="number of pings (default 10)")
    g.add_argument("--timeout", type=float, default=2.0, help="seconds per ping (default 2)")
    i = sub.add_parser(
        "inspect",
        help="bytes on the wire per layer for one call, TCP and UDP side by side",
        description="Make one real echo call (to URL, or to a demo server started on loopback) "
        "and print the bytes each layer adds: Ethernet, IP, TCP (with the timestamps option "
        "Linux sends) or UDP, optionally TLS, the sockstack frame header, the method name, the "
        "codec, and the payload; with the efficiency (payload / total) and the effect of "
        "pipelining several frames per segment.",
    )
    i.add_argument("url", nargs="?", help="tcp://host:port of a server with an echo method")
    i.add_argument("--payload", type=int, default=64, help="bytes echoed (default 64)")
    i.add_argument(
        "--publish",
        metavar="TOPIC",
        help="measure a publish to TOPIC and the MSG a subscriber gets, instead of a call "
        "(URL, if given, must be a broker)",
    )
    i.add_argument("--ipv6", action="store_true", help="count IPv6 headers instead of IPv4")
    i.add_argument("--tls", action="store_true", help="add a TLS 1.3 record per message")
    i.add_argument("--mtu", type=int, default=1500, help="link MTU (default 1500, Ethernet)")

    b = sub.add_parser(
        "bench",
        help="benchmark sockstack side by side with raw sockets and peer libraries",
        description="Run the benchmark suite (see docs/PERFORMANCE.md): tables on the terminal, "
        "JSON, Markdown and a PNG chart under --out. Peers that are not installed are skipped "
        "and listed; `make bench` installs them.",
    )
    from sockstack.bench import add_arguments

    add_arguments(b)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command in ("serve", "broker"):
            if args.broker and args.workers > 1:
                raise _UsageError(
                    "the broker keeps its subscriptions in one process: no --workers with it"
                )
            if args.workers > 1:
                return _serve_workers(args)
            if args.workers < 1:
                raise _UsageError("--workers must be at least 1")
            return run(_serve(args))
        if args.command == "inspect":
            from sockstack.overhead import capture_exchange, render

            if args.payload < 0:
                raise _UsageError("--payload must be 0 or more")
            if args.publish:
                from sockstack.overhead import capture_publish

                ex = capture_publish(args.url, args.payload, args.publish)
            else:
                ex = capture_exchange(args.url, args.payload)
            render(ex, ipv6=args.ipv6, tls=args.tls, mtu=args.mtu)
            return EXIT_OK
        if args.command == "bench":
            from sockstack.bench import run as run_bench

            return run_bench(args)
        if args.url:
            parse_endpoint(args.url)
        if args.command == "pub":
            return _pub(args)
        if args.command == "sub":
            return _sub(args)
        return _call(args) if args.command == "call" else _ping(args)
    except _UsageError as exc:
        print(f"sockstack: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RemoteError as exc:
        print(f"sockstack: remote error: {exc}", file=sys.stderr)
        return EXIT_REMOTE
    except (ValueError, SockstackError) as exc:
        is_usage = isinstance(exc, ValueError) and not isinstance(exc, CallError)
        print(f"sockstack: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if is_usage else EXIT_CONNECTION
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
