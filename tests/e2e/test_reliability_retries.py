"""Retries, end to end (reliability.md §6-§9): 5xx and 429 follow the schedule and Retry-After,
timeouts and dropped connections are retried, permanent answers go dead at once with the evidence,
and the per-host cap holds at the CRM without letting one slow CRM starve another. On SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from cti_bridge.sim.crm import Failure, Received
from tests.e2e.stack import Stack, TrackingCrmSimulator, running_stack


def _tries(st: Stack, path: str) -> list[Received]:
    return [r for r in st.crm.received if r.path == path]


async def _only_delivery(st: Stack) -> dict[str, Any]:
    (item,) = await st.wait_settled(1)
    return await st.delivery(item["id"])


async def test_5xx_follows_the_schedule_then_dead(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """§7: attempts at the schedule's offsets (±20 % jitter, never early), and after the last one
    the delivery is dead with the reason, said in the log as a warning (it was INFO: a README
    walkthrough's finding)."""
    schedule = [0, 0.25, 0.5]
    async with running_stack(db_url, retry_schedule=schedule, retry_jitter=0.2) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/new")])
        st.crm.add_rule("/calls/new", Failure.http(503))
        await st.xelion.place_call("incoming", callee="anne")
        detail = await _only_delivery(st)
        tries = _tries(st, "/calls/new")
        assert [r.status for r in tries] == [503, 503, 503]
        gaps = [b.at - a.at for a, b in zip(tries, tries[1:], strict=False)]
        for gap, delay in zip(gaps, schedule[1:], strict=True):
            assert delay * 0.8 <= gap <= delay * 1.2 + 0.25, (gaps, schedule)
        assert detail["state"] == "dead"
        assert detail["attempts"] == 3
        assert detail["lastStatus"] == 503
        assert detail["lastError"] == "gave up after 3 attempts: HTTP 503"
        assert [a["outcome"] for a in detail["attemptLog"]] == ["retry", "retry", "dead"]
        assert [a["httpStatus"] for a in detail["attemptLog"]] == [503, 503, 503]
        await asyncio.sleep(0.5)  # no fourth try
        assert len(_tries(st, "/calls/new")) == 3
        said = [r for r in caplog.records if f"delivery {detail['id']} dead" in r.getMessage()]
        assert [r.levelname for r in said] == ["WARNING"]


async def test_429_retry_after_is_obeyed_never_earlier(db_url: str) -> None:
    """§7: ``Retry-After`` in seconds and as an HTTP date is a floor over the (short) schedule."""
    async with running_stack(db_url, retry_schedule=[0, 0.1, 0.1]) as st:
        await st.configure(
            users=("anne", "bob"),
            mappings=[st.mapping("newCallEvent", path="calls/${user.xelionUsername}")],
        )
        st.crm.add_rule("/calls/anne", Failure.retry_after(1), times=1)
        # An HTTP date has whole seconds: between 0 and 1 s from now once truncated.
        not_before = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0)
        st.crm.add_rule("/calls/bob", Failure.retry_after(format_datetime(not_before, usegmt=True)), times=1)
        await st.xelion.place_call("incoming", callee="anne")
        await st.xelion.place_call("incoming", callee="bob")
        items = await st.wait_settled(2)
        assert {d["state"] for d in items} == {"delivered"}
        anne = _tries(st, "/calls/anne")
        assert [r.status for r in anne] == [429, 201]
        assert anne[1].at - anne[0].at >= 1.0
        bob = _tries(st, "/calls/bob")
        assert [r.status for r in bob] == [429, 201]
        assert bob[1].at >= not_before.timestamp()


async def test_timeouts_and_dropped_connections_are_retried(db_url: str) -> None:
    """§6, §8: a CRM that does not answer within the request timeout frees the slot in time and is
    retried; so is a connection closed without an answer."""
    async with running_stack(db_url, request_timeout=0.4, per_host_concurrency=1) as st:
        await st.configure(
            users=("anne",),
            mappings=[
                st.mapping("newCallEvent", path="calls/slow"),
                st.mapping("callConnectedEvent", path="calls/dropped"),
            ],
        )
        st.crm.add_rule("/calls/slow", Failure.slow(1.0), times=1)
        st.crm.add_rule("/calls/dropped", Failure.dropped(), times=1)
        await st.xelion.place_call("incoming", callee="anne")
        items = await st.wait_settled(2)
        assert {d["state"] for d in items} == {"delivered"}
        assert [r.status for r in _tries(st, "/calls/slow")][1:] == [201]
        assert [r.status for r in _tries(st, "/calls/dropped")] == [0, 201]
        for d in items:
            log = (await st.delivery(d["id"]))["attemptLog"]
            assert [a["outcome"] for a in log] == ["retry", "delivered"]
            first = log[0]
            assert first["httpStatus"] is None
            if "slow" in first["request"]["url"]:
                assert "Timeout" in first["error"]
                # The whole-request timeout bounds the wait, far below the CRM's 1 s.
                assert first["durationMs"] < 800
            else:
                assert "disconnected" in first["error"], first


