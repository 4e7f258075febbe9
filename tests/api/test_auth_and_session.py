"""Authentication: api/session/login, tokens (operator, session, expired), tenant isolation, the
failed-login limiter."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from cti_bridge.admin.auth import LoginLimiter, RateLimited
from cti_bridge.store.crypto import hash_token
from cti_bridge.store.models import AdminSession
from tests.api.conftest import (
    OPERATOR,
    FakeClock,
    assert_error,
    auth,
    integration_body,
    make_integration,
    rows,
)
from tests.api.xelion_world import XelionWorld

LOGIN_A = {
    "adminUsername": "admin-a",
    "adminPassword": "pw-a-secret",
    "host": "pbx-a.example.com",
    "tenant": "alpha",
}


async def test_login_answers_the_manual_shape_and_stores_only_a_hash(
    client: httpx.AsyncClient, database, clock: FakeClock
) -> None:
    await make_integration(client, "a")
    r = await client.post("/api/session/login", json=LOGIN_A)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"authentication", "validUntil"}
    assert re.fullmatch(r"[0-9a-f]{40}", body["authentication"])
    # session_ttl_seconds=3600 from the fake clock's 2026-01-05 09:00:00 UTC.
    assert body["validUntil"] == "2026-01-05 10:00:00"
    hashes = {s.token_hash for s in rows(database, AdminSession)}
    assert hash_token(body["authentication"]) in hashes
    assert body["authentication"] not in hashes


async def test_login_failures_are_401_10004(client: httpx.AsyncClient, xelion: XelionWorld) -> None:
    await make_integration(client, "a")
    for bad in (
        {**LOGIN_A, "adminPassword": "wrong"},
        {**LOGIN_A, "adminUsername": "someone"},
        {**LOGIN_A, "tenant": "no-such-tenant"},
    ):
        assert_error(await client.post("/api/session/login", json=bad), 401, 10004)
        await client.post("/api/session/login", json=LOGIN_A)  # a success resets the limiter
    # Stored credentials match but Xelion no longer accepts them (changed on the phone system).
    xelion.set_password("pbx-a.example.com", "alpha", "admin-a", "changed")
    assert_error(await client.post("/api/session/login", json=LOGIN_A), 401, 10004)
    err = assert_error(await client.post("/api/session/login", json={"adminUsername": "x"}), 422, 10201)
    assert "adminPassword: field required" in err["info"]


async def test_tokens_missing_wrong_or_expired_are_401(client: httpx.AsyncClient, clock: FakeClock) -> None:
    a = await make_integration(client, "a")
    url = f"/api/xelion-environment/{a.xelion_id}"
    assert_error(await client.get(url), 401, 10000)
    assert_error(await client.get(url, headers={"Authorization": "xelion"}), 401, 10000)
    assert_error(await client.get(url, headers={"Authorization": "xelion not-a-token"}), 401, 10000)
    assert_error(await client.get(url, headers={"Authorization": f"Bearer {a.token}"}), 401, 10000)
    assert (await client.get(url, headers={"Authorization": f"XELION {a.token}"})).status_code == 200
    clock.advance(3599)
    assert (await client.get(url, headers=auth(a.token))).status_code == 200
    clock.advance(1)
    assert_error(await client.get(url, headers=auth(a.token)), 401, 10000)
    # The operator token does not expire.
    assert (await client.get(url, headers=OPERATOR)).status_code == 200


async def test_tenant_a_token_gets_404_on_every_resource_of_tenant_b(
    client: httpx.AsyncClient, database
) -> None:
    a = await make_integration(client, "a", users=["anne"])
    b = await make_integration(client, "b", users=["carol"])
    r = await client.get(
        f"/api/crm-integrations/{b.xelion_id}/crm-contexts/{b.crm_id}/user-credentials", headers=OPERATOR
    )
    carol = r.json()[0]["userCredentialsId"]
    x, c = b.xelion_id, b.crm_id
    requests = [
        ("GET", "/api/crm-integrations", {"xelionHost": "pbx-b.example.com", "xelionTenant": "beta"}, None),
        ("DELETE", f"/api/crm-integrations/{x}", None, None),
        ("GET", f"/api/crm-integrations/{x}/crm-contexts/{c}/user-credentials", None, None),
        (
            "POST",
            f"/api/crm-integrations/{x}/crm-contexts/{c}/user-credentials",
            None,
            [{"xelionUsername": "dave"}],
        ),
        ("GET", f"/api/crm-integrations/{x}/crm-contexts/{c}/event-uri-mappings", None, None),
        ("PUT", f"/api/crm-integrations/{x}/crm-contexts/{c}/event-uri-mappings", None, []),
        # a's own xelion id with b's CRM context
        ("GET", f"/api/crm-integrations/{a.xelion_id}/crm-contexts/{c}/user-credentials", None, None),
        ("GET", f"/api/users/{carol}", None, None),
        ("PUT", f"/api/users/{carol}", None, {"xelionUsername": "x"}),
        ("DELETE", f"/api/users/{carol}", None, None),
        ("POST", f"/api/users/{carol}/refreshtoken/update", None, {"value": "stolen"}),
        ("POST", f"/api/users/{carol}/clientsecret/update", None, {"value": "stolen"}),
        ("GET", f"/api/xelion-environment/{x}", None, None),
        ("PUT", f"/api/xelion-environment/{x}", None, {"host": "pbx-b.example.com", "tenant": "t"}),
        (
            "POST",
            f"/api/xelion-environment/{x}/admin/username/update",
            None,
            {"oldUsername": "admin-b", "newUsername": "x"},
        ),
        (
            "POST",
            f"/api/xelion-environment/{x}/admin/password/update",
            None,
            {"oldPassword": "pw-b-secret", "newPassword": "x"},
        ),
    ]
    for method, url, params, body in requests:
        r = await client.request(method, url, params=params, json=body, headers=auth(a.token))
        assert_error(r, 404, 10100)
        # The operator reaches each (no 401/404; the mutations are checked elsewhere).
    for method, url, params, _body in requests:
        if method == "GET":
            r = await client.request(method, url, params=params, headers=OPERATOR)
            assert r.status_code == (
                404 if url.startswith(f"/api/crm-integrations/{a.xelion_id}/") else 200
            ), url
    # Nothing of b changed.
    r = await client.get(f"/api/users/{carol}", headers=auth(b.token))
    assert r.json() == {"xelionOid": "2001", "xelionUsername": "carol"}


async def test_login_limiter_gives_429_with_retry_after_then_recovers(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await make_integration(client, "a")
    bad = {**LOGIN_A, "adminPassword": "guess"}
    for _ in range(3):  # login_failures_before_delay=3
        assert_error(await client.post("/api/session/login", json=bad), 401, 10004)
    r = await client.post("/api/session/login", json=LOGIN_A)  # even the right password waits
    assert_error(r, 429, 10400)
    assert r.headers["Retry-After"] == "30"
    clock.advance(10)
    r = await client.post("/api/session/login", json=bad)
    assert_error(r, 429, 10400)
    assert r.headers["Retry-After"] == "20"
    clock.advance(20)
    assert (await client.post("/api/session/login", json=LOGIN_A)).status_code == 200
    # The success reset the count: two failures do not lock.
    for _ in range(2):
        assert_error(await client.post("/api/session/login", json=bad), 401, 10004)
    assert (await client.post("/api/session/login", json=LOGIN_A)).status_code == 200


@pytest.mark.parametrize("path", ["/api/session/login", "/api/crm-integrations"])
async def test_guesses_sent_at_once_are_limited_as_if_sent_one_by_one(
    client: httpx.AsyncClient, path: str
) -> None:
    """The limiter counted a failure only once Xelion or the database had answered, so every guess
    already in flight passed its check: 200 sent at once were all tried against a limit of 5 (a
    security review's finding). Attempts in flight count until answered."""
    if path == "/api/session/login":
        await make_integration(client, "a")
        bad: dict[str, object] = {**LOGIN_A, "adminPassword": "guess"}
    else:
        bad = integration_body("a")
        bad["xelionContext"]["adminPassword"] = "guess"  # type: ignore[index]
    answers = await asyncio.gather(*(client.post(path, json=bad) for _ in range(40)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(401) <= 3 and statuses.count(429) >= 37, statuses  # login_failures_before_delay=3
    for r in answers:
        if r.status_code == 429:
            assert_error(r, 429, 10400)


async def test_unauthenticated_post_with_wrong_admin_password_counts_as_failed_login(
    client: httpx.AsyncClient,
) -> None:
    body = integration_body("a")
    body["xelionContext"]["adminPassword"] = "guess"
    for _ in range(3):
        assert_error(await client.post("/api/crm-integrations", json=body), 401, 10004)
    assert_error(await client.post("/api/crm-integrations", json=integration_body("a")), 429, 10400)
    # The operator is not slowed down.
    assert (
        await client.post("/api/crm-integrations", json=integration_body("a"), headers=OPERATOR)
    ).status_code == 200


def test_failures_older_than_the_window_do_not_count_against_attempts_in_flight(clock: FakeClock) -> None:
    """Expired failures still counted in ``attempt`` until the next failure pruned them: an address
    with two old failures could run one attempt at a time (a review's finding)."""
    limiter = LoginLimiter(clock, max_failures=3, lockout_seconds=30, window_seconds=300)
    limiter.failure("10.0.0.1")
    limiter.failure("10.0.0.1")
    clock.advance(301)
    with limiter.attempt("10.0.0.1"), limiter.attempt("10.0.0.1"), limiter.attempt("10.0.0.1"):
        with pytest.raises(RateLimited):
            with limiter.attempt("10.0.0.1"):
                pass
