"""End to end: calls placed on the Xelion simulator arrive at the CRM simulator as the mappings say,
and the daemon follows configuration changes made through the admin API while it runs."""

from __future__ import annotations

import asyncio
import json

from tests.e2e.stack import running_stack


async def test_calls_become_crm_requests(db_url: str) -> None:
    async with running_stack(db_url) as st:
        await st.configure(users=("anne", "bob"))
        call = await st.xelion.place_call("incoming", callee="anne", duration=42)
        await st.xelion.place_call("internal", caller="anne", callee="bob")
        items = await st.wait_settled(3 + 6)
        assert {d["state"] for d in items} == {"delivered"}
        received = await st.crm.wait_for(9)
        mine = [r for r in received if json.loads(r.body)["callId"] == call.call_id]
        assert [json.loads(r.body)["event"] for r in mine] == [
            "newCallEvent",
            "callConnectedEvent",
            "callHungUpEvent",
        ]
        first = mine[0]
        assert first.headers["Authorization"].startswith("Bearer ")
        body = json.loads(first.body)
        assert first.headers["Idempotency-Key"] == body["deliveryId"]
        assert body["to"] and body["user"] == "anne"
        # one token request per user, not per delivery
        assert st.crm.token_counts["refresh_token"] == 2


async def test_live_configuration(db_url: str) -> None:
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",))
        assert st.xelion.stats.logins >= 1
        # a changed mapping applies to the next event
        resp = await st.api.put(
            f"/api/crm-integrations/{st.xelion_context_id}/crm-contexts/{st.crm_context_id}/event-uri-mappings",
            json=[st.mapping("newCallEvent", path="changed/new")],
        )
        assert resp.status_code == 200, resp.text
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(1)
        received = await st.crm.wait_for(1)
        assert received[-1].path == "/changed/new"
        # DELETE stops the source and logs out of Xelion
        logouts = st.xelion.stats.logouts
        resp = await st.api.delete(f"/api/crm-integrations/{st.xelion_context_id}")
        assert resp.status_code == 200
        for _ in range(100):
            if st.xelion.stats.logouts > logouts and st.xelion.open_sockets == 0:
                break
            await asyncio.sleep(0.05)
        assert st.xelion.stats.logouts > logouts
        assert st.xelion.open_sockets == 0
