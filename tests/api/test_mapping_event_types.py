"""A mapping's ``xelionEvent`` must be a call event type, wherever mappings come in.

The source keeps only call events (``events.CALL_EVENT_TYPES``; xelion-protocol.md §3.2 and §3.5), so
a mapping for any other notification type would be saved, subscribed to, and never delivered. POST
crm-integrations, PUT event-uri-mappings and the preview answer 422/10201 naming the field and
listing the accepted types; nothing is saved and Xelion is not asked. Every call event type,
``channelHungUpEvent`` included, is accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cti_bridge.admin.app import AdminDeps
from cti_bridge.admin.routes.preview import router as preview_router
from cti_bridge.events import CALL_EVENT_TYPES
from cti_bridge.store.db import Database
from cti_bridge.store.models import EventUriMapping, XelionContext
from tests.api.conftest import OPERATOR, admin_client, assert_error, integration_body, make_integration, rows
from tests.api.xelion_world import XelionWorld

# Notification types Xelion has besides call events, a case slip, and a name Xelion never sends.
NOT_CALL_EVENTS = ["presenceEvent", "newcallevent", "callTransferredEvent"]


def mapping(event: str, path: str = "calls") -> dict[str, Any]:
    return {
        "xelionEvent": event,
        "crmResourceUri": f"https://crm.example.org/{path}",
        "crmResourcePayload": {"callId": "${callId}"},
    }


def assert_names_the_field_and_lists_the_types(body: dict[str, Any], field: str) -> None:
    assert f"{field}: must be a call event type" in body["message"], body
    for event in CALL_EVENT_TYPES:
        assert event in body["message"], (event, body)


@pytest.fixture
async def api(deps: AdminDeps) -> AsyncIterator[httpx.AsyncClient]:
    """The admin API with the preview route, as the daemon builds it (``app.py``)."""
    async with admin_client(deps, preview_router) as c:
        yield c


@pytest.mark.parametrize("event", NOT_CALL_EVENTS)
async def test_post_crm_integration_refuses_a_mapping_for_another_type(
    api: httpx.AsyncClient, database: Database, xelion: XelionWorld, event: str
) -> None:
    body = integration_body("a", mappings=[mapping("newCallEvent"), mapping(event, "other")])
    r = await api.post("/api/crm-integrations", json=body, headers=OPERATOR)
    err = assert_error(r, 422, 10201)
    assert_names_the_field_and_lists_the_types(err, "eventUriMappings[1].xelionEvent")
    # Refused before anything was saved or Xelion was asked.
    assert rows(database, XelionContext) == [] and rows(database, EventUriMapping) == []
    assert xelion.login_attempts == 0


@pytest.mark.parametrize("event", NOT_CALL_EVENTS)
async def test_put_event_uri_mappings_refuses_a_mapping_for_another_type(
    api: httpx.AsyncClient, event: str
) -> None:
    a = await make_integration(api, "a")
    url = f"/api/crm-integrations/{a.xelion_id}/crm-contexts/{a.crm_id}/event-uri-mappings"
    before = (await api.get(url, headers=OPERATOR)).json()
    r = await api.put(url, json=[mapping("missedCallEvent"), mapping(event)], headers=OPERATOR)
    err = assert_error(r, 422, 10201)
    assert_names_the_field_and_lists_the_types(err, "[1].xelionEvent")
    assert (await api.get(url, headers=OPERATOR)).json() == before


@pytest.mark.parametrize("event", NOT_CALL_EVENTS)
async def test_preview_refuses_a_mapping_for_another_type(api: httpx.AsyncClient, event: str) -> None:
    a = await make_integration(api, "a")
    url = f"/api/crm-integrations/{a.xelion_id}/crm-contexts/{a.crm_id}/event-uri-mappings/preview"
    sample = {"callId": "c-1", "calleePhoneNumber": "+3115"}
    r = await api.post(url, json={"mapping": mapping(event), "event": sample}, headers=OPERATOR)
    err = assert_error(r, 422, 10201)
    assert_names_the_field_and_lists_the_types(err, "mapping.xelionEvent")


@pytest.mark.parametrize("event", NOT_CALL_EVENTS)
async def test_preview_of_the_stored_mappings_refuses_another_type_by_name(
    api: httpx.AsyncClient, event: str
) -> None:
    """The top-level form answered 404 "no mapping" for such a name (a README walkthrough's finding);
    the README promises a 422 naming the field, as for a mapping."""
    a = await make_integration(api, "a")
    url = f"/api/crm-integrations/{a.xelion_id}/crm-contexts/{a.crm_id}/event-uri-mappings/preview"
    r = await api.post(url, json={"xelionEvent": event, "event": {"callId": "c-1"}}, headers=OPERATOR)
    err = assert_error(r, 422, 10201)
    assert_names_the_field_and_lists_the_types(err, "xelionEvent")


async def test_every_call_event_type_is_accepted_everywhere(api: httpx.AsyncClient) -> None:
    events = sorted(CALL_EVENT_TYPES)
    assert "channelHungUpEvent" in events  # xelion-protocol.md §3.2: "valid too"
    a = await make_integration(api, "a", mappings=[mapping(e) for e in events])
    url = f"/api/crm-integrations/{a.xelion_id}/crm-contexts/{a.crm_id}/event-uri-mappings"
    assert sorted(m["xelionEvent"] for m in (await api.get(url, headers=OPERATOR)).json()) == events
    r = await api.put(url, json=[mapping(e, e) for e in reversed(events)], headers=OPERATOR)
    assert r.status_code == 200, r.text
    assert [m["xelionEvent"] for m in r.json()] == list(reversed(events))
    sample = {"callId": "c-1"}
    for event in events:
        r = await api.post(
            url + "/preview", json={"mapping": mapping(event), "event": sample}, headers=OPERATOR
        )
        assert r.status_code == 200, r.text
