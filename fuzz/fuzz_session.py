#!/usr/bin/env python3
"""atheris (libFuzzer) target for the sans-I/O core: the frame decoder, the TCP session state
machine (both roles), the UDP datagram cores and the datagram authentication.

Contract checked: bytes from the network may make these raise only their documented errors
(RemoteProtocolError from the decoder, AuthFailure from DatagramAuth.open); Connection and the
datagram cores never raise on input at all, whatever the split of the stream.

    make fuzz                                       # bounded run (FUZZ_RUNS, default 200000)
    .venv/bin/python fuzz/fuzz_session.py -runs=1000000 fuzz/corpus

A crash prints the input and saves it as crash-<sha1>; add it to tests/protocol as a
regression test, then fix.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from sockstack.errors import RemoteProtocolError
    from sockstack.protocol.auth import AuthFailure, DatagramAuth
    from sockstack.protocol.connection import Connection
    from sockstack.protocol.datagram import DatagramClient, DatagramServer
    from sockstack.protocol.frames import FrameDecoder
    from sockstack.protocol.messages import Role, decode_message

AUTH = DatagramAuth(b"fuzz")


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, split, body = data[0] % 5, data[1] or 1, data[2:]
    chunks = [body[i : i + split] for i in range(0, len(body), split)]
    if mode == 0:
        dec = FrameDecoder(max_frame=4096, max_meta=256)
        for chunk in chunks:
            try:
                frames = dec.feed(chunk)
            except RemoteProtocolError:
                return
            for f in frames:
                try:
                    decode_message(f)
                except RemoteProtocolError:
                    pass
    elif mode in (1, 2):
        conn = Connection(Role.SERVER if mode == 1 else Role.CLIENT, max_frame=4096, now=0.0)
        now = 0.0
        for chunk in chunks:
            conn.receive_data(chunk)  # must never raise
            conn.data_to_send()
            now += 1.0
            when = conn.next_timer(now)
            if when is not None and when <= now:
                conn.handle_timer(now)
        conn.receive_eof()
    elif mode == 3:
        server = DatagramServer(max_datagram=2048)
        client = DatagramClient(max_datagram=2048, seed=1)
        client.send_request(1, "m", [1], now=0.0, timeout=5.0)
        for chunk in chunks:
            server.receive_datagram(chunk, ("127.0.0.1", 9), 0.0)
            client.receive_datagram(chunk)
        server.datagrams_to_send()
    else:
        try:
            AUTH.open(body, 1000.0)
        except AuthFailure:
            pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
