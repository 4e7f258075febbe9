"""The outbound guard and the shared client (reliability.md §8, §9, §15), against the CRM simulator
on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given
from hypothesis import settings as settings_h
from hypothesis import strategies as st

from cti_bridge.config import Settings
from cti_bridge.delivery import egress
from cti_bridge.delivery.crm_client import CrmClient
from cti_bridge.delivery.egress import (
    EgressRefused,
    GuardedResolver,
    HostLimiter,
    address_refused,
    build_http_client,
    check_url,
    read_limited,
)
from cti_bridge.delivery.retry import Outcome, classify
from cti_bridge.sim.crm import CrmSimulator, Failure


@pytest.fixture
async def sim() -> AsyncIterator[CrmSimulator]:
    async with CrmSimulator(auth_required=False) as s:
        yield s


def settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "169.254.1.1",
        "100.64.0.1",  # shared address space
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fd00:ec2::254",  # AWS metadata over IPv6
        "fc00::1",
        "fec0::1",  # site-local (deprecated): Python counts it as global
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refused(address) is not None
    with pytest.raises(EgressRefused):
        check_url(f"https://{'[' + address + ']' if ':' in address else address}/x", allow_private=False)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refused(address) is None
    host = f"[{address}]" if ":" in address else address
    check_url(f"https://{host}/services/apexrest/Call?x=1", allow_private=False)


def test_private_literals_pass_when_allowed() -> None:
    check_url("http://127.0.0.1:9200/x", allow_private=True)
    check_url("http://[::1]:9200/x", allow_private=True)


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x", "file:///etc/passwd", "gopher://example.com/", "example.com/x", "http:///nohost"],
)
def test_only_http_and_https(url: str) -> None:
    with pytest.raises(EgressRefused):
        check_url(url, allow_private=True)


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f000001", "017700000001"])
def test_legacy_numeric_ipv4_forms_are_refused(host: str) -> None:
    with pytest.raises(EgressRefused):
        check_url(f"http://{host}/", allow_private=False)


def test_refusal_text_names_the_host_not_the_query() -> None:
    with pytest.raises(EgressRefused) as info:
        check_url("http://10.0.0.1/x?token=very-secret-token", allow_private=False)
    assert "very-secret-token" not in str(info.value)
    assert "10.0.0.1" in str(info.value)


class FakeResolver(AbstractResolver):
    """Answers a fixed list of addresses, as a rebinding DNS server could."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
            for a in self.addresses
        ]

    async def close(self) -> None:
        return None


async def test_resolver_refuses_a_host_resolving_to_private_addresses() -> None:
    resolver = GuardedResolver(False, FakeResolver(["10.0.0.5", "169.254.169.254"]))
    with pytest.raises(EgressRefused):
        await resolver.resolve("crm.example.com", 443)


async def test_resolver_keeps_only_public_addresses() -> None:
    resolver = GuardedResolver(False, FakeResolver(["127.0.0.1", "93.184.216.34"]))
    results = await resolver.resolve("crm.example.com", 443)
    assert [r["host"] for r in results] == ["93.184.216.34"]


async def test_resolver_passes_everything_when_private_allowed() -> None:
    resolver = GuardedResolver(True, FakeResolver(["127.0.0.1"]))
    assert [r["host"] for r in await resolver.resolve("crm.example.com", 443)] == ["127.0.0.1"]


async def test_hostname_resolving_to_loopback_is_refused_at_connect(sim: CrmSimulator) -> None:
    # "localhost" is no IP literal: aiohttp asks the resolver, which is where the guard acts.
    async with build_http_client(settings(allow_private_targets=False)) as client:
        with pytest.raises(EgressRefused) as info:
            await client.post(f"http://localhost:{sim.port}/x", json={"a": 1})
    assert "localhost" in str(info.value)
    assert classify(None, info.value) is Outcome.PERMANENT
    assert sim.received == []


async def test_hostname_resolving_to_loopback_passes_when_allowed(sim: CrmSimulator) -> None:
    async with build_http_client(settings(allow_private_targets=True)) as client:
        response = await client.post(f"http://localhost:{sim.port}/x", json={"a": 1})
    assert response.status_code == 201
    assert len(sim.received) == 1


