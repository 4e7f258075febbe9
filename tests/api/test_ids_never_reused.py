"""An id the admin API handed out is never handed out again, on SQLite as on PostgreSQL.

SQLite gives a new row the largest id of its table plus one: deleting the newest user or
integration gave its id to the next one created, so a script that retried a DELETE (after a
timeout, say) deleted a row it never saw, and anything still keyed by the old id reached the new
row. PostgreSQL's sequences never go back; the store keeps a high water mark for SQLite
(``store.models._next_id``)."""

from __future__ import annotations

import httpx

from tests.api.conftest import OPERATOR, assert_error, auth, make_integration


def creds_url(x: int, c: int) -> str:
    return f"/api/crm-integrations/{x}/crm-contexts/{c}/user-credentials"


async def test_a_deleted_users_id_is_not_given_to_the_next_user(client: httpx.AsyncClient) -> None:
    a = await make_integration(client, "a", users=["anne", "bob"])
    r = await client.get(creds_url(a.xelion_id, a.crm_id), headers=auth(a.token))
    ids = {u["xelionUsername"]: int(u["userCredentialsId"]) for u in r.json()}
    bob = ids["bob"]
    assert bob == max(ids.values())  # the newest row: the one SQLite would give again
    r = await client.delete(f"/api/users/{bob}", headers=auth(a.token))
    assert r.status_code == 200, r.text

    r = await client.post(
        creds_url(a.xelion_id, a.crm_id), json={"xelionUsername": "bob"}, headers=auth(a.token)
    )
    assert r.status_code == 200, r.text
    new_bob = int(r.json()["userCredentialsId"])
    assert new_bob > bob

    # A script retrying its DELETE of the old id is told it is gone; the new bob stays.
    assert_error(await client.delete(f"/api/users/{bob}", headers=auth(a.token)), 404, 10100)
    r = await client.get(f"/api/users/{new_bob}", headers=auth(a.token))
    assert r.status_code == 200 and r.json()["xelionUsername"] == "bob", r.text


async def test_a_deleted_integrations_ids_are_not_given_to_the_next_integration(
    client: httpx.AsyncClient,
) -> None:
    a = await make_integration(client, "a", users=["anne"])
    b = await make_integration(client, "b", users=["carol"])
    r = await client.get(creds_url(b.xelion_id, b.crm_id), headers=auth(b.token))
    carol = int(r.json()[0]["userCredentialsId"])
    r = await client.get(
        f"/api/crm-integrations/{b.xelion_id}/crm-contexts/{b.crm_id}/event-uri-mappings", headers=OPERATOR
    )
    old_mappings = {int(m["id"]) for m in r.json()}
    assert old_mappings
    r = await client.delete(f"/api/crm-integrations/{b.xelion_id}", headers=OPERATOR)
    assert r.status_code == 200, r.text

    again = await make_integration(client, "b", users=["carol"])
    assert again.xelion_id > b.xelion_id and again.crm_id > b.crm_id
    r = await client.get(creds_url(again.xelion_id, again.crm_id), headers=auth(again.token))
    assert int(r.json()[0]["userCredentialsId"]) > carol
    r = await client.get(
        f"/api/crm-integrations/{again.xelion_id}/crm-contexts/{again.crm_id}/event-uri-mappings",
        headers=OPERATOR,
    )
    assert min(int(m["id"]) for m in r.json()) > max(old_mappings)
    # The old integration's ids reach nothing; A is untouched.
    assert_error(await client.get(creds_url(b.xelion_id, b.crm_id), headers=OPERATOR), 404, 10100)
    r = await client.get(creds_url(a.xelion_id, a.crm_id), headers=OPERATOR)
    assert r.status_code == 200 and [u["xelionUsername"] for u in r.json()] == ["anne"], r.text
