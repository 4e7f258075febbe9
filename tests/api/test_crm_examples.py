"""The ready-made integrations in ``config/crm-examples/`` (one per CRM the README names) are what
they claim: each body, its placeholders filled in, is accepted by ``POST api/crm-integrations``
as it stands, and its hang-up mapping renders the request that CRM's documented call-logging API
takes (previewed through the admin API; a URL drawn from the token's answer, which the preview
masks, rendered directly with the extras that provider's token answer carries)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select

from cti_bridge.admin.app import AdminDeps
from cti_bridge.admin.routes.preview import router as preview_router
from cti_bridge.render import RenderContext, compile_mapping, mapping_spec_from_json
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database
from cti_bridge.store.models import UserCredentials
from tests.api.conftest import OPERATOR, admin_client

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "crm-examples"
#: A hang-up of an outgoing call of 89 s by anne, as Xelion sends it.
EVENT = {
    "callId": "1767603000.1021",
    "initiation": "outgoing",
    "date": "2026-01-05 09:14:02",
    "callerPhoneNumber": "201",
    "calleePhoneNumber": "0612345678",
    "callerUser": "anne",
    "calleeUser": None,
    "duration": 89,
}
#: What each provider's token answer carries besides the tokens (stored by the first refresh).
TOKEN_EXTRA: dict[str, dict[str, str]] = {
    "salesforce": {"instance_url": "https://acme.my.salesforce.com", "token_type": "Bearer"},
    "zoho": {"api_domain": "https://www.zohoapis.eu", "token_type": "Bearer"},
    "pipedrive": {"api_domain": "https://acme.pipedrive.com", "token_type": "Bearer"},
}


@pytest.fixture
async def api(deps: AdminDeps) -> AsyncIterator[httpx.AsyncClient]:
    async with admin_client(deps, preview_router) as c:
        yield c


def example(name: str) -> dict[str, Any]:
    """The example's body with its placeholders filled in for the test's tenant A."""
    text = (EXAMPLES / f"{name}.json").read_text()
    for placeholder, value in {
        "<tenant-id>": "contoso.onmicrosoft.com",
        "<token-shim>": "shim.example.org",
        "<org>": "acme",
        "<instance>": "acme",
    }.items():
        text = text.replace(placeholder, value)
    body: dict[str, Any] = json.loads(text)
    body["xelionContext"] = {
        "host": "pbx-a.example.com",
        "protocol": "https",
        "tenant": "alpha",
        "adminUsername": "admin-a",
        "adminPassword": "pw-a-secret",
    }
    for user in body["userCredentials"]:
        user["xelionUsername"] = "anne"
    return body


async def previewed(api: httpx.AsyncClient, database: Database, box: SecretBox, name: str) -> dict[str, Any]:
    r = await api.post("/api/crm-integrations", json=example(name), headers=OPERATOR)
    assert r.status_code == 200, r.text
    x, c = r.json()["xelionContext"]["id"], r.json()["crmContext"]["id"]
    if name in TOKEN_EXTRA:
        with database.session() as s:
            row = s.exec(select(UserCredentials)).one()
            row.token_extra_enc = box.encrypt(json.dumps(TOKEN_EXTRA[name]))
            s.add(row)
            s.commit()
    r = await api.post(
        f"/api/crm-integrations/{x}/crm-contexts/{c}/event-uri-mappings/preview",
        json={"xelionEvent": "callHungUpEvent", "event": EVENT, "xelionUsername": "anne"},
        headers=OPERATOR,
    )
    assert r.status_code == 200, r.text
    [request] = r.json()["requests"]
    assert "error" not in request, request
    return request  # type: ignore[no-any-return]


def rendered_url(name: str) -> str:
    """The URL as the worker sends it (the preview masks what comes from the token's answer)."""
    [mapping] = example(name)["eventUriMappings"]
    token = {**TOKEN_EXTRA.get(name, {}), "accessToken": "AT-123456"}
    ctx = RenderContext(
        event=EVENT,
        xelion_event="callHungUpEvent",
        user={"xelionUsername": "anne", "role": "caller"},
        token=token,
        delivery_id="d-1",
    )
    return compile_mapping(mapping_spec_from_json(mapping)).render(ctx).url


def body(request: dict[str, Any]) -> Any:
    return json.loads(request["body"]) if isinstance(request["body"], str) else request["body"]


def test_every_named_crm_has_an_example() -> None:
    assert {p.stem for p in EXAMPLES.glob("*.json")} == {
        "salesforce",
        "zoho",
        "hubspot",
        "pipedrive",
        "dynamics365",
        "crmcom",
        "generic",
    }


async def test_salesforce_task(api: httpx.AsyncClient, database: Database, deps: AdminDeps) -> None:
    req = await previewed(api, database, deps.secret_box, "salesforce")
    assert rendered_url("salesforce") == "https://acme.my.salesforce.com/services/data/v60.0/sobjects/Task"
    b = body(req)
    assert (b["CallType"], b["CallDurationInSeconds"], b["ActivityDate"]) == ("Outbound", 89, "2026-01-05")
    assert (b["Subject"], b["TaskSubtype"], b["CallObject"]) == ("Call 0612345678", "Call", "1767603000.1021")


async def test_zoho_call(api: httpx.AsyncClient, database: Database, deps: AdminDeps) -> None:
    req = await previewed(api, database, deps.secret_box, "zoho")
    assert rendered_url("zoho") == "https://www.zohoapis.eu/crm/v8/Calls"
    assert req["headers"]["Authorization"].startswith("Zoho-oauthtoken ")
    [record] = body(req)["data"]
    assert record["Call_Start_Time"] == "2026-01-05T10:12:33+01:00"  # the hang-up less 89 s, local time
    assert (record["Call_Duration"], record["Call_Type"]) == ("01:29", "Outbound")


async def test_hubspot_call(api: httpx.AsyncClient, database: Database, deps: AdminDeps) -> None:
    req = await previewed(api, database, deps.secret_box, "hubspot")
    assert req["url"] == "https://api.hubapi.com/crm/v3/objects/calls"
    p = body(req)["properties"]
    assert p["hs_timestamp"] == 1767604353000  # the call's start, epoch milliseconds
    assert (p["hs_call_duration"], p["hs_call_direction"]) == (89000, "OUTBOUND")
    assert (p["hs_call_to_number"], p["hs_call_from_number"]) == ("+31612345678", "201")


async def test_pipedrive_call_log(api: httpx.AsyncClient, database: Database, deps: AdminDeps) -> None:
    req = await previewed(api, database, deps.secret_box, "pipedrive")
    assert rendered_url("pipedrive") == "https://acme.pipedrive.com/api/v1/callLogs"
    b = body(req)
    assert (b["start_time"], b["end_time"]) == ("2026-01-05 09:12:33", "2026-01-05 09:14:02")
    assert (b["outcome"], b["duration"], b["to_phone_number"]) == ("connected", 89, "+31612345678")


async def test_dynamics_phonecall_upsert(api: httpx.AsyncClient, database: Database, deps: AdminDeps) -> None:
    req = await previewed(api, database, deps.secret_box, "dynamics365")
    # Entra ID's v2 endpoint refreshes only with a scope: sent with every token request.
    r = await api.get(
        "/api/crm-integrations",
        params={"xelionHost": "pbx-a.example.com", "xelionTenant": "alpha"},
        headers=OPERATOR,
    )
    assert r.json()["crmContext"]["tokenRequestParameters"] == {
        "scope": "https://acme.crm4.dynamics.com/user_impersonation offline_access"
    }
    assert req["method"] == "PATCH"
    assert req["url"].startswith("https://acme.crm4.dynamics.com/api/data/v9.2/phonecalls(")
    b = body(req)
    assert (b["actualstart"], b["actualend"]) == ("2026-01-05T09:12:33Z", "2026-01-05T09:14:02Z")
    assert (b["directioncode"], b["phonenumber"]) == (True, "+31612345678")


async def test_crmcom_communication(api: httpx.AsyncClient, database: Database, deps: AdminDeps) -> None:
    req = await previewed(api, database, deps.secret_box, "crmcom")
    assert req["url"] == "https://acme.crm.com/crmapi/rest/v2/communications/create"
    b = body(req)
    assert (b["direction"], b["media"], b["udf_float_1"]) == ("OUTGOING", "PHONE", 89)
    assert b["token"]  # the access token goes in the body, as CRM.COM takes it (masked here)


async def test_generic_put_by_delivery_id(
    api: httpx.AsyncClient, database: Database, deps: AdminDeps
) -> None:
    req = await previewed(api, database, deps.secret_box, "generic")
    assert req["method"] == "PUT" and req["condition"] is True
    b = body(req)
    assert (b["agent"], b["durationSeconds"], b["to"]) == ("anne", 89, "+31612345678")
