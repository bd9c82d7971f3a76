"""``sockstack inspect``: the bytes each layer adds to one call — the course notes' first lesson
("we spend a lot of extra bits on headers"), measured.

The sockstack and codec sizes come from a real exchange: the request and response frames are
captured from a call to a live server (the one given, or a demo server started on loopback for
the purpose). The lower layers are the sizes Linux puts on an Ethernet link:

=========================  ======  =====================================================
layer                      bytes   note
=========================  ======  =====================================================
Ethernet header + FCS      14 + 4  per packet (the preamble and inter-frame gap, 20 more
                                   byte-times on the wire, are left out)
IPv4 / IPv6                20 / 40 per packet (IPv4 fragments each carry their own)
TCP                        20 + 12 per segment: Linux sends the timestamps option (10 bytes
                                   + 2 of padding) on every segment of a connection
UDP                        8       per datagram
TLS 1.3 record             5 + 17  per record: header, AEAD tag and inner content type
=========================  ======  =====================================================

A message larger than one segment is split: each segment pays the lower headers again. With
pipelining, many small frames share one segment and its headers.

The tables print with rich when it is installed, else as plain text with the same rows and
figures: the runtime does not depend on rich.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
from dataclasses import dataclass

from sockstack.cli.common import EXIT_OK, UsageError
from sockstack.protocol.frames import HEADER_SIZE, Frame, FrameDecoder
from sockstack.protocol.messages import Hello, encode_hello, encode_request

__all__ = [
    "Exchange",
    "Layers",
    "TextTable",
    "add_parser",
    "capture_exchange",
    "capture_publish",
    "layers",
    "plain_text",
    "render",
    "run_inspect",
    "tables",
]

ETHERNET = 14 + 4
IPV4, IPV6 = 20, 40
TCP_HEADER = 20 + 12  # with the timestamps option Linux negotiates by default
UDP_HEADER = 8
TLS_RECORD = 5 + 16 + 1
MTU = 1500


@dataclass(frozen=True)
class Exchange:
    """Sizes taken from one real call: frames as they went on the wire."""

    payload: int  # the application's bytes (the echoed value)
    request_frame: int
    request_meta: int
    request_body: int
    response_frame: int
    response_body: int
    response_meta: int = 0
    kind: str = "call"
    """"call": REQUEST and RESPONSE of echo; "publish": a PUB and the MSG it becomes."""
    topic: str = ""


@dataclass(frozen=True)
class Layers:
    """Bytes per layer for one message over one transport."""

    transport: str
    packets: int
    ethernet: int
    ip: int
    l4: int
    tls: int
    frame_header: int
    meta: int
    codec: int
    payload: int

    @property
    def total(self) -> int:
        return (
            self.ethernet
            + self.ip
            + self.l4
            + self.tls
            + self.frame_header
            + self.meta
            + self.codec
            + self.payload
        )

    @property
    def efficiency(self) -> float:
        return self.payload / self.total if self.total else 0.0


def layers(
    frame: int,
    meta: int,
    body: int,
    payload: int,
    transport: str,
    *,
    ipv6: bool = False,
    tls: bool = False,
    mtu: int = MTU,
    frames_per_packet: int = 1,
) -> Layers:
    """Per-message byte counts. ``frames_per_packet`` > 1 models pipelining: that many frames
    share each segment, so each pays a share of the lower headers."""
    ip = IPV6 if ipv6 else IPV4
    if transport == "tcp":
        data = frame * frames_per_packet + (TLS_RECORD if tls else 0)
        mss = mtu - ip - TCP_HEADER
        packets = max(1, math.ceil(data / mss))
        per_packet = ETHERNET + ip + TCP_HEADER
        share = packets * per_packet / frames_per_packet
        return Layers(
            "tcp" + ("+tls" if tls else ""),
            packets,
            round(share * ETHERNET / per_packet),
            round(share * ip / per_packet),
            round(share * TCP_HEADER / per_packet),
            round(TLS_RECORD / frames_per_packet) if tls else 0,
            HEADER_SIZE,
            meta,
            body - payload,
            payload,
        )
    # UDP: one frame per datagram; IP fragments it above the MTU (each fragment: Ethernet + IP).
    datagram = UDP_HEADER + frame
    room = (mtu - ip) // 8 * 8
    packets = max(1, math.ceil(datagram / room))
    return Layers(
        "udp",
        packets,
        packets * ETHERNET,
        packets * ip,
        UDP_HEADER,
        0,
        HEADER_SIZE,
        meta,
        body - payload,
        payload,
    )


async def _capture_tcp(host: str, port: int, payload: bytes) -> tuple[int, int, int, int, int]:
    reader, writer = await asyncio.open_connection(host, port)
    request = encode_request(1, "echo", [payload])
    writer.write(encode_hello(Hello(agent="inspect")) + request)
    dec = FrameDecoder(max_frame=64 << 20)
    frames: list[Frame] = []
    try:
        while len(frames) < 2:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
            if not chunk:
                raise ConnectionError("server closed the connection")
            frames += dec.feed(chunk)
    finally:
        writer.close()
    response = frames[1]  # frames[0] is WELCOME
    if response.type != 4:
        raise RuntimeError(f"the server did not answer echo: {response}")
    meta_len = len(b"echo")
    return (
        len(request),
        meta_len,
        len(request) - HEADER_SIZE - meta_len,
        HEADER_SIZE + len(response.meta) + len(response.body),
        len(response.body),
    )


async def _capture_publish(
    host: str, port: int, payload: bytes, topic: str
) -> tuple[int, int, int, int, int, int]:
    """Subscribe on one connection, publish on another, measure the PUB and the MSG."""
    from sockstack.protocol.codecs import MSGPACK
    from sockstack.pubsub.messages import encode_pub, encode_sub

    sreader, swriter = await asyncio.open_connection(host, port)
    _, pwriter = await asyncio.open_connection(host, port)
    dec = FrameDecoder(max_frame=64 << 20)
    frames: list[Frame] = []

    async def until(n: int) -> None:
        while len(frames) < n:
            chunk = await asyncio.wait_for(sreader.read(1 << 20), 10)
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            frames.extend(dec.feed(chunk))

    try:
        swriter.write(encode_hello(Hello(agent="inspect")) + encode_sub(1, topic))
        await until(2)  # WELCOME, then the SUB's RESPONSE: the broker has the subscription
        if frames[1].type != 4:
            raise RuntimeError(f"not a broker, or the topic was refused: {frames[1]}")
        body = MSGPACK.encode(payload)
        pub = encode_pub(topic, body, request_id=1)  # QoS 1: the broker answers once routed
        pwriter.write(encode_hello(Hello(agent="inspect")) + pub)
        await until(3)
    finally:
        swriter.close()
        pwriter.close()
    msg = frames[2]
    meta_len = len(topic.encode())
    return (
        len(pub),
        meta_len,
        len(body),
        HEADER_SIZE + len(msg.meta) + len(msg.body),
        len(msg.body),
        len(msg.meta),
    )


def capture_publish(url: str | None, payload_size: int, topic: str) -> Exchange:
    """Publish one message (QoS 1, TCP) to a subscriber of ``topic`` and measure the PUB and
    the MSG. Without ``url``, a broker is started on loopback for the purpose."""
    payload = b"x" * payload_size

    async def go() -> tuple[int, int, int, int, int, int]:
        if url:
            from sockstack.transport.urls import parse_endpoint

            ep = parse_endpoint(url)
            return await _capture_publish(ep.host, ep.port, payload, topic)
        from sockstack.asyncio.stream import StreamLimits
        from sockstack.host.server import Server, ServerLimits
        from sockstack.pubsub.pattern import PubSub

        logging.getLogger("sockstack.server").setLevel(logging.WARNING)
        limits = ServerLimits(stream=StreamLimits(max_frame=64 << 20))
        async with Server(patterns=[PubSub()], tcp=["127.0.0.1:0"], limits=limits) as srv:
            ep = srv.endpoint("tcp")
            return await _capture_publish(ep.host, ep.port, payload, topic)

    pub, meta, pub_body, msg, msg_body, msg_meta = asyncio.run(go())
    return Exchange(payload_size, pub, meta, pub_body, msg, msg_body, msg_meta, "publish", topic)


def capture_exchange(url: str | None, payload_size: int) -> Exchange:
    """Run one real echo call (TCP) and measure its frames. Without ``url``, a demo server is
    started on loopback for the purpose."""
    payload = b"x" * payload_size

    async def go() -> tuple[int, int, int, int, int]:
        if url:
            from sockstack.transport.urls import parse_endpoint

            ep = parse_endpoint(url)
            return await _capture_tcp(ep.host, ep.port, payload)
        from sockstack.asyncio.stream import StreamLimits
        from sockstack.demo import Demo
        from sockstack.host.server import Server, ServerLimits

        logging.getLogger("sockstack.server").setLevel(logging.WARNING)  # a helper, not news
        limits = ServerLimits(stream=StreamLimits(max_frame=64 << 20))
        async with Server(Demo(), tcp=["127.0.0.1:0"], limits=limits) as srv:
            ep = srv.endpoint("tcp")
            return await _capture_tcp(ep.host, ep.port, payload)

    req, meta, req_body, resp, resp_body = asyncio.run(go())
    return Exchange(payload_size, req, meta, req_body, resp, resp_body)


@dataclass(frozen=True)
class TextTable:
    """A table as text cells: what ``render`` prints, with rich when it is installed."""

    title: str
    columns: tuple[str, ...]
    right: tuple[bool, ...]  # right-justified columns
    rows: tuple[tuple[tuple[str, ...], bool], ...]  # (cells, bold)


def tables(
    ex: Exchange, *, ipv6: bool = False, tls: bool = False, mtu: int = MTU
) -> tuple[list[TextTable], str]:
    """The tables ``sockstack inspect`` prints (each direction, then pipelining), and the note
    that follows them."""
    if ex.kind == "publish":
        what = f"publish to {ex.topic} ({ex.payload} bytes)"
        directions = (
            ("PUB, publisher to broker", "topic"),
            ("MSG, broker to subscriber", "subscription id + topic"),
        )
    else:
        what = f"echo({ex.payload} bytes)"
        directions = (("request", "method name"), ("response", "method name"))
    out: list[TextTable] = []
    for (direction, meta_name), frame, meta, body in (
        (directions[0], ex.request_frame, ex.request_meta, ex.request_body),
        (directions[1], ex.response_frame, ex.response_meta, ex.response_body),
    ):
        tcp = layers(frame, meta, body, ex.payload, "tcp", ipv6=ipv6, tls=tls, mtu=mtu)
        udp = layers(frame, meta, body, ex.payload, "udp", ipv6=ipv6, mtu=mtu)
        rows = [
            ("Ethernet header + FCS", tcp.ethernet, udp.ethernet),
            (f"IPv{6 if ipv6 else 4}", tcp.ip, udp.ip),
            ("TCP (timestamps option) / UDP", tcp.l4, udp.l4),
            ("TLS 1.3 record", tcp.tls, 0),
            ("sockstack frame header", tcp.frame_header, udp.frame_header),
            (f"sockstack meta ({meta_name})", tcp.meta, udp.meta),
            ("codec (msgpack) overhead", tcp.codec, udp.codec),
            ("payload", tcp.payload, udp.payload),
        ]
        cells = [((name, f"{via_tcp:,}", f"{via_udp:,}"), False) for name, via_tcp, via_udp in rows]
        cells.append((("total", f"{tcp.total:,}", f"{udp.total:,}"), True))
        cells.append((("packets", str(tcp.packets), str(udp.packets)), False))
        cells.append(
            (
                (
                    "efficiency (payload / total)",
                    f"{tcp.efficiency:.1%}",
                    f"{udp.efficiency:.1%}",
                ),
                True,
            )
        )
        out.append(
            TextTable(
                f"{direction} of {what}: bytes per layer",
                ("layer", tcp.transport.upper(), "UDP"),
                (False, True, True),
                tuple(cells),
            )
        )
    unit = "publishes" if ex.kind == "publish" else "requests"
    pipe = []
    for n in (1, 10, 100):
        lay = layers(
            ex.request_frame,
            ex.request_meta,
            ex.request_body,
            ex.payload,
            "tcp",
            ipv6=ipv6,
            tls=tls,
            mtu=mtu,
            frames_per_packet=n,
        )
        pipe.append(((str(n), f"{lay.total:,}", f"{lay.efficiency:.1%}"), False))
    out.append(
        TextTable(
            f"pipelining: {unit} sharing TCP segments",
            ("frames per segment", f"bytes per {unit[:-1]}", "efficiency"),
            (True, True, True),
            tuple(pipe),
        )
    )
    note = (
        "Sizes of the sockstack frame, meta and codec come from a real exchange; the lower "
        "layers are Linux's defaults on Ethernet (see `sockstack inspect --help`)."
        + (
            " UDP columns: the same frame as a datagram (UDP carries publishes; subscribers "
            "receive over TCP)."
            if ex.kind == "publish"
            else ""
        )
    )
    return out, note


def plain_text(table: TextTable) -> str:
    """``table`` as aligned plain text: the output when rich is not installed."""
    widths = [
        max(len(table.columns[i]), *(len(cells[i]) for cells, _ in table.rows))
        for i in range(len(table.columns))
    ]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(cells, widths, table.right, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([table.title, line(table.columns), rule, *(line(c) for c, _ in table.rows)])


def render(ex: Exchange, *, ipv6: bool = False, tls: bool = False, mtu: int = MTU) -> None:
    """Print the tables: with rich when it is installed (the bench extra), else as plain text
    with the same rows and figures. The runtime does not depend on rich."""
    out, note = tables(ex, ipv6=ipv6, tls=tls, mtu=mtu)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for t in out:
            print(plain_text(t), end="\n\n")
        print(note)
        return
    console = Console()
    for t in out:
        rt = Table(title=t.title, title_justify="left")
        for column, right in zip(t.columns, t.right, strict=True):
            rt.add_column(column, justify="right" if right else "left")
        for cells, bold in t.rows:
            rt.add_row(*cells, style="bold" if bold else None)
        console.print(rt)
    console.print(note)


def run_inspect(args: argparse.Namespace) -> int:
    """``sockstack inspect``: one real exchange, measured and printed."""
    if args.payload < 0:
        raise UsageError("--payload must be 0 or more")
    if args.publish:
        ex = capture_publish(args.url, args.payload, args.publish)
    else:
        ex = capture_exchange(args.url, args.payload)
    render(ex, ipv6=args.ipv6, tls=args.tls, mtu=args.mtu)
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
