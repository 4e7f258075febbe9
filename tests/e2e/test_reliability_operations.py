"""Operations, end to end (reliability.md §5, §14, §19, §21): replaying dead deliveries (one, or
all since a time) with the same idempotency key, dismissing; no secret in logs, API answers, attempt
records or database columns; the metrics an operator watches. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from cti_bridge.sim.crm import Failure, Received
from tests.e2e.stack import ADMIN_PASSWORD, CLIENT_SECRET, Stack, running_stack


def _body(r: Received) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(r.body)
    return doc


async def _dead_call(st: Stack) -> tuple[str, dict[str, Any]]:
    call = await st.xelion.place_call("incoming", callee="anne")

    async def dead() -> bool:
        found = await st.deliveries(callId=call.call_id)
        return len(found) == 1 and found[0]["state"] == "dead"

    await st.wait_until(dead, what=f"the delivery of call {call.call_id} to go dead")
    (item,) = await st.deliveries(callId=call.call_id)
    return call.call_id, item


async def test_replay_one_and_since_a_time_with_the_same_key_and_dismiss(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """§5, §19: a dead delivery replayed reaches the CRM with the same ``Idempotency-Key`` and
    ``deliveryId``; a bulk replay takes every dead delivery since a time (and only those); a
    dismissed one is left alone. Each operator action leaves a log line saying what and by whom
    (there was none)."""
    caplog.set_level(logging.INFO, logger="cti_bridge.admin")
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/new")])
        st.crm.add_rule("/calls/new", Failure.http(422))
        _, d0 = await _dead_call(st)
        _, d1 = await _dead_call(st)
        await asyncio.sleep(0.05)
        since = datetime.now(UTC)
        await asyncio.sleep(0.05)
        _, d2 = await _dead_call(st)
        _, d3 = await _dead_call(st)
        st.crm.clear_rules()

        resp = await st.api.post(f"/api/deliveries/{d1['id']}/replay")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"id": d1["id"], "state": "pending"}
        await st.wait_until(
            lambda: _state_is(st, d1["id"], "delivered"), what="the replayed delivery to be delivered"
        )
        tries = [r for r in st.crm.received if r.headers["Idempotency-Key"] == d1["id"]]
        assert [r.status for r in tries] == [422, 201]
        assert [_body(r)["deliveryId"] for r in tries] == [d1["id"], d1["id"]]
        detail = await st.delivery(d1["id"])
        assert [a["outcome"] for a in detail["attemptLog"]] == ["dead", "delivered"]
        # A delivered delivery cannot be dismissed.
        assert (await st.api.post(f"/api/deliveries/{d1['id']}/dismiss")).status_code == 409

        resp = await st.api.post(
            "/api/deliveries/replay",
            json={"state": "dead", "since": since.isoformat().replace("+00:00", "Z")},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"replayed": 2}
        for d in (d2, d3):
            delivery_id = d["id"]
            await st.wait_until(lambda: _state_is(st, delivery_id, "delivered"), what="bulk replay")
            keys = [
                r.headers["Idempotency-Key"] for r in st.crm.received if _body(r)["deliveryId"] == d["id"]
            ]
            assert keys == [d["id"], d["id"]]
        assert await _state_is(st, d0["id"], "dead")

        resp = await st.api.post(f"/api/deliveries/{d0['id']}/dismiss")
        assert resp.status_code == 200, resp.text
        assert (await st.api.post("/api/deliveries/replay", json={})).json() == {"replayed": 0}
        assert await _state_is(st, d0["id"], "dismissed")
        await asyncio.sleep(0.2)
        assert len([r for r in st.crm.received if r.headers["Idempotency-Key"] == d0["id"]]) == 1
    actions = [r.getMessage() for r in caplog.records if r.name.startswith("cti_bridge.admin.routes")]
    assert f"delivery {d1['id']} (dead) replayed by the operator" in actions, actions
    assert any(m.startswith("2 dead deliveries replayed by the operator (since ") for m in actions), actions
    assert f"delivery {d0['id']} (dead) dismissed by the operator" in actions, actions
    assert any(m.startswith("integration ") and " created by the operator" in m for m in actions), actions


async def _state_is(st: Stack, delivery_id: str, state: str) -> bool:
    return bool((await st.delivery(delivery_id))["state"] == state)


def _metric(metrics: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", metrics, re.M)
    assert found, f"{name}{{{labels}}} not in the metrics:\n{metrics}"
    return float(found.group(1))


async def test_metrics_show_what_an_operator_watches(db_url: str) -> None:
    """§21: deliveries by state, the oldest due delivery's age, attempts by status class, token
    refreshes, credentials needing re-authorisation and the source's state."""
    async with running_stack(db_url) as st:
        await st.configure(
            users=("anne", "bob", "carol"),
            mappings=[
                st.mapping(e, path="calls/${user.xelionUsername}/" + e)
                for e in ("newCallEvent", "callConnectedEvent", "callHungUpEvent")
            ],
        )
        st.crm.add_rule("/calls/anne/newCallEvent", Failure.http(503), times=1)
        st.crm.add_rule("/calls/bob/callConnectedEvent", Failure.http(404))
        st.crm.revoke_refresh_token(st.refresh_tokens["carol"])
        for user in ("anne", "bob", "carol"):
            await st.xelion.place_call("incoming", callee=user)
        await st.wait_settled(9)
        m = await st.metrics()
        assert _metric(m, "cti_bridge_deliveries", 'state="delivered"') == 5
        assert _metric(m, "cti_bridge_deliveries", 'state="dead"') == 1
        assert _metric(m, "cti_bridge_deliveries", 'state="parked"') == 3
        assert _metric(m, "cti_bridge_deliveries", 'state="pending"') == 0
        assert _metric(m, "cti_bridge_oldest_due_delivery_age_seconds") == 0
        assert _metric(m, "cti_bridge_delivery_attempts_total", 'status_class="2xx"') == 5
        assert _metric(m, "cti_bridge_delivery_attempts_total", 'status_class="5xx"') == 1
        assert _metric(m, "cti_bridge_delivery_attempts_total", 'status_class="4xx"') == 1
        assert _metric(m, "cti_bridge_token_refreshes_total", 'result="ok"') == 2
        assert _metric(m, "cti_bridge_token_refreshes_total", 'result="reauth_required"') == 1
        assert _metric(m, "cti_bridge_credentials_reauth_required") == 1
        # carol's first delivery ended at the token endpoint (the later ones were parked with it
        # or at ingest): not a request, so counted apart from the attempts' status classes.
        assert 1 <= _metric(m, "cti_bridge_delivery_not_sent_total", 'reason="reauth_required"') <= 3
        assert _metric(m, "cti_bridge_app_contexts_reauth_required") == 0
        assert (
            _metric(
                m, "cti_bridge_source_up", f'state="subscribed",xelion_context_id="{st.xelion_context_id}"'
            )
            == 1
        )

        # A call whose first request hangs: its later events are due and waiting, and age.
        st.crm.add_rule("/calls/anne/newCallEvent", Failure.slow(1.0), times=1)
        await st.xelion.place_call("incoming", callee="anne")
        await asyncio.sleep(0.7)
        m = await st.metrics()
        assert _metric(m, "cti_bridge_deliveries", 'state="sending"') == 1
        assert _metric(m, "cti_bridge_deliveries", 'state="pending"') == 2
        assert _metric(m, "cti_bridge_oldest_due_delivery_age_seconds") >= 0.5
        await st.wait_settled(12)
        m = await st.metrics()
        assert _metric(m, "cti_bridge_deliveries", 'state="delivered"') == 8
        assert _metric(m, "cti_bridge_oldest_due_delivery_age_seconds") == 0


