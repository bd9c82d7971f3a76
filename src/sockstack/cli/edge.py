"""``sockstack edge`` (run a relay), ``sockstack edge status``, ``sockstack edge verify`` and
``sockstack simulate`` (docs/EDGE.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

from sockstack.cli.common import EXIT_CONNECTION, EXIT_OK, EXIT_REMOTE, UsageError, load_secret

__all__ = ["add_parsers", "run_edge", "run_simulate"]

_log = logging.getLogger("sockstack.cli")
_UNITS = {
    "": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
}


def size(text: str) -> int:
    """argparse type: bytes, with an optional unit (``512MiB``, ``2G``, ``100kb``)."""
    t = text.strip().lower().replace(" ", "")
    digits = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(digits) :]
    try:
        value = float(digits) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512MiB, 2G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least one byte")
    return int(value)


def _level(text: str) -> int:
    from sockstack.edge.messages import AckLevel

    try:
        return int(AckLevel[text.upper()])
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r}: memory, disk or forwarded") from None


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "edge",
        help="run an edge or fog relay (and: edge status FILE, edge verify FILE)",
        description="Run a relay: take readings from devices (DATA frames, JSON lines, StatsD "
        "or Graphite lines over TCP and UDP), pre-process them in a pipeline, keep them in a "
        "durable outbox, forward them upstream (a sink or another relay). `sockstack edge "
        "status FILE` and `sockstack edge verify FILE` read a relay's store.",
    )
    p.add_argument("--store", metavar="FILE", help="the outbox (SQLite; created if absent)")
    p.add_argument(
        "--listen",
        action="append",
        metavar="URL",
        help="tcp://HOST:PORT or udp://HOST:PORT for devices, repeatable: DATA frames and "
        "sockstack sessions (a fog relay's downstream relays too), JSON lines, raw lines",
    )
    p.add_argument(
        "--tcp", action="append", metavar="HOST:PORT", help="a plain sockstack TCP endpoint too"
    )
    p.add_argument(
        "--udp",
        action="append",
        metavar="HOST:PORT",
        help="a sockstack UDP endpoint (sealed DATA datagrams with --secret-file)",
    )
    p.add_argument(
        "--pipeline",
        metavar="FILE.py:build",
        help="a function returning the Pipeline (none: readings pass through)",
    )
    p.add_argument(
        "--upstream",
        metavar="URL[,URL]",
        help="where to forward: a sink or a relay (tcp:// or tls://; several for failover)",
    )
    p.add_argument(
        "--ack",
        type=_level,
        default=2,
        metavar="LEVEL",
        help="acknowledgement level by default: memory, disk (default) or forwarded",
    )
    p.add_argument(
        "--ack-for",
        action="append",
        default=[],
        metavar="GLOB=LEVEL",
        help="the level for streams matching GLOB (e.g. 'alarms/*=forwarded'), repeatable",
    )
    p.add_argument(
        "--max-bytes",
        type=size,
        default=1 << 30,
        metavar="SIZE",
        help="outbox bound (default 1GiB)",
    )
    p.add_argument(
        "--max-age",
        type=float,
        default=7 * 86400.0,
        metavar="SECONDS",
        help="rows older expire, counted (default 7 days; 0: never)",
    )
    p.add_argument(
        "--when-full",
        choices=("refuse", "drop-oldest"),
        default="refuse",
        help="refuse new input (default) or drop the oldest rows, counted",
    )
    p.add_argument(
        "--drain-rate",
        type=float,
        default=None,
        metavar="ROWS/S",
        help="forward a backlog at most this fast (default: as fast as the upstream takes)",
    )
    p.add_argument(
        "--batch-rows",
        type=int,
        default=1000,
        metavar="N",
        help="rows per forwarded batch (default 1000)",
    )
    p.add_argument(
        "--secret-file",
        metavar="FILE",
        help="this relay's shared secret (devices and downstream relays; else $SOCKSTACK_SECRET)",
    )
    p.add_argument("--upstream-secret-file", metavar="FILE", help="the upstream's shared secret")
    p.add_argument(
        "--insecure", action="store_true", help="listen beyond loopback without a secret"
    )
    p.add_argument(
        "--status-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="print a status line this often (0: never)",
    )
    es = p.add_subparsers(dest="edge_command", metavar="{status,verify}")
    st = es.add_parser(
        "status",
        help="a relay's backlog, oldest age, forward rate, bad records",
        description="Read a relay's store (FILE) or ask a running relay (tcp://...) how it "
        "is doing.",
    )
    st.add_argument("target", help="the store FILE, or a relay's tcp:// URL")
    st.add_argument("--json", action="store_true", help="print the whole report as JSON")
    st.add_argument("--secret-file", metavar="FILE", help="the relay's secret (a URL target)")
    ve = es.add_parser(
        "verify",
        help="check every record's checksum; repair when the relay is stopped",
        description="Check a store: SQLite's integrity check and every row's checksum. When no "
        "relay runs on it, damaged rows go to quarantine and a damaged file is rebuilt from "
        "what is intact. Exit 1 when damage was found.",
    )
    ve.add_argument("store", help="the store FILE")
    ve.add_argument("--no-repair", action="store_true", help="only report")
    ve.add_argument("--json", action="store_true", help="print the report as JSON")

    s = sub.add_parser(
        "simulate",
        help="simulated devices sending readings to a relay",
        description='Devices sending {"temp": ...} readings to a relay, paced, with a report.',
    )
    s.add_argument(
        "--to", required=True, metavar="URL", help="the relay: udp://HOST:PORT or tcp://HOST:PORT"
    )
    s.add_argument("--devices", type=int, default=10, help="devices (default 10)")
    s.add_argument(
        "--rate", type=float, default=10.0, help="readings a second per device (default 10)"
    )
    s.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    s.add_argument(
        "--format",
        choices=("frames", "json", "raw"),
        default="frames",
        help="DATA frames (default), JSON lines or StatsD lines",
    )
    s.add_argument(
        "--ack",
        choices=("none", "memory", "disk", "forwarded"),
        default="none",
        help="frames: ask for this acknowledgement level",
    )
    s.add_argument(
        "--prefix", default="dev", help="stream names are PREFIX0, PREFIX1... (default dev)"
    )
    s.add_argument("--seed", type=int, default=None, help="random seed of the values")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--secret-file", metavar="FILE", help="the relay's secret (tcp frames)")


def run_edge(args: argparse.Namespace) -> int:
    if args.edge_command == "status":
        return _status(args)
    if args.edge_command == "verify":
        return _verify(args)
    if not args.store:
        raise UsageError("edge needs --store FILE (or: edge status FILE, edge verify FILE)")
    if not args.listen and not args.tcp and not args.udp:
        raise UsageError("edge needs --listen URL (or --tcp/--udp) for its devices")
    from sockstack.transport.loop import run

    return run(_relay(args))


def _load_pipeline(spec: str | None) -> Any:
    if not spec:
        return None
    from sockstack.cli.serve import load_service

    obj = load_service(spec, create=False)
    if callable(obj) and not hasattr(obj, "push"):
        try:
            obj = obj()
        except Exception as exc:
            raise UsageError(f"--pipeline {spec}: it raised {type(exc).__name__}: {exc}") from None
    if not hasattr(obj, "push") or not hasattr(obj, "take_changes"):
        raise UsageError(f"--pipeline {spec}: not a Pipeline (nor a function returning one)")
    return obj


def _secret_file(path: str | None) -> bytes | None:
    if not path:
        return None
    return load_secret(argparse.Namespace(secret_file=path))


async def _relay(args: argparse.Namespace) -> int:
    from sockstack.edge.forward import ForwardSettings
    from sockstack.edge.pattern import Relay
    from sockstack.edge.store import StoreLimits, StoreLocked
    from sockstack.host.server import Server

    ack_for = {}
    for item in args.ack_for:
        glob, eq, level = item.rpartition("=")
        if not eq or not glob:
            raise UsageError(f"--ack-for {item!r}: GLOB=LEVEL")
        try:
            ack_for[glob] = _level(level)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--ack-for {item!r}: {exc}") from None
    try:
        relay = Relay(
            args.store,
            _load_pipeline(args.pipeline),
            upstream=args.upstream,
            listen=args.listen or (),
            limits=StoreLimits(
                max_bytes=args.max_bytes,
                max_age=args.max_age or None,
                when_full=args.when_full.replace("-", "_"),
            ),
            ack=args.ack,
            ack_for=ack_for,
            forward=ForwardSettings(batch_rows=args.batch_rows, max_rate=args.drain_rate),
            upstream_secret=_secret_file(args.upstream_secret_file),
        )
        relay.open()
        server = Server(
            patterns=[relay],
            tcp=args.tcp or [],
            udp=args.udp or [],
            secret=load_secret(args),
            insecure=args.insecure,
        )
    except StoreLocked as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        await server.start()
    except OSError as exc:
        await server.shutdown()
        print(f"sockstack: error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONNECTION

    def ready() -> None:
        for ep in server.endpoints:
            print(f"relay listening on {ep}", flush=True)
        print(
            f"store {args.store} (origin {relay.store.origin}); upstream: "
            f"{', '.join(relay.upstream) or 'none'}",
            flush=True,
        )
        print("Ctrl-C stops", flush=True)
        if args.status_every > 0:
            asyncio.get_running_loop().create_task(_status_lines(relay, args.status_every))

    await server.run(handle_signals=True, on_ready=ready)
    return EXIT_OK


async def _status_lines(relay: Any, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        print(status_line(relay.stats()), flush=True)


def status_line(s: dict[str, Any]) -> str:
    """One line of a relay's stats (``edge --status-every``, ``make edge-demo``)."""
    st, fw, tot = s["store"], s["forward"], s["totals"]
    bad = sum(sum(src["bad"].values()) for src in s["sources"].values())
    lost = sum(src.get("lost", 0) for src in s["sources"].values())
    age = st["oldest_age"]
    parts = [
        f"in {tot['in_msgs']}",
        f"out {tot['out_msgs']}",
        f"backlog {st['rows']} rows",
        f"oldest {age:.1f}s" if age is not None else "oldest -",
    ]
    if fw is not None:
        parts.append(
            f"forwarded {fw['rows']} ({fw['rate']:.0f}/s, {'up' if fw['connected'] else 'DOWN'})"
        )
    parts += [f"bad {bad}", f"lost {lost}", f"quarantined {st['quarantined']}"]
    red = s["reduction"]["msgs"]
    if red:
        parts.append(f"reduction {red:.1f}x")
    return time.strftime("%H:%M:%S ") + " | ".join(parts)


