"""The CRM simulator itself: what the other tests and the demo rely on it to do, over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from cti_bridge.sim.crm import DEVICE_CODE_GRANT, CrmSimulator, Failure


@pytest.fixture
async def sim() -> AsyncIterator[CrmSimulator]:
    async with CrmSimulator() as s:
        s.add_client("cid", "csecret")
        yield s


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as c:
        yield c


async def refresh(
    client: httpx.AsyncClient,
    sim: CrmSimulator,
    refresh_token: str,
    *,
    basic: bool = False,
    secret: str = "csecret",
) -> httpx.Response:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    headers = {}
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(f"cid:{secret}".encode()).decode()
    else:
        form.update(client_id="cid", client_secret=secret)
    return await client.post(sim.token_url, data=form, headers=headers)


async def test_port_zero_and_url(sim: CrmSimulator) -> None:
    assert sim.port > 0
    assert sim.url == f"http://127.0.0.1:{sim.port}"
    assert sim.token_url.endswith("/oauth2/token")


async def test_records_what_it_receives(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    token = sim.issue_access_token()
    before = time.time()
    r = await client.post(
        f"{sim.url}/services/apexrest/Call?a=1&b=x%20y",
        content=b'{"callId":"c1"}',
        headers={
            "Authorization": "Bearer " + token,
            "Idempotency-Key": "d-1",
            "Content-Type": "application/json",
        },
    )
    assert r.status_code == 201 and r.json() == {"ok": True}
    r = await client.put(f"{sim.url}/api/calls/7", content=b"", headers={"Authorization": "OAuth " + token})
    assert r.status_code == 200
    first, second = await sim.wait_for(2, timeout=1)
    assert (first.method, first.path, first.query) == ("POST", "/services/apexrest/Call", "a=1&b=x%20y")
    assert first.headers["Idempotency-Key"] == "d-1"
    assert first.json() == {"callId": "c1"}
    assert first.status == 201 and before <= first.at <= time.time()
    assert (second.method, second.path, second.body, second.status) == ("PUT", "/api/calls/7", b"", 200)


async def test_rejects_missing_unknown_or_expired_tokens(
    sim: CrmSimulator, client: httpx.AsyncClient
) -> None:
    expiring = sim.issue_access_token(expires_in=0.05)
    assert (await client.post(f"{sim.url}/x")).status_code == 401
    assert (await client.post(f"{sim.url}/x", headers={"Authorization": "Bearer nope"})).status_code == 401
    assert (
        await client.post(f"{sim.url}/x", headers={"Authorization": "Bearer " + expiring})
    ).status_code == 201
    await asyncio.sleep(0.1)
    assert (
        await client.post(f"{sim.url}/x", headers={"Authorization": "Bearer " + expiring})
    ).status_code == 401
    assert [r.status for r in sim.received] == [401, 401, 201, 401]


async def test_token_in_a_query_parameter(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    sim.token_query_param = "token"
    token = sim.issue_access_token()
    assert (await client.get(f"{sim.url}/crm?token={token}")).status_code == 200
    assert (await client.get(f"{sim.url}/crm?token=wrong")).status_code == 401


async def test_auth_can_be_disabled(client: httpx.AsyncClient) -> None:
    async with CrmSimulator(auth_required=False) as open_sim:
        assert (await client.post(f"{open_sim.url}/x", json={})).status_code == 201


async def test_scripted_failures_in_order(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    sim.auth_required = False
    sim.script(
        Failure.http(503),
        Failure.retry_after(120),
        Failure.retry_after("Wed, 25 Nov 2026 09:00:00 GMT", status=503),
        Failure.unauthorized(),
        Failure.http(422, b'{"error":"bad field"}'),
    )
    answers = [await client.post(f"{sim.url}/p", json={}) for _ in range(6)]
    assert [a.status_code for a in answers] == [503, 429, 503, 401, 422, 201]
    assert answers[1].headers["Retry-After"] == "120"
    assert answers[2].headers["Retry-After"] == "Wed, 25 Nov 2026 09:00:00 GMT"
    assert answers[4].json() == {"error": "bad field"}
    assert [r.status for r in sim.received] == [503, 429, 503, 401, 422, 201]


async def test_per_path_rules(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    sim.auth_required = False
    sim.add_rule("/broken", Failure.http(500))
    sim.add_rule("/flaky", Failure.http(502), times=2)
    statuses = [
        (await client.post(f"{sim.url}{path}", json={})).status_code
        for path in ("/broken/a", "/flaky", "/ok", "/flaky", "/flaky", "/broken/b")
    ]
    assert statuses == [500, 502, 201, 502, 201, 500]
    sim.clear_rules()
    assert (await client.post(f"{sim.url}/broken", json={})).status_code == 201


async def test_slow_answer(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    sim.auth_required = False
    sim.script(Failure.slow(0.3))
    started = time.monotonic()
    assert (await client.post(f"{sim.url}/slow", json={})).status_code == 201
    assert time.monotonic() - started >= 0.3
    with pytest.raises(httpx.ReadTimeout):
        sim.script(Failure.slow(1.0))
        await client.post(f"{sim.url}/slow", json={}, timeout=0.2)
    assert len(sim.received) == 2  # recorded on arrival, before the wait


async def test_dropped_connection_after_recording(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    sim.auth_required = False
    sim.script(Failure.dropped())
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(f"{sim.url}/drop", json={"n": 1})
    assert [(r.path, r.status, r.json()) for r in sim.received] == [("/drop", 0, {"n": 1})]
    assert (await client.post(f"{sim.url}/after", json={})).status_code == 201


async def test_wait_for_times_out(sim: CrmSimulator) -> None:
    with pytest.raises(TimeoutError):
        await sim.wait_for(1, timeout=0.05)


async def test_refresh_grant_post_and_basic(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    sim.expires_in = 300
    sim.extra_fields = {"instance_url": "https://eu1.example.com", "api_domain": "https://api.example.eu"}
    rt = sim.issue_refresh_token("cid")
    for basic in (False, True):
        r = await refresh(client, sim, rt, basic=basic)
        assert r.status_code == 200
        doc = r.json()
        assert doc["expires_in"] == 300 and doc["token_type"] == "Bearer"
        assert (
            doc["instance_url"] == "https://eu1.example.com" and doc["api_domain"] == "https://api.example.eu"
        )
        assert "refresh_token" not in doc  # not rotated
        assert sim.access_token_valid(doc["access_token"])
    assert [(t.grant_type, t.auth_method, t.client_id) for t in sim.token_requests] == [
        ("refresh_token", "client_secret_post", "cid"),
        ("refresh_token", "client_secret_basic", "cid"),
    ]
    assert sim.token_counts == {"refresh_token": 2}


async def test_wrong_client_secret_is_invalid_client(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    rt = sim.issue_refresh_token("cid")
    for basic in (False, True):
        r = await refresh(client, sim, rt, basic=basic, secret="wrong")
        assert (r.status_code, r.json()["error"]) == (401, "invalid_client")


async def test_no_expiry_rotation_and_invalid_grant(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    sim.expires_in = None
    sim.rotate_refresh_tokens = True
    old = sim.issue_refresh_token("cid")
    doc = (await refresh(client, sim, old)).json()
    assert "expires_in" not in doc
    new = doc["refresh_token"]
    assert new != old and sim.current_refresh_tokens("cid") == [new]
    r = await refresh(client, sim, old)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert (await refresh(client, sim, new)).status_code == 200


async def test_invalid_grant_on_demand(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    a, b = sim.issue_refresh_token("cid"), sim.issue_refresh_token("cid")
    sim.revoke_refresh_token(a)
    assert (await refresh(client, sim, a)).status_code == 400
    assert (await refresh(client, sim, b)).status_code == 200
    sim.invalid_grant_all = True
    assert (await refresh(client, sim, b)).json()["error"] == "invalid_grant"
    sim.error_style = "zoho"
    r = await refresh(client, sim, b)
    assert (r.status_code, r.json()) == (200, {"error": "invalid_code"})


async def test_device_code_grant(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    code = sim.add_device_code("cid", pending=2, slow_down=1)
    form = {
        "grant_type": DEVICE_CODE_GRANT,
        "device_code": code,
        "client_id": "cid",
        "client_secret": "csecret",
    }
    errors = []
    for _ in range(3):
        r = await client.post(sim.token_url, data=form)
        assert r.status_code == 400
        errors.append(r.json()["error"])
    assert errors == ["slow_down", "authorization_pending", "authorization_pending"]
    r = await client.post(sim.token_url, data=form)
    assert r.status_code == 200
    assert sim.current_refresh_tokens("cid") == [r.json()["refresh_token"]]
    again = await client.post(sim.token_url, data=form)
    assert again.json()["error"] == "invalid_grant"  # consumed
    assert sim.token_counts == {DEVICE_CODE_GRANT: 5}


async def test_scripted_token_failures_and_hook(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    seen: list[str] = []

    async def hook(grant_type: str) -> None:
        seen.append(grant_type)

    sim.token_hook = hook
    sim.token_failures.append(Failure.http(503))
    rt = sim.issue_refresh_token("cid")
    assert (await refresh(client, sim, rt)).status_code == 503
    assert (await refresh(client, sim, rt)).status_code == 200
    assert seen == ["refresh_token", "refresh_token"]
    assert [t.status for t in sim.token_requests] == [503, 200]


async def test_control_api(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    r = await client.post(
        f"{sim.url}/_sim/clients", json={"client_id": "demo", "client_secret": "demo-secret"}
    )
    assert r.status_code == 201
    rt = r.json()["refresh_token"]
    form = {
        "grant_type": "refresh_token",
        "refresh_token": rt,
        "client_id": "demo",
        "client_secret": "demo-secret",
    }
    assert (await client.post(sim.token_url, data=form)).status_code == 200
    stats = (await client.get(f"{sim.url}/_sim/stats")).json()
    assert stats == {"received": 0, "token_requests": {"refresh_token": 1}}


async def test_control_api_device_codes_and_failures(sim: CrmSimulator, client: httpx.AsyncClient) -> None:
    """What an operator trying the README needs over HTTP: a device code to give a user, and a
    failure to watch a retry (a README walkthrough's finding: only Python could do either)."""
    await client.post(f"{sim.url}/_sim/clients", json={"client_id": "demo", "client_secret": "demo-secret"})
    r = await client.post(f"{sim.url}/_sim/device-codes", json={"client_id": "demo", "pending": 1})
    assert r.status_code == 201
    form = {
        "grant_type": DEVICE_CODE_GRANT,
        "device_code": r.json()["device_code"],
        "client_id": "demo",
        "client_secret": "demo-secret",
    }
    first = await client.post(sim.token_url, data=form)
    assert (first.status_code, first.json()["error"]) == (400, "authorization_pending")
    second = await client.post(sim.token_url, data=form)
    assert second.status_code == 200 and second.json()["refresh_token"]

    r = await client.post(
        f"{sim.url}/_sim/failures", json={"path": "/calls", "status": 503, "retry_after": 7, "times": 2}
    )
    assert r.status_code == 201
    token = second.json()["access_token"]
    answers = [
        await client.post(f"{sim.url}/calls", json={}, headers={"Authorization": f"Bearer {token}"})
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [503, 503, 201]
    assert answers[0].headers["Retry-After"] == "7"
    await client.post(f"{sim.url}/_sim/failures", json={"path": "/", "drop": True, "times": None})
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(f"{sim.url}/calls", json={}, headers={"Authorization": f"Bearer {token}"})
    assert (await client.delete(f"{sim.url}/_sim/failures")).status_code == 200
    r = await client.post(f"{sim.url}/calls", json={}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201


def test_standalone_process() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cti_bridge.sim.crm",
            "--port",
            "0",
            "--no-auth",
            "--client",
            "demo:demo-secret",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in first
        url = first.split(" on ", 1)[1].split(" ", 1)[0]
        assert proc.stdout.readline().startswith("client demo: refresh token rt-")
        r = httpx.post(f"{url}/services/apexrest/Call", json={"a": 1}, timeout=5)
        assert r.status_code == 201
        assert httpx.get(f"{url}/_sim/stats", timeout=5).json()["received"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=5)
