"""``/kv`` over real loopback HTTP: the demo store as a REST resource (docs/HTTP.md,
"Resources"): a test per status code, entity tags that change with every write whichever
transport made it, conditional requests (RFC 9110 §13), compare-and-set under races, keys
with ``%2F`` and non-ASCII text, and the store's byte bound measured with tracemalloc."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import threading
import tracemalloc
from typing import Any
from urllib.parse import quote

import pytest

from sockstack import AsyncClient, Service, method
from sockstack.demo import Demo
from sockstack.errors import ErrorCode
from sockstack.gateway import Gateway, HttpLimits
from sockstack.gateway.kv import KeyValueStore, openapi_paths
from tests.conftest import timeout
from tests.gateway.support import Answer, arequest, gateway, request


def at(key: str) -> str:
    return "/kv/" + quote(key, safe="")


def demo(**kw: Any) -> Any:
    return gateway(Demo(**kw), tcp=["127.0.0.1:0"])


# --------------------------------------------------------------------------- each status


async def test_201_created_then_200_replaced_with_location_and_etag() -> None:
    async with demo() as (_, port):
        r = await arequest(port, "PUT", "/kv/color", {"name": "blue"})
        assert r.status == 201
        assert r.json() == {"name": "blue"}
        assert r.headers["location"] == r.headers["content-location"] == "/kv/color"
        first = r.headers["etag"]
        assert first.startswith('"') and first.endswith('"')
        r = await arequest(port, "PUT", "/kv/color", "[1, 2]")  # (content-type: none)
        assert (r.status, r.json()) == (200, [1, 2])
        assert "location" not in r.headers and r.headers["content-location"] == "/kv/color"
        assert r.headers["etag"] != first


async def test_200_get_and_head_with_the_etag_and_the_sorted_keys() -> None:
    async with demo() as (_, port):
        for key, value in (("b", 2), ("a", None), ("c", "text")):
            assert (await arequest(port, "PUT", at(key), json.dumps(value))).status == 201
        r = await arequest(port, "GET", "/kv/c")
        assert (r.status, r.json(), r.headers["content-type"]) == (200, "text", "application/json")
        put_tag = r.headers["etag"]
        r = await arequest(port, "GET", "/kv/a")
        assert (r.status, r.body) == (200, b"null")
        r = await arequest(port, "HEAD", "/kv/c")
        assert (r.status, r.body, r.headers["etag"]) == (200, b"", put_tag)
        assert r.headers["content-length"] == str(len(b'"text"'))
        r = await arequest(port, "GET", "/kv")
        assert (r.status, r.json()) == (200, ["a", "b", "c"])
        r = await arequest(port, "HEAD", "/kv")
        assert (r.status, r.body) == (200, b"")


async def test_204_delete_then_404() -> None:
    async with demo() as (_, port):
        await arequest(port, "PUT", "/kv/k", "1")
        r = await arequest(port, "DELETE", "/kv/k")
        assert (r.status, r.body) == (204, b"")
        for verb in ("GET", "DELETE"):
            r = await arequest(port, verb, "/kv/k")
            assert (r.status, r.problem["code"]) == (404, ErrorCode.NOT_FOUND)
            assert "no key 'k'" in r.problem["detail"]
        r = await arequest(port, "HEAD", "/kv/k")
        assert (r.status, r.body) == (404, b"")
        assert (await arequest(port, "GET", "/kv")).json() == []


async def test_304_when_if_none_match_matches_a_tag_a_list_a_weak_tag_or_star() -> None:
    async with demo() as (_, port):
        tag = (await arequest(port, "PUT", "/kv/k", "1")).headers["etag"]
        for given in (tag, f'"nope", {tag}', f"W/{tag}", "*", f'"a,b" ,, {tag}'):
            for verb in ("GET", "HEAD"):
                r = await arequest(port, verb, "/kv/k", headers={"if-none-match": given})
                assert (r.status, r.body, r.headers["etag"]) == (304, b"", tag), given
        r = await arequest(port, "GET", "/kv/k", headers={"if-none-match": '"other"'})
        assert (r.status, r.json()) == (200, 1)
        # an absent key: "*" holds, so the answer is what it would be without it
        r = await arequest(port, "GET", "/kv/none", headers={"if-none-match": "*"})
        assert r.status == 404


async def test_404_without_a_store_and_for_a_path_of_two_segments() -> None:
    class Plain(Service):
        @method
        def ping(self) -> str:
            return "pong"

    async with gateway(Plain(), tcp=["127.0.0.1:0"]) as (server, port):
        for path in ("/kv", "/kv/k"):
            r = await arequest(port, "GET", path)
            assert (r.status, r.problem["code"]) == (404, ErrorCode.NOT_FOUND)
            assert r.problem["detail"] == "no key-value store on this server"
        gw = next(p for p in server.patterns if isinstance(p, Gateway))
        assert openapi_paths(gw) == {}
    async with demo() as (_, port):
        r = await arequest(port, "PUT", "/kv/a/b", "1")
        assert (r.status, r.problem["code"]) == (404, ErrorCode.NOT_FOUND)
        assert "%2F" in r.problem["detail"]


async def test_405_with_allow() -> None:
    async with demo() as (_, port):
        for path, verb, allowed in (
            ("/kv", "PUT", "GET, HEAD"),
            ("/kv", "DELETE", "GET, HEAD"),
            ("/kv/k", "POST", "GET, HEAD, PUT, DELETE"),
            ("/kv/k", "PATCH", "GET, HEAD, PUT, DELETE"),
        ):
            r = await arequest(port, verb, path, "1")
            assert (r.status, r.problem["code"]) == (405, ErrorCode.METHOD_NOT_ALLOWED), path
            assert r.headers["allow"] == allowed


async def test_412_on_each_failed_precondition_and_nothing_changes() -> None:
    async with demo() as (_, port):

        async def check(verb: str, path: str, headers: dict[str, str], body: Any = None) -> None:
            r = await arequest(port, verb, path, body, headers=headers)
            assert (r.status, r.problem["code"]) == (412, ErrorCode.PRECONDITION_FAILED), headers

        old = (await arequest(port, "PUT", "/kv/k", "1")).headers["etag"]
        tag = (await arequest(port, "PUT", "/kv/k", "2")).headers["etag"]
        await check("PUT", "/kv/k", {"if-match": old}, "3")  # a lost update, refused
        await check("PUT", "/kv/k", {"if-match": f"W/{tag}"}, "3")  # If-Match is strong
        await check("PUT", "/kv/k", {"if-none-match": "*"}, "3")  # create only: it exists
        await check("PUT", "/kv/k", {"if-none-match": f'"x", W/{tag}'}, "3")
        await check("PUT", "/kv/new", {"if-match": "*"}, "3")  # must exist: it does not
        await check("DELETE", "/kv/k", {"if-match": old})
        await check("DELETE", "/kv/k", {"if-none-match": "*"})
        await check("GET", "/kv/k", {"if-match": old})
        r = await arequest(port, "GET", "/kv/k")
        assert (r.json(), r.headers["etag"]) == (2, tag)
        assert (await arequest(port, "GET", "/kv")).json() == ["k"]
        # and each passes when it holds
        r = await arequest(port, "PUT", "/kv/new", "1", headers={"if-none-match": "*"})
        assert r.status == 201
        r = await arequest(port, "PUT", "/kv/k", "3", headers={"if-match": f'"x", {tag}'})
        assert r.status == 200
        tag = r.headers["etag"]
        r = await arequest(port, "PUT", "/kv/k", "4", headers={"if-match": "*"})
        assert r.status == 200
        r = await arequest(port, "DELETE", "/kv/k", headers={"if-match": r.headers["etag"]})
        assert r.status == 204
        # RFC 9110 §13.2.1: without the key the answer is 404 whatever the conditions
        r = await arequest(port, "DELETE", "/kv/k", headers={"if-match": "*"})
        assert r.status == 404


async def test_413_for_a_body_beyond_the_gateway_s_bound() -> None:
    gw = Gateway(["127.0.0.1:0"], limits=HttpLimits(max_body=1000))
    async with gateway(Demo(), patterns=[gw], tcp=["127.0.0.1:0"], http=()) as (_, port):
        r = await arequest(port, "PUT", "/kv/k", json.dumps("x" * 2000))
        assert (r.status, r.problem["code"]) == (413, ErrorCode.PAYLOAD_TOO_LARGE)
        assert (await arequest(port, "GET", "/kv")).json() == []


async def test_507_when_the_store_is_full_and_nothing_half_applies() -> None:
    async with demo(max_keys=2, max_bytes=4096) as (_, port):
        tags = {}
        for key in ("a", "b"):
            tags[key] = (await arequest(port, "PUT", at(key), "1")).headers["etag"]
        r = await arequest(port, "PUT", "/kv/c", "1")
        assert (r.status, r.problem["code"]) == (507, ErrorCode.APPLICATION_ERROR)
        assert (r.problem["error"], r.problem["detail"]) == (
            "ServiceError",
            "store is full (2 keys)",
        )
        r = await arequest(port, "PUT", "/kv/a", json.dumps("x" * 5000))  # over max_bytes
        assert r.status == 507 and "of 4096 bytes in use" in r.problem["detail"]
        assert (await arequest(port, "GET", "/kv")).json() == ["a", "b"]
        r = await arequest(port, "GET", "/kv/a")
        assert (r.json(), r.headers["etag"]) == (1, tags["a"])  # the old value, the old tag


async def test_400_for_bodies_and_headers_that_are_not_what_they_say() -> None:
    async with demo() as (_, port):
        for body, headers in (
            ("", {}),
            ("{", {}),
            ("NaN", {}),  # (Python reads it; JSON has no NaN)
            ("1", {"if-match": "abc"}),  # not quoted
            ("1", {"if-none-match": '"a" "b"'}),  # no comma
            ("1", {"if-match": "*, *"}),  # "*" is no list element
            ("1", {"if-match": 'w/"a"'}),  # "W/" is case-sensitive
            ("1", {"if-none-match": '"a\x7f"'}),  # DEL is no etagc
        ):
            r = await arequest(port, "PUT", "/kv/k", body, headers=headers)
            assert (r.status, r.problem["code"]) == (400, ErrorCode.DECODE_ERROR), (body, headers)
        r = await arequest(port, "GET", "/kv/%FF")
        assert (r.status, r.problem["code"]) == (400, ErrorCode.DECODE_ERROR)
        r = await arequest(port, "PUT", "/kv/k", "1", headers={"content-type": "text/plain"})
        assert (r.status, r.problem["code"]) == (415, ErrorCode.UNSUPPORTED_CODEC)
        assert (await arequest(port, "GET", "/kv")).json() == []
        # curl -d sends a form type: the body is still the value as JSON
        form = {"content-type": "application/x-www-form-urlencoded"}
        r = await arequest(port, "PUT", "/kv/k", "5", headers=form)
        assert (r.status, r.json()) == (201, 5)


# --------------------------------------------------------------------------- keys and tags


async def test_keys_with_an_encoded_slash_and_unicode_are_the_tcp_keys() -> None:
    keys = ["a/b", "clé ☃", "100%", "a b+c?d#e", "", "/"]
    async with demo() as (server, port):
        for i, key in enumerate(keys):
            r = await arequest(port, "PUT", at(key), str(i))
            assert r.status == 201, key
            assert r.headers["location"] == at(key)
        async with AsyncClient(str(server.endpoint("tcp")), timeout=timeout(5)) as c:
            assert await c.call("keys") == sorted(keys)
            for i, key in enumerate(keys):
                assert await c.call("get", key) == i
            assert await c.call("set", "é/ü", "tcp") is True
        r = await arequest(port, "GET", "/kv/%C3%A9%2f%C3%BC")  # (lower-case hex too)
        assert (r.status, r.json()) == (200, "tcp")
        assert (await arequest(port, "GET", "/kv")).json() == sorted([*keys, "é/ü"])


async def test_the_etag_changes_with_every_write_whichever_transport() -> None:
    async with demo() as (server, port):
        seen = [(await arequest(port, "PUT", "/kv/k", "1")).headers["etag"]]

        async def tag() -> str:
            r = await arequest(port, "GET", "/kv/k")
            assert r.status == 200
            return r.headers["etag"]

        seen.append((await arequest(port, "PUT", "/kv/k", "1")).headers["etag"])  # same value
        async with AsyncClient(str(server.endpoint("tcp")), timeout=timeout(5)) as c:
            assert await c.call("set", "k", 1) is False
            seen.append(await tag())
            assert await c.call("set", "other", 1) is True
            assert await tag() == seen[-1]  # another key's write leaves this tag
            assert await c.call("delete", "k") is True
            assert (await arequest(port, "GET", "/kv/k")).status == 404
            assert await c.call("set", "k", 1) is True  # recreated: never an old tag
            seen.append(await tag())
        seen.append((await arequest(port, "PUT", "/kv/k", "1")).headers["etag"])
        assert len(set(seen)) == len(seen), seen
        r = await arequest(port, "PUT", "/kv/k", "2", headers={"if-match": seen[0]})
        assert r.status == 412
    async with demo() as (_, port):  # another store (a restart): other tags
        r = await arequest(port, "PUT", "/kv/k", "1")
        assert r.headers["etag"] not in seen


async def test_two_puts_with_the_same_if_match_exactly_one_wins() -> None:
    async with demo() as (_, port):
        for round_ in range(5):
            tag = (await arequest(port, "PUT", "/kv/k", str(round_))).headers["etag"]
            answers = await asyncio.gather(
                *(
                    arequest(
                        port, "PUT", "/kv/k", json.dumps(f"writer {w}"), headers={"if-match": tag}
                    )
                    for w in range(2)
                )
            )
            assert sorted(a.status for a in answers) == [200, 412], answers
            winner = next(a for a in answers if a.status == 200)
            r = await arequest(port, "GET", "/kv/k")
            assert (r.json(), r.headers["etag"]) == (winner.json(), winner.headers["etag"])


def test_the_store_compares_and_sets_under_its_lock_across_threads() -> None:
    """Writers in threads (as a non-inline method or a second loop would be), released at
    once, all holding the same tag: exactly one write wins each round."""
    store: KeyValueStore = Demo()
    writers = 8
    barrier = threading.Barrier(writers, timeout=timeout(10))
    for round_ in range(50):
        written = store.put("k", round_)
        assert written is not None
        tag = written[1]
        wins: list[tuple[bool, str] | None] = []

        def write(n: int, tag: str = tag, wins: list[Any] = wins) -> None:
            barrier.wait()
            wins.append(store.put("k", n, if_match={tag}))

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout(10))
        won = [w for w in wins if w is not None]
        assert len(wins) == writers and len(won) == 1, wins
        entry = store.entry("k")
        assert entry is not None and entry[1] == won[0][1]
        removed = [store.remove("k", if_match={won[0][1]}) for _ in range(2)]
        assert removed == [True, False]


# --------------------------------------------------------------------------- memory


def _fill(port: int, value: bytes, limit: int) -> tuple[int, Answer]:
    """PUT new keys until the store refuses one (blocking; one thread, off the loop): (keys
    stored, the refusal). One connection per request: the gateway's answers are a head and a
    body, and over keep-alive they may wait for a delayed ACK."""
    for i in range(limit):
        r = request(port, "PUT", f"/kv/key-{i:06d}", value)
        if r.status != 201:
            return i, r
    raise AssertionError(f"{limit} keys and the store is not full")


@pytest.mark.parametrize(
    "value",
    [b"7", json.dumps("x" * 3000).encode(), json.dumps([{"a": [1.5, "b"]}] * 20).encode()],
    ids=["small", "text", "nested"],
)
async def test_a_store_filled_over_http_stays_within_its_byte_bound(value: bytes) -> None:
    bound = 256 << 10
    async with demo(max_keys=100_000, max_bytes=bound) as (_, port):
        # warm up: connections, the route and the first store write
        assert (await arequest(port, "PUT", "/kv/warm", value)).status == 201
        assert (await arequest(port, "DELETE", "/kv/warm")).status == 204
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            stored, refusal = await asyncio.to_thread(_fill, port, value, 20_000)
            assert refusal.status == 507, refusal
            for _ in range(20):  # a full store refuses and holds no more
                assert (await arequest(port, "PUT", "/kv/more", value)).status == 507
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    # (the log records of the refusals are kept by pytest's log capture, not by the server)
    harness = [tracemalloc.Filter(False, logging.__file__)]
    after, before = after.filter_traces(harness), before.filter_traces(harness)
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert stored > 10
    # Everything the process holds more: the store, within its bound (measured: 79 values of
    # 3,000 characters hold 257,368 bytes, charged 260,700 of 262,144), and slack for the
    # connections' leftovers (cancelled timers stay in the loop's heap until asyncio sweeps
    # it: ~30 KiB measured), which does not grow with the keys.
    assert grown <= bound + (48 << 10), (stored, grown)
    assert grown >= bound // 2, (stored, grown)  # (it measured the store)


# --------------------------------------------------------------------------- RFC 9110 lists


async def _raw(port: int, head: bytes) -> tuple[int, bytes]:
    """One request written as given (header lines repeated, bytes beyond ASCII): its status and
    the response's bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"host: x\r\nconnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), timeout(10))
    finally:
        writer.close()
        await writer.wait_closed()
    return int(data.split(b" ", 2)[1]), data