async def test_metrics_show_the_process_memory_cpu_and_garbage_collections(db_url: str) -> None:
    """The daemon's own resident memory, CPU time and garbage collections per generation, from
    prometheus_client's standard collectors, beside the delivery figures."""
    async with running_stack(db_url) as st:
        m = await st.metrics()
        assert _metric(m, "process_resident_memory_bytes") > 10_000_000
        assert _metric(m, "process_cpu_seconds_total") > 0
        assert _metric(m, "python_gc_collections_total", 'generation="0"') > 0  # since the start
        for generation in ("1", "2"):
            assert _metric(m, "python_gc_collections_total", f'generation="{generation}"') >= 0


def _all_database_text(st: Stack) -> str:
    """Every column of every row of every table, as text (what a database dump would show)."""
    engine = st.daemon.db.engine
    parts: list[str] = []
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                parts.extend(str(v) for v in row)
    return "\n".join(parts)


async def test_secrets_stay_secret(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """§14: after a run with retries, a 401 refresh, rotation, a dead grant and a CRM that echoes
    the token back, no refresh token, access token, client secret, Xelion password or session
    token, or admin token appears in a log line, an API answer, an attempt record or the database."""
    caplog.set_level(logging.DEBUG)
    # As in production (logs.setup_logging): httpx logs every request URL at INFO, so it is kept at
    # WARNING; a URL may carry a token (CRM.COM's ``token`` query parameter).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        await _secrets_run(db_url, caplog)
    finally:
        logging.getLogger("httpx").setLevel(logging.NOTSET)


async def _secrets_run(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    async with running_stack(db_url) as st:
        st.crm.rotate_refresh_tokens = True
        in_query = st.mapping("newCallEvent", path="calls/query")
        in_query["crmResourceUri"] = st.crm.url + "/calls/query?access_token=${token.accessToken}"
        in_body = st.mapping(
            "callConnectedEvent",
            path="calls/body",
            payload={"token": "${token.accessToken}", "id": "${callId}"},
        )
        await st.configure(users=("anne", "bob"), mappings=[in_query, in_body, st.mapping("callHungUpEvent")])
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_settled(3)
        token = st.crm.received[0].headers["Authorization"].removeprefix("Bearer ")
        # A CRM that echoes what it got in its error answers; a 5xx, then a permanent 400.
        echo = json.dumps({"error": "bad", "youSent": f"Bearer {token}", "token": token}).encode()
        st.crm.add_rule("/calls/query", Failure.http(500, echo), times=1)
        st.crm.add_rule("/calls/body", Failure.http(400, echo), times=1)
        st.crm.add_rule("/calls/callHungUpEvent", Failure.unauthorized(), times=1)
        st.crm.revoke_refresh_token(st.refresh_tokens["bob"])
        await st.xelion.place_call("incoming", callee="anne")
        await st.xelion.place_call("incoming", callee="bob")
        items = await st.wait_settled(9)
        assert sorted(d["state"] for d in items) == ["dead"] + ["delivered"] * 5 + ["parked"] * 3
        assert st.crm.token_counts["refresh_token"] == 3  # anne twice (rotated), bob once (dead)

        secrets_: set[str] = set(st.crm.issued_tokens) | {CLIENT_SECRET, ADMIN_PASSWORD, st.admin_token}
        for session in st.xelion._sessions.values():
            secrets_ |= {session.token, session.renewal_token}
        secrets_ |= {url.rstrip("/").rsplit("/", 1)[1] for url in st.xelion.stats.issued_urls}
        assert len(st.crm.issued_tokens) >= 5

        answers: list[str] = []
        listing = await st.api.get("/api/deliveries", params={"limit": 1000})
        answers.append(listing.text)
        for d in items:
            answers.append((await st.api.get(f"/api/deliveries/{d['id']}")).text)
        answers.append((await st.api.get("/api/metrics")).text)
        answers.append(
            (
                await st.api.get(
                    f"/api/crm-integrations/{st.xelion_context_id}/crm-contexts/{st.crm_context_id}/user-credentials"
                )
            ).text
        )
        answers.append((await st.api.get("/api/ready")).text)
        # The attempt records did capture the echoes and the request bodies (masked).
        details = [json.loads(a) for a in answers[1 : 1 + len(items)]]
        excerpts = [
            (a["request"]["url"], a["request"]["bodyExcerpt"], a["responseExcerpt"])
            for d in details
            for a in d["attemptLog"]
        ]
        assert any(resp and "youSent" in resp and "***" in resp for _, _, resp in excerpts), excerpts
        assert any(body and '"token"' in body and "***" in body for _, body, _ in excerpts), excerpts
        assert any("access_token=***" in url for url, _, _ in excerpts), excerpts

        database = _all_database_text(st)
        raw_files = b""
        if st.daemon.db.is_sqlite:
            db_path = Path(db_url.removeprefix("sqlite:///"))
            for path in db_path.parent.glob(db_path.name + "*"):
                if not path.name.endswith((".key", ".lock")):
                    raw_files += path.read_bytes()
            assert raw_files

        logs = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
        assert logs
        for secret in sorted(secrets_):
            assert len(secret) >= 8
            leaks = [line for line in logs if secret in line]
            assert not leaks, f"a secret in a log line: {leaks[0]}"
            leaks = [a for a in answers if secret in a]
            assert not leaks, f"a secret in an API answer: {leaks[0][:300]}"
            assert secret not in database, "a secret in a database column"
            assert secret.encode() not in raw_files, "a secret in the SQLite files"


async def test_retention_deletes_delivered_history_and_keeps_what_failed(db_url: str) -> None:
    """The running daemon's retention job (README "Retention"): with history kept for a moment, a
    delivered delivery and its attempt go at the next pass, and so do the call's events that no
    delivery needs (connected, hung up: no mapping for them), counted in the metrics; the dead one
    stays visible with its event (dead retention 0); nothing is sent again."""
    async with running_stack(db_url, retention_days=1.0 / 86400, retention_interval_seconds=0.1) as st:
        await st.configure(
            users=("anne",),
            mappings=[
                st.mapping("newCallEvent", path="calls/ok"),
                st.mapping("newCallEvent", path="calls/no"),
            ],
        )
        st.crm.add_rule("/calls/no", Failure.http(422))
        call = await st.xelion.place_call("incoming", callee="anne")

        async def only_the_dead_one_left() -> bool:
            found = await st.deliveries(callId=call.call_id)
            return [d["state"] for d in found] == ["dead"]

        await st.wait_until(only_the_dead_one_left, what="the delivered delivery to be deleted")
        (dead,) = await st.deliveries(callId=call.call_id)
        detail = await st.delivery(dead["id"])
        assert [a["httpStatus"] for a in detail["attemptLog"]] == [422]
        assert detail["event"]["xelionEvent"] == "newCallEvent"
        assert detail["event"]["notification"]["callId"] == call.call_id
        m = await st.metrics()
        assert _metric(m, "cti_bridge_retention_deleted_total", 'kind="deliveries"') == 1
        assert _metric(m, "cti_bridge_retention_deleted_total", 'kind="attempts"') == 1
        assert _metric(m, "cti_bridge_retention_deleted_total", 'kind="events"') == 2
        await asyncio.sleep(0.3)  # a few more passes
        assert sorted(r.path for r in st.crm.received) == ["/calls/no", "/calls/ok"]


async def test_an_event_retention_keeps_still_absorbs_its_duplicates(db_url: str) -> None:
    """§2 across retention passes: the event a dead delivery keeps is still the one its re-pushed
    copy is counted against, with no new delivery and nothing sent, while passes keep running."""
    async with running_stack(db_url, retention_days=1.0 / 86400, retention_interval_seconds=0.1) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/no")])
        st.crm.add_rule("/calls/no", Failure.http(422))
        call = await st.xelion.place_call("incoming", callee="anne")
        new_call = next(body for event, body in call.frames if event == "newCallEvent")
        (dead,) = await st.wait_settled(1)
        assert dead["state"] == "dead"

        async def hang_up_pruned() -> bool:
            m = await st.metrics()
            return _metric(m, "cti_bridge_retention_deleted_total", 'kind="events"') == 2

        await st.wait_until(hang_up_pruned, what="the call's other events to be deleted")
        assert await st.xelion.push("newCallEvent", new_call) == 1

        async def counted() -> bool:
            return int((await st.delivery(dead["id"]))["event"]["duplicates"]) == 1

        await st.wait_until(counted, what="the re-pushed event to be counted as a duplicate")
        await asyncio.sleep(0.3)  # a few more passes
        assert [d["id"] for d in await st.deliveries()] == [dead["id"]]
        assert len(st.crm.received) == 1
