"""Tokens, end to end (reliability.md §6 for 401, §10-§13): a 401 refreshes once and retries once,
a hundred deliveries meeting an expired token make one token request, a rotated refresh token is
persisted and keeps working, and a dead grant parks that user's deliveries (and only theirs) until an
operator sets a new refresh token. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime

import pytest

from cti_bridge.sim.crm import DEVICE_CODE_GRANT, Failure, Received
from cti_bridge.store.models import UserCredentials
from tests.e2e.stack import CLIENT_ID, CLIENT_SECRET, Stack, running_stack


def _bearer(received: Received) -> str:
    return received.headers["Authorization"].removeprefix("Bearer ")


def _call_id(received: Received) -> str:
    return str(json.loads(received.body)["callId"])


async def _stored_refresh_token(st: Stack, username: str) -> str | None:
    cred = await st.credential_id(username)
    row = await st.daemon.db.run(lambda s: s.get(UserCredentials, cred))
    assert row is not None
    return st.daemon.box.decrypt_opt(row.refresh_token_enc)


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _gauge(metrics: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", metrics, re.M)
    assert found, f"{name}{{{labels}}} not in the metrics"
    return float(found.group(1))


async def test_401_refreshes_once_and_retries_once(db_url: str) -> None:
    """§6, §12: a CRM answering 401 (a provider without ``expires_in``, whose token was revoked)
    gets exactly one token request and one retry; a second 401 with the fresh token is dead."""
    async with running_stack(db_url) as st:
        st.crm.expires_in = None  # Salesforce: no expiry given, the token is used until a 401
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/new")])
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(1)
        assert st.crm.token_counts["refresh_token"] == 1

        st.crm.revoke_access_tokens()
        second = await st.xelion.place_call("incoming", callee="anne")
        items = await st.wait_settled(2)
        assert {d["state"] for d in items} == {"delivered"}
        tries = [r for r in st.crm.received if _call_id(r) == second.call_id]
        assert [r.status for r in tries] == [401, 201]
        assert _bearer(tries[0]) != _bearer(tries[1])
        assert tries[0].headers["Idempotency-Key"] == tries[1].headers["Idempotency-Key"]
        assert st.crm.token_counts["refresh_token"] == 2

        st.crm.add_rule("/calls/new", Failure.unauthorized(), times=2)
        third = await st.xelion.place_call("incoming", callee="anne")
        items = await st.wait_settled(3)
        dead = next(d for d in items if d["callId"] == third.call_id)
        assert dead["state"] == "dead"
        assert dead["lastStatus"] == 401
        assert "401 again" in dead["lastError"]
        tries = [r for r in st.crm.received if _call_id(r) == third.call_id]
        assert [r.status for r in tries] == [401, 401]
        assert _bearer(tries[0]) != _bearer(tries[1])
        assert st.crm.token_counts["refresh_token"] == 3
        await asyncio.sleep(0.3)
        assert len([r for r in st.crm.received if _call_id(r) == third.call_id]) == 2


async def _place_calls(st: Stack, n: int, callee: str = "anne") -> None:
    await asyncio.gather(*(st.xelion.place_call("incoming", callee=callee) for _ in range(n)))


@pytest.mark.slow
async def test_a_hundred_deliveries_one_token_request(db_url: str) -> None:
    """§10, §12: 100 deliveries in flight at once meeting an expired token (proactively: inside
    the margin; reactively: every one answered 401) make exactly one token request each time."""
    async with running_stack(
        db_url, worker_concurrency=128, per_host_concurrency=50, token_refresh_margin_seconds=60
    ) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/new")])
        # Due for its refresh one second from now (a token this short is refreshed after half its
        # life, not 60 s before its end), and still valid meanwhile.
        st.crm.expires_in = 2
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(1)
        assert st.crm.token_counts["refresh_token"] == 1
        await asyncio.sleep(1.1)
        st.crm.expires_in = 3600

        async def all_in_flight(grant_type: str) -> None:
            # Answer the refresh only once all 100 deliveries are claimed and waiting for a token.
            await st.wait_until(lambda: st.daemon.worker.inflight == 100, what="100 in flight")

        st.crm.token_hook = all_in_flight
        await _place_calls(st, 100)
        items = await st.wait_settled(101, timeout=30)
        assert {d["state"] for d in items} == {"delivered"}
        assert st.crm.token_counts["refresh_token"] == 2
        assert len({_bearer(r) for r in st.crm.received[1:]}) == 1

        # Reactive: the CRM revokes the token; all 100 get a 401 before the one refresh answers.
        st.crm.revoke_access_tokens()
        before = len(st.crm.received)

        async def all_rejected(grant_type: str) -> None:
            await st.wait_until(
                lambda: sum(1 for r in st.crm.received[before:] if r.status == 401) == 100,
                what="100 answers 401",
            )

        st.crm.token_hook = all_rejected
        await _place_calls(st, 100)
        items = await st.wait_settled(201, timeout=30)
        assert {d["state"] for d in items} == {"delivered"}
        assert st.crm.token_counts["refresh_token"] == 3
        retried = [r for r in st.crm.received[before:] if r.status == 201]
        assert len(retried) == 100
        assert len({_bearer(r) for r in retried}) == 1


async def test_rotated_refresh_token_is_persisted(db_url: str) -> None:
    """§11: with rotation, the database holds the new refresh token after the refresh, the old one
    is dead at the provider, and the next refresh (with the new one) works."""
    async with running_stack(db_url) as st:
        st.crm.rotate_refresh_tokens = True
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/new")])
        original = st.refresh_tokens["anne"]
        assert await _stored_refresh_token(st, "anne") == original
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(1)
        (rotated,) = st.crm.current_refresh_tokens(CLIENT_ID)
        assert rotated != original
        assert not st.crm.refresh_token_valid(original)
        assert await _stored_refresh_token(st, "anne") == rotated

        st.crm.revoke_access_tokens()  # forces the next refresh, which needs the rotated token
        await st.xelion.place_call("incoming", callee="anne")
        items = await st.wait_settled(2)
        assert {d["state"] for d in items} == {"delivered"}
        assert st.crm.token_counts["refresh_token"] == 2
        assert [t.status for t in st.crm.token_requests] == [200, 200]
        (again,) = st.crm.current_refresh_tokens(CLIENT_ID)
        assert again not in (original, rotated)
        assert await _stored_refresh_token(st, "anne") == again


async def test_dead_grant_parks_that_user_until_a_new_refresh_token(db_url: str) -> None:
    """§13: ``invalid_grant`` marks the credential ``reauth_required`` after one token request;
    that user's deliveries are parked (API, metrics), new ones start parked, other users go on;
    a new refresh token through the admin API resumes and delivers them, in call order."""
    async with running_stack(db_url) as st:
        await st.configure(users=("anne", "bob"))
        anne_id = await st.credential_id("anne")
        st.crm.revoke_refresh_token(st.refresh_tokens["anne"])
        first = await st.xelion.place_call("incoming", callee="anne")
        await st.xelion.place_call("incoming", callee="bob")
        items = await st.wait_settled(6)
        assert sorted((d["xelionUsername"], d["state"]) for d in items) == [
            ("anne", "parked"),
            ("anne", "parked"),
            ("anne", "parked"),
            ("bob", "delivered"),
            ("bob", "delivered"),
            ("bob", "delivered"),
        ]
        assert all(_call_id(r) != first.call_id for r in st.crm.received)
        anne_requests = [t for t in st.crm.token_requests if t.status == 400]
        assert len(anne_requests) == 1  # one attempt, then marked
        users = (
            await st.api.get(
                f"/api/crm-integrations/{st.xelion_context_id}/crm-contexts/{st.crm_context_id}/user-credentials",
                params={"username": "anne"},
            )
        ).json()
        assert users[0]["state"] == "reauth_required"
        parked = await st.deliveries(state="parked")
        assert len(parked) == 3 and {d["xelionUsername"] for d in parked} == {"anne"}
        assert all("re-authorisation" in d["lastError"] for d in parked)
        metrics = await st.metrics()
        assert _gauge(metrics, "cti_bridge_credentials_reauth_required") == 1
        assert _gauge(metrics, "cti_bridge_deliveries", 'state="parked"') == 3

        # New events for anne start parked (never tried); bob is unaffected.
        second = await st.xelion.place_call("incoming", callee="anne")
        await st.xelion.place_call("incoming", callee="bob")
        items = await st.wait_settled(12)
        new_for_anne = [d for d in items if d["callId"] == second.call_id]
        assert [d["state"] for d in new_for_anne] == ["parked"] * 3
        for d in new_for_anne:
            detail = await st.delivery(d["id"])
            assert detail["attempts"] == 0
            assert detail["attemptLog"] == []
        assert sum(1 for d in items if d["xelionUsername"] == "bob" and d["state"] == "delivered") == 6
        assert len([t for t in st.crm.token_requests if t.status == 400]) == 1

        # The operator sets a new refresh token: everything parked is delivered, in call order.
        fresh = st.crm.issue_refresh_token(CLIENT_ID)
        resp = await st.api.post(f"/api/users/{anne_id}/refreshtoken/update", json={"value": fresh})
        assert resp.status_code == 200, resp.text

        async def all_delivered() -> bool:
            return {d["state"] for d in await st.deliveries()} == {"delivered"}

        # The un-parking follows the answer (the admin API hands it to the worker).
        await st.wait_until(all_delivered, what="the parked deliveries to be delivered")
        assert len(await st.deliveries()) == 12
        for call in (first, second):
            events = [json.loads(r.body)["event"] for r in st.crm.received if _call_id(r) == call.call_id]
            assert events == ["newCallEvent", "callConnectedEvent", "callHungUpEvent"]
        metrics = await st.metrics()
        assert _gauge(metrics, "cti_bridge_credentials_reauth_required") == 0
        assert _gauge(metrics, "cti_bridge_deliveries", 'state="parked"') == 0


async def test_a_client_refused_parks_the_user_until_its_client_secret_is_put_right(db_url: str) -> None:
    """``invalid_client`` (a wrong or expired client secret) parks the user as a dead grant does;
    the repair is a new client secret, not a refresh token (which the operator may no longer hold
    once the grant has rotated): it makes the user active and delivers what was parked, in call
    order, with the refresh token the daemon already has."""
    async with running_stack(db_url) as st:
        await st.configure(users=("anne", "bob"))
        anne_id = await st.credential_id("anne")
        update = f"/api/users/{anne_id}/clientsecret/update"
        assert (await st.api.post(update, json={"value": "expired-secret"})).status_code == 200
        first = await st.xelion.place_call("incoming", callee="anne")
        await st.xelion.place_call("incoming", callee="bob")
        items = await st.wait_settled(6)
        assert sorted((d["xelionUsername"], d["state"]) for d in items) == [
            *[("anne", "parked")] * 3,
            *[("bob", "delivered")] * 3,
        ]
        assert [t.status for t in st.crm.token_requests if t.status != 200] == [401]  # one, then parked
        users_url = (
            f"/api/crm-integrations/{st.xelion_context_id}/crm-contexts/{st.crm_context_id}/user-credentials"
        )
        users = (await st.api.get(users_url, params={"username": "anne"})).json()
        assert users[0]["state"] == "reauth_required"

        resp = await st.api.post(update, json={"value": CLIENT_SECRET})
        assert resp.status_code == 200, resp.text

        async def all_delivered() -> bool:
            return {d["state"] for d in await st.deliveries()} == {"delivered"}

        await st.wait_until(all_delivered, what="the parked deliveries to be delivered")
        events = [json.loads(r.body)["event"] for r in st.crm.received if _call_id(r) == first.call_id]
        assert events == ["newCallEvent", "callConnectedEvent", "callHungUpEvent"]
        users = (await st.api.get(users_url, params={"username": "anne"})).json()
        assert users[0]["state"] == "active"
        assert len([t for t in st.crm.token_requests if t.status != 200]) == 1


async def test_a_new_client_secret_is_used_at_the_next_delivery_not_when_the_old_token_expires(
    db_url: str,
) -> None:
    """README: every kind of ``.../update`` drops the user's access token. A new client id or
    secret kept the old client's access token, sent until it expired: a client secret the operator
    rotated (after a leak, say) still worked for the daemon, and the new one was first tried an
    hour later (an operator walkthrough's finding). Now the next delivery asks for a token with
    the new secret, and sends what that gives."""
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("callHungUpEvent")])
        anne_id = await st.credential_id("anne")
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(1)
        [old_token] = {r.headers["Authorization"] for r in st.crm.received}
        asked = len(st.crm.token_requests)
        st.crm.add_client(CLIENT_ID, "rotated-secret")  # the CRM's side of the rotation
        update = f"/api/users/{anne_id}/clientsecret/update"
        assert (await st.api.post(update, json={"value": "rotated-secret"})).status_code == 200
        await st.xelion.place_call("incoming", callee="anne")
        items = await st.wait_settled(2)
        assert {d["state"] for d in items} == {"delivered"}
        assert [(t.client_id, t.status) for t in st.crm.token_requests[asked:]] == [(CLIENT_ID, 200)]
        assert st.crm.received[-1].headers["Authorization"] != old_token


@pytest.mark.parametrize("how", ["user", "integration"])
async def test_a_deleted_credentials_token_never_reaches_the_next_credential_of_its_id(
    db_url: str, how: str
) -> None:
    """SQLite gave a deleted row's id to the next row, and the token cache is keyed by the
    credential's id: after deleting a user (or its integration) the next credential created got
    the deleted one's cached access token, another user's, perhaps another tenant's (a security
    review's finding). Deleting drops the cached token, and ids are no longer given twice
    (``store.models._next_id``): the new credential gets an id and a token of its own."""
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("callHungUpEvent")])
        anne_id = await st.credential_id("anne")
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(1)
        [anne_token] = {r.headers["Authorization"] for r in st.crm.received}
        if how == "user":
            assert (await st.api.delete(f"/api/users/{anne_id}")).status_code == 200
            base = f"/api/crm-integrations/{st.xelion_context_id}/crm-contexts/{st.crm_context_id}"
            st.refresh_tokens["bob"] = st.crm.issue_refresh_token(CLIENT_ID)
            body = [
                {
                    "xelionUsername": "bob",
                    "clientId": CLIENT_ID,
                    "clientSecret": CLIENT_SECRET,
                    "refreshToken": st.refresh_tokens["bob"],
                }
            ]
            resp = await st.api.post(f"{base}/user-credentials", json=body)
            assert resp.status_code == 200, resp.text
        else:
            resp = await st.api.delete(f"/api/crm-integrations/{st.xelion_context_id}")
            assert resp.status_code == 200, resp.text
            await st.configure(users=("bob",), mappings=[st.mapping("callHungUpEvent")])
        bob_id = await st.credential_id("bob")
        assert bob_id != anne_id  # SQLite reused it before: what made the stale token reachable
        before = len(st.crm.received)
        await st.xelion.place_call("incoming", callee="bob")
        await st.wait_until(lambda: len(st.crm.received) > before, what="bob's delivery")
        bob_tokens = {r.headers["Authorization"] for r in st.crm.received[before:]}
        assert anne_token not in bob_tokens, (anne_token, bob_tokens)
        assert [r.status for r in st.crm.received[before:]] == [201]  # bob's own token, fetched for him


async def test_a_throttled_token_endpoint_delays_the_delivery_instead_of_killing_it(db_url: str) -> None:
    """Zoho's throttle (ten access tokens per refresh token in ten minutes, then "Access Denied"
    with a 400) was a permanent OAuth error: the delivery went dead, and every other delivery of
    that user in the window with it. It waits now: retried no sooner than the throttle's pause
    (60 s when the answer gives no Retry-After), the credential active, one token request made."""
    async with running_stack(db_url) as st:
        st.crm.token_failures.append(
            Failure.http(
                400,
                b'{"error_description":"You have made too many requests continuously. Please try again '
                b'after some time.","error":"Access Denied","status":"failure"}',
            )
        )
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/new")])
        await st.xelion.place_call("incoming", callee="anne")
        deadline = asyncio.get_running_loop().time() + 15
        items: list[dict[str, object]] = []
        while asyncio.get_running_loop().time() < deadline:
            items = await st.deliveries()
            if items and items[0]["lastError"]:
                break
            await asyncio.sleep(0.05)
        [item] = items
        assert item["state"] == "pending", item
        assert "Access Denied" in str(item["lastError"]) or "AccessDenied" in str(item["lastError"]), item
        detail = await st.delivery(str(item["id"]))
        waited = (
            _parse(str(item["nextAttemptAt"])) - _parse(str(detail["attemptLog"][-1]["startedAt"]))
        ).total_seconds()
        assert waited >= 59, item
        assert st.crm.token_counts["refresh_token"] == 1
        assert st.crm.received == []  # nothing sent without a token
        cred = await st.credential_id("anne")
        row = await st.daemon.db.run(lambda s: s.get(UserCredentials, cred))
        assert row is not None and row.state == "active"


async def test_an_approved_device_code_becomes_a_refresh_token_before_any_call(db_url: str) -> None:
    """The daemon polls the device codes itself: before, the code was tried only at the user's
    first call, by which time it could have expired (the device flow to be done again)."""
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/new")])
        code = st.crm.add_device_code(CLIENT_ID)  # the user approved it at the provider
        cred = await st.credential_id("anne")
        resp = await st.api.post(f"/api/users/{cred}/devicecode/update", json={"value": code})
        assert resp.status_code == 200, resp.text
        assert await _stored_refresh_token(st, "anne") is None  # a new device code drops it
        deadline = asyncio.get_running_loop().time() + 15
        while await _stored_refresh_token(st, "anne") is None:
            assert asyncio.get_running_loop().time() < deadline, "the device code was never polled"
            await asyncio.sleep(0.1)
        assert st.crm.token_counts == {DEVICE_CODE_GRANT: 1}
        assert st.crm.received == []  # no call was made
        await st.xelion.place_call("incoming", callee="anne")
        [item] = await st.wait_settled(1)
        assert item["state"] == "delivered"
        assert st.crm.token_counts == {DEVICE_CODE_GRANT: 1}
