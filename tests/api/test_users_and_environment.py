"""api/users/{userId} (+ credential updates) and api/xelion-environment/{x} (+ admin updates)."""

from __future__ import annotations

import logging
from datetime import timedelta

import httpx
import pytest

from cti_bridge.clock import utcnow
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.models import UserCredentials, XelionContext
from tests.api.conftest import (
    OPERATOR,
    RecordingSupervisor,
    assert_error,
    auth,
    make_integration,
    rows,
)
from tests.api.xelion_world import XelionWorld


async def user_ids(client: httpx.AsyncClient, x: int, c: int) -> dict[str, int]:
    r = await client.get(f"/api/crm-integrations/{x}/crm-contexts/{c}/user-credentials", headers=OPERATOR)
    return {u["xelionUsername"]: int(u["userCredentialsId"]) for u in r.json()}


async def test_get_put_delete_user(client: httpx.AsyncClient, supervisor: RecordingSupervisor) -> None:
    a = await make_integration(client, "a", users=["anne", "bob"])
    ids = await user_ids(client, a.xelion_id, a.crm_id)
    r = await client.get(f"/api/users/{ids['anne']}", headers=auth(a.token))
    assert r.status_code == 200
    # The manual's keys, each with its own value (the manual's example swaps them).
    assert r.json() == {"xelionOid": "1001", "xelionUsername": "anne"}

    r = await client.put(
        f"/api/users/{ids['anne']}",
        json={"xelionUsername": "myNewXelionUsername", "xelionOid": "333444555"},
        headers=auth(a.token),
    )
    assert r.status_code == 200, r.text
    assert supervisor.calls[-1] == ("integration_changed", a.xelion_id)
    r = await client.get(f"/api/users/{ids['anne']}", headers=auth(a.token))
    assert r.json() == {"xelionOid": "333444555", "xelionUsername": "myNewXelionUsername"}
    # Renaming onto another user of the same CRM context: 409.
    assert_error(
        await client.put(f"/api/users/{ids['anne']}", json={"xelionUsername": "bob"}, headers=auth(a.token)),
        409,
        10300,
    )
    # Taking bob's oid: 409, since events find their user by oid too (one user per oid); the same
    # oid again is no change.
    bobs_oid = (await client.get(f"/api/users/{ids['bob']}", headers=auth(a.token))).json()["xelionOid"]
    assert bobs_oid
    err = assert_error(
        await client.put(f"/api/users/{ids['anne']}", json={"xelionOid": bobs_oid}, headers=auth(a.token)),
        409,
        10300,
    )
    assert "bob" in err["info"]
    r = await client.put(f"/api/users/{ids['anne']}", json={"xelionOid": "333444555"}, headers=auth(a.token))
    assert r.status_code == 200, r.text
    err = assert_error(
        await client.put(f"/api/users/{ids['anne']}", json={"xelionOid": [5]}, headers=auth(a.token)),
        422,
        10201,
    )
    assert "xelionOid" in err["message"]

    assert (await client.delete(f"/api/users/{ids['bob']}", headers=auth(a.token))).status_code == 200
    assert_error(await client.get(f"/api/users/{ids['bob']}", headers=auth(a.token)), 404, 10100)
    assert_error(await client.delete(f"/api/users/{ids['bob']}", headers=auth(a.token)), 404, 10100)
    assert_error(await client.get("/api/users/999999", headers=OPERATOR), 404, 10100)
    assert_error(await client.get(f"/api/users/{2**63}", headers=OPERATOR), 404, 10100)
    assert_error(await client.get("/api/users/abc", headers=OPERATOR), 422, 10201)


async def test_credential_updates_encrypt_and_reactivate(
    client: httpx.AsyncClient, supervisor: RecordingSupervisor, database, secret_box: SecretBox
) -> None:
    a = await make_integration(client, "a", users=["anne"])
    uid = (await user_ids(client, a.xelion_id, a.crm_id))["anne"]
    with database.session() as s:
        row = s.get(UserCredentials, uid)
        row.state = "reauth_required"
        row.state_reason = "invalid_grant"
        row.access_token_enc = secret_box.encrypt("old-access-token")
        s.add(row)
    version = rows(database, UserCredentials)[0].version

    for kind, value in (
        ("clientid", "new-client-id"),
        ("clientsecret", "new-client-secret"),
        ("devicecode", "new-device-code"),
        ("refreshtoken", "new-refresh-token"),
    ):
        r = await client.post(f"/api/users/{uid}/{kind}/update", json={"value": value}, headers=auth(a.token))
        assert r.status_code == 200, r.text

    (row,) = rows(database, UserCredentials)
    assert row.client_id == "new-client-id"
    assert secret_box.decrypt(row.client_secret_enc) == "new-client-secret"
    assert secret_box.decrypt(row.device_code_enc) == "new-device-code"
    assert secret_box.decrypt(row.refresh_token_enc) == "new-refresh-token"
    assert row.state == "active" and row.state_reason is None
    assert row.access_token_enc is None  # belonged to the old refresh token
    assert row.version == version + 4
    # Every kind: the cached token goes, and a client id or secret may repair the user as well.
    assert [c for c in supervisor.calls if c[0] == "credentials_changed"] == [
        ("credentials_changed", uid)
    ] * 4

    assert_error(
        await client.post(f"/api/users/{uid}/accesstoken/update", json={"value": "x"}, headers=auth(a.token)),
        404,
        10100,
    )
    err = assert_error(
        await client.post(f"/api/users/{uid}/clientsecret/update", json={"val": "x"}, headers=auth(a.token)),
        422,
        10201,
    )
    assert "value: field required" in err["message"]
    assert_error(
        await client.post(f"/api/users/{uid}/clientsecret/update", json={"value": ""}, headers=auth(a.token)),
        422,
        10201,
    )
    assert_error(
        await client.post("/api/users/424242/refreshtoken/update", json={"value": "x"}, headers=OPERATOR),
        404,
        10100,
    )


