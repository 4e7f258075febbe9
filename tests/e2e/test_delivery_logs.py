"""What an operator reads in the log about deliveries that fail, end to end (README: an operator
can see what failed). Before, a CRM request that failed and was retried wrote no line at all: in a
CRM outage the first line came when the first delivery went dead, about ten hours in with the
default schedule. Now each CRM host's failures are a streak: its first failure at once with the
delivery's details, then one count a minute (here a shorter interval), and one line when the host
answers again; never a line per delivery per attempt. Dead and parked lines say whose delivery it
is and of which call, and a dead grant's line names the Xelion user and the integration. On SQLite
and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import pytest

from cti_bridge.logs import FailureStreak
from cti_bridge.sim.crm import Failure
from tests.e2e.stack import Stack, running_stack

WORKER = "cti_bridge.delivery.worker"
EVERY = 1.0  # the count's interval in these tests (60 s in the daemon)


def _lines(caplog: pytest.LogCaptureFixture, logger: str = WORKER) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def _about(d: dict[str, Any], event: str) -> str:
    """What the worker's lines say of a delivery (the API's view of it)."""
    return f"user {d['xelionUsername']}, credential {d['userCredentialsId']}, call {d['callId']}, {event}"


async def _event(st: Stack, d: dict[str, Any]) -> str:
    return str((await st.delivery(d["id"]))["event"]["xelionEvent"])


def _no_secret(st: Stack, caplog: pytest.LogCaptureFixture) -> None:
    for token in st.crm.issued_tokens:
        assert token not in caplog.text


async def test_a_crm_outage_is_told_at_once_then_counted_then_its_end(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FailureStreak, "EVERY", EVERY)
    caplog.set_level(logging.INFO, logger=WORKER)
    # Retried for the whole outage: no delivery goes dead meanwhile.
    async with running_stack(db_url, retry_schedule=[0] + [0.2] * 60) as st:
        await st.configure(users=("anne", "bob"))
        st.crm.add_rule("/calls", Failure.http(503))
        for callee in ("anne", "bob", "anne", "bob"):
            await st.xelion.place_call("incoming", callee=callee)
        await asyncio.sleep(2.5 * EVERY)
        failed = sum(1 for r in st.crm.received if r.status == 503)
        outage = [r for r in _lines(caplog) if "503" in r.getMessage()]
        # Dozens of failed requests, a handful of lines: the first, then one count per interval.
        assert failed >= 30, failed
        assert 2 <= len(outage) <= 4, [r.getMessage() for r in outage]
        assert all(r.levelno == logging.WARNING for r in outage)

        st.crm.clear_rules()
        items = await st.wait_settled(12)
        assert {d["state"] for d in items} == {"delivered"}
        await asyncio.sleep(EVERY + 0.5)  # a count of failures answered after the first success
        failed = sum(1 for r in st.crm.received if r.status == 503)
        host = f"127.0.0.1:{st.crm.port}"
        texts = [r.getMessage() for r in _lines(caplog)]

        # The first failure, at once: the host, the status, whose delivery, which call, when next.
        first = texts[0]
        found = re.fullmatch(
            rf"CRM host {re.escape(host)}: HTTP 503 for delivery (\S+) \((.*)\); retried at "
            r"(\S+) \(in 0\.2 s\); more failures of this host are counted in a line every 1 s "
            "until it answers again",
            first,
        )
        assert found is not None, first
        delivery = next(d for d in items if d["id"] == found[1])
        assert found[2] == _about(delivery, await _event(st, delivery))

        counts = [
            re.fullmatch(
                rf"CRM host {re.escape(host)}: (\d+) more failures? in the last \d+ s "
                r"\(last: HTTP 503(; answers again since)?\); their deliveries will be retried",
                text,
            )
            for text in texts[1:]
        ]
        ends = [
            re.fullmatch(rf"CRM host {re.escape(host)} answers again after (\d+) failures? in \d+ s", text)
            for text in texts[1:]
        ]
        assert all(c or e for c, e in zip(counts, ends, strict=True)), texts
        [end] = [(i, int(e[1])) for i, e in enumerate(ends) if e]
        end_at, streak = end
        assert any(c for c in counts[:end_at]), texts  # counted while it failed
        # Every failed request is in a line: the streak's, told at its end, and those answered
        # after it (requests in flight when the CRM came back), in a count after it.
        after = sum(int(c[1]) for c in counts[end_at:] if c)
        assert streak + after == failed, (texts, failed)
        answering = [r for r in _lines(caplog) if "answers again after" in r.getMessage()]
        assert [r.levelno for r in answering] == [logging.INFO]
        _no_secret(st, caplog)


async def test_a_host_failing_now_and_then_is_not_a_line_per_failure(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One user's requests fail while another's to the same host succeed, in between: each success
    ends the host's streak. Told every time, that was two lines per failure."""
    monkeypatch.setattr(FailureStreak, "EVERY", EVERY)
    caplog.set_level(logging.INFO, logger=WORKER)
    async with running_stack(db_url, retry_schedule=[0] + [0.05] * 200) as st:
        await st.configure(
            users=("anne", "bob"),
            mappings=[st.mapping("newCallEvent", path="calls/${user.xelionUsername}")],
        )
        st.crm.add_rule("/calls/anne", Failure.http(502))
        started = time.monotonic()
        await st.xelion.place_call("incoming", callee="anne")
        for _ in range(25):
            await st.xelion.place_call("incoming", callee="bob")
            await asyncio.sleep(0.1)
        st.crm.clear_rules()
        items = await st.wait_settled(26)
        assert {d["state"] for d in items} == {"delivered"}
        await asyncio.sleep(EVERY + 0.5)
        failed = sum(1 for r in st.crm.received if r.status == 502)
        answered = sum(1 for r in st.crm.received if r.status == 201)
        texts = [r.getMessage() for r in _lines(caplog) if "CRM host" in r.getMessage()]
        assert failed >= 20 and answered >= 20
        # At most three lines per interval (a count, a first failure, its end), however many fail.
        intervals = (time.monotonic() - started) / EVERY + 1
        assert len(texts) <= 3 * intervals, texts
        assert len(texts) < failed / 2, texts
        shapes = (r": HTTP 502 for delivery ", r": \d+ more failures? in the last ", r" answers again after ")
        assert all(any(re.search(shape, t) for shape in shapes) for t in texts), texts
        # The last line says the host answers again.
        assert re.search(r"answers again (after|since)", texts[-1]), texts