def _status(args: argparse.Namespace) -> int:
    target = args.target
    if "://" in target:
        from sockstack.clients import Client

        with Client(
            target,
            secret=_secret_file(args.secret_file)
            or load_secret(argparse.Namespace(secret_file=None)),
        ) as client:
            stats = client.call("edge.stats")
        if args.json:
            print(json.dumps(stats, indent=2))
        else:
            print(status_line(stats) if "store" in stats else json.dumps(stats, indent=2))
        return EXIT_OK
    from sockstack.edge.tools import file_status

    try:
        st = file_status(target)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    c = st["counters"]
    live = st["live"]
    age = st["oldest_age"]
    print(
        f"store      {st['path']}  (origin {st['origin']}, "
        f"relay {'running' if st['running'] else 'stopped'})"
    )
    print(
        f"backlog    {st['backlog_rows']} rows, {st['backlog_bytes']} bytes; oldest "
        + (f"{age:.1f} s" if age is not None else "-")
    )
    print(
        f"committed  {c.get('committed_rows', 0)} rows in {c.get('commits', 0)} commits; "
        f"forwarded {c.get('forwarded_rows', 0)}"
    )
    if live:
        print(
            f"forwarding {live.get('forward_rate', 0):.1f} rows/s, upstream "
            f"{'up' if live.get('connected') else 'down'} (as of {st['live_age']:.0f} s ago)"
        )
    print(
        f"bad        quarantined {c.get('quarantined', 0)} (kept: {st['quarantine_rows']}), "
        f"expired {c.get('expired', 0)}, dropped when full {c.get('dropped_full', 0)}, "
        f"refused when full {c.get('refused_full', 0)}, heals {c.get('heals', 0)}"
    )
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from sockstack.edge.tools import verify

    try:
        report = verify(args.store, repair=not args.no_repair)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"store      {report['path']}"
            + ("  (a relay is running: report only)" if report["running"] else "")
        )
        print(f"integrity  {report.get('integrity')}")
        print(
            f"rows       {report.get('rows_checked', 0)} checked, {report.get('rows_bad', 0)} bad"
        )
        if report.get("healed"):
            print(
                f"healed     the damaged file is {report['damaged_file']}; "
                f"{report['salvaged_rows']} rows salvaged"
            )
        if report.get("quarantined_now"):
            print(f"quarantine {report['quarantined_now']} rows moved now")
        print(f"quarantine {report.get('quarantine_rows', 0)} rows kept")
    damaged = bool(
        report.get("rows_bad") or report.get("healed") or report.get("integrity") != "ok"
    )
    return EXIT_REMOTE if damaged else EXIT_OK


def run_simulate(args: argparse.Namespace) -> int:
    from sockstack.edge.simulate import simulate
    from sockstack.transport.loop import run

    def progress(r: dict[str, Any]) -> None:
        if not args.json:
            acked = sum(r["acked"].values())
            print(
                f"{r['elapsed']:6.1f}s sent {r['sent']} acked {acked}", file=sys.stderr, flush=True
            )

    try:
        report = run(
            simulate(
                args.to,
                devices=args.devices,
                rate=args.rate,
                duration=args.duration,
                fmt=args.format,
                ack=args.ack,
                seed=args.seed,
                prefix=args.prefix,
                secret=load_secret(args),
                progress=progress,
            )
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        print(f"sockstack: error: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"sent {report['sent']} readings in {report['elapsed']} s ({report['rate']}/s); "
            f"acked {report['acked'] or '-'}; refused {report['refused'] or '-'}; "
            f"unanswered {report['unanswered']}"
        )
    return EXIT_OK
