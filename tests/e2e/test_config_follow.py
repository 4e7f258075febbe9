"""A pass over every integration (``Daemon.start_sources``: what a PostgreSQL replica runs every
``replica_poll_seconds`` to pick up other replicas' changes) racing an operator's change made
through this replica's own admin API.

The pass reads the stored configuration and then applies it; the admin API's supervisor does the
same for the one integration it changed. Both run under ``Daemon.config_lock``. Without it, a pass
that read before the change and applied after it would undo the change: stop an integration
created meanwhile (it was not in the pass's list), or apply an older configuration after the newer
one. Each test holds the pass between its read and its apply (``sources.update`` of the first
integration waits for a gate: the only thing not real here), makes the change, and checks what the
Xelion simulator ends up with: which tenants have a subscribed socket, and what they subscribe to.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sqlmodel import Session

from cti_bridge.ports import SourceConfig
from cti_bridge.sim.xelion import add_demo_tenant
from cti_bridge.store.models import EventUriMapping
from tests.e2e.stack import ADMIN_PASSWORD, CLIENT_ID, CLIENT_SECRET, Stack, running_stack

# What every source subscribes to; a mapping of another type adds it (store/sources.py).
BASE = ("newCallEvent", "callConnectedEvent", "callHungUpEvent", "missedCallEvent")


def stack(db_url: str) -> Any:
    # No periodic pass of its own (on PostgreSQL every replica_poll_seconds): the tests run theirs.
    return running_stack(db_url, xelion_backoff_min=0.05, xelion_backoff_max=0.2, replica_poll_seconds=3600)


class HeldPass:
    """Holds the first ``update`` of ``held_id`` (the pass's apply of its earlier read) until
    ``release``; every other call goes straight through. Records each call's event types."""

    def __init__(self, st: Stack, held_id: int) -> None:
        self.sources = st.daemon.sources
        self.real_update = self.sources.update
        self.held_id = held_id
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()
        self.calls: list[tuple[int, frozenset[str]]] = []
        self.sources.update = self.update  # type: ignore[method-assign]

    async def update(self, config: SourceConfig, *, retry_failed: bool = False) -> None:
        self.calls.append((config.xelion_context_id, config.event_types))
        if config.xelion_context_id == self.held_id and not self.reached.is_set():
            self.reached.set()
            await self.gate.wait()
        await self.real_update(config, retry_failed=retry_failed)

    async def calls_beyond(self, n: int, within: float) -> bool:
        """Whether more than ``n`` updates happen within ``within`` seconds."""
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            if len(self.calls) > n:
                return True
            await asyncio.sleep(0.01)
        return False


async def settled_subscriptions(st: Stack, expected: list[frozenset[str]], timeout: float = 10.0) -> None:
    """Wait until the simulator's open sockets subscribe to ``expected`` (in any order), and check
    that they still do a moment later (a stale apply arriving late would change them back)."""
    want = sorted(sorted(s) for s in expected)
    deadline = asyncio.get_running_loop().time() + timeout
    while sorted(sorted(s) for s in st.xelion.subscriptions()) != want:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"subscriptions {st.xelion.subscriptions()}, expected {expected}")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    assert sorted(sorted(s) for s in st.xelion.subscriptions()) == want


def integration_body(st: Stack, tenant: str, events: tuple[str, ...]) -> dict[str, Any]:
    return {
        "xelionContext": {
            "adminUsername": "admin",
            "adminPassword": ADMIN_PASSWORD,
            "host": f"127.0.0.1:{st.xelion.port}",
            "tenant": tenant,
            "protocol": "http",
        },
        "crmContext": {"authorizationServerUri": st.crm.token_url, "authorizationHeaderPrefix": "Bearer "},
        "userCredentials": [
            {
                "xelionUsername": "anne",
                "clientId": CLIENT_ID,
                "clientSecret": CLIENT_SECRET,
                "refreshToken": st.crm.issue_refresh_token(CLIENT_ID),
            }
        ],
        "eventUriMappings": [st.mapping(e) for e in events],
    }