async def test_dead_and_parked_lines_say_whose_delivery_and_which_call(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_stack(db_url) as st:
        await st.configure(users=("anne", "bob"), mappings=[st.mapping("newCallEvent", path="calls/new")])
        anne = await st.credential_id("anne")
        st.crm.revoke_refresh_token(st.refresh_tokens["anne"])
        st.crm.add_rule("/calls/new", Failure.http(400))
        await st.xelion.place_call("incoming", callee="anne")
        await st.xelion.place_call("incoming", callee="bob")
        items = await st.wait_settled(2)
        by_user = {d["xelionUsername"]: d for d in items}
        assert (by_user["anne"]["state"], by_user["bob"]["state"]) == ("parked", "dead")
        texts = [r.getMessage() for r in _lines(caplog)]
        bob = by_user["bob"]
        assert f"delivery {bob['id']} dead: HTTP 400 ({_about(bob, 'newCallEvent')})" in texts
        parked = by_user["anne"]
        assert (
            f"delivery {parked['id']} parked: re-authorisation required: the token endpoint answered "
            f"invalid_grant ({_about(parked, 'newCallEvent')})"
        ) in texts
        # The dead grant's line: the repair (api/users/{id}/refreshtoken/update) needs the id; the
        # operator knows the user and the integration.
        reauth = [
            r
            for r in _lines(caplog, "cti_bridge.delivery.oauth")
            if "needs re-authorisation" in r.getMessage()
        ]
        assert [r.getMessage() for r in reauth] == [
            f"user credential {anne} (Xelion user anne, integration {st.xelion_context_id}) needs "
            "re-authorisation: the token endpoint answered invalid_grant"
        ]
        assert reauth[0].levelno == logging.WARNING
        _no_secret(st, caplog)


async def test_only_the_crms_own_answers_count_for_its_host(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing token endpoint retries deliveries too, but their CRM host did not fail: it has its
    own lines (delivery/oauth.py), and the CRM's streak is not started by it."""
    monkeypatch.setattr(FailureStreak, "EVERY", EVERY)
    caplog.set_level(logging.INFO)
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/new")])
        st.crm.token_failures.extend([Failure.http(503)] * 10)
        await st.xelion.place_call("incoming", callee="anne")
        [item] = await st.wait_settled(1)
        assert item["state"] == "dead"  # retried, then given up: the CRM was never asked
        assert st.crm.received == []
        assert not [r for r in _lines(caplog) if "CRM host" in r.getMessage()]


async def test_a_password_in_the_crm_url_is_not_in_the_hosts_lines(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FailureStreak, "EVERY", EVERY)
    caplog.set_level(logging.INFO, logger=WORKER)
    async with running_stack(db_url) as st:
        mapping = st.mapping("newCallEvent", path="calls/new")
        mapping["crmResourceUri"] = mapping["crmResourceUri"].replace("://", "://crm-user:pa55-w0rd-value@")
        await st.configure(users=("anne",), mappings=[mapping])
        st.crm.add_rule("/calls/new", Failure.http(503), times=2)
        await st.xelion.place_call("incoming", callee="anne")
        [item] = await st.wait_settled(1)
        assert item["state"] == "delivered"
        texts = [r.getMessage() for r in _lines(caplog) if "CRM host" in r.getMessage()]
        host = f"127.0.0.1:{st.crm.port}"
        assert texts[0].startswith(f"CRM host {host}: HTTP 503 for delivery {item['id']} ")
        assert texts[-1].startswith(f"CRM host {host} answers again after 2 failures in ")
        assert "pa55-w0rd-value" not in caplog.text
