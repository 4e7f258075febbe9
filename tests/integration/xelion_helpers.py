"""Shared pieces of the Xelion tests: a recording SourceHooks, the simulator and client fixtures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import httpx
import pytest

from cti_bridge.ports import SourceConfig, SourceState
from cti_bridge.sim.xelion import XelionSimulator, add_demo_tenant
from cti_bridge.xelion.source import SourceOptions

ADMIN_PASSWORD = "admin-password"


class RecordingHooks:
    """An in-memory SourceHooks that records every call, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, dict[str, object]]] = []
        self.states: list[tuple[int, SourceState, str | None]] = []
        self.gaps: list[tuple[str, int, datetime, str | None]] = []
        self.heartbeats: list[tuple[int, datetime]] = []
        self.tokens: dict[int, str | None] = {}
        self.token_saves: list[tuple[int, str | None]] = []
        self.fail_events = False

    async def on_event(
        self, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> None:
        if self.fail_events:
            raise RuntimeError("database is down")
        self.events.append((xelion_context_id, notification_type, fields))

    async def on_state(self, xelion_context_id: int, state: SourceState, error: str | None) -> None:
        self.states.append((xelion_context_id, state, error))

    async def gap_opened(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        self.gaps.append(("open", xelion_context_id, started_at, reason))

    async def gap_closed(self, xelion_context_id: int, ended_at: datetime) -> None:
        self.gaps.append(("close", xelion_context_id, ended_at, None))

    async def gap_extended(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        self.gaps.append(("extend", xelion_context_id, started_at, reason))

    async def heartbeat(self, xelion_context_id: int, at: datetime) -> None:
        self.heartbeats.append((xelion_context_id, at))

    async def load_session_token(self, xelion_context_id: int) -> str | None:
        return self.tokens.get(xelion_context_id)

    async def load_state(self, xelion_context_id: int) -> tuple[str | None, datetime | None]:
        state = self.state_of(xelion_context_id)
        return (None if state is None else str(state)), None

    async def save_session_token(self, xelion_context_id: int, token: str | None) -> None:
        self.tokens[xelion_context_id] = token
        self.token_saves.append((xelion_context_id, token))

    def state_of(self, xelion_context_id: int) -> SourceState | None:
        for context_id, state, _ in reversed(self.states):
            if context_id == xelion_context_id:
                return state
        return None


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> float:
    """Poll until ``predicate()`` holds; returns the seconds it took, fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def fast_options(**overrides: object) -> SourceOptions:
    """Source options on a test's time scale: short backoff, no real waits beyond a second."""
    values: dict[str, object] = {
        "backoff_min": 0.05,
        "backoff_max": 0.2,
        "healthy_after": 30.0,
        "close_timeout": 0.5,
        "open_timeout": 2.0,
        "logout_timeout": 2.0,
    }
    values.update(overrides)
    return SourceOptions(**values)  # type: ignore[arg-type]


def config_for(sim: XelionSimulator, context_id: int = 1, **overrides: object) -> SourceConfig:
    values: dict[str, object] = {
        "xelion_context_id": context_id,
        "target": sim.target("master"),
        "admin_username": "admin",
        "admin_password": ADMIN_PASSWORD,
    }
    values.update(overrides)
    return SourceConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def sim() -> AsyncIterator[XelionSimulator]:
    async with XelionSimulator(port=0) as simulator:
        add_demo_tenant(simulator)
        yield simulator


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: the tests talk to 127.0.0.1 only, never through a proxy from the environment.
    async with httpx.AsyncClient(trust_env=False) as http:
        yield http


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()