async def test_a_pass_does_not_stop_an_integration_created_while_it_ran(db_url: str) -> None:
    async with stack(db_url) as st:
        add_demo_tenant(st.xelion, "second")
        await st.configure(users=("anne",), events=BASE)
        await settled_subscriptions(st, [frozenset(BASE)])
        held = HeldPass(st, st.xelion_context_id)

        # The pass reads the integrations (only the first one exists) and stops before applying.
        follow = asyncio.create_task(st.daemon.start_sources())
        await asyncio.wait_for(held.reached.wait(), 10)

        resp = await st.api.post("/api/crm-integrations", json=integration_body(st, "second", BASE))
        assert resp.status_code == 200, resp.text
        second = int(resp.json()["xelionContext"]["id"])
        # The supervisor's apply of the new integration waits for the pass: it does not run now.
        assert not await held.calls_beyond(1, within=0.5), held.calls
        held.gate.set()
        await asyncio.wait_for(follow, 10)

        await st.wait_subscribed(xelion_context_id=second)
        await settled_subscriptions(st, [frozenset(BASE), frozenset(BASE)])
        assert st.daemon.sources.running() == {st.xelion_context_id, second}
        assert [ctx for ctx, _ in held.calls] == [st.xelion_context_id, second]


async def test_a_pass_does_not_apply_its_older_read_after_the_operators_change(db_url: str) -> None:
    async with stack(db_url) as st:
        await st.configure(users=("anne",), events=BASE)
        await settled_subscriptions(st, [frozenset(BASE)])
        held = HeldPass(st, st.xelion_context_id)

        # The pass has read the four event types and stops before applying them.
        follow = asyncio.create_task(st.daemon.start_sources())
        await asyncio.wait_for(held.reached.wait(), 10)

        # The operator adds a mapping of a fifth event type through the API.
        five = (*BASE, "channelHungUpEvent")
        resp = await st.api.put(
            f"/api/crm-integrations/{st.xelion_context_id}/crm-contexts/{st.crm_context_id}/event-uri-mappings",
            json=[st.mapping(e) for e in five],
        )
        assert resp.status_code == 200, resp.text
        assert not await held.calls_beyond(1, within=0.5), held.calls
        held.gate.set()
        await asyncio.wait_for(follow, 10)

        # The change is applied after the pass's older read, so it stands.
        await settled_subscriptions(st, [frozenset(five)])
        assert held.calls == [
            (st.xelion_context_id, frozenset(BASE)),
            (st.xelion_context_id, frozenset(five)),
        ]


async def test_a_stored_mapping_for_a_type_that_is_not_a_call_event_is_warned_of_once(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The admin API refuses such a mapping; one stored by an earlier version is still subscribed
    (xelion-protocol.md §3.2) but nothing is delivered for it: the log says so, once per change."""
    async with stack(db_url) as st:
        await st.configure(users=("anne",), events=BASE)

        def store_old_mapping(s: Session) -> None:
            s.add(
                EventUriMapping(
                    crm_context_id=st.crm_context_id,
                    xelion_event="presenceEvent",
                    crm_resource_uri=f"{st.crm.url}/presence",
                )
            )

        await st.daemon.db.run(store_old_mapping)
        with caplog.at_level(logging.WARNING, logger="cti_bridge.app"):
            for _ in range(3):  # the follow pass of a replica applies every few seconds
                await st.daemon.apply_integration(st.xelion_context_id)
        warned = [r.getMessage() for r in caplog.records if "not call events" in r.getMessage()]
        assert warned == [
            f"integration {st.xelion_context_id} has mappings for presenceEvent, which are not call "
            "events: nothing is delivered for them; change or remove those mappings "
            "(PUT .../event-uri-mappings)"
        ]
        await settled_subscriptions(st, [frozenset({*BASE, "presenceEvent"})])