async def test_ip_literal_refused_by_the_client_too(sim: CrmSimulator) -> None:
    async with build_http_client(settings(allow_private_targets=False)) as client:
        with pytest.raises(EgressRefused):
            await client.get(f"http://127.0.0.1:{sim.port}/x")
    assert sim.received == []


async def test_ftp_refused_by_the_client() -> None:
    async with build_http_client(settings(allow_private_targets=True)) as client:
        with pytest.raises((EgressRefused, httpx.UnsupportedProtocol)):
            await client.get("ftp://127.0.0.1/x")


async def test_redirect_is_not_followed(sim: CrmSimulator) -> None:
    sim.add_rule("/moved", Failure(status=302, headers={"Location": f"{sim.url}/elsewhere"}, body=b""))
    async with build_http_client(settings(allow_private_targets=True)) as client:
        response = await client.post(f"{sim.url}/moved", json={"a": 1})
    assert response.status_code == 302
    assert [r.path for r in sim.received] == ["/moved"]
    assert classify(response.status_code, None) is Outcome.PERMANENT


async def test_body_read_is_capped(sim: CrmSimulator) -> None:
    sim.script(Failure(status=200, body=b"x" * 200_000))
    async with build_http_client(settings(allow_private_targets=True)) as client:
        request = client.build_request("GET", f"{sim.url}/big")
        response = await client.send(request, stream=True)
        body, truncated = await read_limited(response, 4096)
        assert (len(body), truncated) == (4096, True)
        response = await client.get(f"{sim.url}/small")
        # A small body after a truncated one: the pool still works.
        body, truncated = await read_limited(response, 4096)
        assert (body, truncated) == (b'{"ok":true}', False)


async def test_whole_request_timeout(sim: CrmSimulator) -> None:
    sim.script(Failure.slow(3.0))
    client = build_http_client(settings(allow_private_targets=True, request_timeout=0.3, connect_timeout=0.2))
    async with client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(httpx.TimeoutException) as info:
            await client.post(f"{sim.url}/slow", json={})
        assert loop.time() - started < 2.0
    assert classify(None, info.value) is Outcome.RETRY


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with build_http_client(settings(allow_private_targets=True)) as client:
        with pytest.raises(httpx.TransportError) as info:
            await client.get(f"http://127.0.0.1:{port}/x")
    assert classify(None, info.value) is Outcome.RETRY


async def test_crm_requests_ask_for_no_compression_and_httpx_still_decodes_it() -> None:
    # The shared session does not decompress: a CRM request asks for an uncompressed answer, while
    # the httpx client on the same session asks for gzip and decodes it itself.
    text = b'{"error":"unknown field callId"}'
    asked: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        accept = request.headers.get("Accept-Encoding", "")
        asked.append(accept)
        if "gzip" in accept:
            return web.Response(status=400, body=gzip.compress(text), headers={"Content-Encoding": "gzip"})
        return web.Response(status=400, body=text)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    s = settings(allow_private_targets=True)
    crm = CrmClient(s)
    http = build_http_client(s, crm.session)
    try:
        answer = await crm.send("POST", f"http://127.0.0.1:{port}/calls", {}, b"{}", max_bytes=4096)
        assert (answer.status, answer.body) == (400, text)
        response = await http.post(f"http://127.0.0.1:{port}/token", json={})
        assert (response.status_code, response.content) == (400, text)
        # A mapping's own Accept-Encoding is sent as it is.
        await crm.send("GET", f"http://127.0.0.1:{port}/x", {"Accept-Encoding": "br"}, None, max_bytes=4096)
    finally:
        await http.aclose()
        await crm.aclose()
        await runner.cleanup()
    assert asked[0] == "identity"
    assert "gzip" in asked[1]
    assert asked[2] == "br"


async def test_dropped_connection_is_retryable(sim: CrmSimulator) -> None:
    sim.script(Failure.dropped())
    async with build_http_client(settings(allow_private_targets=True)) as client:
        with pytest.raises(httpx.TransportError) as info:
            await client.post(f"{sim.url}/x", json={})
        assert classify(None, info.value) is Outcome.RETRY
        assert (await client.post(f"{sim.url}/x", json={})).status_code == 201
    assert [r.status for r in sim.received] == [0, 201]


