"""What an operator sees of the Xelion side: GET api/crm-integrations shows the source's state, the
last event time and the gaps; api/ready follows the source; bad admin credentials show as failed."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.e2e.stack import Stack, running_stack


async def integration(st: Stack) -> dict[str, Any]:
    resp = await st.api.get(
        "/api/crm-integrations",
        params={"xelionHost": f"127.0.0.1:{st.xelion.port}", "xelionTenant": "master"},
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def wait_for(st: Stack, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    doc: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        doc = await integration(st)
        if predicate(doc["source"]):
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"source never reached the expected state: {doc.get('source')}")


async def test_state_last_event_and_gaps(db_url: str) -> None:
    async with running_stack(db_url, xelion_backoff_min=0.05, xelion_backoff_max=0.2) as st:
        await st.configure(users=("anne",))
        doc = await wait_for(st, lambda s: s["state"] == "subscribed")
        assert doc["xelionContext"]["id"] == st.xelion_context_id
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(3)
        doc = await wait_for(st, lambda s: s["lastEventAt"] is not None)

        # the socket drops: a gap opens, the source reconnects and the gap closes with an end
        before = len(doc["source"]["gaps"])
        st.xelion.refuse_connections(0.5)
        await st.xelion.drop_all_sockets()
        assert (await st.api.get("/api/ready")).status_code in (200, 503)
        doc = await wait_for(
            st,
            lambda s: (
                s["state"] == "subscribed" and len(s["gaps"]) > before and all(g["end"] for g in s["gaps"])
            ),
        )
        newest = doc["source"]["gaps"][0]
        assert newest["start"] <= newest["end"]  # Xelion-style times, whole seconds
        assert (await st.api.get("/api/ready")).status_code == 200
        # events after the gap arrive again
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(6)


async def test_bad_admin_credentials_show_as_failed(db_url: str) -> None:
    async with running_stack(db_url, xelion_backoff_min=0.05, xelion_backoff_max=0.2) as st:
        await st.configure(users=("anne",))
        # the admin's password changes on the phone system behind cti-bridge's back
        st.xelion.tenants["master"].users["admin"].password = "changed-elsewhere"
        await st.xelion.expire_all_sessions()
        await st.xelion.drop_all_sockets()
        doc = await wait_for(st, lambda s: s["state"] == "failed")
        assert doc["source"]["error"]
        assert "changed-elsewhere" not in str(doc) and "admin-password" not in str(doc)
        ready = await st.api.get("/api/ready")
        assert ready.status_code == 503
        logins = st.xelion.stats.login_attempts
        await asyncio.sleep(1.0)
        assert st.xelion.stats.login_attempts == logins  # no hammering once failed


async def test_a_failed_source_runs_again_when_the_operator_confirms_the_credentials(db_url: str) -> None:
    """The admin's password changed at Xelion and was put back: the operator confirms it through
    ``admin/password/update`` (checked with Xelion, answered 200), and the README says the source
    restarts. It stayed failed, every call lost, until the process restarted (an operations
    review's finding). The same for ``PUT api/xelion-environment`` with the same values."""
    async with running_stack(db_url, xelion_backoff_min=0.05, xelion_backoff_max=0.2) as st:
        await st.configure(users=("anne",))
        admin = st.xelion.tenants["master"].users["admin"]
        for how in ("password", "environment"):
            admin.password = "changed-elsewhere"
            await st.xelion.expire_all_sessions()
            await st.xelion.drop_all_sockets()
            await wait_for(st, lambda s: s["state"] == "failed")
            x = st.xelion_context_id
            # Other changes do not try the refused login again (a provisioning script's PUTs
            # would each cost one at Xelion, which may lock the account).
            logins = st.xelion.stats.login_attempts
            maps = f"/api/crm-integrations/{x}/crm-contexts/{st.crm_context_id}/event-uri-mappings"
            for _ in range(3):
                put = await st.api.put(maps, json=[st.mapping("callHungUpEvent")])
                assert put.status_code == 200, put.text
            await asyncio.sleep(0.5)
            assert st.xelion.stats.login_attempts == logins
            assert (await integration(st))["source"]["state"] == "failed"
            admin.password = "admin-password"  # put back at Xelion
            if how == "password":
                resp = await st.api.post(
                    f"/api/xelion-environment/{x}/admin/password/update",
                    json={"oldPassword": "admin-password", "newPassword": "admin-password"},
                )
            else:
                env = (await st.api.get(f"/api/xelion-environment/{x}")).json()
                resp = await st.api.put(f"/api/xelion-environment/{x}", json=env)
            assert resp.status_code == 200, resp.text
            await wait_for(st, lambda s: s["state"] == "subscribed")
            await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(2)  # a hang-up mapping only, after the PUTs
