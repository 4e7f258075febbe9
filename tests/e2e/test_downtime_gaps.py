"""The time the daemon itself is down is a gap (reliability.md §18, xelion-protocol.md §3.7), on the
real process, on SQLite and PostgreSQL.

Xelion does not resend what it pushed while nobody listened, so an operator reads the gaps to know
what may be missing. A daemon stopped for an upgrade or killed outright listens to nothing until it
runs again; before, only the few milliseconds between the restart and the new subscription were
recorded ("starting"), and calls made while the daemon was down fell in no gap at all. Each test
places a call while the daemon is down and checks that the newest gap covers it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cti_bridge.clock import xelion_time
from cti_bridge.xelion.source import STOPPED_REASON
from tests.e2e.process_helpers import World, process_world

pytestmark = pytest.mark.slow

EVENTS = ("newCallEvent", "callConnectedEvent", "callHungUpEvent")


async def source(world: World) -> dict[str, Any]:
    resp = await world.api.get(
        "/api/crm-integrations",
        params={"xelionHost": f"127.0.0.1:{world.xelion.port}", "xelionTenant": "master"},
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json()["source"])


async def subscribed_again(world: World, gaps_before: int) -> dict[str, Any]:
    """Wait until the restarted daemon is subscribed and every gap is closed; return the source."""
    deadline = asyncio.get_running_loop().time() + 15
    doc: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        doc = await source(world)
        gaps = doc["gaps"]
        if doc["state"] == "subscribed" and len(gaps) > gaps_before and all(g["end"] for g in gaps):
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"the source never subscribed again: {doc}")


async def missed_call(world: World) -> str:
    """A call placed while nothing listens (its events are pushed to no socket): when, to the second."""
    assert world.xelion.open_sockets == 0
    at = datetime.now(UTC)
    await world.xelion.place_call("incoming", callee="anne")
    return xelion_time(at)


async def killed_and_restarted(world: World, gaps_before: int) -> tuple[dict[str, Any], str]:
    """``kill -9`` the daemon, place a call while it is down, start it again; return the source once
    it has subscribed again, and when the missed call was placed."""
    await world.daemon.kill()
    missed = await missed_call(world)
    await asyncio.sleep(1.1)  # the gap spans whole seconds
    await world.restart()
    return await subscribed_again(world, gaps_before), missed


async def test_a_clean_stop_and_start_is_one_gap_from_the_stop_to_the_new_subscription(
    tmp_path: Path, db_url: str
) -> None:
    async with process_world(tmp_path, db_url) as world:
        await world.configure(("anne",), [world.mapping(e, f"calls/{e}") for e in EVENTS])
        before = len((await source(world))["gaps"])
        stopping = xelion_time(datetime.now(UTC))
        code, _ = await world.daemon.terminate()
        assert code == 0
        missed = await missed_call(world)
        await asyncio.sleep(1.1)  # the gap spans whole seconds
        await world.restart()
        doc = await subscribed_again(world, before)
        resubscribed = xelion_time(datetime.now(UTC))

        newest = doc["gaps"][0]
        assert newest["reason"] == STOPPED_REASON
        assert stopping <= newest["start"] <= missed <= newest["end"] <= resubscribed
        # The restart's own "starting" joined the stop's gap: one gap for the one outage.
        assert len(doc["gaps"]) == before + 1


async def test_after_kill_9_the_gap_starts_where_the_killed_daemon_was_last_known_listening(
    tmp_path: Path, db_url: str
) -> None:
    async with process_world(tmp_path, db_url) as world:
        await world.configure(("anne",), [world.mapping(e, f"calls/{e}") for e in EVENTS])
        await world.xelion.place_call("incoming", callee="anne")
        await world.wait_deliveries(3)
        last_event = (await source(world))["lastEventAt"]
        assert last_event is not None
        before = len((await source(world))["gaps"])
        # No shutdown code runs: the stored state still says subscribed.
        doc, missed = await killed_and_restarted(world, before)

        newest = doc["gaps"][0]
        # No stop time is known: the gap starts at the last moment the killed daemon is known to have
        # listened (its last stored event, written up to a second late), so it may be longer than
        # the outage, never shorter.
        one_second_earlier = xelion_time(
            datetime.strptime(last_event, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC) - timedelta(seconds=1)
        )
        assert one_second_earlier <= newest["start"] <= missed <= newest["end"]
        assert len(doc["gaps"]) == before + 1


async def test_after_kill_9_without_events_the_gap_starts_at_the_last_subscription(
    tmp_path: Path, db_url: str
) -> None:
    async with process_world(tmp_path, db_url) as world:
        await world.configure(("anne",), [world.mapping(e, f"calls/{e}") for e in EVENTS])
        doc = await subscribed_again(world, 0)  # ready comes a moment before the gap is closed
        assert doc["lastEventAt"] is None
        subscribed_at = datetime.strptime(doc["gaps"][0]["end"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        doc, missed = await killed_and_restarted(world, len(doc["gaps"]))

        # Nothing stored since the subscription that closed its last gap: it listened from then on,
        # so the new gap starts there, not earlier (the two gaps do not overlap).
        newest, previous = doc["gaps"][0], doc["gaps"][1]
        assert previous["end"] == xelion_time(subscribed_at)
        assert previous["end"] <= newest["start"] <= missed <= newest["end"]


async def test_after_kill_9_of_a_quiet_integration_the_gap_starts_at_its_last_heartbeat(
    tmp_path: Path, db_url: str
) -> None:
    """A quiet integration (a night, a weekend) has no recent event: without the heartbeat the gap
    began at its subscription, hours or days before the outage. A subscribed source stores that it
    listens every ``source_heartbeat_seconds``; the gap starts at the last such moment."""
    async with process_world(tmp_path, db_url, source_heartbeat_seconds="0.3") as world:
        await world.configure(("anne",), [world.mapping(e, f"calls/{e}") for e in EVENTS])
        doc = await subscribed_again(world, 0)
        assert doc["lastEventAt"] is None
        await asyncio.sleep(3.0)  # quiet: no event, only heartbeats
        killed_at = datetime.now(UTC)
        doc, missed = await killed_and_restarted(world, len(doc["gaps"]))

        newest, previous = doc["gaps"][0], doc["gaps"][1]
        # The subscription was 3 s before the kill; the last heartbeat at most 0.3 s (and a write).
        assert xelion_time(killed_at - timedelta(seconds=1.5)) <= newest["start"] <= missed <= newest["end"]
        assert previous["end"] < newest["start"]