async def test_host_limiter_caps_concurrency_per_host() -> None:
    limiter = HostLimiter(3)
    active: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}

    async def job(host: str) -> None:
        async with limiter.slot(host):
            active[host] += 1
            peak[host] = max(peak[host], active[host])
            await asyncio.sleep(0.01)
            active[host] -= 1

    async with asyncio.TaskGroup() as tg:
        for _ in range(20):
            tg.create_task(job("a"))
        for _ in range(2):
            tg.create_task(job("b"))
    assert peak == {"a": 3, "b": 2}
    assert limiter.in_use("a") == 0


async def test_slow_host_does_not_block_another_host() -> None:
    limiter = HostLimiter(2)
    release = asyncio.Event()

    async def hold(host: str) -> None:
        async with limiter.slot(host):
            await release.wait()

    holders = [asyncio.create_task(hold("slow.example")) for _ in range(2)]
    await asyncio.sleep(0)
    assert limiter.in_use("slow.example") == 2
    async with asyncio.timeout(1):
        async with limiter.slot("fast.example"):
            assert limiter.in_use("fast.example") == 1
    release.set()
    await asyncio.gather(*holders)


async def test_cancelled_waiter_takes_no_slot_and_holder_releases() -> None:
    limiter = HostLimiter(1)
    entered = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot("h"):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(holder())
    await entered.wait()
    waiter = asyncio.create_task(_enter(limiter, "h"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    task.cancel()
    await asyncio.gather(task, waiter, return_exceptions=True)
    assert limiter.in_use("h") == 0
    async with asyncio.timeout(1):
        await _enter(limiter, "h")


async def _enter(limiter: HostLimiter, host: str) -> None:
    async with limiter.slot(host):
        pass


# -- check_url's origins: a URL that begins with an origin already passed is not parsed again ----

_TRICKY = [
    "https://crm.example/calls/1732443153.1021?user=anne",
    "https://crm.example:8443/x",
    "https://user:pw@crm.example/x",
    "https://[2001:db8::1]/x",
    "https://crm.example?x=/y",  # the netloc ends at "?": no origin to keep
    "https://crm.example#f/y",
    "HTTPS://crm.example/x",  # urlsplit lowers the scheme: not the origin as written
    "https://127.0.0.1/x",
    "http://10.0.0.1:8080/x",
    "ftp://crm.example/x",
    "https://crm.example",  # no "/" after the host
    "https:///x",
    "https://crm.example.attacker.example/x",
    "https://crm.example@127.0.0.1/x",
    "https://crm.example\\@127.0.0.1/x",
]


def _verdict(url: str, allow_private: bool) -> str:
    try:
        return "ok " + check_url(url, allow_private)
    except EgressRefused as exc:
        return "refused " + str(exc)


@pytest.mark.parametrize("allow_private", [False, True])
def test_a_known_origin_gives_the_verdict_a_parse_gives(allow_private: bool) -> None:
    """Every URL twice in a row, and then all again (each origin known by then): the same verdict
    and netloc every time as with no origin known."""
    egress._ORIGINS.clear()
    fresh = {}
    for url in _TRICKY:
        egress._ORIGINS.clear()
        fresh[url] = _verdict(url, allow_private)
    for url in _TRICKY + _TRICKY:
        assert _verdict(url, allow_private) == fresh[url], url
        assert egress.netloc_of(url) == urlsplit(url).netloc, url
    assert ("https://crm.example/", allow_private) in egress._ORIGINS
    assert not any(o.startswith(("HTTPS", "https://crm.example?", "ftp")) for o, _ in egress._ORIGINS)


def test_an_origin_passed_with_private_targets_allowed_is_not_passed_without() -> None:
    egress._ORIGINS.clear()
    assert check_url("http://10.0.0.1:8080/a", True) == "10.0.0.1:8080"
    with pytest.raises(EgressRefused):
        check_url("http://10.0.0.1:8080/b", False)


@settings_h(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
    netloc=st.text(alphabet="abc.:@[]1270/?#\\%", min_size=0, max_size=16),
    rest=st.text(alphabet="ab/?#=:@.", max_size=12),
)
def test_known_origins_never_change_a_verdict(scheme: str, netloc: str, rest: str) -> None:
    """Random URLs against a cache holding the origins of the URLs before them."""
    url = f"{scheme}://{netloc}/{rest}"
    known = _verdict(url, False)
    saved = dict(egress._ORIGINS)
    egress._ORIGINS.clear()
    assert _verdict(url, False) == known, url
    egress._ORIGINS.update(saved)
