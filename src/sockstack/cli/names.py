"""``sockstack names``: run a remote objects' name service, list it, look a name up."""

from __future__ import annotations

import argparse

from sockstack.cli.common import EXIT_OK, EXIT_REMOTE, CommandFailed
from sockstack.errors import RemoteError

__all__ = ["add_parser", "run_names"]

DEFAULT_NAMES = "127.0.0.1:5055"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "names",
        help="run or query a name service of remote objects",
        description="A name service maps names to the URLs of remote objects (docs/OBJECTS.md). "
        "Each name belongs to the server that registered it and goes when that server's "
        "session does: at once when it stops, within its lease when it is killed.",
    )
    nsub = p.add_subparsers(dest="names_command", required=True, metavar="ACTION")
    s = nsub.add_parser(
        "serve",
        help="serve a name service (until Ctrl-C)",
        description="Serve the name service (the object 'names') on TCP. Object servers "
        "register there with ObjectServer(names='tcp://HOST:PORT').",
    )
    s.add_argument(
        "--tcp",
        action="append",
        metavar="HOST:PORT",
        help=f"TCP endpoint (repeatable; default {DEFAULT_NAMES})",
    )
    s.add_argument(
        "--lease",
        type=float,
        default=30.0,
        help="seconds a registrant's names outlive its connection (default 30)",
    )
    lst = nsub.add_parser(
        "list",
        help="print the registered names",
        description="Print one line per registered name: the name, a space, its URL.",
    )
    lst.add_argument("url", help="the name service, tcp://HOST:PORT")
    lst.add_argument("--prefix", default="", help="only names starting with this")
    lst.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    k = nsub.add_parser(
        "lookup",
        help="print the URL a name is registered under",
        description="Print the URL registered as NAME (exit 1 when no such name).",
    )
    k.add_argument("url", help="the name service, tcp://HOST:PORT")
    k.add_argument("name")
    k.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def run_names(args: argparse.Namespace) -> int:
    from sockstack.objects import ObjectClient, ObjectServer

    if args.names_command == "serve":
        from sockstack.transport.loop import run

        tcp = args.tcp or [DEFAULT_NAMES]

        async def main() -> None:
            server = ObjectServer(tcp=tcp, host_names=True, lease=args.lease)

            def ready() -> None:
                for ep in server.endpoints:
                    print(f"serving names on {ep} (Ctrl-C stops)", flush=True)

            await server.run(on_ready=ready)

        run(main())
        return EXIT_OK
    with ObjectClient(args.url, timeout=args.timeout) as oc:
        names = oc.lookup("names")
        if args.names_command == "list":
            for name, entry in names.list(args.prefix).items():
                print(f"{name} {entry['url']}")
            return EXIT_OK
        try:
            print(names.lookup(args.name))
        except RemoteError as exc:
            raise CommandFailed(
                f"no name {args.name!r} at {args.url}: {exc}", EXIT_REMOTE
            ) from None
    return EXIT_OK