async def test_conditions_take_every_rfc_9110_list_form() -> None:
    """``"*" / #entity-tag`` (RFC 9110 §13.1.1-2): OWS and tabs around commas and the value,
    empty elements, weak tags, the empty tag ``""``, obs-text, several lines; an empty list
    names no tag (If-Match then never holds; If-None-Match always does)."""
    async with demo() as (_, port):
        tag = (await arequest(port, "PUT", "/kv/k", "1")).headers["etag"]
        for given, status in (
            (f'"",\t  W/"0"\t \t\t ,\tW/"|"\t , \t{tag} \t', 200),  # listed (strong)
            (f'"",\t  W/"0"\t ,\tW/"|"\t , \tW/{tag}', 412),  # weak: never for If-Match
            (f",,{tag},,", 200),
            ("", 412),  # no tag listed: nothing matches
            (" , ,\t,", 412),
            ("* ", 200),  # (OWS is no part of the value)
            ('""', 412),  # the empty tag: valid, not this key's
        ):
            r = await arequest(port, "GET", "/kv/k", headers={"if-match": given})
            assert r.status == status, (given, r)
        for given, status in (
            ("", 200),
            (",", 200),
            (f" {tag}\t,  ", 304),
            (f"W/{tag}", 304),  # weak comparison
            ("\t*\t", 304),
        ):
            r = await arequest(port, "GET", "/kv/k", headers={"if-none-match": given})
            assert r.status == status, (given, r)
        r = await arequest(port, "PUT", "/kv/new", "1", headers={"if-none-match": "* "})
        assert r.status == 201
        r = await arequest(port, "PUT", "/kv/new", "2", headers={"if-none-match": "* "})
        assert (r.status, r.problem["code"]) == (412, ErrorCode.PRECONDITION_FAILED)
        r = await arequest(port, "DELETE", "/kv/new", headers={"if-match": 'W/"x"'})
        assert r.problem["detail"] == (
            "key 'new': If-Match lists no strong entity tag: nothing matches it"
        )
        r = await arequest(port, "DELETE", "/kv/new", headers={"if-none-match": ""})
        assert r.status == 204
        # several lines are one list; obs-text (bytes 0x80-0xFF) is etagc
        b = tag.encode()
        status, _ = await _raw(
            port, b'GET /kv/k HTTP/1.1\r\nif-match: "a"\r\nif-match: ' + b + b"\r\n"
        )
        assert status == 200
        status, _ = await _raw(port, b'GET /kv/k HTTP/1.1\r\nif-match: "\xe9\xff"\r\n')
        assert status == 412
        status, data = await _raw(port, b"GET /kv/k HTTP/1.1\r\nif-match: *\r\nif-match: *\r\n")
        assert status == 400 and b"DECODE_ERROR" in data


