"""What the ``sockstack`` commands share: exit codes, usage errors, argument values, the shared
secret, and the options of the commands that connect to a server (call, ping, pub, sub)."""

from __future__ import annotations

import argparse
import json
import os
import signal
from typing import Any

__all__ = [
    "EXIT_CONNECTION",
    "EXIT_OK",
    "EXIT_PIPE",
    "EXIT_REMOTE",
    "EXIT_USAGE",
    "LOG_LEVELS",
    "SECRET_ENV",
    "CommandFailed",
    "UsageError",
    "add_client_arguments",
    "check_files",
    "client_options",
    "format_result",
    "load_secret",
    "log_level",
    "parse_value",
]

EXIT_OK, EXIT_REMOTE, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3
EXIT_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool ended by SIGPIPE
SECRET_ENV = "SOCKSTACK_SECRET"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class UsageError(Exception):
    """Bad usage: printed as one line on stderr, exit code 2."""


class CommandFailed(Exception):
    """A command that ran and did not get what it was asked for: one line on stderr (after
    ``sockstack: ``), exit ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def log_level(text: str) -> str:
    """``--log-level``: a level name in any case (argparse then checks it against the choices)."""
    return text.upper()


def check_files(*options: tuple[str, str | None]) -> None:
    """Each ``(flag, path)`` given must be a readable file: else a usage error naming the flag,
    the file and the operating system's reason (``--cert nope.pem: No such file or directory``)."""
    for flag, path in options:
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path}: is a directory, not a PEM file")


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


def load_secret(args: argparse.Namespace) -> bytes | None:
    """The shared secret from --secret-file, else from $SOCKSTACK_SECRET, else None. Never from
    a command-line value: those show in `ps` and in shell history. The same rule as the Python
    API (:func:`sockstack.transport.secret.normalize_secret`): surrounding ASCII whitespace
    removed (a file's trailing newline), an empty secret refused (exit 2)."""
    from sockstack.transport.secret import WHITESPACE, normalize_secret

    if args.secret_file:
        try:
            with open(args.secret_file, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise UsageError(f"--secret-file {args.secret_file}: {exc.strerror or exc}") from None
        try:
            return normalize_secret(raw)
        except ValueError:
            raise UsageError(
                f"--secret-file {args.secret_file}: the secret is empty (the file holds only "
                "whitespace or nothing)"
            ) from None
    # As bytes where the environment is bytes (POSIX): any bytes are a secret, UTF-8 or not.
    value: bytes | str | None
    if os.supports_bytes_environ:
        value = os.environb.get(SECRET_ENV.encode())
    else:  # Windows: the environment is text
        value = os.environ.get(SECRET_ENV)
    if value is None:
        return None
    if not (value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value).strip(
        WHITESPACE
    ):
        raise UsageError(
            f"${SECRET_ENV} is set but empty (or only whitespace): unset it, or give a secret"
        )
    try:
        return normalize_secret(value)
    except ValueError as exc:  # text that UTF-8 cannot encode (not on POSIX: bytes there)
        raise UsageError(f"${SECRET_ENV}: {exc}") from None


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """TLS and credential options shared by call and ping."""
    secret = load_secret(args)
    if not args.url.startswith("tls"):
        if args.ca or args.cert:
            raise UsageError("--ca/--cert/--key are for tls:// URLs")
        return {"secret": secret}
    from sockstack.transport.tls import client_context

    if args.key and not args.cert:
        raise UsageError("--key needs --cert")
    files = (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key))
    check_files(*files)
    try:
        return {"tls": client_context(args.ca, cert=args.cert, key=args.key), "secret": secret}
    except (OSError, ValueError) as exc:
        named = ", ".join(f"{flag} {path}" for flag, path in files if path)
        raise UsageError(f"TLS files ({named}): {exc}") from None


def add_client_arguments(p: argparse.ArgumentParser, *, udp: bool = True) -> None:
    """The URL and the TLS and secret options; ``udp=False`` for commands that need a
    connection (``sub``), so that the help offers only what the command takes."""
    p.add_argument(
        "url",
        help="tcp://host:port, tls://host:port or udp://host:port"
        if udp
        else "tcp://host:port or tls://host:port",
    )
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
