"""The one rule for a shared secret, wherever it comes from.

A secret is bytes; a text secret (``str``) is its UTF-8 encoding. Leading and trailing ASCII
whitespace (space, tab, CR, LF) is removed wherever the secret comes from: a file
(``--secret-file``), ``$SOCKSTACK_SECRET``, or the Python API's ``str`` or ``bytes``
(``Server(secret=)``, ``connect(url, secret=)``, ``AsyncClient(url, secret=)``). An empty secret
(nothing left after stripping) is refused: ``ValueError`` in Python, exit 2 in the CLI.

Any bytes are a valid secret, UTF-8 or not: the CLI reads ``$SOCKSTACK_SECRET`` as bytes
(``os.environb``, on POSIX) and the file as bytes. A ``str`` that UTF-8 cannot encode (one
with a lone surrogate, as ``os.environ`` gives for bytes that are not UTF-8) is refused with a
``ValueError`` saying so: pass such a secret as bytes.

So ``connect(url, secret=open("key").read())`` and ``secret=open("key", "rb").read()`` both
match a server started with ``--secret-file key``, a trailing newline or not. A secret made of
random bytes keeps its inner bytes as they are; only the six ASCII whitespace bytes at either
end go (generate one with ``python -c "import secrets; print(secrets.token_urlsafe(32))"``).
"""

from __future__ import annotations

__all__ = ["WHITESPACE", "normalize_secret"]

WHITESPACE = b" \t\r\n"
"""What is stripped from both ends of a secret: space, tab, CR, LF (not form feed or vertical
tab, and nothing beyond ASCII)."""


def normalize_secret(secret: str | bytes | bytearray | memoryview | None) -> bytes | None:
    """The secret as the wire uses it (see the module's rule), or None for no secret.

    Raises ``ValueError`` for an empty secret (or one of whitespace only) and for a ``str``
    that UTF-8 cannot encode (a lone surrogate, as Python decodes bytes that are not UTF-8 in
    file names and the environment: give those as bytes), and ``TypeError`` for anything other
    than ``str``, bytes-like or None."""
    if secret is None:
        return None
    if isinstance(secret, str):
        try:
            raw = secret.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"the shared secret is text that UTF-8 cannot encode ({exc.reason}, at index "
                f"{exc.start}: Python decodes bytes that are not UTF-8 so): give it as bytes"
            ) from None
    elif isinstance(secret, bytes | bytearray | memoryview):
        raw = bytes(secret)
    else:
        raise TypeError(f"a secret is str or bytes, not {type(secret).__name__}")
    raw = raw.strip(WHITESPACE)
    if not raw:
        raise ValueError("the shared secret is empty (after removing surrounding whitespace)")
    return raw
