"""What the admin API is built from: ``AdminDeps``, injected by the composition root (``app.py``).

It lives in its own module so that the route modules and ``auth`` can name it at import time (FastAPI
reads their annotations then) without importing ``admin.app``, which imports them.
``cti_bridge.admin.app`` re-exports it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from cti_bridge.clock import Clock
from cti_bridge.config import Settings
from cti_bridge.ports import Supervisor, XelionDirectory
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database

if TYPE_CHECKING:  # annotations only (postponed): no import at run time is needed
    import httpx

    from cti_bridge.delivery.oauth import TokenManager

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]


@dataclass
class AdminDeps:
    """Everything the admin API needs; no module-level state anywhere in ``cti_bridge.admin``."""

    settings: Settings
    database: Database
    secret_box: SecretBox
    directory: XelionDirectory
    supervisor: Supervisor
    clock: Clock
    # api/ready: (ready, details). Default: the database answers a trivial query.
    readiness: Readiness | None = None
    # More routers (deliveries, metrics, preview, apps) included beside the manual's resources.
    extra_routers: list[APIRouter] = field(default_factory=list)
    # POST api/external-api-endpoint/call (routes/apps.py): the token manager over the app_context
    # table (store.app_contexts.AppContextTokenStore) and the guarded HTTP client it calls through.
    app_tokens: TokenManager[int] | None = None
    external_http: httpx.AsyncClient | None = None


def get_deps(request: Request) -> AdminDeps:
    """FastAPI dependency: the application's ``AdminDeps`` (``app.state.deps``)."""
    deps: AdminDeps = request.app.state.deps
    return deps
