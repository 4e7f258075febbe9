"""Events and deliveries, end to end (reliability.md §2, §3, §15 and the render failures of §6):
duplicates are recorded once, per-call order holds through retries while different calls go in
parallel, a mapping that cannot be rendered fails alone, and the outbound guard refuses private
targets at delivery time. Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from cti_bridge.sim.crm import Failure, Received
from cti_bridge.store.tokens import UserCredentialTokenStore
from tests.e2e.stack import Stack, running_stack


def _body(received: Received) -> dict[str, object]:
    doc: dict[str, object] = json.loads(received.body)
    return doc


async def test_duplicate_events_are_recorded_once(db_url: str) -> None:
    """§2: the attended transfer's double A-B hang-up and a re-pushed identical event each give one
    delivery per user; the event records how many duplicates it absorbed."""
    async with running_stack(db_url) as st:
        await st.configure(users=("anne", "bob"), mappings=[st.mapping("callHungUpEvent")])
        call = await st.xelion.place_call("attended_transfer", callee="anne", transfer_to="bob")
        hangups = [body for event, body in call.frames if event == "callHungUpEvent"]
        assert len(hangups) == 3 and hangups[0] == hangups[1]  # the simulator sends A-B twice
        # A-B hang-up: anne and bob once each (not twice); C-B hang-up: bob.
        items = await st.wait_settled(3)
        assert len(items) == 3
        assert {d["state"] for d in items} == {"delivered"}
        assert sorted(d["xelionUsername"] for d in items) == ["anne", "bob", "bob"]
        received = await st.crm.wait_for(3)
        assert len(received) == 3
        anne = next(d for d in items if d["xelionUsername"] == "anne")
        detail = await st.delivery(anne["id"])
        assert detail["event"]["duplicates"] == 1

        # The same notification pushed once more: counted, no new delivery, nothing sent.
        assert await st.xelion.push("callHungUpEvent", hangups[0]) == 1

        async def counted_twice() -> bool:
            return int((await st.delivery(anne["id"]))["event"]["duplicates"]) == 2

        await st.wait_until(counted_twice, what="the second duplicate to be counted")
        assert len(await st.deliveries()) == 3
        await asyncio.sleep(0.2)
        assert len(st.crm.received) == 3


async def test_per_call_order_survives_retries(db_url: str) -> None:
    """§3: the first event of a call fails with 503 twice; the call's later events wait for it and
    reach the CRM after it, in event order."""
    async with running_stack(db_url) as st:
        await st.configure(
            users=("anne",),
            mappings=[
                st.mapping("newCallEvent", path="calls/new"),
                st.mapping("callConnectedEvent", path="calls/connected"),
                st.mapping("callHungUpEvent", path="calls/hungup"),
            ],
        )
        st.crm.add_rule("/calls/new", Failure.http(503), times=2)
        call = await st.xelion.place_call("incoming", callee="anne")
        items = await st.wait_settled(3)
        assert {d["state"] for d in items} == {"delivered"}
        received = [r for r in st.crm.received if _body(r)["callId"] == call.call_id]
        assert [(r.path, r.status) for r in received] == [
            ("/calls/new", 503),
            ("/calls/new", 503),
            ("/calls/new", 201),
            ("/calls/connected", 201),
            ("/calls/hungup", 201),
        ]
        # The same delivery was retried: one Idempotency-Key for the three tries.
        assert len({r.headers["Idempotency-Key"] for r in received[:3]}) == 1
        new = next(d for d in items if d["id"] == received[0].headers["Idempotency-Key"])
        assert new["attempts"] == 3
        assert [a["httpStatus"] for a in (await st.delivery(new["id"]))["attemptLog"]] == [503, 503, 201]


async def test_different_calls_go_in_parallel(db_url: str) -> None:
    """§3: a CRM that is slow for call A delays A's later events (order) but not call B."""
    async with running_stack(db_url) as st:
        await st.configure(
            users=("anne", "bob"),
            mappings=[
                st.mapping(e, path="calls/${callId}/" + e)
                for e in ("newCallEvent", "callConnectedEvent", "callHungUpEvent")
            ],
        )
        slow_id = "9000.1"
        st.crm.add_rule(f"/calls/{slow_id}/newCallEvent", Failure.slow(1.5), times=1)
        await st.xelion.place_call("incoming", callee="anne", call_id=slow_id)
        call_b = await st.xelion.place_call("incoming", callee="bob", call_id="9000.2")
        items = await st.wait_settled(6)
        assert {d["state"] for d in items} == {"delivered"}
        a = [r for r in st.crm.received if _body(r)["callId"] == slow_id]
        b = [r for r in st.crm.received if _body(r)["callId"] == call_b.call_id]
        assert [_body(r)["event"] for r in a] == ["newCallEvent", "callConnectedEvent", "callHungUpEvent"]
        assert [_body(r)["event"] for r in b] == ["newCallEvent", "callConnectedEvent", "callHungUpEvent"]
        a_first = a[0].at
        # B was delivered entirely while A's first request was still being answered ...
        assert all(r.at < a_first + 1.0 for r in b), [r.at - a_first for r in b]
        # ... and A's later events only after A's first was answered.
        assert all(r.at >= a_first + 1.5 for r in a[1:]), [r.at - a_first for r in a]


