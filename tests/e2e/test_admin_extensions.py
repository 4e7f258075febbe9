"""The admin API's extensions beyond the manual, end to end: the mapping preview, and the deliveries
API with its token scoping (a session token sees only its own integration)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.e2e.stack import CLIENT_ID, CLIENT_SECRET, Stack, running_stack

FRAME = {
    "notificationType": "callHungUpEvent",
    "notification": {
        "callId": "1732443153.1021",
        "initiation": "outgoing",
        "date": "2026-11-24 09:14:02",
        "callerPhoneNumber": "+31612345678",
        "calleePhoneNumber": "+31152511411",
        "callerUser": "anne",
        "calleeUser": None,
        "duration": 89,
    },
}


def preview_path(st: Stack) -> str:
    base = f"/api/crm-integrations/{st.xelion_context_id}/crm-contexts/{st.crm_context_id}"
    return base + "/event-uri-mappings/preview"


async def test_preview_renders_the_exact_request(db_url: str) -> None:
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",))
        mapping = {
            "xelionEvent": "callHungUpEvent",
            "crmResourceUri": 'https://crm.example.org/Call?initiation=${(initiation=="outgoing")?"calldialed":"callreceived"}'
            "&from=${callerPhoneNumber}&x=${noSuchField}",
            "crmResourcePayload": {
                "duration": "${duration}",
                "token": "${token.accessToken}",
                "who": "${user.role}",
            },
        }
        resp = await st.api.post(
            preview_path(st), json={"mapping": mapping, "event": FRAME, "xelionUsername": "anne"}
        )
        assert resp.status_code == 200, resp.text
        (shown,) = resp.json()["requests"]
        assert shown["method"] == "POST"
        assert shown["url"] == "https://crm.example.org/Call?initiation=calldialed&from=%2B31612345678&x="
        assert shown["body"]["duration"] == 89
        assert shown["body"]["who"] == "caller"
        assert shown["body"]["token"] == "***"
        assert shown["headers"]["Authorization"] == "Bearer ***"
        assert shown["condition"] is True
        assert any("noSuchField" in w for w in shown["warnings"])
        assert st.crm.received == []  # nothing was sent

        # the stored mappings of an event type
        resp = await st.api.post(
            preview_path(st), json={"xelionEvent": "callHungUpEvent", "event": FRAME["notification"]}
        )
        assert resp.status_code == 200, resp.text
        (stored,) = resp.json()["requests"]
        assert stored["url"].startswith(st.crm.url + "/calls/callHungUpEvent")

        # a template that does not compile: 422 naming the place and column
        bad = dict(mapping, crmResourceUri="https://crm.example.org/${callId +}")
        resp = await st.api.post(preview_path(st), json={"mapping": bad, "event": FRAME})
        assert resp.status_code == 422
        err = resp.json()
        assert err["errorCode"] == 10202
        assert "crmResourceUri" in err["info"] and "column" in err["info"]

        # malformed JSON: 400 with line and column
        resp = await st.api.post(
            preview_path(st),
            content=b'{"event": {"callId": "1"},\n "mapping": {"a": "b" "c"}}',
            headers={"Content-Type": "application/json"},
        )
        assert resp.status_code == 400
        assert "line 2" in resp.json()["info"]


async def _second_integration(st: Stack) -> dict[str, Any]:
    st.xelion.add_tenant("other")
    st.xelion.add_user("other", "admin", "other-admin-password", admin=True)
    st.xelion.add_user("other", "dave", "dave-password")
    token = st.crm.issue_refresh_token(CLIENT_ID)
    body = {
        "xelionContext": {
            "adminUsername": "admin",
            "adminPassword": "other-admin-password",
            "host": f"127.0.0.1:{st.xelion.port}",
            "tenant": "other",
            "protocol": "http",
        },
        "crmContext": {"authorizationServerUri": st.crm.token_url, "authorizationHeaderPrefix": "Bearer "},
        "userCredentials": [
            {
                "xelionUsername": "dave",
                "clientId": CLIENT_ID,
                "clientSecret": CLIENT_SECRET,
                "refreshToken": token,
            }
        ],
        "eventUriMappings": [st.mapping("newCallEvent")],
    }
    resp = await st.api.post("/api/crm-integrations", json=body)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def test_deliveries_are_scoped_to_the_session_token(db_url: str) -> None:
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",))
        other = await _second_integration(st)
        await st.wait_subscribed(xelion_context_id=other["xelionContext"]["id"])
        await st.xelion.place_call("incoming", callee="anne")
        await st.xelion.place_call("incoming", callee="dave", tenant="other")
        items = await st.wait_settled(3 + 1)
        mine = [d for d in items if d["xelionContextId"] == st.xelion_context_id]
        theirs = [d for d in items if d["xelionContextId"] == other["xelionContext"]["id"]]
        assert len(mine) == 3 and len(theirs) == 1

        login = await st.api.post(
            "/api/session/login",
            json={
                "adminUsername": "admin",
                "adminPassword": "other-admin-password",
                "host": f"127.0.0.1:{st.xelion.port}",
                "tenant": "other",
            },
            headers={"Authorization": ""},
        )
        assert login.status_code == 200, login.text
        session = httpx.AsyncClient(
            base_url=str(st.api.base_url),
            headers={"Authorization": f"xelion {login.json()['authentication']}"},
        )
        async with session:
            listed = (await session.get("/api/deliveries")).json()
            assert {d["id"] for d in listed["items"]} == {theirs[0]["id"]}
            assert listed["total"] == 1
            for path in (
                f"/api/deliveries/{mine[0]['id']}",
                f"/api/deliveries?xelionContextId={st.xelion_context_id}",
            ):
                assert (await session.get(path)).status_code == 404
            assert (await session.post(f"/api/deliveries/{mine[0]['id']}/replay")).status_code == 404
            detail = await session.get(f"/api/deliveries/{theirs[0]['id']}")
            assert detail.status_code == 200
            doc = detail.json()
            assert doc["event"]["notification"]["calleeUser"] == "dave"
            assert doc["attemptLog"][0]["httpStatus"] in (200, 201)
            assert json.dumps(doc).find(st.refresh_tokens.get("anne", "unused")) == -1
        # no token at all: 401 in the Xelion shape
        resp = await st.api.get("/api/deliveries", headers={"Authorization": ""})
        assert resp.status_code == 401 and resp.json()["errorCode"] == 10000


async def test_a_stored_mappings_own_authorization_header_is_shown_as_it_is_sent(db_url: str) -> None:
    """Saving now refuses a mapping's Authorization or Idempotency-Key header; one stored by an
    earlier release still renders, and the CRM gets the daemon's own values (delivery/http1.py
    merges names case-insensitively). The preview showed the mapping's value beside them, two
    Authorization headers for the one that is sent (an integrator review's finding)."""
    from sqlmodel import Session, select

    from cti_bridge.store.models import EventUriMapping

    async with running_stack(db_url) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("callHungUpEvent")])

        def legacy(session: Session) -> None:
            row = session.exec(select(EventUriMapping)).one()
            row.headers = json.dumps({"authorization": "Custom abc", "idempotency-key": "mine", "X-A": "1"})
            session.add(row)

        await st.daemon.db.run(legacy)
        # The row was changed behind the caches' back (a PUT makes new rows instead).
        st.daemon.routing.mappings._compiled.clear()
        st.daemon.routing.invalidate()
        resp = await st.api.post(
            preview_path(st), json={"xelionEvent": "callHungUpEvent", "event": FRAME["notification"]}
        )
        assert resp.status_code == 200, resp.text
        (shown,) = resp.json()["requests"]
        names = sorted(n.lower() for n in shown["headers"])
        assert names == ["authorization", "content-type", "idempotency-key", "x-a"], shown["headers"]
        assert shown["headers"]["Authorization"] == "Bearer ***"
        await st.xelion.place_call("outgoing", caller="anne")
        await st.wait_settled(1)
        (sent,) = st.crm.received
        assert sent.headers["Authorization"].startswith("Bearer ") and sent.headers["X-A"] == "1"
        assert sent.headers["Idempotency-Key"] != "mine"
