"""``sockstack serve`` and ``sockstack broker``: a service, the broker, or both, on TCP, TLS and
UDP endpoints; ``--workers N`` processes sharing the ports."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import inspect
import logging
import os
import shlex
import ssl
import sys
from typing import Any

from sockstack.asyncio.stream import StreamLimits
from sockstack.cli.common import EXIT_CONNECTION, EXIT_OK, UsageError, check_files, load_secret
from sockstack.demo import Counter as DemoCounter
from sockstack.demo import Demo
from sockstack.host.pattern import Pattern
from sockstack.host.server import Server, ServerLimits, refuse_unprotected
from sockstack.host.workers import report_ready, take_ready_fd
from sockstack.protocol.datagram import DEFAULT_MAX_DATAGRAM
from sockstack.protocol.frames import DEFAULT_MAX_FRAME
from sockstack.pubsub.pattern import PubSub
from sockstack.rpc.pattern import RPC
from sockstack.transport.loop import run
from sockstack.transport.urls import (
    DEFAULT_BROKER_TCP_PORT,
    DEFAULT_BROKER_UDP_PORT,
    DEFAULT_TCP_PORT,
    DEFAULT_UDP_PORT,
    Endpoint,
    parse_endpoint,
)

__all__ = ["add_parsers", "load_service", "run_serve"]

_DEFAULT_LIMITS = ServerLimits()
_log = logging.getLogger("sockstack.cli")


def _positive_seconds(text: str) -> float:
    """argparse type: a number of seconds above 0 (finite)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return value


def load_service(spec: str, create: bool = True) -> object:
    """``module:Class`` (a module importable from the current directory) or
    ``path/to/file.py:Class`` (the file's directory is put first on ``sys.path``, as Python does
    for a script, so its own imports work) -> a service instance. ``Class`` is instantiated with
    no arguments; a name that is not a class is served as it is (an instance). ``create=False``
    (``--workers``' supervisor, which serves nothing): the class is imported and its signature
    checked, not instantiated (each worker creates its own: N instances, not N + 1; a service
    whose ``__init__`` opens a database connection opens one per worker).

    Whatever keeps the service from loading (no such module or file, a syntax error, an
    exception while importing, a class whose ``__init__`` needs arguments) is a
    :class:`UsageError`, one line; ``--log-level DEBUG`` logs the traceback too."""
    target, colon, attr = spec.rpartition(":")
    if not colon or not target or not attr or not attr.isidentifier():
        raise UsageError(
            f"service {spec!r}: expected module:Class or path/to/file.py:Class, e.g. "
            "examples/demo_service.py:Calculator"
        )
    path = None  # the file named, when a path is given
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            why = "not a file" if os.path.exists(path) else "no such file"
            raise UsageError(f"service {spec!r}: {target}: {why}")
        directory, module_name = os.path.split(path)
        module_name = module_name.removesuffix(".py")
        if not module_name.isidentifier():
            raise UsageError(f"service {spec!r}: {module_name!r} is not a valid module name")
        if directory not in sys.path:
            sys.path.insert(0, directory)
    else:
        module_name = target
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else module_name
        raise UsageError(f"cannot import {module_name!r}: {exc.msg} ({where})") from None
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        _log.debug("importing %s failed", module_name, exc_info=True)
        raise UsageError(
            f"cannot import {module_name!r}: it raised {type(exc).__name__}: {exc}"
        ) from None
    if path is not None:
        loaded = os.path.abspath(getattr(module, "__file__", "") or "")
        if loaded != path:  # an installed module of the same name was found first
            raise UsageError(
                f"service {spec!r}: importing {module_name!r} found {loaded or 'a built-in'}, "
                "not this file: rename the file"
            )
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise UsageError(f"module {module_name!r} has no {attr!r}") from None
    if not isinstance(obj, type):
        return obj
    try:
        inspect.signature(obj).bind()
    except TypeError as exc:
        raise UsageError(
            f"cannot create {attr}(): {exc}; serve needs a class that takes no arguments, or "
            "the name of an instance (module:name)"
        ) from None
    except ValueError:
        pass  # no signature to check (a builtin): let the call say
    if not create:
        return obj
    try:
        return obj()
    except Exception as exc:
        _log.debug("%s() failed", attr, exc_info=True)
        raise UsageError(f"cannot create {attr}(): {type(exc).__name__}: {exc}") from None