async def test_a_long_bad_list_is_refused_without_backtracking() -> None:
    """The grammar matches each character one way: a value of thousands of empty elements and
    spaces that goes wrong at its end is refused at once, not after exponential backtracking
    (this test would run into its timeout)."""
    async with demo() as (_, port):
        await arequest(port, "PUT", "/kv/k", "1")
        for bad in (", \t" * 1500 + "x", ' "a" ,' * 1000 + " W/x", " " * 6000 + "* x"):
            r = await arequest(port, "GET", "/kv/k", headers={"if-match": bad})
            assert (r.status, r.problem["code"]) == (400, ErrorCode.DECODE_ERROR)


async def test_the_document_s_header_pattern_is_what_the_server_takes() -> None:
    """The ``If-Match`` pattern ``/openapi.json`` gives is the server's grammar: for each
    value, the pattern matches exactly when the server does not answer 400."""
    async with demo() as (server, port):
        gw = next(p for p in server.patterns if isinstance(p, Gateway))
        params = openapi_paths(gw)["/kv/{key}"]["get"]["parameters"]
        pattern = re.compile(
            next(p for p in params if p["name"] == "If-Match")["schema"]["pattern"]
        )
        tag = (await arequest(port, "PUT", "/kv/k", "1")).headers["etag"]
        for value in (
            "*", " * ", "", ",", tag, f"W/{tag}", f'"a", ,{tag}', '""', '"a"\t,\t"b"',
            "**", "* ,", '"a" "b"', "a", 'W/ "a"', '"a', '"a"b', '"\x7f"', '"\\""', "\x00",
        ):  # fmt: skip
            r = await arequest(port, "GET", "/kv/k", headers={"if-match": value})
            assert (r.status != 400) is bool(pattern.search(value.strip(" \t"))), (value, r)


