"""``/metrics`` covers every pattern and transport: RPC calls over TCP, UDP and HTTP, remote
object calls under their method's name, the broker's counters; ``/healthz`` and ``/readyz``
answer even when every call slot is taken."""

from __future__ import annotations

import asyncio

from sockstack import AsyncClient
from sockstack.demo import Counter, Demo
from sockstack.gateway import Gateway, HttpLimits
from sockstack.objects import close, lookup
from sockstack.objects.pattern import Objects
from sockstack.rpc.pattern import RPC
from tests.conftest import timeout
from tests.gateway.support import arequest, gateway


async def test_metrics_cover_every_pattern_and_transport() -> None:
    objects = Objects()
    objects.register("counter", Counter)
    async with gateway(
        patterns=[RPC(Demo()), objects], tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"], broker=True
    ) as (server, port):
        async with AsyncClient(str(server.endpoint("tcp")), timeout=timeout(5)) as tcp:
            assert await tcp.call("add", 1, 2) == 3
            await tcp.publish("sensors.a", 1, qos=1)
        async with AsyncClient(str(server.endpoint("udp")), timeout=timeout(5)) as udp:
            assert await udp.call("add", 1, 2) == 3
        assert (await arequest(port, "POST", "/rpc/add", [1, 2])).json() == 3

        def remote() -> int:
            c = lookup(f"{server.endpoint('tcp')}/counter")
            try:
                return int(c.incr(5))
            finally:
                close(c)  # (its lease keeper thread ends with it)

        assert await asyncio.to_thread(remote) == 5
        text = (await arequest(port, "GET", "/metrics")).body.decode()
    for line in (
        'sockstack_server_calls_total{method="add",transport="tcp"} 1.0',
        'sockstack_server_calls_total{method="add",transport="udp"} 1.0',
        'sockstack_server_calls_total{method="add",transport="http"} 1.0',
        'sockstack_server_calls_total{method="Counter.incr",transport="tcp"} 1.0',
        'sockstack_server_call_seconds_count{method="add",transport="http"} 1.0',
        "sockstack_broker_published_total 1.0",
        'sockstack_server_open_connections{transport="http"} 1.0',
    ):
        assert line in text, line


async def test_probes_answer_when_every_call_slot_is_taken() -> None:
    gw = Gateway(["127.0.0.1:0"], limits=HttpLimits(max_in_flight=0))
    async with gateway(Demo(), patterns=[gw], tcp=["127.0.0.1:0"], http=()) as (_, port):
        assert (await arequest(port, "POST", "/rpc/add", [1, 2])).status == 503
        assert (await arequest(port, "GET", "/healthz")).status == 200
        assert (await arequest(port, "GET", "/readyz")).status == 200
