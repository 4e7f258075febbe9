"""Fixtures of the token tests (``test_oauth``, ``test_token_logs``): ``sim``, a CRM simulator that
knows the test client, and ``http``, the token client. A module that means another simulator by
``sim`` (the Xelion one, from ``xelion_helpers``) defines or imports its own, which wins."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from cti_bridge.config import Settings
from cti_bridge.delivery.egress import build_http_client
from cti_bridge.sim.crm import CrmSimulator
from tests.integration.oauth_helpers import CLIENT_ID, CLIENT_SECRET


@pytest.fixture
async def sim() -> AsyncIterator[CrmSimulator]:
    async with CrmSimulator() as s:
        s.add_client(CLIENT_ID, CLIENT_SECRET)
        yield s


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with build_http_client(Settings(allow_private_targets=True)) as client:
        yield client