# --------------------------------------------------------------------------- OpenAPI


async def test_openapi_paths_document_every_answer() -> None:
    async with demo() as (server, _):
        gw = next(p for p in server.patterns if isinstance(p, Gateway))
        paths = openapi_paths(gw)
    assert set(paths) == {"/kv", "/kv/{key}"}
    assert set(paths["/kv"]) == {"get", "head"}
    item = paths["/kv/{key}"]
    assert item["parameters"][0]["name"] == "key"
    assert set(item) == {"parameters", "get", "head", "put", "delete"}
    assert {"200", "304", "404", "412"} <= set(item["get"]["responses"])
    assert {"200", "201", "412", "413", "507"} <= set(item["put"]["responses"])
    assert {"204", "404", "412"} <= set(item["delete"]["responses"])
    # a HEAD answers no body: none is described
    for head in (item["head"], paths["/kv"]["head"]):
        assert not any("content" in answer for answer in head["responses"].values())
    assert "content" in item["get"]["responses"]["200"]
    assert item["put"]["responses"]["201"]["headers"].keys() >= {"ETag", "Location"}
    problem = item["put"]["responses"]["507"]["content"]["application/problem+json"]
    assert problem["schema"] == {"$ref": "#/components/schemas/Problem"}  # (the gateway's one)
    json.dumps(paths)  # (plain JSON data)