async def test_a_mapping_that_cannot_be_rendered_fails_alone(db_url: str) -> None:
    """A mapping whose template fails at render time (a bad function argument, an evaluation error,
    a URI that is not http) makes that delivery dead with the template error; the event's other
    mappings deliver."""
    async with running_stack(db_url) as st:
        bad_function = st.mapping("newCallEvent")
        bad_function["crmResourceUri"] = st.crm.url + "/calls/${fn:substring(callId, 0, 'x')}"
        bad_eval = st.mapping("newCallEvent", path="calls/eval", payload={"n": "${'a' + 1}"})
        bad_url = st.mapping("newCallEvent")
        bad_url["crmResourceUri"] = "${callId}://calls/new"
        await st.configure(
            users=("anne",),
            mappings=[
                st.mapping("newCallEvent", path="calls/first"),
                bad_function,
                bad_eval,
                bad_url,
                st.mapping("newCallEvent", path="calls/last"),
            ],
        )
        await st.xelion.place_call("incoming", callee="anne")
        items = await st.wait_settled(5)
        by_state = sorted(d["state"] for d in items)
        assert by_state == ["dead", "dead", "dead", "delivered", "delivered"]
        assert sorted(r.path for r in st.crm.received) == ["/calls/first", "/calls/last"]
        errors = sorted(d["lastError"] for d in items if d["state"] == "dead")
        assert all(e.startswith("render: ") for e in errors), errors
        assert any("crmResourceUri" in e and "'x'" in e for e in errors), errors
        assert any("crmResourcePayload" in e and "'a'" in e for e in errors), errors
        assert any("absolute http or https URL" in e for e in errors), errors
        # The CRM saw none of the three: the metrics count them as not sent, by reason, and not
        # among the attempts by status class.
        m = await st.metrics()
        assert 'cti_bridge_delivery_not_sent_total{reason="render"} 3.0' in m.splitlines(), m
        assert 'cti_bridge_delivery_attempts_total{status_class="2xx"} 2.0' in m.splitlines(), m
        for d in items:
            if d["state"] == "dead":
                assert d["attempts"] == 1
                (attempt,) = (await st.delivery(d["id"]))["attemptLog"]
                assert attempt["error"] == d["lastError"]
                assert attempt["httpStatus"] is None


async def _seed_access_token(st: Stack, username: str) -> str:
    """Give the user a valid access token as if it had been refreshed before, so no token request
    (whose endpoint is on loopback too) is needed."""
    token = st.crm.issue_access_token(expires_in=3600)
    store = UserCredentialTokenStore(st.daemon.db, st.daemon.box)
    cred = await st.credential_id(username)
    snap = await store.load(cred)
    saved = await store.save_tokens(
        cred,
        snap.version,
        access_token=token,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        refresh_token=snap.refresh_token,
        extra={},
        device_code_used=False,
    )
    assert saved is not None
    return token


async def test_outbound_guard_refuses_private_targets(db_url: str) -> None:
    """§15: with private targets not allowed, a mapping to a loopback IP, to a host name resolving
    to loopback, or to the cloud metadata address goes dead naming the guard; nothing is sent."""
    async with running_stack(db_url, allow_private_targets=False) as st:
        port = st.crm.port
        loopback = st.mapping("newCallEvent")
        by_name = st.mapping("newCallEvent")
        by_name["crmResourceUri"] = f"http://localhost:{port}/calls/new"
        metadata = st.mapping("newCallEvent")
        metadata["crmResourceUri"] = "http://169.254.169.254/latest/meta-data/"
        await st.configure(users=("anne",), mappings=[loopback, by_name, metadata])
        await _seed_access_token(st, "anne")
        await st.xelion.place_call("incoming", callee="anne")
        items = await st.wait_settled(3)
        assert [d["state"] for d in items] == ["dead"] * 3
        reasons = sorted(d["lastError"] for d in items)
        assert all("outbound guard" in r for r in reasons), reasons
        assert any("loopback" in r and "127.0.0.1" in r for r in reasons), reasons
        assert any("loopback" in r and "localhost" in r for r in reasons), reasons
        assert any("metadata" in r for r in reasons), reasons
        assert all(d["attempts"] == 1 for d in items)
        assert st.crm.received == []
        assert st.crm.handled == []
        assert sum(st.crm.token_counts.values()) == 0