PERMANENT = {
    "400": Failure.http(400, b'{"error":"bad request"}' + b"x" * 6000),
    "403": Failure.http(403),
    "404": Failure.http(404),
    "409": Failure.http(409),
    "410": Failure.http(410),
    "422": Failure.http(422, "unprocessable \u00e9\u00e8 \u4e2d".encode()),
    "302": Failure(status=302, headers={"Location": "/calls/followed"}, body=b"moved"),
}


async def test_permanent_answers_are_dead_at_once(db_url: str) -> None:
    """§6: 400, 403, 404, 409, 410, 422 and a 3xx go dead after one attempt, with the status and the
    first 4 KiB of the response in the attempt record; a redirect is not followed."""
    async with running_stack(db_url) as st:
        await st.configure(
            users=("anne",), mappings=[st.mapping("newCallEvent", path=f"perm/{code}") for code in PERMANENT]
        )
        for code, failure in PERMANENT.items():
            st.crm.add_rule(f"/perm/{code}", failure)
        await st.xelion.place_call("incoming", callee="anne")
        items = await st.wait_settled(len(PERMANENT))
        assert len(items) == len(PERMANENT)
        for item in items:
            detail = await st.delivery(item["id"])
            (attempt,) = detail["attemptLog"]
            code = attempt["request"]["url"].split("/perm/")[1].split("?")[0]
            failure = PERMANENT[code]
            assert detail["state"] == "dead", code
            assert detail["attempts"] == 1, code
            assert detail["lastStatus"] == failure.status
            assert detail["lastError"] == f"HTTP {failure.status}"
            assert attempt["httpStatus"] == failure.status
            assert attempt["responseExcerpt"] == failure.body[:4096].decode()
        await asyncio.sleep(0.3)
        assert sorted(r.path for r in st.crm.received) == sorted(f"/perm/{code}" for code in PERMANENT)


async def test_per_host_cap_holds_at_the_crm(db_url: str) -> None:
    """§9: with ``per_host_concurrency=2`` the CRM never has more than 2 requests in flight."""
    async with running_stack(db_url, per_host_concurrency=2) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/slow")])
        st.crm.add_rule("/calls/slow", Failure.slow(0.2))
        await asyncio.gather(*(st.xelion.place_call("incoming", callee="anne") for _ in range(6)))
        items = await st.wait_settled(6)
        assert {d["state"] for d in items} == {"delivered"}
        assert len(st.crm.handled) == 6
        assert st.crm.max_inflight == 2  # the cap, and reached: the calls did go in parallel


async def test_a_slow_crm_does_not_starve_another(db_url: str) -> None:
    """§9: a slow CRM with a backlog larger than the worker's concurrency must not hold back the
    deliveries to another CRM host."""
    other = TrackingCrmSimulator(auth_required=False)
    await other.start()
    try:
        async with running_stack(db_url, per_host_concurrency=2, worker_concurrency=4) as st:
            fast = st.mapping("missedCallEvent")
            fast["crmResourceUri"] = f"{other.url}/missed"
            await st.configure(
                users=("anne", "bob"),
                mappings=[st.mapping("newCallEvent", path="calls/slow"), fast],
            )
            st.crm.add_rule("/calls/slow", Failure.slow(0.4))
            # A backlog for the slow CRM: 8 x 0.4 s at 2 at a time is 1.6 s of work.
            await asyncio.gather(*(st.xelion.place_call("incoming", callee="anne") for _ in range(8)))
            await st.crm.wait_for(2)
            pushed_at = asyncio.get_running_loop().time()
            missed = {"callId": "7000.1", "callerPhoneNumber": "+31612345678", "calleeUser": "bob"}
            await st.xelion.push("missedCallEvent", missed)
            await other.wait_for(1, timeout=10)
            waited = asyncio.get_running_loop().time() - pushed_at
            assert waited < 0.4, f"the other CRM's delivery waited {waited:.2f} s behind the slow CRM"
            items = await st.wait_settled(9)
            assert {d["state"] for d in items} == {"delivered"}
            assert st.crm.max_inflight == 2
            assert json.loads(other.received[0].body)["callId"] == "7000.1"
    finally:
        await other.stop()