async def _serve(args: argparse.Namespace) -> int:
    if not args.no_malloc_tuning:
        from sockstack.transport.memory import tune_malloc

        tune_malloc()
    # The server is built as every server is: a host with the patterns it serves.
    patterns: list[Pattern] = []
    if args.sink:  # the cloud side of edge relays (docs/EDGE.md)
        from sockstack.edge.pattern import Sink
        from sockstack.edge.sink import open_sink

        try:
            patterns.append(Sink(open_sink(args.sink)))
        except Exception as exc:
            raise UsageError(f"--sink {args.sink}: {exc}") from None
    if args.command != "broker" and (args.service or not args.sink):
        if args.service:
            service = load_service(args.service)
        else:
            service = Demo()
        patterns.append(RPC(service, allow_empty=args.broker))
        if not args.service:  # the demo's remote object too (TCP and TLS: a session each)
            from sockstack.objects.pattern import Objects

            objects = Objects()
            objects.register("counter", DemoCounter)  # one per client session
            patterns.append(objects)
    link = None
    if args.command == "broker" or args.broker:
        pubsub = PubSub(_broker(args))
        patterns.append(pubsub)
        if args.cluster:
            link = _cluster_link(pubsub, args)
    if args.http:
        from sockstack.gateway import Gateway

        try:
            patterns.append(Gateway(args.http, cors=args.cors or ()))
        except ValueError as exc:
            raise UsageError(f"--http: {exc}") from None
    tcp, udp, tls = args.tcp or [], args.udp or [], args.tls or []
    if not tcp and not udp and not tls and not args.http:
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
            frame_timeout=args.frame_timeout or None,
        ),
        max_in_flight=args.max_in_flight,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        max_handshakes_per_address=args.max_handshakes_per_address,
        max_partial_bytes=args.max_partial_bytes,
        max_datagram=args.max_datagram,
        drain_timeout=args.drain_timeout,
        work_slice=args.work_slice,
    )
    metrics, metrics_at = _metrics(args)
    try:
        server = Server(
            patterns=patterns,
            tcp=tcp,
            udp=udp,
            tls=tls,
            tls_context=tls_context,
            limits=limits,
            expose_errors=not args.hide_errors,
            reuse_port=args.reuse_port,
            secret=load_secret(args),
            insecure=args.insecure,
            interceptors=[metrics] if metrics is not None else (),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if link is not None:  # joined (retained messages fetched) before clients come
        from sockstack.errors import ConnectError

        try:
            await link.start()
        except ConnectError as exc:
            print(f"sockstack: error: --cluster: {exc}", file=sys.stderr)
            return EXIT_CONNECTION
    try:
        await server.start()
        http = metrics.serve(*metrics_at) if metrics is not None else None
    except OSError as exc:
        await server.shutdown()
        if link is not None:
            await link.close()
        print(f"sockstack: error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONNECTION

    announcer: list[Any] = []  # --announce: started once listening, closed after the stop

    def ready() -> None:  # after the signal handlers: Ctrl-C once the banner shows is graceful
        if args.announce:
            from sockstack.discovery.announce import announce_from_args

            a = announce_from_args(server, args)
            if a is not None:  # withdrawn as the stop begins, before the drain
                announcer.append(a)
                server.on_shutdown.append(a.aclose)
        lines = banner(server, args)
        if http is not None:  # the bound port (--metrics HOST:0 picks one), before "Ctrl-C"
            host, port = http[0].server_address[:2]
            where = _local(Endpoint("http", str(host), int(port)))
            lines.insert(len(lines) - 1, f"metrics on {where}/metrics")
        for line in lines:
            print(line, flush=True)
        # What start-up made lives as long as the process: out of the collector's sight, so
        # that its full collections, which a flood of messages or calls triggers, do not walk
        # it again and again (measured: 0.3 us of a broker's ~1.9 per message in a 1:1 flood).
        gc.collect()  # start-up's garbage freed, not frozen for the process's life
        gc.freeze()
        # A worker of `serve --workers N`: tell the supervisor (now a SIGTERM it forwards is
        # handled gracefully). Elsewhere, nothing.
        report_ready(server.name, server.endpoints)

    try:
        await server.run(handle_signals=True, on_ready=ready)
    finally:
        for a in announcer:  # (already withdrawn when the stop began; close is idempotent)
            await asyncio.to_thread(a.close)
        if http is not None:
            http[0].shutdown()
            http[0].server_close()
        if link is not None:
            await link.close()
    return EXIT_OK


def _broker(args: argparse.Namespace) -> Any:
    """The broker, with its store when ``--store FILE`` is given."""
    from sockstack.pubsub import Broker, SQLiteStore
    from sockstack.pubsub.store import StoreError

    if not args.store:
        return Broker()
    try:
        return Broker(store=SQLiteStore(args.store, sync=args.store_sync))
    except (StoreError, OSError) as exc:
        raise UsageError(f"--store {args.store}: {exc}") from None


def _cluster_link(pubsub: PubSub, args: argparse.Namespace) -> Any:
    """``--cluster URL[,URL...]``: the NATS link of the broker (sockstack.pubsub.cluster)."""
    urls = [u.strip() for text in args.cluster for u in text.split(",") if u.strip()]
    for u in urls:
        if not u.startswith(("nats://", "tls://")):
            raise UsageError(f"--cluster {u!r}: expected nats://HOST:PORT (NATS's client port)")
    try:
        from sockstack.pubsub.cluster import NatsLink
    except ImportError as exc:  # (the module itself needs nothing beyond sockstack)
        raise UsageError(f"--cluster: {exc}") from None
    try:
        return NatsLink(
            pubsub.broker,
            urls,
            prefix=args.cluster_prefix,
            ping_interval=args.cluster_ping,
            jetstream=args.cluster_jetstream,
            replicas=args.cluster_replicas,
            stream_max_bytes=args.cluster_stream_bytes,
            stream_max_age=args.cluster_stream_age,
        )
    except (ImportError, ValueError) as exc:
        raise UsageError(f"--cluster: {exc}") from None


def _stream_name(prefix: str) -> str:
    from sockstack.pubsub.cluster import stream_name

    return stream_name(prefix)


def _metrics(args: argparse.Namespace) -> tuple[Any, tuple[str, int]]:
    """``--metrics HOST:PORT``: the metrics interceptor and where to serve it (None, ...)."""
    if not args.metrics:
        return None, ("", 0)
    try:
        where = parse_endpoint(args.metrics, "tcp")
    except ValueError as exc:
        raise UsageError(f"--metrics {args.metrics}: {exc}") from None
    try:
        from sockstack.metrics import ServerMetrics
    except ImportError:
        raise UsageError(
            "--metrics needs prometheus-client: pip install 'sockstack[metrics]'"
        ) from None
    return ServerMetrics(), (where.host, where.port)


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    https = any(h.lower().startswith("https://") for h in args.http or ())
    if not args.tls and not https:
        if args.cert or args.client_ca:
            raise UsageError("--cert/--key/--client-ca need a --tls or --http https:// endpoint")
        return None
    if not args.cert:
        which = "--tls" if args.tls else "--http https://"
        raise UsageError(f"{which} needs --cert (and --key unless the key is in the cert file)")
    from sockstack.transport.tls import server_context

    files = (("--cert", args.cert), ("--key", args.key), ("--client-ca", args.client_ca))
    check_files(*files)
    try:
        return server_context(args.cert, args.key, client_ca=args.client_ca)
    except (OSError, ValueError) as exc:
        named = ", ".join(f"{flag} {path}" for flag, path in files if path)
        raise UsageError(f"TLS files ({named}): {exc}") from None


def _serve_workers(args: argparse.Namespace) -> int:
    from sockstack.host.workers import run_workers

    if args.service:
        # Fail here, once, rather than in every worker; the workers create the service.
        load_service(args.service, create=False)
    tcp, udp, tls = args.tcp or [], args.udp or [], args.tls or []
    if not tcp and not udp and not tls and not args.http:
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
        f"--max-connections-per-address={args.max_connections_per_address}",
        f"--max-handshakes-per-address={args.max_handshakes_per_address}",
        f"--max-partial-bytes={args.max_partial_bytes}",
        f"--work-slice={args.work_slice}",
        f"--frame-timeout={args.frame_timeout}",
        f"--max-outbound={args.max_outbound}",
        f"--handshake-timeout={args.handshake_timeout}",
        f"--keepalive={args.keepalive}",
        f"--drain-timeout={args.drain_timeout}",
    ]
    # Checked once, here (workers read the same file or environment), and so is exposure.
    try:
        from sockstack.gateway.pattern import http_endpoint

        refuse_unprotected(
            [parse_endpoint(t, "tcp") for t in tcp]
            + [parse_endpoint(u, "udp") for u in udp]
            + [http_endpoint(h) for h in args.http or ()],
            load_secret(args),
            args.insecure,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
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
    if args.insecure:
        worker_args.append("--insecure")
    if args.no_malloc_tuning:
        worker_args.append("--no-malloc-tuning")
    if args.cors:
        worker_args += [f"--cors={origin}" for origin in args.cors]
    if args.broker:  # each worker's broker joins the others through NATS
        worker_args += [
            "--broker",
            f"--cluster-prefix={args.cluster_prefix}",
            f"--cluster-ping={args.cluster_ping}",
            f"--cluster-replicas={args.cluster_replicas}",
            f"--cluster-stream-bytes={args.cluster_stream_bytes}",
        ]
        if args.cluster_stream_age is not None:
            worker_args.append(f"--cluster-stream-age={args.cluster_stream_age}")
        if args.cluster_jetstream:
            worker_args.append("--cluster-jetstream")
        worker_args += [f"--cluster={urls}" for urls in args.cluster]
    if args.announce:  # each worker announces the shared port (listed once, while one lives)
        worker_args.append(f"--announce={args.announce}")
        for flag, value in (("--names", args.names), ("--announce-url", args.announce_url)):
            if value:
                worker_args.append(f"{flag}={value}")
        worker_args += [f"--meta={item}" for item in args.meta or ()]
    return run_workers(worker_args, tcp, udp, args.workers, tls=tls, http=args.http or ())


# Calls of the built-in demo that work on a fresh server, in this order (`get room` reads what
# `set room` stored, over the other transport when there are both).
_DEMO_EXAMPLES = (("tcp", "add 2 3"), ("udp", "set room 21.5"), ("tcp", "get room"))


def banner(server: Server, args: argparse.Namespace) -> list[str]:
    """What ``serve`` and ``broker`` print once listening: the endpoints, the methods with
    their parameters and first doc line, and command lines to try. Every ``try:`` line is a
    command that works against this server as it was started (tests run each one); for a
    service of yours, whose arguments it cannot guess, it suggests ``ping`` and shows the form
    of a call."""
    is_broker = args.command == "broker"
    if is_broker:
        name = "broker"
    elif server.service is None:  # (patterns alone: an edge sink)
        name = server.name
    else:
        name = type(server.service).__name__
    if server.broker is not None and not is_broker:
        name += " and the broker"
    lines = [f"serving {name} on {ep}" for ep in server.endpoints]
    if server.broker is not None and getattr(args, "cluster", None):
        urls = ", ".join(args.cluster)
        prefix = args.cluster_prefix
        lines.append(f"broker joined to the others through NATS at {urls} (subjects {prefix}TOPIC)")
        if args.cluster_jetstream:
            lines.append(
                "QoS 1 publishes and durable subscriptions kept in JetStream (stream "
                f"{_stream_name(prefix)}, {args.cluster_replicas} replicas)"
            )
    # objects.attach and objects.describe are the remote-object session's (PROTOCOL.md §4.5),
    # not for `sockstack call`: the objects are listed on their own below.
    handlers = {n: h for n, h in server.dispatcher.handlers.items() if not n.startswith("objects.")}
    if handlers:
        lines.append("methods (sockstack call URL METHOD [ARG]...):")
        shown = {n: _signature(h.signature) for n, h in handlers.items()}
        width = max(len(n) + len(sig) for n, sig in shown.items())
        for n in sorted(handlers):
            doc = _first_sentence(inspect.getdoc(handlers[n].func) or "")
            lines.append(f"  {(n + shown[n]).ljust(width)}  {doc}".rstrip())
    extra = f" --secret-file {shlex.quote(args.secret_file)}" if args.secret_file else ""
    # tls:// needs the CA: no guess; http:// is for curl and the browser (below)
    plain = [ep for ep in server.endpoints if ep.scheme in ("tcp", "udp")]
    stream = next((_local(ep) for ep in plain if ep.is_stream), None)
    dgram = next((_local(ep) for ep in plain if not ep.is_stream), None)
    object_lines, object_try = _objects_banner(server, stream, bool(args.secret_file))
    lines += object_lines
    tries: list[str] = []
    if isinstance(server.service, Demo) and not is_broker:
        for scheme, call in _DEMO_EXAMPLES:
            url = (stream or dgram) if scheme == "tcp" else (dgram or stream)
            if url:
                tries.append(f"sockstack call {url} {call}{extra}")
        if stream:  # a stream: its items print as they come
            tries.append(f"sockstack call {stream} count 5 --kw interval=0.2{extra}")
    elif plain and not is_broker:
        tries.append(f"sockstack ping {stream or dgram} --count 3{extra}")
    if plain and not is_broker:
        tries.append(f"sockstack describe {stream or dgram}{extra}")
    if server.broker is not None and stream:
        tries.append(
            f"sockstack sub {stream} 'sensors.>' --count 1{extra}"
            "   # waits for one message: publish it from another terminal"
        )
        tries.append(f"sockstack pub {stream} sensors.room1.temp 21.5{extra}")
        if is_broker:
            tries.append(f"sockstack call {stream} broker.stats{extra}")
    if object_try:
        tries.append(object_try)
    web = next((_local(ep) for ep in server.endpoints if ep.scheme == "http"), None)
    if web is not None:
        auth = ' -H "authorization: Bearer $(cat SECRET_FILE)"' if args.secret_file else ""
        lines.append(f"dashboard: {web}/   (OpenAPI: {web}/openapi.json, docs: {web}/docs)")
        if isinstance(server.service, Demo) and not is_broker:
            tries.append(
                f"curl -s {web}/rpc/add -H 'content-type: application/json' "
                f'-d \'{{"a": 2, "b": 3}}\'{auth}'
            )
            if dgram:  # what `set room 21.5` stored over UDP, as a REST resource
                tries.append(f"curl -s {web}/kv/room{auth}")
        if server.broker is not None:  # (not a try: line: it streams until Ctrl-C)
            lines.append(f"broker events (SSE): curl -N {web}/topics/sensors.%3E/events{auth}")
    lines += [f"try: {t}" for t in tries]
    lines.append("Ctrl-C stops")
    return lines


def _objects_banner(
    server: Server, stream: str | None, secret: bool
) -> tuple[list[str], str | None]:
    """The remote objects ``server`` serves by name (each with its members), and a Python
    one-liner to try (only for the demo's counter, whose answers are known, and only with a
    plain TCP endpoint and no secret: the one-liner passes none)."""
    from sockstack.objects.pattern import Objects

    objects = next((p for p in server.patterns if isinstance(p, Objects)), None)
    if objects is None or not objects.registered:
        return [], None
    tcp = stream if stream and stream.startswith("tcp://") else None
    base = tcp or "tcp://HOST:PORT"
    lines = [f'remote objects (Python: sockstack.objects.lookup("{base}/NAME"), TCP or TLS):']
    per = {"single": "shared", "session": "one per client session", "percall": "one per call"}
    for name, reg in sorted(objects.registered.items()):
        members = []
        for m in reg.exposed.members.values():
            if m.kind == "property":
                members.append(f"{m.name} (property)")
                continue
            sig = m.handler.signature  # its first parameter is the instance: not the caller's
            members.append(
                m.name + _signature(sig.replace(parameters=list(sig.parameters.values())[1:]))
            )
        lines.append(f"  {name}  {reg.exposed.iface}, {per[reg.mode]}: {', '.join(members)}")
    if "counter" not in objects.registered or tcp is None or secret:
        return lines, None
    code = (
        "from sockstack.objects import lookup, close; "
        f'c = lookup("{base}/counter"); '
        "print(c.incr(5), c.child().child().incr(), c.value); close(c)"
    )
    return lines, f"python -c '{code}'   # prints 5 1 5"


def _first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def _signature(sig: inspect.Signature) -> str:
    """``(a, b, default=None)``: the parameters as a caller passes them, without annotations."""
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=sig.empty))