@pytest.mark.parametrize("kind", ["clientid", "clientsecret"])
async def test_a_new_client_drops_the_stored_access_token_of_the_old_one(
    client: httpx.AsyncClient, database, secret_box: SecretBox, kind: str
) -> None:
    """README: every kind drops the user's access token. A new client id or secret kept the old
    client's stored token, which the daemon then sent until it expired."""
    a = await make_integration(client, "a", users=["anne"])
    uid = (await user_ids(client, a.xelion_id, a.crm_id))["anne"]
    with database.session() as s:
        row = s.get(UserCredentials, uid)
        row.access_token_enc = secret_box.encrypt("old-client-access-token")
        row.access_token_expires_at = utcnow() + timedelta(hours=1)
        s.add(row)
    r = await client.post(f"/api/users/{uid}/{kind}/update", json={"value": "new"}, headers=auth(a.token))
    assert r.status_code == 200, r.text
    (row,) = rows(database, UserCredentials)
    assert (row.access_token_enc, row.access_token_expires_at) == (None, None)
    assert secret_box.decrypt(row.refresh_token_enc)  # the grant stays: the new client refreshes it


async def test_environment_get_and_put(client: httpx.AsyncClient, supervisor: RecordingSupervisor) -> None:
    a = await make_integration(client, "a")
    b = await make_integration(client, "b")
    r = await client.get(f"/api/xelion-environment/{a.xelion_id}", headers=auth(a.token))
    assert r.status_code == 200
    assert r.json() == {"host": "pbx-a.example.com", "protocol": "https", "tenant": "alpha"}

    # The manual's example body, with a host the configuration allows.
    body = {"host": "pbx-a.example.com", "tenant": "mynewxeliontenant", "protocol": "http"}
    r = await client.put(f"/api/xelion-environment/{a.xelion_id}", json=body, headers=auth(a.token))
    assert r.status_code == 200, r.text
    assert supervisor.calls[-1] == ("integration_changed", a.xelion_id)
    r = await client.get(f"/api/xelion-environment/{a.xelion_id}", headers=auth(a.token))
    assert r.json() == {"host": "pbx-a.example.com", "protocol": "http", "tenant": "mynewxeliontenant"}

    # Onto B's host and tenant: 409.
    r = await client.put(
        f"/api/xelion-environment/{a.xelion_id}",
        json={"host": "pbx-b.example.com", "tenant": "beta"},
        headers=OPERATOR,
    )
    assert_error(r, 409, 10300)
    # A host the configuration does not allow: 403 for a session, fine for the operator.
    other = {"host": "www.mynewxelionhost.com", "tenant": "mynewxeliontenant", "protocol": "https"}
    assert_error(
        await client.put(f"/api/xelion-environment/{a.xelion_id}", json=other, headers=auth(a.token)),
        403,
        10203,
    )
    r = await client.put(f"/api/xelion-environment/{a.xelion_id}", json=other, headers=OPERATOR)
    assert r.status_code == 200
    err = assert_error(
        await client.put(
            f"/api/xelion-environment/{b.xelion_id}", json={"host": "a b", "tenant": "t"}, headers=OPERATOR
        ),
        422,
        10201,
    )
    assert "host" in err["message"]
    assert_error(await client.get("/api/xelion-environment/9999", headers=OPERATOR), 404, 10100)