def _local(ep: Endpoint) -> str:
    """The endpoint as a client on this machine reaches it (a wildcard address is not one)."""
    if ep.host in ("0.0.0.0", ""):
        return str(Endpoint(ep.scheme, "127.0.0.1", ep.port))
    if ep.host == "::":
        return str(Endpoint(ep.scheme, "::1", ep.port))
    return str(ep)


def run_serve(args: argparse.Namespace) -> int:
    """``serve`` or ``broker``: one process on the event loop, or ``--workers`` processes."""
    take_ready_fd()  # a worker: before the service loads, so its children do not inherit it
    if args.cluster and not args.broker:
        raise UsageError("--cluster joins a broker to others: add --broker (or run `broker`)")
    if args.cluster_jetstream and not args.cluster:
        raise UsageError(
            "--cluster-jetstream keeps QoS 1 messages in the NATS servers' JetStream: add "
            "--cluster nats://HOST:4222"
        )
    if args.cluster_jetstream and args.store:
        raise UsageError(
            "--cluster-jetstream keeps durable subscriptions in JetStream, --store in this "
            "broker's file: choose one (the broker's retained messages are shared through "
            "NATS either way)"
        )
    if args.store and not args.broker:
        raise UsageError("--store keeps a broker's messages: add --broker (or run `broker`)")
    if args.store and args.workers > 1:
        raise UsageError(
            "--store is one broker's file: not with --workers (each worker's broker would "
            "need its own; run brokers with their own --store joined by --cluster instead)"
        )
    if args.broker and args.workers > 1 and not args.cluster:
        raise UsageError(
            "the broker keeps its subscriptions in one process: no --workers with it, unless "
            "the workers' brokers join through NATS: --cluster nats://HOST:4222 (a nats-server "
            "reachable from here; docs/SCALING.md)"
        )
    if args.workers > 1 and args.metrics:
        raise UsageError(
            "--metrics counts one process's calls: not with --workers (each worker would need "
            "its own port)"
        )
    if args.workers > 1 and args.sink:
        raise UsageError("--sink keeps one store per process: no --workers with it")
    if args.workers > 1:
        return _serve_workers(args)
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    return run(_serve(args))


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    common.add_argument(
        "--http",
        action="append",
        metavar="HOST:PORT",
        help="HTTP endpoint of the gateway, repeatable: calls at /rpc/METHOD, the broker at "
        "/topics, OpenAPI, /metrics and the dashboard (https://HOST:PORT: TLS with --cert and "
        "--key; docs/HTTP.md)",
    )
    common.add_argument(
        "--cors",
        action="append",
        metavar="ORIGIN",
        help="a browser origin allowed to call the HTTP gateway (repeatable; '*' for any; "
        "none by default)",
    )
    common.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (needs sockstack[metrics]; "
        "port 0 picks one, shown in the banner; no authentication: keep it on loopback or a "
        "private interface; one process only)",
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
        "--max-connections-per-address",
        type=int,
        default=_DEFAULT_LIMITS.max_connections_per_address,
        help="TCP connections open at once from one IP address; one more is refused "
        f"(default {_DEFAULT_LIMITS.max_connections_per_address:,})",
    )
    common.add_argument(
        "--max-handshakes-per-address",
        type=int,
        default=_DEFAULT_LIMITS.max_handshakes_per_address,
        help="connections from one IP address still in the HELLO handshake; one more is "
        f"refused (default {_DEFAULT_LIMITS.max_handshakes_per_address})",
    )
    common.add_argument(
        "--max-partial-bytes",
        type=int,
        default=_DEFAULT_LIMITS.max_partial_bytes,
        help="bytes held for unfinished frames over all connections; a connection that would "
        f"go beyond gets CLOSE BUSY (default {_DEFAULT_LIMITS.max_partial_bytes:,})",
    )
    common.add_argument(
        "--work-slice",
        type=_positive_seconds,
        default=_DEFAULT_LIMITS.work_slice,
        metavar="SECONDS",
        help="work on one read's events before other connections get a turn (a burst of "
        "publishes fanned out, a burst of pipelined calls); the rest waits a loop turn "
        f"(default {_DEFAULT_LIMITS.work_slice:g})",
    )
    common.add_argument(
        "--frame-timeout",
        type=float,
        default=_DEFAULT_LIMITS.stream.frame_timeout,
        help="seconds a frame may take to arrive once it has begun; 0 for no bound "
        f"(default {_DEFAULT_LIMITS.stream.frame_timeout:g})",
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
        "--insecure",
        action="store_true",
        help="allow plain TCP/UDP endpoints on a non-loopback address without a secret "
        "(refused by default: anyone who can reach the address could call every method)",
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
        "--cluster",
        action="append",
        metavar="nats://HOST:PORT[,...]",
        help="join this broker to the other brokers on these NATS servers (a list: any of "
        "them, the client moves to another when one goes; repeatable): publishes, "
        "subscriptions' interest, queue groups and retained messages span every broker "
        "(needs nats-py: pip install 'sockstack[nats]'; docs/SCALING.md)",
    )
    common.add_argument(
        "--store",
        metavar="FILE",
        help="keep the broker's retained messages and durable subscriptions (with the "
        "messages they have not acknowledged) in this SQLite file, across restarts and "
        "crashes; a QoS 1 publish is answered once it is committed (docs/SCALING.md)",
    )
    common.add_argument(
        "--store-sync",
        choices=["full", "normal", "off"],
        default="full",
        help="when the store's commits reach the disk: full (default: fsync each group "
        "commit; an acknowledged publish survives a power cut), normal (at checkpoints; "
        "survives a crash of the broker, not of the machine), off (never)",
    )
    common.add_argument(
        "--cluster-prefix",
        default="sockstack.",
        metavar="PREFIX",
        help="NATS subjects of the topics: PREFIX + topic (default 'sockstack.'; '' for none); "
        "brokers with different prefixes do not share topics",
    )
    common.add_argument(
        "--cluster-ping",
        type=_positive_seconds,
        default=2.0,
        metavar="SECONDS",
        help="PING the NATS server after this many seconds; two unanswered and the broker "
        "moves to another server of --cluster (default 2)",
    )
    common.add_argument(
        "--cluster-jetstream",
        action="store_true",
        help="with --cluster: keep QoS 1 messages in NATS JetStream (nats-server -js): a QoS 1 "
        "publish is answered once JetStream stored it, and durable subscriptions are "
        "JetStream consumers, so a durable subscriber resumes on any broker, also after its "
        "broker was killed (docs/SCALING.md)",
    )
    common.add_argument(
        "--cluster-replicas",
        type=int,
        choices=range(1, 6),
        default=1,
        metavar="N",
        help="copies of each stored message on the NATS nodes, 1-5 (default 1; 3 on a 3-node "
        "cluster keeps them through a node's loss)",
    )
    common.add_argument(
        "--cluster-stream-bytes",
        type=int,
        default=1 << 30,
        metavar="BYTES",
        help="bound of the JetStream stream on each node's disk; past it the oldest messages "
        "go, also those an absent durable subscriber has not read (default 1 GiB)",
    )
    common.add_argument(
        "--cluster-stream-age",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="messages older than this leave the JetStream stream (default 7 days: the "
        "broker's bound on what a durable subscription keeps)",
    )
    common.add_argument(
        "--hide-errors",
        action="store_true",
        help="send clients only the type of unexpected exceptions, not their message",
    )
    from sockstack.discovery.announce import add_announce_arguments

    add_announce_arguments(common)  # --announce NAME --names URL --announce-url --meta

    s = sub.add_parser(
        "serve",
        parents=[common],
        help="serve a service over TCP and/or UDP",
        description="Serve a service (module:Class or file.py:Class; the built-in demo when "
        "omitted) until "
        "SIGINT/SIGTERM, which drain in-flight requests before exiting. Without --tcp/--udp: "
        f"tcp 127.0.0.1:{DEFAULT_TCP_PORT} and udp 127.0.0.1:{DEFAULT_UDP_PORT}.",
    )
    s.add_argument(
        "service",
        nargs="?",
        help="module:Class (a module importable from the current directory) or "
        "path/to/file.py:Class; the class is created with no arguments",
    )
    s.add_argument(
        "--broker",
        action="store_true",
        help="also host the publish/subscribe broker on the same ports (with --workers, "
        "only with --cluster: each worker's broker joins the others through NATS)",
    )
    s.add_argument(
        "--sink",
        metavar="FILE|postgresql://...",
        help="be the cloud sink of edge relays: store what they forward, exactly once, in a "
        "SQLite FILE or PostgreSQL (docs/EDGE.md); without a service, serve only the sink",
    )
    # Not offered by `broker`: the broker keeps its subscriptions in one process.
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the ports with SO_REUSEPORT, to use several cores "
        "(default 1; with --broker, only with --cluster, the brokers joined through NATS)",
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
    k.set_defaults(service=None, broker=True, workers=1, sink=None)