async def test_admin_password_and_username_updates(
    client: httpx.AsyncClient, database, secret_box: SecretBox, xelion: XelionWorld
) -> None:
    a = await make_integration(client, "a")
    url = f"/api/xelion-environment/{a.xelion_id}/admin"
    # The admin's password is changed on Xelion first; then the stored one follows.
    xelion.set_password("pbx-a.example.com", "alpha", "admin-a", "pw-a-new")
    # The wrong old password: 422 that never shows the stored one.
    r = await client.post(
        f"{url}/password/update",
        json={"oldPassword": "nope", "newPassword": "pw-a-new"},
        headers=auth(a.token),
    )
    err = assert_error(r, 422, 10201)
    assert "pw-a-secret" not in r.text and "oldPassword" in err["message"]
    # A new password Xelion refuses: 401/10004, nothing stored.
    r = await client.post(
        f"{url}/password/update",
        json={"oldPassword": "pw-a-secret", "newPassword": "pw-wrong"},
        headers=auth(a.token),
    )
    assert_error(r, 401, 10004)
    # The manual's body for this path is the username one: refused, saying why.
    r = await client.post(
        f"{url}/password/update", json={"oldUsername": "admin-a", "newUsername": "x"}, headers=auth(a.token)
    )
    err = assert_error(r, 422, 10201)
    assert "swaps" in err["info"]
    r = await client.post(
        f"{url}/password/update",
        json={"oldPassword": "pw-a-secret", "newPassword": "pw-a-new"},
        headers=auth(a.token),
    )
    assert r.status_code == 200, r.text
    (row,) = rows(database, XelionContext)
    assert secret_box.decrypt(row.admin_password_enc) == "pw-a-new"

    xelion.rename_user("pbx-a.example.com", "alpha", "admin-a", "root-a")
    r = await client.post(
        f"{url}/username/update",
        json={"oldPassword": "pw-a-new", "newPassword": "root-a"},
        headers=auth(a.token),
    )
    assert_error(r, 422, 10201)
    r = await client.post(
        f"{url}/username/update",
        json={"oldUsername": "admin-x", "newUsername": "root-a"},
        headers=auth(a.token),
    )
    assert_error(r, 422, 10201)
    r = await client.post(
        f"{url}/username/update",
        json={"oldUsername": "admin-a", "newUsername": "root-a"},
        headers=auth(a.token),
    )
    assert r.status_code == 200, r.text
    assert rows(database, XelionContext)[0].admin_username == "root-a"
    # Logging in now takes the new credentials.
    login = {
        "adminUsername": "root-a",
        "adminPassword": "pw-a-new",
        "host": "pbx-a.example.com",
        "tenant": "alpha",
    }
    assert (await client.post("/api/session/login", json=login)).status_code == 200


async def test_the_manuals_example_moves_the_integration_to_another_allowed_host_from_a_session(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The manual's PUT moves the integration to another host with a session token; a first
    answer to the security review's finding (the source logs in at the new host with the stored
    admin password) required the password for that, which broke the manual's own example. The
    allow-list is the boundary instead: a session moves only to a host it allows (403 otherwise),
    and the move is logged with who made it."""
    a = await make_integration(client, "a")
    url = f"/api/xelion-environment/{a.xelion_id}"
    away = {"host": "www.xelionHost.com", "tenant": "tenantToBeUsed", "protocol": "https"}
    with caplog.at_level(logging.INFO, logger="cti_bridge.admin.routes.environment"):
        r = await client.put(url, json=away, headers=auth(a.token))
    assert r.status_code == 200, r.text
    assert r.json() == {"host": "www.xelionHost.com", "protocol": "https", "tenant": "tenantToBeUsed"}
    assert any(
        m.getMessage() == f"integration {a.xelion_id} moved from Xelion at pbx-a.example.com to "
        f"www.xelionHost.com by a session of integration {a.xelion_id}"
        for m in caplog.records
    ), caplog.text
    not_allowed = {"host": "attacker.example.net", "tenant": "t", "protocol": "https"}
    assert_error(await client.put(url, json=not_allowed, headers=auth(a.token)), 403, 10203)


async def test_wrong_old_admin_values_count_as_failed_logins(client: httpx.AsyncClient) -> None:
    """admin/password/update answered "does not match" with no limit: an unlimited oracle for the
    stored admin password to any session (a security review's finding)."""
    a = await make_integration(client, "a")
    url = f"/api/xelion-environment/{a.xelion_id}/admin/password/update"
    for guess in ("one", "two", "three"):  # login_failures_before_delay=3
        r = await client.post(url, json={"oldPassword": guess, "newPassword": "x"}, headers=auth(a.token))
        assert_error(r, 422, 10201)
    r = await client.post(url, json={"oldPassword": "pw-a-secret", "newPassword": "x"}, headers=auth(a.token))
    assert_error(r, 429, 10400)


async def test_new_admin_credentials_end_the_integrations_other_sessions(
    client: httpx.AsyncClient, xelion: XelionWorld
) -> None:
    """Sessions opened with the old admin password stayed valid for their hour after it changed
    (perhaps the reason for the change). They end with it now; the caller's own session stays."""
    a = await make_integration(client, "a")
    login = {
        "adminUsername": "admin-a",
        "adminPassword": "pw-a-secret",
        "host": "pbx-a.example.com",
        "tenant": "alpha",
    }
    other = (await client.post("/api/session/login", json=login)).json()["authentication"]
    env = f"/api/xelion-environment/{a.xelion_id}"
    assert (await client.get(env, headers=auth(other))).status_code == 200
    xelion.set_password("pbx-a.example.com", "alpha", "admin-a", "pw-a-new")
    r = await client.post(
        f"{env}/admin/password/update",
        json={"oldPassword": "pw-a-secret", "newPassword": "pw-a-new"},
        headers=auth(a.token),
    )
    assert r.status_code == 200, r.text
    assert_error(await client.get(env, headers=auth(other)), 401, 10000)
    assert (await client.get(env, headers=auth(a.token))).status_code == 200
